"""The `m2ist` command line: help, settings precedence, shipped configs, train -> eval -> predict, errors."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from m2ist import cli
from m2ist.cli import SECTIONS, build_m2ist_config, build_training_arguments, load_config_file, main
from tests.test_inference import make_tokenizer
from tests.tiny import text_tower, vision_tower

TINY_SETTINGS = {
    "m2ist": {"bottleneck": 8, "fusion_dim": 32, "fusion_layers": 1, "fusion_heads": 2, "fusion_ffn_dim": 64,
              "max_query_len": 8},
    "training": {"num_train_epochs": 1, "per_device_train_batch_size": 2, "save_strategy": "no", "use_cpu": True,
                 "disable_tqdm": True, "report_to": "none"},
    "evaluation": {"progress": False},
}


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- help
@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("train", ["--vision-model", "--text-model", "--trust-remote-code", "--data-format", "--train-file",
                   "--eval-splits", "--box-format", "--bottleneck", "--max-query-len", "--epochs", "--batch-size",
                   "--lr", "--side-lr", "--lr-drop-epochs", "--output-dir", "--method", "--resume", "--config",
                   "--set"]),
        ("eval", ["--adapter", "--data-format", "--eval-splits", "--eval-file", "--iou-thresholds", "--output",
                  "--save-predictions", "--config", "--set"]),
        ("predict", ["--adapter", "--image", "--text", "--draw", "--batch-size"]),
    ],
)
def test_help_of_each_command_lists_its_key_flags(capsys, command, flags):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    for flag in flags:
        assert flag in out, flag


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("train", "eval", "predict", "demo", "bench", "compare"):
        assert command in out
    code, _, err = run(capsys)
    assert code == 2 and "usage" in err


def test_passthrough_commands_forward_their_arguments(capsys, monkeypatch):
    received = []
    module = types.ModuleType("m2ist._fake_compare")
    module.__spec__ = importlib.machinery.ModuleSpec("m2ist._fake_compare", None)
    module.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "m2ist._fake_compare", module)
    monkeypatch.setitem(cli.PASSTHROUGH, "compare", "m2ist._fake_compare")
    assert main(["compare", "--methods", "full,m2ist", "--help"]) == 3
    assert received == [["--methods", "full,m2ist", "--help"]]

    monkeypatch.setitem(cli.PASSTHROUGH, "compare", "m2ist._no_such_module")
    code, _, err = run(capsys, "compare")
    assert code == 2 and "not available" in err


# ---------------------------------------------------------------------------------------------- settings
def test_flags_beat_set_which_beats_the_config_file(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "m2ist: {bottleneck: 32, max_query_len: 40}\n"
        "training: {num_train_epochs: 10, learning_rate: 1e-4, output_dir: from_file}\n"  # YAML 1.1 reads 1e-4 as text
        "data: {format: jsonl, eval_splits: [val]}\n"
    )
    code, out, _ = run(capsys, "train", "--config", str(config), "--set", "training.num_train_epochs=20",
                       "--set", "bottleneck=64", "--set", "data.eval_splits=[val, test]", "--epochs", "30",
                       "--print-config")
    assert code == 0
    settings = json.loads(out)
    assert settings["training"]["num_train_epochs"] == 30  # flag > --set > file
    assert settings["m2ist"]["bottleneck"] == 64  # --set > file
    assert settings["m2ist"]["max_query_len"] == 40  # file only
    assert settings["training"]["learning_rate"] == 1e-4 and isinstance(settings["training"]["learning_rate"], float)
    assert settings["data"]["eval_splits"] == ["val", "test"]

    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps({"training": {"num_train_epochs": 5}, "bottleneck": 16}))
    code, out, _ = run(capsys, "train", "--config", str(as_json), "--print-config")
    settings = json.loads(out)
    assert code == 0 and settings["training"]["num_train_epochs"] == 5 and settings["m2ist"]["bottleneck"] == 16


def test_bad_settings_are_reported_without_traceback(capsys, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("m2ist: {botleneck: 32}\n")
    code, _, err = run(capsys, "train", "--config", str(config), "--print-config")
    assert code == 2 and "botleneck" in err and "Traceback" not in err
    code, _, err = run(capsys, "train", "--set", "seed=3", "--print-config")  # in training and augmentation
    assert code == 2 and "training.seed" in err and "augmentation.seed" in err
    code, _, err = run(capsys, "train", "--set", "nonsense", "--print-config")
    assert code == 2 and "key=value" in err
    code, _, err = run(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml" in err and "refcoco" in err


PAPER = {  # config: (max_query_len, epochs, lr drops, transvg dataset)
    "refcoco": (20, 90, [60], "unc"),
    "refcoco+": (20, 180, [120], "unc+"),
    "refcocog": (40, 90, [60], "gref_umd"),
    "referit": (20, 90, [60], "referit"),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_shipped_configs_map_to_the_papers_settings(name, tmp_path):
    assert (cli.CONFIG_DIR / f"{name}.yaml").is_file()
    settings = {section: {} for section in SECTIONS}
    settings.update(load_config_file(name))
    config = build_m2ist_config(settings)
    args = build_training_arguments(settings, output_dir=str(tmp_path))
    query_len, epochs, drops, dataset = PAPER[name]
    assert (config.image_size, config.max_query_len, config.bottleneck) == (640, query_len, 128)
    assert (args.num_train_epochs, args.lr_drop_epochs, args.lr_drop_factor) == (epochs, drops, 0.1)
    assert (args.learning_rate, args.side_learning_rate, args.weight_decay) == (1e-4, 1e-5, 1e-4)
    assert args.per_device_train_batch_size == 64 and args.method == "m2ist"
    assert args.metric_for_best_model == "val_acc@0.5" and args.load_best_model_at_end
    assert settings["model"] == {"vision_model": "facebook/detr-resnet-50", "text_model": "bert-base-uncased"}
    assert settings["data"]["format"] == "transvg" and settings["data"]["dataset"] == dataset


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Tiny towers saved like Hub checkpoints, four images and JSONL annotations (xywh boxes)."""
    root = tmp_path_factory.mktemp("cli")
    vision_tower("vit").save_pretrained(root / "vit")
    text_tower("bert").save_pretrained(root / "bert")
    make_tokenizer(root / "vocab").save_pretrained(root / "bert")
    rng = np.random.default_rng(0)
    rows = []
    for index in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / f"img{index}.png")
        rows.append({"image": f"img{index}.png", "text": ["the red square", "a blue circle"][index % 2],
                     "bbox": [5 + index, 5, 20, 15]})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY_SETTINGS))
    return root


