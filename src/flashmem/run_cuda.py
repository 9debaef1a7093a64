"""The CUDA mover: copies from pinned host memory into the device arena on a dedicated stream.

Ordering uses events only, never the host: a load's copy waits for the release event of the last
load that held its bytes; compute waits for the load's completion event before the first op that uses
it; a call's first copies wait for everything the compute stream did before the call. Loads issued at
the same step whose bytes are contiguous both in host memory and in the arena move as one copy.

`StagedCudaMover` (a host budget) reads each call's loads from storage into a pinned staging ring on
threads and copies them onto the device from there, in the same event-ordered way.
"""
from __future__ import annotations

import threading
import time

import torch

from .errors import FlashmemError
from .plan import Plan, previous_holders
from .run import CallStats, DebugOptions
from .store import HostStore, StagedStore


def cap_allocator(device: torch.device, limit_bytes: int) -> float:
    """Make PyTorch's caching allocator on `device` hold at most `limit_bytes` (it frees cached blocks,
    then raises out-of-memory, rather than reserve more); returns the fraction to restore afterwards."""
    total = torch.cuda.get_device_properties(device).total_memory
    saved = torch.cuda.get_per_process_memory_fraction(device)
    torch.cuda.set_per_process_memory_fraction(min(max(limit_bytes, 0) / total, saved), device)
    return saved


def unreleasable_bytes(device: torch.device) -> int:
    """Reserved bytes the caching allocator cannot give back now: allocated blocks, and the free pieces of
    segments that also hold allocated blocks (a 2 MiB input tensor keeps its whole 20 MiB segment)."""
    stats = torch.cuda.memory_stats(device)
    return stats.get("allocated_bytes.all.current", 0) + stats.get("inactive_split_bytes.all.current", 0)


def warm_math_workspace(device: torch.device) -> int:
    """Make the cuBLAS workspace of the current stream on `device` exist (PyTorch takes it from the caching
    allocator at a stream's first matrix product and keeps it: 32 MiB on recent GPUs) and return the bytes
    it took: 0 where the caller's own products had made it already."""
    torch.cuda.synchronize(device)
    before = unreleasable_bytes(device)
    x = torch.ones(16, 16, device=device, dtype=torch.float16)
    torch.nn.functional.linear(x, x, x[0])  # cuBLASLt, as a Linear with a bias
    torch.mm(x.float(), x.float())  # cuBLAS
    del x
    torch.cuda.synchronize(device)
    return max(unreleasable_bytes(device) - before, 0)


def timing_event() -> torch.cuda.Event:
    """A CUDA event that times, also inside a captured CUDA graph (an event record node there)."""
    try:
        return torch.cuda.Event(enable_timing=True, external=True)
    except TypeError:  # a PyTorch without external events: graphs are refused (build.build)
        return torch.cuda.Event(enable_timing=True)


def graphs_supported() -> bool:
    """Whether this PyTorch makes events that time inside a captured graph (`timing_event`)."""
    try:
        torch.cuda.Event(enable_timing=True, external=True)
    except TypeError:
        return False
    return True


def lift_allocator_cap(device: torch.device, saved: float | None) -> None:
    """Undo `cap_allocator` (nothing if `saved` is None); returns None, the state after lifting."""
    if saved is not None:
        torch.cuda.set_per_process_memory_fraction(saved, device)
    return None


