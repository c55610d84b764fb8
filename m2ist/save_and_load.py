"""Saving and loading the trainable tensors (side network + head) as safetensors (the model card is in ``m2ist.card``).

Two guarantees, stated once:

* **A saved folder always holds exactly one complete adapter.** :func:`save_folder_atomically` writes every file
  into a temporary sibling folder, then swaps it in with one ``rename`` (an atomic exchange on Linux), so two
  processes saving into one folder leave the last complete adapter, never a mix, and a save that dies half-way
  (a full disk, ``ulimit -f``, an exception) leaves the previous adapter untouched. Entries of the folder that are
  not the adapter's (a user's notes, a training run's ``checkpoint-*`` folders) are kept.
* **What loads is what was saved.** The weights file records the SHA-256 of its tensor data and of its layout
  (``m2ist_sha256`` and ``m2ist_layout_sha256`` in the safetensors metadata); loading checks both, and every tensor's
  name, shape, dtype and finiteness, before anything is copied into the model.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import hashlib
import itertools
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import struct
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .config import CONFIG_NAME
from .staging import ASIDE, SAVING, aside_path, leftovers, make_staging
from .version import __version__

logger = logging.getLogger(__name__)
#: Written into a save's new folder once it is filled: the names it wrote (see :func:`clear_interrupted_saves`).
_WRITTEN = ".m2ist-written.json"

WEIGHTS_NAME = "m2ist_model.safetensors"
#: The processor's settings, saved beside the adapter by ``RECProcessor.save_pretrained``.
PROCESSOR_CONFIG_NAME = "m2ist_processor.json"
#: What a saved processor's tokenizer may consist of (whichever files the tokenizer wrote).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
#: The processor files transformers' ``ProcessorMixin.save_pretrained`` writes (found by ``AutoProcessor``).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
#: Every file an adapter folder may publish: config, weights, card, processor and tokenizer. Pushes upload these
#: only (never optimizer state, training arguments, trainer state or checkpoints).
ADAPTER_FILES = ("m2ist_config.json", WEIGHTS_NAME, "README.md", PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES,
                 *TOKENIZER_FILES)
TRAINABLE_PREFIXES = ("side.", "head.")
#: What an adapter folder's own files are called: a new save replaces all of them (a processor saved by an older
#: adapter never survives beside a newer adapter's weights); every other entry of the folder is kept.
#: ``README.md`` is replaced only when the new save writes a model card.
OWNED_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES, *TOKENIZER_FILES,
                         "training_args.bin", "m2ist_run.json"})
#: Adapter names that are refused: a subfolder of that name is a Trainer checkpoint, a log folder (pushes skip
#: both), the checkpoint a Trainer pushes, or the tower cache of an output folder (a save would replace it).
RESERVED_ADAPTER_NAMES = ("checkpoint-*", "runs", "last-checkpoint", "tower_cache")
#: What ``adapter_names=`` / ``adapters=`` take for every adapter of a model; no adapter may be named so.
ALL_ADAPTERS = "all"
#: safetensors metadata key holding the SHA-256 of the file's tensor data.
SHA256_KEY = "m2ist_sha256"
#: safetensors metadata key holding the SHA-256 of the file's tensor layout (every tensor's name, dtype, shape and
#: place in the data): with :data:`SHA256_KEY` it covers everything a load reads.
LAYOUT_SHA256_KEY = "m2ist_layout_sha256"
#: The weights (and PEFT adapter) files of another library's model: a folder or Hub repo holding one is that model's,
#: and an adapter saved or pushed there would replace its tokenizer, processor and card; saves and pushes refuse it.
FOREIGN_MODEL_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                          "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
                          "tf_model.h5", "flax_model.msgpack", "diffusion_pytorch_model.safetensors",
                          "adapter_model.safetensors", "adapter_model.bin", "adapter_config.json")
#: Processor and tokenizer files are an adapter's only beside the ``m2ist_processor.json`` that
#: ``RECProcessor.save_pretrained`` always writes with them; without it they are someone else's and are kept.
_PROCESSOR_OWNED = frozenset({*PROCESSOR_FILES, *TOKENIZER_FILES})


def adapter_name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an adapter (it becomes a module name and a ``<name>/`` subfolder), or None."""
    if not isinstance(name, str) or not name:
        return "an adapter name is a non-empty string"
    if "/" in name or "\\" in name:
        return "it contains a path separator ('/' or '\\')"
    if "." in name:
        return "it contains '.', which a PyTorch module name cannot hold (and which could clash with a file name)"
    if name != name.strip() or not name.isprintable():
        return "it has spaces at either end or control characters"
    return _portable_name_problem(name) or _reserved_name_problem(name)


