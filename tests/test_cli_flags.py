"""The command line is generated from the dataclasses: every field a flag, choices shown, each command its own options."""

from __future__ import annotations

import argparse
import dataclasses
import json

from m2ist.cli import build_augmentation, build_m2ist_config, build_parser, build_training_arguments, main, resolve_settings
from m2ist.cli.flags import ALIASES, M2IST_CHOICES, HelpFormatter
from m2ist.config import M2ISTConfig
from m2ist.data.transforms import RECAugmentation
from m2ist.trainer import RECTrainingArguments


def _init_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser(command)
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _dests(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {action.dest: action for action in parser._actions}


def _help(capsys, command: str) -> str:
    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def test_every_dataclass_field_is_a_flag_of_train():
    dests = _dests(_subparser("train"))
    expected = ({f"m2ist.{name}" for name in _init_fields(M2ISTConfig) - set(M2ISTConfig.RECORDED_FIELDS)}
                | {f"training.{name}" for name in _init_fields(RECTrainingArguments)}
                | {f"augmentation.{name}" for name in _init_fields(RECAugmentation)})
    assert len(expected) > 150
    assert sorted(expected - set(dests)) == []
    assert not {f"m2ist.{name}" for name in M2ISTConfig.RECORDED_FIELDS} & set(dests)  # the towers are recorded, not set
    for dest, action in dests.items():  # kebab-case, or the section in front where two sections share a name
        if dest.startswith(("m2ist.", "training.", "augmentation.")):
            section, name = dest.split(".", 1)
            assert {f"--{name.replace('_', '-')}", f"--{section}-{name.replace('_', '-')}"} & set(action.option_strings)


def test_the_fields_a_model_fills_in_are_the_recorded_ones_and_no_flag_sets_them():
    """What wrapping the towers writes into the config (their names, classes, dtypes, sizes) is recorded, not a
    setting: a flag for it would let a run claim other towers than it trained on."""
    import dataclasses

    from m2ist import get_side_tuned_model
    from tests.tiny import text_tower, tiny_config, vision_tower

    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    filled = {f.name for f in dataclasses.fields(M2ISTConfig)
              if getattr(model.config, f.name) != getattr(tiny_config(), f.name)}
    assert {"vision_model_class", "vision_dtype", "text_model_class", "text_width"} <= filled
    assert filled <= set(M2ISTConfig.RECORDED_FIELDS)
    assert not {f"m2ist.{name}" for name in filled} & set(_dests(_subparser("train")))


def test_choices_types_and_defaults_are_shown(capsys):
    dests = _dests(_subparser("train"))
    for name, choices in M2IST_CHOICES.items():
        assert set(choices) <= set(dests[f"m2ist.{name}"].choices), name
        for choice in choices:  # every choice offered is one the config accepts
            M2ISTConfig(**{name: [choice] if name == "experts" else choice})
    assert set(dests["training.eval_strategy"].choices) == {"no", "steps", "epoch"}
    assert "lora" in dests["training.method"].choices
    out = _help(capsys, "train")
    assert "--box-loss {l1,smooth_l1}" in out and "--layer-pairing {first,spread}" in out
    assert "--fusion-norm {post,pre}" in out and "--save-strategy {no,steps,epoch,best}" in out
    assert "[int; default: 128]" in out  # --bottleneck
    assert "NAME" not in out.split("--intra-tap")[1][:30]


def test_the_short_aliases_are_kept(capsys):
    dests = _dests(_subparser("train"))
    for dest, aliases in ALIASES.items():
        assert set(aliases) <= set(dests[dest].option_strings), dest
    for flag in ("--lr", "--epochs", "--batch-size", "--side-lr", "--resume", "--num-workers", "--eval-batch-size",
                 "--seed", "--output-dir", "--max-steps", "--method", "--lr-drop-epochs", "--no-augment"):
        assert flag in _help(capsys, "train"), flag


def test_generated_flags_build_the_library_objects(capsys):
    argv = ["train", "--output-dir", "out", "--experts", "vea", "iea", "--vote-window", "none", "--box-readout",
            "vote", "--backbone-dtype", "bfloat16", "--vision-taps", '{"layers": "encoder.layer.*", "attention": "x"}',
            "--vision-layers", "0", "1", "--text-layers", "0", "1", "--no-share-iea-up-projection", "--lr", "3e-4",
            "--epochs", "2",
            "--lr-scheduler-type", "cosine", "--warmup-steps", "5", "--lr-scheduler-kwargs", '{"num_cycles": 1}',
            "--report-to", "none", "--no-flush-denormal", "--data-seed", "7", "--use-cpu", "--resume",
            "--jitter", "0.5", "1.5", "--no-hflip", "--crop-p", "0.25", "--augmentation-seed", "3", "--seed", "11"]
    namespace = build_parser("train").parse_args(argv)
    settings = resolve_settings(namespace)
    config = build_m2ist_config(settings)
    assert config.experts == ["vea", "iea"] and config.vote_window is None and config.backbone_dtype == "bfloat16"
    assert config.vision_taps == {"layers": "encoder.layer.*", "attention": "x"} and config.vision_layers == [0, 1]
    assert config.share_iea_up_projection is False
    training = build_training_arguments(settings)
    assert (training.learning_rate, training.num_train_epochs, training.warmup_steps) == (3e-4, 2.0, 5)
    assert training.lr_scheduler_type.value == "cosine" and training.lr_scheduler_kwargs == {"num_cycles": 1}
    assert training.report_to == []  # "none" is report_to's own word, not None
    assert training.flush_denormal is False and training.data_seed == 7 and training.use_cpu and training.seed == 11
    assert settings["training"]["resume_from_checkpoint"] is True  # bare --resume: the last checkpoint
    augmentation = build_augmentation(settings)
    assert augmentation.jitter == [0.5, 1.5] or tuple(augmentation.jitter) == (0.5, 1.5)
    assert augmentation.hflip is False and augmentation.crop_p == 0.25 and augmentation.seed == 3

    none = resolve_settings(build_parser("train").parse_args(["train", "--backbone-dtype", "none", "--method", "none"]))
    assert none["m2ist"]["backbone_dtype"] is None and none["training"]["method"] is None

    assert main(["train", "--box-loss", "huber"]) == 2
    assert "invalid choice: 'huber'" in capsys.readouterr().err


def test_flags_still_beat_set_and_the_config_file_for_generated_flags(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("augmentation: {hflip_p: 0.1, crop_p: 0.2}\ntraining: {warmup_steps: 1, adam_beta2: 0.9}\n")
    code = main(["train", "--config", str(config), "--set", "augmentation.hflip_p=0.3", "--set", "warmup_steps=2",
                 "--hflip-p", "0.4", "--print-config"])
    settings = json.loads(capsys.readouterr().out)
    assert code == 0
    assert settings["augmentation"] == {"hflip_p": 0.4, "crop_p": 0.2}
    assert settings["training"] == {"warmup_steps": 2, "adam_beta2": 0.9}


def test_predict_and_eval_show_only_their_own_options(capsys):
    for command in ("predict", "eval"):
        foreign = [dest for dest in _dests(_subparser(command)) if dest.startswith(("training.", "m2ist.", "augmentation."))]
        assert foreign == [], command
    predict = _help(capsys, "predict")
    assert "training" not in predict and "augmentation" not in predict and "M2ISTConfig" not in predict
    assert "--set KEY=VALUE" in predict and "(model, evaluation)" in predict  # the sections --set takes
    assert "m2ist train --" not in predict and "m2ist predict --adapter" in predict  # its own example only
    evaluate = _help(capsys, "eval")
    assert "training" not in evaluate and "(model, data, evaluation)" in evaluate
    assert "--train-file" not in evaluate and "--data-format" in evaluate
    assert main(["predict", "--set", "training.num_train_epochs=3", "--image", "x", "--text", "y"]) == 2
    assert "takes no training settings" in capsys.readouterr().err


def test_evidence_commands_share_the_help_layout(capsys, monkeypatch):
    import argparse as argparse_module

    used = []
    original = argparse_module.ArgumentParser.__init__

    def record(self, *args, **kwargs):
        used.append((kwargs.get("prog"), kwargs.get("formatter_class")))
        original(self, *args, **kwargs)

    monkeypatch.setattr(argparse_module.ArgumentParser, "__init__", record)
    for command in ("demo", "bench", "compare"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"usage: m2ist {command}" in out and "-v, --verbose" in out
    formatters = {prog: formatter for prog, formatter in used if prog and prog.startswith("m2ist ")}
    assert formatters == {"m2ist demo": HelpFormatter, "m2ist bench": HelpFormatter, "m2ist compare": HelpFormatter}


def test_commands_other_than_train_do_not_import_the_trainer():
    """The training flags need RECTrainingArguments (transformers' Trainer: seconds to import): only train builds them."""
    import subprocess
    import sys

    code = ("import sys; from m2ist.cli.main import build_parser; "
            "build_parser('predict').parse_args(['predict', '--adapter', 'a', '--image', 'x', '--text', 'y']); "
            "build_parser('eval').parse_args(['eval', '--adapter', 'a']); build_parser(''); "
            "print('m2ist.trainer' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
