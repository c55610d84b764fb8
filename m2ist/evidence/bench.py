"""`m2ist bench`: the cost of one training step at paper scale, for every method, side by side.

Each method runs in its own subprocess (so the process peak memory of one does not leak into the next) on the
same towers, batch and seed: DETR-R50 encoder + BERT-base (random weights: cost does not depend on them),
640×640 canvas, query length 20. M²IST's frozen towers follow training's default (``tower_dtype="auto"``):
bfloat16 on a CUDA device that supports it, float32 elsewhere, unless ``--backbone-dtype`` says otherwise; each row
records its towers' dtype. Reported per method: trainable parameters, exact bytes (autograd saved tensors
+ parameters + gradients + AdamW state), process peak memory (``torch.cuda.max_memory_allocated`` on GPU, peak
RSS on CPU), step time, and each as a ratio to full fine-tuning. The floor is the frozen towers' forward alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from datetime import date
from typing import Any

import torch

from m2ist.config import check_flags

from .outputs import check_outputs, run_child, write_json

PAPER = {"trainable": 0.0211, "memory": 0.3961, "time": 0.6346}
#: ``m2ist-cached``: M²IST reading its towers' features from a filled tower cache (bfloat16, RAM);
#: ``m2ist-x4``: inference of four adapters on one pass of the towers, against one adapter's inference.
METHOD_ORDER = ("full", "adapter", "lora", "m2ist", "m2ist-cached", "m2ist-x4")
LABELS = {"m2ist-cached": "m2ist (cached)", "m2ist-x4": "m2ist ×4 adapters"}


def _towers(tiny: bool):
    if tiny:
        import transformers as T

        layers = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        return (T.ViTModel(T.ViTConfig(**layers, image_size=64, patch_size=16)),
                T.BertModel(T.BertConfig(**layers, vocab_size=1000)))
    from m2ist.reference import reference_towers

    return reference_towers(pretrained=False)


def _config(tiny: bool, backbone_dtype: str | None):
    from m2ist.config import M2ISTConfig
    from m2ist.reference import reference_config

    if tiny:
        return M2ISTConfig(image_size=64, max_query_len=20, bottleneck=16, fusion_dim=64, fusion_layers=1,
                           fusion_heads=2, fusion_ffn_dim=128, backbone_dtype=backbone_dtype)
    return reference_config(backbone_dtype=backbone_dtype)


def bench_backbone_dtype(method: str, device: str | torch.device, backbone_dtype: str | None,
                         bf16_supported: bool | None = None) -> str | None:
    """The ``backbone_dtype`` a bench row builds its model with. Baselines: None (they train their towers, in
    float32). M²IST rows: ``backbone_dtype`` when given (``--backbone-dtype``), else what training does by default
    (:func:`m2ist.trainer.resolve_tower_dtype` with ``tower_dtype="auto"``): ``"bfloat16"`` on a CUDA ``device``
    that supports it (``bf16_supported``, default: ask torch), else None (float32 towers: CPUs are unchanged)."""
    from m2ist.trainer import resolve_tower_dtype, supports_bf16

    if method.split("-")[0] != "m2ist":
        return None
    if backbone_dtype is not None:
        return backbone_dtype
    supported = supports_bf16(device) if bf16_supported is None else bf16_supported
    dtype = resolve_tower_dtype("auto", device, torch.float32, supported)
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int = 3,
                          warmup: int = 1, lr: float = 1e-5, forward: Any = None) -> dict[str, Any]:
    """AdamW steps of ``model`` on ``batch``: exact bytes, process peak memory and median step time.

    Exact bytes = autograd's saved tensors (one forward, distinct storages, the model's parameters left out: they
    are counted once, as parameters) + parameters + the gradients and AdamW state held after the timed steps
    (measured, not predicted: a trainable parameter that gets no gradient, such as a pooler, costs nothing).
    Process peak = ``torch.cuda.max_memory_allocated`` since the warm-up on GPU, peak RSS on CPU (run one method
    per process to compare peaks).
    """
    from .outputs import check_counts
    from .profiling import saved_tensor_accounting, training_state_bytes

    check_counts("profile_training_step", steps=steps, warmup=warmup)
    dev = next(p.device for p in model.parameters())
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4,
                                  fused=True if dev.type == "cuda" else None)
    forward = forward or (lambda: model(**batch))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with saved_tensor_accounting(exclude=model.parameters()) as saved:
        loss = forward().loss
    loss.backward()
    del loss
    times = []
    for _ in range(steps):
        _sync(dev)
        start = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - start)
    state = training_state_bytes(model, optimizer)  # what the last step left: gradients and AdamW state
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "saved_tensor_bytes": saved.bytes,
        "exact_bytes": saved.bytes + state["parameters"] + state["gradients"] + state["optimizer"],
        "peak_memory_bytes": int(peak),
        "step_time_s": statistics.median(times),
    }


def measure(method: str, batch_size: int, steps: int, warmup: int, device: str, tiny: bool,
            backbone_dtype: str | None) -> dict[str, Any]:
    """Build ``method`` on fresh towers and time ``steps`` AdamW steps after ``warmup``; return the figures."""
    from m2ist.head import rec_loss

    from .baselines import build_model

    check_flags("bench.measure", tiny=tiny)  # tiny="False" would time the tiny towers as the real ones
    torch.manual_seed(0)
    dev = torch.device(device)
    variant, method = method, method.split("-")[0]
    config = _config(tiny, bench_backbone_dtype(method, dev, backbone_dtype))
    model = build_model(*_towers(tiny), config, method=method).to(dev)
    model.train()
    size, length = model.config.image_size, model.config.max_query_len
    g = torch.Generator().manual_seed(0)
    batch = {
        "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
        "pixel_mask": torch.ones(batch_size, size, size, dtype=torch.long),
        "input_ids": torch.randint(1000, 2000, (batch_size, length), generator=g) % model.text_model.config.vocab_size,
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
        # boxes on the canvas (centres in [0.3, 0.7], sides in [0.1, 0.5]), as the processor's labels always are
        "labels": torch.rand(batch_size, 4, generator=g) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1]),
    }
    batch = {k: v.to(dev) for k, v in batch.items()}
    extra: dict[str, Any] = {}
    forward = None
    if variant == "m2ist-cached":
        forward, extra = _cached_forward(model, batch)
    if variant == "m2ist-x4":
        extra = _adapters_inference(model, batch, steps, adapters=4)
    figures = profile_training_step(model, batch, steps=steps, warmup=warmup, forward=forward)
    with torch.no_grad():  # the floor: the frozen towers' forward alone
        floor = []
        for _ in range(max(1, steps)):
            _sync(dev)
            start = time.perf_counter()
            model.vision_tower({"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]})
            model.text_tower({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
            _sync(dev)
            floor.append(time.perf_counter() - start)
    lower_bound = head_time = head_time_no_dropout = None
    if variant == "m2ist":  # the spec's lower bound: frozen forward + side/head forward and backward, nothing else
        # (once: the cached and x4 rows share the uncached row's towers, side network and head)
        with torch.no_grad():
            vision = model.vision_tower.tap({"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]},
                                            model.vision_layers, model.tap_kinds)
            text = model.text_tower.tap({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                        model.text_layers, model.tap_kinds)
        def head_step(v_tokens: torch.Tensor, t_tokens: torch.Tensor) -> None:
            boxes, patch_logits = model.head(v_tokens, vision.mask, t_tokens, text.mask)
            rec_loss(boxes, batch["labels"], model.config, patch_logits)["loss"].backward()

        side_head, head_only, head_no_dropout = [], [], []
        for _ in range(max(1, steps)):
            _sync(dev)
            start = time.perf_counter()
            v_tokens, t_tokens = model.side(vision, text, model.intra_kind, model.inter_kind)
            head_step(v_tokens, t_tokens)
            _sync(dev)
            side_head.append(time.perf_counter() - start)
            v_tokens, t_tokens = v_tokens.detach(), t_tokens.detach()  # the head alone, on the same inputs
            for timings, with_dropout in ((head_only, True), (head_no_dropout, False)):
                model.head.train(with_dropout)
                _sync(dev)
                start = time.perf_counter()
                head_step(v_tokens, t_tokens)
                _sync(dev)
                timings.append(time.perf_counter() - start)
            model.head.train()
        lower_bound = statistics.median(floor) + statistics.median(side_head)
        head_time, head_time_no_dropout = statistics.median(head_only), statistics.median(head_no_dropout)
    trainable, total = model.get_nb_trainable_parameters()
    return {
        "method": variant,
        "tower_dtype": str(model.vision_tower.dtype).removeprefix("torch."),
        **extra,
        "trainable_params": trainable,
        "total_params": total,
        "parameter_counts": model.parameter_counts(),
        **figures,
        "floor_time_s": statistics.median(floor),
        "lower_bound_time_s": lower_bound,
        "head_time_s": head_time,
        "head_time_no_dropout_s": head_time_no_dropout,
    }


def _cached_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[Any, dict[str, Any]]:
    """A training forward that reads the towers' features from a filled tower cache (bfloat16, RAM): the keys
    of the batch are hashed (as the collator does) and the records read every step."""
    from m2ist.cache import KEY_FIELDS, TowerFeatureCache, cache_keys

    cache = TowerFeatureCache(model, None, "bfloat16", expected_images=batch["pixel_values"].shape[0],
                              expected_texts=batch["input_ids"].shape[0])
    cpu = {k: v.cpu() for k, v in batch.items()}

    def forward():
        keyed = {**cpu, **{name: cache_keys(cpu, modality) for modality, name in KEY_FIELDS.items()}}
        return model(labels=batch["labels"], tower_features=cache.features(keyed))

    with torch.no_grad():
        forward()  # fills the cache
    return forward, {"cache_bytes_per_image": cache.bytes_per_image,
                     "cache_bytes_per_expression": cache.bytes_per_expression}


def _adapters_inference(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int,
                        adapters: int) -> dict[str, Any]:
    """Inference time of one adapter, and of ``adapters`` adapters answering on one pass of the towers."""
    for index in range(1, adapters):
        model.add_adapter(f"adapter{index}", model.config)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    dev = batch["pixel_values"].device
    model.eval()
    timings: dict[str, list[float]] = {"one": [], "all": []}
    with torch.no_grad():
        for _ in range(max(1, steps) + 1):
            for key, run in (("one", lambda: model(**inputs)), ("all", lambda: model.forward_all_adapters(**inputs))):
                _sync(dev)
                start = time.perf_counter()
                run()
                _sync(dev)
                timings[key].append(time.perf_counter() - start)
    model.train()
    for index in range(1, adapters):
        model.delete_adapter(f"adapter{index}")
    one, every = statistics.median(timings["one"][1:]), statistics.median(timings["all"][1:])
    return {"adapters": adapters, "inference_time_s": one, "inference_all_time_s": every}


def _run_isolated(method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "m2ist.evidence.bench", "--one", method, "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    cmd += ["--tiny"] if args.tiny else []
    cmd += ["--backbone-dtype", args.backbone_dtype] if args.backbone_dtype else []
    done = run_child(cmd)
    if done.returncode:
        raise RuntimeError(f"bench of {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


#: What every report of ``m2ist bench`` holds: an existing ``--output`` file is replaced only if it has them.
REPORT_KEYS = ("device", "batch_size", "paper", "methods")
RATIO_KEYS = ("trainable_params", "saved_tensor_bytes", "exact_bytes", "peak_memory_bytes", "step_time_s")


def add_ratios(results: list[dict[str, Any]], keys: tuple[str, ...] = RATIO_KEYS) -> list[dict[str, Any]]:
    """Add, to each method, its trainable fraction and its ratio to full fine-tuning for each of ``keys``
    (when a 'full' row is present)."""
    full = next((r for r in results if r["method"] == "full"), None)
    for row in results:
        row["trainable_fraction"] = row["trainable_params"] / row["total_params"]
        row["side_fraction"] = row.get("parameter_counts", {}).get("side", 0) / row["total_params"]
        if full is not None:
            row["ratios_to_full"] = {key: row[key] / full[key] for key in keys}
            if "floor_time_s" in row:
                row["ratios_to_full"]["floor_time_s"] = row["floor_time_s"] / full["step_time_s"]
    return results


def parse_methods(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> list[str]:
    """The comma-separated methods of ``text``, or a usage error naming the known ones."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(methods) - set(known)
    if unknown or not methods:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(known)}")
    return methods


