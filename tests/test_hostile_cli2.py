"""Hostile use of the command line, evaluation, the model card and the app, round 2: an output never destroys a
file that is not an earlier output, ``-`` is never taken for a file name, sample limits are whole and positive,
results name the towers that produced them (and a card shows only results of its own towers), a split name cannot
rewrite a card's table, results files are never seen half-written."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel

from m2ist import RECProcessor, SideTunedModel
from m2ist.card import build_model_card, write_model_card
from m2ist.cli import CLIError, load_data_splits
from m2ist.data.sample import RECSample
from m2ist.evaluation import evaluate, write_results
from tests.test_hostile import assert_one_line_error, run_cli
from tests.test_hostile_cli import cli_workspace
from tests.test_inference import FixedBoxModel, make_tokenizer
from tests.tiny import QUERY_LEN, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return cli_workspace(tmp_path_factory.mktemp("hostile_cli2"))


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    return RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def eval_args(workspace: Path, adapter: Path, *extra: str) -> list[str]:
    return ["eval", "--adapter", str(adapter), "--data-format", "jsonl", "--box-format", "xywh", "--no-progress",
            "--eval-file", str(workspace / "val.jsonl"), *extra]


def predict_args(workspace: Path, *extra: str) -> list[str]:
    return ["predict", "--adapter", str(workspace / "adapter"), "--image", str(workspace / "img0.png"), "--text",
            "the red square", *extra]


# ---------------------------------------------------------------------------------------------- 1. outputs
def test_an_output_never_overwrites_a_file_that_is_not_an_earlier_output(workspace, capsys, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    data = tmp_path / "data.jsonl"
    data.write_bytes((workspace / "val.jsonl").read_bytes())
    guarded = {path: digest(path) for path in (data, adapter / "m2ist_model.safetensors")}
    for victim in guarded:  # the data scored, the adapter's own weights
        code, out, err = run_cli(capsys, *eval_args(workspace, adapter, "--output", str(victim)))
        assert_one_line_error(code, err, str(victim), "not an earlier results file")
        assert out == ""
        code, out, err = run_cli(capsys, *predict_args(workspace, "--output", str(victim)))
        assert_one_line_error(code, err, "--output", "not an earlier `m2ist predict --output`")
        assert out == ""
    assert {path: digest(path) for path in guarded} == guarded
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, *eval_args(workspace, adapter, "--output", str(fifo)))
    assert_one_line_error(code, err, "not a regular file")
    assert fifo.is_fifo()
    (tmp_path / "r.json").touch()  # an empty file, then an earlier output, is replaced
    for _ in range(2):
        assert run_cli(capsys, *eval_args(workspace, adapter, "--output", str(tmp_path / "r.json")))[0] == 0
    for _ in range(2):
        assert run_cli(capsys, *predict_args(workspace, "--output", str(tmp_path / "p.json")))[0] == 0
    assert json.loads((tmp_path / "p.json").read_text())[0]["box_xyxy"]
    results = json.loads((tmp_path / "r.json").read_text())
    # the results say which adapter and which data file produced them, whatever the working folder
    assert results["metadata"]["adapter"] == str(adapter.resolve())
    assert results["metadata"]["data"]["eval_files"] == {"val": str((workspace / "val.jsonl").resolve())}


def test_a_dash_is_not_taken_for_a_file_name(workspace, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, needle in ((eval_args(workspace, workspace / "adapter", "--output", "-"), "--output -"),
                         (predict_args(workspace, "--output", "-"), "drop --output"),
                         (predict_args(workspace, "--draw", "-"), "--draw -")):
        code, out, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, needle, "not stdout")
        assert out == ""
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- 2. sample limits
@pytest.mark.parametrize("limit", [-1, 0, 2.7, "2", True])
def test_sample_limits_are_whole_positive_numbers(workspace, limit):
    data = {"format": "jsonl", "box_format": "xywh", "eval_files": [str(workspace / "val.jsonl")],
            "max_eval_samples": limit}
    with pytest.raises(CLIError, match=r"--max-eval-samples / data.max_eval_samples must be a whole number"):
        load_data_splits(data, "eval")  # -1 used to drop the last expression, 2.7 to keep 2
    assert len(load_data_splits({**data, "max_eval_samples": 2}, "eval")["val"]) == 2


def test_a_file_naming_its_splits_gives_the_rows_of_the_split_the_command_line_names(workspace, tmp_path):
    """One JSONL of train and val rows: ``--train-file`` read every row (training on the evaluation rows too), and
    ``--eval-file val=FILE`` scored the training rows; now each reads the rows of the split it names, and a file
    of one split (no 'split' field) is still read whole."""
    rows = [{"image": str(workspace / f"img{i}.png"), "text": "the red square", "bbox": [5 + i, 5, 20, 15],
             "split": "train" if i < 2 else "validation"} for i in range(3)]
    mixed = tmp_path / "all.jsonl"
    mixed.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = {"format": "jsonl", "box_format": "xywh", "train_file": str(mixed), "eval_files": [f"val={mixed}"]}
    train = load_data_splits(data, "train")["train"]
    assert [s.box[0] for s in train] == [5, 6]
    assert [s.box[0] for s in load_data_splits(data, "eval")["val"]] == [7]  # 'val' is 'validation'
    with pytest.raises(ValueError, match=r"has no split 'test'; available splits: \['train', 'validation'\]"):
        load_data_splits({**data, "eval_files": [f"test={mixed}"]}, "eval")
    whole = load_data_splits({**data, "eval_files": [str(workspace / "val.jsonl")]}, "eval")["val"]
    assert len(whole) == 3  # val.jsonl names no split: the whole file is the split

def test_sample_limit_flags_refuse_negative_numbers(workspace, capsys):
    code, out, err = run_cli(capsys, *eval_args(workspace, workspace / "adapter", "--max-eval-samples", "-1"))
    assert code == 2 and out == "" and "--max-eval-samples: -1 must be positive" in err


def test_a_subsample_evaluation_keeps_the_full_results_and_stays_out_of_the_card(workspace, capsys, tmp_path):
    """``m2ist eval --max-eval-samples N`` writes ``eval_results.first-N.json`` beside the adapter: it replaced the
    full results, and the next card reported the first N expressions' accuracy as the adapter's."""
    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    assert run_cli(capsys, *eval_args(workspace, adapter))[0] == 0
    full = digest(adapter / "eval_results.json")
    assert run_cli(capsys, *eval_args(workspace, adapter, "--max-eval-samples", "1"))[0] == 0
    assert digest(adapter / "eval_results.json") == full
    quick = json.loads((adapter / "eval_results.first-1.json").read_text())
    assert quick["metadata"]["data"]["max_eval_samples"] == 1 and quick["metrics"]["val"]["count"] == 1

    model = SideTunedModel.from_pretrained(adapter)
    write_model_card(adapter, model.config, model.parameter_counts())
    assert "## Evaluation" in (adapter / "README.md").read_text()
    shutil.copy(adapter / "eval_results.first-1.json", adapter / "eval_results.json")  # --output eval_results.json
    write_model_card(adapter, model.config, model.parameter_counts())
    assert "## Evaluation" not in (adapter / "README.md").read_text()

def test_a_sample_limit_above_every_split_gives_the_full_results(workspace, capsys, caplog, tmp_path):
    """``--max-eval-samples 1000`` on splits of 3 scores them whole, yet was written to ``eval_results.first-1000.json``
    and recorded as a subsample, so the adapter's card never reported those full results."""
    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    with caplog.at_level(logging.WARNING):
        code = run_cli(capsys, *eval_args(workspace, adapter, "--max-eval-samples", "1000"))[0]
    assert code == 0 and "more than every split holds: the whole splits are scored" in caplog.text
    assert not (adapter / "eval_results.first-1000.json").exists()
    results = json.loads((adapter / "eval_results.json").read_text())
    assert results["metadata"]["data"].get("max_eval_samples") is None and results["metrics"]["val"]["count"] == 3
    model = SideTunedModel.from_pretrained(adapter)
    write_model_card(adapter, model.config, model.parameter_counts())
    assert "## Evaluation" in (adapter / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- 3. towers used
def test_results_name_the_towers_used_and_a_card_leaves_out_those_of_other_towers(workspace, tmp_path):
    other = tmp_path / "vit_other"
    tower = AutoModel.from_pretrained(workspace / "vit")
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.mul_(0.5)
    tower.save_pretrained(other)
    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    samples = [RECSample(image=str(workspace / "img0.png"), expression="the red square", box=(5, 5, 20, 15))]

    model = SideTunedModel.from_pretrained(adapter, vision_model=AutoModel.from_pretrained(other))
    results = evaluate(model, None, {"val": samples}, progress=False, output_file=adapter / "eval_results.json")
    used = results["metadata"]["model"]["towers_used"]
    assert used["vision"]["name_or_path"] == str(other)
    assert results["metadata"]["model"]["vision_model_name_or_path"] == str(workspace / "vit")  # what it records
    write_model_card(adapter, model.config, model.parameter_counts())
    assert "## Evaluation" not in (adapter / "README.md").read_text()  # not the figures of the recorded towers

    model = SideTunedModel.from_pretrained(adapter)  # the recorded towers
    evaluate(model, None, {"val": samples}, progress=False, output_file=adapter / "eval_results.json")
    write_model_card(adapter, model.config, model.parameter_counts())
    assert "## Evaluation" in (adapter / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- 4. card cells
def test_split_names_cannot_rewrite_the_cards_table():
    results = {"metrics": {"val | 100.00%": {"acc@0.5": 0.25, "miou": 0.5, "count": 4},
                           "test\n| fake | 99.00% | 0.9 | 9 |": {"acc@0.5": 0.5, "miou": 0.5, "count": 2},
                           "edited": {"acc@0.5": "0.9", "miou": float("nan"), "count": 3}}}
    card = str(build_model_card(tiny_config(), {"side": 1, "head": 1, "frozen": 1}, results=results))
    rows = [line for line in card.split("## Evaluation")[1].split("## Use")[0].splitlines() if line.startswith("| ")]
    rows = rows[1:]  # the header
    assert rows[0] == r"| val \| 100.00% | 25.00% | 0.5000 | 4 |"
    assert rows[1] == r"| test \| fake \| 99.00% \| 0.9 \| 9 \| | 50.00% | 0.5000 | 2 |"
    assert "| fake |" not in card.split("---\n", 2)[2]  # (the YAML metadata quotes it)
    assert rows[2].startswith("| edited |  |  | 3 |")  # a hand-edited text or NaN is an empty cell, not a crash


# ---------------------------------------------------------------------------------------------- 5. evaluate inputs
def test_evaluate_refuses_split_names_that_collide_and_expressions_that_are_not_text(processor):
    image = Image.new("RGB", (100, 100))
    data = [RECSample(image=image, expression="a", box=(25, 25, 75, 75), image_id=0)]
    with pytest.raises(ValueError, match=r"Splits 1 and '1' are both named '1'"):
        evaluate(FixedBoxModel([[0.5, 0.5, 0.5, 0.5]] * 3), processor, {1: data, "1": data * 2}, progress=False)
    items = [{"image": image, "expression": None, "box": [25, 25, 75, 75], "image_id": 7}]
    with pytest.raises(TypeError, match=r"image_id=7.*expression is a NoneType"):  # was scored as the phrase "None"
        evaluate(FixedBoxModel([[0.5, 0.5, 0.5, 0.5]]), processor, items, progress=False)


# ---------------------------------------------------------------------------------------------- 6. atomic writes
def fill_the_disk_half_way(monkeypatch) -> None:
    """From now on ``Path.write_text`` writes half of its text, then fails as a full disk does."""
    original = Path.write_text

    def dies_half_way(self, text, *args, **kwargs):
        original(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", dies_half_way)


def test_results_are_never_left_half_written(tmp_path, monkeypatch):
    target = tmp_path / "r.json"
    write_results({"metrics": {"val": {"acc@0.5": 0.5}}}, target)
    before = target.read_text()
    fill_the_disk_half_way(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        write_results({"metrics": {"val": {"acc@0.5": 0.75}}}, target)
    assert target.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no half-written temporary file left


def test_predict_output_is_never_left_half_written(workspace, capsys, tmp_path, monkeypatch):
    target = tmp_path / "p.json"
    assert run_cli(capsys, *predict_args(workspace, "--output", str(target)))[0] == 0
    before = target.read_text()
    fill_the_disk_half_way(monkeypatch)
    code, out, err = run_cli(capsys, *predict_args(workspace, "--text", "the blue one", "--output", str(target)))
    assert_one_line_error(code, err, "No space left")
    assert json.loads(out)  # the JSON still reached stdout
    assert target.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json"]


# ---------------------------------------------------------------------------------------------- 7. the app
def test_app_checks_its_port_and_adapter_names_before_loading(tmp_path, monkeypatch):
    from m2ist import app

    parser = app.add_arguments(argparse.ArgumentParser())
    for port in ("99999", "0", "http"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--port", port])
    loaded = []
    monkeypatch.setattr(SideTunedModel, "from_pretrained", classmethod(lambda cls, *a, **k: loaded.append(a)))
    with pytest.raises(ValueError, match="share a name"):
        app.load_models([f"a={tmp_path / 'one'}", f"a={tmp_path / 'two'}"])
    assert loaded == []


def test_weights_that_are_not_safetensors_are_reported_as_damaged_not_allocated(workspace, capsys, tmp_path):
    """A weights file holding text claims a header of exabytes: every reader of the header (the baseline check of
    eval and predict, the card's SHA-256) refuses that length instead of allocating it, and the strict loader
    names the damaged file in one line with exit status 2."""
    from m2ist.save_and_load import recorded_sha256

    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    weights = adapter / "m2ist_model.safetensors"
    weights.write_bytes(b"this is not a safetensors file, only some text\n" * 10)
    assert recorded_sha256(weights) is None
    code, out, err = run_cli(capsys, *eval_args(workspace, adapter))
    assert_one_line_error(code, err, str(weights), "corrupted or truncated", "header claims", exit_code=2)
    assert out == ""


def test_load_data_splits_refuses_split_names_it_would_drop_for_files(workspace):
    """Settings built without the command line's resolution (a script calling load_data_splits) kept both: the
    split names were dropped silently and only the files scored."""
    data = {"format": "jsonl", "box_format": "xywh", "eval_files": [f"val={workspace / 'val.jsonl'}"],
            "eval_splits": ["testA"]}
    with pytest.raises(CLIError, match=r"data.eval_splits \['testA'\] and data.eval_files \['val'\] are both set"):
        load_data_splits(data, "eval")
