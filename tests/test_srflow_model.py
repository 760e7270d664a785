"""SRFlow model: official layout and parameter counts, round trips, memory-saving gradients,
NLL units, sampling semantics, ActNorm init, checkpoint loading, input checks, NaN remedy.

The official presets are only built (on the meta device) for counting and key layout; the
numerical tests use "tiny" presets and ``DEEP_4X`` (the official 4x flow, K=16, hidden 64, 320
conditioning channels, on a 4-block RRDB) on small crops, all with the reference backend.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import flowkernels as fk
import srflow
from srflow import SRFlow
from tests.helpers import trained_like_
from tests.kernel_grid import kernel_backend
from tests.oracle import Reference, smooth_relus_
from tests.tolerances import ROUND_TRIP_ABS, assert_rel_close

DATA = Path(__file__).parent / "data"
OFFICIAL = {  # preset -> (TSV of the official state_dict, parameter count of the official model)
    "df2k-4x": ("official_state_dict_SRFlow_DF2K_4X.tsv", 39_541_811),
    "df2k-8x": ("official_state_dict_SRFlow_DF2K_8X.tsv", 50_821_891),
    "celeba-8x": ("official_state_dict_SRFlow_CelebA_8X.tsv", 40_030_531),
}
# The official df2k-4x flow (3 levels, K=16, 54 steps, hidden 64, 320 conditioning channels) on a
# 4-block RRDB so that it runs on a CPU in about a second.
DEEP_4X = dataclasses.replace(srflow.get_preset("df2k-4x"), name="df2k-4x-nb4", nb=4, block_idxs=(0, 1, 2, 3))


# ---------------------------------------------------------------------------------------- helpers


def read_tsv(name: str) -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in (DATA / name).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("[]").split(",") if s.strip()), dtype))
    return rows


def image_pair(hr_size: int, scale: int, batch: int = 1, corner: tuple[int, int] = (160, 200)):
    """A crop of scikit-image's astronaut photo (uint8 / 255) and its area-downscaled LR."""
    skimage_data = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage_data.astronaut()).permute(2, 0, 1).float() / 255.0
    crops = []
    for b in range(batch):
        y, x = corner[0] + 24 * b, corner[1] + 16 * b
        crops.append(img[:, y : y + hr_size, x : x + hr_size])
    hr = torch.stack(crops).contiguous()
    return hr, F.avg_pool2d(hr, scale)


def random_pair(batch: int, lr_h: int, lr_w: int, scale: int):
    hr = torch.rand(batch, 3, lr_h * scale, lr_w * scale)
    return hr, F.avg_pool2d(hr, scale)


