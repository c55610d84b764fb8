"""Silent wrong numbers (fault hunt 4): the loss's precision and shapes, the scoring helpers' ground truth, and
guards that fail when a mask, a position offset, a loss weight or a clamp is dropped on purpose."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from m2ist import get_side_tuned_model
from m2ist.data.sample import RECSample
from m2ist.evaluation import accuracy_at_iou, evaluate, paired_iou
from m2ist.head import RECHead, rec_loss
from m2ist.ops.boxes import box_convert
from m2ist.processing import RECProcessor
from tests.test_inference import FixedBoxModel, make_tokenizer
from tests.tiny import QUERY_LEN, text_tower, tiny_config, vision_tower

# small boxes (a few percent of the canvas), where bfloat16's rounding is a large share of the box
TARGETS = torch.tensor([[0.6543, 0.3217, 0.0431, 0.0579], [0.3333, 0.7777, 0.1234, 0.2468]])


# ---------------------------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_computed_in_float32_for_low_precision_predictions(dtype):
    """A bfloat16 / float16 head (or mixed precision) must not round the labels to its precision: the label
    rounded to bfloat16 is not the label, and the loss says so as float32 would."""
    pred = TARGETS.to(dtype).requires_grad_()
    losses = rec_loss(pred, TARGETS, tiny_config())
    reference = rec_loss(pred.detach().float(), TARGETS, tiny_config())
    assert losses["loss"].dtype == torch.float32
    for key in ("loss", "loss_box", "loss_giou"):
        torch.testing.assert_close(losses[key], reference[key])
    assert float(losses["loss_box"]) > 0
    losses["loss"].backward()
    assert pred.grad.abs().sum() > 0  # the gradient points at the true label, not at its rounded copy


def test_point_loss_reads_float16_masked_patches_as_masked():
    """float16 patch logits mark padding with float16's minimum; the float32 loss still treats them as masked."""
    config = tiny_config(box_readout="vote")
    logits = torch.zeros(1, 2, 2)
    logits[0, 0, 1] = torch.finfo(torch.float32).min
    half = logits.clone().half()
    half[0, 0, 1] = torch.finfo(torch.float16).min
    box, label = torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    torch.testing.assert_close(rec_loss(box.half(), label, config, half)["loss_point"],
                               rec_loss(box, label, config, logits)["loss_point"])


def test_loss_refuses_targets_of_another_shape():
    """One target per prediction: a (1, 4) or (4,) box is never broadcast over the batch."""
    pred = torch.full((3, 4), 0.5)
    for target in (TARGETS[:1], TARGETS[0], TARGETS):
        with pytest.raises(ValueError, match="one \\(cx, cy, w, h\\) target box per predicted box"):
            rec_loss(pred, target, tiny_config())


def test_box_loss_weight_scales_the_coordinate_term():
    pred, target = torch.tensor([[0.25, 0.25, 0.2, 0.2]]), torch.tensor([[0.75, 0.75, 0.2, 0.2]])
    plain = rec_loss(pred, target, tiny_config())
    weighted = rec_loss(pred, target, tiny_config(box_loss_weight=3.0))
    torch.testing.assert_close(weighted["loss"], 3 * plain["loss_box"] + plain["loss_giou"])


def test_point_loss_spreads_the_target_over_the_valid_cells_only():
    """A box over two cells, one of them padding: the whole target goes to the valid cell."""
    config = tiny_config(box_readout="vote")
    logits = torch.zeros(1, 2, 2)
    logits[0, 0, 1] = torch.finfo(torch.float32).min  # top-right cell is padding
    label = torch.tensor([[0.5, 0.25, 1.0, 0.5]])  # the top row: cells (0, 0) and (0, 1)
    point = rec_loss(torch.full((1, 4), 0.5), label, config, logits)["loss_point"]
    torch.testing.assert_close(point, torch.tensor(3.0).log())  # -log softmax over 3 valid cells, full weight


# ---------------------------------------------------------------------------------------------- the head's masks
def _head(**overrides) -> RECHead:
    torch.manual_seed(0)
    return RECHead(tiny_config(**overrides), vision_width=16, text_width=12, num_vision_tokens=17,
                   vision_grid=(4, 4), num_prefix_tokens=1).eval()


