"""Box operations in the style of ``torchvision.ops.boxes``, for (..., 4) tensors.

Formats: ``xyxy`` (corners), ``xywh`` (top-left corner, width, height; COCO), ``cxcywh`` (centre, width,
height; DETR/TransVG regression target). Paired functions compare box ``i`` of one set with box ``i`` of the
other, which is what a one-box-per-expression task needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def as_box_tensor(values: Any) -> torch.Tensor:
    """``values`` (a tensor, an array, or lists of numbers) as a tensor: tensors and arrays keep their dtype, Python
    floats become float32 whatever ``torch.set_default_dtype`` says (bfloat16 would round a 1001-pixel width to 1000)."""
    if isinstance(values, torch.Tensor):
        return values
    tensor = torch.as_tensor(values)
    if tensor.dtype == torch.get_default_dtype() and tensor.dtype != torch.float32 and not isinstance(values, np.ndarray):
        tensor = torch.as_tensor(values, dtype=torch.float32)  # Python floats, read in the default dtype: read again
    return tensor


def box_convert(boxes: torch.Tensor | Any, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Convert ``(..., 4)`` boxes (a tensor, or a list or array of boxes) between ``xyxy``, ``xywh`` and
    ``cxcywh``."""
    for fmt in (in_fmt, out_fmt):
        if fmt not in BOX_FORMATS:
            raise ValueError(f"Unknown box format {fmt!r}; expected one of {BOX_FORMATS}.")
    boxes = as_box_tensor(boxes)
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"box_convert needs boxes of shape (..., 4), four numbers per box, got shape "
                         f"{tuple(boxes.shape)}.")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":
        x0, y0, x1, y1 = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        x0, y0, x1, y1 = a - c / 2, b - d / 2, a + c / 2, b + d / 2
    else:
        x0, y0, x1, y1 = a, b, c, d
    if out_fmt == "xyxy":
        out = (x0, y0, x1, y1)
    elif out_fmt == "xywh":
        out = (x0, y0, x1 - x0, y1 - y0)
    else:
        out = ((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0)
    return torch.stack(out, dim=-1)


def clip_boxes(boxes: torch.Tensor, width: float | torch.Tensor, height: float | torch.Tensor) -> torch.Tensor:
    """Clamp ``xyxy`` boxes to ``[0, width] x [0, height]`` (scalars or per-box tensors)."""
    width = torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device)
    height = torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device)
    x0, y0, x1, y1 = boxes.unbind(-1)
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    return torch.stack(
        (
            torch.minimum(torch.maximum(x0, zero), width),
            torch.minimum(torch.maximum(y0, zero), height),
            torch.minimum(torch.maximum(x1, zero), width),
            torch.minimum(torch.maximum(y1, zero), height),
        ),
        dim=-1,
    )


def looks_normalised(box: Any, width: float, height: float) -> bool:
    """Whether a pixel box (any four coordinates) lies within ``[0, 1]`` in an image larger than 4 pixels each way:
    fractions of the image size read as pixels (a box of one pixel at the top-left corner)."""
    return max(box) <= 1.0 and min(width, height) > 4


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _paired_inter_union(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    top_left = torch.maximum(a[..., :2], b[..., :2])
    bottom_right = torch.minimum(a[..., 2:], b[..., 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter, _area(a) + _area(b) - inter


def paired_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """IoU of ``a[i]`` with ``b[i]`` for ``xyxy`` boxes of shape ``(..., 4)``."""
    inter, union = _paired_inter_union(a, b)
    return inter / union.clamp(min=eps)


def box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """All-pairs IoU, ``(N, 4) x (M, 4) -> (N, M)``, for ``xyxy`` boxes."""
    return paired_box_iou(a[:, None, :], b[None, :, :], eps=eps)


def generalized_box_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Paired generalised IoU (Rezatofighi et al., 2019) of ``xyxy`` boxes, in ``[-1, 1]``."""
    inter, union = _paired_inter_union(a, b)
    iou = inter / union.clamp(min=eps)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return iou - (hull - union) / hull.clamp(min=eps)
