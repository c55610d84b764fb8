"""Hostile and careless use: every fault gets a clear one-line error or a safe outcome, nothing is lost or silent.

Cases by area (issue 12): config values, weights files, whole-folder saves (concurrent savers, a save dying
half-way, ``ulimit -f``), training (divergence, empty schedules, resume checks and fallback, ``save_strategy='best'``
without eval data), data loaders (non-regular files, image-root containment, encodings, damaged annotation files,
truncated images under ``skip_invalid``), evaluation ground truth, the Hub, and the command line (one line on
stderr, a non-zero exit, ``predict`` never printing non-JSON). Subprocesses only where concurrency or a process
limit is the point.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import struct
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel

from m2ist import M2ISTConfig, SideTunedModel, evaluate, get_side_tuned_model
from m2ist.cli import main
from m2ist.data.dataset import RECDataset, RECDataWarning
from m2ist.data.files import load_coco_style, load_csv, load_jsonl
from m2ist.data.hf import from_hf_dataset
from m2ist.data.images import ImageLoadError, load_image
from m2ist.data.refer import load_refer
from m2ist.data.sample import RECSample
from m2ist.data.transvg import load_transvg_split
from m2ist.hub import push_folder_to_hub
from m2ist.save_and_load import SHA256_KEY, WEIGHTS_NAME, read_safetensors
from m2ist.trainer import NonFiniteTrainingError, train_rec
from tests.ddp_worker import make_dataset, make_model, make_tokenizer
from tests.tiny import cpu_training_args, text_tower, tiny_config, vision_tower

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model()


def build_workspace(root: Path, images: list[Image.Image], rows: list[dict], data_file: str) -> Path:
    """Tiny towers saved like Hub checkpoints in ``root``, an adapter trained on nothing that records them, the
    ``images`` (``img<i>.png``) and ``rows`` in ``data_file`` (JSONL)."""
    from m2ist import RECProcessor

    vision_tower("vit").save_pretrained(root / "vit")
    text_tower("bert").save_pretrained(root / "bert")
    make_tokenizer(root / "bert")
    for index, image in enumerate(images):
        image.save(root / f"img{index}.png")
    (root / data_file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    adapter = get_side_tuned_model(AutoModel.from_pretrained(root / "vit"), AutoModel.from_pretrained(root / "bert"),
                                   tiny_config())
    adapter.processor = RECProcessor.from_pretrained(str(root / "bert"), canvas_size=32, max_query_len=8)
    adapter.save_pretrained(root / "adapter")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """:func:`build_workspace` with four 40x32 images and ``train.jsonl``."""
    images = [Image.new("RGB", (40, 32), (index * 40, 90, 200)) for index in range(4)]
    rows = [{"image": f"img{i}.png", "text": "the red square", "bbox": [5, 5, 15, 15]} for i in range(4)]
    return build_workspace(tmp_path_factory.mktemp("hostile"), images, rows, "train.jsonl")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str, exit_code: int | None = None) -> None:
    """One ``m2ist ...`` line on stderr holding every needle, no traceback, and a failing exit status
    (``exit_code`` when given)."""
    lines = [line for line in err.splitlines() if line.startswith("m2ist ")]
    assert (code == exit_code if exit_code is not None else code != 0), (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


_args = cpu_training_args


# ============================================================================================== config values
@pytest.mark.parametrize(("values", "needle"), [
    ({"adapter_scale": float("nan")}, "adapter_scale=nan is invalid: expected a finite number"),
    ({"side_dropout": "abc"}, "side_dropout='abc' is invalid: expected a number"),
    ({"config_version": "1"}, "config_version='1' is invalid: expected an integer"),
    ({"vision_taps": 5}, "vision_taps=5 is invalid: expected a mapping or null"),
    ({"bottleneck": 1e9}, "bottleneck=1000000000.0 is invalid: expected an integer"),
    ({"bottleneck": 10**9}, "bottleneck=1000000000 is invalid: expected a positive integer (at most 16384)"),
    ({"bottleneck": None}, "bottleneck=None is invalid: expected an integer"),
    ({"fusion_dropout": float("inf")}, "fusion_dropout=inf is invalid: expected a finite number"),
    ({"experts": "vea"}, "experts='vea' is invalid: expected a list of strings"),
    ({"max_query_len": 10**6}, "max_query_len=1000000 is invalid"),
])
def test_every_config_field_is_checked_by_type_range_and_finiteness(values, needle):
    with pytest.raises(ValueError, match=None) as caught:
        M2ISTConfig(**values)
    assert needle in str(caught.value)


def test_a_config_file_with_bad_values_or_bytes_names_the_file_and_field(tmp_path):
    path = tmp_path / "m2ist_config.json"
    path.write_text(json.dumps({"side_dropout": "abc"}))
    with pytest.raises(ValueError, match=rf"{path}: M2ISTConfig.side_dropout='abc'"):
        M2ISTConfig.from_json_file(path)
    path.write_bytes(b'{"bottleneck": 8, "note": "\xff\xfe"}')
    with pytest.raises(ValueError, match=rf"{path} is not UTF-8 text \(byte 0xff"):
        M2ISTConfig.from_json_file(path)


def test_a_non_utf8_cli_config_file_names_the_file_and_line(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes(b"m2ist:\n  bottleneck: 8\n# caf\xe9\n")
    code, _, err = run_cli(capsys, "train", "--config", str(config), "--print-config")
    assert_one_line_error(code, err, f"{config}:3: not UTF-8 text (byte 0xe9)")


def test_a_damaged_processor_file_beside_an_adapter_is_named(workspace, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    for name in ("processor_config.json", "m2ist_processor.json"):  # today's file, then an older adapter's only file
        (adapter / name).write_text("{not json")
        with pytest.raises(ValueError, match=rf"{name}: the processor saved with the adapter cannot be restored"):
            SideTunedModel.from_pretrained(adapter)
        bad = {"canvas_size": "big", "max_query_len": 8}
        if name == "processor_config.json":  # transformers' layout: the image processor's settings nested
            bad = {"image_processor": {"canvas_size": "big", "image_processor_type": "RECImageProcessor"},
                   "max_query_len": 8, "processor_class": "RECProcessor"}
        (adapter / name).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=rf"{name}: the processor saved with the adapter cannot be restored"):
            SideTunedModel.from_pretrained(adapter)
        if name == "processor_config.json":
            (adapter / name).unlink()


def test_cli_set_with_a_nan_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--set", "m2ist.adapter_scale=.nan", "--vision-model", "v",
                           "--text-model", "t", "--data-format", "jsonl", "--box-format", "xyxy", "--train-file",
                           str(tmp_path / "x.jsonl"), "--output-dir", str(tmp_path / "out"))
    assert_one_line_error(code, err, "adapter_scale=nan", "finite")


# ============================================================================================== towers and inputs
def test_wrong_towers_and_sizes_are_named():
    with pytest.raises(ValueError, match=r"vision tower BertModel .*fails on the probe inputs.*is it a vision model\?"):
        get_side_tuned_model(text_tower("bert"), text_tower("bert"), tiny_config())
    with pytest.raises(ValueError, match=r"text tower ViTModel .*fails on the probe inputs.*is it a text model\?"):
        get_side_tuned_model(vision_tower("vit"), vision_tower("vit"), tiny_config())
    with pytest.raises(ValueError, match=r"max_query_len=1000 exceeds the text tower's 512 positions"):
        get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config(max_query_len=1000))


def test_out_of_vocabulary_ids_and_empty_batches_are_refused(model):
    pixels = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"outside the text tower's vocabulary \(0\.\.99; got 5\.\.500\)"):
        model(pixels, torch.tensor([[5, 500], [5, 6]]))
    with pytest.raises(ValueError, match="Empty batch"):
        model(pixels[:0], torch.zeros(0, 4, dtype=torch.long))


# ============================================================================================== weights files
def test_flipped_bytes_in_the_tensor_data_are_caught_by_the_sha256(model, tmp_path):
    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor; the header stays intact
    path.write_bytes(bytes(data))
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    with pytest.raises(ValueError, match=r"is damaged: its tensor data does not match the SHA-256"):
        SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)
    assert all(torch.equal(v, before[k]) for k, v in model.trainable_state_dict().items())


def test_swapped_tensor_names_are_caught_by_the_layout_sha256(model, tmp_path):
    """Two tensors of one dtype and shape trading names leave the data's digest intact; the layout's catches it."""
    model.save_pretrained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    by_kind: dict[str, list[str]] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            by_kind.setdefault(f"{entry['dtype']}{entry['shape']}", []).append(name)
    first, second = next(names for names in by_kind.values() if len(names) > 1)[:2]
    header[first]["data_offsets"], header[second]["data_offsets"] = (header[second]["data_offsets"],
                                                                      header[first]["data_offsets"])
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(blob[:8] + text.ljust(length) + blob[8 + length:])  # same length: padded with spaces
    with pytest.raises(ValueError, match=r"is damaged: its tensors' names, dtypes or shapes do not match"):
        SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)


def test_weights_are_checked_for_dtype_and_finiteness(model, tmp_path):
    model.save_pretrained(tmp_path)
    state = read_safetensors(tmp_path / WEIGHTS_NAME)
    first = sorted(state)[0]
    save_file({**state, first: state[first].double()}, str(tmp_path / WEIGHTS_NAME))  # no silent casts
    with pytest.raises(ValueError, match=rf"dtype mismatches: {first}: file torch.float64 vs model torch.float32"):
        SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)
    state[first] = torch.full_like(state[first], float("nan"))
    save_file(state, str(tmp_path / WEIGHTS_NAME))  # written by hand: no hash, NaN inside
    with pytest.raises(ValueError, match=rf"tensor {first} holds .* non-finite value.*diverged"):
        SideTunedModel.from_pretrained(tmp_path, vision_model=model.vision_model, text_model=model.text_model)


def test_non_finite_weights_are_never_saved(tmp_path):
    broken = make_model()
    with torch.no_grad():
        next(iter(broken.trainable_state_dict().values())).fill_(float("inf"))
    with pytest.raises(ValueError, match=r"Refusing to save m2ist_model.safetensors: tensor .* non-finite"):
        broken.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_the_sha256_is_recorded_in_the_metadata(model, tmp_path):
    from safetensors import safe_open

    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as handle:
        assert len(handle.metadata()[SHA256_KEY]) == 64


# ============================================================================================== whole-folder saves
def _complete_adapter(folder: Path) -> int:
    """Load the adapter of ``folder`` strictly (a config of one save beside the weights of another fails); return
    its bottleneck after checking its weights hold that bottleneck's fill value."""
    config = M2ISTConfig.from_json_file(folder / "m2ist_config.json")
    state = read_safetensors(folder / WEIGHTS_NAME)
    assert all(bool((t == config.bottleneck).all()) for t in state.values())
    return config.bottleneck


