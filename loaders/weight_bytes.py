"""What safetensors weights take once loaded, read from their headers (no tensor is read): for the
memory estimates of the Transformers and AutoGPTQ loaders."""

from __future__ import annotations

import math
from pathlib import Path

from loadstar import read_safetensors_header

FLOAT_TENSORS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # loaded in the model's dtype
GPTQ_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")


def loaded_bytes(path: Path, float_size: int, *, dequantized_bits: int | None = None) -> int:
    """Floating tensors at ``float_size`` bytes, others as stored. With ``dequantized_bits``, each
    GPTQ layer as the dense float weight it is unpacked into (its qweight's rows × 32 / bits × its
    columns), its zeros, scales and group index gone."""
    header, _ = read_safetensors_header(path)
    total = 0
    name = ""
    try:
        for name, tensor in header.items():
            if name == "__metadata__":
                continue
            if dequantized_bits and name.endswith(GPTQ_PARTS):
                if name.endswith(".qweight"):
                    rows, columns = (int(n) for n in tensor["shape"])
                    total += rows * 32 // dequantized_bits * columns * float_size
            elif tensor["dtype"] in FLOAT_TENSORS:
                total += math.prod(int(n) for n in tensor["shape"]) * float_size
            else:
                start, end = tensor["data_offsets"]
                total += int(end) - int(start)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path.name} has a corrupt safetensors header (tensor {name!r})") from None
    return total
