"""Round trips of everything a user can build or set: ``save_pretrained`` -> ``from_pretrained`` (and ``add_adapter``
-> ``load_adapter``, and a second save of the loaded model) must give back the same config, the same tensors and the
same outputs, or refuse; never a model that silently computes something else.

The property draws :class:`M2ISTConfig` values across its fields; the focused regression tests beside it pin each
fault it found."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, find, given, reject, settings
from hypothesis import strategies as st
from tiny import QUERY_LEN, text_tower, tiny_config, vision_tower

from m2ist import M2ISTConfig, SideTunedModel, get_side_tuned_model
from m2ist.config import EXPERTS, FIELD_CHOICES, TAP_KINDS
from tests.conftest import make_batch

#: Explicit taps the tiny ViT / BERT accept (the registry's own, or the token layout alone).
VISION_TAPS = [None, {"num_prefix_tokens": 1},
               {"layers": "layers.*", "attention": "attention", "ffn": "mlp"}]
TEXT_TAPS = [None, {"layers": ["encoder.layer.*"], "attention": "attention.output", "ffn": "output.dense"}]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


#: The fields :func:`configs` has drawn (see :func:`test_the_properties_draw_every_field`).
_DRAWN: set[str] = set()
#: The recorded fields :func:`test_every_config_file_round_trips` draws besides (the model fills in the rest).
_RECORDED_DRAWN = {"vision_model_name_or_path", "text_model_class", "vision_model_type", "text_dtype", "vision_width",
                   "text_depth", "num_vision_tokens", "adapter_scale"}
#: Recorded fields the model fills in from the towers; a built model's value is what round-trips.
_FILLED_BY_THE_MODEL = {"vision_model_class", "vision_dtype", "vision_depth", "text_revision", "text_model_type",
                        "text_width", "config_version"}


@st.composite
def configs(draw: st.DrawFn, shared: dict[str, Any] | None = None) -> M2ISTConfig:
    """A valid config for the tiny ViT + BERT (2 layers each, 32 px, 8 tokens); ``shared``: the tower settings of
    a model it is added to."""
    fusion_layers = draw(st.integers(0, 2))
    heads = draw(st.sampled_from([1, 2, 4]))
    readout = "vote" if fusion_layers == 0 else draw(st.sampled_from(FIELD_CHOICES["box_readout"]))
    vote_window = draw(st.none() | st.integers(0, 3))
    experts = draw(st.lists(st.sampled_from(EXPERTS), min_size=1, max_size=3, unique=True))
    layers = draw(st.none() | st.lists(st.integers(0, 1), min_size=1, max_size=2, unique=True).map(sorted))
    text_layers = None if layers is None else draw(
        st.lists(st.integers(0, 1), min_size=len(layers), max_size=len(layers), unique=True).map(sorted))
    weights = st.floats(0.0, 3.0, allow_nan=False) | st.integers(0, 3)
    box_weight, giou_weight = draw(weights), draw(weights)
    if box_weight == 0 and giou_weight == 0:
        giou_weight = 1.0
    point_weight = draw(weights)
    if readout == "vote" and vote_window is not None and point_weight == 0:
        point_weight = 0.5
    values = dict(
        bottleneck=draw(st.integers(1, 12)),
        adapter_scale=draw(st.floats(0.01, 2.0) | st.sampled_from([1, 2])),
        experts=experts,
        share_iea_up_projection=draw(st.booleans()),
        intra_tap=draw(st.sampled_from(TAP_KINDS)), inter_tap=draw(st.sampled_from(TAP_KINDS)),
        vision_layers=layers, text_layers=text_layers,
        layer_pairing=draw(st.sampled_from(FIELD_CHOICES["layer_pairing"])),
        side_dropout=draw(st.sampled_from([0.0, 0.1, 0.5])),
        fusion_dim=heads * draw(st.integers(1, 8)), fusion_layers=fusion_layers, fusion_heads=heads,
        fusion_ffn_dim=draw(st.integers(1, 48)), fusion_dropout=draw(st.sampled_from([0.0, 0.1, 0.3])),
        box_mlp_layers=draw(st.integers(1, 3)), fusion_norm=draw(st.sampled_from(FIELD_CHOICES["fusion_norm"])),
        reg_init="text" if fusion_layers == 0 else draw(st.sampled_from(FIELD_CHOICES["reg_init"])),
        box_readout=readout, vote_hops=draw(st.integers(1, 3)), vote_window=vote_window,
        vote_keys=draw(st.sampled_from(FIELD_CHOICES["vote_keys"])),
        position_init=draw(st.sampled_from(FIELD_CHOICES["position_init"])),
        box_loss=draw(st.sampled_from(FIELD_CHOICES["box_loss"])), box_loss_weight=box_weight,
        giou_loss_weight=giou_weight, smooth_l1_beta=draw(st.floats(0.0, 2.0)), point_loss_weight=point_weight,
    )
    if shared is None:
        values.update(
            max_query_len=draw(st.integers(QUERY_LEN, QUERY_LEN + 4)), image_size=draw(st.sampled_from([None, 32])),
            backbone_dtype=draw(st.sampled_from([None, "float32", "bfloat16"])),
            vision_taps=draw(st.sampled_from(VISION_TAPS)), text_taps=draw(st.sampled_from(TEXT_TAPS)),
            vision_revision=draw(st.sampled_from([None, "a" * 40])),
            text_model_name_or_path=draw(st.sampled_from([None, "my-org/my-text-tower"])),
            num_vision_tokens=draw(st.sampled_from([None, 17])))  # 4 x 4 patches and [CLS]
        _DRAWN.update(values)
    else:
        values.update(shared)
    try:
        return M2ISTConfig(**values)
    except ValueError as err:  # the one rule the draws above leave open: refused at once, never at the build
        assert "position_init='sincos' needs at least 4 channels" in str(err)
        reject()


def _perturb(*modules: torch.nn.Module, seed: int) -> None:
    """Random values in every trainable tensor: a zero-initialised up-projection hides no missing tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for tensor in module.parameters():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def _outputs(model: SideTunedModel, batch: dict[str, torch.Tensor], adapter: str | None = None) -> dict:
    """Every output (boxes, patch logits, losses) of ``adapter`` (default: the active one) on ``batch``."""
    model.eval()
    with torch.no_grad():
        if adapter is None:
            out = model(**batch, return_dict=True)
        else:
            features = model.tower_features(batch["pixel_values"], batch["pixel_mask"], batch["input_ids"],
                                            batch["attention_mask"], [adapter])
            out = model.forward_features(features, batch["labels"], adapter_name=adapter, return_dict=True)
    return {key: value for key, value in out.items() if value is not None}


