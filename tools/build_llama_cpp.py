"""Build llama-cpp-python for the machine it is installed on, and prove it runs there (``make install``).

PyPI has only llama-cpp-python's source, so pip compiles it with the system compiler. Its default
(``GGML_NATIVE``) compiles for every feature the build machine reports. On an Intel Xeon with AMX,
GCC 12's RTL dead-store elimination drops the stores that fill AMX's tile configuration before
``ldtilecfg`` (the instruction's read of that memory is not modelled), so the tile set-up in
``ggml_backend_amx_mul_mat`` loads garbage, the CPU raises a general-protection fault and the
process dies with SIGSEGV at the first prompt. ``-fno-dse`` keeps the stores, and AMX then runs:
2.1x the decode and 3.1x the prompt speed of the same build without AMX on the default model
(docs/BENCHMARKS.md). Hence, in order:

1. ``install`` (before the rest of requirements.txt): the native build. On a machine with an
   NVIDIA GPU (``nvidia-smi`` lists one) and CUDA's compiler (``nvcc`` on the PATH or in
   ``/usr/local/cuda/bin``), it is built with CUDA for that GPU's architecture
   (``-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90`` on an H100), detected, not asked for, and says
   so in one line; ``LLAMA_CPP_CUDA=off`` leaves CUDA out. On a CPU with AMX, a probe
   (ggml's own tile set-up, a few lines, compiled as ggml is) says whether AMX code from this
   compiler runs; if not, whether it does with ``-fno-dse`` (then the build gets it); if neither,
   AMX is left out. ``LLAMA_CPP_BUILD=portable`` asks for the portable build (AVX2, no
   -march=native) instead.
2. ``check`` (after loadstar is installed): one short greedy completion of the default model in a
   child process (``loadstar.loaders.llamacpp_smoke``). If the build faults, this says so in one
   line, builds and installs the portable variant, and checks that one too.

Wheels are kept by recipe in ``~/.cache/loadstar/llama-cpp`` (keyed by version, CMake arguments,
compiler and, for a native build, this CPU's flags), never in pip's cache, whose key is only the
source: a wheel built for another CPU was once reused from there and hid a segfault. With
``PIP_NO_CACHE_DIR`` set, that cache is neither read nor written. Standard library only: this runs
before anything else is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DISTRIBUTION = "llama_cpp_python"
NATIVE = ["-DGGML_NATIVE=ON"]
PORTABLE = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON"]
COMMON = ["-DLLAVA_BUILD=OFF"]  # Loadstar never loads llama-cpp-python's multimodal library: a third of the build
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
NO_DSE = "-fno-dse"  # GCC's RTL dead-store elimination: off, so the AMX tile configuration is written
BUILD_RECORD = "llama-cpp-build.json"  # in the venv (sys.prefix): what was built, and why

# ggml's own AMX tile set-up (ggml-cpu/amx/mmq.cpp), compiled with the flags ggml uses: if the
# compiler drops the configuration's stores, ldtilecfg faults here as it would in llama.cpp.
AMX_PROBE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>
struct tile_config_t {
    uint8_t palette_id = 0;
    uint8_t start_row = 0;
    uint8_t reserved_0[14] = {0};
    uint16_t colsb[16] = {0};
    uint8_t rows[16] = {0};
};
__attribute__((noinline)) static int configure(int n) {
    alignas(64) tile_config_t tc = {};
    tc.palette_id = 1;
    for (int i = 0; i < n; ++i) { tc.rows[i] = 16; tc.colsb[i] = 64; }
    _tile_loadconfig(&tc);
    _tile_zero(0);
    _tile_release();
    return 0;
}
int main(int argc, char **) {
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)) return 3;
    return configure(argc > 5 ? 1 : 8);
}
"""


def say(line: str) -> None:
    print(f"llama.cpp build: {line}", flush=True)


