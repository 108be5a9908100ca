"""Real test checkpoints derived from the embedded default model, cached by recipe.

Each recipe is a function; its cache key hashes the recipe's source and the library versions,
so changing either rebuilds. Builds go to a temporary folder and are renamed into place, so a
killed build never leaves a half-written checkpoint in the cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from loadstar.engine.models.default_model import DEFAULT_MODEL_FILE, default_model_source

ROOT = Path(__file__).resolve().parent.parent


def cached(cache: Path, name: str, recipe: Callable[[Path], None], *, key_parts: tuple[str, ...] = ()) -> Path:
    built = cached_or_busy(cache, name, recipe, key_parts=key_parts, wait=True)
    assert built is not None
    return built


def cached_or_busy(cache: Path, name: str, recipe: Callable[[Path], None], *, key_parts: tuple[str, ...] = (),
                   wait: bool = True) -> Path | None:
    """``cached``; with ``wait=False``, None at once when another process is building it."""
    key_source = "|".join((inspect.getsource(recipe), version("transformers"), version("torch"), *key_parts))
    key = hashlib.sha256(key_source.encode()).hexdigest()[:12]
    target = cache / f"{name}-{key}"
    if target.is_dir():
        return target
    # One build per recipe: a second test process (pytest-xdist's other worker) that needs it
    # waits here for the first one's build instead of building it again beside it.
    with (cache / f".{name}-{key}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        if target.is_dir():
            return target
        build = Path(tempfile.mkdtemp(dir=cache, prefix=f".{name}-"))
        try:
            recipe(build)
            build.rename(target)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
    return target


def smollm2_safetensors(out: Path) -> None:
    """SmolLM2-135M-Instruct dequantized from the GGUF and saved as a bf16 safetensors HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = default_model_source().parent
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_MODEL_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=DEFAULT_MODEL_FILE, dtype=torch.float32)
    # The GGUF-loaded model is flagged as quantized and refuses to save: rebuild a plain model
    # from its config and copy the dequantized weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def tiny_random_llama_bin(out: Path) -> None:
    """A tiny random Llama saved as pytorch_model.bin (plain tensors, loadable with weights_only)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(config)
    config.save_pretrained(out)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    smollm_tokenizer_into(out)


def smollm_tokenizer_into(out: Path) -> None:
    from transformers import AutoTokenizer

    source = default_model_source().parent
    AutoTokenizer.from_pretrained(source, gguf_file=DEFAULT_MODEL_FILE).save_pretrained(out)


def gptq_checkpoint(cache: Path, bits: int, group_size: int, desc_act: bool, *, threads: int = 2) -> Path:
    """SmolLM2 quantized by gptqmodel on CPU, cached by recipe (``threads``: the build's CPU threads;
    it does not change the recipe)."""
    built = gptq_checkpoint_or_busy(cache, bits, group_size, desc_act, threads=threads, wait=True)
    assert built is not None
    return built


def gptq_checkpoint_or_busy(cache: Path, bits: int, group_size: int, desc_act: bool, *, threads: int = 2,
                            wait: bool = True) -> Path | None:
    """``gptq_checkpoint``; with ``wait=False``, None at once when another process is building it."""
    source = cached(cache, "smollm2-135m-bf16-safetensors", smollm2_safetensors)
    script = Path(__file__).with_name("quantize_checkpoint.py")

    def quantize(out: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "OMP_NUM_THREADS": str(threads),  # its pools need 2
                   "PYTHONPATH": str(ROOT), "HF_HOME": str(Path(scratch) / "hf"),
                   # gptqmodel's progress bars redraw on every step: about a tenth of a build here
                   "LOGBAR_ANIMATION": "0", "LOGBAR_PROGRESS_OUTPUT_INTERVAL": "100000"}
            args = [sys.executable, "-m", "tests.quantize_checkpoint", str(source), str(out),
                    str(bits), str(group_size), "1" if desc_act else "0"]
            result = subprocess.run(args, cwd=scratch, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"quantizing failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")

    name = f"smollm2-gptq-{bits}bit-g{group_size}-{'act' if desc_act else 'noact'}"
    return cached_or_busy(cache, name, quantize, key_parts=(script.read_text(), version("gptqmodel"), source.name),
                          wait=wait)


# Every GPTQ recipe the tests use (bits, group size, act-order); the 8-bit g128 pair is TheBloke's
# gptq-8bit-128g-actorder_* branches with and without act-order.
GPTQ_RECIPES = ((4, 64, True), (4, 128, False), (8, -1, True), (8, 128, True), (8, 128, False))


def gptq_checkpoints(cache: Path) -> dict[tuple[int, int, bool], Path]:
    """Every checkpoint of GPTQ_RECIPES, the missing ones built two at a time with one thread each.

    A build is mostly GPTQ's column loop, Python-bound small tensor operations, so one build uses
    little of a second core: two one-thread builds side by side take about as long as one
    two-thread build (measured in docs/TESTING.md)."""
    from concurrent.futures import ThreadPoolExecutor

    cached(cache, "smollm2-135m-bf16-safetensors", smollm2_safetensors)  # their common source, first
    cpus = len(os.sched_getaffinity(0))  # this process's share (one CPU each under make test's two workers)
    workers = max(1, min(2, cpus))
    threads = max(1, cpus // workers)
    with ThreadPoolExecutor(workers) as pool:
        # First the recipes no other process is building, then a wait for the rest: two test workers
        # build different checkpoints side by side (in one order, the second waited on each in turn).
        free = {recipe: pool.submit(gptq_checkpoint_or_busy, cache, *recipe, threads=threads, wait=False)
                for recipe in GPTQ_RECIPES}
        built = {recipe: build.result() for recipe, build in free.items()}
        busy = {recipe: pool.submit(gptq_checkpoint, cache, *recipe, threads=threads)
                for recipe, folder in built.items() if folder is None}
        return {recipe: busy[recipe].result() if folder is None else folder for recipe, folder in built.items()}


LEGACY_STEM = "smollm2-135M-GPTQ-4bit-128g.no-act-order"


def legacy_checkpoint(cache: Path) -> Path:
    """A GPTQ-for-LLaMa-style folder: no quantize_config.json, no quantization_config in
    config.json, an old-style weights name, and a .pt twin of the same tensors."""
    source = gptq_checkpoint(cache, 4, 128, False)

    def build(out: Path) -> None:
        import torch
        from safetensors.torch import load_file

        out.mkdir(parents=True, exist_ok=True)
        for entry in source.iterdir():
            if entry.name in ("quantize_config.json", "model.safetensors", "quant_log.csv"):
                continue
            if entry.name == "config.json":
                config = json.loads(entry.read_text())
                config.pop("quantization_config", None)
                (out / "config.json").write_text(json.dumps(config, indent=2))
            elif entry.is_file():
                shutil.copyfile(entry, out / entry.name)
        shutil.copyfile(source / "model.safetensors", out / f"{LEGACY_STEM}.safetensors")
        torch.save(load_file(str(source / "model.safetensors")), out / f"{LEGACY_STEM}.pt")

    return cached(cache, "smollm2-gptq-legacy", build, key_parts=(source.name,))
