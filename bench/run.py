"""Run the benchmarks: ``make bench`` (or ``.venv/bin/python -m bench.run [--only SECTION ...]``).

Writes bench/results/<time>.json and bench/results/latest.json, and the tables in docs/BENCHMARKS.md.
Speed goals are judged here, not in the test suite: absolute times on shared machines are noisy,
so every number is a median of several runs and the goals are ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.sections import ROOT, SECTIONS

RESULTS = ROOT / "bench" / "results"
REPORT = ROOT / "docs" / "BENCHMARKS.md"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpu": gpu,
        "python": platform.python_version(), "torch": version("torch"), "transformers": version("transformers"),
        "llama_cpp_python": version("llama_cpp_python"),
        "gptqmodel": version("gptqmodel"), "huggingface_hub": version("huggingface_hub"),
    }


def _by_loader(section: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """The concurrency section by loader (results from before Transformers batched hold llama.cpp's only)."""
    if any(key.startswith("max_batch_") for key in section):
        section = {"llama.cpp": section}
    return {loader: {b: r for b, r in batches.items() if isinstance(r, dict) and b.startswith("max_batch_")}
            for loader, batches in section.items() if isinstance(batches, dict)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (the median is reported)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per decode measurement")
    parser.add_argument("--download-mib", type=int, default=256, help="size of the download test repo")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    calls = {
        "decode": lambda: SECTIONS["decode"](args.runs, args.tokens),
        "kernels": lambda: SECTIONS["kernels"](args.runs, min(args.tokens, 64)),
        "gptq_accuracy": lambda: SECTIONS["gptq_accuracy"](args.runs),
        "loading": lambda: SECTIONS["loading"](args.runs),
        "llamacpp_build": lambda: SECTIONS["llamacpp_build"](1),
        "downloads": lambda: SECTIONS["downloads"](args.runs, args.download_mib),
        "concurrency": lambda: SECTIONS["concurrency"](min(args.tokens, 64)),
        "streams": lambda: SECTIONS["streams"](),
        "serving": lambda: SECTIONS["serving"](args.tokens),
        "gpu": lambda: SECTIONS["gpu"](args.runs, args.tokens),
        "chat_latency": lambda: SECTIONS["chat_latency"](args.runs),
    }
    previous = _latest()
    results: dict[str, Any] = dict(previous.get("sections", {}))
    for name in args.only or list(SECTIONS):
        print(f"== {name}", flush=True)
        started = time.perf_counter()
        results[name] = calls[name]()
        results[name]["_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(results[name], indent=2, default=str), flush=True)
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
              "runs": args.runs, "sections": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    for path in (RESULTS / f"{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(report, indent=2, default=str))
    REPORT.write_text(render(report))
    print(f"wrote {RESULTS / 'latest.json'} and {REPORT}")
    return 0


def _latest() -> dict[str, Any]:
    try:
        return json.loads((RESULTS / "latest.json").read_text())
    except (OSError, ValueError):
        return {}


def _f(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else str(value)


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    s = report["sections"]
    lines = [
        "# Benchmarks", "",
        "Made by `make bench` (`python -m bench.run`); raw numbers in `bench/results/latest.json`.",
        f"Medians of {report['runs']} runs. Date: {report['date']}.", "",
        "| machine | |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in m.items()], "",
    ]
    if "decode" in s:
        d = s["decode"]
        lines += ["## Decode speed and time to first token (default model, greedy, same prompt)", "",
                  "| path | tokens/s | TTFT (s) | decode vs raw | TTFT vs raw |", "|---|---|---|---|---|"]
        names = {"raw": "llama.cpp's own generate", "engine": "engine (llama.cpp loader, in process)",
                 "worker_engine": "engine (llama.cpp loader, in a worker)", "api": "API (worker)",
                 "ui": "browser (worker)", "transformers_engine": "engine, Transformers loader (same GGUF)"}
        for face in ("raw", "engine", "worker_engine", "api", "ui", "transformers_engine"):
            row = d.get(face)
            if row is None:
                continue
            lines.append(f"| {names[face]} | {_f(row['tokens_per_second'], 1)} | {_f(row['ttft_seconds'], 3)} | "
                         f"{_f(row.get('decode_vs_raw', 1.0))} | {_f(row.get('ttft_vs_raw', 1.0))} |")
        if any("decode_vs_raw_runs" in row for row in d.values() if isinstance(row, dict)):
            lines += ["", "Decode vs raw for the engine, API and browser: the median of each run over a raw run "
                      "measured just before it (the machine's speed drifts within a minute)."]
        if "load_seconds" in d:
            ls = d["load_seconds"]
            lines += ["", f"Load of the default model (llama.cpp): {_f(ls['in_process'])} s in process, "
                      f"{_f(ls['worker'])} s in a worker (its start included)."]
        if "llama_cpp_vs_transformers_decode" in d:
            lines += ["", f"llama.cpp vs Transformers decode on the same GGUF: {_f(d['llama_cpp_vs_transformers_decode'])}x."]
        if "prefix_cache" in d:
            pc = d["prefix_cache"]
            lines += [f"Prefix cache: turn 1 evaluated {pc['turn1']['prompt_tokens_evaluated']} of "
                      f"{pc['turn1']['prompt_tokens']} prompt tokens; turn 2 {pc['turn2']['prompt_tokens_evaluated']} of "
                      f"{pc['turn2']['prompt_tokens']} ({_f(100 * pc['turn2_evaluated_fraction'], 0)}%)."]
        lines += ["", "Goals: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in d["goals"].items()), ""]
    if "kernels" in s:
        k = s["kernels"]
        lines += ["## CPU kernels (SmolLM2-135M, decode)", "", "| variant | tokens/s | vs fp32 | kernel |", "|---|---|---|---|"]
        for name, row in k.items():
            if name.startswith("_") or name == "goals":
                continue
            lines.append(f"| {name} | {_f(row['tokens_per_second'], 1)} | {_f(row['vs_fp32'])} | {row['details']} |")
        lines += ["", "Goals: " + ", ".join(f"{g}: {'met' if v else 'MISSED'}" for g, v in k["goals"].items()), ""]
    if "gptq_accuracy" in s:
        acc = s["gptq_accuracy"]
        lines += ["## GPTQ CPU kernels against an exact float32 dequantization", "",
                  "Largest |logit - exact logit| over a chat prompt (\"What is the capital of France?\"), whether "
                  "greedy decoding gives the exact model's answer, and decode tokens/s (SmolLM2-135M, 2 cores).", "",
                  "| checkpoint | kernel/dtype | max logit error | same answer | tokens/s |", "|---|---|---|---|---|"]
        for name, rows in acc.items():
            if name.startswith("_") or name == "worst_error":
                continue
            for kernel, row in rows.items():
                lines.append(f"| {name} | {kernel} | {_f(row['max_logit_error'], 3)} | "
                             f"{'yes' if row['same_answer'] else '**no**'} | {_f(row['tokens_per_second'], 1)} |")
        lines += ["", "Worst error per kernel (the bounds in loaders/autogptq_loader.py): "
                  + ", ".join(f"{k} {_f(v, 2)}" for k, v in acc["worst_error"].items()), ""]
    if "loading" in s:
        lines += ["## Load time and memory (fresh process each)", "",
                  "| loader: model | load (s) | peak RSS (MiB) | RSS added (MiB) | RSS added / file | left after unload (MiB) |",
                  "|---|---|---|---|---|---|"]
        for name, row in s["loading"].items():
            if name.startswith("_"):
                continue
            ratio = row["rss_loaded_mib"] / row["file_mib"] if row.get("file_mib") else None
            lines.append(f"| {name} | {_f(row['load_seconds'], 2)} | {_f(row['peak_rss_mib'], 0)} | "
                         f"{_f(row['rss_loaded_mib'], 0)} | {_f(ratio)} | {_f(row['rss_left_after_unload_mib'], 0)} |")
        lines.append("")
    if "llamacpp_build" in s and "build_seconds" in s["llamacpp_build"]:
        b = s["llamacpp_build"]
        lines += ["## First install: llama-cpp-python built from source", "",
                  f"`pip wheel llama_cpp_python=={b['version']}` with no cache: {_f(b['build_seconds'] / 60, 1)} minutes on "
                  f"{b['cores']} cores. Later installs take the wheel from pip's cache.", ""]
    if "downloads" in s:
        dl = s["downloads"]
        lines += ["## Downloads (local Hub stand-in)", "",
                  f"- Loadstar: {_f(dl['loadstar_mib_per_second'], 0)} MiB/s; raw `snapshot_download`: "
                  f"{_f(dl['snapshot_download_mib_per_second'], 0)} MiB/s; ratio {_f(dl['ratio'])}",
                  f"- Killed mid-file at {dl['killed_at_bytes']} bytes: {dl['retransferred_bytes']} bytes of those came "
                  f"again ({_f(100 * dl['retransferred_fraction'], 2)}%)",
                  "- Goals: " + ", ".join(f"{g}: {'met' if v else 'MISSED'}" for g, v in dl["goals"].items()), ""]
    if "concurrency" in s:
        lines += ["## Concurrent streaming API clients (64 tokens each)", "",
                  "| loader | max batch | clients | total tokens/s | p95 latency (s) |", "|---|---|---|---|---|"]
        by_loader = _by_loader(s["concurrency"])
        for loader, batches in by_loader.items():
            for batch, rows in batches.items():
                for clients, row in rows.items():
                    if isinstance(row, dict) and "total_tokens_per_second" in row:
                        lines.append(f"| {loader} | {batch.removeprefix('max_batch_')} | {clients} | "
                                     f"{_f(row['total_tokens_per_second'], 1)} | {_f(row['p95_latency_seconds'], 1)} |")
        lines.append("")
        for loader, batches in by_loader.items():
            ratio = (s["concurrency"].get(loader) or {}).get("worker_vs_in_process_8_clients")
            if ratio is not None:
                lines.append(f"- {loader}, max batch 8, 8 clients: the model in a worker gives "
                             f"{_f(ratio)}x the tokens/s of the model in the server process.")
            for batch, rows in batches.items():
                if "throughput_8_vs_1" in rows:
                    lines.append(f"- {loader}, max batch {batch.removeprefix('max_batch_')}: 8 clients give "
                                 f"{_f(rows['throughput_8_vs_1'])}x the tokens/s of one, p95 latency {_f(rows['p95_8_vs_1'])}x one alone.")
                if "16_clients" in rows:
                    row = rows["16_clients"]
                    lines.append(f"- {loader}, 16 clients at once: {row['errors']} errors, {row['identical_to_alone']} of "
                                 f"{row['of']} greedy answers identical to the same question asked alone.")
        lines.append("")
    if "streams" in s:
        row = s["streams"]
        lines += ["## Open streams and /health (fake batching model)", "",
                  f"- {row['streams']} streams open, decoding together; {row['streams_completed']} completed.",
                  f"- /health p99: {_f(row['health_p99_ms'], 1)} ms with them open, {_f(row['health_idle_p99_ms'], 1)} ms idle "
                  f"(max {_f(row['health_max_ms'], 1)} ms).",
                  f"- Threads in the server process: {row['threads_idle']} idle, {row['threads_peak']} at most with the streams open.", ""]
    if "serving" in s:
        row = s["serving"]
        lines += ["## Serving several people at once (default model, each copy in its worker)", "",
                  "| what a user waits for | idle | while others are served |", "|---|---|---|",
                  f"| an embedding (during a full batch of 4, 2 waiting) | {_f(row['embedding_idle_seconds'], 3)} s | "
                  f"{_f(row['embedding_during_full_batch_seconds'], 3)} s |",
                  f"| a short question's first token (behind an 8k-token prompt) | {_f(row['short_ttft_idle_seconds'], 3)} s | "
                  f"{_f(row['short_ttft_behind_8k_prompt_seconds'], 3)} s |",
                  f"| the second model's first token (during the first one's full batch) | "
                  f"{_f(row['second_model_ttft_idle_seconds'], 3)} s | {_f(row['second_model_ttft_during_full_batch_seconds'], 3)} s |",
                  "", f"8 API clients (--max-batch 8): {_f(row['api_8_clients_tps'], 1)} tokens/s; raw `llama_decode` with 8 "
                  f"sequences in the same run: {_f(row['raw_llama_decode_8_sequences_tps'], 1)} tokens/s "
                  f"({_f(row['api_8_clients_vs_raw_8'])}x).", ""]
    if "chat_latency" in s:
        row = s["chat_latency"]
        first, late = row["message_1"], row["message_15"]
        lines += ["## A long chat in the browser (default model, 8-token greedy replies, one page)", "",
                  "| message | prompt tokens | Enter to own bubble (s) | Enter to first reply text (s) |",
                  "|---|---|---|---|",
                  f"| 1 (with a system message as long as the chat below) | {first['prompt_tokens']} | "
                  f"{_f(first['bubble_seconds'], 3)} | {_f(first['ttft_seconds'], 3)} |",
                  f"| 15 of one chat | {late['prompt_tokens']} | {_f(late['bubble_seconds'], 3)} | "
                  f"{_f(late['ttft_seconds'], 3)} |",
                  "", f"Message 15 vs message 1: {_f(row['ttft_ratio'])}x (goal <= 1.2x).", ""]
    if "gpu" in s:
        lines += ["## GPU", "", "```", json.dumps(s["gpu"], indent=2, default=str), "```", ""]
    notes = ROOT / "bench" / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
