"""Activation (gradient) checkpointing of the side network and the head, and torch.compile without graph breaks."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from m2ist.trainer import RECTrainingArguments, train_rec
from tests.conftest import make_batch
from tests.ddp_worker import make_dataset, make_model, make_processor

pytestmark = pytest.mark.usefixtures("one_thread")


def _loss_and_gradients(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same dropout masks in both runs
    model.train()
    loss = model(**batch).loss
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.item(), gradients


def _forward_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # a recompute may stop early
    return calls


@pytest.mark.parametrize(("readout", "reentrant"), [("reg", False), ("vote", False), ("vote", True)])
def test_checkpointing_gives_the_same_loss_and_gradients_and_recomputes(readout, reentrant):
    """Also with use_reentrant=True, whose gradients flow only through inputs that require grad (the first side
    block's come from the frozen towers): every side and head parameter gets the same gradient."""
    model = make_model(fusion_layers=2, side_dropout=0.1, fusion_dropout=0.1, box_readout=readout)
    batch = make_batch(4)
    reference_loss, reference = _loss_and_gradients(model, batch)
    fusion_calls, side_calls = _forward_calls(model.head.layers[0]), _forward_calls(model.side.blocks[0])

    model.gradient_checkpointing_enable({"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing and model.is_activation_checkpointing
    loss, gradients = _loss_and_gradients(model, batch)
    assert fusion_calls[0] == 2 and side_calls[0] == 2  # run again in the backward pass: activations not kept
    assert loss == pytest.approx(reference_loss, abs=1e-6)
    assert gradients.keys() == reference.keys() and len(gradients) > 0
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference[name], atol=1e-6, rtol=1e-5, msg=name)

    # the frozen towers are not touched: they run under no_grad and keep nothing for the backward pass
    assert not model.vision_model.is_activation_checkpointing and not model.text_model.is_activation_checkpointing

    with torch.no_grad():  # no recomputation when nothing is trained, nor in eval mode
        model(**batch)
    assert fusion_calls[0] == 3
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    _loss_and_gradients(model, batch)
    assert fusion_calls[0] == 4


def test_every_n_layers_checkpoints_only_those_layers():
    model = make_model(fusion_layers=2)
    first, second = _forward_calls(model.head.layers[0]), _forward_calls(model.head.layers[1])
    model.activation_checkpointing_enable(every_n_layers=2)
    _loss_and_gradients(model, make_batch(2))
    assert (first[0], second[0]) == (2, 1)
    with pytest.raises(ValueError, match="every_n_layers"):
        model.activation_checkpointing_enable(every_n_layers=0)


@pytest.mark.parametrize("flag", ["gradient_checkpointing", "activation_checkpointing"])
def test_trainer_argument_turns_it_on(tmp_path, flag):
    model = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renamed gradient_ to activation_checkpointing
        args = RECTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, max_steps=2, report_to="none",
                                    disable_tqdm=True, save_strategy="no", per_device_train_batch_size=2,
                                    **{flag: True})
    trainer = train_rec(model, make_processor(Path(tmp_path) / "tokenizer"), make_dataset(4, seed=0), args=args)
    assert model.is_gradient_checkpointing and trainer.state.global_step == 2


@pytest.mark.parametrize("readout", ["reg", "vote"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_side_network_and_head_compile_without_graph_breaks(readout, checkpointing):
    model = make_model(box_readout=readout, fusion_layers=1)
    if checkpointing:
        model.gradient_checkpointing_enable()
    batch = make_batch(2)
    with torch.no_grad():
        vision = model.vision_tower.tap({"pixel_values": batch["pixel_values"], "pixel_mask": batch["pixel_mask"]},
                                        model.vision_layers, model.tap_kinds)
        text = model.text_tower.tap({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                    model.text_layers, model.tap_kinds)

    def side_and_head(vision, text):
        vision_tokens, text_tokens = model.side(vision, text, model.intra_kind, model.inter_kind)
        return model.head(vision_tokens, vision.mask, text_tokens, text.mask).pred_boxes

    model.train()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(side_and_head)(vision, text)
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("method", ["full", "lora"])
def test_baselines_checkpoint_the_towers_they_train_too(method):
    from m2ist.evidence.baselines import build_model
    from tests.tiny import text_tower, tiny_config, vision_tower

    torch.manual_seed(0)
    model = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(), method=method)
    batch = make_batch(2)
    reference_loss, reference = _loss_and_gradients(model, batch)
    model.gradient_checkpointing_enable()
    assert model.vision_model.is_activation_checkpointing and model.text_model.is_activation_checkpointing
    loss, gradients = _loss_and_gradients(model, batch)
    assert loss == pytest.approx(reference_loss, abs=1e-6) and gradients.keys() == reference.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, reference[name], atol=1e-6, rtol=1e-5, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.vision_model.is_activation_checkpointing


@pytest.mark.slow  # ~80 s with a cold inductor cache on 2 CPU cores, ~5 s warm
def test_trainer_compiles_the_model_and_trains_on_the_tower_cache(tmp_path):
    """``torch_compile=True`` with ``tower_cache="memory"``: the Trainer compiles the model, whose forward then gets
    ``labels`` and ``tower_features`` (a dataclass of tensors) instead of the raw inputs; two steps, finite losses."""
    model = make_model()
    side_before = {k: v.clone() for k, v in model.side.state_dict().items()}
    args = RECTrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, max_steps=2, report_to="none",
                                disable_tqdm=True, save_strategy="no", per_device_train_batch_size=2, logging_steps=1,
                                torch_compile=True, tower_cache="memory")
    torch._dynamo.reset()
    trainer = train_rec(model, make_processor(Path(tmp_path) / "tokenizer"), make_dataset(2, seed=0), args=args)
    assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # really compiled
    assert trainer.tower_cache.stats["vision_hits"] == 2  # the second step (second epoch) read the cache
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.global_step == 2 and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(v, side_before[k]) for k, v in model.side.state_dict().items())
