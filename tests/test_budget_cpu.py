"""The budget on the CPU: the process's peak RSS while a model folder much larger than the budget is
streamed stays within the budget plus activations; the plan's totals and the reported peak; and the
too-small-budget error, raised before any work, with a message that names the op, both sizes and the fix."""
from __future__ import annotations

import gc

import pytest
import torch

import flashmem
from flashmem.run_cpu import peak_rss_bytes, reset_peak_rss, rss_bytes
from flashmem.units import fmt_bytes

from conftest import hf_model, make_input, make_model, model_bytes, out_of, resident, save_folder

MiB = 2**20
# Besides the arena and the activations, streaming a folder holds the model's skeleton (modules built on
# the meta device, Python objects), the plan, heap fragmentation and code pages touched for the first
# time: about 4 MiB for the model below when freed memory goes back to the system. A full copy of the
# weights would add 160 MiB, a second arena 40 MiB, a weight-sized scratch buffer 16 MiB.
OVERHEAD = 8 * MiB

needs_rss = pytest.mark.skipif(not reset_peak_rss(), reason="/proc/self/clear_refs is not writable here")


@pytest.fixture(scope="module")
def big_gpt2(tmp_path_factory, gpt2_folder):
    """A GPT-2-shaped model of about 160 MiB (fp32, lm_head tied to wte) saved with save_pretrained,
    its resident outputs for two inputs and the activations' RSS growth of a resident call."""
    # warm up the code paths (imports, kernels, the IO thread) on a tiny folder of the same architecture
    with torch.no_grad():
        sm = flashmem.from_pretrained(gpt2_folder, "1MiB")
        sm(torch.arange(8).unsqueeze(0))
        sm.close()
    model = hf_model("gpt2", vocab_size=8192, n_positions=64, n_embd=512, n_layer=12, n_head=8)
    nbytes = model_bytes(model)
    assert 120 * MiB < nbytes < 220 * MiB
    xs = [torch.arange(32).unsqueeze(0) * 7 % 8192, torch.arange(32).flip(0).unsqueeze(0) * 13 % 8192]
    with torch.no_grad():
        refs = [out_of(model(x)) for x in xs]
        gc.collect()
        reset_peak_rss()
        before = rss_bytes()
        out = model(xs[0])
        activations = peak_rss_bytes() - before
        assert torch.equal(out_of(out), refs[0])
        del out
    folder = save_folder(model, tmp_path_factory.mktemp("gpt2-big"))
    del model
    gc.collect()
    return dict(folder=folder, nbytes=nbytes, xs=xs, refs=refs, activations=activations)


def stream_and_measure(big_gpt2, budget: int, calls: int = 3, cpu_reads: str = "map") -> dict:
    """from_pretrained at `budget`, then `calls` calls (checked exact against the resident outputs), with
    the process's RSS measured: before from_pretrained (base), the peak through from_pretrained (the
    trace, the plan, the arena), and before and at the peak of each call. Returns the numbers."""
    xs, refs = big_gpt2["xs"], big_gpt2["refs"]
    gc.collect()
    reset_peak_rss()
    base = rss_bytes()
    sm = flashmem.from_pretrained(big_gpt2["folder"], budget, example_inputs=(xs[0],), cpu_reads=cpu_reads)
    try:
        setup_peak = peak_rss_bytes()
        before, peaks, stats = [], [], []
        for i in range(calls):
            gc.collect()
            before.append(rss_bytes())
            reset_peak_rss()  # the CPU mover resets it again as the call begins
            with torch.no_grad():
                out = out_of(sm(xs[i % 2]))
            peaks.append(peak_rss_bytes())
            assert torch.equal(out, refs[i % 2]), f"call {i}"
            del out
            stats.append(sm.stats)
        return dict(base=base, setup_peak=setup_peak, before=before, peaks=peaks, stats=stats, plan=sm.plan)
    finally:
        sm.close()


@needs_rss
@pytest.mark.parametrize("cpu_reads", ["map", "copy"])
def test_peak_rss_during_calls_stays_within_budget(big_gpt2, cpu_reads):
    budget = big_gpt2["nbytes"] // 4
    activations = big_gpt2["activations"]
    m = stream_and_measure(big_gpt2, budget, cpu_reads=cpu_reads)
    plan = m["plan"]
    assert plan.arena_bytes + plan.fixed_bytes + plan.activation_bytes <= budget
    assert plan.loads and plan.streamed_bytes > big_gpt2["nbytes"] // 2  # most of the model streams
    assert plan.resident_bytes < budget
    for i, (before, peak, stats) in enumerate(zip(m["before"], m["peaks"], m["stats"])):
        growth = peak - before
        # during a streamed call, the process grows by no more than the budget plus activations ...
        assert growth <= budget + activations, f"call {i}: RSS grew by {fmt_bytes(growth)}"
        if cpu_reads == "copy":
            # ... and in fact by about the activations only: the arena is already there, nothing
            # weight-sized is allocated per call
            assert growth <= activations + OVERHEAD, f"call {i}: RSS grew by {fmt_bytes(growth)}"
            held = plan.arena_bytes
        else:
            # ... and in fact by no more than the ring the streamed pages pass through, plus activations:
            # the residents' pages are held from before the call
            ring = plan.arena_bytes - plan.resident_bytes
            assert growth <= ring + activations + OVERHEAD, f"call {i}: RSS grew by {fmt_bytes(growth)}"
            assert growth > ring // 4, f"call {i}: RSS grew by {fmt_bytes(growth)}: were pages brought in?"
            held = plan.resident_bytes
        assert stats is not None and stats.streamed_bytes == plan.streamed_bytes
        assert held <= stats.peak_bytes <= budget + activations + OVERHEAD, fmt_bytes(stats.peak_bytes)


