"""Time to accuracy on real MNIST (issue 17): wall-clock minutes from the start of RotNet
pretraining to LSD-C's cluster head reaching ``--target`` ACC (97 %) on all 70,000 images, the
RotNet -> LSD-C chain's total, each stage's images/s and where the time goes.

Both stages run the platform's own training loop in this process (``loop.fit`` with a
``LocalSession``: one worker, the step, schedule, validation and checkpoints of a Ray Train run)
with the shipped presets: ``rotnet_mnist`` (LSD-C supplementary Sec. 1: 200 epochs) for
``--rotnet-epochs`` epochs, then ``lsdc_mnist`` (supplementary Table 1, MNIST row: 15 epochs)
initialised from the RotNet's last checkpoint. After every LSD-C epoch its head is read on all
70,000 images (argmax, Hungarian ACC: LSD-C Sec. 4, Table 2). The reads only clock the run,
nothing is chosen by them, and their seconds are kept out of the training clock.

The clock is the sum of each epoch's wall time (steps, validation loss, checkpoint; the first
epoch of a sitting also its data loading) as saved in ``--workdir``. The same command continues
there after an interruption, or with more ``--rotnet-epochs``, and the earlier sittings count.

    python bench/mnist_time_to_accuracy.py                          # GPU: the paper's 200 RotNet epochs
    python bench/mnist_time_to_accuracy.py --rotnet-epochs 1 --lsdc-epochs 3 \\
        performance.bf16=true                                       # this 2-core CPU: about 2 hours
    python bench/mnist_time_to_accuracy.py --limit 512 --rotnet-epochs 1 --lsdc-epochs 1 --no-record  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import add_rows  # noqa: E402  (bench/record.py: this script's folder is on sys.path)
from clusterlab.config import PRESETS, ExperimentConfig, load_config  # noqa: E402
from clusterlab.data.augment import Normalize  # noqa: E402
from clusterlab.data.datasets import load_split  # noqa: E402
from clusterlab.eval.clustering import head_metrics  # noqa: E402
from clusterlab.eval.features import iter_features  # noqa: E402
from clusterlab.platform.loop import LocalSession, fit  # noqa: E402
from clusterlab.trainers.checkpoint import method_from_checkpoint, read_checkpoint  # noqa: E402

TIMELINE = "timeline.json"
#: the recipes' lengths: RotNet 200 (LSD-C supplementary Sec. 1), LSD-C 15 (supplementary Table 1, MNIST)
ROTNET_EPOCHS, LSDC_EPOCHS = PRESETS["rotnet_mnist"]["epochs"], PRESETS["lsdc_mnist"]["epochs"]


class TargetReached(Exception):
    """Raised out of ``fit`` by the session once the head reads ``--target``: the clock stops."""


class ClockedSession(LocalSession):
    """A LocalSession that saves each epoch's wall time (since the previous report of this sitting)
    next to the checkpoints, and for LSD-C reads the head on ``images`` after each epoch."""

    def __init__(self, directory: Path, device: torch.device, images: np.ndarray | None = None,
                 labels: np.ndarray | None = None, target: float | None = None) -> None:
        super().__init__(directory, device)
        self.images, self.labels, self.target = images, labels, target
        self.timeline_file = directory / TIMELINE
        self.timeline: list[dict[str, float]] = (json.loads(self.timeline_file.read_text())
                                                 if self.timeline_file.is_file() else [])
        self.since = time.perf_counter()

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        super().report(metrics, checkpoint_dir)
        entry = {"epoch": metrics["epoch"], "epoch_seconds": metrics["epoch_seconds"],
                 "images_per_second": metrics["images_per_second"], "wall_seconds": time.perf_counter() - self.since}
        if self.images is not None:
            start = time.perf_counter()
            entry["head_acc"] = self.read_head()
            entry["read_seconds"] = time.perf_counter() - start
        self.timeline.append(entry)
        self.timeline_file.write_text(json.dumps(self.timeline, indent=1))
        self.since = time.perf_counter()
        print(f"  {self.directory.name} epoch {int(entry['epoch'])}: {entry['images_per_second']:.0f} images/s, "
              f"{entry['wall_seconds'] / 60:.1f} min" + (f", head ACC {entry['head_acc']:.4f}" if "head_acc" in entry
                                                         else ""), flush=True)
        if self.target is not None and entry.get("head_acc", 0.0) >= self.target:
            raise TargetReached

    def read_head(self) -> float:
        method, _, meta = method_from_checkpoint(read_checkpoint(self.latest_checkpoint()))
        method.to(self.device)
        batches = iter_features(method.eval_outputs, self.images, self.labels, Normalize(meta.mean, meta.std),
                                batch_size=1024, device=self.device, progress=False)
        probabilities = np.concatenate([batch["probabilities"] for batch in batches])
        return head_metrics(probabilities, self.labels, num_classes=meta.num_classes)["head_acc"]


@dataclass
class Stage:
    """One stage's saved timeline: an entry per epoch."""

    timeline: list[dict[str, float]]

    def seconds(self, key: str, upto: int | None = None) -> float:
        return sum(e.get(key, 0.0) for e in self.timeline[:upto])

    @property
    def images_per_second(self) -> float:
        return float(np.mean([e["images_per_second"] for e in self.timeline]))


