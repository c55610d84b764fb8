"""Hunt 15: a disk tower-cache row whose bytes changed on disk (bit rot, a partial overwrite, a copy cut short and
padded) is reported and computed again, never read as features (it was trained on without a word)."""

from __future__ import annotations

import gc
import json
import logging
import os
import zlib
from pathlib import Path

import pytest
import torch

from m2ist import cache as cache_module
from m2ist.cache import TowerCacheCollator, TowerFeatureCache
from m2ist.data.collator import RECCollator
from tests.ddp_worker import make_model, make_processor
from tests.test_cache import shared_image_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _filled(tmp_path: Path, dtype: str = "float32"):
    """A model, a batch of 3 images × 2 expressions and a disk cache filled by an earlier "process" (closed, so its
    shard is free again)."""
    data = shared_image_dataset(3)
    model = make_model(seed=0)
    first = TowerFeatureCache(model, tmp_path / "cache", dtype, expected_images=3, expected_texts=2)
    collate = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")), cache=first)  # remembers the samples
    batch = collate([data[i] for i in range(6)])
    first.features(batch)
    assert first.stats["vision_misses"] == 6
    collate.cache = None
    del first
    gc.collect()
    return model, batch, collate, data


def _rows(folder: Path) -> dict[str, int]:
    """The vision shard 0's index: ``{key: row}``."""
    lines = (folder / "index.0.txt").read_text().splitlines()
    return {line.split()[0]: int(line.split()[1]) for line in lines}


def _width(folder: Path) -> int:
    return json.loads((folder / "manifest.json").read_text())["row_width"]