# Run in a fresh interpreter so that what the process allocated and freed before (which decides whether
# freed memory goes back to the system or stays in the heap for reuse) is the same whatever tests ran
# first: it builds the model as a user would (random weights, one resident call), frees it, then streams
# the saved folder.
WHOLE_RUN = r"""
import gc, json, sys
import torch
sys.path[:0] = sys.argv[3].split("|")
import flashmem
from flashmem.run_cpu import peak_rss_bytes, reset_peak_rss, rss_bytes
from conftest import hf_model, out_of

folder, budget = sys.argv[1], int(sys.argv[2])
x = torch.arange(32).unsqueeze(0) * 7 % 8192
model = hf_model("gpt2", vocab_size=8192, n_positions=64, n_embd=512, n_layer=12, n_head=8)
with torch.no_grad():
    ref = out_of(model(x))
    gc.collect(); reset_peak_rss(); r0 = rss_bytes()
    model(x)
    activations = peak_rss_bytes() - r0
del model
gc.collect()
reset_peak_rss()
base = rss_bytes()
sm = flashmem.from_pretrained(folder, budget, example_inputs=(x,))
setup_peak = peak_rss_bytes()
peaks, exact = [], []
for _ in range(3):
    with torch.no_grad():
        out = out_of(sm(x))
    peaks.append(peak_rss_bytes())
    exact.append(bool(torch.equal(out, ref)))
    del out
print(json.dumps(dict(base=base, setup_peak=setup_peak, peaks=peaks, exact=exact, activations=activations,
                      arena=sm.plan.arena_bytes, total=sm.plan.total_bytes)))
"""


@needs_rss
def test_peak_rss_of_a_whole_run_stays_within_budget(big_gpt2):
    """From before from_pretrained to the end of three calls, in a fresh process: the model (4x the
    budget) never sits in RAM, and nothing beside the arena and the activations takes weight-sized memory."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    budget = big_gpt2["nbytes"] // 4
    tests = Path(__file__).parent
    paths = [str(tests.parent / "src"), str(tests)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", WHOLE_RUN, str(big_gpt2["folder"]), str(budget), "|".join(paths)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(m["exact"])
    assert m["total"] <= budget
    growth = max([m["setup_peak"]] + m["peaks"]) - m["base"]
    assert growth >= m["arena"]  # the arena is really touched: the measurement sees it
    # A fresh process's first streamed call sometimes takes about 5 MiB more than usual (seen in a third of
    # runs, with and without the background read-ahead: the runtime's own start-up), so this whole-run bound
    # allows 12 MiB beside the budget and activations; a weight-sized copy of the 160 MiB model still fails it.
    assert growth <= budget + m["activations"] + 12 * MiB, (
        f"peak RSS grew by {fmt_bytes(growth)} for a {fmt_bytes(big_gpt2['nbytes'])} model at a "
        f"{fmt_bytes(budget)} budget (activations {fmt_bytes(m['activations'])}); the setup alone "
        f"{fmt_bytes(m['setup_peak'] - m['base'])}")


@needs_rss
def test_whole_model_budget_is_all_resident_and_exact(big_gpt2):
    """The other end: a budget above the model's size keeps every weight resident, streams nothing."""
    sm = flashmem.from_pretrained(big_gpt2["folder"], big_gpt2["nbytes"] + MiB, example_inputs=(big_gpt2["xs"][0],))
    try:
        assert sm.plan.loads == () and sm.plan.streamed_bytes == 0
        with torch.no_grad():
            assert torch.equal(out_of(sm(big_gpt2["xs"][1])), big_gpt2["refs"][1])
        assert sm.stats.streamed_bytes == 0
    finally:
        sm.close()


