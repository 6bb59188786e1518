"""``clusterlab`` command line: parses arguments and calls ``clusterlab.platform``.

Exit codes: 0 success, 1 a run failed, 2 bad input (config, data, arguments), 130 interrupted by
SIGINT (Ctrl+C), 143 by SIGTERM (``clusterlab.platform.interrupts``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Sequence

from clusterlab import __version__
from clusterlab.config import PRESETS, ConfigError, ExperimentConfig, build_config, dotted_overrides, load_config
from clusterlab.data.datasets import DATASETS
from clusterlab.methods import SPECS, result_rows
from clusterlab.platform.preflight import check_inputs
from clusterlab.redact import redact_text, redact_uri

if TYPE_CHECKING:
    from clusterlab.search_space import SweepPlan

ADDRESS_HELP = ("Ray cluster to join, e.g. auto or ray://head:10001 (default: $RAY_ADDRESS, which a Ray job sets "
                "to its cluster; without it a private local Ray; `local` forces a private one)")
OVERRIDES_HELP = "dotted key=value overrides, e.g. optim.lr=3e-4 data.name=cifar10 epochs=50"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment YAML file (optional)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a paper preset (default: <method>_<dataset>; "
                                                             "the override preset=NAME is the same)")
    p.add_argument("--run-name", help="Ray Train / MLflow run name; repeating it resumes that run")
    _run_args(p, experiment_help="MLflow experiment (sets tracking.experiment; default clusterlab)")


def _run_args(p: argparse.ArgumentParser, experiment_help: str) -> None:
    """The options ``train`` and ``sweep`` share; each sets a config key (overrides spelled out)."""
    p.add_argument("--experiment", help=experiment_help)
    p.add_argument("--data-root", help="directory holding the datasets (sets data.root)")
    p.add_argument("--init-from", metavar="CHECKPOINT_OR_RUN_ID",
                   help="initialise the backbone from a checkpoint directory or an MLflow run's checkpoint "
                        "(MIX'EM stage 2; sets init_from); recorded as the run's init_from tag")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (sets tracking.uri; default: "
                                          "$CLUSTERLAB_TRACKING_URI or sqlite:///mlflow.db in the cwd)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                   help="a tag of your own on the run (every run of a sweep), repeatable (sets tracking.tags)")
    p.add_argument("--note", help="the run's description in the MLflow UI (sets tracking.note)")


def _run_overrides(args: argparse.Namespace) -> list[str]:
    """``_run_args``' options as the overrides they stand for (after the user's own, so they win)."""
    values = {key: value for key, value in (
        ("data.root", args.data_root), ("init_from", args.init_from), ("tracking.uri", args.tracking_uri),
        ("tracking.note", args.note)) if value is not None}
    for item in args.tag:
        key, sep, value = item.partition("=")
        if not sep or not key or "." in key:
            raise ConfigError(f"--tag {item!r}: write KEY=VALUE with a KEY without '.' (a dotted tag name goes in a "
                              "YAML file's tracking.tags)")
        values[f"tracking.tags.{key}"] = value
    return dotted_overrides(values)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, help="number of clusters (default: number of classes; more = over-clustering)")
    p.add_argument("--n-init", type=int, default=50, help="K-means initialisations (default 50)")
    p.add_argument("--seed", type=int, default=0, help="K-means seed (default 0)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   help="where K-means and feature extraction run (default: GPUs when the cluster has any)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (t-SNE takes a while on large splits)")
    p.add_argument("--tracking-uri", help="default: $CLUSTERLAB_TRACKING_URI or sqlite:///mlflow.db in the cwd")
    p.add_argument("--address", help=ADDRESS_HELP)


def _load(args: argparse.Namespace) -> ExperimentConfig:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config:  # no YAML given: the first positional is an override
        config, overrides = None, [config, *overrides]
    overrides += _run_overrides(args)
    overrides += dotted_overrides({key: value for key, value in (("run_name", args.run_name),
                                                                  ("tracking.experiment", args.experiment))
                                   if value is not None})
    return load_config(config, overrides, preset=args.preset)


#: the results table's title per eval.split (what was clustered and scored)
EVALUATED = {"test": "clustering of the test split", "all": "clustering of all labelled images", None: "clustering"}


def _print_metrics_table(columns: dict[str, dict[str, float]], rows: list[tuple[str, str]],
                         split: str | None = "test") -> None:
    """One line per (label, metric prefix) that some column has, ACC / NMI / ARI for each
    column; '-' where a column lacks it. ``split``: the ``eval.split`` evaluated (None: unknown,
    e.g. a features file)."""
    header = "".join(f"{name + ' ACC/NMI/ARI':>26}" for name in columns)
    print(f"\n{EVALUATED[split]:<40}{header}")
    for label, prefix in rows:
        if not any(f"{prefix}_acc" in metrics for metrics in columns.values()):
            continue  # a reading this method does not have
        cells = []
        for metrics in columns.values():
            values = [metrics.get(f"{prefix}_{m}") for m in ("acc", "nmi", "ari")]
            cells.append("  ".join("    -" if v is None else f"{v:.3f}" for v in values))
        print(f"{label:<40}" + "".join(f"{c:>26}" for c in cells))


def _ui_hint(cfg: ExperimentConfig) -> str:
    from clusterlab.platform.tracking import resolve_tracking_uri

    return f"mlflow ui --backend-store-uri {redact_uri(resolve_tracking_uri(cfg.tracking.uri))}   (or: clusterlab ui)"


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before importing torch, Ray and MLflow: a bad config answers at once
    if args.dry_run:
        print(cfg.to_yaml(), end="")
        return 0
    check_inputs(cfg)  # a wrong data.root or storage_path answers before torch, Ray and MLflow load too
    from clusterlab.platform.run import train

    result = train(cfg, address=args.address)
    print(f"\nrun {result.run_name} (MLflow run {result.run_id}) finished; checkpoint: {result.checkpoint_dir}")
    if result.metrics:
        _print_metrics_table({cfg.method: result.metrics}, result_rows([cfg.method]), cfg.eval.split)
    print(f"\nopen the MLflow UI: {_ui_hint(cfg)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """MIX'EM's two stages on digits: a base SimCLR encoder, then MIX'EM continued from it."""
    from clusterlab.platform.run import train

    common = ["tracking.experiment=clusterlab-demo", f"resources.cpus_per_worker={args.cpus}"]
    shorter = []
    if args.epochs is not None:  # the preset's warm-up must stay shorter than the run
        warmup = PRESETS["simclr_digits"]["optim"]["warmup_epochs"]
        shorter = [f"epochs={args.epochs}", f"optim.warmup_epochs={min(warmup, args.epochs - 1)}"]
    base_cfg = load_config(None, [*common, *shorter], preset="simclr_digits")
    print(f"clusterlab demo 1/2: base SimCLR encoder on scikit-learn's digits ({base_cfg.epochs} epochs, Ray Train, CPU)",
          flush=True)
    base = train(base_cfg, address=args.address)
    mixem_cfg = load_config(None, [*common, f"init_from={base.checkpoint_dir}"], preset="mixem_digits")
    print(f"clusterlab demo 2/2: MIX'EM continued from the base encoder ({mixem_cfg.epochs} epochs)", flush=True)
    mixem = train(mixem_cfg, address=args.address)
    _print_metrics_table({"SimCLR": base.metrics, "MIX'EM": mixem.metrics}, result_rows(["simclr", "mixem"]))
    print(f"\nMLflow runs {base.run_id} (SimCLR) and {mixem.run_id} (MIX'EM) in experiment 'clusterlab-demo'. "
          f"Open the UI with:\n  {_ui_hint(base_cfg)}")
    return 0


