"""Queues described in a file: the models, their inputs, the order of calls and the budget, run as one
`Workload` by `flashmem queue spec.json`, with a table and a plot of memory over time.

A spec (JSON):

    {"device": "cuda", "budget": "1.5GB", "dtype": "float16", "rounds": 10, "order": "random", "seed": 0,
     "models": [
        {"name": "gpt", "transformers": "GPTNeoForCausalLM", "config": {"hidden_size": 2048, ...},
         "inputs": {"input_ids": {"shape": [1, 128], "dtype": "int64", "high": 50257}}},
        {"name": "unet", "diffusers": "UNet2DConditionModel", "config": {...},
         "inputs": {"sample": {"shape": [1, 4, 64, 64]}, "timestep": {"value": 10},
                    "encoder_hidden_states": {"shape": [1, 77, 768]}}},
        {"name": "local", "folder": "path/to/model", "inputs": {...}}]}

Models come from a transformers or diffusers class and a config (random weights, seeded), or from a
model folder. Inputs are keyword arguments: a tensor of `shape` (`dtype`, default the model's dtype;
integers below `high`), or a plain `value`. `order` is "random" (each round a random permutation, from
`seed`) or a list of model names (one round). Optional: "host_budget", "split_bytes", "cpu_reads" and
"cuda_graphs" (true: the sequence replays as one CUDA graph from its third run on), as for `Workload`, and
"planner" ("solver": after a first run the sequence is profiled and planned by the solver,
`Workload.use_solver`; default "simple").
"""
from __future__ import annotations

import bisect
import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FlashmemError
from .units import fmt_bytes, parse_bytes

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "int64": torch.int64,
          "int32": torch.int32}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "transformers", "diffusers" or "folder"
    target: str  # class name, or the folder's path
    config: dict
    inputs: dict


@dataclass(frozen=True)
class QueueSpec:
    models: tuple[ModelSpec, ...]
    budget_bytes: int
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    rounds: int = 1
    order: tuple[str, ...] | str = "random"
    seed: int = 0
    cpu_reads: str = "auto"
    host_budget_bytes: int | None = None  # CUDA: weights streamed from storage through a ring of this size
    split_bytes: int | None = None  # larger linear layers stream in blocks, larger tables are read by rows
    cuda_graphs: bool = False  # CUDA: the sequence replays as one CUDA graph from its second run on
    planner: str = "simple"  # "solver": the sequence profiled and planned by the solver (`Workload.use_solver`)

    def sequence(self) -> list[str]:
        """The model names in call order: `rounds` rounds of `order` (a random permutation per round)."""
        names = [m.name for m in self.models]
        rng = random.Random(self.seed)
        out = []
        for _ in range(self.rounds):
            if self.order == "random":
                out.extend(rng.sample(names, len(names)))
            else:
                out.extend(self.order)
        return out


def load_spec(path: str | Path) -> QueueSpec:
    raw = json.loads(Path(path).read_text())
    return parse_spec(raw, base=Path(path).parent)


