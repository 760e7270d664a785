"""``unfold_grads``, the backward of the subnet-scale folds, against autograd through ``fold_convs``.

The memory-saving backward maps the folded convolutions' gradients back to the parameters with
``unfold_grads``. It has two ways of doing so: on a CPU it scales the weight gradients one by one
(a weight-sized stack is mostly page faults there), elsewhere it stacks them (one kernel on
CUDA), and where autograd is on or under torch.compile it works out of place. All three must
give the same numbers, bitwise, and those of the float64 oracle.
"""

from __future__ import annotations

import pytest
import torch

from flowkernels.layers import _folding
from flowkernels.layers._folding import Folded, FoldTerms, fold_convs, unfold_grads

# two groups by shape and factor, members interleaved; the third group gets no gradients at all
SHAPES = [((6, 5, 3, 3), 1.0), ((4, 6, 1, 1), 3.0), ((6, 5, 3, 3), 1.0), ((4, 6, 1, 1), 3.0), ((6, 5, 3, 3), 1.0)]
SHAPES += [((3, 2, 3, 3), 1.0)]
MISSING = (3, 5)  # a term of a group with gradients, and the whole third group
WAYS = ("cpu-foreach", "stacked", "autograd-on")


def _terms(dtype: torch.dtype, gen: torch.Generator) -> list[FoldTerms]:
    return [
        FoldTerms(
            torch.randn(shape, generator=gen).to(dtype),
            (0.3 * torch.randn(1, shape[0], 1, 1, generator=gen)).to(dtype),
            torch.randn(shape[0], generator=gen).to(dtype),
            factor,
        )
        for shape, factor in SHAPES
    ]


def _grads(terms: list[FoldTerms], dtype: torch.dtype, gen: torch.Generator) -> list[Folded | None]:
    """Random gradients of the folded (weight, bias), None for the MISSING terms."""
    out: list[Folded | None] = []
    for i, t in enumerate(terms):
        w, b = torch.randn(t.weight.shape, generator=gen), torch.randn(t.bias.shape[0], generator=gen)
        out.append(None if i in MISSING else Folded(w.to(dtype), b.to(dtype)))
    return out


def _autograd(terms: list[FoldTerms], grads: list[Folded | None], dtype: torch.dtype) -> list[tuple | None]:
    """Autograd through ``fold_convs`` in ``dtype`` (float64: the oracle): d<folded, grads>/d(weight,
    logs, bias) per term, None for a term of a group without gradients."""
    leaves = [[x.to(dtype).requires_grad_(True) for x in (t.weight, t.logs, t.bias)] for t in terms]
    folded, _ = fold_convs([FoldTerms(*xs, t.factor) for xs, t in zip(leaves, terms)])
    pairs = [(f, g) for f, g in zip(folded, grads) if g is not None]
    loss = sum((f.weight * g.weight.to(dtype)).sum() + (f.bias * g.bias.to(dtype)).sum() for f, g in pairs)
    flat = torch.autograd.grad(loss, [x for xs in leaves for x in xs], allow_unused=True)
    out = [flat[3 * i : 3 * i + 3] for i in range(len(terms))]
    return [None if all(x is None for x in g) else g for g in out]


def _unfold(terms: list[FoldTerms], grads: list[Folded | None], way: str, monkeypatch: pytest.MonkeyPatch):
    """``unfold_grads`` after a fold without autograd (as the memory-saving backward runs it)."""
    monkeypatch.setattr(_folding, "_STACK_FREE_DEVICES", ("cpu",) if way == "cpu-foreach" else ())
    with torch.no_grad():
        _, groups = fold_convs(terms)
    given = [None if g is None else Folded(g.weight.clone(), g.bias.clone()) for g in grads]  # it may overwrite them
    with torch.set_grad_enabled(way == "autograd-on"):
        return unfold_grads(terms, groups, given)


@pytest.mark.parametrize("way", WAYS)
def test_unfold_grads_is_the_backward_of_the_fold(way: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    terms = _terms(torch.float64, gen)
    grads = _grads(terms, torch.float64, gen)
    want, got = _autograd(terms, grads, torch.float64), _unfold(terms, grads, way, monkeypatch)
    assert [w is None for w in want] == [g is None for g in got] == [i == 5 for i in range(len(terms))]
    for i, (w, g) in enumerate(zip(want, got)):
        for name, a, b in zip(("weight", "logs", "bias"), w or (), g or ()):
            assert b.shape == a.shape, f"term {i} {name}: shape {tuple(b.shape)}, want {tuple(a.shape)}"
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=f"term {i} {name}")
    assert not got[3][0].any(), "a term without gradients gets a zero weight gradient"


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_unfold_grads_ways_agree_bitwise(grad_dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 parameters; the folded gradients in float32, or in bfloat16 as under bf16 autocast
    (the parameters' gradients are float32 either way)."""
    gen = torch.Generator().manual_seed(1)
    terms = _terms(torch.float32, gen)
    grads = _grads(terms, grad_dtype, gen)
    results = {way: _unfold(terms, grads, way, monkeypatch) for way in WAYS}
    first = results[WAYS[0]]
    for way, got in results.items():
        for i, (a, b) in enumerate(zip(first, got)):
            assert (a is None) == (b is None)
            for name, x, y in zip(("weight", "logs", "bias"), a or (), b or ()):
                assert y.dtype == torch.float32, f"{way}, term {i} {name}: {y.dtype}"
                assert torch.equal(x, y), f"{way} differs from {WAYS[0]} at term {i} {name}"
    # and float32 is as close to the float64 oracle as float32 autograd through the fold
    want, plain = _autograd(terms, grads, torch.float64), _autograd(terms, grads, torch.float32)
    eps = torch.finfo(torch.float32).eps
    for i, (w, p, g) in enumerate(zip(want, plain, first)):
        for name, a, b, c in zip(("weight", "logs", "bias"), w or (), p or (), g or ()):
            plain_err = (b.double() - a).abs().max().item()
            err = (c.double() - a).abs().max().item()
            bound = 4 * max(plain_err, eps * a.abs().max().item())
            assert err <= bound, f"term {i} {name}: {err:.2e} against plain autograd's {plain_err:.2e}"
