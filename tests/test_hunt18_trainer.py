"""RECTrainer with TrainingArguments combinations a transformers / PEFT user tries (fault hunt 18): a
``compute_metrics`` of their own with m2ist's default best metric, the collators left out, a compiled model, counts
of 0, ``lr_scheduler_kwargs`` with the step schedule, and optimizers that build their own parameter groups."""

from __future__ import annotations

import logging

import pytest
import torch

from m2ist.data.collator import RECCollator
from m2ist.data.transforms import RECAugmentation
from m2ist.trainer import RECTrainer, RECTrainingArguments
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.tiny import cpu_training_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(processor, output, eval_dataset=None, *, collators=True, **kwargs) -> RECTrainer:
    args = {key: kwargs.pop(key) for key in list(kwargs) if key in RECTrainingArguments.__dataclass_fields__}
    if collators:
        kwargs.setdefault("data_collator", RECCollator(processor, train=True))
        kwargs.setdefault("eval_data_collator", RECCollator(processor))
    return RECTrainer(model=make_model(), args=cpu_training_args(output, **args), train_dataset=make_dataset(8, seed=1),
                      eval_dataset=eval_dataset, processing_class=processor, **kwargs)


def test_own_compute_metrics_without_the_default_best_metric_trains_on(processor, tmp_path, caplog):
    """RECTrainingArguments defaults metric_for_best_model to 'acc@0.5' (transformers: None): a compute_metrics of
    the user's that reports other names crashed the run with a KeyError at the first evaluation, mid-training, although
    nothing asked for the best checkpoint."""
    val = make_dataset(4, seed=2)
    trainer = _trainer(processor, tmp_path / "a", val, compute_metrics=lambda p: {"iou": 0.5}, max_steps=2,
                       eval_strategy="steps", eval_steps=1)
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        trainer.train()
    assert trainer.state.global_step == 2 and trainer.state.best_metric is None
    assert sum("the best checkpoint is not tracked" in r.message for r in caplog.records) == 1  # said once
    # what needs the best metric still stops, naming the metrics reported and the setting to change
    trainer = _trainer(processor, tmp_path / "b", val, compute_metrics=lambda p: {"iou": 0.5}, max_steps=2,
                       eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1,
                       load_best_model_at_end=True)
    with pytest.raises(ValueError, match=r"'acc@0.5' is not among .*\['iou', 'loss'\].* load_best_model_at_end need"):
        trainer.train()


def test_evaluation_without_an_eval_collator_does_not_augment(tmp_path):
    """With only data_collator=RECCollator(processor, train=True), evaluation used it: two evaluations of the same
    weights gave other metrics (randomly augmented images) and the best checkpoint was picked on noise."""
    augmenting = make_processor(tmp_path / "tok")._with(augment=RECAugmentation(seed=0))
    trainer = RECTrainer(model=make_model(), args=cpu_training_args(tmp_path / "run", max_steps=1),
                         data_collator=RECCollator(augmenting, train=True), train_dataset=make_dataset(8, seed=1),
                         eval_dataset=make_dataset(8, seed=2), processing_class=augmenting)
    assert isinstance(trainer.eval_data_collator, RECCollator) and not trainer.eval_data_collator.train
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"] and first["eval_miou"] == second["eval_miou"]


def test_a_rec_processor_without_collators_trains(processor, tmp_path):
    """processing_class=RECProcessor without data_collator failed at the first batch inside transformers'
    default_data_collator ("Could not infer dtype of Image")."""
    trainer = _trainer(processor, tmp_path, make_dataset(4, seed=2), collators=False, max_steps=1)
    assert trainer.data_collator.train and not trainer.eval_data_collator.train
    trainer.train()
    assert trainer.state.global_step == 1 and "eval_acc@0.5" in trainer.evaluate()


def test_a_compiled_model_is_refused_saying_what_to_pass(tmp_path):
    """torch.compile(model) was refused with "use transformers.Trainer for other models"."""
    with pytest.raises(TypeError, match=r"OptimizedModule around a SideTunedModel: pass the model itself and set "
                                        r"torch_compile=True"):
        RECTrainer(model=torch.compile(make_model()), args=cpu_training_args(tmp_path, max_steps=1))


@pytest.mark.parametrize("option, needle", [
    (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps must be a whole number >= 1"),  # ZeroDivision
    (dict(per_device_train_batch_size=0), "per_device_train_batch_size must be a whole number >= 1"),
    (dict(per_device_eval_batch_size=0), "per_device_eval_batch_size must be a whole number >= 1"),  # at 1st eval
    (dict(save_strategy="steps", save_steps=0), "saves no checkpoint before the end of training"),  # saved at end only
    (dict(lr_scheduler_kwargs={"min_lr": 1e-6}), r"lr_scheduler_kwargs=\{'min_lr': 1e-06\} would be ignored"),
])
def test_counts_that_fail_mid_run_or_do_less_than_asked_are_refused_at_once(tmp_path, option, needle):
    with pytest.raises(ValueError, match=needle):
        RECTrainingArguments(output_dir=str(tmp_path), **option)
    # what these settings are for is accepted
    RECTrainingArguments(output_dir=str(tmp_path), save_strategy="steps", save_steps=0.5)
    RECTrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="cosine_with_min_lr",
                         lr_scheduler_kwargs={"min_lr": 1e-6})


@pytest.mark.parametrize("key", ["params", "model", "optimizer_dict"])
def test_an_optimizer_that_brings_its_own_parameter_groups_is_refused(processor, tmp_path, monkeypatch, key):
    """GaLore / APOLLO (params), LOMO (model) and layer-wise optimizers (optimizer_dict) failed with "got multiple
    values for argument 'params'" or replaced RECTrainer's groups."""
    trainer = _trainer(processor, tmp_path, max_steps=1)
    model = trainer.model
    monkeypatch.setattr(RECTrainer, "get_optimizer_cls_and_kwargs", staticmethod(
        lambda args, model=None: (torch.optim.AdamW, {key: list(model.parameters()), "lr": 1e-3})))
    with pytest.raises(ValueError, match=rf"brings its own {key}, which RECTrainer cannot combine"):
        trainer.create_optimizer(model)


def test_eval_loss_is_the_loss_compute_loss_func_trains(processor, tmp_path):
    """With compute_loss_func=..., training minimised the user's loss but eval_loss reported the model's REC loss, so
    metric_for_best_model='loss' and early stopping followed a loss the run never trained on."""
    def constant_loss(outputs, labels, num_items_in_batch=None):
        return (outputs["pred_boxes"] - labels).abs().sum() * 0 + 7.0

    trainer = _trainer(processor, tmp_path, make_dataset(4, seed=2), compute_loss_func=constant_loss, max_steps=1)
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(7.0)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(7.0)
    assert "eval_acc@0.5" in trainer.evaluate()  # the REC metrics are still reported
