"""The tower-feature cache: exact with float32, keyed by content and fingerprint, views for augmentation,
disk shards that resume and are shared between ranks, size estimate and refusal."""

from __future__ import annotations

import gc
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from m2ist.cache import CachedViewsCollator, TowerCacheCollator, TowerFeatureCache, _size, cache_keys
from m2ist.data.collator import RECCollator
from m2ist.data.dataset import RECDataset
from m2ist.data.sample import RECSample
from m2ist.data.transforms import RECAugmentation
from m2ist.evidence.baselines import build_model
from m2ist.trainer import RECTrainer, RECTrainingArguments, train_rec, trainable_tensors
from tests.ddp_worker import make_model, make_processor
from tests.tiny import text_tower, tiny_config, vision_tower

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


pytestmark = pytest.mark.usefixtures("one_thread")


def shared_image_dataset(images: int, seed: int = 0) -> RECDataset:
    """Every image carries two expressions (one per square), so images are shared between samples."""
    rng = random.Random(seed)
    samples = []
    for index in range(images):
        image = Image.new("RGB", (40, 32), (128, 128, 128))
        draw = ImageDraw.Draw(image)
        for half, (colour, fill) in enumerate(COLOURS.items()):
            side = rng.randint(10, 14)
            x0, y0 = rng.randint(half * 20, half * 20 + 20 - side), rng.randint(0, 32 - side)
            draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=fill)
            samples.append(RECSample(image=image, expression=f"the {colour} square", box=(x0, y0, x0 + side, y0 + side),
                                     image_id=index))
    return RECDataset(samples)


def _args(output_dir: Path, **overrides) -> RECTrainingArguments:
    values = dict(output_dir=str(output_dir), use_cpu=True, dataloader_num_workers=0, report_to="none",
                  disable_tqdm=True, seed=0, data_seed=0, per_device_train_batch_size=4, per_device_eval_batch_size=4,
                  learning_rate=1e-3, side_learning_rate=1e-3, save_strategy="no", logging_steps=1, num_train_epochs=3)
    values.update(overrides)
    return RECTrainingArguments(**values)


def _train(tmp_path: Path, name: str, data: RECDataset, **overrides):
    model = make_model(seed=0, side_dropout=0.1)
    processor = make_processor(tmp_path / f"tok-{name}")
    trainer = train_rec(model, processor, data, {"val": data}, _args(tmp_path / name, eval_strategy="epoch",
                                                                     **overrides))
    return model, trainer


def test_float32_cache_gives_the_same_weights(tmp_path, capsys):
    data = shared_image_dataset(6)
    plain, plain_trainer = _train(tmp_path, "plain", data)
    cached, trainer = _train(tmp_path, "cached", data, tower_cache="memory", tower_cache_dtype="float32")
    for key, value in trainable_tensors(plain).items():
        assert torch.equal(value, trainable_tensors(cached)[key]), key
    def evaluations(run):  # every evaluation's metrics, its timings aside
        return [{k: v for k, v in entry.items() if k.startswith("eval_") and "per_second" not in k and "runtime" not in k}
                for entry in run.state.log_history if "eval_val_loss" in entry]
    assert len(evaluations(trainer)) == 3 and evaluations(plain_trainer) == evaluations(trainer)
    stats = trainer.tower_cache.stats
    # 6 images and 2 expressions; 3 epochs of training + 3 evaluations of 12 samples each = 72 lookups per tower
    assert stats["vision_records"] == 6 and stats["text_records"] == 2
    assert stats["vision_hits"] + stats["vision_misses"] == 72 and stats["vision_misses"] <= 12
    assert "tower cache (float32, RAM)" in capsys.readouterr().err  # stdout is for results
    # later epochs and evaluations were built without their images
    assert trainer.data_collator.skipped_batches > 0 and trainer.eval_data_collator.skipped_batches > 0


