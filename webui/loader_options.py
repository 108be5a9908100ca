"""Loader options in the Model tab, drawn from each loader's typed ``Options`` model.

One group of controls per loader (a ``Literal`` is a dropdown, a bool a checkbox, a number a
number box, anything else a text box), each with the field's description; only the group of
the loader that would load the picked model shows. Values equal to the field's default are not
sent, so the loader's own defaults (and their later improvements) keep applying.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import gradio as gr

# Set by Loadstar itself (derived files) or by a control of their own (the .pt opt-in).
HIDDEN = frozenset({"scratch_dir", "allow_pt"})


@dataclass
class LoaderGroup:
    loader: str
    group: Any
    fields: list[str] = field(default_factory=list)
    defaults: list[Any] = field(default_factory=list)
    components: list[Any] = field(default_factory=list)


@dataclass
class LoaderOptionsPanel:
    groups: list[LoaderGroup]

    @property
    def components(self) -> list[Any]:
        return [c for g in self.groups for c in g.components]

    def options(self, loader: str | None, values: tuple[Any, ...] | list[Any]) -> dict[str, Any]:
        """The picked loader's options that differ from their defaults, from all controls' values."""
        remaining = list(values)
        chosen: dict[str, Any] = {}
        for group in self.groups:
            mine, remaining = remaining[: len(group.components)], remaining[len(group.components):]
            if group.loader != loader:
                continue
            for name, default, value in zip(group.fields, group.defaults, mine, strict=False):
                value = _from_control(value, default)
                if value != default:
                    chosen[name] = value
        return chosen

    def show(self, loader: str | None, saved: Mapping[str, Any] | None) -> list[Any]:
        """Updates: the picked loader's group visible and filled from what the model was loaded with
        last time (else the defaults), every other group hidden."""
        updates: list[Any] = []
        for group in self.groups:
            updates.append(gr.update(visible=group.loader == loader and bool(group.components)))
        for group in self.groups:
            for name, default, component in zip(group.fields, group.defaults, group.components, strict=False):
                value = (saved or {}).get(name, default) if group.loader == loader else default
                updates.append(gr.update(value=_to_control(value, component)))
        return updates

    @property
    def show_outputs(self) -> list[Any]:
        return [g.group for g in self.groups] + self.components


def build_loader_options(loaders: Mapping[str, Any]) -> LoaderOptionsPanel:
    """The controls (call inside the Model tab's layout)."""
    groups = []
    for name, plugin in loaders.items():
        with gr.Group(visible=False, elem_id=f"options-{_slug(name)}") as container:
            group = LoaderGroup(name, container)
            for field_name, info in plugin.Options.model_fields.items():
                if field_name in HIDDEN:
                    continue
                group.fields.append(field_name)
                group.defaults.append(info.default)
                group.components.append(_control(name, field_name, info))
        groups.append(group)
    return LoaderOptionsPanel(groups)


def _control(loader: str, name: str, info: Any) -> Any:
    kind, choices = _kind(info.annotation)
    label = f"{info.title} ({name})" if info.title else name  # the words, and the name the API and files use
    common = {"label": label, "info": info.description, "elem_id": f"option-{_slug(loader)}-{name}"}
    if kind == "choice":
        return gr.Dropdown(choices=[str(c) for c in choices], value=str(info.default), **common)
    if kind == "bool":
        return gr.Checkbox(value=bool(info.default), **common)
    if kind in ("int", "float"):
        return gr.Number(value=info.default, precision=0 if kind == "int" else None, **common)
    return gr.Textbox(value="" if info.default is None else str(info.default), **common)


def _kind(annotation: Any) -> tuple[str, tuple[Any, ...]]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return "choice", typing.get_args(annotation)
    if annotation is bool:
        return "bool", ()
    if annotation is int:
        return "int", ()
    if annotation is float:
        return "float", ()
    return "text", ()


def _from_control(value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if value == "" and default is None:
        return None
    if isinstance(value, float) and value.is_integer() and default is None:
        return int(value)
    return value


def _to_control(value: Any, component: Any) -> Any:
    if isinstance(component, gr.Dropdown):
        return str(value)
    return "" if value is None and isinstance(component, gr.Textbox) else value


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
