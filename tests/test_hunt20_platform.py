"""Silent faults from process-wide state and platform differences (fault hunt 20): torch's default dtype and device
set by the user (a side network built in bfloat16 or float64, adapters that would not load, labels and image
geometry rounded to bfloat16, tower-cache reads that crashed, a build on a "meta" default device that crashed),
gradients switched off around training, and a stdout that cannot encode "M²IST"."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from m2ist import SideTunedModel, get_side_tuned_model
from m2ist.cli import main
from m2ist.ops.boxes import box_convert
from m2ist.trainer import train_rec
from tests.ddp_worker import make_dataset, make_model
from tests.tiny import cpu_training_args, text_tower, tiny_config, vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def default_dtype():
    """``torch.set_default_dtype``, undone after the test."""
    previous = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(previous)


@pytest.fixture
def default_device():
    """``torch.set_default_device``, undone after the test."""
    yield torch.set_default_device
    torch.set_default_device(None)


def _model(before_side=lambda: None) -> SideTunedModel:
    """``make_model()``: the towers built first, then ``before_side()`` (as a user loads float32 towers, then sets
    a default), then the side network and head."""
    torch.manual_seed(0)
    vision, text = vision_tower("vit"), text_tower("bert")
    before_side()
    return get_side_tuned_model(vision, text, tiny_config())


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(model, processor, tmp_path, **args):
    return train_rec(model, processor, make_dataset(8, 0), None, cpu_training_args(tmp_path, max_steps=2, **args))


# ---------------------------------------------------------------------------------------------- 1. default dtype
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_side_network_is_float32_and_loads_back_whatever_the_default_dtype(default_dtype, tmp_path, dtype):
    model = _model(lambda: default_dtype(dtype))  # was: side network and head built (and saved) in the default dtype
    assert model.dtype == torch.float32 and torch.get_default_dtype() == dtype  # the user's default is kept
    default_dtype(torch.float32)
    model.save_pretrained(tmp_path / "adapter")
    default_dtype(dtype)
    # was: "does not fit this model (dtype mismatches ...). It was saved in another dtype", for a float32 file
    loaded = SideTunedModel.from_pretrained(tmp_path / "adapter", vision_model=model.vision_model,
                                            text_model=model.text_model)
    assert loaded.dtype == torch.float32
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name


def test_the_processor_ignores_a_bfloat16_default_dtype(default_dtype, processor):
    images = [Image.new("RGB", (1001, 777), (200, 10, 10)), Image.new("RGB", (53, 97), (10, 10, 200))]
    boxes = [(300.5, 211.25, 998.75, 776.5), (1.5, 2.25, 52.0, 96.5)]
    reference = processor(images=images, text=["the red square"] * 2, boxes=boxes)
    listed = [list(box) for box in boxes]  # box lists given to the public box functions
    labels, corners = processor.boxes_to_labels(listed, reference["image_geometry"]), box_convert(listed, "xyxy", "xywh")
    default_dtype(torch.bfloat16)
    # was: geometry and labels rounded to bfloat16 (a box 0.2% off; an edge box "outside the canvas")
    encoded = processor(images=images, text=["the red square"] * 2, boxes=boxes)
    for key in ("image_geometry", "labels", "pixel_values"):
        assert encoded[key].dtype == torch.float32 and torch.equal(encoded[key], reference[key]), key
    assert torch.equal(processor.boxes_to_labels(listed, reference["image_geometry"]), labels)
    assert torch.equal(box_convert(listed, "xyxy", "xywh"), corners)
    pred = torch.tensor([[0.5, 0.5, 0.25, 0.125]] * 2)
    assert torch.equal(processor.post_process_boxes(pred, encoded["image_geometry"]),
                       processor.post_process_boxes(pred, reference["image_geometry"]).to(torch.float32))


@pytest.mark.parametrize(("cache", "dtype"), [("off", torch.bfloat16), ("disk", torch.float64)])
def test_training_after_changing_the_default_dtype_trains_as_before(default_dtype, processor, tmp_path, cache, dtype):
    args = dict(tower_cache=cache, tower_cache_dtype="float32")
    reference = make_model()
    _train(reference, processor, tmp_path / "reference", **args)
    model = make_model()
    default_dtype(dtype)
    # was: "labels ... reach outside the canvas" (bfloat16), "Index put requires the source and destination dtypes
    # match" (the disk cache)
    _train(model, processor, tmp_path / "run", **args)
    for name, value in _trainable(reference).items():
        assert torch.equal(value, model.get_parameter(name)), name


# ---------------------------------------------------------------------------------------------- 2. default device
def test_build_and_predict_on_a_meta_default_device(default_device, processor):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    expected = make_model().predict([image], ["the red square"], processor=processor)
    # "meta" stands for "cuda" with the towers on the CPU: another device than the towers'
    model = _model(lambda: default_device("meta"))  # was: NotImplementedError: Cannot copy out of meta tensor; no data!
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # was: "Tensor on device cpu is not on the expected device meta!" in the processor
    assert torch.equal(model.predict([image], ["the red square"], processor=processor), expected)


# ---------------------------------------------------------------------------------------------- 3. gradients off
@pytest.mark.parametrize("switch", ["set_grad_enabled", "no_grad", "inference_mode"])
def test_training_inside_a_no_gradient_context_trains(processor, tmp_path, switch):
    before = _trainable(model := make_model())
    contexts = {"set_grad_enabled": lambda: torch.set_grad_enabled(False), "no_grad": torch.no_grad,
                "inference_mode": torch.inference_mode}
    with contexts[switch]():  # was: "element 0 of tensors does not require grad and does not have a grad_fn"
        _train(model, processor, tmp_path)
        assert not torch.is_grad_enabled()  # the caller's setting, back after training
    assert all(not torch.equal(value, model.get_parameter(name)) for name, value in before.items())


# ---------------------------------------------------------------------------------------------- 4. stdout encoding
@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["bench", "--help"]])
def test_help_prints_to_an_ascii_stdout(monkeypatch, argv):
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii")  # PYTHONIOENCODING=ascii, LC_ALL=C, a cp1252 pipe...
    monkeypatch.setattr(sys, "stdout", stdout)
    with contextlib.suppress(SystemExit):
        code = main(argv)  # was: UnicodeEncodeError: 'ascii' codec can't encode character '\xb2' (exit 1 or 2)
    stdout.flush()
    assert code == 0 and b"M\\xb2IST" in stdout.buffer.getvalue()
    assert stdout.errors == "strict"  # the stream is given back as it was


# ---------------------------------------------------------------------------------------------- 5. cache variables
def test_the_demo_cache_root_reads_its_variables_as_specified(monkeypatch, tmp_path):
    from m2ist.evidence.demo_towers import default_cache_root

    monkeypatch.delenv("M2IST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG specification: ignored (was: under the cwd)
    assert default_cache_root() == Path.home() / ".cache" / "m2ist"
    (tmp_path / "file").write_text("", encoding="utf-8")
    monkeypatch.setenv("M2IST_CACHE", str(tmp_path / "file"))  # was: "[Errno 20] Not a directory: '.../file/towers'"
    with pytest.raises(NotADirectoryError, match=r"^M2IST_CACHE=.*file is a file, not a folder: point it at a folder"):
        default_cache_root()


# ---------------------------------------------------------------------------------------------- 6. phrase encodings
def test_utf8_phrases_survive_a_locale_that_decodes_them_otherwise(monkeypatch):
    from m2ist.cli.predict import _read_phrases

    # a UTF-8 file piped on Windows (stdin decodes cp1252; was: "cafÃ©", silently) or under LC_ALL=C (ASCII)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("café\n猫\n".encode()), encoding="cp1252"))
    # an argument under LC_ALL=C arrives as surrogates (was: refused as "not valid UTF-8")
    argument = "café".encode().decode("ascii", "surrogateescape")
    assert _read_phrases([argument, "-"]) == ["café", "café", "猫"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("café\n".encode("cp1252")), encoding="cp1252"))
    assert _read_phrases(["-"]) == ["café"]  # a legacy file in the stream's own encoding still reads