def test_bfloat16_cache_trains_and_halves_the_bytes(tmp_path):
    data = shared_image_dataset(4)
    model, trainer = _train(tmp_path, "bf16", data, tower_cache="memory")
    cache = trainer.tower_cache
    assert cache.dtype == "bfloat16"
    exact = TowerFeatureCache(model, dtype="float32")
    assert exact.bytes_per_image == 2 * cache.bytes_per_image and exact.bytes_per_expression == 2 * cache.bytes_per_expression
    # the stored features are the towers' features rounded to bfloat16
    batch = TowerCacheCollator(RECCollator(trainer.processing_class))([data[i] for i in range(4)])
    stored = cache.features(batch)
    fresh = model.tower_features(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(stored.vision.tokens, fresh.vision.tokens, rtol=1e-2, atol=1e-2)
    assert torch.equal(stored.vision.mask, fresh.vision.mask) and torch.equal(stored.text.mask, fresh.text.mask)


def test_disk_cache_resumes_and_is_shared_between_ranks(tmp_path):
    data = shared_image_dataset(3)
    model = make_model(seed=0)
    processor = make_processor(tmp_path / "tok")
    batch = TowerCacheCollator(RECCollator(processor))([data[i] for i in range(6)])
    first = TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=3, expected_texts=2)
    features = first.features(batch)
    assert first.stats["vision_misses"] == 6 and first.stats["vision_records"] == 3
    # a new process (resumed run) reads what the first one wrote: no tower pass
    again = TowerFeatureCache(model, tmp_path / "cache", "float32")
    reread = again.features(batch)
    assert again.stats["vision_misses"] == 0 and again.stats["text_misses"] == 0
    assert torch.equal(reread.vision.taps["ffn"][0], features.vision.taps["ffn"][0])
    # another rank writes its own shard and reads the first rank's
    other = TowerFeatureCache(model, tmp_path / "cache", "float32", rank=1)
    other.features(batch)
    assert other.stats["vision_misses"] == 0
    folder = next((tmp_path / "cache").glob("vision-*"))
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("lock.")) == \
        ["index.0.txt", "manifest.json", "rows.0.bin"]  # the readers wrote nothing
    # a torn index line (a crash mid-append) is cut by the next writer of that shard; the records before it survive
    del first, again  # the crashed run: its shard is free again
    gc.collect()
    with open(folder / "index.0.txt", "a") as f:
        f.write("deadbeef")
    repaired = TowerFeatureCache(model, tmp_path / "cache", "float32")
    repaired.features(batch)
    assert repaired.stats["vision_misses"] == 0
    assert (folder / "index.0.txt").read_text().endswith("\n")
    # a batch mixing both ranks' records reads each row from its own shard, in the batch's order
    more = shared_image_dataset(5, seed=1)
    fresh = TowerCacheCollator(RECCollator(processor))([more[i] for i in range(6, 10)])
    other.features(fresh)  # rank 1 writes these two images to its shard
    mixed_items = [data[4], more[8], data[0], more[6], data[2]]
    mixed = TowerCacheCollator(RECCollator(processor))(mixed_items)
    rereader = TowerFeatureCache(model, tmp_path / "cache", "float32", rank=2)
    read = rereader.features(mixed)
    assert rereader.stats["vision_misses"] == 0 and rereader.stats["text_misses"] == 0
    with torch.no_grad():
        direct = model.tower_features(mixed["pixel_values"], mixed["pixel_mask"], mixed["input_ids"],
                                      mixed["attention_mask"])
    for kind in ("ffn", "attention"):
        if kind in direct.vision.taps:
            torch.testing.assert_close(read.vision.taps[kind][-1], direct.vision.taps[kind][-1])
    torch.testing.assert_close(read.vision.tokens, direct.vision.tokens)


