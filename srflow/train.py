"""SRFlow training: the official recipe, exact resume, non-finite guards, DistributedDataParallel.

Recipe (official configs ``SRFlow_{DF2K_4X,DF2K_8X,CelebA_8X}.yml``, DESIGN.md section 5):
160x160 HR crops with random horizontal flips, LR by MATLAB bicubic; Adam with lr 2.5e-4 (4x) /
5e-4 (8x), halved at 50/75/90/95% of the iterations; global batch 12 (4x) / 16 (8x); seed 10.

Paper vs released code, and what :class:`TrainConfig` does by default:

* RRDB freeze: the paper trains the flow with the (pretrained) RRDB frozen for the first half,
  then jointly; the released code trains it from step 0 (its freeze option is never read,
  andreas128/SRFlow#37). Default: the paper (``rrdb_freeze_fraction=0.5``); ``0`` gives the
  released code's behaviour, ``1`` keeps the RRDB frozen throughout.
* Dequantisation noise: the paper adds uniform noise to the HR; the released code does not.
  Default: the paper (``dequantize=True``), used consistently for the training loss and the
  validation NLL; reported NLLs then include ``log2(32) = +5`` bits per pixel from the noise
  model (:meth:`SRFlow.nll`).
* Adam betas: the official configs ask for (0.9, 0.99), but the released code passes them as
  unrecognised param-group keys, so PyTorch silently uses (0.9, 0.999). We use (0.9, 0.999),
  i.e. what the published models were trained with.
* Gradient clipping: none in SRFlow; HCFlow uses value 5 and norm 100 (``grad_clip_value``,
  ``grad_clip_norm``; off by default).

Exact resume: everything random is a pure function of the seed and the position, never of a
stateful RNG: the data order (DistributedSampler with ``seed`` and ``set_epoch``), each item's
crop and flip (``(seed, epoch, index)``, :class:`~srflow.data.HRImageDataset`), the dequantisation
noise (a generator seeded from ``(seed, step, rank)``) and the learning rate (a function of the
step). A checkpoint stores the weights, Adam's state and the step (plus the global RNG states,
restored for completeness), so N steps + resume + N steps give the same parameters as 2N steps
(bitwise on the CPU). ``stop_after`` pauses a run at a step (as a time-limited job would).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is NCCL on GPUs and gloo
on CPUs; ``batch`` is the *global* batch, each rank takes ``batch / world_size`` samples of the
same global batch a single process would use (DistributedSampler with drop_last), so N ranks
compute the gradient of the same batch as one process (exactly equal up to float summation
order when ``dequantize`` is off; with it on, each rank draws its own noise). Rank 0 logs,
validates and writes checkpoints. ActNorms are initialised explicitly from the first batch
(the clean HR, outside bf16 autocast) before the first step, with the statistics all-reduced
across ranks by flowkernels, so every rank starts from the global batch's statistics.
DistributedDataParallel only synchronises the parameters that require grad when it is built,
so the wrapper is rebuilt at the RRDB unfreeze step. Small image folders are repeated within
an epoch (each visit with its own crop) so that an epoch holds at least 100 global batches.

Non-finite steps: a step whose loss or gradient is NaN/Inf (on any rank) is skipped (gradients
dropped, optimiser not stepped, the step counter and schedule advance) and counted; after
``max_nonfinite`` in a row the run stops with :class:`NonFiniteTrainingError` without writing a
checkpoint (those already written are untouched; checkpoints never hold non-finite weights).
Because the run is deterministic, resuming repeats the divergence: change ``lr``, clipping or
``seed`` first.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

import flowkernels as fk

from .official_checkpoint import CheckpointError, check_state_dict, read_state_dict, strip_prefix
from .data import HRImageDataset
from .model import SRFlow
from .presets import PRESETS, get_preset
from .training_checkpoint import (
    CHECKPOINT_DIR,
    CheckpointFiles,
    TrainingCheckpoint,
    atomic_write,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_training_checkpoint,
)

__all__ = [
    "TrainConfig",
    "ConfigError",
    "NonFiniteTrainingError",
    "TrainResult",
    "OFFICIAL_RECIPE",
    "load_config",
    "train",
    "learning_rate_factor",
]

# scale -> (global batch, Adam learning rate) of the official configs
OFFICIAL_RECIPE = {4: (12, 2.5e-4), 8: (16, 5e-4)}
_MIN_EPOCH_BATCHES = 100


class ConfigError(ValueError):
    """A training configuration (YAML file, command line or output folder) is invalid."""


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


def _opt(default: object, help: str, **kwargs: object) -> object:  # noqa: A002 (argparse's name)
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Every training option. Load from YAML with :func:`load_config`; the CLI overrides fields
    with ``--field-name`` flags (booleans: ``--x`` / ``--no-x``)."""

    data: str | None = _opt(None, "folder of HR training images (PNG/JPEG); required")
    preset: str = _opt("df2k-4x", f"model preset: {', '.join(PRESETS)}")
    out: str = _opt("srflow-run", "output folder (checkpoints/, val/, train_log.jsonl, config.yaml)")
    lr_data: str | None = _opt(None, "folder of paired LR images (same names, HR / scale); default: bicubic on the fly")
    val_data: str | None = _opt(None, "folder of validation HR images; default: the first val_images of --data")
    steps: int = _opt(200_000, "total iterations (the LR schedule is relative to this)")
    batch: int | None = _opt(None, "global batch (split over ranks); default: official 12 for 4x, 16 for 8x")
    crop: int = _opt(160, "HR crop size (a multiple of 2 * scale)")
    flips: bool = _opt(True, "random horizontal flips")
    lr: float | None = _opt(None, "Adam learning rate; default: official 2.5e-4 for 4x, 5e-4 for 8x")
    lr_rrdb: float | None = _opt(None, "learning rate of the RRDB parameters; default: --lr")
    lr_milestones: tuple[float, ...] = _opt(
        (0.5, 0.75, 0.9, 0.95), "fractions of --steps where the LR is multiplied by lr_gamma"
    )
    lr_gamma: float = _opt(0.5, "LR factor at each milestone")
    betas: tuple[float, float] = _opt((0.9, 0.999), "Adam betas (the released code effectively uses 0.9, 0.999)")
    adam_eps: float = _opt(1e-8, "Adam epsilon")
    weight_decay: float = _opt(0.0, "Adam weight decay")
    rrdb_freeze_fraction: float = _opt(
        0.5, "fraction of --steps with the RRDB frozen: 0.5 = paper (default), 0 = released code, 1 = always frozen"
    )
    dequantize: bool = _opt(
        True, "add U(-1/64, 1/64) dequantisation noise (paper; NLL +5 bits/px); off = released code"
    )
    l1_weight: float = _opt(0.0, "weight of the optional L1 loss on the temperature-0 sample (official weight_l1)")
    grad_clip_value: float | None = _opt(None, "clip each gradient element to +-value (HCFlow: 5)")
    grad_clip_norm: float | None = _opt(None, "clip the global gradient norm (HCFlow: 100)")
    memory_saving: bool = _opt(True, "memory-saving invertible backprop for every flow level")
    keep_every: int | None = _opt(None, "memory saving: also keep every N-th step input (bounds recompute drift)")
    backend: str = _opt("auto", "flowkernels backend: auto, cuda (C++/CUDA kernels), triton, reference")
    bf16: bool = _opt(False, "bf16 autocast of the RRDB and the coupling subnets (the flow state stays float32)")
    channels_last: bool = _opt(False, "channels_last memory format for the model and the batches")
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
_TRAJECTORY_FIELDS = (
    "preset", "steps", "batch", "crop", "flips", "lr", "lr_rrdb", "lr_milestones", "lr_gamma", "betas",
    "adam_eps", "weight_decay", "rrdb_freeze_fraction", "dequantize", "l1_weight", "grad_clip_value",
    "grad_clip_norm", "seed",
)  # fmt: skip


