"""The towers' dtype while training (``RECTrainingArguments.tower_dtype``) and in ``m2ist bench``: bfloat16 towers on a
CUDA device that supports it by default, nothing changed on a CPU. No GPU is needed: the device decision is a pure
function, tested on every case, and the explicit casts run on the CPU."""

from __future__ import annotations

import gc
import json

import pytest
import torch

import m2ist.trainer as trainer_module
from m2ist import SideTunedModel, get_side_tuned_model
from m2ist.cli import build_parser, build_training_arguments, main, resolve_settings
from m2ist.evidence import bench
from m2ist.evidence.baselines import build_model
from m2ist.trainer import RECTrainer, resolve_tower_dtype, train_rec
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.tiny import cpu_training_args, text_tower, tiny_config, vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


_args = cpu_training_args


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


# ---------------------------------------------------------------------------------------------- the decision
@pytest.mark.parametrize(("requested", "device", "towers", "bf16_supported", "expected"), [
    ("auto", "cuda", FP32, True, BF16),               # the default on a bf16 GPU
    ("auto", "cuda:1", FP32, True, BF16),
    ("auto", torch.device("cuda", 0), FP32, True, BF16),
    ("auto", "cuda", FP32, False, None),              # a GPU without bfloat16 (pre-Ampere): left alone
    ("auto", "cpu", FP32, True, None),                # CPUs: left alone
    ("auto", "mps", FP32, True, None),
    ("auto", "cuda", BF16, True, None),               # towers already cast (backbone_dtype): left alone
    ("auto", "cuda", FP16, True, None),
    ("auto", "cuda", None, True, None),               # the two towers differ: left alone
    ("keep", "cuda", FP32, True, None),
    ("keep", "cpu", BF16, False, None),
    ("float32", "cpu", BF16, False, FP32),            # explicit values apply everywhere
    ("bfloat16", "cpu", FP32, False, BF16),
    ("float16", "cuda", FP32, True, FP16),
    ("bfloat16", "cuda", BF16, True, BF16),
])
def test_resolve_tower_dtype(requested, device, towers, bf16_supported, expected):
    assert resolve_tower_dtype(requested, device, towers, bf16_supported) == expected


def test_tower_dtype_is_validated_like_its_neighbours(tmp_path):
    with pytest.raises(ValueError, match=r"tower_dtype must be one of \('auto', 'float32', 'bfloat16', 'float16', "
                                         r"'keep'\), got 'int8'"):
        _args(tmp_path, tower_dtype="int8")
    with pytest.raises(ValueError, match="tower_dtype must be one of"):
        resolve_tower_dtype("half", "cuda", FP32, True)
    assert _args(tmp_path).tower_dtype == "auto"


