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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .config import CONFIG_NAME, M2ISTConfig
from .head import RECHead, rec_loss
from .layer import SideNetwork, make_checkpoint_function
from .save_and_load import (
    PIPELINE,
    PROCESSOR_CONFIG_NAME,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    load_trainable_state,
    save_trainable_state,
    write_model_card,
)
from .taps import resolve_tap_spec
from .towers import TEXT, VISION, Tower, TowerFeatures

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    size = config.image_size
    device = next(vision_model.parameters()).device
    vision = {"pixel_values": torch.zeros(1, 3, size, size, device=device),
              "pixel_mask": torch.ones(1, size, size, dtype=torch.long, device=device)}
    length = config.max_query_len
    token = min(1, getattr(text_model.config, "vocab_size", 2) - 1)
    device = next(text_model.parameters()).device
    text = {"input_ids": torch.full((1, length), token, dtype=torch.long, device=device),
            "attention_mask": torch.ones(1, length, dtype=torch.long, device=device)}
    return vision, text


def _model_id(model: nn.Module) -> tuple[str | None, str | None]:
    """The Hub id / path and commit a tower was loaded from, when transformers recorded them."""
    config = model.config
    name = getattr(config, "_name_or_path", None) or None
    return name, getattr(config, "_commit_hash", None)


