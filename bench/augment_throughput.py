"""Augmentation throughput: clusterlab's batched kornia pipeline vs torchvision's per-image PIL
transforms, with the same MIX'EM supplementary 1.2 operations, on synthetic uint8 images.

Prints a table and appends a dated row (hardware, versions, command) to BENCHMARKS.md.
Floor: augmentation is memory-bound; the bytes touched per image (uint8 in, float32 views out,
about 5 float passes for crop/jitter/grayscale/blur/normalise) are printed next to the result.

    python bench/augment_throughput.py --size 32 --batch 512
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clusterlab.config import AugmentConfig  # noqa: E402
from clusterlab.data.augment import BatchAugment, default_blur_kernel  # noqa: E402

MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def images_per_second(fn, n_images: int, repeats: int, sync) -> float:
    fn()  # warm-up
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
    parser.add_argument("--pil-images", type=int, default=512, help="images for the per-image PIL baseline")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = AugmentConfig()
    batch = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, device=device)
    aug = BatchAugment(cfg, args.size, MEAN, STD).to(device)
    batched = images_per_second(lambda: aug(batch), args.batch, args.repeats, sync)

    kernel = default_blur_kernel(args.size)
    pil_pipeline = T.Compose([
        T.RandomResizedCrop(args.size, scale=cfg.crop_scale),
        T.RandomHorizontalFlip(cfg.hflip_p),
        T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        T.RandomGrayscale(cfg.grayscale_p),
        T.GaussianBlur(kernel, sigma=cfg.blur_sigma),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])
    pil_images = [Image.fromarray(img.permute(1, 2, 0).cpu().numpy()) for img in batch[: args.pil_images]]
    per_image = images_per_second(lambda: [pil_pipeline(im) for im in pil_images], len(pil_images), 1, lambda: None)

    bytes_per_image = 3 * args.size**2 * (1 + 4 * 5)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"\naugmentation, {args.size} px, batch {args.batch}, {hardware}")
    print(f"{'pipeline':<36}{'images/s':>12}")
    print(f"{'clusterlab BatchAugment (kornia)':<36}{batched:>12,.0f}")
    print(f"{'torchvision per-image PIL':<36}{per_image:>12,.0f}")
    print(f"ratio batched / per-image: {batched / per_image:.1f}x;  ~{bytes_per_image / 1e3:.0f} kB touched per "
          f"image -> {batched * bytes_per_image / 1e9:.2f} GB/s achieved")

    if not args.no_record:
        out = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
        row = (f"| {date.today()} | augment_throughput | {hardware} | torch {torch.__version__}, torchvision "
               f"{torchvision.__version__} | {args.size} px, batch {args.batch} | batched {batched:,.0f} img/s, "
               f"PIL {per_image:,.0f} img/s, ratio {batched / per_image:.1f}x | "
               f"`python bench/augment_throughput.py {' '.join(sys.argv[1:])}`|\n")
        with out.open("a") as f:
            f.write(row)
        print(f"appended to {out}")


if __name__ == "__main__":
    main()
