"""SideTunedModel.from_pretrained behaves like PEFT's: inference by default, is_trainable, subfolder, revision,
dtype / torch_dtype, device / device_map, unknown arguments refused; .dtype, .to(dtype), .half(), .bfloat16()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from m2ist import M2ISTConfig, RECTrainer, RECTrainingArguments, SideTunedModel, get_side_tuned_model
from m2ist.hub import push_folder_to_hub
from tests.conftest import make_batch
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import text_tower, tiny_config, vision_tower

hub = hub_fixture(name="hub", max_lifetime_s=120)


def saved_adapter(folder: Path, **config) -> SideTunedModel:
    """A tiny adapter with dropout on and non-zero side weights, saved to ``folder`` (towers passed when loading)."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"),
                                 tiny_config(side_dropout=0.5, fusion_dropout=0.5, **config))
    with torch.no_grad():
        for param in model.side.parameters():
            param.add_(0.05)
    model.save_pretrained(folder)
    return model


def load(folder, model: SideTunedModel, **kwargs) -> SideTunedModel:
    return SideTunedModel.from_pretrained(folder, vision_model=model.vision_model, text_model=model.text_model, **kwargs)


def inputs() -> dict[str, torch.Tensor]:
    batch = make_batch()
    batch.pop("labels")
    return batch


def test_loads_for_inference_by_default(tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "adapter")
    loaded = load(tmp_path / "adapter", model)

    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.get_nb_trainable_parameters()[0] == 0
    first, second = loaded(**inputs()).pred_boxes, loaded(**inputs()).pred_boxes
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout is off: the same boxes twice


def test_is_trainable_continues_training(tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "adapter")
    loaded = load(tmp_path / "adapter", model, is_trainable=True)

    assert loaded.training and loaded.side.training and loaded.head.training
    assert not loaded.vision_model.training and not loaded.text_model.training  # towers always in eval()
    assert all(p.requires_grad for p in [*loaded.side.parameters(), *loaded.head.parameters()])
    assert not any(p.requires_grad for p in [*loaded.vision_model.parameters(), *loaded.text_model.parameters()])
    trainable, _ = loaded.get_nb_trainable_parameters()
    assert trainable == sum(n for role, n in loaded.parameter_counts().items() if role in ("side", "head"))
    first, second = loaded(**inputs()).pred_boxes, loaded(**inputs()).pred_boxes
    assert not torch.equal(first, second)  # dropout is on in train mode


def test_the_trainer_says_how_to_continue_training_a_loaded_adapter(tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "adapter")
    args = RECTrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    frozen = RECTrainer(model=load(tmp_path / "adapter", model), args=args)
    with pytest.raises(ValueError, match="is_trainable=True"):
        frozen.create_optimizer()
    trainable = RECTrainer(model=load(tmp_path / "adapter", model, is_trainable=True), args=args)
    assert trainable.create_optimizer() is not None


