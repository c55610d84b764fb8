"""`M2ISTConfig`: every hyper-parameter of the side network and the REC head, with the paper's defaults."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import sys
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

logger = logging.getLogger(__name__)

CONFIG_NAME = "m2ist_config.json"
CONFIG_FORMAT_VERSION = 1

EXPERTS = ("vea", "lea", "iea")
TAP_KINDS = ("attention", "ffn", "layer")
LAYER_PAIRINGS = ("first", "spread")
BOX_LOSSES = ("l1", "smooth_l1")
DTYPES = ("float32", "bfloat16", "float16")

#: Inclusive ``(low, high)`` bounds of the numeric fields (``high`` None: no upper bound). The upper bounds are far
#: above any real model and only stop absurd values (``bottleneck: 1e9``) from attempting huge allocations.
FIELD_BOUNDS: dict[str, tuple[float, float | None]] = {
    "bottleneck": (1, 16384), "fusion_dim": (1, 16384), "fusion_layers": (0, 64), "fusion_heads": (1, 256),
    "fusion_ffn_dim": (1, 131072), "box_mlp_layers": (1, 32), "vote_hops": (1, 32), "vote_window": (0, 4096),
    "max_query_len": (1, 8192), "image_size": (1, 16384), "num_vision_tokens": (1, 1 << 22),
    "side_dropout": (0.0, 1.0), "fusion_dropout": (0.0, 1.0), "adapter_scale": (0.0, None),
    "box_loss_weight": (0.0, None), "giou_loss_weight": (0.0, None), "smooth_l1_beta": (0.0, None),
    "point_loss_weight": (0.0, None), "vision_width": (1, 1 << 20), "vision_depth": (1, 4096),
    "text_width": (1, 1 << 20), "text_depth": (1, 4096), "config_version": (1, None),
}
#: Fields whose upper bound is excluded (a dropout of 1 drops everything).
_OPEN_ABOVE = frozenset({"side_dropout", "fusion_dropout"})
#: The values a text field may take (for ``experts``: each of its items).
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "experts": EXPERTS, "intra_tap": TAP_KINDS, "inter_tap": TAP_KINDS, "layer_pairing": LAYER_PAIRINGS,
    "fusion_norm": ("post", "pre"), "reg_init": ("learned", "text"), "box_readout": ("reg", "vote"),
    "vote_keys": ("fused", "projected", "both"), "position_init": ("random", "sincos"), "box_loss": BOX_LOSSES,
    "backbone_dtype": DTYPES, "vision_dtype": DTYPES, "text_dtype": DTYPES,
}
#: The keys of ``vision_taps`` / ``text_taps``, their types and (token counts) bounds; ``layers`` is a glob or a list
#: of globs, ``layout`` an einops pattern of the tapped outputs ("b n c" tokens, or "b", "c", "h", "w" in any order).
TAP_KEYS: dict[str, Any] = {"layers": str | list[str], "attention": str | None, "ffn": str | None, "layout": str,
                            "num_prefix_tokens": int | None, "num_suffix_tokens": int | None}
TAP_KEY_BOUNDS: dict[str, tuple[int, int]] = {"num_prefix_tokens": (0, 4096), "num_suffix_tokens": (0, 4096)}
#: Fields added after format 1 whose default is not what the m2ist that wrote a file without them computed: such a
#: file (it records ``config_version``) loads with these values, so that it reloads as the model it saved. The vote
#: readout came before its window and its point loss: every patch voted and no point loss was trained.
LEGACY_VALUES: dict[str, Any] = {"vote_window": None, "point_loss_weight": 0.0}
#: At most this many bytes are read as an ``m2ist_config.json`` (a real one is a few kilobytes).
MAX_CONFIG_BYTES = 1 << 20


def _type_name(value: Any) -> str:
    """``int`` for Python's, ``numpy.bool`` for numpy's (whose plain name is ``bool`` too)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def _bounds_error(low: float, high: float | None, integer: bool, open_above: bool = False) -> str:
    """What a value outside ``[low, high]`` should have been."""
    if integer:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")  # type: ignore[call-overload]
        return f"expected {kind}" + (f" (at most {high})." if high is not None else ".")
    closing = ")" if open_above or high is None else "]"
    return f"expected a number in [{low}, {'∞' if high is None else high}{closing}."


