"""A generation request and the events it produces: the generation service's typed boundary.

Kept apart from the service so that the hook specifications, the request pipeline and the API
can name these types without importing the service (no import circle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loadstar.engine.chat.json_reply import check_schema
from loadstar.engine.chat.messages import ChatMessage, check_text
from loadstar.engine.chat.tool_calls import ToolCall, ToolUse
from loadstar.engine.errors import BadRequestError
from loadstar.engine.models.loader_api import OutputSpec, TokenLogprob
from loadstar.engine.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "error", "tool_calls"]
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationRequest:
    """Either chat ``messages`` (the model's chat template is applied) or a raw ``prompt``."""

    params: SamplingParams = field(default_factory=SamplingParams)
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    owner: str = "local"  # who may cancel it and whose turn it is in the queue
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one, which is not shown
    continue_last: bool = False  # the last message is an assistant reply to continue, not to answer
    output: OutputSpec = field(default_factory=OutputSpec)  # JSON schema, log probabilities
    tools: ToolUse = field(default_factory=ToolUse)  # functions the model may call (chats only)
    model: str | None = None  # the loaded model to answer (None: the current one, the UI's)

    def __post_init__(self) -> None:
        if self.output.json_schema is not None:
            check_schema(self.output.json_schema)
        if self.output.logprobs is not None and not 0 <= self.output.logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequestError(f"top_logprobs must be 0 to {MAX_TOP_LOGPROBS}")
        if bool(self.messages) == (self.prompt is not None):
            raise BadRequestError("a generation request needs either chat messages or a prompt, not both")
        if self.continue_last and (not self.messages or self.messages[-1].role != "assistant"):
            raise BadRequestError("there is no reply to continue")
        if self.prompt is not None and not self.prompt:
            raise BadRequestError("the prompt is empty")
        if self.prompt is not None and self.tools.active:
            raise BadRequestError("tools need chat messages, not a raw prompt")
        for text in (self.prompt or "", *self.stop):
            check_text(text)
        if len(self.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LENGTH for s in self.stop):
            raise BadRequestError(
                f"stop strings: at most {MAX_STOP_STRINGS}, each 1 to {MAX_STOP_LENGTH} characters"
            )


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to run


@dataclass(frozen=True)
class Started:
    model: str
    prompt: str
    prompt_tokens: int
    seed: int
    format_name: str | None = None  # the prompt format used for a chat; None for raw prompts
    format_why: str | None = None  # how that format was found: the model's template, its card, ...
    notices: tuple[str, ...] = ()  # what the user should know: ignored parameters, a cut prompt, ...


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens whose text this delta shows (when asked for)


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seed: int | None = None
    seconds: float = 0.0
    error: str | None = None  # one line, when reason == "error"
    notices: tuple[str, ...] = ()
    logprobs: tuple[TokenLogprob, ...] | None = None  # of the reply's tokens, when the request asked for them
    tool_calls: tuple[ToolCall, ...] = ()  # when reason == "tool_calls" (the text is what came besides them)
    bad_request: bool = False  # the error is the request's (the API answers 400), not the server's
    stop_string: str | None = None  # the stop string that ended the reply, when one did
    first_token_seconds: float | None = None  # from the start (after the queue) to the first token made

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second after the first token: the model's writing speed, the prompt's read left out."""
        if self.first_token_seconds is None or self.completion_tokens < 2:
            return self.tokens_per_second
        writing = self.seconds - self.first_token_seconds
        return (self.completion_tokens - 1) / writing if writing > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


GenerationEvent = Queued | Started | TextDelta | Finished
