"""Training and evaluation data: a folder of HR images, LR made on the fly (or read from a
paired folder), random crops and flips that are a pure function of (seed, epoch, index), so
a resumed or distributed run sees exactly the batches it would have seen.

Images are read with Pillow. Grayscale, palette and RGBA/LA images are converted to RGB (alpha
dropped) with one warning listing them, and files of other kinds in a folder are skipped with one
warning naming them; unreadable or truncated files and images smaller than the crop raise a
ValueError naming the files, all problems at once on one line, before training starts.

Virtual epochs: a small folder is repeated (``repeat``) so that an epoch holds at least one
global batch; item ``i`` reads file ``i % len(files)`` with its own crop, so repeats differ.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from .imresize import imresize

__all__ = [
    "IMAGE_SUFFIXES",
    "check_image_file",
    "list_images",
    "probe_image",
    "load_rgb",
    "save_rgb",
    "quantize",
    "make_lr",
    "HRImageDataset",
    "write_bundled_photos",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_KINDS = "/".join(IMAGE_SUFFIXES)
BUNDLED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def list_images(root: str | Path) -> list[Path]:
    """The PNG/JPEG files directly in ``root``, sorted; clear errors if missing, a file or empty.
    Other files are skipped with one warning naming a few of them (hidden files silently)."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ValueError(f"data folder {str(root)!r} is a file; expected a folder of {_KINDS} images")
    entries = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
    files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not files:
        others = f" (only {len(skipped)} other file(s): {_few(skipped)})" if skipped else ""
        raise ValueError(f"data folder {str(root)!r} holds no {_KINDS} images{others}")
    if skipped:
        warnings.warn(
            f"data folder {str(root)!r}: skipped {len(skipped)} file(s) that are not {_KINDS} images: {_few(skipped)}",
            stacklevel=2,
        )
    return files


