"""Every invertible layer on the reference backend: round trips, log-dets against brute-force
Jacobians, float64 gradcheck, the module contract, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

import flowkernels as fk
from tests.helpers import cuda_syncs_raise, randomize_, srflow_level
from tests.tolerances import ROUND_TRIP_ABS, assert_rel_close

f64 = torch.float64
COND = 3  # conditioning channels used by the conditional layers below


@pytest.fixture(autouse=True)
def _reference_backend():
    """These are the reference layers' tests; the fused backends have their own test files."""
    with fk.use_backend("reference"):
        yield


def _layers(channels: int) -> dict[str, fk.InvertibleModule]:
    """One of each layer over ``channels`` channels (conditional ones read COND channels)."""
    return {
        "actnorm": fk.ActNorm2d(channels),
        "invconv": fk.InvConv1x1(channels),
        "invconv_lu": fk.InvConv1x1(channels, lu=True),
        "coupling_glow": fk.AffineCoupling(channels, hidden=8, shift_first=False),
        "coupling_srflow_cond": fk.AffineCoupling(channels, cond_channels=COND, hidden=8, shift_first=True),
        "cond_affine": fk.CondAffineCoupling(channels, COND, hidden=8),
        "coupling_additive": fk.AdditiveCoupling(channels, hidden=8),
        "coupling_additive_cond": fk.AdditiveCoupling(channels, cond_channels=COND, hidden=8),
        "flowstep_transitional": fk.FlowStep(channels),
        "flowstep_cond": fk.FlowStep(channels, fk.CondAffineCoupling(channels, COND, hidden=8), lu=True),
        "flowstep_additive": fk.FlowStep(channels, fk.AdditiveCoupling(channels, COND, hidden=8), lu=True),
        "squeeze": fk.Squeeze(2),
        "sequence": fk.FlowSequence(
            [fk.FlowStep(channels), fk.FlowStep(channels, fk.CondAffineCoupling(channels, COND, hidden=8))]
        ),
        "sequence_plain": fk.FlowSequence([fk.FlowStep(channels)], memory_saving=False),
    }


LAYER_NAMES = list(_layers(4))


def _make(name: str, channels: int = 4, dtype: torch.dtype = torch.float32) -> fk.InvertibleModule:
    layer = randomize_(_layers(channels)[name]).to(dtype)
    return layer.eval()


@pytest.mark.parametrize("name", LAYER_NAMES)
def test_round_trip(name: str):
    layer = _make(name)
    x, cond = torch.randn(3, 4, 6, 10), torch.randn(3, COND, 6, 10)
    with torch.no_grad():
        z, ld = layer(x, cond)
        x2, ld2 = layer.inverse(z, cond, ld)
    err = (x2 - x).abs().max().item()
    assert err <= ROUND_TRIP_ABS["module"], f"{name}: round trip error {err:.2e}"
    assert ld2.abs().max().item() <= ROUND_TRIP_ABS["module"] * max(1.0, ld.abs().max().item())


# The memory-saving "sequence" is excluded: a Jacobian needs many backward passes through one
# graph, which the unit refuses by design (test_memory_saving checks it against plain autograd).
@pytest.mark.parametrize("name", [n for n in LAYER_NAMES if n not in ("squeeze", "sequence")])
def test_logdet_matches_brute_force_jacobian(name: str):
    # float64 end to end; couplings' subnets read x1, so the Jacobian is triangular, not diagonal.
    layer = _make(name, dtype=f64)
    x, cond = torch.randn(2, 4, 2, 2, dtype=f64), torch.randn(2, COND, 2, 2, dtype=f64)
    _, ld = layer(x, cond)
    for b in range(2):
        xb, cb = x[b : b + 1], cond[b : b + 1]
        jac = jacobian(lambda v, xb=xb, cb=cb: layer(v.reshape(xb.shape), cb)[0].reshape(-1), xb.reshape(-1))
        assert_rel_close(ld[b : b + 1], torch.linalg.slogdet(jac)[1].reshape(1), "logdet_jacobian")


