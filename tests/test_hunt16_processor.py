"""A processor other than the adapter's: predict/evaluate with ``processor=`` compare it with ``model.processor``.

Another tokenizer whose ids all fall in the text tower's vocabulary, another ``max_query_len``, other image
statistics or lower-casing ran silently and gave other boxes; now each difference is named in a warning.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from PIL import Image
from transformers import BertTokenizer

from m2ist import SideTunedModel
from m2ist.data.sample import RECSample
from m2ist.evaluation import evaluate
from m2ist.inference import predict_boxes
from m2ist.processing import RECProcessor
from tests.ddp_worker import WORDS, make_model, make_processor
from tests.tiny import IMAGE_SIZE, QUERY_LEN

IMAGE = Image.new("RGB", (40, 32), (128, 128, 128))
OTHER = "prepares inputs otherwise than model.processor"


def tokenizer_of(folder: Path, words: list[str], **kwargs) -> BertTokenizer:
    """A BERT word-piece tokenizer over ``words`` written to ``folder/vocab.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return BertTokenizer(str(folder / "vocab.txt"), **kwargs)


def processor_of(tokenizer: BertTokenizer, **settings) -> RECProcessor:
    return RECProcessor(tokenizer, **{"canvas_size": IMAGE_SIZE, "max_query_len": QUERY_LEN, **settings})


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[SideTunedModel, Path]:
    """A tiny model saved with its processor, reloaded as a user would (``model.processor`` restored)."""
    folder = tmp_path_factory.mktemp("adapter")
    model = make_model()
    model.processor = make_processor(folder / "tok")
    model.save_pretrained(folder / "saved")
    loaded = SideTunedModel.from_pretrained(folder / "saved", model.vision_model, model.text_model)
    assert loaded.processor is not None
    return loaded, folder / "saved"


def predict_warnings(model, processor) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict_boxes(model, IMAGE, "the left square", processor=processor)
    return [str(w.message) for w in caught if OTHER in str(w.message) or "cuts phrases" in str(w.message)]


def swapped_words() -> list[str]:
    """The same eleven tokens with 'left' and 'right' swapped: every id valid, 'left' read as 'right'."""
    words = list(WORDS)
    i, j = words.index("left"), words.index("right")
    words[i], words[j] = words[j], words[i]
    return words


