"""Saving, loading and the Hub under hostile or careless use (round 2): folders and repos that hold someone else's
files, links and mount points, revisions that cannot be honoured, damaged copies in the Hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi

from m2ist.hub import push_folder_to_hub, resolve_pretrained
from m2ist.save_and_load import WEIGHTS_NAME, read_safetensors, write_safetensors
from tests.ddp_worker import make_model
from tests.hub_server import LocalHub, hub_fixture

hub = hub_fixture(name="hub", max_lifetime_s=120)
TOKENIZER = {"tokenizer.json": "{}", "tokenizer_config.json": "{}", "preprocessor_config.json": "{}"}


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def _adapter_folder(folder: Path) -> Path:
    """A folder that looks like a saved adapter (config and weights) to push."""
    _write(folder, {"m2ist_config.json": "{}"})
    write_safetensors(folder / WEIGHTS_NAME, {"side.w": torch.ones(2)})
    return folder


# ---------------------------------------------------------------------------------------------- saving
def test_save_refuses_a_folder_holding_another_model(tmp_path: Path) -> None:
    tower = tmp_path / "bert"
    _write(tower, {"config.json": "{}", "model.safetensors": "weights", "README.md": "# my bert\n", **TOKENIZER})
    before = {p.name: p.read_bytes() for p in tower.iterdir()}
    with pytest.raises(ValueError, match=r"holds another model \(model.safetensors\).*folder of its own"):
        make_model().save_pretrained(tower)
    assert {p.name: p.read_bytes() for p in tower.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]  # no temporary folder left


def test_save_keeps_tokenizer_files_no_m2ist_processor_wrote(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    _write(folder, TOKENIZER)  # the user's own tokenizer and image processor, saved there first
    make_model().save_pretrained(folder)  # an adapter without a processor
    assert {name: (folder / name).read_text() for name in TOKENIZER} == TOKENIZER
    _write(folder, {"m2ist_processor.json": "{}"})  # now they are an m2ist processor's: a new save replaces them
    make_model().save_pretrained(folder)
    assert not any((folder / name).exists() for name in [*TOKENIZER, "m2ist_processor.json"])


def test_save_through_a_link_replaces_the_folder_it_points_to(tmp_path: Path) -> None:
    real = tmp_path / "runs" / "exp1"
    make_model(seed=0).save_pretrained(real)
    (real / "notes.txt").write_text("mine")
    (tmp_path / "latest").symlink_to(real)
    model = make_model(seed=1)
    model.save_pretrained(tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink()
    saved = read_safetensors(real / WEIGHTS_NAME)
    assert all(torch.equal(saved[k], v) for k, v in model.trainable_state_dict().items())
    assert (real / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "runs"]


def test_save_into_a_mount_point_is_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    volume = tmp_path / "out"
    _write(volume, {"notes.txt": "mine"})
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == volume or real_ismount(p))
    with pytest.raises(ValueError, match=r"mount point.*Save into a folder inside it, e\.g\. .*out/adapter"):
        make_model().save_pretrained(volume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in volume.iterdir()) == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- the Hub
def test_push_refuses_a_repo_holding_another_model(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    api.create_repo("org/bert")
    _write(tmp_path / "bert", {"config.json": "{}", "model.safetensors": "w", **TOKENIZER})
    api.upload_folder(repo_id="org/bert", folder_path=tmp_path / "bert")
    before = dict(hub.files("org/bert"))
    with pytest.raises(ValueError, match=r"'org/bert': the repo holds another model \(model.safetensors\)"):
        push_folder_to_hub(_adapter_folder(tmp_path / "adapter"), "org/bert", endpoint=hub.url)
    assert hub.files("org/bert") == before


def test_push_keeps_tokenizer_files_no_m2ist_push_wrote(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    api.create_repo("org/ad")
    _write(tmp_path / "theirs", TOKENIZER)
    api.upload_folder(repo_id="org/ad", folder_path=tmp_path / "theirs")
    push_folder_to_hub(_adapter_folder(tmp_path / "adapter"), "org/ad", endpoint=hub.url)
    assert set(TOKENIZER) <= set(hub.files("org/ad"))
    _write(tmp_path / "ours", {"m2ist_processor.json": "{}"})  # an m2ist processor's files: a push replaces them
    api.upload_folder(repo_id="org/ad", folder_path=tmp_path / "ours")
    push_folder_to_hub(tmp_path / "adapter", "org/ad", endpoint=hub.url)
    assert not set(TOKENIZER) & set(hub.files("org/ad"))


# ---------------------------------------------------------------------------------------------- loading
def test_revision_with_a_local_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_model().save_pretrained("org/ad")  # saved under the repo id before a push: the usual layout
    with pytest.raises(ValueError, match=r"'org/ad' is a local folder .* revision='v1' would be ignored"):
        resolve_pretrained("org/ad", filenames=["m2ist_config.json"], revision="v1")
    assert resolve_pretrained("org/ad", filenames=["m2ist_config.json"]) == Path("org/ad")


def test_load_adapter_refuses_a_subfolder_outside_the_folder(tmp_path: Path) -> None:
    model = make_model()
    model.save_pretrained(tmp_path / "other" / "x")
    model.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"subfolder='\.\./other/x' must be a relative path inside the folder"):
        model.load_adapter(tmp_path / "base", "z", subfolder="../other/x")
    assert model.list_adapters() == ["default"]
    with pytest.raises(ValueError, match=r"'\.\./other/x/m2ist_config.json' is not a path inside the folder"):
        resolve_pretrained(str(tmp_path / "base"), filenames=["../other/x/m2ist_config.json"])  # any caller


def test_a_damaged_copy_in_the_hub_cache_names_the_files_to_delete(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--ad"
    blob, snapshot = repo / "blobs" / "0123abcd", repo / "snapshots" / ("a" * 40)
    blob.parent.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    write_safetensors(blob, {"side.w": torch.ones(4)})
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    (snapshot / WEIGHTS_NAME).symlink_to(blob)
    with pytest.raises(ValueError, match=r"is damaged.*copy in the Hub cache.*delete .*the file it links to, "
                                         r".*blobs/0123abcd, then load again"):
        read_safetensors(snapshot / WEIGHTS_NAME)
    with pytest.raises(ValueError, match="Save or download it again"):  # a file of one's own: saved again
        read_safetensors(blob)
