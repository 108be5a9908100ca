"""Parameters panel handlers: presets (load, save, delete), the model's defaults, ignored parameters."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from loadstar.engine.errors import LoadstarError, problem_line
from loadstar.engine.facade import Engine
from loadstar.engine.sampling import SamplingParams, parameter_specs
from loadstar.webui.chat_handlers import sampling_from_values

MODEL_DEFAULTS = "(model defaults)"


class PresetHandlers:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def names(self, user: str | None) -> list[str]:
        return [MODEL_DEFAULTS, *self.engine.presets.for_user(user).names()]

    def load(self, user: str | None, name: str) -> tuple[list[Any], str]:
        """The control values for preset ``name`` (model defaults underneath), in spec order."""
        try:
            if name in (None, MODEL_DEFAULTS):
                params = self.engine.default_params()
            else:
                params = self.engine.preset_params(name, user)
        except LoadstarError as error:
            return [None] * len(parameter_specs()), f"⚠️ {error}"
        changed = ", ".join(f"{k}={v}" for k, v in sorted(params.changed().items())) or "nothing"
        return values_of(params), f"Loaded “{name}” (changes from Loadstar's defaults: {changed})."

    def save(self, user: str | None, name: str, params: tuple[Any, ...]) -> str:
        try:
            path = self.engine.presets.for_user(user).save(name, sampling_from_values(params))
        except (LoadstarError, ValidationError) as error:
            return f"⚠️ {problem_line(error)}"
        except OSError as error:
            return f"⚠️ could not save the preset: {error.strerror or error}"
        return f"Saved “{path.stem}”."

    def delete(self, user: str | None, name: str) -> str:
        if name in (None, MODEL_DEFAULTS):
            return "Pick a saved preset to delete."
        try:
            self.engine.presets.for_user(user).delete(name)
        except LoadstarError as error:
            return f"⚠️ {error}"
        return f"Deleted “{name}”."

    def labels(self) -> list[str]:
        """Each control's label, marked when the loaded model's loader ignores it."""
        supported, loader = self.engine.honoured_params()
        return [
            spec.label if spec.name in supported else f"{spec.label} (ignored by {loader})"
            for spec in parameter_specs()
        ]


def values_of(params: SamplingParams) -> list[Any]:
    return [getattr(params, spec.name) for spec in parameter_specs()]
