#!/usr/bin/env python
"""Where a streamed call's time goes on one GPU: host time per call against device time, allocator
activity per call, and the host functions that take the time.

    sh benchmarks/install_gpu_deps.sh && PYTHONPATH=src:/tmp/benchdeps python3 benchmarks/overhead_cuda.py

For each model (bench_mixed's shapes: vit_l, sd_unet) and each budget (resident, then flashmem at 100% of the
weight bytes, where nothing streams, and at --budgets fractions), in one process:
  wall_ms     median of --iters warm calls, synchronize before and after
  host_ms     median host time of the same calls (perf_counter from the call's entry to its return, no
              synchronize): where it is close to wall_ms, the GPU waits for the host (launch-bound)
  stall_ms    flashmem's stats.stall_s (compute waiting for copies, from CUDA events; with --time-stalls)
  retries     caching-allocator retries per call (num_alloc_retries: it freed its cached blocks, with a
              device synchronize, to stay under the call's cap)
  mallocs     cudaMalloc calls per call (num_device_alloc); frees: cudaFree calls (num_device_free)
  empty_cache torch.cuda.empty_cache calls per call (flashmem gives cached blocks back when they would
              take reserved memory past the call's cap)
  loads/copies/waits  the plan's loads, the copies they merge into, and the ops that wait for a load
Each row runs eagerly (the hooks, one launch per kernel) and with CUDA graphs (flashmem's cuda_graphs=True;
the resident row captured by hand, bench_mixed.resident_graph); the UNet's timestep is a device tensor in
both, so that it can be captured. With --profile-calls, the top host functions (cProfile, tottime) of that
many eager calls at the smallest budget print before the table. Rows go to $OUT/overhead_cuda.json when $OUT is set; the table prints last.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import bench_mixed as B  # noqa: E402


def counters(dev) -> dict:
    import torch

    s = torch.cuda.memory_stats(dev) if dev.type == "cuda" else {}
    return {"retries": s.get("num_alloc_retries", 0), "mallocs": s.get("num_device_alloc", 0),
            "frees": s.get("num_device_free", 0)}


def measure(call, dev, iters: int, sm=None) -> dict:
    import torch

    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    calls = {"n": 0}
    real_empty = torch.cuda.empty_cache

    def counted():
        calls["n"] += 1
        real_empty()

    for _ in range(3):
        call()
    sync()
    before = counters(dev)
    torch.cuda.empty_cache = counted
    walls, hosts, stalls = [], [], []
    try:
        for _ in range(iters):
            sync()
            t = time.perf_counter()
            out = call()
            h = time.perf_counter() - t
            sync()
            walls.append(time.perf_counter() - t)
            hosts.append(h)
            del out
            if sm is not None and sm.stats is not None and sm.stats.stall_s is not None:
                stalls.append(sm.stats.stall_s)
    finally:
        torch.cuda.empty_cache = real_empty
    after = counters(dev)
    row = {"wall_ms": statistics.median(walls) * 1e3, "host_ms": statistics.median(hosts) * 1e3,
           "wall_min_ms": min(walls) * 1e3, "wall_max_ms": max(walls) * 1e3,
           "empty_cache": calls["n"] / iters}
    row.update({k: (after[k] - before[k]) / iters for k in after})
    if stalls:
        row["stall_ms"] = statistics.median(stalls) * 1e3
    return row


def plan_counts(sm) -> dict:
    plan = sm.plan
    mover = sm._executor.mover if sm._executor is not None else None
    copies = sum(len(g) for g in mover.groups.values()) if mover is not None and hasattr(mover, "groups") else None
    return {"loads": len(plan.loads), "copies": copies, "waits": len({ld.first_use for ld in plan.loads}),
            "ops": plan.n_ops, "residents": len(plan.residents)}


def run_model(name: str, args) -> tuple[list[dict], str]:
    import torch
    import flashmem

    dev = torch.device(args.device)
    bargs = B.parse_args(["--mode", "resident", "--model", name, "--device", args.device]
                         + (["--small"] if args.small else []))
    model, inputs, _ = B.build(bargs)
    total = C.tensor_bytes_where(model, lambda t: True)
    rows, prof_text = [], ""
    if dev.type == "cuda":
        inputs = B.tensor_timestep(inputs, dev)  # capturable; the same for every row
    with torch.no_grad():
        model.to(dev)
        rows.append(dict(model=name, budget="resident", graphs=False,
                         **measure(lambda: model(**inputs), dev, args.iters)))
        if "graphs" in args.variant_list:
            call = B.resident_graph(model, inputs)
            rows.append(dict(model=name, budget="resident", graphs=True, **measure(call, dev, args.iters)))
            del call
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        fractions = [1.0] + args.fractions
        for f in fractions:
            budget = int(f * total) + (512 << 20 if f == 1.0 else 0)  # 100%: the activations fit beside
            for variant in args.variant_list:
                graphs = variant == "graphs"
                model, _, _ = B.build(bargs)  # a closed StreamedModel keeps the model's weights
                debug = flashmem.DebugOptions(time_stalls=args.time_stalls)
                sm = flashmem.stream(model, budget, device=args.device, example_kwargs=inputs, cuda_graphs=graphs,
                                     debug=debug)
                try:
                    row = dict(model=name, budget=f"{f:.0%}", budget_bytes=budget, graphs=graphs, **plan_counts(sm))
                    row.update(measure(lambda: sm(**inputs), dev, args.iters, sm))
                    if graphs:
                        row.update(replays=sm._graphs.replays, refusals=list(sm.graph_refusals.values()),
                                   graph_held_mib=sm._graphs.graph.held_bytes / 2**20 if sm._graphs.graph else None,
                                   reserve_mib=sm.plan.activation_bytes / 2**20)
                    rows.append(row)
                    if f == fractions[-1] and args.profile_calls and not graphs:
                        prof = cProfile.Profile()
                        prof.enable()
                        for _ in range(args.profile_calls):
                            sm(**inputs)
                        prof.disable()
                        buf = io.StringIO()
                        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
                        prof_text = f"--- {name} at {f:.0%}: top host functions over {args.profile_calls} calls\n" + \
                            "\n".join(line for line in buf.getvalue().splitlines() if line.strip())[-6000:]
                finally:
                    sm.close()
                    del sm, model
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, prof_text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="vit_l,sd_unet")
    p.add_argument("--budgets", default="0.75,0.5,0.25")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile-calls", type=int, default=0, help="cProfile this many eager calls at the last budget")
    p.add_argument("--variants", default="eager,graphs", help="eager (hooks, one launch per kernel), graphs "
                   "(cuda_graphs=True; the resident row captured by hand), or both")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--time-stalls", action="store_true",
                   help="streamed rows time every op's waits (DebugOptions.time_stalls: stall_ms; costs time)")
    p.add_argument("--device", default="cuda", help="cpu with --small: a logic check of this script")
    p.add_argument("--small", action="store_true", help="bench_mixed's tiny models")
    args = p.parse_args(argv)
    args.fractions = [float(x) for x in args.budgets.split(",") if x.strip()]
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.device != "cuda":
        args.variant_list = [v for v in args.variant_list if v != "graphs"]
    rows, profiles = [], []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        try:
            r, prof = run_model(name, args)
        except Exception as e:  # noqa: BLE001 - a model that cannot run becomes an error row
            rows.append({"model": name, "budget": "-", "error": f"{type(e).__name__}: {e}"[:300]})
            continue
        rows.extend(r)
        profiles.append(prof)
    out = C.out_dir()
    if out is not None:
        (out / "overhead_cuda.json").write_text(json.dumps({"versions": B.versions(), "rows": rows}, indent=1))
    for prof in profiles:
        print(prof)
    keys = ["model", "budget", "graphs", "wall_ms", "host_ms", "stall_ms", "retries", "mallocs", "frees", "empty_cache",
            "loads", "copies", "waits", "replays", "graph_held_mib", "reserve_mib"]
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    print(C.markdown_table(keys, [[fmt(r.get(k)) for k in keys] if "error" not in r else
                                  [r["model"], r["budget"], r["error"]] + [""] * (len(keys) - 3) for r in rows]))
    for r in rows:
        for why in r.get("refusals") or ():
            print(f"{r['model']} {r['budget']}: eager: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
