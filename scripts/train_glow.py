"""Train a small Glow (fk.Glow, memory saving) on patches of the photos that ship with
scikit-image, report held-out bits/dim beside two Gaussian baselines, and write a PNG grid of
samples at several temperatures. Runs in a few minutes on a laptop CPU; nothing is downloaded.

Data: six RGB photos of ``skimage.data`` (astronaut, chelsea, coffee, rocket,
immunohistochemistry, the left view of stereo_motorcycle), each downscaled 2x (2x2 means,
rounded back to 8 bits), cut into ``--patch`` x ``--patch`` patches at half-patch stride. The
right-most 20% of every photo is held out: test patches never overlap training pixels.
Dequantisation: x = (pixel + u) / 256 - 0.5, u ~ U(0, 1); bits/dim is the discrete
log-likelihood bound ``(-log p(x) + D log 256) / (D log 2)`` (``Glow.bits_per_dim(n_bins=256)``).

Baselines on the same dequantised data, fitted in closed form on the training patches:
a factorised Gaussian (one mean and variance per dimension) and a full-covariance Gaussian
(the best linear flow).

Run: ``.venv/bin/python scripts/train_glow.py --out runs/glow`` (see ``--help``; docs/glow.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import flowkernels as fk

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "stereo_motorcycle")
HELD_OUT = 0.2  # the right-most fraction of every photo is the test set
N_BINS = 256


def _photo(name: str) -> np.ndarray:
    import skimage.data  # noqa: PLC0415 (an optional dependency of the example only)

    image = getattr(skimage.data, name)()
    return image[0] if name == "stereo_motorcycle" else image  # (left, right, disparity)


def _downscale(image: np.ndarray) -> np.ndarray:
    """2x2 means, rounded to 8 bits: more structure per patch than the full-resolution photo."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    pooled = image[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))
    return np.rint(pooled).astype(np.uint8)


def _patches(image: np.ndarray, size: int) -> np.ndarray:
    """All size x size patches at stride size // 2, (N, 3, size, size) uint8."""
    step = size // 2
    rows = range(0, image.shape[0] - size + 1, step)
    cols = range(0, image.shape[1] - size + 1, step)
    return np.stack([image[r : r + size, c : c + size].transpose(2, 0, 1) for r in rows for c in cols])


def load_patches(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) uint8 patches (N, 3, size, size) of the bundled photos."""
    train, test = [], []
    for name in PHOTOS:
        image = _downscale(_photo(name))
        cut = int(image.shape[1] * (1.0 - HELD_OUT))
        train.append(_patches(image[:, :cut], size))
        test.append(_patches(image[:, cut:], size))
    return torch.from_numpy(np.concatenate(train)), torch.from_numpy(np.concatenate(test))


def dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 -> float32 in [-0.5, 0.5) with uniform noise within each 1/256 bin."""
    noise = torch.rand(x.shape, generator=generator)
    return (x.float() + noise) / N_BINS - 0.5


