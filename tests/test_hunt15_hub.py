"""The trainer's Hub pushes (each save's background push and ``trainer.push_to_hub()``) leave the repo as
``push_folder_to_hub`` does (round-15 hunt, against the loopback Hub of ``tests/hub_server.py``): no adapter files of
adapters the model does not have, a card whose usage snippet loads the branch pushed to, and a failed background
push said out loud."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import transformers.utils.hub
from huggingface_hub import HfApi

from m2ist import RECTrainer, RECTrainingArguments, train_rec
from m2ist.hub import push_folder_to_hub, resolve_pretrained
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.hub_server import LocalHub, online_client

REPO = "org/run"
STALE = {"extra/m2ist_config.json": b"{}", "extra/m2ist_model.safetensors": b"old"}


@pytest.fixture
def hub() -> Iterator[LocalHub]:
    with online_client(), LocalHub(max_lifetime_s=180) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)  # what HfApi() and the Trainer use
        patch.setattr(transformers.utils.hub, "_hf_api", None)  # the Trainer's shared client, built anew
        yield server


def _train(tmp: Path, **overrides: Any) -> RECTrainer:
    """One step, saved once and pushed in the background, into ``tmp/out`` (which holds a leftover ``extra/``
    adapter of an earlier run); the model has the ``default`` adapter only."""
    out = tmp / "out"
    (out / "extra").mkdir(parents=True)
    for name, data in STALE.items():
        (out / name).write_bytes(data)
    args = RECTrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, max_steps=1,
                                per_device_train_batch_size=4, save_strategy="steps", save_steps=1, push_to_hub=True,
                                hub_model_id=REPO, **overrides)
    trainer = train_rec(make_model(), make_processor(tmp / "tokenizer"), make_dataset(4, seed=0), None, args)
    trainer._finish_current_push()
    return trainer


def _seed_repo(hub: LocalHub, tmp: Path) -> None:
    """The repo as an earlier push of a model with the adapters ``default`` and ``extra`` left it."""
    api = HfApi(endpoint=hub.url)
    api.create_repo(REPO)
    (tmp / "seed" / "extra").mkdir(parents=True)
    for name, data in {**STALE, "m2ist_config.json": b"{}", "m2ist_model.safetensors": b"old"}.items():
        (tmp / "seed" / name).write_bytes(data)
    api.upload_folder(repo_id=REPO, folder_path=tmp / "seed", commit_message="earlier push")


def test_background_push_deletes_adapters_the_model_no_longer_has(hub: LocalHub, tmp_path: Path) -> None:
    """A run pushing to a repo that holds an adapter ``extra/`` of an earlier push, from an output folder where an
    earlier run left ``extra/``: each save's push deletes ``extra/`` from the repo (it loaded an adapter the trained
    model does not have, beside a card that does not mention it) and never uploads the leftover."""
    _seed_repo(hub, tmp_path)
    with pytest.warns(UserWarning, match=r"deletes adapters of 'org/run'.*'extra'"):  # said, as a push says it
        trainer = _train(tmp_path)
    assert not [job.exception() for job in trainer.push_in_progress.jobs if job.exception() is not None]
    step = [commit for commit in hub.repo(REPO).commits.values() if commit.title == "Training in progress, step 1"]
    assert len(step) == 1
    files = step[0].files
    assert not [name for name in files if name.startswith("extra/")], sorted(files)
    assert files["m2ist_model.safetensors"] == (tmp_path / "out" / "m2ist_model.safetensors").read_bytes()
    assert "m2ist_processor.json" in files and "README.md" in files


def test_final_push_leaves_out_an_earlier_runs_adapter(hub: LocalHub, tmp_path: Path) -> None:
    """``trainer.push_to_hub()`` pushes the model's adapters, not an ``extra/`` subfolder an earlier run left in the
    output folder (which ``save_model`` keeps), and deletes the repo's ``extra/``."""
    _seed_repo(hub, tmp_path)
    trainer = _train(tmp_path, hub_strategy="end")  # no background push: only the final one
    with pytest.warns(UserWarning, match=r"deletes adapters of 'org/run'.*'extra'"):
        trainer.push_to_hub()
    files = hub.files(REPO)
    assert not [name for name in files if name.startswith("extra/")], sorted(files)
    assert files["m2ist_model.safetensors"] == (tmp_path / "out" / "m2ist_model.safetensors").read_bytes()
    assert (tmp_path / "out" / "extra" / "m2ist_model.safetensors").read_bytes() == b"old"  # the folder is kept
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "seed", "tokenizer"]  # no snapshot left


def test_background_push_to_a_branch_has_a_card_loading_that_branch(hub: LocalHub, tmp_path: Path) -> None:
    """With ``hub_revision="dev"`` the card pushed at each save loads ``revision='dev'`` (its snippet loaded
    ``main``'s adapter, or none), as ``push_folder_to_hub(revision="dev")`` writes it."""
    trainer = _train(tmp_path, hub_revision="dev")
    assert not [job.exception() for job in trainer.push_in_progress.jobs if job.exception() is not None]
    card = hub.files(REPO, revision="dev")["README.md"].decode()
    assert f'SideTunedModel.from_pretrained("{REPO}", revision=\'dev\')' in card, card
    assert "m2ist_model.safetensors" not in hub.files(REPO)  # main is left alone


def test_a_failed_background_push_is_logged(hub: LocalHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A background push the Hub refuses (here: every commit) is logged as a warning naming the repo; it was a
    future's exception nobody read, and the repo silently stayed at an older save."""
    answer = hub.handle

    def refuse_commits(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        if "/commit/" in path:
            return 403, {"Content-Type": "application/json"}, json.dumps({"error": "read-only token"}).encode()
        return answer(method, path, headers, body)

    hub.handle = refuse_commits
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        _train(tmp_path)
    failed = [record.getMessage() for record in caplog.records if "failed" in record.getMessage()]
    assert failed and "training in progress, step 1" in failed[0] and f"'{REPO}'" in failed[0], caplog.text
    assert "PermissionError" in failed[0]


@pytest.mark.parametrize("token", ["None", "false", " null ", ""])
def test_a_token_given_as_text_of_a_value_is_refused(hub: LocalHub, tmp_path: Path, token: str) -> None:
    """``token="None"`` (a config file or command line read as text) was sent as the token: the Hub refuses it, and
    the refusal read as a repo that does not exist or may not be written to. It is refused before any request, for a
    push, a pull and a training run that pushes."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "m2ist_config.json").write_text("{}")
    before = len(hub.request_log)
    with pytest.raises(ValueError, match=r"is text, not a Hub token: pass token=None"):
        push_folder_to_hub(tmp_path / "adapter", REPO, token=token, endpoint=hub.url)
    with pytest.raises(ValueError, match=r"is text, not a Hub token"):
        resolve_pretrained(REPO, filenames=["m2ist_config.json"], token=token, endpoint=hub.url,
                           cache_dir=tmp_path / "cache")
    args = RECTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1,
                                push_to_hub=True, hub_model_id=REPO, hub_token=token)
    with pytest.raises(ValueError, match=r"is text, not a Hub token"):
        RECTrainer(model=make_model(), args=args, train_dataset=make_dataset(4, seed=0))
    assert len(hub.request_log) == before
    assert REPO not in {repo_id for _, repo_id in hub.repos}
