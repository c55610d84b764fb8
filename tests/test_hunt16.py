"""Round 16 of the hunt for careless inputs and quiet faults: ``m2ist predict --image`` naming a folder or a pattern
the shell left unexpanded is refused with what to give (it ended with "run with --debug for the full traceback",
the words of an unexpected failure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_hostile import assert_one_line_error, run_cli
from tests.test_hostile_cli import cli_workspace

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return cli_workspace(tmp_path_factory.mktemp("hunt16"))


@pytest.mark.parametrize("name, needles", [
    (".", ("is a folder", "*.jpg")),
    ("*.jpg", ("no file matches this pattern", "unquoted")),
    ("img[0-9].webp", ("no file matches this pattern",)),
])
def test_predict_refuses_a_folder_or_an_unexpanded_pattern_with_what_to_give(workspace, capsys, name, needles):
    image = str(workspace / name) if name != "." else str(workspace)
    code, out, err = run_cli(capsys, "predict", "--adapter", str(workspace / "adapter"), "--image", image,
                             "--text", "the red square")
    assert_one_line_error(code, err, *needles)
    assert out == "" and "--debug" not in err


def test_a_file_whose_name_holds_pattern_characters_is_still_read(workspace, capsys, tmp_path):
    image = tmp_path / "scene[1].png"
    image.write_bytes((workspace / "img0.png").read_bytes())
    code, out, err = run_cli(capsys, "predict", "--adapter", str(workspace / "adapter"), "--image", str(image),
                             "--text", "the red square")
    assert code == 0 and '"box_xyxy"' in out, err
