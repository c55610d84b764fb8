"""``--device`` (fault hunt 17): any accelerator torch reports is accepted, not only CUDA and MPS."""

from __future__ import annotations

import pytest
import torch

from m2ist.cli.settings import CLIError, check_device


def test_the_machines_accelerator_is_accepted_whatever_its_kind(monkeypatch):
    """An Intel GPU (xpu) was refused ("m2ist runs on cpu, cuda, cuda:N or mps") though torch runs on it."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args, **kwargs: torch.device("xpu"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    for value in ("cpu", "xpu", "xpu:1"):
        check_device(value)
    with pytest.raises(CLIError, match=r"--device xpu:2: this machine has 2 xpu device\(s\), numbered from 0"):
        check_device("xpu:2")
    with pytest.raises(CLIError, match=r"--device cuda: no CUDA GPU is visible here; use --device cpu or --device xpu"):
        check_device("cuda")
    with pytest.raises(CLIError, match=r"--device meta: m2ist runs on cpu or on this machine's accelerator"):
        check_device("meta")


def test_without_an_accelerator_only_the_cpu_is_accepted(monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    check_device("cpu")
    for value, name in (("cuda", "CUDA GPU"), ("mps", "MPS device"), ("xpu:0", "XPU")):
        with pytest.raises(CLIError, match=rf"--device {value}: no {name} is visible here; use --device cpu\.$"):
            check_device(value)
