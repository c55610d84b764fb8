"""`SideTunedModel`: two frozen Hugging Face towers, the M³ISA side network and the REC head.

```
vision tower (frozen) ──taps──┐
                              ├─ M³ISA side network (VEA, LEA, IEA per depth) ─┐
text tower (frozen) ───taps───┘                                               ├─ REC head ([REG] fusion → box)
                        towers' final outputs ─────────────────────────────────┘
```
"""

from __future__ import annotations

import contextvars
import copy
import dataclasses
import fnmatch
import glob
import json
import logging
import os
import shutil
import unicodedata
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers.utils import ModelOutput

from .card import CARD_NAME, EVAL_RESULTS_NAME, write_model_card
from .config import CONFIG_NAME, M2ISTConfig, check_flags, describe_value
from .head import RECHead, rec_loss
from .layer import SideNetwork, make_checkpoint_function
from .ops.defaults import built_on_cpu_in_float32
from .provenance import _load_recorded_tower, _warn_if_other_tower, tower_identity
from .save_and_load import (
    ALL_ADAPTERS,
    OWNED_FILES,
    PIPELINE,
    PROCESSOR_CONFIG_NAME,
    PROCESSOR_FILES,
    RESERVED_ADAPTER_NAMES,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    _read_header,
    adapter_name_problem,
    check_folder_unchanged,
    folder_identity,
    load_trainable_state,
    owned_entries,
    processor_setting_differences,
    processor_settings,
    save_folder_atomically,
    save_trainable_state,
    trainable_counts,
)
from .taps import TapReport, resolve_tap_spec
from .towers import TEXT, VISION, Tower, TowerFeatures, TowerLayoutError, unwrap_tower, without_trailing_padding

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Config fields that ``SideTunedModel.from_pretrained`` lets a caller change (runtime settings, not architecture).
LOAD_OVERRIDES = ("backbone_dtype", "side_dropout", "fusion_dropout")
#: Training methods a REC model can carry (``model.method``): M²IST, and the baselines of
#: :mod:`m2ist.evidence.baselines` (full fine-tuning, in-tower adapters, LoRA) that share its head.
METHODS = ("m2ist", "full", "adapter", "lora")
#: Which SideTunedModels hold each tower module (casting a shared tower changes every holder).
_TOWER_HOLDERS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()
#: The adapter being loaded by ``from_pretrained`` (None when building a new model): what was refused when it was
#: trained is only warned about when it is loaded.
_LOADING: contextvars.ContextVar[str | None] = contextvars.ContextVar("m2ist_loading", default=None)
#: The adapter built with the model, saved at the root of the adapter folder (others go into ``<name>/``).
DEFAULT_ADAPTER = "default"
#: PEFT's name for "no adapter"; a REC model has no output without one, so it is refused as a name.
BASE_ADAPTER = "__base__"
#: Where the adapters that are not active live in the module tree (and in ``state_dict()``).
INACTIVE_PREFIX = "inactive_adapters."


@dataclass
class AdapterSetup:
    """What one adapter reads from the towers: its config, its paired layers and its two tap kinds."""

    config: M2ISTConfig
    vision_layers: list[int]
    text_layers: list[int]
    intra_kind: str
    inter_kind: str
    #: the values of ``M2ISTConfig.BUILD_FIELDS`` the adapter was built with (a later change to ``config`` is refused
    #: at save: the modules would not follow it)
    built: dict[str, Any] = field(default_factory=dict)

    def changed_build_fields(self) -> list[str]:
        """``"field: built value -> config's value"`` for each build field changed in ``config`` since."""
        return [f"{name}: {value!r} -> {getattr(self.config, name)!r}" for name, value in self.built.items()
                if getattr(self.config, name) != value]

    @property
    def tap_kinds(self) -> list[str]:
        """The tap kinds it reads (sorted, no duplicates)."""
        return sorted({self.intra_kind, self.inter_kind})


@dataclass
class TowerFeatureSet:
    """Both towers' features for a batch, tapped at ``vision_layers`` / ``text_layers`` (the union of what the
    adapters that will read them need): what :meth:`SideTunedModel.tower_features` returns and what a
    :class:`m2ist.cache.TowerFeatureCache` stores. Everything in it is a pure function of the inputs."""

    vision: TowerFeatures
    text: TowerFeatures
    vision_layers: list[int] = field(default_factory=list)
    text_layers: list[int] = field(default_factory=list)

    def select(self, modality: str, layers: list[int], kinds: list[str]) -> TowerFeatures:
        """One tower's features restricted to ``layers`` (in that order) and ``kinds``."""
        features, have = (self.vision, self.vision_layers) if modality == VISION else (self.text, self.text_layers)
        if layers == have and set(kinds) == set(features.taps):
            return features
        missing = [layer for layer in layers if layer not in have]
        absent = [kind for kind in kinds if kind not in features.taps]
        if missing or absent:
            raise ValueError(f"These {modality} features were tapped at layers {have} with kinds {sorted(features.taps)}; "
                             f"the adapter needs layers {missing} / kinds {absent} too. Compute them with "
                             "tower_features(..., adapter_names=[...]) naming every adapter that reads them.")
        positions = [have.index(layer) for layer in layers]
        return TowerFeatures(tokens=features.tokens, mask=features.mask, seed=features.seed,
                             taps={kind: [features.taps[kind][i] for i in positions] for kind in kinds})

    def index(self, rows: torch.Tensor) -> TowerFeatureSet:
        """The features of the samples ``rows`` (a 1-D index tensor)."""

        def pick(features: TowerFeatures) -> TowerFeatures:
            return TowerFeatures(tokens=features.tokens[rows], mask=features.mask[rows],
                                 seed=None if features.seed is None else features.seed[rows],
                                 taps={kind: [t[rows] for t in taps] for kind, taps in features.taps.items()})

        return TowerFeatureSet(pick(self.vision), pick(self.text), self.vision_layers, self.text_layers)


class _AdapterView:
    """An inactive adapter's ``ModuleDict(side=..., head=...)`` seen as a model with ``trainable_state_dict``
    (the keys are the ones the active adapter has: ``side.*``, ``head.*``)."""

    def __init__(self, modules: nn.Module) -> None:
        self.modules = modules

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.modules.state_dict())


@dataclass
class RECModelOutput(ModelOutput):
    """Output of a REC model: ``pred_boxes`` ``(B, 4)`` normalised ``(cx, cy, w, h)``, for the vote readout
    ``patch_logits`` ``(B, h, w)`` ([REG]'s attention over the patch grid) and, with labels, the losses."""

    loss: torch.Tensor | None = None
    pred_boxes: torch.Tensor | None = None
    patch_logits: torch.Tensor | None = None
    loss_box: torch.Tensor | None = None
    loss_giou: torch.Tensor | None = None
    loss_point: torch.Tensor | None = None


def pair_layers(config: M2ISTConfig, vision_depth: int, text_depth: int) -> list[tuple[int, int]]:
    """The ``(vision_layer, text_layer)`` pairs that carry an M³ISA block (0-based)."""
    if config.vision_layers is not None:
        for name, layers, depth in (("vision_layers", config.vision_layers, vision_depth),
                                    ("text_layers", config.text_layers, text_depth)):
            if max(layers) >= depth:
                raise ValueError(f"M2ISTConfig.{name}={layers} names layer {max(layers)}, but the tower has {depth} "
                                 f"layers (0..{depth - 1}).")
        return list(zip(config.vision_layers, config.text_layers))
    shallow = min(vision_depth, text_depth)
    if config.layer_pairing == "first":
        return [(i, i) for i in range(shallow)]
    deep = max(vision_depth, text_depth)
    spread = [round((k + 1) * deep / shallow) - 1 for k in range(shallow)]
    return list(zip(spread, range(shallow))) if vision_depth >= text_depth else list(zip(range(shallow), spread))


def _dummy_inputs(config: M2ISTConfig, vision_model: nn.Module, text_model: nn.Module) -> tuple[dict, dict]:
    """Probe inputs at the canvas size and query length: random pixels and token ids (fixed seed, so no two
    sub-layer outputs coincide by accident), no padding."""
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    device = next(vision_model.parameters()).device
    vision = {"pixel_values": torch.randn(1, 3, size, size, generator=generator).to(device),
              "pixel_mask": torch.ones(1, size, size, dtype=torch.long, device=device)}
    length = config.max_query_len
    vocab = max(2, min(int(getattr(text_model.config, "vocab_size", None) or 2), 1000))
    device = next(text_model.parameters()).device
    text = {"input_ids": torch.randint(1, vocab, (1, length), generator=generator).to(device),
            "attention_mask": torch.ones(1, length, dtype=torch.long, device=device)}
    return vision, text


_PROCESSOR_HINT = "prepare the batch with the adapter's processor (model(**processor(images, texts)))"


