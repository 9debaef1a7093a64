"""Report: pictures of a plan. A timeline with the compute lane and the copy lane (predicted, and
measured when given), and the device memory in use against the budget, drawn with matplotlib."""
from __future__ import annotations

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
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
