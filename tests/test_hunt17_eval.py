"""``m2ist eval`` and its results file, round 17: the adapter's ``eval_results.json`` (what its model card reports)
keeps the headline Acc@0.5 whatever ``--iou-thresholds`` says, a non-standard scoring (``--clamp canvas``, other
towers, another processor) goes to a file of its own and the card names a non-standard clamp, a Hub adapter's
results say where they went, replacing results of other splits is warned about, and bad scoring settings from a
config are refused before anything loads."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest

import m2ist.cli.evaluate
from m2ist import SideTunedModel
from m2ist.card import write_model_card
from m2ist.evaluation import evaluate, replaced_results_note, with_headline
from tests.test_hostile import assert_one_line_error, run_cli
from tests.test_hostile_cli import cli_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = cli_workspace(tmp_path_factory.mktemp("hunt17_eval"))
    shutil.copytree(root / "vit", root / "vit_copy")  # the same tower under another name: "other towers"
    return root


@pytest.fixture
def adapter(workspace, tmp_path) -> Path:
    """A fresh copy of the workspace's adapter (no results yet)."""
    folder = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", folder)
    return folder


def eval_argv(workspace: Path, adapter: Path | str, *extra: str, split: str = "val") -> list[str]:
    return ["eval", "--adapter", str(adapter), "--data-format", "jsonl", "--box-format", "xywh", "--no-progress",
            "--eval-file", f"{split}={workspace / 'val.jsonl'}", *extra]


def card_text(adapter: Path) -> str:
    model = SideTunedModel.from_pretrained(str(adapter))
    return write_model_card(adapter, model.config, model.parameter_counts()).read_text(encoding="utf-8")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------------------------- 1. headline
def test_the_adapters_results_keep_the_cards_headline_at_other_thresholds(workspace, adapter, capsys):
    code, out, err = run_cli(capsys, *eval_argv(workspace, adapter, "--iou-thresholds", "0.75"))
    assert code == 0, err
    metrics = json.loads((adapter / "eval_results.json").read_text())["metrics"]["val"]
    assert {"acc@0.5", "acc@0.75"} <= set(metrics)  # was: acc@0.75 alone, and the card's Acc@0.5 went blank
    row = next(line for line in card_text(adapter).splitlines() if line.startswith("| val |"))
    assert row.split("|")[2].strip().endswith("%"), row
    code, out, err = run_cli(capsys, *eval_argv(workspace, adapter, "--iou-thresholds", "0.75", "0.5", "0.75",
                                                "--output", str(adapter / "mine.json")))
    assert code == 0, err
    assert out.splitlines()[0].split()[2:4] == ["acc@0.5", "acc@0.75"]  # ascending, each once
    assert set(json.loads((adapter / "mine.json").read_text())["metrics"]["val"]) >= {"acc@0.5", "acc@0.75"}


def test_evaluate_scores_the_headline_into_a_file_named_eval_results(workspace, adapter, tmp_path):
    from m2ist.data import load_jsonl

    model = SideTunedModel.from_pretrained(str(adapter))
    samples = load_jsonl(workspace / "val.jsonl", image_root=workspace, box_format="xywh")
    results = evaluate(model, None, samples, iou_thresholds=0.75, output_file=tmp_path / "eval_results.json",
                       progress=False)
    assert {"acc@0.5", "acc@0.75"} <= set(results["metrics"]["eval"])
    other = evaluate(model, None, samples, iou_thresholds=0.75, output_file=tmp_path / "other.json", progress=False)
    assert "acc@0.5" not in other["metrics"]["eval"]  # any other file holds what was asked for, no more
    assert with_headline((0.75,)) == (0.5, 0.75) and with_headline(0.5) == (0.5,)


# ---------------------------------------------------------------------------------------------- 2. non-standard
@pytest.mark.parametrize(("extra", "name"), [
    (["--clamp", "canvas"], "eval_results.clamp-canvas.json"),
    (["--clamp", "canvas", "--max-eval-samples", "2"], "eval_results.first-2.clamp-canvas.json"),
    (["--vision-model", "{root}/vit_copy"], "eval_results.other-towers.json"),
    (["--processor", "{adapter}_processor"], "eval_results.other-processor.json"),
])
def test_non_standard_scoring_goes_to_a_file_of_its_own(workspace, adapter, capsys, caplog, extra, name):
    assert run_cli(capsys, *eval_argv(workspace, adapter))[0] == 0
    standard = digest(adapter / "eval_results.json")
    shutil.copytree(adapter, f"{adapter}_processor")
    extra = [value.format(root=workspace, adapter=adapter) for value in extra]
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, *eval_argv(workspace, adapter, *extra))
    assert code == 0, err
    assert (adapter / name).is_file(), sorted(p.name for p in adapter.iterdir())
    assert digest(adapter / "eval_results.json") == standard  # was: replaced by the non-standard scores
    assert any(name in message and "eval_results.json" in message for message in warnings_of(caplog))


