"""CUDA: bit-exact outputs against the resident model for GPT-Neo- and Llama-shaped fp16 models at budgets
below the model's size; the caching allocator's reserved memory stays within the budget from before
flashmem.stream to after several calls; BudgetTooSmall on CUDA; many calls without growth.

Skipped where torch.cuda.is_available() is False. The models are built on the CPU with a fixed seed (so
every build has the same weights), moved to the GPU in fp16 for the resident reference, then moved back
to the CPU before flashmem.stream, so that the GPU holds only what flashmem puts there.
"""
from __future__ import annotations

import gc

import pytest
import torch

import flashmem
from flashmem.units import fmt_bytes

from conftest import hf_model, model_bytes, out_of, save_folder

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MiB = 2**20
VOCAB = 16384
SEQ = 32


def cuda_config(kind: str) -> dict:
    """About 200 MB in fp16; the largest op (the embedding or the LM head) is 32 MiB."""
    if kind == "neo":  # a global and a local attention layer, three times; lm_head tied to wte
        return dict(vocab_size=VOCAB, max_position_embeddings=256, hidden_size=1024, num_layers=6, num_heads=16,
                    attention_types=[[["global", "local"], 3]], window_size=8)
    if kind == "llama":  # untied head, grouped-query attention
        return dict(vocab_size=VOCAB, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                    num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256)
    raise ValueError(kind)


def build(kind: str):
    """The fp16 model on the CPU (same weights on every call)."""
    return hf_model(kind, seed=0, **cuda_config(kind)).half()


def inputs(n: int = 2, seq: int = SEQ, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g).cuda() for _ in range(n)]


def settle() -> None:
    """Free what the references left cached, so the next measurement sees only flashmem."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module", params=["neo", "llama"])
def case(request):
    kind = request.param
    model = build(kind)
    nbytes = model_bytes(model)
    xs = inputs()
    model.cuda()
    with torch.no_grad():
        refs = [out_of(model(x)).clone() for x in xs]
    assert all(torch.isfinite(r).all() for r in refs)
    model.cpu()
    del model
    settle()
    return dict(kind=kind, nbytes=nbytes, xs=xs, refs=refs)


def stream_below_size(case, fraction: float):
    """Stream a fresh model at `fraction` of its size; where the activation reserve makes that too small,
    at what BudgetTooSmall asks for, which must still be below the model's size."""
    budget = int(fraction * case["nbytes"])
    for _ in range(3):
        try:
            return flashmem.stream(build(case["kind"]), budget, device="cuda", example_inputs=(case["xs"][0],)), budget
        except flashmem.BudgetTooSmall as err:
            budget = err.need_bytes + 2 * MiB
            assert budget < case["nbytes"], f"{case['kind']}: needs {fmt_bytes(budget)} of a {fmt_bytes(case['nbytes'])} model"
            settle()
    raise AssertionError("no budget below the model's size")


def assert_exact(sm, case) -> None:
    """Every input of the case through `sm` gives the resident model's output, bit for bit."""
    for x, ref in zip(case["xs"], case["refs"]):
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)


@pytest.mark.parametrize("fraction", [0.45, 0.7])
def test_cuda_exact(case, fraction):
    sm, budget = stream_below_size(case, fraction)
    try:
        plan = sm.plan
        assert plan.device.startswith("cuda") and plan.total_bytes <= budget < case["nbytes"]
        assert plan.loads and plan.activation_bytes > 0
        for _ in range(2):
            for x, ref in zip(case["xs"], case["refs"]):
                with torch.no_grad():
                    out = out_of(sm(x))
                assert out.device.type == "cuda" and out.dtype == ref.dtype
                assert torch.equal(out, ref)
                del out
        stats = sm.stats
        assert stats.streamed_bytes == plan.streamed_bytes > 0
        assert plan.arena_bytes <= stats.peak_bytes <= budget
        assert stats.stall_s is None  # no op is timed in a plain call (DebugOptions.time_stalls)
        with torch.no_grad():  # an input on the CPU is moved to the device; same signature, same plan
            assert torch.equal(out_of(sm(case["xs"][1].cpu())), case["refs"][1])
        assert len(sm._plans) == 1
    finally:
        sm.close()
        settle()


