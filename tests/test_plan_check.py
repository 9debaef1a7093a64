"""The planner (`simple_plan`) and the independent checker (`check.find_problems` / `check_plan`) on
hand-sized Programs whose plans are worked out by hand, hand-broken plans the checker must reject, a
property test over random programs (every plan simple_plan makes passes the checker and a byte-level
simulation of the run), and the plan's JSON form."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashmem.check import check_plan, find_problems
from flashmem.errors import BudgetTooSmall, PlanInvalid
from flashmem.plan import Load, Plan, Resident, coalesce_loads, minimum_budget, simple_plan, use_runs
from flashmem.trace import Program

from conftest import program

ALIGN = 64


def plan_for(prog: Program, budget: int, device: str = "cpu", **kwargs) -> Plan:
    kwargs.setdefault("activation_bytes", prog.activation_bytes)
    return simple_plan(prog, budget_bytes=budget, device=device, alignment=ALIGN, **kwargs)


def problems(plan: Plan, prog: Program) -> list[str]:
    return list(find_problems(plan, prog))


def assert_valid(plan: Plan, prog: Program) -> None:
    """The checker accepts the plan, and a simulated run on the plan's own semantics keeps every weight
    intact while it is used."""
    assert problems(plan, prog) == []
    check_plan(plan, prog)  # raises PlanInvalid otherwise
    assert simulate(plan, prog) == []


def assert_movers_keep_it(plan: Plan, prog: Program) -> None:
    """Simulated runs with the CPU and the CUDA movers' schedules keep every weight intact too."""
    assert simulate(plan, prog, "cpu") == []
    assert simulate(plan, prog, "cuda") == []


def loads_as_tuples(plan: Plan):
    """(weight, start_step, first_use, last_use, release_op, offset) of each load."""
    return [(l.weight, l.start_step, l.first_use, l.last_use, l.release_op, l.offset_bytes) for l in plan.loads]


# -- an independent byte-level simulation of a run ----------------------------------------------------------
def holders_of(plan: Plan) -> list[tuple[int, ...]]:
    """What the movers make each load wait for before writing its bytes (the earlier loads whose release
    it waits on), as the engine computes it."""
    import inspect

    try:
        from flashmem.plan import previous_holders
    except ImportError:  # older layout
        from flashmem.run_cuda import previous_holder

        def previous_holders(loads):
            return previous_holder(dataclasses.replace(plan, loads=tuple(loads)))
    if "alignment" in inspect.signature(previous_holders).parameters:
        found = previous_holders(plan.loads, alignment=plan.alignment)
    else:
        found = previous_holders(plan.loads)
    out = []
    for h in found:
        out.append(() if h is None else tuple(h) if isinstance(h, (list, tuple, set, frozenset)) else (h,))
    return out


