"""The plan cache: a save/load round trip gives back the same Plan and CostModel; entries that are edited,
from another program, of another format, unparseable or invalid are discarded with a warning and deleted;
the key tells budgets, devices, signatures and planners apart; and `flashmem.stream(..., planner="solver",
cache_dir=...)` reuses its cached plan on a second model."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings

import pytest
import torch


from flashmem import costs as costs_module
from flashmem import solve as solve_module
from flashmem.cache import PlanCache, cache_key, plan_from_dict, program_fingerprint
from flashmem.check import find_problems
from flashmem.costs import CostModel, LinkCost, StepCost
from flashmem.plan import simple_plan
from flashmem.solve import SolverSettings, solve_plan
from flashmem.trace import Program

from conftest import make_input, make_model, resident, program, streaming_budget

ALIGN = 64


A = program([100] * 4, [(f"m{i}", (i,), i) for i in range(4)])
COSTS = CostModel("cpu", "test", LinkCost("synthetic", 1e5, 1e-4),
                  tuple(StepCost("Op", c, s) for c, s in [(1e-3, 1.5), (2e-3, 1.0), (5e-4, 3.0), (1e-3, 1.0)]))


def solver_plan(budget: int = 384):
    return solve_plan(A, COSTS, budget_bytes=budget, device="cpu", alignment=ALIGN, activation_bytes=0,
                      granularity=ALIGN, settings=SolverSettings(time_limit_s=1.0))


def digest(body: dict) -> str:
    """The entry's digest, as documented: sha256 of its content (without the digest) as sorted JSON."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def rewrite(path, change, *, redigest: bool) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    if redigest:
        doc["digest"] = digest({k: v for k, v in doc.items() if k != "digest"})
    path.write_text(json.dumps(doc))


def load_discarded(cache: PlanCache, key: str, prog: Program, words: str) -> None:
    """The entry is refused with a warning naming the reason, and deleted."""
    assert cache.path(key).exists()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = cache.load(key, prog)  # an exception here propagates as itself
    assert loaded is None
    messages = [str(w.message) for w in record if issubclass(w.category, UserWarning)]
    assert any("discarding cached plan" in m and words in m for m in messages), messages
    assert not cache.path(key).exists()


# -- round trip ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [256, 384, 512])
def test_round_trip_gives_an_equal_plan_and_cost_model(tmp_path, budget):
    plan = solver_plan(budget)
    assert plan.predicted_s is not None and plan.solve_s > 0 and plan.note
    cache = PlanCache(tmp_path / "plans")  # made on save
    key = cache_key(A, budget, "cpu", "solver", 0)
    path = cache.save(key, A, plan, COSTS)
    assert path == cache.path(key) and path.exists() and path.name == f"plan-{key}.json"
    assert not list(path.parent.glob("*.tmp"))  # written through a temporary file, then renamed
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = cache.load(key, A)
    assert record == []
    assert loaded is not None
    got_plan, got_costs = loaded
    assert got_plan == plan  # every field, solve_s and predicted_s included
    assert isinstance(got_plan.loads, tuple) and isinstance(got_plan.residents, tuple)
    assert got_costs == COSTS
    assert path.exists()  # a good entry stays
    assert cache.load(key, A) is not None  # and loads again


def test_round_trip_without_costs_and_a_missing_entry(tmp_path):
    plan = simple_plan(A, budget_bytes=256, device="cpu", alignment=ALIGN, activation_bytes=0)
    cache = PlanCache(tmp_path)
    key = cache_key(A, 256, "cpu", "simple", 0)
    assert cache.load(key, A) is None  # nothing there: no warning, nothing to delete
    cache.save(key, A, plan, None)
    assert cache.load(key, A) == (plan, None)
    doc = json.loads(cache.path(key).read_text())
    assert doc["format"] == 1 and doc["key"] == key and doc["program"] == program_fingerprint(A)
    assert plan_from_dict(doc["plan"]) == plan
    assert doc["digest"] == digest({k: v for k, v in doc.items() if k != "digest"})


