"""Where M²IST reads a frozen tower: taps found by structure, and the registry for the exceptions.

M²IST reads, inside every layer of a frozen tower, the output of the attention sub-layer (read by the
interaction expert, IEA) and of the feed-forward sub-layer (read by the intra-modal experts, VEA/LEA).

How a tower's taps are chosen (:func:`resolve_tap_spec`, then :class:`~m2ist.towers.Tower`):

1. **explicit names** from ``M2ISTConfig.vision_taps`` / ``text_taps``;
2. the **registry** (:data:`TAP_REGISTRY`, :func:`register_taps`): the families the generic rule gets wrong or
   that need more than hooks (DETR's encoder-only forward, the paper's post-LayerNorm BERT attention tap,
   Hiera's unrolled token order, SigLIP2's patch inputs);
3. **structure** (:func:`discover_taps`): the repeated block is the class with the most instances in
   ``ModuleList``s; one probe forward with hooks on every sub-module of the first block finds the child whose
   output is added to the block input (the attention sub-layer, first residual) and the child whose output is
   added to that sum (the feed-forward sub-layer, second residual), pre-norm, post-norm or parallel. A block
   without two such residuals (a CNN stage) falls back to the block output for both experts;
4. the ``output_hidden_states`` **fallback** for towers with no repeated block.

Layouts are einops patterns over ``b`` (batch), ``n`` (tokens), ``c`` (channels), ``h``/``w`` (grid), so a
convolutional tower's ``(B, C, H, W)`` maps are read as tokens with one rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from einops import rearrange
from torch import nn

TOKENS = "b n c"
EXACT, FALLBACK = "exact", "fallback"
# parameters that put tokens before (prefix) or after (suffix) the patch grid, by leaf name
PREFIX_PARAMETERS = ("cls_token", "class_embedding", "distillation_token", "dist_token", "register_tokens")
SUFFIX_PARAMETERS = ("detection_tokens",)
TAP_OVERRIDE_KEYS = ("layers", "attention", "ffn", "layout", "num_prefix_tokens", "num_suffix_tokens")


@dataclass(frozen=True)
class Tap:
    """A sub-module (path relative to one layer; ``""`` is the layer itself), the layout of its output and
    which of its calls within one layer call is read (a drop-path module used for both residuals).

    ``branch``: read the module's *input* minus the layer's input instead of its output: the residual branch added
    to the stream before that module, for a branch that is no module's output (SAM's windowed attention,
    re-assembled from its windows in the layer's own code before the residual sum)."""

    module: str
    layout: str = TOKENS
    call: int = 0
    branch: bool = False

    def __repr__(self) -> str:  # ``branch`` only when set: the feature caches fingerprint specs by their repr
        extra = ", branch=True" if self.branch else ""
        return f"Tap(module={self.module!r}, layout={self.layout!r}, call={self.call!r}{extra})"

    def describe(self) -> str:
        """The tap in words, for the tap report."""
        what = f"{self.module} input - layer input" if self.branch else self.module
        return what + (f" (call {self.call + 1})" if self.call else "")


def _none(config: Any) -> int | None:
    return None


