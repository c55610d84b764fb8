"""REC loaders on fixtures in their real on-disk formats: refer pickles + instances.json, TransVG .pth files,
Hugging Face rows (jxu124 and lmms-lab styles), JSONL/CSV/COCO files; and the restricted unpickler."""

from __future__ import annotations

import csv
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2ist.data import (
    DeferredImage,
    RECSample,
    from_hf_dataset,
    load_coco_style,
    load_csv,
    load_image,
    load_jsonl,
    load_refer,
    load_transvg_split,
    restricted_load,
)
from m2ist.data.safe_pickle import restricted_loads


def _save_image(path: Path, size=(64, 48), color=(120, 60, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _close(box, expected):
    return box == pytest.approx(expected, abs=1e-9)


# =========================================================================== refer layout
COCO_NAME = "COCO_train2014_{:012d}.jpg"


def _refs() -> list[dict]:
    """Refs exactly as the refer toolkit stores them (the file_name carries an ann_id suffix: not a real file)."""

    def sentence(sent_id: int, raw: str) -> dict:
        return {"tokens": raw.lower().split(), "raw": raw, "sent_id": sent_id, "sent": raw.lower()}

    return [
        {
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000000011_101.jpg",
            "ann_id": 101,
            "ref_id": 0,
            "image_id": 11,
            "split": "train",
            "sentences": [sentence(0, "Man in Red"), sentence(1, "left guy")],
            "category_id": 1,
        },
        {
            "sent_ids": [2],
            "file_name": "COCO_train2014_000000000011_102.jpg",
            "ann_id": 102,
            "ref_id": 1,
            "image_id": 11,
            "split": "val",
            "sentences": [sentence(2, "the dog")],
            "category_id": 18,
        },
        {
            "sent_ids": [3, 4, 5],
            "file_name": "COCO_train2014_000000000022_201.jpg",
            "ann_id": 201,
            "ref_id": 2,
            "image_id": 22,
            "split": "testA",
            "sentences": [sentence(3, "woman"), sentence(4, "lady on right"), sentence(5, "person in blue")],
            "category_id": 1,
        },
    ]


def _instances() -> dict:
    return {
        "images": [
            {"id": 11, "file_name": COCO_NAME.format(11), "width": 64, "height": 48},
            {"id": 22, "file_name": COCO_NAME.format(22), "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 101, "image_id": 11, "bbox": [10.5, 20.0, 30.0, 15.25], "category_id": 1},
            {"id": 102, "image_id": 11, "bbox": [0, 0, 5, 6], "category_id": 18},
            {"id": 201, "image_id": 22, "bbox": [1, 2, 3, 4], "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
    }


@pytest.fixture
def refer_root(tmp_path) -> Path:
    root = tmp_path / "refer_data"
    (root / "refcoco").mkdir(parents=True)
    with open(root / "refcoco" / "refs(unc).p", "wb") as handle:
        pickle.dump(_refs(), handle, protocol=2)
    (root / "refcoco" / "instances.json").write_text(json.dumps(_instances()))
    image_dir = root / "images" / "mscoco" / "images" / "train2014"
    _save_image(image_dir / COCO_NAME.format(11), (64, 48))
    _save_image(image_dir / COCO_NAME.format(22), (40, 30))
    return root


def test_refer_gives_one_sample_per_sentence_with_xyxy_boxes(refer_root):
    samples = load_refer(refer_root, "refcoco", "unc")
    assert len(samples) == 6
    assert all(isinstance(sample, RECSample) for sample in samples)
    assert [s.expression for s in samples[:3]] == ["man in red", "left guy", "the dog"]
    assert _close(samples[0].box, (10.5, 20.0, 40.5, 35.25))  # xywh [10.5, 20, 30, 15.25]
    assert _close(samples[1].box, (10.5, 20.0, 40.5, 35.25))
    assert _close(samples[2].box, (0, 0, 5, 6))
    assert _close(samples[5].box, (1, 2, 4, 6))
    assert samples[0].image_id == 11
    assert samples[0].metadata == {
        "dataset": "refcoco",
        "split_by": "unc",
        "split": "train",
        "ref_id": 0,
        "ann_id": 101,
        "sent_id": 0,
        "category_id": 1,
    }
    assert [s.metadata["sent_id"] for s in samples] == [0, 1, 2, 3, 4, 5]


def test_refer_image_path_comes_from_instances_json_not_the_refs_file_name(refer_root):
    samples = load_refer(refer_root, "refcoco")
    expected = refer_root / "images" / "mscoco" / "images" / "train2014" / COCO_NAME.format(11)
    assert samples[0].image == str(expected) and expected.is_file()
    custom = load_refer(refer_root, "refcoco", image_root="/data/coco/train2014")
    assert custom[-1].image == str(Path("/data/coco/train2014") / COCO_NAME.format(22))


@pytest.mark.parametrize(
    ("split", "expected_refs"),
    [("val", [1]), ("testa", [2, 2, 2]), (["train", "testA"], [0, 0, 2, 2, 2]), ("all", [0, 0, 1, 2, 2, 2])],
)
def test_refer_split_filtering(refer_root, split, expected_refs):
    samples = load_refer(refer_root, "refcoco", "unc", split)
    assert [s.metadata["ref_id"] for s in samples] == expected_refs


def test_refer_unknown_split_lists_the_available_ones(refer_root):
    with pytest.raises(ValueError, match=r"no split 'test'.*testA.*train.*val"):
        load_refer(refer_root, "refcoco", split="test")


def test_refer_raw_sentences_on_request(refer_root):
    samples = load_refer(refer_root, "refcoco", sentence_field="raw")
    assert samples[0].expression == "Man in Red"


def test_refer_missing_refs_file_says_which_exist(refer_root):
    with pytest.raises(FileNotFoundError, match=r"refs\(google\)\.p.*refs\(unc\)\.p"):
        load_refer(refer_root, "refcoco", "google")
    with pytest.raises(FileNotFoundError, match="refcocog"):
        load_refer(refer_root, "refcocog")


def _py2_pickle(obj) -> bytes:
    """Encode ``obj`` the way Python 2's cPickle (protocol 2) does: ``str`` as 8-bit SHORT_BINSTRING/BINSTRING."""

    def encode(value) -> bytes:
        if isinstance(value, bytes):  # a Python-2 str
            if len(value) < 256:
                return b"U" + bytes([len(value)]) + value
            return b"T" + struct.pack("<i", len(value)) + value
        if isinstance(value, str):  # a Python-2 unicode object
            data = value.encode("utf-8")
            return b"X" + struct.pack("<I", len(data)) + data
        if isinstance(value, bool):
            return b"\x88" if value else b"\x89"
        if isinstance(value, int):
            return b"J" + struct.pack("<i", value)
        if isinstance(value, float):
            return b"G" + struct.pack(">d", value)
        if isinstance(value, list):
            return b"](" + b"".join(encode(item) for item in value) + b"e"
        if isinstance(value, set):  # c__builtin__\nset + ([items],) + REDUCE
            return b"c__builtin__\nset\n](" + b"".join(encode(item) for item in value) + b"e\x85R"
        if isinstance(value, dict):
            return b"}(" + b"".join(encode(k) + encode(v) for k, v in value.items()) + b"u"
        raise TypeError(type(value))

    return b"\x80\x02" + encode(obj) + b"."


def test_refer_reads_a_python2_pickle_and_repairs_utf8_bytes(tmp_path):
    root = tmp_path / "refer"
    (root / "refcoco+").mkdir(parents=True)
    ref = {
        b"sent_ids": [7],
        b"file_name": b"COCO_train2014_000000000011_101.jpg",
        b"ann_id": 101,
        b"ref_id": 5,
        b"image_id": 11,
        b"split": b"testB",
        b"sentences": [{b"tokens": [b"caf\xc3\xa9"], b"raw": b"Caf\xc3\xa9 sign", b"sent_id": 7, b"sent": "café sign"}],
        b"category_id": 1,
        b"tags": {b"a"},
    }
    (root / "refcoco+" / "refs(unc).p").write_bytes(_py2_pickle([ref]))
    (root / "refcoco+" / "instances.json").write_text(json.dumps(_instances()))
    samples = load_refer(root, "refcoco+", split="testB", sentence_field="raw")
    assert len(samples) == 1
    assert samples[0].expression == "Café sign"  # UTF-8 bytes stored in a py2 str, read back intact
    assert samples[0].metadata["split"] == "testB" and samples[0].metadata["sent_id"] == 7
    assert _close(samples[0].box, (10.5, 20.0, 40.5, 35.25))
    assert load_refer(root, "refcoco+", sentence_field="sent")[0].expression == "café sign"


# =========================================================================== restricted unpickler
class _RunsAShellCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_restricted_load_refuses_os_system_and_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([{"ref_id": 0}, _RunsAShellCommand(f"touch {marker}")], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"(posix|os|nt)\.system.*refs\(unc\)\.p.*JSON") as caught:
        restricted_load(evil)
    assert "could run code" in str(caught.value)
    assert not marker.exists()


def test_load_refer_refuses_a_malicious_refs_pickle(refer_root, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsAShellCommand(f"touch {marker}"), protocol=2)
    (refer_root / "refcoco" / "refs(unc).p").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_refer(refer_root, "refcoco")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_restricted_load_allows_builtin_containers_and_scalars(protocol):
    data = {"a": [1, 2.5, None, True], "b": ("x", b"\x00\xff", bytearray(b"ab")), "c": {1, 2}, "d": frozenset({3})}
    assert restricted_loads(pickle.dumps(data, protocol=protocol)) == data


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",  # an allowed module, a forbidden name
        b"c__builtin__\ngetattr\n(S'x'\nS'y'\ntR.",
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.",  # only latin-1 is allowed
        b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.",  # bytes(2**30): a sized buffer
    ],
    ids=["eval", "getattr", "codecs-rot13", "bytes-of-size"],
)
def test_restricted_load_refuses_other_globals(payload):
    with pytest.raises(pickle.UnpicklingError, match="Refused"):
        restricted_loads(payload)


# =========================================================================== TransVG split files
class _Opaque:
    """Stands for any non-container object a split file might hold."""


def test_transvg_unc_rows_are_xywh(tmp_path):
    rows = [
        ("COCO_train2014_000000000011.jpg", "11_1.pth", [10.0, 20.0, 30.0, 40.0], "man in red", [("man", "red")]),
        ("COCO_train2014_000000000022.jpg", "22_1.pth", [1, 2, 3, 4], "dog", []),
    ]
    file = tmp_path / "unc_testB.pth"
    torch.save(rows, file)
    samples = load_transvg_split(file, "unc", image_root=tmp_path / "train2014")
    assert [s.expression for s in samples] == ["man in red", "dog"]
    assert _close(samples[0].box, (10, 20, 40, 60)) and _close(samples[1].box, (1, 2, 4, 6))
    assert samples[0].image == str(tmp_path / "train2014" / "COCO_train2014_000000000011.jpg")
    assert samples[0].metadata == {"dataset": "unc", "split": "testB", "row": 0, "mask_file": "11_1.pth"}


def test_transvg_referit_rows_are_already_xyxy(tmp_path):
    file = tmp_path / "referit_test.pth"
    torch.save([("8756.jpg", "8756_1.pth", [5, 6, 50, 60], "sky", [])], file)
    (sample,) = load_transvg_split(file, "referit", image_root="referit/images")
    assert _close(sample.box, (5, 6, 50, 60))
    assert sample.image == str(Path("referit/images/8756.jpg"))


def test_transvg_flickr_rows_are_three_tuples_in_xyxy(tmp_path):
    file = tmp_path / "flickr_val.pth"
    torch.save([("1000092795.jpg", [12, 13, 100, 200], "two young guys")], file)
    (sample,) = load_transvg_split(file, "flickr")
    assert _close(sample.box, (12, 13, 100, 200))
    assert sample.expression == "two young guys" and sample.image_id == "1000092795.jpg"


def test_transvg_dataset_and_split_are_inferred_and_folders_resolved(tmp_path):
    folder = tmp_path / "split" / "gref_umd"
    folder.mkdir(parents=True)
    torch.save([("a.jpg", "a.pth", [0, 0, 2, 2], "thing", [])], folder / "gref_umd_val.pth")
    (inferred,) = load_transvg_split(folder / "gref_umd_val.pth")
    assert inferred.metadata["dataset"] == "gref_umd" and inferred.metadata["split"] == "val"
    assert _close(inferred.box, (0, 0, 2, 2))  # xywh
    (from_root,) = load_transvg_split(tmp_path / "split", "gref_umd", split="val")
    assert from_root.box == inferred.box
    for spelling in ("validation", "VAL", "dev"):  # one split, every spelling (as for refer and Hub data)
        (aliased,) = load_transvg_split(tmp_path / "split", "gref_umd", split=spelling)
        assert aliased.box == inferred.box
    torch.save([("b.jpg", "b.pth", [0, 0, 4, 4], "other", [])], tmp_path / "split" / "unc_testA.pth")
    (test_a,) = load_transvg_split(tmp_path / "split", "unc", split="testa")
    assert test_a.expression == "other"
    with pytest.raises(FileNotFoundError, match=r"gref_umd_test\.pth"):
        load_transvg_split(tmp_path / "split", "gref_umd", split="test")


def test_transvg_numpy_boxes_load_without_unrestricted_unpickling(tmp_path):
    file = tmp_path / "unc+_train.pth"
    torch.save([("a.jpg", "m.pth", np.array([1.0, 2.0, 3.0, 4.0]), "cup", []), ("b.jpg", "m", [np.int64(2)] * 4, "x", [])], file)
    samples = load_transvg_split(file)
    assert _close(samples[0].box, (1, 2, 4, 6)) and _close(samples[1].box, (2, 2, 4, 4))


def test_transvg_file_needing_full_unpickling_is_refused_with_advice(tmp_path):
    file = tmp_path / "unc_val.pth"
    torch.save([("a.jpg", "m.pth", [0, 0, 1, 1], "x", _Opaque())], file)
    with pytest.raises(pickle.UnpicklingError, match=r"unrestricted unpickling.*_Opaque.*trusted=True.*convert"):
        load_transvg_split(file, "unc")
    assert len(load_transvg_split(file, "unc", trusted=True)) == 1  # only when the user asks


def test_transvg_wrong_dataset_for_the_row_layout_is_explained(tmp_path):
    file = tmp_path / "flickr_test.pth"
    torch.save([("a.jpg", [0, 0, 1, 1], "x")], file)
    with pytest.raises(ValueError, match=r"row 0.*\(img_file, mask_file, bbox, phrase, attri\).*3 fields"):
        load_transvg_split(file, "unc")
    with pytest.raises(ValueError, match="Unknown TransVG dataset 'refcoco'"):
        load_transvg_split(file, "refcoco")


# =========================================================================== Hugging Face rows
def _jxu124_rows() -> list[dict]:
    return [
        {
            "ref_id": 0,
            "ann_id": 101,
            "image_id": 11,
            "category_id": 1,
            "split": "train",
            "sent_ids": [0, 1],
            "file_name": "COCO_train2014_000000000011_101.jpg",
            "sentences": [{"raw": "Man in Red", "sent": "man in red", "sent_id": 0}, {"raw": "Left", "sent": "left"}],
            "image_path": "coco/train2014/" + COCO_NAME.format(11),
            "bbox": [10.0, 20.0, 40.0, 60.0],
        },
        {
            "ref_id": 1,
            "ann_id": 102,
            "image_id": 22,
            "category_id": 18,
            "split": "val",
            "sent_ids": [2],
            "file_name": "COCO_train2014_000000000022_102.jpg",
            "sentences": ["the dog"],
            "image_path": "coco/train2014/" + COCO_NAME.format(22),
            "bbox": [1.0, 2.0, 3.0, 4.0],
        },
    ]


def test_jxu124_rows_give_one_sample_per_sentence_with_xyxy_boxes(tmp_path):
    train2014 = tmp_path / "coco_images" / "train2014"
    _save_image(train2014 / COCO_NAME.format(11))
    samples = from_hf_dataset(_jxu124_rows(), image_root=train2014)
    assert [s.expression for s in samples] == ["man in red", "left", "the dog"]
    assert _close(samples[0].box, (10, 20, 40, 60)) and _close(samples[2].box, (1, 2, 3, 4))
    # image_path repeats "coco/train2014/" under a root that already is train2014: the overlap is dropped
    assert samples[0].image == str(train2014 / COCO_NAME.format(11))
    assert samples[2].image == str(train2014 / COCO_NAME.format(22))
    assert samples[0].image_id == 11
    assert samples[0].metadata["sent_id"] == 0 and samples[1].metadata["sent_id"] == 1
    assert samples[2].metadata["split"] == "val" and samples[2].metadata["ref_id"] == 1
    raw = from_hf_dataset(_jxu124_rows(), sentence_field="raw")
    assert raw[0].expression == "Man in Red"
    assert raw[0].image == "coco/train2014/" + COCO_NAME.format(11)  # no root: kept as stored


def test_jxu124_rows_with_only_captions():
    row = {key: value for key, value in _jxu124_rows()[1].items() if key != "sentences"}
    samples = from_hf_dataset([{**row, "captions": ["the dog", "brown dog"]}])
    assert [s.expression for s in samples] == ["the dog", "brown dog"]
    assert all(_close(s.box, (1, 2, 3, 4)) for s in samples)


def test_jxu124_split_by_column_and_by_subset_name():
    rows = _jxu124_rows()
    assert [s.metadata["ref_id"] for s in from_hf_dataset(rows, split="val")] == [1]
    assert [s.metadata["ref_id"] for s in from_hf_dataset(rows, split="validation")] == [1]
    as_dict = {"train": [rows[0]], "validation": [rows[1]]}
    assert [s.expression for s in from_hf_dataset(as_dict, split="val")] == ["the dog"]
    assert len(from_hf_dataset(as_dict)) == 3
    with pytest.raises(ValueError, match=r"No rows with split in \['testb'\].*\['train', 'val'\]"):
        from_hf_dataset(rows, split="testB")


def _lmms_rows() -> list[dict]:
    image = Image.new("RGB", (50, 40), (9, 9, 9))
    prompt = "Please carefully observe the area circled in the image and come up with a caption for the area."
    return [
        {
            "question_id": "101",
            "image": image,
            "question": prompt,
            "answer": ["man in red", "left guy"],
            "segmentation": [],
            "bbox": [10.0, 5.0, 20.0, 30.0],
            "iscrowd": 0,
            "file_name": COCO_NAME.format(11),
        }
    ]


def test_lmms_lab_rows_use_the_answers_and_xywh_boxes():
    samples = from_hf_dataset(_lmms_rows())
    assert [s.expression for s in samples] == ["man in red", "left guy"]  # not the captioning prompt
    assert all(_close(s.box, (10, 5, 30, 35)) for s in samples)
    assert isinstance(samples[0].image, DeferredImage) and load_image(samples[0].image).size == (50, 40)  # lazy
    assert samples[0].metadata["question_id"] == "101" and samples[0].image_id == COCO_NAME.format(11)


def test_lmms_lab_embedded_image_bytes_are_decoded(tmp_path):
    path = _save_image(tmp_path / "x.png", (30, 20))
    row = {**_lmms_rows()[0], "image": {"bytes": path.read_bytes(), "path": None}}
    (first, _) = from_hf_dataset([row])
    assert isinstance(first.image, DeferredImage) and load_image(first.image).size == (30, 20)


def test_lmms_lab_has_no_train_split_and_never_falls_back_to_val():
    as_dict = {"val": _lmms_rows(), "testA": _lmms_rows()}
    with pytest.raises(ValueError, match="no train split"):
        from_hf_dataset(as_dict, split="train")
    with pytest.raises(ValueError, match="no train split"):
        from_hf_dataset(_lmms_rows(), split="train")
    samples = from_hf_dataset(as_dict, split="testA")
    assert len(samples) == 2 and {s.metadata["split"] for s in samples} == {"testA"}


def test_generic_rows_require_a_box_format():
    rows = [{"image": "a.jpg", "text": "red ball", "bbox": [10, 10, 4, 6]}]
    with pytest.raises(ValueError, match="box_format='xyxy'"):
        from_hf_dataset(rows)
    with pytest.warns(UserWarning, match=r"None of the first 1 images were found under image_root=/imgs"):
        (sample,) = from_hf_dataset(rows, box_format="cxcywh", image_root="/imgs")
    assert _close(sample.box, (8, 7, 12, 13))
    assert sample.image == str(Path("/imgs/a.jpg"))


def test_generic_rows_with_normalized_boxes_and_a_chosen_text_column():
    image = Image.new("RGB", (200, 100))
    rows = [{"picture": image, "image": image, "question": "the cat", "box": [0.1, 0.2, 0.5, 0.6]}]
    (sample,) = from_hf_dataset(rows, box_format="xyxy", text_column="question", normalized=True)
    assert sample.expression == "the cat"
    assert _close(sample.box, (20, 20, 100, 60))


def test_box_format_against_a_known_style_warns():
    with pytest.warns(UserWarning, match="store bbox as xywh"):
        (first, _) = from_hf_dataset(_lmms_rows(), box_format="xyxy")
    assert _close(first.box, (10, 5, 20, 30))


# =========================================================================== plain user files
def test_jsonl_xywh_with_aliases_lists_and_paths_relative_to_the_file(tmp_path):
    lines = [
        {"image": "imgs/a.jpg", "text": "red ball", "bbox": [10, 20, 30, 40], "image_id": "a", "source_id": 7},
        {"image": "/abs/b.jpg", "expression": ["blue cup", "cup on left"], "box": "[1, 2, 3, 4]"},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    samples = load_jsonl(path, box_format="xywh")
    assert [s.expression for s in samples] == ["red ball", "blue cup", "cup on left"]
    assert _close(samples[0].box, (10, 20, 40, 60)) and _close(samples[1].box, (1, 2, 4, 6))
    assert samples[0].image == str(tmp_path / "imgs" / "a.jpg") and samples[1].image == "/abs/b.jpg"
    assert samples[0].image_id == "a" and samples[0].metadata["source_id"] == 7
    assert samples[0].metadata["source"] == f"{path}:1"
    loaded = load_jsonl(path, "xywh", image_root="/root", allow_outside_image_root=True)
    assert loaded[0].image == str(Path("/root/imgs/a.jpg")) and loaded[1].image == "/abs/b.jpg"
    with pytest.raises(ValueError, match=r"data.jsonl:2: the image path '/abs/b.jpg' leads outside the image root"):
        load_jsonl(path, "xywh", image_root="/root")  # an absolute path elsewhere escapes an explicit root


def test_jsonl_normalized_boxes_use_width_height_or_the_image_header(tmp_path):
    _save_image(tmp_path / "b.png", (80, 40))
    path = tmp_path / "norm.jsonl"
    rows = [
        {"image": "a.jpg", "text": "x", "bbox": [0.5, 0.5, 0.2, 0.4], "width": 200, "height": 100},
        {"image": "b.png", "text": "y", "bbox": [0.5, 0.5, 1.0, 1.0]},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    first, second = load_jsonl(path, "cxcywh", normalized=True)
    assert _close(first.box, (80, 30, 120, 70))
    assert _close(second.box, (0, 0, 80, 40))


def test_jsonl_errors_name_the_line_and_need_a_box_format(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "text": "x", "bbox": [1, 2, 3]}) + "\n{not json\n")
    with pytest.raises(ValueError, match="box_format"):
        load_jsonl(path, None)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_jsonl(path, "xyxy")
    path.write_text(json.dumps({"image": "a.jpg", "text": "x", "bbox": [1, 2, 3]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a box must be 4 numbers"):
        load_jsonl(path, "xyxy")


def test_csv_with_a_bbox_column_or_four_box_columns(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "phrase", "bbox", "split"])
        writer.writerow(["a.jpg", "red ball", "10, 20, 30, 40", "train"])
        writer.writerow(["b.jpg", "blue cup", "[1 2 3 4]", "val"])
    samples = load_csv(path, "xyxy", image_root="/imgs")
    assert [s.expression for s in samples] == ["red ball", "blue cup"]
    assert _close(samples[0].box, (10, 20, 30, 40)) and _close(samples[1].box, (1, 2, 3, 4))
    assert samples[0].image == str(Path("/imgs/a.jpg")) and samples[1].metadata["split"] == "val"

    columns = tmp_path / "columns.csv"
    columns.write_text("image,text,x,y,w,h\na.jpg,cat,1,2,3,4\n")
    (sample,) = load_csv(columns, "xywh")
    assert _close(sample.box, (1, 2, 4, 6))
    with pytest.raises(ValueError, match=r"columns.csv:2: no box.*x0,y0,x1,y1"):
        load_csv(columns, "xyxy")


def test_coco_style_with_expressions_on_annotations(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 50}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [10, 10, 20, 30], "category_id": 3, "sentences": ["dog", "brown dog"]},
            {"id": 11, "image_id": 1, "bbox": [0, 0, 5, 5], "text": "ball"},
        ],
    }
    path = tmp_path / "refs.json"
    path.write_text(json.dumps(data))
    samples = load_coco_style(path, image_root="/coco")
    assert [s.expression for s in samples] == ["dog", "brown dog", "ball"]
    assert _close(samples[0].box, (10, 10, 30, 40)) and _close(samples[2].box, (0, 0, 5, 5))
    assert samples[0].image == str(Path("/coco/a.jpg")) and samples[0].metadata["ann_id"] == 10


def test_coco_style_mdetr_layout_with_captions_on_image_entries(tmp_path):
    data = {
        "images": [
            {"id": 0, "file_name": "COCO_train2014_000000000011.jpg", "caption": "man in red", "original_id": 11},
            {"id": 1, "file_name": "COCO_train2014_000000000011.jpg", "caption": "left guy", "original_id": 11},
        ],
        "annotations": [
            {"id": 0, "image_id": 0, "bbox": [10, 20, 30, 40], "category_id": 1},
            {"id": 1, "image_id": 1, "bbox": [0.1, 0.2, 0.3, 0.4], "category_id": 1},
        ],
    }
    path = tmp_path / "final_refcoco_val.json"
    path.write_text(json.dumps(data))
    samples = load_coco_style(path, "xywh")
    assert [s.expression for s in samples] == ["man in red", "left guy"]
    assert samples[0].image_id == 11 and _close(samples[0].box, (10, 20, 40, 60))
    assert samples[0].image == str(tmp_path / "COCO_train2014_000000000011.jpg")

    data["annotations"].append({"id": 2, "image_id": 0, "bbox": [1, 1, 1, 1]})
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="has 2 annotations"):
        load_coco_style(path)
