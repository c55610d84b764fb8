"""Train M²IST (and the baselines) with the Hugging Face ``Trainer``.

:class:`RECTrainer` adapts ``transformers.Trainer`` to REC models that are not ``PreTrainedModel`` s:

* checkpoints hold only the trained tensors (side network + head for M²IST, in ``m2ist_model.safetensors`` next to
  ``m2ist_config.json``), never the frozen towers; resuming and ``load_best_model_at_end`` load them strictly;
  optimizer, scheduler, RNG and trainer state are saved by the ``Trainer`` itself;
* two learning rates (the recipe: head 1e-4, side adapters 1e-5), weight decay on weights only, and a step schedule
  (``lr_drop_epochs``: multiply the learning rate by ``lr_drop_factor`` at those epochs, like ``StepLR``);
* evaluation reports ``acc@0.5`` (IoU >= 0.5), ``miou`` and the mean box losses, per evaluation set;
* the training collator (with augmentation) and the evaluation collator (without) are kept apart;
* on a CPU, denormal floats are flushed to zero while training (``flush_denormal``), which keeps steps fast.

:func:`train_rec` wires all of it for a model, a :class:`~m2ist.processing.RECProcessor` and REC datasets.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedDataParallelKwargs
from huggingface_hub import HfApi
from torch import nn
from torch.utils.data import Dataset
from transformers import EvalPrediction, Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_callback import EarlyStoppingCallback, PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy, SaveStrategy, SchedulerType

from .cache import (
    CACHE_DTYPES,
    KEY_FIELDS,
    CachedViewsCollator,
    TowerCacheCollator,
    TowerFeatureCache,
    check_tower_cache,
    expected_records,
)
from .card import EVAL_RESULTS_NAME, WEIGHTS_SHA256_KEY, read_eval_results, write_model_card
from .config import CONFIG_NAME, M2ISTConfig, check_flags
from .data.collator import RECCollator
from .evaluation import paired_iou, write_results
from .head import rec_loss
from .model import DEFAULT_ADAPTER, DTYPES, METHODS, RECModel, SideTunedModel, non_finite_cause
from .ops.boxes import box_convert
from .ops.defaults import on_cpu
from .save_and_load import (
    ADAPTER_FILES,
    OWNED_FILES,
    WEIGHTS_NAME,
    atomic_write,
    check_finite,
    load_trainable_state,
    module_meta_problem,
    processor_settings,
    read_safetensors,
    recorded_sha256,
    save_folder_atomically,
    save_folder_problem,
    tensors_sha256,
    write_safetensors,
)
from .staging import PUSH, leftovers, make_staging
from .version import __version__

__all__ = [
    "NonFiniteTrainingError",
    "RECMetrics",
    "RECTrainer",
    "RECTrainingArguments",
    "StepDropSchedule",
    "adapter_folder",
    "checkpoint_problems",
    "compute_rec_metrics",
    "image_regions",
    "load_trainable_tensors",
    "model_method",
    "resolve_tower_dtype",
    "run_settings",
    "save_trainable_tensors",
    "train_rec",
    "trainable_tensors",
]

logger = logging.getLogger(__name__)

#: Seconds of work after which progress bars appear (shorter work draws none).
PROGRESS_DELAY_S = 2.0

#: Name of the headline metric (Acc@0.5); the Trainer reports it as ``eval_acc@0.5`` (``eval_<set>_acc@0.5``).
ACCURACY_METRIC = "acc@0.5"
#: The settings that define a run, written into every checkpoint and compared when resuming.
RUN_SETTINGS_NAME = "m2ist_run.json"
#: Values of ``RECTrainingArguments.tower_dtype``: ``"auto"``, a dtype name, or ``"keep"`` (leave the towers as they are).
TOWER_DTYPES = ("auto", *DTYPES, "keep")
#: The largest seed: numpy's generators, which the Trainer seeds too, take 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
#: The metrics :class:`RECMetrics` reports; the Trainer adds ``loss`` and prefixes all with ``eval_[<set>_]``.
REC_METRICS = (ACCURACY_METRIC, "miou", "loss_box", "loss_giou")
#: ``TrainingArguments`` options made for classifiers or language models, which fail mid-run on an REC model (a
#: ``KeyError: 'logits'`` at the first step, ...): ``(field, whether the value uses it, why and what to do)``.
_UNSUPPORTED_OPTIONS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("label_smoothing_factor", lambda value: value != 0,
     "smooths classification logits, and an REC head regresses a box: leave it 0"),
    ("neftune_noise_alpha", lambda value: value is not None,
     "adds noise to a language model's input embeddings, which REC models do not expose: leave it None"),
    ("train_sampling_strategy", lambda value: value == "group_by_length",
     "groups items by token count, which REC items (image, expression, box) do not have: use 'random'"),
)
#: ``TrainingArguments`` counts that must be whole numbers >= 1 (0 fails mid-run: a ``ZeroDivisionError`` at the first
#: step for ``gradient_accumulation_steps``, a ``DataLoader`` error at the first batch or the first evaluation).
_POSITIVE_COUNTS = ("gradient_accumulation_steps", "per_device_train_batch_size", "per_device_eval_batch_size")
#: Set on a ``RECAugmentation`` whose seed a trainer gave (it had none): the next trainer gives it its own seed.
_SEED_FROM_TRAINING = "_m2ist_seed_from_training"
#: Metrics whose lower values are better (transformers guesses the direction from a name ending in ``loss`` only).
_LOWER_IS_BETTER = ("loss", "loss_box", "loss_giou")


class NonFiniteTrainingError(FloatingPointError):
    """Training met a NaN or infinite loss, gradient or weight; raised at once, before anything non-finite is saved."""


# ---------------------------------------------------------------------------------------------- arguments
@dataclass
class RECTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the M²IST recipe's defaults and the fields it needs.

    Defaults follow the paper's training recipe: AdamW with weight decay 1e-4, head learning rate
    ``learning_rate=1e-4``, side-adapter (and baseline tower) learning rate ``side_learning_rate=1e-5``, a constant
    learning rate multiplied by ``lr_drop_factor=0.1`` at each epoch of ``lr_drop_epochs`` (the paper: ``[60]`` of
    90 epochs), no gradient clipping, the best checkpoint chosen by ``acc@0.5``. ``remove_unused_columns`` must
    stay False: the collator turns raw items (image, expression, box) into model inputs.
    """

    method: str | None = field(
        default=None,
        metadata={"help": f"Training method, one of {METHODS}; checked against the model. None: taken from the model "
                  "(SideTunedModel -> 'm2ist', BackboneTunedModel -> its method)."},
    )
    side_learning_rate: float = field(
        default=1e-5,
        metadata={"help": "Learning rate of the side adapters (M²IST) or of the trained tower parameters (baselines: "
                  "all tower weights for 'full', in-tower adapters, LoRA). The head uses `learning_rate`."},
    )
    lr_drop_epochs: list[int] = field(
        default_factory=list,
        metadata={"help": "Epochs (counted from 0) at whose start every learning rate is multiplied by "
                  "`lr_drop_factor`, as torch's StepLR/MultiStepLR; e.g. [60] for the paper's 90-epoch RefCOCO run. "
                  "Empty: constant learning rate. Needs lr_scheduler_type='constant' (the default)."},
    )
    lr_drop_factor: float = field(
        default=0.1, metadata={"help": "Factor applied to the learning rates at each epoch of `lr_drop_epochs`."}
    )
    # --- defaults of TrainingArguments changed for REC --------------------------------------------------------
    learning_rate: float = field(default=1e-4, metadata={"help": "Learning rate of the REC head (the recipe: 1e-4)."})
    weight_decay: float = field(
        default=1e-4,
        metadata={"help": "AdamW weight decay, applied to the weight matrices of layers only (not biases, norms, "
                          "embeddings, or a tower's bare tokens and position tables)."},
    )
    max_grad_norm: float = field(
        default=0.0, metadata={"help": "Gradient clipping norm; 0 (the recipe) disables clipping."}
    )
    lr_scheduler_type: SchedulerType | str = field(
        default="constant",
        metadata={"help": "'constant' (the default) uses the step schedule of `lr_drop_epochs` (with `warmup_steps`); "
                  "any other transformers schedule is used as is and cannot be combined with `lr_drop_epochs`."},
    )
    flush_denormal: bool = field(
        default=True,
        metadata={"help": "On a CPU, flush denormal floats to zero while training: AdamW's second moments of small "
                  "gradients decay into denormals, which make CPU matmuls several times slower after a few hundred "
                  "steps. No effect on GPUs."},
    )
    tower_cache: str = field(
        default="off",
        metadata={"help": "Cache the frozen towers' features (M²IST only): 'off', 'memory' (RAM), 'disk' (memory-mapped "
                  "files in <output_dir>/tower_cache) or a folder. Each image (view) and expression runs its tower once; "
                  "later epochs and evaluations read the cache. See m2ist.cache."},
    )
    tower_cache_dtype: str = field(
        default="bfloat16",
        metadata={"help": "Dtype of the cached features: 'bfloat16' (half the bytes of float32), 'float16' or "
                  "'float32' (training then gives the same weights as without the cache, unless bf16/fp16 mixed precision is on: "
                  "the cache runs the towers in their own dtype, outside autocast)."},
    )
    tower_cache_views: int = field(
        default=0,
        metadata={"help": "With a cache and a training augmentation: the fixed number of augmented views per image, "
                  "one picked at random each time the image is batched. Required (>= 1) when the processor augments."},
    )
    tower_dtype: str = field(
        default="auto",
        metadata={"help": "Dtype of M²IST's frozen towers while training: 'auto' (bfloat16 when training on a CUDA "
                  "device that supports it and the towers are float32, else the towers stay as they are), 'float32', "
                  "'bfloat16', 'float16', or 'keep'. The side network and head stay float32; the towers' dtype is "
                  "recorded as the adapter's backbone_dtype. Baselines train their towers: only 'auto'/'keep' there."},
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must be False: REC items (image, expression, box) are not model arguments; the collator "
                  "turns them into inputs."},
    )
    resume_allow_changes: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint even when the run settings recorded in it (seed, batch size, "
                  "method, M2ISTConfig, cache dtype, training-set size) differ from this run's. By default such a "
                  "resume is refused with the differences named. Learning rates, weight decay, the optimizer and its "
                  "settings (optim, optim_args, Adam betas and epsilon) and the schedule cannot change on resume: the "
                  "checkpoint's optimizer and scheduler states restore them."},
    )
    metric_for_best_model: str | None = field(
        default=ACCURACY_METRIC,
        metadata={"help": "Metric that picks the best checkpoint ('acc@0.5'). With several evaluation sets name one, "
                  "e.g. 'val_acc@0.5'; a bare 'acc@0.5' then refers to the first set."},
    )

    def __post_init__(self) -> None:
        # bf16="False" or use_cpu="no" (from a config file read as text) are true: mixed precision, a CPU run
        check_flags("RECTrainingArguments", **self._switches())
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (or None to take it from the model), got {self.method!r}.")
        for name in ("learning_rate", "side_learning_rate", "num_train_epochs", "weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(f"num_train_epochs={self.num_train_epochs} with max_steps={self.max_steps} trains nothing: "
                             "give a positive number of epochs (or max_steps > 0).")
        for name in ("learning_rate", "side_learning_rate", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not self.lr_drop_factor > 0:
            raise ValueError(f"lr_drop_factor must be > 0, got {self.lr_drop_factor}.")
        drops = list(self.lr_drop_epochs or [])
        if any(isinstance(e, bool) or int(e) != e or e < 1 for e in drops):
            raise ValueError(f"lr_drop_epochs must be positive whole epochs (e.g. [60]), got {self.lr_drop_epochs}.")
        self.lr_drop_epochs = sorted(int(e) for e in drops)
        self.tower_cache = check_tower_cache(self.tower_cache)  # "Memory" or "none" would become a folder
        if not 0 <= self.seed <= MAX_SEED or not 0 <= (self.data_seed if self.data_seed is not None else 0) <= MAX_SEED:
            raise ValueError(f"seed={self.seed} / data_seed={self.data_seed}: a seed must be 0 to 2**32 - 1, the seeds "
                             "numpy (which the Trainer seeds too) takes.")
        if self.tower_cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"tower_cache_dtype must be one of {CACHE_DTYPES}, got {self.tower_cache_dtype!r}.")
        if isinstance(self.tower_cache_views, bool) or not isinstance(self.tower_cache_views, int) \
                or self.tower_cache_views < 0:
            raise ValueError(f"tower_cache_views must be a whole number >= 0, got {self.tower_cache_views!r}.")
        if self.tower_dtype not in TOWER_DTYPES:
            raise ValueError(f"tower_dtype must be one of {TOWER_DTYPES}, got {self.tower_dtype!r}.")
        for name, used, why in _UNSUPPORTED_OPTIONS:
            if used(getattr(self, name, None)):
                raise ValueError(f"{name}={getattr(self, name)!r} {why}.")
        if self.greater_is_better is None and isinstance(self.metric_for_best_model, str) \
                and self.metric_for_best_model.endswith(_LOWER_IS_BETTER):
            self.greater_is_better = False  # transformers would keep the *highest* loss_giou / loss_box as best
        super().__post_init__()
        _check_step_counts(self)
        self._orient_plateau_schedule()
        if self.lr_drop_epochs and self.lr_scheduler_type != SchedulerType.CONSTANT:
            raise ValueError(f"lr_drop_epochs={self.lr_drop_epochs} is a step schedule; it cannot be combined with "
                             f"lr_scheduler_type={self.lr_scheduler_type.value!r}. Use one or the other.")

    def _switches(self) -> dict[str, Any]:
        """The boolean fields (transformers' and ours) and their values; a ``bool | None`` field only when set."""
        switches = {}
        for item in dataclasses.fields(self):
            kind = str(item.type).replace("typing.", "").replace(" ", "")
            value = getattr(self, item.name, None)
            optional = kind in ("bool|None", "Optional[bool]", "Union[bool,NoneType]")
            if item.type is bool or kind == "bool" or (optional and value is not None):
                switches[item.name] = value
        return switches

    def _orient_plateau_schedule(self) -> None:
        """Give a metric-driven schedule (``reduce_lr_on_plateau``, ``greedy``) the direction of
        ``metric_for_best_model``: transformers builds both in mode ``"min"`` whatever the metric, so with the default
        ``acc@0.5`` (higher is better) a rising accuracy would count as no improvement and cut the learning rate
        while the model improves. A ``mode`` in ``lr_scheduler_kwargs`` that contradicts ``greater_is_better`` is
        refused."""
        if self.lr_scheduler_type not in (SchedulerType.REDUCE_ON_PLATEAU, SchedulerType.GREEDY):
            return
        kwargs = dict(self.lr_scheduler_kwargs or {})
        mode = "max" if self.greater_is_better else "min"
        if "mode" in kwargs and kwargs["mode"] != mode:
            raise ValueError(f"lr_scheduler_kwargs mode={kwargs['mode']!r} contradicts metric_for_best_model="
                             f"{self.metric_for_best_model!r} with greater_is_better={self.greater_is_better}: the "
                             f"{self.lr_scheduler_type.value} schedule would lower the learning rate while that metric "
                             f"improves. Drop 'mode' (it follows greater_is_better) or set mode={mode!r}.")
        kwargs["mode"] = mode
        self.lr_scheduler_kwargs = kwargs  # a new dict: the caller's is left as it was


