"""The messages between the server and a model's engine core: plain data, JSON on the wire, never pickle.

A worker runs code a hostile model file may reach (a GGUF parser, a tokenizer); what it sends is
read here as JSON and checked field by field, so the worst a worker can do is send a message
that is refused (the server then ends that worker). Every type that crosses has its ``*_data``
(to plain data) and its reader (from it) here, in one place; the core (core.py) and its client
(core_client.py) speak only these.

Server to core: ``add`` (a sequence: key, prompt, params, seed, output), ``cancel`` (key),
``ask`` (id, method, args: answered between two steps), ``end``.
Core to server: ``step`` (every running sequence's new piece in one message), ``failed``
(key, error: that sequence ended), ``answer`` (id, result or error), ``beat`` (a worker is
alive), and for a worker's load ``loaded`` (the model's facts) or ``load_failed`` (error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from loadstar.engine import errors
from loadstar.engine.errors import LoadstarError, WorkerError
from loadstar.engine.models.loader_api import (
    LoadedModelInfo,
    OutputSpec,
    SequenceStep,
    StreamPiece,
    TextEmbedding,
    TokenChoice,
    TokenLogprob,
)
from loadstar.engine.sampling import SamplingParams

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # an embedding of many texts is the largest honest message
BEAT_S = 1.0  # how often a worker says it is alive, whatever its core is doing
MAX_BATCH = 1024  # a worker's max_batch is taken up to this (a hostile one cannot ask for more)


class WireError(ValueError):
    """A message that is not what the protocol says (from a worker: it is ended)."""


def encode(message: Mapping[str, Any]) -> bytes:
    """The message as JSON; ``WireError`` for a value that is not plain data (an object, NaN)."""
    try:
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise WireError(f"not plain data: {error}") from None


def decode(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise WireError(f"not JSON: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise WireError("a message is an object with an 'op'")
    return message


# -- checked reads ---------------------------------------------------------------------------------

def field_of(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = message.get(name)
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise WireError(f"'{name}' is not a number")
    if not isinstance(value, kind):
        raise WireError(f"'{name}' is missing or has the wrong type")
    return value


# -- pieces, steps ---------------------------------------------------------------------------------

def piece_data(piece: StreamPiece) -> dict[str, Any]:
    data: dict[str, Any] = {"text": piece.text, "tokens": piece.tokens}
    if piece.logprobs:
        data["logprobs"] = [[_choice_data(lp.chosen), [_choice_data(c) for c in lp.top]] for lp in piece.logprobs]
    return data


def read_piece(data: Any) -> StreamPiece:
    if not isinstance(data, dict):
        raise WireError("a piece is an object")
    text, tokens = field_of(data, "text", str), field_of(data, "tokens", int)
    logprobs = data.get("logprobs", [])
    if not isinstance(logprobs, list):
        raise WireError("'logprobs' is a list")
    read = []
    for item in logprobs:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], list)):
            raise WireError("a log probability is [chosen, top]")
        read.append(TokenLogprob(_read_choice(item[0]), tuple(_read_choice(c) for c in item[1])))
    return StreamPiece(text, tokens, tuple(read))


def _choice_data(choice: TokenChoice) -> list[Any]:
    return [choice.token, choice.bytes.hex(), choice.logprob]


def _read_choice(data: Any) -> TokenChoice:
    if not (isinstance(data, list) and len(data) == 3 and isinstance(data[0], str) and isinstance(data[1], str)
            and isinstance(data[2], (int, float)) and not isinstance(data[2], bool)):
        raise WireError("a token choice is [text, hex bytes, logprob]")
    try:
        raw = bytes.fromhex(data[1])
    except ValueError:
        raise WireError("a token's bytes are hex") from None
    return TokenChoice(data[0], raw, float(data[2]))


def step_data(key: int, step: SequenceStep) -> list[Any]:
    return [key, piece_data(step.piece) if step.piece is not None else None, step.done]


def read_steps(data: Any) -> list[tuple[int, SequenceStep]]:
    """A ``step`` message's sequences, in order (one sequence may come more than once: steps held
    together, see core.py)."""
    if not isinstance(data, list):
        raise WireError("a step's output is a list")
    steps = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], int) and isinstance(item[2], bool)):
            raise WireError("a sequence's step is [key, piece, done]")
        steps.append((item[0], SequenceStep(read_piece(item[1]) if item[1] is not None else None, item[2])))
    return steps


# -- requests --------------------------------------------------------------------------------------

def params_data(params: SamplingParams) -> dict[str, Any]:
    return params.model_dump(mode="json")


def read_params(data: Any) -> SamplingParams:
    try:
        return SamplingParams.model_validate(data)
    except ValueError as error:
        raise WireError(f"bad sampling parameters: {error}") from None


def output_data(output: OutputSpec | None) -> dict[str, Any] | None:
    if output is None:
        return None
    return {"json_schema": dict(output.json_schema) if output.json_schema is not None else None,
            "logprobs": output.logprobs}


def read_output(data: Any) -> OutputSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise WireError("an output spec is an object")
    schema, logprobs = data.get("json_schema"), data.get("logprobs")
    if schema is not None and not isinstance(schema, dict):
        raise WireError("'json_schema' is an object")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)):
        raise WireError("'logprobs' is a number")
    return OutputSpec(json_schema=schema, logprobs=logprobs)


def embeddings_data(embeddings: list[TextEmbedding]) -> list[list[Any]]:
    return [[list(e.vector), e.tokens] for e in embeddings]


def read_embeddings(data: Any) -> list[TextEmbedding]:
    if not isinstance(data, list):
        raise WireError("embeddings are a list")
    out = []
    for item in data:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list) and isinstance(item[1], int)):
            raise WireError("an embedding is [vector, tokens]")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item[0]):
            raise WireError("a vector holds numbers")
        out.append(TextEmbedding(tuple(float(v) for v in item[0]), item[1]))
    return out


# -- errors ----------------------------------------------------------------------------------------

def error_data(error: BaseException) -> dict[str, str]:
    """An error as the other side can raise it: a Loadstar error keeps its class, anything else is a
    WorkerError worded in one line (its class may live in a package the server never imports)."""
    if isinstance(error, LoadstarError) and getattr(errors, type(error).__name__, None) is type(error):
        return {"kind": type(error).__name__, "message": str(error)}
    return {"kind": WorkerError.__name__, "message": errors.one_line(error)}


def read_error(data: Any) -> LoadstarError:
    if not (isinstance(data, dict) and isinstance(data.get("kind"), str) and isinstance(data.get("message"), str)):
        raise WireError("an error is {kind, message}")
    kind = getattr(errors, data["kind"], None)
    if not (isinstance(kind, type) and issubclass(kind, LoadstarError)):
        kind = WorkerError
    return kind(data["message"][:2000])


# -- a loaded model's facts ------------------------------------------------------------------------

FACTS = ("info", "chat_template", "special_tokens", "supported_params", "max_batch", "chat_rendered_by")


@dataclass(frozen=True)
class ModelFacts:
    """What the server keeps of a loaded model (the rest of it lives with its core)."""

    info: LoadedModelInfo
    chat_template: str | None
    special_tokens: dict[str, str]
    supported_params: frozenset[str]
    max_batch: int
    chat_rendered_by: str | None


def facts_data(model: Any) -> dict[str, Any]:
    info: LoadedModelInfo = model.info
    return {
        "info": {"name": info.name, "loader": info.loader, "device": info.device, "dtype": info.dtype,
                 "context_length": info.context_length, "details": info.details, "features": sorted(info.features)},
        "chat_template": model.chat_template,
        "special_tokens": dict(model.special_tokens),
        "supported_params": sorted(model.supported_params),
        "max_batch": int(model.max_batch),
        "chat_rendered_by": model.chat_rendered_by,
    }


def read_facts(data: Any) -> ModelFacts:
    if not isinstance(data, dict):
        raise WireError("a model's facts are an object")
    info = field_of(data, "info", dict)
    context = info.get("context_length")
    if context is not None and (not isinstance(context, int) or isinstance(context, bool)):
        raise WireError("'context_length' is a number")
    features = field_of(info, "features", list)
    special = field_of(data, "special_tokens", dict)
    supported = field_of(data, "supported_params", list)
    template, by = data.get("chat_template"), data.get("chat_rendered_by")
    if not all(isinstance(x, str) for x in [*features, *special, *special.values(), *supported]):
        raise WireError("features, special tokens and parameter names are text")
    if not (template is None or isinstance(template, str)) or not (by is None or isinstance(by, str)):
        raise WireError("'chat_template' and 'chat_rendered_by' are text")
    max_batch = field_of(data, "max_batch", int)
    return ModelFacts(
        info=LoadedModelInfo(
            name=field_of(info, "name", str), loader=field_of(info, "loader", str), device=field_of(info, "device", str),
            dtype=field_of(info, "dtype", str), context_length=context, details=field_of(info, "details", str),
            features=frozenset(features)),
        chat_template=template, special_tokens=dict(special), supported_params=frozenset(supported),
        max_batch=max(1, min(max_batch, MAX_BATCH)), chat_rendered_by=by,
    )
