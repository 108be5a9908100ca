"""The AutoGPTQ loader, backed by gptqmodel (the maintained successor of AutoGPTQ).

Loads GPTQ checkpoints of 2/3/4/8 bits, any group size (including none, -1), act-order or not,
sym or asym, formats ``gptq`` and ``gptq_v2``, on CPU and CUDA. GPTQ parameters come from
``quantize_config.json`` / ``config.json``; for legacy GPTQ-for-LLaMa folders without them they
are read from the tensor shapes (see ``engine.gptq_tensors``), and the files gptqmodel needs are
put in a derived folder under Loadstar's data folder: the user's model folder is never written.

CPU kernels are chosen for accuracy first (``choose_kernel``). Each candidate has a measured
bound on its error: the largest difference between its logits and those of an exact float32
dequantization of the same tensors, over a fixed chat prompt, on every checkpoint of the test set
(``tests/test_gptq_accuracy.py`` checks the bounds, ``make bench`` measures them again). A packed
kernel is the default only where that bound is small; none of gptqmodel's CPU kernels is (they
compute in bfloat16, or re-quantize to int8 per channel), so on CPU the default is the exact
path (``loaders.gptq_dense``: the layers dequantized once into float32) when it fits in memory,
else the most accurate packed kernel, with its error bound stated in the load details.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loadstar import (
    Assessment,
    Availability,
    LoadedModelInfo,
    MemoryEstimate,
    ModelFolder,
    ModelLoadError,
    Quantization,
    TensorGPTQ,
    filename_hint,
    hookimpl,
    infer_gptq_from_safetensors,
    load_error,
    load_failure,
    weight_format,
)
from loadstar.loaders.derived_folder import derived_folder
from loadstar.loaders.gptq_dense import dense_bytes, load_dense
from loadstar.loaders.hf_causal_lm import HFCausalLM, batch_size
from loadstar.loaders.weight_bytes import loaded_bytes

log = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 3, 4, 8)
# Weight file names gptqmodel finds on its own; anything else is linked under one of these.
_STANDARD_WEIGHTS = ("model.safetensors",)

Backend = Literal[
    "auto", "dense_float32", "gptq_torch", "gptq_torch_int8", "gptq_torch_aten", "gptq_torch_fused",
    "gptq_triton", "gptq_exllama_v2", "gptq_marlin",
]


class AutoGPTQOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", title='Device', description="auto = CUDA when present, else CPU.")
    backend: Backend = Field("auto", title='Kernel', description=(
        "Kernel; auto = on CUDA gptqmodel's pick, on CPU the fastest within 0.05 logits of the exact model "
        "(dense_float32: the layers dequantized to float32 once, exact, 32/bits times the memory)."))
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Activation dtype; auto = float16 on CUDA, on CPU the kernel's measured dtype."
    )
    allow_pt: bool = Field(False, title='Allow pickled .pt weights', description="Allow a pickled .pt weights file (read with torch weights_only).")
    scratch_dir: Path | None = Field(None, title='Folder for derived files', description="Where derived files go (set by Loadstar to its data folder).")
    max_batch: int = Field(4, ge=1, le=64, title='Requests decoded together', description=(
        "Requests decoded together (continuous batching; a request waits while its KV cache would not "
        "fit in half the free memory); 1 = one at a time."))


@dataclass(frozen=True)
class KernelChoice:
    backend: str
    dtype: str
    why: str


@dataclass(frozen=True)
class CPUKernel:
    """A CPU kernel and its measured error against an exact float32 dequantization."""

    backend: str
    dtype: str
    bits: tuple[int, ...]
    max_logit_error: float  # the largest |logit - exact logit| measured (see the module docstring)
    decode_speed: float  # tokens/s on SmolLM2-135M, 2 cores (bench), for ordering only
    needs_whole_groups: bool = False  # the ATen int4 kernels need groups that divide every input width


DENSE = "dense_float32"
ACCURACY_BOUND = 0.05  # logits: a default kernel must stay this close to the exact model
DENSE_RAM_SHARE = 0.6  # the exact path is taken when the float32 model fits in this share of free RAM
# Measured by bench/gptq_kernels.py on the test set (4-bit g64 act-order, 4-bit g128, 8-bit
# no group act-order, 8-bit g128 with and without act-order); fastest first. Each bound is the
# largest seen on either machine measured: an AMD EPYC (AVX2) and an Intel Xeon with AVX-512 BF16
# and AMX, whose bfloat16 matrix kernels round differently (fused bf16 1.27 there, 2.11 here;
# int8 bf16 2.92 and 3.68; fused float32 1.03 and 1.30).
CPU_KERNELS: tuple[CPUKernel, ...] = (
    CPUKernel("gptq_torch_fused", "bfloat16", (4,), 2.11, 25.2, needs_whole_groups=True),
    CPUKernel("gptq_torch_int8", "bfloat16", (2, 4, 8), 3.68, 21.0),
    CPUKernel("gptq_torch_fused", "float32", (4,), 1.30, 21.3, needs_whole_groups=True),  # bf16 inside
    CPUKernel("gptq_torch_aten", "bfloat16", (4,), 2.11, 16.4, needs_whole_groups=True),
    CPUKernel(DENSE, "float32", (2, 4, 8), 0.001, 13.0),
    CPUKernel("gptq_torch_int8", "float32", (2, 4, 8), 2.59, 5.4),
    CPUKernel("gptq_torch", "bfloat16", (2, 3, 4, 8), 2.57, 2.5),
)


def kernel_error(backend: str, dtype: str) -> float | None:
    return next((k.max_logit_error for k in CPU_KERNELS if (k.backend, k.dtype) == (backend, dtype)), None)


def choose_kernel(gptq: Quantization, tensors: TensorGPTQ | None, device: str, *, dense_fits: bool = True) -> KernelChoice:
    """The kernel for these shapes on ``device``: on CPU the fastest whose measured error is within
    ``ACCURACY_BOUND``, else the exact float32 path if it fits in memory, else the most accurate."""
    if device == "cuda":
        return KernelChoice("auto", "float16", "CUDA: gptqmodel picks the kernel")
    bits = gptq.bits or 4
    whole_groups = tensors is not None and tensors.group_divides_inputs()
    usable = [k for k in CPU_KERNELS if bits in k.bits and (whole_groups or not k.needs_whole_groups)
              and (k.backend != DENSE or dense_fits)]
    accurate = [k for k in usable if k.max_logit_error <= ACCURACY_BOUND]
    if accurate:
        best = accurate[0]
        why = ("exact float32 dequantization (no packed CPU kernel is within "
               f"{ACCURACY_BOUND} logits of it)" if best.backend == DENSE else
               f"{best.backend} ({best.dtype}), within {best.max_logit_error} logits of exact")
        return KernelChoice(best.backend, best.dtype, why)
    best = min(usable, key=lambda k: k.max_logit_error)
    return KernelChoice(best.backend, best.dtype,
                        f"{best.backend} ({best.dtype}): the exact float32 model does not fit in free memory; "
                        f"answers may differ from it by up to {best.max_logit_error} logits")


class AutoGPTQLoader:
    name = "AutoGPTQ"
    Options = AutoGPTQOptions

    def availability(self) -> Availability:
        if importlib.util.find_spec("gptqmodel") is None:
            return Availability(False, "gptqmodel is not installed")
        return Availability(True, f"gptqmodel {version('gptqmodel')}")

    def assess(self, folder: ModelFolder) -> Assessment:
        gptq = folder.gptq
        if gptq is None:
            return Assessment(False, "not a GPTQ model (no quantize_config.json, no GPTQ tensors)")
        if folder.load_blocker:
            return Assessment(False, folder.load_blocker)
        if gptq.bits is not None and gptq.bits not in SUPPORTED_BITS:
            return Assessment(False, f"{gptq.bits}-bit GPTQ is not supported (2, 3, 4 or 8)")
        notes = [gptq.describe()]
        if gptq.source.startswith("tensor shapes"):
            notes.append(f"parameters read from the {gptq.source}")
        if "safetensors" not in folder.formats:
            if "pt" not in folder.formats:
                return Assessment(False, "no .safetensors or .pt GPTQ weights")
            notes.append("only a pickled .pt file: needs the .pt opt-in")
            return Assessment(True, ", ".join(notes), 60)
        priority = 100 if gptq.bits == 8 else 80  # 4-bit: ExLlamaV2 is faster where it runs
        return Assessment(True, ", ".join(notes), priority)

    def estimate_memory(self, folder: ModelFolder, options: BaseModel) -> MemoryEstimate | None:
        """For the exact float32 path (the CPU's choice whenever it fits): every GPTQ layer
        dequantized, read from the safetensors headers, and a float32 KV cache that grows as used.
        None for the packed kernels: what they hold differs by kernel (the int8 one repacks 4-bit
        weights into bytes; CUDA kernels reorder them), and a guess is not shown."""
        assert isinstance(options, AutoGPTQOptions)
        gptq, files = folder.gptq, folder.files_of("safetensors")
        if gptq is None or not files or not gptq.bits or 32 % gptq.bits:
            return None
        import torch

        device = _pick_device(options.device, torch)
        backend: str = options.backend
        if backend == "auto":
            stored = sum(w.size for w in folder.weight_files if w.format in ("safetensors", "pt"))
            backend = choose_kernel(gptq, folder.tensor_gptq, device, dense_fits=_dense_fits(stored, gptq.bits)).backend
        if backend != DENSE:
            return None
        try:
            weights = sum(loaded_bytes(folder.path / f.path, 4, dequantized_bits=gptq.bits) for f in files)
        except (OSError, ValueError) as error:
            raise ModelLoadError(str(error)) from None
        per_token, context = folder.kv_bytes_per_token, folder.context_length
        kv = per_token * 2 * context * options.max_batch if per_token and context else None  # f16 figure, float32 cache
        return MemoryEstimate(weights, kv, context, options.max_batch, grows=True)

    def load(self, folder: ModelFolder, options: BaseModel) -> HFCausalLM:
        assert isinstance(options, AutoGPTQOptions)
        import torch

        device = _pick_device(options.device, torch)
        staged, gptq, tensors, notes = stage_gptq_folder(folder, options)
        weight_files = [w for w in folder.weight_files if w.format in ("safetensors", "pt")]
        weight_bytes = sum(w.size for w in weight_files)
        kernel = choose_kernel(gptq, tensors, device, dense_fits=_dense_fits(weight_bytes, gptq.bits or 4))
        backend = kernel.backend if options.backend == "auto" else options.backend
        dtype = options.dtype if options.dtype != "auto" else (
            kernel.dtype if options.backend == "auto" else _measured_dtype(backend, device))
        if backend == DENSE:
            dtype = "float32"
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(staged, trust_remote_code=False)
            if backend == DENSE:
                wrapper = None
                model = load_dense(staged, gptq).to(device)
            else:
                from gptqmodel import BACKEND, GPTQModel

                wrapper = GPTQModel.load(
                    str(staged), device=device, backend=BACKEND(backend), dtype=getattr(torch, dtype),
                    trust_remote_code=False,
                )
                model = wrapper.model
        except ModelLoadError:
            raise
        except Exception as error:
            raise load_error(self.name, folder.name, error, [w.path for w in weight_files], folder.path) from None
        model.eval()
        kernels = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Linear")} - {"Linear"})
        error_bound = kernel_error(backend, dtype) if device == "cpu" else None
        accuracy = f", measured error ≤ {error_bound} logits" if error_bound is not None else ""
        why = f" ({kernel.why})" if options.backend == "auto" and device == "cpu" else ""
        details = f"{gptq.describe()}, {backend} kernel{' (' + ', '.join(kernels) + ')' if kernels else ''}{accuracy}{why}"
        max_batch, batch_note = batch_size(model, options.max_batch)
        details += f", {batch_note}"
        if notes:
            details += "; " + "; ".join(notes)
        info = LoadedModelInfo(
            name=folder.name, loader=self.name, device=device, dtype=dtype,
            context_length=folder.context_length, details=details,
        )
        return HFCausalLM(model, tokenizer, info, keepalive=wrapper, max_batch=max_batch)


@hookimpl
def register_loaders(register) -> None:
    register(AutoGPTQLoader())


def _measured_dtype(backend: str, device: str) -> str:
    """For a kernel the user picked: the dtype with its smallest measured error (float16 on CUDA)."""
    if device == "cuda":
        return "float16"
    measured = [k for k in CPU_KERNELS if k.backend == backend]
    return min(measured, key=lambda k: k.max_logit_error).dtype if measured else "bfloat16"


def _dense_fits(weight_bytes: int, bits: int) -> bool:
    import psutil

    return dense_bytes(weight_bytes, bits) <= psutil.virtual_memory().available * DENSE_RAM_SHARE


def _pick_device(requested: str, torch) -> str:
    cuda = torch.cuda.is_available()
    if requested == "cuda" and not cuda:
        raise ModelLoadError("device cuda was asked for but no CUDA device is available")
    if requested == "auto":
        return "cuda" if cuda else "cpu"
    return requested


def stage_gptq_folder(
    folder: ModelFolder, options: AutoGPTQOptions
) -> tuple[Path, Quantization, TensorGPTQ | None, list[str]]:
    """The folder gptqmodel should load, with the GPTQ parameters and notes for the user.

    A folder with ``quantize_config.json`` and standard safetensors names loads as it is.
    Otherwise a derived folder is built under ``scratch_dir``: links to the user's files, the
    weights under a standard name (a .pt converted to safetensors, with the user's opt-in), and
    a ``quantize_config.json`` written from the tensor shapes. The user's folder is not touched.
    """
    gptq = folder.gptq
    if gptq is None:
        raise ModelLoadError(f"{folder.name} is not a GPTQ model")
    safetensors = [w.path for w in folder.files_of("safetensors")]
    declared = (folder.path / "quantize_config.json").is_file()
    if declared and safetensors and all(name in _STANDARD_WEIGHTS or name.startswith("model-") for name in safetensors):
        return folder.path, gptq, folder.tensor_gptq, []

    if safetensors:
        if len(safetensors) > 1:
            raise ModelLoadError(f"{folder.name} has several .safetensors files but no quantize_config.json naming one")
        source = folder.path / safetensors[0]
    else:
        pt_files = [w.path for w in folder.files_of("pt")]
        if not pt_files:
            raise ModelLoadError(f"{folder.name} has no .safetensors or .pt GPTQ weights")
        if not options.allow_pt:
            raise ModelLoadError(
                f"{folder.name}: {pt_files[0]} is a pickled .pt file; load it only if you trust its source, "
                f"with --allow-pt (or 'Allow .pt weights' in the Model tab); it is then read with torch weights_only"
            )
        source = folder.path / pt_files[0]
    if options.scratch_dir is None:
        raise ModelLoadError(f"{folder.name} needs derived files but no scratch folder is set")

    weights = source if source.suffix == ".safetensors" else _converted_pt(source, options.scratch_dir / "converted")
    tensors = folder.tensor_gptq if source.suffix == ".safetensors" else infer_gptq_from_safetensors(weights)
    if tensors is None:
        raise ModelLoadError(f"{folder.name}: {source.name} holds no GPTQ tensors (qweight, qzeros, scales)")
    entries: dict[str, bytes | Path] = {"model.safetensors": weights}
    notes = []
    if declared:
        written = json.loads((folder.path / "quantize_config.json").read_text())
    else:
        written = {
            "bits": tensors.bits,
            "group_size": tensors.group_size,
            "desc_act": tensors.desc_act,
            "sym": True if tensors.sym is None else tensors.sym,
            "quant_method": "gptq",
            "checkpoint_format": "gptq",  # GPTQ-for-LLaMa wrote the v1 zero-point format
        }
        entries["quantize_config.json"] = json.dumps(written, indent=2).encode()
        notes.append(f"no quantize_config.json: {tensors.describe()} read from the tensor shapes")
        hint_bits, hint_group = filename_hint(source.name)
        if hint_bits not in (None, tensors.bits) or hint_group not in (None, tensors.group_size):
            raise ModelLoadError(
                f"{folder.name}: the file name {source.name} says {hint_bits}-bit/{hint_group}g but its tensors are "
                f"{tensors.bits}-bit group {tensors.group_size}"
            )
        if (hint_bits, hint_group) != (None, None):
            notes.append(f"agrees with the file name ({source.name})")
    target = derived_folder(
        folder.path, options.scratch_dir / "gptq", entries, skip=lambda name: weight_format(name) is not None
    )
    notes.append(f"derived files in {target} (your model folder is unchanged)")
    gptq = Quantization(
        method="gptq", source="quantize_config.json" if declared else f"tensor shapes in {source.name}",
        bits=written["bits"], group_size=written["group_size"], desc_act=written["desc_act"], sym=written.get("sym"),
        checkpoint_format=written.get("checkpoint_format"),
    )
    return target, gptq, tensors, notes


def _converted_pt(source: Path, root: Path) -> Path:
    """``source`` (.pt) converted to safetensors under ``root``, once per version of the file."""
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = root / f"{source.stem}-{key}.safetensors"
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{target.name}-")
    os.close(fd)
    try:
        _convert_pt(source, Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _convert_pt(source: Path, target: Path) -> None:
    """Read a .pt state dict with weights_only (no pickled code runs) and save it as safetensors."""
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        log.warning("torch.load refused %s", source, exc_info=True)
        raise ModelLoadError(load_failure(error, [source.name], source.parent)) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{source.name} is not a plain dictionary of tensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
