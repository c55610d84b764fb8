"""Fixed position tables."""

from __future__ import annotations

import math

import torch
from einops import rearrange


def sincos_grid_table(height: int, width: int, dim: int) -> torch.Tensor:
    """``(height * width, dim)`` 2-D sine-cosine features of a patch grid, rows in raster order.

    Half of the channels encode the row, half the column: cell centres ``u = (i + 0.5) / n`` in ``[0, 1]`` at
    ``dim // 4`` frequencies ``f`` spaced geometrically from half a cycle across the grid (whose cosine is monotonic
    in ``u``: "how far left") to ``n / 2`` cycles (a period of two cells), as ``sin(2π f u)`` and ``cos(2π f u)``;
    leftover channels are zero.
    """
    if height < 1 or width < 1 or dim < 4:
        raise ValueError(f"Need a grid of at least 1 x 1 and dim >= 4, got {height} x {width} and dim={dim}.")
    quarter = dim // 4

    def axis(cells: int) -> torch.Tensor:
        centres = (torch.arange(cells, dtype=torch.float64) + 0.5) / cells
        top = max(1.0, cells / 2)  # cycles across the grid: from 1/2 to one per cell
        cycles = 0.5 * (2 * top) ** (torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1))
        angles = math.pi * 2 * centres[:, None] * cycles[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (cells, 2 quarter)

    rows, cols = axis(height), axis(width)
    table = torch.cat([rows[:, None].expand(-1, width, -1), cols[None].expand(height, -1, -1)], dim=-1)
    table = rearrange(table, "h w c -> (h w) c")
    return torch.nn.functional.pad(table, (0, dim - table.shape[1])).float()
