"""An interrupted run resumes to the uninterrupted run's weights, bit for bit on a CPU (float32), in the
configurations users train with: with and without the tower cache (memory, disk), with a training augmentation,
with the cache's fixed views of augmented images, with gradient accumulation, checkpoints mid-epoch and at an
epoch's end (``dataloader_num_workers=0``; with workers a resume says that the augmentation draws will differ)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_worker import make_dataset, make_model, make_processor
from tiny import cpu_training_args
from transformers import TrainerCallback

from m2ist.data.transforms import RECAugmentation
from m2ist.trainer import train_rec

#: 10 items in batches of 4: 3 batches (the last of 2) per epoch
ITEMS = 10
CACHE = dict(tower_cache="memory", tower_cache_dtype="float32")  # float32: the uncached run's weights
VIEWS = dict(CACHE, tower_cache_views=3)


class _StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` (the checkpoint of that step is written first)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def _processor(folder: Path, augment: bool):
    """A fresh processor (as a new process would build), with TransVG's augmentation when ``augment``."""
    processor = make_processor(folder)
    if augment:
        processor.augment = RECAugmentation()  # no seed of its own: it follows the training seed
    return processor


def _trained(tmp_path: Path, name: str, augment: bool, steps: int, cut: int | None = None,
             resume: bool = False, **settings: Any) -> dict[str, torch.Tensor]:
    """Train a fresh model ``steps`` steps into ``tmp_path/name`` (stopping after ``cut``, or resuming from the
    checkpoint of step ``cut``) and return its trained tensors."""
    model = make_model(side_dropout=0.1)  # dropout (0.1 in the fusion too): torch's random state must follow
    if resume:  # the side and head must all come from the checkpoint
        with torch.no_grad():
            for tensor in model.trainable_state_dict().values():
                tensor.add_(1.0)
    saves = dict(save_strategy="steps", save_steps=cut) if cut is not None else {}
    args = cpu_training_args(tmp_path / name, max_steps=steps, **saves, **settings)
    trainer = train_rec(model, _processor(tmp_path / "tokenizer", augment), make_dataset(ITEMS, seed=1), args=args,
                        callbacks=[_StopAt(cut)] if cut is not None and not resume else None,
                        resume_from_checkpoint=str(tmp_path / name / f"checkpoint-{cut}") if resume else None)
    assert trainer.state.global_step == (cut if cut is not None and not resume else steps)
    return {key: value.detach().clone() for key, value in model.trainable_state_dict().items()}


def _assert_resume_exact(tmp_path: Path, augment: bool, steps: int, cut: int, **settings: Any) -> None:
    straight = _trained(tmp_path, "straight", augment, steps, **settings)
    _trained(tmp_path, "cut", augment, steps, cut, **settings)
    resumed = _trained(tmp_path, "cut", augment, steps, cut, resume=True, **settings)
    differ = [key for key in straight if not torch.equal(straight[key], resumed[key])]
    assert not differ, f"the resumed run's weights differ from the uninterrupted run's: {differ[:5]}"


@pytest.mark.parametrize(("augment", "steps", "cut", "settings"), [
    (False, 5, 2, {}),  # mid-epoch
    (False, 5, 3, {}),  # at the end of epoch 1
    (False, 4, 1, dict(gradient_accumulation_steps=2)),  # 2 updates per epoch, the second of one batch
    (False, 5, 2, CACHE),
    (False, 5, 3, dict(CACHE, tower_cache="disk")),
    (True, 5, 2, {}),
    (True, 5, 3, {}),
    (True, 6, 4, {}),  # mid-way through the second epoch
    (True, 4, 1, dict(gradient_accumulation_steps=2)),
    (True, 4, 2, dict(gradient_accumulation_steps=2)),  # at an epoch's end, after the one-batch update
    (True, 5, 2, VIEWS),
    (True, 5, 3, dict(VIEWS, tower_cache="disk")),
    (True, 4, 1, dict(VIEWS, gradient_accumulation_steps=2)),
], ids=["plain-mid-epoch", "plain-epoch-end", "plain-accumulation", "memory-cache", "disk-cache-epoch-end",
        "augmented-mid-epoch", "augmented-epoch-end", "augmented-second-epoch", "augmented-accumulation",
        "augmented-accumulation-epoch-end", "cached-views-mid-epoch", "cached-views-disk-epoch-end",
        "cached-views-accumulation"])
def test_a_resumed_run_trains_the_uninterrupted_runs_weights(tmp_path, augment, steps, cut, settings):
    """Augmented runs resumed with other augmentation draws (the augmentation's generator ran on from the run's
    start), and with cached views the first batches after a mid-epoch resume picked other views (torch's state,
    restored by the Trainer only after it built them): both now draw per batch, from the batch's number in the run."""
    _assert_resume_exact(tmp_path, augment, steps, cut, **settings)


def test_numbered_draws_still_vary_from_batch_to_batch(tmp_path):
    """Drawing each batch's augmentation from the batch's number keeps augmenting: the same items batched twice
    (batches 0 and 1, as in two epochs) get other augmentations, and batch 0 again gets batch 0's."""
    from m2ist.data.collator import RECCollator
    from m2ist.trainer import _NumberedBatches

    processor = _processor(tmp_path / "tokenizer", augment=True)
    processor.augment.reseed(0)
    numbered = _NumberedBatches(RECCollator(processor, train=True), processor.augment, seed=0)
    items = [make_dataset(4, seed=1)[i] for i in range(4)]
    first, second = numbered(items)["pixel_values"], numbered(items)["pixel_values"]
    assert not torch.equal(first, second)
    numbered.next_batch = 0
    assert torch.equal(numbered(items)["pixel_values"], first)


def test_a_mid_epoch_resume_with_dataloader_workers_says_the_augmentation_draws_differ(tmp_path, caplog):
    """Workers draw from generators the loader seeds at each epoch's start, which a resume mid-epoch cannot put
    back (the weights differ): said, not silent. Without workers, or at an epoch's end, the resume is exact."""
    _trained(tmp_path, "cut", True, 4, save_strategy="steps", save_steps=1)  # checkpoints 1 to 4
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        _trained(tmp_path, "cut", True, 2, 1, resume=True, dataloader_num_workers=1)
    assert "Resuming mid-epoch (step 1) with dataloader_num_workers=1: the training augmentation's draws after the " \
           "resume differ" in caplog.text
    for cut, workers in ((1, 0), (3, 1)):  # no workers; an epoch's end (3 steps)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
            _trained(tmp_path, "cut", True, 4, cut, resume=True, dataloader_num_workers=workers)
        assert "dataloader_num_workers" not in caplog.text