def _check_step_counts(args: RECTrainingArguments) -> None:
    """Refuse counts that break a run only once it has started, or that silently do less than asked: a batch size
    or ``gradient_accumulation_steps`` below 1, ``save_steps=0`` with ``save_strategy='steps'`` (transformers then saves
    only at the end, so a run killed midway leaves nothing to resume from), and ``lr_scheduler_kwargs`` with the step
    schedule (``lr_scheduler_type='constant'``), which takes none and would drop them without a word."""
    for name in _POSITIVE_COUNTS:
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    if args.save_strategy == SaveStrategy.STEPS and not args.save_steps > 0:
        raise ValueError(f"save_steps={args.save_steps} with save_strategy='steps' saves no checkpoint before the end of "
                         "training (nothing to resume from if the run stops): give save_steps > 0 (a number of steps, "
                         "or below 1 a fraction of the run), or save_strategy='epoch' / 'no'.")
    if args.lr_scheduler_type == SchedulerType.CONSTANT and args.lr_scheduler_kwargs:
        raise ValueError(f"lr_scheduler_kwargs={args.lr_scheduler_kwargs!r} would be ignored: lr_scheduler_type='constant' "
                         "(the default) is m2ist's step schedule, which takes only warmup_steps, lr_drop_epochs and "
                         "lr_drop_factor. Set the lr_scheduler_type these settings are for (e.g. 'cosine_with_min_lr' for "
                         "min_lr), or drop lr_scheduler_kwargs.")


# ---------------------------------------------------------------------------------------------- schedule
class StepDropSchedule:
    """Learning-rate factor per optimizer step: ``factor ** (drops passed)``, after an optional linear warm-up.

    A callable object (not a lambda) so that ``LambdaLR.state_dict()`` saves it with the checkpoint.
    """

    def __init__(self, drop_steps: Sequence[int], factor: float = 0.1, warmup_steps: int = 0) -> None:
        self.drop_steps = sorted(int(s) for s in drop_steps)
        self.factor = float(factor)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        """The multiplier of every group's base learning rate at optimizer step ``step`` (0-based)."""
        scale = self.factor ** sum(step >= drop for drop in self.drop_steps)
        if step < self.warmup_steps:
            scale *= step / max(1, self.warmup_steps)
        return scale

    def __repr__(self) -> str:
        return f"StepDropSchedule(drop_steps={self.drop_steps}, factor={self.factor}, warmup_steps={self.warmup_steps})"


# ---------------------------------------------------------------------------------------------- tower dtype
def resolve_tower_dtype(requested: str, device: str | torch.device, towers_dtype: torch.dtype | None,
                        bf16_supported: bool) -> torch.dtype | None:
    """The dtype to cast M²IST's frozen towers to before training, or None to leave them as they are.

    ``requested`` is ``RECTrainingArguments.tower_dtype``: ``"keep"`` -> None; a dtype name -> that dtype;
    ``"auto"`` -> bfloat16 when training on a CUDA ``device`` that supports it (``bf16_supported``, i.e.
    ``torch.cuda.is_bf16_supported()``) and the towers are float32 (``towers_dtype``; None when the two towers
    differ), else None: CPUs, older GPUs and towers already cast (``backbone_dtype``) are left alone.
    """
    if requested not in TOWER_DTYPES:
        raise ValueError(f"tower_dtype must be one of {TOWER_DTYPES}, got {requested!r}.")
    if requested == "keep":
        return None
    if requested != "auto":
        return DTYPES[requested]
    if torch.device(device).type == "cuda" and bf16_supported and towers_dtype == torch.float32:
        return torch.bfloat16
    return None