class CudaMover:
    def __init__(self, plan: Plan, store: HostStore, arena: torch.Tensor, device: torch.device,
                 debug: DebugOptions = DebugOptions()):
        self.plan = plan
        self.debug = debug
        # torch.cuda._sleep spins for a number of cycles; the clock rate turns seconds into cycles.
        rate_hz = getattr(torch.cuda.get_device_properties(device), "clock_rate", 1_500_000) * 1e3
        self.slow_cycles = int(debug.slow_copy_s * rate_hz)
        self.device = device
        self.arena = arena
        self.copy_stream = torch.cuda.Stream(device)
        n = len(plan.loads)
        self.done = [torch.cuda.Event() for _ in range(n)]
        self.wait_free = previous_holders(plan.loads, plan.alignment)
        awaited = set(self.wait_free)
        self.freed = [torch.cuda.Event() if j in awaited else None for j in range(n)]
        self._store = store
        self.groups = self._copy_groups(store)
        # True: every call times each op's waits (`stats().stall_s`). Otherwise only the profile's and the
        # measured timeline's calls do: the events cost a call time beside its copies (DebugOptions.time_stalls).
        self.timing = debug.time_stalls
        self.t_begin = timing_event()
        self.t_end = timing_event()
        self.call_start = torch.cuda.Event()
        # Per op, events before and after its waits: stall = before -> after; compute of step i = after
        # (op i) -> before (op i + 1).
        self.marks = [(timing_event(), timing_event()) for _ in range(plan.n_ops)]
        self.marked: list[int] = []
        self._stats: CallStats | None = None
        self._pending = None
        self.serial = False  # profiling: copies only between ops, never beside compute
        self.record_loads = False  # time each copy too (for the measured timeline)
        self.load_marks: list[tuple[tuple[int, ...], torch.cuda.Event, torch.cuda.Event]] = []
        self.copy_tail = torch.cuda.Event()
        self.capturing = False  # the call in progress is being captured into a CUDA graph (graphs.py)

    def _copy_groups(self, store: HostStore, merge: bool = True) -> dict[int, list[tuple]]:
        """step -> [(dst, src, loads whose release to wait for, loads completed)]. Loads issued at one step
        that follow each other in both the arena and host memory, with only alignment padding between
        them (padding the plan reserves with the load), and in one pinned chunk of the store, move as one
        copy (unless `merge` is False: then every load is a copy of its own)."""
        raw: dict[int, list[list]] = {}  # step -> [[dst_off, src_off, size, loads]]
        for j, load in enumerate(self.plan.loads):
            host = store.offsets[load.weight]
            step_groups = raw.setdefault(load.start_step, [])
            if step_groups and merge:
                g = step_groups[-1]
                gap = load.offset_bytes - (g[0] + g[2])
                same_chunk = store.chunk_of[load.weight] == store.chunk_of[self.plan.loads[g[3][0]].weight]
                if 0 <= gap < self.plan.alignment and load.offset_bytes - g[0] == host - g[1] and same_chunk:
                    g[2] = load.offset_bytes + load.nbytes - g[0]
                    g[3].append(j)
                    continue
            step_groups.append([load.offset_bytes, host, load.nbytes, [j]])
        out = {}
        for step, gs in raw.items():
            out[step] = [(self.arena[d:d + n], store.buffer[s:s + n],
                          tuple(sorted({self.wait_free[j] for j in loads if self.wait_free[j] is not None})),
                          tuple(loads))
                         for d, s, n, loads in gs]
        return out

    @property
    def timed(self) -> bool:
        """Whether a call now times each op's waits: with `time_stalls`, and in the profile's calls (serial)
        and the measured timeline's (record_loads)."""
        return self.timing or self.serial or self.record_loads

    # -- a call --------------------------------------------------------------------------------------
    def _cap(self) -> None:
        """Cap the caching allocator for the call at what it cannot give back now (allocated blocks and the
        free pieces of the segments that hold them) plus what the budget leaves beside the arena. Where
        cached free segments would take reserved memory past that, they are given back first; during the
        call the allocator frees cached blocks before it goes past the cap, and a call whose activations
        outgrow their reserve fails with out-of-memory instead of overrunning."""
        room = self.plan.budget_bytes - self.plan.arena_bytes - self.plan.fixed_bytes
        limit = unreleasable_bytes(self.device) + max(room, 0)
        if torch.cuda.memory_reserved(self.device) > limit:
            torch.cuda.empty_cache()  # another model's cached blocks, say; only these are given back
        self._saved_fraction = cap_allocator(self.device, limit)

    def _uncap(self) -> None:
        self._saved_fraction = lift_allocator_cap(self.device, getattr(self, "_saved_fraction", None))

    def begin_call(self) -> None:
        self._cap()
        stream = torch.cuda.current_stream(self.device)
        self.compute = stream
        self._stats = None
        self.marked = []
        self.load_marks = []
        self.streamed = 0
        self.capturing = torch.cuda.is_current_stream_capturing()
        if not self.capturing:  # (captured: recorded below, once the copy stream has joined the capture)
            self.copy_tail.record(self.copy_stream)
        self.alloc_start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.wall_start = time.perf_counter()
        self.t_begin.record(stream)
        self.call_start.record(stream)
        # No copy of this call may overwrite arena bytes before earlier compute has read them.
        self.copy_stream.wait_event(self.call_start)
        if self.capturing:
            self.copy_tail.record(self.copy_stream)

    def _copies(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(destination, source) of each copy a call makes, in issue order."""
        return [(dst, src) for step in sorted(self.groups) for dst, src, *_ in self.groups[step]]

    def copy_sizes(self) -> list[int]:
        """The bytes of each copy a call makes, in issue order (loads merged where they follow each other)."""
        return [dst.numel() for dst, _ in self._copies()]

    def merge_copies(self, on: bool) -> None:
        """Merge loads that follow each other into one copy (the default), or (False) copy every load on its
        own: what merging saves in per-copy overhead can then be measured on the same plan. Takes effect
        from the next call (a CUDA graph captured before keeps its copies)."""
        self.groups = self._copy_groups(self._store, merge=on)

    def issue(self, loads: tuple[int, ...]) -> None:
        step = self.plan.loads[loads[0]].start_step
        if self.serial:
            self.call_start.record(self.compute)
            self.copy_stream.wait_event(self.call_start)
        with torch.cuda.stream(self.copy_stream):
            for dst, src, waits, done in self.groups[step]:
                for k in waits:
                    self.copy_stream.wait_event(self.freed[k])
                if self.slow_cycles:
                    torch.cuda._sleep(self.slow_cycles)
                if self.record_loads:
                    mark = (done, timing_event(), timing_event())
                    mark[1].record(self.copy_stream)
                dst.copy_(src, non_blocking=True)
                if self.record_loads:
                    mark[2].record(self.copy_stream)
                    self.load_marks.append(mark)
                for j in done:
                    self.done[j].record(self.copy_stream)
                self.streamed += dst.numel()
        if self.serial:
            self.copy_tail.record(self.copy_stream)

    def wait(self, loads: tuple[int, ...], op: int) -> None:
        timed = self.timed
        if timed:
            before, after = self.marks[op]
            before.record(self.compute)
        for j in loads:
            self.compute.wait_event(self.done[j])
        if self.serial:
            self.compute.wait_event(self.copy_tail)
        if timed:
            after.record(self.compute)
            self.marked.append(op)

    def release(self, loads: tuple[int, ...]) -> None:
        for j in loads:
            if self.debug.poison:  # on the compute stream, after the op, before the release is recorded
                load = self.plan.loads[j]
                self.arena[load.offset_bytes:load.offset_bytes + load.nbytes].fill_(255)
            ev = self.freed[j]
            if ev is not None:
                ev.record(self.compute)

    def end_call(self) -> None:
        self._uncap()
        if self.capturing:  # a captured graph ends with every stream it forked joined to its own
            joined = torch.cuda.Event()
            joined.record(self.copy_stream)
            self.compute.wait_event(joined)
        self.t_end.record(self.compute)
        held = self.plan.arena_bytes + self.plan.fixed_bytes
        activations = torch.cuda.max_memory_allocated(self.device) - self.alloc_start
        self._pending = (held + max(activations, 0), self.streamed, self.timed)

    def abort_call(self, keep: frozenset[int] = frozenset()) -> None:
        # `keep` needs nothing here: issued copies never overwrite bytes that running ops still read.
        # Nothing may overwrite the arena before what was issued has finished; the next call's copies
        # already wait on the compute stream, and the compute stream waits for issued copies here.
        ev = torch.cuda.Event()
        ev.record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(ev)
        self._pending = None
        self._uncap()

    def stats(self) -> CallStats | None:
        if self._stats is None and self._pending is not None:
            self.t_end.synchronize()
            wall = self.t_begin.elapsed_time(self.t_end) / 1e3
            stall = (sum(self.marks[i][0].elapsed_time(self.marks[i][1]) for i in self.marked) / 1e3
                     if self._pending[2] else None)
            self._stats = CallStats(peak_bytes=self._pending[0], streamed_bytes=self._pending[1],
                                    wall_s=wall, stall_s=stall)
        return self._stats

    def timeline(self):
        """The last call as it ran (a call made with every op and copy timed): a costs.Timeline."""
        from .costs import Timeline

        steps = self.step_seconds()
        t0 = self.t_begin
        starts = [t0.elapsed_time(self.marks[i][1]) / 1e3 for i in range(self.plan.n_ops)]
        load_start, load_end = [0.0] * len(self.plan.loads), [0.0] * len(self.plan.loads)
        for done, a, b in self.load_marks:
            for j in done:
                load_start[j], load_end[j] = t0.elapsed_time(a) / 1e3, t0.elapsed_time(b) / 1e3
        return Timeline(tuple(starts), tuple(s + d for s, d in zip(starts, steps)), tuple(load_start),
                        tuple(load_end))

    def copy_intervals(self) -> list[tuple[float, float, int]]:
        """(start s, end s, bytes) of each copy of the last call made with `record_loads`, from the call's
        start; a copy starts once the releases it waits for are in. Valid after a replay of a graph captured
        with `record_loads` too (its events are recorded again)."""
        self.t_end.synchronize()
        t0 = self.t_begin
        return [(t0.elapsed_time(a) / 1e3, t0.elapsed_time(b) / 1e3, sum(self.plan.loads[j].nbytes for j in done))
                for done, a, b in self.load_marks]

    def copies_alone_s(self, repeats: int = 3, graph: bool = False) -> float:
        """Seconds one call's copies take alone on the link: every copy of the plan, in order, on the copy
        stream, with no compute and no waits between them (median of `repeats`). The time the link needs for
        exactly the bytes and copies a call makes, per-copy overhead included: the floor a streamed call's
        copy lane is measured against. With `graph`, the copies are captured into one CUDA graph and
        replayed, as a replayed call's copies are (its per-node cost then counts too). Overwrites the ring's
        bytes, so it runs between calls only; the next call loads every streamed weight again before its
        use, as always."""
        torch.cuda.synchronize(self.device)
        copies = self._copies()

        def run_all():
            for dst, src in copies:
                dst.copy_(src, non_blocking=True)
        replay = run_all
        if graph:
            from .costs import _capture

            replay = _capture(run_all, self.device).replay
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                a.record(self.copy_stream)
                replay()
                b.record(self.copy_stream)
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]

    def step_seconds(self) -> list[float]:
        """Compute time of each step of the last call (op i's entry, after its waits, to op i + 1's
        entry); valid after a call made with every op timed."""
        assert self.marked == list(range(self.plan.n_ops)), "the last call was not profiled"
        self.t_end.synchronize()
        ends = [self.marks[i + 1][0] for i in range(self.plan.n_ops - 1)] + [self.t_end]
        return [self.marks[i][1].elapsed_time(ends[i]) / 1e3 for i in range(self.plan.n_ops)]


class StagedCudaMover(CudaMover):
    """CUDA under a host budget (`StagedStore`): each call reads what it streams from storage into a pinned
    staging ring and copies it onto the device from there, as the plan's `Staging` lays it out.

    Loads go through the ring in the order they start (first-in, first-out, wrapping at its end). Reader
    threads read them ahead, each into its slot once the copies of the loads that held those ring bytes
    have finished; one issuer thread, in order, waits for a load's read and for its arena bytes to be
    released by compute (the release's event is recorded first), then copies it on the copy stream. The
    compute thread waits for a load's copy to be issued (the only host wait of a call, and only when storage
    is behind), then its stream waits on the copy's event, as in `CudaMover`."""

    READERS = 4  # several reads in flight: what storage needs to reach its rate

    def __init__(self, plan: Plan, store: StagedStore, arena: torch.Tensor, device: torch.device,
                 debug: DebugOptions = DebugOptions()):
        super().__init__(plan, store, arena, device, debug=debug)
        self.store = store
        if plan.staging is None or plan.staging.ring_bytes > store.ring_bytes:
            raise FlashmemError("internal: a host-budget call needs a plan with the staging ring's layout")
        self.staging = plan.staging
        n = len(plan.loads)
        self.read_done = [threading.Event() for _ in range(n)]
        self.issued = [threading.Event() for _ in range(n)]
        self.released = [threading.Event() for _ in range(n)]
        self.threads: list[threading.Thread] = []
        self.io_error: BaseException | None = None
        self.stop = False

    def _copy_groups(self, store, merge: bool = True) -> dict[int, list[tuple]]:
        return {}  # the issuer thread copies load by load

    def copy_sizes(self) -> list[int]:
        return [load.nbytes for load in self.plan.loads]

    # -- a call --------------------------------------------------------------------------------------
    def begin_call(self) -> None:
        self.store.check_unchanged()  # before the allocator is capped: a refusal leaves nothing behind
        super().begin_call()
        for flags in (self.read_done, self.issued, self.released):
            for ev in flags:
                ev.clear()
        self.io_error, self.stop = None, False
        self.cursor = iter(self.staging.order)
        self.claim = threading.Lock()
        self.threads = [threading.Thread(target=self._reader, name=f"flashmem-stage-{k}", daemon=True)
                        for k in range(self.READERS)]
        self.threads.append(threading.Thread(target=self._issuer, name="flashmem-issue", daemon=True))
        for t in self.threads:
            t.start()

    def issue(self, loads: tuple[int, ...]) -> None:
        pass  # the issuer thread issues every load, in order

    def wait(self, loads: tuple[int, ...], op: int) -> None:
        timed = self.timed
        if timed:
            before, after = self.marks[op]
            before.record(self.compute)
        for j in loads:
            self._await(self.issued[j])
            self.compute.wait_event(self.done[j])
        if timed:
            after.record(self.compute)
            self.marked.append(op)

    def release(self, loads: tuple[int, ...]) -> None:
        super().release(loads)  # records the releases' events on the compute stream first
        for j in loads:
            self.released[j].set()

    def end_call(self) -> None:
        self._join()
        super().end_call()

    def abort_call(self, keep: frozenset[int] = frozenset()) -> None:
        self.stop = True
        self._join()
        super().abort_call(keep)

    # -- the threads ---------------------------------------------------------------------------------
    def _await(self, flag: threading.Event) -> None:
        """Wait for a flag another thread sets; a failure of the staging threads surfaces here."""
        while not flag.wait(0.05):
            if self.stop:
                raise _Stopped()
        if self.io_error is not None:
            if isinstance(self.io_error, FlashmemError):
                raise self.io_error
            raise FlashmemError(f"reading the weights from storage failed: {self.io_error}") from self.io_error

    def _fail(self, err: BaseException) -> None:
        if self.io_error is None:
            self.io_error = err
        for flags in (self.read_done, self.issued):
            for ev in flags:
                ev.set()

    def _reader(self) -> None:
        try:
            self.copy_tail.synchronize()  # the last call's copies out of the ring are done
            while not self.stop and self.io_error is None:
                with self.claim:
                    j = next(self.cursor, None)
                if j is None:
                    return
                k = self.staging.after[j]  # the latest earlier load that held these ring bytes
                if k >= 0:
                    self._await(self.issued[k])
                    self.done[k].synchronize()
                self.store.read_stage(self.plan.loads[j].weight, self.staging.ring_offsets_bytes[j])
                self.read_done[j].set()
        except _Stopped:
            return
        except BaseException as err:  # noqa: BLE001 - surfaced in the compute thread
            self._fail(err)

    def _issuer(self) -> None:
        try:
            with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
                for j in self.staging.order:
                    load = self.plan.loads[j]
                    self._await(self.read_done[j])
                    k = self.wait_free[j]
                    if k is not None:
                        self._await(self.released[k])
                        self.copy_stream.wait_event(self.freed[k])
                    a = self.staging.ring_offsets_bytes[j]
                    if self.slow_cycles:  # debug: copies held back, to shake out missing waits
                        torch.cuda._sleep(self.slow_cycles)
                    self.arena[load.offset_bytes:load.offset_bytes + load.nbytes].copy_(
                        self.store.ring[a:a + load.nbytes], non_blocking=True)
                    self.done[j].record(self.copy_stream)
                    self.streamed += load.nbytes
                    self.issued[j].set()
                self.copy_tail.record(self.copy_stream)
        except _Stopped:
            self.copy_tail.record(self.copy_stream)
        except BaseException as err:  # noqa: BLE001 - surfaced in the compute thread
            self._fail(err)

    def _join(self) -> None:
        for t in self.threads:
            t.join()
        self.threads = []
        # the ring may be written by the host next (a trace's synchronous reads): no copy may still read it
        self.copy_stream.synchronize()


class _Stopped(Exception):
    """The call was aborted: the staging threads leave."""
