"""Published tables reproduced from finished MLflow runs, written to REPRODUCTIONS.md (issue 17).

A :class:`PaperTable` is one table of a paper (first: LSD-C Table 2, MNIST row) as rows of
(label, method, metric, paper value, target). ``clusterlab report --paper KEY --experiment NAME
...`` fills each row from the FINISHED runs of the named experiments: one value per seed, shown
as mean +- std over seeds (:func:`clusterlab.eval.metrics.mean_std`, population std, as the
papers report), with the per-seed values, the wall time, hardware and commit of the runs
counted, and whether the target is met. The table goes to stdout and replaces that paper's
section of the output file, which is only ever written this way, never by hand.
"""

from __future__ import annotations

import functools
import os
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from mlflow.tracking import MlflowClient

from clusterlab.config import PRESETS, ConfigError, build_config, deep_merge, flatten
from clusterlab.eval.metrics import mean_std
from clusterlab.platform import tracking
from clusterlab.platform.tracking import ROLE_TAG
from clusterlab.redact import redact_uri

DEFAULT_OUT = "REPRODUCTIONS.md"
HEADER = ("# Reproductions\n\n"
          "Published tables measured with clusterlab. Every section below is written by `clusterlab report` "
          "from finished MLflow runs, never by hand; each names the command that wrote it and the commands "
          "that rerun it. ACC in %, mean +- std (population) over seeds.\n")


@dataclass(frozen=True)
class Target:
    """What a row must reach to count as reproduced: ``|ours - value| <= tolerance`` when a
    tolerance is given, else ``ours >= value`` (ACC %)."""

    value: float
    tolerance: float | None = None

    def met(self, ours: float) -> bool:
        if self.tolerance is not None:
            return abs(ours - self.value) <= self.tolerance
        return ours >= self.value

    def __str__(self) -> str:  # no "|": it would split a Markdown table cell
        return f"within {self.tolerance:g} of {self.value:g}" if self.tolerance is not None else f">= {self.value:g}"


@dataclass(frozen=True)
class Row:
    """One line of a paper table: ``metric`` (a final MLflow metric, a fraction) of the runs
    whose ``method`` tag matches (None: runs of any method), and the paper's value in %."""

    label: str
    metric: str
    method: str | None = None
    paper: float | None = None
    paper_std: float | None = None
    paper_seeds: int | None = None
    source: str | None = None
    target: Target | None = None
    preset: str | None = None  # the recipe's preset: what a counted run deviates from it is listed
    encoder_preset: str | None = None  # the recipe of the encoder the method starts from (init_from)

    @property
    def recipe_epochs(self) -> int | None:
        return PRESETS[self.preset]["epochs"] if self.preset else None


@dataclass(frozen=True)
class PaperTable:
    """A published table: its rows, the params every counted run must have (dataset, evaluated
    split), and the commands that produce its runs and then this report."""

    title: str
    rows: tuple[Row, ...]
    params: dict[str, str] = field(default_factory=dict)
    rerun: tuple[str, ...] = ()
    budget_rerun: tuple[str, ...] = ()  # the same on 2 CPU cores: the CPU-budget presets


_DATA = "--data-root ../shared/datasets"
PAPERS: dict[str, PaperTable] = {
    # LSD-C (Rebuffi et al. 2020) Table 2, MNIST column: trained and tested on all 70,000
    # images (LSD-C Sec. 4), so runs must be MNIST runs evaluated with eval.split=all.
    "lsdc_mnist": PaperTable(
        title="LSD-C Table 2, MNIST (all 70,000 images, clustering ACC %)",
        params={"data.name": "mnist", "eval.split": "all"},
        rows=(
            Row("K-means on raw pixels", "pixels_acc", None, 57.2, source="LSD-C Table 2",
                target=Target(57.2, tolerance=3.0)),
            # The baseline a user tries first (eval.embedding_baselines; N2D's recipe on pixels). No
            # t-SNE row: scikit-learn's t-SNE does not finish in minutes on 70,000 images.
            Row("UMAP (10-d) + K-means on raw pixels", "pixels_umap_acc", None),
            Row("RotNet + K-means on its features", "kmeans_raw_acc", "rotnet", preset="rotnet_mnist"),
            Row("LSD-C (cluster head)", "head_acc", "lsdc", 98.6, 0.5, 10, "LSD-C Table 2", Target(97.6),
                preset="lsdc_mnist", encoder_preset="rotnet_mnist"),
            Row("SimCLR + K-means", "kmeans_norm_acc", "simclr", preset="simclr_mnist"),
            Row("MIX'EM Max Comp", "maxcomp_acc", "mixem", preset="mixem_mnist", encoder_preset="simclr_mnist"),
            Row("MIX'EM-initialised K-means", "kmeans_mixinit_acc", "mixem", preset="mixem_mnist",
                encoder_preset="simclr_mnist"),
        ),
        rerun=(
            f"clusterlab train --preset rotnet_mnist {_DATA} --run-name rotnet-mnist tracking.experiment=rotnet-mnist",
            f"clusterlab sweep search_spaces/lsdc_mnist_seeds.yaml {_DATA} init_from=$ROTNET_RUN_ID",
            f"clusterlab sweep search_spaces/simclr_mnist_seeds.yaml {_DATA}",
            f"clusterlab sweep search_spaces/mixem_mnist_seeds.yaml {_DATA} init_from=$SIMCLR_RUN_ID",
            "clusterlab report --experiment rotnet-mnist --experiment lsdc-mnist-seeds "
            "--experiment simclr-mnist-seeds --experiment mixem-mnist-seeds --paper lsdc_mnist",
        ),
        budget_rerun=(
            f"clusterlab train --preset rotnet_mnist_cpu {_DATA} --run-name rotnet-mnist-cpu "
            "tracking.experiment=rotnet-mnist-cpu",
            f"clusterlab sweep search_spaces/lsdc_mnist_cpu_seeds.yaml {_DATA} init_from=$ROTNET_RUN_ID",
            "clusterlab report --experiment rotnet-mnist-cpu --experiment lsdc-mnist-cpu-seeds --paper lsdc_mnist",
        ),
    ),
}


