"""Hidden working folders beside a target folder, named after the process that made them.

A whole-folder save fills ``.<name>.<owner>.<random>.m2ist-saving`` and swaps it in, setting the old folder aside as
``.<name>.<owner>.<random>.m2ist-old``; a trainer's Hub push uploads from ``.<name>.<owner>.<random>.m2ist-push``.
``<owner>`` is ``<host>-<pid namespace>.<pid>``, so what a killed process left behind is told from what a live one is
using (:func:`leftovers`): the next save of the same folder removes it, or puts back a folder set aside by a swap that
never finished (:func:`m2ist.save_and_load.save_folder_atomically`). Only on POSIX systems, where a process can be
asked whether it is alive without harming it.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import uuid
from pathlib import Path

SAVING, PUSH, ASIDE = ".m2ist-saving", ".m2ist-push", ".m2ist-old"
"""The suffixes of a save's new folder, a push's snapshot and a swapped-out old folder."""


def _machine() -> str:
    """This host and PID namespace (containers that share a host name and a volume have their own PIDs)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{host}-{namespace}"


def owner() -> str:
    """``<host>-<pid namespace>.<pid>`` of this process, as staging folders are named."""
    return f"{_machine()}.{os.getpid()}"


def make_staging(target: Path, suffix: str) -> Path:
    """A new empty hidden folder beside ``target`` (``.<name>.<owner>.<random><suffix>``), private to this user."""
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{owner()}.", suffix=suffix, dir=target.parent))


def aside_path(target: Path) -> Path:
    """Where a swap sets ``target``'s old folder aside (not created)."""
    return target.with_name(f".{target.name}.{owner()}.{uuid.uuid4().hex}{ASIDE}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: the existence check, nothing is sent
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or not a PID this system can hold
        return True
    return True


def leftovers(target: Path, suffix: str) -> list[Path]:
    """The ``suffix`` folders of ``target`` made on this machine by processes that are gone (killed mid-save or
    mid-push), sorted by name; none on systems other than POSIX, or when the parent folder cannot be read."""
    if os.name != "posix":
        return []
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?P<machine>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+"
                         rf"{re.escape(suffix)}")
    machine = _machine()
    try:
        entries = sorted(target.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and match["machine"] == machine and not entry.is_symlink() and entry.is_dir() \
                and not _alive(int(match["pid"])):
            found.append(entry)
    return found
