"""Fault hunt 4: real-world images and phrases through the processor and the inference API."""

from __future__ import annotations

import base64
import logging
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, BertTokenizer

import m2ist.processing as processing
from m2ist.data.images import ImageLoadError
from m2ist.inference import draw_boxes, predict_boxes
from m2ist.processing import RECImageProcessor, RECProcessor, load_rec_image
from tests.tiny import IMAGE_SIZE, QUERY_LEN, text_tower, tiny_config, vision_tower

WORDS = ["the", "man", "woman", "on", "left", "right", "red", "shirt", "dog", "café"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizer:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n", encoding="utf-8")
    return BertTokenizer(str(path), do_lower_case=False)


@pytest.fixture
def processor(tokenizer: BertTokenizer) -> RECProcessor:
    return RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)


def striped(width: int = 40, height: int = 20) -> np.ndarray:
    """An RGB array with a white stripe on the left of the stored grid (shows a rotation)."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, :5] = 255
    return array


# ------------------------------------------------------------------ transformers image-processor options
@pytest.mark.parametrize("option", [{"size": 64}, {"do_normalize": False}, {"do_rescale": False}, {"image_size": 64}])
def test_image_processor_refuses_options_it_does_not_read(option: dict) -> None:
    with pytest.raises(TypeError, match=f"does not have: \\['{next(iter(option))}'\\]"):
        RECImageProcessor(canvas_size=32, **option)
    with pytest.raises(TypeError, match=r"do_rescale: uint8 input is read as 0\.\.255"):
        RECImageProcessor(canvas_size=32)(Image.new("RGB", (4, 4)), do_rescale=False)


def test_image_processor_overrides_at_load_are_checked(tmp_path: Path) -> None:
    RECImageProcessor(canvas_size=32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="canvas_size must be a whole number"):  # was set unchecked
        RECImageProcessor.from_pretrained(tmp_path, canvas_size=7.9)
    with pytest.raises(TypeError, match="do_normalize: to keep raw"):  # was dropped without a word
        AutoImageProcessor.from_pretrained(tmp_path, do_normalize=False)
    assert RECImageProcessor.from_pretrained(tmp_path, canvas_size=64).canvas_size == 64


# ------------------------------------------------------------------ images
def test_float_pil_image_with_nan_is_refused(tmp_path: Path) -> None:
    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    values[0, 0] = np.nan
    with pytest.raises(ImageLoadError, match="NaN or infinite values"):  # was an all-black image
        load_rec_image(Image.fromarray(values))
    Image.fromarray(values).save(tmp_path / "depth.tif")
    with pytest.raises(ImageLoadError, match=r"depth\.tif.*NaN or infinite"):
        load_rec_image(tmp_path / "depth.tif")


def test_tiff_orientation_is_the_stored_grid_from_every_source(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.tif"
    Image.fromarray(striped()).save(path, exif=exif)
    data = path.read_bytes()
    uri = "data:image/tiff;base64," + base64.b64encode(data).decode()
    expected = np.asarray(load_rec_image(path))
    assert expected.shape == (20, 40, 3)
    for source in (uri, data):  # a data URI (and a download) was the upright grid: boxes in another frame
        assert np.array_equal(np.asarray(load_rec_image(source)), expected)


# ------------------------------------------------------------------ phrases
def test_nfc_and_nfd_phrases_give_the_same_tokens(tokenizer: BertTokenizer) -> None:
    processor = RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN, lowercase=False)
    image = Image.new("RGB", (8, 8))
    nfc = processor([image], [unicodedata.normalize("NFC", "the café")])["input_ids"]
    nfd = processor([image], [unicodedata.normalize("NFD", "the café")])["input_ids"]
    assert torch.equal(nfc, nfd)
    assert tokenizer.unk_token_id not in nfd.tolist()[0]


def test_texts_must_pair_with_the_images(processor: RECProcessor) -> None:
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (9, 9))]
    with pytest.raises(TypeError, match="a set or a dict has no order"):
        processor(images, {"the dog", "the man"})
    with pytest.raises(ValueError, match="2 images and one phrase string"):
        processor(images, "the dog")
    one = processor(images[:1], "the dog")  # a list of one image with one phrase string is one sample
    assert one["input_ids"].shape == (1, QUERY_LEN)
    pandas = pytest.importorskip("pandas")
    for ordered in (("the dog", "the man"), pandas.Series(["the dog", "the man"]), iter(["the dog", "the man"])):
        assert torch.equal(processor(images, ordered)["input_ids"], processor(images, ["the dog", "the man"])["input_ids"])


def test_long_phrase_truncation_is_warned_once(processor: RECProcessor, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(processing, "_warned_truncation", False)
    image = Image.new("RGB", (8, 8))
    long = "the man on the left red shirt woman dog"  # 9 words + [CLS] + [SEP] > 8
    with caplog.at_level(logging.WARNING, logger="m2ist.processing"):
        processor([image], ["the man on the left red"])  # exactly 8 tokens: not cut
        assert "max_query_len" not in caplog.text
        processor([image, image], ["the dog", long])
        processor([image], [long])
    assert caplog.text.count("has 11 tokens but max_query_len=8") == 1


# ------------------------------------------------------------------ inference API
def test_predict_boxes_reads_encoded_bytes(processor: RECProcessor, tmp_path: Path, one_thread: None) -> None:
    model = get_model(processor)
    path = tmp_path / "image.png"
    Image.fromarray(striped(33, 17)).save(path)
    from_path = predict_boxes(model, path, "the dog")
    from_bytes = predict_boxes(model, path.read_bytes(), "the dog")  # was "Cannot use an object of type int"
    assert torch.equal(from_path, from_bytes)
    with pytest.raises(ImageLoadError, match="bytes given as an image is not an image"):
        predict_boxes(model, b"not an image", "the dog")


def get_model(processor: RECProcessor):
    from m2ist import get_side_tuned_model

    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.processor = processor
    return model


def test_draw_boxes_checks_labels_and_takes_one_colour() -> None:
    image = Image.new("RGB", (20, 10))
    with pytest.raises(TypeError, match="texts must be phrase strings"):  # was AttributeError: 'int' ... 'split'
        draw_boxes(image, [[1, 1, 5, 5]], texts=[3])
    drawn = draw_boxes(image, [[1, 1, 5, 5], [6, 1, 9, 5]], colors="red")  # was "unknown color specifier: 'r'"
    assert drawn.getpixel((1, 3)) == (255, 0, 0) and drawn.getpixel((6, 3)) == (255, 0, 0)


# ------------------------------------------------------------------ augmentation settings
@pytest.mark.parametrize("option", [{"hflip": "false"}, {"seed": "0"}, {"resize_choices": [448.9]},
                                    {"resize_reference_size": "640"}, {"crop_p": True}])
def test_augmentation_settings_are_typed(option: dict) -> None:
    from m2ist.data.transforms import RECAugmentation

    with pytest.raises(ValueError, match=f"RECAugmentation {next(iter(option))} must be"):
        RECAugmentation(**option)


def test_augmentation_in_a_saved_processor_is_checked(processor: RECProcessor, tmp_path: Path) -> None:
    import json

    from m2ist.data.transforms import RECAugmentation

    processor._with(augment=RECAugmentation(seed=np.int64(3), crop_p=np.float32(0.5))).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config["augment"]["hflip"] = "false"  # hand-edited: "false" is a true string, flips stayed on
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"processor_config\.json: RECAugmentation hflip must be true or false"):
        RECProcessor.from_pretrained(tmp_path)


def test_a_very_long_phrase_is_shortened_in_the_truncation_warning(processor: RECProcessor,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A 10,000-character phrase was quoted whole in the warning (a 10 KB log line)."""
    monkeypatch.setattr(processing, "_warned_truncation", False)
    with caplog.at_level(logging.WARNING, logger="m2ist.processing"):
        processor([Image.new("RGB", (8, 8))], ["the dog " * 1250])
    assert "tokens but max_query_len=8" in caplog.text and "…'" in caplog.text and len(caplog.text) < 800
