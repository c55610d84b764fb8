"""Hunt 18: hostile or careless inputs to predict_boxes / model.predict / evaluate / draw_boxes."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from m2ist.data.images import load_image
from m2ist.data.sample import RECSample
from m2ist.evaluation import evaluate
from m2ist.inference import draw_boxes, predict_boxes
from m2ist.processing import RECProcessor
from tests.test_inference import FixedBoxModel, make_tokenizer
from tests.tiny import QUERY_LEN

CENTRE = [0.5, 0.5, 0.5, 0.25]  # canvas (25, 37.5, 75, 62.5): (50, 25, 150, 75) in a 200x100 image


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    return RECProcessor(make_tokenizer(tmp_path / "tokenizer"), canvas_size=100, max_query_len=QUERY_LEN)


def model(count: int = 8) -> FixedBoxModel:
    return FixedBoxModel([CENTRE] * count)


def exif_jpeg(orientation: int = 6) -> bytes:
    """A 200x100 JPEG file whose EXIF says a viewer shows it rotated (6: 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), (200, 40, 40)).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def no_warnings(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


# ---------------------------------------------------------------------------------------------- predict_boxes
@pytest.mark.parametrize("given", ["out/refcoco", "path", "tokenizer"])
def test_a_processor_that_is_a_path_or_a_tokenizer_is_refused_naming_the_fix(processor, given, tmp_path):
    # was: "'str' object is not callable" (a path) or transformers' text-type error (a tokenizer), each after a
    # warning that the "processor" differs from model.processor with canvas_size None
    value = {"out/refcoco": "out/refcoco", "path": tmp_path, "tokenizer": processor.tokenizer}[given]
    fixed = model()
    fixed.processor = processor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match=r"RECProcessor\.from_pretrained"):
            predict_boxes(fixed, Image.new("RGB", (200, 100)), "the dog", processor=value)
        with pytest.raises(TypeError, match=r"RECProcessor\.from_pretrained"):
            evaluate(fixed, value, [RECSample(Image.new("RGB", (200, 100)), "the dog", (50, 25, 150, 75))],
                     progress=False)


def test_a_numpy_integer_batch_size_is_a_batch_size(processor):
    # was: "batch_size must be a positive integer, got np.int64(2)" (from len() arithmetic or argparse-free configs)
    image = Image.new("RGB", (200, 100))
    boxes = predict_boxes(model(), [image] * 3, "the dog", processor=processor, batch_size=np.int64(2))
    torch.testing.assert_close(boxes, torch.tensor([[50.0, 25.0, 150.0, 75.0]] * 3))
    results = evaluate(model(), processor, [RECSample(image, "the dog", (50, 25, 150, 75))] * 3,
                       batch_size=np.int64(2), progress=False)
    assert results["metrics"]["eval"]["acc@0.5"] == 1.0 and results["metadata"]["batch_size"] == 2
    for bad in (True, 2.0, np.int64(0), "2"):
        with pytest.raises(ValueError, match="positive integer"):
            predict_boxes(model(), image, "the dog", processor=processor, batch_size=bad)


def test_a_batch_tensor_is_refused_saying_to_pass_a_list(processor):
    batch = torch.zeros(2, 3, 100, 200, dtype=torch.uint8)
    with pytest.raises(TypeError, match=r"A batch of 2 images: pass list\(images\)"):
        predict_boxes(model(), batch, "the dog", processor=processor)
    torch.testing.assert_close(predict_boxes(model(), list(batch), "the dog", processor=processor),
                               torch.tensor([[50.0, 25.0, 150.0, 75.0]] * 2))


