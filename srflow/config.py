"""Training options: :class:`TrainConfig` (every option of a run), its YAML form and its validation.

An option is declared once, as a field of :class:`TrainConfig` with its type, default and help.
:func:`option_specs` is the one reading of those type hints: the YAML/dict coercion here and the
``srflow train`` flags (:mod:`srflow.cli`) both use it. Option types are bool, int, float, str,
``X | None`` of those, and tuples of floats (``tuple[float, float]`` a pair, ``tuple[float, ...]``
one or more). Importing this module needs neither torch nor yaml (the CLI builds its parser from it).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .presets import PRESETS, get_preset

if typing.TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_RECIPE",
    "MAX_SEED",
    "OFFICIAL_PRESETS",
    "OFFICIAL_RECIPE",
    "RECIPES",
    "RRDB_RECIPE",
    "STAGES",
    "TRAJECTORY_FIELDS",
    "ConfigError",
    "OptionSpec",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "load_config",
    "check_output_folder",
    "option_specs",
    "resolve_config",
    "resolve_device",
]

# Seeds go to torch.Generator.manual_seed, which takes 64-bit values; non-negative 63-bit ones
# keep seed + k (sample k) and the derived per-item seeds in range.
MAX_SEED = 2**63

# scale -> (global batch, Adam learning rate) of the official SRFlow configs
OFFICIAL_RECIPE = {4: (12, 2.5e-4), 8: (16, 5e-4)}
STAGES = ("srflow", "rrdb")
# The two SRFlow recipes (docs/srflow.md, "Recipes"): what differs between the released code and the
# paper. "released" is the default: it is what produced the published checkpoints.
RECIPES = {
    "released": {"rrdb_freeze_fraction": 0.0, "dequantize": False},
    "paper": {"rrdb_freeze_fraction": 0.5, "dequantize": True},
}
DEFAULT_RECIPE = "released"
# The official RRDB pretraining (configs RRDB_{DF2K_4X,DF2K_8X,CelebA_8X}.yml): L1, Adam lr 2e-4 with
# betas (0.9, 0.99) (applied there, unlike in the SRFlow configs), batch 16, cosine annealing to 1e-7
# restarted at 50k, 100k and 150k iterations; 1M iterations at 4x, 200k at 8x; CelebA adds rotations.
RRDB_RECIPE = {"batch": 16, "lr": 2e-4, "betas": (0.9, 0.99), "lr_min": 1e-7, "cosine_period": 50_000}
RRDB_STEPS = {4: 1_000_000, 8: 200_000}
SRFLOW_STEPS = 200_000
# presets that reproduce the published models: they start from a pretrained RRDB (or refuse)
OFFICIAL_PRESETS = ("df2k-4x", "df2k-8x", "celeba-8x")


# torch.compile modes of the training step ("off": eager)
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes in which Inductor captures CUDA graphs


class ConfigError(ValueError):
    """A training configuration (YAML file, command line or output folder) is invalid."""


def _opt(default: object, help: str, **kwargs: object) -> object:  # noqa: A002 (argparse's name)
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Every training option. Load from YAML with :func:`load_config`; the CLI overrides fields
    with ``--field-name`` flags (booleans: ``--x`` / ``--no-x``)."""

    data: str | None = _opt(
        None, "folder of HR training images (PNG/JPEG), or an image store (srflow prepare); required"
    )
    preset: str = _opt("df2k-4x", f"model preset: {', '.join(PRESETS)}")
    stage: str = _opt("srflow", "what to train: srflow (the flow), or rrdb (the RRDB alone, L1; srflow train-rrdb)")
    recipe: str = _opt(
        DEFAULT_RECIPE,
        "SRFlow recipe: released (RRDB trained from step 1, no noise: what made the published models; default) "
        "or paper (RRDB frozen for the first half, dequantisation noise); sets rrdb_freeze_fraction and dequantize",
    )
    from_scratch: bool = _opt(
        False, "let an official preset start without --rrdb-weights/--init-official (a random RRDB, on purpose)"
    )
    out: str = _opt("srflow-run", "output folder (checkpoints/, val/, train_log.jsonl, config.yaml)")
    lr_data: str | None = _opt(None, "folder of paired LR images (same names, HR / scale); default: bicubic on the fly")
    val_data: str | None = _opt(
        None, "folder of validation HR images; default: the first val_images of --data (a warning says so)"
    )
    steps: int | None = _opt(None, "total iterations; default: official 200k (SRFlow; RRDB: 1M at 4x, 200k at 8x)")
    batch: int | None = _opt(None, "global batch (split over ranks); default: official 12 for 4x, 16 for 8x (RRDB: 16)")
    crop: int = _opt(160, "HR crop size (a multiple of 2 * scale)")
    flips: bool = _opt(True, "random horizontal flips")
    rotations: bool | None = _opt(None, "random 0/90/270-degree rotations; default: only the CelebA RRDB recipe")
    lr: float | None = _opt(None, "Adam learning rate; default: official 2.5e-4 for 4x, 5e-4 for 8x (RRDB: 2e-4)")
    lr_rrdb: float | None = _opt(None, "learning rate of the RRDB parameters; default: --lr")
    lr_schedule: str | None = _opt(
        None, "multistep (SRFlow's default) or cosine (annealing with restarts; the RRDB stage's default)"
    )
    lr_milestones: tuple[float, ...] = _opt(
        (0.5, 0.75, 0.9, 0.95), "multistep: fractions of --steps where the LR is multiplied by lr_gamma"
    )
    lr_gamma: float = _opt(0.5, "multistep: LR factor at each milestone")
    cosine_period: int | None = _opt(None, "cosine: iterations per cosine period (official RRDB 50k)")
    cosine_restarts: int = _opt(3, "cosine: restarts at 1, 2, ... x cosine_period (official 3); then no more")
    lr_min: float | None = _opt(None, "cosine: the LR at the end of each period (official RRDB 1e-7)")
    betas: tuple[float, float] | None = _opt(
        None, "Adam betas; default: (0.9, 0.999) for SRFlow (what the released code effectively uses), (0.9, 0.99) RRDB"
    )
    adam_eps: float = _opt(1e-8, "Adam epsilon")
    weight_decay: float = _opt(0.0, "Adam weight decay")
    rrdb_freeze_fraction: float | None = _opt(
        None, "fraction of --steps with the RRDB frozen: 0 = released code, 0.5 = paper, 1 = always; default: --recipe"
    )
    dequantize: bool | None = _opt(
        None, "add U(-1/64, 1/64) dequantisation noise (paper; NLL +5 bits/px); off = released code; default: --recipe"
    )
    l1_weight: float = _opt(0.0, "weight of the optional L1 loss on the temperature-0 sample (official weight_l1)")
    grad_clip_value: float | None = _opt(None, "clip each gradient element to +-value (HCFlow: 5)")
    grad_clip_norm: float | None = _opt(None, "clip the global gradient norm (HCFlow: 100)")
    memory_saving: bool = _opt(True, "memory-saving invertible backprop for every flow level")
    keep_every: int | None = _opt(None, "memory saving: also keep every N-th step input (bounds recompute drift)")
    backend: str = _opt("auto", "flowkernels backend: auto, cuda (C++/CUDA kernels), triton, reference")
    bf16: bool = _opt(False, "bf16 autocast of the RRDB and the coupling subnets (the flow state stays float32)")
    channels_last: bool = _opt(False, "channels_last memory format for the model and the batches")
    compile: str = _opt(
        "off",
        "torch.compile the training loss (forward and its memory-saving backward, one graph): off (default: "
        "compiling has not been measured to pay yet), default, reduce-overhead (CUDA graphs) "
        "or max-autotune (autotuned kernels, and CUDA graphs as reduce-overhead)",
    )
    device: str | None = _opt(None, "cpu, cuda or cuda:N; default: cuda if available (under torchrun: cuda:LOCAL_RANK)")
    seed: int = _opt(10, "seed of the initialisation, data order, crops and noise (official 10)")
    workers: int | None = _opt(None, "DataLoader workers; default 4 on CUDA, 0 on CPU")
    cache_images: bool = _opt(False, "keep decoded training images in memory (small folders, workers=0)")
    rrdb_weights: str | None = _opt(None, "pretrained RRDB state_dict (e.g. RRDB_DF2K_4X.pth), loaded strictly")
    init_official: str | None = _opt(
        None, "start from an official SRFlow checkpoint (.pth) or any state_dict of the preset"
    )
    resume: str | None = _opt(None, "'auto' (newest checkpoint in --out, or start fresh) or a checkpoint path")
    stop_after: int | None = _opt(None, "pause after this step (checkpoint written; continue with --resume)")
    max_minutes: float | None = _opt(None, "stop after this many minutes of training (checkpoint written)")
    save_every: int = _opt(1000, "checkpoint every N steps (and at the end)")
    keep_last: int = _opt(2, "keep the newest N checkpoints")
    val_every: int = _opt(5000, "validate every N steps (and at the end); 0 = never")
    val_images: int = _opt(4, "number of validation images")
    val_crop: int | None = _opt(256, "centre crop of the validation images (None: whole images)")
    val_temperatures: tuple[float, ...] = _opt((0.0, 0.5, 0.9), "temperatures of the validation sample grid")
    log_every: int = _opt(100, "log the mean loss every N steps (train_log.jsonl, TensorBoard, a printed line)")
    tensorboard: bool = _opt(False, "write TensorBoard logs to <out>/tensorboard (needs the tensorboard package)")
    max_nonfinite: int = _opt(10, "stop after this many consecutive non-finite steps")
    progress: bool = _opt(True, "show a tqdm progress bar")

    def replace(self, **changes: object) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Settings that change the training trajectory: a resume with other values does not reproduce
