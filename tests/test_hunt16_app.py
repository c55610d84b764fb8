"""`m2ist app` as a careless or hostile user meets it: invisible lines, expressions longer than an adapter reads,
an image that is huge only once decoded, an IPv6 --host, one broken adapter among several, and the uploads and
pictures each request leaves on disk."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from tests import test_app
from tests.test_app import HAS_GRADIO, _free_port, needs_gradio, scene

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from m2ist import app as m2ist_app
from m2ist.app import AppInputError, parse_phrases, predict_page, read_image

# the tiny adapter saved with its processor, and the page's models loaded from it: test_app's fixtures
adapter_dir, models = test_app.adapter_dir, test_app.models
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


def test_a_line_that_shows_nothing_is_a_blank_line(models, tmp_path):
    """A pasted zero-width space or a control character on a line of its own failed the request for every adapter
    (the processor refuses such a phrase); it is skipped like a blank line."""
    assert parse_phrases("\u200b\n the red square \n\x00\u200d\n") == ["the red square"]
    with pytest.raises(AppInputError, match="at least one expression"):
        parse_phrases("\u200b\n\u2060 \x07")
    result = predict_page(models, str(scene(tmp_path / "a.png")), "\u200b\nthe red square\n\x00")
    assert result.ok, result.message
    assert len(result.boxes["tiny"]) == 1 and result.table.count("the red square") == 1


def test_a_huge_text_is_refused_before_it_is_split(models, tmp_path):
    """Megabytes of text (the API takes any size) were split line by line first, keeping the one-at-a-time server
    busy for seconds (20 s for 50 MB of short lines); the length is now checked first."""
    with pytest.raises(AppInputError, match=r"The text is 40000 characters long; keep it under 20000"):
        parse_phrases("a\n" * 20_000)
    assert parse_phrases(" \n" * 9_000 + "the red square") == ["the red square"]  # blank lines are still free
    result = predict_page(models, str(scene(tmp_path / "a.png")), "word " * 1_000_000)
    assert result.message.startswith("⚠️ The text is 5000000 characters long") and not result.ok


def test_an_expression_longer_than_the_adapter_reads_is_said_on_the_page(models, tmp_path):
    """The processor keeps the first max_query_len tokens and only logs it, once per process: the page showed a box
    for words it never read. Every request that cuts an expression now says so, naming the expression."""
    image = str(scene(tmp_path / "a.png"))
    long = "the red square on the left of the big blue circle under the star"
    for _ in range(2):  # the second time too (the processor's own warning is shown once per process)
        result = predict_page(models, image, f"the red square\n{long}")
        assert result.ok, result.message
        assert "reads the first 8 tokens" in result.message and "expression 2 (" in result.message
        assert "expression 1 " not in result.message and "expressions" not in result.message.split("ℹ️")[1]
    short = predict_page(models, image, "the red square")
    assert short.ok and "not read" not in short.message


def test_a_huge_image_is_refused_without_decoding_it(tmp_path, monkeypatch):
    """Reading a PNG's EXIF orientation decodes it whole: a small upload of 9000×9000 pixels was decoded before it
    was refused as over the limit (seconds and hundreds of MB per request for an RGB one)."""
    huge = tmp_path / "huge.png"
    Image.new("1", (9000, 9000)).save(huge)  # 81 megapixels: under Pillow's own bomb limit, over the page's

    def never(self, *args, **kwargs):
        raise AssertionError("the pixels were decoded before the size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", never)
    with pytest.raises(AppInputError, match=r"81 megapixels\); the limit is 40"):
        read_image(str(huge))


def test_an_ipv6_host_is_refused_before_any_adapter_loads(monkeypatch, capsys, models):
    """gradio builds http://{host}:{port} unbracketed: `--host ::1` passed the address check, loaded every adapter,
    then failed with a traceback (httpx.InvalidURL) and left the server thread running."""
    from m2ist.cli import main

    def never(*args, **kwargs):
        raise AssertionError("adapters were loaded before the address was checked")

    monkeypatch.setattr(m2ist_app, "load_models", never)
    for host in ("::1", "::", "[::1]"):
        assert main(["app", "--host", host]) == 2
        err = capsys.readouterr().err
        assert err.startswith("m2ist app: error: ") and "is an IPv6 address" in err and "0.0.0.0" in err
    with pytest.raises(ValueError, match="IPv6"):
        m2ist_app.serve(models, host="::1", port=_free_port(), block=False, quiet=True)


def test_one_broken_adapter_among_several_is_named(adapter_dir, tmp_path, monkeypatch, capsys):
    """Not every loading error names its folder: with several --adapter, the user could not tell which one failed."""
    from m2ist.cli import main

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    config = json.loads((broken / "m2ist_config.json").read_text(encoding="utf-8"))
    config.pop("vision_model_name_or_path")
    (broken / "m2ist_config.json").write_text(json.dumps(config), encoding="utf-8")
    monkeypatch.setattr(m2ist_app, "serve", lambda *args, **kwargs: pytest.fail("served with a broken adapter"))
    assert main(["app", "--adapter", f"good={adapter_dir}", "--adapter", f"second={broken}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2ist app: error: adapter 'second' (") and "no vision tower name" in err
    with pytest.raises(FileNotFoundError, match=r"adapter 'gone' \(.*gone\) cannot be loaded"):  # the type is kept
        m2ist_app.load_models([f"good={adapter_dir}", f"gone={tmp_path / 'gone'}"])


@needs_gradio
def test_uploads_and_pictures_are_not_left_on_disk(models, tmp_path, monkeypatch):
    """gradio keeps every upload and every drawn picture in its cache: without delete_cache, each request added
    them for good (users' photos included), and stopping the server removed nothing."""
    from gradio_client import Client, handle_file

    cache = tmp_path / "gradio-cache"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(cache))
    port = _free_port()
    app = m2ist_app.serve(models, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        for index in range(2):
            image = scene(tmp_path / f"upload{index}.png", size=(120 + index, 80))
            _, table, status = client.predict(handle_file(str(image)), "the red square", api_name="/predict")
            assert "1 expression in" in status and "the red square" in table
        assert any(path.is_file() for path in cache.rglob("*"))  # served from the cache while the page is up
        assert app.delete_cache is not None
    finally:
        app.close()
    left = sorted(str(path.relative_to(cache)) for path in cache.rglob("*") if path.is_file())
    assert not left, left


def test_the_cache_is_also_aged_while_serving(models):
    """Files older than CACHE_SECONDS are deleted while the server runs, not only when it stops."""
    if not HAS_GRADIO:
        pytest.skip('gradio is not installed (pip install "m2ist[app]")')
    frequency, age = m2ist_app.build_app(models).delete_cache
    assert age == m2ist_app.CACHE_SECONDS and 0 < frequency <= age



@needs_gradio
def test_an_upload_deleted_from_the_cache_asks_for_it_again(models, tmp_path):
    """With uploads aged out of the cache, pressing Find again on an old page said "Cannot read this file as an
    image ([Errno 2] No such file or directory ...). Try a PNG, JPEG or WebP file." about a PNG: it now says to upload
    it again."""
    from gradio.data_classes import ImageData

    app = m2ist_app.build_app(models)
    field = next(block for block in app.blocks.values() if getattr(block, "elem_id", None) == "m2ist-image")
    image = scene(tmp_path / "image.png")
    payload = ImageData(path=str(image), orig_name="image.png")
    assert predict_page(models, field.preprocess(payload), "the red square").ok
    image.unlink()  # what delete_cache does CACHE_SECONDS later
    result = predict_page(models, field.preprocess(payload), "the red square")
    assert result.message.startswith("⚠️ The image is no longer on the server") and "upload it again" in result.message
    assert "Cannot read" not in result.message and result.images == [None]


def test_the_example_scenes_are_removed_when_the_page_stops(adapter_dir, monkeypatch):
    """`m2ist app` wrote its example scenes to a fresh temporary folder at every start and never removed it."""
    seen = {}

    def serve(models, *, examples, **kwargs):
        seen["paths"] = [Path(path) for path, _ in examples]
        assert all(path.is_file() for path in seen["paths"])  # there while the page serves

    monkeypatch.setattr(m2ist_app, "serve", serve)
    assert m2ist_app.main(["--adapter", str(adapter_dir), "--examples", "shapes", "--port", str(_free_port())]) == 0
    assert seen["paths"] and not any(path.exists() for path in seen["paths"])
    assert not seen["paths"][0].parent.exists()