def _check_value(name: str, value: Any, hint: Any, metadata: Any = None) -> Any:
    """``value`` of the field ``name`` (annotated ``hint``) checked on its own: its type, finiteness, bounds
    (:data:`FIELD_BOUNDS`), choices (:data:`FIELD_CHOICES`) and, for a mapping with ``keys`` in its metadata, every
    key and value. Returns it normalised (a tuple as a list, a mapping copied so the caller's stays apart); raises
    ``ValueError`` naming the field."""

    def fail(why: str) -> None:
        raise ValueError(f"M2ISTConfig.{name}={value!r} is invalid: {why}")

    if not _matches_type(value, hint):
        wrong = [item for item in value if not _matches_type([item], hint)] if isinstance(value, list | tuple) else []
        fail(f"expected {_describe_type(hint)}, got " + (f"a list holding {describe_value(wrong[0])}." if wrong
                                                          else f"a value of type {_type_name(value)}."))
    if isinstance(value, float | int) and not isinstance(value, bool) and _matches_type(0.5, hint) and not (
            abs(value) <= sys.float_info.max and math.isfinite(value)):  # an int beyond a float (10**400) too
        fail("expected a finite number.")
    if isinstance(value, list | tuple):
        value = list(value)
    bounds = FIELD_BOUNDS.get(name)
    if bounds is not None and value is not None:
        low, high = bounds
        above = high is not None and (value >= high if name in _OPEN_ABOVE else value > high)
        if value < low or above:
            fail(_bounds_error(low, high, not _matches_type(0.5, hint), name in _OPEN_ABOVE))
    choices = FIELD_CHOICES.get(name)
    if choices is not None and value is not None and any(
            item not in choices for item in (value if isinstance(value, list) else [value])):
        fail(f"expected a non-empty list of distinct names from {choices}." if isinstance(value, list) else
             f"expected None or one of {choices}." if _matches_type(None, hint) else f"expected one of {choices}.")
    keys = (metadata or {}).get("keys")
    if keys is not None and isinstance(value, dict):
        unknown = sorted(set(value) - set(keys))
        if unknown:
            fail(f"unknown key(s) {unknown}; the keys are {list(keys)}.")
        for key, item in value.items():
            if not _matches_type(item, keys[key]):
                fail(f"{key!r} expected {_describe_type(keys[key])}, got {describe_value(item)}.")
            if key in TAP_KEY_BOUNDS and item is not None and not TAP_KEY_BOUNDS[key][0] <= item <= TAP_KEY_BOUNDS[key][1]:
                fail(f"{key!r} {_bounds_error(*TAP_KEY_BOUNDS[key], integer=True)}")
        value = {key: list(item) if isinstance(item, list | tuple) else item for key, item in value.items()}
    return value


def _describe_type(hint: Any) -> str:
    """``list[int] | None`` -> "a list of integers or null", for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe_type(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin is dict or hint is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from Python or JSON) is of the annotated type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches_type(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list | tuple) and all(_matches_type(item, args[0]) for item in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    return isinstance(value, hint) if isinstance(hint, type) else True



class RepeatedKeyError(ValueError):
    """A key given twice in one JSON object (``json`` would silently keep the last value); ``key`` names it."""

    def __init__(self, key: str, first: Any, second: Any) -> None:
        super().__init__(f"the key {key!r} is given twice ({first!r:.40} and {second!r:.40}) and JSON would keep "
                         "only the last; keep one.")
        self.key = key


def refuse_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` ``object_pairs_hook``: a key given twice raises :class:`RepeatedKeyError`."""
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise RepeatedKeyError(key, values[key], value)
        values[key] = value
    return values


