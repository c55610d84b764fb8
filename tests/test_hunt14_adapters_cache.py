"""Hunt 14: many adapters and the tower-feature cache, used carelessly (silent faults first)."""

from __future__ import annotations

import copy
import logging
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T

from m2ist import SideTunedModel, get_side_tuned_model
from m2ist.cache import KEY_FIELDS, TowerCacheCollator, TowerFeatureCache, cache_keys
from m2ist.data import RECCollator
from m2ist.data.transforms import RECAugmentation
from tests.conftest import make_batch
from tests.ddp_worker import make_dataset, make_model, make_processor
from tests.tiny import text_tower, tiny_config, vision_tower


def _keyed_batch(size: int = 2) -> dict:
    batch = make_batch(size)
    for modality, name in KEY_FIELDS.items():
        batch[name] = cache_keys(batch, modality)
    return batch


# ------------------------------------------------------------------ load_adapter on other towers of one architecture
def _saved_towers(tmp_path: Path) -> dict[str, Path]:
    """Two ViT towers of one architecture and other weights, and a BERT tower, saved as local folders."""
    folders = {}
    for name, seed in (("vit_a", 0), ("vit_b", 1)):
        torch.manual_seed(seed)
        folders[name] = tmp_path / name
        vision_tower("vit").save_pretrained(folders[name])
    folders["bert"] = tmp_path / "bert"
    text_tower("bert").save_pretrained(folders["bert"])
    return folders


def _model_on(folders: dict[str, Path], vision: str) -> SideTunedModel:
    return get_side_tuned_model(T.ViTModel.from_pretrained(folders[vision]),
                                T.BertModel.from_pretrained(folders["bert"]), tiny_config())


def test_load_adapter_says_when_the_adapter_was_trained_on_another_tower(tmp_path, caplog):
    """An adapter trained on one ViT, loaded with load_adapter onto a model whose ViT has the same shape and other
    weights, loads (as from_pretrained does) but says so, naming both towers: it was silent, and the adapter's boxes
    came from towers it never saw."""
    folders = _saved_towers(tmp_path)
    _model_on(folders, "vit_a").save_pretrained(tmp_path / "trained_on_a")
    model = _model_on(folders, "vit_b")
    with caplog.at_level(logging.WARNING, logger="m2ist"):
        model.load_adapter(tmp_path / "trained_on_a", "from_a")
    said = [r.getMessage() for r in caplog.records if "was trained on the vision tower" in r.getMessage()]
    assert len(said) == 1 and str(folders["vit_a"]) in said[0] and str(folders["vit_b"]) in said[0]
    assert "from_a" in model.list_adapters()
    assert model.peft_config["from_a"].vision_model_name_or_path == str(folders["vit_a"])  # its provenance is kept

    caplog.clear()
    same = _model_on(folders, "vit_a")  # its own towers: nothing to say
    with caplog.at_level(logging.WARNING, logger="m2ist"):
        same.load_adapter(tmp_path / "trained_on_a", "again")
    assert not [r for r in caplog.records if "was trained on the" in r.getMessage()]


