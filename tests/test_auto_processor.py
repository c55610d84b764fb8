"""RECProcessor as a transformers processor: the same numbers as before, AutoProcessor / AutoImageProcessor find
it in an adapter folder, old folders still load, and images come as paths, URLs, data URIs, PIL, arrays, tensors."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from einops import rearrange
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, ProcessorMixin

from m2ist import RECProcessor, SideTunedModel, get_side_tuned_model
from m2ist.data.images import ImageLoadError, load_image
from m2ist.data.transforms import RECAugmentation, resize_long_side
from m2ist.processing import RECImageProcessor, boxes_to_labels
from tests.ddp_worker import make_tokenizer
from tests.tiny import text_tower, tiny_config, vision_tower

REPO_ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)


def picture(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def reference(images, texts, boxes, *, tokenizer, canvas, max_len, augment=None, rng=None) -> dict[str, torch.Tensor]:
    """The batch m2ist's processor made before it became a ProcessorMixin (the same code, inlined)."""
    pixel_values = torch.zeros((len(texts), 3, canvas, canvas))
    pixel_mask = torch.zeros((len(texts), canvas, canvas), dtype=torch.long)
    geometry = torch.zeros((len(texts), 6))
    multiplier = torch.tensor([1.0 / (255.0 * s) for s in STD])[:, None, None]
    shift = torch.tensor([-m / s for m, s in zip(MEAN, STD)])[:, None, None]
    final = []
    for index, (image, text) in enumerate(zip(images, texts)):
        image = load_image(image)
        width, height = image.size
        if augment is not None:
            sample = augment(image, text, [float(v) for v in boxes[index]], canvas, rng=rng)
            image, text, (offset_x, offset_y) = sample.image, sample.text, sample.offset
            geometry[index] = torch.tensor((width, height, *sample.scale, *sample.translation))
        else:
            image, scale_x, scale_y = resize_long_side(image, canvas)
            offset_x, offset_y = (canvas - image.width) // 2, (canvas - image.height) // 2
            geometry[index] = torch.tensor((width, height, scale_x, scale_y, offset_x, offset_y))
        pixels = rearrange(torch.from_numpy(np.array(image, dtype=np.uint8)), "h w c -> c h w")
        window = (slice(offset_y, offset_y + image.height), slice(offset_x, offset_x + image.width))
        torch.addcmul(shift, pixels, multiplier, out=pixel_values[index, :, window[0], window[1]])
        pixel_mask[index, window[0], window[1]] = 1
        final.append(text.lower())
    tokens = tokenizer(final, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    labels = boxes_to_labels(torch.tensor(boxes, dtype=torch.float64), geometry, canvas).float()
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"], "image_geometry": geometry, "labels": labels}


@pytest.fixture
def tokenizer(tmp_path: Path):
    return make_tokenizer(tmp_path / "tokenizer")


def test_outputs_are_identical_to_the_previous_processor(tokenizer) -> None:
    images = [picture(30, 40, 0), picture(64, 20, 1, "RGBA"), picture(17, 17, 2).convert("L")]
    texts, boxes = ["The RED square", "blue square", "red"], [(1, 2, 20, 30), (0, 0, 64, 20), (3, 3, 9, 12)]
    processor = RECProcessor(tokenizer, image_mean=MEAN, image_std=STD, canvas_size=48, max_query_len=8)
    expected = reference(images, texts, boxes, tokenizer=tokenizer, canvas=48, max_len=8)
    got = processor(images, texts, boxes)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    augment = RECAugmentation(seed=3)
    augmenting = RECProcessor(tokenizer, image_mean=MEAN, image_std=STD, canvas_size=48, max_query_len=8,
                              augment=augment)
    got = augmenting(images, texts, boxes, train=True, rng=random.Random(7))
    expected = reference(images, texts, boxes, tokenizer=tokenizer, canvas=48, max_len=8,
                         augment=RECAugmentation(seed=3), rng=random.Random(7))
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    alone = RECImageProcessor(canvas_size=48, image_mean=MEAN, image_std=STD)(images)
    for key in ("pixel_values", "pixel_mask", "image_geometry"):
        assert torch.equal(alone[key], reference(images, texts, boxes, tokenizer=tokenizer, canvas=48, max_len=8)[key])


def test_auto_processor_finds_it_in_an_adapter_folder(tokenizer, tmp_path: Path) -> None:
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.processor = RECProcessor(tokenizer, image_mean=MEAN, image_std=STD, canvas_size=32, max_query_len=8,
                                   augment=RECAugmentation(hflip_p=0.2, seed=5))
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "processor_config.json").read_text())
    assert saved["processor_class"] == "RECProcessor"
    assert saved["image_processor"]["image_processor_type"] == "RECImageProcessor"
    assert saved["image_processor"]["canvas_size"] == 32 and saved["image_processor"]["image_mean"] == list(MEAN)
    assert saved["max_query_len"] == 8 and saved["augment"]["hflip_p"] == 0.2
    assert "auto_map" not in saved  # no remote code: found through the registration done by `import m2ist`
    for name in os.listdir(tmp_path / "adapter"):
        assert "auto_map" not in (tmp_path / "adapter" / name).read_bytes().decode("utf-8", "replace"), name

    auto = AutoProcessor.from_pretrained(tmp_path / "adapter")
    assert type(auto) is RECProcessor and isinstance(auto, ProcessorMixin)
    assert auto.to_dict() == model.processor.to_dict() and auto.augment == model.processor.augment
    assert type(AutoImageProcessor.from_pretrained(tmp_path / "adapter")) is RECImageProcessor
    sample = ([picture(30, 40)], ["red square"], [(1, 2, 20, 30)])
    first, second = model.processor(*sample), auto(*sample)
    assert all(torch.equal(first[key], second[key]) for key in first)

    script = ("import m2ist, json, sys\nfrom transformers import AutoProcessor\n"
              "p = AutoProcessor.from_pretrained(sys.argv[1])\nprint(json.dumps([type(p).__name__, p.canvas_size]))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "adapter")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["RECProcessor", 32]


def test_old_folders_with_m2ist_processor_json_still_load(tokenizer, tmp_path: Path) -> None:
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config())
    model.processor = RECProcessor(tokenizer, image_mean=MEAN, image_std=STD, canvas_size=32, max_query_len=8)
    model.save_pretrained(tmp_path / "adapter")
    old = tmp_path / "adapter"
    (old / "processor_config.json").unlink()  # what m2ist wrote before: tokenizer files + m2ist_processor.json
    config = json.loads((old / "tokenizer_config.json").read_text())
    config.pop("processor_class", None)
    (old / "tokenizer_config.json").write_text(json.dumps(config))

    restored = RECProcessor.from_pretrained(old)
    assert (restored.canvas_size, restored.image_mean, restored.image_std, restored.max_query_len) == (32, MEAN, STD, 8)
    loaded = SideTunedModel.from_pretrained(old, vision_model=model.vision_model, text_model=model.text_model)
    assert loaded.processor is not None and loaded.processor.image_std == STD


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server serving ``tmp_path / "www"``."""
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Files(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def test_every_kind_of_image_gives_the_same_pixels(tokenizer, http_root: tuple[str, Path]) -> None:
    url, root = http_root
    image = picture(24, 18, seed=4)
    image.save(root / "square.png")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    array = np.array(image)
    processor = RECProcessor(tokenizer, canvas_size=32, max_query_len=8)

    kinds = {"path": str(root / "square.png"), "Path": root / "square.png", "url": f"{url}/square.png",
             "data URI": data_uri, "PIL": image, "array": array, "HWC tensor": torch.from_numpy(array),
             "CHW tensor": torch.from_numpy(array).permute(2, 0, 1),
             "CHW float tensor": torch.from_numpy(array).permute(2, 0, 1).float() / 255}
    expected = processor(image, "red")
    for name, source in kinds.items():
        got = processor(source, "red")
        assert torch.allclose(got["pixel_values"], expected["pixel_values"], atol=1e-6), name
        assert torch.equal(got["image_geometry"], expected["image_geometry"]), name

    with pytest.raises(ImageLoadError, match="HTTP 404"):
        processor(f"{url}/missing.png", "red")
    with pytest.raises(ImageLoadError, match="invalid base64"):
        processor("data:image/png;base64,@@@", "red")
    with pytest.raises(ImageLoadError, match="data:image/<type>;base64"):
        processor("data:text/plain,hello", "red")
    (root / "notes.txt").write_text("not an image")
    with pytest.raises(ImageLoadError, match="not an image"):
        processor(f"{url}/notes.txt", "red")


def test_predict_takes_an_image_url(tokenizer, http_root: tuple[str, Path]) -> None:
    url, root = http_root
    image = picture(40, 30, seed=6)
    image.save(root / "scene.png")
    model = get_side_tuned_model(vision_tower("vit"), text_tower("bert"), tiny_config()).eval()
    model.processor = RECProcessor(tokenizer, canvas_size=32, max_query_len=8)

    from_url = model.predict(f"{url}/scene.png", ["red square", "blue square"])
    from_file = model.predict(str(root / "scene.png"), ["red square", "blue square"])
    torch.testing.assert_close(from_url, from_file, rtol=0, atol=0)
    assert from_url.shape == (2, 4)