def _foreign_config_hint(values: dict[str, Any], unknown: list[str]) -> str:
    """Why a dict of config values holds keys M2ISTConfig lacks: another library's config, or misspelt fields."""
    if "peft_type" in values:
        return " (this is a PEFT adapter config, not an m2ist one: an m2ist adapter's is m2ist_config.json)"
    if "model_type" in values or "architectures" in values:
        return " (this is a transformers model config, not an m2ist one: an m2ist adapter's is m2ist_config.json)"
    if "canvas_size" in values or "image_mean" in values:
        return " (this is a processor config, not an m2ist model config: that is m2ist_config.json)"
    if "m2ist" in values:
        return " (this looks like an m2ist command-line config: its 'm2ist' section holds the M2ISTConfig fields)"
    guesses = {key: difflib.get_close_matches(str(key), list(_FIELD_SPECS), n=1) for key in unknown}
    named = [f"{key!r} -> {match[0]!r}" for key, match in guesses.items() if match]
    return f" (did you mean {', '.join(named)}?)" if named else ""


def is_flag(value: Any) -> bool:
    """Whether ``value`` is a boolean (Python's or numpy's): ``bool("false")`` is ``True``, so nothing else is one."""
    return isinstance(value, bool | np.bool_)


def describe_value(value: Any) -> str:
    """A short description of ``value`` for an error message (never a module's multi-line repr)."""
    if isinstance(value, type):
        return f"the class {value.__name__}"
    if isinstance(value, str | os.PathLike | int | float | bool) or value is None:
        return f"{type(value).__name__} {str(value)[:80]!r}" if value is not None else "None"
    return f"a {type(value).__name__}"


def check_flags(where: str, **flags: Any) -> None:
    """Refuse a switch that is not ``True`` or ``False``: ``"False"`` (read from a config file or a command line) is
    a true value in Python, so ``inference_mode="False"`` would freeze the adapter and ``trust_remote_code="false"``
    run a repo's code. ``None`` is accepted only for the switches that default to it (``private``)."""
    for name, value in flags.items():
        if is_flag(value) or (value is None and name in _OPTIONAL_FLAGS):
            continue
        raise TypeError(f"{where}: {name} must be True or False, got {describe_value(value)}"
                        f"{' (a non-empty string is true in Python)' if isinstance(value, str) else ''}.")


#: Switches that take None (meaning "the default") besides True and False.
_OPTIONAL_FLAGS = ("private",)


def is_whole_number(value: Any) -> bool:
    """Whether ``value`` is a whole number: an integer or an integral float (numpy's too), never a boolean or text
    (``int()`` would read ``7.9`` as 7 and ``"12"`` as 12)."""
    whole = isinstance(value, int | np.integer) or (isinstance(value, float | np.floating) and float(value).is_integer())
    return whole and not is_flag(value)


