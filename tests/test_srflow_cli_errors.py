"""Every bad input a user can give the ``srflow`` command line ends cleanly: exit code 2, exactly
one ``srflow: error:`` line on stderr naming the flag, what was expected and what arrived, no
traceback, and no file or folder created or changed. Inputs that can be checked without the model
are refused before one is built (SRFlow construction fails the test for those cases).

The cases run ``cli.main`` in-process (the same code path as the ``srflow`` entry point, argparse's
SystemExit included); a few run ``python -m srflow`` to show the same from a real process.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import srflow
from srflow import cli
from srflow.model import SRFlow

REPO = Path(__file__).resolve().parents[1]
CKPT = "step-000000001.safetensors"  # the inputs' tiny-4x training checkpoint

# tiny models on a small shared machine: see the one_thread fixture in conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Inputs of every kind: a tiny-4x checkpoint (untrained: loading is what counts), images, a
    data folder, broken and wrong-kind files."""
    root = tmp_path_factory.mktemp("inputs")
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in SRFlow.from_preset("tiny-4x", seed=0).state_dict().items()}
    save_file(weights, str(root / CKPT), metadata={"preset": "tiny-4x"})
    torch.save(weights, root / "tiny4x.pth")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "lr.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "hr.png")
    Image.fromarray(rng.integers(0, 256, (60, 64, 3), dtype=np.uint8)).save(root / "odd.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(root / "gray.png")
    (root / "data").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "data" / name)
    (root / "bad_data").mkdir()
    shutil.copy(root / "hr.png", root / "bad_data" / "ok.png")
    (root / "bad_data" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    (root / "corrupt.pth").write_bytes(b"not a pickle")
    (root / "photo.webp").write_bytes(b"RIFF....WEBP")
    (root / "notes.txt").write_text("not an image\n")
    (root / "empty").mkdir()
    (root / "bad.yaml").write_text("steps: [1\n")
    (root / "keys.yaml").write_text("batchsize: 4\nstpes: 2\npreset: tiny-4x\n")
    return root


@pytest.fixture(autouse=True)
def _plain_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU as a user has it: conftest sets TRITON_INTERPRET=1 for the kernel tests, under
    which the Triton backend would run here and ``--backend triton`` would not be refused."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def ws(inputs: Path, tmp_path: Path) -> Path:
    """A fresh copy of the inputs for one test (the test snapshots it before and after)."""
    return Path(shutil.copytree(inputs, tmp_path / "ws"))


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse: usage errors, --version
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (with a traceback the assertions see) if an SRFlow is built."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("an SRFlow was built before the arguments were checked")

    monkeypatch.setattr(SRFlow, "__init__", refuse)


def assert_refused(ws: Path, command: str, match: str, capsys: pytest.CaptureFixture) -> None:
    """``command`` ({name} = a path in ``ws``) exits with 2 and one error line containing
    ``match`` (``{name}`` substituted too), and leaves ``ws`` as it was."""
    paths = {p.name.replace(".", "_").replace("-", "_"): str(p) for p in ws.iterdir()}
    paths.update(ws=str(ws), out=str(ws / "out"), missing=str(ws / "missing"), ckpt=paths["step_000000001_safetensors"])
    before = snapshot(ws)
    cwd = os.getcwd()
    os.chdir(ws)  # default output folders (srflow-samples, ...) would land here
    try:
        rc, out, err = run_cli(command.format(**paths).split(), capsys)
    finally:
        os.chdir(cwd)
    assert rc == 2, err
    assert out == "", out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("srflow: error: "), err
    assert match.format(**paths) in lines[0], lines[0]
    assert snapshot(ws) == before


SAMPLE = "sample --checkpoint {ckpt} --out {out} {lr_png}"
TRANSFER = "transfer --checkpoint {ckpt} --out {out} --hr {hr_png}"
EVAL = "eval --checkpoint {ckpt} --out {out} --data {data}"
TRAIN = "train --preset tiny-4x --data {data} --out {out} --crop 32 --batch 2 --steps 1 --device cpu --no-progress"
DEMO = "demo --out {out} --device cpu"
TRAIN_RRDB = TRAIN.replace("train ", "train-rrdb ", 1)
PREPARE = "prepare --data {data} --out {out}"
NO_CUDA = "is built without CUDA; use cpu" if torch.version.cuda is None else "no CUDA device is visible; use cpu"

# (command, expected part of the error line): checked before any model is built
BEFORE_MODEL = [
    # the command line itself
    ("", "the following arguments are required: COMMAND"),
    ("bogus", "argument COMMAND: invalid choice: 'bogus'"),
    (SAMPLE + " --bogus", "unrecognized arguments: --bogus"),
    # --device, every command
    *[
        (c + " --device gpu", "--device: expected cpu, cuda or cuda:N, got 'gpu'")
        for c in (SAMPLE, TRANSFER, EVAL, DEMO)
    ],
    *[(c + " --device cuda:99", "--device: got 'cuda:99', but") for c in (SAMPLE, TRANSFER, EVAL, DEMO)],
    (TRAIN + " --device gpu", "device: expected cpu, cuda or cuda:N, got 'gpu'"),
    (TRAIN + " --device cuda:99", "device: got 'cuda:99', but"),
    # --backend, every command that takes it
    *[(c + " --device cpu --backend triton", "backend 'triton' cannot run on cpu") for c in (SAMPLE, TRANSFER, EVAL)],
    (TRAIN + " --backend triton", "backend 'triton' cannot run on cpu"),
    (SAMPLE + " --backend fast", "argument --backend: invalid choice: 'fast'"),
    (TRAIN + " --backend fast", "backend: expected one of"),
    # --preset and the model source
    (SAMPLE + " --preset tiny-2x", "argument --preset: invalid choice: 'tiny-2x'"),
    (TRAIN + " --preset tiny-2x", "preset: unknown name 'tiny-2x'"),
    ("sample --out {out} {lr_png}", "pass exactly one of --checkpoint"),
    ("sample --checkpoint {ckpt} --official {tiny4x_pth} --preset tiny-4x {lr_png}", "pass exactly one of"),
    ("sample --official {tiny4x_pth} --out {out} {lr_png}", "--official needs --preset"),
    # numbers out of range
    *[(SAMPLE + f" --n {v}", f"argument --n: expected a positive integer, got {v}") for v in ("0", "-1")],
    (SAMPLE + " --n two", "argument --n: invalid int value: 'two'"),
    *[
        (c + f" --temperature {v}", f"argument --temperature: expected a finite number >= 0, got {v}")
        for c in (SAMPLE, EVAL)
        for v in ("nan", "inf", "-1")
    ],
    (SAMPLE + " --temperature 0.9 -0.5", "argument --temperature: expected a finite number >= 0, got -0.5"),
    *[
        (c + f" --min-scale {v}", f"argument --min-scale: expected a number in (0, 1], got {v}")
        for c in (SAMPLE, TRANSFER, EVAL)
        for v in ("-0.1", "0", "1.5", "nan")
    ],
    *[
        (c + f" --seed {v}", f"argument --seed: expected an integer in [0, 2**63), got {v}")
        for c in (SAMPLE, EVAL, DEMO)
        for v in ("-1", str(2**63))
    ],
    *[
        (EVAL + f" --{f} {v}", f"argument --{f}: expected a positive integer, got {v}")
        for f in ("max-images", "crop", "n")
        for v in ("0", "-1")
    ],
    *[(DEMO + f" --{f} 0", f"argument --{f}: expected a positive integer, got 0") for f in ("steps", "threads")],
    *[
        (DEMO + f" --minutes {v}", f"argument --minutes: expected a positive number of minutes, got {v}")
        for v in ("0", "-1", "nan", "inf")
    ],
    # training options (flags and YAML share resolve_config; the messages name the option)
    *[
        (TRAIN + f" --{f} {v}", f"{f.replace('-', '_')}: expected a positive integer, got {v}")
        for f, v in [
            ("steps", "-1"),
            ("steps", "0"),
            ("batch", "0"),
            ("save-every", "-5"),
            ("keep-last", "0"),
            ("val-images", "0"),
            ("log-every", "0"),
            ("max-nonfinite", "0"),
        ]
    ],
    (TRAIN + " --crop 30", "crop: 30 is not a multiple of 8"),
    (TRAIN + " --crop 0", "crop: expected a positive integer, got 0"),
    (TRAIN + " --val-crop 12", "val_crop: 12 is not a multiple of 8"),
    (TRAIN + " --val-crop 0", "val_crop: expected a positive multiple of 8 or none, got 0"),
    *[
        (TRAIN + f" --{f} {v}", f"{f.replace('-', '_')}: expected a positive number, got {v}")
        for f in ("lr", "lr-rrdb", "adam-eps")
        for v in ("-1", "0", "nan", "inf")
    ],
    *[
        (TRAIN + f" --{f} {v}", f"{f.replace('-', '_')}: expected a number >= 0, got {v}")
        for f in ("l1-weight", "weight-decay")
        for v in ("-1", "nan", "inf")
    ],
    *[
        (TRAIN + f" --{f} {v}", f"{f.replace('-', '_')}: expected a positive number or none, got {v}")
        for f in ("grad-clip-value", "grad-clip-norm", "max-minutes")
        for v in ("-1", "0", "nan")
    ],
    (TRAIN + " --val-every -1", "val_every: expected >= 0 (0 = never), got -1"),
    (TRAIN + " --seed -1", "seed: expected an integer in [0, 2**63), got -1"),
    (TRAIN + " --workers -1", "workers: expected >= 0, got -1"),
    (TRAIN + " --stop-after 0", "stop_after: expected a positive step, got 0"),
    (TRAIN + " --keep-every 0", "keep_every"),
    (TRAIN + " --rrdb-freeze-fraction 2", "rrdb_freeze_fraction: expected a value in [0, 1], got 2.0"),
    (TRAIN + " --lr-gamma nan", "lr_gamma: expected a value in (0, 1], got nan"),
    (TRAIN + " --lr-milestones 0.5 1.5", "lr_milestones: expected fractions in (0, 1]"),
    (TRAIN + " --betas 1 0.9", "betas: expected values in [0, 1)"),
    (TRAIN + " --betas 0.9", "argument --betas: expected 2 arguments"),
    (TRAIN + " --val-temperatures 0 nan", "val_temperatures: expected finite values >= 0"),
    (TRAIN + " --steps 1.5", "argument --steps: invalid int value: '1.5'"),
    (TRAIN + " --rrdb-weights {tiny4x_pth} --init-official {tiny4x_pth}", "pass at most one of rrdb_weights and init"),
    ("train --preset tiny-4x --out {out}", "data: a folder of HR training images is required"),
    # recipes, the RRDB stage and its schedule
    (TRAIN + " --recipe papper", "recipe: expected one of released, paper, got 'papper'"),
    (TRAIN + " --stage flow", "stage: expected one of srflow, rrdb, got 'flow'"),
    (TRAIN + " --lr-schedule linear", "lr_schedule: expected multistep or cosine, got 'linear'"),
    (TRAIN + " --lr-schedule cosine --cosine-period 0", "cosine_period: expected a positive number of iterations"),
    (TRAIN + " --cosine-restarts -1", "cosine_restarts: expected >= 0, got -1"),
    (TRAIN_RRDB + " --lr-min 1", "lr_min: expected a value in [0, lr = 0.0002), got 1.0"),
    (TRAIN_RRDB + " --dequantize", "dequantize: the RRDB stage trains an L1 regression"),
    (TRAIN_RRDB + " --rrdb-freeze-fraction 0.5", "rrdb_freeze_fraction: the RRDB stage trains the RRDB"),
    (TRAIN_RRDB + " --l1-weight 0.1", "l1_weight: the RRDB stage's loss is L1 already"),
    (TRAIN_RRDB + " --init-official {tiny4x_pth}", "init_official: the RRDB stage starts from rrdb_weights"),
    (TRAIN_RRDB + " --stage srflow", "--stage: train-rrdb trains the RRDB stage, got --stage srflow"),
    # an official preset without pretrained weights (the check precedes the data and the model)
    (
        "train --data {data} --out {out} --device cpu --no-progress",
        "preset df2k-4x: every official SRFlow started from a pretrained RRDB, and this run has none. Train one "
        "with `srflow train-rrdb --preset df2k-4x",
    ),
    # prepare (image store, crop bank)
    (PREPARE + " --bank 2", "scale: a crop bank needs the SR scale of its LR (e.g. 4), got None"),
    (PREPARE + " --bank 2 --scale 4 --crop 30", "crop: expected a positive multiple of the scale 4, got 30"),
    (PREPARE + " --bank -1", "argument --bank: expected a number of crops per image >= 0, got -1"),
    (PREPARE + " --scale 3", "argument --scale: invalid choice: 3"),
    (
        PREPARE + " --bank 1 --scale 4 --crop 128",
        "a.png: 64x64 is smaller than the 128x128 crop",
    ),
    (PREPARE.replace("{data}", "{missing}"), "data folder '{missing}' does not exist"),
    (PREPARE.replace("{data}", "{bad_data}"), "broken.png: cannot read the image"),
    (PREPARE.replace("{out}", "{hr_png}"), "--out: '{hr_png}' is a file; expected a folder"),
    # --config
    (TRAIN + " --config {empty}", "config file '{empty}' is a folder; expected a YAML file"),
    (TRAIN + " --config {missing}", "config file '{missing}' does not exist"),
    (TRAIN + " --config {bad_yaml}", "not valid YAML"),
    (
        TRAIN + " --config {keys_yaml}",
        "unknown options 'batchsize' (did you mean 'batch'?), 'stpes' (did you mean 'steps'?)",
    ),
    # --out: a file, or under a file
    *[
        (c.replace("{out}", "{hr_png}"), "--out: '{hr_png}' is a file; expected a folder")
        for c in (SAMPLE, TRANSFER, EVAL, DEMO)
    ],
    (TRAIN.replace("{out}", "{hr_png}"), "out: '{hr_png}' is a file; expected a folder"),
    *[
        (c.replace("{out}", "{hr_png}/run"), "the folder '{hr_png}/run' cannot be created: '{hr_png}' is a file")
        for c in (SAMPLE, EVAL, DEMO, TRAIN)
    ],
    # image and data paths of the wrong kind
    (SAMPLE.replace("{lr_png}", "{missing}"), "image: '{missing}' does not exist"),
    (SAMPLE.replace("{lr_png}", "{corrupt_png}"), "corrupt.png: cannot read the image"),
    (SAMPLE.replace("{lr_png}", "{photo_webp}"), "image: '{photo_webp}' is not a .png/.jpg/.jpeg image"),
    (SAMPLE.replace("{lr_png}", "{empty}"), "data folder '{empty}' holds no .png/.jpg/.jpeg images"),
    (TRANSFER.replace("{hr_png}", "{missing}"), "--hr: '{missing}' does not exist"),
    (TRANSFER.replace("{hr_png}", "{data}"), "--hr: '{data}' is a folder; expected a .png/.jpg/.jpeg image file"),
    (TRANSFER.replace("{hr_png}", "{corrupt_png}"), "corrupt.png: cannot read the image"),
    (TRANSFER + " --lr {data}", "--lr: '{data}' is a folder"),
    (TRANSFER + " --hr-lr {notes_txt}", "--hr-lr: '{notes_txt}' is not a .png/.jpg/.jpeg image"),
    (EVAL.replace("{data}", "{missing}"), "data folder '{missing}' does not exist"),
    (EVAL.replace("{data}", "{hr_png}"), "data folder '{hr_png}' is a file; expected a folder"),
    (EVAL.replace("{data}", "{empty}"), "data folder '{empty}' holds no .png/.jpg/.jpeg images"),
    (EVAL.replace("{data}", "{bad_data}"), "broken.png: cannot read the image"),
    (TRAIN.replace("{data}", "{missing}"), "data folder '{missing}' does not exist"),
    (TRAIN.replace("{data}", "{hr_png}"), "data folder '{hr_png}' is a file"),
    (TRAIN.replace("{data}", "{bad_data}"), "broken.png: cannot read the image"),
    (TRAIN + " --val-data {missing}", "data folder '{missing}' does not exist"),
    (TRAIN + " --val-data {hr_png}", "data folder '{hr_png}' is a file"),
    (TRAIN + " --lr-data {missing}", "LR folder '{missing}' does not exist"),
    (TRAIN + " --resume {missing}.state.pt", "checkpoint: no such file '{missing}.state.pt'"),
    # checkpoint paths of the wrong kind (refused before the model is built)
    (SAMPLE.replace("{ckpt}", "{missing}.safetensors"), "checkpoint: no such file '{missing}.safetensors'"),
    (SAMPLE.replace("{ckpt}", "{empty}"), "no complete training checkpoint"),
    (SAMPLE.replace("{ckpt}", "{corrupt_safetensors}"), "could not be read as safetensors"),
    (SAMPLE.replace("{ckpt}", "{hr_png}"), "expected a training checkpoint"),
    (SAMPLE.replace("{ckpt}", "{ckpt} --preset tiny-8x"), "was trained with preset 'tiny-4x', not 'tiny-8x'"),
    (
        SAMPLE.replace("--checkpoint {ckpt}", "--official {empty} --preset tiny-4x"),
        "is a folder; expected a state_dict",
    ),
    (SAMPLE.replace("--checkpoint {ckpt}", "--official {missing} --preset tiny-4x"), "checkpoint: no such file"),
    (
        SAMPLE.replace("--checkpoint {ckpt}", "--official {corrupt_pth} --preset tiny-4x"),
        "could not be read as a PyTorch",
    ),
]

# checked after the model is built (they need its scale or its weights), still before any write
AFTER_MODEL = [
    (EVAL + " --crop 12", "crop: expected a positive multiple of 8 (2 x scale 4: the LR must have even sides), got 12"),
    (EVAL + " --lr-data {missing}", "LR folder '{missing}' does not exist"),
    (SAMPLE + " --min-scale 0.00001", "min_scale: expected a value in (0.0001, 1.0001), got 1e-05"),
    (
        SAMPLE.replace("--checkpoint {ckpt}", "--official {tiny4x_pth} --preset tiny-8x"),
        "is a tiny-4x model checkpoint, not tiny-8x",
    ),
    (TRAIN + " --rrdb-weights {ckpt}", "is a tiny-4x model checkpoint, not tiny-4x"),
    (TRAIN + " --init-official {empty}", "is a folder; expected a state_dict"),
    (TRAIN + " --init-official {missing}.pth", "checkpoint: no such file '{missing}.pth'"),
    (TRAIN + " --rrdb-weights {corrupt_pth}", "could not be read as a PyTorch"),
    (TRANSFER.replace("{hr_png}", "{odd_png}"), "60x64 cannot be encoded; HR sides must be multiples of 8"),
    # --rrdb: the RRDB baseline
    (SAMPLE + " --rrdb {missing}.pth", "checkpoint: no such file '{missing}.pth'"),
    (EVAL + " --rrdb {ckpt}", "is a tiny-4x model checkpoint, not tiny-4x"),
    ("sample --rrdb {tiny4x_pth} --out {out} {lr_png}", "name no preset; pass the preset they were trained with"),
    ("sample --rrdb {tiny4x_pth} --preset tiny-4x --out {out} {lr_png}", "is a tiny-4x model checkpoint"),
]


def _id(case: tuple[str, str]) -> str:
    return case[0].replace("{", "").replace("}", "")[:70] or "no-command"


@pytest.mark.parametrize(("command", "match"), BEFORE_MODEL, ids=[_id(c) for c in BEFORE_MODEL])
def test_refused_before_the_model(
    ws: Path, command: str, match: str, capsys: pytest.CaptureFixture, no_model: None
) -> None:
    assert_refused(ws, command, match, capsys)


@pytest.mark.parametrize(("command", "match"), AFTER_MODEL, ids=[_id(c) for c in AFTER_MODEL])
def test_refused_before_anything_is_written(ws: Path, command: str, match: str, capsys: pytest.CaptureFixture) -> None:
    assert_refused(ws, command, match, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA")
@pytest.mark.parametrize("command", [SAMPLE, TRANSFER, EVAL, DEMO, TRAIN])
def test_cuda_without_cuda(ws: Path, command: str, capsys: pytest.CaptureFixture, no_model: None) -> None:
    assert_refused(ws, command.replace("--device cpu", "") + " --device cuda", NO_CUDA, capsys)


# ------------------------------------------------------------------------------------ real processes


def _srflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "srflow", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_version(tmp_path: Path) -> None:
    proc = _srflow("--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == f"srflow {srflow.__version__}\n", proc


def test_errors_from_a_real_process(ws: Path) -> None:
    before = snapshot(ws)
    proc = _srflow("demo", "--device", "gpu", "--out", "d", cwd=ws)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "srflow: error: --device: expected cpu, cuda or cuda:N, got 'gpu'\n", proc.stderr
    assert snapshot(ws) == before


# ------------------------------------------------------------------------------------ warnings


def test_warnings_are_one_clean_line_each_once(ws: Path, capsys: pytest.CaptureFixture) -> None:
    """A grayscale HR in transfer (read twice: as the HR and for its LR) and skipped files in a
    folder of LR images: one ``srflow: warning:`` line each, no source lines."""
    model = ["--checkpoint", str(ws / CKPT)]
    rc, _, err = run_cli(["transfer", *model, "--hr", str(ws / "gray.png"), "--out", str(ws / "t")], capsys)
    assert rc == 0, err
    assert err.splitlines() == [f"srflow: warning: {ws / 'gray.png'}: L image converted to RGB"]
    folder = ws / "lr_folder"
    folder.mkdir()
    shutil.copy(ws / "lr.png", folder)
    for name in ("x.webp", "y.gif", "z.tiff", "w.bmp"):
        shutil.copy(ws / "photo.webp", folder / name)
    (folder / ".DS_Store").write_bytes(b"")  # hidden files are skipped silently
    rc, out, err = run_cli(["sample", *model, "--n", "1", "--out", str(ws / "s"), str(folder)], capsys)
    assert rc == 0, err
    assert err.splitlines() == [
        f"srflow: warning: data folder {str(folder)!r}: skipped 4 file(s) that are not .png/.jpg/.jpeg images: "
        "w.bmp, x.webp, y.gif and 1 more"
    ]
    assert sorted(p.name for p in (ws / "s").iterdir()) == ["lr_grid.png", "lr_t0.90_0.png"]


def test_temperature_zero_writes_one_sample(ws: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["sample", "--checkpoint", str(ws / CKPT), "--n", "3", "--temperature", "0", "--out", str(ws / "s")]
    rc, out, err = run_cli([*args, str(ws / "lr.png")], capsys)
    assert rc == 0, err
    assert err.splitlines() == [
        "srflow: warning: temperature 0 is deterministic: writing one sample per image for it, not 3 identical ones"
    ]
    assert sorted(p.name for p in (ws / "s").iterdir()) == ["lr_grid.png", "lr_t0.00_0.png"]
    assert "wrote 2 images" in out
