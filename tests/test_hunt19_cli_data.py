"""Silent faults of the command line, the data files and evaluation (fault hunt 19): a data setting the chosen
``--data-format`` ignores, evaluation data that is the training data, evaluation settings checked only after
training."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from PIL import Image

from m2ist.cli import build_parser
from m2ist.cli.data import load_data_splits
from m2ist.cli.errors import CLIError
from m2ist.cli.settings import resolve_settings
from tests.test_hostile import assert_one_line_error, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def _resolve(*argv: str) -> dict:
    return resolve_settings(build_parser(argv[0]).parse_args(list(argv)))


@pytest.fixture
def files(tmp_path) -> Path:
    """Three 60x40 images and ``val.jsonl`` (one expression each, xywh boxes) in ``tmp_path``."""
    for index in range(3):
        Image.new("RGB", (60, 40), (index * 60, 90, 200)).save(tmp_path / f"img{index}.png")
    rows = [{"image": f"img{i}.png", "text": f"the square {i}", "bbox": [5 + i, 5, 20, 15]} for i in range(3)]
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


# ---------------------------------------------------------------------------------------------- 1. format settings
@pytest.mark.parametrize(("fmt", "setting", "readers"), [
    ("jsonl", {"sentence_field": "raw"}, "refer, hf"),  # was: the JSONL's refer-style sentences read as 'sent'
    ("jsonl", {"text_column": "query"}, "hf"),  # was: the 'text' key read
    ("coco", {"split_by": "google"}, "refer"),
    ("jsonl", {"data_root": "/data"}, "refer, transvg, hf"),  # was: images still read beside the file
    ("refer", {"box_format": "xyxy"}, "jsonl, csv, coco, hf"),  # was: boxes read as COCO xywh all the same
    ("transvg", {"normalized": True}, "jsonl, csv, coco, hf"),
    ("hf", {"trusted": True}, "transvg"),
])
def test_a_data_setting_the_format_does_not_read_is_refused(files, fmt, setting, readers):
    key = next(iter(setting))
    flag = "--" + key.replace("_", "-")
    data = {"format": fmt, "eval_files": [str(files / "val.jsonl")], **setting}
    with pytest.raises(CLIError, match=rf"^{flag} / data\.{key} applies to --data-format {readers}, not {fmt}, "
                                       r"which would ignore it: drop it"):
        load_data_splits(data, "eval")  # refused before anything is read


def test_a_jsonl_read_with_what_it_reads_still_loads(files):
    data = {"format": "jsonl", "box_format": "xywh", "eval_files": [str(files / "val.jsonl")],
            "normalized": False, "sentence_field": None, "trusted": False}  # unset, as a saved config writes them
    assert len(load_data_splits(data, "eval")["val"]) == 3


def test_a_recipes_settings_of_another_format_are_dropped_and_a_flags_refused(tmp_path):
    """``--config refcoco`` (transvg: ``data_root``, ``dataset``) with ``--data-format jsonl``: the recipe's
    transvg settings belong to the format replaced and go; a flag the new format would ignore is refused."""
    data = _resolve("train", "--config", "refcoco", "--data-format", "jsonl", "--box-format", "xywh",
                    "--train-file", "t.jsonl")["data"]
    assert "dataset" not in data and "data_root" not in data and data["box_format"] == "xywh"
    data = _resolve("train", "--config", "refcoco", "--box-format", "xyxy")["data"]  # transvg, from the recipe
    with pytest.raises(CLIError, match=r"--box-format / data\.box_format applies to .*, not transvg"):
        load_data_splits(data, "train")
    config = tmp_path / "mine.yaml"  # one layer saying both: refused
    config.write_text("data: {format: jsonl, sentence_field: raw}\n", encoding="utf-8")
    data = _resolve("eval", "--config", str(config), "--eval-file", "val.jsonl")["data"]
    with pytest.raises(CLIError, match=r"--sentence-field / data\.sentence_field applies to --data-format refer, hf"):
        load_data_splits(data, "eval")


def test_the_command_line_refuses_an_ignored_data_setting_in_one_line(files, capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--vision-model", "v", "--text-model", "t", "--output-dir",
                             str(tmp_path / "out"), "--data-format", "jsonl", "--box-format", "xywh", "--train-file",
                             str(files / "val.jsonl"), "--sentence-field", "raw")
    assert_one_line_error(code, err, "--sentence-field / data.sentence_field applies to --data-format refer, hf, not "
                                     "jsonl", exit_code=2)
    assert out == "" and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- 2. train = eval
def _train_until_towers(capsys, monkeypatch, files: Path, *data_argv: str) -> tuple[int, str]:
    """``m2ist train`` with ``data_argv``, stopped where it would load the towers (the data is loaded by then)."""
    import m2ist.cli.train

    def stop(*args, **kwargs):
        raise CLIError("stopped before the towers")

    monkeypatch.setattr(m2ist.cli.train, "load_tower", stop)
    code, _, err = run_cli(capsys, "train", "--vision-model", "v", "--text-model", "t", "--output-dir",
                           str(files / "out"), "--data-format", "jsonl", "--box-format", "xywh", *data_argv)
    assert "stopped before the towers" in err, err
    return code, err


def test_evaluating_on_the_training_data_is_warned_about(files, capsys, monkeypatch, caplog):
    """``--train-file f --eval-file f`` (or a file of several splits read whole as both) scored the training
    expressions as if held out, without a word."""
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        _train_until_towers(capsys, monkeypatch, files, "--train-file", str(files / "val.jsonl"), "--eval-file",
                            f"val={files / 'val.jsonl'}")
    warned = [r.getMessage() for r in caplog.records if "shares" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(
        "The evaluation split 'val' shares 3 of its 3 expressions with the training data (same image, expression "
        f"and box; e.g. {files / 'img0.png'} 'the square 0'): its scores measure the fit to the training data"), warned

    rows = [json.loads(line) for line in (files / "val.jsonl").read_text().splitlines()]
    mixed = files / "all.jsonl"  # train: rows 0, 1; val: row 2 and a copy of row 1 (leaked)
    mixed.write_text("".join(json.dumps({**row, "split": split}) + "\n" for row, split in
                             zip([*rows, rows[1]], ["train", "train", "val", "val"])))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        _train_until_towers(capsys, monkeypatch, files, "--train-file", str(mixed), "--eval-file", f"val={mixed}",
                            "--eval-file", f"test={files / 'val.jsonl'}")
    warned = [r.getMessage() for r in caplog.records if "shares" in r.getMessage()]
    assert [message.split(" with ")[0] for message in warned] == [
        "The evaluation split 'val' shares 1 of its 2 expressions", "The evaluation split 'test' shares 2 of its 3 "
        "expressions"], warned


def test_held_out_evaluation_data_gives_no_warning(files, capsys, monkeypatch, caplog):
    rows = [json.loads(line) for line in (files / "val.jsonl").read_text().splitlines()]
    mixed = files / "all.jsonl"
    mixed.write_text("".join(json.dumps({**row, "split": "train" if i < 2 else "val"}) + "\n"
                             for i, row in enumerate(rows)))
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        _train_until_towers(capsys, monkeypatch, files, "--train-file", str(mixed), "--eval-file", f"val={mixed}")
    assert not [r for r in caplog.records if "shares" in r.getMessage()]


# ---------------------------------------------------------------------------------------------- 3. train's scoring
@pytest.mark.parametrize(("setting", "needle"), [
    ("evaluation.clamp=Canvas", "evaluation.clamp (--clamp) is 'Canvas'; give one of image, canvas"),
    ("evaluation.num_workers=-1", "evaluation.num_workers is -1; give a whole number of at least 0"),
    ("evaluation.batch_size=0", "evaluation.batch_size is 0; give a whole number of at least 1"),  # was: ignored
])
def test_train_checks_its_final_evaluations_settings_before_training(files, capsys, monkeypatch, setting, needle):
    """These failed the evaluation ``m2ist train`` runs after the whole training run (a batch size of 0 was
    silently replaced by the training's evaluation batch size)."""
    import m2ist.cli.train

    monkeypatch.setattr(m2ist.cli.train, "load_data_splits", lambda *a: pytest.fail("data loaded"))
    code, out, err = run_cli(capsys, "train", "--vision-model", "v", "--text-model", "t", "--output-dir",
                             str(files / "out"), "--data-format", "jsonl", "--box-format", "xywh", "--train-file",
                             str(files / "val.jsonl"), "--eval-file", str(files / "val.jsonl"), "--set", setting)
    assert_one_line_error(code, err, needle, exit_code=2)
    assert out == ""


# ---------------------------------------------------------------------------------------------- 4. several texts
def test_records_with_texts_under_several_keys_say_which_one_is_read(files):
    """``{"text": <a caption of the image>, "phrase": <the referring expression>}``: 'text' came first among the
    text keys and was read, the phrase was left in metadata (or, for table rows, dropped) without a word."""
    from m2ist.data.files import load_coco_style, load_csv, load_jsonl
    from m2ist.data.hf import from_hf_dataset

    row = {"image": "img0.png", "text": "a blue picture", "phrase": "the square", "bbox": [5, 5, 20, 15]}
    second = {**row, "phrase": "a blue picture", "bbox": [6, 5, 20, 15]}  # its texts agree
    (files / "two.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(second) + "\n")
    (files / "two.csv").write_text("image,text,phrase,bbox\nimg0.png,a blue picture,the square,5 5 20 15\n")
    coco = {"images": [{"id": 1, "file_name": "img0.png"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [5, 5, 20, 15], "text": "a blue picture",
                             "phrase": "the square"}]}
    (files / "two.json").write_text(json.dumps(coco))
    message = (r"1 record\(s\) hold different texts under several text keys \(first at {where}: 'text' and "
               r"'phrase'\), and only 'text' is read as the referring expression .*: if another {what} holds it")
    for load, where in ((lambda: load_jsonl(files / "two.jsonl", "xywh"), r".*two\.jsonl:1"),  # line 2: one text
                        (lambda: load_csv(files / "two.csv", "xywh"), r".*two\.csv:2"),
                        (lambda: load_coco_style(files / "two.json"), r".*two\.json annotations\[0\]")):
        with pytest.warns(UserWarning, match=message.format(where=where, what="key")):
            samples = load()
        assert samples[0].expression == "a blue picture"
    with pytest.warns(UserWarning, match=message.format(where="row 0", what="column") + r", pass text_column="):
        from_hf_dataset([row], "xywh", files)
    assert from_hf_dataset([row], "xywh", files, text_column="phrase")[0].expression == "the square"  # no warning


def test_one_text_key_or_repeated_texts_give_no_warning(files, recwarn):
    from m2ist.data.files import load_jsonl

    assert len(load_jsonl(files / "val.jsonl", "xywh")) == 3
    row = {"image": "img0.png", "text": "the square", "caption": "the square", "phrase": "", "bbox": [5, 5, 20, 15]}
    (files / "same.jsonl").write_text(json.dumps(row) + "\n")
    assert load_jsonl(files / "same.jsonl", "xywh")[0].expression == "the square"
    assert not [w for w in recwarn if "several text keys" in str(w.message)]


def test_a_configuration_name_for_a_saved_hf_folder_is_refused(files):
    """``--data-format hf --data-root saved/ --dataset refcoco+``: ``load_from_disk`` takes no configuration, so the
    folder's rows were read whatever --dataset said."""
    datasets = pytest.importorskip("datasets")
    rows = [{"image": str(files / "img0.png"), "text": "the square", "bbox": [5, 5, 20, 15]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(files / "saved"))
    data = {"format": "hf", "data_root": str(files / "saved"), "box_format": "xywh", "eval_splits": ["all"]}
    assert len(load_data_splits(data, "eval")["all"]) == 1
    with pytest.raises(CLIError, match=r"--dataset refcoco\+ names a configuration of a Hub dataset, but --data-root "
                                       r".*saved is a folder written by save_to_disk, which has none"):
        load_data_splits({**data, "dataset": "refcoco+"}, "eval")


# ---------------------------------------------------------------------------------------------- 5. a split twice
@pytest.mark.parametrize(("names", "needle"), [
    (["val", "validation"], "names the split 'val' twice ('val' and 'validation' are one split)"),
    (["testA", "testa"], "names the split 'testA' twice ('testA' and 'testa' are one split)"),
    ("val testA val", "names the split 'val' twice: give each split once"),
])
def test_one_evaluation_split_named_twice_is_refused(files, names, needle):
    """Each name loaded the split again and scored it under its own name (two table rows, twice the evaluation
    time in training), or, repeated, once without a word."""
    datasets = pytest.importorskip("datasets")
    rows = [{"image": str(files / "img0.png"), "text": "the square", "bbox": [5, 5, 20, 15], "split": "val"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(files / "saved"))
    data = {"format": "hf", "data_root": str(files / "saved"), "box_format": "xywh"}
    with pytest.raises(CLIError, match=re.escape(needle)):
        load_data_splits({**data, "eval_splits": names}, "eval")
    assert list(load_data_splits({**data, "eval_splits": ["validation"]}, "eval")) == ["validation"]


# ---------------------------------------------------------------------------------------------- 6. the environment
def test_accelerate_variables_that_change_training_are_warned_about(monkeypatch, caplog, tmp_path):
    """``ACCELERATE_MIXED_PRECISION=fp16`` (left by ``accelerate config``) made transformers train in fp16, and
    ``ACCELERATE_USE_CPU=1`` on the CPU, while the settings (and m2ist_cli_config.yaml) said float32 on the GPU."""
    from m2ist.cli.settings import build_training_arguments

    settings = {"training": {"output_dir": str(tmp_path / "out")}}
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        build_training_arguments(settings)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
        build_training_arguments(settings)
        assert not caplog.records
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
        build_training_arguments(settings)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "The environment variable ACCELERATE_MIXED_PRECISION=bf16 makes training run in bf16 mixed precision, though "
        "training.fp16 and training.bf16 are off (and are recorded so)",
        "The environment variable ACCELERATE_USE_CPU=true makes training run on the CPU, though training.use_cpu is "
        "off (and is recorded so)"]
    assert "--bf16" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):  # said in the settings too: nothing to warn about
        build_training_arguments({"training": {**settings["training"], "use_cpu": True}})
    assert [r.getMessage() for r in caplog.records if "USE_CPU" in r.getMessage()] == []


# ---------------------------------------------------------------------------------------------- 7. percentages
def _percent_samples(boxes: list[list[float]]) -> list:
    from m2ist.data.sample import RECSample

    image = Image.new("RGB", (400, 300), (20, 90, 200))
    return [RECSample(image=image, expression="the red square", box=tuple(box), image_id=i)
            for i, box in enumerate(boxes)]


PERCENT_BOXES = [[10, 20, 40, 60], [5, 5, 95, 90], [50, 10, 70, 30], [0, 0, 100, 100], [30, 40, 60, 80]]


def test_boxes_in_percent_of_the_image_are_warned_about_by_the_dataset_and_evaluate(tmp_path):
    """Label Studio's x, y, width, height are percentages of the image size: read as pixels, every box sat in the
    top-left corner of a 400x300 image, and training and scoring went on without a word."""
    from m2ist import RECProcessor
    from m2ist.data.dataset import RECDataset, RECDataWarning
    from m2ist.evaluation import evaluate
    from tests.test_inference import FixedBoxModel, make_tokenizer
    from tests.tiny import QUERY_LEN

    message = (r"All 5 boxes lie within \[0, 100\] \(up to 100\) while every image is at least 300 pixels each way: "
               r"they look like percentages of the image size .* load with normalized=True \(--normalized\)")
    with pytest.warns(RECDataWarning, match=message):
        RECDataset(_percent_samples(PERCENT_BOXES))
    processor = RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)
    with pytest.warns(UserWarning, match=r"Split 'eval': " + message):
        evaluate(FixedBoxModel([[0.5, 0.5, 0.2, 0.2]] * 5), processor, _percent_samples(PERCENT_BOXES),
                 progress=False)


def test_pixel_boxes_and_small_sets_give_no_percentage_warning(recwarn):
    from m2ist.data.dataset import RECDataset

    RECDataset(_percent_samples([*PERCENT_BOXES[:4], [30, 40, 160, 180]]))  # one box beyond 100: pixels
    RECDataset(_percent_samples(PERCENT_BOXES[:4]))  # four small objects near the corner may be pixels
    assert not [w for w in recwarn if "percentages" in str(w.message)]


# ---------------------------------------------------------------------------------------------- 8. xywh as xyxy
def test_many_inverted_boxes_name_the_box_format(files):
    """xywh boxes loaded as xyxy: the boxes whose width is less than their x0 were dropped as "invalid" with no word
    of the format, and training went on with the others, as wrong."""
    from m2ist.data.dataset import RECDataset, RECDataWarning
    from m2ist.data.files import load_jsonl

    Image.new("RGB", (200, 150)).save(files / "big.png")
    rows = [{"image": "big.png", "text": f"object {i}", "bbox": [20 + 30 * i, 10 + 20 * i, 25, 20]} for i in range(4)]
    (files / "xywh.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.warns(RECDataWarning, match=r"Dropped 3 of 4 samples: .*xywh\.jsonl:4\)\)\. So many boxes with x1 < x0 "
                                            r"or y1 < y0 suggest a wrong box format.*check box_format \(--box-format\)"):
        assert len(RECDataset(load_jsonl(files / "xywh.jsonl", "xyxy"))) == 1
    with pytest.warns(RECDataWarning, match=r"Dropped 1 of 4 samples") as caught:  # one inverted box is no pattern
        RECDataset(load_jsonl(files / "xywh.jsonl", "xywh")[:3] + load_jsonl(files / "xywh.jsonl", "xyxy")[3:])
    assert not any("wrong box format" in str(w.message) for w in caught)