def paper_table(key: str) -> PaperTable:
    """The registered table ``key``; ConfigError listing the known ones otherwise."""
    if key not in PAPERS:
        raise ConfigError(f"--paper: unknown paper table {key!r}; known: {', '.join(sorted(PAPERS))}")
    return PAPERS[key]


@dataclass(frozen=True)
class Measured:
    """A row filled from runs: ``values`` = seed -> metric (fraction), one run per seed."""

    row: Row
    values: dict[str, float]
    minutes: tuple[float, ...]  # wall time of each counted run; empty for the raw-pixel row
    epochs: tuple[str, ...]  # the epochs the counted runs trained: a shortened run shows here
    hardware: tuple[str, ...]
    commits: tuple[str, ...]
    deviations: tuple[str, ...] = ()  # how the counted runs (and their encoders) differ from the recipe

    @property
    def shortened(self) -> bool:
        """Whether a counted run trained fewer epochs than the row's recipe."""
        recipe = self.row.recipe_epochs
        return recipe is not None and any(e.isdigit() and int(e) < recipe for e in self.epochs)

    @property
    def mean_std(self) -> tuple[float, float]:
        """Mean and population std over seeds, in %."""
        stats = mean_std([{"acc": v} for v in self.values.values()])
        return 100 * stats["acc_mean"], 100 * stats["acc_std"]


def _numeric_first(value: str) -> tuple[int, float | str]:
    """Sort key for param values (seeds, epochs): numbers in numeric order, then the rest."""
    try:
        return 0, float(value)
    except ValueError:
        return 1, value


def finished_runs(client: MlflowClient, experiments: list[str], params: dict[str, str]) -> dict[str, list[Any]]:
    """Per experiment name: its FINISHED runs that carry ``params`` and a ``seed``, sweep
    parent runs left out. A missing experiment is refused, naming it."""
    found = {}
    for name in dict.fromkeys(experiments):  # an experiment named twice is read once
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise ConfigError(f"--experiment: no MLflow experiment named {name!r} in {redact_uri(client.tracking_uri)}")
        runs, token = [], None
        while True:
            page = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=1000,
                                      page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
        found[name] = [r for r in runs if r.data.tags.get(ROLE_TAG) != "parent" and "seed" in r.data.params
                       and all(r.data.params.get(k) == v for k, v in params.items())]
    return found


# Params that say where and how a run ran, not what it computes: never a deviation from a recipe.
# (bf16 and the K-means initialisations change the numbers, so they are compared.)
_WHERE_NOT_WHAT = ("data.root", "data.download", "run_name", "seed", "storage_path", "init_from", "tracking.",
                   "resources.", "eval.batch_size", "performance.compile", "performance.channels_last",
                   "performance.fused_optimizer")


@functools.cache
def recipe_params(preset: str) -> dict[str, str]:
    """The MLflow params a run of ``preset`` as shipped would log (its data root aside)."""
    return flatten(build_config(deep_merge(PRESETS[preset], {"data": {"root": "/recipe"}}), f"preset {preset}"))


def deviations(params: dict[str, str], preset: str) -> list[str]:
    """``key ours (preset: recipe)`` for every param the run logged that differs from the recipe,
    e.g. ``epochs 6 (rotnet_mnist: 200)``; params the run did not log are not compared."""
    return [f"{key} {params[key]} ({preset}: {value})" for key, value in recipe_params(preset).items()
            if key in params and params[key] != value and not key.startswith(_WHERE_NOT_WHAT)]


