"""Running a frozen tower and reading its taps.

:class:`Tower` wraps one Hugging Face model with its :class:`~m2ist.taps.TapSpec`. ``tower(inputs)`` returns the
final tokens and their mask; ``tower.tap(inputs, layers, kinds)`` also returns, for the requested layers, the
attention / feed-forward outputs and the first layer's input (the side stream's seed), all as ``(B, N, C)``
tokens on the final output's grid. The hooks are registered once, when the tower is built, and capture only
inside :meth:`Tower.tap` (so ``torch.compile`` sees the same module graph every step).

Visual tokens always come out in one canonical order: prefix tokens (CLS, distillation, registers, then any
suffix tokens such as YOLOS's detection tokens, moved to the front), then the patch grid in raster order.
Hierarchical towers (Swin, ConvNeXt, PVT, ...) change grid and width per stage: every tap is average-pooled to
the last stage's grid and keeps its own width (the adapters' down-projections absorb it).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import re
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .save_and_load import module_meta_problem
from .taps import (
    PREFIX_PARAMETERS,
    SUFFIX_PARAMETERS,
    TOKENS,
    BlockRecorder,
    Tap,
    TapReport,
    TapSpec,
    _first_tensor,
    count_token_parameters,
    find_block_names,
    find_layers,
    get_submodule,
    has_submodule,
    hidden_states_spec,
    input_tensor,
    resolve_tap_spec,
    structural_spec,
)

logger = logging.getLogger(__name__)

#: Modules that compute otherwise in ``train()`` mode: dropout draws, batch norm reads the batch's statistics.
_RANDOM_IN_TRAINING = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)

VISION, TEXT = "vision", "text"
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


@dataclass
class TowerFeatures:
    """What one tower gives the side network and the head.

    Attributes:
        tokens: the tower's final output ``E``, ``(B, N, C)``.
        mask: ``(B, N)`` bool, True for real tokens (False for text or image padding).
        seed: the first layer's input (the side stream's start), ``(B, N, C0)``; None when not tapped.
        taps: ``{kind: [tensor per requested layer]}``, each ``(B, N, C_i)``.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    seed: torch.Tensor | None = None
    taps: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@torch.compiler.disable  # the kept length depends on the data: one eager call, not a graph break inside a graph
def without_trailing_padding(features: TowerFeatures) -> TowerFeatures:
    """``features`` without the token columns after the batch's last real token (where ``mask`` is False on every
    row), as a collator that pads to the longest sequence would give them.

    The processor pads every expression to ``max_query_len`` so that a phrase's tower features never depend on the
    batch; the side network is per token and the head masks padded keys, so the real tokens' results do not
    depend on those columns either, and dropping them saves their share of the side network's and the head's work
    and activations (the demo's batches use 10 or 11 of 16 columns). Features whose tensors do not all have the
    mask's token count (a tower that pools tokens between layers) come back unchanged, as do features with no
    padding column or no real token."""
    length = features.mask.shape[1]
    tensors = [features.tokens, *([] if features.seed is None else [features.seed]),
               *(t for taps in features.taps.values() for t in taps)]
    if any(t.dim() < 2 or t.shape[1] != length for t in tensors):
        return features
    real = features.mask.any(0).nonzero()
    keep = int(real[-1]) + 1 if len(real) else length
    if keep == length:
        return features

    def kept(tensor: torch.Tensor) -> torch.Tensor:  # a copy: a view would keep the padded storage for backward
        return tensor[:, :keep].contiguous()

    return TowerFeatures(tokens=kept(features.tokens), mask=kept(features.mask),
                         seed=None if features.seed is None else kept(features.seed),
                         taps={kind: [kept(t) for t in taps] for kind, taps in features.taps.items()})


