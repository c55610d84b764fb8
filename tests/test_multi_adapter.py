"""Several adapters on one pair of frozen towers: PEFT's verbs, one tower pass for all, per-adapter saving."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import BertTokenizer

from m2ist import RECProcessor, SideTunedModel, get_side_tuned_model
from m2ist.evaluation import evaluate
from m2ist.inference import predict_boxes
from m2ist.save_and_load import WEIGHTS_NAME
from tests.conftest import make_batch
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import text_tower, tiny_config, vision_tower

hub = hub_fixture(name="hub", max_lifetime_s=120)
INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")


def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _model_with_adapters(vision_family: str = "vit") -> SideTunedModel:
    """A model with three trained-looking adapters: 'default', 'wide' (other bottleneck) and 'deep' (other layers
    and other tap kinds)."""
    model = get_side_tuned_model(vision_tower(vision_family), text_tower("bert"), tiny_config())
    _perturb(model.side)
    model.add_adapter("wide", tiny_config(bottleneck=16, fusion_layers=2))
    model.add_adapter("deep", tiny_config(vision_layers=[1], text_layers=[1], intra_tap="attention",
                                          inter_tap="attention", box_readout="reg"))
    for name in ("wide", "deep"):
        _perturb(model.inactive_adapters[name])
    return model.eval()


def _alone(model: SideTunedModel, name: str, batch: dict) -> torch.Tensor:
    """The adapter's boxes when it is the active one and runs by itself."""
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        with torch.no_grad():
            return model(**{k: batch[k] for k in INPUTS}).pred_boxes
    finally:
        model.set_adapter(previous)


def test_verbs_follow_peft():
    model = _model_with_adapters()
    assert model.active_adapter == "default" and model.active_adapters == ["default"]
    assert model.list_adapters() == ["default", "wide", "deep"]
    assert set(model.peft_config) == {"default", "wide", "deep"} and model.peft_config["wide"].bottleneck == 16
    # only the active adapter trains and is what trainable_state_dict() returns, under the usual keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("side.", "head.")) for n in trainable)
    counts_before = model.parameter_counts()
    model.set_adapter("wide")
    assert model.active_adapter == "wide" and model.config.bottleneck == 16
    assert model.config.get_text_config().model_type == "bert"  # transformers reads the text tower's config there
    assert model.side.blocks[0].vea.down.out_features == 16
    assert set(model.trainable_state_dict()) == {k for k in model.state_dict() if k.startswith(("side.", "head."))}
    assert all(n.startswith(("side.", "head.")) for n, p in model.named_parameters() if p.requires_grad)
    assert model.parameter_counts()["side"] > counts_before["side"]  # counts follow the active adapter
    with pytest.warns(UserWarning, match="'wide' was active and is deleted"):
        model.delete_adapter("wide")  # the active one: the next becomes active, with a warning
    assert model.active_adapter in ("default", "deep") and "wide" not in model.list_adapters()
    assert not any("wide" in k for k in model.state_dict())
    model.delete_adapter("deep")
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("default")
    with pytest.raises(KeyError, match="No adapter named 'nope'"):
        model.set_adapter("nope")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", tiny_config())
    for bad in ("", "a/b", "__base__", "..", " ", "en ", "a\\b", "tab\there"):
        with pytest.raises(ValueError, match="not usable"):
            model.add_adapter(bad, tiny_config())
    with pytest.raises(ValueError, match="max_query_len"):
        model.add_adapter("other", tiny_config(max_query_len=12))


@pytest.mark.parametrize("vision_family", ["vit", "detr"])
def test_forward_all_adapters_equals_each_adapter_alone(vision_family):
    model = _model_with_adapters(vision_family)
    batch = make_batch(batch=3)
    calls = {"n": 0}
    first_layer = model.vision_tower.layers[0][1]
    handle = first_layer.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    with torch.no_grad():
        outputs = model.forward_all_adapters(**{k: batch[k] for k in INPUTS})
    assert calls["n"] == 1  # one pass of the vision tower for three adapters
    handle.remove()
    assert list(outputs) == ["default", "wide", "deep"]
    for name, output in outputs.items():
        torch.testing.assert_close(output.pred_boxes, _alone(model, name, batch), rtol=0, atol=0)
    assert not torch.equal(outputs["default"].pred_boxes, outputs["wide"].pred_boxes)
    # with labels each adapter gets its own loss
    with torch.no_grad():
        with_loss = model.forward_all_adapters(**batch, adapter_names=["wide", "deep"])
    assert set(with_loss) == {"wide", "deep"} and all(o.loss is not None for o in with_loss.values())


