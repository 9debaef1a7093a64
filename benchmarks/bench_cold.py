#!/usr/bin/env python
"""Cold start: from the model folder on storage to the first output, one fresh process per (mode, cache state).

GPT-Neo-2.7B shape (fp16, untied head, random weights written once with save_pretrained into
--workdir/model, default $TMPDIR/flashmem-bench-cold, reused when present), --tokens 512, batch 1, CUDA.
Cache states: "cold" = the folder's files evicted from the page cache before the child starts
(`sync; echo 1 > /proc/sys/vm/drop_caches` where allowed, and posix_fadvise(DONTNEED) per file; the pages
still resident, checked with mincore, are recorded); "warm" = the files read once right before.
Modes: flashmem (flashmem.from_pretrained: weights read into pinned memory on 4 threads while the trace
computes, then one call), flashmem_lazy (the same with lazy_trace=True: the first call is the trace, so the
first output costs one forward), flashmem_host (the same with host_budget=--host-budget: each call reads what it
streams from the files through a pinned staging ring of that size), transformers (from_pretrained,
device_map=cuda), accelerate (device_map="auto", max_memory={0: budget, "cpu": "200GiB"}), diffusers_leaf (transformers load to the CPU, then
apply_group_offloading leaf level, use_stream=True). Each child times "ready" (loaded) and "first output"
(first forward synchronised) from just before the load (imports and the CUDA context come before), a
second call's seconds (the page cache then holds what the first call read), peak
max_memory_reserved and VmHWM, and the sha256 of the logits (float32 bytes), compared with the
transformers row of the same cache state. An `io` child measures the storage read rate cold and warm
(16 MiB preads on 4 threads) and the pinned host-to-device link (256 MiB, median of 5).
floor = max(bytes / storage rate (that cache state), bytes / link, transformers' first - ready).

    sh benchmarks/install_gpu_deps.sh && PYTHONPATH=src:/tmp/benchdeps python3 benchmarks/bench_cold.py
    PYTHONPATH=src python benchmarks/bench_cold.py --small --device cpu     # logic check, seconds

Rows go to $OUT/bench_cold.json when $OUT is set (logs to $OUT/bench_cold_logs); the table prints last.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import hashlib
import inspect
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_PROCESS = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODES = ["flashmem", "flashmem_lazy", "flashmem_host", "transformers", "accelerate", "diffusers_leaf"]
CACHES = ["cold", "warm"]
CHUNK = 16 << 20
FORMAT = 1  # bump when the stored folder's contents change


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="all", choices=["all", "prepare", "io"] + MODES)
    p.add_argument("--cache", choices=CACHES, help="(child) the cache state it runs in, for its row")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--budget", help='flashmem budget and accelerate max_memory[0]: "1GiB" (default), bytes, or '
                                    'a fraction of the weights "0.25x" (--small default)')
    p.add_argument("--tokens", type=int, help="tokens per forward, batch 1 (default 512; --small: 48)")
    p.add_argument("--small", action="store_true", help="tiny GPT-Neo: checks the logic in seconds")
    p.add_argument("--size", choices=["2.7B", "125M", "tiny"], help="GPT-Neo shape (default 2.7B; --small: tiny)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="weights' dtype (float32 for the CPU, where fp16 matrix products are slow)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "flashmem-bench-cold"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--host-budget", default="1GiB", help="flashmem_host's host_budget (CUDA)")
    p.add_argument("--child-timeout", type=float, default=300, help="seconds per mode child")
    args = p.parse_args(argv)
    args.size = "tiny" if args.small else (args.size or "2.7B")
    args.torch_dtype = getattr(__import__("torch"), args.dtype)
    args.tokens = args.tokens or (48 if args.small else 512)
    args.budget = args.budget or ("0.25x" if args.small else "1GiB")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.mode_list) - set(MODES):
        p.error(f"unknown modes {sorted(set(args.mode_list) - set(MODES))}")
    return args


# ==== page cache and storage (no torch) ===================================================================
def folder_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def st_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best):
                best, kind = mnt, parts[2]
    return kind


def resident_fraction(files: list[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore), None where it cannot be asked."""
    libc, page, have, total = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE"), 0, 0
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes, libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_size_t]
    for f in (f for f in files if f.stat().st_size):
        size, n = f.stat().st_size, -(-f.stat().st_size // page)
        fd = os.open(f, os.O_RDONLY)
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        vec = (ctypes.c_ubyte * n)()
        ok = libc.mincore(addr, size, vec) == 0
        libc.munmap(addr, size)
        if not ok:
            return None
        have, total = have + n - bytes(vec).count(0), total + n
    return have / total if total else None


def evict(files: list[Path]) -> dict:
    drop = subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], capture_output=True, text=True)
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"drop_caches_allowed": drop.returncode == 0, "resident_before": resident_fraction(files)}


