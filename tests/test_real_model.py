"""The engine and the Transformers loader with real weights (the embedded SmolLM2-135M-Instruct)."""

import pickle
import shutil
import threading

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.errors import ModelLoadError
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import GenerationRequest, Started, TextDelta
from loadstar.engine.sampling import SamplingParams
from loadstar.engine.settings import Settings
from tests import batching
from tests.checkpoints import cached, smollm2_safetensors, tiny_random_llama_bin
from tests.helpers import run_concurrently

pytestmark = pytest.mark.slow

QUESTION = (ChatMessage(role="user", content="What is the capital of France?"),)
GREEDY = SamplingParams(temperature=0, max_new_tokens=40)


def ask(engine, messages=QUESTION, params=GREEDY, owner="test"):
    return engine.submit(GenerationRequest(messages=messages, params=params, owner=owner)).result()


def test_greedy_answer_names_paris(real_engine):
    result = ask(real_engine)
    assert result.reason == "stop", result
    assert "Paris" in result.text
    info = real_engine.models.loaded
    assert (info.loader, info.device, info.dtype) == ("Transformers", "cpu", "float32")


def test_engine_stream_equals_raw_generate_token_for_token(real_engine):
    import torch

    handle = real_engine.submit(GenerationRequest(messages=QUESTION, params=GREEDY))
    events = list(handle.events())
    prompt = next(e for e in events if isinstance(e, Started)).prompt
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    with real_engine.models.local() as model:
        ids = torch.tensor([model.encode(prompt)])
        raw = model.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
        raw_text = model.tokenizer.decode(raw[0, ids.shape[1]:], skip_special_tokens=True)
    assert streamed == raw_text
    assert len([e for e in events if isinstance(e, TextDelta)]) > 3  # it streamed, piece by piece


def test_same_seed_same_sample(real_engine):
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, seed=1234, max_new_tokens=20)
    first, second = ask(real_engine, params=params), ask(real_engine, params=params)
    assert first.text == second.text and first.seed == second.seed == 1234


def test_cancel_stops_a_real_generation_early(real_engine):
    params = SamplingParams(temperature=0, max_new_tokens=400)
    story = (ChatMessage(role="user", content="Write a very long story about a dragon."),)
    handle = real_engine.submit(GenerationRequest(messages=story, params=params, owner="canceller"))
    for event in handle.events():
        if isinstance(event, TextDelta):
            real_engine.stop("canceller")
            break
    result = handle.result()
    assert result.reason == "cancelled"
    assert result.completion_tokens < 50


def test_two_users_at_once_get_their_own_answers(real_engine):
    questions = {
        "alice": (ChatMessage(role="user", content="What is the capital of France?"),),
        "bob": (ChatMessage(role="user", content="Name three colours."),),
    }
    alone = {owner: ask(real_engine, messages).text for owner, messages in questions.items()}
    together = run_concurrently(lambda owner: ask(real_engine, questions[owner], owner=owner).text, questions, 120)
    assert together == alone