def _snapshot(folder: Path) -> tuple[int, set[float]]:
    """The bottleneck in the config and the values in the weights, both read from one directory (through a
    directory descriptor: a swap between the two reads cannot mix two folders)."""
    from safetensors.torch import load as load_bytes

    descriptor = os.open(folder, os.O_RDONLY)
    try:
        def opener(name, flags):
            return os.open(name, flags, dir_fd=descriptor)

        with open("m2ist_config.json", encoding="utf-8", opener=opener) as handle:
            bottleneck = json.load(handle)["bottleneck"]
        with open(WEIGHTS_NAME, "rb", opener=opener) as handle:
            tensors = load_bytes(handle.read())
    finally:
        os.close(descriptor)
    return bottleneck, {float(v) for t in tensors.values() for v in t.unique().tolist()}


def _save_repeatedly(model, folder: str, count: int, barrier, times) -> None:
    barrier.wait(timeout=60)  # both savers start together
    began = time.time()
    for _ in range(count):
        model.save_pretrained(folder)
    times.put((began, time.time()))


def test_two_concurrent_savers_leave_one_complete_adapter(tmp_path):
    """Two processes (forked here, so nothing is imported twice; ``python tests/hostile_worker.py save-loop`` runs
    the same in fresh interpreters) save adapters of different shapes into one folder 40 times each, at once."""
    import multiprocessing

    folder = tmp_path / "shared"
    (folder / "checkpoint-1").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    models = []
    for bottleneck in (8, 16):
        model = make_model(bottleneck=bottleneck)
        with torch.no_grad():
            for tensor in model.trainable_state_dict().values():
                tensor.fill_(float(bottleneck))
        models.append(model)
    context = multiprocessing.get_context("fork")
    barrier, times = context.Barrier(2), context.Queue()
    savers = [context.Process(target=_save_repeatedly, args=(m, str(folder), 40, barrier, times)) for m in models]
    for saver in savers:
        saver.start()
    reads, mixes = 0, []
    while any(saver.is_alive() for saver in savers):  # meanwhile, the folder must always hold one whole adapter
        try:
            bottleneck, values = _snapshot(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue  # the folder we opened was swapped out and removed between two reads
        reads += 1
        if values != {float(bottleneck)}:
            mixes.append((bottleneck, values))
    for saver in savers:
        saver.join(timeout=240)
    assert [saver.exitcode for saver in savers] == [0, 0]
    assert reads > 0 and mixes == [], (reads, mixes[:3])
    windows = [times.get(timeout=5) for _ in savers]
    assert max(w[0] for w in windows) < min(w[1] for w in windows), windows  # the saves did overlap
    assert _complete_adapter(folder) in (8, 16)
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "checkpoint-1").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name != "shared"] == []  # no temporary folders left


