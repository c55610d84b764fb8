"""Careless inputs refused, not taken silently: a split file read as another split, list flags given without
values, IoU thresholds given in percent, an adapter recording a tower folder that is not here."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import torch

from m2ist import get_side_tuned_model
from m2ist.cli.errors import CLIError
from m2ist.cli.loading import load_adapter
from m2ist.cli.main import main
from m2ist.data.transvg import load_transvg_split
from tests.ddp_worker import make_processor
from tests.tiny import text_tower, tiny_config, vision_tower

ROW = ("a.jpg", "a.png", [1.0, 2.0, 3.0, 4.0], "the dog", [])


# ---------------------------------------------------------------- TransVG split files


def test_a_split_file_is_never_labelled_with_another_split(tmp_path: Path) -> None:
    """``unc_val.pth`` read with ``split="testA"`` would label every val sample testA: refused, naming both."""
    torch.save([ROW], tmp_path / "unc_val.pth")
    with pytest.raises(ValueError, match=r"'val' split file.*split='testA'"):
        load_transvg_split(tmp_path / "unc_val.pth", split="testA")
    assert load_transvg_split(tmp_path / "unc_val.pth")[0].metadata["split"] == "val"
    # another spelling of the same split agrees with the name
    assert load_transvg_split(tmp_path / "unc_val.pth", split="validation")[0].metadata["split"] == "validation"


def test_a_file_whose_name_names_no_split_takes_the_split_given(tmp_path: Path) -> None:
    torch.save([ROW], tmp_path / "mine.pth")
    torch.save([ROW], tmp_path / "unc_testa.pth")
    assert load_transvg_split(tmp_path / "mine.pth", "unc", split="testA")[0].metadata["split"] == "testA"
    # a split root resolved to another spelling of the split asked for still loads
    assert load_transvg_split(tmp_path, "unc", split="testA")[0].metadata["split"] == "testA"


# ---------------------------------------------------------------- list flags


_TRAIN = ["train", "--vision-model", "a/b", "--text-model", "c/d", "--output-dir", "out", "--print-config"]


@pytest.mark.parametrize("flag", ["--experts", "--vision-layers", "--text-layers", "--resize-choices",
                                  "--label-names"])
def test_a_list_flag_given_without_values_is_refused_where_empty_is_no_setting(flag: str, capsys) -> None:
    """``--experts --epochs 3`` (the values forgotten) used to set ``[]`` silently."""
    assert main([*_TRAIN, flag, "--epochs", "3"]) == 2
    assert f"argument {flag}: expected at least one argument" in capsys.readouterr().err
    assert main([*_TRAIN, flag]) == 2  # at the end of the line too


def test_an_empty_list_stays_possible_where_it_means_something_and_the_help_says_so(capsys) -> None:
    """No LR drops (replacing a recipe's [60]) is a real choice: the flag alone still gives it, and the help says so."""
    assert main([*_TRAIN, "--config", "refcoco", "--lr-drop-epochs", "--epochs", "3"]) == 0
    assert '"lr_drop_epochs": []' in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    start = help_text.index("--lr-drop-epochs [N ...]")
    assert "The flag with no values gives an empty list" in help_text[start:help_text.index("--lr-drop-factor")]


def test_a_list_flag_whose_field_may_be_none_takes_none_as_its_help_says(capsys) -> None:
    """``--vision-layers none`` (the help reads ``[list of int | none]``) was refused as "invalid int value", so a
    config file's layers could not be reset to the automatic choice from the command line."""
    assert main([*_TRAIN, "--set", "m2ist.vision_layers=[0, 1]", "--vision-layers", "none", "--text-layers", "null"]) == 0
    out = capsys.readouterr().out
    assert '"vision_layers": null' in out and '"text_layers": null' in out
    assert main([*_TRAIN, "--vision-layers", "0", "1"]) == 0
    assert '"vision_layers": [\n      0,\n      1\n    ]' in capsys.readouterr().out
    assert main([*_TRAIN, "--vision-layers", "0", "none"]) == 2
    assert "argument --vision-layers: none stands alone" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["eval", "--adapter", "x"], _TRAIN])
def test_iou_thresholds_in_percent_are_refused_when_parsed(command: list[str], capsys) -> None:
    """``--iou-thresholds 75`` was only refused by the evaluation, which `m2ist train` runs after training."""
    assert main([*command, "--iou-thresholds", "0.5", "75"]) == 2
    assert "75 is not in (0, 1]" in capsys.readouterr().err
    assert main([*command, "--iou-thresholds", "0.5", "0.75", "--print-config"]) == 0
    assert '"iou_thresholds": [\n      0.5,\n      0.75\n    ]' in capsys.readouterr().out


# ---------------------------------------------------------------- towers an adapter records


