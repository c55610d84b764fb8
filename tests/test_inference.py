"""predict_boxes / draw_boxes: pixel mapping, input forms, processor resolution, train/eval mode handling."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import BertTokenizer

from m2ist import get_side_tuned_model
from m2ist.inference import GT_COLOR, PALETTE, draw_boxes, predict_boxes
from m2ist.model import RECModelOutput
from m2ist.processing import RECProcessor
from tests.tiny import IMAGE_SIZE, QUERY_LEN, text_tower, tiny_config, vision_tower

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "red", "square", "left", "blue", "circle", "a", "dog"]


# ---------------------------------------------------------------------------------------------- shared helpers
def make_tokenizer(folder: Path) -> BertTokenizer:
    """A word-level BERT tokenizer from a vocab file written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return BertTokenizer(str(vocab))


class FixedBoxModel(nn.Module):
    """Returns the given normalised (cx, cy, w, h) boxes in order, one per sample; records how it was called."""

    def __init__(self, boxes, image_size: int = 100, max_query_len: int = QUERY_LEN) -> None:
        super().__init__()
        self.config = SimpleNamespace(image_size=image_size, max_query_len=max_query_len)
        self.boxes = torch.tensor(boxes, dtype=torch.float32)
        self.weight = nn.Parameter(torch.zeros(()))
        self.served = 0
        self.calls: list[tuple[bool, bool]] = []  # (training, grad enabled) per forward

    def forward(self, pixel_values, input_ids, attention_mask=None, pixel_mask=None, labels=None):
        self.calls.append((self.training, torch.is_grad_enabled()))
        count = pixel_values.shape[0]
        boxes = self.boxes[self.served : self.served + count]
        self.served += count
        return RECModelOutput(pred_boxes=boxes + 0 * self.weight)


@pytest.fixture
def tokenizer(tmp_path) -> BertTokenizer:
    return make_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def tiny_model():
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())


def random_image(width: int = 60, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- predict_boxes
def test_boxes_are_mapped_to_original_image_pixels(tokenizer):
    # 200x100 image on a 100 canvas: scale 0.5, pasted at y offset 25. Canvas box (25, 37.5, 75, 62.5).
    model = FixedBoxModel([[0.5, 0.5, 0.5, 0.25]])
    processor = RECProcessor(tokenizer, canvas_size=100, max_query_len=QUERY_LEN)
    boxes = predict_boxes(model, Image.new("RGB", (200, 100)), "the dog", processor=processor)
    assert boxes.dtype == torch.float32 and boxes.shape == (1, 4)
    torch.testing.assert_close(boxes, torch.tensor([[50.0, 25.0, 150.0, 75.0]]))


def test_predictions_are_clipped_to_the_image(tokenizer):
    model = FixedBoxModel([[0.5, 0.5, 1.0, 1.0]])  # the whole canvas, padding included
    processor = RECProcessor(tokenizer, canvas_size=100, max_query_len=QUERY_LEN)
    boxes = predict_boxes(model, Image.new("RGB", (200, 100)), "the dog", processor=processor)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 200.0, 100.0]]))


def test_input_forms_and_broadcasting(tiny_model, tokenizer, tmp_path):
    processor = RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)
    image = random_image()
    path = tmp_path / "image.png"
    image.save(path)
    from_pil = predict_boxes(tiny_model, image, "the red square", processor=processor)
    from_path = predict_boxes(tiny_model, str(path), "the red square", processor=processor)
    from_array = predict_boxes(tiny_model, np.asarray(image), "the red square", processor=processor)
    torch.testing.assert_close(from_path, from_pil)
    torch.testing.assert_close(from_array, from_pil)

    phrases = ["the red square", "a blue circle", "the dog"]
    one_image = predict_boxes(tiny_model, image, phrases, processor=processor)
    assert one_image.shape == (3, 4)
    torch.testing.assert_close(one_image[:1], from_pil)
    several_images = predict_boxes(tiny_model, [image, random_image(seed=1)], "the dog", processor=processor)
    assert several_images.shape == (2, 4)
    assert (one_image[:, 2] <= 60).all() and (one_image[:, 3] <= 40).all() and (one_image >= 0).all()


