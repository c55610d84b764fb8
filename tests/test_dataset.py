"""RECDataset: cheap validation when built (clip, drop, skip, report) and the items it yields."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from m2ist.data import RECDataset, RECDataWarning, RECSample, load_refer
from m2ist.data.images import ImageLoadError, ImageNotFoundError


def _image(path: Path, size=(40, 30), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _build(samples, **kwargs) -> RECDataset:
    """Build a dataset and fail if it warns (tests that expect warnings use pytest.warns)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RECDataWarning)
        return RECDataset(samples, **kwargs)


def test_items_are_dicts_with_an_rgb_image_and_float_box(tmp_path):
    path = _image(tmp_path / "a.jpg")
    sample = RECSample(path, "red square", (1, 2, 30, 20), image_id="a", metadata={"split": "val"})
    dataset = _build([sample])
    assert len(dataset) == 1
    item = dataset[0]
    assert set(item) == {"image", "expression", "box", "image_id", "index", "metadata"}
    assert item["image"].mode == "RGB" and item["image"].size == (40, 30)
    assert item["box"] == (1.0, 2.0, 30.0, 20.0) and all(isinstance(v, float) for v in item["box"])
    assert item["expression"] == "red square" and item["image_id"] == "a" and item["index"] == 0
    item["metadata"]["split"] = "changed"
    assert dataset[0]["metadata"] == {"split": "val"}  # items get a copy
    assert dataset[-1]["index"] == 0
    with pytest.raises(IndexError):
        dataset[1]


def test_pil_and_array_images_are_accepted(tmp_path):
    samples = [
        RECSample(Image.new("L", (20, 10), 5), "gray", (0, 0, 5, 5)),
        RECSample(np.zeros((10, 20, 4), dtype=np.uint8), "transparent", (0, 0, 5, 5)),
    ]
    dataset = _build(samples)
    assert dataset[0]["image"].getpixel((0, 0)) == (5, 5, 5)
    assert dataset[1]["image"].getpixel((0, 0)) == (255, 255, 255)


def test_out_of_image_boxes_are_clipped_with_one_warning(tmp_path):
    path = _image(tmp_path / "a.jpg", (40, 30))
    samples = [
        RECSample(path, "spills right", (30, 5, 55, 20)),
        RECSample(path, "spills up-left", (-4, -2, 10, 10)),
        RECSample(path, "inside", (1, 1, 2, 2)),
    ]
    with pytest.warns(RECDataWarning, match=r"Clipped 2 of 3 boxes.*spills right.*40x30") as caught:
        dataset = RECDataset(samples)
    assert len(caught) == 1
    assert [dataset[i]["box"] for i in range(3)] == [(30, 5, 40, 20), (0, 0, 10, 10), (1, 1, 2, 2)]
    assert dataset.report.num_clipped == 2 and samples[0].box == (30, 5, 55, 20)  # input left untouched


def test_degenerate_boxes_and_empty_expressions_are_dropped_and_reported_once(tmp_path):
    path = _image(tmp_path / "a.jpg", (40, 30))
    samples = [
        RECSample(path, "good", (1, 1, 10, 10)),
        RECSample(path, "zero width", (5, 1, 5, 10)),
        RECSample(path, "negative height", (1, 10, 10, 2)),
        RECSample(path, "   ", (1, 1, 10, 10)),
        RECSample(path, "fully outside", (50, 40, 60, 50)),  # nothing left after clipping
        RECSample(path, "nan", (float("nan"), 1, 10, 10)),
        RECSample(path, "also good", (2, 2, 12, 12)),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = RECDataset(samples)
    dropped = [w for w in caught if "Dropped" in str(w.message)]
    assert len(dropped) == 1 and issubclass(dropped[0].category, RECDataWarning)
    message = str(dropped[0].message)
    assert "Dropped 5 of 7 samples" in message
    assert "4 with a degenerate or invalid box" in message and "1 with an empty expression" in message
    assert "zero width" in message and "'   '" in message
    assert [dataset[i]["expression"] for i in range(len(dataset))] == ["good", "also good"]
    assert dataset.source_indices == [0, 6]
    report = dataset.report
    assert (report.num_input, report.num_kept, report.num_invalid_boxes, report.num_empty_expressions) == (7, 2, 4, 1)


def test_missing_image_names_the_file_and_the_sample_index(tmp_path):
    path = _image(tmp_path / "a.jpg")
    samples = [RECSample(path, "ok", (0, 0, 5, 5)), RECSample(tmp_path / "gone.jpg", "lost", (0, 0, 5, 5), "g")]
    with pytest.raises(ImageNotFoundError, match=r"Sample 1 \(image_id='g'\).*gone.jpg"):
        RECDataset(samples)


def test_skip_invalid_skips_unreadable_images_and_counts_them_in_one_warning(tmp_path):
    good = _image(tmp_path / "a.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    samples = [
        RECSample(good, "ok", (0, 0, 5, 5)),
        RECSample(tmp_path / "gone.jpg", "lost", (0, 0, 5, 5)),
        RECSample(broken, "broken one", (0, 0, 5, 5)),
        RECSample(broken, "broken two", (0, 0, 5, 5)),
    ]
    with pytest.warns(RECDataWarning, match=r"Skipped 3 of 4 samples whose image could not be read \(2 files\)") as caught:
        dataset = RECDataset(samples, skip_invalid=True)
    assert len(caught) == 1 and "gone.jpg" in str(caught[0].message)
    assert len(dataset) == 1 and dataset.report.num_unreadable_images == 3
    with pytest.raises(ImageLoadError, match=r"Sample 2.*broken.jpg"):
        RECDataset([samples[0], samples[0], samples[2]])


def test_validation_reads_only_the_image_header(tmp_path, monkeypatch):
    path = _image(tmp_path / "a.png", (40, 30))

    def refuse_to_decode(self):
        raise AssertionError("pixels were decoded during validation")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_decode)
    dataset = _build([RECSample(path, "x", (0, 0, 5, 5))] * 50)
    assert len(dataset) == 50
    monkeypatch.undo()
    assert dataset[0]["image"].size == (40, 30)


