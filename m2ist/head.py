"""The REC head (TransVG): project both towers' tokens, fuse them with a learned [REG] token, regress one box."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import M2ISTConfig
from .ops.boxes import box_convert, generalized_box_iou


class FusionEncoderLayer(nn.Module):
    """Post-norm transformer layer with the position embedding added to queries and keys (DETR/TransVG style)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, position: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        query = x + position
        attended, _ = self.attention(query, query, x, key_padding_mask=padding, need_weights=False)
        x = self.norm1(x + self.dropout(attended))
        return self.norm2(x + self.dropout(self.ffn(x)))


class RECHead(nn.Module):
    """Vision/text projections, a [REG] token, a learned position embedding over [REG] + text + visual tokens,
    a fusion encoder and an MLP that turns [REG] into a sigmoid ``(cx, cy, w, h)`` box on the input canvas."""

    def __init__(self, config: M2ISTConfig, vision_width: int, text_width: int, num_vision_tokens: int) -> None:
        super().__init__()
        dim = config.fusion_dim
        self.max_query_len = config.max_query_len
        self.num_vision_tokens = num_vision_tokens
        self.vision_proj = nn.Linear(vision_width, dim)
        self.text_proj = nn.Linear(text_width, dim)
        self.reg_token = nn.Embedding(1, dim)
        self.position = nn.Embedding(1 + config.max_query_len + num_vision_tokens, dim)
        self.layers = nn.ModuleList(
            FusionEncoderLayer(dim, config.fusion_heads, config.fusion_ffn_dim, config.fusion_dropout)
            for _ in range(config.fusion_layers)
        )
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
        x = torch.cat([reg, self.text_proj(text_tokens), self.vision_proj(vision_tokens)], dim=1)
        positions = torch.cat([
            torch.arange(1 + text_len, device=x.device),
            torch.arange(1 + self.max_query_len, 1 + self.max_query_len + self.num_vision_tokens, device=x.device),
        ])
        position = self.position(positions)[None]
        valid = torch.cat([torch.ones_like(text_mask[:, :1]), text_mask, vision_mask], dim=1).bool()
        for layer in self.layers:
            x = layer(x, position, ~valid)
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
