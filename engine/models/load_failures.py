"""One line for each way a model load fails; the details go to the log.

Third-party loaders raise long, multi-paragraph errors (torch's ``weights_only`` refusal is four
paragraphs with colour codes and advises turning the protection off). The user gets the class of
failure and the file, in words; ``load_error`` logs the original, except a refused pickle's.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from loadstar.engine.errors import LoadstarError, ModelLoadError

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
_PICKLE_GLOBAL = re.compile(r"(?:GLOBAL|global)\s+([A-Za-z_][\w.]*)")
_SIZE_MISMATCH = re.compile(r"size mismatch for ([\w.]+)")
_ADVICE = re.compile(r"(?i)\b(re-?running|retry|please|check the documentation|you can|to fix)\b.*$")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def load_error(loader: str, name: str, error: BaseException, files: Sequence[str], folder: Path) -> ModelLoadError:
    """The one-line ``ModelLoadError`` to raise for a loader's failure, logged once. A refused pickle
    is the protection doing its work: one line in the log too (torch's refusal is four paragraphs
    that advise turning it off); any other failure keeps its traceback in the log."""
    reason = load_failure(error, files, folder)
    if _refused_pickle(error):
        log.warning("%s refused to load %s: %s", loader, name, reason)
    else:
        log.error("%s failed to load %s", loader, name, exc_info=error)
    return ModelLoadError(f"{loader} could not load {name}: {reason}")


def _refused_pickle(error: BaseException) -> bool:
    flat = " ".join(strip_ansi(str(error)).split())
    return type(error).__name__ == "UnpicklingError" or "weights_only" in flat or "Weights only load failed" in flat


def load_failure(error: BaseException, files: Sequence[str] = (), folder: Path | None = None) -> str:
    """The one-line reason a load failed (no traceback, no escape codes, no advice to disable safety).

    ``files`` are the weight files tried; with ``folder`` a refused pickle is scanned (never run)
    to name the code it would have called."""
    if isinstance(error, LoadstarError):
        return " ".join(strip_ansi(str(error)).split())
    text = strip_ansi(str(error))
    flat = " ".join(text.split())
    name = type(error).__name__
    pickled = _pickled_file(files)
    if _refused_pickle(error):
        found = _PICKLE_GLOBAL.search(flat)
        called = [found.group(1)] if found else []
        if not called and pickled and folder is not None:
            called = [g for g in pickle_globals(folder / pickled) if not g.startswith(_TENSOR_GLOBALS)][:2]
        code = f" ({', '.join(called)})" if called else ""
        return f"{pickled or 'the weights file'} contains pickled code{code}; refused: only tensors are loaded"
    if isinstance(error, MemoryError) or "can't allocate memory" in flat or "out of memory" in flat.lower():
        return "not enough memory to load the weights (free some RAM/VRAM, or pick a smaller quantization)"
    if "HeaderTooLarge" in flat or "InvalidHeader" in flat or "MetadataIncompleteBuffer" in flat:
        return f"{_first(files, '.safetensors') or 'a .safetensors file'} is damaged or not a safetensors file ({name})"
    mismatch = _SIZE_MISMATCH.search(flat)
    if mismatch:
        return f"the weights do not fit config.json (size mismatch for {mismatch.group(1)})"
    if isinstance(error, FileNotFoundError):
        return f"a file the model needs is missing: {getattr(error, 'filename', None) or flat}"
    if isinstance(error, UnicodeDecodeError) or name == "JSONDecodeError":
        return f"a configuration file is not valid JSON ({flat[:120]})"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = _ADVICE.sub("", first).strip() or first
    if len(first) > 240:
        first = first[:237] + "..."
    return f"{name}: {first}" if first else name


def _pickled_file(files: Sequence[str]) -> str | None:
    return next((f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))), None)


def _first(files: Sequence[str], suffix: str) -> str | None:
    return next((f for f in files if f.endswith(suffix)), None)


_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "numpy.", "_codecs.encode", "builtins.set")


def pickle_globals(path: Path, limit: int = 64 * 1024 * 1024) -> list[str]:
    """The ``module.name`` globals a pickle (or a torch zip's data.pkl) would import, read with
    pickletools: nothing is unpickled. Empty when the file cannot be scanned."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if member is None or archive.getinfo(member).file_size > limit:
                    return []
                data = archive.read(member)
        else:
            with path.open("rb") as handle:
                data = handle.read(limit)
        return list(dict.fromkeys(_globals(pickletools.genops(data))))
    except Exception:
        return []


def _globals(ops: Iterator) -> Iterator[str]:
    strings: list[str] = []
    for opcode, arg, _pos in ops:
        if opcode.name == "GLOBAL" and isinstance(arg, str):
            yield arg.replace(" ", ".")
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            yield f"{strings[-2]}.{strings[-1]}"
        if isinstance(arg, str) and opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
            strings.append(arg)
