"""The `flashmem` command: `demo`, `run` (a model folder under a budget), `plan` (print or save one) and
`queue` (several models called in turn under one budget, from a spec file)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import FlashmemError


def _inputs(folder: Path, prompt: str | None, tokens: int):
    """Token ids for a prompt (with the folder's tokenizer) or `tokens` ids when there is no prompt."""
    import torch

    if prompt is not None:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise FlashmemError(f"{folder} has no tokenizer for --prompt ({err}); pass --tokens N instead") from None
        return tok, tok(prompt, return_tensors="pt")["input_ids"]
    return None, torch.arange(tokens).unsqueeze(0)


def cmd_run(args) -> int:
    import torch
    from rich.console import Console

    from . import from_pretrained
    from .units import fmt_bytes

    console = Console()
    tok, ids = _inputs(Path(args.folder), args.prompt, args.tokens)
    t0 = time.perf_counter()
    sm = from_pretrained(args.folder, budget=args.budget, device=args.device, example_inputs=(ids,),
                         planner=args.planner, cache_dir=args.cache_dir, host_budget=args.host_budget,
                         split_bytes=args.split_bytes)
    console.print(f"[bold]{sm.plan.summary(sm.program)}[/] (traced and planned in {time.perf_counter() - t0:.2f} s)")
    with torch.no_grad():
        if tok is not None and args.new_tokens > 0:
            out = sm.generate(ids.to(sm.device), max_new_tokens=args.new_tokens, do_sample=False)
            console.print(tok.decode(out[0][ids.shape[1]:], skip_special_tokens=True))
        else:
            out = sm(ids)
            logits = getattr(out, "logits", out)
            console.print(f"output {tuple(logits.shape)}, argmax of the last position: "
                          f"{int(logits[0, -1].argmax())}")
    s = sm.stats
    stalled = f", stalled {s.stall_s * 1e3:.1f} ms" if s.stall_s is not None else ""
    console.print(f"last call: {s.wall_s * 1e3:.1f} ms, peak {fmt_bytes(s.peak_bytes)}, "
                  f"streamed {fmt_bytes(s.streamed_bytes)}{stalled}")
    return 0


def _smallest(sm) -> str:
    """The smallest budget `sm`'s input plans in, in bytes too (a rounded figure could fall below it)."""
    from .units import fmt_bytes

    least = sm.minimum_budget_bytes
    return f"smallest budget for this input: {fmt_bytes(least)} ({least} bytes)"


def cmd_plan(args) -> int:
    """Make (or reuse from the cache) a plan; print it, or write it as JSON, a picture (.png) or a page
    (.html: the picture and tables of ops, loads and residents), with a summary and the smallest budget the
    input plans in."""
    from . import from_pretrained

    _, ids = _inputs(Path(args.folder), args.prompt, args.tokens)
    sm = from_pretrained(args.folder, budget=args.budget, device=args.device, example_inputs=(ids,),
                         planner=args.planner, cache_dir=args.cache_dir, host_budget=args.host_budget,
                         split_bytes=args.split_bytes)
    if args.out and args.out.endswith((".png", ".html")):
        import torch

        from .costs import measure_timeline, profile, simulate
        from .report import plot_plan, write_plan_html

        with torch.no_grad():
            costs = sm.costs or profile(sm, (ids,), {})
            measured = measure_timeline(sm, (ids,), {})
        if args.out.endswith(".png"):
            plot_plan(sm.plan, sm.program, simulate(sm.plan, costs), args.out, measured=measured)
        else:
            write_plan_html(sm.plan, sm.program, simulate(sm.plan, costs), args.out, measured=measured,
                            smallest_budget_bytes=sm.minimum_budget_bytes)
        bound = f" (no plan in this arena below {sm.plan.bound_s * 1e3:.2f} ms)" if sm.plan.bound_s else ""
        print(f"{sm.plan.summary(sm.program)}\n{_smallest(sm)}\n"
              f"predicted {simulate(sm.plan, costs).total_s * 1e3:.2f} ms{bound}, "
              f"measured {measured.total_s * 1e3:.2f} ms; wrote {args.out}")
    elif args.out:
        Path(args.out).write_text(sm.plan.to_json(sm.program))
        print(f"{sm.plan.summary(sm.program)}\n{_smallest(sm)}\nwrote {args.out}")
    else:
        print(sm.plan.to_json(sm.program))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(prompt=args.prompt, new_tokens=args.new_tokens, budget_fraction=args.budget_fraction,
                    device=args.device)


def cmd_queue(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .queue import load_spec, plot_memory, run_queue, table_rows
    from .units import fmt_bytes

    spec = load_spec(args.spec)
    if args.rounds is not None:
        from dataclasses import replace

        spec = replace(spec, rounds=args.rounds)
    console = Console()
    console.print(f"{len(spec.models)} models, {spec.rounds} rounds ({len(spec.sequence())} calls) under "
                  f"{fmt_bytes(spec.budget_bytes)} on {spec.device}")
    run = run_queue(spec, repeats=args.repeats)
    table = Table(title="calls per model")
    for col in ("model", "calls", "median ms"):
        table.add_column(col)
    for row in table_rows(run):
        table.add_row(*row)
    console.print(table)
    if len(run.totals_s) > 1:
        console.print(f"{len(run.totals_s)} timed runs: " + ", ".join(f"{t:.3f}" for t in run.totals_s) + " s")
    console.print(f"total {run.total_s:.3f} s for {len(run.results)} calls"
                  + (" (the median run)" if len(run.totals_s) > 1 else "") + " (set-up and a first untimed run "
                  f"{run.setup_s:.1f} s); device memory over the baseline: peak {fmt_bytes(run.peak_bytes)}, "
                  f"average {fmt_bytes(int(run.average_bytes))}, budget {fmt_bytes(spec.budget_bytes)}; "
                  f"{fmt_bytes(run.streamed_bytes)} streamed")
    ps = run.plan_summary
    console.print(f"plan: arena {fmt_bytes(ps['arena_bytes'])} ({ps['residents']} weights resident in "
                  f"{fmt_bytes(ps['resident_bytes'])}, a ring of {fmt_bytes(ps['ring_bytes'])}), activations "
                  f"{fmt_bytes(ps['activation_bytes'])}, {ps['loads']} loads per sequence"
                  + (f" in {ps['copies']} copies" if "copies" in ps else ""))
    if args.out:
        plot_memory({"flashmem": run.sampler}, spec.budget_bytes, args.out, {"flashmem": run.baseline_bytes})
        console.print(f"memory over time: {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashmem", description="Run models under a hard memory budget by "
                                "streaming weights in while they compute.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("folder", help="model folder: config.json plus *.safetensors")
        sp.add_argument("--budget", required=True, help="device memory budget, e.g. 512MiB, 1.5GiB, 2GB")
        sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        sp.add_argument("--host-budget", help="cuda: host memory for the weights, a staging ring they stream through "
                                              "from the folder's files on every call (default: all in pinned memory)")
        sp.add_argument("--prompt", help="text to feed (needs the folder's tokenizer)")
        sp.add_argument("--tokens", type=int, default=8, help="without --prompt: trace with this many token ids")
        sp.add_argument("--planner", choices=("simple", "solver"), default="simple",
                        help="simple: keep what fits resident, prefetch the rest; solver: profile, then CP-SAT")
        sp.add_argument("--split-bytes", help="stream linear layers larger than this in blocks and read embedding "
                        "tables larger than it by rows, so a budget below one such layer runs (e.g. 64MiB)")
        sp.add_argument("--cache-dir", help="plan cache folder for --planner solver (default ~/.cache/flashmem/plans)")

    run = sub.add_parser("run", help="run a model folder under a budget")
    model_args(run)
    run.add_argument("--new-tokens", type=int, default=32, help="tokens to generate after --prompt")
    run.set_defaults(func=cmd_run)
    plan = sub.add_parser("plan", help="print or save the plan for a model folder and budget")
    model_args(plan)
    plan.add_argument("--out", help="write the plan here instead of printing it: JSON, or a timeline picture "
                                    "(predicted and measured compute and copy lanes, memory against the "
                                    "budget) if the name ends in .png, or one HTML page with the picture and "
                                    "tables of the ops, loads and residents if it ends in .html")
    plan.set_defaults(func=cmd_plan)
    queue = sub.add_parser("queue", help="run several models in turn under one budget, as a JSON spec describes")
    queue.add_argument("spec", help="JSON: models (transformers/diffusers class and config, or a folder), "
                                    "their inputs, the order, rounds, budget and device")
    queue.add_argument("--rounds", type=int, help="override the spec's number of rounds")
    queue.add_argument("--out", help="write a plot of device memory over time (PNG)")
    queue.add_argument("--repeats", type=int, default=1, help="timed runs of the sequence; the total is their median")
    queue.set_defaults(func=cmd_queue)
    demo = sub.add_parser("demo", help="SmolLM2-135M-Instruct answers a prompt at a quarter of its bytes")
    demo.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    demo.add_argument("--new-tokens", type=int, default=24)
    demo.add_argument("--budget-fraction", type=float, default=0.25)
    demo.add_argument("--device", default="cpu")
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except FlashmemError as err:
        print(f"flashmem: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
