"""The op-time predictor (flashmem.predict): op features of traced programs (FLOPs checked by hand), fitting
recovers a known law, JSON round trips, and a model held out from real CPU profiles gets usable times.
No assertion here is about how fast anything ran."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from torch import nn

from flashmem.errors import FlashmemError
from flashmem.predict import OpFeatures, OpTimePredictor, op_features, profile_op_seconds

from conftest import hf_model, make_input


class Small(nn.Module):
    """Embedding, Linear, LayerNorm (in an nn.Sequential), a Linear called twice, a Conv2d and a head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Sequential(nn.Linear(16, 24), nn.LayerNorm(24))
        self.mix = nn.Linear(24, 24)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(192, 10)

    def forward(self, ids):
        h = self.body(self.emb(ids))  # (2, 6, 24)
        h = self.mix(torch.relu(self.mix(h)))
        h = self.conv(h.view(h.shape[0], 6, 4, 6))  # (2, 8, 4, 6)
        return self.head(h.flatten(1))


def _small():
    torch.manual_seed(0)
    return Small().eval(), torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))


def test_features_of_a_small_model(streams):
    model, ids = _small()
    sm = streams(model, "16MiB", ids)
    feats = op_features(sm.model, sm.program, (ids,), {})
    assert [f.module for f in feats] == ["emb", "body.0", "body.1", "mix", "mix", "conv", "head"]
    assert [f.index for f in feats] == list(range(7))
    by = {f.index: f for f in feats}
    tokens = 2 * 6
    # Linear: 2 * in * out * tokens
    assert by[1].flops == 2 * 16 * 24 * tokens
    assert by[3].flops == by[4].flops == 2 * 24 * 24 * tokens
    assert by[6].flops == 2 * 192 * 10 * 2
    # Conv2d: 2 * Cout * Cin / groups * kH * kW * Hout * Wout * batch
    assert by[5].flops == 2 * 8 * 6 * 3 * 3 * 4 * 6 * 2
    assert by[0].flops == 2 * 6 * 16  # a gather: one per output element
    assert by[2].flops == 5 * 2 * 6 * 24  # a norm: a few per element
    assert [f.kind for f in feats] == ["Embedding", "Linear", "LayerNorm", "Linear", "Linear", "Conv2d", "Linear"]
    assert [f.family for f in feats] == ["embedding", "matmul", "norm", "matmul", "matmul", "conv", "matmul"]
    # shapes and bytes (fp32) of what went in and came out
    assert by[0].in_shapes == ((2, 6),) and by[0].out_shapes == ((2, 6, 16),)
    assert by[0].in_bytes == 2 * 6 * 8 and by[0].out_bytes == 2 * 6 * 16 * 4
    assert by[5].in_shapes == ((2, 6, 4, 6),) and by[5].out_shapes == ((2, 8, 4, 6),)
    assert by[6].in_shapes == ((2, 192),) and by[6].out_bytes == 2 * 10 * 4
    assert by[1].weight_bytes == (16 * 24 + 24) * 4
    assert by[5].weight_bytes == (8 * 6 * 9 + 8) * 4
    assert by[3].weight_bytes == by[4].weight_bytes  # the same module, called twice: two ops
    # What each step ran: at least the module's own matmul or convolution, and some kernel
    for i in (1, 3, 4, 5, 6):
        assert by[i].step_flops >= by[i].flops
    assert all(f.step_kernels >= 1 and f.step_bytes > 0 for f in feats)
    assert OpFeatures.from_dict(json.loads(json.dumps(by[5].to_dict()))) == by[5]


class Shortcut(Small):
    """The same modules, but the forward skips the second call of `mix`: not the traced order."""

    def forward(self, ids):
        h = self.mix(self.body(self.emb(ids)))
        return self.head(self.conv(h.view(h.shape[0], 6, 4, 6)).flatten(1))


def test_features_refuse_a_call_that_leaves_the_program(streams):
    model, ids = _small()
    sm = streams(model, "16MiB", ids)
    torch.manual_seed(0)
    with pytest.raises(FlashmemError, match="differ from op 4"):
        op_features(Shortcut().eval(), sm.program, (ids,), {})


def test_features_of_a_tiny_llama(streams):
    model, x = hf_model("llama"), make_input("llama")
    config = model.config
    sm = streams(model, "64MiB", x)
    program = sm.program
    feats = op_features(sm.model, program, (x,), {})
    assert len(feats) == len(program.ops)
    assert [f.module for f in feats] == [op.module for op in program.ops]
    tokens = x.numel()
    linears = 0
    for f in feats:
        module = sm.model.get_submodule(f.module)
        assert f.kind == type(module).__name__
        assert f.weight_bytes == sum(t.numel() * t.element_size() for t in module.parameters(recurse=False)) \
            + sum(t.numel() * t.element_size() for t in module.buffers(recurse=False)) > 0
        assert f.in_bytes > 0 and f.out_bytes > 0 and f.step_kernels >= 1
        if isinstance(module, nn.Linear):
            linears += 1
            assert f.family == "matmul"
            assert f.flops == 2 * module.in_features * module.out_features * tokens
            assert f.step_flops >= f.flops
            assert f.out_shapes[0] == (*x.shape, module.out_features)
    assert linears == 7 * config.num_hidden_layers + 1  # q k v o gate up down per layer, and the head
    family = {f.kind: f.family for f in feats}
    assert family["Embedding"] == "embedding"
    assert family["LlamaRMSNorm"] == "norm"
    assert family["LlamaRotaryEmbedding"] == "other"  # not a lookup


