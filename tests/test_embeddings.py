"""Embeddings: POST /v1/embeddings through the real openai client (llama.cpp, in a worker), and the
Transformers loader's, on the real default model."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest

from loadstar.engine.errors import BadRequestError
from loadstar.engine.models.default_model import place_default_model
from tests.helpers import running_server

pytestmark = pytest.mark.slow

SENTENCE = "The cat sat on the mat."
PARAPHRASE = "A cat was sitting on the mat."
UNRELATED = "Quarterly revenue grew by four percent."


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    place_default_model(root / "models")
    with running_server(root, "--models-dir", str(root / "models")) as url:
        yield url


def test_the_openai_client_gets_embeddings_that_tell_a_paraphrase_from_an_unrelated_text(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    response = client.embeddings.create(model="text-embedding-3-small", input=[SENTENCE, SENTENCE, PARAPHRASE, UNRELATED])
    assert response.model == "SmolLM2-135M-Instruct"  # any name: the loaded model answers
    vectors = [item.embedding for item in response.data]
    assert [item.index for item in response.data] == [0, 1, 2, 3]
    assert len({len(v) for v in vectors}) == 1 and len(vectors[0]) == 576  # SmolLM2-135M's width
    assert cosine(vectors[0], vectors[1]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(vectors[0], vectors[0]) == pytest.approx(1.0, abs=1e-6)
    assert cosine(vectors[0], vectors[2]) > cosine(vectors[0], vectors[3]) + 0.1
    assert response.usage.prompt_tokens == response.usage.total_tokens > 4 * 5
    # The openai client asks for base64 by default when numpy is there; floats and base64 agree.
    raw = httpx.post(f"{server}/v1/embeddings", json={"model": "x", "input": SENTENCE, "encoding_format": "base64"},
                     timeout=120).json()
    decoded = struct.unpack(f"<{len(vectors[0])}f", base64.b64decode(raw["data"][0]["embedding"]))
    assert max(abs(a - b) for a, b in zip(decoded, vectors[0], strict=True)) < 1e-6


def test_bad_embedding_requests_are_one_line_400s(server):
    def error(body):
        response = httpx.post(f"{server}/v1/embeddings", json=body, timeout=120)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert "\n" not in message
        return message

    assert "dimensions is not supported" in error({"model": "x", "input": "hi", "dimensions": 64})
    assert "at most 512 are embedded" in error({"model": "x", "input": "word " * 2000})
    assert "1 to 256 texts" in error({"model": "x", "input": []})
    with httpx.Client(timeout=120) as http:
        assert http.get(f"{server}/health").json()["status"] == "ok"  # and the server is fine


def test_transformers_gives_the_same_kind_of_embeddings(real_engine):
    info, (same, paraphrase, unrelated) = real_engine.embed([SENTENCE, PARAPHRASE, UNRELATED])
    assert info.loader == "Transformers"
    assert sum(v * v for v in same.vector) == pytest.approx(1.0, abs=1e-5)  # unit length
    assert cosine(same.vector, paraphrase.vector) > cosine(same.vector, unrelated.vector) + 0.1
    with pytest.raises(BadRequestError, match="input 0 is empty"):
        real_engine.embed([""])
