"""mypy sees the package by its import names: a probe of loadstar.engine's types is not Any."""

import subprocess
import sys

from tests.helpers import ROOT


def test_mypy_sees_loadstar_engine():
    done = subprocess.run([sys.executable, "tools/typecheck.py", "--reveal"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    # Were loadstar.engine missing to mypy, Engine would be Any and this would read "Any".
    assert ("def (self: loadstar.engine.facade.Engine, request: loadstar.engine.generation.requests.GenerationRequest)"
            " -> loadstar.engine.generation.handle.GenerationHandle") in done.stdout, done.stdout