CASES = {
    "same size, two words swapped": (lambda tmp: processor_of(tokenizer_of(tmp, swapped_words())),
                                     "tokenizer vocabulary: model.processor id 9 is 'left', given id 9 is 'right'"),
    "fewer tokens": (lambda tmp: processor_of(tokenizer_of(tmp, [w for w in WORDS if w != "square"])),
                     "tokenizer_vocab_size: model.processor 11, given 10"),
    "shorter query": (lambda tmp: processor_of(tokenizer_of(tmp, WORDS), max_query_len=QUERY_LEN - 2),
                      f"max_query_len: model.processor {QUERY_LEN}, given {QUERY_LEN - 2}"),
    "other statistics": (lambda tmp: processor_of(tokenizer_of(tmp, WORDS), image_mean=0.5, image_std=0.5),
                         "image_mean: model.processor [0.485, 0.456, 0.406], given [0.5, 0.5, 0.5]"),
    "keeps case": (lambda tmp: processor_of(tokenizer_of(tmp, WORDS), lowercase=False),
                   "lowercase: model.processor True, given False"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_another_processor_is_named_setting_by_setting(saved, tmp_path, case):
    model, _ = saved
    make, named = CASES[case]
    messages = predict_warnings(model, make(tmp_path / "other"))
    assert len(messages) == 1 and named in messages[0] and "leave out processor=" in messages[0]
    with pytest.warns(UserWarning, match=OTHER):  # SideTunedModel.predict passes the same check
        model.predict(IMAGE, "the left square", processor=make(tmp_path / "again"))


def test_the_adapters_own_processor_reloaded_is_silent(saved):
    model, folder = saved
    assert predict_warnings(model, RECProcessor.from_pretrained(folder)) == []
    assert predict_warnings(model, None) == []


def test_a_tokenizer_that_cases_otherwise_is_named_when_the_processor_keeps_case(saved, tmp_path):
    model, _ = saved
    words = [*WORDS[:5], "Left", *WORDS[5:]]  # "LEFT" is "left" to an uncased tokenizer, [UNK] to a cased one
    own = processor_of(tokenizer_of(tmp_path / "a", words), lowercase=False)
    model.processor, kept = own, model.processor
    try:
        cased = processor_of(tokenizer_of(tmp_path / "b", words, do_lower_case=False), lowercase=False)
        messages = predict_warnings(model, cased)
        assert len(messages) == 1 and "tokenizer: model.processor" in messages[0]
        # the processor lower-cases every phrase first: the tokenizer's own casing changes nothing, so no warning
        own_lower = processor_of(tokenizer_of(tmp_path / "c", words))
        model.processor = own_lower
        assert predict_warnings(model, processor_of(tokenizer_of(tmp_path / "d", words, do_lower_case=False))) == []
    finally:
        model.processor = kept


def test_evaluate_with_another_processor_warns(saved, tmp_path):
    model, _ = saved
    other = processor_of(tokenizer_of(tmp_path / "other", swapped_words()))
    samples = [RECSample(IMAGE, "the left square", (2, 2, 20, 20), image_id=0)]
    with pytest.warns(UserWarning, match="tokenizer vocabulary"):
        evaluate(model, other, {"val": samples}, progress=False)


def test_a_model_of_several_adapters_takes_each_adapters_processor_silently(saved, tmp_path):
    model, folder = saved
    fresh = SideTunedModel.from_pretrained(folder, model.vision_model, model.text_model)
    fresh.load_adapter(folder, "second")  # processor= is how an adapter saved with another processor is fed
    assert predict_warnings(fresh, processor_of(tokenizer_of(tmp_path / "other", swapped_words()))) == []


def test_without_model_processor_a_query_length_below_the_heads_is_warned(tmp_path):
    model = make_model()
    assert model.processor is None
    messages = predict_warnings(model, processor_of(tokenizer_of(tmp_path, WORDS), max_query_len=QUERY_LEN - 3))
    assert len(messages) == 1 and f"max_query_len={QUERY_LEN - 3}" in messages[0]
    assert f"max_query_len={QUERY_LEN}." in messages[0]
    assert predict_warnings(model, processor_of(tokenizer_of(tmp_path, WORDS))) == []


def test_another_canvas_is_still_refused(saved, tmp_path):
    model, _ = saved
    with pytest.raises(ValueError, match="canvas"):
        predict_boxes(model, IMAGE, "the red square", processor=processor_of(tokenizer_of(tmp_path, WORDS),
                                                                             canvas_size=IMAGE_SIZE * 2))


def test_training_with_another_processor_makes_it_the_models(tmp_path) -> None:
    """train_rec on a model whose ``model.processor`` prepares inputs otherwise (a loaded adapter trained on with a
    shorter query) kept the old one: ``save_pretrained`` saved it with the new weights and ``predict`` used it."""
    import json

    from m2ist.trainer import train_rec
    from tests.ddp_worker import make_dataset
    from tests.tiny import cpu_training_args

    model = make_model()
    old = make_processor(tmp_path / "tok")
    model.processor = old
    new = old._with(max_query_len=QUERY_LEN - 2)
    with pytest.warns(UserWarning, match=f"max_query_len: model.processor {QUERY_LEN}, training {QUERY_LEN - 2}"):
        train_rec(model, new, make_dataset(4, seed=1), args=cpu_training_args(tmp_path / "run", max_steps=1))
    assert model.processor is new
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "m2ist_processor.json").read_text())["max_query_len"] == QUERY_LEN - 2

    bare = make_model()  # no processor: the training one is attached, without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train_rec(bare, old, make_dataset(4, seed=1), args=cpu_training_args(tmp_path / "run2", max_steps=1))
    assert bare.processor is old
    equal = make_model()  # an equal processor (another object) is kept, without a word
    equal.processor = old._with(max_query_len=QUERY_LEN)
    kept = equal.processor
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train_rec(equal, old, make_dataset(4, seed=1), args=cpu_training_args(tmp_path / "run3", max_steps=1))
    assert equal.processor is kept
