"""Chat messages: the one shape used by the engine, the UI and the API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.errors import BadRequestError

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str = Field(description="Plain text of the message.")

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return check_text(value, ValueError)

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def check_text(text: str, error: type[Exception] = BadRequestError) -> str:
    """``text`` if it can be encoded (a lone surrogate such as ``\\ud800`` cannot, and would break a tokenizer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error("the text is not valid Unicode (it holds a lone surrogate)") from None
    return text
