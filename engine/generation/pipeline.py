"""From a submitted request to the text the model continues, and from its output to the reply.

The scheduler calls this in the model's lane, with the model held:

1. ``prepare`` (``draft``, then ``complete`` with the prompt's token count): extensions change the
   request (``modify_request``); the chat is rendered (an extension's ``render_prompt``, else the
   chosen prompt format in a Jinja sandbox); parameters the model does not honour and a prompt
   cut to fit the context become notices for the user.
2. ``generate``: an extension may produce the reply itself (``generate``, first one wins).
3. ``finish``: extensions change the finished reply (``modify_reply``).

Without a plugin host (engine unit tests) only the rendering and the notices remain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from loadstar.engine.chat.format_detection import NO_FORMAT_NOTICE, ChosenFormat, choose_format
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.prompt_formats import render
from loadstar.engine.chat.template_sandbox import TemplateRenderer
from loadstar.engine.chat.tool_calls import ToolUse, template_takes_tools
from loadstar.engine.errors import BadRequestError, LoadstarError
from loadstar.engine.models.loader_api import CancelToken, LoadedModel, StreamPiece
from loadstar.engine.plugins.extension_api import ReplyDraft, RequestDraft
from loadstar.engine.plugins.host import PluginHost
from loadstar.engine.sampling import SamplingParams, ignored_params, prompt_budget

if TYPE_CHECKING:
    from loadstar.engine.generation.requests import GenerationRequest

FormatChooser = Callable[[LoadedModel], ChosenFormat]


@dataclass(frozen=True)
class PreparedRequest:
    prompt: str
    prompt_tokens: int
    params: SamplingParams
    stop: tuple[str, ...]
    messages: tuple[ChatMessage, ...]
    format_name: str | None  # None for raw prompts
    notices: tuple[str, ...] = field(default=())
    format_why: str | None = None  # how the format was found (the card, the tokenizer, ...)


@dataclass(frozen=True)
class DraftedRequest:
    """A request after the extensions and the rendering, before its prompt's tokens are counted."""

    prompt: str
    params: SamplingParams
    stop: tuple[str, ...]
    messages: tuple[ChatMessage, ...]
    format_name: str | None
    format_why: str | None


class ChatPrompt(NamedTuple):
    text: str
    format_name: str
    why: str  # how the format was found
    stop: tuple[str, ...]  # the format's own turn ends, added to the request's stop strings


def default_format(model: LoadedModel) -> ChosenFormat:
    """The model's own template, else plain completion (the engine adds named-format guessing)."""
    return choose_format(own_template=model.chat_template, own_source=None, folder=None)


