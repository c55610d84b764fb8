"""The evidence's measurements: memory counted once and as held, floors per tower dtype, counts validated."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from m2ist.evidence import ablation, bench, cache_step, compare, demo
from m2ist.evidence.profiling import saved_tensor_accounting


class _Toy(nn.Module):
    """Two chained linears on the loss path (the second saves its weight: its input needs a gradient) and a
    trainable linear off it (a pooler, DETR's decoder in full fine-tuning): it never gets a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second, self.unused = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=self.second(self.first(x)).pow(2).sum())


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def test_exact_bytes_count_parameters_once_and_only_the_gradients_and_state_held():
    torch.manual_seed(0)
    model, batch = _Toy(), {"x": torch.randn(4, 8)}
    storages, parameters = set(), {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storages.add((tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    assert any(ptr in parameters for ptr, _ in storages)  # autograd saves a weight by reference
    activations = sum(size for ptr, size in storages if ptr not in parameters)

    figures = bench.profile_training_step(model, batch, steps=1, warmup=0)
    assert figures["saved_tensor_bytes"] == activations  # no parameter counted again as a saved tensor
    used = _bytes([*model.first.parameters(), *model.second.parameters()])
    state = figures["exact_bytes"] - figures["saved_tensor_bytes"] - _bytes(model.parameters())
    # gradients + AdamW's two moments of the parameters that got a gradient (+ its step counters), not the unused ones
    assert 3 * used <= state < 3 * used + 64
    assert model.unused.weight.grad is None


def test_saved_tensor_accounting_leaves_out_excluded_storages():
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4, requires_grad=True)
    with saved_tensor_accounting() as every:
        layer(x)
    with saved_tensor_accounting(exclude=layer.parameters()) as own:
        layer(x)
    assert every.bytes - own.bytes == layer.weight.untyped_storage().nbytes()


@pytest.mark.parametrize(("steps", "warmup"), [(0, 1), (1, -1), (1.5, 0), (True, 0)])
def test_profile_training_step_refuses_counts_that_measure_nothing(steps, warmup):
    with pytest.raises(ValueError, match="profile_training_step"):
        bench.profile_training_step(_Toy(), {"x": torch.randn(2, 8)}, steps=steps, warmup=warmup)


def _row(method: str, dtype: str, floor: float, step: float) -> dict:
    return {"method": method, "tower_dtype": dtype, "trainable_params": 1, "total_params": 10, "parameter_counts": {},
            "saved_tensor_bytes": 1, "exact_bytes": 1, "peak_memory_bytes": 1, "step_time_s": step,
            "floor_time_s": floor}


def test_bench_floor_is_given_per_tower_dtype():
    """On a bf16 GPU M²IST's rows run their towers in bfloat16, the baselines in float32: one median over all rows
    (0.655 s here) would be neither floor."""
    rows = [_row("full", "float32", 1.0, 3.0), _row("adapter", "float32", 1.1, 2.5), _row("lora", "float32", 1.05, 2.4),
            _row("m2ist", "bfloat16", 0.3, 0.6), _row("m2ist-cached", "bfloat16", 0.3, 0.2),
            _row("m2ist-x4", "bfloat16", 0.31, 0.6)]
    table = bench.format_table(bench.add_ratios(rows))
    assert "floor (frozen towers' forward alone, float32 towers): 1.050 s = 0.350 of full" in table
    assert "floor (frozen towers' forward alone, bfloat16 towers): 0.300 s = 0.100 of full" in table
    one_dtype = bench.format_table(bench.add_ratios([_row("full", "float32", 1.0, 3.0), _row("m2ist", "float32", 0.8, 1.0)]))
    assert "floor (frozen towers' forward alone): 0.900 s" in one_dtype


def test_compare_table_says_each_methods_tower_dtype():
    metrics = {"test_a": {"acc@0.5": 0.5}}
    rows = [{**_row("full", "float32", 1, 3), "metrics": metrics}, {**_row("m2ist", "bfloat16", 1, 1), "metrics": metrics}]
    table = compare.format_table(bench.add_ratios(rows))
    assert "| method | towers |" in table and "| full | float32 |" in table and "| m2ist | bfloat16 |" in table


@pytest.fixture
def no_benchmark(monkeypatch):
    """Drawing the benchmark fails the test at once: a bad count must be refused before any work."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the benchmark was drawn before the counts were checked")

    monkeypatch.setattr(demo, "prepare", refuse)


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--steps", "-3"], ["--batch-size", "0"], ["--seed", "-1"],
                                  ["--steps", "2.5"]])
def test_ablation_cli_refuses_counts_that_train_nothing(argv, no_benchmark, capsys):
    with pytest.raises(SystemExit) as stopped:
        ablation.main(["--tiny", *argv])
    assert stopped.value.code == 2 and "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize("counts", [{"steps": 0}, {"steps": -1}, {"batch_size": 0}])
def test_ablation_run_and_train_head_refuse_counts_that_train_nothing(counts, no_benchmark):
    with pytest.raises(ValueError, match=r"ablation: (steps|batch_size) must be a whole number >= 1"):
        ablation.run(tiny=True, **counts)
    with pytest.raises(ValueError, match="ablation"):
        ablation.train_head(nn.Linear(1, 1), (), None, **{"steps": 1, "batch_size": 1, "seed": 0, **counts})


@pytest.mark.parametrize(("argv", "counts"), [(["--rounds", "0"], {"rounds": 0}),
                                              (["--batch-size", "-1"], {"batch_size": -1}),
                                              (["--batch-size", "0"], {"batch_size": 0})])
def test_cache_step_refuses_counts_that_measure_nothing(argv, counts, no_benchmark, capsys):
    with pytest.raises(SystemExit) as stopped:
        cache_step.main(["--tiny", *argv])
    assert stopped.value.code == 2 and "must be positive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cache_step"):
        cache_step.measure(tiny=True, **{"rounds": 1, "batch_size": 1, **counts})
