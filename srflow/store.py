"""A decoded uint8 image store and the official crop bank: what ``srflow prepare`` writes.

Decoding a 2K PNG takes ~100 ms, so a loader that decodes the whole image for every 160x160 crop
delivers ~7 samples/s per worker. A store is the images decoded once, back to back in one uint8
file that every DataLoader worker and every rank on a host memory-maps (the pages are shared
through the OS page cache, and a crop touches only its own rows). With a crop bank, the store also
holds the official training patches: ``per_image`` random ``crop`` x ``crop`` crops per image with
their LR made by the official uint8 imresize, as SRFlow's ``prepare_data.py`` makes them (47 per
image, 160x160). Training from a store with a bank visits those fixed crops (with random flips);
without one, it draws a new crop every visit (the project's default, also fine for the recipe).

Folder layout (``srflow.data.HRImageDataset`` takes the folder as its ``root``):

* ``store.json``: ``{"format": "srflow-image-store", "version": 1, "source": <folder>,
  "images": [{"name", "height", "width", "offset", "file_size", "mtime_ns"}, ...],
  "bank": null or {"scale", "crop", "per_image", "seed", "count"}}``;
* ``images.u8``: every image as (H, W, 3) uint8, at its ``offset``;
* ``bank-hr.u8`` and ``bank-lr.u8``: (count, crop, crop, 3) and (count, crop/scale, crop/scale, 3)
  uint8, crops of image ``i`` at positions ``i * per_image`` to ``(i + 1) * per_image - 1``.

Files are written to temporary names and renamed, ``store.json`` last, so a store is complete
when its ``store.json`` exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imresize import imresize_uint8

__all__ = ["STORE_FILE", "ImageStore", "is_store", "prepare_store"]

STORE_FILE = "store.json"
_FORMAT = "srflow-image-store"
_VERSION = 1


def is_store(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is an image store (holds a ``store.json``)."""
    return (Path(folder) / STORE_FILE).is_file()


@dataclass(frozen=True)
class _Bank:
    scale: int
    crop: int
    per_image: int
    seed: int
    count: int


class ImageStore:
    """A store written by :func:`prepare_store`, memory-mapped on first use in each process
    (pickling drops the maps, so DataLoader workers map the file themselves instead of copying it).

    Attributes: ``folder``, ``names`` (source file names, sorted), ``shapes`` ((H, W) per image),
    ``bank`` (its settings, or None). Raises ValueError naming the folder if it is not a complete
    store of this version.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        path = self.folder / STORE_FILE
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"image store {str(self.folder)!r}: cannot read {STORE_FILE} ({exc})") from exc
        if not isinstance(index, dict) or index.get("format") != _FORMAT or index.get("version") != _VERSION:
            raise ValueError(
                f"image store {str(self.folder)!r}: {STORE_FILE} is not a version-{_VERSION} srflow image store; "
                "make it again with srflow prepare"
            )
        self.source = index["source"]
        self.images = index["images"]
        self.names = [entry["name"] for entry in self.images]
        self.shapes = [(entry["height"], entry["width"]) for entry in self.images]
        self.bank = _Bank(**index["bank"]) if index["bank"] else None
        self._maps: dict[str, np.memmap] = {}

    def __len__(self) -> int:
        return len(self.images)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}

    def _map(self, name: str, shape: tuple[int, ...] | None = None) -> np.memmap:
        if name not in self._maps:
            self._maps[name] = np.memmap(self.folder / name, dtype=np.uint8, mode="r", shape=shape)
        return self._maps[name]

    def image(self, index: int) -> np.ndarray:
        """Image ``index`` as a read-only (H, W, 3) uint8 view of the mapped file."""
        entry = self.images[index]
        h, w = entry["height"], entry["width"]
        flat = self._map("images.u8")
        return flat[entry["offset"] : entry["offset"] + h * w * 3].reshape(h, w, 3)

    def bank_item(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Crop ``index`` of the bank: (HR (crop, crop, 3), LR (crop/scale, crop/scale, 3)) uint8 views."""
        b = self.bank
        if b is None:
            raise ValueError(f"image store {str(self.folder)!r} has no crop bank (srflow prepare --bank N)")
        lr = b.crop // b.scale
        hr_map = self._map("bank-hr.u8", (b.count, b.crop, b.crop, 3))
        lr_map = self._map("bank-lr.u8", (b.count, lr, lr, 3))
        return hr_map[index], lr_map[index]

    def stale(self) -> list[str]:
        """Source images that changed (size or mtime), vanished or appeared since the store was
        made (empty when it is current, or when the source folder is gone, e.g. on another host)."""
        source = Path(self.source)
        if not source.is_dir():
            return []
        from .data import list_images  # noqa: PLC0415 (data imports this module)

        now = {p.name: p.stat() for p in list_images(source)}
        changed = [
            e["name"]
            for e in self.images
            if e["name"] not in now
            or (now[e["name"]].st_size, now[e["name"]].st_mtime_ns) != (e["file_size"], e["mtime_ns"])
        ]
        return changed + sorted(set(now) - set(self.names))