def test_subfolder_local_and_on_the_hub(hub: LocalHub, tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "repo" / "refcoco")
    expected = load(tmp_path / "repo" / "refcoco", model)(**inputs()).pred_boxes

    local = load(tmp_path / "repo", model, subfolder="refcoco")
    torch.testing.assert_close(local(**inputs()).pred_boxes, expected, rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        load(tmp_path / "repo", model, subfolder="other")
    with pytest.raises(ValueError, match="relative path"):
        load(tmp_path / "repo", model, subfolder="../repo")

    push_folder_to_hub(tmp_path / "repo", "org/adapters", endpoint=hub.url)
    pulled = load("org/adapters", model, subfolder="refcoco", endpoint=hub.url, cache_dir=tmp_path / "cache")
    torch.testing.assert_close(pulled(**inputs()).pred_boxes, expected, rtol=0, atol=0)


def test_revision_picks_the_branch(hub: LocalHub, tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "v1")
    push_folder_to_hub(tmp_path / "v1", "org/adapter", endpoint=hub.url)
    with torch.no_grad():
        model.head.vision_proj.bias.add_(0.3)
    model.save_pretrained(tmp_path / "v2")
    push_folder_to_hub(tmp_path / "v2", "org/adapter", revision="v2", endpoint=hub.url)

    hub_kwargs = {"endpoint": hub.url, "cache_dir": tmp_path / "cache"}
    main = load("org/adapter", model, **hub_kwargs)
    branch = load("org/adapter", model, revision="v2", **hub_kwargs)
    torch.testing.assert_close(branch(**inputs()).pred_boxes, model.eval()(**inputs()).pred_boxes, rtol=0, atol=1e-6)
    assert not torch.equal(main(**inputs()).pred_boxes, branch(**inputs()).pred_boxes)


def test_dtype_and_the_deprecated_torch_dtype(tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "adapter")

    half = load(tmp_path / "adapter", model, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert {p.dtype for p in [*half.side.parameters(), *half.head.parameters()]} == {torch.bfloat16}
    assert {p.dtype for p in half.vision_model.parameters()} == {torch.float32}  # towers: backbone_dtype
    assert half(**inputs()).pred_boxes.dtype == torch.bfloat16

    by_name = load(tmp_path / "adapter", model, dtype="float16")
    assert by_name.dtype == torch.float16
    with pytest.warns(FutureWarning, match="torch_dtype.*deprecated.*dtype"):
        old_style = load(tmp_path / "adapter", model, torch_dtype=torch.bfloat16)
    assert old_style.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="both"):
        load(tmp_path / "adapter", model, dtype=torch.float16, torch_dtype=torch.float16)
    with pytest.raises(ValueError, match="not supported"):
        load(tmp_path / "adapter", model, dtype="int8")
    with pytest.raises(ValueError, match="floating"):
        load(tmp_path / "adapter", model, dtype=torch.int64)

    half.save_pretrained(tmp_path / "bf16")
    assert load(tmp_path / "bf16", model, dtype="auto").dtype == torch.bfloat16
    assert load(tmp_path / "bf16", model).dtype == torch.float32  # default: float32, as built


def test_device_and_single_device_map(tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "adapter")
    for kwargs in ({"device": "cpu"}, {"device_map": "cpu"}, {"device_map": {"": "cpu"}}, {"device_map": "auto"}):
        loaded = load(tmp_path / "adapter", model, **kwargs)
        expected = torch.device("cuda", 0) if torch.cuda.is_available() and kwargs.get("device_map") == "auto" \
            else torch.device("cpu")
        assert loaded.device == expected and next(loaded.vision_model.parameters()).device == expected
    with pytest.raises(ValueError, match="one device"):
        load(tmp_path / "adapter", model, device_map={"side": "cpu", "head": "cpu"})
    with pytest.raises(ValueError, match="one device"):
        load(tmp_path / "adapter", model, device_map="balanced")
    with pytest.raises(TypeError, match="not both"):
        load(tmp_path / "adapter", model, device="cpu", device_map="cpu")


def test_config_from_pretrained_names_the_arguments_it_takes(tmp_path: Path) -> None:
    saved_adapter(tmp_path / "adapter")
    assert M2ISTConfig.from_pretrained(tmp_path / "adapter").bottleneck == tiny_config().bottleneck
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['side_dropout'\]; it takes \['subfolder'"):
        M2ISTConfig.from_pretrained(tmp_path / "adapter", side_dropout=0.3)


def test_unknown_arguments_are_refused_with_the_accepted_ones(tmp_path: Path) -> None:
    model = saved_adapter(tmp_path / "adapter")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['bottleneck', 'low_cpu_mem_usage'\\]") as info:
        load(tmp_path / "adapter", model, low_cpu_mem_usage=True, bottleneck=4)
    for accepted in ("is_trainable", "subfolder", "dtype", "device_map", "side_dropout", "backbone_dtype"):
        assert accepted in str(info.value)
    assert load(tmp_path / "adapter", model, side_dropout=0.0).config.side_dropout == 0.0  # runtime overrides


def test_to_dtype_half_and_bfloat16_move_side_and_head_only() -> None:
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config()).eval()
    reference = model(**inputs()).pred_boxes

    assert model.to(torch.bfloat16) is model and model.dtype == torch.bfloat16
    assert {p.dtype for p in model.text_model.parameters()} == {torch.float32}
    boxes = model(**inputs()).pred_boxes
    assert boxes.dtype == torch.bfloat16
    torch.testing.assert_close(boxes.float(), reference, atol=0.05, rtol=0)
    assert model.half().dtype == torch.float16 and model(**inputs()).pred_boxes.dtype == torch.float16
    assert model.float().dtype == torch.float32
    assert model.to("cpu", torch.bfloat16).dtype == torch.bfloat16 and model.device == torch.device("cpu")
    assert model.bfloat16().dtype == torch.bfloat16
    assert model.double().dtype == torch.float64 and {p.dtype for p in model.text_model.parameters()} == {torch.float32}
    with pytest.raises(TypeError, match="floating dtype"):
        model.to(torch.int64)
    with pytest.raises(TypeError, match="device and/or a floating dtype"):
        model.to("not-a-device")


def test_a_pull_is_one_snapshot_download_that_names_m2ist(hub: LocalHub, tmp_path: Path) -> None:
    """Two listing requests, then a HEAD and a GET per adapter file the repo has; nothing for absent candidates
    (the previous hand-written loop sent 14 requests for a 3-file adapter, 17 for 6 files)."""
    from m2ist import __version__

    model = saved_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "optimizer.pt").write_bytes(b"not pulled")
    push_folder_to_hub(tmp_path / "adapter", "org/pulled", endpoint=hub.url, allow_patterns=None, ignore_patterns=None)
    agents: list[str] = []
    answer = hub.handle

    def spy(method: str, path: str, headers: dict[str, str], body: bytes):
        agents.append({key.lower(): value for key, value in headers.items()}.get("user-agent", ""))
        return answer(method, path, headers, body)

    hub.handle = spy
    hub.request_log.clear()
    load("org/pulled", model, endpoint=hub.url, cache_dir=tmp_path / "cache")

    pulled = ["m2ist_config.json", "m2ist_model.safetensors"]  # README.md and optimizer.pt are not needed
    assert len(hub.request_log) == 2 + 2 * len(pulled), hub.request_log
    assert not any(path.endswith(("optimizer.pt", "README.md")) for _, path in hub.request_log)
    assert agents and all(f"m2ist/{__version__}" in agent for agent in agents)


def test_save_pretrained_takes_accelerates_arguments(tmp_path: Path) -> None:
    """accelerate's end-of-training line: only the main process writes; weights stay safetensors (save_function
    unused, as PEFT with safe_serialization=True); a pickle format is refused."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.save_pretrained(tmp_path / "rank1", is_main_process=False, save_function=torch.save)
    assert not (tmp_path / "rank1").exists()
    model.save_pretrained(tmp_path / "rank0", is_main_process=True, save_function=torch.save, safe_serialization=True)
    assert (tmp_path / "rank0" / "m2ist_model.safetensors").is_file()
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert not (tmp_path / "pickled").exists()
