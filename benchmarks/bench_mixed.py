#!/usr/bin/env python
"""Mixed compute and transfer on one GPU: a Stable Diffusion 1.5 UNet shape and a ViT-L/16 encoder shape
(random fp16 weights) at 25%, 50% and 75% of their weight bytes, planned three ways, against a lower bound.

    sh benchmarks/install_gpu_deps.sh && PYTHONPATH=src:/tmp/benchdeps python3 benchmarks/bench_mixed.py
    PYTHONPATH=src python benchmarks/bench_mixed.py --small    # tiny UNet and ViT, fp32, on the CPU: a logic check

Models (flashmem.queue.build_model: built on the meta device, seeded N(0, 0.02) weights drawn on the device):
  sd_unet  diffusers UNet2DConditionModel with SD 1.5's config (below), latents (2, 4, 64, 64), timestep 10,
           encoder_hidden_states (2, 77, 768); needs diffusers (an error row per mode where it is missing)
  vit_l    transformers ViTModel: hidden 1024, 24 layers, 16 heads, intermediate 4096, image 224, batch 1
  neo_125m transformers GPTNeoForCausalLM, GPT-Neo-125M shape with an untied head, 128 token ids, batch 1
           (for the CPU: fp32 there; with --split-bytes a 10% budget runs)
The parent starts one child process per (model, budget, mode) -- it re-invokes this script with
`--mode X --model M [--fraction F]` -- and collects one JSON row from each; it never touches the GPU itself.
Modes:
  resident    every weight on the device (model.to(device)); saves its output as the reference
  simple      flashmem.stream(model, budget, planner="simple")
  solver      flashmem.stream, then sm.use_solver((), inputs, cache_dir=<fresh temp dir>) (CP-SAT)
  next_layer  flashmem.stream, then flashmem.plan.next_layer_plan (nothing resident; each layer's loads
              start at the previous layer's first op) installed on the StreamedModel, the ablation baseline
Per streamed row: median of --iters warm calls (synchronize + perf_counter) with min-max; the plan's predicted
latency, flashmem.costs.simulate(plan, costs), with costs from one flashmem.costs.profile in that child (the
solver mode's own profile, sm.costs), and the solver's plan.predicted_s; predicted/measured; peak reserved
memory over what the child held before set-up (CUDA; the CPU reports stats.peak_bytes) against the budget;
stats.streamed_bytes; torch.equal against the resident output; plan.status and plan.note; the profile's link
bandwidth and link_busy_factor (the link's rate beside compute over its idle rate) in a `costs` line.
Lower bound per (model, budget), from the profiles (medians over the point's children), independent of any
planner: max(compute (the smaller of the per-step sum and the all-resident latency), max(0, weight bytes - (budget - activations - fixed bytes)) / link
bandwidth): every byte that cannot stay resident crosses the link once, and compute never waits. A tighter
bound, also independent of the planners: flashmem.bound.latency_bound, the linear relaxation of every plan
in that arena (GLOP), on the child's profile with its steps scaled down to the all-resident latency where
their sum is larger (the parent passes it on with --resident-ms), the smallest over the point's children;
"x bound" is over it. Rows go to
$OUT/bench_mixed.json and the ablation plot (latency against budget per planner) to $OUT/ablation.png (or
--plot) when $OUT is set; the table prints last.
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
from bench_cuda import versions  # noqa: E402

MODES = ["resident", "simple", "solver", "next_layer"]
STREAMED = MODES[1:]
MODELS = ["vit_l", "sd_unet", "neo_125m"]
OUTPUT_OF = {"sd_unet": "sample", "vit_l": "last_hidden_state", "neo_125m": "logits", "neo_2.7b": "logits"}  # the output compared
MISSING = "missing dependency"  # an error row's `skip_model`: the other modes of that model fail the same way


class MissingDependency(RuntimeError):
    """A package the model needs is not importable in the child."""


# -- the models -----------------------------------------------------------------------------------------
def sd_unet_config(small: bool) -> dict:
    """UNet2DConditionModel arguments: Stable Diffusion 1.5's UNet, or a tiny one with the same block kinds."""
    if small:
        return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
                    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    return dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=[320, 640, 1280, 1280], cross_attention_dim=768, attention_head_dim=8,
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"])


def vit_config(small: bool) -> dict:
    """ViTConfig arguments: ViT-L/16 at 224 pixels, or a tiny one."""
    if small:
        return dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=8)
    return dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                image_size=224, patch_size=16)