def _eval_options(args: argparse.Namespace):
    """The evaluation options shared by ``evaluate`` and ``reeval``, checked before any work."""
    from clusterlab.platform.reeval import EvalOptions

    return EvalOptions(n_init=args.n_init, k=args.k, seed=args.seed, plots=not args.no_plots)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a run's checkpoint, a checkpoint directory, or a features file."""
    import json
    import math
    from pathlib import Path

    from clusterlab.platform.sources import EvalSource, evaluate_source

    options = _eval_options(args)
    if args.json:  # checked now: the evaluation may take minutes before it writes there
        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir():
            raise ConfigError(f"--json {args.json}: " + ("is a directory" if target.is_dir() else
                              f"its folder {target.parent} does not exist") + "; name a file in an existing folder")
    source = EvalSource(run_id=args.run_id, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
                        features=Path(args.features) if args.features else None,
                        train_features=Path(args.train_features) if args.train_features else None,
                        features_dir=Path(args.features_dir) if args.features_dir else None,
                        tracking_uri=args.tracking_uri)
    result = evaluate_source(source, options, address=args.address, device=args.device, tasks=args.tasks)
    _print_metrics_table({"evaluation": result.metrics}, result_rows(), result.split)
    if "linear_probe_acc" in result.metrics:
        print(f"{'linear probe (train -> test)':<40}{result.metrics['linear_probe_acc']:>10.3f}")
    if args.run_id:
        print(f"logged to MLflow run {args.run_id} as eval/{options.version}/<metric>")
    if args.json:
        finite = {k: v if math.isfinite(v) else None for k, v in result.metrics.items()}  # valid JSON: null, not NaN
        Path(args.json).write_text(json.dumps(finite, indent=2, sort_keys=True, allow_nan=False))
        print(f"metrics written to {args.json}")
    if args.plots_dir and result.figures:
        Path(args.plots_dir).mkdir(parents=True, exist_ok=True)
        for name, figure in result.figures.items():
            figure.savefig(Path(args.plots_dir) / name, dpi=120)
        print(f"plots written to {args.plots_dir}")
    return 0


