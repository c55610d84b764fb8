"""Subprocess side of tests/test_hostile.py: the cases that need a second process (concurrent saves) or a process
limit (``ulimit -f`` during a save).

``python tests/hostile_worker.py save-loop FOLDER BOTTLENECK COUNT START_FILE``: build a tiny adapter with that
bottleneck (its weights all equal to it), touch ``START_FILE.ready-BOTTLENECK``, wait for ``START_FILE`` (so two
workers overlap), save it ``COUNT`` times into ``FOLDER`` and print when the saves began and ended (JSON).

``python tests/hostile_worker.py save-limited FOLDER LIMIT_BYTES``: save a tiny adapter into ``FOLDER`` under
``RLIMIT_FSIZE = LIMIT_BYTES`` (what ``ulimit -f`` sets; a full disk fails the same way) and print the error;
``LIMIT_BYTES`` ``none`` keeps the limit the shell set (``(ulimit -S -f 20; python ... save-limited DIR none)``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from m2ist import get_side_tuned_model  # noqa: E402
from tests.tiny import text_tower, tiny_config, vision_tower  # noqa: E402


def build(bottleneck: int):
    """The tiny ViT + BERT adapter with ``bottleneck``, its weights filled with the bottleneck (easy to tell apart)."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(bottleneck=bottleneck))
    with torch.no_grad():
        for tensor in model.trainable_state_dict().values():
            tensor.fill_(float(bottleneck))
    return model


def save_loop(folder: str, bottleneck: str, count: str, start_file: str) -> None:
    model = build(int(bottleneck))
    Path(f"{start_file}.ready-{bottleneck}").touch()
    deadline = time.monotonic() + 120
    while not Path(start_file).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    began = time.time()
    for _ in range(int(count)):
        model.save_pretrained(folder)
    print(json.dumps({"bottleneck": int(bottleneck), "began": began, "ended": time.time()}))


def save_limited(folder: str, limit: str) -> None:
    model = build(16)
    if limit != "none":  # "none": the limit was set by the shell (ulimit -S -f)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        model.save_pretrained(folder)
    except OSError as err:
        print(f"refused: {type(err).__name__}: {err}")
        return
    print("saved")


if __name__ == "__main__":
    {"save-loop": save_loop, "save-limited": save_limited}[sys.argv[1]](*sys.argv[2:])
