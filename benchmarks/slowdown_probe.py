#!/usr/bin/env python
"""How much a kernel slows beside host-to-device copies on one GPU, and whether the profile's own way of
measuring it (a step per kernel, timed by events, beside a host thread's 32 MiB copies) sees the same as a
streamed call does (kernels back to back, copies as nodes of the same CUDA graph).

    PYTHONPATH=src python3 benchmarks/slowdown_probe.py [--width 1024] [--tokens 197] [--kernels 96]

The work is a chain of `--kernels` matrix products of a (tokens x width) activation with (width x width)
and (width x 4 width) fp16 weights, as ViT-L's Linear steps are, captured as one CUDA graph. Per mode, the
median of 7 replays, in microseconds per kernel:
  plain            the chain alone
  events           an event pair around each kernel, as a profiled step has (`costs.profile`)
  plain+thread     the chain beside `costs.BackgroundTransfer` (a host thread copying 32 MiB at a time)
  events+thread    the profile's measurement: what `StepCost.slowdown` is made of
  plain+graphcopy  the chain with copies of 2-8 MiB on a second stream inside the same graph, back to back
                   over the whole chain, as a streamed call's loads run beside its compute (the chain
                   timed by events around it, inside the graph)
  events+graphcopy the same with an event pair around each kernel: is it the events that slow beside copies?
Then the copy lane's rate, each copy timed by its own events, alone and beside the chain; and a streamed
chain, each product waiting for its weight's copy (two slots), against max and sum of its copies and chain.
The slowdowns print against the plain chain and against the events chain. Where events+thread over
events is much larger than plain+graphcopy over plain, the profile's slowdown overstates what a streamed
call's kernels lose.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from flashmem.costs import BackgroundTransfer
from flashmem.run_cuda import timing_event


def chain(x: torch.Tensor, weights: list[torch.Tensor], marks: list | None) -> torch.Tensor:
    h = x
    for i, w in enumerate(weights):
        if marks is not None:
            marks[i][0].record()
        h = torch.nn.functional.linear(h, w)
        if marks is not None:
            marks[i][1].record()
    return h


def capture(fn) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm: cuBLAS picks its kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def per_kernel_us(graph: torch.cuda.CUDAGraph, kernels: int, replays: int = 7) -> float:
    times = []
    for _ in range(replays + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / kernels)
    return statistics.median(times[1:])


def inner_per_kernel(graph: torch.cuda.CUDAGraph, inner: tuple, kernels: int, replays: int = 7) -> float:
    """Median over replays of the time between the graph's own `inner` events, per kernel, in us."""
    times = []
    for _ in range(replays + 1):
        graph.replay()
        inner[1].synchronize()
        times.append(inner[0].elapsed_time(inner[1]) * 1e3 / kernels)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--kernels", type=int, default=96)
    args = ap.parse_args()
    dev = torch.device("cuda")
    x = torch.randn(args.tokens, args.width, dtype=torch.float16, device=dev)
    shapes = [(4 * args.width, args.width), (args.width, 4 * args.width)]
    weights = [torch.randn(*shapes[i % 2], dtype=torch.float16, device=dev) * 0.02 for i in range(args.kernels)]
    marks = [(timing_event(), timing_event()) for _ in weights]  # events that time inside a graph
    src = torch.empty(8 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty(8 << 20, dtype=torch.uint8, device=dev)
    copy_stream = torch.cuda.Stream()
    plain_us = per_kernel_us(capture(lambda: chain(x, weights, None)), args.kernels)
    # copies of 2-8 MiB back to back on a second stream of the same graph, 1.5x as long as the chain alone at
    # 55 GB/s, so that the chain runs beside copies from its start to its end; the chain itself is timed by
    # an event pair inside the graph, on the compute stream
    sizes = [2 << 20, 8 << 20, 4 << 20]
    chain_s = plain_us * args.kernels / 1e6
    n_copies = max(4, int(1.5 * chain_s * 55e9 / (sum(sizes) / len(sizes))) + 2)
    inner = (timing_event(), timing_event())

    copy_marks = [(timing_event(), timing_event()) for _ in range(n_copies)]

    def copies(timed: bool) -> None:
        for i in range(n_copies):
            n = sizes[i % len(sizes)]
            if timed:
                copy_marks[i][0].record()
            dst[:n].copy_(src[:n], non_blocking=True)
            if timed:
                copy_marks[i][1].record()

    def with_copies(chain_marks=None, timed_copies: bool = False) -> None:
        copy_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(copy_stream):
            copies(timed_copies)
        inner[0].record()
        chain(x, weights, chain_marks)
        inner[1].record()
        torch.cuda.current_stream().wait_stream(copy_stream)

    graphs = {"plain": capture(lambda: chain(x, weights, None)),
              "events": capture(lambda: chain(x, weights, marks))}
    rows = {name: per_kernel_us(g, args.kernels) for name, g in graphs.items()}
    rows["plain+graphcopy"] = inner_per_kernel(capture(with_copies), inner, args.kernels)
    rows["events+graphcopy"] = inner_per_kernel(capture(lambda: with_copies(marks)), inner, args.kernels)
    copies_us = per_kernel_us(capture(lambda: copies(False)), args.kernels)
    # the copy lane's rate, each copy timed by its own event pair: alone, and beside the plain chain
    moved = sum(sizes[i % len(sizes)] for i in range(n_copies))
    rates = {}
    for name, graph in (("copies alone, each timed", capture(lambda: copies(True))),
                        ("copies beside the chain, each timed", capture(lambda: with_copies(None, True)))):
        spans = []
        for _ in range(8):
            graph.replay()
            torch.cuda.synchronize()
            spans.append(sum(a.elapsed_time(b) for a, b in copy_marks) / 1e3)
        rates[name] = moved / statistics.median(spans[1:]) / 1e9
    # a streamed chain: kernel i waits for copy i (its weight's bytes into one of two slots), as a call's
    # ops wait for their loads; its time against the chain alone and the copies alone
    slots = [torch.empty(w.numel() * 2, dtype=torch.uint8, device=dev) for w in weights[:2]]
    host = [torch.empty(w.numel() * 2, dtype=torch.uint8).pin_memory() for w in weights[:2]]
    landed = [torch.cuda.Event() for _ in weights]
    freed = [torch.cuda.Event() for _ in weights]

    def streamed() -> None:
        compute = torch.cuda.current_stream()
        copy_stream.wait_stream(compute)
        h = x
        for i, w in enumerate(weights):
            with torch.cuda.stream(copy_stream):
                if i >= 2:
                    copy_stream.wait_event(freed[i - 2])
                slots[i % 2].copy_(host[i % 2], non_blocking=True)
                landed[i].record(copy_stream)
            compute.wait_event(landed[i])
            h = torch.nn.functional.linear(h, w)
            freed[i].record(compute)
        compute.wait_stream(copy_stream)

    streamed_us = per_kernel_us(capture(streamed), args.kernels)
    weight_copies = capture(lambda: [slots[i % 2].copy_(host[i % 2], non_blocking=True) for i in range(args.kernels)])
    weight_copies_us = per_kernel_us(weight_copies, args.kernels)
    with BackgroundTransfer(dev):
        rows["plain+thread"] = per_kernel_us(graphs["plain"], args.kernels)
        rows["events+thread"] = per_kernel_us(graphs["events"], args.kernels)
    print(f"{args.kernels} products of ({args.tokens} x {args.width}) fp16 activations with (4w x w) and (w x 4w) "
          f"weights; graph copies: {n_copies} of 2-8 MiB, alone {copies_us * args.kernels / 1e3:.3f} ms against "
          f"the chain's {rows['plain'] * args.kernels / 1e3:.3f} ms")
    print("\n| mode | us per kernel | x plain | x events |")
    print("|---|---|---|---|")
    for name in ("plain", "events", "plain+thread", "events+thread", "plain+graphcopy", "events+graphcopy"):
        us = rows[name]
        print(f"| {name} | {us:.2f} | {us / rows['plain']:.3f} | {us / rows['events']:.3f} |")
    print("\n| copy lane | GB/s |")
    print("|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    floor = max(weight_copies_us, rows["plain"])
    print(f"\nstreamed chain (each product waits for its weight's copy, two slots): {streamed_us:.2f} us per "
          f"kernel; its copies alone {weight_copies_us:.2f}, the chain alone {rows['plain']:.2f}: "
          f"{streamed_us / floor:.3f}x their max, {streamed_us / (weight_copies_us + rows['plain']):.3f}x their sum")
    if copies_us * args.kernels < rows["plain+graphcopy"] * args.kernels:
        print("\n(the graph's copies ended before its chain did: part of plain+graphcopy ran beside an idle link)")

if __name__ == "__main__":
    main()