def cmd_reeval(args: argparse.Namespace) -> int:
    from clusterlab.platform import tracking
    from clusterlab.platform.reeval import reevaluate_experiment

    options = _eval_options(args)
    uri = tracking.resolve_tracking_uri(args.tracking_uri)
    outcomes = reevaluate_experiment(uri, args.experiment, options, args.filter, device=args.device,
                                     address=args.address)
    print(f"\n{'run':<44}{'status':<22}{'ACC':>7}{'NMI':>7}{'ARI':>7}   (K-means, normalised; eval/{options.version})")
    for o in outcomes:
        values = "".join(f"{o.metrics[f'kmeans_norm_{m}']:>7.3f}" if f"kmeans_norm_{m}" in o.metrics else f"{'-':>7}"
                         for m in ("acc", "nmi", "ari"))
        print(f"{o.run_name[:43]:<44}{o.status.split(':')[0]:<22}{values}")
    failed = [o for o in outcomes if o.status.startswith("failed")]
    for o in failed:
        print(f"  {o.run_name} ({o.run_id}) skipped, {o.status}")
    print(f"{len(outcomes)} runs: {sum(o.status == 'evaluated' for o in outcomes)} evaluated, "
          f"{sum(o.status == 'already evaluated' for o in outcomes)} already evaluated, {len(failed)} failed")
    return 1 if failed else 0


