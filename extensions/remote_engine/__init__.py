"""Remote engine: use an OpenAI-compatible server (vLLM, TGI, llama.cpp server, another Loadstar) as the model.

For users who outgrow one machine: point Loadstar at a vLLM or TGI cluster instead of loading
weights here. A model folder holding ``remote.json`` is such a model::

    {"base_url": "http://gpu-box:8000/v1", "model": "TheBloke/Llama-2-13B-chat-GPTQ",
     "api_key_env": "GPU_BOX_KEY", "context_length": 4096}

Chats go to ``/chat/completions`` as messages (the server applies its own chat template); raw
prompts (the Notebook) go to ``/completions``. Replies stream; Stop closes the stream, which makes
the server cancel its generation.

Trust: ``remote.json`` is the operator's file. A folder that came from a download never loads
through this loader (downloads never write ``remote.json`` either), and ``api_key_env`` may only
name a variable that the operator allowed with ``--remote-key-env VAR``: a model folder cannot send
the server's own secrets (``HF_TOKEN``, the API keys) anywhere. Keys are never logged.

Hooks: ``register_loaders`` (the "Remote (OpenAI API)" loader) and ``generate`` (sends chats as
messages instead of a prompt rendered here).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loadstar import (
    Assessment,
    Availability,
    CancelToken,
    GenerationFailed,
    LoadedModel,
    LoadedModelInfo,
    ModelLoadError,
    OutputSpec,
    SamplingParams,
    StreamPiece,
    hookimpl,
    one_line,
    problem_line,
    pump,
)

CONFIG_FILE = "remote.json"
LOADER_NAME = "Remote (OpenAI API)"
# What the OpenAI API can express; the rest is ignored with a notice.
SUPPORTED = frozenset({"temperature", "top_p", "max_new_tokens", "seed", "presence_penalty", "frequency_penalty"})
# What vLLM, llama.cpp server and Loadstar accept beyond it, sent when remote.json says extra_params.
EXTRA = frozenset({"top_k", "min_p", "repetition_penalty"})
POLL_SECONDS = 0.05  # how often a waiting stream checks for Stop


class RemoteConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(max_length=500, description="The server's OpenAI API root, e.g. http://host:8000/v1.")
    model: str = Field(min_length=1, max_length=300, description="The model name the server expects.")
    api_key_env: str | None = Field(None, max_length=100, description="Environment variable holding the key.")
    api_key: str | None = Field(None, max_length=500, repr=False, description="The key itself (prefer api_key_env).")
    context_length: int | None = Field(None, ge=1, le=10_000_000)
    timeout: float = Field(600.0, gt=0, le=86_400, description="Seconds to wait for the server.")
    extra_params: bool = Field(False, description="Also send top_k, min_p, repetition_penalty (vLLM, llama.cpp).")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    def key(self, allowed: Mapping[str, str]) -> str | None:
        """The key to send: ``api_key``, or the value of ``api_key_env`` if the operator allowed it."""
        if self.api_key_env:
            if self.api_key_env not in allowed:
                raise ModelLoadError(
                    f"{CONFIG_FILE} asks for the key in ${self.api_key_env}, which the operator has not allowed "
                    f"(start the server with --remote-key-env {self.api_key_env})"
                )
            return allowed[self.api_key_env] or None
        return self.api_key


class RemoteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


def read_config(path: Any) -> RemoteConfig:
    try:
        return RemoteConfig.model_validate(json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        if isinstance(error, ValidationError):
            raise ModelLoadError(f"{CONFIG_FILE}: {problem_line(error)}") from None
        raise ModelLoadError(f"{CONFIG_FILE} cannot be read: {one_line(error)}") from None


class RemoteModel(LoadedModel):
    chat_rendered_by = "the remote server"  # chats go as messages: no local prompt format is looked for

    def __init__(self, info: LoadedModelInfo, config: RemoteConfig, client: Any, key: str | None) -> None:
        self.info = info
        self.config = config
        self._client = client
        self._key = key
        self.supported_params = SUPPORTED | EXTRA if config.extra_params else SUPPORTED

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # an estimate: the server's tokenizer is not here; usage is exact

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, output: OutputSpec | None = None,
    ) -> Iterator[StreamPiece]:  # ``output`` comes only to a model whose info.features name it: none here
        yield from self._stream("/completions", {"prompt": prompt}, params, cancel, seed)

    def stream_chat(self, messages: list[dict[str, str]], params: Any, cancel: CancelToken, *, seed: int) -> Iterator[StreamPiece]:
        yield from self._stream("/chat/completions", {"messages": messages}, params, cancel, seed)

    def _stream(self, path: str, body: dict[str, Any], params: Any, cancel: CancelToken, seed: int) -> Iterator[StreamPiece]:
        payload = {
            "model": self.config.model, **body, "stream": True, "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "seed": seed,
            "presence_penalty": params.presence_penalty, "frequency_penalty": params.frequency_penalty,
        }
        if self.config.extra_params:
            payload.update({name: getattr(params, name) for name in sorted(EXTRA)})
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        holder: dict[str, Any] = {}

        def read(put: Callable[[Any], None]) -> None:  # on a helper thread: Stop is seen while the server is silent
            try:
                with self._client.stream("POST", self.config.base_url + path, json=payload, headers=headers,
                                         timeout=self.config.timeout) as response:
                    holder["response"] = response
                    if response.status_code >= 400:
                        response.read()
                        raise GenerationFailed(f"{self.config.base_url}: {_error_text(response)}")
                    for line in response.iter_lines():
                        put(line)
            except GenerationFailed:
                raise
            except Exception as error:
                if not cancel.cancelled:
                    raise GenerationFailed(f"{self.config.base_url}: {one_line(error)}") from None

        def hang_up() -> None:  # the server sees the client go and stops generating
            response = holder.get("response")
            if response is not None:
                response.close()

        pieces = _Pieces()
        lines = pump(read, cancel=cancel, poll=POLL_SECONDS, name="loadstar-remote-stream", stop=hang_up)
        try:
            for line in lines:
                piece = pieces.read(line)
                if piece is not None:
                    yield piece
        finally:
            lines.close()

    def unload(self) -> None:
        self._client.close()


# Where servers stream a reasoning model's thinking apart from its answer (DeepSeek, vLLM and
# llama.cpp's server say reasoning_content; Ollama and OpenRouter say reasoning).
REASONING_FIELDS = ("reasoning_content", "reasoning")


class _Pieces:
    """Text pieces from a server's SSE lines; reasoning sent in its own field is put between
    <think> and </think>, as a model that writes it inline does, so the chat shows it the same way."""

    def __init__(self) -> None:
        self.reasoning = False

    def read(self, line: str) -> StreamPiece | None:
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        choices = chunk.get("choices") if isinstance(chunk, dict) else None
        if not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        if "delta" not in choice:
            text = choice.get("text")
            return StreamPiece(text, 1) if isinstance(text, str) and text else None
        delta = choice.get("delta") or {}
        thought = next((delta[f] for f in REASONING_FIELDS if isinstance(delta.get(f), str) and delta[f]), "")
        text = delta.get("content") if isinstance(delta.get("content"), str) else ""
        out = ""
        if thought:
            out += ("" if self.reasoning else "<think>") + thought
            self.reasoning = True
        if text:
            out += ("</think>\n" if self.reasoning else "") + text
            self.reasoning = False
        return StreamPiece(out, 1) if out else None


def _error_text(response: Any) -> str:
    try:
        message = response.json().get("error", {}).get("message")
    except Exception:
        message = None
    return f"HTTP {response.status_code}: {message or response.text[:200]}"


DOWNLOAD_RECORD = "loadstar-download.json"  # engine.downloads.METADATA_FILE: the folder came from a Hub


class RemoteLoader:
    name = LOADER_NAME
    Options = RemoteOptions
    runs_in_worker = False  # an HTTP client: no native code to isolate, and its key lookup stays in the server

    def __init__(self, allowed_keys: Callable[[], Mapping[str, str]]) -> None:
        self._allowed_keys = allowed_keys

    def availability(self) -> Availability:
        return Availability(True, "httpx (no local weights)")

    def assess(self, folder: Any) -> Assessment:
        if not (folder.path / CONFIG_FILE).is_file():
            return Assessment(False, f"no {CONFIG_FILE}")
        if (folder.path / DOWNLOAD_RECORD).exists():
            return Assessment(False, f"{CONFIG_FILE} in a downloaded folder is ignored: only the operator sets up remote models")
        try:
            config = read_config(folder.path)
        except ModelLoadError as error:
            return Assessment(False, str(error))
        return Assessment(True, f"{config.model} at {config.base_url}", 100)

    def load(self, folder: Any, options: BaseModel) -> RemoteModel:
        import httpx

        verdict = self.assess(folder)
        if not verdict.can_load:
            raise ModelLoadError(verdict.reason)
        config = read_config(folder.path)
        key = config.key(self._allowed_keys())
        client = httpx.Client(trust_env=False)  # no proxy or netrc credentials of this process
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = client.get(config.base_url + "/models", headers=headers, timeout=min(config.timeout, 30))
        except httpx.HTTPError as error:
            client.close()
            raise ModelLoadError(f"cannot reach {config.base_url}: {one_line(error)}") from None
        if response.status_code >= 400:
            client.close()
            raise ModelLoadError(f"{config.base_url}/models answered {_error_text(response)}")
        served = [m["id"] for m in (response.json().get("data") or []) if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if served and config.model not in served:
            client.close()
            raise ModelLoadError(f"{config.base_url} does not serve '{config.model}' (it serves: {', '.join(served)})")
        info = LoadedModelInfo(name=folder.name, loader=self.name, device=urlsplit(config.base_url).netloc,
                               dtype="remote", context_length=config.context_length,
                               details=f"{config.model} at {config.base_url}")
        return RemoteModel(info, config, client, key)


class RemoteEngine:
    """The plugin: one per host, holding the keys the operator allowed (from ``configure``)."""

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}

    @hookimpl
    def configure(self, settings: Any) -> None:
        self._keys = dict(getattr(settings, "remote_keys", ()) or ())

    @hookimpl
    def register_loaders(self, register: Callable[[Any], None]) -> None:
        register(RemoteLoader(lambda: self._keys))

    @hookimpl
    def generate(
        self, request: Any, model: Any, cancel: CancelToken, emit: Callable[[StreamPiece], None], seed: int
    ) -> bool | None:
        """Chats for a remote model go as messages; everything else is left to the engine."""
        if not isinstance(model, RemoteModel) or request.prompt is not None:
            return None
        messages = [m.as_dict() for m in request.messages]
        if request.continue_last:
            return None  # OpenAI chat cannot continue a reply: the rendered prompt goes to /completions
        for piece in model.stream_chat(messages, request.params, cancel, seed=seed):
            emit(piece)
        return True


def create_plugin() -> RemoteEngine:
    return RemoteEngine()