def test_the_command_line_has_the_flag(capsys):
    settings = resolve_settings(build_parser("train").parse_args(["train", "--output-dir", "out", "--tower-dtype",
                                                                   "bfloat16", "--use-cpu"]))
    assert build_training_arguments(settings).tower_dtype == "bfloat16"
    assert main(["train", "--help"]) == 0
    assert "--tower-dtype {auto,float32,bfloat16,float16,keep}" in capsys.readouterr().out
    assert main(["train", "--tower-dtype", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the trainer
def test_auto_on_a_cpu_changes_nothing(tmp_path):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    RECTrainer(model, _args(tmp_path))
    assert _dtypes(model.vision_model) == _dtypes(model.text_model) == {FP32}
    assert model.config.backbone_dtype is None
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_the_trainer_asks_the_decision_with_its_device_and_applies_it(tmp_path, monkeypatch):
    """Seen from the trainer, as on a bf16 GPU: the decision gets the training device, the towers' dtype and whether
    bfloat16 is supported, and its answer is applied (cast + backbone_dtype) before the tower cache opens."""
    calls = []

    def as_on_a_gpu(requested, device, towers, bf16_supported):
        calls.append((requested, torch.device(device).type, towers, bf16_supported))
        return resolve_tower_dtype(requested, "cuda", towers, True)

    monkeypatch.setattr(trainer_module, "resolve_tower_dtype", as_on_a_gpu)
    model = make_model()
    trainer = train_rec(model, make_processor(tmp_path / "tokenizer"), make_dataset(8, seed=1),
                        args=_args(tmp_path / "run", max_steps=1, tower_cache="memory"))
    assert calls == [("auto", "cpu", FP32, False)]
    assert _dtypes(model.vision_model) == _dtypes(model.text_model) == {BF16}
    assert model.config.backbone_dtype == "bfloat16"
    fingerprints = [records.fingerprint for records in trainer.tower_cache.records.values()]
    assert [f["tower_dtype"] for f in fingerprints] == ["bfloat16", "bfloat16"]  # the cache opened after the cast


def test_explicit_bfloat16_casts_the_towers_keeps_side_and_head_float32_and_trains(tmp_path):
    model = make_model()
    model.add_adapter("second", tiny_config())
    tower_state = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    side_before = {k: v.clone() for k, v in model.side.state_dict().items()}
    trainer = train_rec(model, make_processor(tmp_path / "tokenizer"), make_dataset(8, seed=1),
                        args=_args(tmp_path / "run", max_steps=2, tower_dtype="bfloat16"))

    assert _dtypes(model.vision_model) == _dtypes(model.text_model) == {BF16}
    assert _dtypes(model.side) == _dtypes(model.head) == {FP32} and model.dtype == FP32
    assert all(p.dtype == FP32 for p in model.inactive_adapters.parameters())
    assert {s.config.backbone_dtype for s in model.adapter_setups.values()} == {"bfloat16"}  # every adapter's config
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, side_before[k]) for k, v in model.side.state_dict().items())  # it trained
    for key, value in model.vision_model.state_dict().items():  # frozen: only cast
        assert torch.equal(value, tower_state[key].to(value.dtype)), key
    with torch.no_grad():
        batch = {"pixel_values": torch.randn(1, 3, 32, 32), "pixel_mask": torch.ones(1, 32, 32, dtype=torch.long)}
        taps = model.vision_tower.tap(batch, model.vision_layers, model.tap_kinds)
    assert taps.tokens.dtype == FP32 and all(t.dtype == FP32 for ts in taps.taps.values() for t in ts)

    trainer.save_model(str(tmp_path / "adapter"))  # recorded with the adapter; a reload casts the towers the same way
    saved = json.loads((tmp_path / "adapter" / "m2ist_config.json").read_text())
    assert saved["backbone_dtype"] == "bfloat16"
    torch.manual_seed(0)
    again = SideTunedModel.from_pretrained(tmp_path / "adapter", vision_model=vision_tower("vit"),
                                           text_model=text_tower("bert"))
    assert _dtypes(again.vision_model) == {BF16} and again.dtype == FP32


def test_baselines_keep_their_towers_and_refuse_a_cast(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "resolve_tower_dtype",  # as on a bf16 GPU: 'auto' still leaves them alone
                        lambda requested, device, towers, supported: resolve_tower_dtype(requested, "cuda", towers, True))
    model = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(), method="full")
    for value in ("float32", "bfloat16", "float16"):
        with pytest.raises(ValueError, match=rf"tower_dtype='{value}' casts frozen towers, but method 'full' trains"):
            RECTrainer(model, _args(tmp_path, tower_dtype=value))
    for value in ("auto", "keep"):
        RECTrainer(model, _args(tmp_path, tower_dtype=value))
        assert _dtypes(model) == {FP32}


