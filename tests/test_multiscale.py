"""The multi-scale container (fk.MultiScaleFlow) and Glow on it: log-dets against brute-force
float64 Jacobians, round trips, memory-saving gradients against float64 stored-activation
autograd (tests/oracle.py), memory flat in depth, sampling, clear errors, and SRFlow's flow as a
configuration of the container (same state_dict keys, same latents and objective)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian

import flowkernels as fk
from tests.helpers import randomize_
from tests.oracle import outputs_and_grads, reference_of, smooth_relus_
from tests.tolerances import ROUND_TRIP_ABS, assert_rel_close

f64 = torch.float64
C0 = 2  # input channels of the tiny flows


@torch.no_grad()
def trained_like(flow: nn.Module) -> nn.Module:
    """Random ActNorms, non-zero zero-initialised layers and a non-trivial learned top prior."""
    randomize_(flow)
    for m in flow.modules():
        if isinstance(m, fk.GaussianPrior) and m.kind == "learned":
            m.h.normal_(0.0, 0.1)
    return flow


def _plain_steps(level: int, channels: int, cond: int) -> list[fk.FlowStep]:
    return [fk.FlowStep(channels)]


def _cond_steps(level: int, channels: int, cond: int) -> list[fk.FlowStep]:
    return [fk.FlowStep(channels), fk.FlowStep(channels, fk.CondAffineCoupling(channels, cond, 8))]


# name -> (builder, conditioning maker (batch, H, W) -> cond or None)
VARIANTS: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int, int], object]]] = {
    "glow_affine": (lambda: fk.Glow(C0, levels=2, steps=2, hidden=8), lambda b, h, w: None),
    "glow_additive": (
        lambda: fk.Glow(C0, levels=2, steps=2, hidden=8, coupling="additive", lu=False),
        lambda b, h, w: None,
    ),
    "glow_classes": (
        lambda: fk.Glow(C0, levels=2, steps=2, hidden=8, num_classes=3),
        lambda b, h, w: torch.arange(b) % 3,
    ),
    "glow_image": (
        lambda: fk.Glow(C0, levels=2, steps=2, hidden=8, cond_channels=1, cond_features=3),
        lambda b, h, w: torch.randn(b, 1, h, w),
    ),
    # per-level tensors, a conditional split prior, a level without split before the top
    "cond_list": (
        lambda: fk.MultiScaleFlow(
            C0,
            3,
            _cond_steps,
            splits=[True, False, False],
            cond_channels=3,
            split_prior="conditional",
            top_prior="conditional",
        ),
        lambda b, h, w: [torch.randn(b, 3, h // 2**k, w // 2**k) for k in (1, 2, 3)],
    ),
}


def _variant(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Callable]:
    build, make_cond = VARIANTS[name]
    return trained_like(build()).to(dtype).eval(), make_cond


def _to(cond: object, dtype: torch.dtype) -> object:
    if isinstance(cond, list):
        return [c.to(dtype) for c in cond]
    return cond.to(dtype) if isinstance(cond, Tensor) and cond.is_floating_point() else cond


def _sample_of(cond: object, b: int) -> object:
    if isinstance(cond, list):
        return [c[b : b + 1] for c in cond]
    return None if cond is None else cond[b : b + 1]


# ---------------------------------------------------------------------------------------------
# log-det, round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logdet_matches_brute_force_jacobian(name: str):
    """float64, reference maths: the returned log-det is log|det dzs/dx| of the whole bijection
    x -> (split eps, top eps), priors' standardisation included."""
    flow, make_cond = _variant(name, f64)
    size = 8 if name == "cond_list" else 4  # 3 levels need 8x8
    x, cond = torch.randn(2, C0, size, size, dtype=f64), _to(make_cond(2, size, size), f64)
    flow.set_memory_saving(False)  # a Jacobian backpropagates through one graph many times
    with fk.use_backend("reference"):
        _, logdet = flow(x, cond)
        for b in range(2):
            xb, cb = x[b : b + 1], _sample_of(cond, b)

            def latents(v: Tensor, xb: Tensor = xb, cb: object = cb) -> Tensor:
                return torch.cat([z.reshape(-1) for z in flow(v.reshape(xb.shape), cb)[0]])

            jac = jacobian(latents, xb.reshape(-1))
            assert jac.shape == (xb.numel(), xb.numel())
            assert_rel_close(logdet[b : b + 1], torch.linalg.slogdet(jac)[1].reshape(1), "logdet_jacobian")


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trips(name: str, backend: str):
    """x -> zs -> x and zs -> x -> zs on the fp32 kernels (cuda: the C++ kernels on a CPU); the
    two log-dets cancel; log_prob is the sum of the latents' N(0, I) log-densities plus the log-det."""
    flow, make_cond = _variant(name)
    x, cond = torch.randn(3, C0, 8, 8), make_cond(3, 8, 8)
    with fk.use_backend(backend), torch.no_grad():
        zs, logdet = flow(x, cond)
        x_back, logdet_back = flow.inverse(zs, cond)
        zs_fresh = [torch.randn_like(z) for z in zs]
        zs_back, _ = flow(flow.inverse(zs_fresh, cond)[0], cond)
        log_prob = flow.log_prob(x, cond)
    assert [tuple(z.shape) for z in zs] == flow.latent_shapes(3, 8, 8)
    assert (x_back - x).abs().max().item() <= ROUND_TRIP_ABS["module"]
    assert (logdet + logdet_back).abs().max().item() <= ROUND_TRIP_ABS["module"] * logdet.abs().max().item()
    for z, z_back in zip(zs_fresh, zs_back):
        assert (z_back - z).abs().max().item() <= ROUND_TRIP_ABS["module"]
    want = logdet + sum(fk.reference.gaussian_log_prob(z) for z in zs)
    assert_rel_close(log_prob, want, "forward")


