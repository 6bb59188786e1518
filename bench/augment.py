"""Augmentation throughput: clusterlab's batched device pipeline (``BatchAugment``, kornia) vs
torchvision's per-image PIL transforms fed by a ``DataLoader`` with worker processes, with the
same MIX'EM supplementary 1.2 operations, on synthetic uint8 images. (Formerly
``bench/augment_throughput.py``.)

Prints a table and appends a dated row (hardware, versions, command) to BENCHMARKS.md.
Floor: augmentation is memory-bound; the bytes touched per image (uint8 in, float32 view out,
about 5 float passes for crop / jitter / grayscale / blur / normalise) are printed next to the
result as the achieved GB/s.

    python bench/augment.py                       # 32 px, batch 512, device = cuda if present
    python bench/augment.py --size 96 --device cuda --workers 0 2 8
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
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from record import add_rows  # noqa: E402  (bench/record.py: this script's folder is on sys.path)
from clusterlab.config import AugmentConfig  # noqa: E402
from clusterlab.data.augment import BatchAugment, default_blur_kernel  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def pil_pipeline(cfg: AugmentConfig, size: int) -> T.Compose:
    """The per-image torchvision equivalent of :class:`BatchAugment`."""
    kernel = cfg.blur_kernel or default_blur_kernel(size)
    return T.Compose([
        T.RandomResizedCrop(size, scale=cfg.crop_scale),
        T.RandomHorizontalFlip(cfg.hflip_p),
        T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
        T.RandomApply([T.GaussianBlur(kernel, sigma=cfg.blur_sigma)], p=cfg.blur_p),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


class PilImages(Dataset):
    def __init__(self, images: torch.Tensor, transform: T.Compose) -> None:
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(Image.fromarray(self.images[i]))


def images_per_second(fn, n_images: int, repeats: int, sync) -> float:
    fn()  # warm-up (and worker start-up for DataLoaders with persistent workers)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return n_images * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (32 CIFAR, 96 STL10)")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pil-images", type=int, default=1024, help="images per pass of the per-image PIL baseline")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, os.cpu_count() or 1],
                        help="DataLoader worker counts for the PIL baseline (0 = in the main process)")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    cfg = AugmentConfig()
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    aug = BatchAugment(cfg, args.size, MEAN, STD).to(device)
    batched = images_per_second(lambda: aug(batch), args.batch, args.repeats, sync)

    cpu_images = torch.randint(0, 256, (args.pil_images, 3, args.size, args.size), dtype=torch.uint8)
    dataset = PilImages(cpu_images, pil_pipeline(cfg, args.size))
    per_image: dict[int, float] = {}
    for workers in args.workers:
        loader = DataLoader(dataset, batch_size=args.batch, num_workers=workers, persistent_workers=workers > 0)
        if device.type == "cuda":  # the baseline also has to bring its views to the device
            run = lambda: [b.to(device, non_blocking=True) for b in loader]  # noqa: E731
        else:
            run = lambda: list(loader)  # noqa: E731
        per_image[workers] = images_per_second(run, len(dataset), 1, sync)
        del loader

    bytes_per_image = 3 * args.size**2 * (1 + 4 * 5)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    print(f"\naugmentation, {args.size} px, batch {args.batch}, {hardware}")
    print(f"{'pipeline':<44}{'images/s':>12}{'vs batched':>12}")
    print(f"{'clusterlab BatchAugment (kornia, ' + device.type + ')':<44}{batched:>12,.0f}{1.0:>11.1f}x")
    for workers, rate in per_image.items():
        print(f"{f'torchvision PIL, DataLoader workers={workers}':<44}{rate:>12,.0f}{rate / batched:>11.2f}x")
    best_pil = max(per_image.values())
    print(f"ratio batched / best per-image: {batched / best_pil:.1f}x;  floor: ~{bytes_per_image / 1e3:.0f} kB touched "
          f"per image -> {batched * bytes_per_image / 1e9:.2f} GB/s achieved")

    if not args.no_record:
        pil = ", ".join(f"PIL {w} workers {r:,.0f} img/s" for w, r in per_image.items())
        row = (f"| {date.today()} | augment | {hardware} | torch {torch.__version__}, torchvision "
               f"{torchvision.__version__} | {args.size} px, batch {args.batch}, floor ~{bytes_per_image / 1e3:.0f} kB "
               f"per image | batched ({device.type}) {batched:,.0f} img/s ({batched * bytes_per_image / 1e9:.2f} GB/s); "
               f"{pil}; ratio {batched / best_pil:.1f}x | `python bench/augment.py {' '.join(sys.argv[1:])}` |\n")
        print(f"added to {add_rows([row])}")


if __name__ == "__main__":
    main()
