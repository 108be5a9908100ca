"""Load one model in a fresh process and report time and memory (used by tests and bench/).

    python -m tests.load_probe MODELS_DIR DATA_DIR MODEL LOADER   -> one JSON line
"""

import gc
import json
import resource
import sys
import time
from pathlib import Path


def main(models_dir: str, data_dir: str, model: str, loader: str) -> None:
    import psutil

    from loadstar.engine.facade import Engine
    from loadstar.engine.settings import Settings

    # In this process: what is measured is the loader's own cost (a worker would hide it from these numbers).
    engine = Engine(Settings(models_dir=Path(models_dir), data_dir=Path(data_dir), model_workers=False))
    engine.plugins.loaders()
    import gptqmodel  # noqa: F401  imports are not the model: take them out of the numbers
    import llama_cpp  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    start = time.perf_counter()
    engine.load_model(model, loader)
    seconds = time.perf_counter() - start
    loaded = process.memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine.unload_model()
    after = process.memory_info().rss
    engine.close()
    print(json.dumps({"load_seconds": seconds, "rss_before": before, "rss_loaded": loaded, "peak_rss": peak,
                      "rss_after_unload": after}))


if __name__ == "__main__":
    main(*sys.argv[1:])
