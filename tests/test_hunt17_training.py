"""Training runs (fault hunt 17): a resume with another augmentation, and a processor change on a model of
several adapters."""

from __future__ import annotations

import pytest

from m2ist.data.transforms import RECAugmentation
from m2ist.trainer import train_rec
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.test_hunt16_resume import _StopAt
from tests.tiny import QUERY_LEN, cpu_training_args, tiny_config


def test_resuming_with_another_augmentation_is_refused(tmp_path):
    """The augmentation's seed and settings were not in the run settings: a resume with another seed or no flips
    continued silently with other draws than the interrupted run's."""
    processor = make_processor(tmp_path / "tok")
    args = cpu_training_args(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    train_rec(make_model(), processor._with(augment=RECAugmentation(seed=1)), make_dataset(8, seed=1), args=args,
              callbacks=[_StopAt(2)])
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    for augment, named in ((RECAugmentation(seed=2), "augmentation.seed: checkpoint 1, now 2"),
                           (RECAugmentation(seed=1, hflip=False), "augmentation.hflip: checkpoint True, now False"),
                           (None, "augmentation: checkpoint {")):
        with pytest.raises(ValueError, match=named.replace("{", r"\{")):
            train_rec(make_model(), processor._with(augment=augment), make_dataset(8, seed=1), args=args,
                      resume_from_checkpoint=checkpoint)
    trainer = train_rec(make_model(), processor._with(augment=RECAugmentation(seed=1)), make_dataset(8, seed=1),
                        args=args, resume_from_checkpoint=checkpoint)  # the same augmentation resumes
    assert trainer.state.global_step == 4


def test_another_processor_on_a_model_of_several_adapters_is_named_and_kept(tmp_path):
    """The adapters share model.processor: training one of them with another processor warns and keeps it."""
    model = make_model()
    model.add_adapter("other", tiny_config())
    model.set_adapter("other")
    old = make_processor(tmp_path / "tok")
    model.processor = old
    new = old._with(max_query_len=QUERY_LEN - 2)
    with pytest.warns(UserWarning, match=r"trains adapter 'other' with prepares inputs otherwise than model\.processor, "
                                         r"which the model's 2 adapters share"):
        train_rec(model, new, make_dataset(4, seed=1), args=cpu_training_args(tmp_path / "run", max_steps=1))
    assert model.processor is old
