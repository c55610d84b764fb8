"""Hostile inputs to the data pipeline: each fault found by probing, and the behaviour a user relies on instead."""

from __future__ import annotations

import json
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2ist.data import RECDataset, RECDataWarning, RECSample, load_refer
from m2ist.data.collator import RECCollator
from m2ist.data.files import load_csv, load_jsonl
from m2ist.data.hf import from_hf_dataset
from m2ist.data.images import image_size, load_image
from m2ist.data.transforms import has_location_word, swap_left_right
from m2ist.processing import RECProcessor, load_rec_image

EXIF_ORIENTATION = 0x0112


# ------------------------------------------------------------------------------------------------ 1: boxes off the image
@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((100, 10, 130, 40), "outside"),  # starts at the right edge: nothing inside
        ((-10, 10, 0, 40), "outside"),  # ends at the left edge
        ((10, 50, 20, 60), "outside"),  # starts at the bottom edge
        ((5, 5, 5, 5), "zero width or height"),
        ((5, 5, 30, 5), "zero width or height"),
    ],
)
def test_processor_refuses_boxes_with_nothing_inside_the_image(processor, box, message):
    with pytest.raises(ValueError, match=rf"Box 0 .*{message}"):
        processor(Image.new("RGB", (100, 50)), "the dog", boxes=box)
    with pytest.warns(RECDataWarning, match="Clipped 1 of 1 boxes"):
        labels = processor(Image.new("RGB", (100, 50)), "the dog", boxes=(99, 10, 130, 40))["labels"]
    assert labels[0, 2] > 0  # one pixel inside is still a box


def test_dataset_item_whose_box_lies_outside_its_image_raises_naming_the_sample():
    image = Image.new("RGB", (100, 50))
    rows = [{"image": image, "text": "the dog", "bbox": [120, 10, 150, 40]},
            {"image": image, "text": "the cat", "bbox": [10, 10, 30, 40]}]
    dataset = RECDataset(from_hf_dataset(rows, box_format="xyxy"))  # table rows: sizes not read while building
    with pytest.raises(ValueError, match=r"Sample 0 .*outside its 100x50 image"):
        dataset[0]
    assert dataset[1]["box"] == (10.0, 10.0, 30.0, 40.0)


# ------------------------------------------------------------------------------------------------ 2: CSV width/height
@pytest.mark.parametrize(("box_format", "columns", "values"),
                         [("xywh", "x,y,width,height", "0.1,0.2,0.5,0.5"),
                          ("cxcywh", "cx,cy,width,height", "0.35,0.45,0.5,0.5")])
def test_normalized_csv_box_columns_named_width_height_are_not_the_image_size(tmp_path, box_format, columns, values):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    (tmp_path / "boxes.csv").write_text(f"image,text,{columns}\na.png,the cat,{values}\n")
    [sample] = load_csv(tmp_path / "boxes.csv", box_format, normalized=True)
    assert sample.box == pytest.approx((20.0, 20.0, 120.0, 70.0))


def test_a_fractional_image_size_in_a_record_is_refused(tmp_path):
    Image.new("RGB", (200, 100)).save(tmp_path / "a.png")
    row = {"image": "a.png", "text": "x", "bbox": [0.1, 0.1, 0.5, 0.5], "width": 0.5, "height": 100}
    (tmp_path / "a.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: the image width/height must be whole"):
        load_jsonl(tmp_path / "a.jsonl", "xyxy", normalized=True)


