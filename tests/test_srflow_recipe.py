"""Training SRFlow from nothing, the way the official models were made: the RRDB stage
(``srflow train-rrdb``), SRFlow from its output, evaluation with the dataset's LR files and the
RRDB baseline; the RRDB stage's exact resume; official presets refusing a random RRDB.

Everything runs ``tiny-4x`` on 32x32 crops of scikit-image's bundled photos on the CPU, a few
steps at a time. Resume is checked bitwise, as for the SRFlow stage (tests/test_srflow_train.py).
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srflow import cli
from srflow.config import ConfigError, TrainConfig
from srflow.data import load_rgb, make_lr, save_rgb
from srflow.infer import load_rrdb, rrdb_sr
from srflow.official_checkpoint import CheckpointError
from srflow.rrdb import RRDBNet
from srflow.train import Trainer, train
from srflow.training_checkpoint import load_training_checkpoint, read_weights
from tests.test_srflow_train import DDP_ATOL, digest, quiet, subprocess_env, tiny, tiny_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_rrdb(photos: Path, out: Path, **changes: object) -> TrainConfig:
    """The few-second run of tests/test_srflow_train.py in the RRDB stage, with a cosine period of 2
    steps (so a resume at step 3 falls between two restarts)."""
    return tiny(photos, out, stage="rrdb", dequantize=None, cosine_period=2).replace(**changes)


def test_rrdb_stage_resume_continues_exactly(photos: Path, tmp_path: Path) -> None:
    """6 steps == 3 steps + resume + 3 steps, bitwise: weights, Adam state, losses (the cosine
    restarts at iterations 2 and 4 and the rotations are on the way)."""
    straight = train(tiny_rrdb(photos, tmp_path / "a", rotations=True), log=quiet)
    first = train(tiny_rrdb(photos, tmp_path / "b", rotations=True, stop_after=3), log=quiet)
    assert (first.step, first.stopped) == (3, "stop_after")
    messages: list[str] = []
    second = train(tiny_rrdb(photos, tmp_path / "b", rotations=True, resume="auto"), log=messages.append)
    assert messages[0].startswith("srflow train-rrdb: preset tiny-4x, steps 3 to 6 (resuming '")
    assert straight.losses == first.losses + second.losses
    wa, wb = read_weights(straight.checkpoint.weights), read_weights(second.checkpoint.weights)
    assert wa[1]["stage"] == "rrdb" and set(wa[0]) == set(load_rrdb(tmp_path / "a").state_dict())
    assert all(torch.equal(wa[0][k], wb[0][k]) for k in wa[0])
    sa = load_training_checkpoint(straight.checkpoint).state["optimizer"]
    sb = load_training_checkpoint(second.checkpoint).state["optimizer"]
    assert sa["param_groups"][0]["betas"] == (0.9, 0.99)  # the official RRDB recipe's
    for key, state in sa["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["state"][key][name]), f"Adam {name} of parameter {key} differs"


def test_rrdb_stage_learns_and_its_checkpoints_are_not_srflow_ones(photos: Path, tmp_path: Path) -> None:
    result = train(tiny_rrdb(photos, tmp_path / "rrdb", steps=30, cosine_period=30, lr=2e-3), log=quiet)
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses  # L1 falls (measured: to ~0.35 of the start)
    with pytest.raises(CheckpointError, match="is of the rrdb training stage, but this run trains srflow"):
        train(tiny_rrdb(photos, tmp_path / "rrdb", stage="srflow", resume="auto", cosine_period=None), log=quiet)


def test_official_presets_refuse_a_random_rrdb(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before anything is built or written: the error says how to get RRDB weights; from_scratch
    (and the tiny presets) pass the check."""
    config = TrainConfig(data=str(photos), out=str(tmp_path / "run"), preset="df2k-4x", device="cpu")
    with pytest.raises(ConfigError, match=r"preset df2k-4x: every official SRFlow started from a pretrained RRDB.*"):
        train(config, log=quiet)
    with pytest.raises(ConfigError, match="srflow train-rrdb --preset df2k-4x .* --from-scratch starts from a random"):
        train(config.replace(recipe="paper"), log=quiet)
    assert not (tmp_path / "run").exists()

    class Checked(Exception):
        pass

    def stop(self: Trainer) -> None:
        raise Checked

    monkeypatch.setattr(Trainer, "_datasets", stop)  # the step after the check
    for passing in (config.replace(from_scratch=True), config.replace(preset="tiny-4x")):
        with pytest.raises(Checked):
            train(passing, log=quiet)


def _hr_and_lr_folders(photos: Path, root: Path) -> tuple[Path, Path]:
    """HR crops whose LR has an odd side (100x68 -> 25x17) and their LR files (official imresize)."""
    hr_dir, lr_dir = root / "hr", root / "lr"
    hr_dir.mkdir(), lr_dir.mkdir()
    for i, name in enumerate(("astronaut.png", "coffee.png")):
        hr = load_rgb(photos / name)[:, 40 * i : 40 * i + 100, 60 : 60 + 68]
        save_rgb(hr, hr_dir / name)
        save_rgb(make_lr(hr[None], 4)[0], lr_dir / name)
    return hr_dir, lr_dir


