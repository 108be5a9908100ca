"""Loadstar's one entry point: parse flags, build the settings and the app, launch it.

This is the only module that reads argv, and the environment for settings; everything below gets
a ``Settings`` object. (One switch is read where it acts: ``LOADSTAR_TRACE_PLUGINS``, by the plugin
host, so that every command that makes one traces alike.) Errors the user can fix are printed as one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from loadstar.engine.errors import problem_line

DEFAULT_MODELS_DIR = Path("models")
NO_THIRD_PARTY_ENV = "LOADSTAR_NO_THIRD_PARTY_PLUGINS"
DISABLE_PLUGINS_ENV = "LOADSTAR_DISABLE_PLUGINS"  # comma-separated, added to --disable-plugin
API_KEY_ENV = "LOADSTAR_API_KEY"
ADMIN_KEY_ENV = "LOADSTAR_ADMIN_KEY"
HUB_ENDPOINT_ENV = "HF_ENDPOINT"
HUB_TOKEN_ENV = "HF_TOKEN"
DEFAULT_HUB = "https://huggingface.co"
EXIT_USAGE = 2
EXIT_ERROR = 1


class UserError(Exception):
    """A problem with the user's input or machine, shown as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server.py",
        description="Loadstar: chat with local models in the browser. Starts the web UI with a model loaded.",
        epilog=(
            "Security: the UI listens on 127.0.0.1 only. To listen on another address, give --auth or --auth-file. "
            f"Set {NO_THIRD_PARTY_ENV}=1 to load only built-in plugins (the way out of a broken plugin)."
        ),
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", metavar="NAME", help="model folder (inside --models-dir) to load at start; "
                       "default: the one used last time, else the embedded SmolLM2-135M-Instruct")
    model.add_argument("--loader", metavar="NAME", help="pin this loader (e.g. Transformers) instead of the automatic choice")
    model.add_argument("--models-dir", metavar="DIR", type=Path, default=DEFAULT_MODELS_DIR,
                       help="folder holding one sub-folder per model (default: %(default)s)")
    model.add_argument("--no-model", action="store_true", help="start without loading a model")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where to run the model (default: CUDA when present, else CPU)")
    model.add_argument("--max-batch", metavar="N", type=int, default=None,
                       help="requests decoded together by a loader that batches (llama.cpp, Transformers, AutoGPTQ; default 4); "
                            "1 = one at a time")
    model.add_argument("--in-process-models", action="store_true",
                       help="load models in the server process instead of a worker process each (for debugging: "
                            "a native fault in a loader then stops the server)")
    model.add_argument("--max-models", metavar="N", type=int, default=1,
                       help="models kept loaded at once, each in its own worker (default: %(default)s); loading one "
                            "more unloads the least recently used")
    model.add_argument("--worker-deadline", metavar="SECONDS", type=float, default=30.0,
                       help="a model's worker that sends nothing (no token, no heartbeat) for this long is reported "
                            "as not responding and its requests end; Stop, Unload or Load then kills it "
                            "(default: %(default)s)")
    model.add_argument("--idle-unload", metavar="MINUTES", type=float, default=None,
                       help="unload a model that no request has used for this many minutes (default: never)")
    model.add_argument("--allow-pt", action="store_true",
                       help="allow pickled .pt weights when a model has no .safetensors (read with torch "
                            "weights_only; only for sources you trust)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    server.add_argument("--port", type=int, default=7860, help="port to listen on (default: %(default)s)")
    server.add_argument("--auth", metavar="USER:PASSWORD", action="append", default=[],
                        help="require this login for the web UI (may be repeated)")
    server.add_argument("--auth-file", metavar="FILE", type=Path,
                        help="file with one USER:PASSWORD per line ('#' starts a comment)")
    api = parser.add_argument_group("API (OpenAI-compatible, under /v1 on the same port)")
    api.add_argument("--api-key", metavar="KEY", help=f"Bearer key for /v1 and /metrics; required off loopback "
                     f"(or set {API_KEY_ENV}, which keeps it out of the process list)")
    api.add_argument("--admin-key", metavar="KEY", help=f"Bearer key for /admin (load/unload); the admin API is off "
                     f"without it (or set {ADMIN_KEY_ENV})")
    api.add_argument("--no-api", action="store_true", help="serve the web UI only")
    api.add_argument("--cors-origin", metavar="ORIGIN", action="append", default=[],
                     help="allow browser pages from this origin to call the API (may be repeated; none by default)")
    api.add_argument("--remote-key-env", metavar="VAR", action="append", default=[],
                     help="let a remote.json (remote_engine) send the key held in this environment variable "
                          "(may be repeated; none by default, so no variable of this process leaves it)")
    api.add_argument("--queue-timeout", metavar="SECONDS", type=float, default=300.0,
                     help="how long an API request may wait for the model before a timeout error (default: %(default)s)")
    api.add_argument("--load-on-request", action="store_true",
                     help="an API request that names another local model loads it (like LM Studio's JIT loading); "
                          "without it, any name is answered by the loaded model")
    api.add_argument("--api-max-tokens", metavar="N", type=int, default=1024,
                     help="most new tokens per API request (default: %(default)s)")
    server.add_argument("--data-dir", metavar="DIR", type=Path, default=Path("user_data"),
                        help="folder for remembered choices (default: %(default)s)")
    plugins = parser.add_argument_group("extensions")
    plugins.add_argument("--extensions", metavar="NAMES", default=None,
                         help="comma-separated extensions to turn on, all others off (remembered; "
                              "'' turns all off; default: as last time). See --list-plugins")
    add_plugin_switches(plugins)
    plugins.add_argument("--tools-folder", metavar="DIR", type=Path, default=None,
                         help="the folder the example tool read_file may read (default: none, the tool is off)")
    plugins.add_argument("--mcp-config", metavar="FILE", type=Path, default=None,
                         help='MCP servers whose tools the chat offers: a JSON file {"mcpServers": {NAME: '
                              '{"command": ..., "args": [...]} or {"url": "http://..."}}} (operator only)')
    tools = parser.add_argument_group("maintenance")
    tools.add_argument("--list-plugins", action="store_true", help="print each plugin, its version and hooks, then exit")
    tools.add_argument("--place-default-model", action="store_true",
                       help="put the embedded default model into --models-dir, then exit (part of `make install`)")
    tools.add_argument("--verbose", action="store_true", help="log debug details")
    return parser


def parse_auth(pairs: list[str], auth_file: Path | None) -> tuple[tuple[str, str], ...]:
    entries = list(pairs)
    if auth_file is not None:
        try:
            text = auth_file.read_text(encoding="utf-8")
        except OSError as error:
            raise UserError(f"cannot read --auth-file {auth_file}: {error.strerror or error}") from None
        except UnicodeDecodeError:
            raise UserError(f"--auth-file {auth_file} is not UTF-8 text") from None
        entries += [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    result = []
    for entry in entries:
        user, sep, password = entry.partition(":")
        if not sep or not user or not password:
            raise UserError("each login must look like USER:PASSWORD with neither part empty")
        result.append((user, password))
    return tuple(result)


def build_settings(args: argparse.Namespace, environ: dict[str, str]):
    from pydantic import ValidationError

    from loadstar.engine.settings import Settings

    switches = plugin_switches(args, environ)
    try:
        return Settings(
            models_dir=args.models_dir,
            data_dir=args.data_dir,
            model=args.model,
            loader=args.loader,
            load_model=not args.no_model,
            device=args.device,
            allow_pt=args.allow_pt,
            model_workers=not args.in_process_models,
            max_models=args.max_models,
            worker_deadline=args.worker_deadline,
            idle_unload_minutes=args.idle_unload,
            max_batch=args.max_batch,
            host=args.host,
            port=args.port,
            auth=parse_auth(args.auth, args.auth_file),
            api_enabled=not args.no_api,
            api_key=args.api_key or environ.get(API_KEY_ENV) or None,
            admin_key=args.admin_key or environ.get(ADMIN_KEY_ENV) or None,
            cors_origins=tuple(args.cors_origin),
            queue_timeout=args.queue_timeout,
            api_max_tokens=args.api_max_tokens,
            load_on_request=args.load_on_request,
            hub_endpoint=environ.get(HUB_ENDPOINT_ENV, DEFAULT_HUB),
            hub_token=environ.get(HUB_TOKEN_ENV) or None,
            remote_keys=tuple((name, environ[name]) for name in dict.fromkeys(args.remote_key_env) if environ.get(name)),
            third_party_plugins=switches["third_party"],
            disabled_plugins=switches["disabled"],
            tools_folder=args.tools_folder,
            mcp_config=args.mcp_config,
            extensions=None if args.extensions is None else tuple(
                name.strip() for name in args.extensions.split(",") if name.strip()
            ),
        )
    except ValidationError as error:
        raise UserError(problem_line(error)) from None


def check_port_free(host: str, port: int) -> None:
    """Fail early, in one line, if the port is taken (uvicorn would print a traceback-like log)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (98, 48):  # EADDRINUSE on Linux, macOS
                raise UserError(f"port {port} on {host} is already in use: stop the other server or pick --port") from None
            raise UserError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None


def set_library_environment(environ: dict[str, str]) -> None:
    """Quiet third-party libraries before they are imported: no telemetry, no analytics."""
    environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Gradio's queue rebuilds a pandas summary of its last 10,000 events after every event (12-18 ms
    # of CPU each here) for a monitoring page Loadstar never turns on: never, and keep 100.
    environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2**62))
    environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "100")


def use_private_upload_folder(data_dir: Path) -> None:
    """Gradio's uploads and cached outputs go to ``<data dir>/tmp`` (0700), not a world-readable /tmp folder."""
    from loadstar.engine.atomic import private_folder

    try:
        folder = private_folder(data_dir.resolve(), "tmp")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot use --data-dir {data_dir}: {error}") from None
    os.environ.setdefault("GRADIO_TEMP_DIR", str(folder))


def list_plugins(settings) -> int:
    from loadstar.engine.plugins.host import PluginHost
    from loadstar.engine.user_settings import UserSettingsStore

    host = PluginHost(third_party=settings.third_party_plugins, disabled=settings.disabled_plugins,
                      enabled=UserSettingsStore(settings.settings_file).read().extensions)
    for plugin in host.plugins:
        origin = f"extensions/{plugin.name}" if plugin.kind == "extension" else (
            "built-in" if plugin.built_in else plugin.distribution)
        state = "on" if host.is_enabled(plugin.name) else "off"
        print(f"{plugin.name} {plugin.version} ({origin}): {', '.join(plugin.hooks)} [{state}]")
    for problem in host.problems:
        print(f"error: {problem.describe()}", file=sys.stderr)
    return EXIT_ERROR if host.problems else 0


def run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    set_library_environment(os.environ)
    settings = build_settings(args, dict(os.environ))

    from loadstar.engine.errors import LoadstarError
    from loadstar.engine.models.default_model import place_default_model

    if args.place_default_model:
        print(f"default model in {place_default_model(settings.models_dir)}")
        return 0
    if args.list_plugins:
        return list_plugins(settings)

    if not settings.models_dir.is_dir() and settings.models_dir != DEFAULT_MODELS_DIR:
        raise UserError(f"--models-dir {settings.models_dir} is not a folder")
    if settings.models_dir == DEFAULT_MODELS_DIR:
        try:
            place_default_model(settings.models_dir)  # quick no-op when it is already there
        except LoadstarError as error:
            logging.getLogger("loadstar").warning("%s", error)
    check_port_free(settings.host, settings.port)
    use_private_upload_folder(settings.data_dir)

    from loadstar.engine.facade import Engine

    engine = Engine(settings)
    for problem in engine.plugin_problems():
        logging.getLogger("loadstar").error("%s", problem.describe())
    info = engine.load_startup_model()  # one-line errors for unknown --model, empty folder, bad weights

    import uvicorn

    from loadstar.api.app import build_http_app
    from loadstar.webui.asgi import mount_ui

    app = mount_ui(build_http_app(engine), engine)
    where = f"http://{settings.host}:{settings.port}"
    loaded = f"{info.name} ({info.loader}, {info.device})" if info else "no model"
    api = f", API at {where}/v1" if settings.api_enabled else ""
    print(f"Loadstar is running at {where}{api} with {loaded}. Press Ctrl+C to stop.", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        engine.close()
    return 0


def build_download_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server.py download",
        description="Download a model from the Hugging Face Hub into the models folder, verified and resumable. "
                    "The last line printed is the model folder.",
        epilog=f"The Hub address comes from {HUB_ENDPOINT_ENV} (default {DEFAULT_HUB}); the token from --token or "
               f"{HUB_TOKEN_ENV}. Interrupted downloads resume where they stopped when run again.",
    )
    parser.add_argument("name", metavar="ORG/REPO[:BRANCH]", help="e.g. TheBloke/Llama-2-7B-GPTQ:gptq-4bit-32g-actorder_True, "
                        "or a huggingface.co URL")
    parser.add_argument("--models-dir", metavar="DIR", type=Path, default=DEFAULT_MODELS_DIR,
                        help="where model folders go (default: %(default)s)")
    parser.add_argument("--token", help=f"Hub token for gated or private repos (or set {HUB_TOKEN_ENV})")
    parser.add_argument("--gguf-file", metavar="FILE", help="for repos with several .gguf files: the one to download")
    parser.add_argument("--list-branches", action="store_true",
                        help="list the branches with quantization, size, loaders and memory needed, then exit")
    add_plugin_switches(parser)
    return parser


def add_plugin_switches(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The plugin switches every command honours (the loaders a command sees come from plugins)."""
    parser.add_argument("--disable-plugin", metavar="NAME", action="append", default=[],
                        help=f"never import this plugin (repeatable; also {DISABLE_PLUGINS_ENV}=a,b); "
                             f"{NO_THIRD_PARTY_ENV}=1 leaves out every plugin from other packages")


def plugin_switches(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, object]:
    """PluginHost keywords from the switches and the environment."""
    named = [*args.disable_plugin, *environ.get(DISABLE_PLUGINS_ENV, "").split(",")]
    return {
        "third_party": environ.get(NO_THIRD_PARTY_ENV, "") not in ("1", "true", "yes"),
        "disabled": tuple(dict.fromkeys(name.strip() for name in named if name.strip())),
    }


def run_download(argv: list[str], environ: dict[str, str]) -> int:
    args = build_download_parser().parse_args(argv)
    from loadstar.engine.hub.downloads import DownloadCancelled, HubClient, download
    from loadstar.engine.hub.names import BadModelNameError, parse_model_name
    from loadstar.engine.plugins.host import PluginHost

    try:
        ref = parse_model_name(args.name)
    except BadModelNameError as error:
        raise UserError(str(error)) from None
    client = HubClient(environ.get(HUB_ENDPOINT_ENV, DEFAULT_HUB), args.token or environ.get(HUB_TOKEN_ENV))
    if args.list_branches:
        return list_branches(client, ref.repo_id, PluginHost(**plugin_switches(args, environ)))
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(p) -> None:
        bar = bars.get(p.file)
        if bar is None:
            for old in bars.values():
                old.close()
            bars.clear()
            bar = bars[p.file] = tqdm(total=p.file_total, unit="B", unit_scale=True, desc=p.file, file=sys.stderr)
        bar.update(p.file_done - bar.n)

    if args.models_dir.exists() and not args.models_dir.is_dir():
        raise UserError(f"--models-dir {args.models_dir} is not a folder")
    try:
        result = download(client, ref, args.models_dir, gguf_file=args.gguf_file, progress=progress)
    except (KeyboardInterrupt, DownloadCancelled):
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        for bar in bars.values():
            bar.close()
    state = "already up to date" if result.up_to_date else f"{len(result.fetched)} files verified"
    print(f"{ref} at {result.commit[:12]}: {state}")
    print(result.folder)
    return 0


def list_branches(client, repo_id: str, host) -> int:
    from loadstar.engine.hub.branch_picker import list_branches as rows_for
    from loadstar.engine.hub.branch_picker import list_gguf_files, memory_budget
    from loadstar.engine.models.folder import format_size

    budget = memory_budget()
    loaders = host.loaders()
    for problem in host.problems:
        print(f"warning: {problem.describe()}", file=sys.stderr)
    ggufs = list_gguf_files(client, repo_id, loaders, budget)
    for row in rows_for(client, repo_id, loaders, budget):
        files = [g for g in ggufs if g.branch == row.branch]
        if files:  # a GGUF repo: one line per model file, to pick with --gguf-file
            print(f"{row.branch}: {len(files)} GGUF files")
            for gguf in files:
                print(f"    {gguf.describe()}")
            continue
        print(f"{row.branch}: {row.quantization}, {format_size(row.download_bytes)}, "
              f"loader {row.best_loader or 'none'}, {row.fits}")
        for warning in row.warnings:
            print(f"    warning: {warning}")
        for line in row.loaders:
            print(f"    {line}")
    return 0


def main() -> None:
    from loadstar.engine.errors import LoadstarError

    try:
        if sys.argv[1:2] == ["download"]:
            set_library_environment(os.environ)
            logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
            code = run_download(sys.argv[2:], dict(os.environ))
        else:
            code = run(sys.argv[1:])
    except (UserError, LoadstarError) as error:
        print(f"error: {error}", file=sys.stderr)
        code = EXIT_USAGE if isinstance(error, UserError) else EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