# ------------------------------------------------------------------------------------------------ 3: TIFF orientation
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_tiff_orientation_is_handled_like_every_other_format(tmp_path, orientation):
    stored = np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3)  # a 6x4 grid, every pixel different
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    for suffix in ("tif", "png"):  # Pillow rotates TIFFs itself when reading them, PNGs not
        Image.fromarray(stored).save(tmp_path / f"a.{suffix}", exif=exif.tobytes())
    for flag in (False, True):
        tiff, png = (load_image(tmp_path / f"a.{suffix}", exif_transpose=flag) for suffix in ("tif", "png"))
        np.testing.assert_array_equal(np.asarray(tiff), np.asarray(png))
        assert image_size(tmp_path / "a.tif", exif_transpose=flag) == tiff.size
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "a.tif")), stored)  # the stored grid by default
    with warnings.catch_warnings():
        warnings.simplefilter("error", RECDataWarning)
        displayed = load_image(tmp_path / "a.tif", exif_transpose=True).size
        dataset = RECDataset([RECSample(str(tmp_path / "a.tif"), "it", (0, 1, *displayed))], exif_transpose=True)
    assert dataset[0]["box"] == (0.0, 1.0, *map(float, displayed))


# ------------------------------------------------------------------------------------------------ 4: JSONL lines
def test_jsonl_keeps_unicode_line_separators_inside_strings_and_counts_lines_right(tmp_path):
    Image.new("RGB", (50, 50)).save(tmp_path / "a.png")
    lines = [json.dumps({"image": "a.png", "text": f"the man{char}on the left", "bbox": [1, 2, 3, 4]},
                        ensure_ascii=False) for char in ("\u2028", "\u2029", "\x85")]
    (tmp_path / "a.jsonl").write_bytes(("\r\n".join([*lines, "", "{broken"]) + "\r\n").encode())
    with pytest.raises(ValueError, match=r"a.jsonl:5: not valid JSON"):
        load_jsonl(tmp_path / "a.jsonl", "xyxy")
    (tmp_path / "a.jsonl").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    samples = load_jsonl(tmp_path / "a.jsonl", "xyxy")
    assert [s.expression for s in samples] == [f"the man{c}on the left" for c in ("\u2028", "\u2029", "\x85")]
    assert [s.metadata["source"].rsplit(":", 1)[1] for s in samples] == ["1", "2", "3"]


# ------------------------------------------------------------------------------------------------ 5: refer sentences
def _refer(root: Path, sentences) -> Path:
    folder = root / "refcoco"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "instances.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}],
                                                       "annotations": [{"id": 10, "bbox": [1, 2, 3, 4]}]}))
    ref = {"ref_id": 7, "ann_id": 10, "image_id": 1, "split": "train", "sentences": sentences}
    (folder / "refs(unc).p").write_bytes(pickle.dumps([ref], protocol=2))
    return root


def test_refer_sentences_as_a_string_give_one_sample_and_none_names_the_ref(tmp_path):
    assert [s.expression for s in load_refer(_refer(tmp_path, "the man on the left"))] == ["the man on the left"]
    assert [s.expression for s in load_refer(_refer(tmp_path, ["a", {"sent": "b"}]))] == ["a", "b"]
    with pytest.raises(ValueError, match=r"ref_id=7: the ref has no 'sentences'"):
        load_refer(_refer(tmp_path, None))


# ------------------------------------------------------------------------------------------------ 6: flip words
@pytest.mark.parametrize(
    ("text", "expected"),
    [("right2 cup", "left2 cup"), ("left_side", "right_side"), ("topleft corner", "topright corner"),
     ("UpperRight", "UpperLeft"), ("the lefthand one", "the righthand one"), ("leftside guy", "rightside guy"),
     ("rightside", "leftside"), ("bottom-left", "bottom-right"), ("LEFTMOST", "RIGHTMOST"),
     ("bright lefty leftover copyright", "bright lefty leftover copyright")],
)
def test_flip_swaps_exactly_the_words_counted_as_left_right_location_words(text, expected):
    assert swap_left_right(text) == expected
    assert swap_left_right(expected) == text
    assert has_location_word(text) == (expected != text)  # what the flip changes is what the crop protects


