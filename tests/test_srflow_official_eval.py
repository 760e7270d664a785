"""SRFlow's data and evaluation against the official pipeline (tests/data/official-srflow-eval).

The fixture was made with the official numpy ``imresize`` (uint8 path) and the official
``test.py`` / ``Measure.py`` metrics: per case an HR photo crop (uint8, sides a multiple of the
scale but not of 2 x scale, so the LR has odd sides), its official LR, an SR image (uint8) and the
official [PSNR, SSIM, LR-PSNR] of that SR (see the file's metadata). The LR must equal ours bit for
bit, and the metrics within ``OFFICIAL_METRIC_ATOL``, both through the metric functions and through
``srflow.infer.evaluate`` reading the images from PNG files, with the model's samples replaced by
the fixture's SR: that pins the protocol (the dataset's LR files, whole images, an odd LR padded
and the SR cropped back, uint8 conversion) as well as the arithmetic.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srflow import SRFlow, metrics
from srflow.data import from_uint8, make_lr
from srflow.imresize import imresize_uint8
from srflow.infer import evaluate
from tests.tolerances import OFFICIAL_METRIC_ATOL

safetensors = pytest.importorskip("safetensors", reason="the fixture is a safetensors file (pip install safetensors)")
from safetensors import safe_open  # noqa: E402

FIXTURE = Path(__file__).parent / "data" / "official-srflow-eval.safetensors"
CASES = ("case0", "case1", "case2", "case3")


@functools.cache
def case(name: str) -> tuple[dict[str, np.ndarray], int]:
    """The case's arrays (hr, lr, sr, metrics) and its scale (from the metadata)."""
    with safe_open(str(FIXTURE), framework="np") as f:
        arrays = {k.split("/", 1)[1]: f.get_tensor(k) for k in f.keys() if k.startswith(name + "/")}  # noqa: SIM118
        scale = int(f.metadata()[name].split("scale ")[1].split(":")[0])
    return arrays, scale


@pytest.mark.parametrize("name", CASES)
def test_lr_is_bit_exact(name: str) -> None:
    arrays, scale = case(name)
    ours = imresize_uint8(arrays["hr"], 1.0 / scale)
    assert ours.shape == arrays["lr"].shape and ours.dtype == np.uint8
    differ = int((ours != arrays["lr"]).sum())
    assert differ == 0, f"{differ} of {ours.size} LR values differ from the official imresize"
    # the training data path: float HR tensors read from PNG -> the same LR
    lr = make_lr(from_uint8(arrays["hr"])[None], scale)[0]
    assert torch.equal(lr, from_uint8(arrays["lr"]))


@pytest.mark.parametrize("name", CASES)
def test_metrics_match_the_official_test_script(name: str) -> None:
    arrays, scale = case(name)
    hr, lr, sr = arrays["hr"], arrays["lr"], arrays["sr"]
    ours = np.array([metrics.psnr(sr, hr), metrics.ssim(sr, hr), metrics.lr_psnr(sr, lr, scale)])
    err = np.abs(ours - arrays["metrics"])
    assert err.max() <= OFFICIAL_METRIC_ATOL, f"[PSNR, SSIM, LR-PSNR] differ from the official by {err}"


@pytest.mark.parametrize("scale", [4, 8])
def test_eval_follows_the_official_protocol(
    scale: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """evaluate() on the fixture's HR and LR files, its samples replaced by the fixture's SR: the
    rows equal the official metrics, and every LR reached the model whole, reflect-padded to even."""
    names = [n for n in CASES if case(n)[1] == scale]
    hr_dir, lr_dir = tmp_path / "hr", tmp_path / "lr"
    hr_dir.mkdir(), lr_dir.mkdir()
    by_size = {}
    for n in names:
        arrays, _ = case(n)
        Image.fromarray(arrays["hr"]).save(hr_dir / f"{n}.png")
        Image.fromarray(arrays["lr"]).save(lr_dir / f"{n}.png")
        by_size[arrays["lr"].shape[:2]] = arrays["sr"]
    seen = []

    def fixture_sample(self: SRFlow, lr=None, temperature=0.9, seed=None, *, cond=None, **kwargs):  # noqa: ANN001, ANN202
        seen.append((cond.lr_size, cond.padded_size, temperature))
        sr8 = by_size[cond.lr_size]
        # +0.5 level: the truncating uint8 conversion of the official script gives back sr8 exactly
        return (torch.from_numpy(sr8).permute(2, 0, 1)[None].float() + 0.5) / 255.0

    monkeypatch.setattr(SRFlow, "sample", fixture_sample)
    model = SRFlow.from_preset(f"tiny-{scale}x", seed=0).eval()
    result = evaluate(model, hr_dir, lr_data=lr_dir, n=1, seed=0)
    for n, row in zip(names, result.rows):
        arrays, _ = case(n)
        assert row["image"] == f"{n}.png" and row["size"] == "x".join(map(str, arrays["hr"].shape[:2]))
        ours = np.array([row["psnr"], row["ssim"], row["lr_psnr"]])
        err = np.abs(ours - arrays["metrics"])
        assert err.max() <= OFFICIAL_METRIC_ATOL, f"{n}: [PSNR, SSIM, LR-PSNR] differ from the official by {err}"
        assert np.isnan(row["nll_bits_px"])  # odd LR: no NLL
    sizes = {case(n)[0]["lr"].shape[:2] for n in names}
    assert {s for s, _, _ in seen} == sizes  # whole LR images, as read from the files
    assert all(p == (s[0] + s[0] % 2, s[1] + s[1] % 2) for s, p, _ in seen)  # padded to even
    assert {t for _, _, t in seen} == {0.9, 0.0}  # the official temperature (and the t=0 column)
