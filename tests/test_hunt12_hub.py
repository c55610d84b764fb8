"""Pushes whose card or commit would not describe what was pushed (round-12 hunt, against the loopback Hub of
``tests/hub_server.py``): the usage snippet of a card pushed to a branch or to another repo, and a folder replaced
by a new save while a push reads it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import m2ist.hub as hub_module
from m2ist import get_side_tuned_model
from m2ist.hub import push_folder_to_hub
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import text_tower, tiny_config, vision_tower

hub = hub_fixture(name="hub", max_lifetime_s=120)


@pytest.fixture(scope="module")
def model():
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())


def _usage(hub: LocalHub, repo_id: str, revision: str = "main") -> list[str]:
    return re.findall(r"from_pretrained\(.*?\)", hub.files(repo_id, revision)["README.md"].decode())


def test_card_pushed_to_a_branch_loads_that_branch(hub: LocalHub, model) -> None:
    """The snippet of a card pushed to a branch loads the branch's adapter, not main's; pushed to main, none."""
    model.push_to_hub("org/branchy", endpoint=hub.url)
    model.push_to_hub("org/branchy", endpoint=hub.url, revision="v1")
    assert _usage(hub, "org/branchy", "v1") == ["from_pretrained(\"org/branchy\", revision='v1')"]
    hub.add_commit("org/branchy", {"README.md": hub.files("org/branchy", "v1")["README.md"]}, title="merge v1")
    model.push_to_hub("org/branchy", endpoint=hub.url)
    assert _usage(hub, "org/branchy") == ['from_pretrained("org/branchy")']


def test_card_written_for_another_repo_names_the_pushed_one(hub: LocalHub, model, tmp_path: Path) -> None:
    """A folder whose card names another repo (a training run's output pushed elsewhere) loads from the repo pushed
    to."""
    model.save_pretrained(tmp_path / "out", repo_id="org/old")
    push_folder_to_hub(tmp_path / "out", "org/new", endpoint=hub.url)
    assert _usage(hub, "org/new") == ['from_pretrained("org/new")']


def test_folder_replaced_while_pushed_is_refused(hub: LocalHub, model, tmp_path: Path, monkeypatch) -> None:
    """A save swapped in while the push stages the folder would make a commit of two saves' files: refused."""
    folder = tmp_path / "out"
    model.save_pretrained(folder)
    stage = hub_module._stage

    def stage_during_a_save(source: Path, selected, staging: Path, *args) -> None:
        stage(source, selected[:1], staging, *args)
        model.save_pretrained(folder)  # another save swaps in a new folder half-way
        stage(source, selected[1:], staging, *args)

    monkeypatch.setattr(hub_module, "_stage", stage_during_a_save)
    with pytest.raises(ValueError, match=r"replaced by a new save.*no commit was made"):
        push_folder_to_hub(folder, "org/swapped", endpoint=hub.url)
    assert "m2ist_config.json" not in hub.files("org/swapped")


def test_card_datasets_are_hub_ids_only(model, tmp_path: Path) -> None:
    """A dataset given by its local path (trainer.create_model_card(dataset_tags=...)) is not published as a Hub
    dataset id in the card's metadata."""
    from m2ist.card import build_model_card

    (tmp_path / "data" / "refcoco").mkdir(parents=True)
    card = build_model_card(model.config, model.parameter_counts(),
                            datasets=["/srv/me/refcoco", str(tmp_path / "data" / "refcoco"), "org/refcoco"])
    assert card.data.datasets == ["org/refcoco"]
