#!/usr/bin/env python
"""Which models of a queue spec can be captured as CUDA graphs, and where the others sync with the host.

    sh benchmarks/install_gpu_deps.sh && PYTHONPATH=src:/tmp/benchdeps python3 benchmarks/graph_check.py

Each model of the spec (default benchmarks/fig6.json) is built with random weights, moved to the GPU and
called once eagerly, then once in PyTorch's sync debug mode ("warn") as flashmem probes a call before its
capture (`flashmem.graphs`: device constants from Python data come from pinned memory, and the model's code
sees a capture under way): every host sync is a warning, counted by the line
of the model's code that made it. A model with none is then captured and replayed, and its replay compared
with the eager output. `torch.cuda.empty_cache()` is checked the same way. The table prints last.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils._pytree import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from flashmem.graphs import SYNC_WARNING, HostSlabs, _HostConstants, seen_as_capture  # noqa: E402
from flashmem.queue import build_model, load_spec, make_inputs  # noqa: E402


def syncs_of(fn) -> Counter:
    """(file:line) -> host syncs while `fn` runs."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return Counter(f"{Path(r.filename).name}:{r.lineno}" for r in records if SYNC_WARNING in str(r.message))


def first_tensor(out):
    leaves = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
    if leaves:
        return leaves[0]
    if hasattr(out, "values"):
        return next(x for x in out.values() if isinstance(x, torch.Tensor))
    raise TypeError(f"no tensor in {type(out)}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default=str(Path(__file__).with_name("fig6.json")))
    args = p.parse_args()
    spec = load_spec(args.spec)
    dev = torch.device("cuda")
    rows = []
    empty = syncs_of(torch.cuda.empty_cache)
    rows.append(["torch.cuda.empty_cache()", sum(empty.values()), ", ".join(f"{k} x{v}" for k, v in empty.items()),
                 "-", "-"])
    for i, m in enumerate(spec.models):
        model = build_model(m, spec.dtype, seed=i).to(dev)
        kwargs = tree_map(lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x, make_inputs(m, spec.dtype, seed=i))
        slabs = HostSlabs()
        with torch.no_grad():
            ref = first_tensor(model(**kwargs)).clone()

            def probed():
                with _HostConstants(slabs), seen_as_capture():
                    model(**kwargs)
            taken = slabs.taken_bytes
            found = syncs_of(probed)
            captured, equal = "-", "-"
            if not found:
                slabs.reserve(slabs.taken_bytes - taken + 64)
                slabs.frozen = True
                graph = torch.cuda.CUDAGraph()
                try:
                    with torch.cuda.graph(graph), _HostConstants(slabs):
                        out = model(**kwargs)
                    graph.replay()
                    torch.cuda.synchronize()
                    captured, equal = "yes", torch.equal(first_tensor(out), ref)
                except Exception as err:  # noqa: BLE001 - reported in the table
                    captured = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
                del graph
        sites = ", ".join(f"{k} x{v}" for k, v in found.most_common(6))
        rows.append([m.name, sum(found.values()), sites or "-", captured, equal])
        print(f"{m.name}: {sum(found.values())} syncs {sites}; captured {captured}; equal {equal}", flush=True)
        del model
        torch.cuda.synchronize()
        slabs.release()
        torch.cuda.empty_cache()
    print(C.markdown_table(["model", "host syncs", "where (file:line x count)", "captured", "replay equal"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