def init_batch(scale: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A "first training batch": four 48x48 astronaut crops (away from the test crops). With two,
    the ActNorm statistics of the 6x6 top level are noisy enough that some seeds give a 54-step
    flow whose inverse amplifies rounding to 1e-3."""
    return image_pair(48, scale, batch=4, corner=(300, 40))


@torch.no_grad()
def trained_srflow_(model: SRFlow, scale: float = 0.02) -> SRFlow:
    """Trained-like weights (helpers.trained_like_: ActNorms initialised from a first batch, then
    perturbed; last subnet/prior layers N(0, scale^2)), plus 1x1 convs moved off orthogonal by
    0.1 * randn / sqrt(C) (without the 1/sqrt(C), as in randomize_, the 96- and 192-channel
    weights come out near-singular).

    The last-layer std: randomize_'s 0.05 gives coupling scales down to ~1e-2 on 64-channel
    subnets, and over 54 steps the reverse of such a random flow amplifies float32 rounding past
    1e30 (the NaN problem itself); the deep tests use 0.01 and the tiny (12-step) ones 0.02."""
    for m in model.modules():
        if isinstance(m, fk.InvConv1x1):
            m.weight.add_(0.1 * torch.randn_like(m.weight) / math.sqrt(m.channels))
    return trained_like_(model, *init_batch(model.scale), last_scale=scale)


def tiny(scale: int = 4, **kwargs) -> SRFlow:
    kwargs.setdefault("backend", "reference")
    return SRFlow.from_preset(f"tiny-{scale}x", **kwargs)


def trained_tiny(scale: int = 4, **kwargs) -> SRFlow:
    return trained_srflow_(tiny(scale, **kwargs)).eval()


def actnorms(model: SRFlow) -> list[fk.ActNorm]:
    return [m for m in model.modules() if isinstance(m, fk.ActNorm)]


# ---------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = SRFlow.from_preset(name)
    tsv, expected = OFFICIAL[name]
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(math.prod(shape) for _, shape, _ in read_tsv(tsv)) == expected
    assert not list(model.buffers()), "the official state_dicts hold parameters only"


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_state_dict_layout(name: str) -> None:
    """Keys in the official order, with the official shapes and dtypes (strict loading)."""
    with torch.device("meta"):
        model = SRFlow.from_preset(name)
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == read_tsv(OFFICIAL[name][0])


@pytest.mark.parametrize(
    ("name", "features", "top"),
    [
        ("df2k-4x", ["fea_up2", "fea_up1", "fea_up0"], 96),
        ("df2k-8x", ["fea_up4", "fea_up2", "fea_up1", "fea_up0"], 192),
        ("tiny-4x", ["fea_up2", "fea_up1", "fea_up0"], 96),
        ("tiny-8x", ["fea_up4", "fea_up2", "fea_up1", "fea_up0"], 192),
    ],
)
def test_level_structure(name: str, features: list[str], top: int) -> None:
    """Per level: squeeze, 2 transitional steps, K coupling steps, split below L-1; level l is
    conditioned on the RRDB feature at its resolution; one FlowSequence per level over the very
    layer objects registered under ``layers``."""
    with torch.device("meta"):
        model = SRFlow.from_preset(name)
    net, preset = model.flowUpsamplerNet, model.preset
    assert net.features == features
    assert net.top_channels == top
    layers = list(net.layers)
    i = 0
    for lvl in net.levels:
        assert layers[i] is lvl.squeeze
        steps = list(lvl.sequence.steps)
        assert len(steps) == preset.n_transitional + preset.K
        assert all(a is b for a, b in zip(steps, layers[i + 1 : i + 1 + len(steps)]))
        assert all(s.affine is None for s in steps[: preset.n_transitional])
        for s in steps[preset.n_transitional :]:
            assert isinstance(s.affine, fk.CondAffineCoupling)
            assert s.affine.cond_channels == preset.cond_channels
        i += 1 + len(steps)
        if lvl.index < preset.L - 2:
            assert layers[i] is lvl.split
            i += 1
        else:
            assert lvl.split is None
    assert i == len(layers)


def test_conditioning_features_match_direct_computation() -> None:
    """The conditioning of tiny-8x (levels at 4x, 2x, 1x and 1/2 the LR size): fea_up1 = trunk +
    global residual; fea_up2 = lrelu(upconv1(nearest x2 of fea_up1)) and fea_up4 =
    lrelu(upconv2(nearest x2 of fea_up2)), AFTER the LeakyReLU (the official RRDB applies it in
    place, so the stored feature is the activated one, and the next upconv reads that same
    tensor); fea_up0 = 2x2 mean of fea_up1 (bilinear 1/2); each followed by the tapped blocks
    resized by nearest (pixel repetition up, even pixels down). The official behaviour itself is
    pinned by tests/test_srflow_official.py; this test names the parts."""
    model = tiny(8)
    rrdb = model.RRDB
    lr = torch.rand(2, 3, 6, 8)
    cond = model.condition(lr)

    def up(t: torch.Tensor, k: int) -> torch.Tensor:
        return t.repeat_interleave(k, 2).repeat_interleave(k, 3)

    with torch.no_grad():
        fea = rrdb.conv_first(lr)
        taps = []
        for i, block in enumerate(rrdb.RRDB_trunk):
            fea = block(fea)
            if i in model.preset.block_idxs:
                taps.append(fea)
        blocks = torch.cat(taps, 1)
        up1 = fea + rrdb.trunk_conv(fea)
        up2 = F.leaky_relu(rrdb.upconv1(up(up1, 2)), 0.2)
        up4 = F.leaky_relu(rrdb.upconv2(up(up2, 2)), 0.2)
        up0 = 0.25 * (up1[:, :, 0::2, 0::2] + up1[:, :, 1::2, 0::2] + up1[:, :, 0::2, 1::2] + up1[:, :, 1::2, 1::2])
        expected = [
            torch.cat([up4, up(blocks, 4)], 1),
            torch.cat([up2, up(blocks, 2)], 1),
            torch.cat([up1, blocks], 1),
            torch.cat([up0, blocks[:, :, 0::2, 0::2]], 1),
        ]
    assert [tuple(f.shape) for f in cond.features] == [(2, 96, 24, 32), (2, 96, 12, 16), (2, 96, 6, 8), (2, 96, 3, 4)]
    for got, want in zip(cond.features, expected):
        assert_rel_close(got, want, "forward")


# ---------------------------------------------------------------------------------------- round trips


@pytest.mark.slow
def test_round_trip_real_image_full_depth() -> None:
    """encode -> decode through the 54 steps of the official 4x flow, trained-like weights, a
    48x48 crop of astronaut: max |error| within ROUND_TRIP_ABS["sequence_54"] (its measured noise
    and failures are in tests/tolerances.py)."""
    hr, lr = image_pair(48, 4, batch=2)
    model = trained_srflow_(SRFlow.from_preset(DEEP_4X, backend="reference"), scale=0.01).eval()
    with torch.no_grad():
        zs = model.encode(hr, lr)
        sr = model.decode(lr, zs)
    assert [tuple(z.shape) for z in zs] == [(2, 6, 24, 24), (2, 96, 6, 6)]
    err = (sr - hr).abs().max().item()
    assert err <= ROUND_TRIP_ABS["sequence_54"], f"round-trip max error {err:.3e}"


@pytest.mark.parametrize("scale", [4, 8])
def test_round_trip_tiny(scale: int) -> None:
    hr, lr = image_pair(32, scale)
    model = trained_tiny(scale)
    with torch.no_grad():
        sr = model.decode(lr, model.encode(hr, lr))
    err = (sr - hr).abs().max().item()
    assert err <= ROUND_TRIP_ABS["sequence_54"], f"round-trip max error {err:.3e}"


# ---------------------------------------------------------------------------------------- gradients


def _grads(model: SRFlow, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_against_float64(model: SRFlow, loss: str, hr: torch.Tensor, lr: torch.Tensor) -> dict:
    """The mean ``loss`` ("nll" or "l1_loss") of ``model`` (memory saving on, subnets smoothed:
    tests/oracle.py) and every parameter gradient within the fp32 noise of float64
    stored-activation autograd (the same model on the reference backend with memory saving off,
    ``.double()``). Returns the memory-saving gradients by name."""
    smooth_relus_(model)
    plain = copy.deepcopy(model)
    plain.set_memory_saving(False)
    plain.set_backend("reference")
    loss64, g64 = _grads(copy.deepcopy(plain).double(), lambda m: getattr(m, loss)(hr.double(), lr.double()).mean())
    loss32, g32 = _grads(plain, lambda m: getattr(m, loss)(hr, lr).mean())
    loss_s, g_saving = _grads(model, lambda m: getattr(m, loss)(hr, lr).mean())
    assert g_saving.keys() == g64.keys()
    names = [n for n, g in g64.items() if g is not None]
    assert all(g_saving[n] is None and g32[n] is None for n in g64.keys() - set(names)), "a gradient without float64's"
    assert all(g_saving[n] is not None for n in names), "a parameter without its memory-saving gradient"
    reference = Reference(
        [loss64, *(g64[n] for n in names)], [loss32, *(g32[n] for n in names)], ["loss", *names], math.inf
    )
    reference.check([loss_s, *(g_saving[n] for n in names)], "memory saving")
    return g_saving


def _check_memory_saving_gradients(preset: srflow.SRFlowPreset, keep_every: int | None = None) -> None:
    hr, lr = image_pair(32, 4, batch=2)
    base = SRFlow.from_preset(preset, backend="reference", rrdb_trainable=True, keep_every=keep_every)
    trained_srflow_(base, scale=0.01).train()
    g_saving = _check_against_float64(base, "nll", hr, lr)
    rrdb = [g_saving[f"RRDB.{n}"] for n, _ in base.RRDB.named_parameters() if g_saving[f"RRDB.{n}"] is not None]
    assert len(rrdb) == len(base.rrdb_parameters()) and all(bool(g.abs().sum() > 0) for g in rrdb)


@pytest.mark.slow
def test_memory_saving_gradients_match_float64() -> None:
    """NLL gradients of every flow and RRDB parameter (RRDB trainable) through the memory-saving
    levels, against float64 stored-activation autograd (tests/oracle.py): the official 4x flow
    with K reduced to 4 (18 steps, 3 levels, one split), 32x32 crops."""
    _check_memory_saving_gradients(dataclasses.replace(DEEP_4X, K=4))


@pytest.mark.slow
def test_memory_saving_gradients_full_depth_keep_every() -> None:
    """The same through all 54 steps, keeping every 3rd step input (the drift bound of
    DESIGN.md section 3)."""
    _check_memory_saving_gradients(DEEP_4X, keep_every=3)


def test_l1_loss_gradients_through_reverse_flow_match_float64() -> None:
    """The temperature-0 L1 loss differentiates the reverse flow (memory-saving inverse units)."""
    hr, lr = image_pair(32, 4, batch=2)
    g_saving = _check_against_float64(trained_tiny(4, rrdb_trainable=True).train(), "l1_loss", hr, lr)
    assert g_saving["RRDB.conv_first.weight"] is not None


def test_frozen_rrdb_gets_no_gradient() -> None:
    hr, lr = random_pair(2, 4, 4, 4)
    model = trained_tiny(4)
    assert not model.rrdb_trainable
    model.nll(hr, lr).mean().backward()
    assert all(p.grad is None for p in model.RRDB.parameters())
    assert model.flowUpsamplerNet.layers[3].affine.fAffine[0].weight.grad is not None


def test_rrdb_trainable_switch_and_unused_parameters() -> None:
    model = tiny(8)
    unused = {"RRDB.upconv3.weight", "RRDB.HRconv.bias", "RRDB.conv_last.weight", "flowUpsamplerNet.f.0.weight"}
    model.set_rrdb_trainable(True)
    assert model.rrdb_trainable
    params = dict(model.named_parameters())
    assert not any(params[n].requires_grad for n in unused)
    assert params["RRDB.upconv2.weight"].requires_grad and params["RRDB.RRDB_trunk.1.RDB3.conv5.bias"].requires_grad
    model.set_rrdb_trainable(False)
    assert not any(p.requires_grad for p in model.RRDB.parameters())


# ---------------------------------------------------------------------------------------- NLL


@pytest.mark.slow
def test_nll_matches_brute_force_jacobian() -> None:
    """nll = -(log|det d(eps, z_top)/d hr| + log N(eps, z_top; 0, I)) / (ln 2 * H * W): the
    change-of-variables formula in the latents encode returns, with a float64 slogdet of the
    full autograd Jacobian (8x8 HR: 192 dimensions)."""
    model = trained_tiny(4, memory_saving=False)
    hr, lr = random_pair(1, 2, 2, 4)
    hr = hr.clamp(0.05, 0.95)
    with torch.no_grad():
        cond = model.condition(lr)
        zs, nll = model.encode(hr, cond=cond, return_nll=True)

    def flat_latents(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten() for z in model.encode(x, cond=cond)])

    jac = torch.autograd.functional.jacobian(flat_latents, hr).reshape(192, 192)
    logabsdet = torch.linalg.slogdet(jac.double())[1]
    z = torch.cat([z.flatten() for z in zs]).double()
    log_p = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum()
    expected = -(logabsdet + log_p) / (math.log(2) * 64)
    assert_rel_close(nll.double(), expected.reshape(1), "logdet_jacobian")


def test_nll_noise_offset_is_exactly_5_bits() -> None:
    """With noise, the NLL is that of the noisy image plus log2(32) = 5 bits per pixel."""
    model = trained_tiny(4)
    hr, lr = image_pair(32, 4, batch=2)
    hr = 0.02 + 0.96 * hr  # keeps hr + U(-1/64, 1/64) inside [0, 1]
    with torch.no_grad():
        noisy_nll = model.nll(hr, lr, add_noise=True, generator=torch.Generator().manual_seed(3))
        noisy_hr = srflow.dequantize(hr, torch.Generator().manual_seed(3))
        plain_nll = model.nll(noisy_hr, lr)
        clean_nll = model.nll(hr, lr)
    assert torch.allclose(noisy_nll - plain_nll, torch.full_like(plain_nll, math.log2(32)), atol=1e-4, rtol=0)
    assert not torch.allclose(noisy_nll, clean_nll + 5)  # the noise itself changes the density
    assert (noisy_hr - hr).abs().max() <= 1 / 64 and (noisy_hr - hr).abs().max() > 1 / 128


def test_nll_and_encode_agree_and_conditioning_reuse() -> None:
    model = trained_tiny(4)
    hr, lr = random_pair(2, 4, 6, 4)
    with torch.no_grad():
        cond = model.condition(lr)
        zs, nll = model.encode(hr, lr, return_nll=True)
        assert torch.equal(model.nll(hr, cond=cond), nll)
        assert torch.equal(model(hr, lr), nll)
        for a, b in zip(model.encode(hr, cond=cond), zs):
            assert torch.equal(a, b)
        assert torch.equal(model.sample(lr, 0.7, seed=1), model.sample(cond=cond, temperature=0.7, seed=1))


# ---------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    ("scale", "shapes"),
    [
        (4, [(2, 6, 16, 16), (2, 96, 4, 4)]),  # 32x32 HR, LR 8x8: top (B, 96, h/2, w/2)
        (8, [(2, 6, 16, 16), (2, 12, 8, 8), (2, 192, 2, 2)]),  # LR 4x4: top (B, 192, h/2, w/2)
    ],
)
def test_latent_shapes(scale: int, shapes: list[tuple]) -> None:
    model = trained_tiny(scale)
    hr, lr = random_pair(2, 32 // scale, 32 // scale, scale)
    with torch.no_grad():
        zs = model.encode(hr, lr)
    assert [tuple(z.shape) for z in zs] == shapes
    assert model.latent_shapes(2, 32 // scale, 32 // scale) == shapes


@pytest.mark.parametrize("scale", [4, 8])
def test_temperature_zero_is_deterministic(scale: int) -> None:
    model = trained_tiny(scale)
    _, lr = random_pair(2, 32 // scale, 32 // scale, scale)
    a = model.sample(lr, 0.0, seed=1)
    b = model.sample(lr, 0.0, seed=2)
    c = model.sample(lr, temperature=0)
    zeros = [torch.zeros(s) for s in model.latent_shapes(2, *lr.shape[2:])]
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(a, model.decode(lr, zeros))
    assert a.shape == (2, 3, 32, 32) and bool(torch.isfinite(a).all())


@pytest.mark.parametrize("scale", [4, 8])
def test_seeds_reproduce_and_differ(scale: int) -> None:
    model = trained_tiny(scale)
    _, lr = random_pair(1, 32 // scale, 32 // scale, scale)
    a, b, c = model.sample(lr, 0.9, seed=7), model.sample(lr, 0.9, seed=7), model.sample(lr, 0.9, seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [4, 8])
def test_sample_draws_tau_scaled_normal_latents(scale: int) -> None:
    """sample(tau, generator) = decode(tau * N(0, I) latents), drawn top first then the splits
    from the deepest level up, from the same generator."""
    model = trained_tiny(scale)
    _, lr = random_pair(2, 32 // scale, 32 // scale, scale)
    tau = 0.6
    sr = model.sample(lr, tau, generator=torch.Generator().manual_seed(11))
    gen = torch.Generator().manual_seed(11)
    shapes = model.latent_shapes(2, *lr.shape[2:])
    draws = [torch.randn(s, generator=gen) for s in reversed(shapes)]
    zs = [tau * z for z in reversed(draws)]
    assert torch.equal(sr, model.decode(lr, zs))


def test_odd_lr_is_reflect_padded_and_cropped() -> None:
    model = trained_tiny(4)
    lr = torch.rand(2, 3, 7, 9)
    sr = model.sample(lr, 0.8, seed=4)
    assert sr.shape == (2, 3, 28, 36)
    padded = F.pad(lr, (0, 1, 0, 1), mode="reflect")
    assert torch.equal(sr, model.sample(padded, 0.8, seed=4)[:, :, :28, :36])
    assert model.latent_shapes(2, 7, 9) == model.latent_shapes(2, 8, 10)
    with pytest.raises(ValueError, match="even LR"):
        model.nll(torch.rand(2, 3, 28, 36), lr)


# ---------------------------------------------------------------------------------------- NaN remedy


@torch.no_grad()
def _tiny_scales_(model: SRFlow) -> SRFlow:
    """Couplings whose scales sit at the 1e-4 floor: the forward contracts by 1e4 per stage, so
    the reverse of a typical latent amplifies by 1e4 per stage and overflows float32."""
    for c in model.flowUpsamplerNet.couplings():
        for net in (c.fAffine, c.fFeatures):
            net[4].bias[1::2] = -30.0
    return model


def test_overflowing_reverse_pass_is_reported_and_min_scale_fixes_it() -> None:
    model = _tiny_scales_(trained_tiny(4))
    _, lr = random_pair(2, 8, 8, 4)
    with pytest.warns(srflow.NonFiniteSampleWarning, match=r"(\d+\.\d+)% of the output pixels.*min_scale") as rec:
        sr = model.sample(lr, 0.9, seed=0)
    reported = float(str(rec[0].message).split("overflowed: ")[1].split("%")[0]) / 100
    nan_fraction = (~torch.isfinite(sr).all(dim=1)).float().mean().item()
    assert nan_fraction > 0 and abs(reported - nan_fraction) < 1e-4
    with pytest.raises(ValueError, match="min_scale"):
        model.sample(lr, 0.9, seed=0, nonfinite="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fixed = model.sample(lr, 0.9, seed=0, min_scale=0.5)
    assert bool(torch.isfinite(fixed).all())
    assert all(c.inverse_scale_floor is None for c in model.flowUpsamplerNet.couplings())


def test_min_scale_below_every_scale_changes_nothing() -> None:
    """The floor only acts where a scale is below it: on an in-distribution image a floor of 1e-3
    leaves the exact inverse untouched."""
    model = trained_tiny(4)
    hr, lr = image_pair(32, 4)
    with torch.no_grad():
        zs = model.encode(hr, lr)
    assert torch.equal(model.decode(lr, zs, min_scale=1e-3), model.decode(lr, zs))
    with pytest.raises(ValueError, match="min_scale"):
        model.decode(lr, zs, min_scale=0.0)


# ---------------------------------------------------------------------------------------- ActNorm init


def test_actnorms_initialise_explicitly_from_first_training_batch() -> None:
    model = tiny(4).train()
    hr, lr = random_pair(2, 8, 8, 4)
    assert not any(a.initialized for a in actnorms(model))
    with pytest.raises(RuntimeError, match=r"has not been initialised.*initialize_"):
        model.nll(hr, lr)  # training forward never initialises
    assert not any(a.initialized for a in actnorms(model))
    assert model.initialize_actnorms(hr, lr) == len(actnorms(model))
    assert all(a.initialized for a in actnorms(model))
    model.nll(hr, lr).mean().backward()
    first = model.flowUpsamplerNet.levels[0].sequence.steps[0].actnorm
    x = F.pixel_unshuffle(hr, 2)
    assert_rel_close(first.bias.detach().flatten(), -x.mean(dim=(0, 2, 3)), "forward")
    before = copy.deepcopy(model.state_dict())
    assert model.initialize_actnorms(hr * 0.5, lr * 0.5) == 0  # already initialised: no-op
    model.nll(hr, lr)  # training forward: no re-initialisation
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_actnorms_do_not_initialise_in_eval() -> None:
    model = tiny(4).eval()
    hr, lr = random_pair(2, 8, 8, 4)
    model.nll(hr, lr)
    model.sample(lr, 0.5, seed=0)
    assert not any(a.initialized for a in actnorms(model))
    assert all(not a.bias.any() and not a.logs.any() for a in actnorms(model))


@pytest.mark.parametrize("how", ["load_state_dict", "from_official"])
def test_loading_a_checkpoint_disables_actnorm_init(how: str) -> None:
    source = trained_tiny(4)
    fresh = tiny(4)
    if how == "load_state_dict":
        fresh.load_state_dict(source.state_dict())
    else:
        fresh = SRFlow.from_official(source.state_dict(), "tiny-4x", backend="reference")
    assert all(a.initialized for a in actnorms(fresh))
    hr, lr = random_pair(2, 8, 8, 4)
    assert fresh.train().initialize_actnorms(hr, lr) == 0
    fresh.nll(hr, lr)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), source.state_dict().values()))


def test_train_eval_and_copies_reach_the_level_sequences() -> None:
    model = tiny(4)
    model.eval()
    assert not any(lvl.sequence.training for lvl in model.flowUpsamplerNet.levels)
    model.train()
    assert all(lvl.sequence.training for lvl in model.flowUpsamplerNet.levels)
    clone = copy.deepcopy(model)
    for lvl in clone.flowUpsamplerNet.levels:
        assert all(any(s is layer for layer in clone.flowUpsamplerNet.layers) for s in lvl.sequence.steps)
    model.set_memory_saving(False, keep_every=None)
    assert not model.memory_saving and clone.memory_saving


# ---------------------------------------------------------------------------------------- backends


def test_backend_and_memory_saving_reach_every_step() -> None:
    model = SRFlow.from_preset("tiny-8x", memory_saving=False, backend="reference")
    steps = [m for m in model.modules() if isinstance(m, fk.FlowStep)]
    assert len(steps) == 4 * 4 and all(s.backend == "reference" for s in steps)
    assert all(s.affine.backend == "reference" for s in steps if s.affine is not None)
    assert not any(lvl.sequence.memory_saving for lvl in model.flowUpsamplerNet.levels)
    model.set_backend("auto")
    assert all(s.backend == "auto" for s in steps)
    with pytest.raises(ValueError, match="backend"):
        SRFlow.from_preset("tiny-4x", backend="fast")


@pytest.mark.parametrize("scale", [4, 8])
def test_auto_backend_matches_float64(scale: int) -> None:
    """backend="auto" (the C++ kernels on a CPU): NLL and memory-saving gradients within the fp32
    noise of float64 stored-activation autograd, and the round trip. Skipped where
    flowkernels._C cannot run: auto would be the reference itself."""
    kernel_backend("cuda", "cpu")
    auto = trained_tiny(scale, rrdb_trainable=True).train()
    auto.set_backend("auto")
    hr, lr = image_pair(32, scale, batch=2)
    _check_against_float64(auto, "nll", hr, lr)
    with torch.no_grad():
        sr = auto.decode(lr, auto.encode(hr, lr))
    assert (sr - hr).abs().max() <= ROUND_TRIP_ABS["sequence_54"]


# ---------------------------------------------------------------------------------------- checkpoints


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_from_official_round_trip_through_a_file(tmp_path: Path) -> None:
    source = trained_tiny(4)
    path = tmp_path / "SRFlow_tiny.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # DataParallel prefix
    digest, mtime = _sha(path), os.stat(path).st_mtime_ns
    model = SRFlow.from_official(path, "tiny-4x", backend="reference").eval()
    assert _sha(path) == digest and os.stat(path).st_mtime_ns == mtime
    assert model.state_dict().keys() == source.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    _, lr = random_pair(1, 8, 8, 4)
    assert torch.equal(model.sample(lr, 0.8, seed=3), source.sample(lr, 0.8, seed=3))


def test_from_official_safetensors(tmp_path: Path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    source = trained_tiny(8)
    path = tmp_path / "model.safetensors"
    # safetensors refuses non-contiguous tensors: every state_dict tensor must be contiguous
    safetensors_torch.save_file(source.state_dict(), str(path))
    model = SRFlow.from_official(path, "tiny-8x")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_from_official_loads_the_official_df2k_4x_layout() -> None:
    """A state_dict with exactly the official keys and shapes (from the TSV) loads strictly."""
    state = {k: torch.full(shape, 0.01) for k, shape, _ in read_tsv(OFFICIAL["df2k-4x"][0])}
    model = SRFlow.from_official(state, "df2k-4x", backend="reference")
    assert torch.equal(model.flowUpsamplerNet.f[0].bias, torch.full((96,), 0.01))
    assert all(a.initialized for a in actnorms(model))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ("missing", r"1 missing keys: flowUpsamplerNet\.layers\.5\.conv\.logs"),
        ("unexpected", r"1 unexpected keys: flowUpsamplerNet\.extra\.weight"),
        ("shape", r"RRDB\.conv_first\.weight: checkpoint \(64, 3, 3, 3\) vs model \(32, 3, 3, 3\)"),
        ("not_a_tensor", r"not str -> Tensor"),
    ],
)
def test_from_official_mismatch_errors_name_the_keys(tmp_path: Path, edit: str, match: str) -> None:
    state = tiny(4).state_dict()
    if edit == "missing":
        del state["flowUpsamplerNet.layers.5.conv.logs"]
    elif edit == "unexpected":
        state["flowUpsamplerNet.extra.weight"] = torch.zeros(3)
    elif edit == "shape":
        state["RRDB.conv_first.weight"] = torch.zeros(64, 3, 3, 3)
    else:
        state["RRDB.conv_first.weight"] = [1.0]
    with pytest.raises(srflow.CheckpointError, match=match):
        SRFlow.from_official(state, "tiny-4x")
    if edit != "not_a_tensor":
        path = tmp_path / "bad.pth"
        torch.save(state, path)
        digest = _sha(path)
        with pytest.raises(srflow.CheckpointError, match=match):
            SRFlow.from_official(path, "tiny-4x")
        assert _sha(path) == digest


def test_from_official_unreadable_files(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    digest = _sha(corrupt)
    with pytest.raises(srflow.CheckpointError, match="corrupt.pth.*could not be read"):
        SRFlow.from_official(corrupt, "tiny-4x")
    assert _sha(corrupt) == digest
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        SRFlow.from_official(tmp_path / "missing.pth", "tiny-4x")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(srflow.CheckpointError, match="expected a state_dict"):
        SRFlow.from_official(listed, "tiny-4x")
    with pytest.raises(ValueError, match="unknown name"):
        SRFlow.from_official(tiny(4).state_dict(), "df2k-2x")


# ---------------------------------------------------------------------------------------- inputs


def _bad_inputs() -> list:
    hr, lr = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 8, 8)
    nan_lr = lr.clone()
    nan_lr[0, 1, 2, 3] = float("nan")
    inf_hr = hr.clone()
    inf_hr[1, 0, 0, 0] = float("inf")
    return [
        pytest.param(
            hr, torch.rand(2, 3, 16, 16), ValueError, r"expected size 64x64 \(scale 4 x LR 16x16\)", id="ratio"
        ),
        pytest.param(hr[:, :, :30, :30], lr, ValueError, "expected size 32x32", id="hr-size"),
        pytest.param(torch.rand(2, 3, 36, 36), torch.rand(2, 3, 9, 9), ValueError, "even LR", id="odd-lr"),
        pytest.param(hr, lr[:, :1], ValueError, "lr: expected 3 .RGB. channels, got 1", id="gray-lr"),
        pytest.param(torch.rand(2, 4, 32, 32), lr, ValueError, "hr: expected 3 .RGB. channels, got 4", id="rgba-hr"),
        pytest.param(hr.double(), lr, TypeError, "hr: expected torch.float32.*float64", id="float64"),
        pytest.param(hr, (lr * 255).to(torch.uint8), TypeError, "divide uint8 images by 255", id="uint8"),
        pytest.param(hr * 255, lr, ValueError, r"hr: expected values in \[0, 1\], got min", id="range-255"),
        pytest.param(hr, lr - 0.5, ValueError, r"lr: expected values in \[0, 1\]", id="negative"),
        pytest.param(hr, nan_lr, ValueError, "lr: contains 1 non-finite", id="nan"),
        pytest.param(inf_hr, lr, ValueError, "hr: contains 1 non-finite", id="inf"),
        pytest.param(hr[0], lr, ValueError, "hr: expected a 4-D", id="3d"),
        pytest.param(hr[:1], lr, ValueError, "hr: batch 1 does not match the LR batch 2", id="batch"),
        pytest.param(hr.numpy(), lr, TypeError, "hr: expected a torch.Tensor", id="numpy"),
    ]


@pytest.mark.parametrize(("hr", "lr", "exc", "match"), _bad_inputs())
def test_bad_inputs_to_nll(hr, lr, exc: type, match: str) -> None:
    model = tiny(4)
    with pytest.raises(exc, match=match):
        model.nll(hr, lr)


def test_bad_arguments_to_sampling() -> None:
    model = tiny(4)
    lr = torch.rand(1, 3, 8, 8)
    good = [torch.zeros(s) for s in model.latent_shapes(1, 8, 8)]
    cases = [
        (lambda: model.sample(lr, -0.1), ValueError, "temperature"),
        (lambda: model.sample(lr, float("nan")), ValueError, "temperature"),
        (lambda: model.sample(lr, 0.5, seed=1, generator=torch.Generator()), ValueError, "seed and generator"),
        (lambda: model.sample(), ValueError, "exactly one of lr"),
        (lambda: model.sample(lr, cond=model.condition(lr)), ValueError, "exactly one of lr"),
        (lambda: model.sample(cond=lr), TypeError, "Conditioning"),
        (lambda: model.sample(lr, nonfinite="drop"), ValueError, "nonfinite"),
        (lambda: model.decode(lr, good[:1]), ValueError, r"expected 2 latents"),
        (lambda: model.decode(lr, [good[0], torch.zeros(1, 96, 2, 2)]), ValueError, r"zs\[1\]: expected shape"),
        (lambda: model.decode(lr, [good[0], good[1].double()]), TypeError, r"zs\[1\]: expected torch.float32"),
        (lambda: model.decode(lr, [good[0] + float("inf"), good[1]]), ValueError, r"zs\[0\]: contains"),
        (lambda: model.decode(torch.rand(1, 3, 1, 1), good), ValueError, "at least 2 pixels"),
    ]
    for call, exc, match in cases:
        with pytest.raises(exc, match=match):
            call()


def test_preset_validation() -> None:
    with pytest.raises(ValueError, match="scale"):
        srflow.SRFlowPreset("x", scale=3, nb=2, block_idxs=(0,))
    with pytest.raises(ValueError, match="block_idxs"):
        srflow.SRFlowPreset("x", scale=4, nb=2, block_idxs=(0, 5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        srflow.PRESETS["df2k-4x"].K = 4  # type: ignore[misc]
    assert srflow.PRESETS["df2k-4x"].cond_channels == 320 and srflow.PRESETS["df2k-8x"].L == 4
