"""`m2ist compare`: the paper's Fig. 1 on a laptop — full fine-tuning, adapters, LoRA and M²IST side by side.

Every method trains on the same towers (fresh copies), head configuration, procedural data, steps and seed, in
its own subprocess (so process peak memory is per method), then is evaluated on every test split. The table
gives Acc@0.5 per split, trainable parameters (M and % of the model), exact training memory (autograd saved
tensors + parameters + gradients + AdamW state), process peak memory (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU) and step time, each also as a ratio to full fine-tuning. Each method
trains as training does by default (``tower_dtype="auto"``): on a GPU with bfloat16, M²IST's frozen towers run in
bfloat16 and the baselines train theirs in float32; the ``towers`` column says which.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch

from m2ist.config import check_flags

from .bench import add_ratios, describe_device, parse_methods
from .demo import DEMO_CACHE_DTYPE, DEMO_SIDE_LEARNING_RATE, DEMO_SIZES, TINY_SIZES
from .outputs import check_batch_size, check_outputs, run_child, seed_value, tower_cache_value, write_json, write_picture

METHODS = ("full", "adapter", "lora", "m2ist")
#: What every report of ``m2ist compare`` holds: an existing ``--output`` file is replaced only if it has them.
REPORT_KEYS = ("device", "steps", "batch_size", "seed", "methods")
# learning rate of what is trained inside or beside the towers; the head always uses the demo's head rate
TOWER_LEARNING_RATES = {"full": 5e-5, "adapter": 5e-4, "lora": 5e-4, "m2ist": DEMO_SIDE_LEARNING_RATE}


def run_method(method: str, *, steps: int, batch_size: int, seed: int, tiny: bool, cache_dir: str | None,
               output_dir: Path, tower_cache: str = "memory") -> dict[str, Any]:
    """Train and evaluate one method; return its figures. M²IST trains on the tower cache (``tower_cache``; the
    baselines train their towers, so they cannot)."""
    from m2ist.data.collator import RECCollator
    from m2ist.evaluation import evaluate
    from m2ist.trainer import train_rec

    from .baselines import build_model
    from .bench import profile_training_step
    from .demo import prepare, training_arguments

    check_flags("compare.run_method", tiny=tiny)
    torch.manual_seed(seed)
    setup = prepare(tiny=tiny, cache_dir=cache_dir, seed=seed, progress=False)
    check_batch_size(batch_size, len(setup.splits["train"]), tiny)
    model = build_model(*setup.make_towers(), setup.config, method=method)
    args = training_arguments(output_dir / method, steps=steps, batch_size=batch_size, seed=seed, disable_tqdm=True,
                              side_learning_rate=TOWER_LEARNING_RATES[method], method=method,
                              tower_cache=tower_cache if method == "m2ist" else "off", tower_cache_dtype=DEMO_CACHE_DTYPE)
    start = time.perf_counter()
    train_rec(model, setup.processor, setup.splits["train"], args=args)
    train_seconds = time.perf_counter() - start
    tests = {name: samples for name, samples in setup.splits.items() if name != "train"}
    metrics = evaluate(model, setup.processor, tests, batch_size=64, progress=False)["metrics"]
    model.train()
    batch = RECCollator(setup.processor)([
        {"image": s.image, "expression": s.expression, "box": s.box} for s in setup.splits["train"][:batch_size]])
    figures = profile_training_step(model, dict(batch), steps=3, warmup=1)
    trainable, total = model.get_nb_trainable_parameters()
    # training's default (tower_dtype="auto") runs M²IST's frozen towers in bfloat16 on a GPU that supports it,
    # while the baselines train theirs in float32: each row says which its figures were measured with
    return {"method": method, "tower_dtype": str(model.vision_tower.dtype).removeprefix("torch."),
            "metrics": metrics, "trainable_params": trainable, "total_params": total,
            "parameter_counts": model.parameter_counts(), "train_seconds": train_seconds, **figures}


def _isolated(method: str, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.work_dir) / f"{method}.json"
    cmd = [sys.executable, "-m", "m2ist.evidence.compare", "--one", method, "--steps", str(args.steps), "--batch-size",
           str(args.batch_size), "--seed", str(args.seed), "--work-dir", args.work_dir]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    cmd += ["--tower-cache", args.tower_cache]
    done = run_child(cmd)
    if done.returncode:
        raise RuntimeError(f"compare: {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text(encoding="utf-8"))


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: accuracy per split, then cost and its ratio to full fine-tuning."""
    splits = list(rows[0]["metrics"])
    head = "| method | towers | " + " | ".join(f"{s} Acc@0.5" for s in splits) + " | trainable (M) | trainable % | " \
        "exact memory (MiB) | peak memory (MiB) | step (s) | memory vs full | peak vs full | time vs full |"
    lines = [head, "|" + "---|" * (len(splits) + 10)]
    for r in rows:
        ratio = r.get("ratios_to_full", {})
        accs = " | ".join(f"{100 * r['metrics'][s]['acc@0.5']:.1f}" for s in splits)
        lines.append(
            f"| {r['method']} | {r.get('tower_dtype', '?')} | {accs} | {r['trainable_params'] / 1e6:.2f} | "
            f"{100 * r['trainable_fraction']:.2f} | "
            f"{r['exact_bytes'] / 2**20:.0f} | {r['peak_memory_bytes'] / 2**20:.0f} | {r['step_time_s']:.3f} | "
            f"{ratio.get('exact_bytes', float('nan')):.3f} | {ratio.get('peak_memory_bytes', float('nan')):.3f} | "
            f"{ratio.get('step_time_s', float('nan')):.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Fig. 1-style scatter: mean Acc@0.5 against exact training memory, bubble size = trainable parameters."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        tests = [m for name, m in r["metrics"].items() if name.startswith("test")] or list(r["metrics"].values())
        accuracy = 100 * sum(m["acc@0.5"] for m in tests) / len(tests)
        ax.scatter(r["exact_bytes"] / 2**20, accuracy, s=40 + 400 * r["trainable_fraction"], alpha=0.7)
        ax.annotate(r["method"], (r["exact_bytes"] / 2**20, accuracy), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("exact training memory (MiB)")
    ax.set_ylabel("mean Acc@0.5 over test splits (%)")
    ax.set_title("m2ist compare (bubble: trainable parameters)")
    fig.tight_layout()
    write_picture(path, lambda tmp, metadata: fig.savefig(tmp, dpi=120, format="png", metadata=metadata))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``m2ist compare``."""
    from m2ist.cli.flags import HelpFormatter, positive_int, user_path
    from m2ist.cli.verbosity import add_verbosity_flag, apply_verbosity

    parser = argparse.ArgumentParser(prog="m2ist compare", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--methods", metavar="LIST", default=",".join(METHODS),
                        help="comma-separated subset of full,adapter,lora,m2ist")
    parser.add_argument("--steps", metavar="N", type=positive_int, default=300,
                        help="training steps per method (default: 300)")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=32, help="training batch size (default: 32)")
    parser.add_argument("--seed", metavar="N", type=seed_value, default=0, help="seed shared by every method")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run with tiny settings")
    parser.add_argument("--cache-dir", metavar="DIR", type=user_path, default=None, help="cache of the pretrained shapes ViT")
    parser.add_argument("--work-dir", metavar="DIR", type=user_path, default="outputs/compare",
                        help="where per-method outputs go")
    parser.add_argument("--output", metavar="FILE", type=user_path,
                        help="write the JSON results to this file (default: <work-dir>/compare.json)")
    parser.add_argument("--tower-cache", metavar="MODE", type=tower_cache_value, default="memory",
                        help="M²IST's tower-feature cache: memory (default), disk, a folder, or off")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    add_verbosity_flag(parser)
    args = parser.parse_args(argv)
    apply_verbosity(args)
    methods = parse_methods(parser, args.one or args.methods, METHODS)  # before any folder is created
    output = Path(args.output or Path(args.work_dir) / "compare.json")
    if not args.one:  # before any method trains: the results must have somewhere to go
        check_outputs(output, REPORT_KEYS, "--output", output.with_suffix(".png"))
        check_batch_size(args.batch_size, 2 * (TINY_SIZES if args.tiny else DEMO_SIZES)["train"], args.tiny)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    if args.one:
        row = run_method(args.one, steps=args.steps, batch_size=args.batch_size, seed=args.seed, tiny=args.tiny,
                         cache_dir=args.cache_dir, output_dir=Path(args.work_dir), tower_cache=args.tower_cache)
        write_json(Path(args.work_dir) / f"{args.one}.json", row)
        return 0
    rows = []
    for method in methods:
        print(f"[compare] training {method} ({args.steps} steps) ...", file=sys.stderr, flush=True)
        rows.append(_isolated(method, args))
    add_ratios(rows, keys=("trainable_params", "exact_bytes", "peak_memory_bytes", "step_time_s"))
    device = describe_device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"m2ist compare — procedural REC, {args.steps} steps × {args.batch_size}, seed {args.seed}, {device}, "
          f"{date.today()}")
    print(format_table(rows))
    report = {"device": device, "date": str(date.today()), "steps": args.steps, "batch_size": args.batch_size,
              "seed": args.seed, "tiny": args.tiny, "methods": rows}
    write_json(output, report)
    picture = plot(rows, output.with_suffix(".png"))
    print(f"results: {output}" + (f", plot: {picture}" if picture else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
