"""The ``srflow`` command line end to end (train, resume, sample, transfer, eval, demo) and its
error handling: bad inputs end with exit code 2 and one ``srflow: error:`` line, no traceback,
and leave existing checkpoints untouched. Runs ``tiny-4x`` on 32x32 crops on the CPU."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from srflow import cli
from srflow.data import load_rgb, make_lr, save_rgb
from srflow.train import TrainingObjective

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--preset", "tiny-4x", "--steps", "4", "--batch", "4", "--crop", "32", "--lr", "1e-3", "--val-every", "0"]
TRAIN += ["--no-progress", "--cache-images", "--device", "cpu", "--log-every", "100"]

# tiny models on a small shared machine: see the one_thread fixture in conftest.py
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.xdist_group("cli-run")]  # one trained run


@pytest.fixture(scope="module")
def run(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 2 steps, paused, and resumed to 4 through the CLI."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("run")
        base = ["train", *TRAIN, "--data", str(photos), "--out", str(out), "--save-every", "2"]
        assert cli.main([*base, "--stop-after", "2"]) == 0
        assert cli.main([*base, "--resume", "auto"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_clean_error(capsys: pytest.CaptureFixture, rc: int, match: str, code: int = 2) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("srflow: error")]
    assert rc == code, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("srflow: error: "), err
    assert match in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------ happy paths


@pytest.mark.slow
def test_train_then_resume_through_the_cli(run: Path, capsys: pytest.CaptureFixture) -> None:
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step-00000000{s}.{ext}" for s in (2, 4) for ext in ("safetensors", "state.pt")]
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["resume"] == "auto" and config["preset"] == "tiny-4x"


def test_yaml_config_with_command_line_overrides(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text(f"preset: tiny-4x\ndata: {photos}\nsteps: 1\ncrop: 48\nbatch: 2\nlr: 0.01\nval_every: 0\n")
    out = tmp_path / "run"
    rc = cli.main(["train", "--config", str(yaml_path), "--out", str(out), "--crop", "32", "--no-progress"])
    assert rc == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["crop"], saved["lr"], saved["batch"], saved["betas"]) == (32, 0.01, 2, [0.9, 0.999])
    assert "trained to step 1 (finished)" in capsys.readouterr().out


def test_sample_any_lr_size(run: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    hr = load_rgb(photos / "astronaut.png")[:, 100:152, 200:268]
    odd = tmp_path / "odd.png"
    save_rgb(make_lr(hr[None], 4)[0][:, :13, :17], odd)  # 13x17: reflect-padded to 14x18, cropped back
    even = tmp_path / "even.png"
    save_rgb(make_lr(hr[None], 4)[0][:, :12, :16], even)
    out = tmp_path / "sr"
    assert (
        cli.main(
            [
                "sample",
                "--checkpoint",
                str(run),
                str(odd),
                str(even),
                "--n",
                "2",
                "--temperature",
                "0",
                "0.9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert Image.open(out / "odd_t0.90_1.png").size == (68, 52)
    assert Image.open(out / "even_t0.00_0.png").size == (64, 48)
    grid = Image.open(out / "odd_grid.png")
    assert grid.size[1] == 52 + 8 and grid.size[0] == 4 * 68 + 5 * 4  # LR up + 1 + 2 samples, 4-pixel padding
    # temperature 0 is deterministic: one sample, said once on one line
    assert not (out / "odd_t0.00_1.png").exists()
    assert capsys.readouterr().err.splitlines() == [
        "srflow: warning: temperature 0 is deterministic: writing one sample per image for it, not 2 identical ones"
    ]
    t9 = [np.asarray(Image.open(out / f"odd_t0.90_{k}.png")) for k in (0, 1)]
    assert not np.array_equal(*t9)


@pytest.mark.slow
def test_sample_through_python_dash_m(run: Path, photos: Path, tmp_path: Path) -> None:
    lr = tmp_path / "lr.png"
    save_rgb(make_lr(load_rgb(photos / "coffee.png")[None, :, :64, :64], 4)[0], lr)
    cmd = [
        sys.executable,
        "-m",
        "srflow",
        "sample",
        "--checkpoint",
        str(run / "checkpoints" / "step-000000004.safetensors"),
    ]
    cmd += ["--preset", "tiny-4x", str(lr), "--n", "1", "--seed", "3", "--out", str(tmp_path / "sr"), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 images" in proc.stdout
    assert Image.open(tmp_path / "sr" / "lr_t0.90_0.png").size == (64, 64)


def test_transfer_round_trip_and_content_transfer(
    run: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    hr = tmp_path / "ref.png"
    save_rgb(load_rgb(photos / "astronaut.png")[:, 80:144, 160:224], hr)
    out = tmp_path / "t"
    assert cli.main(["transfer", "--checkpoint", str(run), "--hr", str(hr), "--out", str(out)]) == 0
    same = np.asarray(Image.open(out / "ref_lr_consistent.png")).astype(float)
    ref = np.asarray(Image.open(hr)).astype(float)
    assert np.abs(same - ref).max() <= 1  # encode -> decode with the same LR reproduces the HR
    other = tmp_path / "other_lr.png"
    save_rgb(make_lr(load_rgb(photos / "coffee.png")[None, :, 100:164, 100:164], 4)[0], other)
    assert cli.main(["transfer", "--checkpoint", str(run), "--hr", str(hr), "--lr", str(other), "--out", str(out)]) == 0
    assert Image.open(out / "ref_to_other_lr.png").size == (64, 64) and (out / "ref_to_other_lr_grid.png").is_file()
    capsys.readouterr()
    wrong = tmp_path / "wrong_lr.png"
    save_rgb(torch.rand(3, 12, 16), wrong)
    rc = cli.main(["transfer", "--checkpoint", str(run), "--hr", str(hr), "--lr", str(wrong), "--out", str(out)])
    assert_clean_error(capsys, rc, "decode only with an LR of 16x16")
    odd = tmp_path / "odd_hr.png"
    save_rgb(torch.rand(3, 60, 64), odd)
    rc = cli.main(["transfer", "--checkpoint", str(run), "--hr", str(odd), "--out", str(out)])
    assert_clean_error(capsys, rc, "60x64 cannot be encoded; HR sides must be multiples of 8")


def test_eval_writes_csv_and_table(run: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    rc = cli.main(
        ["eval", "--checkpoint", str(run), "--data", str(photos), "--max-images", "2", "--crop", "64"]
        + ["--n", "2", "--out", str(out), "--bicubic"]
    )
    assert rc == 0
    table = capsys.readouterr().out
    assert "nll_bits_px" in table and "diversity" in table and "bicubic" in table
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:8] == ["image", "size", "nll_bits_px", "psnr", "ssim", "lr_psnr", "psnr_t0", "diversity"]
    assert [r.split(",")[0] for r in rows[1:]] == ["astronaut.png", "chelsea.png", "mean", "bicubic"]
    first = dict(zip(header, rows[1].split(",")))
    assert first["size"] == "64x64" and float(first["diversity"]) > 0 and 0 < float(first["ssim"]) <= 1
    assert all(np.isfinite(float(first[c])) for c in ("nll_bits_px", "psnr", "lr_psnr", "psnr_t0"))


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--steps", "3", "--device", "cpu", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "memory saving: for backward the flow keeps" in text and "official df2k-4x flow" in text
    assert "bits/px" in text and "srflow demo finished" in text
    for path in ("samples/chelsea_grid.png", "samples/chelsea_t0.50_0.png", "metrics/metrics.csv", "run/config.yaml"):
        assert (out / path).is_file(), path
    assert len(list((out / "run" / "val").glob("*.png"))) == 1


# ------------------------------------------------------------------------------------ errors


def _write(folder: Path, name: str, array: np.ndarray, mode: str | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(folder / name)


def test_missing_empty_small_and_corrupt_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["train", *TRAIN, "--out", str(tmp_path / "out")]
    rc = cli.main([*base, "--data", str(tmp_path / "missing")])
    assert_clean_error(capsys, rc, "data folder " + repr(str(tmp_path / "missing")) + " does not exist")
    (tmp_path / "empty").mkdir()
    rc = cli.main([*base, "--data", str(tmp_path / "empty")])
    assert_clean_error(capsys, rc, "holds no .png/.jpg/.jpeg images")
    _write(tmp_path / "small", "tiny.png", np.zeros((16, 64, 3), np.uint8))
    rc = cli.main([*base, "--data", str(tmp_path / "small")])
    assert_clean_error(capsys, rc, "tiny.png: 16x64 is smaller than the 32x32 crop")
    _write(tmp_path / "corrupt", "ok.png", np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "corrupt" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rc = cli.main([*base, "--data", str(tmp_path / "corrupt")])
    assert_clean_error(capsys, rc, "broken.jpg: cannot read the image")
    rc = cli.main([*base, "--data", str(tmp_path / "corrupt"), "--crop", "30"])
    assert_clean_error(capsys, rc, "crop: 30 is not a multiple of 8")
    assert not (tmp_path / "out").exists()  # nothing written by failed starts


def test_grayscale_and_rgba_images_train_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    _write(tmp_path / "data", "gray.png", rng.integers(0, 256, (48, 48), dtype=np.uint8), "L")
    _write(tmp_path / "data", "rgba.png", rng.integers(0, 256, (48, 48, 4), dtype=np.uint8), "RGBA")
    rc = cli.main(["train", *TRAIN, "--steps", "1", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "o")])
    assert rc == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("srflow: warning:")]
    assert len(warned) == 1 and "are not RGB and are converted to RGB" in warned[0], warned


def test_unknown_yaml_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("preset: tiny-4x\nbatchsize: 4\n")
    rc = cli.main(["train", "--config", str(path), "--data", str(tmp_path)])
    assert_clean_error(capsys, rc, "unknown option 'batchsize' (did you mean 'batch'?)")


def test_bad_checkpoints_for_sampling(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lr = tmp_path / "lr.png"
    save_rgb(torch.rand(3, 8, 8), lr)
    good = run / "checkpoints" / "step-000000004.safetensors"
    truncated = tmp_path / "step-000000004.safetensors"
    truncated.write_bytes(good.read_bytes()[:5000])
    rc = cli.main(["sample", "--checkpoint", str(truncated), str(lr), "--out", str(tmp_path / "o")])
    line = assert_clean_error(capsys, rc, "could not be read as safetensors")
    assert str(truncated) in line
    rc = cli.main(["sample", "--checkpoint", str(good), "--preset", "tiny-8x", str(lr), "--out", str(tmp_path / "o")])
    assert_clean_error(capsys, rc, "was trained with preset 'tiny-4x', not 'tiny-8x'")
    rc = cli.main(["sample", "--official", str(good), str(lr), "--out", str(tmp_path / "o")])
    assert_clean_error(capsys, rc, "--official needs --preset")
    rc = cli.main(["sample", "--official", str(good), "--preset", "tiny-8x", str(lr), "--out", str(tmp_path / "o")])
    assert_clean_error(capsys, rc, "is a tiny-4x model checkpoint, not tiny-8x")
    from safetensors.torch import load_file, save_file

    weights = load_file(str(good))
    weights.pop("flowUpsamplerNet.f.0.weight")
    partial = tmp_path / "partial.safetensors"
    save_file(weights, str(partial), metadata={"preset": "tiny-4x"})
    rc = cli.main(["sample", "--checkpoint", str(partial), str(lr), "--out", str(tmp_path / "o")])
    assert_clean_error(capsys, rc, "1 missing keys: flowUpsamplerNet.f.0.weight")
    rc = cli.main(["sample", "--checkpoint", str(good), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o")])
    assert_clean_error(capsys, rc, "nope.png' does not exist")
    assert not (tmp_path / "o").exists()


def test_failed_resume_leaves_the_run_untouched(run: Path, photos: Path, capsys: pytest.CaptureFixture) -> None:
    before = digest(run)
    args = ["train", *TRAIN, "--data", str(photos), "--out", str(run)]
    rc = cli.main([*args, "--resume", "auto", "--preset", "tiny-8x", "--crop", "32"])
    assert_clean_error(capsys, rc, "was trained with preset 'tiny-4x', but this run uses 'tiny-8x'")
    rc = cli.main(args)
    assert_clean_error(capsys, rc, "already holds checkpoints (newest: step 4)")
    rc = cli.main([*args, "--resume", str(run / "checkpoints" / "step-000000003.state.pt")])
    assert_clean_error(capsys, rc, "no such file")
    assert digest(run) == before


def test_nonfinite_training_exits_with_code_3(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = TrainingObjective.forward

    def nan_forward(self, hr, lr, generator=None):  # noqa: ANN001, ANN202
        loss, nll = original(self, hr, lr, generator)
        return loss * float("nan"), nll

    monkeypatch.setattr(TrainingObjective, "forward", nan_forward)
    rc = cli.main(["train", *TRAIN, "--data", str(photos), "--out", str(tmp_path / "o"), "--max-nonfinite", "2"])
    assert_clean_error(capsys, rc, "2 consecutive steps with a non-finite loss or gradient", code=3)
    assert not (tmp_path / "o" / "checkpoints").exists()
