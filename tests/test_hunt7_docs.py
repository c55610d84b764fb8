"""Claims of the documentation checked against the code (hunt 7, area "docs")."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from m2ist.card import EVAL_RESULTS_NAME
from m2ist.evaluation import evaluate
from tests.ddp_worker import make_dataset, make_model, make_processor


def test_saved_config_has_the_permissions_of_the_other_adapter_files(tmp_path: Path) -> None:
    """docs/how-to/hub.md: 'Files are written with the usual permissions (0644 under the common umask 022)'."""
    old = os.umask(0o022)
    try:
        make_model().save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "a").iterdir() if p.is_file()}
    assert modes["m2ist_model.safetensors"] == 0o644
    assert modes["m2ist_config.json"] == 0o644, modes


def test_new_weights_saved_without_a_card_do_not_keep_the_old_weights_results(tmp_path: Path) -> None:
    """safety.md: 'new weights saved or pushed over an evaluated adapter never inherit its metrics'."""
    folder = tmp_path / "a"
    model = make_model(seed=0)
    model.processor = make_processor(tmp_path / "tok")
    model.save_pretrained(folder)
    evaluate(model, None, {"val": list(make_dataset(2, seed=0))}, output_file=folder / EVAL_RESULTS_NAME,
             progress=False)
    model.save_pretrained(folder)
    assert "model-index" in (folder / "README.md").read_text(encoding="utf-8")  # the measured weights' card
    other = make_model(seed=1)
    other.processor = model.processor
    with torch.no_grad():
        for param in other.parameters():
            if param.requires_grad:
                param.add_(0.01)
    other.save_pretrained(folder, model_card=False)  # new weights, "no card"
    card = folder / "README.md"
    assert not card.exists() or "model-index" not in card.read_text(encoding="utf-8")
