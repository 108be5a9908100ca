"""Model folder inspection: what a folder on disk holds, read without loading any weights.

``inspect_model_folder`` returns one typed record (``ModelFolder``) that loaders use to decide
whether they can load the folder, and that the UI shows. It reads only small files: JSON
configs, safetensors headers, GGUF metadata (memory-mapped, the tensors are not read).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loadstar.engine.errors import BadModelFolderError, ModelNotFoundError, one_line
from loadstar.engine.models.gptq_tensors import (
    TensorGPTQ,
    act_order_hint,
    filename_hint,
    infer_gptq_from_safetensors,
    read_safetensors_header,
)
from loadstar.engine.untrusted_json import UntrustedJsonError, read_untrusted_json

WeightFormat = Literal["safetensors", "bin", "pt", "gguf"]

_WEIGHT_SUFFIXES: dict[str, WeightFormat] = {
    ".safetensors": "safetensors",
    ".bin": "bin",
    ".pt": "pt",
    ".pth": "pt",
    ".gguf": "gguf",
}
# Files with weight-like suffixes that are not model weights (training leftovers).
_NOT_WEIGHTS = re.compile(r"^(training_args|optimizer|scheduler|rng_state.*|scaler)\.(bin|pt|pth)$")
# A folder name a user may give: one path component, no hidden or parent folders.
_FOLDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]*$")


def weight_format(name: str) -> WeightFormat | None:
    """The weights format a file name stands for, or None (configs, tokenizers, training leftovers)."""
    base = name.rsplit("/", 1)[-1]
    suffix = "." + base.rsplit(".", 1)[-1].lower() if "." in base else ""
    if _NOT_WEIGHTS.match(base):
        return None
    return _WEIGHT_SUFFIXES.get(suffix)


@dataclass(frozen=True)
class WeightFile:
    path: str  # relative to the model folder, with forward slashes
    format: WeightFormat
    size: int


@dataclass(frozen=True)
class Quantization:
    """Quantization parameters as the folder declares them."""

    method: str  # "gptq", "awq", "gguf", ...
    source: str  # the file they came from
    bits: int | None = None
    group_size: int | None = None  # -1 means no grouping
    desc_act: bool | None = None  # GPTQ act-order
    sym: bool | None = None
    checkpoint_format: str | None = None  # GPTQ: "gptq" (v1) or "gptq_v2"
    model_file_base_name: str | None = None
    gguf_type: str | None = None  # e.g. "Q4_1"

    def describe(self) -> str:
        if self.method == "gguf":
            return f"GGUF {self.gguf_type or ''}".strip()
        parts = [self.method.upper()]
        if self.bits is None and self.group_size is None:
            parts.append("(parameters unknown)")
        if self.bits is not None:
            parts.append(f"{self.bits}-bit")
        if self.group_size is not None:
            parts.append("no group" if self.group_size == -1 else f"group {self.group_size}")
        if self.desc_act is not None:
            parts.append("act-order" if self.desc_act else "no act-order")
        return " ".join(parts)


@dataclass(frozen=True)
class ModelFolder:
    """Everything Loadstar knows about a model folder before loading it."""

    name: str
    path: Path
    weight_files: tuple[WeightFile, ...]
    architecture: str | None = None  # e.g. "LlamaForCausalLM", or the GGUF architecture "llama"
    model_type: str | None = None
    quantization: Quantization | None = None
    chat_template_source: str | None = None  # where the chat template was found, if anywhere
    context_length: int | None = None
    kv_bytes_per_token: int | None = None  # f16 keys and values per token of context (from the GGUF header or config.json)
    layers: int | None = None  # transformer blocks (GGUF block_count, config.json num_hidden_layers)
    size_bytes: int = 0
    has_config: bool = False
    has_tokenizer: bool = False
    config_quantization: bool = False  # config.json carries quantization_config (what transformers reads)
    tensor_gptq: TensorGPTQ | None = None  # GPTQ layout read from the tensors themselves
    problems: tuple[str, ...] = field(default=())  # everything odd, including the two below
    corrupt_weights: tuple[str, ...] = field(default=())  # truncated or unreadable weight files
    gptq_conflicts: tuple[str, ...] = field(default=())  # declared GPTQ parameters the tensors contradict

    @property
    def gptq(self) -> Quantization | None:
        """The GPTQ parameters to load with: declared ones, else those read from the tensors."""
        if self.quantization is not None and self.quantization.method == "gptq":
            return self.quantization
        if self.tensor_gptq is not None:
            t = self.tensor_gptq
            return Quantization(method="gptq", source=f"tensor shapes in {t.file}", bits=t.bits,
                                group_size=t.group_size, desc_act=t.desc_act, checkpoint_format="gptq")
        return None

    @property
    def load_blocker(self) -> str | None:
        """Why no loader should try this folder (contradicting GPTQ parameters, broken weights), if so."""
        return next(iter(self.gptq_conflicts + self.corrupt_weights), None)

    @property
    def formats(self) -> frozenset[WeightFormat]:
        return frozenset(w.format for w in self.weight_files)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template_source is not None

    def files_of(self, fmt: WeightFormat) -> list[WeightFile]:
        return [w for w in self.weight_files if w.format == fmt]

    def summary(self) -> str:
        """One line for lists: architecture, format, quantization, size."""
        bits = [self.architecture or "unknown architecture"]
        bits.append("/".join(sorted(self.formats)) or "no weights")
        if self.quantization:
            bits.append(self.quantization.describe())
        bits.append(format_size(self.size_bytes))
        return ", ".join(bits)


def format_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def list_model_folders(models_dir: Path) -> list[str]:
    """Names of the model folders in ``models_dir``, sorted; hidden folders and partial downloads left out."""
    if not models_dir.is_dir():
        return []
    names = []
    for entry in models_dir.iterdir():
        if entry.is_dir() and _FOLDER_NAME.match(entry.name) and not (entry / ".incomplete").exists():
            names.append(entry.name)
    return sorted(names, key=str.lower)


def folder_signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``path`` as (relative path, size, mtime in ns), from stat alone (no reads):
    the key under which an inspection of the folder stays valid."""
    found = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            try:
                info = os.stat(full)
            except OSError:
                continue
            found.append((os.path.relpath(full, path), info.st_size, info.st_mtime_ns))
    return tuple(found)