@pytest.fixture(scope="module")
def trained(workspace) -> Path:
    output = workspace / "adapter"
    code = main(["train", "--config", str(workspace / "tiny.yaml"), "--vision-model", str(workspace / "vit"),
                 "--text-model", str(workspace / "bert"), "--data-format", "jsonl", "--box-format", "xywh",
                 "--train-file", str(workspace / "train.jsonl"), "--eval-file", f"val={workspace / 'val.jsonl'}",
                 "--output-dir", str(output), "--seed", "1"])
    assert code == 0
    return output


def test_train_writes_adapter_processor_and_results(trained):
    for name in ("m2ist_config.json", "m2ist_model.safetensors", "m2ist_processor.json", "m2ist_cli_config.yaml",
                 "eval_results.json"):
        assert (trained / name).is_file(), name
    saved_config = json.loads((trained / "m2ist_config.json").read_text())
    assert saved_config["bottleneck"] == 8 and Path(saved_config["vision_model_name_or_path"]).is_absolute()
    results = json.loads((trained / "eval_results.json").read_text())
    assert results["metrics"]["val"]["count"] == 3
    assert json.loads((trained / "m2ist_processor.json").read_text())["max_query_len"] == 8


def test_eval_scores_a_saved_adapter(trained, workspace, capsys, tmp_path):
    output = tmp_path / "results.json"
    code, out, err = run(capsys, "eval", "--adapter", str(trained), "--data-format", "jsonl", "--box-format", "xywh",
                         "--eval-file", f"val={workspace / 'val.jsonl'}", "--iou-thresholds", "0.5", "0.75",
                         "--output", str(output), "--save-predictions", "--no-progress")
    assert code == 0, err
    results = json.loads(output.read_text())
    metrics = results["metrics"]["val"]
    assert metrics["count"] == 3 and {"acc@0.5", "acc@0.75", "miou"} <= set(metrics)
    assert len(results["predictions"]["val"]) == 3
    after_training = json.loads((trained / "eval_results.json").read_text())["metrics"]["val"]
    assert metrics["miou"] == pytest.approx(after_training["miou"], abs=1e-6)  # same weights after reloading
    assert "val" in out and "acc@0.5" in out


def test_predict_prints_boxes_and_draws_them(trained, workspace, capsys, tmp_path):
    image = workspace / "img0.png"
    drawing = tmp_path / "boxes.png"
    code, out, err = run(capsys, "predict", "--adapter", str(trained), "--image", str(image), "--text",
                         "the red square", "a blue circle", "--draw", str(drawing))
    assert code == 0, err
    records = json.loads(out)
    assert [r["text"] for r in records] == ["the red square", "a blue circle"]
    for record in records:
        x0, y0, x1, y1 = record["box_xyxy"]
        assert 0 <= x0 <= x1 <= 60 and 0 <= y0 <= y1 <= 40
    with Image.open(drawing) as drawn:
        assert drawn.size == (60, 40)