@pytest.mark.parametrize("form", ["file", "pil", "bytes", "broadcast"])
def test_an_exif_rotated_photo_is_warned_about_and_read_as_stored(processor, tmp_path, form):
    # was: silent, while `m2ist predict` warned: the box (and "left") is in the stored frame, not the one a viewer shows
    path = tmp_path / "photo.jpg"
    path.write_bytes(exif_jpeg(6))
    given = {"file": str(path), "pil": Image.open(path), "bytes": path.read_bytes(), "broadcast": path}[form]
    texts = ["the dog", "the cat"] if form == "broadcast" else "the dog"
    with pytest.warns(UserWarning, match=r"EXIF orientation tag: .*6: shown rotated 90° clockwise.*exif_transpose=True"):
        boxes = predict_boxes(model(), given, texts, processor=processor)
    torch.testing.assert_close(boxes[0], torch.tensor([50.0, 25.0, 150.0, 75.0]))  # the stored 200x100 grid
    upright = load_image(str(path), exif_transpose=True)  # the fix the warning names: no warning, upright frame
    assert upright.size == (100, 200)
    boxes = no_warnings(lambda: predict_boxes(model(), upright, "the dog", processor=processor))
    torch.testing.assert_close(boxes[0], torch.tensor([0.0, 75.0, 100.0, 125.0]))  # 100x200: x offset 25


def test_an_exif_rotated_photo_served_by_url_is_warned_about_and_downloaded_once(processor, monkeypatch):
    fetched = []
    monkeypatch.setattr("m2ist.processing.download_image", lambda url, timeout=30.0: fetched.append(url) or exif_jpeg())
    url = "https://example.com/phone.jpg"
    with pytest.warns(UserWarning, match=r"https://example\.com/phone\.jpg \(6: shown rotated 90° clockwise\)"):
        boxes = predict_boxes(model(), [url, url], "the dog", processor=processor)
    torch.testing.assert_close(boxes, torch.tensor([[50.0, 25.0, 150.0, 75.0]] * 2))
    assert fetched == [url, url]  # once per occurrence, as before (no second download to read the tag)


def test_an_upright_photo_an_array_and_a_tensor_are_not_warned_about(processor, tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (200, 100)).save(path)
    images = [str(path), path, Image.new("RGB", (200, 100)), np.zeros((100, 200, 3), np.uint8),
              torch.zeros(3, 100, 200, dtype=torch.uint8)]
    boxes = no_warnings(lambda: predict_boxes(model(), images, "the dog", processor=processor, batch_size=2))
    torch.testing.assert_close(boxes, torch.tensor([[50.0, 25.0, 150.0, 75.0]] * 5))


def test_an_animated_image_is_warned_about_naming_the_frame_read(processor, tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (200, 100), colour) for colour in ("red", "blue", "green")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    with pytest.warns(UserWarning, match=r"anim.gif \(3 frames, frame 0 read\).*only that frame is read"):
        from_file = predict_boxes(model(), str(path), "the dog", processor=processor)
    torch.testing.assert_close(from_file, torch.tensor([[50.0, 25.0, 150.0, 75.0]]))


