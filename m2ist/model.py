"""`SideTunedModel`: two frozen Hugging Face towers, the M³ISA side network and the REC head.

```
vision tower (frozen) ──taps──┐
                              ├─ M³ISA side network (VEA, LEA, IEA per depth) ─┐
text tower (frozen) ───taps───┘                                               ├─ REC head ([REG] fusion → box)
                        towers' final outputs ─────────────────────────────────┘
```
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .card import CARD_NAME, EVAL_RESULTS_NAME, write_model_card
from .config import CONFIG_NAME, M2ISTConfig
from .head import RECHead, rec_loss
from .layer import SideNetwork, make_checkpoint_function
from .save_and_load import (
    PIPELINE,
    PROCESSOR_CONFIG_NAME,
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    load_trainable_state,
    save_folder_atomically,
    save_trainable_state,
)
from .taps import TapReport, resolve_tap_spec
from .towers import TEXT, VISION, Tower, TowerFeatures, unwrap_tower

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Config fields that ``SideTunedModel.from_pretrained`` lets a caller change (runtime settings, not architecture).
LOAD_OVERRIDES = ("backbone_dtype", "side_dropout", "fusion_dropout")
#: Training methods a REC model can carry (``model.method``): M²IST, and the baselines of
#: :mod:`m2ist.evidence.baselines` (full fine-tuning, in-tower adapters, LoRA) that share its head.
METHODS = ("m2ist", "full", "adapter", "lora")


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


def _model_id(model: nn.Module) -> tuple[str | None, str | None]:
    """The Hub id / path and the commit a tower was loaded from.

    transformers 5 no longer fills ``config._commit_hash``: the commit is read from a cache snapshot path
    (``.../snapshots/<sha>/``), else from the Hub cache's record of the repo's current ``main``.
    """
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or None
    commit = getattr(config, "_commit_hash", None)
    if name and commit is None:
        commit = commit_of(name)
    snapshot = re.search(r"(?:^|/)models--([^/]+)/snapshots/[0-9a-f]{40}/?$", str(name or ""))
    if snapshot:  # a Hub cache folder: record the repo id, the commit pins the files
        name = snapshot.group(1).replace("--", "/")
    return name, commit


def commit_of(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The commit a tower named ``name_or_path`` was loaded from, when it can be known: the ``<sha>`` of a
    ``snapshots/<sha>`` folder, else the commit the Hub cache holds for the repo id (None for a plain folder)."""
    match = re.search(r"(?:^|/)snapshots/([0-9a-f]{40})(?:/|$)", str(name_or_path))
    if match:
        return match.group(1)
    if Path(name_or_path).exists():
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name_or_path), "config.json", cache_dir=cache_dir)
    except Exception:  # not a repo id
        return None
    match = re.search(r"snapshots/([0-9a-f]{40})/", str(cached)) if isinstance(cached, str) else None
    return match.group(1) if match else None