def model_spec(name: str, small: bool):
    from flashmem.queue import ModelSpec

    if name == "sd_unet":
        cfg = sd_unet_config(small)
        side, context, width = cfg["sample_size"], (8 if small else 77), cfg["cross_attention_dim"]
        return ModelSpec(name, "diffusers", "UNet2DConditionModel", cfg,
                         {"sample": {"shape": [2, 4, side, side]}, "timestep": {"value": 10},
                          "encoder_hidden_states": {"shape": [2, context, width]}})
    if name == "neo_125m":  # GPT-Neo-125M shape, untied head, 128 tokens (tiny: 16)
        cfg = C.neo_config_dict("tiny" if small else "125M")
        return ModelSpec(name, "transformers", "GPTNeoForCausalLM", cfg,
                         {"input_ids": {"shape": [1, 16 if small else 128], "dtype": "int64",
                                        "high": cfg["vocab_size"]}, "use_cache": {"value": False}})
    if name == "neo_2.7b":  # GPT-Neo-2.7B shape, untied head, 512 tokens (tiny: 16); smallest_budget.py only
        cfg = C.neo_config_dict("tiny" if small else "2.7B")
        return ModelSpec(name, "transformers", "GPTNeoForCausalLM", cfg,
                         {"input_ids": {"shape": [1, 16 if small else 512], "dtype": "int64",
                                        "high": cfg["vocab_size"]}, "use_cache": {"value": False}})
    if name != "vit_l":
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS + ['neo_2.7b'])}")
    cfg = vit_config(small)
    return ModelSpec(name, "transformers", "ViTModel", cfg,
                     {"pixel_values": {"shape": [1, 3, cfg["image_size"], cfg["image_size"]]}})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="all", choices=["all"] + MODES)
    p.add_argument("--model", choices=MODELS, help="(child) the model")
    p.add_argument("--fraction", type=float, help="(child) budget as a fraction of the model's weight bytes")
    p.add_argument("--small", action="store_true",
                   help="tiny UNet and ViT in fp32, on the CPU when there is no GPU: checks the script's logic")
    p.add_argument("--device", help="cuda (default) or cpu; --small picks cpu when CUDA is missing")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--budgets", default="0.25,0.5,0.75", help="comma-separated fractions of each model's weight bytes")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--iters", type=int, default=7, help="timed warm calls per mode, at least 5 (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls after the first call")
    p.add_argument("--solver-time-limit", type=float,
                   help="seconds the CP-SAT planner may take per plan (SolverSettings.time_limit_s); default 10 "
                        "(--small: 2)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in every child (default: torch's own)")
    p.add_argument("--workdir", help="reference outputs and logs (default $TMPDIR/flashmem-bench-mixed[-small])")
    p.add_argument("--split-bytes", help="streamed modes: flashmem.stream(split_bytes=...), for budgets below the "
                                         "largest layer (e.g. 8MiB for neo_125m at 10%%)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="every mode replays CUDA graphs: streamed modes with flashmem.stream(cuda_graphs=True), the "
                        "resident one captured by hand (resident_graph); the UNet's timestep is then a device tensor")
    p.add_argument("--resident-ms", type=float, help="(child) the all-resident latency: the relaxation bound's "
                   "steps are scaled down to it")
    p.add_argument("--save-costs", help="folder each streamed child writes its profiled costs (CostModel JSON), "
                   "its program (pickle), its plan (JSON) and on CUDA one call's measured timeline (JSON) to, for "
                   "planning offline with the same numbers; the parent then packs the folder into one "
                        "FOLDER.tar.gz, a single file to carry back from a remote machine")
    p.add_argument("--plot", help="where the ablation plot goes (default $OUT/ablation.png, else the workdir)")
    p.add_argument("--time-limit", type=float, default=470, help="seconds; runs not started by then are skipped "
                   "(a run still going gets at most 30 s more)")
    p.add_argument("--child-timeout", type=float, default=180, help="seconds per child process")
    args = p.parse_args(argv)
    if args.solver_time_limit is None:
        args.solver_time_limit = 2.0 if args.small else 10.0
    if args.iters < 5:
        p.error(f"--iters {args.iters}: at least 5 timed calls are needed for a median and its spread")
    if args.device is None:
        if args.small:
            import torch
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            args.device = "cuda"
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.fractions = [float(b) for b in args.budgets.split(",") if b.strip()]
    for m in args.model_list:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    for m in args.mode_list:
        if m not in MODES:
            p.error(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
    for f in args.fractions:
        if not 0 < f <= 1:
            p.error(f"budget fraction {f} is outside (0, 1]")
    if args.workdir is None:
        args.workdir = str(Path(tempfile.gettempdir()) / ("flashmem-bench-mixed" + ("-small" if args.small else "")))
    return args


# ==== children ============================================================================================
def use_plan(sm, program, plan) -> None:
    """Install `plan` on the StreamedModel for `program`'s input signature, as `use_solver` does."""
    from flashmem.check import check_plan

    check_plan(plan, program)
    sm._plans[program.signature] = (program, plan)
    sm._activate(program, plan)


def build(args):
    """(model on the CPU, its keyword inputs on the device, dtype) for the child's model."""
    import torch
    from flashmem.queue import build_model, make_inputs

    if args.model == "sd_unet":
        try:
            import diffusers
        except Exception as e:  # noqa: BLE001
            raise MissingDependency(f"diffusers is not importable here ({type(e).__name__}: {e}); install it "
                                    f"(sh benchmarks/install_gpu_deps.sh, then PYTHONPATH=src:/tmp/benchdeps) to "
                                    f"run the UNet") from None
        diffusers.utils.logging.set_verbosity_error()
    import transformers

    transformers.logging.set_verbosity_error()
    dev = torch.device(args.device)
    dtype = torch.float32 if args.small or dev.type == "cpu" else torch.float16  # CPUs are slow at fp16
    spec = model_spec(args.model, args.small)
    model = build_model(spec, dtype, seed=C.SEED, fill_device=args.device)
    inputs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(spec, dtype, C.SEED).items()}
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the random fill's blocks: the child holds only the inputs before set-up
    return model, inputs, dtype


