"""State and lifecycle faults (fault hunt 19): weights on the meta device, a tower left in train() mode while the
tower cache fills, a config made inconsistent by assignment after the build, a bare best metric with several
evaluation sets, and the card's generated parts reached through public functions."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from m2ist import M2ISTConfig, get_side_tuned_model
from m2ist.cache import TowerCacheCollator, TowerFeatureCache
from m2ist.data.collator import RECCollator
from m2ist.trainer import RECTrainer, denormals_flushed
from tests.conftest import make_batch
from tests.ddp_worker import make_dataset, make_model
from tests.tiny import cpu_training_args, text_tower, tiny_config, vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- the meta device
def test_towers_built_on_the_meta_device_are_refused_naming_the_fix() -> None:
    """Towers built under ``torch.device("meta")`` (or accelerate's ``init_empty_weights``) failed deep in the layer
    probe with "Tensor.item() cannot be called on meta tensors"."""
    with torch.device("meta"):
        vision, text = vision_tower("vit"), text_tower("bert")
    with pytest.raises(ValueError, match=r"The vision tower has \d+ tensor\(s\) on the meta device, which hold no data "
                                         r"\(e\.g\. .*\)\.( .*)? load them .*to_empty"):
        get_side_tuned_model(vision, text, tiny_config())
    with pytest.raises(ValueError, match=r"The text tower has \d+ tensor\(s\) on the meta device"):
        get_side_tuned_model(vision_tower("vit"), text, tiny_config())


def test_a_model_moved_to_meta_is_refused_by_save_and_by_the_trainer(processor, tmp_path) -> None:
    """``model.to("meta")`` then ``save_pretrained`` failed with "Cannot copy out of meta tensor"; ``RECTrainer``
    failed when the Trainer moved it, advising ``to_empty()``, which trains on uninitialised memory."""
    model = make_model()
    model.head.to("meta")  # a part moved by hand: SideTunedModel.to("meta") itself is refused (below)
    with pytest.raises(ValueError, match=r"Refusing to save m2ist_model\.safetensors: the state has \d+ tensor\(s\) "
                                         r"on the meta device.*keep the model on a real device"):
        model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()  # nothing half-written
    with pytest.raises(ValueError, match=r"The model has \d+ tensor\(s\) on the meta device"):
        RECTrainer(model=model, args=cpu_training_args(tmp_path / "run", max_steps=1),
                   train_dataset=make_dataset(4, seed=1), processing_class=processor)


def test_the_meta_device_is_refused_before_anything_moves(processor, tmp_path) -> None:
    """``model.to("meta")``, ``from_pretrained(device="meta")`` (or ``device_map``) and ``predict_boxes(device="meta")``
    moved every weight to the meta device, the caller's model included, and failed later ("Cannot copy out of meta
    tensor", "not on the expected device meta"): refused first, the model left where it was."""
    from m2ist import SideTunedModel
    from m2ist.inference import predict_boxes
    from tests.tiny import save_reloadable_adapter

    model = make_model()
    model.processor = processor
    refused = r"device='meta'\): the meta device holds shapes, no data.*pass 'cpu' or 'cuda'"
    with pytest.raises(ValueError, match=r"SideTunedModel\.to\(" + refused):
        model.to("meta")
    with pytest.raises(ValueError, match=refused):
        predict_boxes(model, [make_dataset(1, seed=1)[0]["image"]], ["the dog"], device=torch.device("meta"))
    assert not any(p.is_meta for p in model.parameters())  # the caller's weights are still there
    adapter = save_reloadable_adapter(tmp_path, processor.tokenizer)
    for place in ({"device": "meta"}, {"device_map": "meta"}, {"device_map": {"": "meta"}}):
        with pytest.raises(ValueError, match=r"from_pretrained\(" + refused):
            SideTunedModel.from_pretrained(adapter, **place)


# ---------------------------------------------------------------------------------------------- the tower cache
def test_the_cache_refuses_to_store_what_dropout_put_in_train_mode_draws(processor) -> None:
    """``Tower.tap`` runs a tower put in ``train()`` whole in ``eval()``, but it looked at the tower's own mode only:
    dropout modules put in ``train()`` by hand (Monte-Carlo dropout; BERT's dropout is 0.1) filled the cache with one
    dropout draw, read back every epoch after. Now the fill refuses it, and nothing is stored."""
    model = make_model()
    cache = TowerFeatureCache(model, None, "float32")
    batch = TowerCacheCollator(RECCollator(processor))(make_dataset(2, seed=1))
    for module in model.text_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train()
    with pytest.raises(ValueError, match=r"The frozen text tower has modules in train\(\) mode \(e\.g\. '.*dropout'\) "
                                         r"although the tower itself is in eval\(\).*one random draw.*"
                                         r"model\.text_model\.eval\(\).*tower_cache='off'\. Nothing was cached"):
        cache.features(batch)
    assert cache.stats["text_records"] == 0
    model.text_model.train()  # the tower in train() whole: tapped in eval(), as without the cache
    first = cache.features(batch).text.tokens
    assert cache.stats["text_records"] == 2 and model.text_model.training
    model.eval()
    direct = model.text_tower.tap({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]},
                                  cache.text_layers, cache.kinds).tokens
    torch.testing.assert_close(first, direct)


