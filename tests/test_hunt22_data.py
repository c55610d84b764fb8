"""Silent faults of the data loaders, images and the command line (fault hunt 22): a streamed Hugging Face table read
in another pixel frame than the same table loaded whole, a refs file that holds one ref twice, image names that are
URLs or differ from the file in spaces or case, a 16-bit PNG's transparent value, a config file's relative paths, a
list flag given twice, tables and cells the loader refused (pandas, encoded bytes, numpy reprs), and image cells whose
path was read from the wrong place."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2ist.data import from_hf_dataset, load_refer
from m2ist.data.images import image_size, load_image

pytestmark = pytest.mark.usefixtures("one_thread")


def _sideways_jpeg() -> bytes:
    """A 40x20 JPEG (left half white) whose EXIF orientation (6) shows it 20x40, as a phone stores a portrait."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- 1. streamed tables
def test_a_streamed_table_is_read_in_the_stored_pixel_grid_as_a_whole_one():
    """``datasets`` turns an image upright by its EXIF orientation when it decodes it: a map-style table is read
    undecoded (the stored grid, the frame of COCO's boxes), but a streamed one (``IterableDataset``) was decoded by
    ``datasets`` and gave the rotated picture, so the same rows' boxes marked another place."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "bbox": datasets.Sequence(datasets.Value("float32"))})
    rows = [{"image": {"bytes": _sideways_jpeg(), "path": None}, "text": "the white half", "bbox": [0, 0, 20, 20]}]
    table = datasets.Dataset.from_list(rows, features=features)
    whole = from_hf_dataset(table, box_format="xyxy")
    streamed = from_hf_dataset(table.to_iterable_dataset(), box_format="xyxy")
    assert load_image(whole[0].image).size == (40, 20)
    assert image_size(streamed[0].image) == (40, 20)
    assert load_image(streamed[0].image).size == (40, 20)  # was (20, 40): rotated by datasets
    assert np.array_equal(np.asarray(load_image(streamed[0].image)), np.asarray(load_image(whole[0].image)))
    upright = load_image(streamed[0].image, exif_transpose=True)  # the upright picture is still one flag away
    assert upright.size == (20, 40)


# ---------------------------------------------------------------------------------------------- 2. refs read twice
def _refer_root(tmp_path: Path, refs: list[dict]) -> Path:
    dataset = tmp_path / "refcoco"
    dataset.mkdir(parents=True)
    images = tmp_path / "images" / "mscoco" / "images" / "train2014"
    images.mkdir(parents=True)
    Image.new("RGB", (60, 40)).save(images / "a.jpg")
    instances = {"images": [{"id": 1, "file_name": "a.jpg", "width": 60, "height": 40}],
                 "annotations": [{"id": 10, "image_id": 1, "bbox": [1, 2, 20, 10]},
                                 {"id": 11, "image_id": 1, "bbox": [30, 2, 20, 10]}]}
    (dataset / "instances.json").write_text(json.dumps(instances), encoding="utf-8")
    (dataset / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    return tmp_path


def _ref(ref_id, ann_id: int, split: str, text: str, sent_id: int) -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": 1, "split": split, "category_id": 1,
            "sent_ids": [sent_id], "sentences": [{"sent": text, "raw": text, "tokens": text.split(), "sent_id": sent_id}]}


@pytest.mark.parametrize(("second_split", "needle"), [("val", r"in the splits 'train' and 'val'"),
                                                      ("train", r"both in the split 'train'")])
def test_a_ref_id_given_twice_is_refused(tmp_path, second_split, needle):
    """The refer toolkit indexes refs by ``ref_id`` (the later one kept); two refs files merged held one object in
    train and val, and ``load_refer`` loaded it in both: trained on and scored, without a word."""
    root = _refer_root(tmp_path, [_ref(1, 10, "train", "the left one", 1), _ref(2, 11, "train", "the right one", 2),
                                  _ref(1, 10, second_split, "the left one", 1)])
    for split in ("train", None):
        with pytest.raises(ValueError, match=rf"refs 0 and 2 both have ref_id 1 \({needle}\).*merged"):
            load_refer(root, split=split)


def test_distinct_ref_ids_and_refs_without_one_still_load(tmp_path):
    root = _refer_root(tmp_path, [_ref(1, 10, "train", "the left one", 1), _ref(2, 11, "val", "the right one", 2)])
    assert [sample.expression for sample in load_refer(root)] == ["the left one", "the right one"]
    root = _refer_root(tmp_path / "none", [_ref(None, 10, "train", "the left one", 1),
                                           _ref(None, 11, "train", "the right one", 2)])
    assert len(load_refer(root, split="train")) == 2


# ---------------------------------------------------------------------------------------------- 3. image names
@pytest.mark.parametrize("url", ["https://example.com/dog.jpg", "s3://bucket/dog.jpg", "data:image/png;base64,iVBO"])
def test_an_image_url_in_a_data_file_is_refused_where_it_is_read(tmp_path, url):
    """A URL joined to the image root named a file nobody wrote (``<root>/https:/example.com/dog.jpg``), refused
    only when the dataset read it, as "not found"."""
    from m2ist.data import load_jsonl

    data = tmp_path / "urls.jsonl"
    data.write_text(json.dumps({"image": url, "text": "the dog", "bbox": [1, 2, 3, 4]}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"urls\.jsonl:1: the image '{url[:10]}.*' is a URL.*download the images"):
        load_jsonl(data, "xywh")
    with pytest.raises(ValueError, match=r"^row 0: the image .* is a URL"):
        from_hf_dataset([{"image": url, "text": "the dog", "bbox": [1, 2, 3, 4]}], "xywh")


def test_a_missing_image_names_the_file_that_differs_in_spaces_or_case(tmp_path):
    """``"a.png "`` (a trailing space from a spreadsheet) and ``b.PNG`` for ``b.png`` were "not found" at a path that
    looked right."""
    from m2ist.data import RECDataset, load_jsonl

    for name in ("a.png", "b.png"):
        Image.new("RGB", (20, 20)).save(tmp_path / name)
    data = tmp_path / "names.jsonl"
    data.write_text("".join(json.dumps({"image": name, "text": "the square", "bbox": [1, 2, 3, 4]}) + "\n"
                            for name in ("a.png ", "b.PNG")), encoding="utf-8")
    samples = load_jsonl(data, "xywh")
    with pytest.raises(FileNotFoundError, match=r"not found: '.*a\.png ' \('a\.png' exists there: the name differs"):
        RECDataset(samples[:1])
    with pytest.raises(FileNotFoundError, match=r"b\.PNG \('b\.png' exists there: the name differs in spaces or case"):
        load_image(samples[1].image)
    with pytest.raises(FileNotFoundError, match=r"not found: \S*c\.png$"):  # nothing alike: the plain message
        load_image(tmp_path / "c.png")


# ---------------------------------------------------------------------------------------------- 4. 16-bit transparency
def test_a_16_bit_png_with_a_transparent_value_is_composited_like_an_8_bit_one(tmp_path):
    """A grey PNG's tRNS chunk names one sample value as transparent: 8-bit ones were composited on the background
    (white), 16-bit ones kept it as a black pixel."""
    values = np.full((4, 6), 257 * 150, np.uint16)
    values[:2] = 0
    Image.fromarray(values).save(tmp_path / "grey16.png", transparency=0)
    Image.fromarray((values // 257).astype(np.uint8)).save(tmp_path / "grey8.png", transparency=0)
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    sixteen, eight = (np.asarray(load_image(tmp_path / name)) for name in ("grey16.png", "grey8.png"))
    assert (sixteen[:2] == 255).all()  # was 0: black
    assert np.array_equal(sixteen, eight)
    assert (np.asarray(load_image(tmp_path / "grey16.png", background=(0, 128, 0)))[0, 0] == (0, 128, 0)).all()


# ---------------------------------------------------------------------------------------------- 5. config paths
def _resolve(*argv: str) -> dict:
    from m2ist.cli import build_parser
    from m2ist.cli.settings import resolve_settings

    return resolve_settings(build_parser(argv[0]).parse_args(list(argv)))


@pytest.mark.parametrize("key", ["eval_files: [val=val.jsonl]", "eval_files: {val: val.jsonl}", "image_root: pictures"])
def test_a_config_path_that_exists_only_beside_the_config_is_named(tmp_path, monkeypatch, key):
    """Paths in a ``--config`` file are read from the working folder; one written relative to the config file was
    "not found" at a path that looked right in the file."""
    from m2ist.cli.errors import CLIError

    experiment = tmp_path / "exp"
    (experiment / "pictures").mkdir(parents=True)
    (experiment / "val.jsonl").write_text("{}\n", encoding="utf-8")
    (experiment / "run.yaml").write_text(f"data:\n  format: jsonl\n  box_format: xywh\n  {key}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    name = key.split(":")[0]
    extra = ["--eval-file", "val=exp/val.jsonl"] if name == "image_root" else []
    with pytest.raises(CLIError, match=rf"^data\.{name} '(val\.jsonl|pictures)' in the config file exp/run\.yaml is "
                                       r"read from the working folder .*, where it does not exist, while .*exp/"):
        _resolve("eval", "--adapter", "a", "--config", "exp/run.yaml", *extra)
    monkeypatch.chdir(experiment)  # from the config's own folder the same file reads
    assert _resolve("eval", "--adapter", "a", "--config", "run.yaml", *extra)["data"]["format"] == "jsonl"


def test_a_config_path_replaced_by_a_flag_or_found_in_the_working_folder_passes(tmp_path, monkeypatch):
    experiment = tmp_path / "exp"
    experiment.mkdir()
    (experiment / "val.jsonl").write_text("{}\n", encoding="utf-8")
    (experiment / "run.yaml").write_text("data: {format: jsonl, box_format: xywh, eval_files: [val.jsonl]}\n",
                                         encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    data = _resolve("eval", "--adapter", "a", "--config", "exp/run.yaml", "--eval-file", "exp/val.jsonl")["data"]
    assert data["eval_files"] == ["exp/val.jsonl"]
    (tmp_path / "val.jsonl").write_text("{}\n", encoding="utf-8")  # the working folder's file is the one read
    assert _resolve("eval", "--adapter", "a", "--config", "exp/run.yaml")["data"]["eval_files"] == ["val.jsonl"]


# ---------------------------------------------------------------------------------------------- 6. tables of rows
def _png(size=(20, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "white").save(buffer, "PNG")
    return buffer.getvalue()


def test_a_pandas_table_is_read_by_its_rows(tmp_path):
    """Iterating a pandas DataFrame gives its column names: ``from_hf_dataset(df)`` said "Rows must be dicts; got
    str"."""
    pandas = pytest.importorskip("pandas")
    Image.new("RGB", (20, 10)).save(tmp_path / "a.png")
    table = pandas.DataFrame([{"image": str(tmp_path / "a.png"), "text": "the square", "bbox": [1, 2, 3, 4]},
                              {"image": str(tmp_path / "a.png"), "text": "the other", "bbox": [5, 2, 3, 4]}])
    samples = from_hf_dataset(table, "xywh")
    assert [(sample.expression, sample.box) for sample in samples] == [("the square", (1.0, 2.0, 4.0, 6.0)),
                                                                       ("the other", (5.0, 2.0, 8.0, 6.0))]


