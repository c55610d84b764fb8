"""Hostile and careless training settings, round 2: the best-checkpoint metric (its direction, names the evaluation
does not report), empty evaluation sets, ``dataloader_drop_last`` in evaluation and prediction, and resuming with
optimizer settings that the checkpoint's optimizer and scheduler states would silently override."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from m2ist.data.collator import RECCollator
from m2ist.trainer import RECTrainer, RECTrainingArguments, checkpoint_problems, train_rec
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.tiny import cpu_training_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(processor, output: Path, eval_dataset=None, compute_metrics=None, **args) -> RECTrainer:
    return RECTrainer(model=make_model(), args=cpu_training_args(output, **args),
                      data_collator=RECCollator(processor, train=True), eval_data_collator=RECCollator(processor),
                      train_dataset=make_dataset(4, seed=1), eval_dataset=eval_dataset, processing_class=processor,
                      compute_metrics=compute_metrics)


# ============================================================================================== the best metric
def test_a_loss_metric_for_best_model_keeps_the_lowest(tmp_path):
    # transformers guesses the direction from a name ending in "loss": loss_giou / loss_box kept the *highest*
    for metric in ("loss_giou", "eval_loss_box", "val_loss_giou", "loss"):
        assert RECTrainingArguments(output_dir=str(tmp_path), metric_for_best_model=metric).greater_is_better is False
    assert RECTrainingArguments(output_dir=str(tmp_path), metric_for_best_model="miou").greater_is_better is True
    explicit = RECTrainingArguments(output_dir=str(tmp_path), metric_for_best_model="loss_giou", greater_is_better=True)
    assert explicit.greater_is_better is True  # an explicit choice is kept


def test_a_metric_the_evaluation_does_not_report_is_refused_before_training(processor, tmp_path):
    val = make_dataset(2, seed=2)
    during = dict(eval_strategy="steps", eval_steps=1)
    with pytest.raises(ValueError, match=r"metric_for_best_model='accuracy' is not a metric .* 'acc@0.5', 'miou'"):
        _trainer(processor, tmp_path, val, metric_for_best_model="accuracy", **during)
    with pytest.raises(ValueError, match=r"'testA_acc@0.5' is not a metric .*'val_acc@0.5'.* sets \['val'\]"):
        _trainer(processor, tmp_path, {"val": val}, metric_for_best_model="testA_acc@0.5", **during)
    with pytest.raises(ValueError, match=r"prediction_loss_only=True reports only the loss\): choose one of \['loss'\]"):
        _trainer(processor, tmp_path, val, prediction_loss_only=True, **during)  # the default metric, acc@0.5
    # what the evaluation does report is accepted (a bare name refers to the first set); a custom
    # compute_metrics is taken at its word; without an evaluation during training nothing is looked up
    assert _trainer(processor, tmp_path, {"val": val, "testA": val}, metric_for_best_model="testA_miou",
                    **during).args.metric_for_best_model == "testA_miou"
    assert _trainer(processor, tmp_path, {"val": val}, metric_for_best_model="eval_miou",
                    **during).args.metric_for_best_model == "val_miou"
    assert _trainer(processor, tmp_path, val, metric_for_best_model="f1", compute_metrics=lambda p: {"f1": 1.0},
                    **during).args.metric_for_best_model == "f1"
    _trainer(processor, tmp_path, val, prediction_loss_only=True)


@pytest.mark.parametrize("option, needle", [
    (dict(label_smoothing_factor=0.1), "label_smoothing_factor=0.1 smooths classification logits"),  # KeyError 'logits'
    (dict(neftune_noise_alpha=5.0), "neftune_noise_alpha=5.0 adds noise"),  # AttributeError get_input_embeddings
    (dict(train_sampling_strategy="group_by_length"), "groups items by token count"),  # "'pixel_values' key"
])
def test_options_for_classifiers_or_language_models_are_refused_at_once(tmp_path, option, needle):
    with pytest.raises(ValueError, match=needle):
        RECTrainingArguments(output_dir=str(tmp_path), **option)


# ============================================================================================== evaluation sets
def test_an_empty_evaluation_set_is_refused_naming_it(processor, tmp_path):
    val = make_dataset(2, seed=2)
    with pytest.raises(ValueError, match=r"evaluation set 'testA' is empty"):
        _trainer(processor, tmp_path, {"val": val, "testA": []})  # was scored silently: no testA results at all
    trainer = _trainer(processor, tmp_path, {"val": val})
    trainer.eval_dataset = {"val": val, "testB": []}
    with pytest.raises(ValueError, match=r"evaluation set 'testB' is empty"):
        trainer.train()
    with pytest.raises(ValueError, match=r"evaluation set 'testB' is empty"):
        trainer.evaluate()
    with pytest.raises(ValueError, match=r"evaluation set 'test' is empty"):
        trainer.predict([])


def test_evaluation_and_prediction_score_every_sample_with_drop_last(processor, tmp_path):
    val = make_dataset(7, seed=2)  # one full batch of 4 and a partial one of 3
    kept = _trainer(processor, tmp_path, val, per_device_eval_batch_size=4)
    dropping = _trainer(processor, tmp_path, val, per_device_eval_batch_size=4, dataloader_drop_last=True)
    boxes = dropping.predict(val).predictions[0]
    assert len(boxes) == 7 and np.array_equal(boxes, kept.predict(val).predictions[0])
    assert dropping.evaluate()["eval_miou"] == kept.evaluate()["eval_miou"]
    assert dropping.args.dataloader_drop_last is True  # training still drops


# ============================================================================================== resuming
@pytest.fixture(scope="module")
def checkpoints(processor, tmp_path_factory) -> Path:
    """A run of 2 steps with a checkpoint after each."""
    output = tmp_path_factory.mktemp("resume") / "run"
    train_rec(make_model(), processor, make_dataset(8, seed=1),
              args=cpu_training_args(output, max_steps=2, save_strategy="steps", save_steps=1))
    return output


def _resume(processor, run: Path, **changes):
    args = cpu_training_args(run, max_steps=3, save_strategy="no", **changes)
    return train_rec(make_model(), processor, make_dataset(8, seed=1), args=args, resume_from_checkpoint=True)


def test_resume_refuses_optimizer_settings_the_checkpoint_would_override(processor, checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(checkpoints, run)
    for change, needle in (({"adam_beta2": 0.5}, "adam_beta2: checkpoint 0.999, now 0.5"),
                           ({"adam_epsilon": 1e-3}, "adam_epsilon: checkpoint 1e-08, now 0.001"),
                           ({"warmup_steps": 10}, "warmup_steps: checkpoint 0, now 10"),
                           ({"optim": "sgd"}, "optim: checkpoint 'adamw_torch"),
                           ({"dataloader_drop_last": True}, "dataloader_drop_last: checkpoint False, now True")):
        with pytest.raises(ValueError, match="was written by another run") as caught:
            _resume(processor, run, **change)
        assert needle in str(caught.value)
    # even when changes are allowed: the optimizer and scheduler states would restore the old values (or, for
    # another optimizer, fail with a KeyError deep in torch)
    for change, name in (({"adam_beta2": 0.5}, "adam_beta2"), ({"optim": "sgd"}, "optim"),
                         ({"warmup_steps": 10}, "warmup_steps")):
        with pytest.raises(ValueError, match=f"cannot resume with another {name}, even with resume_allow_changes"):
            _resume(processor, run, resume_allow_changes=True, **change)


def test_a_damaged_rng_state_makes_a_checkpoint_incomplete(checkpoints, tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoints / "checkpoint-2", checkpoint)
    assert checkpoint_problems(checkpoint) == ""
    rng = checkpoint / "rng_state.pth"
    rng.write_bytes(rng.read_bytes()[:50])  # was a torch "PytorchStreamReader failed" traceback mid-resume
    assert checkpoint_problems(checkpoint) == "rng_state.pth truncated or damaged"


def test_an_output_dir_the_final_save_would_refuse_is_refused_before_training(tmp_path, monkeypatch):
    """A folder holding another model, or a mount point (a Docker volume root), cannot take the final save
    (see save_folder_problem): that is said when the trainer is built, not after the training steps."""
    import os

    model = make_model(seed=0)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Cannot train into output_dir=.*bert.*holds another model \(model\.safetensors\)"):
        RECTrainer(model, cpu_training_args(other, max_steps=1))
    volume = tmp_path / "volume"
    volume.mkdir()
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path) == str(volume) or real(path))
    with pytest.raises(ValueError, match=r"Cannot train into output_dir=.*volume.*mount point"):
        RECTrainer(model, cpu_training_args(volume, max_steps=1))
    RECTrainer(model, cpu_training_args(tmp_path / "fresh", max_steps=1))  # a new or own folder is fine


@pytest.mark.parametrize("name", ["learning_rate", "side_learning_rate", "weight_decay"])
def test_negative_rates_are_refused_naming_the_field(tmp_path, name):
    with pytest.raises(ValueError, match=f"^{name} must be >= 0, got -0.001"):
        cpu_training_args(tmp_path, **{name: -1e-3})


def test_tower_cache_modes_and_seeds_are_checked_where_the_arguments_are_built(tmp_path):
    """``RECTrainingArguments`` refuses what ``m2ist demo`` refuses: a mode-like tower_cache that would become a
    folder, and a seed numpy cannot take (which failed only once the towers were loaded)."""
    with pytest.raises(ValueError, match=r"tower_cache='Memory' is not one of .* write 'memory'"):
        cpu_training_args(tmp_path, tower_cache="Memory")
    for seeds in ({"seed": -1}, {"seed": 2**32}, {"data_seed": 2**32}):
        with pytest.raises(ValueError, match=r"a seed must be 0 to 2\*\*32 - 1"):
            cpu_training_args(tmp_path, **seeds)
    assert cpu_training_args(tmp_path, seed=2**32 - 1, tower_cache="./none").tower_cache == "./none"


def test_views_without_an_augmentation_size_the_cache_for_one_view(tmp_path, caplog):
    """tower_cache_views only counts where an augmentation draws views: the cache's size estimate (and its space
    check) is then for one view per image, with a warning that the setting has no effect."""
    import logging

    model, processor = make_model(seed=0), make_processor(tmp_path / "tok")
    args = cpu_training_args(tmp_path / "run", max_steps=1, tower_cache="memory", tower_cache_views=8)
    data = make_dataset(4, seed=1)
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        trainer = RECTrainer(model, args, data_collator=RECCollator(processor), train_dataset=data)
        trainer._open_tower_cache()
    assert "tower_cache_views=8 has no effect" in caplog.text
    from m2ist.cache import expected_records

    images = expected_records(data, 1)[0]
    assert images > 0 and trainer.tower_cache.estimate["vision"] == images * trainer.tower_cache.bytes_per_image


def test_a_schedule_that_cannot_happen_in_the_run_is_said(tmp_path, caplog):
    """A warm-up as long as the run (the learning rate never reaches its value) and a drop epoch after the last
    step (never applied) are what was asked for, but rarely what was meant: each gets a warning."""
    import logging

    model, processor = make_model(seed=0), make_processor(tmp_path / "tok")
    args = cpu_training_args(tmp_path / "run", max_steps=2, warmup_steps=5, lr_drop_epochs=[60])
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        train_rec(model, processor, make_dataset(8, seed=1), args=args)
    assert "The warm-up (5 steps) is as long as the run (2 steps)" in caplog.text
    assert "lr_drop_epochs [60] fall after the run's last step" in caplog.text


def test_predict_boxes_refuses_a_boolean_batch_size(tmp_path):
    from m2ist.inference import predict_boxes

    with pytest.raises(ValueError, match="batch_size must be a positive integer, got True"):
        predict_boxes(make_model(seed=0), [np.zeros((8, 8, 3), np.uint8)], ["a"], processor=make_processor(tmp_path),
                      batch_size=True)
