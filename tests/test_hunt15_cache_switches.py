"""Hunt 15: the tower cache's fingerprint and its views, and switches given as text (silent faults first)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers as T

from m2ist import get_side_tuned_model
from m2ist.cache import KEY_FIELDS, CachedViewsCollator, TowerFeatureCache, cache_keys
from m2ist.data import RECCollator
from m2ist.data.transforms import RECAugmentation
from tests.conftest import make_batch
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.tiny import cpu_training_args, text_tower, tiny_config, vision_tower


def _keyed_batch(size: int = 2) -> dict:
    batch = make_batch(size)
    for modality, name in KEY_FIELDS.items():
        batch[name] = cache_keys(batch, modality)
    return batch


def _tokens(model, batch: dict) -> torch.Tensor:
    return model.tower_features(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"],
                                batch["attention_mask"]).vision.tokens


# ------------------------------------------------------------------ the tower's config in the fingerprint
@pytest.mark.usefixtures("one_thread")
def test_a_tower_with_the_same_weights_and_another_config_does_not_read_the_cache(tmp_path):
    """Two ViTs with the same weights and another layer_norm_eps compute other features, yet shared one cache folder
    (the fingerprint held the weights, not the config): the second run trained on the first tower's features without
    a word. The config's computing fields are in the fingerprint now; where the tower was loaded from is not, so the
    same tower saved to another folder still reads the records (no needless miss)."""
    torch.manual_seed(0)
    vision_tower("vit").save_pretrained(tmp_path / "vit")
    text_tower("bert").save_pretrained(tmp_path / "bert")
    T.ViTModel.from_pretrained(tmp_path / "vit").save_pretrained(tmp_path / "vit_copy")
    batch, cache_dir = _keyed_batch(), tmp_path / "cache"

    def model(folder: str, **overrides):
        torch.manual_seed(0)
        return get_side_tuned_model(T.ViTModel.from_pretrained(tmp_path / folder, **overrides),
                                    T.BertModel.from_pretrained(tmp_path / "bert"), tiny_config())

    first = model("vit")
    filled = TowerFeatureCache(first, cache_dir, dtype="float32")
    filled.features(batch)
    assert filled.stats["vision_misses"] == 2

    other = model("vit", layer_norm_eps=1e-2)
    assert other.vision_model.config.layer_norm_eps == 1e-2
    assert not torch.equal(_tokens(other, batch), _tokens(first, batch))  # the config changes the features
    cache = TowerFeatureCache(other, cache_dir, dtype="float32")
    read = cache.features(batch)
    assert cache.stats["vision_hits"] == 0 and cache.stats["vision_misses"] == 2  # not the first tower's records
    assert torch.equal(read.vision.tokens, _tokens(other, batch))
    assert cache.stats["text_hits"] == 2  # the same text tower: its records are shared

    copied = model("vit_copy")  # the same tower, loaded from another folder
    assert copied.tower_ids["vision"][0] != first.tower_ids["vision"][0]
    again = TowerFeatureCache(copied, cache_dir, dtype="float32")
    assert torch.equal(again.features(batch).vision.tokens, _tokens(first, batch))
    assert again.stats["vision_hits"] == 2 and again.stats["vision_misses"] == 0


# ------------------------------------------------------------------ views seeded by the image, not its id
@pytest.mark.usefixtures("one_thread")
def test_views_of_two_images_that_share_an_id_are_drawn_apart(tmp_path):
    """CachedViewsCollator seeded an image's views from its image_id: two images of merged datasets that share an id
    (ids are per dataset) got the same flips and placements. The views are seeded by the image's content now: the
    same image under two ids shares its views (and so its cache records), two images under one id do not."""
    processor = make_processor(tmp_path / "tok")
    processor.augment = RECAugmentation(seed=0, random_resize=False, random_crop=False, color_jitter=False)
    collate = CachedViewsCollator(RECCollator(processor, train=True), views=1)
    data = make_dataset(8, seed=0)
    originals = list(data.samples)
    assert len({sample.image_id for sample in originals}) == 8
    touched, renamed = [], []
    for sample in originals:
        image = sample.image.copy()
        image.putpixel((0, 0), (1, 2, 3))  # another image (one corner pixel), the same id, box and phrase
        touched.append(dataclasses.replace(sample, image=image))
        renamed.append(dataclasses.replace(sample, image_id=f"other-{sample.image_id}"))
    labels = [collate([sample])["labels"] for sample in originals]
    assert any(not torch.equal(collate([sample])["labels"], label) for sample, label in zip(touched, labels))
    assert all(torch.equal(collate([sample])["labels"], label) for sample, label in zip(renamed, labels))


# ------------------------------------------------------------------ switches given as text
def _trainer(tmp_path):
    from m2ist.trainer import RECTrainer

    return RECTrainer(make_model(), cpu_training_args(tmp_path / "run"), data_collator=RECCollator(
        make_processor(tmp_path / "tok")), train_dataset=make_dataset(2, seed=0))


def _calls(tmp_path):
    """(name, call with the switch given as ``value``) for every public switch of the cache, inference, evaluation,
    model, trainer, hub and evidence modules."""
    from m2ist.evaluation import evaluate
    from m2ist.evidence import ablation, bench, cache_step, compare, demo, demo_towers
    from m2ist.hub import push_folder_to_hub, resolve_pretrained
    from m2ist.inference import predict_boxes
    from m2ist.model import SideTunedModel
    from m2ist.trainer import RECTrainingArguments, checkpoint_problems

    model = make_model()
    data = make_dataset(2, seed=0)
    processor = make_processor(tmp_path / "tok")
    (tmp_path / "folder").mkdir(exist_ok=True)
    (tmp_path / "folder" / "m2ist_config.json").write_text("{}")
    return {
        "TowerFeatureCache(check_space)": lambda v: TowerFeatureCache(model, tmp_path / "c", check_space=v),
        "predict_boxes(progress)": lambda v: predict_boxes(model, data.samples[0].image, "a", processor, progress=v),
        "evaluate(progress)": lambda v: evaluate(model, processor, data, progress=v),
        "evaluate(save_predictions)": lambda v: evaluate(model, processor, data, save_predictions=v),
        "load_state_dict(assign)": lambda v: model.load_state_dict(model.trainable_state_dict(), strict=False, assign=v),
        "load_state_dict(strict)": lambda v: model.load_state_dict(model.trainable_state_dict(), strict=v),
        "activation_checkpointing_enable(offload)": lambda v: model.activation_checkpointing_enable(offload=v),
        "set_adapter(inference_mode)": lambda v: model.set_adapter("default", inference_mode=v),
        "save_pretrained(safe_serialization)": lambda v: model.save_pretrained(tmp_path / "s", safe_serialization=v),
        "write_adapter_files(model_card)": lambda v: model.write_adapter_files(tmp_path / "w", model_card=v),
        "push_to_hub(create_pr)": lambda v: model.push_to_hub("u/r", create_pr=v),
        "from_pretrained(trust_remote_code)": lambda v: SideTunedModel.from_pretrained(tmp_path / "folder",
                                                                                      trust_remote_code=v),
        "push_folder_to_hub(private)": lambda v: push_folder_to_hub(tmp_path / "folder", "u/r", private=v),
        "resolve_pretrained(local_files_only)": lambda v: resolve_pretrained(
            "u/r", filenames=["m2ist_config.json"], local_files_only=v),
        "RECTrainingArguments(bf16)": lambda v: cpu_training_args(tmp_path / "a", bf16=v),
        "RECTrainingArguments(use_cpu)": lambda v: RECTrainingArguments(output_dir=str(tmp_path / "a"), use_cpu=v),
        "RECTrainingArguments(resume_allow_changes)": lambda v: cpu_training_args(tmp_path / "a", resume_allow_changes=v),
        "RECTrainingArguments(load_best_model_at_end)": lambda v: cpu_training_args(tmp_path / "a",
                                                                                   load_best_model_at_end=v),
        "RECTrainingArguments(disable_tqdm)": lambda v: cpu_training_args(tmp_path / "a", disable_tqdm=v),
        "RECTrainer measured_results(best)": lambda v: _trainer(tmp_path).measured_results(best=v),
        "RECTrainer push_to_hub(private)": lambda v: _trainer(tmp_path).push_to_hub(private=v),
        "checkpoint_problems(needs_optimizer)": lambda v: checkpoint_problems(tmp_path, needs_optimizer=v),
        "demo.run(tiny)": lambda v: demo.run(tmp_path / "demo", tiny=v),
        "demo.prepare(tiny)": lambda v: demo.prepare(tiny=v, cache_dir=tmp_path / "towers"),
        "compare.run_method(tiny)": lambda v: compare.run_method("m2ist", steps=1, batch_size=2, seed=0, tiny=v,
                                                                 cache_dir=None, output_dir=tmp_path / "cmp"),
        "ablation.run(tiny)": lambda v: ablation.run(steps=1, batch_size=2, tiny=v),
        "bench.measure(tiny)": lambda v: bench.measure("m2ist", 2, 1, 0, "cpu", v, None),
        "cache_step.measure(tiny)": lambda v: cache_step.measure(2, 2, tiny=v),
        "load_vision_tower(force)": lambda v: demo_towers.load_vision_tower(tmp_path / "towers", force=v),
    }


@pytest.mark.usefixtures("one_thread")
def test_switches_given_as_text_are_refused(tmp_path):
    """A switch read as text from a config file or a command line is a true value in Python: demo.run(tiny="False")
    ran the smoke test as the demo, load_state_dict(assign="False") replaced the parameters (an optimizer holding the
    old ones then trained nothing), push_folder_to_hub(create_pr="no") opened a pull request,
    RECTrainingArguments(bf16="False") trained in mixed precision, measured_results(best="False") gave the best
    checkpoint's results. Each is refused now, naming the switch, before anything is done."""
    for name, call in _calls(tmp_path).items():
        where, switch = name.split(" ")[-1].rstrip(")").split("(")
        for value in ("False", "no", 0.0):
            with pytest.raises(TypeError, match="must be True or False") as caught:
                call(value)
            assert str(caught.value).startswith(f"{where}: {switch} must be True or False"), (name, caught.value)


@pytest.mark.usefixtures("one_thread")
def test_real_booleans_still_pass_the_switch_checks(tmp_path):
    """True/False (numpy's too) pass: the checks refuse only what is not a boolean."""
    import numpy as np

    from m2ist.trainer import RECTrainingArguments

    model = make_model()
    model.load_state_dict(model.trainable_state_dict(), strict=np.False_, assign=False)
    model.activation_checkpointing_enable(offload=np.bool_(False))
    assert model.is_activation_checkpointing
    args = RECTrainingArguments(output_dir=str(tmp_path / "a"), use_cpu=np.True_, report_to="none")
    assert args.use_cpu and args.hub_private_repo is None  # an unset bool | None field is left alone
    assert TowerFeatureCache(model, None, check_space=False).stats["vision_misses"] == 0