def test_a_save_that_fails_half_way_keeps_the_old_adapter(tmp_path, monkeypatch):
    import m2ist.model as model_module

    old = make_model(bottleneck=8)
    with torch.no_grad():
        for tensor in old.trainable_state_dict().values():
            tensor.fill_(8.0)
    old.save_pretrained(tmp_path / "adapter")
    (tmp_path / "adapter" / "checkpoint-3").mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module, "write_model_card", disk_full)  # after config and weights are written
    with pytest.raises(OSError, match="No space left"):
        make_model(bottleneck=16).save_pretrained(tmp_path / "adapter")
    assert _complete_adapter(tmp_path / "adapter") == 8 and (tmp_path / "adapter" / "checkpoint-3").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_save_under_ulimit_f_keeps_the_old_adapter(tmp_path):
    """``ulimit -f`` (RLIMIT_FSIZE, lowered here for this process only while saving): the weights write fails with
    EFBIG, as on a full disk. ``python tests/hostile_worker.py save-limited DIR BYTES`` does the same in a child."""
    import resource

    old = make_model(bottleneck=8)
    with torch.no_grad():
        for tensor in old.trainable_state_dict().values():
            tensor.fill_(8.0)
    old.save_pretrained(tmp_path / "adapter")
    new = make_model(bottleneck=16)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, hard))  # Python ignores SIGXFSZ: the write raises instead
    try:
        with pytest.raises(OSError, match="File too large"):
            new.save_pretrained(tmp_path / "adapter")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert _complete_adapter(tmp_path / "adapter") == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_saving_into_the_working_directory_keeps_it_usable(model, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("kept")
    monkeypatch.chdir(work)
    assert model.save_pretrained(".") == Path(".")
    model.save_pretrained("")  # twice: the second swaps out the folder the process is in
    assert Path.cwd() == work and Path("notes.txt").read_text() == "kept" and Path(WEIGHTS_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_a_new_save_never_keeps_an_older_adapters_processor(model, processor, tmp_path):
    with_processor = make_model()
    with_processor.processor = processor
    with_processor.save_pretrained(tmp_path)
    assert (tmp_path / "m2ist_processor.json").is_file()
    (tmp_path / "my_notes.md").write_text("kept")
    model.save_pretrained(tmp_path)  # no processor: the old one must not pass for this adapter's
    assert not (tmp_path / "m2ist_processor.json").exists() and not (tmp_path / "vocab.txt").exists()
    assert (tmp_path / "my_notes.md").read_text() == "kept"


# ============================================================================================== training
def test_a_diverged_run_stops_naming_the_step_and_saves_nothing(processor, tmp_path):
    args = _args(tmp_path / "run", learning_rate=1e6, side_learning_rate=1e6, max_steps=8, save_strategy="steps",
                 save_steps=1)
    with pytest.raises(NonFiniteTrainingError, match=r"Training diverged (at|by) step \d+"):
        train_rec(make_model(), processor, make_dataset(8, seed=1), args=args)
    for weights in (tmp_path / "run").rglob(WEIGHTS_NAME):  # every checkpoint written holds finite weights
        assert all(bool(torch.isfinite(t).all()) for t in read_safetensors(weights).values())


def test_a_non_finite_gradient_under_a_finite_loss_is_named(processor, tmp_path):
    model = make_model()
    name, parameter = next((n, p) for n, p in model.named_parameters() if n.startswith("head.") and p.requires_grad)
    parameter.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(NonFiniteTrainingError, match=rf"step 1: the gradient of {re.escape(name)} is not finite"):
        train_rec(model, processor, make_dataset(4, seed=1), args=_args(tmp_path / "run", max_steps=2))


def test_non_finite_labels_or_pixels_are_named(tmp_path):
    """A user's own collator (the processor refuses non-finite boxes itself) handing inf labels or NaN pixels."""
    from m2ist.trainer import RECTrainer
    from tests.conftest import make_batch

    for key in ("labels", "pixel_values"):
        def collate(items, key=key):
            batch = make_batch(len(items))
            batch[key].view(-1)[0] = float("inf") if key == "labels" else float("nan")
            return batch

        trainer = RECTrainer(model=make_model(), args=_args(tmp_path / key, max_steps=2), data_collator=collate,
                             train_dataset=list(range(4)))
        # NaN pixels are refused by the model's input check, before the loss could turn NaN
        expected = ((NonFiniteTrainingError, rf"step 1: .*batch's {key} hold non-finite values") if key == "labels"
                    else (ValueError, r"pixel_values\[0\] hold NaN or infinite values"))
        with pytest.raises(expected[0], match=expected[1]):
            trainer.train()


def test_an_augmentation_without_a_seed_follows_the_training_seed(processor, tmp_path):
    """Without a seed of its own the augmentation drew from the OS in the main process: two runs with one training
    seed trained differently. It now takes the training seed."""
    from m2ist.data.transforms import RECAugmentation
    from m2ist.trainer import trainable_tensors

    weights = []
    for run in ("a", "b"):
        model = make_model()
        train_rec(model, processor._with(augment=RECAugmentation(seed=None)), make_dataset(8, seed=1),
                  args=_args(tmp_path / run, max_steps=3, dataloader_num_workers=0))
        weights.append(trainable_tensors(model))
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_a_training_set_smaller_than_one_dropped_batch_is_refused(processor, tmp_path):
    with pytest.raises(ValueError, match=r"fewer than one batch .* dataloader_drop_last=True drops"):
        train_rec(make_model(), processor, make_dataset(3, seed=1),
                  args=_args(tmp_path, max_steps=1, per_device_train_batch_size=4, dataloader_drop_last=True))


def test_resuming_with_another_cache_dtype_is_a_difference(processor, tmp_path):
    """A float32 cache gives the uncached run's weights and a bfloat16 one does not: a resume that switches is named."""
    run = tmp_path / "run"
    train_rec(make_model(), processor, make_dataset(8, seed=1),
              args=_args(run, max_steps=1, save_strategy="steps", save_steps=1, tower_cache="memory",
                         tower_cache_dtype="float32"))
    args = _args(run, max_steps=2, tower_cache="memory", tower_cache_dtype="bfloat16")
    with pytest.raises(ValueError, match="tower_cache_dtype: checkpoint 'float32', now 'bfloat16'"):
        train_rec(make_model(), processor, make_dataset(8, seed=1), args=args, resume_from_checkpoint=True)


@pytest.mark.parametrize(("epochs", "steps"), [(0, -1), (-1, -1), (0, 0), (float("nan"), -1)])
def test_empty_schedules_are_refused(tmp_path, epochs, steps):
    with pytest.raises(ValueError, match=r"trains nothing|must be a finite number"):
        _args(tmp_path, num_train_epochs=epochs, max_steps=steps)


def test_an_empty_training_set_and_best_without_eval_data_are_refused(processor, tmp_path):
    with pytest.raises(ValueError, match="training set is empty"):
        train_rec(make_model(), processor, [], args=_args(tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"save_strategy='best'.*no evaluation data"):
        train_rec(make_model(), processor, make_dataset(4, seed=1),
                  args=_args(tmp_path, max_steps=1, save_strategy="best", eval_strategy="steps", eval_steps=1,
                             metric_for_best_model="acc@0.5"))


@pytest.fixture(scope="module")
def checkpoints(processor, tmp_path_factory) -> Path:
    """A run of 3 steps with a checkpoint after each."""
    output = tmp_path_factory.mktemp("resume") / "run"
    train_rec(make_model(), processor, make_dataset(8, seed=1),
              args=_args(output, max_steps=3, save_strategy="steps", save_steps=1, per_device_train_batch_size=4))
    return output


def test_resume_refuses_another_runs_checkpoint_and_names_the_differences(processor, checkpoints):
    for change, needle in (({"learning_rate": 1e-2}, "learning_rate: checkpoint 0.001, now 0.01"),
                           ({"seed": 5}, "seed: checkpoint 0, now 5"),
                           ({"per_device_train_batch_size": 2}, "per_device_train_batch_size: checkpoint 4, now 2")):
        args = _args(checkpoints, max_steps=3, save_strategy="steps", save_steps=1, **change)
        with pytest.raises(ValueError, match="was written by another run") as caught:
            train_rec(make_model(), processor, make_dataset(8, seed=1), args=args, resume_from_checkpoint=True)
        assert needle in str(caught.value) and "resume_allow_changes" in str(caught.value)
    with pytest.raises(ValueError, match=r"train_samples: checkpoint 8, now 4"):
        train_rec(make_model(), processor, make_dataset(4, seed=1), resume_from_checkpoint=True,
                  args=_args(checkpoints, max_steps=3, save_strategy="steps", save_steps=1))
    with pytest.raises(ValueError, match=r"\(m2ist_config\.bottleneck: checkpoint 8, now 16\)"):  # the field, not the dict
        train_rec(make_model(bottleneck=16), processor, make_dataset(8, seed=1), resume_from_checkpoint=True,
                  args=_args(checkpoints, max_steps=3, save_strategy="steps", save_steps=1))


def test_resume_falls_back_to_the_latest_complete_checkpoint(processor, checkpoints, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoints, run)
    (run / "checkpoint-3" / "trainer_state.json").unlink()  # killed before the last file of the checkpoint
    optimizer = run / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # killed (or ulimit -f) while writing the optimizer
    args = _args(run, max_steps=4, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        trainer = train_rec(make_model(), processor, make_dataset(8, seed=1), args=args, resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    assert "checkpoint-3 (no trainer_state.json)" in caplog.text
    assert "checkpoint-2 (optimizer.pt truncated or damaged)" in caplog.text and "resuming from" in caplog.text
    with pytest.raises(ValueError, match=r"checkpoint-3 is incomplete \(no trainer_state.json\)"):
        train_rec(make_model(), processor, make_dataset(8, seed=1), args=args,
                  resume_from_checkpoint=str(run / "checkpoint-3"))


def test_resume_accepts_changes_when_asked(processor, checkpoints, tmp_path, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpoints, run)
    args = _args(run, max_steps=4, seed=5, resume_allow_changes=True)
    with caplog.at_level(logging.WARNING, logger="m2ist.trainer"):
        trainer = train_rec(make_model(), processor, make_dataset(8, seed=1), args=args, resume_from_checkpoint=True)
    assert trainer.state.global_step == 4 and "seed: checkpoint 0, now 5" in caplog.text
    # what the checkpoint's optimizer and scheduler states restore cannot change: refused, never silently unused
    args = _args(run, max_steps=5, learning_rate=1e-2, weight_decay=0.5, resume_allow_changes=True)
    with pytest.raises(ValueError, match=r"cannot resume with another learning_rate, weight_decay, even with"):
        train_rec(make_model(), processor, make_dataset(8, seed=1), args=args, resume_from_checkpoint=True)


def test_final_save_into_an_output_dir_with_checkpoints_keeps_them(checkpoints):
    names = {p.name for p in checkpoints.iterdir()}
    assert {"checkpoint-1", "checkpoint-2", "checkpoint-3"} <= names  # train_rec's folder holds the checkpoints
    run_settings = json.loads((checkpoints / "checkpoint-3" / "m2ist_run.json").read_text())
    assert run_settings["learning_rate"] == 1e-3 and run_settings["train_samples"] == 8


# ============================================================================================== data
def test_images_that_are_not_regular_files_are_refused_at_once(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ImageLoadError, match=r"not a regular file|directory"):
            load_image(path)
        with pytest.raises(ImageLoadError, match=r"Sample 0 .*(not a regular file|directory)"):
            RECDataset([RECSample(image=str(path), expression="x", box=(0, 0, 1, 1))])


@pytest.mark.filterwarnings("ignore:None of the first")
def test_image_paths_are_contained_to_the_image_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"image": "../../etc/passwd", "text": "x", "bbox": [0, 0, 1, 1]}) + "\n")
    with pytest.raises(ValueError, match=r"a.jsonl:1: the image path '../../etc/passwd' leads outside the image root"):
        load_jsonl(jsonl, "xyxy", image_root=root)
    assert load_jsonl(jsonl, "xyxy", image_root=root, allow_outside_image_root=True)[0].image.endswith("passwd")
    csv_file = tmp_path / "a.csv"
    csv_file.write_text("image,text,bbox\n/etc/passwd,x,\"[0, 0, 1, 1]\"\n")
    with pytest.raises(ValueError, match=r"a.csv:2: the image path '/etc/passwd' leads outside"):
        load_csv(csv_file, "xyxy", image_root=root)
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "../x.jpg"}],
                                "annotations": [{"id": 1, "image_id": 1, "bbox": [0, 0, 1, 1], "text": "x"}]}))
    with pytest.raises(ValueError, match=r"annotations\[0\]: the image path '../x.jpg' leads outside"):
        load_coco_style(coco, image_root=root)
    with pytest.raises(ValueError, match=r"'../../x.jpg'.* leads outside"):
        from_hf_dataset([{"image_path": "../../x.jpg", "sentences": ["x"], "bbox": [0, 0, 1, 1]}], image_root=root)
    transvg = tmp_path / "unc_train.pth"
    torch.save([("../../etc/x.jpg", "m.png", [0, 0, 1, 1], "x", [])], transvg)
    with pytest.raises(ValueError, match=r"unc_train.pth row 0: the image path '../../etc/x.jpg' leads outside"):
        load_transvg_split(transvg, image_root=root)