def test_usage_counts_match_the_tokenizer(real_engine):
    result = ask(real_engine)
    prompt = real_engine.preview(GenerationRequest(messages=QUESTION)).prompt
    with real_engine.models.local() as model:
        assert result.prompt_tokens == len(model.encode(prompt))
        assert result.completion_tokens >= len(model.tokenizer(result.text, add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def safetensors_checkpoint(checkpoint_cache):
    return cached(checkpoint_cache, "smollm2-135m-bf16-safetensors", smollm2_safetensors)


def test_safetensors_checkpoint_loads_in_bf16_and_answers(safetensors_checkpoint, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "smol-st").symlink_to(safetensors_checkpoint, target_is_directory=True)
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data"))
    try:
        [best, *_] = engine.models.candidates("smol-st")
        assert best.loader == "Transformers" and best.priority == 100 and "safetensors" in best.reason
        info = engine.load_model("smol-st")
        assert (info.dtype, info.device) == ("bfloat16", "cpu")
        assert "Paris" in ask(engine).text
    finally:
        engine.close()


def test_bin_checkpoint_loads_with_weights_only(checkpoint_cache, tmp_path):
    folder = cached(checkpoint_cache, "tiny-random-llama-bin", tiny_random_llama_bin)
    models = tmp_path / "models"
    shutil.copytree(folder, models / "tiny-bin")
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data"))
    try:
        [best, *_] = engine.models.candidates("tiny-bin")
        assert "weights_only" in best.reason
        engine.load_model("tiny-bin")
        result = ask(engine, params=SamplingParams(temperature=0, max_new_tokens=5))
        assert result.reason in ("stop", "length") and result.completion_tokens > 0
    finally:
        engine.close()


class _RunsCode:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_bin_file_never_runs(checkpoint_cache, tmp_path):
    folder = cached(checkpoint_cache, "tiny-random-llama-bin", tiny_random_llama_bin)
    models = tmp_path / "models"
    evil = models / "evil"
    shutil.copytree(folder, evil)
    marker = tmp_path / "pwned"
    with (evil / "pytorch_model.bin").open("wb") as handle:
        pickle.dump({"model.embed_tokens.weight": _RunsCode(marker)}, handle)
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data"))
    try:
        with pytest.raises(ModelLoadError) as refused:
            engine.load_model("evil")
        assert not marker.exists()
        message = str(refused.value)
        # One line, the file and the code it would have called; no escape codes, no torch advice.
        assert message == "Transformers could not load evil: pytorch_model.bin contains pickled code (io.open); " \
                          "refused: only tensors are loaded", message
        assert "\n" not in message and "\x1b" not in message and "weights_only" not in message
    finally:
        engine.close()


# -- continuous batching through Transformers: tests/batching.py's checks, as for llama.cpp, and more


@pytest.fixture(scope="module")
def batch_engine(real_engine):
    return real_engine


class TestTransformersBatching(batching.BatchingChecks):
    def test_a_long_prompt_is_read_in_chunks_beside_the_decoding(self, batch_engine, alone):
        """A prompt longer than a chunk joins while others decode; everyone's answer is as alone."""
        from loadstar.loaders.hf_sampling import PREFILL_CHUNK

        padding = "Here is some background you may ignore. " * (PREFILL_CHUNK // 3)
        long_question = padding + batching.QUESTIONS[0]
        long_alone = batch_engine.submit(batching.ask(long_question)).result()
        assert long_alone.prompt_tokens > 2 * PREFILL_CHUNK
        handles = [batch_engine.submit(batching.ask(q)) for q in batching.QUESTIONS[1:4]]
        joined = batch_engine.submit(batching.ask(long_question)).result()
        assert joined.text == long_alone.text
        for handle in handles:
            assert handle.result().text == alone[batching.question_of(handle)]

    def test_a_request_waits_while_its_kv_cache_would_not_fit(self, batch_engine, alone, monkeypatch):
        """With (almost) no memory to spare, a second sequence waits until the first has left."""
        from loadstar.loaders import hf_batch

        monkeypatch.setattr(hf_batch, "KV_SHARE_OF_FREE_MEMORY", 1e-9)
        first, second = (batch_engine.submit(batching.ask(q)) for q in batching.QUESTIONS[1:3])
        order = []  # which request each piece of text came to, in the order they came
        readers = [threading.Thread(target=lambda n=name, h=handle: order.extend(n for e in h.events() if isinstance(e, TextDelta)))
                   for name, handle in (("first", first), ("second", second))]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout=300)
        assert first.finished.text == alone[batching.QUESTIONS[1]]
        assert second.finished.text == alone[batching.QUESTIONS[2]]
        assert order == sorted(order, key=["first", "second"].index)  # no text of the second before the first ended


def test_the_transformers_model_batches(real_engine):
    with real_engine.models.local() as model:
        assert model.max_batch == 4
    assert "batch 4" in real_engine.models.loaded.details


def test_models_whose_cache_cannot_be_padded_do_not_batch():
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    from loadstar.loaders.hf_batch import batchable, kv_bytes_per_token
    from loadstar.loaders.hf_causal_lm import batch_size

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(**small))
    sliding = AutoModelForCausalLM.from_config(MistralConfig(**small, sliding_window=16))
    assert batchable(llama) is None and batch_size(llama, 4) == (4, "batch 4")
    assert "DynamicSlidingWindowLayer" in batchable(sliding)
    count, words = batch_size(sliding, 4)
    assert count == 1 and words.startswith("one request at a time (its cache has DynamicSlidingWindowLayer")
    assert kv_bytes_per_token(llama) == 2 * 2 * 2 * 8 * 4  # keys and values, 2 layers, 2 KV heads of 8, float32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_memory_estimate_is_what_the_loaded_weights_and_cache_take(tmp_path, default_models_dir, dtype):
    """Weights from the safetensors headers at the dtype they load in, against the loaded model's
    own tensors; the KV cache per token from config.json, against the loaded model's."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loadstar.engine.models.folder import inspect_model_folder
    from loadstar.loaders.hf_batch import kv_bytes_per_token
    from loadstar.loaders.transformers_loader import TransformersLoader, TransformersOptions

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).to(torch.float16).save_pretrained(tmp_path / "tiny", safe_serialization=True)
    folder = inspect_model_folder(tmp_path / "tiny")
    estimate = TransformersLoader().estimate_memory(folder, TransformersOptions(device="cpu", dtype=dtype, max_batch=4))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", dtype=getattr(torch, dtype))
    assert estimate.weights == sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate.kv_cache == kv_bytes_per_token(model) * 512 * 4 and estimate.context == 512
    words = estimate.describe()
    assert "for a request of 512 tokens. The KV cache grows as used, up to " in words and "with 4 requests at once" in words
    # a GGUF is dequantized on load, and its tensors are not read here: no estimate, said so
    gguf = inspect_model_folder(default_models_dir / "SmolLM2-135M-Instruct")
    assert TransformersLoader().estimate_memory(gguf, TransformersOptions()) is None


ARCHITECTURES = ["LlamaConfig", "Qwen2Config", "Qwen3Config", "Phi3Config", "GemmaConfig", "Olmo2Config",
                 "GraniteConfig", "StableLmConfig"]


@pytest.fixture(scope="module")
def smollm2_tokenizer(default_models_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_models_dir / "SmolLM2-135M-Instruct",
                                         gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("config_class", ARCHITECTURES)
def test_padded_rows_answer_as_generate_does_alone_across_architectures(smollm2_tokenizer, config_class, device):
    """Tiny random models of architectures with their own attention, rotary and norm code: four
    prompts of different lengths join one after another, so rows are padded and shifted; each
    greedy reply equals transformers' generate on that prompt alone (float32; on an H100 this held
    for all eight, and in bfloat16 for 30 of 32 replies: near-ties, see hf_batch.py)."""
    import torch
    import transformers

    from loadstar.engine.models.loader_api import CancelToken, LoadedModelInfo
    from loadstar.loaders.hf_causal_lm import HFCausalLM

    config = getattr(transformers, config_class)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=smollm2_tokenizer.vocab_size, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as it is written, on any device
    network = transformers.AutoModelForCausalLM.from_config(config).to(device).eval()
    info = LoadedModelInfo(name="tiny", loader="Transformers", device=device, dtype="float32", context_length=None)
    model = HFCausalLM(network, smollm2_tokenizer, info, max_batch=4)
    prompts = ["Hello there", "What is the capital of France? Tell me all you know about it.", "a", "1 2 3 4 5 6 7"]
    params = SamplingParams(temperature=0, max_new_tokens=20, ban_eos=True)

    def alone(prompt):
        pieces = []
        model.stream_to(prompt, params, CancelToken(), seed=1, emit=lambda piece: pieces.append(piece.text))
        return "".join(pieces)

    expected = [alone(p) for p in prompts]
    batch, texts = model.open_batch(), ["" for _ in prompts]
    for key, prompt in enumerate(prompts):
        batch.add(key, prompt, params, seed=1)
    ended = set()
    while len(ended) < len(prompts):
        for key, step in batch.step().items():
            texts[key] += step.piece.text if step.piece else ""
            if step.done:
                ended.add(key)
    assert texts == expected and all(expected)
