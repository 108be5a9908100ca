"""Files the app keeps: atomic writes (a reader sees the old file or the new one, never a
half-written one), and reading a JSON store back with its defaults when it is missing or damaged."""

from __future__ import annotations

import glob
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)
Stored = TypeVar("Stored", bound=BaseModel)

TEMP_SUFFIX = ".tmp"


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a synced temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    # A save killed mid-write left its temporary file: the next save of the same file removes it
    # (every store, not only conversations; a minute's age spares a save running beside this one).
    remove_stale_temps(path.parent, pattern=f".{glob.escape(path.name)}.*{TEMP_SUFFIX}")


def read_store(path: Path, model: type[Stored]) -> Stored:
    """The ``model`` stored as JSON in ``path`` (written with ``write_atomic``); the model's
    defaults when the file is missing, and when it is damaged too, with a warning in the log: a
    damaged file never stops the app."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return model()
    except (OSError, ValueError, ValidationError, RecursionError) as error:
        log.warning("ignoring unreadable %s (%s): starting from defaults", path, error.__class__.__name__)
        return model()


def remove_stale_temps(folder: Path, older_than: float = 60.0, pattern: str = f".*{TEMP_SUFFIX}") -> int:
    """Delete temporary files that ``write_atomic`` left behind when its process was killed mid-save."""
    removed = 0
    now = time.time()
    try:
        candidates = list(folder.glob(pattern))
    except OSError:
        return 0
    for path in candidates:
        try:
            if path.is_file() and not path.is_symlink() and now - path.stat().st_mtime > older_than:
                path.unlink()
                removed += 1
        except OSError:
            continue
    return removed


def login_folder_name(user: str | None) -> str:
    """The folder name for a login's own files (``local`` without logins); never a path."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user or "local")[:64].lstrip(".")
    return safe or "local"


def private_folder(root: Path, *parts: str) -> Path:
    """``root/parts…``, created 0700 (``root`` too, when this makes it), refused if any part is a
    symlink (nothing is written elsewhere)."""
    folder = root
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part:
            raise ValueError(f"not a plain folder name: {part!r}")
        folder = folder / part
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        if folder.is_symlink() or not folder.is_dir():
            raise OSError(f"{folder} is a link or not a folder: refused")
        os.chmod(folder, 0o700)
    return folder