#: Characters a folder name cannot hold on Windows, and names Windows reserves for devices (an adapter's subfolder,
#: in a saved folder or a Hub repo, must be made wherever the adapter is loaded).
_WINDOWS_FORBIDDEN = '<>:"|?*'
_WINDOWS_RESERVED = re.compile(r"(?i)(con|prn|aux|nul|com[0-9]|lpt[0-9])")
#: Scripts whose letters look alike ('е' Cyrillic, 'e' Latin): one name mixing them can pass for another name.
_CONFUSABLE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK")


def _portable_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a folder name everywhere, or can pass for another name, or None."""
    normal = unicodedata.normalize("NFKC", name)
    if normal != unicodedata.normalize("NFC", name):  # (composed and decomposed accents: see the model's case check)
        return (f"it holds characters that are written differently but read as others (fullwidth letters, "
                f"ligatures, superscripts): it reads as {normal!r}, which a load typing the name would ask for. Use "
                "that spelling")
    scripts = sorted({unicodedata.name(char, "").split(" ")[0] for char in name if char.isalpha()}
                     & set(_CONFUSABLE_SCRIPTS))
    if len(scripts) > 1:
        return (f"it mixes {' and '.join(s.title() for s in scripts)} letters, which look alike (e.g. Cyrillic 'е' "
                "and Latin 'e'), so it can pass for another adapter's name. Type it in one script")
    if len(name.encode("utf-8")) > 128:
        return f"it is {len(name.encode('utf-8'))} bytes long; a subfolder name of at most 128 bytes fits every file system"
    forbidden = sorted({char for char in name if char in _WINDOWS_FORBIDDEN})
    if forbidden or _WINDOWS_RESERVED.fullmatch(name):
        what = f"the character(s) {''.join(forbidden)!r}" if forbidden else f"the device name {name!r}"
        return f"it holds {what}, which a folder name cannot hold on Windows, where the adapter may be loaded"
    return None


def _reserved_name_problem(name: str) -> str | None:
    """Why ``name`` is reserved, or None."""
    if name == ALL_ADAPTERS:
        return (f"the name {ALL_ADAPTERS!r} is reserved: predict(adapters={ALL_ADAPTERS!r}) and "
                f"evaluate(adapter_names={ALL_ADAPTERS!r}) mean every adapter")
    reserved = next((pattern for pattern in RESERVED_ADAPTER_NAMES if fnmatch.fnmatchcase(name, pattern)), None)
    if reserved is not None:
        what = f"names matching {reserved!r} are" if "*" in reserved else f"the name {reserved!r} is"
        return (f"{what} reserved: such a subfolder is a trainer's checkpoint, log or cache folder, which pushes skip "
                "and saves replace")
    return None


#: Processor settings that change what a model reads: ``flat_settings()`` keys and the tokenizer's size.
PROCESSOR_SETTING_KEYS = ("canvas_size", "image_mean", "image_std", "max_query_len", "lowercase",
                          "tokenizer_vocab_size")


def processor_settings(processor: Any) -> dict[str, Any]:
    """The :data:`PROCESSOR_SETTING_KEYS` of a processor (a ``RECProcessor``; None for a setting it lacks)."""
    settings = dict(processor.flat_settings()) if hasattr(processor, "flat_settings") else {}
    tokenizer = getattr(processor, "tokenizer", None)
    settings["tokenizer_vocab_size"] = len(tokenizer) if tokenizer is not None else None
    return {key: settings.get(key) for key in PROCESSOR_SETTING_KEYS}


def processor_setting_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, mine, theirs)`` for each :data:`PROCESSOR_SETTING_KEYS` setting both mappings hold with other values
    (normalisation statistics compared up to float rounding in JSON): two processors that prepare inputs otherwise."""
    return [(key, mine[key], theirs[key]) for key in PROCESSOR_SETTING_KEYS
            if key in mine and key in theirs and not _same_setting(mine[key], theirs[key])]


