"""Prompt formats: exact strings for each named format, the choice between them, the sandbox."""

import pytest

from engine.chat import ChatMessage
from engine.errors import BadRequestError
from engine.template_sandbox import TemplateRenderer
from engine.prompt_formats import (
    COMPLETION, DEFAULT_SYSTEM_MESSAGE, NAMED_FORMATS, choose_format, guess_format, own_format, render,
)

TOKENS = {"bos_token": "<s>", "eos_token": "</s>"}
RENDERER = TemplateRenderer()  # one child process for this module

CHAT = [
    ChatMessage(role="user", content="Hi"),
    ChatMessage(role="assistant", content="Hello!"),
    ChatMessage(role="user", content="Capital of France?"),
]
SYSTEM = ChatMessage(role="system", content="Be brief.")


def text(name, messages, **kwargs):
    return render(NAMED_FORMATS[name], messages, TOKENS, renderer=RENDERER, **kwargs).text


def test_zephyr():
    assert text("Zephyr", [SYSTEM, *CHAT]) == (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
        "<|user|>\nCapital of France?</s>\n<|assistant|>\n"
    )


def test_chatml_with_a_system_message():
    assert text("ChatML", [SYSTEM, *CHAT]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("system", [None, "", "   "])
def test_chatml_with_an_empty_system_message_gets_the_default_and_says_so(system):
    messages = CHAT if system is None else [ChatMessage(role="system", content=system), *CHAT]
    rendered = render(NAMED_FORMATS["ChatML"], messages, TOKENS, renderer=RENDERER)
    assert rendered.text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\nHi")
    assert rendered.system_supplied == DEFAULT_SYSTEM_MESSAGE
    assert rendered.notice == f'ChatML needs a system message: used "{DEFAULT_SYSTEM_MESSAGE}"'


def test_a_model_template_that_refuses_an_empty_system_message_gets_the_default():
    template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('System Prompt must not be empty!') }}"
                "{% endif %}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    rendered = render(own_format(template, "tokenizer_config.json"), CHAT[:1], TOKENS, renderer=RENDERER)
    assert rendered.text == f"[system] {DEFAULT_SYSTEM_MESSAGE}\n[user] Hi\n" and rendered.system_supplied


def test_a_template_refusal_not_about_the_system_message_is_a_clear_error():
    template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(BadRequestError, match="refused this conversation: Conversation roles must alternate"):
        render(own_format(template, None), CHAT, TOKENS, renderer=RENDERER)


def test_vicuna_v1_1():
    assert text("Vicuna v1.1", CHAT) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: Hi ASSISTANT: Hello!</s> "
        "USER: Capital of France? ASSISTANT:"
    )
    assert text("Vicuna v1.1", [SYSTEM, *CHAT[:1]]) == "Be brief. USER: Hi ASSISTANT:"


def test_llama_2_chat():
    assert text("Llama-2 chat", [SYSTEM, *CHAT]) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Capital of France? [/INST]"
    )
    assert text("Llama-2 chat", CHAT[:1]) == "<s>[INST] Hi [/INST]"


def test_alpaca():
    assert text("Alpaca", CHAT[:1]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nHi\n\n### Response:\n"
    )


def test_completion_is_the_text_as_it_is():
    assert text("Completion", [ChatMessage(role="user", content="Once upon a time")]) == "Once upon a time"
    assert text("Completion", CHAT) == "Hi\nHello!\nCapital of France?"


def card(tmp_path, name, readme=None):
    folder = tmp_path / name
    folder.mkdir()
    if readme is not None:
        (folder / "README.md").write_text(readme)
    return folder


def test_llama_2_base_gets_plain_completion(tmp_path):
    folder = card(tmp_path, "Llama-2-7B-GPTQ", "# Llama 2 7B - GPTQ\n## Prompt template: None\n\n```\n{prompt}\n```\n\n## Files\n[INST] appears later\n")
    chosen = choose_format(own_template=None, own_source=None, folder=folder)
    assert chosen.format is COMPLETION and "no prompt template" in chosen.why


@pytest.mark.parametrize(("name", "readme", "expected"), [
    ("Wizard-Vicuna-13B-GPTQ", "## Prompt template: Vicuna\n\n```\nA chat. USER: {prompt} ASSISTANT:\n```\n", "Vicuna v1.1"),
    ("OpenHermes-2.5-GPTQ", "## Prompt template: ChatML\n\n```\n<|im_start|>system\n{system_message}<|im_end|>\n```\n", "ChatML"),
    ("zephyr-7B-beta-GPTQ", None, "Zephyr"),
    ("Llama-2-13B-chat-GPTQ", "## Prompt template: Llama-2-Chat\n\n```\n[INST] <<SYS>>\n```\n", "Llama-2 chat"),
    ("some-model", "## Prompt template: Alpaca\n\n```\n### Instruction:\n{prompt}\n### Response:\n```\n", "Alpaca"),
])
def test_named_formats_are_guessed_from_the_card_or_the_name(tmp_path, name, readme, expected):
    chosen = guess_format(card(tmp_path, name, readme))
    assert chosen is not None and chosen.format.name == expected


def test_own_template_wins_and_a_pin_wins_over_it(tmp_path):
    folder = card(tmp_path, "zephyr-like", "## Prompt template: Zephyr\n<|assistant|>\n")
    own = choose_format(own_template="{{ messages[0].content }}", own_source="chat_template.jinja", folder=folder)
    assert own.own_template and "chat_template.jinja" in own.why
    pinned = choose_format(own_template="x", own_source=None, folder=folder, pinned="ChatML")
    assert pinned.format.name == "ChatML"
    with pytest.raises(BadRequestError, match="unknown prompt format 'Nope'"):
        choose_format(own_template=None, own_source=None, folder=folder, pinned="Nope")


def test_templates_run_in_a_sandbox():
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(BadRequestError, match="could not be rendered"):
        render(own_format(evil, None), CHAT, TOKENS, renderer=RENDERER)
    mutate = "{% set x = messages.append(1) %}{{ messages|length }}"
    with pytest.raises(BadRequestError, match="could not be rendered"):
        render(own_format(mutate, None), CHAT, TOKENS, renderer=RENDERER)
