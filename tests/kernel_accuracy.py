"""Measure a GPTQ CPU kernel against an exact float32 dequantization of the same checkpoint.

Shared by tests/test_gptq_accuracy.py (the bounds hold, answers match) and bench/ (the table in
the README). The metric: the largest |logit - exact logit| over every position of a fixed chat
prompt, and whether greedy decoding writes the same tokens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

QUESTION = "What is the capital of France?"


def gptq_of(folder: Path) -> Any:
    from loadstar.engine.models.folder import Quantization

    config = json.loads((folder / "quantize_config.json").read_text())
    return Quantization(method="gptq", source="quantize_config.json", bits=config["bits"],
                        group_size=config["group_size"], desc_act=config.get("desc_act"),
                        checkpoint_format=config.get("checkpoint_format", "gptq"))


def prompt_ids(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def exact_model(folder: Path) -> Any:
    from loadstar.loaders.gptq_dense import load_dense

    return load_dense(folder, gptq_of(folder))


def kernel_model(folder: Path, backend: str, dtype: str) -> Any:
    import torch
    from gptqmodel import BACKEND, GPTQModel

    wrapper = GPTQModel.load(str(folder), device="cpu", backend=BACKEND(backend), dtype=getattr(torch, dtype))
    model = wrapper.model
    model.eval()
    model._loadstar_keepalive = wrapper
    return model


def logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.inference_mode():
        return model(ids).logits[0].float()


def max_error(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


def greedy(model: Any, ids: Any, tokens: int = 24) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def decode_speed(model: Any, ids: Any, tokens: int = 32) -> float:
    import torch

    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return tokens / (time.perf_counter() - start)