# ------------------------------------------------------------------ adapter names a file system cannot tell apart
@pytest.mark.usefixtures("one_thread")
def test_adapter_names_that_differ_only_in_case_are_refused(tmp_path):
    """'wide' and 'Wide' (or an accented name in its two Unicode forms) are one subfolder on macOS and Windows: a
    save wrote one adapter's weights over the other's and the reload gave one adapter under both names. Reserved
    folder names in another case ('RUNS', 'Checkpoint-10') are the trainer's folders there. All are refused."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.add_adapter("wide", tiny_config(bottleneck=16))
    for name in ("Wide", "WIDE", "Default"):
        with pytest.raises(ValueError, match="only in case"):
            model.add_adapter(name, tiny_config())
    composed = unicodedata.normalize("NFC", "café")
    model.add_adapter(composed, tiny_config())
    with pytest.raises(ValueError, match="only in case"):
        model.add_adapter(unicodedata.normalize("NFD", "Café"), tiny_config())
    for name in ("RUNS", "Checkpoint-10", "Tower_Cache", "Last-Checkpoint"):
        with pytest.raises(ValueError, match="in another case"):
            model.add_adapter(name, tiny_config())
    assert model.list_adapters() == ["default", "wide", composed]
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="only in case"):  # refused before anything is read
        model.load_adapter(tmp_path / "saved", "WIDE", subfolder="wide")
    assert model.list_adapters() == ["default", "wide", composed]
    model.add_adapter("wide_2", tiny_config())  # names that differ in more than case are fine


# ------------------------------------------------------------------ a full save after deleting the root adapter
@pytest.mark.usefixtures("one_thread")
def test_a_full_save_without_the_default_adapter_says_the_root_one_is_kept(tmp_path):
    """delete_adapter('default') then save_pretrained into the folder of an earlier save: the old 'default' adapter
    stays at the root (a save removes only what it writes), and from_pretrained(folder) loads that deleted adapter.
    A kept subfolder was warned about; the kept root adapter was silent. It is warned about now."""
    vision, text = vision_tower("vit"), text_tower("bert")
    model = get_side_tuned_model(vision, text, tiny_config())
    model.add_adapter("wide", tiny_config(bottleneck=16))
    model.save_pretrained(tmp_path / "out")
    with pytest.warns(UserWarning, match="'wide' is active now"):
        model.delete_adapter("default")
    with pytest.warns(UserWarning, match="keeps at its root the 'default' adapter") as caught:
        model.save_pretrained(tmp_path / "out")
    assert any("from_pretrained" in str(w.message) for w in caught)
    assert SideTunedModel.from_pretrained(tmp_path / "out", vision, text).config.bottleneck == 8  # what it warned of

    with warnings.catch_warnings():  # a fresh folder keeps nothing: nothing to say
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "m2ist_config.json").exists()


# ------------------------------------------------------------------ the cache and the towers' token counts
@pytest.mark.usefixtures("one_thread")
def test_a_cache_folder_is_not_read_with_other_token_counts(tmp_path):
    """vision_taps={'num_prefix_tokens': 1, 'num_suffix_tokens': 1} on DeiT moves its distillation token behind the
    patches: other features from the same tower, weights and inputs. The override's numbers live in lambdas, which
    the tap spec's repr (the fingerprint) does not show, so a run with the override read the features a run without
    it had stored in the same folder. Each now has its own folder, and reads what its towers compute."""
    torch.manual_seed(0)
    vision, text = vision_tower("deit"), text_tower("bert")
    plain = get_side_tuned_model(copy.deepcopy(vision), copy.deepcopy(text), tiny_config())
    moved = get_side_tuned_model(copy.deepcopy(vision), copy.deepcopy(text),
                                 tiny_config(vision_taps={"num_prefix_tokens": 1, "num_suffix_tokens": 1}))
    batch = _keyed_batch()
    TowerFeatureCache(plain, tmp_path / "cache", dtype="float32").features(batch)
    cache = TowerFeatureCache(moved, tmp_path / "cache", dtype="float32")
    read = cache.features(batch)
    direct = moved.tower_features(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"],
                                  batch["attention_mask"])
    assert not torch.equal(direct.vision.tokens,
                           plain.tower_features(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"],
                                                batch["attention_mask"]).vision.tokens)
    assert torch.equal(read.vision.tokens, direct.vision.tokens)
    assert cache.stats["vision_misses"] == 2 and cache.stats["text_hits"] == 2  # the text tower's records are shared
    again = TowerFeatureCache(copy.deepcopy(moved), tmp_path / "cache", dtype="float32")  # found again by a later run
    assert torch.equal(again.features(batch).vision.tokens, direct.vision.tokens)
    assert again.stats["vision_hits"] == 2


# ------------------------------------------------------------------ a random augmentation behind a plain collator
@pytest.mark.usefixtures("one_thread")
def test_a_random_augmentation_is_never_rebuilt_from_what_the_collator_remembered(tmp_path):
    """A TowerCacheCollator given a cache around a training collator whose processor augments at random rebuilt every
    later batch from the first one's remembered samples: every epoch trained on the first epoch's flips and jitters,
    silently. Only CachedViewsCollator's fixed views are rebuilt; a random augmentation is drawn again each time."""
    processor = make_processor(tmp_path / "tok")
    processor.augment = RECAugmentation(seed=0, random_resize=False, random_crop=False)
    cache = TowerFeatureCache(make_model(), None, dtype="float32")
    collate = TowerCacheCollator(RECCollator(processor, train=True), cache=cache)
    data = make_dataset(4, 0)
    items = [data[i] for i in range(4)]
    batches = []
    for _ in range(4):
        batches.append(collate(items))
        cache.features(batches[-1])
    assert collate.skipped_batches == 0 and all("pixel_values" in batch for batch in batches)
    assert any(not torch.equal(batch["labels"], batches[0]["labels"]) for batch in batches[1:])  # drawn again

    processor.augment = None  # no augmentation: batches seen whole are still rebuilt without their images
    plain = TowerCacheCollator(RECCollator(processor, train=True), cache=cache)
    cache.features(plain(items))
    assert "pixel_values" not in plain(items) and plain.skipped_batches == 1
