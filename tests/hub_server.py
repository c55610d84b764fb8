"""A loopback Hugging Face Hub server for tests.

`huggingface_hub` talks plain HTTP to its endpoint, so a small stdlib server on 127.0.0.1 that answers the few
routes the client uses is enough to test push / pull round trips without the network:

- `HfApi.whoami`: `GET /api/whoami-v2` (needs `token`; the user is `me`)
- `HfApi.create_repo` / `delete_repo`: `POST /api/repos/create`, `DELETE /api/repos/delete`
- `HfApi.create_branch`: `POST /api/{type}s/{repo}/branch/{branch}`
- `HfApi.upload_folder` / `create_commit`: `POST /api/validate-yaml` (when README.md is uploaded),
  `POST /api/{type}s/{repo}/preupload/{rev}`, `POST /api/{type}s/{repo}/commit/{rev}` (NDJSON, base64 contents)
- `upload_folder(create_pr=True)`: `POST /api/{type}s/{repo}/discussions`, `GET .../discussions/{num}`
- `hf_hub_download`: `HEAD` + `GET /[{type}s/]{repo}/resolve/{rev}/{path}`
- `snapshot_download`, `model_info`, `list_repo_files`: `GET /api/{type}s/{repo}[/revision/{rev}]`,
  `GET /api/{type}s/{repo}/tree/{rev}[/{path}]`

Every file is answered `uploadMode: "regular"` (no LFS, no Xet), so contents travel base64 inside the commit.
Repositories live in memory: `LocalHub.repos[(repo_type, repo_id)]` holds every commit as a full snapshot
(`commits[sha].files: dict[path, bytes]`) and the refs (`"main"`, other branches, `"refs/pr/N"`).

Usage::

    from tests.hub_server import local_hub

    with local_hub() as endpoint:          # "http://127.0.0.1:<port>"
        HfApi(endpoint=endpoint).create_repo("org/name")

or, to inspect the stored state, `with LocalHub() as hub: ... hub.files("org/name")`.

`HF_ENDPOINT` is read when `huggingface_hub` is imported, so pass `endpoint=` explicitly to the client calls.
The server only binds 127.0.0.1, caps request bodies and stops itself after `max_lifetime_s`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import huggingface_hub.constants
import pytest
import yaml

__all__ = ["HubCommit", "HubRepo", "LocalHub", "git_blob_sha1", "hub_fixture", "local_hub", "online_client"]

_REPO_TYPES = ("model", "dataset", "space")
_API_PLURAL_TO_TYPE = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


def git_blob_sha1(content: bytes) -> str:
    """Git blob id of `content` (what the Hub returns as `oid` / `ETag` for a regular, non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _front_matter(readme: bytes) -> dict[str, Any] | None:
    """YAML metadata block of a README.md, or None when there is none (raises yaml.YAMLError when invalid)."""
    match = _FRONT_MATTER.match(readme.decode("utf-8", errors="replace"))
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise yaml.YAMLError(f"README.md metadata must be a YAML mapping, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class HubCommit:
    """One commit: a full snapshot of the repository files at that point."""

    sha: str
    parent: str | None
    title: str
    description: str
    files: dict[str, bytes]
    created_at: str


@dataclass
class HubRepo:
    """An in-memory repository: commits by sha, refs (branches and `refs/pr/N`) and pull requests."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, HubCommit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    discussions: dict[int, dict[str, Any]] = field(default_factory=dict)

    def resolve(self, revision: str) -> HubCommit | None:
        """Commit a branch name, `refs/heads/<branch>`, `refs/pr/N` or full commit sha points at, else None."""
        revision = revision.removeprefix("refs/heads/")
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if _COMMIT_SHA.fullmatch(revision):
            return self.commits.get(revision)
        return None


class _HubError(Exception):
    """An HTTP error answer, shaped like the Hub's (JSON body + X-Error-Code / X-Error-Message headers)."""

    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None, **body: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


def _repo_not_found(repo_type: str, repo_id: str) -> _HubError:
    return _HubError(404, f"Repository not found: {repo_type} '{repo_id}'", code="RepoNotFound")


class LocalHub:
    """An in-memory Hub served over HTTP on 127.0.0.1 (a free port), for tests.

    Use as a context manager (`with LocalHub() as hub: hub.url`) or call `start()` / `stop()`.
    `max_lifetime_s` bounds how long the server runs even if `stop()` is never called;
    `max_body_bytes` bounds one request body. `request_log` records `(method, path)` of every request.
    With `token` set, writes (and reads of private repos) need the header `Authorization: Bearer <token>`,
    like the Hub: a write without it gets 401, a private repo looks missing (404 `RepoNotFound`).
    """

    def __init__(
        self, *, max_lifetime_s: float = 300.0, max_body_bytes: int = 64 * 1024 * 1024, token: str | None = None
    ) -> None:
        self.token = token
        self.user = "me"  # whoami's answer for the token
        self.max_lifetime_s = max_lifetime_s
        self.max_body_bytes = max_body_bytes
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.request_log: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._base_url: str | None = None
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Endpoint to pass as `endpoint=` to `huggingface_hub` calls, e.g. `http://127.0.0.1:54321`."""
        if self._base_url is None:
            raise RuntimeError("LocalHub was never started: call start() or use it as a context manager.")
        return self._base_url

    def start(self) -> LocalHub:
        """Bind 127.0.0.1 on a free port and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("LocalHub is already running.")
        self._stopped.clear()
        server = _HubHTTPServer(("127.0.0.1", 0), _HubRequestHandler)
        server.hub = self
        self._server = server
        host, port = server.server_address[:2]
        self._base_url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-hub", daemon=True
        )
        self._thread.start()
        self._timer = threading.Timer(self.max_lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving, close open connections and free the port. Safe to call twice."""
        with self._lock:
            server, self._server = self._server, None
            thread, self._thread = self._thread, None
            timer, self._timer = self._timer, None
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()
        if server is None:
            return
        self._stopped.set()
        server.shutdown()
        server.close_open_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def wait_stopped(self, timeout: float) -> bool:
        """Block until the server has been stopped (by `stop()` or its lifetime), at most `timeout` seconds."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ state helpers (for tests)

    def repo(self, repo_id: str, repo_type: str = "model") -> HubRepo:
        """The stored repository (KeyError with the known ids when absent)."""
        with self._lock:
            try:
                return self.repos[(repo_type, repo_id)]
            except KeyError:
                known = sorted(f"{t}:{r}" for t, r in self.repos)
                raise KeyError(f"No {repo_type} repo '{repo_id}' on the local hub; known: {known}") from None

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """A copy of `{path: bytes}` at `revision` (branch, `refs/pr/N` or commit sha)."""
        repo = self.repo(repo_id, repo_type)
        with self._lock:
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"Revision '{revision}' not found in '{repo_id}'; refs: {sorted(repo.refs)}")
            return dict(commit.files)

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | None = None,
        *,
        repo_type: str = "model",
        private: bool = False,
    ) -> HubRepo:
        """Create a repository directly (no HTTP), like the Hub: an initial commit with `.gitattributes`,
        then one commit with `files` when given."""
        if repo_type not in _REPO_TYPES:
            raise ValueError(f"repo_type must be one of {_REPO_TYPES}, got {repo_type!r}")
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                raise ValueError(f"{repo_type} repo '{repo_id}' already exists on the local hub")
            repo = HubRepo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self.repos[(repo_type, repo_id)] = repo
            self._new_commit(
                repo,
                "main",
                {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                title="initial commit",
            )
            if files:
                self.add_commit(repo_id, files, repo_type=repo_type)
            return repo

    def add_commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        *,
        title: str = "Update files",
        revision: str = "main",
        repo_type: str = "model",
        deleted: tuple[str, ...] = (),
    ) -> str:
        """Commit `files` (added or overwritten) and remove `deleted` on branch `revision`; returns the new sha."""
        repo = self.repo(repo_id, repo_type)
        with self._lock:
            head = repo.resolve(revision)
            if head is None or revision not in repo.refs:
                raise KeyError(f"Branch '{revision}' not found in '{repo_id}'; refs: {sorted(repo.refs)}")
            snapshot = {path: data for path, data in head.files.items() if path not in deleted}
            snapshot.update(files)
            return self._new_commit(repo, revision, snapshot, title=title).sha

    def _new_commit(self, repo: HubRepo, ref: str, files: dict[str, bytes], *, title: str, description: str = "") -> HubCommit:
        parent = repo.refs.get(ref)
        digest = hashlib.sha1()
        for part in (repo.repo_id, parent or "", title, str(next(self._counter))):
            digest.update(part.encode() + b"\0")
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}\0".encode())
        commit = HubCommit(
            sha=digest.hexdigest(),
            parent=parent,
            title=title,
            description=description,
            files=files,
            created_at=_now(),
        )
        repo.commits[commit.sha] = commit
        repo.refs[ref] = commit.sha
        return commit

    # ------------------------------------------------------------------ routing

    def handle(self, method: str, raw_path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, bytes]:
        """Answer one request: returns (status, headers, body). Called by the request handler."""
        split = urlsplit(raw_path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        segments = [unquote(part) for part in split.path.split("/")[1:]]
        authorization = {key.lower(): value for key, value in headers.items()}.get("authorization")
        authorized = self.token is None or authorization == f"Bearer {self.token}"
        with self._lock:
            self.request_log.append((method, split.path))
        try:
            if not authorized and method in ("POST", "PUT", "DELETE") and segments[1:] != ["validate-yaml"]:
                raise _HubError(401, "Invalid credentials in Authorization header")
            with self._lock:
                return self._route(method, segments, query, body, authorized=authorized)
        except _HubError as error:
            payload = {"error": error.message, **error.body}
            header_message = " ".join(error.message.split()).encode("ascii", "replace").decode()
            out_headers = {"Content-Type": "application/json", "X-Error-Message": header_message, **error.headers}
            if error.code is not None:
                out_headers["X-Error-Code"] = error.code
            return error.status, out_headers, json.dumps(payload).encode()
        except Exception as error:  # a bug in this test server: answer loudly, with a status the client won't retry
            message = f"Local test Hub internal error on {method} {split.path}: {type(error).__name__}: {error}"
            return 501, {"Content-Type": "application/json"}, json.dumps({"error": message}).encode()

    def _route(
        self, method: str, seg: list[str], query: dict[str, str], body: bytes, *, authorized: bool
    ) -> tuple[int, dict, bytes]:
        if seg[:1] == ["api"]:
            if seg[1:] == ["whoami-v2"] and method == "GET":  # the token's user: its namespace
                if not authorized or self.token is None:
                    raise _HubError(401, "Invalid credentials in Authorization header")
                return _ok({"name": self.user, "type": "user", "orgs": []})
            if seg[1:3] == ["repos", "create"] and method == "POST":
                return self._api_create_repo(_json(body))
            if seg[1:3] == ["repos", "delete"] and method == "DELETE":
                return self._api_delete_repo(_json(body))
            if seg[1:] == ["validate-yaml"] and method == "POST":
                return self._api_validate_yaml(_json(body))
            if len(seg) >= 4 and seg[1] in _API_PLURAL_TO_TYPE:
                repo_type, repo_id, rest = _API_PLURAL_TO_TYPE[seg[1]], f"{seg[2]}/{seg[3]}", seg[4:]
                return self._route_repo_api(method, self._visible_repo(repo_type, repo_id, authorized), rest, query, body)
        else:
            repo_type = "model"
            start = 0
            if seg and seg[0] in ("datasets", "spaces") and len(seg) >= 4 and seg[3] == "resolve":
                repo_type, start = _API_PLURAL_TO_TYPE[seg[0]], 1
            if len(seg) >= start + 5 and seg[start + 2] == "resolve" and method in ("GET", "HEAD"):
                repo_id = f"{seg[start]}/{seg[start + 1]}"
                revision, path = seg[start + 3], "/".join(seg[start + 4 :])
                return self._resolve_file(self._visible_repo(repo_type, repo_id, authorized), revision, path)
        raise _HubError(501, f"The local test Hub does not implement {method} /{'/'.join(seg)}")

    def _visible_repo(self, repo_type: str, repo_id: str, authorized: bool) -> HubRepo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise _repo_not_found(repo_type, repo_id)
        return repo

    def _route_repo_api(
        self, method: str, repo: HubRepo, rest: list[str], query: dict[str, str], body: bytes
    ) -> tuple[int, dict, bytes]:
        action = rest[0] if rest else ""
        if method == "GET" and (not rest or (action == "revision" and len(rest) == 2)):
            return self._api_repo_info(repo, rest[1] if rest else "main", query)
        if method == "GET" and action == "tree" and len(rest) >= 2:
            return self._api_tree(
                repo, rest[1], "/".join(rest[2:]), recursive=query.get("recursive", "").lower() in ("true", "1")
            )
        if method == "POST" and action == "preupload" and len(rest) == 2:
            return self._api_preupload(repo, rest[1], _json(body), create_pr=query.get("create_pr") == "1")
        if method == "POST" and action == "commit" and len(rest) == 2:
            return self._api_commit(repo, rest[1], body, create_pr=query.get("create_pr") == "1")
        if method == "POST" and action == "branch" and len(rest) == 2:
            return self._api_create_branch(repo, rest[1], _json(body) if body else {})
        if method == "POST" and action == "discussions" and len(rest) == 1:
            return self._api_create_discussion(repo, _json(body))
        if method == "GET" and action == "discussions" and len(rest) == 2 and rest[1].isdigit():
            return self._api_discussion(repo, int(rest[1]))
        raise _HubError(501, f"The local test Hub does not implement {method} /api/{repo.repo_type}s/{repo.repo_id}/{action}")

    # ------------------------------------------------------------------ endpoints

    def _repo_url(self, repo: HubRepo) -> str:
        return f"{self.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}"

    def _api_create_repo(self, payload: dict[str, Any]) -> tuple[int, dict, bytes]:
        repo_type = payload.get("type") or "model"
        if repo_type not in _REPO_TYPES:
            raise _HubError(400, f"Invalid repo type {repo_type!r}")
        if not payload.get("organization"):
            raise _HubError(400, "The local test Hub needs namespaced repo ids ('namespace/name').")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:
            raise _HubError(409, f"You already created this {repo_type} repo", url=url)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.add_repo(repo_id, repo_type=repo_type, private=private)
        return _ok({"url": url, "name": repo_id, "id": repo_id})

    def _api_delete_repo(self, payload: dict[str, Any]) -> tuple[int, dict, bytes]:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        if self.repos.pop((repo_type, repo_id), None) is None:
            raise _repo_not_found(repo_type, repo_id)
        return 200, {"Content-Type": "text/plain"}, b"OK"

    def _api_validate_yaml(self, payload: dict[str, Any]) -> tuple[int, dict, bytes]:
        try:
            _front_matter(str(payload.get("content", "")).encode())
        except yaml.YAMLError as error:
            message = f"Invalid YAML metadata in README.md: {error}"
            raise _HubError(400, message, errors=[{"message": message}], warnings=[]) from None
        return _ok({"errors": [], "warnings": []})

    def _commit_or_error(self, repo: HubRepo, revision: str) -> HubCommit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HubError(404, f"Revision '{revision}' not found in '{repo.repo_id}'", code="RevisionNotFound")
        return commit

    def _api_repo_info(self, repo: HubRepo, revision: str, query: dict[str, str]) -> tuple[int, dict, bytes]:
        commit = self._commit_or_error(repo, revision)
        with_blobs = query.get("blobs", "").lower() in ("true", "1")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_sha1(commit.files[path]))
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.created_at,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        with contextlib.suppress(yaml.YAMLError):
            card_data = _front_matter(commit.files.get("README.md", b""))
            if card_data:
                info["cardData"] = card_data
                if isinstance(card_data.get("tags"), list):
                    info["tags"] = card_data["tags"]
                if "library_name" in card_data:
                    info["library_name"] = card_data["library_name"]
        return _ok(info)

    def _api_tree(self, repo: HubRepo, revision: str, prefix: str, *, recursive: bool) -> tuple[int, dict, bytes]:
        commit = self._commit_or_error(repo, revision)
        prefix = prefix.strip("/")
        base = f"{prefix}/" if prefix else ""
        under = sorted(path for path in commit.files if path.startswith(base))
        if prefix and not under:
            raise _HubError(
                404,
                f"Entry '{prefix}' not found at '{revision}'",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        entries: dict[str, dict[str, Any]] = {}
        for path in under:
            parts = path[len(base) :].split("/")
            depth_range = range(1, len(parts)) if recursive else range(1, min(len(parts), 2))
            for depth in depth_range:
                folder = base + "/".join(parts[:depth])
                oid = hashlib.sha1(f"{commit.sha}:{folder}".encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                data = commit.files[path]
                entries[path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        return _ok([entries[key] for key in sorted(entries)])

    def _api_preupload(
        self, repo: HubRepo, revision: str, payload: dict[str, Any], *, create_pr: bool
    ) -> tuple[int, dict, bytes]:
        head = self._commit_or_error(repo, revision)
        files = []
        for item in payload.get("files", []):
            answer: dict[str, Any] = {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
            if not create_pr and item["path"] in head.files:
                answer["oid"] = git_blob_sha1(head.files[item["path"]])
            files.append(answer)
        return _ok({"files": files, "commitOid": head.sha})

    def _open_pull_request(self, repo: HubRepo, title: str, description: str) -> int:
        num = max(repo.discussions, default=0) + 1
        repo.refs[f"refs/pr/{num}"] = repo.refs["main"]
        repo.discussions[num] = {
            "title": title,
            "description": description,
            "isPullRequest": True,
            "createdAt": _now(),
            "status": "draft",
        }
        return num

    def _api_commit(self, repo: HubRepo, revision: str, body: bytes, *, create_pr: bool) -> tuple[int, dict, bytes]:
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _HubError(400, f"Commit body is not valid NDJSON: {error}") from None
        if not lines or lines[0].get("key") != "header":
            raise _HubError(400, "Commit body must start with a {'key': 'header'} line")
        header = lines[0]["value"]
        pr_num = None
        if create_pr:
            pr_num = self._open_pull_request(repo, header.get("summary", ""), header.get("description", ""))
            revision = f"refs/pr/{pr_num}"
        revision = revision.removeprefix("refs/heads/")
        if revision not in repo.refs:
            if _COMMIT_SHA.fullmatch(revision):
                raise _HubError(400, f"Cannot commit to a commit sha ({revision}); pass a branch name")
            raise _HubError(404, f"Revision '{revision}' not found in '{repo.repo_id}'", code="RevisionNotFound")
        head = repo.commits[repo.refs[revision]]
        parent = header.get("parentCommit")
        if parent is not None and parent != head.sha:
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {value.get('path')}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HubError(404, f"A file with this name doesn't exist: {value['path']}", code="EntryNotFound")
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(folder)}
            elif key == "lfsFile":
                raise _HubError(400, "The local test Hub answers uploadMode 'regular' only; got an LFS file")
            else:
                raise _HubError(400, f"Unsupported commit operation {key!r}")
        commit = self._new_commit(
            repo, revision, files, title=header.get("summary", ""), description=header.get("description", "")
        )
        answer: dict[str, Any] = {
            "success": True,
            "commitOid": commit.sha,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit.sha}",
            "hookOutput": "",
        }
        if pr_num is not None:
            answer["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{pr_num}"
        return _ok(answer)

    def _api_create_branch(self, repo: HubRepo, branch: str, payload: dict[str, Any]) -> tuple[int, dict, bytes]:
        if branch in repo.refs:
            raise _HubError(409, f"Reference already exists: {branch}")
        start = self._commit_or_error(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.sha
        return _ok({})

    def _api_create_discussion(self, repo: HubRepo, payload: dict[str, Any]) -> tuple[int, dict, bytes]:
        if not payload.get("pullRequest"):
            raise _HubError(501, "The local test Hub only supports pull requests, not plain discussions")
        num = self._open_pull_request(repo, payload.get("title", ""), payload.get("description", ""))
        return _ok({"num": num, "pullRequest": True, "url": f"{self._repo_url(repo)}/discussions/{num}"})

    def _api_discussion(self, repo: HubRepo, num: int) -> tuple[int, dict, bytes]:
        discussion = repo.discussions.get(num)
        if discussion is None:
            raise _HubError(404, f"Discussion #{num} not found in '{repo.repo_id}'")
        return _ok(
            {
                "num": num,
                "title": discussion["title"],
                "status": discussion["status"],
                "createdAt": discussion["createdAt"],
                "author": {"name": "local-user"},
                "repo": {"name": repo.repo_id, "type": repo.repo_type},
                "isPullRequest": True,
                "events": [],
                "changes": {"base": "refs/heads/main"},
                "filesWithConflicts": [],
                "diff": "",
            }
        )

    def _resolve_file(self, repo: HubRepo, revision: str, path: str) -> tuple[int, dict, bytes]:
        commit = self._commit_or_error(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise _HubError(
                404,
                f"Entry not found: '{path}' at '{revision}'",
                code="EntryNotFound",
                headers={"X-Repo-Commit": commit.sha},
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(data)}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
        }
        return 200, headers, data


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = False
    hub: LocalHub

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that went away; report anything else (a bug in this server) on stderr."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)

    def close_open_connections(self) -> None:
        """Shut down kept-alive client connections so handler threads exit now."""
        with self.connections_lock:
            connections = list(self.open_connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10  # idle kept-alive connections end after this many seconds
    server: _HubHTTPServer

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log (requests are in `LocalHub.request_log`)."""

    def _read_body(self) -> bytes:
        """The request body (plain or chunked). Past `max_body_bytes` the rest is read and dropped, then 413."""
        limit = self.server.hub.max_body_bytes
        chunks: list[bytes] = []
        total = 0

        def take(size: int) -> None:
            nonlocal total
            while size > 0:
                piece = self.rfile.read(min(size, 1 << 20))
                if not piece:
                    raise ConnectionError("client closed the connection mid-body")
                size -= len(piece)
                total += len(piece)
                if total <= limit:
                    chunks.append(piece)

        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                take(size)
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
        else:
            take(int(self.headers.get("Content-Length") or 0))
        if total > limit:
            raise _HubError(413, f"Request body of {total} bytes is larger than the local test Hub's limit of {limit} bytes")
        return b"".join(chunks)

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except _HubError as error:
            payload = json.dumps({"error": error.message}).encode()
            self._send(error.status, {"Content-Type": "application/json"}, payload)
            return
        status, headers, payload = self.server.hub.handle(self.command, self.path, dict(self.headers.items()), body)
        range_header = self.headers.get("Range", "")
        if status == 200 and self.command == "GET" and range_header.startswith("bytes=") and "ETag" in headers:
            start_text, _, end_text = range_header[len("bytes=") :].partition("-")
            if start_text.isdigit():
                start = int(start_text)
                end = int(end_text) if end_text.isdigit() else len(payload) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(payload)}"
                status, payload = 206, payload[start : end + 1]
        self._send(status, headers, payload)

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError as error:
        raise _HubError(400, f"Request body is not valid JSON: {error}") from None


def _ok(payload: Any) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


@contextlib.contextmanager
def online_client() -> Iterator[None]:
    """Let this process's `huggingface_hub` make requests even if `HF_HUB_OFFLINE=1` was set at import (restored
    on exit). Requests still go only where `endpoint=` points: pass the local hub's URL."""
    previous = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = previous


@contextlib.contextmanager
def local_hub(*, max_lifetime_s: float = 300.0, token: str | None = None) -> Iterator[str]:
    """Run a `LocalHub` for the duration of a `with` block and yield its endpoint URL (offline mode lifted meanwhile).

    Pass the URL as `endpoint=` to `huggingface_hub` / `m2ist.hub` calls. In a test::

        def test_round_trip(tmp_path):
            with local_hub() as endpoint:
                push_folder_to_hub(folder, "org/name", endpoint=endpoint)
    """
    with online_client(), LocalHub(max_lifetime_s=max_lifetime_s, token=token) as hub:
        yield hub.url


def hub_fixture(*, name: str = "local_hub_server", **hub_options: Any) -> Any:
    """Make a pytest fixture yielding a running `LocalHub` (offline mode lifted meanwhile).

    In a test module or conftest: `local_hub_server = hub_fixture()`, then take `local_hub_server` as a test
    argument and use `local_hub_server.url` as `endpoint=`. `hub_options` go to `LocalHub` (e.g. `token=`).
    """

    @pytest.fixture(name=name)
    def _running_hub() -> Iterator[LocalHub]:
        with online_client(), LocalHub(**hub_options) as hub:
            yield hub

    return _running_hub
