"""Where a PEFT / transformers habit meets m2ist's API: each one either works as it would there or gets one clear
error, never a silent other meaning (a default config, a frozen adapter, cast towers, a module repr as a path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from m2ist import M2ISTConfig, SideTunedModel, get_side_tuned_model
from tests.conftest import make_batch
from tests.tiny import text_tower, tiny_config, vision_tower

INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")


@pytest.fixture(scope="module")
def model() -> SideTunedModel:
    built = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    built.add_adapter("other", tiny_config(bottleneck=4))
    return built


def test_from_pretrained_in_peft_argument_order_is_refused_naming_the_order(model, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "adapter", selected_adapters=["default"])
    with pytest.raises(TypeError, match=r"adapter first, then the towers: SideTunedModel.from_pretrained\(path"):
        SideTunedModel.from_pretrained(model.vision_model, model.text_model, tmp_path / "adapter")
    with pytest.raises(TypeError, match=r"text_model must be a loaded torch model or None.*got str 'bert-base'"):
        SideTunedModel.from_pretrained(tmp_path / "adapter", model.vision_model, "bert-base")
    with pytest.raises(TypeError, match="model_id must be a folder or a Hub repo id"):
        model.load_adapter(model.vision_model, "third")


@pytest.mark.parametrize("config, message", [
    ({}, r"got a dict: build one with M2ISTConfig\(\*\*values\)"),  # was silently the default config
    ({"bottleneck": 4}, "got a dict"),
    (M2ISTConfig, r"got the class M2ISTConfig: call it"),
    (pytest.importorskip("peft").LoraConfig(), "got a LoraConfig: m2ist's settings are an M2ISTConfig"),
])
def test_a_config_that_is_not_an_m2ist_config_is_refused(model, config, message) -> None:
    with pytest.raises(TypeError, match=message):
        get_side_tuned_model(model.vision_model, model.text_model, config)


def test_towers_that_are_not_modules_are_refused(model) -> None:
    with pytest.raises(TypeError, match=r"text_model must be a loaded torch model.*got a M2ISTConfig"):
        get_side_tuned_model(model.vision_model, tiny_config())  # PEFT's get_peft_model(model, config) habit


def test_adapter_names_are_strings_and_base_is_explained(model) -> None:
    for call in (lambda: model.set_adapter(["other"]), lambda: model.delete_adapter(["other"]),
                 lambda: model.forward_all_adapters(**_inputs(), adapter_names=[["other"]])):
        with pytest.raises(TypeError, match=r"An adapter name is a string, got \['other'\]"):
            call()
    with pytest.raises(KeyError, match="PEFT's 'no adapter'"):
        model(**_inputs(), adapter_names=["__base__", "default"])
    assert model.list_adapters() == ["default", "other"]


def test_switches_are_booleans_never_truthy_strings(model, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="inference_mode must be True or False, got str 'False'"):
        model.set_adapter("default", inference_mode="False")  # was: the adapter silently frozen
    assert all(p.requires_grad for p in model.side.parameters())
    model.save_pretrained(tmp_path / "adapter", selected_adapters=["default"])
    with pytest.raises(TypeError, match="is_trainable must be True or False, got str 'no'"):
        model.load_adapter(tmp_path / "adapter", "third", is_trainable="no")
    with pytest.raises(TypeError, match="trust_remote_code must be True or False, got str 'false'"):
        SideTunedModel.from_pretrained(tmp_path / "adapter", model.vision_model, model.text_model,
                                       trust_remote_code="false")
    with pytest.raises(TypeError, match="is_main_process must be True or False"):
        model.save_pretrained(tmp_path / "other", is_main_process="False")
    assert not (tmp_path / "other").exists()
    model.set_adapter("default", inference_mode=np.bool_(False))  # numpy's booleans are booleans
    assert all(p.requires_grad for p in model.side.parameters())


@pytest.mark.parametrize("dst_type", [torch.float16, "torch.HalfTensor"])
def test_type_casts_only_the_trained_part_as_to_does(dst_type) -> None:
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    assert model.type(dst_type) is model
    assert {p.dtype for p in model.side.parameters()} == {p.dtype for p in model.head.parameters()} == {torch.float16}
    for tower in (model.vision_model, model.text_model):  # config.backbone_dtype (None) still tells the truth
        assert {p.dtype for p in tower.parameters()} == {torch.float32}
    assert model(**_inputs()).pred_boxes.dtype == torch.float16


def _inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    values = make_batch(batch=batch)
    return {key: values[key] for key in INPUTS}


def test_return_dict_follows_transformers_none_gives_the_output_object(model) -> None:
    """transformers reads ``return_dict=None`` as "the default", an output object; wrappers pass it explicitly (PEFT's
    task models do). It gave a tuple, and text such as ``"False"`` gave the object."""
    from m2ist.model import RECModelOutput

    batch = make_batch()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    model.eval()
    with torch.no_grad():
        default = model(**inputs)
        assert isinstance(model(**inputs, return_dict=None), RECModelOutput)
        assert isinstance(model(**inputs, return_dict=True), RECModelOutput)
        as_tuple = model(**inputs, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], default.pred_boxes)
        features = model.tower_features(**{k: inputs[k] for k in ("pixel_values", "pixel_mask", "input_ids",
                                                                   "attention_mask")})
        assert isinstance(model.forward_features(features, return_dict=None), RECModelOutput)
        with pytest.raises(TypeError, match="return_dict must be True or False, got str 'False'"):
            model(**inputs, return_dict="False")


def test_from_pretrained_names_the_loaded_adapter_as_peft_does(model, tmp_path: Path) -> None:
    """PEFT's ``PeftModel.from_pretrained(base, path, adapter_name="refcoco")`` names the loaded adapter; m2ist
    refused the keyword, so the loaded adapter was always "default" beside those loaded after it."""
    model.save_pretrained(tmp_path / "a")
    loaded = SideTunedModel.from_pretrained(tmp_path / "a", model.vision_model, model.text_model,
                                            adapter_name="refcoco")
    assert loaded.active_adapter == "refcoco" and loaded.list_adapters() == ["refcoco"]
    loaded.load_adapter(tmp_path / "a", adapter_name="default")  # the name is free
    batch = make_batch()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        outputs = loaded.forward_all_adapters(**inputs, adapter_names="all")
        torch.testing.assert_close(outputs["refcoco"].pred_boxes, outputs["default"].pred_boxes)
    loaded.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "refcoco" / "m2ist_config.json").is_file()  # in its subfolder, as PEFT saves it
    for bad, error in (("a/b", ValueError), ("RUNS", ValueError), (3, TypeError)):
        with pytest.raises(error, match=r"(A|a)dapter name"):
            SideTunedModel.from_pretrained(tmp_path / "a", model.vision_model, model.text_model, adapter_name=bad)


def test_forward_all_adapters_takes_all_as_predict_and_evaluate_do(model) -> None:
    """``adapter_names="all"`` (what predict and evaluate take for every adapter) raised "No adapter named 'all'"."""
    batch = make_batch()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        assert list(model.forward_all_adapters(**inputs, adapter_names="all")) == model.list_adapters()
