"""Costs: the measured numbers the planner predicts with.

- `LinkCost`: the link weights move over (pinned host-to-device copies on CUDA, `pread` from storage on
  the CPU), as a per-copy overhead plus bytes over bandwidth, fitted to copies of several sizes (for a plan
  that replays CUDA graphs, copies replayed from one: the device's own overhead, not the host's launches).
- `StepCost`: per step (op i's entry to op i + 1's entry), the compute time with nothing moving beside it
  and the slowdown while a transfer runs beside it, measured rather than assumed: on the CPU per op class
  (an IO thread on 2 cores competes with compute), on CUDA once per device on kernel chains with copies
  beside them in one graph (`measure_kernel_slowdown`: copy engines barely disturb a discrete GPU, and
  per-step timing events beside copies would time the events).
- `CostModel`: both, for one model, input signature and device, on CUDA the time a step loses when its
  op waits for the copy stream (`wait_s`), and the other direction of the interference: the link's rate
  while ops compute beside it over its idle rate (`link_busy_factor`, measured per model and plan: on CUDA
  from the copies of one streamed call, each timed by events, against the link's fit; an H200's copies
  moved 0.89-0.96 of their idle rate beside an SD-1.5 UNet's compute and 0.91-1.0 beside a ViT-L's); JSON
  for the plan cache.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import FlashmemError
from .files import pread_into
from .plan import follows, previous_holders


@dataclass(frozen=True)
class LinkCost:
    kind: str
    bandwidth_bytes_per_s: float
    overhead_s: float  # fixed cost of one copy

    def seconds(self, nbytes: int, copies: int = 1) -> float:
        return copies * self.overhead_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class StepCost:
    op_class: str  # the module type of the op that opens the step
    compute_s: float  # with nothing moving beside it
    slowdown: float  # compute time multiplier while a transfer runs beside it (>= 1)


@dataclass(frozen=True)
class CostModel:
    device: str
    signature: str
    link: LinkCost
    steps: tuple[StepCost, ...]
    wait_s: float = 0.0  # added to a step whose op waits for a load (CUDA: a dependency on the copy stream)
    # The link's rate while an op computes over its rate while nothing does (1.0: compute does not slow it).
    link_busy_factor: float = 1.0

    def __post_init__(self):
        if not 0.0 < self.link_busy_factor <= 1.0:
            raise FlashmemError(f"link_busy_factor {self.link_busy_factor} is outside (0, 1]")

    @property
    def compute_s(self) -> float:
        return sum(s.compute_s for s in self.steps)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        doc = json.loads(text)
        return cls(doc["device"], doc["signature"], LinkCost(**doc["link"]),
                   tuple(StepCost(**s) for s in doc["steps"]), doc.get("wait_s", 0.0),
                   doc.get("link_busy_factor", 1.0))


COPY_SIZES = (64 * 2**10, 2**20, 8 * 2**20, 64 * 2**20)
CUDA_COPY_SIZES = COPY_SIZES + (256 * 2**20,)


def _fit(sizes: list[int], seconds: list[float], kind: str) -> LinkCost:
    """overhead + bytes / bandwidth, fitted to relative error: unweighted, the intercept (some microseconds)
    would answer to the noise of the largest copies (milliseconds) and swing from 0 to 9 us between runs."""
    y = np.array(seconds)
    slope, intercept = np.polyfit(np.array(sizes, dtype=float), y, 1, w=1.0 / np.maximum(np.abs(y), 1e-9))
    return LinkCost(kind, float(1.0 / slope), float(max(intercept, 0.0)))


class _MappedProbe:
    """A private mapping of a file of random bytes, whose pages can be faulted in (MADV_POPULATE_READ, as the
    mapped CPU runtime brings a weight in) and dropped again (MADV_DONTNEED)."""

    def __init__(self, nbytes: int):
        import mmap

        self.tmp = tempfile.TemporaryDirectory(prefix="flashmem-map-")
        path = os.path.join(self.tmp.name, "probe")
        with open(path, "wb") as f:
            f.write(os.urandom(nbytes))
        fd = os.open(path, os.O_RDONLY)
        try:
            self.mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.base = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.nbytes = nbytes

    def populate(self, n: int) -> None:
        from .store import _MADV_POPULATE_READ, _libc

        if _libc.madvise(self.base.data_ptr(), n, _MADV_POPULATE_READ) != 0:  # an older kernel: touch the pages
            self.base[:n:4096].sum()

    def drop(self) -> None:
        import mmap

        self.mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        del self.base
        self.mm.close()
        self.tmp.cleanup()


def measure_link(device: torch.device, repeats: int = 7, mapped: bool = False, graphed: bool = False,
                 dst: torch.Tensor | None = None) -> LinkCost:
    """Time copies of several sizes (64 KiB to 256 MiB on CUDA, queued back to back; to 64 MiB on the CPU)
    over the device's weight link and fit overhead + bytes / bandwidth to the medians. `mapped` (CPU): the
    link of the mapped runtime, pages of a file in the page cache faulted into a mapping, instead of `pread`
    copies. `graphed` (CUDA): the queue replayed from a CUDA graph, as a graphed call's copies run, so the
    overhead is the device's own per copy (an H200: 2.8 us) and not the host's launch rate (9.8 us, a
    `copy_` from Python each). `dst` (CUDA): a uint8 device tensor the copies land in, sizes up to its
    length, instead of a 256 MiB buffer of their own (the profile passes memory its budget already holds)."""
    if graphed and device.type != "cuda":
        raise FlashmemError(f"measure_link(graphed=True) times CUDA graph replays; {device} has none: "
                            "leave graphed False on the CPU")
    if device.type == "cuda":
        return _measure_cuda_link(device, repeats, graphed, dst)
    if mapped:
        return _measure_mapped_link(repeats)
    return _measure_pread_link(repeats)


def _fit_medians(sizes: tuple[int, ...], timer, repeats: int, kind: str) -> LinkCost:
    """`_fit` to the median of `repeats` passes per size (one more first, to warm up); `timer(n)` gives a
    function that times one pass of `n` bytes, in seconds."""
    seconds = []
    for n in sizes:
        once = timer(n)
        seconds.append(statistics.median([once() for _ in range(repeats + 1)][1:]))
    return _fit(list(sizes), seconds, kind)


def _measure_mapped_link(repeats: int) -> LinkCost:
    probe = _MappedProbe(max(COPY_SIZES))
    try:
        probe.populate(probe.nbytes)  # page cache warm, as for weights read every call

        def timer(n: int):
            def once() -> float:
                probe.drop()
                t0 = time.perf_counter()
                probe.populate(n)
                return time.perf_counter() - t0
            return once

        return _fit_medians(COPY_SIZES, timer, repeats, "pages of the page cache faulted into a mapping")
    finally:
        probe.close()


def _copy_sizes(cap: int) -> tuple[int, ...]:
    """CUDA_COPY_SIZES up to `cap` bytes, and `cap` itself: at least two sizes to fit a line to."""
    sizes = tuple(n for n in CUDA_COPY_SIZES if n < cap) + (cap,)
    return sizes if len(sizes) >= 2 else (max(cap // 2, 1), cap)


def _measure_cuda_link(device: torch.device, repeats: int, graphed: bool, dst: torch.Tensor | None) -> LinkCost:
    cap = max(CUDA_COPY_SIZES) if dst is None else min(dst.numel(), max(CUDA_COPY_SIZES))
    sizes = _copy_sizes(cap)
    src = torch.empty(cap, dtype=torch.uint8).pin_memory()
    if dst is None:
        dst = torch.empty(cap, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timer(n: int):
        # Copies back to back, as a ring's loads go: the per-copy overhead is what one adds in a queue,
        # not the latency of a copy timed alone.
        batch = max(4, min(64, max(CUDA_COPY_SIZES) // n))

        def queue() -> None:
            for _ in range(batch):
                dst[:n].copy_(src[:n], non_blocking=True)

        run = queue
        if graphed:
            graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
                queue()
            torch.cuda.current_stream(device).wait_stream(side)
            run = graph.replay

        def once() -> float:
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / batch
        return once

    return _fit_medians(sizes, timer, repeats, "pinned host to cuda" + (", graph replays" if graphed else ""))


def _measure_pread_link(repeats: int) -> LinkCost:
    with tempfile.TemporaryDirectory(prefix="flashmem-link-") as tmp:
        path = os.path.join(tmp, "probe")
        with open(path, "wb") as f:
            f.write(os.urandom(max(COPY_SIZES)))
        fd = os.open(path, os.O_RDONLY)
        try:
            buf = np.empty(max(COPY_SIZES), dtype=np.uint8)
            pread_into(fd, 0, memoryview(buf))  # page cache warm, as for weights read every call

            def timer(n: int):
                def once() -> float:
                    t0 = time.perf_counter()
                    pread_into(fd, 0, memoryview(buf)[:n])
                    return time.perf_counter() - t0
                return once

            return _fit_medians(COPY_SIZES, timer, repeats, "pread from page cache into RAM")
        finally:
            os.close(fd)


def measure_wait(device: torch.device, graphed: bool, steps: int = 64, repeats: int = 5,
                 scratch_bytes: int = 20 * 2**20) -> float:
    """CUDA: seconds a step of a profile takes longer than the same work in a plain call, from the profile's
    own mechanics: a step's timing events and its wait for the copy stream (every profiled step has both; in
    a call, only a step whose op waits for a load). Measured on a chain of small kernels, captured as a graph
    where the profile replays one (`graphed`), as the per-step difference of the two chains' times. Device
    memory: the chain's tensor, at most 4 MiB and what the allocator takes for it fitting `scratch_bytes`
    (`room_request_bytes`), given back when done."""
    from .run_cuda import timing_event

    compute, copy = torch.cuda.Stream(device), torch.cuda.Stream(device)
    torch.cuda.empty_cache()  # the calls' cached blocks go first: the room is the chain's alone
    held = [torch.zeros(room_request_bytes(4 * 2**20, scratch_bytes) // 4, device=device)]  # cleared at the end
    marks = [(timing_event(), timing_event()) for _ in range(steps)]
    fork, tail = torch.cuda.Event(), torch.cuda.Event()
    start, end = timing_event(), timing_event()

    def chain(profiled: bool) -> None:
        start.record(compute)
        for before, after in marks:
            if profiled:  # as CudaMover.issue and .wait do in serial (profiling) mode
                fork.record(compute)
                copy.wait_event(fork)
                tail.record(copy)
                before.record(compute)
                compute.wait_event(tail)
                after.record(compute)
            held[0].add_(1.0)
        if profiled:
            fork.record(copy)
            compute.wait_event(fork)
        end.record(compute)

    def per_step(profiled: bool) -> float:
        compute.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(compute):
            run = functools.partial(chain, profiled)
            if graphed:
                chain(profiled)  # warm
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=compute):
                    chain(profiled)
                run = graph.replay
            times = []
            for _ in range(repeats + 1):
                run()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / steps)
        torch.cuda.current_stream(device).wait_stream(compute)
        return statistics.median(times[1:])

    try:
        return max(0.0, per_step(True) - per_step(False))
    finally:
        held.clear()  # the tensor goes before the cache does
        torch.cuda.empty_cache()


def _capture(fn, device: torch.device) -> torch.cuda.CUDAGraph:
    """`fn` run once on a side stream (to warm it), then captured as a CUDA graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(device)
    return graph


