"""GPTQ parameters read from the tensors themselves, for folders with no (or a doubtful) quantize_config.

GPTQ packs ``32 // bits`` weights into each int32. For a linear layer with ``in_features`` inputs,
``out_features`` outputs and ``n_groups`` groups:

- ``qweight``: int32 ``[in_features * bits / 32, out_features]``
- ``qzeros``:  int32 ``[n_groups, out_features * bits / 32]``
- ``scales``:  float ``[n_groups, out_features]``
- ``g_idx``:   int32 ``[in_features]``, the group of each input row; with act-order (``desc_act``)
  the rows are permuted, so ``g_idx`` is not ``arange(in_features) // group_size``.

So ``bits = 32 * qzeros.cols / scales.cols``, ``in_features = qweight.rows * 32 / bits``, and
``group_size = in_features / n_groups`` (one group spanning all inputs means no grouping, -1).
Only the safetensors header and the small ``g_idx`` tensors are read.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadstar.engine.untrusted_json import TOO_DEEP, UntrustedJsonError, parse_untrusted_json

_MAX_HEADER = 100 * 1024 * 1024
_FILENAME_BITS = re.compile(r"(?i)(\d)-?bits?")
_FILENAME_GROUP = re.compile(r"(?i)(?<![a-z0-9])(-?\d+)g(?![a-z])")  # "128g", and "-1g" for no group


@dataclass(frozen=True)
class TensorGPTQ:
    bits: int
    group_size: int  # -1 = no grouping
    desc_act: bool
    layers: int  # quantized linear layers seen
    file: str
    in_features: tuple[int, ...] = ()  # the distinct input widths of the quantized layers
    sym: bool | None = None  # symmetric quantization (all zero points at the middle), if it shows

    def group_divides_inputs(self) -> bool:
        """Whether every layer's input width is a whole number of groups (some kernels need it)."""
        return self.group_size == -1 or all(width % self.group_size == 0 for width in self.in_features)

    def describe(self) -> str:
        group = "no group" if self.group_size == -1 else f"group {self.group_size}"
        order = "act-order" if self.desc_act else "no act-order"
        return f"{self.bits}-bit {group} {order}"


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where tensor data starts.

    Raises ValueError with a short reason for a truncated or corrupt file.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path.name} is truncated (no safetensors header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path.name} has a corrupt safetensors header (length {header_len} for a {size}-byte file)")
        header = _header_json(handle.read(header_len), path.name)
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} has a corrupt safetensors header")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, IndexError, ValueError):
        raise ValueError(f"{path.name} has a corrupt safetensors header (a tensor without its offsets)") from None
    if 8 + header_len + end > size:
        raise ValueError(f"{path.name} is truncated ({size} bytes, its header promises {8 + header_len + end})")
    return header, 8 + header_len


_ACT_ORDER_HINT = re.compile(r"(?i)(no[-_]?)?act[-_]?order(?:[-_](true|false))?")


def act_order_hint(name: str) -> bool | None:
    """Act-order from names like ``...no-act-order.safetensors`` or ``gptq-4bit-128g-actorder_True``."""
    match = _ACT_ORDER_HINT.search(name)
    if match is None:
        return None
    if match.group(1):
        return False
    return match.group(2) is None or match.group(2).lower() == "true"


def filename_hint(name: str) -> tuple[int | None, int | None]:
    """(bits, group size) from names like ``vicuna-13B-GPTQ-4bit-128g.safetensors``."""
    bits = _FILENAME_BITS.search(name)
    group = _FILENAME_GROUP.search(name)
    return (int(bits.group(1)) if bits else None, int(group.group(1)) if group else None)


def infer_gptq_from_safetensors(path: Path) -> TensorGPTQ | None:
    """GPTQ parameters from a safetensors file's GPTQ tensors; None if it holds none.

    Raises ValueError when the file is unreadable or its layers disagree with each other.
    """
    header, data_start = read_safetensors_header(path)

    def read(start: int, length: int) -> bytes:
        with path.open("rb") as handle:
            handle.seek(start)
            return handle.read(length)

    return gptq_from_header(header, data_start, read, path.name)


ReadBytes = Callable[[int, int], bytes]  # (offset, length) -> bytes of the file


