"""The reference extension: implements every Loadstar hook, each in a few lines, and says why.

Turn it on in the Extensions tab or with ``--extensions example``. What it does, per hook:

- ``configure``: keeps the data folder it may write to (``<data dir>/extensions/example``).
- ``register_loaders``: adds "Echo (example)", a loader for folders holding ``echo.txt``; the
  model replies with that file's text. The smallest complete loader there can be.
- ``modify_request``: a message starting with ``/short `` loses the prefix and gets at most 16
  new tokens: requests are changed in place, on a draft.
- ``render_prompt``: a message starting with ``/raw `` is sent as it is, without the chat format;
  every other chat returns None, so the model's own format renders it (first result wins).
- ``generate``: the message ``/ping`` is answered "pong" without the model (first True wins).
- ``modify_reply``: a message ending in "(in capitals)" gets its reply in capitals.
- ``webui_contribution``: an "Example" tab showing how many generations the engine has run.
- ``register_tools``: a ``word_count`` tool the chat can let a model call (after the user approves).
- ``shutdown``: the engine is closing; this plugin holds nothing to close, so it only says so.

State lives on the plugin object (``create_plugin()`` makes one per plugin host), never in module
globals, so two engines in one process (tests) never share it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from loadstar import (
    Assessment,
    Availability,
    CancelToken,
    LoadedModel,
    LoadedModelInfo,
    OutputSpec,
    PluginContext,
    ReplyDraft,
    RequestDraft,
    SamplingParams,
    StreamPiece,
    Tool,
    UIContribution,
    hookimpl,
)

log = logging.getLogger(__name__)
SHORT = "/short "
RAW = "/raw "
SHOUT = "(in capitals)"


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EchoModel(LoadedModel):
    supported_params = frozenset({"max_new_tokens"})

    def __init__(self, name: str, text: str) -> None:
        self.info = LoadedModelInfo(name=name, loader="Echo (example)", device="cpu", dtype="none",
                                    context_length=None)
        self._text = text

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def stream(
        self, prompt: str, params: SamplingParams, cancel: CancelToken, *, seed: int, output: OutputSpec | None = None,
    ) -> Iterator[StreamPiece]:  # ``output`` comes only to a model whose info.features name it: none here
        for word in self._text.split()[: params.max_new_tokens]:
            if cancel.cancelled:
                return
            yield StreamPiece(word + " ", 1)

    def unload(self) -> None:
        self._text = ""


class EchoLoader:
    name = "Echo (example)"
    Options = EchoOptions

    def availability(self) -> Availability:
        return Availability(True, "pure Python")

    def assess(self, folder: Any) -> Assessment:
        if (folder.path / "echo.txt").is_file():
            return Assessment(True, "echo.txt found: replies with its text", 100)
        return Assessment(False, "no echo.txt")

    def load(self, folder: Any, options: BaseModel) -> EchoModel:
        return EchoModel(folder.name, (folder.path / "echo.txt").read_text(encoding="utf-8"))


class ExamplePlugin:
    """The example extension: one hook of each kind, documented (see the module docstring)."""

    def __init__(self) -> None:
        self.data_dir: Path | None = None

    @hookimpl
    def configure(self, settings: Any) -> None:
        self.data_dir = Path(settings.data_dir) / "extensions" / "example"

    @hookimpl
    def register_loaders(self, register: Any) -> None:
        register(EchoLoader())

    @hookimpl
    def modify_request(self, request: RequestDraft) -> None:
        text = request.user_text
        if text is not None and text.startswith(SHORT):
            request.user_text = text[len(SHORT):]
            request.params = request.params.model_copy(update={"max_new_tokens": min(16, request.params.max_new_tokens)})

    @hookimpl
    def render_prompt(self, messages: list[Any], add_generation_prompt: bool) -> str | None:
        users = [m for m in messages if m.role == "user"]
        if users and users[-1].content.startswith(RAW):
            return users[-1].content[len(RAW):]
        return None  # let the next extension, or the engine, render it

    @hookimpl
    def generate(self, request: Any, emit: Any) -> bool | None:
        last = request.messages[-1].content.strip() if request.messages else ""
        if last == "/ping":
            emit(StreamPiece("pong", 1))
            return True
        return None

    @hookimpl
    def modify_reply(self, reply: ReplyDraft) -> None:
        users = [m for m in reply.messages if m.role == "user"]
        if users and users[-1].content.rstrip().endswith(SHOUT):
            reply.text = reply.text.upper()

    @hookimpl
    def webui_contribution(self, register: Any) -> None:
        register(UIContribution("Example", _build_tab, placement="tab"))

    @hookimpl
    def register_tools(self, register: Any) -> None:
        register(Tool("word_count", "Count the words of a text.", lambda args: str(len(args["text"].split())),
                      {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}))

    @hookimpl
    def shutdown(self) -> None:
        log.debug("example extension: nothing to close")


def _build_tab(context: PluginContext) -> None:
    import gradio as gr  # only the web UI calls this

    def count() -> str:
        finished = context.metrics()
        return f"The engine has finished {sum(finished.requests.values())} generations."

    gr.Markdown("This tab comes from `extensions/example`: the reference for every hook.",
                elem_id="example-extension-intro")
    shown = gr.Markdown(count(), elem_id="example-extension-count")
    gr.Button("Refresh", elem_id="example-extension-refresh").click(count, None, shown)


def create_plugin() -> ExamplePlugin:
    return ExamplePlugin()