def tensor_timestep(inputs: dict, device) -> dict:
    """The UNet's timestep as a 0-dim tensor on the device: a Python number becomes a host-to-device copy of
    pageable memory inside the UNet's forward, which no CUDA graph can capture (same computation)."""
    import torch

    if isinstance(inputs.get("timestep"), (int, float)):
        inputs = dict(inputs, timestep=torch.tensor(inputs["timestep"], device=device))
    return inputs


def resident_graph(model, inputs: dict):
    """The resident model's call as a CUDA graph (warmed on a side stream, captured, replayed with the inputs
    copied in and the outputs copied out, as flashmem's cuda_graphs=True does): a call at the GPU's pace."""
    import torch
    from flashmem.graphs import copy_out

    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(**static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model(**static)

    def call():
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                static[k].copy_(v)
        graph.replay()
        return copy_out(out)
    return call


def set_up(args, model, inputs, budget: int, solver_dir: str):
    """The StreamedModel of a streamed mode, on that mode's plan."""
    import flashmem
    from flashmem.plan import next_layer_plan
    from flashmem.solve import SolverSettings
    from flashmem.streamed import CUDA_GRANULARITY

    split = {"split_bytes": args.split_bytes} if args.split_bytes else {}
    sm = flashmem.stream(model, budget, device=args.device, example_kwargs=inputs, cuda_graphs=args.cuda_graphs,
                         **split)
    if args.mode == "solver":
        sm.use_solver((), inputs, settings=SolverSettings(time_limit_s=args.solver_time_limit), cache_dir=solver_dir)
    elif args.mode == "next_layer":
        simple = sm.plan
        plan = next_layer_plan(sm.program, budget_bytes=sm.budget_bytes, device=simple.device,
                               alignment=simple.alignment, activation_bytes=simple.activation_bytes,
                               granularity=CUDA_GRANULARITY if sm.device.type == "cuda" else simple.alignment)
        use_plan(sm, sm.program, plan)
    return sm


def child_measure(args) -> dict:
    import torch

    dev = C.child_device(args.device)
    cuda = dev.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    row: dict = {"versions": versions(), "threads": torch.get_num_threads()}
    model, inputs, dtype = build(args)
    if args.cuda_graphs:
        inputs = tensor_timestep(inputs, dev)
    total = C.tensor_bytes_where(model, lambda t: True)
    budget = int(args.fraction * total) if args.mode != "resident" else None
    row.update(weight_bytes=total, budget_bytes=budget, dtype=str(dtype))
    workdir = Path(args.workdir)
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    reserved_before = torch.cuda.memory_reserved(dev) if cuda else 0
    t0 = time.perf_counter()
    sm = None
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="flashmem-bench-mixed-plans-") as solver_dir:
        if args.mode == "resident":
            model.to(dev)
            call = resident_graph(model, inputs) if args.cuda_graphs else (lambda: model(**inputs))
        else:
            sm = set_up(args, model, inputs, budget, solver_dir)
            call = lambda: sm(**inputs)  # noqa: E731
        sync()
        row["setup_s"] = time.perf_counter() - t0
        times, peak_growth, out = [], 0, None
        for i in range(1 + args.warmup + args.iters):
            out = None  # the caller holds no earlier output while a call runs
            if cuda:
                torch.cuda.reset_peak_memory_stats(dev)
            sync()
            t = time.perf_counter()
            out = getattr(call(), OUTPUT_OF[args.model])
            sync()
            dt = time.perf_counter() - t
            if cuda:
                peak_growth = max(peak_growth, torch.cuda.max_memory_reserved(dev) - reserved_before)
            if i == 0:
                row["first_ms"] = dt * 1e3
            elif i > args.warmup:
                times.append(dt)
        out = out.detach().to("cpu")
        row.update(C.spread(times))
        if cuda:
            row["peak_reserved_growth_bytes"] = peak_growth
        ref = workdir / f"ref_{args.model}.pt"
        if sm is None:
            torch.save(out, ref)
            row.update(equal=True, max_abs_diff=0.0)
            return row
        row.update(C.compare(out, ref))
        stats = sm.stats
        plan, program = sm.plan, sm.program
        if args.cuda_graphs:
            row.update(replays=sm._graphs.replays, graph_refusals=list(sm.graph_refusals.values()))
        row.update(streamed_bytes=stats.streamed_bytes, stall_ms=None if stats.stall_s is None else stats.stall_s * 1e3, fm_peak_bytes=stats.peak_bytes,
                   status=plan.status, note=plan.note, plan=plan.summary(program), arena_bytes=plan.arena_bytes,
                   resident_bytes=plan.resident_bytes, n_ops=len(program.ops), solve_s=plan.solve_s)
        if cuda:
            row["within_budget"] = peak_growth <= budget
        row.update(predictions(args, sm, inputs, budget))
    sm.close()
    return row


