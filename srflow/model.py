"""SRFlow (Lugmayr et al., ECCV 2020): an RRDB-conditioned normalizing flow for super-resolution.

``SRFlow`` = ``RRDB`` (the ESRGAN encoder, :mod:`srflow.rrdb`) + ``flowUpsamplerNet`` (the
conditional flow, :mod:`srflow.flow`), with the official state_dict layout so that the official
``SRFlow_*.pth`` checkpoints load with ``strict=True`` (:meth:`SRFlow.from_official`).

Images are float32 RGB in [0, 1], (B, 3, H, W); LR (B, 3, h, w) with H = scale * h, W = scale * w.

Units (the official ones). :meth:`SRFlow.nll` returns, per sample,
``-(logdet + log p(z_top)) / (ln 2 * H * W)``: bits per HR *pixel* summed over the 3 colour
channels (bits per dimension is that / 3). ``logdet`` includes the split priors' log-likelihoods.
Negative values are normal for a continuous density.

Dequantisation (paper vs code). The paper adds uniform noise to the HR; the released training
code never does (``add_gt_noise`` defaults to False there). ``nll(add_noise=False)`` is the default,
like the released code; ``add_noise=True`` adds ``U(-1/64, 1/64)`` noise (quantisation 32, see
:func:`dequantize`) and subtracts ``log(32) * H * W`` from the log-det, exactly
``log2(32) = 5`` bits per pixel more, besides the effect of the noise itself.

RRDB freezing (paper vs code). The paper trains the flow with the pretrained RRDB frozen for the
first half of training and then jointly; the released code never freezes it (its ``train_RRDB``
option is never read; andreas128/SRFlow issue #37). Models are built with the RRDB frozen
(``rrdb_trainable=False``, the paper's start); :meth:`SRFlow.set_rrdb_trainable` switches it, so a
training loop can follow the paper (unfreeze at 50%) or the code (trainable from the start).
Trainable means the parameters the flow's conditioning reads; the last upconv and ESRGAN's image
head (``HRconv``, ``conv_last``) and the unused ``flowUpsamplerNet.f`` never get gradients, so they
never require grad (no unused parameters under DistributedDataParallel).

Sampling robustness. The reverse pass divides by coupling scales ``s >= 1e-4``; on latents the
model finds unlikely these compound into Inf/NaN (the "black patches" of the official model).
:meth:`SRFlow.decode` and :meth:`SRFlow.sample` check the flow state after every level (on the
device) and warn with :class:`NonFiniteSampleWarning` (or raise, ``nonfinite="raise"``) naming the
fraction of affected pixels (one host sync per call; none with ``nonfinite="ignore"`` or inside
``torch.compile``, where nothing is reported); those pixels are NaN in the output. The remedies
are ``min_scale=`` (floors every coupling scale in the inverse at that value for the call, bounding each stage's
amplification at 1/min_scale; the forward and the NLL are unaffected, the inverse is then no
longer exact where it bites) and a lower temperature.

Odd LR sizes. The flow's top level works at LR/2, so the LR must have even height and width.
:meth:`SRFlow.condition` (hence :meth:`sample`/:meth:`decode`) reflect-pads an odd LR on the
bottom/right by one pixel and crops the SR back to scale * (h, w), like the official test script;
:meth:`nll`/:meth:`encode` need an HR, so they require an even LR instead.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import flowkernels as fk
from flowkernels._random import draw

from .flow import FlowUpsamplerNet
from .official_checkpoint import as_state_dict, check_state_dict, read_state_dict, strip_prefix
from .presets import SRFlowPreset, get_preset
from .rrdb import RRDBNet

__all__ = ["SRFlow", "Conditioning", "NonFiniteSampleWarning", "dequantize", "QUANT"]

QUANT = 32  # official datasets.train.quant: uniform dequantisation noise of width 1/32
_LN2 = math.log(2.0)
_NONFINITE_MODES = ("warn", "raise", "ignore")


class NonFiniteSampleWarning(RuntimeWarning):
    """A decoded image contains NaN/Inf pixels (tiny coupling scales amplified in the reverse pass)."""


@dataclass(frozen=True, eq=False)
class Conditioning:
    """The RRDB conditioning of a batch of LR images, computed once by :meth:`SRFlow.condition`
    and reusable for many samples / NLL evaluations.

    Attributes:
        features: one (B, cond_channels, H_l, W_l) float32 tensor per flow level, level 1 first.
        lr_size: (h, w) of the LR as given.
        padded_size: (h, w) after reflect-padding to even (equal to ``lr_size`` when even).
    """

    features: tuple[Tensor, ...]
    lr_size: tuple[int, int]
    padded_size: tuple[int, int]

    @property
    def batch(self) -> int:
        return self.features[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.features[0].device

    @property
    def padded(self) -> bool:
        return self.lr_size != self.padded_size


def dequantization_noise(hr: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
    """``u ~ U[0, 1)`` of ``hr``'s shape, dtype and device, drawn by ``torch.rand`` from
    ``generator`` (on the generator's device; the global RNG when None), or from a sequence of
    one generator per sample (sample ``i``'s noise from ``generator[i]``), so that a sample's
    noise does not depend on which other samples share its batch (distributed training splits a
    batch across processes). Draw it outside a compiled step (Dynamo cannot trace a Generator)
    and pass it as ``noise=``."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw(torch.rand, hr.shape, generator, hr.device, hr.dtype)
    if len(generator) != hr.shape[0]:
        raise ValueError(f"generator: expected one generator per sample ({hr.shape[0]}), got {len(generator)}")
    return torch.stack([draw(torch.rand, hr.shape[1:], g, hr.device, hr.dtype) for g in generator])


def dequantize(
    hr: Tensor,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    quant: int = QUANT,
    noise: Tensor | None = None,
) -> Tensor:
    """``hr + (u - 0.5) / quant``, the official dequantisation, with ``u`` = ``noise`` if given,
    else :func:`dequantization_noise` of ``hr`` from ``generator``. Returns a new tensor."""
    if noise is None:
        noise = dequantization_noise(hr, generator)
    elif noise.shape != hr.shape:
        raise ValueError(f"noise: expected the shape of hr {tuple(hr.shape)}, got {tuple(noise.shape)}")
    return hr + (noise - 0.5) / quant


def _check_image(
    name: str,
    x: object,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    values: bool = True,
) -> Tensor:
    """A (B, 3, H, W) tensor of the model's ``dtype`` (float32; float64 for a model converted with
    ``.double()``, an oracle); with ``values``, also finite values in [0, 1] (one host sync)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D (B, 3, H, W) tensor, got shape {tuple(x.shape)}")
    if x.dtype != dtype:
        hint = " (divide uint8 images by 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name}: expected {dtype} values in [0, 1], got {x.dtype}{hint}")
    if x.shape[1] != 3:
        raise ValueError(f"{name}: expected 3 (RGB) channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name}: expected a non-empty batch and image, got shape {tuple(x.shape)}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device} but the model is on {device}")
    if not values:
        return x
    lo, hi = torch.stack([x.detach().amin(), x.detach().amax()]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: contains {bad} non-finite values (NaN or Inf)")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: expected values in [0, 1], got min {lo:.4g}, max {hi:.4g}")
    return x


class SRFlow(nn.Module):
    """The SRFlow model. Build with :meth:`from_preset` or :meth:`from_official`.

    Submodules (official names): ``RRDB`` (:class:`~srflow.rrdb.RRDBNet`) and
    ``flowUpsamplerNet`` (:class:`~srflow.flow.FlowUpsamplerNet`).

    Args:
        preset: a preset name or :class:`~srflow.presets.SRFlowPreset`.
        memory_saving: each flow level is one memory-saving FlowSequence unit (True) or plain
            stored-activation autograd (False).
        backend: flowkernels backend of every flow step (``"auto"``, ``"reference"``, ``"cuda"``,
            ``"triton"``; None follows ``flowkernels.set_backend``).
        keep_every: FlowSequence option (keep every N-th step input in the memory-saving backward).
        rrdb_trainable: start with a trainable RRDB (default False: the paper's frozen start).

    Attribute ``check_inputs`` (True): each call scans its images (and latents) for NaN/Inf and the
    [0, 1] range, at the cost of a host sync that stalls a GPU's launch queue once per call. A
    caller whose data is valid by construction (the trainer: uint8 images / 255) sets it False.
    Inside ``torch.compile`` the scan is always off; shapes, dtypes and devices are always checked.
    """

    check_inputs = True

    def __init__(
        self,
        preset: str | SRFlowPreset,
        *,
        memory_saving: bool = True,
        backend: str | None = "auto",
        keep_every: int | None = None,
        rrdb_trainable: bool = False,
    ) -> None:
        super().__init__()
        self.preset = get_preset(preset)
        p = self.preset
        self.RRDB = RRDBNet(p.nf, p.gc, p.nb, p.scale, p.block_idxs)
        self.flowUpsamplerNet = FlowUpsamplerNet(p, memory_saving=memory_saving, keep_every=keep_every, backend=backend)
        for module in self.RRDB.unused_by_flow():
            module.requires_grad_(False)
        self._backend = backend
        self.set_rrdb_trainable(rrdb_trainable)

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_preset(
        cls,
        name: str | SRFlowPreset,
        memory_saving: bool = True,
        backend: str | None = "auto",
        *,
        keep_every: int | None = None,
        rrdb_trainable: bool = False,
        seed: int | None = None,
    ) -> SRFlow:
        """A freshly initialised model (official initialisation: RRDB convs kaiming x 0.1, subnet
        convs N(0, 0.05^2), zero last subnet layers and split priors, random orthogonal 1x1 convs,
        ActNorms uninitialised until :meth:`initialize_actnorms`).

        ``seed``: initialise from ``torch.manual_seed(seed)`` inside a forked RNG (the global RNG
        state is left as it was); None draws from the global RNG. Build under
        ``with torch.device("meta"):`` to count parameters without memory.
        """
        kwargs = dict(
            memory_saving=memory_saving, backend=backend, keep_every=keep_every, rrdb_trainable=rrdb_trainable
        )
        if seed is None:
            return cls(name, **kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(name, **kwargs)

    @classmethod
    def from_official(
        cls,
        path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
        preset: str | SRFlowPreset,
        *,
        memory_saving: bool = True,
        backend: str | None = "auto",
        keep_every: int | None = None,
        rrdb_trainable: bool = False,
    ) -> SRFlow:
        """Load an official SRFlow checkpoint (or a state_dict) into a model of ``preset``, strictly.

        A file is read with ``torch.load(weights_only=True)`` (``.safetensors`` with safetensors)
        and never modified; a ``module.`` key prefix is stripped. Raises
        :class:`~srflow.official_checkpoint.CheckpointError` (a ValueError) naming every missing key,
        unexpected key and wrong shape, or why the file could not be read; FileNotFoundError for
        a missing file. Loaded ActNorms count as initialised (no data-dependent init).
        The model is on the CPU; move it with ``.to()``.
        """
        if isinstance(path_or_state_dict, Mapping):
            state_dict, source = as_state_dict(path_or_state_dict), "state_dict"
        elif isinstance(path_or_state_dict, (str, os.PathLike)):
            state_dict, source = read_state_dict(path_or_state_dict), f"checkpoint {str(path_or_state_dict)!r}"
        else:
            raise TypeError(
                "path_or_state_dict: expected a file path or a state_dict mapping, "
                f"got {type(path_or_state_dict).__name__}"
            )
        state_dict = strip_prefix(state_dict)
        model = cls(
            preset, memory_saving=memory_saving, backend=backend, keep_every=keep_every, rrdb_trainable=rrdb_trainable
        )
        check_state_dict(model, state_dict, source, model.preset.name)
        model.load_state_dict(state_dict, strict=True)
        return model

    # ------------------------------------------------------------------------------ settings

    @property
    def scale(self) -> int:
        return self.preset.scale

    @property
    def memory_saving(self) -> bool:
        return self.flowUpsamplerNet.levels[0].sequence.memory_saving

    def set_memory_saving(self, memory_saving: bool, keep_every: int | None = None) -> None:
        """Switch every flow level between the memory-saving unit and plain autograd."""
        self.flowUpsamplerNet.set_memory_saving(memory_saving, keep_every)

    def set_cond_batching(
        self, enabled: bool | None, *, chunk_bytes: int | None = None, keep_parts: bool = False
    ) -> None:
        """Level batching of the flow's conditioning convolutions
        (:meth:`FlowUpsamplerNet.set_cond_batching`; by device by default: batched on CUDA, per step
        elsewhere; ``keep_parts`` off)."""
        self.flowUpsamplerNet.set_cond_batching(enabled, chunk_bytes=chunk_bytes, keep_parts=keep_parts)

    @property
    def backend(self) -> str | None:
        return self._backend

    def set_backend(self, backend: str | None) -> None:
        """Set the flowkernels backend of every flow step."""
        self.flowUpsamplerNet.set_backend(backend)
        self._backend = backend

    def rrdb_parameters(self) -> list[nn.Parameter]:
        """The RRDB parameters the conditioning reads (the ones :meth:`set_rrdb_trainable` toggles)."""
        unused = {id(p) for m in self.RRDB.unused_by_flow() for p in m.parameters()}
        return [p for p in self.RRDB.parameters() if id(p) not in unused]

    @property
    def rrdb_trainable(self) -> bool:
        return all(p.requires_grad for p in self.rrdb_parameters())

    def set_rrdb_trainable(self, trainable: bool) -> SRFlow:
        """Freeze (False) or unfreeze (True) the RRDB encoder; see the module docstring for the
        paper-vs-code difference. Frozen, the conditioning is computed without an autograd graph."""
        for p in self.rrdb_parameters():
            p.requires_grad_(bool(trainable))
        return self

    def _device(self) -> torch.device:
        return self.RRDB.conv_first.weight.device

    def _check_values(self) -> bool:
        """Whether this call scans its images and latents for NaN/Inf and the [0, 1] range: one
        host sync each, so never inside a compiled region, and off where ``check_inputs`` is."""
        return self.check_inputs and not torch.compiler.is_compiling()

    def _dtype(self) -> torch.dtype:
        """The flow state's dtype: float32, or float64 after ``.double()`` (oracles)."""
        return self.RRDB.conv_first.weight.dtype

    # ------------------------------------------------------------------------------ conditioning

    def condition(self, lr: Tensor) -> Conditioning:
        """Run the RRDB once: the per-level conditioning of LR images (B, 3, h, w) in [0, 1].

        An odd h or w is reflect-padded on the bottom/right to even (the official test script);
        :meth:`decode`/:meth:`sample` crop their output back. Differentiable when the RRDB is
        trainable.
        """
        _check_image("lr", lr, self._device(), self._dtype(), self._check_values())
        h, w = lr.shape[2:]
        pad_h, pad_w = h % 2, w % 2
        if pad_h or pad_w:
            if (pad_h and h < 2) or (pad_w and w < 2):
                raise ValueError(
                    f"lr: an odd size is reflect-padded to even, which needs at least 2 pixels; got {h}x{w}"
                )
            lr = F.pad(lr, (0, pad_w, 0, pad_h), mode="reflect")
        factors = self.flowUpsamplerNet.factors
        features = self.RRDB.features(lr, factors)
        return Conditioning(tuple(features), (h, w), (h + pad_h, w + pad_w))

    def _conditioning(self, lr: Tensor | None, cond: Conditioning | None) -> Conditioning:
        if (lr is None) == (cond is None):
            raise ValueError("pass exactly one of lr (an LR image batch) and cond (from SRFlow.condition)")
        if cond is None:
            return self.condition(lr)
        if not isinstance(cond, Conditioning):
            raise TypeError(f"cond: expected a Conditioning from SRFlow.condition, got {type(cond).__name__}")
        levels = self.flowUpsamplerNet.levels
        if len(cond.features) != len(levels):
            raise ValueError(f"cond: expected {len(levels)} level features, got {len(cond.features)}")
        if cond.device != self._device():
            raise ValueError(f"cond is on {cond.device} but the model is on {self._device()}")
        return cond

    def _check_pair(self, hr: Tensor, cond: Conditioning) -> None:
        _check_image("hr", hr, self._device(), self._dtype(), self._check_values())
        h, w = cond.lr_size
        if cond.padded:
            raise ValueError(
                f"lr: nll/encode need an even LR size (the top flow level is at LR/2, so HR must be "
                f"divisible by {2**self.preset.L}); got LR {h}x{w}. Crop the HR/LR pair to even LR sizes."
            )
        if hr.shape[0] != cond.batch:
            raise ValueError(f"hr: batch {hr.shape[0]} does not match the LR batch {cond.batch}")
        expected = (h * self.scale, w * self.scale)
        if tuple(hr.shape[2:]) != expected:
            raise ValueError(
                f"hr: expected size {expected[0]}x{expected[1]} (scale {self.scale} x LR {h}x{w}), "
                f"got {hr.shape[2]}x{hr.shape[3]}"
            )

    # ------------------------------------------------------------------------------ HR -> z

    def _encode(
        self,
        hr: Tensor,
        lr: Tensor | None,
        cond: Conditioning | None,
        add_noise: bool,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        noise: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        cond = self._conditioning(lr, cond)
        self._check_pair(hr, cond)
        pixels = hr.shape[2] * hr.shape[3]
        logdet = torch.zeros(hr.shape[0], device=hr.device, dtype=hr.dtype)
        if add_noise:
            hr = dequantize(hr, generator, noise=noise)
            logdet = logdet - math.log(QUANT) * pixels
        zs, objective = self.flowUpsamplerNet.encode(hr, list(cond.features), logdet)
        return zs, -objective / (_LN2 * pixels)

    def nll(
        self,
        hr: Tensor,
        lr: Tensor | None = None,
        add_noise: bool = False,
        *,
        cond: Conditioning | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Per-sample negative log-likelihood (B,) in bits per HR pixel (over RGB; / 3 = bits/dim):
        ``-(logdet + log p(z_top)) / (ln 2 * H * W)``.

        Args:
            hr: (B, 3, H, W) float32 in [0, 1]; lr: (B, 3, H/scale, W/scale), even size (or pass
                ``cond`` from :meth:`condition` instead).
            add_noise: add the dequantisation noise of :func:`dequantize` (drawn from
                ``generator``: one, or one per sample) and count ``-log(32)`` per pixel
                (+5 bits/pixel); off by default like the released training code.
            noise: with ``add_noise``, the U[0, 1) draws (B, 3, H, W) to use instead of drawing
                them (:func:`dequantization_noise`; e.g. drawn outside a compiled step).
        In training mode the flow's ActNorms must have been initialised (:meth:`initialize_actnorms`
        or a loaded checkpoint); otherwise this raises RuntimeError.
        Differentiable (memory-saving per level); the training loss is ``nll.mean()``.
        """
        return self._encode(hr, lr, cond, add_noise, generator, noise)[1]

    def forward(
        self,
        hr: Tensor,
        lr: Tensor | None = None,
        add_noise: bool = False,
        *,
        cond: Conditioning | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
    ) -> Tensor:
        """Same as :meth:`nll` (the training forward, e.g. under DistributedDataParallel)."""
        return self.nll(hr, lr, add_noise, cond=cond, generator=generator)

    def encode(
        self,
        hr: Tensor,
        lr: Tensor | None = None,
        *,
        cond: Conditioning | None = None,
        add_noise: bool = False,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        return_nll: bool = False,
    ) -> list[Tensor] | tuple[list[Tensor], Tensor]:
        """The latents of HR images, as the official code returns them.

        Returns ``[eps_1, (eps_2,) z_top]``: each split's ``eps = (z2 - mean) / std`` under its
        learned prior (4x: (B, 6, H/2, W/2); 8x also (B, 12, H/4, W/4)), then the top latent
        (4x: (B, 96, H/8, W/8); 8x: (B, 192, H/16, W/16)). With ``return_nll`` also the
        :meth:`nll` of the same pass. :meth:`decode` inverts this.
        """
        zs, nll = self._encode(hr, lr, cond, add_noise, generator)
        return (zs, nll) if return_nll else zs

    def initialize_actnorms(self, hr: Tensor, lr: Tensor | None = None, *, cond: Conditioning | None = None) -> int:
        """Data-dependent init of every uninitialised flow ActNorm from this batch, in any mode;
        call it once before training (:meth:`nll` never initialises). Returns how many."""
        cond = self._conditioning(lr, cond)
        self._check_pair(hr, cond)
        features = [f.detach() for f in cond.features]
        logdet = torch.zeros(hr.shape[0], device=hr.device)
        return fk.initialize_actnorms(self.flowUpsamplerNet, lambda: self.flowUpsamplerNet.encode(hr, features, logdet))

    # ------------------------------------------------------------------------------ z -> SR

    def latent_shapes(self, batch: int, lr_height: int, lr_width: int) -> list[tuple[int, int, int, int]]:
        """Shapes of :meth:`encode`'s latents for an LR size (odd sizes count as padded to even)."""
        h, w = lr_height + lr_height % 2, lr_width + lr_width % 2
        return self.flowUpsamplerNet.latent_shapes(batch, h * self.scale, w * self.scale)

    @contextlib.contextmanager
    def _scale_floor(self, min_scale: float | None) -> Iterator[None]:
        if min_scale is None:
            yield
            return
        couplings = self.flowUpsamplerNet.couplings()
        floor = fk.validate_scale_floor(min_scale, couplings[0].eps)
        previous = [c.inverse_scale_floor for c in couplings]
        for c in couplings:
            c.inverse_scale_floor = floor
        try:
            yield
        finally:
            for c, prev in zip(couplings, previous):
                c.inverse_scale_floor = prev

    def decode(
        self,
        lr: Tensor | None,
        zs: Sequence[Tensor],
        *,
        cond: Conditioning | None = None,
        min_scale: float | None = None,
        with_grad: bool = False,
        nonfinite: str = "warn",
    ) -> Tensor:
        """SR images (B, 3, scale*h, scale*w) from latents ``zs`` (as :meth:`encode` returns them).

        Args:
            lr: (B, 3, h, w) in [0, 1] (odd sizes padded and the output cropped), or None with ``cond``.
            zs: the latents for the padded LR size (:meth:`latent_shapes`).
            min_scale: floor every coupling scale at this value in the reverse pass (the sampling
                remedy for NaN/black patches; inexact inversion); None: exact inverse.
            with_grad: differentiate through the reverse flow (memory-saving per level), e.g. for
                an L1 loss; otherwise runs under no_grad.
            nonfinite: what to do when the reverse pass overflows float32 (NaN/Inf): ``"warn"``
                (:class:`NonFiniteSampleWarning` naming the fraction of affected pixels and the
                remedies), ``"raise"`` (ValueError with the same message) or ``"ignore"``. With
                "warn"/"ignore" the HR pixels under overflowed latent positions are NaN in the
                output and the rest is decoded with those positions zeroed (the damage stays
                local instead of spreading through the subnets as in the official code).
        The output is not clamped to [0, 1].
        """
        if nonfinite not in _NONFINITE_MODES:
            raise ValueError(f"nonfinite: expected one of {_NONFINITE_MODES}, got {nonfinite!r}")
        grad = contextlib.nullcontext() if with_grad else torch.no_grad()
        with grad:
            cond = self._conditioning(lr, cond)
            zs = self._check_latents(zs, cond)
            with self._scale_floor(min_scale):
                sr, overflow = self.flowUpsamplerNet.decode(zs, list(cond.features))
        h, w = cond.lr_size
        if cond.padded:
            sr = sr[:, :, : h * self.scale, : w * self.scale]
            overflow = overflow[:, :, : h * self.scale, : w * self.scale]
        if nonfinite != "ignore" and not torch.compiler.is_compiling():  # one host sync, outside compiled code
            self._report_overflow(overflow, nonfinite, min_scale)
        return sr

    def _check_latents(self, zs: Sequence[Tensor], cond: Conditioning) -> list[Tensor]:
        if not isinstance(zs, (list, tuple)):
            raise TypeError(f"zs: expected a list of latent tensors, got {type(zs).__name__}")
        h, w = cond.padded_size
        shapes = self.flowUpsamplerNet.latent_shapes(cond.batch, h * self.scale, w * self.scale)
        if len(zs) != len(shapes):
            raise ValueError(f"zs: expected {len(shapes)} latents (split eps..., top), got {len(zs)}")
        for i, (z, shape) in enumerate(zip(zs, shapes)):
            if not isinstance(z, Tensor):
                raise TypeError(f"zs[{i}]: expected a torch.Tensor, got {type(z).__name__}")
            if z.dtype != self._dtype():
                raise TypeError(f"zs[{i}]: expected {self._dtype()}, got {z.dtype}")
            if tuple(z.shape) != shape:
                raise ValueError(f"zs[{i}]: expected shape {shape} for LR {h}x{w}, got {tuple(z.shape)}")
            if z.device != cond.device:
                raise ValueError(f"zs[{i}] is on {z.device} but the conditioning is on {cond.device}")
        if not self._check_values():
            return list(zs)
        finite = torch.stack([torch.isfinite(z).all() for z in zs]).tolist()
        if not all(finite):
            i = finite.index(False)
            raise ValueError(f"zs[{i}]: contains {int((~torch.isfinite(zs[i])).sum())} non-finite values (NaN or Inf)")
        return list(zs)

    @staticmethod
    def _report_overflow(overflow: Tensor, mode: str, min_scale: float | None) -> None:
        n_bad = int(overflow.sum())
        if not n_bad:
            return
        fraction = n_bad / overflow.numel()
        floor = f"a larger min_scale than {min_scale}" if min_scale is not None else "min_scale= (e.g. 0.1)"
        message = (
            f"SRFlow reverse pass overflowed: {fraction:.2%} of the output pixels ({n_bad} of "
            f"{overflow.numel()}) are NaN (tiny coupling scales amplified the latents past the float32 "
            f"range). Remedies: pass {floor}, which floors the scale the inverse divides by, or lower the "
            f"temperature."
        )
        if mode == "raise":
            raise ValueError(message)
        warnings.warn(message, NonFiniteSampleWarning, stacklevel=3)

    def sample(
        self,
        lr: Tensor | None = None,
        temperature: float = 0.9,
        seed: int | None = None,
        *,
        generator: torch.Generator | None = None,
        cond: Conditioning | None = None,
        min_scale: float | None = None,
        with_grad: bool = False,
        nonfinite: str = "warn",
    ) -> Tensor:
        """Sample SR images (B, 3, scale*h, scale*w) at temperature ``temperature`` (official 0.9).

        The top latent (B, 96, h/2, w/2) for 4x, (B, 192, h/2, w/2) for 8x (h, w the padded LR
        size) and each split's eps are drawn from N(0, temperature^2) (the split's z2 is then
        ``mean + std * eps`` under its learned prior). Temperature 0 is deterministic (all zeros,
        no random draw). Randomness: ``seed`` (a fresh generator on the LR's device, so the same
        seed gives the same samples on the same device) or ``generator``; with neither, torch's
        global RNG. Latents are drawn top first, then the splits from the deepest level up.
        Under ``torch.compile`` use the global RNG (seed with ``torch.manual_seed``): Dynamo cannot
        trace a ``torch.Generator``, so ``seed`` or ``generator`` breaks the graph there (or draw
        the latents outside and compile :meth:`decode`). Other arguments as in :meth:`decode`.
        """
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature: expected a finite value >= 0, got {temperature}")
        if seed is not None and generator is not None:
            raise ValueError("pass at most one of seed and generator")
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            cond = self._conditioning(lr, cond)
        h, w = cond.padded_size
        shapes = self.flowUpsamplerNet.latent_shapes(cond.batch, h * self.scale, w * self.scale)
        if temperature == 0:
            zs = [torch.zeros(s, device=cond.device, dtype=self._dtype()) for s in shapes]
        else:
            if seed is not None:
                generator = torch.Generator(device=cond.device)
                generator.manual_seed(seed)
            draws = [draw(torch.randn, s, generator, cond.device, self._dtype()) for s in reversed(shapes)]
            zs = [z * temperature for z in reversed(draws)]
        return self.decode(None, zs, cond=cond, min_scale=min_scale, with_grad=with_grad, nonfinite=nonfinite)

    def l1_loss(self, hr: Tensor, lr: Tensor | None = None, *, cond: Conditioning | None = None) -> Tensor:
        """Per-sample mean |SR - HR| (B,) of the temperature-0 sample, differentiable through the
        reverse flow (memory-saving per level) and, if trainable, the RRDB. The official optional
        ``weight_l1`` loss is ``weight_l1 * l1_loss(hr, lr).mean()``."""
        cond = self._conditioning(lr, cond)
        self._check_pair(hr, cond)
        sr = self.sample(cond=cond, temperature=0.0, with_grad=True, nonfinite="ignore")
        return (sr - hr).abs().mean(dim=(1, 2, 3))
