"""``srflow demo``: train a small SRFlow on the photos bundled with scikit-image, then sample and
evaluate it, in a few minutes on a laptop CPU (bigger and longer on a GPU).

Steps (everything goes to ``out``, default ``./srflow-demo``):

1. ``photos/train`` (5 bundled photos) and ``photos/test`` (the cat, ``chelsea``) as PNGs, and
   the test photo's 4x MATLAB-bicubic LR in ``photos/test_lr`` (nothing is downloaded).
2. The two training stages of the official models (:func:`srflow.train.train`): first the RRDB
   alone as an L1 super-resolver (``stage="rrdb"``, the official RRDB recipe's loss, optimiser and
   cosine schedule, one cosine period over the demo's steps), then SRFlow from that RRDB (recipe
   ``released``: the RRDB goes on training with the flow) with memory-saving invertible backprop.
   On a CPU the ``tiny-4x`` preset on 64x64 crops, batch 8, ~1 + 2 minutes; on CUDA ``df2k-4x`` on
   160x160 crops, batch 16 / 12, ~2 + 5 minutes. The mean L1 and bits/px are printed as they fall.
3. The activation memory that memory saving avoids on one training batch (bytes autograd keeps
   for backward, with and without memory saving).
4. Samples of the test LR at temperatures 0, 0.5 and 0.9 (``samples/``) and a metrics table
   (PSNR, SSIM, LR-PSNR, PSNR at t=0, diversity, NLL; SRFlow's test protocol) with two baselines,
   bicubic upscaling and the pretrained RRDB's own SR (the regression baseline of the paper), in
   ``metrics/metrics.csv``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import flowkernels as fk

from .config import TrainConfig, resolve_config, resolve_device
from .data import HRImageDataset, load_rgb, make_lr, save_rgb, write_bundled_photos
from .infer import EvalResult, evaluate, format_table, load_rrdb, sample_images
from .model import SRFlow
from .train import TrainResult, train

__all__ = ["run_demo", "DemoResult"]

TRAIN_PHOTOS = ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")
TEST_PHOTOS = ("chelsea",)
TEMPERATURES = (0.0, 0.5, 0.9)


@dataclass
class DemoResult:
    """What the demo wrote and measured."""

    out: Path
    rrdb: TrainResult  # the RRDB stage
    train: TrainResult  # the SRFlow stage
    metrics: EvalResult
    samples: list[Path]
    activation_bytes: tuple[int, int]  # (with memory saving, plain PyTorch autograd), trained model
    seconds: float


def _activation_report(model: SRFlow, hr: torch.Tensor, lr: torch.Tensor) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one training forward (parameters excluded): (with
    memory saving and the model's backend, with plain PyTorch autograd: memory saving off and the
    reference backend, whose ops are ordinary autograd). A fused backend recomputes each step even
    with memory saving off, so it is not the baseline."""
    backend, saving = model.backend, model.memory_saving
    model.initialize_actnorms(hr, lr)

    def kept() -> int:
        return fk.saved_tensor_bytes(lambda: model.nll(hr, lr, add_noise=False), exclude=model.parameters())[1]

    try:
        model.set_memory_saving(True)
        with_saving = kept()
        model.set_memory_saving(False)
        model.set_backend("reference")
        plain = kept()
    finally:
        model.set_backend(backend)
        model.set_memory_saving(saving)
    return with_saving, plain


def _settings(device: torch.device) -> dict:
    """Per device: the preset, crop, and per stage (RRDB, SRFlow) batch, learning rate, steps and minutes."""
    if device.type == "cuda":
        return {
            "preset": "df2k-4x",
            "crop": 160,
            "rrdb": {"batch": 16, "lr": 2e-4, "steps": 2000, "minutes": 2.0},
            "srflow": {"batch": 12, "lr": 2.5e-4, "steps": 3000, "minutes": 5.0},
        }
    return {
        "preset": "tiny-4x",
        "crop": 64,
        "rrdb": {"batch": 8, "lr": 1e-3, "steps": 300, "minutes": 1.0},
        "srflow": {"batch": 8, "lr": 1e-3, "steps": 450, "minutes": 2.5},
    }