def simulate(plan: Plan, prog: Program, mover: str = "plan") -> list[str]:
    """Run the plan on a model of the arena where every byte remembers which copy wrote it last.

    The call is a sequence of events, op entries and exits in the order the program's nesting
    (`end_index`) gives. Residents are written first. Each load is written at once, at the earliest
    moment the chosen mover could write it, so any clobbering shows:
    - "plan": when op `start_step` is entered (the plan's own semantics, as the checker reads them);
    - "cpu": the CPU mover's IO thread, which runs ahead: after the previous load, and after the
      release of the earlier loads the engine says it must wait for (previous_holders);
    - "cuda": the CUDA mover: not before its issue at `start_step`, after the copy before it (one copy
      stream) and after the release events of those same earlier loads.
    Every op checks on entry, and again on exit (after everything nested in it ran, before what its
    release lets in), that each of its weights is whole in the arena, written by the copy serving it."""
    found = []
    tags = np.zeros(plan.arena_bytes, dtype=np.int64)  # 0: never written; -(w+1): resident w; j+1: load j
    resident = {r.weight: r for r in plan.residents}
    for r in plan.residents:
        tags[r.offset_bytes:r.offset_bytes + r.nbytes] = -(r.weight + 1)

    events = []  # ("enter" | "exit", op); time t is the index in this list plus 1, time 0 the call start
    stack: list[int] = []
    for k in range(len(prog.ops)):
        events.append(("enter", k))
        stack.append(k)
        while stack and prog.ops[stack[-1]].end_index == k:
            events.append(("exit", stack.pop()))
    enter_t = {op: t + 1 for t, (kind, op) in enumerate(events) if kind == "enter"}
    exit_t = {op: t + 1 for t, (kind, op) in enumerate(events) if kind == "exit"}

    holders = holders_of(plan) if mover != "plan" else [()] * len(plan.loads)
    write_t = []
    for j, load in enumerate(plan.loads):
        if mover == "plan":
            t = enter_t.get(load.start_step, len(events) + 1)  # never, if issued at no op
        else:
            t = max([exit_t[plan.loads[k].release_op] for k in holders[j]], default=0)
            t = max(t, write_t[j - 1] if j else 0)
            if mover == "cuda":
                t = max(t, enter_t.get(load.start_step, len(events) + 1))
        write_t.append(t)
    writes_at: dict[int, list[int]] = {}
    for j, t in enumerate(write_t):
        writes_at.setdefault(t, []).append(j)

    def write(t: int) -> None:
        for j in writes_at.get(t, ()):
            load = plan.loads[j]
            if load.offset_bytes < 0 or load.offset_bytes + load.nbytes > plan.arena_bytes:
                found.append(f"load {j} lies outside the arena")
                continue
            tags[load.offset_bytes:load.offset_bytes + load.nbytes] = j + 1

    def verify(k: int, when: str) -> None:
        op = prog.ops[k]
        for w in op.weights:
            if w in resident:
                r, tag = resident[w], -(w + 1)
                begin, end = r.offset_bytes, r.offset_bytes + r.nbytes
            else:
                serving = [j for j, l in enumerate(plan.loads) if l.weight == w and l.first_use <= k <= l.last_use]
                if len(serving) != 1:
                    found.append(f"op {k} {when}: {len(serving)} loads serve weight {w}")
                    continue
                j = serving[0]
                if write_t[j] > enter_t[k]:
                    found.append(f"op {k} {when}: load {j} of weight {w} not written yet")
                    continue
                tag = j + 1
                begin, end = plan.loads[j].offset_bytes, plan.loads[j].offset_bytes + plan.loads[j].nbytes
            if begin < 0 or end > plan.arena_bytes or not (tags[begin:end] == tag).all():
                found.append(f"op {k} {when}: weight {w} at [{begin}, {end}) is not intact")

    write(0)
    for t, (kind, k) in enumerate(events, start=1):
        if kind == "enter":
            write(t)
            verify(k, "entry")
        else:
            verify(k, "exit")
            write(t)
    return found


# -- hand-sized programs, worked out by hand -----------------------------------------------------------------
# Program A: four leaf ops m0..m3, op i uses weight Wi only; every weight is 100 B, so it takes 128 B
# (two 64 B alignment units) in the arena. The most bytes any op needs at once: 128 B.
A = program([100, 100, 100, 100], [("m0", (0,), 0), ("m1", (1,), 1), ("m2", (2,), 2), ("m3", (3,), 3)])


def test_a_everything_fits():
    # Budget 512 = 4 x 128: all four weights resident, in order of first use, nothing streamed.
    plan = plan_for(A, 512)
    assert [(r.weight, r.offset_bytes, r.nbytes) for r in plan.residents] == [(0, 0, 100), (1, 128, 100),
                                                                             (2, 256, 100), (3, 384, 100)]
    assert plan.loads == () and plan.arena_bytes == plan.resident_bytes == 512
    assert plan.streamed_bytes == 0 and plan.status == "simple" and plan.n_ops == 4
    assert_valid(plan, A)
    assert_movers_keep_it(plan, A)


def test_a_one_resident_and_a_two_slot_ring():
    # Budget 384: the ring aims at twice the 128 B minimum (256 B), which leaves 128 B for residents:
    # W0 stays at [0, 128). W1, W2, W3 stream through the ring [128, 384), first fit around the ring:
    #   W1 -> ring 0 (arena 128), free from the start: issued at op 0
    #   W2 -> ring 128 (arena 256), free from the start: issued at op 0
    #   W3 -> wraps to ring 0 (arena 128), whose bytes W1 holds until op 1: issued at op 2
    plan = plan_for(A, 384)
    assert [(r.weight, r.offset_bytes) for r in plan.residents] == [(0, 0)]
    assert plan.resident_bytes == 128 and plan.arena_bytes == 384
    assert loads_as_tuples(plan) == [(1, 0, 1, 1, 1, 128), (2, 0, 2, 2, 2, 256), (3, 2, 3, 3, 3, 128)]
    assert plan.streamed_bytes == 300
    assert_valid(plan, A)
    assert_movers_keep_it(plan, A)


