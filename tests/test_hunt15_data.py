"""Round 15: the data loaders' remaining silent or confusing cases (a careless file is named, never half-read)."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import pytest
from PIL import Image

from m2ist.data import from_hf_dataset, load_coco_style, load_csv, load_jsonl, load_refer


def _image(folder: Path) -> Path:
    path = folder / "a.png"
    Image.new("RGB", (64, 48)).save(path)
    return path


def _coco(folder: Path, annotations: list[dict], images: list[dict] | None = None) -> Path:
    path = folder / "refs.json"
    images = [{"id": 1, "file_name": "a.png"}] if images is None else images
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def _refer(folder: Path, refs: list[dict]) -> Path:
    dataset = folder / "refer" / "refcoco"
    dataset.mkdir(parents=True)
    (dataset / "refs(unc).p").write_bytes(pickle.dumps(refs))
    annotations = [{"id": 1, "image_id": 1, "bbox": [1, 2, 10, 10]}, {"id": 2, "image_id": 1, "bbox": [5, 5, 10, 10]}]
    (dataset / "instances.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                                        "annotations": annotations}))
    return folder / "refer"


def _ref(ref_id: int, sentences: list, split: str | None = "train") -> dict:
    ref = {"ref_id": ref_id, "ann_id": 1 + ref_id % 2, "image_id": 1, "sentences": sentences}
    if split is not None:
        ref["split"] = split
    return ref


def _speechless_warnings(caught: list[warnings.WarningMessage]) -> list[warnings.WarningMessage]:
    return [w for w in caught if "list no expression" in str(w.message)]


def test_a_refer_ref_without_sentences_is_named_in_one_warning(tmp_path):
    _image(tmp_path)
    root = _refer(tmp_path, [_ref(1, [{"sent": "dog", "sent_id": 1}]), _ref(2, []), _ref(3, [])])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = load_refer(root, "refcoco", image_root=tmp_path)
    assert [s.expression for s in samples] == ["dog"]
    (warning,) = _speechless_warnings(caught)
    assert "2 ref(s)" in str(warning.message) and "ref_id=2" in str(warning.message)
    assert warning.filename == __file__  # points at the user's call, not inside the loader


def test_a_refer_ref_without_split_is_refused_when_a_split_is_asked(tmp_path):
    _image(tmp_path)
    root = _refer(tmp_path, [_ref(1, [{"sent": "dog"}]), _ref(2, [{"sent": "cat"}], split=None)])
    with pytest.raises(ValueError, match=r"ref_id=2: no 'split'"):
        load_refer(root, "refcoco", split="train", image_root=tmp_path)  # silently gave 'dog' alone
    assert len(load_refer(root, "refcoco", image_root=tmp_path)) == 2  # split=None: every ref, as stored


def test_coco_annotations_listing_no_expression_are_named_in_one_warning(tmp_path):
    _image(tmp_path)
    path = _coco(tmp_path, [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "text": []},
                            {"id": 2, "image_id": 1, "bbox": [1, 2, 3, 4], "sentences": []},
                            {"id": 3, "image_id": 1, "bbox": [1, 2, 3, 4], "text": "dog"}])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = load_coco_style(path)
    assert [s.expression for s in samples] == ["dog"]
    (warning,) = _speechless_warnings(caught)
    assert "2 annotation(s)" in str(warning.message) and "annotations[0]" in str(warning.message)
    assert warning.filename == __file__


def test_hf_rows_listing_no_expression_are_named_in_one_warning(tmp_path):
    image = str(_image(tmp_path))
    rows = [{"image": image, "text": [], "bbox": [1, 2, 3, 4]}, {"image": image, "text": ["dog"], "bbox": [1, 2, 3, 4]}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = from_hf_dataset(rows, "xyxy")
    assert [s.expression for s in samples] == ["dog"]
    (warning,) = _speechless_warnings(caught)
    assert "1 row(s)" in str(warning.message) and "row 0" in str(warning.message) and "'text'" in str(warning.message)
    assert warning.filename == __file__


def test_the_loaders_share_one_wording_for_records_without_expression(tmp_path):
    _image(tmp_path)
    path = tmp_path / "a.jsonl"
    path.write_text('{"image": "a.png", "text": [], "bbox": [1, 2, 3, 4]}\n'
                    '{"image": "a.png", "text": "x", "bbox": [1, 2, 3, 4]}\n')
    with pytest.warns(UserWarning, match=r"1 record\(s\) list no expression \(an empty list in the text field, first at "
                      r".*a\.jsonl:1\) and give no sample"):
        load_jsonl(path, "xyxy")


@pytest.mark.parametrize("document", [{"images": [], "annotations": []},
                                      {"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}])
def test_an_empty_coco_file_is_refused_naming_what_is_empty(tmp_path, document):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"empty\.json holds no .*annotations \(its list is empty\)"):
        load_coco_style(path)


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_a_csv_with_another_delimiter_says_which(tmp_path, delimiter):
    _image(tmp_path)
    path = tmp_path / "excel.csv"
    path.write_text(delimiter.join(["image", "text", "bbox"]) + "\n" + delimiter.join(["a.png", "dog", "1 2 3 4"]) + "\n")
    named = re.escape(repr(delimiter))
    with pytest.raises(ValueError, match=rf"seems to use {named}.*pass delimiter={named}"):
        load_csv(path, "xyxy")
    samples = load_csv(path, "xyxy", delimiter=delimiter)  # the fix the message names works
    assert [(s.expression, s.box) for s in samples] == [("dog", (1.0, 2.0, 3.0, 4.0))]


@pytest.mark.parametrize("given, delimiter", [(";", ";"), ("tab", "\t"), ("\\t", "\t")])
def test_the_command_line_reads_a_csv_with_the_delimiter_it_is_given(tmp_path, given, delimiter):
    """The message above names --csv-delimiter: the command line read commas only, so such a file had to be re-saved."""
    from m2ist.cli.data import load_data_splits
    from m2ist.cli.errors import CLIError

    _image(tmp_path)
    path = tmp_path / "excel.csv"
    path.write_text(delimiter.join(["image", "text", "bbox"]) + "\n" + delimiter.join(["a.png", "dog", "1 2 3 4"]) + "\n")
    data = {"format": "csv", "train_file": str(path), "box_format": "xyxy"}
    with pytest.raises(ValueError, match=r"on the command line: --csv-delimiter"):
        load_data_splits(data, "train")
    samples = load_data_splits({**data, "csv_delimiter": given}, "train")["train"]
    assert [(s.expression, s.box) for s in samples] == [("dog", (1.0, 2.0, 3.0, 4.0))]
    with pytest.raises(CLIError, match=r"must be one character between columns.*got 'semicolon'"):
        load_data_splits({**data, "csv_delimiter": "semicolon"}, "train")
    with pytest.raises(CLIError, match=r"applies to --data-format csv, not jsonl"):  # would be ignored
        load_data_splits({**data, "format": "jsonl", "csv_delimiter": given}, "train")


def test_a_csv_with_four_box_columns_and_semicolons_names_the_delimiter_not_a_field_count(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("image;text;x0;y0;x1;y1\na.png;dog;1,5;2;3;4\n")  # the decimal comma made "2 fields"
    with pytest.raises(ValueError, match=r"excel\.csv:1: the header is the one column"):
        load_csv(path, "xyxy")


@pytest.mark.parametrize("content", ["image;text;x0;y0;x1;y1\na.png;dog;12,5;2,5;30,5;40\n",
                                     "image;text;bbox\na.png;dog;12,5 2,5 30,5 40\n"])
def test_a_decimal_comma_in_a_box_is_named(tmp_path, content):
    path = tmp_path / "locale.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"locale\.csv:2: a box must be 4 numbers.*decimal comma"):
        load_csv(path, "xyxy", delimiter=";")


def test_a_jsonl_key_written_twice_is_refused(tmp_path):
    _image(tmp_path)
    path = tmp_path / "twice.jsonl"
    path.write_text('{"image": "a.png", "text": "the dog", "text": "the cat", "bbox": [1, 2, 3, 4]}\n')
    with pytest.raises(ValueError, match=r"twice\.jsonl:1: .*names the key 'text' twice"):
        load_jsonl(path, "xyxy")  # loaded 'the cat' alone


def test_a_coco_key_written_twice_is_refused(tmp_path):
    _image(tmp_path)
    path = tmp_path / "twice.json"
    path.write_text('{"images": [{"id": 1, "file_name": "a.png"}], "annotations": '
                    '[{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "bbox": [5, 6, 7, 8], "text": "dog"}]}')
    with pytest.raises(ValueError, match=r"twice\.json: .*names the key 'bbox' twice"):
        load_coco_style(path)


@pytest.mark.parametrize("header", ["Image,Text,bbox", " image , text ,bbox"])
def test_a_header_differing_by_case_or_spaces_is_named(tmp_path, header):
    path = tmp_path / "caps.csv"
    path.write_text(f"{header}\na.png,dog,1 2 3 4\n")
    with pytest.raises(ValueError, match=r"Names are matched exactly \('(Image|image )' is not 'image'"):
        load_csv(path, "xyxy")


def test_hf_and_coco_columns_differing_by_case_are_named(tmp_path):
    _image(tmp_path)
    with pytest.raises(ValueError, match=r"'Text' is not 'text'"):
        from_hf_dataset([{"image": "a.png", "Text": "dog", "bbox": [1, 2, 3, 4]}], "xyxy")
    path = _coco(tmp_path, [{"id": 1, "image_id": 1, "bbox": [1, 2, 3, 4], "Caption": "dog"}])
    with pytest.raises(ValueError, match=r"'Caption' is not 'caption'"):
        load_coco_style(path)


def test_careless_csv_that_already_loads_keeps_loading(tmp_path):
    """A BOM (Excel "CSV UTF-8"), Windows line endings and a JSON list as the box read as meant."""
    _image(tmp_path)
    path = tmp_path / "excel.csv"
    path.write_bytes('\ufeffimage,text,bbox\r\na.png,dog,"[1, 2, 3, 4]"\r\n'.encode())
    samples = load_csv(path, "xyxy")
    assert [(s.expression, s.box) for s in samples] == [("dog", (1.0, 2.0, 3.0, 4.0))]


def test_hf_rows_that_all_list_no_expression_are_refused_at_load():
    """Every row empty gave ``[]`` after the warning, refused only later by RECDataset ("No valid samples among 0")."""
    rows = [{"image": Image.new("RGB", (20, 20)), "text": [], "bbox": [1, 2, 3, 4]}] * 2
    with pytest.raises(ValueError, match=r"Every row read \(2, first at row 0\) lists no expression in the column 'text'"):
        from_hf_dataset(rows, box_format="xyxy")
