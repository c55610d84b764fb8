"""The trainer's background Hub pushes (``push_to_hub=True``) upload what one save wrote, never a mix (round-13 hunt,
against the loopback Hub of ``tests/hub_server.py``).

One short run saves at steps 1 and 2 with ``hub_always_push=True``, ``hub_strategy="all_checkpoints"`` and
``save_total_limit=1``. The Hub holds the first upload back until the second save is done (and, for a while, until
another commit lands), so an upload that read the output folder late, read a rotated checkpoint, or ran beside the
next one would show it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import transformers.utils.hub
from huggingface_hub.utils import filter_repo_objects
from transformers import TrainerCallback

from m2ist import RECTrainingArguments, train_rec
from m2ist.hub import ADAPTER_PATTERNS, IGNORED_PATTERNS
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.hub_server import HubCommit, LocalHub, online_client

REPO = "org/live"
STEP_1, STEP_2 = "Training in progress, step 1", "Training in progress, step 2"


def _files(folder: Path, *, adapter_only: bool) -> dict[str, bytes]:
    """``{relative path: bytes}`` of ``folder``'s files (only those a push uploads, with ``adapter_only``)."""
    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    if adapter_only:
        names = list(filter_repo_objects(names, allow_patterns=ADAPTER_PATTERNS, ignore_patterns=IGNORED_PATTERNS))
    return {name: (folder / name).read_bytes() for name in names}


class _RecordSaves(TrainerCallback):
    """Record what each save left in the output folder and its checkpoint; let the held upload go after save 2."""

    def __init__(self, saved: dict[int, tuple[dict[str, bytes], dict[str, bytes]]], release: threading.Event) -> None:
        self.saved, self.release = saved, release

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        out = Path(args.output_dir)
        self.saved[state.global_step] = (_files(out, adapter_only=True),
                                         _files(out / f"checkpoint-{state.global_step}", adapter_only=False))
        if state.global_step == 2:
            self.release.set()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Train two steps with a push after each save, the first upload held back; yield what the Hub and the disk
    hold afterwards."""
    tmp = tmp_path_factory.mktemp("hunt13-push")
    saved: dict[int, tuple[dict[str, bytes], dict[str, bytes]]] = {}
    release, committed = threading.Event(), threading.Event()
    with online_client(), LocalHub(max_lifetime_s=240) as hub, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)  # what HfApi() and the Trainer use
        patch.setattr(transformers.utils.hub, "_hf_api", None)  # the Trainer's shared client, built anew
        answer, held = hub.handle, []

        def hold_first_upload(method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
            if "/preupload/" in path and not held:
                held.append(path)
                release.wait(60)  # until save 2 (and its push) is done
                committed.wait(3)  # and a while longer: an upload running beside this one would commit now
            result = answer(method, path, headers, body)
            if "/commit/" in path:
                committed.set()
            return result

        hub.handle = hold_first_upload
        out = tmp / "out"
        args = RECTrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True,
                                    max_steps=2, per_device_train_batch_size=4, save_strategy="steps", save_steps=1,
                                    push_to_hub=True, hub_model_id=REPO, hub_strategy="all_checkpoints",
                                    hub_always_push=True, save_total_limit=1)
        trainer = train_rec(make_model(), make_processor(tmp / "tokenizer"), make_dataset(8, seed=0), None, args,
                            callbacks=[_RecordSaves(saved, release)])
        trainer._finish_current_push()  # train() waits too; the jobs are done here either way
        yield {"hub": hub, "repo": hub.repo(REPO), "saved": saved, "trainer": trainer, "tmp": tmp, "out": out,
               "held": held}


def _commit(run: dict[str, Any], title: str) -> HubCommit:
    commits = [commit for commit in run["repo"].commits.values() if commit.title == title]
    assert len(commits) == 1, [commit.title for commit in run["repo"].commits.values()]
    return commits[0]


def test_a_push_commits_the_files_of_its_own_save_only(run: dict[str, Any]) -> None:
    """The step-1 commit holds exactly what save 1 left in the output folder (weights, config, card, processor),
    though save 2 replaced those files while the upload was held back."""
    assert run["held"], "the first upload was never held back: the test did not exercise anything"
    step_1, step_2 = run["saved"][1][0], run["saved"][2][0]
    assert step_1["m2ist_model.safetensors"] != step_2["m2ist_model.safetensors"]  # the two saves differ
    files = _commit(run, STEP_1).files
    assert {name: files.get(name) for name in step_1} == step_1


def test_a_rotated_checkpoint_still_uploads_whole(run: dict[str, Any]) -> None:
    """``save_total_limit=1`` removes checkpoint-1 at save 2 while its upload waits: the upload still commits the
    whole checkpoint, and no upload failed."""
    assert not (run["out"] / "checkpoint-1").exists()
    failed = [repr(job.exception()) for job in run["trainer"].push_in_progress.jobs if job.exception() is not None]
    assert not failed
    files = _commit(run, STEP_1 + ", checkpoint").files
    checkpoint_1 = run["saved"][1][1]
    assert {"m2ist_model.safetensors", "trainer_state.json", "optimizer.pt"} <= set(checkpoint_1)
    assert {name.removeprefix("checkpoint-1/"): data for name, data in files.items()
            if name.startswith("checkpoint-1/")} == checkpoint_1


def test_pushes_commit_in_the_order_of_the_saves(run: dict[str, Any]) -> None:
    """The uploads run one after the other: the repo ends at the last save's files, not at an earlier push that
    finished later."""
    titles = [commit.title for commit in run["repo"].commits.values()]
    assert titles == ["initial commit", STEP_1, STEP_1 + ", checkpoint", STEP_2, STEP_2 + ", checkpoint"]
    head = run["hub"].files(REPO)
    assert {name: head.get(name) for name in run["saved"][2][0]} == run["saved"][2][0]


def test_the_push_snapshots_are_removed_and_the_output_folder_holds_the_last_save(run: dict[str, Any]) -> None:
    """Once the uploads are done no snapshot folder is left beside the output folder, and the output folder holds
    the last pushed save's adapter files, as before."""
    assert sorted(path.name for path in run["tmp"].iterdir()) == ["out", "tokenizer"]
    assert _files(run["out"], adapter_only=True) == run["saved"][2][0]
    assert not run["trainer"]._push_snapshots
