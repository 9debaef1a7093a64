#!/usr/bin/env python
"""flashmem against the alternatives on one GPU: GPT-Neo-2.7B shape (untied head, random fp16 weights).

    PYTHONPATH=src python benchmarks/bench_cuda.py            # the whole sweep (~5-7 min on an H100)
    PYTHONPATH=src python benchmarks/bench_cuda.py --small    # same code, tiny model; runs on the CPU too

The parent starts one child process per (mode, tokens, budget) -- it re-invokes this script with
`--mode X --tokens N --budget B` -- and collects one JSON row from each; it never touches the GPU itself.
Modes: resident (all weights on the GPU), flashmem (flashmem.stream), accelerate (dispatch_model with a
device_map from infer_auto_device_map, max_memory={0: budget, "cpu": "100GiB"}), diffusers_leaf and
diffusers_block (diffusers.hooks.apply_group_offloading, use_stream=True). Extra children: `prepare` writes
the random model once as a model folder (config.json + model.safetensors, under /dev/shm when it has room)
that every other child loads with safetensors; `link` measures pinned host-to-device GB/s.

Per mode: median of --iters warm calls (synchronize + perf_counter) with min/max, the first call, cold start
(file -> first output), peak max_memory_allocated / max_memory_reserved over the calls (absolute: before the mode's
set-up this process holds only the input ids on the GPU; "<= budget" checks the reserved peak over that) and
their growth over a call, streamed bytes (flashmem:
stats.streamed_bytes; others: parameter bytes not on the GPU when the call starts), effective GB/s, the floor
max(resident latency, streamed bytes / link GB/s) and the ratio to it, and the logits against the resident
run's (torch.equal, max |diff|). Rows go to $OUT/bench_cuda.json when $OUT is set; the table prints last.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODES = ["resident", "flashmem", "flashmem_split", "diffusers_leaf", "diffusers_block", "accelerate"]
BUDGETED = {"flashmem", "flashmem_split", "accelerate"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="all", choices=["all", "prepare", "link"] + MODES)
    p.add_argument("--tokens", type=int, help="(child) tokens per forward")
    p.add_argument("--budget", type=int, help="(child) budget in bytes")
    p.add_argument("--small", action="store_true",
                   help="tiny GPT-Neo, on the CPU when there is no GPU: checks the script's logic in seconds")
    p.add_argument("--device", help="cuda (default) or cpu; --small picks cpu when CUDA is missing")
    p.add_argument("--tokens-list", help="comma-separated; default 512,1 (--small: 48,1)")
    p.add_argument("--budgets", help="comma-separated sizes (0.4GiB, 1GiB, 512MiB) or fractions of the weights "
                                     "(0.25x); default 0.4GiB,1GiB (--small: 0.5x,0.8x)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--iters", type=int, default=7, help="timed warm calls per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first call")
    p.add_argument("--workdir", help="where the model folder, reference logits and logs go "
                                     "(default /dev/shm/flashmem-bench-cuda[-small] if it has room, else $TMPDIR)")
    p.add_argument("--time-limit", type=float, default=450, help="seconds; runs not started by then are skipped "
                   "(a run still going gets at most 30 s more)")
    p.add_argument("--child-timeout", type=float, default=150, help="seconds per child process")
    p.add_argument("--fresh", action="store_true", help="rebuild the stored model even if it is there")
    p.add_argument("--split-bytes", default="64MiB", help="flashmem_split: flashmem.stream(split_bytes=...): linear "
                   "layers above it stream in blocks, embedding tables above it are read by rows on the host; "
                   "comma-separated sizes give a flashmem_split row each")
    args = p.parse_args(argv)
    if args.device is None:
        if args.small:
            import torch
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            args.device = "cuda"
    args.size = "tiny" if args.small else "2.7B"
    args.tokens_list = [int(t) for t in (args.tokens_list or ("48,1" if args.small else "512,1")).split(",")]
    args.budget_specs = (args.budgets or ("0.5x,0.8x" if args.small else "0.4GiB,1GiB")).split(",")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in args.mode_list:
        if m not in MODES:
            p.error(f"unknown mode {m!r}")
    if args.workdir is None:
        name = "flashmem-bench-cuda" + ("-small" if args.small else "")
        need = 2 * 5.6e9 if not args.small else 1e8
        base = "/dev/shm" if C.free_bytes("/dev/shm") > need else tempfile.gettempdir()
        args.workdir = str(Path(base) / name)
    return args


# ==== children ============================================================================================
def child_prepare(args) -> dict:
    import torch

    gen = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    meta = C.prepare_model_folder(Path(args.workdir) / "model", args.size, "float16", gen)
    return {"mode": "prepare", **meta}


def child_link(args) -> dict:
    """Pinned (and pageable) host-to-device copy rate of one large buffer, CUDA events, median of 5.
    Without CUDA (the --small dry run on the CPU): the page-cache read rate of the model file."""
    import torch

    if args.device != "cuda":
        return cpu_read_rate(Path(args.workdir) / "model" / "model.safetensors")
    dev = torch.device("cuda")
    n = (64 if args.small else 1024) * 2**20
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    pageable = torch.ones(n, dtype=torch.uint8)
    dst = torch.empty(n, dtype=torch.uint8, device=dev)

    def rate(src, dst_t, reps):
        out = []
        for i in range(reps + 2):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst_t.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            if i >= 2:
                out.append(n / (a.elapsed_time(b) / 1e3) / 1e9)
        return out

    h2d = rate(host, dst, 5)
    d2h = rate(dst, host, 3)
    page = rate(pageable, dst, 3)
    return {"mode": "link", "bytes": n, "h2d_pinned_gbps": statistics.median(h2d), "h2d_pinned_all": h2d,
            "d2h_pinned_gbps": statistics.median(d2h), "h2d_pageable_gbps": statistics.median(page),
            "gpu": torch.cuda.get_device_name(dev), "link_gbps": statistics.median(h2d)}


def cpu_read_rate(path: Path) -> dict:
    import numpy as np

    size = path.stat().st_size
    buf = np.empty(size, dtype=np.uint8)
    mv = memoryview(buf)
    rates = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in range(7):
            t = time.perf_counter()
            done = 0
            while done < size:
                done += os.preadv(fd, [mv[done:done + (64 << 20)]], done)
            dt = time.perf_counter() - t
            if i >= 2:
                rates.append(size / dt / 1e9)
    finally:
        os.close(fd)
    return {"mode": "link", "bytes": size, "page_cache_read_gbps": statistics.median(rates),
            "page_cache_read_all": rates, "link_gbps": statistics.median(rates), "gpu": None}


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__}
    try:
        import diffusers
        out["diffusers"] = diffusers.__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        out["diffusers"] = f"unavailable ({type(e).__name__})"
    return out


def child_measure(args) -> dict:
    import torch

    dev = C.child_device(args.device)
    cuda = dev.type == "cuda"
    workdir = Path(args.workdir)
    folder = workdir / "model"
    meta = json.loads((folder / "meta.json").read_text())
    dtype = getattr(torch, meta["dtype"])
    row: dict = {"versions": versions(), "weight_bytes": meta["weight_bytes"]}
    C.preload_modules()
    rss_base = C.status_bytes("VmRSS:")

    t_start = time.perf_counter()
    model = C.load_model(folder, dtype)
    load_s = time.perf_counter() - t_start
    total = C.weight_bytes(model)
    ids = C.input_ids(model.config.vocab_size, args.tokens).to(dev)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    reserved_before = torch.cuda.memory_reserved(dev) if cuda else 0  # the caller's own: the input ids
    t_setup = time.perf_counter()
    streamed_at_start = None  # callable: parameter bytes not on the device right now
    sm = None
    with torch.no_grad():
        if args.mode == "resident":
            model.to(dev)
            call = lambda: model(ids, use_cache=False).logits  # noqa: E731
            streamed_at_start = lambda: 0  # noqa: E731
        elif args.mode in ("flashmem", "flashmem_split"):
            import flashmem

            split = {"split_bytes": args.split_bytes} if args.mode == "flashmem_split" else {}
            sm = flashmem.stream(model, args.budget, device=args.device, example_inputs=(ids,),
                                 example_kwargs={"use_cache": False}, **split)
            if sm.split is not None:
                row["split"] = sm.split.describe()
            call = lambda: sm(ids, use_cache=False).logits  # noqa: E731
            row["plan"] = sm.plan.summary(sm.program)
            row["plan_arena_bytes"] = sm.plan.arena_bytes
            row["plan_resident_bytes"] = sm.plan.resident_bytes
            row["plan_streamed_bytes"] = sm.plan.streamed_bytes
        elif args.mode == "accelerate":
            from accelerate import dispatch_model, infer_auto_device_map

            gpu = torch.cuda.current_device() if cuda else 0
            max_memory = {gpu: args.budget, "cpu": "100GiB"}
            dm = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=list(model._no_split_modules or []), dtype=dtype)
            main = gpu
            if not cuda:  # dry run: stand the CPU in for the GPU, so the code path runs
                dm = {k: ("cpu" if v == gpu else v) for k, v in dm.items()}
                main = "cpu"
            row["device_map_values"] = sorted({str(v) for v in dm.values()})
            row["device_map_gpu_entries"] = sum(1 for v in dm.values() if v == gpu)
            row["config"] = f"infer_auto_device_map(max_memory={{{gpu}: {args.budget}, 'cpu': '100GiB'}}), " \
                            f"no_split={list(model._no_split_modules or [])}; dispatch_model(main_device={main}, " \
                            f"force_hooks=True)"
            model = dispatch_model(model, device_map=dm, main_device=main, force_hooks=True)
            call = lambda: model(ids, use_cache=False).logits  # noqa: E731
        elif args.mode in ("diffusers_leaf", "diffusers_block"):
            try:
                from diffusers.hooks import apply_group_offloading
            except Exception as e:  # noqa: BLE001
                raise RuntimeError(f"diffusers is not importable here ({type(e).__name__}: {e}); install it "
                                   f"(benchmarks/install_gpu_deps.sh) to run this mode") from None
            kw = dict(onload_device=dev, offload_device=torch.device("cpu"), use_stream=cuda)
            if args.mode == "diffusers_leaf":
                kw["offload_type"] = "leaf_level"
            else:
                kw.update(offload_type="block_level", num_blocks_per_group=1)
            row["config"] = "apply_group_offloading(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")"
            if args.mode == "diffusers_leaf":
                apply_group_offloading(model, **kw)
            else:
                # GPTNeoForCausalLM's children are `transformer` and `lm_head`, neither a ModuleList, so block
                # level on the whole model would make it one group (and block_modules=["transformer"] registers
                # diffusers' execution tracker twice). Block level on the transformer groups each of
                # transformer.h[i] (embeddings and final norm form one more group); the LM head, a single
                # Linear, is offloaded at leaf level.
                apply_group_offloading(model.transformer, **kw)
                apply_group_offloading(model.lm_head, **dict(kw, offload_type="leaf_level"))
                row["config"] += " on model.transformer; leaf level on model.lm_head"
            call = lambda: model(ids, use_cache=False).logits  # noqa: E731
        else:
            raise ValueError(args.mode)
        if streamed_at_start is None and sm is None:
            if cuda:
                streamed_at_start = lambda: C.tensor_bytes_where(model, lambda t: t.device.type != "cuda")  # noqa: E731
            else:  # dry run on the CPU: count what accelerate keeps off the module (meta placeholders)
                streamed_at_start = lambda: C.tensor_bytes_where(model, lambda t: t.device.type == "meta")  # noqa: E731
        sync()
        setup_s = time.perf_counter() - t_setup

        times, firsts, fm_stats = [], None, []
        peak_alloc = peak_res = grow_alloc = grow_res = 0
        at_start_alloc = None
        streamed_seen = set()
        n_total = 1 + args.warmup + args.iters
        out_first = out = None
        for i in range(n_total):
            out = None  # the caller holds no earlier output while a call runs
            if streamed_at_start is not None:
                streamed_seen.add(streamed_at_start())
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
                a0, r0 = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
            sync()
            t = time.perf_counter()
            out = call()
            sync()
            dt = time.perf_counter() - t
            if cuda:
                pa, pr = torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)
                peak_alloc, peak_res = max(peak_alloc, pa), max(peak_res, pr)
                grow_alloc, grow_res = max(grow_alloc, pa - a0), max(grow_res, pr - r0)
                if at_start_alloc is None:
                    at_start_alloc = a0
            if sm is not None:
                st = sm.stats
                fm_stats.append(st)
                streamed_seen.add(st.streamed_bytes)
            if i == 0:
                firsts = dt
                out_first = out.detach().to("cpu")
                cold_s = time.perf_counter() - t_start
            elif i > args.warmup:
                times.append(dt)
        out_last = out.detach().to("cpu")

    row.update(C.spread(times))
    row.update(first_ms=firsts * 1e3, cold_s=cold_s, load_s=load_s, setup_s=setup_s)
    if cuda:
        row.update(peak_alloc_bytes=peak_alloc, peak_reserved_bytes=peak_res, alloc_growth_bytes=grow_alloc,
                   reserved_growth_bytes=grow_res, alloc_at_first_call_bytes=at_start_alloc,
                   reserved_before_bytes=reserved_before, peak_reserved_over_before_bytes=peak_res - reserved_before)
    row["host_rss_peak_over_base_bytes"] = C.status_bytes("VmHWM:") - rss_base
    row["streamed_bytes"] = max(streamed_seen) if streamed_seen else None
    if len(streamed_seen) > 1:
        row["streamed_bytes_varied"] = sorted(streamed_seen)
    if sm is not None:
        tail = fm_stats[-args.iters:]
        row["fm_wall_ms"] = statistics.median(s.wall_s for s in tail) * 1e3
        row["fm_stall_ms"] = (statistics.median(s.stall_s for s in tail) * 1e3
                             if all(s.stall_s is not None for s in tail) else None)
        row["fm_peak_bytes"] = max(s.peak_bytes for s in fm_stats)
    if args.budget:
        # what the budget bounds: reserved memory grown over what the caller held before the model was set up
        row["within_budget"] = (peak_res - reserved_before <= args.budget) if cuda else None
    row["gbps"] = (row["streamed_bytes"] / (row["median_ms"] / 1e3) / 1e9) if row["streamed_bytes"] else None
    ref = workdir / f"ref_{args.tokens}.pt"
    if args.mode == "resident":
        torch.save(out_last, ref)
        row.update(equal=True, max_abs_diff=0.0, first_equals_last=bool(torch.equal(out_first, out_last)))
    else:
        row.update(C.compare(out_last, ref))
        first = C.compare(out_first, ref)
        row["first_call_equal"] = first["equal"]
    row["total_weight_bytes"] = total
    row["fixed_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers()) if sm is None else None
    if sm is not None:
        sm.close()
    return row


def child(args) -> None:
    base = {"mode": args.mode, "tokens": args.tokens, "budget_bytes": args.budget, "device": args.device,
            "size": args.size}
    try:
        if args.mode == "prepare":
            row = child_prepare(args)
        elif args.mode == "link":
            row = child_link(args)
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
        for f in (workdir / "model").iterdir():
            f.unlink()
    script = str(Path(__file__).resolve())
    common = ["--device", args.device, "--workdir", str(workdir), "--iters", str(args.iters),
              "--warmup", str(args.warmup)] + (["--small"] if args.small else [])
    splits = args.split_bytes.split(",")
    out = C.out_dir()
    result = {"script": "bench_cuda.py", "argv": sys.argv[1:], "workdir": str(workdir), "rows": []}

    def save():
        C.save_result(result, "bench_cuda", logs)

    def remaining():
        return args.time_limit - (time.perf_counter() - t0)

    def progress(msg):
        C.progress(t0, msg)

    prep = C.run_child(script, ["--mode", "prepare"] + common + ["--split-bytes", splits[0]], logs / "prepare.log", 300)[0]
    result["prepare"] = prep
    progress(f"model: {prep.get('error') or ('reused' if prep.get('reused') else 'written in %.1f s' % prep.get('prepare_s', 0))}"
             f" ({C.fmt_gb(prep.get('weight_bytes'))} GB)")
    if "error" in prep:
        print(json.dumps(prep, indent=1)[:4000])
        save()
        return 1
    total = prep["weight_bytes"]
    link = C.run_child(script, ["--mode", "link"] + common + ["--split-bytes", splits[0]], logs / "link.log", 120)[0]
    result["link"] = link
    link_gbps = link.get("link_gbps")
    progress(f"link: {link_gbps and round(link_gbps, 2)} GB/s ({link.get('error', '') or link.get('gpu')})")

    budgets = [C.parse_size(b, total) for b in args.budget_specs]
    runs = []
    for tokens in args.tokens_list:
        for mode in args.mode_list:
            for budget in (budgets if mode in BUDGETED else [None]):
                for split in (splits if mode == "flashmem_split" else [None]):
                    runs.append((mode, tokens, budget, split))
    runs.sort(key=lambda r: (args.tokens_list.index(r[1]), r[0] != "resident"))  # resident first per token count

    for mode, tokens, budget, split in runs:
        tag = f"{mode}-t{tokens}" + (f"-b{budget}" if budget else "") + (f"-s{split}" if split else "")
        if remaining() < 20:
            row = {"mode": mode, "tokens": tokens, "budget_bytes": budget, "error": "skipped: --time-limit reached"}
        else:
            argv = (["--mode", mode, "--tokens", str(tokens)] + (["--budget", str(budget)] if budget else []) + common
                    + ["--split-bytes", split or splits[0]])
            row = C.run_child(script, argv, logs / f"{tag}.log", min(args.child_timeout, remaining() + 30))[0]
            if split:
                row["split_bytes"] = split
            row.setdefault("mode", mode)
            row.setdefault("tokens", tokens)
            row.setdefault("budget_bytes", budget)
        result["rows"].append(row)
        brief = row.get("error") or (f"{row['median_ms']:.2f} ms (first {row['first_ms']:.1f}), "
                                     f"equal={row.get('equal')}")
        progress(f"{tag}: {brief}")
        save()

    # floors and ratios
    resident_ms = {r["tokens"]: r["median_ms"] for r in result["rows"] if r["mode"] == "resident" and "median_ms" in r}
    for r in result["rows"]:
        if "median_ms" not in r:
            continue
        comp = resident_ms.get(r["tokens"])
        link_ms = (r["streamed_bytes"] / (link_gbps * 1e9) * 1e3) if (link_gbps and r.get("streamed_bytes")) else 0.0
        if comp is not None:
            r["floor_ms"] = max(comp, link_ms)
            r["x_floor"] = r["median_ms"] / r["floor_ms"]
            if link_gbps:  # every weight over the link: the floor of a streamer that reads no rows on the host
                r["x_all_floor"] = r["median_ms"] / max(comp, total / (link_gbps * 1e9) * 1e3)
    save()

    print()
    for k in ("prepare", "link"):
        print(f"{k}: " + json.dumps({a: b for a, b in result[k].items() if not isinstance(b, (list, dict))}, default=str))
    vers = next((r["versions"] for r in result["rows"] if "versions" in r), {})
    print(f"versions: {vers}; workdir {workdir}; {time.perf_counter() - t0:.0f} s in all"
          + (f"; rows in {out / 'bench_cuda.json'}" if out else ""))
    for r in result["rows"]:
        if r.get("error"):
            print(f"ERROR {r['mode']} t{r['tokens']} b{r.get('budget_bytes')}: {r['error']}")
        if r.get("plan"):
            print(f"plan {r['mode']} t{r['tokens']} b{r.get('budget_bytes')}: {r['plan']}"
                  + (f"; split: {r['split']}" if r.get("split") else ""))
        if r.get("warning"):
            print(f"warning {r['mode']}: {r['warning']}")
    print()
    print(f"GPT-Neo-{args.size}, {C.fmt_gb(total)} GB of weights, batch 1; link {link_gbps and round(link_gbps, 1)} GB/s "
          f"({'pinned H2D' if args.device == 'cuda' else 'page-cache read'}); times in ms, median of {args.iters} "
          f"warm calls [min-max]; memory in GB (10^9), peak over the calls, absolute")
    headers = ["mode", "tokens", "budget GiB", "median ms", "spread ms", "first ms", "cold s", "peak alloc GB",
               "peak reserved GB", "alloc growth GB", "<= budget", "streamed GB", "GB/s", "floor ms", "x floor",
               "x all-weights floor", "equal", "max abs diff", "error"]
    table = []
    for r in result["rows"]:
        b = r.get("budget_bytes")
        ok = "median_ms" in r
        table.append([
            r["mode"] + (f" {r['split_bytes']}" if r.get("split_bytes") else ""), r["tokens"],
            f"{b / 2**30:.2f}" if b else None,
            f"{r['median_ms']:.2f}" if ok else None,
            f"{r['min_ms']:.2f}-{r['max_ms']:.2f}" if ok else None,
            f"{r['first_ms']:.1f}" if ok else None,
            f"{r['cold_s']:.1f}" if ok else None,
            C.fmt_gb(r.get("peak_alloc_bytes")) if ok and "peak_alloc_bytes" in r else None,
            C.fmt_gb(r.get("peak_reserved_bytes")) if ok and "peak_reserved_bytes" in r else None,
            C.fmt_gb(r.get("alloc_growth_bytes")) if ok and "alloc_growth_bytes" in r else None,
            {True: "yes", False: "NO"}.get(r.get("within_budget")),
            C.fmt_gb(r.get("streamed_bytes")) if ok else None,
            f"{r['gbps']:.1f}" if ok and r.get("gbps") else None,
            f"{r['floor_ms']:.2f}" if "floor_ms" in r else None,
            f"{r['x_floor']:.2f}" if "x_floor" in r else None,
            f"{r['x_all_floor']:.2f}" if "x_all_floor" in r else None,
            r.get("equal"), (f"{r['max_abs_diff']:.3g}" if r.get("max_abs_diff") is not None else None),
            (r.get("error") or "")[:80].replace("|", "/") or None,
        ])
    print(C.markdown_table(headers, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
