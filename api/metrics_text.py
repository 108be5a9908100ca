"""Prometheus text exposition of the engine's counters."""

from __future__ import annotations

from loadstar.engine.metrics import MetricsSnapshot
from loadstar.engine.models.loader_api import LoadedModelInfo


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def render_metrics(snapshot: MetricsSnapshot, queue_length: int, loaded: LoadedModelInfo | None) -> str:
    lines = [
        "# HELP loadstar_requests_total Generation requests finished, by finish reason.",
        "# TYPE loadstar_requests_total counter",
    ]
    for reason in ("stop", "length", "cancelled", "error"):
        lines.append(f'loadstar_requests_total{{reason="{reason}"}} {snapshot.requests.get(reason, 0)}')
    lines += [
        "# HELP loadstar_prompt_tokens_total Prompt tokens processed.",
        "# TYPE loadstar_prompt_tokens_total counter",
        f"loadstar_prompt_tokens_total {snapshot.prompt_tokens}",
        "# HELP loadstar_tokens_generated_total Tokens generated.",
        "# TYPE loadstar_tokens_generated_total counter",
        f"loadstar_tokens_generated_total {snapshot.completion_tokens}",
        "# HELP loadstar_generation_seconds_total Time spent generating.",
        "# TYPE loadstar_generation_seconds_total counter",
        f"loadstar_generation_seconds_total {snapshot.generation_seconds:.6f}",
        "# HELP loadstar_tokens_per_second Decode speed of the last finished request.",
        "# TYPE loadstar_tokens_per_second gauge",
        f"loadstar_tokens_per_second {snapshot.last_tokens_per_second:.3f}",
        "# HELP loadstar_queue_length Requests waiting for the model.",
        "# TYPE loadstar_queue_length gauge",
        f"loadstar_queue_length {queue_length}",
        "# HELP loadstar_model_loaded 1 when a model is loaded (labelled with it).",
        "# TYPE loadstar_model_loaded gauge",
    ]
    if loaded is None:
        lines.append("loadstar_model_loaded 0")
    else:
        lines.append(f'loadstar_model_loaded{{model="{_label(loaded.name)}",loader="{_label(loaded.loader)}"}} 1')
    return "\n".join(lines) + "\n"