def test_batch_size_does_not_change_predictions(tiny_model, tokenizer):
    processor = RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)
    images = [random_image(seed=s, width=30 + 10 * s) for s in range(5)]
    texts = ["the red square", "a blue circle", "the dog", "left", "a"]
    one_by_one = predict_boxes(tiny_model, images, texts, processor=processor, batch_size=1)
    batched = predict_boxes(tiny_model, images, texts, processor=processor, batch_size=16)
    torch.testing.assert_close(batched, one_by_one, atol=1e-4, rtol=1e-4)


def test_attached_processor_is_used_and_missing_one_is_explained(tiny_model, tokenizer):
    image = random_image()
    with pytest.raises(ValueError, match="processor="):
        predict_boxes(tiny_model, image, "the dog")
    tiny_model.processor = RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)
    assert tiny_model.predict(image, "the dog").shape == (1, 4)


def test_processor_must_match_the_model(tiny_model, tokenizer):
    image = random_image()
    with pytest.raises(ValueError, match="canvas"):
        predict_boxes(tiny_model, image, "the dog", processor=RECProcessor(tokenizer, canvas_size=64, max_query_len=QUERY_LEN))
    with pytest.raises(ValueError, match="max_query_len"):
        predict_boxes(tiny_model, image, "the dog", processor=RECProcessor(tokenizer, canvas_size=IMAGE_SIZE,
                                                                           max_query_len=QUERY_LEN + 4))


@pytest.mark.parametrize("training", [True, False])
def test_runs_in_eval_mode_without_grad_and_restores_the_mode(tokenizer, training):
    model = FixedBoxModel([[0.5, 0.5, 0.2, 0.2]] * 2).train(training)
    processor = RECProcessor(tokenizer, canvas_size=100, max_query_len=QUERY_LEN)
    predict_boxes(model, [Image.new("RGB", (50, 50))] * 2, "a", processor=processor, batch_size=1)
    assert model.calls == [(False, False), (False, False)]
    assert model.training is training and torch.is_grad_enabled()


def test_mismatched_lengths_are_rejected(tokenizer):
    processor = RECProcessor(tokenizer, canvas_size=100, max_query_len=QUERY_LEN)
    model = FixedBoxModel([[0.5, 0.5, 0.2, 0.2]] * 3)
    with pytest.raises(ValueError, match="one phrase per image"):
        predict_boxes(model, [Image.new("RGB", (9, 9))] * 2, ["a", "the", "dog"], processor=processor)
    with pytest.raises(ValueError, match="batch_size"):
        predict_boxes(model, Image.new("RGB", (9, 9)), "a", processor=processor, batch_size=0)


# ---------------------------------------------------------------------------------------------- draw_boxes
def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def test_draw_boxes_draws_predictions_and_ground_truth_in_their_colours():
    image = Image.new("RGB", (100, 100), "white")
    drawn = draw_boxes(image, torch.tensor([[10.0, 10.0, 60.0, 60.0]]), texts=["the dog"], gt_boxes=[30, 30, 90, 90])
    assert drawn is not image and drawn.size == image.size
    assert image.getpixel((10, 50)) == (255, 255, 255)  # the input is untouched
    assert drawn.getpixel((10, 50)) == _rgb(PALETTE[0])  # left edge of the prediction
    assert drawn.getpixel((90, 60)) == _rgb(GT_COLOR)  # right edge of the ground truth
    assert drawn.getpixel((45, 80)) == (255, 255, 255)  # inside, away from lines and labels


def test_draw_boxes_checks_its_inputs():
    image = Image.new("RGB", (50, 50))
    with pytest.raises(ValueError, match="one text per box"):
        draw_boxes(image, [[1, 1, 9, 9], [2, 2, 8, 8]], texts=["a", "b", "c"])
    with pytest.raises(ValueError, match="boxes"):
        draw_boxes(image, [[1, 2, 3]])
    several = draw_boxes(image, [[1, 1, 9, 9], [20, 20, 40, 40]], texts="a")  # one text for every box
    assert several.getpixel((40, 30)) == _rgb(PALETTE[1])
