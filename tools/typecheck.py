"""mypy over the package by its import names (``make lint``): ``loadstar.engine``, ``loadstar.loaders``, ...

The repository keeps engine/, api/, webui/, loaders/ and extensions/ at the top, and pyproject.toml
maps them into ``loadstar.*``. Run on the folders, mypy knows no ``loadstar.engine``: every such
import is missing and every type behind it is ``Any``. So this lays the import names out as links
to the folders (``.mypy_cache/layout/loadstar/engine -> engine`` and so on, from pyproject's own
package-dir table) and runs ``mypy -p loadstar`` there. Findings name the files as they are in
the repository (``engine/facade.py``), and the exit status is mypy's.

    python tools/typecheck.py            the whole package
    python tools/typecheck.py --reveal   what mypy sees of loadstar.engine's Engine (a probe: not Any)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = ROOT / ".mypy_cache" / "layout"


def lay_out() -> Path:
    """The ``loadstar`` package as links to the repository's folders; returns the folder holding it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapped = config["tool"]["setuptools"]["package-dir"]  # {"loadstar.engine": "engine", ...}
    package = LAYOUT / "loadstar"
    package.mkdir(parents=True, exist_ok=True)
    wanted = {name.split(".", 1)[1]: ROOT / folder for name, folder in mapped.items()}
    wanted |= {path.name: path for path in (ROOT / "loadstar").iterdir() if path.suffix in (".py", ".typed")}
    for entry in package.iterdir():
        if entry.name not in wanted:
            entry.unlink()
    for name, target in wanted.items():
        link = package / name
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return LAYOUT


def real_path(line: str, mapped: dict[str, str]) -> str:
    """``loadstar/engine/facade.py:12: ...`` as ``engine/facade.py:12: ...``."""
    match = re.match(r"loadstar/([^/:]+)/", line)
    if match and match.group(1) in mapped:
        return mapped[match.group(1)] + "/" + line[match.end():]
    return line


def mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--cache-dir", str(ROOT / ".mypy_cache"), *args],
                          cwd=cwd, capture_output=True, text=True)


def main(argv: list[str]) -> int:
    root = lay_out()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapped = {name.split(".", 1)[1]: folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}
    if argv == ["--reveal"]:
        # The probe is a module beside the package, checked in the same run as the package: the
        # whole run's cache serves (a run on the probe file alone re-checks everything, ~1 min).
        probe = root / "loadstar_reveal_probe.py"
        probe.write_text("from loadstar.engine.facade import Engine\nreveal_type(Engine.submit)\n")
        try:
            done = mypy("-p", "loadstar", "-m", probe.stem, cwd=root)
        finally:
            probe.unlink()
        print(done.stdout.strip())
        return done.returncode
    done = mypy("-p", "loadstar", cwd=root)
    for line in done.stdout.splitlines():
        print(real_path(line, mapped))
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