def test_a_forward_keeps_the_modes_the_user_gave_the_parts_of_a_tower() -> None:
    """A tower put back in ``train()`` is tapped in ``eval()`` and its mode restored, but the restore was
    ``tower.train()``, which also put in ``train()`` the parts the user had kept in ``eval()`` (here the embeddings):
    each forward changed the tower's state."""
    model = make_model().eval()
    batch = make_batch()
    expected = model(**batch)["pred_boxes"]
    model.text_model.train()
    model.text_model.embeddings.eval()
    torch.testing.assert_close(model(**batch)["pred_boxes"], expected)  # tapped without dropout
    assert model.text_model.training and model.text_model.encoder.layer[0].training
    assert not model.text_model.embeddings.training and not model.text_model.embeddings.dropout.training


# ---------------------------------------------------------------------------------------------- the config
def _trainer(processor, output, model=None, eval_dataset=None, callbacks=None, **args) -> RECTrainer:
    return RECTrainer(model=model or make_model(), args=cpu_training_args(output, **args),
                      train_dataset=make_dataset(4, seed=1), eval_dataset=eval_dataset, processing_class=processor,
                      callbacks=callbacks)


@pytest.mark.parametrize(("assign", "needle"), [
    ({"box_loss_weight": 0.0, "giou_loss_weight": 0.0}, r"Adapter 'default': M2ISTConfig\.giou_loss_weight=0\.0 is "
                                                        r"invalid: both loss weights are 0.*Nothing was trained"),
    ({"side_dropout": 0.3}, r"The config of adapter 'default' was changed after the model was built \(side_dropout: "
                            r"0\.0 -> 0\.3\).*Build a new model.*nothing was trained"),
    ({"backbone_dtype": "bfloat16"}, r"\(backbone_dtype: None -> 'bfloat16'\).*model\.set_backbone_dtype"),
])
def test_a_config_made_inconsistent_by_assignment_is_refused_before_training(processor, tmp_path, assign, needle):
    """Each field assigned after the build is checked on its own, the rules that tie fields together at save: both
    loss weights set to 0 trained a whole run on a zero loss, a changed ``side_dropout`` trained with the old one,
    and only the save at the end refused the adapter."""
    trainer = _trainer(processor, tmp_path / "run", max_steps=2)
    before = {name: tensor.clone() for name, tensor in trainer.model.trainable_state_dict().items()}
    for name, value in assign.items():
        setattr(trainer.model.config, name, value)
    with pytest.raises(ValueError, match=needle):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[name], tensor) for name, tensor in trainer.model.trainable_state_dict().items())


def test_assignments_may_pass_through_an_inconsistent_config() -> None:
    """The rules that tie fields are checked where the config is used, so a sequence of assignments may pass
    through a state that breaks one (fusion_layers=0 before reg_init and box_readout follow)."""
    config = tiny_config()
    config.fusion_layers = 0  # inconsistent until the next two assignments
    with pytest.raises(ValueError, match=r"fusion_layers=0 is invalid: without a fusion layer"):
        get_side_tuned_model(vision_tower("vit"), text_tower("bert"), config)
    config.reg_init, config.box_readout = "text", "vote"
    config.validate()
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), config)
    assert model.config.fusion_layers == 0
    assert M2ISTConfig.from_dict(config.to_dict()) == config