def _same_setting(mine: Any, theirs: Any) -> bool:
    if isinstance(mine, list | tuple) and isinstance(theirs, list | tuple):
        return len(mine) == len(theirs) and all(_same_setting(a, b) for a, b in zip(mine, theirs, strict=True))
    if isinstance(mine, float) and isinstance(theirs, int | float) and not isinstance(theirs, bool):
        return abs(mine - theirs) <= 1e-6
    return mine == theirs


def foreign_model_files(names: Iterable[str]) -> list[str]:
    """Those of ``names`` (the entries of a folder, or a repo's root files) that belong to another library's model
    (:data:`FOREIGN_MODEL_PATTERNS`), sorted."""
    return sorted(name for name in names if any(fnmatch.fnmatchcase(name, p) for p in FOREIGN_MODEL_PATTERNS))


def owned_entries(owned: Iterable[str], present: Iterable[str]) -> set[str]:
    """The names of ``owned`` that a new save may replace or delete in a folder holding ``present``: processor and
    tokenizer files only beside an m2ist processor (``m2ist_processor.json``), so a tokenizer or image processor
    saved there by someone else is never deleted."""
    owned = set(owned)
    return owned if PROCESSOR_CONFIG_NAME in set(present) else owned - _PROCESSOR_OWNED


def save_folder_problem(folder: Path) -> str | None:
    """Why an adapter cannot be saved into the existing folder ``folder``, or None."""
    try:
        present = [entry.name for entry in folder.iterdir()]
        if os.path.ismount(folder) or os.stat(folder).st_dev != os.stat(folder.parent).st_dev:
            return ("it is a mount point (a Docker volume, a network or cloud drive), which cannot be replaced as a "
                    "whole as an adapter's folder is (atomically, so that it always holds one complete adapter). "
                    f"Save into a folder inside it, e.g. {folder / 'adapter'}")
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    foreign = foreign_model_files(present)
    if foreign:
        return (f"it holds another model ({', '.join(foreign[:4])}{', ...' if len(foreign) > 4 else ''}), whose "
                "tokenizer, processor and card a saved adapter would replace. Save the adapter into a folder of its "
                "own")
    return None


@dataclass
class PipelineHooks:
    """How the method layer reaches the REC pipeline without importing it.

    :mod:`m2ist.processing` and :mod:`m2ist.inference` register themselves here when imported (``import m2ist``
    always imports both), so ``SideTunedModel.from_pretrained`` can restore a saved processor and
    ``SideTunedModel.predict`` can run one while the model files never import the pipeline.
    """

    load_processor: Callable[[str], Any] | None = None
    predict: Callable[..., torch.Tensor] | None = None


