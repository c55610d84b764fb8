"""Round 7, outputs: results say what produced them, and drawings show the boxes given."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from m2ist import get_side_tuned_model
from m2ist.card import read_eval_results, results_for_weights
from m2ist.data.sample import RECSample
from m2ist.evaluation import evaluate
from m2ist.inference import draw_boxes
from m2ist.processing import RECProcessor
from m2ist.save_and_load import WEIGHTS_NAME, recorded_sha256
from tests.test_inference import FixedBoxModel, make_tokenizer
from tests.tiny import IMAGE_SIZE, QUERY_LEN, text_tower, tiny_config, vision_tower


@pytest.fixture
def image_path(tmp_path) -> str:
    path = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(path)
    return str(path)


def _samples(image_path: str) -> list[RECSample]:
    return [RECSample(image=image_path, expression="the red square", box=(10, 10, 90, 60), image_id="a")]


def test_evaluate_metadata_may_not_replace_what_it_records(tmp_path, image_path):
    processor = RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)
    model = FixedBoxModel([[0.25, 0.3, 0.4, 0.5]] * 4)
    for key in ("model", "protocol", "weights_sha256"):  # "model" would drop towers_used, which the card reads
        with pytest.raises(ValueError, match=f"metadata keys '{key}' would replace"):
            evaluate(model, processor, {"val": _samples(image_path)}, progress=False, metadata={key: "mine"})
    assert model.served == 0  # refused before any forward pass
    results = evaluate(model, processor, {"val": _samples(image_path)}, progress=False, metadata={"run_name": "r3"})
    assert results["metadata"]["run_name"] == "r3" and results["metadata"]["protocol"]["clamp"] == "image"


@pytest.mark.usefixtures("one_thread")
def test_evaluate_with_adapter_names_records_the_weights_of_the_metrics_it_reports(tmp_path, image_path):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.add_adapter("other", tiny_config(bottleneck=16))
    model.processor = RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=IMAGE_SIZE, max_query_len=QUERY_LEN)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    results = evaluate(model, None, {"val": _samples(image_path)}, progress=False, adapter_names=["other", "default"],
                       output_file=folder / "eval_results.json")
    # the top-level metrics are "other"'s: so are the weights and settings recorded beside them
    assert results["metadata"]["weights_sha256"] == recorded_sha256(folder / "other" / WEIGHTS_NAME)
    assert results["metadata"]["model"]["bottleneck"] == 16
    assert results["adapters"]["default"]["weights_sha256"] == recorded_sha256(folder / WEIGHTS_NAME)
    # so the default adapter's card never shows "other"'s numbers as its own
    assert results_for_weights(read_eval_results(folder), folder / WEIGHTS_NAME, model.config) is None
    assert results_for_weights(read_eval_results(folder), folder / "other" / WEIGHTS_NAME) is not None


def test_draw_boxes_refuses_boxes_of_another_frame(image_path):
    outside = [[300, 150, 400, 190]]  # canvas pixels of a smaller image: no box, a label at the edge
    with pytest.raises(ValueError, match="wholly outside"):
        draw_boxes(image_path, outside, texts=["x"])
    with pytest.raises(ValueError, match=r"gt_boxes\[0\].*wholly outside"):
        draw_boxes(image_path, [[10, 10, 50, 50]], gt_boxes=outside)
    with pytest.warns(UserWarning, match=r"boxes\[0\].*looks normalised"):  # model.pred_boxes-like numbers
        draw_boxes(image_path, [[0.1, 0.2, 0.5, 0.6]], texts=["x"])
    # boxes predict_boxes can give stay drawable: clipped to an edge (zero area), partly outside, a corner point
    drawn = draw_boxes(image_path, [[0, 0, 0, 0], [200, 10, 200, 40], [150, 50, 260, 130], [10, 10, 50, 50]])
    assert drawn.size == (200, 100)


@pytest.fixture
def fake_adapter(tmp_path, monkeypatch):
    """`m2ist predict` with a model that always predicts one box (no towers to load)."""
    import m2ist.cli.predict as predict_command

    processor = RECProcessor(make_tokenizer(tmp_path / "tok"), canvas_size=100, max_query_len=QUERY_LEN)
    monkeypatch.setattr(predict_command, "load_adapter",
                        lambda settings: (FixedBoxModel([[0.5, 0.5, 0.2, 0.2]] * 8), processor))


def test_predict_draw_replaces_only_its_own_drawings(tmp_path, fake_adapter, capsys):
    from m2ist.cli import main

    pictures = {}
    for name in ("frame-5", "frame-6", "frame-0", "frame-1"):  # frame-0/1: the user's other pictures, not inputs
        pictures[name] = tmp_path / f"{name}.png"
        Image.fromarray(np.full((40, 60, 3), len(pictures) * 40, dtype=np.uint8)).save(pictures[name])
    before = {name: path.read_bytes() for name, path in pictures.items()}
    argv = ["predict", "--adapter", str(tmp_path / "adapter"), "--text", "the red square", "--image",
            str(pictures["frame-5"]), str(pictures["frame-6"]), "--draw", str(tmp_path / "frame.png")]
    assert main(argv) == 2  # --draw frame.png writes frame-0.png and frame-1.png
    err = capsys.readouterr().err
    assert "frame-0.png already exists" in err and "earlier `m2ist predict --draw`" in err
    assert {name: path.read_bytes() for name, path in pictures.items()} == before
    argv[-1] = str(tmp_path / "boxes.jpg")
    assert main(argv) == 0  # a new drawing, then the same command again over its own drawings
    first = (tmp_path / "boxes-0.jpg").read_bytes()
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "boxes-0.jpg").read_bytes() == first and (tmp_path / "boxes-1.jpg").is_file()
