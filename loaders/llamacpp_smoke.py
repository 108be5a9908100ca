"""Does this llama.cpp build run on this machine? One short greedy completion in a child process.

llama-cpp-python is compiled on the machine it is installed on, and a build can fault there: on
an Intel Xeon with AMX, GCC 12's optimiser dropped the stores that fill AMX's tile configuration,
so ``ldtilecfg`` in ``ggml_backend_amx_mul_mat`` raised a general-protection fault and the whole
server died at the first message. A native fault cannot be caught in the process it happens in,
so the check runs where a fault costs nothing: a child that loads the default model and reads a
short prompt (prompt processing is where the quantized matrix kernels run) and greedily decodes
a few tokens.

- ``check_build()`` is the loader's verdict: the build's fingerprint (its native libraries'
  contents, its version and this CPU's model and flags) is looked up in a small record kept in
  the virtual environment (``sys.prefix``); only a build or a machine not seen before runs the
  child (well under a second here). ``make install`` runs the same check through ``--check``.
- A child that dies by a signal is a faulting build: the loader is refused with one line.
  A child that fails otherwise, or does not finish in time on a busy machine, is not recorded:
  the loader stays available and the reason is logged.

Run as ``python -m loadstar.loaders.llamacpp_smoke --check`` (the install's check, one line out;
exit status 0 runs, 1 faulted, 2 could not tell) or ``--child MODEL`` (the generation itself,
one JSON line out). ``llama_cpp`` is imported only in the child.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadstar import default_model_source, one_line, write_atomic

log = logging.getLogger(__name__)

RECORD_FILE = "loadstar-llama-cpp-smoke.json"  # in sys.prefix: the record belongs to this environment's build
RECORDS_KEPT = 16
CHILD_TIMEOUT_S = 120.0  # a busy 2-core machine can take seconds to start Python; a hang is not a fault
SMOKE_PROMPT = "The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is"
SMOKE_TOKENS = 4


@dataclass(frozen=True)
class SmokeResult:
    """What the child did: ran (``ok``), faulted (``signal`` set), or could not tell (neither)."""

    ok: bool
    reason: str  # one line: what ran, or why not
    signal: int | None = None
    system_info: str = ""
    seconds: float = 0.0

    @property
    def faulted(self) -> bool:
        return self.signal is not None


def build_fingerprint() -> str | None:
    """The installed build and this machine in one hash; None when llama-cpp-python is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    digest = hashlib.sha256()
    libraries = sorted(p for p in (package / "lib").glob("*") if p.is_file()) if (package / "lib").is_dir() else []
    for path in [package / "__init__.py", *libraries]:
        digest.update(path.name.encode())
        try:
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        except OSError:
            digest.update(b"unreadable")
    digest.update(_cpu_identity().encode())
    return digest.hexdigest()


def _cpu_identity() -> str:
    """The CPU's model name and feature flags: a build that ran on one CPU may fault on another."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        import platform

        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "flags", "Features", "CPU implementer", "CPU part"):
            fields.setdefault(key.strip(), value.strip())
    return json.dumps(fields, sort_keys=True)


def run_smoke(model: Path, *, timeout: float = CHILD_TIMEOUT_S) -> SmokeResult:
    """Run the child on ``model`` and say what happened. Never raises for what the child did."""
    command = [sys.executable, "-m", "loadstar.loaders.llamacpp_smoke", "--child", str(model)]
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SmokeResult(False, f"the llama.cpp smoke test did not finish in {timeout:.0f} s (not counted as a fault)")
    except OSError as error:
        return SmokeResult(False, f"the llama.cpp smoke test could not start: {one_line(error)}")
    seconds = time.monotonic() - started
    if done.returncode < 0:
        number = -done.returncode
        name = _signal_name(number)
        return SmokeResult(False, (
            f"this llama.cpp build crashed in its smoke test ({name}, signal {number}) on this CPU: it is not used; "
            "rebuild it with `make llama-cpp LLAMA_CPP_BUILD=portable` (README: llama.cpp build)"
        ), signal=number, seconds=seconds)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return SmokeResult(False, f"the llama.cpp smoke test failed: {last[:300]}", seconds=seconds)
    report = json.loads(lines[-1])
    return SmokeResult(True, f"llama.cpp smoke test passed: {report['tokens']} tokens {report['text']!r}",
                       system_info=report.get("system_info", ""), seconds=seconds)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def check_build(*, model: Path | None = None, record_dir: Path | None = None) -> SmokeResult | None:
    """The verdict on the installed build: from the record when this build and CPU were seen, else run.

    None when there is nothing to check (no llama-cpp-python, or no default model to run).
    """
    fingerprint = build_fingerprint()
    if fingerprint is None:
        return None
    record_path = (record_dir or Path(sys.prefix)) / RECORD_FILE
    records = _read_records(record_path)
    known = records.get(fingerprint)
    if known is not None:
        return SmokeResult(**known)
    if model is None:
        try:
            model = default_model_source()
        except Exception as error:  # the default model is missing: nothing to run the check on
            log.warning("llama.cpp build not checked: %s", one_line(error))
            return None
    result = run_smoke(model)
    if result.ok or result.faulted:  # a failure that is neither (a timeout, a missing file) is asked again next time
        records[fingerprint] = asdict(result)
        _write_records(record_path, records)
    return result


def _read_records(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    fields = set(SmokeResult.__dataclass_fields__)
    return {k: v for k, v in data.items() if isinstance(v, dict) and set(v) == fields}


def _write_records(path: Path, records: dict[str, dict]) -> None:
    kept = dict(list(records.items())[-RECORDS_KEPT:])
    try:
        write_atomic(path, (json.dumps(kept, indent=1) + "\n").encode())
    except OSError as error:  # a read-only environment: the check runs again at the next start
        log.info("llama.cpp smoke record not kept (%s)", one_line(error))


def _child(model: str) -> int:
    """The generation itself: load, read the prompt, decode a few greedy tokens, print one JSON line."""
    import llama_cpp

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, min(4, allowed))
    llm = llama_cpp.Llama(model_path=model, n_ctx=256, n_threads=threads, n_threads_batch=threads, verbose=False)
    out: Any = llm.create_completion(SMOKE_PROMPT, max_tokens=SMOKE_TOKENS, temperature=0.0)  # a dict: no stream
    text = out["choices"][0]["text"]
    print(json.dumps({
        "text": text, "tokens": out["usage"]["completion_tokens"],
        "system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
    }), flush=True)
    llm.close()
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"] and len(argv) == 2:
        return _child(argv[1])
    if argv == ["--check"]:
        result = check_build()
        if result is None:
            print("llama.cpp: nothing to check (llama-cpp-python or the default model is not installed)")
            return 2
        print(result.reason + (f" in {result.seconds:.1f} s [{result.system_info}]" if result.ok else ""))
        return 0 if result.ok else 1 if result.faulted else 2
    print("usage: python -m loadstar.loaders.llamacpp_smoke --check | --child MODEL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
