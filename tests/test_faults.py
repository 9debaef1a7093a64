"""Injected faults on the CPU, with weights copied into the arena ("copy") and with mapped files ("map"):
a storage read that fails or stalls in the middle of a call, an out-of-memory error from the device, an
ordinary exception in the model's own forward, and an exception while a read is in flight. Each faulty
call ends in the caller within a bounded time (it runs in a daemon thread joined with a 60 s timeout),
the StreamedModel releases what the call held (with mapped files no page the failed call brought in
stays held; with copies the IO thread is idle), no thread is left behind, and the next call on the same
StreamedModel is bit-identical (torch.equal) to the model with every weight resident."""
from __future__ import annotations

import errno
import gc
import threading
import time

import pytest
import torch
from torch import nn

import flashmem
from flashmem.store import PAGE_BYTES

from conftest import close_all, hf_model, out_of, resident, save_folder

READS = ["copy", "map"]
WIDTH = 256  # every weight of Stack is at least 16 KiB (no bias): no two weights share a page
BUDGET = 700_000  # of Stack's 1.59 MB: the head stays resident, the six layers stream through a ring
NO_HANG_S = 60
STALL_S = 0.2  # an injected stall of a read


# -- models ------------------------------------------------------------------------------------------
class Trap(nn.Module):
    """A module without weights (so not an op of the plan) that raises `error` once when armed."""

    def __init__(self):
        super().__init__()
        self.error: BaseException | None = None

    def forward(self, x):
        error, self.error = self.error, None
        if error is not None:
            raise error
        return x


class Stack(nn.Module):
    """Linear(256, 256) layers without bias and a head; a weightless trap after the second layer (a device
    error between ops), and the model's own forward raises `error` once when armed, after the fifth."""

    def __init__(self, depth: int = 6, width: int = WIDTH):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width, bias=False) for _ in range(depth)])
        self.trap = Trap()
        self.head = nn.Linear(width, 16, bias=False)
        self.error: BaseException | None = None

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x))
            if i == 1:
                x = self.trap(x)
            if i == 4 and self.error is not None:
                error, self.error = self.error, None
                raise error
        return self.head(x)


def make_stack(seed: int = 0, width: int = WIDTH) -> Stack:
    torch.manual_seed(seed)
    return Stack(width=width).eval()


def oom() -> BaseException:
    """What PyTorch raises when the device's allocator runs out (torch.cuda.OutOfMemoryError is the same
    class; both exist on CPU builds)."""
    cls = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return cls("CUDA out of memory. Tried to allocate 20.00 MiB (injected)")


# -- set-up --------------------------------------------------------------------------------------------
class Case:
    """A StreamedModel with its input and the resident reference."""

    def __init__(self, sm, x, ref, model):
        self.sm, self.x, self.ref, self.model = sm, x, ref, model


@pytest.fixture
def open_case(tmp_path):
    """open_case(kind, cpu_reads) -> Case; "stack" through flashmem.stream, "llama" through a saved folder and
    from_pretrained. Closes them at the end of the test."""
    opened = []

    def open_(kind: str, cpu_reads: str) -> Case:
        if kind == "stack":
            x = torch.randn(8, WIDTH, generator=torch.Generator().manual_seed(1))
            ref = resident(make_stack(), x)
            model = make_stack()
            sm = flashmem.stream(model, BUDGET, example_inputs=(x,), cpu_reads=cpu_reads)
        else:
            x = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
            ref = resident(hf_model(kind), x)
            folder = save_folder(hf_model(kind), tmp_path / f"{kind}-{cpu_reads}")
            sm = flashmem.from_pretrained(folder, "200KiB", example_inputs=(x,), cpu_reads=cpu_reads)
            model = sm.model
        opened.append(sm)
        assert sm.cpu_reads == cpu_reads
        assert sm.plan.loads, "nothing streams at this budget"
        return Case(sm, x, ref, model)

    yield open_
    close_all(opened)


def call_in_thread(sm, x) -> dict:
    """Call sm(x) in a daemon thread; assert it ends within NO_HANG_S; {"out": ...} or {"error": ...}."""
    result: dict = {}

    def call():
        try:
            with torch.no_grad():
                result["out"] = out_of(sm(x))
        except BaseException as err:  # noqa: BLE001 - recorded for the assertions
            result["error"] = err

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(NO_HANG_S)
    assert not thread.is_alive(), "the call hung"
    return result


def assert_released(sm, cpu_reads: str) -> None:
    """What the last call held is released: with mapped files only the residents' pages are held; the IO
    thread has finished (or given up on) every load."""
    mover = sm._executor.mover
    assert not mover.busy, "the IO thread still works on the failed call"
    if cpu_reads == "map":
        files = sm._files
        residents = sum(files.span_bytes(r.weight) for r in sm.plan.residents)
        held = files.held_pages() * PAGE_BYTES
        assert held <= residents, f"{held} B of pages held after the call, the residents span {residents} B"