def encoder_deviations(client: MlflowClient, run: Any, preset: str) -> list[str]:
    """How the encoder a run started from (its ``init_from`` tag: an MLflow run id or a
    checkpoint) differs from ``preset``, the encoder's recipe."""
    source = run.data.tags.get("init_from")
    if not source:
        return [f"no encoder: trained from scratch, not from a {preset} run"]
    if not tracking.is_run_id(source):
        return [f"encoder from {redact_uri(source)}: not an MLflow run, its recipe is not checked"]
    try:
        encoder = client.get_run(source)
    except Exception:  # MlflowException: the run is gone or in another store
        return [f"encoder run {source}: not in this tracking store, its recipe is not checked"]
    return [f"encoder run {source[:8]} {d}" for d in deviations(encoder.data.params, preset)]


def _counts(row: Row, run: Any) -> bool:
    return (row.method is None or run.data.tags.get("method") == row.method) and row.metric in run.data.metrics


def measure(row: Row, runs: list[Any], client: MlflowClient | None = None) -> Measured:
    """Fill ``row`` from ``runs``: one run per seed. A method row with two runs of one seed is
    refused (two configs, or a rerun, would be averaged as if they were seeds). The raw-pixel
    row (``method`` None) clusters the same images whatever the method trained, so it takes
    one value per distinct seed from every run, the earliest-started run of each seed (adding
    later runs does not change the value of a seed already counted); those runs' wall time
    belongs to the rows that trained them, so this row has none. A method row lists how its runs
    differ from the row's recipe, and (``client`` given) how their encoders differ from theirs."""
    by_seed: dict[str, list[Any]] = {}
    for run in sorted((r for r in runs if _counts(row, r)), key=lambda r: (r.info.start_time, r.info.run_id)):
        by_seed.setdefault(run.data.params["seed"], []).append(run)
    if row.method is not None:
        for seed, same in by_seed.items():
            if len(same) > 1:
                names = ", ".join(r.info.run_name or r.info.run_id for r in same)
                raise ConfigError(
                    f"--experiment: {len(same)} FINISHED {row.method} runs with seed {seed} ({names}) for the row "
                    f"{row.label!r}; a row takes one run per seed: pass experiments holding one run per seed")
    chosen = {seed: same[0] for seed, same in sorted(by_seed.items(), key=lambda kv: _numeric_first(kv[0]))}
    minutes = tuple((r.info.end_time - r.info.start_time) / 60000 for r in chosen.values()
                    if row.method is not None and r.info.end_time and r.info.start_time)
    epochs = tuple(sorted({r.data.params.get("epochs", "?") for r in chosen.values()}, key=_numeric_first)
                   if row.method is not None else ())
    differ: list[str] = []
    if row.method is not None:
        for run in chosen.values():
            differ += deviations(run.data.params, row.preset) if row.preset else []
            differ += encoder_deviations(client, run, row.encoder_preset) if client and row.encoder_preset else []
    return Measured(row, {seed: float(r.data.metrics[row.metric]) for seed, r in chosen.items()}, minutes, epochs,
                    tuple(sorted({r.data.tags.get(tracking.HARDWARE_TAG, "not recorded") for r in chosen.values()})),
                    tuple(sorted({r.data.tags.get("git_commit", "unknown")[:8] for r in chosen.values()})),
                    tuple(dict.fromkeys(differ)))


def collect(client: MlflowClient, key: str, experiments: list[str]) -> list[Measured]:
    """Every row of paper table ``key`` filled from the experiments' runs. Each experiment must
    contribute at least one run (a misspelt or unrelated one is refused, naming the metrics it
    lacks); rows no run fills come back with no values."""
    paper = paper_table(key)
    by_experiment = finished_runs(client, experiments, paper.params)
    for name, runs in by_experiment.items():
        if not any(_counts(row, r) for row in paper.rows for r in runs):
            needs = ", ".join(f"{row.metric} ({f'method {row.method}' if row.method else 'any method'})"
                              for row in paper.rows)
            wanted = ", ".join(f"{k}={v}" for k, v in paper.params.items())
            raise ConfigError(f"--experiment {name!r}: no FINISHED run there (with params {wanted}) logged a metric "
                              f"of the table {key!r}: {needs}")
    runs = [r for rs in by_experiment.values() for r in rs]
    return [measure(row, runs, client) for row in paper.rows]


def command_line(experiments: list[str], paper: str, out: str | None, tracking_uri: str | None,
                 notes: Sequence[str] = ()) -> str:
    """The ``clusterlab report`` command as typed, tracking URI credentials masked."""
    parts = ["clusterlab", "report", *(a for e in experiments for a in ("--experiment", e)), "--paper", paper,
             *(a for n in notes for a in ("--note", n))]
    if out:
        parts += ["--out", out]
    if tracking_uri:
        parts += ["--tracking-uri", redact_uri(tracking_uri)]
    return shlex.join(parts)


