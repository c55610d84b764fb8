"""The REC head (TransVG): project both towers' tokens, fuse them with a learned [REG] token, regress one box."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import M2ISTConfig
from .layer import run_layer
from .ops.boxes import box_convert, generalized_box_iou
from .ops.positions import sincos_grid_table


class HeadOutput(NamedTuple):
    """What :class:`RECHead` returns: boxes ``(B, 4)`` as normalised ``(cx, cy, w, h)`` and, for the vote
    readout, [REG]'s attention logits over the patch grid ``(B, h, w)`` (``None`` for the [REG] MLP)."""

    pred_boxes: torch.Tensor
    patch_logits: torch.Tensor | None = None


def masked_pool(scores: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Softmax of ``scores`` ``(B, L)`` over the positions where ``mask`` is True, then the weighted sum of
    ``values`` ``(B, L, d)`` -> ``(B, d)``."""
    weights = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(-1)
    return torch.einsum("bl,bld->bd", weights, values)


def fused_attention(attention: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    padding: torch.Tensor) -> torch.Tensor:
    """``attention``'s multi-head attention (its parameters, ``batch_first``) through
    ``F.scaled_dot_product_attention``: the fused kernel where the device has one (flash / memory-efficient on
    CUDA, with the dropout inside the kernel), one code path whatever ``requires_grad`` says (``nn.MultiheadAttention``
    switches kernels on it, so an adapter's outputs would depend on whether it is the one being trained).
    ``padding`` ``(B, L)`` is True for keys to ignore."""
    heads = attention.num_heads
    w_q, w_k, w_v = attention.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attention.in_proj_bias.chunk(3) if attention.in_proj_bias is not None else (None, None, None)

    def split(x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b l (h d) -> b h l d", h=heads)

    q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v))
    allowed = ~padding[:, None, None, :]
    dropout = attention.dropout if attention.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
    return attention.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class FusionEncoderLayer(nn.Module):
    """Transformer layer with the position embedding added to queries and keys (DETR/TransVG style); post-norm
    (TransVG) or pre-norm."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float, pre_norm: bool = False) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, position: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        if self.pre_norm:
            h = self.norm1(x)
            query = h + position  # one tensor for queries and keys: autograd keeps it once
            attended = fused_attention(self.attention, query, query, h, padding)
            x = x + self.dropout(attended)
            return x + self.dropout(self.ffn(self.norm2(x)))
        query = x + position
        attended = fused_attention(self.attention, query, query, x, padding)
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.ffn(x)))


class ExpressionQuery(nn.Module):
    """``reg_init='text'``: attention-pool the projected expression tokens and map them to [REG]'s start."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.score = nn.Linear(dim, 1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L, d)`` tokens and ``(B, L)`` validity -> ``(B, d)``."""
        return self.proj(masked_pool(self.score(text).squeeze(-1), text_mask, text))


