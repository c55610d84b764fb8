"""Hunt 17, tower discovery: windowed-attention towers (VitDet, SAM) and a block that mixes locally before its two
residuals (SwiftFormer) are tapped at their sub-layers instead of falling back to layer outputs, and towers that
cannot run one image on a small canvas are refused for what they are (X-CLIP's frame groups, MobileViTv2's canvas)."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from m2ist import get_side_tuned_model
from m2ist.towers import _Capture
from tests.conftest import make_batch
from tests.tiny import IMAGE_SIZE, text_tower, tiny_config

_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


def _vitdet(windowed: list[int]):
    return T.VitDetModel(T.VitDetConfig(**_LAYERS, intermediate_size=64, image_size=IMAGE_SIZE,
                                        pretrain_image_size=IMAGE_SIZE, patch_size=8, window_size=2,
                                        window_block_indices=windowed))


def _sam(global_layers: list[int]):
    return T.SamVisionModel(T.SamVisionConfig(**_LAYERS, mlp_dim=64, image_size=IMAGE_SIZE, patch_size=8,
                                              output_channels=16, window_size=2, global_attn_indexes=global_layers,
                                              initializer_range=0.02))


def _raw_taps(tower, pixel_values: torch.Tensor) -> dict:
    """The attention / feed-forward taps of every layer as captured, before pooling."""
    state = _Capture(layers=set(range(tower.depth())), kinds=["attention", "ffn"])
    tower._state = state
    try:
        with torch.no_grad():
            tower._run({"pixel_values": pixel_values}, hidden_states=False)
    finally:
        tower._state = None
    return {key: value for key, (value, _) in state.out.items() if key != "seed"}


def _truth(tower, pixel_values: torch.Tensor, norm: str) -> dict:
    """Per layer: the stream entering ``norm`` minus the layer input (channels-last), and the MLP output."""
    seen, handles = {}, []
    for index, (_, layer) in enumerate(tower.layers):
        handles += [layer.register_forward_pre_hook(lambda _m, a, i=index: seen.__setitem__(("in", i), a[0])),
                    layer.get_submodule(norm).register_forward_pre_hook(
                        lambda _m, a, i=index: seen.__setitem__(("stream", i), a[0])),
                    layer.mlp.register_forward_hook(lambda _m, _a, out, i=index: seen.__setitem__(("ffn", i), out))]
    try:
        with torch.no_grad():
            tower._run({"pixel_values": pixel_values}, hidden_states=False)
    finally:
        for handle in handles:
            handle.remove()
    truth = {}
    for index in range(len(tower.layers)):
        start = seen[("in", index)]
        start = start if start.shape == seen[("stream", index)].shape else start.permute(0, 2, 3, 1)
        truth[("attention", index)] = seen[("stream", index)] - start
        truth[("ffn", index)] = seen[("ffn", index)]
    return truth


def _trains_side_only(model) -> None:
    tower = model.vision_model
    with torch.no_grad():  # move the zero-initialised up-projections so every side parameter gets a gradient
        for p in model.side.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    model(**make_batch()).loss.backward()
    assert all(p.grad is None for p in tower.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.side.parameters())


@pytest.mark.parametrize("family, build, norm", [
    # VitDet's layers take (B, C, H, W) maps and run their sub-layers channels-last; SAM's windowed attention is cut
    # into windows and re-assembled in the layer's own code, so no sub-module outputs the attention branch. Both fell
    # back to the layer outputs (output_hidden_states) for both experts. With the first layer global, the attention
    # module found there is cut into windows in the next layer: the search must not keep it.
    ("vitdet, layer 0 windowed", lambda: _vitdet([0]), "norm2"),
    ("vitdet, layer 0 global", lambda: _vitdet([1]), "norm2"),
    ("sam, layer 0 windowed", lambda: _sam([1]), "layer_norm2"),
    ("sam, layer 0 global", lambda: _sam([0]), "layer_norm2"),
])
def test_windowed_attention_towers_are_tapped_at_their_sub_layers(family, build, norm):
    torch.manual_seed(0)
    model = get_side_tuned_model(build(), text_tower("bert"), tiny_config())
    report = model.tap_report()[0]
    assert report.status == "exact" and report.source == "structure", family
    assert report.attention != report.ffn
    tower = model.vision_tower
    pixels = make_batch()["pixel_values"]
    taps, truth = _raw_taps(tower, pixels), _truth(tower, pixels, norm)
    assert set(taps) == set(truth)
    for key, expected in truth.items():  # the attention branch and the MLP output of every layer, un-windowed
        torch.testing.assert_close(taps[key], expected, rtol=1e-5, atol=1e-6, msg=f"{family}: {key}")
    other = _raw_taps(tower, make_batch(seed=1)["pixel_values"])
    assert all(not torch.allclose(taps[key], other[key]) for key in taps)  # they follow the image
    _trains_side_only(model)


def test_sam_attention_tap_is_reported_as_a_branch():
    torch.manual_seed(0)
    report = get_side_tuned_model(_sam([1]), text_tower("bert"), tiny_config()).tap_report()[0]
    assert report.attention == "layer_norm2 input - layer input" and report.ffn == "mlp"
    assert "IEA <- layer_norm2 input - layer input" in str(report)


def test_block_mixing_locally_before_its_residuals_is_tapped():
    # SwiftFormer's encoder block runs a local representation, then adds attention and MLP to *its* output, not to
    # the block input: the search only looked for branches added to the block input and fell back
    torch.manual_seed(0)
    tower = T.SwiftFormerModel(T.SwiftFormerConfig(image_size=IMAGE_SIZE, depths=[1, 1, 1, 1],
                                                   embed_dims=[8, 16, 16, 32], layer_scale_init_value=0.1))
    model = get_side_tuned_model(tower, text_tower("bert"), tiny_config())
    report = model.tap_report()[0]
    assert (report.status, report.attention, report.ffn) == ("exact", "drop_path", "linear")
    features = [model.vision_tower.tap({"pixel_values": make_batch(seed=s)["pixel_values"]}, [0, 1], ["attention"])
                for s in (0, 1)]
    assert not torch.allclose(features[0].taps["attention"][0], features[1].taps["attention"][0])
    _trains_side_only(model)


def test_tower_reading_a_batch_as_frame_groups_is_refused_for_that():
    # X-CLIP's vision model reads a batch as clips of num_frames frames: refused as "its forward fails on the probe
    # inputs (RuntimeError: shape '[0, 8, 32]' ...); m2ist runs a vision tower on pixel_values alone", with a tap
    # override offered that cannot help
    tower = T.XCLIPVisionModel(T.XCLIPVisionConfig(**_LAYERS, intermediate_size=64, image_size=IMAGE_SIZE,
                                                   patch_size=8))
    with pytest.raises(ValueError, match=r"runs on 8 at once \(config.num_frames\): it reads a batch as") as info:
        get_side_tuned_model(tower, text_tower("bert"), tiny_config())
    message = str(info.value)
    assert "XCLIPVisionModel" in message and "CLIP checkpoint" in message and "\n" not in message
    assert "Override with" not in message and "pixel_values (and pixel_mask) alone" not in message


def test_canvas_too_small_for_the_tower_names_the_image_size():
    # MobileViTv2 unfolds 2x2 patches of its last feature map, 1x1 on a 32 px canvas: the refusal blamed the inputs
    # ("m2ist runs a vision tower on pixel_values alone") and offered tap overrides
    tower = T.MobileViTV2Model(T.MobileViTV2Config(image_size=IMAGE_SIZE, width_multiplier=0.25))
    with pytest.raises(ValueError, match=r"fails on a 32x32 canvas .* runs on a 64x64 one") as info:
        get_side_tuned_model(tower, text_tower("bert"), tiny_config())
    message = str(info.value)
    assert "M2ISTConfig(image_size=64)" in message and "Override with" not in message and "\n" not in message


def test_block_called_through_forward_says_why_it_falls_back():
    # SqueezeBERT's encoder calls layer.forward(...), which runs no hooks: the note said "no repeated block found"
    torch.manual_seed(0)
    tower = T.SqueezeBertModel(T.SqueezeBertConfig(**_LAYERS, intermediate_size=64, vocab_size=100, embedding_size=32))
    vision = T.ViTModel(T.ViTConfig(**_LAYERS, intermediate_size=64, image_size=IMAGE_SIZE, patch_size=8))
    report = get_side_tuned_model(vision, tower, tiny_config()).tap_report()[1]
    assert report.status == "fallback" and "SqueezeBertModule is called through its .forward() method" in report.note
