"""Benchmark sections. Each returns a dict of results (medians of several runs, and ratios)."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time, in a small village by the sea,"
CHAT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else float("nan")


def _engine(models_dir: Path, data_dir: Path, *, workers: bool = True):
    """An engine as the server makes it (each model in a worker), or with the model in this process
    (``workers=False``: where a benchmark reads the loader's own objects, llama.cpp's raw generate)."""
    from loadstar.engine.facade import Engine
    from loadstar.engine.settings import Settings

    return Engine(Settings(models_dir=models_dir, data_dir=data_dir, model_workers=workers))


def model_call(engine: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the current in-process model's core thread, between two of its steps (torch's and
    llama.cpp's threads belong to the thread that first computed with the model)."""
    from concurrent.futures import Future

    done: Future = Future()
    with engine.models.local() as model:
        model.bench_call = lambda: done.set_result(fn(*args))
    with engine.models.use() as client:
        client.call("bench_call")
    return done.result()


def _default_models(tmp: Path) -> Path:
    from loadstar.engine.models.default_model import place_default_model

    models = tmp / "models"
    place_default_model(models)
    return models


# -- 1. decode: llama.cpp's own generate vs engine vs API vs browser; llama.cpp vs Transformers ---

def _prompt(run: int) -> str:
    """A different opening per run, so that no path reuses the previous run's prompt cache."""
    return f"Story {run + 1}. {PROMPT}"


def decode(runs: int, tokens: int) -> dict[str, Any]:
    from loadstar.engine.generation.requests import Finished, GenerationRequest, TextDelta
    from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
    from loadstar.engine.sampling import SamplingParams

    tmp = Path(tempfile.mkdtemp(prefix="bench-decode-"))
    models = _default_models(tmp)
    engine = _engine(models, tmp / "data", workers=False)  # raw llama.cpp needs its objects here
    started = time.perf_counter()
    info = engine.load_model(DEFAULT_MODEL_NAME, "llama.cpp")
    load_seconds = {"in_process": time.perf_counter() - started}
    # ban_eos: every path writes exactly ``tokens`` tokens
    params = SamplingParams(temperature=0, max_new_tokens=tokens, ban_eos=True)
    results: dict[str, dict[str, list[float]]] = {
        k: {"tps": [], "ttft": []} for k in ("raw", "engine", "worker_engine", "api", "ui", "transformers_engine")}

    with engine.models.local() as model:
        llm = model.native.llm
        eos = llm.token_eos()

    def ban_eos(input_ids: Any, scores: Any) -> Any:
        scores[eos] = -float("inf")
        return scores

    def raw_generate(prompt_tokens: list[int]) -> list[float]:
        """llama.cpp's own generate loop, nothing of ours around it."""
        llm.reset()
        times = []
        for _token in llm.generate(list(prompt_tokens), temp=0.0, top_k=0, top_p=1.0, min_p=0.0,
                                   logits_processor=[ban_eos]):
            times.append(time.perf_counter())
            if len(times) >= tokens:
                break
        return times

    def timed_engine(eng: Any, prompt: str) -> tuple[float, float]:
        start = time.perf_counter()
        first = None
        for event in eng.submit(GenerationRequest(prompt=prompt, params=params)).events():
            if isinstance(event, TextDelta) and first is None:
                first = time.perf_counter()
            if isinstance(event, Finished):
                done = time.perf_counter()
                return first - start, (event.completion_tokens - 1) / (done - first)
        raise RuntimeError("no Finished event")

    def raw_run(run: int) -> float:
        """One run of llama.cpp's own generate; its decode tokens/s."""
        with engine.models.local() as model:
            prompt_tokens = model.encode(_prompt(run))
            start = time.perf_counter()
            # On the model's core thread, as the engine itself runs it (a call between two steps).
            times = model_call(engine, raw_generate, prompt_tokens)
            results["raw"]["ttft"].append(times[0] - start)
            results["raw"]["tps"].append((len(times) - 1) / (times[-1] - times[0]))
            # llama.cpp's generate wrote sequence 0 behind the engine's back: the engine's slots forget
            # their caches (it gets no head start from them either)
            model_call(engine, model.clear_cache)
        return results["raw"]["tps"][-1]

    # Every face's run comes right after a raw run, and its ratio is the median of those pairs': on
    # a shared machine the speed drifts by tens of percent within a minute, which faces measured
    # one after another (raw first, the browser a minute later) would take for their own.
    ratios: dict[str, list[float]] = {face: [] for face in ("engine", "worker_engine", "api", "ui")}

    def paired(face: str, run: int, measure: Callable[..., tuple[float, float]], *args: Any) -> None:
        raw_tps = raw_run(run)
        ttft, tps = measure(*args)
        results[face]["ttft"].append(ttft)
        results[face]["tps"].append(tps)
        ratios[face].append(tps / raw_tps)

    # The same engine as the server runs it: the model in a worker process, every call over a socket.
    in_worker = _engine(models, tmp / "worker-data")
    started = time.perf_counter()
    in_worker.load_model(DEFAULT_MODEL_NAME, "llama.cpp")
    load_seconds["worker"] = time.perf_counter() - started  # the worker's start included

    import httpx
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM, CHROMIUM_ARGS

    port, server = _start_server(models, tmp / "api-data")
    try:
        client = httpx.Client()
        _api_stream(port, prompt="Hello", tokens=2, client=client)  # the connection is open before timing

        def api_run(prompt: str) -> tuple[float, float]:
            ttft, tps, _ = _api_stream(port, prompt=prompt, tokens=tokens, client=client)
            return ttft, tps

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            for run in range(runs):
                paired("engine", run, timed_engine, engine, _prompt(run))
                paired("worker_engine", run, timed_engine, in_worker, _prompt(run))
                paired("api", run, api_run, _prompt(run))
                page = _ui_page(browser, port, tokens)
                try:
                    paired("ui", run, _ui_decode, page)
                finally:
                    page.close()
            browser.close()
    finally:
        _stop(server)
        in_worker.close()
    engine.load_model(DEFAULT_MODEL_NAME, "Transformers")  # the same file, dequantized by transformers
    for run in range(runs):
        ttft, tps = timed_engine(engine, _prompt(run))
        results["transformers_engine"]["ttft"].append(ttft)
        results["transformers_engine"]["tps"].append(tps)
    engine.close()

    summary: dict[str, Any] = {}
    for face, values in results.items():
        summary[face] = {"tokens_per_second": median(values["tps"]), "ttft_seconds": median(values["ttft"]),
                         "runs": len(values["tps"])}
    raw = summary["raw"]
    for face in ("engine", "worker_engine", "api", "ui", "transformers_engine"):
        if face in ratios:  # each run over the raw run just before it
            summary[face]["decode_vs_raw"] = median(ratios[face])
            summary[face]["decode_vs_raw_runs"] = ratios[face]
        else:
            summary[face]["decode_vs_raw"] = summary[face]["tokens_per_second"] / raw["tokens_per_second"]
        summary[face]["ttft_vs_raw"] = summary[face]["ttft_seconds"] / raw["ttft_seconds"]
    llama_vs_hf = summary["engine"]["tokens_per_second"] / summary["transformers_engine"]["tokens_per_second"]
    summary["llama_cpp_vs_transformers_decode"] = llama_vs_hf
    summary["goals"] = {
        "engine_decode_ge_0.97x_raw": summary["engine"]["decode_vs_raw"] >= 0.97,
        "worker_engine_decode_ge_0.97x_raw": summary["worker_engine"]["decode_vs_raw"] >= 0.97,
        "api_decode_ge_0.95x_raw": summary["api"]["decode_vs_raw"] >= 0.95,
        "browser_decode_ge_0.8x_raw": summary["ui"]["decode_vs_raw"] >= 0.8,
        "engine_ttft_le_1.1x_raw": summary["engine"]["ttft_vs_raw"] <= 1.1,
        "api_ttft_le_1.1x_raw_plus_10ms": summary["api"]["ttft_seconds"] <= 1.1 * raw["ttft_seconds"] + 0.010,
        "browser_ttft_le_raw_plus_0.3s": summary["ui"]["ttft_seconds"] <= raw["ttft_seconds"] + 0.3,
        "llama_cpp_ge_3x_transformers_gguf": llama_vs_hf >= 3.0,
    }
    summary["settings"] = {"prompt": PROMPT, "max_new_tokens": tokens, "greedy": True, "ban_eos": True,
                           "model": DEFAULT_MODEL_NAME, "loader": info.loader, "details": info.details}
    summary["load_seconds"] = load_seconds
    summary["prefix_cache"] = _second_turn(models, tmp / "turns")
    return summary


