"""The whole test suite as ``make test`` runs it: two phases, one closing line.

1. Everything but the browser tests on ``--workers`` pytest-xdist workers (default 2), whole
   files per worker, each worker on its own share of the CPUs (tests/conftest.py). Alone, the
   suite keeps about one core of two busy; two workers use both.
2. The browser tests and the serving latencies (``whole_machine``), in order, with the whole
   machine: Chromium, the server and the model on one shared CPU miss what these tests watch for
   (a reply that streams, a Stop that lands mid-reply, two models decoding at once).

    python tools/run_tests.py [--workers N] [pytest arguments...]

Arguments go to both phases (a file that has no test of a phase is fine). With ``-m`` in them,
the suite runs once, in order, with exactly those arguments. Each phase writes a JUnit report
under .pytest_cache/; the last line sums both: ``suite: N passed, N failed, N skipped``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_TESTS = 5  # pytest's exit code when a run selected no test


def counts(report: Path) -> dict[str, int]:
    """passed / failed / skipped from a JUnit report (errors count as failed)."""
    if not report.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0}
    suites = ET.parse(report).getroot()
    total = failed = skipped = 0
    for suite in suites.iter("testsuite"):
        total += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}


def pytest(args: list[str], report: Path) -> int:
    report.unlink(missing_ok=True)
    print("$ pytest " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", *args, f"--junitxml={report}"], cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    workers = "2"
    if argv[:1] == ["--workers"]:
        workers, argv = argv[1], argv[2:]
    reports = ROOT / ".pytest_cache" / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    if "-m" in argv:
        phases = [(argv, reports / "selected.xml")]
    else:
        # --no-loadscope-reorder: xdist would sort the files by their number of tests, and the GPTQ
        # files (few tests, minutes each) would start last; tests/conftest.py puts the longest first.
        parallel = (["-n", workers, "--dist", "loadfile", "--no-loadscope-reorder"]
                    if workers not in ("0", "1") else [])
        phases = [([*parallel, "-m", "not browser and not whole_machine", *argv], reports / "parallel.xml"),
                  (["-m", "browser or whole_machine", *argv], reports / "browser.xml")]
    started = time.monotonic()
    codes = [pytest(args, report) for args, report in phases]
    total = {"passed": 0, "failed": 0, "skipped": 0}
    for _, report in phases:
        for key, value in counts(report).items():
            total[key] += value
    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"both phases: {minutes} min {seconds} s", flush=True)
    print(f"suite: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped", flush=True)
    ran = [code for code in codes if code != NO_TESTS]
    if not ran:
        return NO_TESTS
    return next((code for code in ran if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