def predictions(args, sm, inputs: dict, budget: int) -> dict:
    """The plan's predicted latency from one profile of this child, and the lower bound's pieces."""
    from flashmem.costs import profile, simulate

    t = time.perf_counter()
    costs = sm.costs if args.mode == "solver" else profile(sm, (), inputs)
    plan, program = sm.plan, sm.program
    weights = sum(w.nbytes for w in program.weights)
    must_stream = max(0, weights - (budget - plan.activation_bytes - plan.fixed_bytes))
    relaxation_ms = relaxation_bound_ms(args, program, costs, plan, budget)
    if args.save_costs:
        import pickle

        folder = Path(args.save_costs)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{args.model}_{args.mode}_{args.fraction}" + ("_graphs" if args.cuda_graphs else "")
        (folder / f"{stem}.costs.json").write_text(costs.to_json())
        (folder / f"{stem}.plan.json").write_text(plan.to_json(program))
        with open(folder / f"{stem}.program.pkl", "wb") as f:
            pickle.dump(program, f)
        if args.device == "cuda":  # one call with every op and load timed, for the simulator's errors
            from dataclasses import asdict

            from flashmem.costs import measure_timeline

            (folder / f"{stem}.timeline.json").write_text(json.dumps(asdict(measure_timeline(sm, (), inputs))))
    return {"profile_s": time.perf_counter() - t, "predicted_ms": simulate(plan, costs).total_s * 1e3,
            "solver_predicted_ms": plan.predicted_s * 1e3 if plan.predicted_s is not None else None,
            "compute_ms": costs.compute_s * 1e3, "link_bytes_per_s": costs.link.bandwidth_bytes_per_s,
            "link_overhead_us": costs.link.overhead_s * 1e6, "link_kind": costs.link.kind, "program_weight_bytes": weights, "must_stream_bytes": must_stream,
            "activation_bytes": plan.activation_bytes, "fixed_bytes": plan.fixed_bytes,
            "relaxation_bound_ms": relaxation_ms, "wait_ms": costs.wait_s * 1e3,
            "link_busy_factor": costs.link_busy_factor}