def test_resuming_with_the_towers_in_another_dtype_is_refused(tmp_path):
    processor, data = make_processor(tmp_path / "tokenizer"), make_dataset(8, seed=1)
    run = tmp_path / "run"
    train_rec(make_model(), processor, data, args=_args(run, max_steps=1, save_strategy="steps", save_steps=1,
                                                        tower_dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"m2ist_config\.backbone_dtype: checkpoint 'bfloat16', now None"):
        train_rec(make_model(), processor, data, args=_args(run, max_steps=2, tower_dtype="keep"),
                  resume_from_checkpoint=True)
    trainer = train_rec(make_model(), processor, data, args=_args(run, max_steps=2, tower_dtype="bfloat16"),
                        resume_from_checkpoint=True)
    assert trainer.state.global_step == 2


# ---------------------------------------------------------------------------------------------- bench
@pytest.mark.parametrize(("method", "device", "given", "bf16_supported", "expected"), [
    ("m2ist", "cuda", None, True, "bfloat16"),         # follows training's default on a bf16 GPU
    ("m2ist-cached", "cuda", None, True, "bfloat16"),
    ("m2ist-x4", "cuda:0", None, True, "bfloat16"),
    ("m2ist", "cuda", None, False, None),
    ("m2ist", "cuda", "float32", True, "float32"),     # --backbone-dtype wins
    ("m2ist", "cpu", None, True, None),                # CPU unchanged: float32 towers
    ("m2ist", "cpu", "bfloat16", False, "bfloat16"),
    ("full", "cuda", None, True, None),                # baselines train their towers
    ("lora", "cuda", "bfloat16", True, None),
])
def test_bench_tower_dtype_follows_training(method, device, given, bf16_supported, expected):
    assert bench.bench_backbone_dtype(method, device, given, bf16_supported) == expected


def test_bench_on_cpu_asks_torch_and_changes_nothing():
    assert bench.bench_backbone_dtype("m2ist", "cpu", None) is None


def test_bench_rows_record_their_towers_dtype(monkeypatch):
    def row(method, backbone_dtype=None):
        return bench.measure(method, 1, 1, 0, "cpu", True, backbone_dtype)

    plain = row("m2ist")
    assert plain["tower_dtype"] == "float32"
    assert row("m2ist", "bfloat16")["tower_dtype"] == "bfloat16"
    real = bench.bench_backbone_dtype
    monkeypatch.setattr(bench, "bench_backbone_dtype", lambda method, device, given: real(method, "cuda", given, True))
    gpu_like = [row("m2ist"), row("full")]  # what a bf16 GPU would choose, measured on the CPU
    assert [r["tower_dtype"] for r in gpu_like] == ["bfloat16", "float32"]
    table = bench.format_table(bench.add_ratios(gpu_like))
    assert "| method | towers |" in table and "| m2ist | bfloat16 |" in table and "| full | float32 |" in table


def test_bench_takes_float32_towers(capsys):
    assert bench.main(["--one", "m2ist", "--tiny", "--steps", "1", "--warmup", "0", "--device", "cpu",
                       "--backbone-dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tower_dtype"] == "float32"
    with pytest.raises(SystemExit):
        bench.main(["--backbone-dtype", "int8", "--tiny"])


def test_casting_towers_another_model_shares_warns_and_a_private_copy_does_not():
    """Two models on the same tower objects: the second one's backbone_dtype (or set_backbone_dtype) casts the
    towers in place, so the first model's outputs change too; that is said, as PEFT says a model wrapped twice."""
    import copy
    import warnings

    torch.manual_seed(0)
    vision, text = vision_tower("vit"), text_tower("bert")
    first = get_side_tuned_model(vision, text, tiny_config())
    with pytest.warns(UserWarning) as said:
        second = get_side_tuned_model(vision, text, tiny_config(backbone_dtype="bfloat16"))
    assert [str(w.message).split(";")[0] for w in said] == [
        f"The {name} tower (float32) is shared with another SideTunedModel" for name in ("vision", "text")]
    assert "casting it to bfloat16 in place changes that model's outputs too" in str(said[0].message)
    with pytest.warns(UserWarning, match=r"tower \(bfloat16\) is shared") as said:
        first.set_backbone_dtype("float32")
    assert len(said) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.set_backbone_dtype("float32")  # nothing changes: nothing to say
        del second, first
        gc.collect()  # once the first model is gone, nobody else holds the towers
        alone = get_side_tuned_model(vision, text, tiny_config())
        alone.set_backbone_dtype("bfloat16")
        get_side_tuned_model(copy.deepcopy(vision), copy.deepcopy(text), tiny_config(backbone_dtype="float32"))
