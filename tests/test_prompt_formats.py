"""Prompt formats: exact strings for each named format, the choice between them, the sandbox."""

import pytest

from loadstar.engine.chat.format_detection import choose_format, guess_format
from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.chat.prompt_formats import (
    COMPLETION,
    DEFAULT_SYSTEM_MESSAGE,
    NAMED_FORMATS,
    own_format,
    render,
)
from loadstar.engine.chat.template_sandbox import TemplateRenderer
from loadstar.engine.errors import BadRequestError

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
    assert chosen.format is COMPLETION and "says the model has no chat format" in chosen.why and chosen.known


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


# -- detection on TheBloke-style cards (issue: the format of a chat model must be found) -----------

from loadstar.engine.chat.format_detection import NO_FORMAT_NOTICE, format_from_card  # noqa: E402
from tests.thebloke_cards import thebloke_card, yaml_quoted  # noqa: E402


@pytest.mark.parametrize("plain_text", [False, True], ids=["markdown", "plain-text"])
@pytest.mark.parametrize("front_matter", [True, False], ids=["front-matter", "no-front-matter"])
@pytest.mark.parametrize(("template", "expected"), [
    ("ChatML", "ChatML"), ("Vicuna", "Vicuna v1.1"), ("None", "Completion"),
])
def test_thebloke_cards_name_their_format_in_every_form(plain_text, front_matter, template, expected):
    card_text = thebloke_card("CausalLM-7B", "CausalLM", template, plain_text=plain_text,
                              front_matter_template=front_matter)
    chosen = format_from_card(card_text)
    assert chosen is not None and chosen.format.name == expected
    assert f'"Prompt template: {template}" line' in chosen.why


def test_the_old_section_parser_missed_the_plain_text_card():
    """The plain text form has no heading after the template line: the format must still be found."""
    card_text = thebloke_card("CausalLM-7B", "CausalLM", "ChatML", plain_text=True, front_matter_template=False)
    assert "\n#" not in card_text.split("Prompt template: ChatML", 1)[1]
    assert format_from_card(card_text).format.name == "ChatML"


def test_a_card_block_that_matches_no_named_format_becomes_a_format(tmp_path):
    folder = card(tmp_path, "Orca-Mini-GPTQ", thebloke_card("Orca-Mini", "psmathur", "Orca-Hashes"))
    chosen = choose_format(own_template=None, own_source=None, folder=folder)
    assert chosen.format.name == "card: Orca-Hashes" and chosen.known
    chat = [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hello."),
            ChatMessage(role="user", content="Bye")]
    text = render(chosen.format, chat, TOKENS, renderer=RENDERER).text
    assert text == (f"### System:\n{DEFAULT_SYSTEM_MESSAGE}\n\n### User:\nHi\n\n### Assistant:\nHello.\n"
                    "\n### User:\nBye\n\n### Assistant:\n")
    assert chosen.format.stop == ("### User:",)


def test_card_text_is_never_run_as_a_template():
    hostile = "## Prompt template: Custom\n\n```\n{{ ''.__class__ }} {prompt}\n```\n"
    assert format_from_card(hostile) is None  # the block holds Jinja syntax: not turned into a format


def test_special_tokens_name_the_format_when_nothing_else_does(tmp_path):
    folder = card(tmp_path, "CausalLM-7B-GPTQ")
    (folder / "tokenizer_config.json").write_text(
        '{"added_tokens_decoder": {"1": {"content": "<|im_start|>", "special": true},'
        ' "2": {"content": "<|im_end|>", "special": true}}, "eos_token": "<|im_end|>"}'
    )
    chosen = choose_format(own_template=None, own_source=None, folder=folder)
    assert chosen.format.name == "ChatML" and chosen.source == "tokens"
    assert "tokenizer's special tokens" in chosen.why


def test_the_card_comes_before_the_tokens_and_the_tokens_before_the_name(tmp_path):
    folder = card(tmp_path, "vicuna-7B-GPTQ", thebloke_card("X", "Y", "ChatML"))
    (folder / "tokenizer.json").write_text('{"added_tokens": [{"content": "[INST]"}, {"content": "[/INST]"}]}')
    assert choose_format(own_template=None, own_source=None, folder=folder).format.name == "ChatML"
    (folder / "README.md").unlink()
    assert choose_format(own_template=None, own_source=None, folder=folder).format.name == "Llama-2 chat"
    (folder / "tokenizer.json").unlink()
    assert choose_format(own_template=None, own_source=None, folder=folder).format.name == "Vicuna v1.1"


def test_no_format_known_is_said_not_silent(tmp_path):
    chosen = choose_format(own_template=None, own_source=None, folder=card(tmp_path, "mystery-7B"))
    assert not chosen.known and chosen.format is COMPLETION and NO_FORMAT_NOTICE in chosen.why


def test_the_front_matter_template_is_used_when_the_card_has_no_template_line():
    card_text = f"---\nmodel_name: X\nprompt_template: '{yaml_quoted(TEMPLATES_FOR_TEST)}'\n---\n# X\nNo template line.\n"
    chosen = format_from_card(card_text)
    assert chosen.format.name == "the card's template" and "prompt_template (front matter)" in chosen.why
    text = render(chosen.format, [ChatMessage(role="user", content="Hi")], TOKENS, renderer=RENDERER).text
    assert text == f"### System:\n{DEFAULT_SYSTEM_MESSAGE}\n### User:\nHi\n### Assistant:\n"


TEMPLATES_FOR_TEST = "### System:\n{system_message}\n### User:\n{prompt}\n### Assistant:\n"


def test_a_tool_call_in_the_history_renders_as_plain_text_not_html():
    """Jinja's own tojson returns Markup, which HTML-escaped the text added to it: a Hermes-style
    template showed the model ``&lt;tool_call&gt;`` and ``&#34;`` and the model copied them."""
    from pathlib import Path

    from loadstar.engine.chat.prompt_formats import PromptFormat
    from loadstar.engine.chat.tool_calls import ToolCall

    template = (Path(__file__).parent / "data" / "chatml_tools.jinja").read_text()
    call = ToolCall("call_1", "lookup", '{"city": "Zürich"}')
    messages = [ChatMessage(role="user", content="Weather?"), ChatMessage(role="assistant", content="", tool_calls=(call,)),
                ChatMessage(role="tool", content="Sunny <b>", tool_call_id="call_1")]
    tool = {"type": "function", "function": {"name": "lookup", "description": "A & B", "parameters": {"type": "object"}}}
    prompt = render(PromptFormat(name="tools", template=template), messages, TOKENS, renderer=RENDERER,
                    tools=[tool]).text
    assert '<tool_call>\n{"name": "lookup", "arguments": {"city": "Zürich"}}\n</tool_call>' in prompt
    assert '"description": "A & B"' in prompt and "Sunny <b>" in prompt
    assert "&lt;" not in prompt and "&#34;" not in prompt and "&amp;" not in prompt
