"""The CPU movers: an IO thread brings weights from safetensors files into RAM, ahead of compute.

The thread takes the plan's loads in order; before each it waits until compute has released the load
that last held those bytes, then brings the weight in (the GIL is released meanwhile, so it overlaps
compute). Compute waits only for the loads an op uses first.

- `MapMover` (the default): the files are mapped; a load faults the weight's pages in from the page
  cache (MADV_POPULATE_READ) and a release drops them, so compute reads the page cache's own pages and
  nothing is copied. Only which pages are resident, not what a weight reads, depends on the thread.
- `CpuMover`: a load `pread`s the weight into its region of a RAM arena (the debug poison runs on it).
"""
from __future__ import annotations

import threading
import time

import torch

from .errors import FlashmemError
from .plan import Plan, previous_holders
from .run import CallStats, DebugOptions
from .store import FileStore, MappedFiles


def status_bytes(field: str) -> int:
    """A size field of /proc/self/status ("VmRSS:", "VmHWM:", "RssAnon:", ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes() -> int:
    return status_bytes("VmRSS:")


def peak_rss_bytes() -> int:
    return status_bytes("VmHWM:")


class CpuMover:
    def __init__(self, plan: Plan, store: FileStore, arena: torch.Tensor, debug: DebugOptions = DebugOptions()):
        self.plan = plan
        self.debug = debug
        self.store = store
        self.arena = arena
        self.arena_np = arena.numpy()
        self.wait_free = previous_holders(plan.loads, plan.alignment)
        self.cond = threading.Condition()
        self.generation = 0  # bumped per call; the IO thread works on one generation at a time
        self.released = [False] * len(plan.loads)
        self.loaded = 0  # loads [0, loaded) of this call are in the arena
        self.error: BaseException | None = None
        self.abort = False
        self.busy = False
        self.taken = 0  # the generation the IO thread last took up
        self.closed = False
        self._stats: CallStats | None = None
        self.serial = False  # profiling: reads happen in the compute thread between ops, never beside them
        self.record_loads = False  # the IO thread always times its reads
        self.pending: list[int] = []
        self.load_times: list[tuple[float, float]] = [(0.0, 0.0)] * len(plan.loads)
        self.thread = threading.Thread(target=self._io_loop, name="flashmem-io", daemon=True)
        if plan.loads:
            self.thread.start()

    # -- the IO thread ---------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        seen = 0
        while True:
            with self.cond:
                while self.generation == seen and not self.closed:
                    self.cond.wait()
                if self.closed:
                    return
                seen = self.taken = self.generation
                self.busy = True
            try:
                self._run_loads()
            except BaseException as err:  # surfaced to compute by wait()
                with self.cond:
                    self.error = err
                    self.cond.notify_all()
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _run_loads(self) -> None:
        loads = self.plan.loads
        for j, load in enumerate(loads):
            k = self.wait_free[j]
            with self.cond:
                while not self.abort and k is not None and not self.released[k]:
                    self.cond.wait()
                if self.abort:
                    return
            if self.debug.slow_copy_s:
                time.sleep(self.debug.slow_copy_s)
            began = time.perf_counter()
            self._load(j)
            self.load_times[j] = (began, time.perf_counter())
            with self.cond:
                self.loaded = j + 1
                self.cond.notify_all()

    def _load(self, j: int) -> None:
        load = self.plan.loads[j]
        view = memoryview(self.arena_np[load.offset_bytes:load.offset_bytes + load.nbytes])
        self.store.read_into_view(load.weight, view)
        if self.debug.verify:
            self.store.verify(load.weight, view)

    def _drop(self, loads: tuple[int, ...]) -> None:
        if self.debug.poison:
            for j in loads:
                load = self.plan.loads[j]
                self.arena[load.offset_bytes:load.offset_bytes + load.nbytes].fill_(255)

    # -- a call --------------------------------------------------------------------------------------
    def begin_call(self) -> None:
        self._drain()
        self.store.check_unchanged()
        self._stats = None
        self.stall = 0.0
        self.marks: list[tuple[int, float, float]] = []  # (op, before its waits, after them)
        reset_peak_rss()
        self.rss_start = rss_bytes()
        self.wall_start = time.perf_counter()
        with self.cond:
            self.released = [False] * len(self.plan.loads)
            self.loaded = 0
            self.error = None
            self.abort = False
            if self.plan.loads and not self.serial:
                self.generation += 1
                self.cond.notify_all()

    def issue(self, loads: tuple[int, ...]) -> None:
        if self.serial:
            self.pending.extend(loads)  # read in wait(), inside the op's wait time
        # else the IO thread runs ahead on its own, as far as released bytes allow

    def wait(self, loads: tuple[int, ...], op: int) -> None:
        t0 = time.perf_counter()
        for j in self.pending:
            self._load(j)
            self.loaded = j + 1
        self.pending.clear()
        need = max(loads) + 1 if loads else 0
        if self.loaded < need:
            with self.cond:
                while self.loaded < need and self.error is None:
                    self.cond.wait()
                if self.error is not None:
                    err = self.error
                    if isinstance(err, FlashmemError):
                        raise err
                    raise FlashmemError(f"reading weights from storage failed: {err}") from err
        t1 = time.perf_counter()
        self.stall += t1 - t0
        self.marks.append((op, t0, t1))

    def release(self, loads: tuple[int, ...]) -> None:
        self._drop(loads)
        with self.cond:
            for j in loads:
                self.released[j] = True
            self.cond.notify_all()

    def end_call(self) -> None:
        self.wall_end = time.perf_counter()
        wall = self.wall_end - self.wall_start
        growth = max(peak_rss_bytes() - self.rss_start, 0)
        held = self._held_bytes()
        streamed = self.plan.streamed_bytes
        self._drain()
        self._stats = CallStats(peak_bytes=held + growth, streamed_bytes=streamed, wall_s=wall, stall_s=self.stall)

    def _held_bytes(self) -> int:
        """Bytes the call held before it began (RSS growth measures the rest): the arena."""
        return self.plan.arena_bytes

    def abort_call(self, keep: frozenset[int] = frozenset()) -> None:
        """Stop the call's loads (the IO thread gives up on those not begun); `keep`: loads still read."""
        with self.cond:
            self.abort = True
            self.cond.notify_all()
        self._drain()

    def _drain(self) -> None:
        """Wait until the IO thread has finished the current call's loads (or given up on them)."""
        with self.cond:
            while self.thread.is_alive() and (self.busy or (self.taken != self.generation and not self.abort)):
                self.cond.wait(timeout=1.0)

    def stats(self) -> CallStats | None:
        return self._stats

    def timeline(self):
        """The last call as it ran (a call made with every op timed): a costs.Timeline."""
        from .costs import Timeline

        t0, steps = self.wall_start, self.step_seconds()
        starts = [m[2] - t0 for m in self.marks]
        return Timeline(tuple(starts), tuple(s + d for s, d in zip(starts, steps)),
                        tuple(a - t0 for a, _ in self.load_times), tuple(b - t0 for _, b in self.load_times))

    def step_seconds(self) -> list[float]:
        """Compute time of each step of the last call (see CudaMover.step_seconds)."""
        assert [m[0] for m in self.marks] == list(range(self.plan.n_ops)), "the last call was not profiled"
        ends = [m[1] for m in self.marks[1:]] + [self.wall_end]
        return [end - m[2] for m, end in zip(self.marks, ends)]

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.abort = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout=5)


