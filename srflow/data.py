"""Training and evaluation data: a folder of HR images (or an image store made by ``srflow
prepare``, :mod:`srflow.store`), LR made on the fly by the official uint8 pipeline (or read from
a paired folder), random crops and flips that are a pure function of (seed, epoch, index), so
a resumed or distributed run sees exactly the batches it would have seen.

Items stay uint8 until the end: the crop is cut from the uint8 image, its LR is made from the
uint8 crop (:func:`srflow.imresize.imresize_uint8`, bit-exact with the official ``prepare_data``),
flipped, and only then converted to float (a 160x160 crop, not the whole image). Where the
pixels come from, from slowest to fastest: the file, decoded on every visit (the default); an
in-process cache (``cache``: decoded once per process); a store (decoded once, memory-mapped by
every worker and rank); the store's crop bank (the official fixed crops with their LR, no
resizing at all). ``benchmarks/bench_loader.py`` measures them.

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

from .imresize import imresize_uint8

__all__ = [
    "IMAGE_SUFFIXES",
    "check_image_file",
    "list_images",
    "probe_image",
    "load_rgb",
    "save_rgb",
    "to_uint8",
    "from_uint8",
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


def _load_uint8(path: Path, warn: bool = True) -> np.ndarray:
    """(H, W, 3) uint8, as the file holds it."""
    return np.array(_open(path, warn), dtype=np.uint8)


def load_rgb(path: str | Path, warn: bool = True) -> Tensor:
    """(3, H, W) float32 in [0, 1] from an image file (converted to RGB, with a warning unless
    ``warn=False``, if it is grayscale, palette or has alpha). ValueError names unreadable files."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"image {str(path)!r} is a folder; expected an image file")
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    return from_uint8(_load_uint8(path, warn))


def save_rgb(img: Tensor, path: str | Path) -> None:
    """Write (3, H, W) in [0, 1] as an 8-bit PNG (clamped, rounded)."""
    arr = (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)


