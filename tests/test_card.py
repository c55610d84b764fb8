"""The model card and what is published: ModelCard metadata field by field, merging into an existing card, no
local paths, the real repo id on push, 0644 files, only adapter files pushed, RECTrainer's card and push."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from m2ist import get_side_tuned_model
from m2ist.card import EVAL_RESULTS_NAME, PLACEHOLDER_REPO_ID, SECTION_END, SECTION_START
from m2ist.hub import push_folder_to_hub
from m2ist.trainer import RECTrainingArguments, train_rec
from tests.ddp_worker import make_dataset, make_processor
from tests.hub_server import LocalHub, hub_fixture
from tests.tiny import text_tower, tiny_config, vision_tower

hub = hub_fixture(name="hub", max_lifetime_s=180)
VISION_ID, TEXT_ID = "google/vit-base-patch16-224-in21k", "bert-base-uncased"
RESULTS = {"metrics": {"val": {"acc@0.5": 0.8125, "correct@0.5": 13, "miou": 0.66, "count": 16},
                       "testA": {"acc@0.5": 0.75, "miou": 0.61, "count": 8}},
           "metadata": {"datasets": ["jxu124/refcoco"], "adapter": "/home/someone/out"}}


def hub_model(**config):
    """A tiny model whose config records Hub ids for its towers."""
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(**config))
    model.config.vision_model_name_or_path, model.config.text_model_name_or_path = VISION_ID, TEXT_ID
    model.config.vision_revision = "a" * 40
    return model


def metadata(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_fresh_card_field_by_field(tmp_path: Path) -> None:
    model = hub_model()
    model.save_pretrained(tmp_path / "adapter")
    card = ModelCard.load(tmp_path / "adapter" / "README.md")
    data = metadata(tmp_path / "adapter" / "README.md")

    assert data["library_name"] == "m2ist"
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == [VISION_ID, TEXT_ID]
    assert data["tags"] == ["m2ist", "side-tuning", "referring-expression-comprehension", "visual-grounding", "peft"]
    assert data["pipeline_tag"] == "zero-shot-object-detection"
    assert "datasets" not in data and "model-index" not in data  # nothing measured, nothing claimed
    assert card.data.library_name == "m2ist"
    assert f"https://huggingface.co/{VISION_ID}" in card.text and "@ `aaaaaaaaaaaa`" in card.text
    assert f'from_pretrained("{PLACEHOLDER_REPO_ID}")' in card.text and "<this repo id>" not in card.text
    counts = model.parameter_counts()
    assert f"{counts['side']:,d} parameters" in card.text and f"{counts['head']:,d} parameters" in card.text


def test_measured_results_fill_datasets_and_model_index(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / EVAL_RESULTS_NAME).write_text(json.dumps(RESULTS))
    hub_model().save_pretrained(folder)
    data = metadata(folder / "README.md")
    text = (folder / "README.md").read_text()

    assert data["datasets"] == ["jxu124/refcoco"]
    (index,) = data["model-index"]
    assert index["name"] == "m2ist-adapter"
    found = {(r["dataset"]["split"], m["type"]): (m["value"], m["name"], r["dataset"]["type"], r["task"]["type"])
             for r in index["results"] for m in r["metrics"]}
    assert found == {
        ("val", "accuracy"): (0.8125, "Acc@0.5", "jxu124/refcoco", "zero-shot-object-detection"),
        ("val", "mean_iou"): (0.66, "mIoU", "jxu124/refcoco", "zero-shot-object-detection"),
        ("testA", "accuracy"): (0.75, "Acc@0.5", "jxu124/refcoco", "zero-shot-object-detection"),
        ("testA", "mean_iou"): (0.61, "mIoU", "jxu124/refcoco", "zero-shot-object-detection"),
    }
    assert "| val | 81.25% | 0.6600 | 16 |" in text
    assert "/home/someone" not in text  # results metadata never reaches the card


@pytest.mark.parametrize("text_path", ["./towers/text", "towers/text", "~/towers/text"])
def test_local_tower_paths_never_reach_the_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text_path: str) -> None:
    monkeypatch.chdir(tmp_path)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.vision_model.save_pretrained(tmp_path / "towers" / "vision")
    model.text_model.save_pretrained(tmp_path / "towers" / "text")  # "towers/text" looks like a Hub id, but exists here
    model.config.vision_model_name_or_path = str(tmp_path / "towers" / "vision")
    model.config.text_model_name_or_path = text_path
    model.save_pretrained(tmp_path / "adapter")
    text = (tmp_path / "adapter" / "README.md").read_text()

    assert "base_model" not in metadata(tmp_path / "adapter" / "README.md")
    assert str(tmp_path) not in text and "towers/text" not in text
    assert "a local `vit` model (not on the Hub)" in text


def test_an_existing_card_is_merged_not_replaced(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text(
        "---\nlicense: mit\nlanguage: en\ntags:\n- my-project\ndatasets:\n- my/data\nextra_key: kept\n---\n\n"
        "# My grounding model\n\nTrained by hand-written notes that must survive.\n")
    hub_model().save_pretrained(folder)
    data = metadata(folder / "README.md")
    text = (folder / "README.md").read_text()

    assert data["license"] == "mit" and data["language"] == "en" and data["extra_key"] == "kept"
    assert data["library_name"] == "m2ist" and data["base_model"] == [VISION_ID, TEXT_ID]
    assert data["tags"][0] == "my-project" and "m2ist" in data["tags"]
    assert data["datasets"] == ["my/data"]
    assert "Trained by hand-written notes that must survive." in text
    assert SECTION_START not in text  # a hand-written card keeps its own text only


def test_the_generated_section_is_rewritten_in_place(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    model = hub_model()
    model.save_pretrained(folder)
    card = folder / "README.md"
    card.write_text(card.read_text() + "\n## Notes\n\nMy own notes.\n")
    (folder / EVAL_RESULTS_NAME).write_text(json.dumps(RESULTS))
    model.save_pretrained(folder)
    text = card.read_text()

    assert text.count(SECTION_START) == 1 and text.count(SECTION_END) == 1
    assert "## Evaluation" in text and "My own notes." in text
    assert text.index(SECTION_END) < text.index("My own notes.")
    assert "model-index" in metadata(card)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_files_follow_the_umask_like_plain_writes(tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        hub_model().save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(previous)
    for name in ("m2ist_model.safetensors", "README.md"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == mode, name


def test_push_names_the_repo_and_keeps_the_card_on_the_hub(hub: LocalHub, tmp_path: Path) -> None:
    model = hub_model()
    model.push_to_hub("org/first", endpoint=hub.url)
    card = hub.files("org/first")["README.md"].decode()
    assert 'from_pretrained("org/first")' in card and PLACEHOLDER_REPO_ID not in card

    edited = card.replace(SECTION_START, f"Written on the Hub by the owner.\n\n{SECTION_START}")
    edited = edited.replace("license: apache-2.0", "license: cc-by-4.0")
    hub.add_commit("org/first", {**hub.files("org/first"), "README.md": edited.encode()}, title="edit the card")
    model.push_to_hub("org/first", endpoint=hub.url)
    again = hub.files("org/first")["README.md"].decode()
    assert "Written on the Hub by the owner." in again and "license: cc-by-4.0" in again
    assert again.count(SECTION_START) == 1

    model.save_pretrained(tmp_path / "local")  # saved first, pushed later: the placeholder becomes the repo id
    assert PLACEHOLDER_REPO_ID in (tmp_path / "local" / "README.md").read_text()
    push_folder_to_hub(tmp_path / "local", "org/second", endpoint=hub.url)
    assert 'from_pretrained("org/second")' in hub.files("org/second")["README.md"].decode()


def test_pushing_a_training_output_uploads_only_the_adapter(hub: LocalHub, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hub_model().save_pretrained(out)
    make_processor(out)  # the tokenizer files
    for junk in ("optimizer.pt", "scheduler.pt", "training_args.bin", "trainer_state.json", "rng_state.pth",
                 "checkpoint-5/m2ist_model.safetensors", "checkpoint-5/optimizer.pt", "runs/events.out.tfevents"):
        (out / junk).parent.mkdir(parents=True, exist_ok=True)
        (out / junk).write_bytes(b"x")

    push_folder_to_hub(out, "org/run", endpoint=hub.url)
    pushed = set(hub.files("org/run")) - {".gitattributes"}
    assert {"README.md", "m2ist_config.json", "m2ist_model.safetensors", "vocab.txt"} <= pushed
    assert pushed == {p.name for p in out.iterdir() if p.is_file()} - {"optimizer.pt", "scheduler.pt",
                                                                      "training_args.bin", "trainer_state.json",
                                                                      "rng_state.pth"}
    assert not any(name.endswith((".pt", ".bin", ".pth")) or "checkpoint" in name for name in pushed)
    everything = push_folder_to_hub(out, "org/everything", endpoint=hub.url, allow_patterns=None, ignore_patterns=None)
    assert everything and "optimizer.pt" in hub.files("org/everything")


def test_trainer_card_and_push(hub: LocalHub, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.config.vision_model_name_or_path, model.config.text_model_name_or_path = VISION_ID, TEXT_ID
    processor = make_processor(tmp_path / "tokenizer")
    args = RECTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                                max_steps=2, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2,
                                save_strategy="steps", save_steps=2, hub_model_id="org/trained")
    trainer = train_rec(model, processor, make_dataset(8, seed=0), {"val": make_dataset(4, seed=1)}, args)
    measured = [entry for entry in trainer.state.log_history if "eval_val_acc@0.5" in entry][-1]

    url = trainer.push_to_hub(endpoint=hub.url, dataset_tags="jxu124/refcoco", tags=["my-run"])
    assert url.startswith(f"{hub.url}/org/trained/commit/")
    files = hub.files("org/trained")
    assert not {"training_args.bin", "trainer_state.json"} & set(files)
    assert not any(name.startswith("checkpoint-") for name in files)
    card = files["README.md"].decode()
    data = yaml.safe_load(card.split("---\n")[1])
    assert data["library_name"] == "m2ist" and data["base_model"] == [VISION_ID, TEXT_ID]
    assert data["datasets"] == ["jxu124/refcoco"] and "my-run" in data["tags"]
    assert "transformers" not in data.get("library_name", "") and "trained from scratch" not in card
    metrics = {m["type"]: m["value"] for r in data["model-index"][0]["results"] for m in r["metrics"]}
    assert metrics == {"accuracy": round(measured["eval_val_acc@0.5"], 4), "mean_iou": round(measured["eval_val_miou"], 4)}
    assert 'from_pretrained("org/trained")' in card
    assert json.loads((tmp_path / "out" / EVAL_RESULTS_NAME).read_text())["metrics"]["val"]["miou"] == \
        measured["eval_val_miou"]


LIVE_PUSH = r"""
import sys
import torch
from m2ist import get_side_tuned_model
from m2ist.trainer import RECTrainingArguments, train_rec
from tests.ddp_worker import make_dataset, make_processor
from tests.tiny import text_tower, tiny_config, vision_tower