@dataclass(frozen=True)
class TapSpec:
    """Where a tower's per-layer activations are, and how to run the tower.

    Attributes:
        layers: glob patterns of the layer modules (``*`` is one dotted component); a module matching any of
            them is a layer. Empty means
            "use ``output_hidden_states``". Layers are indexed by call order (a shared ALBERT layer called
            twice is two layers).
        attention: the attention sub-layer output inside a layer.
        ffn: the feed-forward sub-layer output inside a layer.
        layer_layout: layout of a layer's input and output and of the tower's final output.
        num_prefix_tokens: tokens before the patch grid (CLS, distillation, registers); ``None`` reads them
            from the tower's token parameters (``cls_token``, ``register_tokens``, ...).
        num_suffix_tokens: tokens after the patch grid (YOLOS detection tokens); ``None``: read likewise.
        encode: a custom forward ``(model, **inputs) -> (tokens, token_mask | None)`` for towers whose own
            forward does more than the encoder (DETR runs a decoder that REC does not use).
        prepare_inputs: extra forward inputs ``(model, pixel_values, pixel_mask) -> dict`` (SigLIP2's patches).
        reorder: ``(model, tokens) -> tokens`` putting a tap's tokens back in raster order (Hiera).
        hidden_states_key: output field holding per-layer states for the ``output_hidden_states`` fallback.
        unused_modules: sub-modules the REC path never runs (DETR's decoder, poolers); they are left out of the
            parameter counts.
        refuse: when set, building on this family raises this reason.
        note: a line for documentation (what is tapped, and any approximation).
        source: where the spec came from: 'registry', 'structure', 'explicit' or 'hidden_states'.
    """

    layers: tuple[str, ...] = ()
    attention: Tap | None = None
    ffn: Tap | None = None
    layer_layout: str = TOKENS
    num_prefix_tokens: Callable[[Any], int | None] = field(default=_none)
    num_suffix_tokens: Callable[[Any], int | None] = field(default=_none)
    encode: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = None
    prepare_inputs: Callable[..., dict[str, Any]] | None = None
    reorder: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    hidden_states_key: str = "hidden_states"
    unused_modules: tuple[str, ...] = ()
    refuse: str | None = None
    note: str = ""
    source: str = "registry"

    @property
    def uses_hidden_states(self) -> bool:
        """True when the taps come from ``output_hidden_states`` rather than forward hooks."""
        return not self.layers

    @property
    def status(self) -> str:
        """'exact' when both experts read sub-layer outputs, else 'fallback' (layer outputs)."""
        return EXACT if self.attention is not None and self.ffn is not None else FALLBACK

    def tap(self, kind: str) -> Tap:
        """The tap for ``kind`` in {'attention', 'ffn', 'layer'}, falling back to the layer output."""
        chosen = {"attention": self.attention, "ffn": self.ffn}.get(kind)
        return chosen if chosen is not None else Tap("", self.layer_layout)


@dataclass(frozen=True)
class TapReport:
    """What one tower feeds each expert, as logged at build and returned by ``model.tap_report()``."""

    modality: str
    model_type: str | None
    model_class: str
    status: str
    source: str
    depth: int
    layers: tuple[str, ...]
    attention: str | None
    ffn: str | None
    num_prefix_tokens: int = 0
    num_suffix_tokens: int = 0
    grid: tuple[int, int] | None = None
    note: str = ""
    mixer: str = ""  # set when the IEA reads, in some layers, a token mixer that is not attention (see Tower)

    def __str__(self) -> str:
        expert = "VEA" if self.modality == "vision" else "LEA"
        shown = self.layers if len(self.layers) <= 3 else (*self.layers[:2], "...", self.layers[-1])
        line = (f"{self.modality} tower {self.model_class} ({self.model_type}): {self.status} taps from "
                f"{self.source}; {self.depth} layers [{', '.join(shown)}]; IEA <- {self.attention or 'layer output'}, "
                f"{expert} <- {self.ffn or 'layer output'}")
        if self.mixer:
            line += f" ({self.mixer})"
        if self.modality == "vision":
            line += (f"; tokens: {self.num_prefix_tokens} prefix + {self.grid[0]}x{self.grid[1]} grid"
                     if self.grid else f"; tokens: {self.num_prefix_tokens} prefix, no grid")
            if self.num_suffix_tokens:
                line += f" + {self.num_suffix_tokens} suffix (moved before the grid)"
        return line


VISION_TAPS: dict[str, TapSpec] = {}
TEXT_TAPS: dict[str, TapSpec] = {}
TAP_REGISTRY: dict[str, dict[str, TapSpec]] = {"vision": VISION_TAPS, "text": TEXT_TAPS}


def register_taps(modality: str, model_types: Iterable[str], spec: TapSpec) -> TapSpec:
    """Register ``spec`` for each of ``model_types`` (``config.model_type`` values) of ``modality``."""
    if modality not in TAP_REGISTRY:
        raise ValueError(f"modality must be 'vision' or 'text', got {modality!r}.")
    for model_type in model_types:
        TAP_REGISTRY[modality][model_type] = spec
    return spec


def supported_model_types(modality: str) -> list[str]:
    """The ``model_type`` values with registered taps for ``modality``."""
    return sorted(TAP_REGISTRY[modality])


def tap_spec_from_dict(values: dict[str, Any]) -> TapSpec:
    """A spec from explicit names: ``{'layers': glob, 'attention': name, 'ffn': name, 'layout': pattern,
    'num_prefix_tokens': int, 'num_suffix_tokens': int}`` (token counts default to the tower's token
    parameters)."""
    layout = values.get("layout", TOKENS)
    layers = values["layers"]
    return TapSpec(
        layers=(layers,) if isinstance(layers, str) else tuple(layers),
        attention=Tap(values["attention"], layout) if values.get("attention") is not None else None,
        ffn=Tap(values["ffn"], layout) if values.get("ffn") is not None else None,
        layer_layout=layout,
        note="explicit taps", source="explicit",
    )


