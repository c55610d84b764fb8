"""Adapters of one save that share its processor (fault hunt 22): ``save_pretrained`` writes the processor of a
model's adapters once, at the folder's root, and an adapter's ``<name>/`` subfolder holds only its config and
weights. A load of one subfolder's adapter lost that processor (``from_pretrained(subfolder=)`` gave a model without
one, ``load_adapter(subfolder=)`` compared nothing), and a save of some adapters replaced the processor the folder's
other adapters were saved with, so they reloaded with another one, without a word."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from m2ist import RECProcessor, SideTunedModel
from tests.ddp_worker import make_model, make_processor
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

hub = hub_fixture(name="hub", max_lifetime_s=120)
#: statistics other than the tiny processor's (ImageNet's)
OTHER_MEAN = [0.1, 0.2, 0.3]


@pytest.fixture(scope="module")
def processor(tmp_path_factory: pytest.TempPathFactory) -> RECProcessor:
    return make_processor(tmp_path_factory.mktemp("tokenizer"))


def _other(processor: RECProcessor) -> RECProcessor:
    return RECProcessor(processor.tokenizer, canvas_size=processor.canvas_size, max_query_len=processor.max_query_len,
                        image_mean=OTHER_MEAN)


def _two_adapters(processor: RECProcessor) -> SideTunedModel:
    model = make_model()
    model.processor = processor
    model.add_adapter("wide", tiny_config(bottleneck=4))
    return model


def _mean(model: SideTunedModel) -> list[float]:
    assert model.processor is not None, "the model lost the processor saved with its adapter"
    return [round(value, 6) for value in model.processor.image_mean]


# ---------------------------------------------------------------------------------------------- loading a subfolder
def test_from_pretrained_of_an_adapter_subfolder_restores_the_processor_saved_with_it(processor, tmp_path) -> None:
    """``from_pretrained(folder, subfolder="wide")`` gave a model without a processor: the one saved with it lies at
    the root of the save, which a load of the root adapter restores."""
    model = _two_adapters(processor)
    model.save_pretrained(tmp_path / "saved")
    loaded = SideTunedModel.from_pretrained(tmp_path / "saved", model.vision_model, model.text_model,
                                            subfolder="wide", adapter_name="wide")
    assert _mean(loaded) == _mean(model)
    mine, theirs = loaded.adapter_state_dict("wide"), model.adapter_state_dict("wide")
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_load_adapter_of_a_subfolder_names_the_processor_it_was_saved_with(processor, tmp_path) -> None:
    """``load_adapter(folder, "wide", subfolder="wide")`` onto a model whose processor differs from the one saved with
    the adapter said nothing (the root adapter of the same folder was warned about): the adapter then ran on inputs
    prepared otherwise than in its training."""
    _two_adapters(processor).save_pretrained(tmp_path / "saved")
    other = make_model()
    other.processor = _other(processor)
    with pytest.warns(UserWarning, match=r"Adapter 'wide' was saved with another processor than model\.processor.*"
                                         r"image_mean"):
        other.load_adapter(tmp_path / "saved", "wide", subfolder="wide")


def test_a_subfolder_load_from_the_hub_restores_the_processor_of_its_save(processor, hub: LocalHub, tmp_path) -> None:
    """The same from a Hub repo: the root's processor files come with the subfolder's, from the same commit."""
    model = _two_adapters(processor)
    model.push_to_hub("org/two", endpoint=hub.url)
    loaded = SideTunedModel.from_pretrained("org/two", model.vision_model, model.text_model, subfolder="wide",
                                            adapter_name="wide", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert _mean(loaded) == _mean(model)
    other = make_model()
    other.processor = _other(processor)
    with pytest.warns(UserWarning, match=r"Adapter 'wide' was saved with another processor"):
        other.load_adapter("org/two", "wide", subfolder="wide", endpoint=hub.url, cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- saving some adapters
def test_saving_some_adapters_keeps_the_processor_of_the_adapters_it_keeps(processor, tmp_path) -> None:
    """``save_pretrained(folder, selected_adapters=["b"])`` by a model with another processor wrote it over the root's:
    the root adapter it kept then reloaded with the new model's processor (other image statistics), silently. Now
    the root keeps its processor and ``b`` gets its own in its subfolder; each reloads with the one it was saved
    with."""
    first = make_model()
    first.processor = processor
    first.save_pretrained(tmp_path / "saved")
    second = make_model(seed=1)
    second.processor = _other(processor)
    second.add_adapter("b", tiny_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: nothing is lost
        second.save_pretrained(tmp_path / "saved", selected_adapters=["b"])
    root = SideTunedModel.from_pretrained(tmp_path / "saved", first.vision_model, first.text_model)
    assert _mean(root) == _mean(first)
    b = SideTunedModel.from_pretrained(tmp_path / "saved", first.vision_model, first.text_model, subfolder="b",
                                       adapter_name="b")
    assert _mean(b) == OTHER_MEAN


def test_saving_the_root_adapter_keeps_the_processor_of_the_subfolders_it_keeps(processor, tmp_path) -> None:
    """The other way round: a save that writes the root adapter (and so the root processor) with another processor
    kept the folder's other adapter subfolders, which then read the new processor. They keep the old one, copied into
    their subfolder."""
    _two_adapters(processor).save_pretrained(tmp_path / "saved")
    other = make_model(seed=1)
    other.processor = _other(processor)
    other.save_pretrained(tmp_path / "saved", selected_adapters=["default"])
    assert json.loads((tmp_path / "saved" / "m2ist_processor.json").read_text())["image_mean"] == OTHER_MEAN
    wide = SideTunedModel.from_pretrained(tmp_path / "saved", other.vision_model, other.text_model,
                                          subfolder="wide", adapter_name="wide")
    assert _mean(wide) == [round(value, 6) for value in processor.image_mean]


def test_a_save_with_the_same_processor_writes_it_once(processor, tmp_path) -> None:
    """Adapters saved with the root's processor stay without a copy of their own (the layout is unchanged)."""
    model = _two_adapters(processor)
    model.save_pretrained(tmp_path / "saved")
    model.save_pretrained(tmp_path / "saved", selected_adapters=["wide"])
    model.save_pretrained(tmp_path / "saved", selected_adapters=["default"])
    assert sorted(path.name for path in (tmp_path / "saved" / "wide").iterdir()) == [
        "m2ist_config.json", "m2ist_model.safetensors"]
    assert Path(tmp_path / "saved" / "m2ist_processor.json").is_file()