def room_request_bytes(want_bytes: int, room_bytes: int) -> int:
    """The largest device request of at most `want_bytes` whose segment from PyTorch's caching allocator
    fits in `room_bytes`: the allocator serves a request up to 1 MiB from a 2 MiB segment, one up to 10 MiB
    from a 20 MiB segment, a larger one from a segment of its size rounded up to 2 MiB. (A room under 2 MiB
    gets a request of up to 1 MiB, whose 2 MiB segment is the smallest there is.)"""
    mib = 2**20
    want = max(min(want_bytes, room_bytes), 0)
    if want > 10 * mib:
        return want // (2 * mib) * (2 * mib)
    return want if room_bytes >= 20 * mib else min(want, mib)


CHAIN_S = 4e-3  # the kernel chain of measure_kernel_slowdown lasts about this long alone (its two events: <0.5%)


def measure_kernel_slowdown(device: torch.device, scratch_bytes: int = 128 * 2**20, repeats: int = 5) -> float:
    """CUDA: how much kernels slow while host-to-device copies run beside them, as a streamed call's do: a
    chain of in-place adds over a tensor of up to 64 MiB (bound by device memory, beyond an H200's L2 where
    the budget leaves room for it: the kind of kernel the copies' writes compete with) and copies back to
    back on a second stream, both in one CUDA graph, against the chain alone; timed by one event pair
    around the chain, inside the graph. The ratio of medians of `repeats` replays, at least 1.

    Steps cannot be timed this way one by one: a timing event beside a copy costs a graph 10-14 us where it
    costs 4 us alone (`benchmarks/slowdown_probe.py` on an H200), so per-step events beside copies measured
    ViT-L's matrix products 1.8x slower where, timed as above, they lose 0-1%. No products here: cuBLAS
    would keep a 32 MiB workspace for each stream they ran on, beyond the budget.

    Device memory: one request whose segment fits `scratch_bytes` (`room_request_bytes`; the profile passes
    what the budget leaves beside the arena, the activations' room between calls), given back to the device
    when done; the graphs allocate nothing."""
    torch.cuda.empty_cache()  # the calls' cached activation blocks go first: the room is the chain's alone
    try:
        return _kernel_slowdown(device, scratch_bytes, repeats)
    finally:
        torch.cuda.empty_cache()  # what the chain held goes back to the device