class RereadHop(nn.Module):
    """A further round of the vote readout (``vote_hops > 1``): [REG] takes in the patches it attended to,
    re-reads the expression with an attention conditioned on itself and attends to the patches again, so
    "the circle above the green square" can find the square first and then the circle."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gather = nn.Linear(dim, dim)
        self.text_query = nn.Linear(dim, dim)
        self.text_key = nn.Linear(dim, dim)
        self.text_value = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)

    def forward(self, reg: torch.Tensor, attended: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor) -> torch.Tensor:
        """``reg`` ``(B, d)``, the attention-weighted patch keys ``(B, d)`` and the expression ``(B, L, d)`` with
        validity ``(B, L)`` -> the next [REG] ``(B, d)``."""
        reg = reg + self.gather(attended)
        scores = torch.einsum("bd,bld->bl", self.text_query(reg), self.text_key(text)) / text.shape[-1] ** 0.5
        return reg + self.text_value(masked_pool(scores, text_mask, text))


class BoxVoteReadout(nn.Module):
    """``box_readout='vote'``: each patch token votes for the edges ``(x0, y0, x1, y1)`` of the box under it,
    relative to its cell centre in cell units; [REG]'s attention over the patches (keys carry the positions)
    picks whose votes count.

    Finding the referred object (the attention, taught directly by the point loss of :func:`rec_loss`) and
    reading its extent (the votes) are separate, direct problems, which is what makes this readout learn in a
    few thousand steps where the [REG] MLP needs many epochs. With ``window`` set, only the patches within
    ``window`` cells of the most-attended one vote (re-weighed by the attention), so a hesitation between two
    objects never averages them into a box between them; ``hops > 1`` adds :class:`RereadHop` rounds.
    """

    def __init__(self, dim: int, grid: tuple[int, int], num_prefix_tokens: int, hops: int = 1,
                 window: int | None = None) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.window = window
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.hops = nn.ModuleList(RereadHop(dim) for _ in range(hops - 1))
        self.vote = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))
        height, width = grid
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        centres = torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], dim=-1)
        self.register_buffer("cell_centres", centres.repeat(1, 2), persistent=False)  # (h w, 4) as x y x y
        self.register_buffer("cell_size", torch.tensor([1 / width, 1 / height] * 2), persistent=False)
        self.register_buffer("cell_rows", ys.flatten(), persistent=False)
        self.register_buffer("cell_cols", xs.flatten(), persistent=False)

    @staticmethod
    def _point(query: nn.Linear, key: nn.Linear, reg: torch.Tensor, keys: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
        """[REG]'s attention logits ``(B, N)`` over the patch keys, ``q · (W_k k_n + b_k) / √d`` with ``q`` the
        projected [REG]; invalid patches at the dtype's minimum.

        One query per image, so the key projection is folded into it (``(W_kᵀ q) · k_n + q · b_k``): a ``(B, d)``
        product replaces projecting all ``B × N`` patch keys (the widest matrix product of the readout, forward
        and backward), and autograd keeps the keys alone, which every round shares."""
        q = query(reg)
        logits = (keys @ (q @ key.weight)[..., None])[..., 0]
        if key.bias is not None:
            logits = logits + (q @ key.bias)[:, None]
        logits = logits * keys.shape[-1] ** -0.5
        return logits.masked_fill(~mask, torch.finfo(logits.dtype).min)

    def _voters(self, logits: torch.Tensor) -> torch.Tensor:
        """Attention weights ``(B, N)`` over the patches, restricted to the window around the peak if set."""
        weights = logits.softmax(-1)
        if self.window is None:
            return weights
        peak = weights.argmax(-1, keepdim=True)
        near = ((self.cell_rows - self.cell_rows[peak]).abs() <= self.window) & \
            ((self.cell_cols - self.cell_cols[peak]).abs() <= self.window)
        weights = weights * near
        return weights / weights.sum(-1, keepdim=True)

    def forward(self, reg: torch.Tensor, visual: torch.Tensor, position: torch.Tensor, visual_mask: torch.Tensor,
                text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
                key_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``reg`` ``(B, d)``, visual tokens ``(B, N, d)`` with positions ``(1, N, d)`` and validity ``(B, N)``
        (and, for ``hops > 1``, the expression ``(B, L, d)`` with validity ``(B, L)``) -> boxes ``(B, 4)`` as
        normalised ``(cx, cy, w, h)`` and the last round's attention logits over the patch grid ``(B, h, w)``
        (invalid patches at the dtype's minimum). ``key_tokens`` ``(B, N, d)``: what [REG] points at, if not
        ``visual`` (which always votes)."""
        if self.hops and text is None:
            raise ValueError("A vote readout with more than one hop needs the expression tokens (text, text_mask).")
        start = self.num_prefix_tokens

        def patches(tokens: torch.Tensor) -> torch.Tensor:  # a split's backward fills zeros for the prefix alone
            return tokens.split([start, tokens.shape[1] - start], dim=1)[1]

        patch_tokens = patches(visual)
        keys = patch_tokens if key_tokens is None or key_tokens is visual else patches(key_tokens)
        visual, position, visual_mask = patch_tokens, position[:, start:], visual_mask[:, start:]
        keys = keys + position
        logits = self._point(self.query, self.key, reg, keys, visual_mask)
        for hop in self.hops:
            reg = hop(reg, masked_pool(logits, visual_mask, keys), text, text_mask)
            logits = self._point(hop.query, hop.key, reg, keys, visual_mask)
        edges = self.cell_centres.to(visual.dtype) + self.vote(visual) * self.cell_size.to(visual.dtype)
        boxes = box_convert(torch.einsum("bn,bnc->bc", self._voters(logits), edges), "xyxy", "cxcywh")
        return boxes, rearrange(logits, "b (h w) -> b h w", h=self.grid[0])


