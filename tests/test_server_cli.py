"""server.py as a user meets it: flags, and one-line errors with non-zero exit codes."""

import socket

import pytest

from tests.folders import hf_folder
from tests.helpers import assert_one_line_error, free_port, run_server


def test_help_documents_every_flag():
    result = run_server("--help")
    assert result.returncode == 0
    for flag in ("--model", "--loader", "--models-dir", "--host", "--port", "--auth", "--auth-file",
                 "--no-model", "--device", "--list-plugins", "--allow-pt", "--extensions",
                 "--api-key", "--admin-key", "--no-api", "--cors-origin", "--queue-timeout", "--api-max-tokens",
                 "--remote-key-env", "LOADSTAR_NO_THIRD_PARTY_PLUGINS"):
        assert flag in result.stdout


def test_unknown_model(default_models_dir, tmp_path):
    result = run_server("--models-dir", str(default_models_dir), "--data-dir", str(tmp_path),
                        "--model", "nope", "--port", str(free_port()))
    assert_one_line_error(result, "no model named 'nope'", 1)
    assert "available: SmolLM2-135M-Instruct" in result.stderr


def test_empty_models_dir(tmp_path):
    empty = tmp_path / "models"
    empty.mkdir()
    result = run_server("--models-dir", str(empty), "--data-dir", str(tmp_path), "--port", str(free_port()))
    assert_one_line_error(result, f"no models in {empty}", 1)


def test_missing_models_dir(tmp_path):
    result = run_server("--models-dir", str(tmp_path / "missing"), "--port", str(free_port()))
    assert_one_line_error(result, "is not a folder", 2)


def test_folder_with_no_weights(tmp_path):
    models = tmp_path / "models"
    hf_folder(models, "hollow", weights=())
    result = run_server("--models-dir", str(models), "--data-dir", str(tmp_path), "--model", "hollow",
                        "--port", str(free_port()))
    assert_one_line_error(result, "hollow holds no weight files", 1)


