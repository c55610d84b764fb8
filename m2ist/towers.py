"""Running a frozen tower and reading its taps.

:class:`Tower` wraps one Hugging Face model with its :class:`~m2ist.taps.TapSpec`. ``tower(inputs)`` returns the
final tokens and their mask; ``tower.tap(inputs, layers, kinds)`` also returns, for the requested layers, the
attention / feed-forward outputs and the first layer's input (the side stream's seed), all as ``(B, N, C)``
tokens on the final output's grid. Hierarchical towers (Swin, ConvNeXt) change grid and width per stage: every
tap is average-pooled to the last stage's grid and keeps its own width (the adapters' down-projections absorb it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .taps import TOKENS, TapSpec, find_layers, get_submodule

VISION, TEXT = "vision", "text"


@dataclass
class TowerFeatures:
    """What one tower gives the side network and the head.

    Attributes:
        tokens: the tower's final output ``E``, ``(B, N, C)``.
        mask: ``(B, N)`` bool, True for real tokens (False for text or image padding).
        seed: the first layer's input (the side stream's start), ``(B, N, C0)``; None when not tapped.
        taps: ``{kind: [tensor per requested layer]}``, each ``(B, N, C_i)``.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    seed: torch.Tensor | None = None
    taps: dict[str, list[torch.Tensor]] = field(default_factory=dict)


def _first_tensor(output: Any) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the hidden states."""
    return output[0] if isinstance(output, tuple | list) else output


def to_tokens(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``x`` in ``layout`` (an einops pattern) as ``(B, N, C)`` tokens, plus its grid when the layout has one.

    A 4-D tensor given as plain tokens is read as ``(B, C, H, W)``, the convention of Hugging Face CNN outputs.
    """
    if layout == TOKENS and x.dim() == 4:
        layout = "b c h w"
    if layout == TOKENS:
        return x, None
    grid_axes = dict(zip(layout.split(), x.shape))
    return rearrange(x, f"{layout} -> b (h w) c"), (grid_axes["h"], grid_axes["w"])


