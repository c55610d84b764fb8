"""Towers are re-loaded exactly: the recorded class, from the recorded repo at the recorded commit, through the
adapter's endpoint."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import torch
import transformers as T

from m2ist import M2ISTConfig, SideTunedModel, get_side_tuned_model
from m2ist.provenance import commit_of, tower_class
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import VOCAB, text_tower, tiny_config, vision_tower

hub = hub_fixture(name="hub", max_lifetime_s=120)
_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _save(model, folder: Path) -> str:
    model.save_pretrained(folder)
    return str(folder)


def test_tower_classes_are_rebuilt_by_name(tmp_path, batch):
    """CLIPVisionModel, CLIPTextModel and T5EncoderModel come back as themselves (AutoModel would not)."""
    vision = T.CLIPVisionModel(T.CLIPVisionConfig(**_LAYERS, image_size=32, patch_size=8))
    text = T.T5EncoderModel(T.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, vocab_size=VOCAB))
    vision.config._name_or_path = _save(vision, tmp_path / "vision")
    text.config._name_or_path = _save(text, tmp_path / "text")
    model = get_side_tuned_model(vision, text, tiny_config()).eval().requires_grad_(False)  # as loaded: same fast paths
    assert (model.config.vision_model_class, model.config.text_model_class) == ("CLIPVisionModel", "T5EncoderModel")
    model.save_pretrained(tmp_path / "adapter")
    again = SideTunedModel.from_pretrained(tmp_path / "adapter").eval()
    assert type(again.vision_model) is T.CLIPVisionModel and type(again.text_model) is T.T5EncoderModel
    torch.testing.assert_close(again(**batch).pred_boxes, model(**batch).pred_boxes, rtol=0, atol=0)


def test_clip_text_tower_reloads_as_its_class(tmp_path):
    text = T.CLIPTextModel(T.CLIPTextConfig(**_LAYERS, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2))
    text.config._name_or_path = _save(text, tmp_path / "text")
    vision = vision_tower("vit")
    vision.config._name_or_path = _save(vision, tmp_path / "vision")
    get_side_tuned_model(vision, text, tiny_config()).save_pretrained(tmp_path / "adapter")
    again = SideTunedModel.from_pretrained(tmp_path / "adapter")
    assert type(again.text_model) is T.CLIPTextModel and type(again.vision_model) is T.ViTModel


def test_dual_encoder_is_unwrapped_and_recorded_as_passed(batch):
    clip = T.CLIPModel(T.CLIPConfig(vision_config=dict(**_LAYERS, image_size=32, patch_size=8),
                                    text_config=dict(**_LAYERS, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2),
                                    projection_dim=16))
    model = get_side_tuned_model(clip, text_tower("bert"), tiny_config())
    assert model.vision_model is clip.vision_model and model.config.vision_model_class == "CLIPModel"
    model(**batch).loss.backward()


def test_tower_class_lookup_is_limited_to_transformers_models():
    assert tower_class("ViTModel") is T.ViTModel
    assert tower_class("os") is T.AutoModel and tower_class("AutoConfig") is T.AutoModel
    assert tower_class(None) is T.AutoModel


def test_commit_is_read_from_a_snapshot_path(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert commit_of(f"/cache/models--org--tower/snapshots/{sha}") == sha
    assert commit_of(str(tmp_path)) is None  # a plain folder has no commit


def test_reload_pins_the_recorded_commit_through_the_endpoint(hub: LocalHub, tmp_path: Path, batch):
    """The tower repo moves on after the adapter was trained: the reload still gets the commit it was built on."""
    from huggingface_hub import snapshot_download

    def files(model) -> dict[str, bytes]:
        folder = tmp_path / f"upload{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    torch.manual_seed(1)
    old, new = vision_tower("vit"), vision_tower("vit")
    hub.add_repo("org/tiny-vit", files(old))
    first = hub.repo("org/tiny-vit").refs["main"]
    cache = tmp_path / "hub_cache"
    folder = snapshot_download("org/tiny-vit", endpoint=hub.url, cache_dir=cache)
    second = hub.add_commit("org/tiny-vit", files(new), title="a newer tower")
    assert second != first
    vision = T.ViTModel.from_pretrained(folder)
    text = text_tower("bert")
    text.config._name_or_path = _save(text, tmp_path / "text")
    model = get_side_tuned_model(vision, text, tiny_config()).eval().requires_grad_(False)  # as loaded: same fast paths
    assert (model.config.vision_model_name_or_path, model.config.vision_revision) == ("org/tiny-vit", first)
    model.save_pretrained(tmp_path / "adapter")

    again = SideTunedModel.from_pretrained(tmp_path / "adapter", endpoint=hub.url, cache_dir=tmp_path / "other_cache")
    torch.testing.assert_close(again.eval()(**batch).pred_boxes, model(**batch).pred_boxes, rtol=0, atol=0)
    assert again.config.vision_revision == first
    assert (tmp_path / "other_cache" / "models--org--tiny-vit" / "snapshots" / first).is_dir()


def test_old_config_without_class_and_commit_still_loads(tmp_path, batch):
    vision, text = vision_tower("vit"), text_tower("bert")
    vision.config._name_or_path = _save(vision, tmp_path / "vision")
    text.config._name_or_path = _save(text, tmp_path / "text")
    model = get_side_tuned_model(vision, text, tiny_config()).eval().requires_grad_(False)  # as loaded: same fast paths
    model.save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "m2ist_config.json"
    import json

    values = json.loads(path.read_text())
    for key in ("vision_model_class", "text_model_class", "vision_revision", "text_revision"):
        values.pop(key)
    path.write_text(json.dumps(values))
    assert M2ISTConfig.from_pretrained(tmp_path / "adapter").vision_model_class is None
    again = SideTunedModel.from_pretrained(tmp_path / "adapter").eval()
    torch.testing.assert_close(again(**batch).pred_boxes, model(**batch).pred_boxes, rtol=0, atol=0)


def test_the_commit_recorded_is_the_one_whose_weights_were_loaded(hub: LocalHub, tmp_path: Path, monkeypatch, caplog):
    """A tower loaded by Hub id at an older revision, after a newer main was fetched: the adapter records the
    older commit (the weights tell the cached revisions apart), never the cache's main. Loaded through another
    cache, the commit cannot be told: none is recorded, with a warning saying how to pin it."""
    from huggingface_hub import constants, snapshot_download

    def files(model, name: str) -> dict[str, bytes]:
        model.save_pretrained(tmp_path / name)
        return {p.name: p.read_bytes() for p in (tmp_path / name).iterdir()}

    torch.manual_seed(1)
    old, new = vision_tower("vit"), vision_tower("vit")
    hub.add_repo("org/moving-vit", files(old, "u0"))
    first = hub.repo("org/moving-vit").refs["main"]
    cache = tmp_path / "hub_cache"
    snapshot_download("org/moving-vit", endpoint=hub.url, cache_dir=cache)
    second = hub.add_commit("org/moving-vit", files(new, "u1"), title="a newer tower")
    snapshot_download("org/moving-vit", endpoint=hub.url, cache_dir=cache)  # the cache's main is now `second`
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for revision in (first, second):
        vision = T.ViTModel.from_pretrained("org/moving-vit", revision=revision, cache_dir=cache, local_files_only=True)
        assert vision.config._name_or_path == "org/moving-vit"
        model = get_side_tuned_model(vision, text_tower("bert"), tiny_config())
        assert model.config.vision_revision == revision

    third = hub.add_commit("org/moving-vit", files(vision_tower("vit"), "u2"), title="fetched into another cache")
    elsewhere = tmp_path / "another_cache"
    snapshot_download("org/moving-vit", endpoint=hub.url, cache_dir=elsewhere, revision=third)
    vision = T.ViTModel.from_pretrained("org/moving-vit", revision=third, cache_dir=elsewhere, local_files_only=True)
    with caplog.at_level("WARNING", logger="m2ist.provenance"):
        model = get_side_tuned_model(vision, text_tower("bert"), tiny_config())
    assert model.config.vision_revision is None
    assert "from which commit cannot be told: none of the 2 revisions" in caplog.text
    assert "vision_revision='<commit>'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="m2ist.provenance"):  # pinned by the user: nothing to warn about
        pinned = get_side_tuned_model(vision, text_tower("bert"), tiny_config(vision_revision=third))
    assert pinned.config.vision_revision == third and "cannot be told" not in caplog.text


def test_a_reloaded_tower_comes_back_in_the_dtype_it_was_trained_in(tmp_path, batch):
    """A tower stored in bfloat16 and trained in float32 (backbone_dtype None): transformers 5 would reload it in
    its stored bfloat16; the adapter records float32 and the reload gives the same boxes."""
    vision_tower("vit").to(torch.bfloat16).save_pretrained(tmp_path / "vit")
    text_tower("bert").save_pretrained(tmp_path / "bert")
    vision = T.ViTModel.from_pretrained(tmp_path / "vit", dtype=torch.float32)
    model = get_side_tuned_model(vision, T.BertModel.from_pretrained(tmp_path / "bert"), tiny_config()).eval()
    assert (model.config.vision_dtype, model.config.text_dtype) == ("float32", "float32")
    model.save_pretrained(tmp_path / "adapter")
    again = SideTunedModel.from_pretrained(tmp_path / "adapter")
    assert again.vision_model.dtype == torch.float32
    torch.testing.assert_close(again(**batch).pred_boxes, model.requires_grad_(False)(**batch).pred_boxes, rtol=0, atol=0)


def test_an_adapter_given_another_tower_of_its_architecture_warns(tmp_path, caplog):
    """Same type, width and depth loads (a local copy of the tower is fine), but a tower by another name than
    the one recorded is named in a warning; the recorded tower itself, or no tower given, is silent."""
    torch.manual_seed(0)
    for name in ("vit_a", "vit_b"):
        vision_tower("vit").save_pretrained(tmp_path / name)
    text = text_tower("bert")
    text.config._name_or_path = _save(text, tmp_path / "text")
    vision = T.ViTModel.from_pretrained(tmp_path / "vit_a")
    get_side_tuned_model(vision, text, tiny_config()).save_pretrained(tmp_path / "adapter")
    for tower, warned in (("vit_b", True), ("vit_a", False), (None, False)):
        caplog.clear()
        given = T.ViTModel.from_pretrained(tmp_path / tower) if tower else None
        with caplog.at_level("WARNING", logger="m2ist.provenance"):
            SideTunedModel.from_pretrained(tmp_path / "adapter", vision_model=given)
        assert ("was trained on the vision tower" in caplog.text) is warned, tower
        if warned:
            assert str(tmp_path / "vit_a") in caplog.text and str(tmp_path / "vit_b") in caplog.text


def test_a_tower_loaded_from_a_relative_folder_reloads_from_any_working_directory(tmp_path, monkeypatch, batch):
    """``from_pretrained("towers/vit")`` found a local folder: the adapter records it absolute, so a reload run from
    another folder loads it again instead of asking the Hub for a repo called "towers/vit"."""
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    vision_tower("vit").save_pretrained(project / "towers" / "vit")
    text_tower("bert").save_pretrained(project / "towers" / "bert")
    monkeypatch.chdir(project)
    vision, text = T.AutoModel.from_pretrained("towers/vit"), T.AutoModel.from_pretrained("towers/bert")
    model = get_side_tuned_model(vision, text, tiny_config()).eval()
    assert model.config.vision_model_name_or_path == str(project.resolve() / "towers" / "vit")
    model.save_pretrained(project / "adapter")
    monkeypatch.chdir(elsewhere)
    def no_hub(**options):
        raise AssertionError(f"asked the Hub for {options['repo_id']!r}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    again = SideTunedModel.from_pretrained(project / "adapter").eval()
    torch.testing.assert_close(again(**batch).pred_boxes, model(**batch).pred_boxes, rtol=0, atol=0)