@torch.compiler.disable  # reads values: runs eagerly under torch.compile, without a graph-break warning
def check_model_inputs(pixel_values: Any, input_ids: Any, attention_mask: Any = None, pixel_mask: Any = None, *,
                       image_size: int, max_query_len: int, vocab_size: int | None = None) -> None:
    """Refuse, in one line naming the input and the fix, a batch the towers would misread silently or fail on deep
    inside: images not ``(B, C, image_size, image_size)`` floats (channels-last, raw 0-255 bytes, another canvas
    size, whose edge a ViT would silently crop or whose tokens the head would misplace), token ids that are not a
    ``(B, L)`` integer tensor within the text tower's vocabulary and ``max_query_len``, image and text batches of
    different sizes, non-finite pixels, masks of another shape, with values other than 0 and 1, a text mask padded
    on the left (the processor pads on the right; positions would shift) or a sample with no token or no pixel left.
    Everything is read back from the device at once (one synchronisation)."""
    for name, value in (("pixel_values", pixel_values), ("input_ids", input_ids)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(value).__name__}: {_PROCESSOR_HINT}.")
    for name, value in (("attention_mask", attention_mask), ("pixel_mask", pixel_mask)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}: {_PROCESSOR_HINT}.")
    canvas = (image_size, image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[-2:]) != canvas:
        shape = tuple(pixel_values.shape)
        hint = (" (channels last? use pixel_values.permute(0, 3, 1, 2))" if pixel_values.dim() == 4
                and shape[1:3] == canvas and shape[3] <= 4 else "")
        raise ValueError(f"pixel_values must be (batch, channels, {image_size}, {image_size}): the model's canvas is "
                         f"{image_size}x{image_size} pixels (image_size), got {shape}{hint}; {_PROCESSOR_HINT}, "
                         f"whose canvas_size is {image_size}.")
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values are {str(pixel_values.dtype).removeprefix('torch.')}, not normalised floats "
                         f"(raw 0-255 pixels?); {_PROCESSOR_HINT}.")
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a (batch, length) tensor of integer token ids, got {tuple(input_ids.shape)} "
                         f"{str(input_ids.dtype).removeprefix('torch.')}; {_PROCESSOR_HINT}.")
    if input_ids.dtype not in (torch.int64, torch.int32):  # the embedding takes no other; a cast there wrapped ids
        raise ValueError(f"input_ids are {str(input_ids.dtype).removeprefix('torch.')} but token ids must be int64 (or "
                         "int32): a narrower type holds no id past its range (uint8: 255), so a cast to it may have "
                         "changed them; tokenize again, or pass the processor's input_ids as they are (int64).")
    batch = pixel_values.shape[0]
    if batch == 0 or input_ids.shape[0] == 0:
        raise ValueError("Empty batch: pass at least one image and one expression.")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids hold no token (shape {tuple(input_ids.shape)}): an expression says nothing; "
                         f"{_PROCESSOR_HINT}.")
    if input_ids.shape[0] != batch:
        raise ValueError(f"pixel_values hold {batch} images but input_ids {input_ids.shape[0]} expressions: a batch pairs "
                         "each expression with one image (repeat an image for several expressions).")
    if input_ids.shape[1] > max_query_len:
        raise ValueError(f"The text has {input_ids.shape[1]} tokens but the head was built for max_query_len="
                         f"{max_query_len}: tokenize with max_length={max_query_len}, truncation=True.")
    for name, mask, shape, like in (("attention_mask", attention_mask, tuple(input_ids.shape), "as input_ids"),
                                    ("pixel_mask", pixel_mask, (batch, *canvas), "one value per pixel")):
        if mask is not None and tuple(mask.shape) != shape:
            raise ValueError(f"{name} must have the shape {shape} ({like}), got {tuple(mask.shape)}; {_PROCESSOR_HINT}.")
    # per sample: [0] values other than 0 / 1, [1] nothing left (all zeros), [2] a token after padding (left padding)
    problems = {name: _mask_problems(mask, ordered=name == "attention_mask")
                for name, mask in (("attention_mask", attention_mask), ("pixel_mask", pixel_mask)) if mask is not None}
    finite = torch.isfinite(pixel_values).all().long().to(input_ids.device).reshape(1)  # read with the rest: one sync
    found = torch.cat([torch.stack([input_ids.min(), input_ids.max()]).long(), finite,
                       *(p.any(1).long().to(input_ids.device) for p in problems.values())]).tolist()
    low, high = found[:2]
    if not found[2]:
        row = int((~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(f"pixel_values[{row}] hold NaN or infinite values (a broken image or normalisation, such as "
                         f"image_std 0): every box of the batch would be NaN; {_PROCESSOR_HINT}.")
    if isinstance(vocab_size, int) and (high >= vocab_size or low < 0):
        raise ValueError(_outside_vocabulary(input_ids, attention_mask, vocab_size, low, high))
    for offset, (name, per_sample) in zip(range(3, len(found), 3), problems.items(), strict=True):
        for index, kind in enumerate(_MASK_PROBLEMS):
            if found[offset + index]:
                row = int(per_sample[index].nonzero()[0, 0])
                raise ValueError(f"{name}[{row}] holds {kind}; {_PROCESSOR_HINT}.")


def pad_past_vocabulary(pad: int, rows: int, token: str | None = None) -> str:
    """The one wording of a pad token past the text tower's embedding (``rows`` ids), shared by
    :func:`check_model_inputs` (``token`` unknown: the ids are all it sees) and ``RECProcessor.check_fits``."""
    subject = (f"The tokenizer's pad token {token!r} (id {pad}) lies past" if token is not None
               else f"input_ids pad with token id {pad}, past")
    return (f"{subject} the text tower's vocabulary (ids 0..{rows - 1}): it was added to the tokenizer "
            "(tokenizer.add_special_tokens({'pad_token': ...}) on a tokenizer without one, such as GPT-2's) and the "
            "tower has no embedding for it. Use an existing token as pad (tokenizer.pad_token = tokenizer.eos_token) "
            "and build the processor again.")


def _outside_vocabulary(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int, low: int,
                        high: int) -> str:
    """The refusal of token ids outside ``0..vocab_size - 1``: when they all sit where ``attention_mask`` is 0, they
    are padding, and the pad token was added to the tokenizer past the vocabulary (GPT-2 and LLaMA have none)."""
    outside = (input_ids >= vocab_size) | (input_ids < 0)
    if attention_mask is not None and not bool((outside & (attention_mask.to(outside.device) != 0)).any()):
        return pad_past_vocabulary(int(input_ids[outside][0]), vocab_size)
    return (f"input_ids hold token ids outside the text tower's vocabulary (0..{vocab_size - 1}; got {low}..{high}): "
            "the tokenizer does not belong to this text tower, or tokens were added to it (add_special_tokens, a new "
            "BOS/EOS or template token) that the tower has no embedding for. Use the processor saved with the adapter, "
            "or the tower's own tokenizer unchanged.")


def text_embedding_rows(text_model: nn.Module) -> tuple[int | None, int | None]:
    """``(rows, padding_idx)`` of the text tower's input embedding: the ids it can embed (``0..rows - 1``; its
    ``config.vocab_size`` when the embedding cannot be found) and the id it reserves for padding (``None``: none)."""
    try:
        embedding = text_model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embedding = None
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings, embedding.padding_idx
    vocab_size = getattr(getattr(text_model, "config", None), "vocab_size", None)
    return (vocab_size if isinstance(vocab_size, int) else None), None


#: What :func:`_mask_problems` finds, in its order.
_MASK_PROBLEMS = ("values other than 0 and 1",
                  "only zeros: a sample with nothing in it (an empty expression or image)",
                  "padding before a token (padded on the left, as decoder tokenizers do): the towers and the head read "
                  "positions from the left, so the boxes would depend on the padding; pad on the right "
                  "(tokenizer.padding_side = 'right')")


def _mask_problems(mask: torch.Tensor, ordered: bool) -> torch.Tensor:
    """``(3, B)`` bool: per sample, whether ``mask`` holds values other than 0 and 1, only zeros, and (``ordered``:
    a text mask) a 1 after a 0."""
    on = (mask != 0).flatten(1)
    left = on[:, 1:] & ~on[:, :-1] if ordered else torch.zeros_like(on[:, :1])
    return torch.stack([((mask != 0) & (mask != 1)).flatten(1).any(1), ~on.any(1), left.any(1)])


def as_returned(output: RECModelOutput, return_dict: bool | None) -> RECModelOutput | tuple:
    """transformers' convention: ``return_dict`` None (the default) or True gives the output object, False its
    tuple; text is refused (``"False"`` is a true value)."""
    if return_dict is None:
        return output
    check_flags("forward", return_dict=return_dict)
    return output if return_dict else output.to_tuple()


@torch.compiler.disable  # reads values: runs eagerly under torch.compile, without a graph-break warning
def check_labels(labels: Any, batch: int) -> None:
    """Refuse labels that are not one normalised ``(cx, cy, w, h)`` box per sample, ``(B, 4)`` with finite values in
    [0, 1], ``w, h > 0`` and the box within the canvas (``xyxy`` or ``xywh`` boxes read as ``cx, cy, w, h`` mostly
    reach outside it), in one line naming the sample: a ``(4,)`` or ``(1, 4)`` box would be broadcast over the
    batch, and ``xyxy`` or pixel boxes give a loss that trains towards nonsense. Non-finite values are left to
    the trainer (``NonFiniteTrainingError`` names the step)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a tensor of (cx, cy, w, h) boxes, got {type(labels).__name__}.")
    if tuple(labels.shape) != (batch, 4):
        raise ValueError(f"labels must be ({batch}, 4): one normalised (cx, cy, w, h) box per sample of the batch, got "
                         f"{tuple(labels.shape)} (a box of another shape would be broadcast over the batch).")
    values = labels.detach().double()
    bad = (values < -_LABEL_SLACK) | (values > 1 + _LABEL_SLACK)
    bad[:, 2:] |= values[:, 2:] <= 0
    bad &= torch.isfinite(values)
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0, 0])
        raise ValueError(f"labels[{row}] = {[round(v, 4) for v in values[row].tolist()]} is not a (cx, cy, w, h) box "
                         "normalised by the canvas (values in [0, 1], w and h > 0): pixel or xyxy boxes? The "
                         "processor's labels are normalised; processor.boxes_to_labels converts xyxy pixel boxes.")
    half = values[:, 2:] / 2  # a label is a box on the canvas: the processor clips boxes to the image
    outside = ((values[:, :2] - half < -_LABEL_SLACK) | (values[:, :2] + half > 1 + _LABEL_SLACK)).any(1)
    outside &= torch.isfinite(values).all(1)
    if bool(outside.any()):
        row = int(outside.nonzero()[0, 0])
        raise ValueError(f"labels[{row}] = {[round(v, 4) for v in values[row].tolist()]} read as (cx, cy, w, h) reaches "
                         f"outside the canvas, as {int(outside.sum())} of {batch} labels do: xyxy or xywh boxes given as "
                         "cx, cy, w, h? The processor's labels are normalised (cx, cy, w, h) on the canvas; "
                         "processor.boxes_to_labels converts xyxy pixel boxes, m2ist.ops.boxes.box_convert other layouts.")


#: Rounding allowed around [0, 1] in labels (boxes clipped to the image, then normalised in float32).
_LABEL_SLACK = 1e-4


def check_build_arguments(vision_model: Any, text_model: Any, config: Any) -> None:
    """Refuse, in one line saying what was passed and the call that works, towers that are not torch modules and a
    config that is not an :class:`M2ISTConfig` instance (a PEFT ``LoraConfig``, a dict, the class itself), which
    would otherwise fail deep inside the build with an unrelated message (or, for an empty dict, silently give the
    default settings)."""
    for modality, tower in ((VISION, vision_model), (TEXT, text_model)):
        if not isinstance(tower, nn.Module):
            raise TypeError(f"{modality}_model must be a loaded torch model (e.g. AutoModel.from_pretrained(...)), got "
                            f"{describe_value(tower)}; the call is get_side_tuned_model(vision_model, text_model, config).")
    if not isinstance(config, M2ISTConfig):
        hint = ("call it: M2ISTConfig()" if config is M2ISTConfig else
                "build one with M2ISTConfig(**values) or M2ISTConfig.from_dict(values)" if isinstance(config, Mapping)
                else "m2ist's settings are an M2ISTConfig(...), not another library's config")
        raise TypeError(f"config must be an M2ISTConfig instance, got {describe_value(config)}: {hint}.")


class RECModel(nn.Module):
    """Two towers and a REC head; subclasses decide how the towers' features reach the head."""

    #: the training method (one of :data:`METHODS`); set by each subclass
    method: str | None = None

    @built_on_cpu_in_float32()  # whatever torch.set_default_dtype / set_default_device the user set
    def __init__(self, vision_model: nn.Module, text_model: nn.Module, config: M2ISTConfig) -> None:
        super().__init__()
        check_build_arguments(vision_model, text_model, config)
        config = dataclasses.replace(config)  # never mutate the caller's config
        self.config = config
        self.tower_classes = {VISION: type(vision_model).__name__, TEXT: type(text_model).__name__}
        identities = {VISION: tower_identity(vision_model), TEXT: tower_identity(text_model)}
        self.tower_ids = {modality: (name, commit) for modality, (name, commit, _) in identities.items()}
        for modality, (name, _, why) in identities.items():
            if why and getattr(config, f"{modality}_revision") is None:
                logger.warning("The %s tower %r was loaded by Hub id, but from which commit cannot be told: %s. The "
                               "adapter records no commit, so a reload takes the repo's latest; pin it with "
                               "M2ISTConfig(%s_revision='<commit>').", modality, name, why, modality)
        vision_model, text_model = unwrap_tower(vision_model, VISION), unwrap_tower(text_model, TEXT)
        config._text_tower_config = getattr(text_model, "config", None)  # for config.get_text_config(); never saved
        if config.image_size is None:
            native = getattr(vision_model.config, "image_size", None) or 640
            config.image_size = int(native[0] if isinstance(native, list | tuple) else native)
        self.vision_model = vision_model
        self.text_model = text_model
        specs = resolve_tap_spec(vision_model, VISION, config.vision_taps), \
            resolve_tap_spec(text_model, TEXT, config.text_taps)
        positions = getattr(text_model.config, "max_position_embeddings", None)
        if isinstance(positions, int) and 0 < positions < config.max_query_len:
            raise ValueError(f"M2ISTConfig.max_query_len={config.max_query_len} exceeds the text tower's "
                             f"{positions} positions ({type(text_model).__name__}): use max_query_len <= {positions}.")
        vision_inputs, text_inputs = _dummy_inputs(config, vision_model, text_model)
        vision_model.eval()  # the probes (structural search) need deterministic towers: no dropout
        text_model.eval()
        with torch.no_grad():
            self.vision_tower = Tower(vision_model, specs[0], VISION, vision_inputs, config.vision_taps)
            self.text_tower = Tower(text_model, specs[1], TEXT, text_inputs, config.text_taps)
            self._check_canvas_seen(vision_inputs)
        self._tap_reports: tuple[TapReport, ...] = ()
        self.processor = None  # a RECProcessor, used by predict() and saved with the adapter when set

    @property
    def processor(self) -> Any:
        """The :class:`~m2ist.processing.RECProcessor` that ``predict`` and ``evaluate`` use and ``save_pretrained``
        saves with the adapter (``None``: none attached). Setting one checks that it fits the model (its
        ``check_fits``: canvas, query length, the tokenizer against the text tower) and refuses one that does not."""
        return self.__dict__.get("_processor")

    @processor.setter
    def processor(self, processor: Any) -> None:
        self.attach_processor(processor)

    def attach_processor(self, processor: Any, *, saved: bool = False) -> None:
        """Set :attr:`processor` once its ``check_fits(model, saved=saved)`` passes (``saved``: the processor the
        adapter was saved with, so a normalisation other than the vision tower's own is what it was trained with)."""
        check = getattr(processor, "check_fits", None)
        if callable(check):
            check(self, saved=saved)
        self.__dict__["_processor"] = processor

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy; a model pickled before :attr:`processor` was a property keeps its processor."""
        if "processor" in state:
            state["_processor"] = state.pop("processor")
        super().__setstate__(state)

    def text_embedding(self) -> tuple[int | None, int | None]:
        """``(rows, padding_idx)`` of the text tower's input embedding (see :func:`text_embedding_rows`): what a
        processor's tokenizer is checked against."""
        return text_embedding_rows(self.text_model)

    def _check_canvas_seen(self, vision_inputs: dict[str, torch.Tensor]) -> None:
        """Refuse a canvas whose last pixel row and column the vision tower never sees (a ViT's patches, a
        ConvNeXt's stem, that do not divide ``image_size`` leave its edge out): the labels and the head's grid span the
        whole canvas, so every box would be slightly off and an object at the edge unseen. A tower at its own
        ``config.image_size`` is used as its makers designed it and is not probed. When loading an adapter trained
        this way (``from_pretrained``), only a warning."""
        size = self.config.image_size
        if self.vision_tower.native_size == (size, size):
            return
        try:
            plain = self.vision_tower(vision_inputs).tokens
            pixels = vision_inputs["pixel_values"].clone()
            pixels[..., -1, :] += 1
            pixels[..., :, -1] += 1
            moved = self.vision_tower({**vision_inputs, "pixel_values": pixels}).tokens
        except Exception:  # a tower that fails here fails the probe that follows, with its own message
            return
        if not torch.equal(plain, moved):
            return
        patch = getattr(self.vision_model.config, "patch_size", None)
        patch = patch[0] if isinstance(patch, list | tuple) and patch else patch
        try:
            rows = self.vision_tower.grid_of(plain.shape[1], (size, size))[0]
        except (ValueError, TypeError):
            rows = None
        # the tower's stride: its patch when the grid is the patches' (a ViT), else the canvas over the grid
        stride = patch if isinstance(patch, int) and patch > 1 and size // patch == rows else \
            size // rows if rows else None
        fix = (f"use an image_size that its {stride}-pixel stride divides, e.g. {size // stride * stride} or "
               f"{(size // stride + 1) * stride}" if stride and stride > 1 else "use an image_size its stride divides")
        message = (f"The vision tower ({type(self.vision_model).__name__}) never sees the last pixel row and column of "
                   f"the {size}x{size} canvas (image_size={size}): boxes are normalised by the whole canvas, so they "
                   f"would be off and objects at its edge unseen; {fix}.")
        if _LOADING.get() is None:
            raise ValueError(message)
        logger.warning("%s The adapter %s was trained this way; it loads, and gives the boxes it was trained to.",
                       message, _LOADING.get())

    # ---------------------------------------------------------------------------------------------------------
    def _probe(self, kinds: list[str]) -> tuple[TowerFeatures, TowerFeatures, int, int]:
        """One dummy forward of each tower, tapping every layer: widths, depths and the visual token count.
        Logs, once per tower, which modules feed each expert (see :meth:`tap_report`)."""
        vision_inputs, text_inputs = _dummy_inputs(self.config, self.vision_model, self.text_model)
        depths = []
        modality = VISION
        try:
            for modality, tower, inputs in ((VISION, self.vision_tower, vision_inputs),  # noqa: B007 (read below)
                                            (TEXT, self.text_tower, text_inputs)):
                depth = tower.depth()
                if depth is None:
                    _, _, out = tower._probe(inputs, hidden_states=True)
                    states = getattr(out, tower.spec.hidden_states_key, None)
                    if states is None:
                        raise ValueError(tower.refusal(f"no repeated block and no `{tower.spec.hidden_states_key}` in "
                                                       "its output"))
                    depth = len(states) - 1
                depths.append(depth)
            modality = VISION
            vision = self.vision_tower.tap(vision_inputs, list(range(depths[0])), kinds)
            modality = TEXT
            text = self.text_tower.tap(text_inputs, list(range(depths[1])), kinds)
        except (ValueError, RuntimeError, TypeError, IndexError, AttributeError) as err:
            if str(err).startswith("Cannot side-tune"):
                raise  # the tower's own one-line refusal already names the family and the override
            model = self.vision_model if modality == VISION else self.text_model
            probe = (f"a {self.config.image_size}x{self.config.image_size} image (image_size)" if modality == VISION
                     else f"{self.config.max_query_len} tokens (max_query_len)")
            reason = " ".join(str(err).split()).rstrip(".")
            if not isinstance(err, TowerLayoutError):  # a layout error is the tower's structure, not how it was passed
                reason += (f". Is it a {modality} model (vision_model first, text_model second)"
                           + (", built for this image size?" if modality == VISION else "?"))
            raise ValueError(f"The {modality} tower ({type(model).__name__}) fails on {probe}: {reason}") from err
        size = self.config.image_size
        self._tap_reports = (self.vision_tower.report(depths[0], self.vision_tower.grid_of(vision.tokens.shape[1],
                                                                                            (size, size))),
                             self.text_tower.report(depths[1]))
        for report in self._tap_reports:
            logger.info("%s", report)
        return vision, text, depths[0], depths[1]

    def tap_report(self) -> tuple[TapReport, ...]:
        """Per tower (vision, text): which module paths feed each expert, exact sub-layer taps or the layer-output
        fallback, and the visual token layout. ``print(*model.tap_report(), sep="\\n")`` shows it. Empty for the
        in-tower baselines, which read no taps."""
        return self._tap_reports

    def _build_head(self, vision_width: int, text_width: int, num_vision_tokens: int) -> None:
        self.head = self._make_head(self.config, vision_width, text_width, num_vision_tokens)

    def _make_head(self, config: M2ISTConfig, vision_width: int, text_width: int, num_vision_tokens: int) -> RECHead:
        """A REC head for ``config`` (records ``num_vision_tokens`` in it) on this model's vision tower."""
        recorded = config.num_vision_tokens
        if recorded is not None and recorded != num_vision_tokens:
            raise ValueError(
                f"The vision tower gives {num_vision_tokens} tokens at image_size={self.config.image_size}, but the "
                f"config records num_vision_tokens={recorded}: use the tower and image size the head was trained with."
            )
        config.num_vision_tokens = num_vision_tokens
        size = config.image_size
        try:
            grid = self.vision_tower.grid_of(num_vision_tokens, (size, size))
        except ValueError:  # tokens that do not form a grid: only box_readout='reg' can use them
            grid = None
        return RECHead(config, vision_width, text_width, num_vision_tokens, vision_grid=grid,
                       num_prefix_tokens=self.vision_tower.num_leading_tokens)

    def encode(self, pixel_values, pixel_mask, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
        """Return ``(vision_tokens, vision_mask, text_tokens, text_mask)`` for the head."""
        raise NotImplementedError

    @torch.compiler.disable  # reads values (.tolist()): runs eagerly under torch.compile, without a graph-break warning
    def check_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     pixel_mask: torch.Tensor | None = None) -> None:
        """Refuse, in one line naming the input and the fix, inputs the towers would misread silently or fail on
        deep inside: see :func:`check_model_inputs`."""
        check_model_inputs(pixel_values, input_ids, attention_mask, pixel_mask, image_size=self.config.image_size,
                           max_query_len=self.config.max_query_len, vocab_size=text_embedding_rows(self.text_model)[0])

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> RECModelOutput | tuple:
        """Predict one box per (image, expression); with ``labels`` ``(B, 4)`` (normalised cx, cy, w, h) also
        return the loss."""
        self.check_inputs(pixel_values, input_ids, attention_mask, pixel_mask)
        vision_tokens, vision_mask, text_tokens, text_mask = self.encode(pixel_values, pixel_mask, input_ids,
                                                                         attention_mask)
        pred_boxes, patch_logits = self.head(vision_tokens, vision_mask, text_tokens, text_mask)
        losses = {}
        if labels is not None:
            check_labels(labels, pred_boxes.shape[0])
            losses = rec_loss(pred_boxes, labels, self.config, patch_logits)
        output = RECModelOutput(pred_boxes=pred_boxes, patch_logits=patch_logits, **losses)
        return as_returned(output, return_dict)

    # ---------------------------------------------------------------------------------------------------------
    def _unused_parameters(self) -> set[int]:
        ids = set()
        for tower in (self.vision_tower, self.text_tower):
            for name in tower.spec.unused_modules:
                try:
                    module = tower.model.get_submodule(name)
                except AttributeError:
                    continue
                if module is not None:
                    ids.update(id(p) for p in module.parameters())
        return ids

    def parameter_counts(self) -> dict[str, int]:
        """Parameters by role: ``side`` (adapters), ``head``, ``tower`` (trainable tower parameters; baselines
        only, absent when 0) and ``frozen`` (tower parameters on the REC path; DETR's decoder and poolers are not counted)."""
        unused = self._unused_parameters()
        counts = {"side": 0, "head": 0, "tower": 0, "frozen": 0}
        for name, param in self.named_parameters():
            if id(param) in unused or name.startswith(INACTIVE_PREFIX):
                continue
            group = name.split(".", 1)[0]
            if group not in ("side", "head"):
                group = "tower" if param.requires_grad else "frozen"
            counts[group] += param.numel()
        if not counts["tower"]:
            del counts["tower"]
        return counts

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts, as in PEFT: parameters with ``requires_grad`` (0 for an adapter
        loaded for inference, ``from_pretrained(..., is_trainable=False)``). Unlike PEFT, ``total`` counts the model
        the active adapter runs: tower modules off the REC path (poolers, DETR's decoder) and inactive adapters are
        left out, so the trainable share is the method's, as the paper reports it."""
        unused = self._unused_parameters()
        trainable = sum(p.numel() for name, p in self.named_parameters()
                        if p.requires_grad and id(p) not in unused and not name.startswith(INACTIVE_PREFIX))
        return trainable, sum(self.parameter_counts().values())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """The number of parameters in the module, as transformers' ``PreTrainedModel.num_parameters``: every
        parameter of both towers (poolers and DETR's decoder included) and of every adapter, the inactive ones too;
        ``only_trainable``: those that require grad; ``exclude_embeddings``: without the weights of ``nn.Embedding``
        modules. For the share the method trains, as the paper reports it, see :meth:`get_nb_trainable_parameters`."""
        check_flags("num_parameters", only_trainable=only_trainable, exclude_embeddings=exclude_embeddings)
        embeddings = ({id(module.weight) for module in self.modules() if isinstance(module, nn.Embedding)}
                      if exclude_embeddings else set())
        return sum(p.numel() for p in self.parameters()
                   if (p.requires_grad or not only_trainable) and id(p) not in embeddings)

    def print_trainable_parameters(self) -> None:
        """Print parameters per role with their share of the whole model, then PEFT's summary line."""
        counts = self.parameter_counts()
        trainable, total = self.get_nb_trainable_parameters()
        parts = [f"{role} params: {n:,d} ({100 * n / total:.2f}%)" for role, n in counts.items()]
        print(" || ".join(parts))
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------------------------------------------------
    supports_gradient_checkpointing = True

    def _checkpointed_modules(self) -> list[nn.Module]:
        return [module for module in (getattr(self, "side", None), self.head) if module is not None]

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the head's fusion layers (and, for M²IST, the side network's blocks) in the backward pass
        instead of keeping their activations, as transformers' method of that name does; ``Trainer`` calls it for
        ``RECTrainingArguments(gradient_checkpointing=True)``. The frozen towers run under ``no_grad`` and keep
        nothing for the backward pass, so they are left alone; the towers a baseline trains (full fine-tuning,
        in-tower adapters, LoRA) get transformers' own checkpointing of their layers.

        Args:
            activation_checkpointing_kwargs: passed to ``torch.utils.checkpoint.checkpoint`` (default
                ``use_reentrant=False``).
            every_n_layers: checkpoint only every n-th layer of each stack (1: all of them).
            offload: keep the checkpointed layers' inputs in host memory.
        """
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}.")
        check_flags("activation_checkpointing_enable", offload=offload)
        function = make_checkpoint_function(activation_checkpointing_kwargs, offload)
        for module in self._checkpointed_modules():
            module.checkpoint_function, module.checkpoint_every = function, every_n_layers
        for tower in self._trained_towers():  # baselines: the towers they train checkpoint their own layers
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def _trained_towers(self) -> list[nn.Module]:
        return [tower for tower in (self.vision_model, self.text_model)
                if getattr(tower, "supports_gradient_checkpointing", False) and hasattr(tower, "activation_checkpointing_enable")
                and any(p.requires_grad for p in tower.parameters())]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """The older name of :meth:`activation_checkpointing_enable` (transformers 4 and PEFT call this one)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        """Keep every activation again (the default)."""
        for module in self._checkpointed_modules():
            module.checkpoint_function = None
        for tower in self._trained_towers():
            tower.activation_checkpointing_disable()

    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether activation checkpointing is on."""
        return any(module.checkpoint_function is not None for module in self._checkpointed_modules())

    is_gradient_checkpointing = is_activation_checkpointing

    @property
    def device(self) -> torch.device:
        """The device of the head (where outputs are produced)."""
        return next(self.head.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the trained part (side network and head); the towers keep ``config.backbone_dtype``."""
        return next(self.head.parameters()).dtype

    def predict(self, images, texts, processor=None, batch_size: int = 16) -> torch.Tensor:
        """Boxes ``(N, 4)`` in original-image ``xyxy`` pixels for PIL images / paths / arrays and their phrases."""
        if PIPELINE.predict is None:  # only when m2ist.model was loaded without the package (never via import)
            raise RuntimeError("predict() needs the REC pipeline: import m2ist.inference first.")
        return PIPELINE.predict(self, images, texts, processor=processor, batch_size=batch_size)


class SideTunedModel(RECModel):
    """Frozen towers + M³ISA side network + REC head. Only the side network and the head are trained and saved.

    Build one with :func:`get_side_tuned_model` or load one with :meth:`from_pretrained`.
    """

    method = "m2ist"

    @built_on_cpu_in_float32()
    def __init__(self, vision_model: nn.Module, text_model: nn.Module, config: M2ISTConfig | None = None) -> None:
        super().__init__(vision_model, text_model, M2ISTConfig() if config is None else config)
        config = self.config
        for tower in (vision_model, text_model):
            tower.requires_grad_(False)
            tower.eval()
        if config.backbone_dtype is not None:
            self._cast_towers(config.backbone_dtype)
        for tower in (self.vision_model, self.text_model):
            _TOWER_HOLDERS.setdefault(tower, weakref.WeakSet()).add(self)
        vision, text, vision_depth, text_depth = self._probe(sorted({config.intra_tap, config.inter_tap}))
        setup = self._adapter_setup(config, vision_depth, text_depth)
        self.adapter_setups: dict[str, AdapterSetup] = {DEFAULT_ADAPTER: setup}
        self._active_adapter = DEFAULT_ADAPTER
        self._use_setup(setup)
        self.side = self._make_side(setup, vision, text)
        self._build_head(vision.tokens.shape[-1], text.tokens.shape[-1], vision.tokens.shape[1])
        self.side.to(vision.tokens.device)
        self.head.to(vision.tokens.device)
        #: the adapters that are not active (``{name: ModuleDict(side=..., head=...)}``); see :meth:`set_adapter`
        self.inactive_adapters = nn.ModuleDict()
        self._record_towers(config, vision, text, vision_depth, text_depth)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a copy (``copy.deepcopy``, unpickling) and record it as a holder of its towers, as a built model
        is, so that casting them for another model that shares them warns about this one too."""
        if "config" in state:  # pickled before config was a property
            state["_config"] = state.pop("config")
        super().__setstate__(state)
        for tower in (self.vision_model, self.text_model):
            _TOWER_HOLDERS.setdefault(tower, weakref.WeakSet()).add(self)

    @property
    def config(self) -> M2ISTConfig:
        """The active adapter's config (``peft_config[active_adapter]``): what ``forward`` computes the loss with and
        ``save_pretrained`` writes. Assign its fields (``model.config.box_loss_weight = 2.0``); it cannot be replaced
        by another config object, which neither would read."""
        try:
            return self.__dict__["_config"]
        except KeyError:  # (not yet set, half-way through __init__): hasattr() says False, as for any attribute
            raise AttributeError("config") from None

    @config.setter
    def config(self, config: M2ISTConfig) -> None:
        setups = self.__dict__.get("adapter_setups")
        if setups is not None and not any(config is setup.config for setup in setups.values()):
            raise AttributeError("model.config cannot be replaced: forward() and save_pretrained() read each adapter's own "
                                 "config, so the new one would be ignored. Assign its fields instead (model.config."
                                 "box_loss_weight = 2.0), or build a new model from the new config.")
        self.__dict__["_config"] = config

    # ---------------------------------------------------------------------------------------------------------
    def _adapter_setup(self, config: M2ISTConfig, vision_depth: int, text_depth: int) -> AdapterSetup:
        pairs = pair_layers(config, vision_depth, text_depth)
        return AdapterSetup(config, [v for v, _ in pairs], [t for _, t in pairs], config.intra_tap, config.inter_tap,
                            {name: copy.deepcopy(getattr(config, name)) for name in M2ISTConfig.BUILD_FIELDS})

    def _use_setup(self, setup: AdapterSetup) -> None:
        """Point ``config``, the layer lists and the tap kinds at ``setup`` (the active adapter's)."""
        setup.config._text_tower_config = getattr(self.text_model, "config", None)  # config.get_text_config()
        self.config = setup.config
        self.vision_layers, self.text_layers = setup.vision_layers, setup.text_layers
        self.intra_kind, self.inter_kind = setup.intra_kind, setup.inter_kind
        self.tap_kinds = setup.tap_kinds

    def _make_side(self, setup: AdapterSetup, vision: TowerFeatures, text: TowerFeatures) -> SideNetwork:
        config = setup.config

        def dims(features: TowerFeatures, layers: list[int]) -> dict[str, Any]:
            return {"width": features.tokens.shape[-1], "seed": features.seed.shape[-1],
                    "intra": [features.taps[config.intra_tap][i].shape[-1] for i in layers],
                    "inter": [features.taps[config.inter_tap][i].shape[-1] for i in layers]}

        return SideNetwork(vision_dims=dims(vision, setup.vision_layers), text_dims=dims(text, setup.text_layers),
                           bottleneck=config.bottleneck, scale=config.adapter_scale, experts=config.experts,
                           share_up_projection=config.share_iea_up_projection, dropout=config.side_dropout)

    def _record_towers(self, config: M2ISTConfig, vision: TowerFeatures, text: TowerFeatures, vision_depth: int,
                       text_depth: int) -> None:
        for modality, model, features, depth in ((VISION, self.vision_model, vision, vision_depth),
                                                 (TEXT, self.text_model, text, text_depth)):
            name, revision = self.tower_ids[modality]
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            recorded = {"model_type": model.config.model_type, "width": features.tokens.shape[-1], "depth": depth,
                        "model_name_or_path": name, "revision": revision, "model_class": self.tower_classes[modality],
                        "dtype": dtype if dtype in DTYPES else None}
            for key, value in recorded.items():
                if getattr(config, f"{modality}_{key}") is None:
                    setattr(config, f"{modality}_{key}", value)

    def train(self, mode: bool = True) -> SideTunedModel:
        """Set train/eval mode on the side network and head; the frozen towers always stay in ``eval()``."""
        super().train(mode)
        self.vision_model.eval()
        self.text_model.eval()
        return self

    def to(self, *args: Any, **kwargs: Any) -> SideTunedModel:
        """Move the whole model to a device; cast only the side network and the head to a dtype.

        ``model.to("cuda")``, ``model.to(torch.bfloat16)``, ``model.to("cuda", torch.float16)`` and
        ``model.to(memory_format=torch.channels_last)`` work as on any module, except that a dtype applies to the
        trained part only: the frozen towers keep the dtype set by
        ``config.backbone_dtype`` (rebuild or reload with ``backbone_dtype=...`` to change it).
        """
        try:
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError) as err:
            raise TypeError(f"SideTunedModel.to() takes a device and/or a floating dtype, e.g. to('cuda') or "
                            f"to(torch.bfloat16); got args={args}, kwargs={kwargs} ({err}).") from None
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"SideTunedModel.to({dtype}): the side network and head need a floating dtype "
                            f"(torch.float32, torch.bfloat16 or torch.float16).")
        if device is not None:
            refuse_meta_device(device, "SideTunedModel.to")
        if device is not None or memory_format is not None:  # the layout, like the device, applies to the towers too
            layout = {} if memory_format is None else {"memory_format": memory_format}
            super().to(device=device, non_blocking=non_blocking, **layout)
        if dtype is not None:  # every adapter's side network and head, the inactive ones too
            for module in (self.side, self.head, self.inactive_adapters):
                module.to(dtype=dtype, non_blocking=non_blocking)
        return self

    def half(self) -> SideTunedModel:
        """Cast the side network and head to float16 (the towers keep ``config.backbone_dtype``)."""
        return self.to(torch.float16)

    def type(self, dst_type: torch.dtype | str) -> SideTunedModel:
        """Cast the side network and head to ``dst_type`` as :meth:`to` does (``nn.Module.type`` would cast the
        frozen towers too, behind ``config.backbone_dtype``, which the saved adapter records)."""
        if isinstance(dst_type, str):
            name = dst_type.removeprefix("torch.")
            dst_type = _TYPE_NAMES.get(name.removesuffix("Tensor")) or DTYPES.get(name) or dst_type
        if not isinstance(dst_type, torch.dtype):
            raise TypeError(f"SideTunedModel.type({dst_type!r}): pass a floating torch dtype, e.g. torch.bfloat16; "
                            "to change the towers' dtype use set_backbone_dtype().")
        return self.to(dst_type)

    def bfloat16(self) -> SideTunedModel:
        """Cast the side network and head to bfloat16 (the towers keep ``config.backbone_dtype``)."""
        return self.to(torch.bfloat16)

    def float(self) -> SideTunedModel:
        """Cast the side network and head to float32 (the towers keep ``config.backbone_dtype``)."""
        return self.to(torch.float32)

    def double(self) -> SideTunedModel:
        """Cast the side network and head to float64 (the towers keep ``config.backbone_dtype``)."""
        return self.to(torch.float64)

    def set_backbone_dtype(self, backbone_dtype: str) -> SideTunedModel:
        """Cast both frozen towers to ``backbone_dtype`` (``"float32"``, ``"bfloat16"`` or ``"float16"``) and record
        it as every adapter's ``config.backbone_dtype`` (saved with the adapter, so a reload casts the towers the
        same way). The side networks and heads keep their dtype: the taps reach them in float32."""
        if backbone_dtype not in DTYPES:
            raise ValueError(f"backbone_dtype must be one of {tuple(DTYPES)}, got {backbone_dtype!r}.")
        self._cast_towers(backbone_dtype)
        for setup in self.adapter_setups.values():  # adapters on one pair of towers share its settings
            setup.config.backbone_dtype = setup.built["backbone_dtype"] = backbone_dtype
        return self

    def _cast_towers(self, backbone_dtype: str) -> None:
        """Cast both towers in place, warning (as PEFT does when a model is wrapped twice) when another live
        SideTunedModel shares a tower whose dtype this changes: its outputs change with it."""
        dtype = DTYPES[backbone_dtype]
        for name, tower in (("vision", self.vision_model), ("text", self.text_model)):
            current = {p.dtype for p in tower.parameters() if p.is_floating_point()}
            others = [m for m in _TOWER_HOLDERS.get(tower, ()) if m is not self]
            if others and current != {dtype}:
                warnings.warn(
                    f"The {name} tower ({'/'.join(sorted(str(d).removeprefix('torch.') for d in current))}) is "
                    f"shared with another SideTunedModel; casting it to {backbone_dtype} in place changes that "
                    "model's outputs too. Wrap a copy "
                    "(copy.deepcopy(tower)) or give both models the same backbone_dtype.", UserWarning, stacklevel=3)
            tower.to(dtype)

    # ---------------------------------------------------------------------------------------------------------
    # the two halves of a forward: the frozen towers' features, then one adapter's side network and head on them
    def tower_features(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor | None,
                       adapter_names: str | Sequence[str] | None = None) -> TowerFeatureSet:
        """Run both frozen towers once under ``no_grad`` and tap what the adapters ``adapter_names`` (one name or
        several, ``"all"`` as in :meth:`forward_all_adapters`; default: the active one) read: the union of their layers
        and tap kinds."""
        self.check_inputs(pixel_values, input_ids, attention_mask, pixel_mask)
        if adapter_names == ALL_ADAPTERS:
            adapter_names = self.list_adapters()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names or [self._active_adapter])
        setups = [self._setup(name) for name in names]
        vision_layers = sorted({layer for setup in setups for layer in setup.vision_layers})
        text_layers = sorted({layer for setup in setups for layer in setup.text_layers})
        kinds = sorted({kind for setup in setups for kind in setup.tap_kinds})
        vision = self.vision_tower.tap({"pixel_values": pixel_values, "pixel_mask": pixel_mask}, vision_layers, kinds)
        text = self.text_tower.tap({"input_ids": input_ids, "attention_mask": attention_mask}, text_layers, kinds)
        return TowerFeatureSet(vision, text, vision_layers, text_layers)

    def side_tokens(self, features: TowerFeatureSet, adapter_name: str | None = None) -> tuple[torch.Tensor, ...]:
        """``(vision_tokens, vision_mask, text_tokens, text_mask)`` for the head: adapter ``adapter_name``'s side
        network (default: the active one) on tower features from :meth:`tower_features` or a feature cache."""
        name = adapter_name or self._active_adapter
        setup = self._setup(name)
        side, _ = self._adapter_modules(name)
        vision = features.select(VISION, setup.vision_layers, setup.tap_kinds)
        text = without_trailing_padding(features.select(TEXT, setup.text_layers, setup.tap_kinds))
        dtype = next(side.parameters()).dtype
        if dtype != torch.float32:  # taps come in float32; a half-precision side network reads them in its dtype
            vision, text = _cast_features(vision, dtype), _cast_features(text, dtype)
        vision_tokens, text_tokens = side(vision, text, setup.intra_kind, setup.inter_kind)
        return vision_tokens, vision.mask, text_tokens, text.mask

    def forward_features(self, features: TowerFeatureSet, labels: torch.Tensor | None = None,
                         adapter_name: str | None = None, return_dict: bool | None = None) -> RECModelOutput | tuple:
        """Side network + head of adapter ``adapter_name`` (default: the active one) on precomputed tower
        features; with ``labels`` also the loss (with that adapter's loss settings)."""
        name = adapter_name or self._active_adapter
        _, head = self._adapter_modules(name)
        if self.training and torch.is_grad_enabled():
            self._check_towers_frozen()
        pred_boxes, patch_logits = head(*self.side_tokens(features, name))
        config = self._setup(name).config
        losses = {}
        if labels is not None:
            check_labels(labels, pred_boxes.shape[0])
            losses = rec_loss(pred_boxes, labels, config, patch_logits)
        output = RECModelOutput(pred_boxes=pred_boxes, patch_logits=patch_logits, **losses)
        return as_returned(output, return_dict)

    @torch.compiler.disable  # reads every tower parameter's flag: runs eagerly, without a graph-break warning
    def _check_towers_frozen(self) -> None:
        """Refuse to train with a tower that was unfrozen (``model.vision_model.requires_grad_(True)``, or
        ``model.requires_grad_(True)``): the towers run under ``no_grad``, so it would never change while
        ``print_trainable_parameters`` and the optimizer count it as trained."""
        for modality, tower in ((VISION, self.vision_model), (TEXT, self.text_model)):
            unfrozen = [name for name, p in tower.named_parameters() if p.requires_grad]
            if unfrozen:
                raise ValueError(
                    f"The {modality} tower has {len(unfrozen)} parameter tensors that require grad (e.g. "
                    f"{unfrozen[0]!r}), but a SideTunedModel's towers are frozen: they run under no_grad and would "
                    f"never train. Freeze it again (model.{modality}_model.requires_grad_(False)); to fine-tune the "
                    "towers, build a baseline (m2ist.evidence.baselines.build_model(..., method='full' or 'lora')).")

    def encode(self, pixel_values, pixel_mask, input_ids, attention_mask):
        """Run the frozen towers under ``no_grad``, collect the taps, run the active adapter's side network."""
        return self.side_tokens(self.tower_features(pixel_values, pixel_mask, input_ids, attention_mask))

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        adapter_names: Sequence[str] | None = None,
        tower_features: TowerFeatureSet | None = None,
    ) -> RECModelOutput | tuple:
        """Predict one box per (image, expression); with ``labels`` ``(B, 4)`` (normalised cx, cy, w, h) also
        return the loss.

        ``adapter_names`` (PEFT's mixed-batch inference): one adapter name per sample; the towers run once for the
        batch and each sample goes through its own adapter's side network and head (no labels then: train one
        adapter at a time with :meth:`set_adapter`). For every adapter's answer on the same inputs use
        :meth:`forward_all_adapters`. ``tower_features`` (from :meth:`tower_features` or
        :class:`m2ist.cache.TowerFeatureCache`) replaces the towers' pass.
        """
        if adapter_names is None:
            if tower_features is None:
                tower_features = self.tower_features(pixel_values, pixel_mask, input_ids, attention_mask)
            return self.forward_features(tower_features, labels, return_dict=return_dict)
        if isinstance(adapter_names, str):  # a string is a sequence of letters, not of adapter names
            raise TypeError(f"adapter_names takes one adapter name per sample, e.g. [{adapter_names!r}] * batch_size, "
                            f"not the string {adapter_names!r}; to run one adapter, call "
                            f"set_adapter({adapter_names!r}) or forward_all_adapters(adapter_names={adapter_names!r}).")
        return self._forward_mixed(pixel_values, input_ids, attention_mask, pixel_mask, labels, return_dict,
                                   list(adapter_names), tower_features)

    def _forward_mixed(self, pixel_values, input_ids, attention_mask, pixel_mask, labels, return_dict,
                       adapter_names: list[str], tower_features: TowerFeatureSet | None) -> RECModelOutput | tuple:
        if labels is not None:
            raise ValueError("adapter_names (one adapter per sample) is for inference; to train, activate one adapter "
                             "with set_adapter(name) and call the model without adapter_names.")
        batch = (tower_features.vision.tokens if tower_features is not None else pixel_values).shape[0]
        if len(adapter_names) != batch:
            raise ValueError(f"adapter_names needs one adapter name per sample: got {len(adapter_names)} names for a "
                             f"batch of {batch}.")
        unique = list(dict.fromkeys(adapter_names))
        for name in unique:
            self._setup(name)  # an unknown name raises here, before the towers run
        if tower_features is None:
            tower_features = self.tower_features(pixel_values, pixel_mask, input_ids, attention_mask, unique)
        device = tower_features.vision.tokens.device
        rows = {name: torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=device)
                for name in unique}
        outputs = {name: self.forward_features(tower_features.index(rows[name]), adapter_name=name) for name in unique}

        def gather(key: str) -> torch.Tensor:  # adapters cast apart (model.inactive_adapters[n].half()) may differ
            parts = [getattr(outputs[name], key) for name in unique]
            dtype = parts[0].dtype
            for part in parts[1:]:
                dtype = torch.promote_types(dtype, part.dtype)
            merged = parts[0].new_zeros((batch, *parts[0].shape[1:]), dtype=dtype)
            for name, part in zip(unique, parts, strict=True):
                merged[rows[name]] = part.to(dtype)
            return merged

        pred_boxes = gather("pred_boxes")
        # patch_logits only when every sample's adapter gives them (vote readouts)
        every_has_logits = all(outputs[name].patch_logits is not None for name in unique)
        patch_logits = gather("patch_logits") if every_has_logits else None
        output = RECModelOutput(pred_boxes=pred_boxes, patch_logits=patch_logits)
        return as_returned(output, return_dict)

    def forward_all_adapters(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: str | Sequence[str] | None = None,
        tower_features: TowerFeatureSet | None = None,
    ) -> dict[str, RECModelOutput]:
        """Every adapter's answer on the same inputs, ``{name: RECModelOutput}``: the towers run once (tapping
        the union of the adapters' layers), then each adapter's side network and head. ``adapter_names`` (one name
        or a list; ``"all"`` as in :meth:`predict`) limits it to those adapters (default: all, the active one first).
        Each output equals running that adapter alone."""
        if adapter_names == ALL_ADAPTERS:
            adapter_names = None
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        names = list(adapter_names) if adapter_names is not None else self.list_adapters()
        if not names:
            raise ValueError("adapter_names is empty: name at least one adapter.")
        for name in names:
            self._setup(name)
        if tower_features is None:
            tower_features = self.tower_features(pixel_values, pixel_mask, input_ids, attention_mask, names)
        return {name: self.forward_features(tower_features, labels, adapter_name=name) for name in names}

    def predict(self, images, texts, processor=None, batch_size: int = 16,
                adapters: str | Sequence[str] | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Boxes ``(N, 4)`` in original-image ``xyxy`` pixels for PIL images / paths / arrays and their phrases.

        ``adapters``: None (the active adapter) gives a tensor; ``"all"`` or a list of names gives
        ``{name: boxes}``, every adapter on one pass of the towers."""
        if adapters is None:
            return super().predict(images, texts, processor=processor, batch_size=batch_size)
        if PIPELINE.predict is None:
            raise RuntimeError("predict() needs the REC pipeline: import m2ist.inference first.")
        # predict_boxes resolves "all", one name or a list (m2ist.inference.resolve_adapters)
        return PIPELINE.predict(self, images, texts, processor=processor, batch_size=batch_size, adapters=adapters)

    # ---------------------------------------------------------------------------------------------------------
    # PEFT's multi-adapter verbs
    @property
    def active_adapter(self) -> str:
        """The name of the adapter that ``forward``, training and ``trainable_state_dict`` use."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """``[active_adapter]`` (PEFT's list form; M²IST activates one adapter at a time). Both spellings work:
        ``model.active_adapters`` (PEFT's property) and ``model.active_adapters()`` (transformers' method)."""
        return _ActiveAdapters([self._active_adapter])

    @property
    def peft_config(self) -> Mapping[str, M2ISTConfig]:
        """``{adapter name: its M2ISTConfig}``, as PEFT's ``model.peft_config``, read-only: an entry assigned or
        deleted there would change nothing (use :meth:`add_adapter` / :meth:`delete_adapter`)."""
        return MappingProxyType({name: setup.config for name, setup in self.adapter_setups.items()})

    # PEFT verbs that side-tuning has no meaning for: one clear refusal each, not an AttributeError or a no-op.
    # (``get_base_model`` / ``base_model`` stay undefined, ``hasattr`` False, since transformers' Trainer and PEFT
    # helpers probe them with ``hasattr``; reading one raises an AttributeError naming what to use: __getattr__.)
    def __getattr__(self, name: str) -> Any:
        """``nn.Module``'s lookup of submodules, parameters and buffers; PEFT's ``get_base_model`` / ``base_model``,
        which have no single meaning here (two frozen towers), raise an AttributeError naming what to use."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in _NO_BASE_MODEL:
                raise
        raise AttributeError(f"SideTunedModel has no {name} (PEFT's base model): side-tuning leaves two frozen base "
                             "models, the towers model.vision_model and model.text_model, and trains the side network "
                             "and head, model.side and model.head, so use those.") from None

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Refused: side-tuning cannot merge (see :func:`_cannot_merge`)."""
        raise NotImplementedError(_cannot_merge("merge_and_unload"))

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: side-tuning cannot merge (see :func:`_cannot_merge`)."""
        raise NotImplementedError(_cannot_merge("merge_adapter"))

    def unmerge_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: nothing is ever merged into the towers (see :func:`_cannot_merge`)."""
        raise NotImplementedError(_cannot_merge("unmerge_adapter"))

    def unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """Refused: there is no single base model to give back (see :func:`_cannot_merge`)."""
        raise NotImplementedError(_cannot_merge("unload"))

    def disable_adapter(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: a REC model gives no box without an adapter (PEFT's context manager runs the base model)."""
        raise NotImplementedError(_cannot_disable("disable_adapter"))

    def disable_adapter_layers(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as :meth:`disable_adapter`."""
        raise NotImplementedError(_cannot_disable("disable_adapter_layers"))

    def disable_adapters(self, *args: Any, **kwargs: Any) -> None:
        """Refused, as :meth:`disable_adapter` (transformers' ``PeftAdapterMixin`` name)."""
        raise NotImplementedError(_cannot_disable("disable_adapters"))

    def enable_adapter_layers(self) -> None:
        """Nothing to do: the active adapter is always enabled (it cannot be disabled)."""

    def enable_adapters(self) -> None:
        """Nothing to do: the active adapter is always enabled (transformers' ``PeftAdapterMixin`` name)."""

    def requires_grad_(self, requires_grad: bool = True) -> SideTunedModel:
        """``nn.Module.requires_grad_`` for what can train: ``True`` makes the active adapter (side network and
        head) trainable, as ``set_adapter(name)`` does; the frozen towers run under ``no_grad`` and the inactive
        adapters take no part in training, so both stay frozen (torch's own call would unfreeze them and
        ``print_trainable_parameters`` count them as trained). ``False`` freezes every parameter."""
        check_flags("requires_grad_", requires_grad=requires_grad)
        if not requires_grad:
            return super().requires_grad_(False)
        self.side.requires_grad_(True)
        self.head.requires_grad_(True)
        return self

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """PEFT's ``set_requires_grad``: make the adapters ``adapter_names`` trainable (``requires_grad=True``) or
        frozen. Only the active adapter trains: an inactive one is always frozen, so asking to make one trainable is
        refused (activate it with ``set_adapter(name)``, which makes it trainable)."""
        check_flags("set_requires_grad", requires_grad=requires_grad)
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._setup(name)
        inactive = [name for name in names if name != self._active_adapter]
        if requires_grad and inactive:
            raise ValueError(f"set_requires_grad({inactive!r}): only the active adapter ({self._active_adapter!r}) "
                             "trains, the others are frozen (they take no part in a training forward). Activate the "
                             f"one to train with set_adapter({inactive[0]!r}), which makes it trainable.")
        if self._active_adapter in names:
            self.side.requires_grad_(requires_grad)
            self.head.requires_grad_(requires_grad)

    def list_adapters(self) -> list[str]:
        """Names of every adapter on the towers, the active one first."""
        return [self._active_adapter, *(n for n in self.adapter_setups if n != self._active_adapter)]

    def _setup(self, name: str) -> AdapterSetup:
        if not isinstance(name, str):
            given = repr(name) if isinstance(name, list | tuple) else describe_value(name)
            raise TypeError(f"An adapter name is a string, got {given}: "
                            "M²IST activates one adapter at a time (set_adapter('name')); for several adapters' "
                            "answers on the same inputs use forward_all_adapters(adapter_names=[...]).")
        if name == BASE_ADAPTER:
            raise KeyError(f"{BASE_ADAPTER!r} (PEFT's 'no adapter') cannot be used: a REC model has no box without an "
                           f"adapter's side network and head; this model has {self.list_adapters()}.")
        if name not in self.adapter_setups:
            raise KeyError(f"No adapter named {name!r}; this model has {self.list_adapters()}. Add one with "
                           "add_adapter(name, config) or load_adapter(path, adapter_name).")
        return self.adapter_setups[name]

    def _adapter_modules(self, name: str) -> tuple[SideNetwork, RECHead]:
        self._setup(name)
        if name == self._active_adapter:
            return self.side, self.head
        modules = self.inactive_adapters[name]
        return modules["side"], modules["head"]

    def adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for adapter ``name`` (active or not), keyed ``side.*`` / ``head.*``
        as the active adapter's in :meth:`trainable_state_dict`."""
        side, head = self._adapter_modules(name)
        return _AdapterView(nn.ModuleDict({"side": side, "head": head})).trainable_state_dict()

    def _check_new_name(self, name: str) -> None:
        """Refuse a name that cannot name a new adapter (unusable, or taken)."""
        _check_adapter_name(name)
        if name in self.adapter_setups:
            raise ValueError(f"An adapter named {name!r} already exists; delete_adapter({name!r}) first or pick "
                             "another name.")
        # a name becomes a subfolder: on a case-insensitive file system (macOS, Windows) two names that differ only
        # in case (or Unicode normal form) are one folder, and one adapter's weights would be saved over the other's
        folded = _folded_name(name)
        twin = next((other for other in self.adapter_setups if _folded_name(other) == folded), None)
        if twin is not None:
            raise ValueError(f"Adapter name {name!r} differs from the existing adapter {twin!r} only in case (or Unicode "
                             "form): saved, both would be one subfolder on a case-insensitive file system (macOS, "
                             "Windows) and one adapter's weights would replace the other's; pick a name that differs "
                             "in more than case.")

    def _check_compatible(self, name: str, config: M2ISTConfig) -> M2ISTConfig:
        """``config`` completed with the towers' settings; raise if it cannot share this model's towers."""
        self._check_new_name(name)
        if not isinstance(config, M2ISTConfig):
            raise TypeError(f"config must be an M2ISTConfig, got {type(config).__name__}.")
        config = dataclasses.replace(config)
        shared = self.config
        for key in ("image_size", "max_query_len", "vision_taps", "text_taps", "backbone_dtype"):
            mine, theirs = getattr(shared, key), getattr(config, key)
            if key == "image_size" and theirs is None:
                config.image_size = mine
            elif mine != theirs:
                fix = (f" Cast the towers first (model.set_backbone_dtype({theirs!r})), or give the adapter "
                       f"backbone_dtype={mine!r}." if key == "backbone_dtype" and theirs is not None else "")
                raise ValueError(f"Adapter {name!r} has {key}={theirs!r} but the towers run with {key}={mine!r}: "
                                 f"adapters on one pair of towers share the inputs and the towers' settings.{fix}")
        mismatches = config.tower_mismatches(shared)
        if mismatches:
            raise ValueError(f"Adapter {name!r} was built for other towers: {'; '.join(mismatches)}.")
        return config

    def add_adapter(self, adapter_name: str, config: M2ISTConfig) -> None:
        """Add a new, untrained adapter (side network + head) named ``adapter_name`` on the same towers; it is not
        made active (use :meth:`set_adapter`). Its tap kinds and layers may differ from the other adapters'; the
        image size, query length and tap specs must be the towers'. It is built in the dtype of the other adapters
        (:attr:`dtype`), so that one batch can mix them (``adapter_names=``).

        It records this model's towers as the ones it is trained on (their Hub names and commits, as the active
        adapter records them), whatever towers ``config`` names (e.g. another model's ``peft_config[...]``): saved,
        it reloads on these. A config recorded for towers of another type, width or depth is refused."""
        self._check_compatible(adapter_name, config)
        towers = {f"{modality}_{key}": None for modality in (VISION, TEXT) for key in M2ISTConfig.TOWER_FIELDS}
        towers.update({f"{modality}_{key}": getattr(self.config, f"{modality}_{key}") for modality in (VISION, TEXT)
                       for key in ("model_name_or_path", "revision", "model_class", "dtype")})
        self._add_adapter(adapter_name, dataclasses.replace(config, **towers), self.dtype)

    @built_on_cpu_in_float32()
    def _add_adapter(self, adapter_name: str, config: M2ISTConfig, dtype: torch.dtype | None) -> None:
        """:meth:`add_adapter`, with the new adapter's modules in ``dtype`` (None: float32, as built)."""
        config = self._check_compatible(adapter_name, config)
        config.num_vision_tokens = None
        vision, text, vision_depth, text_depth = self._probe(sorted({config.intra_tap, config.inter_tap}))
        setup = self._adapter_setup(config, vision_depth, text_depth)
        side = self._make_side(setup, vision, text)
        head = self._make_head(config, vision.tokens.shape[-1], text.tokens.shape[-1], vision.tokens.shape[1])
        self._record_towers(config, vision, text, vision_depth, text_depth)
        modules = nn.ModuleDict({"side": side, "head": head}).to(self.device)
        if dtype is not None:
            modules.to(dtype)
        modules.train(self.training)
        modules.requires_grad_(False)
        self.inactive_adapters[adapter_name] = modules
        self.adapter_setups[adapter_name] = setup

    def set_adapter(self, adapter_name: str, inference_mode: bool = False) -> None:
        """Make ``adapter_name`` the active adapter: the one ``forward`` runs, training trains (its parameters
        require grad, the others' do not) and ``trainable_state_dict`` returns. It takes the model's train / eval
        mode (an adapter loaded for inference in ``eval()`` trains with dropout once active in a ``train()`` model).
        ``inference_mode=True`` (as in PEFT) activates it frozen: its parameters do not require grad either."""
        check_flags("set_adapter", inference_mode=inference_mode)
        setup = self._setup(adapter_name)
        if adapter_name != self._active_adapter:
            previous = nn.ModuleDict({"side": self.side, "head": self.head})
            # the active one goes in first: were it refused, no adapter would have left its holder yet
            self.inactive_adapters[self._active_adapter] = previous
            previous.requires_grad_(False)
            chosen = self.inactive_adapters.pop(adapter_name)
            chosen.train(self.training)
            self.side, self.head = chosen["side"], chosen["head"]
            self._active_adapter = adapter_name
            self._use_setup(setup)
        self.side.requires_grad_(not inference_mode)
        self.head.requires_grad_(not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``; deleting the active adapter activates the next one (the last cannot go), with a
        warning naming it (as PEFT warns). The next one is frozen as the deleted one was: a model loaded for
        inference stays one (``requires_grad=False``)."""
        self._setup(adapter_name)
        if len(self.adapter_setups) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter: a SideTunedModel needs one.")
        if adapter_name == self._active_adapter:
            following = next(n for n in self.adapter_setups if n != adapter_name)
            frozen = not any(p.requires_grad for module in (self.side, self.head) for p in module.parameters())
            warnings.warn(f"Adapter {adapter_name!r} was active and is deleted: {following!r} is active now"
                          f"{' (frozen, as the deleted one was)' if frozen else ''}; call set_adapter(name) to "
                          "choose another.", UserWarning, stacklevel=2)
            self.set_adapter(following, inference_mode=frozen)
        del self.inactive_adapters[adapter_name]
        del self.adapter_setups[adapter_name]

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *, subfolder: str | None = None,
                     is_trainable: bool = False, revision: str | None = None, token: str | bool | None = None,
                     cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                     endpoint: str | None = None) -> _IncompatibleKeys:
        """Load an adapter saved by :meth:`save_pretrained` (a folder or a Hub repo id, optionally its
        ``subfolder``) as ``adapter_name`` on these towers; loading is strict as in :meth:`from_pretrained`. As in
        PEFT, it is not activated. Unlike PEFT, an inactive adapter never requires grad (only the active one trains,
        and one that requires grad but is unused would fail a ``DistributedDataParallel`` step), whatever
        ``is_trainable``: ``set_adapter(adapter_name)`` makes it trainable (``inference_mode=True``: frozen), so build
        your own optimizer after that call (:class:`~m2ist.trainer.RECTrainer` rebuilds its own).
        ``is_trainable=False`` puts it in ``eval()`` (no dropout in :meth:`forward_all_adapters` and mixed batches)
        until ``model.train()`` or :meth:`set_adapter`, which give it the model's mode; ``True``: the model's mode.

        Without ``subfolder`` the adapter at the folder's root is read; a folder that also holds an adapter named
        ``adapter_name`` in its ``<adapter_name>/`` subfolder (where :meth:`save_pretrained` puts it) is refused,
        since either could be meant: pass ``subfolder=adapter_name`` for that one. The weights load in their saved
        dtype, then take the model's (:attr:`dtype`). A processor saved with the adapter whose settings differ from
        ``model.processor`` (which ``predict`` and ``evaluate`` use for every adapter) gives a warning naming them.

        Returns, as PEFT's ``load_adapter``, the load result ``(missing_keys, unexpected_keys)``: both are always
        empty, since a mismatch raises instead (nothing is loaded then)."""
        from .hub import resolve_adapter

        check_flags("load_adapter", is_trainable=is_trainable, local_files_only=local_files_only)
        _check_location("load_adapter", "model_id", model_id)
        self._check_new_name(adapter_name)  # before any download
        own = f"{adapter_name}/{CONFIG_NAME}"
        folder, root = resolve_adapter(str(model_id), filenames=[CONFIG_NAME, WEIGHTS_NAME], subfolder=subfolder,
                                       optional_filenames=[PROCESSOR_CONFIG_NAME, *([own] if subfolder is None else [])],
                                       shared_filenames=[PROCESSOR_CONFIG_NAME], revision=revision, token=token,
                                       cache_dir=cache_dir, local_files_only=local_files_only, endpoint=endpoint)
        _refuse_root_for_named_adapter(folder, model_id, adapter_name, subfolder, f"load_adapter({adapter_name!r})")
        identity = folder_identity(folder)
        saved = M2ISTConfig.from_json_file(folder / CONFIG_NAME)
        self._check_compatible(adapter_name, saved)
        measured = {f"{m}_{k}": None for m in (VISION, TEXT) for k in M2ISTConfig.TOWER_FIELDS}
        self._add_adapter(adapter_name, dataclasses.replace(saved, **measured, num_vision_tokens=None),
                          _adapter_dtype("auto", folder / WEIGHTS_NAME))
        config = self.adapter_setups[adapter_name].config
        mismatches = saved.tower_mismatches(config)
        if saved.num_vision_tokens not in (None, config.num_vision_tokens):
            mismatches.append(f"num_vision_tokens: saved {saved.num_vision_tokens}, given {config.num_vision_tokens}")
        try:
            if mismatches:
                raise ValueError(f"The adapter in {model_id} was trained on other towers: {'; '.join(mismatches)}.")
            load_trainable_state(_AdapterView(self.inactive_adapters[adapter_name]), folder / WEIGHTS_NAME)
            check_folder_unchanged(folder, identity)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        self.inactive_adapters[adapter_name].to(self.dtype)  # one dtype for every adapter: batches can mix them
        for modality in (VISION, TEXT):  # same architecture, other weights: it loads, as from_pretrained, but says so
            _warn_if_other_tower(saved, modality, *self.tower_ids[modality], adapter=model_id)
            _warn_if_other_tower_dtype(saved, modality, self, adapter=model_id)
        for modality in (VISION, TEXT):
            for key in ("model_name_or_path", "revision"):
                if getattr(saved, f"{modality}_{key}") is not None:
                    setattr(config, f"{modality}_{key}", getattr(saved, f"{modality}_{key}"))
        if not is_trainable:
            self.inactive_adapters[adapter_name].eval()
        processor_folder = adapter_processor_folder(folder, root)
        if processor_folder is not None:
            self._warn_if_other_processor(processor_folder / PROCESSOR_CONFIG_NAME, adapter_name)
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[])  # strict: every tensor loaded, or an error

    def _warn_if_other_processor(self, saved: Path, adapter_name: str) -> None:
        """Warn when the processor settings saved with adapter ``adapter_name`` (``m2ist_processor.json``) differ from
        ``model.processor``'s: every adapter of the model is fed by that one processor, so this adapter would see
        images or phrases prepared otherwise than in its training, and give other boxes, silently."""
        if self.processor is None or not saved.is_file() or not hasattr(self.processor, "flat_settings"):
            return
        try:
            theirs = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            theirs = None
        if not isinstance(theirs, dict):
            warnings.warn(f"{saved}: the processor settings saved with adapter {adapter_name!r} cannot be read, so "
                          "they cannot be compared with model.processor's, which predict() and evaluate() use for it.",
                          UserWarning, stacklevel=3)
            return
        differ = [f"{key}: saved {saved_value!r}, model.processor {value!r}" for key, value, saved_value
                  in processor_setting_differences(processor_settings(self.processor), theirs)]
        if differ:
            warnings.warn(f"Adapter {adapter_name!r} was saved with another processor than model.processor, which "
                          f"predict() and evaluate() use for every adapter ({'; '.join(differ)}): its boxes would "
                          f"differ from its own. Predict with it through its processor (RECProcessor.from_pretrained"
                          f"({str(saved.parent)!r}), passed as processor=), or load it on a model of its own.",
                          UserWarning, stacklevel=3)

    # ---------------------------------------------------------------------------------------------------------
    def parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """Parameters by role (see :meth:`RECModel.parameter_counts`); ``side`` and ``head`` are those of
        ``adapter_name`` (default: the active adapter)."""
        counts = super().parameter_counts()
        if adapter_name is not None and adapter_name != self._active_adapter:
            side, head = self._adapter_modules(adapter_name)
            counts["side"] = sum(p.numel() for p in side.parameters())
            counts["head"] = sum(p.numel() for p in head.parameters())
        return counts

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """``load_state_dict`` of a state dict taken while another adapter was active: its ``side.*`` / ``head.*`` keys
        hold that adapter and ``inactive_adapters.<name>.*`` this model's active one, so they are renamed (in place,
        before the submodules read them, as torch's own modules migrate old keys) and every adapter's weights land on
        it, instead of two adapters trading weights (``strict=False``) or a long list of key differences."""
        inactive = prefix + INACTIVE_PREFIX
        present = {key[len(inactive):].split(".", 1)[0] for key in state_dict if key.startswith(inactive)}
        names, active = set(self.adapter_setups), self._active_adapter
        if active in present and present < names and len(names - present) == 1:
            (theirs,) = names - present
            mine, renamed = f"{INACTIVE_PREFIX}{active}.", {}
            for key in [key for key in state_dict if key.startswith(prefix)]:
                rest = key[len(prefix):]
                if rest.startswith(("side.", "head.")):
                    renamed[f"{inactive}{theirs}.{rest}"] = state_dict.pop(key)
                elif rest.startswith(mine):
                    renamed[prefix + rest[len(mine):]] = state_dict.pop(key)
            state_dict.update(renamed)
            logger.info("The state dict was taken with the adapter %r active: its weights were loaded into %r and the "
                        "active adapter %r's into it.", theirs, theirs, active)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> _IncompatibleKeys:
        """``nn.Module.load_state_dict``, except that a non-empty state dict of which no key is this model's is
        refused, strict or not: with ``strict=False`` (the usual call with only the side network's and head's
        tensors, the towers being left out) torch would load nothing and say so only in the result it returns (keys
        saved through a DDP or ``torch.compile`` wrapper, ``module.side.…``, or by a submodule, ``blocks.0.…``)."""
        check_flags("load_state_dict", strict=strict, assign=assign)  # assign="False" would replace the parameters
        if isinstance(state_dict, Mapping) and state_dict:
            known = set(self.state_dict(keep_vars=True))
            if known.isdisjoint(state_dict):
                raise ValueError(_nothing_to_load(list(state_dict), known))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are saved: the side network's and the head's, never a tower's."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("side.", "head."))}

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card: bool = True,
                        repo_id: str | None = None, selected_adapters: Sequence[str] | None = None,
                        is_main_process: bool = True, safe_serialization: bool = True,
                        save_function: Any = None, card_tags: Sequence[str] = ()) -> Path:
        """Write ``m2ist_config.json``, ``m2ist_model.safetensors`` (side + head only), a model card and, when
        ``model.processor`` is set, the processor (tokenizer files, ``processor_config.json``).

        With several adapters (PEFT's layout): the ``"default"`` adapter at the folder's root, every other one in a
        ``<name>/`` subfolder (its config and weights). ``selected_adapters`` writes (or updates) only those; the
        folder's other adapters are kept, the root one included when ``"default"`` is not selected. The processor
        and the card are written whichever adapters are saved.

        The card (``README.md``) documents the root adapter (or, when the folder has none, the active adapter in its
        subfolder); it is updated when the folder already has one (its text and metadata are kept); ``repo_id`` is
        the Hub repo it is for (``push_to_hub`` passes it), shown in its usage snippet; ``card_tags`` are added to its
        tags (``push_to_hub(tags=...)`` passes them).

        The folder is replaced as a whole (see :func:`m2ist.save_and_load.save_folder_atomically`): it always holds
        one complete adapter, the old or the new one, even with concurrent savers or a save that fails half-way;
        other entries of the folder (notes, ``checkpoint-*`` folders) are kept. Non-finite weights are refused.

        As in PEFT and transformers (accelerate's ``unwrapped.save_pretrained(dir, is_main_process=...,
        save_function=accelerator.save)``): ``is_main_process=False`` writes nothing; weights are always safetensors,
        so ``save_function`` is not used (as PEFT with ``safe_serialization=True``) and ``safe_serialization=False``
        is refused."""
        check_flags("save_pretrained", model_card=model_card, is_main_process=is_main_process,
                    safe_serialization=safe_serialization)
        _check_location("save_pretrained", "save_directory", save_directory)
        target = Path(save_directory)
        if not safe_serialization:
            raise ValueError("safe_serialization=False is not supported: m2ist writes weights as safetensors only "
                             "(a pickled file can run code when loaded). Drop the argument.")
        if not is_main_process:
            return target
        if isinstance(card_tags, str) or not all(isinstance(tag, str) and tag.strip() for tag in card_tags):
            raise TypeError(f"tags must be a list of non-empty strings, got {card_tags!r}.")
        if selected_adapters is not None and not isinstance(selected_adapters, str) and not list(selected_adapters) \
                and not (target / CONFIG_NAME).is_file() and not any(target.glob(f"*/{CONFIG_NAME}")):
            # [] updates the processor and card of a save and keeps its adapters; on a folder without any it wrote a
            # save holding no adapter, which no load reads
            raise ValueError(f"selected_adapters=[] saves no adapter, and {target} holds none to keep: name the adapters "
                             f"to save, e.g. {self.list_adapters()[:2]}, or leave it None to save every adapter. Nothing "
                             "was saved.")
        return save_folder_atomically(save_directory, lambda folder: self.write_adapter_files(
            folder, model_card, repo_id=repo_id, previous=target, selected_adapters=selected_adapters,
            card_tags=card_tags))

    def write_adapter_files(self, folder: Path, model_card: bool = True, *, repo_id: str | None = None,
                            previous: Path | None = None, selected_adapters: Sequence[str] | None = None,
                            card_tags: Sequence[str] = ()) -> None:
        """Write the adapters' files into an existing ``folder`` as they come (``save_pretrained`` calls this on a
        temporary folder that it then swaps in whole: use ``save_pretrained``). ``previous`` is the folder being
        replaced: its card and measured results are carried over (the card is updated rather than replaced), and so
        is its root adapter (config, weights, and its processor when the model has none) when ``"default"`` is not
        written."""
        check_flags("write_adapter_files", model_card=model_card)
        # an unknown name or a string fails before anything is written
        names = self._selected(selected_adapters) if selected_adapters is not None else list(self.adapter_setups)
        for name in names:  # a config changed after the build would reload as another model
            changed = self.adapter_setups[name].changed_build_fields()
            if changed:
                raise ValueError(f"The config of adapter {name!r} was changed after the model was built ({'; '.join(changed)})"
                                 ": its modules still compute with the values they were built with, so the saved adapter "
                                 "would reload as another model. Build a new model with the config you want (or put the "
                                 "values back); nothing was saved.")
        for name in names:  # a subfolder holds an adapter: a file or link of that name is the user's
            entry = None if previous is None or name == DEFAULT_ADAPTER else previous / name
            if entry is not None and (entry.is_symlink() or (entry.exists() and not entry.is_dir())):
                raise ValueError(f"{previous} holds a {'link' if entry.is_symlink() else 'file'} named {name!r}, where "
                                 f"the adapter {name!r} is saved (its subfolder), and the save would replace it. Rename "
                                 "one of them; nothing was saved.")
        for name in names:
            target = folder if name == DEFAULT_ADAPTER else folder / name
            target.mkdir(parents=True, exist_ok=True)
            self.adapter_setups[name].config.save_pretrained(target)
            save_trainable_state(self.adapter_state_dict(name), target / WEIGHTS_NAME)
        if selected_adapters is None and previous is not None and previous.is_dir():
            self._warn_of_kept_adapters(previous)
        processor_files = [PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES, *TOKENIZER_FILES]
        # the root's processor is that of every adapter of the folder without one of its own: a save never changes
        # the processor of an adapter it keeps (the root one, or another's subfolder)
        keeps_root = DEFAULT_ADAPTER not in names and previous is not None and (previous / CONFIG_NAME).is_file()
        had_processor = previous is not None and (previous / PROCESSOR_CONFIG_NAME).is_file()
        if self.processor is None:  # the root's is kept with the root adapter, else dropped with it
            other_processor = had_processor and DEFAULT_ADAPTER in names
        else:
            other_processor = had_processor and self._saved_processor_differs(previous)
        if DEFAULT_ADAPTER not in names and previous is not None:
            carried = [CONFIG_NAME, WEIGHTS_NAME]
            if self.processor is None or (other_processor and keeps_root):
                carried += processor_files
            for name in carried:
                if (previous / name).is_file():
                    shutil.copy2(previous / name, folder / name)
        if self.processor is not None and other_processor and keeps_root:
            for name in names:  # the root keeps its adapter's processor; these adapters get their own
                self.processor.save_pretrained(folder / name)
        else:
            if self.processor is not None:
                self.processor.save_pretrained(folder)
            if other_processor:  # adapters kept in their subfolders keep the root processor they were saved with
                for kept in _adapters_on_the_root_processor(previous, names):
                    shutil.copytree(previous / kept, folder / kept, symlinks=True)
                    for name in processor_files:
                        if (previous / name).is_file():
                            shutil.copy2(previous / name, folder / kept / name)
        if previous is not None:  # as at the root, what an adapter's subfolder holds besides its files stays
            for name in names:
                if name != DEFAULT_ADAPTER:
                    _keep_other_entries(previous / name, folder / name)
        # model_card=False writes no new card, but a card already there is updated all the same: kept as it was, it
        # would report the results of the weights this save replaces
        if model_card or (previous is not None and (previous / CARD_NAME).is_file()):
            if previous is not None:
                for name in (CARD_NAME, EVAL_RESULTS_NAME):
                    if (previous / name).is_file():
                        shutil.copy2(previous / name, folder / name)
            subject = self.card_subject(folder, names)
            if subject is not None:
                config, counts, subfolder = subject
                write_model_card(folder, config, counts, repo_id=repo_id, subfolder=subfolder, tags=list(card_tags))

    def _saved_processor_differs(self, previous: Path) -> bool:
        """Whether the m2ist processor at the root of the folder ``previous`` prepares inputs otherwise than
        ``model.processor`` (one that cannot be read counts as other); False when either is missing."""
        saved = previous / PROCESSOR_CONFIG_NAME
        if self.processor is None or not saved.is_file():
            return False
        try:
            theirs = json.loads(saved.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True
        return not isinstance(theirs, dict) or bool(processor_setting_differences(processor_settings(self.processor),
                                                                                  theirs))

    def _warn_of_kept_adapters(self, previous: Path) -> None:
        """Warn when the folder a full save replaces holds adapter subfolders (``<name>/`` with a config and weights)
        of adapters this model no longer has: the save keeps them (they are not its files, as PEFT keeps them), and
        ``load_adapter(folder, name, subfolder=name)`` would still load one deleted with :meth:`delete_adapter`."""
        kept = sorted(entry.name for entry in previous.iterdir()
                      if entry.is_dir() and entry.name not in self.adapter_setups
                      and (entry / CONFIG_NAME).is_file() and (entry / WEIGHTS_NAME).is_file())
        if kept:
            warnings.warn(f"{previous} keeps the adapter subfolder(s) {kept} of an earlier save: this model has no "
                          "adapter of that name (deleted with delete_adapter?), and a save never removes what it did "
                          "not write, so load_adapter would still load them from there. Remove them if they are "
                          "stale.", stacklevel=4)
        if DEFAULT_ADAPTER not in self.adapter_setups and (previous / CONFIG_NAME).is_file() \
                and (previous / WEIGHTS_NAME).is_file():
            warnings.warn(f"{previous} keeps at its root the {DEFAULT_ADAPTER!r} adapter of an earlier save: this model "
                          f"has no {DEFAULT_ADAPTER!r} adapter (deleted with delete_adapter?), and a save never removes "
                          "what it did not write, so SideTunedModel.from_pretrained (and the model card) would still "
                          f"give that adapter. Remove its {CONFIG_NAME} and {WEIGHTS_NAME} if it is stale, or save "
                          "into a new folder.", stacklevel=4)

    def card_subject(self, folder: Path,
                     written: Sequence[str]) -> tuple[M2ISTConfig, dict[str, int], str | None] | None:
        """``(config, parameter counts, subfolder)`` of the adapter the card of ``folder`` documents, ``written``
        being the adapters just written there: the root adapter (``"default"``, or the one already in ``folder``),
        else the active (or first) written adapter, loaded with ``subfolder=``; None when there is none."""
        if DEFAULT_ADAPTER in written:
            return self.adapter_setups[DEFAULT_ADAPTER].config, self.parameter_counts(DEFAULT_ADAPTER), None
        if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
            config = M2ISTConfig.from_json_file(folder / CONFIG_NAME)
            return config, {**self.parameter_counts(), **trainable_counts(folder / WEIGHTS_NAME)}, None
        if not written:
            return None
        name = self._active_adapter if self._active_adapter in written else written[0]
        return self.adapter_setups[name].config, self.parameter_counts(name), name

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload M²IST side adapter",
                    commit_description: str | None = None, private: bool | None = None, token: str | None = None,
                    revision: str | None = None, create_pr: bool = False, endpoint: str | None = None,
                    tags: Sequence[str] | None = None, selected_adapters: Sequence[str] | None = None) -> str:
        """Save into a temporary folder and upload the adapter's files to ``repo_id`` (created if needed); return the
        commit URL. The card names ``repo_id`` in its usage snippet; ``tags`` are added to its tags (as PEFT's
        ``push_to_hub(tags=...)``), ``commit_description`` is the commit's body.

        The repo then loads as the model does: adapters files of an earlier push that the model does not have are
        deleted, with a warning naming the adapters. ``selected_adapters`` pushes only those (and the processor, when
        the model has one) and keeps the repo's other adapters, as ``save_pretrained(selected_adapters=...)`` keeps
        a folder's; the card is updated only when ``"default"`` (the root adapter) is pushed."""
        from .hub import full_repo_id, push_to_hub

        check_flags("push_to_hub", private=private, create_pr=create_pr)
        repo_id = full_repo_id(repo_id, token=token, endpoint=endpoint)  # the card names the repo as it loads
        names = None if selected_adapters is None else self._selected(selected_adapters)
        push: dict[str, Any] = {}
        if names is not None:  # upload, and delete stale files, only within the selected adapters' own files
            patterns = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME] if DEFAULT_ADAPTER in names else []
            # an adapter's own processor, in its subfolder, is uploaded or, gone from the save, deleted as stale
            patterns += [f"{glob.escape(name)}/{file}" for name in names if name != DEFAULT_ADAPTER
                         for file in (CONFIG_NAME, WEIGHTS_NAME, PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES,
                                      *TOKENIZER_FILES)]
            if self.processor is not None or DEFAULT_ADAPTER in names:  # (a new root adapter: the old one's goes)
                patterns += [PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES, *TOKENIZER_FILES]
            push["allow_patterns"] = patterns

        def save(folder: Path) -> Path:
            saved = self.save_pretrained(folder, repo_id=repo_id, card_tags=tags or (), selected_adapters=names,
                                         model_card=names is None or DEFAULT_ADAPTER in names)
            if names is not None and (self.processor is not None or DEFAULT_ADAPTER in names):
                # the root's processor changes or stays: the repo's other adapters keep theirs
                self._keep_repo_processor(folder, repo_id, names, push["allow_patterns"], revision=revision,
                                          create_pr=create_pr, token=token, endpoint=endpoint)
            return saved

        return push_to_hub(save, repo_id, commit_message=commit_message, commit_description=commit_description,
                           private=private, token=token, revision=revision, create_pr=create_pr, endpoint=endpoint,
                           **push)

    def _keep_repo_processor(self, folder: Path, repo_id: str, names: list[str], patterns: list[str],
                             **where: Any) -> None:
        """For a push of the adapters ``names`` only (saved into ``folder``, uploaded by ``patterns``, changed here):
        when the repo's root processor, which its adapters without a processor of their own read, prepares inputs
        otherwise than ``model.processor``, the adapters the push keeps keep it, as a local save keeps them (see
        :meth:`write_adapter_files`): a kept root adapter keeps the root's (the pushed adapters get theirs in their
        subfolders), and kept subfolder adapters get a copy of the root's when the push replaces it."""
        from .hub import _adapter_subfolders, fetch_root_processor

        theirs = folder.parent / "repo-processor"
        theirs.mkdir(exist_ok=True)
        repo_files = fetch_root_processor(repo_id, theirs, **where)
        changes = (theirs / PROCESSOR_CONFIG_NAME).is_file() if self.processor is None else \
            self._saved_processor_differs(theirs)  # (without one, the push drops the root's: it has "default")
        if not changes:
            return
        processor_files = [PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES, *TOKENIZER_FILES]
        mine = [name for name in processor_files if (folder / name).is_file()]
        if self.processor is not None and DEFAULT_ADAPTER not in names and CONFIG_NAME in repo_files:
            # the root adapter stays, with its processor; the pushed ones get theirs in their subfolders
            for name in names:
                for file in mine:
                    shutil.copy2(folder / file, folder / name / file)
            for file in mine:
                (folder / file).unlink()
            patterns[:] = [p for p in patterns if p not in processor_files]  # (theirs are already named)
            return
        kept = [name for name in _adapter_subfolders(repo_files)
                if name not in names and f"{name}/{PROCESSOR_CONFIG_NAME}" not in repo_files
                and adapter_name_problem(name) is None]
        for name in kept:  # the root's processor changes: theirs goes with them
            (folder / name).mkdir(exist_ok=True)
            for file in processor_files:
                if (theirs / file).is_file():
                    shutil.copy2(theirs / file, folder / name / file)
            patterns += [f"{glob.escape(name)}/{file}" for file in processor_files]

    def _selected(self, selected_adapters: Sequence[str]) -> list[str]:
        """The adapters named by ``selected_adapters`` (a list), without repeats; unknown names and a string (a
        sequence of letters) are refused."""
        if isinstance(selected_adapters, str):
            raise TypeError(f"selected_adapters takes a list of adapter names, e.g. [{selected_adapters!r}], not the "
                            f"string {selected_adapters!r}.")
        names = list(dict.fromkeys(selected_adapters))
        for name in names:
            self._setup(name)
        return names

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        vision_model: nn.Module | None = None,
        text_model: nn.Module | None = None,
        *,
        is_trainable: bool = False,
        subfolder: str | None = None,
        revision: str | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | int | torch.device | None = None,
        device_map: str | int | torch.device | dict[str, Any] | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        endpoint: str | None = None,
        trust_remote_code: bool = False,
        adapter_name: str = DEFAULT_ADAPTER,
        **kwargs: Any,
    ) -> SideTunedModel:
        """Load a saved side adapter from a folder or a Hub repo id, ready for inference (as PEFT does).

        Args:
            name_or_path: a folder written by :meth:`save_pretrained`, or a Hub repo id.
            vision_model / text_model: the towers; by default re-built as the recorded transformers class
                (``AutoModel`` for old configs) from the recorded names at the recorded commits, through the same
                ``endpoint``, ``token``, ``cache_dir`` and ``local_files_only`` as the adapter, so an adapter never
                silently meets a newer tower revision (``trust_remote_code`` stays False unless passed).
            is_trainable: False (default): the model is in ``eval()`` mode and the side network and head have
                ``requires_grad=False``, so two identical forwards give identical boxes. True: ``train()`` mode
                with the side network and head trainable, to continue training.
            subfolder: the adapter lies in this subfolder of the folder or repo.
            revision: branch, tag or commit of the Hub repo.
            dtype: dtype of the side network and head: ``torch.float32`` (default), ``torch.bfloat16``,
                ``torch.float16``, their names, or ``"auto"`` (the dtype of the saved tensors). The towers follow
                ``backbone_dtype`` instead. ``torch_dtype=`` is a deprecated alias.
            device / device_map: one device for the whole model (``"cuda"``, ``"cuda:1"``, ``0``, ``"cpu"``;
                ``device_map`` also takes ``{"": device}`` or ``"auto"``: the first GPU if any, else the CPU).
                Default: where the towers are.
            token / cache_dir / local_files_only / endpoint: Hub options (``endpoint`` for a mirror).
            trust_remote_code: passed to ``from_pretrained`` of the recorded tower class (``AutoModel`` for configs
                that record none) when the towers are re-loaded.
            adapter_name: the name the loaded adapter takes (PEFT's ``adapter_name``; default ``"default"``), e.g.
                for :meth:`load_adapter` of others beside it. It is saved in its own subfolder (as PEFT does).
            **kwargs: runtime settings of the config that may differ from the saved ones: ``backbone_dtype``,
                ``side_dropout``, ``fusion_dropout``. Anything else is refused.

        Loading is strict: a tower of another type, width or depth, missing or unexpected tensors, and corrupted
        or truncated files raise an error that names the difference. A tower of the same architecture but another
        name or commit than the one recorded loads with a warning naming both (the adapter was trained on the
        recorded one; a local copy of it is fine).
        """
        from .hub import resolve_adapter

        _check_location("from_pretrained", "name_or_path", name_or_path, towers=(vision_model, text_model))
        for modality, tower in ((VISION, vision_model), (TEXT, text_model)):
            if tower is not None and not isinstance(tower, nn.Module):
                raise TypeError(f"from_pretrained: {modality}_model must be a loaded torch model or None (to load the "
                                f"recorded tower), got {describe_value(tower)}; the call is "
                                "SideTunedModel.from_pretrained(path, vision_model, text_model).")
        check_flags("from_pretrained", is_trainable=is_trainable, local_files_only=local_files_only,
                    trust_remote_code=trust_remote_code)
        if "torch_dtype" in kwargs:
            torch_dtype = kwargs.pop("torch_dtype")
            if dtype is not None:
                raise TypeError("Pass dtype= only: torch_dtype= is its deprecated alias, and both were given.")
            warnings.warn("`torch_dtype` is deprecated: use `dtype` instead (as in transformers 5).", FutureWarning,
                          stacklevel=2)
            dtype = torch_dtype
        unknown = sorted(set(kwargs) - set(LOAD_OVERRIDES))
        if unknown:
            raise TypeError(f"SideTunedModel.from_pretrained() got unexpected keyword arguments {unknown}. It accepts "
                            f"{sorted(_FROM_PRETRAINED_ARGUMENTS + LOAD_OVERRIDES)} (the last three change runtime "
                            "settings of the saved config; architecture settings cannot change when loading).")
        _check_adapter_name(adapter_name)  # before any download
        target_device = _single_device(device, device_map)
        hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only,
               "endpoint": endpoint}
        processor_files = [PROCESSOR_CONFIG_NAME, *TOKENIZER_FILES, *PROCESSOR_FILES]
        own = [f"{adapter_name}/{CONFIG_NAME}"] if subfolder is None and adapter_name != DEFAULT_ADAPTER else []
        folder, root = resolve_adapter(str(name_or_path), filenames=[CONFIG_NAME, WEIGHTS_NAME],
                                       optional_filenames=[*processor_files, *own], shared_filenames=processor_files,
                                       subfolder=subfolder, **hub)
        _refuse_root_for_named_adapter(folder, name_or_path, adapter_name, subfolder,
                                       f"from_pretrained(..., adapter_name={adapter_name!r})")
        # a save swapped in while this loads is caught at the end (the root's too: the processor may come from it)
        identity = folder_identity(folder), (folder_identity(root) if root is not None else None)
        saved = M2ISTConfig.from_json_file(folder / CONFIG_NAME)
        adapter_dtype = _adapter_dtype(dtype, folder / WEIGHTS_NAME)
        given = {VISION: vision_model is not None, TEXT: text_model is not None}
        vision_model = vision_model or _load_recorded_tower(saved, VISION, trust_remote_code, hub, name_or_path)
        text_model = text_model or _load_recorded_tower(saved, TEXT, trust_remote_code, hub, name_or_path)
        measured = {f"{m}_{k}": None for m in (VISION, TEXT) for k in M2ISTConfig.TOWER_FIELDS}
        loading = _LOADING.set(str(name_or_path))
        try:
            model = cls(vision_model, text_model,
                        dataclasses.replace(saved, **kwargs, **measured, num_vision_tokens=None))
        finally:
            _LOADING.reset(loading)
        mismatches = saved.tower_mismatches(model.config)
        if saved.num_vision_tokens not in (None, model.config.num_vision_tokens):
            mismatches.append(f"num_vision_tokens: saved {saved.num_vision_tokens}, given "
                              f"{model.config.num_vision_tokens} at image_size={model.config.image_size}")
        if mismatches:
            raise ValueError(f"The adapter in {name_or_path} was trained on other towers: {'; '.join(mismatches)}. "
                             "Pass the towers it was built for (see its m2ist_config.json).")
        for modality in (VISION, TEXT):
            if given[modality]:
                _warn_if_other_tower(saved, modality, *model.tower_ids[modality], adapter=name_or_path)
                _warn_if_other_tower_dtype(saved, modality, model, adapter=name_or_path)
        for modality in (VISION, TEXT):  # keep the recorded provenance
            for key in ("model_name_or_path", "revision", "model_class", "dtype"):
                if getattr(saved, f"{modality}_{key}") is not None:
                    setattr(model.config, f"{modality}_{key}", getattr(saved, f"{modality}_{key}"))
        if adapter_dtype is not None:  # asked for a dtype: load in the saved one (checked exactly), then cast
            model.to(_adapter_dtype("auto", folder / WEIGHTS_NAME) or adapter_dtype)
        load_trainable_state(model, folder / WEIGHTS_NAME)
        if adapter_dtype is not None:
            model.to(adapter_dtype)
        processor_folder = adapter_processor_folder(folder, root)  # its own, else the one its save shares at the root
        saved_processor = None if processor_folder is None else next(
            (processor_folder / name for name in (*PROCESSOR_FILES, PROCESSOR_CONFIG_NAME)
             if (processor_folder / name).is_file()), None)  # the file RECProcessor reads first
        if PIPELINE.load_processor is not None and saved_processor is not None:
            try:
                processor = PIPELINE.load_processor(str(processor_folder))  # tokenizer files came with it, same commit
            except (ValueError, TypeError, KeyError, AttributeError) as err:  # JSONDecodeError is a ValueError
                raise ValueError(f"{saved_processor}: the processor saved with the adapter cannot be restored "
                                 f"({type(err).__name__}: {' '.join(str(err).split())}). Fix or delete that file "
                                 "and pass a processor yourself.") from err
            try:  # refused here, the message names the fit, not the file as unreadable
                model.attach_processor(processor, saved=True)
            except ValueError as err:
                if processor_folder != folder:  # the save's shared one, written by a model of other adapters
                    warnings.warn(f"{saved_processor}, the processor saved at the root of the save whose adapter "
                                  f"subfolder {subfolder!r} is loaded, does not fit this adapter ({err}); it is loaded "
                                  "without a processor: pass processor= to predict() and evaluate().", UserWarning,
                                  stacklevel=2)
                    processor = None
                else:
                    raise ValueError(f"{saved_processor}: the processor saved with the adapter does not fit the model's towers "
                                     f"({err})") from err
        check_folder_unchanged(folder, identity[0])
        if root is not None:
            check_folder_unchanged(root, identity[1])
        if target_device is not None:
            model.to(target_device)
        for module in (model.side, model.head):
            module.requires_grad_(is_trainable)
        model.train(is_trainable)
        if adapter_name != DEFAULT_ADAPTER:  # the only adapter, active: renaming it touches nothing else
            model.adapter_setups = {adapter_name: model.adapter_setups.pop(DEFAULT_ADAPTER)}
            model._active_adapter = adapter_name
        return model


def _refuse_root_for_named_adapter(folder: Path, source: Any, adapter_name: str, subfolder: str | None,
                                   call: str) -> None:
    """Refuse to load the root adapter of ``folder`` under the name ``adapter_name`` (no ``subfolder``) when the
    folder also holds an adapter of that name in its ``<adapter_name>/`` subfolder (where ``save_pretrained`` puts
    it): either could be meant, and the root one would answer under the other's name."""
    if subfolder is None and adapter_name != DEFAULT_ADAPTER and (folder / adapter_name / CONFIG_NAME).is_file():
        raise ValueError(
            f"{source} holds an adapter named {adapter_name!r} in its subfolder {adapter_name}/ (where "
            f"save_pretrained puts it), but {call} without subfolder= reads the adapter at its root (its 'default' "
            f"one). Pass subfolder={adapter_name!r} to load the {adapter_name!r} adapter; to load the root one, give "
            "it another adapter_name. Nothing was loaded.")


def _keep_other_entries(old: Path, new: Path) -> None:
    """Copy into the adapter subfolder ``new`` (being written) the entries of ``old`` (what the folder it replaces
    held there) that are not an adapter's own files (:data:`m2ist.save_and_load.OWNED_FILES`): a user's notes or
    results. Nothing when ``old`` is not a folder."""
    if old.is_symlink() or not old.is_dir():
        return
    entries = list(old.iterdir())
    owned = owned_entries(OWNED_FILES, [entry.name for entry in entries])
    for entry in entries:
        if entry.name in owned or os.path.lexists(new / entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, new / entry.name, follow_symlinks=False)


def _adapters_on_the_root_processor(folder: Path, written: Sequence[str]) -> list[str]:
    """The adapter subfolders of ``folder`` (a config and weights) other than ``written`` that hold no processor of
    their own, so read the one at ``folder``'s root."""
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [entry.name for entry in entries
            if entry.is_dir() and not entry.is_symlink() and entry.name not in written
            and adapter_name_problem(entry.name) is None
            and (entry / CONFIG_NAME).is_file() and (entry / WEIGHTS_NAME).is_file()
            and adapter_processor_folder(entry, None) is None]


def adapter_processor_folder(folder: Path, root: Path | None) -> Path | None:
    """Where the processor of the adapter saved in ``folder`` lies: ``folder`` when it holds one of its own, else
    ``root``, the save whose adapter subfolder ``folder`` is (``save_pretrained`` writes the processor its adapters
    share once, at the root), when that holds an m2ist processor; None when neither does."""
    if any((folder / name).is_file() for name in (PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES)):
        return folder
    if root is not None and (root / PROCESSOR_CONFIG_NAME).is_file():
        return root
    return None


def _check_adapter_name(name: object) -> None:
    """Refuse a name that cannot name an adapter: it becomes a module name and a subfolder when saving (reserved
    folder names are refused in any case: on macOS and Windows ``Runs/`` is the trainer's ``runs/``)."""
    if not isinstance(name, str):
        order = (" M2IST takes the name first, as PEFT does: add_adapter('name', config), not transformers' "
                 "add_adapter(config, name)." if isinstance(name, M2ISTConfig) else "")
        raise TypeError(f"An adapter name is a string, got {describe_value(name)}.{order}")
    problem = adapter_name_problem(name) or (f"{BASE_ADAPTER!r} is PEFT's 'no adapter'" if name == BASE_ADAPTER
                                             else None)
    if problem is not None:
        raise ValueError(f"Adapter name {name!r} is not usable: {problem}. Give a non-empty name without '/', "
                         "'\\', '.', spaces at either end or control characters (it becomes a module name and a "
                         f"subfolder when saving), other than {BASE_ADAPTER!r}, 'checkpoint-*', 'runs', "
                         "'last-checkpoint' and 'tower_cache'; e.g. 'refcoco_plus'.")
    folded = _folded_name(name)
    reserved = next((pattern for pattern in RESERVED_ADAPTER_NAMES if fnmatch.fnmatchcase(folded, pattern)), None)
    if reserved is not None:
        raise ValueError(f"Adapter name {name!r} is {reserved!r} in another case: on a case-insensitive file system "
                         "(macOS, Windows) its subfolder would be the trainer's checkpoint, log or cache folder, "
                         "which pushes skip and saves replace; pick another name, e.g. 'refcoco_plus'.")
    if hasattr(_ADAPTER_HOLDER, name):  # torch's add_module refuses it: a bare KeyError, half-way through a verb
        raise ValueError(f"Adapter name {name!r} is not usable: an inactive adapter is held as "
                         f"model.inactive_adapters[{name!r}], a torch ModuleDict, and {name!r} is one of its "
                         "attributes (torch refuses such module names); pick another name, e.g. "
                         f"'{name.strip('_')}_adapter'.")


#: an empty holder like ``SideTunedModel.inactive_adapters``: a name that is one of its attributes (``train``,
#: ``keys``, ``training``, ``_modules``...) cannot name a module in it
_ADAPTER_HOLDER = nn.ModuleDict()


#: PEFT's names for the wrapped model, which a SideTunedModel (two towers) answers with an AttributeError naming them.
_NO_BASE_MODEL = ("get_base_model", "base_model")


class _ActiveAdapters(list):
    """The list ``SideTunedModel.active_adapters`` gives, also callable: ``active_adapters()`` is transformers'
    ``PeftAdapterMixin`` spelling (a method), ``active_adapters`` PEFT's (a property)."""

    def __call__(self) -> list[str]:
        return list(self)


def _cannot_merge(verb: str) -> str:
    """Why PEFT's merging verb ``verb`` is refused on a SideTunedModel."""
    return (f"SideTunedModel.{verb}(): side-tuning cannot merge. The side network runs beside the frozen towers and "
            "never changes their weights, and the REC head has no counterpart in them, so there is no merged model "
            "to give back. Keep the adapter as it is (save_pretrained / from_pretrained); the towers alone are "
            "model.vision_model and model.text_model.")


def _cannot_disable(verb: str) -> str:
    """Why PEFT's verb ``verb`` (run the base model without the adapter) is refused on a SideTunedModel."""
    return (f"SideTunedModel.{verb}(): a REC model gives no box without an adapter's side network and head, so it "
            "cannot run with the adapter disabled (PEFT's base model output). The towers alone are model.vision_model "
            "and model.text_model; to compare adapters on the same inputs, use forward_all_adapters().")


def _nothing_to_load(given: list[Any], known: set[str]) -> str:
    """Why a state dict whose keys ``given`` share none with the model's ``known`` keys is refused, with the prefix
    to strip or add when one makes its keys the model's."""
    first = next((key for key in given if isinstance(key, str)), None)
    hint = ""
    if first is not None:
        parts = first.split(".")
        strip = next((".".join(parts[:i]) + "." for i in range(1, len(parts)) if ".".join(parts[i:]) in known), None)
        add = next((group for group in ("side.", "head.", "vision_model.", "text_model.") if group + first in known),
                   None)
        if first.startswith(INACTIVE_PREFIX) and len(parts) > 2:
            hint = (f" Its keys hold the adapter {parts[1]!r}, which this model does not have: add it first "
                    f"(add_adapter({parts[1]!r}, config)).")
        elif strip is not None:
            hint = (f" Its keys carry the prefix {strip!r} (a DDP or torch.compile wrapper's?): load "
                    f"{{k.removeprefix({strip!r}): v for k, v in state_dict.items()}}.")
        elif add is not None:
            hint = (f" Its keys lack the prefix {add!r} (a submodule's state dict?): load it with "
                    f"model.{add.rstrip('.')}.load_state_dict(...).")
    example = sorted(key for key in known if key.startswith(("side.", "head.")))[:1] or sorted(known)[:1]
    return (f"load_state_dict: none of the {len(given)} keys given (e.g. {first!r}) is a key of this model (e.g. "
            f"{example[0]!r}), so nothing would be loaded, even with strict=False.{hint} To load a saved adapter, use "
            "SideTunedModel.from_pretrained or load_adapter.")


_FROM_PRETRAINED_ARGUMENTS = ("vision_model", "text_model", "is_trainable", "subfolder", "revision", "dtype",
                              "torch_dtype", "device", "device_map", "token", "cache_dir", "local_files_only",
                              "endpoint", "trust_remote_code", "adapter_name")


def _folded_name(name: str) -> str:
    """``name`` as a case-insensitive file system compares it: NFC-normalised and case-folded."""
    return unicodedata.normalize("NFC", name).casefold()


def _cast_features(features: TowerFeatures, dtype: torch.dtype) -> TowerFeatures:
    """The floating tensors of ``features`` in ``dtype`` (masks untouched)."""
    return dataclasses.replace(
        features, tokens=features.tokens.to(dtype),
        seed=None if features.seed is None else features.seed.to(dtype),
        taps={kind: [t.to(dtype) for t in tensors] for kind, tensors in features.taps.items()})


def non_finite_features(features: TowerFeatures, layers: Sequence[int]) -> list[str]:
    """Where one tower's ``features`` (tapped at ``layers``) hold NaN or inf at real tokens: ``["the output",
    "the layer-3 hidden taps", ...]`` (empty when every value is finite). Padded positions are not looked at."""

    def finite(tensor: torch.Tensor) -> bool:
        if tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(features.mask.shape):
            tensor = tensor[features.mask.to(tensor.device)]
        return bool(torch.isfinite(tensor).all())

    found = [] if finite(features.tokens) else ["the output"]
    if features.seed is not None and not finite(features.seed):
        found.append("the embeddings")
    for kind, tensors in features.taps.items():
        found += [f"the layer-{layer} {kind} taps" for layer, tensor in zip(layers, tensors, strict=False)
                  if not finite(tensor)]
    return found


def non_finite_cause(model: nn.Module, inputs: Mapping[str, Any]) -> str:
    """Why ``model`` gives NaN or inf on the batch ``inputs`` when the frozen towers are to blame, as a sentence
    naming the tower, where its features stop being finite and what to do; ``""`` when the towers' features are
    finite (or ``model`` is not a :class:`SideTunedModel`, or the batch carries no images and texts). Runs the
    towers once under ``no_grad``, in the autocast state of the caller (call it where the failing forward ran)."""
    if not isinstance(model, SideTunedModel) or "pixel_values" not in inputs or "input_ids" not in inputs:
        return ""
    with torch.no_grad():
        features = model.tower_features(inputs["pixel_values"], inputs.get("pixel_mask"), inputs["input_ids"],
                                        inputs.get("attention_mask"))
    sentences = []
    for modality, tower, tapped, layers in ((VISION, model.vision_model, features.vision, features.vision_layers),
                                            (TEXT, model.text_model, features.text, features.text_layers)):
        where = non_finite_features(tapped, layers)
        if not where:
            continue
        said = f"The frozen {modality} tower computes NaN or infinite features on this batch ({', '.join(where[:3])})"
        damaged = next((name for name, p in tower.named_parameters()
                        if p.is_floating_point() and not bool(torch.isfinite(p).all())), None)
        device = tapped.tokens.device.type
        half = any(p.dtype == torch.float16 for p in tower.parameters()) or (
            torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16)
        if damaged is not None and half:
            said += (f": its weight {damaged!r} holds NaN or inf, as a weight beyond float16's ±65504 becomes when "
                     f"the tower is cast to float16. Run the {modality} tower in bfloat16 or float32 "
                     "(model.set_backbone_dtype('bfloat16'), --backbone-dtype), or reload it if it was damaged.")
        elif damaged is not None:
            said += (f": its weight {damaged!r} holds NaN or inf. Reload the {modality} tower from its checkpoint "
                     "(the adapter's weights are not the cause).")
        elif half:
            said += (": float16 overflows past ±65504 in this tower. Run it in bfloat16 or float32 "
                     "(model.set_backbone_dtype('bfloat16'), --backbone-dtype, or bf16=True instead of fp16=True).")
        else:
            said += ": its weights are finite, so an input drives it out of range; check this batch's images and texts."
        sentences.append(said)
    if not sentences:
        side_dtype = next(model._adapter_modules(model.active_adapter)[0].parameters()).dtype
        if side_dtype == torch.float16:
            largest = max(float(t.abs().max()) for tapped in (features.vision, features.text)
                          for t in [tapped.tokens, *(x for taps in tapped.taps.values() for x in taps)])
            if largest > torch.finfo(torch.float16).max:
                sentences.append(f"The towers' features reach {largest:.3g}, beyond float16's ±65504, and adapter "
                                 f"{model.active_adapter!r} is float16: keep its side network in float32 or bfloat16.")
    return " ".join(sentences)


#: ``nn.Module.type`` names (``"torch.HalfTensor"``) of the floating dtypes.
_TYPE_NAMES = {"Half": torch.float16, "BFloat16": torch.bfloat16, "Float": torch.float32, "Double": torch.float64}


#: safetensors' dtype codes of the floating dtypes an adapter may be saved in.
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


def _warn_if_other_tower_dtype(saved: M2ISTConfig, modality: str, model: SideTunedModel, *, adapter: Any) -> None:
    """Warn when the ``modality`` tower runs in another dtype than the adapter recorded (``<modality>_dtype``, no
    ``backbone_dtype`` to cast it): a bfloat16 tower given as float32 (or the reverse) feeds the side network other
    features, so the boxes differ from the saved model's."""
    recorded = getattr(saved, f"{modality}_dtype")
    tower = model.vision_model if modality == VISION else model.text_model
    current = next((str(p.dtype).removeprefix("torch.") for p in tower.parameters() if p.is_floating_point()), None)
    if model.config.backbone_dtype is None and recorded is not None and current is not None and current != recorded:
        warnings.warn(f"The adapter {adapter} was trained on its {modality} tower in {recorded} ({modality}_dtype), but "
                      f"the {modality} tower given runs in {current}: its boxes differ from the saved model's. Load the "
                      f"tower with dtype=torch.{recorded}, or pass backbone_dtype={recorded!r}.", UserWarning,
                      stacklevel=3)


def _adapter_dtype(dtype: str | torch.dtype | None, weights: Path) -> torch.dtype | None:
    """The dtype asked for the side network and head: None (keep float32), a torch dtype, a name, or "auto"."""
    if dtype is None:
        return None
    if dtype == "auto":  # the saved dtype, from the header alone: the file is verified when it is loaded
        try:
            header = _read_header(weights)
        except (OSError, ValueError) as err:
            raise ValueError(f"Cannot load {weights}: its safetensors header is damaged ({err}); nothing was loaded. "
                             "Save or download it again.") from None
        entries = [header[name] for name in sorted(header) if name != "__metadata__"]
        saved = entries[0].get("dtype") if entries and isinstance(entries[0], dict) else None
        return _SAFETENSORS_DTYPES.get(saved)
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(DTYPES)}, a torch dtype, or 'auto'.")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype: use torch.float32, torch.bfloat16, "
                         "torch.float16 or 'auto'.")
    return dtype