# -- BudgetTooSmall ------------------------------------------------------------------------------------------
def check_message(err: flashmem.BudgetTooSmall) -> str:
    msg = str(err)
    assert isinstance(err, flashmem.FlashmemError)
    assert err.need_bytes > err.budget_bytes > 0
    assert err.op and repr(err.op) in msg  # names the op
    assert fmt_bytes(err.budget_bytes) in msg  # both numbers, in human units
    assert f"raise the budget to at least {fmt_bytes(err.need_bytes)}" in msg  # and the fix
    assert "budget is" in msg or "budget less" in msg
    return msg


@pytest.mark.parametrize("kind", ["gpt2", "llama", "cnn"])
def test_budget_too_small_before_any_work(kind):
    model = make_model(kind)
    x = make_input(kind)
    ref = resident(model, x)
    params = {name: p for name, p in model.named_parameters()}
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(flashmem.BudgetTooSmall) as info:
        flashmem.stream(model, "1KiB", example_inputs=(x,))
    handle.remove()
    msg = check_message(info.value)
    assert info.value.budget_bytes == 1024 and "1.00 KiB" in msg
    # the largest op of the model: the embedding for the language models, the second conv for the CNN
    assert info.value.op == {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "cnn": "conv2"}[kind]
    assert fmt_bytes(info.value.need_bytes) in msg
    # before any work: no forward ran, the weights are where they were, the model still computes the same
    assert calls == []
    assert {name: p for name, p in model.named_parameters()} == params
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(resident(model, x), ref)
    # one byte below what it asks for still fails; what it asks for is enough to plan
    with pytest.raises(flashmem.BudgetTooSmall):
        flashmem.stream(model, info.value.need_bytes - 1, example_inputs=(x,))
    assert torch.equal(resident(model, x), ref)



@pytest.mark.parametrize("kind", ["gpt2", "llama", "cnn"])
def test_the_smallest_budget_runs_exactly(kind):
    """`minimum_budget_bytes` of a streamed model is a budget the model then streams in, exactly, with the
    arena within it; the largest op's need (BudgetTooSmall at 1 KiB) is no more than it."""
    x = make_input(kind)
    ref = resident(make_model(kind), x)
    sm = flashmem.stream(make_model(kind), int(model_bytes(make_model(kind)) * 0.6) + 2**20, example_inputs=(x,))
    least = sm.minimum_budget_bytes
    sm.close()
    with pytest.raises(flashmem.BudgetTooSmall) as info:
        flashmem.stream(make_model(kind), "1KiB", example_inputs=(x,))
    assert info.value.need_bytes <= least < model_bytes(make_model(kind))
    sm = flashmem.stream(make_model(kind), least, example_inputs=(x,))
    try:
        assert sm.plan.loads and sm.plan.arena_bytes <= least  # streams, within the budget
        assert sm.minimum_budget_bytes == least
        assert torch.equal(out_of(sm(x)), ref)
    finally:
        sm.close()

def test_budget_too_small_from_a_folder_reads_no_weights(llama_folder, monkeypatch):
    from flashmem import store

    reads = []
    original = store.FileStore.read_into_view
    monkeypatch.setattr(store.FileStore, "read_into_view", lambda self, w, dst: (reads.append(w), original(self, w, dst)))
    with pytest.raises(flashmem.BudgetTooSmall) as info:
        flashmem.from_pretrained(llama_folder, "10KiB")
    check_message(info.value)
    assert info.value.op == "model.embed_tokens"
    assert reads == []


def test_budget_too_small_from_the_planner_leaves_the_model_usable():
    """Between the largest op's size and what placing the ring needs, the error comes from the planner,
    after the trace: the model must still be the caller's, intact."""
    x = make_input("nested")
    model = make_model("nested")
    ref = resident(model, x)
    budget = 1
    err = None
    for _ in range(3):  # the first error is the static check; the planner's comes at its need_bytes
        try:
            flashmem.stream(model, budget, example_inputs=(x,)).close()
            pytest.skip("the planner placed the ring at the largest op's size")
        except flashmem.BudgetTooSmall as e:
            err, budget = e, e.need_bytes
            if "cannot be placed" in str(e) or "neighbours" in str(e):
                break
    check_message(err)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(resident(model, x), ref)


def test_bad_budget_strings_from_pretrained(llama_folder):
    for bad in ("a lot", "12 parsecs", "-1GiB", "0"):
        with pytest.raises(flashmem.BadBudget):
            flashmem.from_pretrained(llama_folder, bad)


@pytest.mark.parametrize("budget", ["300KiB", "0.3MB", 300_000])
def test_budget_strings_are_honoured(budget, streams):
    model = make_model("llama")
    x = make_input("llama")
    ref = resident(model, x)
    sm = streams(model, budget, x)
    assert sm.budget_bytes == flashmem.parse_bytes(budget)
    assert sm.plan.budget_bytes == sm.budget_bytes and sm.plan.total_bytes <= sm.budget_bytes
    with torch.no_grad():
        assert torch.equal(out_of(sm(x)), ref)
