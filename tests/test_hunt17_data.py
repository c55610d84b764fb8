"""Round 17 of the hunt for careless inputs in REC data loading: every loader names the loader that reads a file (or
folder) given to it in another format; COCO annotations that give no sample are counted and named; a box written
with decimal commas is refused, not misread; and careless exports (UTF-16, rows of empty cells, pandas list cells,
Windows paths, missing image names, repeated records, boolean box numbers, a wrong box format) are read right or
refused naming the record."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from m2ist.cli.data import load_data_splits
from m2ist.cli.errors import CLIError
from m2ist.data import RECDataset, RECDataWarning, RECSample
from m2ist.data.files import load_coco_style, load_csv, load_jsonl
from m2ist.data.hf import from_hf_dataset
from m2ist.data.refer import load_refer
from m2ist.data.transvg import load_transvg_split

RECORD = {"image": "a.png", "text": "the dog", "bbox": [1, 2, 3, 4]}
INSTANCES = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
             "annotations": [{"id": 7, "image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 1}]}
REFS = [{"ref_id": 0, "ann_id": 7, "image_id": 1, "split": "val", "sentences": [{"sent": "the dog", "sent_id": 0}]}]


@pytest.fixture
def sources(tmp_path) -> dict[str, Path]:
    """One file or folder of each kind the loaders read."""
    (tmp_path / "data.jsonl").write_text(json.dumps(RECORD) + "\n", encoding="utf-8")
    (tmp_path / "data.csv").write_text('image,text,bbox\na.png,the dog,"[1, 2, 3, 4]"\n', encoding="utf-8")
    torch.save([("a.png", "m.png", [1, 2, 3, 4], "the dog", [])], tmp_path / "unc_val.pth")
    dataset = tmp_path / "refer" / "refcoco"
    dataset.mkdir(parents=True)
    (dataset / "refs(unc).p").write_bytes(pickle.dumps(REFS, protocol=2))
    (dataset / "instances.json").write_text(json.dumps(INSTANCES), encoding="utf-8")
    return {"jsonl": tmp_path / "data.jsonl", "csv": tmp_path / "data.csv", "pth": tmp_path / "unc_val.pth",
            "refs": dataset / "refs(unc).p", "instances": dataset / "instances.json", "refer dataset": dataset}


TRANSVG_HINT = "It looks like a torch.save file (a TransVG split file, <ds>_<split>.pth): read it with load_transvg_split"
REFS_HINT = "It looks like a Python pickle (the refer toolkit's refs(<split_by>).p): read it with load_refer"


@pytest.mark.parametrize("source, loader, hint", [
    ("pth", "jsonl", TRANSVG_HINT),
    ("pth", "csv", TRANSVG_HINT),
    ("pth", "coco", TRANSVG_HINT),
    ("refs", "jsonl", REFS_HINT),
    ("refs", "coco", REFS_HINT),
    ("jsonl", "transvg", "It looks like JSON Lines (one object per line): read it with load_jsonl"),
    ("csv", "transvg", "It looks like a CSV file: read it with load_csv (--data-format csv)"),
    ("instances", "coco", "It looks like the refer toolkit's instances.json (boxes and image names, no expressions): "
                          "read it with load_refer"),
    ("jsonl", "hf", "from_hf_dataset takes rows"),
    ("refer dataset", "jsonl", "is a folder; give a regular file. It looks like one dataset folder of the refer toolkit"),
    ("refer dataset", "refer", "is itself a dataset folder (it holds refs(<split_by>).p): pass its parent"),
])
def test_every_loader_names_the_loader_of_a_source_in_another_format(sources, source, loader, hint):
    """Only the JSONL, CSV and COCO loaders named the format a wrong file looked like; a TransVG .pth read as JSONL
    said "not utf-8 text ... save the file as utf-8", a JSONL file read as a TransVG split "corrupted, or another
    format", the refer toolkit's instances.json read as COCO "put a 'text' key on each annotation"."""
    path = sources[source]
    read = {"jsonl": lambda: load_jsonl(path, "xywh"), "csv": lambda: load_csv(path, "xywh"),
            "coco": lambda: load_coco_style(path), "transvg": lambda: load_transvg_split(path, "unc"),
            "hf": lambda: from_hf_dataset(str(path), "xywh"), "refer": lambda: load_refer(path, "refcoco")}[loader]
    with pytest.raises((ValueError, TypeError, FileNotFoundError)) as caught:
        read()
    assert hint in str(caught.value)
    if loader == "hf":
        assert "It looks like JSON Lines" in str(caught.value)