def gaussian_baselines(train: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """Held-out bits/dim of a factorised and of a full-covariance Gaussian fitted on ``train``
    (both (N, D) dequantised float64)."""
    dims = train.shape[1]
    mean = train.mean(0)
    centred, test_c = train - mean, test - mean
    var = centred.var(0)
    nll_diag = 0.5 * ((test_c**2 / var) + torch.log(2 * math.pi * var)).sum(1)
    cov = centred.T @ centred / (train.shape[0] - 1) + 1e-8 * torch.eye(dims, dtype=train.dtype)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    nll_full = -dist.log_prob(test)

    def bpd(nll: torch.Tensor) -> float:
        return float(((nll + dims * math.log(N_BINS)) / (dims * math.log(2.0))).mean())

    return {"factorised_gaussian": bpd(nll_diag), "full_covariance_gaussian": bpd(nll_full)}


@torch.no_grad()
def held_out_bpd(glow: fk.Glow, test: torch.Tensor, batch: int) -> float:
    glow.eval()
    gen = torch.Generator().manual_seed(1234)  # the same dequantisation noise at every evaluation
    total = sum(glow.bits_per_dim(dequantize(part, gen), n_bins=N_BINS).sum() for part in test.split(batch))
    glow.train()
    return float(total) / test.shape[0]


def sample_grid(glow: fk.Glow, test: torch.Tensor, temperatures: list[float], per_row: int, path: Path) -> None:
    """A PNG grid: held-out patches in the first row, then one row of samples per temperature,
    each patch enlarged 4x (nearest)."""
    glow.eval()
    gen = torch.Generator().manual_seed(0)
    rows = [test[torch.randperm(test.shape[0], generator=gen)[:per_row]].float() / 255.0]
    size = tuple(test.shape[2:])
    for t in temperatures:
        rows.append((glow.sample(per_row, size=size, temperature=t, generator=gen) + 0.5).clamp(0.0, 1.0))
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)  # (3, rows*H, per_row*W)
    pixels = (grid * 255.0).round().byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels).resize((pixels.shape[1] * 4, pixels.shape[0] * 4), Image.NEAREST)
    image.save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/glow"), help="output folder (samples.png, metrics.json)")
    parser.add_argument("--patch", type=int, default=16, help="patch size (divisible by 2^levels)")
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--depth", type=int, default=8, help="flow steps per level (K)")
    parser.add_argument("--hidden", type=int, default=64, help="coupling subnet width")
    parser.add_argument("--coupling", choices=fk.glow.COUPLINGS, default="affine")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100, help="linear learning-rate warm-up steps")
    parser.add_argument("--iterations", type=int, default=1500, help="at most this many training steps")
    parser.add_argument("--minutes", type=float, default=4.0, help="and at most this much training time")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.85, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    # One thread: a model this small gains little from more, and on a busy machine OpenMP's
    # barrier waits made steps 10x slower with 2 threads on 2 cores (measured here).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    train_u8, test_u8 = load_patches(args.patch)
    dims = train_u8[0].numel()
    baseline_gen = torch.Generator().manual_seed(1234)
    baselines = gaussian_baselines(
        dequantize(train_u8, baseline_gen).reshape(-1, dims).double(),
        dequantize(test_u8, baseline_gen).reshape(-1, dims).double(),
    )
    print(
        f"{train_u8.shape[0]} training and {test_u8.shape[0]} held-out {args.patch}x{args.patch} patches; "
        f"baselines (held-out bits/dim): " + ", ".join(f"{k} {v:.3f}" for k, v in baselines.items())
    )

    glow = fk.Glow(3, args.levels, args.depth, args.hidden, coupling=args.coupling, image_size=(args.patch,) * 2)
    glow.initialize_(dequantize(train_u8[torch.randperm(train_u8.shape[0])[:512]]))  # ActNorm data-dependent init
    optimizer = torch.optim.Adam(glow.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    history = [{"iteration": 0, "held_out_bpd": held_out_bpd(glow, test_u8, 256)}]
    start = time.perf_counter()
    bar = tqdm(range(1, args.iterations + 1), desc="train", unit="step")
    for it in bar:
        batch = dequantize(train_u8[torch.randint(train_u8.shape[0], (args.batch,))])
        loss = glow.bits_per_dim(batch, n_bins=N_BINS).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(glow.parameters(), 50.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(train_bpd=f"{loss.item():.3f}")
        out_of_time = time.perf_counter() - start > 60.0 * args.minutes
        if it % args.eval_every == 0 or it == args.iterations or out_of_time:
            history.append({"iteration": it, "held_out_bpd": held_out_bpd(glow, test_u8, 256)})
            bar.write(f"step {it}: held-out {history[-1]['held_out_bpd']:.3f} bits/dim")
        if out_of_time:
            break
    train_seconds = time.perf_counter() - start
    sample_grid(glow, test_u8, args.temperatures, 10, args.out / "samples.png")
    metrics = {
        "glow_held_out_bpd": history[-1]["held_out_bpd"],
        "baselines_held_out_bpd": baselines,
        "iterations": history[-1]["iteration"],
        "train_seconds": round(train_seconds, 1),
        "history": history,
        "patches": {"train": int(train_u8.shape[0]), "held_out": int(test_u8.shape[0]), "size": args.patch},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("glow_held_out_bpd", "baselines_held_out_bpd", "train_seconds")}))
    return metrics


if __name__ == "__main__":
    main()
