"""flashmem: run PyTorch models under a hard memory budget by streaming weights in while the model
computes, on a plan made (and checked) before the first call.

    import flashmem
    sm = flashmem.stream(model, "1GiB", device="cuda", example_inputs=(input_ids,))
    out = sm(input_ids)              # bit-identical to the model with every weight resident
    sm.plan.to_json(); sm.stats      # the plan in use; the last call's peak_bytes, wall_s, stall_s (CUDA: time_stalls)

The data flows trace -> plan -> check -> run: `trace.py` records the ops and their weights,
`plan.py` decides what stays resident and when each other weight loads, `check.py` validates the plan
independently, `run.py` with `run_cuda.py` / `run_cpu.py` executes it.
"""
from .errors import (BadBudget, BadModelFolder, BudgetTooSmall, ControlFlowWarning, CorruptWeights,
                     DeviceUnavailable, FlashmemError, GraphWarning, PlanInvalid, TraceMismatch)
from .plan import Load, Plan, Resident
from .pretrained import from_pretrained
from .run import CallStats, DebugOptions
from .build import stream
from .streamed import StreamedModel
from .units import fmt_bytes, parse_bytes
from .workload import CallResult, Workload

__version__ = "0.1.0"

__all__ = [
    "stream", "from_pretrained", "StreamedModel", "Workload", "CallResult", "Plan", "Load", "Resident", "CallStats", "DebugOptions",
    "parse_bytes",
    "fmt_bytes", "FlashmemError", "BudgetTooSmall", "BadBudget", "BadModelFolder", "CorruptWeights", "DeviceUnavailable",
    "PlanInvalid", "TraceMismatch", "ControlFlowWarning", "GraphWarning", "__version__",
]
