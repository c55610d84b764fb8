"""Hunt 18: the tower-feature cache against its surroundings changing under it: an image file rewritten with its
size and time kept, a rows file deleted or replaced during a run, a disk that fails mid-fill, an in-memory cache
larger than the machine's RAM, a location that is a file or a link to nothing, and a folder that cannot be locked."""

from __future__ import annotations

import errno
import gc
import logging
import os
from pathlib import Path

import pytest
import torch

from m2ist import cache as cache_module
from m2ist.cache import TowerCacheCollator, TowerFeatureCache
from m2ist.data.collator import RECCollator
from tests.ddp_worker import make_model, make_processor
from tests.test_cache import shared_image_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _direct(model, batch):
    with torch.no_grad():
        return model.tower_features(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"],
                                    batch["attention_mask"])


def test_an_image_rewritten_with_its_size_and_time_kept_is_processed_again(tmp_path):
    """The collator rebuilt a batch from memory when the image file kept its path, size and modification time: a
    file rewritten with other pixels of the same size (an uncompressed format) and its time set back (``cp -p``,
    ``tar x``, ``rsync -a``, a coarse clock) was trained on with the old image's features, without a word."""
    data = shared_image_dataset(2)
    path = tmp_path / "image.bmp"  # BMP: another picture of the same size is a file of the same size
    data[0]["image"].save(path)
    items = [{"image": str(path), "expression": data[0]["expression"], "box": data[0]["box"]}]
    model = make_model(seed=0)
    cache = TowerFeatureCache(model, None, "float32")
    collate = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok"), train=True), cache=cache)
    first = collate(items)
    cache.features(first)
    assert "pixel_values" not in collate(items) and collate.skipped_batches == 1  # seen whole: rebuilt from memory

    before = os.stat(path)
    data[2]["image"].save(path)  # other pixels, same size, same time
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    batch = collate(items)
    assert collate.skipped_batches == 1 and "pixel_values" in batch  # processed again, from the new pixels
    assert batch["vision_cache_keys"] != first["vision_cache_keys"]
    read = cache.features(batch)
    torch.testing.assert_close(read.vision.tokens, _direct(model, batch).vision.tokens)


def _filled(tmp_path: Path):
    data = shared_image_dataset(6)
    model = make_model(seed=0)
    cache = TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=2, expected_texts=2)
    collate = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))
    first = collate([data[i] for i in range(4)])
    cache.features(first)
    folder = next((tmp_path / "cache").glob("vision-*"))
    return model, cache, collate, data, first, folder


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_rows_file_deleted_or_replaced_during_a_run_is_reported_never_read_as_zeros(tmp_path, change):
    """The shard this process writes, deleted (a clean-up, a folder removed between epochs) or replaced by another
    file: when it grew, a new file was made in its place and the rows this process had written (never checked
    again) were read from it as zeros and trained on."""
    _model, cache, collate, data, first, folder = _filled(tmp_path)
    rows = folder / "rows.0.bin"
    size = os.path.getsize(rows)
    rows.unlink()
    if change == "replaced":  # another file of the same size in its place (a copy over it, a restore)
        rows.write_bytes(bytes(size))
    more = collate([data[i] for i in range(4, 12)])  # new images: the shard grows past what it reserved
    with pytest.raises(ValueError, match=f"rows.0.bin was {change if change == 'deleted' else 'replaced'}.*"
                                         "while this run used it"):
        cache.features(more)
        cache.features(first)  # (before: the first images' features read back as zeros)
    with pytest.raises(ValueError, match="while this run used it"):
        cache.features(first)