def resolve_model_folder(models_dir: Path, name: str) -> Path:
    """The folder for a user-supplied model name, checked to be a plain folder inside ``models_dir``."""
    if not _FOLDER_NAME.match(name or ""):
        raise ModelNotFoundError(
            f"'{name}' is not a model folder name: use the folder's name inside {models_dir}, without slashes"
        )
    # The name is one plain path component, so it cannot climb out of models_dir. A folder that
    # is a symlink placed there by the user (models kept on another disk) is the user's choice.
    path = models_dir / name
    if not path.is_dir():
        available = list_model_folders(models_dir)
        hint = f"available: {', '.join(available)}" if available else "the folder holds no models"
        raise ModelNotFoundError(f"no model named '{name}' in {models_dir} ({hint})")
    return path


def inspect_model_folder(path: Path) -> ModelFolder:
    """Read a model folder's configs and weight headers into a ``ModelFolder`` record.

    Never raises for odd contents: anything unreadable becomes an entry in ``problems``.
    Raises ``BadModelFolderError`` only when ``path`` is not a folder.
    """
    if not path.is_dir():
        raise BadModelFolderError(f"{path} is not a folder")
    problems: list[str] = []
    config = _read_json(path / "config.json", problems)
    tokenizer_config = _read_json(path / "tokenizer_config.json", problems)
    weights = _weight_files(path)

    architecture = model_type = None
    context_length = layers = None
    if config:
        archs = config.get("architectures") or []
        architecture = archs[0] if archs and isinstance(archs[0], str) else None
        model_type = config.get("model_type")
        context_length = _int_or_none(config.get("max_position_embeddings"))
        layers = _int_or_none(config.get("num_hidden_layers"))

    quantization = _quantization(path, config, problems)
    chat_template_source = _chat_template_source(path, tokenizer_config)

    tensor_gptq = None
    corrupt: list[str] = []
    for weight in weights:
        if weight.format == "safetensors":
            problem = _check_safetensors_header(path / weight.path)
            if problem:
                corrupt.append(problem)
            elif tensor_gptq is None:
                tensor_gptq = _tensor_gptq(path / weight.path, problems)
    conflicts = gptq_disagreements(quantization, tensor_gptq) if tensor_gptq is not None else []
    if quantization is None and tensor_gptq is None:
        quantization = _pt_only_hint(weights)
    problems.extend(corrupt + conflicts)

    gguf_files = [w for w in weights if w.format == "gguf"]
    kv_bytes_per_token = config_kv_bytes_per_token(config) if config else None
    if gguf_files:
        meta = _gguf_metadata(path / gguf_files[0].path, problems)
        if meta:
            architecture = architecture or meta.get("architecture")
            model_type = model_type or meta.get("architecture")
            context_length = context_length or meta.get("context_length")
            kv_bytes_per_token = meta.get("kv_bytes_per_token") or kv_bytes_per_token
            layers = meta.get("layers") or layers
            # llama.cpp reads the GGUF's own template: in a folder of GGUF weights alone, that is the
            # one in use, whatever tokenizer_config.json beside it says.
            if meta.get("chat_template") and (chat_template_source is None or len(gguf_files) == len(weights)):
                chat_template_source = gguf_files[0].path
            if quantization is None:
                quantization = Quantization(method="gguf", source=gguf_files[0].path, gguf_type=meta.get("file_type"))

    has_tokenizer = any(
        (path / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    ) or any(p.suffix == ".tiktoken" for p in path.iterdir()) or bool(gguf_files)

    return ModelFolder(
        name=path.name,
        path=path,
        weight_files=tuple(weights),
        architecture=architecture,
        model_type=model_type,
        quantization=quantization,
        chat_template_source=chat_template_source,
        context_length=context_length,
        kv_bytes_per_token=kv_bytes_per_token,
        layers=layers,
        size_bytes=_folder_size(path),
        has_config=config is not None,
        has_tokenizer=has_tokenizer,
        config_quantization=bool(config and isinstance(config.get("quantization_config"), dict)),
        tensor_gptq=tensor_gptq,
        problems=tuple(problems),
        corrupt_weights=tuple(corrupt),
        gptq_conflicts=tuple(conflicts),
    )


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = read_untrusted_json(path)
    except UntrustedJsonError as error:
        problems.append(str(error))
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not hold a JSON object")
        return None
    return data


def _weight_files(path: Path) -> list[WeightFile]:
    # Only top-level files count: subfolders (e.g. "original/") hold other formats of the same model.
    found = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        fmt = weight_format(entry.name)
        if fmt is None or not entry.is_file():
            continue
        found.append(WeightFile(path=entry.name, format=fmt, size=entry.stat().st_size))
    return found


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _bool_or_none(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _quantization(path: Path, config: dict[str, Any] | None, problems: list[str]) -> Quantization | None:
    """GPTQ-style parameters: ``quantize_config.json`` first (the model cards name it), then config.json."""
    declared: list[Quantization] = []
    quantize_config = _read_json(path / "quantize_config.json", problems)
    if quantize_config is not None:
        declared.append(quantization_from_config(quantize_config, "quantize_config.json", default_method="gptq"))
    if config and isinstance(config.get("quantization_config"), dict):
        declared.append(quantization_from_config(config["quantization_config"], "config.json", default_method=None))
    if not declared:
        return None
    first = declared[0]
    for other in declared[1:]:
        for name in ("bits", "group_size", "desc_act"):
            a, b = getattr(first, name), getattr(other, name)
            if a is not None and b is not None and a != b:
                problems.append(f"{first.source} says {name}={a} but {other.source} says {name}={b}")
    return first


def quantization_from_config(data: dict[str, Any], source: str, default_method: str | None) -> Quantization:
    method = data.get("quant_method") or default_method or "unknown"
    return Quantization(
        method=str(method).lower(),
        source=source,
        bits=_int_or_none(data.get("bits")),
        group_size=_int_or_none(data.get("group_size")),
        desc_act=_bool_or_none(data.get("desc_act")),
        sym=_bool_or_none(data.get("sym")),
        checkpoint_format=data.get("checkpoint_format") if isinstance(data.get("checkpoint_format"), str) else None,
        model_file_base_name=data.get("model_file_base_name")
        if isinstance(data.get("model_file_base_name"), str)
        else None,
    )


def _chat_template_source(path: Path, tokenizer_config: dict[str, Any] | None) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return "chat_template.jinja"
    if tokenizer_config and tokenizer_config.get("chat_template"):
        return "tokenizer_config.json"
    if (path / "chat_template.json").is_file():
        return "chat_template.json"
    return None


def _pt_only_hint(weights: list[WeightFile]) -> Quantization | None:
    """A .pt-only folder cannot be looked into without unpickling; its file name may say GPTQ.

    The loader checks the tensors once the user has opted in to reading the .pt file.
    """
    formats = {w.format for w in weights}
    if formats != {"pt"}:
        return None
    name = weights[0].path
    bits, group = filename_hint(name)
    if bits is None and "gptq" not in name.lower():
        return None
    return Quantization(method="gptq", source=f"file name {name} (unverified until the .pt is read)",
                        bits=bits, group_size=group)


def _tensor_gptq(path: Path, problems: list[str]) -> TensorGPTQ | None:
    try:
        return infer_gptq_from_safetensors(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
        problems.append(str(error) if isinstance(error, ValueError) else f"{path.name}: unreadable GPTQ tensors")
        return None


def gptq_disagreements(declared: Quantization | None, tensors: TensorGPTQ, names: tuple[str, ...] = (), *,
                       act_order: bool = False) -> list[str]:
    """Where quantize_config/config.json or the names (the weights file, a branch) contradict the
    tensors. Used for a local folder and, before download, by the branch picker. Bits and group
    size decide whether a load can work; ``act_order`` adds act-order mismatches, which only
    mislabel a checkpoint (the kernels follow g_idx whatever the config says)."""
    problems = []
    checked = (("bits", tensors.bits), ("group_size", tensors.group_size)) + (
        (("desc_act", tensors.desc_act),) if act_order else ())
    if declared is not None and declared.method == "gptq":
        for name, actual in checked:
            said = getattr(declared, name)
            if said is not None and said != actual:
                problems.append(
                    f"{declared.source} says {name}={said} but the tensors in {tensors.file} have {name}={actual}"
                )
    for where in (tensors.file, *names):
        what = "file name" if where == tensors.file else "name"
        bits, group = filename_hint(where)
        if bits is not None and bits != tensors.bits:
            problems.append(f"the {what} {where} says {bits}-bit but the tensors are {tensors.bits}-bit")
        if group is not None and group != tensors.group_size:
            problems.append(f"the {what} {where} says group {group} but the tensors have group {tensors.group_size}")
        act = act_order_hint(where)
        if act_order and act is not None and tensors.group_size != -1 and act != tensors.desc_act:
            said = "act-order" if act else "no act-order"
            problems.append(f"the {what} {where} says {said} but the tensors' g_idx says otherwise")
    return problems


def _check_safetensors_header(path: Path) -> str | None:
    """A short problem description if the safetensors header cannot be read, else None."""
    try:
        read_safetensors_header(path)
    except (OSError, ValueError) as error:
        return str(error)
    return None


def _gguf_metadata(path: Path, problems: list[str]) -> dict[str, Any] | None:
    """Architecture, context length, file type, chat template and KV-cache sizes from a GGUF header."""
    try:
        meta = read_gguf_metadata(path)
    except (OSError, ValueError) as error:
        problems.append(f"{path.name} is not a readable GGUF file ({one_line(error)})")
        return None
    return gguf_facts(meta, path.name)


def gguf_facts(meta: dict[str, Any], name: str) -> dict[str, Any]:
    """What Loadstar uses of a GGUF header (a local file's, or the start of a remote one)."""
    from gguf import LlamaFileType

    architecture = meta.get("general.architecture")
    architecture = architecture if isinstance(architecture, str) else None
    file_type = meta.get("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = None
    if file_type_name is None:
        file_type_name = gguf_type_from_name(name)

    def of_arch(key: str) -> Any:
        return meta.get(f"{architecture}.{key}") if architecture else None

    template = meta.get("tokenizer.chat_template")
    return {
        "architecture": architecture,
        "context_length": _int_or_none(of_arch("context_length")),
        "layers": _int_or_none(of_arch("block_count")),
        "file_type": file_type_name,
        "chat_template": template if isinstance(template, str) else None,
        "kv_bytes_per_token": kv_bytes_per_token(
            *(_int_or_none(of_arch(k)) for k in ("block_count", "attention.head_count", "attention.head_count_kv",
                                                 "attention.key_length", "attention.value_length", "embedding_length"))
        ),
    }


def kv_bytes_per_token(layers: int | None, heads: int | None, kv_heads: int | None, key_length: int | None,
                       value_length: int | None, embedding: int | None, *, bytes_per_value: int = 2) -> int | None:
    """Bytes of keys and values (f16 by default) per token of context, for every layer."""
    kv_heads = kv_heads or heads
    if not (layers and heads and kv_heads and (key_length or embedding)):
        return None
    k = key_length or (embedding or 0) // heads
    return layers * kv_heads * (k + (value_length or k)) * bytes_per_value


def config_kv_bytes_per_token(config: dict[str, Any], *, bytes_per_value: int = 2) -> int | None:
    """Bytes of keys and values (f16 by default) per token of context, from a transformers config.json."""
    layers, heads, hidden = (_int_or_none(config.get(k)) for k in ("num_hidden_layers", "num_attention_heads", "hidden_size"))
    kv_heads = _int_or_none(config.get("num_key_value_heads")) or heads
    if not all(v is not None and v > 0 for v in (layers, heads, kv_heads, hidden)):
        return None
    return kv_bytes_per_token(layers, heads, kv_heads, _int_or_none(config.get("head_dim")), None, hidden,
                              bytes_per_value=bytes_per_value)


# GGUF value types (ggml's gguf_type): fixed-size ones by struct code; 8 = string, 9 = array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_MAX_STRING = 16 * 1024 * 1024  # a chat template is kilobytes; a longer "string" is a broken file
_GGUF_MAX_KV = 100_000


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file: scalars and strings; arrays are skipped, not read.

    gguf's GGUFReader builds every field, the tokenizer's 49,152-entry arrays included: seconds per
    file. This walks the memory-mapped header and stops before the tensor list, in milliseconds.
    A file that is not GGUF, is truncated, or states impossible sizes raises ValueError.
    """
    import mmap

    with path.open("rb") as handle:
        try:
            view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file
            raise ValueError("empty file") from None
    with view:
        return parse_gguf_metadata(view)


class _HeaderEnds(Exception):
    """The bytes given end inside the header (a partial read of a remote file)."""


def parse_gguf_metadata(view: Any, partial: bool = False) -> dict[str, Any]:
    """``read_gguf_metadata`` over bytes. ``partial``: the bytes are the start of a longer file, and
    what was read before they end is returned (architecture and sizes come before the tokenizer)."""
    import struct

    meta: dict[str, Any] = {}
    size = len(view)
    offset = 0
    try:

        def number(code: str) -> Any:
            nonlocal offset
            width = struct.calcsize(code)
            if offset + width > size:
                raise _HeaderEnds if partial else ValueError("truncated header")
            found = struct.unpack_from(code, view, offset)[0]
            offset += width
            return found

        def string(skip: bool = False) -> str | None:
            nonlocal offset
            length = number("<Q")
            if partial and length <= _GGUF_MAX_STRING and offset + length > size:
                raise _HeaderEnds
            if length > _GGUF_MAX_STRING or offset + length > size:
                raise ValueError(f"a string of {length} bytes")
            start, offset = offset, offset + length
            return None if skip else view[start:offset].decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            nonlocal offset
            if kind in _GGUF_SCALARS:
                return number(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind != 9:
                raise ValueError(f"a value of unknown type {kind}")
            element, count = number("<I"), number("<Q")
            if element in _GGUF_SCALARS:
                offset += struct.calcsize(_GGUF_SCALARS[element]) * count
                if offset > size:
                    raise _HeaderEnds if partial else ValueError(f"an array of {count} values")
            elif element == 8:
                if count > size // 8 and not partial:
                    raise ValueError(f"an array of {count} strings")
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):  # skip each string: its length, then its bytes
                    if offset + 8 > size:
                        raise _HeaderEnds if partial else ValueError("truncated header")
                    offset += 8 + unpack(view, offset)[0]
                if offset > size:
                    raise _HeaderEnds if partial else ValueError("truncated header")
            else:
                raise ValueError(f"an array of type {element}")
            return None

        if size < 4 or bytes(view[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        offset = 4
        version = number("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version}")
        _tensors, count = number("<Q"), number("<Q")
        if count > _GGUF_MAX_KV:
            raise ValueError(f"{count} metadata entries")
        for _ in range(count):
            key = string()
            found = value(number("<I"))
            if found is not None and key is not None:
                meta[key] = found
    except _HeaderEnds:
        pass
    return meta


def _folder_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                continue
    return total


# -- GGUF models: one file, or the parts of a split one ---------------------------------------------

_SPLIT_GGUF = re.compile(r"^(?P<stem>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFModelFile:
    """One model in a folder: a single .gguf, or the parts of a split one (first part first)."""

    parts: tuple[str, ...]

    @property
    def first(self) -> str:
        return self.parts[0]

    def describe(self) -> str:
        return self.first if len(self.parts) == 1 else f"{self.first} (+{len(self.parts) - 1} parts)"


def gguf_models(names: list[str]) -> list[GGUFModelFile]:
    """Group .gguf file names into models: split parts with the same stem are one model."""
    singles: list[GGUFModelFile] = []
    splits: dict[tuple[str, str], list[str]] = {}
    for name in sorted(names):
        match = _SPLIT_GGUF.match(name)
        if match:
            splits.setdefault((match["stem"], match["count"]), []).append(name)
        else:
            singles.append(GGUFModelFile((name,)))
    grouped = [GGUFModelFile(tuple(sorted(parts))) for parts in splits.values()]
    return sorted(singles + grouped, key=lambda m: m.first)


def missing_parts(model: GGUFModelFile) -> list[str]:
    match = _SPLIT_GGUF.match(model.first)
    if not match:
        return []
    count = int(match["count"])
    wanted = [f"{match['stem']}-{i:05d}-of-{match['count']}.gguf" for i in range(1, count + 1)]
    return [name for name in wanted if name not in model.parts]


def gguf_type_from_name(name: str) -> str | None:
    """The quantization a GGUF file name states (``model.Q4_K_M.gguf`` -> ``Q4_K_M``), if any."""
    stem = _SPLIT_GGUF.sub(r"\g<stem>.gguf", name).removesuffix(".gguf")
    match = re.search(r"(?i)\b(i?q\d(?:_[a-z0-9]+)*|f16|f32|bf16)\b", stem.replace(".", " ").replace("-", " "))
    return match.group(1).upper() if match else None


def gguf_bits_per_weight(quant_type: str | None) -> float | None:
    """Nominal bits per weight of a GGUF quantization (its main block type; K-quant mixes vary a little)."""
    if not quant_type:
        return None
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    base = re.sub(r"_(XXS|XS|S|M|L|XL|NL)$", "", quant_type.upper())
    for name in (quant_type.upper(), base):
        kind = GGMLQuantizationType.__members__.get(name)
        if kind is not None and kind in GGML_QUANT_SIZES:
            block, size = GGML_QUANT_SIZES[kind]
            return round(size * 8 / block, 2)
    return None