def _duration(minutes: float) -> str:
    return f"{minutes:.1f} min" if minutes < 120 else f"{minutes / 60:.1f} h"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _row_cells(m: Measured) -> list[str]:
    row = m.row
    paper = "-"
    if row.paper is not None:
        notes = [f"{row.paper_seeds} seeds"] if row.paper_seeds else []
        notes += [row.source] if row.source else []
        paper = f"{row.paper:.1f}" + (f" +- {row.paper_std:.1f}" if row.paper_std is not None else "")
        paper += f" ({'; '.join(notes)})" if notes else ""
    if not m.values:
        ours, target = "no runs", f"{row.target}: -" if row.target else "-"
    else:
        mean, std = m.mean_std
        ours = f"{mean:.1f}" if len(m.values) == 1 else f"{mean:.1f} +- {std:.1f}"
        target = f"{row.target}: {'met' if row.target.met(mean) else 'missed'}" if row.target else "-"
    wall = (f"{_duration(sum(m.minutes) / len(m.minutes))}/run, {_duration(sum(m.minutes))} total"
            if m.minutes else "-")
    epochs = ", ".join(m.epochs) + (f" of {row.recipe_epochs}" if m.shortened else "")
    return [row.label, f"`{row.metric}`", paper, ours, str(len(m.values)), epochs or "-", target, wall,
            "; ".join(m.hardware) or "-", ", ".join(m.commits) or "-"]


def render(key: str, measured: list[Measured], command: str, notes: Sequence[str] = ()) -> str:
    """The Markdown section of paper table ``key``: heading, the command that wrote it, the
    date, the table, the per-seed values, how each row's runs deviate from its recipe, ``notes`` (what
    was tried, what is missing and why) and how to rerun it."""
    paper = paper_table(key)
    now = datetime.now(timezone.utc)
    header = ["row", "metric", "paper (ACC %)", "ours (ACC %, mean +- std)", "seeds", "epochs", "target",
              "wall time (mean/run, total)", "hardware", "commit"]
    lines = [f"## {paper.title}", "", f"Written by: `{command}`", "", f"Date: {now:%Y-%m-%d %H:%M} UTC", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in _row_cells(m)) + " |" for m in measured]
    lines += ["", "Per-seed values (seed: ACC %):", ""]
    lines += [f"- {m.row.label}: " + (", ".join(f"{s}: {100 * v:.1f}" for s, v in m.values.items()) or "no runs")
              for m in measured]
    shared = [m.row.label for m in measured if m.row.method is None]
    if shared:
        lines += ["", f"{', '.join(shared)}: one value per seed from the runs of any method above (the same "
                      "images), the earliest run of each seed; their wall time is in those rows."]
    deviating = [m for m in measured if m.deviations]
    if deviating:
        lines += ["", "Deviations from the recipe (a row with any is not the recipe's result; `ours (recipe)`):", ""]
        lines += [f"- {m.row.label}: {'; '.join(m.deviations)}" for m in deviating]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    if paper.rerun:
        lines += ["", "How to rerun (`$..._RUN_ID`: the MLflow run id an earlier step printed):", ""]
        lines += [f"{i}. `{c}`" for i, c in enumerate(paper.rerun, 1)]
    if paper.budget_rerun:
        lines += ["", "On 2 CPU cores (the CPU-budget presets, deviations as they list):", ""]
        lines += [f"{i}. `{c}`" for i, c in enumerate(paper.budget_rerun, 1)]
    return "\n".join(lines) + "\n"


def write_section(path: Path, title: str, section: str) -> None:
    """Put ``section`` (starting ``## title``) into the Markdown file ``path``: it replaces the
    section of that title (up to the next ``## `` heading), or is appended; every other line is
    kept. A new file starts with :data:`HEADER`. Written to a temporary file, then renamed over
    ``path``, so that a reader never sees half a file."""
    text = path.read_text() if path.exists() else HEADER
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == f"## {title}"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
        after = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + after if after else "")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, path)


def write_report(client: MlflowClient, key: str, experiments: list[str], out: Path, command: str,
                 notes: Sequence[str] = ()) -> str:
    """Fill paper table ``key`` from the experiments' runs, write it into ``out`` and return the
    section (LSD-C Table 2 for ``lsdc_mnist``)."""
    section = render(key, collect(client, key, experiments), command, notes)
    write_section(out, paper_table(key).title, section)
    return section


def check_out(out: Path) -> None:
    """Refuse an output path that cannot be written, before any run is read."""
    if out.is_dir():
        raise ConfigError(f"--out: {out} is a directory; pass a Markdown file such as {DEFAULT_OUT}")
    if not out.parent.is_dir():
        raise ConfigError(f"--out: the directory {out.parent} does not exist")

