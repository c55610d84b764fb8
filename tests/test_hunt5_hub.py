"""Hub pushes that must not lose or leak: the card of the branch a push creates, a card that cannot be read, a
public repo asked to be private (round-5 hunt, against the loopback Hub of ``tests/hub_server.py``)."""

from __future__ import annotations

import pytest
import torch

from m2ist import get_side_tuned_model
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import text_tower, tiny_config, vision_tower

hub = hub_fixture(name="hub", max_lifetime_s=120)


@pytest.fixture(scope="module")
def model():
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())


def _edit_card(hub: LocalHub, repo_id: str) -> None:
    card = hub.files(repo_id)["README.md"].decode().replace("license: apache-2.0", "license: mit")
    hub.add_commit(repo_id, {"README.md": (card + "\n## My notes\nTrained with care.\n").encode()}, title="edit")


def test_push_to_a_new_branch_updates_main_s_card(hub: LocalHub, model) -> None:
    """The branch starts from main: its card is main's, updated, not a fresh one that drops the user's text."""
    model.push_to_hub("org/m", endpoint=hub.url)
    _edit_card(hub, "org/m")
    model.push_to_hub("org/m", endpoint=hub.url, revision="experiment")
    card = hub.files("org/m", "experiment")["README.md"].decode()
    assert "## My notes" in card and "license: mit" in card and "m2ist" in card


def test_a_card_that_cannot_be_read_stops_the_push(hub: LocalHub, model) -> None:
    """A failure other than "no repo / no card" (server error, network) raises: a fresh card would replace the
    repo's and lose its text."""
    model.push_to_hub("org/m", endpoint=hub.url)
    _edit_card(hub, "org/m")
    head = hub.repo("org/m").refs["main"]
    answer = hub.handle

    def card_fails(method: str, path: str, headers: dict[str, str], body: bytes):
        if "/resolve/" in path and path.endswith("/README.md"):
            return 400, {"Content-Type": "application/json", "X-Error-Message": "broken"}, b'{"error": "broken"}'
        return answer(method, path, headers, body)

    hub.handle = card_fails
    with pytest.raises(ConnectionError, match=r"Cannot read the model card \(README\.md\) of 'org/m'.*no commit"):
        model.push_to_hub("org/m", endpoint=hub.url)
    assert hub.repo("org/m").refs["main"] == head


def test_private_push_to_an_existing_public_repo_is_refused(hub: LocalHub, model) -> None:
    """private=True only applies to a repo the push creates: into a public repo it would publish the adapter."""
    hub.add_repo("org/public")
    with pytest.raises(ValueError, match=r"already exists and is public.*update_repo_settings.*no commit"):
        model.push_to_hub("org/public", private=True, endpoint=hub.url)
    assert set(hub.files("org/public")) == {".gitattributes"}
    model.push_to_hub("org/private", private=True, endpoint=hub.url)  # a new repo: created private
    model.push_to_hub("org/private", private=True, endpoint=hub.url)  # and pushed to again
    assert hub.repo("org/private").private and "m2ist_model.safetensors" in hub.files("org/private")


def test_a_card_whose_results_measured_replaced_weights_is_not_pushed(hub: LocalHub, tmp_path) -> None:
    """The card names the weights its results measured: weights copied over by hand afterwards (a checkpoint's)
    would be published under the old weights' figures."""
    import json
    import shutil

    from m2ist.hub import push_folder_to_hub
    from m2ist.save_and_load import recorded_sha256

    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.save_pretrained(tmp_path / "other")
    with torch.no_grad():
        for parameter in model.side.parameters():
            parameter.add_(0.1)
    out = tmp_path / "run"
    model.save_pretrained(out)
    (out / "eval_results.json").write_text(json.dumps({"metrics": {"val": {"acc@0.5": 0.91, "miou": 0.8}},
        "metadata": {"weights_sha256": recorded_sha256(out / "m2ist_model.safetensors")}}))
    model.save_pretrained(out)
    assert "91.00%" in (out / "README.md").read_text()
    push_folder_to_hub(out, "org/measured", endpoint=hub.url)  # the card's results measured these weights
    assert "91.00%" in hub.files("org/measured")["README.md"].decode()

    shutil.copy(tmp_path / "other" / "m2ist_model.safetensors", out / "m2ist_model.safetensors")
    head = hub.repo("org/measured").refs["main"]
    with pytest.raises(ValueError, match=r"README\.md reports results that do not describe the weights.*no commit"):
        push_folder_to_hub(out, "org/measured", endpoint=hub.url)
    assert hub.repo("org/measured").refs["main"] == head


def test_the_hub_token_is_never_written_into_training_args(tmp_path) -> None:
    """``training_args.bin`` is pickled into every checkpoint and uploaded with it (``hub_strategy="checkpoint"``):
    the token must not be in it."""
    from m2ist.trainer import train_rec
    from tests.ddp_worker import make_dataset, make_model, make_processor
    from tests.tiny import cpu_training_args

    args = cpu_training_args(tmp_path / "run", max_steps=1, save_strategy="steps", save_steps=1,
                             hub_token="hf_secret_token_for_the_test")
    trainer = train_rec(make_model(), make_processor(tmp_path / "tok"), make_dataset(4, seed=1), args=args)
    trainer.save_model(str(tmp_path / "final"))
    files = [tmp_path / "run" / "checkpoint-1" / "training_args.bin", tmp_path / "final" / "training_args.bin"]
    for file in files:
        assert b"hf_secret_token_for_the_test" not in file.read_bytes()
    assert trainer.args.hub_token == "hf_secret_token_for_the_test"  # the run itself keeps it


secured_hub = hub_fixture(name="secured_hub", max_lifetime_s=120, token="hf_test_token")


def test_a_bare_repo_name_is_the_token_users_repo(secured_hub: LocalHub, model) -> None:
    """``push_to_hub("m")`` lands in ``<user>/m``: the card read before the push (so the user's edits are kept) and the
    card's usage snippet must name that repo, not ``m``."""
    model.push_to_hub("m", endpoint=secured_hub.url, token="hf_test_token")
    card = secured_hub.files("me/m")["README.md"].decode()
    assert 'from_pretrained("me/m"' in card or "from_pretrained('me/m'" in card
    _edit_card(secured_hub, "me/m")
    model.push_to_hub("m", endpoint=secured_hub.url, token="hf_test_token")
    assert "Trained with care." in secured_hub.files("me/m")["README.md"].decode()  # kept, not a fresh card
    with pytest.raises(ValueError, match=r"Cannot tell whose repo 'm' is .*'your-name/m'"):
        model.push_to_hub("m", endpoint=secured_hub.url, token="wrong")
