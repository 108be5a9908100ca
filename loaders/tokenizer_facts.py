"""What the engine needs from a Hugging Face tokenizer to render prompts: template and special tokens."""

from __future__ import annotations

from typing import Any

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def chat_template_of(tokenizer: Any) -> str | None:
    """The tokenizer's chat template (from chat_template.jinja, tokenizer_config.json or GGUF), if any."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template.strip() else None


def special_tokens_of(tokenizer: Any) -> dict[str, str]:
    tokens = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_NAMES}
    return {name: str(token) for name, token in tokens.items() if token}


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt. Chat templates write the BOS token themselves; add it only when missing."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