def _create(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 file of ``shape`` under a temporary name next to ``path`` (see :func:`_commit`)."""
    return np.memmap(path.with_name(f".tmp-{path.name}"), dtype=np.uint8, mode="w+", shape=shape)


def _commit(mm: np.memmap, path: Path) -> None:
    mm.flush()
    os.replace(mm.filename, path)


def prepare_store(
    data: str | os.PathLike,
    out: str | os.PathLike,
    bank: int = 0,
    crop: int = 160,
    scale: int | None = None,
    seed: int = 10,
    progress: bool = True,
) -> ImageStore:
    """Decode every PNG/JPEG in ``data`` once into a store in ``out`` (module docstring), and with
    ``bank`` > 0 also the official crop bank: ``bank`` random ``crop`` x ``crop`` crops per image
    (positions from ``numpy.random.default_rng(seed)``) with their LR at ``scale`` (required then;
    the crop must be a multiple of it). Every image is checked first (unreadable files and images
    smaller than the crop are named, before anything is written). Returns the store."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    from .data import _load_uint8, list_images, probe_image  # noqa: PLC0415 (data imports this module)

    if bank < 0:
        raise ValueError(f"bank: expected a number of crops per image >= 0, got {bank}")
    if bank:
        if scale is None or scale < 1:
            raise ValueError(f"scale: a crop bank needs the SR scale of its LR (e.g. 4), got {scale}")
        if crop < 1 or crop % scale:
            raise ValueError(f"crop: expected a positive multiple of the scale {scale}, got {crop}")
    data, out = Path(data), Path(out)
    if is_store(data):
        raise ValueError(
            f"data: {str(data)!r} is an image store already; pass the folder of the images it was made from"
        )
    files = list_images(data)
    shapes, problems = [], []
    for path in files:
        try:
            h, w, _ = probe_image(path)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if bank and min(h, w) < crop:
            problems.append(f"{path}: {h}x{w} is smaller than the {crop}x{crop} crop")
        shapes.append((h, w))
    if problems:
        raise ValueError(f"{len(problems)} problem(s) with the images in {str(data)!r}: " + "; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    (out / STORE_FILE).unlink(missing_ok=True)  # the store is incomplete until it is written again
    offsets = np.cumsum([0] + [h * w * 3 for h, w in shapes])
    rng = np.random.default_rng(seed)
    maps = {"images.u8": _create(out / "images.u8", (int(offsets[-1]),))}
    if bank:
        lr = crop // scale
        maps["bank-hr.u8"] = _create(out / "bank-hr.u8", (len(files) * bank, crop, crop, 3))
        maps["bank-lr.u8"] = _create(out / "bank-lr.u8", (len(files) * bank, lr, lr, 3))
    for i, (path, (h, w)) in enumerate(tqdm(list(zip(files, shapes)), disable=not progress, unit="img")):
        img = _load_uint8(path, warn=False)
        maps["images.u8"][offsets[i] : offsets[i + 1]] = img.reshape(-1)
        for k in range(i * bank, (i + 1) * bank):
            top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
            maps["bank-hr.u8"][k] = img[top : top + crop, left : left + crop]
            maps["bank-lr.u8"][k] = imresize_uint8(maps["bank-hr.u8"][k], 1.0 / scale)
    for name, mm in maps.items():
        _commit(mm, out / name)
    images = []
    for path, (h, w), offset in zip(files, shapes, offsets):
        stat = path.stat()
        images.append(
            {
                "name": path.name,
                "height": h,
                "width": w,
                "offset": int(offset),
                "file_size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
            }
        )
    bank_info = {"scale": scale, "crop": crop, "per_image": bank, "seed": seed, "count": len(files) * bank}
    index = {
        "format": _FORMAT,
        "version": _VERSION,
        "source": str(data.resolve()),
        "images": images,
        "bank": bank_info if bank else None,
    }
    tmp = out / f".tmp-{STORE_FILE}"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / STORE_FILE)
    return ImageStore(out)
