"""SideTunedModel's multi-adapter verbs against PEFT's (and transformers' PeftAdapterMixin's) conventions: what is
trainable after each verb, both spellings of ``active_adapters``, adapter names torch cannot hold, and what an added
adapter records about its towers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from m2ist import SideTunedModel
from m2ist.config import CONFIG_NAME
from tests.conftest import make_batch
from tests.ddp_worker import make_model
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")


def _inputs() -> dict[str, torch.Tensor]:
    batch = make_batch(batch=2)
    return {key: batch[key] for key in INPUTS}


def _grads(module: torch.nn.Module) -> set[bool]:
    return {p.requires_grad for p in module.parameters()}


def _saved(tmp_path: Path) -> tuple[SideTunedModel, Path]:
    model = make_model()
    model.save_pretrained(tmp_path / "adapter")
    return model, tmp_path / "adapter"


def test_active_adapters_is_peft_s_property_and_transformers_method() -> None:
    model = make_model()
    model.add_adapter("other", tiny_config())
    assert model.active_adapters == ["default"]  # PeftModel: a property
    assert model.active_adapters() == ["default"]  # transformers' PeftAdapterMixin: a method
    model.set_adapter("other")
    assert model.active_adapters == model.active_adapters() == ["other"] and model.active_adapter == "other"
    assert type(model.active_adapters()) is list


def test_requires_grad_true_unfreezes_what_can_train_only(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``model.requires_grad_(True)`` used to unfreeze the towers (which run under no_grad and never train) and the
    inactive adapters: print_trainable_parameters reported 100% trainable until training refused to start."""
    model, folder = _saved(tmp_path)
    loaded = SideTunedModel.from_pretrained(folder, model.vision_model, model.text_model)
    loaded.load_adapter(folder, "other")
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert loaded.requires_grad_(True) is loaded
    assert _grads(loaded.side) == _grads(loaded.head) == {True}
    assert _grads(loaded.vision_model) == _grads(loaded.text_model) == _grads(loaded.inactive_adapters) == {False}
    counts = loaded.parameter_counts()
    assert loaded.get_nb_trainable_parameters()[0] == counts["side"] + counts["head"] and "tower" not in counts
    loaded.print_trainable_parameters()
    assert "tower params" not in capsys.readouterr().out
    loaded.train()(**_inputs(), labels=make_batch(batch=2)["labels"]).loss.backward()  # trains, no refusal
    loaded.requires_grad_(False)
    assert not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(TypeError, match="requires_grad_: requires_grad must be True or False"):
        loaded.requires_grad_("False")


@pytest.mark.parametrize("name", ["train", "keys", "training", "_modules", "forward", "to", "update"])
def test_a_name_the_adapter_holder_cannot_hold_is_refused_before_anything_changes(name: str, tmp_path: Path) -> None:
    """Such a name used to fail with torch's bare KeyError ("attribute 'train' already exists"), for
    from_pretrained(adapter_name=...) only at the first set_adapter, after the adapter being activated had been
    taken out: it was lost while list_adapters still named it."""
    model, folder = _saved(tmp_path)
    with pytest.raises(ValueError, match=rf"Adapter name '{name}' is not usable.*ModuleDict"):
        model.add_adapter(name, tiny_config())
    with pytest.raises(ValueError, match=rf"Adapter name '{name}' is not usable"):
        model.load_adapter(tmp_path / "no-such-folder", name)  # the name is checked before any file is read
    with pytest.raises(ValueError, match=rf"Adapter name '{name}' is not usable"):
        SideTunedModel.from_pretrained(folder, model.vision_model, model.text_model, adapter_name=name)
    assert model.list_adapters() == ["default"] and list(model.peft_config) == ["default"]
    assert not list(model.inactive_adapters)


@pytest.mark.parametrize("name", ["side", "head", "vision_model", "config", "inactive_adapters"])
def test_names_of_the_model_s_own_attributes_are_fine_adapter_names(name: str, tmp_path: Path) -> None:
    model, _ = _saved(tmp_path)
    model.add_adapter(name, tiny_config(bottleneck=4))
    model.set_adapter(name)
    assert isinstance(model.side, torch.nn.Module) and model.config.bottleneck == 4
    model.eval()(**_inputs())
    model.save_pretrained(tmp_path / "two")
    again = SideTunedModel.from_pretrained(tmp_path / "two", model.vision_model, model.text_model)
    again.load_adapter(tmp_path / "two", name, subfolder=name)
    with torch.no_grad():
        torch.testing.assert_close(again.forward_all_adapters(**_inputs())[name].pred_boxes,
                                   model(**_inputs()).pred_boxes, rtol=0, atol=0)


