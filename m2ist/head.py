"""The REC head (TransVG): project both towers' tokens, fuse them with a learned [REG] token, regress one box."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import M2ISTConfig
from .ops.boxes import box_convert, generalized_box_iou


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
            attended, _ = self.attention(h + position, h + position, h, key_padding_mask=padding, need_weights=False)
            x = x + self.dropout(attended)
            return x + self.dropout(self.ffn(self.norm2(x)))
        query = x + position
        attended, _ = self.attention(query, query, x, key_padding_mask=padding, need_weights=False)
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
        scores = self.score(text).squeeze(-1).masked_fill(~text_mask, torch.finfo(text.dtype).min)
        return self.proj(torch.einsum("bl,bld->bd", scores.softmax(-1), text))


class BoxVoteReadout(nn.Module):
    """``box_readout='vote'``: each patch token votes for the edges ``(x0, y0, x1, y1)`` of the box under it,
    relative to its cell centre in cell units; [REG]'s attention over the patches (keys carry the positions)
    weighs the votes into one box.

    Finding the referred object (attention) and reading its extent (the votes) are then separate, direct
    problems, which is what makes this readout learn in a few thousand steps where the [REG] MLP needs many
    epochs.
    """

    def __init__(self, dim: int, grid: tuple[int, int], num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.vote = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 4))
        height, width = grid
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        centres = torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], dim=-1)
        self.register_buffer("cell_centres", centres.repeat(1, 2), persistent=False)  # (h w, 4) as x y x y
        self.register_buffer("cell_size", torch.tensor([1 / width, 1 / height] * 2), persistent=False)

    def forward(self, reg: torch.Tensor, visual: torch.Tensor, position: torch.Tensor,
                visual_mask: torch.Tensor) -> torch.Tensor:
        """``reg`` ``(B, d)``, visual tokens ``(B, N, d)`` with positions ``(1, N, d)`` and validity ``(B, N)``
        -> boxes ``(B, 4)`` as normalised ``(cx, cy, w, h)``."""
        start = self.num_prefix_tokens
        visual, position, visual_mask = visual[:, start:], position[:, start:], visual_mask[:, start:]
        logits = torch.einsum("bd,bnd->bn", self.query(reg), self.key(visual + position)) / visual.shape[-1] ** 0.5
        weights = logits.masked_fill(~visual_mask, torch.finfo(logits.dtype).min).softmax(-1)
        edges = self.cell_centres.to(visual.dtype) + self.vote(visual) * self.cell_size.to(visual.dtype)
        return box_convert(torch.einsum("bn,bnc->bc", weights, edges), "xyxy", "cxcywh")


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
        self.expression_query = ExpressionQuery(dim) if config.reg_init == "text" else None
        pre_norm = config.fusion_norm == "pre"
        self.layers = nn.ModuleList(
            FusionEncoderLayer(dim, config.fusion_heads, config.fusion_ffn_dim, config.fusion_dropout, pre_norm)
            for _ in range(config.fusion_layers)
        )
        self.final_norm = nn.LayerNorm(dim) if pre_norm else nn.Identity()
        self.box_mlp: nn.Sequential | None = None
        self.box_votes: BoxVoteReadout | None = None
        if config.box_readout == "vote":
            if vision_grid is None or vision_grid[0] * vision_grid[1] + num_prefix_tokens != num_vision_tokens:
                raise ValueError(
                    f"box_readout='vote' needs the visual tokens on a patch grid, but the vision tower gives "
                    f"{num_vision_tokens} tokens without a known grid ({vision_grid}, {num_prefix_tokens} prefix "
                    "tokens): use box_readout='reg' for this tower."
                )
            self.box_votes = BoxVoteReadout(dim, vision_grid, num_prefix_tokens)
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
                text_mask: torch.Tensor) -> torch.Tensor:
        """Boxes ``(B, 4)`` as normalised ``(cx, cy, w, h)``; masks are True for real tokens."""
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
        x = torch.cat([reg, text, self.vision_proj(vision_tokens)], dim=1)
        positions = torch.cat([
            torch.arange(1 + text_len, device=x.device),
            torch.arange(1 + self.max_query_len, 1 + self.max_query_len + self.num_vision_tokens, device=x.device),
        ])
        position = self.position(positions)[None]
        valid = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask, vision_mask], dim=1).bool()
        for layer in self.layers:
            x = layer(x, position, ~valid)
        x = self.final_norm(x)
        if self.box_votes is not None:
            return self.box_votes(x[:, 0], x[:, 1 + text_len:], position[:, 1 + text_len:], vision_mask.bool())
        return self.box_mlp(x[:, 0]).sigmoid()


def rec_loss(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, config: M2ISTConfig) -> dict[str, torch.Tensor]:
    """TransVG's loss on normalised ``(cx, cy, w, h)`` boxes: weighted coordinate loss + weighted ``1 - GIoU``,
    each summed over a box's coordinates and averaged over the batch."""
    target_boxes = target_boxes.to(pred_boxes.dtype)
    if config.box_loss == "l1":
        coord = F.l1_loss(pred_boxes, target_boxes, reduction="none")
    else:
        coord = F.smooth_l1_loss(pred_boxes, target_boxes, reduction="none", beta=config.smooth_l1_beta)
    coord = coord.sum(-1).mean()
    giou = (1 - generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                                    box_convert(target_boxes, "cxcywh", "xyxy"))).mean()
    loss = config.box_loss_weight * coord + config.giou_loss_weight * giou
    return {"loss": loss, "loss_box": coord.detach(), "loss_giou": giou.detach()}
