"""Push folders to, and pull files from, the Hugging Face Hub.

Thin, generic helpers over `huggingface_hub` used by `SideTunedModel.push_to_hub` / `from_pretrained`:

- `push_folder_to_hub` creates the repo if needed and uploads a folder in one commit.
- `push_to_hub` saves into a temporary folder with a callback (e.g. `model.save_pretrained`) and pushes it.
- `resolve_pretrained` turns a local folder or a Hub repo id into a local folder holding the requested files,
  using the standard Hub cache (so a repo pulled once also loads with `HF_HUB_OFFLINE=1`).

Pass `endpoint=` to talk to another Hub (a mirror, or the loopback server used in tests): `HF_ENDPOINT` is
only read when `huggingface_hub` is imported.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path, PurePosixPath

from huggingface_hub import CommitInfo, HfApi, constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

__all__ = ["PretrainedNotFoundError", "push_folder_to_hub", "push_to_hub", "resolve_pretrained"]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP clients' "could not talk to the server" errors (connection refused, DNS, timeouts, TLS)."""
    found: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found) or (ConnectionError,)


_TRANSPORT_ERRORS = _transport_errors()

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN), or pass token=..."


class PretrainedNotFoundError(FileNotFoundError):
    """The requested files were found neither in a local folder, nor on the Hub, nor in the Hub cache.

    The message says what was looked for and how to fix it; the original `huggingface_hub` error, if any,
    is chained as `__cause__`.
    """


def push_folder_to_hub(
    folder: str | PathLike[str],
    repo_id: str,
    *,
    commit_message: str = "Upload with m2ist",
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    endpoint: str | None = None,
) -> CommitInfo:
    """Upload every file of `folder` to the model repo `repo_id` in one commit, creating the repo if needed.

    Args:
        folder: local directory to upload (its layout is kept; `.git/` is skipped).
        repo_id: `"namespace/name"` of the model repo.
        commit_message / commit_description: commit title and body.
        private: visibility when the repo is created (an existing repo keeps its visibility).
        token: Hub token; None uses the saved login / `HF_TOKEN`, False sends none.
        revision: branch to commit to (created from `main` if missing); None means `main`.
        create_pr: open a pull request with the change instead of committing to the branch.
        endpoint: Hub URL; None uses `HF_ENDPOINT` / huggingface.co.

    Returns:
        The commit's `CommitInfo`: a `str` equal to the commit URL, with `.oid` and `.pr_url`.
    """
    folder_path = Path(folder)
    if not folder_path.is_dir():
        raise NotADirectoryError(f"Cannot push '{folder}': it is not a directory. Pass the folder to upload.")
    if not any(path.is_file() for path in folder_path.rglob("*")):
        raise ValueError(f"Cannot push '{folder}': the folder contains no files.")
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ValueError(
            f"create_pr=True opens the pull request against '{constants.DEFAULT_REVISION}'; "
            f"drop revision={revision!r} or drop create_pr."
        )
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder_path,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except _TRANSPORT_ERRORS as error:
        raise ConnectionError(
            f"Cannot reach the Hub at {api.endpoint} to push '{repo_id}' ({type(error).__name__}: "
            f"{' '.join(str(error).split()) or 'no answer'}). Check the endpoint (endpoint= or HF_ENDPOINT) and the "
            "network, then push again; no commit was made."
        ) from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if isinstance(error, RepositoryNotFoundError) or status in (401, 403):
            raise PermissionError(
                f"The Hub at {api.endpoint} refused to write to '{repo_id}' (HTTP {status}). Make sure you may "
                f"write to the namespace '{repo_id.split('/')[0]}': {_LOGIN_HINT} with a write token."
            ) from error
        raise


def push_to_hub(save_fn: Callable[[Path], object], repo_id: str, **push_kwargs: object) -> CommitInfo:
    """Call `save_fn(folder)` on a fresh temporary folder, then `push_folder_to_hub(folder, repo_id, **push_kwargs)`.

    `SideTunedModel.push_to_hub` uses this with its own `save_pretrained`. Returns the `CommitInfo` (the commit URL).
    """
    with tempfile.TemporaryDirectory(prefix="m2ist-push-") as tmp:
        folder = Path(tmp)
        save_fn(folder)
        return push_folder_to_hub(folder, repo_id, **push_kwargs)  # type: ignore[arg-type]


