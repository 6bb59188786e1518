"""Sweep packing: aggregate training images/s of a digits sweep when 1, 2 or 4 trials share
one resource unit (a GPU as fractional GPUs, or on a CPU-only machine all its cores), and the
Ray Tune / Train overhead each trial pays.

Each packing p runs a real ``clusterlab sweep`` (``platform.sweep.run_sweep``, a fresh local
Ray, a temporary SQLite MLflow store) of 2p trials, p at a time, each with 1/p of the unit. Read
back from MLflow:

- aggregate images/s: the images all trials trained (per epoch: images_per_second x
  epoch_seconds), over the sweep's wall time;
- start-up: from a trial's MLflow run start to the start of its first epoch;
- hand-over: from one trial's last epoch to the start of the first epoch of the trial that
  took its place (the second wave); it includes the finished trial's evaluation (features,
  K-means fan-out, plots), which runs in the trial before its resources are released.

Floor: 0 s of overhead and the single-trial step rate times p while the device is not
saturated. Prints a table and adds a dated row to BENCHMARKS.md.

    python bench/sweep_packing.py                       # CPU: p = 1, 2
    python bench/sweep_packing.py --device cuda --packings 1 2 4
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import add_rows  # noqa: E402  (bench/record.py: this script's folder is on sys.path)

from clusterlab.platform.sweep import run_sweep  # noqa: E402
from clusterlab.platform.tracking import MlflowClient  # noqa: E402
from clusterlab.search_space import plan_sweep  # noqa: E402


def _space(packing: int, epochs: int, device: str, cpus: int) -> dict:
    unit = {"gpus_per_worker": 1.0 / packing, "cpus_per_worker": max(1, cpus // packing)} if device == "cuda" \
        else {"cpus_per_worker": cpus / packing}
    return {"name": f"packing-{packing}", "base": "simclr_digits",
            "overrides": {"epochs": epochs, "optim.warmup_epochs": 0, "eval.kmeans_n_init": 2,
                          "eval.raw_pixels_baseline": False},
            "search": {"seed": {"grid": list(range(2 * packing))}},
            "tune": {"metric": "val_loss", "mode": "min", "max_concurrent_trials": packing},
            "resources": {"num_workers": 1, **unit}}


def _measure(packing: int, epochs: int, device: str, cpus: int, workdir: Path) -> dict[str, float]:
    space_file = workdir / f"packing_{packing}.yaml"
    space_file.write_text(yaml.safe_dump(_space(packing, epochs, device, cpus)))
    uri = f"sqlite:///{workdir / f'packing_{packing}.db'}"
    os.environ["CLUSTERLAB_TRACKING_URI"] = uri
    t0 = time.time()
    result = run_sweep(plan_sweep(space_file, [f"storage_path={workdir / 'ray'}"]))
    wall = time.time() - t0
    client = MlflowClient(uri)
    runs = [r for r in client.search_runs([result.experiment_id]) if r.data.tags.get("clusterlab.role") != "parent"]
    images, startups, first_epoch_start, ends = 0.0, [], {}, []
    for run in runs:
        history = {m: sorted(client.get_metric_history(run.info.run_id, m), key=lambda x: x.step)
                   for m in ("images_per_second", "epoch_seconds")}
        images += sum(i.value * s.value for i, s in zip(history["images_per_second"], history["epoch_seconds"]))
        first = history["epoch_seconds"][0]
        start = first.timestamp / 1000 - first.value  # the first epoch began this long before its report
        startups.append(start - run.info.start_time / 1000)
        first_epoch_start[run.info.run_id] = start
        ends.append(history["epoch_seconds"][-1].timestamp / 1000)
    # Hand-over: the second wave's first epochs against the first wave's last reports.
    starts = sorted(first_epoch_start.values())
    ends.sort()
    handover = [s - e for s, e in zip(starts[packing:], ends[:packing])]
    return {"trials": len(runs), "wall": wall, "images_per_s": images / wall,
            "startup": sum(startups) / len(startups), "handover": sum(handover) / max(1, len(handover))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packings", type=int, nargs="+", default=[1, 2], help="trials sharing one unit")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (digits)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true", help="do not add a row to BENCHMARKS.md")
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    hardware = (torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}, {cpus} cores")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for p in args.packings:
            rows[p] = _measure(p, args.epochs, args.device, cpus, Path(tmp))
    base = rows[args.packings[0]]["images_per_s"]
    print(f"\nsweep packing, digits, {args.epochs} epochs per trial, {hardware}")
    print(f"{'trials/unit':>11} {'trials':>7} {'wall s':>8} {'images/s':>10} {'vs first':>9} {'start-up s':>11} "
          f"{'hand-over s':>12}")
    for p, r in rows.items():
        print(f"{p:>11} {r['trials']:>7} {r['wall']:>8.1f} {r['images_per_s']:>10,.0f} {r['images_per_s'] / base:>8.2f}x "
              f"{r['startup']:>11.1f} {r['handover']:>12.1f}")
    if not args.no_record:
        summary = "; ".join(f"{p}/unit: {r['images_per_s']:,.0f} img/s ({r['images_per_s'] / base:.2f}x), start-up "
                            f"{r['startup']:.1f} s, hand-over {r['handover']:.1f} s" for p, r in rows.items())
        print("added to " + str(add_rows([
            f"| {date.today()} | sweep_packing | {hardware} | torch {torch.__version__} | digits simclr, "
            f"{args.epochs} epochs, 2p trials p at a time, floor 0 s overhead | {summary} | "
            f"`python bench/sweep_packing.py {' '.join(sys.argv[1:])}` |"])))


if __name__ == "__main__":
    main()
