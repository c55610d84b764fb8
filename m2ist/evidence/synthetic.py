"""A procedural referring-expression benchmark ("shapes REC") that needs no download.

Each scene is a small image with a few coloured shapes on a plain or lightly textured background. Each
expression names exactly one object, by its attributes ("the small red triangle"), an extreme ("the leftmost
circle", "the biggest square"), an ordinal ("the second square from the left") or a relation ("the circle
above the green square"). Uniqueness holds by construction: candidate expressions for a target are kept only
when their referent set, evaluated over the scene by :func:`referents`, is exactly that target.

Conventions:

* Boxes are the tight pixel box of the object's rendered pixels in ``xyxy`` absolute pixels with exclusive
  right/bottom edges (``x1 = last column + 1``, as ``PIL.Image.getbbox``), so ``x1 - x0`` is the number of
  pixel columns the object covers.
* "left of" / "right of" / "above" / "below" mean that the target's tight box lies entirely on that side of
  the anchor's tight box (no shared column, resp. row). An anchor phrase names one object in generated data;
  :func:`referents` reads it existentially ("left of *some* object matching the anchor phrase").
* Extremes and ordinals compare box centres (or the box's longer side for "biggest"/"smallest"); two values
  closer than the scene's tolerance count as a tie, so "the leftmost circle" is only generated when one circle
  is clearly further left than every other circle.
* Compositional split: a fixed set of held-out ``(shape, colour)`` pairs (:attr:`SyntheticRECConfig.heldout_pairs`)
  is never seen in training: no train/val expression targets or names one, and no train/val image holds one
  (CLEVR-CoGenT's design; the scenes of the other test splits follow the training distribution too).
  ``test_compositional`` expressions target only held-out pairs and name both their colour and shape. With
  :attr:`SyntheticRECConfig.heldout_distractors` the held-out pairs may appear in those images as unnamed
  distractors, as in m2ist's benchmark before the change: a model then also learns that such objects are never
  the answer, which the compositional split punishes (see ``docs/benchmarks.md``).

Everything is seeded: the same seed and config give byte-identical images and identical expressions and boxes.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
import warnings
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from m2ist.config import is_whole_number
from m2ist.data.sample import RECSample

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
"""Every shape the renderer can draw."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 85, 225),
    "yellow": (240, 205, 30),
    "purple": (145, 60, 190),
    "orange": (250, 130, 20),
    "cyan": (30, 195, 210),
    "black": (25, 25, 25),
}
"""Every colour name the renderer knows and its base RGB value."""

SIZES: tuple[str, ...] = ("small", "large")
"""Size classes; their extents never overlap (see :class:`SyntheticRECConfig`)."""

EXPRESSION_TYPES: tuple[str, ...] = ("attribute", "extreme", "ordinal", "relation")
"""Kinds of referring expression the generator produces."""

POSITION_DIRECTIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
SIZE_DIRECTIONS: tuple[str, ...] = ("biggest", "smallest")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below")

_EXTREME_WORDS = {
    "left": "leftmost",
    "right": "rightmost",
    "top": "topmost",
    "bottom": "bottommost",
    "biggest": "biggest",
    "smallest": "smallest",
}
_RELATION_WORDS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
_ORDINAL_WORDS = {1: "first", 2: "second", 3: "third", 4: "fourth", 5: "fifth"}

SPLITS: dict[str, dict[str, Any]] = {
    "train": {"types": EXPRESSION_TYPES, "heldout": "exclude"},
    "val": {"types": EXPRESSION_TYPES, "heldout": "exclude"},
    "test_attributes": {"types": ("attribute",), "heldout": "exclude"},
    "test_compositional": {"types": ("attribute",), "heldout": "only"},
    "test_relations": {"types": ("relation",), "heldout": "exclude"},
    "test_spatial": {"types": ("extreme", "ordinal"), "heldout": "exclude"},
}
"""The benchmark's splits: which expression types each holds and how it treats held-out pairs."""

DEFAULT_SIZES: dict[str, int] = {
    "train": 3000,
    "val": 300,
    "test_attributes": 300,
    "test_compositional": 300,
    "test_relations": 300,
    "test_spatial": 300,
}
"""Default number of images per split of :func:`make_benchmark`."""


