"""The branch picker: every branch of a repo with its quantization, download size, the loaders that
could run it here, and the memory it needs against what this machine has free.

Reads each branch's ``quantize_config.json`` and ``config.json`` remotely (small files), and the
start of its first safetensors file (a ranged GET of the header, then of one small ``g_idx``
tensor: tens of KiB, not the weights), and builds the same ``ModelFolder`` record a local folder
gets, so the loaders' own ``assess`` answers. The tensors say what a legacy branch without a
quantization config really is, and a branch whose config or names contradict its tensors is
flagged before anyone downloads it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadstar.engine.errors import LoadstarError
from loadstar.engine.hub.downloads import DownloadError, HubClient, select_files
from loadstar.engine.models.choice import rank_loaders
from loadstar.engine.models.folder import (
    ModelFolder,
    Quantization,
    WeightFile,
    config_kv_bytes_per_token,
    gguf_bits_per_weight,
    gguf_facts,
    gguf_models,
    gguf_type_from_name,
    gptq_disagreements,
    parse_gguf_metadata,
    quantization_from_config,
    weight_format,
)
from loadstar.engine.models.gptq_tensors import TensorGPTQ, gptq_from_header, parse_header_prefix
from loadstar.engine.models.loader_api import Loader


@dataclass(frozen=True)
class MemoryBudget:
    ram_free: int
    vram_free: int | None  # None without CUDA


@dataclass(frozen=True)
class BranchRow:
    branch: str
    commit: str
    quantization: str
    bits: int | None
    group_size: int | None
    desc_act: bool | None
    download_bytes: int
    loaders: tuple[str, ...]  # every candidate's description, usable first
    best_loader: str | None
    memory_needed: int | None
    fits: str
    warnings: tuple[str, ...] = ()  # the config or names contradict the tensors, or the header is unreadable


@dataclass(frozen=True)
class GGUFFileRow:
    """One model file of a GGUF repo (split parts counted together), for the user to pick."""

    branch: str
    file: str  # the file to name with --gguf-file (the first part of a split model)
    parts: int
    quant_type: str | None
    bits_per_weight: float | None
    size: int
    fits: str
    best_loader: str | None = None

    def describe(self) -> str:
        from loadstar.engine.models.folder import format_size

        quant = f"GGUF {self.quant_type}" if self.quant_type else "GGUF"
        bits = f", ~{self.bits_per_weight:g} bits/weight" if self.bits_per_weight else ""
        parts = f", {self.parts} parts" if self.parts > 1 else ""
        loader = f", loader {self.best_loader or 'none'}"
        return f"{self.file}: {quant}{bits}, {format_size(self.size)}{parts}{loader}, {self.fits}"


def memory_budget() -> MemoryBudget:
    import psutil

    vram = None
    try:
        import torch

        if torch.cuda.is_available():
            vram = torch.cuda.mem_get_info()[0]
    except Exception:
        vram = None
    return MemoryBudget(ram_free=psutil.virtual_memory().available, vram_free=vram)


def kv_cache_bytes(config: dict[str, Any], bytes_per_value: int = 2) -> int | None:
    """Keys and values for every layer at the model's full context length."""
    context = config.get("max_position_embeddings")
    per_token = config_kv_bytes_per_token(config, bytes_per_value=bytes_per_value)
    return per_token * context if per_token and isinstance(context, int) and context > 0 else None


def list_branches(client: HubClient, repo_id: str, loaders: Mapping[str, Loader], budget: MemoryBudget) -> list[BranchRow]:
    rows = []
    for branch, commit in client.branches(repo_id):
        rows.append(_row(client, repo_id, branch, commit, loaders, budget))
    return rows