def test_an_image_cell_of_encoded_bytes_is_read_like_a_bytes_dict():
    """A binary image column (a Parquet export, ``datasets.Value('binary')``) holds each file's bytes; the loader
    refused them ("cannot read an image from bytes"), while ``{"bytes": ...}`` cells and the processor read them."""
    from m2ist.data import RECDataset

    rows = [{"image": _png(), "text": "the square", "bbox": [1, 2, 3, 4]}]
    for source in (rows, iter([{**rows[0], "image": bytearray(rows[0]["image"])}])):  # indexable, and one pass
        samples = from_hf_dataset(source, "xywh")
        assert load_image(samples[0].image).size == (20, 10)
        assert RECDataset(samples)[0]["image"].size == (20, 10)


# ---------------------------------------------------------------------------------------------- 7. list flags repeated
def test_a_list_flag_given_twice_adds_its_values():
    """argparse keeps the last use of a flag: ``--eval-splits val --eval-splits testA`` scored testA alone (val was
    dropped without a word), ``--iou-thresholds 0.5 --iou-thresholds 0.75`` reported Acc@0.75 alone, and
    ``--experts vea --experts lea`` trained the LEA alone. A list flag repeated now adds up, as --image and --text."""
    settings = _resolve("eval", "--adapter", "a", "--data-format", "refer", "--data-root", "r", "--eval-splits", "val",
                        "--splits", "testA", "testB", "--iou-thresholds", "0.5", "--iou-thresholds", "0.75")
    assert settings["data"]["eval_splits"] == ["val", "testA", "testB"]
    assert settings["evaluation"]["iou_thresholds"] == [0.5, 0.75]
    settings = _resolve("train", "--experts", "vea", "--experts", "lea", "--lr-drop-epochs", "--lr-drop-epochs", "3",
                        "--vision-layers", "1", "--vision-layers", "2", "--resize-choices", "448", "--resize-choices",
                        "480")
    assert settings["m2ist"]["experts"] == ["vea", "lea"]
    assert settings["training"]["lr_drop_epochs"] == [3]
    assert settings["m2ist"]["vision_layers"] == [1, 2]
    assert settings["augmentation"]["resize_choices"] == [448, 480]
    assert _resolve("train", "--vision-layers", "none")["m2ist"]["vision_layers"] is None


