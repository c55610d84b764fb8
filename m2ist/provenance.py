"""Which towers an adapter was trained on, and loading them again exactly.

An adapter records, per tower, the class as passed, its Hub id or path, the commit actually loaded and the dtype
of its weights (:meth:`m2ist.model.RECModel._record_towers`); :func:`tower_identity` finds the commit (transformers 5
no longer fills ``config._commit_hash``), :func:`_load_recorded_tower` loads the tower again from the record, and
:func:`_warn_if_other_tower` names a given tower that is not the recorded one.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import M2ISTConfig

__all__ = ["commit_of", "same_tower_name", "tower_class", "tower_identity"]

logger = logging.getLogger(__name__)


def tower_identity(model: nn.Module) -> tuple[str | None, str | None, str]:
    """The Hub id / path a tower was loaded from, its commit, and why the commit is unknown for a Hub id ("" when
    known, or for a plain folder).

    transformers 5 no longer fills ``config._commit_hash``: the commit is read from a cache snapshot path
    (``.../snapshots/<sha>/``), else it is the one revision of the repo in the Hub cache whose weights are the
    tower's (see :func:`commit_of`).
    """
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or None
    commit, why = getattr(config, "_commit_hash", None), ""
    if name and commit is None:
        commit, why = _find_commit(name, model=model)
    snapshot = re.search(r"(?:^|/)models--([^/]+)/snapshots/[0-9a-f]{40}/?$", str(name or ""))
    if snapshot:  # a Hub cache folder: record the repo id, the commit pins the files
        name = snapshot.group(1).replace("--", "/")
    elif name and not Path(name).is_absolute() and Path(name).is_dir():
        # a relative folder ("towers/vit") is where from_pretrained found it, from this working directory; recorded
        # as is, a reload from elsewhere would take it for a Hub id
        name = str(Path(name).resolve())
    return name, commit, why


def commit_of(name_or_path: str, cache_dir: str | os.PathLike | None = None,
              model: nn.Module | None = None) -> str | None:
    """The commit a tower named ``name_or_path`` was loaded from, when it can be known: the ``<sha>`` of a
    ``snapshots/<sha>`` folder; for a Hub id, the revision in the Hub cache whose weights are ``model``'s (without
    ``model``: the cache's record of the repo's ``main``); None for a plain folder or when it cannot be told."""
    return _find_commit(name_or_path, cache_dir, model)[0]


def _find_commit(name_or_path: str, cache_dir: str | os.PathLike | None = None,
                 model: nn.Module | None = None) -> tuple[str | None, str]:
    """:func:`commit_of` and, when a Hub id's commit cannot be told, why."""
    match = re.search(r"(?:^|/)snapshots/([0-9a-f]{40})(?:/|$)", str(name_or_path))
    if match:
        return match.group(1), ""
    if Path(name_or_path).exists():
        return None, ""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(name_or_path), "config.json", cache_dir=cache_dir)
    except Exception:  # not a repo id
        return None, ""
    main = re.search(r"snapshots/([0-9a-f]{40})/", str(cached)) if isinstance(cached, str) else None
    if main is None:
        return None, "the Hub cache does not hold it (was it loaded through another cache_dir?)"
    if model is None:
        return main.group(1), ""
    # a tower loaded with revision=..., or before a newer main was fetched, is not refs/main's snapshot: the
    # weights tell the cached revisions apart
    snapshots = Path(cached).parents[1]
    revisions = sorted(p.name for p in snapshots.iterdir() if p.is_dir() and re.fullmatch(r"[0-9a-f]{40}", p.name))
    candidates = [sha for sha in revisions if _same_weights(model, snapshots / sha) is not False]
    if len(candidates) == 1:
        return candidates[0], ""
    if not candidates:
        return None, f"none of the {len(revisions)} revisions of it in the Hub cache holds the tower's weights"
    return None, f"{len(candidates)} revisions of it in the Hub cache could hold the tower's weights"


