"""Hunt 22, tower families off the support matrix walked through the whole user path (build, train with and without
the tower cache, save / load, predict): encoder-decoder vision towers whose last_hidden_state is the decoder's object
queries (Table Transformer, DAB-DETR), towers whose forward draws at random in eval() (Reformer's LSH attention
without a hash seed) and towers whose forward re-seeds the global random state (Reformer with one)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T
from einops import rearrange

from m2ist import get_side_tuned_model
from m2ist.trainer import train_rec, trainable_tensors
from tests.conftest import make_batch
from tests.ddp_worker import make_dataset, make_processor
from tests.tiny import VOCAB, cpu_training_args, text_tower, tiny_config, vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")

H, L, A, F = 32, 2, 2, 64


def _resnet() -> T.ResNetConfig:
    return T.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8, layer_type="basic",
                          out_features=["stage2"])


def _table_transformer(num_queries: int):
    return T.TableTransformerModel(T.TableTransformerConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=_resnet(), d_model=H, encoder_layers=L,
        decoder_layers=1, encoder_attention_heads=A, decoder_attention_heads=A, encoder_ffn_dim=F, decoder_ffn_dim=F,
        num_queries=num_queries))


def _dab_detr(num_queries: int):
    return T.DabDetrModel(T.DabDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=_resnet(), hidden_size=H,
        encoder_layers=L, decoder_layers=1, encoder_attention_heads=A, decoder_attention_heads=A, encoder_ffn_dim=F,
        decoder_ffn_dim=F, num_queries=num_queries))


@pytest.mark.parametrize("build", [_table_transformer, _dab_detr])
def test_encoder_decoder_vision_tower_is_refused_not_read_as_a_grid_of_queries(build):
    """Table Transformer and DAB-DETR are DETR-like encoder-decoders that are not in the tap registry. Their
    last_hidden_state is the decoder's object queries: 4 (or 100, 64, ...) queries were read as a 2x2 (10x10, 8x8)
    patch grid, the pixel mask pooled onto it and the taps found in the ResNet backbone pooled to it, and the model
    trained and predicted without a word. Now refused in one line naming the encoder output and the way out."""
    torch.manual_seed(0)
    with pytest.raises(ValueError) as caught:
        get_side_tuned_model(build(4), text_tower("bert"), tiny_config())
    message = str(caught.value)
    assert "\n" not in message and "encoder-decoder" in message and "encoder_last_hidden_state" in message
    assert "object queries" in message and "DETR" in message and "register_taps" in message


def test_registered_detr_still_builds():
    """DETR's registered encode runs its encoder alone: the encoder-decoder refusal does not touch it."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("detr"), text_tower("bert"), tiny_config())
    assert model.tap_report()[0].grid is not None


def _reformer(hash_seed: int | None, initializer_range: float = 0.02):
    return T.ReformerModel(T.ReformerConfig(
        vocab_size=VOCAB, hidden_size=H, num_attention_heads=A, attention_head_size=16, attn_layers=["lsh", "local"],
        feed_forward_size=F, axial_pos_embds=False, max_position_embeddings=64, lsh_attn_chunk_length=4,
        local_attn_chunk_length=4, num_buckets=2, hash_seed=hash_seed, initializer_range=initializer_range))


def test_tower_drawing_at_random_in_eval_is_refused():
    """Reformer's LSH attention draws new random rotations on every forward, in eval() too, unless config.hash_seed
    is set: a phrase's features changed from step to step and the float32 tower cache stored one draw, so the cached
    run trained other weights than the uncached one. Now refused at build, naming the seed to set."""
    torch.manual_seed(0)
    with pytest.raises(ValueError) as caught:
        get_side_tuned_model(vision_tower("vit"), _reformer(None, 0.5), tiny_config(max_query_len=16))
    message = str(caught.value)
    assert "\n" not in message and "draws at random" in message and "config.hash_seed" in message
    torch.manual_seed(0)  # with the seed set, the same tower builds
    get_side_tuned_model(vision_tower("vit"), _reformer(1, 0.5), tiny_config(max_query_len=16))