def _few(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_image_file(path: str | Path, name: str = "image") -> Path:
    """``path`` as a Path if it is a readable PNG/JPEG file (header and, for PNG, every chunk's
    CRC checked without decoding the pixels); otherwise FileNotFoundError or ValueError naming
    ``name``, what was expected and what is there. For callers that check inputs before writing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; expected a {_KINDS} image file")
    if not path.is_file():
        raise FileNotFoundError(f"{name}: {str(path)!r} does not exist")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"{name}: {str(path)!r} is not a {_KINDS} image")
    probe_image(path)
    return path


def _open(path: Path, warn: bool = True) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the image ({exc})") from exc
    if img.mode != "RGB":
        if warn:
            warnings.warn(f"{path}: {img.mode} image converted to RGB", stacklevel=3)
        img = img.convert("RGB")
    return img


def _load_uint8(path: Path, warn: bool = True) -> Tensor:
    return torch.from_numpy(np.array(_open(path, warn), dtype=np.uint8)).permute(2, 0, 1)


def load_rgb(path: str | Path, warn: bool = True) -> Tensor:
    """(3, H, W) float32 in [0, 1] from an image file (converted to RGB, with a warning unless
    ``warn=False``, if it is grayscale, palette or has alpha). ValueError names unreadable files."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {str(path)!r} is a folder; expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    return _load_uint8(path, warn).float() / 255.0


def save_rgb(img: Tensor, path: str | Path) -> None:
    """Write (3, H, W) in [0, 1] as an 8-bit PNG (clamped, rounded)."""
    arr = (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def quantize(img: Tensor) -> Tensor:
    """Round to 8-bit levels, as an image saved to PNG and read back would be."""
    return (img.clamp(0, 1) * 255.0).round() / 255.0


def make_lr(hr: Tensor, scale: int) -> Tensor:
    """LR by MATLAB-style antialiased bicubic downscaling, quantised to 8 bits (SRFlow's data)."""
    return quantize(imresize(hr, 1.0 / scale))


def probe_image(path: Path) -> tuple[int, int, str]:
    """(height, width, mode) from the header, after ``Image.verify`` (PNG: every chunk's CRC, so a
    truncated or corrupted file is caught here without decoding the pixels)."""
    try:
        with Image.open(path) as img:
            size, mode = img.size, img.mode
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the image ({exc})") from exc
    return size[1], size[0], mode


class HRImageDataset(torch.utils.data.Dataset):
    """Random ``crop`` x ``crop`` HR crops with their LR, from a folder of HR images.

    Args:
        root: folder of HR PNG/JPEG images.
        scale: SR factor; the crop must be divisible by it.
        crop: HR crop size (160 in the official configs); None takes whole images, cropped to a
            multiple of ``multiple`` (for validation and evaluation).
        lr_root: optional folder of LR images with the same file names (size HR / scale);
            otherwise LR = MATLAB bicubic of the HR crop, quantised to 8 bits.
        flips: random horizontal flips.
        seed: base seed; item i of epoch e uses its own generator seeded from (seed, e, i).
        multiple: whole images (crop=None: the top-left part, MATLAB's modcrop) and centre crops
            are cropped to a multiple of this (default: the scale; 2 * scale gives an LR with even
            sides, as encoding needs).
        center: deterministic centre crops of at most ``crop`` per side (for validation); images
            smaller than ``crop`` are used whole (cropped to ``multiple``).
        repeat: the epoch visits every file ``repeat`` times (each visit with its own crop).
        cache: keep the decoded images in memory (in this process) after their first use.
        max_images: use only the first ``max_images`` files (sorted by name).
    Items: (hr (3, crop, crop), lr (3, crop/scale, crop/scale)) float32 in [0, 1].
    Raises FileNotFoundError for a missing folder, ValueError (one line naming every bad file)
    for an empty folder, unreadable/truncated images, images smaller than the crop, or LR
    images that are missing or not HR / scale.
    """

    def __init__(
        self,
        root: str | Path,
        scale: int,
        crop: int | None = 160,
        lr_root: str | Path | None = None,
        flips: bool = True,
        seed: int = 0,
        multiple: int | None = None,
        *,
        center: bool = False,
        repeat: int = 1,
        cache: bool = False,
        max_images: int | None = None,
    ) -> None:
        if crop is not None and crop % scale:
            raise ValueError(f"crop: {crop} is not divisible by the scale {scale}")
        multiple = scale if multiple is None else multiple
        if multiple < 1 or multiple % scale:
            raise ValueError(f"multiple: {multiple} is not divisible by the scale {scale}")
        if repeat < 1:
            raise ValueError(f"repeat: expected a positive integer, got {repeat}")
        self.files = list_images(root)
        if max_images is not None:
            self.files = self.files[:max_images]
        self.scale, self.crop, self.flips, self.seed, self.multiple = scale, crop, flips, seed, multiple
        self.center, self.repeat, self.cache = center, repeat, cache
        self.lr_root = Path(lr_root) if lr_root is not None else None
        if self.lr_root is not None and not self.lr_root.is_dir():
            raise FileNotFoundError(f"LR folder {str(self.lr_root)!r} does not exist or is not a folder")
        self.epoch = 0
        self._images: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._check()

    def _check(self) -> None:
        problems, converted = [], []
        for path in self.files:
            try:
                h, w, mode = probe_image(path)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if mode != "RGB":
                converted.append(f"{path.name} ({mode})")
            need = self.multiple if self.crop is None or self.center else self.crop
            if h < need or w < need:
                problems.append(f"{path}: {h}x{w} is smaller than the {need}x{need} crop")
            if self.lr_root is not None:
                lr_path = self.lr_root / path.name
                if not lr_path.is_file():
                    problems.append(f"{path}: no LR image {lr_path}")
                    continue
                try:
                    lh, lw, lr_mode = probe_image(lr_path)
                except ValueError as exc:
                    problems.append(str(exc))
                    continue
                if lr_mode != "RGB":
                    converted.append(f"{lr_path.name} ({lr_mode}, LR)")
                if (lh * self.scale, lw * self.scale) != (h, w):
                    problems.append(f"{lr_path}: {lh}x{lw} is not {path.name}'s {h}x{w} divided by {self.scale}")
        if problems:
            raise ValueError(
                f"{len(problems)} problem(s) with the images in {str(self.files[0].parent)!r}: " + "; ".join(problems)
            )
        if converted:
            warnings.warn(
                f"{len(converted)} image(s) are not RGB and are converted to RGB (alpha dropped): "
                + ", ".join(converted),
                stacklevel=3,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips are drawn (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files) * self.repeat

    def _generator(self, index: int) -> torch.Generator:
        key = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + index
        return torch.Generator().manual_seed(key % (2**63))

    def _load(self, file_index: int) -> tuple[Tensor, Tensor | None]:
        """(HR, LR or None) as float32 in [0, 1] (the non-RGB warning was given by the check)."""
        if file_index in self._images:
            hr8, lr8 = self._images[file_index]
        else:
            path = self.files[file_index]
            hr8 = _load_uint8(path, warn=False)
            lr8 = _load_uint8(self.lr_root / path.name, warn=False) if self.lr_root is not None else None
            if self.cache:
                self._images[file_index] = (hr8, lr8)
        return hr8.float() / 255.0, (lr8.float() / 255.0 if lr8 is not None else None)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        hr, lr_full = self._load(index % len(self.files))
        gen = self._generator(index)
        h, w = hr.shape[1:]
        if self.crop is None or self.center:
            m = self.multiple
            ch, cw = h - h % m, w - w % m
            if self.crop is not None:
                ch, cw = min(ch, self.crop - self.crop % m), min(cw, self.crop - self.crop % m)
            s = self.scale
            if self.center:
                top, left = ((h - ch) // 2) // s * s, ((w - cw) // 2) // s * s
            else:  # MATLAB modcrop: keep the top-left part
                top = left = 0
        else:
            ch = cw = self.crop
            s = self.scale
            top = int(torch.randint((h - ch) // s + 1, (1,), generator=gen)) * s
            left = int(torch.randint((w - cw) // s + 1, (1,), generator=gen)) * s
        hr = hr[:, top : top + ch, left : left + cw]
        if lr_full is not None:
            s = self.scale
            lr = lr_full[:, top // s : (top + ch) // s, left // s : (left + cw) // s]
        else:
            lr = make_lr(hr[None], self.scale)[0]
        if self.flips and bool(torch.rand((), generator=gen) < 0.5):
            hr, lr = hr.flip(-1), lr.flip(-1)
        return hr.contiguous(), lr.contiguous()


def write_bundled_photos(folder: str | Path, names: tuple[str, ...] = BUNDLED_PHOTOS) -> list[Path]:
    """Write photos that ship with scikit-image (no download) as PNGs into ``folder``; existing
    files are kept. ``names``: functions of ``skimage.data`` returning RGB photos."""
    import skimage.data  # noqa: PLC0415 (only needed here)

    unknown = [n for n in names if n not in BUNDLED_PHOTOS]
    if unknown:
        raise ValueError(f"names: {unknown} are not among the bundled photos {BUNDLED_PHOTOS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(np.ascontiguousarray(getattr(skimage.data, name)())).save(path)
        paths.append(path)
    return paths
