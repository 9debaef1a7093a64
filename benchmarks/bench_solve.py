#!/usr/bin/env python
"""Solve time of the CP-SAT planner on a GPT-Neo-2.7B-shaped program, on this machine's CPU.

The model folder is the benchmarks' GPT-Neo (fp16, random weights, written once into --workdir/model by
`_common.prepare_model_folder`); flashmem.from_pretrained traces it on the CPU with --tokens token ids, and
`StreamedModel.use_solver` profiles each step and plans with CP-SAT (flashmem.solve.SolverSettings: a
rolling window, a time limit for the whole program, --workers threads). Per budget: ops, loads, the solver's
status and tier note, solve seconds, the predicted latency of the solver's plan against the simple plan's,
and the profiling seconds. Planning happens on the host CPU for any device; this measures how long it takes
for a program of this size, on 2 cores here.

    PYTHONPATH=src python benchmarks/bench_solve.py                       # 2.7B shape: writes 5.6 GB once
    PYTHONPATH=src python benchmarks/bench_solve.py --size tiny --budgets 0.3x   # logic check, seconds
    PYTHONPATH=src python benchmarks/bench_solve.py --split-bytes 4MiB --budgets 0.25GiB   # ~1,400 ops
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2.7B", choices=["2.7B", "125M", "tiny"])
    p.add_argument("--budgets", default="1GiB,0.5GiB", help="comma-separated sizes, or fractions of the weights (0.3x)")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--split-bytes", help="from_pretrained(split_bytes=...): larger matrices split into blocks of "
                                         "this size, a longer program (4MiB: about 1,400 ops for the 2.7B shape)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flashmem-bench-solve"))
    args = p.parse_args(argv)
    import torch

    import flashmem
    from flashmem.costs import simulate
    from flashmem.solve import SolverSettings
    from flashmem.units import fmt_bytes, parse_bytes

    folder = Path(args.workdir) / "model"
    meta = C.prepare_model_folder(folder, args.size, "float16", "cpu")
    ids = torch.randint(0, meta["config"]["vocab_size"], (1, args.tokens), generator=torch.Generator().manual_seed(0))
    rows = []
    for text in args.budgets.split(","):
        budget = int(float(text[:-1]) * meta["weight_bytes"]) if text.endswith("x") else parse_bytes(text)
        t0 = time.perf_counter()
        sm = flashmem.from_pretrained(folder, budget=budget, device="cpu", example_inputs=(ids,),
                                      split_bytes=args.split_bytes)
        traced_s = time.perf_counter() - t0
        simple = sm.plan
        t1 = time.perf_counter()
        plan = sm.use_solver((ids,), {}, settings=SolverSettings(workers=args.workers))
        solver_total_s = time.perf_counter() - t1
        simple_pred = simulate(simple, sm.costs).total_s
        row = dict(budget=fmt_bytes(budget), ops=len(sm.program.ops), loads=len(plan.loads), status=plan.status,
                   note=plan.note, solve_s=round(plan.solve_s, 2), profile_and_solve_s=round(solver_total_s, 2),
                   trace_s=round(traced_s, 2), predicted_ms=round(plan.predicted_s * 1e3, 1),
                   simple_predicted_ms=round(simple_pred * 1e3, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
        sm.close()
    print(f"\nGPT-Neo-{args.size} fp16 on the CPU ({torch.get_num_threads()} threads), {args.tokens} tokens, "
          f"CP-SAT on {args.workers} workers" + (f", split_bytes {args.split_bytes}" if args.split_bytes else ""))
    print("| budget | ops | loads | status | solve s | profile + solve s | predicted ms | simple plan predicted ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']} | {r['ops']} | {r['loads']} | {r['status']} | {r['solve_s']} | "
              f"{r['profile_and_solve_s']} | {r['predicted_ms']} | {r['simple_predicted_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
