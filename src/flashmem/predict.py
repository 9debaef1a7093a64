"""Predict: op times from op features, so a plan can be made before the model ever ran on the device.

This module owns three things:

- `op_features`: what each op of a traced `Program` is, from one call of the model (on the CPU, say) with
  forward hooks on the op modules: the module type (`kind`) and its family (matmul, conv, embedding, norm,
  other; a container op, whose step is its own work before its first nested op, is "other"), the weight
  bytes, a FLOPs estimate of the module itself, the input and output activation bytes and shapes; and,
  counted under a `TorchDispatchMode`, what the op's *step* runs (every tensor op from the op's entry to
  the next op's entry: FLOPs, bytes read and written, kernels). The step is what the cost model times
  (`costs.profile`): it includes the work between ops that owns no weights (attention's matmuls and
  softmax, activations, residual adds), which the module's own FLOPs miss.
- `OpTimePredictor`: a least-squares model of a step's seconds per op family: log-linear (the default),
  log(t) ~ a + b log(flops + 1) + c log(bytes + 1) [+ d log(kernels + 1)] + kind one-hot (shrunk toward
  the family), or additive (`form="additive"`), t ~ a + flops / F + bytes / B [+ kernels k], non-negative,
  fitted to relative error. A floor per kind (the fastest such op seen: launch and hook overhead); one fit
  over all ops (with family one-hots) serves families with too few ops; a step that runs no tensor op (a
  container's entry) gets the median time of such steps. `to_json`/`from_json` ship a fitted predictor.
  It predicts for the device, dtype and thread count of the profiles it was fitted on.
- `profile_op_seconds`: the measured compute seconds of each op (step) of a `StreamedModel`, from
  `costs.profile`: the training data.

numpy only: a predictor of this size needs no learning library (benchmarks/fit_predictor.py reports its
errors on models it was not fitted on).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import FlashmemError
from .trace import Program

FAMILIES = ("matmul", "conv", "embedding", "norm", "other")
NORM_FLOPS_PER_ELEMENT = 5  # mean, variance, normalise, scale, shift
EMBEDDING_FLOPS_PER_ELEMENT = 1  # a gather


@dataclass(frozen=True)
class OpFeatures:
    """One op of a program (one call of a module that owns weights), as the predictor sees it."""
    index: int
    module: str
    kind: str  # the module's type name (Linear, Conv1D, LlamaRMSNorm, ...)
    family: str  # one of FAMILIES
    weight_bytes: int  # the op's weights' tensor bytes (on mapped files, program.weights holds page footprints)
    flops: int  # the module's own compute, estimated from its type and shapes
    in_bytes: int  # tensors passed to the call
    out_bytes: int  # tensors it returned
    in_shapes: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]
    step_flops: int  # every tensor op from this op's entry to the next op's entry (the profiled step)
    step_bytes: int  # bytes those tensor ops read and wrote (views excluded)
    step_kernels: int  # how many tensor ops (views excluded) the step ran

    @property
    def moved_bytes(self) -> int:
        return self.weight_bytes + self.in_bytes + self.out_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict) -> "OpFeatures":
        doc = dict(doc)
        doc["in_shapes"] = tuple(tuple(s) for s in doc["in_shapes"])
        doc["out_shapes"] = tuple(tuple(s) for s in doc["out_shapes"])
        return cls(**doc)


# -- families and FLOPs ------------------------------------------------------------------------------------
def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer with its weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def family_of(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module) or name.endswith("Linear"):
        return "matmul"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or ("Embedding" in name and "Rotary" not in name):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or "Norm" in name:
        return "norm"
    return "other"


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def module_flops(module: nn.Module, in_shapes: Sequence[tuple[int, ...]], out_shapes: Sequence[tuple[int, ...]],
                 weight_elements: int) -> int:
    """An estimate of the module's own FLOPs for one call (multiply-adds count two): Linear and HF Conv1D
    2 in out tokens; convolutions 2 Cout Cin/groups kernel-elements output-positions batch; embeddings and
    norms a few per output element; anything else `weight_elements` (its parameters) per token."""
    x = in_shapes[0] if in_shapes else ()
    y = out_shapes[0] if out_shapes else ()
    if isinstance(module, nn.Linear):
        tokens = _numel(x) // max(module.in_features, 1) if x else 1
        return 2 * module.in_features * module.out_features * tokens
    if _is_hf_conv1d(module):
        n_in, n_out = module.weight.shape
        tokens = _numel(x) // max(n_in, 1) if x else 1
        return 2 * n_in * n_out * tokens
    if isinstance(module, nn.modules.conv._ConvNd) and y:
        k = _numel(module.kernel_size)
        spatial = len(module.kernel_size)
        batched = len(y) == spatial + 2
        batch = y[0] if batched else 1
        if module.transposed:  # every input position scatters into a kernel window
            positions = _numel(x[-spatial:]) if x else 0
        else:
            positions = _numel(y[-spatial:])
        return 2 * module.out_channels * (module.in_channels // module.groups) * k * positions * batch
    fam = family_of(module)
    if fam == "embedding":
        return EMBEDDING_FLOPS_PER_ELEMENT * sum(_numel(s) for s in out_shapes)
    if fam == "norm":
        return NORM_FLOPS_PER_ELEMENT * _numel(y or x)
    tokens = _numel(x[:-1]) if len(x) >= 2 else 1
    return weight_elements * tokens


# -- what a step runs --------------------------------------------------------------------------------------
_SKIP = {"size", "sym_size", "stride", "sym_stride", "numel", "sym_numel", "dim", "storage_offset",
         "sym_storage_offset", "is_contiguous", "sym_is_contiguous", "is_strides_like_format",
         "is_non_overlapping_and_dense", "layout"}


def _tensors(tree) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(tree)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _attention_flops(args) -> int:
    """Scaled dot-product attention kernels the flop registry does not know (the CPU's): QK^T and PV."""
    ts = [a for a in args[:3] if isinstance(a, torch.Tensor)]
    if len(ts) < 2 or ts[0].dim() < 2:
        return 0
    q, k = ts[0], ts[1]
    *batch, lq, d = q.shape
    lk = k.shape[-2]
    return 4 * _numel(batch) * lq * lk * d


class _StepCounter(TorchDispatchMode):
    """Adds each tensor op's FLOPs, bytes and kernel to the step in flight (`step`; -1 before the first op)."""

    def __init__(self, n_steps: int):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.step = -1
        self.flops = [0] * n_steps
        self.bytes = [0] * n_steps
        self.kernels = [0] * n_steps

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        i = self.step
        if i < 0 or func._overloadpacket.__name__ in _SKIP or func.is_view:
            return out
        outs = _tensors(out)
        if not outs:
            return out
        packet = func._overloadpacket
        flops = None
        if packet in self.registry:
            try:
                flops = int(self.registry[packet](*args, **kwargs, out_val=out))
            except Exception:  # a formula that does not take this overload's arguments
                flops = None
        elif "scaled_dot_product" in packet.__name__ or "attention" in packet.__name__:
            flops = _attention_flops(args)
        if flops is None:
            flops = max(t.numel() for t in outs)  # elementwise, reductions, copies: one per element
        ins = _tensors((args, kwargs))
        self.flops[i] += flops
        self.bytes[i] += sum(_tensor_bytes(t) for t in ins) + sum(_tensor_bytes(t) for t in outs)
        self.kernels[i] += 1
        return out


def op_features(model: nn.Module, program: Program, example_args: tuple = (),
                example_kwargs: dict | None = None) -> list[OpFeatures]:
    """The features of each op of `program`, from one call of `model` with the example inputs (on the CPU,
    or wherever the model's inputs are). `model` is the traced model: a plain one, or a `StreamedModel`'s
    `.model` (its call then streams as usual). Calls of the op modules are matched to `program.ops` in order."""
    example_kwargs = dict(example_kwargs or {})
    ops = program.ops
    names = {op.module for op in ops}
    records: list[list] = []  # per call in order: [module name, in shapes, in bytes, out shapes, out bytes]
    stack: list[int] = []
    counter = _StepCounter(len(ops))
    hooks = []

    def make_hooks(name: str):
        def pre(module, args, kwargs):
            ts = _tensors((args, kwargs))
            stack.append(len(records))
            records.append([name, tuple(tuple(t.shape) for t in ts), sum(_tensor_bytes(t) for t in ts), (), 0])
            counter.step = min(len(records) - 1, len(ops) - 1)

        def post(module, args, kwargs, output):
            if not stack:
                return
            i = stack.pop()
            ts = _tensors(output)
            records[i][3] = tuple(tuple(t.shape) for t in ts)
            records[i][4] = sum(_tensor_bytes(t) for t in ts)
        return pre, post

    for name in sorted(names):
        module = model.get_submodule(name)
        pre, post = make_hooks(name)
        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), counter:
            model(*example_args, **example_kwargs)
    finally:
        for h in hooks:
            h.remove()
    called = [r[0] for r in records]
    traced = [op.module for op in ops]
    if called != traced:
        first = next((i for i, (a, b) in enumerate(zip(called, traced)) if a != b), min(len(called), len(traced)))
        raise FlashmemError(f"the example call ran {len(called)} op calls, the program has {len(traced)}; they "
                            f"differ from op {first} on (called {called[first:first + 1]}, traced "
                            f"{traced[first:first + 1]}); pass the inputs the program was traced with")
    features = []
    for op, (name, in_shapes, in_bytes, out_shapes, out_bytes) in zip(ops, records):
        module = model.get_submodule(name)
        weights = [program.weights[w] for w in op.weights]
        # Buffers (masks, position ids, rotary frequencies) move like weights but are not multiplied.
        param_elements = sum(_numel(w.shape) for w in weights if not w.is_buffer)
        # A container's step is its own work before its first nested op: whatever its name says.
        family = "other" if op.end_index > op.index else family_of(module)
        features.append(OpFeatures(
            index=op.index, module=name, kind=type(module).__name__, family=family,
            weight_bytes=sum(_numel(w.shape) * w.dtype.itemsize for w in weights),  # not a page footprint
            flops=int(module_flops(module, in_shapes, out_shapes, param_elements)),
            in_bytes=int(in_bytes), out_bytes=int(out_bytes), in_shapes=in_shapes, out_shapes=out_shapes,
            step_flops=int(counter.flops[op.index]), step_bytes=int(counter.bytes[op.index]),
            step_kernels=int(counter.kernels[op.index])))
    return features