def with_token_overrides(spec: TapSpec, values: dict[str, Any] | None) -> TapSpec:
    """``spec`` with ``num_prefix_tokens`` / ``num_suffix_tokens`` from an override dict, when given."""
    values = values or {}
    changes: dict[str, Any] = {}
    for key in ("num_prefix_tokens", "num_suffix_tokens"):
        if values.get(key) is not None:
            changes[key] = lambda config, n=int(values[key]): n
    return replace(spec, **changes) if changes else spec


def resolve_tap_spec(model: nn.Module, modality: str, override: dict[str, Any] | None = None) -> TapSpec | None:
    """The spec for ``model``: explicit names, else the registry; ``None`` means "find the taps by structure"
    (see :func:`discover_taps`).

    Raises ``ValueError`` naming the supported model types when the model has no config to go by.
    """
    if modality not in TAP_REGISTRY:
        raise ValueError(f"modality must be 'vision' or 'text', got {modality!r}.")
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if override is not None and override.get("layers"):
        return with_token_overrides(tap_spec_from_dict(override), override)
    if model_type in TAP_REGISTRY[modality]:
        return with_token_overrides(TAP_REGISTRY[modality][model_type], override)
    if config is not None:
        return None
    raise ValueError(
        f"Cannot tap the {modality} tower {type(model).__name__} (model_type={model_type!r}): it is not in the tap "
        f"registry ({', '.join(supported_model_types(modality))}) and has no Hugging Face config. Pass explicit "
        f"tap names, e.g. M2ISTConfig({modality}_taps={{'layers': 'encoder.layer.*', 'attention': 'attention', "
        f"'ffn': 'output.dense'}}), or register a TapSpec with m2ist.taps.register_taps()."
    )


