"""The tap registry: the one place that knows Hugging Face towers' module names.

M²IST reads, inside every layer of a frozen tower, the output of the attention sub-layer (read by the
interaction expert, IEA) and of the feed-forward sub-layer (read by the intra-modal experts, VEA/LEA). A
:class:`TapSpec` says where those sub-modules are for one ``config.model_type``; :data:`TAP_REGISTRY` maps model
types to specs. Towers the registry does not know fall back to layer-output taps through
``output_hidden_states`` (both experts then read the layer output), or take explicit names from
``M2ISTConfig.vision_taps`` / ``text_taps``.

Layouts are einops patterns over ``b`` (batch), ``n`` (tokens), ``c`` (channels), ``h``/``w`` (grid), so a
convolutional tower's ``(B, C, H, W)`` maps are read as tokens with one rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

TOKENS = "b n c"


@dataclass(frozen=True)
class Tap:
    """A sub-module (path relative to one layer; ``""`` is the layer itself) and the layout of its output."""

    module: str
    layout: str = TOKENS


@dataclass(frozen=True)
class TapSpec:
    """Where a tower's per-layer activations are, and how to run the tower.

    Attributes:
        layers: glob patterns of the layer modules, tried in order; the first that matches wins (module names
            move between transformers versions). Empty means "use ``output_hidden_states``".
        attention: the attention sub-layer output inside a layer.
        ffn: the feed-forward sub-layer output inside a layer.
        layer_layout: layout of a layer's input and output and of the tower's final output.
        num_prefix_tokens: tokens before the patch grid (CLS, distillation, register tokens); ``None`` infers
            the smallest count that leaves a patch grid of the image's aspect.
        encode: a custom forward ``(model, **inputs) -> (tokens, token_mask | None)`` for towers whose own
            forward does more than the encoder (DETR runs a decoder that REC does not use).
        hidden_states_key: output field holding per-layer states for the ``output_hidden_states`` fallback.
        unused_modules: sub-modules the REC path never runs (DETR's decoder, poolers); they are left out of the
            parameter counts.
        note: a line for documentation (what is tapped, and any approximation).
    """

    layers: tuple[str, ...] = ()
    attention: Tap | None = None
    ffn: Tap | None = None
    layer_layout: str = TOKENS
    num_prefix_tokens: Callable[[Any], int | None] = field(default=lambda config: None)
    encode: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
    hidden_states_key: str = "hidden_states"
    unused_modules: tuple[str, ...] = ()
    note: str = ""

    @property
    def uses_hidden_states(self) -> bool:
        """True when the taps come from ``output_hidden_states`` rather than forward hooks."""
        return not self.layers

    def tap(self, kind: str) -> Tap:
        """The tap for ``kind`` in {'attention', 'ffn', 'layer'}, falling back to the layer output."""
        chosen = {"attention": self.attention, "ffn": self.ffn}.get(kind)
        return chosen if chosen is not None else Tap("", self.layer_layout)


VISION_TAPS: dict[str, TapSpec] = {}
TEXT_TAPS: dict[str, TapSpec] = {}
TAP_REGISTRY: dict[str, dict[str, TapSpec]] = {"vision": VISION_TAPS, "text": TEXT_TAPS}


def register_taps(modality: str, model_types: Iterable[str], spec: TapSpec) -> TapSpec:
    """Register ``spec`` for each of ``model_types`` (``config.model_type`` values) of ``modality``."""
    if modality not in TAP_REGISTRY:
        raise ValueError(f"modality must be 'vision' or 'text', got {modality!r}.")
    for model_type in model_types:
        TAP_REGISTRY[modality][model_type] = spec
    return spec


def supported_model_types(modality: str) -> list[str]:
    """The ``model_type`` values with registered taps for ``modality``."""
    return sorted(TAP_REGISTRY[modality])


def tap_spec_from_dict(values: dict[str, Any]) -> TapSpec:
    """A spec from explicit names: ``{'layers': glob, 'attention': name, 'ffn': name, 'layout': pattern,
    'num_prefix_tokens': int}`` (without ``num_prefix_tokens`` the count is inferred from the token grid)."""
    layout = values.get("layout", TOKENS)
    prefix = values.get("num_prefix_tokens")
    layers = values["layers"]
    return TapSpec(
        layers=(layers,) if isinstance(layers, str) else tuple(layers),
        attention=Tap(values["attention"], layout) if values.get("attention") is not None else None,
        ffn=Tap(values["ffn"], layout) if values.get("ffn") is not None else None,
        layer_layout=layout,
        num_prefix_tokens=lambda config: prefix,
        note="explicit taps",
    )


def resolve_tap_spec(model: nn.Module, modality: str, override: dict[str, Any] | None = None) -> TapSpec:
    """The spec for ``model``: explicit names, else the registry, else the ``output_hidden_states`` fallback.

    Raises ``ValueError`` naming the supported model types when the model can be tapped in none of these ways.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if override is not None:
        return tap_spec_from_dict(override)
    if model_type in TAP_REGISTRY[modality]:
        return TAP_REGISTRY[modality][model_type]
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "output_hidden_states"):
        return TapSpec(note=f"fallback: layer outputs of an unregistered '{model_type}' via output_hidden_states")
    raise ValueError(
        f"Cannot tap the {modality} tower {type(model).__name__} (model_type={model_type!r}): it is not in the tap "
        f"registry ({', '.join(supported_model_types(modality))}) and does not return hidden states. Pass explicit "
        f"tap names, e.g. M2ISTConfig({modality}_taps={{'layers': 'encoder.layer.*', 'attention': 'attention', "
        f"'ffn': 'output.dense'}}), or register a TapSpec with m2ist.taps.register_taps()."
    )