def test_annotation_files_that_are_not_utf8_name_the_line(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b'{"image": "a.png", "text": "x", "bbox": [0, 0, 1, 1]}\n{"image": "\xff.png"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2: not utf-8 text \(byte 0xff"):
        load_jsonl(jsonl, "xyxy")
    csv_file = tmp_path / "a.csv"
    csv_file.write_bytes(b"image,text,bbox\na.png,\xe9t\xe9,\"[0,0,1,1]\"\n")
    with pytest.raises(ValueError, match=r"a.csv:2: not utf-8 text"):
        load_csv(csv_file, "xyxy")
    with pytest.raises(ValueError, match=r"is not a regular file|is a folder"):
        load_jsonl(tmp_path, "xyxy")


def _refer_root(tmp_path: Path, refs: bytes, instances: str | None = None) -> Path:
    folder = tmp_path / "refcoco"
    folder.mkdir(exist_ok=True)
    (folder / "refs(unc).p").write_bytes(refs)
    default = {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "bbox": [0, 0, 2, 2]}]}
    (folder / "instances.json").write_text(instances if instances is not None else json.dumps(default))
    return tmp_path


def test_damaged_refer_files_name_the_file_and_record(tmp_path):
    good = [{"ref_id": 1, "ann_id": 5, "image_id": 1, "split": "train", "sentences": [{"sent": "x"}]}]
    with pytest.raises(ValueError, match=r"refs\(unc\).p ref 0: expected a dict"):
        load_refer(_refer_root(tmp_path, pickle.dumps(["a", "b"])))
    with pytest.raises(ValueError, match=r"refs\(unc\).p is empty"):
        load_refer(_refer_root(tmp_path, b""))
    with pytest.raises(ValueError, match=r"refs\(unc\).p is truncated or not a pickle"):
        load_refer(_refer_root(tmp_path, pickle.dumps(good)[:20]))
    with pytest.raises(ValueError, match=r"instances.json:1: not valid JSON"):
        load_refer(_refer_root(tmp_path, pickle.dumps(good), "{not json"))
    with pytest.raises(ValueError, match=r"instances.json annotations\[0\]: no 'id'"):
        load_refer(_refer_root(tmp_path, pickle.dumps(good), json.dumps({"images": [], "annotations": [{"bbox": [1]}]})))
    with pytest.raises(ValueError, match=r"leads outside the image root"):
        load_refer(_refer_root(tmp_path, pickle.dumps(good), json.dumps(
            {"images": [{"id": 1, "file_name": "../../../x.jpg"}], "annotations": [{"id": 5, "bbox": [0, 0, 2, 2]}]})))
    assert len(load_refer(_refer_root(tmp_path, pickle.dumps(good)))) == 1