def _cut_rows(folder: Path) -> None:
    with open(folder / "rows.0.bin", "r+b") as f:
        f.truncate(os.path.getsize(folder / "rows.0.bin") // 4)


def _index_past_the_end(folder: Path) -> None:
    with open(folder / "index.0.txt", "a") as f:
        f.write(f"{'ab' * 16} 999999\n")


@pytest.mark.parametrize("damage", {
    "rows truncated": _cut_rows,
    "rows deleted": lambda folder: (folder / "rows.0.bin").unlink(),
    "index past the end": _index_past_the_end,
    "manifest garbled": lambda folder: (folder / "manifest.json").write_text("{not json"),
}.items(), ids=lambda item: item[0])
@pytest.mark.parametrize("rank", [0, 1], ids=["own shard", "another rank's shard"])
def test_a_damaged_disk_cache_is_reported_never_read_as_zeros(tmp_path, damage, rank):
    data = shared_image_dataset(3)
    model = make_model(seed=0)
    batch = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))([data[i] for i in range(6)])
    TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=3, expected_texts=2).features(batch)
    folder = next((tmp_path / "cache").glob("vision-*"))
    size = os.path.getsize(folder / "rows.0.bin")
    damage[1](folder)
    with pytest.raises(ValueError, match=rf"tower cache in .*{folder.name} is damaged: .*Delete that folder"):
        # as a resumed run opens it: with its size estimate, which reserves rows in its own shard
        TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=3, expected_texts=2,
                          rank=rank).features(batch)
    if damage[0] == "index past the end":  # the rows file was not grown to the bogus row (a sparse file of 500 GB)
        assert os.path.getsize(folder / "rows.0.bin") == size


def test_a_rows_file_cut_during_a_run_is_reported_not_read(tmp_path):
    data = shared_image_dataset(3)
    model = make_model(seed=0)
    batch = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))([data[i] for i in range(6)])
    cache = TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=3, expected_texts=2)
    cache.features(batch)
    _cut_rows(next((tmp_path / "cache").glob("vision-*")))  # reading the mapped pages now would crash (SIGBUS)
    with pytest.raises(ValueError, match="is damaged"):
        cache.features(batch)


def test_two_runs_sharing_a_disk_cache_never_write_over_each_other(tmp_path):
    """Two single-process runs (both rank 0) open one folder: the second writes another shard, so each reads its
    own features back, and so does a later run; a shard is free again once its run's cache is gone."""
    data = shared_image_dataset(4)
    model = make_model(seed=0)
    collate = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))
    first, second = collate([data[0], data[1]]), collate([data[4], data[5]])  # other images
    run_a = TowerFeatureCache(model, tmp_path / "shared", "float32")
    run_b = TowerFeatureCache(model, tmp_path / "shared", "float32")
    features_a, features_b = run_a.features(first), run_b.features(second)
    assert not torch.equal(features_a.vision.tokens, features_b.vision.tokens)
    for reader in (run_a, TowerFeatureCache(model, tmp_path / "shared", "float32")):
        assert torch.equal(reader.features(first).vision.tokens, features_a.vision.tokens)
        assert torch.equal(reader.features(second).vision.tokens, features_b.vision.tokens)
    folder = next((tmp_path / "shared").glob("vision-*"))
    assert sorted(p.name for p in folder.glob("rows.*.bin")) == ["rows.0.bin", "rows.1.bin"]
    del run_a, reader
    gc.collect()
    assert TowerFeatureCache(model, tmp_path / "shared", "float32").records["vision"].store.rank == 0


def test_a_full_disk_cache_is_reopened_without_asking_for_its_space_again(tmp_path, monkeypatch):
    """Resuming a run whose cache is stored: only the records still missing need free space."""
    import shutil

    data = shared_image_dataset(3)
    model = make_model(seed=0)
    batch = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))([data[i] for i in range(6)])
    cache = TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=3, expected_texts=2)
    cache.features(batch)  # every record stored
    estimate = sum(cache.estimate.values())
    del cache
    gc.collect()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=estimate // 4))
    again = TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=3, expected_texts=2)
    again.features(batch)
    assert again.stats["vision_misses"] == 0
    with pytest.raises(ValueError, match=r"needs about .* more .* but only"):  # a new dataset needs the space
        TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=300, expected_texts=200)


