"""Errors the user sees. Each message is one line that says what is wrong and, where it helps, what to do."""

from __future__ import annotations

from collections.abc import Collection


class LoadstarError(Exception):
    """Base class: ``str(error)`` is a one-line message fit to show a user as it is."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ModelNotFoundError(LoadstarError):
    """The named model folder does not exist in the models directory."""


class BadModelFolderError(LoadstarError):
    """The folder exists but cannot hold a loadable model (no weights, unreadable files, ...)."""


class NoLoaderError(LoadstarError):
    """No loader can load this folder, or the pinned loader cannot."""


class ModelLoadError(LoadstarError):
    """A loader tried and failed; the previously loaded model (if any) is still in place."""


class LoadCancelled(LoadstarError):
    """The user cancelled a load; the previously loaded model (if any) is still in place."""


class GenerationFailed(LoadstarError):
    """Generation failed for a reason outside Loadstar (a remote server went away): not a plugin bug."""


class WorkerCrashed(LoadstarError):
    """The model's worker process died; what it was doing is lost (the server stays up)."""


class WorkerNotResponding(LoadstarError):
    """The model's worker sent nothing (no step, no heartbeat) for longer than its deadline."""


class WorkerError(LoadstarError):
    """An error raised inside a model's worker by something other than Loadstar, worded there in one line."""


class BadRequestError(LoadstarError):
    """A generation request does not make sense (no model, empty input, ...)."""


def one_line(error: BaseException) -> str:
    """A one-line description of any exception, for messages that wrap third-party errors."""
    text = " ".join(str(error).split())
    name = type(error).__name__
    if isinstance(error, LoadstarError):
        return text
    if not text:
        return name
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{name}: {text}"


def first_problem(error: BaseException, *, skip: Collection[str] = ()) -> tuple[str, str]:
    """(where, message) for a validation error's first problem: the field path joined with dots
    (parts in ``skip`` left out, e.g. FastAPI's "body") and the message without pydantic's
    "Value error, " prefix. Any error with pydantic's ``errors()`` (FastAPI's too); for other
    errors, ("", their first line)."""
    errors = getattr(error, "errors", None)
    problems = errors() if callable(errors) else None
    if not problems:
        text = str(error)
        return "", text.splitlines()[0] if text else type(error).__name__
    problem = problems[0]
    where = ".".join(str(p) for p in problem.get("loc", ()) if p not in skip)
    return where, str(problem.get("msg", "invalid value")).removeprefix("Value error, ")


def problem_line(error: BaseException) -> str:
    """What is wrong with some input, in one line: a validation error's first field and message
    (``messages.0.role: Input should be ...``), else the error's first line."""
    where, message = first_problem(error)
    return f"{where}: {message}" if where else message
