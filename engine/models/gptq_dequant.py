"""Exact dequantization of GPTQ tensors: the reference every CPU kernel is measured against.

A GPTQ layer stores ``qweight`` (packed ``[in, out]``), ``qzeros`` (packed ``[groups, out]``),
``scales`` (``[groups, out]``) and ``g_idx`` (the group of each input row). The dense weight is
``(q - zero) * scale[g_idx]`` computed in float32; the v1 checkpoint format (GPTQ-for-LLaMa,
AutoGPTQ, gptqmodel's ``gptq``) stores ``zero - 1``.

Used by the kernel-accuracy test and benchmark (and by nothing at run time): numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def unpack(packed: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unpack int32 words into ``32 // bits`` values each, along ``axis`` (low bits first)."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit packing straddles words; only 2, 4 and 8 bits are unpacked here")
    words = packed.astype(np.uint32)
    parts = [(words >> (bits * k)) & ((1 << bits) - 1) for k in range(32 // bits)]
    stacked = np.stack(parts, axis=axis + 1)
    shape = list(packed.shape)
    shape[axis] *= 32 // bits
    return stacked.reshape(shape).astype(np.int64)


def dequantize_layer(tensors: Mapping[str, Any], prefix: str, bits: int, group_size: int,
                     checkpoint_format: str = "gptq") -> np.ndarray:
    """The dense float32 weight ``[out, in]`` (torch's Linear layout) of one GPTQ layer."""
    qweight = np.asarray(tensors[f"{prefix}.qweight"])
    q = unpack(qweight, bits, axis=0)  # [in, out]
    zeros = unpack(np.asarray(tensors[f"{prefix}.qzeros"]), bits, axis=1)  # [groups, out]
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    scales = np.asarray(tensors[f"{prefix}.scales"], dtype=np.float32)
    if f"{prefix}.g_idx" in tensors:
        g_idx = np.asarray(tensors[f"{prefix}.g_idx"]).astype(np.int64)
    else:
        width = q.shape[0]
        g_idx = np.arange(width) // (width if group_size == -1 else group_size)
    dense = (q - zeros[g_idx]).astype(np.float32) * scales[g_idx]
    return np.ascontiguousarray(dense.T)


def dequantize_state(tensors: Mapping[str, Any], bits: int, group_size: int,
                     checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """A plain float32 state dict: every GPTQ layer dense, every other tensor as it was."""
    prefixes = {name[: -len(".qweight")] for name in tensors if name.endswith(".qweight")}
    state: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        prefix, _, part = name.rpartition(".")
        if prefix in prefixes:
            if part == "qweight":
                state[f"{prefix}.weight"] = dequantize_layer(tensors, prefix, bits, group_size, checkpoint_format)
            elif part == "bias":
                state[name] = np.asarray(value, dtype=np.float32)
            continue  # qzeros, scales, g_idx are folded into the weight
        state[name] = np.asarray(value, dtype=np.float32)
    return state