@pytest.mark.slow
def test_from_nothing_to_evaluation_through_the_cli(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """train-rrdb, then train from its run folder (RRDB kept frozen, so it must equal the
    pretrained one bitwise), then eval with the dataset's LR files and the RRDB baseline row."""
    common = ["--preset", "tiny-4x", "--data", str(photos), "--steps", "4", "--batch", "4", "--crop", "32"]
    common += ["--no-progress", "--cache-images", "--device", "cpu", "--val-every", "0"]
    assert cli.main(["train-rrdb", *common, "--out", str(tmp_path / "rrdb"), "--cosine-period", "4"]) == 0
    assert "srflow train-rrdb: preset tiny-4x, steps 0 to 4" in capsys.readouterr().err
    flow = ["train", *common, "--out", str(tmp_path / "flow"), "--rrdb-weights", str(tmp_path / "rrdb")]
    assert cli.main([*flow, "--rrdb-freeze-fraction", "1"]) == 0
    assert f"RRDB from {str(tmp_path / 'rrdb')!r}" in capsys.readouterr().err
    pretrained = load_rrdb(tmp_path / "rrdb").state_dict()
    trained = read_weights(tmp_path / "flow" / "checkpoints" / "step-000000004.safetensors")[0]
    assert all(torch.equal(trained["RRDB." + k], v) for k, v in pretrained.items())
    hr_dir, lr_dir = _hr_and_lr_folders(photos, tmp_path)
    args = ["eval", "--checkpoint", str(tmp_path / "flow"), "--rrdb", str(tmp_path / "rrdb"), "--bicubic"]
    args += ["--data", str(hr_dir), "--lr-data", str(lr_dir), "--n", "2", "--device", "cpu"]
    assert cli.main([*args, "--out", str(tmp_path / "eval")]) == 0
    capsys.readouterr()
    with open(tmp_path / "eval" / "metrics.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["astronaut.png", "coffee.png", "mean", "bicubic", "rrdb"]
    assert rows["astronaut.png"]["size"] == "100x68" and rows["astronaut.png"]["nll_bits_px"] == "nan"
    # the RRDB row is the RRDB's own SR of the LR files, measured on uint8
    rrdb = load_rrdb(tmp_path / "rrdb")
    psnrs = []
    for name in ("astronaut.png", "coffee.png"):
        sr = rrdb_sr(rrdb, load_rgb(lr_dir / name)[None])[0]
        sr8 = (sr.clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        hr8 = np.asarray(Image.open(hr_dir / name))
        mse = np.mean((sr8.astype(np.float64) - hr8) ** 2)
        psnrs.append(10 * np.log10(255**2 / mse))
    assert float(rows["rrdb"]["psnr"]) == pytest.approx(np.mean(psnrs), abs=1e-4)  # the CSV keeps 6 digits
    sample = ["sample", "--rrdb", str(tmp_path / "rrdb"), "--out", str(tmp_path / "s"), str(lr_dir / "coffee.png")]
    assert cli.main([*sample, "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["coffee_grid.png", "coffee_rrdb.png"]


def test_validation_on_training_images_warns(photos: Path, tmp_path: Path) -> None:
    config = tiny_rrdb(photos, tmp_path / "run", steps=1, val_every=1, val_images=1, val_crop=32)
    with pytest.warns(UserWarning, match="validation runs on training images .* pass val_data"):
        result = train(config, log=quiet)
    assert set(result.validation) == {"val_psnr", "val_lr_psnr"}
    assert (tmp_path / "run" / "val" / "step-000000001.png").is_file()
    held_out = tmp_path / "held_out"
    held_out.mkdir()
    save_rgb(load_rgb(photos / "chelsea.png")[:, :64, :64], held_out / "x.png")
    before = digest(tmp_path / "run")
    with pytest.warns(UserWarning, match="validation runs on training images"):
        train(config.replace(out=str(tmp_path / "same"), val_data=str(photos) + "/"), log=quiet)
    assert digest(tmp_path / "run") == before
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(config.replace(out=str(tmp_path / "other"), val_data=str(held_out)), log=quiet)


@pytest.mark.slow
def test_rrdb_stage_ddp_two_gloo_ranks_match_one_process(photos: Path, tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m srflow train-rrdb`` (gloo, 2 samples per rank) gives the
    weights of one process with the global batch of 4, up to float32 summation order (adam_eps 1e-3
    as in the SRFlow stage's DDP test, so that rounding does not become whole Adam updates)."""
    single = train(tiny_rrdb(photos, tmp_path / "single", adam_eps=1e-3), log=quiet)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "srflow"]
    cmd += tiny_cli(photos, tmp_path / "ddp", "--adam-eps", "1e-3", "--cosine-period", "2", "--no-dequantize")
    cmd[cmd.index("train")] = "train-rrdb"
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "srflow train-rrdb: preset tiny-4x" in proc.stderr and "2 rank(s) x 2" in proc.stderr
    ddp = read_weights(tmp_path / "ddp" / "checkpoints" / "step-000000006.safetensors")[0]
    ref = read_weights(single.checkpoint.weights)[0]
    worst = max((ddp[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= DDP_ATOL, f"DDP weights differ from the single process by {worst:.2e}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)  # the run's seed: its initial weights
        init = RRDBNet(32, 16, 2, 4, (0, 1)).state_dict()
    moved = max((ref[k] - v).abs().max().item() for k, v in init.items())
    # measured: the two runs differ by 5.2e-8, the RRDB moves by 4.5e-3 in the 6 steps
    assert moved > 10 * DDP_ATOL, f"the RRDB moved by only {moved:.1e} (DDP differs by {worst:.1e}): proves nothing"
