"""`m2ist app`: the prediction function's messages for bad input, the CLI glue, the Space entry file, and the page
itself in a real headless Chromium (skipped, with the reason, where no browser is installed)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_inference import make_tokenizer
from tests.tiny import save_reloadable_adapter

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from m2ist import app as m2ist_app
from m2ist.app import AppInputError, parse_phrases, predict_page, read_image

REPO = Path(__file__).resolve().parents[1]
HAS_GRADIO = importlib.util.find_spec("gradio") is not None
# gradio's queue calls pandas APIs that pandas 3 deprecates; not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
needs_gradio = pytest.mark.skipif(not HAS_GRADIO, reason='gradio is not installed (pip install "m2ist[app]")')


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """A tiny random-weight adapter saved with its processor; towers saved too, so it reloads by path."""
    root = tmp_path_factory.mktemp("app")
    save_reloadable_adapter(root, make_tokenizer(root / "tokenizer"))
    return root / "adapter"


@pytest.fixture(scope="module")
def models(adapter_dir):
    return m2ist_app.load_models([f"tiny={adapter_dir}"])


def scene(path: Path, size: tuple[int, int] = (120, 80)) -> Path:
    image = Image.new("RGB", size, "white")
    image.paste((220, 40, 40), (10, 10, 40, 40))
    image.save(path)
    return path


# ---------------------------------------------------------------------------------------------- unit tests
def test_phrases_are_one_per_non_blank_line():
    assert parse_phrases("  the red   square \n\n the blue circle\r\n") == ["the red square", "the blue circle"]
    for empty in (None, "", "  \n \n"):
        with pytest.raises(AppInputError, match="at least one expression"):
            parse_phrases(empty)
    with pytest.raises(AppInputError, match="at most"):
        parse_phrases("\n".join(["x"] * 100))
    with pytest.raises(AppInputError, match="characters"):
        parse_phrases("a" * 1000)


def test_unusable_images_are_messages(tmp_path):
    with pytest.raises(AppInputError, match="Upload, paste or drop"):
        read_image(None)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with pytest.raises(AppInputError, match="Cannot read this file as an image") as info:
        read_image(str(corrupt))
    assert str(tmp_path) not in str(info.value)  # no server paths on the page
    with pytest.raises(AppInputError, match="Cannot read"):
        read_image(str(tmp_path / "missing.png"))
    huge = tmp_path / "huge.png"
    Image.new("1", (20_000, 20_000)).save(huge)  # 400 megapixels in a few kB: refused from its header
    with pytest.raises(AppInputError, match="megapixels"):
        read_image(str(huge))
    assert read_image(np.zeros((5, 7, 3), dtype=np.uint8)).size == (7, 5)


def test_predict_page_draws_one_box_per_phrase_and_times_it(models, tmp_path):
    result = predict_page(models, str(scene(tmp_path / "a.png")), "the red square\n\nthe blue circle")
    assert result.ok, result.message
    boxes = result.boxes["tiny"]
    assert len(boxes) == 2 and all(0 <= x0 <= x1 <= 120 and 0 <= y0 <= y1 <= 80 for x0, y0, x1, y1 in boxes)
    assert result.images[0].size == (512, 341)  # small images are enlarged for display
    assert "| the red square |" in result.table and "the blue circle" in result.table
    assert "2 expressions in" in result.message and " ms " in result.message and result.seconds["tiny"] > 0


@pytest.mark.parametrize(("image", "text", "message"), [
    (None, "the red square", "Upload, paste or drop"),
    ("scene", "   \n ", "at least one expression"),
    ("corrupt", "the red square", "Cannot read this file as an image"),
    (m2ist_app._Unreadable("cannot identify image file"), "x", "Cannot read this file as an image"),
])
def test_predict_page_turns_bad_input_into_a_message(models, tmp_path, image, text, message):
    if image == "scene":
        image = str(scene(tmp_path / "a.png"))
    elif image == "corrupt":
        image = tmp_path / "corrupt.jpg"
        image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = predict_page(models, image, text)
    assert result.message.startswith("⚠️") and message in result.message
    assert result.images == [None] and result.table == "" and not result.ok


def test_a_failing_model_is_a_message_and_the_others_still_answer(models, tmp_path):
    class Broken:
        processor = None

    result = predict_page([("broken", Broken()), *models], str(scene(tmp_path / "a.png")), "the red square")
    assert result.images[0] is None and result.images[1] is not None
    assert "broken: the prediction failed" in result.message and "**tiny**" in result.message
    assert "| adapter |" in result.table  # several adapters: the table names them


def test_markdown_in_phrases_is_escaped(models, tmp_path):
    result = predict_page(models, str(scene(tmp_path / "a.png")), "a | b <script>")
    assert "a \\| b &lt;script&gt;" in result.table


def test_missing_demo_adapter_says_to_run_make_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run `make demo` first.*--adapter"):
        m2ist_app.load_models(None)
    args = m2ist_app.add_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.adapter is None and args.host == "127.0.0.1"
    with pytest.raises(FileNotFoundError, match="make demo"):
        m2ist_app.run(args)
    assert m2ist_app.main([]) == 2


def test_cli_glue_loads_named_adapters_and_serves(adapter_dir, monkeypatch):
    served = {}
    monkeypatch.setattr(m2ist_app, "serve", lambda models, **kw: served.update(models=models, **kw))
    parser = m2ist_app.add_arguments(argparse.ArgumentParser())
    port = _free_port()
    args = parser.parse_args(["--adapter", f"a={adapter_dir}", "--adapter", str(adapter_dir), "--port", str(port)])
    assert m2ist_app.run(args) == 0
    assert [name for name, _ in served["models"]] == ["a", "adapter"]
    assert served["port"] == port and served["host"] == "127.0.0.1" and served["examples"] is None


def test_m2ist_app_command_serves_the_named_adapter(adapter_dir, monkeypatch, capsys, tmp_path):
    from m2ist.cli import main

    served = {}
    monkeypatch.setattr(m2ist_app, "serve", lambda models, **kw: served.update(models=models, **kw))
    port = _free_port()
    assert main(["app", "--adapter", f"mine={adapter_dir}", "--port", str(port)]) == 0
    assert [name for name, _ in served["models"]] == ["mine"] and served["port"] == port
    assert main(["app", "--adapter", str(tmp_path / "missing")]) == 2  # an expected error: one line, status 2
    err = capsys.readouterr().err
    assert err.startswith("m2ist app: error: ") and "missing" in err and err.count("\n") == 1


def test_demo_examples_are_scenes_with_phrases(tmp_path):
    examples = m2ist_app.demo_examples(count=2, folder=tmp_path)
    assert len(examples) == 2
    for path, phrases in examples:
        assert Image.open(path).size[0] > 0 and phrases.strip() and len(phrases.splitlines()) <= 3


@needs_gradio
def test_space_entry_file_builds_the_page_without_launching(adapter_dir, monkeypatch):
    monkeypatch.setenv("M2IST_ADAPTER", str(adapter_dir))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # no __pycache__ left in examples/
    spec = importlib.util.spec_from_file_location("space_app", REPO / "examples" / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": nothing is launched
    import gradio as gr

    assert isinstance(module.demo, gr.Blocks)
    assert not (REPO / "m2ist" / "app.pyi").exists()  # gradio writes stubs next to Image subclasses: none here
    assert "m2ist[app]" in (REPO / "examples" / "space" / "requirements.txt").read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- the page in Chromium
def _browser() -> tuple[str | None, str | None, str]:
    """Paths of a Chromium and its chromedriver, or the reason the browser test cannot run."""
    binary = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if importlib.util.find_spec("selenium") is None:
        return None, None, "selenium is not installed (it is in the dev extra)"
    if not HAS_GRADIO:
        return None, None, 'gradio is not installed (pip install "m2ist[app]")'
    if binary is None or driver is None:
        return None, None, "no Chromium/chromedriver installed (apt-get install chromium chromium-driver)"
    return binary, driver, ""


def test_a_bad_host_or_a_busy_port_is_refused_before_any_adapter_loads(monkeypatch, capsys):
    from m2ist.cli import main

    def never(*args, **kwargs):
        raise AssertionError("adapters were loaded before the address was checked")

    monkeypatch.setattr(m2ist_app, "load_models", never)
    assert main(["app", "--host", "no-such-host.invalid"]) == 2
    assert "--host 'no-such-host.invalid' is not an address" in capsys.readouterr().err
    assert main(["app", "--host", "192.0.2.1"]) == 2  # TEST-NET-1: resolvable, not this machine's
    assert "cannot listen on --host '192.0.2.1'" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2ist app: error: ") and f"port {port} on 127.0.0.1 is in use" in err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_the_page_in_a_headless_browser(models, tmp_path):
    binary, driver_path, reason = _browser()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    examples = [(str(scene(tmp_path / "example.png")), "the red square")]
    app = m2ist_app.serve(models, port=port, examples=examples, block=False, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                 "--window-size=1280,1000", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request the page makes
    browser = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(browser, 30)
        browser.get(url)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#m2ist-image input[type=file]")))

        def submit(path: Path, text: str, expect: str) -> str:
            upload = browser.find_element(By.CSS_SELECTOR, "#m2ist-image input[type=file]")
            upload.send_keys(str(path))
            box = browser.find_element(By.CSS_SELECTOR, "#m2ist-text textarea")
            box.clear()
            box.send_keys(text)
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#m2ist-image img"))  # uploaded and shown
            browser.find_element(By.ID, "m2ist-find").click()
            wait.until(lambda b: expect in b.find_element(By.ID, "m2ist-status").text)
            return browser.find_element(By.ID, "m2ist-status").text

        status = submit(scene(tmp_path / "page.png"), "the red square", "1 expression in")
        assert "ms" in status and "120×80" in status
        table = browser.find_element(By.ID, "m2ist-boxes").text
        assert "the red square" in table and "x0" in table
        drawn = browser.find_elements(By.CSS_SELECTOR, "#m2ist-result-0 img")
        assert drawn and drawn[0].get_attribute("src")

        # a corrupt file: a message on the page, no error modal, no stack trace
        browser.get(url)  # a fresh page: an empty image input
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#m2ist-image input[type=file]")))
        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        status = submit(corrupt, "the red square", "Cannot read this file as an image")
        assert "Traceback" not in browser.page_source and "File \"" not in status
        assert not browser.find_elements(By.CSS_SELECTOR, ".toast-body")  # no gradio error modal either

        # a file over the upload limit: gradio's own message, the file is never stored
        browser.get(url)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#m2ist-image input[type=file]")))
        huge = tmp_path / "huge.png"
        huge.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * (21 * 2**20))
        browser.find_element(By.CSS_SELECTOR, "#m2ist-image input[type=file]").send_keys(str(huge))
        wait.until(lambda b: "exceed the maximum allowed size" in b.find_element(By.TAG_NAME, "body").text)

        # the server still serves: the page loads again and a good image still gets its box
        assert urllib.request.urlopen(url, timeout=10).status == 200
        browser.get(url)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#m2ist-image input[type=file]")))
        assert "1 expression in" in submit(scene(tmp_path / "again.png"), "the red square", "1 expression in")

        # nothing was fetched from anywhere but this server (no web fonts, no analytics, no CDN)
        requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
        urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
        outside = sorted(u for u in urls if not u.startswith((url, "data:", "blob:", f"ws://127.0.0.1:{port}/")))
        assert urls and not outside, outside
    finally:
        browser.quit()
        app.close()
