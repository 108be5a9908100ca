"""Chat messages: the one shape used by the engine, the UI and the API."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    content: str = Field(description="Plain text of the message.")

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}