def test_port_in_use(default_models_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--models-dir", str(default_models_dir), "--data-dir", str(tmp_path), "--port", str(port))
    assert_one_line_error(result, f"port {port} on 127.0.0.1 is already in use", 2)


def test_wide_listening_without_auth_is_refused():
    result = run_server("--host", "0.0.0.0", "--no-model")
    assert_one_line_error(result, "refusing to listen on 0.0.0.0 without authentication", 2)


def test_wide_listening_needs_an_api_key_too(tmp_path):
    result = run_server("--host", "0.0.0.0", "--auth", "u:p", "--no-model")
    assert_one_line_error(result, "refusing to serve the API on 0.0.0.0 without a key", 2)


def test_short_api_key_is_refused():
    result = run_server("--api-key", "short", "--no-model")
    assert_one_line_error(result, "api_key", 2)


@pytest.mark.parametrize("auth", ["nocolon", ":password", "user:"])
def test_malformed_auth(auth):
    result = run_server("--auth", auth, "--no-model")
    assert_one_line_error(result, "USER:PASSWORD", 2)


def test_missing_auth_file(tmp_path):
    result = run_server("--auth-file", str(tmp_path / "nope.txt"), "--no-model")
    assert_one_line_error(result, "cannot read --auth-file", 2)
    binary = tmp_path / "logins.bin"
    binary.write_bytes(b"\xff\xfe\x00user")
    assert_one_line_error(run_server("--auth-file", str(binary), "--no-model"), "is not UTF-8 text", 2)


def test_bad_port_number():
    result = run_server("--port", "70000", "--no-model")
    assert_one_line_error(result, "port", 2)


def test_list_plugins_shows_the_builtin_loader():
    result = run_server("--list-plugins")
    assert result.returncode == 0, result.stderr
    for name in ("transformers", "autogptq", "exllamav2"):
        assert f"{name} 0.1.0 (built-in): register_loaders" in result.stdout


def test_unknown_extension_is_a_one_line_error(tmp_path):
    result = run_server("--no-model", "--data-dir", str(tmp_path), "--extensions", "example,nope")
    assert_one_line_error(result, "unknown extension nope (known: example, example_tools, mcp_servers, remote_engine, reply_rules)", 1)


def test_list_plugins_shows_extensions_and_remembers_the_extensions_flag(tmp_path):
    listed = run_server("--list-plugins", "--data-dir", str(tmp_path))
    assert "remote_engine" in listed.stdout and "(extensions/remote_engine): configure, generate, register_loaders [on]" in listed.stdout
    assert "(extensions/example): configure, generate, modify_reply" in listed.stdout and "[off]" in listed.stdout
    (tmp_path / "settings.json").write_text('{"extensions": {"example": true, "remote_engine": false}}')
    listed = run_server("--list-plugins", "--data-dir", str(tmp_path))
    assert "render_prompt, shutdown, webui_contribution [on]" in listed.stdout
    assert "(extensions/remote_engine): configure, generate, register_loaders [off]" in listed.stdout


@pytest.mark.parametrize("remembered, problem", [
    ({"loader": "Nope", "options": {}}, "Nope"),
    ({"loader": "llama.cpp", "options": {"n_ctx": "lots"}}, "n_ctx"),
])
def test_a_bad_remembered_loader_or_option_names_settings_json(default_models_dir, tmp_path, remembered, problem):
    import json

    name = "SmolLM2-135M-Instruct"
    (tmp_path / "settings.json").write_text(json.dumps({"last_model": name, "models": {name: remembered}}))
    result = run_server("--models-dir", str(default_models_dir), "--data-dir", str(tmp_path), "--port", str(free_port()))
    assert_one_line_error(result, problem, 1)
    assert str(tmp_path / "settings.json") in result.stderr and "--loader NAME" in result.stderr


def test_gradio_builds_no_monitoring_summary_after_each_event(monkeypatch):
    """Gradio's queue makes a pandas summary of its recent events after every event (12-18 ms of
    CPU each) for a monitoring page Loadstar never turns on; server.py's environment stops it."""
    from gradio.queueing import Queue

    from server import set_library_environment

    records = [{"time": 0.0, "status": "success", "process_time": 0.5, "function": "send", "session_hash": "s"}]

    def summary_after_an_event():
        queue = Queue(live_updates=False, concurrency_count=1, update_intervals=1, max_size=None, blocks=None)
        queue.events_recorded += 1
        return queue.compute_analytics_summary(records), queue.ANALYTICS_MAX_EVENTS

    for name in ("GRADIO_ANALYTICS_CACHE_FREQUENCY", "GRADIO_ANALYTICS_MAX_EVENTS"):
        monkeypatch.delenv(name, raising=False)
    summary, _ = summary_after_an_event()
    assert "send" in summary["functions"]  # Gradio's default: built after every event
    environ: dict[str, str] = {}
    set_library_environment(environ)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    summary, kept = summary_after_an_event()
    assert summary == {"functions": {}}
    assert kept == 100


class _OpensAFile:
    """A pickle payload: loading it would call open()."""

    def __reduce__(self):
        return (open, ("/nonexistent/pwned", "w"))


@pytest.mark.slow  # torch and the real model's tokenizer
def test_a_pickle_trap_named_with_model_is_one_line_without_torch_s_advice(tmp_path):
    """torch's refusal (four paragraphs, advising weights_only=False) came before our one line."""
    import torch

    from tests.checkpoints import smollm_tokenizer_into

    models = tmp_path / "models"
    trap = hf_folder(models, "trap", weights=())
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": _OpensAFile()}, trap / "pytorch_model.bin")
    smollm_tokenizer_into(trap)
    result = run_server("--models-dir", str(models), "--data-dir", str(tmp_path / "data"), "--model", "trap",
                        "--port", str(free_port()))
    assert_one_line_error(result, "pytorch_model.bin contains pickled code (io.open); refused: only tensors are loaded", 1)
    for torch_words in ("Weights only load failed", "weights_only=False", "WeightsUnpickler"):
        assert torch_words not in result.stderr + result.stdout, result.stderr
