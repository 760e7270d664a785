"""SRFlow training in two stages, the way the official models were made: the RRDB alone as an L1
super-resolver (``stage="rrdb"``, ``srflow train-rrdb``), then the flow conditioned on it
(``stage="srflow"``, ``srflow train --rrdb-weights <the RRDB run>``); exact resume, non-finite
guards, DistributedDataParallel, the same machinery for both.

RRDB recipe (official configs ``RRDB_{DF2K_4X,DF2K_8X,CelebA_8X}.yml``): ESRGAN's RRDBNet with its
upsampling head, L1 loss, Adam lr 2e-4 with betas (0.9, 0.99), cosine annealing from 2e-4 to 1e-7
over 50k iterations, restarted at 50k, 100k and 150k (after that one cosine continues without
restarts, as the official scheduler does), batch 16, 160x160 crops with flips (CelebA: also
rotations), 1M iterations at 4x and 200k at 8x. Validation: PSNR and LR-PSNR of its SR.

SRFlow recipe (official configs ``SRFlow_{DF2K_4X,DF2K_8X,CelebA_8X}.yml``, DESIGN.md section 5):
160x160 HR crops with random horizontal flips, LR by the official uint8 imresize; Adam with lr
2.5e-4 (4x) / 5e-4 (8x), halved at 50/75/90/95% of the iterations; global batch 12 (4x) / 16 (8x);
seed 10. The official presets refuse to start from a random RRDB (every published model started
from a pretrained one) unless ``from_scratch`` says so; the tiny presets of the tests and the demo
may.

Paper vs released code: two named recipes (``recipe``, :data:`srflow.config.RECIPES`; YAML files in
``srflow/configs``), ``released`` by default because it made the published checkpoints:

* RRDB freeze: the paper trains the flow with the (pretrained) RRDB frozen for the first half,
  then jointly; the released code trains it from step 0 (its freeze option is never read,
  andreas128/SRFlow#37). ``released``: ``rrdb_freeze_fraction=0``; ``paper``: ``0.5``; ``1``
  keeps the RRDB frozen throughout.
* Dequantisation noise: the paper adds uniform noise to the HR; the released code does not.
  ``released``: off (NLLs comparable with the official logs); ``paper``: on, used consistently
  for the training loss and the validation NLL; reported NLLs then include ``log2(32) = +5`` bits
  per pixel from the noise model (:meth:`SRFlow.nll`).
* Adam betas: the official configs ask for (0.9, 0.99), but the released code passes them as
  unrecognised param-group keys, so PyTorch silently uses (0.9, 0.999). We use (0.9, 0.999),
  i.e. what the published models were trained with.
* Gradient clipping: none in SRFlow; HCFlow uses value 5 and norm 100 (``grad_clip_value``,
  ``grad_clip_norm``; off by default).

Exact resume: everything random is a pure function of the seed and the position, never of a
stateful RNG: the data order (DistributedSampler with ``seed`` and ``set_epoch``), each item's
crop and flip (``(seed, epoch, index)``, :class:`~srflow.data.HRImageDataset`), the dequantisation
noise (one generator per sample, seeded from ``(seed, step, the sample's position in the global
batch)``) and the learning rate (a function of the step). A checkpoint stores the weights,
Adam's state and the step (plus the global RNG states, restored for completeness), so N steps +
resume + N steps give the same parameters as 2N steps (bitwise on the CPU). ``stop_after``
pauses a run at a step (as a time-limited job would).

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is NCCL on GPUs and gloo
on CPUs; ``batch`` is the *global* batch, each rank takes ``batch / world_size`` samples of the
same global batch a single process would use (DistributedSampler with drop_last; rank r holds
positions r, r + N, r + 2N, ... of it), with the same dequantisation noise (seeded per position,
above), so N ranks compute the gradient of the same noisy batch as one process, equal up to
float32 summation order (tests/test_srflow_train.py measures the weights after 6 steps). Rank 0 logs,
validates and writes checkpoints. ActNorms are initialised explicitly from the first batch
(the clean HR, outside bf16 autocast) before the first step, with the statistics all-reduced
across ranks by flowkernels, so every rank starts from the global batch's statistics.
DistributedDataParallel only synchronises the parameters that require grad when it is built,
so the wrapper is rebuilt at the RRDB unfreeze step. Small image folders are repeated within
an epoch (each visit with its own crop) so that an epoch holds at least 100 global batches.

Queuing: the host does not wait for the device between steps. A step is queued whole (forward,
backward, the non-finite check, and Adam, fused, which the check's flag turns into a no-op on the
device, as torch.amp.GradScaler does), its loss and flags are copied to pinned host memory
without waiting, and they are read after the next step has been queued; a step that logs,
validates, saves or is the last is read at once (the same steps on every rank). So the host
prepares the next batch while the device runs this step, and the logs, the counters and the
limits below see every step, one step later at most.

Non-finite steps: a step whose loss or gradient is NaN/Inf (on any rank) is skipped (gradients
dropped, parameters and Adam's state unchanged, the step counter and schedule advance) and
counted; after ``max_nonfinite`` in a row the run stops with :class:`NonFiniteTrainingError`
without writing a checkpoint (those already written are untouched; checkpoints never hold
non-finite weights). Because the run is deterministic, resuming repeats the divergence: change
``lr``, clipping or ``seed`` first.

Interrupts: SIGINT (Ctrl-C) and SIGTERM (what a cluster scheduler sends before it kills a job)
never stop a step half-way. During the steps the handlers only record the signal; the current
step finishes, rank 0 writes that step's checkpoint (atomically, like every checkpoint; the
validation of that step is skipped to stay within a scheduler's grace period) and logs where,
and the run ends; ``resume='auto'`` then continues exactly. Afterwards the handlers that were
installed before are restored and the signal is raised again against them, so the process ends
as it would have without the deferral: Python's default SIGINT handler raises KeyboardInterrupt
(the CLI exits 130), the default SIGTERM action ends the process (status 143); a caller's own
handlers get the signal instead. Under DDP a signal may reach only some ranks (``kill`` of one
process): the all-reduce every step already does (loss and non-finite flag) also carries each
rank's SIGTERM, SIGINT and time-limit flags, so all ranks stop after the same step at no extra
collective: at most one step later than one process, which stops after the current step (the
ranks' flags are read with the step's other numbers, above). SIGTERM wins over SIGINT, and every
rank then raises the agreed signal. Repeated signals while stopping change nothing (torchrun
passes the terminal's Ctrl-C on to workers that got it already); SIGKILL, which torchrun and
schedulers send after their grace period, remains the hard stop. The handlers are installed only
around the steps (during setup a signal acts at once: there is nothing to save yet), only from
the main thread (Python's rule) and never over an ignored signal; DataLoader workers ignore both
signals, so a terminal's Ctrl-C to the whole process group does not kill them under a run that
is finishing its step.
"""

