"""`python -m m2ist.evidence.cache_step`: the demo's training step with and without the tower cache.

The three timings (an uncached step, a step that reads a filled tower cache of the demo's dtype, float32, the
towers' forward alone)
are interleaved in one process on the same batch, so a machine shared with other jobs slows them alike and their
ratios stay meaningful. Prints the medians and the ratios. ``--compile`` runs both training steps through
``torch.compile(model)`` (the first round, dropped, compiles them), so the effect of compiling can be measured.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from m2ist.config import check_flags

from .outputs import check_counts


def measure(rounds: int = 10, batch_size: int = 32, tiny: bool = False, cache_dir: str | None = None,
            compile: bool = False) -> dict[str, Any]:
    """Median milliseconds of each timing over ``rounds`` rounds (the first dropped) and the ratios; with
    ``compile`` the cached and uncached steps run ``torch.compile(model)`` (the towers' timing stays eager)."""
    from m2ist.cache import KEY_FIELDS, TowerCacheCollator, TowerFeatureCache
    from m2ist.data.collator import RECCollator
    from m2ist.model import get_side_tuned_model
    from m2ist.trainer import denormals_flushed

    from .demo import DEMO_CACHE_DTYPE, prepare

    check_counts("cache_step", rounds=rounds, batch_size=batch_size)
    check_flags("cache_step.measure", tiny=tiny, compile=compile)
    torch.manual_seed(0)
    sizes = {"train": batch_size, "val": 2, "test_attributes": 2, "test_compositional": 2, "test_relations": 2,
             "test_spatial": 2}
    setup = prepare(tiny=tiny, cache_dir=cache_dir, sizes=sizes, progress=False)
    model = get_side_tuned_model(*setup.make_towers(), setup.config).train()
    batch = TowerCacheCollator(RECCollator(setup.processor, train=True))(setup.splits["train"][:batch_size])
    inputs = {k: v for k, v in batch.items() if k not in KEY_FIELDS.values()}
    cache = TowerFeatureCache(model, None, DEMO_CACHE_DTYPE)
    # as RECTrainer: transformers 5 defaults to fused AdamW
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
    step_model = torch.compile(model) if compile else model

    def train_step(read_cache: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        if read_cache:
            output = step_model(labels=batch["labels"], tower_features=cache.features(batch))
        else:
            output = step_model(**inputs)
        output.loss.backward()
        optimizer.step()

    def towers() -> None:
        with torch.no_grad():
            model.tower_features(inputs["pixel_values"], inputs["pixel_mask"], inputs["input_ids"],
                                 inputs["attention_mask"])

    with denormals_flushed():  # as RECTrainer on a CPU
        with torch.no_grad():
            cache.features(batch)  # fills the cache
        times: dict[str, list[float]] = {"uncached_ms": [], "cached_ms": [], "towers_ms": []}
        for _ in range(max(2, rounds)):
            for name, run in (("uncached_ms", lambda: train_step(False)), ("cached_ms", lambda: train_step(True)),
                              ("towers_ms", towers)):
                start = time.perf_counter()
                run()
                times[name].append(1000 * (time.perf_counter() - start))
    result: dict[str, Any] = {name: statistics.median(values[1:]) for name, values in times.items()}
    result["cached_vs_uncached"] = result["cached_ms"] / result["uncached_ms"]
    result["towers_vs_uncached"] = result["towers_ms"] / result["uncached_ms"]
    result.update(threads=torch.get_num_threads(), batch_size=batch_size, compiled=compile, bytes_per_image=cache.bytes_per_image,
                  bytes_per_expression=cache.bytes_per_expression)
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    from m2ist.cli.flags import positive_int, user_path

    parser = argparse.ArgumentParser(prog="python -m m2ist.evidence.cache_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=positive_int, default=10, help="interleaved rounds (the first is dropped)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="batch size (default: 32, the demo's)")
    parser.add_argument("--tiny", action="store_true", help="tiny towers (a smoke test)")
    parser.add_argument("--cache-dir", type=user_path, default=None, help="cache of the pretrained shapes ViT")
    parser.add_argument("--compile", action="store_true",
                        help="run both training steps through torch.compile(model); the first round compiles")
    args = parser.parse_args(argv)
    r = measure(args.rounds, args.batch_size, args.tiny, args.cache_dir, compile=args.compile)
    compiled = " (torch.compile)" if r["compiled"] else ""
    print(f"demo step{compiled}, batch {r['batch_size']}, {r['threads']} threads: uncached {r['uncached_ms']:.0f} ms, "
          f"reading the tower cache {r['cached_ms']:.0f} ms ({r['cached_vs_uncached']:.2f}×), towers' forward alone "
          f"{r['towers_ms']:.0f} ms ({r['towers_vs_uncached']:.2f} of the uncached step); the cache stores "
          f"{r['bytes_per_image'] / 2**10:.0f} KiB per image and {r['bytes_per_expression'] / 2**10:.0f} KiB per expression")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