def test_the_card_names_a_non_standard_clamp_it_reports(workspace, adapter, capsys):
    code, _, err = run_cli(capsys, *eval_argv(workspace, adapter, "--clamp", "canvas", "--output",
                                              str(adapter / "eval_results.json")))
    assert code == 0, err
    card = card_text(adapter)
    assert "clamped to the padded canvas" in card and "config: clamp=canvas" in card
    assert run_cli(capsys, *eval_argv(workspace, adapter))[0] == 0  # the standard protocol: nothing to name
    card = card_text(adapter)
    assert "padded canvas" not in card and "clamp=" not in card


# ---------------------------------------------------------------------------------------------- 3. Hub adapter
def test_a_hub_adapters_results_say_where_they_went(workspace, adapter, capsys, caplog, tmp_path, monkeypatch):
    real = m2ist.cli.evaluate.load_adapter
    monkeypatch.setattr(m2ist.cli.evaluate, "load_adapter",
                        lambda settings: real({**settings, "model": {**settings["model"], "adapter": str(adapter)}}))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, *eval_argv(workspace, "someone/m2ist-refcoco"))
    assert code == 0, err
    assert json.loads((here / "eval_results.json").read_text())["metadata"]["adapter"] == "someone/m2ist-refcoco"
    assert any(str(here / "eval_results.json") in m and "--output" in m for m in warnings_of(caplog))  # was: silent
    # the current folder holding another adapter's results: they are not replaced by default
    assert run_cli(capsys, *eval_argv(workspace, adapter))[0] == 0
    shutil.copy(adapter / "eval_results.json", here / "eval_results.json")
    kept = digest(here / "eval_results.json")
    code, _, err = run_cli(capsys, *eval_argv(workspace, "someone/m2ist-refcoco"))
    assert_one_line_error(code, err, "holds the results of the adapter", str(adapter), "--output")
    assert digest(here / "eval_results.json") == kept


# ---------------------------------------------------------------------------------------------- careless use
def test_replacing_results_of_other_splits_is_warned_about(workspace, adapter, capsys, caplog):
    assert run_cli(capsys, *eval_argv(workspace, adapter, split="testA"))[0] == 0
    with caplog.at_level(logging.WARNING):
        assert run_cli(capsys, *eval_argv(workspace, adapter, split="testA"))[0] == 0
    assert not [m for m in warnings_of(caplog) if "Replacing" in m]  # the same splits again: an update
    with caplog.at_level(logging.WARNING):
        assert run_cli(capsys, *eval_argv(workspace, adapter, split="testB"))[0] == 0
    assert any("Replacing" in m and "testA" in m and "--output" in m for m in warnings_of(caplog))
    old = json.loads((adapter / "eval_results.json").read_text())
    assert replaced_results_note(adapter / "eval_results.json", old) is None
    assert "another adapter" in replaced_results_note(
        adapter / "eval_results.json", {**old, "metadata": {**old["metadata"], "adapter": "other/adapter"}})


@pytest.mark.parametrize(("setting", "needle"), [
    ("evaluation.iou_thresholds=50", "evaluation.iou_thresholds (--iou-thresholds)"),
    ("evaluation.iou_thresholds=[]", "at least one IoU threshold"),
    ("evaluation.clamp=Canvas", "evaluation.clamp (--clamp) is 'Canvas'"),
    ("evaluation.batch_size=0", "evaluation.batch_size (--batch-size) is 0"),
    ("evaluation.num_workers=-1", "evaluation.num_workers (--num-workers) is -1"),
])
def test_bad_scoring_settings_are_refused_before_anything_loads(workspace, adapter, capsys, monkeypatch, setting,
                                                                 needle):
    monkeypatch.setattr(m2ist.cli.evaluate, "load_data_splits", lambda *a: pytest.fail("data loaded"))
    code, out, err = run_cli(capsys, *eval_argv(workspace, adapter, "--set", setting))
    assert_one_line_error(code, err, needle)
    assert out == "" and not (adapter / "eval_results.clamp-Canvas.json").exists()


def test_train_keeps_the_cards_headline_at_other_thresholds(workspace, capsys, tmp_path):
    """`m2ist train --iou-thresholds 0.75` wrote eval_results.json without acc@0.5: the card's Acc@0.5 was blank."""
    code, _, err = run_cli(capsys, "train", "--vision-model", str(workspace / "vit"), "--text-model",
                           str(workspace / "bert"), "--data-format", "jsonl", "--box-format", "xywh", "--train-file",
                           str(workspace / "val.jsonl"), "--eval-file", str(workspace / "val.jsonl"), "--output-dir",
                           str(tmp_path / "out"), "--iou-thresholds", "0.75", "--no-progress", "--set",
                           "training.use_cpu=true", "--set", "training.max_steps=1", "--set",
                           "training.eval_strategy=no", "--set", "training.save_strategy=no")
    assert code == 0, err
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())["metrics"]
    assert all({"acc@0.5", "acc@0.75"} <= set(split) for split in metrics.values()), metrics
    row = next(line for line in (tmp_path / "out" / "README.md").read_text().splitlines() if line.startswith("| val"))
    assert row.split("|")[2].strip().endswith("%"), row