def _assert_same_outputs(mine: dict, theirs: dict) -> None:
    assert mine.keys() == theirs.keys()
    for key in mine:  # exact: the same tensors on the same inputs in the same dtype
        torch.testing.assert_close(theirs[key], mine[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


def _assert_same_config(mine: M2ISTConfig, theirs: M2ISTConfig) -> None:
    """Every field equal, and of the same JSON type (1 stays 1, 0.5 stays 0.5, a list stays a list)."""
    a, b = dataclasses.asdict(mine), dataclasses.asdict(theirs)
    assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _state(modules: dict[str, torch.Tensor]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    return {key: (value.dtype, tuple(value.shape)) for key, value in modules.items()}


def _assert_frozen_eval(*modules: torch.nn.Module) -> None:
    """Loaded for inference, as PEFT does: eval mode everywhere (dropout off), nothing requires grad."""
    for module in modules:
        assert not any(sub.training for sub in module.modules()), "a loaded adapter must be in eval() mode"
        assert not any(p.requires_grad for p in module.parameters())


@pytest.fixture(scope="module")
def towers() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return vision_tower("vit"), text_tower("bert")


def _fresh(towers: tuple[torch.nn.Module, torch.nn.Module], dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    """Copies of the towers in ``dtype`` (a backbone_dtype casts them in place)."""
    return tuple(copy.deepcopy(tower).to(dtype) for tower in towers)


def _assign_after_build(data: st.DataObject, config: M2ISTConfig) -> None:
    """What a user may still change on a built model's config (the loss, the recorded tower names)."""
    changes = data.draw(st.fixed_dictionaries({}, optional={
        "box_loss": st.sampled_from(FIELD_CHOICES["box_loss"]), "box_loss_weight": st.floats(0.5, 2.0),
        "smooth_l1_beta": st.floats(0.1, 2.0), "text_revision": st.just("b" * 40)}), label="assigned")
    for key, value in changes.items():
        setattr(config, key, value)


@pytest.mark.usefixtures("one_thread")
@_SETTINGS
@given(data=st.data())
def test_every_config_round_trips(towers, tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """save_pretrained -> from_pretrained (and add_adapter -> load_adapter, and a second save) gives back every field,
    every tensor and every output, exactly; loaded for inference it is in eval() mode with nothing requiring grad,
    loaded trainable in train() mode with the active adapter requiring grad (as PEFT)."""
    config = data.draw(configs(), label="config")
    adapter_dtype = data.draw(st.sampled_from(sorted(_DTYPES)), label="adapter dtype")
    tower_dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="towers' dtype")
    later_backbone = data.draw(st.sampled_from([None, "bfloat16"]), label="set_backbone_dtype")
    trainable = data.draw(st.booleans(), label="is_trainable")
    folder = tmp_path_factory.mktemp("adapter")
    batch = make_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_side_tuned_model(*_fresh(towers, tower_dtype), config)
        model.to(_DTYPES[adapter_dtype])
        _perturb(model.side, model.head, seed=1)
        shared = {key: getattr(model.config, key) for key in
                  ("image_size", "max_query_len", "vision_taps", "text_taps", "backbone_dtype")}
        model.add_adapter("second", data.draw(configs(shared), label="second adapter"))
        _perturb(model.inactive_adapters["second"], seed=2)
        if later_backbone is not None:
            model.set_backbone_dtype(later_backbone)
        _assign_after_build(data, model.config)
        _assign_after_build(data, model.peft_config["second"])
        expected, expected_second = _outputs(model, batch), _outputs(model, batch, "second")
        model.save_pretrained(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = SideTunedModel.from_pretrained(folder, *_fresh(towers, tower_dtype), dtype="auto",
                                                is_trainable=trainable)
        loaded.load_adapter(folder, "second", subfolder="second", is_trainable=trainable)
    assert not [w for w in caught if "runs in" in str(w.message)], [str(w.message) for w in caught]
    _assert_same_config(model.config, loaded.config)
    _assert_same_config(model.peft_config["second"], loaded.peft_config["second"])
    assert _state(model.trainable_state_dict()) == _state(loaded.trainable_state_dict())
    assert _state(model.adapter_state_dict("second")) == _state(loaded.adapter_state_dict("second"))
    if trainable:
        assert loaded.training and all(p.requires_grad for m in (loaded.side, loaded.head) for p in m.parameters())
        assert not any(p.requires_grad for p in loaded.inactive_adapters["second"].parameters())
    else:
        assert not loaded.training
        _assert_frozen_eval(loaded.side, loaded.head, loaded.inactive_adapters["second"])
    _assert_same_outputs(expected, _outputs(loaded, batch))
    _assert_same_outputs(expected_second, _outputs(loaded, batch, "second"))

    again = folder.parent / f"{folder.name}-again"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded.save_pretrained(again)
    for name in ("m2ist_config.json", "second/m2ist_config.json"):
        assert (again / name).read_text(encoding="utf-8") == (folder / name).read_text(encoding="utf-8"), name


@pytest.mark.usefixtures("one_thread")
@settings(max_examples=60, deadline=None, derandomize=True)
@given(data=st.data())
def test_every_config_file_round_trips(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """The config alone, its recorded fields too (any text, widths, depths): the file reads back field for field."""
    config = data.draw(configs(), label="config")
    text = st.text(min_size=1, max_size=12)
    for key, value in data.draw(st.fixed_dictionaries({}, optional={
            "vision_model_name_or_path": text, "text_model_class": text, "vision_model_type": text,
            "text_dtype": st.sampled_from(FIELD_CHOICES["text_dtype"]), "vision_width": st.integers(1, 4096),
            "text_depth": st.integers(1, 64), "num_vision_tokens": st.integers(1, 4096),
            "adapter_scale": st.floats(1e-6, 1e6) | st.integers(1, 10**15)}), label="recorded").items():
        setattr(config, key, value)
    folder = tmp_path_factory.mktemp("config")
    _assert_same_config(config, M2ISTConfig.from_json_file(config.save_pretrained(folder)))


def test_the_properties_draw_every_field() -> None:
    """A field added to M2ISTConfig must be added to the draws above (or to the fields the model fills in)."""
    find(configs(), lambda config: True, settings=settings(database=None))
    assert {spec.name for spec in dataclasses.fields(M2ISTConfig)} == _DRAWN | _RECORDED_DRAWN | _FILLED_BY_THE_MODEL


# ============================================================================================ regressions
def test_sincos_positions_on_fewer_than_four_channels_are_refused_by_the_config() -> None:
    """``position_init='sincos'`` with ``fusion_dim`` < 4 was accepted, saved and then failed inside the head's build
    ("Need a grid of at least 1 x 1 and dim >= 4"), naming no field."""
    with pytest.raises(ValueError, match=r"M2ISTConfig\.fusion_dim=2 is invalid: position_init='sincos' needs at least 4"):
        tiny_config(position_init="sincos", fusion_dim=2, fusion_heads=1)
    assert tiny_config(position_init="sincos", fusion_dim=4, fusion_heads=1).fusion_dim == 4


@pytest.mark.usefixtures("one_thread")
def test_a_vote_adapter_saved_before_the_vote_window_reloads_as_it_was_saved(towers, tmp_path: Path,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A config written before ``vote_window`` and ``point_loss_weight`` existed (every patch voted, no point loss)
    reloaded with today's defaults (a 3 x 3 window, a point loss of weight 1): other boxes, with only a log line."""
    config = tiny_config(box_readout="vote", vote_window=None, point_loss_weight=0.0)
    model = get_side_tuned_model(*_fresh(towers, torch.float32), config)
    _perturb(model.side, model.head, seed=3)
    expected = _outputs(model, make_batch())
    model.save_pretrained(tmp_path)
    path = tmp_path / "m2ist_config.json"
    values = json.loads(path.read_text(encoding="utf-8"))
    for key in ("vote_window", "point_loss_weight", "vote_hops", "vote_keys", "position_init"):  # later fields
        del values[key]
    path.write_text(json.dumps(values), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="m2ist.config"):
        loaded = SideTunedModel.from_pretrained(tmp_path, *_fresh(towers, torch.float32))
    assert (loaded.config.vote_window, loaded.config.point_loss_weight) == (None, 0.0)
    assert "except {'point_loss_weight': 0.0, 'vote_window': None} (what the m2ist that wrote it" in caplog.text
    _assert_same_outputs(expected, _outputs(loaded, make_batch()))
    # a dict without config_version (typed by hand) takes today's defaults
    assert M2ISTConfig.from_dict({"box_readout": "vote"}).vote_window == 1


@pytest.mark.usefixtures("one_thread")
def test_towers_given_in_another_dtype_than_the_adapter_recorded_warn(towers, tmp_path: Path) -> None:
    """An adapter trained on bfloat16 towers (no backbone_dtype) reloaded on the same towers in float32 gave other
    boxes without a word: the recorded ``vision_dtype`` / ``text_dtype`` were never compared."""
    model = get_side_tuned_model(*_fresh(towers, torch.bfloat16), tiny_config())
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning) as caught:
        SideTunedModel.from_pretrained(tmp_path, *_fresh(towers, torch.float32))
    messages = " | ".join(str(w.message) for w in caught)
    assert re.search(r"trained on its vision tower in bfloat16 \(vision_dtype\), but the vision tower given runs in "
                     r"float32: .*dtype=torch\.bfloat16", messages)
    assert "trained on its text tower in bfloat16 (text_dtype), but the text tower given runs in float32" in messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SideTunedModel.from_pretrained(tmp_path, *_fresh(towers, torch.bfloat16))
        SideTunedModel.from_pretrained(tmp_path, *_fresh(towers, torch.float32), backbone_dtype="bfloat16")
    host = get_side_tuned_model(*_fresh(towers, torch.float32), tiny_config())
    with pytest.warns(UserWarning) as caught:
        host.load_adapter(tmp_path, "other")
    assert sum("tower given runs in float32" in str(w.message) for w in caught) == 2


def test_two_saves_of_one_model_write_the_same_bytes(towers, tmp_path: Path) -> None:
    """safetensors writes its metadata in a hash map's order, which changed from one save to the next: the same
    weights made another file, so each push uploaded them again and a push of unchanged weights made a commit."""
    import hashlib

    model = get_side_tuned_model(*_fresh(towers, torch.float32), tiny_config())
    model.add_adapter("second", tiny_config())
    digests = []
    for index in range(6):  # four metadata entries: six saves in one order each by chance is 1 in 24**5
        model.save_pretrained(tmp_path / str(index))
        digests.append({path.relative_to(tmp_path / str(index)).as_posix(): hashlib.sha256(path.read_bytes()).digest()
                        for path in sorted((tmp_path / str(index)).rglob("*")) if path.is_file()})
    assert "second/m2ist_model.safetensors" in digests[0]
    assert all(found == digests[0] for found in digests[1:])


def test_replacing_model_config_is_refused(towers, tmp_path: Path) -> None:
    """``model.config = dataclasses.replace(model.config, box_loss_weight=5.0)`` was kept as a plain attribute: the
    loss and save_pretrained went on reading the adapter's own config, so the saved adapter silently lacked it."""
    model = get_side_tuned_model(*_fresh(towers, torch.float32), tiny_config())
    with pytest.raises(AttributeError, match=r"model\.config cannot be replaced.*Assign its fields instead"):
        model.config = dataclasses.replace(model.config, box_loss_weight=5.0)
    model.config.box_loss_weight = 5.0  # assigning a field is what works, and is saved
    model.add_adapter("second", tiny_config())
    model.set_adapter("second")
    assert model.config is model.peft_config["second"]
    model.set_adapter("default")
    assert copy.deepcopy(model).config.box_loss_weight == 5.0
    model.save_pretrained(tmp_path)
    assert M2ISTConfig.from_pretrained(tmp_path).box_loss_weight == 5.0


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("tower_dtype", "backbone_dtype"), [(torch.float32, None), (torch.bfloat16, None),
                                                            (torch.float32, "bfloat16"), (torch.bfloat16, "float32")])
def test_towers_reloaded_by_path_give_the_same_boxes(towers, tmp_path: Path, tower_dtype: torch.dtype,
                                                     backbone_dtype: str | None) -> None:
    """The towers re-loaded from the recorded paths (as from the Hub), in the recorded dtype, then cast as recorded."""
    import transformers as T

    for name, tower in zip(("vision", "text"), _fresh(towers, tower_dtype), strict=True):
        tower.save_pretrained(tmp_path / name)
    given = [T.AutoModel.from_pretrained(tmp_path / name, dtype=tower_dtype) for name in ("vision", "text")]
    model = get_side_tuned_model(*given, tiny_config(backbone_dtype=backbone_dtype, box_readout="vote"))
    _perturb(model.side, model.head, seed=4)
    expected = _outputs(model, make_batch())
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = SideTunedModel.from_pretrained(tmp_path / "adapter")
    _assert_same_config(model.config, loaded.config)
    _assert_same_outputs(expected, _outputs(loaded, make_batch()))
