"""Tiny random-init towers of every supported family, built from configs (no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers as T

from m2ist import M2ISTConfig

IMAGE_SIZE = 32
VOCAB = 100
QUERY_LEN = 8
_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny_config(**overrides) -> M2ISTConfig:
    """A small head and bottleneck so tests run in milliseconds."""
    values = dict(bottleneck=8, fusion_dim=32, fusion_layers=1, fusion_heads=2, fusion_ffn_dim=64,
                  max_query_len=QUERY_LEN, image_size=IMAGE_SIZE)
    return M2ISTConfig(**{**values, **overrides})


def vision_tower(family: str):
    """A tiny vision tower of ``family``."""
    if family == "detr":
        resnet = T.ResNetConfig(depths=[1, 1], hidden_sizes=[16, 32], embedding_size=8, layer_type="basic",
                                out_features=["stage2"])
        return T.DetrModel(T.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=resnet,
                                        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=4))
    if family == "vit":
        return T.ViTModel(T.ViTConfig(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8))
    if family == "deit":
        return T.DeiTModel(T.DeiTConfig(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8))
    if family == "clip_vision":
        return T.CLIPVisionModel(T.CLIPVisionConfig(**_LAYERS, image_size=IMAGE_SIZE, patch_size=8))
    if family == "dinov2":
        return T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                            image_size=IMAGE_SIZE, patch_size=8))
    if family == "swin":
        return T.SwinModel(T.SwinConfig(embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=IMAGE_SIZE,
                                        patch_size=4, window_size=4))
    if family == "convnext":
        return T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2))
    raise ValueError(family)


def text_tower(family: str):
    """A tiny text tower of ``family``."""
    if family == "bert":
        return T.BertModel(T.BertConfig(**_LAYERS, vocab_size=VOCAB))
    if family == "roberta":
        return T.RobertaModel(T.RobertaConfig(**_LAYERS, vocab_size=VOCAB))
    if family == "xlm-roberta":
        return T.XLMRobertaModel(T.XLMRobertaConfig(**_LAYERS, vocab_size=VOCAB))
    if family == "distilbert":
        return T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=VOCAB))
    if family == "deberta-v2":
        return T.DebertaV2Model(T.DebertaV2Config(**_LAYERS, vocab_size=VOCAB))
    if family == "clip_text":
        return T.CLIPTextModel(T.CLIPTextConfig(**_LAYERS, vocab_size=VOCAB, bos_token_id=0, eos_token_id=2))
    raise ValueError(family)


VISION_FAMILIES = ["detr", "vit", "deit", "clip_vision", "dinov2", "swin", "convnext"]
TEXT_FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "clip_text"]


def cpu_training_args(output_dir: Any, **overrides: Any) -> Any:
    """``RECTrainingArguments`` for a few quick CPU steps in a test (no saves, no workers, no reporting)."""
    from m2ist.trainer import RECTrainingArguments

    values = dict(output_dir=str(output_dir), use_cpu=True, dataloader_num_workers=0, report_to="none",
                  disable_tqdm=True, seed=0, data_seed=0, per_device_train_batch_size=4, learning_rate=1e-3,
                  side_learning_rate=1e-3, save_strategy="no", logging_steps=1)
    values.update(overrides)
    return RECTrainingArguments(**values)


def save_reloadable_adapter(root: Path, tokenizer: Any) -> Path:
    """A tiny ViT + BERT adapter saved with its processor in ``root/adapter``; the towers are saved under ``root``
    first and loaded back, so the adapter re-loads them by path (as it would from the Hub). Returns the folder."""
    from m2ist import RECProcessor, get_side_tuned_model

    vision_tower("vit").save_pretrained(root / "vision")
    text_tower("bert").save_pretrained(root / "text")
    vision, text = T.AutoModel.from_pretrained(root / "vision"), T.AutoModel.from_pretrained(root / "text")
    model = get_side_tuned_model(vision, text, tiny_config())
    model.processor = RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)
    model.save_pretrained(root / "adapter")
    return root / "adapter"