def resolve_pretrained(
    name_or_path: str | PathLike[str],
    *,
    filenames: Sequence[str],
    optional_filenames: Sequence[str] = (),
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | PathLike[str] | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> Path:
    """Return a local folder that holds `filenames` (and whichever `optional_filenames` exist).

    `name_or_path` is either an existing local directory (checked, then returned as is; `revision` and the Hub
    options are ignored) or a Hub model repo id (`"namespace/name"`): the files are then downloaded into the Hub
    cache (`cache_dir`, default `HF_HUB_CACHE`) and the cache's snapshot folder of the resolved commit is
    returned. Every file comes from the same commit, even if the branch moves during the download. With
    `local_files_only=True` or `HF_HUB_OFFLINE=1` only the cache is used.

    Raises:
        PretrainedNotFoundError (a FileNotFoundError): missing local files, unknown repo / revision / file,
            or offline and not cached; the message says how to fix it.
    """
    if isinstance(filenames, str) or isinstance(optional_filenames, str):
        raise TypeError("filenames and optional_filenames must be lists of file names, not a single string.")
    if not filenames:
        raise ValueError("filenames must name at least one file to resolve.")

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return _check_local_folder(local, filenames)
    if local.exists():
        raise PretrainedNotFoundError(
            f"'{name_or_path}' is a file, not a folder: pass the folder that contains {list(filenames)}, or a Hub repo id."
        )
    repo_id = str(name_or_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise PretrainedNotFoundError(
            f"'{repo_id}' is neither a local folder nor a Hub repo id: no folder exists at {local.absolute()}, and "
            "a repo id has the form 'namespace/name'. Check the path, or pass the id of a model repo on the Hub."
        ) from None
    if isinstance(name_or_path, PathLike):
        raise PretrainedNotFoundError(
            f"Local folder '{name_or_path}' does not exist. Pass an existing folder, or the Hub repo id as a str."
        )

    snapshot_dir: Path | None = None
    pinned_revision = revision
    for filename in [*filenames, *optional_filenames]:
        required = filename in filenames
        try:
            downloaded = Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=pinned_revision,
                    token=token,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    endpoint=endpoint,
                )
            )
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
            if not required and isinstance(error, EntryNotFoundError):
                continue  # an optional file the repo lacks (or, offline, that was never cached)
            raise PretrainedNotFoundError(
                _explain(
                    error,
                    repo_id=repo_id,
                    filename=filename,
                    filenames=filenames,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    endpoint=endpoint,
                    token=token,
                )
            ) from error
        if snapshot_dir is None:
            snapshot_dir = downloaded.parents[len(PurePosixPath(filename).parts) - 1]
            if _COMMIT_SHA.fullmatch(snapshot_dir.name):
                pinned_revision = snapshot_dir.name  # later files come from the same commit
    assert snapshot_dir is not None  # filenames is not empty and every required file resolved
    return snapshot_dir


def _check_local_folder(folder: Path, filenames: Sequence[str]) -> Path:
    missing = [name for name in filenames if not (folder / name).is_file()]
    if missing:
        present = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
        shown = present[:20] + ([f"... ({len(present) - 20} more)"] if len(present) > 20 else [])
        raise PretrainedNotFoundError(
            f"Local folder '{folder}' is missing {missing} (needed: {list(filenames)}; present: {shown or 'nothing'}). "
            "Pass the folder written by save_pretrained(), or a Hub repo id."
        )
    return folder


def _explain(
    error: Exception,
    *,
    repo_id: str,
    filename: str,
    filenames: Sequence[str],
    revision: str | None,
    cache_dir: str | PathLike[str] | None,
    local_files_only: bool,
    endpoint: str | None,
    token: str | bool | None,
) -> str:
    """A message for a failed download: what was looked for, where, and how to fix it."""
    hub = endpoint or constants.ENDPOINT
    at_revision = f"revision '{revision or constants.DEFAULT_REVISION}'"
    if isinstance(error, GatedRepoError):
        return f"'{repo_id}' on {hub} is gated: accept its conditions on the repo page, then {_LOGIN_HINT}."
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"No model repo '{repo_id}' on {hub}, and no local folder of that name in {Path.cwd()}. Check the "
            f"repo id ('namespace/name'); if the repo is private, {_LOGIN_HINT}; or pass a local folder "
            f"that contains {list(filenames)}."
        )
    if isinstance(error, RevisionNotFoundError):
        return (
            f"Repo '{repo_id}' on {hub} has no {at_revision}. Pass an existing branch, tag or commit sha, "
            "or revision=None for the default branch."
        )
    if isinstance(error, LocalEntryNotFoundError):
        cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
        if local_files_only or constants.HF_HUB_OFFLINE:
            why = "offline mode is on (HF_HUB_OFFLINE=1 or local_files_only=True)"
        else:
            why = f"the Hub at {hub} could not be reached"
        return (
            f"'{filename}' of '{repo_id}' ({at_revision}) is not in the Hub cache {cache}, and {why}. Load it "
            f"once online (same cache_dir / HF_HOME) to fill the cache, or pass a local folder that contains "
            f"{list(filenames)}."
        )
    present = _list_repo_files(repo_id, revision=revision, token=token, endpoint=endpoint)
    listing = f" It contains: {present}." if present is not None else ""
    return (
        f"Repo '{repo_id}' on {hub} ({at_revision}) has no file '{filename}' (needed: {list(filenames)}).{listing} "
        "Check the repo id and revision: is it a folder written by m2ist's save_pretrained / push_to_hub?"
    )


def _list_repo_files(repo_id: str, *, revision: str | None, token: str | bool | None, endpoint: str | None) -> list[str] | None:
    try:
        return sorted(HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=revision))
    except Exception:  # only used to enrich an error message
        return None