# ---------------------------------------------------------------------------------------------- 9. a limit above all
@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> Path:
    from tests.test_inference import make_tokenizer
    from tests.tiny import text_tower, vision_tower

    root = tmp_path_factory.mktemp("towers")
    vision_tower("vit").save_pretrained(root / "vit")
    text_tower("bert").save_pretrained(root / "bert")
    make_tokenizer(root / "bert")
    return root


def test_trains_sample_limit_above_every_split_leaves_the_results_whole(files, towers, capsys, caplog):
    """``m2ist train --max-eval-samples 100`` on splits of 3 expressions recorded the limit in eval_results.json, so
    the model card left the whole splits' results out, saying they scored only the first 100 expressions (``m2ist
    eval`` records such results as whole since round 16). The training file given as the evaluation file is named
    too (part 2)."""
    from tests.tiny import tiny_config

    fields = {key: getattr(tiny_config(), key) for key in ("bottleneck", "fusion_dim", "fusion_layers", "fusion_heads",
                                                          "fusion_ffn_dim", "max_query_len", "image_size")}
    out = files / "out"
    with caplog.at_level(logging.WARNING):
        code, _, err = run_cli(capsys, "train", "--vision-model", str(towers / "vit"), "--text-model",
                               str(towers / "bert"), "--data-format", "jsonl", "--box-format", "xywh", "--train-file",
                               str(files / "val.jsonl"), "--eval-file", str(files / "val.jsonl"), "--output-dir",
                               str(out), "--max-eval-samples", "100", "--no-progress", "--set", "training.use_cpu=true",
                               "--set", "training.max_steps=1", "--set", "training.eval_strategy=no", "--set",
                               "training.save_strategy=no", *(f"--set=m2ist.{k}={v}" for k, v in fields.items()))
    assert code == 0, err
    assert json.loads((out / "eval_results.json").read_text())["metadata"]["data"]["max_eval_samples"] is None
    assert "## Evaluation" in (out / "README.md").read_text()
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "first 100 expressions" in m]
    assert [m for m in messages if m.startswith("The evaluation split 'val' shares 3 of its 3 expressions")]