def _glob(pattern: str) -> re.Pattern[str]:
    """A module-name glob in which ``*`` stands for one dotted component."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")


def find_layers(model: nn.Module, spec: TapSpec) -> list[tuple[str, nn.Module]]:
    """The layer modules matched by the first of ``spec.layers`` that matches, in forward order."""
    named = dict(model.named_modules())
    for pattern in spec.layers:
        regex = _glob(pattern)
        matches = [(name, module) for name, module in named.items() if regex.match(name)]
        if matches:
            return matches
    raise ValueError(
        f"None of the layer patterns {list(spec.layers)} matches a module of {type(model).__name__}. Its top-level "
        f"modules are {[n for n in named if n and '.' not in n]}; pass explicit tap names in M2ISTConfig."
    )


def get_submodule(layer: nn.Module, path: str, layer_name: str) -> nn.Module:
    """``layer.get_submodule(path)`` with an error that lists what the layer has."""
    try:
        return layer.get_submodule(path) if path else layer
    except AttributeError as err:
        children = [n for n, _ in layer.named_modules() if n]
        raise ValueError(f"Layer {layer_name!r} has no sub-module {path!r}; it has {children}.") from err


# --------------------------------------------------------------------------------------------------------------
# Custom forwards
# --------------------------------------------------------------------------------------------------------------
def detr_encode(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, **_: Any):
    """DETR without its decoder: CNN backbone -> 1x1 input projection -> transformer encoder (TransVG's visual
    branch). Returns the encoder's tokens and their validity mask (from the downsampled pixel mask)."""
    batch, _, height, width = pixel_values.shape
    if pixel_mask is None:
        pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)
    feature_map, mask = model.backbone(pixel_values, pixel_mask)[-1]
    tokens = model.input_projection(feature_map).flatten(2).transpose(1, 2)
    position = model.position_embedding(shape=feature_map.shape, device=pixel_values.device,
                                        dtype=tokens.dtype, mask=mask).flatten(2).transpose(1, 2)
    encoded = model.encoder(inputs_embeds=tokens, attention_mask=mask.flatten(1),
                            spatial_position_embeddings=position)
    return encoded.last_hidden_state, mask.flatten(1).bool()


# --------------------------------------------------------------------------------------------------------------
# Vision towers
# --------------------------------------------------------------------------------------------------------------
def _cls_token_only(config: Any) -> int:
    return 1