def _field_types() -> dict[str, object]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: object, hint: object, source: str) -> object:
    """Check/convert one YAML value against the field's type hint."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0], source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {name}: expected a list, got {value!r}")
        item = args[0]
        if len(args) == 2 and args[1] is not Ellipsis and len(value) != 2:
            raise ConfigError(f"{source}: {name}: expected 2 values, got {value!r}")
        return tuple(_coerce(name, v, item, source) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {name}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {name}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {name}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(f"{source}: {name}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{source}: {name}: unsupported option type {hint}")


def config_from_dict(values: dict, source: str = "config", base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig from a mapping of field names (``-`` or ``_``) to values; unknown keys and
    wrongly typed values raise ConfigError naming them."""
    import difflib  # noqa: PLC0415

    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of option names to values, got {type(values).__name__}")
    hints = _field_types()
    changes = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in hints:
            close = difflib.get_close_matches(name, list(hints), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown option {key!r}{hint}; known options: {', '.join(hints)}")
        changes[name] = _coerce(name, value, hints[name], source)
    return dataclasses.replace(base or TrainConfig(), **changes)


def load_config(path: str | os.PathLike, base: TrainConfig | None = None) -> TrainConfig:
    """Read a YAML file of TrainConfig fields (e.g. ``srflow/configs/df2k-4x-paper.yaml``)."""
    import yaml  # noqa: PLC0415

    path = Path(path)
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


def resolve_config(config: TrainConfig) -> TrainConfig:
    """Fill the preset-dependent defaults (batch, lr, lr_rrdb) and validate every field."""
    c = config
    if c.data is None:
        raise ConfigError("data: a folder of HR training images is required (--data DIR)")
    try:
        preset = get_preset(c.preset)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    batch, lr = OFFICIAL_RECIPE[preset.scale]
    c = c.replace(batch=c.batch if c.batch is not None else batch, lr=c.lr if c.lr is not None else lr)
    c = c.replace(lr_rrdb=c.lr_rrdb if c.lr_rrdb is not None else c.lr)
    problems = []
    positive_ints = ("steps", "batch", "crop", "save_every", "keep_last", "val_images", "log_every", "max_nonfinite")
    for name in positive_ints:
        if getattr(c, name) < 1:
            problems.append(f"{name}: expected a positive integer, got {getattr(c, name)}")
    m = 2 * preset.scale
    if c.crop % m:
        problems.append(
            f"crop: {c.crop} is not a multiple of {m} (2 x scale {preset.scale}: the LR must have even sides)"
        )
    if c.val_crop is not None and (c.val_crop < m):
        problems.append(f"val_crop: expected at least {m}, got {c.val_crop}")
    for name in ("lr", "lr_rrdb", "adam_eps"):
        if not getattr(c, name) > 0:
            problems.append(f"{name}: expected a positive number, got {getattr(c, name)}")
    if not 0 <= c.rrdb_freeze_fraction <= 1:
        problems.append(f"rrdb_freeze_fraction: expected a value in [0, 1], got {c.rrdb_freeze_fraction}")
    if any(not 0 < f <= 1 for f in c.lr_milestones):
        problems.append(f"lr_milestones: expected fractions in (0, 1], got {c.lr_milestones}")
    if not 0 < c.lr_gamma <= 1:
        problems.append(f"lr_gamma: expected a value in (0, 1], got {c.lr_gamma}")
    if any(not 0 <= b < 1 for b in c.betas):
        problems.append(f"betas: expected values in [0, 1), got {c.betas}")
    for name in ("grad_clip_value", "grad_clip_norm", "max_minutes"):
        if getattr(c, name) is not None and not getattr(c, name) > 0:
            problems.append(f"{name}: expected a positive number or none, got {getattr(c, name)}")
    if c.l1_weight < 0 or c.weight_decay < 0:
        problems.append("l1_weight and weight_decay must be >= 0")
    if c.val_every < 0:
        problems.append(f"val_every: expected >= 0 (0 = never), got {c.val_every}")
    if c.keep_every is not None and c.keep_every < 1:
        problems.append(f"keep_every: expected a positive integer or none, got {c.keep_every}")
    if c.workers is not None and c.workers < 0:
        problems.append(f"workers: expected >= 0, got {c.workers}")
    if c.stop_after is not None and c.stop_after < 1:
        problems.append(f"stop_after: expected a positive step, got {c.stop_after}")
    if c.backend not in ("auto", "cuda", "triton", "reference"):
        problems.append(f"backend: expected auto, cuda, triton or reference, got {c.backend!r}")
    if any(t < 0 for t in c.val_temperatures):
        problems.append(f"val_temperatures: expected values >= 0, got {c.val_temperatures}")
    if c.rrdb_weights is not None and c.init_official is not None:
        problems.append("pass at most one of rrdb_weights and init_official (an official checkpoint holds an RRDB)")
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


def learning_rate_factor(step: int, steps: int, milestones: tuple[float, ...], gamma: float) -> float:
    """LR multiplier of 0-based step ``step``: ``gamma ** #(milestones <= step + 1)``, milestone
    iterations ``int(fraction * steps)`` (the official MultiStepLR, stepped before each update)."""
    passed = sum(1 for f in milestones if int(f * steps) <= step + 1)
    return gamma**passed


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), for per-step generators."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``losses`` are global means)."""

    step: int
    out: Path
    checkpoint: CheckpointFiles | None
    losses: list[tuple[int, float]]  # (1-based step, mean loss in bits/px) of every finite step
    nonfinite_steps: int
    stopped: str  # "finished", "stop_after", "max_minutes"
    validation: dict[str, float] = field(default_factory=dict)


