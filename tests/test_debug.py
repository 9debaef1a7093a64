"""The runtime's own checks: with released weight bytes poisoned and copies slowed down, outputs stay exact,
and a runtime with its waits taken out is caught."""
import dataclasses
import functools

import pytest
import torch

import flashmem

from conftest import ALL_KINDS, make_input, make_model, minimum_budget, out_of, resident

DEBUG = flashmem.DebugOptions(poison=True, slow_copy_s=0.0005)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_poisoned_and_slow_runtime_is_exact(kind, streams):
    x = make_input(kind)
    ref = resident(make_model(kind), x)
    budget, _ = minimum_budget(functools.partial(make_model, kind), x, debug=DEBUG)
    sm = streams(make_model(kind), budget, x, debug=DEBUG)
    assert sm.plan.loads
    for _ in range(3):
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)


def test_a_missing_wait_is_caught_by_the_poison(streams):
    x = make_input("mlp")
    ref = resident(make_model("mlp"), x)
    budget, _ = minimum_budget(functools.partial(make_model, "mlp"), x, debug=DEBUG)
    sm = streams(make_model("mlp"), budget, x, debug=DEBUG)
    with torch.no_grad():
        assert torch.equal(sm(x), ref)
    steps = sm._executor.steps
    # Take out every wait: compute then runs on bytes that are poisoned or not yet read.
    sm._executor.steps = dataclasses.replace(steps, wait=tuple(() for _ in steps.wait))
    with torch.no_grad():
        out = sm(x)
    assert not torch.equal(out, ref)
