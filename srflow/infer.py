"""Using a trained SRFlow (and the RRDB it started from): loading, sampling, content transfer and
evaluation with SRFlow's test protocol (behind ``srflow sample``, ``srflow transfer`` and ``srflow
eval``), and the validation of both training stages.

Images are files (PNG/JPEG, converted to RGB) or (3, H, W) float32 tensors in [0, 1]. Sampling
works for any LR size: :meth:`SRFlow.condition` reflect-pads an odd LR side to even and the SR is
cropped back to ``scale * (h, w)``, as the official test script does. Encoding (transfer, NLL)
needs an HR whose sides are multiples of ``2 * scale`` (an even LR); :func:`evaluate` leaves the
NLL out for odd LRs rather than drop image borders.

Randomness: sample ``k`` of an image (at every temperature) uses the seed ``seed + k``, so runs
with the same seed reproduce on the same device, and the temperatures of one ``k`` share one
direction in latent space.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import flowkernels as fk

from . import metrics
from .config import MAX_SEED, check_output_folder, resolve_device
from .data import HRImageDataset, check_image_file, list_images, load_rgb, make_lr, save_rgb
from .imresize import imresize_uint8
from .model import NonFiniteSampleWarning, SRFlow
from .official_checkpoint import CheckpointError, check_state_dict
from .presets import PRESETS, get_preset
from .rrdb import RRDBNet
from .training_checkpoint import read_rrdb_weights, read_weights, resolve_checkpoint

__all__ = [
    "default_device",
    "expand_images",
    "load_model",
    "load_rrdb",
    "rrdb_sr",
    "rrdb_validation_grid",
    "make_grid",
    "nearest_upscale",
    "sample_images",
    "transfer",
    "evaluate",
    "EvalResult",
    "format_table",
    "validation_grid",
]


def default_device() -> torch.device:
    """CUDA if available, else the CPU."""
    return resolve_device(None)


def load_model(
    checkpoint: str | os.PathLike | None = None,
    official: str | os.PathLike | None = None,
    preset: str | None = None,
    device: str | torch.device | None = None,
    backend: str | None = "auto",
) -> SRFlow:
    """An SRFlow in eval mode from a training checkpoint or an official ``.pth`` (exactly one).

    ``checkpoint``: a training checkpoint's ``.safetensors`` or ``.state.pt`` file, or a run
    folder (its newest checkpoint); its preset comes from the safetensors metadata, and
    ``preset``, if given, must agree. ``official``: an official SRFlow state_dict (``.pth`` or
    ``.safetensors``), loaded strictly into ``preset`` (required). Raises CheckpointError naming
    the file on any mismatch. The device and the backend are checked before anything is read.
    """
    dev = resolve_device(device)
    fk.check_backend_available(backend, dev)
    if (checkpoint is None) == (official is None):
        raise ValueError(
            "pass exactly one of checkpoint (a training checkpoint) and official (an official .pth), "
            f"got checkpoint={checkpoint!r}, official={official!r}"
        )
    if preset is not None:
        get_preset(preset)
    if official is not None:
        if preset is None:
            raise ValueError(f"official: an official checkpoint needs a preset (one of {', '.join(PRESETS)}), got None")
        model = SRFlow.from_official(official, preset, backend=backend)
    else:
        files = resolve_checkpoint(checkpoint)
        weights, metadata = read_weights(files.weights)
        stored = metadata.get("preset")
        if stored is None and preset is None:
            raise CheckpointError(
                f"checkpoint {str(files.weights)!r} has no preset in its metadata; name the preset it was trained with"
            )
        if stored is not None and preset is not None and stored != preset:
            raise CheckpointError(
                f"checkpoint {str(files.weights)!r} was trained with preset {stored!r}, not {preset!r}"
            )
        name = stored or preset
        if name not in PRESETS:
            raise CheckpointError(f"checkpoint {str(files.weights)!r}: unknown preset {name!r} in its metadata")
        model = SRFlow.from_preset(name, backend=backend, seed=0)
        check_state_dict(model, weights, f"checkpoint {str(files.weights)!r}", name)
        model.load_state_dict(weights, strict=True)
    return model.to(dev).eval()


def load_rrdb(path: str | os.PathLike, preset: str | None = None, device: str | torch.device | None = None) -> RRDBNet:
    """An RRDB (ESRGAN's RRDBNet with its image head) in eval mode, for its own SR (:func:`rrdb_sr`):
    from a run folder or checkpoint of ``srflow train-rrdb`` (its preset from the metadata;
    ``preset``, if given, must agree) or a state_dict file such as the official ``RRDB_DF2K_4X.pth``
    (``preset`` required). CheckpointError names the file on any mismatch."""
    dev = resolve_device(device)
    if preset is not None:
        get_preset(preset)
    state, stored = read_rrdb_weights(path)
    if stored is not None and preset is not None and stored != preset:
        raise CheckpointError(f"RRDB weights {str(path)!r} are of preset {stored!r}, not {preset!r}")
    name = stored or preset
    if name is None:
        raise CheckpointError(f"RRDB weights {str(path)!r} name no preset; pass the preset they were trained with")
    p = get_preset(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rrdb = RRDBNet(p.nf, p.gc, p.nb, p.scale, p.block_idxs)
    check_state_dict(rrdb, state, f"RRDB weights {str(path)!r}", name)
    rrdb.load_state_dict(state, strict=True)
    return rrdb.to(dev).eval()


def nearest_upscale(lr: Tensor, scale: int) -> Tensor:
    """(3, h, w) -> (3, scale*h, scale*w) by pixel repetition (for side-by-side grids)."""
    return lr.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def make_grid(rows: Sequence[Sequence[Tensor]], pad: int = 4, fill: float = 1.0) -> Tensor:
    """Tile (3, H, W) images into one (3, H', W') image: one row per entry of ``rows``, left to
    right, ``pad`` pixels of ``fill`` between and around them (images keep their own sizes)."""
    if not rows or not all(rows):
        raise ValueError("make_grid: expected at least one non-empty row")
    heights = [max(img.shape[1] for img in row) for row in rows]
    widths = [sum(img.shape[2] for img in row) + pad * (len(row) + 1) for row in rows]
    grid = torch.full((3, sum(heights) + pad * (len(rows) + 1), max(widths)), fill)
    y = pad
    for row, h in zip(rows, heights):
        x = pad
        for img in row:
            img = torch.nan_to_num(img.detach().float().cpu(), nan=0.0).clamp(0, 1)
            grid[:, y : y + img.shape[1], x : x + img.shape[2]] = img
            x += img.shape[2] + pad
        y += h + pad
    return grid


def expand_images(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The image files that ``paths`` name (files, and the PNG/JPEG files of folders), each checked
    to be readable; FileNotFoundError or ValueError naming the path otherwise."""
    files: list[Path] = []
    for p in map(Path, paths):
        files.extend(map(check_image_file, list_images(p)) if p.is_dir() else [check_image_file(p)])
    if not files:
        raise ValueError("no input images given")
    return files


def _check_sampling(model: SRFlow, temperatures: Sequence[float], n: int, seed: int, min_scale: float | None) -> None:
    """The sampling arguments, all checked before anything is written (SRFlow.sample would refuse a
    bad temperature only when it comes to it, after the files of the earlier ones)."""
    if n < 1:
        raise ValueError(f"n: expected a positive number of samples, got {n}")
    if not 0 <= seed <= MAX_SEED - n:
        raise ValueError(f"seed: expected an integer in [0, 2**63 - n] (sample k uses seed + k), got {seed}")
    bad = [t for t in temperatures if not 0 <= t < math.inf]
    if bad:
        raise ValueError(f"temperature: expected finite values >= 0, got {', '.join(map(str, bad))}")
    _check_min_scale(model, min_scale)


def _check_min_scale(model: SRFlow, min_scale: float | None) -> None:
    if min_scale is not None:
        fk.validate_scale_floor(min_scale, model.flowUpsamplerNet.couplings()[0].eps)


def _clean(sr: Tensor) -> Tensor:
    """NaN pixels (see NonFiniteSampleWarning) become black, values are clamped to [0, 1]."""
    return torch.nan_to_num(sr, nan=0.0).clamp(0, 1)


@torch.no_grad()
def sample_images(
    model: SRFlow | None,
    lr_images: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    temperatures: Sequence[float] = (0.9,),
    n: int = 5,
    seed: int = 0,
    min_scale: float | None = None,
    rrdb: RRDBNet | None = None,
) -> list[Path]:
    """Super-resolve LR images (files or folders of them), ``n`` samples per temperature.

    Writes ``<stem>_t<T>_<k>.png`` for each sample and ``<stem>_grid.png`` (the LR upscaled by
    pixel repetition, then the samples: temperatures in order, k = 0..n-1 within each). Temperature
    0 is deterministic (every seed gives the same image), so it gets one sample, ``k = 0``, with a
    warning when ``n`` > 1. With ``rrdb``, also the RRDB's own SR (``<stem>_rrdb.png``, in the
    grid after the LR); ``model`` may then be None (the RRDB's SR alone). Every argument is
    checked, and every image's header (PNG: every chunk's CRC), before anything is written.
    Returns the paths written (grids last for each image).
    """
    if model is None and rrdb is None:
        raise ValueError("pass an SRFlow model, an RRDB (rrdb=), or both")
    if model is not None and rrdb is not None and rrdb.scale != model.scale:
        raise ValueError(f"rrdb: an RRDB of scale {rrdb.scale} next to a {model.scale}x SRFlow")
    if model is not None:
        _check_sampling(model, temperatures, n, seed, min_scale)
    check_output_folder(out)
    files = expand_images(lr_images)
    if model is not None and n > 1 and 0 in temperatures:
        warnings.warn(
            f"temperature 0 is deterministic: writing one sample per image for it, not {n} identical ones",
            stacklevel=2,
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = next((model or rrdb).parameters()).device
    scale = (model or rrdb).scale
    written: list[Path] = []
    stems: dict[str, int] = {}
    for path in files:
        stem = path.stem
        stems[stem] = stems.get(stem, 0) + 1
        if stems[stem] > 1:
            stem = f"{stem}-{stems[stem]}"
        lr = load_rgb(path).to(device)
        row = [nearest_upscale(lr, scale).cpu()]
        if rrdb is not None:
            sr = rrdb_sr(rrdb, lr[None])[0]
            target = out / f"{stem}_rrdb.png"
            save_rgb(sr, target)
            written.append(target)
            row.append(sr.cpu())
        cond = model.condition(lr[None]) if model is not None else None
        for t in temperatures if model is not None else ():
            for k in range(1 if t == 0 else n):
                sr = _clean(model.sample(cond=cond, temperature=t, seed=seed + k, min_scale=min_scale))[0]
                target = out / f"{stem}_t{float(t):.2f}_{k}.png"
                save_rgb(sr, target)
                written.append(target)
                row.append(sr.cpu())
        grid = out / f"{stem}_grid.png"
        save_rgb(make_grid([row]), grid)
        written.append(grid)
    return written


def _require_encodable(name: str, hr: Tensor, scale: int) -> None:
    m = 2 * scale
    h, w = hr.shape[-2:]
    if h % m or w % m:
        raise ValueError(
            f"{name}: {h}x{w} cannot be encoded; HR sides must be multiples of {m} (2 x scale {scale}, "
            f"so that the LR has even sides); crop it to {h - h % m}x{w - w % m}"
        )


@torch.no_grad()
def transfer(
    model: SRFlow,
    hr_image: str | os.PathLike,
    out: str | os.PathLike,
    target_lr: str | os.PathLike | None = None,
    hr_lr: str | os.PathLike | None = None,
    min_scale: float | None = None,
) -> list[Path]:
    """Content transfer / LR-consistent editing (SRFlow paper, section on image manipulation).

    Encodes ``hr_image`` (a reference, or an edited HR) with its LR (``hr_lr``, or its own MATLAB
    bicubic downscale) into latents, then decodes those latents with ``target_lr`` (default: the
    same LR, i.e. an LR-consistent version of an edited image). The target LR must have the
    HR's size / scale, since the latents are spatial. Writes ``<hr>_to_<lr>.png`` and a grid
    [HR | target LR upscaled | result]; prints nothing. Everything is checked before anything is
    written. Returns the written paths.
    """
    _check_min_scale(model, min_scale)
    check_output_folder(out)
    device = next(model.parameters()).device
    s = model.scale
    hr = load_rgb(hr_image)
    _require_encodable(f"HR image {str(hr_image)!r}", hr, s)
    expected = (hr.shape[1] // s, hr.shape[2] // s)
    if hr_lr is not None:
        source_lr = load_rgb(hr_lr)
        if tuple(source_lr.shape[1:]) != expected:
            raise ValueError(
                f"LR of the HR image {str(hr_lr)!r}: {source_lr.shape[1]}x{source_lr.shape[2]}, expected "
                f"{expected[0]}x{expected[1]} (HR {hr.shape[1]}x{hr.shape[2]} / scale {s})"
            )
    else:
        source_lr = make_lr(hr[None], s)[0]
    lr = load_rgb(target_lr) if target_lr is not None else source_lr
    if tuple(lr.shape[1:]) != expected:
        raise ValueError(
            f"target LR {str(target_lr)!r} is {lr.shape[1]}x{lr.shape[2]}, but the latents of "
            f"{str(hr_image)!r} (HR {hr.shape[1]}x{hr.shape[2]}) decode only with an LR of "
            f"{expected[0]}x{expected[1]} (HR / scale {s}); resize or crop the images to match"
        )
    zs = model.encode(hr[None].to(device), source_lr[None].to(device))
    result = _clean(model.decode(lr[None].to(device), zs, min_scale=min_scale))[0].cpu()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(hr_image).stem + ("_to_" + Path(target_lr).stem if target_lr is not None else "_lr_consistent")
    target = out / f"{name}.png"
    save_rgb(result, target)
    grid = out / f"{name}_grid.png"
    save_rgb(make_grid([[hr, nearest_upscale(lr, s), result]]), grid)
    return [target, grid]


@dataclass
class EvalResult:
    """Per-image rows and their mean (column name -> value), and where the CSV went."""

    rows: list[dict[str, object]]
    mean: dict[str, float]
    csv_path: Path | None
    columns: list[str] = field(default_factory=list)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _baseline_metrics(sr8: np.ndarray, hr8: np.ndarray, lr8: np.ndarray, scale: int, lpips: object) -> dict:
    """The metrics of one deterministic SR (a baseline row): PSNR, SSIM, LR-PSNR, LPIPS if available."""
    row = {"psnr": metrics.psnr(sr8, hr8), "ssim": metrics.ssim(sr8, hr8), "lr_psnr": metrics.lr_psnr(sr8, lr8, scale)}
    if lpips is not None:
        row["lpips"] = metrics.lpips_distance(lpips, sr8, hr8)
    return row


@torch.no_grad()
def rrdb_sr(rrdb: RRDBNet, lr: Tensor) -> Tensor:
    """The RRDB's own super-resolution (ESRGAN's image head; the regression baseline of the paper):
    (B, 3, h, w) in [0, 1] -> (B, 3, scale*h, scale*w), clamped to [0, 1]. Any LR size."""
    return rrdb(lr).clamp(0, 1)


@torch.no_grad()
def evaluate(
    model: SRFlow,
    data: str | os.PathLike,
    lr_data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    n: int = 5,
    temperature: float = 0.9,
    seed: int = 0,
    dequantize: bool = False,
    max_images: int | None = None,
    min_scale: float | None = None,
    crop: int | None = None,
    bicubic_baseline: bool = False,
    rrdb: RRDBNet | None = None,
) -> EvalResult:
    """SRFlow's test protocol (its ``test.py`` and ``Measure.py``): per image, PSNR, SSIM, LR-PSNR and
    LPIPS (where its weights are on disk) of ``n`` samples at ``temperature`` (official: one at 0.9;
    the rows hold the means), plus PSNR at temperature 0, diversity over the ``n`` samples and NLL
    (bits per HR pixel; with ``dequantize`` the +5 bits/px of the noise are included).

    The protocol: the LR is ``lr_data``'s image of the same name (the dataset's LR files, as the
    official test reads them) or else the official uint8 imresize of the HR; whole images, no border
    dropped (the HR is cut only to a multiple of the scale when its LR is made here); an odd LR is
    reflect-padded to even and the SR cropped back (:meth:`SRFlow.condition`); the SR is clamped and
    converted to uint8 by truncation, and every metric is taken on uint8 RGB: PSNR and SSIM against
    the HR (scikit-image, no border crop), LPIPS on the uint8 images, LR-PSNR between the LR and the
    uint8 imresize of the SR. The NLL needs an even LR: it is "-" for odd ones. ``crop``: centre
    crops of at most this size instead (a multiple of 2 * scale).

    Writes ``<out>/metrics.csv`` when ``out`` is given. Baseline rows after the mean:
    ``bicubic_baseline`` (MATLAB bicubic upscaling of the uint8 LR) and ``rrdb`` (the RRDB's own SR,
    :func:`rrdb_sr`; e.g. the pretrained RRDB the SRFlow started from). The arguments are checked
    before the first image.
    """
    _check_sampling(model, (temperature,), n, seed, min_scale)
    s = model.scale
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images: expected a positive number of images or None, got {max_images}")
    if crop is not None and (crop < 1 or crop % (2 * s)):
        raise ValueError(
            f"crop: expected a positive multiple of {2 * s} (2 x scale {s}: the LR must have even sides), got {crop}"
        )
    if rrdb is not None and rrdb.scale != s:
        raise ValueError(f"rrdb: an RRDB of scale {rrdb.scale} cannot be the baseline of a {s}x SRFlow")
    if out is not None:
        check_output_folder(out)
    dataset = HRImageDataset(
        data, s, crop=crop, lr_root=lr_data, flips=False, center=crop is not None, max_images=max_images
    )
    device = next(model.parameters()).device
    lpips = metrics.lpips_model()
    if lpips is not None:
        lpips = lpips.to(device).eval()
    rows: list[dict[str, object]] = []
    baselines: dict[str, list[dict[str, float]]] = {}
    nonfinite = 0
    for i in range(len(dataset)):
        hr, lr = dataset[i]
        hr_d, lr_d = hr[None].to(device), lr[None].to(device)
        cond = model.condition(lr_d)
        nll = float("nan")
        if not cond.padded:
            gen = torch.Generator(device=device).manual_seed(seed)
            nll = float(model.nll(hr_d, cond=cond, add_noise=dequantize, generator=gen)[0])
        hr8, lr8 = metrics.to_uint8(hr, rounding=True), metrics.to_uint8(lr, rounding=True)
        samples = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", NonFiniteSampleWarning)
            for k in range(n):
                sr = model.sample(cond=cond, temperature=temperature, seed=seed + k, min_scale=min_scale)
                samples.append(_clean(sr)[0].cpu())
            sr0 = _clean(model.sample(cond=cond, temperature=0.0, min_scale=min_scale))[0].cpu()
        nonfinite += sum(issubclass(w.category, NonFiniteSampleWarning) for w in caught)
        sr8 = [metrics.to_uint8(sr) for sr in samples]
        row: dict[str, object] = {
            "image": dataset.files[i].name,
            "size": f"{hr.shape[1]}x{hr.shape[2]}",
            "nll_bits_px": nll,
            "psnr": _mean([metrics.psnr(x, hr8) for x in sr8]),
            "ssim": _mean([metrics.ssim(x, hr8) for x in sr8]),
            "lr_psnr": _mean([metrics.lr_psnr(x, lr8, s) for x in sr8]),
            "psnr_t0": metrics.psnr(metrics.to_uint8(sr0), hr8),
            "diversity": metrics.diversity(samples) if n > 1 else float("nan"),
        }
        if lpips is not None:
            row["lpips"] = _mean([metrics.lpips_distance(lpips, x, hr8) for x in sr8])
        rows.append(row)
        if bicubic_baseline:
            up8 = imresize_uint8(lr8, float(s))
            baselines.setdefault("bicubic", []).append(_baseline_metrics(up8, hr8, lr8, s, lpips))
        if rrdb is not None:
            up8 = metrics.to_uint8(rrdb_sr(rrdb, lr_d)[0])
            baselines.setdefault("rrdb", []).append(_baseline_metrics(up8, hr8, lr8, s, lpips))
    if nonfinite:
        warnings.warn(
            f"{nonfinite} sample(s) had NaN pixels (counted as black); pass min_scale (e.g. 0.1) or lower the "
            "temperature",
            NonFiniteSampleWarning,
            stacklevel=2,
        )
    columns = list(rows[0].keys())
    numeric = [c for c in columns if c not in ("image", "size")]
    mean = {c: _mean([float(r[c]) for r in rows]) for c in numeric}
    csv_path = None
    all_rows = rows + [{"image": "mean", "size": "", **mean}]
    for name, values in baselines.items():
        all_rows.append({"image": name, "size": "", **{c: _mean([v[c] for v in values]) for c in values[0]}})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        csv_path = out / "metrics.csv"
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, restval="")
            writer.writeheader()
            for r in all_rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return EvalResult(all_rows, mean, csv_path, columns)


@torch.no_grad()
def rrdb_validation_grid(rrdb: RRDBNet, val_set: HRImageDataset) -> tuple[dict[str, float], list[list[Tensor]]]:
    """The RRDB stage's validation: ``val_psnr`` and ``val_lr_psnr`` (means over the images) of the
    RRDB's SR against the HR and the LR, uint8 as in :func:`evaluate`, and grid rows [LR upscaled
    by pixel repetition, HR, RRDB SR] on the CPU. The model runs in eval mode and gets its mode back."""
    was_training = rrdb.training
    rrdb.eval()
    device = next(rrdb.parameters()).device
    psnr, lr_psnr, rows = [], [], []
    try:
        for i in range(len(val_set)):
            hr, lr = val_set[i]
            sr = rrdb_sr(rrdb, lr[None].to(device))[0].cpu()
            sr8, hr8, lr8 = (
                metrics.to_uint8(sr),
                metrics.to_uint8(hr, rounding=True),
                metrics.to_uint8(lr, rounding=True),
            )
            psnr.append(metrics.psnr(sr8, hr8))
            lr_psnr.append(metrics.lr_psnr(sr8, lr8, rrdb.scale))
            rows.append([nearest_upscale(lr, rrdb.scale), hr, sr])
    finally:
        rrdb.train(was_training)
    return {"val_psnr": _finite_mean(psnr), "val_lr_psnr": _finite_mean(lr_psnr)}, rows


@torch.no_grad()
def validation_grid(
    model: SRFlow,
    val_set: HRImageDataset,
    temperatures: Sequence[float],
    seed: int,
    dequantize: bool = True,
) -> tuple[dict[str, float], list[list[Tensor]]]:
    """Validation metrics and a sample grid of ``val_set`` (HR, LR pairs), as training reports them.

    Metrics (means over the images, non-finite values left out): ``val_nll_bits_px`` (NLL with
    dequantisation noise from a generator seeded with ``seed`` when ``dequantize``, as the
    training loss), ``val_psnr_t0`` and ``val_lr_psnr_t0`` (of the temperature-0 sample). Rows,
    one per image, for :func:`make_grid`: [LR upscaled by pixel repetition, HR, a sample at each
    of ``temperatures`` (image ``i`` uses the seed ``i``)], on the CPU. The model runs in eval mode
    and gets its previous mode back.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, psnr0, lrpsnr0, rows = [], [], [], []
    try:
        for i in range(len(val_set)):
            hr, lr = val_set[i]
            hr_d, lr_d = hr[None].to(device), lr[None].to(device)
            cond = model.condition(lr_d)
            gen = torch.Generator(device=device).manual_seed(seed)
            nll.append(float(model.nll(hr_d, cond=cond, add_noise=dequantize, generator=gen)[0]))
            sr0 = _clean(model.sample(cond=cond, temperature=0.0, nonfinite="ignore"))[0].cpu()
            psnr0.append(metrics.psnr(metrics.to_uint8(sr0), metrics.to_uint8(hr, rounding=True)))
            lrpsnr0.append(metrics.lr_psnr(metrics.to_uint8(sr0), metrics.to_uint8(lr, rounding=True), model.scale))
            row = [nearest_upscale(lr, model.scale), hr]
            for t in temperatures:
                row.append(
                    sr0 if t == 0 else model.sample(cond=cond, temperature=t, seed=i, nonfinite="ignore")[0].cpu()
                )
            rows.append(row)
    finally:
        model.train(was_training)
    result = {
        "val_nll_bits_px": _finite_mean(nll),
        "val_psnr_t0": _finite_mean(psnr0),
        "val_lr_psnr_t0": _finite_mean(lrpsnr0),
    }
    return result, rows


def _finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN if none): one diverged image does not hide the others."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def format_table(rows: Sequence[dict[str, object]], columns: Sequence[str]) -> str:
    """A fixed-width text table (floats with 4 significant digits; missing cells blank)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return "inf" if math.isinf(v) else ("-" if math.isnan(v) else f"{v:.4g}")
        return "" if v is None else str(v)

    table = [list(columns)] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[j]) for row in table) for j in range(len(columns))]
    lines = [
        "  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(row, widths))) for row in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
