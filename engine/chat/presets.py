"""Presets: named sets of sampling values, stored as YAML that lists only the values it changes.

Loadstar's own presets live in ``presets/`` (read-only); the user's are saved in
``<data dir>/presets/``. A preset is applied on top of the model's defaults, which come from its
``generation_config.json`` on top of ``SamplingParams``' own defaults. A model folder may also
name a default system message in ``loadstar.json`` (``{"system_message": "..."}``), used when a chat
has none; it is no more trusted than the chat template, which can inject a system message itself.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from loadstar.engine.atomic import login_folder_name, write_atomic
from loadstar.engine.errors import BadRequestError, problem_line
from loadstar.engine.sampling import SamplingParams

log = logging.getLogger(__name__)

BUILTIN_PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"  # the repository's presets/
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}$")
MAX_PRESET_BYTES = 64 * 1024
MODEL_DEFAULTS_FILE = "loadstar.json"
MAX_SYSTEM_MESSAGE_CHARS = 4000

# generation_config.json keys that map onto SamplingParams fields of the same meaning.
_GENERATION_CONFIG_KEYS = (
    "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "no_repeat_ngram_size",
    "max_new_tokens",
)


class PresetStore:
    def __init__(self, user_dir: Path, builtin_dir: Path = BUILTIN_PRESETS_DIR) -> None:
        self.user_dir = user_dir
        self.builtin_dir = builtin_dir

    def for_user(self, user: str | None) -> PresetStore:
        """The presets of one login (``user_dir/<login>/``); without logins, ``user_dir`` itself."""
        if user is None:
            return self
        return PresetStore(self.user_dir / login_folder_name(user), self.builtin_dir)

    def names(self) -> list[str]:
        """Built-in presets first, then the user's, each sorted."""
        return [*sorted(self._files(self.builtin_dir)), *sorted(self._files(self.user_dir))]

    def is_builtin(self, name: str) -> bool:
        return name in self._files(self.builtin_dir)

    def values(self, name: str) -> dict[str, Any]:
        """The values preset ``name`` changes, validated; a one-line error for a bad file."""
        path = self._files(self.builtin_dir).get(name) or self._files(self.user_dir).get(name)
        if path is None:
            raise BadRequestError(f"no preset named '{name}'")
        try:
            raw = path.read_bytes()
            if len(raw) > MAX_PRESET_BYTES:
                raise BadRequestError(f"preset '{name}' is larger than {MAX_PRESET_BYTES // 1024} KiB")
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as error:
            raise BadRequestError(f"preset '{name}' cannot be read: {str(error).splitlines()[0]}") from None
        return validated_values(data, f"preset '{name}'")

    def save(self, name: str, params: SamplingParams) -> Path:
        """Save the values of ``params`` that differ from the defaults, as ``<name>.yaml``."""
        name = (name or "").strip()
        if not _NAME.match(name):
            raise BadRequestError(
                "a preset name is 1 to 64 letters, digits, spaces or _ . + - and starts with a letter or digit"
            )
        if self.is_builtin(name):
            raise BadRequestError(f"'{name}' is a built-in preset: save under another name")
        header = f"# Loadstar preset '{name}': only the values it changes from the defaults.\n"
        body = yaml.safe_dump(params.changed(), sort_keys=True, allow_unicode=True)
        path = self.user_dir / f"{name}.yaml"
        write_atomic(path, (header + ("" if body.strip() == "{}" else body)).encode("utf-8"))
        return path

    def delete(self, name: str) -> None:
        if self.is_builtin(name):
            raise BadRequestError(f"'{name}' is a built-in preset and cannot be deleted")
        path = self._files(self.user_dir).get(name)
        if path is None:
            raise BadRequestError(f"no saved preset named '{name}'")
        path.unlink()

    @staticmethod
    def _files(folder: Path) -> dict[str, Path]:
        try:
            return {p.stem: p for p in folder.glob("*.yaml") if p.is_file() and _NAME.match(p.stem)}
        except OSError:
            return {}


def validated_values(data: Any, what: str) -> dict[str, Any]:
    """``data`` as SamplingParams values (only known fields, each within its limits)."""
    if not isinstance(data, dict):
        raise BadRequestError(f"{what} must be a mapping of parameter names to values")
    unknown = sorted(set(map(str, data)) - set(SamplingParams.model_fields))
    if unknown:
        raise BadRequestError(f"{what} has unknown parameters: {', '.join(unknown)}")
    try:
        SamplingParams.model_validate(data)
    except ValidationError as error:
        raise BadRequestError(f"{what}: {problem_line(error)}") from None
    return dict(data)


def generation_config_defaults(folder: Path) -> dict[str, Any]:
    """Sampling defaults from a model's ``generation_config.json``; values out of limits are skipped."""
    try:
        config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as error:
        log.warning("ignoring unreadable generation_config.json in %s: %s", folder, error)
        return {}
    if not isinstance(config, dict):
        return {}
    found = {key: config[key] for key in _GENERATION_CONFIG_KEYS if config.get(key) is not None}
    if config.get("do_sample") is False:
        found["temperature"] = 0.0  # the model's authors want greedy decoding
    defaults: dict[str, Any] = {}
    for key, value in found.items():
        try:
            SamplingParams.model_validate({key: value})
        except ValidationError:
            log.info("generation_config.json in %s: %s=%r is outside Loadstar's limits, ignored", folder, key, value)
            continue
        defaults[key] = value
    return defaults


def model_system_message(folder: Path) -> str | None:
    """The default system message a model folder names in ``loadstar.json``, if any (else None)."""
    try:
        data = json.loads((folder / MODEL_DEFAULTS_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as error:
        log.warning("ignoring unreadable %s in %s: %s", MODEL_DEFAULTS_FILE, folder, error)
        return None
    message = data.get("system_message") if isinstance(data, dict) else None
    if not isinstance(message, str) or not message.strip() or len(message) > MAX_SYSTEM_MESSAGE_CHARS:
        if message is not None:
            log.warning("ignoring %s in %s: system_message must be 1-%d characters of text",
                        MODEL_DEFAULTS_FILE, folder, MAX_SYSTEM_MESSAGE_CHARS)
        return None
    return message.strip()