# ------------------------------------------------------------------------------------------------ 7: clear input errors
@pytest.mark.parametrize(
    ("images", "texts", "boxes", "message"),
    [("one", "dog", "1 2 3 4", "got the text '1 2 3 4'"),
     ("one", "dog", [[1, 2, 3, 4]], "nested"),
     ("four", ["dog"] * 4, [1, 2, 3, 4], "got int 1, not a sequence"),
     ("one", "dog", ["1", "2", "3", "4"], "every value must be a number")],
)
def test_malformed_boxes_get_one_clear_message(processor, images, texts, boxes, message):
    image = Image.new("RGB", (40, 20))
    with pytest.raises(ValueError, match=rf"Box 0 must be 4 finite numbers \(x0, y0, x1, y1\).*{message}.*\(B, 4\)"):
        processor(image if images == "one" else [image] * 4, texts, boxes=boxes)


def test_tensor_images_read_like_numpy_arrays(processor):
    two_channels = np.full((6, 5, 2), 255, dtype=np.uint8)
    assert load_rec_image(torch.from_numpy(two_channels)) == load_rec_image(two_channels)
    pixels = torch.rand(3, 6, 5)
    expected = load_rec_image(pixels)
    for dtype in (torch.bfloat16, torch.float16):
        low_precision = load_rec_image(pixels.to(dtype))
        assert low_precision.size == expected.size == (5, 6)
        assert np.abs(np.asarray(low_precision, np.int16) - np.asarray(expected, np.int16)).max() <= 2
    assert processor(pixels.bfloat16(), "red", boxes=(0, 0, 2, 2))["pixel_values"].dtype == torch.float32


# ------------------------------------------------------------------------------------------------ 8: channels-first tensors
def test_channels_first_tensor_that_could_be_channels_last_is_refused():
    red = torch.zeros(3, 10, 4, dtype=torch.uint8)
    red[0] = 255
    with pytest.raises(ValueError, match=r"\(3, 10, 4\) could be channels-first .*permute\(1, 2, 0\)\.numpy\(\)"):
        load_rec_image(red)
    image = load_rec_image(red.permute(1, 2, 0).numpy())
    assert image.size == (4, 10) and image.getpixel((0, 0)) == (255, 0, 0)
    wide = torch.zeros(3, 10, 8, dtype=torch.uint8)
    wide[0] = 255
    assert load_rec_image(wide).size == (8, 10) and load_rec_image(wide).getpixel((7, 9)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------------ 9: small things
def test_a_text_box_in_a_sample_is_dropped_not_read_digit_by_digit():
    image = Image.new("RGB", (40, 30))
    with pytest.warns(RECDataWarning, match="1 with a degenerate or invalid box"):
        dataset = RECDataset([RECSample(image, "x", "1234"), RECSample(image, "y", np.array([1, 1, 5, 5]))])
    assert len(dataset) == 1 and dataset.samples[0].box == (1.0, 1.0, 5.0, 5.0)


def test_numpy_indices_give_int_items_the_collator_keeps(processor):
    image = Image.new("RGB", (40, 30))
    dataset = RECDataset([RECSample(image, f"red {i}", (1, 1, 10, 10)) for i in range(3)])
    items = [dataset[np.int64(1)], dataset[torch.tensor(2)]]
    assert [type(item["index"]) for item in items] == [int, int]
    batch = RECCollator(processor, return_geometry=True)(items)
    assert batch["index"].tolist() == [1, 2]
    with pytest.raises(TypeError, match="indices must be integers"):
        dataset[1.0]


@pytest.mark.parametrize("phrase", ["", "   \t"])
def test_processor_refuses_an_empty_phrase(processor, phrase):
    with pytest.raises(ValueError, match="Phrase 1 is empty"):
        processor([Image.new("RGB", (8, 8))] * 2, ["red", phrase])


# ------------------------------------------------------------------------------------------------ 10: missing tokenizer
def test_a_processor_whose_tokenizer_files_are_missing_is_refused(processor, tmp_path):
    processor.save_pretrained(tmp_path / "saved")
    assert len(RECProcessor.from_pretrained(tmp_path / "saved").tokenizer) == len(processor.tokenizer)
    shutil.copytree(tmp_path / "saved", tmp_path / "damaged")
    (tmp_path / "damaged" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"has 5 tokens, but the processor was saved with 11.*tokenizer files"):
        RECProcessor.from_pretrained(tmp_path / "damaged")