def test_tower_forward_leaves_the_random_state_alone():
    """Reformer with config.hash_seed calls torch.manual_seed(hash_seed) inside every forward: tapping the tower
    re-seeded the global random state, so the side network's dropout drew the same mask every uncached step and other
    masks on cached steps (the tower skipped). The tower now runs with the caller's random state kept."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), _reformer(1), tiny_config())
    ids = torch.randint(3, 11, (2, 8))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.text_tower.tap({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [0, 1], ["attention", "ffn"])
    assert torch.equal(torch.rand(3), expected)


def test_reformer_trains_the_same_weights_with_and_without_the_tower_cache(tmp_path):
    """The user path on a seeded Reformer: the float32 tower cache trains the uncached run's weights (side dropout on)."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), _reformer(1), tiny_config(side_dropout=0.1))
    processor = make_processor(tmp_path / "tok")
    data = make_dataset(8, 0)
    trained = {}
    for mode in ("off", "memory"):
        run = copy.deepcopy(model)
        extra = {"tower_cache_dtype": "float32"} if mode == "memory" else {}
        train_rec(run, processor, data, None, cpu_training_args(tmp_path / mode, max_steps=4, tower_cache=mode, **extra))
        trained[mode] = trainable_tensors(run)
    differ = [k for k, v in trained["off"].items() if not torch.equal(v, trained["memory"][k])]
    assert not differ, differ


def test_multi_scale_encoder_decoder_is_refused():
    """RT-DETR's encoder_last_hidden_state is a list of multi-scale maps; its last_hidden_state, the decoder's 4
    queries, was read as a 2x2 grid (taps from its ResNet backbone). Refused like the single-scale ones."""
    backbone = T.RTDetrResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1],
                                    out_features=["stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    tower = T.RTDetrModel(T.RTDetrConfig(backbone_config=backbone, encoder_hidden_dim=H, d_model=H, decoder_layers=1,
                                         num_queries=4, encoder_in_channels=[32, 32, 32], decoder_in_channels=[H, H, H],
                                         encoder_ffn_dim=F, decoder_ffn_dim=F))
    with pytest.raises(ValueError, match=r"encoder-decoder: .* encoder_last_hidden_state \[\(1, 32, 4, 4\)"):
        get_side_tuned_model(tower, text_tower("bert"), tiny_config())


_DECODER = dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=A, intermediate_size=F, vocab_size=VOCAB,
                num_key_value_heads=A, max_position_embeddings=64, pad_token_id=0)


def _lfm2():
    return T.Lfm2Model(T.Lfm2Config(**_DECODER, layer_types=["conv", "full_attention"]))


def _bamba():
    return T.BambaModel(T.BambaConfig(**_DECODER, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=4,
                                      mamba_chunk_size=4, attn_layer_indices=[1]))


