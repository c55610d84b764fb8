"""The support matrix as a test: every tower family of ``tests/tower_matrix.py`` builds (or is refused with one
line), trains its side network only, taps what the tower itself calls its layers, has the token layout its
config says, ignores padding, and round-trips through save / load. ``docs/reference/support.md`` is generated
from the same builds and must be up to date."""

from __future__ import annotations

import pytest
import torch

from m2ist import SideTunedModel
from m2ist.towers import _Capture, to_tokens
from tests.conftest import make_batch
from tests.tower_matrix import SUPPORT_PAGE, TEXT_FAMILIES, VISION_FAMILIES, Built, build_all, support_table

FAMILIES = [("vision", f) for f in VISION_FAMILIES] + [("text", f) for f in TEXT_FAMILIES]
IDS = [f"{role}:{family.name}" for role, family in FAMILIES]


@pytest.fixture(scope="module")
def matrix() -> dict[str, Built]:
    return {f"{b.role}:{b.family.name}": b for b in build_all()}


def test_matrix_covers_the_families_of_the_issue():
    names = {f.name for f in VISION_FAMILIES} | {f.name for f in TEXT_FAMILIES}
    assert len(VISION_FAMILIES) >= 30 and len(TEXT_FAMILIES) >= 20
    for family in ("swinv2", "siglip2_vision", "conditional_detr", "deformable_detr", "yolos", "hiera", "pvt_v2",
                   "segformer", "dinov3_vit", "clip (dual encoder)", "albert", "gpt2", "llama", "qwen2", "qwen3",
                   "gemma", "phi", "modernbert", "mpnet", "t5 (encoder)", "aimv2_vision", "ijepa", "beit", "resnet",
                   "efficientnet", "focalnet"):
        assert family in names