def pinned_version() -> str:
    """The one pin, in requirements.txt."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.strip().partition("==")
        if sep and name.lower().replace("-", "_") == DISTRIBUTION:
            return version.strip()
    raise SystemExit(f"llama.cpp build: no {DISTRIBUTION}==VERSION line in requirements.txt")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return cxx
    return out.splitlines()[0].strip() if out else cxx


def amx_probe(extra: list[str]) -> str | None:
    """None when ggml's tile set-up, compiled as ggml compiles it plus ``extra``, runs here; else why not."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    with tempfile.TemporaryDirectory() as tmp:
        source, binary = Path(tmp) / "amx_probe.cpp", Path(tmp) / "amx_probe"
        source.write_text(AMX_PROBE)
        built = subprocess.run([cxx, "-O3", "-march=native", *extra, str(source), "-o", str(binary)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            return f"cannot compile AMX code ({(built.stderr.strip().splitlines() or ['?'])[-1]})"
        ran = subprocess.run([str(binary)], capture_output=True)
    if ran.returncode == 0:
        return None
    return f"signal {-ran.returncode}" if ran.returncode < 0 else f"exit status {ran.returncode}"


def amx_flags() -> tuple[str | None, str]:
    """Compiler flags that make AMX code run here (None: leave AMX off), and the reason in one line."""
    if not {"amx_tile", "amx_int8"} <= cpu_flags():
        return "", ""
    fault = amx_probe([])
    if fault is None:
        return "", "AMX on: the probe of ggml's tile set-up runs"
    if amx_probe([NO_DSE]) is None:
        return NO_DSE, (f"AMX on with {NO_DSE}: {compiler()}'s dead-store elimination drops the tile configuration's "
                        f"stores before ldtilecfg, which then faults ({fault}); {NO_DSE} keeps them")
    return None, f"AMX off: code from {compiler()} faults in ggml's tile set-up here ({fault}), {NO_DSE} or not"


def run_quietly(command: list[str]) -> str | None:
    """A command's output, or None when it is missing or fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def cuda_target() -> tuple[str, str] | None:
    """(CUDA architectures for CMake, one line saying what was found) when this machine has an NVIDIA
    GPU and nvcc; None otherwise (then the build is the CPU one, as before)."""
    if os.environ.get("LLAMA_CPP_CUDA", "").lower() in ("off", "0", "no", "false"):
        return None
    smi = shutil.which("nvidia-smi")
    nvcc = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
    if smi is None or nvcc is None:
        return None
    listed = run_quietly([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"])
    gpus = [line.rsplit(",", 1) for line in (listed or "").splitlines() if "," in line]
    archs = sorted({cap.strip().replace(".", "") for _, cap in gpus if re.fullmatch(r"\d+\.\d+", cap.strip())})
    if not archs:
        return None
    version = re.search(r"release ([\d.]+)", run_quietly([nvcc, "--version"]) or "")
    names = ", ".join(sorted({name.strip() for name, _ in gpus}))
    return ";".join(archs), f"CUDA on: {names} (sm_{', sm_'.join(archs)}), nvcc {version.group(1) if version else '?'}"


def recipe(variant: str) -> tuple[list[str], list[str]]:
    """CMake arguments for a variant, and the reasons for them (lines for the user)."""
    cuda = cuda_target()
    gpu = ["-DGGML_CUDA=on", f"-DCMAKE_CUDA_ARCHITECTURES={cuda[0]}"] if cuda else []
    if variant == "portable":
        return [*PORTABLE, *COMMON, *gpu], ["portable: AVX2/FMA/F16C, no -march=native", *([cuda[1]] if cuda else [])]
    args, why = [*NATIVE, *COMMON, *gpu], ["native: every feature this CPU reports (-march=native)"]
    if cuda:
        why.append(cuda[1])
    flags, reason = amx_flags()
    extra = NO_AMX if flags is None else flags
    if extra:
        args += [f"-DCMAKE_C_FLAGS={extra}", f"-DCMAKE_CXX_FLAGS={extra}"]
    if reason:
        why.append(reason)
    return args, why


def cache_folder(version: str, args: list[str], variant: str) -> Path | None:
    if os.environ.get("PIP_NO_CACHE_DIR", "").lower() not in ("", "0", "false", "no", "off"):
        return None
    key = json.dumps([version, args, compiler(), sorted(cpu_flags()) if variant == "native" else []])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loadstar" / "llama-cpp"
    return base / hashlib.sha256(key.encode()).hexdigest()[:24]


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args]
    if subprocess.run(command, env=env).returncode != 0:
        raise SystemExit(f"llama.cpp build: pip {args[0]} failed (see above)")


def build_wheel(version: str, args: list[str], out: Path) -> Path:
    env = dict(os.environ, CMAKE_ARGS=shlex.join(args), FORCE_CMAKE="1",
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    started = time.monotonic()
    say(f"compiling llama-cpp-python {version} ({' '.join(args)}): about 4 minutes on 2 cores")
    pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary", DISTRIBUTION, "-w", str(out),
        f"{DISTRIBUTION}=={version}", env=env)
    say(f"compiled in {time.monotonic() - started:.0f} s")
    return next(out.glob(f"{DISTRIBUTION}-*.whl"))


def installed_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return None


def install(variant: str, *, force: bool = False) -> int:
    version = pinned_version()
    args, why = recipe(variant)
    record_path = Path(sys.prefix) / BUILD_RECORD
    previous = json.loads(record_path.read_text()) if record_path.exists() else {}
    if not force and installed_version() == version and previous.get("cmake_args") == args:
        say(f"{version} ({variant}) is installed already")
        return 0
    if not force and installed_version() == version and previous.get("variant") == "portable":
        say(f"{version} (portable, chosen when the native build faulted) is installed already")
        return 0
    for line in why:
        say(line)
    cache = cache_folder(version, args, variant)
    wheel = next(cache.glob(f"{DISTRIBUTION}-*.whl"), None) if cache and cache.is_dir() else None
    if wheel is not None:
        say(f"using the wheel built before with the same recipe ({cache})")
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            wheel = build_wheel(version, args, Path(tmp))
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                kept = cache / wheel.name
                shutil.copy2(wheel, kept.with_suffix(".partial"))
                os.replace(kept.with_suffix(".partial"), kept)
        pip("install", "--no-deps", "--force-reinstall", str(wheel))
    record = {"version": version, "variant": variant, "cmake_args": args, "why": why, "compiler": compiler()}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    cuda = next((a.split("=", 1)[1] for a in args if a.startswith("-DCMAKE_CUDA_ARCHITECTURES=")), None)
    say(f"installed {version}: {variant}, " + (f"with CUDA for sm_{cuda}" if cuda else "CPU only (no NVIDIA GPU with nvcc here)"))
    return 0


def smoke() -> int:
    """The smoke check's exit status: 0 runs, 1 faulted, 2 could not tell."""
    return subprocess.run([sys.executable, "-m", "loadstar.loaders.llamacpp_smoke", "--check"]).returncode


def check() -> int:
    status = smoke()
    if status != 1:
        return 0  # ran, or could not tell (the server checks again at start)
    built = json.loads((Path(sys.prefix) / BUILD_RECORD).read_text()) if (Path(sys.prefix) / BUILD_RECORD).exists() else {}
    if built.get("variant") == "portable":
        say("the portable build faults too: llama.cpp stays off (the Transformers loader runs GGUF files)")
        return 0
    say("the native build faulted in its smoke test: building the portable one instead")
    install("portable", force=True)
    if smoke() == 1:
        say("the portable build faults too: llama.cpp stays off (the Transformers loader runs GGUF files)")
    return 0


def main(argv: list[str]) -> int:
    variant = os.environ.get("LLAMA_CPP_BUILD", "native") or "native"
    if variant not in ("native", "portable"):
        raise SystemExit(f"llama.cpp build: LLAMA_CPP_BUILD must be native or portable, not {variant!r}")
    if argv[:1] == ["install"] and argv[1:] in ([], ["--force"]):
        return install(variant, force=argv[1:] == ["--force"])
    if argv == ["check"]:
        return check()
    print("usage: build_llama_cpp.py install [--force] | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