def _adapter(tmp_path: Path, vision_name: str) -> Path:
    """An adapter (with its processor) whose config records ``vision_name`` as its vision tower, and an existing
    text tower folder."""
    vision, text = vision_tower("vit"), text_tower("bert")
    text.save_pretrained(tmp_path / "text")
    vision.config._name_or_path = vision_name
    text.config._name_or_path = str(tmp_path / "text")
    model = get_side_tuned_model(vision, text, tiny_config())
    model.processor = make_processor(tmp_path / "tokenizer")
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.fixture
def no_hub(monkeypatch):
    """Any Hub look-up of a tower fails the test."""

    def refuse(**kwargs):
        raise AssertionError(f"Hub look-up of {kwargs.get('repo_id')!r}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


@pytest.mark.parametrize("name", ["gone/vit-folder/weights", "./gone", "ABSOLUTE"])
def test_an_adapter_recording_a_missing_tower_folder_names_the_field_file_and_flag(
        name: str, tmp_path: Path, monkeypatch, no_hub) -> None:
    """A tower folder moved away, or a relative path read from another working directory: one line naming
    ``vision_model_name_or_path`` in the adapter's ``m2ist_config.json`` and ``--vision-model``, no Hub look-up."""
    name = str(tmp_path / "moved" / "vit") if name == "ABSOLUTE" else name
    adapter = _adapter(tmp_path, name)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(CLIError) as caught:
        load_adapter({"model": {"adapter": str(adapter)}})
    message = str(caught.value)
    assert f"{adapter / 'm2ist_config.json'} records the vision tower as vision_model_name_or_path={name!r}" in message
    assert "does not exist here" in message and "pass --vision-model" in message
    assert ("working directory" in message) is (not Path(name).is_absolute())


def test_a_missing_recorded_folder_replaced_by_a_given_tower_loads(tmp_path: Path, no_hub) -> None:
    """``--vision-model`` replaces the missing folder: the adapter loads with the tower given."""
    adapter = _adapter(tmp_path, str(tmp_path / "moved" / "vit"))
    vision_tower("vit").save_pretrained(tmp_path / "vit_here")
    model, _ = load_adapter({"model": {"adapter": str(adapter), "vision_model": str(tmp_path / "vit_here")}})
    assert model.vision_model.config._name_or_path == str(tmp_path / "vit_here")


# ---------------------------------------------------------------- settings checked before training, files as splits


def test_iou_thresholds_from_a_config_file_are_checked_before_training(tmp_path: Path, capsys) -> None:
    """``evaluation.iou_thresholds: [75]`` in a YAML file (or ``--set``) passed the parser and was refused only by
    the evaluation ``m2ist train`` runs after the whole training run."""
    from m2ist.cli.train import _check_train_settings

    settings = {"model": {"vision_model": "a/b", "text_model": "c/d"}, "training": {"output_dir": "out"},
                "evaluation": {"iou_thresholds": [0.5, 75]}}
    with pytest.raises(CLIError, match=r"evaluation.iou_thresholds: .*\(0, 1\], got 75"):
        _check_train_settings(settings)
    settings["evaluation"]["iou_thresholds"] = []
    with pytest.raises(CLIError, match="at least one IoU threshold"):
        _check_train_settings(settings)
    settings["evaluation"]["iou_thresholds"] = [0.5, 0.75]
    _check_train_settings(settings)
    config = tmp_path / "run.yaml"
    config.write_text("evaluation:\n  iou_thresholds: [75]\n")
    assert main([*_TRAIN[:-1], "--config", str(config), "--train-file", "t.jsonl", "--data-format", "jsonl"]) == 2
    assert "evaluation.iou_thresholds" in capsys.readouterr().err


def test_an_eval_file_named_as_another_split_than_its_file_is_refused(tmp_path: Path) -> None:
    """``--eval-file testA=unc_val.pth`` reported val's samples as testA; the file's stem, a matching name and a
    file whose name names no split are read as before."""
    from m2ist.cli.data import load_data_splits

    torch.save([ROW], tmp_path / "unc_val.pth")
    torch.save([ROW], tmp_path / "mine.pth")
    data = {"format": "transvg", "dataset": "unc"}
    with pytest.raises(ValueError, match=r"'val' split file.*split='testA'"):
        load_data_splits({**data, "eval_files": [f"testA={tmp_path / 'unc_val.pth'}"]}, "eval")
    assert list(load_data_splits({**data, "eval_files": [str(tmp_path / "unc_val.pth")]}, "eval")) == ["unc_val"]
    read = load_data_splits({**data, "eval_files": [f"val={tmp_path / 'unc_val.pth'}"]}, "eval")
    assert read["val"][0].metadata["split"] == "val"
    read = load_data_splits({**data, "eval_files": [f"testA={tmp_path / 'mine.pth'}"]}, "eval")
    assert read["testA"][0].metadata["split"] == "testA"