def test_a_disk_that_fails_mid_fill_names_the_folder_and_leaves_no_half_index(tmp_path, monkeypatch, caplog):
    """A disk that fills, goes read-only or fails while the index is appended raised the bare OSError naming
    ``index.0.txt``; lines it had written stayed and named rows this process then wrote other records over."""
    model, cache, collate, data, _first, folder = _filled(tmp_path)
    index = folder / "index.0.txt"
    indexed = index.read_bytes()
    more = collate([data[i] for i in range(4, 8)])

    def full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(cache_module.os, "fsync", full)  # the lines are written, their sync fails
        with pytest.raises(OSError, match=r"tower cache in .*vision-.* could not record rows in index\.0\.txt "
                                          r"\(No space left on device\): free some space") as raised:
            cache.features(more)
    assert raised.value.errno == errno.ENOSPC
    assert index.read_bytes() == indexed  # no line of the failed write stays
    read = cache.features(more)  # space again: the run goes on, and stores them
    torch.testing.assert_close(read.vision.tokens, _direct(model, more).vision.tokens)
    del cache
    gc.collect()
    with caplog.at_level(logging.WARNING, logger="m2ist.cache"):
        later = TowerFeatureCache(model, tmp_path / "cache", "float32")
        again = later.features(more)
    assert later.stats["vision_misses"] == 0 and later.stats["vision_damaged"] == 0
    torch.testing.assert_close(again.vision.tokens, read.vision.tokens)

    def read_only(file, mode="r", *args, **kwargs):  # the disk remounted read-only: a rows file cannot grow
        if mode == "ab":
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return open(file, mode, *args, **kwargs)

    beyond = collate([data[i] for i in range(8, 12)])  # past what was reserved: the shard grows
    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "open", read_only, raising=False)
        with pytest.raises(OSError, match=r"tower cache in .*vision-.* could not grow rows\.\d\.bin \(Read-only file "
                                          r"system\): free some space"):
            later.features(beyond)

    def no_inode(path, write):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "atomic_write", no_inode)  # a new folder's first write
    with pytest.raises(OSError, match=r"could not write manifest\.json \(No space left on device\)"):
        TowerFeatureCache(model, tmp_path / "other", "bfloat16")


def test_an_in_memory_cache_that_ram_cannot_hold_is_refused(tmp_path, monkeypatch):
    """An in-memory cache was opened whatever its size (a disk one is refused when the disk cannot hold it): it
    filled for the whole run and ended it, hours in, killed for memory."""
    model = make_model(seed=0)
    per_image = TowerFeatureCache(model, None, "float32").bytes_per_image
    monkeypatch.setattr(cache_module, "_available_memory", lambda: 100 * per_image)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    TowerFeatureCache(model, None, "float32", expected_images=50, expected_texts=50)  # fits
    with pytest.raises(ValueError, match=r"in-memory tower cache needs up to .* RAM is available: use "
                                         r"tower_cache='disk'"):
        TowerFeatureCache(model, None, "float32", expected_images=200)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # each process of the machine holds its own
    with pytest.raises(ValueError, match=r"\(4 processes on this machine, each with its own\)"):
        TowerFeatureCache(model, None, "float32", expected_images=50)
    TowerFeatureCache(model, None, "float32", expected_images=200, check_space=False)  # asked not to check
    TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=200)  # on disk: RAM is not asked


@pytest.mark.parametrize("where", ["a file", "under a file", "a link to nothing"])
def test_a_cache_location_no_folder_can_be_made_at_says_why(tmp_path, where):
    """A location that is a file, lies under one, or is a link to nothing was refused with mkdir's words about the
    fingerprint's subfolder ("File exists" for the dangling link), not about the location."""
    (tmp_path / "file").write_text("not a folder")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    location = {"a file": tmp_path / "file", "under a file": tmp_path / "file" / "cache",
                "a link to nothing": tmp_path / "link" / "cache"}[where]
    expected = r"is a link to .*nowhere, which does not exist" if where == "a link to nothing" else \
        rf"{tmp_path / 'file'} is a file, not a folder"
    with pytest.raises(OSError, match=rf"tower cache location {location}: .*{expected}"):
        TowerFeatureCache(make_model(seed=0), location, "float32")
    assert not (tmp_path / "nowhere").exists()


def test_a_folder_whose_files_cannot_be_locked_says_so(tmp_path, monkeypatch):
    """A folder on a filesystem without locks (some network mounts) raised the bare ``[Errno 37] No locks
    available`` when the cache opened."""
    fcntl = pytest.importorskip("fcntl")

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OSError, match=r"tower cache in .*vision-.* could not lock lock\.0 \(a network filesystem "
                                      r"without locks\? give tower_cache a local folder\) \(No locks available\)"):
        TowerFeatureCache(make_model(seed=0), tmp_path / "cache", "float32")