def test_cuda_copies_alone_overwrite_the_ring_and_calls_stay_exact(case):
    """`CudaMover.copies_alone_s` (the floor bench_queue measures a sequence against) copies every load of
    the plan into the ring between calls, launched in order or replayed as one CUDA graph: the next calls
    still load what they use first and stay exact, and the graph holds no memory past the call."""
    sm, _ = stream_below_size(case, 0.45)
    try:
        x, ref = case["xs"][0], case["refs"][0]
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)
        mover = sm._executor.mover
        assert sum(mover.copy_sizes()) >= sm.plan.streamed_bytes > 0
        assert mover.copies_alone_s(repeats=2) > 0
        reserved = torch.cuda.memory_reserved()
        assert mover.copies_alone_s(repeats=2, graph=True) > 0
        assert torch.cuda.memory_reserved() <= reserved  # copies allocate nothing, inside a graph neither
        assert_exact(sm, case)
    finally:
        sm.close()
        settle()


def returns_before_the_gpu(fn, x) -> bool:
    """Whether `fn(x)` returns while about 0.1 s of GPU work queued ahead of it is still running."""
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    with torch.no_grad():
        out = fn(x)
    returned_early = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    del out
    return returned_early


def test_cuda_host_inputs_may_change_once_the_call_returns(case):
    """A host input reaches the device through flashmem's own pinned copy, without the host waiting for the
    GPU: the call returns while the GPU is still busy wherever the plain model's call does (GPT-Neo's
    attention makes a scalar tensor from host memory in every call, which waits, streamed or not), and the
    caller's tensor (pageable or pinned) may be overwritten at once without changing the output."""
    plain = build(case["kind"]).cuda()
    plain_returns_early = returns_before_the_gpu(plain, case["xs"][1])
    del plain
    settle()
    sm, _ = stream_below_size(case, 0.7)
    try:
        for pin in (False, True):
            x = case["xs"][1].cpu()
            x = x.pin_memory() if pin else x
            torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time queued ahead of the call's copy
            with torch.no_grad():
                out = out_of(sm(x))
            if plain_returns_early:
                assert not torch.cuda.current_stream().query(), "the call waited for the GPU; the plain model's did not"
            x.zero_()  # before the queued work reaches the call's input copy
            torch.cuda.synchronize()
            assert torch.equal(out, case["refs"][1]), f"pinned={pin}"
            del out
        if case["kind"] == "llama":  # its forward never waits: the test must see the call return early
            assert plain_returns_early, "the plain Llama call waited for the GPU: the check above did not run"
    finally:
        sm.close()
        settle()


def test_cuda_reserved_memory_within_budget(case):
    """From before flashmem.stream (trace, plan, arena) to after several calls, the caching allocator's
    reserved memory grows by at most the budget. flashmem resets the peak statistics itself (in the trace
    and at the start of each call), so the peak is read after stream returns and after every call; the
    largest of those readings is the peak over the whole run."""
    budget = int(0.45 * case["nbytes"])
    model = build(case["kind"])
    settle()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    try:
        sm = flashmem.stream(model, budget, device="cuda", example_inputs=(case["xs"][0],))
    except flashmem.BudgetTooSmall as err:
        pytest.fail(f"{fmt_bytes(budget)} (45% of the model) is too small on this GPU: {err}")
    try:
        torch.cuda.synchronize()
        peaks = [torch.cuda.max_memory_reserved()]
        for i in range(6):
            x, ref = case["xs"][i % 2], case["refs"][i % 2]
            with torch.no_grad():
                out = out_of(sm(x))
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_reserved())
            assert torch.equal(out, ref), f"call {i}"
            del out
        growth = max(peaks) - before
        assert growth <= budget, (f"reserved memory grew by {fmt_bytes(growth)} at a budget of {fmt_bytes(budget)} "
                                  f"(peaks after stream and after each call: {[fmt_bytes(p - before) for p in peaks]})")
        assert growth >= sm.plan.arena_bytes  # the arena is on the device: the measurement sees it
        assert sm.plan.total_bytes <= budget
    finally:
        sm.close()
        settle()