def stage_config(preset: str, epochs: int, args: argparse.Namespace, **extra: str) -> ExperimentConfig:
    overrides = [f"data.root={args.data_root}", f"epochs={epochs}", *args.overrides,
                 *(f"{k}={v}" for k, v in extra.items())]
    if args.limit:
        overrides.append(f"data.limit={args.limit}")
    return load_config(preset=preset, overrides=overrides)


def run_chain(args: argparse.Namespace, device: torch.device) -> tuple[Stage, Stage, float | None]:
    # LSD-C's folder names the RotNet epoch it starts from: more RotNet epochs later start a new LSD-C.
    rotnet_dir, lsdc_dir = args.workdir / "rotnet", args.workdir / f"lsdc_from_rotnet_{args.rotnet_epochs}"
    rotnet = ClockedSession(rotnet_dir, device)
    print(f"RotNet (rotnet_mnist), {args.rotnet_epochs} epochs", flush=True)
    fit(stage_config("rotnet_mnist", args.rotnet_epochs, args), rotnet)  # nothing to do if the folder has them
    rotnet_epoch = rotnet_dir / f"epoch_{args.rotnet_epochs:04d}"  # LocalSession's name for that checkpoint

    lsdc_cfg = stage_config("lsdc_mnist", args.lsdc_epochs, args, init_from=str(rotnet_epoch))
    both = [load_split("mnist", args.data_root, split, limit=args.limit) for split in ("train", "test")]
    images, labels = np.concatenate([s.images for s in both]), np.concatenate([s.labels for s in both])
    lsdc = ClockedSession(lsdc_dir, device, images, labels, args.target)
    reached = next((i + 1 for i, e in enumerate(lsdc.timeline) if e["head_acc"] >= args.target), None)
    if reached is None:
        print(f"LSD-C (lsdc_mnist) from RotNet epoch {args.rotnet_epochs}, up to {args.lsdc_epochs} epochs, "
              f"head read on {len(labels):,} images after each", flush=True)
        try:
            fit(lsdc_cfg, lsdc)
        except TargetReached:
            reached = len(lsdc.timeline)
    return Stage([e for e in rotnet.timeline if e["epoch"] <= args.rotnet_epochs]), Stage(lsdc.timeline), reached


def summary(rotnet: Stage, lsdc: Stage, reached: int | None, target: float) -> str:
    clock = rotnet.seconds("wall_seconds") + lsdc.seconds("wall_seconds")
    steps = rotnet.seconds("epoch_seconds") + lsdc.seconds("epoch_seconds")
    accs = ", ".join(f"{e['head_acc']:.3f}" for e in lsdc.timeline)
    to_target = (f"{target:.0%} head ACC after LSD-C epoch {reached}: "
                 f"{(rotnet.seconds('wall_seconds') + lsdc.seconds('wall_seconds', reached)) / 60:.1f} min"
                 if reached else f"{target:.0%} head ACC not reached in {len(lsdc.timeline)} LSD-C epochs")
    return (f"{to_target}; chain {clock / 60:.1f} min (RotNet {rotnet.seconds('wall_seconds') / 60:.1f}, "
            f"LSD-C {lsdc.seconds('wall_seconds') / 60:.1f}); RotNet {rotnet.images_per_second:.0f} images/s, "
            f"LSD-C {lsdc.images_per_second:.0f} images/s; head ACC by epoch {accs}; where the time goes: "
            f"RotNet steps {rotnet.seconds('epoch_seconds') / clock:.0%}, LSD-C steps "
            f"{lsdc.seconds('epoch_seconds') / clock:.0%}, validation + checkpoints + set-up "
            f"{(clock - steps) / clock:.0%}; head reads {lsdc.seconds('read_seconds') / 60:.1f} min besides")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value for both stages' configs, e.g. performance.bf16=true")
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rotnet-epochs", type=int, default=ROTNET_EPOCHS, help="default: the recipe's")
    parser.add_argument("--lsdc-epochs", type=int, default=LSDC_EPOCHS, help="default: the recipe's")
    parser.add_argument("--target", type=float, default=0.97, help="head ACC that stops the clock")
    parser.add_argument("--limit", type=int, default=None, help="data.limit: first N images per split (smoke runs)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_runs/mnist_time_to_accuracy"),
                        help="checkpoints and timelines; the same command continues there")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-record", action="store_true", help="print only; no row in BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rotnet, lsdc, reached = run_chain(args, device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    setting = (f"RotNet {len(rotnet.timeline)} of {ROTNET_EPOCHS} epochs -> LSD-C up to {args.lsdc_epochs} of "
               f"{LSDC_EPOCHS}, "
               f"{'first ' + str(args.limit) + ' images per split' if args.limit else 'all 70,000 images'}"
               + (f", {' '.join(args.overrides)}" if args.overrides else ""))
    result = summary(rotnet, lsdc, reached, args.target)
    print(f"{hardware}: {setting}\n{result}")
    if not args.no_record:
        command = " ".join(["python bench/mnist_time_to_accuracy.py", *sys.argv[1:]])
        print(add_rows([f"| {date.today()} | mnist_time_to_accuracy | {hardware} | torch {torch.__version__} | "
                        f"{setting} | {result} | `{command}` |"]))


if __name__ == "__main__":
    main()