@dataclass
class M2ISTConfig:
    """Configuration of an M²IST side-tuned REC model.

    The defaults reproduce the paper (arXiv 2407.01131): bottleneck 128, adapter scale 0.1, an interaction
    expert (IEA) whose up-projection is shared by both modalities, intra-modal experts (VEA/LEA) on the
    feed-forward taps and the IEA on the attention taps, vision layer ``i`` paired with text layer ``i`` for the
    first ``min(depths)`` layers, a TransVG fusion head (6 layers, d=256, 8 heads) and an L1 + GIoU loss (1:1).

    The ``vision_*`` / ``text_*`` tower fields record which towers the side network was built for; they are
    filled in by :func:`m2ist.get_side_tuned_model` and checked when a saved adapter is loaded.
    """

    # --- M³ISA side network -------------------------------------------------------------------------------
    bottleneck: int = field(default=128, metadata={"help": "Bottleneck width r of every side adapter."})
    adapter_scale: float = field(
        default=0.1, metadata={"help": "Fixed scale s of the intra-modal experts: s · W_up(ReLU(W_down(LN(x)))); "
                                       "positive while 'vea' or 'lea' is in experts."}
    )
    experts: list[str] = field(
        default_factory=lambda: list(EXPERTS),
        metadata={"help": "Experts per depth, any of 'vea', 'lea', 'iea' (ablations drop some)."},
    )
    share_iea_up_projection: bool = field(
        default=True,
        metadata={"help": "Share the IEA up-projection across modalities (the paper's interaction). False gives each "
                  "modality its own up-projection, i.e. no cross-modal sharing."},
    )
    intra_tap: str = field(
        default="ffn", metadata={"help": "Sub-layer read by VEA and LEA: 'ffn', 'attention' or 'layer' (output)."}
    )
    inter_tap: str = field(
        default="attention", metadata={"help": "Sub-layer read by the IEA: 'attention', 'ffn' or 'layer'."}
    )
    vision_layers: list[int] | None = field(
        default=None,
        metadata={"help": "0-based vision layers that carry side adapters. None: chosen by `layer_pairing`."},
    )
    text_layers: list[int] | None = field(
        default=None,
        metadata={"help": "0-based text layers that carry side adapters, paired in order with `vision_layers`. "
                  "None: chosen by `layer_pairing`."},
    )
    layer_pairing: str = field(
        default="first",
        metadata={"help": "How layers pair when depths differ. 'first': layer i with layer i for the first "
                  "min(depths) layers (the paper). 'spread': every layer of the shallower tower, paired with "
                  "evenly spaced layers of the deeper one."},
    )
    side_dropout: float = field(default=0.0, metadata={"help": "Dropout inside the adapters' bottleneck."})

    # --- REC head -----------------------------------------------------------------------------------------
    fusion_dim: int = field(default=256, metadata={"help": "Width of the vision-language fusion encoder."})
    fusion_layers: int = field(
        default=6, metadata={"help": "Layers of the fusion encoder; 0 (no fusion) needs reg_init='text' and "
                                     "box_readout='vote'."}
    )
    fusion_heads: int = field(default=8, metadata={"help": "Attention heads of the fusion encoder."})
    fusion_ffn_dim: int = field(default=2048, metadata={"help": "Feed-forward width of the fusion encoder."})
    fusion_dropout: float = field(default=0.1, metadata={"help": "Dropout of the fusion encoder."})
    box_mlp_layers: int = field(default=3, metadata={"help": "Linear layers of the box MLP on the [REG] token."})
    fusion_norm: str = field(
        default="post",
        metadata={"help": "'post': post-norm fusion layers (TransVG). 'pre': pre-norm layers and a final LayerNorm, "
                  "which train faster from scratch."},
    )
    reg_init: str = field(
        default="learned",
        metadata={"help": "'learned': [REG] starts as a learned embedding (TransVG). 'text': that embedding plus a "
                  "projection of the attention-pooled expression tokens, so [REG] knows the expression before "
                  "the first fusion layer."},
    )
    box_readout: str = field(
        default="reg",
        metadata={"help": "'reg': an MLP on the fused [REG] token regresses the box (TransVG). 'vote': every visual "
                  "patch token votes for the edges of the box under it (relative to its cell) and [REG]'s "
                  "attention over the patches picks whose votes count (learns in far fewer steps; see vote_hops, "
                  "vote_window, point_loss_weight)."},
    )
    vote_hops: int = field(
        default=1,
        metadata={"help": "Vote readout only: rounds of [REG] attending to the patches. From the second on, [REG] "
                  "first takes in the patches it attended to and re-reads the expression, so 'the circle above the "
                  "green square' can find the square, then the circle."},
    )
    vote_window: int | None = field(
        default=1,
        metadata={"help": "Vote readout only: count the votes of the patches within this many cells of the "
                  "most-attended one (1: a 3 x 3 window), re-weighed by the attention, so a hesitation between two "
                  "objects never averages them. None: every patch votes, weighed by the attention."},
    )
    vote_keys: str = field(
        default="fused",
        metadata={"help": "Vote readout only: which visual tokens [REG] points at. 'fused': the tokens after the fusion "
                  "layers (they carry what the patches read from each other and from the text). 'projected': the "
                  "tokens as projected into the head, before fusion, so matching an expression's attributes stays a "
                  "sum over attributes and a colour-shape pair never seen in training is still found (the fused "
                  "[REG] carries the context). 'both': their sum."},
    )
    position_init: str = field(
        default="random",
        metadata={"help": "How the head's position embedding of the visual tokens starts: 'random' (TransVG's learned "
                  "table) or 'sincos' (a 2-D sine-cosine table over the patch grid, as DETR's, still trained), which "
                  "gives the head coordinates from the first step; needs the visual tokens on a known grid."},
    )
    max_query_len: int = field(
        default=20, metadata={"help": "Text tokens fed to the head ([CLS] and [SEP] included); 40 for RefCOCOg."}
    )
    image_size: int | None = field(
        default=None,
        metadata={"help": "Side of the square input canvas in pixels. None: the vision tower's own `image_size` "
                  "if its config has one, else 640 (TransVG)."},
    )
    num_vision_tokens: int | None = field(
        default=None,
        metadata={"help": "Visual tokens the head sees (sets its position-embedding size). None: measured on the "
                  "vision tower at `image_size` when the model is built."},
    )

    # --- loss ---------------------------------------------------------------------------------------------
    box_loss: str = field(
        default="l1", metadata={"help": "Coordinate loss on (cx, cy, w, h): 'l1' (released code) or 'smooth_l1'."}
    )
    box_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the coordinate loss."})
    giou_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the (1 - GIoU) loss."})
    smooth_l1_beta: float = field(default=1.0, metadata={"help": "Beta of the smooth-L1 loss."})
    point_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Vote readout only: weight of the cross-entropy between [REG]'s last attention over the "
                  "patches and the patches inside the target box; it is what teaches the readout where to look."},
    )

    # --- frozen towers ------------------------------------------------------------------------------------
    backbone_dtype: str | None = field(
        default=None,
        metadata={"help": "Run the frozen towers in 'bfloat16' or 'float16' (side network and head stay float32). "
                  "None keeps the towers' dtype."},
    )
    vision_taps: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Explicit taps for a vision tower where the registry and the structural search are wrong, "
                  "e.g. {'layers': 'encoder.layer.*', 'attention': 'attention', 'ffn': 'output.dense'}, and/or its "
                  "token layout: {'num_prefix_tokens': 1, 'num_suffix_tokens': 0}.", "keys": TAP_KEYS},
    )
    text_taps: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Explicit tap names for a text tower (same keys as `vision_taps`).", "keys": TAP_KEYS},
    )

    # --- recorded towers (filled in when the model is built) ----------------------------------------------
    vision_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or path the vision tower is re-loaded from."}
    )
    vision_revision: str | None = field(
        default=None, metadata={"help": "Commit of the vision tower actually loaded (the reload pins it)."}
    )
    vision_model_type: str | None = field(default=None, metadata={"help": "`config.model_type` of the vision tower."})
    vision_model_class: str | None = field(
        default=None, metadata={"help": "transformers class of the vision tower as passed (re-built on reload)."}
    )
    vision_dtype: str | None = field(
        default=None, metadata={"help": "Dtype of the vision tower's weights as trained (a reload loads it so)."}
    )
    vision_width: int | None = field(default=None, metadata={"help": "Width of the vision tower's final output."})
    vision_depth: int | None = field(default=None, metadata={"help": "Number of tapped vision layers."})
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or path the text tower is re-loaded from."}
    )
    text_revision: str | None = field(
        default=None, metadata={"help": "Commit of the text tower actually loaded (the reload pins it)."}
    )
    text_model_type: str | None = field(default=None, metadata={"help": "`config.model_type` of the text tower."})
    text_model_class: str | None = field(
        default=None, metadata={"help": "transformers class of the text tower as passed (re-built on reload)."}
    )
    text_dtype: str | None = field(
        default=None, metadata={"help": "Dtype of the text tower's weights as trained (a reload loads it so)."}
    )
    text_width: int | None = field(default=None, metadata={"help": "Width of the text tower's final output."})
    text_depth: int | None = field(default=None, metadata={"help": "Number of tapped text layers."})

    config_version: int = field(default=CONFIG_FORMAT_VERSION, metadata={"help": "Format version of this file."})

    TOWER_FIELDS: ClassVar[tuple[str, ...]] = ("model_type", "width", "depth")
    #: Fields a model is built from (its modules, their sizes, dropout and scale, the layers and taps it reads, its
    #: canvas and query length, the towers' dtype): changing one on a built model changes nothing it computes, so a
    #: save refuses it (``set_backbone_dtype`` casts the towers and records their dtype).
    BUILD_FIELDS: ClassVar[tuple[str, ...]] = (
        "bottleneck", "adapter_scale", "experts", "share_iea_up_projection", "intra_tap", "inter_tap", "vision_layers",
        "text_layers", "layer_pairing", "side_dropout", "fusion_dim", "fusion_layers", "fusion_heads", "fusion_ffn_dim",
        "fusion_dropout", "box_mlp_layers", "fusion_norm", "reg_init", "box_readout", "vote_hops", "vote_window",
        "vote_keys", "position_init", "max_query_len", "image_size", "vision_taps", "text_taps", "backbone_dtype")
    #: Fields the model fills in (what the towers are, the file's version): recorded, never chosen by a user.
    RECORDED_FIELDS: ClassVar[tuple[str, ...]] = (
        *(f"{modality}_{key}" for modality in ("vision", "text")
          for key in ("model_name_or_path", "revision", "model_type", "model_class", "dtype", "width", "depth")),
        "config_version", "num_vision_tokens")

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        """A field assigned after construction (``config.side_dropout = "0.1"``, ``model.config.box_loss_weight =
        -1``) is checked on its own at once, as at construction. The rules that tie fields together are checked
        where the config is used: when it is saved, when a model is built from it, and before ``RECTrainer.train``;
        so assignments may pass through a state that breaks one (``fusion_layers = 0`` before ``reg_init``).

        A name that is no field but a near miss of one (``config.box_loss_wieght = 0``) warns, naming the field: it
        is kept as a plain attribute, which nothing in m2ist reads and ``save_pretrained`` does not write. Other
        names are kept without a word, as on a transformers config (the Trainer sets ``config.use_cache``)."""
        spec = _FIELD_SPECS.get(name)
        if spec is not None:
            value = _check_value(name, value, _field_hints()[name], spec.metadata)
        elif not name.startswith("_") and (guess := difflib.get_close_matches(name, list(_FIELD_SPECS), n=1,
                                                                              cutoff=0.8)):
            warnings.warn(f"M2ISTConfig has no field {name!r} (did you mean {guess[0]!r}?): the value is kept as a "
                          "plain attribute that m2ist never reads and save_pretrained does not write.", UserWarning,
                          stacklevel=2)
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid value and what would be valid.

        Every field is checked against its annotated type (an integer field refuses ``1e9`` and ``"8"``, a float
        field refuses NaN and infinities), then against :data:`FIELD_BOUNDS`, then against the rules that tie
        fields together.
        """

        def fail(name: str, why: str) -> None:
            raise ValueError(f"M2ISTConfig.{name}={getattr(self, name)!r} is invalid: {why}")

        for spec in dataclasses.fields(self):  # each field on its own (again: a copy or an unpickled one skips setattr)
            setattr(self, spec.name, getattr(self, spec.name))
        if self.box_readout == "vote" and self.vote_window is not None and self.point_loss_weight == 0:
            fail("point_loss_weight", "with vote_window set, only the point loss teaches the readout where to look: "
                 "use a positive weight (1.0) or vote_window=None.")
        if self.fusion_layers == 0 and (self.reg_init != "text" or self.box_readout != "vote"):
            fail("fusion_layers", "without a fusion layer [REG] reads the expression only through reg_init='text' "
                 "and the image only through box_readout='vote' (a [REG] MLP would give every image the same box): "
                 "set both, or use at least one fusion layer.")
        if self.fusion_dim % self.fusion_heads:
            fail("fusion_heads", f"fusion_dim={self.fusion_dim} must be divisible by the number of heads.")
        if self.position_init == "sincos" and self.fusion_dim < 4:
            fail("fusion_dim", "position_init='sincos' needs at least 4 channels (a sine and a cosine per axis): use "
                 "fusion_dim >= 4, or position_init='random'.")
        if self.adapter_scale == 0 and {"vea", "lea"} & set(self.experts):
            fail("adapter_scale", "0 makes every VEA and LEA output zero and gives them no gradient, so they would "
                 "never train: use a positive scale (the paper's 0.1), or drop 'vea' and 'lea' from experts.")
        if self.box_loss_weight == 0 and self.giou_loss_weight == 0:
            fail("giou_loss_weight", "both loss weights are 0: nothing would be trained.")
        if not self.experts or len(set(self.experts)) != len(self.experts):
            fail("experts", f"expected a non-empty list of distinct names from {EXPERTS}.")
        for name in ("vision_layers", "text_layers"):
            layers = getattr(self, name)
            if layers is None:
                continue
            if not layers or any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                fail(name, "expected a non-empty list of distinct non-negative layer indices.")
            if layers != sorted(layers):  # the side network runs through the pairs in list order
                fail(name, f"expected the layers in increasing order ({sorted(layers)}): the side network runs "
                     "through them in the order given, shallow to deep, as the towers do.")
        if (self.vision_layers is None) != (self.text_layers is None):
            fail("text_layers", "give both `vision_layers` and `text_layers`, or neither.")
        if self.vision_layers is not None and len(self.vision_layers) != len(self.text_layers):
            fail("text_layers", f"{len(self.vision_layers)} vision layers cannot pair with "
                 f"{len(self.text_layers)} text layers: give lists of the same length.")
        for name in ("vision_taps", "text_taps"):
            taps = getattr(self, name)
            if taps is None:
                continue
            if set(taps) & {"attention", "ffn", "layout"} and "layers" not in taps:
                fail(name, f"expected a dict of {tuple(TAP_KEYS)}: 'layers' (glob of layer modules) with optional "
                     "'attention', 'ffn', 'layout', and/or the token counts alone.")
            patterns = [taps["layers"]] if isinstance(taps.get("layers"), str) else taps.get("layers")
            if patterns is not None and (not patterns or not all(patterns)):
                fail(name, "'layers' must name the layer modules (a glob such as 'encoder.layer.*', or a list of "
                     "them): an empty one would be ignored, and with it the other tap names.")
            layout = taps.get("layout", "b n c")
            if layout != "b n c" and sorted(layout.split()) != ["b", "c", "h", "w"]:
                fail(name, f"'layout' must be 'b n c' (tokens) or the axes 'b', 'c', 'h', 'w' in the order the tapped "
                     f"outputs have them (e.g. 'b c h w'), got {layout!r}.")
        if self.config_version > CONFIG_FORMAT_VERSION:
            fail("config_version", f"this file was written by a newer m2ist (format {self.config_version}, this "
                 f"version reads up to {CONFIG_FORMAT_VERSION}): upgrade m2ist.")

    # ------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return asdict(self)

    def to_json_string(self) -> str:
        """The config as indented, key-sorted JSON; validated first, so that a save never writes a config its load
        would refuse (fields assigned one by one may break a rule that ties them together)."""
        self.validate()
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> M2ISTConfig:
        """Build a config from a dict (a :meth:`to_dict` output, or some of its fields).

        A dict that carries ``config_version`` and lacks a field of :data:`LEGACY_VALUES` (written before that field
        existed) takes the value listed there, the one its writer computed with, not today's default. Keys this
        version does not know are dropped with a warning in a dict that carries ``config_version`` (what
        ``to_dict`` and ``save_pretrained`` write: another m2ist version wrote it); in one without it (typed by hand,
        or not an m2ist config at all: a PEFT ``adapter_config.json``, a transformers ``config.json``) they are
        refused, naming the field each may be a misspelling of: ``{"bottle_neck": 64}`` must not train with 128.
        """
        if not isinstance(values, dict):
            raise TypeError(f"M2ISTConfig.from_dict needs a dict of field values (a to_dict() output), got "
                            f"{describe_value(values)}.")
        unknown = sorted(set(values) - set(_FIELD_SPECS), key=str)
        if "config_version" in values:  # written by an m2ist: a field it lacks takes the value that m2ist computed with
            values = {**{key: value for key, value in LEGACY_VALUES.items() if key not in values}, **values}
        if unknown and "config_version" in values:
            logger.warning("M2ISTConfig: ignoring unknown keys %s (written by another m2ist version?).", unknown)
        elif unknown:
            raise ValueError(f"M2ISTConfig: unknown field(s) {unknown}{_foreign_config_hint(values, unknown)}; "
                             f"the fields are {sorted(_FIELD_SPECS)}.")
        return cls(**{k: v for k, v in values.items() if k in _FIELD_SPECS})

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``m2ist_config.json`` into ``save_directory`` (created if needed); return its path."""
        from .save_and_load import atomic_write  # it reads this module's names

        path = Path(save_directory) / CONFIG_NAME
        text = self.to_json_string()
        # one temporary file per writer, with the permissions of the adapter's other files (not mkstemp's 0600)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> M2ISTConfig:
        """Read a config JSON file, with a clear error naming the file when it is not one: not a regular file,
        over :data:`MAX_CONFIG_BYTES`, not UTF-8 (a leading byte-order mark is dropped), not JSON, a key given twice
        (JSON would keep the last value), or not an m2ist config (see :meth:`from_dict`)."""
        path = Path(path)
        if path.exists() and not path.is_file():  # a FIFO or a device would block or never end
            kind = "a folder" if path.is_dir() else "not a regular file (a FIFO, a device or a socket)"
            raise ValueError(f"{path} is {kind}, not an m2ist config file.")
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MiB; an m2ist config is a few kilobytes: "
                             "corrupted, or not an m2ist config.")
        try:
            values = json.loads(data.decode("utf-8-sig"), object_pairs_hook=refuse_repeated_keys)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
                             "corrupted, or not an m2ist config.") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}): corrupted, or not an m2ist config.") from err
        except (ValueError, RecursionError) as err:  # a key given twice, a 5000-digit number, 10**5 nested lists
            raise ValueError(f"{path} cannot be read as an m2ist config: {str(err)[:300]}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} holds a {type(values).__name__}, expected a JSON object of config values.")
        missing = sorted({f.name for f in dataclasses.fields(cls)} - set(values))
        if "config_version" in values and missing:  # save_pretrained writes every field with the version
            legacy = {key: LEGACY_VALUES[key] for key in missing if key in LEGACY_VALUES}
            logger.warning("M2ISTConfig: %s lacks %s, so the defaults are used%s (edited by hand, or written by an "
                           "older m2ist?); a field that changes the computation, e.g. adapter_scale, changes the "
                           "results.", path, missing,
                           f", except {legacy} (what the m2ist that wrote it computed with)" if legacy else "")
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs: Any) -> M2ISTConfig:
        """Load ``m2ist_config.json`` from a folder or a Hub repo id; ``hub_kwargs``: ``subfolder``, ``revision``,
        ``token``, ``cache_dir``, ``local_files_only``, ``endpoint``."""
        from .hub import resolve_pretrained

        accepted = ("subfolder", "revision", "token", "cache_dir", "local_files_only", "endpoint")
        unknown = sorted(set(hub_kwargs) - set(accepted))
        if unknown:
            raise TypeError(f"M2ISTConfig.from_pretrained() got unexpected keyword arguments {unknown}; it takes "
                            f"{list(accepted)}. To change settings, load the config and use dataclasses.replace().")
        folder = resolve_pretrained(str(name_or_path), filenames=[CONFIG_NAME], **hub_kwargs)
        return cls.from_json_file(folder / CONFIG_NAME)

    def get_text_config(self, *args: Any, **kwargs: Any) -> Any:
        """The text tower's own config (transformers' composite-config API, used by its ``Trainer`` to align the
        tokenizer's special tokens): the model sets it when built; before that, an empty ``PretrainedConfig``."""
        from transformers import PretrainedConfig

        return getattr(self, "_text_tower_config", None) or PretrainedConfig()

    def tower_mismatches(self, other: M2ISTConfig) -> list[str]:
        """Human-readable differences between the towers recorded here and in ``other``."""
        diffs = []
        for modality in ("vision", "text"):
            for key in self.TOWER_FIELDS:
                name = f"{modality}_{key}"
                mine, theirs = getattr(self, name), getattr(other, name)
                if mine is not None and theirs is not None and mine != theirs:
                    diffs.append(f"{name}: saved {mine!r}, given {theirs!r}")
        return diffs


_FIELD_SPECS: dict[str, dataclasses.Field] = {spec.name: spec for spec in dataclasses.fields(M2ISTConfig)}


@functools.cache
def _field_hints() -> dict[str, Any]:
    """The resolved annotations of :class:`M2ISTConfig`'s fields (once: ``get_type_hints`` is slow)."""
    return typing.get_type_hints(M2ISTConfig)