def cmd_config(args: argparse.Namespace) -> int:
    print(_load(args).to_yaml(), end="")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from clusterlab.search_space import plan_sweep

    plan = plan_sweep(args.space, [*args.overrides, *_run_overrides(args)], args.experiment)  # before torch, Ray, MLflow
    if args.dry_run:
        return _print_sweep_plan(plan)
    check_inputs(build_config(plan.base, "base"))
    from clusterlab.platform.sweep import run_sweep

    result = run_sweep(plan, address=args.address, resume=args.resume)
    print(f"\nsweep {result.name!r}: {result.trials} trials, {result.failed} failed")
    if result.best_run_id:
        print(f"best trial (MLflow run {result.best_run_id}):")
        for key, value in result.best_params.items():
            print(f"  {key} = {value}")
        _print_metrics_table({"best trial": result.best_metrics}, result_rows(), split=None)
        for key in ("val_loss", "linear_probe_acc"):
            if key in result.best_metrics:
                print(f"{key:<40}{result.best_metrics[key]:>10.4f}")
    if result.heatmap:
        print(f"heatmap: {result.heatmap} (and .csv), logged to the parent run")
    print(f"\nMLflow experiment {result.name!r}, parent run {result.parent_run_id}; open it with: clusterlab ui")
    return 0


def _print_sweep_plan(plan: SweepPlan) -> int:
    """``sweep --dry-run``: the resolved base config as YAML, then the trials as comments."""
    from clusterlab.search_space import trial_plan

    print(f"# sweep {plan.name!r}: the base config every trial starts from (searched keys vary per trial)")
    print(build_config(plan.base, "base").to_yaml(), end="")
    print("\n".join(f"# {line}" for line in trial_plan(plan.space)))
    return 0


def cmd_heatmap(args: argparse.Namespace) -> int:
    from clusterlab.platform import tracking
    from clusterlab.platform.heatmap import check_axes, draw_heatmap

    check_axes(args.x, args.y, args.facet)  # refused before the store is opened
    client = tracking.connect(tracking.resolve_tracking_uri(args.tracking_uri), existing=True)
    out = draw_heatmap(client, args.experiment, args.x, args.y, args.facet, args.metric, args.out)
    print(f"heatmap written to {out} and {out.with_suffix('.csv')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Fill a published table (e.g. LSD-C Table 2, MNIST) from finished MLflow runs, print it and
    write it as that table's section of --out."""
    from pathlib import Path

    from clusterlab.platform import report, tracking

    paper = report.paper_table(args.paper)  # bad input is refused before the store is opened
    out = Path(args.out or report.DEFAULT_OUT)
    report.check_out(out)
    client = tracking.connect(tracking.resolve_tracking_uri(args.tracking_uri), existing=True)
    notes = args.note or []
    command = report.command_line(args.experiment, args.paper, args.out, args.tracking_uri, notes)
    print(report.write_report(client, args.paper, args.experiment, out, command, notes), end="")
    print(f"\nwritten to {out} (section '## {paper.title}')")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """``runs reconcile``: close the RUNNING runs whose process died."""
    from clusterlab.platform import tracking

    client = tracking.connect(tracking.resolve_tracking_uri(args.tracking_uri), existing=True)
    outcomes = tracking.reconcile(client, args.experiment, dry_run=args.dry_run)
    for o in outcomes:
        print(f"{o.experiment[:24]:<25}{o.run_name[:40]:<41}{o.run_id}  "
              + (f"would be {o.action}" if args.dry_run and o.action == "marked FAILED" else o.action))
    failed = sum(o.action == "marked FAILED" for o in outcomes)
    print(f"{len(outcomes)} RUNNING runs: {failed} {'would be ' if args.dry_run else ''}marked FAILED "
          f"(their process died), {len(outcomes) - failed} left as they are")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from clusterlab.platform.tracking import check_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking_uri(uri)
    # The store URI reaches MLflow through its environment variable, never the command line: a
    # process's argv is readable by every local user, its environment only by its owner.
    argv = [sys.executable, "-m", "mlflow", "ui", "--host", args.host, "--port", str(args.port)]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    # MLflow 3 opens in its GenAI view; the runs, sweeps and charts are under "Model training".
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning "
          f"(store {redact_uri(uri)}); Ctrl+C stops it", flush=True)
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def cmd_data(args: argparse.Namespace) -> int:
    from clusterlab.data.datasets import check_dataset, download_dataset

    info = DATASETS[args.name]
    if args.action == "download":
        if info.download is None:
            raise ConfigError(f"data download {args.name}: {args.name} is not downloaded by clusterlab; "
                              f"{info.how_to_get}")
        download_dataset(args.name, args.data_root)
    check_dataset(args.name, args.data_root, info.splits)
    print(f"{args.name}: all files present and intact (sizes, headers, label ranges, images) under "
          f"{args.data_root or '(bundled)'}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of CPUs, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of CPUs, got {text}")
    return value


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train SimCLR then MIX'EM on the bundled digits through Ray Train, evaluate, "
                                    "log to MLflow",
                       description="End-to-end demo on scikit-learn's digits (1,797 real 8x8 images, 10 classes), "
                                   "CPU only, a few minutes on 2 cores: a base SimCLR encoder (preset simclr_digits), "
                                   "then MIX'EM continued from it (preset mixem_digits). Prints ACC/NMI/ARI of both "
                                   "side by side, with K-means on raw pixels as the baseline.")
    p.add_argument("--epochs", type=_positive_int, help="base-encoder epochs (default: the simclr_digits preset's)")
    p.add_argument("--cpus", type=_positive_cpus, default=float(os.cpu_count() or 1),
                   help="CPUs for the training worker")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.set_defaults(func=cmd_demo)


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one experiment on Ray Train, evaluate it, log it to MLflow",
                       description="Train a method with Ray Train (DDP over resources.num_workers workers), "
                                   "checkpoint every epoch, evaluate the final checkpoint with K-means, and record "
                                   "params, per-epoch metrics, final metrics and artifacts in one MLflow run. "
                                   "Re-running with the same --run-name resumes from the latest checkpoint.")
    _config_args(p)
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    p.set_defaults(func=cmd_train)


