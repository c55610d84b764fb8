"""RECTrainer / train_rec: training, side+head-only checkpoints, exact resume, best-model selection, the four methods,
learning-rate groups and schedule, REC metrics, and 2-process DDP on CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerCallback

from m2ist import SideTunedModel
from m2ist.data.collator import RECCollator
from m2ist.data.dataset import RECDataset
from m2ist.data.transforms import RECAugmentation
from m2ist.evidence.baselines import METHODS, build_model
from m2ist.ops.boxes import box_convert, paired_box_iou
from m2ist.save_and_load import WEIGHTS_NAME
from m2ist.trainer import (
    RECTrainer,
    RECTrainingArguments,
    StepDropSchedule,
    compute_rec_metrics,
    image_regions,
    load_trainable_tensors,
    train_rec,
    trainable_tensors,
)
from tests.ddp_worker import DDP_SETTINGS, make_dataset, make_model, make_processor
from tests.tiny import text_tower, tiny_config, vision_tower

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def processor(tmp_path):
    return make_processor(tmp_path / "tokenizer")


def _args(output_dir, **overrides) -> RECTrainingArguments:
    values = dict(output_dir=str(output_dir), use_cpu=True, dataloader_num_workers=0, report_to="none",
                  disable_tqdm=True, seed=0, data_seed=0, per_device_train_batch_size=4,
                  per_device_eval_batch_size=8, learning_rate=1e-3, side_learning_rate=1e-3,
                  save_strategy="no", logging_steps=1)
    values.update(overrides)
    return RECTrainingArguments(**values)


def _dataset_loss(model, processor, dataset) -> float:
    batch = RECCollator(processor)([dataset[i] for i in range(len(dataset))])
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


class _ModeRecorder(TrainerCallback):
    """Records the train/eval mode of the towers and the head at every step."""

    def __init__(self, model):
        self.model, self.modes = model, set()

    def on_step_end(self, args, state, control, **kwargs):
        self.modes.add((self.model.vision_model.training, self.model.text_model.training, self.model.head.training))


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_run_learns_and_checkpoints_hold_only_side_and_head(tmp_path, processor):
    train_set, held_out = make_dataset(48, seed=1), make_dataset(16, seed=2)
    model = make_model()
    frozen_before = {k: v.clone() for k, v in model.vision_model.state_dict().items()}
    loss_before = _dataset_loss(model, processor, train_set)
    recorder = _ModeRecorder(model)
    args = _args(tmp_path / "run", max_steps=150, per_device_train_batch_size=8, save_strategy="steps", save_steps=75,
                 eval_strategy="steps", eval_steps=150, logging_steps=10)
    trainer = train_rec(model, processor, train_set, {"val": held_out}, args, callbacks=[recorder])
    loss_after = _dataset_loss(model, processor, train_set)
    print(f"training-set loss before {loss_before:.3f}, after {loss_after:.3f}")
    assert loss_after < 0.75 * loss_before
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1] < logged[0]

    # towers stayed frozen and in eval mode while the head trained
    assert recorder.modes == {(False, False, True)}
    for key, value in model.vision_model.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key

    # evaluation reports the REC metrics per evaluation set
    metrics = next(e for e in trainer.state.log_history if "eval_val_acc@0.5" in e)
    assert {"eval_val_acc@0.5", "eval_val_miou", "eval_val_loss", "eval_val_loss_box", "eval_val_loss_giou"} <= set(metrics)

    # every checkpoint holds side + head tensors only, plus optimizer / scheduler / RNG / trainer state
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-150", "checkpoint-75"]
    for checkpoint in checkpoints:
        names = {p.name for p in checkpoint.iterdir()}
        assert {WEIGHTS_NAME, "m2ist_config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json", "m2ist_processor.json"} <= names
        assert not names & {"model.safetensors", "pytorch_model.bin", "adapter_model.safetensors"}
        with safe_open(checkpoint / WEIGHTS_NAME, "pt") as f:
            keys = set(f.keys())
        assert keys == set(model.trainable_state_dict())
        assert all(k.startswith(("side.", "head.")) for k in keys)

    # the saved adapter reloads onto the same towers and predicts the same boxes
    trainer.save_model(str(tmp_path / "final"))
    again = SideTunedModel.from_pretrained(tmp_path / "final", vision_model=model.vision_model,
                                           text_model=model.text_model).eval()
    batch = RECCollator(processor)([held_out[i] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).pred_boxes, model.eval()(**batch).pred_boxes, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- resume
class _Crash(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 12:
            raise KeyboardInterrupt("simulated kill after checkpoint-10")


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path, processor):
    train_set = make_dataset(16, seed=1)  # 4 steps per epoch: the kill and the resume fall mid-epoch
    settings = dict(max_steps=20, save_strategy="steps", save_steps=5, lr_drop_epochs=[3])

    straight = make_model(side_dropout=0.1)  # fusion_dropout 0.1 too: dropout RNG must be restored
    train_rec(straight, processor, train_set, args=_args(tmp_path / "straight", **settings))

    with pytest.raises(KeyboardInterrupt):
        train_rec(make_model(side_dropout=0.1), processor, train_set, args=_args(tmp_path / "killed", **settings),
                  callbacks=[_Crash()])
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]

    resumed = make_model(side_dropout=0.1)  # the same towers; side and head must all come from the checkpoint
    with torch.no_grad():
        for tensor in resumed.trainable_state_dict().values():
            tensor.add_(1.0)
    trainer = train_rec(resumed, processor, train_set, args=_args(tmp_path / "killed", **settings),
                        resume_from_checkpoint=True)
    assert trainer.state.global_step == 20
    expected = straight.trainable_state_dict()
    for key, value in resumed.trainable_state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    # the learning rate dropped at epoch 3 (step 12) in the resumed part too
    lrs = {e["step"]: e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e}
    assert lrs[11] == pytest.approx(1e-3) and lrs[13] == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------------------- best model
class _Scripted(TrainerCallback):
    """At step 20 set the box head to predict ``oracle`` exactly (val acc 1.0); at step 40 point it at a corner
    (acc 0). Evaluation and saving follow ``on_step_end`` within the same step."""

    def __init__(self, model, oracle):
        self.model, self.oracle = model, oracle

    def on_step_end(self, args, state, control, **kwargs):
        last = self.model.head.box_mlp[-1]
        with torch.no_grad():
            if state.global_step == 20:
                last.weight.zero_()
                last.bias.copy_(torch.logit(self.oracle))
            elif state.global_step == 40:
                last.weight.zero_()
                last.bias.fill_(-8.0)


def test_load_best_model_at_end_picks_the_best_checkpoint_by_accuracy(tmp_path, processor):
    # every "val" item has the same target box, so a constant prediction can be exactly right
    samples = make_dataset(8, seed=3).samples
    same_box = RECDataset([replace(sample, box=samples[0].box) for sample in samples])
    oracle = RECCollator(processor)([same_box[0]])["labels"][0]
    model = make_model()
    args = _args(tmp_path / "run", max_steps=40, eval_strategy="steps", eval_steps=10, save_strategy="steps",
                 save_steps=10, load_best_model_at_end=True, learning_rate=1e-4, side_learning_rate=1e-5)
    trainer = train_rec(model, processor, make_dataset(16, seed=1), {"val": same_box, "testA": make_dataset(8, seed=4)},
                        args, callbacks=[_Scripted(model, oracle)])

    history = {e["step"]: e["eval_val_acc@0.5"] for e in trainer.state.log_history if "eval_val_acc@0.5" in e}
    assert any("eval_testA_acc@0.5" in e and "eval_testA_miou" in e for e in trainer.state.log_history)
    assert history[20] == 1.0 and history[40] == 0.0
    best_step = max(history, key=lambda step: (history[step], -step))
    assert best_step == 20
    assert trainer.args.metric_for_best_model == "val_acc@0.5"  # a bare "acc@0.5" refers to the first set
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-20"
    best = load_file(tmp_path / "run" / "checkpoint-20" / WEIGHTS_NAME)
    last = load_file(tmp_path / "run" / "checkpoint-40" / WEIGHTS_NAME)
    current = model.trainable_state_dict()
    assert all(torch.equal(current[k], best[k]) for k in best)
    last_layer = f"head.box_mlp.{len(model.head.box_mlp) - 1}.bias"
    assert not torch.equal(current[last_layer], last[last_layer])
    assert trainer.evaluate()["eval_val_acc@0.5"] == 1.0


# ---------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_one_argument(tmp_path, processor, method):
    torch.manual_seed(0)
    model = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(), method=method)
    before = {k: v.detach().clone() for k, v in trainable_tensors(model).items()}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = _args(tmp_path / method, method=method, max_steps=3, save_strategy="steps", save_steps=3)
    trainer = train_rec(model, processor, make_dataset(12, seed=1), args=args)

    assert trainer.method == method
    after = trainable_tensors(model)
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any(k.startswith("head.") for k in changed)
    expected_prefix = {"m2ist": "side.", "full": "vision_model.", "adapter": "tower_adapters.", "lora": "vision_model."}
    assert any(k.startswith(expected_prefix[method]) for k in changed), sorted(changed)[:5]
    if method == "lora":
        assert all("lora_" in k for k in changed if not k.startswith("head."))
    for name, value in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[name], value), name
    # tower parameters (baselines) train at side_learning_rate, with the side adapters; only head.* at learning_rate
    names = {id(p): n for n, p in model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        assert all(names[id(p)].startswith("head.") == group["name"].startswith("head") for p in group["params"])

    # the checkpoint holds exactly the trained tensors and loads strictly into a fresh model of the same method
    with safe_open(tmp_path / method / "checkpoint-3" / WEIGHTS_NAME, "pt") as f:
        assert set(f.keys()) == set(after)
    torch.manual_seed(0)
    fresh = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(), method=method)
    load_trainable_tensors(fresh, tmp_path / method / "checkpoint-3")
    fresh_tensors = trainable_tensors(fresh)
    assert all(torch.equal(fresh_tensors[k], after[k]) for k in after)


def test_method_must_match_the_model(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="method='full'"):
        RECTrainer(model, _args(tmp_path, method="full"))
    with pytest.raises(ValueError, match="method must be one of"):
        _args(tmp_path, method="prefix")


def test_checkpoint_of_another_method_is_refused(tmp_path):
    torch.manual_seed(0)
    adapter = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(), method="adapter")
    RECTrainer(adapter, _args(tmp_path))._save(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="missing tensors"):
        load_trainable_tensors(make_model(), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"holds no m2ist_model\.safetensors"):
        load_trainable_tensors(make_model(), tmp_path)


# ---------------------------------------------------------------------------------------------- optimizer, schedule
def test_parameter_groups_learning_rates_and_weight_decay(tmp_path):
    model = make_model()
    trainer = RECTrainer(model, _args(tmp_path, learning_rate=1e-4, side_learning_rate=1e-5, weight_decay=1e-4))
    optimizer = trainer.create_optimizer()
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"head", "head_no_decay", "side", "side_no_decay"}
    assert groups["head"]["lr"] == groups["head_no_decay"]["lr"] == 1e-4
    assert groups["side"]["lr"] == groups["side_no_decay"]["lr"] == 1e-5
    assert groups["head"]["weight_decay"] == groups["side"]["weight_decay"] == 1e-4
    assert groups["head_no_decay"]["weight_decay"] == groups["side_no_decay"]["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in ("head_no_decay", "side_no_decay") for p in groups[g]["params"]}
    decay = {names[id(p)] for g in ("head", "side") for p in groups[g]["params"]}
    assert {"head.reg_token.weight", "head.position.weight", "head.vision_proj.bias"} <= no_decay
    assert any(n.startswith("head.layers.0.norm1") for n in no_decay)
    assert "head.vision_proj.weight" in decay and all(n.endswith("weight") for n in decay)
    every = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == every and not decay & no_decay


def test_full_fine_tuning_decays_layer_weights_only(tmp_path):
    """Full fine-tuning decays the towers' layer weights, never the tokens and tables a tower holds as bare
    parameters (ViT's [CLS] token and position table), its norms or embedding tables: decaying them pulls the
    position table to zero and handicaps the baseline m2ist is compared with."""
    model = build_model(vision_tower("vit"), text_tower("bert"), tiny_config(), method="full")
    decayed = set(RECTrainer(model, _args(tmp_path)).get_decay_parameter_names(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    vision = {n for n in trainable if n.startswith("vision_model.embeddings.") and n.count(".") == 2}
    assert len(vision) == 2 and not vision & decayed
    assert not {n for n in trainable if "_embeddings.weight" in n or "LayerNorm" in n or "layernorm" in n} & decayed
    assert any(n.endswith("patch_embeddings.projection.weight") for n in decayed)  # a convolution's weight
    assert any("attention" in n and n.endswith("query.weight") for n in decayed)
    assert "head.layers.0.attention.in_proj_weight" in decayed  # nn.MultiheadAttention's bare projection matrix
    assert all(n in trainable for n in decayed)

def test_default_optimizer_is_fused_adamw(tmp_path):
    """transformers 5's default optim, adamw_torch_fused, reaches the optimizer through our parameter groups (torch
    runs fused AdamW on CPUs too)."""
    args = RECTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    optimizer = RECTrainer(make_model(), args).create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults.get("fused") is True
    assert all(group.get("fused", optimizer.defaults["fused"]) for group in optimizer.param_groups)


def test_step_schedule_drops_every_group_at_the_given_epochs(tmp_path, processor):
    lrs = []

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            lrs.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    args = _args(tmp_path, max_steps=7, lr_drop_epochs=[2, 3], learning_rate=1e-3, side_learning_rate=1e-4)
    train_rec(make_model(), processor, make_dataset(8, seed=1), args=args, callbacks=[Record()])  # 2 steps/epoch
    head = [round(step["head"], 12) for step in lrs]
    side = [round(step["side"], 12) for step in lrs]
    assert head == [1e-3] * 4 + [1e-4] * 2 + [1e-5]
    assert side == [1e-4] * 4 + [1e-5] * 2 + [1e-6]
    schedule = StepDropSchedule([4], factor=0.5, warmup_steps=2)
    assert [schedule(s) for s in range(6)] == [0.0, 0.5, 1.0, 1.0, 0.5, 0.5]


def test_bad_arguments_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot be combined"):
        _args(tmp_path, lr_drop_epochs=[3], lr_scheduler_type="cosine")
    with pytest.raises(ValueError, match="positive whole epochs"):
        _args(tmp_path, lr_drop_epochs=[0])
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        RECTrainer(make_model(), _args(tmp_path, remove_unused_columns=True))
    with pytest.raises(TypeError, match="RECTrainingArguments"):
        from transformers import TrainingArguments

        RECTrainer(make_model(), TrainingArguments(output_dir=str(tmp_path), use_cpu=True))


def test_recipe_defaults():
    args = RECTrainingArguments(output_dir="unused", use_cpu=True, load_best_model_at_end=True,
                                eval_strategy="epoch", save_strategy="epoch")
    assert (args.learning_rate, args.side_learning_rate, args.weight_decay, args.lr_drop_factor) == (1e-4, 1e-5, 1e-4, 0.1)
    assert args.max_grad_norm == 0.0 and args.lr_scheduler_type == "constant"
    assert args.metric_for_best_model == "acc@0.5" and args.greater_is_better is True
    assert args.remove_unused_columns is False and args.report_to == [] and args.lr_drop_epochs == []


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluation_uses_the_collator_without_augmentation(tmp_path):
    augmenting = make_processor(tmp_path / "tokenizer")
    augmenting.augment = RECAugmentation(seed=0)
    val = make_dataset(8, seed=2)
    trainer = train_rec(make_model(), augmenting, make_dataset(8, seed=1), {"val": val}, _args(tmp_path, max_steps=1))
    assert trainer.data_collator.train and not trainer.eval_data_collator.train
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_val_loss"] == second["eval_val_loss"] and first["eval_val_miou"] == second["eval_val_miou"]
    items = [val[i] for i in range(8)]
    eval_batch = next(iter(trainer.get_eval_dataloader("val")))
    assert torch.equal(eval_batch["pixel_values"], RECCollator(augmenting)(items)["pixel_values"])  # test-time
    augmented = [trainer.data_collator(items)["pixel_values"] for _ in range(2)]
    assert not torch.equal(augmented[0], augmented[1])
    predictions = trainer.predict(val)
    boxes, regions = predictions.predictions
    assert boxes.shape == (8, 4) and regions.shape == (8, 4)
    assert predictions.metrics["test_acc@0.5"] == first["eval_val_acc@0.5"]


def test_metrics_on_known_boxes():
    labels = torch.tensor([[0.5, 0.5, 0.4, 0.4], [0.25, 0.5, 0.5, 0.5]])
    perfect = compute_rec_metrics(labels, labels)
    assert perfect["acc@0.5"] == 1.0 and perfect["miou"] == pytest.approx(1.0)
    assert perfect["loss_box"] == pytest.approx(0.0) and perfect["loss_giou"] == pytest.approx(0.0)
    # box 0 shifted by half its width: IoU 1/3 (miss); box 1 exact (hit)
    shifted = labels.clone()
    shifted[0, 0] += 0.2
    metrics = compute_rec_metrics(shifted, labels)
    assert metrics["acc@0.5"] == 0.5 and metrics["miou"] == pytest.approx((1 / 3 + 1) / 2)
    # a prediction reaching into the padding is clamped to the image (rows 0.25..0.75 of the canvas)
    gt = box_convert(torch.tensor([[0.0, 0.25, 0.5, 0.75]]), "xyxy", "cxcywh")
    tall = box_convert(torch.tensor([[0.0, 0.0, 0.5, 1.0]]), "xyxy", "cxcywh")
    region = torch.tensor([[0.0, 0.25, 1.0, 0.75]])
    assert compute_rec_metrics(tall, gt)["miou"] == pytest.approx(0.5)
    assert compute_rec_metrics(tall, gt, region)["miou"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        compute_rec_metrics(torch.zeros(2, 3), torch.zeros(2, 3))


def test_letterboxed_iou_equals_iou_in_original_pixels(processor):
    dataset = make_dataset(6, seed=5, width=40, height=24)
    batch = processor([dataset[i]["image"] for i in range(6)], [dataset[i]["expression"] for i in range(6)],
                      boxes=[dataset[i]["box"] for i in range(6)])
    g = torch.Generator().manual_seed(0)
    pred = torch.cat([torch.rand(6, 2, generator=g), torch.rand(6, 2, generator=g) * 0.8 + 0.1], -1)
    regions = image_regions(batch["pixel_mask"], 6)
    torch.testing.assert_close(regions[:, [0, 2]], torch.tensor([[0.0, 1.0]] * 6))
    original_pred = processor.post_process_boxes(pred, batch["image_geometry"])
    original_gt = torch.tensor([dataset[i]["box"] for i in range(6)], dtype=torch.float32)
    iou_original = paired_box_iou(original_pred, original_gt)
    metrics = compute_rec_metrics(pred, batch["labels"], regions)
    assert metrics["miou"] == pytest.approx(float(iou_original.mean()), abs=1e-5)
    assert image_regions(None, 2).tolist() == [[0.0, 0.0, 1.0, 1.0]] * 2


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, processor):
    steps = 4
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "ddp_worker.py"), str(tmp_path / "ddp"), str(steps)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0 = load_file(tmp_path / "ddp" / "rank0.safetensors")
    rank1 = load_file(tmp_path / "ddp" / "rank1.safetensors")
    assert set(rank0) == set(rank1) and all(torch.equal(rank0[k], rank1[k]) for k in rank0)

    single = make_model(fusion_dropout=0.0)
    initial = {k: v.clone() for k, v in single.trainable_state_dict().items()}
    args = _args(tmp_path / "single", max_steps=steps, per_device_train_batch_size=4, **DDP_SETTINGS)
    train_rec(single, processor, make_dataset(16, seed=1), args=args)
    reference = single.trainable_state_dict()
    moved = {k: float((reference[k] - initial[k]).abs().max()) for k in reference}
    print("largest change per part:", {part: max(v for k, v in moved.items() if k.startswith(part)) for part in ("side", "head")})
    assert max(moved.values()) > 1e-2 and any(v > 1e-4 for k, v in moved.items() if k.startswith("side."))
    for key, value in rank0.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=1e-6, msg=key)


class _DenormalRecorder(TrainerCallback):
    """Records whether a denormal float survives (False: flushed to zero) at every step."""

    def __init__(self):
        self.survives = set()

    def on_step_end(self, args, state, control, **kwargs):
        self.survives.add(bool(torch.tensor([1e-40], dtype=torch.float32).item() != 0))


@pytest.mark.parametrize("flush", [True, False])
def test_cpu_training_flushes_denormals_only_while_it_runs(tmp_path, processor, flush):
    recorder = _DenormalRecorder()
    model = make_model()
    trainer = train_rec(model, processor, make_dataset(4, seed=0), args=_args(tmp_path, max_steps=2, flush_denormal=flush),
                        callbacks=[recorder])
    assert trainer.state.global_step == 2
    assert recorder.survives == {not flush}  # flushed during every step when asked, untouched otherwise
    assert torch.tensor([1e-40], dtype=torch.float32).item() != 0  # the process-wide setting is restored