def to_tokens(x: torch.Tensor, layout: str, aspect: float | None = None,
              tie_last: bool = False) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``x`` in ``layout`` (an einops pattern) as ``(B, N, C)`` tokens, plus its grid when the layout has one.

    A 4-D tensor given as plain tokens is read as ``(B, C, H, W)``, the convention of Hugging Face CNN outputs, unless
    ``aspect`` (the canvas's height / width) shows it channels-last, ``(B, H, W, C)`` (SAM's vision layers): its middle
    axes then form a grid of the canvas's aspect and its last two a grid further from it. A map whose shape reads
    both ways alike (as many channels as grid rows and columns) is read channels-last when ``tie_last``.
    """
    if layout == TOKENS and x.dim() == 4:
        layout = "b h w c" if aspect is not None and _channels_last(x.shape, aspect, tie_last) else "b c h w"
    if layout == TOKENS:
        return x, None
    grid_axes = dict(zip(layout.split(), x.shape))
    return rearrange(x, f"{layout} -> b (h w) c"), (grid_axes["h"], grid_axes["w"])


def _aspect_errors(shape: torch.Size, aspect: float) -> tuple[float, float]:
    """How far a ``(B, ?, ?, ?)`` map's grid is from the canvas's aspect, read channels-last and channels-first."""
    def error(height: int, width: int) -> float:
        return abs(math.log(height / width / aspect))

    return error(shape[1], shape[2]), error(shape[2], shape[3])


def _channels_last(shape: torch.Size, aspect: float, tie_last: bool = False) -> bool:
    """Whether a ``(B, ?, ?, ?)`` feature map is ``(B, H, W, C)``: read so, its grid is within 1.5x of the canvas's
    aspect and nearer to it than read as ``(B, C, H, W)`` (a tie: ``tie_last``, see :func:`ties_channels_last`)."""
    last, first = _aspect_errors(shape, aspect)
    return last < math.log(1.5) and (last < first or (tie_last and last == first))


def ties_channels_last(maps: list[torch.Tensor], aspect: float | None) -> bool:
    """Whether a tower's 4-D maps whose shape reads both ways alike are channels-last: when all its other 4-D maps
    read unambiguously are. SAM2's Hiera stages are ``(B, H, W, C)``; on a 384-pixel canvas its first stage is
    ``(B, 96, 96, 96)``, which the shape rule alone read channels-first (a CNN's 64-channel 64x64 map stays so)."""
    if aspect is None:
        return False
    votes = {_channels_last(x.shape, aspect) for x in maps if x.dim() == 4
             and _aspect_errors(x.shape, aspect)[0] != _aspect_errors(x.shape, aspect)[1]}
    return votes == {True}


class TowerLayoutError(ValueError):
    """A tower whose layers' tokens cannot be lined up with its output's (its structure, not how it was passed)."""


def infer_grid(num_tokens: int, aspect: float, square_only: bool | None = None) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``num_tokens`` patch tokens for an ``h / w`` aspect ratio.

    A square image (aspect 1) only takes a square grid unless ``square_only=False`` (a tower whose config says
    its grid is not square).
    """
    square_only = aspect == 1.0 if square_only is None else square_only
    height = max(1, round(math.sqrt(num_tokens * aspect)))
    width = num_tokens // height
    if height * width != num_tokens or (square_only and height != width):
        raise ValueError(f"Cannot lay {num_tokens} tokens on a {'square ' if square_only else ''}grid of aspect "
                         f"{aspect:.3f}.")
    return height, width


def resample_tokens(x: torch.Tensor, grid: tuple[int, int] | None, target: torch.Tensor, target_grid,
                    prefix: int, dropped: int = 0) -> torch.Tensor:
    """Bring tap ``x`` to the final output's token layout (``prefix`` leading tokens, then ``target_grid``) by
    average-pooling its patch grid. A tap from a stage without the leading tokens (PVT adds its CLS token in the
    last stage) gets their place filled with the mean of its pooled patches; the ``dropped`` leading tokens of a
    tower whose output is a feature map without them (CvT's last-stage CLS token) are left out of a tap."""
    if x.shape[1] == target.shape[1] and (grid is None or grid == target_grid):
        return x
    if x.dim() == 3 and x.shape[:2] == target.shape[:2][::-1]:
        raise TowerLayoutError(f"A layer gives tensors of shape {tuple(x.shape)} where the final output is "
                               f"{tuple(target.shape)}: its layers are sequence-first (tokens, batch, width), as "
                               "XLNet's are, and m2ist reads batch-first layers (batch, tokens, width); use a tower "
                               "whose layers are batch-first")
    if target_grid is None:
        how = ("pads the sequence inside its layers and cuts the padding off at the end (as Longformer does, to a "
               "multiple of its attention window)") if x.shape[1] > target.shape[1] else \
            "changes its sequence length between layers (as Funnel does)"
        raise TowerLayoutError(f"A layer gives {x.shape[1]} tokens but the final output has {target.shape[1]} and no "
                               f"patch grid to pool them on: the tower {how}, so its layers' tokens cannot be lined "
                               "up with the output's; use a tower whose layers keep the sequence length")
    aspect = target_grid[0] / target_grid[1]
    lead = prefix if grid is None else x.shape[1] - grid[0] * grid[1]
    if grid is None:
        try:
            grid = infer_grid(x.shape[1] - prefix, aspect)
        except ValueError:
            for lead in dict.fromkeys((0, 0 if prefix else dropped)):
                try:
                    grid = infer_grid(x.shape[1] - lead, aspect)
                    break
                except ValueError:
                    continue
            if grid is None:
                raise TowerLayoutError(
                    f"A layer gives {x.shape[1]} tokens, which form no patch grid like the final output's "
                    f"{target_grid[0]}x{target_grid[1]}, with or without its {prefix} leading tokens: the tower's "
                    "layers carry tokens that are not image patches (as GroupViT's group tokens are), or its prefix / "
                    "suffix token counts are wrong (vision_taps={'num_prefix_tokens': ..., 'num_suffix_tokens': "
                    "...})") from None
    if lead not in (0, prefix) and not (prefix == 0 and lead == dropped):
        raise ValueError(f"A tap has {lead} leading tokens, the final output {prefix}: they cannot be matched.")
    patches = rearrange(x[:, lead:], "b (h w) c -> b c h w", h=grid[0], w=grid[1])
    pooled = rearrange(F.adaptive_avg_pool2d(patches, target_grid), "b c h w -> b (h w) c")
    leading = x[:, :lead] if lead and lead == prefix else pooled.mean(dim=1, keepdim=True).expand(-1, prefix, -1)
    return torch.cat([leading, pooled], dim=1)


def _task_model_base(model: nn.Module) -> nn.Module | None:
    """The base model of a transformers task model (``BertForMaskedLM`` -> its ``BertModel``): the model ``AutoModel``
    builds for its config, kept as ``base_model``; None for a base model itself (whose ``base_model`` may be a part of
    it, DINOv3's encoder) or anything else."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = getattr(model, "config", None)
    try:
        base_class = MODEL_MAPPING[type(config)]
    except (KeyError, ValueError, TypeError, AttributeError):  # no base class registered for this config
        return None
    base = getattr(model, "base_model", None)
    if isinstance(model, base_class) or not isinstance(base, base_class):
        return None
    return base


def unwrap_tower(model: nn.Module, modality: str) -> nn.Module:
    """The tower to tap inside ``model``: a PEFT model's base model, a task model's (``BertForMaskedLM``,
    ``DetrForObjectDetection``, ``LlamaForCausalLM``) base model, a dual encoder's (CLIPModel, SiglipModel, ...)
    ``vision_model`` or ``text_model``, an encoder-decoder's encoder (T5Model, BartModel); else ``model`` itself."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and type(model).__module__.startswith("peft."):  # a PeftModel around the tower
        base = get_base_model()
        logger.info("%s wraps the %s tower: tapping its base model (%s).", type(model).__name__, modality,
                    type(base).__name__)
        return unwrap_tower(base, modality)
    base = _task_model_base(model)
    if base is not None:
        logger.info("%s is a task model: tapping its base model (%s) as the %s tower; its task head is not used.",
                    type(model).__name__, type(base).__name__, modality)
        return unwrap_tower(base, modality)
    other = "text_model" if modality == VISION else "vision_model"
    inner = getattr(model, f"{modality}_model", None)
    if isinstance(inner, nn.Module) and isinstance(getattr(model, other, None), nn.Module):
        if getattr(inner, "config", None) is None:
            inner.config = getattr(model.config, f"{modality}_config")
        logger.info("%s is a dual encoder: using its %s_model (%s) as the %s tower.", type(model).__name__, modality,
                    type(inner).__name__, modality)
        return inner
    config = getattr(model, "config", None)
    if modality == TEXT and getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        encoder = model.get_encoder()
        logger.info("%s is an encoder-decoder: using its encoder (%s) as the text tower.", type(model).__name__,
                    type(encoder).__name__)
        return encoder
    return model


def _accepted(function: Any) -> tuple[set[str], bool]:
    """The keyword names ``function`` takes, and whether it takes ``**kwargs``."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters}, any(p.kind is p.VAR_KEYWORD for p in parameters)


def _remove_all(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


class _TapHook:
    """A capture hook on a tower module: calls ``tower.<method>(*extra, *hook arguments)`` during
    :meth:`Tower.tap` and does nothing otherwise. It holds the tower weakly (re-wrapping a model does not pile hooks
    up) and pickles with it (``torch.save(model)``, spawned workers), where a lambda would not."""

    def __init__(self, tower: Tower, method: str, *extra: Any) -> None:
        self.tower, self.method, self.extra = weakref.ref(tower), method, extra

    def __call__(self, *args: Any) -> None:
        tower = self.tower()
        if tower is not None and tower._state is not None:
            getattr(tower, self.method)(*self.extra, *args)

    def __getstate__(self) -> dict[str, Any]:
        return {"tower": self.tower(), "method": self.method, "extra": self.extra}

    def __setstate__(self, state: dict[str, Any]) -> None:
        tower = state["tower"]
        self.tower = weakref.ref(tower) if tower is not None else _no_tower
        self.method, self.extra = state["method"], state["extra"]

    def __deepcopy__(self, memo: dict) -> _TapHook:
        """A hook that does nothing: a copied tower (:meth:`Tower.__deepcopy__`) removes it and installs its own."""
        dead = copy.copy(self)
        dead.tower = _no_tower
        return dead


def _no_tower() -> None:
    return None


HALF_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def random_states_kept(device: torch.device) -> Iterator[None]:
    """Give back torch's CPU random state, and ``device``'s when it is a CUDA device, after the block: a frozen
    tower's forward must not draw from, or re-seed, the random state the side network's dropout draws from. A no-op
    while ``torch.compile`` traces (the state is not kept there; a tower re-seeding it graph-breaks anyway)."""
    if torch.compiler.is_compiling():
        yield
        return
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _as_float32(value: Any) -> Any:
    """``value`` with every half-precision tensor (in tuples, lists and dicts too) copied to float32."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in HALF_PRECISION else value
    if isinstance(value, tuple | list):
        return type(value)(_as_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    return value


class _FirstCall:
    """Records a block's first call for the structural search, at float32 precision whatever the tower's dtype.

    A float32 block is recorded as it runs. A half-precision block (a tower loaded in bfloat16 or float16) is not:
    there a small branch is lost in the rounding of the residual sums, and the search would read other sub-modules
    than for the same tower in float32 (BEiT after its layer scale, ALBERT's attention for both experts). Its
    inputs are kept instead, and :meth:`recorder` runs a float32 copy of the block on them.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.half = any(p.dtype in HALF_PRECISION for p in block.parameters())
        self.inputs: tuple[tuple, dict] | None = None
        self.raw: tuple[tuple, dict] = ((), {})
        self._recorder = None if self.half else BlockRecorder(block)
        self._handle = block.register_forward_pre_hook(self._keep, with_kwargs=True) if self.half else None

    def _keep(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.inputs is None:
            self.inputs, self.raw = (_as_float32(args), _as_float32(kwargs)), (args, kwargs)

    def remove(self) -> None:
        if self._recorder is not None:
            self._recorder.remove()
        if self._handle is not None:
            self._handle.remove()

    def recorder(self) -> BlockRecorder:
        """The block's recorded first call (at float32 precision)."""
        if self._recorder is None and self.inputs is not None:
            try:
                self._recorder = self._run(copy.deepcopy(self.block).float(), self.inputs)
            except Exception as error:  # a block that cannot run in float32 (quantised weights): its own precision
                logger.info("The structural search runs %s in its own precision (a float32 copy fails: %s).",
                            type(self.block).__name__, error)
                self._recorder = self._run(self.block, self.raw)
        if self._recorder is None:  # never called: an empty record (the search then falls back)
            self._recorder = BlockRecorder(self.block)
            self._recorder.remove()
        return self._recorder

    @staticmethod
    def _run(block: nn.Module, inputs: tuple[tuple, dict]) -> BlockRecorder:
        recorder = BlockRecorder(block)
        device = next((p.device for p in block.parameters()), torch.device("cpu"))
        try:
            with torch.no_grad(), random_states_kept(device):
                block(*inputs[0], **inputs[1])
        finally:
            recorder.remove()
        return recorder


@dataclass
class _Capture:
    """What one :meth:`Tower.tap` call collects through the persistent hooks."""

    layers: set[int]
    kinds: list[str]
    layer: int = -1
    calls: dict[str, int] = field(default_factory=dict)
    out: dict[Any, tuple[torch.Tensor, Any]] = field(default_factory=dict)
    layer_input: torch.Tensor | None = None  # the current layer's input (for branch taps, see Tap.branch)


class Tower:
    """A frozen Hugging Face tower with its tap spec. Not an ``nn.Module``: the owner registers the model.

    Args:
        model: the Hugging Face model (already unwrapped, see :func:`unwrap_tower`).
        spec: a spec from :func:`~m2ist.taps.resolve_tap_spec`; ``None`` finds the taps by structure on a probe
            forward of ``probe_inputs``.
        modality: 'vision' or 'text'.
        probe_inputs: inputs for the probe forwards (the layers' call order, the structural search).
        override: the config's ``vision_taps`` / ``text_taps`` (token counts).
    """

    def __init__(self, model: nn.Module, spec: TapSpec | None, modality: str,
                 probe_inputs: dict[str, torch.Tensor] | None = None, override: dict[str, Any] | None = None) -> None:
        if modality not in (VISION, TEXT):
            raise ValueError(f"modality must be 'vision' or 'text', got {modality!r}.")
        problem = module_meta_problem(model, f"The {modality} tower")
        if problem:  # its layers are found by running it: a meta tower fails deep in the probe with "Tensor.item()"
            raise ValueError(problem)
        self.model, self.modality = model, modality
        self._state: _Capture | None = None
        self._warned_training: str | None = None  # the part in train() last warned about (see _warn_training_parts)
        self._handles: list[Any] = []
        self._forward_args = _accepted(model.forward)
        self.native_size = self._native_size()
        self.layers: list[tuple[str, nn.Module]] = []
        self.grid: tuple[int, int] | None = None
        self.spec = spec or TapSpec(source="structure")
        if self.spec.refuse:
            raise ValueError(self.refusal(self.spec.refuse))
        self._count_tokens(override)
        if spec is None:
            self.spec = self._discover(probe_inputs)
            self._count_tokens(override)
        if self.spec.layers and not self.layers:
            self.layers = self._call_order(find_layers(model, self.spec), probe_inputs)
        self.fixed_length: int | None = None  # set for a text tower that reads its padding (see _check_padding)
        self.pad_id = 0
        self._check_deterministic(probe_inputs)
        self._check_padding(probe_inputs)
        self._check_batch(probe_inputs)
        self.mixer = self._mixer_note()
        self._install_hooks()

    def _mixer_note(self) -> str:
        """A note when the taps were found by structure and the IEA's tap, in some layers, is not attention: those
        layers have no attention sub-module (by class or path name), and the first residual branch the IEA reads is
        another token mixer (RecurrentGemma's RG-LRU recurrence, FNet's Fourier transform, PoolFormer's pooling)."""
        tap = self.spec.attention
        if self.spec.source != "structure" or tap is None or not self.layers:
            return ""
        without = [(index, get_submodule(layer, tap.module, name)) for index, (name, layer) in enumerate(self.layers)
                   if not any(_ATTENTION.search(path) or _ATTENTION.search(type(module).__name__)
                              for path, module in layer.named_modules())]
        if not without:
            return ""
        classes = ", ".join(dict.fromkeys(type(module).__name__ for _, module in without))
        paths = "|".join(dict.fromkeys(option for index, _ in without for option in tap.module.split("|")
                                       if has_submodule(self.layers[index][1], option)))  # a hybrid's own mixer
        where = "no layer has attention" if len(without) == len(self.layers) else \
            f"layer{'s' if len(without) > 1 else ''} {', '.join(str(index) for index, _ in without)} of " \
            f"{len(self.layers)} {'have' if len(without) > 1 else 'has'} no attention"
        return f"{where}: the IEA reads the token mixer in its place, {paths} ({classes})"

    def structural_refusal(self, reason: str) -> TowerLayoutError:
        """One line refusing the tower for its structure, which no tap override changes."""
        return TowerLayoutError(f"Cannot side-tune the {self.modality} tower {type(self.model).__name__} "
                                f"(model_type={self.model_type!r}): {reason}.")

    def _check_deterministic(self, probe_inputs: dict[str, torch.Tensor] | None) -> None:
        """Refuse a tower whose features are a random draw: two forwards of the same input, in ``eval()`` mode, one
        after the other (the random state moving on between them, as it does between training steps), must give the
        same features. Reformer's LSH attention draws new random rotations on every forward unless
        ``config.hash_seed`` is set: every step would see other features of the same sample, and the tower cache
        would store one draw for good (its float32 run then trains other weights than the uncached one)."""
        if probe_inputs is None:
            return
        inputs = {name: value[:1] for name, value in probe_inputs.items()}
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()  # parts left in train() on purpose (Monte-Carlo dropout) are warned about in tap()
        try:
            with random_states_kept(self._device()):  # each probe keeps the random state: move it on in between
                first = self._probe(inputs)[0].float()
                torch.rand(1, device=self._device())
                second = self._probe(inputs)[0].float()
        finally:
            for module, mode in modes:
                module.training = mode
        if first.shape != second.shape or not bool(torch.isfinite(first).all()):
            return  # other checks say why
        tolerance = (1e-2 if self.dtype in HALF_PRECISION else 1e-4) * max(1.0, first.abs().max().item())
        change = (first - second).abs().max().item()
        if change > tolerance:
            seed = [k for k in vars(self.model.config) if k.endswith("_seed") and getattr(self.model.config, k) is None]
            fix = (f"set config.{seed[0]} (a fixed seed) before wrapping it, or use another tower" if seed else
                   "use a tower whose forward is deterministic in eval()")
            raise self.structural_refusal(f"its features change by {change:.3g} between two forwards of the same "
                                          "input in eval() mode: its forward draws at random (as Reformer's LSH "
                                          "attention does without a hash seed), so a sample's features would change "
                                          f"from step to step and the tower cache would keep one draw; {fix}")

    def _device(self) -> torch.device:
        return next((p.device for p in self.model.parameters()), torch.device("cpu"))

    def _check_batch(self, probe_inputs: dict[str, torch.Tensor] | None) -> None:
        """Refuse a tower whose samples are not independent: its output must have one entry per input sample,
        and a sample's features must not change with the other samples of its batch. Pixtral's vision model packs
        every image of a batch into one sequence: built on one probe image it would pass, then fail (or misread
        tokens) on every batch of several images."""
        if probe_inputs is None:
            return
        key = "pixel_values" if self.modality == VISION else "input_ids"
        first = probe_inputs[key][:1]
        pair = {name: torch.cat([value[:1], value[:1].flip(-1) if name == key else value[:1]])
                for name, value in probe_inputs.items()}
        with torch.no_grad():
            alone = self._probe({name: value[:1] for name, value in probe_inputs.items()})[0]
            together = self._probe(pair)[0]
        if together.shape[0] != 2 or together.shape[1:] != alone.shape[1:]:  # _run refuses most of these already
            raise self.structural_refusal(f"its forward mixes the samples of a batch (2 inputs give an output of shape "
                                          f"{tuple(together.shape)}, 1 input {tuple(alone.shape)})")
        alone, mixed = alone.float(), together[:1].float()
        # loose: a GPU may pick other kernels (TF32 convolutions) for another batch size; mixing changes far more
        tolerance = (5e-2 if self.dtype in HALF_PRECISION else 1e-2) * max(1.0, alone.abs().max().item())
        change = (alone - mixed).abs().max().item()
        if not change <= tolerance and bool(torch.isfinite(alone).all()):
            raise self.structural_refusal(f"a sample's features change by {change:.3g} with the other samples of its "
                                          f"batch ({key} {tuple(first.shape)} alone and with another): its forward "
                                          "does not keep the samples apart; use a tower that does")

    def _check_padding(self, probe_inputs: dict[str, torch.Tensor] | None) -> None:
        """Find whether a text tower reads its padding: a phrase's final tokens change when padding (other token
        ids, masked out) follows it. FNet mixes every position by Fourier transform and has no attention mask;
        ConvBERT's convolutions span the padding. Such a tower is then fed every phrase at the probe's length
        (``max_query_len``, the length the processor pads to) with its own pad id in every masked place
        (:meth:`_fixed_inputs`), so a phrase's features never depend on how far, or with what, it was padded."""
        if self.modality != TEXT or probe_inputs is None or probe_inputs["input_ids"].shape[1] < 2:
            return
        ids = probe_inputs["input_ids"][:1]
        length, keep = ids.shape[1], max(1, ids.shape[1] // 2)
        pad = getattr(self.model.config, "pad_token_id", None)
        self.pad_id = int(pad) if isinstance(pad, int) and pad >= 0 else 0
        other = ids[:, keep:].flip(1)  # padding that is not the pad token: a tower honouring its mask ignores it
        mask = torch.ones_like(ids)
        mask[:, keep:] = 0
        with torch.no_grad():
            try:
                padded = self._run({"input_ids": torch.cat([ids[:, :keep], other], 1), "attention_mask": mask},
                                   False)[0]
            except Exception as error:  # every batch of phrases of different lengths would fail like this
                first_line = (str(error).splitlines() or [""])[0]
                mismatch = self._input_mismatch(f"{type(error).__name__}: {first_line}")
                if mismatch is not None:  # no probe ran before (the hidden-states fallback): it fails on any phrase
                    raise self.structural_refusal(mismatch) from None
                shorter = self._runs_on_a_shorter_phrase(probe_inputs)
                if shorter is not None:  # the length, not the padding: it fails unpadded too
                    raise self.structural_refusal(self._too_few_positions(
                        probe_inputs, shorter, f"{type(error).__name__}: {first_line}")) from None
                raise ValueError(self.refusal(f"its forward fails on a padded phrase (an attention mask with zeros: "
                                              f"{type(error).__name__}: {first_line}), and the processor pads every "
                                              "phrase to max_query_len; use a tower that takes padded text")) from None
            try:
                short = self._run({"input_ids": ids[:, :keep], "attention_mask": mask[:, :keep]}, False)[0]
            except Exception as error:  # a tower built for one sequence length (Nystromformer's segments)
                short, why = None, f"it fails on a shorter phrase ({type(error).__name__})"
        if short is not None:
            short, padded = short.float(), padded[:, :keep].float()
            tolerance = (2e-2 if self.dtype in HALF_PRECISION else 1e-4) * max(1.0, short.abs().max().item())
            change = (short - padded).abs().max().item()
            if not change > tolerance:  # NaN counts as a change
                return
            why = f"a phrase's features change by {change:.3g} when padding follows it"
        self.fixed_length = length
        logger.warning("The text tower %s reads the padding after a phrase (%s): m2ist feeds it every phrase padded "
                       "to %d tokens (max_query_len) with pad id %d (config.pad_token_id) in every masked place, so a "
                       "phrase's features do not depend on its padding.", type(self.model).__name__, why, length,
                       self.pad_id)

    def _fixed_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and mask of a tower that reads its padding, at ``fixed_length`` with the pad id in every
        masked place (see :meth:`_check_padding`)."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        ids = torch.where(mask.bool(), input_ids, torch.full_like(input_ids, self.pad_id))
        extra = (self.fixed_length or 0) - ids.shape[1]
        if extra > 0:
            ids = F.pad(ids, (0, extra), value=self.pad_id)
            mask = F.pad(mask, (0, extra), value=0)
        return ids, mask

    def _count_tokens(self, override: dict[str, Any] | None) -> None:
        """Prefix / suffix token counts: the override, else the spec, else the tower's token parameters."""
        self.num_prefix_tokens: int | None = 0
        self.num_suffix_tokens = 0
        if self.modality == TEXT:
            return
        override = override or {}
        skip = self.spec.unused_modules
        prefix = override.get("num_prefix_tokens", self.spec.num_prefix_tokens(self.model.config))
        suffix = override.get("num_suffix_tokens", self.spec.num_suffix_tokens(self.model.config))
        self.num_prefix_tokens = count_token_parameters(self.model, PREFIX_PARAMETERS, skip) if prefix is None else prefix
        self.num_suffix_tokens = count_token_parameters(self.model, SUFFIX_PARAMETERS, skip) if suffix is None else suffix
        self.layer_leading_tokens = self.num_prefix_tokens + self.num_suffix_tokens  # kept if the output drops them

    # --------------------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str | None:
        """``config.model_type`` of the tower."""
        return getattr(self.model.config, "model_type", None)

    def refusal(self, reason: str) -> str:
        """One line: which tower is refused, why, and the override that would fix it."""
        return (f"Cannot side-tune the {self.modality} tower {type(self.model).__name__} "
                f"(model_type={self.model_type!r}): {reason}. Override with M2ISTConfig({self.modality}_taps={{...}}) "
                "or m2ist.taps.register_taps().")

    def _native_size(self) -> tuple[int, int] | None:
        size = getattr(getattr(self.model, "config", None), "image_size", None)
        if isinstance(size, int):
            return size, size
        return tuple(size[:2]) if isinstance(size, list | tuple) and len(size) >= 2 else None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tower's floating-point parameters."""
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)

    # --------------------------------------------------------------------------------------------------------
    def _discover(self, probe_inputs: dict[str, torch.Tensor] | None) -> TapSpec:
        """Find the repeated block and its attention / feed-forward sub-modules on one probe forward."""
        names = find_block_names(self.model)
        if not names or probe_inputs is None:
            return hidden_states_spec(self.model)
        modules = [(name, self.model.get_submodule(name)) for name in names]
        order: list[tuple[str, nn.Module]] = []
        handles = [module.register_forward_pre_hook(lambda *_, name=name, module=module: order.append((name, module)))
                   for name, module in dict(modules).items()]
        inside: list[bool] = []  # whether the first block's sub-modules ran (the block itself called or not)
        handles += [child.register_forward_hook(lambda *_: inside.append(True)) for child in modules[0][1].children()]
        probe = _FirstCall(modules[0][1])
        try:
            self._probe(probe_inputs)
        finally:
            probe.remove()
            for handle in handles:
                handle.remove()
        if not order:
            block = type(modules[0][1]).__name__
            return hidden_states_spec(self.model, f"its repeated {block} is called through its .forward() method, "
                                                  "which runs no module hooks" if inside else
                                      f"its repeated {block} is never called in its forward")
        if order[0][1] is not modules[0][1]:  # the first block called is not the first in module order
            probe = _FirstCall(order[0][1])
            try:
                self._probe(probe_inputs)
            finally:
                probe.remove()
        recorder = probe.recorder()
        spec = structural_spec([name for name, _ in order], recorder, self.model_type)
        spec = self._same_in_every_layer(spec, order, probe_inputs)
        if spec.status == "fallback" and self._hidden_states_start_at(recorder.block_input, probe_inputs):
            # no attention / feed-forward pair (a CNN): the tower's own hidden states are its layers
            x, y, block = recorder.block_input, recorder.block_output, type(order[0][1]).__name__
            why = (f"its repeated {block} changes the shape of its stream (it down-samples or widens inside), so no "
                   "residual sum spans it" if y is not None and x.shape != y.shape else
                   f"its repeated {block} has no attention / feed-forward residual pair in its sub-modules (a CNN)")
            return hidden_states_spec(self.model, why)
        self.layers = order
        return spec

    def _same_in_every_layer(self, spec: TapSpec, order: list[tuple[str, nn.Module]], probe_inputs) -> TapSpec:
        """``spec``, found on the first layer, if its taps have the layer stream's shape in every layer; else the
        spec found on the first layer where they do not (VitDet and SAM mix windowed and global attention: found on
        a global layer, the attention module's output is cut into windows in the others), else layer outputs. Layers
        without the sub-modules found in the first are handled by :meth:`_per_layer_kind`."""
        if spec.status == "exact" and any(not has_submodule(layer, tap.module) for _, layer in order
                                          for tap in (spec.attention, spec.ffn)):
            return self._per_layer_kind(spec, order, probe_inputs)
        bad = self._misshapen_layer(spec, order, probe_inputs)
        if bad is None:
            return spec
        probe = _FirstCall(order[bad][1])
        try:
            self._probe(probe_inputs)
        finally:
            probe.remove()
        again = structural_spec([name for name, _ in order], probe.recorder(), self.model_type)
        if again.status == "exact" and self._misshapen_layer(again, order, probe_inputs) is None:
            return again
        return replace(spec, attention=None, ffn=None, note=f"{self.model_type}: both experts read the layer outputs: "
                       f"the sub-layers found in one layer have another shape in layer {bad}")

    def _per_layer_kind(self, spec: TapSpec, order: list[tuple[str, nn.Module]], probe_inputs) -> TapSpec:
        """The taps of a hybrid stack: layers of one class whose sub-modules differ by layer kind (LFM2's short
        convolution or attention, Bamba's Mamba mixer or attention, Qwen3-Next's linear or full attention). The taps
        are found on the first layer of each kind (its direct sub-modules' names) and joined as alternatives
        (``conv|self_attn``: each layer reads the first it has), checked to pick, in every kind, the sub-module
        found there; else both experts read the layer outputs (before, the build failed on the first layer without
        the first layer's sub-module)."""
        first_of_kind: dict[tuple[str, ...], int] = {}
        for index, (_, layer) in enumerate(order):
            first_of_kind.setdefault(tuple(name for name, _ in layer.named_children()), index)
        found: dict[int, TapSpec] = {}
        for index in first_of_kind.values():
            if order[index][1] is order[0][1]:
                found[index] = spec
                continue
            probe = _FirstCall(order[index][1])
            try:
                self._probe(probe_inputs)
            finally:
                probe.remove()
            found[index] = structural_spec([name for name, _ in order], probe.recorder(), self.model_type)
        taps: dict[str, Tap | None] = {}
        for kind in ("attention", "ffn"):
            chosen = [getattr(each, kind) for each in found.values()]
            same = all(t is not None and (t.layout, t.call, t.branch) == (chosen[0].layout, chosen[0].call,
                                                                           chosen[0].branch) for t in chosen)
            taps[kind] = replace(chosen[0], module="|".join(dict.fromkeys(t.module for t in chosen))) if same else None
        merged = replace(spec, attention=taps["attention"], ffn=taps["ffn"],
                         note=f"{self.model_type}: sub-layers found by structure on the first layer of each kind "
                              "(alternatives a|b: each layer reads the first it has)")
        picks_its_own = merged.status == "exact" and all(
            get_submodule(order[index][1], getattr(merged, kind).module, order[index][0])
            is get_submodule(order[index][1], getattr(each, kind).module, order[index][0])
            for index, each in found.items() for kind in ("attention", "ffn"))
        if picks_its_own and all(has_submodule(layer, tap.module) for _, layer in order
                                 for tap in (merged.attention, merged.ffn)) \
                and self._misshapen_layer(merged, order, probe_inputs) is None:
            return merged
        kinds = ", ".join(str(index) for index in first_of_kind.values())
        return replace(spec, attention=None, ffn=None, note=f"{self.model_type}: both experts read the layer outputs: "
                       f"its layers have other sub-modules by kind (first of each kind: layers {kinds}) and no "
                       "attention / feed-forward pair common to them was found")

    def _misshapen_layer(self, spec: TapSpec, order: list[tuple[str, nn.Module]], probe_inputs) -> int | None:
        """The first layer call whose attention or feed-forward tap output has not the shape of the layer's input
        (in the tap's axis order); None when all have it."""
        if spec.status != "exact" or len(order) < 2:
            return None
        state: dict[str, Any] = {"layer": -1, "shape": None, "calls": {}, "bad": None}

        def enter(_module, args, kwargs) -> None:
            start = input_tensor(args, kwargs)
            state["layer"] += 1
            state["calls"] = {}
            state["shape"] = None if start is None else tuple(start.shape)

        def check(tap, _module, args, out) -> None:
            call = state["calls"].get(tap, 0)  # per tap: both may be one module's calls (a drop-path module)
            state["calls"][tap] = call + 1
            value = input_tensor(args, {}) if tap.branch else _first_tensor(out)
            shape = state["shape"]
            if shape is not None and len(shape) == 4 and tap.layout == "b h w c" != spec.layer_layout:
                shape = (shape[0], shape[2], shape[3], shape[1])
            if call == tap.call and state["bad"] is None and (value is None or tuple(value.shape) != shape):
                state["bad"] = state["layer"]

        handles = []
        for name, layer in {id(module): (name, module) for name, module in order}.values():
            handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            for tap in {spec.attention, spec.ffn}:
                handles.append(get_submodule(layer, tap.module, name).register_forward_hook(
                    lambda module, args, out, tap=tap: check(tap, module, args, out)))
        try:
            self._probe(probe_inputs)
        finally:
            _remove_all(handles)
        return state["bad"]

    def _probe(self, inputs: dict[str, torch.Tensor], hidden_states: bool = False) -> Any:
        """One forward at build time; a tower that cannot run on these inputs is refused in one line."""
        try:
            with torch.no_grad():
                return self._run(inputs, hidden_states=hidden_states)
        except Exception as error:  # any failure of a foreign forward becomes one clear line
            if isinstance(error, ValueError) and str(error).startswith("Cannot side-tune"):
                raise
            first_line = (str(error).splitlines() or [""])[0]
            failure = f"{type(error).__name__}: {first_line}"
            mismatch = self._input_mismatch(failure)
            if mismatch is not None:
                raise self.structural_refusal(mismatch) from error
            reason = f"its forward fails on the probe inputs ({failure})"
            grouped = self._runs_on_groups(inputs, failure) if self.modality == VISION else None
            if grouped is not None:
                raise self.structural_refusal(grouped) from error
            shorter = self._runs_on_a_shorter_phrase(inputs) if self.modality == TEXT else None
            if shorter is not None:  # the query length, not the taps: no override offered
                raise self.structural_refusal(self._too_few_positions(inputs, shorter, failure)) from error
            larger = self._runs_on_a_larger_canvas(inputs) if self.modality == VISION else None
            if larger is not None:  # the canvas, not the taps: no override offered
                raise self.structural_refusal(
                    f"its forward fails on a {inputs['pixel_values'].shape[-2]}x{inputs['pixel_values'].shape[-1]} "
                    f"canvas ({failure}) but runs on a {larger}x{larger} one: the canvas is too small for its "
                    f"down-sampling; use M2ISTConfig(image_size={larger}) or larger") from error
            if self.modality == VISION and self.native_size is not None \
                    and tuple(inputs["pixel_values"].shape[-2:]) != self.native_size:
                reason += (f"; its own image size is {self.native_size[0]}x{self.native_size[1]} and it cannot "
                           f"interpolate its position encodings: use M2ISTConfig(image_size={self.native_size[0]})")
            else:
                reason += f"; m2ist runs a {self.modality} tower on {self._given_inputs()} alone"
            raise ValueError(self.refusal(reason)) from error

    def _runs_on_groups(self, inputs: dict[str, torch.Tensor], failure: str) -> str | None:
        """Why a vision tower with ``config.num_frames`` that fails on one image runs on that many (X-CLIP's vision
        model reads a batch as clips of ``num_frames`` frames and mixes each clip's frames), or None."""
        pixel_values = inputs["pixel_values"][:1]
        frames = getattr(self.model.config, "num_frames", None)
        for size in [frames] if isinstance(frames, int) and 1 < frames <= 64 else []:
            try:
                with torch.no_grad():
                    self._run({"pixel_values": pixel_values.expand(size, -1, -1, -1)}, hidden_states=False)
            except Exception:  # any failure: try the next group size
                continue
            return (f"its forward fails on one image ({failure}) but runs on {size} at once (config.num_frames): it "
                    "reads a batch as groups of images (the frames of a video clip) and mixes the images of a group, "
                    "where m2ist reads each image on its own; use an image tower (for X-CLIP, the vision model of a "
                    "CLIP checkpoint)")
        return None

    def _runs_on_a_shorter_phrase(self, inputs: dict[str, torch.Tensor]) -> int | None:
        """The longest unpadded phrase, shorter than the probe's, on which a text tower that failed runs (a tower with
        fewer positions than ``max_query_len``: RoBERTa's family numbers positions from ``padding_idx + 1``, so
        ``max_position_embeddings=514`` reads 512 tokens); None when it runs on the probe's length unpadded (the
        length is not the cause) or on none. A failure path: a few forwards at most."""
        ids = inputs["input_ids"][:1]
        low, high = 0, ids.shape[1] + 1  # it runs on low tokens (0: not known yet), fails on high
        while high - low > 1:
            middle = (low + high) // 2
            try:
                with torch.no_grad():
                    self._run({"input_ids": ids[:, :middle], "attention_mask": torch.ones_like(ids[:, :middle])},
                              False)
            except Exception:  # any failure: shorter still, or not the length at all
                high = middle
                continue
            low = middle
        return low if 0 < low < ids.shape[1] else None

    def _too_few_positions(self, inputs: dict[str, torch.Tensor], shorter: int, failure: str) -> str:
        """Why a text tower that runs on ``shorter`` tokens and fails on the probe's length is refused."""
        return (f"its forward fails on phrases of {inputs['input_ids'].shape[1]} tokens ({failure}) but runs on "
                f"{shorter}: it reads at most {shorter} positions (fewer than config.max_position_embeddings when they "
                "start at an offset, as RoBERTa's start at padding_idx + 1), and the processor pads every phrase to "
                f"max_query_len; use M2ISTConfig(max_query_len={shorter}) or less")

    def _runs_on_a_larger_canvas(self, inputs: dict[str, torch.Tensor]) -> int | None:
        """The first of its own image size (when larger), twice and four times the canvas (up to 1024) on which a
        vision tower that failed on the canvas runs (its feature maps shrink below what a layer needs on a small
        canvas: MobileViTv2's unfolding), else None."""
        size = int(inputs["pixel_values"].shape[-1])
        native = max(self.native_size) if self.native_size is not None else None
        candidates = ([native] if native is not None and native > size else []) + [size * 2, size * 4]
        for larger in dict.fromkeys(c for c in candidates if c <= 1024):  # (a failure path: a few forwards at most)
            pixel_values = F.interpolate(inputs["pixel_values"][:1], size=(larger, larger))
            try:
                with torch.no_grad():
                    self._run({"pixel_values": pixel_values}, hidden_states=False)
            except Exception:  # any failure: the canvas size is not the cause
                continue
            return larger
        return None

    def _given_inputs(self) -> str:
        """The forward inputs m2ist gives a tower of this modality, in words."""
        return "pixel_values (and pixel_mask)" if self.modality == VISION else "input_ids and attention_mask"

    def _input_mismatch(self, failure: str) -> str | None:
        """Why a failed forward cannot be fed (a reason for :meth:`structural_refusal`), read from its signature (no
        forward run): it requires inputs m2ist does not give (SegGPT's prompts, a Q-Former's query embeddings, an
        audio model's input_values), it is a tower of the other modality (the towers passed in the wrong order), or a
        multimodal model that takes both pixels and token ids. None when the signature tells nothing (a registry
        family with its own inputs, a forward taking ``**kwargs`` only)."""
        if self.spec.encode is not None or self.spec.prepare_inputs is not None:
            return None
        try:
            parameters = list(inspect.signature(self.model.forward).parameters.values())
        except (TypeError, ValueError):
            return None
        names = {p.name for p in parameters}
        own, other = ("pixel_values", "input_ids") if self.modality == VISION else ("input_ids", "pixel_values")
        given = {"pixel_values", "pixel_mask"} if self.modality == VISION else {"input_ids", "attention_mask"}
        missing = [p.name for p in parameters if p.default is p.empty and p.name not in given
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        if missing and own in names:
            fix = ("give them with a TapSpec(prepare_inputs=...) registered by m2ist.taps.register_taps()"
                   if self.modality == VISION else "use a text model whose forward runs on input_ids alone")
            return (f"its forward needs inputs m2ist does not give: {', '.join(missing)} (required arguments "
                    f"of {type(self.model).__name__}.forward; m2ist runs a {self.modality} tower on "
                    f"{self._given_inputs()} alone), and fails without them ({failure}); {fix}")
        if other in names and own not in names:
            kind = TEXT if self.modality == VISION else VISION
            return (f"its forward fails on the probe inputs ({failure}); is it a {self.modality} model? Its "
                    f"forward takes {other}, not {own}, as a {kind} model does: get_side_tuned_model takes the vision "
                    "tower first and the text tower second")
        if own not in names and missing:  # (a forward taking **kwargs alone tells nothing)
            return (f"its forward takes no {own} but {', '.join(missing)}, and m2ist runs a {self.modality} "
                    f"tower on {self._given_inputs()} alone ({failure}); pass a {self.modality} model")
        if other in names:
            return (f"its forward fails on {self._given_inputs()} alone, all m2ist gives a {self.modality} "
                    f"tower ({failure}), and it is a multimodal model (its forward also takes {other}); pass its "
                    f"{self.modality} encoder alone")
        return None

    def _hidden_states_start_at(self, seed: torch.Tensor | None, probe_inputs) -> bool:
        """Whether the tower's ``hidden_states`` begin with ``seed`` (the first block's input), i.e. they hold the
        embedding output and then one entry per stage, so they can serve as layer-output taps."""
        if seed is None or not hasattr(self.model.config, "output_hidden_states"):
            return False
        _, _, out = self._probe(probe_inputs, hidden_states=True)
        states = getattr(out, self.spec.hidden_states_key, None) if out is not None else None
        if not states:
            return False
        first, _ = to_tokens(states[0], self.spec.layer_layout)
        seed, _ = to_tokens(seed, self.spec.layer_layout)
        return first.shape == seed.shape and bool(torch.allclose(first.float(), seed.float()))

    def _call_order(self, modules: list[tuple[str, nn.Module]], probe_inputs) -> list[tuple[str, nn.Module]]:
        """The layer modules in the order the forward calls them (a shared module called twice is two layers)."""
        if probe_inputs is None:
            return modules
        order: list[tuple[str, nn.Module]] = []
        handles = [module.register_forward_pre_hook(lambda *_, name=name, module=module: order.append((name, module)))
                   for name, module in modules]
        try:
            self._probe(probe_inputs)
        finally:
            for handle in handles:
                handle.remove()
        return order or modules

    def _install_hooks(self) -> None:
        """Register the capture hooks once; they do nothing outside :meth:`tap`. They hold the tower weakly and
        are removed when it is garbage-collected, so re-wrapping the same model does not pile hooks up."""
        unique = {id(module): (name, module) for name, module in self.layers}
        for name, layer in unique.values():
            self._handles.append(layer.register_forward_pre_hook(_TapHook(self, "_layer_enter"), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(_TapHook(self, "_layer_leave")))
            for kind in ("attention", "ffn"):
                tap = self.spec.tap(kind)
                if tap.module and tap.branch:  # the module's input minus the layer's input
                    module = get_submodule(layer, tap.module, name)
                    self._handles.append(module.register_forward_pre_hook(_TapHook(self, "_branch", kind, tap),
                                                                          with_kwargs=True))
                elif tap.module:
                    module = get_submodule(layer, tap.module, name)
                    self._handles.append(module.register_forward_hook(_TapHook(self, "_sublayer", kind, tap)))
        weakref.finalize(self, _remove_all, list(self._handles))

    def __deepcopy__(self, memo: dict) -> Tower:
        """A copy on the copied model, with its own hooks (the copied modules' hooks would feed this tower)."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        stale = {handle.id for handle in self._handles}
        for key, value in self.__dict__.items():
            if key not in ("_handles", "_state"):
                setattr(new, key, copy.deepcopy(value, memo))
        new._handles, new._state = [], None
        for module in new.model.modules():
            for hooks in (module._forward_hooks, module._forward_pre_hooks, module._forward_hooks_with_kwargs,
                          module._forward_pre_hooks_with_kwargs, module._forward_hooks_always_called):
                for hook_id in stale & set(hooks):
                    del hooks[hook_id]
        new._install_hooks()
        return new

    def remove_hooks(self) -> None:
        """Remove the capture hooks (the tower then only runs through :meth:`__call__`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _layer_enter(self, _module, args, kwargs) -> None:
        state = self._state
        if state is None:
            return
        state.layer += 1
        state.calls = {}
        state.layer_input = input_tensor(args, kwargs)
        if state.layer == 0:
            state.out["seed"] = (state.layer_input, self.spec.layer_layout)

    def _layer_leave(self, _module, _args, out) -> None:
        state = self._state
        if state is None or state.layer not in state.layers:
            return
        for kind in state.kinds:  # 'layer', and the kinds that fall back to the layer output
            if not self.spec.tap(kind).module:
                state.out[(kind, state.layer)] = (_first_tensor(out), self.spec.layer_layout)

    def _sublayer(self, kind: str, tap, _module, _args, out) -> None:
        state = self._state
        if state is None or kind not in state.kinds:
            return
        call = state.calls.get(kind, 0)
        state.calls[kind] = call + 1
        if call == tap.call and state.layer in state.layers:
            state.out[(kind, state.layer)] = (_first_tensor(out), tap.layout)

    def _branch(self, kind: str, tap, _module, args, kwargs) -> None:
        """A branch tap (:attr:`~m2ist.taps.Tap.branch`): the module's input minus the layer's input, the latter
        put in the tap's axis order (a channels-first layer input for a ``b h w c`` tap: VitDet)."""
        state = self._state
        if state is None or kind not in state.kinds:
            return
        call = state.calls.get(kind, 0)
        state.calls[kind] = call + 1
        if call != tap.call or state.layer not in state.layers:
            return
        stream, start = input_tensor(args, kwargs), state.layer_input
        if start is not None and start.dim() == 4 and tap.layout == "b h w c" != self.spec.layer_layout:
            start = start.permute(0, 2, 3, 1)
        if stream is None or start is None or stream.shape != start.shape:
            raise TowerLayoutError(self.refusal(
                f"the {kind} tap reads the input of {tap.module} minus the layer's input, and layer {state.layer} "
                f"gives them shapes {None if stream is None else tuple(stream.shape)} and "
                f"{None if start is None else tuple(start.shape)}; pass explicit tap names"))
        state.out[(kind, state.layer)] = (stream - start, tap.layout)

    # --------------------------------------------------------------------------------------------------------
    def _call(self, **kwargs: Any) -> Any:
        names, var_keyword = self._forward_args
        out = self.model(**{k: v for k, v in kwargs.items() if var_keyword or k in names})
        if isinstance(out, tuple) and not hasattr(out, "last_hidden_state"):
            raise ValueError(f"The {self.modality} tower {type(self.model).__name__} returns a tuple, not a model "
                             "output: its config has return_dict=False (or torchscript=True). Set "
                             "model.config.return_dict = True (and torchscript = False) before wrapping it.")
        if not hasattr(out, "last_hidden_state"):  # a backbone (feature maps) or a task head (logits)
            fields = ", ".join(k for k, v in out.items() if v is not None) if hasattr(out, "items") else type(out).__name__
            what = "a backbone (AutoBackbone), which returns feature maps" if hasattr(out, "feature_maps") else \
                "not a base model"
            raise self.structural_refusal(
                f"its output has no last_hidden_state, only {fields}: it is {what}; load the checkpoint with "
                "AutoModel (its base model) instead, where its family has one")
        encoded: Any = getattr(out, "encoder_last_hidden_state", None)
        if isinstance(encoded, torch.Tensor):
            encoded = tuple(encoded.shape)
        elif isinstance(encoded, list | tuple) and encoded and all(isinstance(e, torch.Tensor) for e in encoded):
            encoded = [tuple(e.shape) for e in encoded]  # multi-scale maps (RT-DETR, D-FINE)
        else:
            encoded = None
        if encoded is not None and self.spec.encode is None:
            # an encoder-decoder (Table Transformer, DAB-DETR, RT-DETR): its last_hidden_state holds the decoder's
            # object queries, which would be read as image patches (100 queries make a 10x10 "grid") without a word
            fix = ("register a TapSpec(encode=...) that runs its encoder alone (m2ist.taps.register_taps(); m2ist "
                   "does so for DETR and Conditional DETR), or use one of those" if self.modality == VISION else
                   "pass its encoder (model.get_encoder())")
            raise self.structural_refusal(
                f"it is an encoder-decoder: its last_hidden_state {tuple(out.last_hidden_state.shape)} is its "
                f"decoder's output (object queries or target tokens), not the {self.modality} tokens, which are its "
                f"encoder_last_hidden_state {encoded}; {fix}")
        return out

    def _run(self, inputs: dict[str, torch.Tensor], hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Forward the tower; return tokens ``(B, N, C)`` in canonical order, mask ``(B, N)`` and the raw output.

        The tower neither draws from nor re-seeds the caller's random state (Reformer calls ``torch.manual_seed``
        with its ``config.hash_seed`` on every forward): the side network's initialisation and dropout draws do not
        depend on whether, or how often, the tower ran (the tower cache skips it; the build probes it). Parts put in
        ``train()`` on purpose (Monte-Carlo dropout, warned by :meth:`tap`) draw from it as they would alone: kept,
        every call would draw the same mask."""
        if self.training_submodule() is not None:
            return self._forward(inputs, hidden_states)
        with random_states_kept(self._device()):
            return self._forward(inputs, hidden_states)

    def _forward(self, inputs: dict[str, torch.Tensor], hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """:meth:`_run` without keeping the random state."""
        if self.modality == TEXT:
            input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
            if getattr(self, "fixed_length", None) is not None:  # a tower that reads its padding: one fixed length
                input_ids, mask = self._fixed_inputs(input_ids, mask)
            out = self._call(input_ids=input_ids, attention_mask=mask, output_hidden_states=hidden_states or None,
                             use_cache=False)
            tokens = out.last_hidden_state
            if tokens.shape[0] != input_ids.shape[0]:
                raise self.structural_refusal(
                    f"{input_ids.shape[0]} phrases give an output of shape {tuple(tokens.shape)}: its forward packs "
                    "the phrases of a batch into one sequence, and m2ist reads one output per phrase; use a tower "
                    "that keeps the batch dimension")
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
            return tokens, mask, out
        pixel_values = inputs["pixel_values"].to(self.dtype)
        pixel_mask = inputs.get("pixel_mask")
        if self.spec.encode is not None and not hidden_states:
            tokens, mask = self.spec.encode(self.model, pixel_values=pixel_values, pixel_mask=pixel_mask)
            return tokens, mask, None
        kwargs: dict[str, Any] = {"pixel_values": pixel_values}
        if pixel_mask is not None and "pixel_mask" in self._forward_args[0]:
            kwargs["pixel_mask"] = pixel_mask
        if self.spec.prepare_inputs is not None:
            kwargs = self.spec.prepare_inputs(self.model, pixel_values, pixel_mask)
        if "interpolate_pos_encoding" in self._forward_args[0] and self.native_size is not None \
                and tuple(pixel_values.shape[-2:]) != self.native_size:
            kwargs["interpolate_pos_encoding"] = True
        out = self._call(**kwargs, output_hidden_states=hidden_states or None)
        if out.last_hidden_state.shape[0] != pixel_values.shape[0]:
            raise self.structural_refusal(
                f"{pixel_values.shape[0]} images give an output of shape {tuple(out.last_hidden_state.shape)}: its "
                "forward packs the images of a batch into one sequence (as Pixtral's vision model does), and m2ist "
                "reads one output per image; use a tower that keeps the batch dimension")
        tokens, grid = to_tokens(out.last_hidden_state, self.spec.layer_layout,
                                 pixel_values.shape[-2] / pixel_values.shape[-1])
        if grid is not None:  # a feature map: no prefix tokens, the grid is its own
            self.num_prefix_tokens, self.num_suffix_tokens, self.grid = 0, 0, grid
        tokens = self.canonical(tokens)
        grid = self.grid_of(tokens.shape[1], pixel_values.shape[-2:])
        return tokens, self.token_mask(pixel_mask, tokens, grid), out

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens in canonical order: raster order (``spec.reorder``), suffix tokens moved behind the prefix."""
        if self.spec.reorder is not None:
            x = self.spec.reorder(self.model, x)
        if self.num_suffix_tokens and x.shape[1] > self.num_suffix_tokens + (self.num_prefix_tokens or 0):
            x = torch.cat([x[:, : self.num_prefix_tokens], x[:, -self.num_suffix_tokens:],
                           x[:, self.num_prefix_tokens: -self.num_suffix_tokens]], dim=1)
        return x

    @property
    def num_leading_tokens(self) -> int:
        """Tokens before the patch grid in canonical order (prefix + suffix tokens)."""
        return (self.num_prefix_tokens or 0) + self.num_suffix_tokens

    def token_mask(self, pixel_mask: torch.Tensor | None, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Validity of each visual token: prefix tokens are valid, a patch token when any pixel under it is the
        image's. (DETR samples the pixel mask at each patch's top-left pixel: with a centred letterbox that drops the
        partial patch row or column at the image's top or left, image pixels the head could then never point at, and
        keeps the one at its bottom or right.)"""
        batch, num_tokens = tokens.shape[:2]
        if pixel_mask is None:
            return torch.ones((batch, num_tokens), dtype=torch.bool, device=tokens.device)
        patches = F.adaptive_max_pool2d(pixel_mask[:, None].float(), grid)[:, 0] > 0.5
        prefix = torch.ones((batch, self.num_leading_tokens), dtype=torch.bool, device=tokens.device)
        return torch.cat([prefix, rearrange(patches, "b h w -> b (h w)")], dim=1)

    def grid_of(self, num_tokens: int, image_hw) -> tuple[int, int] | None:
        """The patch grid of ``num_tokens`` final tokens (vision only), from the tower's token counts; refuses
        (one line naming the override) when the remaining tokens form no grid of the image's aspect."""
        if self.modality == TEXT:
            return None
        aspect = image_hw[0] / image_hw[1]
        patches = num_tokens - self.num_leading_tokens
        if self.grid is not None and self.grid[0] * self.grid[1] == patches:
            return self.grid
        try:
            return infer_grid(patches, aspect)
        except ValueError:
            raise ValueError(self.refusal(
                f"{num_tokens} visual tokens minus {self.num_prefix_tokens} prefix and {self.num_suffix_tokens} suffix "
                f"tokens leave {patches}, no patch grid of a {image_hw[0]}x{image_hw[1]} image; give the token counts "
                "(vision_taps={'num_prefix_tokens': ..., 'num_suffix_tokens': ...})")) from None

    def __call__(self, inputs: dict[str, torch.Tensor]) -> TowerFeatures:
        """Final tokens and mask, with gradients if the caller enables them (used by the baselines)."""
        tokens, mask, _ = self._run(inputs, hidden_states=False)
        return TowerFeatures(tokens=tokens, mask=mask)

    # --------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def tap(self, inputs: dict[str, torch.Tensor], layers: list[int], kinds: list[str]) -> TowerFeatures:
        """Run the frozen tower under ``no_grad`` and return its output with the requested taps.

        ``no_grad`` (not ``inference_mode``) so the taps can feed trainable adapters; nothing inside the tower
        is kept for backward. Taps are returned in float32 whatever the tower's dtype. The tower runs in eval mode
        (no dropout) even if it was put back in train mode; its mode is restored afterwards.
        """
        if self.layers:
            for index in layers:
                if index >= len(self.layers):
                    raise ValueError(f"{self.modality} layer {index} requested, the tower has {len(self.layers)}.")
        state = _Capture(layers=set(layers), kinds=list(kinds)) if self.layers else None
        self._state = state
        # a tower the user put back in train mode: tapped without its dropout, then each module's mode restored
        # (model.train() would also put the parts the user had kept in eval(), e.g. a batch norm, in train mode)
        modes = [(module, module.training) for module in self.model.modules()] if self.model.training else []
        if modes:
            self.model.eval()
        else:
            self._warn_training_parts()
        try:
            tokens, mask, out = self._run(inputs, hidden_states=not self.layers)  # the random state kept
        finally:
            self._state = None
            for module, mode in modes:
                module.training = mode
        captured = state.out if state is not None else {}
        if not self.layers:
            states = getattr(out, self.spec.hidden_states_key)
            captured["seed"] = (states[0], self.spec.layer_layout)
            for index in layers:
                if index + 1 >= len(states):
                    raise ValueError(f"{self.modality} layer {index} requested, the tower has {len(states) - 1}.")
                for kind in kinds:
                    captured[(kind, index)] = (states[index + 1], self.spec.layer_layout)
        image_hw = inputs["pixel_values"].shape[-2:] if self.modality == VISION else None
        aspect = image_hw[0] / image_hw[1] if image_hw is not None else None
        grid = self.grid_of(tokens.shape[1], image_hw)
        tie_last = ties_channels_last([x for x, layout in captured.values() if layout == TOKENS], aspect)

        def aligned(key) -> torch.Tensor:
            if key not in captured:
                raise ValueError(self.refusal(f"the tap {key} was never reached in the forward"))
            raw = captured[key][0]
            if self.modality == TEXT and raw.dim() != 3:  # read as a (B, C, H, W) map, it gave nonsense token counts
                raise self.structural_refusal(
                    f"a layer gives {raw.dim()}-D tensors of shape {tuple(raw.shape)} where m2ist reads (batch, "
                    f"tokens, width), as the final output {tuple(tokens.shape)} is: its layers carry several streams "
                    "of the sequence at once (as Gemma 3n's AltUp does), which no tap lines up with the output; use "
                    "a text tower whose layers carry one")
            x, x_grid = to_tokens(*captured[key], aspect, tie_last)
            if self.modality == VISION:
                x = self.canonical(x)
            return resample_tokens(x, x_grid, tokens, grid, self.num_leading_tokens,
                                   getattr(self, "layer_leading_tokens", 0) or 0).float()

        return TowerFeatures(
            tokens=tokens.float(), mask=mask, seed=aligned("seed"),
            taps={kind: [aligned((kind, index)) for index in layers] for kind in kinds},
        )

    def _warn_training_parts(self) -> None:
        """Warn, once per module name, when a tower in ``eval()`` has a part in ``train()`` (see
        :meth:`training_submodule`): :meth:`tap` runs it so, and its features then change from call to call."""
        name = self.training_submodule()
        if name is None or name == getattr(self, "_warned_training", None):
            return
        self._warned_training = name
        warnings.warn(
            f"The frozen {self.modality} tower has modules in train() mode (e.g. {name!r}) although the tower itself "
            "is in eval(): their dropout draws at random (a batch norm reads the batch and updates its running "
            "statistics), so the tower's features change from call to call and differ from a run with the tower "
            "cache, which refuses this. model.eval(), model.train(), RECTrainer and evaluate() put frozen towers "
            f"back in eval(); so does model.{self.modality}_model.eval(). Ignore this only if the draw is intended "
            "(Monte-Carlo dropout).", UserWarning, stacklevel=4)

    def training_submodule(self) -> str | None:
        """The name of a sub-module that :meth:`tap` runs in ``train()`` mode, preferring one that draws at random
        (dropout, batch norm), or None. :meth:`tap` puts a tower in ``train()`` whole into ``eval()``, so only parts
        put in ``train()`` while the tower is in ``eval()`` count (e.g. dropout modules for Monte-Carlo dropout)."""
        if self.model.training:
            return None
        training = [(name, module) for name, module in self.model.named_modules() if module.training]
        if not training:
            return None
        return next((name for name, module in training if isinstance(module, _RANDOM_IN_TRAINING)), training[0][0])

    def depth(self) -> int | None:
        """Number of tappable layers (None until measured for the ``output_hidden_states`` fallback)."""
        return len(self.layers) if self.layers else None

    def report(self, depth: int, grid: tuple[int, int] | None = None) -> TapReport:
        """What this tower feeds each expert (see :class:`~m2ist.taps.TapReport`)."""
        spec = self.spec

        def path(kind: str) -> str | None:
            tap = spec.tap(kind)
            if not tap.module or spec.uses_hidden_states:
                return None
            return tap.describe()

        layers = tuple(dict.fromkeys(name for name, _ in self.layers)) or (f"{spec.hidden_states_key}[1:]",)
        return TapReport(modality=self.modality, model_type=self.model_type, model_class=type(self.model).__name__,
                         status=spec.status, source=spec.source, depth=depth, layers=layers,
                         attention=path("attention"), ffn=path("ffn"),
                         num_prefix_tokens=self.num_prefix_tokens or 0, num_suffix_tokens=self.num_suffix_tokens,
                         grid=grid, note=spec.note, mixer=getattr(self, "mixer", ""))


__all__ = ["TEXT", "VISION", "Tower", "TowerFeatures", "infer_grid", "resample_tokens", "resolve_tap_spec",
           "to_tokens", "unwrap_tower", "without_trailing_padding"]
