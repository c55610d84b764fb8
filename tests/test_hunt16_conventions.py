"""SideTunedModel against the conventions PEFT and transformers users rely on: ``num_parameters``, PEFT's
``get_base_model`` / ``base_model``, and copies holding their towers."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from m2ist import SideTunedModel, get_side_tuned_model
from tests.ddp_worker import make_model
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model() -> SideTunedModel:
    return make_model()


def test_num_parameters_counts_as_transformers_does(model) -> None:
    everything = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == everything  # both towers whole (the pooler too), side network and head
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.num_parameters(only_trainable=True) == model.get_nb_trainable_parameters()[0]
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert embeddings > 0 and model.num_parameters(exclude_embeddings=True) == everything - embeddings
    with pytest.raises(TypeError, match="num_parameters: only_trainable must be True or False"):
        model.num_parameters(only_trainable="False")


def test_num_parameters_counts_inactive_adapters_and_follows_is_trainable(tmp_path) -> None:
    model = make_model()
    before = model.num_parameters()
    model.add_adapter("other", tiny_config(bottleneck=4))
    added = sum(p.numel() for p in model.inactive_adapters["other"].parameters())
    assert model.num_parameters() == before + added  # every adapter is in the module
    assert model.get_nb_trainable_parameters()[1] < model.num_parameters()  # the active adapter's model only
    model.save_pretrained(tmp_path / "adapter")
    loaded = SideTunedModel.from_pretrained(tmp_path / "adapter", model.vision_model, model.text_model)
    assert loaded.num_parameters(only_trainable=True) == 0  # loaded for inference: nothing requires grad


@pytest.mark.parametrize("name", ["get_base_model", "base_model"])
def test_peft_base_model_names_say_what_to_use_and_stay_undefined(model, name) -> None:
    assert not hasattr(model, name)  # tools that unwrap PEFT models probe these with hasattr
    with pytest.raises(AttributeError, match=r"model\.vision_model and model\.text_model.*model\.side and model\.head"):
        getattr(model, name)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):  # other names: torch's message
        model.no_such_thing  # noqa: B018
    assert isinstance(model.side, torch.nn.Module)  # submodules are still found


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_casting_a_copys_towers_for_another_model_warns(how) -> None:
    original = make_model()
    duplicate = copy.deepcopy(original) if how == "deepcopy" else pickle.loads(pickle.dumps(original))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        get_side_tuned_model(duplicate.vision_model, duplicate.text_model, tiny_config(backbone_dtype="bfloat16"))
    assert next(duplicate.vision_model.parameters()).dtype == torch.bfloat16  # the copy's outputs changed ...
    messages = [str(w.message) for w in caught]
    assert any("vision tower" in m and "shared with another SideTunedModel" in m for m in messages)  # ... said so


def test_training_reports_no_flop_estimate(tmp_path) -> None:
    """With ``num_parameters`` defined, transformers' Trainer would estimate ``total_flos`` as 6 x text tokens x
    every parameter (the frozen towers' backward included, which never runs): RECTrainer reports none."""
    from m2ist.trainer import train_rec
    from tests.ddp_worker import make_dataset, make_processor
    from tests.tiny import cpu_training_args

    processor = make_processor(tmp_path / "tokenizer")
    trainer = train_rec(make_model(), processor, make_dataset(4, seed=1),
                        args=cpu_training_args(tmp_path / "run", max_steps=2))
    assert trainer.state.global_step == 2 and trainer.state.total_flos == 0
