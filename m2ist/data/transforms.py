"""TransVG-style training augmentations for referring expression comprehension.

Every augmentation acts on the image, the box and (for the flip) the phrase together, so the three always stay
consistent. The pipeline, in order (each step a flag of :class:`RECAugmentation`, defaults as in TransVG):

1. random size crop (probability ``crop_p``), skipped when the phrase contains a location word
   (:data:`LOCATION_WORDS`), because cropping changes what "left" or "top" refers to; the crop always keeps
   the whole box;
2. resize so that the long side is a random choice of ``resize_choices`` (448..640 step 32 at a 640 canvas,
   scaled to other canvas sizes), or the canvas size when ``random_resize`` is off;
3. colour jitter (probability ``jitter_p``) of brightness, contrast and saturation, factors in ``jitter``;
4. horizontal flip (probability ``hflip_p``) of image and box, swapping "left" <-> "right" in the phrase;
5. random placement of the resized image on the square canvas (the processor pads; test time centres it).

The crop and the flip read English (the location words, the left/right swap): a phrase with letters outside ASCII
(another script, accented words) is never cropped or flipped (:func:`reads_english`). For a dataset in another
language written in ASCII letters, turn both off (``random_crop=False, hflip=False``).

The geometry of each sample is kept as a per-axis affine map from original-image pixels to canvas pixels
(``canvas = original * scale + offset``; a flip makes ``scale_x`` negative), so predicted boxes can always be
mapped back to the original image.
"""

from __future__ import annotations

import math
import numbers
import os
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from PIL import Image, ImageEnhance

from m2ist.config import is_flag, is_whole_number

__all__ = [
    "LOCATION_WORDS",
    "TRANSVG_RESIZE_CHOICES",
    "AugmentedSample",
    "RECAugmentation",
    "has_location_word",
    "reads_english",
    "resize_long_side",
    "swap_left_right",
]

#: Long-side sizes TransVG samples from during training, for a 640x640 canvas.
TRANSVG_RESIZE_CHOICES: tuple[int, ...] = tuple(range(448, 641, 32))

#: Words that make a phrase depend on where things are in the frame; a random crop could change their meaning,
#: so phrases containing any of them (as a whole word, any case) are never cropped.
LOCATION_WORDS: frozenset[str] = frozenset(
    {
        "left",
        "right",
        "leftmost",
        "rightmost",
        "top",
        "bottom",
        "topmost",
        "bottommost",
        "middle",
        "center",
        "centre",
        "central",
        "above",
        "below",
        "under",
        "upper",
        "lower",
        "side",
        "corner",
        "edge",
        "front",
        "behind",
        "back",
        "far",
        "farthest",
        "furthest",
        "near",
        "nearest",
        "closest",
    }
)

_WORD_PATTERN = re.compile(r"[A-Za-z]+")
# A word is a run of ASCII letters (digits, "_" and "-" end it, as in _WORD_PATTERN). left/right count as a whole
# word, or inside one with a prefix and suffix from these short lists ("topleft", "rightmost", "lefthand"):
# "bright", "leftover", "copyright" and "lefty" are left alone.
_LEFT_RIGHT_PATTERN = re.compile(
    r"(?<![A-Za-z])(top|bottom|upper|lower|far)?(left|right)(most|hand|side|wards?)?(?![A-Za-z])", re.IGNORECASE
)
_LEFT_RIGHT_SWAP = {"left": "right", "right": "left"}


def reads_english(text: str) -> bool:
    """Whether every letter of ``text`` is ASCII, the script :data:`LOCATION_WORDS` and :func:`swap_left_right`
    read. A phrase with other letters (another script, accents) is never cropped or flipped: its location words
    could not be seen, nor its "left" swapped, and the image would no longer match it."""
    return all(char.isascii() for char in text if char.isalpha())


