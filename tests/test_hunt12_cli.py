"""Settings, round 12: YAML 1.1's leading-zero octal (``040`` is 32) and base-60 (``1:30`` is 90) numbers are
refused for a number setting, in a config file and in ``--set``, instead of silently training with another value;
split names (``--eval-splits``) that the evaluation files would replace are refused, and files given in a later layer
than a recipe's split names replace them; a format that reads no files refuses ``--eval-file`` / ``--train-file``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2ist.cli import build_parser
from m2ist.cli.errors import CLIError
from m2ist.cli.settings import dump_settings, resolve_settings
from tests.test_hostile import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _print_config(capsys, tmp_path: Path, text: str, *argv: str) -> tuple[int, str, str]:
    config = tmp_path / "run.yaml"
    config.write_text(text, encoding="utf-8")
    return run_cli(capsys, "train", "--config", str(config), *argv, "--print-config")


@pytest.mark.parametrize(("text", "needle"), [
    ("m2ist: {max_query_len: 040}", "reads 040 as the octal number 32"),  # was: max_query_len 32
    ("training: {lr_drop_epochs: [060]}", "reads 060 as the octal number 48"),  # was: the drop at epoch 48
    ("training: {num_train_epochs: 1:30}", "reads 1:30 as the base-60 number 90"),  # was: 90 epochs
    ("training: {learning_rate: 1:0.5}", "base-60 number 60.5"),
])
def test_yaml11_octal_and_base60_numbers_refused_in_config(capsys, tmp_path, text, needle):
    code, out, err = _print_config(capsys, tmp_path, text)
    assert code == 2 and out == "" and needle in err and "decimal" in err


@pytest.mark.parametrize("item", ["m2ist.max_query_len=040", "training.num_train_epochs=1:30"])
def test_yaml11_octal_and_base60_numbers_refused_in_set(capsys, tmp_path, item):
    code, out, err = run_cli(capsys, "train", "--set", item, "--print-config")
    assert code == 2 and out == "" and "YAML 1.1 reads" in err


def test_plain_numbers_and_text_keys_unchanged(capsys, tmp_path):
    code, out, _ = _print_config(capsys, tmp_path, "m2ist: {max_query_len: 40}\ntraining: {num_train_epochs: 0}\n",
                                 "--set", "model.vision_revision=0123456", "--set", "training.lr_drop_epochs=[0]")
    settings = json.loads(out)
    assert code == 0 and settings["m2ist"]["max_query_len"] == 40 and settings["training"]["num_train_epochs"] == 0
    assert settings["model"]["vision_revision"] == "0123456" and settings["training"]["lr_drop_epochs"] == [0]
    code, _, err = _print_config(capsys, tmp_path, "model: {vision_revision: 0123456}")
    assert code == 2 and "got 42798 (int). Write it in quotes" in err


def _resolve(*argv: str) -> dict:
    return resolve_settings(build_parser(argv[0]).parse_args(list(argv)))


@pytest.mark.parametrize("argv", [
    ("--eval-splits", "testA", "--eval-file", "val=all.jsonl"),  # was: only 'val' scored
    ("--set", "data.eval_splits=[testA]", "--set", "data.eval_files={val: all.jsonl}"),
])
def test_split_names_the_files_would_replace_are_refused(argv):
    with pytest.raises(CLIError, match=r"data.eval_splits \(from --.*\) would be ignored"):
        _resolve("eval", "--data-format", "jsonl", *argv)


def test_an_explicit_eval_splits_is_not_dropped_for_a_config_files_eval_files(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: {format: jsonl, eval_files: {val: all.jsonl}}\n", encoding="utf-8")
    with pytest.raises(CLIError, match=r"from --eval-splits.*from the config file"):  # was: the file's 'val' scored
        _resolve("eval", "--config", str(config), "--eval-splits", "testA", "testB")
    data = _resolve("eval", "--config", str(config), "--eval-splits", "testA", "--set", "data.eval_files=null")["data"]
    assert data["eval_splits"] == ["testA"]


def test_files_given_later_replace_a_recipes_split_names(tmp_path):
    settings = _resolve("train", "--config", "refcoco", "--eval-file", "mine=m.pth")
    assert settings["data"]["eval_files"] == ["mine=m.pth"] and "eval_splits" not in settings["data"]
    saved = tmp_path / "m2ist_cli_config.yaml"
    saved.write_text(dump_settings(settings), encoding="utf-8")
    assert _resolve("train", "--config", str(saved))["data"] == settings["data"]


@pytest.mark.parametrize("flag", ["--eval-file", "--train-file"])
def test_a_format_that_reads_no_files_refuses_them(flag):
    with pytest.raises(CLIError, match=f"{flag}: --data-format refer reads no files"):
        _resolve("train", "--data-format", "refer", flag, "x.json")
