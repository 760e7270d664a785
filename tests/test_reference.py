"""The oracle itself: float64 gradcheck, explicit backward formulas vs autograd, log-dets vs
brute-force Jacobians, round trips of every reference op."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch.autograd.functional import jacobian

from flowkernels import reference as ref
from tests.tolerances import REL_TOL, assert_rel_close

f64 = torch.float64


def _w(c: int) -> torch.Tensor:
    """A well-conditioned random (C, C) matrix, float64."""
    q, _ = torch.linalg.qr(torch.randn(c, c, dtype=f64))
    return q + 0.1 * torch.randn(c, c, dtype=f64)


def _brute_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn(x_b, b)/d x_b| per sample b, float64, by the full Jacobian of each sample."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1]
        jac = jacobian(lambda v, b=b, xb=xb: fn(v.reshape(xb.shape), b).reshape(-1), xb.reshape(-1))
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# log-dets vs brute-force Jacobians (tiny inputs, float64)
# ---------------------------------------------------------------------------------------------


def test_actnorm_logdet_matches_jacobian():
    x = torch.randn(2, 3, 2, 3, dtype=f64)
    logs, bias = torch.randn(1, 3, 1, 1, dtype=f64), torch.randn(1, 3, 1, 1, dtype=f64)
    _, ld = ref.actnorm_fwd(x, logs, bias)
    assert_rel_close(ld, _brute_logdet(lambda v, b: ref.actnorm_fwd(v, logs, bias)[0], x), "logdet_jacobian")
    _, ld_inv = ref.actnorm_inv(x, logs, bias)
    assert_rel_close(ld_inv, -ld, "logdet_jacobian")


@pytest.mark.parametrize("direction", ["fwd", "inv"])
def test_invconv_logdet_matches_jacobian(direction: str):
    x, w = torch.randn(2, 4, 2, 2, dtype=f64), _w(4)
    fn = ref.invconv_fwd if direction == "fwd" else ref.invconv_inv
    _, ld = fn(x, w)
    assert_rel_close(ld, _brute_logdet(lambda v, b: fn(v, w)[0], x), "logdet_jacobian")


@pytest.mark.parametrize("direction", ["fwd", "inv"])
def test_actnorm_conv_logdet_matches_jacobian(direction: str):
    x, w = torch.randn(2, 3, 3, 2, dtype=f64), _w(3)
    logs, bias = torch.randn(3, dtype=f64) * 0.3, torch.randn(3, dtype=f64)
    fn = ref.actnorm_conv_fwd if direction == "fwd" else ref.actnorm_conv_inv
    _, ld = fn(x, w, logs, bias)
    assert_rel_close(ld, _brute_logdet(lambda v, b: fn(v, w, logs, bias)[0], x), "logdet_jacobian")


@pytest.mark.parametrize("passive", [0, 2], ids=["injector", "coupling"])
@pytest.mark.parametrize("shift_first", [True, False], ids=["srflow", "glow"])
@pytest.mark.parametrize("direction", ["fwd", "inv"])
def test_affine_coupling_logdet_matches_jacobian(passive: int, shift_first: bool, direction: str):
    # h fixed: the Jacobian w.r.t. x is diagonal on the active channels; with h = NN(x1) it is
    # triangular with the same diagonal (checked at layer level in test_layers).
    x = torch.randn(2, 4, 2, 3, dtype=f64)
    h = torch.randn(2, 2 * (4 - passive), 2, 3, dtype=f64)
    fn = ref.affine_coupling_fwd if direction == "fwd" else ref.affine_coupling_inv
    _, ld = fn(x, h, passive, shift_first, 1e-4)
    brute = _brute_logdet(lambda v, b: fn(v, h[b : b + 1], passive, shift_first, 1e-4)[0], x)
    assert_rel_close(ld, brute, "logdet_jacobian")


@pytest.mark.parametrize("direction", ["fwd", "inv"])
def test_additive_coupling_is_volume_preserving(direction: str):
    """With h fixed the map is a translation of x2: Jacobian the identity, log-det exactly 0."""
    x, h = torch.randn(2, 5, 2, 3, dtype=f64), torch.randn(2, 3, 2, 3, dtype=f64)
    fn = ref.additive_coupling_fwd if direction == "fwd" else ref.additive_coupling_inv
    _, ld = fn(x, h, 2)
    assert torch.equal(ld, torch.zeros(2, dtype=f64))
    jac = jacobian(lambda v: fn(v.reshape(x.shape), h, 2)[0].reshape(-1), x.reshape(-1))
    assert torch.equal(jac, torch.eye(x.numel(), dtype=f64))


def test_gaussian_standardize_logdet_matches_jacobian():
    z = torch.randn(2, 3, 2, 2, dtype=f64)
    mean, logs = torch.randn(2, 3, 2, 2, dtype=f64), 0.5 * torch.randn(2, 3, 2, 2, dtype=f64)
    _, ld = ref.gaussian_standardize(z, mean, logs)
    brute = _brute_logdet(lambda v, b: ref.gaussian_standardize(v, mean[b : b + 1], logs[b : b + 1])[0], z)
    assert_rel_close(ld, brute, "logdet_jacobian")
    eps, _ = ref.gaussian_standardize(z, mean, logs)
    # log N(z; mean, e^logs) = log N(eps; 0, I) + dlogdet
    assert_rel_close(ref.gaussian_log_prob(eps) + ld, ref.gaussian_log_prob(z, mean, logs), "forward")
    z_back, ld_back = ref.gaussian_unstandardize(eps, mean, logs)
    assert_rel_close(z_back, z, "inverse")
    assert_rel_close(ld_back, -ld, "inverse")


def test_squeeze_is_a_permutation():
    x = torch.randn(2, 3, 4, 6, dtype=f64)
    jac = jacobian(lambda v: ref.squeeze2d(v.reshape(x.shape)).reshape(-1), x.reshape(-1))
    assert torch.equal(jac.abs().sum(0), torch.ones(x.numel(), dtype=f64))  # one 1 per column
    assert float(torch.linalg.slogdet(jac)[1]) == pytest.approx(0.0, abs=1e-12)


def test_squeeze_matches_official_channel_order():
    # Official squeeze2d: view (B, C, H/2, 2, W/2, 2), permute (0, 1, 3, 5, 2, 4).
    x = torch.randn(2, 3, 4, 6)
    b, c, h, w = x.shape
    official = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
    assert torch.equal(ref.squeeze2d(x), official)
    assert torch.equal(ref.unsqueeze2d(official), x)


# ---------------------------------------------------------------------------------------------
# gradcheck in float64
# ---------------------------------------------------------------------------------------------


def _req(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.clone().requires_grad_(True) for t in ts)


def test_gradcheck_actnorm_and_invconv():
    x = torch.randn(2, 3, 2, 3, dtype=f64)
    logs, bias, w = torch.randn(1, 3, 1, 1, dtype=f64) * 0.3, torch.randn(1, 3, 1, 1, dtype=f64), _w(3)
    assert gradcheck(lambda *a: ref.actnorm_fwd(*a), _req(x, logs, bias))
    assert gradcheck(lambda *a: ref.actnorm_inv(*a), _req(x, logs, bias))
    assert gradcheck(lambda *a: ref.invconv_fwd(*a), _req(x, w))
    assert gradcheck(lambda *a: ref.invconv_inv(*a), _req(x, w))
    assert gradcheck(lambda *a: ref.actnorm_conv_fwd(*a), _req(x, w, logs, bias))
    assert gradcheck(lambda *a: ref.actnorm_conv_inv(*a), _req(x, w, logs, bias))


@pytest.mark.parametrize("passive", [0, 3], ids=["injector", "coupling"])
@pytest.mark.parametrize("shift_first", [True, False], ids=["srflow", "glow"])
def test_gradcheck_affine_coupling(passive: int, shift_first: bool):
    x = torch.randn(2, 5, 2, 3, dtype=f64)
    h = torch.randn(2, 2 * (5 - passive), 2, 3, dtype=f64)
    assert gradcheck(lambda a, b: ref.affine_coupling_fwd(a, b, passive, shift_first), _req(x, h))
    assert gradcheck(lambda a, b: ref.affine_coupling_inv(a, b, passive, shift_first), _req(x, h))


@pytest.mark.parametrize("passive", [0, 3], ids=["all_channels", "coupling"])
def test_gradcheck_additive_coupling(passive: int):
    x, h = torch.randn(2, 5, 2, 3, dtype=f64), torch.randn(2, 5 - passive, 2, 3, dtype=f64)
    assert gradcheck(lambda a, b: ref.additive_coupling_fwd(a, b, passive)[0], _req(x, h))
    assert gradcheck(lambda a, b: ref.additive_coupling_inv(a, b, passive)[0], _req(x, h))


def test_gradcheck_split_and_prior():
    z, h = torch.randn(2, 4, 3, 2, dtype=f64), torch.randn(2, 4, 3, 2, dtype=f64) * 0.3
    assert gradcheck(lambda a, b: ref.split2d_fwd(a, b, 2), _req(z, h))
    z1, eps = torch.randn(2, 2, 3, 2, dtype=f64), torch.randn(2, 2, 3, 2, dtype=f64)
    assert gradcheck(lambda a, b, c: ref.split2d_inv(a, b, c), _req(z1, h, eps))


def test_gradcheck_lu_weight():
    c = 4
    perm = torch.eye(c, dtype=f64)[torch.randperm(c)]
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=f64)
    lower, upper, log_s = torch.randn(c, c, dtype=f64), torch.randn(c, c, dtype=f64), torch.randn(c, dtype=f64)
    assert gradcheck(lambda a, b, d: ref.lu_weight(perm, a, b, d, sign), _req(lower, upper, log_s))
    w = ref.lu_weight(perm, lower, upper, log_s, sign)
    assert float(torch.linalg.slogdet(w)[1]) == pytest.approx(float(log_s.sum()), rel=1e-10)


# ---------------------------------------------------------------------------------------------
# explicit backward formulas (what the kernels implement) vs autograd of the forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("passive", [0, 3], ids=["injector", "coupling"])
@pytest.mark.parametrize("shift_first", [True, False], ids=["srflow", "glow"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "inv"])
def test_affine_coupling_bwd_formulas_match_autograd(passive: int, shift_first: bool, reverse: bool):
    inp = torch.randn(3, 7, 4, 5, dtype=f64)
    h = torch.randn(3, 2 * (7 - passive), 4, 5, dtype=f64)
    g_out, g_ld = torch.randn(3, 7, 4, 5, dtype=f64), torch.randn(3, dtype=f64)
    fn = ref.affine_coupling_inv if reverse else ref.affine_coupling_fwd
    inp_r, h_r = _req(inp, h)
    out, ld = fn(inp_r, h_r, passive, shift_first, 1e-4)
    want_inp, want_h = torch.autograd.grad((out, ld), (inp_r, h_r), (g_out, g_ld))
    rebuilt, got_inp, got_h = ref.affine_coupling_bwd(out.detach(), h, g_out, g_ld, passive, shift_first, 1e-4, reverse)
    assert_rel_close(rebuilt, inp, "inverse")
    assert_rel_close(got_inp, want_inp, "grad")
    assert_rel_close(got_h, want_h, "grad")


@pytest.mark.parametrize("passive", [0, 3], ids=["all_channels", "coupling"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "inv"])
def test_additive_coupling_bwd_formulas_match_autograd(passive: int, reverse: bool):
    inp, h = torch.randn(3, 7, 4, 5, dtype=f64), torch.randn(3, 7 - passive, 4, 5, dtype=f64)
    g_out = torch.randn(3, 7, 4, 5, dtype=f64)
    fn = ref.additive_coupling_inv if reverse else ref.additive_coupling_fwd
    inp_r, h_r = _req(inp, h)
    out, _ = fn(inp_r, h_r, passive)
    want_inp, want_h = torch.autograd.grad(out, (inp_r, h_r), g_out)
    rebuilt, got_inp, got_h = ref.additive_coupling_bwd(out.detach(), h, g_out, passive, reverse)
    assert_rel_close(rebuilt, inp, "inverse")
    assert_rel_close(got_inp, want_inp, "grad")
    assert_rel_close(got_h, want_h, "grad")


def test_channel_affine_bwd_matches_autograd():
    c = 5
    m = _w(c)
    off = torch.randn(c, dtype=f64)
    inp, g_out = torch.randn(2, c, 3, 4, dtype=f64), torch.randn(2, c, 3, 4, dtype=f64)
    inp_r, m_r, off_r = _req(inp, m, off)
    out = ref.channel_affine(inp_r, m_r, off_r)
    want = torch.autograd.grad(out, (inp_r, m_r, off_r), g_out)
    m_inv = torch.linalg.inv(m)
    rebuilt, *got = ref.channel_affine_bwd(out.detach(), g_out, m, m_inv, -m_inv @ off)
    assert_rel_close(rebuilt, inp, "inverse")
    for g, w in zip(got, want):
        assert_rel_close(g, w, "grad")


def test_round_trips_of_reference_ops():
    x = torch.randn(2, 6, 4, 4, dtype=f64)
    w, logs, bias = _w(6), torch.randn(6, dtype=f64) * 0.3, torch.randn(6, dtype=f64)
    y, ld = ref.actnorm_conv_fwd(x, w, logs, bias)
    x2, ld2 = ref.actnorm_conv_inv(y, w, logs, bias)
    assert_rel_close(x2, x, "inverse")
    assert_rel_close(ld + ld2, torch.zeros_like(ld), "inverse", tol=REL_TOL["inverse"] * ld.abs().max().item())
    h = torch.randn(2, 6, 4, 4, dtype=f64)
    y, _ = ref.affine_coupling_fwd(x, h, 3)
    assert_rel_close(ref.affine_coupling_inv(y, h, 3)[0], x, "inverse")
    y, _ = ref.additive_coupling_fwd(x, h[:, :3], 3)
    assert_rel_close(ref.additive_coupling_inv(y, h[:, :3], 3)[0], x, "inverse")
    z1, eps, logp = ref.split2d_fwd(x, h, 3)
    z, logp2 = ref.split2d_inv(z1, h, eps)
    assert_rel_close(z, x, "inverse")
    assert_rel_close(logp2, logp, "inverse")
