"""Sampling parameters: defined once, with limits and descriptions, and rendered by every face.

The web UI builds its controls from these field definitions (``parameter_specs``) rather than
repeating the numbers, and the API validates against the same model.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**32 - 1


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature == 0`` means greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(
        0.7, ge=0.0, le=5.0, description="Randomness; 0 picks the most likely token every time (greedy)."
    )
    top_p: float = Field(
        0.9, ge=0.0, le=1.0, description="Sample only from the smallest set of tokens whose probability adds up to this."
    )
    top_k: int = Field(40, ge=0, le=1000, description="Sample only from the k most likely tokens; 0 turns this off.")
    max_new_tokens: int = Field(512, ge=1, le=32768, description="Stop after this many new tokens.")
    seed: int = Field(-1, ge=-1, le=SEED_MAX, description="Random seed; -1 picks a new one for each reply (it is shown).")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class ParameterSpec:
    """What a UI needs to draw one control for a sampling parameter."""

    name: str
    label: str
    kind: type
    default: float | int
    minimum: float | int
    maximum: float | int
    step: float | int
    description: str


def parameter_specs() -> list[ParameterSpec]:
    """One ``ParameterSpec`` per field of ``SamplingParams``, read from the field definitions."""
    specs = []
    for name, field in SamplingParams.model_fields.items():
        lower = next(m.ge for m in field.metadata if hasattr(m, "ge"))
        upper = next(m.le for m in field.metadata if hasattr(m, "le"))
        kind = field.annotation
        specs.append(
            ParameterSpec(
                name=name,
                label=name.replace("_", " "),
                kind=kind,
                default=field.default,
                minimum=lower,
                maximum=upper,
                step=0.01 if kind is float else 1,
                description=field.description or "",
            )
        )
    return specs
