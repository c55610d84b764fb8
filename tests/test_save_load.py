"""save_pretrained / from_pretrained: side and head tensors only, strict loading, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from m2ist import SideTunedModel, get_side_tuned_model
from m2ist.save_and_load import WEIGHTS_NAME
from tests.tiny import text_tower, tiny_config, vision_tower


def _trained_model(vision_family="detr", text_family="bert", **config):
    model = get_side_tuned_model(vision_tower(vision_family), text_tower(text_family), tiny_config(**config))
    with torch.no_grad():  # move every trainable tensor off its initial value
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_round_trip_gives_identical_outputs(tmp_path, batch):
    model = _trained_model()
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"m2ist_config.json", WEIGHTS_NAME, "README.md"}
    again = SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)
    again.eval()
    torch.testing.assert_close(again(**batch).pred_boxes, model(**batch).pred_boxes, rtol=0, atol=0)
    assert again.config == model.config


def test_weights_file_holds_no_tower_tensor(tmp_path):
    model = _trained_model()
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert keys == set(model.trainable_state_dict())
    assert all(k.startswith(("side.", "head.")) for k in keys)
    tower_numel = sum(p.numel() for p in model.vision_model.parameters())
    saved_numel = sum(model.state_dict()[k].numel() for k in keys)
    assert saved_numel == model.parameter_counts()["side"] + model.parameter_counts()["head"] < tower_numel * 10


def test_model_card_metadata(tmp_path):
    from huggingface_hub import ModelCard

    model = _trained_model()
    model.config.vision_model_name_or_path = "facebook/detr-resnet-50"
    model.config.text_model_name_or_path = "bert-base-uncased"
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "m2ist"
    assert card.data.base_model == ["facebook/detr-resnet-50", "bert-base-uncased"]
    assert "side-tuning" in card.data.tags


def test_towers_reloaded_by_recorded_name(tmp_path, batch):
    """Without towers passed in, from_pretrained re-loads them by the names recorded in the config."""
    model = _trained_model("vit", "bert")
    model.vision_model.save_pretrained(tmp_path / "vision")
    model.text_model.save_pretrained(tmp_path / "text")
    model.config.vision_model_name_or_path = str(tmp_path / "vision")
    model.config.text_model_name_or_path = str(tmp_path / "text")
    model.save_pretrained(tmp_path / "adapter")
    again = SideTunedModel.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(again(**batch).pred_boxes, model(**batch).pred_boxes)
    assert again.config.vision_model_name_or_path == str(tmp_path / "vision")


def test_wrong_tower_is_refused_with_the_difference(tmp_path):
    model = _trained_model("vit", "bert")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"other towers: vision_model_type: saved 'vit', given 'deit'"):
        SideTunedModel.from_pretrained(tmp_path, vision_model=vision_tower("deit"), text_model=text_tower("bert"))


def test_other_width_is_refused(tmp_path):
    import transformers as T

    model = _trained_model("vit", "bert")
    model.save_pretrained(tmp_path)
    wider = T.BertModel(T.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100))
    with pytest.raises(ValueError, match="text_width: saved 32, given 48"):
        SideTunedModel.from_pretrained(tmp_path, vision_model=vision_tower("vit"), text_model=wider)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _trained_model()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state.pop("head.reg_token.weight")
    state["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(2)
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"missing tensors: head\.reg_token\.weight.*unexpected tensors: vision_model"):
        SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)


def test_corrupted_and_truncated_files_are_reported_not_half_loaded(tmp_path):
    model = _trained_model()
    model.save_pretrained(tmp_path)
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    fresh = get_side_tuned_model(vision_tower("detr"), text_tower("bert"), tiny_config())
    before = {k: v.clone() for k, v in fresh.trainable_state_dict().items()}
    for broken in (data[: len(data) // 2], b"\x00" * 64):
        (tmp_path / WEIGHTS_NAME).write_bytes(broken)
        with pytest.raises(ValueError, match="corrupted or truncated"):
            SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)
    from m2ist.save_and_load import load_trainable_state

    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_trainable_state(fresh, tmp_path / WEIGHTS_NAME)
    assert all(torch.equal(before[k], v) for k, v in fresh.trainable_state_dict().items())


def test_missing_files_are_named(tmp_path):
    model = _trained_model()
    model.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)


def test_saving_is_atomic_over_an_existing_checkpoint(tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint intact."""
    import m2ist.save_and_load as sl

    model = _trained_model()
    model.save_pretrained(tmp_path)
    good = (tmp_path / WEIGHTS_NAME).read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sl, "save_safetensors_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert [p.name for p in tmp_path.parent.iterdir() if p.name.endswith(".m2ist-saving")] == []


def test_config_records_the_towers(tmp_path):
    model = _trained_model("swin", "distilbert")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "m2ist_config.json").read_text())
    assert saved["vision_model_type"] == "swin" and saved["text_model_type"] == "distilbert"
    assert saved["vision_depth"] == 2 and saved["text_depth"] == 2
    assert saved["num_vision_tokens"] == model.head.num_vision_tokens


def test_processor_is_saved_and_restored_with_the_adapter(tmp_path, batch):
    from transformers import BertTokenizer

    from m2ist import RECProcessor

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "square"]) + "\n")
    model = _trained_model()
    model.processor = RECProcessor(BertTokenizer(str(vocab)), canvas_size=32, max_query_len=8)
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "m2ist_processor.json").exists()
    again = SideTunedModel.from_pretrained(tmp_path / "adapter", vision_model=model.vision_model,
                                           text_model=model.text_model)
    assert again.processor is not None
    assert again.processor.canvas_size == 32 and again.processor.max_query_len == 8
    image = Image.new("RGB", (20, 10))
    assert again.processor(image, "Red square")["input_ids"].tolist() == \
        model.processor(image, "Red square")["input_ids"].tolist()