class RECModel(nn.Module):
    """Two towers and a REC head; subclasses decide how the towers' features reach the head."""

    #: the training method (one of :data:`METHODS`); set by each subclass
    method: str | None = None

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, config: M2ISTConfig) -> None:
        super().__init__()
        config = dataclasses.replace(config)  # never mutate the caller's config
        self.config = config
        self.tower_classes = {VISION: type(vision_model).__name__, TEXT: type(text_model).__name__}
        self.tower_ids = {VISION: _model_id(vision_model), TEXT: _model_id(text_model)}
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
        self._tap_reports: tuple[TapReport, ...] = ()
        self.processor = None  # a RECProcessor, used by predict() and saved with the adapter when set

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
            raise ValueError(f"The {modality} tower ({type(model).__name__}) fails on {probe}: {reason}. Is it a "
                             f"{modality} model (vision_model first, text_model second), built for this image size?"
                             ) from err
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
        recorded = self.config.num_vision_tokens
        if recorded is not None and recorded != num_vision_tokens:
            raise ValueError(
                f"The vision tower gives {num_vision_tokens} tokens at image_size={self.config.image_size}, but the "
                f"config records num_vision_tokens={recorded}: use the tower and image size the head was trained with."
            )
        self.config.num_vision_tokens = num_vision_tokens
        size = self.config.image_size
        try:
            grid = self.vision_tower.grid_of(num_vision_tokens, (size, size))
        except ValueError:  # tokens that do not form a grid: only box_readout='reg' can use them
            grid = None
        self.head = RECHead(self.config, vision_width, text_width, num_vision_tokens, vision_grid=grid,
                            num_prefix_tokens=self.vision_tower.num_leading_tokens)

    def encode(self, pixel_values, pixel_mask, input_ids, attention_mask) -> tuple[torch.Tensor, ...]:
        """Return ``(vision_tokens, vision_mask, text_tokens, text_mask)`` for the head."""
        raise NotImplementedError

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> RECModelOutput | tuple:
        """Predict one box per (image, expression); with ``labels`` ``(B, 4)`` (normalised cx, cy, w, h) also
        return the loss."""
        if pixel_values.shape[0] == 0 or input_ids.shape[0] == 0:
            raise ValueError("Empty batch: pass at least one image and one expression.")
        vocab = getattr(self.text_model.config, "vocab_size", None)
        if isinstance(vocab, int) and input_ids.numel() and (int(input_ids.max()) >= vocab or int(input_ids.min()) < 0):
            raise ValueError(f"input_ids hold token ids outside the text tower's vocabulary (0..{vocab - 1}; got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}): the tokenizer does not belong to this "
                             "text tower. Use the processor saved with the adapter.")
        vision_tokens, vision_mask, text_tokens, text_mask = self.encode(pixel_values, pixel_mask, input_ids,
                                                                         attention_mask)
        pred_boxes, patch_logits = self.head(vision_tokens, vision_mask, text_tokens, text_mask)
        losses = rec_loss(pred_boxes, labels, self.config, patch_logits) if labels is not None else {}
        output = RECModelOutput(pred_boxes=pred_boxes, patch_logits=patch_logits, **losses)
        return output if return_dict else output.to_tuple()

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
            if id(param) in unused:
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
        loaded for inference, ``from_pretrained(..., is_trainable=False)``)."""
        unused = self._unused_parameters()
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad and id(p) not in unused)
        return trainable, sum(self.parameter_counts().values())

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
        if not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}.")
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

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, config: M2ISTConfig | None = None) -> None:
        super().__init__(vision_model, text_model, config or M2ISTConfig())
        config = self.config
        for tower in (vision_model, text_model):
            tower.requires_grad_(False)
            tower.eval()
            if config.backbone_dtype is not None:
                tower.to(DTYPES[config.backbone_dtype])
        self.intra_kind, self.inter_kind = config.intra_tap, config.inter_tap
        self.tap_kinds = sorted({config.intra_tap, config.inter_tap})
        vision, text, vision_depth, text_depth = self._probe(self.tap_kinds)
        pairs = pair_layers(config, vision_depth, text_depth)
        self.vision_layers = [v for v, _ in pairs]
        self.text_layers = [t for _, t in pairs]

        def dims(features: TowerFeatures, layers: list[int]) -> dict[str, Any]:
            return {"width": features.tokens.shape[-1], "seed": features.seed.shape[-1],
                    "intra": [features.taps[config.intra_tap][i].shape[-1] for i in layers],
                    "inter": [features.taps[config.inter_tap][i].shape[-1] for i in layers]}

        self.side = SideNetwork(vision_dims=dims(vision, self.vision_layers), text_dims=dims(text, self.text_layers),
                                bottleneck=config.bottleneck, scale=config.adapter_scale, experts=config.experts,
                                share_up_projection=config.share_iea_up_projection, dropout=config.side_dropout)
        self._build_head(vision.tokens.shape[-1], text.tokens.shape[-1], vision.tokens.shape[1])
        self.side.to(vision.tokens.device)
        self.head.to(vision.tokens.device)
        for modality, model, features, depth in ((VISION, self.vision_model, vision, vision_depth),
                                                 (TEXT, self.text_model, text, text_depth)):
            name, revision = self.tower_ids[modality]
            recorded = {"model_type": model.config.model_type, "width": features.tokens.shape[-1], "depth": depth,
                        "model_name_or_path": name, "revision": revision, "model_class": self.tower_classes[modality]}
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

        ``model.to("cuda")``, ``model.to(torch.bfloat16)``, ``model.to("cuda", torch.float16)`` work as on any
        module, except that a dtype applies to the trained part only: the frozen towers keep the dtype set by
        ``config.backbone_dtype`` (rebuild or reload with ``backbone_dtype=...`` to change it).
        """
        try:
            device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError) as err:
            raise TypeError(f"SideTunedModel.to() takes a device and/or a floating dtype, e.g. to('cuda') or "
                            f"to(torch.bfloat16); got args={args}, kwargs={kwargs} ({err}).") from None
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"SideTunedModel.to({dtype}): the side network and head need a floating dtype "
                            f"(torch.float32, torch.bfloat16 or torch.float16).")
        if device is not None:
            super().to(device=device, non_blocking=non_blocking)
        if dtype is not None:
            self.side.to(dtype=dtype, non_blocking=non_blocking)
            self.head.to(dtype=dtype, non_blocking=non_blocking)
        return self

    def half(self) -> SideTunedModel:
        """Cast the side network and head to float16 (the towers keep ``config.backbone_dtype``)."""
        return self.to(torch.float16)

    def bfloat16(self) -> SideTunedModel:
        """Cast the side network and head to bfloat16 (the towers keep ``config.backbone_dtype``)."""
        return self.to(torch.bfloat16)

    def float(self) -> SideTunedModel:
        """Cast the side network and head to float32 (the towers keep ``config.backbone_dtype``)."""
        return self.to(torch.float32)

    def encode(self, pixel_values, pixel_mask, input_ids, attention_mask):
        """Run the frozen towers under ``no_grad``, collect the taps, run the side network."""
        vision = self.vision_tower.tap({"pixel_values": pixel_values, "pixel_mask": pixel_mask},
                                       self.vision_layers, self.tap_kinds)
        text = self.text_tower.tap({"input_ids": input_ids, "attention_mask": attention_mask},
                                   self.text_layers, self.tap_kinds)
        dtype = self.dtype
        if dtype != torch.float32:  # taps come in float32; a half-precision side network reads them in its dtype
            vision, text = _cast_features(vision, dtype), _cast_features(text, dtype)
        vision_tokens, text_tokens = self.side(vision, text, self.intra_kind, self.inter_kind)
        return vision_tokens, vision.mask, text_tokens, text.mask

    # ---------------------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are saved: the side network's and the head's, never a tower's."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("side.", "head."))}

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card: bool = True,
                        repo_id: str | None = None) -> Path:
        """Write ``m2ist_config.json``, ``m2ist_model.safetensors`` (side + head only), a model card and, when
        ``model.processor`` is set, the processor (tokenizer files, ``processor_config.json``).

        The card (``README.md``) is updated when the folder already has one (its text and metadata are kept);
        ``repo_id`` is the Hub repo it is for (``push_to_hub`` passes it), shown in its usage snippet.

        The folder is replaced as a whole (see :func:`m2ist.save_and_load.save_folder_atomically`): it always holds
        one complete adapter, the old or the new one, even with concurrent savers or a save that fails half-way;
        other entries of the folder (notes, ``checkpoint-*`` folders) are kept. Non-finite weights are refused."""
        target = Path(save_directory)
        return save_folder_atomically(
            save_directory, lambda folder: self.write_adapter_files(folder, model_card, repo_id=repo_id, previous=target))

    def write_adapter_files(self, folder: Path, model_card: bool = True, *, repo_id: str | None = None,
                            previous: Path | None = None) -> None:
        """Write the adapter's files into an existing ``folder`` as they come (``save_pretrained`` calls this on a
        temporary folder that it then swaps in whole: use ``save_pretrained``). ``previous`` is the folder being
        replaced: its card and measured results are carried over, so the card is updated rather than replaced."""
        if model_card and previous is not None:
            for name in (CARD_NAME, EVAL_RESULTS_NAME):
                if (previous / name).is_file():
                    shutil.copy2(previous / name, folder / name)
        self.config.save_pretrained(folder)
        save_trainable_state(self.trainable_state_dict(), folder / WEIGHTS_NAME)
        if model_card:
            write_model_card(folder, self.config, self.parameter_counts(), repo_id=repo_id)
        if self.processor is not None:
            self.processor.save_pretrained(folder)

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload M²IST side adapter", private: bool | None = None,
                    token: str | None = None, revision: str | None = None, create_pr: bool = False,
                    endpoint: str | None = None) -> str:
        """Save into a temporary folder and upload the adapter's files to ``repo_id`` (created if needed); return the
        commit URL. The card names ``repo_id`` in its usage snippet."""
        from .hub import push_to_hub

        def save(folder: Path) -> Path:
            return self.save_pretrained(folder, repo_id=repo_id)

        return push_to_hub(save, repo_id, commit_message=commit_message, private=private,
                           token=token, revision=revision, create_pr=create_pr, endpoint=endpoint)

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
            trust_remote_code: passed to ``AutoModel.from_pretrained`` when the towers are re-loaded.
            **kwargs: runtime settings of the config that may differ from the saved ones: ``backbone_dtype``,
                ``side_dropout``, ``fusion_dropout``. Anything else is refused.

        Loading is strict: another tower, other widths or depths, missing or unexpected tensors, and corrupted
        or truncated files raise an error that names the difference.
        """
        from .hub import resolve_pretrained

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
        target_device = _single_device(device, device_map)
        hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only,
               "endpoint": endpoint}
        folder = resolve_pretrained(str(name_or_path), filenames=[CONFIG_NAME, WEIGHTS_NAME],
                                    optional_filenames=[PROCESSOR_CONFIG_NAME, *TOKENIZER_FILES, *PROCESSOR_FILES],
                                    subfolder=subfolder, **hub)
        saved = M2ISTConfig.from_json_file(folder / CONFIG_NAME)
        adapter_dtype = _adapter_dtype(dtype, folder / WEIGHTS_NAME)
        vision_model = vision_model or _load_recorded_tower(saved, VISION, trust_remote_code, hub, name_or_path)
        text_model = text_model or _load_recorded_tower(saved, TEXT, trust_remote_code, hub, name_or_path)
        measured = {f"{m}_{k}": None for m in (VISION, TEXT) for k in M2ISTConfig.TOWER_FIELDS}
        model = cls(vision_model, text_model,
                    dataclasses.replace(saved, **kwargs, **measured, num_vision_tokens=None))
        mismatches = saved.tower_mismatches(model.config)
        if saved.num_vision_tokens not in (None, model.config.num_vision_tokens):
            mismatches.append(f"num_vision_tokens: saved {saved.num_vision_tokens}, given "
                              f"{model.config.num_vision_tokens} at image_size={model.config.image_size}")
        if mismatches:
            raise ValueError(f"The adapter in {name_or_path} was trained on other towers: {'; '.join(mismatches)}. "
                             "Pass the towers it was built for (see its m2ist_config.json).")
        for modality in (VISION, TEXT):  # keep the recorded provenance
            for key in ("model_name_or_path", "revision", "model_class"):
                if getattr(saved, f"{modality}_{key}") is not None:
                    setattr(model.config, f"{modality}_{key}", getattr(saved, f"{modality}_{key}"))
        if adapter_dtype is not None:  # asked for a dtype: load in the saved one (checked exactly), then cast
            model.to(_adapter_dtype("auto", folder / WEIGHTS_NAME) or adapter_dtype)
        load_trainable_state(model, folder / WEIGHTS_NAME)
        if adapter_dtype is not None:
            model.to(adapter_dtype)
        saved_processor = next((folder / name for name in (*PROCESSOR_FILES, PROCESSOR_CONFIG_NAME)
                                if (folder / name).is_file()), None)  # the file RECProcessor reads first
        if PIPELINE.load_processor is not None and saved_processor is not None:
            try:
                model.processor = PIPELINE.load_processor(str(folder))  # tokenizer files came with it, same commit
            except (ValueError, TypeError, KeyError, AttributeError) as err:  # JSONDecodeError is a ValueError
                raise ValueError(f"{saved_processor}: the processor saved with the adapter cannot be restored "
                                 f"({type(err).__name__}: {' '.join(str(err).split())}). Fix or delete that file "
                                 "and pass a processor yourself.") from err
        if target_device is not None:
            model.to(target_device)
        for module in (model.side, model.head):
            module.requires_grad_(is_trainable)
        model.train(is_trainable)
        return model


_FROM_PRETRAINED_ARGUMENTS = ("vision_model", "text_model", "is_trainable", "subfolder", "revision", "dtype",
                              "torch_dtype", "device", "device_map", "token", "cache_dir", "local_files_only",
                              "endpoint", "trust_remote_code")


def _cast_features(features: TowerFeatures, dtype: torch.dtype) -> TowerFeatures:
    """The floating tensors of ``features`` in ``dtype`` (masks untouched)."""
    return dataclasses.replace(
        features, tokens=features.tokens.to(dtype),
        seed=None if features.seed is None else features.seed.to(dtype),
        taps={kind: [t.to(dtype) for t in tensors] for kind, tensors in features.taps.items()})


def _adapter_dtype(dtype: str | torch.dtype | None, weights: Path) -> torch.dtype | None:
    """The dtype asked for the side network and head: None (keep float32), a torch dtype, a name, or "auto"."""
    if dtype is None:
        return None
    if dtype == "auto":
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as handle:
            keys = list(handle.keys())
            return handle.get_tensor(keys[0]).dtype if keys else None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported: use one of {sorted(DTYPES)}, a torch dtype, or 'auto'.")
        return DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a floating torch dtype: use torch.float32, torch.bfloat16, "
                         "torch.float16 or 'auto'.")
    return dtype


def _single_device(device: str | int | torch.device | None,
                   device_map: str | int | torch.device | dict[str, Any] | None) -> torch.device | None:
    """The one device that ``device`` or a single-device ``device_map`` names (an M²IST model is not sharded)."""
    if device is not None and device_map is not None:
        raise TypeError("Pass device= or device_map=, not both.")
    if device_map is None:
        return None if device is None else torch.device(device)
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map={device_map} splits the model; an M²IST model loads on one device: pass "
                             "device='cuda:0' (or device_map={'': 'cuda:0'}).")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device_map in ("balanced", "balanced_low_0", "sequential"):
        raise ValueError(f"device_map={device_map!r} shards a model over devices; an M²IST model loads on one "
                         "device: pass device='cuda:0' or device_map='auto'.")
    return torch.device(device_map)



def tower_class(class_name: str | None) -> type:
    """The transformers model class recorded for a tower, looked up by attribute name on ``transformers`` only
    (never an arbitrary import); ``AutoModel`` when none is recorded or the name is not a model class."""
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    if class_name:
        logger.warning("%r is not a transformers model class: re-loading the tower with AutoModel.", class_name)
    return transformers.AutoModel


def _load_recorded_tower(config: M2ISTConfig, modality: str, trust_remote_code: bool, hub: dict[str, Any],
                         adapter: Any) -> nn.Module:
    """:func:`_load_tower`, with a failure explained in one line: the name came from the adapter's config, whether
    it is a local path, and whether offline mode is on."""
    if not getattr(config, f"{modality}_model_name_or_path"):
        return _load_tower(config, modality, trust_remote_code, hub)  # raises: no name recorded
    try:
        return _load_tower(config, modality, trust_remote_code, hub)
    except (OSError, ValueError) as err:  # ValueError: a folder that is not a model ("Unrecognized model in ...")
        from huggingface_hub import constants

        name = str(getattr(config, f"{modality}_model_name_or_path"))
        if Path(name).is_absolute() or name.startswith((".", "~")) or ".." in Path(name).parts:
            where = (f"a local path, resolved against the working directory {Path.cwd()}" if not Path(name).is_absolute()
                     else "a local path") + (": no such folder" if not Path(name).expanduser().exists() else "")
        else:
            where = "a Hub id" + (" and offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True): the tower is "
                                  "not in the Hub cache" if hub.get("local_files_only") or constants.HF_HUB_OFFLINE else "")
        reason = " ".join(str(err).split())
        raise OSError(f"The adapter {adapter} records the {modality} tower {name!r} ({where}), which cannot be loaded "
                      f"({reason}). Pass {modality}_model= (or --{modality}-model) to give the tower yourself.") from err



def _load_tower(config: M2ISTConfig, modality: str, trust_remote_code: bool, hub: dict[str, Any]) -> nn.Module:
    """Re-load a tower: its recorded class, from its recorded name at its recorded commit, through the same
    endpoint, token, cache and offline setting as the adapter."""
    name = getattr(config, f"{modality}_model_name_or_path")
    if not name:
        raise ValueError(f"The saved config records no {modality} tower name: pass {modality}_model= to "
                         "SideTunedModel.from_pretrained().")
    cls = tower_class(getattr(config, f"{modality}_model_class", None))
    revision = getattr(config, f"{modality}_revision")
    logger.info("Loading the %s tower %s (%s) at %s", modality, name, cls.__name__, revision or "its latest commit")
    folder = name
    if not Path(name).is_dir():
        from huggingface_hub import snapshot_download

        options = {"repo_id": name, "revision": revision, "token": hub["token"], "cache_dir": hub["cache_dir"],
                   "local_files_only": hub["local_files_only"], "endpoint": hub["endpoint"]}
        folder = snapshot_download(**options, allow_patterns=["*.json", "*.safetensors"])
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(**options, allow_patterns=["*.json", "pytorch_model*.bin"])
    return cls.from_pretrained(folder, trust_remote_code=trust_remote_code)


def get_side_tuned_model(vision_model: nn.Module, text_model: nn.Module,
                         config: M2ISTConfig | None = None) -> SideTunedModel:
    """Wrap two Hugging Face towers for M²IST side-tuning (both frozen) and attach the REC head.

    ``config`` defaults to the paper's settings. The caller's config object is not modified; the built model's
    ``model.config`` records the towers.
    """
    return SideTunedModel(vision_model, text_model, config or M2ISTConfig())