def relaxation_bound_ms(args, program, costs, plan, budget: int) -> float:
    """flashmem.bound.latency_bound for the largest arena the budget leaves, with the profiled steps scaled
    down to the all-resident latency where they sum to more (a per-step profile carries gaps a call hides)."""
    from dataclasses import replace

    from flashmem.bound import latency_bound
    from flashmem.plan import arena_limit
    from flashmem.streamed import CUDA_GRANULARITY

    granularity = CUDA_GRANULARITY if args.device == "cuda" else plan.alignment
    scale = min(1.0, args.resident_ms / (costs.compute_s * 1e3)) if args.resident_ms else 1.0
    scaled = replace(costs, steps=tuple(replace(s, compute_s=s.compute_s * scale) for s in costs.steps))
    avail = arena_limit(budget, plan.activation_bytes, plan.fixed_bytes, granularity)
    return latency_bound(program, scaled, avail, plan.alignment).latency_s * 1e3


def child(args) -> None:
    base = {"mode": args.mode, "model": args.model, "fraction": args.fraction if args.mode != "resident" else None,
            "device": args.device}
    try:
        C.emit(dict(base, **child_measure(args)))
    except BaseException as e:  # noqa: BLE001 - every failure becomes a row
        row = C.error_row(base, e)
        if isinstance(e, MissingDependency):
            row["skip_model"] = MISSING
        C.emit(row)


# ==== parent ==============================================================================================
def lower_bounds(rows: list[dict]) -> dict:
    """Per (model, fraction): max(compute, must-stream bytes / bandwidth), from the medians of the profiles of
    that point's streamed children (compute: the smaller of the profiled steps' sum and the all-resident
    latency); per model (fraction None): the compute alone, for the resident row."""
    points: dict = {}
    for r in rows:
        if "compute_ms" in r:
            points.setdefault((r["model"], r["fraction"]), []).append(r)
            points.setdefault((r["model"], None), []).append(r)
    resident_ms = {r["model"]: r["median_ms"] for r in rows if r.get("mode") == "resident" and "median_ms" in r}
    out = {}
    for key, rs in points.items():
        # Steps profiled one by one carry launch gaps a whole call overlaps: the all-resident call's latency
        # bounds compute too, and the smaller of the two keeps the bound a bound.
        compute_ms = min(statistics.median(r["compute_ms"] for r in rs), resident_ms.get(key[0], float("inf")))
        if key[1] is None:
            out[key] = {"lower_bound_ms": compute_ms, "compute_ms": compute_ms}
            continue
        bandwidth = statistics.median(r["link_bytes_per_s"] for r in rs)
        link_ms = statistics.median(r["must_stream_bytes"] for r in rs) / bandwidth * 1e3
        out[key] = {"simple_bound_ms": max(compute_ms, link_ms), "compute_ms": compute_ms, "link_ms": link_ms}
        # The relaxation holds every plan's latency above the simple bound too; the larger is the bound. Each
        # child's relaxation has its own profile (the link's rate beside compute measured on its plan's
        # copies): the smallest of them is the point's.
        relaxed = [r["relaxation_bound_ms"] for r in rs if r.get("relaxation_bound_ms") is not None]
        out[key]["relaxation_bound_ms"] = min(relaxed) if relaxed else None
        out[key]["lower_bound_ms"] = max(out[key]["simple_bound_ms"], out[key]["relaxation_bound_ms"] or 0.0)
    return out


def gains(rows: list[dict]) -> list[dict]:
    """Per (model, fraction): the solver's speed-up over the simple plan, measured and predicted."""
    by = {(r["model"], r["fraction"], r["mode"]): r for r in rows if "median_ms" in r}
    out = []
    for (model, fraction, mode), solver in by.items():
        simple = by.get((model, fraction, "simple"))
        if mode != "solver" or simple is None:
            continue
        out.append({"model": model, "fraction": fraction, "measured": simple["median_ms"] / solver["median_ms"],
                    "predicted": simple["predicted_ms"] / solver["predicted_ms"], "solver_status": solver["status"]})
    return out


