#!/usr/bin/env python
"""The paper's multi-model experiment: the models of a queue spec (default benchmarks/fig6.json: five fp16
models, 10 rounds in random order = 50 calls, a 1.5 GB budget on CUDA) called in the spec's sequence, one
process per way of running them:

    sh benchmarks/install_gpu_deps.sh && PYTHONPATH=src:/tmp/benchdeps python3 benchmarks/bench_queue.py
    PYTHONPATH=src python benchmarks/bench_queue.py --spec benchmarks/queue_small.json   # CPU logic check

Modes (each in its own child process, `--mode X`; untimed warm-up pass over the sequence, then --repeats
timed passes, default 3, with flashmem.queue.MemorySampler on; the total is their median, and their spread
prints):
  flashmem                  flashmem.queue.run_queue(spec): one Workload under the spec's budget
  flashmem_host             the same with host_budget=--host-budget (CUDA): every sequence reads the weights
                            from files (the page cache warm) through a pinned staging ring of that size
  flashmem_graphs           the same with cuda_graphs=True: from the second run on, the whole sequence replays
                            as one CUDA graph
  load_each                 per call: model.to(device) from pageable host memory, forward, model.to("cpu"),
                            torch.cuda.empty_cache()
  resident                  every model on the device for good (if it fits): the compute floor
  resident_graphs           the same, each model's call captured once as a CUDA graph and replayed: the
                            compute floor without the host's launch time (flashmem_graphs' floor)
  accelerate_model_offload  accelerate.cpu_offload_with_hook chained in the spec's model order, as diffusers'
                            enable_model_cpu_offload does (a model is offloaded when its successor in that
                            order runs, so a random call order can leave several on the device)
Every mode builds the same weights and inputs (flashmem.queue.build_model / make_inputs, seed = model index)
and moves each output to the host as its call ends (as Workload does). Per mode: total seconds of the
sequence, peak and time-weighted average device memory over the mode's baseline (CUDA: reserved bytes, the
peak also from max_memory_reserved; CPU: RSS), against the budget; bytes copied to the device per sequence;
a sha256 of each model's first output (first tensor leaf: .logits, .sample, .predicted_depth,
.last_hidden_state), `equal` when every digest matches the resident mode's. The flashmem child also measures
the link (256 MiB pinned host-to-device copy, median of 5; on the CPU a RAM copy) for its floor:
max(resident total, streamed bytes / link), or the link's alone where no resident row ran (a lower floor,
so the ratio is not flattered; `floor_kind` says which). The link's part is the sequence's copies alone
(below) where those took less than the probe's rate says (`link_from`). Rows go to $OUT/bench_queue.json, memory samples to
$OUT/bench_queue_memory.json, the plot to $OUT/bench_queue.png (when $OUT is set); the table prints last.

--time-copies (CUDA, flashmem modes): every copy of the timed run is bracketed by events (inside the graph
too), and the row's `link_activity` says how many copies moved how many bytes, how long the link was busy
and at what rate, and where it idled (per model, the largest gaps, and the idle by gap length: many gaps of
a few us are copies' fixed cost, a few long ones waits for releases): where a sequence falls short of the
link floor. The events add a little to the total, so time the total without it.

The flashmem child also times the sequence's own copies alone on the link (`CudaMover.copies_alone_s`: every
copy in order, no compute, no waits): the floor for exactly the copies the plan makes, per-copy overhead
included, against which the total shows what running beside compute and waiting for releases costs. With
cuda_graphs it times them once more replayed as one CUDA graph (`copies_alone_graph_s`): a graph's copies
can cost more each than copies launched in order.

--no-merge (CUDA, flashmem modes): from the second run on, every load is a copy of its own (loads that follow
each other in the arena and in host memory are otherwise merged into one copy); the same plan's total and
copies against a run without it show what merging saves.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODES = ["resident", "resident_graphs", "flashmem", "flashmem_graphs", "flashmem_host", "load_each",
         "accelerate_model_offload"]
HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(HERE / "fig6.json"), help="queue spec (JSON)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--rounds", type=int, help="override the spec's rounds")
    p.add_argument("--device", help="override the spec's device (cpu checks the logic without a GPU)")
    p.add_argument("--child-timeout", type=float, default=580, help="seconds per child process")
    p.add_argument("--mode", choices=MODES, help="(child) run one mode and print its row")
    p.add_argument("--host-budget", default="2GiB", help="flashmem_host's host_budget")
    p.add_argument("--no-merge", action="store_true",
                   help="flashmem modes on CUDA: copy every load on its own instead of merging loads that follow "
                        "each other (CudaMover.merge_copies(False)), to measure what merging saves")
    p.add_argument("--planner", choices=["simple", "solver"],
                   help="flashmem modes: override the spec's planner (solver: Workload.use_solver after a first run)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of the sequence per mode, after the warm-up; the total is their median")
    p.add_argument("--time-copies", action="store_true",
                   help="flashmem modes on CUDA: time every copy with events (inside the graph too) and report "
                        "the link's busy and idle time per model; the events add a little to the total")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.mode_list:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    return args


def load(args):
    from flashmem.queue import load_spec

    spec = load_spec(args.spec)
    if args.device:
        spec = dataclasses.replace(spec, device=args.device)
    if args.rounds is not None:
        spec = dataclasses.replace(spec, rounds=args.rounds)
    return spec


# ==== children ============================================================================================
def main_tensor(out):
    """The first tensor leaf of a model's output."""
    import torch

    for attr in ("logits", "sample", "predicted_depth", "last_hidden_state"):
        t = getattr(out, attr, None)
        if isinstance(t, torch.Tensor):
            return t
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        t = main_tensor(v)
        if t is not None:
            return t
    return None


