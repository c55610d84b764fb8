"""What users rely on when inputs and outputs are hostile: results never lost to a bad path, inputs never
overwritten, one frame for boxes, expected mistakes reported in one line (exit 2) by every command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import m2ist.evaluation
from m2ist import RECProcessor
from m2ist.cli.data import _eval_files
from m2ist.data.sample import RECSample
from m2ist.evaluation import ResultsWriteError, evaluate
from m2ist.inference import predict_boxes
from tests import test_hostile as hostile
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.test_hostile import build_workspace, run_cli
from tests.test_inference import FixedBoxModel, make_tokenizer
from tests.tiny import QUERY_LEN, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def cli_workspace(root: Path) -> Path:
    """Tiny towers and an untrained adapter (:func:`tests.test_hostile.build_workspace`), three 60x40 images
    ``img<i>.png`` and ``val.jsonl``, in ``root``."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)) for _ in range(3)]
    rows = [{"image": f"img{i}.png", "text": "the red square", "bbox": [5 + i, 5, 20, 15]} for i in range(3)]
    return build_workspace(root, images, rows, "val.jsonl")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return cli_workspace(tmp_path_factory.mktemp("hostile_cli"))


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    return RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """An expected mistake: one line, exit status 2."""
    hostile.assert_one_line_error(code, err, *needles, exit_code=2)


def eval_args(workspace: Path, *extra: str) -> list[str]:
    return ["eval", "--adapter", str(workspace / "adapter"), "--data-format", "jsonl", "--box-format", "xywh",
            "--no-progress", *extra]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- 1. results paths
def test_a_bad_results_path_is_refused_before_any_forward_pass(processor, tmp_path):
    model = FixedBoxModel([[0.5, 0.5, 0.5, 0.5]] * 4)
    data = [RECSample(image=Image.new("RGB", (100, 100)), expression="a", box=(25, 25, 75, 75), image_id=i)
            for i in range(4)]
    (tmp_path / "afile").write_text("x")
    for output, error in ((tmp_path, IsADirectoryError), (tmp_path / "afile" / "r.json", NotADirectoryError),
                          (f"{tmp_path / 'new'}/", IsADirectoryError)):
        with pytest.raises(error, match="results file"):
            evaluate(model, processor, {"val": data}, batch_size=2, progress=False, output_file=output)
        assert model.calls == []  # refused before scoring


def test_results_that_cannot_be_written_after_scoring_are_kept(processor, tmp_path, monkeypatch):
    model = FixedBoxModel([[0.5, 0.5, 0.5, 0.5]] * 2)
    data = [RECSample(image=Image.new("RGB", (100, 100)), expression="a", box=(25, 25, 75, 75), image_id=i)
            for i in range(2)]

    def disk_full(results, output_file):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m2ist.evaluation, "write_results", disk_full)
    with pytest.raises(ResultsWriteError, match=r"saved to .*Metrics") as caught:
        evaluate(model, processor, {"val": data}, batch_size=2, progress=False, output_file=tmp_path / "r.json")
    assert caught.value.results["metrics"]["val"]["acc@0.5"] == 1.0
    assert json.loads(caught.value.saved_to.read_text())["metrics"]["val"]["count"] == 2
    caught.value.saved_to.unlink()


def test_cli_eval_checks_its_output_first_and_prints_metrics_when_writing_fails(workspace, capsys, tmp_path,
                                                                                 monkeypatch):
    data = f"val={workspace / 'val.jsonl'}"
    code, out, err = run_cli(capsys, *eval_args(workspace, "--eval-file", data, "--output", str(tmp_path)))
    assert_one_line_error(code, err, "is a folder")
    assert out == ""

    def disk_full(results, output_file):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m2ist.evaluation, "write_results", disk_full)
    code, out, err = run_cli(capsys, *eval_args(workspace, "--eval-file", data, "--output", str(tmp_path / "r.json")))
    assert_one_line_error(code, err, "No space left", "saved to")
    assert "val" in out and "acc@0.5" in out  # the scores reached the user
    Path(err.split("saved to ")[1].split(" instead")[0]).unlink()


def test_cli_train_checks_the_results_path_before_training(workspace, capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--vision-model", str(workspace / "vit"), "--text-model",
                           str(workspace / "bert"), "--data-format", "jsonl", "--box-format", "xywh", "--train-file",
                           str(workspace / "val.jsonl"), "--eval-file", str(workspace / "val.jsonl"), "--output-dir",
                           str(tmp_path / "out"), "--output", str(tmp_path), "--set", "training.use_cpu=true")
    assert_one_line_error(code, err, "is a folder")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- 2. --eval-file names
