"""A Hub that lies: hostile file paths in its listings, sizes it does not keep, operator files.

Built on the tests' Hub stand-in (real huggingface_hub talks to it over HTTP); each lie is one
setting, and it counts every GET so tests can assert how hard a download tried.
"""

from __future__ import annotations

from collections import Counter

from tests.hub_standin import HubStandIn


class HostileHub(HubStandIn):
    def __init__(self) -> None:
        super().__init__()
        self.declared_size: dict[str, int] = {}  # path -> size the listing claims
        self.endless: set[str] = set()  # paths whose body never ends (no Content-Length, keeps writing)
        self.gets: Counter[str] = Counter()

    def _sibling(self, path: str, data: bytes) -> dict:
        entry = super()._sibling(path, data)
        if path in self.declared_size:
            entry["size"] = self.declared_size[path]
            entry.pop("lfs", None)  # a small file: checked by its git blob id, which cannot match
        return entry

    def _send_file(self, h, path: str, data: bytes, *, head: bool, etag: str, commit: str | None = None) -> None:
        if not head:
            self.gets[path] += 1
        if path in self.endless and not head:
            h.send_response(200)
            h.send_header("Content-Type", "application/octet-stream")
            h.send_header("ETag", f'"{etag}"')
            if commit:
                h.send_header("X-Repo-Commit", commit)
            h.send_header("Connection", "close")
            h.end_headers()
            h.close_connection = True
            chunk = b"A" * 65536
            try:
                for _ in range(200 * 16):  # up to 200 MiB, unless the client hangs up first
                    h.wfile.write(chunk)
                    self.sent[path] += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return
            return
        super()._send_file(h, path, data, head=head, etag=etag, commit=commit)
