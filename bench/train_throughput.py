"""Training throughput of SimCLR and MIX'EM with ResNet-18: views/s, images/s, seconds per epoch,
achieved TFLOP/s and the share of the device's bf16 dense peak (MFU), one row per fast path.

The step is the project's own: ``clusterlab.platform.loop._run_epoch`` over a method built by
``build_method`` (augmentation with ``BatchAugment`` on the device included), with the
optimiser / schedule of ``clusterlab.trainers.optim`` and the switches of
``PerformanceConfig`` (bf16 autocast, channels_last, fused optimiser, torch.compile).
Data: synthetic uint8 images already on the device (as the loop keeps them).

Floor (FLOPs): a ResNet-18 forward costs 1.11 GFLOPs per 32 px view with the CIFAR stem
(0.556 G MACs) and 0.67 GFLOPs per 96 px view with the standard stem; forward + backward is
taken as 3x that; heads and losses are < 1 % and left out. Two views per image. MFU =
achieved FLOP/s / bf16 dense peak (H100 SXM 989 TFLOP/s; --peak-tflops overrides); "n/a" on CPUs.

Rows (levers, measured one by one on top of the float32 NCHW eager baseline):
  fp32           baseline: float32, NCHW, foreach optimiser, eager
  bf16           + bf16 autocast
  channels_last  + channels_last weights and views
  fused          + fused optimiser
  compile        + torch.compile of the model (compilation in the warm-up, not timed)
  all            bf16 + channels_last + fused + compile
  all-nocompile  bf16 + channels_last + fused
  no-aug         baseline with the views made once outside the step: the step without augmentation
Augmentation alone (``Method.make_views``, two views) is timed too; the target is >= 5x the
step's image rate.

    python bench/train_throughput.py                                  # GPU: batch 512, all rows
    python bench/train_throughput.py --device cpu --batch-size 32 --steps 2 --sizes 32 \\
        --levers fp32 bf16 channels_last fused no-aug                 # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import add_rows  # noqa: E402  (bench/record.py: this script's folder is on sys.path)
from clusterlab.config import ExperimentConfig, PerformanceConfig  # noqa: E402
from clusterlab.platform.loop import _mean_over_workers, _run_epoch, _shard_indices  # noqa: E402
from clusterlab.trainers import DataMeta, build_method  # noqa: E402
from clusterlab.trainers.optim import build_optimizer, build_scheduler  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
#: forward GFLOPs per view of ResNet-18 (CIFAR stem at 32 px; standard stem at 96 px)
FWD_GFLOPS = {32: 1.11, 96: 0.67}
#: training images per epoch: CIFAR-10 train (50k); STL-10 train + unlabeled (105k)
EPOCH_IMAGES = {32: 50_000, 96: 105_000}
#: bf16 dense peak TFLOP/s by device name substring
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}

LEVERS = {
    "fp32": dict(bf16=False, channels_last=False, fused_optimizer=False, compile=False),
    "bf16": dict(bf16=True, channels_last=False, fused_optimizer=False, compile=False),
    "channels_last": dict(bf16=False, channels_last=True, fused_optimizer=False, compile=False),
    "fused": dict(bf16=False, channels_last=False, fused_optimizer=True, compile=False),
    "compile": dict(bf16=False, channels_last=False, fused_optimizer=False, compile=True),
    "all": dict(bf16=True, channels_last=True, fused_optimizer=True, compile=True),
    "all-nocompile": dict(bf16=True, channels_last=True, fused_optimizer=True, compile=False),
    "no-aug": dict(bf16=False, channels_last=False, fused_optimizer=False, compile=False),
}


def device_peak(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAKS.items() if key in name), None)


def build(method_name: str, size: int, batch: int, steps: int, perf: PerformanceConfig, device: torch.device):
    """Method, model, optimiser, scheduler wired as ``loop.fit`` wires them."""
    cfg = ExperimentConfig.model_validate({
        "method": method_name, "batch_size": batch, "epochs": 1000, "performance": perf.model_dump(),
        "model": {"backbone": "resnet18", "stem": "cifar" if size <= 64 else "imagenet"}})
    torch.manual_seed(0)
    method = build_method(cfg, DataMeta(10, size, MEAN, STD)).to(device)
    if perf.enabled("channels_last", device.type):
        method = method.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, method.parameters(), fused=perf.enabled("fused_optimizer", device.type))
    scheduler = build_scheduler(cfg.optim, optimizer, cfg.epochs, steps)
    model = torch.compile(method) if perf.compile else method
    return method, model, optimizer, scheduler


def measure(method_name: str, size: int, lever: str, args, device: torch.device, sync) -> dict[str, float]:
    perf = PerformanceConfig(**LEVERS[lever])
    method, model, optimizer, scheduler = build(method_name, size, args.batch_size, args.steps, perf, device)
    images = torch.randint(0, 256, (args.batch_size * max(args.steps, args.warmup), 3, size, size),
                           dtype=torch.uint8, device=device)
    batches = _shard_indices(len(images), args.batch_size, 0, 0, 0, 1)
    if lever == "no-aug":  # views made once, outside the timed step
        fixed = method.make_views(images[: args.batch_size])
        method.make_views = lambda _: [v.clone() for v in fixed]
    method.train()
    warm = _run_epoch(method, model, images, batches[: args.warmup], device, optimizer, scheduler, 0, perf)
    _mean_over_workers(warm, 1)  # host read: everything before it has run
    sync()
    start = time.perf_counter()
    out = _run_epoch(method, model, images, batches[: args.steps], device, optimizer, scheduler, 0, perf)
    loss = _mean_over_workers(out, 1)["loss"]  # the loop's single read-back per epoch
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    return {"step_s": seconds, "images_s": args.batch_size / seconds, "views_s": 2 * args.batch_size / seconds,
            "loss": loss}


def augmentation_rate(size: int, args, device: torch.device, sync) -> float:
    """Images/s of ``Method.make_views`` (two views per image) alone."""
    method, *_ = build("simclr", size, args.batch_size, 1, PerformanceConfig(), device)
    images = torch.randint(0, 256, (args.batch_size, 3, size, size), dtype=torch.uint8, device=device)
    method.make_views(images)
    sync()
    start = time.perf_counter()
    for _ in range(args.aug_repeats):
        method.make_views(images)
    sync()
    return args.batch_size * args.aug_repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["simclr", "mixem"], choices=["simclr", "mixem"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 96], choices=sorted(FWD_GFLOPS),
                        help="32: CIFAR stem; 96: standard stem (STL-10)")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--aug-repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="bf16 dense peak of the device; default by device name (H100 989); none on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    peak = device_peak(device, args.peak_tflops)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    print(f"training throughput, ResNet-18, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}; "
          f"{hardware}; torch {torch.__version__}; bf16 peak {f'{peak:g} TFLOP/s' if peak else 'n/a'}")
    header = (f"{'method':<8}{'px':>4} {'lever':<15}{'s/step':>8}{'images/s':>10}{'views/s':>10}{'s/epoch':>10}"
              f"{'TFLOP/s':>9}{'MFU':>8}{'floor s/step':>14}")
    print(header)
    rows: list[str] = []
    for size in args.sizes:
        aug = augmentation_rate(size, args, device, sync)
        flops_per_view = 3 * FWD_GFLOPS[size] * 1e9
        best_step_rate = 0.0
        for method_name in args.methods:
            for lever in args.levers:
                r = measure(method_name, size, lever, args, device, sync)
                tflops = r["views_s"] * flops_per_view / 1e12
                mfu = f"{tflops / peak:.1%}" if peak else "n/a"
                floor = f"{2 * args.batch_size * flops_per_view / (peak * 1e12) * 1e3:.1f} ms" if peak else "n/a"
                epoch_s = EPOCH_IMAGES[size] // args.batch_size * r["step_s"]
                print(f"{method_name:<8}{size:>4} {lever:<15}{r['step_s']:>8.3f}{r['images_s']:>10,.1f}"
                      f"{r['views_s']:>10,.1f}{epoch_s:>10,.0f}{tflops:>9.3f}{mfu:>8}{floor:>14}", flush=True)
                if lever != "no-aug":
                    best_step_rate = max(best_step_rate, r["images_s"])
                rows.append(f"{method_name} {size}px {lever}: {r['views_s']:,.1f} views/s, {r['step_s']:.3f} s/step, "
                            f"{epoch_s:,.0f} s/epoch, {tflops:.3f} TFLOP/s, MFU {mfu}")
        ratio = aug / best_step_rate if best_step_rate else float("nan")
        print(f"{size} px augmentation alone (2 views): {aug:,.0f} images/s = {ratio:.1f}x the fastest step's image "
              f"rate ({'meets' if ratio >= 5 else 'below'} the 5x target); floor: "
              f"{flops_per_view / 1e9:.2f} GFLOPs per view fwd+bwd")
        rows.append(f"{size}px augmentation alone {aug:,.0f} images/s ({ratio:.1f}x the step)")

    if not args.no_record:
        setting = (f"ResNet-18, batch {args.batch_size}, {args.steps} steps, floor 3x{'/'.join(f'{FWD_GFLOPS[s]}' for s in args.sizes)}"
                   f" GFLOPs per view, bf16 peak {f'{peak:g} TFLOP/s' if peak else 'n/a'}")
        print("added to " + str(add_rows([
            f"| {date.today()} | train_throughput | {hardware} | torch {torch.__version__} | {setting} | "
            f"{'; '.join(rows)} | `python bench/train_throughput.py {' '.join(sys.argv[1:])}` |"])))


if __name__ == "__main__":
    main()
