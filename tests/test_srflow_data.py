"""srflow data pipeline, MATLAB-style imresize and image metrics (CPU, fast).

imresize is checked against Pillow's bicubic resize, an independent implementation with the same
kernel (Keys, a = -0.5), the same sample positions and, when shrinking, the same antialiasing
(kernel stretched by 1/scale). The two differ only in the border rule (Pillow renormalises the
truncated weights, MATLAB extends the image symmetrically, edge pixel repeated), so Pillow is
given the image already extended that way and its output cropped: then every output pixel,
borders included, must agree.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srflow import metrics
from srflow.data import HRImageDataset, list_images, load_rgb, make_lr, write_bundled_photos
from srflow.imresize import imresize, imresize_uint8
from srflow.store import prepare_store

# ------------------------------------------------------------------------------------ imresize


@pytest.mark.parametrize(
    "scale",
    [
        0.25,  # SRFlow 4x LR
        0.125,  # SRFlow 8x LR
        0.5,
        2.0,  # upscaling (no antialiasing)
    ],
)
def test_imresize_matches_pillow_bicubic_on_a_symmetrically_extended_image(scale: float) -> None:
    x = np.random.default_rng(0).random((48, 40)).astype(np.float32)
    # extend by a whole number of output pixels, wider than the kernel's reach (2 / scale inputs)
    pad = 4 * max(1, round(1 / scale))
    extended = np.pad(x, pad, mode="symmetric")
    size = (round(extended.shape[1] * scale), round(extended.shape[0] * scale))
    pil = np.asarray(Image.fromarray(extended, mode="F").resize(size, Image.BICUBIC), dtype=np.float64)
    m = round(pad * scale)
    pil = pil[m:-m, m:-m]
    ours = imresize(torch.from_numpy(x)[None].double(), scale)[0].numpy()
    assert ours.shape == pil.shape == (round(48 * scale), round(40 * scale))
    err = np.abs(pil - ours).max()
    assert err < 1e-6, f"imresize differs from Pillow on the symmetrically extended image by {err:.2e}"


def test_imresize_keeps_constant_images_constant() -> None:
    img = torch.full((2, 3, 40, 24), 0.37)
    for scale in (0.25, 0.125, 2.0):
        out = imresize(img, scale)
        assert torch.allclose(out, torch.full_like(out, 0.37), atol=1e-6)


def test_imresize_by_one_is_the_identity() -> None:
    img = torch.rand(1, 3, 17, 23)
    assert torch.equal(imresize(img, 1.0), img)


def test_imresize_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="floating"):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), 0.5)
    with pytest.raises(ValueError, match="scale"):
        imresize(torch.zeros(4, 4), 0.0)


def test_make_lr_is_quantised_to_8_bits() -> None:
    lr = make_lr(torch.rand(1, 3, 32, 32), 4)
    assert lr.shape == (1, 3, 8, 8)
    assert torch.equal(lr, (lr * 255).round() / 255)


# ------------------------------------------------------------------------------------ metrics


def test_metrics_of_identical_images() -> None:
    img = torch.rand(3, 32, 40)
    a = metrics.to_uint8(img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning either
        assert metrics.psnr(a, a) == math.inf
    assert metrics.ssim(a, a) == pytest.approx(1.0)
    assert metrics.diversity([img, img.clone(), img.clone()]) == 0.0


def test_metrics_sanity_on_different_images() -> None:
    a = metrics.to_uint8(torch.full((3, 16, 16), 0.5))
    b = metrics.to_uint8(torch.full((3, 16, 16), 0.5 + 10 / 255))
    assert metrics.psnr(a, b) == pytest.approx(20 * math.log10(255 / 10), abs=0.05)
    assert metrics.diversity([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]) == pytest.approx(127.5)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.diversity([torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.psnr(a, a[:8])


def test_lr_psnr_of_an_lr_consistent_sr_is_high() -> None:
    hr = load_rgb_astronaut(64)
    lr8 = metrics.to_uint8(make_lr(hr[None], 4)[0], rounding=True)
    assert metrics.lr_psnr(metrics.to_uint8(hr, rounding=True), lr8, 4) == math.inf  # the LR is made from this HR
    assert metrics.lr_psnr(np.zeros((64, 64, 3), np.uint8), lr8, 4) < 15


def load_rgb_astronaut(size: int) -> torch.Tensor:
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float() / 255.0
    return img[:, 100 : 100 + size, 150 : 150 + size].contiguous()


# ------------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bundled_photos(tmp_path_factory.mktemp("photos"), ("astronaut", "coffee"))[0].parent


def test_bundled_photos_are_written_once(tmp_path: Path) -> None:
    paths = write_bundled_photos(tmp_path, ("chelsea",))
    mtime = paths[0].stat().st_mtime_ns
    assert write_bundled_photos(tmp_path, ("chelsea",)) == paths and paths[0].stat().st_mtime_ns == mtime
    assert Image.open(paths[0]).mode == "RGB"
    with pytest.raises(ValueError, match="not among the bundled photos"):
        write_bundled_photos(tmp_path, ("camera",))


def test_crops_are_a_pure_function_of_seed_epoch_and_index(two_photos: Path) -> None:
    ds = HRImageDataset(two_photos, 4, crop=32, seed=3, repeat=3)
    assert len(ds) == 6
    hr, lr = ds[1]
    assert hr.shape == (3, 32, 32) and lr.shape == (3, 8, 8)
    again = HRImageDataset(two_photos, 4, crop=32, seed=3, repeat=3)
    assert torch.equal(again[1][0], hr) and torch.equal(again[1][1], lr)
    assert not torch.equal(ds[3][0], hr)  # the same file (1 % 2 == 3 % 2) with another crop
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], hr)
    assert torch.equal(lr, make_lr(hr[None], 4)[0]) or torch.equal(lr, make_lr(hr.flip(-1)[None], 4)[0].flip(-1))


def test_cache_gives_the_same_items(two_photos: Path) -> None:
    plain, cached = HRImageDataset(two_photos, 4, crop=32), HRImageDataset(two_photos, 4, crop=32, cache=True)
    for i in range(2):
        assert torch.equal(plain[i][0], cached[i][0]) and torch.equal(cached[i][0], cached[i][0])


def test_center_crops_and_modcrop(two_photos: Path) -> None:
    ds = HRImageDataset(two_photos, 4, crop=64, flips=False, multiple=8, center=True)
    hr, lr = ds[0]
    assert hr.shape == (3, 64, 64) and lr.shape == (3, 16, 16)
    full = load_rgb(list_images(two_photos)[0])  # astronaut, 512x512
    assert torch.equal(hr, full[:, 224:288, 224:288])
    whole = HRImageDataset(two_photos, 4, crop=None, flips=False, multiple=8)
    assert whole[1][0].shape[1] % 8 == 0 and whole[1][0].shape[2] % 8 == 0  # coffee 400x600


def test_paired_lr_folder(tmp_path: Path) -> None:
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir(), lr_dir.mkdir()
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    lr = rng.integers(0, 256, (16, 12, 3), dtype=np.uint8)
    Image.fromarray(hr).save(hr_dir / "a.png")
    Image.fromarray(lr).save(lr_dir / "a.png")
    ds = HRImageDataset(hr_dir, 4, crop=32, lr_root=lr_dir, flips=False, seed=1)
    hr_crop, lr_crop = ds[0]
    top, left = _locate(torch.from_numpy(hr).permute(2, 0, 1).float() / 255, hr_crop)
    assert torch.equal(
        lr_crop,
        torch.from_numpy(lr).permute(2, 0, 1).float()[:, top // 4 : top // 4 + 8, left // 4 : left // 4 + 8] / 255,
    )
    Image.fromarray(lr[:15]).save(lr_dir / "a.png")
    with pytest.raises(ValueError, match="is not a.png's 64x48 divided by 4"):
        HRImageDataset(hr_dir, 4, crop=32, lr_root=lr_dir)


def _locate(full: torch.Tensor, crop: torch.Tensor) -> tuple[int, int]:
    size = crop.shape[1]
    for top in range(0, full.shape[1] - size + 1, 4):
        for left in range(0, full.shape[2] - size + 1, 4):
            if torch.equal(full[:, top : top + size, left : left + size], crop):
                return top, left
    raise AssertionError("crop not found in the image")


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HRImageDataset(tmp_path / "nope", 4, crop=32)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no .png/.jpg/.jpeg images"):
        HRImageDataset(tmp_path, 4, crop=32)


def test_bad_images_are_all_named_on_one_line(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not a PNG")
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 7).save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as info:
        HRImageDataset(tmp_path, 4, crop=32)
    message = str(info.value)
    assert "\n" not in message and message.startswith("3 problem(s)")
    assert "small.png: 20x40 is smaller than the 32x32 crop" in message
    assert "garbage.png: cannot read the image" in message
    assert "truncated.png: cannot read the image" in message
    assert "good.png" not in message


def test_grayscale_and_rgba_images_are_converted_with_a_warning(tmp_path: Path) -> None:
    Image.fromarray(np.full((48, 48), 100, np.uint8), mode="L").save(tmp_path / "gray.png")
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 200, 50
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    with pytest.warns(UserWarning, match=r"2 image\(s\) are not RGB.*gray.png \(L\).*rgba.png \(RGBA\)"):
        ds = HRImageDataset(tmp_path, 4, crop=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once above, not per item
        gray, _ = ds[0]
        color, _ = ds[1]
    assert gray.shape == (3, 32, 32) and torch.allclose(gray, torch.full_like(gray, 100 / 255))
    assert torch.allclose(color[1], torch.full_like(color[1], 200 / 255)) and color[0].abs().max() == 0


def test_dataset_argument_checks(two_photos: Path) -> None:
    with pytest.raises(ValueError, match="not divisible by the scale"):
        HRImageDataset(two_photos, 4, crop=30)
    with pytest.raises(ValueError, match="repeat"):
        HRImageDataset(two_photos, 4, crop=32, repeat=0)
    with pytest.raises(FileNotFoundError, match="LR folder"):
        HRImageDataset(two_photos, 4, crop=32, lr_root=two_photos / "missing")
    with pytest.raises(IndexError):
        HRImageDataset(two_photos, 4, crop=32)[2]


# ------------------------------------------------------------------------------------ image store


def test_store_items_equal_the_folder_items(two_photos: Path, tmp_path: Path) -> None:
    """A store holds the decoded images: random crops, flips and their LR are the folder's, item by
    item, also through DataLoader workers (which map the file themselves) and for whole images."""
    store = prepare_store(two_photos, tmp_path / "store", progress=False)
    assert store.names == ["astronaut.png", "coffee.png"] and store.bank is None
    kwargs = {"crop": 32, "seed": 5, "repeat": 2, "rotations": True}
    folder, stored = HRImageDataset(two_photos, 4, **kwargs), HRImageDataset(tmp_path / "store", 4, **kwargs)
    assert len(stored) == len(folder) == 4
    for i in range(len(folder)):
        assert all(torch.equal(a, b) for a, b in zip(folder[i], stored[i]))
    loader = torch.utils.data.DataLoader(stored, batch_size=2, num_workers=2)
    batches = [hr for hr, _ in loader]
    assert torch.equal(torch.cat(batches), torch.stack([folder[i][0] for i in range(4)]))
    whole = HRImageDataset(tmp_path / "store", 4, crop=None, flips=False)
    assert torch.equal(whole[1][0], load_rgb(two_photos / "coffee.png")[:, :400, :600])


def test_crop_bank_is_the_official_prepare_step(two_photos: Path, tmp_path: Path) -> None:
    """``bank`` fixed crops per image with the official LR of each; training items are those crops
    (flipped at random); a bank of another crop or scale is refused by name."""
    store = prepare_store(two_photos, tmp_path / "store", bank=3, crop=32, scale=4, seed=1, progress=False)
    assert (store.bank.count, store.bank.per_image) == (6, 3)
    ds = HRImageDataset(tmp_path / "store", 4, crop=32, flips=False)
    assert ds.bank and len(ds) == 6
    astronaut = np.asarray(Image.open(two_photos / "astronaut.png"))
    for i in range(3):  # the first image's crops: somewhere in it, with their official LR
        hr, lr = ds[i]
        hr8 = metrics.to_uint8(hr, rounding=True)
        corners = np.argwhere((astronaut[:-31, :-31] == hr8[0, 0]).all(axis=2))  # where the crop may start
        assert any(np.array_equal(astronaut[y : y + 32, x : x + 32], hr8) for y, x in corners)
        assert np.array_equal(metrics.to_uint8(lr, rounding=True), imresize_uint8(hr8, 0.25))
    with pytest.raises(ValueError, match=r"crop bank holds 32x32 crops at scale 4, this run needs 64x64 at scale 4"):
        HRImageDataset(tmp_path / "store", 4, crop=64)
    assert not HRImageDataset(tmp_path / "store", 4, crop=32, center=True).bank  # validation: the images
    with pytest.raises(ValueError, match="scale: a crop bank needs the SR scale"):
        prepare_store(two_photos, tmp_path / "other", bank=2)
    with pytest.raises(ValueError, match=r"coffee.png: 400x600 is smaller than the 512x512 crop"):
        prepare_store(two_photos, tmp_path / "other", bank=2, crop=512, scale=4)
    assert not (tmp_path / "other").exists()


def test_a_store_older_than_its_folder_warns(tmp_path: Path) -> None:
    photos = write_bundled_photos(tmp_path / "photos", ("chelsea",))[0].parent
    prepare_store(photos, tmp_path / "store", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HRImageDataset(tmp_path / "store", 4, crop=32)
    write_bundled_photos(photos, ("coffee",))
    with pytest.warns(UserWarning, match=r"is older than its source folder .*coffee.png changed, appeared or vanished"):
        HRImageDataset(tmp_path / "store", 4, crop=32)
