"""SRFlow against the official implementation's own outputs (tests/data/official-srflow-small-*).

The fixtures were produced by running the official SRFlow code (andreas128/SRFlow) on small
models of the official architecture (nf 64, 4 trunk blocks all tapped, so the conditioning has
the official 320 channels; gc 8, K 1, hidden 16, 2 transitional steps) with non-trivial weights,
on two photo crops. They hold the weights (``weight/<official key>``, float16 storage of values
exact in float16), the inputs ``hr``/``lr``, and the official model's ``nll`` (bits per HR pixel,
no dequantisation noise), latents ``z/0..`` (split eps first, top last), ``decode`` (those latents
decoded), ``sample_t0`` (temperature 0) and ``grad/<key>`` (d nll.mean() / d parameter in train
mode with the RRDB trainable: every flow parameter, the RRDB outside its trunk blocks and trunk
block 0). The architecture is in the safetensors metadata.

Unlike the other model tests, which check the maths (round trips, Jacobians, gradients against
autograd), these pin the behaviour to the official code, so a misreading of it fails here: the
RRDB feature taps taken before their in-place LeakyReLU gave NLL errors of 5-12% and latent
errors up to 26% on these fixtures. Every backend the machine can run is checked, with memory saving
on and off, and the reference in float64; tolerances and the measured errors are in
``tolerances.OFFICIAL_REL_TOL``. The 8x fixture's gradients are checked in float64 only: some of its
ReLU inputs lie within float32 rounding of their kinks (test_fixture_kink_margins).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flowkernels.dispatch import refusals
from srflow import SRFlow, SRFlowPreset
from tests.oracle import relu_margin
from tests.tolerances import KINK_MARGIN, OFFICIAL_REL_TOL, assert_rel_close

safetensors = pytest.importorskip("safetensors", reason="the fixtures are safetensors files (pip install safetensors)")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

DATA = Path(__file__).parent / "data"
SCALES = ("4x", "8x")


@dataclass(frozen=True)
class Fixture:
    """One official fixture: the preset built from its metadata, its weights, inputs and outputs."""

    preset: SRFlowPreset
    state_dict: dict[str, torch.Tensor]
    tensors: dict[str, torch.Tensor]

    def latents(self) -> list[torch.Tensor]:
        n = sum(key.startswith("z/") for key in self.tensors)
        return [self.tensors[f"z/{i}"] for i in range(n)]

    def grads(self) -> dict[str, torch.Tensor]:
        return {key.removeprefix("grad/"): v for key, v in self.tensors.items() if key.startswith("grad/")}


@functools.cache
def fixture(scale: str) -> Fixture:
    path = DATA / f"official-srflow-small-{scale}.safetensors"
    with safe_open(str(path), "pt") as f:
        arch = json.loads(f.metadata()["architecture"])
    preset = SRFlowPreset(
        f"official-small-{scale}",
        scale=arch["scale"],
        nb=arch["nb"],
        block_idxs=tuple(arch["block_idxs"]),
        K=arch["K"],
        nf=arch["nf"],
        gc=arch["gc"],
        hidden=arch["hidden"],
        n_transitional=arch["n_transitional"],
    )
    tensors = load_file(str(path))
    state_dict = {k.removeprefix("weight/"): v.float() for k, v in tensors.items() if k.startswith("weight/")}
    return Fixture(preset, state_dict, tensors)


@dataclass
class Outputs:
    """What our model computes on a fixture's weights and inputs."""

    nll: torch.Tensor
    latents: list[torch.Tensor]
    decode: torch.Tensor
    sample_t0: torch.Tensor
    grads: dict[str, torch.Tensor | None]


@functools.cache
def outputs(scale: str, backend: str, memory_saving: bool, device: str, dtype: torch.dtype = torch.float32) -> Outputs:
    """Run the official fixture through SRFlow.from_official once per configuration."""
    fx = fixture(scale)
    model = SRFlow.from_official(fx.state_dict, fx.preset, backend=backend, memory_saving=memory_saving)
    model = model.to(device, dtype)
    hr, lr = fx.tensors["hr"].to(device, dtype), fx.tensors["lr"].to(device, dtype)
    model.eval()
    with torch.no_grad():
        latents, nll = model.encode(hr, lr, return_nll=True)
    official_latents = [z.to(device, dtype) for z in fx.latents()]
    decode = model.decode(lr, official_latents)
    sample_t0 = model.sample(lr, temperature=0.0)
    # The official gradients: train mode, RRDB trainable, loss nll.mean(), no noise.
    model.train().set_rrdb_trainable(True)
    model.zero_grad(set_to_none=True)
    model.nll(hr, lr).mean().backward()
    grads = {name: None if p.grad is None else p.grad.cpu() for name, p in model.named_parameters()}
    return Outputs(nll.cpu(), [z.cpu() for z in latents], decode.cpu(), sample_t0.cpu(), grads)


def _config(scale: str, backend: str, memory_saving: bool, device: str, dtype=torch.float32, marks=()):
    ms = "memory_saving" if memory_saving else "stored"
    name = f"{scale}-{backend}-{ms}-{device}" + ("-float64" if dtype == torch.float64 else "")
    return pytest.param((scale, backend, memory_saving, device, dtype), marks=marks, id=name)