def test_a_missing_or_broken_file_is_still_named_by_the_reader(processor, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(Exception, match=r"missing\.jpg"):
        predict_boxes(model(), str(tmp_path / "missing.jpg"), "the dog", processor=processor)
    with pytest.raises(Exception, match=r"broken\.jpg"):
        predict_boxes(model(), str(broken), "the dog", processor=processor)


# ---------------------------------------------------------------------------------------------- draw_boxes
def test_an_rgb_tuple_is_one_colour_for_every_box():
    # was: (255, 0, 0) read as three colours, the numbers 255, 0 and 0: the second and third boxes drawn black
    image = Image.new("RGB", (60, 40), "white")
    drawn = np.asarray(draw_boxes(image, [[2, 2, 18, 18], [22, 2, 38, 18], [42, 2, 58, 18]], colors=(0, 0, 255),
                                  line_width=2))
    for x in (2, 22, 42):
        assert drawn[2, x].tolist() == [0, 0, 255]
    drawn = np.asarray(draw_boxes(image, [[2, 2, 18, 18]], gt_boxes=[[22, 2, 38, 18]], gt_color=(0, 255, 0),
                                  line_width=2))
    assert drawn[2, 22].tolist() == [0, 255, 0]


@pytest.mark.parametrize(("setting", "value", "match"), [
    ("line_width", -3, "line_width must be a positive whole number"),  # was: no box drawn, without a word
    ("line_width", 0, "line_width must be a positive whole number"),  # was: quietly the default
    ("font_size", -5, "font_size must be a positive whole number"),
    ("colors", ["red", "nocolour"], "'nocolour' is not a colour"),
    ("colors", [255, 0], "255 is not a colour"),
    ("gt_color", "nocolour", "'nocolour' is not a colour"),
])
def test_drawing_settings_that_would_draw_nothing_or_the_wrong_colour_are_refused(setting, value, match):
    with pytest.raises(ValueError, match=match):
        draw_boxes(Image.new("RGB", (60, 40)), [[2, 2, 18, 18]], texts="a", gt_boxes=[[1, 1, 5, 5]], **{setting: value})


def test_no_boxes_and_boxes_of_several_adapters():
    image = Image.new("RGB", (60, 40), "white")
    for empty in ([], (), torch.zeros(0, 4)):  # [] was refused as "shape (1, 0)" while a (0, 4) tensor drew nothing
        assert np.asarray(draw_boxes(image, empty)).min() == 255
    with pytest.raises(TypeError, match=r"boxes\[<adapter name>\]"):  # predict_boxes(..., adapters="all")
        draw_boxes(image, {"default": torch.tensor([[2.0, 2, 18, 18]])})
    with pytest.raises(TypeError, match="is text"):
        draw_boxes(image, "2 2 18 18")


# ---------------------------------------------------------------------------------------------- evaluate
def test_a_path_given_as_the_data_is_refused_naming_the_loader(processor):
    # was: a str has __getitem__ and __len__, so "data/refcoco" was read as items "d", "a", ...: "item 0: no 'image'"
    for data in ("data/refcoco", {"val": "data/refcoco_val.json"}):
        with pytest.raises(TypeError, match=r"got the path .*data/refcoco.*load_refer"):
            evaluate(model(), processor, data, progress=False)


@pytest.mark.parametrize("workers", [1.5, True, -1, "2"])
def test_a_bad_number_of_workers_is_refused_before_scoring(processor, workers):
    fixed = model()
    with pytest.raises(ValueError, match="num_workers must be a whole number"):
        evaluate(fixed, processor, [RECSample(Image.new("RGB", (200, 100)), "the dog", (50, 25, 150, 75))],
                 num_workers=workers, progress=False)
    assert fixed.served == 0


def test_ground_truth_reaching_outside_its_image_is_warned_about_when_clipped(processor):
    # was: clipped without a word (RECDataset warns when it clips; lists of samples and map-style data did not)
    image = Image.new("RGB", (200, 100))
    samples = [RECSample(image, "the dog", (50, 25, 150, 75), image_id=f"in{i}") for i in range(7)]
    samples.append(RECSample(image, "the dog", (50, 25, 400, 300), image_id="far"))  # boxes of a 2x larger image?
    with pytest.warns(UserWarning, match=r"1 of 8 ground-truth boxes reach outside .*image_id='far'.*200x100 image"):
        results = evaluate(model(), processor, {"val": samples}, progress=False)
    assert results["metrics"]["val"]["count"] == 8  # still scored, as the protocol says (clipped)
    no_warnings(lambda: evaluate(model(), processor, {"val": samples[:7]}, progress=False))


def test_label_letters_the_font_lacks_are_warned_about_and_a_font_can_be_given(tmp_path):
    # was: PIL's default font lacks é, ü, ñ, € and CJK: "the café" was drawn "the caf□" without a word
    from PIL import ImageFont

    image = Image.new("RGB", (200, 100), "white")
    with pytest.warns(UserWarning, match=r"no glyph for 'é狗'.*font=<path"):
        draw_boxes(image, [[10, 10, 100, 90], [120, 10, 190, 90]], texts=["the café", "狗 dog"])
    no_warnings(lambda: draw_boxes(image, [[10, 10, 100, 90]], texts=["the dog’s “left” ear, 90°"]))  # it has these
    with pytest.warns(UserWarning, match="no glyph for 'ñ'"):  # a PIL font given is used, and checked alike
        draw_boxes(image, [[10, 10, 100, 90]], texts=["el niño"], font=ImageFont.load_default(size=12))
    with pytest.raises(ValueError, match=r"nope\.ttf.*font file"):
        draw_boxes(image, [[10, 10, 100, 90]], texts=["x"], font=tmp_path / "nope.ttf")