@pytest.mark.parametrize("head", [dict(), dict(reg_init="text"), dict(box_readout="vote"),
                                  dict(box_readout="vote", vote_hops=2, vote_keys="both")],
                         ids=["transvg", "text-query", "vote", "vote-2-hops"])
def test_head_ignores_masked_visual_tokens(head):
    """Visual tokens under vision_mask == 0 (image padding) never change the box, in the fusion layers as in the
    readout."""
    rec = _head(**head)
    vision, text = torch.randn(2, 17, 16), torch.randn(2, 8, 12)
    vision_mask = torch.ones(2, 17, dtype=torch.bool)
    vision_mask[:, 1:][:, torch.arange(16) % 4 == 3] = False  # the right column of the 4 x 4 grid is padding
    text_mask = torch.ones(2, 8, dtype=torch.long)
    noisy = vision.clone()
    noisy[~vision_mask] = torch.randn(int((~vision_mask).sum()), 16) * 10
    with torch.no_grad():
        torch.testing.assert_close(rec(noisy, vision_mask, text, text_mask).pred_boxes,
                                   rec(vision, vision_mask, text, text_mask).pred_boxes)
        moved = vision.clone()
        moved[vision_mask] = torch.randn(int(vision_mask.sum()), 16) * 10
        assert not torch.allclose(rec(moved, vision_mask, text, text_mask).pred_boxes,
                                  rec(vision, vision_mask, text, text_mask).pred_boxes)


