"""The command line, round 15, as a hurried user drives it: ``predict --image`` takes an ``http(s)`` URL (it was
read as a file path, ``Image file not found: http:/...``), ``--text -`` reads the phrases from stdin (``-`` was the
phrase) and a phrase that names a file is warned about, ``--output`` named for another format (``boxes.csv``,
``boxes.png``) is refused (JSON was written into it), and ``--adapter`` naming a run's folder that holds only
``checkpoint-*`` folders names the one to pass (it said ``pass subfolder=...``, Python's words)."""

from __future__ import annotations

import functools
import io
import json
import logging
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.test_hostile import assert_one_line_error, run_cli
from tests.test_hostile_cli import cli_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return cli_workspace(tmp_path_factory.mktemp("hunt15_cli"))


def predict(workspace: Path, *extra: str) -> list[str]:
    return ["predict", "--adapter", str(workspace / "adapter"), *extra]


def boxes(out: str) -> list[tuple[str, list[float]]]:
    return [(record["text"], record["box_xyxy"]) for record in json.loads(out)]


def test_predict_takes_an_image_url_and_an_unreachable_one_is_one_line(workspace, capsys):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(workspace))
    handler.log_message = lambda *args: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/img0.png"
        code, out, err = run_cli(capsys, *predict(workspace, "--image", url, "--text", "the red square", "a dog"))
        assert code == 0, err
        _, local, _ = run_cli(capsys, *predict(workspace, "--image", str(workspace / "img0.png"), "--text",
                                               "the red square", "a dog"))
        assert boxes(out) == boxes(local) and json.loads(out)[0]["image"] == url
    finally:
        server.shutdown()
        server.server_close()
    code, out, err = run_cli(capsys, *predict(workspace, "--image", url, "--text", "a"))  # the server is gone
    assert_one_line_error(code, err, "Could not download the image", url)
    assert out == "" and "not found" not in err


def test_text_dash_reads_the_phrases_from_stdin(workspace, capsys, monkeypatch):
    image = str(workspace / "img0.png")
    monkeypatch.setattr("sys.stdin", io.StringIO("the red square\n\n  the   blue one \n"))
    code, out, err = run_cli(capsys, *predict(workspace, "--image", image, "--text", "first", "-"))
    assert code == 0, err
    assert [text for text, _ in boxes(out)] == ["first", "the red square", "the blue one"]  # was: ["first", "-"]
    monkeypatch.setattr("sys.stdin", io.StringIO(" \n"))
    code, out, err = run_cli(capsys, *predict(workspace, "--image", image, "--text", "-"))
    assert_one_line_error(code, err, "--text - read no phrase from stdin")
    code, out, err = run_cli(capsys, *predict(workspace, "--image", image, "--text", "-", "-"))
    assert_one_line_error(code, err, "more than once")


def test_a_phrase_that_names_a_file_is_warned_about(workspace, capsys, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("phrases.txt").write_text("the red square\n", encoding="utf-8")
    image = str(workspace / "img0.png")
    with caplog.at_level(logging.WARNING, logger="m2ist.cli"):
        code, out, _ = run_cli(capsys, *predict(workspace, "--image", image, "--text", "phrases.txt", "x" * 5000))
    assert code == 0 and boxes(out)[0][0] == "phrases.txt"
    warned = [r.getMessage() for r in caplog.records if "is the name of a file" in r.getMessage()]
    assert len(warned) == 1 and "--text - < phrases.txt" in warned[0]


@pytest.mark.parametrize(("command", "name", "needle"), [
    ("predict", "boxes.csv", ".csv names another format"),
    ("predict", "boxes.png", "use --draw"),
    ("predict", "boxes.jsonl", ".jsonl names another format"),
    ("eval", "results.txt", ".txt names another format"),
])
def test_an_output_named_for_another_format_is_refused(workspace, capsys, tmp_path, command, name, needle):
    target = tmp_path / name
    if command == "predict":
        argv = predict(workspace, "--image", str(workspace / "img0.png"), "--text", "a", "--output", str(target))
    else:
        argv = ["eval", "--adapter", str(workspace / "adapter"), "--data-format", "jsonl", "--box-format", "xywh",
                "--no-progress", "--eval-file", str(workspace / "val.jsonl"), "--output", str(target)]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, f"--output {target}", needle, "end the name with .json")
    assert out == "" and not target.exists()  # was: JSON written into boxes.csv / boxes.png
    code, out, err = run_cli(capsys, *argv[:-1], str(tmp_path / "out.json"))
    assert code == 0 and (tmp_path / "out.json").is_file(), err


def test_a_runs_folder_with_checkpoints_only_names_the_adapter_to_pass(workspace, capsys, tmp_path):
    run = tmp_path / "run"
    for step in (500, 1000, 50):
        shutil.copytree(workspace / "adapter", run / f"checkpoint-{step}")
    (run / "runs").mkdir()
    argv = ["predict", "--image", str(workspace / "img0.png"), "--text", "a", "--adapter"]
    code, out, err = run_cli(capsys, *argv, str(run))
    assert_one_line_error(code, err, f"--adapter {run / 'checkpoint-1000'}", "checkpoint-50")
    assert "subfolder=" not in err and out == ""
    code, out, err = run_cli(capsys, *argv, str(run / "runs"))
    assert_one_line_error(code, err, "holds no m2ist_config.json, nor do its subfolders")
    assert run_cli(capsys, *argv, str(run / "checkpoint-1000"))[0] == 0