# an uninterrupted run, so they are compared with the checkpoint's and differences reported.
TRAJECTORY_FIELDS = (
    "preset", "stage", "steps", "batch", "crop", "flips", "rotations", "lr", "lr_rrdb", "lr_schedule",
    "lr_milestones", "lr_gamma", "cosine_period", "cosine_restarts", "lr_min", "betas", "adam_eps",
    "weight_decay", "rrdb_freeze_fraction", "dequantize", "l1_weight", "grad_clip_value", "grad_clip_norm", "seed",
)  # fmt: skip


@dataclass(frozen=True)
class OptionSpec:
    """How one :class:`TrainConfig` field is read, from YAML and from the command line."""

    name: str
    base: type  # bool, int, float or str; the item type of a tuple
    optional: bool  # ``X | None``: YAML null, ``none`` on the command line
    nargs: int | str | None  # None: one value; an int: exactly that many; "+": one or more
    help: str
    default: object


@functools.cache
def option_specs() -> tuple[OptionSpec, ...]:
    """One :class:`OptionSpec` per TrainConfig field, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    return tuple(_spec(f, hints[f.name]) for f in dataclasses.fields(TrainConfig))


def _spec(f: dataclasses.Field, hint: object) -> OptionSpec:
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        (hint,) = (a for a in args if a is not type(None))
    nargs: int | str | None = None
    if typing.get_origin(hint) is tuple:
        items = typing.get_args(hint)
        nargs = "+" if items[-1] is Ellipsis else len(items)
        hint = items[0]
    if hint not in (bool, int, float, str):
        raise TypeError(f"TrainConfig.{f.name}: unsupported option type {hint!r}")
    return OptionSpec(f.name, hint, optional, nargs, f.metadata.get("help", ""), f.default)


def _coerce(spec: OptionSpec, value: object, source: str) -> object:
    """Check/convert one YAML value against its option's type."""
    if value is None and spec.optional:
        return None
    if spec.nargs is None:
        return _coerce_item(spec.name, spec.base, value, source)
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{source}: {spec.name}: expected a list, got {value!r}")
    if isinstance(spec.nargs, int) and len(value) != spec.nargs:
        raise ConfigError(f"{source}: {spec.name}: expected {spec.nargs} values, got {value!r}")
    return tuple(_coerce_item(spec.name, spec.base, v, source) for v in value)