@pytest.mark.parametrize("argv", [["--vision-layers", "none", "--vision-layers", "2"],
                                  ["--vision-layers", "2", "--vision-layers", "none"]])
def test_none_and_values_of_a_repeated_list_flag_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        _resolve("train", *argv)
    assert raised.value.code == 2
    assert "--vision-layers: none stands alone" in capsys.readouterr().err


def test_an_image_cell_holding_a_relative_path_is_read_under_the_image_root(tmp_path, monkeypatch):
    """A ``datasets.Image`` cell may hold a path without bytes: a table was read from the working folder, ignoring
    ``image_root``, while the same path in a list of rows or a stream was read under it."""
    datasets = pytest.importorskip("datasets")
    (tmp_path / "pictures").mkdir()
    Image.new("RGB", (30, 10)).save(tmp_path / "pictures" / "a.png")
    monkeypatch.chdir(tmp_path)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "bbox": datasets.Sequence(datasets.Value("float32"))})
    table = datasets.Dataset.from_dict({"image": ["a.png"], "text": ["the bar"], "bbox": [[1, 2, 3, 4]]},
                                       features=features)
    listed = [{"image": {"bytes": None, "path": "a.png"}, "text": "the bar", "bbox": [1, 2, 3, 4]}]
    for rows in (table, table.to_iterable_dataset(), listed):
        samples = from_hf_dataset(rows, "xywh", image_root="pictures")
        assert image_size(samples[0].image) == (30, 10)
        assert load_image(samples[0].image).size == (30, 10)
    outside = [{"image": {"bytes": None, "path": "../a.png"}, "text": "the bar", "bbox": [1, 2, 3, 4]}]
    with pytest.raises(OSError, match=r"^Cannot read image row 0, column 'image': the image path '\.\./a\.png' leads "
                                      r"outside the image root"):
        image_size(from_hf_dataset(datasets.Dataset.from_list(outside, features=features), "xywh",
                                   image_root="pictures")[0].image)