def _synthetic(n: int, rng: random.Random, law, lo: float = 5.0, hi: float = 10.0) -> tuple[list, list]:
    """Ops of two families (two kinds in one) with log-uniform FLOPs, bytes and kernels, timed by `law`."""
    feats, secs = [], []
    for i in range(n):
        kind, family = rng.choice([("Linear", "matmul"), ("Conv1D", "matmul"), ("LayerNorm", "norm")])
        flops = int(10 ** rng.uniform(lo, hi))
        nbytes = int(10 ** rng.uniform(lo - 1, hi - 2))
        kernels = rng.randint(1, 12)
        f = OpFeatures(index=i, module=f"m{i}", kind=kind, family=family, weight_bytes=nbytes // 2,
                       flops=flops, in_bytes=nbytes // 4, out_bytes=nbytes - nbytes // 2 - nbytes // 4,
                       in_shapes=((1, 8),), out_shapes=((1, 8),), step_flops=flops, step_bytes=nbytes,
                       step_kernels=kernels)
        feats.append(f)
        secs.append(law(f))
    return feats, secs


def _loglinear_law(f: OpFeatures) -> float:
    a = {"Linear": -20.0, "Conv1D": -20.0 + math.log(1.5), "LayerNorm": -16.0}[f.kind]
    b, c, d = ((0.9, 0.15, 0.2) if f.family == "matmul" else (0.3, 0.5, 0.4))
    return math.exp(a + b * math.log1p(f.step_flops) + c * math.log1p(f.step_bytes)
                    + d * math.log1p(f.step_kernels))


def _additive_law(f: OpFeatures) -> float:
    if f.family == "matmul":
        return 5e-6 + f.step_flops / 8e10 + f.step_bytes / 2e10 + 3e-6 * f.step_kernels
    return 2e-6 + f.step_flops / 1e11 + f.step_bytes / 5e9 + 1e-6 * f.step_kernels


