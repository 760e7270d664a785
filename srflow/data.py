"""Training and evaluation data: a folder of HR images, LR made on the fly (or read from a
paired folder), random crops and flips that are a pure function of (seed, epoch, index), so
a resumed or distributed run sees exactly the batches it would have seen.

Images are read with Pillow. Grayscale, palette and RGBA/LA images are converted to RGB (alpha
dropped) with a warning; unreadable files and images smaller than the crop raise a ValueError
naming the file, all problems at once, before training starts.
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
    "list_images",
    "load_rgb",
    "save_rgb",
    "quantize",
    "make_lr",
    "HRImageDataset",
    "write_bundled_photos",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
BUNDLED_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def list_images(root: str | Path) -> list[Path]:
    """The PNG/JPEG files directly in ``root``, sorted; clear errors if missing or empty."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"data folder {str(root)!r} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    return files


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot read the image ({exc})") from exc
    if img.mode != "RGB":
        warnings.warn(f"{path}: {img.mode} image converted to RGB", stacklevel=3)
        img = img.convert("RGB")
    return img


def load_rgb(path: str | Path) -> Tensor:
    """(3, H, W) float32 in [0, 1] from an image file (converted to RGB if needed)."""
    arr = np.asarray(_open(Path(path)), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


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


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{path}: cannot read the image ({exc})") from exc


class HRImageDataset(torch.utils.data.Dataset):
    """Random ``crop`` x ``crop`` HR crops with their LR, from a folder of HR images.

    Args:
        root: folder of HR PNG/JPEG images.
        scale: SR factor; the crop must be divisible by it.
        crop: HR crop size (160 in the official configs); None takes whole images, cropped to a
            multiple of ``multiple`` (for validation).
        lr_root: optional folder of LR images with the same file names (size HR / scale);
            otherwise LR = MATLAB bicubic of the HR crop, quantised to 8 bits.
        flips: random horizontal flips.
        seed: base seed; item i of epoch e uses its own generator seeded from (seed, e, i).
        multiple: whole images (crop=None) are cropped to a multiple of this (e.g. scale * 2^L).
    Items: (hr (3, crop, crop), lr (3, crop/scale, crop/scale)) float32 in [0, 1].
    """

    def __init__(
        self,
        root: str | Path,
        scale: int,
        crop: int | None = 160,
        lr_root: str | Path | None = None,
        flips: bool = True,
        seed: int = 0,
        multiple: int = 1,
    ) -> None:
        if crop is not None and crop % scale:
            raise ValueError(f"crop: {crop} is not divisible by the scale {scale}")
        self.files = list_images(root)
        self.scale, self.crop, self.flips, self.seed, self.multiple = scale, crop, flips, seed, multiple
        self.lr_root = Path(lr_root) if lr_root is not None else None
        self.epoch = 0
        self._check()

    def _check(self) -> None:
        problems = []
        for path in self.files:
            try:
                h, w = _image_size(path)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            need = self.crop if self.crop is not None else self.multiple
            if h < need or w < need:
                problems.append(f"{path}: {h}x{w} is smaller than the {need}x{need} crop")
            if self.lr_root is not None:
                lr_path = self.lr_root / path.name
                if not lr_path.is_file():
                    problems.append(f"{path}: no LR image {lr_path}")
                    continue
                lh, lw = _image_size(lr_path)
                if (lh * self.scale, lw * self.scale) != (h, w):
                    problems.append(f"{lr_path}: {lh}x{lw} is not {path.name}'s {h}x{w} divided by {self.scale}")
        if problems:
            listing = "\n  ".join(problems)
            raise ValueError(f"{len(problems)} problem(s) with the training images:\n  {listing}")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips are drawn (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def _generator(self, index: int) -> torch.Generator:
        key = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + index
        return torch.Generator().manual_seed(key % (2**63))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path = self.files[index]
        hr = load_rgb(path)
        lr_full = load_rgb(self.lr_root / path.name) if self.lr_root is not None else None
        gen = self._generator(index)
        h, w = hr.shape[1:]
        if self.crop is None:
            ch, cw = h - h % self.multiple, w - w % self.multiple
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


def write_bundled_photos(folder: str | Path) -> list[Path]:
    """Write the photos that ship with scikit-image (no download) as PNGs into ``folder``."""
    import skimage.data  # noqa: PLC0415 (only needed here)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in BUNDLED_PHOTOS:
        path = folder / f"{name}.png"
        if not path.exists():
            Image.fromarray(np.ascontiguousarray(getattr(skimage.data, name)())).save(path)
        paths.append(path)
    return paths
