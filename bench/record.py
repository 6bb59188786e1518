"""Adds dated result rows to the results table of BENCHMARKS.md (its first table, the one
headed ``| date |``), so that rows stay in that table whatever prose and tables follow it."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def add_rows(rows: list[str]) -> Path:
    """Insert ``rows`` (Markdown table rows) after the last row of the results table."""
    lines = BENCHMARKS.read_text().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines) if line.startswith("| date |"))
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    lines[end:end] = [row.rstrip("\n") + "\n" for row in rows]
    BENCHMARKS.write_text("".join(lines))
    return BENCHMARKS
