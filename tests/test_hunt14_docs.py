"""Round 14, the documented data and evaluation calls as a hurried user makes them: boxes in another frame or
format than declared, CSV files written with spaces after the commas, ids of two types, phrases and thresholds
that are not what evaluation needs. Each must be refused in one line or read right, never scored or drawn wrong."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from m2ist.data import from_hf_dataset, load_coco_style, load_csv, load_jsonl
from m2ist.data.collator import RECCollator
from m2ist.data.sample import RECSample
from m2ist.evaluation import accuracy_at_iou, evaluate, paired_iou
from m2ist.inference import draw_boxes
from m2ist.processing import RECProcessor
from tests.test_inference import FixedBoxModel, make_tokenizer
from tests.tiny import QUERY_LEN


@pytest.fixture
def image_folder(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (100, 80), "grey").save(tmp_path / "images" / "a.png")
    return tmp_path


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    return RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)


# ---------------------------------------------------------------------------------------------- accuracy_at_iou
def test_accuracy_at_iou_refuses_the_models_normalised_boxes_against_pixel_ground_truth():
    gt = [[10.0, 10.0, 60.0, 60.0], [20.0, 5.0, 90.0, 70.0]]
    pred = torch.tensor([[0.35, 0.35, 0.5, 0.5], [0.55, 0.4, 0.7, 0.6]])  # outputs.pred_boxes: cx, cy, w, h in [0, 1]
    for call in (lambda: accuracy_at_iou(pred, gt), lambda: paired_iou(pred, gt)):
        with pytest.raises(ValueError, match=r"pred_xyxy lies within \[0, 1\] while gt_xyxy is in pixels"):
            call()  # was {0.5: 0.0}: every IoU about 0, without a word
    # what stays scored: pixel predictions clamped off the image's corner, and both sides normalised (the trainer)
    assert accuracy_at_iou([[0.0, 0.0, 0.0, 0.0]], [[10.0, 10.0, 60.0, 60.0]]) == {0.5: 0.0}
    assert accuracy_at_iou([[0.1, 0.1, 0.6, 0.6]], [[0.1, 0.1, 0.6, 0.6]]) == {0.5: 1.0}
    assert accuracy_at_iou([[10.0, 10.0, 60.0, 60.0]], gt[:1]) == {0.5: 1.0}


def test_accuracy_at_iou_refuses_normalised_ground_truth_against_pixel_predictions():
    """The reverse mix (a batch's normalised labels, converted to xyxy, against post-processed pixel predictions)
    scored 0 without a word; the trainer, whose predictions and labels are both normalised, opts out."""
    labels = [[0.1, 0.1, 0.6, 0.6], [0.2, 0.05, 0.9, 0.7]]
    pred = [[10.0, 10.0, 60.0, 60.0], [20.0, 5.0, 90.0, 70.0]]
    for call in (lambda: accuracy_at_iou(pred, labels), lambda: paired_iou(pred, labels)):
        with pytest.raises(ValueError, match=r"gt_xyxy lies within \[0, 1\] while pred_xyxy is in pixels \(up to 90\)"):
            call()
    # a diverging model's normalised predictions far past 1, against normalised labels: scored (as misses)
    assert accuracy_at_iou([[3.0, 3.0, 9.0, 9.0]], labels[:1], check_frames=False) == {0.5: 0.0}
    with pytest.raises(TypeError, match="check_frames must be True or False"):
        paired_iou(pred, labels, check_frames="no")


def test_iou_thresholds_given_as_text_are_named_as_text():
    with pytest.raises(ValueError, match=r"got the text '0.5'"):  # was "got '0'": read letter by letter
        accuracy_at_iou([[10, 10, 60, 60]], [[10, 10, 60, 60]], "0.5")


# ---------------------------------------------------------------------------------------------- draw_boxes
def test_draw_boxes_refuses_an_xywh_box_instead_of_drawing_another_box():
    image = Image.new("RGB", (100, 80))
    with pytest.raises(ValueError, match=r"boxes\[0\] \[50.0, 20.0, 30.0, 40.0\] has x1 < x0.*box_convert"):
        draw_boxes(image, [[50, 20, 30, 40]])  # was drawn as (30, 20, 50, 40): its corners swapped
    with pytest.raises(ValueError, match=r"gt_boxes\[1\].*has x1 < x0 or y1 < y0"):
        draw_boxes(image, [[10, 10, 40, 40]], gt_boxes=[[10, 10, 40, 40], [60, 20, 20, 30]])
    drawn = draw_boxes(image, [[0, 0, 0, 0], [10, 10, 10, 40], [10, 10, 40, 40]])  # zero area stays drawable
    assert drawn.size == (100, 80)


# ---------------------------------------------------------------------------------------------- normalized=True
def test_normalized_loading_refuses_pixel_numbers(image_folder):
    jsonl = image_folder / "train.jsonl"
    jsonl.write_text(json.dumps({"image": "images/a.png", "text": "the dog", "bbox": [0, 0, 30, 40]}) + "\n")
    csv_file = image_folder / "train.csv"
    csv_file.write_text("image,text,x,y,w,h\nimages/a.png,the dog,0,0,30,40\n")
    coco = image_folder / "refs.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "images/a.png"}],
                                "annotations": [{"id": 7, "image_id": 1, "bbox": [5, 6, 30, 40], "text": "the dog"}]}))
    calls = {
        rf"{jsonl}:1": lambda: load_jsonl(jsonl, "xyxy", normalized=True),
        rf"{csv_file}:2": lambda: load_csv(csv_file, "xywh", normalized=True),
        r"annotations\[0\]": lambda: load_coco_style(coco, normalized=True),
        "row 0": lambda: from_hf_dataset([{"image": str(image_folder / "images" / "a.png"), "text": "the dog",
                                          "bbox": [0, 0, 30, 40]}], box_format="xyxy", normalized=True),
    }
    for where, call in calls.items():
        # was (0, 0, 3000, 3200): clipped by RECDataset to the whole image and trained on as the answer
        with pytest.raises(ValueError, match=rf"{where}: the box .* normalized=True, but 40 is no fraction"):
            call()
    # fractions still load, a box reaching a little past the image's edge included
    jsonl.write_text(json.dumps({"image": "images/a.png", "text": "the dog", "bbox": [0.1, 0.5, 1.02, 1.0]}) + "\n")
    assert load_jsonl(jsonl, "xyxy", normalized=True)[0].box == pytest.approx((10, 40, 102, 80))


# ---------------------------------------------------------------------------------------------- the processor
def test_processor_refuses_normalised_boxes_as_recdataset_does(processor):
    image = Image.new("RGB", (100, 80))
    with pytest.raises(ValueError, match=r"Box 0 \[0.1, 0.1, 0.5, 0.5\] lies within \[0, 1\] in a 100x80 image"):
        processor(image, "the dog", boxes=[0.1, 0.1, 0.5, 0.5])  # was a log line once, and a 1-pixel label
    samples = [RECSample(image=image, expression="the dog", box=(0.1, 0.1, 0.5, 0.5))]  # RECSample items, no RECDataset
    with pytest.raises(ValueError, match="looks normalised"):
        RECCollator(processor, train=False)(samples)
    labels = processor(image, "the dog", boxes=[10, 8, 50, 40])["labels"]
    assert labels.shape == (1, 4)


# ---------------------------------------------------------------------------------------------- CSV and splits
def test_csv_with_spaces_after_commas_keeps_every_row_of_the_split(image_folder):
    csv_file = image_folder / "all.csv"
    csv_file.write_text(
        "image, text, bbox, split\n"
        'images/a.png, the dog, "[1, 2, 30, 40]", testA\n'
        'images/a.png,the cat,"[5, 6, 50, 60]",testA\n'
        'images/a.png, the bird, "[5, 6, 50, 60]", testB\n'
    )
    samples = load_csv(csv_file, "xyxy", split="testA")
    # were refused ("6 fields, but the header has 3"), and " testA" was another split than "testA": dropped
    assert [sample.expression for sample in samples] == ["the dog", "the cat"]
    assert samples[0].box == (1.0, 2.0, 30.0, 40.0)
    jsonl = image_folder / "all.jsonl"
    jsonl.write_text("".join(json.dumps({"image": "images/a.png", "text": text, "bbox": [1, 2, 30, 40],
                                         "split": split}) + "\n"
                             for text, split in (("a", "val"), ("b", "val "), ("c", "test"))))
    assert [sample.expression for sample in load_jsonl(jsonl, "xyxy", split="validation")] == ["a", "b"]


def test_coco_ids_of_two_types_are_named(image_folder):
    coco = image_folder / "refs.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "images/a.png"}],
                                "annotations": [{"id": 7, "image_id": "1", "bbox": [5, 6, 30, 40], "text": "x"}]}))
    with pytest.raises(ValueError, match=r"image_id '1' is not in images; images has the id 1 \(int\), not '1' \(str\)"):
        load_coco_style(coco)


# ---------------------------------------------------------------------------------------------- evaluate
def test_evaluate_names_the_sample_of_an_empty_phrase_and_refuses_a_box_given_as_text(processor):
    image = Image.new("RGB", (100, 80), "grey")
    samples = [RECSample(image=image, expression="the dog", box=(10, 10, 60, 60), image_id=i) for i in range(3)]
    samples.append(RECSample(image=image, expression=" \u200b", box=(10, 10, 60, 60), image_id="empty"))
    with pytest.raises(ValueError, match=r"Split 'val', sample 3 \(image_id='empty'\): the expression"):
        evaluate(FixedBoxModel([[0.35, 0.35, 0.5, 0.5]] * 8), processor, {"val": samples}, batch_size=2,
                 progress=False)  # was "Phrase 1 is empty": a batch position, no split, no sample
    items = [{"image": image, "expression": "the dog", "box": "1234", "image_id": "a"}]
    with pytest.raises(ValueError, match=r"the ground-truth box '1234' is not 4 numbers"):
        evaluate(FixedBoxModel([[0.35, 0.35, 0.5, 0.5]] * 8), processor, {"val": items}, progress=False)
    items = [{"image": image, "expression": "the dog", "box": np.array([10, 10, 60, 60]), "image_id": "a"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = evaluate(FixedBoxModel([[0.35, 0.35, 0.5, 0.5]] * 8), processor, {"val": items},
                           progress=False)["metrics"]["val"]
    assert metrics["count"] == 1



# ---------------------------------------------------------------------------------------------- files without samples
@pytest.mark.parametrize("name, text, loader", [("empty.jsonl", "", load_jsonl), ("blank.jsonl", "\n\n", load_jsonl),
                                                ("header.csv", "image,text,bbox\n", load_csv)])
def test_a_file_without_records_is_refused_where_it_is_read(tmp_path, name, text, loader):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"{name} holds no records \(an empty file, or a CSV header alone\)"):
        loader(path, "xyxy")  # was [] here, and "No valid samples among 0" later, without the cause


def test_records_listing_no_expression_are_named(image_folder):
    path = image_folder / "data.jsonl"
    path.write_text('{"image": "images/a.png", "text": ["the cat"], "bbox": [1, 2, 30, 40]}\n'
                    '{"image": "images/a.png", "text": [], "bbox": [5, 5, 20, 20]}\n')
    with pytest.warns(UserWarning, match=r"1 record\(s\) list no expression .*data.jsonl:2\) and give no sample"):
        samples = load_jsonl(path, "xyxy")
    assert [s.expression for s in samples] == ["the cat"]


def test_splits_given_as_a_list_are_refused_asking_for_names(processor):
    model = FixedBoxModel([[0.5, 0.5, 0.2, 0.2]] * 2, image_size=100)
    sample = RECSample(image=Image.new("RGB", (100, 100)), expression="a cat", box=(10, 10, 50, 50))
    with pytest.raises(TypeError, match=r"a list of 2 datasets, not of samples: pass several splits by name"):
        evaluate(model, processor, [[sample], [sample]])  # was KeyError "item 0: no 'image'"
    assert evaluate(model, processor, [sample], progress=False)["metrics"]["eval"]["count"] == 1


@pytest.mark.parametrize("call", [
    lambda p: load_jsonl(p / "data.jsonl", "xyxy", normalized="False"),
    lambda p: load_csv(p / "data.csv", "xyxy", allow_outside_image_root="no"),
    lambda p: load_coco_style(p / "coco.json", normalized="false"),
    lambda p: from_hf_dataset([], normalized="False"),
])
def test_loader_switches_given_as_text_are_refused(image_folder, call):
    """`normalized="False"` (a YAML or environment string) is true in Python: fractions read as pixels or the reverse,
    image paths let out of their root."""
    with pytest.raises(TypeError, match=r"must be True or False, got str '(False|no|false)' \(a non-empty string is "
                                        r"true in Python\)"):
        call(image_folder)


def test_a_transvg_file_is_never_unpickled_on_a_text_switch(tmp_path):
    """`trusted="false"` would have loaded the pickle without the restricted loader: code from the file could run."""
    from m2ist.data.transvg import load_transvg_split

    with pytest.raises(TypeError, match=r"load_transvg_split: trusted must be True or False, got str 'false'"):
        load_transvg_split(tmp_path / "unc_val.pth", trusted="false")


def test_dataset_and_collator_switches_given_as_text_are_refused(processor):
    from m2ist.data import RECDataset

    samples = [RECSample(image=Image.new("RGB", (50, 50)), expression="a cat", box=(1, 1, 20, 20))]
    for name in ("skip_invalid", "validate_images", "exif_transpose"):
        with pytest.raises(TypeError, match=rf"RECDataset: {name} must be True or False, got str 'False'"):
            RECDataset(samples, None, **{name: "False"})
    with pytest.raises(TypeError, match=r"RECCollator: train must be True or False, got str 'False'"):
        RECCollator(processor, train="False")  # was bool("False"): an evaluation collator that augments
    assert RECCollator(processor, train=np.bool_(False)).train is False  # numpy's booleans are booleans


def test_processor_switches_given_as_text_are_refused(processor):
    image = Image.new("RGB", (40, 40))
    with pytest.raises(ValueError, match=r"train must be true or false, got 'False'"):
        processor([image], ["a cat"], [[1, 1, 20, 20]], train="False")  # was true: an augmented batch
    geometry = torch.tensor([[40.0, 40.0, 2.5, 2.5, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"clamp must be true or false, got 'no'"):
        processor.post_process_boxes(torch.tensor([[0.5, 0.5, 2.0, 2.0]]), geometry, clamp="no")  # was clamped
    unclamped = processor.post_process_boxes(torch.tensor([[0.5, 0.5, 2.0, 2.0]]), geometry, clamp=False)
    assert float(unclamped[0, 2]) > 40


def test_hf_rows_without_a_split_are_refused_when_a_split_is_asked_for(image_folder):
    image = str(image_folder / "images" / "a.png")
    rows = [{"image": image, "text": "the dog", "bbox": [1, 2, 30, 40], "split": "val"},
            {"image": image, "text": "the cat", "bbox": [5, 5, 20, 20], "split": None}]
    with pytest.raises(ValueError, match=r"row 1: its 'split' is empty, but split=\['val'\] selects rows"):
        from_hf_dataset(rows, split="val", box_format="xyxy")  # the cat was left out without a word
    assert [s.expression for s in from_hf_dataset(rows[:1], split="val", box_format="xyxy")] == ["the dog"]
