"""The shape the code keeps: one installed name, engine parts with no import circle in a fixed
order, a facade the UI and API use without reaching inside, plugins that import only loadstar."""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import distribution, packages_distributions
from pathlib import Path

from loadstar.engine.facade import Engine

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"engine": "loadstar.engine", "api": "loadstar.api", "webui": "loadstar.webui",
          "loaders": "loadstar.loaders", "extensions": "loadstar.extensions", "loadstar": "loadstar"}
# The engine's layers, lowest first: a module may import from its own layer and the ones below.
# generation/requests.py (the request and its events) sits below plugins: the hook
# specifications name GenerationRequest, and the plugin host must not import the service.
LAYERS = [
    {"errors", "atomic", "settings", "user_settings", "sampling", "metrics", "untrusted_json"},
    {"chat", "tools"},
    {"models"},
    {"generation.requests"},
    {"plugins"},
    {"generation"},
    {"hub"},
    {"facade"},
]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, TYPE_CHECKING blocks and function bodies included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def engine_modules() -> dict[str, Path]:
    modules = {}
    for path in (ROOT / "engine").rglob("*.py"):
        name = ".".join(("loadstar", *path.relative_to(ROOT).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = path
    return modules


def layer_of(module: str) -> int:
    inside = module.removeprefix("loadstar.engine.")
    for rank, layer in enumerate(LAYERS):
        if inside in layer or (inside.split(".")[0] in layer and inside != "generation.requests"):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def test_the_package_list_names_every_package_folder_under_loadstar():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for top in MAPPED for p in (ROOT / top).rglob("__init__.py")}
    expected = {MAPPED[f.split(".")[0]] + f[len(f.split(".")[0]):] for f in folders}
    assert set(config["packages"]) == expected
    assert config["package-dir"] == {v: k for k, v in MAPPED.items() if k != "loadstar"}
    assert "py-modules" not in config  # server.py runs from the checkout; no top-level `server`


def test_only_loadstar_lands_at_the_top_of_site_packages():
    ours = sorted(name for name, dists in packages_distributions().items() if "loadstar" in dists)
    assert ours == ["loadstar"]
    entry_points = {ep.name: ep.value for ep in distribution("loadstar").entry_points if ep.group == "loadstar"}
    assert entry_points and all(value.startswith("loadstar.loaders.") for value in entry_points.values())


def test_the_engine_has_no_import_circle():
    modules = engine_modules()
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, "import circle: " + " -> ".join([*path[path.index(target):], target])
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_each_engine_part_imports_only_its_own_layer_and_below():
    wrong = []
    for module, path in engine_modules().items():
        if module == "loadstar.engine":
            continue
        for target in imports_of(path):
            if target in engine_modules() and target != "loadstar.engine" and layer_of(target) > layer_of(module):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_the_engine_never_imports_gradio_or_the_faces():
    for module, path in engine_modules().items():
        bad = {i for i in imports_of(path) if i.split(".")[0] == "gradio" or i.startswith(("loadstar.webui", "loadstar.api"))}
        assert not bad, f"{module} imports {bad}"


def test_the_ui_api_and_server_use_the_facade_without_reaching_inside():
    """The faces call Engine's methods; besides those they may use only its three stores, which are
    official parts (engine.conversations: saved chats; engine.presets: named parameter sets; engine.characters), and
    never the parts behind the facade."""
    stores = {"conversations", "presets", "characters"}
    public = {name for name in vars(Engine) if not name.startswith("_")} | stores | {"settings"}
    reaches = []
    for path in [*(ROOT / "webui").glob("*.py"), *(ROOT / "api").glob("*.py"), ROOT / "server.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            is_engine = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine"
            if is_engine and node.attr not in public:
                reaches.append(f"{path.relative_to(ROOT)}:{node.lineno} engine.{node.attr}")
    assert not reaches, reaches


def test_loaders_and_extensions_import_only_the_public_surface():
    wrong = []
    for path in [*(ROOT / "loaders").rglob("*.py"), *(ROOT / "extensions").rglob("*.py")]:
        for target in imports_of(path):
            if target.startswith(("loadstar.engine", "loadstar.api", "loadstar.webui")):
                wrong.append(f"{path.relative_to(ROOT)}: {target}")
    assert not wrong, wrong


def test_generation_is_a_queue_a_scheduler_and_an_output_processor():
    """The three parts of engine/generation/ each do one job: the queue knows nothing of models or
    output, the output processor nothing of the queue or the loop, and events go out through the
    handle's public ``emit`` only (no part reaches into another's privates)."""
    parts = {name: imports_of(ROOT / "engine" / "generation" / f"{name}.py") for name in ("fair_queue", "scheduler", "output")}
    assert not {t for t in parts["fair_queue"] if t.startswith(("loadstar.engine.models", "loadstar.engine.generation.output",
                                                                 "loadstar.engine.generation.scheduler"))}
    assert not {t for t in parts["output"] if t.startswith(("loadstar.engine.generation.fair_queue",
                                                             "loadstar.engine.generation.scheduler"))}
    private_emits = [str(p.relative_to(ROOT)) for p in (ROOT / "engine").rglob("*.py") if "._emit(" in p.read_text()]
    assert not private_emits, private_emits
