#!/usr/bin/env python
"""Host-to-device copy rate by kind of host memory and copy size, idle and beside compute (CUDA).

    PYTHONPATH=src python3 benchmarks/link_rate.py [--mib 512] [--repeats 5]

Host buffers of --mib each, every page written before it is pinned:
  torch pinned        torch.empty(pin_memory=True) (cudaHostAlloc): what bench_queue's link figure uses
  store (shared map)  flashmem's HostStore buffer: an anonymous shared mapping (store.page_aligned_bytes),
                      cudaHostRegister'd
  private map         an anonymous private mapping, cudaHostRegister'd
  private map, THP    the same, madvised MADV_HUGEPAGE before its pages are written (2 MiB pages where the
                      kernel allows)
Per buffer and copy size, the whole buffer is copied to one device buffer in pieces of that size on a side
stream, timed with CUDA events (median of --repeats). The "beside" rows repeat the 4 MiB pieces while other
work runs on another stream (fp16 8192x8192 matrix products; adds over 2 GiB, bound by device memory;
3x3 convolutions of an SD UNet's first block): the link's slowdown beside compute. The machine's
transparent-hugepage settings and IOMMU groups print first. Rows go to $OUT/link_rate.json when $OUT is set.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from flashmem.store import page_aligned_bytes  # noqa: E402

MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
SIZES = [64 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20]


def private_map(nbytes: int, hugepages: bool) -> torch.Tensor:
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    t = torch.frombuffer(m, dtype=torch.uint8)
    if hugepages and _libc.madvise(t.data_ptr(), nbytes, MADV_HUGEPAGE) != 0:
        print(f"madvise(MADV_HUGEPAGE) failed: errno {ctypes.get_errno()}")
    return t


def register(t: torch.Tensor) -> torch.Tensor:
    t.fill_(1)  # every page faulted in before the registration
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister error {int(err)}")
    return t


def rate(src: torch.Tensor, dst: torch.Tensor, piece: int, stream: torch.cuda.Stream, repeats: int) -> float:
    n = src.numel()
    rates = []
    for _ in range(repeats + 1):  # the first is a warm-up
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record()
            for off in range(0, n, piece):
                dst[off:off + piece].copy_(src[off:off + piece], non_blocking=True)
            b.record()
        b.synchronize()
        rates.append(n / (a.elapsed_time(b) / 1e3))
    return statistics.median(rates[1:])


def read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as err:
        return f"unreadable ({err.strerror})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("link_rate.py measures host-to-device copies: it needs CUDA")
    n = args.mib << 20
    print("THP enabled:", read("/sys/kernel/mm/transparent_hugepage/enabled"))
    print("THP shmem_enabled:", read("/sys/kernel/mm/transparent_hugepage/shmem_enabled"))
    groups = os.listdir("/sys/kernel/iommu_groups") if os.path.isdir("/sys/kernel/iommu_groups") else []
    print("IOMMU groups:", len(groups), "| cmdline:", read("/proc/cmdline")[:200])
    buffers = {
        "torch pinned": torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1),
        "store (shared map)": register(page_aligned_bytes(n)),
        "private map": register(private_map(n, hugepages=False)),
        "private map, THP": register(private_map(n, hugepages=True)),
    }
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    rows = []
    for name, src in buffers.items():
        for piece in SIZES:
            rows.append({"host": name, "piece_bytes": piece, "beside": "idle",
                         "GBps": rate(src, dst, piece, side, args.repeats) / 1e9})
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    big = torch.empty(1 << 30, device="cuda", dtype=torch.float16)  # 2 GiB
    img = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16)
    conv = torch.nn.Conv2d(320, 320, 3, padding=1).cuda().half()
    compute = torch.cuda.Stream()
    workloads = {  # each some 60-100 ms of GPU work, longer than the copies beside it
        "fp16 8192^2 products": lambda: [torch.mm(x, x) for _ in range(60)],
        "HBM-bound adds, 2 GiB": lambda: [big.add_(1) for _ in range(60)],
        "UNet-sized 3x3 convs": lambda: [conv(img) for _ in range(1500)],
    }
    with torch.no_grad():
        for label, work in workloads.items():
            for name, src in buffers.items():
                with torch.cuda.stream(compute):
                    work()
                rows.append({"host": name, "piece_bytes": 4 << 20, "beside": label,
                             "GBps": rate(src, dst, 4 << 20, side, 1) / 1e9})
                torch.cuda.synchronize()
    out = os.environ.get("OUT")
    if out:
        Path(out, "link_rate.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{args.mib} MiB per copy series, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| host memory | piece | beside | GB/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['host']} | {r['piece_bytes'] >> 10} KiB | {r['beside']} | {r['GBps']:.1f} |")


if __name__ == "__main__":
    main()
