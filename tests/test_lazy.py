"""lazy_trace=True: nothing runs before `stream`/`from_pretrained` returns; the first call is the trace, its
output the model's own (exact), and later calls stream on the plan it made."""
from __future__ import annotations

import pytest
import torch

import flashmem

from conftest import hf_model, make_input, model_bytes, out_of, resident, save_folder


def test_from_pretrained_first_call_is_the_trace(llama_folder):
    x, y = make_input("llama"), make_input("llama", seed=2)
    model = hf_model("llama")
    refs = [resident(model, x), resident(model, y)]
    budget = model_bytes(model) // 3
    sm = flashmem.from_pretrained(llama_folder, budget, lazy_trace=True)
    try:
        assert sm._executor is None and not sm._plans  # nothing traced, nothing planned yet
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), refs[0])  # the trace's own output
            assert sm.plan.loads and sm.plan.arena_bytes <= budget
            for _ in range(2):
                assert torch.equal(out_of(sm(x)), refs[0])
                assert sm.stats.streamed_bytes == sm.plan.streamed_bytes > 0
            assert torch.equal(out_of(sm(y)), refs[1])
    finally:
        sm.close()


@pytest.fixture
def lazy_gpt2():
    """(a GPT-2 streamed with lazy_trace at half its bytes, an input, the resident output); closed after."""
    x = make_input("gpt2")
    ref = resident(hf_model("gpt2"), x)
    sm = flashmem.stream(hf_model("gpt2"), model_bytes(hf_model("gpt2")) // 2, lazy_trace=True)
    yield sm, x, ref
    sm.close()


def test_stream_needs_no_example_input(lazy_gpt2):
    sm, x, ref = lazy_gpt2
    with torch.no_grad():
        assert torch.equal(out_of(sm(x)), ref)
        assert torch.equal(out_of(sm(x)), ref)
    assert sm.plan.loads


def test_a_first_call_that_fails_leaves_the_next_to_trace(lazy_gpt2):
    sm, x, ref = lazy_gpt2
    with pytest.raises(IndexError), torch.no_grad():
        sm(x + 10_000)  # token ids outside the vocabulary: the traced call fails in the embedding
    assert not sm._plans
    with torch.no_grad():
        assert torch.equal(out_of(sm(x)), ref)
        assert torch.equal(out_of(sm(x)), ref)


def test_lazy_trace_with_the_solver_is_refused():
    with pytest.raises(flashmem.FlashmemError, match="lazy_trace=True use planner='simple'"):
        flashmem.stream(hf_model("gpt2"), "1MiB", planner="solver", lazy_trace=True)