def _add_sweep_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune sweep from a search-space YAML; one MLflow parent run per sweep",
                       description="Each trial is a Ray Train run of the base config with the searched values, "
                                   "evaluated with the K-means fan-out; trials are MLflow child runs of one parent "
                                   "run (search space, base config, best trial, heatmap). Shipped spaces are in "
                                   "search_spaces/. Invalid spaces fail before Ray starts.")
    p.add_argument("space", help="search-space YAML, e.g. search_spaces/mixem_loss_weights_digits.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the base config, e.g. "
                   "init_from=RUN_ID epochs=50")
    _run_args(p, experiment_help="the sweep's name = its MLflow experiment (default: the space's name:, else its "
                                 "file name)")
    p.add_argument("--name", dest="experiment", help=argparse.SUPPRESS)  # the old spelling of --experiment
    p.add_argument("--resume", nargs="?", const="yes", metavar="auto",
                   help="continue an interrupted sweep: finished trials are kept, unfinished ones resume from their "
                        "checkpoints; `--resume auto` continues the sweep if it exists, else starts it (for a job "
                        "that is retried, e.g. a KubeRay RayJob)")
    p.add_argument("--address", help=ADDRESS_HELP)
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved base config and every trial, then exit (starts neither Ray nor MLflow)")
    p.set_defaults(func=cmd_sweep)