FRESH_PROCESS = """
import sys, json, torch, flashmem
sys.path.insert(0, sys.argv[1])
from conftest import hf_model
from test_cuda import build, inputs
model = build(sys.argv[2])
x = inputs(1)[0]
budget = int(sys.argv[3])
torch.cuda.synchronize()
before = torch.cuda.memory_reserved()
with torch.no_grad():
    sm = flashmem.stream(model, budget, device="cuda", example_inputs=(x,))
    for _ in range(3):
        sm(x)
torch.cuda.synchronize()
print(json.dumps(dict(growth=torch.cuda.max_memory_reserved() - before, fixed=sm.plan.fixed_bytes,
                      total=sm.plan.total_bytes)))
"""


@pytest.mark.parametrize("kind", ["neo", "llama"])
def test_cuda_fresh_process_counts_the_math_workspace(kind, tmp_path):
    """In a process whose stream has run no matrix product yet, the cuBLAS workspace (kept by PyTorch for
    good after the first product) is made before the trace and counted in the plan: the reserved memory
    still grows by at most the budget over the trace and three calls."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    budget = int(0.7 * model_bytes(build(kind)))  # 32 MiB of workspace in a 130 MiB budget
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, here, kind, str(budget)], capture_output=True,
                          text=True, timeout=600, cwd=str(Path(here).parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["fixed"] > 0, "the fresh process's workspace was not seen"
    assert got["total"] <= budget
    assert got["growth"] <= budget, f"reserved memory grew by {fmt_bytes(got['growth'])} at {fmt_bytes(budget)}"


def test_cuda_budget_too_small_before_any_work(case):
    model = build(case["kind"])
    params = dict(model.named_parameters())
    settle()
    allocated = torch.cuda.memory_allocated()
    with pytest.raises(flashmem.BudgetTooSmall) as info:
        flashmem.stream(model, "8MiB", device="cuda", example_inputs=(case["xs"][0],))
    err = info.value
    msg = str(err)
    assert err.budget_bytes == 8 * MiB and err.need_bytes >= 32 * MiB  # the 32 MiB embedding
    assert repr(err.op) in msg and fmt_bytes(err.budget_bytes) in msg
    assert f"raise the budget to at least {fmt_bytes(err.need_bytes)}" in msg
    # nothing was done: no device memory taken, the model's weights where they were
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == allocated
    assert dict(model.named_parameters()) == params and all(p.device.type == "cpu" for p in params.values())


def test_cuda_budget_without_room_for_activations(case):
    """A budget that holds the largest op's weights but not the activations as well is refused before
    any streamed call, by the planner, which counts the activations it measured in the trace."""
    from flashmem.streamed import CUDA_ALIGNMENT
    from flashmem.trace import collect_weights

    model = build(case["kind"])
    mw, _ = collect_weights(model, CUDA_ALIGNMENT)
    budget = mw.max_working_bytes + MiB
    with pytest.raises(flashmem.BudgetTooSmall) as info:
        flashmem.stream(model, budget, device="cuda", example_inputs=(case["xs"][0],))
    msg = str(info.value)
    assert "activations" in msg and "raise the budget to at least" in msg
    assert info.value.need_bytes > budget
    settle()


def test_cuda_many_calls_no_growth(case):
    sm, budget = stream_below_size(case, 0.45)
    try:
        allocated = {}
        for i in range(1, 21):
            x, ref = case["xs"][i % 2], case["refs"][i % 2]
            with torch.no_grad():
                out = out_of(sm(x))
            assert torch.equal(out, ref), f"call {i}"
            del out
            if i in (5, 20):
                gc.collect()
                torch.cuda.synchronize()
                allocated[i] = torch.cuda.memory_allocated()
        assert allocated[20] == allocated[5], f"allocated grew by {fmt_bytes(allocated[20] - allocated[5])}"
        assert len(sm._plans) == 1
    finally:
        sm.close()
        settle()


def test_cuda_other_shape_is_planned_again(case):
    model = build(case["kind"])
    short = inputs(1, seq=9, batch=1)[0]
    model.cuda()
    with torch.no_grad():
        ref_short = out_of(model(short)).clone()
    model.cpu()
    settle()
    sm = flashmem.stream(model, int(0.6 * case["nbytes"]), device="cuda", example_inputs=(case["xs"][0],))
    try:
        with torch.no_grad():
            assert torch.equal(out_of(sm(short)), ref_short)
            assert len(sm._plans) == 2
            assert torch.equal(out_of(sm(case["xs"][1])), case["refs"][1])
            assert torch.equal(out_of(sm(short)), ref_short)
        assert len(sm._plans) == 2 and sm.plan.total_bytes <= sm.budget_bytes
    finally:
        sm.close()
        settle()


def llama_folder_refs(folder, xs) -> tuple[list[torch.Tensor], int]:
    """The Llama model saved to `folder`, and its outputs for `xs` with transformers' load of that folder
    wholly on the GPU; returns them with the model's bytes (the GPU is empty again after)."""
    from transformers import LlamaForCausalLM

    save_folder(build("llama"), folder)
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float16).cuda().eval()
    with torch.no_grad():
        refs = [out_of(model(x)).clone() for x in xs]
    nbytes = model_bytes(model)
    del model
    settle()
    return refs, nbytes