def digest(out) -> str:
    t = main_tensor(out)
    if t is None:
        return "no tensor in the output"
    return hashlib.sha256(t.detach().float().cpu().numpy().tobytes()).hexdigest()[:16]


def output_checks(names: list[str], outputs: list) -> dict:
    """Each model's first-output digest, and whether its later calls gave the same bytes."""
    digests, repeat_equal = {}, True
    for name, out in zip(names, outputs):
        d = digest(out)
        repeat_equal &= digests.setdefault(name, d) == d
    return {"digests": digests, "repeat_equal": repeat_equal}


def samples_of(sampler) -> dict:
    return {"times": [round(t, 5) for t in sampler.times], "bytes": list(sampler.bytes)}


def link_rate(dev) -> dict:
    """Pinned host-to-device bytes/s of a 256 MiB tensor, median of 5 (CPU: a RAM-to-RAM copy)."""
    import torch

    n = 256 * 2**20
    cuda = dev.type == "cuda"
    src = torch.ones(n, dtype=torch.uint8, pin_memory=cuda)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)
    rates = []
    for i in range(7):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            dt = a.elapsed_time(b) / 1e3
        else:
            t = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t
        if i >= 2:
            rates.append(n / dt)
    return {"link_Bps": statistics.median(rates), "link_all_Bps": rates,
            "link_kind": "pinned host-to-device" if cuda else "cpu RAM copy"}


GAP_BUCKETS_S = (5e-6, 20e-6, 100e-6, 1e-3, float("inf"))