def test_damaged_transvg_and_coco_files_are_named(tmp_path):
    garbage = tmp_path / "unc_val.pth"
    garbage.write_bytes(os.urandom(256).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    with pytest.raises(ValueError, match=r"unc_val.pth is not a torch.save file"):
        load_transvg_split(garbage)
    truncated = tmp_path / "unc_test.pth"
    torch.save([("a.jpg", "m.png", [0, 0, 1, 1], "x", [])], truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"unc_test.pth is (truncated or corrupted|not a)"):
        load_transvg_split(truncated)
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"file_name": "a.jpg"}], "annotations": []}))
    with pytest.raises(ValueError, match=r"coco.json images\[0\]: no 'id'"):
        load_coco_style(coco)
    coco.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="needs top-level 'images' and 'annotations' lists"):
        load_coco_style(coco)


def test_corrupt_image_bytes_in_hf_rows_name_the_row():
    """Rows stay lazy (decoded when used): the error comes when the image is read, and names the row."""
    rows = [{"image": {"bytes": b"not an image"}, "text": "x", "bbox": [0, 0, 1, 1]}]
    samples = from_hf_dataset(rows, "xyxy")
    with pytest.raises(ImageLoadError, match=r"row 0, column 'image': the image bytes \(12 bytes\) cannot be decoded"
                       ) as caught:
        load_image(samples[0].image)
    assert "BytesIO" not in str(caught.value)
    with pytest.warns(RECDataWarning, match="row 0"):  # skip_invalid decodes table rows too, and names the row
        assert len(RECDataset([*samples, replace(samples[0], image=Image.new("RGB", (4, 4)))], skip_invalid=True)) == 1


