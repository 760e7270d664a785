"""The ``srflow`` command line (also ``python -m srflow``): prepare, train-rrdb, train, sample,
transfer, eval, demo.

It only parses arguments and calls :func:`srflow.store.prepare_store`, :func:`srflow.train.train`,
the functions of :mod:`srflow.infer` and :func:`srflow.demo.run_demo`. Errors in the inputs (configuration, data,
checkpoints, flags) end with exit code 2 and a one-line ``srflow: error: ...`` message, and every
input that can be checked without running the model is checked before anything is loaded or
written; a training run stopped by non-finite losses ends with exit code 3; Ctrl-C (SIGINT) with 130 and
SIGTERM with 143, after the training library saved the last finished step (it says where).
``--debug`` (or ``SRFLOW_DEBUG=1``) shows the traceback instead. Warnings are printed as one
``srflow: warning: ...`` line each, once.

    srflow prepare --data DF2K_HR --out DF2K_store [--bank 47 --scale 4]
    srflow train-rrdb --preset df2k-4x --data DF2K_store --out runs/rrdb4x
    srflow train --preset df2k-4x --data DF2K_store --rrdb-weights runs/rrdb4x --out runs/df2k4x [--config my.yaml]
    torchrun --nproc-per-node 4 -m srflow train --preset df2k-4x --data ... --batch 16
    srflow sample --checkpoint runs/df2k4x --n 5 --temperature 0.9 --out sr/ lr1.png lr2.png
    srflow transfer --checkpoint runs/df2k4x --hr reference.png --lr other_lr.png --out edits/
    srflow eval --checkpoint runs/df2k4x --data DIV2K_valid_HR --lr-data DIV2K_valid_LR_x4 --rrdb runs/rrdb4x
    srflow demo
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Sequence

import flowkernels as fk

from . import __version__
from .config import (
    MAX_SEED,
    ConfigError,
    TrainConfig,
    check_output_folder,
    config_from_dict,
    load_config,
    option_specs,
    resolve_config,
    resolve_device,
)
from .presets import PRESETS

if typing.TYPE_CHECKING:
    from .model import SRFlow
    from .rrdb import RRDBNet

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one ``srflow: error:`` line, like every other error (the
    usage is one ``--help`` away)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"srflow: error: {message} (see {self.prog} --help)\n")


def _checked(kind: type, expected: str, ok: Callable[[typing.Any], bool]) -> Callable[[str], object]:
    """An argparse type: ``kind(text)`` where ``ok`` holds for it, else an error saying what was
    expected (argparse names the flag), so that bad values stop before any model is loaded."""

    def convert(text: str) -> object:
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert


_COUNT = _checked(int, "a positive integer", lambda v: v >= 1)
_SEED = _checked(int, "an integer in [0, 2**63)", lambda v: 0 <= v < MAX_SEED)
_TEMPERATURE = _checked(float, "a finite number >= 0", lambda v: 0 <= v < math.inf)


def _none_or(kind: type) -> typing.Callable[[str], object]:
    def convert(text: str) -> object:
        if text.lower() in ("none", "null"):
            return None
        return kind(text)

    convert.__name__ = kind.__name__
    return convert


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (defaults suppressed: unset flags leave the YAML/defaults)."""
    group = parser.add_argument_group("training options (override the config file; defaults in brackets)")
    for spec in option_specs():
        flag = "--" + spec.name.replace("_", "-")
        help_text = f"{spec.help} [{spec.default!r}]".replace("%", "%%")
        if spec.base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif spec.nargs is not None:
            group.add_argument(
                flag, type=spec.base, nargs=spec.nargs, default=argparse.SUPPRESS, help=help_text, metavar="X"
            )
        else:
            kind = _none_or(spec.base) if spec.optional else spec.base
            group.add_argument(
                flag, type=kind, default=argparse.SUPPRESS, help=help_text, metavar=spec.base.__name__.upper()
            )


