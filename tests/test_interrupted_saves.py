"""What a process killed mid-save or mid-push leaves beside a folder is cleared by the next save, and a folder a
killed swap had set aside comes back: nothing lost, no hidden folders piling up."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from m2ist import staging
from m2ist.save_and_load import save_folder_atomically
from m2ist.trainer import _push_snapshot_folder

pytestmark = pytest.mark.skipif(os.name != "posix", reason="leftovers are told by their owner's PID on POSIX only")
ROOT = Path(__file__).resolve().parent.parent


def _write(text: str):
    def write(folder: Path) -> None:
        (folder / "m2ist_config.json").write_text(text)
    return write


def _killed_save(target: Path, when: str) -> None:
    """Run a save of ``target`` in another process that dies (``os._exit``, as under SIGKILL: no clean-up runs)
    ``when``: ``"writing"`` (the new folder half written), ``"exchanging"`` (the new folder written and the old
    one's other entries moved into it, the exchange of the two not done), ``"swapping"`` (the old folder set aside, the new one
    not yet in place) or ``"moving back"`` (the new folder in place, a file that reached the old folder during the
    save not yet moved back)."""
    code = textwrap.dedent(f"""
        import os, sys
        from pathlib import Path
        import m2ist.save_and_load as s
        # the portable swap (old folder aside, new folder in, other entries moved back), or Linux's exchange
        s._EXCHANGE = (lambda new, old: os._exit(9)) if {when!r} == "exchanging" else None
        when, target = {when!r}, Path({str(target)!r})
        rename, move = os.rename, s._move_entries
        def dying_rename(src, dst):
            if when == "moving back" and str(dst).endswith(".m2ist-old"):
                (Path(src) / "late.txt").write_text("late")  # written into the folder by another process meanwhile
            rename(src, dst)
            if when == "swapping" and str(dst).endswith(".m2ist-old"):
                os._exit(9)
        def dying_move(source, dest, skip):
            if when == "moving back" and str(source).endswith(".m2ist-old"):
                os._exit(9)
            return move(source, dest, skip)
        s.os.rename, s._move_entries = dying_rename, dying_move
        def write(folder):
            (folder / "m2ist_config.json").write_text("new")
            if when == "writing":
                os._exit(9)
        s.save_folder_atomically(target, write)
        sys.exit("the save was not interrupted")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stderr


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    save_folder_atomically(folder, _write("old"))
    (folder / "notes.txt").write_text("mine")  # not the adapter's: every save keeps it
    return folder


def test_a_save_killed_while_writing_leaves_a_folder_the_next_save_removes(adapter):
    _killed_save(adapter, "writing")
    assert [name.endswith(".m2ist-saving") for name in _hidden(adapter)] == [True]
    assert (adapter / "m2ist_config.json").read_text() == "old"  # untouched
    save_folder_atomically(adapter, _write("next"))
    assert _hidden(adapter) == []
    assert (adapter / "m2ist_config.json").read_text() == "next" and (adapter / "notes.txt").read_text() == "mine"


def test_entries_moved_into_a_new_folder_that_never_arrived_go_back(adapter):
    _killed_save(adapter, "exchanging")
    assert (adapter / "m2ist_config.json").read_text() == "old" and not (adapter / "notes.txt").exists()
    save_folder_atomically(adapter, _write("next"))
    assert _hidden(adapter) == []
    assert (adapter / "m2ist_config.json").read_text() == "next" and (adapter / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in adapter.iterdir()) == ["m2ist_config.json", "notes.txt"]  # no marker left


def test_a_folder_set_aside_by_a_killed_swap_comes_back(adapter, caplog):
    _killed_save(adapter, "swapping")
    assert not adapter.exists()  # the moment the kill hit: the user's folder is only the hidden one
    with caplog.at_level(logging.WARNING, logger="m2ist.save_and_load"):
        save_folder_atomically(adapter, _write("next"))
    assert "it is back" in caplog.text
    assert _hidden(adapter) == []
    assert (adapter / "m2ist_config.json").read_text() == "next" and (adapter / "notes.txt").read_text() == "mine"


def test_entries_a_killed_swap_had_not_moved_back_come_back(adapter, caplog):
    _killed_save(adapter, "moving back")
    assert (adapter / "m2ist_config.json").read_text() == "new" and not (adapter / "late.txt").exists()
    with caplog.at_level(logging.WARNING, logger="m2ist.save_and_load"):
        save_folder_atomically(adapter, _write("next"))
    assert "they are back" in caplog.text
    assert _hidden(adapter) == []
    assert (adapter / "m2ist_config.json").read_text() == "next" and (adapter / "notes.txt").read_text() == "mine"
    assert (adapter / "late.txt").read_text() == "late"


def test_only_a_dead_process_s_folders_on_this_machine_are_touched(adapter):
    machine = staging.owner().rsplit(".", 1)[0]
    kept = [f".adapter.{machine}.{os.getpid()}.live0001.m2ist-saving",  # this process: alive
            f".adapter.elsewhere-1.{_dead_pid()}.other001.m2ist-saving",  # another machine's: cannot be told
            f".adapter.{machine}.{_dead_pid()}.notours1.saving-copy",  # not a staging folder
            f".adapter-2.{machine}.{_dead_pid()}.another1.m2ist-saving"]  # another folder's
    for name in kept:
        (adapter.parent / name).mkdir()
    dead = adapter.parent / f".adapter.{machine}.{_dead_pid()}.gone0001.m2ist-saving"
    dead.mkdir()
    save_folder_atomically(adapter, _write("next"))
    assert not dead.exists()
    assert all((adapter.parent / name).is_dir() for name in kept)


def test_push_snapshots_a_killed_run_left_are_removed_by_the_next_push(tmp_path):
    output = tmp_path / "run"
    output.mkdir()
    machine = staging.owner().rsplit(".", 1)[0]
    dead = tmp_path / f".run.{machine}.{_dead_pid()}.gone0001.m2ist-push"
    live = tmp_path / f".run.{machine}.{os.getpid()}.live0001.m2ist-push"
    dead.mkdir()
    live.mkdir()
    (dead / "m2ist_model.safetensors").write_bytes(b"x")
    snapshot = _push_snapshot_folder(output)
    assert snapshot.parent == tmp_path and snapshot.name.startswith(f".run.{staging.owner()}.")
    assert not dead.exists() and live.is_dir()


def test_a_finished_new_folder_with_no_folder_to_go_back_to_takes_its_place(tmp_path, caplog):
    """A finished new folder (its marker lists what the save wrote) holding the folder's own entries, and no folder
    and no set-aside copy beside it: it becomes the folder, entries and all, rather than being thrown away."""
    adapter = tmp_path / "adapter"
    machine = staging.owner().rsplit(".", 1)[0]
    finished = tmp_path / f".adapter.{machine}.{_dead_pid()}.done0001.m2ist-saving"
    finished.mkdir()
    (finished / "m2ist_config.json").write_text("new")
    (finished / "notes.txt").write_text("mine")
    (finished / ".m2ist-written.json").write_text('["m2ist_config.json"]')
    with caplog.at_level(logging.WARNING, logger="m2ist.save_and_load"):
        save_folder_atomically(adapter, _write("next"))
    assert "it is in place" in caplog.text
    assert _hidden(adapter) == []
    assert sorted(p.name for p in adapter.iterdir()) == ["m2ist_config.json", "notes.txt"]
    assert (adapter / "m2ist_config.json").read_text() == "next" and (adapter / "notes.txt").read_text() == "mine"