def test_a_set_adapter_that_fails_leaves_every_adapter_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model()
    model.add_adapter("other", tiny_config(bottleneck=4))

    put = torch.nn.ModuleDict.__setitem__

    def refuse(self, key, module):  # only putting the active adapter back into the holder fails
        if key == "default":
            raise RuntimeError("refused")
        put(self, key, module)

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.ModuleDict, "__setitem__", refuse)
        with pytest.raises(RuntimeError, match="refused"):
            model.set_adapter("other")
    assert model.active_adapter == "default" and list(model.inactive_adapters) == ["other"]
    model.set_adapter("other")  # used to be lost: taken out before the active one was put back
    assert model.config.bottleneck == 4 and list(model.inactive_adapters) == ["default"]


def test_load_adapter_then_set_adapter_trains_it_and_inference_mode_keeps_it_frozen(tmp_path: Path) -> None:
    """PEFT marks an adapter loaded with is_trainable=True as requiring grad while inactive; m2ist keeps every
    inactive adapter frozen (DDP, optimizer groups) and set_adapter makes the active one trainable, as PEFT's does."""
    model, folder = _saved(tmp_path)
    model.train()
    model.load_adapter(folder, "trainable", is_trainable=True)
    model.load_adapter(folder, "inference")
    assert model.inactive_adapters["trainable"].training and not model.inactive_adapters["inference"].training
    assert _grads(model.inactive_adapters) == {False}
    model.set_adapter("trainable")
    assert _grads(model.side) == _grads(model.head) == {True} and model.side.training
    assert _grads(model.inactive_adapters) == {False}  # the previous one is frozen, as in PEFT
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**_inputs(), labels=make_batch(batch=2)["labels"]).loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.trainable_state_dict().items())
    model.set_adapter("inference", inference_mode=True)
    assert model.get_nb_trainable_parameters()[0] == 0 and model.side.training  # the model's mode: train()
    model.eval()
    assert not any(m.training for m in model.modules())


def test_set_requires_grad_as_in_peft() -> None:
    model = make_model()
    model.add_adapter("other", tiny_config())
    model.set_requires_grad("default", requires_grad=False)
    assert model.get_nb_trainable_parameters()[0] == 0
    model.set_requires_grad(["default"])
    assert _grads(model.side) == {True}
    model.set_requires_grad("other", requires_grad=False)  # already frozen: nothing to do
    with pytest.raises(ValueError, match=r"only the active adapter \('default'\) trains.*set_adapter\('other'\)"):
        model.set_requires_grad(["default", "other"])
    assert _grads(model.inactive_adapters) == {False}
    with pytest.raises(KeyError, match="No adapter named 'nope'"):
        model.set_requires_grad("nope")
    with pytest.raises(TypeError, match="requires_grad must be True or False"):
        model.set_requires_grad("default", requires_grad="yes")


def test_an_added_adapter_records_these_towers_not_those_its_config_names(tmp_path: Path) -> None:
    """add_adapter(name, other_model.peft_config[...]) used to keep the other model's tower names: saved, the adapter
    said it was trained on another tower (same architecture), which from_pretrained would then download and load."""
    model = make_model()
    elsewhere = dataclasses.replace(model.config, vision_model_name_or_path="org/another-vit",
                                    vision_revision="a" * 40, text_model_name_or_path="org/another-bert")
    model.add_adapter("copied", elsewhere)
    added = model.peft_config["copied"]
    for key in ("model_name_or_path", "revision", "model_class", "dtype", "model_type", "width", "depth"):
        for modality in ("vision", "text"):
            assert getattr(added, f"{modality}_{key}") == getattr(model.config, f"{modality}_{key}"), (modality, key)
    model.save_pretrained(tmp_path, selected_adapters=["copied"])
    saved = json.loads((tmp_path / "copied" / CONFIG_NAME).read_text())
    assert saved["vision_model_name_or_path"] == model.config.vision_model_name_or_path
    assert "org/another" not in (tmp_path / "copied" / CONFIG_NAME).read_text()
    with pytest.raises(ValueError, match="built for other towers: vision_width"):
        model.add_adapter("wider", dataclasses.replace(model.config, vision_width=64))
    assert model.list_adapters() == ["default", "copied"]
