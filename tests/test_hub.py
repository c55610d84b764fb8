"""Hub push / pull round trips against the loopback Hub server in `tests/hub_server.py`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from safetensors.numpy import load_file, save_file

from m2ist.hub import PretrainedNotFoundError, push_folder_to_hub, push_to_hub, resolve_pretrained
from tests.hub_server import LocalHub, hub_fixture, local_hub, online_client

REPO_ROOT = Path(__file__).resolve().parents[1]
REPO_ID = "m2ist-test/tiny-side-net"
FILES = ["m2ist_config.json", "m2ist_model.safetensors"]
README = "---\nlibrary_name: m2ist\ntags:\n- m2ist\n- referring-expression-comprehension\n---\n\n# Tiny side network\n"


hub = hub_fixture(name="hub", max_lifetime_s=120)


def write_checkpoint(folder: Path, *, scale: float) -> dict[str, bytes]:
    """A small save_pretrained-like folder: JSON config, safetensors weights, README with YAML front matter."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "m2ist_config.json").write_text(json.dumps({"side_dim": 8, "scale": scale}, indent=2))
    save_file({"side.weight": np.arange(12, dtype=np.float32).reshape(3, 4) * scale}, folder / "m2ist_model.safetensors")
    (folder / "README.md").write_text(README)
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_push_returns_commit_url_and_pull_gives_identical_bytes(hub: LocalHub, tmp_path: Path) -> None:
    pushed = write_checkpoint(tmp_path / "ckpt", scale=1.0)

    url = push_folder_to_hub(tmp_path / "ckpt", REPO_ID, commit_message="Add side network", endpoint=hub.url)

    head = hub.repo(REPO_ID).refs["main"]
    assert url == f"{hub.url}/{REPO_ID}/commit/{head}"
    assert url.oid == head
    assert {name: hub.files(REPO_ID)[name] for name in pushed} == pushed
    assert hub.repo(REPO_ID).commits[head].title == "Add side network"
    assert HfApi(endpoint=hub.url).model_info(REPO_ID).card_data.library_name == "m2ist"

    cache = tmp_path / "hf_home" / "hub"
    folder = resolve_pretrained(REPO_ID, filenames=[*FILES, "README.md"], cache_dir=cache, endpoint=hub.url)

    assert folder.is_relative_to(cache) and folder.name == head
    for name, data in pushed.items():
        assert (folder / name).read_bytes() == data
    weights = load_file(folder / "m2ist_model.safetensors")["side.weight"]
    np.testing.assert_array_equal(weights, np.arange(12, dtype=np.float32).reshape(3, 4))