# The reference and the compiled C++ kernels on every scale; the Triton kernels under the CPU
# interpreter on 4x only (about 10 s a configuration, so their tests share one worker, and with
# it the cache of `outputs`); on a GPU the CUDA and Triton kernels; and the reference in float64,
# whose rounding is far from every kink of the fixtures' ReLUs.
FLOAT64 = [_config(s, "reference", False, "cpu", torch.float64) for s in SCALES]
_INTERPRETED = (pytest.mark.slow, pytest.mark.xdist_group("official-triton-cpu"))
FP32 = [
    *(_config(s, b, ms, "cpu") for s in SCALES for b in ("reference", "cuda") for ms in (True, False)),
    *(_config("4x", "triton", ms, "cpu", marks=_INTERPRETED) for ms in (True, False)),
    *(_config(s, b, True, "cuda", marks=pytest.mark.gpu) for s in SCALES for b in ("cuda", "triton")),
]
# Gradients are discontinuous at a ReLU kink, so float32 can reproduce the official gradients only
# where no ReLU input of the fixture's NLL lies within float32 rounding of 0
# (test_fixture_kink_margins): the 4x fixture in every configuration, the 8x one in float64.
FP32_GRADIENT_SCALES = ("4x",)
GRADIENT_CONFIGS = FLOAT64 + [c for c in FP32 if c.values[0][0] in FP32_GRADIENT_SCALES]


def _run(request: pytest.FixtureRequest) -> tuple[Fixture, Outputs]:
    scale, backend, memory_saving, device, dtype = request.param
    why = refusals(backend, torch.zeros(1, 4, 2, 2, device=device))
    if why:
        pytest.skip(f"backend {backend!r} cannot run on {device}: {'; '.join(why)}")
    return fixture(scale), outputs(scale, backend, memory_saving, device, dtype)


@pytest.fixture(params=FLOAT64 + FP32)
def run(request: pytest.FixtureRequest) -> tuple[Fixture, Outputs]:
    return _run(request)


@pytest.fixture(params=GRADIENT_CONFIGS)
def gradient_run(request: pytest.FixtureRequest) -> tuple[Fixture, Outputs]:
    return _run(request)


def test_nll_matches_official(run: tuple[Fixture, Outputs]) -> None:
    fx, out = run
    assert_rel_close(out.nll, fx.tensors["nll"], "official_nll", OFFICIAL_REL_TOL["nll"])


def test_latents_match_official(run: tuple[Fixture, Outputs]) -> None:
    fx, out = run
    official = fx.latents()
    assert [tuple(z.shape) for z in out.latents] == [tuple(z.shape) for z in official]
    for i, (ours, theirs) in enumerate(zip(out.latents, official)):
        assert_rel_close(ours, theirs, f"official_latent[{i}]", OFFICIAL_REL_TOL["image"])


def test_decode_of_official_latents_matches_official(run: tuple[Fixture, Outputs]) -> None:
    fx, out = run
    assert_rel_close(out.decode, fx.tensors["decode"], "official_decode", OFFICIAL_REL_TOL["image"])


def test_temperature_zero_sample_matches_official(run: tuple[Fixture, Outputs]) -> None:
    fx, out = run
    assert_rel_close(out.sample_t0, fx.tensors["sample_t0"], "official_sample_t0", OFFICIAL_REL_TOL["image"])


def test_gradients_match_official(gradient_run: tuple[Fixture, Outputs]) -> None:
    fx, out = gradient_run
    official = fx.grads()
    missing = sorted(name for name in official if out.grads.get(name) is None)
    assert not missing, f"no gradient for {len(missing)} parameters the official model trains: {missing[:5]}"
    for name, theirs in official.items():
        assert_rel_close(
            out.grads[name], theirs.to(out.grads[name].dtype), f"official_grad {name}", OFFICIAL_REL_TOL["grad"]
        )


@pytest.mark.parametrize("scale", SCALES)
def test_fixture_kink_margins(scale: str) -> None:
    """Which fixtures float32 can check gradients on. The smallest ReLU input of each fixture's
    float64 NLL run, relative to its call's largest (tests/oracle.py), against ``KINK_MARGIN``
    (float32 paths deviate from float64 by up to 4.6e-6 relatively at these ReLU inputs, through
    the 320-channel conditioning): 4x 1.8e-5, clear of it; 8x 8.0e-7, within float32 rounding of
    its kink, where flipping one such input moves the gradients by 5e-3 to 6e-2, so a float32 run
    on another machine may legitimately differ from the official one there."""
    fx = fixture(scale)
    model = SRFlow.from_official(fx.state_dict, fx.preset, backend="reference", memory_saving=False).double().train()
    hr, lr = fx.tensors["hr"].double(), fx.tensors["lr"].double()
    margin = relu_margin(model, lambda: model.nll(hr, lr))
    assert (margin >= KINK_MARGIN) == (scale in FP32_GRADIENT_SCALES), f"{scale}: margin {margin:.1e}"


@pytest.mark.parametrize("scale", SCALES)
def test_fixture_gradients_cover_the_flow_and_the_rrdb_outside_the_trunk(scale: str) -> None:
    """The fixture's gradient keys are what its description says: every parameter of the flow
    that trains (all but the unused ``f``) and of the RRDB outside its trunk that the conditioning
    reads, plus trunk block 0. A fixture that silently lost keys would weaken the test above."""
    fx = fixture(scale)
    model = SRFlow.from_official(fx.state_dict, fx.preset, backend="reference").set_rrdb_trainable(True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {
        name for name in trainable if not name.startswith("RRDB.RRDB_trunk.") or name.startswith("RRDB.RRDB_trunk.0.")
    }
    assert set(fx.grads()) == expected
