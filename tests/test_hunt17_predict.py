"""Round 17, prediction on a user's own pictures and phrases: an EXIF-rotated phone photo was read sideways by
``m2ist predict`` with no word (and there was no way to read it upright), an animated GIF/WebP/PNG silently gave its
first frame, a phrase the tokenizer reads as ``[UNK]`` only (an emoji, fullwidth letters) got a box for no word, an
empty ``--text`` was refused only after the adapter loaded (as "Phrase 0"), and ``--image -`` was "not found"."""

from __future__ import annotations

import base64
import io
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import m2ist.cli.predict as predict_command
from m2ist.inference import predict_boxes
from m2ist.processing import RECProcessor
from tests.test_hostile import assert_one_line_error, run_cli
from tests.test_inference import FixedBoxModel, make_tokenizer

#: A box on the 100-pixel canvas: (cx, cy, w, h) = (0.25, 0.5, 0.2, 0.2).
CANVAS_BOX = [0.25, 0.5, 0.2, 0.2]


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    return RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=8)


def _model(count: int = 8) -> FixedBoxModel:
    return FixedBoxModel([CANVAS_BOX] * count, image_size=100, max_query_len=8)


def _expected(width: int, height: int) -> list[float]:
    """Where :data:`CANVAS_BOX` lies in a ``width`` x ``height`` image letterboxed (centred) on the canvas."""
    scale = 100 / max(width, height)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    sx, sy, ox, oy = new_w / width, new_h / height, (100 - new_w) // 2, (100 - new_h) // 2
    x0, y0, x1, y1 = 15.0, 40.0, 35.0, 60.0
    box = [(x0 - ox) / sx, (y0 - oy) / sy, (x1 - ox) / sx, (y1 - oy) / sy]
    return [min(max(box[0], 0), width), min(max(box[1], 0), height), min(max(box[2], 0), width),
            min(max(box[3], 0), height)]


@pytest.fixture
def cli(tmp_path, processor, monkeypatch, capsys, caplog):
    """``m2ist predict`` on a stub adapter: ``cli(*flags) -> (code, records, stderr, warnings)``."""
    monkeypatch.setattr(predict_command, "load_adapter", lambda settings: (_model(), processor))
    (tmp_path / "adapter").mkdir()

    def call(*flags: str) -> tuple[int, list, str, list[str]]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="m2ist"):
            code, out, err = run_cli(capsys, "predict", "--adapter", str(tmp_path / "adapter"), *flags)
        return code, json.loads(out) if code == 0 else [], err, [r.getMessage() for r in caplog.records]

    return call


def _rotated_jpeg(path, orientation: int = 6) -> Image.Image:
    """A 60x40 stored JPEG that viewers show turned by ``orientation``; returns the stored pixels."""
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, quality=95)
    return stored


# ---------------------------------------------------------------------------------------------- EXIF orientation
def test_predict_warns_about_an_exif_rotated_photo_and_exif_transpose_reads_it_upright(tmp_path, cli):
    photo = tmp_path / "phone.jpg"
    _rotated_jpeg(photo)
    code, records, err, warned = cli("--image", str(photo), "--text", "the dog", "--draw", str(tmp_path / "s.png"))
    assert code == 0, err
    assert records[0]["box_xyxy"] == pytest.approx(_expected(60, 40), abs=0.01)  # the stored 60x40 frame
    assert Image.open(tmp_path / "s.png").size == (60, 40)
    assert any("EXIF orientation" in m and "phone.jpg" in m and "--exif-transpose" in m for m in warned), warned

    code, records, err, warned = cli("--image", str(photo), "--text", "the dog", "--exif-transpose",
                                     "--draw", str(tmp_path / "u.png"))
    assert code == 0, err
    assert records[0]["box_xyxy"] == pytest.approx(_expected(40, 60), abs=0.01)  # the upright 40x60 frame
    drawing = Image.open(tmp_path / "u.png")
    assert drawing.size == (40, 60) and not any("EXIF" in m for m in warned)
    # the drawing is the upright photo: a pixel far from the box matches ImageOps.exif_transpose's
    upright = ImageOps.exif_transpose(Image.open(photo)).convert("RGB")
    assert np.abs(np.asarray(drawing, dtype=int)[55, 35] - np.asarray(upright, dtype=int)[55, 35]).max() <= 2


