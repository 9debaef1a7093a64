"""The plan checker: validates a plan against the traced program before it runs.

It shares no code with the planners on purpose, so a planner bug cannot hide itself: use intervals
are rebuilt here from the program's ops. It checks that
- every use of every weight finds it in place: resident, or loaded by a load issued no later than the
  use and kept until the op (and any op nested in it) has finished;
- no two weights share arena bytes while both are in place (from a load's issue to its release);
- everything lies inside the arena, aligned, and loads are issued in order (one copy queue);
- arena, fixed device memory (the math libraries' workspace) and the activation reserve fit in the budget;
- with a host staging ring: every load passes through it once, in the order loads start, inside the ring,
  and is read into it only after the copies of every earlier load that held those ring bytes.
"""
from __future__ import annotations

from .errors import PlanInvalid
from .units import fmt_bytes


def check_plan(plan, program) -> None:
    """Raise PlanInvalid naming the first broken rule; return None for a valid plan."""
    problems = list(find_problems(plan, program))
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise PlanInvalid(f"plan rejected by the checker: {shown}{more}; the plan is not executed. "
                          f"Delete any cached plan and plan again")


def find_problems(plan, program):
    weights = program.weights
    n_ops = len(program.ops)
    if plan.n_ops != n_ops:
        yield f"plan covers {plan.n_ops} ops but the program has {n_ops}"
        return
    held = plan.arena_bytes + plan.fixed_bytes + plan.activation_bytes
    if held > plan.budget_bytes:
        yield (f"arena {fmt_bytes(plan.arena_bytes)} + workspace {fmt_bytes(plan.fixed_bytes)} + activations "
               f"{fmt_bytes(plan.activation_bytes)} = {fmt_bytes(held)} exceeds the budget "
               f"{fmt_bytes(plan.budget_bytes)}")
    if getattr(plan, "staging", None) is not None:
        yield from staging_problems(plan)
    if plan.resident_bytes > plan.arena_bytes:
        yield f"resident region {plan.resident_bytes} B is larger than the arena {plan.arena_bytes} B"

    resident_of = {}
    regions = []  # (begin, end, held_from_step, held_to_step, label) ; residents are held for all steps
    for r in plan.residents:
        if r.weight in resident_of:
            yield f"weight {weights[r.weight].name} is resident twice"
        resident_of[r.weight] = r
        if r.nbytes != weights[r.weight].nbytes:
            yield f"resident {weights[r.weight].name} has {r.nbytes} B, the weight has {weights[r.weight].nbytes} B"
        if r.offset_bytes % plan.alignment or r.offset_bytes < 0 or r.offset_bytes + r.nbytes > plan.resident_bytes:
            yield f"resident {weights[r.weight].name} at {r.offset_bytes}+{r.nbytes} is outside [0, {plan.resident_bytes}) or misaligned"
        regions.append((r.offset_bytes, r.offset_bytes + r.nbytes, -1, n_ops, weights[r.weight].name))

    loads_of: dict[int, list] = {}
    prev_start = -1
    for i, load in enumerate(plan.loads):
        name = weights[load.weight].name
        if load.weight in resident_of:
            yield f"{name} is both resident and loaded"
        if load.nbytes != weights[load.weight].nbytes:
            yield f"load {i} of {name} moves {load.nbytes} B, the weight has {weights[load.weight].nbytes} B"
        if load.start_step < prev_start:
            yield f"load {i} ({name}) is issued at op {load.start_step}, before load {i - 1} (op {prev_start})"
        prev_start = load.start_step
        if not 0 <= load.start_step <= load.first_use:
            yield f"load {i} ({name}) is issued at op {load.start_step}, after its first use at op {load.first_use}"
        if not load.first_use <= load.last_use < n_ops or not load.first_use <= load.release_op <= load.last_use:
            yield f"load {i} ({name}) has inconsistent steps {load.first_use}..{load.last_use}, release {load.release_op}"
        elif program.ops[load.release_op].end_index != load.last_use:
            yield (f"load {i} ({name}) is released when op {load.release_op} exits, which is after op "
                   f"{program.ops[load.release_op].end_index}, not after op {load.last_use}")
        # A load owns its bytes rounded up to the alignment: the runtime may copy the padding with it.
        begin, end = load.offset_bytes, load.offset_bytes + -(-load.nbytes // plan.alignment) * plan.alignment
        if begin % plan.alignment or begin < plan.resident_bytes or end > plan.arena_bytes:
            yield f"load {i} ({name}) at [{begin}, {end}) is outside the ring [{plan.resident_bytes}, {plan.arena_bytes}) or misaligned"
        regions.append((begin, end, load.start_step, load.last_use, f"load {i} ({name})"))
        loads_of.setdefault(load.weight, []).append(load)

    # Every use, with the span the weight must stay for: from the op's entry to the end of its nested ops.
    for op in program.ops:
        for w in op.weights:
            if w in resident_of:
                continue
            ok = any(l.first_use <= op.index and l.start_step <= op.index and op.end_index <= l.last_use
                     for l in loads_of.get(w, ()))
            if not ok:
                yield f"op {op.index} ({op.module}) uses {weights[w].name}, which no load has in place then"

    # No two regions share a byte while both are held (a held span is inclusive of both ends). A sweep finds
    # whether any pair does; only then are the pairs listed, one by one.
    if not _shared_while_held(regions):
        return
    regions.sort()
    for a in range(len(regions)):
        b0, e0, s0, t0, label0 = regions[a]
        for b in range(a + 1, len(regions)):
            b1, e1, s1, t1, label1 = regions[b]
            if b1 >= e0:
                break
            if s0 <= t1 and s1 <= t0:
                yield f"{label0} and {label1} share arena bytes [{b1}, {min(e0, e1)}) while both are held (ops {max(s0, s1)}..{min(t0, t1)})"


def _shared_while_held(regions) -> bool:
    """Whether two of the (begin, end, from step, to step, label) regions share a byte while both are held.

    In order of the step they are taken from: a region clashes with an earlier one exactly when one of
    them holds a byte of the other until its start or later. So a map of the arena's bytes, in segments,
    each with the latest step any region taken so far holds it to, answers for each region in a few
    segments, where the pairs of a long sequence's ring (thousands of loads over the same bytes) are
    millions. A region of no bytes shares none, but the pairwise listing counts one lying inside another:
    where there is one, the listing decides. A clash found here only sends the check to the listing, so
    this may err toward True (a broken span), never toward False."""
    import bisect

    if any(b >= e for b, e, *_ in regions):
        return True
    # segment i: bytes [starts[i], starts[i + 1]), held to step until[i] (-2: never); offsets may be negative
    # in a broken plan
    starts, until = [min([0] + [b for b, *_ in regions])], [-2]

    def boundary(x: int) -> int:
        i = bisect.bisect_right(starts, x) - 1
        if starts[i] != x:
            starts.insert(i + 1, x)
            until.insert(i + 1, until[i])
            i += 1
        return i

    for begin, end, first, last, _ in sorted(regions, key=lambda r: r[2]):
        lo, hi = boundary(begin), boundary(end)
        if max(until[lo:hi]) >= first:
            return True
        merged_starts, merged = [], []
        for x, t in zip(starts[lo:hi], until[lo:hi]):
            t = max(t, last)
            if not merged or merged[-1] != t:
                merged_starts.append(x)
                merged.append(t)
        starts[lo:hi], until[lo:hi] = merged_starts, merged
    return False


def staging_problems(plan):
    """The host staging ring (a host budget), rebuilt from the loads: one read and one copy per load, in
    the order loads start; ring bytes reused only after the copy of every earlier holder (copies finish
    in the ring's order, so waiting for a later load's copy covers an earlier one's)."""
    st = plan.staging
    n = len(plan.loads)
    if sorted(st.order) != list(range(n)) or len(st.ring_offsets_bytes) != n or len(st.after) != n:
        yield f"the staging ring's order does not list each of the {n} loads once"
        return
    position = {j: p for p, j in enumerate(st.order)}
    starts = [plan.loads[j].start_step for j in st.order]
    if any(a > b for a, b in zip(starts, starts[1:])):
        yield "the staging ring reads loads out of the order they start in"
    pad = st.alignment
    spans = {j: (st.ring_offsets_bytes[j], st.ring_offsets_bytes[j] + -(-plan.loads[j].nbytes // pad) * pad)
             for j in range(n)}
    for j, (b, e) in spans.items():
        if b < 0 or e > st.ring_bytes or b % pad:
            yield f"load {j} at [{b}, {e}) lies outside the staging ring of {st.ring_bytes} bytes or is misaligned"
    for p, j in enumerate(st.order):
        b, e = spans[j]
        waited = position.get(st.after[j], -1) if st.after[j] >= 0 else -1
        if waited >= p:
            yield f"load {j} waits for load {st.after[j]}, which does not come before it in the staging ring"
        for q in range(p):
            k = st.order[q]
            kb, ke = spans[k]
            if kb < e and b < ke and waited < q:
                yield f"load {j} is read into ring bytes [{max(b, kb)}, {min(e, ke)}) before load {k}'s copy out of them has finished"
                break