PIPELINE = PipelineHooks()


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place in one step.

    The file gets the permissions a plain ``open(path, "w")`` would give (``0644`` under the usual umask ``022``),
    not the ``0600`` of ``tempfile.mkstemp``. As with ``open``, a symbolic link is followed: the file it points to
    is replaced and the link stays (replacing the link itself left its target, e.g. a shared results file, stale).
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
            break
        except FileExistsError:
            continue
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer that replaces the file (safetensors does) would leave its own 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------- whole folders
def _renameat2_exchange() -> Callable[[str, str], bool] | None:
    """``exchange(a, b)`` swapping two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return None
    renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    at_fdcwd, rename_exchange = -100, 2

    def exchange(first: str, second: str) -> bool:
        if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without the flag
            return False
        raise OSError(code, f"Cannot swap {first} and {second}: {os.strerror(code)}")

    return exchange


_EXCHANGE = _renameat2_exchange() if os.name == "posix" else None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_entries(source: Path, target: Path, skip: Iterable[str]) -> None:
    """Move every entry of ``source`` whose name is not in ``skip`` and not already in ``target`` into ``target``."""
    skip = set(skip)
    try:
        entries = list(source.iterdir())
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.name in skip or (target / entry.name).exists():
            continue
        try:
            os.rename(entry, target / entry.name)
        except FileNotFoundError:  # another saver moved it first
            continue


def clear_interrupted_saves(folder: Path, owned: Iterable[str] = OWNED_FILES) -> None:
    """Undo what saves of ``folder`` killed on this machine left beside it (:mod:`m2ist.staging`): a folder set aside
    for the swap comes back (whole, if the new one never arrived; else the entries the new save did not replace),
    the entries of ``folder`` already moved into a finished new folder go back, and half-written folders go."""
    for aside in leftovers(folder, ASIDE):
        try:
            if not folder.exists():
                os.rename(aside, folder)
                logger.warning("%s was missing: a save killed mid-swap had set it aside as %s; it is back.", folder,
                               aside.name)
                continue
            present = [entry.name for entry in aside.iterdir()]
            _move_entries(aside, folder, owned_entries(owned, present))
        except OSError:  # another process is clearing it too
            continue
        logger.warning("A save of %s was killed before it had moved the folder's other entries back from %s; they "
                       "are back.", folder, aside.name)
        shutil.rmtree(aside, ignore_errors=True)
    for leftover in leftovers(folder, SAVING):
        try:  # a finished new folder: the folder's own entries were moved into it before the swap
            written = json.loads((leftover / _WRITTEN).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            written = None  # killed while writing: nothing of the folder's is in it
        if isinstance(written, list):
            try:
                if folder.exists():  # they go back
                    _move_entries(leftover, folder, {*map(str, written), _WRITTEN})
                else:  # no folder to go back to: the finished save, with them, becomes it
                    os.rename(leftover, folder)
                    (folder / _WRITTEN).unlink(missing_ok=True)
                    logger.warning("%s was missing: a save killed mid-swap had finished it as %s; it is in place.",
                                   folder, leftover.name)
                    continue
            except OSError:  # another process is clearing it too: keep it, nothing of the folder's is deleted
                continue
        shutil.rmtree(leftover, ignore_errors=True)


def folder_identity(folder: Path) -> tuple[int, int] | None:
    """What tells one save of ``folder`` from the next: every save swaps in a new folder (see
    :func:`save_folder_atomically`), so its device and inode change; None when it cannot be read."""
    try:
        info = os.stat(folder)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def check_folder_unchanged(folder: Path, before: tuple[int, int] | None) -> None:
    """Raise ``ValueError`` when ``folder`` was replaced by another save since :func:`folder_identity` gave
    ``before``: what was read from it may mix two saves (one's config, the other's weights)."""
    if folder_identity(folder) != before:
        raise ValueError(f"{folder} was replaced by a new save while it was being loaded (a training run saving "
                         "there?), so what was read could mix two saves; nothing was loaded. Load it again.")


def save_folder_atomically(save_directory: str | os.PathLike, write: Callable[[Path], object],
                           owned: Iterable[str] = OWNED_FILES) -> Path:
    """Run ``write(tmp)`` on a fresh temporary sibling of ``save_directory``, then swap it in as a whole.

    ``save_directory`` then holds exactly what ``write`` wrote, plus the entries it held before that are neither in
    ``owned`` nor written now (kept: notes, ``checkpoint-*`` folders). The old folder is moved aside and removed.
    If ``write`` (or anything before the swap) fails, ``save_directory`` is untouched and the temporary folder is
    removed. Concurrent savers each swap in a complete folder; the last one wins. Returns ``save_directory``.
    """
    # the full path ("." has no name and no sibling), links resolved: a link to the folder stays a link, and the
    # folder it points to is the one replaced
    folder = Path(os.path.realpath(save_directory))
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"Cannot save into {folder}: it is a file. Pass a folder (it is created if needed).")
    if folder.parent == folder:
        raise ValueError(f"Cannot save an adapter as the root folder {folder}: pass a folder inside it.")
    problem = save_folder_problem(folder) if folder.is_dir() else None
    if problem is not None:
        raise ValueError(f"Cannot save into {save_directory}: {problem}; nothing was written.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    clear_interrupted_saves(folder, owned)
    cwd_is_folder = folder.is_dir() and os.path.samefile(os.getcwd(), folder)
    tmp = make_staging(folder, SAVING)
    try:
        _swap_in(folder, tmp, write, owned)
        return Path(save_directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cwd_is_folder and folder.is_dir():
            os.chdir(folder)  # the working directory was the old folder, now removed: enter the new one


def _swap_in(folder: Path, tmp: Path, write: Callable[[Path], object], owned: Iterable[str]) -> Path:
    """The body of :func:`save_folder_atomically`: fill ``tmp``, then swap it in for ``folder``."""
    os.chmod(tmp, 0o777 & ~_umask())
    write(tmp)
    written = sorted(entry.name for entry in tmp.iterdir())
    # what the save wrote, so that a kill from here on can tell the folder's own entries (moved in next) from it
    (tmp / _WRITTEN).write_text(json.dumps(written), encoding="utf-8")
    try:
        present = [entry.name for entry in folder.iterdir()]
    except OSError:
        present = []
    replaced = owned_entries(owned, present) | {*written, _WRITTEN}
    try:
        return _swap(folder, tmp, replaced)
    finally:
        (folder / _WRITTEN).unlink(missing_ok=True)


def _swap(folder: Path, tmp: Path, replaced: set[str]) -> Path:
    """Swap the filled ``tmp`` in for ``folder``, keeping the entries of ``folder`` not in ``replaced``."""
    for _ in range(100):  # retried only while other savers race for the same folder
        if not folder.exists():
            try:
                os.rename(tmp, folder)  # atomic; fails if another saver created a non-empty folder meanwhile
                return folder
            except FileExistsError:
                continue
            except OSError as err:
                if err.errno != errno.ENOTEMPTY:
                    raise
                continue
        _move_entries(folder, tmp, replaced)  # keep what is not the adapter's
        if _EXCHANGE is not None and _EXCHANGE(str(tmp), str(folder)):
            _move_entries(tmp, folder, replaced)  # tmp now holds the old folder: rescue late arrivals
            return folder
        aside = aside_path(folder)
        try:
            os.rename(folder, aside)
        except FileNotFoundError:
            continue
        try:
            os.rename(tmp, folder)
        except OSError:
            os.rename(aside, folder)
            continue
        _move_entries(aside, folder, replaced)
        shutil.rmtree(aside, ignore_errors=True)
        return folder
    raise OSError(f"Could not swap the new adapter into {folder}: other processes keep replacing it.")


# ---------------------------------------------------------------------------------------------- weights files
def _data_offset(blob: bytes | memoryview) -> int:
    """Where a safetensors file's tensor data starts (after the 8-byte length and the JSON header)."""
    if len(blob) < 8:
        raise ValueError("the file is shorter than a safetensors header")
    (header_length,) = struct.unpack("<Q", bytes(blob[:8]))
    if header_length > len(blob) - 8:
        raise ValueError(f"the header claims {header_length} bytes but the file has {len(blob)}")
    return 8 + header_length


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``ValueError`` naming the first tensor of ``tensors`` that holds NaN or infinite values."""
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"{what}: tensor {name} holds {bad} non-finite value(s) (NaN or inf).")


def meta_device_problem(tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> str | None:
    """Why ``what`` cannot run or be saved when one of the named ``tensors`` is on the ``meta`` device (shapes, no
    data: built under ``torch.device("meta")`` / accelerate's ``init_empty_weights``, or moved with
    ``.to("meta")``); None when none is. M²IST probes its towers with real forward passes and saves real values,
    so meta weights are not supported: there is nothing to compute or save from."""
    names = [name for name, tensor in tensors if tensor.is_meta]
    if not names:
        return None
    return (f"{what} has {len(names)} tensor(s) on the meta device, which hold no data (e.g. {names[0]}): it was built "
            "under torch.device('meta') / init_empty_weights() or moved with .to('meta'). m2ist needs real weights: "
            "load them (from_pretrained, or module.to_empty(device='cpu') then load_state_dict) and keep the model "
            "on a real device ('cpu', 'cuda').")


def module_meta_problem(module: torch.nn.Module, what: str) -> str | None:
    """:func:`meta_device_problem` for all of ``module``'s parameters and buffers."""
    return meta_device_problem(itertools.chain(module.named_parameters(), module.named_buffers()), what)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The SHA-256 that :func:`write_safetensors` records for ``tensors`` (of their data, not of names or metadata):
    equal tensors give equal digests, so results can name the weights they measured."""
    return _digests(tensors)[0]


def _layout_sha256(header: dict[str, Any]) -> str:
    """The SHA-256 of a safetensors header's tensor entries (names, dtypes, shapes, data offsets), metadata left out:
    what tells two same-sized tensors apart, which the data's digest cannot."""
    entries = {name: entry for name, entry in header.items() if name != "__metadata__"}
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _digests(tensors: dict[str, torch.Tensor]) -> tuple[str, str]:
    """``(data SHA-256, layout SHA-256)`` of ``tensors`` as :func:`write_safetensors` lays them out."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    plain = save_safetensors_bytes(tensors)
    offset = _data_offset(plain)
    return (hashlib.sha256(memoryview(plain)[offset:]).hexdigest(),
            _layout_sha256(json.loads(plain[8:offset].decode("utf-8"))))


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes; ``__metadata__``), without its data."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        size = os.fstat(handle.fileno()).st_size
        if length > size - 8:  # never trust the length enough to allocate it: a damaged file claims exabytes
            raise ValueError(f"{path}: the safetensors header claims {length} bytes but the file has {size}")
        header = json.loads(handle.read(length).decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not a JSON object")
    return header


def recorded_sha256(path: Path) -> str | None:
    """The SHA-256 recorded in a weights file by :func:`write_safetensors`; None when the file is missing,
    unreadable or records none."""
    try:
        value = (_read_header(path).get("__metadata__") or {}).get(SHA256_KEY)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, str) else None


def trainable_counts(path: Path) -> dict[str, int]:
    """``{"side": n, "head": n}``: the parameters of the side network and the head saved in a weights file."""
    counts = {"side": 0, "head": 0}
    for name, entry in _read_header(path).items():
        role = name.split(".", 1)[0]
        if role in counts and isinstance(entry, dict):
            counts[role] += math.prod(entry.get("shape") or ())
    return counts


def _sorted_metadata(blob: bytes) -> bytes:
    """``blob`` (a safetensors file) with its ``__metadata__`` entries in sorted order, the rest byte for byte:
    safetensors writes them in a hash map's order, which changes from one save to the next, so the same weights gave
    other bytes (each push uploaded them again, and a push of unchanged weights made a commit)."""
    offset = _data_offset(blob)
    header = json.loads(blob[8:offset].decode("utf-8"))
    if not isinstance(header.get("__metadata__"), dict):
        return blob
    ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > offset - 8:  # (never: the same entries in another order) keep the file as safetensors wrote it
        return blob
    return blob[:8] + text + b" " * (offset - 8 - len(text)) + blob[offset:]


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to ``path`` atomically, with the SHA-256 of the tensor data and of their layout (names,
    dtypes, shapes) in the metadata; refuse non-finite tensors (a diverged run must not leave weights that load)."""
    problem = meta_device_problem(tensors.items(), f"Refusing to save {path.name}: the state")
    if problem:
        raise ValueError(problem)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    check_finite(tensors, f"Refusing to save {path.name}")
    metadata = {"format": "pt", "m2ist_version": __version__, **(metadata or {})}
    data_sha, layout_sha = _digests(tensors)
    blob = _sorted_metadata(save_safetensors_bytes(tensors, metadata={**metadata, SHA256_KEY: data_sha,
                                                                      LAYOUT_SHA256_KEY: layout_sha}))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, write)