def test_image_that_disappears_after_building_names_file_and_index(tmp_path):
    path = _image(tmp_path / "a.jpg")
    other = _image(tmp_path / "b.jpg")
    dataset = _build([RECSample(path, "x", (0, 0, 5, 5)), RECSample(other, "y", (0, 0, 5, 5), image_id=7)])
    other.unlink()
    with pytest.raises(FileNotFoundError, match=r"Sample 1 \(source index 1, image_id=7\).*b.jpg"):
        dataset[1]


def test_transform_output_is_returned(tmp_path):
    path = _image(tmp_path / "a.jpg", (40, 30))

    def transform(image, expression, box):
        return {"size": image.size, "text": expression.upper(), "box": box}

    dataset = _build([RECSample(path, "cat", (1, 2, 3, 4))], transform=transform)
    assert dataset[0] == {"size": (40, 30), "text": "CAT", "box": (1.0, 2.0, 3.0, 4.0)}


def test_exif_transpose_changes_the_size_boxes_are_checked_against(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees: stored 40x20 shows as 20x40
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    tall_box = (2, 2, 18, 38)  # fits the displayed 20x40 image
    upright = _build([RECSample(path, "tall thing", tall_box)], exif_transpose=True)
    assert upright[0]["box"] == tall_box and upright[0]["image"].size == (20, 40)
    with pytest.warns(RECDataWarning, match="Clipped 1"):
        stored = RECDataset([RECSample(path, "tall thing", tall_box)])
    assert stored[0]["box"] == (2, 2, 18, 20)


def test_no_valid_sample_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="No valid samples among 1"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RECDataWarning)
        RECDataset([RECSample(_image(tmp_path / "a.jpg"), "", (0, 0, 5, 5))])
    with pytest.raises(TypeError, match=r"samples\[0\] is a dict"):
        RECDataset([{"image": "a.jpg", "expression": "x", "box": (0, 0, 1, 1)}])


def test_dataset_pickles_for_dataloader_workers(tmp_path):
    dataset = _build([RECSample(_image(tmp_path / "a.jpg"), "x", (0, 0, 5, 5))])
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone[0]["box"] == dataset[0]["box"] and len(clone) == 1


def test_refer_files_to_dataset_items_end_to_end(tmp_path):
    root = tmp_path / "refer"
    (root / "refcocog").mkdir(parents=True)
    refs = [
        {
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000000005_9.jpg",
            "ann_id": 9,
            "ref_id": 0,
            "image_id": 5,
            "split": "val",
            "sentences": [
                {"tokens": ["a"], "raw": "A", "sent_id": 0, "sent": "a"},
                {"tokens": ["b"], "raw": "B", "sent_id": 1, "sent": "b"},
            ],
            "category_id": 1,
        }
    ]
    with open(root / "refcocog" / "refs(umd).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    instances = {
        "images": [{"id": 5, "file_name": "COCO_train2014_000000000005.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 9, "image_id": 5, "bbox": [4, 3, 30, 30], "category_id": 1}],
    }
    (root / "refcocog" / "instances.json").write_text(json.dumps(instances))
    _image(tmp_path / "train2014" / "COCO_train2014_000000000005.jpg", (40, 30))
    samples = load_refer(root, "refcocog", split="val", image_root=tmp_path / "train2014")
    with pytest.warns(RECDataWarning, match="Clipped 2 of 2"):  # y1 = 3 + 30 > height 30
        dataset = RECDataset(samples)
    assert [dataset[i]["expression"] for i in range(2)] == ["a", "b"]
    assert dataset[1]["box"] == (4.0, 3.0, 34.0, 30.0)
    assert dataset[1]["metadata"]["sent_id"] == 1 and dataset[1]["image_id"] == 5