def _check_location(where: str, name: str, value: Any, towers: tuple[Any, ...] = ()) -> None:
    """Refuse a folder or repo id that is not a string or path: a model passed first (PEFT's
    ``PeftModel.from_pretrained(model, path)`` order) would become its multi-line repr, read as a file name."""
    if isinstance(value, str | os.PathLike):
        return
    order = (" M2IST takes the adapter first, then the towers: SideTunedModel.from_pretrained(path, vision_model, "
             "text_model), not PEFT's (model, path) order." if isinstance(value, nn.Module) or any(
                 isinstance(tower, str | os.PathLike) for tower in towers) else "")
    raise TypeError(f"{where}: {name} must be a folder or a Hub repo id (a string or a path), got {describe_value(value)}."
                    f"{order}")


def _single_device(device: str | int | torch.device | None,
                   device_map: str | int | torch.device | dict[str, Any] | None) -> torch.device | None:
    """The one device that ``device`` or a single-device ``device_map`` names (an M²IST model is not sharded, and
    never put on the ``meta`` device: see :func:`refuse_meta_device`)."""
    if device is not None and device_map is not None:
        raise TypeError("Pass device= or device_map=, not both.")
    if device_map is None:
        chosen = None if device is None else torch.device(device)
    else:
        if isinstance(device_map, dict):
            if set(device_map) != {""}:
                raise ValueError(f"device_map={device_map} splits the model; an M²IST model loads on one device: "
                                 "pass device='cuda:0' (or device_map={'': 'cuda:0'}).")
            device_map = device_map[""]
        if device_map in ("balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"device_map={device_map!r} shards a model over devices; an M²IST model loads on one "
                             "device: pass device='cuda:0' or device_map='auto'.")
        if device_map == "auto":
            chosen = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        else:
            chosen = torch.device(device_map)
    if chosen is not None:
        refuse_meta_device(chosen, "from_pretrained")
    return chosen


def refuse_meta_device(device: str | int | torch.device, where: str) -> None:
    """Refuse the ``meta`` device (shapes, no data) as where a model is put, before anything is moved: its weights
    would be dropped for good (``to_empty`` gives uninitialised memory), and M²IST cannot run or save from it."""
    if not isinstance(device, int) and torch.device(device).type == "meta":
        raise ValueError(f"{where}(device='meta'): the meta device holds shapes, no data, so every weight (the towers' "
                         "and the adapter's) would be dropped and nothing could run or be saved. m2ist needs real "
                         "weights on a real device: pass 'cpu' or 'cuda'.")


def get_side_tuned_model(vision_model: nn.Module, text_model: nn.Module,
                         config: M2ISTConfig | None = None) -> SideTunedModel:
    """Wrap two Hugging Face towers for M²IST side-tuning (both frozen) and attach the REC head.

    ``config`` defaults to the paper's settings. The caller's config object is not modified; the built model's
    ``model.config`` records the towers.
    """
    return SideTunedModel(vision_model, text_model, M2ISTConfig() if config is None else config)