def test_adapter_names_is_one_adapter_per_sample():
    model = _model_with_adapters()
    batch = make_batch(batch=4)
    names = ["deep", "default", "deep", "wide"]
    with torch.no_grad():
        mixed = model(**{k: batch[k] for k in INPUTS}, adapter_names=names).pred_boxes
    for row, name in enumerate(names):
        torch.testing.assert_close(mixed[row], _alone(model, name, batch)[row], rtol=1e-5, atol=1e-6)
    # patch logits only when every sample's adapter has a vote readout
    model.add_adapter("votes", tiny_config(box_readout="vote"))
    model.add_adapter("votes2", tiny_config(box_readout="vote", vote_hops=2))
    with torch.no_grad():
        voting = model(**{k: batch[k] for k in INPUTS}, adapter_names=["votes", "votes2", "votes2", "votes"])
        partly = model(**{k: batch[k] for k in INPUTS}, adapter_names=["votes", "default", "votes", "votes"])
    assert voting.patch_logits is not None and partly.patch_logits is None
    model.set_adapter("votes2")
    with torch.no_grad():
        alone = model(**{k: batch[k] for k in INPUTS}).patch_logits
    model.set_adapter("default")
    torch.testing.assert_close(voting.patch_logits[1:3], alone[1:3], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one adapter name per sample"):
        model(**{k: batch[k] for k in INPUTS}, adapter_names=["default"])
    with pytest.raises(ValueError, match="for inference"):
        model(**batch, adapter_names=names)
    with pytest.raises(KeyError, match="No adapter named"):
        model(**{k: batch[k] for k in INPUTS}, adapter_names=["default", "x", "default", "default"])


def _processor(tmp_path: Path) -> RECProcessor:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "square", "blue"]) + "\n")
    return RECProcessor(BertTokenizer(str(vocab)), canvas_size=32, max_query_len=8)


def test_predict_and_evaluate_every_adapter_in_one_pass(tmp_path):
    from PIL import Image

    model = _model_with_adapters()
    model.processor = _processor(tmp_path)
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 40), (10, 10, 200))]
    texts = ["red square", "blue square"]
    every = model.predict(images, texts, adapters="all")
    assert list(every) == ["default", "wide", "deep"]
    for name, boxes in every.items():
        model.set_adapter(name)
        torch.testing.assert_close(boxes, predict_boxes(model, images, texts), rtol=0, atol=0)
    model.set_adapter("default")
    assert torch.equal(model.predict(images, texts), every["default"])
    data = [{"image": image, "expression": text, "box": [2, 2, 20, 20]} for image, text in zip(images, texts)]
    results = evaluate(model, None, {"val": data}, progress=False, adapter_names="all", save_predictions=True)
    assert set(results["adapters"]) == {"default", "wide", "deep"}
    assert results["metrics"] == results["adapters"]["default"]["metrics"]
    for name in ("wide", "deep"):
        model.set_adapter(name)
        alone = evaluate(model, None, {"val": data}, progress=False, save_predictions=True)
        assert alone["metrics"] == results["adapters"][name]["metrics"]
        assert alone["predictions"] == results["adapters"][name]["predictions"]


