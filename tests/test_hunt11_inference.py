"""Round 11, inference as a user runs it: the app's display mapping and its model names, repeated CLI flags."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from m2ist.processing import RECProcessor
from tests.test_inference import FixedBoxModel, make_tokenizer
from tests.tiny import QUERY_LEN

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture
def processor(tmp_path) -> RECProcessor:
    return RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)


def _model(processor: RECProcessor, box: list[float], count: int = 4) -> FixedBoxModel:
    model = FixedBoxModel([box] * count, image_size=100)
    model.processor = processor
    return model


@pytest.mark.parametrize("size", [(100, 37), (2000, 1499)])  # display copies 512x189 and 1024x767: heights rounded down
def test_app_draws_a_box_on_the_image_edge_of_a_rounded_display_copy(processor, tmp_path, size):
    from m2ist.app import predict_page

    path = tmp_path / "wide.png"
    Image.new("RGB", size, "white").save(path)
    model = _model(processor, [0.5, 0.97, 0.2, 0.04])  # in the canvas padding below the image: clipped to its bottom
    result = predict_page([("tiny", model)], str(path), "the dog")
    assert result.ok, result.message
    assert result.boxes["tiny"][0][1] == result.boxes["tiny"][0][3] == size[1]
    assert result.images[0] is not None and "failed" not in result.message


def test_app_refuses_two_models_of_one_name(processor, tmp_path):
    from m2ist.app import predict_page

    path = tmp_path / "x.png"
    Image.new("RGB", (100, 100), "white").save(path)
    left, right = _model(processor, [0.3, 0.5, 0.2, 0.2]), _model(processor, [0.7, 0.5, 0.2, 0.2])
    with pytest.raises(ValueError, match="two models share the name 'm'"):
        predict_page([("m", left), ("m", right)], str(path), "the dog")
    result = predict_page([("a", left), ("b", right)], str(path), "the dog")
    assert result.ok and result.boxes["a"] != result.boxes["b"]


def test_predict_repeated_image_and_text_flags_add_up(tmp_path, processor, monkeypatch, capsys):
    import m2ist.cli.predict as predict_command
    from m2ist.cli import main

    monkeypatch.setattr(predict_command, "load_adapter",
                        lambda settings: (FixedBoxModel([[0.5, 0.5, 0.2, 0.2]] * 8), processor))
    for name in "abc":
        Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "adapter").mkdir()
    argv = ["predict", "--adapter", str(tmp_path / "adapter"), "--image", str(tmp_path / "a.png"), "--text", "the dog",
            "--image", str(tmp_path / "b.png"), str(tmp_path / "c.png"), "--text", "a dog", "the red square"]
    assert main(argv) == 0
    records = json.loads(capsys.readouterr().out)
    assert [(record["image"][-5:], record["text"]) for record in records] == [
        ("a.png", "the dog"), ("b.png", "a dog"), ("c.png", "the red square")]
