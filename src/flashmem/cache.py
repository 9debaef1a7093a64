"""The plan cache: plans and their cost models on storage, keyed by the model's weights, the budget, the
device and the input signature, so a plan is made once and reused.

An entry is never trusted blindly: it must name this flashmem's plan format, match the key and the
traced program it is used for, carry a digest of its own content, and pass the plan checker. Anything
else (stale, from another model, edited by hand) is discarded and rebuilt, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

from .check import find_problems
from .costs import CostModel
from .plan import PLAN_FORMAT, Load, Plan, Resident, Staging
from .trace import Program


def program_fingerprint(program: Program) -> str:
    """A digest of what a plan depends on: the ops in order and the weights' names, shapes and dtypes."""
    h = hashlib.sha256()
    for w in program.weights:
        h.update(f"{w.name}|{w.shape}|{w.dtype}|{w.nbytes}|{w.slots}|{w.is_buffer};".encode())
    for op in program.ops:
        h.update(f"{op.module}|{op.weights}|{op.end_index};".encode())
    h.update(f"{program.fixed_bytes}".encode())
    return h.hexdigest()


def cache_key(program: Program, budget_bytes: int, device: str, planner: str, activation_bytes: int) -> str:
    """The key of a plan: the program, its input signature, the budget, the device, the planner and the
    activation reserve the plan keeps (measured; a plan for another reserve is another plan)."""
    text = (f"{program_fingerprint(program)}|{program.signature}|{budget_bytes}|{device}|{planner}|"
            f"{activation_bytes}|{PLAN_FORMAT}")
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def plan_from_dict(doc: dict) -> Plan:
    fields = {k: v for k, v in doc.items() if k in Plan.__dataclass_fields__}
    fields["residents"] = tuple(Resident(**r) for r in doc["residents"])
    fields["loads"] = tuple(Load(**l) for l in doc["loads"])
    if doc.get("staging"):
        st = doc["staging"]
        fields["staging"] = Staging(st["ring_bytes"], st["alignment"], tuple(st["order"]),
                                    tuple(st["ring_offsets_bytes"]), tuple(st["after"]))
    return Plan(**fields)


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class PlanCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"plan-{key}.json"

    def save(self, key: str, program: Program, plan: Plan, costs: CostModel | None) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        body = {"format": PLAN_FORMAT, "key": key, "program": program_fingerprint(program),
                "plan": asdict(plan), "costs": json.loads(costs.to_json()) if costs else None}
        doc = dict(body, digest=_digest(body))
        tmp = self.path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path(key))
        return self.path(key)

    def load(self, key: str, program: Program) -> tuple[Plan, CostModel | None] | None:
        """The cached plan for `key`, or None if there is none or it cannot be trusted (then removed)."""
        path = self.path(key)
        if not path.exists():
            return None
        reason = None
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("plan"), dict):
                raise TypeError("the entry or its plan is not a JSON object")
            body = {k: v for k, v in doc.items() if k != "digest"}
            if doc.get("format") != PLAN_FORMAT:
                reason = f"plan format {doc.get('format')!r}, this flashmem reads {PLAN_FORMAT}"
            elif doc.get("digest") != _digest(body):
                reason = "its digest does not match its content (edited by hand?)"
            elif doc.get("key") != key or doc.get("program") != program_fingerprint(program):
                reason = "it was made for another model, budget, device or input"
            else:
                plan = plan_from_dict(doc["plan"])
                problems = list(find_problems(plan, program))
                if problems:
                    reason = f"the checker rejects it: {problems[0]}"
                else:
                    costs = CostModel.from_json(json.dumps(doc["costs"])) if doc.get("costs") else None
                    return plan, costs
        except (ValueError, KeyError, TypeError) as err:
            reason = f"it does not parse ({type(err).__name__}: {err})"
        warnings.warn(f"flashmem: discarding cached plan {path.name}: {reason}; planning again", stacklevel=3)
        path.unlink(missing_ok=True)
        return None
