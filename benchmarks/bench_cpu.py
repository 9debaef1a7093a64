#!/usr/bin/env python
"""flashmem against accelerate's disk offload on the CPU: GPT-Neo-125M shape (untied head, random fp32
weights), batch 1, at a budget of 25% of the weights.

    PYTHONPATH=src python benchmarks/bench_cpu.py            # ~2-3 min on 2 cores
    PYTHONPATH=src python benchmarks/bench_cpu.py --small    # tiny model, seconds: checks the logic

One child process per (mode, tokens); the parent collects one JSON row from each. Modes:
  resident        the model loaded into RAM (safetensors), all weights resident
  flashmem        flashmem.from_pretrained(folder, budget, device="cpu"): weights stay in the file, which
                  is mapped; each call faults the streamed pages in ahead of compute and drops them after
  flashmem_copy   the same with cpu_reads="copy": the streamed weights are pread into a RAM arena
  flashmem_split  flashmem with split_bytes (--split-bytes): linear layers above it stream in blocks and
                  embedding tables above it are read by rows, so budgets below the LM head's size run
  accelerate_disk accelerate.disk_offload(model, offload_dir, execution_device="cpu"): every weight offloaded
                  to accelerate's own on-disk copy (numpy memmaps) and loaded per module during each call
Extra children: `prepare` writes the model folder once (config.json + model.safetensors, under /tmp so the
weights come from storage through the page cache, which stays warm); `link` measures the page-cache read
rate (pread of model.safetensors into a buffer, median of 5).

Per mode: median of --iters warm calls with min/max, first call, cold start (file -> first output), peak RSS
growth over a call (VmHWM after /proc/self/clear_refs "5", minus VmRSS at the call's start), peak RSS over the
process's baseline before the model existed, anonymous RSS, streamed bytes (flashmem: stats.streamed_bytes;
accelerate: parameter bytes offloaded), effective GB/s, floor = max(resident latency, streamed / read rate)
and the ratio, and the logits against the resident run's (torch.equal). Rows go to $OUT/bench_cpu.json when
$OUT is set; the markdown table prints last.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODES = ["resident", "flashmem", "flashmem_copy", "flashmem_split", "accelerate_disk"]
BUDGETED = {"flashmem", "flashmem_copy", "flashmem_split"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="all", choices=["all", "prepare", "link"] + MODES)
    p.add_argument("--tokens", type=int, help="(child) tokens per forward")
    p.add_argument("--budget", type=int, help="(child) budget in bytes")
    p.add_argument("--small", action="store_true", help="tiny GPT-Neo: checks the script's logic in seconds")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every child (default: torch's own)")
    p.add_argument("--tokens-list", help="comma-separated; default 128,1 (--small: 48,1)")
    p.add_argument("--budgets", default="0.25x",
                   help="comma-separated sizes (160MiB) or fractions of the weights (0.25x); default 0.25x")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--iters", type=int, default=7, help="timed warm calls per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first call")
    p.add_argument("--workdir", help="default $TMPDIR/flashmem-bench-cpu[-small]")
    p.add_argument("--time-limit", type=float, default=900, help="seconds; runs not started by then are skipped")
    p.add_argument("--child-timeout", type=float, default=300, help="seconds per child process")
    p.add_argument("--fresh", action="store_true", help="rebuild the stored model even if it is there")
    p.add_argument("--split-bytes", default="8MiB", help="flashmem_split: flashmem.from_pretrained(split_bytes=...); "
                   "comma-separated for one flashmem_split run per size (a granularity sweep)")
    args = p.parse_args(argv)
    args.size = "tiny" if args.small else "125M"
    args.tokens_list = [int(t) for t in (args.tokens_list or ("48,1" if args.small else "128,1")).split(",")]
    args.budget_specs = args.budgets.split(",")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.mode_list:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    if args.workdir is None:
        args.workdir = str(Path(tempfile.gettempdir()) / ("flashmem-bench-cpu" + ("-small" if args.small else "")))
    return args


# ==== children ============================================================================================
def child_measure(args) -> dict:
    import torch

    import bench_cuda  # for versions(); importing it touches no device

    workdir = Path(args.workdir)
    folder = workdir / "model"
    meta = json.loads((folder / "meta.json").read_text())
    dtype = getattr(torch, meta["dtype"])
    if args.threads:
        torch.set_num_threads(args.threads)
    row: dict = {"versions": bench_cuda.versions(), "threads": torch.get_num_threads()}
    C.preload_modules()
    rss_base = C.status_bytes("VmRSS:")
    anon_base = C.status_bytes("RssAnon:")
    vocab = meta["config"]["vocab_size"]
    ids = C.input_ids(vocab, args.tokens)
    sm = None
    streamed_at_start = None

    t_start = time.perf_counter()
    with torch.no_grad():
        if args.mode in ("flashmem", "flashmem_copy", "flashmem_split"):
            import flashmem

            load_s = 0.0  # nothing is loaded ahead: from_pretrained reads the file during set-up and calls
            split = {"split_bytes": args.split_bytes} if args.mode == "flashmem_split" else {}
            sm = flashmem.from_pretrained(folder, args.budget, device="cpu", example_inputs=(ids,),
                                          example_kwargs={"use_cache": False},
                                          cpu_reads="copy" if args.mode == "flashmem_copy" else "auto", **split)
            row["cpu_reads"] = sm.cpu_reads
            if sm.split is not None:
                row["split"] = sm.split.describe()
            call = lambda: sm(ids, use_cache=False).logits  # noqa: E731
            row["plan"] = sm.plan.summary(sm.program)
            row["plan_arena_bytes"] = sm.plan.arena_bytes
            row["plan_resident_bytes"] = sm.plan.resident_bytes
            row["plan_streamed_bytes"] = sm.plan.streamed_bytes
        else:
            model = C.load_model(folder, dtype)
            load_s = time.perf_counter() - t_start
            if args.mode == "resident":
                # load_file may hand back file-backed (mmap) tensors; make them plain RAM like a loaded model
                for p in model.parameters():
                    p.data = p.data.clone()
                streamed_at_start = lambda: 0  # noqa: E731
            elif args.mode == "accelerate_disk":
                from accelerate import disk_offload

                offload_dir = workdir / "accelerate_offload"
                shutil.rmtree(offload_dir, ignore_errors=True)  # a stale folder would be reused by accelerate
                model = disk_offload(model, offload_dir=str(offload_dir), execution_device="cpu")
                row["config"] = f"disk_offload(model, offload_dir, execution_device='cpu')"
                streamed_at_start = lambda: C.tensor_bytes_where(model, lambda t: t.device.type == "meta")  # noqa: E731
            else:
                raise ValueError(args.mode)
            call = lambda: model(ids, use_cache=False).logits  # noqa: E731
        setup_s = time.perf_counter() - t_start - load_s

        rss_at_first = C.status_bytes("VmRSS:")
        times, streamed_seen, fm_stats = [], set(), []
        grow = peak_over_base = 0
        can_reset = C.reset_peak_rss()
        out = out_first = None
        for i in range(1 + args.warmup + args.iters):
            if streamed_at_start is not None:
                streamed_seen.add(streamed_at_start())
            C.reset_peak_rss()
            r0 = C.status_bytes("VmRSS:")
            t = time.perf_counter()
            out = call()
            dt = time.perf_counter() - t
            hwm = C.status_bytes("VmHWM:")
            grow, peak_over_base = max(grow, hwm - r0), max(peak_over_base, hwm - rss_base)
            if sm is not None:
                st = sm.stats
                fm_stats.append(st)
                streamed_seen.add(st.streamed_bytes)
            if i == 0:
                first_s, cold_s = dt, time.perf_counter() - t_start
                out_first = out.detach().clone()
            elif i > args.warmup:
                times.append(dt)
        out_last = out.detach().clone()
        anon_end = C.status_bytes("RssAnon:")

    row.update(C.spread(times))
    row.update(first_ms=first_s * 1e3, cold_s=cold_s, load_s=load_s, setup_s=setup_s,
               rss_growth_bytes=grow if can_reset else None, rss_peak_over_base_bytes=peak_over_base if can_reset else None,
               rss_at_first_call_over_base_bytes=rss_at_first - rss_base, anon_rss_end_over_base_bytes=anon_end - anon_base,
               peak_reset_ok=can_reset)
    row["streamed_bytes"] = max(streamed_seen) if streamed_seen else None
    if len(streamed_seen) > 1:
        row["streamed_bytes_varied"] = sorted(streamed_seen)
    if sm is not None:
        tail = fm_stats[-args.iters:]
        row["fm_wall_ms"] = statistics.median(s.wall_s for s in tail) * 1e3
        row["fm_stall_ms"] = statistics.median(s.stall_s for s in tail) * 1e3
        row["fm_peak_bytes"] = max(s.peak_bytes for s in fm_stats)
        row["within_budget"] = row["fm_peak_bytes"] <= args.budget
    row["gbps"] = (row["streamed_bytes"] / (row["median_ms"] / 1e3) / 1e9) if row["streamed_bytes"] else None
    ref = workdir / f"ref_{args.tokens}.pt"
    if args.mode == "resident":
        torch.save(out_last, ref)
        row.update(equal=True, max_abs_diff=0.0, first_equals_last=bool(torch.equal(out_first, out_last)))
    else:
        row.update(C.compare(out_last, ref))
        row["first_call_equal"] = C.compare(out_first, ref)["equal"]
    row["weight_bytes"] = meta["weight_bytes"]
    if sm is not None:
        sm.close()
    return row


def child(args) -> None:
    base = {"mode": args.mode, "tokens": args.tokens, "budget_bytes": args.budget, "size": args.size}
    try:
        if args.mode == "prepare":
            row = {"mode": "prepare", **C.prepare_model_folder(Path(args.workdir) / "model", args.size, "float32", "cpu")}
        elif args.mode == "link":
            import bench_cuda

            row = bench_cuda.cpu_read_rate(Path(args.workdir) / "model" / "model.safetensors")
        else:
            row = child_measure(args)
        C.emit(dict(base, **row))
    except BaseException as e:  # noqa: BLE001 - every failure becomes a row
        C.emit(C.error_row(base, e))


# ==== parent ==============================================================================================
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode != "all":
        child(args)
        return 0
    t0 = time.perf_counter()
    workdir, logs = C.fresh_workdir(args.workdir)
    if args.fresh and (workdir / "model").exists():
        shutil.rmtree(workdir / "model")
    script = str(Path(__file__).resolve())
    common = ["--workdir", str(workdir), "--iters", str(args.iters), "--warmup", str(args.warmup)] + \
             (["--small"] if args.small else []) + (["--threads", str(args.threads)] if args.threads else [])
    out = C.out_dir()
    result = {"script": "bench_cpu.py", "argv": sys.argv[1:], "workdir": str(workdir), "rows": [],
              "loadavg_start": os.getloadavg(), "cpus": os.cpu_count()}

    def save():
        C.save_result(result, "bench_cpu", logs)

    def progress(msg):
        C.progress(t0, msg)

    prep = C.run_child(script, ["--mode", "prepare"] + common, logs / "prepare.log", 600)[0]
    result["prepare"] = prep
    if "error" in prep:
        print(json.dumps(prep, indent=1)[:4000])
        save()
        return 1
    progress(f"model: {'reused' if prep.get('reused') else 'written in %.1f s' % prep['prepare_s']} "
             f"({C.fmt_gb(prep['weight_bytes'])} GB)")
    total = prep["weight_bytes"]
    link = C.run_child(script, ["--mode", "link"] + common, logs / "link.log", 300)[0]
    result["link"] = link
    link_gbps = link.get("link_gbps")
    progress(f"page-cache read: {link_gbps and round(link_gbps, 2)} GB/s {link.get('error', '')}")

    budgets = [C.parse_size(b, total) for b in args.budget_specs]
    splits = args.split_bytes.split(",")
    runs = [(mode, tokens, budget, split) for tokens in args.tokens_list for mode in args.mode_list
            for budget in (budgets if mode in BUDGETED else [None])
            for split in (splits if mode == "flashmem_split" else [None])]
    runs.sort(key=lambda r: (args.tokens_list.index(r[1]), r[0] != "resident"))
    for mode, tokens, budget, split in runs:
        tag = f"{mode}-t{tokens}" + (f"-b{budget}" if budget else "") + (f"-s{split}" if split else "")
        left = args.time_limit - (time.perf_counter() - t0)
        if left < 10:
            row = {"mode": mode, "tokens": tokens, "budget_bytes": budget, "error": "skipped: --time-limit reached"}
        else:
            argv = ["--mode", mode, "--tokens", str(tokens)] + (["--budget", str(budget)] if budget else []) + common \
                + (["--split-bytes", split] if split else [])
            row = C.run_child(script, argv, logs / f"{tag}.log", min(args.child_timeout, left))[0]
            if split:
                row["split_bytes"] = split
            row.setdefault("mode", mode)
            row.setdefault("tokens", tokens)
            row.setdefault("budget_bytes", budget)
        result["rows"].append(row)
        progress(f"{tag}: " + (row.get("error") or f"{row['median_ms']:.1f} ms, equal={row.get('equal')}"))
        save()

    result["loadavg_end"] = os.getloadavg()
    resident_ms = {r["tokens"]: r["median_ms"] for r in result["rows"] if r["mode"] == "resident" and "median_ms" in r}
    for r in result["rows"]:
        if "median_ms" in r and r["tokens"] in resident_ms:
            io_ms = r["streamed_bytes"] / (link_gbps * 1e9) * 1e3 if (link_gbps and r.get("streamed_bytes")) else 0.0
            r["floor_ms"] = max(resident_ms[r["tokens"]], io_ms)
            r["x_floor"] = r["median_ms"] / r["floor_ms"]
    save()

    print()
    print("link: " + json.dumps({a: b for a, b in link.items() if not isinstance(b, (list, dict))}, default=str))
    vers = next((r["versions"] for r in result["rows"] if "versions" in r), {})
    threads = next((r["threads"] for r in result["rows"] if "threads" in r), None)
    print(f"versions: {vers}; torch threads {threads} of {os.cpu_count()} CPUs; load average at start "
          f"{result['loadavg_start'][0]:.2f}, at end {result['loadavg_end'][0]:.2f} (other processes skew timings)")
    print(f"workdir {workdir}; {time.perf_counter() - t0:.0f} s in all"
          + (f"; rows in {out / 'bench_cpu.json'}" if out else ""))
    for r in result["rows"]:
        if r.get("error"):
            print(f"ERROR {r['mode']} t{r['tokens']}: {r['error']}")
        if r.get("plan"):
            print(f"plan {r['mode']} t{r['tokens']}: {r['plan']}")
    print()
    print(f"GPT-Neo-{args.size} fp32, {C.fmt_gb(total)} GB of weights, batch 1; page-cache read "
          f"{link_gbps and round(link_gbps, 2)} GB/s; times in ms, median of {args.iters} warm calls [min-max]; "
          f"RSS in GB (10^9)")
    headers = ["mode", "tokens", "budget GB", "median ms", "spread ms", "first ms", "cold s", "RSS growth/call GB",
               "peak RSS over base GB", "fm peak GB", "<= budget", "streamed GB", "GB/s", "floor ms", "x floor", "equal", "error"]
    table = []
    for r in result["rows"]:
        ok = "median_ms" in r
        b = r.get("budget_bytes")
        table.append([
            r["mode"] + (f" {r['split_bytes']}" if r.get("split_bytes") else ""), r["tokens"], C.fmt_gb(b) if b else None,
            f"{r['median_ms']:.1f}" if ok else None, f"{r['min_ms']:.1f}-{r['max_ms']:.1f}" if ok else None,
            f"{r['first_ms']:.1f}" if ok else None, f"{r['cold_s']:.2f}" if ok else None,
            C.fmt_gb(r.get("rss_growth_bytes")) if ok else None, C.fmt_gb(r.get("rss_peak_over_base_bytes")) if ok else None,
            C.fmt_gb(r.get("fm_peak_bytes")) if ok and r.get("fm_peak_bytes") else None,
            {True: "yes", False: "NO"}.get(r.get("within_budget")),
            C.fmt_gb(r.get("streamed_bytes")) if ok else None, f"{r['gbps']:.2f}" if ok and r.get("gbps") else None,
            f"{r['floor_ms']:.1f}" if "floor_ms" in r else None, f"{r['x_floor']:.2f}" if "x_floor" in r else None,
            r.get("equal"), (r.get("error") or "")[:80].replace("|", "/") or None,
        ])
    print(C.markdown_table(headers, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