def test_a_all_streamed_through_two_slots():
    # Budget 256: ring target min(256, 2 x 128) = 256, nothing left for residents.
    #   W0 -> 0 at op 0; W1 -> 128 at op 0; W2 -> 0 once W0 is done (after op 0): issued at op 1;
    #   W3 -> 128 once W1 is done (after op 1): issued at op 2.
    plan = plan_for(A, 256)
    assert plan.residents == () and plan.resident_bytes == 0 and plan.arena_bytes == 256
    assert loads_as_tuples(plan) == [(0, 0, 0, 0, 0, 0), (1, 0, 1, 1, 1, 128), (2, 1, 2, 2, 2, 0),
                                     (3, 2, 3, 3, 3, 128)]
    assert_valid(plan, A)
    assert_movers_keep_it(plan, A)


def test_a_cuda_small_load_waits_to_move_with_the_next():
    # The same ring on CUDA: W2 (at 0) and W3 (at 128) follow each other in the arena and in weight order,
    # and W3's step (op 2) is W2's first use, so W2 waits for op 2 and the two move as one copy. W0 and W1
    # already start together. Starting later, W2 holds its bytes for less: still valid.
    plan = plan_for(A, 256, device="cuda")
    assert loads_as_tuples(plan) == [(0, 0, 0, 0, 0, 0), (1, 0, 1, 1, 1, 128), (2, 2, 2, 2, 2, 0),
                                     (3, 2, 3, 3, 3, 128)]
    assert_valid(plan, A)
    assert_movers_keep_it(plan, A)
    # Not where the next load starts after the first one's use (W3 would start after W2's op), nor for a
    # load of at least max_bytes, nor on the CPU, whose loads move one by one.
    cpu = plan_for(A, 256)
    late = dataclasses.replace(cpu, device="cuda", loads=cpu.loads[:3] + (dataclasses.replace(cpu.loads[3], start_step=3),))
    assert coalesce_loads(late) == late
    assert coalesce_loads(dataclasses.replace(cpu, device="cuda"), max_bytes=100).loads == cpu.loads
    assert coalesce_loads(cpu) == cpu


def test_a_one_slot():
    # Budget 128, the minimum: every weight at offset 0, each issued when the op before it is done.
    plan = plan_for(A, 128)
    assert loads_as_tuples(plan) == [(0, 0, 0, 0, 0, 0), (1, 1, 1, 1, 1, 0), (2, 2, 2, 2, 2, 0),
                                     (3, 3, 3, 3, 3, 0)]
    assert_valid(plan, A)
    assert_movers_keep_it(plan, A)


def test_a_budget_too_small():
    # Budget 127 < 128: op 0 (the first op needing the most) cannot have its weight in place.
    with pytest.raises(BudgetTooSmall) as info:
        plan_for(A, 127)
    err = info.value
    assert (err.op, err.need_bytes, err.budget_bytes) == ("m0", 128, 127)
    msg = str(err)
    assert "op 0 ('m0')" in msg and "128 B" in msg and "127 B" in msg
    assert "raise the budget to at least 128 B" in msg


def test_a_activations_and_buffers_come_off_the_top():
    # 100 B for activations and 28 B of buffers leave 512 of 640 for the arena: all resident again;
    # one byte less and the ring appears.
    prog = program([100] * 4, [(f"m{i}", (i,), i) for i in range(4)], activation_bytes=100, fixed_bytes=28)
    plan = plan_for(prog, 640)
    assert plan.arena_bytes == 512 and len(plan.residents) == 4 and plan.total_bytes == 640
    assert_valid(plan, prog)
    plan = plan_for(prog, 639)
    assert plan.loads and plan.total_bytes <= 639
    assert_valid(plan, prog)
    with pytest.raises(BudgetTooSmall) as info:
        plan_for(prog, 255)  # 255 - 128 fixed = 127 < 128
    assert info.value.need_bytes == 256


# Program D: a head tied to W1 at the end of the call, so W1 has two use runs (two loads if streamed):
#   op i 'mi' uses Wi (i = 0..3), op 4 'head' uses W1 again; each weight 100 B -> 128 B.
D = program([100, 100, 100, 100], [("m0", (0,), 0), ("m1", (1,), 1), ("m2", (2,), 2), ("m3", (3,), 3),
                                   ("head", (1,), 4)])


def test_d_the_weight_loaded_twice_is_the_resident():
    # Budget 384: a 256 B ring leaves 128 B for one resident. W1 would be loaded twice, the others once, so
    # W1 stays (300 B streamed; W0 resident, as by first use alone, would stream W1 twice: 400 B). The ring
    # [128, 384): W0 -> ring 0 (arena 128) at op 0; W2 -> ring 128 (arena 256), free from the start: at op 0;
    # W3 -> wraps to ring 0 (arena 128), whose bytes W0 holds until op 0: issued at op 1.
    plan = plan_for(D, 384)
    assert [(r.weight, r.offset_bytes) for r in plan.residents] == [(1, 0)]
    assert loads_as_tuples(plan) == [(0, 0, 0, 0, 0, 128), (2, 0, 2, 2, 2, 256), (3, 1, 3, 3, 3, 128)]
    assert plan.streamed_bytes == 300
    assert_valid(plan, D)
    assert_movers_keep_it(plan, D)


