"""Several adapters on one model, against PEFT's conventions: what is loaded, pushed and run is what was asked."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

from m2ist import RECProcessor, SideTunedModel, get_side_tuned_model
from m2ist.hub import PretrainedNotFoundError
from m2ist.save_and_load import WEIGHTS_NAME
from tests.conftest import make_batch
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import text_tower, tiny_config, vision_tower

hub = hub_fixture(name="hub", max_lifetime_s=120)
INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")


def _perturb(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _two_adapters() -> SideTunedModel:
    """'default' and 'wide' (another bottleneck), both with trained-looking weights, in eval()."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    _perturb(model.side)
    model.add_adapter("wide", tiny_config(bottleneck=16))
    _perturb(model.inactive_adapters["wide"])
    return model.eval()


def _inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    values = make_batch(batch=batch)
    return {key: values[key] for key in INPUTS}


def test_load_adapter_without_subfolder_never_takes_the_root_adapter_for_a_named_one(tmp_path: Path) -> None:
    model = _two_adapters()
    model.save_pretrained(tmp_path)
    again = SideTunedModel.from_pretrained(tmp_path, model.vision_model, model.text_model)
    with pytest.raises(ValueError, match="subfolder='wide'"):
        again.load_adapter(tmp_path, "wide")  # used to load the root ('default') weights under the name 'wide'
    assert again.list_adapters() == ["default"]
    again.load_adapter(tmp_path, "wide", subfolder="wide")
    again.load_adapter(tmp_path, "root_copy")  # the root adapter under a name the folder does not use
    with torch.no_grad():
        mine, theirs = model.forward_all_adapters(**_inputs()), again.forward_all_adapters(**_inputs())
    assert torch.equal(theirs["wide"].pred_boxes, mine["wide"].pred_boxes)
    assert torch.equal(theirs["root_copy"].pred_boxes, mine["default"].pred_boxes)


def test_a_folder_of_subfolder_adapters_names_the_subfolder_to_load(tmp_path: Path) -> None:
    model = _two_adapters()
    model.save_pretrained(tmp_path, selected_adapters=["wide"])  # no root adapter
    with pytest.raises(PretrainedNotFoundError, match="pass subfolder='wide'"):
        SideTunedModel.from_pretrained(tmp_path, model.vision_model, model.text_model)


def test_added_and_loaded_adapters_take_the_model_dtype_so_batches_can_mix_them(tmp_path: Path) -> None:
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config()).eval()
    model.save_pretrained(tmp_path / "f32")
    model.to(torch.bfloat16)
    model.add_adapter("new", tiny_config())
    model.load_adapter(tmp_path / "f32", "loaded")
    for name in ("new", "loaded"):
        assert {p.dtype for p in model.inactive_adapters[name].parameters()} == {torch.bfloat16}
    with torch.no_grad():  # used to fail: "Index put requires the source and destination dtypes match"
        mixed = model(**_inputs(3), adapter_names=["new", "default", "loaded"]).pred_boxes
    assert mixed.dtype == torch.bfloat16 and torch.isfinite(mixed).all()


def test_mixed_batches_of_adapters_cast_apart_keep_every_sample() -> None:
    model = _two_adapters()
    model.inactive_adapters["wide"].to(torch.bfloat16)  # cast by hand
    with torch.no_grad():
        mixed = model(**_inputs(2), adapter_names=["wide", "default"]).pred_boxes
        alone = model.forward_all_adapters(**_inputs(2))
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed[0], alone["wide"].pred_boxes[0].float())
    assert torch.equal(mixed[1], alone["default"].pred_boxes[1])


def _processor(tmp_path: Path, **settings) -> RECProcessor:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "square"]) + "\n")
    return RECProcessor(BertTokenizer(str(vocab)), canvas_size=32, max_query_len=8, **settings)


def test_load_adapter_warns_when_its_processor_is_not_the_models(tmp_path: Path) -> None:
    other = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    other.processor = _processor(tmp_path, image_mean=[0.5] * 3, image_std=[0.5] * 3, lowercase=False)
    other.save_pretrained(tmp_path / "other")
    same = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    same.processor = _processor(tmp_path)
    same.save_pretrained(tmp_path / "same")
    model = _two_adapters()
    model.processor = _processor(tmp_path)
    with pytest.warns(UserWarning, match=r"another processor.*image_mean.*lowercase: saved False"):
        model.load_adapter(tmp_path / "other", "other")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.load_adapter(tmp_path / "same", "same")


