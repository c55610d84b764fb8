"""Round 16 of the hunt for careless inputs and quiet faults: ``m2ist predict --image`` naming a folder or a pattern
the shell left unexpanded is refused with what to give (it ended with "run with --debug for the full traceback",
the words of an unexpected failure); a data file read as another format (JSON Lines as COCO, a COCO file or a
JSON list as JSON Lines, JSON as CSV, CSV as JSON) names the format it looks like and the loader that reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2ist.data.files import load_coco_style, load_csv, load_jsonl
from tests.test_hostile import assert_one_line_error, run_cli
from tests.test_hostile_cli import cli_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return cli_workspace(tmp_path_factory.mktemp("hunt16"))


@pytest.mark.parametrize("name, needles", [
    (".", ("is a folder", "*.jpg")),
    ("*.jpg", ("no file matches this pattern", "unquoted")),
    ("img[0-9].webp", ("no file matches this pattern",)),
])
def test_predict_refuses_a_folder_or_an_unexpanded_pattern_with_what_to_give(workspace, capsys, name, needles):
    image = str(workspace / name) if name != "." else str(workspace)
    code, out, err = run_cli(capsys, "predict", "--adapter", str(workspace / "adapter"), "--image", image,
                             "--text", "the red square")
    assert_one_line_error(code, err, *needles)
    assert out == "" and "--debug" not in err


def test_a_file_whose_name_holds_pattern_characters_is_still_read(workspace, capsys, tmp_path):
    image = tmp_path / "scene[1].png"
    image.write_bytes((workspace / "img0.png").read_bytes())
    code, out, err = run_cli(capsys, "predict", "--adapter", str(workspace / "adapter"), "--image", str(image),
                             "--text", "the red square")
    assert code == 0 and '"box_xyxy"' in out, err


RECORDS = [{"image": "a.png", "text": "the red square", "bbox": [1, 2, 3, 4]},
           {"image": "b.png", "text": "the blue circle", "bbox": [2, 2, 3, 3]}]
COCO = {"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4],
                                                                      "text": "the red square"}]}
FILES = {
    "jsonl": "\n".join(json.dumps(r) for r in RECORDS) + "\n",
    "list": json.dumps(RECORDS, indent=2),
    "list on one line": json.dumps(RECORDS),
    "coco": json.dumps(COCO, indent=1),
    "csv": 'image,text,bbox\na.png,the red square,"[1, 2, 3, 4]"\n',
}


@pytest.mark.parametrize("content, loader, hint", [
    ("coco", "jsonl", "looks like a COCO-style JSON file: read it with load_coco_style (--data-format coco)"),
    ("list", "jsonl", "looks like one JSON list of records: write each record as a JSON object on a line of its own"),
    ("list on one line", "jsonl", "holds one JSON list, not one object per line. It looks like one JSON list"),
    ("csv", "jsonl", "looks like a CSV file: read it with load_csv (--data-format csv)"),
    ("jsonl", "coco", "looks like JSON Lines (one object per line): read it with load_jsonl (--data-format jsonl)"),
    ("list", "coco", "needs top-level 'images' and 'annotations' lists. It looks like one JSON list of records"),
    ("csv", "coco", "looks like a CSV file"),
    ("jsonl", "csv", "is JSON, not CSV. It looks like JSON Lines"),
    ("coco", "csv", "is JSON, not CSV. It looks like a COCO-style JSON file"),
])
def test_a_file_read_as_another_format_names_the_format_it_looks_like(tmp_path, content, loader, hint):
    """A file given with the wrong format was refused with the parser's words ("not valid JSON (Extra data)",
    "needs an image key ... found ['15]}', '20', ...]"); the refusal now names the loader that reads it."""
    path = tmp_path / "data.txt"
    path.write_text(FILES[content], encoding="utf-8")
    read = {"jsonl": lambda: load_jsonl(path, "xywh"), "coco": lambda: load_coco_style(path),
            "csv": lambda: load_csv(path, "xywh")}[loader]
    with pytest.raises(ValueError) as caught:
        read()
    assert hint in str(caught.value)


def test_a_broken_line_of_a_jsonl_file_names_no_other_format(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(FILES["jsonl"] + '{"image": "c.png", "text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data.jsonl:3: not valid JSON \([^)]*\)\.$"):
        load_jsonl(path, "xywh")


def test_cli_processor_with_another_vocabulary_of_the_same_size_is_named(workspace, tmp_path, caplog):
    """``--processor`` whose tokenizer has the adapter's size but other words for some ids was compared by its settings
    only (the size matched), so the boxes changed without a word."""
    import logging

    from transformers import BertTokenizer

    from m2ist.cli import loading as cli_loading
    from m2ist.processing import RECProcessor

    own = RECProcessor.from_pretrained(str(workspace / "adapter"))
    original = own.tokenizer.convert_ids_to_tokens(list(range(len(own.tokenizer))))
    words = [*original[:-2], original[-1], original[-2]]  # the last two ids trade words
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    other = RECProcessor(BertTokenizer(str(tmp_path / "vocab.txt")), own.image_processor,
                         max_query_len=own.max_query_len, lowercase=own.lowercase)
    other.save_pretrained(tmp_path / "processor")
    settings = {"model": {"adapter": str(workspace / "adapter"), "processor": str(tmp_path / "processor")}}
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        cli_loading.load_adapter(settings)
    first = len(words) - 2
    assert f"tokenizer vocabulary: adapter id {first} is {original[first]!r}, --processor id {first} is " \
           f"{words[first]!r}" in caplog.text
