"""Hostile and careless use of the tower cache and of the evidence commands (round 3): a disk cache read again by
another process, images told apart by the pixels the processor reads, a cache that follows its towers, read-only
shared caches, tower_cache values that read as modes, and demo / compare / bench outputs checked before any work."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

import m2ist.cache as cache_module
from m2ist.cache import TowerCacheCollator, TowerFeatureCache, cache_keys, check_tower_cache
from m2ist.cli import main
from m2ist.data.collator import RECCollator
from m2ist.evidence.outputs import check_batch_size, check_outputs, is_picture, write_picture
from tests.ddp_worker import make_model, make_processor
from tests.test_cache import shared_image_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tmp_path: Path, items: list) -> dict:
    return TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))(items)


# ---------------------------------------------------------------------------------------------- the cache
def test_a_disk_cache_is_read_again_by_another_process(tmp_path):
    """The fingerprint once held repr(tap spec), whose functions print their address: every process (a resumed
    run, a later run, another rank) got another folder and refilled it. Another process is simulated by the same
    spec holding a copy of its function (same name, another address)."""
    data = shared_image_dataset(2)
    model = make_model(seed=0)
    batch = _batch(tmp_path, [data[i] for i in range(4)])
    TowerFeatureCache(model, tmp_path / "cache", "float32").features(batch)
    tower = model.vision_tower
    function = tower.spec.num_prefix_tokens
    twin = types.FunctionType(function.__code__, function.__globals__, function.__name__, function.__defaults__)
    twin.__qualname__ = function.__qualname__
    tower.spec = dataclasses.replace(tower.spec, num_prefix_tokens=twin)
    again = TowerFeatureCache(model, tmp_path / "cache", "float32")
    again.features(batch)
    assert again.stats["vision_misses"] == 0 and again.stats["text_misses"] == 0
    assert len(list((tmp_path / "cache").glob("vision-*"))) == 1
    assert " at 0x" not in again.records["vision"].fingerprint["tap_spec"]


def test_palette_images_are_told_apart_by_their_colours(tmp_path):
    """Two palette images with the same indices and other palettes (or one whose palette was changed in place)
    are other pictures: never built from what was remembered of the first."""
    base = Image.new("P", (40, 32), 0)
    base.paste(1, (5, 5, 20, 20))
    red, blue = base.copy(), base.copy()
    red.putpalette([128, 128, 128, 220, 30, 30] + [0] * 762)
    blue.putpalette([128, 128, 128, 30, 30, 220] + [0] * 762)
    assert red.tobytes() == blue.tobytes()
    processor = make_processor(tmp_path / "tok")
    collate = TowerCacheCollator(RECCollator(processor, train=True))
    collate.cache = TowerFeatureCache(make_model(seed=0), None, "float32")
    item = {"expression": "the square", "box": (5, 5, 20, 20)}
    collate.cache.features(collate([{**item, "image": red}]))
    batch = collate([{**item, "image": blue}])
    assert "pixel_values" in batch
    assert batch["vision_cache_keys"] == cache_keys(RECCollator(processor, train=True)([{**item, "image": blue}]), "vision")
    red.putpalette([128, 128, 128, 30, 220, 30] + [0] * 762)  # the same object, recoloured in place
    assert "pixel_values" in collate([{**item, "image": red}])


def test_the_cache_follows_its_towers_when_they_change(tmp_path):
    """Cast between two runs of one trainer, or given other weights, the towers compute other features: they are
    stored in (and read from) the new fingerprint's folder, never added to the old one's."""
    data = shared_image_dataset(4)
    model = make_model(seed=0)
    first, second = _batch(tmp_path, [data[i] for i in range(4)]), _batch(tmp_path, [data[i] for i in range(4, 8)])
    cache = TowerFeatureCache(model, tmp_path / "cache", "float32")
    cache.features(first)
    float32_folder = cache.records["vision"].folder
    model.set_backbone_dtype("bfloat16")
    assert not cache.holds("vision", first["vision_cache_keys"])  # float32 records: not the towers' features now
    got = cache.features(second)
    folder = cache.records["vision"].folder
    assert folder != float32_folder
    assert json.loads((folder / "manifest.json").read_text())["fingerprint"]["tower_dtype"] == "bfloat16"
    assert len((float32_folder / "index.0.txt").read_text().splitlines()) == 2  # images 0 and 1 only
    fresh = TowerFeatureCache(model, None, "float32").features(second)
    assert torch.equal(got.vision.tokens, fresh.vision.tokens)
    with torch.no_grad():  # weights changed in place (load_state_dict, an edit)
        next(model.vision_model.parameters()).add_(0.5)
    cache.features(second)
    assert cache.records["vision"].folder not in (folder, float32_folder)
    next(model.vision_model.parameters()).requires_grad_(True)  # a trained tower: no cache can hold it
    with pytest.raises(ValueError, match="require grad"):
        cache.features(second)


def _read_only(monkeypatch, folder: Path, files: tuple[str, ...] = ()) -> None:
    """Make ``folder`` (or only the ``files`` in it) behave as on a read-only mount, for root too."""
    folder = str(folder)

    def covered(path) -> bool:
        path = os.fspath(path)
        return path.startswith(folder) and (not files or os.path.basename(path) in files)

    real_access, real_open, real_os_open, real_mkdir = os.access, open, os.open, os.mkdir
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if covered(path) and mode & os.W_OK
                        else real_access(path, mode, **kw))

    def os_open(path, flags, *args, **kwargs):
        if covered(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_os_open(path, flags, *args, **kwargs)

    def builtin_open(path, mode="r", *args, **kwargs):
        if covered(path) and any(flag in mode for flag in "wa+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_open(path, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if covered(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(cache_module, "open", builtin_open, raising=False)


def test_a_read_only_shared_cache_is_read_and_new_records_stay_in_ram(tmp_path, monkeypatch):
    data = shared_image_dataset(4)
    model = make_model(seed=0)
    first, second = _batch(tmp_path, [data[i] for i in range(4)]), _batch(tmp_path, [data[i] for i in range(4, 8)])
    filled = TowerFeatureCache(model, tmp_path / "shared", "float32")
    expected = filled.features(first)
    del filled
    listing = sorted(str(p) for p in (tmp_path / "shared").rglob("*"))
    with monkeypatch.context() as patch:
        _read_only(patch, tmp_path / "shared")
        reader = TowerFeatureCache(model, tmp_path / "shared", "float32")
        assert torch.equal(reader.features(first).vision.tokens, expected.vision.tokens)
        assert reader.stats["vision_misses"] == 0
        got = reader.features(second)  # new images: computed, kept in RAM
        assert torch.equal(got.vision.tokens, TowerFeatureCache(model, None, "float32").features(second).vision.tokens)
        assert reader.stats["vision_records"] == 4
        with pytest.raises(OSError, match="cannot be created"):  # no folder for these settings there
            TowerFeatureCache(model, tmp_path / "shared", "bfloat16")
    assert sorted(str(p) for p in (tmp_path / "shared").rglob("*")) == listing  # nothing written
    # a shard another user wrote (its files not ours to write) is read, and this writer takes the next one
    folder = next((tmp_path / "shared").glob("vision-*"))
    with monkeypatch.context() as patch:
        _read_only(patch, folder, files=("index.0.txt", "rows.0.bin", "lock.0"))
        writer = TowerFeatureCache(model, tmp_path / "shared", "float32")
        writer.features(first)
        assert writer.records["vision"].store.rank == 1 and writer.stats["vision_misses"] == 0


# ---------------------------------------------------------------------------------------------- flags and outputs
@pytest.mark.parametrize("value", ["Memory", "DISK", "off ", " memory", "none", "false", "RAM"])
def test_tower_cache_values_that_read_as_modes_are_refused(value, capsys):
    with pytest.raises(ValueError, match="tower_cache"):
        check_tower_cache(value)
    assert main(["demo", "--tower-cache", value]) == 2
    assert "--tower-cache" in capsys.readouterr().err
    assert check_tower_cache("./none") == "./none" and check_tower_cache("memory") == "memory"


@pytest.mark.parametrize("command", ["demo", "compare"])
def test_seeds_numpy_cannot_take_are_refused_at_once(command, capsys):
    for seed in ("-1", str(2**32)):
        assert main([command, "--seed", seed]) == 2
        assert "--seed" in capsys.readouterr().err


def test_evidence_outputs_never_replace_what_they_do_not_own(tmp_path, monkeypatch, capsys):
    import m2ist.evidence.bench as bench
    import m2ist.evidence.compare as compare
    import m2ist.evidence.demo as demo

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the outputs were checked")

    monkeypatch.setattr(compare, "_isolated", no_work)
    monkeypatch.setattr(bench, "_run_isolated", no_work)
    monkeypatch.setattr(demo, "prepare", no_work)
    data = tmp_path / "train.json"
    data.write_text('{"images": []}')
    picture = tmp_path / "cat.png"
    Image.new("RGB", (4, 4)).save(picture)
    for argv in (["compare", "--tiny", "--output", str(tmp_path / "r.png")],  # the plot would replace the results
                 ["compare", "--tiny", "--output", str(data)],  # a data file
                 ["compare", "--tiny", "--output", str(tmp_path / "cat.json")],  # its plot: someone's cat.png
                 ["bench", "--tiny", "--output", str(data)]):
        assert main(argv) == 2, argv
        assert "--output" in capsys.readouterr().err
    assert data.read_text() == '{"images": []}' and not (tmp_path / "r.png").exists()
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "results.json").write_text('{"notes": 1}')
    assert main(["demo", "--tiny", "--output-dir", str(folder)]) == 2
    (folder / "results.json").unlink()
    Image.new("RGB", (4, 4)).save(folder / "predictions.png")
    assert main(["demo", "--tiny", "--output-dir", str(folder)]) == 2
    assert main(["demo", "--tiny", "--output-dir", str(picture)]) == 2  # a file
    capsys.readouterr()
    # earlier outputs of the commands are replaced: reports by their keys, pictures by their PNG text
    report = tmp_path / "compare.json"
    report.write_text(json.dumps({"device": "cpu", "steps": 1, "batch_size": 4, "seed": 0, "methods": []}))
    check_outputs(report, compare.REPORT_KEYS, "--output", report.with_suffix(".png"))
    drawn = write_picture(tmp_path / "drawn.png", lambda tmp, metadata: Image.new("RGB", (4, 4)).save(
        tmp, format="PNG", pnginfo=_png_text(metadata)))
    assert is_picture(drawn) and not is_picture(picture)
    check_outputs(tmp_path / "other.json", compare.REPORT_KEYS, "--output", drawn)


def _png_text(metadata: dict[str, str]):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    return info


def test_a_batch_larger_than_the_training_set_is_refused(tmp_path, monkeypatch, capsys):
    import m2ist.evidence.compare as compare

    monkeypatch.setattr(compare, "_isolated", lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started")))
    with pytest.raises(ValueError, match="larger than the training set"):
        check_batch_size(64, 48, tiny=True)
    check_batch_size(48, 48, tiny=True)
    assert main(["compare", "--tiny", "--batch-size", "1000", "--work-dir", str(tmp_path / "w")]) == 2
    assert "--batch-size 1000 is larger than the training set" in capsys.readouterr().err
