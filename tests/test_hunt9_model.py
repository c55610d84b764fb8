"""SideTunedModel's API as a PEFT / torch user calls it (round 9): each verb does what it says or refuses in one line,
never a quiet no-op or a misleading value."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from m2ist import SideTunedModel, get_side_tuned_model
from tests.tiny import text_tower, tiny_config, vision_tower


@pytest.fixture(scope="module")
def model() -> SideTunedModel:
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())


def test_to_memory_format_is_applied_not_ignored(model) -> None:
    weight = lambda: model.vision_model.embeddings.patch_embeddings.projection.weight  # noqa: E731
    assert not weight().is_contiguous(memory_format=torch.channels_last)
    try:
        assert model.to(memory_format=torch.channels_last) is model
        assert weight().is_contiguous(memory_format=torch.channels_last)  # was silently left contiguous
        assert model.dtype == torch.float32 and weight().dtype == torch.float32
    finally:
        model.to(memory_format=torch.contiguous_format)


def test_load_adapter_returns_a_peft_like_load_result(model, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "a")
    try:
        result = model.load_adapter(tmp_path / "a", "loaded")  # was None: PEFT callers read .unexpected_keys
        assert result.missing_keys == [] and result.unexpected_keys == []
    finally:
        model.delete_adapter("loaded")


@pytest.mark.parametrize("prefix, hint", [("module.", "carry the prefix 'module.'"),
                                          ("_orig_mod.", "carry the prefix '_orig_mod.'")])
def test_load_state_dict_that_would_load_nothing_is_refused(model, prefix, hint) -> None:
    state = {prefix + key: value + 1 for key, value in model.trainable_state_dict().items()}
    before = {key: value.clone() for key, value in model.trainable_state_dict().items()}
    with pytest.raises(ValueError, match=f"nothing would be loaded, even with strict=False.*{hint}"):
        model.load_state_dict(state, strict=False)  # was: loaded nothing, said so only in the returned keys
    side = {key.removeprefix("side."): value for key, value in model.trainable_state_dict().items()
            if key.startswith("side.")}
    with pytest.raises(ValueError, match=r"lack the prefix 'side.'.*model.side.load_state_dict"):
        model.load_state_dict(side, strict=False)
    assert all(torch.equal(before[key], value) for key, value in model.trainable_state_dict().items())
    result = model.load_state_dict(before, strict=False)  # the usual partial load still works
    assert not result.unexpected_keys and all(key.startswith(("vision_model.", "text_model."))
                                              for key in result.missing_keys)


@pytest.mark.parametrize("verb", ["merge_and_unload", "merge_adapter", "unmerge_adapter", "unload"])
def test_merging_verbs_are_refused_saying_side_tuning_cannot_merge(model, verb) -> None:
    with pytest.raises(NotImplementedError, match=f"SideTunedModel.{verb}\\(\\): side-tuning cannot merge"):
        getattr(model, verb)()


@pytest.mark.parametrize("verb", ["disable_adapter", "disable_adapter_layers", "disable_adapters"])
def test_disabling_the_adapter_is_refused_saying_there_is_no_box_without_one(model, verb) -> None:
    with pytest.raises(NotImplementedError, match="no box without an adapter"), getattr(model, verb)():
        pass
    model.enable_adapter_layers()  # always enabled: nothing to do
    model.enable_adapters()
    # transformers' Trainer unwraps models that have these: they stay undefined
    assert not hasattr(model, "get_base_model") and not hasattr(model, "base_model")


def test_add_adapter_in_transformers_argument_order_is_refused_naming_the_order(model) -> None:
    with pytest.raises(TypeError, match=r"name first, as PEFT does: add_adapter\('name', config\)"):
        model.add_adapter(tiny_config(), "other")
    assert model.list_adapters() == ["default"]


def test_a_state_dict_of_an_adapter_the_model_lacks_is_refused_naming_it(model) -> None:
    state = {f"inactive_adapters.wide.{key}": value for key, value in model.trainable_state_dict().items()}
    with pytest.raises(ValueError, match=r"hold the adapter 'wide', which this model does not have.*add_adapter"):
        model.load_state_dict(state, strict=False)