def test_exif_transpose_applies_to_a_downloaded_image_as_to_the_file(tmp_path, cli, monkeypatch):
    photo = tmp_path / "phone.jpg"
    _rotated_jpeg(photo, orientation=8)
    monkeypatch.setattr("m2ist.processing.download_image", lambda url, timeout=30.0: photo.read_bytes())
    url = "https://example.com/phone.jpg"
    for flags in ((), ("--exif-transpose",)):
        _, from_file, _, _ = cli("--image", str(photo), "--text", "the dog", *flags)
        code, from_url, err, warned = cli("--image", url, "--text", "the dog", *flags)
        assert code == 0, err
        assert from_url[0]["box_xyxy"] == from_file[0]["box_xyxy"] and from_url[0]["image"] == url
        assert any("EXIF" in m for m in warned) is not bool(flags)


# ---------------------------------------------------------------------------------------------- animations
@pytest.mark.parametrize("suffix", ["gif", "webp", "png", "tiff"])
def test_an_animated_image_is_read_at_its_first_frame_and_said_so(tmp_path, cli, suffix):
    frames = [Image.new("RGB", (60, 40), colour) for colour in ("red", "lime", "blue")]
    path = tmp_path / f"anim.{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    code, _, err, warned = cli("--image", str(path), "--text", "the dog", "--draw", str(tmp_path / "d.png"))
    assert code == 0, err
    assert any("holds 3 frames" in m and "only the first is read" in m for m in warned), warned
    drawn = Image.open(tmp_path / "d.png").convert("RGB")
    assert drawn.getpixel((55, 5))[0] > 200 and drawn.getpixel((55, 5))[2] < 50  # red: the first frame

    still = tmp_path / "still.png"
    frames[0].save(still)
    _, _, _, warned = cli("--image", str(still), "--text", "the dog")
    assert not any("frames" in m for m in warned)


def test_a_phone_photo_with_a_preview_frame_is_not_called_animated(tmp_path, cli):
    photo = tmp_path / "phone.mpo"  # a multi-picture JPEG: the photo and a second picture (depth, preview)
    Image.new("RGB", (60, 40), "red").save(photo, format="MPO", save_all=True,
                                           append_images=[Image.new("RGB", (30, 20), "blue")])
    assert Image.open(photo).format == "MPO" and Image.open(photo).n_frames == 2
    code, records, err, warned = cli("--image", str(photo), "--text", "the dog")
    assert code == 0 and records[0]["box_xyxy"] == pytest.approx(_expected(60, 40), abs=0.01), err
    assert not any("frames" in m for m in warned), warned


# ---------------------------------------------------------------------------------------------- phrases
@pytest.mark.parametrize("phrase", ["\U0001f436", "\uff44\uff4f\uff47", "x" * 300])  # emoji, fullwidth 'dog', 300 chars
def test_a_phrase_read_as_unknown_tokens_only_is_warned_about(processor, caplog, phrase):
    image = Image.new("RGB", (40, 30))
    with caplog.at_level(logging.WARNING, logger="m2ist.processing"):
        processor([image, image], ["the dog", phrase])
    warned = [r.getMessage() for r in caplog.records if "unknown tokens only" in r.getMessage()]
    assert len(warned) == 1 and "1 of 2 phrases" in warned[0] and phrase[:20] in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2ist.processing"):
        processor([image, image], ["the dog", f"the {phrase}"])  # a known word beside it: read, not warned about
    assert not any("unknown tokens only" in r.getMessage() for r in caplog.records)


def test_an_empty_phrase_is_refused_before_the_adapter_loads_and_numbered_as_typed(tmp_path, cli, monkeypatch):
    image = tmp_path / "a.png"
    Image.new("RGB", (60, 40)).save(image)

    def no_loading(settings):
        raise AssertionError("the adapter was loaded")

    monkeypatch.setattr(predict_command, "load_adapter", no_loading)
    for blank in ("", "   ", "\u200b\u200d"):
        code, _, err, _ = cli("--image", str(image), "--text", "the dog", blank)
        assert_one_line_error(code, err, "--text phrase 2", "empty or shows nothing")


def test_image_dash_is_refused_naming_what_reads_stdin(cli):
    code, _, err, _ = cli("--image", "-", "--text", "the dog")
    assert_one_line_error(code, err, "--image -", "not read from stdin", "--text -")


# ---------------------------------------------------------------------------------------------- the box's frame
def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _with_transparency(image: Image.Image) -> Image.Image:
    image.info["transparency"] = 0
    return image