def link_activity(copies: list, bounds: list, names: list[str]) -> dict:
    """From a run's timed copies (start s, end s, bytes) and call boundaries: how many copies, the link's busy
    time (the union of the copies), the rate while busy, and the idle time within each model's calls (the
    link idles where its next copy waits for the bytes it lands on to be released, or has none to do)."""
    spans = sorted((a, b) for a, b, _ in copies)
    busy, merged = 0.0, []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    busy = sum(b - a for a, b in merged)
    total = bounds[-1] if bounds else (merged[-1][1] if merged else 0.0)
    idle_by_model: dict[str, float] = {}
    gaps = []  # (seconds, call index) of the idle stretches
    edges = [0.0] + [e for ab in merged for e in ab] + [total]
    for a, b in zip(edges[0::2], edges[1::2]):  # the idle stretches between the busy ones
        if b <= a:
            continue
        for k, name in enumerate(names):
            lo, hi = max(a, bounds[k]), min(b, bounds[k + 1])
            if hi > lo:
                idle_by_model[name] = idle_by_model.get(name, 0.0) + hi - lo
        k = max((i for i in range(len(names)) if bounds[i] <= a), default=0)
        gaps.append((b - a, k))
    buckets = {}  # the idle by the length of its stretch: many short ones are per-copy cost, few long ones waits
    for g, _ in gaps:
        label = next(f"<{hi * 1e6:g} us" for hi in GAP_BUCKETS_S if g < hi)
        n, t = buckets.get(label, (0, 0.0))
        buckets[label] = (n + 1, t + g)
    gaps.sort(reverse=True)
    moved = sum(n for _, _, n in copies)
    return {"copies": len(copies), "copied_bytes": moved, "link_busy_s": busy, "span_s": total,
            "link_idle_s": total - busy, "busy_rate_Bps": moved / busy if busy else None,
            "idle_by_model_s": {k: round(v, 5) for k, v in idle_by_model.items()},
            "idle_by_gap": {k: {"gaps": n, "s": round(t, 5)} for k, (n, t) in buckets.items()},
            "largest_gaps": [{"s": round(g, 6), "call": k, "model": names[k]} for g, k in gaps[:8]]}


def child_flashmem(spec, dev, time_copies: bool = False, merge_copies: bool = True, repeats: int = 3) -> dict:
    import torch
    from flashmem.queue import run_queue

    names = spec.sequence()
    run = run_queue(spec, time_copies=time_copies, merge_copies=merge_copies, repeats=repeats)
    row = {"total_s": run.total_s, "totals_s": run.totals_s, "setup_s": run.setup_s, "peak_bytes": run.peak_bytes,
           "average_bytes": run.average_bytes, "baseline_bytes": run.baseline_bytes,
           "streamed_bytes": run.streamed_bytes, "samples": samples_of(run.sampler),
           "per_call_s": [r.end_s - r.start_s for r in run.results], "graph_refusals": run.graph_refusals}
    if run.copies:
        row["link_activity"] = link_activity(run.copies, run.boundaries_s, names)
    row["allocator_counts"] = run.allocator_counts
    row["copies_alone_s"] = run.copies_alone_s
    row["copies_alone_graph_s"] = run.copies_alone_graph_s
    row["plan"] = run.plan_summary
    row.update(output_checks(names, [r.output for r in run.results]))
    del run
    gc.collect()
    if dev.type == "cuda":
        row["peak_alloc_bytes"] = torch.cuda.max_memory_allocated(dev)  # nothing was allocated before run_queue
        torch.cuda.empty_cache()
    row.update(link_rate(dev))
    return row


