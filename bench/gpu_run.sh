#!/usr/bin/env bash
# The whole GPU device session, as the last device call runs it (python tools/gpu_kit.py plan lists
# the calls before it: one per bundle of the kit). Results under $OUT: gpu.json, gpu.log, gpu-run.log.
set -o pipefail
out="${OUT:-test-artefacts/gpu}"
mkdir -p "$out"
PYTHONUNBUFFERED=1 python3 tools/gpu_kit.py run --out "$out" "$@" 2>&1 | tee -a "$out/gpu-run.log"
