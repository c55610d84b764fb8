"""Round 6 (text towers): a phrase's features never depend on the padding after it, whatever the tower family."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from m2ist import get_side_tuned_model
from tests.tiny import VOCAB, tiny_config, vision_tower

_LAYERS = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB)


def _fnet():
    return T.FNetModel(T.FNetConfig(**_LAYERS))


def _convbert():
    return T.ConvBertModel(T.ConvBertConfig(**_LAYERS, num_attention_heads=2, embedding_size=32))


def _phrase_features(model, ids: torch.Tensor, padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The phrase's final tokens and last-layer taps, alone and followed by ``padding`` (masked out)."""
    n = ids.shape[1]
    alone = model.text_tower.tap({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [1], ["ffn"])
    mask = torch.cat([torch.ones_like(ids), torch.zeros_like(padding)], 1)
    padded = model.text_tower.tap({"input_ids": torch.cat([ids, padding], 1), "attention_mask": mask}, [1], ["ffn"])
    first = torch.cat([alone.tokens[:, :n], alone.taps["ffn"][0][:, :n]], -1)
    return first, torch.cat([padded.tokens[:, :n], padded.taps["ffn"][0][:, :n]], -1)


@pytest.mark.parametrize("build", [_fnet, _convbert], ids=["fnet", "convbert"])
def test_tower_reading_its_padding_gets_phrase_features_independent_of_padding(build) -> None:
    """FNet (Fourier mixing, no attention mask) and ConvBERT (convolutions over the padding) changed a phrase's
    features with how far, and with what, it was padded: they are now fed one fixed length with their pad id."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), build(), tiny_config())
    ids = torch.randint(5, VOCAB, (1, 4))
    alone, padded = _phrase_features(model, ids, torch.randint(5, VOCAB, (1, 3)))
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_tower_reading_its_padding_gives_the_same_box_for_any_padding() -> None:
    """The box of a phrase padded by hand (shorter than max_query_len) is the processor-padded one's."""
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), _fnet(), tiny_config()).eval()
    pixels = torch.randn(1, 3, model.config.image_size, model.config.image_size)
    ids = torch.randint(5, VOCAB, (1, 4))
    short = model(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).pred_boxes
    length = model.config.max_query_len
    full = torch.cat([ids, torch.full((1, length - 4), model.text_model.config.pad_token_id)], 1)
    mask = (torch.arange(length) < 4).long()[None]
    torch.testing.assert_close(short, model(pixel_values=pixels, input_ids=full, attention_mask=mask).pred_boxes,
                               atol=1e-5, rtol=0)


def test_tower_failing_on_padded_text_is_refused_at_build() -> None:
    """Nystromformer's landmark attention fails on any mask with zeros: every real batch crashed deep inside its
    forward after a build that passed; it is now refused when the model is built, in one line."""
    tower = T.NystromformerModel(T.NystromformerConfig(**_LAYERS, num_attention_heads=2, num_landmarks=4,
                                                       segment_means_seq_len=8))
    with pytest.raises(ValueError, match="fails on a padded phrase"):
        get_side_tuned_model(vision_tower("vit"), tower, tiny_config())


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_tower_honouring_its_mask_is_fed_as_given(family: str) -> None:
    """Towers that honour the attention mask (the demo's BERT, causal decoders) are fed exactly what they were."""
    tower = T.BertModel(T.BertConfig(**_LAYERS, num_attention_heads=2)) if family == "bert" else \
        T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64))
    model = get_side_tuned_model(vision_tower("vit"), tower, tiny_config())
    assert model.text_tower.fixed_length is None
    ids = torch.randint(5, VOCAB, (1, 5))
    out = model.text_tower.tap({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [0], ["ffn"])
    assert out.tokens.shape[1] == 5


def test_a_task_model_is_tapped_through_its_base_model() -> None:
    """``BertForMaskedLM`` or ``ViTForImageClassification`` (a checkpoint's own class) were refused with "none of the
    layer patterns matches"; their base model is the tower, as a PEFT model's is."""
    mlm = T.BertForMaskedLM(T.BertConfig(**_LAYERS, num_attention_heads=2))
    classifier = T.ViTForImageClassification(T.ViTConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                                         num_attention_heads=2, image_size=32, patch_size=8,
                                                         num_labels=3))
    model = get_side_tuned_model(classifier, mlm, tiny_config(image_size=32))
    assert model.text_model is mlm.bert and model.vision_model is classifier.vit


def test_detr_for_object_detection_is_tapped_through_its_detr_model() -> None:
    """facebook/detr-resnet-50's own class is DetrForObjectDetection: its DetrModel is the paper's vision tower."""
    detector = T.DetrForObjectDetection(vision_tower("detr").config)
    plain = get_side_tuned_model(vision_tower("detr"), T.BertModel(T.BertConfig(**_LAYERS, num_attention_heads=2)),
                                 tiny_config())
    model = get_side_tuned_model(detector, T.BertModel(T.BertConfig(**_LAYERS, num_attention_heads=2)), tiny_config())
    assert model.vision_model is detector.model
    assert model.tap_report()[0].layers == plain.tap_report()[0].layers