def _same_weights(model: nn.Module, folder: Path) -> bool | None:
    """Whether the safetensors files in ``folder`` hold ``model``'s weights, judged on three tensors (the smallest,
    the median and the largest of those the model has, up to 4 M values each, so a tower of any size costs a few
    tens of MB read at most) compared in the model's dtype; None when it cannot be told (no safetensors file, no
    tensor names in common)."""
    from safetensors import safe_open

    state = model.state_dict()
    prefix = f"{getattr(model, 'base_model_prefix', '') or ''}."
    found: list[tuple[int, str, str, Path]] = []
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    for own in (key, key.removeprefix(prefix), prefix + key):
                        if own in state and list(f.get_slice(key).get_shape()) == list(state[own].shape):
                            found.append((state[own].numel(), key, own, path))
                            break
        except Exception:  # a damaged or foreign file tells nothing
            continue
    found = sorted(entry for entry in found if entry[0] <= 4 * 2**20)
    if not found:
        return None
    picks = {found[0], found[len(found) // 2], found[-1]}
    for _, key, own, path in sorted(picks):
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_tensor(key)
        if not torch.equal(stored.to(state[own].dtype), state[own].detach().cpu()):
            return False
    return True


def tower_class(class_name: str | None) -> type:
    """The transformers model class recorded for a tower, looked up by attribute name on ``transformers`` only
    (never an arbitrary import); ``AutoModel`` when none is recorded or the name is not a model class."""
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    if class_name:
        logger.warning("%r is not a transformers model class: re-loading the tower with AutoModel.", class_name)
    return transformers.AutoModel


def _load_recorded_tower(config: M2ISTConfig, modality: str, trust_remote_code: bool, hub: dict[str, Any],
                         adapter: Any) -> nn.Module:
    """:func:`_load_tower`, with a failure explained in one line: the name came from the adapter's config, whether
    it is a local path, and whether offline mode is on."""
    if not getattr(config, f"{modality}_model_name_or_path"):
        return _load_tower(config, modality, trust_remote_code, hub)  # raises: no name recorded
    try:
        return _load_tower(config, modality, trust_remote_code, hub)
    except (OSError, ValueError) as err:  # ValueError: a folder that is not a model ("Unrecognized model in ...")
        from huggingface_hub import constants

        name = str(getattr(config, f"{modality}_model_name_or_path"))
        if Path(name).is_absolute() or name.startswith((".", "~")) or ".." in Path(name).parts:
            where = (f"a local path, resolved against the working directory {Path.cwd()}" if not Path(name).is_absolute()
                     else "a local path") + (": no such folder" if not Path(name).expanduser().exists() else "")
        else:
            where = "a Hub id" + (" and offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True): the tower is "
                                  "not in the Hub cache" if hub.get("local_files_only") or constants.HF_HUB_OFFLINE else "")
        reason = " ".join(str(err).split())
        raise OSError(f"The adapter {adapter} records the {modality} tower {name!r} ({where}), which cannot be loaded "
                      f"({reason}). Pass {modality}_model= (or --{modality}-model) to give the tower yourself.") from err



def _load_tower(config: M2ISTConfig, modality: str, trust_remote_code: bool, hub: dict[str, Any]) -> nn.Module:
    """Re-load a tower: its recorded class, from its recorded name at its recorded commit, in its recorded dtype,
    through the same endpoint, token, cache and offline setting as the adapter."""
    name = getattr(config, f"{modality}_model_name_or_path")
    if not name:
        raise ValueError(f"The saved config records no {modality} tower name: pass {modality}_model= to "
                         "SideTunedModel.from_pretrained().")
    cls = tower_class(getattr(config, f"{modality}_model_class", None))
    revision = getattr(config, f"{modality}_revision")
    logger.info("Loading the %s tower %s (%s) at %s", modality, name, cls.__name__, revision or "its latest commit")
    folder = name
    if not Path(name).is_dir():
        from huggingface_hub import snapshot_download

        options = {"repo_id": name, "revision": revision, "token": hub["token"], "cache_dir": hub["cache_dir"],
                   "local_files_only": hub["local_files_only"], "endpoint": hub["endpoint"]}
        folder = snapshot_download(**options, allow_patterns=["*.json", "*.safetensors"])
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(**options, allow_patterns=["*.json", "pytorch_model*.bin"])
    dtype = getattr(config, f"{modality}_dtype", None)  # as trained: transformers 5 would load the stored dtype
    return cls.from_pretrained(folder, trust_remote_code=trust_remote_code, **({"dtype": getattr(torch, dtype)} if dtype else {}))


def same_tower_name(name: str, recorded: str | None) -> bool:
    """Whether the tower ``name`` is the recorded one by name: the same Hub id, or the same local folder."""
    if not recorded:
        return False
    if name == recorded:
        return True
    mine, theirs = Path(name).expanduser(), Path(recorded).expanduser()
    return mine.exists() and theirs.exists() and mine.resolve() == theirs.resolve()


def _warn_if_other_tower(saved: M2ISTConfig, modality: str, name: str | None, commit: str | None, *,
                         adapter: Any) -> None:
    """Warn when the tower given for ``modality`` is not the one the adapter recorded: another commit when both
    are known, else another name (paths compared resolved). Nothing to compare: silent."""
    recorded, recorded_commit = getattr(saved, f"{modality}_model_name_or_path"), getattr(saved, f"{modality}_revision")
    if not recorded or not name:
        return
    if commit and recorded_commit:
        other = commit != recorded_commit
    else:
        other = not same_tower_name(name, recorded)
    if other:
        logger.warning("The adapter %s was trained on the %s tower %r%s, but the one given is %r%s. It has the same "
                       "architecture, so it loads, but the boxes may differ: pass the tower the adapter was trained on "
                       "(or ignore this if both hold the same weights).", adapter, modality, recorded,
                       f" (commit {recorded_commit[:12]})" if recorded_commit else "", name,
                       f" (commit {commit[:12]})" if commit else "")