def gptq_from_header(header: dict[str, Any], data_start: int, read: ReadBytes, file: str, *,
                     complete: bool = True, symmetry: bool = True) -> TensorGPTQ | None:
    """GPTQ parameters from a safetensors header and the bytes of two small tensors of one layer.

    The one function for a local file and a remote one (the branch picker reads the start of the
    header with a ranged GET). With ``complete=False`` the header was cut short: layers whose
    tensors are not all listed are skipped instead of refused. ``symmetry`` also reads one qzeros
    tensor (skipped remotely: it can be larger than the header).
    """
    shapes = {name: info["shape"] for name, info in header.items() if name != "__metadata__"}
    prefixes = sorted(name[: -len(".qweight")] for name in shapes if name.endswith(".qweight"))
    if not complete:
        prefixes = [p for p in prefixes if all(f"{p}.{part}" in shapes for part in ("qzeros", "scales"))]
    if not prefixes:
        return None
    bit_widths: set[int] = set()
    widths: set[int] = set()
    # Each layer allows the group sizes g with ceil(in_features / g) == n_groups: an interval.
    # The checkpoint's group size lies in every layer's interval.
    low, high = 1, 1 << 62
    all_one_group = True
    for prefix in prefixes:
        try:
            qweight, qzeros, scales = (shapes[f"{prefix}.{part}"] for part in ("qweight", "qzeros", "scales"))
        except KeyError as missing:
            raise ValueError(f"{file}: {prefix} has qweight but no {missing.args[0].rsplit('.', 1)[1]}") from None
        if not all(_is_matrix(shape) for shape in (qweight, qzeros, scales)):
            raise ValueError(f"{file}: {prefix} has GPTQ tensors that are not non-empty matrices")
        out_features = scales[1]
        bits, remainder = divmod(32 * qzeros[1], out_features)
        if remainder or bits not in (2, 3, 4, 8):
            raise ValueError(f"{file}: {prefix} has shapes that fit no GPTQ bit width")
        bit_widths.add(bits)
        in_features = qweight[0] * 32 // bits
        widths.add(in_features)
        n_groups = scales[0]
        if n_groups < 1 or n_groups > in_features:
            raise ValueError(f"{file}: {prefix} has {n_groups} groups for {in_features} inputs")
        all_one_group &= n_groups == 1
        low = max(low, -(-in_features // n_groups))
        if n_groups > 1:
            high = min(high, (in_features - 1) // (n_groups - 1))
    if len(bit_widths) > 1:
        raise ValueError(f"{file} mixes GPTQ bit widths ({', '.join(map(str, sorted(bit_widths)))}); Loadstar expects one")
    bits = bit_widths.pop()
    if all_one_group:
        group_size = -1
    elif low > high:
        raise ValueError(f"{file}: the layers' group counts fit no single group size")
    else:
        powers = [1 << k for k in range(4, 16) if low <= 1 << k <= high]
        group_size = powers[0] if powers else low  # GPTQ group sizes are powers of two in practice
    tensors = _TensorReader(header, data_start, read, file)
    with_g_idx = min((p for p in prefixes if f"{p}.g_idx" in header), default=prefixes[0],
                     key=lambda p: _byte_size(header[f"{p}.g_idx"]))  # the smallest read
    desc_act = _has_act_order(tensors, with_g_idx, group_size)
    sym = _is_symmetric(tensors, prefixes[0], bits) if symmetry else None
    return TensorGPTQ(bits=bits, group_size=group_size, desc_act=desc_act, layers=len(prefixes), file=file,
                      in_features=tuple(sorted(widths)), sym=sym)


def parse_header_prefix(prefix: bytes, file: str) -> tuple[dict[str, Any], int, bool]:
    """The entries of a safetensors header from the file's first bytes: (entries, data start,
    whether the whole header was there). A cut header keeps its complete entries (safetensors
    lists tensors in file order, so the first layers come whole)."""
    if len(prefix) < 8:
        raise ValueError(f"{file} is truncated (no safetensors header)")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > _MAX_HEADER:
        raise ValueError(f"{file} has a corrupt safetensors header (length {header_len})")
    text = prefix[8: 8 + header_len].decode("utf-8", errors="replace")
    complete = len(prefix) >= 8 + header_len
    if not complete:
        cut = text.rfind(']},"')
        if cut < 0:
            raise ValueError(f"{file}: the first {len(prefix)} bytes hold no whole header entry")
        text = text[: cut + 2] + "}"
    header = _header_json(text, file)
    if not isinstance(header, dict):
        raise ValueError(f"{file} has a corrupt safetensors header")
    return header, 8 + header_len, complete


def _header_json(text: str | bytes, file: str) -> Any:
    """A safetensors header's JSON, bounded in depth (untrusted_json); ValueError when corrupt."""
    try:
        return parse_untrusted_json(text, file)
    except UntrustedJsonError as error:
        why = "nested too deeply" if error.why == TOO_DEEP else "not JSON"
        raise ValueError(f"{file} has a corrupt safetensors header ({why})") from None


def _is_matrix(shape: Any) -> bool:
    return isinstance(shape, list) and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape)


def _byte_size(info: dict[str, Any]) -> int:
    start, end = info["data_offsets"]
    return end - start


class _TensorReader:
    """Small tensors of a safetensors file, read through ``read`` (a file, or ranged GETs)."""

    def __init__(self, header: dict[str, Any], data_start: int, read: ReadBytes, file: str) -> None:
        self.header, self.data_start, self.read, self.file = header, data_start, read, file

    def tensor(self, name: str) -> Any:
        import numpy as np

        info = self.header[name]
        dtypes = {"I32": np.int32, "I64": np.int64, "I16": np.int16, "U8": np.uint8}
        if info["dtype"] not in dtypes:
            raise ValueError(f"{self.file}: {name} has dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self.read(self.data_start + start, end - start)
        if len(raw) != end - start:
            raise ValueError(f"{self.file}: {name} could not be read whole")
        return np.frombuffer(raw, dtype=dtypes[info["dtype"]])


def _is_symmetric(tensors: _TensorReader, prefix: str, bits: int) -> bool | None:
    """Symmetric GPTQ stores every zero point at the middle: 2**(bits-1), minus one in the v1 format."""
    if 32 % bits:
        return None  # 3-bit zeros straddle int32 words; not worth decoding for a flag
    import numpy as np

    packed = tensors.tensor(f"{prefix}.qzeros").astype(np.uint32)
    mask = (1 << bits) - 1
    zeros = np.stack([(packed >> (bits * k)) & mask for k in range(32 // bits)])
    middle = 1 << (bits - 1)
    return bool(np.all(zeros == middle - 1) or np.all(zeros == middle))


def _has_act_order(tensors: _TensorReader, prefix: str, group_size: int) -> bool:
    """Act-order permutes input rows: g_idx then differs from arange(in_features) // group_size."""
    if f"{prefix}.g_idx" not in tensors.header or group_size == -1:
        return False  # old GPTQ-for-LLaMa files have no g_idx, and without groups order cannot show
    import numpy as np

    g_idx = tensors.tensor(f"{prefix}.g_idx")
    return not np.array_equal(g_idx, np.arange(g_idx.size) // group_size)
