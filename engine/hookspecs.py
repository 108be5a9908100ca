"""The hooks a Loadstar plugin can implement.

A plugin is a module (or object) with functions marked ``@hookimpl``, made known through the
``loadstar`` entry-point group in its package's ``pyproject.toml``::

    [project.entry-points.loadstar]
    my_plugin = "my_package.plugin_module"

Hooks are always called with keyword arguments, so an implementation may accept only the
arguments it needs; new arguments can be added to a hook without breaking existing plugins.
The built-in loaders are ordinary plugins registered exactly this way (see ``pyproject.toml``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy

if TYPE_CHECKING:
    from engine.loader_api import Loader

PROJECT_NAME = "loadstar"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_loaders(register: Callable[["Loader"], None]) -> None:
    """Make model loaders known by calling ``register(loader)`` once per loader.

    ``loader`` follows the ``engine.loader_api.Loader`` protocol: a unique ``name``, an
    ``Options`` pydantic model, ``availability()``, ``assess(folder)`` and ``load(folder, options)``.
    Keep heavy imports (torch, CUDA libraries) inside those methods, never at module level.
    A plugin that raises here is reported and skipped; the other plugins still register.
    """
