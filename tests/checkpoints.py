"""Real test checkpoints derived from the embedded default model, cached by recipe.

Each recipe is a function; its cache key hashes the recipe's source and the library versions,
so changing either rebuilds. Builds go to a temporary folder and are renamed into place, so a
killed build never leaves a half-written checkpoint in the cache.
"""

from __future__ import annotations

import hashlib
import inspect
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from engine.default_model import DEFAULT_MODEL_FILE, default_model_source


def cached(cache: Path, name: str, recipe: Callable[[Path], None]) -> Path:
    key_source = inspect.getsource(recipe) + version("transformers") + version("torch")
    key = hashlib.sha256(key_source.encode()).hexdigest()[:12]
    target = cache / f"{name}-{key}"
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
