"""Datasets at scale: 20 000 rows train in about the memory of 200 (loaders keep paths or row references, never pixels).

Each size is loaded and trained a few steps in its own process (``tests/scale_worker.py``), which reports its peak
resident set size. The data: 200 distinct 64×64 PNGs referenced by every row, as a Hugging Face ``datasets`` table
with the images inside (lmms-lab style) and as a JSON-lines file of paths.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from m2ist.data import DeferredImage, RECDataset, from_hf_dataset, load_image

REPO = Path(__file__).resolve().parents[1]
DISTINCT_IMAGES = 200
SMALL, LARGE = 200, 20_000
STEPS = 3
BOUND_MIB = 200


def _image(index: int) -> Image.Image:
    image = Image.new("RGB", (64, 64), (index % 256, 90, 160))
    ImageDraw.Draw(image).rectangle((8 + index % 20, 10, 40 + index % 20, 50), fill=(230, 40, 40))
    return image


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    _image(index).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(count: int) -> dict[str, list]:
    return {"text": [f"the red square {i % 7}" for i in range(count)],
            "bbox": [[8.0 + i % 20, 10.0, 40.0 + i % 20, 50.0] for i in range(count)]}


def _hf_table(folder: Path, count: int) -> Path:
    datasets = pytest.importorskip("datasets")
    pngs = [_png(i) for i in range(DISTINCT_IMAGES)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "bbox": datasets.Sequence(datasets.Value("float32"), length=4)})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": pngs[i % DISTINCT_IMAGES], "path": None} for i in range(count)], **_rows(count)},
        features=features)
    target = folder / f"hf-{count}"
    table.save_to_disk(str(target))
    return target


def _jsonl(folder: Path, count: int) -> Path:
    images = folder / "images"
    images.mkdir(exist_ok=True)
    for i in range(DISTINCT_IMAGES):
        if not (images / f"{i}.png").exists():
            _image(i).save(images / f"{i}.png")
    rows = _rows(count)
    target = folder / f"rows-{count}.jsonl"
    with target.open("w", encoding="utf-8") as handle:
        for i in range(count):
            handle.write(json.dumps({"image": f"images/{i % DISTINCT_IMAGES}.png", "text": rows["text"][i],
                                     "bbox": rows["bbox"][i]}) + "\n")
    return target


def _measure(data_format: str, source: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "scale_worker.py"), data_format, str(source),
                             str(STEPS)], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("data_format", ["hf", "jsonl"])
def test_twenty_thousand_rows_train_within_200_mib_of_two_hundred(tmp_path, data_format):
    make = _hf_table if data_format == "hf" else _jsonl
    small = _measure(data_format, make(tmp_path, SMALL))
    large = _measure(data_format, make(tmp_path, LARGE))
    assert (small["samples"], large["samples"]) == (SMALL, LARGE)
    growth = large["peak_rss_mib"] - small["peak_rss_mib"]
    print(f"{data_format}: peak RSS {small['peak_rss_mib']} MiB for {SMALL} rows, {large['peak_rss_mib']} MiB for "
          f"{LARGE} rows (+{growth:.1f} MiB)")
    assert growth < BOUND_MIB, (small, large)


def test_hf_rows_are_referenced_not_decoded(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.load_from_disk(str(_hf_table(tmp_path, 5)))
    samples = from_hf_dataset(table, box_format="xyxy")
    assert all(isinstance(sample.image, DeferredImage) for sample in samples)
    # the sample list holds neither pixels nor bytes: each reference names its table, row and column only
    assert {type(value).__name__ for sample in samples for value in vars(sample).values()} <= {
        "HFRowImage", "str", "tuple", "NoneType", "dict"}
    dataset = RECDataset(samples)
    assert dataset[3]["image"].size == (64, 64)
    assert dataset[3]["image"].getpixel((0, 0)) == _image(3).getpixel((0, 0))
    assert load_image(samples[4].image).tobytes() == _image(4).tobytes()


def test_in_memory_rows_are_referenced_and_one_pass_iterables_still_work():
    rows = [{"image": _image(i), "text": "the red square", "bbox": [8, 10, 40, 50]} for i in range(3)]
    samples = from_hf_dataset(rows, box_format="xyxy")
    assert isinstance(samples[1].image, DeferredImage) and "row 1" in repr(samples[1].image)
    assert load_image(samples[1].image).tobytes() == _image(1).tobytes()
    once = from_hf_dataset(iter(rows), box_format="xyxy")  # no random access: the cell itself is kept
    assert load_image(once[2].image).tobytes() == _image(2).tobytes()


def test_building_a_dataset_reads_no_deferred_image():
    """A size read from a table row reads the whole encoded image: RECDataset leaves those for __getitem__."""

    class Counting(DeferredImage):
        opened = 0

        def open(self):
            Counting.opened += 1
            return _image(0)

    from m2ist.data import RECSample

    dataset = RECDataset([RECSample(image=Counting(), expression="the square", box=(8, 10, 90, 50)) for _ in range(3)])
    assert Counting.opened == 0
    assert dataset[1]["box"] == (8.0, 10.0, 64.0, 50.0) and Counting.opened == 1  # clipped to the image when read