@pytest.mark.parametrize("name", ["flowstep_cond", "coupling_glow", "coupling_additive_cond", "split"])
def test_gradcheck_float64(name: str):
    layer = randomize_(fk.Split2d(4)).to(f64).eval() if name == "split" else _make(name, dtype=f64)
    x = torch.randn(2, 4, 3, 2, dtype=f64, requires_grad=True)
    cond = torch.randn(2, COND, 3, 2, dtype=f64, requires_grad=True)
    if name == "split":
        assert gradcheck(lambda v: layer(v), (x,))
        return
    assert gradcheck(lambda v, c: layer(v, c), (x, cond))
    assert gradcheck(lambda v, c: layer.inverse(v, c), (x, cond))


def test_split2d_round_trip_and_sampling():
    split = randomize_(fk.Split2d(6)).eval()
    z = torch.randn(2, 6, 4, 4)
    z1, eps, logp = split.encode(z)
    assert z1.shape == (2, 3, 4, 4) and eps.shape == (2, 3, 4, 4)
    z_back, ld = split.inverse(z1, eps=eps)
    assert (z_back - z).abs().max().item() <= ROUND_TRIP_ABS["module"]
    assert_rel_close(-ld, logp, "inverse")
    g = torch.Generator().manual_seed(3)
    a, _ = split.inverse(z1, temperature=0.5, generator=g)
    b, _ = split.inverse(z1, temperature=0.5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    zero, _ = split.inverse(z1, temperature=0.0)
    mean = split.prior(z1)[:, 0::2]
    assert torch.equal(zero[:, 3:], mean)


def test_additive_coupling_logdet_is_exactly_zero():
    """The volume-preserving coupling passes the running log-det through unchanged, both ways."""
    layer = _make("coupling_additive_cond")
    x, cond, ld_in = torch.randn(2, 4, 3, 5), torch.randn(2, COND, 3, 5), torch.randn(2)
    with torch.no_grad():
        z, ld = layer(x, cond, ld_in)
        _, ld_back = layer.inverse(z, cond, ld)
    assert torch.equal(ld, ld_in) and torch.equal(ld_back, ld_in)


def test_split2d_conditional_prior():
    """The prior reads cond: the bijection z -> (z1, eps) has log-det -sum(logs) (brute-force
    Jacobian), agrees with the objective convention (log p(z2) = log N(eps) + log-det), and
    inverts."""
    split = randomize_(fk.Split2d(4, cond_channels=COND)).to(f64).eval()
    z, cond = torch.randn(2, 4, 2, 3, dtype=f64), torch.randn(2, COND, 2, 3, dtype=f64)
    z1, eps, ld = split.standardize(z, cond)
    for b in range(2):
        zb, cb = z[b : b + 1], cond[b : b + 1]

        def flat(v, zb=zb, cb=cb):
            out = split.standardize(v.reshape(zb.shape), cb)
            return torch.cat([out[0].reshape(-1), out[1].reshape(-1)])

        jac = jacobian(flat, zb.reshape(-1))
        assert_rel_close(ld[b : b + 1], torch.linalg.slogdet(jac)[1].reshape(1), "logdet_jacobian")
    _, eps_enc, logp = split.encode(z, cond=cond)
    assert torch.equal(eps_enc, eps)
    assert_rel_close(logp, fk.reference.gaussian_log_prob(eps) + ld, "forward")
    z_back, ld_back = split.unstandardize(z1, eps, cond, ld)
    assert_rel_close(z_back, z, "inverse")
    assert ld_back.abs().max().item() <= 1e-12
    other = split.standardize(z, torch.randn_like(cond))[1]
    assert not torch.allclose(other, eps)  # the prior really depends on cond


def test_forward_returns_new_logdet_and_keeps_input():
    layer = _make("flowstep_cond")
    x, cond, ld_in = torch.randn(2, 4, 4, 4), torch.randn(2, COND, 4, 4), torch.randn(2)
    before = ld_in.clone()
    with torch.no_grad():
        _, ld_out = layer(x, cond, ld_in)
        _, ld_alone = layer(x, cond)
    assert torch.equal(ld_in, before), "the caller's logdet must not be modified"
    assert ld_out.dtype == torch.float32 and ld_out.shape == (2,)
    assert_rel_close(ld_out, before + ld_alone, "forward")


def test_inverse_scale_floor_bounds_amplification():
    coupling = randomize_(fk.AffineCoupling(4, hidden=8, shift_first=True)).eval()
    with torch.no_grad():
        coupling.net[4].bias[1::2] = -30.0  # raw scale -30: s = sigmoid(-28) + 1e-4 ~ 1e-4
    y = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        x_plain, _ = coupling.inverse(y)
        coupling.inverse_scale_floor = 0.5
        x_floored, _ = coupling.inverse(y)
    assert x_plain[:, 2:].abs().max() > 1e3  # divided by ~1e-4
    assert x_floored[:, 2:].abs().max() < 10.0 * y.abs().max() + 10.0
    coupling.inverse_scale_floor = 2.0
    with pytest.raises(ValueError, match="inverse_scale_floor"):
        coupling.inverse(y)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the problem
# ---------------------------------------------------------------------------------------------


def test_wrong_channel_count():
    step = _make("flowstep_cond")
    with pytest.raises(ValueError, match="expected 4 channels, got 5"):
        step(torch.randn(1, 5, 4, 4), torch.randn(1, COND, 4, 4))


def test_cond_of_wrong_size():
    step = _make("flowstep_cond")
    with pytest.raises(ValueError, match=r"cond: expected shape \(1, 3, 4, 4\), got \(1, 3, 2, 4\)"):
        step(torch.randn(1, 4, 4, 4), torch.randn(1, COND, 2, 4))
    with pytest.raises(ValueError, match="cond: this layer needs"):
        step(torch.randn(1, 4, 4, 4))


def test_odd_spatial_size_for_squeeze():
    with pytest.raises(ValueError, match="H and W divisible by 2, got 5x4"):
        fk.Squeeze(2)(torch.randn(1, 3, 5, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.int64])
def test_wrong_dtype(dtype: torch.dtype):
    with pytest.raises(TypeError, match="x: expected torch.float32"):
        _make("actnorm")(torch.zeros(1, 4, 2, 2, dtype=dtype))


def test_wrong_device():
    step = _make("flowstep_cond")
    with pytest.raises(ValueError, match="cond is on meta but x is on cpu"):
        step(torch.randn(1, 4, 4, 4), torch.empty(1, COND, 4, 4, device="meta"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(bad: float):
    seq = fk.FlowSequence(srflow_level(3, 4, COND, hidden=8)).eval()
    x = torch.randn(1, 4, 4, 4)
    x[0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match="x: contains 1 non-finite values"):
        seq(x, torch.randn(1, COND, 4, 4))
    cond = torch.randn(1, COND, 4, 4)
    cond[0, 0, 0, 0] = bad
    with pytest.raises(ValueError, match="cond: contains 1 non-finite values"):
        seq(torch.randn(1, 4, 4, 4), cond)


def test_wrong_logdet():
    with pytest.raises(ValueError, match=r"logdet: expected shape \(2,\)"):
        _make("actnorm")(torch.randn(2, 4, 2, 2), logdet=torch.zeros(3))
    with pytest.raises(TypeError, match="logdet: expected torch.float32"):
        _make("actnorm")(torch.randn(2, 4, 2, 2), logdet=torch.zeros(2, dtype=f64))


def test_constructor_errors():
    with pytest.raises(ValueError, match="coupling over 4 channels, got 6"):
        fk.FlowStep(4, fk.AffineCoupling(6))
    with pytest.raises(ValueError, match="at least one layer"):
        fk.FlowSequence([])
    with pytest.raises(TypeError, match="steps\\[0\\]: expected an InvertibleModule"):
        fk.FlowSequence([torch.nn.Conv2d(1, 1, 1)])
    with pytest.raises(ValueError, match="keep_every"):
        fk.FlowSequence([fk.FlowStep(4)], keep_every=0)
    with pytest.raises(ValueError, match="channels: a coupling needs at least 2 channels, got 1"):
        fk.AdditiveCoupling(1)
    with pytest.raises(ValueError, match="cond_channels: expected a non-negative integer, got -1"):
        fk.Split2d(4, cond_channels=-1)


def test_conditional_split_needs_its_cond():
    split = fk.Split2d(4, cond_channels=COND)
    with pytest.raises(ValueError, match=r"cond: this layer needs a \(2, 3, 4, 4\) tensor, got None"):
        split.standardize(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"eps: expected shape \(2, 2, 4, 4\), got \(2, 2, 4, 3\)"):
        split.unstandardize(torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 3), torch.randn(2, COND, 4, 4))


@pytest.mark.parametrize("backend", ["reference", "cuda"])
def test_input_dtype_must_match_the_parameters(backend: str) -> None:
    """A float64 input to a float32 layer is named as such on every backend (not a dtype error
    from inside a matrix product, nor a backend refusal)."""
    step = fk.FlowStep(4, fk.CondAffineCoupling(4, 6, 8), backend=backend).eval()
    with pytest.raises(TypeError, match=r"expected torch.float32 to match the parameters of FlowStep, got .*float64"):
        step(torch.randn(1, 4, 3, 3, dtype=torch.float64), torch.randn(1, 6, 3, 3))


def test_sequence_maps_after_a_thread_count_change():
    """The folded maps of a sequence of 192-channel steps (SRFlow 8x's top level) after the
    intra-op thread count changed: torch 2.13's batched CPU LU then returns wrong pivots (a
    batched slogdet off by ~100 per matrix), so the maps' W^-1 and log|det W| are computed one
    matrix at a time on a CPU (the inverses then from those factors in one batched solve). The
    log-det and the inverse must equal the step-by-step ones."""
    steps = [randomize_(fk.FlowStep(192)) for _ in range(4)]
    seq = fk.FlowSequence(steps)
    x = torch.randn(2, 192, 2, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_num_threads(max(2, threads))
    try:
        with torch.no_grad(), fk.use_backend("reference"):
            z, logdet = seq(x)
            back, back_logdet = seq.inverse(z)
            want_z, want = x, torch.zeros(2)
            for step in steps:
                want_z, want = step(want_z, None, want)
            want_back, want_back_logdet = z, torch.zeros(2)
            for step in reversed(steps):
                want_back, want_back_logdet = step.inverse(want_back, None, want_back_logdet)
    finally:
        torch.set_num_threads(threads)
    assert_rel_close(logdet, want, "forward")
    assert_rel_close(z, want_z, "forward")
    assert_rel_close(back, want_back, "inverse")
    assert_rel_close(back_logdet, want_back_logdet, "inverse")
    assert_rel_close(back, x, "inverse")


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [12, 96, 192])
def test_sequence_maps_linear_algebra_is_capturable_on_cuda(channels: int):
    """W^-1 and log|det W| of a stack of 18 maps (df2k-4x's 12 and 96 channels, 8x's 192), in
    float64 on CUDA: no host sync, and captured in a CUDA graph whose replay with new weights
    gives the float64 oracle's. torch's batched LU picks cuSOLVER or MAGMA by size, and what
    MAGMA does (its own allocations, waits) a graph may not capture; this finds it in seconds
    instead of inside a two-minute compile of the whole step."""
    from flowkernels.layers._channel_maps import _inverse_stats  # noqa: PLC0415

    gen = torch.Generator().manual_seed(channels)

    def weights() -> torch.Tensor:
        q = torch.linalg.qr(torch.randn(18, channels, channels, generator=gen, dtype=torch.float64))[0]
        return (q + 0.5 / channels**0.5 * torch.randn(q.shape, generator=gen, dtype=torch.float64)).float()

    static = weights().cuda()
    _inverse_stats(static, True, True)  # first call: library handles, workspaces
    torch.cuda.synchronize()
    with cuda_syncs_raise():
        _inverse_stats(static, True, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        _inverse_stats(static, True, True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # on the warmed-up stream: cuSOLVER keeps state per stream
        inv, lad = _inverse_stats(static, True, True)
    new = weights()
    static.copy_(new)
    graph.replay()
    w64 = new.double()
    # float64 results rounded once to float32: within a few fp32 ulps of the oracle
    torch.testing.assert_close(inv.cpu().double(), torch.linalg.inv(w64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lad.cpu().double(), torch.linalg.slogdet(w64)[1], rtol=1e-6, atol=1e-6)


def test_trainable_parameters_are_the_parameters_that_require_grad():
    """The direct walk the unit uses gives exactly ``[p for p in parameters() if p.requires_grad]``,
    in order, also with frozen and shared parameters."""
    from flowkernels.layers.base import trainable_parameters

    step = fk.FlowStep(6, fk.CondAffineCoupling(6, 4, 8))
    step.affine.fAffine[0].weight.requires_grad_(False)
    step.affine.fFeatures[2] = step.affine.fAffine[2]  # a shared submodule
    for module in [step, step.affine, step.invconv, fk.FlowStep(6, lu=True)]:
        want = [p for p in module.parameters() if p.requires_grad]
        got = trainable_parameters(module)
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want))


class _Repeat2x(fk.InvertibleModule):
    """Not invertible: doubles H and W (nearest), keeping the channels. What no layer of a
    sequence may do (C*H*W changes), for the memory-saving backward's check."""

    def _run(self, x: torch.Tensor, cond, logdet: torch.Tensor, reverse: bool) -> torch.Tensor:
        return x[:, :, ::2, ::2] if reverse else x.repeat_interleave(2, 2).repeat_interleave(2, 3)


def test_memory_saving_backward_refuses_steps_of_one_width_at_different_sizes():
    """The backward folds the 1x1 maps of all the steps of one channel count at once with one
    pixel count (invertible layers keep C*H*W): a layer that changes the size is named, not a
    silently wrong log-det gradient."""
    seq = fk.FlowSequence([randomize_(fk.FlowStep(4)), _Repeat2x(), randomize_(fk.FlowStep(4))], memory_saving=True)
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    z, logdet = seq(x)
    with pytest.raises(RuntimeError, match=r"steps \[0, 2\] \(4 channels\) ran at different pixel counts"):
        (z.sum() + logdet.sum()).backward()


@pytest.mark.gpu
def test_invconv_cache_is_not_captured_in_a_cuda_graph():
    """A 1x1 convolution outside a sequence takes W^-1 and log|det W| from its cache, keyed on the
    weight's version. A CUDA graph replay runs no Python: a capture that read the cache would
    replay the log-det of the weight it was captured with, and a replay that updates the weight
    (an optimizer step in the graph) leaves its version, so an eager call after it would find the
    key of the call before. Under capture the cache is bypassed, and after one never used again:
    each replay and each eager call after it give W x and pixels * log|det W| of the weight they
    ran with (the step's ActNorm, uninitialised in eval mode, is the identity)."""
    step = fk.FlowStep(12).cuda().eval()
    step.check_inputs = False  # its NaN scan reads a value on the host: not capturable
    weight = step.invconv.weight
    x = torch.randn(2, 12, 8, 8, device="cuda")
    delta = 0.05 * torch.randn(12, 12, device="cuda")

    def check(y: torch.Tensor, logdet: torch.Tensor, w: torch.Tensor) -> None:
        w64 = w.double()
        want_logdet = (64 * torch.linalg.slogdet(w64)[1]).expand(2)
        assert_rel_close(logdet.double(), want_logdet, "forward")
        assert_rel_close(y.double(), torch.einsum("oc,bchw->bohw", w64, x.double()), "forward")

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires; fills the cache
            step(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            y, logdet = step(x)
            weight.add_(delta)  # what an optimizer step in the graph does, after the forward
        torch.cuda.current_stream().wait_stream(side)
        for _ in range(3):
            before = weight.clone()
            graph.replay()
            check(y, logdet, before)
            check(*step(x), weight)  # eager, with the weight the replay left
