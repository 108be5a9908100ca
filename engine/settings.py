"""Application settings: built once by server.py from flags and environment, passed down."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Device = Literal["auto", "cpu", "cuda"]


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models_dir: Path = Field(Path("models"), description="Folder that holds one sub-folder per model.")
    data_dir: Path = Field(Path("user_data"), description="Folder for remembered settings and logs.")
    model: str | None = Field(None, description="Model folder to load at start (default: last used, else the embedded model).")
    loader: str | None = Field(None, description="Pin this loader instead of the automatic choice.")
    load_model: bool = Field(True, description="Load a model at start.")
    device: Device = Field("auto", description="Where loaders put the model: CUDA when present, else CPU.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(7860, ge=1, le=65535, description="Port to listen on.")
    auth: tuple[tuple[str, str], ...] = Field((), description="(user, password) pairs for the web UI.")
    max_batch: int | None = Field(None, ge=1, le=64, description=(
        "Requests a batching loader decodes together (continuous batching); None = the loader's default."))
    model_workers: bool = Field(True, description=(
        "Load each model in a worker process of its own, so a native fault never takes the server down "
        "(off: in the server process, for debugging and in-process tests)."))
    max_models: int = Field(1, ge=1, le=16, description=(
        "Models kept loaded at once; loading one more unloads the least recently used."))
    worker_deadline: float = Field(30.0, ge=2.0, le=3600.0, description=(
        "Seconds a model's worker may send nothing (no token, no heartbeat) before it is reported as not responding."))
    idle_unload_minutes: float | None = Field(None, gt=0, le=10_080, description=(
        "Unload a model no request has used for this many minutes (None: never)."))
    allow_pt: bool = Field(False, description="Allow pickled .pt weights (read with torch weights_only) when no safetensors exist.")
    api_enabled: bool = Field(True, description="Serve the OpenAI-compatible API under /v1.")
    api_key: str | None = Field(None, min_length=8, description="Bearer key for /v1 and /metrics (required off loopback).")
    admin_key: str | None = Field(None, min_length=8, description="Bearer key for /admin (admin API off without it).")
    cors_origins: tuple[str, ...] = Field((), description="Origins allowed to call the API from a browser.")
    queue_timeout: float = Field(300.0, gt=0, le=86400, description="Seconds an API request may wait in the queue.")
    load_on_request: bool = Field(False, description=(
        "An API request naming another local model loads it (one model at a time; others wait for the load)."))
    api_max_tokens: int = Field(1024, ge=1, le=32768, description="Most new tokens per API request.")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest API request body.")
    hub_endpoint: str = Field("https://huggingface.co", description="The Hugging Face Hub (HF_ENDPOINT).")
    hub_token: str | None = Field(None, repr=False, description="Token for gated/private repos (HF_TOKEN); never logged.")
    remote_keys: tuple[tuple[str, str], ...] = Field(
        (), repr=False,
        description="(variable, value) of the environment variables the operator lets remote.json name as api_key_env.",
    )
    third_party_plugins: bool = Field(True, description="Load plugins from other packages (off = only built-ins).")
    disabled_plugins: tuple[str, ...] = Field((), description="Plugins never imported (--disable-plugin NAME).")
    tools_folder: Path | None = Field(None, description="The folder the example read_file tool may read (None: off).")
    mcp_config: Path | None = Field(None, description="JSON file naming the MCP servers whose tools the chat offers.")
    extensions: tuple[str, ...] | None = Field(
        None, description="Turn on exactly these optional extensions and plugins (remembered); None = as last time."
    )

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def settings_file(self) -> Path:
        return self.data_dir / "settings.json"

    @model_validator(mode="after")
    def _wide_listening_needs_auth(self) -> Settings:
        if not self.is_loopback and not self.auth:
            raise ValueError(
                f"refusing to listen on {self.host} without authentication: "
                f"add --auth USER:PASSWORD or --auth-file FILE, or use --host 127.0.0.1"
            )
        if not self.is_loopback and self.api_enabled and not self.api_key:
            raise ValueError(
                f"refusing to serve the API on {self.host} without a key: add --api-key KEY "
                f"(or LOADSTAR_API_KEY), or --no-api"
            )
        if self.api_key and self.admin_key and self.api_key == self.admin_key:
            raise ValueError("the admin key must differ from the API key")
        return self


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere
