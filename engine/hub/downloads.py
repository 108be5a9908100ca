"""Downloads from the Hugging Face Hub by name, verified, resumable, never half-visible.

Metadata (branches, commits, file lists with sizes and hashes) comes from huggingface_hub's
``HfApi``; file bytes are streamed with its HTTP session so that each file can be:
- verified while it streams: LFS files against their sha256 (the Hub's ``X-Linked-Etag``),
  small files against their git blob sha1 (the ``ETag``); a mismatch deletes it and fetches again;
- resumed with ``Range`` after a dropped connection *and* after the process was killed: partial
  bytes stay in ``<models>/.downloads/<folder>/<file>.<hash>.part``; on restart they are hashed
  again locally (cheap) and only the rest is transferred.

A new model is assembled in ``<models>/.downloads/<folder>`` (hidden from the model list) and
renamed into place only when every file is verified. An update of an existing folder fetches only
the files whose hash changed, then swaps them in. ``loadstar-download.json`` in the folder
records repo, branch, commit, per-file sha256 and the date.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadstar.engine.atomic import write_atomic
from loadstar.engine.errors import LoadstarError, one_line
from loadstar.engine.hub.names import ModelRef
from loadstar.engine.models.folder import format_size, gguf_models, weight_format

log = logging.getLogger(__name__)

METADATA_FILE = "loadstar-download.json"
STAGING_DIR = ".downloads"
CHUNK = 1024 * 1024
RETRIES = 5
MAX_JSON_BYTES = 1024 * 1024  # config files read before a download (branch picker)
DISK_SPARE = 1 << 30  # a download never leaves less free on the models' disk than this
DISK_CHECK_EVERY = 64 << 20  # bytes written between two looks at the free space
MAX_PATH_CHARS = 400
# Files a download never writes: ours (the record of the download) and operator-only configuration
# (a downloaded remote.json would point the server, and its keys, at a URL the repo chose).
RESERVED_NAMES = frozenset({METADATA_FILE, "remote.json"})


class DownloadError(LoadstarError):
    """A download failed; what was verified so far is kept for the next try."""


class DownloadCancelled(DownloadError):
    """The user cancelled; partial files stay for a resume."""


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    blob_id: str  # git blob sha1 (the ETag of small files)
    sha256: str | None = None  # LFS files: the content's sha256

    @property
    def identity(self) -> str:
        """What changes when the content changes."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class RepoSnapshot:
    ref: ModelRef
    commit: str
    files: tuple[RemoteFile, ...]


@dataclass(frozen=True)
class Selection:
    files: tuple[RemoteFile, ...]
    skipped: tuple[tuple[str, str], ...]  # (path, why)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Progress:
    file: str
    file_done: int
    file_total: int
    done: int  # all files, bytes present (downloaded or already there)
    total: int
    bytes_per_second: float
    files_done: int
    files_total: int

    @property
    def eta_seconds(self) -> float | None:
        remaining = self.total - self.done
        return remaining / self.bytes_per_second if self.bytes_per_second > 0 else None


@dataclass(frozen=True)
class DownloadResult:
    folder: Path
    commit: str
    fetched: tuple[str, ...]  # files transferred this time
    transferred_bytes: int
    up_to_date: bool  # nothing to do: the same commit was already there


ProgressCallback = Callable[[Progress], None]


# -- paths from the Hub ---------------------------------------------------------------------------


def check_repo_path(path: str) -> str:
    """A file path from a Hub listing, refused unless it is a plain relative path inside the repo.

    Every file write of a download goes through this (and through ``_inside`` at write time): the
    listing is untrusted input, whatever serves it (the Hub, a mirror, a proxy, ``HF_ENDPOINT``).
    """
    problem = None
    if not isinstance(path, str) or not path:
        problem = "an empty path"
    elif len(path) > MAX_PATH_CHARS:
        problem = f"a path over {MAX_PATH_CHARS} characters"
    elif any(ord(ch) < 32 or ch == "\x7f" for ch in path) or "\\" in path:
        problem = "a control character or backslash"
    elif path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        problem = "an absolute path"
    else:
        parts = path.split("/")
        if any(part in ("", ".", "..") for part in parts):
            problem = "an empty, '.' or '..' path segment"
        elif parts[0] == STAGING_DIR:
            problem = "Loadstar's own staging folder"
    if problem:
        shown = path if isinstance(path, str) else repr(path)
        raise DownloadError(f"the repository lists a file with {problem} ({shown[:80]!r}): refused")
    return path


def _inside(base: Path, relative: str) -> Path:
    """``base / relative``, checked again on disk: no symlink on the way may lead outside ``base``."""
    target = base / check_repo_path(relative)
    resolved_base = base.resolve()
    resolved = target.resolve()
    if resolved != resolved_base and resolved_base not in resolved.parents:
        raise DownloadError(f"{relative}: leads outside {base} (a symlink on the way?): refused")
    return target


# -- selection -----------------------------------------------------------------------------------


def select_files(files: tuple[RemoteFile, ...] | list[RemoteFile], gguf_file: str | None = None) -> Selection:
    """Which files make a loadable model: one weights format, plus every config/tokenizer/other file.

    safetensors win over .bin/.pt; a .pt is kept only when it is the only weights; GGUF repos
    need the user to name one .gguf file when there are several.
    """
    def is_weight(f: RemoteFile) -> bool:
        return weight_format(f.path) is not None

    top_weights = [f for f in files if is_weight(f) and "/" not in f.path]
    ggufs = [f for f in top_weights if weight_format(f.path) == "gguf"]
    models = gguf_models([f.path for f in ggufs])  # split parts (-00001-of-00003) are one model
    skipped: list[tuple[str, str]] = []
    if gguf_file is not None:
        model = next((m for m in models if gguf_file in m.parts), None)
        if model is None:
            names = ", ".join(m.first for m in models) or "none"
            raise DownloadError(f"no GGUF file named {gguf_file} in the repo (it has: {names})")
        chosen = [f for f in ggufs if f.path in model.parts]
    elif ggufs and len(ggufs) == len(top_weights):
        if len(models) > 1:
            names = ", ".join(m.first for m in models)
            raise DownloadError(f"the repo has {len(models)} GGUF files: choose one with --gguf-file ({names})")
        chosen = ggufs
    else:
        preference = ("safetensors", "bin", "pt")
        by_kind = {kind: [f for f in top_weights if weight_format(f.path) == kind] for kind in preference}
        kind = next((k for k in preference if by_kind[k]), None)
        chosen = by_kind[kind] if kind else []
    chosen_paths = {f.path for f in chosen}
    selected = []
    for f in files:
        if f.path == ".gitattributes":
            continue
        if f.path.rsplit("/", 1)[-1] in RESERVED_NAMES:
            skipped.append((f.path, "operator-only file: never taken from a download"))
            continue
        if is_weight(f) and f.path not in chosen_paths:
            why = "another weights format is preferred" if "/" not in f.path else "weights in a subfolder"
            if weight_format(f.path) == "gguf":
                why = "another GGUF file was chosen" if gguf_file or len(models) > 1 else "not the chosen format"
            skipped.append((f.path, why))
            continue
        selected.append(f)
    return Selection(tuple(selected), tuple(skipped))


# -- the Hub -------------------------------------------------------------------------------------


