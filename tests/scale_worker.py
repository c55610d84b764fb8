"""Worker of ``tests/test_scale.py``: load a REC dataset, train a tiny model a few steps, print the memory used.

``python tests/scale_worker.py FORMAT SOURCE STEPS`` with FORMAT ``hf`` (SOURCE: a ``save_to_disk`` folder) or
``jsonl`` (SOURCE: the file). Prints one JSON line: the number of samples, the peak resident set size
(``ru_maxrss``) and the anonymous resident memory at the end (``RssAnon``: what the process holds, not counting
memory-mapped files), both in MiB.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from m2ist.data import RECCollator, RECDataset, from_hf_dataset, load_jsonl  # noqa: E402
from tests.ddp_worker import make_model, make_processor  # noqa: E402


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(data_format: str, source: str, steps: str) -> None:
    torch.set_num_threads(1)
    if data_format == "hf":
        import datasets

        samples = from_hf_dataset(datasets.load_from_disk(source), box_format="xyxy")
    else:
        samples = load_jsonl(source, box_format="xyxy")
    dataset = RECDataset(samples)
    processor = make_processor(Path(source).parent / "tokenizer")
    model = make_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=True,
                                         collate_fn=RECCollator(processor, train=True))
    model.train()
    for step, batch in enumerate(loader):
        if step == int(steps):
            break
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"samples": len(dataset), "peak_rss_mib": round(peak, 1), "rss_anon_mib": round(_rss_anon_mib(), 1)}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
