"""Training, evaluation and tower faults (fault hunt 21): the meta-device check shared by the towers and the
trainer, a frozen tower with parts left in train() mode on the uncached path, prediction records that could not be
matched back to the user's samples, training, evaluation and scoring under a "meta" default device, and results
written through a symbolic link."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from m2ist.cache import TowerCacheCollator, TowerFeatureCache
from m2ist.data import RECDataset
from m2ist.data.collator import RECCollator
from m2ist.evaluation import accuracy_at_iou, evaluate, paired_iou
from m2ist.save_and_load import module_meta_problem
from m2ist.trainer import RECMetrics, RECTrainer, compute_rec_metrics, train_rec
from tests.conftest import make_batch
from tests.ddp_worker import make_dataset, make_model
from tests.tiny import cpu_training_args

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def default_device():
    """``torch.set_default_device``, undone after the test."""
    yield torch.set_default_device
    torch.set_default_device(None)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- 1. meta check
def test_the_meta_check_of_a_module_covers_its_buffers() -> None:
    """The towers and the trainer each spelled the meta check out over parameters and buffers; one helper now
    does it for both, and a module whose only meta tensor is a buffer is refused as well."""
    module = torch.nn.Linear(2, 2)
    assert module_meta_problem(module, "The module") is None
    module.register_buffer("running", torch.empty(2, device="meta"))
    problem = module_meta_problem(module, "The module")
    assert problem is not None and problem.startswith("The module has 1 tensor(s) on the meta device")
    assert "(e.g. running)" in problem and "to_empty" in problem


def test_the_trainer_refuses_a_model_with_a_meta_buffer(processor, tmp_path) -> None:
    """A model whose meta tensor is a buffer of a tower (not a parameter) is refused up front by ``RECTrainer``."""
    model = make_model()
    name, buffer = next((n, b) for n, b in model.named_buffers() if n.startswith("text_model"))
    owner, _, leaf = name.rpartition(".")
    model.get_submodule(owner).register_buffer(leaf, torch.empty_like(buffer, device="meta"))
    with pytest.raises(ValueError, match=rf"The model has 1 tensor\(s\) on the meta device.*\(e\.g\. {name}\)"):
        RECTrainer(model=model, args=cpu_training_args(tmp_path, max_steps=1), train_dataset=make_dataset(4, seed=1),
                   processing_class=processor)


# ---------------------------------------------------------------------------------------------- 2. train() parts
def _dropout_in_train_mode(tower: torch.nn.Module) -> None:
    for module in tower.modules():
        if isinstance(module, torch.nn.Dropout):
            module.train()


def test_an_uncached_forward_warns_once_about_tower_parts_in_train_mode() -> None:
    """A frozen tower in ``eval()`` whose dropout modules were put in ``train()`` (BERT's dropout is 0.1) gave
    features drawn at random on every forward without a word, while the tower cache refused that state. Now the
    forward warns, once, naming the module and the fix; ``model.eval()`` puts the tower back and the results
    return to the deterministic ones."""
    model = make_model().eval()
    batch = make_batch()
    expected = model(**batch)["pred_boxes"]
    _dropout_in_train_mode(model.text_model)
    with pytest.warns(UserWarning, match=r"The frozen text tower has modules in train\(\) mode \(e\.g\. '.*dropout'\) "
                                         r"although the tower itself is in eval\(\).*change from call to call.*tower "
                                         r"cache, which refuses this.*model\.text_model\.eval\(\).*Monte-Carlo"):
        first = model(**batch)["pred_boxes"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not on every forward
        second = model(**batch)["pred_boxes"]
    assert not torch.equal(first, second)  # what the warning says: the draw changes
    model.eval()  # the frozen towers back in eval(), every part
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(**batch)["pred_boxes"], expected, rtol=0, atol=0)
        model.text_model.train()  # the tower in train() whole: tapped in eval(), as before, without a warning
        torch.testing.assert_close(model(**batch)["pred_boxes"], expected, rtol=0, atol=0)


def test_training_with_the_cache_does_not_warn_about_parts_it_puts_back_in_eval(processor, tmp_path) -> None:
    """``RECTrainer`` puts the frozen towers back in ``eval()`` at every step, but the tower cache's probe ran
    before the first one and warned that the features would change from call to call, which they never did. The
    trainer now sets the training mode first: no warning, and every part of the towers is in ``eval()``."""
    model = make_model()
    _dropout_in_train_mode(model.text_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_rec(model, processor, make_dataset(4, seed=0), None,
                  cpu_training_args(tmp_path, max_steps=1, tower_cache="memory"))
    assert not [w for w in caught if "modules in train() mode" in str(w.message)]
    assert not any(module.training for module in model.text_model.modules())


# ---------------------------------------------------------------------------------------------- 3. records
def test_prediction_records_lead_back_to_the_samples_given(processor) -> None:
    """``evaluate(save_predictions=True)`` on a ``RECDataset`` that dropped a sample (a box outside its image)
    recorded only the dataset's own index, which then pointed at the wrong annotation of the user's list, and
    dropped the sample's metadata (ref id, sentence id), the only per-expression key (an image has several
    expressions). Each record now carries ``source_index`` and ``metadata``; a list records them too."""
    samples = [replace(sample, image_id=f"img{i}", metadata={"ref_id": 100 + i, "sent_id": 1000 + i})
               for i, sample in enumerate(make_dataset(5, seed=0).samples)]
    samples[1] = replace(samples[1], box=(50.0, 50.0, 60.0, 60.0))  # outside the 40x32 image: dropped
    with pytest.warns(UserWarning):
        dataset = RECDataset(samples)
    assert dataset.source_indices == [0, 2, 3, 4]
    model = make_model()
    records = evaluate(model, processor, dataset, batch_size=3, save_predictions=True,
                       progress=False)["predictions"]["eval"]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert [r["source_index"] for r in records] == [0, 2, 3, 4]
    for record in records:
        sample = samples[record["source_index"]]
        assert record["metadata"] == sample.metadata and record["image_id"] == sample.image_id
    kept = [samples[i] for i in dataset.source_indices]
    listed = evaluate(model, processor, kept, batch_size=3, save_predictions=True,
                      progress=False)["predictions"]["eval"]
    assert [r["source_index"] for r in listed] == [0, 1, 2, 3]
    assert [r["metadata"] for r in listed] == [r["metadata"] for r in records]
    assert [r["iou"] for r in listed] == [r["iou"] for r in records]


# ---------------------------------------------------------------------------------------------- 4. default device
@pytest.mark.parametrize("cache", ["off", "memory"])
def test_training_under_a_meta_default_device_trains_as_without_it(default_device, processor, tmp_path, cache) -> None:
    """With ``torch.set_default_device("meta")`` (standing for "cuda" with the run on the CPU), training failed:
    "Tensor.item() cannot be called on meta tensors" (the denormal probe), "META device type not an accelerator"
    (Accelerate's shuffling generator), "Cannot copy out of meta tensor" (the tower cache's probe). Now the run
    trains and evaluates the same weights as without a default device, and the default is left as it was."""
    def run(model, folder: str):
        args = cpu_training_args(tmp_path / folder, max_steps=2, tower_cache=cache, tower_cache_dtype="float32",
                                 eval_strategy="steps", eval_steps=2)
        return train_rec(model, processor, make_dataset(8, seed=0), make_dataset(4, seed=1), args)

    reference, model = make_model(), make_model()  # the towers loaded first, then the default set
    reference_trainer = run(reference, "reference")
    default_device("meta")
    trainer = run(model, "meta")
    assert torch.get_default_device().type == "meta"
    default_device(None)
    for name, value in _trainable(reference).items():
        assert torch.equal(value, model.get_parameter(name)), name
    history = [entry for entry in trainer.state.log_history if "eval_miou" in entry]
    expected = [entry for entry in reference_trainer.state.log_history if "eval_miou" in entry]
    assert [e["eval_miou"] for e in history] == [e["eval_miou"] for e in expected] and history


def test_evaluation_and_scoring_under_a_meta_default_device(default_device, processor, tmp_path) -> None:
    """``evaluate()`` failed in the ``DataLoader`` ("Tensor.item() cannot be called on meta tensors"), and
    ``paired_iou``, ``accuracy_at_iou``, ``compute_rec_metrics`` and ``RECMetrics`` on lists or arrays failed or
    built meta tensors; ``RECTrainer.evaluate``/``predict``, a ``TowerFeatureCache`` used directly and a
    ``TowerCacheCollator`` rebuilding a batch it had seen drew their tensors on the default device. All now compute
    on the CPU and give what they give without the default."""
    model, data = make_model(), make_dataset(6, seed=0)
    pred, gt = [[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.6, 0.7]], [[0.1, 0.1, 0.5, 0.5], [0.3, 0.2, 0.6, 0.7]]
    trainer = RECTrainer(model=model, args=cpu_training_args(tmp_path, max_steps=1), train_dataset=data,
                         processing_class=processor)
    eval_prediction = EvalPrediction(predictions=(np.array(pred), np.array([[0.0, 0.0, 1.0, 1.0]] * 2)),
                                     label_ids=np.array(gt))
    collator = TowerCacheCollator(RECCollator(processor))

    def results() -> list:
        cache = TowerFeatureCache(model, None, "float32")
        collator.cache = cache
        return [evaluate(model, processor, data, batch_size=4, progress=False)["metrics"],
                paired_iou(pred, gt).tolist(), accuracy_at_iou(pred, gt),
                compute_rec_metrics(np.array(pred), np.array(gt)), RECMetrics()(eval_prediction),
                trainer.evaluate(data)["eval_miou"], trainer.predict(data).metrics["test_miou"],
                *(cache.features(collator([data[i] for i in range(4)])).vision.tokens.tolist() for _ in range(2)),
                collator([data[i] for i in range(4)])["pixel_mask"].tolist()]  # rebuilt from what was remembered

    expected = results()
    assert collator.skipped_batches == 2  # the second batch was built from what the first left (no image read)
    default_device("meta")
    assert results() == expected and collator.skipped_batches == 4


# ---------------------------------------------------------------------------------------------- 5. linked files
def test_results_written_through_a_link_update_the_file_it_points_to(processor, tmp_path) -> None:
    """``evaluate(output_file=...)`` on a symbolic link (to a shared results file) replaced the link by a regular
    file and left the file it pointed to stale, without a word. The link is now followed, as ``open`` does."""
    shared = tmp_path / "shared" / "results.json"
    shared.parent.mkdir()
    earlier = evaluate(make_model(seed=1), processor, make_dataset(2, seed=0), progress=False, output_file=shared)
    link = tmp_path / "results.json"
    link.symlink_to(shared)
    results = evaluate(make_model(), processor, make_dataset(2, seed=0), progress=False, output_file=link)
    assert results["metadata"]["weights_sha256"] != earlier["metadata"]["weights_sha256"]
    assert link.is_symlink() and link.resolve() == shared.resolve()
    saved = json.loads(shared.read_text(encoding="utf-8"))
    assert saved["metadata"]["weights_sha256"] == results["metadata"]["weights_sha256"]
    assert sorted(p.name for p in shared.parent.iterdir()) == ["results.json"]  # no temporary file left