def test_save_in_subfolders_and_load_adapter(tmp_path):
    model = _model_with_adapters()
    model.set_adapter("wide")  # the default adapter still goes to the root whichever is active
    model.save_pretrained(tmp_path)
    assert {"m2ist_config.json", WEIGHTS_NAME, "README.md", "wide", "deep"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "wide" / "m2ist_config.json").read_text())["bottleneck"] == 16
    with safe_open(tmp_path / "deep" / WEIGHTS_NAME, "pt") as f:
        names = f.keys()
    assert names and all(k.startswith(("side.", "head.")) for k in names)
    model.set_adapter("default")
    # the root is an ordinary single adapter: from_pretrained loads it as before
    again = SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model).eval()
    assert again.list_adapters() == ["default"]
    batch = make_batch(batch=2)
    inputs = {k: batch[k] for k in INPUTS}
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).pred_boxes, model(**inputs).pred_boxes, rtol=0, atol=0)
    for name in ("wide", "deep"):
        again.load_adapter(tmp_path, name, subfolder=name)
        assert not again.inactive_adapters[name].training
    with torch.no_grad():
        mine, theirs = model.forward_all_adapters(**inputs), again.forward_all_adapters(**inputs)
    for name in ("default", "wide", "deep"):
        torch.testing.assert_close(theirs[name].pred_boxes, mine[name].pred_boxes, rtol=0, atol=0)
    # a failed load leaves nothing behind
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "m2ist_config.json").write_text((tmp_path / "wide" / "m2ist_config.json").read_text())
    (tmp_path / "broken" / WEIGHTS_NAME).write_bytes((tmp_path / "deep" / WEIGHTS_NAME).read_bytes())
    with pytest.raises(ValueError, match="does not fit"):
        again.load_adapter(tmp_path, "broken", subfolder="broken")
    assert "broken" not in again.list_adapters()
    # another tower is refused
    other = get_side_tuned_model(vision_tower("detr"), text_tower("bert"), tiny_config())
    with pytest.raises(ValueError, match="other towers"):
        other.load_adapter(tmp_path, "wide", subfolder="wide")


def test_push_and_pull_every_adapter(hub: LocalHub, tmp_path: Path):
    model = _model_with_adapters()
    model.push_to_hub("m2ist-test/multi", endpoint=hub.url)
    files = set(hub.files("m2ist-test/multi"))
    assert {WEIGHTS_NAME, f"wide/{WEIGHTS_NAME}", "deep/m2ist_config.json"} <= files
    again = SideTunedModel.from_pretrained("m2ist-test/multi", model.vision_model, model.text_model,
                                           endpoint=hub.url, cache_dir=tmp_path / "hub")
    again.load_adapter("m2ist-test/multi", "deep", subfolder="deep", endpoint=hub.url, cache_dir=tmp_path / "hub")
    batch = make_batch(batch=2)
    inputs = {k: batch[k] for k in INPUTS}
    with torch.no_grad():
        torch.testing.assert_close(again.eval().forward_all_adapters(**inputs)["deep"].pred_boxes,
                                   _alone(model, "deep", batch), rtol=0, atol=0)


def test_head_attention_is_multihead_attention():
    """The head's fused attention computes what nn.MultiheadAttention does with the same parameters."""
    from m2ist.head import fused_attention

    attention = torch.nn.MultiheadAttention(32, 4, dropout=0.1, batch_first=True).eval()
    _perturb(attention, 0.1)
    x = torch.randn(3, 7, 32)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        expected, _ = attention(x, x + 1, x, key_padding_mask=padding, need_weights=False)
        torch.testing.assert_close(fused_attention(attention, x, x + 1, x, padding), expected, rtol=1e-5, atol=1e-6)
    attention.train()  # dropout is applied in training, not in eval
    assert not torch.allclose(fused_attention(attention, x, x, x, padding), expected, atol=1e-3)


def test_a_full_save_warns_of_the_subfolders_of_adapters_it_no_longer_has(tmp_path):
    """After delete_adapter, saving into the same folder kept the deleted adapter's subfolder without a word, and
    load_adapter still loaded it from there; the save keeps it (not its file) but now says so."""
    model = _model_with_adapters()
    model.save_pretrained(tmp_path)
    model.delete_adapter("deep")
    with pytest.warns(UserWarning, match=r"keeps the adapter subfolder\(s\) \['deep'\].*delete_adapter"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "deep" / WEIGHTS_NAME).is_file() and (tmp_path / "wide" / WEIGHTS_NAME).is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the selected adapter is written: nothing to say
        model.save_pretrained(tmp_path, selected_adapters=["wide"])