class RequestPipeline:
    def __init__(
        self, plugins: PluginHost | None = None, choose: FormatChooser = default_format,
        renderer: TemplateRenderer | None = None,
    ) -> None:
        self._plugins = plugins
        self._choose = choose
        self.renderer = renderer or TemplateRenderer()

    def close(self) -> None:
        self.renderer.close()

    def prepare(self, model: LoadedModel, request: GenerationRequest, notices: list[str]) -> PreparedRequest:
        """The request as the model gets it: ``draft``, its prompt's tokens counted, ``complete``."""
        drafted = self.draft(model, request, notices)
        return self.complete(model, drafted, model.count_tokens(drafted.prompt), notices)

    def draft(self, model: LoadedModel, request: GenerationRequest, notices: list[str]) -> DraftedRequest:
        """Extensions' changes and the rendered prompt (the scheduler counts many drafts' tokens in one question)."""
        draft = RequestDraft(
            messages=list(request.messages), prompt=request.prompt, params=request.params,
            stop=list(request.stop), owner=request.owner, continue_last=request.continue_last,
        )
        if self._plugins is not None:
            self._plugins.modify_request(draft, notices)
        if draft.prompt is None and not draft.messages:
            raise BadRequestError("an extension left the request without messages or a prompt")
        params = SamplingParams.model_validate(draft.params.model_dump())
        if draft.prompt is not None:
            prompt, format_name, format_why, stop = draft.prompt, None, None, tuple(draft.stop)
        else:
            chat = self.render_chat(model, draft.messages, draft.continue_last, notices, request.tools)
            prompt, format_name, format_why = chat.text, chat.format_name, chat.why
            stop = tuple(dict.fromkeys((*draft.stop, *chat.stop)))
        return DraftedRequest(prompt, params, stop, tuple(draft.messages), format_name, format_why)

    def complete(
        self, model: LoadedModel, drafted: DraftedRequest, prompt_tokens: int, notices: list[str],
    ) -> PreparedRequest:
        """The prepared request, with the notices its parameters and its prompt's length call for."""
        params = drafted.params
        supported = model.supported_params
        ignored = ignored_params(params, supported)
        if ignored:
            notices.append(f"{model.info.loader} ignores {', '.join(ignored)}")
        budget = prompt_budget(params, model.info.context_length)
        if budget is not None and prompt_tokens > budget:
            notices.append(
                f"the prompt ({prompt_tokens} tokens) was cut to its last {budget} tokens to fit the context"
            )
        return PreparedRequest(
            drafted.prompt, prompt_tokens, params, drafted.stop, drafted.messages, drafted.format_name, tuple(notices),
            drafted.format_why,
        )

    def render_chat(
        self, model: LoadedModel, messages: list[ChatMessage], continue_last: bool, notices: list[str],
        tools: ToolUse = ToolUse(),
    ) -> ChatPrompt:
        """The prompt for a chat, its format's name and how that format was found; when continuing,
        the open assistant message is written after it. A chat for a model with no known format
        is sent as plain text with a notice saying so, never silently. Tools offered go into the
        prompt through the model's template; a template that does not take them is refused."""
        tail = ""
        if continue_last:
            if not messages or messages[-1].role != "assistant":
                raise BadRequestError("there is no reply to continue")
            tail, messages = messages[-1].content, messages[:-1]
        chosen = self._choose(model)
        if chosen.system_message and not any(m.role == "system" and m.content.strip() for m in messages):
            messages = [ChatMessage(role="system", content=chosen.system_message), *messages]
        special = dict(model.special_tokens)
        offered = tools.tools if tools.active else ()
        if offered and not template_takes_tools(chosen.format.template):
            raise BadRequestError(
                f"this model's prompt format ({chosen.format.name}) does not take tools: its chat template never "
                "reads them; use a model whose template does, or put a chat_template.jinja that does in its folder"
            )
        if self._plugins is not None and not offered:  # an extension's renderer knows nothing of tools
            answer = self._plugins.render_prompt(
                notices, messages=list(messages), chat_format=chosen.format, special_tokens=special,
                model=model.info, add_generation_prompt=True,
            )
            if answer is not None:
                return ChatPrompt(answer + tail, "an extension's", "rendered by an extension", chosen.format.stop)
        rendered = render(chosen.format, messages, special, renderer=self.renderer, add_generation_prompt=True,
                          tools=offered)
        if not chosen.known:
            notices.append(NO_FORMAT_NOTICE)
        if rendered.notice:
            notices.append(rendered.notice)
        return ChatPrompt(rendered.text + tail, chosen.format.name, chosen.why, chosen.format.stop)

    def generate(
        self, request: GenerationRequest, prompt: str, model: LoadedModel, cancel: CancelToken,
        emit: Callable[[StreamPiece], None], seed: int, notices: list[str],
    ) -> bool:
        if self._plugins is None:
            return False
        return self._plugins.generate(
            notices, request=request, prompt=prompt, model=model, cancel=cancel, emit=emit, seed=seed
        )

    def finish(self, reply: ReplyDraft, notices: list[str]) -> str:
        """The reply after the extensions' changes; on a one-line error, the reply as generated."""
        if self._plugins is None or not reply.text:
            return reply.text
        original = reply.text
        try:
            self._plugins.modify_reply(reply, notices)
        except LoadstarError as error:
            notices.append(f"the reply is shown unchanged: {error}")
            return original
        return reply.text
