"""A plugin package that imports only ``loadstar`` and implements every hook, installed the way a
user installs one (a distribution with an entry point on the path), run through a real engine
and a real server; wrapper hooks, the trace switch and --disable-plugin."""

from __future__ import annotations

import ast
import logging
import sys
import textwrap
from pathlib import Path

import pytest

from loadstar import ChatMessage, GenerationRequest, Settings, hookimpl
from loadstar.engine.facade import Engine
from loadstar.engine.plugins import hookspecs
from loadstar.engine.plugins.host import PluginHost
from tests.fakes import FakeLoader, FakeModel
from tests.folders import hf_folder
from tests.helpers import ROOT, run_server

PACKAGE = "loadstar_everyhook"

PLUGIN = textwrap.dedent('''
    """Every hook Loadstar has, each leaving a mark the test can see."""
    from pydantic import BaseModel, ConfigDict

    from loadstar import (
        Assessment, Availability, Character, LoadedModel, LoadedModelInfo, PluginContext, ReplyDraft, RequestDraft,
        StreamPiece, Tool, UIContribution, hookimpl,
    )

    SEEN = {}


    class ParrotOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")


    class ParrotModel(LoadedModel):
        supported_params = frozenset({"max_new_tokens"})

        def __init__(self, name):
            self.info = LoadedModelInfo(name=name, loader="Parrot", device="cpu", dtype="none", context_length=None)

        def count_tokens(self, text):
            return len(text.split())

        def stream(self, prompt, params, cancel, *, seed):
            for word in prompt.split():
                yield StreamPiece(word + " ", 1)


    class ParrotLoader:
        name = "Parrot"
        Options = ParrotOptions

        def availability(self):
            return Availability(True, "pure Python")

        def assess(self, folder):
            found = (folder.path / "parrot.txt").is_file()
            return Assessment(found, "parrot.txt found" if found else "no parrot.txt", 100)

        def load(self, folder, options):
            return ParrotModel(folder.name)


    @hookimpl
    def configure(settings):
        SEEN["data_dir"] = settings.data_dir


    @hookimpl
    def register_loaders(register):
        register(ParrotLoader())


    @hookimpl
    def modify_request(request: RequestDraft):
        request.user_text = request.user_text + " please"


    @hookimpl
    def render_prompt(messages, chat_format, special_tokens, model, add_generation_prompt):
        SEEN["add_generation_prompt"] = add_generation_prompt
        return " | ".join(f"{m.role}: {m.content}" for m in messages)


    @hookimpl
    def generate(request, prompt, model, cancel, emit, seed):
        if "/shout" not in prompt:
            return None  # the model answers
        emit(StreamPiece(prompt.upper(), 1))
        return True


    @hookimpl
    def modify_reply(reply: ReplyDraft):
        reply.text = reply.text.strip() + " [checked]"


    def _build(context: PluginContext):
        SEEN["context"] = (context.settings.data_dir, context.loaded_model(), context.metrics().requests)


    @hookimpl
    def webui_contribution(register):
        register(UIContribution("Every hook", _build, placement="tab"))


    @hookimpl
    def register_tools(register, report):
        register(Tool("squawk", "Say it twice.", lambda args: args["word"] * 2,
                      {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}))
        report("the parrot's second tool is asleep")


    @hookimpl
    def register_characters(register):
        register(Character(name="Polly", greeting="Squawk!", context="{{char}} is a parrot."))


    @hookimpl
    def shutdown():
        SEEN["shutdown"] = True
''')


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The package installed on the path: its module, and a dist-info naming it in Loadstar's group."""
    site = tmp_path / "site"
    (site / PACKAGE).mkdir(parents=True)
    (site / PACKAGE / "__init__.py").write_text(PLUGIN)
    info = site / "loadstar_everyhook-2.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: loadstar-everyhook\nVersion: 2.0\n")
    (info / "entry_points.txt").write_text(f"[loadstar]\neveryhook = {PACKAGE}\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop(PACKAGE, None)


def test_the_package_imports_only_loadstar(installed):
    tree = ast.parse((installed / PACKAGE / "__init__.py").read_text())
    ours = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} - {"pydantic"}
    assert ours == {"loadstar"}