def test_skip_invalid_decodes_in_full_and_skips_truncated_images(tmp_path):
    good, cut = tmp_path / "good.png", tmp_path / "cut.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good)
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "PNG")
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # header intact, pixels cut
    samples = [RECSample(image=str(p), expression="x", box=(1, 1, 20, 20)) for p in (good, cut)]
    with pytest.warns(UserWarning, match="Skipped 1 of 2 samples"):
        dataset = RECDataset(samples, skip_invalid=True)
    assert len(dataset) == 1 and dataset[0]["image"].size == (40, 40)


# ============================================================================================== evaluation
@pytest.mark.parametrize(("box", "needle"), [
    ((30, 5, 10, 20), "x1 < x0"),
    ((10, 10, 10, 20), "zero area"),
    ((500, 500, 600, 600), "outside the 40x32 image"),
    ((0.1, 0.1, 0.5, 0.5), "looks normalised"),
    ((float("nan"), 1, 5, 5), "non-finite"),
])
def test_evaluate_refuses_malformed_ground_truth_naming_the_sample(model, processor, tmp_path, box, needle):
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 32)).save(image)
    samples = [RECSample(image=str(image), expression="the red square", box=(1, 1, 20, 20), image_id="ok"),
               RECSample(image=str(image), expression="the red square", box=box, image_id="bad")]
    with pytest.raises(ValueError, match=r"Split 'val', sample 1 \(image_id='bad'\): the ground-truth box") as caught:
        evaluate(model, processor, {"val": samples}, progress=False)
    assert needle in str(caught.value)