# ---------------------------------------------------------------------------------------------- errors
def test_missing_data_file_and_unknown_format_are_usage_errors(workspace, capsys):
    base = ["train", "--config", str(workspace / "tiny.yaml"), "--vision-model", str(workspace / "vit"),
            "--text-model", str(workspace / "bert"), "--output-dir", str(workspace / "unused")]
    code, _, err = run(capsys, *base, "--data-format", "jsonl", "--box-format", "xywh", "--train-file", "nope.jsonl")
    assert code == 2 and "nope.jsonl" in err and "Traceback" not in err
    code, _, err = run(capsys, *base, "--data-format", "xml", "--train-file", "x")
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, *base, "--set", "data.format=xml", "--train-file", "x")
    assert code == 2 and "xml" in err and "jsonl" in err
    code, _, err = run(capsys, *base, "--data-format", "jsonl", "--train-file", str(workspace / "train.jsonl"))
    assert code == 2 and "--box-format" in err
    code, _, err = run(capsys, "train", "--data-format", "jsonl", "--output-dir", "x")
    assert code == 2 and "--vision-model" in err


def test_eval_and_predict_explain_missing_inputs(workspace, capsys):
    code, _, err = run(capsys, "eval", "--adapter", str(workspace / "no_adapter"), "--data-format", "jsonl",
                       "--box-format", "xywh", "--eval-file", str(workspace / "val.jsonl"))
    assert code == 2 and "no_adapter" in err
    code, _, err = run(capsys, "predict", "--adapter", str(workspace), "--image", str(workspace / "missing.png"),
                       "--text", "the dog")
    assert code == 2 and "missing.png" in err and "Traceback" not in err
    code, _, err = run(capsys, "predict", "--adapter", str(workspace), "--image", "a.png", "b.png", "--text",
                       "x", "y", "z")
    assert code == 2 and "one phrase per image" in err


def test_baseline_checkpoints_train_but_are_refused_by_predict(workspace, capsys):
    output = workspace / "full"
    code, _, err = run(capsys, "train", "--config", str(workspace / "tiny.yaml"), "--vision-model", str(workspace / "vit"),
                       "--text-model", str(workspace / "bert"), "--data-format", "jsonl", "--box-format", "xywh",
                       "--train-file", str(workspace / "train.jsonl"), "--output-dir", str(output), "--method", "full")
    assert code == 0, err
    assert (output / "m2ist_model.safetensors").is_file() and (output / "m2ist_processor.json").is_file()
    code, _, err = run(capsys, "predict", "--adapter", str(output), "--image", str(workspace / "img0.png"), "--text", "a")
    assert code == 2 and "'full' baseline" in err


def test_train_final_evaluation_takes_the_evaluation_settings(workspace, capsys, monkeypatch):
    """``train --help`` lists evaluation.save_predictions and evaluation.device: the final evaluation honours both
    (as `m2ist eval` does) and ``--eval-batch-size``, and a device this machine cannot use is refused in one line
    before any training."""
    import m2ist.evaluation

    calls = []
    real_evaluate = m2ist.evaluation.evaluate
    monkeypatch.setattr(m2ist.evaluation, "evaluate", lambda *a, **kw: calls.append(kw) or real_evaluate(*a, **kw))
    base = ["train", "--config", str(workspace / "tiny.yaml"), "--vision-model", str(workspace / "vit"),
            "--text-model", str(workspace / "bert"), "--data-format", "jsonl", "--box-format", "xywh",
            "--train-file", str(workspace / "train.jsonl"), "--eval-file", f"val={workspace / 'val.jsonl'}"]
    output = workspace / "with_predictions"
    code, _, err = run(capsys, *base, "--output-dir", str(output), "--set", "evaluation.save_predictions=true",
                       "--set", "evaluation.device=cpu", "--eval-batch-size", "3")
    assert code == 0, err
    assert calls[-1]["device"] == "cpu" and calls[-1]["save_predictions"] is True
    assert calls[-1]["batch_size"] == 3  # --eval-batch-size reaches the final evaluation too
    assert len(json.loads((output / "eval_results.json").read_text())["predictions"]["val"]) == 3
    refused = workspace / "bad_device"
    code, _, err = run(capsys, *base, "--output-dir", str(refused), "--set", "evaluation.device=nonsense")
    assert code == 2 and "'nonsense' is not a device" in err and "Traceback" not in err
    assert not refused.exists()  # refused before training
