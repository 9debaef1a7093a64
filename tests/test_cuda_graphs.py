"""CUDA graphs (`cuda_graphs=True`): a replayed streamed call of a stack of linear layers gives the same bits
as the resident model, with
fresh inputs at every call and outputs that later replays leave alone; the graph's memory stays within the
budget; inputs that cannot be captured run eagerly, exactly, with a GraphWarning saying why; profiles and
the solver's plan work on replays.

Skipped where torch.cuda.is_available() is False, except the refusal off CUDA, which runs everywhere.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import flashmem
from flashmem.units import fmt_bytes

from conftest import model_bytes

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MiB = 2**20


class Stack(nn.Module):
    """16 linear layers of 2048 features (134 MB in fp16): cuBLAS products, which a graph replays with the
    same kernels. `scale` (a Python number) only makes another input signature of the same shapes."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2048, 2048) for _ in range(16))
        self.norm = nn.LayerNorm(2048)

    def forward(self, x, scale: float = 1.0):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x)) * scale
        return {"hidden": self.norm(x)}


def build():
    torch.manual_seed(0)
    return Stack().half().eval()


def hidden(out) -> torch.Tensor:
    return out["hidden"]


def images(n: int, batch: int = 2, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 64, 2048, generator=g).half().cuda() for _ in range(n)]


def settle() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def refs():
    model = build()
    xs = images(3) + images(2, batch=1, seed=5)
    model.cuda()
    with torch.no_grad():
        outs = [hidden(model(x)).clone() for x in xs]
    model.cpu()
    del model
    settle()
    return dict(nbytes=model_bytes(build()), xs=xs, refs=outs)


def graph_budget(refs, fraction: float = 0.5) -> int:
    """`fraction` of the weights plus what flashmem's own stream's cuBLAS workspace takes (32 MiB on Hopper),
    made when the model is streamed with graphs."""
    return int(fraction * refs["nbytes"]) + 36 * MiB


def stream_graphed(refs, fraction: float = 0.5, **kw):
    return flashmem.stream(build(), graph_budget(refs, fraction), device="cuda", example_inputs=(refs["xs"][0],),
                           cuda_graphs=True, **kw)


@cuda
def test_cuda_graphs_replays_are_exact_with_fresh_inputs_within_the_budget(refs):
    settle()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    budget = graph_budget(refs)
    sm = stream_graphed(refs)
    try:
        assert sm.plan.loads, "the budget must make the plan stream"
        peaks, kept = [torch.cuda.max_memory_reserved()], []
        for i in range(7):
            j = i % 3  # three inputs of one shape: one graph, its static inputs refreshed each call
            with torch.no_grad():
                out = hidden(sm(refs["xs"][j]))
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_reserved())
            assert torch.equal(out, refs["refs"][j]), f"call {i}"
            if i < 3:
                kept.append((out, j))  # held across later replays: a replay must not overwrite it
            del out
        for out, j in kept:
            assert torch.equal(out, refs["refs"][j])
        assert sm._graphs.replays >= 5 and sm.graph_refusals == {}
        stats = sm.stats
        assert stats.streamed_bytes == sm.plan.streamed_bytes > 0
        assert 0 < stats.wall_s and stats.stall_s is None  # not timed: DebugOptions.time_stalls
        assert sm.plan.arena_bytes <= stats.peak_bytes <= budget
        held = sm._graphs.graph.held_bytes
        assert 0 < held <= budget - sm.plan.arena_bytes - sm.plan.fixed_bytes
        kept.clear()
        growth = max(peaks) - before
        assert growth <= budget, f"reserved memory grew by {fmt_bytes(growth)} at a budget of {fmt_bytes(budget)}"
    finally:
        sm.close()
        settle()