# ============================================================================================== the Hub
def test_a_push_to_an_unreachable_hub_is_one_connection_error(tmp_path):
    (tmp_path / "m2ist_config.json").write_text("{}")
    with pytest.raises(ConnectionError, match=r"Cannot reach the Hub at http://127.0.0.1:9 to push 'me/x'"):
        push_folder_to_hub(tmp_path, "me/x", endpoint="http://127.0.0.1:9", token="t")


def test_tower_names_recorded_in_an_adapter_are_explained(workspace, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 at import: no retries

    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    config = json.loads((adapter / "m2ist_config.json").read_text())
    (adapter / "m2ist_config.json").write_text(json.dumps({**config, "vision_model_name_or_path": "../../etc"}))
    with pytest.raises(OSError, match=r"records the vision tower '../../etc' \(a local path, resolved against the "
                                      r"working directory .*\).*vision_model="):
        SideTunedModel.from_pretrained(adapter)
    (adapter / "m2ist_config.json").write_text(json.dumps({**config, "vision_model_name_or_path": "nobody/tower"}))
    with pytest.raises(OSError, match=r"'nobody/tower' \(a Hub id and offline mode is on"):
        SideTunedModel.from_pretrained(adapter, local_files_only=True)


# ============================================================================================== the command line
def test_cli_train_errors_are_one_line(workspace, capsys, tmp_path):
    base = ["train", "--vision-model", str(workspace / "vit"), "--text-model", str(workspace / "bert"),
            "--data-format", "jsonl", "--box-format", "xyxy", "--train-file", str(workspace / "train.jsonl"),
            "--output-dir", str(tmp_path / "out"), "--set", "training.use_cpu=true"]
    for flags, needles in ((["--epochs", "0"], ["trains nothing"]), (["--epochs", "-1"], ["trains nothing"]),
                           (["--save-strategy", "best"], ["save_strategy='best'", "no evaluation data"])):
        code, _, err = run_cli(capsys, *base, *flags)
        assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()
    code, _, err = run_cli(capsys, *[a if a != str(workspace / "vit") else "./missing_dir" for a in base])
    assert_one_line_error(code, err, "vision tower './missing_dir'", "no local folder")


def test_cli_predict_never_prints_non_json(workspace, capsys, monkeypatch):
    image = str(workspace / "img0.png")
    code, out, err = run_cli(capsys, "predict", "--adapter", str(workspace / "adapter"), "--image", image, "--text",
                             "the red square")
    assert code == 0 and json.loads(out)[0]["box_xyxy"], err
    import m2ist.inference

    monkeypatch.setattr(m2ist.inference, "predict_boxes", lambda *a, **k: torch.full((1, 4), float("nan")))
    code, out, err = run_cli(capsys, "predict", "--adapter", str(workspace / "adapter"), "--image", image, "--text",
                             "the red square")
    assert out == "" and code != 0
    assert_one_line_error(code, err, "non-finite box", "diverged")
    code, out, err = run_cli(capsys, "predict", "--adapter", str(workspace / "adapter"), "--image", image, "--text",
                             b"caf\xe9".decode("utf-8", "surrogateescape"))
    assert out == ""
    assert_one_line_error(code, err, "--text phrase 1", "not valid UTF-8")


def test_cli_refuses_an_adapter_with_nan_weights(workspace, capsys, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(workspace / "adapter", adapter)
    state = read_safetensors(adapter / WEIGHTS_NAME)
    save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(adapter / WEIGHTS_NAME))
    code, out, err = run_cli(capsys, "predict", "--adapter", str(adapter), "--image", str(workspace / "img0.png"),
                             "--text", "x")
    assert out == ""
    assert_one_line_error(code, err, "non-finite", "nothing was loaded")


def test_cli_unexpected_errors_are_one_line_with_exit_1(capsys, monkeypatch):
    import importlib

    main_module = importlib.import_module("m2ist.cli.main")

    def boom(settings, args):
        raise KeyError("surprise\nsecond line")

    monkeypatch.setitem(main_module.COMMANDS, "predict", boom)
    code, _, err = run_cli(capsys, "predict", "--adapter", "x/y", "--image", "a.png", "--text", "t")
    assert code == 1
    assert_one_line_error(code, err, "unexpected error: KeyError", "surprise")


def test_hostile_helpers_are_not_tautologies(tmp_path):
    """The checks above can fail: a mixed folder (config of one adapter, weights of another) is caught."""
    make_model(bottleneck=8).save_pretrained(tmp_path / "a")
    other = make_model(bottleneck=16)
    with torch.no_grad():
        for tensor in other.trainable_state_dict().values():
            tensor.fill_(16.0)
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "m2ist_config.json").write_bytes((tmp_path / "a" / "m2ist_config.json").read_bytes())
    with pytest.raises(AssertionError):
        _complete_adapter(tmp_path / "b")
    assert zipfile.is_zipfile(__file__) is False
