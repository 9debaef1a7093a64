"""How a model becomes a `StreamedModel`: `stream` (a model in memory) and `build`, which `stream`,
`from_pretrained` and `Workload` share. It checks the arguments and the budget against the largest op,
splits large layers where asked, makes the math libraries' workspace, then runs the first call: the trace
that the first plan is made from (or leaves it to the model's first call with `lazy_trace`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import BudgetTooSmall, FlashmemError
from .graphs import GraphRunner
from .run import DebugOptions, check_device
from .run_cuda import graphs_supported, warm_math_workspace
from .split import Split, row_embeddings, split_model
from .store import HOST_ALIGNMENT, FileStore, HostStore, StagedStore
from .streamed import CPU_ALIGNMENT, CPU_READS, CUDA_ALIGNMENT, CUDA_GRANULARITY, StreamedModel
from .trace import ModelWeights, collect_weights
from .units import align_up, fmt_bytes, parse_bytes


def _static_check(mw: ModelWeights, budget_bytes: int, fixed_bytes: int) -> None:
    need = mw.max_working_bytes + fixed_bytes
    if need > budget_bytes:
        raise BudgetTooSmall(
            f"op {mw.max_working_module!r} needs {fmt_bytes(mw.max_working_bytes)} of weights in place at once"
            + (f" (plus {fmt_bytes(fixed_bytes)} of the math libraries' workspace)" if fixed_bytes else "")
            + f", but the budget is {fmt_bytes(budget_bytes)}; "
            f"raise the budget to at least {fmt_bytes(need)} plus room for activations",
            op=mw.max_working_module, need_bytes=need, budget_bytes=budget_bytes)


PLANNERS = ("simple", "solver")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLASHMEM_CACHE", Path.home() / ".cache" / "flashmem")) / "plans"


def build(model: nn.Module, budget, device, example_inputs, example_kwargs, *, source,
          planner: str = "simple", cache_dir: str | Path | None = None, eager_store: bool = False,
          debug: DebugOptions | None = None, cpu_reads: str = "auto", hooks=None,
          host_budget=None, split_bytes=None, on_split=None, lazy_trace: bool = False,
          cuda_graphs: bool = False) -> StreamedModel:
    """Shared by `stream` and `from_pretrained`: `source(mw, tensors, device, host_budget_bytes)` makes the
    weight store (a `StagedStore` where `host_budget_bytes` is not None), once
    the first plan is made (the trace reads the model's own tensors), or at once with `eager_store` (a model
    built on the meta device has no tensors to read). With `split_bytes`, the model's large linear layers
    and embedding tables are split first (`split.py`); `on_split(split)` then gives the embedding tables
    their bytes (a model on the meta device), else they are taken from the model's own tensors. With
    `lazy_trace` nothing is called here: the first call traces (its output is the trace's)."""
    device = check_device(device)
    budget_bytes = parse_bytes(budget)
    if planner not in PLANNERS:
        raise FlashmemError(f"planner {planner!r} is not one of {', '.join(PLANNERS)}")
    if cpu_reads not in CPU_READS:
        raise FlashmemError(f"cpu_reads {cpu_reads!r} is not one of {', '.join(CPU_READS)}")
    host_budget_bytes = None if host_budget is None else parse_bytes(host_budget)
    if lazy_trace and planner != "simple":
        raise FlashmemError(f"planner {planner!r} profiles the example input before returning; with "
                            f"lazy_trace=True use planner='simple' (or pass example_inputs and leave lazy_trace off)")
    if host_budget_bytes is not None and device.type != "cuda":
        raise FlashmemError("host_budget applies to CUDA, where weights wait in host memory; on the CPU, RAM is "
                            "the device and `budget` bounds it: leave host_budget out")
    if cuda_graphs:
        _graphs_check(device, host_budget_bytes)
    if host_budget_bytes is not None and planner != "simple":
        raise FlashmemError(f"planner {planner!r} does not model the storage link yet; with host_budget use "
                            f"planner='simple'")
    model.eval()
    split = None
    if split_bytes is not None:
        split = split_model(model, parse_bytes(split_bytes))
        if on_split is not None:
            on_split(split)
        else:
            _host_tables(model, spill=device.type == "cpu" or host_budget_bytes is not None)
    alignment = CUDA_ALIGNMENT if device.type == "cuda" else CPU_ALIGNMENT
    mw, tensors = collect_weights(model, alignment)
    if not mw.weights:
        raise FlashmemError(f"{type(model).__name__} has no parameters; there is nothing to stream")
    if host_budget_bytes is not None:
        _host_budget_check(mw, host_budget_bytes)
    # Buffers stream like parameters; what stays on the device beside the arena is the math libraries'
    # workspace, made here (before the trace measures activations) where it does not exist yet.
    if cuda_graphs:  # every call runs on a stream of flashmem's, which graphs can be captured on
        graph_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(graph_stream):
            fixed_bytes = warm_math_workspace(device)
    else:
        fixed_bytes = warm_math_workspace(device) if device.type == "cuda" else 0
    try:
        _static_check(mw, budget_bytes, fixed_bytes)
    except BudgetTooSmall as err:
        _suggest_split(err, model, split)
        raise
    streamed = StreamedModel(model, mw, lambda: source(mw, tensors, device, host_budget_bytes), tensors, device, budget_bytes,
                             fixed_bytes, cpu_reads)
    streamed._host_budget_bytes = host_budget_bytes
    streamed.split = split
    if debug is not None:
        streamed.debug = debug
    if hooks is not None:  # a Workload's composing and harvesting of programs
        hooks(streamed)
    if cuda_graphs:
        streamed._graphs = GraphRunner(streamed, graph_stream)
    if eager_store:
        streamed._store, streamed._make_store, streamed._originals = (source(mw, tensors, device, host_budget_bytes),
                                                                       None, None)
    args = tuple(example_inputs) if example_inputs is not None else ()
    kwargs = dict(example_kwargs or {})
    if lazy_trace:  # the first call traces and plans, and its output is the trace's
        streamed._install_hooks()
        return streamed
    if not args and not kwargs:
        raise FlashmemError("example_inputs (or example_kwargs) are needed to trace the model; pass an input "
                            "like the ones you will call it with, e.g. example_inputs=(input_ids,)")
    streamed._install_hooks()
    try:
        streamed(*args, **kwargs)  # the first call traces and plans
    except BaseException as err:
        if isinstance(err, BudgetTooSmall):
            _suggest_split(err, model, split)
        originals = streamed._originals
        streamed.close()
        if originals is not None:  # no store was made: give the model its own tensors back
            streamed._set_all(lambda w: originals[w])
        if device.type == "cuda" and isinstance(err, torch.OutOfMemoryError):
            # the trace runs capped at the budget: the example's activations did not fit beside the weights
            need = budget_bytes + CUDA_GRANULARITY
            workspace = (f"the CUDA math libraries' workspace takes {fmt_bytes(fixed_bytes)}, "
                         if fixed_bytes else "")
            raise BudgetTooSmall(
                f"op {mw.max_working_module!r} needs {fmt_bytes(mw.max_working_bytes)} of weights in place, and "
                f"{workspace}the example input's activations need more than the remaining "
                f"{fmt_bytes(budget_bytes - mw.max_working_bytes - fixed_bytes)} of the budget of "
                f"{fmt_bytes(budget_bytes)} "
                f"(the trace stopped at the first allocation past it); raise the budget to at least "
                f"{fmt_bytes(need)} (more, by the activations' size) or trace a smaller input",
                op=mw.max_working_module, need_bytes=need, budget_bytes=budget_bytes) from err
        raise
    if device.type == "cuda":
        # The trace's output (a KV cache, say) was alive when the arena was made; once it is gone, give its
        # cached blocks back, so the first streamed call starts from the arena alone, as the plan assumes.
        torch.cuda.empty_cache()
    if planner == "solver" and streamed.plan.loads:
        streamed.use_solver(args, kwargs, cache_dir=cache_dir or default_cache_dir())
    return streamed


def _graphs_check(device: torch.device, host_budget_bytes: int | None) -> None:
    if device.type != "cuda":
        raise FlashmemError(f"cuda_graphs=True replays CUDA kernels, but the device is {device}; on the CPU there "
                            f"are no launches to save: leave cuda_graphs off")
    if host_budget_bytes is not None:
        raise FlashmemError("cuda_graphs=True cannot capture a host_budget call (threads read each call's weights "
                            "from storage while it runs); leave one of them off")
    if not graphs_supported():
        raise FlashmemError(f"cuda_graphs=True needs CUDA events that time inside a graph (torch.cuda.Event("
                            f"external=True)), which torch {torch.__version__} lacks; upgrade PyTorch or leave "
                            f"cuda_graphs off")


def _host_tables(model: nn.Module, spill: bool) -> None:
    """The tables of a split model's RowEmbeddings, from its own tensors: in host RAM, or (`spill`: a CPU
    budget, or a host budget) in a private file, mapped, so RAM holds only the rows a call reads."""
    for _, emb in row_embeddings(model):
        if emb.weight.device.type == "meta":
            raise FlashmemError("the model's embedding tables are on the meta device; load its weights first, "
                                "or stream its folder with flashmem.from_pretrained")
        emb.weight = emb.weight.detach().to("cpu")
        if spill:
            emb.spill()


def _suggest_split(err: BudgetTooSmall, model: nn.Module, split: Split | None) -> None:
    """Add to a BudgetTooSmall for one large linear layer or embedding table the other fix: splitting it."""
    if split is not None or not hasattr(err, "add_note") or not getattr(err, "op", None):
        return
    try:
        module = model.get_submodule(err.op)
    except AttributeError:
        return
    if isinstance(module, (nn.Linear, nn.Embedding)):
        size = fmt_bytes(module.weight.numel() * module.weight.element_size())
        kind = type(module).__name__
        article = "an" if kind[0] in "AEIOU" else "a"
        err.add_note(f"flashmem: {err.op!r} is {article} {kind} of {size}; split_bytes='64MiB' (or smaller)"
                     f" splits such layers into blocks that stream one by one and reads embedding "
                     f"tables by rows on the host, so a smaller budget runs (split linear layers may differ "
                     f"from the whole model in the last bits; row reads are exact)")


def _host_budget_check(mw: ModelWeights, host_budget_bytes: int) -> None:
    largest = max(mw.weights, key=lambda w: w.nbytes)
    need = align_up(largest.nbytes, HOST_ALIGNMENT)
    if need > host_budget_bytes:
        raise BudgetTooSmall(
            f"host_budget is {fmt_bytes(host_budget_bytes)}, but weight {largest.name!r} alone is "
            f"{fmt_bytes(largest.nbytes)}: the pinned staging ring must hold the largest weight; raise host_budget "
            f"to at least {fmt_bytes(need)} (several times that lets reads run ahead)",
            op=largest.name, need_bytes=need, budget_bytes=host_budget_bytes)


def _store_from_tensors(mw: ModelWeights, tensors: list[torch.Tensor], device: torch.device,
                        host_budget_bytes: int | None = None):
    if host_budget_bytes is not None:  # to a file, then from storage through a staging ring on each call
        return StagedStore(FileStore.spill(tensors, [w.name for w in mw.weights]), host_budget_bytes)
    if device.type == "cuda":
        store = HostStore([w.nbytes for w in mw.weights])
        for w, t in zip(mw.weights, tensors):
            store.fill_from_tensor(w.index, t)
        return store
    return FileStore.spill(tensors, [w.name for w in mw.weights])


def stream(model: nn.Module, budget, device: str = "cpu", example_inputs: tuple | None = None,
           example_kwargs: dict | None = None, planner: str = "simple",
           cache_dir: str | Path | None = None, debug: DebugOptions | None = None,
           cpu_reads: str = "auto", host_budget=None, split_bytes=None, lazy_trace: bool = False,
           cuda_graphs: bool = False) -> StreamedModel:
    """Run `model` under a hard memory `budget` on `device`, streaming weights in during each call.

    budget: bytes, or a string such as "512MiB", "1.5GiB", "2GB".
    example_inputs / example_kwargs: one call's inputs, used to trace the order of ops.
    planner: "simple" (keep what fits resident, prefetch the rest through a ring) or "solver" (profile
    the model on the device, then plan with CP-SAT to minimise the predicted latency; the plan is
    cached in `cache_dir`, by default $FLASHMEM_CACHE/plans or ~/.cache/flashmem/plans).
    debug: `flashmem.DebugOptions` to poison released weight bytes or slow copies down (runtime checks).
    cpu_reads: on the CPU, "map" (use the weights where the page cache holds them, faulting pages in
    ahead of compute and dropping them after: no copies; each weight costs the 4 KiB pages it touches),
    "copy" (`pread` them into a RAM arena), or "auto" (map, unless pages would cost over 1% more bytes).
    host_budget: CUDA only, same units as `budget`: the weights go to a file, and each call reads what it
    streams from storage through a pinned staging ring of this size, which is all the host then holds of
    them (without it, every weight waits in pinned host memory).
    split_bytes: same units; linear layers larger than this become blocks of output features that stream
    one by one, and embedding tables larger than this stay on the host, read by rows (see `flashmem.split`),
    so that a budget smaller than one such layer runs. Row reads are exact; split linear layers may differ
    from the whole layer in the last bits (their blocks' matrix products may use other kernels). The
    model is rewritten in place (`SplitLinear`, `RowEmbedding` modules), also when streaming it then fails.
    lazy_trace: trace at the first call instead of before returning (example_inputs are then not needed):
    that call computes with every weight loaded on demand and returns the model's output, so a first
    output costs one forward, not two. A budget its plan cannot meet raises BudgetTooSmall from that call.
    cuda_graphs: CUDA only: from the second call of an input signature on, replay the whole streamed call
    (kernels, copies and the events between them) as one CUDA graph, so a model of small kernels runs at
    the GPU's pace instead of the host's (see `flashmem.graphs`). Every call then runs on a stream of
    flashmem's (its cuBLAS workspace, 32 MiB on Hopper, counts against the budget). Outputs are the same
    bits where the captured kernels are the eager ones (matrix products and convolutions: a linear stack
    and the SD UNet were bit-identical on an H200); an attention kernel may choose otherwise under capture
    (ViT-L's differed in the last bits). Each replay's outputs are fresh copies. The graph's memory is taken within the budget; an input whose capture fails or
    does not fit runs eagerly (`graph_refusals` says why, with a GraphWarning).

    Outputs are bit-identical (unless split_bytes splits a linear layer) to the model run with all weights
    resident on the same device. The model's
    parameters move into flashmem's store (pinned host memory on CUDA, a safetensors file on the CPU).

    >>> sm = flashmem.stream(model, "1GiB", device="cuda", example_inputs=(input_ids,))
    >>> logits = sm(input_ids).logits
    >>> sm.stats.peak_bytes <= 2**30
    True
    """
    return build(model, budget, device, example_inputs, example_kwargs, source=_store_from_tensors,
                 planner=planner, cache_dir=cache_dir, debug=debug, cpu_reads=cpu_reads, host_budget=host_budget,
                 split_bytes=split_bytes, lazy_trace=lazy_trace, cuda_graphs=cuda_graphs)