def test_second_commit_is_what_the_next_pull_gets(hub: LocalHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_checkpoint(tmp_path / "v1", scale=1.0)
    first = push_folder_to_hub(tmp_path / "v1", REPO_ID, commit_message="v1", endpoint=hub.url)
    old_folder = resolve_pretrained(REPO_ID, filenames=FILES, cache_dir=cache, endpoint=hub.url)

    new = write_checkpoint(tmp_path / "v2", scale=2.0)
    second = push_folder_to_hub(tmp_path / "v2", REPO_ID, commit_message="v2", endpoint=hub.url)
    new_folder = resolve_pretrained(REPO_ID, filenames=FILES, cache_dir=cache, endpoint=hub.url)

    assert second.oid != first.oid and new_folder.name == second.oid
    for name in FILES:
        assert (new_folder / name).read_bytes() == new[name]
    assert json.loads((old_folder / "m2ist_config.json").read_text())["scale"] == 1.0
    pinned = resolve_pretrained(REPO_ID, filenames=FILES, revision=first.oid, cache_dir=cache, endpoint=hub.url)
    assert json.loads((pinned / "m2ist_config.json").read_text())["scale"] == 1.0


def test_all_files_come_from_one_commit_even_if_the_branch_moves_mid_download(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write_checkpoint(tmp_path / "v1", scale=1.0)
    push_folder_to_hub(tmp_path / "v1", REPO_ID, endpoint=hub.url)
    second = write_checkpoint(tmp_path / "v2", scale=2.0)
    answer_request = hub.handle

    def push_v2_once_main_is_resolved(method: str, path: str, headers: dict[str, str], body: bytes):
        answer = answer_request(method, path, headers, body)
        if method == "GET" and path.endswith(f"/{REPO_ID}/revision/main"):
            hub.add_commit(REPO_ID, second, title="v2 lands mid-download")
        return answer

    monkeypatch.setattr(hub, "handle", push_v2_once_main_is_resolved)
    folder = resolve_pretrained(REPO_ID, filenames=FILES, cache_dir=tmp_path / "cache", endpoint=hub.url)

    assert hub.repo(REPO_ID).commits[hub.repo(REPO_ID).refs["main"]].title == "v2 lands mid-download"
    for name in FILES:
        assert (folder / name).read_bytes() == first[name]


def test_unchanged_push_makes_no_new_commit(hub: LocalHub, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", scale=1.0)
    first = push_folder_to_hub(tmp_path / "ckpt", REPO_ID, endpoint=hub.url)
    again = push_folder_to_hub(tmp_path / "ckpt", REPO_ID, endpoint=hub.url)
    assert again.oid == first.oid
    assert len(hub.repo(REPO_ID).commits) == 2  # the repo's initial commit + ours


def test_push_to_hub_saves_into_a_temporary_folder(hub: LocalHub, tmp_path: Path) -> None:
    used: list[Path] = []

    def save_pretrained(folder: Path) -> None:
        used.append(folder)
        write_checkpoint(folder, scale=3.0)

    url = push_to_hub(save_pretrained, REPO_ID, commit_message="from save_fn", endpoint=hub.url)

    assert url.startswith(f"{hub.url}/{REPO_ID}/commit/")
    assert set(hub.files(REPO_ID)) == {".gitattributes", "README.md", *FILES}
    assert json.loads(hub.files(REPO_ID)["m2ist_config.json"])["scale"] == 3.0
    assert len(used) == 1 and not used[0].exists()


def test_push_to_a_branch_and_as_a_pull_request_leaves_main_alone(hub: LocalHub, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "main", scale=1.0)
    main = push_folder_to_hub(tmp_path / "main", REPO_ID, endpoint=hub.url)
    write_checkpoint(tmp_path / "dev", scale=5.0)

    push_folder_to_hub(tmp_path / "dev", REPO_ID, revision="experiment", endpoint=hub.url)
    pr = push_folder_to_hub(tmp_path / "dev", REPO_ID, create_pr=True, endpoint=hub.url)

    assert hub.repo(REPO_ID).refs["main"] == main.oid
    assert pr.pr_url == f"{hub.url}/{REPO_ID}/discussions/1"
    cache = tmp_path / "cache"
    for revision in ("experiment", "refs/pr/1"):
        folder = resolve_pretrained(REPO_ID, filenames=FILES, revision=revision, cache_dir=cache, endpoint=hub.url)
        assert json.loads((folder / "m2ist_config.json").read_text())["scale"] == 5.0
    with pytest.raises(ValueError, match="create_pr"):
        push_folder_to_hub(tmp_path / "dev", REPO_ID, create_pr=True, revision="experiment", endpoint=hub.url)


def test_push_checks_the_folder(hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="not a directory"):
        push_folder_to_hub(tmp_path / "missing", REPO_ID, endpoint=hub.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        push_folder_to_hub(tmp_path / "empty", REPO_ID, endpoint=hub.url)
    assert hub.request_log == []


def test_write_token_and_private_repo(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", scale=1.0)
    with online_client(), LocalHub(token="hf_secret") as hub:
        with pytest.raises(PermissionError, match="hf auth login"):
            push_folder_to_hub(tmp_path / "ckpt", REPO_ID, token="hf_wrong", endpoint=hub.url)

        push_folder_to_hub(tmp_path / "ckpt", REPO_ID, private=True, token="hf_secret", endpoint=hub.url)

        assert hub.repo(REPO_ID).private
        folder = resolve_pretrained(REPO_ID, filenames=FILES, token="hf_secret", cache_dir=tmp_path / "cache", endpoint=hub.url)
        assert (folder / "m2ist_config.json").is_file()
        with pytest.raises(PretrainedNotFoundError, match="if the repo is private, log in"):
            resolve_pretrained(REPO_ID, filenames=FILES, token=False, cache_dir=tmp_path / "other", endpoint=hub.url)


def test_unknown_repo_gives_a_clear_error(hub: LocalHub, tmp_path: Path) -> None:
    with pytest.raises(PretrainedNotFoundError, match="No model repo 'm2ist-test/no-such-model'") as info:
        resolve_pretrained("m2ist-test/no-such-model", filenames=FILES, cache_dir=tmp_path, endpoint=hub.url)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)
    assert "namespace/name" in str(info.value) and "local folder" in str(info.value)


def test_missing_file_and_revision_errors_say_what_the_repo_has(hub: LocalHub, tmp_path: Path) -> None:
    hub.add_repo(REPO_ID, {"config.json": b"{}"})

    with pytest.raises(PretrainedNotFoundError, match=r"has no file 'm2ist_config\.json'") as info:
        resolve_pretrained(REPO_ID, filenames=FILES, cache_dir=tmp_path, endpoint=hub.url)
    assert "config.json" in str(info.value).split("It contains:")[1]

    with pytest.raises(PretrainedNotFoundError, match="has no revision 'v9'"):
        resolve_pretrained(REPO_ID, filenames=["config.json"], revision="v9", cache_dir=tmp_path, endpoint=hub.url)


def test_optional_files_are_fetched_when_present_and_skipped_when_absent(hub: LocalHub, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", scale=1.0)
    push_folder_to_hub(tmp_path / "ckpt", REPO_ID, endpoint=hub.url)

    folder = resolve_pretrained(
        REPO_ID,
        filenames=FILES,
        optional_filenames=["README.md", "training_args.json"],
        cache_dir=tmp_path / "cache",
        endpoint=hub.url,
    )

    assert (folder / "README.md").read_text() == README
    assert not (folder / "training_args.json").exists()


def test_local_folder_is_used_as_is_and_missing_files_are_listed(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", scale=1.0)
    assert resolve_pretrained(tmp_path / "ckpt", filenames=FILES) == tmp_path / "ckpt"
    assert resolve_pretrained(str(tmp_path / "ckpt"), filenames=FILES) == tmp_path / "ckpt"

    (tmp_path / "ckpt" / "m2ist_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['m2ist_model.safetensors'\]") as info:
        resolve_pretrained(tmp_path / "ckpt", filenames=FILES)
    assert "README.md" in str(info.value) and "m2ist_config.json" in str(info.value)

    with pytest.raises(PretrainedNotFoundError, match="neither a local folder nor a Hub repo id"):
        resolve_pretrained(str(tmp_path / "no" / "such" / "dir"), filenames=FILES)
    with pytest.raises(PretrainedNotFoundError, match="is a file"):
        resolve_pretrained(tmp_path / "ckpt" / "README.md", filenames=FILES)
    with pytest.raises(TypeError, match="not a single string"):
        resolve_pretrained(tmp_path / "ckpt", filenames="m2ist_config.json")


def test_local_files_only_without_cache_gives_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PretrainedNotFoundError, match="offline mode is on") as info:
        resolve_pretrained(REPO_ID, filenames=FILES, local_files_only=True, cache_dir=tmp_path / "empty")
    assert "Load it once online" in str(info.value)


OFFLINE_SCRIPT = """
import hashlib, json, sys
from m2ist.hub import PretrainedNotFoundError, resolve_pretrained

repo_id, filenames = sys.argv[1], json.loads(sys.argv[2])
folder = resolve_pretrained(repo_id, filenames=filenames, endpoint=None)
result = {
    "folder": str(folder),
    "sha256": {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in filenames},
}
try:
    resolve_pretrained("m2ist-test/never-pulled", filenames=filenames, endpoint=None)
except PretrainedNotFoundError as error:
    result["error"] = str(error)
print(json.dumps(result))
"""


def test_offline_load_from_the_filled_cache_in_a_fresh_process(hub: LocalHub, tmp_path: Path) -> None:
    pushed = write_checkpoint(tmp_path / "ckpt", scale=1.0)
    push_folder_to_hub(tmp_path / "ckpt", REPO_ID, endpoint=hub.url)
    hf_home = tmp_path / "hf_home"
    pulled = resolve_pretrained(REPO_ID, filenames=FILES, cache_dir=hf_home / "hub", endpoint=hub.url)
    hub.stop()  # nothing to reach any more: the cache alone must serve the load

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT")}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(hf_home),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
    )
    completed = subprocess.run(
        [sys.executable, "-c", OFFLINE_SCRIPT, REPO_ID, json.dumps(FILES)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert Path(result["folder"]) == pulled
    assert result["sha256"] == {name: hashlib.sha256(pushed[name]).hexdigest() for name in FILES}
    assert "offline mode is on" in result["error"] and "m2ist-test/never-pulled" in result["error"]


def test_local_hub_serves_snapshot_download_and_file_listing(tmp_path: Path) -> None:
    with local_hub() as endpoint:
        api = HfApi(endpoint=endpoint, token=False)
        api.create_repo("m2ist-test/listing")
        (tmp_path / "up" / "sub").mkdir(parents=True)
        (tmp_path / "up" / "a.json").write_text("{}")
        (tmp_path / "up" / "sub" / "b.bin").write_bytes(b"\x00\x01")
        api.upload_folder(repo_id="m2ist-test/listing", folder_path=tmp_path / "up", commit_message="files")

        assert api.list_repo_files("m2ist-test/listing") == [".gitattributes", "a.json", "sub/b.bin"]
        snapshot = Path(
            huggingface_hub.snapshot_download(
                "m2ist-test/listing", allow_patterns=["sub/*"], cache_dir=tmp_path / "cache", endpoint=endpoint
            )
        )
        assert (snapshot / "sub" / "b.bin").read_bytes() == b"\x00\x01"
        assert not (snapshot / "a.json").exists()
        with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):
            api.upload_file(
                path_or_fileobj=b"---\nkey: [unclosed\n---\n",
                path_in_repo="README.md",
                repo_id="m2ist-test/listing",
            )


def test_local_hub_bounds_request_bodies_and_its_own_lifetime(tmp_path: Path) -> None:
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "m2ist_model.safetensors").write_bytes(bytes(64 * 1024))
    with online_client(), LocalHub(max_body_bytes=16 * 1024) as hub:
        with pytest.raises(HfHubHTTPError, match="larger than the local test Hub's limit"):
            push_folder_to_hub(tmp_path / "big", REPO_ID, endpoint=hub.url)
        assert set(hub.files(REPO_ID)) == {".gitattributes"}

    short_lived = LocalHub(max_lifetime_s=0.2).start()
    assert short_lived.wait_stopped(timeout=30)