def read_all(files: list[Path], threads: int = 4) -> tuple[int, float]:
    """Read every file in 16 MiB preads on `threads` threads; (bytes, seconds)."""
    jobs = [(f, off) for f in files for off in range(0, f.stat().st_size, CHUNK)]
    fds = {f: os.open(f, os.O_RDONLY) for f in files}

    def work(k: int) -> int:
        buf, n = bytearray(CHUNK), 0
        for f, off in jobs[k::threads]:
            n += os.preadv(fds[f], [buf], off)
        return n

    try:
        t = time.perf_counter()
        with cf.ThreadPoolExecutor(threads) as ex:
            done = sum(ex.map(work, range(threads)))
        return done, time.perf_counter() - t
    finally:
        for fd in fds.values():
            os.close(fd)


def warm(files: list[Path]) -> dict:
    read_all(files)
    return {"drop_caches_allowed": None, "resident_before": resident_fraction(files)}


# ==== children ============================================================================================
def child_prepare(args) -> dict:
    """Random weights (bench's seeded fill), written with save_pretrained; reused when meta.json matches."""
    import torch

    folder = Path(args.workdir) / "model"
    want = {"format": FORMAT, "size": args.size, "dtype": args.dtype, "seed": C.SEED, "config": C.neo_config_dict(args.size)}
    meta_path = folder / "meta.json"
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        if {k: have.get(k) for k in want} == want and all((folder / n).exists() for n in have.get("files", [None])):
            return dict(have, reused=True)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    t0 = time.perf_counter()
    model = C.build_on_meta(C.make_config(args.size), args.torch_dtype)
    gen = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    model.load_state_dict(C.random_state_dict(model, args.torch_dtype, C.SEED, gen), strict=False, assign=True)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr(), "untied head expected"
    kw = {"safe_serialization": True} if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {}
    model.save_pretrained(folder, **kw)
    meta = dict(want, weight_bytes=C.weight_bytes(model), prepare_s=round(time.perf_counter() - t0, 2), gen_device=gen,
                files=[p.name for p in folder_files(folder)])
    meta_path.write_text(json.dumps(meta, indent=1))
    return dict(meta, reused=False)


def child_io(args) -> dict:
    folder = Path(args.workdir) / "model"
    files = folder_files(folder)
    row = {"fs_type": fs_type(folder), **{f"evict_{k}": v for k, v in evict(files).items()}}
    n, dt = read_all(files)
    row.update(bytes=n, cold_gbps=n / dt / 1e9, cold_read_s=dt)
    n, dt = read_all(files)
    row.update(warm_gbps=n / dt / 1e9, warm_read_s=dt, resident_after_reads=resident_fraction(files))
    if args.device == "cuda":
        import torch

        size = 256 << 20
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True).fill_(1)
        dst, rates = torch.empty(size, dtype=torch.uint8, device="cuda"), []
        for i in range(7):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(host, non_blocking=True)
            b.record()
            b.synchronize()
            if i >= 2:
                rates.append(size / (a.elapsed_time(b) / 1e3) / 1e9)
        row.update(link_gbps=statistics.median(rates), link_all=rates, gpu=torch.cuda.get_device_name(0))
    return row


