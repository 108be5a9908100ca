"""The output processor: one request's run in its lane, from its prompt to its ``Finished``.

What a request's output becomes does not depend on how its tokens were made (alone or in a
batch): stop strings are held back and cut, tool calls are read, a JSON reply is checked against
its schema, the ``modify_reply`` hooks edit the reply, and the finish reason and the notices are
worked out. ``RequestRun.take`` is fed the model's pieces; ``end`` sends the one ``Finished``.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Mapping
from typing import Any

from loadstar.engine.chat.json_reply import parse_reply
from loadstar.engine.chat.tool_calls import ToolCall, find_calls
from loadstar.engine.errors import BadRequestError, LoadstarError
from loadstar.engine.generation.handle import GenerationHandle
from loadstar.engine.generation.pipeline import DraftedRequest, PreparedRequest, RequestPipeline
from loadstar.engine.generation.requests import Finished, FinishReason, Started, TextDelta
from loadstar.engine.generation.stop_strings import StopStringFilter
from loadstar.engine.models.loader_api import (
    FEATURE_GRAMMAR,
    FEATURE_LOGPROBS,
    CancelToken,
    LoadedModel,
    OutputSpec,
    StreamPiece,
    TokenLogprob,
)
from loadstar.engine.plugins.extension_api import ReplyDraft
from loadstar.engine.sampling import SEED_MAX, SamplingParams


class _RunToken(CancelToken):
    """What the model checks between tokens: the request was cancelled, or a stop string was hit."""

    def __init__(self, request_token: CancelToken, stops: StopStringFilter) -> None:
        super().__init__()
        self._request = request_token
        self._stops = stops

    @property
    def cancelled(self) -> bool:
        return self._request.cancelled or self._stops.stopped



class RequestRun:
    """One request in its lane: prepared and started, fed the model's pieces, finished.

    The same for a request served alone and for one in a batch: stop strings, the reply's
    extensions, the finish reason and the notices do not depend on how its tokens were made.
    """

    def __init__(self, handle: GenerationHandle, model: LoadedModel, pipeline: RequestPipeline) -> None:
        self.handle = handle
        self.model = model
        self._pipeline = pipeline
        self.notices: list[str] = []
        self.parts: list[str] = []
        self.tokens = 0
        self.prepared: PreparedRequest | None = None
        self.seed = 0
        self.started = 0.0
        self.stops = StopStringFilter(())
        self.token: CancelToken = handle.cancel_token
        self.logprobs: list[TokenLogprob] = []  # shown
        self._unshown: list[TokenLogprob] = []  # of text the stop-string filter still holds
        self.calls: tuple[ToolCall, ...] = ()
        self.first_token_at: float | None = None  # perf_counter() when the first token came

    @property
    def params(self) -> SamplingParams:
        assert self.prepared is not None
        return self.prepared.params

    @property
    def prompt(self) -> str:
        assert self.prepared is not None
        return self.prepared.prompt

    @property
    def stopped(self) -> bool:
        """Cancelled, or a stop string was met: no more tokens are wanted."""
        return self.token.cancelled

    def start(self) -> bool:
        """Prepare the request and send ``Started``; False (with ``Finished`` sent) when it cannot run."""
        drafted = self.draft()
        if drafted is None:
            return False
        try:
            count = self.model.count_tokens(drafted.prompt)
        except LoadstarError as error:
            self.fail(error)
            return False
        return self.begin(drafted, count)

    def draft(self) -> DraftedRequest | None:
        """The request after the extensions, rendered; None (with ``Finished`` sent) when it cannot run."""
        handle = self.handle
        if handle.cancelled:
            handle.emit(Finished(reason="cancelled", text=""))
            return None
        try:
            return self._pipeline.draft(self.model, handle.request, self.notices)
        except LoadstarError as error:  # a bad request, or a model whose worker crashed or stopped responding
            self.fail(error)
            return None

    def fail(self, error: LoadstarError) -> None:
        """End a request that never started with ``error``."""
        self.handle.emit(Finished(reason="error", text="", error=str(error), notices=tuple(self.notices),
                                  bad_request=isinstance(error, BadRequestError)))

    def begin(self, drafted: DraftedRequest, prompt_tokens: int) -> bool:
        """Complete the preparation with the prompt's token count and send ``Started`` (False: ended)."""
        handle = self.handle
        prepared = self.prepared = self._pipeline.complete(self.model, drafted, prompt_tokens, self.notices)
        lacking = self._lacking(handle.request.output)
        if lacking:
            handle.emit(Finished(reason="error", text="", error=lacking, notices=tuple(self.notices), bad_request=True))
            return False
        params = prepared.params
        self.seed = params.seed if params.seed >= 0 else secrets.randbelow(SEED_MAX + 1)
        self.stops = StopStringFilter(prepared.stop)
        self.token = _RunToken(handle.cancel_token, self.stops)
        handle.emit(Started(
            model=self.model.info.name, prompt=prepared.prompt, prompt_tokens=prepared.prompt_tokens, seed=self.seed,
            format_name=prepared.format_name, format_why=prepared.format_why, notices=prepared.notices,
        ))
        self.started = time.perf_counter()
        return True

    def _lacking(self, output: OutputSpec) -> str | None:
        if output.logprobs is not None and FEATURE_LOGPROBS not in self.model.info.features:
            return f"{self.model.info.loader} does not give log probabilities (logprobs)"
        return None

    @property
    def output(self) -> dict[str, OutputSpec]:
        """``output=`` for the model's call: what it asked for that the model can do, or nothing."""
        request, features = self.handle.request, self.model.info.features
        asked = request.output
        schema = request.tools.call_schema() if request.tools.must_call else asked.json_schema
        spec = OutputSpec(
            json_schema=schema if FEATURE_GRAMMAR in features else None,
            logprobs=asked.logprobs if FEATURE_LOGPROBS in features else None,
        )
        return {} if spec.plain else {"output": spec}

    def by_extension(self) -> bool:
        """Whether an extension produced the reply itself (the ``generate`` hook)."""
        assert self.prepared is not None
        prepared, request = self.prepared, self.handle.request
        effective = dataclasses.replace(  # what the extensions made of the request
            request, messages=prepared.messages, params=prepared.params, stop=prepared.stop,
            prompt=prepared.prompt if request.prompt is not None else None,
        )
        model = getattr(self.model, "local", None) or self.model  # see the hook's specification
        return self._pipeline.generate(effective, prepared.prompt, model, self.token, self.take, self.seed,
                                       self.notices)

    def take(self, piece: StreamPiece) -> None:
        if self.first_token_at is None and piece.tokens:
            self.first_token_at = time.perf_counter()
        self.tokens += piece.tokens
        self._unshown.extend(piece.logprobs)
        self._show(self.stops.feed(piece.text))

    def _show(self, text: str) -> None:
        if text:
            self.parts.append(text)
            shown, self._unshown = tuple(self._unshown), []
            self.logprobs.extend(shown)
            self.handle.emit(TextDelta(text, shown))

    def end(self, error: str | None = None, *, bad_request: bool = False) -> None:
        """Send ``Finished``: the reason (stop, length, cancelled, tool calls) from how it ended, or the error."""
        if error is not None:
            self.handle.emit(self._finished("error", error, bad_request=bad_request))
            return
        self._show(self.stops.flush())
        params = self.params
        if self.stops.stopped:
            reason: FinishReason = "stop"
        elif self.handle.cancelled:
            reason = "cancelled"
        elif self.tokens >= params.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        tools = self.handle.request.tools
        if tools.active and reason != "cancelled":
            content, self.calls = find_calls("".join(self.parts), tools.names)
            if self.calls:
                self.parts, reason = [content], "tool_calls"
            elif tools.must_call:
                cut = f" before max_tokens ({params.max_new_tokens}) ran out" if reason == "length" else ""
                self.handle.emit(self._finished(
                    "error", f"the model did not call a tool{cut}, though tool_choice requires one{self._unconstrained}"))
                return
        schema = self.handle.request.output.json_schema
        if schema is not None and reason not in ("cancelled", "tool_calls"):
            problem = self._check_json(schema, reason)
            if problem:
                self.handle.emit(self._finished("error", problem))
                return
        if reason != "cancelled" and not "".join(self.parts).strip():
            self.notices.append(empty_reply_reason(reason, self.tokens, self.stops.matched, params.max_new_tokens))
        self.handle.emit(self._finished(reason))

    def _check_json(self, schema: Mapping[str, Any], reason: FinishReason) -> str | None:
        """Why the reply is not the JSON asked for, or None (a fenced reply is unwrapped). A reply
        cut by max_tokens is not an error: it ends "length", with a notice saying its JSON is cut."""
        text, problem = parse_reply("".join(self.parts), schema)
        if problem is None:
            self.parts = [text]
            return None
        if reason == "length":  # the client's max_tokens, not a failure: finish "length", as OpenAI does
            self.notices.append(
                f"the reply ran out of tokens (max_tokens {self.params.max_new_tokens}) before its JSON ended")
            return None
        return problem + self._unconstrained

    @property
    def _unconstrained(self) -> str:
        """Said after a reply that is not what was asked for, when the model could not be held to it."""
        info = self.model.info
        return "" if FEATURE_GRAMMAR in info.features else f" ({info.loader} cannot constrain its output)"

    def _finished(self, reason: FinishReason, error: str | None = None, *, bad_request: bool = False) -> Finished:
        text = "".join(self.parts)
        prepared = self.prepared
        if reason != "error" and prepared is not None:
            draft = ReplyDraft(text=text, reason=reason, model=self.model.info.name, owner=self.handle.owner,
                               messages=prepared.messages, prompt=prepared.prompt)
            text = self._pipeline.finish(draft, self.notices)
        return Finished(
            reason=reason, text=text, prompt_tokens=prepared.prompt_tokens if prepared else 0,
            completion_tokens=self.tokens, seed=self.seed if prepared else None,
            seconds=time.perf_counter() - self.started if prepared else 0.0, error=error, notices=tuple(self.notices),
            logprobs=tuple(self.logprobs) if self.handle.request.output.logprobs is not None else None,
            tool_calls=self.calls, bad_request=bad_request,
            stop_string=self.stops.matched if reason == "stop" else None,
            first_token_seconds=self.first_token_at - self.started if prepared and self.first_token_at else None,
        )


def empty_reply_reason(reason: FinishReason, tokens: int, stop: str | None, max_new_tokens: int) -> str:
    """Why a reply came out empty, in words (an empty reply never comes without its reason)."""
    if stop is not None:
        return f"the reply is empty: the stop string {stop!r} came first"
    if reason == "length":
        return f"the reply is empty: max_new_tokens ({max_new_tokens}) ran out before any visible text"
    if tokens <= 1:  # the end-of-sequence token itself may be counted
        return "the reply is empty: the model ended it at its first token (end of sequence); check the prompt format"
    return f"the reply is empty: the model wrote {tokens} tokens of whitespace or special tokens, then ended it"
