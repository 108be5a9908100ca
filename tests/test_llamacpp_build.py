"""The llama.cpp build check: a build that faults on this machine is refused in one line, the server stays up.

The fault is simulated the way it happens: a ``llama_cpp`` package earlier on the path whose native
side dies by SIGSEGV when used (here, as soon as it is imported). The real installed build is
checked too: it must pass its smoke test on this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from loadstar.loaders.llamacpp_smoke import RECORD_FILE, build_fingerprint, check_build, run_smoke
from tests.helpers import ROOT, running_server

ADMIN_KEY = "admin-key-for-tests"


def faulting_llama_cpp(root: Path) -> Path:
    """A folder holding a ``llama_cpp`` package that dies by SIGSEGV as a faulting native build would.

    Its contents are new each time, so its fingerprint is one no record has seen."""
    package = root / "faulting" / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text(
        f"# {uuid.uuid4()}\nimport os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    (package / "lib" / "libllama.so").write_bytes(b"\x7fELF not really")
    return package.parent


def test_the_installed_build_passes_its_smoke_test_here(default_models_dir, tmp_path):
    result = check_build(model=default_models_dir / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf",
                         record_dir=tmp_path)
    assert result is not None and result.ok, result
    assert not result.faulted and "passed" in result.reason
    assert "AVX" in result.system_info or "NEON" in result.system_info  # llama.cpp's own report of what it uses
    # The record: the next check of the same build on the same CPU runs no child.
    record = json.loads((tmp_path / RECORD_FILE).read_text())
    assert list(record) == [build_fingerprint()]
    again = check_build(model=Path("/nonexistent.gguf"), record_dir=tmp_path)
    assert again == result


def test_a_build_that_dies_by_a_signal_is_a_fault_in_one_line(tmp_path, monkeypatch, default_models_dir):
    monkeypatch.setenv("PYTHONPATH", f"{faulting_llama_cpp(tmp_path)}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = run_smoke(default_models_dir / "SmolLM2-135M-Instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert result.faulted and result.signal == 11 and not result.ok
    assert "SIGSEGV, signal 11" in result.reason and "\n" not in result.reason
    assert "make llama-cpp LLAMA_CPP_BUILD=portable" in result.reason


def test_a_child_that_fails_without_a_signal_is_not_a_fault(tmp_path):
    result = run_smoke(tmp_path / "missing.gguf")
    assert not result.ok and not result.faulted
    assert "smoke test failed" in result.reason and "\n" not in result.reason


@pytest.mark.slow
def test_a_faulting_build_is_refused_and_the_server_stays_up(tmp_path, default_models_dir):
    env = {"PYTHONPATH": os.pathsep.join([str(faulting_llama_cpp(tmp_path)), str(ROOT)])}
    with running_server(tmp_path, "--models-dir", str(default_models_dir), "--no-model", "--admin-key", ADMIN_KEY,
                        env=env) as base:
        request = urllib.request.Request(
            f"{base}/admin/models/load", method="POST",
            data=json.dumps({"model": "SmolLM2-135M-Instruct", "loader": "llama.cpp"}).encode(),
            headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=120)
        assert refused.value.code == 400
        message = json.loads(refused.value.read())["error"]["message"]
        assert "this llama.cpp build crashed in its smoke test (SIGSEGV, signal 11)" in message
        assert "\n" not in message
        with urllib.request.urlopen(f"{base}/health", timeout=30) as health:
            assert json.loads(health.read())["status"] == "ok"
    log = (tmp_path / "server.log").read_text()
    refusals = [line for line in log.splitlines() if "crashed in its smoke test" in line]
    assert len(refusals) == 1, log  # said once, in one line, at the first look at the loader
    assert "Traceback" not in log


def test_the_install_tool_reads_its_pin_from_requirements():
    done = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import build_llama_cpp as b; "
                           "print(b.pinned_version(), b.recipe('portable')[0])"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pin = next(line.split("==")[1] for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.startswith("llama_cpp_python=="))
    assert done.stdout.startswith(pin + " ")
    assert "-DGGML_NATIVE=OFF" in done.stdout and "-DLLAVA_BUILD=OFF" in done.stdout


def recipe_with(path: str) -> list[str]:
    """The native recipe's CMake arguments as the install tool works them out with ``PATH=path``."""
    code = ("import json, sys; sys.path.insert(0, 'tools'); import build_llama_cpp as b; "
            "print(json.dumps(b.recipe('native')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PATH": path},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_make_install_builds_llama_cpp_with_cuda_where_a_gpu_and_nvcc_are(tmp_path):
    """The detection, with nvidia-smi and nvcc faked as an H100 machine shows them; without them the
    CPU recipe is the one it always was."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 9.0'\n")
    (fake / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    for tool in fake.iterdir():
        tool.chmod(0o755)
    plain = os.environ["PATH"]
    args, why = recipe_with(f"{fake}{os.pathsep}{plain}")
    assert "-DGGML_CUDA=on" in args and "-DCMAKE_CUDA_ARCHITECTURES=90" in args
    assert "CUDA on: NVIDIA H100 80GB HBM3 (sm_90), nvcc 13.0" in why
    cpu_args, cpu_why = recipe_with(plain)
    assert not any("CUDA" in a for a in cpu_args) and not any("CUDA" in w for w in cpu_why)
    assert [a for a in args if "CUDA" not in a] == cpu_args  # the CPU part of the recipe is unchanged
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed: no driver'; exit 9\n")  # no GPU here
    assert recipe_with(f"{fake}{os.pathsep}{plain}") == [cpu_args, cpu_why]