@pytest.mark.parametrize("form,law", [("loglinear", _loglinear_law), ("additive", _additive_law)])
def test_fit_recovers_a_known_law(form, law):
    rng = random.Random(0)
    train_f, train_t = _synthetic(300, rng, law)
    test_f, test_t = _synthetic(60, rng, law, lo=6.0, hi=9.0)  # inside the fitted range
    predictor = OpTimePredictor("step", form).fit(train_f, train_t)
    assert set(predictor.families) == {"matmul", "norm"}
    pred = predictor.predict(test_f)
    errors = [abs(p - t) / t for p, t in zip(pred, test_t)]
    # Not exact for the log-linear form: each kind's offset is shrunk toward its family's (a prior of two ops).
    assert max(errors) < 0.03, f"{form}: worst relative error {max(errors):.4f}"
    assert sorted(errors)[len(errors) // 2] < 0.02


def test_floor_and_empty_steps():
    rng = random.Random(1)
    feats, secs = _synthetic(100, rng, _loglinear_law)
    empty = OpFeatures(index=100, module="container", kind="Block", family="other", weight_bytes=4, flops=0,
                       in_bytes=4, out_bytes=0, in_shapes=((1,),), out_shapes=(), step_flops=0, step_bytes=0,
                       step_kernels=0)
    predictor = OpTimePredictor().fit(feats + [empty, empty], secs + [2e-5, 4e-5])
    tiny = OpFeatures(index=0, module="x", kind="Linear", family="matmul", weight_bytes=1, flops=1, in_bytes=1,
                      out_bytes=1, in_shapes=(), out_shapes=(), step_flops=1, step_bytes=1, step_kernels=1)
    fastest_linear = min(t for f, t in zip(feats, secs) if f.kind == "Linear")
    assert predictor.predict([tiny]) == [fastest_linear]  # the kind's floor
    assert predictor.predict([empty]) == [pytest.approx(3e-5)]  # the median step that ran nothing


@pytest.mark.parametrize("feature_set,form", [("step", "loglinear"), ("op", "loglinear"), ("step", "additive")])
def test_json_round_trip_predicts_the_same(feature_set, form):
    rng = random.Random(2)
    feats, secs = _synthetic(80, rng, _loglinear_law)
    predictor = OpTimePredictor(feature_set, form).fit(feats, secs)
    text = predictor.to_json()
    again = OpTimePredictor.from_json(text)
    probe, _ = _synthetic(40, rng, _loglinear_law, lo=3.0, hi=12.0)
    unseen = OpFeatures(index=0, module="y", kind="Mystery", family="other", weight_bytes=10, flops=10,
                        in_bytes=10, out_bytes=10, in_shapes=(), out_shapes=(), step_flops=1000, step_bytes=100,
                        step_kernels=3)
    assert again.predict(probe + [unseen]) == predictor.predict(probe + [unseen])
    assert again.to_json() == text


def test_misuse_is_refused():
    with pytest.raises(FlashmemError):
        OpTimePredictor().predict([])
    with pytest.raises(ValueError):
        OpTimePredictor(feature_set="wrong")
    with pytest.raises(ValueError):
        OpTimePredictor().fit([], [1.0])
    with pytest.raises(FlashmemError):
        OpTimePredictor.from_json(json.dumps({"format": 999}))


def test_held_out_model_from_real_cpu_profiles(streams):
    """Fit on real profiles of a tiny GPT-2 and a tiny GPT-Neo, predict a tiny Llama never profiled."""
    feats, secs = [], []
    for kind in ("gpt2", "neo"):
        x = make_input(kind)
        sm = streams(hf_model(kind), "64MiB", x)
        seconds = profile_op_seconds(sm, (x,), {}, calls=1)
        assert len(seconds) == len(sm.program.ops)
        assert all(math.isfinite(s) and s >= 0 for s in seconds)
        feats += op_features(sm.model, sm.program, (x,), {})
        secs += seconds
    x = make_input("llama")
    sm = streams(hf_model("llama"), "64MiB", x)
    held_out = op_features(sm.model, sm.program, (x,), {})
    for feature_set in ("step", "op"):
        predictor = OpTimePredictor(feature_set).fit(feats, secs)
        pred = OpTimePredictor.from_json(predictor.to_json()).predict(held_out)
        assert len(pred) == len(sm.program.ops)
        assert all(math.isfinite(p) and p > 0 for p in pred)


def test_a_plan_from_predicted_costs_needs_no_profile(streams, monkeypatch, tmp_path):
    """Fit on a tiny GPT-2's and GPT-Neo's CPU profiles; plan a tiny Llama, streamed at a third of its bytes,
    from predicted step times and a given link, with no profile of it: the solver's plan passes the checker,
    the outputs are exact, and a cached plan is found again only for the same costs."""
    import flashmem.costs
    from flashmem.check import find_problems
    from flashmem.costs import LinkCost
    from flashmem.predict import predicted_costs

    from conftest import model_bytes, out_of, resident

    feats, secs = [], []
    for kind in ("gpt2", "neo"):
        x = make_input(kind)
        sm = streams(hf_model(kind), "64MiB", x)
        secs += profile_op_seconds(sm, (x,), {}, calls=1)
        feats += op_features(sm.model, sm.program, (x,), {})
    predictor = OpTimePredictor().fit(feats, secs)
    x = make_input("llama")
    ref = resident(hf_model("llama"), x)
    sm = streams(hf_model("llama"), model_bytes(hf_model("llama")) // 3, x)
    link = LinkCost("given", 5e9, 2e-6)
    costs = predicted_costs(predictor, op_features(sm.model, sm.program, (x,), {}), sm.program, link, "cpu")
    assert len(costs.steps) == len(sm.program.ops) and all(s.compute_s > 0 for s in costs.steps)

    def no_profile(*args, **kwargs):
        raise AssertionError("profiled although costs were given")

    monkeypatch.setattr(flashmem.costs, "profile", no_profile)
    plan = sm.use_solver((x,), {}, costs=costs, cache_dir=tmp_path)
    assert plan.status in ("optimal", "feasible", "fallback") and not list(find_problems(plan, sm.program))
    assert sm.costs is costs
    with torch.no_grad():
        assert torch.equal(out_of(sm(x)), ref)
    other = predicted_costs(predictor, op_features(sm.model, sm.program, (x,), {}), sm.program,
                            LinkCost("given", 1e9, 2e-6), "cpu")
    assert len(list(tmp_path.glob("plan-*.json"))) == 1
    sm.use_solver((x,), {}, costs=costs, cache_dir=tmp_path)  # the same costs: the cached plan
    assert len(list(tmp_path.glob("plan-*.json"))) == 1
    sm.use_solver((x,), {}, costs=other, cache_dir=tmp_path)  # another cost model: planned and saved apart
    assert sm.costs is other and len(list(tmp_path.glob("plan-*.json"))) == 2
    lam = flashmem.solve.SolverSettings(resident_weight=1e-9)  # other settings: planned and saved apart too
    sm.use_solver((x,), {}, settings=lam, costs=costs, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("plan-*.json"))) == 3
    with pytest.raises(FlashmemError, match="costs given are for another program"):
        sm.use_solver((x,), {}, costs=flashmem.costs.CostModel("cpu", "other", link, costs.steps[:3]))
