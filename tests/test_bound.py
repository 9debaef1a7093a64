"""The latency bound (`bound.latency_bound`): optima of the relaxation worked out by hand, and the bound
below every plan's predicted latency (the simple plan, the ablation baseline, the solver's) on random
programs, some with the link slowed beside compute (`link_busy_factor`)."""
from __future__ import annotations

import dataclasses

import pytest

from flashmem import solve
from flashmem.bound import BoundNotSolved, latency_bound
from flashmem.check import find_problems
from flashmem.costs import simulate
from flashmem.errors import BudgetTooSmall, FlashmemError
from flashmem.plan import next_layer_plan

from test_solve import ALIGN, MS, U, A, B, H, H_BUDGET, H_COSTS, chain, cost_model, random_case, simple_for, solve_for


def bound(prog, costs, arena, **kw):
    return latency_bound(prog, costs, arena, ALIGN, **kw)


def test_everything_resident_is_the_compute():
    costs = cost_model([1, 2, 3, 4], bytes_per_ms=100)
    b = bound(A, costs, 8 * U)
    assert b.latency_s == pytest.approx(10 * MS) and b.link_s == 0
    assert b.resident_share == (1.0, 1.0, 1.0, 1.0)


def test_link_bound_with_fractional_residents():
    # A (four 100 B weights, 2 u each in the arena) in 4 u with no compute: every byte that streams moves
    # while ops wait, so the bound is the streamed bytes over 100 B/ms. With resident shares r_i and S their
    # sum, op k's interval holds S + (1 - r_k) units of two: S - r_k <= 1 for every k, so S <= 1 + S / 4,
    # S <= 4 / 3, and (4 - 4 / 3) x 100 B at 100 B/ms = 8/3 ms. The best whole plan (one resident, three
    # just in time) takes 3 ms, and the solver finds it.
    costs = cost_model([0, 0, 0, 0], bytes_per_ms=100)
    b = bound(A, costs, 4 * U)
    assert b.latency_s == pytest.approx(8 / 3 * MS, rel=1e-6)
    assert sum(b.resident_share) == pytest.approx(4 / 3, rel=1e-6)
    plan = solve_for(A, costs, 4 * U)
    assert plan.predicted_s == pytest.approx(3 * MS) and plan.bound_s == pytest.approx(b.latency_s)


def test_compute_bound_hand_case_is_tight():
    # test_solve's program H at 21 u: the hand optimum (W0 resident, every load hidden behind op 1's 20 ms)
    # takes 32 ms, the compute alone, so the relaxation can do no better and no worse.
    b = bound(H, H_COSTS, H_BUDGET)
    assert b.latency_s == pytest.approx(32 * MS, rel=1e-6) and b.compute_s == pytest.approx(32 * MS)
    assert solve_for(H, H_COSTS, H_BUDGET).predicted_s == pytest.approx(b.latency_s, rel=1e-6)


def test_a_slowdown_beside_the_link_raises_the_bound():
    # Three 1 u weights, ops of 2, 0 and 0 ms, 1 u per ms, a 2 u arena. Without slowdowns: W0 resident, W1
    # arriving during op 0's 2 ms, W2 in a 1 ms wait before op 2 (op 1 releases W1 first): 3 ms. With op 0
    # 3x slower beside the link, W1's 1 ms beside it would cost 2 ms more: the relaxation's optimum splits
    # the weights (shares 1/2) at 3.5 ms, still below the simple plan's simulated 6 ms.
    prog = chain([U, U, U])
    plain = bound(prog, cost_model([2, 0, 0], bytes_per_ms=U), 2 * U)
    assert plain.latency_s == pytest.approx(3 * MS, rel=1e-6) and plain.resident_share[0] == pytest.approx(1.0)
    slowed_costs = cost_model([2, 0, 0], [3.0, 1.0, 1.0], bytes_per_ms=U)
    slowed = bound(prog, slowed_costs, 2 * U)
    assert slowed.latency_s == pytest.approx(3.5 * MS, rel=1e-6)
    assert slowed.latency_s <= simulate(simple_for(prog, 2 * U), slowed_costs).total_s == pytest.approx(6 * MS)


