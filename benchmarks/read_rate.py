#!/usr/bin/env python
"""Read rate of safetensors files from cold storage into host memory: the raw rate against the ways a
host store can be filled, one variant after another in one process, the page cache dropped before each.

Variants (4 threads, 16 MiB pieces, weight order, unless named):
  raw prefaulted        each file read whole in file order into a buffer whose pages are already faulted in
                        (MADV_POPULATE_WRITE before the clock starts): the storage rate, the reference
  raw fresh             the same into a fresh anonymous mapping (each page faulted in by the read's copy)
  store                 `HostStore.fill_in_background` as it is (pins chunk by chunk on CUDA), and on 8 threads
  old store             the fill as it was: weight order, fresh buffer, each chunk pinned by the reader
                        that completes it
  file order            the store's pieces sorted by file and offset
  hugepage              the buffer madvised MADV_HUGEPAGE (2 MiB faults instead of 4 KiB ones)
  prefault ahead        a helper thread populates (MADV_POPULATE_WRITE) each chunk before its reads
  8 threads, 32/64 MiB  more threads, larger pieces
  fadvise               POSIX_FADV_SEQUENTIAL + WILLNEED on every file first
  O_DIRECT              each weight's page-aligned span read with O_DIRECT (storage DMAs into the buffer,
                        no page cache copy); the weight lies at its file offset's remainder in its slot
CUDA only (skipped, and said so, without it): pin by readers (as the old store), pin after all reads, pin by
a separate thread as chunks complete, pin ahead (a helper registers each chunk before its reads, which faults
its pages in), the same with O_DIRECT.

Each variant's bytes are checked against the files for a sample of weights. GB/s = bytes of the weights
(raw: of the files) / seconds from the first read to the last read and pin.

    PYTHONPATH=src python benchmarks/read_rate.py                 # writes --size (4 GB) of files to a temp dir
    PYTHONPATH=src python benchmarks/read_rate.py --make 3GB      # the same, 3 GB
    PYTHONPATH=src python benchmarks/read_rate.py FOLDER [--size 4GB]   # a model folder (its first --size)
    --only 'NAME;NAME'  runs a subset (names as printed, matched by prefix); the raw reference always runs
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from flashmem import store as store_mod  # noqa: E402
from flashmem.files import TensorLocation, read_header  # noqa: E402
from flashmem.units import align_up, parse_bytes  # noqa: E402

PAGE = 4096
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
CUDA = torch.cuda.is_available()


def madvise(buf: torch.Tensor, start: int, n: int, advice: int) -> None:
    if n > 0 and _libc.madvise(buf.data_ptr() + start, n, advice) != 0:
        raise OSError(ctypes.get_errno(), f"madvise({advice}) failed: {os.strerror(ctypes.get_errno())}")


def pin(buf: torch.Tensor, start: int, n: int, pinned: list) -> None:
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr() + start, n, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister error {int(err)}")
    pinned.append(start)


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError as err:
        print(f"  (could not drop the page cache: {err}; this variant may read warm pages)", flush=True)
        return False


# --- the files ------------------------------------------------------------------------------------------

def natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def make_files(folder: Path, total: int) -> None:
    """GPT-Neo-2.7B-shaped fp16 tensors (hidden 2560) of random bits, as many layers as fit `total`, in
    shards of about 1.4 GB in model order (safetensors sorts each shard by name: h.10 before h.2)."""
    from safetensors.torch import save_file

    h = 2560
    layer = [("ln_1.weight", (h,)), ("ln_1.bias", (h,))] + [(f"attn.{p}.weight", (h, h)) for p in "qkvo"] + [
        ("ln_2.weight", (h,)), ("ln_2.bias", (h,)), ("mlp.c_fc.weight", (4 * h, h)), ("mlp.c_fc.bias", (4 * h,)),
        ("mlp.c_proj.weight", (h, 4 * h)), ("mlp.c_proj.bias", (h,))]
    per_layer = sum(2 * torch.Size(s).numel() for _, s in layer)
    embed = 2 * 50257 * h
    n_layers = max(1, (total - 2 * embed) // per_layer)
    order = [("transformer.wte.weight", (50257, h))] + [
        (f"transformer.h.{i}.{n}", s) for i in range(n_layers) for n, s in layer] + [
        ("transformer.ln_f.weight", (h,)), ("lm_head.weight", (50257, h))]
    shards, cur, size = [], {}, 0
    for name, shape in order:
        cur[name] = torch.empty(shape, dtype=torch.int16).random_().view(torch.float16)
        size += cur[name].nbytes
        if size >= 1_400_000_000:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    for k, sd in enumerate(shards):
        save_file(sd, str(folder / f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"))
        del sd
    (folder / "order.txt").write_text("\n".join(n for n, _ in order))
    os.sync()


def weights_of(folder: Path, limit: int | None) -> tuple[list[TensorLocation], list[str]]:
    """The folder's tensors in model order (order.txt when written by --make, else a natural sort of the
    names), the first `limit` bytes of them."""
    found = {}
    files = sorted(str(p) for p in folder.glob("*.safetensors"))
    for p in files:
        found.update(read_header(Path(p)))
    names = (folder / "order.txt").read_text().split() if (folder / "order.txt").exists() else sorted(found, key=natural)
    locs, total = [], 0
    for n in names:
        if limit is not None and total >= limit:
            break
        locs.append(found[n])
        total += found[n].nbytes
    return locs, sorted({loc.path for loc in locs}, key=files.index)


# --- one fill ------------------------------------------------------------------------------------------

class Layout:
    """Where each weight goes in the buffer; jobs are (path, file offset, buffer offset, length, needed)."""

    def __init__(self, locs, files, kind: str, piece: int):
        self.views, self.jobs, self.chunks = [], [], []
        total, chunk_start = 0, 0
        if kind == "raw":  # whole files, each at a page
            for p in files:
                size = os.path.getsize(p)
                base = total
                for a in range(0, size, piece):
                    self.jobs.append((p, a, base + a, min(piece, size - a), min(piece, size - a)))
                total = align_up(base + size, PAGE)
                self.file_base = getattr(self, "file_base", {})
                self.file_base[p] = base
            self.views = [self.file_base[loc.path] + loc.offset_bytes for loc in locs]
        for loc in locs if kind != "raw" else []:
            if total - chunk_start >= store_mod.PIN_CHUNK_BYTES:
                total = align_up(total, PAGE)
                self.chunks.append((chunk_start, total))
                chunk_start = total
            if kind == "direct":  # the page-aligned span around the weight, in a slot of its own
                total = align_up(total, PAGE)
                a0 = loc.offset_bytes // PAGE * PAGE
                span = align_up(loc.offset_bytes + loc.nbytes, PAGE) - a0
                self.views.append(total + loc.offset_bytes - a0)
                for a in range(0, span, piece):
                    need = min(piece, loc.offset_bytes + loc.nbytes - a0 - a)
                    self.jobs.append((loc.path, a0 + a, total + a, min(piece, span - a), need))
                total += span
            else:
                total = align_up(total, store_mod.HOST_ALIGNMENT)
                self.views.append(total)
                for a in range(0, loc.nbytes, piece):
                    n = min(piece, loc.nbytes - a)
                    self.jobs.append((loc.path, loc.offset_bytes + a, total + a, n, n))
                total += loc.nbytes
        total = align_up(max(total, 1), PAGE)
        if kind == "raw":  # chunks of about PIN_CHUNK_BYTES on page boundaries
            self.chunks = [(a, min(a + store_mod.PIN_CHUNK_BYTES, total)) for a in range(0, total, store_mod.PIN_CHUNK_BYTES)]
        elif chunk_start < total:
            self.chunks.append((chunk_start, total))
        self.total = total


def fill(layout: Layout, *, threads=4, direct=False, order="weight", hugepage=False, prefault=None,
         pin_mode=None, fadvise=False) -> tuple[torch.Tensor, list, float]:
    """Run one variant; returns (buffer, pinned offsets, seconds)."""
    buf = torch.frombuffer(mmap.mmap(-1, layout.total), dtype=torch.uint8)
    if hugepage:
        madvise(buf, 0, layout.total, MADV_HUGEPAGE)
    if prefault == "before":
        madvise(buf, 0, layout.total, MADV_POPULATE_WRITE)
    jobs = sorted(layout.jobs, key=lambda j: (j[0], j[1])) if order == "file" else list(layout.jobs)
    starts = [c[0] for c in layout.chunks]
    import bisect

    chunk_of = [bisect.bisect_right(starts, j[2]) - 1 for j in jobs]
    left = [0] * len(layout.chunks)
    for c in chunk_of:
        left[c] += 1
    pinned: list = []
    ready = [threading.Event() for _ in layout.chunks]
    done_q: list = []
    done_cv = threading.Condition()
    errors: list = []
    lock = threading.Lock()
    cursor = iter(range(len(jobs)))
    t0 = time.perf_counter()
    if fadvise:
        for p in {j[0] for j in jobs}:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            os.close(fd)
    ahead = prefault == "ahead" or pin_mode == "ahead"
    helpers = []
    if ahead:  # chunks in the order the jobs first touch them
        seq = list(dict.fromkeys(chunk_of))

        def prepare():
            try:
                for c in seq:
                    a, b = layout.chunks[c]
                    if pin_mode == "ahead":
                        pin(buf, a, b - a, pinned)
                    else:
                        madvise(buf, a, b - a, MADV_POPULATE_WRITE)
                    ready[c].set()
            except BaseException as e:
                errors.append(e)
                for ev in ready:
                    ev.set()
        helpers.append(threading.Thread(target=prepare))
    if pin_mode == "thread":
        def pinner():
            for _ in layout.chunks:
                with done_cv:
                    while not done_q:
                        done_cv.wait()
                    c = done_q.pop(0)
                a, b = layout.chunks[c]
                pin(buf, a, b - a, pinned)
        helpers.append(threading.Thread(target=pinner))
    for t in helpers:
        t.start()

    def work():
        fds = {}
        try:
            while True:
                with lock:
                    k = next(cursor, None)
                if k is None or errors:
                    return
                path, off, dst, n, need = jobs[k]
                c = chunk_of[k]
                if ahead:
                    ready[c].wait()
                fd = fds.get(path)
                if fd is None:
                    fd = fds[path] = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                mv = memoryview(buf[dst:dst + n].numpy())
                got = 0
                while got < need:
                    r = os.preadv(fd, [mv[got:]], off + got)
                    if r <= 0:
                        raise OSError(f"short read at {off + got} of {path}")
                    got += r
                with lock:
                    left[c] -= 1
                    last = left[c] == 0
                if last and pin_mode == "readers":
                    a, b = layout.chunks[c]
                    pin(buf, a, b - a, pinned)
                elif last and pin_mode == "thread":
                    with done_cv:
                        done_q.append(c)
                        done_cv.notify()
        except BaseException as e:
            errors.append(e)
        finally:
            for fd in fds.values():
                os.close(fd)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if pin_mode == "after":
        for a, b in layout.chunks:
            pin(buf, a, b - a, pinned)
    for t in helpers:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return buf, pinned, seconds


def check(buf, views, locs) -> bool:
    """The buffer holds the files' bytes for a sample of weights (first, last, and six between)."""
    idx = sorted({0, len(locs) - 1, *range(0, len(locs), max(1, len(locs) // 6))})
    for i in idx:
        loc = locs[i]
        with open(loc.path, "rb") as f:
            f.seek(loc.offset_bytes)
            want = f.read(loc.nbytes)
        if bytes(buf[views[i]:views[i] + loc.nbytes].numpy()) != want:
            return False
    return True


def release(buf, pinned) -> None:
    for off in pinned:
        torch.cuda.cudart().cudaHostUnregister(buf.data_ptr() + off)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", help="a folder of safetensors files (default: write --size of them)")
    ap.add_argument("--make", help="write random safetensors files of this total size into a temp folder")
    ap.add_argument("--size", default="4GB", help="bytes of weights to read (default 4GB; --make's default)")
    ap.add_argument("--dir", default=None, help="where --make writes (default $TMPDIR)")
    ap.add_argument("--only", default="", help="variant-name prefixes, separated by ';'")
    ap.add_argument("--repeat", type=int, default=3, help="rounds over all variants (default 3); the median is reported")
    args = ap.parse_args(argv)
    tmp = None
    if args.folder:
        folder = Path(args.folder)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="flashmem-read-rate-", dir=args.dir)
        folder = Path(tmp.name)
        size = parse_bytes(args.make or args.size)
        t = time.perf_counter()
        make_files(folder, size)
        print(f"wrote {size / 1e9:.2f} GB of safetensors files to {folder} in {time.perf_counter() - t:.1f} s")
    limit = None if (args.folder is None or not args.size) else parse_bytes(args.size)
    locs, files = weights_of(folder, limit)
    wbytes = sum(loc.nbytes for loc in locs)
    fbytes = sum(os.path.getsize(p) for p in files)
    print(f"{len(locs)} weights, {wbytes / 1e9:.2f} GB in {len(files)} files ({fbytes / 1e9:.2f} GB); "
          f"CUDA: {torch.cuda.get_device_name() if CUDA else 'none (the pinning variants are skipped)'}")
    if CUDA:
        torch.cuda.init()
        torch.zeros(1, device="cuda")

    P = store_mod.READ_PIECE_BYTES
    mb = 1 << 20
    variants = [  # (name, layout kind, piece, fill options)
        ("raw prefaulted", "raw", 16 * mb, dict(prefault="before")),
        ("raw fresh", "raw", 16 * mb, {}),
        ("store (HostStore.fill_in_background)", "store", P, {}),
        ("store, 8 threads", "store", P, {}),
        ("store, 4096-congruent layout", "store", P, {}),
        ("old store (readers pin on CUDA)", "plain", 16 * mb, dict(pin_mode="readers" if CUDA else None)),
        ("file order", "plain", 16 * mb, dict(order="file")),
        ("hugepage", "plain", 16 * mb, dict(hugepage=True)),
        ("prefault ahead", "plain", 16 * mb, dict(prefault="ahead")),
        ("8 threads", "plain", 16 * mb, dict(threads=8)),
        ("32 MiB pieces", "plain", 32 * mb, {}),
        ("64 MiB pieces", "plain", 64 * mb, {}),
        ("fadvise sequential+willneed", "plain", 16 * mb, dict(fadvise=True)),
        ("O_DIRECT", "direct", 16 * mb, dict(direct=True)),
        ("O_DIRECT, 8 threads", "direct", 16 * mb, dict(direct=True, threads=8)),
        ("O_DIRECT, 32 MiB pieces", "direct", 32 * mb, dict(direct=True)),
        ("O_DIRECT, hugepage", "direct", 16 * mb, dict(direct=True, hugepage=True)),
    ]
    if CUDA:
        variants += [
            ("pin after all reads", "plain", 16 * mb, dict(pin_mode="after")),
            ("pin by a separate thread", "plain", 16 * mb, dict(pin_mode="thread")),
            ("pin ahead (helper pins before reads)", "plain", 16 * mb, dict(pin_mode="ahead")),
            ("hugepage, pin by readers", "plain", 16 * mb, dict(hugepage=True, pin_mode="readers")),
            ("O_DIRECT, pin by readers", "direct", 16 * mb, dict(direct=True, pin_mode="readers")),
            ("O_DIRECT, pin ahead", "direct", 16 * mb, dict(direct=True, pin_mode="ahead")),
            ("O_DIRECT, hugepage, pin by readers", "direct", 16 * mb, dict(direct=True, hugepage=True, pin_mode="readers")),
        ]
    else:
        print("no CUDA: skipping the variants that pin (pin by readers / after all reads / by a separate thread / ahead)")
    only = [s.strip() for s in args.only.split(";") if s.strip()]
    if only:
        variants = [v for v in variants if v[0] == "raw prefaulted" or any(v[0].startswith(o) for o in only)]
    results = {v[0]: [] for v in variants}
    all_dropped = True
    for r in range(args.repeat):
        print(f"round {r + 1} of {args.repeat}", flush=True)
        for v in variants:
            got = run_variant(v, locs, files, wbytes, fbytes)
            if got is not None:
                results[v[0]].append(got)
                all_dropped &= got[2]
    rows = []
    for name, kind, _, _ in variants:
        got = sorted(results[name])
        if got:
            seconds, ok = got[len(got) // 2][0], all(g[1] for g in got)
            nbytes = fbytes if kind == "raw" else wbytes
            rows.append((name, nbytes / seconds / 1e9, seconds, ok, [nbytes / g[0] / 1e9 for g in got]))
    raw = rows[0][1]
    print(f"\n{wbytes / 1e9:.2f} GB of weights ({fbytes / 1e9:.2f} GB of files); page cache dropped before each "
          f"variant: {'yes' if all_dropped else 'NO'}; median of {args.repeat} rounds")
    print("| variant | GB/s | x raw | s | GB/s of each round | bytes |\n|---|---|---|---|---|---|")
    for name, rate, seconds, ok, each in rows:
        print(f"| {name} | {rate:.2f} | {rate / raw:.2f} | {seconds:.2f} | {' '.join(f'{e:.2f}' for e in each)} "
              f"| {'ok' if ok else 'WRONG'} |")
    if tmp is not None:
        tmp.cleanup()


def run_variant(variant, locs, files, wbytes, fbytes):
    """One variant, the page cache dropped first: (seconds, bytes right, cache dropped) or None if it failed."""
    name, kind, piece, opts = variant
    opts_threads = 8 if "8 threads" in name else 4
    alignment = store_mod.HOST_ALIGNMENT
    if "4096-congruent" in name:  # each weight's aligned middle on a page, not only on 512 bytes
        store_mod.HOST_ALIGNMENT = 4096
    dropped = drop_caches()
    try:
        if kind == "store":  # the store itself
            t0 = time.perf_counter()
            st = store_mod.HostStore.for_sources(locs)
            st.fill_in_background(locs, threads=opts_threads)
            st.wait_all()
            seconds = time.perf_counter() - t0
            ok = check(st.buffer, st.offsets, locs)
            st.close()
            store_mod.HOST_ALIGNMENT = alignment
        else:
            lay = Layout(locs, files, kind, piece)
            buf, pinned, seconds = fill(lay, **opts)
            ok = check(buf, lay.views, locs)
            release(buf, pinned)
            del buf
    except OSError as err:
        print(f"{name:40s} failed: {err}", flush=True)
        return None
    nbytes = fbytes if kind == "raw" else wbytes
    print(f"{name:40s} {nbytes / seconds / 1e9:6.2f} GB/s  {seconds:6.2f} s  bytes {'ok' if ok else 'WRONG'}"
          f"{'' if dropped else '  (cache not dropped)'}", flush=True)
    return seconds, ok, dropped


if __name__ == "__main__":
    main()
