"""Report: pictures of a plan. A timeline with the compute lane and the copy lane (predicted, and
measured when given), and the device memory in use against the budget, drawn with matplotlib; and the
same as one self-contained HTML page, with the plan's figures and a table of its ops, loads and residents
(each op's predicted and measured times, each load's bytes, steps and offset) to search in a browser."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from .costs import Timeline
from .plan import Plan
from .trace import Program
from .units import align_up, fmt_bytes


def memory_curve(plan: Plan, timeline: Timeline) -> tuple[list[float], list[int]]:
    """(times, bytes held) as a step function: residents and activations always, each load's bytes
    from the start of its issuing step to the end of its last use."""
    base = plan.resident_bytes + plan.activation_bytes + plan.fixed_bytes
    held_to = [timeline.step_end_s[load.last_use] for load in plan.loads]
    for j, load in enumerate(plan.loads):  # a load's bytes are free once a later load into them has begun
        begin, end = load.offset_bytes, load.offset_bytes + align_up(load.nbytes, plan.alignment)
        for k in range(j):
            other = plan.loads[k]
            if other.offset_bytes < end and begin < other.offset_bytes + align_up(other.nbytes, plan.alignment):
                held_to[k] = min(held_to[k], timeline.load_start_s[j])
    events: list[tuple[float, int]] = []
    for j, load in enumerate(plan.loads):
        held_from = 0.0 if load.start_step == 0 else min(timeline.step_start_s[load.start_step], timeline.load_start_s[j])
        events.append((held_from, load.nbytes))
        events.append((max(held_to[j], held_from), -load.nbytes))
    events.sort(key=lambda e: (e[0], e[1]))
    times, held, level = [0.0], [base], base
    for t, delta in events:
        level += delta
        times.append(t)
        held.append(level)
    times.append(timeline.total_s)
    held.append(level)
    return times, held


def plot_plan(plan: Plan, program: Program, predicted: Timeline, path: str | Path,
              measured: Timeline | None = None) -> Path:
    """Write a PNG: compute and copy lanes (predicted, and measured beneath if given), memory vs budget."""
    path = Path(path)
    _draw(plan, program, predicted, measured, path)
    return path


def _draw(plan: Plan, program: Program, predicted: Timeline, measured: Timeline | None, target) -> None:
    """The plan's figure as a PNG, to a path or a binary file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lanes, mem) = plt.subplots(2, 1, figsize=(12, 6), sharex=True,
                                     gridspec_kw={"height_ratios": [2, 1.4]})
    rows = [("predicted", predicted)] + ([("measured", measured)] if measured is not None else [])
    labels = []
    for k, (name, tl) in enumerate(rows):
        y_compute, y_copy = 2 * k * 1.2 + 1.2, 2 * k * 1.2
        lanes.broken_barh([(s * 1e3, (e - s) * 1e3) for s, e in zip(tl.step_start_s, tl.step_end_s)],
                          (y_compute, 0.9), facecolors=["tab:blue", "tab:cyan"] * (len(tl.step_start_s) // 2 + 1))
        lanes.broken_barh([(s * 1e3, (e - s) * 1e3) for s, e in zip(tl.load_start_s, tl.load_end_s)],
                          (y_copy, 0.9), facecolors=["tab:orange", "tab:red"] * (len(tl.load_start_s) // 2 + 1))
        labels += [(y_copy + 0.45, f"{name}: copy"), (y_compute + 0.45, f"{name}: compute")]
    lanes.set_yticks([y for y, _ in labels], [t for _, t in labels])
    lanes.set_title(f"{plan.status} plan on {plan.device}: {len(program.ops)} ops, "
                    f"{fmt_bytes(plan.streamed_bytes)} streamed per call, predicted "
                    f"{(plan.predicted_s or predicted.total_s) * 1e3:.2f} ms"
                    + (f", measured {measured.total_s * 1e3:.2f} ms" if measured is not None else ""))
    for name, tl in rows:
        times, held = memory_curve(plan, tl)
        mem.step([t * 1e3 for t in times], [h / 2**20 for h in held], where="post", label=f"held ({name})")
    mem.axhline(plan.budget_bytes / 2**20, color="black", linestyle="--", label="budget")
    mem.set_ylabel("device memory (MiB)")
    mem.set_xlabel("time (ms)")
    mem.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(target, dpi=110, format="png")
    plt.close(fig)


_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin:1em 0}"
          "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td.l,th.l{text-align:left}"
          "img{max-width:100%}")


def _table(headers: list[str], rows: list[list], left: set[int] = frozenset()) -> str:
    def cell(tag: str, k: int, v) -> str:
        attr = ' class="l"' if k in left else ""
        return f"<{tag}{attr}>{html.escape(str(v))}</{tag}>"

    head = "".join(cell("th", k, h) for k, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", k, v) for k, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_plan_html(plan: Plan, program: Program, predicted: Timeline, path: str | Path,
                    measured: Timeline | None = None, smallest_budget_bytes: int | None = None) -> Path:
    """Write one HTML page (nothing outside it): the plan's summary, its figure (as `plot_plan` draws it)
    and tables of its ops (weights used, loads issued, predicted and measured start and end), loads and
    residents. Names are escaped; times are milliseconds from the call's start."""
    buf = io.BytesIO()
    _draw(plan, program, predicted, measured, buf)
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    names = [w.name for w in program.weights]
    ms = "{:.3f}".format

    summary = [["status", plan.status + (f" ({plan.note})" if plan.note else "")], ["device", plan.device],
               ["budget", fmt_bytes(plan.budget_bytes)], ["arena", fmt_bytes(plan.arena_bytes)],
               ["resident", f"{fmt_bytes(plan.resident_bytes)} in {len(plan.residents)} weights"],
               ["streamed per call", f"{fmt_bytes(plan.streamed_bytes)} in {len(plan.loads)} loads"],
               ["activation reserve", fmt_bytes(plan.activation_bytes)], ["fixed", fmt_bytes(plan.fixed_bytes)],
               ["predicted", f"{ms((plan.predicted_s or predicted.total_s) * 1e3)} ms"]]
    if measured is not None:
        summary.append(["measured", f"{ms(measured.total_s * 1e3)} ms"])
    if plan.bound_s:
        summary.append(["lower bound (relaxation)", f"{ms(plan.bound_s * 1e3)} ms"])
    if plan.solve_s:
        summary.append(["planning time", f"{plan.solve_s:.2f} s"])
    if smallest_budget_bytes is not None:
        summary.append(["smallest budget for this input", f"{fmt_bytes(smallest_budget_bytes)} "
                                                           f"({smallest_budget_bytes} bytes)"])

    resident = {r.weight for r in plan.residents}
    issued: dict[int, list[str]] = {}
    for load in plan.loads:
        issued.setdefault(load.start_step, []).append(names[load.weight])
    op_rows = []
    for op in program.ops:
        row = [op.index, op.module, ", ".join(names[w] + (" (resident)" if w in resident else "") for w in op.weights),
               ", ".join(issued.get(op.index, [])), ms(predicted.step_start_s[op.index] * 1e3),
               ms(predicted.step_end_s[op.index] * 1e3)]
        if measured is not None:
            row += [ms(measured.step_start_s[op.index] * 1e3), ms(measured.step_end_s[op.index] * 1e3)]
        op_rows.append(row)
    op_headers = ["op", "module", "weights", "loads issued here", "predicted start", "predicted end"]
    op_headers += ["measured start", "measured end"] if measured is not None else []

    load_rows = []
    for j, load in enumerate(plan.loads):
        row = [j, names[load.weight], load.nbytes, load.start_step, load.first_use, load.last_use,
               load.offset_bytes, ms(predicted.load_start_s[j] * 1e3), ms(predicted.load_end_s[j] * 1e3)]
        if measured is not None:
            row += [ms(measured.load_start_s[j] * 1e3), ms(measured.load_end_s[j] * 1e3)]
        load_rows.append(row)
    load_headers = ["load", "weight", "bytes", "issued at op", "first use", "last use", "arena offset",
                    "predicted start", "predicted end"]
    load_headers += ["measured start", "measured end"] if measured is not None else []
    res_rows = [[names[r.weight], r.nbytes, r.offset_bytes] for r in plan.residents]

    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>flashmem plan</title>"
            f"<style>{_STYLE}</style></head><body><h1>flashmem plan</h1>"
            + _table(["", ""], summary, left={0, 1})
            + f"<img alt=\"timeline and memory\" src=\"data:image/png;base64,{png}\">"
            + f"<h2>Ops ({len(op_rows)}), times in ms</h2>" + _table(op_headers, op_rows, left={1, 2, 3})
            + f"<h2>Loads ({len(load_rows)})</h2>" + _table(load_headers, load_rows, left={1})
            + f"<h2>Residents ({len(res_rows)})</h2>" + _table(["weight", "bytes", "arena offset"], res_rows, left={0})
            + "</body></html>")
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
