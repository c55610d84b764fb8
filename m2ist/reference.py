"""The paper's reference configuration: TransVG-R50 towers (DETR-R50 encoder + BERT-base) with M²IST defaults."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import M2ISTConfig
from .model import SideTunedModel, get_side_tuned_model

REFERENCE_VISION = "facebook/detr-resnet-50"
REFERENCE_TEXT = "bert-base-uncased"


def reference_config(**overrides: Any) -> M2ISTConfig:
    """The paper's settings: 640×640 canvas, query length 20, bottleneck 128, 6 paired depths."""
    return M2ISTConfig(**{"image_size": 640, "max_query_len": 20, **overrides})


def reference_towers(pretrained: bool = True, vision: str = REFERENCE_VISION, text: str = REFERENCE_TEXT,
                     **from_pretrained_kwargs: Any) -> tuple[nn.Module, nn.Module]:
    """``(DetrModel, BertModel)``: from the Hub when ``pretrained``, else random weights of the same shapes.

    Random towers need no network and no timm: DETR's ResNet-50 is built from a transformers ``ResNetConfig``.
    """
    from transformers import AutoModel, BertConfig, BertModel, DetrConfig, DetrModel, ResNetConfig

    if pretrained:
        return (AutoModel.from_pretrained(vision, **from_pretrained_kwargs),
                AutoModel.from_pretrained(text, **from_pretrained_kwargs))
    resnet = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], embedding_size=64,
                          layer_type="bottleneck", out_features=["stage4"])
    detr = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=resnet, d_model=256,
                      encoder_layers=6, decoder_layers=6, encoder_attention_heads=8, decoder_attention_heads=8,
                      encoder_ffn_dim=2048, decoder_ffn_dim=2048)
    return DetrModel(detr), BertModel(BertConfig())  # BertConfig() defaults are bert-base-uncased's shapes


def build_reference_model(pretrained: bool = False, **config_overrides: Any) -> SideTunedModel:
    """The paper's M²IST model on TransVG-R50 towers (random tower weights unless ``pretrained``)."""
    vision, text = reference_towers(pretrained=pretrained)
    return get_side_tuned_model(vision, text, reference_config(**config_overrides))
