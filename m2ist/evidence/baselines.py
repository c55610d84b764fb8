"""Baselines on the same towers and head, for comparisons: full fine-tuning, in-tower adapters and LoRA.

All three back-propagate through the towers (that is what M²IST avoids):

* ``full``: every tower parameter is trained (TransVG).
* ``adapter``: bottleneck adapters ``x + W_up(ReLU(W_down(x)))`` added after each layer's feed-forward tap,
  inside the frozen towers (the paper's "adapter-tuning" row; PEFT has no bottleneck adapter, so they are
  attached with forward hooks at the tap registry's FFN taps).
* ``lora``: PEFT LoRA on the query and value projections of every tapped layer of both towers.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from m2ist.config import M2ISTConfig
from m2ist.model import METHODS, RECModel, SideTunedModel, _dummy_inputs, get_side_tuned_model
from m2ist.ops.defaults import built_on_cpu_in_float32
from m2ist.taps import get_submodule
from m2ist.towers import without_trailing_padding

QUERY_VALUE_NAMES = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin", "query_proj", "value_proj", "qkv")


class TowerAdapter(nn.Module):
    """A sequential bottleneck adapter on a sub-layer output: ``x + W_up(ReLU(W_down(x)))``, starting at zero."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.relu(self.down(x)))


class BackboneTunedModel(RECModel):
    """Towers in the autograd graph (trained fully, or through in-tower adapters / LoRA) + the REC head."""

    @built_on_cpu_in_float32()
    def __init__(self, vision_model: nn.Module, text_model: nn.Module, config: M2ISTConfig | None = None,
                 method: str = "full", lora_rank: int = 16, lora_alpha: int = 32) -> None:
        if method not in ("full", "adapter", "lora"):
            raise ValueError(f"method must be 'full', 'adapter' or 'lora' (or 'm2ist' via build_model), got {method!r}.")
        super().__init__(vision_model, text_model, M2ISTConfig() if config is None else config)
        self.method = method
        for tower in (self.vision_tower, self.text_tower):
            tower.model.requires_grad_(method == "full")
        self.tower_adapters = nn.ModuleDict()
        if method == "adapter":
            self._add_adapters()
        elif method == "lora":
            self._add_lora(lora_rank, lora_alpha)
        vision_inputs, text_inputs = _dummy_inputs(self.config, vision_model, text_model)
        with torch.no_grad():
            vision, text = self.vision_tower(vision_inputs), self.text_tower(text_inputs)
        self._build_head(vision.tokens.shape[-1], text.tokens.shape[-1], vision.tokens.shape[1])
        self.head.to(vision.tokens.device)

    def _add_adapters(self) -> None:
        for tower in (self.vision_tower, self.text_tower):
            if not tower.layers:
                raise ValueError(f"The adapter baseline needs registered taps; {tower.modality} tower has none.")
            tap = tower.spec.tap("ffn")
            for index, (name, layer) in enumerate(tower.layers):
                module = get_submodule(layer, tap.module, name)
                probe = next(m for m in reversed(list(module.modules())) if isinstance(m, nn.Linear | nn.Conv2d))
                width = probe.out_features if isinstance(probe, nn.Linear) else probe.out_channels
                adapter = TowerAdapter(width, self.config.bottleneck)
                self.tower_adapters[f"{tower.modality}_{index}"] = adapter
                module.register_forward_hook(lambda _m, _a, out, adapter=adapter: _apply(adapter, out))

    def _add_lora(self, rank: int, alpha: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        for tower in (self.vision_tower, self.text_tower):
            layer_names = {name for name, _ in tower.layers}
            targets = [name for name, module in tower.model.named_modules()
                       if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in QUERY_VALUE_NAMES
                       and any(name.startswith(layer + ".") for layer in layer_names)]
            if not targets:
                raise ValueError(f"No query/value projections found in the {tower.modality} tower for LoRA.")
            pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=pattern), tower.model)
            tower.layers = [(n, tower.model.get_submodule(n)) for n, _ in tower.layers]

    def encode(self, pixel_values, pixel_mask, input_ids, attention_mask):
        """Run both towers with gradients, then feed their final outputs to the head (the text without the batch's
        padding columns, as M²IST's head gets it)."""
        vision = self.vision_tower({"pixel_values": pixel_values, "pixel_mask": pixel_mask})
        text = without_trailing_padding(self.text_tower({"input_ids": input_ids, "attention_mask": attention_mask}))
        return vision.tokens.float(), vision.mask, text.tokens.float(), text.mask

    def train(self, mode: bool = True) -> BackboneTunedModel:
        """Train mode for the head; the towers stay in eval mode (frozen BatchNorm, no dropout), as in TransVG."""
        super().train(mode)
        self.vision_model.eval()
        self.text_model.eval()
        return self


def _apply(adapter: nn.Module, output):
    if isinstance(output, tuple):
        return (adapter(output[0]), *output[1:])
    return adapter(output)


def build_model(vision_model: nn.Module, text_model: nn.Module, config: M2ISTConfig | None = None,
                method: str = "m2ist") -> SideTunedModel | BackboneTunedModel:
    """The REC model for ``method`` in ``METHODS`` on the given towers, all with the same head."""
    if method == "m2ist":
        return get_side_tuned_model(vision_model, text_model, config)
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    return BackboneTunedModel(vision_model, text_model, config, method=method)


__all__ = ["METHODS", "BackboneTunedModel", "TowerAdapter", "build_model"]
