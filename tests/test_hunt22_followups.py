"""Hunt 22, follow-ups to the adapters' shared processor: an adapter subfolder given as a path (``out/wide``) loads
with its save's processor, from Python and from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModel

from m2ist import RECProcessor, SideTunedModel, get_side_tuned_model
from m2ist.cli.main import main
from tests.test_hostile import build_workspace
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny towers saved like Hub checkpoints, one image, and a save holding the root adapter and a ``wide`` one in
    ``adapter/wide/`` (the processor written once, at the root)."""
    root = build_workspace(tmp_path_factory.mktemp("followups"), [Image.new("RGB", (40, 32), (200, 90, 40))],
                           [{"image": "img0.png", "text": "the red square", "bbox": [5, 5, 15, 15]}], "data.jsonl")
    torch.manual_seed(1)
    model = get_side_tuned_model(AutoModel.from_pretrained(root / "vit"), AutoModel.from_pretrained(root / "bert"),
                                 tiny_config())
    model.processor = RECProcessor.from_pretrained(str(root / "bert"), canvas_size=32, max_query_len=8)
    model.add_adapter("wide", tiny_config(bottleneck=4))
    model.save_pretrained(root / "adapter")
    assert not (root / "adapter" / "wide" / "m2ist_processor.json").exists()  # shared at the root
    return root


def test_an_adapter_subfolder_given_as_a_path_loads_with_its_saves_processor(workspace: Path) -> None:
    """``from_pretrained("out/wide")`` is ``from_pretrained("out", subfolder="wide")``: it came back without a
    processor (``predict`` then failed with "No processor")."""
    by_path = SideTunedModel.from_pretrained(workspace / "adapter" / "wide")
    by_subfolder = SideTunedModel.from_pretrained(workspace / "adapter", subfolder="wide")
    assert by_path.processor is not None and by_subfolder.processor is not None
    assert by_path.processor.image_mean == by_subfolder.processor.image_mean
    assert by_path.config.bottleneck == 4


def test_a_trainer_checkpoint_does_not_borrow_its_parents_processor(workspace: Path, tmp_path: Path) -> None:
    """Only a folder whose name can name an adapter is a save's subfolder: ``checkpoint-*`` holds its own files."""
    from m2ist.hub import save_root

    assert save_root(workspace / "adapter" / "wide") == (workspace / "adapter").absolute()
    (workspace / "adapter" / "checkpoint-5").mkdir(exist_ok=True)
    assert save_root(workspace / "adapter" / "checkpoint-5") is None
    (tmp_path / "alone").mkdir()
    assert save_root(tmp_path / "alone") is None  # no processor beside it


def test_predict_with_an_adapter_subfolder_reads_the_processor_of_its_save(workspace: Path, capsys) -> None:
    """``m2ist predict --adapter out/wide`` failed: "holds no processor_config.json", though the save holds it."""
    output = workspace / "boxes.json"
    code = main(["predict", "--adapter", str(workspace / "adapter" / "wide"), "--image", str(workspace / "img0.png"),
                 "--text", "the red square", "--output", str(output)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    records = json.loads(output.read_text(encoding="utf-8"))
    assert len(records) == 1


def test_tower_features_of_all_adapters_tap_what_every_adapter_reads(workspace: Path) -> None:
    """``tower_features(adapter_names="all")`` raised "No adapter named 'all'" where ``forward_all_adapters`` and
    ``predict`` take ``"all"``."""
    from tests.conftest import make_batch

    model = SideTunedModel.from_pretrained(workspace / "adapter")
    model.load_adapter(workspace / "adapter", "wide", subfolder="wide")
    batch = make_batch(image_size=32, query_len=8)
    batch.pop("labels", None)
    every = model.tower_features(**batch, adapter_names="all")
    listed = model.tower_features(**batch, adapter_names=["default", "wide"])
    assert (every.vision_layers, every.text_layers) == (listed.vision_layers, listed.text_layers)


def test_saving_an_empty_selection_of_adapters_onto_a_folder_without_any_is_refused(workspace: Path,
                                                                                     tmp_path: Path) -> None:
    """``save_pretrained(folder, selected_adapters=[])`` updates a save's processor and card and keeps its adapters
    (tests/test_hostile_adapters.py); onto a folder holding none it wrote a save of no adapter, which no load reads."""
    model = SideTunedModel.from_pretrained(workspace / "adapter")
    with pytest.raises(ValueError, match=r"selected_adapters=\[\] saves no adapter.*holds none to keep.*Nothing was saved"):
        model.save_pretrained(tmp_path / "nothing", selected_adapters=[])
    assert not (tmp_path / "nothing").exists()


def test_an_eval_file_whose_records_name_other_splits_says_how_to_name_one(tmp_path: Path) -> None:
    """``--eval-file data.jsonl`` is read as the split ``data`` (its file name); a file whose records name ``train``
    and ``val`` stopped with "has no split 'data'" and no way out named."""
    from m2ist.cli.data import load_data_splits
    from m2ist.cli.errors import CLIError

    Image.new("RGB", (40, 32)).save(tmp_path / "a.png")
    rows = [{"image": "a.png", "text": "the square", "bbox": [1, 1, 9, 9], "split": split} for split in ("train", "val")]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = {"format": "jsonl", "box_format": "xyxy", "image_root": str(tmp_path), "eval_files": [str(path)]}
    with pytest.raises(CLIError, match=r"has no split 'data'.*--eval-file val=.*data\.jsonl, or all="):
        load_data_splits(data, "eval")
    data["eval_files"] = [f"val={path}"]
    assert len(load_data_splits(data, "eval")["val"]) == 1
