"""The Transformers loader: unquantized Hugging Face folders (safetensors, or .bin read with
``weights_only``) and GGUF files, which transformers dequantizes on load.

CPU by default, CUDA when present. dtype, measured on our CPU machines: GGUF runs faster in
float32 (transformers keeps the packed weights and computes in float32 either way), other
checkpoints load in bfloat16 on CPU; on CUDA bfloat16 where supported, else float16.
No ``trust_remote_code``: architectures must be built into transformers.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from importlib.metadata import version
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loadstar import (
    Assessment,
    Availability,
    LoadedModelInfo,
    MemoryEstimate,
    ModelFolder,
    ModelLoadError,
    hookimpl,
    load_error,
)
from loadstar.loaders.hf_causal_lm import HFCausalLM, batch_size
from loadstar.loaders.weight_bytes import loaded_bytes


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", title='Device', description="auto = CUDA when present, else CPU.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="auto = float32 for GGUF on CPU, bfloat16 otherwise (float16 on GPUs without bf16)."
    )
    gguf_file: str | None = Field(None, title='GGUF file', description="Which .gguf file to load when the folder has several.")
    max_batch: int = Field(4, ge=1, le=64, title='Requests decoded together', description=(
        "Requests decoded together (continuous batching; a request waits while its KV cache would not "
        "fit in half the free memory); 1 = one at a time."))


class TransformersLoader:
    name = "Transformers"
    Options = TransformersOptions

    def availability(self) -> Availability:
        missing = [p for p in ("torch", "transformers") if importlib.util.find_spec(p) is None]
        if missing:
            return Availability(False, f"{' and '.join(missing)} not installed")
        return Availability(True, f"transformers {version('transformers')}, {_device_description()}")

    def assess(self, folder: ModelFolder) -> Assessment:
        if not folder.weight_files:
            return Assessment(False, "no weight files (.safetensors, .bin, .gguf) in the folder")
        if folder.load_blocker:
            return Assessment(False, folder.load_blocker)
        quant = folder.quantization
        if quant is not None and quant.method == "gptq":
            return _assess_gptq(folder)
        if quant is not None and quant.method != "gguf":
            return Assessment(False, f"{quant.describe()} weights need a quantization loader")
        if folder.tensor_gptq is not None:
            return Assessment(False, "GPTQ tensors without a quantization config: use AutoGPTQ")
        if "gguf" in folder.formats:
            arch = folder.architecture or "unknown"
            if arch not in _gguf_architectures():
                return Assessment(False, f"GGUF architecture '{arch}' is not supported by transformers")
            many = len(folder.files_of("gguf"))
            which = f"{many} GGUF files, choose one" if many > 1 else "GGUF file"
            kind = quant.gguf_type if quant and quant.gguf_type else "GGUF"
            return Assessment(True, f"{which} ({kind}), dequantized by transformers on load", priority=50)
        if not folder.has_config:
            return Assessment(False, "no config.json next to the weights")
        if folder.architecture and folder.architecture not in _causal_lm_architectures():
            return Assessment(
                False, f"architecture {folder.architecture} is not built into transformers (remote code is off)"
            )
        if "safetensors" in folder.formats:
            return Assessment(True, f"unquantized safetensors weights ({folder.architecture or 'unknown'})", 100)
        if "bin" in folder.formats:
            return Assessment(True, "unquantized .bin weights, read with torch weights_only (no pickled code runs)", 90)
        return Assessment(False, "only .pt files: not a transformers checkpoint")

    def estimate_memory(self, folder: ModelFolder, options: BaseModel) -> MemoryEstimate | None:
        """The safetensors weights at the dtype they load in (read from their headers), and the KV
        cache, which grows as requests use it: a full-context request's, up to ``max_batch`` of them.
        None for GGUF (dequantized to float32 on load) and .bin weights: their headers are not read."""
        assert isinstance(options, TransformersOptions)
        files = folder.files_of("safetensors")
        if not files or _pick_gguf(folder, options.gguf_file) is not None:
            return None
        size = _DTYPE_BYTES.get(options.dtype, 2)  # auto: bfloat16, or float16 on GPUs without it (no torch import to ask)
        try:
            weights = sum(loaded_bytes(folder.path / f.path, size) for f in files)
        except (OSError, ValueError) as error:
            raise ModelLoadError(str(error)) from None
        per_token, context = folder.kv_bytes_per_token, folder.context_length
        kv = per_token * size // 2 * context * options.max_batch if per_token and context else None
        return MemoryEstimate(weights, kv, context, options.max_batch, grows=True)

    def load(self, folder: ModelFolder, options: BaseModel) -> HFCausalLM:
        assert isinstance(options, TransformersOptions)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = _pick_device(options.device)
        gguf_file = _pick_gguf(folder, options.gguf_file)
        dtype = _pick_dtype(options.dtype, device, gguf=gguf_file is not None)
        common: dict[str, Any] = {"trust_remote_code": False}
        if gguf_file is not None:
            common["gguf_file"] = gguf_file
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder.path, **common)
            model = AutoModelForCausalLM.from_pretrained(
                folder.path,
                dtype=getattr(torch, dtype),
                device_map=device,
                use_safetensors=True if "safetensors" in folder.formats and gguf_file is None else None,
                weights_only=True,
                **common,
            )
        except Exception as error:
            files = [gguf_file] if gguf_file else [w.path for w in folder.weight_files]
            raise load_error(self.name, folder.name, error, files, folder.path) from None
        model.eval()
        max_batch, batch_note = batch_size(model, options.max_batch)
        info = LoadedModelInfo(
            name=folder.name,
            loader=self.name,
            device=device,
            dtype=dtype,
            context_length=folder.context_length,
            details=", ".join(part for part in (gguf_file, batch_note) if part),
        )
        return HFCausalLM(model, tokenizer, info, max_batch=max_batch)


def _assess_gptq(folder: ModelFolder) -> Assessment:
    """GPTQ through transformers + optimum + gptqmodel: works, but only when chosen explicitly."""
    if not folder.config_quantization:
        return Assessment(False, "GPTQ without quantization_config in config.json (transformers reads only that)")
    missing = [p for p in ("optimum", "gptqmodel") if importlib.util.find_spec(p) is None]
    if missing:
        return Assessment(False, f"GPTQ needs {' and '.join(missing)}")
    what = folder.quantization.describe() if folder.quantization else "GPTQ"
    return Assessment(True, f"{what} via optimum + gptqmodel (choose it to use it)", 10)


@hookimpl
def register_loaders(register) -> None:
    register(TransformersLoader())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_description() -> str:
    return "CUDA" if _cuda_available() else "CPU"


def _pick_device(requested: str) -> str:
    if requested == "cuda" and not _cuda_available():
        raise ModelLoadError("device cuda was asked for but no CUDA device is available")
    if requested == "auto":
        return "cuda" if _cuda_available() else "cpu"
    return requested


def _pick_dtype(requested: str, device: str, *, gguf: bool) -> str:
    if requested != "auto":
        return requested
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32" if gguf else "bfloat16"


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _pick_gguf(folder: ModelFolder, requested: str | None) -> str | None:
    ggufs = [w.path for w in folder.files_of("gguf")]
    if requested is not None:
        if requested not in ggufs:
            raise ModelLoadError(f"{folder.name} has no GGUF file named {requested} (it has: {', '.join(ggufs) or 'none'})")
        return requested
    if not ggufs or folder.formats - {"gguf"}:
        return None  # an HF folder that also carries a GGUF: load the HF weights
    return ggufs[0]


@lru_cache(maxsize=1)
def _gguf_architectures() -> frozenset[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return frozenset(GGUF_SUPPORTED_ARCHITECTURES)


@lru_cache(maxsize=1)
def _causal_lm_architectures() -> frozenset[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