def parse_spec(raw: dict, base: Path = Path(".")) -> QueueSpec:
    if not isinstance(raw, dict) or not raw.get("models"):
        raise FlashmemError("a queue spec is a JSON object with a non-empty \"models\" list")
    if "budget" not in raw:
        raise FlashmemError("the queue spec has no \"budget\" (bytes, or a string such as \"1.5GB\")")
    models = []
    for i, m in enumerate(raw["models"]):
        kinds = [k for k in ("transformers", "diffusers", "folder") if k in m]
        if len(kinds) != 1 or "name" not in m:
            raise FlashmemError(f"model {i} of the spec needs a \"name\" and one of \"transformers\", "
                                f"\"diffusers\" (a class name, with \"config\") or \"folder\"")
        target = m[kinds[0]]
        if kinds[0] == "folder":
            target = str((base / target).resolve())
        models.append(ModelSpec(m["name"], kinds[0], target, dict(m.get("config", {})), dict(m.get("inputs", {}))))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise FlashmemError(f"model names repeat in the spec: {names}")
    dtype = DTYPES.get(raw.get("dtype", "float32"))
    if dtype is None or not dtype.is_floating_point:
        raise FlashmemError(f"dtype {raw.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    planner = raw.get("planner", "simple")
    if planner not in ("simple", "solver"):
        raise FlashmemError(f"planner {planner!r} is not \"simple\" or \"solver\"")
    order = raw.get("order", "random")
    if order != "random":
        order = tuple(order)
        unknown = sorted(set(order) - set(names))
        if unknown:
            raise FlashmemError(f"the order names models the spec lacks: {unknown}")
    return QueueSpec(tuple(models), parse_bytes(raw["budget"]), raw.get("device", "cpu"), dtype,
                     int(raw.get("rounds", 1)), order, int(raw.get("seed", 0)), raw.get("cpu_reads", "auto"),
                     parse_bytes(raw["host_budget"]) if raw.get("host_budget") is not None else None,
                     parse_bytes(raw["split_bytes"]) if raw.get("split_bytes") is not None else None,
                     bool(raw.get("cuda_graphs", False)), planner)


def build_model(spec: ModelSpec, dtype: torch.dtype, seed: int = 0, fill_device: str = "cpu") -> nn.Module:
    """The model of `spec` on the CPU in `dtype`, with random weights from `seed` (or a folder's weights).
    Random weights are N(0, 0.02) (norm weights 1 + N(0, 0.02)), drawn on `fill_device` (a GPU draws
    gigabytes in a blink) into a model built on the meta device: no initialiser runs."""
    from accelerate import init_empty_weights

    if spec.kind == "transformers":
        import transformers

        cls = getattr(transformers, spec.target, None)
        if cls is None:
            raise FlashmemError(f"transformers {transformers.__version__} has no class {spec.target!r}")
        with init_empty_weights(include_buffers=False):
            model = cls._from_config(cls.config_class(**spec.config), dtype=dtype)
        model.tie_weights()  # tied parameters (an LM head on the embedding) become one, as from_pretrained does
        return _fill(model, dtype, seed, fill_device)
    if spec.kind == "diffusers":
        try:
            import diffusers
        except ImportError as err:
            raise FlashmemError(f"model {spec.name!r} needs diffusers, which is not installed") from err
        cls = getattr(diffusers, spec.target, None)
        if cls is None:
            raise FlashmemError(f"diffusers {diffusers.__version__} has no class {spec.target!r}")
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(spec.config)
        return _fill(model, dtype, seed, fill_device)
    else:
        from transformers import AutoConfig

        from .pretrained import _model_class

        model = _model_class(AutoConfig.from_pretrained(spec.target)).from_pretrained(spec.target, dtype=dtype)
    return model.to(dtype).eval()


def _fill(model: nn.Module, dtype: torch.dtype, seed: int, device: str) -> nn.Module:
    """Give every meta parameter seeded random values (one tensor per parameter, however many modules
    hold it, so tied weights stay tied)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    params: dict[int, torch.Tensor] = {}
    for module in model.modules():
        norm = "norm" in type(module).__name__.lower()
        for attr, p in module._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((module, attr, norm and attr == "weight"))
                params[id(p)] = p
    for key, p in params.items():
        t = torch.randn(tuple(p.shape), generator=gen, device=device, dtype=torch.float32).mul_(0.02)
        if any(norm for _, _, norm in slots[key]):
            t.add_(1.0)
        value = nn.Parameter(t.to(dtype).cpu(), requires_grad=False)
        for module, attr, _ in slots[key]:
            module._parameters[attr] = value
    return model.to(dtype).eval()


def make_inputs(spec: ModelSpec, dtype: torch.dtype, seed: int = 0) -> dict[str, Any]:
    """The keyword inputs of one call of the model (random tensors from `seed`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, desc in spec.inputs.items():
        if "value" in desc:
            out[key] = desc["value"]
            continue
        t_dtype = DTYPES[desc["dtype"]] if "dtype" in desc else dtype
        shape = tuple(desc["shape"])
        if t_dtype.is_floating_point:
            out[key] = torch.randn(shape, generator=g).to(t_dtype)
        else:
            out[key] = torch.randint(0, int(desc.get("high", 100)), shape, generator=g, dtype=t_dtype)
    return out


class MemorySampler:
    """Samples the device memory in use (CUDA: the caching allocator's reserved bytes; CPU: RSS) every
    `interval_s` on a thread, from `start()` to `stop()`."""

    def __init__(self, device: torch.device, interval_s: float = 0.002):
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.times: list[float] = []
        self.bytes: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = time.perf_counter()

    def read(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_reserved(self.device)
        from .run_cpu import rss_bytes

        return rss_bytes()

    def start(self) -> "MemorySampler":
        self.t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name="flashmem-memory", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.times.append(time.perf_counter() - self.t0)
            self.bytes.append(self.read())
            self._stop.wait(self.interval_s)

    def stop(self) -> "MemorySampler":
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.times.append(time.perf_counter() - self.t0)
        self.bytes.append(self.read())
        return self

    def average_bytes(self) -> float:
        """Time-weighted mean of the samples."""
        if len(self.times) < 2 or self.times[-1] <= self.times[0]:
            return float(self.bytes[0]) if self.bytes else 0.0
        total = sum((b - a) * m for a, b, m in zip(self.times, self.times[1:], self.bytes))
        return total / (self.times[-1] - self.times[0])


@dataclass
class QueueRun:
    """What `run_queue` measured."""
    results: list = field(default_factory=list)  # CallResult per call, of the timed run whose total is the median
    total_s: float = 0.0  # the median of the timed runs' totals
    totals_s: list = field(default_factory=list)  # every timed run's total, in order
    setup_s: float = 0.0
    peak_bytes: int = 0  # device memory over the baseline at its peak (CUDA: reserved over what the process
    # held before the Workload; CPU: RSS over what it held after the untimed run, i.e. the calls' growth)
    average_bytes: float = 0.0
    streamed_bytes: int = 0
    budget_bytes: int = 0
    sampler: MemorySampler | None = None
    baseline_bytes: int = 0
    graph_refusals: dict = field(default_factory=dict)  # cuda_graphs: sequence signature -> why it ran eagerly
    # time_copies (CUDA): the last timed run's copies, (start s, end s, bytes) from its start, and its call
    # boundaries
    copies: list = field(default_factory=list)
    boundaries_s: list = field(default_factory=list)
    # CUDA: the caching allocator's counters over the timed runs (cudaMalloc and cudaFree calls, retries after
    # a failed one, synchronisations of every stream): a call that presses on its cap frees and mallocs,
    # and each of those waits for the device
    allocator_counts: dict = field(default_factory=dict)
    plan_summary: dict = field(default_factory=dict)  # the sequence's plan in bytes and counts (`plan_summary`)
    # CUDA, weights in host memory: the sequence's copies alone on the link, in order, no compute and no waits
    # (`CudaMover.copies_alone_s`): the floor for exactly the bytes and copies the plan makes
    copies_alone_s: float = 0.0
    copies_alone_graph_s: float = 0.0  # cuda_graphs: the same copies replayed as one CUDA graph


COPY_SIZE_EDGES = (64 << 10, 1 << 20, 4 << 20, 16 << 20)


def plan_summary(wl) -> dict:
    """How a Workload's last plan splits the budget (arena: residents and ring; activations; fixed bytes) and
    how many loads, and on CUDA copies (loads merged where they follow each other), one sequence makes."""
    plan = wl.plan
    out = {"arena_bytes": plan.arena_bytes, "resident_bytes": plan.resident_bytes,
           "ring_bytes": plan.arena_bytes - plan.resident_bytes, "activation_bytes": plan.activation_bytes,
           "fixed_bytes": plan.fixed_bytes, "residents": len(plan.residents), "loads": len(plan.loads),
           "status": plan.status}
    if plan.status != "simple":  # the solver's: which tier answered, its prediction and its time
        out.update(note=plan.note, predicted_s=plan.predicted_s, solve_s=plan.solve_s)
    mover = getattr(wl.streamed._executor, "mover", None)
    if hasattr(mover, "copy_sizes"):  # the CUDA movers (the CPU's read or map load by load)
        sizes = mover.copy_sizes()
        out["copies"] = len(sizes)
        # (copies, bytes) per size class: where per-copy overhead would weigh (the link's rate by piece size
        # is benchmarks/link_rate.py's)
        labels = [f"<{fmt_bytes(e)}" for e in COPY_SIZE_EDGES] + [f">={fmt_bytes(COPY_SIZE_EDGES[-1])}"]
        counts, nbytes = [0] * len(labels), [0] * len(labels)
        for n in sizes:
            k = bisect.bisect_right(COPY_SIZE_EDGES, n)  # the first class whose edge lies above n
            counts[k] += 1
            nbytes[k] += n
        out["copy_sizes"] = {label: (c, b) for label, c, b in zip(labels, counts, nbytes)}
    return out


ALLOCATOR_COUNTS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def _allocator_counts(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: stats.get(k, 0) for k in ALLOCATOR_COUNTS}


def run_queue(spec: QueueSpec, warmup: bool = True, time_copies: bool = False, merge_copies: bool = True,
              repeats: int = 1) -> QueueRun:
    """Build the spec's models, make a Workload under its budget, run its sequence `repeats` times (after
    untimed runs of the same sequence when `warmup`: one, or with cuda_graphs three, which plan, probe and
    capture it), sampling memory over them all; the total is the median run's (of an even number of runs,
    the slower of the middle two). `time_copies` (CUDA, with warmup): every copy of the runs after the
    first is timed with events (a graph then holds them too), and `QueueRun.copies` gives the last timed
    run's. `merge_copies`
    False (CUDA, with warmup): every load is a copy of its own from the second run on (`CudaMover.merge_copies`),
    to measure what merging adjacent loads saves."""
    from .workload import Workload

    device = torch.device(spec.device)
    if repeats < 1:
        raise FlashmemError(f"repeats is {repeats}; run the sequence at least once (repeats=1)")
    if spec.planner == "solver" and not warmup:
        raise FlashmemError("planner \"solver\" needs the warm-up runs (the first runs the simple plan the solver "
                            "starts from)")
    if (time_copies or not merge_copies) and device.type == "cuda" and not warmup:
        raise FlashmemError("time_copies and merge_copies=False need the warm-up runs (the first plans the sequence)")
    models = {m.name: build_model(m, spec.dtype, seed=i) for i, m in enumerate(spec.models)}
    inputs = {m.name: make_inputs(m, spec.dtype, seed=i) for i, m in enumerate(spec.models)}
    sampler = MemorySampler(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    base = sampler.read()  # on the CPU, taken again after the first run: RSS then holds the models' code
    t0 = time.perf_counter()
    wl = Workload(models, spec.budget_bytes, device=spec.device, examples={k: ((), v) for k, v in inputs.items()},
                  cpu_reads=spec.cpu_reads, host_budget=spec.host_budget_bytes, split_bytes=spec.split_bytes,
                  cuda_graphs=spec.cuda_graphs)
    calls = [(name, (), inputs[name]) for name in spec.sequence()]
    try:
        for k in range((3 if spec.cuda_graphs else 1) if warmup else 0):
            wl.run(calls)
            if k == 0 and spec.planner == "solver":  # the simple plan ran once: profile, solve, switch
                wl.use_solver(calls)
            if k == 0 and device.type == "cuda":  # the sequence's own plan is made by now
                mover = wl.streamed._executor.mover
                mover.record_loads = time_copies
                if not merge_copies:
                    mover.merge_copies(False)
        setup_s = time.perf_counter() - t0
        if device.type == "cpu":
            import gc

            gc.collect()
            base = sampler.read()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        counts0 = _allocator_counts(device)
        sampler.start()
        runs = []
        for _ in range(repeats):
            t1 = time.perf_counter()
            results = wl.run(calls)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            runs.append((time.perf_counter() - t1, results))
        totals = [t for t, _ in runs]
        total, median_results = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        counts = {k: v - counts0[k] for k, v in _allocator_counts(device).items()}
        sampler.stop()
        peak = max(sampler.bytes)
        if device.type == "cuda":
            peak = max(peak, torch.cuda.max_memory_reserved(device))
        failed = [r for _, rs in runs for r in rs if r.error is not None]
        if failed:
            raise FlashmemError(f"{len(failed)} of {len(calls) * repeats} calls failed; the first: {failed[0].error!r}")
        copies, bounds = [], []
        if time_copies and device.type == "cuda":
            copies = wl.streamed._executor.mover.copy_intervals()
            bounds = [r.start_s - results[0].start_s for r in results] + [results[-1].end_s - results[0].start_s]
        alone = alone_graph = 0.0
        mover = getattr(wl.streamed._executor, "mover", None)
        if device.type == "cuda" and spec.host_budget_bytes is None and mover is not None:
            alone = mover.copies_alone_s()
            if spec.cuda_graphs:
                alone_graph = mover.copies_alone_s(graph=True)
        return QueueRun(median_results, total, totals, setup_s, peak - base, sampler.average_bytes() - base,
                        wl.plan.streamed_bytes, spec.budget_bytes, sampler, base, wl.graph_refusals, copies, bounds,
                        counts, plan_summary(wl), alone, alone_graph)
    finally:
        wl.close()


def table_rows(run: QueueRun) -> list[tuple[str, ...]]:
    """Per model: calls and median latency; then the totals."""
    by_model: dict[str, list[float]] = {}
    for r in run.results:
        by_model.setdefault(r.name, []).append(r.end_s - r.start_s)
    rows = []
    for name, times in by_model.items():
        times = sorted(times)
        rows.append((name, str(len(times)), f"{times[len(times) // 2] * 1e3:.1f}"))
    return rows


def plot_memory(runs: dict[str, MemorySampler], budget_bytes: int, path: str | Path, baselines=None) -> None:
    """Memory over time of one or more runs (label -> sampler), against the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for label, sampler in runs.items():
        base = (baselines or {}).get(label, 0)
        ax.plot(sampler.times, [(b - base) / 1e9 for b in sampler.bytes], label=label, linewidth=1)
    ax.axhline(budget_bytes / 1e9, color="red", linestyle="--", linewidth=1, label=f"budget {budget_bytes / 1e9:.2f} GB")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("device memory in use (GB)")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
