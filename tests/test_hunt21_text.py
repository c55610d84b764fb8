"""Hunt 21: the text side of a processor meeting a model, and the box mappings, on careless input.

* The pad-token-past-the-vocabulary fix was written twice (``check_fits`` and ``forward``); one function owns it.
* A special token the tokenizer adds to every phrase (a post-processor template's own token, an added BOS) but the
  text tower cannot embed passed ``model.processor = ...`` and failed in ``forward`` as "a tokenizer of another text
  tower"; a role the tokenizer never inserts (a BOS set on a BERT tokenizer) was refused though it never reaches
  ``input_ids``. Now exactly the inserted tokens are checked, and an added one is named as added.
* ``input_ids`` cast to uint8/int16 failed deep in the embedding; now named, with the wrapping a cast may cause.
* ``boxes=`` a set or a dict paired boxes with phrases in hash order; ``boxes=5`` failed as "'int' object is not
  iterable".
* ``post_process_boxes``/``boxes_to_labels`` took a canvas of 0, -5 or NaN, a geometry row of zeros or NaN and one
  geometry row for several boxes, and returned zeros, NaN or a broadcast result; ``processor.post_process_boxes``
  took canvas-pixel boxes for the model's normalised ones and returned a corner box.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image
from tokenizers import processors

from m2ist import get_side_tuned_model
from m2ist.inference import predict_boxes
from m2ist.model import pad_past_vocabulary
from m2ist.processing import RECProcessor, boxes_to_labels, post_process_boxes
from tests.conftest import make_batch
from tests.tiny import IMAGE_SIZE, QUERY_LEN, VOCAB, text_tower, tiny_config, vision_tower

IMAGE = Image.new("RGB", (40, 32), (128, 128, 128))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "in", "red", "dog", "[", "]", "sep"]
#: a vocabulary exactly as large as the tiny towers' embedding (100 rows): an added token gets id 100
FULL = WORDS + [f"word{i}" for i in range(VOCAB - len(WORDS))]
MODEL_INPUTS = ("pixel_values", "pixel_mask", "input_ids", "attention_mask")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(FULL) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())


def processor_of(tokenizer) -> RECProcessor:
    return RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)


def with_template(tokenizer, single: str, tokens: list[tuple[str, int]]):
    """``tokenizer`` putting ``single`` around every phrase (a post-processor template, as Llama's BOS)."""
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=tokens)
    return tokenizer


# ---------------------------------------------------------------------------------------------- one wording
def test_the_pad_token_fix_has_one_wording_at_the_pairing_and_in_forward(tmp_path, vocab_file, model) -> None:
    """The pad-past-the-vocabulary text was written in model.py and processing.py: a change to one left the other."""
    tokenizer = T.BertTokenizerFast(vocab_file)
    tokenizer.add_special_tokens({"pad_token": "[NEWPAD]"})
    processor = processor_of(tokenizer)
    with pytest.raises(ValueError) as paired:
        processor.check_fits(model)
    batch = processor([IMAGE], ["the dog"])
    with pytest.raises(ValueError) as forward:
        model(**{key: batch[key] for key in MODEL_INPUTS})
    assert str(paired.value) == pad_past_vocabulary(100, VOCAB, "[NEWPAD]")
    assert str(forward.value) == pad_past_vocabulary(100, VOCAB)
    tail = pad_past_vocabulary(100, VOCAB).split(": ", 1)[1]
    assert str(paired.value).endswith(tail) and "tokenizer.pad_token = tokenizer.eos_token" in tail


# ---------------------------------------------------------------------------------------------- inserted tokens
def test_a_template_token_past_the_vocabulary_is_refused_at_the_pairing(vocab_file, model) -> None:
    """A template's own token (id 100, no role) passed ``model.processor = ...``; predict then failed with "the
    tokenizer does not belong to this text tower"."""
    tokenizer = T.BertTokenizerFast(vocab_file)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<en>"]})
    with_template(tokenizer, "[CLS] <en> $A [SEP]", [("[CLS]", 2), ("[SEP]", 3), ("<en>", 100)])
    assert tokenizer("the dog").input_ids == [2, 100, 5, 11, 3]
    with pytest.raises(ValueError, match=r"special token '<en>' \(id 100\), which it adds to every phrase, lies past "
                                         r"the text tower's vocabulary \(ids 0\.\.99\): it was added to the tokenizer"):
        processor_of(tokenizer).check_fits(model)
    batch = processor_of(tokenizer)([IMAGE], ["the dog"])  # a loop of one's own reaches forward: named there too
    with pytest.raises(ValueError, match=r"got 0\.\.100.*or tokens were added to it"):
        model(**{key: batch[key] for key in MODEL_INPUTS})