def test_cuda_from_pretrained(tmp_path):
    """A folder read once into pinned host memory, streamed into the GPU below the model's size, exact
    against the same folder loaded by transformers with every weight on the GPU."""
    xs = inputs()
    refs, nbytes = llama_folder_refs(tmp_path, xs)
    budget = int(0.45 * nbytes)
    sm = flashmem.from_pretrained(tmp_path, budget, device="cuda", example_inputs=(xs[0],))
    try:
        assert sm.plan.loads and sm.plan.total_bytes <= budget
        for x, ref in zip(xs, refs):
            with torch.no_grad():
                assert torch.equal(out_of(sm(x)), ref)
    finally:
        sm.close()
        settle()


@pytest.mark.parametrize("debug", [None, flashmem.DebugOptions(poison=True, slow_copy_s=0.0002)])
def test_cuda_host_budget_streams_from_storage_exactly(tmp_path, debug):
    """With a host budget the weights stay in the folder's files: each call reads what it streams through a
    pinned staging ring of that size (which is all the store holds on the host), exact against transformers
    with every weight on the GPU, over several calls and two input shapes, with poisoned releases; the
    device's reserved memory grows by at most the budget, and the host's RSS by far less than the model."""
    from flashmem.demo import rss
    from flashmem.store import StagedStore

    xs = inputs() + inputs(1, seq=SEQ + 8)
    refs, nbytes = llama_folder_refs(tmp_path, xs)
    budget, host_budget = int(0.45 * nbytes), 80 * MiB  # the largest weight is 32 MiB
    rss_before = rss("VmRSS")
    before = torch.cuda.memory_reserved()
    sm = flashmem.from_pretrained(tmp_path, budget, device="cuda", example_inputs=(xs[0],),
                                  host_budget=host_budget, debug=debug)
    try:
        assert isinstance(sm._store, StagedStore) and sm._store.ring.numel() == host_budget
        assert sm.plan.loads and sm.plan.total_bytes <= budget
        for round_ in range(3):
            for x, ref in zip(xs, refs):
                with torch.no_grad():
                    assert torch.equal(out_of(sm(x)), ref)
                if round_:  # (the first call of the new shape traces it: no streamed call, no stats)
                    assert sm.stats.streamed_bytes > 0
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_reserved() - before <= budget
        grown = rss("VmRSS") - rss_before
        assert grown < host_budget + (nbytes - host_budget) // 2, (fmt_bytes(grown), fmt_bytes(nbytes))
    finally:
        sm.close()
        settle()


