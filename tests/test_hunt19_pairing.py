"""A processor meeting a model it does not belong to: what ran silently, or failed with a misleading message.

* A tokenizer of another vocabulary (a BERT tokenizer on a RoBERTa tower), or a larger one, gave ids the tower read as
  other words, or failed deep inside; refused where the processor meets the model (``model.processor = ...``,
  ``predict``/``evaluate`` with ``processor=``), naming the tower's own tokenizer. Tokens added with the embeddings
  resized, and a tokenizer smaller than the (padded) embedding matrix, still pass.
* A pad token added past the vocabulary (``add_special_tokens({'pad_token': ...})`` on GPT-2) was "a tokenizer of
  another text tower"; now the message says so and how to fix it, at the pairing and in ``forward``.
* A tokenizer from another Hub repo than the recorded text tower, and a normalisation other than the vision tower's
  own ``preprocessor_config.json``, are warned about.
* Phrases all ``[UNK]`` went unwarned when the tokenizer pads with ``[UNK]``.
* The app counted a phrase spelling ``[SEP]`` as one token; the processor reads it as three words.
* A normalised image (values below 0) was told to be cast to ``uint8``.
* Two threads sharing a ``truncation_side="left"`` tokenizer could cut a phrase's first words.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
import time
import types
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers as T
from PIL import Image

import m2ist.processing as processing
from m2ist import SideTunedModel, get_side_tuned_model
from m2ist.app import _cut_phrases
from m2ist.data.images import load_image
from m2ist.data.sample import RECSample
from m2ist.evaluation import evaluate
from m2ist.inference import predict_boxes
from m2ist.model import check_model_inputs
from m2ist.processing import RECProcessor
from tests.tiny import IMAGE_SIZE, QUERY_LEN, VOCAB, text_tower, tiny_config, vision_tower

IMAGE = Image.new("RGB", (40, 32), (128, 128, 128))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "in", "red", "dog", "[", "]", "sep"]
#: a vocabulary exactly as large as the tiny towers' embedding (100 rows)
FULL = WORDS + [f"word{i}" for i in range(VOCAB - len(WORDS))]

pytestmark = pytest.mark.usefixtures("one_thread")


def bert_tokenizer(folder: Path, words: list[str] = WORDS, **kwargs) -> T.BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    return T.BertTokenizer(str(folder / "vocab.txt"), **kwargs)


def processor_of(tokenizer, **settings) -> RECProcessor:
    return RECProcessor(tokenizer, **{"canvas_size": IMAGE_SIZE, "max_query_len": QUERY_LEN, **settings})


@pytest.fixture(scope="module")
def bert_model() -> SideTunedModel:
    return get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())


# ---------------------------------------------------------------------------------------------- another vocabulary
def test_a_tokenizer_of_another_vocabulary_is_refused_where_it_meets_the_model(tmp_path) -> None:
    """A BERT tokenizer (pads with id 0) on a RoBERTa tower (reserves id 1): every id in range, every word wrong."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("roberta"), tiny_config())
    processor = processor_of(bert_tokenizer(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"pads with '\[PAD\]' \(id 0\) but the text tower reserves id 1"):
        predict_boxes(model, IMAGE, "the dog", processor=processor)
    samples = [RECSample(IMAGE, "the dog", (2, 2, 20, 20), image_id=0)]
    with pytest.raises(ValueError, match="has another vocabulary"):
        evaluate(model, processor, {"val": samples}, progress=False)
    with pytest.raises(ValueError, match="has another vocabulary"):
        model.processor = processor  # what the trainer does with the processor it trains with
    assert model.processor is None


def test_a_tokenizer_of_a_larger_vocabulary_is_refused(tmp_path, bert_model) -> None:
    words = FULL + [f"extra{i}" for i in range(20)]
    processor = processor_of(bert_tokenizer(tmp_path / "tok", words))
    with pytest.raises(ValueError, match="vocabulary has 120 tokens but the text tower embeds 100"):
        predict_boxes(bert_model, IMAGE, "the dog", processor=processor)


def test_tokens_added_past_the_vocabulary_are_refused_unless_the_tower_was_resized(tmp_path) -> None:
    tokenizer = bert_tokenizer(tmp_path / "tok", FULL)
    tokenizer.add_tokens(["zebra"])
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    with pytest.raises(ValueError, match=r"Tokens added to the tokenizer \('zebra', ids 100\.\.100\).*resize_token_emb"):
        model.processor = processor_of(tokenizer)
    text = text_tower("bert")
    text.resize_token_embeddings(len(tokenizer))
    resized = get_side_tuned_model(vision_tower("vit"), text, tiny_config())
    resized.processor = processor_of(tokenizer)  # legitimate: the tower embeds the added token
    assert predict_boxes(resized, IMAGE, "the zebra").shape == (1, 4)


def test_a_tokenizer_smaller_than_the_padded_embedding_still_works(tmp_path, bert_model) -> None:
    """15 tokens on a 100-row embedding: as GPT-2/BERT-style matrices padded to a multiple of 64 are."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predict_boxes(bert_model, IMAGE, "the dog", processor=processor_of(bert_tokenizer(tmp_path))).shape == (1, 4)


# ---------------------------------------------------------------------------------------------- a pad token added
def test_a_pad_token_added_past_the_vocabulary_is_named_with_the_fix(tmp_path) -> None:
    tokenizer = bert_tokenizer(tmp_path / "tok", FULL)
    tokenizer.add_special_tokens({"pad_token": "[NEWPAD]"})  # what GPT-2 users do; the tower has no row 100
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    processor = processor_of(tokenizer)
    with pytest.raises(ValueError, match=r"pad token '\[NEWPAD\]' \(id 100\) lies past.*tokenizer.pad_token = "
                                         r"tokenizer.eos_token"):
        model.processor = processor
    batch = processor([IMAGE], ["the dog"])  # a training loop's own batch reaches forward: the same diagnosis there
    with pytest.raises(ValueError, match=r"pad with token id 100, past the text tower's vocabulary.*added"):
        model(**{key: batch[key] for key in ("pixel_values", "pixel_mask", "input_ids", "attention_mask")})


def test_check_model_inputs_tells_padding_past_the_vocabulary_from_words_past_it() -> None:
    pixels = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    kwargs = dict(image_size=IMAGE_SIZE, max_query_len=QUERY_LEN, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"pad with token id 100.*tokenizer\.pad_token = tokenizer\.eos_token"):
        check_model_inputs(pixels, torch.tensor([[2, 5, 3, 100, 100]]), mask, **kwargs)
    with pytest.raises(ValueError, match="does not belong to this text tower"):  # a word past it: another tokenizer
        check_model_inputs(pixels, torch.tensor([[2, 500, 3, 0, 0]]), mask, **kwargs)


# ---------------------------------------------------------------------------------------------- warnings
def test_a_tokenizer_from_another_hub_repo_than_the_text_tower_is_warned(tmp_path) -> None:
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"),
                                 tiny_config(text_model_name_or_path="google-bert/bert-base-uncased"))
    tokenizer = bert_tokenizer(tmp_path / "tok")
    tokenizer.name_or_path = "FacebookAI/roberta-base"
    with pytest.warns(UserWarning, match="loaded from 'FacebookAI/roberta-base' but the text tower is 'google-bert/"):
        model.processor = processor_of(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.attach_processor(processor_of(tokenizer), saved=True)  # the adapter's own: trained with it
        tokenizer.name_or_path = "bert-base-uncased"  # the legacy id of the same repo
        model.processor = processor_of(tokenizer)


def test_a_normalisation_other_than_the_vision_towers_own_is_warned(tmp_path) -> None:
    vision = vision_tower("vit")
    vision.save_pretrained(tmp_path / "vision")
    T.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path / "vision")
    config = tiny_config(vision_model_name_or_path=str(tmp_path / "vision"))
    model = get_side_tuned_model(vision, text_tower("bert"), config)
    tokenizer = bert_tokenizer(tmp_path / "tok")
    with pytest.warns(UserWarning, match=r"normalises images with mean \(0.485, 0.456, 0.406\).*mean \(0.5, 0.5, 0.5\)"):
        model.processor = processor_of(tokenizer)  # ImageNet's statistics, the default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.processor = processor_of(tokenizer, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        model.attach_processor(processor_of(tokenizer), saved=True)  # the adapter's own: trained with it


def test_a_processor_of_another_canvas_is_refused_when_attached(tmp_path, bert_model) -> None:
    model = copy.deepcopy(bert_model)
    with pytest.raises(ValueError, match=f"64x64 canvas but the model was built for image_size={IMAGE_SIZE}"):
        model.processor = processor_of(bert_tokenizer(tmp_path), canvas_size=64)
    model.processor = processor_of(bert_tokenizer(tmp_path))
    state = {**model.__dict__}
    state["processor"] = state.pop("_processor")  # a model pickled before processor was a property
    restored = SideTunedModel.__new__(SideTunedModel)
    restored.__setstate__(state)
    assert restored.processor is model.processor


# ---------------------------------------------------------------------------------------------- the processor
def test_phrases_of_unknown_tokens_are_warned_when_the_tokenizer_pads_with_unk(tmp_path, caplog) -> None:
    processor = processor_of(bert_tokenizer(tmp_path, pad_token="[UNK]"))
    assert processor.tokenizer.pad_token_id == processor.tokenizer.unk_token_id
    with caplog.at_level(logging.WARNING, logger="m2ist.processing"):
        processor([IMAGE, IMAGE], ["the dog", "🐕 🐈"])
    assert "1 of 2 phrases read as unknown tokens only" in caplog.text


def test_the_app_counts_a_phrase_as_the_processor_reads_it(tmp_path) -> None:
    """``[SEP]`` is three words to the processor (``[``, ``sep``, ``]``): it was one token to the app."""
    processor = processor_of(bert_tokenizer(tmp_path), max_query_len=4, lowercase=False)
    model = types.SimpleNamespace(processor=processor)
    assert _cut_phrases(model, ["[SEP]", "the dog"]) == [(0, 5, 4)]  # was []: "[SEP]" counted as one token
    assert processor.phrase_lengths(["[SEP]", "the dog"]) == [5, 4]
    read = processor([IMAGE], ["[SEP]"])["attention_mask"][0].sum().item()
    assert read == 4  # cut at max_query_len, as the app says


@pytest.mark.parametrize(("array", "hint", "not_hint"), [
    (np.full((4, 4, 3), -1.5, dtype=np.float32), "already normalised with a mean and std", "astype(numpy.uint8)"),
    (np.full((4, 4, 3), 200.0, dtype=np.float32), "astype(numpy.uint8)", "normalised"),
    (np.full((4, 4, 3), 4000.0, dtype=np.float32), "astype(numpy.uint16)", "normalised"),
])
def test_a_float_image_out_of_range_gets_the_hint_that_fits_it(array, hint, not_hint) -> None:
    with pytest.raises(ValueError, match="must hold values in") as caught:
        load_image(array)
    assert hint in str(caught.value) and not_hint not in str(caught.value)


def test_normalised_pixel_values_passed_as_an_image_are_named(tmp_path, bert_model) -> None:
    processor = processor_of(bert_tokenizer(tmp_path))
    pixel_values = processor([IMAGE], ["the dog"])["pixel_values"][0]
    pixel_values[:, 0, 0] = -2.0  # a dark corner: below 0 once normalised
    with pytest.raises(ValueError, match="already normalised"):
        predict_boxes(bert_model, pixel_values, "the dog", processor=processor)


class _SlowTokenizer(T.BertTokenizer):
    """Waits inside each call, then records the truncation side it tokenizes with."""

    seen: list[str]

    def __call__(self, *args, **kwargs):
        time.sleep(0.3)
        self.seen.append(self.truncation_side)
        return super().__call__(*args, **kwargs)


def test_two_threads_sharing_a_left_truncating_tokenizer_both_keep_the_phrases_start(tmp_path) -> None:
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    tokenizer = _SlowTokenizer(str(tmp_path / "vocab.txt"), truncation_side="left")
    tokenizer.seen = []
    processors = [processor_of(tokenizer, max_query_len=5) for _ in range(2)]
    results: list[list[int]] = [[], []]

    def run(index: int) -> None:
        results[index] = processors[index]._tokenize(["the man on the left in red"], truncation=True,
                                                       max_length=5)["input_ids"][0]

    threads = [threading.Thread(target=run, args=(index,)) for index in range(2)]
    threads[0].start()
    time.sleep(0.05)  # the first has set the side to "right" and waits in the tokenizer
    threads[1].start()
    for thread in threads:
        thread.join()
    start = tokenizer.convert_tokens_to_ids(["[CLS]", "the", "man", "on", "[SEP]"])
    assert tokenizer.seen == ["right", "right"] and results == [start, start]
    assert tokenizer.truncation_side == "left"


def test_a_tokenizer_without_a_pad_token_is_told_to_reuse_one_of_its_own(tmp_path) -> None:
    """The usual advice (add a ``[PAD]``) gives an id the frozen tower cannot embed: the message names the safe one."""
    tokenizer = bert_tokenizer(tmp_path)
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match=r"no pad token.*tokenizer.pad_token = tokenizer.eos_token.*past the text"):
        RECProcessor(tokenizer)


def test_training_with_a_processor_of_another_vocabulary_is_refused_before_any_step(tmp_path) -> None:
    """The trainer attaches its processor to the model (``model.processor = processing_class``): checked there."""
    from m2ist.trainer import RECTrainer
    from tests.ddp_worker import make_dataset
    from tests.tiny import cpu_training_args

    model = get_side_tuned_model(vision_tower("vit"), text_tower("roberta"), tiny_config())
    with pytest.raises(ValueError, match="has another vocabulary"):
        RECTrainer(model=model, args=cpu_training_args(tmp_path / "run", max_steps=1),
                   train_dataset=make_dataset(4, seed=1), processing_class=processor_of(bert_tokenizer(tmp_path)))


@pytest.mark.parametrize(("which", "cache"), [("data_collator", "off"), ("data_collator", "memory"),
                                              ("eval_data_collator", "off")])
def test_a_collators_processor_of_another_vocabulary_is_refused_without_processing_class(tmp_path, which, cache):
    """``RECTrainer(data_collator=RECCollator(processor))`` with no ``processing_class`` never attaches that processor
    to the model: the trainer checks every processor its batches are prepared with, before any step."""
    from m2ist.data import RECCollator
    from m2ist.trainer import RECTrainer
    from tests.ddp_worker import make_dataset
    from tests.tiny import cpu_training_args

    model = get_side_tuned_model(vision_tower("vit"), text_tower("roberta"), tiny_config())
    collator = RECCollator(processor_of(bert_tokenizer(tmp_path)), train=which == "data_collator")
    with pytest.raises(ValueError, match="has another vocabulary"):
        RECTrainer(model=model, args=cpu_training_args(tmp_path / "run", max_steps=1, tower_cache=cache),
                   train_dataset=make_dataset(4, seed=1), **{which: collator})


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_worker_forked_while_another_thread_tokenizes_does_not_wait_forever(tmp_path) -> None:
    """The lock of a tokenizer held by another thread at a fork (a DataLoader starting workers) would stay held."""
    processor = processor_of(bert_tokenizer(tmp_path))
    lock = processing._tokenizer_lock(processor.tokenizer)
    with lock:  # another thread of the parent is tokenizing
        pid = os.fork()
        if pid == 0:  # the worker: tokenizes, exits at once
            try:
                processor._tokenize(["the dog"], truncation=True, max_length=5)
            finally:
                os._exit(0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked worker waited for a lock held by another thread of its parent")
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_statistics_of_a_vision_tower_in_the_hub_cache_are_compared(tmp_path, monkeypatch) -> None:
    """A tower loaded by Hub id: its preprocessor_config.json is read from the cache, never downloaded."""
    T.ViTImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(tmp_path / "cached")
    asked = []

    def from_cache(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        return str(tmp_path / "cached" / filename)

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", from_cache)
    config = tiny_config(vision_model_name_or_path="google/vit-base-patch16-224", vision_revision="a" * 40)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), config)
    with pytest.warns(UserWarning, match="vision tower 'google/vit-base-patch16-224' was trained on images normalised"):
        model.processor = processor_of(bert_tokenizer(tmp_path / "tok"))
    assert asked[-1] == ("google/vit-base-patch16-224", "preprocessor_config.json", "a" * 40)


def test_an_adapter_whose_saved_tokenizer_does_not_fit_the_text_tower_given_is_refused_naming_the_fit(tmp_path):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.processor = processor_of(bert_tokenizer(tmp_path / "tok", FULL))
    model.save_pretrained(tmp_path / "adapter")
    small = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=50))  # the same architecture, a smaller vocabulary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the adapter's own warnings about other towers
        with pytest.raises(ValueError, match=r"does not fit the model's towers.*vocabulary has 100 tokens but the text "
                                             r"tower embeds 50"):
            SideTunedModel.from_pretrained(tmp_path / "adapter", model.vision_model, small)
