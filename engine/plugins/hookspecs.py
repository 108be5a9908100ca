"""The hooks a Loadstar plugin can implement.

A plugin is a module (or object) with functions marked ``@hookimpl`` (``from loadstar import hookimpl``). Loadstar finds them in two
places: its own extensions in ``extensions/<name>/`` and other packages' plugins through the
``loadstar`` entry-point group in their ``pyproject.toml``::

    [project.entry-points.loadstar]
    my_plugin = "my_package.plugin_module"

Hooks are called through pluggy (the typed methods of ``loadstar.engine.plugins.host.PluginHost``),
with keyword arguments, so an implementation may accept only the arguments it needs and new
arguments can be added to a hook without breaking existing plugins. pluggy does not chain return
values: every implementation gets the same inputs, so hooks that change something get a draft to
change in place. ``@hookimpl(tryfirst=True)``/``trylast=True`` order an implementation, and
``@hookimpl(wrapper=True)`` runs around the others (``result = yield``, then return it); the
old-style ``hookwrapper=True`` is refused at registration. An implementation that raises is
disabled for the rest of the session, and the user is told; the request it was handling goes on
without it. ``LOADSTAR_TRACE_PLUGINS=1`` logs every hook call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from loadstar.engine.chat.characters import Character
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.chat.prompt_formats import PromptFormat
    from loadstar.engine.generation.requests import GenerationRequest
    from loadstar.engine.models.loader_api import CancelToken, LoadedModel, LoadedModelInfo, Loader, StreamPiece
    from loadstar.engine.plugins.extension_api import ReplyDraft, RequestDraft, UIContribution
    from loadstar.engine.settings import Settings
    from loadstar.engine.tools import Tool

PROJECT_NAME = "loadstar"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(historic=True)
def configure(settings: Settings) -> None:
    """Receive the app's settings once, before any other hook is called on this plugin.

    Historic: every registered plugin gets it, switched on or not, and a plugin registered later
    gets the same call on arrival (pluggy replays it), so do no work here beyond keeping what you
    need. Keep files under ``settings.data_dir / "extensions" / <your name>``.
    """


@hookspec
def register_loaders(register: Callable[[Loader], None]) -> None:
    """Make model loaders known by calling ``register(loader)`` once per loader.

    ``loader`` follows the ``loadstar.Loader`` protocol: a unique ``name``, an ``Options``
    pydantic model, ``availability()``, ``assess(folder)`` and ``load(folder, options)``, which
    returns a ``loadstar.LoadedModel``.
    Keep heavy imports (torch, CUDA libraries) inside those methods, never at module level.
    A plugin that raises here is reported and skipped; the other plugins still register.
    """


@hookspec
def modify_request(request: RequestDraft) -> None:
    """Change a request before it is rendered and generated: user text, history, parameters, stops.

    Edit ``request`` in place (``request.messages``, ``request.user_text``, ``request.params``,
    ``request.stop``); every extension sees the edits of the ones called before it. Called on the
    engine's generation thread just before the request runs, for chat and raw completions alike.
    """


@hookspec(firstresult=True)
def render_prompt(
    messages: list[ChatMessage], chat_format: PromptFormat, special_tokens: Mapping[str, str],
    model: LoadedModelInfo, add_generation_prompt: bool,
) -> str | None:
    """Turn a chat into the prompt text; the first non-None result wins.

    Return None to leave it to the next extension and finally to the engine, which renders
    ``chat_format`` (the model's own template or the chosen named format) in a Jinja sandbox.
    ``add_generation_prompt`` is True: the prompt ends where the assistant's turn begins. When a
    reply is being continued, ``messages`` stop before it and the engine appends its text.
    """


@hookspec(firstresult=True)
def generate(
    request: GenerationRequest, prompt: str, model: LoadedModel, cancel: CancelToken,
    emit: Callable[[StreamPiece], None], seed: int,
) -> bool | None:
    """Produce the reply instead of the loaded model; the first implementation returning True wins.

    Call ``emit(StreamPiece(text, tokens))`` for each piece as it comes and check
    ``cancel.cancelled`` between pieces; return True when you handled the request, None to let
    the model generate. Stop strings, the queue and the finished event stay the engine's work.
    Called on the model's lane thread in the server. ``model`` is the loader's own object for a
    model served in this process (``runs_in_worker = False``, ``--in-process-models``; its engine
    core may be stepping it on another thread: use only what is safe there, as the remote
    engine's HTTP client does), else the client of its worker, whose ``stream`` runs a sequence
    in the model's batch.
    """


@hookspec
def modify_reply(reply: ReplyDraft) -> None:
    """Change a finished reply in place (``reply.text``) before it is stored and returned.

    Streamed pieces have already been shown as they came; the UI and the API's final result show
    the changed text. Called for every finished generation that produced text, cancelled included.
    """


@hookspec
def webui_contribution(register: Callable[[UIContribution], None]) -> None:
    """Add to the web UI by calling ``register(UIContribution(title, build, placement))``.

    Called by ``webui/`` only, once when the page is built, for every discovered extension;
    the contribution is shown while its extension is enabled. ``build(context)`` runs inside a
    Gradio Blocks context and may import Gradio; the engine never does.
    """


@hookspec
def register_tools(register: Callable[[Tool], None], report: Callable[[str], None]) -> None:
    """Offer tools the chat may let a model call: ``register(Tool(name, description, run, parameters))``.

    ``run(arguments)`` gets arguments already checked against ``parameters`` (a JSON schema of an
    object) and returns text; the user approves each call before it runs. Call ``report(line)``
    for a source of tools that cannot be used now (a server that does not answer), in one line
    the chat shows. Called once per set of enabled plugins, when the chat first needs tools.
    """


@hookspec
def register_characters(register: Callable[[Character], None]) -> None:
    """Offer characters for the chat: ``register(Character(name=..., greeting=..., context=...))``.

    They are listed beside the user's own, read-only, with ids ``<plugin>:<name>``; the API finds
    them by name too. Called each time the list is shown, for the enabled plugins.
    """


@hookspec
def shutdown() -> None:
    """The engine is closing: stop your threads, end child processes, close connections.

    Called once, for every plugin (enabled or not), when the server stops.
    """
