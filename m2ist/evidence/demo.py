"""`m2ist demo` (`make demo`): M²IST on the procedural REC benchmark, offline, on a CPU, in a few minutes.

1. Towers: all-MiniLM-L6-v2 (a real pretrained BERT, shipped by a package) and a small ViT pretrained on the
   shapes domain with a non-grounding task (shipped with m2ist, installed into the cache on the first run).
2. Data: the seeded procedural benchmark (attribute, compositional, relation and spatial test splits).
3. Side-tunes M²IST (both towers frozen), evaluates Acc@0.5 on every split, saves the adapter, reloads it,
   predicts on fresh scenes and draws the boxes into a PNG, then prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from m2ist.cache import CACHE_DTYPES, check_tower_cache
from m2ist.config import M2ISTConfig, check_flags
from m2ist.data.sample import RECSample

from .outputs import check_batch_size, check_outputs, seed_value, tower_cache_value, write_json, write_picture

logger = logging.getLogger(__name__)

DEMO_STEPS = 800
DEMO_SIZES = {"train": 4000, "val": 150, "test_attributes": 150, "test_compositional": 150, "test_relations": 150,
              "test_spatial": 150}
"""The demo's schedule and data (images per split, two expressions each): 800 steps × 32 over 4,000 training
scenes. With the vision tower shipped instead of pretrained in the run, the 5-minute budget
affords 1.6× the scenes and 1.3× the steps of 2,500 / 600, which lifted val from 81.0% to 85.0%, held-out pairs
from 69.3% to 73.3% and spatial expressions from 74.0% to 75.3% on the benchmark of the time (seed 0; +1.8, +6.2
and +2.3 points on average over three seeds, docs/benchmarks.md)."""
DEMO_HEAD = dict(fusion_layers=1, fusion_norm="pre", reg_init="text", box_readout="vote", vote_hops=2,
                 position_init="sincos")
"""The demo's head: one pre-norm fusion layer, an expression-conditioned [REG], visual positions that start from a
sine-cosine table of the patch grid, and the box-vote readout with two hops (votes within one cell of the
attention's peak, the point loss on). TransVG's head (six post-norm fusion layers, an MLP on [REG]) stays at the
mean box for the few thousand steps a CPU demo can afford."""
DEMO_CACHE_DTYPE = "float32"
"""The demo's tower cache keeps float32 features (about 2.4 GB of RAM for its 4,000 scenes): the cached run is then
the uncached run (same losses, same accuracy) in 0.62 of its training time, where a bfloat16 or float16
cache (half the bytes, ``--tower-cache-dtype``) scored 9–11 points lower on spatial expressions (one seed each;
docs/benchmarks.md)."""
DEMO_SIDE_LEARNING_RATE = 1e-4
"""The side network's learning rate in the demo (the head's is 1e-3). Ten times lower than the head's kept the side
network from learning that held-out colour-shape pairs, drawn in training images, are never the answer (51% on them
at 1e-3, 63–76% at 1e-4); since they are no longer drawn there, 1e-3 and 1e-4 score alike (three seeds each, within
a point on average on every split; docs/benchmarks.md)."""
#: What every ``results.json`` of the demo holds: an existing one is replaced only if it has them.
RESULTS_KEYS = ("metrics", "parameter_counts", "steps", "batch_size")
TINY_SIZES = {"train": 24, "val": 6, "test_attributes": 6, "test_compositional": 6, "test_relations": 6,
              "test_spatial": 6}


@dataclass
class DemoSetup:
    """Everything a demo or comparison run shares: fresh-tower factories, processor, data and model config."""

    make_towers: Callable[[], tuple[torch.nn.Module, torch.nn.Module]]
    processor: Any
    splits: dict[str, list[RECSample]]
    config: M2ISTConfig
    scenes: Any = None  # the SyntheticRECConfig the splits were drawn with
    tiny: bool = False


def prepare(*, tiny: bool = False, cache_dir: str | None = None, seed: int = 0, sizes: dict[str, int] | None = None,
            progress: bool = True, recipe: Any = None) -> DemoSetup:
    """Load (or install or pretrain, and cache) the towers, build the processor and generate the benchmark. ``recipe``: the
    vision tower's :class:`~m2ist.evidence.demo_towers.VisionPretrainRecipe` (default: the demo's)."""
    from m2ist.processing import RECProcessor

    from .demo_towers import VisionPretrainRecipe, load_vision_tower, text_tower_path, vision_tower_path
    from .synthetic import make_benchmark

    check_flags("demo.prepare", tiny=tiny, progress=progress)
    if recipe is None:
        recipe = VisionPretrainRecipe.tiny() if tiny else VisionPretrainRecipe()
    # installed (or pretrained) once, then cached; this first load serves the first make_towers() call (not loaded twice)
    loaded = [load_vision_tower(cache_dir=cache_dir, recipe=recipe, progress=progress)]
    vision_path = vision_tower_path(cache_dir, recipe)

    def make_towers() -> tuple[torch.nn.Module, torch.nn.Module]:
        from transformers import AutoModel

        # its pooler output is never used, nor counted
        vision = loaded.pop() if loaded else AutoModel.from_pretrained(vision_path)
        text = AutoModel.from_pretrained(text_tower_path()).eval()  # the tokenizer comes with the processor, once
        if tiny:  # two text layers are plenty for a smoke run
            text.encoder.layer = text.encoder.layer[:2]
            text.config.num_hidden_layers = 2
        return vision, text

    processor = RECProcessor.from_pretrained(text_tower_path(), vision_path, canvas_size=recipe.image_size,
                                             max_query_len=16)
    # the pretraining scenes' look, with the benchmark's held-out (shape, colour) pairs
    scenes = dataclasses.replace(recipe.scene_config(), heldout_pairs=None, seed=seed)
    splits = make_benchmark(sizes=sizes or (TINY_SIZES if tiny else DEMO_SIZES), seed=seed, config=scenes)
    head = dict(fusion_dim=32, fusion_heads=2, fusion_ffn_dim=64, bottleneck=8) if tiny else \
        dict(fusion_dim=256, fusion_heads=8, fusion_ffn_dim=512, bottleneck=64)
    config = M2ISTConfig(image_size=recipe.image_size, max_query_len=16, fusion_dropout=0.0, **DEMO_HEAD, **head)
    return DemoSetup(make_towers=make_towers, processor=processor, splits=splits, config=config, scenes=scenes,
                     tiny=tiny)


def training_arguments(output_dir: Path, *, steps: int, batch_size: int, seed: int, **overrides: Any):
    """The demo's short schedule: higher learning rates than the paper's 90 epochs, no checkpoints."""
    from m2ist.trainer import RECTrainingArguments

    values = dict(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                  learning_rate=1e-3, side_learning_rate=DEMO_SIDE_LEARNING_RATE, lr_drop_epochs=[], lr_scheduler_type="cosine",
                  warmup_steps=max(1, steps // 20), save_strategy="no", eval_strategy="no", logging_steps=max(1, steps // 10),
                  seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
                  report_to="none", disable_tqdm=False)
    values.update(overrides)
    return RECTrainingArguments(**values)


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step (``times``, seconds)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start: float | None = None

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        if self._start is not None:
            self.times.append(time.perf_counter() - self._start)

    def summary(self, steps_per_epoch: int) -> dict[str, float | None]:
        """Median step time in the first epoch (the tower cache fills) and after it (the cache is read)."""
        import statistics

        first, later = self.times[1:steps_per_epoch], self.times[steps_per_epoch:]
        return {"first_epoch_step_s": statistics.median(first) if first else None,
                "later_step_s": statistics.median(later) if later else None}


def draw_predictions(model, processor, samples: list[RECSample], path: Path) -> Path:
    """A grid of scenes with predicted (red) and ground-truth (green) boxes and the expressions; saved as PNG."""
    from PIL import Image

    from m2ist.inference import draw_boxes, predict_boxes

    boxes = predict_boxes(model, [s.image for s in samples], [s.expression for s in samples], processor=processor)
    tiles = [draw_boxes(s.image.convert("RGB").resize((256, 256 * s.image.height // s.image.width)),
                        boxes[i:i + 1] * 256 / s.image.width, texts=[s.expression],
                        gt_boxes=torch.tensor([s.box]) * 256 / s.image.width)
             for i, s in enumerate(samples)]
    columns = 4
    rows = (len(tiles) + columns - 1) // columns
    width, height = max(t.width for t in tiles), max(t.height for t in tiles)
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * width, (i // columns) * height))
    def save(tmp: str, metadata: dict[str, str]) -> None:
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_text(key, value)
        sheet.save(tmp, format="PNG", pnginfo=info)

    return write_picture(path, save)


def run(output_dir: str | Path = "outputs/demo", *, steps: int = DEMO_STEPS, batch_size: int = 32, tiny: bool = False,
        cache_dir: str | None = None, seed: int = 0, progress: bool = True,
        tower_cache: str = "memory", tower_cache_dtype: str = DEMO_CACHE_DTYPE) -> dict[str, Any]:
    """The whole demo; returns the results (also written to ``output_dir/results.json``). ``tower_cache``
    (``"memory"`` by default, ``"off"``, ``"disk"`` or a folder): the towers' features of each training image and
    expression are computed once (in ``tower_cache_dtype``) and read back in later epochs."""
    from m2ist.evaluation import evaluate
    from m2ist.model import SideTunedModel, get_side_tuned_model
    from m2ist.trainer import train_rec

    from .synthetic import generate_split

    check_flags("demo.run", tiny=tiny, progress=progress)  # tiny="False" would run the smoke test as the demo
    output_dir = Path(output_dir)
    check_demo_outputs(output_dir)
    tower_cache = check_tower_cache(tower_cache)
    started = time.perf_counter()
    torch.manual_seed(seed)
    setup = prepare(tiny=tiny, cache_dir=cache_dir, seed=seed, progress=progress)
    check_batch_size(batch_size, len(setup.splits["train"]), tiny)
    vision, text = setup.make_towers()
    model = get_side_tuned_model(vision, text, setup.config)
    model.processor = setup.processor
    counts = model.parameter_counts()
    prepared = time.perf_counter()

    args = training_arguments(output_dir / "trainer", steps=steps, batch_size=batch_size, seed=seed,
                              disable_tqdm=not progress, tower_cache=tower_cache, tower_cache_dtype=tower_cache_dtype)
    timer = StepTimer()
    trainer = train_rec(model, setup.processor, setup.splits["train"], args=args, callbacks=[timer])
    trained = time.perf_counter()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    steps_per_epoch = -(-len(setup.splits["train"]) // batch_size)
    cache = trainer.tower_cache
    cache_report = None if cache is None else {
        "dtype": cache.dtype, "bytes_per_image": cache.bytes_per_image,
        "bytes_per_expression": cache.bytes_per_expression, **cache.stats}

    tests = {name: samples for name, samples in setup.splits.items() if name != "train"}
    metrics = evaluate(model, setup.processor, tests, batch_size=64, progress=progress)["metrics"]

    adapter = output_dir / "adapter"
    model.save_pretrained(adapter)
    reloaded = SideTunedModel.from_pretrained(adapter, vision_model=vision, text_model=text)
    fresh = generate_split("test_attributes", 2, seed + 1000, setup.scenes) + \
        generate_split("test_relations", 2, seed + 1000, setup.scenes)
    picture = draw_predictions(reloaded, reloaded.processor, fresh[:8], output_dir / "predictions.png")
    results = {
        "metrics": metrics,
        "parameter_counts": counts,
        "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
        "steps": steps,
        "batch_size": batch_size,
        "tower_cache": tower_cache,
        "tower_cache_stats": cache_report,
        "step_times": timer.summary(steps_per_epoch),
        "seconds": {"prepare": prepared - started, "train": trained - prepared,
                    "total": time.perf_counter() - started},
        "adapter": str(adapter),
        "predictions_png": str(picture),
    }
    write_json(output_dir / "results.json", results)
    return results


def check_demo_outputs(output_dir: Path) -> None:
    """Before any work: ``output_dir`` can take the demo's results, picture and adapter without replacing what
    the demo did not write (an earlier demo's outputs are replaced)."""
    from m2ist.save_and_load import save_folder_problem

    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file; give a folder (it is created if needed).")
    check_outputs(output_dir / "results.json", RESULTS_KEYS, "--output-dir", output_dir / "predictions.png")
    adapter = output_dir / "adapter"
    if adapter.exists() and not adapter.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir}: {adapter} is a file, where the demo saves its adapter; "
                                 "give another folder.")
    problem = save_folder_problem(adapter) if adapter.is_dir() else None
    if problem is not None:
        raise ValueError(f"--output-dir {output_dir}: the adapter cannot be saved into {adapter}: {problem}.")