def test_a_link_slowed_by_compute_raises_the_bound():
    # Weights of 2, 1, 1 and 2 u for ops of 0, 4, 0 and 0 ms, a 2 u arena, 1 u per ms idle. W0 and W3 fill
    # the arena, so nothing stays resident and nothing moves beside ops 0, 2 and 3 (they do not compute):
    # 6 u cross the link, and only beside op 1 can any of it hide, at most 1 u (beside W1). At the full rate
    # beside compute 1 u fits in op 1's 4 ms: 5 ms of waits + 4 = 9 ms. At 1/8 of it, 0.5 u: 9.5 ms. The
    # simple plan does exactly that (W2 beside op 1, W3 after op 2), so the bound is tight there:
    #   W0 [0, 2]; W1 [2, 3]; op 1 [3, 7] with W2's first 0.5 u beside it; W2 done at 7.5; W3 [7.5, 9.5].
    prog = chain([2 * U, U, U, 2 * U])
    costs = cost_model([0, 4, 0, 0], bytes_per_ms=U)
    slowed = dataclasses.replace(costs, link_busy_factor=0.125)
    assert bound(prog, costs, 2 * U).latency_s == pytest.approx(9 * MS, rel=1e-6)
    assert bound(prog, slowed, 2 * U).latency_s == pytest.approx(9.5 * MS, rel=1e-6)
    tl = simulate(simple_for(prog, 2 * U), slowed)
    assert [t / MS for t in tl.load_end_s] == pytest.approx([2, 3, 7.5, 9.5])
    assert tl.total_s == pytest.approx(9.5 * MS)