def test_a_misspelt_field_assigned_on_a_config_warns_naming_the_field() -> None:
    """``config.box_loss_wieght = 0.0`` set a plain attribute nothing reads, without a word (``from_dict`` refuses
    the same misspelling); a name that is no near miss (the Trainer sets ``config.use_cache``) is kept quietly."""
    config = M2ISTConfig()
    with pytest.warns(UserWarning, match=r"M2ISTConfig has no field 'box_loss_wieght' \(did you mean "
                                         r"'box_loss_weight'\?\): the value is kept as a plain attribute"):
        config.box_loss_wieght = 0.0
    assert config.box_loss_weight == M2ISTConfig().box_loss_weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.use_cache = False
        config._private = 1


# ---------------------------------------------------------------------------------------------- resuming
def test_resuming_with_a_processor_that_prepares_inputs_otherwise_is_refused(processor, tmp_path, caplog) -> None:
    """The checkpoint records the run's settings, which a resume compares, but not the processor's: a run resumed
    with other normalisation statistics (or canvas, query length, tokenizer) trained on inputs prepared otherwise,
    without a word, although the checkpoint holds the processor it was trained with."""
    saving = dict(save_strategy="steps", save_steps=1)
    _trainer(processor, tmp_path / "run", max_steps=1, **saving).train()
    other = processor._with(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    checkpoint = str(tmp_path / "run" / "checkpoint-1")
    resumed = _trainer(other, tmp_path / "run", max_steps=2, **saving)
    with pytest.raises(ValueError, match=r"was written by another run \(processor\.image_mean: checkpoint \[0\.485, "
                                         r"0\.456, 0\.406\], now \[0\.5, 0\.5, 0\.5\]; processor\.image_std: .*"
                                         r"resume_allow_changes=True"):
        resumed.train(resume_from_checkpoint=checkpoint)
    allowed = _trainer(other, tmp_path / "run", max_steps=2, resume_allow_changes=True, **saving)
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        allowed.train(resume_from_checkpoint=checkpoint)
    assert allowed.state.global_step == 2 and any("processor.image_mean" in r.message for r in caplog.records)
    _trainer(processor, tmp_path / "run", max_steps=2, **saving).train(resume_from_checkpoint=checkpoint)  # same: fine


def _flushing() -> bool:
    return bool((torch.tensor([1e-39]) * 1.0)[0] == 0)


def test_training_gives_back_the_denormal_setting_it_found() -> None:
    """``RECTrainer.train`` (``flush_denormal``, on by default on a CPU) switched the process-wide flush off after
    the run even when the caller had switched it on before: their later CPU code ran several times slower."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        with denormals_flushed():
            assert _flushing()
        assert _flushing()  # the caller's setting, kept
    finally:
        torch.set_flush_denormal(False)
    with denormals_flushed():
        assert _flushing()
    assert not _flushing()  # off before: off after


# ---------------------------------------------------------------------------------------------- the best metric
def test_a_bare_best_metric_with_several_evaluation_sets_warns_naming_the_keys(processor, tmp_path, caplog) -> None:
    """With ``{"val": ..., "testA": ...}`` and ``load_best_model_at_end``, a bare ``acc@0.5`` silently picked the
    checkpoints by the first set (an info line only); transformers stops with a KeyError at the first evaluation."""
    sets = {"val": make_dataset(2, seed=2), "testA": make_dataset(2, seed=3)}
    best = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, max_steps=1)
    with caplog.at_level(logging.INFO, logger="m2ist.trainer"):
        trainer = _trainer(processor, tmp_path / "a", eval_dataset=sets, load_best_model_at_end=True, **best)
    assert trainer.args.metric_for_best_model == "val_acc@0.5"  # unchanged: the first set
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "names no evaluation set" in r.message]
    assert len(warned) == 1 and "load_best_model_at_end" in warned[0].message
    assert "['val_acc@0.5', 'testA_acc@0.5']" in warned[0].message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="m2ist.trainer"):
        _trainer(processor, tmp_path / "b", eval_dataset=sets, metric_for_best_model="testA_acc@0.5",
                 load_best_model_at_end=True, **best)  # named: nothing to say
        _trainer(processor, tmp_path / "c", eval_dataset=sets, **best)  # nothing picks checkpoints by it
        _trainer(processor, tmp_path / "d", eval_dataset={"val": sets["val"]}, load_best_model_at_end=True, **best)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "metric_for_best_model" in r.message]


def test_the_default_metrics_follow_the_adapter_set_active_after_the_trainer_was_built(processor, tmp_path) -> None:
    """``compute_metrics`` defaults to ``RECMetrics(model.config)``, the config of the adapter active when the trainer
    is built: after ``set_adapter("b")`` its ``loss_box`` was still computed with the first adapter's ``box_loss``
    (l1), while ``eval_loss`` used b's (smooth L1)."""
    model = make_model()
    model.add_adapter("b", tiny_config(box_loss="smooth_l1", smooth_l1_beta=1.0))
    trainer = _trainer(processor, tmp_path / "a", model=model)
    val = make_dataset(4, seed=2)
    trainer.evaluate(val)
    model.set_adapter("b")
    late = trainer.evaluate(val)["eval_loss_box"]
    assert trainer.compute_metrics.config is model.config and model.config.box_loss == "smooth_l1"
    assert late == _trainer(processor, tmp_path / "b", model=model).evaluate(val)["eval_loss_box"]  # built with b


# ---------------------------------------------------------------------------------------------- the card
def test_the_hub_merges_cards_through_public_card_functions() -> None:
    """hub.py imported ``_RESULTS_MARKER`` and ``_SECTION`` from card.py; ``own_text`` and
    ``with_generated_parts`` are their public home, with the same results."""
    import m2ist.hub as hub
    from m2ist.card import SECTION_END, SECTION_START, own_text, with_generated_parts

    assert not [name for name in vars(hub) if name in ("_RESULTS_MARKER", "_SECTION")]
    marker = "<!-- m2ist:results-measured m2ist_model.safetensors sha256:abc123 -->\n"
    mine = f"# Card\n{SECTION_START}\nnew usage\n{SECTION_END}\n\n{marker}"
    theirs = f"# Card\nMy notes.\n{SECTION_START}\nold usage\n{SECTION_END}\n\n" + marker.replace("abc123", "ffff")
    assert own_text(theirs) == "# Card\nMy notes."
    assert own_text(mine) == "# Card"
    merged = with_generated_parts(theirs, mine)
    assert merged == f"# Card\nMy notes.\n{SECTION_START}\nnew usage\n{SECTION_END}\n\n{marker}"
    assert with_generated_parts("# Plain\n", "# Card\n") == "# Plain\n"  # nothing generated: unchanged


# ---------------------------------------------------------------------------------------------- trainer.args
@pytest.mark.parametrize(("built", "changed", "needle"), [
    ({"tower_cache": "memory"}, {"tower_cache": "off"}, "tower_cache: 'memory' -> 'off'"),  # was an AttributeError
    ({}, {"tower_cache": "memory"}, "tower_cache: 'off' -> 'memory'"),  # was a cache opened, printed, never read
    ({}, {"tower_dtype": "bfloat16"}, "tower_dtype: 'auto' -> 'bfloat16'"),  # was ignored: the towers stayed float32
])
def test_arguments_applied_when_the_trainer_is_built_cannot_change_on_trainer_args(processor, tmp_path, built, changed,
                                                                                   needle):
    """``trainer.args.x = ...`` works for most TrainingArguments (read when used), but RECTrainer applies these when
    it is built (the collators wrapped for the cache, the towers cast): a change afterwards was half applied."""
    trainer = _trainer(processor, tmp_path / "run", max_steps=1, **built)
    before = {name: getattr(trainer.args, name) for name in changed}
    for name, value in changed.items():
        setattr(trainer.args, name, value)
    for call in (trainer.train, lambda: trainer.evaluate(make_dataset(2, seed=2))):
        with pytest.raises(ValueError, match=rf"trainer\.args changed since the RECTrainer was built \({needle}\).*"
                                             "build a new RECTrainer"):
            call()
    assert trainer.state.global_step == 0
    for name, value in before.items():
        setattr(trainer.args, name, value)
    trainer.train()  # the values put back: it trains
    assert trainer.state.global_step == 1