def test_pushing_some_adapters_keeps_the_processor_of_the_adapters_the_repo_keeps(processor, hub: LocalHub,
                                                                                   tmp_path) -> None:
    """The same on the Hub: ``push_to_hub(selected_adapters=["b"])`` by a model with another processor replaced the
    repo's root processor, which the repo's root adapter (and its other subfolders) then loaded with; a push of the
    root adapter alone did the same to the repo's subfolder adapters."""
    model = _two_adapters(processor)
    model.push_to_hub("org/kept", endpoint=hub.url)
    second = make_model(seed=1)
    second.processor = _other(processor)
    second.add_adapter("b", tiny_config())
    second.push_to_hub("org/kept", endpoint=hub.url, selected_adapters=["b"])
    files = hub.files("org/kept")
    assert json.loads(files["m2ist_processor.json"])["image_mean"] == _mean(model)
    assert json.loads(files["b/m2ist_processor.json"])["image_mean"] == OTHER_MEAN

    def load(**kwargs) -> SideTunedModel:
        return SideTunedModel.from_pretrained("org/kept", model.vision_model, model.text_model, endpoint=hub.url,
                                              cache_dir=tmp_path / "cache", **kwargs)

    assert _mean(load()) == _mean(model)
    assert _mean(load(subfolder="wide", adapter_name="wide")) == _mean(model)
    assert _mean(load(subfolder="b", adapter_name="b")) == OTHER_MEAN
    second.push_to_hub("org/kept", endpoint=hub.url, selected_adapters=["default"])  # the root's processor changes
    assert json.loads(hub.files("org/kept")["m2ist_processor.json"])["image_mean"] == OTHER_MEAN
    assert _mean(load(subfolder="wide", adapter_name="wide")) == _mean(model)
    assert _mean(load(subfolder="b", adapter_name="b")) == OTHER_MEAN


