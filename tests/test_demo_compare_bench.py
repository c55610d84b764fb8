"""The embedded default and the evidence commands run end to end in their tiny modes."""

from __future__ import annotations

import json

import pytest

from m2ist.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M2IST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_demo_tiny_trains_evaluates_saves_reloads_and_draws(tmp_path, cache, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--steps", "6", "--batch-size", "4", "--output-dir", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) == {"val", "test_attributes", "test_compositional", "test_relations", "test_spatial"}
    for split, metrics in results["metrics"].items():
        assert 0.0 <= metrics["acc@0.5"] <= 1.0 and metrics["count"] > 0, split
        assert f"| {split} |" in printed
    assert (out / "adapter" / "m2ist_model.safetensors").exists()
    assert (out / "adapter" / "m2ist_processor.json").exists()
    from PIL import Image

    with Image.open(out / "predictions.png") as picture:
        assert picture.width >= 512
    assert any(cache.rglob("model.safetensors"))  # the pretrained vision tower was cached
    stats = results["tower_cache_stats"]  # 24 training samples: 6 steps x 4 is one epoch, each image stored once
    assert results["tower_cache"] == "memory" and stats["vision_hits"] + stats["vision_misses"] == 24
    assert 0 < stats["vision_records"] <= 24
    # the demo caches in float32 (exact: every batch computed as without a cache)
    assert stats["dtype"] == "float32" and stats["bytes_per_image"] > 0 and "tower cache (float32)" in printed


def test_compare_tiny_reports_ratios_to_full(tmp_path, cache, capsys):
    output = tmp_path / "compare.json"
    argv = ["compare", "--tiny", "--methods", "full,m2ist", "--steps", "3", "--batch-size", "4",
            "--work-dir", str(tmp_path / "work"), "--output", str(output)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| full |" in table and "| m2ist |" in table
    report = json.loads(output.read_text())
    rows = {row["method"]: row for row in report["methods"]}
    assert rows["full"]["ratios_to_full"]["exact_bytes"] == 1.0
    m2ist = rows["m2ist"]
    assert m2ist["trainable_params"] < rows["full"]["trainable_params"] / 10
    assert m2ist["ratios_to_full"]["exact_bytes"] < 1.0
    assert set(m2ist["metrics"]) >= {"test_attributes", "test_compositional", "test_relations"}


def test_bench_tiny_writes_the_promised_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--methods", "full,m2ist,m2ist-cached,m2ist-x4", "--steps", "1",
                 "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "| m2ist (cached) |" in printed and "m2ist ×4 adapters: 4 adapters answer on one pass" in printed
    assert "KiB per image" in printed
    assert "floor (frozen towers' forward alone)" in printed and "beyond the floor: the REC head" in printed
    report = json.loads(output.read_text())
    assert report["paper"] == {"trainable": 0.0211, "memory": 0.3961, "time": 0.6346}
    for row in report["methods"]:
        for key in ("trainable_params", "total_params", "saved_tensor_bytes", "peak_memory_bytes", "step_time_s",
                    "ratios_to_full"):
            assert key in row, key
    rows = {r["method"]: r for r in report["methods"]}
    assert rows["m2ist-cached"]["cache_bytes_per_image"] > 0 and rows["m2ist-x4"]["inference_all_time_s"] > 0
    m2ist = rows["m2ist"]
    assert m2ist["ratios_to_full"]["saved_tensor_bytes"] < 0.6
    assert m2ist["head_time_s"] > 0 and m2ist["head_time_no_dropout_s"] > 0
    assert m2ist["lower_bound_time_s"] > m2ist["floor_time_s"]
    # the breakdown is the uncached row's, printed once (the cached row's step is below it by design)
    assert printed.count("M²IST lower bound") == 1 and rows["m2ist-cached"]["lower_bound_time_s"] is None


def test_head_ablation_tiny_scores_every_variant_on_every_test_split(cache, capsys):
    from m2ist.evidence.ablation import VARIANTS
    from m2ist.evidence.ablation import main as ablation_main
    from m2ist.evidence.demo import DEMO_HEAD

    assert list(VARIANTS.values())[-1] == DEMO_HEAD  # the table ends with the demo's own head
    assert ablation_main(["--tiny", "--steps", "2", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| head | test_attributes | test_compositional | test_relations | test_spatial |" in printed
    for name in VARIANTS:
        assert f"| {name} |" in printed


def test_cache_step_tiny_prints_the_three_timings(cache, capsys):
    from m2ist.evidence.cache_step import main as cache_step_main

    assert cache_step_main(["--tiny", "--rounds", "2", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "uncached" in printed and "reading the tower cache" in printed and "KiB per image" in printed
