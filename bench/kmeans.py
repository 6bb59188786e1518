"""K-means with 50 initialisations: scikit-learn ``KMeans(n_init=50)`` (k-means++, Lloyd) vs
clusterlab's ``batched_kmeans`` in-process and fanned out as Ray tasks, on the same data.

Shapes follow MIX'EM Sec. 5.1: 8000 x 512 (STL10 test, K=10) and 10000 x 512 (CIFAR100-20 /
CIFAR100, K=20 / K=100). Data: overlapping Gaussian clusters (float32). Prints a table with
seconds, the speed-up over scikit-learn and each method's best inertia, and appends one row per
setting to BENCHMARKS.md. The Ray workers are started once before the timings (their one-off
start-up is printed), as on a long-lived cluster. Floor: one Lloyd step is 2*N*K*D FLOPs per initialisation.

    python bench/kmeans.py                 # the three settings, CPU (and GPU when present)
    python bench/kmeans.py --settings 8000x512x10 --n-init 50
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import add_rows  # noqa: E402  (bench/record.py: this script's folder is on sys.path)
from clusterlab.eval.kmeans import batched_kmeans  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=["8000x512x10", "10000x512x20", "10000x512x100"],
                        help="NxDxK")
    parser.add_argument("--n-init", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=None, help="Ray tasks for the fan-out (default: per device)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray fan-out column")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hardware = torch.cuda.get_device_name(0) if device == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if not args.no_ray:
        import ray

        from clusterlab.platform.fanout import kmeans_fanout

        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        # Start the task workers (and their torch import) once, outside the timings, as a
        # long-lived cluster has them; the one-off cost is printed.
        _, t_warm = timed(lambda: kmeans_fanout({"w": np.eye(8, dtype=np.float32)}, 2, n_init=os.cpu_count(),
                                                tasks=args.tasks, progress=False))
        print(f"Ray task workers started in {t_warm:.2f} s (one-off, not in the timings below)")
    rows = []
    print(f"K-means, n_init={args.n_init}, {hardware}; torch threads {torch.get_num_threads()}")
    print(f"{'setting':<16}{'method':<28}{'seconds':>9}{'speed-up':>10}{'best inertia':>16}{'vs sklearn':>12}")
    for setting in args.settings:
        n, d, k = (int(v) for v in setting.split("x"))
        x, _ = make_blobs(n, d, centers=k, cluster_std=1.0, center_box=(-1.0, 1.0), random_state=0)
        x = x.astype(np.float32)
        sk, t_sk = timed(lambda: KMeans(k, n_init=args.n_init, random_state=0).fit(x))
        results = [("scikit-learn KMeans", t_sk, float(sk.inertia_))]
        ours, t_ours = timed(lambda: batched_kmeans(x, k, n_init=args.n_init, seed=0, device=device))
        results.append((f"batched_kmeans ({device})", t_ours, ours.inertia))
        if not args.no_ray:
            fan, t_fan = timed(lambda: kmeans_fanout({"x": x}, k, n_init=args.n_init, tasks=args.tasks,
                                                     progress=False)["x"])
            results.append(("Ray fan-out of batched_kmeans", t_fan, fan.inertia))
        for name, seconds, inertia in results:
            rel = inertia / results[0][2] - 1
            print(f"{setting:<16}{name:<28}{seconds:>9.2f}{t_sk / seconds:>9.2f}x{inertia:>16.6g}{rel:>+11.3%}")
        rows.append((setting, results))

    if not args.no_record:
        table = []
        for setting, results in rows:
            t_sk, i_sk = results[0][1], results[0][2]
            summary = "; ".join(f"{name} {s:.2f} s ({t_sk / s:.2f}x, inertia {i / i_sk - 1:+.3%})"
                                for name, s, i in results)
            table.append(f"| {date.today()} | kmeans | {hardware} | torch {torch.__version__}, scikit-learn "
                         f"{sklearn.__version__} | {setting} (NxDxK), n_init {args.n_init} | {summary} | "
                         f"`python bench/kmeans.py {' '.join(sys.argv[1:])}` |")
        print(f"added to {add_rows(table)}")


if __name__ == "__main__":
    main()