def run_demo(
    out: str | Path = "srflow-demo",
    minutes: float | None = None,
    steps: int | None = None,
    device: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> DemoResult:
    """Run the demo (see the module docstring) and return what it wrote. ``minutes`` caps the
    training time of each stage, ``steps`` sets the number of steps of each (the LR schedules
    follow them), ``threads`` the CPU threads (default: all cores but one; restored afterwards).
    The arguments are checked (as the training options they become) before anything is written."""
    say = log or (lambda msg: print(msg, flush=True))
    t0 = time.perf_counter()
    out = Path(out)
    dev = resolve_device(device)
    settings = _settings(dev)
    rrdb_config, config = (
        resolve_config(
            _config(
                out,
                dev,
                settings,
                stage,
                steps if steps is not None else settings[stage]["steps"],
                minutes if minutes is not None else settings[stage]["minutes"],
                seed,
            )
        )
        for stage in ("rrdb", "srflow")
    )
    if threads is not None and threads < 1:
        raise ValueError(f"threads: expected a positive number of CPU threads, got {threads}")
    if threads is None and dev.type == "cpu":
        # Leave one core free: with every core busy, one competing process makes OpenMP's
        # barrier waits stall (measured: a 2-core machine with one other busy process ran 6x fewer
        # training steps with 2 threads than with 1).
        threads = min(torch.get_num_threads(), max(1, (os.cpu_count() or 2) - 1))
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(rrdb_config, config, out, dev, say, t0)
    finally:
        torch.set_num_threads(previous_threads)


def _config(
    out: Path, dev: torch.device, settings: dict, stage: str, steps: int, minutes: float, seed: int
) -> TrainConfig:
    photos = out / "photos"
    rrdb = stage == "rrdb"
    return TrainConfig(
        data=str(photos / "train"),
        val_data=str(photos / "test"),
        out=str(out / ("rrdb" if rrdb else "run")),
        preset=settings["preset"],
        stage=stage,
        # the SRFlow stage starts from the RRDB stage's run folder (its newest checkpoint)
        rrdb_weights=None if rrdb else str(out / "rrdb"),
        # the RRDB stage: one cosine from the learning rate down to the official 1e-7 over the steps
        cosine_period=steps if rrdb else None,
        cosine_restarts=0,
        steps=steps,
        batch=settings[stage]["batch"],
        crop=settings["crop"],
        lr=settings[stage]["lr"],
        val_every=steps,
        val_images=1,
        val_crop=192,
        save_every=steps,
        keep_last=1,
        log_every=max(1, steps // 12),
        max_minutes=minutes,
        cache_images=True,
        device=str(dev),
        seed=seed,
        progress=False,
        resume="auto",
    )


def _run(
    rrdb_config: TrainConfig,
    config: TrainConfig,
    out: Path,
    dev: torch.device,
    say: Callable[[str], None],
    t0: float,
) -> DemoResult:
    train_dir, test_dir, test_lr_dir = Path(config.data), Path(config.val_data), out / "photos" / "test_lr"
    write_bundled_photos(train_dir, TRAIN_PHOTOS)
    test_paths = write_bundled_photos(test_dir, TEST_PHOTOS)
    test_lr_dir.mkdir(parents=True, exist_ok=True)
    scale = 4
    lr_paths = []
    for path in test_paths:
        hr = load_rgb(path)
        m = 2 * scale
        hr = hr[:, : hr.shape[1] - hr.shape[1] % m, : hr.shape[2] - hr.shape[2] % m]
        save_rgb(hr, path)  # an even LR, so that the NLL column is filled
        lr_path = test_lr_dir / path.name
        save_rgb(make_lr(hr[None], scale)[0], lr_path)
        lr_paths.append(lr_path)

    run_dir = Path(config.out)
    seed = config.seed
    say(
        f"srflow demo: 1. pretraining the RRDB of {config.preset} alone (L1, the official RRDB recipe) on "
        f"{len(TRAIN_PHOTOS)} bundled photos for up to {rrdb_config.steps} steps or {rrdb_config.max_minutes:g} min "
        f"on {dev} ({torch.get_num_threads()} CPU thread(s))"
    )
    rrdb_result = train(rrdb_config, log=say)
    say(
        f"srflow demo: 2. training SRFlow {config.preset} from that RRDB for up to {config.steps} steps or "
        f"{config.max_minutes:g} min, memory saving on, backend auto"
    )
    result = train(config, log=say)

    model = SRFlow.from_preset(config.preset, seed=0)
    model.load_state_dict(_weights(result))
    model = model.to(dev).train()
    batch = HRImageDataset(train_dir, scale, crop=config.crop, seed=seed, cache=True)
    pairs = [batch[i % len(batch)] for i in range(config.batch)]
    hr_b = torch.stack([p[0] for p in pairs]).to(dev)
    lr_b = torch.stack([p[1] for p in pairs]).to(dev)
    model.set_rrdb_trainable(False)  # measure the flow alone (a frozen RRDB keeps nothing)
    tiny = _activation_report(model, hr_b, lr_b)
    say(
        f"memory saving: for backward the flow keeps {tiny[0] / 2**20:.2f} MiB of activations on one training batch "
        f"({config.batch} x {config.crop}x{config.crop}) vs {tiny[1] / 2**20:.2f} MiB with plain PyTorch autograd "
        f"({tiny[1] / max(tiny[0], 1):.1f}x less)"
    )
    if dev.type == "cpu" and config.preset != "df2k-4x":
        official = SRFlow.from_preset("df2k-4x", seed=0).to(dev).train()
        off = _activation_report(official, hr_b[:1], lr_b[:1])
        say(
            f"  official df2k-4x flow (K=16, 54 steps) on one {config.crop}x{config.crop} crop: "
            f"{off[0] / 2**20:.2f} MiB vs {off[1] / 2**20:.2f} MiB ({off[1] / max(off[0], 1):.1f}x less)"
        )
        del official

    model.eval()
    rrdb = load_rrdb(Path(rrdb_config.out), device=dev)
    samples = sample_images(model, lr_paths, out / "samples", TEMPERATURES, n=1, seed=seed, rrdb=rrdb)
    metrics = evaluate(
        model,
        test_dir,
        lr_data=test_lr_dir,
        out=out / "metrics",
        n=5,
        temperature=0.9,
        seed=seed,
        bicubic_baseline=True,
        rrdb=rrdb,
    )
    say(
        "metrics on the held-out photo (SRFlow: means of 5 samples at t=0.9), beside two baselines: bicubic "
        f"upscaling and the pretrained RRDB's own SR. {config.preset} models trained for minutes are no match for "
        "bicubic in PSNR yet; the rows show the pipeline, and the numbers improve with longer training and the "
        "official presets:"
    )
    say(format_table(metrics.rows, metrics.columns))
    elapsed = time.perf_counter() - t0
    say(f"srflow demo finished in {elapsed / 60:.1f} min. Wrote:")
    say(f"  RRDB checkpoint:   {rrdb_result.checkpoint.weights if rrdb_result.checkpoint else 'none'}")
    say(f"  checkpoint:        {result.checkpoint.weights if result.checkpoint else 'none'}")
    say(f"  training log:      {run_dir / 'train_log.jsonl'}")
    say(f"  validation grid:   {sorted((run_dir / 'val').glob('*.png'))[-1]}")
    say(f"  samples:           {out / 'samples'} ({', '.join(p.name for p in samples)})")
    say(f"  metrics:           {metrics.csv_path}")
    say(f"  photos:            {out / 'photos'}")
    return DemoResult(out, rrdb_result, result, metrics, samples, tiny, elapsed)


def _weights(result: TrainResult) -> dict[str, torch.Tensor]:
    from .training_checkpoint import read_weights  # noqa: PLC0415

    if result.checkpoint is None:
        print("srflow demo: training wrote no checkpoint", file=sys.stderr)
        raise RuntimeError("the demo's training run wrote no checkpoint")
    return read_weights(result.checkpoint.weights)[0]
