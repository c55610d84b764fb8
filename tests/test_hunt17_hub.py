"""Pushes that replaced what the Hub holds, and names that pass for others (round-17 hunt, against the loopback Hub of
``tests/hub_server.py``): a card edited on the Hub kept by every push (a folder's, a trainer's), a push to an open
pull request's ref, a push to a commit sha, and adapter names that look like other names or cannot be folders."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers.utils.hub
from huggingface_hub import ModelCard

from m2ist import RECTrainingArguments, get_side_tuned_model, train_rec
from m2ist.hub import push_folder_to_hub
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.hub_server import LocalHub, hub_fixture, online_client
from tests.tiny import text_tower, tiny_config, vision_tower

REPO = "org/edited"
USER_TEXT = "# My grounding adapter\n\nTrained on our warehouse photos; ask Ana before using it.\n\n"


hub = hub_fixture(name="hub", max_lifetime_s=180)


@pytest.fixture
def default_hub() -> Iterator[LocalHub]:
    """The loopback Hub as the default endpoint (what a Trainer uses): pass no ``endpoint=`` with it."""
    with online_client(), LocalHub(max_lifetime_s=180) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)  # what HfApi() and the Trainer use
        patch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",  # downloads: built at import
                      server.url + "/{repo_id}/resolve/{revision}/{filename}")
        patch.setattr(transformers.utils.hub, "_hf_api", None)  # the Trainer's shared client, built anew
        yield server


@pytest.fixture(scope="module")
def model():
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())


def _edit_card_on_the_hub(hub: LocalHub, repo_id: str = REPO) -> None:
    """What a user does on the repo page: their own text above m2ist's section, a license and a tag of their own."""
    card = hub.files(repo_id)["README.md"].decode()
    front, _, body = card.partition("\n---\n")
    front = front.replace("license: apache-2.0", "license: mit").replace("tags:\n", "tags:\n- warehouse\n", 1)
    hub.add_commit(repo_id, {"README.md": f"{front}\n---\n{USER_TEXT}{body}".encode()}, title="Edit the card")


def _assert_edits_kept(hub: LocalHub, repo_id: str = REPO) -> None:
    card = hub.files(repo_id)["README.md"].decode()
    assert USER_TEXT in card, card
    data = ModelCard(card).data
    assert data.license == "mit" and "warehouse" in data.tags and "m2ist" in data.tags, data
    assert card.count("m2ist:card:start") == 1 and f'from_pretrained("{repo_id}")' in card, card


def test_folder_push_keeps_the_card_edited_on_the_hub(hub: LocalHub, model, tmp_path: Path) -> None:
    """A card edited on the Hub (text, license, tag), then a push of a freshly saved folder: the push replaced it with
    the folder's fresh card; the repo's card is now updated as ``save_pretrained`` updates a folder's."""
    model.push_to_hub(REPO, endpoint=hub.url)
    _edit_card_on_the_hub(hub)
    model.save_pretrained(tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing of the Hub's is replaced, so nothing to warn of
        push_folder_to_hub(tmp_path / "out", REPO, endpoint=hub.url)
    _assert_edits_kept(hub)


def test_trainer_push_keeps_the_card_edited_on_the_hub(default_hub: LocalHub, tmp_path: Path) -> None:
    """Known fault (1): a training run pushing (each save's background push, and ``trainer.push_to_hub()``) into a
    repo whose card was edited on the Hub replaced that card with the output folder's."""
    hub = default_hub
    model = make_model()
    model.push_to_hub(REPO)
    _edit_card_on_the_hub(hub)
    args = RECTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                                max_steps=1, per_device_train_batch_size=4, save_strategy="steps", save_steps=1,
                                push_to_hub=True, hub_model_id=REPO)
    trainer = train_rec(model, make_processor(tmp_path / "tokenizer"), make_dataset(4, seed=0), None, args)
    trainer._finish_current_push()
    assert not [job.exception() for job in trainer.push_in_progress.jobs if job.exception() is not None]
    assert any(commit.title == "Training in progress, step 1" for commit in hub.repo(REPO).commits.values())
    _assert_edits_kept(hub)
    trainer.push_to_hub()
    _assert_edits_kept(hub)