def _add_heatmap_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heatmap", help="draw a sweep's loss-weight heatmap (MIX'EM supplementary Figs. 1-3)",
                       description="Reads the experiment's runs from MLflow; one panel per --facet value, cell = mean "
                                   "(and std) over repeated seeds, failed / missing cells marked. Writes PNG + CSV "
                                   "and logs both to the sweep's parent run.")
    p.add_argument("--experiment", required=True, help="the sweep's MLflow experiment (its name)")
    p.add_argument("--x", required=True, help="param across, e.g. lambda_3 or loss.weights.push")
    p.add_argument("--y", required=True, help="param down, e.g. lambda_4")
    p.add_argument("--facet", help="param with one panel per value, e.g. lambda_2")
    p.add_argument("--metric", help="final metric per cell (default: the method's headline metric: "
                                    "kmeans_mixinit_acc for MIX'EM, head_acc for LSD-C / ExCB, else kmeans_norm_acc)")
    p.add_argument("--out", help="PNG path (default: <experiment>_<metric>_heatmap.png); the CSV goes beside it")
    p.add_argument("--tracking-uri", help="default $CLUSTERLAB_TRACKING_URI or sqlite:///mlflow.db")
    p.set_defaults(func=cmd_heatmap)


def _add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="cluster a run's / checkpoint's / features file's representations",
                       description="K-means with --n-init initialisations fanned out as Ray tasks (best inertia "
                                   "wins), Hungarian ACC / NMI / ARI, MIX'EM readings, linear probe and plots. "
                                   "Features of a checkpoint are written to Parquet once and reused.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run whose checkpoint to evaluate; metrics and plots are logged to it")
    source.add_argument("--checkpoint", help="checkpoint directory (or checkpoint.pt) to evaluate")
    source.add_argument("--features", help="features Parquet file (schema in the README), from anywhere")
    p.add_argument("--train-features", help="with --features: train-split features for the linear probe")
    p.add_argument("--features-dir", help="where checkpoint features are written / reused "
                                          "(default: beside the checkpoint)")
    _eval_args(p)
    p.add_argument("--tasks", type=int, help="Ray tasks to split them over (default: one per GPU, else per CPU)")
    p.add_argument("--json", help="write every metric (and best inertias) as JSON to this file")
    p.add_argument("--plots-dir", help="also save the plots as PNG files here")
    p.set_defaults(func=cmd_evaluate)


def _add_reeval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reeval", help="re-evaluate every finished run of an experiment, as parallel Ray tasks",
                       description="One Ray task per run (GPU tasks when the cluster has GPUs): checkpoint -> "
                                   "features -> K-means fan-out. Metrics are logged to each run as "
                                   "eval/<version>/<metric> with version = k<K>-n<n_init>-s<seed>; runs already "
                                   "evaluated with the same options are skipped (re-running is a no-op, an "
                                   "interrupted job resumes); a broken checkpoint is reported and skipped.")
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--filter", help="MLflow search filter, e.g. \"params.method = 'mixem'\"")
    _eval_args(p)
    p.set_defaults(func=cmd_reeval)


def _add_report_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="reproduce a published table from finished runs; writes REPRODUCTIONS.md",
                       description="Reads the FINISHED runs of the experiments from MLflow and fills the paper "
                                   "table's rows: mean +- std (population) over seeds, per-seed values, seeds, wall "
                                   "time, hardware and commit, beside the paper's value and whether the target is "
                                   "met. Prints the table as Markdown and replaces that table's section of --out "
                                   "(other sections are kept).")
    p.add_argument("--experiment", action="append", required=True,
                   help="MLflow experiment holding runs of the table (repeatable)")
    p.add_argument("--paper", required=True,
                   help="paper table, e.g. lsdc_mnist (LSD-C Table 2, MNIST); an unknown name lists the known ones")
    p.add_argument("--out", help="Markdown file to write the section into (default: REPRODUCTIONS.md in the cwd)")
    p.add_argument("--tracking-uri", help="default: $CLUSTERLAB_TRACKING_URI or sqlite:///mlflow.db in the cwd")
    p.add_argument("--note", action="append",
                   help="a line under the table: what was tried, what is missing and why (repeatable)")
    p.set_defaults(func=cmd_report)


def _add_config_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="print the resolved, validated config as YAML",
                       description="Resolve defaults < preset < YAML < overrides, validate, and print the result.")
    _config_args(p)
    p.set_defaults(func=cmd_config)