def test_cuda_host_budget_read_failure_then_exact(monkeypatch):
    """A storage read that fails in the middle of a host-budget call surfaces in the caller as a
    FlashmemError; the next calls are exact. A host budget below the largest weight is refused first."""
    from flashmem.store import StagedStore

    model = build("llama")
    x = inputs(1)[0]
    model.cuda()
    with torch.no_grad():
        ref = out_of(model(x)).clone()
    model.cpu()
    settle()
    with pytest.raises(flashmem.BudgetTooSmall, match="staging ring must hold the largest weight"):
        flashmem.stream(build("llama"), int(0.45 * model_bytes(model)), device="cuda", example_inputs=(x,),
                        host_budget=16 * MiB)
    sm = flashmem.stream(model, int(0.45 * model_bytes(model)), device="cuda", example_inputs=(x,),
                         host_budget=64 * MiB)
    try:
        real = StagedStore.read_stage
        calls = {"n": 0}

        def flaky(self, weight, ring_offset):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(5, "Input/output error (injected)")
            return real(self, weight, ring_offset)

        monkeypatch.setattr(StagedStore, "read_stage", flaky)
        with pytest.raises(flashmem.FlashmemError, match="injected"), torch.no_grad():
            sm(x)
        for _ in range(2):
            with torch.no_grad():
                assert torch.equal(out_of(sm(x)), ref)
        assert calls["n"] > 5
    finally:
        sm.close()
        settle()


def test_cuda_poisoned_and_slow_copies_stay_exact(case):
    """Released arena bytes are filled with 0xFF (NaN) on the compute stream and every copy is held back on
    the copy stream: a missing event wait would compute on NaN or on the previous weight. Every op's waits
    are timed too (time_stalls): held-back copies make compute wait."""
    budget = int(0.45 * case["nbytes"])
    debug = flashmem.DebugOptions(poison=True, slow_copy_s=0.0002, time_stalls=True)
    for _ in range(3):
        try:
            sm = flashmem.stream(build(case["kind"]), budget, device="cuda", example_inputs=(case["xs"][0],),
                                 debug=debug)
            break
        except flashmem.BudgetTooSmall as err:
            budget = err.need_bytes + 2 * MiB
            settle()
    try:
        assert sm.plan.loads
        assert_exact(sm, case)
        assert 0 < sm.stats.stall_s <= sm.stats.wall_s
    finally:
        sm.close()
        settle()


def test_cuda_soak_thousand_calls_of_varying_shapes(capsys):
    """1,000 calls of four input shapes on one StreamedModel: outputs exact (checked every 50th call and
    at the end), and from call 100 to call 1,000 no growth of device memory (allocated and reserved),
    pinned host memory, RSS or threads. The figures are printed (run with -s to see them)."""
    import threading

    from flashmem.run_cpu import rss_bytes

    lengths = (8, 32, 17, 24)
    model = build("llama")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(0, VOCAB, (1, n), generator=g).cuda() for n in lengths]
    model.cuda()
    with torch.no_grad():
        refs = [out_of(model(x)).clone() for x in xs]
    nbytes = model_bytes(model)
    model.cpu()
    settle()
    threads0 = threading.active_count()
    pinned = getattr(torch.cuda.memory, "host_memory_stats", None)
    sm = flashmem.stream(model, int(0.5 * nbytes), device="cuda", example_inputs=(xs[0],))
    marks = {}
    try:
        with torch.no_grad():
            for i in range(1000):
                k = i % len(xs)
                out = out_of(sm(xs[k]))
                if i % 50 == 0 or i >= 996:
                    assert torch.equal(out, refs[k]), f"call {i}"
                del out
                if i in (99, 999):
                    gc.collect()
                    torch.cuda.synchronize()
                    marks[i] = dict(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                                    rss=rss_bytes(), threads=threading.active_count(),
                                    pinned=pinned()["allocated_bytes.current"] if pinned else 0)
        assert len(sm._plans) == len(lengths)
    finally:
        sm.close()
        settle()
    growth = {key: marks[999][key] - marks[99][key] for key in marks[99]}
    with capsys.disabled():
        print(f"\nCUDA soak, 1,000 calls, growth from call 100 to 1,000: {growth}; threads {threads0} before, "
              f"{marks[999]['threads']} during")
    assert growth["allocated"] == 0 and growth["reserved"] == 0 and growth["pinned"] == 0
    assert growth["rss"] <= 8 * MiB, f"RSS grew by {fmt_bytes(growth['rss'])}"
    assert growth["threads"] == 0