class HubClient:
    """huggingface_hub's HfApi and HTTP session, pointed at ``endpoint``, with an optional token."""

    def __init__(self, endpoint: str, token: str | None = None) -> None:
        from huggingface_hub import HfApi

        self.endpoint = endpoint.rstrip("/")
        self._token = token or None
        self._api = HfApi(endpoint=self.endpoint, token=self._token or False)

    def branches(self, repo_id: str) -> list[tuple[str, str]]:
        """(branch, commit) pairs, main first."""
        refs = self._call(lambda: self._api.list_repo_refs(repo_id), repo_id)
        pairs = sorted(((b.name, b.target_commit) for b in refs.branches), key=lambda p: (p[0] != "main", p[0]))
        return pairs

    def snapshot(self, ref: ModelRef) -> RepoSnapshot:
        info = self._call(lambda: self._api.model_info(ref.repo_id, revision=ref.revision, files_metadata=True), str(ref))
        files = tuple(
            RemoteFile(path=check_repo_path(s.rfilename), size=s.size or 0, blob_id=s.blob_id or "",
                       sha256=s.lfs.sha256 if s.lfs else None)
            for s in info.siblings or ()
        )
        if any(not isinstance(f.size, int) or f.size < 0 for f in files):
            raise DownloadError(f"{ref}: the repository lists a file with a negative size: refused")
        if len({f.path for f in files}) != len(files):
            raise DownloadError(f"{ref}: the repository lists the same file twice: refused")
        return RepoSnapshot(ref, info.sha, files)

    def read_json(self, repo_id: str, commit: str, path: str) -> dict[str, Any] | None:
        """A small JSON file at ``commit``; None if it is absent or not JSON."""
        status, content = self._call(lambda: self._get_bounded(self.file_url(repo_id, commit, path), f"{repo_id}/{path}"),
                                     f"{repo_id}/{path}")
        if status == 404 or content is None:
            return None
        try:
            data = json.loads(content)
        except (ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def read_head(self, repo_id: str, commit: str, path: str, size: int) -> bytes | None:
        """The first ``size`` bytes of a file (a ranged GET: a weights header, not the weights)."""
        return self.read_range(repo_id, commit, path, 0, size)

    def read_range(self, repo_id: str, commit: str, path: str, start: int, size: int) -> bytes | None:
        """``size`` bytes of a file from ``start`` (one ranged GET); None if the file is absent."""
        url = self.file_url(repo_id, commit, path)
        _status, content = self._call(
            lambda: self._get_bounded(url, f"{repo_id}/{path}", size, ranged=True, start=start), f"{repo_id}/{path}"
        )
        return content

    def _get_bounded(self, url: str, what: str, limit: int = MAX_JSON_BYTES,
                     ranged: bool = False, start: int = 0) -> tuple[int, bytes | None]:
        """GET at most ``limit`` bytes: a whole file (None if larger), or with ``ranged`` the bytes
        from ``start``."""
        headers = self.headers()
        if ranged:
            headers["Range"] = f"bytes={start}-{start + limit - 1}"
        with self.session.stream("GET", url, headers=headers, follow_redirects=True, timeout=30) as response:
            if response.status_code == 404:
                return 404, None
            self._check(response, what)
            if ranged and start and response.status_code != 206:
                raise DownloadError(f"{what}: the server ignored a Range request")
            content = bytearray()
            for chunk in response.iter_bytes(64 * 1024):
                content += chunk
                if len(content) > limit:
                    if ranged:  # a server that ignores Range: keep the start
                        return response.status_code, bytes(content[:limit])
                    log.warning("%s: larger than %d bytes, not read", what, limit)
                    return response.status_code, None
            return response.status_code, bytes(content)

    @property
    def session(self) -> Any:
        from huggingface_hub.utils import get_session

        return get_session()

    def headers(self) -> dict[str, str]:
        from huggingface_hub.utils import build_hf_headers

        headers = build_hf_headers(token=self._token or False)
        headers["Accept-Encoding"] = "identity"
        return headers

    def file_url(self, repo_id: str, commit: str, path: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(repo_id, path, revision=commit, endpoint=self.endpoint)

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        try:
            return fn()
        except GatedRepoError:
            raise DownloadError(self._gated_message(what)) from None
        except RepositoryNotFoundError:
            hint = "" if self._token else " (if it is private, give a token)"
            raise DownloadError(f"{what}: no such repository on the Hub{hint}") from None
        except RevisionNotFoundError:
            raise DownloadError(f"{what}: no such branch in the repository") from None
        except EntryNotFoundError:
            raise DownloadError(f"{what}: no such file") from None
        except HfHubHTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            raise DownloadError(f"{what}: the Hub answered {status}") from None
        except OSError as error:
            raise DownloadError(f"{what}: cannot reach {self.endpoint} ({one_line(error)})") from None
        except _transport_errors() as error:
            raise DownloadError(f"{what}: cannot reach {self.endpoint} ({one_line(error)})") from None

    def _gated_message(self, what: str) -> str:
        if self._token:
            return f"{what} is gated and this token has no access: accept its license on the Hub with that account"
        return f"{what} is gated: accept its license on the Hub and give a token (--token, HF_TOKEN, or the UI)"

    def _check(self, response: Any, what: str) -> None:
        if response.status_code < 400:
            return
        code = response.headers.get("X-Error-Code", "")
        if code == "GatedRepo" or (response.status_code in (401, 403) and self._token is None):
            raise DownloadError(self._gated_message(what))
        if code == "EntryNotFound" or response.status_code == 404:
            raise DownloadError(f"{what}: no such file")
        raise DownloadError(f"{what}: the Hub answered {response.status_code}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP library's connection errors (huggingface_hub's session is httpx2)."""
    import httpx2

    return (httpx2.TransportError,)


# -- downloading ---------------------------------------------------------------------------------


@dataclass
class _Counter:
    total: int
    files_total: int
    done: int = 0
    files_done: int = 0
    transferred: int = 0
    started: float = field(default_factory=time.monotonic)
    last_report: float = 0.0

    def speed(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.transferred / elapsed if elapsed > 0 else 0.0


def download(
    client: HubClient,
    ref: ModelRef,
    models_dir: Path,
    *,
    gguf_file: str | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> DownloadResult:
    """Download ``ref`` into ``models_dir/<folder>``; returns when every file is verified."""
    cancel = cancel or threading.Event()
    snapshot = client.snapshot(ref)
    selection = select_files(snapshot.files, gguf_file)
    if not selection.files:
        raise DownloadError(f"{ref}: the repository holds no files")
    target = models_dir / ref.folder_name
    staging = models_dir / STAGING_DIR / ref.folder_name
    previous = _read_metadata(target)
    _check_same_repo(target, staging, previous, ref)
    if previous and previous.get("commit") == snapshot.commit and _complete(target, previous, selection):
        return DownloadResult(target, snapshot.commit, (), 0, up_to_date=True)

    unchanged = {
        f.path for f in selection.files
        if previous and _same_file(target, previous, f)
    }
    needed = [f for f in selection.files if f.path not in unchanged]
    _check_room(ref, models_dir, sum(f.size - _have(_part_path(staging, f), f) for f in needed))
    counter = _Counter(total=sum(f.size for f in needed), files_total=len(needed))
    try:
        staging.mkdir(parents=True, exist_ok=True)
        write_atomic(staging / _OWNER_FILE, _owner(ref).encode())
    except OSError as error:
        raise DownloadError(f"cannot create {staging}: {error.strerror or error}") from None
    hashes: dict[str, str] = {}
    for f in needed:
        if cancel.is_set():
            raise DownloadCancelled(f"{ref}: cancelled; run the same download again to resume")
        hashes[f.path] = _fetch_verified(client, snapshot, f, staging, counter, progress, cancel)
        counter.files_done += 1
    for path in unchanged:
        hashes[path] = (previous or {})["files"][path]["sha256"]  # unchanged files come from a previous record

    metadata = {
        "repo": ref.repo_id,
        "branch": ref.revision,
        "commit": snapshot.commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {f.path: {"size": f.size, "sha256": hashes[f.path], "blob_id": f.blob_id} for f in selection.files},
        "skipped": [{"path": p, "why": why} for p, why in selection.skipped],
    }
    _install(staging, target, needed, selection, metadata)
    return DownloadResult(target, snapshot.commit, tuple(f.path for f in needed), counter.transferred, up_to_date=False)


_OWNER_FILE = ".loadstar-repo"  # in a staging folder: which repo and branch it is assembling


def free_space(path: Path) -> int:
    """Bytes free on the disk that holds ``path`` (or would hold it: its nearest existing folder)."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _have(part: Path, f: RemoteFile) -> int:
    """Bytes of ``f`` already on disk from an earlier try (its .part), which a resume keeps."""
    try:
        size = part.stat().st_size
    except OSError:
        return 0
    return size if size <= f.size else 0


def _check_room(ref: ModelRef, models_dir: Path, missing: int) -> None:
    """Refuse before the first byte when the listed sizes do not fit: a Hub that lists a file of a
    petabyte once filled the disk at the download's pace."""
    free = free_space(models_dir)
    if missing + DISK_SPARE > free:
        raise DownloadError(
            f"{ref}: needs {format_size(missing)} more but {format_size(free)} are free on the disk of {models_dir} "
            f"({format_size(DISK_SPARE)} is kept spare): nothing downloaded"
        )


def _owner(ref: ModelRef) -> str:
    return f"{ref.repo_id}:{ref.revision}"


def _check_same_repo(target: Path, staging: Path, previous: dict[str, Any] | None, ref: ModelRef) -> None:
    """Folder names are not unique (``a/b_c`` and ``a_b/c`` are both ``a_b_c``): never mix two repos."""
    holder = None
    if previous is not None and (previous.get("repo"), previous.get("branch")) != (ref.repo_id, ref.revision):
        holder = f"{previous.get('repo')}:{previous.get('branch')}"
    elif previous is None and target.exists():
        holder = "files that Loadstar did not download"
    else:
        try:
            staged = (staging / _OWNER_FILE).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            staged = None
        if staged and staged != _owner(ref):
            holder = f"a partial download of {staged}"
    if holder:
        raise DownloadError(
            f"{target.name} already holds {holder}: {ref} would go to the same folder; "
            f"move or delete {target} first"
        )


def _part_path(staging: Path, f: RemoteFile) -> Path:
    return _inside(staging, f"{f.path}.{f.identity[:16]}.part")


def _fetch_verified(
    client: HubClient, snapshot: RepoSnapshot, f: RemoteFile, staging: Path, counter: _Counter,
    progress: ProgressCallback | None, cancel: threading.Event,
) -> str:
    """Fetch one file into staging (resuming a partial), verify it, return its sha256."""
    final = _inside(staging, f.path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_file() and final.stat().st_size == f.size:
        digest = _verify_whole(final, f)  # verified earlier in an interrupted run
        if digest is not None:
            counter.done += f.size
            return digest
        final.unlink()
    for stale in final.parent.glob(f"{Path(f.path).name}.*.part"):
        if stale != _part_path(staging, f):
            stale.unlink()  # a partial of an older version of this file
    for _attempt in range(2):  # a second full try when the bytes did not match
        digest = _stream_with_resume(client, snapshot, f, staging, counter, progress, cancel)
        if digest is not None:
            os.replace(_part_path(staging, f), final)
            return digest
        log.warning("%s: hash mismatch, fetching it again", f.path)
        _part_path(staging, f).unlink(missing_ok=True)
    raise DownloadError(f"{f.path}: the downloaded bytes do not match the Hub's hash, twice")


def _hashers(f: RemoteFile) -> tuple[Any, Any]:
    sha = hashlib.sha256()
    blob = hashlib.sha1(b"blob %d\0" % f.size)
    return sha, blob


def _matches(f: RemoteFile, sha: Any, blob: Any) -> bool:
    if f.sha256:
        return sha.hexdigest() == f.sha256
    return not f.blob_id or blob.hexdigest() == f.blob_id


def _verify_whole(path: Path, f: RemoteFile) -> str | None:
    sha, blob = _hashers(f)
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
            blob.update(chunk)
    return sha.hexdigest() if _matches(f, sha, blob) else None


def _stream_with_resume(
    client: HubClient, snapshot: RepoSnapshot, f: RemoteFile, staging: Path, counter: _Counter,
    progress: ProgressCallback | None, cancel: threading.Event,
) -> str | None:
    """Stream the rest of the file onto its .part; retries dropped connections. sha256 if it matches."""
    part = _part_path(staging, f)
    sha, blob = _hashers(f)
    have = 0
    if part.exists():
        with part.open("rb") as handle:  # re-hash what we have: cheaper than fetching it again
            while chunk := handle.read(CHUNK):
                sha.update(chunk)
                blob.update(chunk)
                have += len(chunk)
        if have > f.size:
            part.unlink()
            sha, blob = _hashers(f)
            have = 0
    counter.done += have
    url = client.file_url(snapshot.ref.repo_id, snapshot.commit, f.path)
    failures = 0
    while have < f.size:
        headers = client.headers()
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with client.session.stream("GET", url, headers=headers, follow_redirects=True, timeout=60) as response:
                if response.status_code == 416:
                    break
                client._check(response, f"{snapshot.ref}/{f.path}")
                if have and response.status_code != 206:  # the server ignored Range: start over
                    counter.done -= have
                    sha, blob = _hashers(f)
                    have = 0
                try:
                    out = part.open("r+b" if have else "wb")
                except OSError as error:
                    raise DownloadError(f"cannot write {part}: {error.strerror or error}") from None
                with out:
                    out.seek(have)
                    out.truncate()
                    for chunk in response.iter_bytes(CHUNK):
                        if cancel.is_set():
                            raise DownloadCancelled(f"{snapshot.ref}: cancelled; run the same download again to resume")
                        if have + len(chunk) > f.size:  # more than the listing declared: a lying server
                            raise DownloadError(
                                f"{f.path}: the server sent more than the {f.size} bytes the repository lists: refused"
                            )
                        try:
                            out.write(chunk)
                        except OSError as error:  # disk full, read-only: retrying will not help
                            raise DownloadError(f"cannot write {part}: {error.strerror or error}") from None
                        sha.update(chunk)
                        blob.update(chunk)
                        if have // DISK_CHECK_EVERY != (have + len(chunk)) // DISK_CHECK_EVERY:
                            _still_room(part, f, have + len(chunk))  # something else may fill the disk meanwhile
                        have += len(chunk)
                        counter.done += len(chunk)
                        counter.transferred += len(chunk)
                        _report(progress, counter, f, have)
                if have < f.size:  # the body ended early without an error: count it as a failure
                    raise _ShortBody(f"the body ended at {have} of {f.size} bytes")
        except DownloadError:
            raise
        except Exception as error:  # dropped connection, timeout: resume from what arrived
            failures += 1
            log.warning("%s: transfer broke off at %d of %d bytes (%s); resuming", f.path, have, f.size, one_line(error))
            if failures > RETRIES:
                raise DownloadError(f"{f.path}: the connection kept failing ({one_line(error)}); run again to resume") from None
            time.sleep(min(0.2 * failures, 2.0))
    _report(progress, counter, f, have, force=True)
    return sha.hexdigest() if have == f.size and _matches(f, sha, blob) else None


def _still_room(part: Path, f: RemoteFile, have: int) -> None:
    free = free_space(part)
    if free < DISK_SPARE:
        raise DownloadError(
            f"{f.path}: stopped at {format_size(have)} of {format_size(f.size)}: less than {format_size(DISK_SPARE)} "
            f"is free on the disk of {part.parent}; free some space and run the same download again to resume"
        )


class _ShortBody(Exception):
    pass


def _report(progress: ProgressCallback | None, counter: _Counter, f: RemoteFile, have: int, force: bool = False) -> None:
    now = time.monotonic()
    if progress is None or (not force and now - counter.last_report < 0.2):
        return
    counter.last_report = now
    progress(Progress(file=f.path, file_done=have, file_total=f.size, done=counter.done, total=counter.total,
                      bytes_per_second=counter.speed(), files_done=counter.files_done, files_total=counter.files_total))


def _read_metadata(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _same_file(folder: Path, metadata: dict[str, Any], f: RemoteFile) -> bool:
    recorded = metadata["files"].get(f.path)
    if not recorded or not (folder / f.path).is_file() or (folder / f.path).stat().st_size != f.size:
        return False
    if f.sha256:
        return recorded.get("sha256") == f.sha256
    return bool(f.blob_id) and recorded.get("blob_id") == f.blob_id


def _complete(folder: Path, metadata: dict[str, Any], selection: Selection) -> bool:
    return all(_same_file(folder, metadata, f) for f in selection.files)


def _install(staging: Path, target: Path, fetched: list[RemoteFile], selection: Selection, metadata: dict) -> None:
    """Make the verified files the model folder: a rename for a new model, file swaps for an update."""
    write_atomic(staging / METADATA_FILE, json.dumps(metadata, indent=2).encode())
    (staging / _OWNER_FILE).unlink(missing_ok=True)
    if not target.exists():
        os.replace(staging, target)
        return
    for f in fetched:
        destination = _inside(target, f.path)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(_inside(staging, f.path), destination)
    wanted = {f.path for f in selection.files}
    old = _read_metadata(target) or {"files": {}}
    for path in old["files"]:
        if path not in wanted:
            try:
                _inside(target, path).unlink(missing_ok=True)  # gone upstream or no longer selected
            except DownloadError:
                log.warning("not removing %r: not a plain path inside %s", path, target)
    os.replace(staging / METADATA_FILE, target / METADATA_FILE)
    shutil.rmtree(staging, ignore_errors=True)


def format_progress(p: Progress) -> str:
    from loadstar.engine.models.folder import format_size

    eta = p.eta_seconds
    eta_text = f", {eta:.0f} s left" if eta is not None else ""
    return (f"{p.file}: {format_size(p.file_done)} of {format_size(p.file_total)} · all: {format_size(p.done)} of "
            f"{format_size(p.total)} ({p.files_done}/{p.files_total} files) at {format_size(int(p.bytes_per_second))}/s"
            f"{eta_text}")


def progress_dict(p: Progress) -> dict[str, Any]:
    return {**asdict(p), "eta_seconds": p.eta_seconds}
