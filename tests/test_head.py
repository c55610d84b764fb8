"""The REC head's options: pre-norm fusion, a text-conditioned [REG] and the box-vote readout."""

from __future__ import annotations

import pytest
import torch

from m2ist import M2ISTConfig, SideTunedModel, get_side_tuned_model
from m2ist.head import BoxVoteReadout, RECHead
from tests.tiny import text_tower, tiny_config, vision_tower

FAST_HEAD = dict(fusion_norm="pre", reg_init="text", box_readout="vote")


def _forward(model, batch):
    return model(**{k: v for k, v in batch.items()})


@pytest.mark.parametrize("vision_family", ["vit", "detr", "dinov2", "swin"])
@pytest.mark.parametrize("fusion_layers", [0, 1])
def test_fast_head_trains_on_towers_with_and_without_prefix_tokens(vision_family, fusion_layers, batch):
    model = get_side_tuned_model(vision_tower(vision_family), text_tower("bert"),
                                 tiny_config(fusion_layers=fusion_layers, **FAST_HEAD))
    model.train()
    out = _forward(model, batch)
    assert out.pred_boxes.shape == (2, 4) and torch.isfinite(out.pred_boxes).all()
    out.loss.backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert model.head.box_mlp is None  # the vote readout replaces the [REG] MLP: no unused parameters


def test_votes_are_weighed_by_attention_over_valid_patches_only():
    readout = BoxVoteReadout(dim=4, grid=(2, 2), num_prefix_tokens=1)
    with torch.no_grad():
        for module in (readout.query, readout.key, readout.vote[0], readout.vote[2]):
            module.weight.zero_()
            module.bias.zero_()
        readout.vote[2].bias.copy_(torch.tensor([-0.5, -0.5, 0.5, 0.5]))  # every patch votes for its own cell
    visual = torch.randn(1, 5, 4)  # a prefix token, then a 2 x 2 grid
    position = torch.zeros(1, 5, 4)
    only_bottom_right = torch.tensor([[True, False, False, False, True]])
    box = readout(torch.zeros(1, 4), visual, position, only_bottom_right)
    torch.testing.assert_close(box, torch.tensor([[0.75, 0.75, 0.5, 0.5]]))
    everything = torch.ones(1, 5, dtype=torch.bool)
    box = readout(torch.zeros(1, 4), visual, position, everything)  # uniform attention: the mean of the cells
    torch.testing.assert_close(box, torch.tensor([[0.5, 0.5, 0.5, 0.5]]))


def test_text_conditioned_reg_sees_the_expression_without_fusion_layers(batch):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(fusion_layers=0, **FAST_HEAD))
    model.eval()
    first = _forward(model, batch).pred_boxes
    other = dict(batch, input_ids=torch.roll(batch["input_ids"], 1, dims=1))
    assert not torch.allclose(first, _forward(model, other).pred_boxes)


def test_head_options_are_validated():
    with pytest.raises(ValueError, match="reg_init='text'"):
        M2ISTConfig(fusion_layers=0)
    with pytest.raises(ValueError, match="box_readout"):
        M2ISTConfig(box_readout="mlp")
    with pytest.raises(ValueError, match="fusion_norm"):
        M2ISTConfig(fusion_norm="sandwich")
    with pytest.raises(ValueError, match="patch grid"):
        RECHead(tiny_config(box_readout="vote"), 32, 32, num_vision_tokens=17, vision_grid=None)


def test_fast_head_round_trips_through_save_and_load(tmp_path, batch):
    vision, text = vision_tower("vit"), text_tower("bert")
    model = get_side_tuned_model(vision, text, tiny_config(**FAST_HEAD)).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = SideTunedModel.from_pretrained(tmp_path, vision_model=vision, text_model=text).eval()
    assert (loaded.config.fusion_norm, loaded.config.reg_init, loaded.config.box_readout) == ("pre", "text", "vote")
    torch.testing.assert_close(_forward(loaded, batch).pred_boxes, _forward(model, batch).pred_boxes)
