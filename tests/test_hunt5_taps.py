"""Round-5 fault hunt, taps: what each tower tap reads does not depend on how the tower was loaded."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from m2ist.model import _dummy_inputs
from m2ist.taps import resolve_tap_spec
from m2ist.towers import Tower
from tests.tiny import IMAGE_SIZE, VOCAB, tiny_config

_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _taps(model, modality: str) -> tuple:
    vision, text = _dummy_inputs(tiny_config(), model, model)
    tower = Tower(model, resolve_tap_spec(model, modality), modality, vision if modality == "vision" else text)
    return tower.spec.source, tower.spec.attention, tower.spec.ffn, [name for name, _ in tower.layers]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("family", ["beit", "albert"])
def test_half_precision_tower_is_tapped_where_float32_is(family, dtype):
    """A tower loaded in bfloat16 / float16 used to be searched in that precision: BEiT was read after its layer
    scale (drop_path) and ALBERT's LEA read the attention output, both reported as exact taps."""
    torch.manual_seed(0)
    if family == "beit":
        model, modality = T.BeitModel(T.BeitConfig(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8,
                                                   use_mask_token=False)), "vision"
    else:
        model, modality = T.AlbertModel(T.AlbertConfig(**_LAYERS, vocab_size=VOCAB, embedding_size=16)), "text"
    model.eval()
    expected = _taps(model, modality)
    assert expected[1].module != expected[2].module
    assert _taps(model.to(dtype), modality) == expected
    assert all(p.dtype == dtype for p in model.parameters())  # the tower itself is left in its precision