@pytest.mark.parametrize("name", ["Branchy", "Scaled", "Experts", "EarlyExit"])
def test_cuda_control_flow_off_the_trace_is_exact(name):
    """A call off the traced order completes on demand, exact, and the reserved memory stays within the
    budget (fp32 models of 16 MiB weights, at 60% of their size, or 25% for Experts, plus 8 MiB for
    activations)."""
    import warnings

    import test_control_flow as cf

    width = 2048
    cls = getattr(cf, name)
    torch.manual_seed(0)
    model = cls(width=width).eval()
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(3, width, generator=g) for _ in range(40)]
    with torch.no_grad():
        refs = [model.cuda()(x.cuda()).clone() for x in xs]
    model.cpu()
    settle()
    nbytes = model_bytes(model)
    budget = int((0.25 if name == "Experts" else 0.6) * nbytes) + 8 * MiB  # Experts: one of four runs
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    with torch.no_grad():  # trace the long path (EarlyExit's short one may fit the budget whole)
        example = xs[0] if name == "Experts" else next(x for x in xs if cf.positive(model, x))
    sm = flashmem.stream(model, budget, device="cuda", example_inputs=(example.cuda(),))
    try:
        assert sm.plan.loads
        warned = 0
        for x, ref in zip(xs, refs):
            with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = sm(x.cuda())
            warned += any(issubclass(w.category, flashmem.ControlFlowWarning) for w in caught)
            assert torch.equal(out, ref)
        torch.cuda.synchronize()
        assert warned > 0, "some inputs must leave the traced order"
        assert torch.cuda.max_memory_reserved() - before <= budget
    finally:
        sm.close()
        settle()


def test_cuda_input_too_large_for_the_budget_fails_within_it(case):
    """A new input shape is traced under a cap of the caching allocator: one whose activations do not fit
    beside the weights fails with out-of-memory (and flashmem's note saying why and the fix) without the
    device going past the budget; the StreamedModel then still serves the traced shape exactly."""
    sm, budget = stream_below_size(case, 0.45)
    big = inputs(1, seq=256, batch=64)[0]  # its logits alone are 512 MiB
    try:
        settle()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_reserved() - sm.plan.arena_bytes
        with pytest.raises(torch.OutOfMemoryError) as info:
            with torch.no_grad():
                sm(big)
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "flashmem" in notes and "raise the budget" in notes and fmt_bytes(budget) in notes
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_reserved() - before <= budget
        assert_exact(sm, case)
        assert torch.cuda.get_per_process_memory_fraction() == 1.0  # the cap is lifted
    finally:
        sm.close()
        settle()