def hidden_states_spec(model: nn.Module, why: str = "no repeated block found") -> TapSpec:
    """The ``output_hidden_states`` fallback spec, or a ``ValueError`` when the tower has no hidden states."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not hasattr(config, "output_hidden_states"):
        raise ValueError(f"Cannot tap {type(model).__name__} ({model_type}): no repeated block and no hidden states; "
                         "pass explicit tap names (M2ISTConfig.vision_taps / text_taps).")
    return TapSpec(note=f"both experts read the layer outputs (output_hidden_states): {why}", source="hidden_states")


def _glob(pattern: str) -> re.Pattern[str]:
    """A module-name glob in which ``*`` stands for one dotted component."""
    return re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$")


def find_layers(model: nn.Module, spec: TapSpec) -> list[tuple[str, nn.Module]]:
    """The layer modules matched by any of ``spec.layers``, in module order."""
    named = dict(model.named_modules())
    regexes = [_glob(pattern) for pattern in spec.layers]
    matches = [(name, module) for name, module in named.items() if any(r.match(name) for r in regexes)]
    if matches:
        return matches
    raise ValueError(
        f"None of the layer patterns {list(spec.layers)} matches a module of {type(model).__name__}. Its top-level "
        f"modules are {[n for n in named if n and '.' not in n]}; pass explicit tap names in M2ISTConfig."
    )


def get_submodule(layer: nn.Module, path: str, layer_name: str) -> nn.Module:
    """``layer.get_submodule(path)`` with an error that lists what the layer has. ``path`` may give alternatives
    separated by ``|``, the first the layer has being taken: a hybrid stack whose layers are one class but mix tokens
    by different sub-modules (LFM2's ``conv|self_attn``, Bamba's ``mamba|self_attn``)."""
    if not path:
        return layer
    for option in path.split("|"):
        try:
            return layer.get_submodule(option)
        except AttributeError:
            continue
    children = [n for n, _ in layer.named_modules() if n]
    raise ValueError(f"Layer {layer_name!r} has no sub-module {path!r}; it has {children}.")


def has_submodule(layer: nn.Module, path: str) -> bool:
    """Whether :func:`get_submodule` finds ``path`` (or one of its ``|`` alternatives) in ``layer``."""
    try:
        get_submodule(layer, path, "")
    except ValueError:
        return False
    return True


def count_token_parameters(model: nn.Module, names: tuple[str, ...], skip: tuple[str, ...] = ()) -> int:
    """Tokens contributed by parameters whose leaf name is in ``names`` (``(1, k, C)`` gives k, ``(C,)`` gives 1),
    outside the modules ``skip`` and outside heads and poolers (AIMv2's attention-pooling head has a CLS token)."""
    total = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        in_head = any(part.endswith(("head", "pooler")) for part in parts[:-1])
        if parts[-1] in names and not in_head and not name.startswith(tuple(f"{s}." for s in skip)):
            total += param.numel() // param.shape[-1]
    return total


# --------------------------------------------------------------------------------------------------------------
# Taps found by structure
# --------------------------------------------------------------------------------------------------------------
def find_block_names(model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """The repeated block: among ``ModuleList``s / ``Sequential``s of one composite class (three modules or more,
    a normalisation inside), the class with the most instances (ties: the most deeply nested), in module order.
    Empty when the tower has none."""
    by_class: dict[type, list[str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList | nn.Sequential) or not len(module) or name.startswith(skip):
            continue
        classes = {type(child) for child in module}
        child = module[0]
        normalised = any("Norm" in type(m).__name__ for m in child.modules())
        if len(classes) == 1 and len(list(child.modules())) >= 3 and normalised:
            by_class.setdefault(type(child), []).extend(f"{name}.{i}" if name else str(i) for i in range(len(module)))
    if not by_class:
        return []
    return max(by_class.values(), key=lambda names: (len(names), names[0].count(".")))


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor of a module output (tensor, tuple or ``ModelOutput``)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, tuple | list):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    return None


def input_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A module's main input: its first positional tensor, else ``hidden_states=``, else the first tensor."""
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


@dataclass
class _Record:
    path: str
    call: int
    order: int
    input: torch.Tensor | None = None
    output: torch.Tensor | None = None


class BlockRecorder:
    """Hooks on every sub-module of one block, recording inputs and outputs during the block's first call."""

    def __init__(self, block: nn.Module) -> None:
        self.block, self.records, self.calls = block, [], {}
        self.active, self.done = False, False
        self.block_input: torch.Tensor | None = None
        self.block_output: torch.Tensor | None = None
        self.handles = [block.register_forward_pre_hook(self._enter, with_kwargs=True),
                        block.register_forward_hook(self._leave)]
        pending: dict[str, list[_Record]] = {}
        for path, module in block.named_modules():
            if not path:
                continue
            self.handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, path=path: self._pre(path, args, kwargs), with_kwargs=True))
            self.handles.append(module.register_forward_hook(lambda _m, _a, out, path=path: self._post(path, out)))
        self._pending = pending

    def _enter(self, _module, args, kwargs) -> None:
        if not self.done:
            self.active, self.block_input = True, input_tensor(args, kwargs)

    def _leave(self, _module, _args, out) -> None:
        if self.active:
            self.block_output, self.active, self.done = _first_tensor(out), False, True

    def _pre(self, path: str, args, kwargs) -> None:
        if self.active:
            call = self.calls.get(path, 0)
            self.calls[path] = call + 1
            self._pending.setdefault(path, []).append(_Record(path, call, -1, input=input_tensor(args, kwargs)))

    def _post(self, path: str, out) -> None:
        if self.active and self._pending.get(path):
            record = self._pending[path].pop()
            record.output, record.order = _first_tensor(out), len(self.records)
            self.records.append(record)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape or not a.is_floating_point() or not b.is_floating_point():
        return False
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-6)
    return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-4 * scale))


def _sums_to(stream: torch.Tensor, branch: torch.Tensor, target: torch.Tensor) -> bool:
    """``stream + branch == target`` up to rounding (element-wise, on the operands' scale), and the branch changes
    the stream (a branch lost in the rounding proves nothing)."""
    eps = torch.finfo(target.dtype).eps if target.is_floating_point() else 1e-7
    stream, branch, target = stream.float(), branch.float(), target.float()
    total = stream + branch
    if not bool((total != stream).any()):
        return False
    bound = 8 * eps * (stream.abs() + branch.abs()) + 1e-30
    return bool(((total - target).abs() <= bound).all())


def _nonzero(a: torch.Tensor) -> bool:
    return bool(a.float().abs().max() > 1e-6)


def _shallowest_alias(chosen: _Record, records: list[_Record]) -> _Record:
    """The outermost sub-module (then the earliest) whose output is the same tensor as ``chosen``'s."""
    same = [r for r in records if r.output is chosen.output or _close(r.output, chosen.output)]
    return min(same, key=lambda r: (r.path.count("."), r.order))


