"""Hunt 8, tower families: towers whose samples are not independent within a batch, and towers whose layers carry
tokens that are no patch grid, are refused at build in one line that names their structure."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from m2ist import get_side_tuned_model
from tests.tiny import IMAGE_SIZE, text_tower, tiny_config, vision_tower


def test_tower_packing_the_batch_into_one_sequence_is_refused_at_build():
    # Pixtral's vision model concatenates every image of a batch into one sequence: it built on the one probe image,
    # then failed on every batch of two or more images with "give the token counts" or a raw RuntimeError
    tower = T.PixtralVisionModel(T.PixtralVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                       intermediate_size=64, image_size=IMAGE_SIZE, patch_size=8,
                                                       head_dim=16))
    with pytest.raises(ValueError, match="packs the images of a batch into one sequence") as info:
        get_side_tuned_model(tower, text_tower("bert"), tiny_config())
    message = str(info.value)
    assert "PixtralVisionModel" in message and "\n" not in message
    assert "Override with" not in message and "num_prefix_tokens" not in message and "Is it a" not in message


def test_tower_mixing_the_samples_of_a_batch_is_refused_at_build():
    # a tower whose layer reads the other samples of its batch (a batch statistic): a sample's boxes would depend
    # on what it is batched with
    torch.manual_seed(0)
    tower = vision_tower("vit")
    tower.layers[0].register_forward_hook(lambda _m, _a, out: out + out.mean(0, keepdim=True))
    with pytest.raises(ValueError, match=r"change by .* with the other samples of its batch") as info:
        get_side_tuned_model(tower, text_tower("bert"), tiny_config())
    assert "\n" not in str(info.value) and "Override with" not in str(info.value)


def test_text_tower_mixing_the_samples_of_a_batch_is_refused_at_build():
    torch.manual_seed(0)
    tower = text_tower("bert")
    tower.encoder.layer[1].register_forward_hook(lambda _m, _a, out: out + out.flip(0))
    with pytest.raises(ValueError, match=r"text tower BertModel .* with the other samples of its batch"):
        get_side_tuned_model(vision_tower("vit"), tower, tiny_config())


def test_layers_with_tokens_that_are_no_patch_grid_are_refused_for_their_structure():
    # GroupViT's first stage carries 4 group tokens next to the 16 patches: the refusal blamed the towers' order
    # and the image size ("Is it a vision model ..., built for this image size?")
    torch.manual_seed(0)
    tower = T.GroupViTVisionModel(T.GroupViTVisionConfig(
        hidden_size=32, intermediate_size=64, depths=[1, 1], num_hidden_layers=2, num_group_tokens=[4, 0],
        num_output_groups=[4, 4], num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=8))
    with pytest.raises(ValueError, match="A layer gives 20 tokens, which form no patch grid") as info:
        get_side_tuned_model(tower, text_tower("bert"), tiny_config())
    message = str(info.value)
    assert "Is it a" not in message and "image size" not in message and "\n" not in message
    assert "num_prefix_tokens" in message  # the one override that may help is named


def test_independent_towers_still_build():
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    assert model.tap_report()[0].status == "exact"


def test_mobilebert_is_tapped_at_its_layers_not_its_stacked_feed_forward_networks():
    # with num_feedforward_networks=4 (google/mobilebert-uncased) the structural search took the 3 stacked FFNs of
    # every layer for layers: 3x the depth, read at the bottleneck width
    torch.manual_seed(0)
    tower = T.MobileBertModel(T.MobileBertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16, num_feedforward_networks=4))
    report = get_side_tuned_model(vision_tower("vit"), tower, tiny_config()).tap_report()[1]
    assert report.depth == 2 and report.layers == ("encoder.layer.0", "encoder.layer.1")
