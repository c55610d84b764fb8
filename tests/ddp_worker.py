"""Toy REC data for the trainer tests, and the worker script of the 2-process DDP test.

As a script (``torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_DIR STEPS``) every rank trains the same tiny
M²IST model with a per-device batch of 2 and writes its side + head tensors to ``OUT_DIR/rank{rank}.safetensors``.
With ``eval:COUNT`` in place of ``STEPS`` every rank evaluates the untrained model on ``COUNT`` samples instead and
writes its metrics (``full``, and ``loss_only`` with ``prediction_loss_only``) to ``OUT_DIR/rank{rank}.json``.
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import BertTokenizer

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(REPO))

from m2ist.data.collator import RECCollator  # noqa: E402
from m2ist.data.dataset import RECDataset  # noqa: E402
from m2ist.data.sample import RECSample  # noqa: E402
from m2ist.model import get_side_tuned_model  # noqa: E402
from m2ist.processing import RECProcessor  # noqa: E402
from tests.tiny import IMAGE_SIZE, QUERY_LEN, text_tower, tiny_config, vision_tower  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "the", "square", "left", "right"]
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220)}
BACKGROUND = (128, 128, 128)


#: Optimisation shared by the 2-process run and its 1-process reference. Plain SGD: Adam divides by the gradient's
#: running RMS, which turns rounding noise in exactly-zero gradients (e.g. attention key biases) into full-size steps.
DDP_SETTINGS = dict(optim="sgd", learning_rate=0.05, side_learning_rate=0.05, seed=0, data_seed=0)


def make_tokenizer(folder: Path) -> BertTokenizer:
    """A BERT word-piece tokenizer over a ten-word vocabulary written to ``folder/vocab.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return BertTokenizer(str(vocab))


def make_processor(folder: Path) -> RECProcessor:
    """A processor for the tiny towers: 32-pixel canvas, 8 tokens, no augmentation."""
    return RECProcessor(make_tokenizer(folder), canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)


def make_dataset(count: int, seed: int, width: int = 40, height: int = 32) -> RECDataset:
    """Images with a red and a blue square on grey (one in each half, sides 10-15 px); the phrase names one."""
    rng = random.Random(seed)
    samples = []
    for index in range(count):
        image = Image.new("RGB", (width, height), BACKGROUND)
        draw = ImageDraw.Draw(image)
        colours = rng.sample(list(COLOURS), 2)
        boxes = {}
        for half, colour in enumerate(colours):
            side = rng.randint(10, 15)
            x0 = rng.randint(half * width // 2, (half + 1) * width // 2 - side)
            y0 = rng.randint(0, height - side)
            draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=COLOURS[colour])
            boxes[colour] = (x0, y0, x0 + side, y0 + side)
        target = rng.choice(colours)
        samples.append(RECSample(image=image, expression=f"the {target} square", box=boxes[target], image_id=index))
    return RECDataset(samples)


def make_model(seed: int = 0, **config):
    """The tiny ViT + BERT towers with an M²IST side network and head, built from ``seed``."""
    torch.manual_seed(seed)
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(**config))


def main(out_dir: str, steps: str) -> None:
    """Train on two ranks (per-device batch 2) and save each rank's trained tensors."""
    from safetensors.torch import save_file

    from m2ist.trainer import RECTrainingArguments, train_rec, trainable_tensors

    out = Path(out_dir)
    args = RECTrainingArguments(output_dir=str(out / "run"), use_cpu=True, max_steps=int(steps),
                                per_device_train_batch_size=2, save_strategy="no", logging_steps=1, report_to="none",
                                disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo", **DDP_SETTINGS)
    model = make_model(fusion_dropout=0.0)
    # one tokenizer folder per rank: two ranks rewriting one vocab.txt can hand a reader a half-written file
    processor = make_processor(out / f"tokenizer-rank{os.environ.get('RANK', '0')}")
    trainer = train_rec(model, processor, make_dataset(16, seed=1), args=args)
    rank = trainer.args.process_index
    assert trainer.args.world_size == 2, trainer.args.world_size
    assert not model.vision_model.training and not model.text_model.training
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    assert trainer.model_wrapped.find_unused_parameters is False  # every side and head parameter is used
    save_file({k: v.detach().contiguous() for k, v in trainable_tensors(model).items()},
              str(out / f"rank{rank}.safetensors"))
    torch.distributed.barrier()
    # Let gloo's worker thread free the barrier's work first: it needs the GIL for that, and tearing the process
    # group down (DDP's reducer is freed under the GIL, ~ProcessGroupGloo joins that thread) while it waits
    # deadlocked about one run in twenty (pytorch/pytorch#56297).
    time.sleep(0.2)
    trainer.end()


def evaluate_main(out_dir: str, count: str) -> None:
    """Evaluate the untrained tiny model on ``count`` samples on two ranks (per-device batch 2), with all metrics
    and with ``prediction_loss_only``, and write each rank's metrics to ``OUT_DIR/rank{rank}.json``."""
    import json

    from m2ist.trainer import RECTrainer, RECTrainingArguments

    out = Path(out_dir)
    args = RECTrainingArguments(output_dir=str(out / "run"), use_cpu=True, per_device_eval_batch_size=2,
                                report_to="none", disable_tqdm=True, dataloader_num_workers=0, ddp_backend="gloo")
    processor = make_processor(out / f"tokenizer-rank{os.environ.get('RANK', '0')}")
    trainer = RECTrainer(make_model(fusion_dropout=0.0), args, data_collator=RECCollator(processor),
                         eval_dataset=make_dataset(int(count), seed=3))
    assert trainer.args.world_size == 2, trainer.args.world_size
    metrics = {"full": trainer.evaluate()}
    trainer.args.prediction_loss_only = True
    metrics["loss_only"] = trainer.evaluate()
    (out / f"rank{trainer.args.process_index}.json").write_text(json.dumps(metrics), encoding="utf-8")
    torch.distributed.barrier()
    time.sleep(0.2)  # as in main()
    trainer.end()


if __name__ == "__main__":
    # ``torchrun ... ddp_worker.py OUT_DIR STEPS`` trains; ``torchrun ... ddp_worker.py OUT_DIR eval:COUNT`` evaluates
    if sys.argv[2].startswith("eval:"):
        evaluate_main(sys.argv[1], sys.argv[2].removeprefix("eval:"))
    else:
        main(*sys.argv[1:3])