out = sys.argv[1]
torch.manual_seed(0)
model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
args = RECTrainingArguments(output_dir=out, use_cpu=True, report_to="none", disable_tqdm=True, max_steps=2,
                            per_device_train_batch_size=4, save_strategy="steps", save_steps=1, push_to_hub=True,
                            hub_model_id="org/live", hub_strategy="every_save")
from pathlib import Path
trainer = train_rec(model, make_processor(Path(out + "-tokenizer")), make_dataset(8, seed=0), None, args)
trainer._finish_current_push()
"""


def test_pushes_during_training_carry_the_adapter_only(hub: LocalHub, tmp_path: Path) -> None:
    import subprocess
    import sys

    repo_root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf_home"), PYTHONPATH=str(repo_root), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", LIVE_PUSH, str(tmp_path / "out")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    files = set(hub.files("org/live"))
    assert {"m2ist_config.json", "m2ist_model.safetensors", "README.md", "processor_config.json"} <= files
    assert not {"training_args.bin", "trainer_state.json", "optimizer.pt"} & files
    assert yaml.safe_load(hub.files("org/live")["README.md"].decode().split("---\n")[1])["library_name"] == "m2ist"
    assert any(commit.title.startswith("Training in progress, step") for commit in hub.repo("org/live").commits.values())
