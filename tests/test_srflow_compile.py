"""SRFlow without host-bound steps (issue 17): the training step and sampling trace whole
(``torch.compile(fullgraph=True)``: no graph break, no host sync), do not recompile between steps
of the same shape, and equal eager ones over several optimizer steps; the eager step's dispatched
op count is bounded; level batching's transient memory stays within the conditioning tensor at
any depth under the defaults.

Most compile tests run Dynamo + AOTAutograd (``aot_eager``: the graphs are traced, forward and
the memory-saving backward, and run with eager kernels), which is what "one graph" depends on;
two run Inductor's CPU code generation end to end. CUDA graph capture (``reduce-overhead``)
runs under the ``gpu`` marker.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import flowkernels as fk
import srflow
from benchmarks.bench_host import HOST_SYNC_OPS, count_ops, host_syncs
from flowkernels.layers._cond_parts import plan_chunks
from srflow.train import cudagraph_fallbacks
from tests.helpers import cuda_syncs_raise, trained_level
from tests.kernel_grid import kernel_backend
from tests.oracle import smooth_relus_
from tests.tolerances import BF16_ERROR_RATIO, FP32_NOISE_FLOOR, FP32_PATH_RATIO, rel_err

LR = 1e-3
MAX_STEP_OPS = 7_500  # issue 17's bound on the eager ops of a df2k-4x training step


def _model(scale: int, backend: str, rrdb_trainable: bool, batching: bool | None, device: str = "cpu"):
    fk.check_backend_available(backend, device)  # loads the backend: tracing cannot import it
    model = srflow.SRFlow.from_preset(f"tiny-{scale}x", backend=backend, rrdb_trainable=rrdb_trainable, seed=0)
    model = model.to(device)
    model.set_cond_batching(batching)
    hr = torch.rand(2, 3, 32, 32, device=device)
    lr = F.avg_pool2d(hr, scale)
    model.initialize_actnorms(hr, lr)
    # Away from initialisation: there, some gradients are exactly zero (an ActNorm's bias right
    # after its data-dependent init, layers behind a zero-initialised one), and the relative
    # error of a zero is rounding noise.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen).to(p.device))
    model.check_inputs = False
    return model.train(), hr, lr


def _capture(graphs: list, inner: str = "aot_eager"):
    """A compile backend that records each graph Dynamo hands it (one per compilation)."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return lookup_backend(inner)(gm, example_inputs)

    return backend