def test_bits_per_dim_is_the_scaled_nll():
    flow, _ = _variant("glow_affine")
    x = torch.rand(2, C0, 4, 4)
    with torch.no_grad():
        nll = -flow.log_prob(x)
        bpd, bpd_256 = flow.bits_per_dim(x), flow.bits_per_dim(x, n_bins=256)
    dims = C0 * 16
    assert_rel_close(bpd, nll / (dims * torch.log(torch.tensor(2.0))), "forward")
    assert_rel_close(bpd_256 - bpd, torch.full((2,), 8.0), "forward")  # log2(256) bits per dimension


# ---------------------------------------------------------------------------------------------
# memory-saving gradients, memory flat in depth
# ---------------------------------------------------------------------------------------------


class Flattened(nn.Module):
    """A multi-scale flow seen as x -> one (B, D) latent, for tests/oracle.py."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        zs, logdet = self.flow(x, cond)
        return torch.cat([z.flatten(1) for z in zs], dim=1), logdet


@pytest.mark.parametrize("backend", ["reference", "cuda"])
@pytest.mark.parametrize("name", ["glow_affine", "glow_additive", "glow_image"])
def test_memory_saving_gradients_match_float64_autograd(name: str, backend: str, one_thread):
    """Memory saving (one unit per level, level batching on) on the fp32 kernels: latents,
    log-det and the gradients of x, of the conditioning image (through the trainable encoder)
    and of every parameter within the fp32 noise of float64 stored-activation autograd. ReLUs
    smoothed (tests/oracle.py): the unit treats subnets as black boxes."""
    flow, make_cond = _variant(name)
    model = Flattened(smooth_relus_(flow))
    x, cond = torch.randn(2, C0, 8, 8), make_cond(2, 8, 8)
    dims = C0 * 64
    cot, cot_ld = torch.randn(2, dims), torch.randn(2)
    reference = reference_of(model, x, cond, cot, cot_ld)
    model.train()  # ActNorms are initialised (trained_like): training mode is allowed
    with fk.use_backend(backend):
        got = outputs_and_grads(model, x, cond, cot, cot_ld)
    reference.check(got, f"{name} on {backend}")


def _saved_mib(steps: int, memory_saving: bool) -> float:
    """MiB that autograd saves for a Glow training step (parameters excluded): memory saving on
    the default kernels, or stored-activation autograd (the reference backend without units)."""
    torch.manual_seed(0)
    backend = None if memory_saving else "reference"
    glow = fk.Glow(3, levels=2, steps=steps, hidden=16, memory_saving=memory_saving, backend=backend)
    x = torch.rand(4, 3, 16, 16)
    glow.initialize_(x)
    _, nbytes = fk.saved_tensor_bytes(lambda: -glow.log_prob(x).mean(), exclude=glow.parameters())
    return nbytes / 2**20


@pytest.mark.slow
def test_glow_training_step_memory_is_flat_in_depth():
    """The same activation memory at K = 8 and K = 32 with memory saving (measured: 0.059 MiB
    both), growing with K with stored activations (measured: 1.63 and 6.38 MiB, 0.2 MiB per step)."""
    saving = [_saved_mib(k, True) for k in (8, 32)]
    plain = [_saved_mib(k, False) for k in (8, 32)]
    assert saving[1] - saving[0] <= 0.25, f"memory saving grew {saving} MiB from K=8 to K=32"
    assert plain[1] - plain[0] >= 2.0, f"stored activations {plain} MiB: the comparison measures nothing"


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def test_sampling_shapes_temperature_and_generator():
    flow, _ = _variant("glow_affine")
    x = flow.sample(5, size=(8, 12))
    assert x.shape == (5, C0, 8, 12) and not x.requires_grad
    zeros = [torch.zeros(s) for s in flow.latent_shapes(2, 8, 12)]
    mode = flow.sample(2, size=(8, 12), temperature=0.0)
    assert torch.equal(mode, flow.sample(2, size=(8, 12), temperature=0.0))
    assert_rel_close(mode, flow.inverse(zeros)[0], "inverse")
    a = flow.sample(2, size=(8, 12), temperature=0.7, generator=torch.Generator().manual_seed(1))
    b = flow.sample(2, size=(8, 12), temperature=0.7, generator=torch.Generator().manual_seed(1))
    c = flow.sample(2, size=(8, 12), temperature=0.7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    shapes = flow.latent_shapes(3, 4, 4)
    assert flow.sample(shapes=shapes).shape == (3, C0, 4, 4)


def test_conditional_sampling():
    """The batch comes from the conditioning; the image size from the conditioning image; the
    class changes the sample through the top prior."""
    glow, _ = _variant("glow_classes")
    glow.image_size = (4, 8)
    labels = torch.tensor([0, 1, 2])
    modes = glow.sample(cond=labels, temperature=0.0)
    assert modes.shape == (3, C0, 4, 8)
    assert not torch.allclose(modes[0], modes[1])
    assert_rel_close(glow.sample(cond=torch.tensor([1]), temperature=0.0)[0], modes[1], "inverse")
    image_glow, _ = _variant("glow_image")
    assert image_glow.sample(cond=torch.randn(2, 1, 12, 8)).shape == (2, C0, 12, 8)


# ---------------------------------------------------------------------------------------------
# structure: SRFlow as a configuration, train/eval, state_dict layout
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-4x", "tiny-8x"])
def test_srflow_flow_is_a_configuration_of_the_container(preset: str):
    """srflow/flow.py's FlowUpsamplerNet is a MultiScaleFlow: its state_dict is the container's
    ``layers`` plus SRFlow's unused ``f`` conv; its objective (standardised split latents plus
    the splits' ``-sum(logs)``) equals the official convention, computed independently here in
    float64 (each split's ``log N(z2; mean, std)`` added to the flow log-det, then the top's
    ``log N(z; 0, I)``); its guarded decode equals the container's inverse on finite latents."""
    from srflow.flow import FlowUpsamplerNet
    from srflow.presets import get_preset

    p = get_preset(preset)
    net = trained_like(FlowUpsamplerNet(p, backend="reference")).to(f64).eval()
    assert isinstance(net, fk.MultiScaleFlow)
    assert [k for k in net.state_dict() if not k.startswith("layers.")] == ["f.0.weight", "f.0.bias"]
    size = 2**p.L * 2
    x = torch.randn(2, 3, size, size, dtype=f64)
    conds = [torch.randn(2, p.cond_channels, size // 2**k, size // 2**k, dtype=f64) for k in range(1, p.L + 1)]
    with fk.use_backend("reference"), torch.no_grad():
        latents, objective = net.encode(x, conds, torch.zeros(2, dtype=f64))
        official, state, eps_list = torch.zeros(2, dtype=f64), x, []
        for level, c in zip(net.levels, conds):
            state, official = level.squeeze(state, None, official)
            state, official = level.sequence(state, c, official)
            if level.split is not None:
                state, eps, official = level.split.encode(state, official)
                eps_list.append(eps)
        official = official + fk.reference.gaussian_log_prob(state)
        decoded, overflow = net.decode(latents, conds)
        x_back, _ = net.inverse(latents, conds)
    for z, want in zip(latents, [*eps_list, state], strict=True):
        assert_rel_close(z, want, "forward")
    assert_rel_close(objective, official, "forward", tol=1e-12)
    assert not overflow.any() and torch.equal(decoded, x_back)
    assert (x_back - x).abs().max().item() <= 1e-10


def test_state_dict_is_flat_and_train_mode_reaches_the_levels():
    glow, _ = _variant("glow_classes")
    keys = list(glow.state_dict())
    assert keys[0] == "layers.1.actnorm.bias"  # layers.0 is the first squeeze (no parameters)
    assert "top_prior.conv.weight" in keys and not any("sequence" in k or "steps" in k for k in keys)
    level = glow.levels[0]
    assert [*glow.layers[level.first : level.stop]] == [level.squeeze, *level.sequence.steps, level.split]
    glow.train()
    assert all(lv.sequence.training for lv in glow.levels)
    glow.eval()
    assert not any(lv.sequence.training for lv in glow.levels)


def test_training_mode_needs_initialised_actnorms():
    glow = fk.Glow(C0, levels=2, steps=1, hidden=8)
    x = torch.randn(2, C0, 4, 4)
    with pytest.raises(RuntimeError, match="has not been initialised"):
        glow(x)
    assert glow.initialize_(x) > 0
    glow(x)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_are_named():
    glow, _ = _variant("glow_affine")
    with pytest.raises(ValueError, match=r"x: expected a \(B, 2, H, W\) tensor, got \(1, 3, 4, 4\)"):
        glow(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"x: H and W must be positive multiples of 2\^levels = 4, got 6x4"):
        glow(torch.randn(1, C0, 6, 4))
    with pytest.raises(ValueError, match=r"zs: expected 2 latents \(one per split, then the top\), got 1"):
        glow.inverse([torch.randn(1, 24, 1, 1)])
    with pytest.raises(ValueError, match=r"zs\[0\]: expected shape \(1, 4, 2, 2\), got \(1, 4, 2, 3\)"):
        glow.inverse([torch.randn(1, 4, 2, 3), torch.randn(1, 16, 1, 1)])
    with pytest.raises(ValueError, match="size: the image size"):
        glow.sample(2)
    with pytest.raises(ValueError, match="n: the number of samples is needed"):
        glow.sample(size=(4, 4))


def test_bad_conditioning_is_named():
    classes, _ = _variant("glow_classes")
    x = torch.randn(2, C0, 4, 4)
    with pytest.raises(ValueError, match=r"cond: this flow is conditional \(cond_channels per level \[0, 3\]\)"):
        classes(x)
    with pytest.raises(ValueError, match=r"cond: class labels must lie in \[0, 3\), got \[0, 3\]"):
        classes(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"cond: expected class labels, an integer tensor of shape \(B,\)"):
        classes(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"cond\[1\]: expected batch 2, got 3"):
        classes(x, torch.tensor([0, 1, 2]))
    listed, _ = _variant("cond_list")
    x8 = torch.randn(2, C0, 8, 8)
    with pytest.raises(ValueError, match=r"cond: expected a list of 3 per-level tensors .* got Tensor"):
        listed(x8, torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"cond\[2\]: level 2 needs a tensor of 3 channels, got None"):
        listed(x8, [torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2), None])
    with pytest.raises(ValueError, match=r"cond\[0\]: expected a \(B, 3, h, w\) tensor, got \(2, 4, 4, 4\)"):
        listed(x8, [torch.randn(2, 4, 4, 4), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 1, 1)])