def describe_device(device: str) -> str:
    """The GPU's name, or the CPU and its torch thread count."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def floor_times(results: list[dict[str, Any]]) -> dict[str, float]:
    """The median floor (frozen towers' forward alone) of the rows whose towers run in each dtype: on a GPU with
    bfloat16, M²IST's rows run their towers in bfloat16 and the baselines in float32, and one median over all of
    them would be neither's floor."""
    by_dtype: dict[str, list[float]] = {}
    for row in results:
        by_dtype.setdefault(row.get("tower_dtype", "?"), []).append(row["floor_time_s"])
    return {dtype: statistics.median(times) for dtype, times in by_dtype.items()}


def format_table(results: list[dict[str, Any]]) -> str:
    """A markdown table of the figures and their ratios to full fine-tuning."""
    lines = ["| method | towers | trainable (M) | trainable % | side % | saved tensors (MiB) | exact bytes (MiB) | "
             "peak memory (MiB) | step (s) | memory vs full | peak vs full | time vs full |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r.get("ratios_to_full", {})
        if r["method"] == "m2ist-x4":
            continue  # an inference figure: reported below
        lines.append(
            f"| {LABELS.get(r['method'], r['method'])} | {r.get('tower_dtype', '?')} | {r['trainable_params'] / 1e6:.2f} | "
            f"{100 * r['trainable_fraction']:.2f} | "
            f"{100 * r['side_fraction']:.2f} | {r['saved_tensor_bytes'] / 2**20:.0f} | {r['exact_bytes'] / 2**20:.0f} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['step_time_s']:.3f} | {ratio.get('exact_bytes', float('nan')):.3f} | "
            f"{ratio.get('peak_memory_bytes', float('nan')):.3f} | {ratio.get('step_time_s', float('nan')):.3f} |")
    full = next((r for r in results if r["method"] == "full"), None)
    lines.append("")
    floors = floor_times(results)
    for dtype, floor in floors.items():  # towers of another dtype run at another speed: one floor per dtype
        towers = f", {dtype} towers" if len(floors) > 1 else ""
        lines.append(f"floor (frozen towers' forward alone{towers}): {floor:.3f} s"
                     + (f" = {floor / full['step_time_s']:.3f} of full fine-tuning's step" if full else ""))
    for r in results:
        if r.get("lower_bound_time_s"):
            lines.append(f"M²IST lower bound (towers' forward + side/head forward and backward): "
                         f"{r['lower_bound_time_s']:.3f} s; the M²IST step is {r['step_time_s'] / r['lower_bound_time_s']:.2f}× "
                         f"that and {r['step_time_s'] / r['floor_time_s']:.2f}× the floor")
        if r.get("head_time_s"):
            side = r["lower_bound_time_s"] - r["floor_time_s"] - r["head_time_s"]
            lines.append(f"  beyond the floor: the REC head (forward + backward, trained by every method) "
                         f"{r['head_time_s']:.3f} s = {r['head_time_s'] / r['floor_time_s']:.2f} of the floor "
                         f"({r['head_time_no_dropout_s']:.3f} s with its dropout off); the side network {side:.3f} s = "
                         f"{side / r['floor_time_s']:.2f} of the floor")
    for r in results:
        if r.get("cache_bytes_per_image"):
            lines.append(f"m2ist (cached): the tower cache stores {r['cache_bytes_per_image'] / 2**10:.0f} KiB per image and "
                         f"{r['cache_bytes_per_expression'] / 2**10:.1f} KiB per expression (bfloat16)")
        if r.get("inference_all_time_s"):
            lines.append(f"m2ist ×{r['adapters']} adapters: {r['adapters']} adapters answer on one pass of the towers in "
                         f"{r['inference_all_time_s']:.3f} s = {r['inference_all_time_s'] / r['inference_time_s']:.2f}× one "
                         f"adapter's inference ({r['inference_time_s']:.3f} s; {r['adapters']} separate passes: "
                         f"{r['adapters']}×)")
    lines.append(f"paper (M²IST vs full, RefCOCO, A100): side params {100 * PAPER['trainable']:.2f}%, memory "
                 f"{PAPER['memory']:.4f}, time {PAPER['time']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``m2ist bench``."""
    from m2ist.cli.flags import HelpFormatter, device_name, non_negative_int, positive_int, user_path
    from m2ist.cli.verbosity import add_verbosity_flag, apply_verbosity

    parser = argparse.ArgumentParser(prog="m2ist bench", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--methods", metavar="LIST", default=",".join(METHOD_ORDER),
                        help="comma-separated methods among full, adapter, lora, m2ist, m2ist-cached (M²IST on a filled "
                        "tower cache), m2ist-x4 (four adapters' inference on one tower pass) (default: all)")
    parser.add_argument("--batch-size", metavar="N", type=positive_int, default=2, help="images per step (default: 2)")
    parser.add_argument("--steps", metavar="N", type=positive_int, default=3,
                        help="timed steps per method (median reported)")
    parser.add_argument("--warmup", metavar="N", type=non_negative_int, default=1, help="untimed steps before timing")
    parser.add_argument("--device", metavar="DEVICE", type=device_name,
                        default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--backbone-dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="run M²IST's frozen towers in this dtype (side network and head stay float32); default: "
                        "as training does (tower_dtype='auto'): bfloat16 on a GPU that supports it, else float32")
    parser.add_argument("--tiny", action="store_true", help="tiny towers (a smoke test of the benchmark itself)")
    parser.add_argument("--output", metavar="FILE", type=user_path, help="write the results as JSON to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    add_verbosity_flag(parser)
    args = parser.parse_args(argv)
    apply_verbosity(args)
    if args.one:
        print(json.dumps(measure(args.one, args.batch_size, args.steps, args.warmup, args.device, args.tiny,
                                 args.backbone_dtype)))
        return 0
    methods = parse_methods(parser, args.methods, METHOD_ORDER)
    if args.output:  # before any method runs: the results must have somewhere to go
        check_outputs(args.output, REPORT_KEYS, "--output")
    results = []
    for method in methods:
        print(f"[bench] {method} ...", file=sys.stderr, flush=True)
        results.append(_run_isolated(method, args))
    add_ratios(results)
    device = describe_device(args.device)
    print(f"m2ist bench — {'tiny towers' if args.tiny else 'DETR-R50 + BERT-base, 640x640, L=20'}, batch "
          f"{args.batch_size}, device {device}, {date.today()}")
    print(format_table(results))
    if args.output:
        report = {"device": device, "date": str(date.today()), "batch_size": args.batch_size, "tiny": args.tiny,
                  "backbone_dtype": args.backbone_dtype, "paper": PAPER, "methods": results}
        write_json(args.output, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