# ---------------------------------------------------------------------------------------------- 8. numpy box text
def test_a_box_of_numpy_numbers_written_by_pandas_is_read(tmp_path):
    """pandas writes a list of numpy numbers as ``"[np.float64(1.5), np.int64(2), ...]"`` (numpy 2's repr): the CSV
    was refused ("a box must be 4 numbers")."""
    from m2ist.data import load_csv

    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    (tmp_path / "boxes.csv").write_text(
        'image,text,bbox\na.png,the square,"[np.float64(1.5), np.int64(2), np.float32(3.0), numpy.float64(4.0)]"\n'
        "a.png,the other,[1.5 2.  3.  4. ]\n", encoding="utf-8")
    samples = load_csv(tmp_path / "boxes.csv", "xywh")
    assert [sample.box for sample in samples] == [(1.5, 2.0, 4.5, 6.0)] * 2


def test_an_image_cell_naming_a_remote_file_is_read_undecoded_by_datasets():
    """A streamed image folder of the Hub gives cells ``{"bytes": None, "path": "hf://datasets/..."}``: read undecoded
    (so in the stored pixel grid), they are fetched as ``datasets`` fetches them, in a table, a stream or a list."""
    datasets = pytest.importorskip("datasets")
    fsspec = pytest.importorskip("fsspec")
    fsspec.filesystem("memory").pipe("/hunt22/sideways.jpg", _sideways_jpeg())
    path = "memory://hunt22/sideways.jpg"  # a remote file system, as hf:// is
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "bbox": datasets.Sequence(datasets.Value("float32"))})
    table = datasets.Dataset.from_list([{"image": {"bytes": None, "path": path}, "text": "the white half",
                                         "bbox": [0, 0, 20, 20]}], features=features)
    listed = [{"image": {"bytes": None, "path": path}, "text": "the white half", "bbox": [0, 0, 20, 20]}]
    for rows in (table, table.to_iterable_dataset(), listed, iter(listed)):
        samples = from_hf_dataset(rows, "xyxy", image_root="/somewhere")
        assert image_size(samples[0].image) == (40, 20)
        assert load_image(samples[0].image).size == (40, 20)
    missing = [{"image": {"bytes": None, "path": "memory://hunt22/none.jpg"}, "text": "x", "bbox": [0, 0, 2, 2]}]
    with pytest.raises(OSError, match=r"row 0.*'memory://hunt22/none\.jpg' cannot be read"):
        load_image(from_hf_dataset(missing, "xyxy")[0].image)