class TrainingObjective(nn.Module):
    """The per-sample loss, so that DistributedDataParallel wraps one forward: the NLL in bits
    per HR pixel (plus ``l1_weight`` x the L1 loss of the temperature-0 sample), under bf16
    autocast if asked. Returns (loss (B,), nll (B,))."""

    def __init__(self, model: SRFlow, dequantize: bool, l1_weight: float, bf16: bool) -> None:
        super().__init__()
        self.model = model
        self.dequantize, self.l1_weight, self.bf16 = dequantize, l1_weight, bf16

    def forward(self, hr: Tensor, lr: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        with torch.autocast(hr.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            cond = self.model.condition(lr)
            nll = self.model.nll(hr, cond=cond, add_noise=self.dequantize, generator=generator)
            loss = nll
            if self.l1_weight:
                loss = nll + self.l1_weight * self.model.l1_loss(hr, cond=cond)
        return loss, nll


@dataclass
class _Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(config: TrainConfig) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    requested = config.device
    if world == 1:
        device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
        return _Dist(0, 1, device, False)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (requested or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if dist.get_world_size() != world:
        raise ConfigError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return _Dist(dist.get_rank(), world, device, owns)


class _Batches(torch.utils.data.Sampler):
    """This rank's batches of one epoch, from ``start`` on (DistributedSampler order)."""

    def __init__(self, sampler: torch.utils.data.DistributedSampler, batch: int, start: int) -> None:
        self.indices = list(iter(sampler))
        self.batch, self.start = batch, start

    def __len__(self) -> int:
        return len(self.indices) // self.batch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        for k in range(self.start, len(self.indices) // self.batch):
            yield self.indices[k * self.batch : (k + 1) * self.batch]


class Trainer:
    """One training run (see the module docstring); :func:`train` is the entry point."""

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._custom_log = log is not None
        self._print = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # ---------------------------------------------------------------------------------- setup

    def log(self, message: str) -> None:
        """Rank 0 only: through the progress bar when it is shown (so it is not broken up)."""
        if self.dist.main:
            if self._custom_log or self.bar is None or self.bar.disable:
                self._print(message)
            else:
                self.bar.write(message, file=sys.stderr)

    def _find_resume(self, ckpt_dir: Path) -> CheckpointFiles | None:
        c = self.config
        existing = list_checkpoints(ckpt_dir)
        if c.resume is None:
            if existing:
                raise ConfigError(
                    f"output folder {c.out!r} already holds checkpoints (newest: step {existing[-1].step}); "
                    "pass --resume auto to continue that run, or choose another --out"
                )
            return None
        return latest_checkpoint(ckpt_dir) if c.resume == "auto" else resolve_checkpoint(c.resume)

    def _check_no_newer(self, ckpt_dir: Path, resume: TrainingCheckpoint) -> None:
        newer = [e.step for e in list_checkpoints(ckpt_dir) if e.step > resume.step]
        if newer:
            raise ConfigError(
                f"output folder {self.config.out!r} holds checkpoints newer than the one to resume "
                f"({str(resume.files.state)!r}, step {resume.step}): steps {newer}; resuming would overwrite "
                "them. Resume from the newest one or choose another --out"
            )

    def _build_model(self, resume: TrainingCheckpoint | None) -> SRFlow:
        c = self.config
        model = SRFlow.from_preset(
            c.preset, memory_saving=c.memory_saving, backend=c.backend, keep_every=c.keep_every, seed=c.seed
        )
        if resume is not None:
            source = f"checkpoint {str(resume.files.weights)!r}"
            check_state_dict(model, resume.weights, source, c.preset)
            model.load_state_dict(resume.weights, strict=True)
        elif c.init_official is not None:
            state = strip_prefix(read_state_dict(c.init_official))
            check_state_dict(model, state, f"checkpoint {c.init_official!r}", c.preset)
            model.load_state_dict(state, strict=True)
        elif c.rrdb_weights is not None:
            state = strip_prefix(read_state_dict(c.rrdb_weights))
            if state and all(k.startswith("RRDB.") for k in state):
                state = strip_prefix(state, "RRDB.")
            check_state_dict(model.RRDB, state, f"RRDB weights {c.rrdb_weights!r}", c.preset)
            model.RRDB.load_state_dict(state, strict=True)
        model = model.to(self.dist.device)
        if c.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.train()

    def _make_optimizer(self, model: SRFlow) -> torch.optim.Adam:
        c = self.config
        rrdb = {id(p) for p in model.rrdb_parameters()}
        flow = [p for p in model.parameters() if p.requires_grad and id(p) not in rrdb]
        # Frozen RRDB parameters sit in their own group from the start: with no gradient Adam
        # skips them, so unfreezing needs no change of the optimiser (and its state_dict layout
        # is the same before and after).
        groups = [
            {"params": flow, "lr": c.lr, "name": "flow", "base_lr": c.lr},
            {"params": model.rrdb_parameters(), "lr": c.lr_rrdb, "name": "rrdb", "base_lr": c.lr_rrdb},
        ]
        return torch.optim.Adam(groups, lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps, weight_decay=c.weight_decay)

    def _wrap(self) -> nn.Module:
        if self.dist.world == 1:
            return self.objective
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
        return DistributedDataParallel(self.objective, device_ids=ids)

    def _set_rrdb_trainable(self, step: int) -> None:
        """RRDB frozen before ``unfreeze_step``, trainable from it; (re)build the DDP wrapper."""
        want = step >= self.unfreeze_step
        changed = self.model.rrdb_trainable != want
        if changed:
            self.model.set_rrdb_trainable(want)
        if self.wrapped is None or (changed and self.dist.world > 1):
            # DistributedDataParallel registers its gradient hooks for the parameters that
            # require grad *when it is built*: a wrapper built with the RRDB frozen would never
            # all-reduce the RRDB's gradients, so the ranks would drift apart. Rebuild it.
            self.wrapped = None
            gc.collect()  # release the old reducer and its hooks before the new one registers
            self.wrapped = self._wrap()
        if changed and step > 0:
            self.log(f"step {step}: RRDB unfrozen (trained jointly from now on)")

    # ---------------------------------------------------------------------------------- run

    def run(self) -> TrainResult:
        self.bar = self.writer = None
        self.dist = _setup_distributed(self.config)
        try:
            return self._run()
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.close()
            if self.dist.owns_group and dist.is_initialized():
                dist.destroy_process_group()

    def _run(self) -> TrainResult:
        c = self.config = resolve_config(self.config)
        d = self.dist
        if c.batch % d.world:
            raise ConfigError(f"batch: the global batch {c.batch} is not divisible by the {d.world} ranks")
        preset = get_preset(c.preset)
        out = Path(c.out)
        ckpt_dir = out / CHECKPOINT_DIR

        # Everything is checked before anything is written: a failed start leaves the folder as it was.
        files = self._find_resume(ckpt_dir)
        resume = load_training_checkpoint(files, c.preset) if files is not None else None
        if resume is not None:
            self._check_no_newer(ckpt_dir, resume)
        dataset = HRImageDataset(
            c.data, preset.scale, crop=c.crop, lr_root=c.lr_data, flips=c.flips, seed=c.seed, cache=c.cache_images
        )
        # Small folders are repeated (each visit with its own crop) so that an epoch holds at
        # least _MIN_EPOCH_BATCHES global batches: epochs restart the DataLoader (and its workers).
        dataset.repeat = max(1, math.ceil(c.batch * _MIN_EPOCH_BATCHES / len(dataset.files)))
        val_set = None
        if c.val_every and d.main:
            val_set = HRImageDataset(
                c.val_data or c.data,
                preset.scale,
                crop=c.val_crop,
                lr_root=c.lr_data if c.val_data is None else None,
                flips=False,
                multiple=2 * preset.scale,
                center=True,
                max_images=c.val_images,
            )
        self.model = self._build_model(resume)
        self.objective = TrainingObjective(self.model, c.dequantize, c.l1_weight, c.bf16)
        self.optimizer = self._make_optimizer(self.model)
        start = 0
        nonfinite_total = in_row = 0
        if resume is not None:
            start = resume.step
            try:
                self.optimizer.load_state_dict(resume.state["optimizer"])
            except (ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"checkpoint {str(resume.files.state)!r}: optimiser state does not fit ({exc})"
                ) from exc
            rng = resume.state.get("rng", {})
            if "torch" in rng:
                torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])
            nonfinite_total = int(resume.state.get("nonfinite_total", 0))
            in_row = int(resume.state.get("nonfinite_in_row", 0))
            self._compare_config(resume)
        writer = None
        if d.main:
            out.mkdir(parents=True, exist_ok=True)
            text = _yaml_dump(config_to_dict(c))
            atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
            if c.tensorboard:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

                writer = self.writer = SummaryWriter(str(out / "tensorboard"))

        self.unfreeze_step = int(c.rrdb_freeze_fraction * c.steps)
        self.wrapped = None
        self.actnorms_pending = True
        self._set_rrdb_trainable(start)
        per_rank = c.batch // d.world
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=c.seed, drop_last=True
        )
        steps_per_epoch = len(sampler) // per_rank
        workers = c.workers if c.workers is not None else (4 if d.device.type == "cuda" else 0)
        end = min(c.steps, c.stop_after) if c.stop_after is not None else c.steps

        if d.main:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(
                total=c.steps, initial=start, disable=not c.progress, dynamic_ncols=True, unit="it", file=sys.stderr
            )
        what = f"resuming from {str(resume.files.state)!r} at step {start}" if resume else "starting at step 0"
        self.log(
            f"srflow train: preset {c.preset}, {what}, {c.steps} steps, global batch {c.batch} "
            f"({d.world} rank(s) x {per_rank}) of {c.crop}x{c.crop} crops from {len(dataset.files)} images, "
            f"lr {c.lr:g}, device {d.device}, memory_saving {c.memory_saving}, backend {c.backend}, "
            f"RRDB frozen until step {self.unfreeze_step}, dequantize {c.dequantize}"
        )
        t_start = time.perf_counter()
        losses: list[tuple[int, float]] = []
        window: list[float] = []
        step = start
        stopped = "finished"
        last_saved: CheckpointFiles | None = resume.files if resume is not None else None
        val: dict[str, float] = {}
        t_window = time.perf_counter()
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)

        while step < end:
            epoch, offset = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            sampler.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(
                dataset,
                batch_sampler=_Batches(sampler, per_rank, offset),
                num_workers=workers,
                pin_memory=d.device.type == "cuda",
            )
            for hr, lr in loader:
                loss_value, good = self._step(step, hr, lr)
                step += 1
                if good:
                    in_row = 0
                    losses.append((step, loss_value))
                    window.append(loss_value)
                else:
                    in_row += 1
                    nonfinite_total += 1
                    self.log(f"step {step}: non-finite loss or gradient, step skipped ({in_row} in a row)")
                    if in_row >= c.max_nonfinite:
                        where = f"{str(last_saved.weights)!r} (step {last_saved.step})" if last_saved else "none"
                        raise NonFiniteTrainingError(
                            f"training stopped at step {step}: {in_row} consecutive steps with a non-finite loss or "
                            f"gradient (--max-nonfinite {c.max_nonfinite}); nothing was saved at this point; last "
                            f"checkpoint: {where}. Try a lower --lr, --grad-clip-norm 100, or --no-bf16"
                        )
                if self.bar is not None:
                    self._update_bar(window)
                if d.main and step % c.log_every == 0 and window:
                    mean = sum(window) / len(window)
                    elapsed = time.perf_counter() - t_window
                    rate = len(window) / elapsed if elapsed > 0 else float("nan")
                    self._record(out, writer, step, {"loss_bits_px": mean, "it_per_s": rate, "lr": self._lr(step - 1)})
                    self.log(f"step {step}: {mean:.4f} bits/px (mean of the last {len(window)} steps), {rate:.2f} it/s")
                    window, t_window = [], time.perf_counter()
                if self.unfreeze_step == step:
                    self._set_rrdb_trainable(step)
                timeout = self._time_is_up(t_start)
                final = step == end or timeout
                if c.val_every and d.main and (step % c.val_every == 0 or final):
                    val = self._validate(val_set, step, out, writer)
                if d.main and (step % c.save_every == 0 or final):
                    last_saved = self._save(ckpt_dir, step, nonfinite_total, in_row)
                if timeout:
                    stopped = "max_minutes"
                    break
                if step == end:
                    break
            if stopped == "max_minutes":
                break
        if stopped == "finished" and end < c.steps:
            stopped = "stop_after"
        if d.world > 1:
            dist.barrier()
        self.log(
            f"srflow train: {stopped} at step {step}; checkpoint {str(last_saved.weights) if last_saved else 'none'}"
        )
        return TrainResult(step, out, last_saved, losses, nonfinite_total, stopped, val)

    def _lr(self, step: int) -> float:
        c = self.config
        return c.lr * learning_rate_factor(step, c.steps, c.lr_milestones, c.lr_gamma)

    def _time_is_up(self, t_start: float) -> bool:
        c = self.config
        if c.max_minutes is None:
            return False
        up = torch.tensor([float(time.perf_counter() - t_start > 60 * c.max_minutes)], device=self.dist.device)
        if self.dist.world > 1:
            dist.all_reduce(up, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(up.item())

    def _update_bar(self, window: list[float]) -> None:
        bar, c = self.bar, self.config
        bar.update(1)
        postfix = {}
        if window:
            postfix["bits/px"] = f"{sum(window) / len(window):.3f}"
        rate = bar.format_dict.get("rate")
        if rate:
            postfix["samples/s"] = f"{rate * c.batch:.1f}"
        if self.dist.device.type == "cuda":
            postfix["peak_mem"] = f"{torch.cuda.max_memory_allocated(self.dist.device) / 2**30:.2f}GiB"
        bar.set_postfix(postfix, refresh=False)

    def _noise_generator(self, step: int) -> torch.Generator | None:
        if not self.config.dequantize:
            return None
        gen = torch.Generator(device=self.dist.device)
        gen.manual_seed(_mix(self.config.seed, step, self.dist.rank))
        return gen

    def _step(self, step: int, hr: Tensor, lr: Tensor) -> tuple[float, bool]:
        """One optimisation step at 0-based ``step``. Returns (global mean loss, finite)."""
        c, d = self.config, self.dist
        fmt = torch.channels_last if c.channels_last else torch.contiguous_format
        hr = hr.to(d.device, non_blocking=True).contiguous(memory_format=fmt)
        lr = lr.to(d.device, non_blocking=True).contiguous(memory_format=fmt)
        if self.actnorms_pending:
            # Explicit data-dependent init from the first batch (statistics all-reduced across
            # ranks by flowkernels), outside autocast; loaded checkpoints need none.
            if any(isinstance(m, fk.ActNorm) and not m.initialized for m in self.model.modules()):
                self.model.initialize_actnorms(hr, lr)
            self.actnorms_pending = False
        factor = learning_rate_factor(step, c.steps, c.lr_milestones, c.lr_gamma)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        loss, _ = self.wrapped(hr, lr, self._noise_generator(step))
        loss = loss.mean()
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        # The norm of the raw gradients (max_norm=inf leaves them as they are; torch >= 2.4 API),
        # checked before any clipping could hide an Inf.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf) if params else torch.zeros(())
        detached = loss.detach()
        finite = torch.isfinite(detached) & torch.isfinite(grad_norm.to(detached.device))
        stats = torch.stack([torch.where(finite, detached, torch.zeros_like(detached)), (~finite).float()])
        if d.world > 1:
            dist.all_reduce(stats)  # the gradients were already averaged; agree on skipping
        total, bad = stats.tolist()
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), False
        if c.grad_clip_value is not None:  # HCFlow's order: value, then norm
            torch.nn.utils.clip_grad_value_(params, c.grad_clip_value)
        if c.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / d.world, True

    def _save(self, ckpt_dir: Path, step: int, nonfinite_total: int, in_row: int) -> CheckpointFiles:
        c = self.config
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "nonfinite_total": nonfinite_total,
            "nonfinite_in_row": in_row,
            "rrdb_trainable": self.model.rrdb_trainable,
            "world_size": self.dist.world,
            "config": config_to_dict(c),
            "torch_version": str(torch.__version__),
        }
        try:
            files = save_training_checkpoint(ckpt_dir, step, c.preset, self.model.state_dict(), state)
        except ValueError as exc:
            raise NonFiniteTrainingError(f"step {step}: {exc}") from exc
        prune_checkpoints(ckpt_dir, c.keep_last)
        return files

    def _compare_config(self, resume: TrainingCheckpoint) -> None:
        saved = resume.state.get("config", {})
        now = config_to_dict(self.config)
        changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in _TRAJECTORY_FIELDS if k in saved and saved[k] != now[k]]
        if resume.state.get("world_size", self.dist.world) != self.dist.world:
            changed.append(f"world size: {resume.state['world_size']} -> {self.dist.world} (same data, other noise)")
        if changed:
            self.log(
                "warning: resuming with settings that differ from the checkpoint's, so the run will not "
                "match an uninterrupted one: " + "; ".join(changed)
            )

    def _record(self, out: Path, writer: object, step: int, values: dict[str, float]) -> None:
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if writer is not None:
            for k, v in values.items():
                writer.add_scalar(k, v, step)

    @torch.no_grad()
    def _validate(self, val_set: HRImageDataset, step: int, out: Path, writer: object) -> dict[str, float]:
        from . import metrics  # noqa: PLC0415
        from .data import save_rgb  # noqa: PLC0415
        from .infer import _clean, make_grid, nearest_upscale  # noqa: PLC0415

        c, model = self.config, self.model
        model.eval()
        nll, psnr0, lrpsnr0, rows = [], [], [], []
        try:
            for i in range(len(val_set)):
                hr, lr = val_set[i]
                hr_d, lr_d = hr[None].to(self.dist.device), lr[None].to(self.dist.device)
                cond = model.condition(lr_d)
                gen = torch.Generator(device=self.dist.device).manual_seed(c.seed)
                nll.append(float(model.nll(hr_d, cond=cond, add_noise=c.dequantize, generator=gen)[0]))
                sr0 = _clean(model.sample(cond=cond, temperature=0.0, nonfinite="ignore"))[0].cpu()
                psnr0.append(metrics.psnr(metrics.to_uint8(sr0), metrics.to_uint8(hr, rounding=True)))
                lrpsnr0.append(metrics.lr_psnr(sr0, lr, model.scale))
                row = [nearest_upscale(lr, model.scale), hr]
                for t in c.val_temperatures:
                    row.append(
                        sr0 if t == 0 else model.sample(cond=cond, temperature=t, seed=i, nonfinite="ignore")[0].cpu()
                    )
                rows.append(row)
        finally:
            model.train()
        (out / "val").mkdir(parents=True, exist_ok=True)
        grid_path = out / "val" / f"step-{step:09d}.png"
        save_rgb(make_grid(rows), grid_path)
        result = {
            "val_nll_bits_px": _finite_mean(nll),
            "val_psnr_t0": _finite_mean(psnr0),
            "val_lr_psnr_t0": _finite_mean(lrpsnr0),
        }
        self._record(out, writer, step, result)
        self.log(
            f"step {step}: validation NLL {result['val_nll_bits_px']:.4f} bits/px, "
            f"PSNR(t=0) {result['val_psnr_t0']:.2f} dB, "
            f"LR-PSNR(t=0) {result['val_lr_psnr_t0']:.2f} dB; samples at t={list(c.val_temperatures)}: {grid_path}"
        )
        return result


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _yaml_dump(values: dict) -> str:
    import yaml  # noqa: PLC0415

    return yaml.safe_dump(values, sort_keys=False)


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run training as configured (see the module docstring). Under torchrun every rank calls
    this. Raises ConfigError / CheckpointError / FileNotFoundError / ValueError for bad inputs
    (before anything is written) and NonFiniteTrainingError when the loss keeps diverging."""
    return Trainer(config, log).run()