def _before_scale(chosen: _Record, records: list[_Record], norms: frozenset[str] = frozenset()) -> _Record:
    """Step back through a per-channel scale (layer scale, as a module or a parameter: output = gamma * an earlier
    sub-module's output) to the sub-layer it scales. A normalisation (``norms``: paths of the block's norm modules)
    is never stepped back through: it is the post-norm whose output is added to the stream (Olmo2, Gemma2), and it
    only looks like a per-channel scale of its input when that input is far below its eps (a small random init)."""
    if chosen.path in norms:
        return chosen
    out = chosen.output.float()
    channels = (0, 1) if out.dim() == 3 else (0, *range(2, out.dim()))
    for feeder in sorted((r for r in records if r.order < chosen.order), key=lambda r: -r.order):
        source = feeder.output.float()
        if _close(source, out):
            continue
        gamma = (source * out).sum(channels, keepdim=True) / (source * source).sum(channels, keepdim=True).clamp_min(1e-30)
        if _close(source * gamma, out):
            return _shallowest_alias(feeder, records)
    return chosen


def residual_taps(recorder: BlockRecorder) -> tuple[Tap, Tap] | None:
    """The (attention, feed-forward) taps of a recorded block: the sub-module whose output is added to the block
    input, and the one whose output is added to that sum (or to its normalisation, post-norm), or two outputs both
    added to the input (parallel blocks). A layer that takes and returns ``(B, C, H, W)`` maps but runs its
    sub-layers channels-last (VitDet) is searched channels-last, its taps read as ``b h w c``. None when the block
    has no two such residuals."""
    x, y = recorder.block_input, recorder.block_output
    if x is None or y is None or x.shape != y.shape:
        return None
    found = _residual_pair(recorder, x, y, TOKENS)
    if found is None and x.dim() == 4:
        found = _residual_pair(recorder, x.permute(0, 2, 3, 1), y.permute(0, 2, 3, 1), "b h w c")
    return found


def _residual_pair(recorder: BlockRecorder, x: torch.Tensor, y: torch.Tensor, layout: str) -> tuple[Tap, Tap] | None:
    """:func:`residual_taps` for a block input ``x`` and output ``y`` in the sub-layers' axis order."""
    records = [r for r in recorder.records if r.output is not None and r.output.shape == x.shape
               and _nonzero(r.output)]
    targets = [(r.order, r.input) for r in recorder.records if r.input is not None and r.input.shape == x.shape]
    targets.append((len(recorder.records), y))
    norms = frozenset(path for path, module in recorder.block.named_modules()
                      if path and "Norm" in type(module).__name__)

    def tap(record: _Record, branch: bool = False) -> Tap:
        return Tap(record.path, layout, call=record.call, branch=branch)

    def added(stream: torch.Tensor, candidate: _Record, after: int) -> torch.Tensor | None:
        for order, target in targets:
            if order > max(after, candidate.order) and target is not candidate.output \
                    and _sums_to(stream, candidate.output, target):
                return target
        return None

    # the stream the first residual is added to: the block input, else the output of a sub-module run on it (a
    # block that mixes locally before its two residuals: SwiftFormer's local representation)
    bases = [(x, -1)] + [(r.output, r.order) for r in records if r.input is x or _close(r.input, x)]
    for (base, start), first in ((b, f) for b in bases for f in records):
        sum_one = added(base, first, start) if first.order > start else None
        if sum_one is None or _close(first.output, sum_one):
            continue
        streams = [sum_one] + [r.output for r in recorder.records
                               if r.output is not None and r.output.shape == x.shape
                               and (r.input is sum_one or _close(r.input, sum_one))]
        for second in records:
            if second.order <= first.order or any(_close(second.output, s) for s in streams):
                continue
            if any(added(s, second, first.order) is not None for s in streams):
                return (tap(_before_scale(_shallowest_alias(first, records), records, norms)),
                        tap(_before_scale(_shallowest_alias(second, records), records, norms)))
    for first in records:  # parallel attention and MLP: y = x + attn + mlp
        for second in records:
            if second.order > first.order and _sums_to(x + first.output, second.output, y) \
                    and _sums_to(x + second.output, first.output, y):
                return tap(_shallowest_alias(first, records)), tap(_shallowest_alias(second, records))
    # a first branch that is no sub-module's output (SAM: windowed attention re-assembled in the layer's own code):
    # the stream after it enters the second sub-layer's pre-norm, and that sub-layer's output is added to it
    for norm in (r for r in recorder.records if r.path in norms and r.input is not None and r.input.shape == x.shape):
        stream = norm.input
        if _close(stream, x) or not _nonzero(stream.float() - x.float()):
            continue
        for second in records:
            if second.order > norm.order and not _close(second.output, stream) \
                    and added(stream, second, norm.order) is not None:
                return (tap(_shallowest_input(norm, recorder.records), branch=True),
                        tap(_before_scale(_shallowest_alias(second, records), records, norms)))
    return None


