"""flashmem.Workload: several models under one budget, each sequence of calls on one plan. Outputs are
bit-identical to each model run alone, whatever the order; the plan prefetches the next model's weights
during the current one's calls; sequences made of traced calls are composed without a new trace; a
failure in one call is that call's result and the others still run; RSS stays within the budget."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import flashmem
from flashmem.run_cpu import peak_rss_bytes, reset_peak_rss, rss_bytes

from conftest import hf_model, model_bytes, out_of

WIDTH = 256


def mlp(seed: int, depth: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU()) for _ in range(depth)]).eval()


def members():
    """Three models of different kinds (an MLP, a Llama and a GPT-2 shape), their inputs and outputs."""
    models = {"mlp": mlp(0), "llama": hf_model("llama", seed=1, hidden_size=128, intermediate_size=256),
              "gpt2": hf_model("gpt2", seed=2)}
    inputs = {"mlp": torch.randn(4, WIDTH, generator=torch.Generator().manual_seed(3)),
              "llama": torch.arange(10).unsqueeze(0) % 100,
              "gpt2": (torch.arange(7).unsqueeze(0) * 5) % 100}
    with torch.no_grad():
        refs = {k: out_of(m(inputs[k])).clone() for k, m in models.items()}
    return models, inputs, refs


def workload(fraction: float = 0.35, **kwargs):
    models, inputs, refs = members()
    nbytes = sum(model_bytes(m) for m in models.values())
    wl = flashmem.Workload(models, budget=int(nbytes * fraction),
                           examples={k: ((x,), {}) for k, x in inputs.items()}, **kwargs)
    return wl, inputs, refs, nbytes


def calls_of(order, inputs):
    return [(k, (inputs[k],), {}) for k in order]


def check(results, order, refs):
    assert [r.name for r in results] == list(order)
    for r in results:
        assert r.error is None, r.error
        assert torch.equal(out_of(r.output), refs[r.name]), r.name
        assert r.end_s >= r.start_s


@pytest.mark.parametrize("cpu_reads", ["auto", "map", "copy"])
def test_any_order_is_exact_on_one_plan_within_the_budget(cpu_reads):
    fraction = 0.6 if cpu_reads == "map" else 0.35  # pages of the small tensors cost more when mapped
    wl, inputs, refs, nbytes = workload(fraction, cpu_reads=cpu_reads)
    try:
        for order in (["mlp", "llama", "gpt2"], ["gpt2", "gpt2", "mlp", "llama", "mlp"], ["llama"]):
            check(wl.run(calls_of(order, inputs)), order, refs)
            plan, program = wl.plan, wl.streamed.program
            assert plan.total_bytes <= wl.streamed.budget_bytes
            if len(set(order)) > 1:
                assert plan.loads, "the models must stream at this budget"
            assert plan.n_ops == len(program.ops)
    finally:
        wl.close()


def test_the_plan_loads_the_next_models_weights_during_the_current_call():
    """One plan across the sequence: some load for a call's first ops starts during the call before it."""
    wl, inputs, refs, _ = workload(0.35)
    try:
        order = ["llama", "mlp", "gpt2"]
        check(wl.run(calls_of(order, inputs)), order, refs)
        program, plan = wl.streamed.program, wl.plan
        starts = [0]
        for k in range(1, len(program.ops)):
            if program.ops[k].module.split(".")[1] != program.ops[k - 1].module.split(".")[1]:
                starts.append(k)
        assert len(starts) == 3
        early = [load for load in plan.loads for s in starts[1:] if load.first_use >= s > load.start_step]
        assert early, "no load of a later call starts before that call"
    finally:
        wl.close()


def test_use_solver_plans_a_sequence_across_models_and_stays_exact():
    """`Workload.use_solver`: the sequence is profiled and planned by the solver; the plan passes the checker,
    fits the budget and is the one later runs of that sequence use, and every output stays bit-identical.
    The queue spec's "planner": "solver" takes the same path in `run_queue`."""
    from flashmem.check import find_problems
    from flashmem.solve import SolverSettings

    wl, inputs, refs, _ = workload(0.35)
    try:
        order = ["llama", "mlp", "gpt2", "mlp"]
        calls = calls_of(order, inputs)
        check(wl.run(calls), order, refs)
        simple = wl.plan
        assert simple.status == "simple" and simple.loads
        plan = wl.use_solver(calls, settings=SolverSettings(time_limit_s=2.0))
        assert plan.status in ("optimal", "feasible", "fallback") and plan.predicted_s > 0
        assert plan.bound_s is None or plan.bound_s <= plan.predicted_s * (1 + 1e-9)
        assert list(find_problems(plan, wl.streamed.program)) == []
        assert plan.total_bytes <= wl.streamed.budget_bytes
        check(wl.run(calls), order, refs)
        assert wl.plan == plan  # the sequence runs on the solver's plan from now on
        with pytest.raises(flashmem.FlashmemError, match="no model named 'vit'"):
            wl.use_solver([("vit", (inputs["mlp"],), {})])
    finally:
        wl.close()