def _flip_middle(folder: Path, row: int) -> None:
    """Invert 16 bytes in the middle of ``row`` (the file keeps its size)."""
    size = _width(folder) * 4
    with open(folder / "rows.0.bin", "r+b") as f:
        f.seek(row * size + size // 2)
        chunk = f.read(16)
        f.seek(row * size + size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _zero_tail(folder: Path, row: int) -> None:
    """Zero the file from the middle of ``row`` to its end (a copy cut short, padded to its size)."""
    size = _width(folder) * 4
    total = os.path.getsize(folder / "rows.0.bin")
    with open(folder / "rows.0.bin", "r+b") as f:
        f.seek(row * size + size // 2)
        f.write(bytes(total - row * size - size // 2))
    assert os.path.getsize(folder / "rows.0.bin") == total


def _direct(model, batch):
    with torch.no_grad():
        return model.tower_features(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"],
                                    batch["attention_mask"])


@pytest.mark.parametrize("damage", ["bytes flipped mid-row", "tail zero-filled"])
@pytest.mark.parametrize("rank", [0, 1], ids=["own shard", "another rank's shard"])
def test_a_damaged_row_is_reported_and_computed_again(tmp_path, caplog, damage, rank):
    model, batch, _, _ = _filled(tmp_path)
    folder = next((tmp_path / "cache").glob("vision-*"))
    rows = _rows(folder)
    keys = batch["vision_cache_keys"]
    row = rows[keys[2]] if damage == "bytes flipped mid-row" else max(rows.values())  # the middle / last image
    damaged_key = next(key for key, r in rows.items() if r == row)
    size = os.path.getsize(folder / "rows.0.bin")
    (_flip_middle if damage == "bytes flipped mid-row" else _zero_tail)(folder, row)
    assert os.path.getsize(folder / "rows.0.bin") == size

    with caplog.at_level(logging.WARNING, logger="m2ist.cache"):
        later = TowerFeatureCache(model, tmp_path / "cache", "float32", rank=rank)  # a later process, or rank 1
        read = later.features(batch)
    warnings = [r.getMessage() for r in caplog.records if "checksum" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"Row {row} of " in warnings[0] and str(folder / "rows.0.bin") in warnings[0]
    assert "1 damaged row in" in warnings[0]
    # the damaged image's two samples are misses, computed again; the other images and the texts are hits
    assert later.stats["vision_misses"] == keys.count(damaged_key) == 2
    assert later.stats["vision_damaged"] == 1 and later.stats["text_damaged"] == 0  # counted in the stats too
    assert later.stats["vision_hits"] == 4 and later.stats["text_misses"] == 0
    direct = _direct(model, batch)
    torch.testing.assert_close(read.vision.tokens, direct.vision.tokens)
    torch.testing.assert_close(read.vision.seed, direct.vision.seed)
    for kind, taps in direct.vision.taps.items():
        for got, want in zip(read.vision.taps[kind], taps, strict=True):
            torch.testing.assert_close(got, want)
    assert torch.equal(read.vision.mask, direct.vision.mask)

    # the row was stored again: the next process reads every record, with no warning
    del later
    gc.collect()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="m2ist.cache"):
        next_run = TowerFeatureCache(model, tmp_path / "cache", "float32", rank=rank)
        again = next_run.features(batch)
    assert next_run.stats["vision_misses"] == 0 and not [r for r in caplog.records if "checksum" in r.getMessage()]
    torch.testing.assert_close(again.vision.tokens, direct.vision.tokens)


def test_a_batch_rebuilt_from_memory_is_built_whole_when_a_row_is_damaged(tmp_path):
    """The collator asks the cache whether it holds a batch before building it without its images: a damaged row
    answers no (a check there, not only when read), so the batch keeps its pixels and the row is computed again,
    instead of a batch without pixels whose record is gone."""
    model, batch, collate, data = _filled(tmp_path)
    folder = next((tmp_path / "cache").glob("vision-*"))
    _flip_middle(folder, _rows(folder)[batch["vision_cache_keys"][0]])
    cache = TowerFeatureCache(model, tmp_path / "cache", "float32")
    collate.cache = cache  # the collator remembers the samples (batched once before)
    assert collate._remembered
    rebuilt = collate([data[i] for i in range(6)])
    assert collate.skipped_batches == 0 and "pixel_values" in rebuilt
    read = cache.features(rebuilt)
    assert cache.stats["vision_misses"] == 2
    torch.testing.assert_close(read.vision.tokens, _direct(model, batch).vision.tokens)
    collate([data[i] for i in range(6)])  # now every record is sound: built from memory
    assert collate.skipped_batches == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_each_row_is_checked_once_per_process_and_never_when_written_or_in_ram(tmp_path, monkeypatch, dtype):
    calls = []
    crc32 = zlib.crc32
    monkeypatch.setattr(cache_module.zlib, "crc32", lambda data, *rest: calls.append(1) or crc32(data, *rest))
    model, batch, _, _ = _filled(tmp_path, dtype)
    assert len(calls) == 5  # the writer took each row's checksum once: 3 images, 2 expressions
    calls.clear()
    reader = TowerFeatureCache(model, tmp_path / "cache", dtype, rank=1)
    for _ in range(3):
        reader.features(batch)
        assert reader.holds_all({"vision": batch["vision_cache_keys"], "text": batch["text_cache_keys"]})
    assert len(calls) == 5  # each row read checked once, however often it is read
    assert sum(shard.checks for records in reader.records.values() for shard in records.store.others.values()) == 5
    assert sum(records.store.damaged for records in reader.records.values()) == 0  # every row sound
    # the writer reads back its own rows without a check
    calls.clear()
    writer = TowerFeatureCache(model, tmp_path / "other", dtype)
    for _ in range(3):
        writer.features(batch)
    assert len(calls) == 5 and all(records.store.own.checks == 0 for records in writer.records.values())
    # a RAM cache takes no checksum at all
    calls.clear()
    ram = TowerFeatureCache(model, None, dtype)
    for _ in range(2):
        ram.features(batch)
    assert calls == []


def test_an_index_line_without_its_checksum_is_not_trusted(tmp_path, caplog):
    """A garbled checksum (or none) on an index line: the row is computed again, never read unchecked."""
    model, batch, _, _ = _filled(tmp_path)
    folder = next((tmp_path / "cache").glob("vision-*"))
    lines = (folder / "index.0.txt").read_text().splitlines()
    lines[0] = " ".join(lines[0].split()[:2])
    (folder / "index.0.txt").write_text("".join(f"{line}\n" for line in lines))
    with caplog.at_level(logging.WARNING, logger="m2ist.cache"):
        cache = TowerFeatureCache(model, tmp_path / "cache", "float32")
        read = cache.features(batch)
    assert sum("checksum" in r.getMessage() for r in caplog.records) == 1
    assert cache.stats["vision_misses"] == 2
    torch.testing.assert_close(read.vision.tokens, _direct(model, batch).vision.tokens)