def test_a_plugin_package_exercises_every_hook(installed, tmp_path):
    models = tmp_path / "models"
    (models / "polly").mkdir(parents=True)
    (models / "polly" / "parrot.txt").write_text("squawk")
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data"))
    try:
        plugin = engine.plugins.get("everyhook")
        everyhook = next(p for p in engine.plugin_list() if p.name == "everyhook")
        assert (everyhook.distribution, everyhook.version, everyhook.built_in) == ("loadstar-everyhook", "2.0", False)
        assert set(everyhook.hooks) == {name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "loadstar_spec")}
        assert plugin.SEEN["data_dir"] == tmp_path / "data"  # configure

        assert engine.load_model("polly").loader == "Parrot"  # register_loaders
        asked = GenerationRequest(messages=(ChatMessage(role="user", content="hello"),))
        finished = engine.submit(asked).result()
        # modify_request added " please", render_prompt wrote the prompt, the model echoed it,
        # modify_reply marked it.
        assert finished.text == "user: hello please [checked]", finished
        assert plugin.SEEN["add_generation_prompt"] is True
        shout = engine.submit(GenerationRequest(messages=(ChatMessage(role="user", content="/shout hi"),))).result()
        assert shout.text == "USER: /SHOUT HI PLEASE [checked]"  # generate answered instead of the model

        [(_, contribution)] = [c for c in engine.ui_contributions() if c[0] == "everyhook"]
        contribution.build(engine.plugin_context({}))  # webui_contribution, with its typed context
        data_dir, loaded, requests = plugin.SEEN["context"]
        assert (data_dir, loaded.name, requests) == (tmp_path / "data", "polly", {"stop": 2})
        assert engine.tools.run("squawk", '{"word": "hi"}').text == "hihi"  # register_tools
        assert "the parrot's second tool is asleep" in engine.tools.problems()
        polly = engine.characters.find(None, "polly")  # register_characters
        assert (polly.id, polly.opening(), polly.system_message()) == ("everyhook:polly", "Squawk!", "Polly is a parrot.")
        assert engine.plugin_problems() == []
    finally:
        engine.close()
    assert plugin.SEEN["shutdown"] is True  # shutdown