def supports_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` is a CUDA device that computes in bfloat16 (``"auto"``'s condition for bfloat16 towers)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[None]:
    """Flush denormal floats to zero on the CPU inside the block (where the CPU supports it), and stop after unless it
    was on before (torch has no getter: a denormal that multiplies to zero tells): AdamW's second moments of small
    gradients decay into denormals, which make CPU arithmetic several times slower."""
    with on_cpu():  # the probe must compute: not on a "meta" default device (or pay a CUDA launch)
        already = enabled and bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0)[0] == 0)
    flushed = enabled and not already and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


@contextlib.contextmanager
def random_states_kept() -> Iterator[None]:
    """Give back the torch (CPU and initialised CUDA devices), numpy and Python random states after the block: an
    evaluation draws a seed for each ``DataLoader`` it iterates, which would otherwise shift every later draw of the
    training (dropout masks, cached views), so a run that evaluates would train other weights than one that does
    not."""
    cpu, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "mixed"


# ---------------------------------------------------------------------------------------------- trained tensors
def model_method(model: nn.Module) -> str | None:
    """The model's ``method`` (``'m2ist'`` for a :class:`SideTunedModel`, the baseline's for a model of
    :func:`m2ist.evidence.baselines.build_model`), else None."""
    return getattr(model, "method", None)


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds: ``model.trainable_state_dict()`` (M²IST: side + head) when the model has one,
    else every parameter with ``requires_grad`` (baselines: head + trained tower parameters)."""
    if hasattr(model, "trainable_state_dict"):
        return model.trainable_state_dict()
    return {name: param for name, param in model.named_parameters() if param.requires_grad}


class _TrainableView:
    """Gives :func:`m2ist.save_and_load.load_trainable_state` a model's trainable tensors (strict loading)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_tensors(self.model)


def _write_trainable_tensors(model: nn.Module, folder: Path) -> None:
    """Write the model's trained tensors and config into the existing ``folder`` as they come."""
    if isinstance(model, SideTunedModel):
        model.write_adapter_files(folder)
        return
    if isinstance(getattr(model, "config", None), M2ISTConfig):
        model.config.save_pretrained(folder)
    metadata = {"m2ist_version": __version__, "m2ist_method": str(model_method(model))}
    write_safetensors(folder / WEIGHTS_NAME, trainable_tensors(model), metadata)


def save_trainable_tensors(model: nn.Module, output_dir: str | os.PathLike) -> Path:
    """Write the model's trained tensors and config to ``output_dir`` (``m2ist_model.safetensors``,
    ``m2ist_config.json``); never a frozen tower's weights, never non-finite ones. The folder is replaced as a
    whole (other entries kept, see :func:`m2ist.save_and_load.save_folder_atomically`). Returns the folder."""
    return save_folder_atomically(output_dir, lambda folder: _write_trainable_tensors(model, folder))


def trained_adapter(model: nn.Module) -> str | None:
    """The name of the adapter a :class:`SideTunedModel` trains (its active adapter); None for other models."""
    return model.active_adapter if isinstance(model, SideTunedModel) else None


def adapter_folder(folder: str | os.PathLike, adapter: str | None) -> Path:
    """Where ``folder`` (a checkpoint or a saved adapter folder) holds the files of ``adapter``: the folder itself
    for ``"default"`` (or None), else its ``<adapter>/`` subfolder (the layout of ``save_pretrained``)."""
    return Path(folder) if adapter in (None, DEFAULT_ADAPTER) else Path(folder) / adapter


def load_trainable_tensors(model: nn.Module, checkpoint_dir: str | os.PathLike) -> None:
    """Load the trained tensors of ``checkpoint_dir`` into ``model`` strictly: those of the model's active adapter
    (``m2ist_model.safetensors`` at the root for ``"default"``, in ``<adapter>/`` for another one). Missing,
    unexpected or mis-shaped tensors raise an error naming them, and nothing is loaded."""
    adapter = trained_adapter(model)
    folder = adapter_folder(checkpoint_dir, adapter)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no such folder"
        which = f" for the active adapter {adapter!r}" if adapter not in (None, DEFAULT_ADAPTER) else ""
        raise ValueError(f"{folder} holds no {WEIGHTS_NAME}{which}, so {checkpoint_dir} is not a checkpoint written by "
                         f"RECTrainer for this adapter (found: {found}).")
    target = model if hasattr(model, "trainable_state_dict") else _TrainableView(model)
    load_trainable_state(target, path)


# ---------------------------------------------------------------------------------------------- metrics
def image_regions(pixel_mask: torch.Tensor | None, batch_size: int, device: torch.device | None = None) -> torch.Tensor:
    """The real-image part of each canvas as normalised ``xyxy`` ``(B, 4)``, read from ``pixel_mask`` (B, H, W);
    the whole canvas without a mask."""
    if pixel_mask is None:
        return torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float32, device=device).expand(batch_size, 4).clone()
    mask = pixel_mask.bool()
    height, width = mask.shape[-2:]
    columns, rows = mask.any(dim=-2).float(), mask.any(dim=-1).float()  # (B, W), (B, H)
    x0, y0 = columns.argmax(-1), rows.argmax(-1)
    x1, y1 = width - columns.flip(-1).argmax(-1), height - rows.flip(-1).argmax(-1)
    empty_x, empty_y = columns.sum(-1) == 0, rows.sum(-1) == 0
    x0, x1 = torch.where(empty_x, 0, x0), torch.where(empty_x, width, x1)
    y0, y1 = torch.where(empty_y, 0, y0), torch.where(empty_y, height, y1)
    return torch.stack((x0 / width, y0 / height, x1 / width, y1 / height), dim=-1).float()


@on_cpu()  # scored on the CPU whatever torch's default device (a "meta" one holds no values)
def compute_rec_metrics(pred_boxes: Any, labels: Any, regions: Any = None,
                        config: M2ISTConfig | None = None) -> dict[str, float]:
    """REC metrics of ``(N, 4)`` normalised ``(cx, cy, w, h)`` predictions against labels of the same form.

    * ``acc@0.5``: share of predictions with IoU >= 0.5 (the paper's Acc@0.5);
    * ``miou``: mean IoU;
    * ``loss_box``, ``loss_giou``: the mean coordinate and ``1 - GIoU`` losses (as in training, with ``config``).

    IoU is computed on ``xyxy`` boxes with the prediction clamped to ``regions`` (``(N, 4)`` normalised
    ``xyxy`` of the real image on the canvas, e.g. :func:`image_regions` of ``pixel_mask``), which equals the IoU
    in original-image pixels after :meth:`RECProcessor.post_process_boxes` (letterboxing scales both axes equally).
    """
    pred = torch.as_tensor(np.asarray(pred_boxes), dtype=torch.float64)
    target = torch.as_tensor(np.asarray(labels), dtype=torch.float64)
    if pred.ndim != 2 or pred.shape[-1] != 4 or pred.shape != target.shape:
        raise ValueError(f"pred_boxes and labels must both be (N, 4) normalised (cx, cy, w, h) boxes, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}.")
    if pred.shape[0] == 0:
        raise ValueError("No predictions to score: the evaluation set is empty.")
    pred_xyxy = box_convert(pred, "cxcywh", "xyxy")
    if regions is not None:
        region = torch.as_tensor(np.asarray(regions), dtype=torch.float64)
        low, high = region[:, :2].repeat(1, 2), region[:, 2:].repeat(1, 2)
        pred_xyxy = torch.minimum(torch.maximum(pred_xyxy, low), high)
    iou = paired_iou(pred_xyxy, box_convert(target, "cxcywh", "xyxy"), check_frames=False)  # both normalised
    losses = rec_loss(pred, target, config or M2ISTConfig())
    return {
        ACCURACY_METRIC: float((iou >= 0.5).double().mean()),
        "miou": float(iou.mean()),
        "loss_box": float(losses["loss_box"]),
        "loss_giou": float(losses["loss_giou"]),
    }


class RECMetrics:
    """``compute_metrics`` for the ``Trainer``: :func:`compute_rec_metrics` on an ``EvalPrediction`` whose
    ``predictions`` are ``(pred_boxes, image_regions)`` (what :meth:`RECTrainer.prediction_step` returns).

    Every form the Trainer gives is read: the whole set at once (the default), a list of per-batch predictions and
    labels (``eval_do_concat_batches=False``), or one batch per call with ``compute_result`` (``batch_eval_metrics=
    True``: the batches are kept until the last one, then the whole set is scored)."""

    def __init__(self, config: M2ISTConfig | None = None) -> None:
        self.config = config
        self._batches: list[tuple[np.ndarray, np.ndarray | None, np.ndarray]] = []

    def __call__(self, eval_prediction: EvalPrediction, compute_result: bool | None = None) -> dict[str, float]:
        if eval_prediction.label_ids is None:
            raise ValueError("REC evaluation needs boxes: give every evaluation item a 'box'.")
        boxes, regions, labels = _rec_arrays(eval_prediction.predictions, eval_prediction.label_ids)
        if compute_result is None:
            return compute_rec_metrics(boxes, labels, regions, self.config)
        self._batches.append((boxes, regions, labels))
        if not compute_result:
            return {}
        batches, self._batches = self._batches, []
        regions = None if any(r is None for _, r, _ in batches) else np.concatenate([r for _, r, _ in batches])
        return compute_rec_metrics(np.concatenate([b for b, _, _ in batches]), np.concatenate([lab for _, _, lab in
                                                                                             batches]), regions,
                                   self.config)


def _array(value: Any) -> np.ndarray:
    """A tensor (on any device) or an array as a float numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _rec_arrays(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """``(pred_boxes, image_regions or None, labels)`` as ``(N, 4)`` arrays from what the Trainer hands
    ``compute_metrics``: ``(boxes, regions)`` or ``boxes`` with their labels, or (``eval_do_concat_batches=False``)
    lists of those per batch, which are joined."""
    if isinstance(labels, list | tuple):  # one entry per batch
        items = list(predictions) if isinstance(predictions, list | tuple) else [predictions]
        if len(items) != len(labels):
            raise ValueError(f"compute_metrics got {len(items)} batches of predictions for {len(labels)} batches of "
                             "labels.")
        parts = [_rec_arrays(item, label) for item, label in zip(items, labels, strict=True)]
        regions = None if any(r is None for _, r, _ in parts) else np.concatenate([r for _, r, _ in parts])
        return np.concatenate([b for b, _, _ in parts]), regions, np.concatenate([lab for _, _, lab in parts])
    regions = None
    if isinstance(predictions, tuple | list):
        predictions, regions = predictions[0], (predictions[1] if len(predictions) > 1 else None)
    return _array(predictions), None if regions is None else _array(regions), _array(labels)


# ---------------------------------------------------------------------------------------------- the trainer
class StderrProgressCallback(ProgressCallback):
    """transformers' progress bars, with the log dicts (loss, learning rate, ...) written on stderr above the bar
    instead of on stdout, which stays for results. The training bar shows up once training has taken a few seconds:
    a short run draws none."""

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, delay=PROGRESS_DELAY_S)

    def on_log(self, args, state, control, logs=None, **kwargs):
        with contextlib.redirect_stdout(sys.stderr):
            return super().on_log(args, state, control, logs=logs, **kwargs)


class StderrPrinterCallback(PrinterCallback):
    """transformers' log printer (used when progress bars are off), printing on stderr instead of stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        with contextlib.redirect_stdout(sys.stderr):
            return super().on_log(args, state, control, logs=logs, **kwargs)



def decayed_parameter_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that are layer weight matrices: a ``*weight`` parameter of two or more
    dimensions held by a module that is neither an embedding nor a normalisation (by class: ``nn.Embedding``, the
    ``torch.nn`` norms, or a class whose name has ``Norm`` in it, as ``LlamaRMSNorm``). A parameter shared by several
    modules is decayed only if every one of them would decay it."""
    norms = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
             nn.modules.batchnorm._NormBase)
    verdicts: dict[int, bool] = {}
    for module in model.modules():
        held_by_norm = isinstance(module, norms) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            decays = name.endswith("weight") and param.ndim >= 2 and not held_by_norm
            verdicts[id(param)] = verdicts.get(id(param), True) and decays
    return [name for name, param in model.named_parameters(remove_duplicate=False) if verdicts.get(id(param), False)]


class RECTrainer(Trainer):
    """``transformers.Trainer`` for :class:`SideTunedModel` and the baselines of :func:`m2ist.evidence.baselines.build_model`.

    Differences from ``Trainer`` (see the module docstring): checkpoints hold only the trained tensors and load
    strictly; head and side/tower parameters get ``learning_rate`` and ``args.side_learning_rate``; the schedule is
    a step schedule (``args.lr_drop_epochs``); evaluation reports ``acc@0.5``, ``miou``, ``loss_box`` and
    ``loss_giou`` (``compute_metrics`` defaults to :class:`RECMetrics`); ``eval_data_collator`` (default: the
    training ``RECCollator`` without its augmentation, else the training collator) builds evaluation and prediction
    batches. ``predict()`` returns
    ``predictions=(pred_boxes, image_regions)``. The log dicts (loss, learning rate, ...) go to stderr, not stdout.

    Args:
        model: a :class:`SideTunedModel` or a baseline (:class:`BackboneTunedModel`).
        args: :class:`RECTrainingArguments` (the trainer works on a shallow copy).
        data_collator: the training collator, e.g. ``RECCollator(processor, train=True)`` (the default when
            ``processing_class`` is a :class:`~m2ist.processing.RECProcessor`).
        eval_data_collator: the evaluation collator, e.g. ``RECCollator(processor)`` (no augmentation; the default
            for a training ``RECCollator``).
        **kwargs: anything ``Trainer`` takes (``train_dataset``, ``eval_dataset`` (a dataset or a dict of them),
            ``processing_class``, ``callbacks``, ...).
    """

    def __init__(self, model: RECModel | None = None, args: RECTrainingArguments | None = None,
                 data_collator: Callable | None = None, eval_data_collator: Callable | None = None,
                 **kwargs: Any) -> None:
        if model is None:
            raise ValueError("RECTrainer needs a model (model_init is not supported): pass a SideTunedModel or a "
                             "baseline from m2ist.evidence.baselines.build_model().")
        if not isinstance(model, RECModel):
            raise TypeError(_not_a_rec_model(model))
        problem = module_meta_problem(model, "The model")
        if problem:  # the Trainer's move would say "use to_empty()", which trains on uninitialised memory
            raise ValueError(problem)
        if args is None:
            args = RECTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, RECTrainingArguments):
            raise TypeError(f"RECTrainer needs RECTrainingArguments (it adds side_learning_rate, lr_drop_epochs, "
                            f"method), got {type(args).__name__}.")
        if args.remove_unused_columns:
            raise ValueError("remove_unused_columns=True would strip the items' 'image', 'expression' and 'box' before "
                             "the REC collator sees them: set remove_unused_columns=False.")
        found = model_method(model)
        if args.method is not None and args.method != found:
            raise ValueError(f"args.method={args.method!r} but the model is a {type(model).__name__} ({found!r}). "
                             f"Build the model for that method: m2ist.evidence.baselines.build_model(vision, text, config, "
                             f"method={args.method!r}).")
        if not isinstance(model, SideTunedModel) and args.tower_dtype not in ("auto", "keep"):
            raise ValueError(f"tower_dtype={args.tower_dtype!r} casts frozen towers, but method {found!r} trains its "
                             "towers: use tower_dtype='auto' or 'keep' for baselines (or bf16=True for mixed precision).")
        output_dir = Path(args.output_dir)
        problem = save_folder_problem(output_dir.resolve()) if output_dir.is_dir() else None
        if problem is not None:  # the final save would refuse it: say so before training, not after
            raise ValueError(f"Cannot train into output_dir={args.output_dir!r}: {problem}.")
        args = copy.copy(args)  # the metric name may be resolved below; never change the caller's arguments
        eval_dataset = kwargs.get("eval_dataset")
        if args.save_strategy == SaveStrategy.BEST and not eval_dataset:
            raise ValueError("save_strategy='best' saves a checkpoint when the evaluation metric improves, but there is "
                             "no evaluation data: pass eval_dataset (--eval-splits / --eval-file), or use "
                             "save_strategy='steps' or 'epoch'.")
        if kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = RECMetrics(model.config)
        _refuse_empty_sets(_named_sets(eval_dataset))
        if args.metric_for_best_model is not None:
            args.metric_for_best_model = _resolve_best_metric(args, eval_dataset, kwargs["compute_metrics"],
                                                              kwargs.get("callbacks"))
        self.method = found
        data_collator, eval_data_collator = _default_collators(data_collator, eval_data_collator,
                                                               kwargs.get("processing_class"))
        self.eval_data_collator = eval_data_collator
        #: the optimizer ``create_optimizer`` built (None: none yet, or one passed in ``optimizers=``)
        self._built_optimizer: torch.optim.Optimizer | None = None
        #: ``{global step: SHA-256 of the trained tensors}`` of each evaluation (what its results measured)
        self._evaluated_weights: dict[int, str] = {}
        self._update_steps_per_epoch: int | None = None
        #: whether ``train()`` restarted the training augmentation's generator (at the first call)
        self._augmentation_started = False
        #: the training loader's collator when it draws at random (see :class:`_NumberedBatches`), else None
        self._numbered_batches: _NumberedBatches | None = None
        #: the batches of one epoch of the training loader (None: the loader has no length)
        self._batches_per_epoch: int | None = None
        #: the sizes of the batches of the current gradient accumulation window (see ``get_batch_samples``)
        self._window_sizes: list[int] | None = None
        #: per-sample evaluation losses gathered from every process (see ``evaluation_loop``; None: not collected)
        self._sample_losses: list[torch.Tensor] | None = None
        self.tower_cache: TowerFeatureCache | None = None
        if args.tower_cache != "off":
            data_collator, self.eval_data_collator = self._caching_collators(model, args, data_collator,
                                                                            eval_data_collator)
        super().__init__(model=model, args=args, data_collator=data_collator, **kwargs)
        #: the arguments applied here, once (see :meth:`_refuse_changed_arguments`)
        self._applied_arguments = {name: getattr(args, name) for name in _APPLIED_WHEN_BUILT}
        self._set_tower_dtype()  # the Trainer has placed the model; the tower cache (keyed by the dtype) is not open
        self._check_processors_fit()
        self._adopt_processor()
        for stdout_callback, stderr_callback in ((ProgressCallback, StderrProgressCallback),
                                                 (PrinterCallback, StderrPrinterCallback)):
            if self.pop_callback(stdout_callback) is not None:  # log dicts on stderr: stdout is for results
                self.add_callback(stderr_callback)
        # Our forward takes no loss kwargs: the loss is a per-batch mean and the Trainer scales it for accumulation.
        self.model_accepts_loss_kwargs = False

    def _check_processors_fit(self) -> None:
        """Refuse, before any step, a processor the batches are prepared with (``processing_class``, the training and
        evaluation collators' own) that does not fit the model (:meth:`~m2ist.processing.RECProcessor.check_fits`: its
        canvas, query length, tokenizer against the text tower); ``model.processor`` was checked when attached."""
        model = self.accelerator.unwrap_model(self.model)
        found = [self.processing_class] + [_collator_processor(collator)
                                           for collator in (self.data_collator, self.eval_data_collator)]
        distinct = {id(processor): processor for processor in found if processor is not None}
        for processor in distinct.values():
            if callable(getattr(processor, "check_fits", None)) and processor is not getattr(model, "processor", None):
                processor.check_fits(model)

    def _adopt_processor(self) -> None:
        """A SideTunedModel keeps the processor it is trained with as ``model.processor``, which ``save_pretrained``
        saves with the adapter and ``predict``/``evaluate`` use: the training processor (``processing_class``) is
        attached to a model that has none, and replaces one that prepares inputs otherwise, with a warning naming
        the differences (the adapter would have been saved with, and predicted through, a processor it never saw).
        On a model of several adapters, which all share ``model.processor``, a differing one is named and kept."""
        from m2ist.processing import describe_differences

        model, processor = self.accelerator.unwrap_model(self.model), self.processing_class
        if not isinstance(model, SideTunedModel) or not hasattr(processor, "differences") or model.processor is processor:
            return
        if model.processor is None:
            model.processor = processor
            return
        differ = describe_differences(model.processor.differences(processor), "model.processor", "training")
        if not differ:
            return
        adapters = len(model.list_adapters())
        if adapters > 1:
            warnings.warn(f"The processor this run trains adapter {model.active_adapter!r} with prepares inputs otherwise "
                          f"than model.processor, which the model's {adapters} adapters share "
                          f"({differ}): model.processor is kept for the others, so save this adapter with its processor "
                          "(processor.save_pretrained into its folder) and predict with processor= for it.",
                          UserWarning, stacklevel=3)
            return
        warnings.warn(f"This run trains with a processor that prepares inputs otherwise than model.processor ({differ}): "
                      "model.processor is set to the training processor, so the adapter is saved with, and predicts "
                      "through, the processor it is trained with.", UserWarning, stacklevel=3)
        model.processor = processor

    # ------------------------------------------------------------------ the towers' dtype
    def _set_tower_dtype(self) -> None:
        """Cast M²IST's frozen towers as ``args.tower_dtype`` asks (see :func:`resolve_tower_dtype`), through
        :meth:`SideTunedModel.set_backbone_dtype`, so ``model.config.backbone_dtype`` records it."""
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, SideTunedModel):
            return
        requested, device = self.args.tower_dtype, self.args.device
        dtypes = {model.vision_tower.dtype, model.text_tower.dtype}
        towers = next(iter(dtypes)) if len(dtypes) == 1 else None
        dtype = resolve_tower_dtype(requested, device, towers, supports_bf16(device))
        if dtype is None:
            logger.info("tower_dtype=%r: the frozen towers stay %s (training on %s).", requested, _dtype_name(towers),
                        device)
            return
        model.set_backbone_dtype(_dtype_name(dtype))
        logger.info("tower_dtype=%r: the frozen towers run in %s (were %s) on %s; the side network and head keep "
                    "%s; recorded as backbone_dtype=%r.", requested, _dtype_name(dtype), _dtype_name(towers), device,
                    _dtype_name(model.dtype), model.config.backbone_dtype)

    # ------------------------------------------------------------------ the tower cache
    @staticmethod
    def _caching_collators(model: nn.Module, args: RECTrainingArguments, train_collator: Callable | None,
                           eval_collator: Callable | None) -> tuple[Callable, Callable | None]:
        """The collators wrapped to add cache keys; an augmenting training collator gets fixed views."""
        if not isinstance(model, SideTunedModel):
            raise ValueError(f"tower_cache={args.tower_cache!r} needs frozen towers, but method {model_method(model)!r} "
                             "trains its towers: use tower_cache='off' for baselines.")
        if train_collator is None:
            raise ValueError("tower_cache needs the REC collator: pass data_collator=RECCollator(processor, train=True).")
        augments = _augmentation_of(train_collator) is not None
        if args.tower_cache_views and not augments:
            logger.warning("tower_cache_views=%d has no effect: the training collator has no augmentation, so each "
                           "image has one view (the cache is sized for one).", args.tower_cache_views)
        if augments and not args.tower_cache_views:
            raise ValueError("tower_cache cannot hold random augmentations: set tower_cache_views=K (a fixed number "
                             "of augmented views per image, e.g. 4), turn the augmentation off, or set tower_cache='off'.")
        train = CachedViewsCollator(train_collator, args.tower_cache_views) if augments else \
            TowerCacheCollator(train_collator)
        return train, (TowerCacheCollator(eval_collator) if eval_collator is not None else None)

    def _open_tower_cache(self) -> None:
        """Open the tower cache for the active adapter (again after ``set_adapter``: it caches what that adapter
        reads) and hand it to the collators."""
        args = self.args
        model = self.accelerator.unwrap_model(self.model)
        if args.tower_cache == "off" or (self.tower_cache is not None and self.tower_cache.adapter ==
                                         getattr(model, "active_adapter", self.tower_cache.adapter)):
            return
        location = None if args.tower_cache == "memory" else \
            Path(args.output_dir) / "tower_cache" if args.tower_cache == "disk" else Path(args.tower_cache)
        images = texts = 0
        sets = [self.train_dataset]
        eval_sets = self.eval_dataset
        sets += list(eval_sets.values()) if isinstance(eval_sets, Mapping) else [eval_sets] if eval_sets is not None else []
        for index, dataset in enumerate(sets):
            if dataset is not None:
                views = self.data_collator.views if index == 0 and isinstance(self.data_collator, CachedViewsCollator) \
                    else 1  # views only where an augmentation draws them
                more_images, more_texts = expected_records(dataset, views)
                images, texts = images + more_images, texts + more_texts
        self.tower_cache = TowerFeatureCache(model, location, args.tower_cache_dtype, expected_images=images,
                                             expected_texts=texts, rank=args.process_index,
                                             world_size=args.world_size)
        for collator in (self.data_collator, self.eval_data_collator):
            if isinstance(collator, TowerCacheCollator):  # batches it has seen whole are then built without images
                collator.cache = self.tower_cache
        if args.should_log:
            print(self.tower_cache.describe(), file=sys.stderr, flush=True)  # stdout is for results

    def _with_tower_features(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """Replace the cache keys of a batch by its tower features (read from the cache or computed once)."""
        if not any(name in inputs for name in KEY_FIELDS.values()):
            return inputs
        self._open_tower_cache()
        features = self.tower_cache.features(inputs)
        inputs = {key: value for key, value in inputs.items() if key not in KEY_FIELDS.values()}
        inputs["tower_features"] = features
        return inputs

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: torch.device) -> tuple:
        """``Trainer.get_batch_samples``; also remembers the number of samples of each batch of the accumulation
        window, which :meth:`compute_loss` weighs each batch's mean loss by."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        sizes = [_labelled_samples(batch) for batch in batch_samples]
        self._window_sizes = sizes if sizes and all(sizes) else None
        return batch_samples, num_items_in_batch

    def _accumulation_weight(self, inputs: Mapping[str, Any]) -> float:
        """The factor that turns a training batch's mean loss, which the Trainer divides by the number of batches
        accumulated, into its share of the mean over every sample of the accumulation window: ``batch size x
        batches / samples``. 1 when the window's batches are the same size (or nothing is accumulated); otherwise a
        smaller last batch (the end of an epoch) would weigh as much as a full one, and training with
        ``gradient_accumulation_steps`` would not be training with the larger batch."""
        sizes, size = self._window_sizes, _labelled_samples(inputs)
        if self.compute_loss_func is not None or not sizes or not size or len(set(sizes)) == 1:
            return 1.0  # a custom loss is scaled by its own num_items_in_batch
        return size * len(sizes) / sum(sizes)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        """``Trainer.compute_loss``, with the towers' features from the tower cache when one is on; in training,
        with each batch's mean loss weighed by its number of samples over the accumulation window (see
        :meth:`_accumulation_weight`), so that accumulated batches of different sizes train as one batch would."""
        weight = self._accumulation_weight(inputs) if model.training else 1.0
        inputs = self._with_tower_features(model, inputs)
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if weight == 1.0:
            return result
        return (result[0] * weight, result[1]) if return_outputs else result * weight

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """``Trainer.train``, refusing an empty training set; on a CPU with ``args.flush_denormal``, with denormal
        floats flushed to zero (the process-wide setting is switched off again afterwards). Gradients are on while
        it trains, even when called inside ``torch.no_grad()`` or ``torch.inference_mode()``.

        ``resume_from_checkpoint=True`` resumes from the latest *complete* checkpoint of ``args.output_dir`` (an
        incomplete one, e.g. from a run killed while writing it, is skipped with a warning naming it); a folder must
        be complete. The run settings recorded in the checkpoint must match this run's (see
        :func:`run_settings`) unless ``args.resume_allow_changes``.
        """
        self._refuse_changed_arguments()
        train_dataset = self.train_dataset
        if train_dataset is None:
            raise ValueError("RECTrainer.train needs a train_dataset.")
        _refuse_empty_sets(_named_sets(self.eval_dataset))  # before training, not at the first evaluation
        if _length(train_dataset) == 0:
            raise ValueError("The training set is empty: nothing to train on.")
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            resume_from_checkpoint = self._resolve_checkpoint(resume_from_checkpoint)
            self._check_run_settings(resume_from_checkpoint)
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        batch = self.args.per_device_train_batch_size * max(1, self.args.world_size)
        if self.args.dataloader_drop_last and (_length(train_dataset) or batch) < batch:
            raise ValueError(f"The training set has {_length(train_dataset)} samples, fewer than one batch ({batch}), "
                             "and dataloader_drop_last=True drops that batch: nothing to train on. Lower the batch "
                             "size or turn dataloader_drop_last off.")
        _refuse_float16_parameters(self.model)
        _check_adapter_configs(self.accelerator.unwrap_model(self.model))
        augmentation = self._training_augmentation()
        if augmentation is not None and not self._augmentation_started:
            self._restart_augmentation(augmentation)
        # gradients on, even inside torch.no_grad(), torch.inference_mode() or torch.set_grad_enabled(False) (a
        # notebook's inference cell): training needs them, and without them backward() fails with a riddle
        # and tensors made without a device on the CPU, as without torch.set_default_device: Accelerate draws the
        # shuffling generator on the default device (a "meta" one fails, a CUDA one shuffles otherwise)
        with denormals_flushed(self.args.flush_denormal and self.args.device.type == "cpu"), \
                torch.inference_mode(False), torch.enable_grad(), on_cpu():
            # the mode every training step sets (a SideTunedModel's frozen towers back in eval(), every part), set
            # before the tower cache's probe, which would otherwise warn about tower parts the user left in train()
            self.accelerator.unwrap_model(self.model).train()
            self._open_tower_cache()
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def _refuse_changed_arguments(self) -> None:
        """Refuse arguments of :data:`_APPLIED_WHEN_BUILT` changed on ``trainer.args`` since the trainer was built:
        they were applied then (the collators wrapped for the tower cache, the towers cast), so a later change was
        ignored (``tower_dtype``), or half applied (a cache opened but never read, or none opened for batches that
        need one: ``'NoneType' object has no attribute 'features'``)."""
        changed = [f"{name}: {was!r} -> {getattr(self.args, name)!r}" for name, was in self._applied_arguments.items()
                   if getattr(self.args, name) != was]
        if changed:
            raise ValueError(f"trainer.args changed since the RECTrainer was built ({'; '.join(changed)}), but these "
                             "are applied when it is built: build a new RECTrainer with the arguments you want (or "
                             "put the values back).")

    def _training_augmentation(self) -> Any:
        """The augmentation of the training collator (the RECCollator, inside a TowerCacheCollator when the cache is
        on); None when it has none."""
        return _augmentation_of(_rec_collator(self.data_collator))

    def _restart_augmentation(self, augmentation: Any) -> None:
        """Restart the augmentation's generator at this trainer's first ``train()``, as the Trainer seeds torch when
        it is built: from its own seed, or from the training seed when it has none (OS entropy: runs with one seed
        would differ) or took it from an earlier trainer. Otherwise a second run in the same process with the same
        processor would continue the first run's draws, and a run with another ``seed`` would keep the first one's."""
        if augmentation.seed is None or getattr(augmentation, _SEED_FROM_TRAINING, False):
            augmentation.reseed(self.args.seed)
            setattr(augmentation, _SEED_FROM_TRAINING, True)
        else:
            augmentation.reseed(augmentation.seed)
        self._augmentation_started = True

    # ------------------------------------------------------------------ resuming
    def _resolve_checkpoint(self, checkpoint: str | bool) -> str:
        if checkpoint is True:
            folder = Path(self.args.output_dir)
            found = sorted(((int(m.group(1)), path) for path in (folder.iterdir() if folder.is_dir() else [])
                            if path.is_dir() and (m := _CHECKPOINT_PATTERN.match(path.name))), reverse=True)
            skipped = []
            for _, path in found:
                problems = checkpoint_problems(path, needs_optimizer=not self.args.save_only_model,
                                               adapter=self._trained_adapter())
                if not problems:
                    for name, why in skipped:
                        logger.warning("Skipping the incomplete checkpoint %s (%s); resuming from %s.", name, why, path)
                    return str(path)
                skipped.append((str(path), problems))
            detail = "; ".join(f"{name}: {why}" for name, why in skipped)
            raise ValueError(f"No complete checkpoint to resume from in {folder}" + (f" ({detail})" if detail else
                             " (no checkpoint-* folders)") + ". Start without --resume, or pass a checkpoint folder.")
        path = Path(checkpoint)
        if not path.is_dir():
            raise ValueError(f"Checkpoint folder not found: {path}.")
        problems = checkpoint_problems(path, needs_optimizer=not self.args.save_only_model,
                                       adapter=self._trained_adapter())
        if problems:
            raise ValueError(f"Checkpoint {path} is incomplete ({problems}), e.g. the run was killed while writing it: "
                             "resume from an earlier checkpoint, or with resume=True to take the latest complete one.")
        return str(path)

    def _trained_adapter(self) -> str | None:
        return trained_adapter(self.accelerator.unwrap_model(self.model))

    def _check_run_settings(self, checkpoint: str) -> None:
        path = Path(checkpoint) / RUN_SETTINGS_NAME
        if not path.is_file():
            logger.warning("%s records no run settings (written by an older m2ist): cannot check that it belongs to "
                           "this run.", checkpoint)
            return
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is damaged ({err}): resume from another checkpoint.") from err
        current = json.loads(json.dumps(run_settings(self), default=str))
        differences = []
        for key in sorted(set(saved) | set(current)):
            was, now = saved.get(key), current.get(key)
            if was == now or key not in saved:  # a setting that an older m2ist did not record
                continue
            if isinstance(was, dict) and isinstance(now, dict):  # m2ist_config: name the fields (e.g. backbone_dtype)
                differences += [f"{key}.{name}: checkpoint {was.get(name)!r}, now {now.get(name)!r}"
                                for name in sorted(set(was) | set(now)) if was.get(name) != now.get(name)]
            else:
                differences.append(f"{key}: checkpoint {was!r}, now {now!r}")
        if not differences:
            return
        message = (f"{checkpoint} was written by another run ({'; '.join(differences)}). Resume with the same "
                   "settings, train into another output folder, or set resume_allow_changes=True "
                   "(--set training.resume_allow_changes=true) to resume anyway.")
        if not self.args.resume_allow_changes:
            raise ValueError(message)
        # the step schedule (a StepDropSchedule, 'constant') restores its warm-up; transformers' schedules do not
        restored_keys = _RESTORED_BY_OPTIMIZER + (("warmup_steps",) if saved.get("lr_scheduler_type") == "constant"
                                                  else ())
        restored = [key for key in restored_keys if key in saved and saved[key] != current.get(key)]
        if restored and any((Path(checkpoint) / name).is_file() for name in ("optimizer.pt", "scheduler.pt")):
            raise ValueError(f"{checkpoint} cannot resume with another {', '.join(restored)}, even with "
                             "resume_allow_changes: its optimizer and scheduler states (optimizer.pt, scheduler.pt) "
                             "restore the old values (or do not load into another optimizer), so the new ones would "
                             "be recorded but not used. Resume with the "
                             "old values, or start a new run from the checkpoint's weights "
                             "(SideTunedModel.from_pretrained(checkpoint, is_trainable=True)).")
        logger.warning("Resuming although %s", message.split(". Resume with")[0])

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """0: ``total_flos`` is not estimated. transformers' estimate (6 x text tokens x ``model.num_parameters``)
        charges the frozen towers a backward pass side-tuning never runs and counts no image token, so it would
        mislead more than it tells (and walk every tower parameter each step)."""
        return 0

    # ------------------------------------------------------------------ non-finite guard
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``Trainer.training_step``, then stop with :class:`NonFiniteTrainingError` (naming the step and the cause)
        if the loss or a gradient is NaN or infinite: nothing non-finite is ever applied or saved."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        step = self.state.global_step + 1
        if not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteTrainingError(f"Training diverged at step {step}: the loss is {float(loss)}."
                                         + self._non_finite_cause(model, inputs) + " Nothing was saved from this step.")
        # with fp16 mixed precision the grad scaler expects inf gradients now and then (it skips those steps)
        scaled = getattr(self.accelerator, "scaler", None) is not None
        grads = [] if scaled else [p.grad for group in self.optimizer.param_groups for p in group["params"]
                                   if p.grad is not None]
        # a 2-norm is not finite when an entry is not (7x cheaper on a CPU than the max-norm); it can also overflow
        # on finite entries, so the entries of the parameter to blame are checked before stopping
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
            name = next((n for n, p in model.named_parameters()
                         if p.grad is not None and not bool(torch.isfinite(p.grad).all())), None)
            if name is not None:
                raise NonFiniteTrainingError(f"Training diverged at step {step}: the gradient of {name} is not finite "
                                             f"(loss {float(loss):.4g}). Lower the learning rates or set max_grad_norm; "
                                             "nothing was saved from this step.")
        return loss

    def _non_finite_cause(self, model: nn.Module, inputs: dict[str, Any]) -> str:
        """Why a training batch gave a non-finite loss: non-finite inputs, else frozen towers whose features are
        not finite (re-run once on the batch, under the run's autocast), else the learning rates."""
        cause = _non_finite_inputs(inputs)
        if cause:
            return cause
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            cause = non_finite_cause(self.accelerator.unwrap_model(model), self._prepare_inputs(inputs))
        if cause:
            return " " + cause
        return " The inputs and the towers' features are finite: the learning rates are probably too high (or set " \
               "max_grad_norm)."

    # ------------------------------------------------------------------ accelerate / DDP
    def _build_accelerator_args(self, **kwargs: Any) -> dict[str, Any]:
        """DDP's ``find_unused_parameters`` defaults to False for M²IST (every side and head parameter is used; the
        frozen towers are not in DDP's buckets) and to True for baselines (e.g. DETR's unused decoder)."""
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.ddp_find_unused_parameters is None:
            for handler in accelerator_args.get("kwargs_handlers", []):
                if isinstance(handler, DistributedDataParallelKwargs):
                    handler.find_unused_parameters = not isinstance(self.model, SideTunedModel)
        return accelerator_args

    # ------------------------------------------------------------------ data
    @contextlib.contextmanager
    def _evaluation_loader(self, collator: Callable | None) -> Iterator[None]:
        """Build a loader with ``collator`` and without ``dataloader_drop_last``, a training setting: evaluation and
        prediction score every sample (dropping the last partial batch would report metrics of a subset)."""
        saved, drop_last = self.data_collator, self.args.dataloader_drop_last
        if collator is not None:
            self.data_collator = collator
        self.args.dataloader_drop_last = False
        try:
            yield
        finally:
            self.data_collator, self.args.dataloader_drop_last = saved, drop_last

    def get_train_dataloader(self):
        """The training ``DataLoader``; a training collator that draws at random (an augmentation, cached views)
        builds each batch from generators seeded by the batch's number in the run (see :class:`_NumberedBatches`),
        so that a resumed run draws what the uninterrupted one drew."""
        augmentation = self._training_augmentation()
        if augmentation is None:
            self._numbered_batches = None
            return super().get_train_dataloader()
        self._numbered_batches = _NumberedBatches(self.data_collator, augmentation, self.args.seed)
        saved, self.data_collator = self.data_collator, self._numbered_batches
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = saved

    def _position_training_batches(self) -> None:
        """On resume, number the next batch the training loader builds as the uninterrupted run numbered it: the
        Trainer skips the batches of the epochs trained and ``global_step % steps per epoch`` accumulation windows of
        the current epoch (none with ``ignore_data_skip``) without building them. DataLoader workers draw from
        generators the loader seeds at the start of each epoch, which a resume mid-epoch cannot put back: a warning
        says so."""
        numbered, step = self._numbered_batches, self.state.global_step
        if numbered is None:
            return
        accumulation = self.args.gradient_accumulation_steps
        per_epoch, batches = self._update_steps_per_epoch, self._batches_per_epoch
        if not per_epoch or batches is None:  # a loader without a length: the run is one long epoch
            in_epoch = numbered.next_batch = step * accumulation
        else:
            in_epoch = 0 if self.args.ignore_data_skip else (step % per_epoch) * accumulation
            numbered.next_batch = (step // per_epoch) * batches + in_epoch
        workers = self.args.dataloader_num_workers
        if in_epoch and workers > 0:
            logger.warning("Resuming mid-epoch (step %d) with dataloader_num_workers=%d: the training augmentation%s "
                           "after the resume differ from the uninterrupted run's (the workers draw from generators "
                           "the DataLoader seeds at each epoch's start), so the weights will too. Resume with "
                           "dataloader_num_workers=0, or from a checkpoint at an epoch's end, for the uninterrupted "
                           "run's weights.", step, workers,
                           " and the cached views picked" if isinstance(numbered.collator, CachedViewsCollator)
                           else "'s draws")

    def get_eval_dataloader(self, eval_dataset: str | Dataset | None = None):
        """The evaluation ``DataLoader``, built with ``eval_data_collator`` (no augmentation), never dropping a batch."""
        with self._evaluation_loader(self.eval_data_collator):
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Dataset):
        """The prediction ``DataLoader``, built with ``eval_data_collator``, never dropping a batch."""
        with self._evaluation_loader(self.eval_data_collator):
            return super().get_test_dataloader(test_dataset)

    # ------------------------------------------------------------------ optimizer and schedule
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The parameters that get weight decay: the weight matrices of layers (linear, convolution, attention
        projections). Biases, norms, embedding tables (position, [REG] token) and the tokens and tables a tower holds
        as bare parameters (ViT's ``cls_token`` and ``position_embeddings``, Swin's relative position table,
        DINOv2's layer scale) get none, so a tower trained by full fine-tuning is decayed as timm and BERT's
        recipes decay it."""
        return decayed_parameter_names(model)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (``args.optim``) with four groups: head / side (and trained tower) parameters, each with and without
        weight decay; the head at ``learning_rate``, the rest at ``side_learning_rate``.

        The optimizer is kept across ``train()`` calls while it holds the model's trainable parameters; after
        ``model.set_adapter(other)`` it is built again (and so is the schedule) for the adapter now active. An
        optimizer passed in ``optimizers=`` that holds frozen parameters is refused."""
        opt_model = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.optimizer is not None and self._optimizer_is_current(opt_model):
            return self.optimizer
        decay = set(self.get_decay_parameter_names(opt_model))
        args = self.args
        rates = {"head": args.learning_rate, "side": args.side_learning_rate}
        grouped: dict[tuple[str, bool], list[nn.Parameter]] = {(r, d): [] for r in ("head", "side") for d in (True, False)}
        for name, param in opt_model.named_parameters():
            if param.requires_grad:
                grouped[("head" if name.startswith("head.") else "side", name in decay)].append(param)
        groups = [{"params": params, "lr": rates[role], "weight_decay": args.weight_decay if decays else 0.0,
                   "name": role if decays else f"{role}_no_decay"}
                  for (role, decays), params in grouped.items() if params]
        if not groups:
            raise ValueError("The model has no trainable parameters: nothing to optimise. SideTunedModel.from_pretrained() "
                             "loads an adapter for inference; pass is_trainable=True to continue training it.")
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, opt_model)
        _refuse_own_parameter_groups(args, optimizer_cls, optimizer_kwargs)
        self.optimizer = self._built_optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _optimizer_is_current(self, model: nn.Module) -> bool:
        """Whether ``self.optimizer`` holds exactly the trainable parameters of ``model`` (False: build another);
        raise if an optimizer passed in ``optimizers=`` holds none of them (e.g. the adapter active before
        ``set_adapter``)."""
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        if getattr(self.optimizer, "optimizer", self.optimizer) is not self._built_optimizer:
            if trainable and not held & trainable:
                raise ValueError("The optimizer passed to RECTrainer(optimizers=...) holds none of the parameters that "
                                 "train now (only parameters that do not require grad, e.g. the adapter active before "
                                 "set_adapter()): it would train nothing. Pass an optimizer over the active adapter's "
                                 "parameters, or let RECTrainer build one (optimizers=(None, None)).")
            return True
        if held == trainable:
            return True
        logger.info("The trainable parameters changed since the optimizer was built (set_adapter?): building a new "
                    "optimizer and schedule for the active adapter.")
        return False

    def set_initial_training_values(self, args: TrainingArguments, dataloader) -> tuple:
        """As ``Trainer``'s; also remembers the optimizer steps per epoch (for ``lr_drop_epochs``)."""
        values = super().set_initial_training_values(args, dataloader)
        self._update_steps_per_epoch = values[1] if dataloader is not None and _has_length(dataloader) else None
        self._batches_per_epoch = len(dataloader) if self._update_steps_per_epoch is not None else None
        return values

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """``lr_scheduler_type='constant'``: a :class:`StepDropSchedule` (drops at ``lr_drop_epochs`` times the
        optimizer steps per epoch, plus ``warmup_steps``); any other type: the transformers schedule."""
        if self.lr_scheduler is not None:
            return self.lr_scheduler
        args = self.args
        warmup = args.get_warmup_steps(num_training_steps)
        if warmup >= num_training_steps:  # asked for, but rarely meant: say it
            logger.warning("The warm-up (%d steps) is as long as the run (%d steps): the learning rate never reaches "
                           "learning_rate=%g.", warmup, num_training_steps, args.learning_rate)
        if args.lr_scheduler_type != SchedulerType.CONSTANT:
            return super().create_scheduler(num_training_steps, optimizer)
        drop_steps: list[int] = []
        if args.lr_drop_epochs:
            if self._update_steps_per_epoch is None:
                raise ValueError("lr_drop_epochs needs the number of steps per epoch: train on a dataset with a length "
                                 "(or leave lr_drop_epochs empty).")
            drop_steps = [epoch * self._update_steps_per_epoch for epoch in args.lr_drop_epochs]
            late = [epoch for epoch, step in zip(args.lr_drop_epochs, drop_steps, strict=True) if step >= num_training_steps]
            if late:
                logger.warning("lr_drop_epochs %s fall after the run's last step (%d steps, %d per epoch): those drops "
                               "never happen.", late, num_training_steps, self._update_steps_per_epoch)
        schedule = StepDropSchedule(drop_steps, args.lr_drop_factor, args.get_warmup_steps(num_training_steps))
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ evaluation
    def _determine_best_metric(self, metrics: dict[str, float], trial: Any) -> bool:
        """``Trainer._determine_best_metric``, for a ``compute_metrics`` of the user's that does not report
        ``metric_for_best_model`` (``acc@0.5`` by default in :class:`RECTrainingArguments`, where transformers has
        none): the Trainer raised a ``KeyError`` at the first evaluation, mid-run, even when nothing used the best
        metric. Now the best metric is not tracked then (a warning says so, once); when something uses it
        (``load_best_model_at_end``, ``save_strategy='best'``, ``EarlyStoppingCallback``) the error names the metrics
        reported and the setting to change."""
        metric = self.args.metric_for_best_model
        key = None if metric is None else metric if metric.startswith("eval_") else f"eval_{metric}"
        if key is None or key in metrics:
            return super()._determine_best_metric(metrics=metrics, trial=trial)
        reported = sorted(name.removeprefix("eval_") for name in metrics
                          if not name.endswith(("_runtime", "_per_second", "_preparation_time")) and name != "epoch")
        users = _best_metric_users(self.args, self.callback_handler.callbacks)
        if users:
            raise ValueError(f"metric_for_best_model={metric!r} is not among the metrics this evaluation reports "
                             f"({reported}), and {' and '.join(users)} need it: set metric_for_best_model to one of "
                             "them (RECTrainingArguments defaults it to 'acc@0.5', which only the default "
                             "compute_metrics, RECMetrics, reports).")
        if not getattr(self, "_warned_best_metric", False):
            self._warned_best_metric = True
            logger.warning("metric_for_best_model=%r is not among the metrics the evaluation reports (%s): the best "
                           "checkpoint is not tracked. Set metric_for_best_model to one of them, or to None.", metric,
                           ", ".join(reported))
        return False

    def evaluate(self, eval_dataset: Dataset | dict[str, Dataset] | None = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate``; remembers the SHA-256 of the weights measured, which ``eval_results.json`` records so
        that a model card reports results only beside the weights they measured."""
        self._refuse_changed_arguments()
        data = self.eval_dataset if eval_dataset is None else eval_dataset
        data = self.eval_dataset[data] if isinstance(data, str) and isinstance(self.eval_dataset, Mapping) else data
        if not isinstance(data, str):  # a dict is checked set by set, as Trainer.evaluate calls this for each
            _refuse_empty_sets({} if isinstance(data, Mapping) else
                               {metric_key_prefix.removeprefix("eval").removeprefix("_") or "eval": data})
        # evaluating during training must not change the dropout masks that follow; tensors made without a device
        # go to the CPU, as in training
        with random_states_kept(), on_cpu():
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        model = self.accelerator.unwrap_model(self.model)
        self._evaluated_weights[self.state.global_step] = tensors_sha256(trainable_tensors(model))
        return metrics

    def evaluation_loop(self, dataloader, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"):
        """``Trainer.evaluation_loop``; on several processes the reported loss is the mean over exactly the set's
        samples. (The Trainer averages each rank's per-batch mean loss, and the distributed sampler pads the last
        batches with repeated samples: a set whose size is not a multiple of processes x batch size would count
        those repeats.) The per-sample losses are gathered without the repeats, as the predictions are."""
        self._metrics_follow_the_adapter()
        self._sample_losses = [] if self.args.world_size > 1 else None
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            if self._sample_losses:
                losses = torch.cat(self._sample_losses).double()
                losses = losses[torch.isfinite(losses)]  # as the Trainer's mean of the batch losses
                if losses.numel() and f"{metric_key_prefix}_loss" in output.metrics:
                    output.metrics[f"{metric_key_prefix}_loss"] = float(losses.mean())
        finally:
            self._sample_losses = None
        return output

    def _metrics_follow_the_adapter(self) -> None:
        """Point a :class:`RECMetrics` built on one of the model's adapter configs (the default ``compute_metrics``
        is built on the active one's), or on none, at the adapter active now: after ``set_adapter``, ``loss_box`` and
        ``loss_giou`` were computed with the previous adapter's loss settings (``box_loss``, ``smooth_l1_beta``),
        while ``eval_loss`` used the new one's. A ``RECMetrics`` on a config of its own is left as given."""
        metrics, model = self.compute_metrics, self.accelerator.unwrap_model(self.model)
        setups = getattr(model, "adapter_setups", None)
        if not isinstance(metrics, RECMetrics) or not isinstance(setups, Mapping):
            return
        if metrics.config is None or any(metrics.config is setup.config for setup in setups.values()):
            metrics.config = model.config

    def _gathered_sample_losses(self, model: nn.Module, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """Each sample's loss (the model's loss of a batch of one), gathered from every process without the
        samples the distributed sampler repeated."""
        config = self.accelerator.unwrap_model(model).config
        boxes, patch_logits = outputs["pred_boxes"].detach(), outputs.get("patch_logits")
        per_sample = torch.stack([rec_loss(boxes[i:i + 1], labels[i:i + 1].to(boxes.device), config,
                                           None if patch_logits is None else patch_logits[i:i + 1].detach())["loss"]
                                  for i in range(boxes.shape[0])]).float()
        return self.accelerator.gather_for_metrics(per_sample).cpu()

    def predict(self, test_dataset: Dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"):
        """``Trainer.predict``, refusing an empty dataset (which would return no predictions and no metrics)."""
        self._refuse_changed_arguments()
        _refuse_empty_sets({metric_key_prefix: test_dataset})
        with on_cpu():  # tensors made without a device go to the CPU, as in training
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)

    def _measured_weights(self, step: int) -> str | None:
        """The SHA-256 of the weights evaluated at ``step``: remembered by :meth:`evaluate`, or (for a run resumed
        since) recorded in that step's checkpoint, which holds the weights evaluated then; None if unknown."""
        if step in self._evaluated_weights:
            return self._evaluated_weights[step]
        checkpoint = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        return recorded_sha256(adapter_folder(checkpoint, self._trained_adapter()) / WEIGHTS_NAME)

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple:
        """Return ``(loss, (pred_boxes, image_regions), labels)``; ``image_regions`` (B, 4) is the real image's
        normalised ``xyxy`` on the canvas (from ``pixel_mask``), used to clamp predictions for IoU."""
        inputs = self._with_tower_features(model, self._prepare_inputs(inputs))
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        loss = _evaluation_loss(self.compute_loss_func, outputs, labels)
        if self._sample_losses is not None and labels is not None and self.compute_loss_func is None:
            self._sample_losses.append(self._gathered_sample_losses(model, outputs, labels))
        if prediction_loss_only:
            return loss, None, None
        pred_boxes = outputs["pred_boxes"].detach().float()
        regions = image_regions(inputs.get("pixel_mask"), pred_boxes.shape[0], pred_boxes.device)
        return loss, (pred_boxes, regions), (labels.detach() if labels is not None else None)

    # ------------------------------------------------------------------ saving and loading
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write only the trained tensors (M²IST: side + head) and the config, the processor and the arguments; with
        the evaluation results measured so far in ``eval_results.json``, which the model card reports."""
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        logger.info("Saving the trained tensors to %s", output_dir)
        model = self.accelerator.unwrap_model(self.model)
        try:
            check_finite(trainable_tensors(model), "The trained weights")
        except ValueError as err:
            raise NonFiniteTrainingError(f"Training diverged by step {self.state.global_step}: {err} Nothing was "
                                         f"saved to {output_dir}.") from None

        results = self.measured_results(best=self.args.load_best_model_at_end
                                        and not Path(output_dir).name.startswith("checkpoint-"))

        def write(folder: Path) -> None:
            _write_trainable_tensors(model, folder)
            if results is not None:  # else an earlier run's results go: they measured other weights
                write_results(results, folder / EVAL_RESULTS_NAME)
            if self.processing_class is not None and hasattr(self.processing_class, "save_pretrained"):
                self.processing_class.save_pretrained(folder)
            torch.save(_without_secrets(self.args), folder / TRAINING_ARGS_NAME)
            (folder / RUN_SETTINGS_NAME).write_text(json.dumps(run_settings(self), indent=2, sort_keys=True,
                                                               default=str) + "\n", encoding="utf-8")

        save_folder_atomically(output_dir, write, owned=OWNED_FILES | {EVAL_RESULTS_NAME})

    def measured_results(self, best: bool = False) -> dict[str, Any] | None:
        """The evaluation results of the training run in :func:`m2ist.evaluation.evaluate`'s format
        (``{"metrics": {split: {"acc@0.5", "miou"}}, "metadata": {...}}``): those of the last evaluation, or with
        ``best`` those of the best checkpoint's step; None before any evaluation. ``metadata["weights_sha256"]`` is
        the SHA-256 of the weights measured (what their weights file records), when known."""
        check_flags("measured_results", best=best)
        steps: dict[int, dict[str, dict[str, float]]] = {}
        for entry in self.state.log_history:
            for key, value in entry.items():
                for metric in ("acc@0.5", "miou"):
                    if key.startswith("eval_") and key.endswith(metric) and isinstance(value, int | float):
                        split = key[len("eval_"):-len(metric)].rstrip("_") or "eval"
                        steps.setdefault(int(entry.get("step", 0)), {}).setdefault(split, {})[metric] = float(value)
        if not steps:
            return None
        step = max(steps)
        checkpoint = self.state.best_model_checkpoint
        if best and checkpoint and Path(checkpoint).name.removeprefix("checkpoint-").isdigit():
            step = int(Path(checkpoint).name.removeprefix("checkpoint-"))
            if step not in steps:
                return None
        metadata: dict[str, Any] = {"source": "RECTrainer", "step": step, "best": bool(best and checkpoint)}
        measured = self._measured_weights(step)
        if measured is not None:
            metadata[WEIGHTS_SHA256_KEY] = measured
        return {"metrics": steps[step], "metadata": metadata}

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None, *, repo_id: str | None = None) -> None:
        """Write (or update) the m2ist model card in ``args.output_dir``: ``library_name: m2ist``, both towers as
        ``base_model``, ``dataset_tags`` (Hub dataset ids) as ``datasets``, and the measured results as
        ``model-index``. ``finetuned_from`` / ``tasks`` / ``dataset_args`` are accepted for transformers' signature;
        the towers and the task come from the model."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        results = self.measured_results(best=self.args.load_best_model_at_end) or read_eval_results(self.args.output_dir)
        hub_datasets = [d for d in [*_as_list(dataset_tags), *_as_list(dataset)] if "/" in d]
        config, counts, subfolder = model.config, model.parameter_counts(), None
        if isinstance(model, SideTunedModel):  # the card documents the folder's root adapter, as save_pretrained's
            config, counts, subfolder = model.card_subject(Path(self.args.output_dir), model.list_adapters()) \
                or (config, counts, None)
        write_model_card(self.args.output_dir, config, counts,
                         repo_id=repo_id or getattr(self, "hub_model_id", None), results=results,
                         datasets=hub_datasets, tags=_as_list(tags), model_name=model_name, license=license,
                         language=language, subfolder=subfolder)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """``Trainer``'s (create ``args.hub_model_id`` if needed), then, before any training, the checks a push
        makes before its commit (:func:`~m2ist.hub.push_folder_to_hub`): the saves' background pushes would
        otherwise publish the adapter into a public repo asked to be private, or replace another model's
        tokenizer, processor and card, one save after another."""
        from huggingface_hub.errors import RevisionNotFoundError

        from .hub import check_token, refuse_foreign_model, refuse_public_repo

        check_flags("init_hf_repo", private=private)
        check_token(token if token is not None else self.args.hub_token)  # "None" read from a config file
        super().init_hf_repo(token=token, private=private)
        if not self.is_world_process_zero():
            return
        api = HfApi(token=token if token is not None else self.args.hub_token)
        done = "training was not started"
        refuse_public_repo(api, self.hub_model_id, private if private is not None else self.args.hub_private_repo,
                           done)
        try:
            files = api.list_repo_files(self.hub_model_id, revision=self.args.hub_revision, repo_type="model")
        except RevisionNotFoundError:  # a branch the pushes create from main
            files = api.list_repo_files(self.hub_model_id, repo_type="model")
        refuse_foreign_model(self.hub_model_id, files, done=done)

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, *,
                    endpoint: str | None = None, **kwargs: Any):
        """Save the model, write the m2ist card and upload the adapter's files (never optimizer state, training
        arguments or checkpoints) to ``args.hub_model_id`` (default: the output folder's name) in one commit.

        ``kwargs`` go to :meth:`create_model_card`; ``endpoint`` names another Hub (a mirror or a test server). The
        upload is synchronous (``blocking=False`` is accepted and ignored). Returns the commit URL.
        """
        from .hub import push_folder_to_hub

        check_flags("push_to_hub", private=private, blocking=blocking)  # private="False" would make a private repo
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        token = token if token is not None else self.args.hub_token
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        private = private if private is not None else self.args.hub_private_repo
        name = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.hub_model_id = HfApi(endpoint=endpoint, token=token).create_repo(name, private=private,
                                                                                exist_ok=True).repo_id
        self.create_model_card(model_name=model_name or self.hub_model_id.split("/")[-1], repo_id=self.hub_model_id,
                               **kwargs)
        self._finish_current_push()
        output_dir = Path(self.args.output_dir)
        snapshot = _push_snapshot_folder(output_dir)
        try:  # the model's adapters only: an adapter subfolder an earlier run left there is not this model's
            _link_or_copy(output_dir, _pushed_files(output_dir, self.accelerator.unwrap_model(self.model)), snapshot)
            return push_folder_to_hub(snapshot, self.hub_model_id, commit_message=commit_message or "End of training",
                                      token=token, revision=revision or self.args.hub_revision, private=private,
                                      endpoint=endpoint)
        finally:
            shutil.rmtree(snapshot, ignore_errors=True)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """With ``args.push_to_hub``: after each save, push the adapter's files and the m2ist card from the output
        folder (never ``training_args.bin``, optimizer state or ``trainer_state.json``). With ``hub_strategy``
        ``"checkpoint"`` / ``"all_checkpoints"`` the checkpoint folder itself is pushed too, as those ask.

        The uploads run in the background, one after the other (one commit per save, in the order of the saves),
        each from a snapshot of what this save wrote (hard links, else copies, in a folder beside the output
        folder), so a later save into the output folder or a checkpoint removed by ``save_total_limit`` cannot
        change what an upload still reads. A snapshot is removed once its uploads are done.

        Each upload is a :func:`~m2ist.hub.push_folder_to_hub` of the snapshot, as the final push is: it deletes the
        adapter files of adapters the model no longer has (an earlier push's, an output folder's leftovers are not
        snapshotted), points the card's usage snippet at ``hub_revision``, and refuses a card whose results do not
        describe the weights. A failed upload is logged as a warning (training goes on)."""
        from transformers.trainer_utils import HubStrategy
        from transformers.utils import PushInProgress

        from .hub import push_folder_to_hub

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        self._remove_push_snapshots()
        output_dir = Path(self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        subfolders = [""] + ([n for n in model.list_adapters() if n != DEFAULT_ADAPTER]
                             if isinstance(model, SideTunedModel) else [])
        for subfolder in subfolders:  # the checkpoint's adapters, not a copy of the whole model
            for name in ADAPTER_FILES:
                source = Path(checkpoint_folder, subfolder, name)
                if source.is_file():  # replaced, never rewritten in place: a snapshot's link keeps the old file
                    atomic_write(output_dir / subfolder / name, functools.partial(shutil.copyfile, source))
        if self.processing_class is not None:
            _save_by_replacement(self.processing_class.save_pretrained, output_dir)
        self.create_model_card(repo_id=self.hub_model_id)
        if self.args.save_strategy == SaveStrategy.STEPS:
            commit_message = f"Training in progress, step {self.state.global_step}"
        else:
            commit_message = f"Training in progress, epoch {int(self.state.epoch)}"
        snapshot = _push_snapshot_folder(output_dir)
        checkpoint = Path(checkpoint_folder)
        pushes_checkpoint = self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS)
        try:
            _link_or_copy(output_dir, _pushed_files(output_dir, model), snapshot / "output")
            if pushes_checkpoint:
                _link_or_copy(checkpoint, [path.relative_to(checkpoint).as_posix() for path in checkpoint.rglob("*")
                                           if path.is_file()], snapshot / "checkpoint")
        except BaseException:
            shutil.rmtree(snapshot, ignore_errors=True)
            raise
        api = self._push_api
        jobs = [api.run_as_future(push_folder_to_hub, snapshot / "output", self.hub_model_id,
                                  commit_message=commit_message, token=self.args.hub_token,
                                  revision=self.args.hub_revision, endpoint=api.endpoint)]
        if pushes_checkpoint:
            path_in_repo = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else checkpoint.name
            jobs.append(api.upload_folder(repo_id=self.hub_model_id, folder_path=snapshot / "checkpoint",
                                          path_in_repo=path_in_repo, commit_message=commit_message + ", checkpoint",
                                          token=self.args.hub_token, run_as_future=True,
                                          revision=self.args.hub_revision))
        self._push_snapshots.append((snapshot, jobs))

        def remove_when_done(done: Any) -> None:  # the last upload of this save to finish removes its snapshot
            error = None if done.cancelled() else done.exception()
            if error is not None:  # a future's error is never raised: say it, or the repo silently lags behind
                logger.warning("The push of %s to the Hub repo '%s' failed, so the repo does not hold this save "
                               "(training goes on; the next save or trainer.push_to_hub() pushes again): %s: %s",
                               commit_message.lower(), self.hub_model_id, type(error).__name__, error)
            if all(job.done() for job in jobs):
                shutil.rmtree(snapshot, ignore_errors=True)

        for job in jobs:
            job.add_done_callback(remove_when_done)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    @functools.cached_property
    def _push_api(self) -> HfApi:
        """The ``HfApi`` of this trainer's background pushes: one for all of them, so its single worker thread
        uploads them one after the other (with one each, a later save's commit could land before an earlier one's
        and leave the repo at the older weights)."""
        return HfApi(library_name="m2ist", library_version=__version__)

    @functools.cached_property
    def _push_snapshots(self) -> list[tuple[Path, list[Any]]]:
        """The snapshot folders of the background pushes, with their upload futures."""
        return []

    def _remove_push_snapshots(self) -> None:
        """Remove the snapshot folders whose uploads are done (one still uploading is kept)."""
        for snapshot, jobs in list(self._push_snapshots):
            if all(job.done() for job in jobs):
                shutil.rmtree(snapshot, ignore_errors=True)
                self._push_snapshots.remove((snapshot, jobs))

    def _finish_current_push(self) -> None:
        """Wait for the background pushes to finish, then remove their snapshot folders."""
        super()._finish_current_push()
        self._remove_push_snapshots()

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """``Trainer``'s, for a checkpoint without optimizer and scheduler states (``save_only_model=True``) too: the
        schedule continues at the checkpoint's step, instead of starting again (a warm-up repeated, the
        ``lr_drop_epochs`` drops shifted by the steps already trained), and a warning says the optimizer's moments
        start afresh."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:  # the Trainer loads these once it has read the checkpoint's step
            self._position_training_batches()
        if checkpoint is None or self.state.global_step <= 0:
            return
        missing = [name for name in ("optimizer.pt", "scheduler.pt") if not (Path(checkpoint) / name).is_file()]
        if not missing:
            return
        if "scheduler.pt" in missing and self.lr_scheduler is not None:
            _advance_schedule(self.lr_scheduler, self.state.global_step)
        logger.warning("%s holds no %s (saved with save_only_model=True): the learning-rate schedule continues at "
                       "step %d, but %s, so the resumed run does not train exactly as an uninterrupted one.",
                       checkpoint, " or ".join(missing), self.state.global_step,
                       "the optimizer's moments start afresh" if "optimizer.pt" in missing else "the schedule is "
                       "rebuilt")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the trained tensors of a checkpoint strictly (optimizer, scheduler and RNG follow in ``Trainer``)."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        logger.info("Loading the trained tensors from %s", resume_from_checkpoint)
        load_trainable_tensors(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """Load the trained tensors of ``state.best_model_checkpoint`` strictly."""
        logger.info("Loading the best checkpoint %s (%s=%s).", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        load_trainable_tensors(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


def _without_secrets(args: TrainingArguments) -> TrainingArguments:
    """A copy of ``args`` without the Hub token: ``training_args.bin`` is pickled as it is, kept in every checkpoint
    and uploaded with it (``hub_strategy="checkpoint"``), so the token would be readable by anyone who can read the
    folder or the repo."""
    if getattr(args, "hub_token", None) is None:
        return args
    kept = copy.copy(args)
    kept.hub_token = None
    return kept


def _push_snapshot_folder(output_dir: Path) -> Path:
    """A fresh folder for one push's snapshot: beside the output folder (same file system, so files are linked, not
    copied), else in the temporary folder. Snapshots that a killed run left beside it are removed first."""
    folder = Path(os.path.realpath(output_dir))
    for leftover in leftovers(folder, PUSH):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        return make_staging(folder, PUSH)
    except OSError:
        return Path(tempfile.mkdtemp(prefix=f"{folder.name}.", suffix=".m2ist-push"))


def _pushed_files(folder: Path, model: nn.Module) -> list[str]:
    """The files of the output ``folder`` a push of ``model`` uploads: the adapter files at its root (an adapter's,
    the processor's, the card) and in the subfolders of ``model``'s other adapters. A subfolder of an adapter the
    model does not have (an earlier run's, or one deleted since) is left out, so the push deletes it from the repo
    rather than publishing it again."""
    from huggingface_hub.utils import filter_repo_objects

    from .hub import ADAPTER_PATTERNS, IGNORED_PATTERNS

    adapters = set(model.list_adapters()) - {DEFAULT_ADAPTER} if isinstance(model, SideTunedModel) else set()
    present = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return [name for name in filter_repo_objects(present, allow_patterns=ADAPTER_PATTERNS,
                                                 ignore_patterns=IGNORED_PATTERNS)
            if "/" not in name or name.split("/")[0] in adapters]


def _link_or_copy(folder: Path, names: Iterable[str], snapshot: Path) -> None:
    """Hard-link (copy where a link fails) the files ``names`` of ``folder`` into ``snapshot``, keeping their layout;
    ``snapshot`` is created even when ``names`` is empty."""
    from .hub import link_or_copy

    snapshot.mkdir(parents=True, exist_ok=True)
    for name in names:
        link_or_copy(folder / name, snapshot / name)


def _save_by_replacement(save_pretrained: Callable[[str], object], folder: Path) -> None:
    """``save_pretrained(folder)``, with each file written put in place by a rename, never rewritten in place: a
    snapshot linked to the folder's earlier file keeps that file's bytes."""
    with tempfile.TemporaryDirectory(prefix="m2ist-push-") as staging:
        save_pretrained(staging)
        for path in sorted(Path(staging).rglob("*")):
            if path.is_file():
                atomic_write(folder / path.relative_to(staging), functools.partial(shutil.copyfile, path))


def _draw_seed(*parts: Any) -> int:
    """A 64-bit seed derived from ``parts`` (the same in every process and Python session)."""
    return int.from_bytes(hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class _NumberedBatches:
    """The training collator, with the random draws of each batch (the augmentation's; with cached views, the view
    picked for each item) taken from generators seeded by the run's seeds and the batch's number in the run, rather
    than from generators that run on from one batch to the next.

    A running generator cannot be resumed: the DataLoader builds a batch ahead of the step that trains on it (so a
    checkpoint's generator states are a batch or more ahead), a resumed run skips the batches already trained without
    building them, and the Trainer restores torch's random state only after it has built the first batch of a resumed
    epoch. Numbered draws make a resumed run draw for its batch N what the uninterrupted run drew
    (:meth:`RECTrainer._position_training_batches` numbers it), and keep torch's generator, which dropout draws from,
    out of the collator's way. In DataLoader workers the collator draws as before (from the workers' generators)."""

    def __init__(self, collator: Callable, augmentation: Any, seed: int) -> None:
        self.collator, self.augmentation, self.seed = collator, augmentation, seed
        #: the number in the run of the batch built next (0-based, counting every epoch's batches)
        self.next_batch = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.collator!r})"

    def __call__(self, items: Sequence[Any]) -> Any:
        if torch.utils.data.get_worker_info() is not None:
            return self.collator(items)
        number, self.next_batch = self.next_batch, self.next_batch + 1
        views = self.collator if isinstance(self.collator, CachedViewsCollator) else None
        if views is not None:
            views.generator = torch.Generator().manual_seed(_draw_seed("views", self.seed, number))
        try:
            with self.augmentation.seeded(_draw_seed("augmentation", self.augmentation.seed, number)):
                return self.collator(items)
        finally:
            if views is not None:
                views.generator = None


def _advance_schedule(scheduler: Any, steps: int) -> None:
    """Move a freshly built learning-rate ``scheduler`` to optimizer step ``steps``, as if it had stepped so far."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):  # follows metrics, not steps
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()": no step is skipped here
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # transformers' schedules, StepDropSchedule
            scheduler.last_epoch = steps - 1
            scheduler.step()
            return
        for _ in range(steps):
            scheduler.step()


def _rec_collator(collator: Any) -> Any:
    """The collator that prepares the batches: the one a tower cache's collator wraps (its ``collator``), else
    ``collator`` itself."""
    return getattr(collator, "collator", collator)


def _collator_processor(collator: Any) -> Any:
    """The processor the batches of ``collator`` are prepared with (a ``RECCollator``'s, wrapped or not), or None."""
    return getattr(_rec_collator(collator), "processor", None)


def _augmentation_of(collator: Any) -> Any:
    """The augmentation (``RECAugmentation``) a training ``RECCollator`` applies; None for any other collator."""
    return getattr(getattr(collator, "processor", None), "augment", None) if getattr(collator, "train", False) else None


def _labelled_samples(batch: Any) -> int:
    """The number of samples of a batch that carry a box (``labels`` rows); 0 when it has none."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    return int(labels.shape[0]) if isinstance(labels, torch.Tensor) and labels.ndim > 0 else 0


def _as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _length(data: Any) -> int | None:
    try:
        return len(data)
    except (TypeError, NotImplementedError):
        return None


def _named_sets(eval_dataset: Any, name: str = "eval") -> dict[str, Any]:
    """``eval_dataset`` (one dataset, a dict of them, or None) as ``{name: dataset}``."""
    if eval_dataset is None:
        return {}
    return dict(eval_dataset) if isinstance(eval_dataset, Mapping) else {name: eval_dataset}


def _refuse_empty_sets(sets: Mapping[str, Any]) -> None:
    """Refuse an evaluation set that is None or empty: the Trainer would score it without a word and report no
    metric for it (and, for the set that ``metric_for_best_model`` names, fail only at the first evaluation)."""
    for name, data in sets.items():
        if data is None or _length(data) == 0:
            raise ValueError(f"The evaluation set {name!r} is {'None' if data is None else 'empty'} (filtered to "
                             "nothing?): it would give no results. Remove it from the evaluation sets, or fix its "
                             "data or filter.")


def _best_metric_users(args: TrainingArguments, callbacks: Iterable[Any] | None) -> list[str]:
    """What in ``args`` and ``callbacks`` (instances or classes) uses ``metric_for_best_model``: the settings that
    pick or keep checkpoints by it, and an ``EarlyStoppingCallback``."""
    early = any(isinstance(c, EarlyStoppingCallback) or (isinstance(c, type) and issubclass(c, EarlyStoppingCallback))
                for c in callbacks or ())
    return [what for what, used in (("load_best_model_at_end", args.load_best_model_at_end),
                                    ("save_strategy='best'", args.save_strategy == SaveStrategy.BEST),
                                    ("EarlyStoppingCallback", early)) if used]


def _resolve_best_metric(args: RECTrainingArguments, eval_dataset: Any, compute_metrics: Any,
                         callbacks: Iterable[Any] | None = None) -> str:
    """``args.metric_for_best_model`` as the Trainer will look it up: a bare metric (``acc@0.5``) with several
    evaluation sets refers to the first one (``val_acc@0.5``), with a warning naming the keys to choose from when
    something picks checkpoints by it (transformers would stop at the first evaluation with a ``KeyError``). With
    :class:`RECMetrics` (whose names are known) and an evaluation during training, a metric the evaluation does not
    report is refused now rather than with a ``KeyError`` at the first evaluation (after training); a custom
    ``compute_metrics`` is taken at its word."""
    metric = args.metric_for_best_model
    bare = metric.removeprefix("eval_")
    sets = list(eval_dataset) if isinstance(eval_dataset, Mapping) else []
    reported = ("loss",) if args.prediction_loss_only else \
        ("loss", *REC_METRICS) if isinstance(compute_metrics, RECMetrics) else None
    named = [name for name in sets if bare.startswith(f"{name}_")]
    if reported is not None and any(bare[len(name) + 1:] in reported for name in named):
        return metric
    if sets and (bare in reported if reported is not None else not named):
        resolved = f"{sets[0]}_{bare}"
        users = _best_metric_users(args, callbacks) if len(sets) > 1 else []
        if users:  # which set picks the best checkpoint is a choice the user may not know was made
            logger.warning("metric_for_best_model=%r names no evaluation set, but there are %d (%s) and %s pick "
                           "checkpoints by it: using the first set's, %r. Name the one you mean: one of %s.", metric,
                           len(sets), ", ".join(sets), " and ".join(users), resolved,
                           [f"{name}_{bare}" for name in sets])
        else:
            logger.info("metric_for_best_model=%r refers to the first evaluation set: using %r.", metric, resolved)
        return resolved
    if reported is None or bare in reported or args.eval_strategy == IntervalStrategy.NO:
        return metric
    choices = [f"{name}_{m}" for name in sets for m in reported] if sets else list(reported)
    why = " (prediction_loss_only=True reports only the loss)" if args.prediction_loss_only else ""
    sets_note = f" for the evaluation sets {sets}" if sets else ""
    raise ValueError(f"metric_for_best_model={metric!r} is not a metric the evaluation reports{why}: choose one of "
                     f"{choices}{sets_note}. Lower is better for loss, loss_box and loss_giou.")


def _not_a_rec_model(model: Any) -> str:
    """Why ``model`` cannot go to :class:`RECTrainer`; a REC model inside a wrapper (``torch.compile``'s
    ``OptimizedModule``, DDP's or DataParallel's ``module``) is named with what to pass instead."""
    for attribute, fix in (("_orig_mod", "pass the model itself and set torch_compile=True (the Trainer compiles it)"),
                           ("module", "pass the model itself: the Trainer wraps it for several devices")):
        inner = getattr(model, attribute, None)
        if isinstance(inner, RECModel):
            return (f"RECTrainer got a {type(model).__name__} around a {type(inner).__name__}: {fix}; checkpoints, "
                    "resuming and the best model read and write the REC model's trained tensors.")
    return (f"RECTrainer trains m2ist REC models (SideTunedModel, BackboneTunedModel), got {type(model).__name__}; use "
            "transformers.Trainer for other models.")


def _default_collators(train: Callable | None, evaluation: Callable | None,
                       processor: Any) -> tuple[Callable | None, Callable | None]:
    """The training and evaluation collators, with the defaults REC needs. Without a training collator, a
    :class:`~m2ist.processing.RECProcessor` given as ``processing_class`` makes ``RECCollator(processor, train=True)``
    (transformers' ``default_data_collator`` fails on the items' images, "Could not infer dtype of Image"). Without an
    evaluation collator, a training ``RECCollator`` that augments gives its test-time twin, ``RECCollator(processor)``:
    evaluating through the training collator scored randomly augmented images, so the metrics changed from one
    evaluation to the next and the best checkpoint was picked on noise."""
    from m2ist.processing import RECProcessor

    if train is None and isinstance(processor, RECProcessor):
        train = RECCollator(processor, train=True)
    if evaluation is None and isinstance(train, RECCollator) and train.train:
        evaluation = RECCollator(train.processor, train=False)
    return train, evaluation


def _refuse_own_parameter_groups(args: RECTrainingArguments, optimizer_cls: Any, optimizer_kwargs: Mapping) -> None:
    """Refuse an optimizer that brings its own parameters or builds itself from the model (GaLore and APOLLO give
    ``params``, LOMO ``model``, the layer-wise variants ``optimizer_dict``; Muon-like factories take the model):
    ``RECTrainer``'s parameter groups (the head at ``learning_rate``, the side network at ``side_learning_rate``,
    weight decay on weight matrices only) would clash with them ("got multiple values for argument 'params'") or
    be replaced by groups over the whole model, frozen towers included."""
    from transformers.trainer_optimizer import is_optimizer_factory

    own = [key for key in ("params", "model", "optimizer_dict") if key in optimizer_kwargs]
    if own or is_optimizer_factory(optimizer_cls):
        what = f"brings its own {' and '.join(own)}" if own else "builds itself from the whole model"
        raise ValueError(f"optim={getattr(args.optim, 'value', args.optim)!r} {what}, which RECTrainer cannot combine "
                         "with its parameter groups (head at learning_rate, side network at side_learning_rate, weight "
                         "decay on weight matrices only). Use an optim that takes parameter groups (adamw_torch_fused, "
                         "adamw_torch, adafactor, sgd, ...), or build the optimizer yourself and pass "
                         "optimizers=(optimizer, None).")


def _evaluation_loss(compute_loss_func: Callable | None, outputs: Any, labels: torch.Tensor | None) -> Any:
    """An evaluation batch's loss: the ``compute_loss_func`` given to the trainer when there is one, as training
    uses it (and as ``Trainer.prediction_step`` does), else the model's REC loss; None without labels. The REC loss
    was reported as ``eval_loss`` even when training minimised the user's loss, so ``metric_for_best_model='loss'``
    and early stopping followed a loss the run did not train on."""
    if labels is None:
        return None
    if compute_loss_func is not None:
        return compute_loss_func(outputs, labels, num_items_in_batch=None).detach().mean()
    return outputs["loss"].detach().mean()


def _check_adapter_configs(model: nn.Module) -> None:
    """Refuse, before any step, an adapter config that fields assigned one by one (``model.config.x = ...``, each
    checked on its own) left broken: a rule that ties fields together fails (both loss weights 0 trains nothing), or
    a build field (``side_dropout``, ``bottleneck``...) differs from what the modules were built with (they would
    train with the old value, and the save at the end would refuse the adapter)."""
    setups = getattr(model, "adapter_setups", None)
    configs = {name: setup.config for name, setup in setups.items()} if isinstance(model, SideTunedModel) else \
        {DEFAULT_ADAPTER: model.config} if isinstance(getattr(model, "config", None), M2ISTConfig) else {}
    for name, config in configs.items():
        try:
            config.validate()
        except ValueError as err:
            raise ValueError(f"Adapter {name!r}: {err} (its fields were assigned one by one since the model was built; "
                             "they are checked together before training). Nothing was trained.") from None
        changed = setups[name].changed_build_fields() if isinstance(model, SideTunedModel) else []
        if changed:
            cast = " (to cast the towers: model.set_backbone_dtype(...) or tower_dtype=...)" \
                if any(change.startswith("backbone_dtype:") for change in changed) else ""
            raise ValueError(f"The config of adapter {name!r} was changed after the model was built "
                             f"({'; '.join(changed)}): its modules still compute with the values they were built "
                             "with, and the save would refuse the adapter. Build a new model with the config you want "
                             f"(or put the values back){cast}; nothing was trained.")


def _refuse_float16_parameters(model: nn.Module) -> None:
    """Refuse to train float16 parameters (``model.half()`` before training): the optimizer's updates and its
    second moments underflow in float16 (Adam's epsilon is 0 there), so the run stalls and then turns NaN, and with
    ``fp16=True`` the gradient scaler cannot unscale them. Mixed precision keeps them float32."""
    half = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        raise ValueError(f"{len(half)} trained parameter tensors are float16 (e.g. {half[0]!r}, after model.half() or "
                         "model.to(torch.float16)): the optimizer's updates underflow in float16 and the run would "
                         "stall, then diverge. Keep them float32 (model.float()) and train with fp16=True or bf16=True "
                         "(mixed precision); to save memory in the frozen towers, use backbone_dtype.")


def _non_finite_inputs(inputs: Mapping[str, Any]) -> str:
    """" The batch's labels hold non-finite values ..." when the inputs explain a non-finite loss, else ``""``."""
    bad = [key for key, value in inputs.items() if isinstance(value, torch.Tensor) and value.is_floating_point()
           and not bool(torch.isfinite(value).all())]
    if not bad:
        return ""
    return (f" The batch's {', '.join(bad)} hold non-finite values (NaN or inf): check the data (boxes and images) "
            "and the processor.")


#: The ``RECTrainingArguments`` that ``RECTrainer.__init__`` applies (a later change to ``trainer.args`` is refused).
_APPLIED_WHEN_BUILT = ("method", "remove_unused_columns", "tower_cache", "tower_cache_views", "tower_dtype")
#: Run settings that a checkpoint's optimizer and scheduler states restore on resume (a change cannot apply).
_RESTORED_BY_OPTIMIZER = ("learning_rate", "side_learning_rate", "weight_decay", "lr_scheduler_type", "lr_drop_epochs",
                          "lr_drop_factor", "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon")


def run_settings(trainer: RECTrainer) -> dict[str, Any]:
    """The settings that define a training run, recorded in each checkpoint (``m2ist_run.json``) and compared when
    resuming: learning rates and their schedule, the optimizer and its settings, seed, batch sizes (and
    ``dataloader_drop_last``), method, the trained adapter's name (M²IST's active adapter), the model's
    M2ISTConfig (without the recorded tower names; its ``backbone_dtype`` is the towers' dtype after
    ``args.tower_dtype``, so a run resumed with its towers in another dtype is refused), the training-set size, the
    training augmentation's settings and the processor's (canvas, normalisation, query length, lowercasing, the
    tokenizer's size: a resume with another would train on inputs prepared otherwise). Epoch and step counts are
    left out: extending a run is fine."""
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model, "config", None)
    config_values = None
    if isinstance(config, M2ISTConfig):
        config_values = {key: value for key, value in config.to_dict().items()
                         if not key.endswith(("_model_name_or_path", "_revision"))
                         and key not in ("vision_dtype", "text_dtype")}  # provenance; backbone_dtype is the run's
    return {
        "learning_rate": args.learning_rate, "side_learning_rate": args.side_learning_rate,
        "weight_decay": args.weight_decay, "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value",
                                                                            args.lr_scheduler_type)),
        "lr_drop_epochs": list(args.lr_drop_epochs), "lr_drop_factor": args.lr_drop_factor,
        "warmup_steps": args.warmup_steps, "optim": str(getattr(args.optim, "value", args.optim)),
        "optim_args": args.optim_args, "adam_beta1": args.adam_beta1, "adam_beta2": args.adam_beta2,
        "adam_epsilon": args.adam_epsilon, "dataloader_drop_last": args.dataloader_drop_last,
        "seed": args.seed, "data_seed": args.data_seed, "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps, "world_size": args.world_size,
        "method": model_method(model), "adapter": trained_adapter(model), "m2ist_config": config_values,
        "tower_cache_dtype": None if args.tower_cache == "off" else args.tower_cache_dtype,
        "tower_cache_views": args.tower_cache_views if args.tower_cache != "off" else None,
        "train_samples": _length(trainer.train_dataset) if trainer.train_dataset is not None else None,
        "augmentation": _augmentation_settings(trainer._training_augmentation()),
        "processor": _training_processor_settings(trainer),
    }


def _training_processor_settings(trainer: RECTrainer) -> dict[str, Any] | None:
    """:func:`processor_settings` of the processor the training batches are prepared with: ``processing_class``, else
    the training collator's (a ``RECCollator``, inside the tower cache's collator when the cache is on)."""
    for processor in (trainer.processing_class, _collator_processor(trainer.data_collator)):
        if hasattr(processor, "flat_settings"):
            return processor_settings(processor)
    return None


def _augmentation_settings(augmentation: Any) -> dict[str, Any] | None:
    """The training augmentation's class and, for a dataclass such as :class:`RECAugmentation`, its settings
    (seed included): a run resumed with other draws or other augmentations would not continue the run."""
    if augmentation is None:
        return None
    settings: dict[str, Any] = {"class": f"{type(augmentation).__module__}.{type(augmentation).__qualname__}"}
    if dataclasses.is_dataclass(augmentation):
        settings.update({f.name: getattr(augmentation, f.name) for f in dataclasses.fields(augmentation) if f.init})
    if getattr(augmentation, _SEED_FROM_TRAINING, False):
        settings["seed"] = None  # it follows the training seed (recorded apart), as before the run gave it
    return settings


def checkpoint_problems(folder: str | os.PathLike, *, needs_optimizer: bool = True, adapter: str | None = None) -> str:
    """What a checkpoint folder lacks to be resumed from ("" when complete): the trained adapter's weights (readable,
    matching their SHA-256) and config (at the root, or in ``<adapter>/`` for an ``adapter`` other than
    ``"default"``), ``trainer_state.json`` (valid JSON; written last, so its absence means the save was cut short)
    and, unless ``needs_optimizer`` is False, readable optimizer and scheduler states (and RNG and scaler states,
    where saved)."""
    check_flags("checkpoint_problems", needs_optimizer=needs_optimizer)
    folder = Path(folder)
    weights = adapter_folder(folder, adapter)
    where = "" if weights == folder else f"{adapter}/"
    problems = []
    try:
        read_safetensors(weights / WEIGHTS_NAME)
    except ValueError:
        trained = _recorded_adapter(folder)
        if trained is not None and trained != (adapter or DEFAULT_ADAPTER):
            problems.append(f"it trained the adapter {trained!r}, not {adapter or DEFAULT_ADAPTER!r}: call "
                            f"model.set_adapter({trained!r}) before resuming")
        else:
            problems.append(f"{where}{WEIGHTS_NAME} missing or damaged")
    if not (weights / CONFIG_NAME).is_file():
        problems.append(f"no {where}{CONFIG_NAME}")
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(f"no {TRAINER_STATE_NAME}")
    except (OSError, ValueError):
        problems.append(f"{TRAINER_STATE_NAME} damaged")
    if needs_optimizer:
        for name in ("optimizer.pt", "scheduler.pt"):
            if not (folder / name).is_file():
                problems.append(f"no {name}")
            elif not zipfile.is_zipfile(folder / name):
                problems.append(f"{name} truncated or damaged")
        for path in sorted([*folder.glob("rng_state*.pth"), *folder.glob("scaler.pt")]):  # optional, read on resume
            if not zipfile.is_zipfile(path):
                problems.append(f"{path.name} truncated or damaged")
    return ", ".join(problems)


def _recorded_adapter(checkpoint: Path) -> str | None:
    """The trained adapter's name recorded in a checkpoint's run settings (None: not recorded or unreadable)."""
    try:
        adapter = json.loads((checkpoint / RUN_SETTINGS_NAME).read_text(encoding="utf-8")).get("adapter")
    except (OSError, ValueError, AttributeError):
        return None
    return adapter if isinstance(adapter, str) else None


def _has_length(dataloader) -> bool:
    try:
        return len(dataloader) is not None
    except (TypeError, NotImplementedError):
        return False


# ---------------------------------------------------------------------------------------------- convenience
def train_rec(model: RECModel, processor, train_dataset: Dataset,
              eval_datasets: Dataset | Mapping[str, Dataset] | None = None, args: RECTrainingArguments | None = None,
              *, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> RECTrainer:
    """Train ``model`` on REC items and return the :class:`RECTrainer` (its ``state``, ``evaluate()``, ...).

    Training batches come from ``RECCollator(processor, train=True)`` (the processor's augmentation, if it has one),
    evaluation batches from ``RECCollator(processor)`` (test-time transform). ``eval_datasets`` is one dataset or a
    dict of them (``{"val": ..., "testA": ...}`` gives ``eval_val_acc@0.5``, ``eval_testA_acc@0.5``, ...). Items are
    dicts with ``image``, ``expression`` and ``box`` (``xyxy`` pixels), e.g. from :class:`m2ist.data.RECDataset`.
    The processor is saved with every checkpoint. ``kwargs`` go to :class:`RECTrainer` (``callbacks``, ...).

    ``resume_from_checkpoint`` (a folder, or True for the last one in ``args.output_dir``) restores the trained
    tensors, optimizer, schedule, data order and the torch/numpy/python random states, so a resumed run trains the
    uninterrupted run's weights. The processor's augmentation (and, with ``tower_cache_views``, the view picked for
    each item) draws for each batch from a generator seeded by ``RECAugmentation.seed`` (``args.seed`` for the views)
    and the batch's number in the run, so augmented runs resume exactly too, with ``dataloader_num_workers=0``; with
    workers the draws after a resume mid-epoch differ (a warning says so).

    Example::

        args = RECTrainingArguments(output_dir="out", num_train_epochs=90, lr_drop_epochs=[60],
                                    per_device_train_batch_size=64, eval_strategy="epoch", save_strategy="epoch",
                                    load_best_model_at_end=True)
        trainer = train_rec(model, processor, train_set, {"val": val_set}, args)
        trainer.save_model("out/best")
    """
    if args is None:
        args = RECTrainingArguments(output_dir="trainer_output")
    trainer = RECTrainer(
        model=model,
        args=args,
        data_collator=RECCollator(processor, train=True),
        eval_data_collator=RECCollator(processor, train=False),
        train_dataset=train_dataset,
        eval_dataset=eval_datasets,
        processing_class=processor,
        **kwargs,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return trainer