def plot(rows: list[dict], bounds: dict, path: Path) -> None:
    """Latency against budget for the streamed modes, one panel per model, with the lower bound and the
    resident latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m and "median_ms" in r and r["fraction"] for r in rows)]
    if not models:
        return
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for mode, style in zip(STREAMED, ("o-", "s-", "^-")):
            pts = sorted((r["fraction"], r["median_ms"]) for r in rows
                         if r["model"] == model and r["mode"] == mode and "median_ms" in r)
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, label=mode)
        lb = sorted((f, b["lower_bound_ms"]) for (m, f), b in bounds.items() if m == model and f is not None)
        if lb:
            ax.plot([p[0] * 100 for p in lb], [p[1] for p in lb], "k--", label="lower bound")
        res = next((r["median_ms"] for r in rows if r["model"] == model and r["mode"] == "resident"
                    and "median_ms" in r), None)
        if res is not None:
            ax.axhline(res, color="grey", linestyle=":", label="resident")
        ax.set_xlabel("budget, % of weight bytes")
        ax.set_ylabel("latency, ms (median of warm calls)")
        ax.set_title(model)
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def fmt_size(n: int) -> str:
    """Bytes in GB (10^9), or in MB below 0.1 GB (the --small models)."""
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def table(rows: list[dict], bounds: dict) -> str:
    headers = ["model", "budget", "mode", "latency ms", "x lower bound", "predicted ms", "predicted/measured",
               "peak vs budget", "equal", "status"]
    lines = []
    for r in rows:
        f, b = r.get("fraction"), r.get("budget_bytes")
        budget = (f"{f:.0%} ({fmt_size(b)})" if b else f"{f:.0%}") if f else "all"
        if "median_ms" not in r:
            lines.append([r["model"], budget, r["mode"], None, None, None, None, None, None,
                          "error: " + (r.get("error") or "?")[:90].replace("|", "/")])
            continue
        lb = bounds.get((r["model"], f))
        pred = r.get("predicted_ms")
        peak = r.get("peak_reserved_growth_bytes", r.get("fm_peak_bytes"))
        lines.append([
            r["model"], budget, r["mode"], f"{r['median_ms']:.2f} [{r['min_ms']:.2f}-{r['max_ms']:.2f}]",
            f"{r['median_ms'] / lb['lower_bound_ms']:.2f}" if lb else None,
            f"{pred:.2f}" if pred is not None else None,
            f"{pred / r['median_ms']:.2f}" if pred is not None else None,
            f"{fmt_size(peak)} / {fmt_size(b)}" + ({True: "", False: " OVER"}.get(r.get("within_budget"), ""))
            if b and peak is not None else None,
            r.get("equal"), r.get("status", "resident"),
        ])
    return C.markdown_table(headers, lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode != "all":
        child(args)
        return 0
    t0 = time.perf_counter()
    workdir, logs = C.fresh_workdir(args.workdir)
    script = str(Path(__file__).resolve())
    common = ["--device", args.device, "--workdir", str(workdir), "--iters", str(args.iters), "--warmup",
              str(args.warmup), "--solver-time-limit", str(args.solver_time_limit)] + (["--small"] if args.small else []) \
        + (["--split-bytes", args.split_bytes] if args.split_bytes else []) \
        + (["--threads", str(args.threads)] if args.threads else []) + (["--cuda-graphs"] if args.cuda_graphs else []) \
        + (["--save-costs", args.save_costs] if args.save_costs else [])
    out = C.out_dir()
    result = {"script": "bench_mixed.py", "argv": sys.argv[1:], "workdir": str(workdir), "rows": [],
              "loadavg_start": os.getloadavg()}

    def save():
        C.save_result(result, "bench_mixed", logs)

    def progress(msg):
        C.progress(t0, msg)

    runs = [(model, mode, None if mode == "resident" else f) for model in args.model_list
            for mode in args.mode_list for f in ([None] if mode == "resident" else args.fractions)]
    runs.sort(key=lambda r: (args.model_list.index(r[0]), r[1] != "resident", r[2] or 0))  # resident first
    skipped: dict[str, dict] = {}  # model -> the error row of a missing dependency
    for model, mode, fraction in runs:
        tag = f"{model}-{mode}" + (f"-f{fraction}" if fraction else "")
        base = {"model": model, "mode": mode, "fraction": fraction}
        remaining = args.time_limit - (time.perf_counter() - t0)
        if model in skipped:
            row = dict(base, error=skipped[model]["error"], skip_model=MISSING)
        elif remaining < 20:
            row = dict(base, error="skipped: --time-limit reached")
        else:
            argv = ["--mode", mode, "--model", model] + (["--fraction", str(fraction)] if fraction else []) + common
            resident_ms = next((r["median_ms"] for r in result["rows"] if r["model"] == model
                                and r["mode"] == "resident" and "median_ms" in r), None)
            argv += ["--resident-ms", str(resident_ms)] if resident_ms else []
            row = dict(base, **C.run_child(script, argv, logs / f"{tag}.log", min(args.child_timeout, remaining + 30))[0])
            if row.get("skip_model") == MISSING:
                skipped[model] = row
        result["rows"].append(row)
        progress(f"{tag}: " + (row.get("error") or f"{row['median_ms']:.2f} ms, equal={row.get('equal')}, "
                                                   f"{row.get('status', '')}")[:200])
        save()

    rows = result["rows"]
    result["loadavg_end"] = os.getloadavg()
    bounds = lower_bounds(rows)
    result["lower_bounds"] = [dict(model=m, fraction=f, **b) for (m, f), b in bounds.items()]
    result["gains"] = gains(rows)
    for r in rows:
        b = bounds.get((r["model"], r.get("fraction")))
        if b and "median_ms" in r:
            r["x_lower_bound"] = r["median_ms"] / b["lower_bound_ms"]
    plot_path = Path(args.plot) if args.plot else (out or workdir) / "ablation.png"
    try:
        plot(rows, bounds, plot_path)
        result["plot"] = str(plot_path)
    except Exception as e:  # noqa: BLE001 - the table still prints
        result["plot"] = f"failed: {type(e).__name__}: {e}"
    if args.save_costs and Path(args.save_costs).is_dir():
        folder = Path(args.save_costs).resolve()
        result["saved_costs"] = shutil.make_archive(str(folder), "gztar", root_dir=folder.parent, base_dir=folder.name)
    save()

    print()
    vers = next((r["versions"] for r in rows if "versions" in r), {})
    threads = next((r["threads"] for r in rows if "threads" in r), None)
    print(f"versions: {vers}; device {args.device}; torch threads {threads} of {os.cpu_count()} CPUs; load average "
          f"at start {result['loadavg_start'][0]:.2f}, at end {result['loadavg_end'][0]:.2f} (other processes skew "
          f"timings)")
    print(f"workdir {workdir}; {time.perf_counter() - t0:.0f} s in all; plot {result['plot']}"
          + (f"; costs packed in {result['saved_costs']}" if result.get("saved_costs") else "")
          + (f"; rows in {out / 'bench_mixed.json'}" if out else ""))
    for r in rows:
        where = f"{r['model']} {r['mode']} {r.get('fraction') or ''}".strip()
        if r.get("error"):
            print(f"ERROR {where}: {r['error'][:300]}")
        if r.get("plan"):
            print(f"plan {where}: {r['plan']}" + (f"; {r['note']}" if r.get("note") else ""))
        if "link_busy_factor" in r:
            print(f"costs {where}: link ({r['link_kind']}) {r['link_bytes_per_s'] / 1e9:.2f} GB/s idle + "
                  f"{r.get('link_overhead_us', float('nan')):.2f} us a copy, x{r['link_busy_factor']:.3f} "
                  f"beside compute; compute {r['compute_ms']:.2f} ms; predicted {r['predicted_ms']:.2f} ms")
    for (m, f), b in sorted(bounds.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        if f is not None:
            relaxed = b.get("relaxation_bound_ms")
            print(f"lower bound {m} {f:.0%}: {b['lower_bound_ms']:.2f} ms; simple bound max(compute "
                  f"{b['compute_ms']:.2f}, link {b['link_ms']:.2f}) = {b['simple_bound_ms']:.2f}; relaxation "
                  + (f"{relaxed:.2f}" if relaxed is not None else "-"))
    for g in result["gains"]:
        print(f"solver over simple, {g['model']} {g['fraction']:.0%}: {g['measured']:.2f}x measured, "
              f"{g['predicted']:.2f}x predicted ({g['solver_status']})")
    print()
    print(f"latency: median of {args.iters} warm calls [min-max], ms; x lower bound: over max(compute, bytes that "
          f"cannot stay resident / link); peak: " + ("reserved growth over the child's start" if args.device
                                                     == "cuda" else "stats.peak_bytes (RSS); activations on top"))
    print(table(rows, bounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