def test_a_disk_cache_holds_its_blocks_and_a_full_disk_is_an_error_not_a_crash(tmp_path, monkeypatch):
    """The rows a disk cache reserves are allocated at once (a sparse file could meet a full disk in a memory-mapped
    write, which kills the process with SIGBUS); a disk that cannot hold them is reported naming the folder, and
    the shard is left as it was."""
    import errno

    model = make_model(seed=0)
    cache = TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=40, expected_texts=30)
    for records, count in ((cache.records["vision"], 40), (cache.records["text"], 30)):
        rows = next(records.folder.glob("rows.*.bin"))
        assert rows.stat().st_blocks * 512 >= count * records.bytes_per_record  # allocated, not sparse
    vision_rows = next(cache.records["vision"].folder.glob("rows.*.bin"))
    size = vision_rows.stat().st_size
    del cache
    gc.collect()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=r"could not grow rows\.0\.bin .* \(No space left on device\): free some space"):
        TowerFeatureCache(model, tmp_path / "cache", "float32", expected_images=400, expected_texts=30)
    assert vision_rows.stat().st_size == size


def test_the_size_line_names_what_other_cache_folders_hold(tmp_path):
    """A sweep over layers or towers leaves one cache folder per fingerprint; the line printed before filling
    says what the others take, so the disk does not fill up unseen."""
    first = TowerFeatureCache(make_model(seed=0), tmp_path / "cache", "float32", expected_images=4, expected_texts=4)
    assert "other cache folder" not in first.describe() and first.other_folders() == []
    second = TowerFeatureCache(make_model(seed=0, vision_layers=[1], text_layers=[1]), tmp_path / "cache", "float32",
                               expected_images=4, expected_texts=4)
    assert second.other_folders() == sorted(r.folder for r in first.records.values())
    line = second.describe()
    assert "; 2 other cache folders there (text-" in line and "delete those no run needs" in line
    held = sum(f.stat().st_blocks * 512 for r in first.records.values() for f in r.folder.iterdir())
    assert held >= sum(r.stored_bytes() for r in first.records.values()) > 0 and f"hold {_size(held)} for" in line
    (tmp_path / "cache" / "notes").mkdir()  # a folder the cache did not write is not counted
    assert len(second.other_folders()) == 2


def test_what_changes_features_changes_the_folder(tmp_path):
    model = make_model(seed=0)
    folders = set()
    for change in ("none", "weights", "layers", "dtype"):
        if change == "weights":
            with torch.no_grad():
                next(model.vision_model.parameters()).add_(1e-3)
        if change == "layers":
            model = make_model(seed=0, vision_layers=[1], text_layers=[1])
        cache = TowerFeatureCache(model, tmp_path / "cache", "float16" if change == "dtype" else "float32")
        folders.add(cache.records["vision"].folder)
    assert len(folders) == 4
    # inputs are keys by content: another canvas normalisation is another key
    processor = make_processor(tmp_path / "tok")
    item = shared_image_dataset(1)[0]
    keys = cache_keys(RECCollator(processor)([item]), "vision")
    other = processor._with(image_mean=(0.5, 0.5, 0.5))
    assert cache_keys(RECCollator(other)([item]), "vision") != keys


def test_augmentation_needs_views_and_views_bound_the_records(tmp_path):
    data = shared_image_dataset(3)
    processor = make_processor(tmp_path / "tok")
    processor.augment = RECAugmentation(seed=0, random_resize=False)
    model = make_model(seed=0)
    with pytest.raises(ValueError, match="tower_cache_views=K"):
        RECTrainer(model=model, args=_args(tmp_path / "a", tower_cache="memory"),
                   data_collator=RECCollator(processor, train=True), train_dataset=data)
    trainer = train_rec(model, processor, data, None, _args(tmp_path / "b", tower_cache="memory", tower_cache_views=2,
                                                            num_train_epochs=6))
    stats = trainer.tower_cache.stats
    assert stats["vision_records"] <= 3 * 2 * 2  # images x views (x boxes, for augmentations that follow the box)
    assert stats["vision_hits"] > 0 and trainer.data_collator.skipped_batches > 0  # views remembered too
    # a view is a deterministic augmentation of its image
    collator = CachedViewsCollator(RECCollator(processor, train=True), views=1)
    one, two = collator([data[0]]), collator([data[0]])
    assert torch.equal(one["pixel_values"], two["pixel_values"]) and one["vision_cache_keys"] == two["vision_cache_keys"]


