"""Exact memory accounting: what autograd keeps for backward, and where it was kept.

Used by the tests (nothing is saved inside a frozen tower) and by the benchmarks (saved bytes of each method).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class SavedTensorStats:
    """Tensors autograd packed for backward during a ``with`` block.

    Attributes:
        bytes: bytes of the distinct storages packed (a storage saved twice counts once), leaving out the storages
            of the ``exclude`` tensors (a model's parameters, which autograd saves by reference and which are
            counted once, as parameters).
        count: number of pack events.
        inside: pack events that happened while a watched module's forward was running, by watch name.
    """

    bytes: int = 0
    count: int = 0
    inside: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def saved_tensor_accounting(watch: dict[str, nn.Module] | None = None,
                            exclude: Iterable[torch.Tensor] = ()) -> Iterator[SavedTensorStats]:
    """Count the tensors autograd saves for backward, and how many were saved inside each module of ``watch``.

    A saved tensor whose storage is one of ``exclude``'s (pass ``model.parameters()``: a linear layer saves its
    weight, or a view of it, for the input's gradient) adds no bytes: it is no new memory, and counting it here as
    well as among the parameters would charge the methods that back-propagate through the towers twice for them.
    """
    stats = SavedTensorStats(inside={name: 0 for name in watch or {}})
    storages: set[tuple[int, torch.device]] = {_storage_key(t) for t in exclude}
    active: list[str] = []
    handles = []
    for name, module in (watch or {}).items():
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: active.append(name)))
        handles.append(module.register_forward_hook(lambda *_, name=name: active.remove(name), always_call=True))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        stats.count += 1
        for name in set(active):
            stats.inside[name] += 1
        key = _storage_key(tensor)
        if key not in storages:
            storages.add(key)
            stats.bytes += tensor.untyped_storage().nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield stats
    finally:
        for handle in handles:
            handle.remove()


def _storage_key(tensor: torch.Tensor) -> tuple[int, torch.device]:
    return tensor.untyped_storage().data_ptr(), tensor.device


def _distinct_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors`` (a storage two tensors share counts once)."""
    seen: dict[tuple[int, torch.device], int] = {}
    for tensor in tensors:
        seen.setdefault(_storage_key(tensor), tensor.untyped_storage().nbytes())
    return sum(seen.values())


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                         optimizer_slots: int = 2) -> dict[str, int]:
    """Bytes of parameters, of gradients and of optimizer state for ``model``.

    With ``optimizer`` (after at least one step), what is actually held: the gradients present (a trainable
    parameter off the forward path, such as a pooler or DETR's decoder in full fine-tuning, gets none) and the
    optimizer's state tensors. Without it, a prediction: a gradient and ``optimizer_slots`` state tensors (AdamW's
    two moments) of each parameter's size for every parameter with ``requires_grad``. Storages are counted once.
    """
    parameters = list(model.parameters())
    params = _distinct_bytes(parameters)
    if optimizer is None:
        trainable = _distinct_bytes(p for p in parameters if p.requires_grad)
        return {"parameters": params, "gradients": trainable, "optimizer": optimizer_slots * trainable}
    if not optimizer.state:
        raise ValueError("training_state_bytes: the optimizer holds no state yet; take a step before measuring it.")
    gradients = _distinct_bytes(p.grad for p in parameters if p.grad is not None)
    state = _distinct_bytes(value for slots in optimizer.state.values() for value in slots.values()
                            if isinstance(value, torch.Tensor))
    return {"parameters": params, "gradients": gradients, "optimizer": state}