def test_traced_calls_compose_new_sequences_without_a_trace(monkeypatch):
    wl, inputs, refs, _ = workload(0.35)
    try:
        traces = []
        original = wl.streamed._start_trace
        monkeypatch.setattr(wl.streamed, "_start_trace", lambda sig: (traces.append(sig), original(sig)))
        order = ["gpt2", "mlp", "gpt2", "llama", "llama"]
        check(wl.run(calls_of(order, inputs)), order, refs)
        assert traces == [], "a sequence of traced calls was traced again"
        longer = torch.arange(13).unsqueeze(0) % 100  # a new input signature for llama: traced once
        with torch.no_grad():
            ref_longer = out_of(hf_model("llama", seed=1, hidden_size=128, intermediate_size=256)(longer))
        results = wl.run([("llama", (longer,), {}), ("mlp", (inputs["mlp"],), {})])
        assert len(traces) == 1 and all(r.error is None for r in results)
        assert torch.equal(out_of(results[0].output), ref_longer)
        assert torch.equal(out_of(results[1].output), refs["mlp"])
        results = wl.run([("mlp", (inputs["mlp"],), {}), ("llama", (longer,), {})])
        assert len(traces) == 1, "the new signature's call was traced once, then composed"
        assert torch.equal(out_of(results[0].output), refs["mlp"])
        assert torch.equal(out_of(results[1].output), ref_longer)
    finally:
        wl.close()


@pytest.mark.parametrize("cpu_reads", ["copy", "map"])
def test_a_failed_read_fails_that_call_and_the_queue_goes_on(monkeypatch, cpu_reads):
    wl, inputs, refs, _ = workload(0.6, cpu_reads=cpu_reads)
    try:
        order = ["mlp", "llama", "gpt2", "mlp"]
        check(wl.run(calls_of(order, inputs)), order, refs)  # plans this sequence
        mover = wl.streamed._executor.mover
        program, plan = wl.streamed.program, wl.plan
        # fail the first load used by the second call (llama)
        llama_ops = [op.index for op in program.ops if op.module.startswith(f"members.{wl.queue.keys['llama']}.")]
        target = next(j for j, load in enumerate(plan.loads) if load.first_use >= llama_ops[0])
        original = type(mover)._load
        state = {"armed": True}

        def failing(self, j):
            if self is mover and j == target and state["armed"]:
                state["armed"] = False
                raise OSError(5, "Input/output error (injected)")
            return original(self, j)

        monkeypatch.setattr(type(mover), "_load", failing)
        results = wl.run(calls_of(order, inputs))
        assert [r.name for r in results] == order
        failed = [r for r in results if r.error is not None]
        assert len(failed) == 1 and failed[0].name == "llama"
        assert isinstance(failed[0].error, flashmem.FlashmemError) and "storage" in str(failed[0].error)
        for r in results:
            if r.error is None:
                assert torch.equal(out_of(r.output), refs[r.name]), r.name
        check(wl.run(calls_of(order, inputs)), order, refs)  # and the whole sequence again
    finally:
        wl.close()


def test_rss_stays_within_the_budget_over_a_sequence():
    """Models of 40 MB in all at a 25% budget, mapped: a sequence of six calls grows RSS by no more than
    the budget plus the largest call's activations."""
    torch.manual_seed(0)
    models = {f"m{i}": nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(3)]).eval() for i in range(3)}
    x = torch.randn(16, 1024)
    with torch.no_grad():
        refs = {k: m(x).clone() for k, m in models.items()}
        gc.collect()
        reset_peak_rss()
        before = rss_bytes()
        models["m0"](x)
        activations = peak_rss_bytes() - before
    nbytes = sum(model_bytes(m) for m in models.values())
    budget = nbytes // 4
    gc.collect()
    base = rss_bytes()
    wl = flashmem.Workload(models, budget=budget, examples={k: ((x,), {}) for k in models})
    try:
        assert wl.streamed.cpu_reads == "map"
        order = ["m2", "m0", "m1", "m1", "m0", "m2"]
        gc.collect()
        start = rss_bytes()
        reset_peak_rss()
        results = wl.run([(k, (x,), {}) for k in order])
        growth = peak_rss_bytes() - start
        for r in results:
            assert torch.equal(r.output, refs[r.name])
        outputs = len(order) * x.numel() * 4
        assert growth <= budget + activations + outputs + 4 * 2**20, (growth, budget)
        assert start - base <= budget + 4 * 2**20  # between sequences only the residents' pages stay
    finally:
        wl.close()