def test_constructor_errors():
    with pytest.raises(ValueError, match="levels: expected at least 1, got 0"):
        fk.MultiScaleFlow(3, 0, _cond_steps)
    with pytest.raises(ValueError, match=r"splits: expected one value per level \(2\), got 3"):
        fk.MultiScaleFlow(3, 2, _cond_steps, splits=[True, True, False], cond_channels=3)
    with pytest.raises(ValueError, match="top_prior: a 'conditional' prior needs cond_channels at level 1, got 0"):
        fk.MultiScaleFlow(3, 2, _plain_steps, cond_channels=[3, 0], top_prior="conditional")
    with pytest.raises(ValueError, match="top_prior: expected one of .* or a module, got 'mixture'"):
        fk.MultiScaleFlow(3, 1, _cond_steps, cond_channels=3, top_prior="mixture")
    with pytest.raises(ValueError, match="split_prior: expected 'learned' or 'conditional', got 'none'"):
        fk.MultiScaleFlow(3, 2, _cond_steps, cond_channels=3, split_prior="none")
    with pytest.raises(ValueError, match="num_classes, cond_channels: choose class- or image-conditioning"):
        fk.Glow(3, num_classes=10, cond_channels=3)
    with pytest.raises(ValueError, match="coupling: expected one of .*, got 'spline'"):
        fk.Glow(3, coupling="spline")
    with pytest.raises(ValueError, match="kind: expected one of"):
        fk.GaussianPrior(4, "uniform")
