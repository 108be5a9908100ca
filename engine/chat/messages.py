"""Chat messages: the one shape used by the engine, the UI and the API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, field_validator, model_serializer

from loadstar.engine.chat.attachments import Attachment
from loadstar.engine.chat.tool_calls import ToolCall
from loadstar.engine.errors import BadRequestError

Role = Literal["system", "user", "assistant", "tool"]  # "tool": a tool's answer (API clients only)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str = Field(description="Plain text of the message.")
    tool_calls: tuple[ToolCall, ...] = Field((), description="An assistant message's calls to tools.")
    tool_call_id: str | None = Field(None, description="The call a tool message answers.")
    attachments: tuple[Attachment, ...] = Field((), max_length=10, description="Files attached to a user message.")

    @field_validator("content")
    @classmethod
    def _unicode(cls, value: str) -> str:
        return check_text(value, ValueError)

    @model_serializer(mode="wrap")
    def _without_empty_tool_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Messages without tools or files store and show just role and content."""
        data = handler(self)
        if not self.tool_calls:
            data.pop("tool_calls", None)
        if self.tool_call_id is None:
            data.pop("tool_call_id", None)
        if not self.attachments:
            data.pop("attachments", None)
        return data

    @property
    def model_text(self) -> str:
        """What the model reads: the attached files (as sent), then the message's own text."""
        if not self.attachments:
            return self.content
        return "\n\n".join([*(a.for_model() for a in self.attachments), self.content])

    def as_dict(self) -> dict[str, Any]:
        """The message as chat templates see it."""
        shown: dict[str, Any] = {"role": self.role, "content": self.model_text}
        if self.tool_calls:
            shown["tool_calls"] = [call.as_template_dict() for call in self.tool_calls]
        if self.tool_call_id is not None:
            shown["tool_call_id"] = self.tool_call_id
        return shown


def check_text(text: str, error: type[Exception] = BadRequestError) -> str:
    """``text`` if it can be encoded (a lone surrogate such as ``\\ud800`` cannot, and would break a tokenizer)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error("the text is not valid Unicode (it holds a lone surrogate)") from None
    return text