def has_location_word(text: str) -> bool:
    """Whether ``text`` contains one of :data:`LOCATION_WORDS`, or a left/right word :func:`swap_left_right` swaps,
    as a whole word (case-insensitive)."""
    return any(word.lower() in LOCATION_WORDS or _LEFT_RIGHT_PATTERN.fullmatch(word) for word in _WORD_PATTERN.findall(text))


def _copy_case(source: str, target: str) -> str:
    """Give ``target`` the letter case of ``source`` character by character (extra characters follow the last)."""
    cased = []
    for position, char in enumerate(target):
        reference = source[min(position, len(source) - 1)]
        cased.append(char.upper() if reference.isupper() else char.lower())
    return "".join(cased)


def swap_left_right(text: str) -> str:
    """Swap left<->right in every word that is left/right, optionally with a prefix ``top``, ``bottom``,
    ``upper``, ``lower``, ``far`` and a suffix ``most``, ``hand``, ``side``, ``ward(s)``, keeping its case.

    A word is a run of ASCII letters, so ``right2``, ``left_side`` and ``bottom-left`` are swapped too.
    ``"The Left man, LEFTMOST, topright"`` becomes ``"The Right man, RIGHTMOST, topleft"``; ``"bright"``,
    ``"leftover"`` and ``"lefty"`` are unchanged. For words written in lower case, UPPER case or Title case the
    swap is an involution (applying it twice is a no-op).
    """

    def swap(match: re.Match[str]) -> str:
        prefix, word, suffix = match.group(1) or "", match.group(2), match.group(3) or ""
        return prefix + _copy_case(word, _LEFT_RIGHT_SWAP[word.lower()]) + suffix

    return _LEFT_RIGHT_PATTERN.sub(swap, text)


def resize_long_side(image: Image.Image, long_side: int) -> tuple[Image.Image, float, float]:
    """Resize ``image`` (keeping its aspect ratio) so its longer side is ``long_side`` pixels.

    Returns the resized image and the exact per-axis scales ``new_width / width`` and ``new_height / height``
    (they differ slightly from ``long_side / max(width, height)`` because sizes are rounded to whole pixels).
    """
    if long_side < 1:
        raise ValueError(f"long_side must be a positive number of pixels, got {long_side}.")
    width, height = image.size
    factor = long_side / max(width, height)
    new_width = max(1, min(long_side, round(width * factor)))
    new_height = max(1, min(long_side, round(height * factor)))
    if (new_width, new_height) != (width, height):
        image = image.resize((new_width, new_height), Image.Resampling.BILINEAR)
    return image, new_width / width, new_height / height


@dataclass
class AugmentedSample:
    """One sample after :class:`RECAugmentation`, before normalisation and padding.

    Attributes:
        image: the resized (and possibly cropped, jittered, flipped) RGB image; both sides <= the canvas size.
        text: the phrase (left/right swapped when flipped).
        box_xyxy: the box in pixels of ``image``.
        offset: ``(x, y)`` of the image's top-left corner on the canvas.
        scale: ``(scale_x, scale_y)`` of the map original pixels -> canvas pixels (``scale_x < 0`` when flipped).
        translation: ``(offset_x, offset_y)`` of that map: ``canvas = original * scale + translation``.
        crop_box: the crop ``(x0, y0, x1, y1)`` in original pixels, or ``None`` when not cropped.
        flipped: whether the sample was mirrored horizontally.
        jitter_factors: the colour factors applied (in order), or ``None`` when not jittered.
    """

    image: Image.Image
    text: str
    box_xyxy: tuple[float, float, float, float]
    offset: tuple[int, int]
    scale: tuple[float, float]
    translation: tuple[float, float]
    crop_box: tuple[int, int, int, int] | None = None
    flipped: bool = False
    jitter_factors: dict[str, float] | None = None


_JITTER_ENHANCERS = {
    "brightness": ImageEnhance.Brightness,
    "contrast": ImageEnhance.Contrast,
    "saturation": ImageEnhance.Color,
}


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not is_flag(value)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}.")


