"""TransVG training augmentations: image, box and phrase must always stay consistent."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import BertTokenizer

from m2ist.data import transforms as transforms_module
from m2ist.data.transforms import (
    LOCATION_WORDS,
    TRANSVG_RESIZE_CHOICES,
    RECAugmentation,
    has_location_word,
    reads_english,
    resize_long_side,
    swap_left_right,
)
from m2ist.processing import RECProcessor

BACKGROUND = (0, 0, 255)
BOX_COLOUR = (255, 0, 0)
WORDS = ["the", "man", "woman", "on", "left", "right", "red", "shirt", "top", "bright", "leftmost", "dog"]
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizer:
    vocab = Path(tmp_path_factory.mktemp("vocab")) / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizer(str(vocab))


def painted_image(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    """A ``BACKGROUND`` image with the pixels of ``box`` painted ``BOX_COLOUR``."""
    array = np.empty((height, width, 3), dtype=np.uint8)
    array[:] = BACKGROUND
    array[box[1] : box[3], box[0] : box[2]] = BOX_COLOUR
    return Image.fromarray(array)


def mask_bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """Pixel-edge bounding box ``(x0, y0, x1, y1)`` of the nonzero entries of a 2-D mask."""
    rows = torch.nonzero(mask.any(dim=1)).flatten()
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


@st.composite
def image_and_box(draw: st.DrawFn, min_box: int = 6) -> tuple[int, int, tuple[int, int, int, int]]:
    width = draw(st.integers(min_box, 48))
    height = draw(st.integers(min_box, 48))
    x0 = draw(st.integers(0, width - min_box))
    y0 = draw(st.integers(0, height - min_box))
    x1 = draw(st.integers(x0 + min_box, width))
    y1 = draw(st.integers(y0 + min_box, height))
    return width, height, (x0, y0, x1, y1)


phrases = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


# ------------------------------------------------------------------------------------------------ text
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the man on the left", "the man on the right"),
        ("Right guy", "Left guy"),
        ("LEFT", "RIGHT"),
        ("leftmost cup, rightmost plate", "rightmost cup, leftmost plate"),
        ("left-hand side", "right-hand side"),
        ("bright light, copyright, leftover", "bright light, copyright, leftover"),
        ("no location here", "no location here"),
    ],
)
def test_swap_left_right_swaps_whole_words_and_keeps_case(text: str, expected: str) -> None:
    assert swap_left_right(text) == expected


@given(
    words=st.lists(
        st.sampled_from(WORDS).flatmap(lambda w: st.sampled_from([w, w.upper(), w.title()])), min_size=0, max_size=8
    ),
    separator=st.sampled_from([" ", ", ", "  "]),
)
@settings(max_examples=50, deadline=None)
def test_swap_left_right_is_an_involution_that_touches_only_left_right(words: list[str], separator: str) -> None:
    text = separator.join(words)
    swapped = swap_left_right(text)
    assert swap_left_right(swapped) == text
    pairs = {"left": "right", "right": "left", "leftmost": "rightmost", "rightmost": "leftmost"}
    for before, after in zip(text.split(separator), swapped.split(separator)):
        assert after.lower() == pairs.get(before.lower(), before.lower())


def test_location_words_are_whole_word_and_case_insensitive() -> None:
    assert {"left", "right", "top", "bottom", "middle", "above", "below"} <= LOCATION_WORDS
    assert has_location_word("the man on the LEFT")
    assert has_location_word("Top shelf")
    assert not has_location_word("a bright shirt")
    assert not has_location_word("leftover pizza")


# ------------------------------------------------------------------------------------------------ config
def test_defaults_follow_transvg() -> None:
    aug = RECAugmentation()
    assert (aug.random_resize, aug.random_crop, aug.color_jitter, aug.hflip, aug.random_placement) == (True,) * 5
    assert (aug.crop_p, aug.jitter_p, aug.hflip_p, aug.jitter) == (0.5, 0.8, 0.5, (0.6, 1.4))
    assert aug.long_side_choices(640) == TRANSVG_RESIZE_CHOICES == (448, 480, 512, 544, 576, 608, 640)
    assert aug.long_side_choices(320) == (224, 240, 256, 272, 288, 304, 320)


def test_config_round_trip_and_validation() -> None:
    aug = RECAugmentation(crop_p=0.25, jitter=(0.8, 1.2), resize_choices=range(100, 201, 50), seed=3)
    restored = RECAugmentation.from_dict(aug.to_dict())
    assert restored == aug
    assert restored.resize_choices == (100, 150, 200)
    with pytest.raises(ValueError, match="crop_p"):
        RECAugmentation(crop_p=1.5)
    with pytest.raises(ValueError, match="jitter"):
        RECAugmentation(jitter=(1.4, 0.6))
    with pytest.raises(ValueError, match="resize_choices"):
        RECAugmentation(resize_choices=[])
    with pytest.raises(ValueError, match="Unknown RECAugmentation options"):
        RECAugmentation.from_dict({"flip": True})


def test_resize_long_side_keeps_aspect_and_reports_exact_scales() -> None:
    resized, scale_x, scale_y = resize_long_side(Image.new("RGB", (300, 101)), 64)
    assert resized.size == (64, 22)
    assert scale_x == 64 / 300 and scale_y == 22 / 101


# ------------------------------------------------------------------------------------------------ properties
@given(
    sample=image_and_box(),
    canvas=st.integers(32, 96),
    text=phrases,
    seed=st.integers(0, 2**31),
    crop_p=st.sampled_from([0.0, 0.5, 1.0]),
    hflip_p=st.sampled_from([0.0, 0.5, 1.0]),
    random_resize=st.booleans(),
    random_placement=st.booleans(),
)
@PROPERTY_SETTINGS
def test_augmented_box_covers_exactly_the_painted_region(
    tokenizer: BertTokenizer,
    sample: tuple[int, int, tuple[int, int, int, int]],
    canvas: int,
    text: str,
    seed: int,
    crop_p: float,
    hflip_p: float,
    random_resize: bool,
    random_placement: bool,
) -> None:
    width, height, box = sample
    aug = RECAugmentation(
        random_resize=random_resize,
        crop_p=crop_p,
        color_jitter=False,
        hflip_p=hflip_p,
        random_placement=random_placement,
    )
    processor = RECProcessor(tokenizer, canvas_size=canvas, max_query_len=12, augment=aug)
    image = painted_image(width, height, box)
    details = aug(image, text, box, canvas, rng=random.Random(seed))
    out = processor([image], [text], boxes=[box], train=True, rng=random.Random(seed))

    labels, mask = out["labels"][0], out["pixel_mask"][0]
    label_box = (labels[0] - labels[2] / 2, labels[1] - labels[3] / 2, labels[0] + labels[2] / 2)
    label_box = torch.stack([*label_box, labels[1] + labels[3] / 2]) * canvas

    # the painted region, seen through the augmentation, is where the label says
    rgb = processor.denormalize(out["pixel_values"][0])
    painted = (rgb[0] > 0.5) & (rgb[2] < 0.5) & mask.bool()
    assert painted.any()
    assert torch.allclose(label_box, torch.tensor(mask_bbox(painted), dtype=label_box.dtype), atol=1.5)
    offset_x, offset_y = details.offset
    canvas_box = torch.tensor(details.box_xyxy, dtype=label_box.dtype) + torch.tensor([offset_x, offset_y] * 2)
    assert torch.allclose(canvas_box, label_box, atol=1e-3)

    # the box stays on the real image, whose size and place on the canvas match the augmented sample
    image_x0, image_y0, image_x1, image_y1 = mask_bbox(mask)
    assert (image_x0, image_y0) == details.offset
    assert (image_x1 - image_x0, image_y1 - image_y0) == details.image.size
    assert int(mask.sum()) == details.image.width * details.image.height
    assert image_x0 - 1e-3 <= label_box[0] and label_box[2] <= image_x1 + 1e-3
    assert image_y0 - 1e-3 <= label_box[1] and label_box[3] <= image_y1 + 1e-3
    assert max(details.image.size) <= canvas

    # the geometry maps the prediction back to the original box, whatever was applied
    back = processor.post_process_boxes(out["labels"], out["image_geometry"])[0]
    assert torch.allclose(back, torch.tensor(box, dtype=back.dtype), atol=1e-3)

    # the phrase follows the flip, and location phrases are never cropped
    assert details.text == (swap_left_right(text) if details.flipped else text)
    expected_ids = tokenizer(details.text.lower(), padding="max_length", max_length=12, truncation=True)["input_ids"]
    assert out["input_ids"][0].tolist() == expected_ids
    if has_location_word(text) or crop_p == 0.0:
        assert details.crop_box is None
    if details.crop_box is not None:
        cx0, cy0, cx1, cy1 = details.crop_box
        assert cx0 <= box[0] and cy0 <= box[1] and box[2] <= cx1 and box[3] <= cy1
        assert cx1 - cx0 >= aug.crop_min_fraction * width - 1 and cy1 - cy0 >= aug.crop_min_fraction * height - 1


@given(sample=image_and_box(min_box=1), canvas=st.integers(16, 64), seed=st.integers(0, 2**31))
@PROPERTY_SETTINGS
def test_crop_contains_box_even_for_fractional_boxes(
    sample: tuple[int, int, tuple[int, int, int, int]], canvas: int, seed: int
) -> None:
    width, height, (x0, y0, x1, y1) = sample
    box = (x0 + 0.3, y0 + 0.6, max(x0 + 0.5, x1 - 0.2), max(y0 + 0.7, y1 - 0.4))
    aug = RECAugmentation(crop_p=1.0, crop_min_fraction=0.2, color_jitter=False, hflip=False)
    result = aug(Image.new("RGB", (width, height)), "a dog", box, canvas, rng=random.Random(seed))
    assert result.crop_box is not None
    cx0, cy0, cx1, cy1 = result.crop_box
    assert 0 <= cx0 <= box[0] and 0 <= cy0 <= box[1] and box[2] <= cx1 <= width and box[3] <= cy1 <= height
    rx0, ry0, rx1, ry1 = result.box_xyxy
    assert -1e-6 <= rx0 <= rx1 <= result.image.width + 1e-6
    assert -1e-6 <= ry0 <= ry1 <= result.image.height + 1e-6


# ------------------------------------------------------------------------------------------------ behaviour
def test_everything_off_equals_the_test_time_transform(tokenizer: BertTokenizer) -> None:
    off = RECAugmentation(
        random_resize=False, random_crop=False, color_jitter=False, hflip=False, random_placement=False
    )
    processor = RECProcessor(tokenizer, canvas_size=48, max_query_len=8, augment=off)
    image = painted_image(40, 25, (3, 4, 20, 17))
    train = processor([image], ["the left man"], boxes=[(3, 4, 20, 17)], train=True)
    test = processor([image], ["the left man"], boxes=[(3, 4, 20, 17)], train=False)
    for key in test:
        assert torch.equal(train[key], test[key]), key


def test_color_jitter_changes_colours_but_not_geometry(tokenizer: BertTokenizer) -> None:
    jitter_only = RECAugmentation(
        random_resize=False, random_crop=False, jitter_p=1.0, hflip=False, random_placement=False
    )
    processor = RECProcessor(tokenizer, canvas_size=32, max_query_len=8, augment=jitter_only)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    details = jitter_only(image, "dog", (1, 1, 9, 9), 32, rng=random.Random(5))
    assert details.jitter_factors is not None and set(details.jitter_factors) == {"brightness", "contrast", "saturation"}
    assert all(0.6 <= factor <= 1.4 for factor in details.jitter_factors.values())
    train = processor([image], ["dog"], boxes=[(1, 1, 9, 9)], train=True, rng=random.Random(5))
    test = processor([image], ["dog"], boxes=[(1, 1, 9, 9)])
    assert torch.equal(train["labels"], test["labels"]) and torch.equal(train["pixel_mask"], test["pixel_mask"])
    assert not torch.allclose(train["pixel_values"], test["pixel_values"])


def test_same_seed_same_batch_different_seed_different_batch(tokenizer: BertTokenizer) -> None:
    image = painted_image(30, 20, (2, 3, 15, 12))

    def run(seed: int) -> dict[str, torch.Tensor]:
        processor = RECProcessor(tokenizer, canvas_size=32, max_query_len=8, augment=RECAugmentation(seed=seed))
        return processor([image] * 4, ["the man on the left", "a dog", "red shirt", "man"], [(2, 3, 15, 12)] * 4, True)

    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_torch_generator_makes_a_sample_reproducible() -> None:
    aug = RECAugmentation()
    image = Image.new("RGB", (40, 30))

    def draw(seed: int) -> tuple:
        result = aug(image, "a dog", (5, 5, 20, 20), 64, rng=torch.Generator().manual_seed(seed))
        return result.crop_box, result.flipped, result.offset, result.image.size, result.jitter_factors

    assert draw(3) == draw(3)
    assert len({repr(draw(seed)) for seed in range(5)}) > 1


def test_each_step_fires_at_its_probability() -> None:
    aug = RECAugmentation(crop_p=0.5, jitter_p=0.8, hflip_p=0.5, seed=0)
    image = Image.new("RGB", (12, 10))
    results = [aug(image, "a dog", (2, 2, 6, 6), 16) for _ in range(400)]
    assert abs(np.mean([r.crop_box is not None for r in results]) - 0.5) < 0.1
    assert abs(np.mean([r.jitter_factors is not None for r in results]) - 0.8) < 0.1
    assert abs(np.mean([r.flipped for r in results]) - 0.5) < 0.1
    assert {max(r.image.size) for r in results} == set(aug.long_side_choices(16))


@pytest.mark.parametrize("phrase", ["左边的狗", "le chien à gauche", "собака слева", "الكلب على اليسار"])
def test_a_phrase_the_english_word_lists_cannot_read_is_never_cropped_or_flipped(phrase: str) -> None:
    """The crop spares phrases with location words and the flip swaps "left"/"right": both read English, so a
    phrase with other letters keeps its geometry (a flipped image under an unswapped "gauche" would be wrong)."""
    aug = RECAugmentation(crop_p=1.0, hflip_p=1.0, seed=0)
    image = Image.new("RGB", (12, 10))
    english = aug(image, "a dog", (2, 2, 6, 6), 16)
    assert english.flipped and english.crop_box is not None
    other = aug(image, phrase, (2, 2, 6, 6), 16)
    assert not reads_english(phrase) and not other.flipped and other.crop_box is None and other.text == phrase
    assert reads_english("the dog, 2nd from the LEFT!")  # digits and punctuation are not letters


def test_dataloader_workers_get_different_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forked workers inherit one generator state; each must re-seed from its own worker seed."""
    image = Image.new("RGB", (40, 30))

    def draws_in_worker(aug: RECAugmentation, worker_seed: int) -> list[tuple]:
        info = type("WorkerInfo", (), {"seed": worker_seed, "id": 0})()
        monkeypatch.setattr(transforms_module.torch.utils.data, "get_worker_info", lambda: info)
        results = [aug(image, "a dog", (5, 5, 20, 20), 64) for _ in range(5)]
        return [(r.crop_box, r.flipped, r.offset, r.image.size) for r in results]

    worker_a = draws_in_worker(RECAugmentation(seed=7), worker_seed=100)
    worker_b = draws_in_worker(RECAugmentation(seed=7), worker_seed=101)
    worker_a_again = draws_in_worker(RECAugmentation(seed=7), worker_seed=100)
    assert worker_a != worker_b
    assert worker_a == worker_a_again


def test_bad_inputs_raise_clear_errors() -> None:
    aug = RECAugmentation()
    with pytest.raises(TypeError, match="PIL image"):
        aug(np.zeros((4, 4, 3), dtype=np.uint8), "dog", (0, 0, 1, 1), 16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="4 numbers"):
        aug(Image.new("RGB", (4, 4)), "dog", (0, 0, 1), 16)
    with pytest.raises(TypeError, match="rng"):
        aug(Image.new("RGB", (4, 4)), "dog", (0, 0, 1, 1), 16, rng=3)  # type: ignore[arg-type]
