from importlib.metadata import EntryPoint

from loadstar.engine.plugins.host import PluginHost
from tests.fakes import FakeLoader


def ep(name: str, module: str) -> EntryPoint:
    return EntryPoint(name=name, value=f"tests.plugins.{module}", group="loadstar")


def test_installed_entry_points_register_the_transformers_loader():
    """pyproject.toml's entry point is how the built-in loader arrives, like any third-party one."""
    host = PluginHost()
    assert "Transformers" in host.loaders()
    info = next(p for p in host.plugins if p.name == "transformers")
    assert info.built_in and info.hooks == ("register_loaders",)
    assert host.problems == []


def test_plugin_failing_on_import_is_reported_and_others_load():
    host = PluginHost([ep("broken", "broken_import"), ep("good", "good")])
    assert list(host.loaders()) == ["Good"]
    [problem] = host.problems
    assert (problem.plugin, problem.stage) == ("broken", "import")
    assert "not installed" in problem.message


def test_plugin_raising_in_a_hook_is_isolated_and_registers_nothing():
    host = PluginHost([ep("raiser", "raises_in_hook"), ep("good", "good")])
    loaders = host.loaders()
    assert list(loaders) == ["Good"]  # the half-registered loader is dropped too
    [problem] = host.problems
    assert (problem.plugin, problem.stage) == ("raiser", "register_loaders")
    assert "boom while registering" in problem.message


def test_plugin_without_hookimpl_is_reported_not_silently_ignored():
    host = PluginHost([ep("nohooks", "no_hooks")])
    assert host.loaders() == {}
    assert "implements no hooks" in host.problems[0].message


def test_misspelled_hook_fails_loudly():
    host = PluginHost([ep("typo", "misspelled"), ep("good", "good")])
    assert list(host.loaders()) == ["Good"]
    assert "register_loader" in host.problems[0].message


def test_duplicate_loader_names_keep_the_first_and_report_the_second():
    host = PluginHost([ep("good", "good"), ep("dup", "duplicate")])
    assert list(host.loaders()) == ["Good"]
    assert host.problems[0].plugin in {"good", "dup"}
    assert "already registered" in host.problems[0].message


def test_each_host_is_independent():
    a = PluginHost([ep("good", "good")])
    b = PluginHost([])
    assert "Good" in a.loaders() and b.loaders() == {}


def test_registering_an_object_plugin_directly():
    from loadstar.engine.plugins.hookspecs import hookimpl

    class Plugin:
        @hookimpl
        def register_loaders(self, register):
            register(FakeLoader("Direct"))

    host = PluginHost([])
    assert host.register(Plugin(), name="direct")
    assert list(host.loaders()) == ["Direct"]
