"""M³ISA: the Mixture of Multi-Modal Interactive Side-Adapters (the paper's Sec. 3), one depth at a time.

At depth i, with ``f`` a feed-forward tap, ``a`` an attention tap and ``s`` the side streams
(``s_v,0`` = the vision tower's first-layer input, ``s_l,0`` = the text embedding output)::

    VEA_i = σ · W_up,v(ReLU(W_down,v(LN(f_v,i))))                       vision expert (intra-modal)
    LEA_i = σ · W_up,l(ReLU(W_down,l(LN(f_l,i))))                       language expert (intra-modal)
    z_v = ReLU(D_v(a_v,i)),  z_l = ReLU(D_l(a_l,i))
    IEA_v,i = U_s(z_v),  IEA_l,i = [U_l(z_l) ; U_s(z_l)]                interaction expert, U_s shared
    s_v,i = s_v,i-1 + IEA_v,i + VEA_i,   s_l,i = s_l,i-1 + IEA_l,i + LEA_i

``U_s`` writes the ``min(d_v, d_l)`` channels both modalities share; the wider modality's private
up-projection fills its remaining channels (with DETR d_v=256 and BERT d_l=768, ``U_l`` writes 512 channels).
The mixture is a sum: no router. Up-projections start at zero, so the side network starts as the identity on
its seed and the model starts from the frozen towers' features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def make_checkpoint_function(checkpoint_kwargs: Mapping[str, Any] | None = None, offload: bool = False) -> Callable:
    """``torch.utils.checkpoint.checkpoint`` with ``checkpoint_kwargs`` (default ``use_reentrant=False``), keeping
    the saved inputs in host memory when ``offload`` (as transformers' ``activation_checkpointing_enable`` does).

    The reentrant variant (``use_reentrant=True``) sends gradients only through inputs that require grad, and the
    first side block's inputs come from the frozen towers: its parameters, and those of every block before the
    first input that requires grad, would silently get none. As transformers' ``enable_input_require_grads`` does
    for frozen embeddings, such a call gets a copy of its first floating input that requires grad."""
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    reentrant = bool(kwargs["use_reentrant"])
    preserve_rng = bool(kwargs.get("preserve_rng_state", True))

    def run(function: Callable, *args: Any) -> Any:
        if not preserve_rng and isinstance(function, nn.Module):
            dropout = active_dropout(function)
            if dropout is not None:
                raise ValueError(
                    f"Activation checkpointing with preserve_rng_state=False recomputes {dropout} with other random "
                    "masks than the forward pass used, so its gradients would be silently wrong: drop "
                    "preserve_rng_state from the checkpointing kwargs, or set side_dropout and fusion_dropout to 0.")
        if reentrant and not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            first = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            if first is not None:
                args = (*args[:first], args[first].detach().requires_grad_(), *args[first + 1:])
        if not offload:
            return checkpoint(function, *args, **kwargs)
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.autograd.graph.save_on_cpu(pin_memory=device_type != "cpu", device_type=device_type):
            return checkpoint(function, *args, **kwargs)

    return run


def active_dropout(module: nn.Module) -> str | None:
    """The name of a dropout inside ``module`` that draws random masks now (training mode, ``p > 0``), else None:
    an ``nn.Dropout`` or an ``nn.MultiheadAttention``'s attention dropout."""
    for name, sub in module.named_modules():
        p = sub.p if isinstance(sub, nn.modules.dropout._DropoutNd) else \
            sub.dropout if isinstance(sub, nn.MultiheadAttention) else 0.0
        if sub.training and p > 0:
            return f"the dropout {name or type(module).__name__!r} (p={p})"
    return None


def run_layer(owner: nn.Module, index: int, layer: nn.Module, *args: Any) -> Any:
    """``layer(*args)``; recomputed in the backward pass instead of keeping its activations when ``owner`` has
    activation checkpointing on (``owner.checkpoint_function``) for every ``owner.checkpoint_every``-th layer."""
    function = owner.checkpoint_function
    if function is not None and owner.training and torch.is_grad_enabled() and index % owner.checkpoint_every == 0:
        return function(layer, *args)
    return layer(*args)


def _zero_init(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return linear


class IntraModalExpert(nn.Module):
    """VEA / LEA: ``σ · W_up(ReLU(W_down(LN(f))))``, reading a feed-forward tap of width ``in_dim``.

    While training, ``W_down(LN(f))`` is recomputed in the backward pass instead of keeping ``LN(f)`` (as wide as
    the tap) for it: autograd keeps the tap alone, the gradients are the same to the bit, and the recomputation
    (a layer norm and a projection to the bottleneck) is a small part of the step."""

    def __init__(self, in_dim: int, out_dim: int, bottleneck: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.down = nn.Linear(in_dim, bottleneck)
        self.up = _zero_init(nn.Linear(bottleneck, out_dim))
        self.dropout = nn.Dropout(dropout)
        self.scale = scale

    def _down(self, f: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(f))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # nothing random inside, so no RNG state to keep
            h = checkpoint(self._down, f, use_reentrant=False, preserve_rng_state=False)
        else:
            h = self._down(f)
        return self.scale * self.up(self.dropout(F.relu(h)))


class InteractionExpert(nn.Module):
    """IEA: per-modality down-projections and an up-projection ``U_s`` shared by both modalities."""

    def __init__(self, vision_in: int, text_in: int, vision_out: int, text_out: int, bottleneck: int,
                 share_up_projection: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        shared = min(vision_out, text_out)
        self.down_vision = nn.Linear(vision_in, bottleneck)
        self.down_text = nn.Linear(text_in, bottleneck)
        self.up_shared = _zero_init(nn.Linear(bottleneck, shared))
        # without sharing (an ablation) the text stream gets its own copy of the "shared" channels
        self.up_shared_text = None if share_up_projection else _zero_init(nn.Linear(bottleneck, shared))
        self.up_vision_private = _zero_init(nn.Linear(bottleneck, vision_out - shared)) if vision_out > shared else None
        self.up_text_private = _zero_init(nn.Linear(bottleneck, text_out - shared)) if text_out > shared else None
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _up(z: torch.Tensor, shared: nn.Linear, private: nn.Linear | None) -> torch.Tensor:
        return shared(z) if private is None else torch.cat([private(z), shared(z)], dim=-1)

    def forward(self, a_v: torch.Tensor, a_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_v = self.dropout(F.relu(self.down_vision(a_v)))
        z_l = self.dropout(F.relu(self.down_text(a_l)))
        iea_v = self._up(z_v, self.up_shared, self.up_vision_private)
        text_shared = self.up_shared if self.up_shared_text is None else self.up_shared_text
        iea_l = self._up(z_l, text_shared, self.up_text_private)
        return iea_v, iea_l


class M3ISA(nn.Module):
    """One depth of the side network: the sum of the experts in ``experts`` added to both side streams."""

    def __init__(self, *, vision_width: int, text_width: int, vision_intra_in: int, text_intra_in: int,
                 vision_inter_in: int, text_inter_in: int, bottleneck: int, scale: float,
                 experts: list[str], share_up_projection: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.vea = IntraModalExpert(vision_intra_in, vision_width, bottleneck, scale, dropout) \
            if "vea" in experts else None
        self.lea = IntraModalExpert(text_intra_in, text_width, bottleneck, scale, dropout) \
            if "lea" in experts else None
        self.iea = InteractionExpert(vision_inter_in, text_inter_in, vision_width, text_width, bottleneck,
                                     share_up_projection, dropout) if "iea" in experts else None

    def forward(self, s_v: torch.Tensor, s_l: torch.Tensor, f_v: torch.Tensor, f_l: torch.Tensor,
                a_v: torch.Tensor, a_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.iea is not None:
            iea_v, iea_l = self.iea(a_v, a_l)
            s_v, s_l = s_v + iea_v, s_l + iea_l
        if self.vea is not None:
            s_v = s_v + self.vea(f_v)
        if self.lea is not None:
            s_l = s_l + self.lea(f_l)
        return s_v, s_l


class SideNetwork(nn.Module):
    """The side network: seeds, one :class:`M3ISA` per paired depth, and the join ``F = E + s_n``.

    ``vision_dims`` / ``text_dims`` give, per tower, ``width`` (final output), ``seed`` (first-layer input) and,
    per paired layer, the widths of the ``intra`` and ``inter`` taps. A seed narrower or wider than the final
    output (hierarchical towers) gets a trainable linear projection; otherwise the seed is used as it is.
    """

    def __init__(self, *, vision_dims: dict, text_dims: dict, bottleneck: int, scale: float, experts: list[str],
                 share_up_projection: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.vision_seed = nn.Identity() if vision_dims["seed"] == vision_dims["width"] else \
            nn.Linear(vision_dims["seed"], vision_dims["width"])
        self.text_seed = nn.Identity() if text_dims["seed"] == text_dims["width"] else \
            nn.Linear(text_dims["seed"], text_dims["width"])
        self.blocks = nn.ModuleList(
            M3ISA(vision_width=vision_dims["width"], text_width=text_dims["width"],
                  vision_intra_in=v_intra, text_intra_in=l_intra, vision_inter_in=v_inter, text_inter_in=l_inter,
                  bottleneck=bottleneck, scale=scale, experts=experts, share_up_projection=share_up_projection,
                  dropout=dropout)
            for v_intra, l_intra, v_inter, l_inter in zip(vision_dims["intra"], text_dims["intra"],
                                                          vision_dims["inter"], text_dims["inter"], strict=True)
        )
        self.checkpoint_function: Callable | None = None  # set by the model's activation_checkpointing_enable()
        self.checkpoint_every = 1

    def forward(self, vision, text, intra: str, inter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``vision`` / ``text`` are :class:`~m2ist.towers.TowerFeatures`; returns ``(E_v + s_v,n, E_l + s_l,n)``."""
        s_v, s_l = self.vision_seed(vision.seed), self.text_seed(text.seed)
        for i, block in enumerate(self.blocks):
            s_v, s_l = run_layer(self, i, block, s_v, s_l, vision.taps[intra][i], text.taps[intra][i],
                                 vision.taps[inter][i], text.taps[inter][i])
        return vision.tokens + s_v, text.tokens + s_l