def child_baseline(spec, dev, mode: str, repeats: int = 3) -> dict:
    """resident, load_each or accelerate_model_offload: warm-up pass, then `repeats` timed passes, sampled;
    the total is their median."""
    import torch
    from torch.utils._pytree import tree_map

    from flashmem.queue import MemorySampler, build_model, make_inputs
    from flashmem.workload import _to_host  # the same output handling as Workload's

    cuda = dev.type == "cuda"
    models = {m.name: build_model(m, spec.dtype, seed=i) for i, m in enumerate(spec.models)}
    inputs = {m.name: make_inputs(m, spec.dtype, seed=i) for i, m in enumerate(spec.models)}
    nbytes = {name: C.tensor_bytes_where(m, lambda t: True) for name, m in models.items()}
    names = spec.sequence()
    sampler = MemorySampler(dev)
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    base, alloc_base = sampler.read(), (torch.cuda.memory_allocated(dev) if cuda else 0)
    row: dict = {"model_bytes": sum(nbytes.values())}
    before = after = None  # per-call actions of load_each
    t0 = time.perf_counter()
    call = lambda name, kwargs: models[name](**kwargs)  # noqa: E731
    if mode in ("resident", "resident_graphs"):
        try:
            for m in models.values():
                m.to(dev)
        except torch.OutOfMemoryError as err:
            raise RuntimeError(f"the models ({C.fmt_gb(row['model_bytes'])} GB) do not fit on {dev}: {err}") from None
        if mode == "resident_graphs":
            graphed = {name: graph_call(models[name], inputs[name], dev) for name in models}
            row["eager_models"] = [name for name, g in graphed.items() if g is None]

            def call(name, kwargs):  # noqa: F811 - a model that syncs runs eagerly
                graph = graphed[name]
                return graph(kwargs) if graph is not None else models[name](**kwargs)
    elif mode == "load_each":
        before = lambda name: models[name].to(dev)  # noqa: E731
        after = lambda name: (models[name].to("cpu"), cuda and torch.cuda.empty_cache())  # noqa: E731
    elif mode == "accelerate_model_offload":
        try:
            from accelerate import cpu_offload_with_hook
        except ImportError as err:
            raise RuntimeError(f"accelerate is not importable here ({err})") from None
        hook = None
        for m in models.values():  # the spec's model order, like a pipeline's model_cpu_offload_seq
            _, hook = cpu_offload_with_hook(m, execution_device=dev, prev_module_hook=hook)
        row["config"] = f"cpu_offload_with_hook chain in order {list(models)}"
    setup_s = time.perf_counter() - t0
    onloaded = [0]

    def one_pass() -> tuple[list, list[float]]:
        outs, times = [], []
        onloaded[0] = 0
        with torch.no_grad():
            for name in names:
                if cuda:
                    torch.cuda.synchronize(dev)
                t = time.perf_counter()
                if next(models[name].parameters()).device != dev:
                    onloaded[0] += nbytes[name]
                if before:
                    before(name)
                kwargs = tree_map(lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x, inputs[name])
                outs.append(_to_host(call(name, kwargs)))
                if after:
                    after(name)
                if cuda:
                    torch.cuda.synchronize(dev)
                times.append(time.perf_counter() - t)
        return outs, times

    one_pass()  # warm-up
    gc.collect()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        base = sampler.read()  # as run_queue: RSS after the warm-up holds the models and their code
    sampler.start()
    passes = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        outs, times = one_pass()
        passes.append((time.perf_counter() - t1, outs, times))
    total, outs, times = sorted(passes, key=lambda p: p[0])[len(passes) // 2]
    row["totals_s"] = [p[0] for p in passes]
    sampler.stop()
    peak = max(sampler.bytes)
    if cuda:
        peak = max(peak, torch.cuda.max_memory_reserved(dev))
        row["peak_alloc_bytes"] = torch.cuda.max_memory_allocated(dev) - alloc_base
    row.update(total_s=total, setup_s=setup_s, peak_bytes=peak - base,
               average_bytes=sampler.average_bytes() - base, baseline_bytes=base,
               streamed_bytes=onloaded[0], samples=samples_of(sampler), per_call_s=times)
    row.update(output_checks(names, outs))
    return row


def graph_call(model, inputs: dict, dev):
    """`model`'s call on `inputs` captured as a CUDA graph (after two warm-up calls on a side stream, as
    PyTorch's docs do; device constants made from Python data come from pinned memory, as flashmem's
    captures make them): a function of the inputs that copies them into the graph's, replays it and gives
    its outputs."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_map

    from flashmem.graphs import HostSlabs, _HostConstants, seen_as_capture

    from graph_check import syncs_of

    static = tree_map(lambda x: x.to(dev).clone() if isinstance(x, torch.Tensor) else x, inputs)
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    graph, slabs = torch.cuda.CUDAGraph(), HostSlabs()
    def probed():
        with _HostConstants(slabs), seen_as_capture():
            model(**static)

    with torch.no_grad(), torch.cuda.stream(side):
        model(**static)
        if syncs_of(probed):
            return None  # it syncs with the host: a capture would fail (and poison later ones)
    torch.cuda.current_stream(dev).wait_stream(side)
    slabs.reserve(slabs.taken_bytes + 64)  # the capture makes what the probe made; none may be pinned in it
    slabs.frozen = True
    with torch.no_grad(), torch.cuda.graph(graph), _HostConstants(slabs):
        out = model(**static)
    dst = tree_flatten(static)[0]

    def replay(kwargs: dict):
        for d, src in zip(dst, tree_flatten(kwargs)[0]):
            if isinstance(d, torch.Tensor):
                d.copy_(src)
        graph.replay()
        return out

    replay.keep = (graph, slabs, static)
    return replay


def child(args) -> None:
    base = {"mode": args.mode}
    try:
        import torch

        spec = load(args)
        dev = torch.device(spec.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available in this process; pass --device cpu for a dry run")
        if dev.type == "cuda" and dev.index is None:  # parameters report cuda:0, which != cuda
            dev = torch.device("cuda", torch.cuda.current_device())
        base.update(device=str(dev), budget_bytes=spec.budget_bytes, calls=len(spec.sequence()),
                    versions={"torch": torch.__version__, "gpu": torch.cuda.get_device_name(dev)
                              if dev.type == "cuda" else None})
        if args.mode == "flashmem_host":
            from flashmem.units import parse_bytes

            spec = dataclasses.replace(spec, host_budget_bytes=parse_bytes(args.host_budget))
        if args.mode == "flashmem_graphs":
            spec = dataclasses.replace(spec, cuda_graphs=True)
        if args.planner:
            spec = dataclasses.replace(spec, planner=args.planner)
        if args.mode.startswith("flashmem"):
            row = child_flashmem(spec, dev, args.time_copies, not args.no_merge, args.repeats)
        else:
            row = child_baseline(spec, dev, args.mode, args.repeats)
        row["within_budget"] = row["peak_bytes"] <= spec.budget_bytes
        C.emit(dict(base, **row))
    except BaseException as e:  # noqa: BLE001 - every failure becomes a row
        C.emit(C.error_row(base, e))


# ==== parent ==============================================================================================
def per_model_ms(row: dict, names: list[str]) -> dict:
    by: dict[str, list[float]] = {}
    for name, t in zip(names, row.get("per_call_s", [])):
        by.setdefault(name, []).append(t * 1e3)
    return {k: round(statistics.median(v), 2) for k, v in by.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode:
        child(args)
        return 0
    t0 = time.perf_counter()
    spec = load(args)
    names = spec.sequence()
    logs = Path(tempfile.gettempdir()) / "flashmem-bench-queue" / "logs"
    for old in logs.glob("*.log"):
        old.unlink()
    script = str(Path(__file__).resolve())
    common = (["--spec", args.spec, "--host-budget", args.host_budget]
              + ["--repeats", str(args.repeats)] + (["--planner", args.planner] if args.planner else [])
              + (["--time-copies"] if args.time_copies else []) + (["--no-merge"] if args.no_merge else [])
              + (["--device", args.device] if args.device else [])
              + (["--rounds", str(args.rounds)] if args.rounds is not None else []))
    rows = []
    for mode in args.mode_list:
        row = C.run_child(script, ["--mode", mode] + common, logs / f"{mode}.log", args.child_timeout)[0]
        row.setdefault("mode", mode)
        row["per_model_median_ms"] = per_model_ms(row, names)
        rows.append(row)
        brief = row.get("error") or f"{row['total_s']:.2f} s, peak {C.fmt_gb(row['peak_bytes'])} GB"
        print(f"[{time.perf_counter() - t0:6.1f}s] {mode}: {brief}", flush=True)

    by_mode = {r["mode"]: r for r in rows}
    ref = by_mode.get("resident", {}).get("digests")
    ref_graphs = by_mode.get("resident_graphs", {}).get("digests")
    for r in rows:
        # a replay may run other kernels than an eager call (SDPA under capture): graphs against graphs
        want = ref_graphs if r["mode"] == "flashmem_graphs" and ref_graphs else ref
        r["equal"] = None if want is None or "digests" not in r else r["digests"] == want
    if ref and ref_graphs:
        by_mode["resident_graphs"]["equal_eager"] = ref_graphs == ref
    res = by_mode.get("resident", {})
    for mode in ("flashmem", "flashmem_graphs", "flashmem_host"):
        fm = by_mode.get(mode, {})
        # a graphed sequence's compute floor is the graphed resident models' (where that row ran)
        ref = by_mode.get("resident_graphs", res) if mode == "flashmem_graphs" else res
        ref = ref if "total_s" in ref else res
        if "total_s" in fm and fm.get("link_Bps"):
            fm["link_s"] = fm["streamed_bytes"] / fm["link_Bps"]
            # the sequence's own copies alone moved these bytes: the link takes no longer than they did
            # (a host whose probe reads low would otherwise raise the floor above what its link did)
            if fm.get("copies_alone_s") and fm["copies_alone_s"] < fm["link_s"]:
                fm["link_s"], fm["link_from"] = fm["copies_alone_s"], "copies alone"
            with_compute = "total_s" in ref
            fm["floor_s"] = max(ref["total_s"], fm["link_s"]) if with_compute else fm["link_s"]
            fm["floor_kind"] = "max(resident, link)" if with_compute else "link"
            fm["x_floor"] = fm["total_s"] / fm["floor_s"]

    samples = {r["mode"]: r.pop("samples") for r in rows if "samples" in r}
    out = C.out_dir()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        doc = {"script": "bench_queue.py", "argv": sys.argv[1:], "spec": args.spec, "device": spec.device,
               "budget_bytes": spec.budget_bytes, "sequence": names, "rows": rows}
        (out / "bench_queue.json").write_text(json.dumps(doc, indent=1, default=str))
        mem = {m: dict(s, baseline_bytes=by_mode[m]["baseline_bytes"]) for m, s in samples.items()}
        (out / "bench_queue_memory.json").write_text(json.dumps(mem))
        C.copy_logs(logs, out / "bench_queue_logs")
        if samples:
            from flashmem.queue import plot_memory

            plot_memory({m: SimpleNamespace(**s) for m, s in samples.items()}, spec.budget_bytes,
                        out / "bench_queue.png", baselines={m: by_mode[m]["baseline_bytes"] for m in samples})

    print()
    for r in rows:
        if r.get("error"):
            print(f"ERROR {r['mode']}: {r['error']}" + (f"\n{r['log_tail']}" if r.get("log_tail") else ""))
    fm = next((r for r in rows if "link_Bps" in r), {})
    if fm:
        print(f"link ({fm['link_kind']}): {fm['link_Bps'] / 1e9:.2f} GB/s")
    for r in rows:
        if r.get("graph_refusals"):
            print(f"{r['mode']} ran eagerly: {r['graph_refusals']}")
        if r.get("eager_models"):
            print(f"{r['mode']}: these models sync with the host and ran eagerly: {r['eager_models']}")
    for r in rows:
        if r.get("per_model_median_ms"):
            print(f"{r['mode']} per-model median ms: {r['per_model_median_ms']}")
        if len(r.get("totals_s") or []) > 1:
            ts = r["totals_s"]
            print(f"{r['mode']} timed runs: {', '.join(f'{t:.3f}' for t in ts)} s (median {statistics.median(ts):.3f}, "
                  f"spread {(max(ts) - min(ts)) / statistics.median(ts):.1%})")
    for r in rows:
        if r.get("plan"):
            print(f"{r['mode']} plan: " + ", ".join(f"{k} {C.fmt_gb(v) + ' GB' if k.endswith('_bytes') else v}"
                                                   for k, v in r["plan"].items() if k != "copy_sizes"))
            if r["plan"].get("copy_sizes"):
                print(f"{r['mode']} copies (count, GB) by size: " + ", ".join(
                    f"{k} ({n}, {C.fmt_gb(b)})" for k, (n, b) in r["plan"]["copy_sizes"].items()))
    for r in rows:
        if r.get("allocator_counts"):
            print(f"{r['mode']} caching allocator over the timed run: {r['allocator_counts']}")
    for r in rows:
        if r.get("copies_alone_s"):
            a = r["copies_alone_s"]
            print(f"{r['mode']}: the sequence's {r['plan'].get('copies')} copies alone on the link (in order, no "
                  f"compute, no waits) take {a:.3f} s, {r['streamed_bytes'] / a / 1e9:.1f} GB/s; the sequence "
                  f"takes {r['total_s'] / a:.2f}x that")
            if r.get("copies_alone_graph_s"):
                print(f"{r['mode']}: the same copies replayed as one CUDA graph take {r['copies_alone_graph_s']:.3f} s")
    for r in rows:
        act = r.get("link_activity")
        if act:
            rate = act["busy_rate_Bps"] and act["busy_rate_Bps"] / 1e9
            print(f"{r['mode']} link: {act['copies']} copies, {act['copied_bytes'] / 1e9:.2f} GB, busy "
                  f"{act['link_busy_s']:.3f} s of {act['span_s']:.3f} s ({rate and round(rate, 1)} GB/s while busy), "
                  f"idle {act['link_idle_s']:.3f} s; idle per model {act['idle_by_model_s']}; largest gaps "
                  f"{[(g['s'], g['model']) for g in act['largest_gaps'][:5]]}; idle by gap length {act['idle_by_gap']}")
    gpu = next((r["versions"]["gpu"] for r in rows if r.get("versions", {}).get("gpu")), None)
    print(f"\n{args.spec}: {len(spec.models)} models, {len(names)} calls ({spec.rounds} rounds, order "
          f"{spec.order if spec.order == 'random' else 'fixed'}), {str(spec.dtype).replace('torch.', '')}, "
          f"device {spec.device}{f' ({gpu})' if gpu else ''}, budget {C.fmt_gb(spec.budget_bytes)} GB; "
          f"memory in GB (10^9) over each mode's baseline ({'reserved' if spec.device.startswith('cuda') else 'RSS'})"
          f"; {time.perf_counter() - t0:.0f} s in all" + (f"; rows in {out / 'bench_queue.json'}" if out else ""))
    headers = ["mode", "total s", "x resident", "floor s", "x floor", "peak GB", "avg GB", "budget GB",
               "peak<=budget", "copied GB/seq", "equal", "error"]
    table = []
    for r in rows:
        def num(key, fmt="{:.3f}", scale=1.0):
            return None if r.get(key) is None else fmt.format(r[key] / scale)

        x_res = r["total_s"] / res["total_s"] if "total_s" in r and "total_s" in res else None
        floor = num("floor_s") and num("floor_s") + (" (link)" if r.get("floor_kind") == "link" else "")
        table.append([r["mode"], num("total_s"), x_res and f"{x_res:.2f}", floor, num("x_floor", "{:.2f}"),
                      num("peak_bytes", scale=1e9), num("average_bytes", scale=1e9), C.fmt_gb(spec.budget_bytes),
                      r.get("within_budget"), num("streamed_bytes", scale=1e9), r.get("equal"),
                      (r.get("error") or "")[:80].replace("|", "/") or None])
    print(C.markdown_table(headers, table))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
