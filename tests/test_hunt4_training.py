"""Training semantics (round 4): runs that finish without an error must train what they say.

Gradient accumulation over batches of different sizes, the augmentation's draws when a processor serves several
runs, evaluation during training and the forms of ``EvalPrediction`` that ``RECMetrics`` reads."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from m2ist.data.collator import RECCollator
from m2ist.data.transforms import RECAugmentation
from m2ist.trainer import RECTrainer, train_rec, trainable_tensors
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.tiny import cpu_training_args

pytestmark = pytest.mark.usefixtures("one_thread")

NO_DROPOUT = dict(side_dropout=0.0, fusion_dropout=0.0)


def _assert_same_weights(a, b, atol: float = 0.0) -> None:
    expected = trainable_tensors(b)
    for name, value in trainable_tensors(a).items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=atol, msg=name)


def test_accumulated_batches_of_different_sizes_train_as_one_batch(tmp_path: Path) -> None:
    # 6 samples: one batch of 6, or a batch of 4 and one of 2 accumulated; the batch of 2 must not weigh as much
    # as the batch of 4 (each sample counts once in the mean either way)
    processor, data = make_processor(tmp_path / "tok"), make_dataset(6, seed=1)
    sgd = dict(optim="sgd", learning_rate=0.05, side_learning_rate=0.05, max_steps=1)
    whole = make_model(**NO_DROPOUT)
    train_rec(whole, processor, data, args=cpu_training_args(tmp_path / "whole", per_device_train_batch_size=8, **sgd))
    accumulated = make_model(**NO_DROPOUT)
    trainer = train_rec(accumulated, processor, data, args=cpu_training_args(
        tmp_path / "ga", per_device_train_batch_size=4, gradient_accumulation_steps=2, **sgd))
    _assert_same_weights(accumulated, whole, atol=1e-6)
    assert trainer.state.global_step == 1


def test_a_processor_reused_for_another_run_draws_that_runs_augmentations(tmp_path: Path) -> None:
    data = make_dataset(4, seed=1)

    def run(processor, name: str, seed: int):
        model = make_model(**NO_DROPOUT)
        train_rec(model, processor, data, args=cpu_training_args(tmp_path / name, max_steps=1, seed=seed))
        return model

    def augmenting(seed: int | None):
        processor = make_processor(tmp_path / "tok")
        processor.augment = RECAugmentation(seed=seed)
        return processor

    shared = augmenting(None)  # no seed of its own: each run gives it the training seed
    first, second = run(shared, "a", 0), run(shared, "b", 0)
    _assert_same_weights(second, first)  # not the continuation of the first run's draws
    _assert_same_weights(run(shared, "c", 1), run(augmenting(None), "d", 1))  # seed 1's augmentations, not seed 0's


def test_evaluating_during_training_does_not_change_the_trained_weights(tmp_path: Path) -> None:
    processor, data = make_processor(tmp_path / "tok"), make_dataset(8, seed=1)
    dropout = dict(side_dropout=0.1, fusion_dropout=0.1)
    quiet = make_model(**dropout)
    train_rec(quiet, processor, data, args=cpu_training_args(tmp_path / "quiet", max_steps=4))
    evaluated = make_model(**dropout)
    trainer = train_rec(evaluated, processor, data, {"val": make_dataset(4, seed=2)},
                        args=cpu_training_args(tmp_path / "eval", max_steps=4, eval_strategy="steps", eval_steps=1))
    assert sum("eval_val_acc@0.5" in entry for entry in trainer.state.log_history) == 4
    _assert_same_weights(evaluated, quiet)


@pytest.mark.parametrize("option", [dict(batch_eval_metrics=True), dict(eval_do_concat_batches=False)])
def test_rec_metrics_read_every_form_the_trainer_gives(tmp_path: Path, option: dict) -> None:
    processor, val = make_processor(tmp_path / "tok"), make_dataset(6, seed=2)
    model = make_model()

    def evaluate(**overrides) -> dict:
        args = cpu_training_args(tmp_path / "out", per_device_eval_batch_size=4, **overrides)
        return RECTrainer(model, args, data_collator=RECCollator(processor), eval_dataset={"val": val}).evaluate()

    reference, metrics = evaluate(), evaluate(**option)
    for name in ("eval_val_acc@0.5", "eval_val_miou", "eval_val_loss_box", "eval_val_loss_giou"):
        assert metrics[name] == pytest.approx(reference[name], rel=1e-6), name


def test_resuming_a_save_only_model_checkpoint_continues_the_schedule(tmp_path: Path, caplog) -> None:
    processor, data = make_processor(tmp_path / "tok"), make_dataset(8, seed=1)  # 2 steps per epoch
    lrs: dict[int, float] = {}

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            lrs[state.global_step] = optimizer.param_groups[0]["lr"]

    def args(steps: int):
        return cpu_training_args(tmp_path / "run", max_steps=steps, save_strategy="steps", save_steps=3,
                                 save_only_model=True, lr_drop_epochs=[2])

    train_rec(make_model(**NO_DROPOUT), processor, data, args=args(3))
    assert not (tmp_path / "run" / "checkpoint-3" / "scheduler.pt").exists()
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        train_rec(make_model(**NO_DROPOUT), processor, data, args=args(6), resume_from_checkpoint=True,
                  callbacks=[Record()])
    assert lrs == pytest.approx({3: 1e-3, 4: 1e-4, 5: 1e-4})  # the drop at epoch 2 (step 4), not 3 steps later
    assert "optimizer's moments start afresh" in caplog.text
