"""Well-formed files of the real REC formats are read as rec-data.md says (round-4 fault hunt, formats): the
sentence field asked for is the one read, a ``datasets`` ``Sequence`` of sentence dicts gives one sample per
sentence, a TransVG file is never read with another dataset's box convention, Hugging Face rows state their image
size, and a Hub subset whose rows belong to another split says so."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from m2ist.data import RECDataset, from_hf_dataset, load_refer, load_transvg_split

COCO = "COCO_train2014_{:012d}.jpg"


def _refer_root(tmp_path: Path) -> Path:
    """A refcoco folder as the refer toolkit ships it: one ref, two sentences whose tokens differ from ``sent``."""
    dataset = tmp_path / "refcoco"
    dataset.mkdir()
    sentences = [
        {"tokens": ["man", "'s", "hat"], "raw": "Man's hat", "sent_id": 0, "sent": "mans hat"},
        {"tokens": ["left", "guy"], "raw": "Left guy", "sent_id": 1, "sent": "left guy"},
    ]
    refs = [{"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000011_101.jpg", "ann_id": 101, "ref_id": 0,
             "image_id": 11, "split": "val", "sentences": sentences, "category_id": 1}]
    (dataset / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    instances = {"images": [{"file_name": COCO.format(11), "height": 48, "width": 64, "id": 11}],
                 "annotations": [{"image_id": 11, "bbox": [1.5, 2.0, 10.0, 20.0], "category_id": 1, "id": 101}]}
    (dataset / "instances.json").write_text(json.dumps(instances))
    return tmp_path


def test_sentence_field_is_the_one_read(tmp_path):
    root = _refer_root(tmp_path)
    assert [s.expression for s in load_refer(root, split="val", image_root=tmp_path)] == ["mans hat", "left guy"]
    assert [s.expression for s in load_refer(root, split="val", image_root=tmp_path, sentence_field="raw")] == [
        "Man's hat", "Left guy"]
    tokens = load_refer(root, split="val", image_root=tmp_path, sentence_field="tokens")
    assert [s.expression for s in tokens] == ["man 's hat", "left guy"]  # was silently 'sent'
    for typo in ("Raw", "snt", "token"):  # were silently 'sent'
        with pytest.raises(ValueError, match=rf"sentence_field={typo!r}.*'sent', 'raw', 'tokens'"):
            load_refer(root, split="val", image_root=tmp_path, sentence_field=typo)
    rows = [{"image": "a.jpg", "text": [{"sent": "the dog", "sent_id": 3}], "bbox": [1, 2, 3, 4]}]
    with pytest.raises(ValueError, match=r"row 0: sentence_field='raw', but the sentence .* has no 'raw'"):
        from_hf_dataset(rows, "xyxy", sentence_field="raw")  # was silently 'sent'


def test_columnar_sentences_give_one_sample_per_sentence():
    datasets = pytest.importorskip("datasets")
    value = datasets.Value
    sentence = {"raw": value("string"), "sent": value("string"), "sent_id": value("int64"),
                "tokens": datasets.Sequence(value("string"))}
    features = datasets.Features({"image_path": value("string"), "bbox": datasets.Sequence(value("float32")),
                                  "split": value("string"), "sentences": datasets.Sequence(sentence)})
    table = datasets.Dataset.from_dict(
        {"image_path": ["coco/train2014/a.jpg"], "bbox": [[1, 2, 30, 40]], "split": ["train"],
         "sentences": [{"raw": ["Woman in Front", "lady"], "sent": ["woman in front", "lady"], "sent_id": [0, 1],
                        "tokens": [["woman", "in", "front"], ["lady"]]}]}, features=features)
    assert isinstance(table[0]["sentences"], dict)  # one list per field, as datasets returns a Sequence of dicts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no image under the root
        samples = from_hf_dataset(table, image_root="/nonexistent")
        raw = from_hf_dataset(table, image_root="/nonexistent", sentence_field="raw")
    # was one sample "['woman', 'in', 'front'] ['lady']" with sent_id [0, 1]
    assert [(s.expression, s.metadata["sent_id"]) for s in samples] == [("woman in front", 0), ("lady", 1)]
    assert [s.expression for s in raw] == ["Woman in Front", "lady"]
    uneven = [{"image": "a.jpg", "text": {"sent": ["a", "b"], "sent_id": [0]}, "bbox": [1, 2, 3, 4]}]
    with pytest.raises(ValueError, match=r"row 0: the sentences .* one list per field, of different lengths"):
        from_hf_dataset(uneven, "xyxy")


def test_transvg_file_is_never_read_with_another_box_convention(tmp_path):
    file = tmp_path / "referit_test.pth"
    torch.save([("8756.jpg", "8756_1.mat", [10, 20, 110, 220], "sky", [])], file)
    assert load_transvg_split(file)[0].box == (10.0, 20.0, 110.0, 220.0)
    # e.g. `m2ist eval --dataset unc --eval-file referit=referit_test.pth`: every xyxy box was read as xywh
    with pytest.raises(ValueError, match=r"referit_test.pth is named as a 'referit' split file .* xyxy boxes\), but "
                                         r"dataset='unc' reads .* xywh boxes.*Pass dataset='referit'"):
        load_transvg_split(file, "unc")
    same = tmp_path / "gref_val.pth"  # same rows, same boxes: another name of the same convention is fine
    torch.save([("a.jpg", "m", [10, 20, 100, 200], "x", [])], same)
    assert load_transvg_split(same, "gref_umd")[0].box == (10.0, 20.0, 110.0, 220.0)


def test_hub_rows_state_their_image_size(tmp_path):
    Image.new("RGB", (32, 24)).save(tmp_path / COCO.format(1))  # a downscaled copy of a 64x48 COCO image
    info = json.dumps({"file_name": COCO.format(1), "height": 48, "width": 64, "id": 1})
    jxu124 = [{"image_path": f"coco/train2014/{COCO.format(1)}", "bbox": [30.0, 20.0, 60.0, 45.0], "split": "val",
               "sentences": [{"raw": "Dog", "sent": "dog", "sent_id": 0}], "image_id": 1, "raw_image_info": info}]
    generic = [{"image": str(tmp_path / COCO.format(1)), "text": "dog", "bbox": [30, 20, 60, 45], "width": 64,
                "height": 48}]
    for samples in (from_hf_dataset(jxu124, image_root=tmp_path), from_hf_dataset(generic, "xyxy")):
        assert samples[0].annotated_size == (64, 48)
        with pytest.raises(ValueError, match=r"states a 64x48 image, but .* is 32x24"):  # was accepted: wrong boxes
            RECDataset(samples)
    Image.new("RGB", (64, 48)).save(tmp_path / COCO.format(1))
    assert RECDataset(from_hf_dataset(jxu124, image_root=tmp_path))[0]["box"] == (30.0, 20.0, 60.0, 45.0)


def test_hub_subset_holding_another_split_says_so():
    row = {"image": "a.jpg", "text": "dog", "bbox": [1, 2, 3, 4]}
    table = {"validation": [{**row, "split": "val"}], "test": [{**row, "split": "testA"}]}  # jxu124/refcoco's names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [s.metadata["split"] for s in from_hf_dataset(table, "xyxy", split="validation")] == ["val"]
        assert [s.metadata["split"] for s in from_hf_dataset(table, "xyxy", split="testA")] == ["testA"]
    with pytest.warns(UserWarning, match=r"subset 'test' holds rows of split \['testA'\].*split='testA'"):
        assert [s.metadata["split"] for s in from_hf_dataset(table, "xyxy", split="test")] == ["testA"]
