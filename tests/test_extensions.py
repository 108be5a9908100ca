"""Extensions: each hook takes effect in a real generation, a raising extension is isolated,
configuration is replayed to late plugins, and switches are remembered.

The hooks come from a small package installed into the test environment through its entry point
(a dist-info on sys.path), the way users install third-party extensions.
"""

import sys
import textwrap

import pytest

from loadstar.engine.chat.messages import ChatMessage
from loadstar.engine.facade import Engine
from loadstar.engine.generation.requests import GenerationRequest, Started, TextDelta
from loadstar.engine.plugins.hookspecs import hookimpl
from loadstar.engine.plugins.host import PluginHost
from loadstar.engine.sampling import SamplingParams
from loadstar.engine.settings import Settings
from tests.helpers import CAPITAL_QUESTION

HOOKS = textwrap.dedent('''
    """loadstar-hooktest: one implementation of each request hook, with effects a test can see."""
    from loadstar.engine.plugins.hookspecs import hookimpl
    from loadstar.engine.models.loader_api import StreamPiece

    @hookimpl
    def modify_request(request):
        if request.user_text and "Frankreich" in request.user_text:
            request.user_text = request.user_text.replace("Frankreich", "France")
            request.params = request.params.model_copy(update={"max_new_tokens": 30})
            request.stop.append("Paris")

    @hookimpl
    def render_prompt(messages):
        last = messages[-1].content
        return last[len("RAW:"):] if last.startswith("RAW:") else None

    @hookimpl
    def generate(request, emit, cancel):
        if request.messages and request.messages[-1].content == "/canned":
            for word in ("canned ", "reply"):
                emit(StreamPiece(word, 1))
            return True
        return None

    @hookimpl
    def modify_reply(reply):
        reply.text = reply.text + " [checked]"
''')
RAISER = textwrap.dedent('''
    """loadstar-raiser: a broken extension."""
    from loadstar.engine.plugins.hookspecs import hookimpl

    @hookimpl
    def modify_request(request):
        raise RuntimeError("raiser is broken")
''')


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    for dist, module, source in (("loadstar_hooktest", "hooktest_plugin", HOOKS),
                                 ("loadstar_raiser", "raiser_plugin", RAISER)):
        (site / f"{module}.py").write_text(source)
        info = site / f"{dist}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[loadstar]\n{module.split('_')[0]} = {module}\n")
        (info / "RECORD").write_text("")
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
    for module in ("hooktest_plugin", "raiser_plugin"):
        sys.modules.pop(module, None)


@pytest.fixture(scope="module")
def hooked_engine(site, default_models_dir, tmp_path_factory):
    """The real default model with the two installed extensions (found through their entry points)."""
    engine = Engine(Settings(models_dir=default_models_dir, data_dir=tmp_path_factory.mktemp("data")))
    names = {p.name: p for p in engine.plugins.plugins}
    assert names["hooktest"].distribution == "loadstar-hooktest" and not names["hooktest"].built_in
    engine.load_model("SmolLM2-135M-Instruct")
    yield engine
    engine.close()


def ask(engine, text, **params):
    params = {"temperature": 0, "max_new_tokens": 40, **params}
    handle = engine.submit(GenerationRequest(messages=(ChatMessage(role="user", content=text),),
                                             params=SamplingParams(**params)))
    events = list(handle.events())
    return events, events[-1]


@pytest.mark.slow
def test_a_raising_extension_is_disabled_and_the_generation_completes(hooked_engine):
    events, done = ask(hooked_engine, CAPITAL_QUESTION)
    assert done.reason == "stop" and "Paris" in done.text  # the request went on without it
    notice = "extension 'raiser' failed in modify_request and is disabled for this session: RuntimeError: raiser is broken"
    assert notice in done.notices and notice in next(e for e in events if isinstance(e, Started)).notices
    assert not hooked_engine.plugins.is_enabled("raiser") and hooked_engine.plugins.is_enabled("hooktest")
    assert any(p.plugin == "raiser" for p in hooked_engine.plugins.problems)
    _, again = ask(hooked_engine, CAPITAL_QUESTION)
    assert again.notices == ()  # disabled: not called again


@pytest.mark.slow
def test_modify_request_changes_text_parameters_and_stops(hooked_engine):
    events, done = ask(hooked_engine, CAPITAL_QUESTION.replace("France", "Frankreich"), max_new_tokens=2)
    started = next(e for e in events if isinstance(e, Started))
    assert CAPITAL_QUESTION in started.prompt and "Frankreich" not in started.prompt
    assert done.reason == "stop" and done.text == "The capital of France is  [checked]"