_RGB = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
_KINDS = {
    "palette with transparency": lambda: _with_transparency(Image.fromarray(_RGB).convert("P", palette=Image.ADAPTIVE)),
    "LA": lambda: Image.fromarray(_RGB).convert("LA"),
    "I;16": lambda: Image.fromarray(_RGB[..., 0].astype(np.uint16) * 257),
    "CMYK": lambda: Image.fromarray(_RGB).convert("CMYK"),
    "grayscale (H, W) array": lambda: _RGB[..., 0],
    "float array in [0, 1]": lambda: _RGB / 255.0,
    "uint8 (C, H, W) tensor": lambda: torch.from_numpy(_RGB).permute(2, 0, 1),
    "float (H, W, C) tensor": lambda: torch.from_numpy(_RGB / 255.0),
    "encoded bytes": lambda: _png_bytes(Image.fromarray(_RGB)),
    "data URI": lambda: "data:image/png;base64," + base64.b64encode(_png_bytes(Image.fromarray(_RGB))).decode(),
}


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_boxes_are_pixels_of_the_original_image_for_every_input_kind(processor, kind):
    boxes = predict_boxes(_model(), _KINDS[kind](), "the dog", processor=processor)
    assert boxes[0].tolist() == pytest.approx(_expected(60, 40), abs=1e-3)


@pytest.mark.parametrize("size", [(1, 500), (5000, 1), (1, 1), (3, 900)])
def test_one_pixel_wide_and_extreme_aspect_images_map_back_to_their_own_pixels(processor, size):
    width, height = size
    boxes = predict_boxes(_model(), np.zeros((height, width, 3), dtype=np.uint8), "the dog", processor=processor)
    box = boxes[0].tolist()
    assert box == pytest.approx(_expected(width, height), abs=1e-3)
    assert 0 <= box[0] <= box[2] <= width and 0 <= box[1] <= box[3] <= height


def test_a_byte_order_mark_on_stdin_is_no_part_of_the_first_phrase(tmp_path, cli, monkeypatch):
    image = tmp_path / "a.png"
    Image.new("RGB", (60, 40)).save(image)
    monkeypatch.setattr("sys.stdin", io.StringIO("\ufeffthe dog\r\na red square\r\n"))  # Notepad's UTF-8
    code, records, err, _ = cli("--image", str(image), "--text", "-")
    assert code == 0, err
    assert [record["text"] for record in records] == ["the dog", "a red square"]


# ---------------------------------------------------------------------------------------------- scale mistakes
_PHOTO = np.random.default_rng(2).integers(0, 256, (40, 60, 3), dtype=np.uint8)


@pytest.mark.parametrize(("array", "hint"), [
    (_PHOTO.astype(np.uint16), "astype(numpy.uint8)"),  # 0..255 data in uint16: read as 16-bit, 1/257 as bright
    (np.minimum(_PHOTO / 200.0, 1.0).astype(np.uint8), "multiply by 255"),  # [0, 1] floats cast: 0s and a few 1s
    (_PHOTO / 255.0 / 255.0, "divided by 255 twice"),
    (torch.from_numpy(np.minimum(_PHOTO / 200.0, 1.0)).permute(2, 0, 1).to(torch.uint8), "multiply by 255"),
])
def test_an_array_that_would_read_as_black_by_a_scale_mistake_is_refused(processor, array, hint):
    with pytest.raises(ValueError, match="reads as black") as caught:
        predict_boxes(_model(), array, "the dog", processor=processor)
    assert hint in str(caught.value)


def test_dark_but_real_arrays_and_alpha_are_not_taken_for_a_scale_mistake(processor):
    black = np.zeros((40, 60, 3), dtype=np.uint8)
    opaque_black = np.dstack([black, np.full((40, 60), 255, dtype=np.uint8)])  # alpha 255, colours 0
    dark = np.full((40, 60), 2, dtype=np.uint8)
    mask = np.eye(40, 60, dtype=bool)
    for array in (black, opaque_black, dark, mask, _PHOTO.astype(np.uint16) * 257):
        assert predict_boxes(_model(), array, "the dog", processor=processor).shape == (1, 4)


def test_a_url_serving_no_image_is_refused_before_the_adapter_loads(cli, monkeypatch):
    def no_loading(settings):
        raise AssertionError("the adapter was loaded")

    monkeypatch.setattr(predict_command, "load_adapter", no_loading)
    monkeypatch.setattr("m2ist.processing.download_image", lambda url, timeout=30.0: b"<html>sign in</html>")
    code, _, err, _ = cli("--image", "https://example.com/photo", "--text", "the dog")
    assert_one_line_error(code, err, "--image https://example.com/photo", "not an image PIL can read")