def to_uint8(img: Tensor, rounding: bool = False) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, clamped, x255, truncated (the official test
    script's conversion of model outputs) or rounded (``rounding=True``, for images that were
    uint8 already, where truncation could turn k/255*255 = k - 1e-6 into k - 1)."""
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"img: expected (3, H, W), got {tuple(img.shape)}")
    arr = img.detach().float().clamp(0, 1) * 255.0
    arr = (arr.round() if rounding else arr).to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def from_uint8(img: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1] (a new, contiguous tensor)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def make_lr(hr: Tensor, scale: int) -> Tensor:
    """LR images as the official SRFlow data: (B, 3, H, W) float in [0, 1] -> (B, 3, ceil(H/scale),
    ceil(W/scale)), by :func:`srflow.imresize.imresize_uint8` of the HR rounded to uint8 (exact
    for images read from PNG/JPEG files), on the CPU."""
    if hr.dim() != 4 or hr.shape[1] != 3:
        raise ValueError(f"hr: expected (B, 3, H, W), got {tuple(hr.shape)}")
    return torch.stack([from_uint8(imresize_uint8(to_uint8(img, rounding=True), 1.0 / scale)) for img in hr])


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
    """Random ``crop`` x ``crop`` HR crops with their LR, from a folder of HR images or an image
    store (:mod:`srflow.store`; its crop bank, if it has one, for random training crops).

    Args:
        root: folder of HR PNG/JPEG images, or a store made by ``srflow prepare``.
        scale: SR factor; the crop must be divisible by it.
        crop: HR crop size (160 in the official configs); None takes whole images, cropped to a
            multiple of ``multiple`` (for validation and evaluation).
        lr_root: optional folder of LR images with the same file names (size HR / scale);
            otherwise LR = the official uint8 imresize of the HR crop (:func:`make_lr`).
        flips: random horizontal flips.
        rotations: random rotations by 0, 90 or 270 degrees (official ``use_rot``; square crops).
        seed: base seed; item i of epoch e uses its own generator seeded from (seed, e, i).
        multiple: whole images (crop=None: the top-left part, MATLAB's modcrop) and centre crops
            are cropped to a multiple of this (default: the scale).
        center: deterministic centre crops of at most ``crop`` per side (for validation); images
            smaller than ``crop`` are used whole (cropped to ``multiple``).
        repeat: the epoch visits every file (or bank crop) ``repeat`` times (each visit with its
            own crop and flip).
        cache: keep the decoded images in memory (in this process) after their first use.
        max_images: use only the first ``max_images`` files (sorted by name).
    Items: (hr (3, crop, crop), lr (3, crop/scale, crop/scale)) float32 in [0, 1].
    Attributes: ``files`` (the image names, as paths), ``store`` (the ImageStore or None),
    ``bank`` (whether items are bank crops), ``base_len`` (distinct items: bank crops or files).
    Raises FileNotFoundError for a missing folder, ValueError (one line naming every bad file)
    for an empty folder, unreadable/truncated images, images smaller than the crop, LR images
    that are missing or not HR / scale, or a crop bank that does not fit ``scale`` and ``crop``.
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
        rotations: bool = False,
        center: bool = False,
        repeat: int = 1,
        cache: bool = False,
        max_images: int | None = None,
    ) -> None:
        from .store import ImageStore, is_store  # noqa: PLC0415 (the store module reads images with this one)

        if crop is not None and crop % scale:
            raise ValueError(f"crop: {crop} is not divisible by the scale {scale}")
        multiple = scale if multiple is None else multiple
        if multiple < 1 or multiple % scale:
            raise ValueError(f"multiple: {multiple} is not divisible by the scale {scale}")
        if repeat < 1:
            raise ValueError(f"repeat: expected a positive integer, got {repeat}")
        self.store = ImageStore(root) if is_store(root) else None
        self.files = [Path(root) / n for n in self.store.names] if self.store is not None else list_images(root)
        if max_images is not None:
            self.files = self.files[:max_images]
        self.scale, self.crop, self.flips, self.seed, self.multiple = scale, crop, flips, seed, multiple
        self.rotations, self.center, self.repeat, self.cache = rotations, center, repeat, cache
        self.lr_root = Path(lr_root) if lr_root is not None else None
        if self.lr_root is not None and not self.lr_root.is_dir():
            raise FileNotFoundError(f"LR folder {str(self.lr_root)!r} does not exist or is not a folder")
        self.bank = self.store is not None and self.store.bank is not None and crop is not None and not center
        self.base_len = self.store.bank.count if self.bank else len(self.files)
        if self.bank and max_images is not None:
            self.base_len = min(self.base_len, max_images * self.store.bank.per_image)
        self.epoch = 0
        self._images: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        self._check()

    def _check(self) -> None:
        if self.store is not None:
            self._check_store()
            return
        problems, converted = [], []
        for path in self.files:
            try:
                h, w, mode = probe_image(path)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if mode != "RGB":
                converted.append(f"{path.name} ({mode})")
            problems += self._size_problems(path.name, h, w)
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

    def _size_problems(self, name: str, h: int, w: int) -> list[str]:
        need = self.multiple if self.crop is None or self.center else self.crop
        return [f"{name}: {h}x{w} is smaller than the {need}x{need} crop"] if h < need or w < need else []

    def _check_store(self) -> None:
        store, where = self.store, f"image store {str(self.store.folder)!r}"
        if self.lr_root is not None:
            raise ValueError(f"{where}: LR images are made from the stored HR; pass the image folder to use lr_data")
        if self.bank and (store.bank.scale, store.bank.crop) != (self.scale, self.crop):
            b = store.bank
            raise ValueError(
                f"{where}: its crop bank holds {b.crop}x{b.crop} crops at scale {b.scale}, this run needs "
                f"{self.crop}x{self.crop} at scale {self.scale}; prepare a store with that bank (or none)"
            )
        problems = (
            []
            if self.bank
            else [p for i, (h, w) in enumerate(store.shapes) for p in self._size_problems(store.names[i], h, w)]
        )
        if problems:
            raise ValueError(f"{len(problems)} problem(s) with the images in {where}: " + "; ".join(problems))
        stale = store.stale()
        if stale:
            warnings.warn(
                f"{where} is older than its source folder {store.source!r}: {_few(stale)} changed, appeared or "
                "vanished since srflow prepare; the store's copies are used",
                stacklevel=3,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips are drawn (call before each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.base_len * self.repeat

    def _generator(self, index: int) -> torch.Generator:
        key = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + index
        return torch.Generator().manual_seed(key % (2**63))

    def _load(self, file_index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(HR, LR or None) as (H, W, 3) uint8 (the non-RGB warning was given by the check)."""
        if self.store is not None:
            return self.store.image(file_index), None
        if file_index in self._images:
            return self._images[file_index]
        path = self.files[file_index]
        hr8 = _load_uint8(path, warn=False)
        lr8 = _load_uint8(self.lr_root / path.name, warn=False) if self.lr_root is not None else None
        if self.cache:
            self._images[file_index] = (hr8, lr8)
        return hr8, lr8

    def _window(self, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the HR crop of an h x w image."""
        s, m = self.scale, self.multiple
        if self.crop is not None and not self.center:
            top = int(torch.randint((h - self.crop) // s + 1, (1,), generator=gen)) * s
            left = int(torch.randint((w - self.crop) // s + 1, (1,), generator=gen)) * s
            return top, left, self.crop, self.crop
        ch, cw = h - h % m, w - w % m
        if self.crop is not None:
            ch, cw = min(ch, self.crop - self.crop % m), min(cw, self.crop - self.crop % m)
        if not self.center:  # MATLAB modcrop: keep the top-left part
            return 0, 0, ch, cw
        return ((h - ch) // 2) // s * s, ((w - cw) // 2) // s * s, ch, cw

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        gen = self._generator(index)
        s = self.scale
        if self.bank:
            hr, lr = self.store.bank_item(index % self.base_len)
        else:
            hr_full, lr_full = self._load(index % self.base_len)
            top, left, ch, cw = self._window(*hr_full.shape[:2], gen)
            hr = hr_full[top : top + ch, left : left + cw]  # uint8 until the end: crop first
            if lr_full is not None:
                lr = lr_full[top // s : (top + ch) // s, left // s : (left + cw) // s]
            else:
                lr = imresize_uint8(np.ascontiguousarray(hr), 1.0 / s)
        if self.flips and bool(torch.rand((), generator=gen) < 0.5):
            hr, lr = hr[:, ::-1], lr[:, ::-1]
        if self.rotations:
            k = (0, 1, 3)[int(torch.randint(3, (1,), generator=gen))]  # the official choice
            hr, lr = np.rot90(hr, k), np.rot90(lr, k)
        return from_uint8(hr), from_uint8(lr)


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
