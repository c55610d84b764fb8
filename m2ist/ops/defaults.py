"""Shield m2ist's own tensors from torch's process-wide defaults (``torch.set_default_dtype``,
``torch.set_default_device``), which a user may have set for other work. Both context managers also decorate."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def on_cpu() -> Iterator[None]:
    """Create tensors on the CPU inside, whatever ``torch.set_default_device`` says (nothing to do, and a few
    microseconds, when it says the CPU)."""
    if torch.get_default_device().type == "cpu":
        yield
        return
    with torch.device("cpu"):
        yield


@contextlib.contextmanager
def built_on_cpu_in_float32() -> Iterator[None]:
    """Build modules in float32 on the CPU inside, whatever torch's default dtype and device: the side network and
    head train in float32 and are saved so (the dtype ``from_pretrained`` loads by default), and are initialised from
    the CPU generator wherever the towers are, then moved to them. The default dtype is restored on exit."""
    previous = torch.get_default_dtype()
    if previous != torch.float32:
        torch.set_default_dtype(torch.float32)
    try:
        with on_cpu():
            yield
    finally:
        if previous != torch.float32:
            torch.set_default_dtype(previous)