# -- untrusted entries ----------------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    plan = solver_plan(256)
    # one weight resident (128 B), the other three loaded just in time through the other 128 B
    assert len(plan.loads) == 3 and len(plan.residents) == 1
    cache = PlanCache(tmp_path)
    key = cache_key(A, 256, "cpu", "solver", 0)
    cache.save(key, A, plan, COSTS)
    return cache, key, plan


def test_an_edited_entry_is_rejected(saved):
    cache, key, plan = saved
    assert plan.loads[-1].start_step != 0

    def edit(doc):
        doc["plan"]["loads"][-1]["start_step"] = 0

    rewrite(cache.path(key), edit, redigest=False)
    load_discarded(cache, key, A, "digest does not match")


def test_an_entry_without_a_digest_is_rejected(saved):
    cache, key, _ = saved
    rewrite(cache.path(key), lambda doc: doc.pop("digest"), redigest=False)
    load_discarded(cache, key, A, "digest does not match")


def test_an_entry_for_another_program_is_rejected(saved):
    cache, key, plan = saved
    other = program([100, 100, 100, 36], [(f"m{i}", (i,), i) for i in range(4)])  # W3 has another size
    assert program_fingerprint(other) != program_fingerprint(A)
    load_discarded(cache, key, other, "made for another model")
    # the same file under another key (renamed by hand) is refused too
    cache.save(key, A, plan, COSTS)
    key2 = cache_key(A, 320, "cpu", "solver", 0)
    cache.path(key).rename(cache.path(key2))
    load_discarded(cache, key2, A, "made for another model")


@pytest.mark.parametrize("redigest", [False, True])
def test_an_entry_of_another_format_is_rejected(saved, redigest):
    cache, key, _ = saved

    def edit(doc):
        doc["format"] = 2

    rewrite(cache.path(key), edit, redigest=redigest)
    load_discarded(cache, key, A, "plan format 2")


def test_an_invalid_plan_with_a_good_digest_is_rejected_by_the_checker(saved):
    cache, key, plan = saved
    assert plan.loads[-1].first_use == 3

    def edit(doc):
        doc["plan"]["loads"][-1]["start_step"] = 4  # issued after its first use (op 3)

    rewrite(cache.path(key), edit, redigest=True)
    load_discarded(cache, key, A, "the checker rejects it")


def test_an_entry_with_missing_fields_is_rejected(saved):
    cache, key, _ = saved

    def edit(doc):
        del doc["plan"]["loads"][0]["offset_bytes"]

    rewrite(cache.path(key), edit, redigest=True)
    load_discarded(cache, key, A, "does not parse")


@pytest.mark.parametrize("text", ["{not json", "", "\xff\xfe"])
def test_an_unparseable_entry_is_rejected(tmp_path, text):
    cache = PlanCache(tmp_path)
    key = cache_key(A, 256, "cpu", "solver", 0)
    cache.path(key).write_text(text, encoding="latin-1")
    load_discarded(cache, key, A, "does not parse")


@pytest.mark.parametrize("text", ["[]", "null", '"plan"', "42"])
def test_an_entry_that_is_not_a_json_object_is_rejected(tmp_path, text):
    # Regression: PlanCache.load called doc.items() on whatever JSON value the file held, so valid JSON that
    # is not an object raised AttributeError (out of flashmem.stream too) instead of being discarded.
    cache = PlanCache(tmp_path)
    key = cache_key(A, 256, "cpu", "solver", 0)
    cache.path(key).write_text(text)
    load_discarded(cache, key, A, "does not parse")


def test_an_entry_whose_plan_is_not_an_object_is_rejected(saved):
    # Regression: plan_from_dict called .items() on the entry's 'plan' unchecked (AttributeError).
    cache, key, _ = saved
    rewrite(cache.path(key), lambda doc: doc.update(plan=[]), redigest=True)
    load_discarded(cache, key, A, "does not parse")