def test_refusals(tmp_path, monkeypatch):
    import shutil

    model = make_model(seed=0)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=10_000))
    with pytest.raises(ValueError, match=r"needs about .* but only"):
        TowerFeatureCache(model, tmp_path / "cache", expected_images=1000, expected_texts=1000)
    baseline = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(), method="full")
    with pytest.raises(ValueError, match="needs frozen towers"):
        RECTrainer(model=baseline, args=_args(tmp_path / "c", tower_cache="memory"),
                   data_collator=RECCollator(make_processor(tmp_path / "tok")))
    for bad in (dict(tower_cache_dtype="int8"), dict(tower_cache_views=-1), dict(tower_cache="")):
        with pytest.raises(ValueError, match="tower_cache"):
            _args(tmp_path / "d", **bad)
    # float16 holds features up to ±65504: a tower whose features overflow it is refused, never stored as inf
    data = shared_image_dataset(1)
    batch = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok16")))([data[0]])
    cache = TowerFeatureCache(make_model(seed=0), None, "float16")
    original = cache.records["vision"].layout.pack
    cache.records["vision"].layout.pack = lambda features, kinds: original(features, kinds) * 1e6  # a loud tower
    with pytest.raises(ValueError, match="float16's range"):
        cache.features(batch)
    assert len(cache.records["vision"].store) == 0


def test_cache_runs_the_towers_on_missing_inputs_only(tmp_path):
    """Whatever the dtype, a batch runs the vision tower on its new images only, once each (float32 stays exact:
    see test_float32_cache_gives_the_same_weights)."""
    data = shared_image_dataset(3)  # samples 2k and 2k+1 share image k
    model = make_model(seed=0)
    collate = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))
    sizes: list[int] = []
    model.vision_tower.layers[0][1].register_forward_hook(lambda _m, args, _o: sizes.append(args[0].shape[0]))
    for dtype, expected in (("bfloat16", [1, 2]), ("float16", [1, 2]), ("float32", [1, 2])):
        cache = TowerFeatureCache(model, None, dtype)
        sizes.clear()  # the cache's probe of the layout ran the tower once
        cache.features(collate([data[0], data[1]]))  # one image, twice
        cache.features(collate([data[0], data[2], data[3], data[4]]))  # image 0 again, images 1 and 2 new
        assert sizes == expected, dtype
        assert cache.stats["vision_records"] == 3
    features = cache.features(collate([data[2], data[5]]))
    assert features.vision.tokens.shape[0] == 2 and cache.stats["vision_misses"] == 5