def default_heldout_pairs(shapes: Sequence[str], colours: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """One held-out colour per shape: shape ``i`` pairs with colour ``(2 i + 1) mod len(colours)``.

    With the default 4 shapes and 5 colours this holds out (circle, green), (square, yellow), (triangle, red)
    and (diamond, blue): every shape and every colour keeps other combinations for training.
    """
    return tuple((shape, colours[(2 * i + 1) % len(colours)]) for i, shape in enumerate(shapes))


_WHOLE_FIELDS: dict[str, int] = {
    "min_objects": 1,
    "max_objects": 1,
    "margin": 1,  # two objects never touch (two touching squares of one colour would read as one rectangle)
    "border": 0,  # an object never leaves the image (its box would not be the box of its drawn pixels)
    "colour_jitter": 0,
    "texture_strength": 0,
    "seed": 0,
}
"""Whole-number fields of :class:`SyntheticRECConfig` and their smallest value."""

_DISTINCT_EXTENTS = 16
"""Shapes are checked to draw distinct pixels at every extent below this (above it they always do)."""


def _whole(name: str, value: Any, minimum: int) -> int:
    """``value`` as an ``int`` if it is a whole number (:func:`~m2ist.config.is_whole_number`) ``>= minimum``; a
    ``ValueError`` naming ``name`` otherwise."""
    if not is_whole_number(value):
        raise ValueError(f"{name} must be a whole number, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


def _pair(name: str, value: Any) -> tuple[int, int]:
    """An inclusive ``(min, max)`` range of whole pixel counts ``>= 1``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"SyntheticRECConfig.{name} must be a (min, max) pair of whole numbers, got {value!r}.")
    low, high = (_whole(f"SyntheticRECConfig.{name}", v, 1) for v in value)
    if low > high:
        raise ValueError(f"SyntheticRECConfig.{name} must be a (min, max) pair with min <= max, got {value!r}.")
    return low, high


def _size_setting(value: Any) -> int | tuple[int, int]:
    """``image_size``: one whole side, or an inclusive ``(min, max)`` range of sides."""
    if is_whole_number(value):
        return _whole("SyntheticRECConfig.image_size", value, 1)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"SyntheticRECConfig.image_size must be a whole number or a (min, max) pair, got {value!r}.")
    return _pair("image_size", value)


def _names(name: str, value: Any) -> tuple[str, ...]:
    """A vocabulary: a list of names, never one string (read letter by letter)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"SyntheticRECConfig.{name} must be a list of names, got {value!r}; e.g. {name}=({value!r},).")
    return tuple(value)


def _heldout_pairs(value: Any, name: str = "SyntheticRECConfig.heldout_pairs") -> tuple[tuple[str, str], ...]:
    """Held-out pairs: ``(shape, colour)`` pairs of names (one pair alone, ``("circle", "green")``, is refused: it
    would be read as two one-letter-at-a-time entries)."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"{name} must be a list of (shape, colour) pairs, got {value!r}.")
    pairs = []
    for pair in value:
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2 or not all(
            isinstance(v, str) for v in pair
        ):
            raise ValueError(
                f"{name} holds {pair!r}; each entry must be a (shape, colour) pair of names, e.g. "
                f"[('circle', 'green')], not ('circle', 'green')."
            )
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _check_distinct_shapes(shapes: Sequence[str], smallest: int, largest: int) -> None:
    """Every shape draws some pixels, and two shapes never the same pixels, at every extent the config may draw:
    at a few pixels a circle is a square, and "the circle" would name what looks like a square."""
    for extent in range(smallest, min(largest, _DISTINCT_EXTENTS - 1) + 1):
        masks = {shape: np.asarray(_shape_mask(shape, extent)) > 0 for shape in shapes}
        for shape, mask in masks.items():
            if not mask.any():
                raise ValueError(
                    f"A {shape} of {extent} px draws no pixel: raise small_extent[0] to at least 4 (got {smallest})."
                )
        for a, b in itertools.combinations(shapes, 2):
            if np.array_equal(masks[a], masks[b]):
                raise ValueError(
                    f"A {a} and a {b} of {extent} px draw the same pixels, so an expression naming one would name "
                    f"what looks like the other: raise small_extent[0] to at least 4 (got {smallest})."
                )


def _check_colour_jitter(colours: Sequence[str], jitter: int) -> None:
    """Two jittered colours never meet: a "red" object is never drawn in a colour an "orange" one may have."""
    for a, b in itertools.combinations(colours, 2):
        gap = max(abs(u - v) for u, v in zip(COLOURS[a], COLOURS[b]))
        if 2 * jitter >= gap:
            raise ValueError(
                f"SyntheticRECConfig.colour_jitter={jitter} lets {a} and {b} objects take the same colour (their "
                f"base colours differ by {gap} at most per channel): use colour_jitter <= {(gap - 1) // 2}."
            )


@dataclass
class SyntheticRECConfig:
    """What the scenes of the procedural benchmark look like.

    Attributes:
        image_size: side of the square image in pixels, or an inclusive ``(min, max)`` range from which width
            and height are drawn independently.
        min_objects, max_objects: number of objects per scene (inclusive).
        shapes, colours: the vocabularies used (subsets of :data:`SHAPES` and :data:`COLOURS`).
        small_extent, large_extent: inclusive ranges of the nominal side (pixels) of small / large objects;
            they must not overlap, so the size classes stay separable.
        margin: minimum gap in pixels between the nominal boxes of two objects.
        border: minimum gap in pixels between an object and the image border.
        colour_jitter: per-channel uniform jitter added to an object's base colour.
        background: ``"plain"`` (one grey per image) or ``"textured"`` (grey plus faint noise).
        texture_strength: amplitude of the background noise in grey levels.
        position_tolerance: centre differences up to this many pixels count as ties for extremes/ordinals.
        size_tolerance: differences of the box's longer side up to this many pixels count as ties.
        heldout_pairs: ``(shape, colour)`` pairs reserved for the compositional split; ``None`` picks
            :func:`default_heldout_pairs`.
        heldout_distractors: let objects of a held-out pair appear, unnamed, in the images of the splits that
            exclude held-out pairs (train, val and the other test splits). ``False`` (the default): a held-out
            pair is seen only in ``test_compositional``, neither named nor drawn anywhere else.
        seed: the default seed of :func:`generate_split` and :func:`make_benchmark`.
    """

    image_size: int | tuple[int, int] = 128
    min_objects: int = 3
    max_objects: int = 6
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    small_extent: tuple[int, int] = (12, 18)
    large_extent: tuple[int, int] = (26, 38)
    margin: int = 4
    border: int = 2
    colour_jitter: int = 12
    background: str = "textured"
    texture_strength: int = 6
    position_tolerance: float = 6.0
    size_tolerance: float = 6.0
    heldout_pairs: tuple[tuple[str, str], ...] | None = None
    heldout_distractors: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.image_size = _size_setting(self.image_size)
        size_range = self.image_size if isinstance(self.image_size, tuple) else (self.image_size, self.image_size)
        self.shapes = _names("shapes", self.shapes)
        self.colours = _names("colours", self.colours)
        for shape in self.shapes:
            if shape not in SHAPES:
                raise ValueError(f"Unknown shape {shape!r}; choose from {SHAPES}.")
        for colour in self.colours:
            if colour not in COLOURS:
                raise ValueError(f"Unknown colour {colour!r}; choose from {tuple(COLOURS)}.")
        if len(set(self.shapes)) != len(self.shapes) or len(set(self.colours)) != len(self.colours) or not (
            self.shapes and self.colours
        ):
            raise ValueError("shapes and colours must be non-empty and free of duplicates.")
        for name, minimum in _WHOLE_FIELDS.items():
            setattr(self, name, _whole(f"SyntheticRECConfig.{name}", getattr(self, name), minimum))
        self.small_extent = _pair("small_extent", self.small_extent)
        self.large_extent = _pair("large_extent", self.large_extent)
        for name in ("position_tolerance", "size_tolerance"):
            value = getattr(self, name)
            valid = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if not valid or not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"SyntheticRECConfig.{name} must be a finite number of pixels >= 0, got {value!r}: a NaN, "
                    "infinite or negative tolerance makes every extreme and ordinal a tie (or none), so they are never "
                    "generated."
                )
            setattr(self, name, float(value))
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"Need 1 <= min_objects <= max_objects, got min_objects={self.min_objects}, "
                f"max_objects={self.max_objects}."
            )
        (s0, s1), (l0, l1) = self.small_extent, self.large_extent
        if not (1 <= s0 <= s1 < l0 <= l1):
            raise ValueError(
                f"Size classes must be separable: need 1 <= small_extent[0] <= small_extent[1] < large_extent[0] "
                f"<= large_extent[1], got small_extent={self.small_extent}, large_extent={self.large_extent}."
            )
        _check_distinct_shapes(self.shapes, s0, l1)
        _check_colour_jitter(self.colours, self.colour_jitter)
        if l1 + 2 * self.border > size_range[0]:
            raise ValueError(
                f"A large object ({l1} px) plus borders does not fit in a {size_range[0]} px image: "
                "raise image_size or lower large_extent."
            )
        if self.background not in ("plain", "textured"):
            raise ValueError(f"background must be 'plain' or 'textured', got {self.background!r}.")
        if self.heldout_pairs is None:
            self.heldout_pairs = default_heldout_pairs(self.shapes, self.colours)
        self.heldout_pairs = _heldout_pairs(self.heldout_pairs)
        for shape, colour in self.heldout_pairs:
            if shape not in self.shapes or colour not in self.colours:
                raise ValueError(
                    f"Held-out pair ({shape!r}, {colour!r}) is not in the configured shapes {self.shapes} "
                    f"and colours {self.colours}."
                )
        if len(set(self.heldout_pairs)) >= len(self.shapes) * len(self.colours):
            raise ValueError("heldout_pairs holds out every (shape, colour) pair: nothing is left to train on.")
        if not isinstance(self.heldout_distractors, bool):
            raise ValueError(f"heldout_distractors must be True or False, got {self.heldout_distractors!r}.")

    @property
    def size_range(self) -> tuple[int, int]:
        """Inclusive ``(min, max)`` image side in pixels."""
        return self.image_size if isinstance(self.image_size, tuple) else (self.image_size, self.image_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy of the config."""
        out = dataclasses.asdict(self)
        out["heldout_pairs"] = [list(p) for p in self.heldout_pairs or ()]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticRECConfig:
        """Rebuild a config written by :meth:`to_dict` (e.g. ``benchmark.json``'s ``"config"``).

        A field that is not a config field is refused, naming it. A config written before
        ``heldout_distractors`` existed (no such key) described scenes that drew held-out pairs in every split:
        it is read with ``heldout_distractors=True``, with a warning, so the same scenes come back.
        """
        if not isinstance(data, dict):
            raise ValueError(f"SyntheticRECConfig.from_dict needs a dict (a to_dict() output), got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            hint = " (pass benchmark.json's \"config\" entry, not the whole manifest)" if "config" in data else ""
            raise ValueError(f"SyntheticRECConfig.from_dict: unknown field(s) {unknown}{hint}; the fields are "
                             f"{sorted(known)}.")
        data = dict(data)
        if "heldout_distractors" not in data:
            warnings.warn(
                "This SyntheticRECConfig has no 'heldout_distractors' field: it was written before held-out pairs "
                "were kept out of the other splits' images, so it is read with heldout_distractors=True (the scenes "
                "it described); set heldout_distractors=False for the current benchmark.",
                UserWarning,
                stacklevel=2,
            )
            data["heldout_distractors"] = True
        for key in ("image_size", "small_extent", "large_extent", "shapes", "colours"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        if data.get("heldout_pairs") is not None:
            data["heldout_pairs"] = tuple(tuple(p) for p in data["heldout_pairs"])
        return cls(**data)


# ---------------------------------------------------------------------------------------------------------------
# scenes


@dataclass
class SceneObject:
    """One rendered object.

    Attributes:
        shape, colour, size: its attributes (``size`` is ``"small"`` or ``"large"``).
        extent: nominal side of the square it was drawn in (pixels).
        box: tight ``xyxy`` pixel box of its rendered pixels (exclusive right/bottom edge).
        rgb: the exact fill colour used.
    """

    shape: str
    colour: str
    size: str
    extent: int
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]

    @property
    def center(self) -> tuple[float, float]:
        """Centre ``(x, y)`` of the tight box."""
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    @property
    def visual_size(self) -> int:
        """The longer side of the tight box: what "biggest"/"smallest" compare."""
        return max(self.box[2] - self.box[0], self.box[3] - self.box[1])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "size": self.size,
            "extent": self.extent,
            "box": list(self.box),
            "rgb": list(self.rgb),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        """Rebuild an object written by :meth:`to_dict`."""
        return cls(
            shape=data["shape"],
            colour=data["colour"],
            size=data["size"],
            extent=int(data["extent"]),
            box=tuple(int(v) for v in data["box"]),  # type: ignore[arg-type]
            rgb=tuple(int(v) for v in data["rgb"]),  # type: ignore[arg-type]
        )


@dataclass
class Scene:
    """A rendered image and the objects in it (index ``i`` of ``objects`` is object ``i``).

    ``instance_map`` (only with ``generate_scene(..., with_instance_map=True)``) is an ``(H, W)`` uint8 array
    holding ``i + 1`` on the pixels of object ``i`` and 0 on the background.
    """

    image: Image.Image | None
    objects: list[SceneObject]
    width: int
    height: int
    position_tolerance: float = 6.0
    size_tolerance: float = 6.0
    instance_map: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        """The scene without its image, JSON-serialisable (kept in each sample's metadata)."""
        return {
            "width": self.width,
            "height": self.height,
            "position_tolerance": self.position_tolerance,
            "size_tolerance": self.size_tolerance,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], image: Image.Image | None = None) -> Scene:
        """Rebuild a scene from :meth:`to_dict` output (e.g. ``sample.metadata["scene"]``)."""
        return cls(
            image=image,
            objects=[SceneObject.from_dict(o) for o in data["objects"]],
            width=int(data["width"]),
            height=int(data["height"]),
            position_tolerance=float(data.get("position_tolerance", 6.0)),
            size_tolerance=float(data.get("size_tolerance", 6.0)),
        )


def _shape_mask(shape: str, extent: int) -> Image.Image:
    """A binary ``L`` mask of one shape filling an ``extent x extent`` square (paste it at the object's corner).

    Drawing in the object's own square rather than a whole-image canvas gives the same pixels (the shapes' corner
    points move by whole pixels) at a fraction of the cost: scenes are drawn on the fly while pretraining.
    """
    mask = Image.new("L", (extent, extent), 0)
    draw = ImageDraw.Draw(mask)
    e = extent - 1
    x0 = y0 = 0
    x1, y1 = e, e
    cx, cy = e / 2.0, e / 2.0
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=255)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "star":
        outer, inner = e / 2.0, e / 2.0 * 0.45
        points = []
        for k in range(10):
            radius = outer if k % 2 == 0 else inner
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), y0 + outer + radius * math.sin(angle)))
        draw.polygon(points, fill=255)
    else:  # pragma: no cover - guarded by the config
        raise ValueError(f"Unknown shape {shape!r}; choose from {SHAPES}.")
    return mask


