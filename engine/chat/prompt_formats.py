"""Prompt formats: how a conversation becomes the text a model continues.

The named formats TheBloke-style model cards use, and rendering. Which format a model gets is
worked out in ``engine.format_detection``.

Every template, the model's own included, renders in Jinja's immutable sandbox: a template is
data from the internet and must not reach Python objects.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.template_sandbox import TemplateRaised, TemplateRenderer
from loadstar.engine.errors import BadRequestError

DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
AUTO = "auto"


@dataclass(frozen=True)
class PromptFormat:
    name: str
    template: str  # Jinja, with the variables transformers gives chat templates
    default_system: str | None = None  # supplied when the conversation has no system message
    description: str = ""
    stop: tuple[str, ...] = ()  # where the model's turn ends when it writes the next turn itself


_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_ALPACA_SYSTEM = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

NAMED_FORMATS: dict[str, PromptFormat] = {
    f.name: f
    for f in (
        PromptFormat(
            "Vicuna v1.1",
            "{{ system }}"
            "{% for m in turns %}"
            "{% if m.role == 'user' %} USER: {{ m.content }}"
            "{% else %} ASSISTANT: {{ m.content }}{{ eos_token }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %} ASSISTANT:{% endif %}",
            default_system=_VICUNA_SYSTEM,
            description="USER: / ASSISTANT: turns after a system line (Vicuna, WizardLM 1.x, many merges).",
            stop=("USER:",),
        ),
        PromptFormat(
            "Llama-2 chat",
            "{% for m in turns %}"
            "{% if m.role == 'user' %}{{ bos_token }}[INST] "
            "{% if loop.first and system %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
            "{{ m.content }} [/INST]"
            "{% else %} {{ m.content }} {{ eos_token }}{% endif %}"
            "{% endfor %}",
            description="[INST] … [/INST] with an optional <<SYS>> block (Llama-2-chat and fine-tunes).",
            stop=("[INST]",),
        ),
        PromptFormat(
            "ChatML",
            "{% if not system %}{{ raise_exception('System Prompt must not be empty!') }}{% endif %}"
            "<|im_start|>system\n{{ system }}<|im_end|>\n"
            "{% for m in turns %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            description="<|im_start|>role … <|im_end|> (OpenHermes, Dolphin, Qwen); wants a system message.",
            stop=("<|im_end|>", "<|im_start|>"),
        ),
        PromptFormat(
            "Zephyr",
            "{% if system %}<|system|>\n{{ system }}{{ eos_token }}\n{% endif %}"
            "{% for m in turns %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
            description="<|user|> / <|assistant|> turns each ended by </s> (Zephyr, TinyLlama-chat).",
            stop=("<|user|>",),
        ),
        PromptFormat(
            "Alpaca",
            "{{ system }}"
            "{% for m in turns %}"
            "{% if m.role == 'user' %}{{ '\\n\\n### Instruction:\\n' }}{{ m.content }}"
            "{% else %}{{ '\\n\\n### Response:\\n' }}{{ m.content }}{% endif %}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '\\n\\n### Response:\\n' }}{% endif %}",
            default_system=_ALPACA_SYSTEM,
            description="### Instruction: / ### Response: sections (Alpaca and instruction-tuned models).",
            stop=("### Instruction:",),
        ),
        PromptFormat(
            "Completion",
            "{% if system %}{{ system }}\n\n{% endif %}"
            "{% for m in turns %}{{ m.content }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}",
            description="No chat format: the text as it is, for the model to continue (base models).",
        ),
    )
}
COMPLETION = NAMED_FORMATS["Completion"]


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    format_name: str
    system_supplied: str | None = None  # the default system message used, when one was needed

    @property
    def notice(self) -> str | None:
        if self.system_supplied is None:
            return None
        return f'{self.format_name} needs a system message: used "{self.system_supplied}"'


def own_format(template: str, source: str | None) -> PromptFormat:
    return PromptFormat("model's own", template, description=f"the chat template from {source or 'the tokenizer'}")


def render(
    fmt: PromptFormat,
    messages: Sequence[ChatMessage],
    special_tokens: Mapping[str, str],
    *,
    renderer: TemplateRenderer,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] = (),
) -> RenderedPrompt:
    """Render ``messages``; when the template refuses an empty system message, supply a default one.

    Named formats see ``system`` (the system message's text) and ``turns`` (the other messages);
    every template also sees ``messages`` and the model's special tokens, as in transformers.
    ``renderer`` bounds the time and memory a template may use (see engine.template_sandbox).
    """
    try:
        return RenderedPrompt(_render(fmt, messages, special_tokens, add_generation_prompt, renderer, tools), fmt.name)
    except TemplateRaised as refusal:
        has_system = any(m.role == "system" and m.content.strip() for m in messages)
        if has_system or "system" not in str(refusal).lower():
            raise BadRequestError(f"the {fmt.name} prompt format refused this conversation: {refusal}") from None
    default = fmt.default_system or DEFAULT_SYSTEM_MESSAGE
    with_system = [ChatMessage(role="system", content=default), *(m for m in messages if m.role != "system")]
    try:
        text = _render(fmt, with_system, special_tokens, add_generation_prompt, renderer, tools)
    except TemplateRaised as refusal:
        raise BadRequestError(f"the {fmt.name} prompt format refused this conversation: {refusal}") from None
    return RenderedPrompt(text, fmt.name, system_supplied=default)


def _render(
    fmt: PromptFormat, messages: Sequence[ChatMessage], special_tokens: Mapping[str, str], add_generation_prompt: bool,
    renderer: TemplateRenderer, tools: Sequence[Mapping[str, Any]] = (),
) -> str:
    messages = [m for m in messages if m.role != "system" or m.content.strip()]  # a blank system message is none
    systems = [m.content for m in messages if m.role == "system"]
    system = "\n".join(systems) if systems else (fmt.default_system or "")
    variables: dict[str, Any] = {
        "messages": [m.as_dict() for m in messages],
        "turns": [m.as_dict() for m in messages if m.role != "system"],
        "system": system,
        "add_generation_prompt": add_generation_prompt,
        "tools": [dict(tool) for tool in tools] or None,
        "documents": None,
        **{name: value for name, value in special_tokens.items() if isinstance(value, str)},
    }
    for name in ("bos_token", "eos_token"):
        variables.setdefault(name, "")
    return renderer.render(fmt.template, variables, fmt.name)
