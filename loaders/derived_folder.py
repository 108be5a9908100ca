"""Derived model folders: what a loader needs beside the user's files, built without touching them.

A derived folder lives under Loadstar's data folder. It links to every file of the user's folder
and replaces or adds a few (a generated ``quantize_config.json``, a patched ``config.json``, a
weights file under a standard name). Its name carries a fingerprint of the user's files, so a
changed model gets a new one; it is built in a temporary folder and renamed into place, so a
crash never leaves a half-built one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

# What to put in a derived folder under a name: bytes, a file to link to, or a function that writes it.
Entry = bytes | Path | Callable[[Path], None]


def fingerprint(folder: Path, entries: Mapping[str, Entry]) -> str:
    digest = hashlib.sha256(b"derived-v1")
    for child in sorted(folder.iterdir()):
        if child.is_file():
            stat = child.stat()
            digest.update(f"{child.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for name in sorted(entries):
        entry = entries[name]
        digest.update(name.encode())
        digest.update(entry if isinstance(entry, bytes) else str(entry).encode() if isinstance(entry, Path) else b"fn")
    return digest.hexdigest()[:12]


def derived_folder(
    source: Path,
    root: Path,
    entries: Mapping[str, Entry],
    *,
    skip: Callable[[str], bool] = lambda name: False,
) -> Path:
    """A folder under ``root`` mirroring ``source`` (links), with ``entries`` replacing or adding files.

    Files for which ``skip(name)`` is true are left out. Reused when it already exists.
    """
    target = root / f"{source.name}-{fingerprint(source, entries)}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}-"))
    try:
        for child in source.iterdir():
            if child.name.startswith(".") or child.name in entries or skip(child.name):
                continue
            os.symlink(child.resolve(), build / child.name)
        for name, entry in entries.items():
            if isinstance(entry, bytes):
                (build / name).write_bytes(entry)
            elif isinstance(entry, Path):
                os.symlink(entry.resolve(), build / name)
            else:
                entry(build / name)
        os.replace(build, target)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return target
