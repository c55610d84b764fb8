"""Text towers and tokenizers: what a tokenizer's own settings and a tower's positions did to phrases silently.

* A tokenizer with ``truncation_side="left"`` cut a long phrase's first words (its subject) while the warning said
  its last words were cut.
* A phrase spelling a special token (``<pad>``, ``</s>``, ``[SEP]``) got that token's id with attention 1: a padding
  id in the middle of a phrase (RoBERTa's positions skip it: every later word moves), an end of text before the last
  words; a phrase ``"[SEP]"`` was refused as having no word.
* A text tower reading fewer positions than its ``max_position_embeddings`` (RoBERTa's family counts from
  ``padding_idx + 1``) was refused at build as if its inputs or taps were wrong ("override with text_taps").
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers as T
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import m2ist.processing as processing
from m2ist import get_side_tuned_model
from m2ist.processing import RECProcessor
from tests.tiny import IMAGE_SIZE, tiny_config, vision_tower

IMAGE = Image.new("RGB", (40, 32), (128, 128, 128))
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "on", "left", "in", "red", "shirt", "dog",
         "[", "]", "sep", "pad", "<", ">", "/", "s"]


def bert_tokenizer(folder: Path, **kwargs) -> T.BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n", encoding="utf-8")
    return T.BertTokenizer(str(folder / "vocab.txt"), **kwargs)


def byte_level_tokenizer() -> T.RobertaTokenizerFast:
    """A tiny RoBERTa-style byte-level BPE tokenizer (``<s>``, ``<pad>``, ``</s>``): special tokens in lower case, so
    lower-casing a phrase never hides them."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["the man on the left in a red shirt", "a big dog on the right"] * 10, trainer)
    backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return T.RobertaTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def tokens_of(processor: RECProcessor, phrase: str) -> tuple[list[str], list[int]]:
    batch = processor([IMAGE], [phrase])
    ids, mask = batch["input_ids"][0].tolist(), batch["attention_mask"][0].tolist()
    return processor.tokenizer.convert_ids_to_tokens(ids), mask


def test_a_tokenizer_truncating_on_the_left_still_keeps_the_phrases_start(tmp_path, caplog, monkeypatch) -> None:
    """Some tokenizers (chat models') are saved with ``truncation_side="left"``: a long phrase lost its subject."""
    monkeypatch.setattr(processing, "_warned_truncation", False)
    tokenizer = bert_tokenizer(tmp_path / "tok")
    tokenizer.truncation_side = "left"
    processor = RECProcessor(tokenizer, canvas_size=IMAGE_SIZE, max_query_len=5)
    with caplog.at_level(logging.WARNING, logger="m2ist.processing"):
        tokens, _ = tokens_of(processor, "the man on the left in red")
    assert tokens == ["[CLS]", "the", "man", "on", "[SEP]"]  # was [CLS] left in red [SEP]
    assert "keeps only the first 5" in caplog.text  # what the warning says is what happened
    assert tokenizer.truncation_side == "left"  # the user's tokenizer is left as it was


@pytest.mark.parametrize("lowercase", [False, True])
def test_text_spelling_a_special_token_is_read_as_words(lowercase) -> None:
    """``<pad>`` in a phrase was the pad id with attention 1 (RoBERTa's positions skip it), ``</s>`` an end of text."""
    processor = RECProcessor(byte_level_tokenizer(), canvas_size=IMAGE_SIZE, max_query_len=24, lowercase=lowercase)
    tokens, mask = tokens_of(processor, "the man <pad> on the </s> left")
    read = [token for token, on in zip(tokens, mask) if on]
    assert read[0] == "<s>" and read[-1] == "</s>"
    assert not {"<pad>", "</s>", "<s>"} & set(read[1:-1]), read  # only the tokenizer's own around the phrase
    assert tokens[len(read):] == ["<pad>"] * (len(tokens) - len(read))


def test_a_phrase_spelling_a_special_token_is_not_refused_as_wordless(tmp_path) -> None:
    processor = RECProcessor(bert_tokenizer(tmp_path / "tok", do_lower_case=False), canvas_size=IMAGE_SIZE,
                             max_query_len=10, lowercase=False)
    tokens, mask = tokens_of(processor, "[SEP]")  # refused: "leaves no word token"
    assert tokens[:5] == ["[CLS]", "[", "[UNK]", "]", "[SEP]"] and sum(mask) == 5
    tokens, _ = tokens_of(processor, "the [PAD] dog")
    assert tokens[:7] == ["[CLS]", "the", "[", "[UNK]", "]", "dog", "[SEP]"]


def test_a_text_tower_with_fewer_positions_than_the_query_length_is_refused_naming_the_length() -> None:
    """RoBERTa's positions start at ``padding_idx + 1``: 10 position embeddings read 8 tokens, not 10."""
    def roberta() -> T.RobertaModel:
        return T.RobertaModel(T.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=64, vocab_size=100, max_position_embeddings=10))

    get_side_tuned_model(vision_tower("vit"), roberta(), tiny_config(max_query_len=8))  # its 8 positions: fine
    with pytest.raises(ValueError, match=r"runs on 8: it reads at most 8 positions.*max_query_len=8\) or less") \
            as caught:
        get_side_tuned_model(vision_tower("vit"), roberta(), tiny_config(max_query_len=9))
    assert "text_taps" not in str(caught.value)  # the length, not the taps


def test_the_processor_still_reads_ordinary_phrases_as_before(tmp_path) -> None:
    processor = RECProcessor(bert_tokenizer(tmp_path / "tok"), canvas_size=IMAGE_SIZE, max_query_len=8)
    tokens, mask = tokens_of(processor, "The man in RED")
    assert tokens == ["[CLS]", "the", "man", "in", "red", "[SEP]", "[PAD]", "[PAD]"] and mask == [1] * 6 + [0] * 2
    assert torch.equal(processor([IMAGE], ["the dog"])["attention_mask"][0], torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]))