def child_mode(args) -> dict:
    import torch

    dev = C.child_device(args.device, "pass --device cpu for a logic check")
    cuda = dev.type == "cuda"
    folder = Path(args.workdir) / "model"
    vocab = json.loads((folder / "meta.json").read_text())["config"]["vocab_size"]
    C.preload_modules()
    from transformers import GPTNeoForCausalLM

    import flashmem  # noqa: F401 - imported before t0, as transformers is

    if args.mode == "diffusers_leaf":
        try:
            from diffusers.hooks import apply_group_offloading
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"diffusers is not importable ({type(e).__name__}: {e}); "
                               f"run benchmarks/install_gpu_deps.sh") from None
    ids = torch.randint(0, vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    budget = int(args.budget)
    row = {"budget_bytes": budget, "torch": torch.__version__}
    if cuda:  # the CUDA context exists before t0 in every mode
        torch.cuda.init(), torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
    row["rss_base_bytes"] = C.status_bytes("VmRSS:")
    row["before_t0_s"] = time.perf_counter() - T_PROCESS

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    sm = None
    with torch.no_grad():
        if args.mode.startswith("flashmem"):
            host = {"host_budget": args.host_budget} if args.mode == "flashmem_host" else {}
            if args.mode == "flashmem_lazy":  # the first call is the trace: one forward to the first output
                sm = flashmem.from_pretrained(folder, budget=budget, device=args.device, lazy_trace=True)
            else:
                sm = flashmem.from_pretrained(folder, budget=budget, device=args.device, example_inputs=(ids,), **host)
            call = lambda: sm(ids).logits  # noqa: E731
        else:
            if args.mode == "transformers":
                kw = {"device_map": args.device}
            elif args.mode == "accelerate":
                kw = {"device_map": "auto", "max_memory": {0: budget, "cpu": "200GiB"} if cuda else {"cpu": "200GiB"}}
                if not cuda:
                    row["note"] = "cpu: everything on the CPU, nothing offloaded"
            else:
                kw = {}
            model = GPTNeoForCausalLM.from_pretrained(folder, dtype=args.torch_dtype, **kw).eval()
            if args.mode == "diffusers_leaf":
                apply_group_offloading(model, onload_device=dev, offload_device=torch.device("cpu"),
                                       offload_type="leaf_level", use_stream=cuda)
            if args.mode == "accelerate":
                row["device_map_values"] = sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()})
            call = lambda: model(ids).logits  # noqa: E731
        sync()
        row["ready_s"] = time.perf_counter() - t0
        out = call()
        sync()
        row["first_s"] = time.perf_counter() - t0
        # read before the digest's own float32 copy of the logits takes device memory
        row["peak_device_bytes"] = torch.cuda.max_memory_reserved() if cuda else None
        del out
        t1 = time.perf_counter()
        out = call()  # a second call: the page cache now holds what the first one read
        sync()
        row["second_s"] = time.perf_counter() - t1
        row["peak_device_bytes"] = max(row["peak_device_bytes"] or 0, torch.cuda.max_memory_reserved()) if cuda else None
    row["digest"] = hashlib.sha256(out.float().cpu().numpy().tobytes()).hexdigest()
    row["peak_rss_bytes"] = C.status_bytes("VmHWM:")
    if sm is not None:
        st = sm.stats
        row["fm_stats"] = {k: getattr(st, k, None) for k in ("peak_bytes", "streamed_bytes", "wall_s", "stall_s")}
        sm.close()
    return row


def child(args) -> None:
    base = {"mode": args.mode, "cache": args.cache, "device": args.device, "size": args.size, "tokens": args.tokens}
    try:
        C.emit(dict(base, **{"prepare": child_prepare, "io": child_io}.get(args.mode, child_mode)(args)))
    except BaseException as e:  # noqa: BLE001 - every failure becomes a row
        C.emit(C.error_row(base, e))