@pytest.mark.parametrize("head", [dict(), dict(box_readout="vote", vote_hops=2)], ids=["transvg", "vote-2-hops"])
def test_a_sample_gets_one_box_alone_in_a_batch_or_padded_to_any_length(head):
    """In eval mode a sample's box depends neither on its batch companions (other images, image padding, longer
    phrases) nor on how far its phrase is padded (to the longest in the batch or to max_query_len)."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(**head)).eval()
    with torch.no_grad():  # the side network's up-projections start at zero: give them a say
        for name, p in model.side.named_parameters():
            if "up" in name:
                p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    pixels, ids = torch.randn(3, 3, 32, 32, generator=g), torch.randint(3, 100, (3, QUERY_LEN), generator=g)
    pixel_mask = torch.ones(3, 32, 32, dtype=torch.long)
    pixel_mask[0, :, 20:] = 0
    pixel_mask[1, 24:] = 0
    text_mask = torch.ones(3, QUERY_LEN, dtype=torch.long)
    text_mask[0, 5:] = 0  # the sample: 5 tokens; a companion has all 8
    with torch.no_grad():
        alone = model(pixel_values=pixels[:1], pixel_mask=pixel_mask[:1], input_ids=ids[:1],
                      attention_mask=text_mask[:1]).pred_boxes
        batched = model(pixel_values=pixels, pixel_mask=pixel_mask, input_ids=ids, attention_mask=text_mask).pred_boxes
        short = model(pixel_values=pixels[:1], pixel_mask=pixel_mask[:1], input_ids=ids[:1, :5],
                      attention_mask=text_mask[:1, :5]).pred_boxes
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(short, alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- scoring
def test_scoring_helpers_refuse_ground_truth_they_cannot_score():
    """accuracy_at_iou / paired_iou: a COCO (x, y, w, h) ground truth read as xyxy is inverted and a zero-area one
    matches nothing; both would count as misses without a word, so they are refused naming the row."""
    pred = [[100, 50, 140, 90], [10, 10, 30, 30]]
    gt_xywh = [[100, 50, 40, 40], [10, 10, 20, 20]]
    with pytest.raises(ValueError, match=r"gt_xyxy\[0\] \[100.0, 50.0, 40.0, 40.0\] has x1 < x0.*'xywh', 'xyxy'"):
        accuracy_at_iou(pred, gt_xywh)
    assert accuracy_at_iou(pred, box_convert(gt_xywh, "xywh", "xyxy")) == {0.5: 1.0}  # the advice works on a list
    with pytest.raises(ValueError, match=r"shape \(..., 4\).*got shape \(1, 3\)"):
        box_convert([[1, 2, 3]], "xywh", "xyxy")
    with pytest.raises(ValueError, match=r"gt_xyxy\[1\] .* zero area"):
        paired_iou(pred, [[100, 50, 140, 90], [10, 10, 10, 30]])
    # predictions may be empty (clamped into the padding) or inverted: IoU 0, no error
    assert paired_iou([[5, 5, 5, 5], [30, 30, 10, 10]], [[0, 0, 10, 10], [10, 10, 30, 30]]).tolist() == [0.0, 0.0]
    assert accuracy_at_iou(pred, [[100, 50, 140, 90], [10, 10, 30, 30]]) == {0.5: 1.0}


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    """A 100x100 canvas: a 200x100 image is scaled by 0.5 and pasted 25 pixels down."""
    return RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)


def test_canvas_clamp_clips_a_prediction_leaving_the_canvas(processor):
    """clamp='canvas' (TransVG's code) clips the normalised box to [0, 1] before mapping it back: a box reaching
    past the canvas's right edge scores as the part on the canvas."""
    image = Image.new("RGB", (200, 100))
    samples = [RECSample(image, "the dog", (50, 0, 200, 100), image_id="a")]  # canvas (25, 25, 100, 75)
    leaving = [[0.75, 0.5, 1.0, 0.5]]  # canvas (25, 25, 125, 75): 25 pixels past the right edge
    canvas = evaluate(FixedBoxModel(leaving), processor, samples, clamp="canvas", progress=False)
    assert canvas["metrics"]["eval"]["miou"] == pytest.approx(1.0)


def test_ground_truth_checks_use_the_image_width_and_height(processor):
    """A box right of x = 100 lies inside a 200x100 image (width and height are not swapped)."""
    image = Image.new("RGB", (200, 100))
    samples = [RECSample(image, "the cat", (150, 10, 190, 50), image_id="b")]  # canvas (75, 30, 95, 50)
    results = evaluate(FixedBoxModel([[0.85, 0.4, 0.2, 0.2]]), processor, samples, progress=False)
    assert results["metrics"]["eval"]["miou"] == pytest.approx(1.0)



def test_thresholds_may_be_numpy_or_torch_numbers():
    """np.float32(0.5), a float32 array or a tensor of thresholds are numbers, never 'not iterable' or refused."""
    boxes = [[0, 0, 10, 10], [0, 0, 10, 20]]  # IoU 1 and 0.5
    gt = [[0, 0, 10, 10]] * 2
    assert accuracy_at_iou(boxes, gt, np.float32(0.5)) == {0.5: 1.0}
    assert accuracy_at_iou(boxes, gt, torch.tensor([0.5, 0.75])) == {0.5: 1.0, 0.75: 0.5}
    assert list(accuracy_at_iou(boxes, gt, np.array([0.5, 0.75], dtype=np.float32)).values()) == [1.0, 0.5]
    with pytest.raises(ValueError, match=r"a number or a sequence of numbers in \(0, 1\], got None"):
        accuracy_at_iou(boxes, gt, None)


def test_an_inverted_prediction_scores_the_same_in_the_trainer_and_in_evaluate() -> None:
    """A vote readout may put a box's far edge before its near one (negative width): the trainer's metrics score it
    IoU 0; ``post_process_boxes`` (``evaluate``, ``predict``) used to mirror it into the box it spans (IoU 1 here)."""
    from m2ist.evaluation import paired_iou
    from m2ist.processing import post_process_boxes
    from m2ist.trainer import compute_rec_metrics

    inverted = torch.tensor([[0.5, 0.5, -0.4, 0.4]])  # x0 = 0.7 > x1 = 0.3
    target = torch.tensor([[0.5, 0.5, 0.4, 0.4]])
    geometry = torch.tensor([[100.0, 100.0, 1.0, 1.0, 0.0, 0.0]])  # a 100 x 100 image filling a 100 canvas
    boxes = post_process_boxes(inverted, geometry, 100)
    assert boxes.tolist() == [[50.0, 30.0, 50.0, 70.0]]  # empty, at its centre
    assert float(paired_iou(boxes, [[30.0, 30.0, 70.0, 70.0]])[0]) == 0.0
    assert compute_rec_metrics(inverted.numpy(), target.numpy())["acc@0.5"] == 0.0
    assert post_process_boxes(target, geometry, 100).tolist() == [[30.0, 30.0, 70.0, 70.0]]
