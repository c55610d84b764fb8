"""Saving and loading the trainable tensors (side network + head) as safetensors, and the model card."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import M2ISTConfig
from .version import __version__

WEIGHTS_NAME = "m2ist_model.safetensors"
#: The processor's settings, saved beside the adapter by ``RECProcessor.save_pretrained``.
PROCESSOR_CONFIG_NAME = "m2ist_processor.json"
#: What a saved processor's tokenizer may consist of (whichever files the tokenizer wrote).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
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
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
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


def write_model_card(folder: Path, config: M2ISTConfig, counts: dict[str, int]) -> Path:
    """Write ``README.md`` with Hub metadata (``library_name: m2ist``, both base models, tags) and a summary."""
    base_models = [m for m in (config.vision_model_name_or_path, config.text_model_name_or_path)
                   if m and not os.path.isabs(m) and not m.startswith(".")]
    data = ModelCardData(
        library_name="m2ist",
        license="apache-2.0",
        base_model=base_models or None,
        tags=["m2ist", "side-tuning", "referring-expression-comprehension", "visual-grounding", "peft"],
        pipeline_tag="zero-shot-object-detection",
    )
    total = sum(counts.values())
    body = f"""
# M²IST side adapter

Multi-modal interactive side-tuning (M²IST, arXiv 2407.01131) for referring expression comprehension: both
towers stay frozen; this repository holds only the side network and the REC head ({WEIGHTS_NAME}).

| part | model |
|---|---|
| vision tower (frozen) | `{config.vision_model_name_or_path}` ({config.vision_model_type}) |
| text tower (frozen) | `{config.text_model_name_or_path}` ({config.text_model_type}) |
| side adapters | {counts.get("side", 0):,d} parameters ({100 * counts.get("side", 0) / max(total, 1):.2f}% of the model) |
| REC head | {counts.get("head", 0):,d} parameters |

```python
from m2ist import SideTunedModel
model = SideTunedModel.from_pretrained("<this repo id>")  # re-loads both towers by their recorded names
boxes = model.predict(["image.jpg"], ["the man on the left"])
```
"""
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
    path = folder / "README.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(str(card), encoding="utf-8"))
    return path
