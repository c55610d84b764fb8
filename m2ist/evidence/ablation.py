"""`python -m m2ist.evidence.ablation`: which parts of the demo's head make it learn in a CPU budget.

Every variant trains only a REC head, from the same seed, on the same frozen features: the demo's towers and an
untrained M³ISA side network encode the procedural benchmark once, then each head trains for 600 steps × 32 on
the mixed training split of 2,500 scenes (the demo's schedule and data until 2026-11-30) and is scored (Acc@0.5)
on every test split. The variants add the vote readout's parts one at a time, from TransVG's head to the demo's
(``DEMO_HEAD``). The table is the evidence behind ``docs/differences.md`` (item 9).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any

import torch

from m2ist.config import check_flags

from .demo import DEMO_HEAD, DEMO_SIZES
from .outputs import check_counts, seed_value

_VOTE = dict(fusion_layers=0, fusion_norm="pre", reg_init="text", box_readout="vote", vote_hops=1,
             position_init="random")
VARIANTS: dict[str, dict[str, Any]] = {
    "TransVG (3 fusion layers, [REG] MLP)": dict(fusion_layers=3, fusion_norm="post", reg_init="learned",
                                                 box_readout="reg", position_init="random"),
    "vote readout, every patch votes, no point loss": dict(_VOTE, vote_window=None, point_loss_weight=0.0),
    "+ point loss": dict(_VOTE, vote_window=None, point_loss_weight=1.0),
    "+ votes within one cell of the peak": dict(_VOTE, vote_window=1, point_loss_weight=1.0),
    "+ a second hop": dict(_VOTE, vote_hops=2),
    "+ sine-cosine visual positions": dict(_VOTE, vote_hops=2, position_init="sincos"),
    "+ one fusion layer (DEMO_HEAD)": dict(DEMO_HEAD),
}
"""Head options of each variant, applied on top of the demo's config."""
ABLATION_STEPS = 600
ABLATION_SIZES = {**DEMO_SIZES, "train": 2500}
"""The ablation's schedule and data: those of ``docs/differences.md``'s table."""


@torch.no_grad()
def encode_splits(model, processor, splits: dict[str, list], batch_size: int = 128) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{split: (vision_tokens, vision_mask, text_tokens, text_mask, labels)}`` from the model's frozen encoder."""
    from m2ist.data.collator import RECCollator

    collate = RECCollator(processor)
    out = {}
    for name, samples in splits.items():
        parts = []
        for start in range(0, len(samples), batch_size):
            batch = collate([{"image": s.image, "expression": s.expression, "box": s.box}
                             for s in samples[start:start + batch_size]])
            encoded = model.encode(batch["pixel_values"], batch.get("pixel_mask"), batch["input_ids"],
                                   batch["attention_mask"])
            parts.append((*encoded, batch["labels"]))
        out[name] = tuple(torch.cat(column) for column in zip(*parts))
    return out


def train_head(head, features: tuple[torch.Tensor, ...], config, *, steps: int, batch_size: int, seed: int,
               learning_rate: float = 1e-3) -> float:
    """AdamW with the demo's schedule (5% warm-up, cosine); returns the last step's loss."""
    from m2ist.head import rec_loss

    check_counts("ablation", steps=steps, batch_size=batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    head.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        index = torch.randint(0, len(features[-1]), (batch_size,), generator=generator)
        vision, vision_mask, text, text_mask, labels = (x[index] for x in features)
        pred_boxes, patch_logits = head(vision, vision_mask, text, text_mask)
        loss = rec_loss(pred_boxes, labels, config, patch_logits)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return float(loss.detach())


@torch.no_grad()
def accuracy(head, features: tuple[torch.Tensor, ...]) -> float:
    """Acc@0.5 of ``head`` on encoded features (square canvas, no letterbox: IoU on the canvas)."""
    from m2ist.evaluation import accuracy_at_iou
    from m2ist.ops.boxes import box_convert

    head.eval()
    vision, vision_mask, text, text_mask, labels = features
    pred_boxes = head(vision, vision_mask, text, text_mask).pred_boxes
    return accuracy_at_iou(box_convert(pred_boxes, "cxcywh", "xyxy"), box_convert(labels, "cxcywh", "xyxy"),
                           check_frames=False)[0.5]  # both normalised: a young head's boxes may reach past 2


def run(*, steps: int = ABLATION_STEPS, batch_size: int = 32, seed: int = 0, tiny: bool = False,
        cache_dir: str | None = None, variants: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Train every variant's head on the same frozen features; return one row per variant."""
    from m2ist.head import RECHead
    from m2ist.model import get_side_tuned_model

    from .demo import prepare

    check_counts("ablation", steps=steps, batch_size=batch_size)  # before the benchmark is drawn and encoded
    check_flags("ablation.run", tiny=tiny)
    torch.manual_seed(seed)
    setup = prepare(tiny=tiny, cache_dir=cache_dir, seed=seed, progress=False, sizes=None if tiny else ABLATION_SIZES)
    model = get_side_tuned_model(*setup.make_towers(), setup.config).eval()
    grid, prefix = model.head.box_votes.grid, model.head.box_votes.num_prefix_tokens
    features = encode_splits(model, setup.processor, {k: v for k, v in setup.splits.items() if k != "val"})
    train = features.pop("train")
    vision_width, num_tokens, text_width = train[0].shape[-1], train[0].shape[1], train[2].shape[-1]
    rows = []
    for name, options in (variants or VARIANTS).items():
        print(f"[ablation] {name} ...", file=sys.stderr, flush=True)
        config = dataclasses.replace(setup.config, **options)
        torch.manual_seed(seed)
        head = RECHead(config, vision_width, text_width, num_tokens, vision_grid=grid, num_prefix_tokens=prefix)
        start = time.perf_counter()
        loss = train_head(head, train, config, steps=steps, batch_size=batch_size, seed=seed)
        rows.append({"variant": name, "options": options, "train_seconds": time.perf_counter() - start,
                     "final_loss": loss, "acc@0.5": {split: accuracy(head, f) for split, f in features.items()}})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: Acc@0.5 (%) per test split for each variant."""
    splits = list(rows[0]["acc@0.5"])
    lines = ["| head | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for row in rows:
        lines.append(f"| {row['variant']} | " + " | ".join(f"{100 * row['acc@0.5'][s]:.1f}" for s in splits) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m m2ist.evidence.ablation``."""
    from m2ist.cli.flags import positive_int, user_path

    parser = argparse.ArgumentParser(prog="python -m m2ist.evidence.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=ABLATION_STEPS,
                        help=f"head training steps (default: {ABLATION_STEPS})")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="training batch size (default: 32)")
    parser.add_argument("--seed", type=seed_value, default=0, help="seed of the data, the encoder and every head")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run with tiny settings")
    parser.add_argument("--cache-dir", type=user_path, default=None, help="cache of the pretrained shapes ViT")
    args = parser.parse_args(argv)
    rows = run(steps=args.steps, batch_size=args.batch_size, seed=args.seed, tiny=args.tiny, cache_dir=args.cache_dir)
    print(f"head ablation on frozen features — {args.steps} steps × {args.batch_size}, seed {args.seed}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