# -- keys ----------------------------------------------------------------------------------------------------------
def test_cache_key_tells_budget_device_signature_planner_and_reserve_apart():
    base = cache_key(A, 256, "cpu", "solver", 0)
    assert base == cache_key(A, 256, "cpu", "solver", 0)  # stable
    assert len(base) == 32 and int(base, 16) >= 0
    other_signature = dataclasses.replace(A, signature="other")
    other_weights = program([100, 100, 100, 101], [(f"m{i}", (i,), i) for i in range(4)])
    other_order = program([100] * 4, [(f"m{i}", (3 - i,), i) for i in range(4)])
    keys = {
        base,
        cache_key(A, 257, "cpu", "solver", 0),
        cache_key(A, 256, "cuda:0", "solver", 0),
        cache_key(A, 256, "cuda:1", "solver", 0),
        cache_key(other_signature, 256, "cpu", "solver", 0),
        cache_key(A, 256, "cpu", "simple", 0),
        cache_key(other_weights, 256, "cpu", "solver", 0),
        cache_key(other_order, 256, "cpu", "solver", 0),
        cache_key(A, 256, "cpu", "solver", 2 * 2**20),  # another activation reserve
    }
    assert len(keys) == 9
    # The raw activation measurement is not part of the key (the reserve the plan keeps is): a trace that
    # measured a few bytes more finds the same plan.
    remeasured = dataclasses.replace(A, activation_bytes=A.activation_bytes + 4096)
    assert program_fingerprint(remeasured) == program_fingerprint(A)
    assert cache_key(remeasured, 256, "cpu", "solver", 0) == base
    assert program_fingerprint(dataclasses.replace(A, fixed_bytes=64)) != program_fingerprint(A)


# -- end to end --------------------------------------------------------------------------------------------------------
def test_stream_with_the_solver_reuses_its_cached_plan(tmp_path, monkeypatch, streams):
    x = make_input("mlp")
    expected = resident(make_model("mlp"), x)
    budget = streaming_budget()  # some of the MLP's weights stream

    first = streams(make_model("mlp"), budget, x, planner="solver", cache_dir=tmp_path)
    files = list(tmp_path.glob("plan-*.json"))
    assert len(files) == 1
    assert first.plan.status in {"optimal", "feasible", "fallback"}
    assert first.plan.solve_s > 0 and first.plan.predicted_s is not None
    assert first.costs is not None and len(first.costs.steps) == len(first.program.ops)
    assert list(find_problems(first.plan, first.program)) == []
    with torch.no_grad():
        assert torch.equal(first(x), expected)
        assert torch.equal(first(x), expected)

    # The second model must not profile or solve: the cached plan (and its costs) come back as they were.
    def refuse(*args, **kwargs):
        raise AssertionError("planned again instead of reusing the cached plan")

    monkeypatch.setattr(costs_module, "profile", refuse)
    monkeypatch.setattr(solve_module, "solve_plan", refuse)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second = streams(make_model("mlp"), budget, x, planner="solver", cache_dir=tmp_path)
    assert not [w for w in record if "flashmem" in str(w.message)]  # no entry discarded
    assert second.plan == first.plan  # solve_s included: the very plan saved
    assert second.costs == first.costs
    assert list(tmp_path.glob("plan-*.json")) == files
    with torch.no_grad():
        assert torch.equal(second(x), expected)
        assert torch.equal(second(x), expected)
    assert second.stats.streamed_bytes == second.plan.streamed_bytes


def test_stream_with_the_solver_replaces_a_tampered_cache_entry(tmp_path, streams):
    x = make_input("mlp")
    expected = resident(make_model("mlp"), x)
    budget = streaming_budget()
    first = streams(make_model("mlp"), budget, x, planner="solver", cache_dir=tmp_path)
    (path,) = tmp_path.glob("plan-*.json")
    rewrite(path, lambda doc: doc["plan"].update(budget_bytes=10**9), redigest=False)
    with pytest.warns(UserWarning, match="digest does not match"):
        second = streams(make_model("mlp"), budget, x, planner="solver", cache_dir=tmp_path)
    assert second.plan.budget_bytes == budget and second.plan.total_bytes <= budget
    assert path.exists()  # planned again and saved again
    assert json.loads(path.read_text())["plan"]["budget_bytes"] == budget
    with torch.no_grad():
        assert torch.equal(second(x), expected)
    assert first.plan.budget_bytes == second.plan.budget_bytes
