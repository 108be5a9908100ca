"""GPTQ without real weights: tensor-shape inference, kernel choice, loader ranking with CUDA
present or absent (simulated: this is choice logic; the real kernels are tested in test_gptq.py)."""

import json

import numpy as np
import pytest

from loadstar.engine.models.choice import choose_loader, rank_loaders
from loadstar.engine.models.folder import Quantization, inspect_model_folder
from loadstar.engine.models.gptq_tensors import filename_hint, infer_gptq_from_safetensors
from loadstar.loaders.autogptq_loader import AutoGPTQLoader, choose_kernel
from loadstar.loaders.exllamav2_loader import ExLlamaV2Loader, rope_fix
from loadstar.loaders.transformers_loader import TransformersLoader
from tests.folders import hf_folder, write_json, write_safetensors


def gptq_tensors(bits: int, group_size: int, in_features=(576, 1536), out_features=64, act_order=False, sym=True):
    """Tensors shaped like a GPTQ checkpoint (values are not a real model)."""
    tensors = {}
    per_int = 32 // bits
    rng = np.random.default_rng(0)
    for i, width in enumerate(in_features):
        groups = 1 if group_size == -1 else -(-width // group_size)
        prefix = f"model.layers.0.proj{i}"
        tensors[f"{prefix}.qweight"] = np.zeros((width // per_int, out_features), dtype=np.int32)
        zero = (1 << (bits - 1)) - 1 if sym else 3
        packed = sum(zero << (bits * k) for k in range(per_int))
        tensors[f"{prefix}.qzeros"] = np.full((groups, out_features // per_int), np.uint32(packed).view(np.int32), dtype=np.int32)
        tensors[f"{prefix}.scales"] = np.ones((groups, out_features), dtype=np.float16)
        rows = rng.permutation(width) if act_order else np.arange(width)
        size = width if group_size == -1 else group_size
        tensors[f"{prefix}.g_idx"] = (rows // size).astype(np.int32)
    return tensors


@pytest.mark.parametrize("bits,group,act", [(4, 128, False), (4, 64, True), (8, -1, False), (2, 32, True), (4, 32, False)])
def test_parameters_inferred_from_tensor_shapes(tmp_path, bits, group, act):
    path = write_safetensors(tmp_path / "w.safetensors", gptq_tensors(bits, group, act_order=act))
    found = infer_gptq_from_safetensors(path)
    assert (found.bits, found.group_size, found.desc_act, found.sym) == (bits, group, act, True)
    assert found.in_features == (576, 1536) and found.layers == 2


def test_asymmetric_zero_points_are_seen(tmp_path):
    path = write_safetensors(tmp_path / "w.safetensors", gptq_tensors(4, 64, sym=False))
    assert infer_gptq_from_safetensors(path).sym is False


def test_non_gptq_safetensors_infer_nothing(tmp_path):
    assert infer_gptq_from_safetensors(write_safetensors(tmp_path / "w.safetensors")) is None


def test_inconsistent_layers_are_an_error(tmp_path):
    tensors = gptq_tensors(4, 64)
    tensors.update({k.replace("layers.0", "layers.1"): v for k, v in gptq_tensors(8, 64).items()})
    with pytest.raises(ValueError, match="mixes GPTQ bit widths"):
        infer_gptq_from_safetensors(write_safetensors(tmp_path / "w.safetensors", tensors))


@pytest.mark.parametrize("name,hint", [
    ("vicuna-13B-1.1-GPTQ-4bit-128g.compat.no-act-order.pt", (4, 128)),
    ("gptq_model-8bit--1g.safetensors", (8, -1)),
    ("model.safetensors", (None, None)),
    ("llama-7b-4bit-32g.safetensors", (4, 32)),
])
def test_file_name_hints(name, hint):
    assert filename_hint(name) == hint


def gptq_folder(root, name, bits, group=128, act=True, *, declared=True, arch="LlamaForCausalLM", weights_name="model.safetensors"):
    folder = hf_folder(root, name, config={"architectures": [arch], "model_type": "llama"}, weights=())
    write_safetensors(folder / weights_name, gptq_tensors(bits, group, act_order=act))
    if declared:
        write_json(folder / "quantize_config.json", {"bits": bits, "group_size": group, "desc_act": act, "sym": True})
    return inspect_model_folder(folder)


def loaders(cuda: bool, exllama_installed: bool = True):
    exllama = ExLlamaV2Loader(has_package=lambda: exllama_installed, has_cuda=lambda: cuda)
    return {loader.name: loader for loader in (TransformersLoader(), AutoGPTQLoader(), exllama)}


def test_4bit_prefers_exllamav2_when_cuda_is_there(tmp_path):
    folder = gptq_folder(tmp_path, "q4", 4)
    assert choose_loader(folder, loaders(cuda=True)).loader == "ExLlamaV2"
    ranked = [c.loader for c in rank_loaders(folder, loaders(cuda=True))]
    assert ranked[:2] == ["ExLlamaV2", "AutoGPTQ"]


def test_4bit_falls_back_to_autogptq_without_cuda_and_says_why(tmp_path):
    folder = gptq_folder(tmp_path, "q4", 4)
    assert choose_loader(folder, loaders(cuda=False)).loader == "AutoGPTQ"
    described = {c.loader: c.describe() for c in rank_loaders(folder, loaders(cuda=False))}
    assert described["ExLlamaV2"] == "ExLlamaV2: unavailable, no CUDA device"
    no_package = {c.loader: c.describe() for c in rank_loaders(folder, loaders(cuda=True, exllama_installed=False))}
    assert no_package["ExLlamaV2"] == "ExLlamaV2: unavailable, exllamav2 is not installed"


def test_8bit_goes_to_autogptq_even_with_cuda(tmp_path):
    folder = gptq_folder(tmp_path, "q8", 8, -1)
    assert choose_loader(folder, loaders(cuda=True)).loader == "AutoGPTQ"
    described = {c.loader: c.describe() for c in rank_loaders(folder, loaders(cuda=True))}
    assert described["ExLlamaV2"] == "ExLlamaV2: cannot load, 8-bit: ExLlamaV2 runs 4-bit GPTQ only"


def test_3bit_offered_to_exllamav2_is_refused_with_a_reason(tmp_path):
    folder = inspect_model_folder(hf_folder(tmp_path, "q3b", config={"architectures": ["LlamaForCausalLM"]}))
    write_json(folder.path / "quantize_config.json", {"bits": 3, "group_size": 128, "desc_act": False})
    folder = inspect_model_folder(folder.path)
    from loadstar.engine.errors import NoLoaderError

    with pytest.raises(NoLoaderError, match="ExLlamaV2: cannot load, 3-bit: ExLlamaV2 runs 4-bit GPTQ only"):
        choose_loader(folder, loaders(cuda=True), pinned="ExLlamaV2")
    assert choose_loader(folder, loaders(cuda=True)).loader == "AutoGPTQ"


def test_unquantized_goes_to_transformers(tmp_path):
    folder = inspect_model_folder(hf_folder(tmp_path))
    assert choose_loader(folder, loaders(cuda=True)).loader == "Transformers"
    described = {c.loader: c.describe() for c in rank_loaders(folder, loaders(cuda=True))}
    assert described["AutoGPTQ"].startswith("AutoGPTQ: cannot load, not a GPTQ model")


def test_legacy_folder_without_quantize_config_is_recognised(tmp_path):
    folder = gptq_folder(tmp_path, "legacy", 4, 128, False, declared=False,
                         weights_name="vicuna-7B-GPTQ-4bit-128g.no-act-order.safetensors")
    assert folder.quantization is None
    assert folder.gptq.bits == 4 and folder.gptq.group_size == 128 and folder.gptq.desc_act is False
    chosen = choose_loader(folder, loaders(cuda=False))
    assert chosen.loader == "AutoGPTQ" and "read from the tensor shapes" in chosen.reason


def test_quantize_config_contradicting_tensors_is_refused(tmp_path):
    folder = hf_folder(tmp_path, "liar", config={"architectures": ["LlamaForCausalLM"]}, weights=())
    write_safetensors(folder / "model.safetensors", gptq_tensors(4, 64))
    write_json(folder / "quantize_config.json", {"bits": 8, "group_size": 64, "desc_act": False})
    record = inspect_model_folder(folder)
    from loadstar.engine.errors import NoLoaderError

    with pytest.raises(NoLoaderError, match=r"quantize_config.json says bits=8 but the tensors in model.safetensors have bits=4"):
        choose_loader(record, loaders(cuda=False))


def test_file_name_contradicting_tensors_is_a_conflict(tmp_path):
    folder = gptq_folder(tmp_path, "misnamed", 4, 64, declared=False, weights_name="model-8bit-64g.safetensors")
    assert any("says 8-bit" in c for c in folder.gptq_conflicts)


def test_truncated_gptq_weights_are_refused_by_name(tmp_path):
    folder = gptq_folder(tmp_path, "cut", 4)
    data = (folder.path / "model.safetensors").read_bytes()
    (folder.path / "model.safetensors").write_bytes(data[: len(data) // 2])
    from loadstar.engine.errors import NoLoaderError

    with pytest.raises(NoLoaderError, match=r"model.safetensors is truncated"):
        choose_loader(inspect_model_folder(folder.path), loaders(cuda=False))


def q(bits, group):
    return Quantization(method="gptq", source="test", bits=bits, group_size=group)


def test_kernel_choice_puts_accuracy_first_then_follows_the_shapes(tmp_path):
    g64 = infer_gptq_from_safetensors(write_safetensors(tmp_path / "a.safetensors", gptq_tensors(4, 64)))
    g128 = infer_gptq_from_safetensors(write_safetensors(tmp_path / "b.safetensors", gptq_tensors(4, 128)))
    # No packed CPU kernel is within the bound: the exact float32 path wherever it fits.
    for quant, tensors in ((q(4, 64), g64), (q(4, 128), g128), (q(8, -1), None), (q(8, 128), None)):
        exact = choose_kernel(quant, tensors, "cpu")
        assert (exact.backend, exact.dtype) == ("dense_float32", "float32") and "exact" in exact.why
    # Without the memory for it: the most accurate kernel that runs these shapes, and the bound said.
    fused = choose_kernel(q(4, 64), g64, "cpu", dense_fits=False)
    assert (fused.backend, fused.dtype) == ("gptq_torch_fused", "float32") and "up to 1.3 logits" in fused.why
    assert choose_kernel(q(4, 128), g128, "cpu", dense_fits=False).backend != "gptq_torch_fused"  # 128 ∤ 576
    assert choose_kernel(q(3, 128), None, "cpu").backend == "gptq_torch"  # 3-bit does not unpack to float32
    assert choose_kernel(q(4, 64), g64, "cuda").backend == "auto"


def test_exllamav2_gets_rope_theta_at_the_top_level():
    assert rope_fix({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})["rope_theta"] == 100000.0
    assert rope_fix({"rope_theta": 10000.0}) is None
    assert rope_fix({"hidden_size": 8}) is None


@pytest.mark.parametrize("shape", [[0, 64], [64], "64x64", [64, -1], [64, 2.5]])
def test_a_header_with_impossible_gptq_shapes_is_a_one_line_error(shape):
    from loadstar.engine.models.gptq_tensors import gptq_from_header

    header = {f"m.{part}": {"dtype": "I32", "shape": [8, 64], "data_offsets": [0, 4]}
              for part in ("qweight", "qzeros", "scales")}
    header["m.scales"]["shape"] = shape  # a zero width used to divide by zero
    with pytest.raises(ValueError, match="not non-empty matrices"):
        gptq_from_header(header, 8, lambda start, length: b"", "w.safetensors")


def test_the_picker_never_fetches_a_huge_tensor_a_hostile_header_names():
    from loadstar.engine.hub.branch_picker import MAX_REMOTE_TENSOR, remote_tensor_gptq
    from loadstar.engine.hub.downloads import HubClient
    from tests.hub_standin import HubStandIn

    header = {"m.qweight": {"dtype": "I32", "shape": [72, 576], "data_offsets": [0, 165888]},
              "m.qzeros": {"dtype": "I32", "shape": [9, 72], "data_offsets": [165888, 168480]},
              "m.scales": {"dtype": "F16", "shape": [9, 576], "data_offsets": [168480, 178848]},
              "m.g_idx": {"dtype": "I32", "shape": [576], "data_offsets": [178848, 178848 + 10**10]}}
    body = json.dumps(header).encode()
    hostile = len(body).to_bytes(8, "little") + body + b"\0" * (300 * 1024)  # the Hub could serve 10 GB more
    hub = HubStandIn().start()
    try:
        commit = hub.repo("evil/header").add_commit("main", {"model.safetensors": hostile})
        with pytest.raises(ValueError, match="not read before download"):
            remote_tensor_gptq(HubClient(hub.url), "evil/header", commit, "model.safetensors")
        assert sum(hub.sent.values()) <= 48 * 1024 and MAX_REMOTE_TENSOR < 10**10  # only the header's start
    finally:
        hub.stop()
