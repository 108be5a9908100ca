"""The exact CPU path for GPTQ: dequantize every layer once, at load, into a plain float32 model.

``(q - zero) * scale`` is computed in float32 for every weight (``engine.gptq_dequant``), so
the model computes what the checkpoint says, with no kernel rounding: the measured error is
float32 summation order (~1e-4 logits). The price is memory: 4 bytes a weight instead of
``bits / 8``. The AutoGPTQ loader picks this path on CPU when it fits (see ``choose_kernel``).
torch, transformers and safetensors are imported inside the function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadstar import ModelLoadError, Quantization


def dense_bytes(weight_bytes: int, bits: int) -> int:
    """Roughly what the float32 model takes: packed weights grow by 32 / bits (norms, embeddings
    and scales are small next to the quantized layers, or already 16-bit: counted twice)."""
    return weight_bytes * 32 // max(bits, 1)


def load_dense(folder: Path, gptq: Quantization) -> Any:
    """A transformers model with the GPTQ layers of ``folder`` (a gptqmodel-ready folder: config.json
    and standard safetensors names) dequantized to float32 ``nn.Linear`` weights."""
    import numpy as np
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from loadstar import dequantize_layer

    if gptq.bits is None or 32 % gptq.bits:
        raise ModelLoadError(f"the exact float32 path unpacks 2, 4 and 8 bits, not {gptq.bits}")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder.name} has no .safetensors weights")
    # Each tensor goes straight into the model's own parameter: the peak is the float32 model
    # plus one layer, not two copies of the model.
    targets = dict(model.state_dict(keep_vars=True))
    filled: set[str] = set()

    def put(name: str, tensor: Any) -> None:
        target = targets.get(name)
        if target is None or tuple(target.shape) != tuple(tensor.shape):
            raise ModelLoadError(f"the dequantized weights do not fit config.json ({name})")
        with torch.no_grad():
            target.copy_(tensor)
        filled.add(name)

    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            names = list(weights.keys())
            prefixes = {n[: -len(".qweight")] for n in names if n.endswith(".qweight")}

            def numpy_of(name: str) -> Any:
                tensor = weights.get_tensor(name)
                return tensor.float().numpy() if tensor.is_floating_point() else tensor.numpy()

            for prefix in sorted(prefixes):
                parts = {f"{prefix}.{p}": numpy_of(f"{prefix}.{p}") for p in ("qweight", "qzeros", "scales", "g_idx")
                         if f"{prefix}.{p}" in names}
                dense = dequantize_layer(parts, prefix, gptq.bits, gptq.group_size or -1,
                                         gptq.checkpoint_format or "gptq")
                put(f"{prefix}.weight", torch.from_numpy(np.ascontiguousarray(dense)))
            for name in names:
                prefix, _, part = name.rpartition(".")
                if prefix in prefixes and part in ("qweight", "qzeros", "scales", "g_idx"):
                    continue
                put(name, weights.get_tensor(name).to(torch.float32))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    persistent = set(model.state_dict())
    left = sorted(k for k in persistent - filled if not (tied and k.startswith("lm_head.")))
    if left:
        raise ModelLoadError(f"the dequantized weights do not fit config.json ({', '.join(left[:3])} missing)")
    if tied:
        model.tie_weights()
    model.eval()
    return model
