"""Hostile inputs to the data pipeline, round 2: each fault found by probing, and the behaviour a user relies on."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
from PIL import Image

from m2ist.data import RECDataset, RECDataWarning, RECSample, from_hf_dataset, load_coco_style, load_csv, load_jsonl
from m2ist.data.refer import load_refer
from m2ist.processing import RECProcessor


def _refer_root(tmp_path: Path, instances: dict, refs: list[dict]) -> Path:
    folder = tmp_path / "refcoco"
    folder.mkdir(parents=True)
    (folder / "instances.json").write_text(json.dumps(instances))
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return tmp_path


_REF = {"ref_id": 0, "ann_id": 5, "image_id": 1, "split": "train", "sentences": [{"sent": "the dog", "sent_id": 0}]}


# ------------------------------------------------------------------------------- 1: a CSV row that does not fit the header
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("image,bbox,text\na.jpg,1 2 30 40,the dog, left of the cat\n", "4 fields, but the header has 3"),
        ("image,text,bbox,image_id\na.jpg,the dog,1 2 30 40\n", "3 fields, but the header has 4"),
        ("image,text,bbox,text\na.jpg,the dog,1 2 30 40,cat\n", r"the header names the column\(s\) \['text'\] twice"),
    ],
)
def test_a_csv_row_that_does_not_fit_the_header_is_refused_naming_the_line(tmp_path, text, needle):
    path = tmp_path / "ann.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"ann.csv:\d: {needle}"):
        load_csv(path, "xyxy")
    path.write_text('image,bbox,text\na.jpg,1 2 30 40,"the dog, left of the cat"\n')  # quoted: read whole
    assert load_csv(path, "xyxy")[0].expression == "the dog, left of the cat"


# ------------------------------------------------------------------------------- 2: ids that name two entries
def test_duplicated_ids_in_coco_and_instances_files_are_refused(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
            "annotations": [{"id": 7, "image_id": 1, "bbox": [1, 1, 5, 5], "text": "the dog"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"coco.json images: entries 0 and 1 both have id 1"):
        load_coco_style(tmp_path / "coco.json")

    images = [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}]
    anns = [{"id": 5, "image_id": 1, "bbox": [1, 2, 3, 4]}, {"id": 5, "image_id": 1, "bbox": [50, 50, 10, 10]}]
    root = _refer_root(tmp_path / "anns", {"images": images, "annotations": anns}, [_REF])
    with pytest.raises(ValueError, match=r"instances.json annotations: entries 0 and 1 both have id 5"):
        load_refer(root, "refcoco")
    root = _refer_root(tmp_path / "imgs", {"images": images + images[:1], "annotations": anns[:1]}, [_REF])
    with pytest.raises(ValueError, match=r"instances.json images: entries 0 and 2 both have id 1"):
        load_refer(root, "refcoco")


def test_a_ref_whose_annotation_is_on_another_image_is_refused(tmp_path):
    instances = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
                 "annotations": [{"id": 5, "image_id": 2, "bbox": [1, 2, 3, 4]}]}
    root = _refer_root(tmp_path, instances, [_REF])
    with pytest.raises(ValueError, match=r"ref_id=0: the ref is on image 1 but its annotation 5 is on image 2"):
        load_refer(root, "refcoco")


# ------------------------------------------------------------------------------- 3: images of another size than annotated
def test_an_image_whose_size_differs_from_the_annotated_one_is_refused(tmp_path):
    Image.new("RGB", (100, 80)).save(tmp_path / "a.jpg")  # annotated at 200x160, then downscaled
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 160}],
            "annotations": [{"id": 8, "image_id": 1, "bbox": [10, 10, 60, 40], "text": "the cat"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    samples = load_coco_style(tmp_path / "coco.json")
    assert samples[0].annotated_size == (200, 160)
    with pytest.raises(ValueError, match=r"Sample 0 \(image_id=1\): .* states a 200x160 image, but .*a.jpg is 100x80"):
        RECDataset(samples)
    lazy = RECDataset(samples, validate_images=False)  # not read while building: checked when taken
    with pytest.raises(ValueError, match=r"Sample 0 .* 200x160 image, but .* is 100x80.* resized"):
        lazy[0]
    from m2ist.evaluation import _as_dataset  # evaluate() on a plain list of samples: checked when scored

    with pytest.raises(ValueError, match=r"Sample 0 \(image_id=1\): .* 200x160 image, but .* is 100x80"):
        _as_dataset(samples, "val")[0]

    (tmp_path / "a.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "x", "bbox": [1, 1, 9, 9],
                                                  "width": 80, "height": 100}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1 states a 80x100 image, but .* is 100x80.* rotated"):
        RECDataset(load_jsonl(tmp_path / "a.jsonl", "xyxy"))

    coco["images"][0].update(width=100, height=80)  # the right size, or none stated: accepted
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    assert RECDataset(load_coco_style(tmp_path / "coco.json"))[0]["box"] == (10.0, 10.0, 70.0, 50.0)
    assert RECDataset([RECSample(tmp_path / "a.jpg", "the cat", (1, 1, 9, 9))])[0]["box"] == (1, 1, 9, 9)


# ------------------------------------------------------------------------------- 4: expressions that show nothing
@pytest.mark.parametrize("phrase", ["\x00", "\u200b", "\u200b\u200d\ufeff", "\x07\x1b", "\xad"])
def test_an_expression_that_shows_nothing_is_dropped_and_refused(processor, phrase):
    image = Image.new("RGB", (40, 32))
    with pytest.warns(RECDataWarning, match="1 with an empty expression"):
        dataset = RECDataset([RECSample(image, phrase, (1, 1, 10, 10)), RECSample(image, "red", (1, 1, 10, 10))])
    assert len(dataset) == 1 and dataset.report.num_empty_expressions == 1
    with pytest.raises(ValueError, match="Phrase 0 is empty or shows nothing"):
        processor(image, phrase, boxes=(1, 1, 10, 10))


def test_a_phrase_left_without_word_tokens_is_refused(processor):
    image = Image.new("RGB", (40, 32))
    with pytest.raises(ValueError, match="Phrase 0 '\u0301' leaves no word token"):  # BERT strips a lone accent
        processor(image, "\u0301")
    with pytest.raises(ValueError, match="Phrase 0 'the red square' leaves no word token with max_query_len=2"):
        processor._with(max_query_len=2)([image], ["the red square"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = processor([image, image], ["the red square", "\U0001f600"])["input_ids"]  # [UNK] is a word
    assert ids[1].tolist()[:3] == [2, 1, 3]


# ------------------------------------------------------------------------------- 5: split requests
def test_an_empty_split_list_is_refused_and_every_spelling_of_a_split_is_taken(tmp_path):
    image = Image.new("RGB", (40, 32))
    rows = [{"image": image, "text": "dog", "bbox": [1, 1, 9, 9], "split": "val"}]
    with pytest.raises(ValueError, match=r"split=\[\] selects no split"):
        from_hf_dataset(rows, box_format="xyxy", split=[])
    instances = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 1, "bbox": [1, 2, 3, 4]}]}
    root = _refer_root(tmp_path, instances, [_REF])
    with pytest.raises(ValueError, match=r"split=\[\] selects no split"):
        load_refer(root, "refcoco", split=[])
    other = [{"image": image, "text": "cat", "bbox": [1, 1, 9, 9]}]
    both = from_hf_dataset({"val": rows, "validation": other}, box_format="xyxy", split="val")
    assert sorted(sample.expression for sample in both) == ["cat", "dog"]


# ------------------------------------------------------------------------------- 6: processor settings
@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"image_std": float("inf")}, "must be finite numbers"),  # every image became zeros
        ({"image_mean": (float("nan"), 0.4, 0.4)}, "must be finite numbers"),  # every pixel became NaN
        ({"image_mean": (123.675, 116.28, 103.53), "image_std": (58.395, 57.12, 57.375)}, "Divide them by 255"),
        ({"max_query_len": 7.9}, "max_query_len must be a whole number from 2 to 8192, got 7.9"),  # read as 7
        ({"max_query_len": "12"}, "max_query_len must be a whole number"),
        ({"canvas_size": 10**9}, "canvas_size must be a whole number from 1 to 16384"),
        ({"lowercase": "false"}, "lowercase must be true or false, got 'false'"),  # read as True
    ],
)
def test_processor_settings_are_checked_by_type_range_and_finiteness(processor, settings, needle):
    with pytest.raises(ValueError, match=needle):
        processor._with(**settings)


def test_a_bad_setting_in_a_saved_processor_names_the_file(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    (tmp_path / "processor_config.json").write_text(json.dumps({**config, "lowercase": "false"}))
    with pytest.raises(ValueError, match=r"processor_config.json: lowercase must be true or false"):
        RECProcessor.from_pretrained(tmp_path)
    config["image_processor"]["image_std"] = [float("inf")] * 3
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"processor_config.json: image_mean and image_std must be finite"):
        RECProcessor.from_pretrained(tmp_path)
