"""Training and the tower cache (round 10): what a Trainer user sets must be what happens, and a disk cache must ask
for the space it will take, no more."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from m2ist.cache import TowerCacheCollator, TowerFeatureCache
from m2ist.data.collator import RECCollator
from m2ist.trainer import train_rec
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.tiny import cpu_training_args

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(folder: Path, modality: str, shard: int) -> int:
    """The rows a shard's rows file holds (0 without a file)."""
    records = next(folder.glob(f"{modality}-*"))
    path = records / f"rows.{shard}.bin"
    return path.stat().st_size if path.exists() else 0


def test_a_disk_cache_reserves_only_the_records_its_writer_will_add(tmp_path: Path, monkeypatch) -> None:
    """A second writer on a folder that holds every record (a sweep sharing ``tower_cache=PATH``) reserves nothing,
    and each rank of a distributed run reserves its share: before, each reserved the whole estimate (world size x the
    disk) and was refused on a disk that holds the cache once."""
    model, data = make_model(seed=0), make_dataset(6, seed=0)
    batch = TowerCacheCollator(RECCollator(make_processor(tmp_path / "tok")))([data[i] for i in range(6)])
    filled = TowerFeatureCache(model, tmp_path / "shared", "float32", expected_images=6, expected_texts=6)
    filled.features(batch)
    second = TowerFeatureCache(model, tmp_path / "shared", "float32", expected_images=6, expected_texts=6)
    assert second.records["vision"].store.rank == 1  # the first run holds shard 0
    assert _rows(tmp_path / "shared", "vision", 1) == 0
    second.features(batch)
    assert second.stats["vision_misses"] == 0
    per_image = filled.bytes_per_image
    # two ranks of one run, on a disk without room for the cache twice: each asks for and takes half
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=int(0.8 * sum(filled.estimate.values()))))
    ranks = [TowerFeatureCache(model, tmp_path / "ddp", "float32", expected_images=6, expected_texts=6, rank=rank,
                               world_size=2) for rank in (0, 1)]
    assert [_rows(tmp_path / "ddp", "vision", rank) for rank in (0, 1)] == [3 * per_image] * 2
    assert len(ranks) == 2 and os.path.isdir(tmp_path / "ddp")


@pytest.mark.parametrize("schedule", ["reduce_lr_on_plateau", "greedy"])
def test_a_metric_driven_schedule_follows_the_direction_of_the_best_metric(tmp_path: Path, schedule: str) -> None:
    """With the default metric ``acc@0.5`` (higher is better) a plateau schedule must not cut the learning rate while
    the accuracy rises: transformers builds it in mode 'min' whatever the metric."""
    rising = iter([0.1, 0.2, 0.3, 0.4])
    args = cpu_training_args(tmp_path / "out", max_steps=3, eval_strategy="steps", eval_steps=1,
                             lr_scheduler_type=schedule, lr_scheduler_kwargs={"patience": 0})
    trainer = train_rec(make_model(seed=0), make_processor(tmp_path / "tok"), make_dataset(8, seed=0),
                        make_dataset(4, seed=1), args, compute_metrics=lambda _: {"acc@0.5": next(rising)})
    assert trainer.lr_scheduler.mode == "max"
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert rates and min(rates) >= args.learning_rate
    lower = cpu_training_args(tmp_path / "o2", lr_scheduler_type=schedule, eval_strategy="epoch",
                              metric_for_best_model="loss_giou")
    assert lower.lr_scheduler_kwargs["mode"] == "min"
    with pytest.raises(ValueError, match=r"mode='min' contradicts metric_for_best_model='acc@0.5'.*set mode='max'"):
        cpu_training_args(tmp_path / "o3", lr_scheduler_type=schedule, eval_strategy="epoch",
                          lr_scheduler_kwargs={"mode": "min"})