# Program E: a large tied weight at both ends of the call, W0 (256 B) used by op 0 and by op 6 'head', and
# W1-W5 (100 B -> 128 B each) by ops 1-5. The largest working set is W0's 256 B.
E = program([256] + [100] * 5, [("m0", (0,), 0)] + [(f"m{i}", (i,), i) for i in range(1, 6)]
            + [("head", (0,), 6)])


def test_e_the_ring_shrinks_to_what_streams():
    # Budget 768. Beside a ring of twice the largest working set (512 B), 256 B stay for residents: W0,
    # loaded twice otherwise. What still streams needs at most 128 B at once, so the ring shrinks to 256 B
    # and W1, W2 stay resident too (300 B streamed instead of 500 B). The ring [512, 768): W3 -> 512 and
    # W4 -> 640, free from the start, issued at op 0; W5 wraps to 512, which W3 holds until op 3: op 4.
    plan = plan_for(E, 768)
    assert [(r.weight, r.offset_bytes) for r in plan.residents] == [(0, 0), (1, 256), (2, 384)]
    assert loads_as_tuples(plan) == [(3, 0, 3, 3, 3, 512), (4, 0, 4, 4, 4, 640), (5, 4, 5, 5, 5, 512)]
    assert plan.streamed_bytes == 300 and plan.arena_bytes == 768
    assert_valid(plan, E)
    assert_movers_keep_it(plan, E)


# Program F: an untied head much larger than the rest: W0-W3 (100 B -> 128 B) used by ops 0-3, W4 (500 B ->
# 512 B) by op 4 'head'. The largest working set is the head's 512 B; every other op needs 128 B.
F = program([100] * 4 + [500], [(f"m{i}", (i,), i) for i in range(4)] + [("head", (4,), 4)])


def test_f_the_head_streams_through_a_ring_of_twice_it():
    # Budget 896 (the five weights take 1024 B): a ring of twice the head (1024 B) does not fit beside any
    # resident, so all five stream through the whole arena, 900 B. Keeping the head resident instead would
    # shrink the ring to twice 128 B and keep W0 too (300 B streamed), but a ring of two slots makes every
    # copy wait for the op just before it: on an H200 a GPT-Neo-2.7B shape at 1 GiB ran 7% slower that way
    # (BENCHMARKS.md), so the simple plan keeps the deeper ring.
    plan = plan_for(F, 896)
    assert plan.residents == () and plan.streamed_bytes == 900
    assert_valid(plan, F)
    assert_movers_keep_it(plan, F)


# Program B: a container with its own weight around two nested ops, and the container's weight used
# again right after it (a tied head):
#   op 0 'block'   uses W0 (200 B -> 256 B), exits after op 2
#   op 1 'block.a' uses W1 (64 B)
#   op 2 'block.b' uses W2 (64 B)
#   op 3 'head'    uses W0 again
# W0's uses 0..2 and 3 touch, so one load serves both: first_use 0, last_use 3, released when op 3 exits.
# The most at once: W0 + W1 = 320 B at op 1.
B = program([200, 64, 64], [("block", (0,), 2), ("block.a", (1,), 1), ("block.b", (2,), 2), ("head", (0,), 3)])


def test_b_use_runs_merge_the_container_and_the_head():
    runs = use_runs(B)
    assert [(r.weight, r.first_use, r.last_use, r.release_op) for r in runs] == [(0, 0, 3, 3), (1, 1, 1, 1),
                                                                                 (2, 2, 2, 2)]


def test_b_minimum_ring():
    # Budget 320: no residents, ring [0, 320):
    #   W0 -> 0 (256 B) at op 0, held to op 3; W1 -> 256 at op 0;
    #   W2 -> would wrap to 0 but W0 is still held there, so it goes to 256 after W1 (done after op 1):
    #   issued at op 2.
    plan = plan_for(B, 320)
    assert plan.residents == () and plan.arena_bytes == 320
    assert loads_as_tuples(plan) == [(0, 0, 0, 3, 3, 0), (1, 0, 1, 1, 1, 256), (2, 2, 2, 2, 2, 256)]
    assert_valid(plan, B)
    assert_movers_keep_it(plan, B)
    with pytest.raises(BudgetTooSmall) as info:
        plan_for(B, 319)
    assert (info.value.op, info.value.need_bytes) == ("block.a", 320)
    assert "op 1 ('block.a')" in str(info.value)