def _second_turn(models: Path, data: Path) -> dict[str, Any]:
    """A two-turn chat through the engine: prompt tokens llama.cpp evaluated on each turn."""
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.generation.requests import GenerationRequest
    from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
    from loadstar.engine.sampling import SamplingParams

    engine = _engine(models, data, workers=False)  # reads the model's own count of evaluated tokens
    engine.load_model(DEFAULT_MODEL_NAME, "llama.cpp")
    params = SamplingParams(temperature=0, max_new_tokens=64)
    turns = [ChatMessage(role="user", content=CHAT[0]["content"])]
    out: dict[str, Any] = {}
    try:
        for turn in (1, 2):
            start = time.perf_counter()
            done = engine.submit(GenerationRequest(messages=tuple(turns), params=params)).result()
            with engine.models.local() as model:
                evaluated = model.prompt_tokens_evaluated
            out[f"turn{turn}"] = {"prompt_tokens": done.prompt_tokens, "prompt_tokens_evaluated": evaluated,
                                  "seconds": time.perf_counter() - start}
            turns += [ChatMessage(role="assistant", content=done.text),
                      ChatMessage(role="user", content="Now tell it again, shorter.")]
    finally:
        engine.close()
    out["turn2_evaluated_fraction"] = out["turn2"]["prompt_tokens_evaluated"] / out["turn2"]["prompt_tokens"]
    return out


def _start_server(models: Path, data: Path, *extra: str) -> tuple[int, subprocess.Popen]:
    from tests.helpers import free_port, start_server, wait_for_health

    port = free_port()
    log = data.parent / f"server-{port}.log"
    data.mkdir(parents=True, exist_ok=True)
    process = start_server("--models-dir", str(models), "--data-dir", str(data), "--port", str(port),
                           "--api-max-tokens", "4096", *extra, log=log)
    wait_for_health(port, process, log)
    return port, process


def _stop(process: subprocess.Popen) -> None:
    from tests.helpers import stop_server

    stop_server(process)


