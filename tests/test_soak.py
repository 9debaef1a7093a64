"""Soak: 1,000 consecutive streamed calls with input shapes that vary, on one StreamedModel: outputs stay
exact, RSS stays flat, threads stay bounded and none is left behind, and the plans of the shapes are
reused, not re-made."""
import threading

import torch

import flashmem
from flashmem.run_cpu import rss_bytes

from conftest import hf_model, model_bytes

LENGTHS = (3, 7, 12, 5)


def test_thousand_calls_with_varying_shapes(streams):
    model = hf_model("llama", seed=0)
    inputs = [torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(n)) for n in LENGTHS]
    with torch.no_grad():
        refs = [model(x).logits.clone() for x in inputs]
    threads_before = threading.active_count()
    sm = streams(model, model_bytes(model) // 3, inputs[0])
    rss = {}
    with torch.no_grad():
        for i in range(1000):
            k = i % len(inputs)
            out = sm(inputs[k]).logits
            if i % 97 == 0 or i >= 996:
                assert torch.equal(out, refs[k]), f"call {i}"
            if i in (99, 999):
                rss[i] = rss_bytes()
    assert len(sm._plans) == len(LENGTHS)  # one plan per shape, made once and reused
    growth = rss[999] - rss[99]
    assert growth <= 2 * 2**20, f"RSS grew by {growth} B over calls 100..1000"
    # one IO thread per input signature's plan, kept while the StreamedModel lives (at most 8), none after
    assert threading.active_count() <= threads_before + len(LENGTHS)
    sm.close()
    assert threading.active_count() <= threads_before
