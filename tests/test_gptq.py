"""Real GPTQ checkpoints made from SmolLM2 with gptqmodel: inspected, the expected loader chosen,
loaded on this machine, asked a question; a plain dequantization checks the loaded layers."""

import re
import shutil

import numpy as np
import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import LoadstarError, ModelLoadError
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import GenerationRequest
from loadstar.engine.sampling import SamplingParams
from loadstar.engine.settings import Settings
from tests import batching
from tests.checkpoints import LEGACY_STEM, legacy_checkpoint

pytestmark = pytest.mark.slow

QUESTION = (ChatMessage(role="user", content="What is the capital of France?"),)
# Packed CPU kernels decode at 2.5-25 tokens/s here: fluency (four words, a capital first, plain
# letters) shows in 12 tokens; the exact path answers in full and must name Paris.
PACKED_TOKENS = 12
BATCH_TOKENS = 16  # batched answers equal to answers alone: a mismatch shows in the first tokens
CHECKPOINTS = {
    # name: (bits, group size, act-order, a packed CPU kernel that runs its shapes, and its layer class)
    "smol-4bit-g64-act": (4, 64, True, ("gptq_torch_aten", "TorchAtenLinear")),
    "smol-4bit-g128": (4, 128, False, ("gptq_torch", "TorchLinear")),
    "smol-8bit-nogroup-act": (8, -1, True, ("gptq_torch_int8", "TorchInt8Linear")),
}


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def models_dir(gptq_folders, checkpoint_cache, tmp_path_factory):
    models = tmp_path_factory.mktemp("gptq-models")
    for name, (bits, group, act, _) in CHECKPOINTS.items():
        (models / name).symlink_to(gptq_folders[bits, group, act], target_is_directory=True)
    legacy = legacy_checkpoint(checkpoint_cache)
    shutil.copytree(legacy, models / "smol-legacy")  # a real folder: we check it stays untouched
    pt_only = models / "smol-legacy-pt-only"
    shutil.copytree(legacy, pt_only)
    (pt_only / f"{LEGACY_STEM}.safetensors").unlink()
    return models


@pytest.fixture(scope="module")
def engine(models_dir, tmp_path_factory):
    engine = Engine(Settings(models_dir=models_dir, data_dir=tmp_path_factory.mktemp("gptq-data"), model_workers=False))
    yield engine
    engine.close()


def ask(engine, tokens: int = 30) -> str:
    result = engine.submit(GenerationRequest(messages=QUESTION, params=SamplingParams(temperature=0, max_new_tokens=tokens))).result()
    # A 4-bit model in bf16 may take the other branch of SmolLM2's near tie ("The" / "L'") and
    # answer at length: the reply must be fluent, not necessarily short.
    assert result.reason in ("stop", "length") and result.completion_tokens > 0, result
    return result.text


def fluent_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z']+", text)
    letters = sum(c.isascii() and (c.isalpha() or c in " .,'!?-") for c in text)
    return len(words) >= 4 and letters / max(len(text), 1) > 0.9 and text[:1].isupper()


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_checkpoint_is_inspected_chosen_loaded_and_answers(engine, name):
    bits, group, act, kernel = CHECKPOINTS[name]
    folder = engine.models.inspect(name)
    assert (folder.gptq.bits, folder.gptq.group_size, folder.gptq.desc_act) == (bits, group, act)
    assert folder.gptq_conflicts == () and folder.corrupt_weights == ()
    [best, *rest] = engine.models.candidates(name)
    expected = "ExLlamaV2" if bits == 4 and cuda_available() else "AutoGPTQ"
    assert best.loader == expected
    if not cuda_available():
        assert "ExLlamaV2: unavailable" in next(c.describe() for c in rest if c.loader == "ExLlamaV2")
    info = engine.load_model(name)
    assert info.loader == expected
    if expected == "AutoGPTQ" and info.device == "cpu":  # accuracy first: the exact path fits here
        assert "dense_float32 kernel" in info.details and "measured error ≤ 0.001 logits" in info.details
    answer = ask(engine)
    assert fluent_english(answer) and "Paris" in answer, answer
    if expected == "AutoGPTQ" and info.device == "cpu":  # a packed kernel, picked by the user, also loads
        backend, layer = kernel
        packed = engine.load_model(name, "AutoGPTQ", {"backend": backend})
        assert f"{backend} kernel ({layer})" in packed.details and "measured error ≤" in packed.details
        assert fluent_english(ask(engine, PACKED_TOKENS))


def test_legacy_folder_loads_from_tensor_shapes_without_touching_the_folder(engine, models_dir):
    folder_path = models_dir / "smol-legacy"
    before = {p.name: p.stat().st_mtime_ns for p in folder_path.iterdir()}
    folder = engine.models.inspect("smol-legacy")
    assert folder.quantization is None
    assert (folder.gptq.bits, folder.gptq.group_size, folder.gptq.desc_act) == (4, 128, False)
    assert folder.formats == {"safetensors", "pt"}
    info = engine.load_model("smol-legacy")
    assert info.loader == ("ExLlamaV2" if cuda_available() else "AutoGPTQ")
    assert "read from the tensor shapes" in info.details and "your model folder is unchanged" in info.details
    assert "agrees with the file name" in info.details
    assert "Paris" in ask(engine)
    after = {p.name: p.stat().st_mtime_ns for p in folder_path.iterdir()}
    assert after == before  # nothing written, nothing added