@cuda
def test_copies_are_timed_inside_a_replayed_graph(refs):
    """With record_loads, a graph holds an event pair around each copy; after a replay they give every copy's
    interval on the one copy stream, in order, the bytes of the plan's loads."""
    sm = stream_graphed(refs)
    try:
        with torch.no_grad():
            sm(refs["xs"][0])  # the trace's plan and executor; record_loads from here on
            mover = sm._executor.mover
            mover.record_loads = True
            outs = [hidden(sm(refs["xs"][i % 3])) for i in range(4)]
        assert sm._graphs.replays >= 1 and sm.graph_refusals == {}
        assert all(torch.equal(o, refs["refs"][i % 3]) for i, o in enumerate(outs))
        copies = mover.copy_intervals()
        assert len(copies) == sum(len(groups) for groups in mover.groups.values())
        assert sum(n for _, _, n in copies) == sum(load.nbytes for load in sm.plan.loads)
        wall = sm.stats.wall_s
        for (a, b, _), (c, _, _) in zip(copies, copies[1:] + [(wall, wall, 0)]):
            assert 0 <= a <= b <= c <= wall * 1.01, (a, b, c, wall)
    finally:
        sm.close()
        settle()


@cuda
def test_cuda_graphs_alternating_inputs_drop_the_graph_then_stay_eager_exactly(refs):
    """Two signatures of one shape (scale left out, or given) share the arena's layout, so each keeps its
    executor; each switch drops the other's graph, and after three captures each signature
    stays eager, with a GraphWarning."""
    sm = stream_graphed(refs)
    kinds = [{}, {"scale": 1.0}]
    try:
        with pytest.warns(flashmem.GraphWarning, match="captured 3 times"):
            for i in range(14):
                with torch.no_grad():
                    out = hidden(sm(refs["xs"][i % 3], **kinds[i % 2]))
                assert torch.equal(out, refs["refs"][i % 3]), f"call {i}"
        reasons = sm.graph_refusals
        assert len(reasons) == 2 and all("captured 3 times" in why for why in reasons.values()), reasons
        assert sm._graphs.replays >= 5
    finally:
        sm.close()
        settle()


