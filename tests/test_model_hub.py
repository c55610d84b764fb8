"""A side-tuned model pushed to a (loopback) Hub, pulled back, and loaded offline from the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertTokenizer

from m2ist import RECProcessor, SideTunedModel, get_side_tuned_model
from tests.conftest import make_batch
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import text_tower, tiny_config, vision_tower

REPO_ROOT = Path(__file__).resolve().parents[1]
hub = hub_fixture(name="hub", max_lifetime_s=120)


def test_push_pull_round_trip_then_offline_load(hub: LocalHub, tmp_path: Path):
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    with torch.no_grad():
        for p in model.side.parameters():
            p.add_(0.05)
    model.eval()
    model.vision_model.save_pretrained(tmp_path / "vision")
    model.text_model.save_pretrained(tmp_path / "text")
    model.config.vision_model_name_or_path = str(tmp_path / "vision")
    model.config.text_model_name_or_path = str(tmp_path / "text")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "square"]) + "\n")
    model.processor = RECProcessor(BertTokenizer(str(vocab)), canvas_size=32, max_query_len=8)

    url = model.push_to_hub("m2ist-test/tiny-rec", endpoint=hub.url)
    assert url.startswith(hub.url) and "m2ist-test/tiny-rec" in url
    assert {"m2ist_config.json", "m2ist_model.safetensors", "README.md", "m2ist_processor.json",
            "tokenizer.json"} <= set(hub.files("m2ist-test/tiny-rec"))

    hf_home = tmp_path / "hf_home"
    again = SideTunedModel.from_pretrained("m2ist-test/tiny-rec", endpoint=hub.url,
                                           cache_dir=hf_home / "hub").eval()
    batch = make_batch()
    expected = model(**batch).pred_boxes
    torch.testing.assert_close(again(**batch).pred_boxes, expected, rtol=0, atol=0)
    assert again.processor is not None and again.processor.canvas_size == 32  # pulled from the same endpoint
    assert again.processor.tokenizer.tokenize("red square") == ["red", "square"]

    torch.save({k: v for k, v in batch.items()}, tmp_path / "batch.pt")
    script = (
        "import torch\n"
        "from m2ist import SideTunedModel\n"
        "model = SideTunedModel.from_pretrained('m2ist-test/tiny-rec').eval()\n"
        "assert model.processor.max_query_len == 8\n"
        f"batch = torch.load({str(tmp_path / 'batch.pt')!r})\n"
        f"torch.save(model(**batch).pred_boxes, {str(tmp_path / 'offline.pt')!r})\n"
    )
    hub.stop()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_ENDPOINT", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    torch.testing.assert_close(torch.load(tmp_path / "offline.pt"), expected, rtol=0, atol=0)


def test_push_takes_peft_s_tags_and_commit_description(hub: LocalHub, tmp_path: Path):
    """As PEFT's ``push_to_hub(tags=..., commit_description=...)``: the tags join the card's, the description is
    the commit's body."""
    import yaml

    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.push_to_hub("m2ist-test/tagged", endpoint=hub.url, tags=["refcoco", "my-lab"],
                      commit_description="trained 90 epochs")
    card = hub.files("m2ist-test/tagged")["README.md"].decode()
    tags = yaml.safe_load(card.split("---")[1])["tags"]
    assert {"m2ist", "refcoco", "my-lab"} <= set(tags)
    repo = hub.repo("m2ist-test/tagged")
    assert repo.resolve("main").description == "trained 90 epochs"
    with pytest.raises(TypeError, match="tags must be a list of non-empty strings"):
        model.push_to_hub("m2ist-test/tagged", endpoint=hub.url, tags="refcoco")