# ---------------------------------------------------------------------------------------------- 10. 'Split'
def test_a_split_field_spelt_otherwise_is_refused(files):
    """A 'Split' column (or 'split ' with a space) was not the 'split' field: every row was read as one split, so
    ``--eval-file val=FILE`` scored the training rows and ``--train-file`` trained on the evaluation rows."""
    (files / "S.csv").write_text("image,text,bbox,Split\nimg0.png,a,5 5 20 15,train\nimg1.png,b,5 5 20 15,val\n")
    (files / "S.jsonl").write_text("".join(json.dumps({"image": f"img{i}.png", "text": "a", "bbox": [5, 5, 20, 15],
                                                       "split ": split}) + "\n" for i, split in enumerate(["a", "b"])))
    coco = {"images": [{"id": 1, "file_name": "img0.png", "Split": "val"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [5, 5, 20, 15], "text": "the square"}]}
    (files / "S.json").write_text(json.dumps(coco))
    for name, fmt, where, key in (("S.csv", "csv", "S.csv:2", "Split"), ("S.jsonl", "jsonl", "S.jsonl:1", "split "),
                                  ("S.json", "coco", r"S.json images\[0\]", "Split")):
        data = {"format": fmt, "box_format": "xywh", "eval_files": [f"val={files / name}"]}
        with pytest.raises(ValueError, match=rf"{where}: no 'split' field, so every record would be read as one split, "
                                             rf"whatever split is asked for\. Names are matched exactly \('{key}' is "
                                             r"not 'split'\)"):
            load_data_splits(data, "eval")
    (files / "ok.csv").write_text("image,text,bbox,split,Split\nimg0.png,a,5 5 20 15,val,x\n")  # 'split' is there
    assert len(load_data_splits({"format": "csv", "box_format": "xywh", "eval_files": [f"val={files / 'ok.csv'}"]},
                                "eval")["val"]) == 1
