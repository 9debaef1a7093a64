#!/usr/bin/env python
"""CUDA: where `flashmem.costs.profile` holds device memory. A stack of 16 fp16 linear layers of 2048 features
(134 MB) streamed with `cuda_graphs=True` at half its weights plus 36 MiB (the budget of
`tests/test_cuda_graphs.py`), profiled once, each of the profile's probes and calls wrapped to print its peak
reserved growth over the profile's start, in MiB, against the room the budget leaves beside the arena:

    PYTHONPATH=src python3 benchmarks/profile_memory.py
"""
from __future__ import annotations

import functools

import torch
from torch import nn

import flashmem
import flashmem.costs as costs

MiB = 2**20


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(2048, 2048) for _ in range(16))
        self.norm = nn.LayerNorm(2048)

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return self.norm(x)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_memory.py measures CUDA device memory; this machine has no CUDA device")
    torch.manual_seed(0)
    model = Stack().half().eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randn(2, 64, 2048, generator=torch.Generator().manual_seed(3)).half().cuda()
    sm = flashmem.stream(model, weights // 2 + 36 * MiB, device="cuda", example_inputs=(x,), cuda_graphs=True)
    plan = sm.plan
    room = plan.budget_bytes - plan.arena_bytes - plan.fixed_bytes
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    print(f"budget {plan.budget_bytes / MiB:.1f} MiB: arena {plan.arena_bytes / MiB:.1f}, fixed "
          f"{plan.fixed_bytes / MiB:.1f}, room beside them {room / MiB:.1f}")

    def measured(name: str, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_reserved()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            print(f"  {name:40s} before {(before - base) / MiB:+6.1f}  peak "
                  f"{(torch.cuda.max_memory_reserved() - base) / MiB:+6.1f}  after "
                  f"{(torch.cuda.memory_reserved() - base) / MiB:+6.1f}")
            return out
        return wrapped

    for name in ("measure_link", "measure_wait", "measure_kernel_slowdown", "streamed_link_factor"):
        setattr(costs, name, measured(name, getattr(costs, name)))
    call = type(sm).__call__

    def traced_call(self, *args, **kwargs):
        ex = self._executor
        mode = "profiled" if ex.mover.serial else "timed" if ex.mover.record_loads else "plain"
        return measured(f"call ({mode})", call)(self, *args, **kwargs)

    type(sm).__call__ = traced_call
    try:
        with torch.no_grad():
            costs.profile(sm, (x,), {})
            sm(x)
    finally:
        type(sm).__call__ = call
        sm.close()


if __name__ == "__main__":
    main()