# -- the predictor -----------------------------------------------------------------------------------------
FEATURE_SETS = ("step", "op")
FORMS = ("loglinear", "additive")
FORMAT = 1


def _raw(f: OpFeatures, feature_set: str) -> list[float]:
    if feature_set == "step":
        return [float(f.step_flops), float(f.step_bytes), float(f.step_kernels)]
    return [float(f.flops), float(f.moved_bytes)]


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients (few columns: drop the negative ones and solve again)."""
    active = list(range(a.shape[1]))
    while active:
        x, *_ = np.linalg.lstsq(a[:, active], b, rcond=None)
        if (x >= 0).all():
            out = np.zeros(a.shape[1])
            out[active] = x
            return out
        active = [c for c, v in zip(active, x) if v > 0]
    return np.zeros(a.shape[1])


@dataclass
class _Fit:
    """One fit over some ops.

    "loglinear": log t = intercept + slopes . log(1 + numeric) + one-hot offsets for `levels[1:]`
    (`levels[0]`, the most common, is the baseline; a level not seen in fitting counts as the baseline).
    "additive": t = intercept + coefficients . numeric, all non-negative (a fixed cost plus FLOPs over a
    throughput plus bytes over a bandwidth plus a cost per kernel), fitted to relative error; no one-hots."""
    form: str
    field: str  # "kind" or "family": what the one-hot columns encode
    levels: list[str]
    coef: list[float]

    def design(self, feats: Sequence[OpFeatures], feature_set: str) -> np.ndarray:
        rows = []
        for f in feats:
            if self.form == "additive":
                rows.append([1.0] + _raw(f, feature_set))
                continue
            hot = [1.0 if getattr(f, self.field) == lv else 0.0 for lv in self.levels[1:]]
            rows.append([1.0] + [math.log1p(v) for v in _raw(f, feature_set)] + hot)
        return np.array(rows, dtype=float).reshape(len(rows), -1)

    @classmethod
    def fit(cls, form: str, feats: Sequence[OpFeatures], seconds: np.ndarray, feature_set: str, field: str,
            ridge_numeric: float, onehot_prior_ops: float) -> "_Fit":
        if form == "additive":
            model = cls(form, field, [], [])
            x = model.design(feats, feature_set)
            scale = np.maximum(np.abs(x).max(axis=0), 1e-30)  # columns of order one
            coef = _nnls(x / scale / seconds[:, None], np.ones(len(seconds))) / scale
            model.coef = [float(c) for c in coef]
            return model
        counts: dict[str, int] = {}
        for f in feats:
            counts[getattr(f, field)] = counts.get(getattr(f, field), 0) + 1
        levels = sorted(counts, key=lambda k: (-counts[k], k))
        model = cls(form, field, levels, [])
        x = model.design(feats, feature_set)
        n_num = len(_raw(feats[0], feature_set))
        # Ridge: shrink the slopes a little (collinear FLOPs and bytes: relative to the number of ops) and
        # each kind's offset toward its family's as if `onehot_prior_ops` ops of the baseline kind were seen
        # beside it (a kind seen twice moves halfway; one seen a hundred times barely); never the intercept.
        # Solved as an augmented least-squares problem.
        penalty = np.array([0.0] + [ridge_numeric * math.sqrt(len(feats))] * n_num
                           + [math.sqrt(onehot_prior_ops)] * (len(levels) - 1))
        aug_x = np.vstack([x, np.diag(penalty)])
        aug_y = np.concatenate([np.log(seconds), np.zeros(len(penalty))])
        coef, *_ = np.linalg.lstsq(aug_x, aug_y, rcond=None)
        model.coef = [float(c) for c in coef]
        return model

    def predict(self, feats: Sequence[OpFeatures], feature_set: str) -> np.ndarray:
        y = self.design(feats, feature_set) @ np.array(self.coef)
        return np.exp(y) if self.form == "loglinear" else y

    def to_dict(self) -> dict:
        return asdict(self)


class OpTimePredictor:
    """Op (step) seconds from `OpFeatures`: a fit per op family (one over all ops, with family one-hots,
    for families with fewer than `min_family_ops` ops), and a floor per kind.

    feature_set "step": the step's counted FLOPs, bytes and kernels (what the profiled time covers);
    "op": the module's own FLOPs estimate and weight + activation bytes (no step counting needed).
    form "loglinear" (the default): log t = a + b log(flops + 1) + c log(bytes + 1) [+ d log(kernels + 1)]
    + kind one-hot; "additive": t = a + flops / F + bytes / B [+ kernels k], non-negative."""

    def __init__(self, feature_set: str = "step", form: str = "loglinear", min_family_ops: int = 12,
                 ridge_numeric: float = 1e-3, onehot_prior_ops: float = 2.0):
        if feature_set not in FEATURE_SETS:
            raise ValueError(f"feature_set {feature_set!r} is not one of {FEATURE_SETS}")
        if form not in FORMS:
            raise ValueError(f"form {form!r} is not one of {FORMS}")
        self.feature_set = feature_set
        self.form = form
        self.min_family_ops = min_family_ops
        self.ridge_numeric = ridge_numeric
        self.onehot_prior_ops = onehot_prior_ops
        self.families: dict[str, _Fit] = {}
        self.overall: _Fit | None = None
        self.kind_floor_s: dict[str, float] = {}
        self.floor_s = 0.0
        self.empty_step_s: float | None = None  # "step": a step that runs no tensor op (a container's entry)

    @property
    def fitted(self) -> bool:
        return self.overall is not None

    def fit(self, features: Sequence[OpFeatures], seconds: Sequence[float]) -> "OpTimePredictor":
        features, seconds = list(features), [float(s) for s in seconds]
        if len(features) != len(seconds):
            raise ValueError(f"{len(features)} features but {len(seconds)} times")
        keep = [i for i, s in enumerate(seconds) if s > 0 and math.isfinite(s)]
        if len(keep) < 3:
            raise ValueError("fitting needs at least 3 ops with a positive time")
        features = [features[i] for i in keep]
        seconds = [seconds[i] for i in keep]
        t = np.array(seconds)
        common = (self.feature_set,)
        ridge = (self.ridge_numeric, self.onehot_prior_ops)
        self.overall = _Fit.fit(self.form, features, t, *common, "family", *ridge)
        self.families = {}
        for fam in FAMILIES:
            idx = [i for i, f in enumerate(features) if f.family == fam]
            if len(idx) >= self.min_family_ops:
                self.families[fam] = _Fit.fit(self.form, [features[i] for i in idx], t[idx], *common, "kind",
                                              *ridge)
        self.kind_floor_s = {}
        for f, s in zip(features, seconds):
            self.kind_floor_s[f.kind] = min(self.kind_floor_s.get(f.kind, math.inf), s)
        self.floor_s = min(seconds)
        empty = [s for f, s in zip(features, seconds) if f.step_kernels == 0]
        self.empty_step_s = float(np.median(empty)) if empty and self.feature_set == "step" else None
        return self

    def _floor(self, f: OpFeatures) -> float:
        """The fastest op of this kind seen in fitting (launch and hook overhead); the fastest op of all for
        a kind never seen (a family's floor could be another kind's, far above this one's)."""
        return self.kind_floor_s.get(f.kind, self.floor_s)

    def predict(self, features: Iterable[OpFeatures]) -> list[float]:
        if not self.fitted:
            raise FlashmemError("the predictor is not fitted; call fit() or load one with from_json()")
        features = list(features)
        if not features:
            return []
        t = self.overall.predict(features, self.feature_set)
        for fam, model in self.families.items():
            idx = [i for i, f in enumerate(features) if f.family == fam]
            if idx:
                t[idx] = model.predict([features[i] for i in idx], self.feature_set)
        out = [max(float(v), self._floor(f)) for v, f in zip(t, features)]
        if self.empty_step_s is not None:
            out = [self.empty_step_s if f.step_kernels == 0 else v for f, v in zip(features, out)]
        return out

    def to_json(self) -> str:
        if not self.fitted:
            raise FlashmemError("the predictor is not fitted; nothing to save")
        return json.dumps({
            "format": FORMAT, "feature_set": self.feature_set, "form": self.form,
            "min_family_ops": self.min_family_ops, "ridge_numeric": self.ridge_numeric,
            "onehot_prior_ops": self.onehot_prior_ops, "overall": self.overall.to_dict(),
            "families": {k: v.to_dict() for k, v in self.families.items()},
            "kind_floor_s": self.kind_floor_s, "floor_s": self.floor_s, "empty_step_s": self.empty_step_s,
        })

    @classmethod
    def from_json(cls, text: str) -> "OpTimePredictor":
        doc = json.loads(text)
        if doc.get("format") != FORMAT:
            raise FlashmemError(f"predictor format {doc.get('format')!r}, expected {FORMAT}")
        p = cls(doc["feature_set"], doc["form"], doc["min_family_ops"], doc["ridge_numeric"],
                doc["onehot_prior_ops"])
        p.overall = _Fit(**doc["overall"])
        p.families = {k: _Fit(**v) for k, v in doc["families"].items()}
        p.kind_floor_s = {k: float(v) for k, v in doc["kind_floor_s"].items()}
        p.floor_s = float(doc["floor_s"])
        p.empty_step_s = doc["empty_step_s"]
        return p


# -- training data -----------------------------------------------------------------------------------------
def profile_op_seconds(sm, args: tuple, kwargs: dict | None = None, calls: int = 3) -> list[float]:
    """Measured compute seconds of each op (step) of the StreamedModel `sm` for this input: the median of
    `calls` profiled calls, from `costs.profile` (its quiet pass: nothing moving beside compute)."""
    from .costs import profile

    with torch.no_grad():
        costs = profile(sm, tuple(args), dict(kwargs or {}), calls=calls)
    return [s.compute_s for s in costs.steps]


def predicted_costs(predictor: OpTimePredictor, features: Sequence[OpFeatures], program: Program, link,
                    device: str, slowdowns: dict[str, float] | None = None):
    """A `costs.CostModel` for `program` from predicted step times instead of a profile on the device: what
    the solver plans with before the model ever ran there (`StreamedModel.use_solver(..., costs=...)`).
    `link` is a `costs.LinkCost` (`costs.measure_link(device)` measures one without the model);
    `slowdowns` per op kind (default 1.0 each: copy engines beside compute, as on a discrete GPU)."""
    from .costs import CostModel, StepCost

    if len(features) != len(program.ops):
        raise FlashmemError(f"{len(features)} op features for a program of {len(program.ops)} ops; compute them "
                            f"with op_features on the same traced program")
    seconds = predictor.predict(features)
    slow = slowdowns or {}
    steps = tuple(StepCost(f.kind, float(t), max(1.0, float(slow.get(f.kind, 1.0)))) for f, t in zip(features, seconds))
    return CostModel(str(device), program.signature, link, steps)