# ---------------------------------------------------------------------------------------------- what a subfolder holds
def test_a_save_keeps_what_an_adapter_subfolder_holds_besides_the_adapter(tmp_path) -> None:
    """A save keeps the folder's entries that are not the adapter's (notes, results), at the root; an adapter's
    subfolder was replaced whole, so a user's files in it (or in a folder of theirs named like the adapter, e.g.
    ``results/``) were deleted by the next save, silently."""
    out = tmp_path / "run"
    (out / "results").mkdir(parents=True)
    (out / "results" / "table.csv").write_text("precious", encoding="utf-8")
    model = make_model()
    model.add_adapter("results", tiny_config())
    model.save_pretrained(out)
    (out / "results" / "notes").mkdir()
    (out / "results" / "notes" / "eval.json").write_text("{}", encoding="utf-8")
    model.save_pretrained(out)
    model.save_pretrained(out, selected_adapters=["results"])
    assert (out / "results" / "table.csv").read_text(encoding="utf-8") == "precious"
    assert (out / "results" / "notes" / "eval.json").is_file()
    loaded = make_model(seed=3)
    loaded.load_adapter(out, "results", subfolder="results")
    mine, theirs = loaded.adapter_state_dict("results"), model.adapter_state_dict("results")
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)


def test_a_file_named_like_an_adapter_is_not_replaced_by_its_subfolder(tmp_path) -> None:
    """A file (or link) where an adapter's subfolder goes was replaced by the subfolder without a word."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "results").write_text("my results", encoding="utf-8")
    model = make_model()
    model.add_adapter("results", tiny_config())
    with pytest.raises(ValueError, match=r"holds a file named 'results', where the adapter 'results' is saved .*"
                                         r"nothing was saved"):
        model.save_pretrained(out)
    assert (out / "results").read_text(encoding="utf-8") == "my results"
    assert not (out / "m2ist_config.json").exists()


def test_a_root_save_without_a_processor_keeps_the_processor_of_the_subfolders_it_keeps(processor, tmp_path) -> None:
    """A model without a processor saving its root adapter over a save with one drops the root's processor (it was
    the old root adapter's); the subfolder adapters the save keeps lost theirs with it (a load gave no processor)."""
    _two_adapters(processor).save_pretrained(tmp_path / "saved")
    bare = make_model(seed=1)
    bare.save_pretrained(tmp_path / "saved", selected_adapters=["default"])
    assert not (tmp_path / "saved" / "m2ist_processor.json").exists()
    assert SideTunedModel.from_pretrained(tmp_path / "saved", bare.vision_model, bare.text_model).processor is None
    wide = SideTunedModel.from_pretrained(tmp_path / "saved", bare.vision_model, bare.text_model, subfolder="wide",
                                          adapter_name="wide")
    assert _mean(wide) == [round(value, 6) for value in processor.image_mean]


def test_a_root_processor_that_does_not_fit_a_subfolder_adapter_is_named_not_fatal(processor, tmp_path) -> None:
    """A save written by an older m2ist may hold at its root a processor its subfolder adapters do not fit (another
    canvas): such an adapter loads as before, without a processor, with a warning naming the file."""
    _two_adapters(processor).save_pretrained(tmp_path / "saved")
    RECProcessor(processor.tokenizer, canvas_size=64, max_query_len=processor.max_query_len).save_pretrained(
        tmp_path / "saved")
    model = make_model()
    with pytest.warns(UserWarning, match=r"m2ist_processor\.json|processor_config\.json"):
        wide = SideTunedModel.from_pretrained(tmp_path / "saved", model.vision_model, model.text_model,
                                              subfolder="wide", adapter_name="wide")
    assert wide.processor is None


