"""A tiny in-memory Hugging Face Hub served over HTTP on 127.0.0.1, for push/pull tests without network.

It implements just what ``huggingface_hub`` 2.x calls for ``create_repo``, ``create_commit`` / ``upload_folder``
(regular, non-LFS uploads), ``ModelCard.validate``/``load`` and ``hf_hub_download``:

- ``POST /api/repos/create``                      -> ``{"url": ...}`` (409 when the repo exists)
- ``POST /api/validate-yaml``                     -> ``{"errors": [], "warnings": []}`` (400 on unparsable YAML)
- ``POST /api/models/{repo}/preupload/{rev}``     -> every file ``"regular"`` (content travels in the commit)
- ``POST /api/models/{repo}/commit/{rev}``        -> NDJSON: a header line, then ``file`` lines (base64 content)
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}``   -> file metadata headers / content
- ``GET /api/models/{repo}`` and ``.../revision/{rev}`` -> a minimal model info (sha and file list)

Safety: it listens on the loopback interface only, refuses bodies over ``max_body`` bytes, and shuts itself down after
``max_seconds`` even if the test forgets to, so a failing test never leaves a server behind. Requests it does not
understand are answered 501 and recorded in :attr:`FakeHub.unhandled`, which is how the endpoint list above was found.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/preupload/{_REV}$"), "preupload"),
    ("POST", re.compile(rf"^/api/models/{_REPO}/commit/{_REV}$"), "commit"),
    ("GET", re.compile(rf"^/api/models/{_REPO}(?:/revision/{_REV})?$"), "model_info"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<file>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/{_REV}/(?P<file>.+)$"), "resolve"),
]


@dataclass
class _Commit:
    oid: str
    files: dict[str, bytes]


@dataclass
class FakeHub:
    """Model repositories kept in memory and served on ``http://127.0.0.1:<port>`` while the context is open."""

    max_seconds: float = 120.0
    max_body: int = 64 << 20
    repos: dict[str, list[_Commit]] = field(default_factory=dict)
    log: list[tuple[str, str]] = field(default_factory=list)
    unhandled: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # ----- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The endpoint to put in ``HF_ENDPOINT``."""
        if self._server is None:
            raise RuntimeError("FakeHub is not running; use it as a context manager")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        # Port 0: the OS picks a free port; 127.0.0.1 only, never a public interface.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        # The deadline guards against a test that hangs or never exits the context.
        self._timer = threading.Timer(self.max_seconds, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ----- repository content --------------------------------------------------------------------------------------
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch name means the latest commit)."""
        commit = self._find(repo_id, revision)
        if commit is None:
            raise KeyError(f"{repo_id}@{revision}")
        return dict(commit.files)

    def _find(self, repo_id: str, revision: str) -> _Commit | None:
        with self._lock:
            history = self.repos.get(repo_id)
            if not history:
                return None
            if revision == "main":
                return history[-1]
            return next((c for c in history if c.oid == revision), None)


def _git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Routes each request to a ``_handle_<name>`` method; unknown requests get 501 and are recorded."""

    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the real Hub; every answer sets Content-Length

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
        pass  # keep test output quiet; requests are in fake_hub.log

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # ----- plumbing ------------------------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        path = unquote(urlsplit(self.path).path)
        self.fake_hub.log.append((method, path))
        try:
            body = self._read_body()
        except ValueError as exc:
            self._send_json(413, {"error": str(exc)})
            return
        for route_method, pattern, name in _ROUTES:
            match = pattern.match(path)
            if route_method == method and match:
                getattr(self, f"_handle_{name}")(match.groupdict(), body, method)
                return
        self.fake_hub.unhandled.append((method, path))
        self._send_json(501, {"error": f"fake hub does not implement {method} {path}"})

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.fake_hub.max_body:
            raise ValueError(f"body of {length} bytes exceeds the fake hub's limit")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool = False) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _not_found(self, code: str, message: str, *, head: bool = False) -> None:
        # huggingface_hub maps X-Error-Code onto RepositoryNotFoundError / EntryNotFoundError / RevisionNotFoundError.
        body = json.dumps({"error": message}).encode()
        self._send(404, body, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

    # ----- endpoints -----------------------------------------------------------------------------------------------
    def _handle_create_repo(self, params: dict, body: bytes, method: str) -> None:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        hub = self.fake_hub
        with hub._lock:
            exists = repo_id in hub.repos
            if not exists:
                hub.repos[repo_id] = [_Commit(oid=hashlib.sha1(repo_id.encode()).hexdigest(), files={})]
        if exists:
            self._send_json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
        else:
            self._send_json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

    def _handle_validate_yaml(self, params: dict, body: bytes, method: str) -> None:
        # The client sends the whole README; the metadata is its YAML front matter between two "---" lines.
        content = json.loads(body or b"{}").get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            self._send_json(400, {"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []})
            return
        if metadata is not None and not isinstance(metadata, dict):
            self._send_json(400, {"errors": [{"message": "metadata must be a mapping"}], "warnings": []})
            return
        self._send_json(200, {"errors": [], "warnings": []})

    def _handle_preupload(self, params: dict, body: bytes, method: str) -> None:
        if self.fake_hub._find(params["repo"], params["rev"]) is None:
            self._not_found("RepoNotFound", f"Repository {params['repo']} not found")
            return
        files = json.loads(body)["files"]
        answer = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
        self._send_json(200, {"files": answer, "commitOid": None})

    def _handle_commit(self, params: dict, body: bytes, method: str) -> None:
        hub, repo_id = self.fake_hub, params["repo"]
        parent = hub._find(repo_id, params["rev"])
        if parent is None:
            self._not_found("RepoNotFound", f"Repository {repo_id} not found")
            return
        files = dict(parent.files)
        summary = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file" and value.get("encoding") == "base64":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                self._send_json(400, {"error": f"fake hub does not support commit operation {key!r}"})
                return
        oid = hashlib.sha1(f"{parent.oid}{summary}{sorted(files)}".encode() + b"".join(files.values())).hexdigest()
        with hub._lock:
            hub.repos[repo_id].append(_Commit(oid=oid, files=files))
        self._send_json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

    def _handle_model_info(self, params: dict, body: bytes, method: str) -> None:
        commit = self.fake_hub._find(params["repo"], params.get("rev") or "main")
        if commit is None:
            self._not_found("RepoNotFound", f"Repository {params['repo']} not found")
            return
        siblings = [{"rfilename": name} for name in sorted(commit.files)]
        self._send_json(200, {"id": params["repo"], "modelId": params["repo"], "sha": commit.oid, "siblings": siblings})

    def _handle_resolve(self, params: dict, body: bytes, method: str) -> None:
        head = method == "HEAD"
        commit = self.fake_hub._find(params["repo"], params["rev"])
        if commit is None:
            known = self.fake_hub._find(params["repo"], "main") is not None
            code = "RevisionNotFound" if known else "RepoNotFound"
            self._not_found(code, f"{params['repo']}@{params['rev']} not found", head=head)
            return
        content = commit.files.get(params["file"])
        if content is None:
            self._not_found("EntryNotFound", f"{params['file']} not found", head=head)
            return
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{_git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.oid,
        }
        self._send(200, content, headers, head=head)
