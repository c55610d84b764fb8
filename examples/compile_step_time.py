"""Graph breaks and step time of the side network + head under ``torch.compile``, with and without activation
checkpointing, on precomputed tower features (the towers are frozen and run outside the compiled region).

    python examples/compile_step_time.py            # tiny random towers (seconds)
    python examples/compile_step_time.py --demo     # the demo's towers (MiniLM + shapes ViT, cached by `m2ist demo`)

Prints one line per setting: graph count and breaks (``torch._dynamo.explain``), then the median and fastest time
of a training step (forward + backward + AdamW), eager and compiled steps alternating after a warm-up, on the CPU
with one thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from m2ist import M2ISTConfig, get_side_tuned_model  # noqa: E402


def towers(demo: bool):
    if demo:
        from m2ist.evidence.demo_towers import load_text_tower, load_vision_tower

        vision = load_vision_tower(progress=False)
        text, _ = load_text_tower()
        return vision, text, dict(image_size=vision.config.image_size, max_query_len=16)
    from tests.tiny import IMAGE_SIZE, QUERY_LEN, text_tower, vision_tower

    return vision_tower("vit"), text_tower("bert"), dict(image_size=IMAGE_SIZE, max_query_len=QUERY_LEN)


def features(model, batch: int):
    size, length = model.config.image_size, model.config.max_query_len
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        vision = model.vision_tower.tap({"pixel_values": torch.randn(batch, 3, size, size, generator=generator),
                                         "pixel_mask": torch.ones(batch, size, size, dtype=torch.long)},
                                        model.vision_layers, model.tap_kinds)
        text = model.text_tower.tap({"input_ids": torch.randint(5, 100, (batch, length), generator=generator),
                                     "attention_mask": torch.ones(batch, length, dtype=torch.long)},
                                    model.text_layers, model.tap_kinds)
    return vision, text, torch.rand(batch, 4, generator=generator) * 0.4 + 0.3


def measure(model, batch: int, steps: int) -> dict[str, float]:
    from m2ist.head import rec_loss

    vision, text, labels = features(model, batch)

    def step(v, t, y):
        vision_tokens, text_tokens = model.side(v, t, model.intra_kind, model.inter_kind)
        boxes, logits = model.head(vision_tokens, v.mask, text_tokens, t.mask)
        return rec_loss(boxes, y, model.config, logits)["loss"]

    model.train()
    explained = torch._dynamo.explain(step)(vision, text, labels)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    functions = {"eager": step, "compiled": torch.compile(step)}
    durations: dict[str, list[float]] = {name: [] for name in functions}
    for index in range(steps + 3):  # the first calls compile; eager and compiled steps alternate (same load)
        for name, function in functions.items():
            started = time.perf_counter()
            function(vision, text, labels).backward()
            optimizer.step()
            optimizer.zero_grad()
            if index >= 3:
                durations[name].append(time.perf_counter() - started)
    times = {name: 1000 * statistics.median(found) for name, found in durations.items()}
    fastest = {f"{name}_min": 1000 * min(found) for name, found in durations.items()}
    return {"graphs": explained.graph_count, "breaks": explained.graph_break_count, **times, **fastest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="the demo's towers instead of tiny random ones")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vision, text, sizes = towers(args.demo)
    head = dict(fusion_dim=256, fusion_heads=8, fusion_ffn_dim=512, bottleneck=64) if args.demo else \
        dict(fusion_dim=32, fusion_heads=2, fusion_ffn_dim=64, bottleneck=8)
    settings = {
        "TransVG head (6 fusion layers, [REG] MLP)": dict(fusion_layers=6),
        "demo head (vote readout, 2 hops)": dict(fusion_layers=0, fusion_norm="pre", reg_init="text",
                                                 box_readout="vote", vote_hops=2),
    }
    for label, values in settings.items():
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = get_side_tuned_model(vision, text, M2ISTConfig(**sizes, **head, **values))
            if checkpointing:
                model.gradient_checkpointing_enable()
            found = measure(model, args.batch_size, args.steps)
            print(f"{label}{', checkpointing' if checkpointing else ''}: {found['graphs']} graph(s), "
                  f"{found['breaks']} break(s); step (median / fastest of {args.steps}) {found['eager']:.1f} / "
                  f"{found['eager_min']:.1f} ms eager, {found['compiled']:.1f} / {found['compiled_min']:.1f} ms "
                  "compiled", flush=True)


if __name__ == "__main__":
    main()