class HostSync(nn.Module):
    """A forward that reads a value on the host (.item()): no graph can hold it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)

    def forward(self, x):
        h = self.a(x)
        scale = float(h.abs().max().item())
        return self.b(h / scale)


class Box:
    """An output type no replay can copy out."""

    def __init__(self, t):
        self.t = t


class Boxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(256, 256)

    def forward(self, x):
        return Box(self.a(x))


@cuda
@pytest.mark.parametrize("kind, unwrap, why", [
    (HostSync, lambda o: o, "synchronizes with the host"),
    (Boxed, lambda o: o.t, "holds a Box, which a replay cannot copy out"),
])
def test_cuda_graphs_uncapturable_calls_run_eagerly_and_exactly(kind, unwrap, why):
    torch.manual_seed(0)
    model = kind().half().eval()
    x = torch.randn(8, 256, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        ref = unwrap(model.cuda()(x)).clone()
    model.cpu()
    sm = flashmem.stream(model, 200_000 + 48 * MiB, device="cuda", example_inputs=(x,), cuda_graphs=True)
    try:
        with torch.no_grad():
            # The plan's first call runs eagerly, probed for host syncs (HostSync is refused there, before any
            # capture); the second is captured (Boxed is refused after it).
            with pytest.warns(flashmem.GraphWarning, match=why):
                outs = [sm(x), sm(x)]
            outs += [sm(x) for _ in range(2)]
        assert all(torch.equal(unwrap(o), ref) for o in outs)
        assert sm._graphs.replays == 0 and why in list(sm.graph_refusals.values())[0]
    finally:
        sm.close()
        settle()
    # No capture failed on the way: another model's calls in this process still capture and replay.
    other = nn.Linear(256, 256).half().eval()
    with torch.no_grad():
        expected = other.cuda()(x).clone()
    other.cpu()
    sm = flashmem.stream(other, 200_000 + 48 * MiB, device="cuda", example_inputs=(x,), cuda_graphs=True)
    try:
        with torch.no_grad():
            outs = [sm(x) for _ in range(4)]
        assert all(torch.equal(o, expected) for o in outs) and sm._graphs.replays == 3 and sm.graph_refusals == {}
    finally:
        sm.close()
        settle()


@cuda
def test_cuda_graphs_profile_and_solver_plan_on_replays(refs, tmp_path):
    pytest.importorskip("ortools")
    from flashmem.costs import copy_rate_factor, profile

    sm = stream_graphed(refs)
    try:
        kwargs = {}
        torch.cuda.synchronize()
        held_before = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        costs = profile(sm, (refs["xs"][0],), kwargs)
        # the profile's probes stay within what the budget leaves beside the arena (the link's copies land in
        # the ring, the slowdown's chain in the activations' room)
        plan = sm.plan
        assert torch.cuda.max_memory_reserved() - held_before <= plan.budget_bytes - plan.arena_bytes - plan.fixed_bytes
        assert len(costs.steps) == len(sm.program.ops) and all(s.compute_s > 0 for s in costs.steps)
        assert sm._graphs.replays > 0  # the profile's calls were replays of a profiling graph
        # one device-wide slowdown, from kernel chains beside copies (costs.measure_kernel_slowdown)
        assert len({s.slowdown for s in costs.steps}) == 1 and 1.0 <= costs.steps[0].slowdown < 1.5
        # The link's rate beside compute comes from the timed copies of one streamed call (its last).
        copies = sm._executor.mover.copy_intervals()
        assert copies and sum(n for _, _, n in copies) == sm.plan.streamed_bytes
        assert costs.link_busy_factor == copy_rate_factor(copies, costs.link)
        assert costs.link.kind.endswith("graph replays")  # the link as a replay's copies run
        plan = sm.use_solver((refs["xs"][0],), kwargs, cache_dir=tmp_path)
        assert plan.status in ("optimal", "feasible", "fallback")
        replays = sm._graphs.replays
        for j in range(3):
            with torch.no_grad():
                assert torch.equal(hidden(sm(refs["xs"][j])), refs["refs"][j])
        assert sm._graphs.replays >= replays + 1 and sm.graph_refusals == {}
    finally:
        sm.close()
        settle()


def test_cuda_graphs_refused_off_cuda():
    with pytest.raises(flashmem.FlashmemError, match="cuda_graphs=True replays CUDA kernels"):
        flashmem.stream(nn.Linear(4, 4), "1MiB", device="cpu", example_inputs=(torch.ones(1, 4),), cuda_graphs=True)
    with pytest.raises(flashmem.FlashmemError, match="cuda_graphs=True replays CUDA kernels"):
        flashmem.Workload({"a": nn.Linear(4, 4)}, "1MiB", device="cpu", examples={"a": ((torch.ones(1, 4),), {})},
                          cuda_graphs=True)


@cuda
def test_cuda_graphs_refused_with_a_host_budget():
    with pytest.raises(flashmem.FlashmemError, match="cannot capture a host_budget call"):
        flashmem.stream(nn.Linear(4, 4), "64MiB", device="cuda", example_inputs=(torch.ones(1, 4),),
                        host_budget="1MiB", cuda_graphs=True)


class Constants(nn.Module):
    """Device constants made from Python data in the forward (`torch.tensor(..., device=)` as GPT-Neo's
    attention does, `Tensor.new_tensor` of a Python argument): copies from pageable memory that a plain
    capture cannot hold. Replays must copy the same values again, and a new value of `t` (another input
    signature) its own."""

    def __init__(self, width: int = 1024):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x, t: float = 2.0):
        h = self.a(x) * x.new_tensor([t, 1.0])[0]
        floor = torch.tensor(-1.5, dtype=h.dtype, device=h.device)
        return self.b(torch.maximum(h, floor))


@cuda
def test_cuda_graphs_capture_device_constants_from_python_data():
    def build() -> nn.Module:
        torch.manual_seed(0)
        return Constants(2048).half().eval()

    model = build()
    x = torch.randn(8, 2048, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        model.cuda()
        refs = {t: model(x, t=t).clone() for t in (2.0, 3.0)}
    model.cpu()
    # Half the weights (8 MiB) and 44 MiB beside them: the stream's workspace (34 MiB on Hopper) and the
    # graph's activation reserve (6 MiB) leave a 12 MiB arena, above one layer's 10 MiB blocks and below
    # the two layers' 18 MiB, so one layer streams.
    budget = model_bytes(model) // 2 + 44 * MiB
    sm = flashmem.stream(model, budget, device="cuda", example_inputs=(x,), cuda_graphs=True)
    if not sm.plan.loads:  # a device whose workspace is smaller left room for both layers: a 12 MiB arena
        budget -= sm.plan.budget_bytes - sm.plan.fixed_bytes - sm.plan.activation_bytes - 12 * MiB
        sm.close()  # the closed model's weights went with its store: the same weights again, built afresh
        sm = flashmem.stream(build(), budget, device="cuda", example_inputs=(x,), cuda_graphs=True)
    try:
        assert sm.plan.loads, "the budget must make the plan stream"
        with torch.no_grad():
            outs = [(t, sm(x, t=t)) for t in (2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0)]
        for i, (t, out) in enumerate(outs):
            assert torch.equal(out, refs[t]), f"call {i} (t={t})"
        assert sm.graph_refusals == {} and sm._graphs.replays >= 3
    finally:
        sm.close()
        settle()


def _wide_mlp(seed: int, width: int, depth: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(depth)]
    return nn.Sequential(*layers).half().eval()


@cuda
def test_workload_cuda_graphs_replay_the_sequence_exactly_within_the_budget():
    """Three models (two MLPs of other widths, one with device constants) in a sequence that replays as one
    graph from its second run on: every output bit-identical to the model run alone, outputs on the host and
    left alone by later replays, call times from the graph's events in order, reserved memory within the
    budget."""
    models = {"wide": _wide_mlp(1, 2048, 8), "narrow": _wide_mlp(2, 1024, 6), "consts": Constants(1024).half().eval()}
    g = torch.Generator().manual_seed(4)
    inputs = {"wide": torch.randn(16, 2048, generator=g).half().cuda(),
              "narrow": torch.randn(16, 1024, generator=g).half(),  # on the host: each call copies it in
              "consts": torch.randn(16, 1024, generator=g).half().cuda()}
    refs = {}
    with torch.no_grad():
        for name, m in models.items():
            refs[name] = m.cuda()(inputs[name].cuda()).cpu()
            m.cpu()
    settle()
    nbytes = sum(model_bytes(m) for m in models.values())
    budget = nbytes // 2 + 48 * MiB
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    wl = flashmem.Workload(models, budget, device="cuda", examples={k: ((x,), {}) for k, x in inputs.items()},
                           cuda_graphs=True)
    order = ["wide", "consts", "narrow", "wide", "narrow", "consts"]
    calls = [(k, (inputs[k],), {}) for k in order]
    try:
        assert wl.plan.loads, "the budget must make the plan stream"
        runs = [wl.run(calls) for _ in range(4)]
        assert wl.graph_refusals == {} and wl.streamed._graphs.replays >= 2
        for i, results in enumerate(runs):
            assert [r.name for r in results] == order
            for r in results:
                assert r.error is None, r.error
                assert r.output.device.type == "cpu"
                assert torch.equal(r.output, refs[r.name]), f"run {i}, {r.name}"
            stamps = [s for r in results for s in (r.start_s, r.end_s)]
            assert stamps == sorted(stamps), f"run {i}: call times out of order"
        growth = torch.cuda.max_memory_reserved() - before
        assert growth <= budget, f"reserved memory grew by {fmt_bytes(growth)} at a budget of {fmt_bytes(budget)}"
    finally:
        wl.close()
        settle()


def test_the_probe_is_seen_as_a_capture_by_its_own_thread_only():
    """`seen_as_capture` (the probe's view): torch.cuda.is_current_stream_capturing() answers True on the
    probing thread and PyTorch's own answer elsewhere and afterwards (on a machine without CUDA that answer
    is an error, as it was before)."""
    import threading

    from flashmem.graphs import seen_as_capture

    def plain() -> object:
        try:
            return torch.cuda.is_current_stream_capturing()
        except RuntimeError:  # a PyTorch built without CUDA
            return "no cuda"

    expected = plain()
    other = []
    with seen_as_capture():
        assert torch.cuda.is_current_stream_capturing() is True
        worker = threading.Thread(target=lambda: other.append(plain()))
        worker.start()
        worker.join()
        with seen_as_capture():  # nested: still True inside, and after the inner one ends
            assert torch.cuda.is_current_stream_capturing() is True
        assert torch.cuda.is_current_stream_capturing() is True
    assert other == [expected] and expected in (False, "no cuda")
    assert plain() == expected
