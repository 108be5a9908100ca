"""Sampling parameters: defined once, with limits and descriptions, and rendered by every face.

The web UI builds its controls from these field definitions (``parameter_specs``) rather than
repeating the numbers, presets are validated against them, and the API builds the same model.
Every field's default is its "off" value, except the three that shape ordinary sampling
(temperature, top_p, top_k), so a preset or a loader can tell which fields were changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SEED_MAX = 2**32 - 1
CONTEXT_MAX = 1_048_576


MIN_TEMPERATURE = 1e-3


class SamplingParams(BaseModel):
    """How to pick tokens. ``temperature == 0`` means greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(
        0.7, ge=0.0, le=5.0,
        description=f"Randomness; 0 (or below {MIN_TEMPERATURE}) picks the most likely token every time (greedy).",
    )
    top_p: float = Field(
        0.9, ge=0.0, le=1.0, description="Sample only from the smallest set of tokens whose probability adds up to this."
    )
    top_k: int = Field(40, ge=0, le=1000, description="Sample only from the k most likely tokens; 0 turns this off.")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, description="Drop tokens less likely than this fraction of the most likely one; 0 = off."
    )
    typical_p: float = Field(
        1.0, ge=0.0, le=1.0, description="Locally typical sampling: keep tokens close to the expected surprise; 1 = off."
    )
    repetition_penalty: float = Field(
        1.0, ge=1.0, le=3.0, description="Make tokens already in the prompt or reply less likely; 1 = off."
    )
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtract this from every token already generated once or more; 0 = off."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="Subtract this times the count of each token already generated; 0 = off."
    )
    no_repeat_ngram_size: int = Field(
        0, ge=0, le=20, description="Never repeat a sequence of this many tokens; 0 = off."
    )
    max_new_tokens: int = Field(512, ge=1, le=32768, description="Stop after this many new tokens.")
    seed: int = Field(-1, ge=-1, le=SEED_MAX, description="Random seed; -1 picks a new one for each reply (it is shown).")
    ban_eos: bool = Field(False, description="Never end on the end-of-sequence token: always write max new tokens.")
    skip_special_tokens: bool = Field(True, description="Leave special tokens (like </s>) out of the reply text.")
    truncation_length: int = Field(
        0, ge=0, le=CONTEXT_MAX,
        description="Context length: the prompt is cut from the start to fit it with max new tokens; 0 = the model's.",
    )

    @property
    def greedy(self) -> bool:
        # Dividing logits by a temperature near 0 overflows to inf/nan: such values mean greedy.
        return self.temperature < MIN_TEMPERATURE

    def changed(self) -> dict[str, Any]:
        """The fields that differ from their defaults (what a preset stores, what a loader must honour)."""
        defaults = SamplingParams()
        return {name: value for name, value in self if value != getattr(defaults, name)}


# Fields that only steer random sampling: with temperature 0 they change nothing, so a loader
# that decodes greedily is not "ignoring" them.
SAMPLING_ONLY = frozenset({"top_p", "top_k", "min_p", "typical_p", "seed"})
ALL_PARAMS = frozenset(SamplingParams.model_fields)


def ignored_params(params: SamplingParams, supported: frozenset[str]) -> list[str]:
    """The changed fields of ``params`` that a model supporting ``supported`` would not honour."""
    changed = params.changed()
    if params.greedy:
        changed = {name: value for name, value in changed.items() if name not in SAMPLING_ONLY}
    return sorted(name for name in changed if name not in supported)


def prompt_budget(params: SamplingParams, context_length: int | None) -> int | None:
    """How many prompt tokens fit: the context (``truncation_length``, else the model's) less the reply.

    None when the context length is unknown. Never below 1, so a prompt is cut, not refused.
    """
    context = params.truncation_length or context_length
    if not context:
        return None
    return max(1, context - params.max_new_tokens)


@dataclass(frozen=True)
class ParameterSpec:
    """What a UI needs to draw one control for a sampling parameter."""

    name: str
    label: str
    kind: type
    default: float | int | bool
    minimum: float | int | None
    maximum: float | int | None
    step: float | int | None
    description: str


def parameter_specs() -> list[ParameterSpec]:
    """One ``ParameterSpec`` per field of ``SamplingParams``, read from the field definitions."""
    specs = []
    for name, field in SamplingParams.model_fields.items():
        kind = field.annotation
        lower = next((m.ge for m in field.metadata if hasattr(m, "ge")), None)
        upper = next((m.le for m in field.metadata if hasattr(m, "le")), None)
        specs.append(
            ParameterSpec(
                name=name,
                label=name.replace("_", " "),
                kind=kind if isinstance(kind, type) else str,
                default=field.default,
                minimum=lower,
                maximum=upper,
                step=None if kind is bool else 0.01 if kind is float else 1,
                description=field.description or "",
            )
        )
    return specs