# ==== parent ==============================================================================================
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode != "all":
        child(args)
        return 0
    t_start = time.perf_counter()
    workdir = Path(args.workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("*.log"):
        old.unlink()
    script = str(Path(__file__).resolve())
    common = ["--device", args.device, "--host-budget", args.host_budget, "--workdir", str(workdir),
              "--tokens", str(args.tokens), "--size", args.size, "--dtype", args.dtype] + (["--small"] if args.small else [])
    out = C.out_dir()
    result = {"script": "bench_cold.py", "argv": sys.argv[1:], "workdir": str(workdir), "rows": []}

    def save():
        C.save_result(result, "bench_cold", logs)

    def progress(msg):
        C.progress(t_start, msg)

    prep = result["prepare"] = C.run_child(script, ["--mode", "prepare"] + common, logs / "prepare.log", 1200)[0]
    progress(f"model: {prep.get('error') or ('reused' if prep.get('reused') else 'written in %s s' % prep.get('prepare_s'))}")
    if "error" in prep:
        print(json.dumps(prep, indent=1)[:4000])
        save()
        return 1
    folder = workdir / "model"
    files, nbytes = folder_files(folder), st_bytes(folder)
    budget = C.parse_size(args.budget, prep["weight_bytes"])
    io = result["io"] = C.run_child(script, ["--mode", "io"] + common, logs / "io.log", 600)[0]
    progress(f"io: {io.get('error') or {k: io.get(k) for k in ('fs_type', 'cold_gbps', 'warm_gbps', 'link_gbps')}}")

    for cache in CACHES:
        for mode in args.mode_list:
            state = evict(files) if cache == "cold" else warm(files)
            argv = ["--mode", mode, "--cache", cache, "--budget", str(budget)] + common
            row = C.run_child(script, argv, logs / f"{mode}-{cache}.log", args.child_timeout)[0]
            row.update(mode=mode, cache=cache, **state)
            result["rows"].append(row)
            progress(f"{mode} {cache}: " + (row.get("error") or f"ready {row['ready_s']:.2f} s, first {row['first_s']:.2f} s"))
            save()

    ref = {r["cache"]: r for r in result["rows"] if r["mode"] == "transformers" and "digest" in r}
    for r in result["rows"]:
        if "digest" not in r:
            continue
        t = ref.get(r["cache"])
        r["equal"] = (r["digest"] == t["digest"]) if t else None
        t = t or next(iter(ref.values()), None)
        parts = {"storage": nbytes / (io[f"{r['cache']}_gbps"] * 1e9) if io.get(f"{r['cache']}_gbps") else None,
                 "link": nbytes / (io["link_gbps"] * 1e9) if io.get("link_gbps") else None,
                 "compute": (t["first_s"] - t["ready_s"]) if t else None}
        r["floor_parts_s"] = parts
        if any(v is not None for v in parts.values()):
            r["floor_s"] = max(v for v in parts.values() if v is not None)
            r["x_floor"] = r["first_s"] / r["floor_s"]
    save()

    print()
    print("prepare: " + json.dumps({k: v for k, v in prep.items() if not isinstance(v, (list, dict))}, default=str))
    print("io: " + json.dumps({k: v for k, v in io.items() if not isinstance(v, (list, dict))}, default=str))
    for r in result["rows"]:
        print(f"{r['mode']} {r['cache']}: drop_caches allowed={r.get('drop_caches_allowed')}, page cache held "
              f"{r.get('resident_before')} of the files at start; floor parts {r.get('floor_parts_s')}"
              + "".join(f"; {k} {r[k]}" for k in ("error", "fm_stats", "device_map_values", "note") if r.get(k)))
    print(f"\nGPT-Neo-{args.size} {args.dtype}, {C.fmt_gb(nbytes)} GB in {len(files)} files on {io.get('fs_type')}, "
          f"{args.tokens} tokens, batch 1, {args.device}, budget {budget} B ({budget / 2**30:.4g} GiB); storage cold "
          f"{io.get('cold_gbps') and round(io['cold_gbps'], 2)} / warm {io.get('warm_gbps') and round(io['warm_gbps'], 2)} GB/s, "
          f"link {io.get('link_gbps') and round(io['link_gbps'], 1)} GB/s; seconds from just before the load; "
          f"{time.perf_counter() - t_start:.0f} s in all" + (f"; rows in {out / 'bench_cold.json'}" if out else ""))
    headers = ["mode", "cache", "ready s", "first output s", "x floor", "second call s", "peak device GB",
               "peak host RSS GB", "equal", "error"]
    table = [[r["mode"], r["cache"],
              f"{r['ready_s']:.2f}" if "ready_s" in r else None, f"{r['first_s']:.2f}" if "first_s" in r else None,
              f"{r['x_floor']:.2f}" if "x_floor" in r else None,
              f"{r['second_s']:.3f}" if "second_s" in r else None, C.fmt_gb(r.get("peak_device_bytes")),
              C.fmt_gb(r.get("peak_rss_bytes")), r.get("equal"),
              (r.get("error") or "")[:80].replace("|", "/") or None] for r in result["rows"]]
    print(C.markdown_table(headers, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