def test_bad_workloads_are_refused_clearly():
    models, inputs, _ = members()
    with pytest.raises(flashmem.FlashmemError, match="examples lacks 'gpt2'"):
        flashmem.Workload(models, "10MiB", examples={k: ((inputs[k],), {}) for k in ("mlp", "llama")})
    wl, inputs, _, _ = workload(0.5)
    try:
        with pytest.raises(flashmem.FlashmemError, match="no model named 'bert'"):
            wl.run([("bert", (inputs["mlp"],), {})])
    finally:
        wl.close()


def test_split_bytes_applies_to_every_model():
    # The MLP's layers are 256 x 256 fp32 (256 KiB); Llama's and GPT-2's embedding tables and heads 512 x 128
    # and 512 x 64 (256 and 128 KiB). At 32 KiB the linear layers stream in blocks and the tables are read by
    # rows; outputs stay within the fp32 bound. (The Workload holds its models as members.m0, m1, m2.)
    wl, inputs, refs, nbytes = workload(0.25, split_bytes="32KiB")
    try:
        split = wl.streamed.split
        assert "members.m0.0.0" in split.linears  # the MLP's first layer
        assert "members.m1.lm_head" in split.linears and "members.m1.model.embed_tokens" in split.embeddings
        assert "members.m2.transformer.wte" in split.embeddings  # GPT-2's head is tied to it: blocks of the table
        order = ["gpt2", "mlp", "llama", "gpt2"]
        results = wl.run(calls_of(order, inputs))
        for r in results:
            assert r.error is None, r.error
            ref = refs[r.name]
            assert (out_of(r.output) - ref).abs().max().item() <= 1e-5 * ref.abs().max().item(), r.name
        assert wl.plan.total_bytes <= wl.streamed.budget_bytes
        assert max(w.nbytes for w in wl.streamed.program.weights if ".parts." in w.name) <= 32 * 2**10
    finally:
        wl.close()


def test_plan_summary_splits_the_arena_and_sorts_copies_by_size():
    """`queue.plan_summary`: the arena is residents plus ring, and on CUDA each copy (a group of loads that
    move together) falls in exactly one size class, its bytes counted there (the mover's groups are set by
    hand, as the CUDA mover makes them: (destination view, source view, waits, loads))."""
    from types import SimpleNamespace

    from flashmem.queue import plan_summary
    from flashmem.run_cuda import CudaMover, StagedCudaMover

    KiB, MiB = 2**10, 2**20
    plan = SimpleNamespace(arena_bytes=100 * MiB, resident_bytes=60 * MiB, activation_bytes=8 * MiB,
                           fixed_bytes=MiB, residents=(1, 2, 3), loads=tuple(range(7)), status="simple")
    sizes = [4 * KiB, 64 * KiB, 900 * KiB, MiB, 5 * MiB, 16 * MiB, 16 * MiB + 1]  # one group per load here
    mover = CudaMover.__new__(CudaMover)  # no GPU needed: copy_sizes reads the groups
    mover.groups = {step: [(torch.empty(n, dtype=torch.uint8, device="meta"), None, (), (step,))]
                    for step, n in reversed(list(enumerate(sizes)))}
    assert mover.copy_sizes() == sizes  # in issue order
    wl = SimpleNamespace(plan=plan, streamed=SimpleNamespace(_executor=SimpleNamespace(mover=mover)))
    s = plan_summary(wl)
    assert (s["ring_bytes"], s["residents"], s["loads"], s["copies"]) == (40 * MiB, 3, 7, 7)
    assert s["status"] == "simple" and "note" not in s  # the solver's plans add their tier and prediction
    assert list(s["copy_sizes"].values()) == [(1, 4 * KiB), (2, 64 * KiB + 900 * KiB), (1, MiB), (1, 5 * MiB),
                                              (2, 32 * MiB + 1)]
    assert list(s["copy_sizes"]) == ["<64.00 KiB", "<1.00 MiB", "<4.00 MiB", "<16.00 MiB", ">=16.00 MiB"]
    staged = StagedCudaMover.__new__(StagedCudaMover)  # with a host budget: load by load
    staged.plan = SimpleNamespace(loads=tuple(SimpleNamespace(nbytes=n) for n in (3, 5)))
    wl.streamed._executor.mover = staged
    assert plan_summary(wl)["copies"] == 2
    del wl.streamed._executor.mover  # the CPU's movers read or map load by load: no copies to count
    assert "copies" not in plan_summary(wl)