@pytest.mark.parametrize("build, mixers", [(_lfm2, ("conv", "self_attn")), (_bamba, ("mamba", "self_attn"))])
def test_hybrid_stack_taps_each_layers_own_token_mixer(build, mixers):
    """LFM2 (short convolution / attention layers) and Bamba (Mamba / attention layers) stack layers of one class whose
    token mixers are different sub-modules. The taps found on layer 0 named its mixer ('conv', 'mamba') and the build
    failed on layer 1 with "Layer 'layers.1' has no sub-module 'conv'". Now each kind of layer gets the sub-modules
    found on it, as alternatives, and every layer's IEA tap is its own mixer's output."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), build(), tiny_config())
    tower, report = model.text_tower, model.tap_report()[1]
    assert report.status == "exact" and report.attention == "|".join(mixers)
    assert f"layer 0 of 2 has no attention: the IEA reads the token mixer in its place, {mixers[0]} (" in report.mixer
    seen, handles = {}, []
    for index, ((_, layer), mixer) in enumerate(zip(tower.layers, mixers, strict=True)):
        module = layer.get_submodule(mixer)
        handles.append(module.register_forward_hook(lambda _m, _a, out, i=index: seen.__setitem__(
            i, out[0] if isinstance(out, tuple) else out)))
    ids = torch.randint(3, 11, (2, 8))
    try:
        taps = tower.tap({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [0, 1], ["attention"])
    finally:
        for handle in handles:
            handle.remove()
    for index in range(2):
        torch.testing.assert_close(taps.taps["attention"][index], seen[index].float(), rtol=0, atol=0)
    model.train()
    batch = make_batch()
    batch["input_ids"] = batch["input_ids"] % 11
    model(**batch).loss.backward()
    assert all(p.grad is None for p in tower.model.parameters())


def test_text_tower_with_parallel_streams_is_refused_for_what_it_is():
    """Gemma 3n's layers carry its AltUp streams stacked, (4, batch, tokens, width). Read as a (B, C, H, W) feature
    map, a layer seemed to give 256 tokens, and the build blamed padding inside the layers (as Longformer's). Now
    refused naming the layers' extra axis."""
    torch.manual_seed(0)
    tower = T.Gemma3nTextModel(T.Gemma3nTextConfig(
        **_DECODER, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        num_kv_shared_layers=0, laurel_rank=4, hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
        activation_sparsity_pattern=[0.0, 0.0]))
    with pytest.raises(ValueError) as caught:
        get_side_tuned_model(vision_tower("vit"), tower, tiny_config())
    message = str(caught.value)
    assert "\n" not in message and "4-D tensors of shape (4, 1, 8, 32)" in message and "AltUp" in message
    assert "pads the sequence" not in message


def test_building_on_a_reseeding_tower_keeps_the_callers_seed():
    """The build's probe forwards ran Reformer's torch.manual_seed(hash_seed) too: the side network and head were
    then initialised from the tower's seed, so models built under different seeds came out identical."""
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = get_side_tuned_model(vision_tower("vit"), _reformer(1), tiny_config())
        heads.append(torch.cat([p.detach().flatten() for p in model.side.parameters()]))
    assert not torch.equal(heads[0], heads[1])


def _sam2_vision(width: int = 8):
    """A tiny SAM2 vision model: a two-stage Hiera whose stages give channels-last (B, H, W, C) hidden states."""
    backbone = T.Sam2HieraDetConfig(
        hidden_size=width, num_attention_heads=1, image_size=[32, 32], blocks_per_stage=[1, 1],
        embed_dim_per_stage=[width, 2 * width], num_attention_heads_per_stage=[1, 2], window_size_per_stage=[4, 4],
        global_attention_blocks=[], num_query_pool_stages=1, window_positional_embedding_background_size=[2, 2])
    return T.Sam2VisionModel(T.Sam2VisionConfig(
        backbone_config=backbone, backbone_channel_list=[2 * width, width], backbone_feature_sizes=[[8, 8], [4, 4]],
        fpn_hidden_size=16, fpn_top_down_levels=[0, 1], num_feature_levels=2))


def test_channels_last_map_with_as_many_channels_as_grid_sides_is_read_channels_last():
    """SAM2's Hiera hidden states are channels-last. Where a stage has as many channels as grid rows and columns
    (here 8 channels on the 8x8 first stage; a real Hiera-T/S/B+ on a 384-pixel canvas: 96 on 96x96), the shape reads
    both ways alike and the rule read it channels-first: the seed and first-layer taps were the map's rows as
    channels, silently. Now a tie follows the tower's unambiguous maps (its second stage is plainly channels-last)."""
    torch.manual_seed(0)
    tower = _sam2_vision()
    model = get_side_tuned_model(tower, text_tower("bert"), tiny_config())
    batch = make_batch()
    features = model.vision_tower.tap({"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]},
                                      [0, 1], ["layer"])
    with torch.no_grad():
        states = tower(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states
    assert tuple(states[0].shape) == (2, 8, 8, 8) and tuple(states[2].shape) == (2, 4, 4, 16)
    for index, got in enumerate([features.seed, *features.taps["layer"]]):
        truth = torch.nn.functional.adaptive_avg_pool2d(rearrange(states[index], "b h w c -> b c h w"), (4, 4))
        torch.testing.assert_close(got, rearrange(truth, "b c h w -> b (h w) c"), rtol=0, atol=1e-6)