def _add_model_source(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", help="training checkpoint (.safetensors/.state.pt) or run folder (newest)")
    parser.add_argument("--official", help="official SRFlow .pth (needs --preset)")
    parser.add_argument(
        "--preset", choices=list(PRESETS), help="model preset (from the checkpoint's metadata if omitted)"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument(
        "--backend", default="auto", choices=[*fk.BACKENDS, "auto"], help="flowkernels backend (default: auto)"
    )
    parser.add_argument(
        "--min-scale",
        type=_checked(float, "a number in (0, 1]", lambda v: 0 < v <= 1),
        default=None,
        help="floor coupling scales when decoding, in (0, 1] (NaN fix, e.g. 0.1)",
    )


def _add_rrdb_source(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--rrdb",
        help=f"{what}: an srflow train-rrdb run folder or checkpoint, or an RRDB state_dict (e.g. RRDB_DF2K_4X.pth)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``srflow`` (subcommands prepare, train-rrdb, train, sample, transfer,
    eval, demo)."""
    parser = _Parser(
        prog="srflow", description="SRFlow super-resolution on flowkernels: train, sample, transfer, evaluate."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "prepare",
        help="decode a folder of HR images once into a memory-mapped store (optionally with the official crop bank)",
    )
    p.add_argument("--data", required=True, help="folder of HR PNG/JPEG images")
    p.add_argument("--out", required=True, help="folder of the store (train and eval take it as --data)")
    p.add_argument(
        "--bank",
        type=_checked(int, "a number of crops per image >= 0", lambda v: v >= 0),
        default=0,
        help="also the official fixed crop bank: N random crops per image with their LR (official 47) [0: none]",
    )
    p.add_argument("--crop", type=_COUNT, default=160, help="bank crop size [160]")
    p.add_argument("--scale", type=int, choices=[4, 8], help="SR scale of the bank's LR (needed with --bank)")
    p.add_argument("--seed", type=_SEED, default=10, help="seed of the bank's crop positions [10]")

    recipe_note = (
        "Recipes (--recipe): released (default: the RRDB trained from step 1 and no dequantisation noise, "
        "as the released code trained the published models) or paper (RRDB frozen for the first half, noise on)."
    )
    p = sub.add_parser(
        "train",
        help="train SRFlow on HR images (official recipe; recipe 'released' by default)",
        description="Train SRFlow. " + recipe_note + " Official presets need --rrdb-weights (from srflow "
        "train-rrdb) or --init-official, or --from-scratch.",
    )
    p.add_argument("--config", help="YAML file of training options (keys as below, with _ or -)")
    _add_config_flags(p)

    p = sub.add_parser(
        "train-rrdb",
        help="pretrain the RRDB alone as an L1 super-resolver (the official RRDB recipe); feeds train --rrdb-weights",
        description="The official RRDB pretraining: L1, Adam lr 2e-4 betas (0.9, 0.99), cosine annealing to 1e-7 "
        "restarted every 50k iterations (3 restarts), batch 16, 160x160 crops, flips (CelebA: rotations); 1M "
        "iterations at 4x, 200k at 8x. The same options as train (--stage is rrdb).",
    )
    p.add_argument("--config", help="YAML file of training options (e.g. srflow/configs/df2k-4x-rrdb.yaml)")
    _add_config_flags(p)

    p = sub.add_parser("sample", help="super-resolve LR images (any size) at a temperature")
    _add_model_source(p)
    _add_rrdb_source(p, "also (or only) the RRDB's own SR, <stem>_rrdb.png")
    p.add_argument("images", nargs="+", help="LR images or folders of them")
    p.add_argument(
        "--temperature", type=_TEMPERATURE, nargs="+", default=[0.9], help="temperature(s) [0.9]; 0 gets one sample"
    )
    p.add_argument("--n", type=_COUNT, default=5, help="samples per image and temperature above 0 [5]")
    p.add_argument("--seed", type=_SEED, default=0, help="sample k uses seed + k [0]")
    p.add_argument("--out", default="srflow-samples", help="output folder [srflow-samples]")

    p = sub.add_parser("transfer", help="content transfer / LR-consistent editing: encode an HR, decode with an LR")
    _add_model_source(p)
    p.add_argument("--hr", required=True, help="HR image to encode (a reference, or an edited image)")
    p.add_argument("--hr-lr", help="the HR's LR image (default: its bicubic downscale)")
    p.add_argument("--lr", help="LR image to decode the latents with (default: the HR's LR)")
    p.add_argument("--out", default="srflow-transfer", help="output folder [srflow-transfer]")

    p = sub.add_parser(
        "eval",
        help="PSNR, SSIM, LR-PSNR, LPIPS, diversity and NLL on HR images (SRFlow's test protocol)",
        description="SRFlow's test protocol (test.py, Measure.py): the LR files of --lr-data (or the official "
        "uint8 imresize of the HR), whole images, odd LR reflect-padded and the SR cropped back, samples at "
        "0.9, metrics on uint8 RGB without border crop, LR-PSNR of the uint8-imresized SR against the LR.",
    )
    _add_model_source(p)
    _add_rrdb_source(p, "add the RRDB's own SR as a baseline row (e.g. the RRDB the SRFlow started from)")
    p.add_argument("--data", required=True, help="folder of HR images (or an image store)")
    p.add_argument("--lr-data", help="folder of the dataset's LR images, same names (default: made from the HR)")
    p.add_argument("--n", type=_COUNT, default=5, help="samples per image (the official test: 1) [5]")
    p.add_argument("--temperature", type=_TEMPERATURE, default=0.9, help="sampling temperature [0.9]")
    p.add_argument("--seed", type=_SEED, default=0, help="seed of the samples and the NLL noise [0]")
    p.add_argument("--max-images", type=_COUNT, help="only the first N images")
    p.add_argument(
        "--crop", type=_COUNT, help="centre crop of at most this size, a multiple of 2 x scale (default: whole images)"
    )
    p.add_argument(
        "--dequantize",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="NLL with dequantisation noise (+5 bits/px; the paper recipe's training loss) [off]",
    )
    p.add_argument("--bicubic", action="store_true", help="add a bicubic-upscaling baseline row")
    p.add_argument("--out", default="srflow-eval", help="output folder for metrics.csv [srflow-eval]")

    p = sub.add_parser("demo", help="train a small model on bundled photos, then sample and evaluate")
    p.add_argument("--out", default="srflow-demo", help="output folder [srflow-demo]")
    p.add_argument(
        "--minutes",
        type=_checked(float, "a positive number of minutes", lambda v: 0 < v < math.inf),
        help="training time budget (default: 2.5 on CPU, 5 on CUDA)",
    )
    p.add_argument("--steps", type=_COUNT, help="training steps (default: by device)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--seed", type=_SEED, default=0, help="seed [0]")
    p.add_argument("--threads", type=_COUNT, help="CPU threads (default: all cores but one)")
    return parser


def _train_config(args: argparse.Namespace) -> TrainConfig:
    """The config file (or the defaults) with the flags given on the command line on top, checked
    (resolve_config: every field, the output folder, the device and the backend) before training
    loads anything."""
    config = load_config(args.config) if args.config else TrainConfig()
    names = {spec.name for spec in option_specs()}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if args.command == "train-rrdb":
        if overrides.get("stage", "rrdb") != "rrdb":
            raise ConfigError(f"--stage: train-rrdb trains the RRDB stage, got --stage {overrides['stage']}")
        overrides["stage"] = "rrdb"
    return resolve_config(config_from_dict(overrides, "command line", base=config))


def _preflight(args: argparse.Namespace) -> None:
    """The checks of an inference command or the demo that need no model, before one is loaded
    and before anything is written: the device, the backend on it, the output folder, the inputs."""
    device = resolve_device(args.device, "--device")
    check_output_folder(args.out, "--out")
    if args.command == "demo":
        return
    fk.check_backend_available(args.backend, device)
    from .data import check_image_file, list_images  # noqa: PLC0415 (Pillow, for the commands that use it)
    from .infer import expand_images  # noqa: PLC0415 (the inference stack, for the commands that use it)

    if args.command == "transfer":
        for flag in ("hr", "hr_lr", "lr"):
            if getattr(args, flag) is not None:
                check_image_file(getattr(args, flag), "--" + flag.replace("_", "-"))
    else:  # every image probed (header, PNG CRCs): a broken one is named before the model loads
        expand_images(args.images if args.command == "sample" else list_images(args.data))


def _model(args: argparse.Namespace) -> SRFlow | None:
    """The SRFlow the flags name (None for ``sample --rrdb`` without one), after :func:`_preflight`."""
    # The flag combinations are checked here, in flag names; load_model checks the same in
    # argument names for API callers.
    if args.command == "sample" and args.rrdb is not None and args.checkpoint is None and args.official is None:
        _preflight(args)
        return None
    if (args.checkpoint is None) == (args.official is None):
        raise ValueError("pass exactly one of --checkpoint (a training checkpoint) and --official (an official .pth)")
    if args.official is not None and args.preset is None:
        raise ValueError(f"--official needs --preset (one of {', '.join(PRESETS)})")
    _preflight(args)
    from .infer import load_model  # noqa: PLC0415 (the inference stack, for the commands that use it)

    return load_model(args.checkpoint, args.official, args.preset, args.device, args.backend)


def _rrdb(args: argparse.Namespace, model: SRFlow | None) -> RRDBNet | None:
    """The RRDB of ``--rrdb`` (its preset: the SRFlow's, else its metadata's or ``--preset``)."""
    if args.rrdb is None:
        return None
    from .infer import load_rrdb  # noqa: PLC0415 (the inference stack, for the commands that use it)

    return load_rrdb(args.rrdb, model.preset.name if model is not None else args.preset, args.device)


def _run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        check_output_folder(args.out, "--out")
        from .store import prepare_store  # noqa: PLC0415 (Pillow, only for this command)

        store = prepare_store(args.data, args.out, args.bank, args.crop, args.scale, args.seed)
        bank = f" and a bank of {store.bank.count} {args.crop}x{args.crop} crops at {args.scale}x" if store.bank else ""
        print(f"wrote {len(store)} decoded images{bank} to {args.out}; train and eval take it as --data")
        return 0
    if args.command in ("train", "train-rrdb"):
        config = _train_config(args)
        from .train import train  # noqa: PLC0415 (the training stack, only for this command)

        result = train(config)
        where = str(result.checkpoint.weights) if result.checkpoint else "none"
        if os.environ.get("RANK", "0") == "0":
            print(f"trained to step {result.step} ({result.stopped}); checkpoint: {where}")
        return 0
    if args.command == "sample":
        from .infer import sample_images  # noqa: PLC0415 (the inference stack, only for this command)

        model = _model(args)
        paths = sample_images(
            model, args.images, args.out, args.temperature, args.n, args.seed, args.min_scale, rrdb=_rrdb(args, model)
        )
        print(f"wrote {len(paths)} images to {args.out} (grids: *_grid.png)")
        return 0
    if args.command == "transfer":
        from .infer import transfer  # noqa: PLC0415 (the inference stack, only for this command)

        paths = transfer(_model(args), args.hr, args.out, args.lr, args.hr_lr, args.min_scale)
        print("wrote " + ", ".join(map(str, paths)))
        return 0
    if args.command == "eval":
        from .infer import evaluate, format_table  # noqa: PLC0415 (the inference stack, only for this command)

        model = _model(args)
        result = evaluate(
            model,
            args.data,
            args.lr_data,
            args.out,
            n=args.n,
            temperature=args.temperature,
            seed=args.seed,
            dequantize=args.dequantize,
            max_images=args.max_images,
            min_scale=args.min_scale,
            crop=args.crop,
            bicubic_baseline=args.bicubic,
            rrdb=_rrdb(args, model),
        )
        print(format_table(result.rows, result.columns))
        print(f"wrote {result.csv_path}")
        return 0
    if args.command == "demo":
        _preflight(args)
        from .demo import run_demo  # noqa: PLC0415 (the whole stack, only for this command)

        run_demo(
            args.out, minutes=args.minutes, steps=args.steps, device=args.device, seed=args.seed, threads=args.threads
        )
        return 0
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects unknown commands


def _one_line(exc: BaseException | Warning | str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and len(lines) > 1:  # re-raised from a DataLoader worker
        return lines[-1]
    return lines[0] + (" [...]" if len(lines) > 1 else "")


@contextlib.contextmanager
def _warning_lines(prefix: str) -> Iterator[None]:
    """Show each warning as one ``<prefix>: warning: ...`` line, once per text (not Python's
    "file:line: Category" with the source line, which repeats when two call sites warn alike).
    The filters stay as they are: what Python hides stays hidden."""
    shown: set[str] = set()

    def show(message: Warning | str, *_: object, **__: object) -> None:
        line = f"{prefix}: warning: {_one_line(message)}"
        if line not in shown:
            shown.add(line)
            print(line, file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``srflow`` command line; returns the exit code (0 ok, 2 bad input, 3 diverged)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # After parsing, so that --help and usage errors do not load the training stack (Pillow, ...).
    from .official_checkpoint import CheckpointError  # noqa: PLC0415
    from .train import NonFiniteTrainingError  # noqa: PLC0415

    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    prefix = f"srflow (rank {rank})" if rank is not None else "srflow"
    with _warning_lines(prefix):
        if args.debug or os.environ.get("SRFLOW_DEBUG") == "1":
            return _run(args)
        try:
            return _run(args)
        except NonFiniteTrainingError as exc:
            print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_NONFINITE
        except (ConfigError, CheckpointError, ValueError, TypeError, OSError, fk.BackendUnavailableError) as exc:
            print(f"{prefix}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