def test_float32_records_read_back_as_the_towers_own_tensors(tmp_path):
    """What a float32 cache hands the side network equals the tower's output bit for bit, in contiguous tensors
    like the tower's: strided views of the stored rows send the side network's matrix products to other kernels,
    which round differently (the demo's cached run drifted from the uncached one until this was so)."""
    data = shared_image_dataset(2)
    model = make_model(seed=0)
    batch = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))([data[0], data[2], data[1]])
    cache = TowerFeatureCache(model, None, "float32")
    cache.features(batch)  # fills
    read = cache.features(batch)  # reads back
    assert cache.stats["vision_hits"] >= 3 and cache.stats["text_hits"] >= 3
    setup = model.adapter_setups[model.active_adapter]
    with torch.no_grad():
        direct = {"vision": model.vision_tower.tap({"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]},
                                                   setup.vision_layers, setup.tap_kinds),
                  "text": model.text_tower.tap({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                               setup.text_layers, setup.tap_kinds)}
    for modality in ("vision", "text"):
        got, want = getattr(read, modality), direct[modality]
        tensors = [(got.tokens, want.tokens), (got.seed, want.seed), (got.mask, want.mask.bool())]
        tensors += [(a, b) for kind in want.taps for a, b in zip(got.taps[kind], want.taps[kind], strict=True)]
        for a, b in tensors:
            assert a.is_contiguous(), modality
            assert torch.equal(a, b), modality


def test_batches_seen_whole_are_built_without_their_images(tmp_path):
    """Once every sample of a batch was batched and its records are cached, the collator builds the batch from what
    it remembered (no image loaded, letterboxed or hashed); what it hands on is the first batch minus the pixels.
    A changed box, file or processor setting is a new sample."""
    data = shared_image_dataset(2)
    paths = []
    for index in range(2):  # the same images as files, as most datasets give them
        paths.append(tmp_path / f"image{index}.png")
        data[2 * index]["image"].save(paths[-1])
    items = [{"image": str(path), "expression": data[2 * i]["expression"], "box": data[2 * i]["box"]}
             for i, path in enumerate(paths)] + [data[1], data[3]]
    processor = make_processor(tmp_path / "tok")
    collate = TowerCacheCollator(RECCollator(processor, train=True))
    cache = TowerFeatureCache(make_model(seed=0), None, "float32")
    first = collate(items)
    assert collate.skipped_batches == 0  # no cache to read yet: the collator was never told of one
    collate.cache = cache
    first = collate(items)
    again = collate(items)  # the records are not in the cache yet: processed again
    assert collate.skipped_batches == 0 and "pixel_values" in again
    expected = cache.features(first)
    skipped = collate(items)
    assert collate.skipped_batches == 1
    assert "pixel_values" not in skipped
    assert set(skipped) == set(first) - {"pixel_values"}  # the mask is drawn again: evaluation clamps boxes to it
    for key in skipped:
        assert (torch.equal(skipped[key], first[key]) if isinstance(first[key], torch.Tensor)
                else skipped[key] == first[key]), key
    read = cache.features(skipped)
    assert torch.equal(read.vision.tokens, expected.vision.tokens) and torch.equal(read.text.tokens, expected.text.tokens)
    with pytest.raises(RuntimeError, match="built without its pixel_values"):  # records gone since: said, not a KeyError
        TowerFeatureCache(make_model(seed=0), None, "float32").features(skipped)
    # anything the batch is made of changes the sample
    moved = dict(items[0], box=(1, 1, 9, 9))
    assert "pixel_values" in collate([moved, *items[1:]])
    Image.new("RGB", (40, 32), (0, 0, 0)).save(paths[1])  # the file is rewritten: its size or time changes
    os.utime(paths[1], ns=(0, 10**9))
    assert "pixel_values" in collate(items)
    processor.image_processor.image_mean = [0.1, 0.2, 0.3]
    assert "pixel_values" in collate(items[2:])
    assert collate.skipped_batches == 1


def test_views_are_the_same_augmentations_in_dataloader_workers(tmp_path, monkeypatch):
    """A view is one fixed augmentation whatever process draws it: a DataLoader worker (whose augmentation re-seeds
    its own generator from the worker seed, new every epoch) gives the main process's views, so a cache of
    ``views`` per image holds images x views records however many workers load the data."""
    data = shared_image_dataset(3)
    processor = make_processor(tmp_path / "tok")
    processor.augment = RECAugmentation(seed=0, random_resize=False, random_crop=False)  # a view ignores the box
    collator = CachedViewsCollator(RECCollator(processor, train=True), views=1)
    expected = [collator([data[i]]) for i in range(len(data))]
    with monkeypatch.context() as patch:
        for epoch in range(2):  # what the augmentation sees in a worker: a new worker seed every epoch
            info = type("WorkerInfo", (), {"seed": 1000 + epoch, "id": 0})()
            patch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
            for index, batch in enumerate(collator([data[i]]) for i in range(len(data))):
                assert torch.equal(batch["pixel_values"], expected[index]["pixel_values"]), (epoch, index)
                assert batch["vision_cache_keys"] == expected[index]["vision_cache_keys"]
    records = {}
    for workers in (0, 1):
        trainer = train_rec(make_model(seed=0), processor, data, None,
                            _args(tmp_path / f"w{workers}", tower_cache="memory", tower_cache_views=2,
                                  dataloader_num_workers=workers, num_train_epochs=4))
        records[workers] = trainer.tower_cache.stats["vision_records"]
    assert records == {0: 3 * 2, 1: 3 * 2}  # images x views