def test_b_all_resident():
    plan = plan_for(B, 448)  # 256 + 64 + 64 = 384 fits
    assert [(r.weight, r.offset_bytes) for r in plan.residents] == [(0, 0), (1, 256), (2, 320)]
    assert plan.arena_bytes == 384 and plan.loads == ()
    assert_valid(plan, B)
    assert_movers_keep_it(plan, B)


# Program C: a container whose own weight is used until it exits, after its last child:
#   op 0 'blk'   uses W0 (64 B), exits after op 2
#   op 1 'blk.a' uses W1 (128 B)
#   op 2 'blk.b' uses W2 (128 B)
#   op 3 'next'  uses W3 (256 B)
# A valid plan, by hand, in a 320 B ring: W0 at [0, 64), W1 at [64, 192), W2 at [192, 320), all issued at
# op 0; W3 issued at op 3 at [0, 256), over the bytes of W0, W1 and W2, which are all done by then. Both
# W0 (released when op 0 exits) and W2 (released when op 2 exits) end at op 2, but op 0 exits last:
# W3 must wait for W0's release, not only for W2's.
C = program([64, 128, 128, 256], [("blk", (0,), 2), ("blk.a", (1,), 1), ("blk.b", (2,), 2), ("next", (3,), 3)])
C_PLAN = Plan(device="cpu", signature="test", budget_bytes=320, arena_bytes=320, resident_bytes=0,
              activation_bytes=0, fixed_bytes=0, alignment=ALIGN, residents=(),
              loads=(Load(0, 0, 0, 2, 0, 0, 64), Load(1, 0, 1, 1, 1, 64, 128), Load(2, 0, 2, 2, 2, 192, 128),
                     Load(3, 3, 3, 3, 3, 0, 256)),
              n_ops=4, status="simple")


def test_c_hand_plan_is_valid():
    assert_valid(C_PLAN, C)


def test_c_movers_wait_for_the_container_to_exit():
    assert_movers_keep_it(C_PLAN, C)


# -- hand-broken plans --------------------------------------------------------------------------------------
def broken(plan: Plan, index: int, **changes) -> Plan:
    loads = list(plan.loads)
    loads[index] = dataclasses.replace(loads[index], **changes)
    return dataclasses.replace(plan, loads=tuple(loads))


def assert_rejected(plan: Plan, prog: Program, words: str) -> None:
    found = problems(plan, prog)
    assert any(words in p for p in found), found
    with pytest.raises(PlanInvalid, match="rejected by the checker"):
        check_plan(plan, prog)


def test_checker_rejects_a_load_issued_after_its_first_use():
    good = plan_for(A, 128)  # loads issued at 0, 1, 2, 3
    bad = broken(good, 3, start_step=4)
    assert_rejected(bad, A, "after its first use")
    assert simulate(bad, A)  # the simulated run indeed breaks


def test_checker_rejects_two_live_loads_sharing_bytes():
    good = plan_for(A, 256)
    # W2 issued at op 0 into [0, 128) while W0 still needs those bytes at op 0
    bad = broken(good, 2, start_step=0)
    assert_rejected(bad, A, "share arena bytes")
    assert simulate(bad, A)
    # W1 moved onto [64, 192), overlapping W0 while both are held at op 0
    bad = broken(good, 1, offset_bytes=64)
    assert_rejected(bad, A, "share arena bytes")
    assert simulate(bad, A)
    # in B, W2 issued at op 0 into W1's bytes, which op 1 still needs
    bad = broken(plan_for(B, 320), 2, start_step=0)
    assert_rejected(bad, B, "share arena bytes")
    assert simulate(bad, B)


def test_checker_rejects_an_arena_over_budget():
    good = plan_for(A, 256)
    assert_rejected(dataclasses.replace(good, budget_bytes=255), A, "exceeds the budget")
    assert_rejected(dataclasses.replace(good, activation_bytes=1), A, "exceeds the budget")
    assert_rejected(dataclasses.replace(good, fixed_bytes=64), A, "exceeds the budget")


def test_checker_rejects_a_use_with_no_load():
    good = plan_for(A, 256)
    bad = dataclasses.replace(good, loads=good.loads[:3])  # nothing brings W3 in
    assert_rejected(bad, A, "which no load has in place")
    # W0 of B released when op 0 exits (after op 2): the head at op 3 finds nothing
    good_b = plan_for(B, 320)
    bad = broken(good_b, 0, last_use=2, release_op=0)
    assert_rejected(bad, B, "op 3 (head) uses W0")
    # W3 loaded for a span that starts after its use
    bad = broken(good, 3, first_use=3, last_use=3, start_step=3, weight=2)
    assert any("uses W3" in p for p in problems(bad, A))


