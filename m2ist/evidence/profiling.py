"""Exact memory accounting: what autograd keeps for backward, and where it was kept.

Used by the tests (nothing is saved inside a frozen tower) and by the benchmarks (saved bytes of each method).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SavedTensorStats:
    """Tensors autograd packed for backward during a ``with`` block.

    Attributes:
        bytes: bytes of the distinct storages packed (a storage saved twice counts once).
        count: number of pack events.
        inside: pack events that happened while a watched module's forward was running, by watch name.
    """

    bytes: int = 0
    count: int = 0
    inside: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def saved_tensor_accounting(watch: dict[str, nn.Module] | None = None) -> Iterator[SavedTensorStats]:
    """Count the tensors autograd saves for backward, and how many were saved inside each module of ``watch``."""
    stats = SavedTensorStats(inside={name: 0 for name in watch or {}})
    storages: set[tuple[int, torch.device]] = set()
    active: list[str] = []
    handles = []
    for name, module in (watch or {}).items():
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: active.append(name)))
        handles.append(module.register_forward_hook(lambda *_, name=name: active.remove(name), always_call=True))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        stats.count += 1
        for name in set(active):
            stats.inside[name] += 1
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), tensor.device)
        if key not in storages:
            storages.add(key)
            stats.bytes += storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield stats
    finally:
        for handle in handles:
            handle.remove()


def training_state_bytes(model: nn.Module, optimizer_slots: int = 2) -> dict[str, int]:
    """Bytes of parameters, of gradients and of AdamW state (``optimizer_slots`` fp32 tensors per trainable
    parameter) for ``model``."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"parameters": params, "gradients": trainable, "optimizer": optimizer_slots * trainable}
