"""The side network and the REC head against the paper's method: faults found in round 5 of the fault hunt."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from m2ist import get_side_tuned_model
from m2ist.layer import SideNetwork
from tests.conftest import make_batch
from tests.tiny import text_tower, tiny_config, vision_tower

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _grads(checkpoint_kwargs: dict | None, **config) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(**config))
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.train()
    if checkpoint_kwargs is not None:
        model.activation_checkpointing_enable(checkpoint_kwargs)
    torch.manual_seed(1)
    model(**make_batch()).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.usefixtures("one_thread")
def test_checkpointing_without_rng_state_refuses_active_dropout():
    """preserve_rng_state=False recomputes the fusion layers' dropout (0.1, the paper's default) with other masks:
    the gradients would be wrong, so it is refused; without dropout it runs and matches no checkpointing."""
    with pytest.raises(ValueError, match=r"preserve_rng_state=False .*dropout.*silently wrong"):
        _grads({"preserve_rng_state": False})
    with pytest.raises(ValueError, match=r"'vea.dropout' \(p=0.5\)"):
        _grads({"preserve_rng_state": False}, side_dropout=0.5, fusion_dropout=0.0)
    plain = _grads(None, fusion_dropout=0.0)
    checkpointed = _grads({"preserve_rng_state": False}, fusion_dropout=0.0)
    assert all(torch.equal(plain[name], checkpointed[name]) for name in plain)


def test_side_parameter_count_matches_the_documented_arithmetic():
    """differences.md: the released code's 3,185,794 = m2ist's side network + the dead LoRA modules + the unused
    `adapter_layer_norm_cross_modal` LayerNorms (6 x (256 + 768) x 2)."""
    dims = {"vision": {"width": 256, "seed": 256, "intra": [256] * 6, "inter": [256] * 6},
            "text": {"width": 768, "seed": 768, "intra": [768] * 6, "inter": [768] * 6}}
    side = SideNetwork(vision_dims=dims["vision"], text_dims=dims["text"], bottleneck=128, scale=0.1,
                       experts=["vea", "lea", "iea"])
    count = sum(p.numel() for p in side.parameters())
    unused_norms = 6 * 2 * (256 + 768)
    assert count == 2_975_232 == 3_185_794 - 198_274 - unused_norms
    text = " ".join((DOCS / "differences.md").read_text(encoding="utf-8").split())
    assert re.search(r"198,274.*12,288.*2,975,232", text), "differences.md must account for all of 3,185,794"


def test_a_build_field_changed_after_the_build_is_refused_at_save(tmp_path) -> None:
    """``model.config.adapter_scale = 1.0`` on a built model changes nothing it computes (the adapters keep 0.1):
    saving it would write 1.0, and the reloaded adapter would give other boxes."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.config.adapter_scale = 1.0
    with pytest.raises(ValueError, match=r"adapter 'default' was changed after the model was built \(adapter_scale: "
                                         r"0\.1 -> 1\.0\).*nothing was saved"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    model.config.adapter_scale = 0.1  # put back: saves
    model.config.giou_loss_weight = 2.0  # a loss weight is read at every step: changing it is fine
    model.save_pretrained(tmp_path / "adapter")