def test_the_wait_on_the_copy_stream_comes_after_a_steps_own_loads():
    # Two 1 u weights for ops of 0 ms in a 1 u arena, 1 u per ms: both stream, each after the op before it
    # released the arena, 2 ms of loads. A step that uses a load first then waits wait_s (0.5 ms) for the
    # copy stream, after its own load arrived, so each op's interval is 1.5 ms: 3 ms, as `simulate` has it.
    prog = chain([U, U])
    costs = dataclasses.replace(cost_model([0, 0], bytes_per_ms=U), wait_s=0.5 * MS)
    assert bound(prog, cost_model([0, 0], bytes_per_ms=U), U).latency_s == pytest.approx(2 * MS, rel=1e-6)
    assert bound(prog, costs, U).latency_s == pytest.approx(3 * MS, rel=1e-6)
    assert simulate(simple_for(prog, U), costs).total_s == pytest.approx(3 * MS)
    # In 1.5 u half of each weight may stay (op 0 holds W0's 1 u and W1's resident half). Each op waits for
    # its other half, 0.5 ms, then pays half a wait_s, 0.25 ms: 1.5 ms.
    mid = bound(prog, costs, 3 * U // 2)
    assert mid.latency_s == pytest.approx(1.5 * MS, rel=1e-6)
    assert mid.resident_share == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize("arena", [5 * U, 6 * U, 7 * U])
def test_container_runs_release_before_the_next_op_waits(arena):
    # B: a container op holds W0 (256 B in the arena) around two children that use W1 and W2 (64 B each).
    # In 5 u, W2's load can only move after W1's op released it: the relaxation must let op 2 wait with
    # op 1's run gone (W0 + W2 = 5 u), or it would call a plan infeasible that the simple planner makes.
    costs = cost_model([1, 1, 1, 1], bytes_per_ms=64)
    b = bound(B, costs, arena)
    simple = simple_for(B, arena)
    assert b.compute_s == pytest.approx(4 * MS)
    assert b.compute_s - 1e-12 <= b.latency_s <= simulate(simple, costs).total_s * (1 + 1e-6)


def test_a_window_only_tightens():
    # A window limits how early a load may arrive: the relaxation loses freedom, so its optimum can only rise.
    # Here (a case found by search; 1 u moves per ms) it does: exact 31 ms, with a window of one step 32 ms.
    prog = chain([2 * U, 1 * U, 6 * U, 2 * U, 4 * U, 1 * U])
    costs = cost_model([0, 10, 0, 10, 0, 10], bytes_per_ms=U)
    exact, windowed = bound(prog, costs, 10 * U), bound(prog, costs, 10 * U, window_steps=1)
    assert exact.latency_s == pytest.approx(31 * MS, rel=1e-6)
    assert windowed.latency_s == pytest.approx(32 * MS, rel=1e-6)


def test_costs_of_another_program_are_refused():
    with pytest.raises(FlashmemError, match="the costs have 3 steps but the program has 4 ops"):
        bound(A, cost_model([1, 1, 1]), 4 * U)


@pytest.mark.parametrize("seed", range(40))
def test_random_programs_bound_every_plan(seed):
    prog, costs, budget = random_case(seed)
    avail = budget - prog.activation_bytes - prog.fixed_bytes
    try:
        simple = simple_for(prog, budget)
    except BudgetTooSmall:
        return
    b = bound(prog, costs, avail)
    assert costs.compute_s * (1 - 1e-6) <= b.latency_s <= simulate(simple, costs).total_s * (1 + 1e-6) + 1e-12
    assert all(0.0 <= s <= 1.0 + 1e-9 for s in b.resident_share)
    try:
        baseline = next_layer_plan(prog, budget_bytes=budget, device="cpu", alignment=ALIGN,
                                   activation_bytes=prog.activation_bytes)
    except BudgetTooSmall:
        return
    assert b.latency_s <= simulate(baseline, costs).total_s * (1 + 1e-6) + 1e-12
    # the factor is part of the bound: with the link at full rate beside compute it can only fall
    if costs.link_busy_factor < 1.0:
        unslowed = dataclasses.replace(costs, link_busy_factor=1.0)
        assert bound(prog, unslowed, avail).latency_s <= b.latency_s + 1e-12
    # the wait on the copy stream is part of the bound: it can only raise it, and stays below every plan
    waited = dataclasses.replace(costs, wait_s=costs.compute_s / max(1, len(costs.steps)) + 1e-4)
    w = bound(prog, waited, avail)
    assert b.latency_s - 1e-12 <= w.latency_s <= simulate(simple, waited).total_s * (1 + 1e-6) + 1e-12
    assert w.latency_s <= simulate(baseline, waited).total_s * (1 + 1e-6) + 1e-12
    assert w.latency_s <= solve_for(prog, waited, budget).predicted_s * (1 + 1e-6) + 1e-12
    # slower links only raise it
    slower = dataclasses.replace(costs, link=dataclasses.replace(costs.link, bandwidth_bytes_per_s=costs.link.bandwidth_bytes_per_s / 2))
    assert bound(prog, slower, avail).latency_s >= b.latency_s - 1e-12


def test_a_time_limited_relaxation_that_cannot_finish_says_so():
    # 400 ops, each its own 2 u weight, streamed through 8 u with a 192-step window: some 77k arrival
    # variables, far more than the simplex finishes in a millisecond. Without the limit it solves.
    prog = chain([128] * 400)
    costs = cost_model([0.01] * 400)
    with pytest.raises(BoundNotSolved, match=r"relaxation of 400 steps did not reach its optimum in 0.0 s"):
        latency_bound(prog, costs, 8 * U, ALIGN, window_steps=192, time_limit_s=1e-3)
    assert latency_bound(prog, costs, 8 * U, ALIGN, window_steps=8).latency_s > 0


def test_the_solver_skips_a_relaxation_too_large_to_build(monkeypatch):
    # A's four ops treated as a long program (past EXACT_BOUND_OPS) whose 4 runs x 4 steps exceed the
    # relaxation's size limit: no rounded candidates and no bound, said in the note; CP-SAT still plans.
    monkeypatch.setattr(solve, "EXACT_BOUND_OPS", 2)
    monkeypatch.setattr(solve, "GUIDE_MAX_TERMS", 10)
    costs = cost_model([0, 0, 0, 0], bytes_per_ms=100)
    plan = solve_for(A, costs, 256)
    assert "relaxation skipped: 4 use runs over 4 steps" in plan.note
    assert plan.bound_s is None and not list(find_problems(plan, A))
    assert plan.predicted_s <= simulate(simple_for(A, 256), costs).total_s