@dataclass
class RECAugmentation:
    """TransVG's training augmentations for REC; each step is a flag with the paper's default.

    Args:
        random_resize: resize the long side to a random choice of ``resize_choices`` (else to the canvas size).
        resize_choices: long-side sizes for a canvas of ``resize_reference_size`` pixels; they are scaled to the
            processor's canvas size (448..640 step 32 at 640 -> 336..480 at 480).
        resize_reference_size: the canvas size ``resize_choices`` are given for.
        random_crop: enable the random size crop branch.
        crop_p: probability of cropping (phrases with a location word are never cropped).
        crop_min_fraction: smallest crop side as a fraction of the image side (the crop never cuts the box).
        color_jitter: enable brightness/contrast/saturation jitter.
        jitter_p: probability of jittering.
        jitter: ``(low, high)`` range of the multiplicative factors.
        hflip: enable horizontal flips (the phrase's left/right are swapped).
        hflip_p: probability of flipping.
        random_placement: place the image at a random offset on the canvas (else centred, as at test time).
        seed: seed of the augmentation's own random generator; ``None`` seeds from the OS (``RECTrainer`` gives such
            an augmentation the training seed, so runs with one seed draw the same augmentations). In DataLoader workers
            the generator is re-seeded from ``(seed, worker seed)`` so workers do not repeat each other. A call's
            ``rng`` argument, or an enclosing :meth:`seeded` block, is used instead of it (workers or not):
            ``RECTrainer`` (without workers) augments each training batch in a block seeded by ``seed`` and the
            batch's number in the run, so that a resumed run draws what the uninterrupted one drew.
    """

    random_resize: bool = True
    resize_choices: Sequence[int] = TRANSVG_RESIZE_CHOICES
    resize_reference_size: int = 640
    random_crop: bool = True
    crop_p: float = 0.5
    crop_min_fraction: float = 0.5
    color_jitter: bool = True
    jitter_p: float = 0.8
    jitter: tuple[float, float] = (0.6, 1.4)
    hflip: bool = True
    hflip_p: float = 0.5
    random_placement: bool = True
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False, compare=False)
    _worker_key: tuple[int, int] | None = field(init=False, repr=False, compare=False, default=None)
    _seeded_rng: random.Random | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        self._check_types()
        self.resize_choices = tuple(int(size) for size in self.resize_choices)
        if not self.resize_choices or min(self.resize_choices) < 1:
            raise ValueError(f"resize_choices must be a non-empty list of positive sizes, got {self.resize_choices}.")
        if self.resize_reference_size < 1:
            raise ValueError(f"resize_reference_size must be positive, got {self.resize_reference_size}.")
        self.resize_reference_size = int(self.resize_reference_size)
        for name in ("crop_p", "jitter_p", "hflip_p"):
            _check_probability(name, getattr(self, name))
        if not 0.0 < self.crop_min_fraction <= 1.0:
            raise ValueError(f"crop_min_fraction must be in (0, 1], got {self.crop_min_fraction}.")
        low, high = (float(v) for v in self.jitter)
        if not 0.0 <= low <= high:
            raise ValueError(f"jitter must be a (low, high) range with 0 <= low <= high, got {self.jitter}.")
        self.jitter = (low, high)
        self._rng = random.Random(self.seed)

    def _check_types(self) -> None:
        """Refuse a value of the wrong type, naming the field: ``hflip="false"`` (a hand-edited
        ``processor_config.json``) is true, ``seed="0"`` seeds another generator than ``seed=0``, and ``int()`` would
        read a size of ``448.9`` as 448."""
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"RECAugmentation {name} must be {expected}, got {getattr(self, name)!r}.")

        for name in ("random_resize", "random_crop", "color_jitter", "hflip", "random_placement"):
            if not is_flag(getattr(self, name)):
                fail(name, "true or false")
            setattr(self, name, bool(getattr(self, name)))  # numpy's: to_dict() must stay JSON
        for name in ("crop_p", "jitter_p", "hflip_p", "crop_min_fraction"):
            if not _is_real(getattr(self, name)):
                fail(name, "a number")
            setattr(self, name, float(getattr(self, name)))
        if not is_whole_number(self.resize_reference_size):
            fail("resize_reference_size", "a whole number of pixels")
        choices = self.resize_choices
        if isinstance(choices, str) or not isinstance(choices, Iterable) or not all(is_whole_number(v) for v in choices):
            fail("resize_choices", "a list of whole numbers of pixels")
        jitter = self.jitter
        if isinstance(jitter, str) or not isinstance(jitter, Iterable) or len(list(jitter)) != 2 \
                or not all(_is_real(v) for v in jitter):
            fail("jitter", "a (low, high) pair of numbers")
        if self.seed is not None:
            if is_flag(self.seed) or not isinstance(self.seed, numbers.Integral):
                fail("seed", "a whole number or null")
            self.seed = int(self.seed)  # numpy integers are not seeds random.Random takes

    # ------------------------------------------------------------------ randomness
    def reseed(self, seed: int | None) -> None:
        """Restart the augmentation's random generator from ``seed``."""
        self.seed = seed
        self._rng = random.Random(seed)
        self._worker_key = None

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """Inside the block, calls without ``rng`` draw from one generator seeded with ``seed``, in or out of a
        DataLoader worker; the augmentation's own generator is left untouched. For callers that cannot pass ``rng``
        down (a collator wrapping a ``RECCollator``), e.g. to make each cached view one fixed augmentation."""
        previous, self._seeded_rng = self._seeded_rng, random.Random(seed)
        try:
            yield
        finally:
            self._seeded_rng = previous

    def _resolve_rng(self, rng: random.Random | torch.Generator | None) -> random.Random:
        if isinstance(rng, random.Random):
            return rng
        if isinstance(rng, torch.Generator):
            return random.Random(int(torch.randint(0, 2**62, (1,), generator=rng)))
        if rng is not None:
            raise TypeError(f"rng must be a random.Random or a torch.Generator, got {type(rng).__name__}.")
        if self._seeded_rng is not None:
            return self._seeded_rng
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            key = (os.getpid(), worker.seed)
            if self._worker_key != key:
                # Forked workers inherit the same generator state; re-seed each from the worker seed (which changes
                # every epoch and follows torch.manual_seed) so their augmentations differ but stay reproducible.
                self._rng = random.Random(worker.seed if self.seed is None else hash((self.seed, worker.seed)))
                self._worker_key = key
        return self._rng

    # ------------------------------------------------------------------ helpers
    def long_side_choices(self, canvas_size: int) -> tuple[int, ...]:
        """The long-side sizes used for a canvas of ``canvas_size`` pixels (scaled, capped at the canvas)."""
        factor = canvas_size / self.resize_reference_size
        return tuple(sorted({min(canvas_size, max(1, round(size * factor))) for size in self.resize_choices}))

    def to_dict(self) -> dict[str, Any]:
        """The constructor arguments as a JSON-serialisable dict."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> RECAugmentation:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"Unknown RECAugmentation options {sorted(unknown)}; known options: {sorted(known)}.")
        config = dict(config)
        if "jitter" in config:
            config["jitter"] = tuple(config["jitter"])
        return cls(**config)

    @staticmethod
    def _crop_around_box(
        width: int, height: int, box: Sequence[float], min_fraction: float, rng: random.Random
    ) -> tuple[int, int, int, int]:
        """A random integer crop with sides >= ``min_fraction`` of the image that contains the whole box."""
        inner_x0 = min(max(math.floor(box[0]), 0), width)
        inner_y0 = min(max(math.floor(box[1]), 0), height)
        inner_x1 = min(max(math.ceil(box[2]), inner_x0), width)
        inner_y1 = min(max(math.ceil(box[3]), inner_y0), height)
        crop_w = rng.randint(max(inner_x1 - inner_x0, math.ceil(min_fraction * width), 1), width)
        crop_h = rng.randint(max(inner_y1 - inner_y0, math.ceil(min_fraction * height), 1), height)
        x0 = rng.randint(max(0, inner_x1 - crop_w), min(inner_x0, width - crop_w))
        y0 = rng.randint(max(0, inner_y1 - crop_h), min(inner_y0, height - crop_h))
        return x0, y0, x0 + crop_w, y0 + crop_h

    # ------------------------------------------------------------------ the transform
    def __call__(
        self,
        image: Image.Image,
        text: str,
        box_xyxy: Iterable[float],
        canvas_size: int,
        rng: random.Random | torch.Generator | None = None,
    ) -> AugmentedSample:
        """Augment one sample.

        Args:
            image: an RGB PIL image.
            text: the referring phrase.
            box_xyxy: ``(x0, y0, x1, y1)`` in pixels of ``image`` (inside the image).
            canvas_size: side of the square canvas the processor pads to.
            rng: a generator to draw from instead of the augmentation's own.
        """
        if not isinstance(image, Image.Image):
            raise TypeError(f"RECAugmentation expects a PIL image, got {type(image).__name__}.")
        if canvas_size < 1:
            raise ValueError(f"canvas_size must be a positive number of pixels, got {canvas_size}.")
        gen = self._resolve_rng(rng)
        box = [float(v) for v in box_xyxy]
        if len(box) != 4:
            raise ValueError(f"box_xyxy must have 4 numbers (x0, y0, x1, y1), got {box}.")
        image = image.convert("RGB") if image.mode != "RGB" else image

        # Draw every random decision up front, in a fixed order, so a seed fixes the whole sample.
        do_crop = self.random_crop and gen.random() < self.crop_p
        long_side = gen.choice(self.long_side_choices(canvas_size)) if self.random_resize else canvas_size
        do_jitter = self.color_jitter and gen.random() < self.jitter_p
        do_flip = self.hflip and gen.random() < self.hflip_p and reads_english(text)

        crop_box = None
        shift_x = shift_y = 0.0  # original -> current image: current = original - shift
        if do_crop and reads_english(text) and not has_location_word(text):
            crop_box = self._crop_around_box(image.width, image.height, box, self.crop_min_fraction, gen)
            image = image.crop(crop_box)
            shift_x, shift_y = float(crop_box[0]), float(crop_box[1])
            box = [box[0] - shift_x, box[1] - shift_y, box[2] - shift_x, box[3] - shift_y]

        image, scale_x, scale_y = resize_long_side(image, long_side)
        box = [box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y]

        jitter_factors = None
        if do_jitter:
            order = list(_JITTER_ENHANCERS)
            gen.shuffle(order)
            jitter_factors = {}
            for name in order:
                factor = gen.uniform(*self.jitter)
                image = _JITTER_ENHANCERS[name](image).enhance(factor)
                jitter_factors[name] = factor

        # affine map original -> resized image: x' = (x - shift) * scale
        affine_scale_x, affine_scale_y = scale_x, scale_y
        affine_shift_x, affine_shift_y = -shift_x * scale_x, -shift_y * scale_y
        if do_flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            box = [image.width - box[2], box[1], image.width - box[0], box[3]]
            text = swap_left_right(text)
            affine_scale_x, affine_shift_x = -affine_scale_x, image.width - affine_shift_x

        if self.random_placement:
            offset = (gen.randint(0, canvas_size - image.width), gen.randint(0, canvas_size - image.height))
        else:
            offset = ((canvas_size - image.width) // 2, (canvas_size - image.height) // 2)

        return AugmentedSample(
            image=image,
            text=text,
            box_xyxy=(box[0], box[1], box[2], box[3]),
            offset=offset,
            scale=(affine_scale_x, affine_scale_y),
            translation=(affine_shift_x + offset[0], affine_shift_y + offset[1]),
            crop_box=crop_box,
            flipped=do_flip,
            jitter_factors=jitter_factors,
        )
