"""Control flow that depends on the input's values (a branch, expert routing, an early return): the call
leaves the traced order, flashmem warns (ControlFlowWarning), loads the rest on demand, and the output
is still bit-identical to the resident model's; later calls on the traced path stream as planned."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import flashmem

from conftest import resident

WIDTH = 256  # weights of 256 KiB: whole pages, so the mapped files are exercised as well as copies
READS = ["copy", "map"]


class Branchy(nn.Module):
    """Runs b only when a's output sums above zero; the trace sees one branch."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = self.b(x)
        return self.d(self.c(x))


class Scaled(nn.Module):
    """A container that uses its own weight around a branch: its load is held while the branch runs."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(width, width) / width ** 0.5)
        self.inner = Branchy(width)

    def forward(self, x):
        return self.inner(x @ self.scale) @ self.scale


class Experts(nn.Module):
    """Top-1 routing for the whole batch: which expert runs depends on the router's output."""

    def __init__(self, width: int = WIDTH, n: int = 4):
        super().__init__()
        self.router = nn.Linear(width, n)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.out = nn.Linear(width, width)

    def forward(self, x):
        k = int(self.router(x).mean(0).argmax())
        return self.out(torch.relu(self.experts[k](x)))


class EarlyExit(nn.Module):
    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x):
        x = self.a(x)
        if x.sum() <= 0:
            return x
        return self.c(self.b(x))


class Attending(nn.Module):
    """nn.MultiheadAttention (which reads out_proj.weight outside out_proj's call) on one branch only."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.attn = nn.MultiheadAttention(width, 4, batch_first=True)
        self.c = nn.Linear(width, width)

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:
            x = self.attn(x, x, x, need_weights=False)[0]
        return self.c(x)


def inputs(model: nn.Module, want, n: int = 200, shape=(3, WIDTH)):
    """Inputs, from a fixed seed, for which `want(model, x)` is true, and others for which it is false."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(*shape, generator=g) for _ in range(n)]
    with torch.no_grad():
        yes = [x for x in xs if want(model, x)]
        no = [x for x in xs if not want(model, x)]
    assert yes and no
    return yes, no


def positive(model, x):
    a = model.inner.a if hasattr(model, "inner") else model.a
    if hasattr(model, "inner"):
        x = x @ model.scale
    return bool(a(x).sum() > 0)


def call(sm, x):
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sm(x)
    return out, [w for w in caught if issubclass(w.category, flashmem.ControlFlowWarning)]


def model_of(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls().eval()


def streamed(cls, budget_fraction, x, cpu_reads, streams, debug=None, must_stream=True):
    model = model_of(cls)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    sm = streams(model, int(nbytes * budget_fraction), x, cpu_reads=cpu_reads, debug=debug)
    assert sm.plan.loads or not must_stream, "the budget must make the model stream"
    return sm


@pytest.mark.parametrize("cpu_reads", READS)
@pytest.mark.parametrize("cls, fraction", [(Branchy, 0.55), (Scaled, 0.6), (Attending, 0.95)])
def test_a_branch_off_the_trace_is_completed_exactly(cls, fraction, cpu_reads, streams):
    yes, no = inputs(model_of(cls), positive)
    for traced, other in ((yes, no), (no, yes)):  # the trace takes one branch, then the other
        # (Attending's short path may fit the budget whole; the branch it lacks then loads on demand)
        sm = streamed(cls, fraction, traced[0], cpu_reads, streams, must_stream=traced is yes or cls is not Attending)
        assert sm.cpu_reads == cpu_reads
        for x in (other[0], traced[1], other[1], traced[0]):
            out, warned = call(sm, x)
            assert torch.equal(out, resident(model_of(cls), x))
            on_trace = any(x is t for t in traced)
            assert bool(warned) != on_trace, "a warning exactly for the calls off the trace"
        if warned:
            assert "control flow" in str(warned[0].message)
        sm.close()


@pytest.mark.parametrize("cpu_reads", READS)
def test_expert_routing_is_exact_whatever_expert_runs(cpu_reads, streams):
    model = model_of(Experts)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, WIDTH, generator=g) for _ in range(60)]
    with torch.no_grad():
        route = {i: int(model.router(x).mean(0).argmax()) for i, x in enumerate(xs)}
    picks = {}
    for i, k in route.items():
        picks.setdefault(k, i)
    assert len(picks) >= 2, "the inputs must reach more than one expert"
    sm = streamed(Experts, 0.3, xs[0], cpu_reads, streams)
    warned_for = set()
    for k, i in list(picks.items()) * 2:
        out, warned = call(sm, xs[i])
        assert torch.equal(out, resident(model_of(Experts), xs[i])), f"expert {k}"
        if warned:
            warned_for.add(k)
    assert warned_for == set(picks) - {route[0]}


@pytest.mark.parametrize("cpu_reads", READS)
def test_a_forward_that_ends_early_is_exact_and_warned(cpu_reads, streams):
    yes, no = inputs(model_of(EarlyExit), lambda m, x: bool(m.a(x).sum() > 0))
    sm = streamed(EarlyExit, 0.5, yes[0], cpu_reads, streams)
    out, warned = call(sm, no[0])
    assert torch.equal(out, resident(model_of(EarlyExit), no[0]))
    assert warned and "the end of the forward" in str(warned[0].message)
    out, warned = call(sm, yes[1])
    assert torch.equal(out, resident(model_of(EarlyExit), yes[1])) and not warned


def test_on_demand_loads_under_poison_stay_exact(streams):
    """With released bytes poisoned, the held loads of a running container are not overwritten by the
    on-demand loads of the branch inside it."""
    yes, no = inputs(model_of(Scaled), positive)
    sm = streamed(Scaled, 0.6, yes[0], "copy", streams, debug=flashmem.DebugOptions(poison=True))
    for x in (no[0], yes[1], no[1]):
        out, _ = call(sm, x)
        assert torch.equal(out, resident(model_of(Scaled), x))