def assert_exact_next(case: Case, calls: int = 2) -> None:
    for _ in range(calls):
        result = call_in_thread(case.sm, case.x)
        assert "error" not in result, f"the call after the fault failed: {result.get('error')!r}"
        assert torch.equal(result["out"], case.ref)


def inject_load(monkeypatch, sm, at: int, action) -> dict:
    """Patch the mover's class so that its load of plan index `at` first runs `action(j)` (once)."""
    cls = type(sm._executor.mover)
    original = cls._load
    state = {"armed": True, "hits": 0}

    def _load(self, j):
        if state["armed"] and j == at:
            state["armed"] = False
            state["hits"] += 1
            action(j)
        return original(self, j)

    monkeypatch.setattr(cls, "_load", _load)
    return state


def load_index(sm, where: str) -> int:
    n = len(sm.plan.loads)
    return {"first": 0, "middle": n // 2, "last": n - 1}[where]


# -- 1. a storage read fails -------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("kind", ["stack", "llama"])
@pytest.mark.parametrize("cpu_reads", READS)
def test_failed_read_is_a_flashmem_error_then_exact(open_case, monkeypatch, cpu_reads, kind, where):
    """A load whose read raises OSError in the IO thread: the caller gets a FlashmemError naming the
    storage read, the call's holds are released, and the next call is exact."""
    case = open_case(kind, cpu_reads)
    sm = case.sm

    def fail(j):
        raise OSError(errno.EIO, f"Input/output error (injected, load {j})")

    state = inject_load(monkeypatch, sm, load_index(sm, where), fail)
    result = call_in_thread(sm, case.x)
    assert state["hits"] == 1
    err = result.get("error")
    assert isinstance(err, flashmem.FlashmemError), f"got {err!r}"
    assert "storage" in str(err) and "Input/output error" in str(err)
    assert isinstance(err.__cause__, OSError)
    assert_released(sm, cpu_reads)
    assert_exact_next(case)


@pytest.mark.parametrize("cpu_reads", ["copy", "map"])
def test_failed_read_in_the_store_releases_its_pages(open_case, monkeypatch, cpu_reads):
    """The read fails below the mover, where the kernel reports it (pread raises EIO; MADV_POPULATE_READ
    returns EIO): a FlashmemError, the next call is exact, and no page of the failed load stays held."""
    case = open_case("stack", cpu_reads)
    sm = case.sm
    at = load_index(sm, "middle")
    weight = sm.plan.loads[at].weight
    state = {"armed": True}
    if cpu_reads == "copy":
        store = sm._store
        original = store.read_into_view

        def read_into_view(w, dst):
            if state["armed"] and w == weight and threading.current_thread().name == "flashmem-io":
                state["armed"] = False
                raise OSError(errno.EIO, "Input/output error (injected pread)")
            return original(w, dst)

        monkeypatch.setattr(store, "read_into_view", read_into_view)
    else:
        files = sm._files
        original = files._madvise
        first = files.spans[weight][0]

        def _madvise(path, a, b, advice):
            if state["armed"] and advice == 22 and a == first:  # MADV_POPULATE_READ of the chosen weight
                state["armed"] = False
                return errno.EIO
            return original(path, a, b, advice)

        monkeypatch.setattr(files, "_madvise", _madvise)
    result = call_in_thread(sm, case.x)
    assert not state["armed"], "the injected read did not happen"
    err = result.get("error")
    assert isinstance(err, flashmem.FlashmemError), f"got {err!r}"
    assert "storage" in str(err) and "Input/output error" in str(err)
    held_after_failure = sm._files.held_pages() * PAGE_BYTES if cpu_reads == "map" else 0
    assert_exact_next(case)  # the output stays exact even where pages leak
    if cpu_reads == "map":
        residents = sum(sm._files.span_bytes(r.weight) for r in sm.plan.residents)
        assert held_after_failure <= residents, (f"{held_after_failure} B of pages held after the failed call, "
                                                 f"the residents span {residents} B")
    assert_released(sm, cpu_reads)


# -- 2. a storage read stalls ------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("kind", ["stack", "llama"])
@pytest.mark.parametrize("cpu_reads", READS)
def test_stalled_read_completes_exactly(open_case, monkeypatch, cpu_reads, kind, where):
    """A load that stalls (STALL_S) before its read: compute waits for it and the call is exact (a stall never
    changes the output), as is the next."""
    case = open_case(kind, cpu_reads)
    sm = case.sm
    state = inject_load(monkeypatch, sm, load_index(sm, where), lambda j: time.sleep(STALL_S))
    result = call_in_thread(sm, case.x)
    assert state["hits"] == 1
    assert "error" not in result, f"a stalled read failed the call: {result.get('error')!r}"
    assert torch.equal(result["out"], case.ref)
    assert_released(sm, cpu_reads)
    assert_exact_next(case)


# -- 3. the device runs out of memory ------------------------------------------------------------------
@pytest.mark.parametrize("cpu_reads", READS)
def test_out_of_memory_between_ops_then_exact(open_case, cpu_reads):
    """torch.OutOfMemoryError raised by a weightless module between two streamed ops: the caller gets it
    unchanged, the call's holds are released, and the next call is exact."""
    case = open_case("stack", cpu_reads)
    sm = case.sm
    error = oom()
    case.model.trap.error = error
    result = call_in_thread(sm, case.x)
    assert result.get("error") is error
    assert_released(sm, cpu_reads)
    assert_exact_next(case)


def arm_in_op(module: nn.Module, error: BaseException) -> None:
    """Make `module` raise `error` once, after flashmem's own pre-hook has put its weights in place (as an
    allocation inside its kernels would)."""
    handle = None

    def hook(_module, _args):
        handle.remove()
        raise error

    handle = module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("kind", ["stack", "llama"])
@pytest.mark.parametrize("cpu_reads", READS)
def test_out_of_memory_inside_a_streamed_op_then_exact(open_case, cpu_reads, kind):
    """torch.OutOfMemoryError raised inside an op whose weight streams, with its weight in place: the caller
    gets it, the call's holds are released (the op's included), and the next call is exact."""
    case = open_case(kind, cpu_reads)
    sm = case.sm
    load = sm.plan.loads[load_index(sm, "middle")]
    module = sm.model.get_submodule(sm.program.ops[load.first_use].module)
    error = oom()
    arm_in_op(module, error)
    result = call_in_thread(sm, case.x)
    assert result.get("error") is error
    assert_released(sm, cpu_reads)
    assert_exact_next(case)


# -- 4. an ordinary exception in the model's forward ---------------------------------------------------
@pytest.mark.parametrize("cpu_reads", READS)
def test_value_error_in_the_models_forward_then_exact(open_case, cpu_reads):
    """ValueError raised by the model's own forward between ops, with loads still ahead: the caller gets
    it, the call's holds are released, and the next call is exact."""
    case = open_case("stack", cpu_reads)
    sm = case.sm
    error = ValueError("bad value (injected)")
    case.model.error = error
    result = call_in_thread(sm, case.x)
    assert result.get("error") is error
    assert_released(sm, cpu_reads)
    assert_exact_next(case)


@pytest.mark.parametrize("cpu_reads", READS)
def test_error_while_a_read_is_in_flight_then_exact(open_case, monkeypatch, cpu_reads):
    """ValueError raised by the model while the IO thread is stalled inside a later load: the call ends
    once that read does, what the read brought in is released, and the next call is exact."""
    case = open_case("stack", cpu_reads)
    sm = case.sm
    late = len(sm.plan.loads) - 1  # the head's load, needed after the model raises

    state = inject_load(monkeypatch, sm, late, lambda j: time.sleep(STALL_S))
    error = ValueError("bad value (injected)")
    case.model.error = error
    result = call_in_thread(sm, case.x)
    assert result.get("error") is error
    assert state["hits"] <= 1
    assert_released(sm, cpu_reads)
    assert_exact_next(case)


# -- 5./6. all faults on one StreamedModel: holds and threads ---------------------------------------------
@pytest.mark.parametrize("cpu_reads", READS)
def test_faults_in_a_row_leave_no_thread_or_hold_behind(open_case, monkeypatch, cpu_reads):
    """Every fault above, one after the other on one StreamedModel, each followed by an exact call: no
    page stays held beyond the residents, and no thread is left but the IO thread."""
    gc.collect()
    before = threading.active_count()
    case = open_case("stack", cpu_reads)
    sm = case.sm
    mover_cls = type(sm._executor.mover)
    original = mover_cls._load
    at = load_index(sm, "middle")
    faults = []

    def read_fault(j):
        raise OSError(errno.EIO, "Input/output error (injected)")

    for name, arm, expect in [
        ("failed read", lambda: inject_load(monkeypatch, sm, at, read_fault), flashmem.FlashmemError),
        ("stalled read", lambda: inject_load(monkeypatch, sm, at, lambda j: time.sleep(STALL_S)), None),
        ("oom between ops", lambda: setattr(case.model.trap, "error", oom()), torch.OutOfMemoryError),
        ("oom in an op", lambda: arm_in_op(case.model.layers[3], oom()), torch.OutOfMemoryError),
        ("value error", lambda: setattr(case.model, "error", ValueError("injected")), ValueError),
    ]:
        monkeypatch.setattr(mover_cls, "_load", original)
        arm()
        result = call_in_thread(sm, case.x)
        if expect is None:
            assert "error" not in result, f"{name}: {result.get('error')!r}"
            assert torch.equal(result["out"], case.ref), name
        else:
            assert isinstance(result.get("error"), expect), f"{name}: got {result.get('error')!r}"
        faults.append(name)
        assert_released(sm, cpu_reads)
        assert_exact_next(case, calls=1)
        assert_released(sm, cpu_reads)
    assert len(faults) == 5
    gc.collect()
    assert threading.active_count() <= before + 1, [t.name for t in threading.enumerate()]
    assert sm._executor.mover.thread.is_alive()