from __future__ import annotations

import gc
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

import flowkernels as fk

from .config import (
    CUDA_GRAPH_MODES,
    OFFICIAL_PRESETS,
    TRAJECTORY_FIELDS,
    ConfigError,
    TrainConfig,
    config_to_dict,
    config_to_yaml,
    resolve_config,
)
from .data import HRImageDataset, save_rgb
from .distributed import Distributed, setup_distributed
from .model import SRFlow, dequantization_noise
from .official_checkpoint import CheckpointError, check_state_dict, read_state_dict, strip_prefix
from .presets import get_preset
from .rrdb import RRDBNet
from .training_checkpoint import (
    CHECKPOINT_DIR,
    CheckpointFiles,
    TrainingCheckpoint,
    atomic_write,
    latest_checkpoint,
    list_checkpoints,
    load_training_checkpoint,
    newest_intact_checkpoint,
    prune_checkpoints,
    read_rrdb_weights,
    resolve_checkpoint,
    save_training_checkpoint,
)

__all__ = [
    "NonFiniteTrainingError",
    "RRDBObjective",
    "TrainResult",
    "Trainer",
    "TrainingObjective",
    "cosine_learning_rate",
    "learning_rate_factor",
    "train",
]

_MIN_EPOCH_BATCHES = 100
# Why a run stops before its last step, in priority order: each rank votes for them in the
# step's all-reduce (module docstring, "Interrupts"); the first one with a vote wins.
_SIGNAL_STOPS = ("SIGTERM", "SIGINT")
_STOP_REASONS = (*_SIGNAL_STOPS, "max_minutes")


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run training as configured (see the module docstring). Under torchrun every rank calls
    this. Raises ConfigError / CheckpointError / FileNotFoundError / ValueError for bad inputs
    (data, device, backend, checkpoints: before anything is written) and NonFiniteTrainingError
    when the loss keeps diverging. A SIGINT or SIGTERM during the steps saves the step it
    interrupted once that step has finished, then reaches the caller's handlers (with Python's
    defaults: KeyboardInterrupt, or the end of the process); module docstring, "Interrupts"."""
    return Trainer(config, log).run()


def cudagraph_fallbacks(since: dict[str, int] | None = None) -> dict[str, int]:
    """Inductor's counts, in this process (minus ``since``, an earlier reading), of graphs it ran
    without CUDA graphs (``skips``: a mutated input, a graph without CUDA ops, ...) and of the
    pieces it cut graphs into around ops it cannot capture, e.g. CPU ops (``partitions``). In the
    CUDA-graph modes it falls back this way silently but for a log that is off by default
    (``TORCH_LOGS=cudagraphs``). Reads torch's private counters (torch 2.11 and 2.13)."""
    from torch._dynamo.utils import counters  # noqa: PLC0415 (private; loaded with torch.compile anyway)

    now = {"skips": counters["inductor"]["cudagraph_skips"], "partitions": counters["inductor"]["cudagraph_partitions"]}
    return now if since is None else {k: v - since[k] for k, v in now.items()}


def learning_rate_factor(step: int, steps: int, milestones: tuple[float, ...], gamma: float) -> float:
    """LR multiplier of 0-based step ``step``: ``gamma ** #(milestones <= step + 1)``, milestone
    iterations ``int(fraction * steps)`` (the official MultiStepLR, stepped before each update)."""
    passed = sum(1 for f in milestones if int(f * steps) <= step + 1)
    return gamma**passed


def cosine_learning_rate(step: int, base: float, period: int, restarts: int, lr_min: float) -> float:
    """LR of 0-based step ``step`` under the official CosineAnnealingLR_Restart (stepped before each
    update, so iteration ``t = step + 1``): ``lr_min + (base - lr_min) * (1 + cos(pi * (t - r) /
    period)) / 2`` with ``r`` the last restart at or before ``t`` among ``period, 2 * period, ...,
    restarts * period`` (0 before the first). Past the last restart the cosine goes on without
    jumps: back up to ``base`` after ``2 * period``, as the official scheduler does."""
    t = step + 1
    last = min(t // period, restarts) * period
    return lr_min + (base - lr_min) * (1 + math.cos(math.pi * (t - last) / period)) / 2


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps), for per-step generators."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x & 0x7FFFFFFFFFFFFFFF


def _stop_reason(votes: list[float]) -> str | None:
    """The first of :data:`_STOP_REASONS` with a vote (``votes``: one count per reason), or None."""
    return next((reason for reason, n in zip(_STOP_REASONS, votes, strict=True) if n), None)


def _to_device(values: Tensor, device: torch.device) -> Tensor:
    """Host ``values`` on ``device`` without waiting for it: a blocking copy would wait for all
    the work queued on the device, and a non-blocking one is only asynchronous from pinned memory."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _to_host(values: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """``values`` on their way to host memory without waiting for the device, and the event that
    fires when they are there (None when they already are)."""
    if values.device.type != "cuda":
        return values, None
    host = values.to("cpu", non_blocking=True)  # into pinned memory: the copy is queued, not waited for
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(values.device))  # the copy's stream, whichever GPU is current
    return host, copied


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``losses`` are global means)."""

    step: int
    out: Path
    checkpoint: CheckpointFiles | None
    losses: list[tuple[int, float]]  # (1-based step, mean loss in bits/px) of every finite step
    nonfinite_steps: int
    stopped: str  # "finished", "stop_after", "max_minutes", "SIGTERM", "SIGINT"
    validation: dict[str, float] = field(default_factory=dict)


