"""Push folders to, and pull files from, the Hugging Face Hub.

Thin, generic helpers over `huggingface_hub` used by `SideTunedModel.push_to_hub` / `from_pretrained`:

- `push_folder_to_hub` creates the repo if needed and uploads a folder's adapter files in one commit (never
  optimizer state, training arguments or checkpoints); the same commit deletes the adapter files an earlier push
  left that the folder no longer has (a processor, an adapter's subfolder), and nothing else.
- `push_to_hub` saves into a temporary folder with a callback (e.g. `model.save_pretrained`) and pushes it.
- `resolve_pretrained` turns a local folder or a Hub repo id into a local folder holding the requested files,
  with one `snapshot_download(allow_patterns=...)` into the standard Hub cache (so a repo pulled once also loads
  with `HF_HUB_OFFLINE=1`).

Pass `endpoint=` to talk to another Hub (a mirror, or the loopback server used in tests): `HF_ENDPOINT` is
only read when `huggingface_hub` is imported.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from huggingface_hub import CommitInfo, HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, filter_repo_objects, get_session, hf_raise_for_status, validate_repo_id

from .card import CARD_NAME, card_for_push, card_results_problem, own_text, with_generated_parts
from .config import CONFIG_NAME, check_flags
from .save_and_load import (
    ADAPTER_FILES,
    PROCESSOR_CONFIG_NAME,
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    WEIGHTS_NAME,
    adapter_name_problem,
    folder_identity,
    foreign_model_files,
    owned_entries,
)
from .version import __version__

__all__ = ["ADAPTER_PATTERNS", "IGNORED_PATTERNS", "PretrainedNotFoundError", "check_token", "fetch_root_processor",
           "full_repo_id", "push_folder_to_hub", "push_to_hub", "resolve_adapter", "resolve_pretrained"]

#: What a push uploads by default: an adapter's own files (config, weights, card, processor, tokenizer), at the top
#: of the folder or in an adapter's subfolder.
ADAPTER_PATTERNS: tuple[str, ...] = (*ADAPTER_FILES, *(f"*/{name}" for name in ADAPTER_FILES))
#: Never uploaded by default, even when they match: Trainer checkpoints, run logs, caches.
IGNORED_PATTERNS: tuple[str, ...] = ("checkpoint-*", "*/checkpoint-*", "runs/*", "*/runs/*", ".git/*", ".cache/*",
                                     "*/.cache/*")


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

_LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN), or pass token=..."
#: A pull request's ref (``refs/pr/<n>``) and a full commit sha, as a push's ``revision``.
_PR_REF = re.compile(r"refs/pr/(\d+)")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


def check_token(token: object) -> None:
    """Refuse a token given as the text of a Python value (``"None"``, ``"False"``, ``"null"``, ``""``: a config file
    or command line read as text): it would be sent as the token, which the Hub refuses, and the refusal reads as a
    repo that does not exist or may not be written to."""
    if isinstance(token, str) and token.strip().lower() in ("", "none", "null", "false", "true"):
        raise ValueError(f"token={token!r} is text, not a Hub token: pass token=None (the saved login or HF_TOKEN), "
                         "token=False (send none) or a token such as 'hf_...'.")


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
    allow_patterns: Sequence[str] | None = ADAPTER_PATTERNS,
    ignore_patterns: Sequence[str] | None = IGNORED_PATTERNS,
) -> CommitInfo:
    """Upload the adapter files of `folder` to the model repo `repo_id` in one commit, creating the repo if needed.

    Only an adapter's own files go up by default (`ADAPTER_PATTERNS`: `m2ist_config.json`, the weights, `README.md`,
    the processor and tokenizer files), never optimizer state, `training_args.bin`, `trainer_state.json` or
    `checkpoint-*` folders, so the output folder of a training run can be pushed as it is. The card's usage snippet
    loads from where the push puts it: `repo_id` (a card still showing the placeholder, or written for another repo,
    gets it) at `revision` (a branch other than `main`). A folder replaced by a new save while the push reads it
    (a training run saving there) is refused before any commit: the commit would mix files of two saves.

    The commit also deletes the repo's adapter files (an adapter file name at the root or in an adapter's
    subfolder, `README.md` excepted) that this push would upload but the folder does not hold, e.g. a processor or
    an adapter of an earlier push, so the repo loads as the folder does. Other files (notes, checkpoints, the card)
    are never deleted.

    A card the repo already holds at the same path is updated, not replaced (see `card_onto_repo`): its text and
    metadata written on the Hub are kept, with m2ist's generated section, tags, towers and results taken from the
    folder's card (a folder card with text of its own that differs replaces the Hub's text, with a warning).

    Args:
        folder: local directory to upload (its layout is kept).
        repo_id: `"namespace/name"` of the model repo.
        commit_message / commit_description: commit title and body.
        private: visibility when the repo is created (an existing repo keeps its visibility).
        token: Hub token; None uses the saved login / `HF_TOKEN`, False sends none.
        revision: branch to commit to (created from `main` if missing), or an open pull request's ref
            (`refs/pr/<n>`: the card's snippet then loads the branch it merges into); None means `main`. A commit
            sha, or a merged or closed pull request, is refused.
        create_pr: open a pull request with the change instead of committing to the branch.
        endpoint: Hub URL; None uses `HF_ENDPOINT` / huggingface.co.
        allow_patterns / ignore_patterns: which files to upload (fnmatch patterns on paths relative to `folder`);
            `allow_patterns=None, ignore_patterns=None` uploads every file.

    Returns:
        The commit's `CommitInfo`: a `str` equal to the commit URL, with `.oid` and `.pr_url`.
    """
    check_flags("push_folder_to_hub", private=private, create_pr=create_pr)  # create_pr="no" would open a PR
    check_token(token)
    folder_path = Path(folder)
    if not folder_path.is_dir():
        raise NotADirectoryError(f"Cannot push '{folder}': it is not a directory. Pass the folder to upload.")
    identity = folder_identity(folder_path)  # every save swaps in a new folder: a save while this reads is caught
    present = sorted(path.relative_to(folder_path).as_posix() for path in folder_path.rglob("*") if path.is_file())
    if not present:
        raise ValueError(f"Cannot push '{folder}': the folder contains no files.")
    selected = list(filter_repo_objects(present, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
    if not selected:
        shown = present[:20] + ([f"... ({len(present) - 20} more)"] if len(present) > 20 else [])
        raise ValueError(f"Cannot push '{folder}': none of its files is an adapter file (found {shown}). Push the "
                         "folder written by save_pretrained(), or pass allow_patterns=None to upload every file.")
    for name in selected:  # a card must not publish results of other weights than the ones pushed beside it
        if PurePosixPath(name).name == CARD_NAME:
            problem = card_results_problem((folder_path / name).read_text(encoding="utf-8", errors="replace"),
                                           (folder_path / name).parent)
            if problem:
                raise ValueError(
                    f"Cannot push '{folder}': {name} reports results that do not describe the weights pushed beside "
                    f"it ({problem}). Save the model again (save_pretrained writes the card for the weights it "
                    "writes) or evaluate these weights; no commit was made."
                )
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ValueError(
            f"create_pr=True opens the pull request against '{constants.DEFAULT_REVISION}'; "
            f"drop revision={revision!r} or drop create_pr."
        )
    if revision is not None and (not isinstance(revision, str) or not revision.strip()
                                 or _COMMIT_SHA.fullmatch(revision.lower())):
        raise ValueError(
            f"Cannot push to revision={revision!r}: a commit goes onto a branch (e.g. 'main' or 'dev', created if "
            "missing) or an open pull request ('refs/pr/<n>'), not onto a commit sha; no commit was made."
        )
    pull_request = _PR_REF.fullmatch(revision or "")
    api = HfApi(endpoint=endpoint, token=token, library_name="m2ist", library_version=__version__)
    try:
        repo_id = api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model").repo_id
        refuse_public_repo(api, repo_id, private)
        # where the card's usage snippet loads from once the commit is merged: the branch it lands on, or a pull
        # request's base branch (a PR's ref is not where its adapter is published)
        loads_from = None if create_pr or revision == constants.DEFAULT_REVISION else revision
        if pull_request:
            loads_from = _pull_request_base(api, repo_id, int(pull_request.group(1)))
        elif revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        lands_on = constants.DEFAULT_REVISION if create_pr else revision  # a PR opened now starts from main
        repo_files = api.list_repo_files(repo_id, revision=lands_on, repo_type="model")
        refuse_foreign_model(repo_id, repo_files, present)
        with tempfile.TemporaryDirectory(prefix="m2ist-upload-") as staging:
            cards = _repo_cards(api, repo_id, lands_on, [name for name in selected if name in repo_files
                                                         and PurePosixPath(name).name == CARD_NAME])
            try:
                _stage(folder_path, selected, Path(staging), repo_id, loads_from, cards)
            except FileNotFoundError:  # a file gone: the folder was replaced (checked below), or a plain error
                if folder_identity(folder_path) == identity:
                    raise
            if folder_identity(folder_path) != identity:
                raise ValueError(
                    f"Cannot push '{folder}': it was replaced by a new save while it was being read (a training run "
                    "saving there?), so the commit could mix files of two saves; no commit was made. Push again once "
                    "the save is done."
                )
            stale = _stale_adapter_files(repo_files, selected, allow_patterns, ignore_patterns)
            _warn_if_adapters_deleted(repo_id, stale)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                commit_message=commit_message,
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
                repo_type="model",
                delete_patterns=[glob.escape(path) for path in stale] or None,
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


def refuse_public_repo(api: HfApi, repo_id: str, private: bool | None, done: str = "no commit was made") -> None:
    """Refuse ``private=True`` for an existing public repo (``private=`` only applies to a repo a push creates): the
    push would publish the adapter. ``done``: what the refusal says was (not) done."""
    if private and not api.repo_info(repo_id, repo_type="model").private:
        raise ValueError(
            f"Cannot push to '{repo_id}' with private=True: the repo already exists and is public (private= only "
            "applies to a repo the push creates), so the push would publish the adapter. Make the repo private "
            f"first (HfApi().update_repo_settings({repo_id!r}, private=True)), push to another repo, or drop "
            f"private=True; {done}."
        )


def refuse_foreign_model(repo_id: str, repo_files: Sequence[str], present: Sequence[str] = (),
                         done: str = "no commit was made") -> None:
    """Refuse a repo whose root holds another model's weights (those of the folder pushed excepted: ``present``),
    whose tokenizer, processor and card an adapter pushed there would replace."""
    foreign = [name for name in foreign_model_files(f for f in repo_files if "/" not in f) if name not in present]
    if foreign:
        raise ValueError(
            f"Cannot push to '{repo_id}': the repo holds another model ({', '.join(foreign[:4])}), whose "
            "tokenizer, processor and card the adapter would replace. Push the adapter to a repo of its own "
            f"(e.g. '{repo_id}-m2ist'); {done}."
        )


def _is_adapter_file(path: str, repo_files: Sequence[str] = ()) -> bool:
    """Whether a repo path is an adapter file m2ist writes (and may delete): an adapter file name other than the
    card, at the root or in a subfolder named like an adapter; a processor or tokenizer file only beside an m2ist
    processor (``m2ist_processor.json`` in ``repo_files``), else someone else wrote it."""
    parts = PurePosixPath(path).parts
    if not parts or parts[-1] not in ADAPTER_FILES or parts[-1] == CARD_NAME:
        return False
    if not (len(parts) == 1 or (len(parts) == 2 and adapter_name_problem(parts[0]) is None)):
        return False
    beside = {PurePosixPath(f).name for f in repo_files if PurePosixPath(f).parent == PurePosixPath(path).parent}
    return parts[-1] in owned_entries(ADAPTER_FILES, beside)


def _stale_adapter_files(repo_files: Sequence[str], uploaded: Sequence[str], allow_patterns: Sequence[str] | None,
                         ignore_patterns: Sequence[str] | None) -> list[str]:
    """The repo's adapter files (of ``repo_files``) that this push would upload (same patterns) but the folder does
    not hold."""
    uploaded_paths = set(uploaded)
    candidates = [path for path in repo_files if _is_adapter_file(path, repo_files) and path not in uploaded_paths]
    return list(filter_repo_objects(candidates, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))


def _adapter_subfolders(files: Sequence[str]) -> list[str]:
    """The subfolders of a folder's or repo's ``files`` that hold an adapter (their own ``m2ist_config.json``)."""
    return sorted({PurePosixPath(f).parts[0] for f in files
                   if len(PurePosixPath(f).parts) == 2 and PurePosixPath(f).name == CONFIG_NAME})


def _warn_if_adapters_deleted(repo_id: str, stale: Sequence[str]) -> None:
    """Warn when a push deletes whole adapters of ``repo_id`` (the root one, or a ``<name>/`` subfolder's): the
    pushed folder lacks them, e.g. a model loaded with ``from_pretrained``, which loads the root adapter only."""
    gone = [f"{name!r} (in {name}/)" for name in _adapter_subfolders(stale)]
    if CONFIG_NAME in stale or WEIGHTS_NAME in stale:
        gone.insert(0, "the root one")
    if gone:
        warnings.warn(f"This push deletes adapters of '{repo_id}' that the pushed folder does not hold: "
                      f"{', '.join(gone)} (they stay in the repo's history). To push some adapters and keep the "
                      "repo's others, use model.push_to_hub(repo_id, selected_adapters=[...]).", UserWarning,
                      stacklevel=4)


def _stage(folder: Path, selected: Sequence[str], staging: Path, repo_id: str, revision: str | None,
           repo_cards: Mapping[str, str] | None = None) -> None:
    """Link (or copy) the selected files into `staging`; a card is laid onto the repo's card at the same path
    (`repo_cards`, see `card_onto_repo`) and its usage snippet loads from `repo_id` at `revision` (see
    `card_for_push`)."""
    for name in selected:
        source, target = folder / name, staging / name
        if PurePosixPath(name).name == CARD_NAME:
            target.parent.mkdir(parents=True, exist_ok=True)
            text = source.read_text(encoding="utf-8")
            pushed = card_for_push(card_onto_repo(text, (repo_cards or {}).get(name), f"{repo_id}/{name}"),
                                   repo_id, revision)
            if pushed != text:
                target.write_text(pushed, encoding="utf-8")
                continue
        link_or_copy(source, target)


def _pull_request_base(api: HfApi, repo_id: str, number: int) -> str | None:
    """The branch pull request ``number`` of ``repo_id`` merges into (None for ``main``); a merged or closed one, or
    a discussion that is not a pull request, is refused: a commit there would publish nothing."""
    details = api.get_discussion_details(repo_id, number, repo_type="model")
    if not details.is_pull_request or details.status in ("merged", "closed"):
        what = "a discussion, not a pull request" if not details.is_pull_request else f"{details.status}"
        raise ValueError(f"Cannot push to revision='refs/pr/{number}' of '{repo_id}': #{number} is {what}, so the "
                         "commit would publish nothing. Push with create_pr=True to open a new pull request; no "
                         "commit was made.")
    base = (details.target_branch or constants.DEFAULT_REVISION).removeprefix("refs/heads/")
    return None if base == constants.DEFAULT_REVISION else base


def _repo_cards(api: HfApi, repo_id: str, revision: str | None, paths: Sequence[str]) -> dict[str, str]:
    """``{path: text}`` of the cards at ``paths`` in ``repo_id`` at ``revision`` (those the push replaces), read from
    the Hub the push writes to (``api.endpoint``); a card gone meanwhile is left out. Any other failure raises (see
    `push_folder_to_hub`): pushing the folder's card instead would replace the repo's and lose its text."""
    cards: dict[str, str] = {}
    headers = build_hf_headers(token=api.token, library_name="m2ist", library_version=__version__)
    at = quote(revision or constants.DEFAULT_REVISION, safe="")
    for path in paths:
        response = get_session().get(f"{api.endpoint}/{repo_id}/resolve/{at}/{quote(path)}", headers=headers,
                                     follow_redirects=True)
        try:
            hf_raise_for_status(response)
        except EntryNotFoundError:
            continue
        cards[path] = response.content.decode("utf-8", errors="replace")
    return cards


def card_onto_repo(pushed: str, current: str | None, where: str) -> str:
    """The card a push commits when the repo already holds ``current`` at its path (``where``, for messages): the
    repo's card, with m2ist's generated section, results marker and metadata (library, towers, tags, datasets,
    results) taken from ``pushed``, so that text and metadata written on the Hub (a user's edits, a license) are
    kept, as ``save_pretrained`` keeps a folder's card. A ``pushed`` card with text of its own that differs from the
    repo's replaces that text, with a warning (the old text stays in the repo's history)."""
    if current is None or current == pushed:
        return pushed
    try:
        mine, theirs = ModelCard(pushed), ModelCard(current)
    except Exception as error:  # the Hub validates cards' metadata: only a hand-made commit gets here
        warnings.warn(f"The card {where} on the Hub could not be read ({type(error).__name__}: "
                      f"{' '.join(str(error).split())[:200]}): the push replaces it (the old one stays in the repo's "
                      "history).", UserWarning, stacklevel=4)
        return pushed
    if own_text(mine.text) and own_text(mine.text) != own_text(theirs.text):
        warnings.warn(f"The card {where} on the Hub has text of its own that differs from the pushed card's, which "
                      "replaces it (the old text stays in the repo's history). To keep the Hub's text, push with "
                      "model.push_to_hub() (it updates the repo's card) or edit the card in one place only.",
                      UserWarning, stacklevel=4)
        text = mine.text
    else:
        text = with_generated_parts(theirs.text, mine.text)
    data, new = theirs.data, mine.data
    data.library_name = new.library_name or data.library_name
    data.base_model = new.base_model or data.base_model
    for key in ("tags", "datasets"):  # the repo's, then the pushed card's
        merged = list(dict.fromkeys([*_listed(getattr(data, key, None)), *_listed(getattr(new, key, None))]))
        setattr(data, key, merged or None)
    for key in ("license", "language", "pipeline_tag"):  # as written on the Hub
        setattr(data, key, getattr(data, key, None) or getattr(new, key, None))
    data.eval_results = new.eval_results  # the results of the pushed weights, or none: never older weights'
    data.model_name = (data.model_name or new.model_name) if new.eval_results else data.model_name
    return f"---\n{data.to_yaml()}\n---\n{text}"


def _listed(value: object) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)  # type: ignore[call-overload]


def link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target`` (its folders made), or copy it where a link fails (another file system,
    links not allowed): a staged file whose original a later save replaces keeps the bytes it was staged with."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def full_repo_id(repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> str:
    """``repo_id`` with its namespace: a bare name is the token's user's repo (as ``create_repo`` places it), so the
    card read before a push, the card's usage snippet and the push itself all name the same repo."""
    check_token(token)
    if not isinstance(repo_id, str) or "/" in repo_id:
        return repo_id
    try:
        user = HfApi(endpoint=endpoint, token=token).whoami()["name"]
    except (*_TRANSPORT_ERRORS, OSError, KeyError, TypeError) as error:
        raise ValueError(f"Cannot tell whose repo {repo_id!r} is ({type(error).__name__}: "
                         f"{' '.join(str(error).split())[:200]}): give the repo id with its namespace "
                         f"('your-name/{repo_id}'); no commit was made.") from None
    return f"{user}/{repo_id}"


def push_to_hub(save_fn: Callable[[Path], object], repo_id: str, **push_kwargs: object) -> CommitInfo:
    """Call `save_fn(folder)` on a fresh temporary folder, then `push_folder_to_hub(folder, repo_id, **push_kwargs)`.

    The repo's current `README.md`, when there is one, is put in the folder first, so that a `save_fn` that updates
    an existing card (as `SideTunedModel.save_pretrained` does) keeps the text and metadata written on the Hub.
    `SideTunedModel.push_to_hub` uses this with its own `save_pretrained`. Returns the `CommitInfo` (the commit URL).
    """
    repo_id = full_repo_id(repo_id, token=push_kwargs.get("token"), endpoint=push_kwargs.get("endpoint"))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory(prefix="m2ist-push-") as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        _fetch_card(repo_id, folder, Path(tmp) / "cache", push_kwargs)
        save_fn(folder)
        return push_folder_to_hub(folder, repo_id, **push_kwargs)  # type: ignore[arg-type]


def fetch_root_processor(repo_id: str, into: Path, *, revision: str | None = None, create_pr: bool = False,
                         token: str | bool | None = None, endpoint: str | None = None) -> list[str]:
    """The files of ``repo_id`` where a push lands (``revision``'s branch, ``main`` for a branch not made yet or a new
    pull request; ``[]`` when the repo does not exist yet), with the m2ist processor at its root (the one its adapters
    without a processor of their own read) copied into ``into``, when it holds one. A push of some adapters reads it
    to keep the processor of the adapters it keeps."""
    api = HfApi(endpoint=endpoint, token=token, library_name="m2ist", library_version=__version__)
    candidates = [] if create_pr or revision in (None, constants.DEFAULT_REVISION) else [revision]
    for candidate in [*candidates, None]:
        try:
            files = list(api.list_repo_files(repo_id, revision=candidate, repo_type="model"))
        except RevisionNotFoundError:
            continue
        except RepositoryNotFoundError:
            return []
        wanted = [name for name in files if name in (PROCESSOR_CONFIG_NAME, *PROCESSOR_FILES, *TOKENIZER_FILES)]
        if PROCESSOR_CONFIG_NAME in wanted:
            snapshot = Path(snapshot_download(repo_id, revision=candidate, allow_patterns=wanted, token=token,
                                              endpoint=endpoint, cache_dir=into / ".cache", library_name="m2ist",
                                              library_version=__version__))
            for name in wanted:
                shutil.copyfile(snapshot / name, into / name)
        return files
    return []


def _fetch_card(repo_id: str, folder: Path, cache: Path, push_kwargs: dict[str, object]) -> None:
    """Copy into `folder` the README.md the push will replace: the branch's, or `main`'s when the branch does not
    exist yet (the push creates it from `main`). No repo or no card yet: nothing (the card is written fresh). Any
    other failure (network, server error, offline mode) raises before anything is pushed, since writing a fresh card
    instead would replace the repo's card and lose its text."""
    revision = push_kwargs.get("revision")
    endpoint = push_kwargs.get("endpoint")
    revisions = [revision] if isinstance(revision, str) and revision != constants.DEFAULT_REVISION else []
    for candidate in [*revisions, None]:
        try:
            card = hf_hub_download(repo_id, CARD_NAME, revision=candidate, token=push_kwargs.get("token"),  # type: ignore[arg-type]
                                   endpoint=endpoint, cache_dir=cache,  # type: ignore[arg-type]
                                   library_name="m2ist", library_version=__version__)
        except RevisionNotFoundError:
            if candidate is None:
                return
            continue  # a new branch: it starts from main, whose card is the one to update
        except (RemoteEntryNotFoundError, RepositoryNotFoundError):  # no card or no repo yet: written fresh
            return
        except (*_TRANSPORT_ERRORS, OSError) as error:  # HfHubHTTPError and LocalEntryNotFoundError are OSErrors
            status = getattr(getattr(error, "response", None), "status_code", None)
            if isinstance(error, HfHubHTTPError) and status in (401, 403):
                raise PermissionError(
                    f"The Hub refused to let this token read the model card ({CARD_NAME}) of '{repo_id}' (HTTP "
                    f"{status}), which the push updates: {_LOGIN_HINT} with a token that may read and write the repo; "
                    "no commit was made."
                ) from error
            why = ("offline mode is on (HF_HUB_OFFLINE=1): unset it to push" if constants.HF_HUB_OFFLINE else
                   f"{type(error).__name__}: {' '.join(str(error).split())[:300] or 'no answer'}")
            raise ConnectionError(
                f"Cannot read the model card ({CARD_NAME}) of '{repo_id}' on "
                f"{endpoint or constants.ENDPOINT}, which the push updates (its text and metadata are kept): {why}. "
                "Check the endpoint and the network, then push again; no commit was made."
            ) from error
        shutil.copyfile(card, folder / CARD_NAME)
        return


def resolve_pretrained(
    name_or_path: str | PathLike[str],
    *,
    filenames: Sequence[str],
    optional_filenames: Sequence[str] = (),
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | PathLike[str] | None = None,
    local_files_only: bool = False,
    endpoint: str | None = None,
) -> Path:
    """Return a local folder that holds `filenames` (and whichever `optional_filenames` exist).

    With `subfolder`, the files are looked for in that subfolder of the folder or repo, and that subfolder is
    returned.

    `name_or_path` is either an existing local directory (checked, then returned as is; the Hub options are ignored,
    and `revision` is refused: a folder has no revisions) or a Hub model repo id (`"namespace/name"`): the files are
    then downloaded into the Hub cache (`cache_dir`, default `HF_HUB_CACHE`) and the cache's snapshot folder of the
    resolved commit is returned. The download is one `snapshot_download(allow_patterns=[...])` (the revision, the
    file list, then only the wanted files), sent with `library_name="m2ist"` and `library_version`; every file comes
    from the same commit, even if the branch moves during the download. With `local_files_only=True` or
    `HF_HUB_OFFLINE=1` only the cache is used.

    Raises:
        PretrainedNotFoundError (a FileNotFoundError): missing local files, unknown repo / revision / file,
            or offline and not cached; the message says how to fix it.
        ValueError: a `revision` with a local folder, a file or subfolder name that leaves the folder ('..').
    """
    if isinstance(filenames, str) or isinstance(optional_filenames, str):
        raise TypeError("filenames and optional_filenames must be lists of file names, not a single string.")
    if not filenames:
        raise ValueError("filenames must name at least one file to resolve.")
    check_flags("resolve_pretrained", local_files_only=local_files_only)  # "False" would stay offline
    check_token(token)

    if subfolder is not None:
        subfolder = PurePosixPath(str(subfolder).replace("\\", "/")).as_posix().strip("/")
        if not subfolder or subfolder == "." or ".." in PurePosixPath(subfolder).parts:
            raise ValueError(f"subfolder={subfolder!r} must be a relative path inside the folder or repo, e.g. 'refcoco'.")
    for name in (*filenames, *optional_filenames):
        parts = PurePosixPath(str(name).replace("\\", "/")).parts
        if not parts or parts[0] == "/" or ".." in parts:
            raise ValueError(f"{name!r} is not a path inside the folder or repo: a file or subfolder name must be "
                             "relative and hold no '..'; e.g. 'refcoco/m2ist_config.json'.")
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(
                f"'{name_or_path}' is a local folder ({local.absolute()}), which has no revisions: revision="
                f"{revision!r} would be ignored and the folder's files loaded instead. Drop revision= to load the "
                "folder, or, to load that revision of the Hub repo, run from another directory or rename the folder."
            )
        return _check_local_folder(local / subfolder if subfolder else local, filenames)
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

    prefix = f"{subfolder}/" if subfolder else ""
    wanted = [*filenames, *(name for name in optional_filenames if name not in filenames)]
    explain = functools.partial(_explain, repo_id=repo_id, filenames=filenames, revision=revision,
                                cache_dir=cache_dir, local_files_only=local_files_only, endpoint=endpoint, token=token)
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=[prefix + name for name in wanted],
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                endpoint=endpoint,
                library_name="m2ist",
                library_version=__version__,
            )
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as error:
        raise PretrainedNotFoundError(explain(error, filename=prefix + filenames[0])) from error
    folder = snapshot / subfolder if subfolder else snapshot
    missing = [name for name in filenames if not (folder / name).is_file()]
    if missing:
        offline = local_files_only or constants.HF_HUB_OFFLINE
        cause: Exception = (LocalEntryNotFoundError(f"{prefix}{missing[0]} is not cached") if offline
                            else EntryNotFoundError(f"{prefix}{missing[0]} is not in the repo"))
        raise PretrainedNotFoundError(explain(cause, filename=prefix + missing[0]))
    return folder


def resolve_adapter(
    name_or_path: str | PathLike[str],
    *,
    filenames: Sequence[str],
    optional_filenames: Sequence[str] = (),
    shared_filenames: Sequence[str] = (),
    subfolder: str | None = None,
    **hub: object,
) -> tuple[Path, Path | None]:
    """:func:`resolve_pretrained` for an adapter that may lie in an adapter's subfolder of a save: returns ``(the
    adapter's folder, the save's root folder)``. ``save_pretrained`` writes the files its adapters share (the
    processor, ``shared_filenames``) once, at the save's root, and an adapter's ``<name>/`` subfolder holds only its
    config and weights, so a load of ``subfolder="<name>"`` needs the root's too; from the Hub they come in the same
    download (one commit). Without ``subfolder``, the root is the save a local folder given as a path lies in
    (:func:`save_root`), else None; it is None too when the subfolder's last part cannot name an adapter (a trainer's
    ``checkpoint-*``, which holds its own files)."""
    if subfolder is None:
        folder = resolve_pretrained(name_or_path, filenames=filenames, optional_filenames=optional_filenames, **hub)
        return folder, save_root(folder) if Path(name_or_path).expanduser().is_dir() else None
    clean = PurePosixPath(str(subfolder).replace("\\", "/")).as_posix().strip("/")
    leaf, parent = PurePosixPath(clean).name, PurePosixPath(clean).parent.as_posix()
    local = Path(name_or_path).expanduser()
    if adapter_name_problem(leaf) is not None or local.is_dir() or ".." in PurePosixPath(clean).parts:
        folder = resolve_pretrained(name_or_path, filenames=filenames, optional_filenames=optional_filenames,
                                    subfolder=subfolder, **hub)
        shared = folder.parent if adapter_name_problem(leaf) is None else None
        return folder, shared
    root = resolve_pretrained(
        name_or_path, filenames=[f"{leaf}/{name}" for name in filenames],
        optional_filenames=[*(f"{leaf}/{name}" for name in optional_filenames), *shared_filenames],
        subfolder=None if parent == "." else parent, **hub)
    return root / leaf, root


def save_root(folder: Path) -> Path | None:
    """The save whose adapter subfolder the local ``folder`` is (``out`` for ``out/wide``, given as a path rather
    than as ``subfolder="wide"``): its parent, when ``folder``'s name can name an adapter and the parent holds the
    m2ist processor a save shares at its root; else None."""
    folder = Path(folder).expanduser().absolute()
    if adapter_name_problem(folder.name) is not None or not (folder.parent / PROCESSOR_CONFIG_NAME).is_file():
        return None
    return folder.parent


def _check_local_folder(folder: Path, filenames: Sequence[str]) -> Path:
    missing = [name for name in filenames if not (folder / name).is_file()]
    if missing:
        present = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
        shown = present[:20] + ([f"... ({len(present) - 20} more)"] if len(present) > 20 else [])
        raise PretrainedNotFoundError(
            f"Local folder '{folder}' is missing {missing} (needed: {list(filenames)}; present: {shown or 'nothing'}). "
            + (_subfolder_hint(present) or "Pass the folder written by save_pretrained(), or a Hub repo id.")
        )
    return folder


def _subfolder_hint(files: Sequence[str]) -> str | None:
    """"It holds adapters in subfolders: pass subfolder=..." when ``files`` (a folder's or repo's) show some."""
    names = _adapter_subfolders(files)
    if not names:
        return None
    return (f"It holds no adapter at its root but adapters in the subfolders {names} (save_pretrained puts every "
            f"adapter but 'default' in one): pass subfolder={names[0]!r} to load that one.")


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
    hint = _subfolder_hint(present or []) if "/" not in filename else None
    return (
        f"Repo '{repo_id}' on {hub} ({at_revision}) has no file '{filename}' (needed: {list(filenames)}).{listing} "
        + (hint or "Check the repo id and revision: is it a folder written by m2ist's save_pretrained / push_to_hub?")
    )


def _list_repo_files(repo_id: str, *, revision: str | None, token: str | bool | None, endpoint: str | None) -> list[str] | None:
    try:
        return sorted(HfApi(endpoint=endpoint, token=token).list_repo_files(repo_id, revision=revision))
    except Exception:  # only used to enrich an error message
        return None
