"""What the engine needs from a Hugging Face tokenizer to render prompts: template and special tokens.

``TokenizerPrompts`` gives a loaded model with a ``tokenizer`` attribute the ``LoadedModel``
members that come from it (chat_template, special_tokens, encode, count_tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loadstar import LoadedModel

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TokenizerPrompts(LoadedModel):
    """A LoadedModel whose template, special tokens and token counts come from a Hugging Face tokenizer."""

    tokenizer: Any

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template (from chat_template.jinja, tokenizer_config.json or GGUF), if any."""
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) and template.strip() else None

    @chat_template.setter
    def chat_template(self, value: str | None) -> None:  # the base class's attribute: writable here too
        self.tokenizer.chat_template = value

    @property
    def special_tokens(self) -> Mapping[str, str]:
        tokens = {name: getattr(self.tokenizer, name, None) for name in SPECIAL_TOKEN_NAMES}
        return {name: str(token) for name, token in tokens.items() if token}

    @special_tokens.setter
    def special_tokens(self, value: Mapping[str, str]) -> None:
        for name, text in value.items():
            setattr(self.tokenizer, name, text)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt. Chat templates write the BOS token themselves; add it only when missing."""
        bos = getattr(self.tokenizer, "bos_token", None)
        return self.tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))
