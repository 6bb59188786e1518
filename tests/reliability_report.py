"""Pytest plugin + command: the reliability table in RELIABILITY.md comes from test runs.

A test marked ``@pytest.mark.reliability(fault, checked)`` becomes a row (fault, what was
checked, result); a test that checks several faults in sequence carries one marker per fault.
Several tests with the same fault (e.g. the cases of a parametrized table) share one row whose
result counts them.

A test run only records its rows in ``.pytest_cache/clusterlab-reliability.json`` (ignored by
git, so ``make test`` leaves the checkout clean), merged with earlier runs' rows.
``python tests/reliability_report.py`` (``make reliability``) writes RELIABILITY.md from them;
rows of faults no recorded run exercised keep their previous result and date.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "RELIABILITY.md"
RESULTS = ROOT / ".pytest_cache" / "clusterlab-reliability.json"
HEADER = "| fault | what was checked | result | date |"
_rows: dict[str, dict] = {}


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reliability(fault, checked): a row of RELIABILITY.md's fault table")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" and report.passed:
        return
    for marker in item.iter_markers("reliability"):  # one test may check several faults in sequence
        fault, checked = marker.args
        row = _rows.setdefault(fault, {"checked": checked, "passed": 0, "failed": [], "skipped": [], "seconds": 0.0})
        if report.when == "call":
            row["seconds"] += report.duration
        if report.failed:
            row["failed"].append(item.name)
        elif report.skipped:
            row["skipped"].append(f"{item.name}: {report.longrepr[-1] if isinstance(report.longrepr, tuple) else ''}")
        elif report.when == "call":
            row["passed"] += 1


def _result(row: dict) -> str:
    total = row["passed"] + len(row["failed"]) + len(row["skipped"])
    if row["failed"]:
        return f"FAILED ({len(row['failed'])} of {total}: {', '.join(row['failed'])})"
    if row["skipped"] and not row["passed"]:
        return f"skipped ({'; '.join(row['skipped'])})"
    cases = f", {row['passed']} cases" if total > 1 else ""
    return f"passed{cases} ({row['seconds']:.0f} s)" + (f"; skipped {len(row['skipped'])}" if row["skipped"] else "")


def _previous_rows() -> dict[str, list[str]]:
    if not REPORT.exists():
        return {}
    rows = {}
    for line in REPORT.read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        if len(cells) == 4 and cells[0] not in ("fault", "---"):
            rows[cells[0]] = cells
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _recorded() -> dict[str, dict]:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Record this run's rows (with date, commit and machine) beside earlier runs' rows."""
    if not _rows or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    recorded = _recorded()
    where = f"{_commit()}, {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    for fault, row in _rows.items():
        recorded[_cell(fault)] = {"checked": _cell(row["checked"]), "result": _cell(_result(row)),
                                  "date": datetime.date.today().isoformat(), "where": where}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(recorded, indent=1))


def write_report() -> str:
    """RELIABILITY.md from the recorded rows (and the previous file's rows no run recorded)."""
    recorded = _recorded()
    if not recorded:
        raise SystemExit(f"no recorded results in {RESULTS}: run `make test` and `make test-faults` first")
    rows = _previous_rows()
    for fault, row in recorded.items():
        rows[fault] = [fault, row["checked"], row["result"], row["date"]]
    runs = sorted({f"{row['date']} at commit {row['where']}" for row in recorded.values()})
    lines = [
        "# Reliability under faults and bad input",
        "",
        "Written from the test runs (`make test` and `make test-faults` record each row; `make reliability` "
        "writes this file; tests/reliability_report.py), never by hand: each row is a test against real Ray and "
        f"a real MLflow store. Recorded on {'; '.join(runs)}.",
        "",
        HEADER,
        "|---|---|---|---|",
        *(f"| {' | '.join(cells)} |" for cells in rows.values()),
        "",
    ]
    text = "\n".join(lines)
    REPORT.write_text(text)
    return text


if __name__ == "__main__":
    print(write_report())
