#!/usr/bin/env python
"""The CPU cost model of a streamed GPT-Neo-125M shape (fp32, untied head): per op class, the compute time of
its steps alone and the slowdown while a storage read runs beside them (the IO thread competing with
compute on a 2-core machine), the link fit and its rate beside compute (`link_busy_factor`), and the simple
plan's predicted latency against the measured.
`--kernels` times instead the resident model whole and with split_bytes's blocks (no streaming), and its
LM head alone: what splitting changes in compute.

    PYTHONPATH=src python benchmarks/profile_cpu.py --budget 0.1x --split-bytes 8MiB --tokens 128

Uses bench_cpu.py's model folder ($TMPDIR/flashmem-bench-cpu/model; written there if missing).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="0.1x", help="bytes, a size (64MiB) or a fraction of the weights (0.1x)")
    p.add_argument("--split-bytes", default="8MiB")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flashmem-bench-cpu"))
    p.add_argument("--kernels", action="store_true", help="time the resident model whole and split instead")
    args = p.parse_args(argv)
    import torch

    import flashmem
    from flashmem.costs import profile, simulate

    folder = Path(args.workdir) / "model"
    if not (folder / "meta.json").exists():
        C.prepare_model_folder(folder, "125M", "float32", "cpu")
    if args.kernels:
        return kernels(folder, args)
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    budget = C.parse_size(args.budget, total)
    ids = C.input_ids(50257, args.tokens)
    sm = flashmem.from_pretrained(folder, budget, device="cpu", example_inputs=(ids,),
                                  example_kwargs={"use_cache": False}, split_bytes=args.split_bytes)
    with torch.no_grad():
        t = time.perf_counter()
        costs = profile(sm, (ids,), {"use_cache": False})
        profile_s = time.perf_counter() - t
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            sm(ids, use_cache=False)
            times.append(time.perf_counter() - t)
    measured = statistics.median(times)
    predicted = simulate(sm.plan, costs).total_s
    by_class: dict[str, list] = defaultdict(list)
    for s in costs.steps:
        by_class[s.op_class].append(s)
    print(sm.plan.summary(sm.program))
    print(f"link ({costs.link.kind}): {costs.link.bandwidth_bytes_per_s / 1e9:.2f} GB/s, "
          f"{costs.link.overhead_s * 1e6:.1f} us per copy; profile took {profile_s:.1f} s")
    print(f"link beside compute: x{costs.link_busy_factor:.3f} of its idle rate (link_busy_factor; "
          f"{costs.link.bandwidth_bytes_per_s * costs.link_busy_factor / 1e9:.2f} GB/s by the fit)")
    rows = [[cls, len(steps), f"{sum(s.compute_s for s in steps) * 1e3:.1f}", f"{steps[0].slowdown:.2f}"]
            for cls, steps in sorted(by_class.items(), key=lambda kv: -sum(s.compute_s for s in kv[1]))]
    print(C.markdown_table(["op class", "steps", "compute alone ms", "slowdown beside a read"], rows))
    print(f"\npredicted {predicted * 1e3:.1f} ms, measured {measured * 1e3:.1f} ms (median of {args.iters}), "
          f"predicted / measured {predicted / measured:.3f}")
    sm.close()
    return 0


def kernels(folder: Path, args) -> int:
    """Median times of the resident forward whole and split, and of the LM head alone in both forms."""
    import torch

    from flashmem.split import split_model
    from flashmem.units import parse_bytes

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(args.iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    model = C.load_model(folder, torch.float32)
    ids = C.input_ids(model.config.vocab_size, args.tokens)
    x = torch.randn(args.tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = median_ms(lambda: model(ids, use_cache=False))
        ref = model(ids, use_cache=False).logits
        head = model.lm_head.weight
        head_whole = median_ms(lambda: torch.nn.functional.linear(x, head))
        split_model(model, parse_bytes(args.split_bytes))
        split = median_ms(lambda: model(ids, use_cache=False))
        equal = torch.equal(model(ids, use_cache=False).logits, ref)
        head_blocks = median_ms(lambda: model.lm_head(x))
    print(f"resident forward, {args.tokens} tokens: whole {whole:.1f} ms, LM head in blocks of "
          f"{args.split_bytes} {split:.1f} ms (logits equal: {equal}); LM head alone: whole {head_whole:.1f} ms, "
          f"in {len(model.lm_head.parts)} blocks {head_blocks:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
