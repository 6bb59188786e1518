"""Pytest plugin: the reliability table in RELIABILITY.md is written by the test run itself.

A test marked ``@pytest.mark.reliability(fault, checked)`` becomes a row (fault, what was
checked, result); a test that checks several faults in sequence carries one marker per fault. Several tests with the same fault (e.g. the cases of a parametrized table)
share one row whose result counts them. Rows of faults not exercised in this run keep their
previous result and date, so running one test file never drops the others' rows.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "RELIABILITY.md"
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


def pytest_sessionfinish(session: pytest.Session) -> None:
    if not _rows or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    today = datetime.date.today().isoformat()
    rows = _previous_rows()
    for fault, row in _rows.items():
        rows[_cell(fault)] = [_cell(fault), _cell(row["checked"]), _cell(_result(row)), today]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPORT.parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        commit = "unknown"
    lines = [
        "# Reliability under faults and bad input",
        "",
        "Written by the test run (`make test` and `make test-faults`; tests/reliability_report.py), "
        "never by hand: each row is a test against real Ray and a real MLflow store. Last written on "
        f"{today} at commit {commit}, {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs.",
        "",
        HEADER,
        "|---|---|---|---|",
        *(f"| {' | '.join(cells)} |" for cells in rows.values()),
        "",
    ]
    REPORT.write_text("\n".join(lines))