def test_deleting_the_active_adapter_warns_and_keeps_an_inference_model_frozen(tmp_path: Path) -> None:
    _two_adapters().save_pretrained(tmp_path)
    model = _two_adapters()
    loaded = SideTunedModel.from_pretrained(tmp_path, model.vision_model, model.text_model)  # for inference
    loaded.load_adapter(tmp_path, "wide", subfolder="wide")
    assert loaded.get_nb_trainable_parameters()[0] == 0
    with pytest.warns(UserWarning, match="'wide' is active now"):
        loaded.delete_adapter("default")
    assert loaded.active_adapter == "wide" and loaded.get_nb_trainable_parameters()[0] == 0
    model.add_adapter("third", tiny_config())
    with pytest.warns(UserWarning, match="'wide' is active now"):  # a trainable model stays trainable
        model.delete_adapter("default")
    assert all(p.requires_grad for p in model.side.parameters())


def test_peft_config_is_read_only() -> None:
    model = _two_adapters()
    with pytest.raises(TypeError):
        model.peft_config["extra"] = tiny_config()  # used to be dropped silently
    assert model.peft_config["wide"].bottleneck == 16


def test_selected_adapters_is_a_list_of_names(tmp_path: Path) -> None:
    model = _two_adapters()
    with pytest.raises(TypeError, match="not the string 'wide'"):  # used to be read as ['w', 'i', 'd', 'e']
        model.save_pretrained(tmp_path / "a", selected_adapters="wide")
    assert not (tmp_path / "a").exists()


def test_a_push_says_which_adapters_it_deletes_and_can_push_one_of_several(hub: LocalHub, tmp_path: Path) -> None:
    model = _two_adapters()
    model.push_to_hub("me/multi", endpoint=hub.url)
    loaded = SideTunedModel.from_pretrained("me/multi", model.vision_model, model.text_model, endpoint=hub.url,
                                            cache_dir=tmp_path / "cache", is_trainable=True)
    assert loaded.list_adapters() == ["default"]  # from_pretrained loads the root adapter only, as PEFT
    _perturb(loaded.side)
    with pytest.warns(UserWarning, match=r"deletes adapters of 'me/multi'.*'wide' \(in wide/\)"):
        loaded.push_to_hub("me/multi", endpoint=hub.url)
    assert f"wide/{WEIGHTS_NAME}" not in hub.files("me/multi")

    model.push_to_hub("me/multi", endpoint=hub.url)  # both again
    before = hub.files("me/multi")
    wide = SideTunedModel.from_pretrained("me/multi", model.vision_model, model.text_model, endpoint=hub.url,
                                          cache_dir=tmp_path / "cache", subfolder="wide", is_trainable=True)
    wide.add_adapter("wide", tiny_config(bottleneck=16))
    _perturb(wide.inactive_adapters["wide"])
    wide.push_to_hub("me/multi", endpoint=hub.url, selected_adapters=["wide"])  # the root adapter stays
    after = hub.files("me/multi")
    assert set(after) == set(before)
    assert after[WEIGHTS_NAME] == before[WEIGHTS_NAME] and after["README.md"] == before["README.md"]
    assert after[f"wide/{WEIGHTS_NAME}"] != before[f"wide/{WEIGHTS_NAME}"]


def test_no_adapter_may_be_named_all() -> None:
    """``adapters="all"`` means every adapter: an adapter named so could never be asked for alone."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    with pytest.raises(ValueError, match="'all' is reserved: predict"):
        model.add_adapter("all", tiny_config())
    assert model.list_adapters() == ["default"]


def test_a_save_swapped_in_while_loading_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trainer saving into a folder while another process loads it: the config of one save and the weights of the
    next must never load together."""
    import m2ist.model as model_module

    model = _two_adapters()
    model.save_pretrained(tmp_path)
    real = model_module.load_trainable_state

    def save_then_load(target, path):  # a new save lands between reading the config and the weights
        model.save_pretrained(tmp_path)
        return real(target, path)

    monkeypatch.setattr(model_module, "load_trainable_state", save_then_load)
    with pytest.raises(ValueError, match="was replaced by a new save while it was being loaded"):
        SideTunedModel.from_pretrained(tmp_path, model.vision_model, model.text_model)
    with pytest.raises(ValueError, match="was replaced by a new save while it was being loaded"):
        model.load_adapter(tmp_path, "again")
    assert "again" not in model.list_adapters()
    monkeypatch.setattr(model_module, "load_trainable_state", real)
    SideTunedModel.from_pretrained(tmp_path, model.vision_model, model.text_model).load_adapter(tmp_path, "third")