@pytest.mark.slow
def test_render_prompt_first_result_wins_over_the_chat_template(hooked_engine):
    events, done = ask(hooked_engine, "RAW:The capital of France is", max_new_tokens=3)
    started = next(e for e in events if isinstance(e, Started))
    assert started.prompt == "The capital of France is" and started.format_name == "an extension's"
    assert "Paris" in done.text


@pytest.mark.slow
def test_generate_override_and_modify_reply(hooked_engine):
    events, done = ask(hooked_engine, "/canned")
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["canned ", "reply"]
    assert done.text == "canned reply [checked]" and done.completion_tokens == 2


def test_configure_is_replayed_to_a_plugin_registered_later(tmp_path):
    seen = []

    class Late:
        @hookimpl
        def configure(self, settings):
            seen.append(settings.data_dir)

    engine = Engine(Settings(models_dir=tmp_path, data_dir=tmp_path / "data"), plugins=PluginHost([]))
    assert engine.plugins.register(Late(), name="late")
    assert seen == [tmp_path / "data"]


def test_builtin_extensions_switch_on_and_off_and_are_remembered(tmp_path):
    settings = Settings(models_dir=tmp_path, data_dir=tmp_path / "data")
    engine = Engine(settings)
    assert engine.plugins.is_enabled("remote_engine") and not engine.plugins.is_enabled("example")
    assert "Echo (example)" not in engine.plugins.loaders()
    # configure is historic: every registered plugin has the settings, enabled or not, so one
    # switched on later is ready at once.
    assert engine.plugins.get("example").data_dir == tmp_path / "data" / "extensions" / "example"
    engine.set_extension_enabled("example", True)
    assert "Echo (example)" in engine.plugins.loaders()
    assert Engine(settings).plugins.is_enabled("example")  # remembered
    only = Engine(settings.model_copy(update={"extensions": ("reply_rules",)}))
    assert only.plugins.enabled_names() == ["autogptq", "exllamav2", "llamacpp", "reply_rules", "transformers"]
    with pytest.raises(ValueError, match="cannot be turned off"):
        only.plugins.set_enabled("transformers", False)


def test_the_example_extension_works_end_to_end_with_its_own_loader(tmp_path):
    models = tmp_path / "models"
    (models / "parrot").mkdir(parents=True)
    words = [f"word{i}" for i in range(30)]
    (models / "parrot" / "echo.txt").write_text("hello from the echo model " + " ".join(words))
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", extensions=("example",)))
    try:
        assert engine.load_model("parrot").loader == "Echo (example)"
        _, whole = ask(engine, "tell me", max_new_tokens=100)
        assert len(whole.text.split()) == 35
        _, short = ask(engine, "/short tell me", max_new_tokens=100)
        assert short.text.split() == whole.text.split()[:16] and short.reason == "length"  # capped by the hook
        _, ping = ask(engine, "/ping")
        assert ping.text == "pong"
        _, shout = ask(engine, "say it (in capitals)")
        assert shout.text.startswith("HELLO FROM")
    finally:
        engine.close()


def test_reply_rules_apply_saved_rules_and_refuse_bad_ones(tmp_path):
    from loadstar.engine.errors import BadRequestError
    from loadstar.extensions.reply_rules import rules_from_rows

    book = rules_from_rows([["As an AI language model, ", "", False], [r"\s+$", "", True], ["", "", False]])
    assert book.apply("As an AI language model, I think so.   ") == "I think so."
    with pytest.raises(BadRequestError, match=r"rule '\(unclosed': not a valid regular expression: missing \)"):
        rules_from_rows([["(unclosed", "", True]])
    models = tmp_path / "models"
    (models / "parrot").mkdir(parents=True)
    (models / "parrot" / "echo.txt").write_text("Certainly! Paris")
    engine = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", extensions=("example", "reply_rules")))
    try:
        rules = engine.plugins.get("reply_rules")
        rules.save(rules_from_rows([["Certainly! ", "", False]]))
        engine.load_model("parrot")
        assert ask(engine, "capital?")[1].text == "Paris "
        again = Engine(Settings(models_dir=models, data_dir=tmp_path / "data", extensions=("example", "reply_rules")))
        assert again.plugins.get("reply_rules").load() == rules.load()  # saved to disk, read back
        again.close()
    finally:
        engine.close()
