"""Hunt 9, tower build-time diagnosis: a tower whose forward needs inputs m2ist does not give is refused for that
(not blamed on the towers' order), the structural search does not step back through a post-norm, and a layer with
no attention says that the IEA reads its token mixer instead."""

from __future__ import annotations

import pytest
import torch
import transformers as T

import m2ist.towers
from m2ist import get_side_tuned_model
from tests.tiny import IMAGE_SIZE, VOCAB, text_tower, tiny_config, vision_tower

_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
_DECODER = dict(**_LAYERS, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


def _refusal(vision, text) -> str:
    with pytest.raises(ValueError) as info:
        get_side_tuned_model(vision, text, tiny_config())
    message = str(info.value)
    assert "\n" not in message
    return message


def test_tower_needing_other_inputs_names_them_not_the_towers_order():
    # SegGPT's forward requires prompt images and masks: the refusal said "is it a vision model? (... takes the
    # vision tower first ...)", which sent the user after a swap that never happened
    tower = T.SegGptModel(T.SegGptConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=8, merge_index=0,
                                         intermediate_hidden_state_indices=[1]))
    message = _refusal(tower, text_tower("bert"))
    assert "needs inputs m2ist does not give: prompt_pixel_values, prompt_masks" in message
    assert "is it a" not in message.lower() and "tower first" not in message


def test_audio_model_passed_as_a_tower_is_named_by_its_inputs():
    tower = T.Wav2Vec2Model(T.Wav2Vec2Config(**_LAYERS, conv_dim=(8, 8), conv_stride=(2, 2), conv_kernel=(3, 3),
                                             num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2))
    message = _refusal(tower, text_tower("bert"))
    assert "takes no pixel_values but input_values" in message and "is it a" not in message.lower()


def test_text_tower_without_a_probed_block_is_not_blamed_on_padding(monkeypatch):
    # with no repeated block (hidden-states fallback) the first forward is the padding check: a Q-Former (it needs
    # query_embeds) was refused as "its forward fails on a padded phrase"
    monkeypatch.setattr(m2ist.towers, "find_block_names", lambda *_a, **_k: [])
    tower = T.Blip2QFormerModel(T.Blip2QFormerConfig(**_LAYERS, vocab_size=VOCAB, encoder_hidden_size=32))
    message = _refusal(vision_tower("vit"), tower)
    assert "takes no input_ids but query_embeds" in message and "padded phrase" not in message


def test_swapped_towers_still_get_the_order_hint():
    message = _refusal(text_tower("bert"), text_tower("bert"))
    assert "is it a vision model?" in message and "takes input_ids, not pixel_values" in message
    message = _refusal(vision_tower("vit"), vision_tower("vit"))
    assert "is it a text model?" in message and "takes pixel_values, not input_ids" in message


def test_olmo2_ffn_tap_is_its_post_feedforward_norm():
    # Olmo2 adds post_feedforward_layernorm(mlp(x)) to the stream; at a small init the mlp output is far below the
    # norm's eps, the norm looks like a per-channel scale, and the search stepped back through it to `mlp`
    torch.manual_seed(0)
    tower = T.Olmo2Model(T.Olmo2Config(**_DECODER))
    report = get_side_tuned_model(vision_tower("vit"), tower, tiny_config()).text_tower.report(2)
    assert (report.attention, report.ffn) == ("post_attention_layernorm", "post_feedforward_layernorm")


def test_layer_without_attention_is_labelled_in_the_tap_report():
    torch.manual_seed(0)
    tower = T.RecurrentGemmaModel(T.RecurrentGemmaConfig(**_DECODER, head_dim=16, lru_width=32, attention_window_size=4,
                                                         block_types=["recurrent", "attention"]))
    report = get_side_tuned_model(vision_tower("vit"), tower, tiny_config()).text_tower.report(2)
    assert report.status == "exact" and report.attention == "temporal_block"
    assert "layer 0 of 2 has no attention" in report.mixer and "RecurrentGemmaRecurrentBlock" in report.mixer
    assert report.mixer in str(report)
    bert = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    assert bert.text_tower.report(2).mixer == "" and bert.vision_tower.report(2).mixer == ""