def _boxes_clear(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def generate_scene(
    rng: np.random.Generator,
    config: SyntheticRECConfig | None = None,
    *,
    required_pair: tuple[str, str] | None = None,
    excluded_pairs: Iterable[tuple[str, str]] = (),
    with_instance_map: bool = False,
) -> Scene:
    """Draw and render one scene.

    Args:
        rng: the source of randomness (``numpy.random.default_rng(seed)``); the scene depends on nothing else.
        config: what scenes look like (defaults to :class:`SyntheticRECConfig()`).
        required_pair: a ``(shape, colour)`` the scene must contain (the first object is given it).
        excluded_pairs: ``(shape, colour)`` pairs no other object may have; the others are drawn uniformly from
            the remaining pairs.
        with_instance_map: also return the per-pixel object index map (``Scene.instance_map``).

    Returns:
        A :class:`Scene` with ``config.min_objects``..``config.max_objects`` non-overlapping objects.
    """
    config = config or SyntheticRECConfig()
    if required_pair is not None and (required_pair[0] not in config.shapes or required_pair[1] not in config.colours):
        raise ValueError(f"required_pair {required_pair!r} is not made of the configured shapes and colours.")
    excluded = set(_heldout_pairs(excluded_pairs, "generate_scene(excluded_pairs=...)"))
    for pair in excluded:
        if pair[0] not in config.shapes or pair[1] not in config.colours:
            raise ValueError(
                f"excluded_pairs holds {pair!r}, which is not made of the configured shapes {config.shapes} and "
                f"colours {config.colours}: it would exclude nothing."
            )
    if required_pair is not None and tuple(required_pair) in excluded:
        raise ValueError(f"required_pair {tuple(required_pair)!r} is also in excluded_pairs.")
    drawable = [pair for pair in itertools.product(config.shapes, config.colours) if pair not in excluded]
    if not drawable:
        raise ValueError("excluded_pairs leaves no (shape, colour) pair to draw.")
    lo, hi = config.size_range
    for _attempt in range(100):
        width, height = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        target_count = int(rng.integers(config.min_objects, config.max_objects + 1))
        placed: list[tuple[str, str, str, int, tuple[int, int, int, int]]] = []
        for k in range(target_count):
            if k == 0 and required_pair is not None:
                shape, colour = required_pair
            elif excluded:
                shape, colour = drawable[int(rng.integers(len(drawable)))]
            else:  # two draws, so scenes without exclusions stay those of earlier versions
                shape = config.shapes[int(rng.integers(len(config.shapes)))]
                colour = config.colours[int(rng.integers(len(config.colours)))]
            size = SIZES[int(rng.integers(2))]
            extent_range = config.small_extent if size == "small" else config.large_extent
            extent = int(rng.integers(extent_range[0], extent_range[1] + 1))
            for _try in range(40):
                x0 = int(rng.integers(config.border, width - config.border - extent + 1))
                y0 = int(rng.integers(config.border, height - config.border - extent + 1))
                nominal = (x0, y0, x0 + extent, y0 + extent)
                if all(_boxes_clear(nominal, other[4], config.margin) for other in placed):
                    placed.append((shape, colour, size, extent, nominal))
                    break
        if len(placed) >= config.min_objects and (required_pair is None or placed[0][:2] == required_pair):
            break
    else:
        raise RuntimeError(
            "Could not place enough non-overlapping objects in 100 attempts: lower max/min_objects or the object "
            "extents, or raise image_size."
        )

    base = int(rng.integers(200, 236))
    tint = rng.integers(-8, 9, size=3)
    background = np.clip(base + tint, 0, 255).astype(np.int16)
    if config.background == "textured" and config.texture_strength > 0:
        s = config.texture_strength
        pixels = rng.integers(-s, s + 1, size=(height, width, 1), dtype=np.int16) + background
        np.clip(pixels, 0, 255, out=pixels)
    else:
        pixels = np.broadcast_to(background, (height, width, 3))
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")

    objects: list[SceneObject] = []
    instance_map = np.zeros((height, width), dtype=np.uint8) if with_instance_map else None
    for shape, colour, size, extent, nominal in placed:
        jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255))
        x0, y0 = nominal[0], nominal[1]
        mask = _shape_mask(shape, extent)
        local = mask.getbbox()
        assert local is not None  # every shape covers pixels
        bbox = (x0 + local[0], y0 + local[1], x0 + local[2], y0 + local[3])
        image.paste(rgb, (x0, y0, x0 + extent, y0 + extent), mask)
        if instance_map is not None:
            instance_map[y0 : y0 + extent, x0 : x0 + extent][np.asarray(mask) > 0] = len(objects) + 1
        objects.append(SceneObject(shape, colour, size, extent, tuple(int(v) for v in bbox), rgb))  # type: ignore[arg-type]
    return Scene(
        image=image,
        objects=objects,
        width=width,
        height=height,
        position_tolerance=float(config.position_tolerance),
        size_tolerance=float(config.size_tolerance),
        instance_map=instance_map,
    )


