"""A training run that pushes its saves (``push_to_hub=True``) checks its repo before training, as a push checks
before its commit: the background pushes would otherwise publish a private adapter or overwrite another model's
tokenizer, processor and card at every save (against the loopback Hub of ``tests/hub_server.py``)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import transformers.utils.hub
from huggingface_hub import HfApi

from m2ist import RECTrainer, RECTrainingArguments
from tests.ddp_worker import make_dataset, make_model
from tests.hub_server import LocalHub, online_client


@pytest.fixture
def hub():
    with online_client(), LocalHub(max_lifetime_s=120) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)  # what HfApi() and the Trainer use
        patch.setattr(transformers.utils.hub, "_hf_api", None)  # the Trainer's shared client, built anew
        yield server


def _trainer(out: Path, repo: str, **overrides) -> RECTrainer:
    args = RECTrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", max_steps=1,
                                per_device_train_batch_size=2, save_strategy="steps", save_steps=1, push_to_hub=True,
                                hub_model_id=repo, **overrides)
    return RECTrainer(model=make_model(), args=args, train_dataset=make_dataset(4, seed=0))


def test_a_run_refuses_a_repo_holding_another_model_before_training(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=hub.url)
    api.create_repo("org/bert")
    (tmp_path / "bert").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "bert" / name).write_text("{}")
    api.upload_folder(repo_id="org/bert", folder_path=tmp_path / "bert")
    before = dict(hub.files("org/bert"))
    with pytest.raises(ValueError, match=r"'org/bert': the repo holds another model \(model.safetensors\).*training "
                                         r"was not started"):
        _trainer(tmp_path / "out", "org/bert")
    assert hub.files("org/bert") == before
    assert _trainer(tmp_path / "out", "org/bert-m2ist").hub_model_id == "org/bert-m2ist"  # a repo of its own: fine


def test_a_private_run_refuses_an_existing_public_repo_before_training(hub: LocalHub, tmp_path: Path) -> None:
    HfApi(endpoint=hub.url).create_repo("org/public")
    with pytest.raises(ValueError, match=r"'org/public' with private=True: the repo already exists and is public"):
        _trainer(tmp_path / "out", "org/public", hub_private_repo=True)
    assert _trainer(tmp_path / "out", "org/new", hub_private_repo=True).hub_model_id == "org/new"
    assert HfApi(endpoint=hub.url).repo_info("org/new").private
