"""Quiet by default: results on stdout, nothing else on stderr unless -v; Trainer log dicts on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2ist.trainer import RECTrainingArguments, train_rec
from tests.ddp_worker import make_dataset, make_model, make_processor, make_tokenizer
from tests.tiny import save_reloadable_adapter

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """A tiny adapter saved with its processor; its towers are reloaded from local folders, as from the Hub."""
    root = tmp_path_factory.mktemp("quiet")
    save_reloadable_adapter(root, make_tokenizer(root / "tokenizer"))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "img.png")
    return root


def _m2ist(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "m2ist.cli", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def test_predict_prints_only_the_json_and_nothing_on_stderr(adapter):
    args = ["predict", "--adapter", str(adapter / "adapter"), "--image", str(adapter / "img.png"), "--text",
            "the red square"]
    quiet = _m2ist(*args)
    assert quiet.returncode == 0, quiet.stderr
    records = json.loads(quiet.stdout)  # stdout is the result and nothing else
    assert [record["text"] for record in records] == ["the red square"]
    assert quiet.stderr == ""  # no warnings, no "Loading weights" bars, no progress messages

    verbose = _m2ist("-v", *args)
    assert verbose.returncode == 0 and json.loads(verbose.stdout) == records
    assert "Loading the adapter" in verbose.stderr  # -v brings the messages back


def test_trainer_log_dicts_go_to_stderr(tmp_path, capsys):
    torch.set_num_threads(1)
    args = RECTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, max_steps=2, logging_steps=1,
                                report_to="none", save_strategy="no", per_device_train_batch_size=2,
                                disable_tqdm=False)
    train_rec(make_model(), make_processor(tmp_path / "tokenizer"), make_dataset(4, seed=0), args=args)
    out, err = capsys.readouterr()
    assert "'loss'" not in out and "train_runtime" not in out
    assert "'loss'" in err and "train_runtime" in err

    args.disable_tqdm = True  # the plain printer, used without progress bars
    train_rec(make_model(), make_processor(tmp_path / "tokenizer"), make_dataset(4, seed=0), args=args)
    out, err = capsys.readouterr()
    assert "'loss'" not in out and "'loss'" in err


def test_the_demo_prints_only_its_table_and_loads_each_tower_and_tokenizer_once(tmp_path, monkeypatch, capsys):
    """`make demo`: the results table on stdout (no log dicts), each checkpoint folder read once."""
    from collections import Counter

    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from m2ist.cli import main

    monkeypatch.setenv("M2IST_CACHE", str(tmp_path / "cache"))
    loads: Counter[tuple[str, str]] = Counter()
    for base, kind in ((PreTrainedModel, "model"), (PreTrainedTokenizerBase, "tokenizer")):
        original = base.from_pretrained.__func__

        def counted(cls, path, *args, _original=original, _kind=kind, **kwargs):
            loads[(_kind, Path(path).name)] += 1
            return _original(cls, path, *args, **kwargs)

        monkeypatch.setattr(base, "from_pretrained", classmethod(counted))
    # the tiny shapes ViT is pretrained first (saved, then read back once as the cache check), before the demo runs
    from m2ist.evidence.demo_towers import VisionPretrainRecipe, load_vision_tower

    load_vision_tower(recipe=VisionPretrainRecipe.tiny(), progress=False)
    loads.clear()

    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--steps", "2", "--batch-size", "4", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == "| split | Acc@0.5 | mean IoU | expressions |"
    assert "'loss'" not in printed and "Loading weights" not in printed and "train_runtime" not in printed
    towers = {key: count for key, count in loads.items() if key[0] == "model"}
    assert len(towers) == 2 and set(towers.values()) == {1}, loads  # the vision and the text tower, once each
    tokenizers = {folder: count for (kind, folder), count in loads.items() if kind == "tokenizer"}
    assert tokenizers == {"model": 1, "adapter": 1}, loads  # the processor's; the saved one reloaded for the picture
