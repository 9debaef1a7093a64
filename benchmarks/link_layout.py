#!/usr/bin/env python
"""Whether the host memory's place or the copies' layout changes the host-to-device copy rate (CUDA).

    PYTHONPATH=src python3 benchmarks/link_layout.py

Prints the machine's NUMA nodes, the GPU's NUMA affinity (`nvidia-smi topo -m`), then:
- per NUMA node: 1 GiB of host memory first touched by this process pinned to that node's CPUs, registered
  (cudaHostRegister), copied to the device in 1, 4 and 64 MiB pieces (GB/s, median of 4);
- 1 GiB registered, copied in 1-8 MiB pieces whose sources lie 512 B or 4 KiB apart or back to back, the
  destinations 512 B apart, and the pieces alternating between two copy streams (GB/s, median of the last
  three of four passes).
- per copy size (16 KiB to 16 MiB): microseconds a copy takes in a queue of copies back to back, launched
  from Python and replayed from a CUDA graph, and in a graph whose copies each wait for an event recorded on
  another stream (as a streamed call's loads wait for releases); then overhead + bytes / bandwidth fitted
  to each column by `costs._fit`, as `costs.measure_link` fits its copies.
Each piece is its own `copy_` launched from Python, so small pieces also measure the host's launch rate;
a CUDA graph replays copies without it.
"""
from __future__ import annotations

import glob
import mmap
import os
import subprocess

import torch

from flashmem.costs import _fit


def cpu_lists() -> dict[int, list[int]]:
    out = {}
    for node in sorted(glob.glob("/sys/devices/system/node/node[0-9]*")):
        ids: list[int] = []
        for part in open(node + "/cpulist").read().strip().split(","):
            if "-" in part:
                a, b = part.split("-")
                ids += range(int(a), int(b) + 1)
            elif part:
                ids.append(int(part))
        out[int(node.rsplit("node", 1)[-1])] = ids
    return out


def registered(nbytes: int) -> torch.Tensor:
    t = torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)
    t.fill_(1)  # first touch: the pages land on the node of the CPU that writes them
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister error {int(err)}")
    return t


def rate(src: torch.Tensor, dst: torch.Tensor, piece: int, src_gap: int = 0, dst_gap: int = 0,
         streams: list[torch.cuda.Stream] | None = None, passes: int = 4) -> float:
    """GB/s of copying `src` to `dst` in pieces, each `src_gap` / `dst_gap` bytes after the last one's end."""
    streams = streams or [torch.cuda.Stream()]
    limit = min(src.numel(), dst.numel())
    rates = []
    for _ in range(passes):
        cur = torch.cuda.current_stream()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(cur)
        for s in streams:
            s.wait_event(a)
        so, do, k, moved = 0, 0, 0, 0
        while so + piece <= limit and do + piece <= limit:
            with torch.cuda.stream(streams[k % len(streams)]):
                dst[do:do + piece].copy_(src[so:so + piece], non_blocking=True)
            moved, so, do, k = moved + piece, so + piece + src_gap, do + piece + dst_gap, k + 1
        for s in streams:
            e = torch.cuda.Event()
            e.record(s)
            cur.wait_event(e)
        b.record(cur)
        b.synchronize()
        rates.append(moved / (a.elapsed_time(b) / 1e3) / 1e9)
    rest = sorted(rates[1:])  # the first pass warms up
    return rest[len(rest) // 2]


def queued_us(src: torch.Tensor, dst: torch.Tensor, size: int, mode: str, repeats: int = 5) -> float:
    """Microseconds per copy of `size` bytes in a queue of copies back to back on one stream: "launched"
    (each `copy_` from Python), "graph" (the queue replayed from a CUDA graph) or "graph+waits" (each copy
    in the graph first waits for an event recorded on a second stream)."""
    count = max(8, min(256, (256 << 20) // size))
    copy, other = torch.cuda.Stream(), torch.cuda.Stream()
    marks = [torch.cuda.Event() for _ in range(count)]

    def queue() -> None:
        for i in range(count):
            if mode == "graph+waits":
                marks[i].record(other)
                copy.wait_event(marks[i])
            dst[i * size:(i + 1) * size].copy_(src[i * size:(i + 1) * size], non_blocking=True)

    def enqueue(run) -> None:
        cur = torch.cuda.current_stream()
        copy.wait_stream(cur)
        other.wait_stream(cur)
        with torch.cuda.stream(copy):
            run()
        cur.wait_stream(copy)
        cur.wait_stream(other)

    run = queue
    if mode != "launched":
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            with torch.cuda.graph(graph, stream=side):
                enqueue(queue)
        run = graph.replay
    times = []
    for _ in range(repeats + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        if mode == "launched":
            enqueue(run)
        else:
            run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / count)
    rest = sorted(times[1:])
    return rest[len(rest) // 2]


def per_copy_table(src: torch.Tensor, dst: torch.Tensor) -> None:
    sizes = [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
    modes = ["launched", "graph", "graph+waits"]
    cols = {m: [queued_us(src, dst, s, m) for s in sizes] for m in modes}
    print("\n| copy size | " + " | ".join(f"{m} us/copy" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for i, s in enumerate(sizes):
        print(f"| {s >> 10} KiB | " + " | ".join(f"{cols[m][i]:.2f}" for m in modes) + " |")
    fits = [_fit(sizes, [us * 1e-6 for us in cols[m]], m) for m in modes]
    print("| fitted overhead us, GB/s | " + " | ".join(
        f"{f.overhead_s * 1e6:.2f}, {f.bandwidth_bytes_per_s / 1e9:.1f}" for f in fits) + " |")


def main() -> None:
    nodes = cpu_lists()
    print("NUMA nodes (first CPUs, count):", {k: (v[:3], len(v)) for k, v in nodes.items()})
    try:
        print(subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout)
    except (OSError, subprocess.SubprocessError) as err:
        print("nvidia-smi topo -m:", err)
    n = 1 << 30
    dst = torch.empty(n + (8 << 20), dtype=torch.uint8, device="cuda")
    allowed = os.sched_getaffinity(0)
    for node, ids in nodes.items():
        use = set(ids) & allowed
        if not use:
            continue
        os.sched_setaffinity(0, use)
        src = registered(n)
        os.sched_setaffinity(0, allowed)
        print(f"memory on node {node}: " + ", ".join(f"{p >> 20} MiB {rate(src, dst, p):.1f}" for p in
                                                      (1 << 20, 4 << 20, 64 << 20)) + " GB/s")
        torch.cuda.cudart().cudaHostUnregister(src.data_ptr())
        del src
    src = registered(n + (8 << 20))
    two = [torch.cuda.Stream(), torch.cuda.Stream()]
    print("\n| piece | sources 512 B apart | 4 KiB apart | back to back | two streams | destinations 512 B apart |")
    print("|---|---|---|---|---|---|")
    for piece in (1 << 20, 2 << 20, 4 << 20, 8 << 20):
        row = [rate(src, dst, piece, 512), rate(src, dst, piece, 4096), rate(src, dst, piece),
               rate(src, dst, piece, streams=two), rate(src, dst, piece, dst_gap=512)]
        print(f"| {piece >> 20} MiB | " + " | ".join(f"{r:.1f}" for r in row) + " |")
    per_copy_table(src, dst)


if __name__ == "__main__":
    main()
