"""SRFlow training: the official recipe, exact resume, non-finite guards, DistributedDataParallel.

Recipe (official configs ``SRFlow_{DF2K_4X,DF2K_8X,CelebA_8X}.yml``, DESIGN.md section 5):
160x160 HR crops with random horizontal flips, LR by MATLAB bicubic; Adam with lr 2.5e-4 (4x) /
5e-4 (8x), halved at 50/75/90/95% of the iterations; global batch 12 (4x) / 16 (8x); seed 10.

Paper vs released code, and what :class:`~srflow.config.TrainConfig` does by default:

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

import gc
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

import flowkernels as fk

from .config import TRAJECTORY_FIELDS, ConfigError, TrainConfig, config_to_dict, config_to_yaml, resolve_config
from .data import HRImageDataset, save_rgb
from .distributed import Distributed, setup_distributed
from .model import SRFlow
from .official_checkpoint import CheckpointError, check_state_dict, read_state_dict, strip_prefix
from .presets import get_preset
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
    "NonFiniteTrainingError",
    "TrainResult",
    "Trainer",
    "TrainingObjective",
    "learning_rate_factor",
    "train",
]

_MIN_EPOCH_BATCHES = 100


class NonFiniteTrainingError(RuntimeError):
    """Training stopped after too many consecutive steps with a non-finite loss or gradient."""


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> TrainResult:
    """Run training as configured (see the module docstring). Under torchrun every rank calls
    this. Raises ConfigError / CheckpointError / FileNotFoundError / ValueError for bad inputs
    (before anything is written) and NonFiniteTrainingError when the loss keeps diverging."""
    return Trainer(config, log).run()


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
        self.config = config  # resolved (defaults filled in) by _prepare
        self._custom_log = log is not None
        self._print = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        # Built by run() and _prepare(); None before.
        self.dist: Distributed | None = None
        self.bar = None  # the tqdm bar (rank 0)
        self.writer = None  # the TensorBoard SummaryWriter (rank 0, with tensorboard on)
        self.model: SRFlow | None = None
        self.objective: TrainingObjective | None = None
        self.wrapped: nn.Module | None = None  # the objective, or its DistributedDataParallel wrapper
        self.optimizer: torch.optim.Adam | None = None
        self.unfreeze_step = 0  # the RRDB is trainable from this step on
        self.actnorms_pending = True  # the first batch still has to initialise the ActNorms

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
        self.dist = setup_distributed(self.config.device)
        try:
            return self._run()
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.writer is not None:
                self.writer.close()
            self.dist.close()

    def _run(self) -> TrainResult:
        run = self._prepare()
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
        c = self.config = resolve_config(self.config)
        d = self.dist
        if c.batch % d.world:
            raise ConfigError(f"batch: the global batch {c.batch} is not divisible by the {d.world} ranks")
        out = Path(c.out)
        ckpt_dir = out / CHECKPOINT_DIR
        resume = self._find_resume(ckpt_dir)
        dataset, val_set = self._datasets()
        self.model = self._build_model(resume)
        self.objective = TrainingObjective(self.model, c.dequantize, c.l1_weight, c.bf16)
        self.optimizer = self._make_optimizer(self.model)
        start, nonfinite_total, in_row = self._restore(resume) if resume is not None else (0, 0, 0)
        if d.main:
            self._open_outputs(out, start)
        self.unfreeze_step = int(c.rrdb_freeze_fraction * c.steps)
        self._set_rrdb_trainable(start)
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=c.seed, drop_last=True
        )
        what = f"resuming from {str(resume.files.state)!r} at step {start}" if resume else "starting at step 0"
        self.log(
            f"srflow train: preset {c.preset}, {what}, {c.steps} steps, global batch {c.batch} "
            f"({d.world} rank(s) x {c.batch // d.world}) of {c.crop}x{c.crop} crops from {len(dataset.files)} images, "
            f"lr {c.lr:g}, device {d.device}, memory_saving {c.memory_saving}, backend {c.backend}, "
            f"RRDB frozen until step {self.unfreeze_step}, dequantize {c.dequantize}"
        )
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
        )

    def _train_step(self, run: _RunState, hr: Tensor, lr: Tensor) -> None:
        """One optimisation step and its loss bookkeeping; raises NonFiniteTrainingError after
        ``max_nonfinite`` non-finite steps in a row."""
        loss, finite = self._optimize(run.step, hr, lr)
        run.step += 1
        if finite:
            run.nonfinite_in_row = 0
            run.losses.append((run.step, loss))
            run.window.append(loss)
            return
        run.nonfinite_in_row += 1
        run.nonfinite_total += 1
        self.log(f"step {run.step}: non-finite loss or gradient, step skipped ({run.nonfinite_in_row} in a row)")
        c = self.config
        if run.nonfinite_in_row >= c.max_nonfinite:
            last = run.last_saved
            where = f"{str(last.weights)!r} (step {last.step})" if last is not None else "none"
            raise NonFiniteTrainingError(
                f"training stopped at step {run.step}: {run.nonfinite_in_row} consecutive steps with a non-finite "
                f"loss or gradient (max_nonfinite {c.max_nonfinite}); nothing was saved at this point; last "
                f"checkpoint: {where}. Try a lower lr, gradient clipping (grad_clip_norm 100) or bf16 off"
            )

    def _after_step(self, run: _RunState) -> bool:
        """Progress, logging, the RRDB unfreeze, validation, checkpoints and the time limit after
        a step. Returns whether the run stops here (its last step, or out of time)."""
        c, d = self.config, self.dist
        if self.bar is not None:
            self._update_bar(run.window)
        if d.main and run.step % c.log_every == 0 and run.window:
            self._log_loss(run)
        if run.step == self.unfreeze_step:
            self._set_rrdb_trainable(run.step)
        timeout = self._time_is_up(run.t_start)
        final = run.step == run.end or timeout
        if c.val_every and d.main and (run.step % c.val_every == 0 or final):
            run.validation = self._validate(run)
        if d.main and (run.step % c.save_every == 0 or final):
            run.last_saved = self._save(run)
        if timeout:
            run.stopped = "max_minutes"
        return final

    def _finish(self, run: _RunState) -> TrainResult:
        if run.stopped == "finished" and run.end < self.config.steps:
            run.stopped = "stop_after"
        if self.dist.world > 1:
            dist.barrier()
        where = str(run.last_saved.weights) if run.last_saved else "none"
        self.log(f"srflow train: {run.stopped} at step {run.step}; checkpoint {where}")
        return TrainResult(
            run.step, run.out, run.last_saved, run.losses, run.nonfinite_total, run.stopped, run.validation
        )

    # ---------------------------------------------------------------------------------- setup

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
        resume = load_training_checkpoint(files, c.preset)
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
            c.data, scale, crop=c.crop, lr_root=c.lr_data, flips=c.flips, seed=c.seed, cache=c.cache_images
        )
        # Small folders are repeated (each visit with its own crop) so that an epoch holds at
        # least _MIN_EPOCH_BATCHES global batches: epochs restart the DataLoader (and its workers).
        dataset.repeat = max(1, math.ceil(c.batch * _MIN_EPOCH_BATCHES / len(dataset.files)))
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

    def _restore(self, resume: TrainingCheckpoint) -> tuple[int, int, int]:
        """Adam's state, the global RNG states and the counters of ``resume``; warns about changed
        trajectory settings. Returns (step, non-finite steps in all, non-finite steps in a row)."""
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
        self._compare_config(resume)
        state = resume.state
        return resume.step, int(state.get("nonfinite_total", 0)), int(state.get("nonfinite_in_row", 0))

    def _compare_config(self, resume: TrainingCheckpoint) -> None:
        saved = resume.state.get("config", {})
        now = config_to_dict(self.config)
        changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in TRAJECTORY_FIELDS if k in saved and saved[k] != now[k]]
        if resume.state.get("world_size", self.dist.world) != self.dist.world:
            changed.append(f"world size: {resume.state['world_size']} -> {self.dist.world} (same data, other noise)")
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

    # ---------------------------------------------------------------------------------- steps

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

    def _optimize(self, step: int, hr: Tensor, lr: Tensor) -> tuple[float, bool]:
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

    # ---------------------------------------------------------------------------------- outputs

    def _log_loss(self, run: _RunState) -> None:
        """Rank 0: the mean loss of the window since the last log line; starts a new window."""
        mean = sum(run.window) / len(run.window)
        elapsed = time.perf_counter() - run.t_window
        rate = len(run.window) / elapsed if elapsed > 0 else float("nan")
        self._record(run.out, run.step, {"loss_bits_px": mean, "it_per_s": rate, "lr": self._lr(run.step - 1)})
        self.log(f"step {run.step}: {mean:.4f} bits/px (mean of the last {len(run.window)} steps), {rate:.2f} it/s")
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
            "rrdb_trainable": self.model.rrdb_trainable,
            "world_size": self.dist.world,
            "config": config_to_dict(c),
            "torch_version": str(torch.__version__),
        }
        try:
            files = save_training_checkpoint(run.ckpt_dir, step, c.preset, self.model.state_dict(), state)
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
        from .infer import make_grid, validation_grid  # noqa: PLC0415 (metrics need scikit-image)

        c = self.config
        result, rows = validation_grid(self.model, run.val_set, c.val_temperatures, c.seed, c.dequantize)
        (run.out / "val").mkdir(parents=True, exist_ok=True)
        grid_path = run.out / "val" / f"step-{run.step:09d}.png"
        save_rgb(make_grid(rows), grid_path)
        self._record(run.out, run.step, result)
        self.log(
            f"step {run.step}: validation NLL {result['val_nll_bits_px']:.4f} bits/px, "
            f"PSNR(t=0) {result['val_psnr_t0']:.2f} dB, "
            f"LR-PSNR(t=0) {result['val_lr_psnr_t0']:.2f} dB; samples at t={list(c.val_temperatures)}: {grid_path}"
        )
        return result