@pytest.mark.parametrize("key", IDS)
def test_family(key: str, matrix: dict[str, Built]):
    item = matrix[key]
    family, role = item.family, item.role
    if family.refused is not None:
        message = str(item.error)
        assert item.model is None and family.refused in message and "\n" not in message
        if family.overridable:
            assert "Override with" in message and "model_type=" in message
        else:  # the tower's structure, said as such: not blamed on the towers' order or the image size
            assert "Is it a" not in message and "image size" not in message
        return
    model = item.model
    tower = model.vision_model if role == "vision" else model.text_model
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():  # move the zero-initialised up-projections so every side parameter gets a gradient
        for p in model.side.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    batch = make_batch()
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is None for p in tower.parameters()), "a frozen tower got a gradient"
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items()), "the tower's state changed"
    missing = [n for n, p in model.side.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"side parameters without a gradient: {missing}"

    _check_layout(item)
    _check_taps_against_hidden_states(item, batch)
    model.eval()
    _check_padding(item, batch)
    _check_round_trip(item, batch)


def _check_layout(item: Built) -> None:
    tower = item.model.vision_tower
    if item.role == "text":
        return
    family = item.family
    assert (tower.num_prefix_tokens, tower.num_suffix_tokens) == (family.prefix, family.suffix)
    assert item.report.grid == family.grid
    grid = family.grid
    assert item.model.config.num_vision_tokens == family.prefix + family.suffix + grid[0] * grid[1]


def _raw_layer_outputs(item: Built, inputs: dict) -> dict[int, torch.Tensor]:
    """The layer outputs the hooks capture, before any pooling to the final grid, in canonical token order."""
    tower = item.tower
    depth = tower.depth()
    state = _Capture(layers=set(range(depth)), kinds=["layer"])
    tower._state = state
    try:
        with torch.no_grad():
            tower._run(inputs, hidden_states=False)
    finally:
        tower._state = None
    pixels = inputs.get("pixel_values")
    aspect = pixels.shape[-2] / pixels.shape[-1] if pixels is not None else None  # channels-last layers (SAM's)
    outputs = {}
    for key, (x, layout) in state.out.items():
        if key != "seed" and key[0] == "layer":
            index = key[1]
            tokens, _ = to_tokens(x, layout, aspect)
            outputs[index] = tower.canonical(tokens) if item.role == "vision" else tokens
    return outputs


def _check_taps_against_hidden_states(item: Built, batch: dict) -> None:
    """Where the tower returns per-layer hidden states, the layer taps are those hidden states."""
    tower, family = item.tower, item.family
    inputs = ({"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]} if item.role == "vision"
              else {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    with torch.no_grad():
        _, _, out = tower._run(inputs, hidden_states=True)
    states = getattr(out, family.states or tower.spec.hidden_states_key, None) if out is not None else None
    assert item.report.depth == family.depth
    if tower.spec.uses_hidden_states and states:
        _check_hidden_state_taps(item, inputs, states)
        return
    if not states or not family.states_are_layers:
        return  # the tower has no hidden states, or they are normalised stages
    raw = _raw_layer_outputs(item, inputs)
    compared = 0
    last = len(states) - 1 - (1 if family.last_state_normed else 0)
    for index, tap in raw.items():
        if index + family.states_offset > last:
            continue
        state, _ = to_tokens(states[index + family.states_offset], family.states_layout)
        if family.states is None and item.role == "vision":
            state = tower.canonical(state)
        if state.shape == tap.shape:
            try:
                torch.testing.assert_close(tap.float(), state.float(), rtol=1e-4, atol=1e-5)
            except AssertionError as err:
                raise AssertionError(f"layer {index} of {len(states) - 1}: {err}") from None
            compared += 1
    assert compared, f"no layer tap could be compared with {family.states or tower.spec.hidden_states_key}"


def _check_hidden_state_taps(item: Built, inputs: dict, states: tuple) -> None:
    """Taps read from ``output_hidden_states`` are those states, read in their own layout (SAM's layers are
    channels-last): the same channels, and the same values where the state's grid is the final one."""
    tower, family = item.tower, item.family
    taps = tower.tap(inputs, list(range(len(states) - 1)), ["layer"]).taps["layer"]
    for index, tap in enumerate(taps):
        state, _ = to_tokens(states[index + 1], family.states_layout)
        state = tower.canonical(state) if item.role == "vision" else state
        assert tap.shape[-1] == state.shape[-1], f"layer {index}: a tap of {tap.shape[-1]} channels, not {state.shape[-1]}"
        if tap.shape == state.shape:
            torch.testing.assert_close(tap, state.float(), rtol=1e-4, atol=1e-5)


def _check_padding(item: Built, batch: dict) -> None:
    model = item.model
    with torch.no_grad():
        reference = model(**batch).pred_boxes
        if item.role == "text":  # other ids under the padding: same boxes
            ids = batch["input_ids"].clone()
            ids[batch["attention_mask"] == 0] = 7
            torch.testing.assert_close(model(**{**batch, "input_ids": ids}).pred_boxes, reference)
        else:  # the padded right quarter of the last image is masked out for the head
            mask = model.encode(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"],
                                batch["attention_mask"])[1]
            lead = model.vision_tower.num_leading_tokens
            assert mask[0].all() and mask[-1, :lead].all()
            if item.family.grid[1] >= 4:
                grid = mask[-1, lead:].reshape(item.family.grid)
                assert not grid[:, -1].any() and grid[:, 0].all()


def _check_round_trip(item: Built, batch: dict, tmp_path_factory=None) -> None:
    import tempfile

    model = item.model
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, model_card=False)
        # trainable like the original (a frozen copy would take other attention kernels: 1-ulp differences)
        again = SideTunedModel.from_pretrained(folder, vision_model=model.vision_model, text_model=model.text_model,
                                               is_trainable=True)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).pred_boxes, model(**batch).pred_boxes, rtol=0, atol=0)


def test_support_page_is_up_to_date(matrix: dict[str, Built]):
    expected = support_table(list(matrix.values()))
    assert SUPPORT_PAGE.read_text(encoding="utf-8") == expected, (
        "docs/reference/support.md is stale: run `python -m tests.tower_matrix`")
