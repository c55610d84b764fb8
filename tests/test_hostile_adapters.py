"""Several adapters meet the trainer, saving, the card and the Hub: what a user relies on stays true."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from m2ist import SideTunedModel
from m2ist.card import EVAL_RESULTS_NAME
from m2ist.hub import push_folder_to_hub
from m2ist.save_and_load import WEIGHTS_NAME, read_safetensors, recorded_sha256
from m2ist.trainer import RECTrainer, checkpoint_problems, train_rec
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import cpu_training_args, tiny_config

hub = hub_fixture(name="hub", max_lifetime_s=120)
FAST = dict(learning_rate=5e-2, side_learning_rate=5e-2, optim="sgd", logging_steps=100)


def _with_active(name: str = "b", **config) -> SideTunedModel:
    model = make_model()
    model.add_adapter(name, tiny_config(**config))
    model.set_adapter(name)
    return model


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- 1. trainer
def test_best_model_and_resume_restore_the_active_adapter(tmp_path: Path) -> None:
    processor, train = make_processor(tmp_path / "tok"), make_dataset(16, 1)
    model = _with_active("b", bottleneck=16)  # another shape than "default": the root file cannot fit it
    default_before = _state(model.inactive_adapters["default"])
    args = cpu_training_args(tmp_path / "best", max_steps=4, save_strategy="steps", save_steps=2,
                             eval_strategy="steps", eval_steps=2, load_best_model_at_end=True, **FAST)
    trainer = train_rec(model, processor, train, make_dataset(8, 2), args)
    best = Path(trainer.state.best_model_checkpoint)
    assert model.active_adapter == "b"
    assert _equal(model.trainable_state_dict(), read_safetensors(best / "b" / WEIGHTS_NAME))
    assert _equal(_state(model.inactive_adapters["default"]), default_before)

    kw = dict(save_strategy="steps", save_steps=2, **FAST)
    full = train_rec(_with_active(), processor, train, None, cpu_training_args(tmp_path / "full", max_steps=4, **kw))
    train_rec(_with_active(), processor, train, None, cpu_training_args(tmp_path / "part", max_steps=2, **kw))
    resumed = train_rec(_with_active(), processor, train, None, cpu_training_args(tmp_path / "part", max_steps=4, **kw),
                        resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    assert _equal(resumed.model.trainable_state_dict(), full.model.trainable_state_dict())


def test_a_checkpoint_is_complete_when_it_holds_the_trained_adapter(tmp_path: Path) -> None:
    model = make_model()
    model.add_adapter("b", tiny_config())
    with pytest.warns(UserWarning, match="was active and is deleted"):
        model.delete_adapter("default")
    processor = make_processor(tmp_path / "tok")
    args = cpu_training_args(tmp_path / "o", max_steps=2, save_strategy="steps", save_steps=1, **FAST)
    train_rec(model, processor, make_dataset(8, 1), None, args)
    checkpoint = tmp_path / "o" / "checkpoint-2"
    assert checkpoint_problems(checkpoint, adapter="b") == ""
    assert "trained the adapter 'b'" in checkpoint_problems(checkpoint)  # resuming it into "default" is refused

    again = make_model()
    again.add_adapter("b", tiny_config())
    with pytest.warns(UserWarning, match="was active and is deleted"):
        again.delete_adapter("default")
    resumed = train_rec(again, processor, make_dataset(8, 1), None,
                        cpu_training_args(tmp_path / "o", max_steps=3, save_strategy="steps", save_steps=1, **FAST),
                        resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    with pytest.raises(ValueError, match="set_adapter\\('b'\\)"):
        train_rec(make_model(), processor, make_dataset(8, 1), None,
                  cpu_training_args(tmp_path / "o", max_steps=4, save_strategy="no", **FAST),
                  resume_from_checkpoint=True)


# ---------------------------------------------------------------------------------------------- 2. selected adapters
def test_saving_selected_adapters_keeps_the_rest_of_the_folder(tmp_path: Path) -> None:
    model = make_model()
    model.add_adapter("b", tiny_config())
    model.add_adapter("c", tiny_config())
    model.processor = make_processor(tmp_path / "tok")
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    root = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "README.md"}
    with torch.no_grad():
        for p in model.inactive_adapters["b"].parameters():
            p.add_(0.1)

    model.save_pretrained(folder, selected_adapters=["b"])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "README.md"} == root
    assert (folder / "c" / WEIGHTS_NAME).is_file() and (folder / "README.md").is_file()
    saved_b = read_safetensors(folder / "b" / WEIGHTS_NAME)
    assert _equal(saved_b, model.inactive_adapters["b"].state_dict())
    loaded = SideTunedModel.from_pretrained(folder, model.vision_model, model.text_model)
    assert _equal(loaded.trainable_state_dict(), model.trainable_state_dict()) and loaded.processor is not None
    model.save_pretrained(folder, selected_adapters=[])
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != "README.md"} == root

    with pytest.warns(UserWarning, match="was active and is deleted"):
        model.delete_adapter("default")  # no root adapter: the processor and a card (for "b") are still written
    model.save_pretrained(tmp_path / "no-default")
    written = {p.relative_to(tmp_path / "no-default").as_posix() for p in (tmp_path / "no-default").rglob("*")}
    assert {"README.md", "m2ist_processor.json", "b/m2ist_model.safetensors", "c/m2ist_model.safetensors"} <= written
    assert "subfolder='b'" in (tmp_path / "no-default" / "README.md").read_text()


# ---------------------------------------------------------------------------------------------- 3. train again
@pytest.mark.parametrize("tower_cache", ["off", "memory"])
def test_training_again_after_set_adapter_trains_the_new_adapter(tmp_path: Path, tower_cache: str) -> None:
    """Also with the tower cache on: it is opened again for the adapter now active (it caches what that adapter
    reads)."""
    model = make_model()
    model.add_adapter("b", tiny_config(vision_layers=[1], text_layers=[1]))  # taps other layers than "default"
    trainer = train_rec(model, make_processor(tmp_path / "tok"), make_dataset(8, 1), None,
                        cpu_training_args(tmp_path / "o", max_steps=2, tower_cache=tower_cache, **FAST))
    model.set_adapter("b")
    b_before, default_before = _state(model.side), _state(model.inactive_adapters["default"])
    trainer.train()
    assert not _equal(_state(model.side), b_before)
    assert _equal(_state(model.inactive_adapters["default"]), default_before)
    if tower_cache != "off":
        assert trainer.tower_cache.adapter == "b"
        return

    model.set_adapter("default")  # an optimizer passed in holds "b", which no longer trains: refused, not ignored
    stale = torch.optim.SGD(model.inactive_adapters["b"].parameters(), lr=0.1)
    given = RECTrainer(model, cpu_training_args(tmp_path / "p", max_steps=1, **FAST), optimizers=(stale, None),
                       data_collator=trainer.data_collator, train_dataset=make_dataset(8, 1))
    with pytest.raises(ValueError, match="holds none of the parameters that train now"):
        given.train()


# ---------------------------------------------------------------------------------------------- 4. stale Hub files
def test_a_push_removes_the_adapter_files_an_earlier_push_left(hub: LocalHub, tmp_path: Path) -> None:
    first = make_model(seed=0)
    first.processor = make_processor(tmp_path / "tok")
    first.processor.max_query_len = 5
    first.add_adapter("old", tiny_config())
    first.push_to_hub("me/rec", endpoint=hub.url)
    hub.add_commit("me/rec", {"notes.txt": b"mine", "last-checkpoint/m2ist_model.safetensors": b"ckpt",
                              "docs/m2ist_config.txt": b"x"})

    second = make_model(seed=1)
    with pytest.warns(UserWarning, match=r"This push deletes adapters of 'me/rec' .*'old' \(in old/\)"):
        second.push_to_hub("me/rec", endpoint=hub.url)
    files = set(hub.files("me/rec"))
    assert {"notes.txt", "last-checkpoint/m2ist_model.safetensors", "docs/m2ist_config.txt", "README.md"} <= files
    assert not {"old/m2ist_model.safetensors", "old/m2ist_config.json", "m2ist_processor.json",
                "tokenizer.json"} & files
    again = SideTunedModel.from_pretrained("me/rec", second.vision_model, second.text_model, endpoint=hub.url,
                                           cache_dir=tmp_path / "cache")
    assert again.processor is None and again.list_adapters() == ["default"]

    # a push limited to the card deletes nothing else
    card_only = tmp_path / "card"
    card_only.mkdir()
    (card_only / "README.md").write_text("# card\n")
    push_folder_to_hub(card_only, "me/rec", endpoint=hub.url, allow_patterns=["README.md"])
    assert {"m2ist_config.json", "m2ist_model.safetensors"} <= set(hub.files("me/rec"))


# ---------------------------------------------------------------------------------------------- 5. stale metrics
def _metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_the_card_reports_only_results_of_its_weights(hub: LocalHub, tmp_path: Path) -> None:
    measured = {"metrics": {"val": {"acc@0.5": 0.93, "miou": 0.81, "count": 100}},
                "metadata": {"source": "RECTrainer", "step": 999}}
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / EVAL_RESULTS_NAME).write_text(json.dumps(measured))  # an older trainer's: which weights? unknown
    model = make_model(seed=5)
    model.save_pretrained(folder)
    assert "93.00%" not in (folder / "README.md").read_text()
    measured["metadata"]["weights_sha256"] = recorded_sha256(folder / WEIGHTS_NAME)
    (folder / EVAL_RESULTS_NAME).write_text(json.dumps(measured))  # these weights' results
    model.save_pretrained(folder)
    assert "93.00%" in (folder / "README.md").read_text()
    make_model(seed=6).save_pretrained(folder)  # other weights: their results no longer apply
    card = (folder / "README.md").read_text()
    assert "93.00%" not in card and "model-index" not in _metadata(card)

    out, processor = tmp_path / "out", make_processor(tmp_path / "tok")
    trainer = train_rec(make_model(seed=6), processor, make_dataset(8, 1), make_dataset(4, 2),
                        cpu_training_args(out, max_steps=2, eval_strategy="steps", eval_steps=2, **FAST))
    trainer.save_model()
    trainer.create_model_card()
    recorded = json.loads((out / EVAL_RESULTS_NAME).read_text())["metadata"]["weights_sha256"]
    assert recorded == recorded_sha256(out / WEIGHTS_NAME) and "model-index" in _metadata((out / "README.md").read_text())
    trainer = train_rec(make_model(seed=7), processor, make_dataset(8, 1), None,
                        cpu_training_args(out, max_steps=1, **FAST))  # a new run, never evaluated
    trainer.save_model()
    trainer.create_model_card()
    assert not (out / EVAL_RESULTS_NAME).exists() and "model-index" not in _metadata((out / "README.md").read_text())

    (out / EVAL_RESULTS_NAME).write_text(json.dumps({**measured, "metadata": {
        **measured["metadata"], "weights_sha256": recorded_sha256(out / WEIGHTS_NAME)}}))
    trainer.create_model_card()
    push_folder_to_hub(out, "me/x", endpoint=hub.url)
    assert "model-index" in _metadata(hub.files("me/x")["README.md"].decode())
    make_model(seed=8).push_to_hub("me/x", endpoint=hub.url)  # never evaluated: the repo's metrics go
    card = hub.files("me/x")["README.md"].decode()
    assert "model-index" not in _metadata(card) and "0.93" not in card


# ---------------------------------------------------------------------------------------------- 6. card counts
def test_the_card_counts_the_root_adapter(tmp_path: Path) -> None:
    model = make_model()
    model.add_adapter("wide", tiny_config(bottleneck=32, fusion_dim=64))
    model.set_adapter("wide")
    model.save_pretrained(tmp_path / "a")
    shown = re.findall(r"side adapters \| ([\d,]+) parameters", (tmp_path / "a" / "README.md").read_text())
    assert shown == [f"{model.parameter_counts('default')['side']:,d}"]
    assert model.parameter_counts("default")["side"] != model.parameter_counts()["side"]


# ---------------------------------------------------------------------------------------------- 7. names
@pytest.mark.parametrize(("name", "why"), [("checkpoint-best", "reserved"), ("runs", "reserved"),
                                           ("last-checkpoint", "reserved"), ("tower_cache", "reserved"),
                                           ("refcoco.v2", "'.'"), ("m2ist_config.json", "'.'")])
def test_adapter_names_that_would_be_lost_are_refused(tmp_path: Path, name: str, why: str) -> None:
    model = make_model()
    with pytest.raises(ValueError, match=f"{re.escape(repr(name))} is not usable: .*{re.escape(why)}"):
        model.add_adapter(name, tiny_config())
    make_model(seed=1).save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="is not usable"):
        model.load_adapter(tmp_path / "saved", name)
    assert model.list_adapters() == ["default"]


# ---------------------------------------------------------------------------------------------- 8. train / eval mode
def test_set_adapter_gives_the_adapter_the_model_mode(tmp_path: Path) -> None:
    make_model(seed=1, side_dropout=0.3).save_pretrained(tmp_path / "saved")
    model = make_model(side_dropout=0.3).train()
    model.load_adapter(tmp_path / "saved", "b")  # loaded for inference: eval() while inactive
    model.set_adapter("b")
    assert model.side.training and model.head.training
    model.add_adapter("c", tiny_config())  # added to a train() model
    model.eval()
    model.set_adapter("c")
    assert not model.side.training and not model.head.training


def test_results_of_evaluate_are_tied_to_the_weights_they_measured(tmp_path):
    """m2ist.evaluation.evaluate records the SHA-256 of the weights it scored: saved beside those weights its
    results reach the card; beside retrained weights they do not."""
    from m2ist.evaluation import evaluate

    model, processor = make_model(seed=0), make_processor(tmp_path / "tok")
    model.save_pretrained(tmp_path / "adapter")
    evaluate(model, processor, {"val": make_dataset(2, seed=3)}, output_file=tmp_path / "adapter" / EVAL_RESULTS_NAME)
    model.save_pretrained(tmp_path / "adapter")  # the same weights: the card shows the results
    assert "Acc@0.5" in (tmp_path / "adapter" / "README.md").read_text()
    with torch.no_grad():
        next(model.head.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "adapter")  # other weights: the results measured the old ones
    assert "Acc@0.5" not in (tmp_path / "adapter" / "README.md").read_text()


def test_set_adapter_in_inference_mode_activates_the_adapter_frozen() -> None:
    """PEFT's ``set_adapter(name, inference_mode=True)``: the adapter runs, nothing requires grad; without it the
    active adapter trains (also when it is already the active one)."""
    model = make_model(seed=0)
    model.add_adapter("b", tiny_config())

    def grads(modules) -> set[bool]:
        return {p.requires_grad for p in modules.parameters()}

    model.set_adapter("b", inference_mode=True)
    assert model.active_adapter == "b" and grads(model.side) == grads(model.head) == {False}
    assert not any(p.requires_grad for p in model.parameters())
    model.set_adapter("b")  # already active: made trainable
    assert grads(model.side) == grads(model.head) == {True}
    model.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_dtype_auto_on_a_damaged_weights_file_is_one_clear_error(tmp_path: Path, damage: str) -> None:
    """``from_pretrained(dtype="auto")`` reads the saved dtype from the header before the file is verified: a
    damaged file is reported as such, in one line, not as a safetensors library error."""
    model = make_model(seed=0)
    model.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:5] if damage == "truncated" else b"\x10" + b"\x00" * 7 + b"{not json")
    with pytest.raises(ValueError, match=r"Cannot load .*m2ist_model\.safetensors: its safetensors header is damaged"):
        SideTunedModel.from_pretrained(tmp_path / "adapter", vision_model=model.vision_model,
                                       text_model=model.text_model, dtype="auto")


def test_load_adapter_subfolder_is_checked_and_named_as_from_pretrained_does(tmp_path: Path) -> None:
    model = make_model(seed=0)
    model.add_adapter("b", tiny_config())
    model.save_pretrained(tmp_path / "saved")
    fresh = make_model(seed=0)
    fresh.load_adapter(tmp_path / "saved", "b", subfolder="/b/")  # slashes around a name are tolerated
    with pytest.raises(ValueError, match=r"subfolder='\.\./saved' must be a relative path inside the folder"):
        fresh.load_adapter(tmp_path / "saved", "c", subfolder="../saved")
    with pytest.raises(FileNotFoundError, match="nope"):
        fresh.load_adapter(tmp_path / "saved", "c", subfolder="nope")
    assert fresh.list_adapters() == ["default", "b"]


def test_a_saved_config_missing_fields_says_which_defaults_it_takes(tmp_path: Path, caplog) -> None:
    """A config that ``save_pretrained`` wrote (it carries ``config_version``) but that lacks fields was edited by
    hand or written by an older m2ist: the defaults it takes are named, since some change the results."""
    import logging

    from m2ist import M2ISTConfig

    path = tiny_config(adapter_scale=0.5).save_pretrained(tmp_path)
    values = json.loads(path.read_text())
    del values["adapter_scale"], values["side_dropout"]
    path.write_text(json.dumps(values))
    with caplog.at_level(logging.WARNING, logger="m2ist.config"):
        assert M2ISTConfig.from_json_file(path).adapter_scale == M2ISTConfig().adapter_scale
    assert "lacks ['adapter_scale', 'side_dropout'], so the defaults are used" in caplog.text
    caplog.clear()
    del values["config_version"]  # a hand-written partial config is the user's own choice of defaults
    path.write_text(json.dumps(values))
    with caplog.at_level(logging.WARNING, logger="m2ist.config"):
        M2ISTConfig.from_json_file(path)
    assert "lacks" not in caplog.text