def infer_grid(num_tokens: int, aspect: float) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``num_tokens`` patch tokens for an ``h / w`` aspect ratio."""
    height = max(1, round(math.sqrt(num_tokens * aspect)))
    width = num_tokens // height
    if height * width != num_tokens:
        raise ValueError(f"Cannot lay {num_tokens} tokens on a grid of aspect {aspect:.3f}.")
    return height, width


def split_prefix(num_tokens: int, aspect: float, max_prefix: int = 8) -> tuple[int, tuple[int, int]]:
    """The smallest number of prefix tokens (CLS, registers) that leaves a patch grid of ``aspect``, and that grid."""
    for prefix in range(min(max_prefix, num_tokens - 1) + 1):
        with contextlib.suppress(ValueError):
            return prefix, infer_grid(num_tokens - prefix, aspect)
    raise ValueError(f"{num_tokens} visual tokens do not form a patch grid of aspect {aspect:.3f} after up to {max_prefix} "
                     "prefix tokens; give num_prefix_tokens in the tower's taps.")


def resample_tokens(x: torch.Tensor, grid: tuple[int, int] | None, target: torch.Tensor, target_grid,
                    prefix: int) -> torch.Tensor:
    """Bring tap ``x`` to the final output's token layout by average-pooling its grid to ``target_grid``."""
    if x.shape[1] == target.shape[1] and (grid is None or grid == target_grid):
        return x
    if prefix or target_grid is None:
        raise ValueError(
            f"A tap has {x.shape[1]} tokens but the final output has {target.shape[1]}; resampling needs a patch grid "
            "without prefix tokens. Tap layers whose token count matches the output."
        )
    grid = grid or infer_grid(x.shape[1], target_grid[0] / target_grid[1])
    x = rearrange(x, "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    return rearrange(F.adaptive_avg_pool2d(x, target_grid), "b c h w -> b (h w) c")


class Tower:
    """A frozen Hugging Face tower with its tap spec. Not an ``nn.Module``: the owner registers the model."""

    def __init__(self, model: nn.Module, spec: TapSpec, modality: str) -> None:
        if modality not in (VISION, TEXT):
            raise ValueError(f"modality must be 'vision' or 'text', got {modality!r}.")
        self.model, self.spec, self.modality = model, spec, modality
        self.layers = [] if spec.uses_hidden_states else find_layers(model, spec)
        self.num_prefix_tokens = spec.num_prefix_tokens(model.config) if modality == VISION else 0

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tower's floating-point parameters."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    # --------------------------------------------------------------------------------------------------------
    def _run(self, inputs: dict[str, torch.Tensor], hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Forward the tower; return tokens ``(B, N, C)``, mask ``(B, N)`` and the raw output."""
        if self.modality == TEXT:
            out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                             output_hidden_states=hidden_states, return_dict=True)
            tokens = out.last_hidden_state
            mask = inputs.get("attention_mask")
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
            return tokens, mask, out
        pixel_values = inputs["pixel_values"].to(self.dtype)
        pixel_mask = inputs.get("pixel_mask")
        if self.spec.encode is not None and not hidden_states:
            tokens, mask = self.spec.encode(self.model, pixel_values=pixel_values, pixel_mask=pixel_mask)
            return tokens, mask, None
        out = self.model(pixel_values=pixel_values, output_hidden_states=hidden_states, return_dict=True)
        tokens, grid = to_tokens(out.last_hidden_state, self.spec.layer_layout)
        if grid is not None and self.num_prefix_tokens is None:
            self.num_prefix_tokens = 0
        grid = grid or self.grid_of(tokens.shape[1], pixel_values.shape[-2:])
        return tokens, self.token_mask(pixel_mask, tokens, grid), out

    def token_mask(self, pixel_mask: torch.Tensor | None, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Validity of each visual token: prefix tokens are valid, patch tokens follow the downsampled pixel mask."""
        batch, num_tokens = tokens.shape[:2]
        if pixel_mask is None:
            return torch.ones((batch, num_tokens), dtype=torch.bool, device=tokens.device)
        patches = F.interpolate(pixel_mask[:, None].float(), size=grid, mode="nearest")[:, 0] > 0.5
        prefix = torch.ones((batch, self.num_prefix_tokens), dtype=torch.bool, device=tokens.device)
        return torch.cat([prefix, patches.flatten(1)], dim=1)

    def grid_of(self, num_tokens: int, image_hw) -> tuple[int, int] | None:
        """The patch grid of ``num_tokens`` final tokens (vision only); infers the prefix count on first use if
        unknown."""
        if self.modality == TEXT:
            return None
        aspect = image_hw[0] / image_hw[1]
        if self.num_prefix_tokens is None:
            self.num_prefix_tokens, grid = split_prefix(num_tokens, aspect)
            return grid
        return infer_grid(num_tokens - self.num_prefix_tokens, aspect)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> TowerFeatures:
        """Final tokens and mask, with gradients if the caller enables them (used by the baselines)."""
        tokens, mask, _ = self._run(inputs, hidden_states=False)
        return TowerFeatures(tokens=tokens, mask=mask)

    # --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def tap(self, inputs: dict[str, torch.Tensor], layers: list[int], kinds: list[str]) -> TowerFeatures:
        """Run the frozen tower under ``no_grad`` and return its output with the requested taps.

        ``no_grad`` (not ``inference_mode``) so the taps can feed trainable adapters; nothing inside the tower
        is kept for backward. Taps are returned in float32 whatever the tower's dtype.
        """
        captured: dict[tuple[str, int] | str, tuple[torch.Tensor, Any]] = {}
        handles = []
        if self.layers:
            for index in layers:
                if index >= len(self.layers):
                    raise ValueError(f"{self.modality} layer {index} requested, the tower has {len(self.layers)}.")
                name, layer = self.layers[index]
                for kind in kinds:
                    tap = self.spec.tap(kind)
                    module = get_submodule(layer, tap.module, name)
                    handles.append(module.register_forward_hook(
                        lambda _m, _a, out, key=(kind, index), layout=tap.layout:
                        captured.__setitem__(key, to_tokens(_first_tensor(out), layout))))
            handles.append(self.layers[0][1].register_forward_pre_hook(
                lambda _m, args, kwargs: captured.__setitem__(
                    "seed", to_tokens(args[0] if args else kwargs["hidden_states"], self.spec.layer_layout)),
                with_kwargs=True))
        try:
            tokens, mask, out = self._run(inputs, hidden_states=not self.layers)
        finally:
            for handle in handles:
                handle.remove()
        if not self.layers:
            states = getattr(out, self.spec.hidden_states_key)
            captured["seed"] = to_tokens(states[0], self.spec.layer_layout)
            for index in layers:
                if index + 1 >= len(states):
                    raise ValueError(f"{self.modality} layer {index} requested, the tower has {len(states) - 1}.")
                for kind in kinds:
                    captured[(kind, index)] = to_tokens(states[index + 1], self.spec.layer_layout)
        image_hw = inputs["pixel_values"].shape[-2:] if self.modality == VISION else None
        grid = self.grid_of(tokens.shape[1], image_hw)

        def aligned(key) -> torch.Tensor:
            x, x_grid = captured[key]
            return resample_tokens(x, x_grid, tokens, grid, self.num_prefix_tokens).float()

        return TowerFeatures(
            tokens=tokens.float(), mask=mask, seed=aligned("seed"),
            taps={kind: [aligned((kind, index)) for index in layers] for kind in kinds},
        )

    def depth(self) -> int | None:
        """Number of tappable layers (None until measured for the ``output_hidden_states`` fallback)."""
        return len(self.layers) if self.layers else None