def test_eval_files_with_one_split_name_are_refused_naming_both(workspace, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("a", "b", "run=1"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "val.jsonl").write_text("")
    with pytest.raises(Exception, match=r"a/val.jsonl and --eval-file b/val.jsonl .*'val'.*NAME=PATH"):
        _eval_files(["a/val.jsonl", "b/val.jsonl"])
    assert _eval_files(["run=1/val.jsonl"]) == {"val": "run=1/val.jsonl"}  # an existing path is never split
    assert _eval_files(["x=a/val.jsonl", "y=b/val.jsonl"]) == {"x": "a/val.jsonl", "y": "b/val.jsonl"}
    assert _eval_files(["./run=1/val.jsonl"]) == {"val": "./run=1/val.jsonl"}  # no plain name before the '='
    code, _, err = run_cli(capsys, *eval_args(workspace, "--eval-file", "a/val.jsonl", "--eval-file", "b/val.jsonl",
                                              "--output", str(tmp_path / "r.json")))
    assert_one_line_error(code, err, "a/val.jsonl", "b/val.jsonl", "NAME=PATH")


# ---------------------------------------------------------------------------------------------- 3, 6. predict outputs
def predict_args(workspace: Path, *extra: str) -> list[str]:
    return ["predict", "--adapter", str(workspace / "adapter"), "--text", "the red square", *extra]


def test_predict_never_overwrites_an_input_image(workspace, capsys, tmp_path):
    victim = tmp_path / "victim.png"
    victim.write_bytes((workspace / "img0.png").read_bytes())
    before = digest(victim)
    for flag in ("--draw", "--output"):
        code, out, err = run_cli(capsys, *predict_args(workspace, "--image", str(victim), flag, str(victim)))
        assert_one_line_error(code, err, flag, "input image")
        assert out == "" and digest(victim) == before
    other = tmp_path / "out-1.png"  # the second drawing of --draw out.png with two images
    other.write_bytes((workspace / "img1.png").read_bytes())
    code, out, err = run_cli(capsys, *predict_args(workspace, "--image", str(victim), str(other), "--draw",
                                                   str(tmp_path / "out.png")))
    assert_one_line_error(code, err, "out-1.png", "input image")
    assert digest(other) == digest(workspace / "img1.png")


def test_predict_draw_extension_is_settled_before_predicting(workspace, capsys, tmp_path):
    image = str(workspace / "img0.png")
    code, out, err = run_cli(capsys, *predict_args(workspace, "--image", image, "--draw", str(tmp_path / "one")))
    assert code == 0, err
    assert json.loads(out) and Image.open(tmp_path / "one.png").size == (60, 40)
    code, _, err = run_cli(capsys, *predict_args(workspace, "--image", image, str(workspace / "img1.png"), "--draw",
                                                 str(tmp_path / "two")))
    assert code == 0, err
    assert (tmp_path / "two-0.png").is_file() and (tmp_path / "two-1.png").is_file()
    code, out, err = run_cli(capsys, *predict_args(workspace, "--image", image, "--draw", str(tmp_path / "x.nope")))
    assert_one_line_error(code, err, "--draw", ".nope")
    assert out == ""


# ---------------------------------------------------------------------------------------------- 4. EXIF orientation
def test_app_boxes_are_in_the_upright_frame_and_it_says_so(workspace, tmp_path):
    from m2ist.app import load_models, predict_page

    stored = Image.open(workspace / "img0.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate it 90 degrees
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif.tobytes(), quality=100)
    (name, model), = load_models([str(workspace / "adapter")])
    page = predict_page([(name, model)], str(path), "the red square")
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert upright.size == (40, 60)
    assert torch.allclose(torch.tensor(page.boxes[name]), predict_boxes(model, upright, "the red square"), atol=1e-4)
    assert "EXIF orientation" in page.message and "40×60" in page.message
    assert "stored pixels" in page.message
    plain = predict_page([(name, model)], str(workspace / "img0.png"), "the red square")
    assert "EXIF" not in plain.message


# ---------------------------------------------------------------------------------------------- 5. demo, bench, compare
@pytest.mark.parametrize("argv", [["bench", "--tiny", "--steps", "0"], ["bench", "--tiny", "--device", "bogus"],
                                  ["bench", "--tiny", "--warmup", "-1"], ["demo", "--tiny", "--batch-size", "0"],
                                  ["demo", "--tiny", "--steps", "-1"], ["compare", "--tiny", "--steps", "0"]])
def test_passthrough_commands_refuse_bad_numbers_and_devices(capsys, argv):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == "" and "Traceback" not in err
    assert "error: argument --" in err


def test_compare_checks_methods_before_creating_folders(capsys, tmp_path):
    code, _, err = run_cli(capsys, "compare", "--tiny", "--methods", "bogus", "--work-dir", str(tmp_path / "work"))
    assert code == 2 and "unknown methods" in err
    assert not (tmp_path / "work").exists()


def test_passthrough_errors_are_one_line(capsys, monkeypatch):
    import m2ist.evidence.demo as demo

    def broken(argv):
        raise ValueError("the synthetic scenes need\nmore room")

    monkeypatch.setattr(demo, "main", broken)
    code, out, err = run_cli(capsys, "demo", "--tiny")
    assert_one_line_error(code, err, "m2ist demo: error: the synthetic scenes need more room")
    assert out == ""


# ---------------------------------------------------------------------------------------------- 7. --device
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_an_unknown_device_is_a_usage_error(workspace, capsys, tmp_path, command):
    argv = (predict_args(workspace, "--image", str(workspace / "img0.png")) if command == "predict"
            else eval_args(workspace, "--eval-file", str(workspace / "val.jsonl"), "--output", str(tmp_path / "r.json")))
    code, out, err = run_cli(capsys, *argv, "--device", "bogus")
    assert_one_line_error(code, err, "--device 'bogus' is not a device", "cpu")
    assert out == ""
    code, out, err = run_cli(capsys, *argv, "--device", "meta")  # parses, but holds no values to evaluate
    assert_one_line_error(code, err, "--device meta", "m2ist runs on cpu or on this machine's accelerator")
    assert out == ""


def test_a_closed_pipe_ends_quietly(workspace, capsys, monkeypatch):
    """`m2ist predict ... | head`: the reader goes away; no error line, exit status 141 as a Unix tool's."""
    import importlib

    cli_main = importlib.import_module("m2ist.cli.main")  # m2ist.cli.main is also the name of the function

    def closed(*_args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli_main.COMMANDS, "predict", closed)
    code, out, err = run_cli(capsys, *predict_args(workspace, "--image", str(workspace / "img0.png")))
    assert code == 141 and err == "" and out == ""


# ---------------------------------------------------------------------------------------------- 8. adapter names
def test_one_adapter_name_as_a_string(tmp_path):
    model = make_model(0).eval()
    model.add_adapter("ab", tiny_config(bottleneck=4))
    samples = make_dataset(2, 0).samples
    encoded = make_processor(tmp_path / "tok")([s.image for s in samples], [s.expression for s in samples])
    inputs = {k: encoded[k] for k in ("pixel_values", "pixel_mask", "input_ids", "attention_mask")}
    with torch.no_grad():
        assert list(model.forward_all_adapters(**inputs, adapter_names="default")) == ["default"]
        features = model.tower_features(inputs["pixel_values"], inputs["pixel_mask"], inputs["input_ids"],
                                        inputs["attention_mask"], "ab")
        mixed = model(**inputs, adapter_names=["ab", "ab"])
        assert torch.equal(model.forward_features(features, adapter_name="ab").pred_boxes, mixed.pred_boxes)
        with pytest.raises(TypeError, match=r"one adapter name per sample.*\['ab'\] \* batch_size"):
            model(**inputs, adapter_names="ab")


# ---------------------------------------------------------------------------------------------- 9. tensors
def test_a_grayscale_tensor_is_one_image_like_an_array(processor):
    array = np.random.default_rng(0).random((40, 60)).astype(np.float32)
    boxes = []
    for image in (array, torch.from_numpy(array), torch.from_numpy(np.repeat(array[..., None], 3, axis=2))):
        boxes.append(predict_boxes(FixedBoxModel([[0.5, 0.5, 0.2, 0.2]]), image, "a", processor=processor))
    assert boxes[0].shape == (1, 4) and torch.equal(boxes[0], boxes[1]) and torch.equal(boxes[0], boxes[2])
    with pytest.raises(TypeError, match=r"got a Tensor of shape \(2, 3, 40, 60\)"):
        predict_boxes(FixedBoxModel([[0.5, 0.5, 0.2, 0.2]]), torch.zeros(2, 3, 40, 60), "a", processor=processor)


# ---------------------------------------------------------------------------------------------- 10. non-finite boxes
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_predictions_are_refused_by_predict_and_evaluate(processor, bad):
    image = Image.new("RGB", (100, 100))
    model = FixedBoxModel([[0.5, 0.5, 0.2, 0.2], [0.5, bad, 0.2, 0.2]])
    with pytest.raises(ValueError, match=r"non-finite boxes .* 1 of 2 samples \(batch positions \[1\]\).*diverged"):
        predict_boxes(model, [image, image], "a", processor=processor)
    model = FixedBoxModel([[0.5, 0.5, 0.2, 0.2], [0.5, bad, 0.2, 0.2]])
    data = [RECSample(image=image, expression="a", box=(25, 25, 75, 75), image_id=i) for i in range(2)]
    with pytest.raises(ValueError, match="non-finite boxes"):
        evaluate(model, processor, data, batch_size=2, progress=False)