class MapMover(CpuMover):
    """Loads fault a weight's pages of the mapped files in; releases drop them (see the module's doc)."""

    def __init__(self, plan: Plan, files: MappedFiles, debug: DebugOptions = DebugOptions()):
        self.files = files
        super().__init__(plan, files.store, torch.empty(0, dtype=torch.uint8), debug)

    def _load(self, j: int) -> None:
        w = self.plan.loads[j].weight
        self.files.hold(w)
        if self.debug.verify:
            try:
                self.store.verify(w, memoryview(self.files.view(w).numpy()))
            except BaseException:
                self.files.unhold(w)  # the load failed: it holds nothing
                raise

    def _drop(self, loads: tuple[int, ...]) -> None:
        for j in loads:
            if j < self.loaded and not self.released[j]:  # after an abort, some were dropped already
                self.files.unhold(self.plan.loads[j].weight)

    def _held_bytes(self) -> int:
        return self.plan.resident_bytes  # populated before the call; the streamed pages show in RSS growth

    def abort_call(self, keep: frozenset[int] = frozenset()) -> None:
        super().abort_call(keep)
        self._drop_unreleased(keep)

    def _drop_unreleased(self, keep: frozenset[int]) -> None:
        """After an abort: drop what the loads brought in and compute never released, except `keep`."""
        for j in range(min(self.loaded, len(self.plan.loads))):
            if not self.released[j] and j not in keep:
                self.released[j] = True
                self.files.unhold(self.plan.loads[j].weight)
