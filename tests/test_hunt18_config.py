"""Hostile and careless `M2ISTConfig` values and `m2ist_config.json` files: refused, naming the field and the file,
never read as something else."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from tiny import text_tower, tiny_config, vision_tower

from m2ist import M2ISTConfig, get_side_tuned_model


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


# ====================================================================================================== the file
def test_a_config_file_naming_a_key_twice_is_refused(tmp_path: Path) -> None:
    """``{"bottleneck": 8, "bottleneck": 16}`` was read as 16: JSON keeps the last value of a repeated key."""
    path = _write(tmp_path / "m2ist_config.json", '{"bottleneck": 8, "bottleneck": 16}')
    with pytest.raises(ValueError, match=rf"{path} cannot be read.*the key 'bottleneck' is given twice \(8 and 16\)"):
        M2ISTConfig.from_json_file(path)


def test_a_config_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """A UTF-8 file saved with a byte-order mark (Windows editors) was refused as "corrupted"; the other readers of
    m2ist (data files, command-line configs) drop the mark."""
    path = _write(tmp_path / "m2ist_config.json", b'\xef\xbb\xbf{"bottleneck": 8}')
    assert M2ISTConfig.from_json_file(path).bottleneck == 8


@pytest.mark.parametrize(("text", "needle"), [
    ('{"bottleneck": 1' + "0" * 5000 + "}", "digits"),  # a raw ValueError, naming no file
    ('{"vision_taps": ' + "[" * 100_000 + "]" * 100_000 + "}", "recursion"),  # a raw RecursionError
    ('{"note": "' + "x" * (2 << 20) + '"}', "over 1 MiB"),  # read whole, however large
])
def test_an_unreadable_or_huge_config_file_names_the_file(tmp_path: Path, text: str, needle: str) -> None:
    path = _write(tmp_path / "m2ist_config.json", text)
    with pytest.raises(ValueError, match=rf"^{path} .*{needle}"):
        M2ISTConfig.from_json_file(path)


def test_a_fifo_in_place_of_the_config_file_is_refused_not_waited_on(tmp_path: Path) -> None:
    path = tmp_path / "m2ist_config.json"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            M2ISTConfig.from_json_file(path)
            outcome.append(None)
        except BaseException as err:  # handed to the test thread
            outcome.append(err)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():  # blocked in open(): let it go before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail("from_json_file blocked on a FIFO")
    assert isinstance(outcome[0], ValueError) and "not a regular file" in str(outcome[0])


@pytest.mark.parametrize(("values", "needle"), [
    ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query"]}, "this is a PEFT adapter config"),
    ({"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 768}, "this is a transformers model config"),
    ({"canvas_size": 640, "max_query_len": 20}, "this is a processor config"),
    ({"m2ist": {"bottleneck": 64}}, "command-line config"),
    ({"bottle_neck": 64, "adapterscale": 0.2}, "did you mean 'adapterscale' -> 'adapter_scale', 'bottle_neck' -> "
                                               "'bottleneck'"),
])
def test_another_librarys_config_or_a_misspelt_field_is_refused(tmp_path: Path, values, needle) -> None:
    """Such a file built the default config, with a warning blaming "another m2ist version": a PEFT or transformers
    config read as an m2ist one, ``{"bottle_neck": 64}`` trained with a bottleneck of 128."""
    path = _write(tmp_path / "m2ist_config.json", json.dumps(values))
    with pytest.raises(ValueError, match=r"unknown field\(s\)") as caught:
        M2ISTConfig.from_json_file(path)
    assert needle in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(ValueError, match=r"unknown field\(s\)"):
        M2ISTConfig.from_dict(values)


def test_a_saved_config_from_a_newer_m2ist_still_loads_without_its_new_fields(tmp_path: Path, caplog) -> None:
    """What ``save_pretrained`` writes carries ``config_version``: its unknown fields are a newer m2ist's, dropped
    with a warning as before."""
    path = tiny_config().save_pretrained(tmp_path)
    _write(path, json.dumps(json.loads(path.read_text()) | {"from_the_future": 1}))
    with caplog.at_level(logging.WARNING, logger="m2ist.config"):
        assert M2ISTConfig.from_json_file(path) == tiny_config()
    assert "ignoring unknown keys ['from_the_future']" in caplog.text


def test_from_dict_of_something_else_than_a_dict_says_so() -> None:
    with pytest.raises(TypeError, match=r"from_dict needs a dict of field values.*got a list"):
        M2ISTConfig.from_dict([("bottleneck", 8)])  # type: ignore[arg-type]


# ==================================================================================================== the values
@pytest.mark.parametrize(("taps", "needle"), [
    ({"layers": "", "attention": "attn"}, "'layers' must name the layer modules"),  # the override was ignored
    ({"layers": [], "ffn": "mlp"}, "'layers' must name the layer modules"),
    ({"layers": ["layers.*", ""]}, "'layers' must name the layer modules"),
    ({"layers": None, "attention": "attn"}, "'layers' expected a string or a list of strings, got None"),
    ({"layers": 5}, "'layers' expected a string or a list of strings, got int"),  # TypeError: 'int' not iterable
    ({"num_prefix_tokens": "1"}, "'num_prefix_tokens' expected an integer or null, got str"),  # raw TypeError
    ({"num_prefix_tokens": True}, "'num_prefix_tokens' expected an integer or null, got bool"),  # read as 1
    ({"num_prefix_tokens": 1.5}, "'num_prefix_tokens' expected an integer or null, got float"),
    ({"num_suffix_tokens": -1}, "'num_suffix_tokens' expected a non-negative integer"),
    ({"layers": "layers.*", "layout": "b x y c"}, "'layout' must be 'b n c' (tokens) or the axes"),
    ({"layers": "layers.*", "layout": 3}, "'layout' expected a string, got int"),
    ({"layer": "layers.*"}, "unknown key(s) ['layer']"),
])
def test_tap_overrides_are_checked_key_by_key(taps, needle) -> None:
    with pytest.raises(ValueError, match=r"M2ISTConfig\.vision_taps=.* is invalid") as caught:
        M2ISTConfig(vision_taps=taps)
    assert needle in str(caught.value)
    with pytest.raises(ValueError, match=r"M2ISTConfig\.text_taps="):
        M2ISTConfig(text_taps=taps)


def test_good_tap_overrides_still_build() -> None:
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(
        vision_taps={"layers": ("layers.*",), "attention": "attention", "ffn": "mlp", "num_prefix_tokens": 1}))
    assert model.config.vision_taps["layers"] == ["layers.*"]  # a tuple kept as JSON keeps it: a list
    assert model.vision_tower.num_prefix_tokens == 1


def test_a_callers_taps_dict_stays_apart_from_the_built_model(tmp_path: Path) -> None:
    """The model copied the config but shared its ``vision_taps`` dict: changing the caller's dict after the build
    changed ``model.config`` (not the model), and its save was refused as "changed after the model was built"."""
    taps = {"num_prefix_tokens": 1}
    config = tiny_config(vision_taps=taps)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), config)
    taps["num_prefix_tokens"] = 0
    config.vision_taps["num_suffix_tokens"] = 3
    assert model.config.vision_taps == {"num_prefix_tokens": 1}
    model.save_pretrained(tmp_path / "adapter")


def test_layers_out_of_order_are_refused() -> None:
    """The side network runs through the pairs in list order: ``vision_layers=[1, 0]`` ran it from the deeper
    layer to the shallower one, silently."""
    with pytest.raises(ValueError, match=r"vision_layers=\[1, 0\] is invalid: expected the layers in increasing "
                                         r"order \(\[0, 1\]\)"):
        M2ISTConfig(vision_layers=[1, 0], text_layers=[0, 1])
    with pytest.raises(ValueError, match=r"text_layers=\[3, 1\] is invalid: expected the layers in increasing"):
        M2ISTConfig(vision_layers=[0, 1], text_layers=[3, 1])
    assert M2ISTConfig(vision_layers=[0, 5], text_layers=[3, 11]).vision_layers == [0, 5]


def test_a_field_assigned_after_construction_is_checked_at_once() -> None:
    """``config.bottleneck = "64"`` was kept, and ``save_pretrained`` wrote a file its load refuses;
    ``model.config.box_loss_weight = -1.0`` (read at every step) trained to make the boxes worse."""
    config = M2ISTConfig()
    with pytest.raises(ValueError, match=r"M2ISTConfig\.bottleneck='64' is invalid: expected an integer"):
        config.bottleneck = "64"
    with pytest.raises(ValueError, match=r"M2ISTConfig\.side_dropout=nan is invalid: expected a finite number"):
        config.side_dropout = float("nan")
    with pytest.raises(ValueError, match=r"M2ISTConfig\.intra_tap='FFN' is invalid: expected one of"):
        config.intra_tap = "FFN"
    assert config == M2ISTConfig()  # nothing was kept
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    with pytest.raises(ValueError, match=r"M2ISTConfig\.box_loss_weight=-1\.0 is invalid: expected a number in"):
        model.config.box_loss_weight = -1.0
    model.config.giou_loss_weight = 2.0  # a valid loss weight may still change
    config.vision_layers = (0, 1)
    assert config.vision_layers == [0, 1]  # normalised as at construction


def test_a_config_broken_across_fields_is_refused_at_save(tmp_path: Path) -> None:
    """Fields assigned one by one can break a rule that ties them (both loss weights 0): the save refuses it
    instead of writing a file that ``from_pretrained`` refuses."""
    config = M2ISTConfig()
    config.box_loss_weight = 0.0
    config.giou_loss_weight = 0.0
    with pytest.raises(ValueError, match="both loss weights are 0"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "m2ist_config.json").exists()


@pytest.mark.parametrize(("values", "needle"), [
    ({"adapter_scale": 10**400}, "adapter_scale=1000"),  # an int no float holds: OverflowError in the model
    ({"vision_layers": [True, False], "text_layers": [0, 1]}, "got a list holding bool 'True'"),
    ({"experts": ["vea", 3]}, "got a list holding int '3'"),
    ({"share_iea_up_projection": np.bool_(False)}, "got a value of type numpy.bool"),  # it said "of type bool"
])
def test_values_that_look_right_but_are_not_are_named(values, needle) -> None:
    with pytest.raises(ValueError, match="is invalid") as caught:
        M2ISTConfig(**values)
    assert needle in str(caught.value)


def test_replace_deepcopy_and_round_trips_keep_a_valid_config_equal() -> None:
    config = tiny_config(vision_layers=[0, 1], text_layers=[0, 1], vision_taps={"num_prefix_tokens": 1})
    assert M2ISTConfig.from_dict(config.to_dict()) == config
    assert M2ISTConfig.from_dict(json.loads(config.to_json_string())) == config
    assert dataclasses.replace(config) == config
    with pytest.raises(ValueError, match="bottleneck=0 is invalid"):
        dataclasses.replace(config, bottleneck=0)