def _coerce_item(name: str, kind: type, value: object, source: str) -> object:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {name}: expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{source}: {name}: expected a string, got {value!r}")
    return str(value)


def config_from_dict(values: dict, source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from a mapping of field names (``-`` or ``_``) to values; unknown keys and
    wrongly typed values raise ConfigError naming them."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
    specs = {spec.name: spec for spec in option_specs()}
    unknown, guessed = [], 0
    for key in values:
        name = str(key).replace("-", "_")
        if name not in specs:
            close = difflib.get_close_matches(name, list(specs), n=1)
            unknown.append(repr(key) + (f" (did you mean {close[0]!r}?)" if close else ""))
            guessed += bool(close)
    if unknown:
        # the list of every option (long) only where a key has no close match
        known = f"; known options: {', '.join(specs)}" if guessed < len(unknown) else ""
        option = "option" if len(unknown) == 1 else "options"
        raise ConfigError(f"{source}: unknown {option} {', '.join(unknown)}{known}")
    changes = {str(key).replace("-", "_"): value for key, value in values.items()}
    changes = {name: _coerce(specs[name], value, source) for name, value in changes.items()}
    return dataclasses.replace(base or TrainConfig(), **changes)


def load_config(path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML file of TrainConfig fields (e.g. ``srflow/configs/df2k-4x-paper.yaml``)."""
    import yaml  # noqa: PLC0415 (only needed to read a file)

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; expected a YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r}: not valid YAML ({exc})") from exc
    return config_from_dict(values or {}, f"config file {str(path)!r}", base)


def config_to_dict(config: TrainConfig) -> dict:
    """Plain dict (tuples as lists) for YAML/JSON and checkpoints."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_to_yaml(config: TrainConfig) -> str:
    """The YAML text of ``config`` (fields in declaration order), readable by :func:`load_config`."""
    import yaml  # noqa: PLC0415 (only needed to write a file)

    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the options left at None from the stage's official recipe, the preset and the named
    recipe (``RECIPES``), and validate every field."""
    import flowkernels as fk  # noqa: PLC0415 (torch: keeps this module light for the CLI's parser)

    c = config
    if c.data is None:
        raise ConfigError("data: a folder of HR training images is required")
    try:
        preset = get_preset(c.preset)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if c.stage not in STAGES:
        raise ConfigError(f"stage: expected one of {', '.join(STAGES)}, got {c.stage!r}")
    if c.recipe not in RECIPES:
        raise ConfigError(f"recipe: expected one of {', '.join(RECIPES)}, got {c.recipe!r}")
    problems: list[str] = []
    if c.stage == "rrdb":
        # options of the flow stage that an L1-trained RRDB cannot honour
        if c.dequantize:
            problems.append("dequantize: the RRDB stage trains an L1 regression, it has no NLL to dequantise")
        if c.rrdb_freeze_fraction:
            problems.append("rrdb_freeze_fraction: the RRDB stage trains the RRDB; freezing is for the SRFlow stage")
        if c.init_official is not None:
            problems.append(
                "init_official: the RRDB stage starts from rrdb_weights (an RRDB state_dict) or from scratch"
            )
        if c.l1_weight:
            problems.append(
                "l1_weight: the RRDB stage's loss is L1 already; l1_weight weights the flow's extra L1 loss"
            )
    c = c.replace(**{k: v for k, v in _stage_defaults(c, preset).items() if getattr(c, k) is None})
    c = c.replace(lr_rrdb=c.lr_rrdb if c.lr_rrdb is not None else c.lr)
    positive_ints = ("steps", "batch", "crop", "save_every", "keep_last", "val_images", "log_every", "max_nonfinite")
    for name in positive_ints:
        if getattr(c, name) < 1:
            problems.append(f"{name}: expected a positive integer, got {getattr(c, name)}")
    m = 2 * preset.scale
    for name in ("crop", "val_crop"):
        value = getattr(c, name)
        if value is not None and value >= 1 and value % m:
            problems.append(
                f"{name}: {value} is not a multiple of {m} (2 x scale {preset.scale}: the LR must have even sides)"
            )
    if c.val_crop is not None and c.val_crop < 1:
        problems.append(f"val_crop: expected a positive multiple of {m} or none, got {c.val_crop}")
    for name in ("lr", "lr_rrdb", "adam_eps"):
        if not 0 < getattr(c, name) < math.inf:
            problems.append(f"{name}: expected a positive number, got {getattr(c, name)}")
    if not 0 <= c.rrdb_freeze_fraction <= 1:
        problems.append(f"rrdb_freeze_fraction: expected a value in [0, 1], got {c.rrdb_freeze_fraction}")
    if c.compile not in COMPILE_MODES:
        problems.append(f"compile: expected one of {', '.join(COMPILE_MODES)}, got {c.compile!r}")
    if c.lr_schedule not in ("multistep", "cosine"):
        problems.append(f"lr_schedule: expected multistep or cosine, got {c.lr_schedule!r}")
    if c.cosine_period < 1:
        problems.append(f"cosine_period: expected a positive number of iterations, got {c.cosine_period}")
    if c.cosine_restarts < 0:
        problems.append(f"cosine_restarts: expected >= 0, got {c.cosine_restarts}")
    if c.lr_schedule == "cosine" and not 0 <= c.lr_min < c.lr:
        problems.append(f"lr_min: expected a value in [0, lr = {c.lr:g}), got {c.lr_min}")
    if any(not 0 < f <= 1 for f in c.lr_milestones):
        problems.append(f"lr_milestones: expected fractions in (0, 1], got {c.lr_milestones}")
    if not 0 < c.lr_gamma <= 1:
        problems.append(f"lr_gamma: expected a value in (0, 1], got {c.lr_gamma}")
    if any(not 0 <= b < 1 for b in c.betas):
        problems.append(f"betas: expected values in [0, 1), got {c.betas}")
    for name in ("grad_clip_value", "grad_clip_norm", "max_minutes"):
        if getattr(c, name) is not None and not 0 < getattr(c, name) < math.inf:
            problems.append(f"{name}: expected a positive number or none, got {getattr(c, name)}")
    for name in ("l1_weight", "weight_decay"):
        if not 0 <= getattr(c, name) < math.inf:
            problems.append(f"{name}: expected a number >= 0, got {getattr(c, name)}")
    if c.val_every < 0:
        problems.append(f"val_every: expected >= 0 (0 = never), got {c.val_every}")
    _collect(problems, fk.validate_keep_every, c.keep_every)
    if c.workers is not None and c.workers < 0:
        problems.append(f"workers: expected >= 0, got {c.workers}")
    if c.stop_after is not None and c.stop_after < 1:
        problems.append(f"stop_after: expected a positive step, got {c.stop_after}")
    if not 0 <= c.seed < MAX_SEED:
        problems.append(f"seed: expected an integer in [0, 2**63), got {c.seed}")
    if any(not 0 <= t < math.inf for t in c.val_temperatures):
        problems.append(f"val_temperatures: expected finite values >= 0, got {c.val_temperatures}")
    if c.rrdb_weights is not None and c.init_official is not None:
        problems.append("pass at most one of rrdb_weights and init_official (an official checkpoint holds an RRDB)")
    _collect(problems, check_output_folder, c.out)
    # The device and the backend are checked here, not at the first forward: by then the output
    # folder and its config.yaml exist.
    _collect(problems, lambda device: fk.check_backend_available(c.backend, resolve_device(device)), c.device)
    if problems:
        raise ConfigError("invalid training configuration: " + "; ".join(problems))
    if c.tensorboard:
        try:
            import torch.utils.tensorboard  # noqa: F401, PLC0415
        except ImportError as exc:
            raise ConfigError(
                "tensorboard: TensorBoard logging needs the tensorboard package (pip install tensorboard), "
                f"which is not installed ({exc})"
            ) from exc
    return c


def _stage_defaults(c: TrainConfig, preset: object) -> dict[str, object]:
    """The values of the options left at None: the official recipe of the stage, the preset's scale
    and (SRFlow) the named recipe."""
    common = {"cosine_period": RRDB_RECIPE["cosine_period"], "lr_min": RRDB_RECIPE["lr_min"]}
    if c.stage == "rrdb":
        return {
            **common,
            "batch": RRDB_RECIPE["batch"],
            "lr": RRDB_RECIPE["lr"],
            "betas": RRDB_RECIPE["betas"],
            "steps": RRDB_STEPS[preset.scale],
            "lr_schedule": "cosine",
            "rotations": preset.name == "celeba-8x",
            "rrdb_freeze_fraction": 0.0,
            "dequantize": False,
        }
    batch, lr = OFFICIAL_RECIPE[preset.scale]
    return {
        **common,
        "batch": batch,
        "lr": lr,
        "betas": (0.9, 0.999),
        "steps": SRFLOW_STEPS,
        "lr_schedule": "multistep",
        "rotations": False,
        **RECIPES[c.recipe],
    }


def _collect(problems: list[str], validate: Callable[[typing.Any], object], value: object) -> None:
    """Run a validator (they raise ValueError, or BackendUnavailableError, naming the option) and
    keep its message."""
    from flowkernels import BackendUnavailableError  # noqa: PLC0415 (torch: see resolve_config)

    try:
        validate(value)
    except (ValueError, BackendUnavailableError) as exc:
        problems.append(str(exc))


def resolve_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """The device ``device`` names (``cpu``, ``cuda`` or ``cuda:N``; None: CUDA if available, else
    the CPU), checked against this machine before anything is built or written: ValueError
    naming ``name``, what was given and what is allowed (and why CUDA is not, where it is not)."""
    import torch  # noqa: PLC0415 (keeps this module light for the CLI's parser)

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"{name}: expected cpu, cuda or cuda:N, got {text!r}")
    if text == "cpu":
        return torch.device("cpu")
    if torch.version.cuda is None:
        raise ValueError(f"{name}: got {text!r}, but this torch ({torch.__version__}) is built without CUDA; use cpu")
    count = torch.cuda.device_count()
    if int(match.group(1) or 0) >= count:
        have = f"{count} CUDA device(s) (cuda:0 to cuda:{count - 1})" if count else "no CUDA device is visible"
        raise ValueError(f"{name}: got {text!r}, but {have}; use cpu" + (" or one of those" if count else ""))
    return torch.device(text)


def check_output_folder(path: str | os.PathLike, name: str = "out") -> None:
    """Raise ValueError naming ``name`` if ``path`` cannot be (or become) a folder to write into:
    it is a file, it lies under a file, or the nearest existing folder is not writable. For
    callers that check every input before they write anything."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a file; expected a folder (created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        raise ValueError(f"{name}: the folder {str(path)!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write into {str(existing)!r} (no write permission)")