def test_an_added_bos_the_tokenizer_inserts_is_named_as_added(vocab_file, model) -> None:
    """An added BOS put before every phrase was "the tokenizer belongs to another text tower"."""
    tokenizer = T.BertTokenizerFast(vocab_file)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    with_template(tokenizer, "<s> $A [SEP]", [("<s>", 100), ("[SEP]", 3)])
    with pytest.raises(ValueError, match=r"BOS token '<s>' \(id 100\).*it was added to the tokenizer.*without it") as err:
        model.processor = processor_of(tokenizer)
    assert "another text tower" not in str(err.value)


def test_a_special_role_the_tokenizer_never_inserts_is_not_refused(vocab_file, model) -> None:
    """A BOS set on a BERT tokenizer (id 100) never reaches input_ids, yet ``model.processor = ...`` refused it as
    "a tokenizer of another text tower"."""
    tokenizer = T.BertTokenizerFast(vocab_file)
    tokenizer.add_special_tokens({"bos_token": "<s>"})
    processor = processor_of(tokenizer)
    assert processor([IMAGE], ["the dog <s>"])["input_ids"].max() < VOCAB  # read as words, never as the token
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor.check_fits(model)
        assert predict_boxes(model, IMAGE, "the dog", processor=processor).shape == (1, 4)


# ---------------------------------------------------------------------------------------------- boxes= shapes
@pytest.mark.parametrize("boxes", [{(1, 2, 30, 20), (3, 4, 20, 10)}, {0: [1, 2, 30, 20], 1: [3, 4, 20, 10]}],
                         ids=["set", "dict"])
def test_unordered_boxes_are_refused(vocab_file, boxes) -> None:
    """A set (or dict) of boxes was paired with the phrases in hash order: each phrase could get the other's box."""
    with pytest.raises(TypeError, match="no order to pair its boxes with the phrases"):
        processor_of(T.BertTokenizerFast(vocab_file))([IMAGE, IMAGE], ["the dog", "the man"], boxes=boxes)


@pytest.mark.parametrize("boxes", [5, np.float32(3.0), np.array(7)], ids=["int", "numpy-scalar", "0-d-array"])
def test_a_number_for_boxes_names_the_box_form(vocab_file, boxes) -> None:
    """``boxes=5`` failed as "'int' object is not iterable"."""
    with pytest.raises(TypeError, match=r"boxes must be one \[x0, y0, x1, y1\] box per phrase"):
        processor_of(T.BertTokenizerFast(vocab_file))([IMAGE], ["the dog"], boxes=boxes)


# ---------------------------------------------------------------------------------------------- box mappings
@pytest.fixture(scope="module")
def geometry(vocab_file) -> torch.Tensor:
    return processor_of(T.BertTokenizerFast(vocab_file))([IMAGE], ["the dog"])["image_geometry"]


PRED = torch.tensor([[0.5, 0.5, 0.2, 0.2]])


@pytest.mark.parametrize("canvas", [0, -5, float("nan"), 1.5, "32"])
def test_a_canvas_size_that_is_no_canvas_is_refused(geometry, canvas) -> None:
    """A canvas of 0 or -5 gave all-zero boxes, NaN gave NaN boxes, "32" an index error."""
    with pytest.raises(ValueError, match="canvas_size must be a whole number"):
        post_process_boxes(PRED, geometry, canvas)
    with pytest.raises(ValueError, match="canvas_size must be a whole number"):
        boxes_to_labels(torch.tensor([[1.0, 2.0, 30.0, 20.0]]), geometry, canvas)