class TrainingObjective(nn.Module):
    """The per-sample loss, so that DistributedDataParallel wraps one forward: the NLL in bits
    per HR pixel (plus ``l1_weight`` x the L1 loss of the temperature-0 sample), under bf16
    autocast if asked. Returns (loss (B,), nll (B,))."""

    def __init__(self, model: SRFlow, dequantize: bool, l1_weight: float, bf16: bool) -> None:
        super().__init__()
        self.model = model
        self.dequantize, self.l1_weight, self.bf16 = dequantize, l1_weight, bf16

    def forward(self, hr: Tensor, lr: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``noise``: the dequantisation draws (:func:`~srflow.dequantization_noise`), drawn by
        the caller outside the (possibly compiled) objective; None: from the global RNG."""
        with torch.autocast(hr.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            cond = self.model.condition(lr)
            nll = self.model.nll(hr, cond=cond, add_noise=self.dequantize, noise=noise)
            loss = nll
            if self.l1_weight:
                loss = nll + self.l1_weight * self.model.l1_loss(hr, cond=cond)
        return loss, nll


class RRDBObjective(nn.Module):
    """The RRDB stage's per-sample loss: ``mean |RRDB(lr) - hr|`` over (3, H, W) (the official
    ``pixel_criterion: l1``, weight 1; its batch mean is the official L1), the RRDB under bf16
    autocast if asked. Returns (loss (B,), loss (B,)), the shape of :class:`TrainingObjective`'s."""

    def __init__(self, rrdb: RRDBNet, bf16: bool) -> None:
        super().__init__()
        self.rrdb, self.bf16 = rrdb, bf16

    def forward(self, hr: Tensor, lr: Tensor, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        with torch.autocast(hr.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            sr = self.rrdb(lr)
        loss = (sr.float() - hr).abs().mean(dim=(1, 2, 3))
        return loss, loss


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


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the whole process group, and a
    worker it killed would fail the step the main process is finishing (module docstring,
    "Interrupts"); the DataLoader ends its workers itself."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


class _DeferredSignals:
    """SIGINT/SIGTERM handlers that only record the signal, so that the run stops at a step
    boundary (module docstring, "Interrupts"). ``with`` installs them and restores the previous
    handlers; :meth:`deliver` then raises the recorded signal against those."""

    def __init__(self) -> None:
        self.pending: signal.Signals | None = None  # raised again by deliver(); SIGTERM wins
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> _DeferredSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal.signal works only in the main thread: signals act as usual
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            # An ignored signal stays ignored (nohup, background jobs); None is a handler set
            # outside Python, which signal.signal could not restore.
            if previous is not signal.SIG_IGN and previous is not None:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _record(self, signum: int, frame: object) -> None:
        if self.pending != signal.SIGTERM:
            self.pending = signal.Signals(signum)

    def deliver(self) -> None:
        """Raise the recorded signal, if any, against the restored handlers (the default SIGTERM
        action ends the process at once, so the output streams are flushed first)."""
        if self.pending is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            signal.raise_signal(self.pending)


@dataclass
class _StepStats:
    """A queued step's numbers on their way to the host: copied without waiting for the device and
    read by :meth:`Trainer._settle` one step later, so that the host queues the next step while
    this one runs (a read at once would leave the device idle while the host prepares the next)."""

    step: int  # 1-based: the step these numbers are of
    values: Tensor  # [loss summed over the ranks (0 when non-finite), non-finite ranks, *stop votes (several ranks)]
    copied: torch.cuda.Event | None  # fires when ``values`` has reached host memory; None: it is there


@dataclass
class _RunState:
    """One call of :meth:`Trainer.run`: its data and outputs, and its progress."""

    out: Path
    ckpt_dir: Path
    dataset: HRImageDataset
    val_set: HRImageDataset | None  # rank 0 with validation on, else None
    sampler: torch.utils.data.DistributedSampler
    end: int  # the step this call stops at: steps, or stop_after
    step: int  # optimisation steps done so far
    nonfinite_total: int
    nonfinite_in_row: int
    last_saved: CheckpointFiles | None
    t_start: float  # perf_counter at the first step (the max_minutes clock)
    t_window: float  # perf_counter at the start of the current logging window
    queued: _StepStats | None = None  # the last step's numbers, not read yet
    losses: list[tuple[int, float]] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # finite losses since the last log line
    validation: dict[str, float] = field(default_factory=dict)
    stopped: str = "finished"


class Trainer:
    """One training run (see the module docstring); :func:`train` is the entry point.

    :meth:`_run` reads as its steps: :meth:`_prepare` (checks, data, model, optimiser, outputs),
    then per batch :meth:`_train_step` and :meth:`_after_step` (log, unfreeze, validate, save,
    time limit), then :meth:`_finish`.
    """

    def __init__(self, config: TrainConfig, log: Callable[[str], None] | None = None) -> None:
        self.config = config  # resolved (defaults filled in, everything checked) by run()
        self._custom_log = log is not None
        self._print = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # Built by run() and _prepare(); None before.
        self.dist: Distributed | None = None
        self.bar = None  # the tqdm bar (rank 0)
        self.writer = None  # the TensorBoard SummaryWriter (rank 0, with tensorboard on)
        self.model: SRFlow | RRDBNet | None = None  # RRDBNet in the RRDB stage
        self.objective: TrainingObjective | RRDBObjective | None = None
        self.wrapped: nn.Module | None = None  # the objective, or its DistributedDataParallel wrapper
        self.optimizer: torch.optim.Adam | None = None
        self.unfreeze_step = 0  # the RRDB is trainable from this step on
        self.actnorms_pending = True  # the first batch still has to initialise the ActNorms
        self.signals = _DeferredSignals()
        self._cudagraph_seen: dict[str, int] | None = None  # rank 0, CUDA-graph modes: fallbacks warned of

    @property
    def _rrdb_stage(self) -> bool:
        return self.config.stage == "rrdb"

    @property
    def _command(self) -> str:
        return "train-rrdb" if self._rrdb_stage else "train"

    @property
    def _unit(self) -> str:
        """The loss's unit: L1 (mean absolute error in [0, 1] units) or bits per HR pixel."""
        return "L1" if self._rrdb_stage else "bits/px"

    def log(self, message: str) -> None:
        """Rank 0 only: through the progress bar when it is shown (so it is not broken up)."""
        if self.dist.main:
            if self._custom_log or self.bar is None or self.bar.disable:
                self._print(message)
            else:
                self.bar.write(message, file=sys.stderr)

    # ---------------------------------------------------------------------------------- run

    def run(self) -> TrainResult:
        """Train (see the module docstring); the progress bar, TensorBoard writer and a process
        group this call created are closed however it ends."""
        # Everything checkable is checked before a process group is joined or a file written.
        self.config = resolve_config(self.config)
        self.dist = setup_distributed(self.config.device)
        try:
            result = self._run()
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.close()
            self.dist.close()
        self.signals.deliver()  # only after a normal end: an exception must not be replaced
        return result

    def _run(self) -> TrainResult:
        run = self._prepare()
        with self.signals:
            while run.step < run.end:
                for hr, lr in self._epoch_loader(run):
                    self._train_step(run, hr, lr)
                    if self._after_step(run):
                        return self._finish(run)
            return self._finish(run)

    def _prepare(self) -> _RunState:
        """Check the config and the output folder, build the data, the model and the optimiser
        (restored when resuming), then open the outputs. Everything is checked before anything is
        written: a failed start leaves the folder as it was."""
        c, d = self.config, self.dist  # resolved by run(): fields, output folder, device, backend
        if c.batch % d.world:
            raise ConfigError(f"batch: the global batch {c.batch} is not divisible by the {d.world} ranks")
        out = Path(c.out)
        ckpt_dir = out / CHECKPOINT_DIR
        resume = self._find_resume(ckpt_dir)
        self._check_rrdb_source(resume)
        dataset, val_set = self._datasets()
        self.model = self._build_model(resume)
        if isinstance(self.model, SRFlow):
            # The batches are uint8 images / 255: finite and in [0, 1] by construction, so the
            # model skips its per-call scan of them (a host sync that would stall every step).
            self.model.check_inputs = False
        if self._rrdb_stage:
            self.objective = RRDBObjective(self.model, c.bf16)
            self.actnorms_pending = False
        else:
            self.objective = TrainingObjective(self.model, c.dequantize, c.l1_weight, c.bf16)
        self.optimizer = self._make_optimizer(self.model)
        start, nonfinite_total, in_row = self._restore(resume) if resume is not None else (0, 0, 0)
        if val_set is not None and (c.val_data is None or Path(c.val_data).resolve() == Path(c.data).resolve()):
            # said once everything is checked, so that a refused start shows only its error
            warnings.warn(
                f"validation runs on training images (the first {c.val_images} of {c.data!r}), so its metrics "
                "say how well the model fits its training data, not how it generalises; pass val_data "
                "(--val-data) with held-out images",
                stacklevel=3,
            )
        if d.main:
            self._open_outputs(out, start)
        self.unfreeze_step = int(c.rrdb_freeze_fraction * c.steps)
        self._set_rrdb_trainable(start)
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=c.seed, drop_last=True
        )
        self.log(self._banner(resume, start, len(dataset.files)))
        now = time.perf_counter()
        run = _RunState(
            out=out,
            ckpt_dir=ckpt_dir,
            dataset=dataset,
            val_set=val_set,
            sampler=sampler,
            end=min(c.steps, c.stop_after) if c.stop_after is not None else c.steps,
            step=start,
            nonfinite_total=nonfinite_total,
            nonfinite_in_row=in_row,
            last_saved=resume.files if resume is not None else None,
            t_start=now,
            t_window=now,
        )
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        if c.compile in CUDA_GRAPH_MODES and d.main:
            self._cudagraph_seen = cudagraph_fallbacks()
        return run

    def _epoch_loader(self, run: _RunState) -> torch.utils.data.DataLoader:
        """The rest of the current epoch's batches for this rank (a resume starts mid-epoch)."""
        c, d = self.config, self.dist
        per_rank = c.batch // d.world
        epoch, offset = divmod(run.step, len(run.sampler) // per_rank)
        run.dataset.set_epoch(epoch)
        run.sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            run.dataset,
            batch_sampler=_Batches(run.sampler, per_rank, offset),
            num_workers=c.workers if c.workers is not None else (4 if d.device.type == "cuda" else 0),
            pin_memory=d.device.type == "cuda",
            worker_init_fn=_ignore_stop_signals,
        )

    def _train_step(self, run: _RunState, hr: Tensor, lr: Tensor) -> None:
        """Queue one optimisation step, then book the previous step's numbers (:meth:`_settle`),
        and this step's too where they are needed now: a step that logs, validates, saves or is
        the last. Those steps depend only on the step number, so every rank settles the same."""
        queued, stop = self._optimize(run.step, hr, lr, run.t_start)
        run.step += 1
        if self._cudagraph_seen is not None:
            self._warn_cudagraph_fallbacks(run.step)
        if stop is not None:
            self._stop(run, stop)
        previous, run.queued = run.queued, queued
        if previous is not None:
            self._settle(run, previous)
        c = self.config
        due = (n for n in (c.log_every, c.save_every, c.val_every) if n)
        if run.stopped != "finished" or run.step == run.end or any(run.step % n == 0 for n in due):
            run.queued = None
            self._settle(run, queued)

    def _stop(self, run: _RunState, reason: str) -> None:
        """End the run after this step (:meth:`_after_step` sees ``run.stopped``)."""
        run.stopped = reason
        if reason in _SIGNAL_STOPS:
            self.signals.pending = signal.Signals[reason]  # every rank ends as agreed

    def _settle(self, run: _RunState, queued: _StepStats) -> None:
        """Book a queued step, waiting for its numbers if they are still on the way: its loss, or
        its skip as non-finite (raises NonFiniteTrainingError after ``max_nonfinite`` in a row),
        and on several ranks the stop they agreed on."""
        if queued.copied is not None:
            queued.copied.synchronize()
        total, bad, *summed = queued.values.tolist()
        if summed and (stop := _stop_reason(summed)) is not None:
            self._stop(run, stop)
        if not bad:
            mean = total / self.dist.world
            run.nonfinite_in_row = 0
            run.losses.append((queued.step, mean))
            run.window.append(mean)
            return
        run.nonfinite_in_row += 1
        run.nonfinite_total += 1
        self.log(f"step {queued.step}: non-finite loss or gradient, step skipped ({run.nonfinite_in_row} in a row)")
        c = self.config
        if run.nonfinite_in_row >= c.max_nonfinite:
            last = run.last_saved
            where = f"{str(last.weights)!r} (step {last.step})" if last is not None else "none"
            raise NonFiniteTrainingError(
                f"training stopped at step {queued.step}: {run.nonfinite_in_row} consecutive steps with a non-finite "
                f"loss or gradient (max_nonfinite {c.max_nonfinite}); nothing was saved at this point; last "
                f"checkpoint: {where}. Try a lower lr, gradient clipping (grad_clip_norm 100) or bf16 off"
            )

    def _after_step(self, run: _RunState) -> bool:
        """Progress, logging, the RRDB unfreeze, validation and checkpoints after a step. Returns
        whether the run stops here (its last step, out of time or interrupted: the step's
        all-reduce agreed on that in :meth:`_train_step`)."""
        c, d = self.config, self.dist
        if self.bar is not None:
            self._update_bar(run.window)
        if d.main and run.step % c.log_every == 0 and run.window:
            self._log_loss(run)
        if run.step == self.unfreeze_step and not self._rrdb_stage:
            self._set_rrdb_trainable(run.step)
            self.log(f"step {run.step}: RRDB unfrozen (trained jointly from now on)")
        final = run.step == run.end or run.stopped != "finished"
        interrupted = run.stopped in _SIGNAL_STOPS
        if c.val_every and d.main and not interrupted and (run.step % c.val_every == 0 or final):
            run.validation = self._validate(run)
        if d.main and (run.step % c.save_every == 0 or final):
            run.last_saved = self._save(run)
        return final

    def _finish(self, run: _RunState) -> TrainResult:
        if run.stopped == "finished" and run.end < self.config.steps:
            run.stopped = "stop_after"
        if self.dist.world > 1:
            dist.barrier()
        where = str(run.last_saved.weights) if run.last_saved else "none"
        if run.stopped in _SIGNAL_STOPS:
            self.log(
                f"srflow {self._command}: stopped by {run.stopped} after finishing step {run.step}; its checkpoint is "
                f"saved in {where!r} (resume 'auto' continues from it)"
            )
        else:
            self.log(f"srflow {self._command}: {run.stopped} at step {run.step}; checkpoint {where}")
        return TrainResult(
            run.step, run.out, run.last_saved, run.losses, run.nonfinite_total, run.stopped, run.validation
        )

    # ---------------------------------------------------------------------------------- setup

    def _banner(self, resume: TrainingCheckpoint | None, start: int, images: int) -> str:
        """The first log line, in the order a run is set up: what, from where, on which data,
        with which optimisation (the learning rates the next step uses), on what hardware."""
        c, d = self.config, self.dist
        origin = f"steps {start} to {c.steps}" + (f" (resuming {str(resume.files.state)!r})" if resume else "")
        now = self._lr(start, c.lr)
        lr = f"lr {now:g}" + (f" (base {c.lr:g}, {c.lr_schedule} schedule)" if now != c.lr else "")
        data = (
            f"global batch {c.batch} ({d.world} rank(s) x {c.batch // d.world}) of {c.crop}x{c.crop} crops from "
            f"{images} images"
        )
        hardware = f"device {d.device}" + ("" if c.compile == "off" else f", torch.compile {c.compile}")
        if resume is not None:
            source = "weights from the checkpoint"
        elif c.init_official is not None:
            source = f"all weights from {c.init_official!r}"
        elif c.rrdb_weights is not None:
            source = f"RRDB from {c.rrdb_weights!r}"
        else:
            source = "random RRDB" + ("" if self._rrdb_stage else " (from scratch)")
        if self._rrdb_stage:
            return (
                f"srflow train-rrdb: preset {c.preset}, {origin}, {source}; {data}; L1 loss, {lr}, "
                f"Adam betas {tuple(c.betas)}; {hardware}"
            )
        if c.lr_rrdb != c.lr:
            lr += f", RRDB lr {self._lr(start, c.lr_rrdb):g}"
        if self.unfreeze_step == 0:
            rrdb = "RRDB trainable from the start"
        elif self.unfreeze_step >= c.steps:
            rrdb = "RRDB frozen throughout"
        elif start >= self.unfreeze_step:
            rrdb = f"RRDB trainable (unfrozen at step {self.unfreeze_step})"
        else:
            rrdb = f"RRDB frozen until step {self.unfreeze_step}"
        return (
            f"srflow train: preset {c.preset}, recipe {c.recipe}, {origin}, {source}; {data}; "
            f"{lr}, {rrdb}, dequantisation noise {'on' if c.dequantize else 'off'}; {hardware}, "
            f"backend {c.backend}, memory_saving {c.memory_saving}"
        )

    def _find_resume(self, ckpt_dir: Path) -> TrainingCheckpoint | None:
        """The checkpoint to resume, loaded and verified (None: a fresh run)."""
        c = self.config
        existing = list_checkpoints(ckpt_dir)
        if c.resume is None:
            if existing:
                raise ConfigError(
                    f"output folder {c.out!r} already holds checkpoints (newest: step {existing[-1].step}); "
                    "set resume to 'auto' to continue that run, or choose another output folder"
                )
            return None
        files = latest_checkpoint(ckpt_dir) if c.resume == "auto" else resolve_checkpoint(c.resume)
        if files is None:
            return None
        try:
            resume = load_training_checkpoint(files, c.preset, c.stage)
        except (CheckpointError, FileNotFoundError) as exc:
            intact = newest_intact_checkpoint(ckpt_dir, files.step, c.preset, c.stage) if c.resume == "auto" else None
            if intact is None:
                raise
            # Not a silent fallback to the older checkpoint: the damaged files would also block
            # the save of their step later (checkpoints are never overwritten), and a damaged
            # newest checkpoint can mean a failing disk the user should know about.
            damaged = [e.step for e in existing if e.step > intact.step]
            raise CheckpointError(
                f"{exc}; the newest intact checkpoint is {str(intact.state)!r} (step {intact.step}). "
                f"To continue from it, move the files of the damaged checkpoint(s) {damaged} "
                f"(step-NNNNNNNNN.safetensors and .state.pt) out of {str(ckpt_dir)!r} and resume 'auto' again, "
                f"or resume from {str(intact.state)!r} (set resume to that path) into another output folder"
            ) from exc
        newer = [e.step for e in existing if e.step > resume.step]
        if newer:
            raise ConfigError(
                f"output folder {c.out!r} holds checkpoints newer than the one to resume "
                f"({str(resume.files.state)!r}, step {resume.step}): steps {newer}; resuming would overwrite "
                "them. Resume from the newest one or choose another output folder"
            )
        return resume

    def _datasets(self) -> tuple[HRImageDataset, HRImageDataset | None]:
        """The training set and (rank 0, validation on) the validation set."""
        c = self.config
        scale = get_preset(c.preset).scale
        dataset = HRImageDataset(
            c.data,
            scale,
            crop=c.crop,
            lr_root=c.lr_data,
            flips=c.flips,
            rotations=c.rotations,
            seed=c.seed,
            cache=c.cache_images,
        )
        # Small folders are repeated (each visit with its own crop) so that an epoch holds at
        # least _MIN_EPOCH_BATCHES global batches: epochs restart the DataLoader (and its workers).
        dataset.repeat = max(1, math.ceil(c.batch * _MIN_EPOCH_BATCHES / dataset.base_len))
        if not (c.val_every and self.dist.main):
            return dataset, None
        val_set = HRImageDataset(
            c.val_data or c.data,
            scale,
            crop=c.val_crop,
            lr_root=c.lr_data if c.val_data is None else None,
            flips=False,
            multiple=2 * scale,
            center=True,
            max_images=c.val_images,
        )
        return dataset, val_set

    def _check_rrdb_source(self, resume: TrainingCheckpoint | None) -> None:
        """An official preset's SRFlow stage starts from pretrained RRDB weights, an official
        checkpoint or a resume, or says that it does not on purpose (``from_scratch``)."""
        c = self.config
        if self._rrdb_stage or c.preset not in OFFICIAL_PRESETS or c.from_scratch:
            return
        if resume is None and c.rrdb_weights is None and c.init_official is None:
            raise ConfigError(
                f"preset {c.preset}: every official SRFlow started from a pretrained RRDB, and this run has none. "
                f"Train one with `srflow train-rrdb --preset {c.preset} --data ... --out runs/rrdb` (the official "
                "RRDB recipe) and pass --rrdb-weights runs/rrdb, or pass --init-official SRFlow_*.pth; "
                "--from-scratch starts from a random RRDB on purpose"
            )

    def _build_model(self, resume: TrainingCheckpoint | None) -> SRFlow | RRDBNet:
        c = self.config
        if self._rrdb_stage:
            return self._build_rrdb(resume)
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
            self._load_rrdb_weights(model.RRDB)
        return self._placed(model)

    def _build_rrdb(self, resume: TrainingCheckpoint | None) -> RRDBNet:
        """The RRDB stage's model: ESRGAN's RRDBNet of the preset, with its image head."""
        c = self.config
        p = get_preset(c.preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c.seed)
            model = RRDBNet(p.nf, p.gc, p.nb, p.scale, p.block_idxs)
        if resume is not None:
            check_state_dict(model, resume.weights, f"checkpoint {str(resume.files.weights)!r}", c.preset)
            model.load_state_dict(resume.weights, strict=True)
        elif c.rrdb_weights is not None:
            self._load_rrdb_weights(model)
        return self._placed(model)

    def _load_rrdb_weights(self, rrdb: RRDBNet) -> None:
        c = self.config
        state, _ = read_rrdb_weights(c.rrdb_weights)
        check_state_dict(rrdb, state, f"RRDB weights {c.rrdb_weights!r}", c.preset)
        rrdb.load_state_dict(state, strict=True)

    def _placed(self, model: nn.Module) -> nn.Module:
        model = model.to(self.dist.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.train()

    def _make_optimizer(self, model: SRFlow | RRDBNet) -> torch.optim.Adam:
        c = self.config
        if self._rrdb_stage:
            groups = [{"params": list(model.parameters()), "lr": c.lr, "name": "rrdb", "base_lr": c.lr}]
            return self._adam(groups)
        rrdb = {id(p) for p in model.rrdb_parameters()}
        flow = [p for p in model.parameters() if p.requires_grad and id(p) not in rrdb]
        # Frozen RRDB parameters sit in their own group from the start: with no gradient Adam
        # skips them, so unfreezing needs no change of the optimiser (and its state_dict layout
        # is the same before and after).
        groups = [
            {"params": flow, "lr": c.lr, "name": "flow", "base_lr": c.lr},
            {"params": model.rrdb_parameters(), "lr": c.lr_rrdb, "name": "rrdb", "base_lr": c.lr_rrdb},
        ]
        return self._adam(groups)

    def _adam(self, groups: list[dict]) -> torch.optim.Adam:
        """Adam over ``groups``, fused: one multi-tensor kernel per group and dtype instead of a
        few per parameter, and it skips a non-finite step on the device (``found_inf``, see
        :meth:`_optimize`), so the host never waits for a step to decide. On the CPU it also
        takes 0.4x of the default implementation's time for df2k-4x's parameters (docs/srflow.md)."""
        c = self.config
        return torch.optim.Adam(
            groups, lr=c.lr, betas=tuple(c.betas), eps=c.adam_eps, weight_decay=c.weight_decay, fused=True
        )

    def _restore(self, resume: TrainingCheckpoint) -> tuple[int, int, int]:
        """Adam's state, the global RNG states and the counters of ``resume``; warns about changed
        trajectory settings. Returns (step, non-finite steps in all, non-finite steps in a row)."""
        try:
            self.optimizer.load_state_dict(self._as_fused(resume))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"checkpoint {str(resume.files.state)!r}: optimiser state does not fit ({exc})"
            ) from exc
        rng = resume.state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self._compare_config(resume)
        state = resume.state
        return resume.step, int(state.get("nonfinite_total", 0)), int(state.get("nonfinite_in_row", 0))

    def _as_fused(self, resume: TrainingCheckpoint) -> dict:
        """``resume``'s Adam state with this optimiser's implementation (fused) in its groups:
        ``load_state_dict`` would otherwise restore the saved one, and checkpoints written before
        2026-12-07 hold a non-fused Adam, which cannot skip a step on the device. Its state then
        moves to the parameters' device (fused Adam keeps its step counts there)."""
        saved = resume.state["optimizer"]
        implementation = {key: self.optimizer.defaults[key] for key in ("fused", "foreach", "capturable")}
        if any(group.get("fused") is not True for group in saved["param_groups"]):
            warnings.warn(
                f"checkpoint {str(resume.files.state)!r} holds the state of a non-fused Adam (srflow before "
                "2026-12-07); training continues with fused Adam, which rounds differently, so the run is close to, "
                "not bitwise, the one it continues",
                stacklevel=4,
            )
        return {**saved, "param_groups": [{**group, **implementation} for group in saved["param_groups"]]}

    def _compare_config(self, resume: TrainingCheckpoint) -> None:
        saved = resume.state.get("config", {})
        now = config_to_dict(self.config)
        changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in TRAJECTORY_FIELDS if k in saved and saved[k] != now[k]]
        if resume.state.get("world_size", self.dist.world) != self.dist.world:
            changed.append(
                f"world size: {resume.state['world_size']} -> {self.dist.world} "
                "(same batches and noise, but float32 sums in another order)"
            )
        if changed:
            self.log(
                "warning: resuming with settings that differ from the checkpoint's, so the run will not "
                "match an uninterrupted one: " + "; ".join(changed)
            )

    def _open_outputs(self, out: Path, start: int) -> None:
        """Rank 0: the output folder, its config.yaml, the TensorBoard writer (if asked) and the
        progress bar (from step ``start``)."""
        c = self.config
        out.mkdir(parents=True, exist_ok=True)
        text = config_to_yaml(c)
        atomic_write(out / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        if c.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 (optional package)

            self.writer = SummaryWriter(str(out / "tensorboard"))
        self.bar = tqdm(
            total=c.steps, initial=start, disable=not c.progress, dynamic_ncols=True, unit="it", file=sys.stderr
        )

    def _wrap(self) -> nn.Module:
        """The objective as the step calls it: under DistributedDataParallel on several ranks,
        compiled with ``compile`` unless off (one graph for a single process; under DDP, Dynamo
        splits it at the gradient buckets)."""
        wrapped = self.objective
        if self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            wrapped = DistributedDataParallel(self.objective, device_ids=ids)
        mode = self.config.compile
        if mode == "off":
            return wrapped
        return torch.compile(wrapped, mode=None if mode == "default" else mode, fullgraph=self.dist.world == 1)

    def _set_rrdb_trainable(self, step: int) -> None:
        """RRDB frozen before ``unfreeze_step``, trainable from it; (re)build the DDP wrapper."""
        want = step >= self.unfreeze_step
        changed = not self._rrdb_stage and self.model.rrdb_trainable != want
        if changed:
            self.model.set_rrdb_trainable(want)
        if self.wrapped is None or (changed and self.dist.world > 1):
            # DistributedDataParallel registers its gradient hooks for the parameters that
            # require grad *when it is built*: a wrapper built with the RRDB frozen would never
            # all-reduce the RRDB's gradients, so the ranks would drift apart. Rebuild it.
            self.wrapped = None
            gc.collect()  # release the old reducer and its hooks before the new one registers
            self.wrapped = self._wrap()

    def _warn_cudagraph_fallbacks(self, step: int) -> None:
        """Warn when a compilation or replay since the last check fell back from CUDA graphs (the
        first step's compilation, a recompile's, e.g. when the RRDB is unfrozen): the step still
        runs, but what was to be replayed is launched kernel by kernel."""
        new = cudagraph_fallbacks(since=self._cudagraph_seen)
        if not any(v > 0 for v in new.values()):
            return
        self._cudagraph_seen = cudagraph_fallbacks()
        what = []
        if new["skips"] > 0:
            what.append(f"ran {new['skips']} graph(s) without CUDA graphs")
        if new["partitions"] > 0:
            what.append(f"cut the step's graphs into {new['partitions']} pieces around ops it cannot capture")
        why = (
            "TORCH_LOGS=cudagraphs names the reasons"
            if self.dist.device.type == "cuda"
            else f"CUDA graphs need a CUDA device, and this run is on {self.dist.device}"
        )
        warnings.warn(
            f"step {step}: compile {self.config.compile}: Inductor {' and '.join(what)}, so part of the training step "
            f"is launched kernel by kernel ({why})",
            stacklevel=2,
        )

    # ---------------------------------------------------------------------------------- steps

    def _lr(self, step: int, base: float) -> float:
        """The learning rate of 0-based step ``step`` for a parameter group of base rate ``base``."""
        c = self.config
        if c.lr_schedule == "cosine":
            return cosine_learning_rate(step, base, c.cosine_period, c.cosine_restarts, c.lr_min)
        return base * learning_rate_factor(step, c.steps, c.lr_milestones, c.lr_gamma)

    def _stop_votes(self, t_start: float) -> list[float]:
        """This rank's flags for :data:`_STOP_REASONS` (1.0 = stop), summed over the ranks by
        the step's all-reduce in :meth:`_optimize`; ``t_start`` starts the max_minutes clock."""
        c, pending = self.config, self.signals.pending
        time_up = c.max_minutes is not None and time.perf_counter() - t_start > 60 * c.max_minutes
        return [float(pending == signal.SIGTERM), float(pending == signal.SIGINT), float(time_up)]

    def _update_bar(self, window: list[float]) -> None:
        bar, c = self.bar, self.config
        bar.update(1)
        postfix = {}
        if window:
            postfix[self._unit] = f"{sum(window) / len(window):.4g}"
        rate = bar.format_dict.get("rate")
        if rate:
            postfix["samples/s"] = f"{rate * c.batch:.1f}"
        if self.dist.device.type == "cuda":
            postfix["peak_mem"] = f"{torch.cuda.max_memory_allocated(self.dist.device) / 2**30:.2f}GiB"
        bar.set_postfix(postfix, refresh=False)

    def _noise(self, step: int, hr: Tensor) -> Tensor | None:
        """The dequantisation noise of this rank's samples of 0-based step ``step`` (None when
        dequantisation is off), drawn here, outside the compiled objective: one generator per
        sample, seeded from its position in the global batch (rank r holds positions r, r + N,
        r + 2N, ...; see :class:`_Batches`): N ranks draw exactly the noise of one process,
        whatever N."""
        c, d = self.config, self.dist
        if not c.dequantize:
            return None
        generators = []
        for j in range(hr.shape[0]):
            gen = torch.Generator(device=d.device)
            gen.manual_seed(_mix(c.seed, step, d.rank + d.world * j))
            generators.append(gen)
        return dequantization_noise(hr, generators)

    def _optimize(self, step: int, hr: Tensor, lr: Tensor, t_start: float) -> tuple[_StepStats, str | None]:
        """Queue one optimisation step at 0-based ``step`` without waiting for the device: a
        non-finite loss or gradient (on any rank) makes fused Adam skip it on the device. Returns
        the step's numbers on their way to the host, and in one process the stop reason
        (``t_start``: see :meth:`_stop_votes`); several ranks agree on stopping when the numbers
        are settled."""
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
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step, group["base_lr"])
        loss, _ = self.wrapped(hr, lr, self._noise(step, hr))
        loss = loss.mean()
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        # The norm of the raw gradients (max_norm=inf leaves them as they are; torch >= 2.4 API),
        # checked before any clipping could hide an Inf.
        grad_norm = torch.nn.utils.clip_grad_norm_(params, math.inf) if params else loss.new_zeros(())
        detached = loss.detach()
        finite = torch.isfinite(detached) & torch.isfinite(grad_norm.to(detached.device))
        values = torch.stack([torch.where(finite, detached, torch.zeros_like(detached)), (~finite).to(detached.dtype)])
        # Read after the backward, so that a signal during this step stops after it.
        votes = self._stop_votes(t_start)
        stop = None
        if d.world > 1:
            # The gradients were already averaged; this agrees on skipping and on stopping.
            values = torch.cat([values, _to_device(torch.tensor(votes, dtype=values.dtype), values.device)])
            dist.all_reduce(values)
        else:
            stop = _stop_reason(votes)
        if c.grad_clip_value is not None:  # HCFlow's order: value, then norm
            torch.nn.utils.clip_grad_value_(params, c.grad_clip_value)
        if c.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, c.grad_clip_norm)
        # How torch.amp.GradScaler hands fused Adam its flag: the step, weight decay included, and
        # Adam's step count are left as they were when it is non-zero.
        self.optimizer.found_inf = (values[1] > 0).float()
        self.optimizer.step()
        del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return _StepStats(step + 1, *_to_host(values)), stop

    # ---------------------------------------------------------------------------------- outputs

    def _log_loss(self, run: _RunState) -> None:
        """Rank 0: the mean loss of the window since the last log line; starts a new window."""
        mean = sum(run.window) / len(run.window)
        elapsed = time.perf_counter() - run.t_window
        rate = len(run.window) / elapsed if elapsed > 0 else float("nan")
        key = "loss_l1" if self._rrdb_stage else "loss_bits_px"
        self._record(run.out, run.step, {key: mean, "it_per_s": rate, "lr": self._lr(run.step - 1, self.config.lr)})
        self.log(
            f"step {run.step}: {mean:.4f} {self._unit} (mean of the last {len(run.window)} steps), {rate:.2f} it/s"
        )
        run.window, run.t_window = [], time.perf_counter()

    def _save(self, run: _RunState) -> CheckpointFiles:
        c, step = self.config, run.step
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {
            "optimizer": self.optimizer.state_dict(),
            "rng": rng,
            "nonfinite_total": run.nonfinite_total,
            "nonfinite_in_row": run.nonfinite_in_row,
            "rrdb_trainable": self._rrdb_stage or self.model.rrdb_trainable,
            "world_size": self.dist.world,
            "config": config_to_dict(c),
            "torch_version": str(torch.__version__),
        }
        try:
            files = save_training_checkpoint(run.ckpt_dir, step, c.preset, self.model.state_dict(), state, c.stage)
        except ValueError as exc:
            raise NonFiniteTrainingError(f"step {step}: {exc}") from exc
        prune_checkpoints(run.ckpt_dir, c.keep_last)
        return files

    def _record(self, out: Path, step: int, values: dict[str, float]) -> None:
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def _validate(self, run: _RunState) -> dict[str, float]:
        """Rank 0: validation metrics (logged and recorded) and the sample grid in ``<out>/val``."""
        from .infer import make_grid, rrdb_validation_grid, validation_grid  # noqa: PLC0415 (metrics need scikit-image)

        c = self.config
        if self._rrdb_stage:
            result, rows = rrdb_validation_grid(self.model, run.val_set)
        else:
            result, rows = validation_grid(self.model, run.val_set, c.val_temperatures, c.seed, c.dequantize)
        (run.out / "val").mkdir(parents=True, exist_ok=True)
        grid_path = run.out / "val" / f"step-{run.step:09d}.png"
        save_rgb(make_grid(rows), grid_path)
        self._record(run.out, run.step, result)
        if self._rrdb_stage:
            self.log(
                f"step {run.step}: validation PSNR {result['val_psnr']:.2f} dB, LR-PSNR {result['val_lr_psnr']:.2f} dB "
                f"(RRDB SR); grid: {grid_path}"
            )
            return result
        self.log(
            f"step {run.step}: validation NLL {result['val_nll_bits_px']:.4f} bits/px, "
            f"PSNR(t=0) {result['val_psnr_t0']:.2f} dB, "
            f"LR-PSNR(t=0) {result['val_lr_psnr_t0']:.2f} dB; samples at t={list(c.val_temperatures)}: {grid_path}"
        )
        return result