def test_the_server_lists_the_package_and_disable_plugin_leaves_it_out(installed, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{installed}:{ROOT}")
    listed = run_server("--list-plugins")
    assert "everyhook 2.0 (loadstar-everyhook): configure, generate, modify_reply" in listed.stdout, listed.stderr
    off = run_server("--list-plugins", "--disable-plugin", "everyhook", "--disable-plugin", "exllamav2")
    assert off.returncode == 0, off.stderr
    assert "everyhook" not in off.stdout and "exllamav2" not in off.stdout and "llamacpp" in off.stdout
    monkeypatch.setenv("LOADSTAR_DISABLE_PLUGINS", "everyhook")
    assert "everyhook" not in run_server("--list-plugins").stdout
    monkeypatch.delenv("LOADSTAR_DISABLE_PLUGINS")
    monkeypatch.setenv("LOADSTAR_NO_THIRD_PARTY_PLUGINS", "1")
    assert "everyhook" not in run_server("--list-plugins").stdout


def test_the_switch_for_builtin_plugins_only_leaves_it_out(installed):
    assert "Parrot" in PluginHost().loaders()
    only_ours = PluginHost(third_party=False).loaders()
    assert "Parrot" not in only_ours and "Transformers" in only_ours


def test_a_disable_plugin_name_that_matches_nothing_is_warned_about(caplog):
    caplog.set_level(logging.WARNING, logger="loadstar.engine.plugins.host")
    host = PluginHost(disabled=["exllama", "example"])
    assert "ExLlamaV2" in host.loaders() and "example" not in [p.name for p in host.plugins]
    [warning] = [r.getMessage() for r in caplog.records if "--disable-plugin" in r.getMessage()]
    assert warning.startswith("--disable-plugin exllama: no plugin has that name (known: ") and "exllamav2" in warning


def test_a_plugin_that_breaks_on_import_can_be_disabled_by_name(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "loadstar_broken-1.0.dist-info").mkdir(parents=True)
    (site / "loadstar_broken-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: loadstar-broken\nVersion: 1.0\n")
    (site / "loadstar_broken-1.0.dist-info" / "entry_points.txt").write_text("[loadstar]\nbroken = loadstar_broken_mod\n")
    (site / "loadstar_broken_mod.py").write_text("raise RuntimeError('this plugin cannot start')\n")
    monkeypatch.syspath_prepend(str(site))
    assert "cannot start" in PluginHost().problems[0].message
    quiet = PluginHost(disabled=["broken"])
    assert quiet.problems == [] and "llama.cpp" in quiet.loaders()
    monkeypatch.setenv("PYTHONPATH", f"{site}:{ROOT}")
    # every command honours it: download --list-branches builds its own plugin host
    noisy = run_server("download", "org/none", "--list-branches")
    assert "plugin 'broken' failed at import: RuntimeError: this plugin cannot start" in noisy.stderr
    calm = run_server("download", "org/none", "--list-branches", "--disable-plugin", "broken")
    assert "broken" not in calm.stderr


# -- wrappers and tracing --------------------------------------------------------------------

class Around:
    """A wrapper=True hook around modify_reply: it runs, sees the inner result and changes it."""

    def __init__(self) -> None:
        self.saw: list[str] = []

    @hookimpl(wrapper=True)
    def modify_reply(self, reply):
        self.saw.append(reply.text)  # before the other implementations
        result = yield
        reply.text = f"<{reply.text}>"
        return result


class Inner:
    @hookimpl
    def modify_reply(self, reply):
        reply.text = reply.text.strip().upper()


class OldStyle:
    @hookimpl(hookwrapper=True)
    def modify_reply(self, reply):
        yield


class BrokenWrapper:
    @hookimpl(wrapper=True)
    def modify_reply(self, reply):
        raise RuntimeError("the wrapper broke before its yield")
        yield  # pragma: no cover


class ReplyLoader(FakeLoader):
    def __init__(self, model: object) -> None:
        super().__init__("Reply")
        self._model = model

    def load(self, folder, options):
        return self._model


def engine_with_plugins(tmp_path: Path, *plugins: object, model: object | None = None) -> Engine:
    host = PluginHost([])
    for i, plugin in enumerate(plugins):
        host.register(plugin, name=f"p{i}-{type(plugin).__name__.lower()}", distribution="tests")
    assert host.register(_Loaders(ReplyLoader(model or FakeModel(reply="fine thanks"))), name="fake-loader")
    hf_folder(tmp_path / "models", "m")
    # The fake model stays in this process: it keeps state (an Event) that a worker could not take.
    return Engine(Settings(models_dir=tmp_path / "models", data_dir=tmp_path / "data", model_workers=False), plugins=host)


class _Loaders:
    def __init__(self, loader: object) -> None:
        self._loader = loader

    @hookimpl
    def register_loaders(self, register):
        register(self._loader)


def ask(engine: Engine) -> object:
    return engine.submit(GenerationRequest(messages=(ChatMessage(role="user", content="hi"),))).result()


def test_a_wrapper_hook_runs_around_the_others(tmp_path):
    around = Around()
    engine = engine_with_plugins(tmp_path, around, Inner())
    engine.load_model("m")
    try:
        assert ask(engine).text == "<FINE THANKS>"
        assert around.saw == ["fine thanks "]  # it ran before the inner implementation
    finally:
        engine.close()


def test_an_old_style_hookwrapper_is_refused_at_registration_with_a_message():
    host = PluginHost([])
    assert not host.register(OldStyle(), name="old")
    [problem] = host.problems
    assert problem.stage == "register"
    assert "hookwrapper=True" in problem.message and "wrapper=True" in problem.message
    assert "old" not in [p.name for p in host.plugins]


def test_a_wrapper_that_raises_is_disabled_and_the_reply_goes_on(tmp_path):
    engine = engine_with_plugins(tmp_path, BrokenWrapper(), Inner())
    engine.load_model("m")
    try:
        finished = ask(engine)
        assert finished.text == "FINE THANKS"  # the inner implementation still ran
        assert any("p0-brokenwrapper" in n and "disabled for this session" in n for n in finished.notices)
        assert not engine.plugin_enabled("p0-brokenwrapper")
        assert ask(engine).notices == ()  # once
    finally:
        engine.close()


def test_the_trace_switch_logs_each_hook_call(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOADSTAR_TRACE_PLUGINS", "1")
    caplog.set_level(logging.INFO, logger="loadstar.plugins.trace")
    engine = engine_with_plugins(tmp_path, Around(), Inner())
    engine.load_model("m")
    try:
        ask(engine)
    finally:
        engine.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "loadstar.plugins.trace"]
    assert "hook modify_reply -> p0-around, p1-inner (reply)" in lines
    assert any(line.startswith("hook modify_reply <- returned [] in ") and line.endswith(" ms") for line in lines)
    assert any(line.startswith("hook register_loaders -> ") for line in lines)


def test_without_the_switch_nothing_is_traced(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("LOADSTAR_TRACE_PLUGINS", raising=False)
    caplog.set_level(logging.INFO, logger="loadstar.plugins.trace")
    engine = engine_with_plugins(tmp_path, Inner())
    engine.load_model("m")
    try:
        ask(engine)
    finally:
        engine.close()
    assert not [r for r in caplog.records if r.name == "loadstar.plugins.trace"]


def test_a_loader_returning_no_loaded_model_gets_a_one_line_error(tmp_path):
    class NotAModel:
        info = None

    engine = engine_with_plugins(tmp_path, model=NotAModel())
    try:
        with pytest.raises(Exception, match=r"returned a NotAModel, not a loadstar\.LoadedModel"):
            engine.load_model("m")
    finally:
        engine.close()