def format_results(results: dict[str, Any]) -> str:
    """The short table ``m2ist demo`` prints."""
    counts = results["parameter_counts"]
    total = sum(counts.values())
    lines = ["| split | Acc@0.5 | mean IoU | expressions |", "|---|---|---|---|"]
    for split, m in results["metrics"].items():
        lines.append(f"| {split} | {100 * m['acc@0.5']:.1f}% | {m['miou']:.3f} | {m['count']} |")
    seconds = results["seconds"]
    lines += [
        "",
        f"side adapters: {counts['side']:,d} params ({100 * counts['side'] / total:.2f}% of the model), head: "
        f"{counts['head']:,d}, frozen towers: {counts['frozen']:,d}",
        f"training: {results['steps']} steps × {results['batch_size']} in {seconds['train']:.0f} s; "
        f"loss {results['train_loss_first_last'][0]:.3f} → {results['train_loss_first_last'][1]:.3f}"
        if results["train_loss_first_last"] else "",
        _cache_line(results),
        f"adapter saved to {results['adapter']} (reloaded for the picture); predictions drawn in "
        f"{results['predictions_png']}; total {seconds['total']:.0f} s",
    ]
    return "\n".join(lines)


def _cache_line(results: dict[str, Any]) -> str:
    stats, times = results.get("tower_cache_stats"), results.get("step_times") or {}
    if not stats:
        return "tower cache: off"
    line = (f"tower cache ({stats['dtype']}): {stats['vision_records']} images × {stats['bytes_per_image'] / 2**10:.0f} KiB "
            f"+ {stats['text_records']} expressions × {stats['bytes_per_expression'] / 2**10:.0f} KiB")
    if times.get("first_epoch_step_s") and times.get("later_step_s"):
        line += (f"; step {1000 * times['first_epoch_step_s']:.0f} ms while filling, {1000 * times['later_step_s']:.0f} ms "
                 f"reading ({times['later_step_s'] / times['first_epoch_step_s']:.2f}×)")
    return line


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``m2ist demo``."""
    from m2ist.cli.flags import HelpFormatter, positive_int, user_path
    from m2ist.cli.verbosity import add_verbosity_flag, apply_verbosity

    parser = argparse.ArgumentParser(prog="m2ist demo", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output-dir", metavar="DIR", type=user_path, default="outputs/demo",
                        help="where the adapter, PNG and results go")
    parser.add_argument("--steps", metavar="N", type=positive_int, default=DEMO_STEPS,
                        help=f"side-tuning steps (default: {DEMO_STEPS})")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=32, help="training batch size (default: 32)")
    parser.add_argument("--seed", metavar="N", type=seed_value, default=0,
                        help="seed of the data, the model and the training")
    parser.add_argument("--cache-dir", metavar="DIR", type=user_path, default=None,
                        help="cache of the pretrained shapes ViT (default: ~/.cache/m2ist)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run with tiny settings")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_verbosity_flag(parser)
    parser.add_argument("--tower-cache", metavar="MODE", type=tower_cache_value, default="memory",
                        help="cache the frozen towers' features: memory (default), disk, a folder, or off")
    parser.add_argument("--tower-cache-dtype", metavar="DTYPE", default=DEMO_CACHE_DTYPE, choices=CACHE_DTYPES,
                        help=f"dtype of the cached features: {', '.join(CACHE_DTYPES)} (default: {DEMO_CACHE_DTYPE})")
    args = parser.parse_args(argv)
    apply_verbosity(args)
    results = run(args.output_dir, steps=args.steps, batch_size=args.batch_size, tiny=args.tiny,
                  cache_dir=args.cache_dir, seed=args.seed, progress=not args.no_progress, tower_cache=args.tower_cache,
                  tower_cache_dtype=args.tower_cache_dtype)
    print(format_results(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
