"""Costs: the link model's units, measuring the CPU link, slowdowns per op class, the link's rate beside
compute (`link_busy_factor`), the timeline `simulate` predicts on hand-sized plans worked out by hand, the
cost model's JSON, and `profile` on a small streamed model (one StepCost per op, a link factor in (0, 1],
and the model's outputs untouched by profiling)."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch


from flashmem.check import find_problems
from flashmem.costs import (LINK_FACTOR_FLOOR, BackgroundTransfer, CostModel, LinkCost, StepCost, Timeline, _fit,
                            copy_merges, copy_rate_factor, link_busy_factor, measure_link, measure_wait, profile, simulate,
                            slowdowns_by_class)
from flashmem.errors import FlashmemError
from flashmem.plan import Load, Plan, Resident, simple_plan

from conftest import make_input, make_model, resident, program, streaming_budget

ALIGN = 64
MS = 1e-3


def costs_ms(compute_ms, slowdowns, *, bytes_per_ms: float, overhead_ms: float = 0.0) -> CostModel:
    return CostModel("cpu", "test", LinkCost("synthetic", bytes_per_ms / MS, overhead_ms * MS),
                     tuple(StepCost("Op", c * MS, s) for c, s in zip(compute_ms, slowdowns)))


def in_ms(values) -> list[float]:
    return [v / MS for v in values]


# -- LinkCost --------------------------------------------------------------------------------------------------
def test_link_seconds_is_overhead_plus_bytes_over_bandwidth():
    link = LinkCost("test", bandwidth_bytes_per_s=2e9, overhead_s=1e-5)
    assert link.seconds(0) == pytest.approx(1e-5)
    assert link.seconds(4 * 10**9) == pytest.approx(1e-5 + 2.0)  # 4 GB at 2 GB/s
    assert link.seconds(10**6, copies=3) == pytest.approx(3e-5 + 5e-4)  # overhead per copy, bytes once
    assert LinkCost("x", 1e6, 0.0).seconds(250_000) == pytest.approx(0.25)


def test_fit_recovers_overhead_and_bandwidth():
    sizes = [64 * 2**10, 2**20, 8 * 2**20, 64 * 2**20]
    link = _fit(sizes, [2e-5 + n / 5e9 for n in sizes], "test")
    assert link.kind == "test"
    assert link.bandwidth_bytes_per_s == pytest.approx(5e9, rel=1e-6)
    assert link.overhead_s == pytest.approx(2e-5, rel=1e-6)
    # a negative intercept (noise) is no negative overhead
    assert _fit(sizes, [n / 1e9 - 1e-4 for n in sizes], "test").overhead_s == 0.0


def test_measure_link_on_the_cpu():
    link = measure_link(torch.device("cpu"), repeats=2)
    assert "pread" in link.kind
    assert link.bandwidth_bytes_per_s > 0 and link.overhead_s >= 0
    assert link.seconds(2**20) > 0


def test_a_graphed_link_is_refused_on_the_cpu():
    with pytest.raises(FlashmemError, match="graphed=True.*CPU"):
        measure_link(torch.device("cpu"), graphed=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphed", [False, True])
def test_measure_link_on_cuda(graphed):
    link = measure_link(torch.device("cuda"), repeats=2, graphed=graphed)
    assert link.kind.endswith("graph replays") == graphed
    assert link.bandwidth_bytes_per_s > 0 and link.overhead_s >= 0
    # the probe's capture is closed: copies and kernels run again as usual
    x = torch.arange(1000, dtype=torch.float32).pin_memory()
    assert torch.equal(x.to("cuda", non_blocking=True).cpu() * 2, x * 2)
    assert not torch.cuda.is_current_stream_capturing()


def test_measure_the_mapped_link_on_the_cpu():
    # The mapped runtime's link: pages of a file in the page cache faulted into a mapping, and dropped again.
    link = measure_link(torch.device("cpu"), repeats=2, mapped=True)
    assert "mapping" in link.kind
    assert link.bandwidth_bytes_per_s > 0 and link.overhead_s >= 0
    with BackgroundTransfer(torch.device("cpu"), nbytes=2**20, mapped=True) as bg:
        assert bg.thread.is_alive() and bg.probe is not None
        folder = bg.probe.tmp.name
    assert not bg.thread.is_alive() and not os.path.exists(folder)


def test_a_mapped_model_is_profiled_on_the_mapped_link(streams):
    x = make_input("mlp")
    sm = streams(make_model("mlp"), "64MiB", x, cpu_reads="map")
    assert sm.cpu_reads == "map"
    costs = profile(sm, (x,), {}, calls=1)
    assert "mapping" in costs.link.kind and len(costs.steps) == len(sm.program.ops)
    assert 0.0 < costs.link_busy_factor <= 1.0


def test_background_transfer_on_the_cpu_starts_and_stops():
    with BackgroundTransfer(torch.device("cpu"), nbytes=2**20) as bg:
        assert bg.thread.is_alive()
        folder = bg.tmp.name
        assert os.path.getsize(bg.path) == 2**20
    assert not bg.thread.is_alive()
    assert not os.path.exists(folder)  # its file is gone


# -- slowdowns ---------------------------------------------------------------------------------------------------
def test_slowdowns_are_medians_per_class_floored_at_one():
    classes = ["Linear", "Linear", "Linear", "ReLU", "Conv2d", "Conv2d", "Embedding"]
    quiet = [1.0, 2.0, 1.0, 2.0, 1.0, 1.0, 0.0]
    busy = [1.2, 3.0, 3.0, 1.0, 1.1, 1.3, 5.0]
    # Linear: ratios 1.2, 1.5, 3.0 -> median 1.5; ReLU: 0.5 -> floored to 1.0; Conv2d: 1.1, 1.3 -> 1.2;
    # Embedding: quiet 0 gives no ratio, so no entry.
    slow = slowdowns_by_class(classes, quiet, busy)
    assert set(slow) == {"Linear", "ReLU", "Conv2d"}
    assert slow["Linear"] == pytest.approx(1.5)
    assert slow["ReLU"] == 1.0
    assert slow["Conv2d"] == pytest.approx(1.2)
    assert slowdowns_by_class([], [], []) == {}


# -- the link beside compute ----------------------------------------------------------------------------------------
def test_background_bytes_between_counts_straddling_copies_by_their_share():
    with BackgroundTransfer(torch.device("cpu"), nbytes=2**20) as bg:
        pass
    bg.samples = [(0.0, 1.0, 100), (1.0, 2.0, 100), (2.0, 4.0, 100)]
    assert bg.bytes_between(0.0, 4.0) == pytest.approx(300)
    assert bg.bytes_between(0.5, 3.0) == pytest.approx(50 + 100 + 50)  # half of the first, half of the last
    assert bg.bytes_between(5.0, 6.0) == 0.0


def test_link_busy_factor_counts_the_waits_at_the_idle_rate():
    # Calls of 10 s, 8 of them computing; idle rate 100 B/s. The background moved 700 B and the profile's
    # loads 100 B: in the 2 s of waits the link moved 200 B in all (at its idle rate), so 600 B moved beside
    # 8 s of compute, 75 B/s: a factor of 0.75. Had the loads' 100 B been taken as the background's own
    # slowdown, the factor would have come out lower.
    assert link_busy_factor(100.0, 700.0, 100.0, 10.0, 8.0) == pytest.approx(0.75)
    # no slowdown: the background moved the idle rate all along, less the loads' share of the waits
    assert link_busy_factor(100.0, 900.0, 100.0, 10.0, 8.0) == pytest.approx(1.0)
    # clamped: faster than idle (noise) is 1.0, and a link that all but stopped is the floor
    assert link_busy_factor(100.0, 2000.0, 0.0, 10.0, 8.0) == 1.0
    assert link_busy_factor(100.0, 150.0, 0.0, 10.0, 8.0) == LINK_FACTOR_FLOOR
    # nothing computed (or nothing measured): no slowdown
    assert link_busy_factor(100.0, 500.0, 0.0, 5.0, 0.0) == 1.0
    assert link_busy_factor(0.0, 0.0, 0.0, 5.0, 1.0) == 1.0



def test_copy_rate_factor_is_the_fit_over_the_busy_lane():
    link = LinkCost("synthetic", 100.0, 0.5)  # a 100 B copy takes 1.5 s on the idle link
    # Two copies of 4 s each with a gap between: the lane was busy 8 s for what the idle link moves in 3 s.
    assert copy_rate_factor([(0.0, 4.0, 100), (5.0, 9.0, 100)], link) == pytest.approx(3.0 / 8.0)
    # Overlapping copies count their union once: busy [0, 4], 3 s of idle-link time: 0.75.
    assert copy_rate_factor([(0.0, 3.0, 100), (1.0, 4.0, 100)], link) == pytest.approx(0.75)
    # Order does not matter; a copy inside another adds its bytes but no busy time.
    assert copy_rate_factor([(1.0, 2.0, 100), (0.0, 6.0, 200)], link) == pytest.approx((1.5 + 2.5) / 6.0)
    # Clamped: faster than the fit (noise) is 1.0, a lane that all but stopped is the floor.
    assert copy_rate_factor([(0.0, 1.0, 100)], link) == 1.0
    assert copy_rate_factor([(0.0, 1000.0, 100)], link) == LINK_FACTOR_FLOOR
    # No copies (everything resident), or no measured time: no slowdown.
    assert copy_rate_factor([], link) == 1.0
    assert copy_rate_factor([(2.0, 2.0, 100)], link) == 1.0

# -- simulate ------------------------------------------------------------------------------------------------------
# Program A: four ops, op i uses Wi (100 B, 128 B in the arena).
A = program([100] * 4, [(f"m{i}", (i,), i) for i in range(4)])


def test_simulate_two_slot_ring_by_hand():
    # The simple plan at 256 B: W0 at 0 and W1 at 128 issued at op 0, W2 at 0 at op 1, W3 at 128 at op 2.
    # Link: 100 B/ms plus 0.5 ms per copy: 1.5 ms a load. Compute 2, 1, 4, 1 ms; slowdowns 1.5, 2, 1, 3.
    #   W0 [0, 1.5], W1 [1.5, 3] (FIFO); W2 waits for W0's release, W3 for W1's.
    #   op 0 waits for W0: ready 1.5; W1 runs beside it for 1.5 ms of its 2: 2 + 0.5 x 1.5 = 2.75: [1.5, 4.25]
    #   W2 [4.25, 5.75] (after op 0); op 1 ready at 4.25 (W1 arrived at 3), W2 beside it for the whole 1 ms
    #   of compute: 1 + 1 x 1 = 2: [4.25, 6.25]
    #   W3 [6.25, 7.75] (after op 1; the link was free at 5.75); op 2 ready 6.25, slowdown 1: [6.25, 10.25]
    #   op 3 waits for W3 (7.75, long arrived): ready 10.25; nothing moves beside it: [10.25, 11.25]
    plan = simple_plan(A, budget_bytes=256, device="cpu", alignment=ALIGN, activation_bytes=0)
    assert [(l.weight, l.start_step, l.offset_bytes) for l in plan.loads] == [(0, 0, 0), (1, 0, 128), (2, 1, 0),
                                                                              (3, 2, 128)]
    costs = costs_ms([2, 1, 4, 1], [1.5, 2.0, 1.0, 3.0], bytes_per_ms=100, overhead_ms=0.5)
    tl = simulate(plan, costs)
    assert in_ms(tl.load_start_s) == pytest.approx([0, 1.5, 4.25, 6.25])
    assert in_ms(tl.load_end_s) == pytest.approx([1.5, 3, 5.75, 7.75])
    assert in_ms(tl.step_start_s) == pytest.approx([1.5, 4.25, 6.25, 10.25])
    assert in_ms(tl.step_end_s) == pytest.approx([4.25, 6.25, 10.25, 11.25])
    assert tl.total_s == pytest.approx(11.25 * MS)


def test_simulate_moves_a_coalesced_cuda_pair_as_one_copy_once_both_are_free():
    # A at 256 B on CUDA: W0 at 0 and W1 at 128 issued at op 0 follow each other (one copy); W2 would be
    # issued at op 1 but waits for op 2, where W3 (after it in the arena) is issued: one copy, which waits
    # for both holders' releases (W0's after op 0, W1's after op 1). Link 100 B/ms plus 0.5 ms a copy,
    # 1 ms of compute per op, no slowdown:
    #   copy 1: W0 [0, 1.5] (with the copy's fixed cost), W1 [1.5, 2.5]; op 0 [1.5, 2.5]; op 1 [2.5, 3.5]
    #   copy 2 after op 1: W2 [3.5, 5], W3 [5, 6]; op 2 waits for W2: [5, 6]; op 3 [6, 7].
    plan = simple_plan(A, budget_bytes=256, device="cuda", alignment=ALIGN, activation_bytes=0)
    assert [(l.weight, l.start_step, l.offset_bytes) for l in plan.loads] == [(0, 0, 0), (1, 0, 128), (2, 2, 0),
                                                                              (3, 2, 128)]
    assert copy_merges(plan) == [False, True, False, True]
    tl = simulate(plan, costs_ms([1] * 4, [1.0] * 4, bytes_per_ms=100, overhead_ms=0.5))
    assert in_ms(tl.load_start_s) == pytest.approx([0, 1.5, 3.5, 5])
    assert in_ms(tl.load_end_s) == pytest.approx([1.5, 2.5, 5, 6])
    assert in_ms(tl.step_start_s) == pytest.approx([1.5, 2.5, 5, 6])
    assert tl.total_s == pytest.approx(7 * MS)


def test_simulate_link_bound_and_compute_bound():
    plan = simple_plan(A, budget_bytes=256, device="cpu", alignment=ALIGN, activation_bytes=0)
    # No compute: the link alone, 4 x 1 ms back to back (each load's holder is done by the time the link is).
    tl = simulate(plan, costs_ms([0] * 4, [1.0] * 4, bytes_per_ms=100))
    assert in_ms(tl.load_start_s) == pytest.approx([0, 1, 2, 3]) and tl.total_s == pytest.approx(4 * MS)
    # 10 ms of compute per op and 1 ms loads: only W0's load shows: 1 + 4 x 10 = 41 ms.
    tl = simulate(plan, costs_ms([10] * 4, [1.0] * 4, bytes_per_ms=100))
    assert in_ms(tl.step_start_s) == pytest.approx([1, 11, 21, 31]) and tl.total_s == pytest.approx(41 * MS)
    # All resident: compute only, and no load at all.
    plan = simple_plan(A, budget_bytes=512, device="cpu", alignment=ALIGN, activation_bytes=0)
    tl = simulate(plan, costs_ms([1, 2, 3, 4], [3.0] * 4, bytes_per_ms=100))
    assert tl.load_start_s == () and in_ms(tl.step_end_s) == pytest.approx([1, 3, 6, 10])
    assert Timeline((), (), (), ()).total_s == 0.0


def test_simulate_waits_for_the_container_to_exit():
    # Program C: op 0 'blk' (W0, 64 B) is a container around op 1 (W1, 128 B) and op 2 (W2, 128 B); op 3 uses
    # W3 (256 B), loaded over the bytes of all three. W0 and W2 both last until op 2, but op 0 exits last,
    # so W3 waits for W0's release. Link 64 B/ms, 1 ms of compute per op:
    #   W0 [0, 1], W1 [1, 3], W2 [3, 5]; op 0 [1, 2]; op 1 [3, 4]; op 2 [5, 6];
    #   W3 after the end of op 2: [6, 10]; op 3 [10, 11].
    prog = program([64, 128, 128, 256], [("blk", (0,), 2), ("blk.a", (1,), 1), ("blk.b", (2,), 2), ("next", (3,), 3)])
    plan = Plan(device="cpu", signature="test", budget_bytes=320, arena_bytes=320, resident_bytes=0,
                activation_bytes=0, fixed_bytes=0, alignment=ALIGN, residents=(),
                loads=(Load(0, 0, 0, 2, 0, 0, 64), Load(1, 0, 1, 1, 1, 64, 128), Load(2, 0, 2, 2, 2, 192, 128),
                       Load(3, 3, 3, 3, 3, 0, 256)),
                n_ops=4, status="simple")
    assert list(find_problems(plan, prog)) == []
    tl = simulate(plan, costs_ms([1] * 4, [1.0] * 4, bytes_per_ms=64))
    assert in_ms(tl.load_start_s) == pytest.approx([0, 1, 3, 6])
    assert in_ms(tl.step_start_s) == pytest.approx([1, 3, 5, 10])
    assert tl.total_s == pytest.approx(11 * MS)


def test_simulate_with_residents_and_a_fifo_link():
    # A at 384: W0 resident, W1 at 128 and W2 at 256 issued at op 0, W3 at 128 once W1 is done.
    # Link 50 B/ms: 2 ms a load. Compute 1, 1, 1, 1 ms, no slowdown.
    #   op 0 needs nothing loaded: [0, 1]; W1 [0, 2], W2 [2, 4] (behind W1 on the link)
    #   op 1 waits for W1: [2, 3]; W3 after W1's release (end of op 1, 3): [4, 6] (the link is busy until 4)
    #   op 2 waits for W2: [4, 5]; op 3 waits for W3: [6, 7].
    plan = simple_plan(A, budget_bytes=384, device="cpu", alignment=ALIGN, activation_bytes=0)
    assert plan.residents == (Resident(0, 0, 100),)
    tl = simulate(plan, costs_ms([1] * 4, [1.0] * 4, bytes_per_ms=50))
    assert in_ms(tl.load_start_s) == pytest.approx([0, 2, 4])
    assert in_ms(tl.step_start_s) == pytest.approx([0, 2, 4, 6])
    assert tl.total_s == pytest.approx(7 * MS)


def test_simulate_adds_the_wait_cost_where_an_op_waits_for_a_load():
    # test_simulate_with_residents_and_a_fifo_link's plan with wait_s = 0.5 ms: ops 1, 2 and 3 wait for a load
    # (op 0's weight is resident), so each of them takes 0.5 ms longer; the link is unchanged.
    #   op 0 [0, 1]; W1 [0, 2], W2 [2, 4]; op 1 [2, 3.5]; W3 after W1's release (3.5): [4, 6];
    #   op 2 [4, 5.5]; op 3 [6, 7.5].
    plan = simple_plan(A, budget_bytes=384, device="cpu", alignment=ALIGN, activation_bytes=0)
    costs = dataclasses.replace(costs_ms([1] * 4, [1.0] * 4, bytes_per_ms=50), wait_s=0.5 * MS)
    tl = simulate(plan, costs)
    assert in_ms(tl.load_start_s) == pytest.approx([0, 2, 4])
    assert in_ms(tl.step_start_s) == pytest.approx([0, 2, 4, 6])
    assert in_ms(tl.step_end_s) == pytest.approx([1, 3.5, 5.5, 7.5])


def test_simulate_with_the_link_slowed_beside_compute():
    # test_simulate_with_residents_and_a_fifo_link's plan (W0 resident; W1, W2 issued at op 0; W3 after W1's
    # release; 2 ms a load at the idle rate, 1 ms of compute per op) with the link at half its rate while an
    # op computes:
    #   op 0 [0, 1]: W1 moves 1 ms x 0.5 = 0.5 ms of its 2 ms beside it;
    #   op 1 waits for W1's other 1.5 ms at the idle rate: W1 [0, 2.5]; W2 starts at 2.5; op 1 [2.5, 3.5],
    #   W2 0.5 ms of 2 beside it; W3 joins the queue at 3.5 (W1 released);
    #   op 2 waits for W2's 1.5 ms: W2 [2.5, 5]; W3 starts at 5; op 2 [5, 6], W3 0.5 ms beside it;
    #   op 3 waits 1.5 ms: W3 [5, 7.5]; op 3 [7.5, 8.5]. At the full rate it took 7 ms.
    plan = simple_plan(A, budget_bytes=384, device="cpu", alignment=ALIGN, activation_bytes=0)
    costs = dataclasses.replace(costs_ms([1] * 4, [1.0] * 4, bytes_per_ms=50), link_busy_factor=0.5)
    tl = simulate(plan, costs)
    assert in_ms(tl.load_start_s) == pytest.approx([0, 2.5, 5])
    assert in_ms(tl.load_end_s) == pytest.approx([2.5, 5, 7.5])
    assert in_ms(tl.step_start_s) == pytest.approx([0, 2.5, 5, 7.5])
    assert tl.total_s == pytest.approx(8.5 * MS)
    # With op 0 also 2x slower beside the link: busy for its whole 1 ms of compute, it stretches by 1 ms,
    # over which W1 moves another 0.5 ms: op 0 [0, 2], W1 done at 2 + 1 = 3; then as above, 0.5 ms later:
    #   op 1 [3, 4]; W2 [3, 5.5]; op 2 [5.5, 6.5]; W3 [5.5, 8]; op 3 [8, 9].
    slowed = dataclasses.replace(costs, steps=(StepCost("Op", MS, 2.0),) + costs.steps[1:])
    tl = simulate(plan, slowed)
    assert in_ms(tl.load_end_s) == pytest.approx([3, 5.5, 8])
    assert in_ms(tl.step_end_s) == pytest.approx([2, 4, 6.5, 9])
    # and the link's rate only matters beside compute: with no compute, the link alone, as at full rate
    idle = dataclasses.replace(costs_ms([0] * 4, [1.0] * 4, bytes_per_ms=50), link_busy_factor=0.5)
    assert simulate(plan, idle).total_s == pytest.approx(6 * MS)


# -- CostModel --------------------------------------------------------------------------------------------------------
def test_cost_model_json_round_trip():
    costs = CostModel("cuda:0", "abc123", LinkCost("pinned host to cuda", 2.5e10, 7.5e-6),
                      (StepCost("Linear", 1.25e-4, 1.03), StepCost("Embedding", 3e-6, 1.0),
                       StepCost("LayerNorm", 0.0, 1.0)))
    back = CostModel.from_json(costs.to_json())
    assert back == costs
    assert isinstance(back.steps, tuple) and isinstance(back.link, LinkCost)
    assert back.compute_s == pytest.approx(1.25e-4 + 3e-6)
    doc = json.loads(costs.to_json())
    assert doc["link"]["bandwidth_bytes_per_s"] == 2.5e10 and doc["steps"][1]["op_class"] == "Embedding"
    # the per-wait cost travels too, and a cost model saved before it existed reads as 0
    waited = dataclasses.replace(costs, wait_s=4e-6)
    assert CostModel.from_json(waited.to_json()) == waited
    del doc["wait_s"]
    assert CostModel.from_json(json.dumps(doc)).wait_s == 0.0
    # so does the link's rate beside compute; saved before it existed, it reads as 1.0 (no slowdown)
    slowed = dataclasses.replace(costs, link_busy_factor=0.92)
    assert json.loads(slowed.to_json())["link_busy_factor"] == 0.92
    assert CostModel.from_json(slowed.to_json()) == slowed
    del doc["link_busy_factor"]
    assert CostModel.from_json(json.dumps(doc)).link_busy_factor == 1.0


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.01])
def test_a_link_factor_outside_zero_to_one_is_refused(factor):
    with pytest.raises(FlashmemError, match="link_busy_factor"):
        CostModel("cpu", "test", LinkCost("synthetic", 1e6, 0.0), (), link_busy_factor=factor)


def test_room_request_bytes_follows_the_caching_allocators_segments():
    from flashmem.costs import room_request_bytes

    mib = 2**20
    # 1 MiB and less: a 2 MiB segment; up to 10 MiB: a 20 MiB one; more: the request rounded up to 2 MiB
    assert room_request_bytes(5 * mib, 8 * mib) == mib  # 5 MiB would take 20 MiB of an 8 MiB room
    assert room_request_bytes(512 * 1024, 8 * mib) == 512 * 1024
    assert room_request_bytes(4 * mib, 20 * mib) == 4 * mib
    assert room_request_bytes(45 * mib, 72 * mib) == 44 * mib  # whole 2 MiB units
    assert room_request_bytes(11 * mib + 5, 12 * mib) == 10 * mib
    assert room_request_bytes(100 * mib, 30 * mib) == 30 * mib  # never more than the room
    assert room_request_bytes(mib, 0) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphed", [False, True])
def test_measure_wait_on_cuda(graphed):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    wait = measure_wait(torch.device("cuda"), graphed, scratch_bytes=8 * 2**20)
    assert 0.0 <= wait < 1e-3  # a few microseconds a step on an H200
    assert torch.cuda.max_memory_reserved() - before <= 8 * 2**20 and torch.cuda.memory_reserved() <= before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_kernel_slowdown_on_cuda():
    from flashmem.costs import measure_kernel_slowdown

    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    slow = measure_kernel_slowdown(torch.device("cuda"), repeats=3)
    assert 1.0 <= slow < 1.5  # copy engines barely disturb a discrete GPU: 1.00-1.02 on an H200
    assert not torch.cuda.is_current_stream_capturing()
    # nothing stays reserved: not its tensors, its graphs' pools, nor cuBLAS's workspaces for its streams
    assert torch.cuda.memory_reserved() <= before
    # within a small room, the allocator's segments included (a 4 MiB request would take 20 MiB)
    torch.cuda.reset_peak_memory_stats()
    slow = measure_kernel_slowdown(torch.device("cuda"), scratch_bytes=8 * 2**20, repeats=3)
    assert 1.0 <= slow < 1.5 and torch.cuda.max_memory_reserved() - before <= 8 * 2**20


# -- profile ----------------------------------------------------------------------------------------------------------
def test_profile_a_streamed_mlp(streams):
    x = make_input("mlp")
    expected = resident(make_model("mlp"), x)
    sm = streams(make_model("mlp"), streaming_budget(), x)
    assert sm.plan.loads, "the budget should stream some weights"
    plan_before = sm.plan
    costs = profile(sm, (x,), {}, calls=1)
    assert sm.plan is plan_before  # profiling plans nothing new
    assert costs.device == "cpu" and costs.signature == sm.program.signature
    assert len(costs.steps) == len(sm.program.ops) == 4  # the four Linear layers
    assert all(s.op_class == "Linear" for s in costs.steps)
    assert all(s.compute_s >= 0 and s.slowdown >= 1.0 for s in costs.steps)
    assert len({s.slowdown for s in costs.steps}) == 1  # one class, one slowdown
    assert 0.0 < costs.link_busy_factor <= 1.0  # measured; its value is the machine's
    assert "pread" in costs.link.kind and costs.link.bandwidth_bytes_per_s > 0 and costs.link.overhead_s >= 0
    assert sm._executor.profiling is False and sm._executor.mover.serial is False
    for _ in range(2):
        with torch.no_grad():
            assert torch.equal(sm(x), expected)
    assert sm.stats.streamed_bytes == sm.plan.streamed_bytes > 0
    # the profile predicts this plan
    assert simulate(sm.plan, costs).total_s >= costs.compute_s


def test_profile_before_any_other_call_and_the_solver_on_it(streams):
    # profile() makes the first call itself when the signature is new; the costs then drive solve_plan.
    from flashmem.solve import SolverSettings, solve_plan

    x = make_input("mlp", seed=3)
    y = make_input("mlp", seed=4, batch=3)  # another signature
    expected = resident(make_model("mlp"), y)
    sm = streams(make_model("mlp"), streaming_budget(), x)
    costs = profile(sm, (y,), {}, calls=1)
    assert costs.signature == sm.program.signature
    plan = solve_plan(sm.program, costs, budget_bytes=sm.budget_bytes, device="cpu", alignment=sm.plan.alignment,
                      activation_bytes=0, granularity=ALIGN, settings=SolverSettings(time_limit_s=1.0))
    assert list(find_problems(plan, sm.program)) == []
    assert plan.predicted_s <= simulate(sm.plan, costs).total_s + 1e-12
    with torch.no_grad():
        assert torch.equal(sm(y), expected)
