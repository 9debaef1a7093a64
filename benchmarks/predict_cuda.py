"""How well the cost model predicts: profile a streamed GPT-Neo-2.7B shape (fp16, random weights) on the
GPU, predict its simple plan's latency with the simulator, and measure it, at two budgets and two input
sizes. Prints a table last.

    PYTHONPATH=src python3 benchmarks/predict_cuda.py
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
import _common as C  # noqa: E402

import flashmem  # noqa: E402
from flashmem.costs import profile, simulate  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    folder = C.Path("/dev/shm/flashmem-predict/model")
    if not (folder / "model.safetensors").exists():
        C.prepare_model_folder(folder, "2.7B", "float16", "cuda")
    rows = []
    for tokens in (512, 1):
        ids = torch.randint(0, 50257, (1, tokens), generator=torch.Generator().manual_seed(0))
        for budget in ("0.4GiB", "1GiB"):
            sm = flashmem.from_pretrained(folder, budget=budget, device="cuda", example_inputs=(ids,),
                                          example_kwargs={"use_cache": False})
            with torch.no_grad():
                t0 = time.perf_counter()
                costs = profile(sm, (ids,), {"use_cache": False})
                profile_s = time.perf_counter() - t0
                predicted = simulate(sm.plan, costs).total_s
                times = []
                for _ in range(7):
                    sm(ids, use_cache=False)
                    times.append(sm.stats.wall_s)
            measured = statistics.median(times)
            slow = sorted({(s.op_class, round(s.slowdown, 3)) for s in costs.steps})
            rows.append((tokens, budget, costs.compute_s * 1e3, costs.link.bandwidth_bytes_per_s / 1e9,
                         costs.link.overhead_s * 1e6, predicted * 1e3, measured * 1e3, profile_s, slow))
            sm.close()
            del sm
            torch.cuda.empty_cache()
    print("| tokens | budget | profiled compute ms | link GB/s | per-copy overhead us | predicted ms | measured ms "
          "| predicted / measured | profiling s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tokens, budget, comp, bw, ov, pred, meas, prof, _ in rows:
        print(f"| {tokens} | {budget} | {comp:.2f} | {bw:.1f} | {ov:.1f} | {pred:.2f} | {meas:.2f} | "
              f"{pred / meas:.3f} | {prof:.1f} |")
    print("slowdown beside a transfer, per op class (512 tokens, 1 GiB):", rows[1][-1])


if __name__ == "__main__":
    main()