class RECModel(nn.Module):
    """Two towers and a REC head; subclasses decide how the towers' features reach the head."""

    #: the training method (one of :data:`METHODS`); set by each subclass
    method: str | None = None

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, config: M2ISTConfig) -> None:
        super().__init__()
        config = dataclasses.replace(config)  # never mutate the caller's config
        if config.image_size is None:
            config.image_size = int(getattr(vision_model.config, "image_size", None) or 640)
        self.config = config
        self.vision_model = vision_model
        self.text_model = text_model
        self.vision_tower = Tower(vision_model, resolve_tap_spec(vision_model, VISION, config.vision_taps), VISION)
        self.text_tower = Tower(text_model, resolve_tap_spec(text_model, TEXT, config.text_taps), TEXT)
        self.processor = None  # a RECProcessor, used by predict() and saved with the adapter when set

    # ---------------------------------------------------------------------------------------------------------
    def _probe(self, kinds: list[str]) -> tuple[TowerFeatures, TowerFeatures, int, int]:
        """One dummy forward of each tower, tapping every layer: widths, depths and the visual token count."""
        vision_inputs, text_inputs = _dummy_inputs(self.config, self.vision_model, self.text_model)
        depths = []
        for tower, inputs in ((self.vision_tower, vision_inputs), (self.text_tower, text_inputs)):
            depth = tower.depth()
            if depth is None:
                _, _, out = tower._run(inputs, hidden_states=True)
                depth = len(getattr(out, tower.spec.hidden_states_key)) - 1
            depths.append(depth)
        vision = self.vision_tower.tap(vision_inputs, list(range(depths[0])), kinds)
        text = self.text_tower.tap(text_inputs, list(range(depths[1])), kinds)
        return vision, text, depths[0], depths[1]

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
                            num_prefix_tokens=self.vision_tower.num_prefix_tokens or 0)

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
                module = getattr(tower.model, name, None)
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
        """``(trainable, total)`` parameter counts, as in PEFT."""
        counts = self.parameter_counts()
        return sum(n for role, n in counts.items() if role != "frozen"), sum(counts.values())

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
        for modality, model, features, depth in ((VISION, vision_model, vision, vision_depth),
                                                 (TEXT, text_model, text, text_depth)):
            name, revision = _model_id(model)
            recorded = {"model_type": model.config.model_type, "width": features.tokens.shape[-1], "depth": depth,
                        "model_name_or_path": name, "revision": revision}
            for key, value in recorded.items():
                if getattr(config, f"{modality}_{key}") is None:
                    setattr(config, f"{modality}_{key}", value)

    def train(self, mode: bool = True) -> SideTunedModel:
        """Set train/eval mode on the side network and head; the frozen towers always stay in ``eval()``."""
        super().train(mode)
        self.vision_model.eval()
        self.text_model.eval()
        return self

    def encode(self, pixel_values, pixel_mask, input_ids, attention_mask):
        """Run the frozen towers under ``no_grad``, collect the taps, run the side network."""
        vision = self.vision_tower.tap({"pixel_values": pixel_values, "pixel_mask": pixel_mask},
                                       self.vision_layers, self.tap_kinds)
        text = self.text_tower.tap({"input_ids": input_ids, "attention_mask": attention_mask},
                                   self.text_layers, self.tap_kinds)
        vision_tokens, text_tokens = self.side(vision, text, self.intra_kind, self.inter_kind)
        return vision_tokens, vision.mask, text_tokens, text.mask

    # ---------------------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that are saved: the side network's and the head's, never a tower's."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("side.", "head."))}

    def save_pretrained(self, save_directory: str | os.PathLike, *, model_card: bool = True) -> Path:
        """Write ``m2ist_config.json``, ``m2ist_model.safetensors`` (side + head only), a model card and, when
        ``model.processor`` is set, the processor (tokenizer files + ``m2ist_processor.json``)."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(folder)
        save_trainable_state(self.trainable_state_dict(), folder / WEIGHTS_NAME)
        if model_card:
            write_model_card(folder, self.config, self.parameter_counts())
        if self.processor is not None:
            self.processor.save_pretrained(folder)
        return folder

    def push_to_hub(self, repo_id: str, *, commit_message: str = "Upload M²IST side adapter", private: bool | None = None,
                    token: str | None = None, revision: str | None = None, create_pr: bool = False,
                    endpoint: str | None = None) -> str:
        """Save into a temporary folder and upload it to ``repo_id`` (created if needed); return the commit URL."""
        from .hub import push_to_hub

        return push_to_hub(self.save_pretrained, repo_id, commit_message=commit_message, private=private,
                           token=token, revision=revision, create_pr=create_pr, endpoint=endpoint)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        vision_model: nn.Module | None = None,
        text_model: nn.Module | None = None,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        endpoint: str | None = None,
        trust_remote_code: bool = False,
        **config_overrides: Any,
    ) -> SideTunedModel:
        """Load a saved side adapter from a folder or a Hub repo id.

        The towers are the ones passed in, or are re-loaded with ``AutoModel.from_pretrained`` from the names and
        revisions recorded in the config (``trust_remote_code`` stays False unless you pass it). Loading is strict:
        another tower, other widths or depths, missing or unexpected tensors, and corrupted or truncated files
        raise an error that names the difference. ``config_overrides`` change runtime-only fields such as
        ``backbone_dtype``.
        """
        from .hub import resolve_pretrained

        hub = {"revision": revision, "token": token, "cache_dir": cache_dir, "local_files_only": local_files_only,
               "endpoint": endpoint}
        folder = resolve_pretrained(str(name_or_path), filenames=[CONFIG_NAME, WEIGHTS_NAME],
                                    optional_filenames=[PROCESSOR_CONFIG_NAME, *TOKENIZER_FILES], **hub)
        saved = M2ISTConfig.from_json_file(folder / CONFIG_NAME)
        allowed = {"backbone_dtype", "side_dropout", "fusion_dropout"}
        if set(config_overrides) - allowed:
            raise ValueError(f"Only {sorted(allowed)} can be overridden when loading; got {sorted(config_overrides)}.")
        vision_model = vision_model or _load_tower(saved, VISION, trust_remote_code, hub)
        text_model = text_model or _load_tower(saved, TEXT, trust_remote_code, hub)
        measured = {f"{m}_{k}": None for m in (VISION, TEXT) for k in M2ISTConfig.TOWER_FIELDS}
        model = cls(vision_model, text_model,
                    dataclasses.replace(saved, **config_overrides, **measured, num_vision_tokens=None))
        mismatches = saved.tower_mismatches(model.config)
        if saved.num_vision_tokens not in (None, model.config.num_vision_tokens):
            mismatches.append(f"num_vision_tokens: saved {saved.num_vision_tokens}, given "
                              f"{model.config.num_vision_tokens} at image_size={model.config.image_size}")
        if mismatches:
            raise ValueError(f"The adapter in {name_or_path} was trained on other towers: {'; '.join(mismatches)}. "
                             "Pass the towers it was built for (see its m2ist_config.json).")
        for modality in (VISION, TEXT):  # keep the recorded provenance
            for key in ("model_name_or_path", "revision"):
                if getattr(saved, f"{modality}_{key}") is not None:
                    setattr(model.config, f"{modality}_{key}", getattr(saved, f"{modality}_{key}"))
        load_trainable_state(model, folder / WEIGHTS_NAME)
        if (folder / PROCESSOR_CONFIG_NAME).exists() and PIPELINE.load_processor is not None:
            model.processor = PIPELINE.load_processor(str(folder))  # tokenizer files came with it, same commit
        return model


def _load_tower(config: M2ISTConfig, modality: str, trust_remote_code: bool, hub: dict[str, Any]) -> nn.Module:
    from transformers import AutoModel

    name = getattr(config, f"{modality}_model_name_or_path")
    if not name:
        raise ValueError(f"The saved config records no {modality} tower name: pass {modality}_model= to "
                         "SideTunedModel.from_pretrained().")
    logger.info("Loading the %s tower %s", modality, name)
    return AutoModel.from_pretrained(
        name, revision=getattr(config, f"{modality}_revision"), token=hub["token"], cache_dir=hub["cache_dir"],
        local_files_only=hub["local_files_only"], trust_remote_code=trust_remote_code,
    )


def get_side_tuned_model(vision_model: nn.Module, text_model: nn.Module,
                         config: M2ISTConfig | None = None) -> SideTunedModel:
    """Wrap two Hugging Face towers for M²IST side-tuning (both frozen) and attach the REC head.

    ``config`` defaults to the paper's settings. The caller's config object is not modified; the built model's
    ``model.config`` records the towers.
    """
    return SideTunedModel(vision_model, text_model, config or M2ISTConfig())
