"""Docs parity: docs/PLUGINS.md states each hook's full signature and every public name as the
code declares them; docs/ARCHITECTURE.md names every part of the engine."""

import inspect
import re
from pathlib import Path

import loadstar
from loadstar import LoadedModel, Loader
from loadstar.engine.plugins import hookspecs

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "PLUGINS.md"


def hook_specs():
    return {name: fn for name, fn in vars(hookspecs).items()
            if inspect.isfunction(fn) and hasattr(fn, "loadstar_spec")}


def annotation_text(annotation: object) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return text.replace('"', "").replace("'", "")


def signature_of(fn, *, method: bool = False) -> str:
    """``name(a: A, *, b: B = default) -> R`` from the code (string annotations unquoted)."""
    signature = inspect.signature(fn)
    parts, starred = [], False
    for p in signature.parameters.values():
        if method and p.name == "self":
            continue
        if p.kind is p.KEYWORD_ONLY and not starred:
            parts.append("*")
            starred = True
        text = p.name + (f": {annotation_text(p.annotation)}" if annotation_text(p.annotation) else "")
        if p.default is not inspect.Parameter.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    returns = annotation_text(signature.return_annotation)
    return f"{fn.__name__}({', '.join(parts)})" + (f" -> {returns}" if returns else "")


def test_there_are_hooks():
    assert {"register_loaders", "configure", "generate"} <= set(hook_specs())


def test_every_hook_is_documented_with_its_full_signature():
    text = DOCS.read_text()
    for name, fn in hook_specs().items():
        signature = signature_of(fn)
        parameters = inspect.signature(fn).parameters.values()
        assert all(annotation_text(p.annotation) for p in parameters) and "->" in signature  # typed, not just names
        assert f"### `{signature}`" in text, f"{signature} is missing from {DOCS.name}"
        assert fn.__doc__ and fn.__doc__.strip(), f"{name} has no docstring"
    documented = re.findall(r"^### `(\w+)\(", text, re.M)
    assert sorted(documented) == sorted(hook_specs()), "a heading names a hook the code does not have"


def test_the_loaded_model_and_loader_contracts_are_documented_with_their_signatures():
    text = DOCS.read_text().replace("\\|", "|")  # a table cell escapes the union's bar
    for member in ("count_tokens", "stream", "stream_to", "open_batch", "embed", "unload"):
        signature = signature_of(getattr(LoadedModel, member), method=True)
        assert f"`{signature}`" in text, f"LoadedModel.{signature} is missing from {DOCS.name}"
    for member in ("availability", "assess", "load"):
        signature = signature_of(getattr(Loader, member), method=True)
        assert f"`{signature}" in text, f"Loader.{signature} is missing from {DOCS.name}"
    for attribute in ("chat_template", "special_tokens", "supported_params", "chat_rendered_by", "max_batch"):
        assert hasattr(LoadedModel, attribute) and f"`{attribute}`" in text


def test_every_public_name_is_documented():
    text = DOCS.read_text()
    blocks = re.findall(r"```.*?```", text, re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = " ".join([*blocks, *re.findall(r"`([^`]+)`", prose)])  # what the docs show as code
    missing = [name for name in loadstar.__all__ if not re.search(rf"\b{name}\b", spans)]
    assert not missing, f"public names not in {DOCS.name}: {missing}"
    assert sorted(set(loadstar.__all__)) == sorted(loadstar.__all__)  # listed once
    assert all(hasattr(loadstar, name) for name in loadstar.__all__)


def test_the_architecture_note_names_every_part_of_the_engine():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    parts = sorted(p.name for p in (ROOT / "engine").iterdir() if (p / "__init__.py").is_file())
    assert parts == ["chat", "generation", "hub", "models", "plugins"]
    for part in parts:
        assert f"engine/{part}/" in text


def test_readme_gives_the_two_setup_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make run " in readme and "make test " in readme
    assert "exec make test" in (ROOT / ".ci" / "run").read_text()


def test_the_readmes_attachment_limits_are_the_codes():
    from loadstar.engine.chat import attachments as a

    readme = (ROOT / "README.md").read_text()
    said = [f"up to {a.MAX_FILES} per message and\n  {a.MAX_FILE_BYTES // 2**20} MiB each",
            f"at most {a.READ_SECONDS:g} s and {a.READ_MEMORY // 2**30} GiB of memory",
            f"up to {a.MAX_PDF_PAGES:,} pages", f"up to {a.MAX_DOCX_UNPACKED // 2**20} MiB unpacked",
            f"{a.MAX_DOCX_XML // 2**20} MiB of XML in one part"]
    assert [s for s in said if s not in readme] == []
