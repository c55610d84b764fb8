"""Saving and loading the trainable tensors (side network + head) as safetensors (the card is in ``m2ist.card``)."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .version import __version__

WEIGHTS_NAME = "m2ist_model.safetensors"
#: The processor's settings, saved beside the adapter by ``RECProcessor.save_pretrained``.
PROCESSOR_CONFIG_NAME = "m2ist_processor.json"
#: What a saved processor's tokenizer may consist of (whichever files the tokenizer wrote).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
#: The processor files transformers' ``ProcessorMixin.save_pretrained`` writes (found by ``AutoProcessor``).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
#: Every file an adapter folder may publish: config, weights, card, processor and tokenizer. Pushes upload these
#: only (never optimizer state, training arguments, trainer state or checkpoints).
ADAPTER_FILES = ("m2ist_config.json", WEIGHTS_NAME, "README.md", PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES,
                 *TOKENIZER_FILES)
TRAINABLE_PREFIXES = ("side.", "head.")


@dataclass
class PipelineHooks:
    """How the method layer reaches the REC pipeline without importing it.

    :mod:`m2ist.processing` and :mod:`m2ist.inference` register themselves here when imported (``import m2ist``
    always imports both), so ``SideTunedModel.from_pretrained`` can restore a saved processor and
    ``SideTunedModel.predict`` can run one while the model files never import the pipeline.
    """

    load_processor: Callable[[str], Any] | None = None
    predict: Callable[..., torch.Tensor] | None = None


PIPELINE = PipelineHooks()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place in one step.

    The file gets the permissions a plain ``open(path, "w")`` would give (``0644`` under the usual umask ``022``),
    not the ``0600`` of ``tempfile.mkstemp``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors does) would leave its own 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_trainable_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` (side and head tensors only) to a safetensors file, atomically."""
    tower_keys = [k for k in state if not k.startswith(TRAINABLE_PREFIXES)]
    if tower_keys:
        raise ValueError(f"Refusing to save tower tensors {tower_keys[:3]}: only side and head tensors are saved.")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "m2ist_version": __version__}))


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a truncated or corrupted file into a clear ``ValueError``."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is corrupted or truncated ({err}); nothing was loaded. Save or download it again."
                         ) from err


def load_trainable_state(model: nn.Module, path: Path) -> None:
    """Load the side and head tensors of ``path`` into ``model`` strictly, or raise naming every difference."""
    state = read_safetensors(path)
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{path} does not fit this model ({'; '.join(problems)}). It was saved for another "
                         "configuration or other towers; nothing was loaded.")
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])