def save_trainable_state(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` (side and head tensors only) to a safetensors file, atomically."""
    tower_keys = [k for k in state if not k.startswith(TRAINABLE_PREFIXES)]
    if tower_keys:
        raise ValueError(f"Refusing to save tower tensors {tower_keys[:3]}: only side and head tensors are saved.")
    write_safetensors(path, state)


def _redo_advice(path: Path) -> str:
    """How to get a sound copy of ``path``: save it again, or, for a file of the Hub cache (which a load never
    downloads again once there), delete the cache's copy so that the next load downloads it afresh."""
    if re.search(r"(?:^|/)snapshots/[0-9a-f]{40}/", path.as_posix()):
        blob = path.resolve()
        copy = f"{path}" + (f" and the file it links to, {blob}" if blob != path.absolute() else "")
        return (f"It is a copy in the Hub cache, which loading again would reuse: delete {copy}, then load again to "
                "download it afresh.")
    return "Save or download it again."


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, checking its SHA-256 when it records one; a truncated, corrupted or damaged file
    raises a one-line ``ValueError`` and nothing is loaded."""
    advice = f"nothing was loaded. {_redo_advice(Path(path))}"
    try:
        if not Path(path).is_file():
            raise ValueError("not a regular file")
        blob = Path(path).read_bytes()
        offset = _data_offset(blob)
        header = json.loads(blob[8:offset].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        ends = [entry["data_offsets"][1] for key, entry in header.items()
                if key != "__metadata__" and isinstance(entry, dict) and len(entry.get("data_offsets") or ()) == 2]
        if ends and len(blob) - offset < max(ends):
            raise ValueError(f"its tensor data should take {max(ends)} bytes, the file holds {len(blob) - offset}")
        metadata = header.get("__metadata__") or {}
        recorded = metadata.get(SHA256_KEY)
        if recorded is not None and hashlib.sha256(memoryview(blob)[offset:]).hexdigest() != recorded:
            raise ValueError(f"{path} is damaged: its tensor data does not match the SHA-256 recorded when it was "
                             f"saved; {advice}")
        recorded = metadata.get(LAYOUT_SHA256_KEY)
        if recorded is not None and _layout_sha256(header) != recorded:
            raise ValueError(f"{path} is damaged: its tensors' names, dtypes or shapes do not match those recorded "
                             f"when it was saved; {advice}")
        return load_safetensors_bytes(blob)
    except ValueError as err:
        if str(err).startswith(f"{path} is damaged"):
            raise
        raise ValueError(f"{path} is corrupted or truncated ({err}); {advice}") from err
    except (SafetensorError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupted or truncated ({err}); {advice}") from err


#: ``(saved, model)`` dtypes whose cast loses nothing: the only casts loading makes without being asked.
_EXACT_CASTS = {(torch.bfloat16, torch.float32), (torch.float16, torch.float32)}


def load_trainable_state(model: nn.Module, path: Path) -> None:
    """Load the side and head tensors of ``path`` into ``model`` strictly, or raise naming every difference
    (missing or unexpected names, other shapes, a dtype that would lose precision, non-finite values); nothing is
    loaded then. Only exact casts happen: 16-bit floats into a float32 model."""
    state = read_safetensors(path)
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    dtypes = [f"{k}: file {state[k].dtype} vs model {v.dtype}" for k, v in expected.items()
              if k in state and state[k].dtype != v.dtype and (state[k].dtype, v.dtype) not in _EXACT_CASTS]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("shape mismatches", shapes),
                         ("dtype mismatches", dtypes)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        hint = ("It was saved for another configuration or other towers" if missing or unexpected or shapes else
                "It was saved in another dtype: load it with from_pretrained(..., dtype='auto') (or that dtype)")
        raise ValueError(f"{path} does not fit this model ({'; '.join(problems)}). {hint}; nothing was loaded.")
    try:
        check_finite(state, str(path))
    except ValueError as err:
        raise ValueError(f"{err} The run that wrote it diverged or the file is damaged; nothing was loaded.") from None
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(state[key])