def list_gguf_files(client: HubClient, repo_id: str, loaders: Mapping[str, Loader], budget: MemoryBudget,
                    branches: list[str] | None = None) -> list[GGUFFileRow]:
    """Every GGUF model file of the repo's branches (TheBloke-style ``*-GGUF`` repos hold Q2_K ... Q8_0)."""
    from loadstar.engine.hub.names import ModelRef

    rows = []
    for branch, commit in client.branches(repo_id):
        if branches is not None and branch not in branches:
            continue
        snapshot = client.snapshot(ModelRef(repo_id, commit))
        sizes = {f.path: f.size for f in snapshot.files if "/" not in f.path and weight_format(f.path) == "gguf"}
        models = gguf_models(list(sizes))
        # The quant files of one branch share a model: one header (its first bytes) says what it is.
        facts = _remote_gguf_facts(client, repo_id, commit, models[0].first) if models else {}
        for model in models:
            size = sum(sizes[p] for p in model.parts)
            quant = gguf_type_from_name(model.first)
            record = ModelFolder(
                name=f"{repo_id}:{branch}:{model.first}", path=Path("/nonexistent/hub") / repo_id / branch,
                weight_files=tuple(WeightFile(path=p, format="gguf", size=sizes[p]) for p in model.parts),
                architecture=facts.get("architecture"), model_type=facts.get("architecture"),
                quantization=Quantization(method="gguf", source=model.first, gguf_type=quant),
                context_length=facts.get("context_length"), kv_bytes_per_token=facts.get("kv_bytes_per_token"),
                size_bytes=size, has_tokenizer=True,
            )
            best = next((c for c in rank_loaders(record, loaders) if c.usable), None)
            kv = (facts.get("kv_bytes_per_token") or 0) * (facts.get("context_length") or 0)
            needed = size + kv if kv else int(size * 1.1)  # llama.cpp maps the file; the KV cache comes on top
            rows.append(GGUFFileRow(branch, model.first, len(model.parts), quant, gguf_bits_per_weight(quant), size,
                                    _fits(needed, best.loader if best else None, budget),
                                    best.loader if best else None))
    return rows


GGUF_HEAD_BYTES = 64 * 1024  # general.* and the architecture's sizes come before the tokenizer's arrays


def _remote_gguf_facts(client: HubClient, repo_id: str, commit: str, path: str) -> dict[str, Any]:
    head = client.read_head(repo_id, commit, path, GGUF_HEAD_BYTES)
    if not head:
        return {}
    try:
        return gguf_facts(parse_gguf_metadata(head, partial=True), path)
    except ValueError:
        return {}


def _row(client: HubClient, repo_id: str, branch: str, commit: str, loaders: Mapping[str, Loader],
         budget: MemoryBudget) -> BranchRow:
    from loadstar.engine.hub.names import ModelRef

    snapshot = client.snapshot(ModelRef(repo_id, commit))
    config = client.read_json(repo_id, commit, "config.json") or {}
    quantize_config = client.read_json(repo_id, commit, "quantize_config.json")
    try:
        selection = select_files(snapshot.files)
        files = selection.files
    except LoadstarError:  # several GGUF files: the row still shows, with every file counted
        files = snapshot.files
    quantization: Quantization | None = None
    if quantize_config is not None:
        quantization = quantization_from_config(quantize_config, "quantize_config.json", default_method="gptq")
    elif isinstance(config.get("quantization_config"), dict):
        quantization = quantization_from_config(config["quantization_config"], "config.json", default_method=None)
    weights = tuple(
        WeightFile(path=f.path, format=kind, size=f.size)
        for f in files if "/" not in f.path and (kind := weight_format(f.path)) is not None
    )
    tensors, warnings, unread = None, [], None
    first = next((w.path for w in sorted(weights, key=lambda w: w.path) if w.format == "safetensors"), None)
    if first is not None and (quantization is None or quantization.method == "gptq"):
        try:
            tensors = remote_tensor_gptq(client, repo_id, commit, first)
        except (ValueError, KeyError, TypeError, IndexError, DownloadError) as error:
            unread = f"the header of {first} could not be read: {str(error).splitlines()[0]}"
            warnings.append(unread)
    conflicts = gptq_disagreements(quantization, tensors) if tensors is not None else []
    if tensors is not None:
        warnings += gptq_disagreements(quantization, tensors, (branch,), act_order=True)
    archs = config.get("architectures") or []
    record = ModelFolder(
        name=f"{repo_id}:{branch}", path=Path("/nonexistent/hub") / repo_id / branch, weight_files=weights,
        architecture=archs[0] if archs else None, model_type=config.get("model_type"), quantization=quantization,
        context_length=config.get("max_position_embeddings"), size_bytes=sum(f.size for f in files),
        has_config=bool(config), config_quantization=isinstance(config.get("quantization_config"), dict),
        tensor_gptq=tensors, gptq_conflicts=tuple(conflicts),
    )
    candidates = rank_loaders(record, loaders)
    best = next((c for c in candidates if c.usable), None)
    weight_bytes = sum(w.size for w in weights)
    kv = kv_cache_bytes(config)
    needed = weight_bytes + kv if kv is not None else None
    shown = quantization or record.gptq
    # Without the tensors' word, "unquantized" would be a guess: the branch may hold GPTQ tensors.
    described = shown.describe() if shown else "unknown (the weights' header could not be read)" if unread else "unquantized"
    if quantization is None and tensors is not None:
        described += f" (read from the tensors in {tensors.file})"
    return BranchRow(
        branch=branch, commit=commit,
        quantization=described,
        bits=shown.bits if shown else None,
        group_size=shown.group_size if shown else None,
        desc_act=shown.desc_act if shown else None,
        download_bytes=sum(f.size for f in files),
        loaders=tuple(c.describe() for c in candidates),
        best_loader=best.loader if best else None,
        memory_needed=needed,
        fits=_fits(needed, best.loader if best else None, budget),
        warnings=tuple(dict.fromkeys(warnings)),
    )