def test_checker_rejects_a_load_released_inside_its_container():
    # W0 held only to op 0 itself, but op 0 ('block') runs until op 2 has finished
    good = plan_for(B, 320)
    bad = broken(good, 0, last_use=0, release_op=0)
    found = problems(bad, B)
    assert any("no load has in place" in p or "released when op 0 exits" in p for p in found), found


def test_checker_rejects_a_load_outside_the_ring():
    good = plan_for(A, 256)
    assert_rejected(broken(good, 3, offset_bytes=192), A, "outside the ring")  # ends at 320 > 256
    assert_rejected(broken(good, 3, offset_bytes=-64), A, "outside the ring")
    assert_rejected(broken(good, 3, offset_bytes=130), A, "misaligned")
    with_resident = plan_for(A, 384)  # ring is [128, 384)
    assert_rejected(broken(with_resident, 0, offset_bytes=0), A, "outside the ring")  # onto resident W0


def test_checker_rejects_other_inconsistencies():
    good = plan_for(A, 256)
    assert_rejected(dataclasses.replace(good, n_ops=5), A, "covers 5 ops")
    assert_rejected(broken(good, 0, nbytes=99), A, "the weight has 100 B")
    out_of_order = dataclasses.replace(good, loads=(good.loads[0], good.loads[2], good.loads[1], good.loads[3]))
    assert_rejected(out_of_order, A, "before load")
    res = plan_for(A, 384)
    twice = dataclasses.replace(res, residents=res.residents * 2)
    assert_rejected(twice, A, "resident twice")
    both = dataclasses.replace(res, loads=res.loads + (Load(0, 3, 3, 3, 3, 128, 100),))
    assert_rejected(both, A, "both resident and loaded")
    assert_rejected(dataclasses.replace(res, resident_bytes=512), A, "larger than the arena")


