"""A small stand-in for the Hugging Face hub on 127.0.0.1, for tests that must not touch the network.

It serves what huggingface_hub's snapshot_download / hf_hub_download call (as read from
huggingface_hub 2.4):

    GET  /api/models/{repo}/revision/{rev}   repo info: sha + siblings
    GET  /api/models/{repo}/tree/{rev}       recursive file listing (one page, no Link header)
    HEAD /{repo}/resolve/{rev}/{file}        X-Repo-Commit, ETag, Content-Length
    GET  /{repo}/resolve/{rev}/{file}        the bytes

Errors carry the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which
huggingface_hub maps to its exception types. No Xet headers are ever sent, so downloads are plain HTTP.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

API = re.compile(r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/.*)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = ""

    def __post_init__(self):
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + self.files[name])
        self.sha = digest.hexdigest()  # 40 hex digits, like a git commit id


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) as received
    fail_downloads: int | None = None  # an HTTP status to answer every file GET with (hub trouble)

    def add_folder(self, repo_id: str, folder: Path) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo_id] = Repo(files)
        return self.repos[repo_id]

    def file_downloads(self) -> list[str]:
        """Paths of the file GETs served so far (API calls and HEADs excluded)."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p]

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self.url

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub

    def log_message(self, format, *args):  # keep test output quiet
        pass

    def do_HEAD(self):
        self._route(body=False)

    def do_GET(self):
        self._route(body=True)

    def _route(self, body: bool):
        path = urlsplit(self.path).path
        self.hub.requests.append((self.command, path))
        if (m := API.match(path)) and self.command == "GET":
            return self._api(m["repo"], m["kind"], unquote(m["rev"]))
        if m := RESOLVE.match(path):
            return self._resolve(m["repo"], unquote(m["rev"]), unquote(m["file"]), body)
        self._send(404, b"Not Found", {"X-Error-Message": "Not Found"}, body)

    def _repo(self, repo_id: str, rev: str, body: bool) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._send(404, b"Repository not found",
                       {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, body)
        elif rev not in ("main", repo.sha):
            self._send(404, b"Invalid rev id",
                       {"X-Error-Code": "RevisionNotFound", "X-Error-Message": f"Invalid rev id: {rev}"}, body)
        else:
            return repo
        return None

    def _api(self, repo_id: str, kind: str, rev: str):
        repo = self._repo(repo_id, rev, True)
        if repo is None:
            return
        if kind == "revision":
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": False,
                    "gated": False, "disabled": False,
                    "siblings": [{"rfilename": name} for name in sorted(repo.files)]}
        else:
            info = [{"type": "file", "path": name, "size": len(data),
                     "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(repo.files.items())]
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, True)

    def _resolve(self, repo_id: str, rev: str, name: str, body: bool):
        repo = self._repo(repo_id, rev, body)
        if repo is None:
            return
        data = repo.files.get(name)
        if data is None:
            self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                 "X-Error-Message": "Entry not found",
                                                 "X-Repo-Commit": repo.sha}, body)
            return
        if body and self.hub.fail_downloads:
            self._send(self.hub.fail_downloads, b"Internal Error", {}, body)
            return
        etag = hashlib.sha256(data).hexdigest()
        self._send(200, data, {"X-Repo-Commit": repo.sha, "ETag": f'"{etag}"',
                               "Content-Type": "application/octet-stream"}, body)

    def _send(self, status: int, data: bytes, headers: dict, body: bool):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)