def _train(
    model,
    hr,
    lr,
    loss_fn,
    steps: int,
    bf16: bool,
    optimizer: type = torch.optim.SGD,
    capture_after: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``steps`` optimizer steps on the same batch: the losses and each parameter's total update.
    SGD by default: its update is the gradient itself, so the updates compare the steps' gradients
    (Adam divides by the root of the squared gradients, which turns a 1e-8 difference of a
    near-zero gradient into an update difference of lr). ``capture_after``: that many eager steps,
    then the step captured as one CUDA graph (bench_srflow's ``captured``) and replayed for the
    rest; the losses are then the replays' only."""
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optimizer([p for p in model.parameters() if p.requires_grad], lr=LR)
    # a capture must not reuse casts made before it: no autocast cache there
    cache = None if capture_after is None else False

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(hr.device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=cache):
            loss = loss_fn(hr, lr)
        loss.backward()
        opt.step()
        return loss

    if capture_after is not None:
        from benchmarks.bench_srflow import captured  # noqa: PLC0415

        step, steps = captured(step, capture_after), steps - capture_after
    # copies: a CUDA graph's loss (reduce-overhead's or a capture's) is overwritten by the next replay
    losses = [step().detach().clone() for _ in range(steps)]
    updates = {n: p.detach() - start[n] for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack(losses), updates


def _assert_as_accurate_as_eager(
    model, hr, lr, compile_args: dict, bf16: bool, steps: int = 3, optimizer: type = torch.optim.SGD
) -> None:
    """Compiled training steps judged like every fp32 path (tests/tolerances.py): against float64
    eager, their losses and parameter updates err at most FP32_PATH_RATIO x eager fp32's
    (BF16_ERROR_RATIO x eager bf16's under autocast), each parameter's update against its own
    error (some gradients are sums that cancel to 1e-3 of their terms). The oracle: float64 stored-activation
    autograd on the reference ops. Updates are compared under SGD only."""
    compiled = torch.compile(lambda hr, lr: model.nll(hr, lr).mean(), **compile_args)
    _judge_training(
        model, hr, lr, lambda: _train(model, hr, lr, compiled, steps, bf16, optimizer), bf16, steps, optimizer
    )


def _judge_training(model, hr, lr, train_got, bf16: bool, steps: int, optimizer: type) -> None:
    """:func:`_assert_as_accurate_as_eager`'s verdict on ``train_got()`` (losses, updates) of
    ``model``, which it runs first: copies of the model are the eager path and the oracle. Where
    it returns fewer losses than ``steps``, they are the last ones."""
    eager, oracle = copy.deepcopy(model), copy.deepcopy(model).double()
    oracle.set_backend("reference")
    oracle.set_memory_saving(False)
    got_losses, got = train_got()
    eager_losses, eager_updates = _train(eager, hr, lr, lambda hr, lr: eager.nll(hr, lr).mean(), steps, bf16, optimizer)
    oracle_fn = lambda hr, lr: oracle.nll(hr, lr).mean()  # noqa: E731
    want_losses, want = _train(oracle, hr.double(), lr.double(), oracle_fn, steps, False, optimizer)
    eager_losses, want_losses = eager_losses[-len(got_losses) :], want_losses[-len(got_losses) :]
    ratio = BF16_ERROR_RATIO if bf16 else FP32_PATH_RATIO
    loss_bound = ratio * max(rel_err(eager_losses, want_losses), FP32_NOISE_FLOOR)
    assert rel_err(got_losses, want_losses) <= loss_bound
    if optimizer is torch.optim.SGD:
        for name in want:
            bound = ratio * max(rel_err(eager_updates[name], want[name]), FP32_NOISE_FLOOR)
            err = rel_err(got[name], want[name])
            assert err <= bound, f"{name}: {err:.2e} from float64, bound {bound:.2e}"


# Three cases cover the axes (each compiles for ~10 s on a 2-core CPU): the reference ops with
# the RRDB trained, the C++ ops with level batching, and the C++ ops per step under bf16 autocast.
TRAINING_CASES = [
    ("reference", True, False, False),
    ("cuda", False, True, False),
    ("cuda", False, False, True),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,rrdb_trainable,batching,bf16",
    TRAINING_CASES,
    ids=["reference-rrdb-trainable", "cuda-batched", "cuda-per-step-bf16"],
)
def test_training_step_is_one_graph_and_as_accurate_as_eager(
    backend: str, rrdb_trainable: bool, batching: bool, bf16: bool
):
    """RRDB forward, every flow level with its memory-saving backward, split priors and the loss:
    one graph (fullgraph), compiled once over three SGD steps, as accurate as eager (compiled and
    eager differ in the order of the backward's sums, not in their maths). The subnets' ReLUs are
    smoothed (tests/oracle.py): a 1e-7 difference at a kink flips a ReLU's gradient, which is not
    what this compares."""
    if backend != "reference":
        kernel_backend(backend, "cpu")
    model, hr, lr = _model(4, backend, rrdb_trainable, batching)
    smooth_relus_(model)
    graphs: list = []
    _assert_as_accurate_as_eager(model, hr, lr, dict(fullgraph=True, backend=_capture(graphs)), bf16)
    assert len(graphs) == 1, f"{len(graphs)} compilations over 3 steps"


@pytest.mark.slow
def test_training_step_and_sampling_compile_once_with_dynamic_sizes():
    """Compiled with ``dynamic=True``, the training step and sampling serve three image sizes with
    one graph each: nothing in them may specialise on a size (hashing a pixel count once made
    every size a new graph of the step; a factor traced as a symbolic float failed the trace).
    The default, automatic dynamic, compiles this same dynamic graph at the second size, after
    the static one of the other tests. Per step conditioning (the CPU default)."""
    kernel_backend("cuda", "cpu")
    model, _, _ = _model(4, "cuda", False, None)
    graphs: list = []
    compile_args = dict(fullgraph=True, dynamic=True, backend=_capture(graphs, "eager"))
    step = torch.compile(lambda hr, lr: model.nll(hr, lr).mean(), **compile_args)
    for size in (32, 48, 64):
        hr = torch.rand(2, 3, size, size)
        step(hr, F.avg_pool2d(hr, 4)).backward()
    assert len(graphs) == 1, f"training step: {len(graphs)} compilations for 3 image sizes"
    graphs.clear()
    sample = torch.compile(lambda lr: model.sample(lr, temperature=0.9, nonfinite="ignore"), **compile_args)
    with torch.no_grad():
        for size in (8, 12, 16):
            sample(torch.rand(2, 3, size, size))
    assert len(graphs) == 1, f"sampling: {len(graphs)} compilations for 3 image sizes"


@pytest.mark.slow
@pytest.mark.parametrize("scale", [8])  # 3 levels (4x: 2, the same code with one level fewer)
def test_sampling_and_encoding_are_one_graph_each(scale: int):
    """``sample`` (torch's global RNG: Dynamo cannot trace a Generator), ``decode`` and ``encode``
    trace whole, are as accurate as eager (float64 oracle) and do not recompile for new draws; no host sync inside
    (the overflow report is the caller's, outside)."""
    model, hr, lr = _model(scale, "auto", False, None)
    model.eval()
    graphs: list = []
    gen_args = dict(fullgraph=True, backend=_capture(graphs))
    sample = torch.compile(lambda lr: model.sample(lr, temperature=0.9, nonfinite="ignore"), **gen_args)
    encode = torch.compile(lambda hr, lr: model.encode(hr, lr), **gen_args)
    decode = torch.compile(lambda lr, zs: model.decode(lr, zs, nonfinite="ignore"), **gen_args)
    oracle = copy.deepcopy(model).double()
    oracle.set_backend("reference")
    with torch.no_grad():
        torch.manual_seed(1)
        got = sample(lr)
        torch.manual_seed(1)
        eager = model.sample(lr, temperature=0.9)
        torch.manual_seed(1)  # sample's draws (tests/test_srflow_model.py), decoded in float64
        draws = [torch.randn(s) for s in reversed(model.latent_shapes(*lr.shape[:1], *lr.shape[2:]))]
        want = oracle.decode(lr.double(), [0.9 * z.double() for z in reversed(draws)])
        zs = encode(hr, lr)
        sr = decode(lr, zs)
        assert len(graphs) == 3, f"{len(graphs)} graphs for sample, encode and decode"
        assert rel_err(got, want) <= FP32_PATH_RATIO * max(rel_err(eager, want), FP32_NOISE_FLOOR)
        eager_round_trip = rel_err(model.decode(lr, model.encode(hr, lr)), hr)
        assert rel_err(sr, hr) <= FP32_PATH_RATIO * max(eager_round_trip, FP32_NOISE_FLOOR)
        assert not torch.equal(sample(lr), got)  # new draws, no recompilation
    assert len(graphs) == 3


@pytest.mark.slow
def test_inductor_compiles_the_training_step():
    """Inductor's CPU code generation end to end (the one test that compiles to C++): the compiled
    loss and gradients as accurate as eager's."""
    model, hr, lr = _model(4, "auto", False, None)
    smooth_relus_(model)
    _assert_as_accurate_as_eager(model, hr, lr, dict(fullgraph=True), False, steps=1)


@pytest.mark.slow
def test_eager_training_step_op_count_is_bounded():
    """One df2k-4x training step (NLL forward + backward, RRDB frozen, B1, 16x16 HR: compute
    negligible, so every op is a launch to pay for on a GPU) on the C++ kernels under the
    defaults dispatches at most MAX_STEP_OPS ops (bench_host, 2026-12-07: 5,480; the official maths 13,793;
    before issue 17, 15,051)."""
    kernel_backend("cuda", "cpu")
    model = srflow.SRFlow.from_preset("df2k-4x", backend="cuda", seed=0)
    hr = torch.rand(1, 3, 16, 16)
    lr = F.avg_pool2d(hr, 4)
    model.initialize_actnorms(hr, lr)
    model.check_inputs = False
    model.train().nll(hr, lr).mean().backward()
    model.zero_grad(set_to_none=True)
    count = sum(count_ops(lambda: model.nll(hr, lr).mean().backward()).values())
    assert count <= MAX_STEP_OPS, f"{count} ops per training step"


@pytest.mark.parametrize("batching", [False, True], ids=["per-step", "batched"])
def test_eager_step_and_sampling_do_not_wait_for_the_device(batching: bool):
    """An eager training step and a sampling call (no non-finite report: the one read-back
    ``sample`` makes by design, after the flow) dispatch no op that would make the host wait for
    a GPU, so the host can queue the next step while the device runs this one. Counted on the
    CPU (bench_host.HOST_SYNC_OPS), where the layers run the same code but for the float64
    inverses of the 1x1 weights (CUDA: ``inv_ex``/``slogdet``; checked on a GPU by
    :func:`test_eager_step_and_sampling_do_not_sync_on_cuda`)."""
    model, hr, lr = _model(4, "cuda", False, batching)
    model.nll(hr, lr).mean().backward()
    step = count_ops(lambda: model.nll(hr, lr).mean().backward())
    with torch.no_grad():
        sample = count_ops(lambda: model.sample(lr, temperature=0.9, nonfinite="ignore"))
    assert step["aten.convolution"] > 0 and sample["aten.convolution"] > 0  # the counts saw the calls
    assert host_syncs(step) == 0, {op: n for op, n in step.items() if op in HOST_SYNC_OPS}
    assert host_syncs(sample) == 0, {op: n for op, n in sample.items() if op in HOST_SYNC_OPS}


@pytest.mark.parametrize("depth", [8, 64])
def test_default_chunks_keep_the_parts_within_the_conditioning(depth: int):
    """Level batching's default chunk budget is the conditioning tensor's own size: at any depth
    the parts of a chunk (and their gradients in backward) are at most that, so the memory the
    batching adds does not grow with depth. (80 cond channels, 32 parts channels per step: two
    steps a chunk.)"""
    x, cond = torch.randn(4, 12, 24, 24), torch.randn(4, 80, 24, 24)
    seq = trained_level(depth, 12, 80, x, cond)
    seq.set_cond_batching(True)
    projections = [step.cond_projections() for step in seq.steps]
    chunks = plan_chunks(projections, cond, seq._chunk_bytes(x, cond))
    per_output = 4 * 24 * 24 * 4
    parts = [sum(p.weight.shape[0] for p in chunk.projections) * per_output for chunk in chunks]
    assert max(parts) <= cond.numel() * cond.element_size()
    assert len(chunks) <= depth // 2 + 1  # batched: not one step a chunk
    assert sum(c.stop - c.start for c in chunks) == depth


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_level_batching_default_is_by_device(device: str):
    """Per step on a CPU (batching measured no faster there, 0.99x), batched on CUDA."""
    x, cond = torch.randn(2, 12, 6, 6, device=device), torch.randn(2, 16, 6, 6, device=device)
    seq = fk.FlowSequence([fk.FlowStep(12, fk.CondAffineCoupling(12, 16, 8)) for _ in range(3)], cond_batching=None).to(
        device
    )
    assert (seq._chunk_bytes(x, cond) is not None) == (device == "cuda")


@pytest.mark.slow
def test_cudagraph_fallbacks_counts_a_graph_inductor_ran_without_cuda_graphs():
    """``srflow.train.cudagraph_fallbacks`` reads Inductor's private counters: on this torch a
    ``reduce-overhead`` graph of CPU ops (no CUDA graph possible) counts as one skip."""
    before = cudagraph_fallbacks()
    torch.compile(lambda x: (x * 2).sin(), mode="reduce-overhead", fullgraph=True)(torch.randn(8))
    assert cudagraph_fallbacks(since=before) == {"skips": 1, "partitions": 0}


def _fused_adam(params: list, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=True)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny-4x", "tiny-8x"])
def test_cuda_graph_training_steps_equal_eager(preset: str):
    """``torch.compile(mode="reduce-overhead")`` (the forward and the memory-saving backward as
    CUDA graphs) with fused Adam: several captured optimizer steps give eager's losses and
    parameters. Every cache the layers keep on the Python side must stay right under replay
    (W^-1 and log|det W| are recomputed inside the graph, not cached). Where Inductor cannot
    capture, it says so in a log line only and this would pass without CUDA graphs: a graph it
    runs uncaptured (a mutated input, ...) is an error here (``cudagraph_or_error``; the skip
    counter catches those it counts without raising), and so is one split around ops it cannot
    capture, e.g. CPU ops (graph partitions)."""
    import torch._inductor.config  # noqa: PLC0415

    scale = int(preset.split("-")[1][0])
    model, hr, lr = _model(scale, "auto", True, None, device="cuda")
    smooth_relus_(model)
    before = cudagraph_fallbacks()
    with torch._inductor.config.patch({"triton.cudagraph_or_error": True}):
        _assert_as_accurate_as_eager(model, hr, lr, dict(mode="reduce-overhead", fullgraph=True), False, 5, _fused_adam)
    assert cudagraph_fallbacks(since=before) == {"skips": 0, "partitions": 0}


def _capturable_fused_adam(params: list, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, fused=True, capturable=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "bf16,optimizer",
    [(False, torch.optim.SGD), (True, torch.optim.SGD), (False, _capturable_fused_adam)],
    ids=["fp32-sgd", "bf16-sgd", "fp32-fused-adam"],
)
def test_captured_training_steps_equal_eager(bf16: bool, optimizer):  # noqa: ANN001
    """bench_srflow's ``-capture`` variants: the eager training step (memory saving, the C++
    kernels, level batching as on CUDA by default) captured whole with ``torch.cuda.graph`` after
    two warm-up steps, then replayed: the replays' losses (and, under SGD, the parameter updates)
    are as accurate as eager's; with the capturable fused Adam the benchmark uses, its step count
    and moments advance in the graph. A replay runs no Python, so a value the capture read from a
    Python-side cache, or work it did not record, would show here."""
    model, hr, lr = _model(4, "auto", False, None, device="cuda")
    smooth_relus_(model)
    loss_fn = lambda hr, lr: model.nll(hr, lr).mean()  # noqa: E731
    train = lambda: _train(model, hr, lr, loss_fn, 5, bf16, optimizer, capture_after=2)  # noqa: E731
    _judge_training(model, hr, lr, train, bf16, 5, optimizer)


@pytest.mark.gpu
@pytest.mark.parametrize("batching", [False, True], ids=["per-step", "batched"])
def test_eager_step_and_sampling_do_not_sync_on_cuda(batching: bool):
    """On a GPU, an eager training step and a sampling call (no non-finite report) under
    ``torch.cuda.set_sync_debug_mode("error")``: any op that makes the host wait for the device
    raises (the CPU test above counts the ops; this also covers the CUDA-only code)."""
    model, hr, lr = _model(4, "auto", False, batching, device="cuda")
    model.nll(hr, lr).mean().backward()  # first calls: library handles, the backends' loading
    with torch.no_grad():
        model.sample(lr, temperature=0.9, nonfinite="ignore")
    torch.cuda.synchronize()
    with cuda_syncs_raise():
        model.nll(hr, lr).mean().backward()
        with torch.no_grad():
            model.sample(lr, temperature=0.9, nonfinite="ignore")