# -- random programs: every plan simple_plan makes is valid ------------------------------------------------
@st.composite
def programs(draw, own_weights: bool = False):
    """Random programs: calls nested up to three deep, each op using 1-3 of a few weights (so weights are
    shared between ops, tied or reused), and sometimes activations and buffers. With `own_weights`, each
    op uses one weight of its own, as a model's modules do when nothing is tied."""
    n_weights = draw(st.integers(1, 7))
    sizes = draw(st.lists(st.integers(1, 300), min_size=n_weights, max_size=n_weights))
    ops: list[list] = []

    def call(depth: int) -> None:
        i = len(ops)
        if own_weights:
            sizes.append(draw(st.integers(1, 300)))
            ws = (len(sizes) - 1,)
        else:
            ws = tuple(draw(st.lists(st.integers(0, n_weights - 1), min_size=1, max_size=3, unique=True)))
        ops.append([f"m{i}", ws, None])
        if depth < 2:
            for _ in range(draw(st.integers(0, 2))):
                call(depth + 1)
        ops[i][2] = len(ops) - 1

    if own_weights:
        sizes.clear()
    for _ in range(draw(st.integers(1, 6))):
        call(0)
    fixed = draw(st.sampled_from([(0, 0), (0, 0), (100, 0), (64, 40)]))
    return program(sizes, [tuple(o) for o in ops], activation_bytes=fixed[0], fixed_bytes=fixed[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prog=st.one_of(programs(), programs(own_weights=True)), fraction=st.floats(0.0, 1.3),
       granularity=st.sampled_from([1, 64, 128]), device=st.sampled_from(["cpu", "cuda"]))
def test_every_simple_plan_passes_the_checker(prog, fraction, granularity, device):
    """On either device (CUDA's plans coalesce small loads)."""
    total = sum(-(-w.nbytes // ALIGN) * ALIGN for w in prog.weights)
    fixed = prog.activation_bytes + prog.fixed_bytes
    budget = max(1, int(fixed + fraction * total))
    try:
        plan = plan_for(prog, budget, device, granularity=granularity)
    except BudgetTooSmall as err:
        assert err.budget_bytes == budget and err.need_bytes > budget
        assert "raise the budget to at least" in str(err)
        return
    assert_valid(plan, prog)
    assert plan.total_bytes <= budget
    used = {w for op in prog.ops for w in op.weights}
    assert {r.weight for r in plan.residents} | {l.weight for l in plan.loads} == used


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prog=st.one_of(programs(), programs(own_weights=True)), fraction=st.floats(0.0, 1.3),
       device=st.sampled_from(["cpu", "cuda"]))
def test_movers_never_overwrite_a_weight_in_use(prog, fraction, device):
    """Every plan simple_plan makes (for either device) runs intact under the CPU and CUDA movers' schedules."""
    total = sum(-(-w.nbytes // ALIGN) * ALIGN for w in prog.weights)
    budget = max(1, int(prog.activation_bytes + prog.fixed_bytes + fraction * total))
    try:
        plan = plan_for(prog, budget, device)
    except BudgetTooSmall:
        return
    assert_movers_keep_it(plan, prog)


@settings(max_examples=150, deadline=None)
@given(prog=programs())
def test_a_whole_model_budget_keeps_everything_resident(prog):
    total = sum(-(-w.nbytes // ALIGN) * ALIGN for w in prog.weights)
    plan = plan_for(prog, total + prog.activation_bytes + prog.fixed_bytes)
    assert plan.loads == ()
    assert {r.weight for r in plan.residents} == {w for op in prog.ops for w in op.weights}
    assert_valid(plan, prog)


@settings(max_examples=150, deadline=None)
@given(prog=programs())
def test_the_minimum_the_error_asks_for_is_enough(prog):
    """BudgetTooSmall's need_bytes at budget 1 is the minimum: it plans (or asks for more, and that plans)."""
    budget = 1
    for _ in range(4):
        try:
            plan = plan_for(prog, budget)
            break
        except BudgetTooSmall as err:
            assert err.need_bytes > budget
            budget = err.need_bytes
    else:
        raise AssertionError(f"no plan after raising the budget to {budget}")
    assert_valid(plan, prog)



def test_a_minimum_budget():
    # Program A streams through one 128 B slot (test_a_one_slot): 128 B; with 100 B of activations and 28 B
    # of buffers on top, 256 B; in whole 96 B units the slot rounds up to 192 B.
    assert minimum_budget(A, activation_bytes=0, alignment=ALIGN) == 128
    prog = program([100] * 4, [(f"m{i}", (i,), i) for i in range(4)], activation_bytes=100, fixed_bytes=28)
    assert minimum_budget(prog, activation_bytes=100, alignment=ALIGN) == 256
    assert minimum_budget(A, activation_bytes=0, alignment=ALIGN, granularity=96) == 192
    plan_for(prog, 256)
    with pytest.raises(BudgetTooSmall):
        plan_for(prog, 255)


@settings(max_examples=200, deadline=None)
@given(prog=st.one_of(programs(), programs(own_weights=True)), granularity=st.sampled_from([1, 64, 128]))
def test_the_minimum_budget_always_plans(prog, granularity):
    """At `minimum_budget` simple_plan finds a plan (valid, within it), and it is at least what BudgetTooSmall
    asks for at a budget of 1 byte (the op that needs the most weights at once)."""
    least = minimum_budget(prog, activation_bytes=prog.activation_bytes, alignment=ALIGN, granularity=granularity)
    plan = plan_for(prog, least, granularity=granularity)
    assert_valid(plan, prog)
    assert plan.total_bytes <= least
    with pytest.raises(BudgetTooSmall) as info:
        plan_for(prog, 1, granularity=granularity)
    assert info.value.need_bytes <= least

# -- JSON -----------------------------------------------------------------------------------------------------
PLAN_FIELDS = {"device", "signature", "budget_bytes", "arena_bytes", "resident_bytes", "activation_bytes",
               "fixed_bytes", "alignment", "residents", "loads", "n_ops", "status", "format"}


def from_json(text: str) -> Plan:
    doc = json.loads(text)
    fields = {f.name for f in dataclasses.fields(Plan)}
    kwargs = {k: v for k, v in doc.items() if k in fields}
    kwargs["residents"] = tuple(Resident(**r) for r in doc["residents"])
    kwargs["loads"] = tuple(Load(**l) for l in doc["loads"])
    return Plan(**kwargs)


@pytest.mark.parametrize("budget", [128, 256, 384, 512])
def test_plan_json_round_trips(budget):
    plan = plan_for(A, budget)
    doc = json.loads(plan.to_json())
    assert PLAN_FIELDS <= set(doc) and doc["format"] == 1
    assert set(doc["residents"][0] if doc["residents"] else {"weight", "offset_bytes", "nbytes"}) == {
        "weight", "offset_bytes", "nbytes"}
    for load in doc["loads"]:
        assert set(load) == {"weight", "start_step", "first_use", "last_use", "release_op", "offset_bytes", "nbytes"}
    assert from_json(plan.to_json()) == plan
    named = json.loads(plan.to_json(A))
    assert PLAN_FIELDS | {"weight_names", "op_modules"} <= set(named)
    assert named["weight_names"] == ["W0", "W1", "W2", "W3"] and named["op_modules"] == ["m0", "m1", "m2", "m3"]
    assert from_json(plan.to_json(A)) == plan


def test_plan_summary_names_the_numbers():
    plan = plan_for(A, 384)
    text = plan.summary(A)
    assert "1 weights resident" in text and "3 streamed" in text and "4 ops" in text and "384 B" in text


def test_real_model_plan_is_checked_and_serialisable(streams):
    from conftest import make_input, make_model

    x = make_input("nested")
    sm = streams(make_model("nested"), 20_000, x)
    assert problems(sm.plan, sm.program) == []
    assert simulate(sm.plan, sm.program) == []
    assert from_json(sm.plan.to_json(sm.program)) == sm.plan
    doc = json.loads(sm.plan.to_json(sm.program))
    assert doc["op_modules"][:2] == ["inp", "shared"] and "blocks.0" in doc["op_modules"]
    assert len(doc["weight_names"]) == len(sm.program.weights)
    # a broken copy of a real plan is refused too
    if sm.plan.loads:
        bad = dataclasses.replace(sm.plan, loads=sm.plan.loads[1:])
        with pytest.raises(PlanInvalid):
            check_plan(bad, sm.program)


def test_a_smaller_ring_places_what_the_whole_arena_did_not():
    """Ring placement is not monotone in the ring's size. In this program (ops nested several deep), the
    whole 648-byte arena finds no placement while a 448-byte ring does: the simple planner must stream
    through that ring rather than refuse a budget that it names as large enough itself."""
    sizes = [129, 1, 1, 1, 1, 129, 1, 65, 1, 193]
    ends = [3, 3, 2, 3, 9, 7, 6, 7, 9, 9]
    prog = program(sizes, [(f"m{i}", (i,), e) for i, e in enumerate(ends)])
    plan = plan_for(prog, 648, granularity=1)
    assert_valid(plan, prog)
    assert plan.loads and plan.total_bytes <= 648


# -- previous_holders against its definition -------------------------------------------------------------------
def holders_by_pairs(loads, alignment: int) -> list[int | None]:
    """The definition, pair by pair: of the earlier loads sharing a byte (each owning its bytes rounded up to
    the alignment), the one released latest (last use, then the op entered first, then the later load)."""
    out = []
    for j, load in enumerate(loads):
        begin, end = load.offset_bytes, load.offset_bytes + -(-load.nbytes // alignment) * alignment
        best = None
        for k in range(j):
            o = loads[k]
            if o.offset_bytes < end and begin < o.offset_bytes + -(-o.nbytes // alignment) * alignment:
                if best is None or (o.last_use, -o.release_op, k) > (loads[best].last_use, -loads[best].release_op, best):
                    best = k
        out.append(best)
    return out


@st.composite
def load_lists(draw):
    """Up to 40 loads anywhere in 2 KiB, overlapping freely (valid plans or not), of 1-500 bytes."""
    loads = []
    for _ in range(draw(st.integers(1, 40))):
        last = draw(st.integers(0, 12))
        loads.append(Load(0, 0, 0, last, draw(st.integers(0, last)), draw(st.integers(0, 31)) * 64,
                          draw(st.integers(1, 500))))
    return loads


@settings(max_examples=300, deadline=None)
@given(load_lists())
def test_previous_holders_is_its_definition(loads):
    from flashmem.plan import previous_holders

    assert previous_holders(loads, 64) == holders_by_pairs(loads, 64)


@st.composite
def region_lists(draw):
    """Up to 30 regions (begin, end, from step, to step, label) anywhere in 2 KiB, spans of -1..12 steps,
    some empty or reversed (a broken plan's)."""
    out = []
    for i in range(draw(st.integers(1, 30))):
        b = draw(st.integers(-2, 31)) * 64
        out.append((b, b + draw(st.integers(0, 8)) * 64, draw(st.integers(-1, 12)), draw(st.integers(-1, 12)), f"r{i}"))
    return out


@settings(max_examples=400, deadline=None)
@given(region_lists())
def test_the_checkers_sweep_finds_every_clash_the_pairs_do(regions):
    from flashmem.check import _shared_while_held

    pairs = any(a[0] < b[1] and b[0] < a[1] and a[2] <= b[3] and b[2] <= a[3]
                for i, a in enumerate(regions) for b in regions[i + 1:])
    if pairs:
        assert _shared_while_held(regions)
    elif all(b < e for b, e, *_ in regions) and all(f <= t for _, _, f, t, _ in regions):
        assert not _shared_while_held(regions)  # and on well-formed regions it says no clash exactly
