"""Docs parity: every hook spec is documented in docs/PLUGINS.md with its exact signature."""

import inspect
from pathlib import Path

from loadstar.engine.plugins import hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "PLUGINS.md"


def hook_specs():
    return {name: fn for name, fn in vars(hookspecs).items()
            if inspect.isfunction(fn) and hasattr(fn, "loadstar_spec")}


def test_there_are_hooks():
    assert "register_loaders" in hook_specs()


def test_every_hook_is_documented_with_its_signature():
    text = DOCS.read_text()
    for name, fn in hook_specs().items():
        params = ", ".join(inspect.signature(fn).parameters)
        assert f"### `{name}({params})`" in text, f"{name}({params}) is missing from {DOCS.name}"
        assert fn.__doc__ and fn.__doc__.strip(), f"{name} has no docstring"


def test_readme_gives_the_two_setup_commands_and_ci_runs_the_test_one():
    root = DOCS.parent.parent
    readme = (root / "README.md").read_text()
    assert "make run " in readme and "make test " in readme
    assert "exec make test" in (root / ".ci" / "run").read_text()