def test_an_output_path_of_a_config_file_is_written_where_the_command_runs(tmp_path, monkeypatch):
    experiment = tmp_path / "exp"
    (experiment / "results.json").parent.mkdir()
    (experiment / "results.json").write_text("{}", encoding="utf-8")
    (experiment / "run.yaml").write_text("evaluation: {output_file: results.json}\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert _resolve("eval", "--adapter", "a", "--config", "exp/run.yaml")["evaluation"]["output_file"] == "results.json"


# ---------------------------------------------------------------------------------------------- 9. upright annotations
def test_an_annotation_of_the_upright_picture_names_the_exif_orientation(tmp_path):
    """A labelling tool shows a phone photo upright and records that size (20x40 for a 40x20 file tagged 6): the
    refusal said "The file may have been rotated after annotation" instead of naming the tag and the fix."""
    from m2ist.data import RECDataset, load_jsonl

    (tmp_path / "photo.jpg").write_bytes(_sideways_jpeg())
    record = {"image": "photo.jpg", "text": "the white half", "bbox": [0, 0, 20, 20], "width": 20, "height": 40}
    (tmp_path / "upright.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    samples = load_jsonl(tmp_path / "upright.jsonl", "xywh")
    with pytest.raises(ValueError, match=r"states a 20x40 image, but .*photo\.jpg is 40x20.*EXIF orientation tag \(6: "
                                         r"shown rotated 90° clockwise\).*RECDataset\(\.\.\., exif_transpose=True\)"):
        RECDataset(samples)
    assert RECDataset(samples, exif_transpose=True)[0]["image"].size == (20, 40)
    Image.new("RGB", (40, 20)).save(tmp_path / "plain.jpg")  # no tag: the file was rotated after annotation
    with pytest.raises(ValueError, match=r"The file may have been rotated after annotation"):
        RECDataset([samples[0].__class__(**{**vars(samples[0]), "image": str(tmp_path / "plain.jpg")})])


def test_a_list_flag_replaces_the_config_files_list(tmp_path, monkeypatch):
    """Repeats of a flag add up; the flag as a whole still replaces the list a --config file gives (it is not added
    to the file's values)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("m2ist:\n  experts: [vea, lea, iea]\ndata:\n  eval_splits: [val, testA]\n",
                                       encoding="utf-8")
    settings = _resolve("train", "--config", "run.yaml", "--experts", "vea", "--eval-splits", "testB")
    assert settings["m2ist"]["experts"] == ["vea"]
    assert settings["data"]["eval_splits"] == ["testB"]
    assert _resolve("train", "--config", "run.yaml")["m2ist"]["experts"] == ["vea", "lea", "iea"]
