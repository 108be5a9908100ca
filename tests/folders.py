"""Builders for synthetic model folders (small real files: JSON, safetensors, GGUF)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_safetensors(path: Path, tensors: dict[str, np.ndarray] | None = None) -> Path:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"w": np.zeros((4, 4), dtype=np.float32)}, str(path))
    return path


def llama_config(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 2048, **extra}


def hf_folder(root: Path, name: str = "plain", *, config: dict | None = None, weights: tuple[str, ...] = ("model.safetensors",)) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", config if config is not None else llama_config())
    for weight in weights:
        if weight.endswith(".safetensors"):
            write_safetensors(folder / weight)
        else:
            (folder / weight).write_bytes(b"\0" * 64)
    return folder


def gguf_folder(root: Path, name: str = "gguf", *, arch: str = "llama", chat_template: str | None = "{{ messages }}") -> Path:
    from gguf import GGUFWriter, LlamaFileType

    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(folder / f"{name}.Q8_0.gguf"), arch)
    writer.add_context_length(4096)
    writer.add_file_type(LlamaFileType.MOSTLY_Q8_0)
    if chat_template:
        writer.add_chat_template(chat_template)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return folder


def default_and_tools_models(models: Path, tools_name: str) -> Path:
    """The embedded default model, and beside it ``tools_name``: the same file (a hard link) with a
    chat template that reads ``tools`` (tests/data/chatml_tools.jinja). Returns ``models``."""
    import os

    from loadstar.engine.models.default_model import DEFAULT_MODEL_FILE, place_default_model

    default = place_default_model(models)
    tools = models / tools_name
    tools.mkdir()
    os.link(default / DEFAULT_MODEL_FILE, tools / DEFAULT_MODEL_FILE)
    (tools / "chat_template.jinja").write_text((Path(__file__).parent / "data" / "chatml_tools.jinja").read_text())
    return models