class RECHead(nn.Module):
    """Vision/text projections, a [REG] token, a learned position embedding over [REG] + text + visual tokens,
    a fusion encoder and a box readout: an MLP that turns [REG] into a sigmoid ``(cx, cy, w, h)`` box on the
    input canvas (TransVG), or :class:`BoxVoteReadout` (``box_readout='vote'``, needs the visual grid)."""

    def __init__(self, config: M2ISTConfig, vision_width: int, text_width: int, num_vision_tokens: int,
                 vision_grid: tuple[int, int] | None = None, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        dim = config.fusion_dim
        self.max_query_len = config.max_query_len
        self.num_vision_tokens = num_vision_tokens
        self.vision_proj = nn.Linear(vision_width, dim)
        self.text_proj = nn.Linear(text_width, dim)
        self.reg_token = nn.Embedding(1, dim)
        self.position = nn.Embedding(1 + config.max_query_len + num_vision_tokens, dim)
        if config.position_init == "sincos":
            if vision_grid is None or vision_grid[0] * vision_grid[1] + num_prefix_tokens != num_vision_tokens:
                raise ValueError(f"position_init='sincos' needs the visual tokens on a patch grid, but the vision tower "
                                 f"gives {num_vision_tokens} tokens without a known grid ({vision_grid}, "
                                 f"{num_prefix_tokens} prefix tokens): use position_init='random' for this tower.")
            start = 1 + config.max_query_len + num_prefix_tokens
            with torch.no_grad():
                self.position.weight[start:] = sincos_grid_table(*vision_grid, dim)
        self.expression_query = ExpressionQuery(dim) if config.reg_init == "text" else None
        pre_norm = config.fusion_norm == "pre"
        self.layers = nn.ModuleList(
            FusionEncoderLayer(dim, config.fusion_heads, config.fusion_ffn_dim, config.fusion_dropout, pre_norm)
            for _ in range(config.fusion_layers)
        )
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.checkpoint_function = None  # set by the model's activation_checkpointing_enable()
        self.checkpoint_every = 1
        self.box_mlp: nn.Sequential | None = None
        self.box_votes: BoxVoteReadout | None = None
        self.vote_keys = config.vote_keys
        if config.box_readout == "vote":
            if vision_grid is None or vision_grid[0] * vision_grid[1] + num_prefix_tokens != num_vision_tokens:
                raise ValueError(
                    f"box_readout='vote' needs the visual tokens on a patch grid, but the vision tower gives "
                    f"{num_vision_tokens} tokens without a known grid ({vision_grid}, {num_prefix_tokens} prefix "
                    "tokens): use box_readout='reg' for this tower."
                )
            self.box_votes = BoxVoteReadout(dim, vision_grid, num_prefix_tokens, config.vote_hops, config.vote_window)
        else:
            mlp: list[nn.Module] = []
            for i in range(config.box_mlp_layers):
                mlp.append(nn.Linear(dim, 4 if i == config.box_mlp_layers - 1 else dim))
                if i < config.box_mlp_layers - 1:
                    mlp.append(nn.ReLU())
            self.box_mlp = nn.Sequential(*mlp)
        for layer in self.layers:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)

    def forward(self, vision_tokens: torch.Tensor, vision_mask: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor) -> HeadOutput:
        """Boxes ``(B, 4)`` as normalised ``(cx, cy, w, h)`` (and the vote readout's patch logits); masks are True
        for real tokens."""
        batch, text_len = text_tokens.shape[:2]
        if text_len > self.max_query_len:
            raise ValueError(f"The text has {text_len} tokens but the head was built for max_query_len="
                             f"{self.max_query_len}: tokenize with max_length={self.max_query_len}, truncation=True.")
        if vision_tokens.shape[1] != self.num_vision_tokens:
            raise ValueError(f"The vision tower gave {vision_tokens.shape[1]} tokens but the head was built for "
                             f"{self.num_vision_tokens}: feed images of the canvas size the model was built with.")
        reg = self.reg_token.weight.expand(batch, 1, -1)
        text = self.text_proj(text_tokens)
        if self.expression_query is not None:
            reg = reg + self.expression_query(text, text_mask.bool())[:, None]
        projected = self.vision_proj(vision_tokens)
        x = torch.cat([reg, text, projected], dim=1)
        positions = torch.cat([
            torch.arange(1 + text_len, device=x.device),
            torch.arange(1 + self.max_query_len, 1 + self.max_query_len + self.num_vision_tokens, device=x.device),
        ])
        position = self.position(positions)[None]
        valid = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask, vision_mask], dim=1).bool()
        for index, layer in enumerate(self.layers):
            x = run_layer(self, index, layer, x, position, ~valid)
        x = self.final_norm(x)
        if self.box_votes is not None:
            # one split, not three slices: its backward concatenates the parts' gradients where three slices'
            # would each fill a zero tensor of x's size and add them up (the same values; with the readout's
            # own splits, about 20 ms less of the demo's 184 ms step on the tower cache, on 2 CPU cores)
            # each part as its own tensor: the readout keeps its inputs for the backward pass, and views would keep
            # all of x (the linear layers copy a non-contiguous input anyway)
            reg, fused_text, visual = (part.contiguous() for part in
                                       x.split([1, text_len, x.shape[1] - 1 - text_len], dim=1))
            keys = visual if self.vote_keys == "fused" else projected if self.vote_keys == "projected" \
                else projected + visual
            return HeadOutput(*self.box_votes(reg[:, 0], visual, position[:, 1 + text_len:], vision_mask.bool(),
                                              fused_text, text_mask.bool(), key_tokens=keys))
        return HeadOutput(self.box_mlp(x[:, 0]).sigmoid())


