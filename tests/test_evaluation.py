"""TransVG protocol: IoU by hand, ties at 0.5, clamping, per-split accounting and the results file."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from m2ist import __version__
from m2ist.data.dataset import RECDataset
from m2ist.data.sample import RECSample
from m2ist.evaluation import accuracy_at_iou, evaluate, metric_name, paired_iou
from m2ist.inference import predict_boxes
from m2ist.processing import RECProcessor
from tests.test_inference import FixedBoxModel, make_tokenizer, random_image
from tests.tiny import IMAGE_SIZE, QUERY_LEN


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    """A 100x100 canvas: a 200x100 image is scaled by 0.5 and pasted 25 pixels down."""
    return RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)


# ---------------------------------------------------------------------------------------------- IoU by hand
@pytest.mark.parametrize(
    ("pred", "gt", "iou"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 2, 1], [0, 0, 1, 1], 0.5),  # inter 1, union 2: exactly 0.5
        ([0, 0, 10, 10], [0, 0, 10, 20], 0.5),  # inter 100, union 200
        ([2, 2, 8, 8], [0, 0, 10, 10], 0.36),  # contained: 36 / 100
        ([0, 0, 10, 6], [0, 0, 10, 10], 0.6),  # 60 / 100
        ([5, 0, 15, 10], [0, 0, 10, 10], 1 / 3),  # half overlap: 50 / 150
        ([10, 0, 20, 10], [0, 0, 10, 10], 0.0),  # touching edges
        ([20, 20, 30, 30], [0, 0, 10, 10], 0.0),  # disjoint
        ([3, 3, 3, 3], [0, 0, 10, 10], 0.0),  # degenerate prediction: no NaN
    ],
)
def test_paired_iou_by_hand(pred, gt, iou):
    assert paired_iou([pred], [gt]).item() == pytest.approx(iou, abs=1e-12)


def test_a_tie_at_the_threshold_counts_as_correct():
    pred = [[0, 0, 2, 1], [0, 0, 2.01, 1]]  # IoU 0.5 and 1 / 2.01 < 0.5
    gt = [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert accuracy_at_iou(pred, gt) == {0.5: 0.5}


def test_accuracy_at_several_thresholds():
    pred = [[0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 6], [20, 20, 30, 30]]  # IoU 1, 0.5, 0.6, 0
    gt = [[0, 0, 10, 10]] * 4
    assert accuracy_at_iou(pred, gt, thresholds=(0.5, 0.75)) == {0.5: 0.75, 0.75: 0.25}
    assert accuracy_at_iou(torch.tensor(pred), torch.tensor(gt), thresholds=0.6) == {0.6: 0.5}
    assert metric_name(0.5) == "acc@0.5" and metric_name(0.75) == "acc@0.75"


def test_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="one each"):
        accuracy_at_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 2, 2]])
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        accuracy_at_iou([[0, 0, 1, 1]], [[0, 0, 1, 1]], thresholds=(0.0,))
    with pytest.raises(ValueError, match=r"both reported as 'acc@0.5'"):  # one result would overwrite the other
        accuracy_at_iou([[0, 0, 1, 1]], [[0, 0, 1, 1]], thresholds=(0.5, 0.500000001))
    with pytest.raises(ValueError, match="shape"):
        accuracy_at_iou([[0, 0, 1]], [[0, 0, 1]])
    with pytest.raises(ValueError, match="zero expressions"):
        accuracy_at_iou(torch.zeros(0, 4), torch.zeros(0, 4))


# ---------------------------------------------------------------------------------------------- evaluate, fixed boxes
IMAGE = Image.new("RGB", (200, 100))
# Normalised canvas predictions and what they become in the 200x100 image (canvas = 0.5 * pixel + (0, 25)):
FIXED = [
    [0.25, 0.25, 0.5, 0.5],  # canvas (0, 0, 50, 50) -> (0, -50, 100, 50): clamped (0, 0, 100, 50)
    [0.25, 0.3, 0.5, 0.6],  # canvas (0, 0, 50, 60) -> (0, -50, 100, 70): clamped (0, 0, 100, 70)
    [0.5, 0.1, 1.0, 0.2],  # canvas (0, 0, 100, 20) -> entirely in the top padding: clamped to a zero-height box
]
SAMPLES = [
    RECSample(IMAGE, "the dog", (0, 0, 100, 50), image_id="a"),
    RECSample(IMAGE, "the red square", (-10, 0, 100, 50), image_id="b"),  # GT reaching outside: clipped
    RECSample(IMAGE, "a blue circle", (0, 0, 100, 50), image_id="c"),
]


def test_evaluate_clamps_predictions_to_the_image(processor):
    results = evaluate(FixedBoxModel(FIXED), processor, {"val": SAMPLES}, batch_size=2, iou_thresholds=(0.5, 0.75),
                       progress=False)
    metrics = results["metrics"]["val"]
    # IoU: 1, 5000 / 7000, 0
    assert metrics["count"] == 3
    assert metrics["acc@0.5"] == pytest.approx(2 / 3) and metrics["correct@0.5"] == 2
    assert metrics["acc@0.75"] == pytest.approx(1 / 3) and metrics["correct@0.75"] == 1
    assert metrics["miou"] == pytest.approx((1 + 5 / 7) / 3, rel=1e-5)


def test_evaluate_canvas_clamp_reproduces_transvg_code(processor):
    results = evaluate(FixedBoxModel(FIXED), processor, SAMPLES, clamp="canvas", progress=False)
    metrics = results["metrics"]["eval"]
    # unclamped in the image: IoU 5000 / 10000 (a tie: correct), 5000 / 12000, 0
    assert metrics["acc@0.5"] == pytest.approx(1 / 3)
    assert metrics["miou"] == pytest.approx((0.5 + 5 / 12) / 3, rel=1e-5)
    assert results["metadata"]["protocol"]["clamp"] == "canvas"


def test_every_expression_counts_and_results_file_is_written(processor, tmp_path):
    degenerate = RECSample(IMAGE, "the dog", (20, 20, 20, 40), image_id="d")  # zero-width GT: refused, named
    with pytest.raises(ValueError, match=r"Split 'test', sample 2 \(image_id='d'\).*zero area"):
        evaluate(FixedBoxModel([*FIXED, [0.5, 0.5, 0.2, 0.2]]), processor, {"test": [*SAMPLES[1:], degenerate]},
                 progress=False)
    model = FixedBoxModel([*FIXED, [0.5, 0.5, 0.2, 0.2]]).train()
    output = tmp_path / "nested" / "results.json"
    results = evaluate(model, processor, {"val": SAMPLES[:1], "test": SAMPLES[1:]}, batch_size=2,
                       output_file=output, save_predictions=True, progress=False, metadata={"adapter": "somewhere"})
    assert model.training and all(call == (False, False) for call in model.calls)
    assert results["metrics"]["val"] == {"acc@0.5": 1.0, "correct@0.5": 1, "miou": pytest.approx(1.0), "count": 1}
    assert results["metrics"]["test"]["count"] == 2 and results["metrics"]["test"]["correct@0.5"] == 1

    saved = json.loads(output.read_text())
    assert saved["metrics"]["test"]["acc@0.5"] == pytest.approx(1 / 2)
    metadata = saved["metadata"]
    assert metadata["m2ist_version"] == __version__ and metadata["adapter"] == "somewhere"
    assert "IoU" in metadata["protocol"]["criterion"] and "GIoU" in metadata["protocol"]["criterion"]
    assert metadata["date"] and metadata["model"]["class"] == "FixedBoxModel"
    assert metadata["processor"]["canvas_size"] == 100
    records = saved["predictions"]["test"]
    assert [r["image_id"] for r in records] == ["b", "c"]
    assert records[0]["gt_box"] == [0.0, 0.0, 100.0, 50.0]  # clipped ground truth
    assert records[0]["pred_box"] == pytest.approx([0.0, 0.0, 100.0, 70.0], abs=1e-3)
    assert records[0]["iou"] == pytest.approx(5 / 7, abs=1e-5)


def test_evaluate_rejects_what_it_cannot_score(processor):
    model = FixedBoxModel(FIXED)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, processor, {"val": []}, progress=False)
    with pytest.raises(ValueError, match="clamp"):
        evaluate(model, processor, SAMPLES, clamp="pixels", progress=False)
    with pytest.raises(ValueError, match="processor="):
        evaluate(model, None, SAMPLES, progress=False)


# ---------------------------------------------------------------------------------------------- tiny model
def test_tiny_model_end_to_end_matches_predict_boxes(tmp_path):
    from m2ist import get_side_tuned_model
    from tests.tiny import text_tower, tiny_config, vision_tower

    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    processor = RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)
    images = [random_image(seed=s, width=40 + 8 * s, height=30 + 4 * s) for s in range(5)]
    texts = ["the red square", "a blue circle", "the dog", "left", "a"]
    boxes = [(2, 3, 20, 25), (5, 5, 40, 30), (0, 0, 30, 20), (10, 1, 50, 33), (1, 1, 60, 45)]
    samples = [RECSample(im, t, b, image_id=i) for i, (im, t, b) in enumerate(zip(images, texts, boxes))]

    results = evaluate(model, processor, {"val": samples}, batch_size=2, iou_thresholds=(0.1, 0.5), progress=False,
                       output_file=tmp_path / "r.json")
    predicted = predict_boxes(model, images, texts, processor=processor)
    expected = accuracy_at_iou(predicted, boxes, thresholds=(0.1, 0.5))
    metrics = results["metrics"]["val"]
    assert metrics["count"] == 5
    assert metrics["acc@0.1"] == pytest.approx(expected[0.1]) and metrics["acc@0.5"] == pytest.approx(expected[0.5])
    assert metrics["miou"] == pytest.approx(float(paired_iou(predicted, boxes).mean()), abs=1e-5)
    assert results["metadata"]["model"]["parameters"]["side"] > 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = RECDataset(samples)
    from_dataset = evaluate(model, processor, {"val": dataset}, batch_size=3, iou_thresholds=(0.1, 0.5), progress=False)
    assert from_dataset["metrics"]["val"] == pytest.approx(metrics)
