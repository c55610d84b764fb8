"""Guards on the method itself: each test fails when one part of M²IST is broken on purpose (the adapter scale σ,
the GIoU term, the Acc@0.5 threshold, the head's text-padding mask, TransVG's xywh boxes, the towers' no-grad)."""

from __future__ import annotations

import pytest
import torch

from m2ist import get_side_tuned_model
from m2ist.head import RECHead, rec_loss
from m2ist.layer import IntraModalExpert
from m2ist.trainer import ACCURACY_METRIC, compute_rec_metrics
from tests.conftest import make_batch
from tests.tiny import text_tower, tiny_config, vision_tower


def test_adapter_scale_sigma_multiplies_the_intra_modal_expert():
    """VEA / LEA = σ · W_up(ReLU(W_down(LN(f)))): the output is exactly σ times the unscaled branch."""
    torch.manual_seed(0)
    scaled, unscaled = IntraModalExpert(8, 6, 4, scale=0.1), IntraModalExpert(8, 6, 4, scale=1.0)
    unscaled.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        for expert in (scaled, unscaled):
            expert.up.weight.copy_(torch.arange(24.0).reshape(6, 4) / 10)
    f = torch.randn(2, 5, 8)
    torch.testing.assert_close(scaled(f), 0.1 * unscaled(f))
    assert unscaled(f).abs().sum() > 0
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(adapter_scale=0.3))
    assert model.side.blocks[0].vea.scale == 0.3 and model.side.blocks[0].lea.scale == 0.3


def test_intra_modal_expert_recomputes_its_norm_instead_of_keeping_it():
    """Training keeps only the tap for W_down(LN(f)), never LN(f), and the gradients are those of the plain formula
    to the bit."""
    from m2ist.evidence.profiling import saved_tensor_accounting

    torch.manual_seed(0)
    expert = IntraModalExpert(64, 32, 8, scale=0.1)
    with torch.no_grad():
        expert.up.weight.normal_()
    f = torch.randn(4, 50, 64)

    def plain() -> torch.Tensor:  # the formula, with every intermediate kept
        return expert.scale * expert.up(torch.relu(expert.down(expert.norm(f))))

    grads = []
    for run in (expert, plain):
        expert.zero_grad()
        with saved_tensor_accounting() as saved:
            out = run(f) if run is expert else run()
        out.square().sum().backward()
        grads.append(({n: p.grad.clone() for n, p in expert.named_parameters()}, saved.bytes))
    (recomputed, recomputed_bytes), (kept, kept_bytes) = grads
    assert all(torch.equal(recomputed[n], kept[n]) for n in kept)
    assert kept_bytes - recomputed_bytes >= f.numel() * 4  # LN(f), as wide as the tap, is not kept
    with torch.no_grad():
        assert torch.equal(expert(f), plain())


def test_loss_is_l1_plus_one_minus_giou():
    """Disjoint boxes: L1 summed over coordinates = 1.0, 1 - GIoU = 1 + (0.49 - 0.08) / 0.49; loss = sum (1:1)."""
    pred = torch.tensor([[0.25, 0.25, 0.2, 0.2]], dtype=torch.float64)
    target = torch.tensor([[0.75, 0.75, 0.2, 0.2]], dtype=torch.float64)
    losses = rec_loss(pred, target, tiny_config())
    giou_term = 1 + (0.49 - 0.08) / 0.49
    assert float(losses["loss_box"]) == pytest.approx(1.0)
    assert float(losses["loss_giou"]) == pytest.approx(giou_term)
    assert float(losses["loss"]) == pytest.approx(1.0 + giou_term)
    assert float(rec_loss(pred, target, tiny_config(giou_loss_weight=2.0))["loss"]) == pytest.approx(1 + 2 * giou_term)


def test_accuracy_counts_iou_of_exactly_one_half():
    """Acc@0.5 is IoU >= 0.5: a prediction covering exactly half of the target (IoU 0.5, exact in binary) counts."""
    target = torch.tensor([[0.25, 0.25, 0.5, 0.5]], dtype=torch.float64)  # xyxy (0, 0, 0.5, 0.5)
    half = torch.tensor([[0.125, 0.25, 0.25, 0.5]], dtype=torch.float64)  # xyxy (0, 0, 0.25, 0.5): IoU 0.5
    metrics = compute_rec_metrics(half.numpy(), target.numpy())
    assert metrics["miou"] == 0.5
    assert metrics[ACCURACY_METRIC] == 1.0


@pytest.mark.parametrize("head", [dict(), dict(reg_init="text"), dict(box_readout="vote"),
                                  dict(box_readout="vote", vote_hops=2)], ids=["transvg", "text-query", "vote",
                                                                                 "vote-2-hops"])
def test_head_ignores_text_padding(head):
    """Tokens under attention_mask == 0 never change the box: the head masks text padding."""
    torch.manual_seed(0)
    config = tiny_config(**head)
    rec = RECHead(config, vision_width=16, text_width=12, num_vision_tokens=17, vision_grid=(4, 4),
                  num_prefix_tokens=1).eval()
    vision, text = torch.randn(2, 17, 16), torch.randn(2, 8, 12)
    vision_mask = torch.ones(2, 17, dtype=torch.bool)
    text_mask = torch.ones(2, 8, dtype=torch.long)
    text_mask[:, 5:] = 0
    noisy = text.clone()
    noisy[:, 5:] = torch.randn(2, 3, 12) * 10
    with torch.no_grad():
        torch.testing.assert_close(rec(vision, vision_mask, noisy, text_mask).pred_boxes,
                                   rec(vision, vision_mask, text, text_mask).pred_boxes)
        # ...while a change under real tokens does move it (the test can see the text at all)
        moved = text.clone()
        moved[:, :5] = torch.randn(2, 5, 12) * 10
        assert not torch.allclose(rec(vision, vision_mask, moved, text_mask).pred_boxes,
                                  rec(vision, vision_mask, text, text_mask).pred_boxes)


@pytest.mark.parametrize("dataset", ["unc", "unc+", "gref", "gref_umd"])
def test_transvg_coco_splits_store_xywh_boxes(tmp_path, dataset):
    """TransVG's RefCOCO-family rows hold (x, y, w, h): a box that is not square tells xywh from xyxy."""
    from m2ist.data.transvg import load_transvg_split

    torch.save([("img.jpg", "mask.pth", [10, 20, 30, 40], "the thing", [])], tmp_path / f"{dataset}_val.pth")
    (sample,) = load_transvg_split(tmp_path / f"{dataset}_val.pth")
    assert tuple(sample.box) == (10, 20, 40, 60)


def test_frozen_towers_run_without_autograd(batch):
    """The towers run under no_grad (the paper's memory saving), also in training mode with grad enabled."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.train()
    seen = []
    handles = [tower.register_forward_pre_hook(lambda *_: seen.append(torch.is_grad_enabled()))
               for tower in (model.vision_model, model.text_model)]
    try:
        with torch.enable_grad():
            model(**make_batch()).loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    assert seen == [False, False]
