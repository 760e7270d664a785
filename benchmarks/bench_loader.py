"""Training data loader throughput: samples/s of one worker (one core, one thread) per pixel source.

Each sample is what a training step consumes: a random ``crop`` x ``crop`` HR crop, its LR (the
official uint8 imresize, or the bank's stored LR), a random flip, both as float32 tensors
(``srflow.data.HRImageDataset.__getitem__``). Sources, from slowest to fastest:

* ``cold``: the PNG decoded for every sample (the default without a store);
* ``memory``: decoded once into this process's memory (``cache_images``; one copy per worker);
* ``store``: decoded once into an image store (``srflow prepare``), memory-mapped (page cache warm);
* ``bank``: the store's fixed crop bank (the official prepare step): no crop, no resize.

The images are DIV2K-sized (2040 x 1356 by default) PNGs made from scikit-image's bundled photos
(Pillow bicubic upscaling: smooth content that compresses like a photo, unlike noise). Each mode
is timed ``--repeats`` times over ``--items`` samples after one warm-up pass; the JSON keeps every
repeat. A GPU step at the DESIGN.md target (>= 500 samples/s) needs 500 / (samples/s per worker)
workers.

    python -m benchmarks.bench_loader --out benchmarks/results/cpu-$(date +%F)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import environment, write_json
from srflow.data import BUNDLED_PHOTOS, HRImageDataset
from srflow.store import prepare_store

MODES = ("cold", "memory", "store", "bank")


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` PNGs of ``size`` (width, height), upscaled bundled photos."""
    import skimage.data  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = getattr(skimage.data, BUNDLED_PHOTOS[i % len(BUNDLED_PHOTOS)])()
        img = Image.fromarray(np.ascontiguousarray(photo)).convert("RGB").resize(size, Image.BICUBIC)
        path = folder / f"img{i:03d}.png"
        img.save(path)
        paths.append(path)
    return paths


def dataset(mode: str, images: Path, store: Path, scale: int, crop: int) -> HRImageDataset:
    root = images if mode in ("cold", "memory") else store
    ds = HRImageDataset(root, scale, crop=crop, seed=0, cache=mode == "memory", repeat=1000)
    if ds.bank != (mode == "bank"):
        raise RuntimeError(f"mode {mode}: the dataset {'uses' if ds.bank else 'does not use'} a crop bank")
    return ds


def samples_per_second(ds: HRImageDataset, items: int, offset: int) -> float:
    t0 = time.perf_counter()
    for i in range(offset, offset + items):
        ds[i % len(ds)]
    return items / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4, help="number of images [4]")
    parser.add_argument("--size", type=int, nargs=2, default=(2040, 1356), help="width height [2040 1356]")
    parser.add_argument("--scale", type=int, default=4, choices=[4, 8])
    parser.add_argument("--crop", type=int, default=160)
    parser.add_argument("--bank", type=int, default=47, help="bank crops per image [47, official]")
    parser.add_argument("--items", type=int, default=200, help="samples per timed pass (cold: a fifth) [200]")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", type=Path, help="folder of the JSON (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        make_images(images, args.images, tuple(args.size))
        t0 = time.perf_counter()
        prepare_store(images, Path(tmp) / "store", progress=False)
        prepare_seconds = {"store": time.perf_counter() - t0}
        t0 = time.perf_counter()
        prepare_store(images, Path(tmp) / "bank", bank=args.bank, crop=args.crop, scale=args.scale, progress=False)
        prepare_seconds["store_with_bank"] = time.perf_counter() - t0
        rows = []
        for mode in args.modes:
            ds = dataset(mode, images, Path(tmp) / ("bank" if mode == "bank" else "store"), args.scale, args.crop)
            items = max(10, args.items // 5) if mode == "cold" else args.items
            samples_per_second(ds, items, 0)  # warm-up: page cache, in-process cache, allocator
            rates = [samples_per_second(ds, items, items * (r + 1)) for r in range(args.repeats)]
            row = {"mode": mode, "items": items, "samples_per_s": rates, "median": statistics.median(rates)}
            rows.append(row)
            print(
                f"{mode:7s} {row['median']:8.1f} samples/s per worker (repeats: {', '.join(f'{r:.1f}' for r in rates)})"
            )
    payload = {
        "benchmark": "loader",
        "command": "python -m benchmarks.bench_loader " + " ".join(sys.argv[1:] if argv is None else argv),
        "env": environment(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "images": args.images,
        "size": list(args.size),
        "scale": args.scale,
        "crop": args.crop,
        "bank_per_image": args.bank,
        "prepare_seconds": prepare_seconds,
        "rows": rows,
    }
    if args.out is not None:
        print(f"wrote {write_json('bench_loader', payload, args.out)}")


if __name__ == "__main__":
    main()