def test_a_card_edited_in_both_places_is_pushed_with_a_warning(hub: LocalHub, model, tmp_path: Path) -> None:
    """A folder whose card has text of its own, pushed over other text on the Hub: the folder's wins (it is what is
    pushed), said out loud; the Hub's license and tags are still kept."""
    model.push_to_hub(REPO, endpoint=hub.url)
    _edit_card_on_the_hub(hub)
    model.save_pretrained(tmp_path / "out")
    card = tmp_path / "out" / "README.md"
    card.write_text(card.read_text().replace("---\n\n", "---\n\n# Local notes\n\n", 1))
    with pytest.warns(UserWarning, match=r"README.md on the Hub has text of its own.*replaces it"):
        push_folder_to_hub(tmp_path / "out", REPO, endpoint=hub.url)
    pushed = hub.files(REPO)["README.md"].decode()
    assert "# Local notes" in pushed and USER_TEXT not in pushed
    assert ModelCard(pushed).data.license == "mit"


def test_push_to_an_open_pull_request(hub: LocalHub, model) -> None:
    """``revision="refs/pr/1"`` (a second commit to an open pull request) tried to create a branch named
    'refs/pr/1', and its card's snippet loaded ``revision='refs/pr/1'``, which the card merged into main kept. The
    snippet loads the pull request's base; a merged pull request is refused."""
    model.push_to_hub(REPO, endpoint=hub.url)
    model.push_to_hub(REPO, endpoint=hub.url, create_pr=True)
    before = len(hub.request_log)
    weight = next(model.head.parameters())
    kept = weight.detach().clone()
    try:  # other weights: a commit to push (the same files would make none, saves being byte for byte the same)
        with torch.no_grad():
            weight.add_(1.0)
        model.push_to_hub(REPO, endpoint=hub.url, revision="refs/pr/1", commit_message="second")
    finally:
        with torch.no_grad():
            weight.copy_(kept)
    assert not [path for method, path in hub.request_log[before:] if method == "POST" and "/branch/" in path]
    card = hub.files(REPO, "refs/pr/1")["README.md"].decode()
    assert re.findall(r"from_pretrained\(.*?\)", card) == [f'from_pretrained("{REPO}")'], card
    assert hub.repo(REPO).commits[hub.repo(REPO).refs["refs/pr/1"]].title == "second"
    hub.repo(REPO).discussions[1]["status"] = "merged"
    with pytest.raises(ValueError, match=r"#1 is merged, so the commit would publish nothing.*create_pr=True"):
        model.push_to_hub(REPO, endpoint=hub.url, revision="refs/pr/1")


def test_push_to_a_commit_sha_is_refused(hub: LocalHub, model, tmp_path: Path) -> None:
    """``revision=<commit sha>`` (copied from a load's pin) created a branch named like the sha, and the adapter went
    there; refused before any request."""
    model.save_pretrained(tmp_path / "out")
    before = len(hub.request_log)
    with pytest.raises(ValueError, match=r"not onto a commit sha; no commit was made"):
        push_folder_to_hub(tmp_path / "out", REPO, endpoint=hub.url, revision="0123456789abcdef" * 2 + "01234567")
    assert len(hub.request_log) == before


@pytest.mark.parametrize(("name", "problem"), [
    ("d\u0435fault", r"mixes Cyrillic and Latin letters"),  # a Cyrillic 'е': passes for 'default'
    ("\uff41\uff4c\uff4c", r"reads as 'all'"),  # fullwidth letters: passes for the reserved 'all'
    ("task:refcoco", r"':'.*cannot hold on Windows"),
    ("NUL", r"device name 'NUL'"),
    ("x" * 200, r"200 bytes long"),  # the save failed half-way with 'File name too long'
])
def test_adapter_names_that_pass_for_others_or_cannot_be_folders(name: str, problem: str, tmp_path: Path) -> None:
    """Such a name was accepted, then saved as a subfolder that loads under no name the user types, or that cannot
    be made on Windows (where the folder or the Hub repo is loaded), or that no file system takes."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    with pytest.raises(ValueError, match=rf"Adapter name .* is not usable: .*{problem}"):
        model.add_adapter(name, tiny_config())
    assert model.list_adapters() == ["default"]
    model.add_adapter("名前", tiny_config())  # one script, as typed: fine
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "名前" / "m2ist_model.safetensors").is_file()