def _shallowest_input(chosen: _Record, records: list[_Record]) -> _Record:
    """The outermost sub-module (then the earliest) whose input is the same tensor as ``chosen``'s."""
    same = [r for r in records if r.input is chosen.input or _close(r.input, chosen.input)]
    return min(same, key=lambda r: (r.path.count("."), r.order))


def structural_spec(layer_paths: list[str], recorder: BlockRecorder, model_type: str | None) -> TapSpec:
    """A spec from the repeated block's paths and the residual structure recorded on its first call."""
    found = residual_taps(recorder)
    pattern = list(dict.fromkeys(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", path) for path in layer_paths))
    if found is None:
        return TapSpec(layers=tuple(pattern), note=f"{model_type}: no attention/feed-forward residual pair in the "
                       "block (a CNN stage): both experts read the block output", source="structure")
    attention, ffn = found
    return TapSpec(layers=tuple(pattern), attention=attention, ffn=ffn, source="structure",
                   note=f"{model_type}: sub-layers found by structure (the outputs added to the residual stream)")


# --------------------------------------------------------------------------------------------------------------
# Custom forwards and inputs
# --------------------------------------------------------------------------------------------------------------
def detr_encode(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, **_: Any):
    """DETR without its decoder: CNN backbone -> 1x1 input projection -> transformer encoder (TransVG's visual
    branch). Returns the encoder's tokens and their validity mask (from the downsampled pixel mask)."""
    batch, _, height, width = pixel_values.shape
    if pixel_mask is None:
        pixel_mask = torch.ones((batch, height, width), dtype=torch.long, device=pixel_values.device)
    feature_map, mask = model.backbone(pixel_values, pixel_mask)[-1]
    tokens = rearrange(model.input_projection(feature_map), "b c h w -> b (h w) c")
    position = rearrange(model.position_embedding(shape=feature_map.shape, device=pixel_values.device,
                                                  dtype=tokens.dtype, mask=mask), "b c h w -> b (h w) c")
    encoded = model.encoder(inputs_embeds=tokens, attention_mask=mask.flatten(1),
                            spatial_position_embeddings=position)
    return encoded.last_hidden_state, mask.flatten(1).bool()


def siglip2_inputs(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> dict[str, Any]:
    """SigLIP2 (NaFlex) takes patches, not pixels: cut the canvas into ``patch_size`` patches (the processor's
    order), with the patch grid as ``spatial_shapes`` and the pixel mask, per patch, as ``pixel_attention_mask``."""
    patch = model.config.patch_size
    height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
    patches = rearrange(pixel_values[..., :height * patch, :width * patch], "b c (h p) (w q) -> b (h w) (p q c)",
                        p=patch, q=patch)
    batch = pixel_values.shape[0]
    if pixel_mask is None:
        mask = torch.ones(batch, height * width, dtype=torch.long, device=pixel_values.device)
    else:
        mask = rearrange(torch.nn.functional.adaptive_max_pool2d(pixel_mask[:, None].float(), (height, width)),
                         "b 1 h w -> b (h w)").long()
    shapes = torch.tensor([[height, width]] * batch, dtype=torch.long, device=pixel_values.device)
    return {"pixel_values": patches, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def hiera_inputs(model: nn.Module, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> dict[str, Any]:
    """Hiera's unroll / reroll schedule is fixed for its ``config.image_size``: other canvases are refused."""
    size = list(model.config.image_size)
    if list(pixel_values.shape[-2:]) != size:
        raise ValueError(f"its unroll schedule is fixed at its image size {size[0]}x{size[1]}, not "
                         f"{pixel_values.shape[-2]}x{pixel_values.shape[-1]}: use M2ISTConfig(image_size={size[0]})")
    return {"pixel_values": pixel_values}


def hiera_raster(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Hiera keeps tokens "unrolled" between stages; put them back in raster order with the tower's own reroll
    (the stage is the one whose grid has this many tokens)."""
    encoder = model.encoder
    for stage in sorted(encoder.schedule):
        _, size = encoder.schedule[stage]
        if size[0] * size[1] == tokens.shape[1]:
            return rearrange(encoder.reroll(tokens, stage_idx=stage), "b h w c -> b (h w) c")
    raise ValueError(f"Hiera's unroll schedule is fixed at its config.image_size={model.config.image_size}: "
                     f"{tokens.shape[1]} tokens match none of its stages; use M2ISTConfig(image_size="
                     f"{model.config.image_size[0]})")


# --------------------------------------------------------------------------------------------------------------
# Vision towers the structural rule does not cover
# --------------------------------------------------------------------------------------------------------------
register_taps("vision", ["detr", "conditional_detr"], TapSpec(
    layers=("encoder.layers.*",), attention=Tap("self_attn"), ffn=Tap("mlp"), encode=detr_encode,
    hidden_states_key="encoder_hidden_states", unused_modules=("decoder", "query_position_embeddings"),
    num_prefix_tokens=lambda config: 0,
    note="the encoder only (ResNet + input projection + encoder; decoder skipped and not counted): raw "
         "self-attention and FFN outputs, as in the paper",
))
register_taps("vision", ["deformable_detr"], TapSpec(
    refuse="its encoder reads multi-scale tokens (several feature maps at once), which no single patch grid "
           "holds; use DETR or Conditional DETR (single scale)",
    note="refused: multi-scale tokens",
))
register_taps("vision", ["convnext", "convnextv2"], TapSpec(
    layers=("encoder.stages.*.layers.*",), attention=Tap("dwconv", "b c h w"), ffn=Tap("pwconv2", "b h w c"),
    layer_layout="b c h w", num_prefix_tokens=lambda config: 0,
    note="one residual per block: the depth-wise conv (token mixer) stands for attention, pwconv2 for the FFN; "
         "stages pooled to the last stage's grid",
))
register_taps("vision", ["mobilevit", "mobilevitv2"], TapSpec(
    layers=("encoder.layer.*",),
    note="its transformer blocks run on unfolded patches (batch x patch area), not on image tokens: both experts "
         "read the stage outputs (its hidden_states lack the stem output, so the stages are hooked)",
))
register_taps("vision", ["vit_mae"], TapSpec(
    refuse="ViTMAEModel shuffles and drops patches at random on every forward (MAE pre-training); load the same "
           "checkpoint as ViTModel",
    note="refused: random patch masking",
))
register_taps("vision", ["hiera"], TapSpec(
    layers=("encoder.stages.*.layers.*",), attention=Tap("attn"), ffn=Tap("mlp"), reorder=hiera_raster,
    prepare_inputs=hiera_inputs,
    num_prefix_tokens=lambda config: 0, unused_modules=("pooler",),
    note="tokens are unrolled between stages: every tap is put back in raster order with the tower's reroll",
))
register_taps("vision", ["siglip2_vision_model"], TapSpec(
    layers=("vision_model.encoder.layers.*", "encoder.layers.*"), attention=Tap("self_attn"), ffn=Tap("mlp"),
    prepare_inputs=siglip2_inputs, num_prefix_tokens=lambda config: 0, unused_modules=("vision_model.head",),
    note="patches, their grid (spatial_shapes) and a per-patch pixel mask are computed from the canvas",
))

# --------------------------------------------------------------------------------------------------------------
# Text towers
# --------------------------------------------------------------------------------------------------------------
_BERT_LIKE = TapSpec(
    layers=("encoder.layer.*",), attention=Tap("attention.output"), ffn=Tap("output.dense"), unused_modules=("pooler",),
    note="the paper's BERT taps: attention block output after its LayerNorm, FFN output dense before the residual",
)
register_taps("text", ["bert", "roberta", "xlm-roberta", "deberta-v2", "deberta", "electra", "camembert", "ernie"],
              _BERT_LIKE)
register_taps("text", ["mobilebert"], TapSpec(
    layers=("encoder.layer.*",), unused_modules=("pooler",),
    note="both experts read the layer outputs: each layer stacks its feed-forward networks (ffn.*) inside a "
         "bottleneck, which the structural search would take for the layers (3x too many, at the bottleneck width)",
))