@pytest.mark.parametrize("row", [[0.0] * 6, [float("nan")] * 6, [-40.0, -32.0, 0.8, 0.8, 0.0, 3.0],
                                 [40.0, 32.0, 0.0, 0.8, 0.0, 3.0]], ids=["zeros", "nan", "negative-size", "zero-scale"])
def test_a_geometry_row_of_no_image_is_refused(row) -> None:
    """Zeros (a batch built with empty_batch but never filled) mapped every box to (0, 0, 0, 0); NaN to NaN."""
    with pytest.raises(ValueError, match=r"image_geometry\[0\] = .* is no image's geometry"):
        post_process_boxes(PRED, torch.tensor([row]), IMAGE_SIZE)


def test_a_flipped_geometry_still_maps_both_ways() -> None:
    """A negative scale is the augmentation's horizontal flip: a real geometry, not refused."""
    flipped = torch.tensor([[40.0, 32.0, -0.8, 0.8, 32.0, 3.2]], dtype=torch.float64)
    box = torch.tensor([[4.0, 2.0, 30.0, 20.0]], dtype=torch.float64)
    back = post_process_boxes(boxes_to_labels(box, flipped, IMAGE_SIZE), flipped, IMAGE_SIZE)
    assert torch.allclose(back, box)


def test_one_geometry_row_for_several_boxes_is_refused(geometry) -> None:
    """boxes_to_labels broadcast one geometry row over two boxes (two images' boxes mapped as the first image's)."""
    with pytest.raises(ValueError, match="boxes_xyxy has 2 rows but image_geometry has 1"):
        boxes_to_labels(torch.tensor([[1.0, 2.0, 30.0, 20.0]] * 2), geometry, IMAGE_SIZE)


def test_pixel_boxes_given_as_predictions_are_refused(vocab_file, geometry) -> None:
    """Canvas-pixel (cx, cy, w, h) boxes were clipped to the image's far corner: a 0x0 box at (40, 32)."""
    processor = processor_of(T.BertTokenizerFast(vocab_file))
    with pytest.raises(ValueError, match="look like pixel boxes"):
        processor.post_process_boxes(torch.tensor([[16.0, 16.0, 8.0, 8.0]]), geometry)
    # the model's own boxes at the edges of [0, 1], and non-finite ones (predict names those), are not refused here
    edge = processor.post_process_boxes(torch.tensor([[1.0, 0.0, 1.0, 1.0]]), geometry)
    assert torch.isfinite(edge).all()
    assert processor.post_process_boxes(torch.tensor([[float("inf"), 0.5, 0.2, 0.2]]), geometry).shape == (1, 4)


# ---------------------------------------------------------------------------------------------- forward inputs
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8])
def test_token_ids_of_a_narrow_integer_type_are_named(model, dtype) -> None:
    """uint8/int16 ids failed deep in the embedding ("Expected tensor for argument #1 'indices' ... ByteTensor"),
    without saying that the cast may have wrapped ids past the type's range."""
    batch = make_batch(1)
    batch.pop("labels")
    with pytest.raises(ValueError, match=rf"input_ids are {str(dtype).removeprefix('torch.')} but token ids must be "
                                         r"int64 \(or int32\)"):
        model(**{**batch, "input_ids": batch["input_ids"].to(dtype)})
    assert model(**{**batch, "input_ids": batch["input_ids"].int()}).pred_boxes.shape == (1, 4)  # int32 still runs


def test_phrases_as_an_array_are_predicted_as_the_same_list(vocab_file, model) -> None:
    """``predict_boxes`` refused a numpy array of phrases ("texts must be a phrase string or a list of phrase
    strings") where the processor takes one: a column of a table (numpy, pandas) is now read as its list."""
    processor = processor_of(T.BertTokenizerFast(vocab_file))
    phrases = ["the dog", "the red dog"]
    expected = predict_boxes(model, IMAGE, phrases, processor=processor)
    torch.testing.assert_close(predict_boxes(model, IMAGE, np.array(phrases), processor=processor), expected,
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match="list of phrase strings"):
        predict_boxes(model, IMAGE, np.array([[1, 2]]), processor=processor)
