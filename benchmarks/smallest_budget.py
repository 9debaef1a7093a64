"""The smallest budget each model runs at: trace the model at half its weights' bytes and take
`StreamedModel.minimum_budget_bytes`; then step down, one unit (CUDA: 2 MiB, the allocator's block; CPU:
64 B) below the last budget that planned or to that budget's own figure, whichever is less, until flashmem
refuses one (on CUDA a trace under a tighter cap can measure a smaller activation reserve, so the first
figure may not be the least; at most --max-probes steps). Stream a fresh copy at the least budget that
planned and run it: outputs compared with the resident model's, peak memory over flashmem's set-up and
first calls (CUDA: reserved growth, sampled every 2 ms and read after each call, the resident model off
the device meanwhile; CPU: `stats.peak_bytes`), and the median latency of calls alternating with the
resident model's (side by side, so the ratio is not one run's drift). "one unit less" says whether the
budget one unit below was refused.

    PYTHONPATH=src python benchmarks/smallest_budget.py --device cpu --models neo_125m --split-bytes none,4MiB
    sh benchmarks/install_gpu_deps.sh && PYTHONPATH=src:/tmp/benchdeps python3 benchmarks/smallest_budget.py \\
        --device cuda --models vit_l,sd_unet,neo_125m

Models and inputs are bench_mixed.py's (ViT-L/16 batch 1, the SD 1.5 UNet batch 2 at 64x64 latents, a
GPT-Neo-125M shape at 128 tokens; fp16 on CUDA, fp32 on the CPU). On CUDA "within budget" compares the
reserved growth with the budget; on the CPU the budget covers the weights (activations come on top, and `peak_bytes`
counts them), so it compares what the plan holds. One process runs every row, in turn.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from bench_mixed import OUTPUT_OF, build, tensor_timestep  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="neo_125m", help="comma-separated: vit_l, sd_unet, neo_125m, neo_2.7b (512 tokens; "
                                                     "with --split-bytes 32MiB as in BENCHMARKS' tight budget)")
    p.add_argument("--split-bytes", default="none", help="comma-separated split_bytes values, 'none' for whole "
                                                         "weights; one row per model and value")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first")
    p.add_argument("--small", action="store_true", help="tiny shapes (a logic check)")
    p.add_argument("--max-probes", type=int, default=12, help="budgets tried below the first figure at most")
    return p.parse_args(argv)


def measure(args, name: str, split: str | None) -> dict:
    import torch

    import flashmem
    from flashmem.queue import MemorySampler
    from flashmem.streamed import CUDA_GRANULARITY, CPU_ALIGNMENT

    spec = SimpleNamespace(model=name, small=args.small, device=args.device)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(f) -> float:
        sync()
        t = time.perf_counter()
        f(**inputs)
        sync()
        return time.perf_counter() - t

    model, inputs, _ = build(spec)
    if cuda:
        inputs = tensor_timestep(inputs, dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = {"split_bytes": split} if split else {}
    unit = CUDA_GRANULARITY if cuda else CPU_ALIGNMENT

    def stream(budget: int):
        return flashmem.stream(build(spec)[0], budget, device=args.device, example_kwargs=inputs, **extra)

    # On CUDA the activation reserve is the trace's, and a trace under a tighter cap can need less (the
    # allocator reuses its blocks instead of growing): step down from the figure a roomy trace gives, each
    # time to what the trace at the last budget that planned gives, or one unit less, until one is refused.
    sm = stream(weights // 2)
    least = sm.minimum_budget_bytes
    sm.close()
    below, probes = "not reached", 0
    while probes < args.max_probes:
        probes += 1
        try:
            sm = stream(least - unit)
        except flashmem.BudgetTooSmall:
            below = "BudgetTooSmall"
            break
        least = min(least - unit, sm.minimum_budget_bytes)
        sm.close()
    model = model.to(dev)
    with torch.no_grad():
        ref = getattr(model(**inputs), OUTPUT_OF[name])
    fresh = build(spec)[0]  # built before the peak is watched: its random fill runs on the device
    if cuda:  # the peak: flashmem's set-up and calls alone, the resident model off the device
        model.cpu()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        sampler = MemorySampler(dev).start()
        before = sampler.read()
        torch.cuda.reset_peak_memory_stats()
    sm = flashmem.stream(fresh, least, device=args.device, example_kwargs=inputs, **extra)
    del fresh
    try:
        with torch.no_grad():
            # a call resets the peak statistics at its start: read them after the set-up and after each call
            peaks = [torch.cuda.max_memory_reserved()] if cuda else []
            # the output to the host at once: a caller holding it on the device holds it beside the next call
            out = getattr(sm(**inputs), OUTPUT_OF[name]).cpu()
            for _ in range(args.warmup + 1):
                if cuda:
                    peaks.append(torch.cuda.max_memory_reserved())
                sm(**inputs)
            if cuda:
                torch.cuda.synchronize()
                sampler.stop()
                peak = max(peaks + sampler.bytes) - before
                model.to(dev)
            else:
                peak = sm.stats.peak_bytes
            model(**inputs)
            pairs = [(timed(model), timed(sm)) for _ in range(args.iters)]  # side by side, alternating
        resident_s, streamed_s = (statistics.median(col) for col in zip(*pairs))
        plan = sm.plan
    finally:
        sm.close()
    del model
    return {"model": name, "split_bytes": split, "weight_bytes": weights, "least_bytes": least,
            "share": least / weights, "ring_bytes": plan.arena_bytes - plan.resident_bytes,
            "activation_bytes": plan.activation_bytes, "fixed_bytes": plan.fixed_bytes,
            "resident_ms": resident_s * 1e3, "streamed_ms": streamed_s * 1e3, "peak_bytes": peak,
            # CUDA: the reserved growth; the CPU's budget covers the weights (activations come on top)
            "within_budget": (peak if cuda else plan.total_bytes) <= least,
            "equal": bool(torch.equal(out.float().cpu(), ref.float().cpu())),
            "max_abs_diff": float((out.float().cpu() - ref.float().cpu()).abs().max()), "below": below,
            "probes": probes}


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for split in args.split_bytes.split(","):
            rows.append(measure(args, name, None if split == "none" else split))
            print(rows[-1], flush=True)
    print(f"\ndevice {args.device}; median of {args.iters} calls after {args.warmup + 1} untimed; memory in MB (10^6)")
    headers = ["model", "split_bytes", "weights MB", "smallest budget MB", "share of weights", "ring MB",
               "activations MB", "resident ms", "at the smallest ms", "x resident", "peak MB", "within budget",
               "equal", "one unit less"]
    table = [[r["model"], r["split_bytes"] or "-", f"{r['weight_bytes'] / 1e6:.1f}", f"{r['least_bytes'] / 1e6:.1f}",
              f"{r['share']:.1%}", f"{r['ring_bytes'] / 1e6:.1f}", f"{r['activation_bytes'] / 1e6:.1f}",
              f"{r['resident_ms']:.1f}", f"{r['streamed_ms']:.1f}", f"{r['streamed_ms'] / r['resident_ms']:.2f}",
              f"{r['peak_bytes'] / 1e6:.1f}", r["within_budget"],
              r["equal"] or f"no ({r['max_abs_diff']:.2g})", r["below"]]
             for r in rows]
    print(C.markdown_table(headers, table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
