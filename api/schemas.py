"""OpenAI-compatible request and response shapes (the subset Loadstar serves), with limits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from loadstar.engine.generation.requests import MAX_STOP_LENGTH, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from loadstar.engine.sampling import SEED_MAX, SamplingParams


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str = Field(max_length=1_000_000)


MAX_CHOICES = 8
MAX_TOOLS = 64


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=100_000, description="The arguments as a JSON object, in a string.")


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, description="Text, or a list of text parts.")
    tool_calls: list[ToolCallIn] | None = Field(None, max_length=MAX_TOOLS, description="An assistant's tool calls.")
    tool_call_id: str | None = Field(None, max_length=128, description="The call a tool message answers.")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = Field(None, max_length=10_000)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}},
                                       description="A JSON schema of the arguments.")


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionIn


class NamedFunction(BaseModel):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field("reply", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """Fields shared by chat and text completions. Unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description=(
        "Any name: the loaded model answers (the response names it; see /v1/models)."))
    max_tokens: int | None = Field(None, ge=1, le=32768, description="Most new tokens; capped by the server's limit.")
    max_completion_tokens: int | None = Field(None, ge=1, le=32768, description="Newer name for max_tokens.")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus sampling; default 1.")
    seed: int | None = Field(None, ge=0, le=SEED_MAX, description="Same seed, same sample.")
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Penalise tokens already generated.")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="Penalise tokens by how often they came.")
    # Extensions other servers (vLLM, llama.cpp) accept too:
    top_k: int | None = Field(None, ge=0, le=1000, description="Sample from the k most likely tokens; 0 = off.")
    min_p: float | None = Field(None, ge=0.0, le=1.0, description="Drop tokens below this fraction of the best one.")
    repetition_penalty: float | None = Field(None, ge=1.0, le=3.0, description="Penalise repeated tokens; 1 = off.")
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings; the text ends before the first.")
    stream: bool = Field(False, description="Send server-sent events, ending with data: [DONE].")
    stream_options: dict[str, Any] | None = Field(None, description="{'include_usage': true} adds a usage chunk.")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices to generate, decoded together (seeds seed, seed+1, ...).")
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, each 1 to {MAX_STOP_LENGTH} characters")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def to_sampling_params(self, max_tokens_cap: int) -> SamplingParams:
        """The engine's parameters for this request (OpenAI's defaults where it sets none; new tokens
        capped at ``max_tokens_cap``); a ``ValidationError`` for values the engine refuses."""
        requested = self.max_completion_tokens or self.max_tokens or max_tokens_cap
        optional = {name: getattr(self, name) for name in (
            "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty",
        ) if getattr(self, name) is not None}
        return SamplingParams.model_validate({
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": 0,
            "max_new_tokens": min(requested, max_tokens_cap),
            "seed": -1 if self.seed is None else self.seed,
            **optional,
        })

    def choice_seeds(self) -> list[int]:
        """One seed per choice: -1 (random) each, or ``seed + i`` for choice i, so choice i equals the
        same request sent alone with that seed."""
        return [-1 if self.seed is None else (self.seed + index) % (SEED_MAX + 1) for index in range(self.n)]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=10_000)
    character: str | None = Field(None, min_length=1, max_length=100, description=(
        "Loadstar's own: a character's name or id (the Characters tab's, without logins, or an extension's). "
        "Its description (and example dialogue) is the system message when the request sends none."))
    response_format: ResponseFormat | None = Field(None, description=(
        "json_object or json_schema: the reply is JSON (grammar-constrained where the loader can, validated always)."))
    logprobs: bool = Field(False, description="Give each reply token's log probability.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="And this many most likely alternatives.")
    tools: list[ToolIn] | None = Field(None, max_length=MAX_TOOLS, description=(
        "Functions the model may call (for models whose chat template takes tools)."))
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(None, description=(
        "auto (default with tools), none, required, or a named function; required and named calls are "
        "grammar-constrained where the loader can."))
    parallel_tool_calls: bool | None = None

    def json_schema(self) -> dict[str, Any] | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object" or rf.json_schema is None:
            return {"type": "object"}
        return rf.json_schema.schema_

    def top_logprobs_wanted(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise ValueError("top_logprobs needs logprobs: true")
            return None
        return self.top_logprobs or 0


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="The prompt (a list must hold exactly one).")
    echo: bool = Field(False, description="Not supported: the prompt is never echoed back.")
    suffix: str | None = Field(None, description="Not supported: no fill-in-the-middle.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description=(
        "Give each token's log probability and this many most likely alternatives."))

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported: the reply never repeats the prompt")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return value

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if len(prompts) != 1 or not prompts[0]:
            raise ValueError("give exactly one non-empty prompt")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


MAX_EMBEDDING_INPUTS = 256


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: one text or a list of them (token-id inputs are not taken)."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="A loaded model's name; any other name: the current model.")
    input: str | list[str] = Field(description=f"A text, or up to {MAX_EMBEDDING_INPUTS} of them.")
    encoding_format: Literal["float", "base64"] = Field("float", description="Floats, or base64 of little-endian float32.")
    dimensions: int | None = Field(None, ge=1, description="Not supported: the model's own size is given.")
    user: str | None = Field(None, max_length=256)

    @field_validator("input")
    @classmethod
    def _inputs(cls, value: str | list[str]) -> str | list[str]:
        texts = [value] if isinstance(value, str) else value
        if not texts or len(texts) > MAX_EMBEDDING_INPUTS:
            raise ValueError(f"input must be 1 to {MAX_EMBEDDING_INPUTS} texts")
        if any(len(text) > 100_000 for text in texts):
            raise ValueError("each input text must be at most 100,000 characters")
        return value

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="Model folder name in the models folder.")
    loader: str | None = Field(None, max_length=64, description="Pin a loader; default: the best candidate.")
    options: dict[str, Any] | None = Field(None, description="Loader options (see the loader's Options).")


class DownloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=3, max_length=400, description="org/repo, org/repo:branch, or a huggingface.co URL.")
    token: str | None = Field(None, max_length=400, description="Hub token for gated or private repos (not stored).")
    gguf_file: str | None = Field(None, max_length=400, description="For repos with several .gguf files.")
