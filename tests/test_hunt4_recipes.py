"""Recipes and settings, round 4: a config-file or ``--set`` value of the wrong type is refused naming the key (a
quoted ``"false"`` never turns a switch on, YAML's ``no``/``off`` never reach a text setting as a boolean), a key
repeated in a config file is refused, ``--set`` refuses a key its command does not read, ``m2ist_cli_config.yaml``
reads back to the same settings, the shipped recipes train in float32 like the paper, and ``m2ist eval`` names a
``--processor`` that differs from the adapter's own and keeps the adapter's pinned towers for their recorded names."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from m2ist import RECProcessor
from m2ist.cli import SECTIONS, build_augmentation, build_m2ist_config, build_parser, build_training_arguments, main
from m2ist.cli import loading as cli_loading
from m2ist.cli.settings import dump_settings, load_config_file, plain, resolve_settings
from tests.test_hostile import assert_one_line_error, run_cli
from tests.test_hostile_cli import cli_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return cli_workspace(tmp_path_factory.mktemp("hunt4_recipes"))


def _print_config(capsys, tmp_path: Path, text: str, *argv: str, suffix: str = ".yaml") -> tuple[int, str, str]:
    config = tmp_path / f"run{suffix}"
    config.write_text(text, encoding="utf-8")
    return run_cli(capsys, "train", "--config", str(config), *argv, "--print-config")


# ---------------------------------------------------------------------------------------------- 1. typed values
@pytest.mark.parametrize(("text", "needle"), [
    ("model: {trust_remote_code: 'false'}", "model.trust_remote_code must be true or false"),  # was: runs remote code
    ("data: {trusted: 'no'}", "data.trusted must be true or false"),  # was: unrestricted unpickling
    ("data: {augment: 'false'}", "data.augment must be true or false"),  # was: augmentation on
    ("data: {augment: null}", "Remove the key to keep the default"),  # was: augmentation off
    ("evaluation: {final_eval: null}", "evaluation.final_eval"),  # was: no final evaluation
    ("training: {greater_is_better: 'false'}", "training.greater_is_better"),  # was: the text 'false', truthy
    ("training: {save_strategy: no}", 'write the word in quotes ("no", "off")'),  # YAML 1.1: no -> False
    ("training: {tower_cache: off}", "training.tower_cache must be a string"),
    ("training: {per_device_train_batch_size: 64.5}", "per_device_train_batch_size must be a whole number"),
    ("training: {lr_drop_epochs: 60}", "lr_drop_epochs must be a list of whole numbers"),
    ("model: {vision_revision: 0123456}", "Write it in quotes"),  # YAML 1.1 reads it as the octal 42798
    ("evaluation: {batch_size: 2.7}", "evaluation.batch_size must be a whole number"),  # was: cut to 2
])
def test_config_values_of_the_wrong_type_are_refused_naming_the_key(capsys, tmp_path, text, needle):
    code, out, err = _print_config(capsys, tmp_path, text + "\n")
    assert_one_line_error(code, err, str(tmp_path / "run.yaml"), needle)
    assert out == ""


def test_set_values_are_read_for_the_keys_type(capsys, tmp_path):
    code, out, _ = _print_config(
        capsys, tmp_path, "training: {learning_rate: 1e-4, run_name: 1e3}\nm2ist: {adapter_scale: 1e-1}\n",
        "--set", "training.save_strategy=no", "--set", "model.vision_revision=0123456", "--set", "data.augment=off")
    settings = json.loads(out)
    assert code == 0
    assert settings["training"]["learning_rate"] == 1e-4 and settings["m2ist"]["adapter_scale"] == 0.1  # YAML 1.1
    assert settings["training"]["run_name"] == "1e3"  # text stays text (was the float 1000.0)
    assert settings["training"]["save_strategy"] == "no" and settings["model"]["vision_revision"] == "0123456"
    assert settings["data"]["augment"] is False
    code, _, err = run_cli(capsys, "train", "--set", "data.augment='false'", "--print-config")
    assert_one_line_error(code, err, "--set data.augment='false'", "data.augment must be true or false")


# ---------------------------------------------------------------------------------------------- 2. repeated keys
@pytest.mark.parametrize(("text", "suffix", "needle"), [
    ("training:\n  learning_rate: 1.0e-4\n  learning_rate: 5.0e-2\n", ".yaml", "'learning_rate' appears twice"),
    ("training: {learning_rate: 1.0e-4}\ntraining: {num_train_epochs: 3}\n", ".yaml", "'training' appears twice"),
    ('{"training": {"seed": 1}, "training": {"num_train_epochs": 3}}', ".json", "'training' appears twice"),
    ("learning_rate: 0.1\ntraining: {learning_rate: 0.001}\n", ".yaml", "training.learning_rate is given twice"),
])
def test_a_key_repeated_in_a_config_file_is_refused(capsys, tmp_path, text, suffix, needle):
    code, out, err = _print_config(capsys, tmp_path, text, suffix=suffix)
    assert_one_line_error(code, err, f"run{suffix}", needle)  # YAML and JSON kept the last one silently
    assert out == ""


def test_yaml_merge_keys_may_still_be_overridden(capsys, tmp_path):
    code, out, _ = _print_config(capsys, tmp_path, "training:\n  <<: {learning_rate: 0.1, seed: 3}\n"
                                                   "  learning_rate: 0.2\n")
    assert code == 0 and json.loads(out)["training"] == {"learning_rate": 0.2, "seed": 3}


def test_a_set_key_the_command_does_not_read_is_refused(capsys):
    code, _, err = run_cli(capsys, "train", "--set", "model.adapter=out/refcoco", "--print-config")
    assert_one_line_error(code, err, "does not read model.adapter")  # was: trained from scratch, silently
    code, _, err = run_cli(capsys, "eval", "--set", "augment=false", "--print-config")
    assert_one_line_error(code, err, "`m2ist eval` does not read data.augment")
    assert main(["eval", "--set", "data.eval_splits=[val, testA]", "--print-config"]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- 3. round trip
def test_the_saved_cli_config_reads_back_to_the_same_settings(tmp_path):
    argv = ["train", "--config", "refcocog", "--output-dir", "out", "--run-name", "1e3", "--vision-revision",
            "0123456", "--lr", "3e-4", "--lr-drop-epochs", "5", "--jitter", "0.5", "1.5", "--resume", "--eval-file",
            "val=v.jsonl", "--vision-taps", '{"layers": "encoder.layer.*"}', "--save-strategy", "no", "--tower-cache",
            "off", "--no-augment", "--iou-thresholds", "0.5", "0.75", "--experts", "vea", "iea", "--set",
            "model.text_revision=1e5"]
    first = resolve_settings(build_parser("train").parse_args(argv))
    saved = tmp_path / "m2ist_cli_config.yaml"
    saved.write_text(dump_settings(first), encoding="utf-8")
    again = resolve_settings(build_parser("train").parse_args(["train", "--config", str(saved)]))
    assert plain(again) == plain(first)
    assert again["training"]["run_name"] == "1e3" and again["model"]["text_revision"] == "1e5"


# ---------------------------------------------------------------------------------------------- 4. recipes
@pytest.mark.parametrize("name", ["refcoco", "refcoco+", "refcocog", "referit"])
def test_shipped_recipes_hold_the_papers_training_settings(name, tmp_path):
    settings = {section: {} for section in SECTIONS}
    settings.update(load_config_file(name))
    args = build_training_arguments(settings, output_dir=str(tmp_path))
    assert args.tower_dtype == "float32"  # the paper trained in fp32; "auto" casts the towers to bf16 on a GPU
    assert (args.warmup_steps, args.max_grad_norm, args.weight_decay) == (0, 0.0, 1e-4)
    assert args.lr_scheduler_type.value == "constant" and args.greater_is_better is True
    config = build_m2ist_config(settings)
    assert (config.experts, config.adapter_scale, config.intra_tap, config.inter_tap) == (
        ["vea", "lea", "iea"], 0.1, "ffn", "attention")
    assert (config.box_loss, config.box_loss_weight, config.giou_loss_weight) == ("l1", 1.0, 1.0)
    assert build_augmentation(settings) is not None and settings["data"]["format"] == "transvg"
    assert settings["evaluation"]["iou_thresholds"] == [0.5] and settings["evaluation"]["clamp"] == "image"


# ---------------------------------------------------------------------------------------------- 5. eval inputs
def test_eval_names_a_processor_other_than_the_adapters(workspace, tmp_path, caplog):
    other = tmp_path / "processor"
    RECProcessor.from_pretrained(str(workspace / "bert"), canvas_size=32, max_query_len=3).save_pretrained(other)
    settings = {"model": {"adapter": str(workspace / "adapter"), "processor": str(other)}}
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        model, processor = cli_loading.load_adapter(settings)
    assert processor.max_query_len == 3 and model.processor is processor
    assert "max_query_len: adapter 8, --processor 3" in caplog.text  # was: phrases cut to 3 tokens, silently
    caplog.clear()
    same = tmp_path / "same"
    RECProcessor.from_pretrained(str(workspace / "adapter")).save_pretrained(same)
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        cli_loading.load_adapter({"model": {"adapter": str(workspace / "adapter"), "processor": str(same)}})
    assert "--processor" not in caplog.text


def test_eval_keeps_the_recorded_tower_for_its_recorded_name(workspace, monkeypatch):
    loaded: list[str] = []
    real = cli_loading.load_tower
    monkeypatch.setattr(cli_loading, "load_tower", lambda name, *a, **k: loaded.append(name) or real(name, *a, **k))
    adapter = str(workspace / "adapter")
    cli_loading.load_adapter({"model": {"adapter": adapter, "vision_model": str(workspace / "vit"),
                                        "text_model": str(workspace / "bert")}})  # a training config's towers
    assert loaded == []  # the adapter's own towers, at their recorded commit (was: reloaded, at the Hub's HEAD)
    cli_loading.load_adapter({"model": {"adapter": adapter, "vision_model": str(workspace / "vit"),
                                        "vision_revision": "main"}})
    assert loaded == [str(workspace / "vit")]  # a revision asked for: loaded as asked


def test_a_bare_config_name_says_it_is_not_the_local_copy(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "refcoco.yaml").write_text("training: {num_train_epochs: 1}\n")  # a copy edited here
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        settings = load_config_file("refcoco")
    assert settings["training"]["num_train_epochs"] == 90  # the shipped recipe, as documented
    assert "pass --config ./refcoco.yaml to read yours" in caplog.text  # was: the copy ignored, silently
    assert load_config_file("./refcoco.yaml")["training"] == {"num_train_epochs": 1}