@pytest.mark.parametrize("fault", ["oom_between_ops", "error_in_forward", "keyboard_interrupt"])
def test_cuda_fault_in_a_call_then_exact(fault):
    """An out-of-memory error between two streamed ops, an exception in the model's own forward, or a
    KeyboardInterrupt there ends the call in the caller with the allocator's cap lifted at once; the next
    calls are exact and the reserved memory stays within the budget."""
    import test_faults as tf

    width = 2048  # layers of 16 MiB
    x = torch.randn(8, width, generator=torch.Generator().manual_seed(1))
    model = tf.make_stack(width=width).cuda()
    with torch.no_grad():
        ref = model(x.cuda()).clone()
    model.cpu()
    settle()
    budget = int(0.45 * model_bytes(model)) + 4 * MiB
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    sm = flashmem.stream(model, budget, device="cuda", example_inputs=(x.cuda(),))
    try:
        assert sm.plan.loads
        for _ in range(2):
            if fault == "oom_between_ops":
                model.trap.error = tf.oom()
                expected = torch.OutOfMemoryError
            elif fault == "error_in_forward":
                model.error = ValueError("injected")
                expected = ValueError
            else:
                model.error = KeyboardInterrupt()
                expected = KeyboardInterrupt
            with pytest.raises(expected), torch.no_grad():
                sm(x.cuda())
            assert torch.cuda.get_per_process_memory_fraction() == 1.0  # the cap is lifted
            for _ in range(2):
                with torch.no_grad():
                    assert torch.equal(sm(x.cuda()), ref)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_reserved() - before <= budget
    finally:
        sm.close()
        settle()


def test_cuda_workload_of_three_models_is_exact_within_the_budget():
    """A Workload of a Llama, a GPT-Neo and an MLP (fp16) at 45% of their bytes: sequences in several
    orders are exact against each model resident, and the reserved memory grows by no more than the budget."""
    from torch import nn

    models = {"llama": build("llama"), "neo": build("neo")}
    torch.manual_seed(0)
    models["mlp"] = nn.Sequential(*[nn.Linear(2048, 2048) for _ in range(8)]).half().eval()
    xs = {"llama": inputs(1)[0], "neo": inputs(1, seq=16)[0], "mlp": torch.randn(4, 2048).half().cuda()}
    refs = {}
    for name, model in models.items():
        model.cuda()
        with torch.no_grad():
            refs[name] = out_of(model(xs[name])).cpu()
        model.cpu()
    nbytes = sum(model_bytes(m) for m in models.values())
    settle()
    budget = int(0.45 * nbytes)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    wl = flashmem.Workload(models, budget, device="cuda", examples={k: ((x,), {}) for k, x in xs.items()})
    try:
        for order in (["llama", "neo", "mlp"], ["mlp", "mlp", "neo", "llama", "neo"]):
            results = wl.run([(k, (xs[k],), {}) for k in order])
            for r in results:
                assert r.error is None and torch.equal(out_of(r.output), refs[r.name]), r.name
            assert wl.plan.loads and wl.plan.total_bytes <= budget
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_reserved() - before <= budget
    finally:
        wl.close()
        settle()


def test_cuda_activations_of_one_to_ten_mib_are_reserved():
    """A ViT shape: no op holds 10 MiB of weights and its activations are 0.4-1.6 MB, each a request that
    the caching allocator serves from a 20 MiB segment. The trace's scratch must not lend the activations
    the free tail of such a segment (the calls, without it, would then run out of memory under the cap):
    every call is exact and the reserved memory grows by at most the budget."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=4096,
                       image_size=224, patch_size=16)

    def build_vit():
        torch.manual_seed(0)
        return ViTModel(config, add_pooling_layer=False).half().eval()

    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)).half().cuda()
    model = build_vit().cuda()
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state.clone()
    nbytes = model_bytes(model)
    del model
    settle()
    budget = nbytes // 2
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    sm = flashmem.stream(build_vit(), budget, device="cuda", example_kwargs={"pixel_values": pixels})
    try:
        assert sm.plan.loads
        for i in range(3):
            with torch.no_grad():
                out = sm(pixel_values=pixels).last_hidden_state
            assert torch.equal(out, ref), f"call {i}"
            del out
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_reserved() - before
        assert growth <= budget, f"reserved memory grew by {fmt_bytes(growth)} at a budget of {fmt_bytes(budget)}"
    finally:
        sm.close()
        settle()
