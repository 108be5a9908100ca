"""A loader from another installed package arrives through its entry point, like the built-ins."""

import sys
import textwrap

import pytest

from loadstar import ChatMessage, GenerationRequest, Settings
from loadstar.engine.facade import Engine
from loadstar.engine.plugins.host import PluginHost
from tests.helpers import ROOT, run_server

PLUGIN = textwrap.dedent('''
    """loadstar-echo: a third-party loader for folders holding echo.json (replies with its text)."""
    import json
    from pydantic import BaseModel, ConfigDict
    from loadstar import Assessment, Availability, LoadedModel, LoadedModelInfo, StreamPiece, hookimpl


    class EchoOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        shout: bool = False


    class EchoModel(LoadedModel):
        def __init__(self, name, reply, shout):
            self.info = LoadedModelInfo(name=name, loader="Echo", device="cpu", dtype="none", context_length=None)
            self.reply = reply.upper() if shout else reply

        supported_params = frozenset({"max_new_tokens"})

        def count_tokens(self, text):
            return len(text.split())

        def stream(self, prompt, params, cancel, *, seed):
            for word in f"{self.reply} {prompt}".split():
                if cancel.cancelled:
                    return
                yield StreamPiece(word + " ", 1)

        def unload(self):
            pass


    class EchoLoader:
        name = "Echo"
        Options = EchoOptions

        def availability(self):
            return Availability(True, "pure Python")

        def assess(self, folder):
            if (folder.path / "echo.json").is_file():
                return Assessment(True, "echo.json found", 100)
            return Assessment(False, "no echo.json")

        def load(self, folder, options):
            reply = json.loads((folder.path / "echo.json").read_text())["reply"]
            return EchoModel(folder.name, reply, options.shout)


    @hookimpl
    def register_loaders(register):
        register(EchoLoader())
''')


@pytest.fixture
def site(tmp_path, monkeypatch):
    """An installed distribution 'loadstar-echo' 1.0 (a dist-info with an entry point) on sys.path."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "echo_loader_plugin.py").write_text(PLUGIN)
    info = site / "loadstar_echo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: loadstar-echo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[loadstar]\necho = echo_loader_plugin\n")
    (info / "RECORD").write_text("")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("echo_loader_plugin", None)


def test_third_party_loader_appears_and_loads_a_model(site, tmp_path):
    host = PluginHost()
    assert {"Echo", "Transformers", "AutoGPTQ"} <= set(host.loaders())
    echo = next(p for p in host.plugins if p.name == "echo")
    assert (echo.distribution, echo.version, echo.built_in) == ("loadstar-echo", "1.0", False)

    models = tmp_path / "models"
    (models / "parrot").mkdir(parents=True)
    (models / "parrot" / "echo.json").write_text('{"reply": "you said:"}')
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data"), plugins=host)
    try:
        [best, *_] = engine.models.candidates("parrot")
        assert (best.loader, best.reason) == ("Echo", "echo.json found")
        info = engine.load_model("parrot", options={"shout": True})
        assert info.loader == "Echo"
        request = GenerationRequest(messages=(ChatMessage(role="user", content="hello"),))
        assert engine.submit(request).result().text == "YOU SAID: hello "
    finally:
        engine.close()


def test_switch_for_builtin_plugins_only_leaves_it_out(site):
    assert "Echo" not in PluginHost(third_party=False).loaders()
    assert "Transformers" in PluginHost(third_party=False).loaders()


def test_list_plugins_shows_it_with_its_package_and_version(site, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{site}:{ROOT}")
    result = run_server("--list-plugins")
    assert "echo 1.0 (loadstar-echo): register_loaders" in result.stdout
    monkeypatch.setenv("LOADSTAR_NO_THIRD_PARTY_PLUGINS", "1")
    assert "echo" not in run_server("--list-plugins").stdout