def test_pt_weights_need_the_opt_in_and_then_load_without_pickle_code(engine):
    previous = engine.load_model("smol-4bit-g64-act")
    with pytest.raises(ModelLoadError, match=r"is a pickled \.pt file.*--allow-pt"):
        engine.load_model("smol-legacy-pt-only", "AutoGPTQ")
    assert engine.models.loaded.name == previous.name  # the failed load left the model in place
    info = engine.load_model("smol-legacy-pt-only", "AutoGPTQ", {"allow_pt": True})
    assert "4-bit group 128" in info.details
    assert fluent_english(ask(engine))


def test_corrupt_weights_and_lying_configs_keep_the_previous_model(engine, models_dir, tmp_path):
    engine.load_model("smol-8bit-nogroup-act")
    broken = models_dir / "smol-truncated"
    shutil.copytree(models_dir / "smol-4bit-g128", broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(LoadstarError, match=r"model.safetensors is truncated"):
        engine.load_model("smol-truncated")
    liar = models_dir / "smol-liar"
    shutil.copytree(models_dir / "smol-4bit-g128", liar)
    (liar / "quantize_config.json").write_text('{"bits": 8, "group_size": 128, "desc_act": false}')
    with pytest.raises(LoadstarError, match=r"says bits=8 but the tensors in model.safetensors have bits=4"):
        engine.load_model("smol-liar")
    assert engine.models.loaded.name == "smol-8bit-nogroup-act"
    assert "Paris" in ask(engine)


@pytest.mark.parametrize("name", ["smol-4bit-g64-act", "smol-8bit-nogroup-act"])
def test_plain_dequantization_matches_the_packed_kernels_layer(engine, models_dir, name):
    import torch
    from safetensors.torch import load_file

    from loadstar.engine.models.gptq_dequant import dequantize_layer

    bits, group = CHECKPOINTS[name][:2]
    tensors = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
               for k, v in load_file(str(models_dir / name / "model.safetensors")).items()}
    prefix = "model.layers.3.mlp.down_proj"
    dense = dequantize_layer(tensors, prefix, bits, group)  # [out, in]
    x = np.random.default_rng(0).standard_normal((4, dense.shape[1])).astype(np.float32)
    expected = x @ dense.T

    engine.load_model(name, "AutoGPTQ", {"backend": CHECKPOINTS[name][3][0]})
    with engine.models.local() as model:
        layer = model.model.get_submodule(prefix)
        dtype = next(p for p in model.model.parameters()).dtype
        with torch.inference_mode():
            actual = layer(torch.from_numpy(x).to(dtype)).float().numpy()
    error = np.abs(actual - expected).max() / np.abs(expected).max()
    assert error < 0.02, f"relative error {error:.4f}"


@pytest.mark.parametrize("name,loader", [("smol-4bit-g128", "AutoGPTQ"), ("smol-8bit-nogroup-act", "AutoGPTQ")])
def test_memory_is_freed_on_unload(models_dir, tmp_path, name, loader):
    """Measured in a fresh process: RSS before load, loaded, and after unload."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    result = subprocess.run(
        [sys.executable, "-m", "tests.load_probe", str(models_dir), str(tmp_path), name, loader],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    grown = rss["rss_loaded"] - rss["rss_before"]
    kept = rss["rss_after_unload"] - rss["rss_before"]
    print(f"{name}: RSS +{grown >> 20} MiB loaded, +{kept >> 20} MiB after unload")
    assert grown > 20 << 20, rss  # loading did take memory
    assert kept < grown * 0.5, f"only {100 - 100 * kept // grown}% of {grown >> 20} MiB came back"


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["ExLlamaV2", "AutoGPTQ"])
def test_gpu_loaders_answer(engine, loader):
    info = engine.load_model("smol-4bit-g64-act", loader, {"device": "cuda"} if loader == "AutoGPTQ" else {})
    assert info.device == "cuda"
    assert fluent_english(ask(engine))


@pytest.mark.parametrize("backend", ["auto", "gptq_torch_int8"])
def test_a_gptq_batch_answers_as_each_request_alone(engine, backend):
    """AutoGPTQ models batch as Transformers ones do (one shared cache, tests/batching.py's checks),
    through the exact dense path and through a packed kernel."""
    info = engine.load_model("smol-4bit-g128", "AutoGPTQ", {} if backend == "auto" else {"backend": backend})
    assert "batch 4" in info.details
    questions = batching.QUESTIONS[:3]  # six requests: the batch of four fills, two join as others leave
    alone = batching.answers_alone(engine, questions, max_new_tokens=BATCH_TOKENS)
    batching.batch_answers_as_each_request_alone(engine, alone, questions, max_new_tokens=BATCH_TOKENS)


@pytest.mark.skipif("cuda_available()", reason="the exact float32 path is the CPU's choice")
@pytest.mark.parametrize("name", ["smol-4bit-g128", "smol-8bit-nogroup-act"])
def test_the_memory_estimate_of_the_exact_path_is_what_the_loaded_model_holds(engine, name):
    from loadstar.loaders.autogptq_loader import AutoGPTQOptions

    loader, folder = engine.loaders()["AutoGPTQ"], engine.models.inspect(name)
    estimate = loader.estimate_memory(folder, AutoGPTQOptions())
    engine.load_model(name, "AutoGPTQ")
    with engine.models.local() as model:
        assert "dense_float32 kernel" in model.info.details
        assert estimate.weights == sum(p.numel() * p.element_size() for p in model.model.parameters())
        assert estimate.kv_cache == model.open_batch()._per_token * folder.context_length * 4
    assert "The KV cache grows as used" in estimate.describe()
    # a packed kernel's memory differs by kernel: no estimate rather than a guess
    assert loader.estimate_memory(folder, AutoGPTQOptions(backend="gptq_torch_int8")) is None
