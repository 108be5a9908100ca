"""llama.cpp builds side by side on the default model: decode and prompt tokens/s, greedy text, ratios.

    python -m bench.llama_cpp_builds NAME=LIBDIR [NAME=LIBDIR ...]

Each LIBDIR holds one build's libllama.so and libggml*.so (llama-cpp-python's ``lib`` folder, or a
CMake build's ``bin``); each is measured in a child process of its own with
``LLAMA_CPP_LIB_PATH=LIBDIR``, in two interleaved rounds, so the machine's drift hits all alike.
A build that dies is reported with its signal. The first NAME is the baseline of the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time
from llama_cpp import Llama, llama_print_system_info
llm = Llama(model_path=sys.argv[1], n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
eos = llm.token_eos()
prompt = "The history of the city begins long ago. " * 30
tokens = llm.tokenize(prompt.encode())
llm.reset(); t = time.perf_counter(); llm.eval(tokens); prefill = len(tokens) / (time.perf_counter() - t)
llm.reset(); start = None; n = 0
for _ in llm.create_completion("Once upon a time", max_tokens=128, temperature=0, logit_bias={eos: -1e9}, stream=True):
    if start is None:
        start = time.perf_counter()
    else:
        n += 1
decode = n / (time.perf_counter() - start)
llm.reset()
text = llm.create_completion(prompt + " In summary,", max_tokens=48, temperature=0)["choices"][0]["text"]
print(json.dumps({"decode": decode, "prefill": prefill, "text": text,
                  "system": llama_print_system_info().decode()}))
"""


def measure(libdir: str, model: str) -> dict:
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=libdir)
    done = subprocess.run([sys.executable, "-c", CHILD, model], capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}" if done.returncode > 0 else f"signal {-done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    from loadstar.engine.models.default_model import default_model_source

    builds = dict(arg.split("=", 1) for arg in argv)
    model = str(default_model_source())
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    for _ in range(2):
        for name, libdir in builds.items():
            runs[name].append(measure(libdir, model))
    base = None
    print(f"# llama.cpp builds, {time.strftime('%Y-%m-%d')}, default model, 2 threads, median of 2 runs\n")
    print("| build | decode tok/s | prompt tok/s | decode vs first | prompt vs first | greedy text same as first |")
    print("|---|---|---|---|---|---|")
    for name, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            print(f"| {name} | died ({results[0]['error']}) | | | | |")
            continue
        decode = statistics.median(r["decode"] for r in good)
        prefill = statistics.median(r["prefill"] for r in good)
        if base is None:
            base = (decode, prefill, good[0]["text"])
        same = "yes" if good[0]["text"] == base[2] else "**no**"
        print(f"| {name} | {decode:.1f} | {prefill:.1f} | {decode / base[0]:.2f} | {prefill / base[1]:.2f} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
