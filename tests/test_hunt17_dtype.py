"""Precision faults blamed on the wrong thing (fault hunt 17): frozen towers whose features overflow or turn NaN
(a float16 tower, fp16 autocast, NaN weights) were reported as "learning rates too high" in training and as
"damaged adapter weights" in prediction, and cached as NaN when the cache was not float16; float16 side networks
trained into NaN with the learning rates blamed."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from m2ist.cache import TowerCacheCollator, TowerFeatureCache
from m2ist.data.collator import RECCollator
from m2ist.inference import predict_boxes
from m2ist.model import non_finite_cause
from m2ist.save_and_load import WEIGHTS_NAME
from m2ist.trainer import NonFiniteTrainingError, train_rec
from tests.conftest import make_batch
from tests.ddp_worker import make_dataset, make_model
from tests.tiny import cpu_training_args

PATCH_WEIGHT = "embeddings.patch_embeddings.projection.weight"


def overflowing_model(backbone_dtype: str = "float16"):
    """The tiny model whose vision tower's patch projection is scaled 1e5: its weights still fit float16, its
    activations do not (finite in float32, inf in float16)."""
    model = make_model()
    with torch.no_grad():
        model.vision_model.get_parameter(PATCH_WEIGHT).mul_(1e5)
    return model.set_backbone_dtype(backbone_dtype)


def nan_text_weight_model():
    model = make_model()
    name, weight = next((n, p) for n, p in model.text_model.named_parameters() if n.endswith("query.weight"))
    with torch.no_grad():
        weight[0, 0] = float("nan")
    return model, name


def test_a_float16_tower_that_overflows_is_named_in_training(processor, tmp_path):
    """It used to say "the inputs are finite: the learning rates are probably too high"."""
    args = cpu_training_args(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=1)
    with pytest.raises(NonFiniteTrainingError) as error:
        train_rec(overflowing_model(), processor, make_dataset(4, seed=1), args=args)
    message = str(error.value)
    assert "step 1" in message and "frozen vision tower computes NaN or infinite features" in message
    assert "float16 overflows" in message and "set_backbone_dtype('bfloat16')" in message
    assert "learning rates" not in message
    assert not list((tmp_path / "run").rglob(WEIGHTS_NAME))  # nothing saved


def test_nan_weights_in_a_tower_are_named_in_training(processor, tmp_path):
    model, name = nan_text_weight_model()
    with pytest.raises(NonFiniteTrainingError, match=rf"frozen text tower .*its weight '{name}' holds NaN or inf\. "
                                                     r"Reload the text tower"):
        train_rec(model, processor, make_dataset(4, seed=1), args=cpu_training_args(tmp_path / "run", max_steps=2))


def test_a_diverging_run_with_sound_towers_still_blames_the_learning_rates(processor, tmp_path):
    args = cpu_training_args(tmp_path / "run", learning_rate=1e6, side_learning_rate=1e6, max_steps=8)
    with pytest.raises(NonFiniteTrainingError, match="the towers' features are finite: the learning rates"):
        train_rec(make_model(), processor, make_dataset(8, seed=1), args=args)


def test_fp16_autocast_overflow_is_told_apart_from_damaged_weights():
    """float32 towers under float16 autocast (fp16=True mixed precision) overflow as a float16 tower does."""
    model = overflowing_model("float32")
    batch = make_batch(2)
    assert non_finite_cause(model, batch) == ""  # float32: finite
    with torch.autocast("cpu", dtype=torch.float16):
        cause = non_finite_cause(model, batch)
    assert "float16 overflows" in cause and "bf16=True instead of fp16=True" in cause


def test_a_weight_beyond_float16_range_names_the_cast():
    model = make_model()
    with torch.no_grad():
        model.vision_model.get_parameter(PATCH_WEIGHT)[0, 0, 0, 0] = 1e6  # fits float32, inf in float16
    model.set_backbone_dtype("float16")
    cause = non_finite_cause(model, make_batch(2))
    assert f"its weight {PATCH_WEIGHT!r} holds NaN or inf, as a weight beyond float16's ±65504 becomes" in cause


def test_prediction_names_the_overflowing_tower_not_the_adapter(processor):
    """check_finite_boxes blamed the adapter's weights ("retrain it") for a tower's float16 overflow."""
    image = Image.new("RGB", (40, 32), (255, 255, 255))
    with pytest.raises(ValueError) as error:
        predict_boxes(overflowing_model(), image, "red square", processor)
    assert "predicted non-finite boxes" in str(error.value) and "float16 overflows" in str(error.value)
    assert "Retrain it" not in str(error.value)
    model, name = nan_text_weight_model()
    with pytest.raises(ValueError, match=rf"its weight '{name}' holds NaN"):
        predict_boxes(model, image, "red square", processor, adapters="all")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_tower_cache_stores_no_non_finite_features(processor, dtype):
    """Only a float16 cache checked its records: a float32 or bfloat16 one stored NaN features for good."""
    model, _ = nan_text_weight_model()
    cache = TowerFeatureCache(model, dtype=dtype)
    data = make_dataset(2, seed=1)
    batch = TowerCacheCollator(RECCollator(processor))([data[i] for i in range(2)])
    with pytest.raises(ValueError, match=r"frozen text tower computed NaN or infinite features .*Nothing was cached"):
        cache.features(batch)
    assert cache.stats["text_records"] == 0


def test_training_float16_parameters_is_refused_before_the_first_step(processor, tmp_path):
    """model.half() then train: the updates underflowed, the loss turned NaN at step 4 and the learning rates were
    blamed. bfloat16 parameters still train."""
    with pytest.raises(ValueError, match=r"trained parameter tensors are float16 .*model\.float\(\)"):
        train_rec(make_model().half(), processor, make_dataset(4, seed=1),
                  args=cpu_training_args(tmp_path / "half", max_steps=1))
    assert not (tmp_path / "half").exists() or not list((tmp_path / "half").iterdir())
    train_rec(make_model().bfloat16(), processor, make_dataset(4, seed=1),
              args=cpu_training_args(tmp_path / "bf16", max_steps=1))