# ---------------------------------------------------------------------------------------------- a name loads that adapter
def test_from_pretrained_with_an_adapter_name_the_folder_holds_in_a_subfolder_is_refused(hub: LocalHub,
                                                                                          tmp_path) -> None:
    """``from_pretrained(folder, adapter_name="wide")`` of a save holding a ``wide/`` adapter loaded the root
    (``"default"``) adapter and named it ``"wide"``: another adapter's boxes under the name asked for, silently
    (``load_adapter`` already refused the same call). Refused, from a folder and from the Hub, naming
    ``subfolder=``; with it, the ``wide`` adapter loads."""
    model = make_model()
    model.add_adapter("wide", tiny_config(bottleneck=4))
    model.save_pretrained(tmp_path / "saved")
    model.push_to_hub("org/named", endpoint=hub.url)
    towers = (model.vision_model, model.text_model)
    for source, hub_options in ((tmp_path / "saved", {}),
                                ("org/named", {"endpoint": hub.url, "cache_dir": tmp_path / "cache"})):
        with pytest.raises(ValueError, match=r"holds an adapter named 'wide' in its subfolder wide/.*"
                                             r"from_pretrained\(\.\.\., adapter_name='wide'\).*subfolder='wide'"):
            SideTunedModel.from_pretrained(source, *towers, adapter_name="wide", **hub_options)
        wide = SideTunedModel.from_pretrained(source, *towers, adapter_name="wide", subfolder="wide", **hub_options)
        assert wide.config.bottleneck == 4
        assert SideTunedModel.from_pretrained(source, *towers, adapter_name="other", **hub_options).config.bottleneck == 8


def test_pushing_the_root_adapter_of_a_model_without_a_processor_drops_the_old_one(processor, hub: LocalHub,
                                                                                   tmp_path) -> None:
    """``push_to_hub(selected_adapters=["default"])`` of a model without a processor left the repo's root processor,
    the replaced root adapter's, where a load of the new root adapter restored it (a local save drops it); the repo's
    subfolder adapters keep it, in their subfolders."""
    _two_adapters(processor).push_to_hub("org/bare", endpoint=hub.url)
    bare = make_model(seed=1)
    bare.push_to_hub("org/bare", endpoint=hub.url, selected_adapters=["default"])
    files = hub.files("org/bare")
    assert not [name for name in files if ("/" not in name and "processor" in name) or name == "tokenizer.json"], files
    assert json.loads(files["wide/m2ist_processor.json"])["image_mean"] == [round(v, 6) for v in processor.image_mean]
    towers = (bare.vision_model, bare.text_model)
    options = {"endpoint": hub.url, "cache_dir": tmp_path / "cache"}
    assert SideTunedModel.from_pretrained("org/bare", *towers, **options).processor is None
    wide = SideTunedModel.from_pretrained("org/bare", *towers, subfolder="wide", adapter_name="wide", **options)
    assert _mean(wide) == [round(v, 6) for v in processor.image_mean]


def test_a_push_deletes_the_processor_an_adapter_subfolder_no_longer_has(processor, hub: LocalHub, tmp_path) -> None:
    """An adapter pushed with a processor of its own (in its subfolder, the repo's root holding another) and pushed
    again with the root's kept its old processor in the repo, which a load of the subfolder prefers: a stale file
    read by every later load. A folder's save replaces the subfolder whole; the push now deletes it too."""
    first = make_model()
    first.processor = processor
    first.push_to_hub("org/stale", endpoint=hub.url)
    second = make_model(seed=1)
    second.processor = _other(processor)
    second.add_adapter("b", tiny_config())
    second.push_to_hub("org/stale", endpoint=hub.url, selected_adapters=["b"])
    assert "b/m2ist_processor.json" in hub.files("org/stale")
    second.processor = processor  # b retrained with the root's processor, pushed again
    second.push_to_hub("org/stale", endpoint=hub.url, selected_adapters=["b"])
    assert not [name for name in hub.files("org/stale") if name.startswith("b/") and "processor" in name]
    b = SideTunedModel.from_pretrained("org/stale", first.vision_model, first.text_model, subfolder="b",
                                       adapter_name="b", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert _mean(b) == _mean(first)