def _no_prefix_tokens(config: Any) -> int:
    return 0


register_taps("vision", ["detr"], TapSpec(
    layers=("encoder.layers.*",), attention=Tap("self_attn"), ffn=Tap("mlp"), encode=detr_encode,
    hidden_states_key="encoder_hidden_states", unused_modules=("decoder", "query_position_embeddings"),
    num_prefix_tokens=_no_prefix_tokens,
    note="DETR encoder (ResNet + input projection + encoder; decoder skipped): raw self-attention and FFN outputs",
))
register_taps("vision", ["vit"], TapSpec(
    layers=("layers.*", "encoder.layer.*"), attention=Tap("attention"), ffn=Tap("mlp"), num_prefix_tokens=_cls_token_only,
    unused_modules=("pooler",),
    note="ViT: attention and MLP sub-layer outputs; CLS first",
))
register_taps("vision", ["deit"], TapSpec(
    layers=("layers.*", "encoder.layer.*"), attention=Tap("attention"), ffn=Tap("mlp"),
    num_prefix_tokens=lambda config: 2, unused_modules=("pooler",), note="DeiT: like ViT, CLS and distillation tokens first",
))
register_taps("vision", ["clip_vision_model", "siglip_vision_model"], TapSpec(
    layers=("encoder.layers.*", "vision_model.encoder.layers.*"), attention=Tap("self_attn"), ffn=Tap("mlp"),
    num_prefix_tokens=lambda config: 0 if config.model_type.startswith("siglip") else 1,
    note="CLIP/SigLIP vision: self-attention and MLP outputs",
))
register_taps("vision", ["dinov2", "dinov2_with_registers"], TapSpec(
    layers=("encoder.layer.*", "layers.*"), attention=Tap("attention"), ffn=Tap("mlp"),
    num_prefix_tokens=lambda config: 1 + getattr(config, "num_register_tokens", 0),
    note="DINOv2: attention and MLP outputs before layer scale; CLS (+ registers) first",
))
register_taps("vision", ["swin", "swinv2"], TapSpec(
    layers=("encoder.layers.*.blocks.*",), attention=Tap("layernorm_after"), ffn=Tap("mlp"), num_prefix_tokens=_no_prefix_tokens,
    note="Swin: the raw attention output is windowed, so the IEA reads the normalised post-attention stream "
         "(layernorm_after); stages are pooled to the last stage's grid",
))
register_taps("vision", ["convnext", "convnextv2"], TapSpec(
    layers=("encoder.stages.*.layers.*",), attention=Tap("dwconv", "b c h w"), ffn=Tap("pwconv2", "b h w c"),
    layer_layout="b c h w", num_prefix_tokens=_no_prefix_tokens,
    note="ConvNeXt: depth-wise conv (token mixer) as the attention tap, pwconv2 as the FFN tap; stages pooled to "
         "the last stage's grid",
))

# --------------------------------------------------------------------------------------------------------------
# Text towers
# --------------------------------------------------------------------------------------------------------------
_BERT_LIKE = TapSpec(
    layers=("encoder.layer.*",), attention=Tap("attention.output"), ffn=Tap("output.dense"), unused_modules=("pooler",),
    note="BERT family: attention block output after its LayerNorm, FFN output dense before the residual",
)
register_taps("text", ["bert", "roberta", "xlm-roberta", "deberta-v2", "deberta", "electra", "camembert"],
              _BERT_LIKE)
register_taps("text", ["distilbert"], replace(
    _BERT_LIKE, layers=("transformer.layer.*",), attention=Tap("attention"), ffn=Tap("ffn"),
    note="DistilBERT: attention and FFN outputs before the residual"))
register_taps("text", ["clip_text_model", "siglip_text_model"], TapSpec(
    layers=("encoder.layers.*", "text_model.encoder.layers.*"), attention=Tap("self_attn"), ffn=Tap("mlp"),
    note="CLIP text: self-attention and MLP outputs",
))
