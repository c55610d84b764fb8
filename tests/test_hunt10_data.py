"""Fault hunt round 10, the data users have: formats read silently wrong (repros in /work/exp/hunt10/data/)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from m2ist.data import RECDataset, RECSample, from_hf_dataset, load_coco_style, load_csv, load_jsonl
from m2ist.data.loaders import box_values


def _image(folder: Path, size: tuple[int, int] = (640, 480)) -> Path:
    path = folder / "a.png"
    Image.new("RGB", size).save(path)
    return path


def _jsonl(folder: Path, records: list[dict]) -> Path:
    path = folder / "a.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# ------------------------------------------------------------------ 1: fractions of the image read as pixel boxes
def test_normalised_boxes_loaded_as_pixels_are_refused_by_the_dataset(tmp_path):
    _image(tmp_path)
    path = _jsonl(tmp_path, [{"image": "a.png", "text": "the dog", "bbox": [0.1, 0.2, 0.5, 0.6]}])
    with pytest.raises(ValueError, match=r"Sample 0 .*within \[0, 1\] in a 640x480 image.*normalized=True"):
        RECDataset(load_jsonl(path, "xyxy"))
    [sample] = RECDataset(load_jsonl(path, "xyxy", normalized=True)).samples  # what the user meant
    assert sample.box == pytest.approx((64.0, 96.0, 320.0, 288.0))


def test_normalised_boxes_of_images_not_read_while_building_are_refused_when_taken(tmp_path):
    samples = [RECSample(image=str(_image(tmp_path)), expression="the dog", box=(0.1, 0.2, 0.5, 0.6))]
    dataset = RECDataset(samples, validate_images=False)
    with pytest.raises(ValueError, match=r"Sample 0 .*looks normalised"):
        dataset[0]


# ------------------------------------------------------------------ 2: a box that is not an ordered list of numbers
@pytest.mark.parametrize(("box", "needle"), [({"0": 100, "1": 120, "2": 300, "3": 400}, "a mapping with keys"),
                                             ({400.0, 100.0, 300.0, 120.0}, "a set")])
def test_a_box_stored_as_a_mapping_or_a_set_is_refused(tmp_path, box, needle):
    image = str(_image(tmp_path))
    if isinstance(box, dict):  # from a file: a JSON object with digit keys
        with pytest.raises(ValueError, match=rf"a.jsonl:1: the box .* is {needle}.*as a list"):
            load_jsonl(_jsonl(tmp_path, [{"image": "a.png", "text": "dog", "bbox": box}]), "xyxy")
    with pytest.raises(ValueError, match=rf"row 0: the box .* is {needle}"):  # a row built in Python
        from_hf_dataset([{"image": image, "text": "dog", "bbox": box}], "xyxy")
    with pytest.raises(ValueError, match="not a sequence of four numbers"):  # in memory (processor boxes, samples)
        box_values(box)


# ------------------------------------------------------------------ 3: a file holding several splits
def test_a_file_with_several_splits_warns_and_split_selects(tmp_path):
    _image(tmp_path, (64, 48))
    records = [{"image": "a.png", "text": text, "bbox": [1, 2, 30, 40], "split": split}
               for text, split in (("a", "train"), ("b", "validation"), ("c", "test"))]
    path = _jsonl(tmp_path, records)
    with pytest.warns(UserWarning, match=r"splits \['test', 'train', 'validation'\].*Pass split="):
        assert len(load_jsonl(path, "xyxy")) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.expression for s in load_jsonl(path, "xyxy", split="train")] == ["a"]
        assert [s.expression for s in load_jsonl(path, "xyxy", split="val")] == ["b"]  # val is validation
        assert len(load_jsonl(path, "xyxy", split="all")) == 3
    with pytest.raises(ValueError, match=r"has no split 'testA'; available splits"):
        load_jsonl(path, "xyxy", split="testA")
    (tmp_path / "a.csv").write_text("image,text,bbox,split\na.png,a,1 2 30 40,train\na.png,b,1 2 30 40,val\n")
    assert [s.expression for s in load_csv(tmp_path / "a.csv", "xyxy", split="val")] == ["b"]
    coco = {"images": [{"id": 1, "file_name": "a.png", "split": "train"}, {"id": 2, "file_name": "a.png", "split": "val"}],
            "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "text": "a"},
                            {"id": 2, "image_id": 2, "bbox": [1, 2, 3, 4], "text": "b"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match=r"splits \['train', 'val'\]"):
        load_coco_style(tmp_path / "coco.json")
    assert [s.expression for s in load_coco_style(tmp_path / "coco.json", split="train")] == ["a"]


def test_split_asked_of_records_without_one_is_refused(tmp_path):
    _image(tmp_path, (64, 48))
    plain = _jsonl(tmp_path, [{"image": "a.png", "text": "a", "bbox": [1, 2, 30, 40]}])
    with pytest.raises(ValueError, match=r"no record has one"):
        load_jsonl(plain, "xyxy", split="train")
    mixed = _jsonl(tmp_path, [{"image": "a.png", "text": "a", "bbox": [1, 2, 30, 40], "split": "train"},
                              {"image": "a.png", "text": "b", "bbox": [1, 2, 30, 40]}])
    with pytest.raises(ValueError, match=r"a.jsonl:2: no 'split' field"):
        load_jsonl(mixed, "xyxy", split="train")