# ---------------------------------------------------------------------------------------------------------------
# expressions


@dataclass(frozen=True)
class Description:
    """A noun phrase over attributes; ``None`` fields are unconstrained ("the red shape": colour only)."""

    shape: str | None = None
    colour: str | None = None
    size: str | None = None

    def matches(self, obj: SceneObject) -> bool:
        """Whether ``obj`` has every attribute this phrase names."""
        return (
            (self.shape is None or obj.shape == self.shape)
            and (self.colour is None or obj.colour == self.colour)
            and (self.size is None or obj.size == self.size)
        )

    def phrase(self) -> str:
        """The words, e.g. ``"small red triangle"``, ``"red shape"``, ``"shape"``."""
        words = [w for w in (self.size, self.colour) if w is not None]
        words.append(self.shape if self.shape is not None else "shape")
        return " ".join(words)

    def pair(self) -> tuple[str, str] | None:
        """The ``(shape, colour)`` pair this phrase names, if it names both."""
        return (self.shape, self.colour) if self.shape is not None and self.colour is not None else None

    def to_dict(self) -> dict[str, str | None]:
        """A JSON-serialisable copy."""
        return {"shape": self.shape, "colour": self.colour, "size": self.size}


@dataclass(frozen=True)
class ExpressionSpec:
    """The structured form of a referring expression; :meth:`text` renders it.

    Attributes:
        kind: one of :data:`EXPRESSION_TYPES`.
        target: the phrase the referent must match (for extremes/ordinals: the group compared).
        direction: extremes: ``left|right|top|bottom|biggest|smallest``; ordinals: ``left|right|top|bottom``.
        ordinal: ordinals: the rank counted from ``direction`` (2 = "second").
        relation: relations: one of :data:`RELATIONS`.
        anchor: relations: the phrase naming the reference object.
    """

    kind: str
    target: Description = field(default_factory=Description)
    direction: str | None = None
    ordinal: int | None = None
    relation: str | None = None
    anchor: Description | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXPRESSION_TYPES:
            raise ValueError(f"Unknown expression kind {self.kind!r}; choose from {EXPRESSION_TYPES}.")
        if self.kind == "extreme" and self.direction not in _EXTREME_WORDS:
            raise ValueError(f"An extreme needs direction in {tuple(_EXTREME_WORDS)}, got {self.direction!r}.")
        if self.kind == "ordinal" and (
            self.direction not in POSITION_DIRECTIONS or not isinstance(self.ordinal, int) or self.ordinal < 1
        ):
            raise ValueError(
                f"An ordinal needs direction in {POSITION_DIRECTIONS} and ordinal >= 1, got "
                f"direction={self.direction!r}, ordinal={self.ordinal!r}."
            )
        if self.kind == "relation" and (self.relation not in RELATIONS or self.anchor is None):
            raise ValueError(f"A relation needs relation in {RELATIONS} and an anchor, got {self.relation!r}.")

    def text(self) -> str:
        """The English expression, e.g. ``"the second square from the left"``."""
        noun = self.target.phrase()
        if self.kind == "attribute":
            return f"the {noun}"
        if self.kind == "extreme":
            return f"the {_EXTREME_WORDS[self.direction]} {noun}"  # type: ignore[index]
        if self.kind == "ordinal":
            rank = _ORDINAL_WORDS.get(self.ordinal, f"{self.ordinal}th")  # type: ignore[arg-type]
            return f"the {rank} {noun} from the {self.direction}"
        return f"the {noun} {_RELATION_WORDS[self.relation]} the {self.anchor.phrase()}"  # type: ignore[index,union-attr]

    def pairs_named(self) -> list[tuple[str, str]]:
        """The ``(shape, colour)`` pairs named as colour+shape phrases anywhere in the expression."""
        named = [self.target.pair()]
        if self.anchor is not None:
            named.append(self.anchor.pair())
        return [p for p in named if p is not None]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return {
            "kind": self.kind,
            "target": self.target.to_dict(),
            "direction": self.direction,
            "ordinal": self.ordinal,
            "relation": self.relation,
            "anchor": None if self.anchor is None else self.anchor.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExpressionSpec:
        """Rebuild a spec written by :meth:`to_dict` (e.g. ``sample.metadata["spec"]``)."""
        return cls(
            kind=data["kind"],
            target=Description(**data.get("target", {})),
            direction=data.get("direction"),
            ordinal=data.get("ordinal"),
            relation=data.get("relation"),
            anchor=None if data.get("anchor") is None else Description(**data["anchor"]),
        )


def _sort_key(obj: SceneObject, direction: str) -> float:
    """Smaller key = earlier in ``direction`` (computed for that direction only: expressions are enumerated by the
    hundred thousand when a benchmark is generated)."""
    x0, y0, x1, y1 = obj.box
    if direction == "left":
        return (x0 + x1) / 2.0
    if direction == "right":
        return -((x0 + x1) / 2.0)
    if direction == "top":
        return (y0 + y1) / 2.0
    if direction == "bottom":
        return -((y0 + y1) / 2.0)
    if direction == "biggest":
        return -float(max(x1 - x0, y1 - y0))
    if direction == "smallest":
        return float(max(x1 - x0, y1 - y0))
    raise KeyError(direction)


def _holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` ``b`` (tight boxes entirely on that side)."""
    if relation == "left_of":
        return a.box[2] <= b.box[0]
    if relation == "right_of":
        return a.box[0] >= b.box[2]
    if relation == "above":
        return a.box[3] <= b.box[1]
    return a.box[1] >= b.box[3]


def _ranked(objects: Sequence[SceneObject], group: list[int], direction: str, rank: int, tolerance: float) -> list[int]:
    """Members of ``group`` whose rank from ``direction`` may be ``rank`` given ties within ``tolerance``."""
    keys = [_sort_key(objects[i], direction) for i in group]
    out = []
    for a, i in enumerate(group):
        clearly_before = possibly_before = 0
        for b, other in enumerate(keys):
            if b != a:
                clearly_before += keys[a] - other > tolerance
                possibly_before += other - keys[a] <= tolerance
        if clearly_before + 1 <= rank <= possibly_before + 1:
            out.append(i)
    return out


def referents(scene: Scene | Sequence[SceneObject], spec: ExpressionSpec | dict[str, Any]) -> list[int]:
    """Indices of the objects of ``scene`` that ``spec`` may refer to (a valid expression gives exactly one).

    ``scene`` may be a :class:`Scene` or a list of :class:`SceneObject` (then tolerances default to 6 px);
    ``spec`` may be an :class:`ExpressionSpec` or its ``to_dict()`` form.
    """
    if isinstance(spec, dict):
        spec = ExpressionSpec.from_dict(spec)
    if isinstance(scene, Scene):
        objects, pos_tol, size_tol = scene.objects, scene.position_tolerance, scene.size_tolerance
    else:
        objects, pos_tol, size_tol = list(scene), 6.0, 6.0
    group = [i for i, o in enumerate(objects) if spec.target.matches(o)]
    if spec.kind == "attribute":
        return group
    if spec.kind == "extreme":
        tolerance = size_tol if spec.direction in SIZE_DIRECTIONS else pos_tol
        return _ranked(objects, group, spec.direction, 1, tolerance)  # type: ignore[arg-type]
    if spec.kind == "ordinal":
        return _ranked(objects, group, spec.direction, spec.ordinal, pos_tol)  # type: ignore[arg-type]
    anchors = [j for j, o in enumerate(objects) if spec.anchor.matches(o)]  # type: ignore[union-attr]
    return [i for i in group if any(j != i and _holds(spec.relation, objects[i], objects[j]) for j in anchors)]  # type: ignore[arg-type]


def _descriptions(obj: SceneObject, *, with_size: bool = True, allow_empty: bool = False) -> list[Description]:
    """Every phrase (subset of the object's attributes) that matches ``obj``."""
    fields = ["shape", "colour", "size"] if with_size else ["shape", "colour"]
    out = []
    for r in range(0 if allow_empty else 1, len(fields) + 1):
        for subset in itertools.combinations(fields, r):
            out.append(Description(**{f: getattr(obj, f) for f in subset}))
    return out


def candidate_expressions(scene: Scene, target: int, kind: str) -> list[ExpressionSpec]:
    """Every generated expression of ``kind`` whose referent set over ``scene`` is exactly ``[target]``.

    Extremes and ordinals need a group of at least two objects; relations need a target phrase that alone
    matches several objects and an anchor phrase that names one object.
    """
    objects = scene.objects
    obj = objects[target]
    out: list[ExpressionSpec] = []
    if kind == "attribute":
        specs: Iterable[ExpressionSpec] = (ExpressionSpec("attribute", d) for d in _descriptions(obj))
        return [s for s in specs if referents(scene, s) == [target]]
    if kind in ("extreme", "ordinal"):
        for group_desc in _descriptions(obj, allow_empty=True):
            group_size = sum(1 for o in objects if group_desc.matches(o))
            if group_size < 2:
                continue
            if kind == "extreme":
                directions = POSITION_DIRECTIONS + (SIZE_DIRECTIONS if group_desc.size is None else ())
                for direction in directions:
                    spec = ExpressionSpec("extreme", group_desc, direction=direction)
                    if referents(scene, spec) == [target]:
                        out.append(spec)
            else:
                for direction in POSITION_DIRECTIONS:
                    for rank in range(2, min(3, group_size) + 1):
                        spec = ExpressionSpec("ordinal", group_desc, direction=direction, ordinal=rank)
                        if referents(scene, spec) == [target]:
                            out.append(spec)
        return out
    if kind == "relation":
        target_descs = [d for d in _descriptions(obj, with_size=False) if sum(d.matches(o) for o in objects) >= 2]
        if not target_descs:
            return out
        for j, anchor in enumerate(objects):
            if j == target:
                continue
            anchor_descs = [d for d in _descriptions(anchor) if sum(d.matches(o) for o in objects) == 1]
            if not anchor_descs:
                continue
            for relation in RELATIONS:
                if not _holds(relation, obj, anchor):
                    continue
                for t_desc in target_descs:
                    for a_desc in anchor_descs:
                        spec = ExpressionSpec("relation", t_desc, relation=relation, anchor=a_desc)
                        if referents(scene, spec) == [target]:
                            out.append(spec)
        return out
    raise ValueError(f"Unknown expression kind {kind!r}; choose from {EXPRESSION_TYPES}.")


def _split_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def generate_split(
    name: str,
    num_images: int,
    seed: int | None = None,
    config: SyntheticRECConfig | None = None,
    *,
    expressions_per_image: int = 2,
    expression_types: Sequence[str] | None = None,
    heldout: str | None = None,
) -> list[RECSample]:
    """Generate ``num_images`` scenes and up to ``expressions_per_image`` unique expressions for each.

    Args:
        name: the split name; a name of :data:`SPLITS` picks its expression types and held-out policy, any
            other name needs ``expression_types`` (and uses ``heldout="exclude"`` unless told).
        num_images: number of images (scenes) in the split.
        seed: the split's seed (``config.seed`` when ``None``); the name is mixed in, so splits differ.
        config: scene look (defaults to :class:`SyntheticRECConfig()`).
        expressions_per_image: expressions drawn per image (distinct targets first, then distinct phrases).
        expression_types: override the split's expression types (subset of :data:`EXPRESSION_TYPES`).
        heldout: ``"exclude"`` (no target is a held-out pair and no phrase names one), ``"only"`` (targets are
            held-out pairs, named by colour and shape) or ``"ignore"``.

    Returns:
        ``RECSample``s whose ``image`` is a PIL image (shared by the expressions of one scene), ``box`` the
        tight ``xyxy`` pixel box and ``metadata`` holds ``split``, ``expression_type``, ``target`` (shape,
        colour, size), ``target_index``, ``heldout_target``, ``spec`` and ``scene`` (see :func:`referents`).
    """
    config = config or SyntheticRECConfig()
    seed = _whole("generate_split(seed=...)", config.seed if seed is None else seed, 0)
    num_images = _whole("generate_split(num_images=...)", num_images, 0)
    expressions_per_image = _whole("generate_split(expressions_per_image=...)", expressions_per_image, 1)
    recipe = SPLITS.get(name, {})
    types = tuple(expression_types or recipe.get("types", ()))
    if not types:
        raise ValueError(
            f"Split {name!r} is not one of {tuple(SPLITS)}: pass expression_types=... (from {EXPRESSION_TYPES})."
        )
    for kind in types:
        if kind not in EXPRESSION_TYPES:
            raise ValueError(f"Unknown expression type {kind!r}; choose from {EXPRESSION_TYPES}.")
    heldout = heldout or recipe.get("heldout", "exclude")
    if heldout not in ("exclude", "only", "ignore"):
        raise ValueError(f"heldout must be 'exclude', 'only' or 'ignore', got {heldout!r}.")
    heldout_pairs = set(config.heldout_pairs or ())
    if heldout == "only" and not heldout_pairs:
        raise ValueError("heldout='only' needs config.heldout_pairs to be non-empty.")
    ordered_heldout = sorted(heldout_pairs)
    # a split that keeps held-out targets out keeps their objects out of its images too, unless told otherwise
    excluded = heldout_pairs if heldout == "exclude" and not config.heldout_distractors else set()

    rng = _split_rng(seed, name)
    samples: list[RECSample] = []
    failures = 0
    image_index = 0
    while image_index < num_images:
        required = ordered_heldout[int(rng.integers(len(ordered_heldout)))] if heldout == "only" else None
        scene = generate_scene(rng, config, required_pair=required, excluded_pairs=excluded)

        def allowed(target: int, spec: ExpressionSpec, scene: Scene = scene) -> bool:
            pair = (scene.objects[target].shape, scene.objects[target].colour)
            if heldout == "exclude":
                return pair not in heldout_pairs and not any(p in heldout_pairs for p in spec.pairs_named())
            if heldout == "only":
                return pair in heldout_pairs and spec.target.pair() == pair
            return True

        pools: dict[tuple[str, int], list[ExpressionSpec]] = {}
        for kind in types:
            for target in range(len(scene.objects)):
                pair = (scene.objects[target].shape, scene.objects[target].colour)
                if (heldout == "exclude" and pair in heldout_pairs) or (heldout == "only" and pair not in heldout_pairs):
                    continue
                specs = [s for s in candidate_expressions(scene, target, kind) if allowed(target, s)]
                if specs:
                    pools[(kind, target)] = specs
        if not pools:
            failures += 1
            if failures > 50 * max(num_images, 1) + 100:
                raise RuntimeError(
                    f"Split {name!r}: too many scenes without a valid {types} expression; use more objects, more "
                    "shapes/colours or fewer held-out pairs."
                )
            continue

        image_id = f"{name}-{image_index:06d}"
        chosen: list[tuple[str, int, ExpressionSpec]] = []
        used_targets: set[int] = set()
        while len(chosen) < expressions_per_image and pools:
            kinds = sorted({k for k, _ in pools})
            kind = kinds[int(rng.integers(len(kinds)))]
            targets = sorted(t for k, t in pools if k == kind)
            fresh = [t for t in targets if t not in used_targets]
            target_choices = fresh or targets
            target = target_choices[int(rng.integers(len(target_choices)))]
            specs = pools[(kind, target)]
            spec = specs.pop(int(rng.integers(len(specs))))
            if not specs:
                del pools[(kind, target)]
            if referents(scene, spec) != [target]:  # pragma: no cover - guaranteed by candidate_expressions
                raise AssertionError(f"generated a non-unique expression {spec.text()!r}")
            chosen.append((kind, target, spec))
            used_targets.add(target)

        scene_dict = scene.to_dict()
        for kind, target, spec in chosen:
            obj = scene.objects[target]
            samples.append(
                RECSample(
                    image=scene.image,  # type: ignore[arg-type]
                    expression=spec.text(),
                    box=tuple(float(v) for v in obj.box),  # type: ignore[arg-type]
                    image_id=image_id,
                    metadata={
                        "split": name,
                        "expression_type": kind,
                        "target": {"shape": obj.shape, "colour": obj.colour, "size": obj.size},
                        "target_index": target,
                        "heldout_target": (obj.shape, obj.colour) in heldout_pairs,
                        "spec": spec.to_dict(),
                        "scene": scene_dict,
                    },
                )
            )
        image_index += 1
    return samples


def make_benchmark(
    root: str | Path | None = None,
    sizes: dict[str, int] | None = None,
    seed: int | None = None,
    config: SyntheticRECConfig | None = None,
    *,
    expressions_per_image: int = 2,
) -> dict[str, list[RECSample]]:
    """Build every split of the procedural benchmark; optionally write it to ``root``.

    Args:
        root: if given, each split is exported with :func:`export_jsonl` to ``root/<split>/`` (PNG images plus
            ``annotations.jsonl``) and ``root/benchmark.json`` records the config, seed and sizes.
        sizes: images per split (keys from :data:`SPLITS`; missing keys use :data:`DEFAULT_SIZES`; 0 skips).
        seed: base seed (``config.seed`` when ``None``); each split mixes in its name.
        config: scene look (defaults to :class:`SyntheticRECConfig()`).
        expressions_per_image: expressions per image in every split.

    Returns:
        ``{split: [RECSample, ...]}`` with in-memory PIL images.
    """
    config = config or SyntheticRECConfig()
    seed = _whole("make_benchmark(seed=...)", config.seed if seed is None else seed, 0)
    expressions_per_image = _whole("make_benchmark(expressions_per_image=...)", expressions_per_image, 1)
    unknown = set(sizes or {}) - set(SPLITS)
    if unknown:
        raise ValueError(f"Unknown split(s) {sorted(unknown)}; the benchmark's splits are {tuple(SPLITS)}.")
    resolved = {
        name: _whole(f"make_benchmark(sizes={{{name!r}: ...}})", count, 0)
        for name, count in {**DEFAULT_SIZES, **(sizes or {})}.items()
    }
    if root is not None:  # checked before the scenes are drawn
        stale = [name for name, count in resolved.items() if count == 0 and (Path(root) / name / "annotations.jsonl").exists()]
        if stale:
            raise ValueError(f"{Path(root) / stale[0]} holds an earlier export of the split {stale[0]!r}, which "
                             f"sizes={{{stale[0]!r}: 0}} skips: it would stay beside a benchmark.json that does not "
                             "describe it. Remove that folder, or export to an empty root.")
    splits = {
        name: generate_split(name, count, seed, config, expressions_per_image=expressions_per_image)
        for name, count in resolved.items()
        if count > 0
    }
    if root is not None:
        from .outputs import write_json

        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for name, samples in splits.items():
            export_jsonl(samples, root / name)
        manifest = {
            "seed": seed,
            "sizes": resolved,
            "expressions_per_image": expressions_per_image,
            "config": config.to_dict(),
            "splits": {name: {"images": resolved[name], "expressions": len(s)} for name, s in splits.items()},
            "box_format": "xyxy",
        }
        write_json(root / "benchmark.json", manifest)
    return splits


# ---------------------------------------------------------------------------------------------------------------
# export


def _image_key(sample: RECSample, index: int) -> str:
    key = str(sample.image_id) if sample.image_id is not None else f"image-{index:06d}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
    return safe or f"image-{index:06d}"


def _same_image(a: Any, b: Any) -> bool:
    """Whether two sample images hold the same picture (the same object, file or pixels)."""
    if a is b:
        return True
    if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
        return Path(a).resolve() == Path(b).resolve()
    if isinstance(a, (str, Path)) or isinstance(b, (str, Path)):
        return False
    from m2ist.data.images import DeferredImage, load_image

    a_pixels, b_pixels = (np.asarray(load_image(x) if isinstance(x, DeferredImage) else x) for x in (a, b))
    return np.array_equal(a_pixels, b_pixels)


def export_jsonl(samples: Sequence[RECSample], directory: str | Path, filename: str = "annotations.jsonl") -> Path:
    """Write ``samples`` as PNG images plus a JSONL index that ``m2ist.data.load_jsonl`` reads.

    Images go to ``directory/images/<image_id>.png`` (written once per image id; ids that give the same file name
    once made safe, such as ``a/b`` and ``a_b``, get a ``-2``, ``-3``... suffix); each JSONL row holds ``image``
    (path relative to ``directory``), ``text``, ``bbox`` (``xyxy`` pixels), ``box_format: "xyxy"``, ``image_id``
    and ``metadata``. Load it back with ``load_jsonl(path, box_format="xyxy", image_root=directory)``.

    Every row is checked before anything is written (an image of an unknown type, metadata that is not JSON, two
    different images under one ``image_id`` are refused, naming the sample), and the JSONL file is swapped in
    whole, so a failed export never leaves a half-written index.

    Returns:
        The path of the JSONL file.
    """
    from m2ist.data.images import DeferredImage, load_image
    from m2ist.save_and_load import atomic_write

    directory = Path(directory)
    by_id: dict[tuple[str, Any], tuple[int, str]] = {}  # image id -> (first sample, relative path)
    taken: set[str] = set()
    to_write: list[tuple[int, str]] = []
    lines = []
    for index, sample in enumerate(samples):
        image = sample.image
        if not isinstance(image, (str, Path, Image.Image, np.ndarray, DeferredImage)):
            raise TypeError(
                f"Sample {index} has an image of type {type(image).__name__}; expected a PIL image, an array or a "
                "path."
            )
        ident = (type(sample.image_id).__name__, sample.image_id) if sample.image_id is not None else ("", index)
        if ident in by_id:
            first, relative = by_id[ident]
            if not _same_image(samples[first].image, image):
                raise ValueError(
                    f"Samples {first} and {index} have the same image_id {sample.image_id!r} but different images: "
                    "give each image its own image_id (the export writes one image file per id)."
                )
        else:
            key = _image_key(sample, index)
            suffix = (Path(image).suffix or ".png") if isinstance(image, (str, Path)) else ".png"
            stem, count = key, 1
            while f"{stem}{suffix}".lower() in taken:  # lower case: one file on case-insensitive file systems too
                count += 1
                stem = f"{key}-{count}"
            taken.add(f"{stem}{suffix}".lower())
            relative = f"images/{stem}{suffix}"
            by_id[ident] = (index, relative)
            to_write.append((index, relative))
        row = {
            "image": relative,
            "text": sample.expression,
            "bbox": [float(v) for v in sample.box],
            "box_format": "xyxy",
            "image_id": sample.image_id,
            "metadata": sample.metadata,
        }
        try:
            lines.append(json.dumps(row) + "\n")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Sample {index} (image_id {sample.image_id!r}) cannot be written as JSON ({error}): its image_id "
                "and metadata must hold only strings, numbers, booleans, None, lists and dicts."
            ) from error
    image_dir = directory / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for index, relative in to_write:
        image = samples[index].image
        if isinstance(image, (str, Path)):
            shutil.copyfile(image, directory / relative)
        else:
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            elif isinstance(image, DeferredImage):
                image = load_image(image)
            image.save(directory / relative, format="PNG")
    path = directory / filename
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(lines), encoding="utf-8"))
    return path


def to_records(samples: Sequence[RECSample]) -> list[dict[str, Any]]:
    """Plain rows (one per expression) usable without extra packages, e.g. for pandas or ``datasets``.

    Columns: ``image`` (as stored in the sample, usually PIL), ``image_id``, ``text``, ``bbox`` (``xyxy``
    pixels), ``box_format``, ``split``, ``expression_type``, ``target_shape``, ``target_colour``,
    ``target_size`` and ``spec`` (a JSON string).
    """
    rows = []
    for sample in samples:
        meta = sample.metadata or {}
        target = meta.get("target", {})
        rows.append(
            {
                "image": sample.image,
                "image_id": None if sample.image_id is None else str(sample.image_id),
                "text": sample.expression,
                "bbox": [float(v) for v in sample.box],
                "box_format": "xyxy",
                "split": meta.get("split"),
                "expression_type": meta.get("expression_type"),
                "target_shape": target.get("shape"),
                "target_colour": target.get("colour"),
                "target_size": target.get("size"),
                "spec": json.dumps(meta.get("spec")),
            }
        )
    return rows


def to_hf_dataset(samples: Sequence[RECSample]) -> Any:
    """The samples as a ``datasets.Dataset`` (images as an ``Image`` feature); needs ``pip install datasets``."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "to_hf_dataset needs the Hugging Face `datasets` package: run `pip install datasets` "
            "(or `pip install m2ist[datasets]`), or use to_records(samples) for plain rows."
        ) from error
    rows = to_records(samples)
    for row in rows:
        if isinstance(row["image"], np.ndarray):
            row["image"] = Image.fromarray(row["image"])
        elif isinstance(row["image"], Path):
            row["image"] = str(row["image"])
    string = datasets.Value("string")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": string,
            "text": string,
            "bbox": datasets.Sequence(datasets.Value("float32"), length=4),
            "box_format": string,
            "split": string,
            "expression_type": string,
            "target_shape": string,
            "target_colour": string,
            "target_size": string,
            "spec": string,
        }
    )
    return datasets.Dataset.from_list(rows, features=features)


__all__ = [
    "COLOURS",
    "DEFAULT_SIZES",
    "EXPRESSION_TYPES",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "Description",
    "ExpressionSpec",
    "Scene",
    "SceneObject",
    "SyntheticRECConfig",
    "candidate_expressions",
    "default_heldout_pairs",
    "export_jsonl",
    "generate_scene",
    "generate_split",
    "make_benchmark",
    "referents",
    "to_hf_dataset",
    "to_records",
]