def _api_stream(
    port: int, *, prompt: str | None = None, messages: list | None = None, tokens: int, client: Any = None,
) -> tuple[float, float, float]:
    """(time to first token, decode tokens/s, total seconds) for one streaming API request.

    On ``client``, an httpx.Client made before the clock starts, as real clients keep one (the
    openai SDK does): making one costs 20-45 ms here (its SSL context), which is the client's, not
    the server's. Without it, a new client per request (the concurrency section's threads)."""
    import httpx

    from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME

    body: dict[str, Any] = {"model": DEFAULT_MODEL_NAME, "temperature": 0, "max_tokens": tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    path = "/v1/completions" if prompt is not None else "/v1/chat/completions"
    body.update({"prompt": prompt} if prompt is not None else {"messages": messages})
    start = time.perf_counter()
    first = last = None
    usage = None
    stream = client.stream if client is not None else httpx.stream
    with stream("POST", f"http://127.0.0.1:{port}{path}", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            choices = chunk.get("choices") or []
            text = choices and (choices[0].get("text") or (choices[0].get("delta") or {}).get("content"))
            if text:
                now = time.perf_counter()
                first = first or now
                last = now
    total = time.perf_counter() - start
    count = usage["completion_tokens"] if usage else 0
    tps = (count - 1) / (last - first) if first and last and last > first else float("nan")
    return (first - start) if first else float("nan"), tps, total


UI_TIMES_JS = r"""() => new Promise(resolve => {
  const chat = document.querySelector('#chatbot'), status = document.querySelector('#chat-status');
  let first = null;
  // textContent, not innerText: innerText lays the page out on every change, beside the model
  const shown = () => { const bots = chat.querySelectorAll('[data-testid="bot"]');
                        return bots.length && bots[bots.length - 1].textContent.trim(); };
  const watch = new MutationObserver(() => {
    const now = performance.now() - start;
    if (first === null && shown()) first = now;
    if (first !== null && /^\s*(Done|Reached)/.test(status.textContent)) { watch.disconnect(); resolve([first, now]); }
  });
  watch.observe(document.body, {subtree: true, childList: true, characterData: true});
  const start = performance.now();
  document.querySelector('#send').click();
})"""


def _ui_settings(page: Any, values: dict[str, Any], ban_eos: bool = False) -> None:
    """Set parameters in the Parameters panel beside the chat, then close it."""
    from tests.browser import open_parameters

    page.locator("#chat-input textarea").wait_for()
    open_parameters(page)
    for name, value in values.items():
        box = page.locator(f"#param-{name} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    if ban_eos:
        page.locator("#param-ban_eos input[type=checkbox]").check()
    open_parameters(page, False)


# Enter to the user's own bubble, to the first reply text drawn, and to the reply done (ms, in the page).
TURN_TIMES_JS = r"""() => new Promise(resolve => {
  const chat = document.querySelector('#chatbot'), status = document.querySelector('#chat-status');
  const users = () => chat.querySelectorAll('[data-testid="user"]').length;
  const bots = () => chat.querySelectorAll('[data-testid="bot"]');
  const usersBefore = users(), botsBefore = bots().length;
  let bubble = null, first = null;
  // textContent, not innerText: reading innerText lays the page out, on every change, beside the model
  const watch = new MutationObserver(() => {
    const now = performance.now() - start;
    if (bubble === null && users() > usersBefore) bubble = now;
    const b = bots();
    if (first === null && b.length > botsBefore && b[b.length - 1].textContent.trim()) first = now;
    if (first !== null && /^\s*(Done|Reached)/.test(status.textContent)) { watch.disconnect(); resolve([bubble, first, now]); }
  });
  watch.observe(document.body, {subtree: true, childList: true, characterData: true});
  const start = performance.now();
  document.querySelector('#send').click();
})"""


def _chat_latency(port: int, runs: int = 3, turns: int = 15) -> dict[str, Any]:
    """Enter to first reply text for message 1 and message ``turns`` of one chat in the browser, at an
    equal prompt size: message 1 is sent with a system message as long (in tokens) as the 14 earlier
    exchanges of the long chat. Replies are greedy and short (8 tokens); timed in the page."""
    import httpx
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM, CHROMIUM_ARGS, bot_messages, reply_text

    def turn(page: Any, text: str) -> list[float]:
        page.locator("#chat-input textarea").fill(text)
        page.wait_for_timeout(300)
        return [t / 1000 for t in page.evaluate(TURN_TIMES_JS)]

    def count(messages: list[dict[str, str]]) -> int:
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=300, json={
            "model": "current", "messages": messages, "max_tokens": 1, "temperature": 0})
        answer.raise_for_status()
        return int(answer.json()["usage"]["prompt_tokens"])

    long_chat: list[list[float]] = []
    first_message: list[list[float]] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        _ui_settings(page, {"temperature": 0, "max_new_tokens": 8})
        history: list[dict[str, str]] = []
        for number in range(1, turns + 1):
            question = f"Question {number}: name a fruit."
            times = turn(page, question)
            if number == turns:
                long_chat.append(times)
            history.append({"role": "user", "content": question})
            history.append({"role": "assistant", "content": reply_text(bot_messages(page).last)})
        for _ in range(runs - 1):  # message 15 again: Regenerate would not time Enter, so Remove last, then send
            page.locator("#remove-last").click()
            page.wait_for_timeout(1500)
            long_chat.append(turn(page, f"Question {turns}: name a fruit."))
        target = count(history[:-1])
        filler = " ".join(["The orchard keeps apples, pears and plums in tidy rows."] * 200)
        words = filler.split()
        system = " ".join(words[: max(1, len(words) * target // max(count([{"role": "system", "content": filler},
                                                                             {"role": "user", "content": "q"}]), 1))])
        equal = count([{"role": "system", "content": system}, {"role": "user", "content": "Question 1: name a fruit."}])
        for _ in range(runs):
            page.locator("#new-chat").click()
            page.wait_for_timeout(1000)
            page.get_by_text("System message").first.click()
            page.locator("#system-message textarea").fill(system)
            page.get_by_text("System message").first.click()
            first_message.append(turn(page, "Question 1: name a fruit."))
        browser.close()
    first_ttft = median([t[1] for t in first_message])
    long_ttft = median([t[1] for t in long_chat])
    return {
        "message_1": {"bubble_seconds": median([t[0] for t in first_message]), "ttft_seconds": first_ttft,
                      "prompt_tokens": equal},
        f"message_{turns}": {"bubble_seconds": median([t[0] for t in long_chat]), "ttft_seconds": long_ttft,
                             "prompt_tokens": target},
        "ttft_ratio": long_ttft / first_ttft,
        "goals": {"message_15_ttft_le_1.2x_message_1": long_ttft / first_ttft <= 1.2},
        "runs": runs,
    }