def test_the_right_loader_still_reads_each_source(sources):
    assert load_refer(sources["refer dataset"].parent, "refcoco", split="val")[0].expression == "the dog"
    assert load_transvg_split(sources["pth"])[0].box == (1.0, 2.0, 4.0, 6.0)
    assert load_jsonl(sources["jsonl"], "xywh")[0].expression == "the dog"


def test_the_command_line_names_the_format_of_a_local_data_root_read_as_hf(sources):
    pytest.importorskip("datasets")
    with pytest.raises(CLIError, match=r"is no Hugging Face dataset.*It looks like the refer toolkit's data folder"):
        load_data_splits({"format": "hf", "data_root": str(sources["refer dataset"].parent)}, "eval")


def _coco(tmp_path: Path, annotations: list[dict]) -> Path:
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": annotations}))
    return path


def test_coco_annotations_without_a_text_key_are_counted_and_the_keys_named(tmp_path):
    """Annotations without a text key were skipped without a word: a file where half the annotations carry
    'expr' (no text key) loaded the other half silently."""
    annotations = [{"id": n, "image_id": 1, "bbox": [n, 2, 3, 4], **({"text": "the dog"} if n % 2 else {"expr": "x"})}
                   for n in range(1, 7)]
    with pytest.warns(UserWarning, match=r"rec\.json: 3 of 6 annotations have no text key \(one of \['text', "
                                         r".*first: annotations\[1\], id 2"):
        samples = load_coco_style(_coco(tmp_path, annotations))
    assert len(samples) == 3


def test_a_coco_text_key_differing_by_case_is_refused_and_a_file_without_any_counts_them(tmp_path):
    annotations = [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "text": "the dog"},
                   {"id": 2, "image_id": 1, "bbox": [1, 2, 3, 4], "Text": "the cat"}]
    with pytest.raises(ValueError, match=r"annotations\[1\]: no text key .*'Text' is not 'text'"):
        load_coco_style(_coco(tmp_path, annotations))
    with pytest.raises(ValueError, match=r"none of its 2 annotation\(s\) and 1 image entries has a text key"):
        load_coco_style(_coco(tmp_path, [{"id": n, "image_id": 1, "bbox": [1, 2, 3, 4]} for n in (1, 2)]))


def test_mdetr_style_referred_boxes_without_text_give_no_warning(tmp_path):
    path = tmp_path / "mdetr.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "caption": "the dog"}],
                                "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4]}]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.expression for s in load_coco_style(path)] == ["the dog"]


@pytest.mark.parametrize("box", ["[12,5, 30,0, 40,2, 50,1]", "1,5 2 3", "12,5;30,0;40,2;50,1", "[1,2, 3,4]"])
def test_a_box_mixing_decimal_commas_with_separators_is_refused_naming_the_row(tmp_path, box):
    """"1,5 2 3" was read as (1, 5, 2, 3) and "[12,5, 30,0, 40,2, 50,1]" was refused without saying why."""
    path = tmp_path / "boxes.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "bbox": box}) + "\n")
    with pytest.raises(ValueError, match=r"boxes\.jsonl:2: a box must be 4 numbers, and .* is ambiguous.*decimal comma"):
        load_jsonl(path, "xyxy")


@pytest.mark.parametrize("box", ["1,2,3,4", "1, 2, 3, 4", "1 2 3 4", "[1.5, 2, 3, 4]", "[ 1.5  2.  3.  4.]"])
def test_boxes_with_one_kind_of_separator_still_load(tmp_path, box):
    path = tmp_path / "boxes.jsonl"
    path.write_text(json.dumps({**RECORD, "bbox": box}) + "\n")
    assert load_jsonl(path, "xyxy")[0].box[1:] == (2.0, 3.0, 4.0)


@pytest.mark.parametrize("box, needle", [
    ("[12,5, 30,0, 40,2, 50,1]", r"a box must be 4 numbers.*decimal commas inside a JSON list"),  # decimal commas
    ("[true, 2, 3, 4]", r"a box must be 4 numbers, got \[True, 2, 3, 4\]"),  # float(True) is 1.0
])
def test_a_json_box_that_is_not_four_numbers_says_why(tmp_path, box, needle):
    path = tmp_path / "boxes.jsonl"
    path.write_text('{"image": "a.png", "text": "dog", "bbox": ' + box + "}\n")
    with pytest.raises(ValueError, match=r"boxes\.jsonl:1: " + needle):
        load_jsonl(path, "xyxy")