SAFETENSORS_HEAD_BYTES = 48 * 1024  # the first read: most headers, and the length of any
MAX_REMOTE_HEADER = 16 << 20  # a 70B checkpoint's header is a few MB; more is not read before download
MAX_REMOTE_TENSOR = 1024 * 1024  # a g_idx of 262,144 inputs: far beyond any real layer


def remote_tensor_gptq(client: HubClient, repo_id: str, commit: str, path: str) -> TensorGPTQ | None:
    """GPTQ parameters of a remote safetensors file, from its whole header (its first 8 bytes give
    its length: one more ranged read when it is longer than the first) and one small ``g_idx``
    tensor: the same inference as for a local file (``gptq_from_header``). A header that cannot be
    read whole raises ValueError: a cut one once hid every GPTQ tensor past its cut."""
    head = client.read_head(repo_id, commit, path, SAFETENSORS_HEAD_BYTES)
    if not head:
        return None
    if len(head) >= 8:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 8 + header_len > len(head):
            if header_len > MAX_REMOTE_HEADER:
                raise ValueError(f"{path}: its safetensors header is said to be {header_len:,} bytes; "
                                 f"not read before download (at most {MAX_REMOTE_HEADER >> 20} MiB)")
            rest = client.read_range(repo_id, commit, path, len(head), 8 + header_len - len(head)) or b""
            head += rest
            if 8 + header_len > len(head):
                raise ValueError(f"{path}: the Hub sent {len(head) - 8:,} of its header's {header_len:,} bytes")
    header, data_start, complete = parse_header_prefix(head, path)

    def read(start: int, length: int) -> bytes:
        if start + length <= len(head):
            return head[start: start + length]
        if length > MAX_REMOTE_TENSOR:  # a header's sizes are the Hub's word: never fetch weights on it
            raise ValueError(f"{path}: its g_idx tensor is said to be {length} bytes; not read before download")
        return client.read_range(repo_id, commit, path, start, length) or b""

    return gptq_from_header(header, data_start, read, path, complete=complete, symmetry=False)


def _fits(needed: int | None, loader: str | None, budget: MemoryBudget) -> str:
    from loadstar.engine.models.folder import format_size

    if needed is None:
        return "unknown (config.json lacks the sizes)"
    if loader == "ExLlamaV2" and budget.vram_free is not None:
        where, free = "VRAM", budget.vram_free
    else:
        where, free = "RAM", budget.ram_free
    verdict = "fits" if needed <= free else "too big"
    return f"{verdict}: needs {format_size(needed)}, {format_size(free)} {where} free"