def _kernel_slowdown(device: torch.device, scratch_bytes: int, repeats: int) -> float:
    from .run_cuda import timing_event

    # one allocation (its segment fits the scratch) of up to 72 MiB: the chain's tensor and, a fifth of it
    # up to 8 MiB, the copies' destination (floors of 64 and 16 KiB, for a toy model's room)
    total = room_request_bytes(min(max(scratch_bytes * 5 // 8, 80 * 2**10), 72 * 2**20), scratch_bytes) // 2 * 2
    chunk = max(min(total // 5, 8 * 2**20) // 512 * 512, 16 * 2**10)
    buf = torch.zeros(max(total, chunk + 64 * 2**10), dtype=torch.uint8, device=device)
    big, dst = buf[chunk:].view(torch.float16), buf[:chunk]
    src = torch.empty(chunk, dtype=torch.uint8).pin_memory()
    copy_stream = torch.cuda.Stream(device)
    inner = (timing_event(), timing_event())
    one = _capture(lambda: big.add_(1.0), device)
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(10):
        one.replay()
    t1.record()
    t1.synchronize()
    count = max(8, int(CHAIN_S / max(t0.elapsed_time(t1) / 1e3 / 10, 1e-7)))
    # copies for 1.5x the chain at 60 GB/s and 3 us a copy: the chain runs beside copies from its first
    # kernel to its last
    copies = int(1.5 * CHAIN_S / (chunk / 60e9 + 3e-6)) + 2

    def run(beside: bool) -> None:
        if beside:
            copy_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(copy_stream):
                for _ in range(copies):
                    dst.copy_(src, non_blocking=True)
        inner[0].record()
        for _ in range(count):
            big.add_(1.0)
        inner[1].record()
        if beside:
            torch.cuda.current_stream(device).wait_stream(copy_stream)

    medians = []
    for beside in (False, True):
        graph = _capture(functools.partial(run, beside), device)
        times = []
        for _ in range(repeats + 1):
            graph.replay()
            torch.cuda.synchronize(device)
            times.append(inner[0].elapsed_time(inner[1]))
        medians.append(statistics.median(times[1:]))
    return max(1.0, medians[1] / medians[0])


class BackgroundTransfer:
    """CPU: keeps the weight link busy (as loads would) while the model computes, to measure the slowdown: a
    thread reads (or faults pages in) for as long as the block lasts.

    Each read is kept as (start, end, bytes) on the host's clock, so `bytes_between` says what the link moved
    in a window: the link's own rate, idle or beside compute (`link_busy_factor`), measured by the same reads.
    Not for CUDA: there a host thread's copies slow the per-step timing events far more than the ops, and
    they idle for the GIL while the calling thread launches kernels (`measure_kernel_slowdown` and
    `streamed_link_factor` measure CUDA; `benchmarks/slowdown_probe.py` shows both)."""

    def __init__(self, device: torch.device, nbytes: int = 32 * 2**20, mapped: bool = False):
        if device.type != "cpu":
            raise FlashmemError(f"BackgroundTransfer keeps a CPU's storage link busy; {device} is not a CPU: "
                                "on CUDA use measure_kernel_slowdown and streamed_link_factor")
        self.device = device
        self.nbytes = nbytes
        self.stop_flag = threading.Event()
        self.samples: list[tuple[float, float, int]] = []  # (start, end, bytes) per read, perf_counter seconds
        self.probe = _MappedProbe(nbytes) if mapped else None
        if self.probe is None:
            self.tmp = tempfile.TemporaryDirectory(prefix="flashmem-bg-")
            self.path = os.path.join(self.tmp.name, "bg")
            with open(self.path, "wb") as f:
                f.write(os.urandom(nbytes))
            self.buf = np.empty(nbytes, dtype=np.uint8)
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        clock, record = time.perf_counter, self.samples.append
        if self.probe is not None:  # what the mapped runtime's IO thread does: fault pages in, drop them
            while not self.stop_flag.is_set():
                t0 = clock()
                self.probe.populate(self.probe.nbytes)
                record((t0, clock(), self.nbytes))
                self.probe.drop()
        else:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while not self.stop_flag.is_set():
                    t0 = clock()
                    pread_into(fd, 0, memoryview(self.buf))
                    record((t0, clock(), self.nbytes))
            finally:
                os.close(fd)

    def bytes_between(self, begin: float, end: float) -> float:
        """Bytes moved in [begin, end] (perf_counter seconds), a copy that straddles an edge counted by the
        share of its time inside."""
        total = 0.0
        for t0, t1, n in list(self.samples):
            inside = min(end, t1) - max(begin, t0)
            if inside > 0 and t1 > t0:
                total += n * inside / (t1 - t0)
        return total

    def idle_rate(self, seconds: float) -> float:
        """Bytes per second over the next `seconds`, with nothing else on the link or the compute (the caller
        sleeps meanwhile)."""
        t0 = time.perf_counter()
        time.sleep(seconds)
        t1 = time.perf_counter()
        return self.bytes_between(t0, t1) / (t1 - t0)

    def __enter__(self):
        self.thread.start()
        time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.stop_flag.set()
        self.thread.join()
        if self.probe is not None:
            self.probe.close()
        else:
            self.tmp.cleanup()


def slowdowns_by_class(op_classes: list[str], quiet_s: list[float], busy_s: list[float]) -> dict[str, float]:
    """Per op class, the median ratio of step time with a transfer beside it to step time without."""
    ratios: dict[str, list[float]] = {}
    for cls, q, b in zip(op_classes, quiet_s, busy_s):
        if q > 0:
            ratios.setdefault(cls, []).append(b / q)
    return {cls: max(1.0, statistics.median(r)) for cls, r in ratios.items()}


def _refuse_host_budget(sm) -> None:
    if getattr(sm, "_host_budget_bytes", None) is not None:
        raise FlashmemError("profiling a model streamed under a host_budget is not supported yet: its loads "
                            "come from storage on threads the profile does not time; profile it without "
                            "host_budget")


LINK_FACTOR_FLOOR = 0.1  # a measured link_busy_factor below this is noise (or a broken link), not a rate
IDLE_WINDOW_S = 0.2  # the background transfer alone, before and after the busy pass: its idle rate


def link_busy_factor(idle_bytes_per_s: float, background_bytes: float, load_bytes: float, span_s: float,
                     compute_s: float) -> float:
    """The link's rate beside compute over its idle rate, from a busy profile pass: over `span_s` seconds of
    calls, of which `compute_s` are steps computing, the background transfer moved `background_bytes` and the
    profile's own loads `load_bytes`.

    The profile's loads move only in the waits between ops, where nothing computes; there they share the
    link with the background copies, which then move less, but not because of compute. So the waits are not
    compared with the compute at all: the link is taken to move its idle rate in total whenever nothing
    computes (the background's copies and the loads together), and what it moved beyond that in the span
    moved beside compute: busy rate = (background + loads - idle rate x (span - compute)) / compute. Clamped to
    [LINK_FACTOR_FLOOR, 1]; 1.0 where nothing computed."""
    if compute_s <= 0 or idle_bytes_per_s <= 0:
        return 1.0
    idle_s = max(span_s - compute_s, 0.0)
    busy_rate = (background_bytes + load_bytes - idle_bytes_per_s * idle_s) / compute_s
    return min(1.0, max(LINK_FACTOR_FLOOR, busy_rate / idle_bytes_per_s))


def copy_rate_factor(copies: list[tuple[float, float, int]], link: LinkCost) -> float:
    """The link's rate in a streamed call over its idle rate: the time `link` takes for the call's copies
    ((start s, end s, bytes) each, from timing events) over the time the copy lane was busy with them (the
    union of their intervals, so copies that overlap count once). Clamped to [LINK_FACTOR_FLOOR, 1]; 1.0
    without copies. Copies that ran while an op waited moved at the idle rate and pull it toward 1, so it
    is at least the rate beside compute alone: a bound made with it stays a bound."""
    if not copies:
        return 1.0
    busy, reach = 0.0, None
    for start, end, _ in sorted(copies):
        if reach is None or start > reach[1]:
            busy += reach[1] - reach[0] if reach else 0.0
            reach = [start, end]
        else:
            reach[1] = max(reach[1], end)
    busy += reach[1] - reach[0]
    if busy <= 0:
        return 1.0
    idle_s = sum(link.seconds(n) for _, _, n in copies)
    return min(1.0, max(LINK_FACTOR_FLOOR, idle_s / busy))


def streamed_link_factor(sm, args: tuple, kwargs: dict, link: LinkCost) -> float:
    """CUDA: `copy_rate_factor` of one call of `sm` as it normally runs, every copy timed (`measure_timeline`).
    A host thread's copies (as `BackgroundTransfer` made on CUDA before) measure no rate here: they wait for
    the GIL while the calling thread launches a call's kernels, so the link idled for the host's reasons (an H200's rate
    beside ViT-L's compute measured 0.59-0.88 of idle that way, where the call's own copies ran at 0.91-1.0)."""
    if not sm._executor.plan.loads:
        return 1.0
    measure_timeline(sm, args, kwargs)
    return copy_rate_factor(sm._executor.mover.copy_intervals(), link)


SCRATCH_MIN_BYTES = 2**20  # a ring smaller than this fits the link too poorly: the probe takes its own buffer


def _scratch(sm) -> torch.Tensor | None:
    """CUDA, between calls: the arena's ring, device bytes the budget already holds, for the link's probe
    copies to land in (every call loads what it streams there again before use, as
    `CudaMover.copies_alone_s` relies on). None where the plan streams less than SCRATCH_MIN_BYTES: the
    probe then allocates its own 256 MiB, beside the budget (the activations' room may hold a graph's
    pool)."""
    plan = sm._executor.plan
    ring = sm._arena[plan.resident_bytes:plan.arena_bytes]
    return ring if ring.numel() >= SCRATCH_MIN_BYTES else None


def profile(sm, args: tuple, kwargs: dict, calls: int = 3) -> CostModel:
    """Measure `sm`'s per-step compute for this input, its slowdown beside a transfer (on the CPU per op
    class, from a pass beside background reads; on CUDA `measure_kernel_slowdown`), the link, and the link's
    rate beside the compute (`link_busy_factor`: on CUDA from one call's own copies, `streamed_link_factor`;
    on the CPU from the busy pass's background reads, whose IO thread competes with compute as the CPU
    mover's does). Loads move between ops during profiling (never beside compute), so step times are
    compute only."""
    _refuse_host_budget(sm)
    sm(*args, **kwargs)  # plans for this input signature if needed
    executor = sm._executor
    executor.profiling, executor.mover.serial = True, True
    spans: list[tuple[float, float, float]] = []  # busy pass, per call: (host start, host end, compute seconds)
    try:
        def per_step(timed: bool = False) -> list[float]:
            runs = []
            for _ in range(calls):
                t0 = time.perf_counter()
                sm(*args, **kwargs)
                runs.append(executor.mover.step_seconds())  # (waits for the call's end on CUDA)
                if timed:
                    spans.append((t0, time.perf_counter(), sum(runs[-1])))
            return [statistics.median(col) for col in zip(*runs)]

        quiet = per_step()
        mapped = bool(getattr(sm, "_mapped", False))  # on the CPU: pages faulted into mappings, not copies
        cuda = sm.device.type == "cuda"
        if not cuda:  # (CUDA: the ops' slowdown comes from kernel chains, the link's rate from a call's copies)
            with BackgroundTransfer(sm.device, mapped=mapped) as bg:
                idle_before = bg.idle_rate(IDLE_WINDOW_S)
                busy = per_step(timed=True)
                idle = (idle_before + bg.idle_rate(IDLE_WINDOW_S)) / 2
                moved = sum(bg.bytes_between(a, b) for a, b, _ in spans)
    finally:
        executor.profiling, executor.mover.serial = False, False
    program = sm.program
    graphed = sm._graphs is not None and program.signature not in sm._graphs.refused  # the profile replayed a graph
    scratch = _scratch(sm) if cuda else None
    link = measure_link(sm.device, mapped=mapped, graphed=graphed, dst=scratch)
    if cuda:
        # A call's copies are timed on the device, between events: their reference is the device's own
        # per-copy overhead, not the host's launch rate an eager call's queue may add.
        device_link = link if graphed else measure_link(sm.device, graphed=True, dst=scratch)
        del scratch
        factor = streamed_link_factor(sm, args, kwargs, device_link)
    else:
        factor = link_busy_factor(idle, moved, calls * executor.plan.streamed_bytes,
                                  sum(b - a for a, b, _ in spans), sum(c for _, _, c in spans))
    # Every profiled step carries the profile's own timing events and copy-stream wait; a call's step only
    # where its op waits for a load. They come off each step here, and `simulate` adds them back there.
    plan = executor.plan
    room = max(plan.budget_bytes - plan.arena_bytes - plan.fixed_bytes, 0)  # the activations' room
    wait = measure_wait(sm.device, graphed, scratch_bytes=room) if cuda else 0.0
    quiet = [max(q - wait, 0.0) for q in quiet]
    classes = [type(sm.model.get_submodule(op.module)).__name__ for op in program.ops]
    if cuda:  # one device-wide figure: per-step events beside copies would time the events (see there)
        slow = dict.fromkeys(classes, measure_kernel_slowdown(sm.device, room))
    else:
        slow = slowdowns_by_class(classes, quiet, [max(b - wait, 0.0) for b in busy])
    steps = tuple(StepCost(cls, q, slow.get(cls, 1.0)) for cls, q in zip(classes, quiet))
    return CostModel(str(sm.device), program.signature, link, steps, wait, factor)


def measure_timeline(sm, args: tuple, kwargs: dict) -> "Timeline":
    """Run one call of `sm` with every op and load timed, as it normally runs (loads beside compute)."""
    _refuse_host_budget(sm)
    executor = sm._executor
    executor.profiling = True
    executor.mover.record_loads = True
    try:
        sm(*args, **kwargs)
        return executor.mover.timeline()
    finally:
        executor.profiling = False
        executor.mover.record_loads = False


@dataclass(frozen=True)
class Timeline:
    """What a plan does over one call, as predicted (or measured): seconds from the call's start."""
    step_start_s: tuple[float, ...]
    step_end_s: tuple[float, ...]
    load_start_s: tuple[float, ...]
    load_end_s: tuple[float, ...]

    @property
    def total_s(self) -> float:
        return self.step_end_s[-1] if self.step_end_s else 0.0


def simulate(plan, costs: CostModel) -> Timeline:
    """Predict a call of `plan`: one FIFO link that starts a load as soon as the load that last held its
    bytes is released; compute that starts a step once the step before it ended and its loads arrived.
    A step is its op's wait for its loads, then `wait_s` where it waited for any (CUDA: the dependency on
    the copy stream), then its compute, slower (by the step's slowdown) for the part of its compute time the
    link is busy. The link moves a load (its per-copy overhead and bytes, `link.seconds`) at its idle rate
    while nothing computes and at `link_busy_factor` times that while an op computes: for the whole
    step's compute, its stretch included."""
    loads = plan.loads
    holder = previous_holders(loads, plan.alignment)
    n = plan.n_ops
    needs: list[list[int]] = [[] for _ in range(n)]  # per step, the loads it uses first
    for j, load in enumerate(loads):
        needs[load.first_use].append(j)
    # On CUDA, loads issued at one step that follow each other in the arena (and in the pinned buffer, which
    # holds weights in index order) move as one copy: one per-copy overhead for the group.
    merged = copy_merges(plan)
    # A copy joins the queue once every load it carries may: group_end[j] is the last load of j's copy.
    group_end = list(range(len(loads)))
    for j in range(len(loads) - 2, -1, -1):
        if merged[j + 1]:
            group_end[j] = group_end[j + 1]
    link = _Link([costs.link.seconds(l.nbytes, 0 if merged[j] else 1) for j, l in enumerate(loads)])
    step_start, step_end = [0.0] * n, [0.0] * n
    busy_rate = costs.link_busy_factor
    for i in range(n):
        # Loads whose bytes are released by now (their holder's last use was before this step) join the
        # link's queue; the first to join at a step is released at the step's start (the end of op i - 1, or
        # the call's start), so the link, simulated up to now, starts it now if it is free.
        while link.queued < len(loads):
            group = range(link.queued, group_end[link.queued] + 1)
            if any(holder[j] is not None and loads[holder[j]].last_use >= i for j in group):
                break
            for _ in group:
                link.enqueue()
        waited = [j for j in needs[i] if j < link.queued]
        if waited:
            link.finish(max(waited))  # the op waits, nothing computes: the link at its idle rate
        step_start[i] = link.now
        if needs[i]:
            link.advance(costs.wait_s, 1.0)
        step = costs.steps[i]
        busy = link.advance(step.compute_s, busy_rate)
        link.advance((step.slowdown - 1.0) * busy, busy_rate)
        step_end[i] = link.now
    return Timeline(tuple(step_start), tuple(step_end), tuple(link.start), tuple(link.end))


def copy_merges(plan) -> list[bool]:
    """Per load, whether it moves in one copy with the load before it (CUDA): loads issued at one step
    that follow each other in the arena and in weight order (the pinned buffer holds weights in index
    order), with only alignment padding between them, as `CudaMover` merges them."""
    loads = plan.loads
    merged = [False] * len(loads)
    if plan.device.startswith("cuda"):
        for j in range(1, len(loads)):
            a, b = loads[j - 1], loads[j]
            merged[j] = a.start_step == b.start_step and follows(a, b, plan.alignment)
    return merged


class _Link:
    """`simulate`'s FIFO link: the queue of loads, each with its work in seconds at the idle rate, and the
    clock, which advances with it."""

    def __init__(self, work_s: list[float]):
        self.left = list(work_s)  # per load, idle-rate seconds still to move
        self.start, self.end = [0.0] * len(work_s), [0.0] * len(work_s)
        self.queued = 0  # loads [0, queued) have joined the queue
        self.head = 0  # the load moving now (the first not finished)
        self.now = 0.0

    def enqueue(self) -> None:
        if self.head == self.queued:
            self.start[self.head] = self.now
        self.queued += 1

    def _done(self) -> None:
        self.end[self.head] = self.now
        self.head += 1
        if self.head < self.queued:
            self.start[self.head] = self.now

    def finish(self, j: int) -> None:
        """Move the queue at the idle rate until load j has arrived."""
        while self.head <= j:
            self.now += self.left[self.head]
            self._done()

    def advance(self, seconds: float, rate: float) -> float:
        """Move the clock by `seconds`, the queue at `rate` times the idle rate; the seconds it was busy."""
        until, busy = self.now + seconds, 0.0
        while self.head < self.queued and seconds > 0:
            need = self.left[self.head] / rate
            if self.now + need <= until:
                self.now += need
                busy += need
                self._done()
            else:
                self.left[self.head] -= (until - self.now) * rate
                busy += until - self.now
                break
        self.now = until
        return busy
