"""A local stand-in for the Hugging Face Hub, enough for huggingface_hub's client and our downloader.

Serves, for in-memory repos with branches and commits:
- ``GET /api/models/{repo}/refs`` (branches and their commits);
- ``GET /api/models/{repo}/revision/{rev}`` (model_info, siblings with sizes, blob ids, LFS sha256);
- ``GET /api/models/{repo}/tree/{rev}`` (paginated with ``Link: <...>; rel="next"``);
- ``HEAD/GET /{repo}/resolve/{rev}/{path}``: small files directly with ``ETag`` = git blob sha1; LFS files
  as a 302 whose ``Location`` points at ``/lfs-objects/{sha256}`` on a second origin (the "CDN"), with ``X-Linked-Etag`` and
  ``X-Linked-Size``; every answer carries ``X-Repo-Commit``; ``Range`` is honoured (206);
- errors with ``X-Error-Code`` (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).

Faults for tests: drop the connection after N bytes of a file, serve corrupted bytes once, throttle.
It counts the bytes sent per file, so tests can assert how much was transferred again.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".pth")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    gated: bool = False

    def add_commit(self, branch: str, files: dict[str, bytes]) -> str:
        digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(d).hexdigest()) for p, d in files.items())).encode())
        commit = digest.hexdigest()
        self.commits[commit] = dict(files)
        self.branches[branch] = commit
        return commit

    def file(self, branch: str, path: str) -> bytes:
        """The bytes of ``path`` at the head of ``branch``."""
        return self.commits[self.branches[branch]][path]


@dataclass
class Faults:
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before the connection drops (once)
    corrupt_once: set[str] = field(default_factory=set)  # paths served with a flipped byte, once
    bytes_per_second: float | None = None  # throttle file bodies


class HubStandIn:
    def __init__(self, token: str = "hf_test_token") -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.faults = Faults()
        self.sent: Counter[str] = Counter()  # path -> body bytes sent
        self.page_size = 3
        # Two origins, like the real Hub: the API and resolve URLs, and a "CDN" that LFS files
        # redirect to (huggingface_hub reads file metadata from the redirect and does not follow it).
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._threads = []
        for server in (self._server, self._cdn):
            server.daemon_threads = True
            self._threads.append(threading.Thread(target=server.serve_forever, daemon=True))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> HubStandIn:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for server in (self._server, self._cdn):
            server.shutdown()
            server.server_close()

    def repo(self, repo_id: str) -> Repo:
        return self.repos.setdefault(repo_id, Repo())

    # -- request handling ----------------------------------------------------------------------

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._route(self, head=True)

            def do_GET(self) -> None:
                hub._route(self, head=False)

        return Handler

    def _error(self, h, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("X-Error-Code", code)
        h.send_header("X-Error-Message", message)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _json(self, h, data, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _authorised(self, h, repo: Repo) -> bool:
        if not repo.gated:
            return True
        given = h.headers.get("Authorization", "")
        if given == f"Bearer {self.token}":
            return True
        status = 401 if not given else 403
        self._error(h, status, "GatedRepo", "Access to this model is restricted. You must accept the conditions.")
        return False

    def _lookup(self, h, repo_id: str, revision: str):
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found")
            return None
        if not self._authorised(h, repo):
            return None
        commit = repo.branches.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None
        return repo, commit

    def _route(self, h, *, head: bool) -> None:
        url = urlparse(h.path)
        path = unquote(url.path)
        query = parse_qs(url.query)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/refs", path):
            repo = self.repos.get(m.group(1))
            if repo is None:
                return self._error(h, 401, "RepoNotFound", "Repository not found")
            if not self._authorised(h, repo):
                return None
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            return self._json(h, {"branches": branches, "converts": [], "tags": []})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/([^/]+)", path):
            found = self._lookup(h, m.group(1), m.group(2))
            if found:
                repo, commit = found
                siblings = [self._sibling(p, d) for p, d in sorted(repo.commits[commit].items())]
                return self._json(h, {"id": m.group(1), "modelId": m.group(1), "sha": commit, "siblings": siblings,
                                      "gated": repo.gated, "private": False, "tags": []})
            return None
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
            found = self._lookup(h, m.group(1), m.group(2))
            if found:
                repo, commit = found
                entries = [self._tree_entry(p, d) for p, d in sorted(repo.commits[commit].items())]
                start = int(query.get("cursor", ["0"])[0])
                page = entries[start : start + self.page_size]
                headers = {}
                if start + self.page_size < len(entries):
                    nxt = f"{self.url}{url.path}?recursive=True&expand=False&cursor={start + self.page_size}"
                    headers["Link"] = f'<{nxt}>; rel="next"'
                return self._json(h, page, headers)
            return None
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            found = self._lookup(h, m.group(1), m.group(2))
            if found:
                repo, commit = found
                data = repo.commits[commit].get(m.group(3))
                if data is None:
                    return self._error(h, 404, "EntryNotFound", f"{m.group(3)} does not exist")
                return self._resolve(h, m.group(3), data, commit, head=head)
            return None
        if m := re.fullmatch(r"/lfs-objects/([0-9a-f]{64})/(.+)", path):
            for repo in self.repos.values():
                for files in repo.commits.values():
                    for name, data in files.items():
                        if hashlib.sha256(data).hexdigest() == m.group(1):
                            return self._send_file(h, name, data, head=head, etag=m.group(1))
            return self._error(h, 404, "EntryNotFound", "no such object")
        return self._error(h, 404, "RepoNotFound", f"no route for {path}")

    def _sibling(self, path: str, data: bytes) -> dict:
        entry = {"rfilename": path, "size": len(data), "blobId": git_blob_sha1(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _tree_entry(self, path: str, data: bytes) -> dict:
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _resolve(self, h, path: str, data: bytes, commit: str, *, head: bool) -> None:
        if path.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            h.send_response(302)
            h.send_header("Location", f"{self.cdn_url}/lfs-objects/{sha}/{path.rsplit('/', 1)[-1]}")
            h.send_header("X-Repo-Commit", commit)
            h.send_header("X-Linked-Etag", f'"{sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("ETag", f'"{git_blob_sha1(data)}"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        self._send_file(h, path, data, head=head, etag=git_blob_sha1(data), commit=commit)

    def _send_file(self, h, path: str, data: bytes, *, head: bool, etag: str, commit: str | None = None) -> None:
        start, end = 0, len(data) - 1
        ranged = h.headers.get("Range")
        if ranged and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())):
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else end
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        body = data[start : end + 1]
        if not head and path in self.faults.corrupt_once:
            self.faults.corrupt_once.discard(path)
            body = bytes([body[0] ^ 0xFF]) + body[1:] if body else body
        h.send_response(206 if ranged else 200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", f'"{etag}"')
        h.send_header("Accept-Ranges", "bytes")
        if commit:
            h.send_header("X-Repo-Commit", commit)
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        h.end_headers()
        if head:
            return
        drop = self.faults.drop_after.pop(path, None)
        chunk = 64 * 1024
        sent = 0
        try:
            while sent < len(body):
                piece = body[sent : sent + chunk]
                if drop is not None and sent + len(piece) > drop:
                    piece = piece[: max(drop - sent, 0)]
                    h.wfile.write(piece)
                    self.sent[path] += len(piece)
                    h.wfile.flush()
                    h.close_connection = True
                    h.connection.shutdown(2)  # the connection drops mid-file
                    return
                h.wfile.write(piece)
                sent += len(piece)
                self.sent[path] += len(piece)
                if self.faults.bytes_per_second:
                    time.sleep(len(piece) / self.faults.bytes_per_second)
        except (BrokenPipeError, ConnectionResetError):
            return
