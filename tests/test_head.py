"""The REC head's options: pre-norm fusion, a text-conditioned [REG] and the box-vote readout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from m2ist import M2ISTConfig, SideTunedModel, get_side_tuned_model
from m2ist.head import BoxVoteReadout, RECHead, patch_targets, rec_loss
from m2ist.ops import sincos_grid_table
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


def _own_cell_votes(readout: BoxVoteReadout) -> BoxVoteReadout:
    """Zero every weight so attention is uniform over valid patches and every patch votes for its own cell."""
    with torch.no_grad():
        for p in readout.parameters():
            p.zero_()
        readout.vote[2].bias.copy_(torch.tensor([-0.5, -0.5, 0.5, 0.5]))
    return readout


def test_votes_are_weighed_by_attention_over_valid_patches_only():
    readout = _own_cell_votes(BoxVoteReadout(dim=4, grid=(2, 2), num_prefix_tokens=1, window=None))
    visual = torch.randn(1, 5, 4)  # a prefix token, then a 2 x 2 grid
    position = torch.zeros(1, 5, 4)
    only_bottom_right = torch.tensor([[True, False, False, False, True]])
    box, logits = readout(torch.zeros(1, 4), visual, position, only_bottom_right)
    torch.testing.assert_close(box, torch.tensor([[0.75, 0.75, 0.5, 0.5]]))
    assert logits.shape == (1, 2, 2) and logits[0, 1, 1] > logits[0, 0, 0]  # masked patches at the minimum
    everything = torch.ones(1, 5, dtype=torch.bool)
    box, _ = readout(torch.zeros(1, 4), visual, position, everything)  # uniform attention: the mean of the cells
    torch.testing.assert_close(box, torch.tensor([[0.5, 0.5, 0.5, 0.5]]))


def test_windowed_votes_ignore_a_second_object_far_from_the_peak():
    readout = _own_cell_votes(BoxVoteReadout(dim=1, grid=(1, 4), num_prefix_tokens=0, window=1))
    with torch.no_grad():  # attention logits = the visual token's value: cell 0 strongest, cell 3 nearly as strong
        readout.query.bias.fill_(1.0)
        readout.key.weight.fill_(1.0)
    visual = torch.tensor([[[3.0], [1.0], [-20.0], [2.9]]])
    box, logits = readout(torch.zeros(1, 1), visual, torch.zeros(1, 4, 1), torch.ones(1, 4, dtype=torch.bool))
    weights = logits.flatten().softmax(-1)
    expected_x = (weights[0] * 0.125 + weights[1] * 0.375) / (weights[0] + weights[1])  # cells 0 and 1 only
    torch.testing.assert_close(box[0, 0], expected_x)
    soft = BoxVoteReadout(dim=1, grid=(1, 4), num_prefix_tokens=0, window=None)
    soft.load_state_dict(readout.state_dict())
    soft_box, _ = soft(torch.zeros(1, 1), visual, torch.zeros(1, 4, 1), torch.ones(1, 4, dtype=torch.bool))
    assert 0.3 < soft_box[0, 0] < 0.7  # every patch voting: a box between the two objects, on neither


def test_point_loss_targets_the_cells_inside_the_box_and_teaches_the_attention():
    targets = patch_targets(torch.tensor([[0.3, 0.5, 0.5, 1.0], [0.9, 0.1, 0.01, 0.01]]), (2, 4))
    torch.testing.assert_close(targets[0], torch.tensor([[0.25, 0.25, 0, 0], [0.25, 0.25, 0, 0]]))
    assert targets[1, 0, 3] == 1  # a box smaller than a cell: the cell holding its centre
    config = tiny_config(box_readout="vote")
    boxes, labels = torch.full((2, 4), 0.5), torch.tensor([[0.3, 0.5, 0.5, 1.0], [0.9, 0.1, 0.01, 0.01]])
    towards_target = rec_loss(boxes, labels, config, targets.log())["loss_point"]
    uniform = rec_loss(boxes, labels, config, torch.zeros(2, 2, 4))["loss_point"]
    assert towards_target < uniform
    masked = torch.zeros(2, 2, 4)
    masked[:, :, 3] = torch.finfo(torch.float32).min  # padded patches, one of them under the second box
    point = rec_loss(boxes, labels, config, masked)["loss_point"]
    torch.testing.assert_close(point, torch.tensor(6.0).log() / 2)  # only the first box counts; 6 valid cells
    with_weight = rec_loss(boxes, labels, dataclasses.replace(config, point_loss_weight=2.0), torch.zeros(2, 2, 4))
    plain = rec_loss(boxes, labels, config)
    torch.testing.assert_close(with_weight["loss"], plain["loss"] + 2 * uniform)


def test_a_second_hop_rereads_the_expression(batch):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"),
                                 tiny_config(fusion_layers=0, vote_hops=2, **FAST_HEAD)).train()
    out = _forward(model, batch)
    out.loss.backward()
    hop = model.head.box_votes.hops[0]
    assert hop.text_query.weight.grad is not None and hop.text_query.weight.grad.abs().sum() > 0
    assert out.patch_logits.shape[0] == 2 and out.loss_point is not None


@pytest.mark.parametrize("keys", ["fused", "projected", "both"])
def test_vote_keys_choose_the_tokens_reg_points_at(keys, batch):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"),
                                 tiny_config(fusion_layers=1, vote_keys=keys, **FAST_HEAD)).eval()
    seen = {}
    model.head.vision_proj.register_forward_hook(lambda module, args, out: seen.update(projected=out))
    model.head.box_votes.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(fused=args[1], keys=kwargs["key_tokens"]), with_kwargs=True)
    with torch.no_grad():
        _forward(model, batch)
    expected = {"fused": seen["fused"], "projected": seen["projected"], "both": seen["projected"] + seen["fused"]}[keys]
    torch.testing.assert_close(seen["keys"], expected)
    assert not torch.allclose(seen["projected"], seen["fused"])  # the fusion layer changed the visual tokens


def test_projected_vote_keys_point_by_the_unfused_tokens_alone():
    """With vote_keys='projected' the patch logits are [REG]'s query against the projected tokens (+ positions):
    changing what the fusion layer does to the visual tokens, with [REG] fixed, changes no logit."""
    readout = BoxVoteReadout(dim=8, grid=(2, 2), num_prefix_tokens=0)
    reg, projected, position = torch.randn(1, 8), torch.randn(1, 4, 8), torch.randn(1, 4, 8)
    mask = torch.ones(1, 4, dtype=torch.bool)
    with torch.no_grad():
        _, first = readout(reg, torch.randn(1, 4, 8), position, mask, key_tokens=projected)
        _, second = readout(reg, torch.randn(1, 4, 8), position, mask, key_tokens=projected)
        _, fused = readout(reg, projected, position, mask)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(first, fused)  # the same tokens as keys give the same logits either way


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
    with pytest.raises(ValueError, match="vote_hops"):
        M2ISTConfig(vote_hops=0)
    with pytest.raises(ValueError, match="vote_window"):
        M2ISTConfig(vote_window=-1)
    with pytest.raises(ValueError, match="vote_keys"):
        M2ISTConfig(vote_keys="raw")
    with pytest.raises(ValueError, match="point_loss_weight"):
        M2ISTConfig(box_readout="vote", point_loss_weight=0.0)
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


def test_sincos_grid_table_orders_cells_along_each_axis():
    table = sincos_grid_table(3, 4, 16)
    assert table.shape == (12, 16)
    cell = table.reshape(3, 4, 16)
    # the lowest frequency's cosine (row: channel 4, column: channel 12) falls monotonically from top / left
    assert (cell[:, :, 12].diff(dim=1) < 0).all() and (cell[:, :, 4].diff(dim=0) < 0).all()
    assert torch.allclose(cell[:, 0, 8:], cell[0, 0, 8:].expand(3, -1))  # column channels ignore the row
    assert len({tuple(row.tolist()) for row in table.round(decimals=5)}) == 12  # every cell distinct


def test_sincos_position_init_starts_the_visual_positions_on_the_grid():
    config = tiny_config(position_init="sincos", **FAST_HEAD)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), config)  # ViT: a CLS token, then the grid
    head = model.head
    grid = head.box_votes.grid
    start = 1 + config.max_query_len + 1
    torch.testing.assert_close(head.position.weight[start:].detach(), sincos_grid_table(*grid, config.fusion_dim))
    assert head.position.weight.requires_grad  # a starting point, still trained
    plain = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(**FAST_HEAD)).head
    assert not torch.allclose(plain.position.weight[start:], head.position.weight[start:])
    with pytest.raises(ValueError, match="position_init"):
        M2ISTConfig(position_init="rope")
    with pytest.raises(ValueError, match="position_init='random'"):
        RECHead(tiny_config(position_init="sincos"), 32, 32, num_vision_tokens=17, vision_grid=None)