def chat_latency(runs: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-chat-"))
    models = _default_models(tmp)
    port, server = _start_server(models, tmp / "data")
    try:
        return _chat_latency(port, max(runs, 2))
    finally:
        _stop(server)


def _ui_page(browser: Any, port: int, tokens: int) -> Any:
    """A chat page set as raw is measured (greedy, end-of-sequence banned, ``tokens`` new tokens),
    the prompt typed, the settings' own events done."""
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/")
    _ui_settings(page, {"temperature": 0, "max_new_tokens": tokens}, ban_eos=True)
    page.locator("#chat-input textarea").fill(PROMPT)
    page.wait_for_timeout(1000)  # as after typing: the settings' own events are done
    return page


def _ui_decode(page: Any) -> tuple[float, float]:
    """Send on a ``_ui_page``: (click to the first reply text drawn, decode tokens/s as raw's: tokens
    after the first over the time from the first text to the finished status). Timed in the page
    (each poll from here would be a round trip taking CPU from the model)."""
    first, done = page.evaluate(UI_TIMES_JS)
    made = int(re.search(r"\((\d+) tokens", page.locator("#chat-status").inner_text()).group(1))
    return first / 1000, (made - 1) / ((done - first) / 1000)


# -- 2. CPU GPTQ kernels vs fp32 and bf16 ----------------------------------------------------------

def kernels(runs: int, tokens: int) -> dict[str, Any]:
    from loadstar.engine.generation.requests import GenerationRequest
    from loadstar.engine.sampling import SamplingParams
    from tests.checkpoints import cached, gptq_checkpoint, smollm2_safetensors

    cache = Path(os.environ.get("LOADSTAR_TEST_CACHE", Path.home() / ".cache" / "loadstar-test-checkpoints"))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-kernels-"))
    models = tmp / "models"
    models.mkdir()
    variants = {
        "fp32": (cached(cache, "smollm2-135m-bf16-safetensors", smollm2_safetensors), "Transformers", {"dtype": "float32"}),
        "bf16": (cached(cache, "smollm2-135m-bf16-safetensors", smollm2_safetensors), "Transformers", {"dtype": "bfloat16"}),
        "gptq-4bit-g64": (gptq_checkpoint(cache, 4, 64, True), "AutoGPTQ", {}),
        "gptq-4bit-g128": (gptq_checkpoint(cache, 4, 128, False), "AutoGPTQ", {}),
        "gptq-8bit": (gptq_checkpoint(cache, 8, -1, True), "AutoGPTQ", {}),
        "gptq-8bit-bf16": (gptq_checkpoint(cache, 8, -1, True), "AutoGPTQ", {"dtype": "bfloat16"}),
    }
    engine = _engine(models, tmp / "data")
    out: dict[str, Any] = {}
    for name, (path, loader, options) in variants.items():
        (models / name).symlink_to(path, target_is_directory=True)
        info = engine.load_model(name, loader, options)
        rates = []
        for _ in range(runs + 1):  # the first run warms kernels up
            done = engine.submit(GenerationRequest(prompt=PROMPT, params=SamplingParams(temperature=0, max_new_tokens=tokens))).result()
            rates.append(done.tokens_per_second)
        out[name] = {"tokens_per_second": median(rates[1:]), "details": info.details or info.dtype}
    engine.close()
    base = out["fp32"]["tokens_per_second"]
    for name in out:
        out[name]["vs_fp32"] = out[name]["tokens_per_second"] / base
    out["goals"] = {
        "4bit_ge_2.5x_fp32": max(out["gptq-4bit-g64"]["vs_fp32"], out["gptq-4bit-g128"]["vs_fp32"]) >= 2.5,
        "8bit_ge_1.5x_fp32": out["gptq-8bit"]["vs_fp32"] >= 1.5,
    }
    return out


def gptq_accuracy(runs: int) -> dict[str, Any]:
    """Every CPU kernel on every GPTQ checkpoint of the test set against an exact float32
    dequantization: the largest logit difference over a chat prompt, whether greedy decoding
    writes the same answer, and decode speed. The loader's kernel table comes from here."""
    import gc

    from loadstar.engine.models.gptq_tensors import infer_gptq_from_safetensors
    from loadstar.loaders.autogptq_loader import CPU_KERNELS, DENSE
    from tests.checkpoints import gptq_checkpoint
    from tests.kernel_accuracy import decode_speed, exact_model, greedy, kernel_model, logits, max_error, prompt_ids

    cache = Path(os.environ.get("LOADSTAR_TEST_CACHE", Path.home() / ".cache" / "loadstar-test-checkpoints"))
    combos = {"4bit-g64-act": (4, 64, True), "4bit-g128": (4, 128, False), "8bit-nogroup-act": (8, -1, True),
              "8bit-g128-act": (8, 128, True), "8bit-g128": (8, 128, False)}
    out: dict[str, Any] = {}
    for name, combo in combos.items():
        folder = gptq_checkpoint(cache, *combo)
        whole = infer_gptq_from_safetensors(folder / "model.safetensors").group_divides_inputs()
        ids = prompt_ids(folder)
        exact = exact_model(folder)
        reference, answer = logits(exact, ids), greedy(exact, ids)
        rows = {f"{DENSE}/float32": {"max_logit_error": 0.0, "same_answer": True,
                                     "tokens_per_second": median([decode_speed(exact, ids) for _ in range(runs)])}}
        del exact
        for kernel in CPU_KERNELS:
            if kernel.backend == DENSE or combo[0] not in kernel.bits or (kernel.needs_whole_groups and not whole):
                continue
            model = kernel_model(folder, kernel.backend, kernel.dtype)
            rows[f"{kernel.backend}/{kernel.dtype}"] = {
                "max_logit_error": max_error(logits(model, ids), reference),
                "same_answer": greedy(model, ids) == answer,
                "tokens_per_second": median([decode_speed(model, ids) for _ in range(runs)]),
            }
            del model
            gc.collect()
        out[name] = rows
    worst: dict[str, float] = {}
    for rows in out.values():
        for kernel, row in rows.items():
            worst[kernel] = max(worst.get(kernel, 0.0), row["max_logit_error"])
    out["worst_error"] = worst
    return out


# -- 3. load time, peak RSS, RSS after unload ------------------------------------------------------

def loading(runs: int) -> dict[str, Any]:
    from tests.checkpoints import cached, gptq_checkpoint, smollm2_safetensors

    cache = Path(os.environ.get("LOADSTAR_TEST_CACHE", Path.home() / ".cache" / "loadstar-test-checkpoints"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-load-"))
    models = _default_models(tmp)
    links = {
        "smol-safetensors": cached(cache, "smollm2-135m-bf16-safetensors", smollm2_safetensors),
        "smol-gptq-4bit-g64": gptq_checkpoint(cache, 4, 64, True),
        "smol-gptq-8bit": gptq_checkpoint(cache, 8, -1, True),
    }
    for name, path in links.items():
        (models / name).symlink_to(path, target_is_directory=True)
    cases = [("SmolLM2-135M-Instruct", "llama.cpp", "GGUF Q4_1"), ("SmolLM2-135M-Instruct", "Transformers", "GGUF"),
             ("smol-safetensors", "Transformers", "safetensors bf16"),
             ("smol-gptq-4bit-g64", "AutoGPTQ", "GPTQ 4-bit g64"), ("smol-gptq-8bit", "AutoGPTQ", "GPTQ 8-bit")]
    out = {}
    for model, loader, label in cases:
        samples = []
        for _ in range(runs):
            result = subprocess.run([sys.executable, "-m", "tests.load_probe", str(models), str(tmp / "data"), model, loader],
                                    cwd=ROOT, capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise RuntimeError(result.stderr[-2000:])
            samples.append(json.loads(result.stdout.strip().splitlines()[-1]))
        mib = 1024 * 1024
        out[f"{loader}: {label}"] = {
            "file_mib": _size_mib(models / model),
            "load_seconds": median([s["load_seconds"] for s in samples]),
            "peak_rss_mib": median([s["peak_rss"] / mib for s in samples]),
            "rss_loaded_mib": median([(s["rss_loaded"] - s["rss_before"]) / mib for s in samples]),
            "rss_left_after_unload_mib": median([(s["rss_after_unload"] - s["rss_before"]) / mib for s in samples]),
        }
    return out


def _size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.resolve().rglob("*") if p.is_file()) / (1024 * 1024)


def llamacpp_build(runs: int) -> dict[str, Any]:
    """What a fresh machine pays once: building llama-cpp-python from its source (no pip cache)."""
    from importlib.metadata import version

    wanted = version("llama_cpp_python")
    tmp = Path(tempfile.mkdtemp(prefix="bench-build-"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q", "-w", str(tmp),
                             f"llama_cpp_python=={wanted}"], capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        return {"error": result.stderr[-1000:], "seconds": seconds}
    return {"version": wanted, "build_seconds": seconds, "cores": os.cpu_count()}


# -- 4. downloads vs snapshot_download, and a killed download --------------------------------------

def downloads(runs: int, size_mib: int) -> dict[str, Any]:
    from huggingface_hub import snapshot_download

    from loadstar.engine.hub.downloads import HubClient, download
    from loadstar.engine.hub.names import ModelRef
    from tests.hub_standin import HubStandIn

    hub = HubStandIn().start()
    repo = "bench/Throughput-GPTQ"
    half = size_mib * 1024 * 1024 // 2
    files = {"config.json": b'{"model_type": "llama"}', "quantize_config.json": b'{"bits": 4, "group_size": 128}',
             "tokenizer.json": b"{}", "model-00001-of-00002.safetensors": os.urandom(half),
             "model-00002-of-00002.safetensors": os.urandom(half)}
    hub.repo(repo).add_commit("main", files)
    total = sum(len(v) for v in files.values())
    ours, raw = [], []
    try:
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                download(HubClient(hub.url), ModelRef(repo), Path(tmp))
                ours.append(total / (time.perf_counter() - start))
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                snapshot_download(repo, cache_dir=tmp, endpoint=hub.url)
                raw.append(total / (time.perf_counter() - start))
        retransfer = _killed_download(hub, repo)
    finally:
        hub.stop()
    mib = 1024 * 1024
    result = {
        "bytes": total,
        "loadstar_mib_per_second": median(ours) / mib,
        "snapshot_download_mib_per_second": median(raw) / mib,
        "ratio": median(ours) / median(raw),
        **retransfer,
    }
    result["goals"] = {"throughput_ge_0.9x_snapshot_download": result["ratio"] >= 0.9,
                       "retransferred_lt_5pct_of_done": retransfer["retransferred_fraction"] < 0.05}
    return result


def _killed_download(hub: Any, repo: str) -> dict[str, Any]:
    """Kill the CLI mid-file, run it again: how many of the bytes already there came again."""
    big = "model-00001-of-00002.safetensors"
    hub.faults.bytes_per_second = 20 * 1024 * 1024
    hub.sent.clear()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "HF_ENDPOINT": hub.url}
        command = [sys.executable, str(ROOT / "server.py"), "download", repo, "--models-dir", tmp]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        staging = Path(tmp) / ".downloads" / "bench_Throughput-GPTQ"
        size = len(hub.repo(repo).commits[hub.repo(repo).branches["main"]][big])
        while True:
            parts = list(staging.glob(f"{big}.*.part")) if staging.exists() else []
            if parts and parts[0].stat().st_size > size // 2:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        kept = parts[0].stat().st_size
        before = hub.sent[big]
        hub.faults.bytes_per_second = None
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    again = hub.sent[big] - before
    retransferred = max(0, again - (size - kept))
    return {"killed_at_bytes": kept, "retransferred_bytes": retransferred, "retransferred_fraction": retransferred / kept}


# -- 5. concurrency over the API -------------------------------------------------------------------

QUESTIONS = [
    "What is the capital of France?", "What is the capital of Italy?", "Name three colours.", "What is 2 + 2?",
    "Write a haiku about the sea.", "What do bees make?", "Who wrote Hamlet?", "What is water made of?",
    "Name a planet.", "What is the opposite of hot?", "How many legs has a spider?", "What colour is the sky?",
    "Name a fruit.", "What is ice?", "Who painted the Mona Lisa?", "What is the largest ocean?",
]


def _api_answer(port: int, question: str) -> str:
    import httpx

    body = {"model": "any", "temperature": 0, "max_tokens": 64, "messages": [{"role": "user", "content": question}]}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def _clients(port: int, clients: int, tokens: int) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    made = [httpx.Client() for _ in range(clients)]  # before the clock: real clients keep theirs (see _api_stream)

    def one(client: Any) -> None:
        _ttft, _tps, total = _api_stream(port, messages=CHAT, tokens=tokens, client=client)
        with lock:
            latencies.append(total)

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(client,)) for client in made]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    for client in made:
        client.close()
    return {"total_tokens_per_second": clients * tokens / wall, "p95_latency_seconds": p95(latencies)}


def concurrency(tokens: int, levels: tuple[int, ...] = (1, 4, 8),
                loaders: tuple[str, ...] = ("llama.cpp", "Transformers")) -> dict[str, Any]:
    """Streaming API clients on the default model, for each loader that batches: one at a time
    (--max-batch 1, as before continuous batching) and batched (--max-batch 8); then 16 clients
    at once, each answer compared with the same question asked alone. The model is in a worker, as
    the server runs it; llama.cpp batched is measured with the model in the server process too
    (``max_batch_8_in_process``), so the worker's cost shows as a ratio of one run."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-conc-"))
    models = _default_models(tmp)
    out: dict[str, Any] = {}
    for loader in loaders:
        out[loader] = {}
        runs = [(1, False), (8, False)] + ([(8, True)] if loader == "llama.cpp" else [])
        for batch, in_process in runs:
            extra = ("--in-process-models",) if in_process else ()
            port, server = _start_server(models, tmp / f"data-{loader}-{batch}-{in_process}", "--max-batch", str(batch),
                                         "--loader", loader, *extra)
            try:
                _clients(port, 1, tokens)  # warm-up
                rows: dict[str, Any] = {str(clients): _clients(port, clients, tokens) for clients in levels}
                rows["throughput_8_vs_1"] = rows["8"]["total_tokens_per_second"] / rows["1"]["total_tokens_per_second"]
                rows["p95_8_vs_1"] = rows["8"]["p95_latency_seconds"] / rows["1"]["p95_latency_seconds"]
                if batch > 1:
                    rows["16_clients"] = _sixteen_at_once(port)
            finally:
                _stop(server)
            out[loader][f"max_batch_{batch}" + ("_in_process" if in_process else "")] = rows
        if "max_batch_8_in_process" in out[loader]:
            worker, here = out[loader]["max_batch_8"], out[loader]["max_batch_8_in_process"]
            out[loader]["worker_vs_in_process_8_clients"] = (
                worker["8"]["total_tokens_per_second"] / here["8"]["total_tokens_per_second"])
    return out


def _sixteen_at_once(port: int) -> dict[str, int]:
    """16 questions at once: how many fail, and how many greedy answers equal the question asked alone."""
    alone = [_api_answer(port, q) for q in QUESTIONS]
    together: list[str | None] = [None] * len(QUESTIONS)
    errors: list[str] = []

    def ask(i: int) -> None:
        try:
            together[i] = _api_answer(port, QUESTIONS[i])
        except Exception as error:  # counted, not raised: the point is how many
            errors.append(str(error))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"errors": len(errors), "identical_to_alone": sum(a == b for a, b in zip(alone, together, strict=True)),
            "of": len(QUESTIONS)}


def streams(count: int = 150, calls: int = 300) -> dict[str, Any]:
    """/health while ``count`` streams are open: a fake batching model behind the real app and
    uvicorn in one process, the streams' client in a second and /health timed from this one;
    latency percentiles and the server process's thread count."""
    import psutil

    def p99(values: list[float]) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]

    def health(base: str) -> None:
        """GET /health on a fresh socket, nothing else timed: a kept-alive httpx connection took
        ~44 ms a call, idle or not (a delayed-ACK stall on that path, still to be traced), and a new
        httpx client costs ~40 ms of its own, either of which would hide the server."""
        import socket

        host, port = base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        if not reply.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(reply[:80])

    def timed(base: str, proc: psutil.Process) -> tuple[list[float], int]:
        times, peak = [], 0
        for _ in range(calls):
            start = time.perf_counter()
            health(base)
            times.append(time.perf_counter() - start)
            peak = max(peak, proc.num_threads())
        return times, peak

    env = {**os.environ, "STREAMS": str(count), "WORDS": "400"}  # 400 steps of 0.05 s: open for 20 s
    server = subprocess.Popen([sys.executable, "-m", "tests.test_api_streams", "serve"], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        base = server.stdout.readline().strip()
        proc = psutil.Process(server.pid)
        timed(base, proc)  # warm
        idle, threads_idle = timed(base, proc)
        streams_client = subprocess.Popen([sys.executable, "-m", "tests.test_api_streams", "streams", base, str(count)],
                                          cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert streams_client.stdout.readline().strip() == "opened"
        loaded, threads_peak = timed(base, proc)
        done = streams_client.stdout.readline().strip()
        streams_client.wait(120)
    finally:
        server.stdin.close()
        server.wait(60)
    return {"streams": count, "streams_completed": int(done.split()[-1]) if done.startswith("done") else 0,
            "health_idle_p99_ms": 1000 * p99(idle), "health_p99_ms": 1000 * p99(loaded),
            "health_max_ms": 1000 * max(loaded), "threads_idle": threads_idle, "threads_peak": threads_peak}


# -- 6. GPU ------------------------------------------------------------------------------------------

def gpu(runs: int, tokens: int) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device on this machine"}
    from loadstar.engine.generation.requests import GenerationRequest
    from loadstar.engine.sampling import SamplingParams
    from tests.checkpoints import gptq_checkpoint

    cache = Path(os.environ.get("LOADSTAR_TEST_CACHE", Path.home() / ".cache" / "loadstar-test-checkpoints"))
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    models = tmp / "models"
    models.mkdir()
    (models / "q4").symlink_to(gptq_checkpoint(cache, 4, 64, True), target_is_directory=True)
    engine = _engine(models, tmp / "data")
    out = {}
    for label, loader, options in (("ExLlamaV2", "ExLlamaV2", {}), ("gptqmodel CUDA", "AutoGPTQ", {"device": "cuda"}),
                                   ("transformers fp16", "Transformers", {"device": "cuda", "dtype": "float16"})):
        try:
            engine.load_model("q4", loader, options)
        except Exception as error:  # report, keep measuring the others
            out[label] = {"error": str(error)}
            continue
        rates = [engine.submit(GenerationRequest(prompt=PROMPT, params=SamplingParams(temperature=0, max_new_tokens=tokens)))
                 .result().tokens_per_second for _ in range(runs + 1)]
        out[label] = {"tokens_per_second": median(rates[1:])}
    engine.close()
    if "tokens_per_second" in out.get("ExLlamaV2", {}) and "tokens_per_second" in out.get("gptqmodel CUDA", {}):
        ratio = out["ExLlamaV2"]["tokens_per_second"] / out["gptqmodel CUDA"]["tokens_per_second"]
        out["goals"] = {"exllamav2_ge_1.5x_gptqmodel": ratio >= 1.5, "ratio": ratio}
    return out


# -- 6. serving several people: one engine core per model ---------------------------------------

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 800  # about 8,000 tokens


def _raw_batch_tps(models: Path, tmp: Path, sequences: int, tokens: int) -> float:
    """Tokens/s of ``sequences`` greedy sequences of the API clients' chat decoded together by llama.cpp's
    batch alone (our ``LlamaCppBatch`` stepped in a loop: ``llama_decode`` and sampling, nothing of the
    server), prompts included as the clients' wall clock includes them."""
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.generation.requests import GenerationRequest
    from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
    from loadstar.engine.sampling import SamplingParams

    engine = _engine(models, tmp / f"raw-{sequences}", workers=False)
    engine.load_model(DEFAULT_MODEL_NAME, "llama.cpp", {"max_batch": sequences})
    params = SamplingParams(temperature=0, max_new_tokens=tokens, ban_eos=True)

    prompt = engine.preview(GenerationRequest(messages=(ChatMessage(**CHAT[0]),))).prompt  # as the API's

    def run() -> float:
        with engine.models.local() as model:
            batch = model.open_batch()
        started = time.perf_counter()  # prompts read and tokens made, as the clients' wall clock counts them
        for key in range(sequences):
            batch.add(key, prompt, params, seed=key)
        done: set[int] = set()
        made = 0
        while len(done) < sequences:
            for key, step in batch.step().items():
                if step.piece is not None:
                    made += step.piece.tokens
                if step.done:
                    done.add(key)
        seconds = time.perf_counter() - started
        batch.close()
        return made / seconds

    result = model_call(engine, run)  # on the model's core thread, as the engine steps it
    engine.close()
    return float(result)


def serving(tokens: int) -> dict[str, Any]:
    """What a user waits for while others are served, each model in its worker (as the server runs
    them), each time beside the same wait on an idle model: an embedding during a full batch, a
    short question's first token behind an 8k-token prompt, the second model's first token during
    the first one's full batch; and 8 API clients against raw ``llama_decode`` with 8 sequences."""
    from loadstar.engine.chat.messages import ChatMessage
    from loadstar.engine.generation.requests import GenerationRequest, TextDelta
    from loadstar.engine.models.default_model import DEFAULT_MODEL_NAME
    from loadstar.engine.sampling import SamplingParams
    from tests.test_model_workers import two_default_models

    tmp = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    models = two_default_models(tmp)
    engine = _engine(models, tmp / "data")
    engine.models.max_models = 2
    engine.load_model(DEFAULT_MODEL_NAME, "llama.cpp")
    engine.ensure_loaded("SmolLM2-copy")
    stream = SamplingParams(temperature=0, max_new_tokens=4000, ban_eos=True)
    short = SamplingParams(temperature=0, max_new_tokens=4)

    def ask(text: str, owner: str, model: str | None = None, params: SamplingParams = short) -> Any:
        return engine.submit(GenerationRequest(messages=(ChatMessage(role="user", content=text),), params=params,
                                               owner=owner, model=model))

    def ttft(handle: Any) -> float:
        started = time.perf_counter()
        next(e for e in handle.events() if isinstance(e, TextDelta))
        seconds = time.perf_counter() - started
        handle.result()
        return seconds

    def embed_seconds() -> float:
        started = time.perf_counter()
        engine.embed(["What is the capital of France?"])
        return time.perf_counter() - started

    def full_batch() -> list[Any]:
        handles = [ask(f"Tell story {i} about a dragon.", f"user{i}", params=stream) for i in range(6)]
        for handle in handles[:4]:
            next(e for e in handle.events() if isinstance(e, TextDelta))
        return handles

    out: dict[str, Any] = {}
    try:
        out["embedding_idle_seconds"] = embed_seconds()
        out["short_ttft_idle_seconds"] = ttft(ask("Hi!", "asker"))
        out["second_model_ttft_idle_seconds"] = ttft(ask("Hi!", "other", "SmolLM2-copy"))
        busy = full_batch()
        out["embedding_during_full_batch_seconds"] = embed_seconds()
        out["second_model_ttft_during_full_batch_seconds"] = ttft(ask("Hi!", "other", "SmolLM2-copy"))
        for handle in busy:
            handle.cancel()
        long = engine.submit(GenerationRequest(prompt=LONG_PROMPT, params=short, owner="reader"))
        next(e for e in long.events() if type(e).__name__ == "Started")
        out["short_ttft_behind_8k_prompt_seconds"] = ttft(ask("Hi!", "asker"))
        long.cancel()
    finally:
        engine.close()
    raw8 = _raw_batch_tps(models, tmp, 8, tokens)
    port, server = _start_server(models, tmp / "api8", "--max-batch", "8", "--loader", "llama.cpp")
    try:
        _clients(port, 1, tokens)  # warm-up
        api8 = _clients(port, 8, tokens)["total_tokens_per_second"]
    finally:
        _stop(server)
    out["raw_llama_decode_8_sequences_tps"] = raw8
    out["api_8_clients_tps"] = api8
    out["api_8_clients_vs_raw_8"] = api8 / raw8
    out["goals"] = {
        "embedding_during_full_batch_lt_5s": out["embedding_during_full_batch_seconds"] < 5,
        "short_ttft_behind_8k_prompt_lt_3s": out["short_ttft_behind_8k_prompt_seconds"] < 3,
        "second_model_ttft_during_full_batch_lt_3s": out["second_model_ttft_during_full_batch_seconds"] < 3,
        "api_8_clients_ge_0.9x_raw_8": out["api_8_clients_vs_raw_8"] >= 0.9,
    }
    return out


SECTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "decode": decode, "kernels": kernels, "gptq_accuracy": gptq_accuracy, "loading": loading, "llamacpp_build": llamacpp_build, "downloads": downloads,
    "concurrency": concurrency, "streams": streams, "serving": serving, "gpu": gpu, "chat_latency": chat_latency,
}