def test_a_careless_spreadsheet_export_loads_right(tmp_path):
    """A BOM, CRLF line ends, rows of empty cells left after the data (they failed: "a box must be 4 numbers, got
    ''") and a list cell written by pandas (it became one expression "['the dog', 'a cat']")."""
    path = tmp_path / "export.csv"
    path.write_bytes('\ufeffimage,text,bbox\r\nsub\\a.png,"[\'the dog\', \'a cat\']","[1, 2, 3, 4]"\r\n,,\r\n , ,\r\n\r\n'
                     .encode("utf-8"))
    samples = load_csv(path, "xyxy")
    assert [s.expression for s in samples] == ["the dog", "a cat"]
    assert samples[0].image == str(tmp_path / "sub" / "a.png")  # a Windows separator made a file name 'sub\a.png'


@pytest.mark.parametrize("image, needle", [
    (None, "the image is None, not a file name"),
    ("", "the image is '', not a file name"),
    (5, "the image is 5, not a file name"),
    ("C:\\data\\a.png", "is a Windows absolute path"),
])
def test_an_image_that_names_no_file_is_refused_naming_the_line(tmp_path, image, needle):
    """A null image became the path '<root>/None', an empty one the root folder itself."""
    path = tmp_path / "images.jsonl"
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({**RECORD, "image": image}) + "\n")
    with pytest.raises(ValueError, match=r"images\.jsonl:2: ") as caught:
        load_jsonl(path, "xyxy")
    assert needle in str(caught.value)


def test_a_utf16_file_is_named_as_utf16(tmp_path):
    path = tmp_path / "unicode.csv"
    path.write_bytes('image,text,bbox\na.png,dog,"[1, 2, 3, 4]"\n'.encode("utf-16"))
    with pytest.raises(ValueError, match=r"unicode\.csv:1: not utf-8 text .* It is UTF-16 text"):
        load_csv(path, "xyxy")


def test_repeated_records_are_counted_in_one_warning(tmp_path):
    path = tmp_path / "twice.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (RECORD, {**RECORD, "text": "a cat"}, RECORD, RECORD)))
    with pytest.warns(UserWarning, match=r"2 of 4 samples repeat an earlier one .*first .*twice\.jsonl:3, a copy of "
                                         r".*twice\.jsonl:1\)"):
        assert len(load_jsonl(path, "xyxy")) == 4


def test_a_bad_row_near_the_end_of_a_large_file_names_its_line(tmp_path):
    path = tmp_path / "large.csv"
    rows = ['a.png,the dog,"[1, 2, 3, 4]"'] * 20000 + ['a.png,the dog,"[1, 2, 3]"', 'a.png,the dog,"[1, 2, 3, 4]"']
    path.write_text("image,text,bbox\n" + "\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the repeated rows
        with pytest.raises(ValueError, match=r"large\.csv:20002: a box must be 4 numbers"):
            load_csv(path, "xyxy")


def test_boxes_of_a_wrong_format_are_named_when_clipped_and_dropped_boxes_name_their_line(tmp_path):
    """xyxy boxes loaded as xywh reach past the image and were clipped with only a count; a NaN box from the file was
    dropped naming the sample's index, not the line it came from."""
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    path = tmp_path / "wrong.jsonl"
    path.write_text(json.dumps({**RECORD, "bbox": [10, 10, 35, 28]}) + "\n"
                    + '{"image": "a.png", "text": "dog", "bbox": [1, 2, NaN, 4]}\n')
    with pytest.warns(RECDataWarning) as caught:
        RECDataset(load_jsonl(path, "xywh"))
    messages = [str(w.message) for w in caught]
    assert any("suggest a wrong box format" in m and "--box-format" in m for m in messages)
    assert any("Dropped 1 of 2" in m and "wrong.jsonl:2" in m for m in messages)


def test_one_box_a_pixel_past_the_edge_among_many_gives_no_format_hint(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    samples = [RECSample(str(tmp_path / "a.png"), f"dog {n}", (1.0, 2.0, 41.0 if n == 0 else 30.0, 20.0))
               for n in range(8)]
    with pytest.warns(RECDataWarning, match=r"Clipped 1 of 8") as caught:
        RECDataset(samples)
    assert not any("wrong box format" in str(w.message) for w in caught)
