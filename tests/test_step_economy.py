"""What a training step does not spend: the batch's padding columns, the readout's key projection, views that
would keep whole tensors alive for the backward pass. Each economy leaves every result as it was."""

from __future__ import annotations

import pytest
import torch

import m2ist.model
from m2ist import get_side_tuned_model
from m2ist.evidence.baselines import build_model
from m2ist.evidence.profiling import saved_tensor_accounting
from m2ist.head import BoxVoteReadout
from m2ist.towers import TowerFeatures, without_trailing_padding
from tests.conftest import make_batch
from tests.tiny import text_tower, tiny_config, vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")

VOTE_HEAD = dict(fusion_norm="pre", reg_init="text", box_readout="vote", vote_hops=2)


def test_readout_logits_are_the_query_against_the_projected_keys():
    """The key projection folded into [REG]'s query gives the logits (and gradients) of projecting every key."""
    readout = BoxVoteReadout(dim=8, grid=(2, 3), num_prefix_tokens=0)
    with torch.no_grad():
        readout.key.bias.normal_()  # the bias term must not be lost in the fold
    reg, keys = torch.randn(2, 8), torch.randn(2, 6, 8, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    logits = readout._point(readout.query, readout.key, reg, keys, mask)
    reference = torch.einsum("bd,bnd->bn", readout.query(reg), readout.key(keys)) / 8 ** 0.5
    torch.testing.assert_close(logits[mask], reference[mask])
    assert (logits[~mask] == torch.finfo(logits.dtype).min).all()
    grads = torch.autograd.grad(logits[mask].square().sum(), [keys, readout.key.weight, readout.key.bias])
    expected = torch.autograd.grad(reference[mask].square().sum(), [keys, readout.key.weight, readout.key.bias])
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def _padded(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """``batch`` with ``extra`` more padding columns at the end of every expression."""
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], torch.zeros(len(batch["input_ids"]), extra, dtype=torch.long)], 1)
    out["attention_mask"] = torch.cat([batch["attention_mask"],
                                       torch.zeros(len(batch["attention_mask"]), extra, dtype=torch.long)], 1)
    return out


def _loss_and_gradients(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("method", "head"), [("m2ist", VOTE_HEAD), ("m2ist", dict(fusion_layers=2)),
                                              ("full", VOTE_HEAD)])
def test_padding_columns_change_no_result_and_are_not_computed(method, head, monkeypatch):
    """Boxes, loss and every gradient are those of the whole padded batch, while the side network and the head
    see only the columns up to the batch's last real token."""
    torch.manual_seed(0)
    model = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(fusion_dropout=0.0, **head),
                        method=method).train()
    batch = make_batch(2, query_len=5)  # the second expression ends after 2 tokens, the first fills all 5
    padded = _padded(batch, 3)  # the processor pads to max_query_len (8)
    seen = []
    model.head.text_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    out, grads = _loss_and_gradients(model, padded)
    assert seen == [5]

    monkeypatch.setattr(m2ist.model, "without_trailing_padding", lambda features: features)
    monkeypatch.setattr("m2ist.evidence.baselines.without_trailing_padding", lambda features: features)
    whole, whole_grads = _loss_and_gradients(model, padded)
    assert seen[-1] == 8
    torch.testing.assert_close(out.pred_boxes, whole.pred_boxes)
    torch.testing.assert_close(out.loss, whole.loss)
    assert grads.keys() == whole_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, whole_grads[name], msg=name)


def test_padding_columns_keep_nothing_for_the_backward_pass():
    """The same batch with three more padding columns makes autograd keep exactly the same bytes: the dropped
    columns are copies' leftovers, not views that would hold the padded tensors alive."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(**VOTE_HEAD)).train()
    batch = make_batch(2, query_len=5)

    def saved_bytes(inputs):
        with saved_tensor_accounting(exclude=model.parameters()) as saved:
            model(**inputs).loss.backward()
        return saved.bytes

    assert saved_bytes(_padded(batch, 3)) == saved_bytes(batch)


def test_features_without_padding_or_with_pooled_taps_come_back_whole():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    features = TowerFeatures(tokens=torch.randn(2, 3, 4), mask=mask, seed=torch.randn(2, 3, 4),
                             taps={"ffn": [torch.randn(2, 3, 5)]})
    trimmed = without_trailing_padding(features)
    assert trimmed.tokens.shape[1] == trimmed.seed.shape[1] == trimmed.taps["ffn"][0].shape[1] == 2
    torch.testing.assert_close(trimmed.taps["ffn"][0], features.taps["ffn"][0][:, :2])
    assert trimmed.mask.tolist() == [[True, True], [True, False]]
    assert without_trailing_padding(trimmed) is trimmed  # nothing left to drop
    pooled = TowerFeatures(tokens=torch.randn(2, 3, 4), mask=mask, taps={"ffn": [torch.randn(2, 1, 5)]})
    assert without_trailing_padding(pooled) is pooled  # a tap with another token count: left as it is