def _add_runs_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="maintain the tracking store: `runs reconcile` closes runs whose process died",
                       description="`reconcile` finds RUNNING runs whose owning process (host, pid and start time, "
                                   "tagged clusterlab.owner) is gone, and marks them FAILED with a failure_reason. "
                                   "Runs owned by a process on another host are listed and left alone. "
                                   "`clusterlab sweep --resume` does the same for its sweep before it continues.")
    p.add_argument("action", choices=["reconcile"])
    p.add_argument("--experiment", action="append", help="only this MLflow experiment (repeatable; default: all)")
    p.add_argument("--dry-run", action="store_true", help="list what would change, change nothing")
    p.add_argument("--tracking-uri", help="default: $CLUSTERLAB_TRACKING_URI or sqlite:///mlflow.db in the cwd")
    p.set_defaults(func=cmd_runs)


def _add_ui_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ui", help="start the MLflow UI on the configured tracking store",
                       description="Runs `mlflow ui` against the tracking URI clusterlab logs to.")
    p.add_argument("--tracking-uri", help="default: $CLUSTERLAB_TRACKING_URI or sqlite:///mlflow.db in the cwd")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)


def _add_data_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="check (or explicitly download) a dataset under --data-root",
                       description="`check` verifies every file a dataset needs and names any missing path; "
                                   "`download` fetches it with torchvision first (needs internet).")
    p.add_argument("action", choices=["check", "download"])
    p.add_argument("name", choices=sorted(DATASETS), help="the dataset (`download` takes cifar10, cifar100_20, "
                                                          "stl10 and mnist; digits is bundled, imagefolder is yours)")
    p.add_argument("--data-root", help="directory holding the dataset folders")
    p.set_defaults(func=cmd_data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterlab",
        description=f"Deep clustering experiments (method={' | '.join(SPECS)}) on Ray, tracked in MLflow.",
        epilog="Configs layer as: defaults < preset < YAML file < search space < key=value overrides. "
               "Bad input exits with code 2 before Ray starts.",
    )
    parser.add_argument("--version", action="version", version=f"clusterlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in (_add_demo_command, _add_train_command, _add_sweep_command, _add_heatmap_command,
                        _add_evaluate_command, _add_reeval_command, _add_report_command, _add_config_command,
                        _add_runs_command, _add_ui_command, _add_data_command):
        add_command(sub)  # one function per command, in the order `clusterlab --help` lists them
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse, except that key=value overrides may also follow the options
    (``sweep space.yaml --address auto epochs=2``): argparse alone takes positionals only
    in one run and rejects the late ones as unrecognized."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    resume = getattr(args, "resume", None)
    if resume is not None and "=" in resume:  # `--resume epochs=2`: the override after a bare --resume
        args.overrides, args.resume = [*args.overrides, resume], "yes"
    elif resume not in (None, "yes", "auto"):
        parser.error(f"argument --resume: {resume!r} is not `auto`; write --resume (continue the sweep) or "
                     "--resume auto (continue it if it exists, else start it)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from clusterlab.data.datasets import DatasetNotFoundError
    from clusterlab.platform.interrupts import as_interrupted, catch_signals

    args = parse_args(argv)
    # MLflow's per-download progress bars would interleave with clusterlab's own progress.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with catch_signals():
            return args.func(args)
    except (ConfigError, DatasetNotFoundError) as exc:
        print(f"clusterlab: error: {redact_text(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        interrupted = as_interrupted(exc)
        print(f"clusterlab: {interrupted}", file=sys.stderr)
        return interrupted.exit_code
    except Exception as exc:
        from clusterlab.platform.train import TrainingFailed

        if not isinstance(exc, TrainingFailed):
            raise
        print(f"clusterlab: error: {redact_text(str(exc))}", file=sys.stderr)  # recorded as the run's failure_reason
        return 1


if __name__ == "__main__":
    sys.exit(main())