def patch_targets(target_boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Where the vote readout should look: ``(B, h, w)`` weights spread evenly over the cells whose centres lie
    inside each normalised ``(cx, cy, w, h)`` box, plus the cell holding the box's centre (so a box smaller than
    a cell still has one)."""
    height, width = grid
    x0, y0, x1, y1 = box_convert(target_boxes, "cxcywh", "xyxy").unbind(-1)
    ys = (torch.arange(height, device=target_boxes.device, dtype=target_boxes.dtype) + 0.5) / height
    xs = (torch.arange(width, device=target_boxes.device, dtype=target_boxes.dtype) + 0.5) / width
    inside_rows = (ys >= y0[:, None]) & (ys <= y1[:, None])
    inside_cols = (xs >= x0[:, None]) & (xs <= x1[:, None])
    inside = (inside_rows[:, :, None] & inside_cols[:, None, :]).to(target_boxes.dtype)
    rows = (target_boxes[:, 1] * height).long().clamp(0, height - 1)
    cols = (target_boxes[:, 0] * width).long().clamp(0, width - 1)
    inside[torch.arange(len(target_boxes), device=target_boxes.device), rows, cols] = 1
    return inside / inside.sum((1, 2), keepdim=True)


def rec_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, config: M2ISTConfig,
             patch_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """TransVG's loss on normalised ``(cx, cy, w, h)`` boxes: weighted coordinate loss + weighted ``1 - GIoU``,
    each summed over a box's coordinates and averaged over the batch. Given the vote readout's ``patch_logits``
    ``(B, h, w)``, adds ``config.point_loss_weight`` × the cross-entropy between [REG]'s attention and
    :func:`patch_targets` (``loss_point``).

    The loss is computed in float32 at least, whatever the predictions' dtype (a bfloat16 or float16 head, mixed
    precision): the labels are never rounded to the predictions' precision, where a small box's GIoU and an error
    of a thousandth of the canvas would vanish."""
    if pred_boxes.ndim != 2 or pred_boxes.shape[-1] != 4 or tuple(target_boxes.shape) != tuple(pred_boxes.shape):
        raise ValueError(f"rec_loss needs one (cx, cy, w, h) target box per predicted box: got predictions of shape "
                         f"{tuple(pred_boxes.shape)} and targets of shape {tuple(target_boxes.shape)}; pass both as "
                         "(batch, 4) (a single box is never broadcast over the batch).")
    dtype = torch.promote_types(pred_boxes.dtype, torch.float32)
    pred_boxes, target_boxes = pred_boxes.to(dtype), target_boxes.to(dtype)
    if config.box_loss == "l1":
        coord = F.l1_loss(pred_boxes, target_boxes, reduction="none")
    else:
        coord = F.smooth_l1_loss(pred_boxes, target_boxes, reduction="none", beta=config.smooth_l1_beta)
    coord = coord.sum(-1).mean()
    giou = (1 - generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                                    box_convert(target_boxes, "cxcywh", "xyxy"))).mean()
    loss = config.box_loss_weight * coord + config.giou_loss_weight * giou
    losses = {"loss": loss, "loss_box": coord.detach(), "loss_giou": giou.detach()}
    if patch_logits is not None:
        logits = rearrange(patch_logits, "b h w -> b (h w)")
        valid = logits > torch.finfo(logits.dtype).min / 2  # the readout sets masked patches to its dtype's minimum
        logits = logits.to(torch.promote_types(logits.dtype, dtype))  # after the test: float16's minimum is no
        # minimum in float32
        targets = rearrange(patch_targets(target_boxes.to(logits.dtype), tuple(patch_logits.shape[1:])),
                            "b h w -> b (h w)") * valid
        targets = targets / targets.sum(-1, keepdim=True).clamp(min=torch.finfo(logits.dtype).tiny)
        point = -(targets * logits.log_softmax(-1).masked_fill(~valid, 0)).sum(-1).mean()
        losses["loss"] = loss + config.point_loss_weight * point
        losses["loss_point"] = point.detach()
    return losses
