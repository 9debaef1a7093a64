"""Units and small pieces: budget parsing and printing, the error classes, input signatures, weight
collection (tied weights, nested containers) and safetensors headers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import flashmem
from flashmem.errors import (BadBudget, BadModelFolder, BudgetTooSmall, DeviceUnavailable, FlashmemError, PlanInvalid,
                             TraceMismatch)
from flashmem.files import read_header
from flashmem.trace import collect_weights, input_signature
from flashmem.units import align_up, fmt_bytes, parse_bytes

from conftest import Nested, make_input, make_model, resident


# -- parse_bytes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("512MiB", 512 * 2**20),
    ("1.5GiB", 3 * 2**29),
    ("2GB", 2 * 10**9),
    ("2gb", 2 * 10**9),
    ("1KB", 1000),
    ("1 KiB", 1024),
    ("3k", 3 * 1024),
    ("4M", 4 * 2**20),
    ("1TB", 10**12),
    ("2TiB", 2 * 2**40),
    ("100", 100),
    ("100B", 100),
    ("  7 MiB  ", 7 * 2**20),
    ("1e3", 1000),
    (".5KiB", 512),
    (4096, 4096),
    (2500.0, 2500),
    (1, 1),
])
def test_parse_bytes_units(text, expected):
    assert parse_bytes(text) == expected
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize("bad", ["", "abc", "12 parsecs", "5 MiBs", "MiB", "1.2.3GB", "-5", "-1GiB", "0",
                                 "0MiB", 0, -1, 0.4, True, False, None, [1024], {"a": 1}])
def test_parse_bytes_rejects(bad):
    with pytest.raises(BadBudget) as info:
        parse_bytes(bad)
    assert isinstance(info.value, ValueError) and isinstance(info.value, FlashmemError)
    assert str(info.value)


def test_bad_budget_messages_say_what_to_write():
    with pytest.raises(BadBudget, match=r"does not parse.*512MiB.*1\.5GiB.*2GB"):
        parse_bytes("twelve")
    with pytest.raises(BadBudget, match="must be positive"):
        parse_bytes("0GiB")
    with pytest.raises(BadBudget, match="byte count or a string"):
        parse_bytes(None)


def test_bad_budget_from_stream_leaves_the_model_alone():
    model = make_model("mlp")
    x = make_input("mlp")
    ref = resident(model, x)
    for bad in ("lots", "-1MiB", 0):
        with pytest.raises(BadBudget):
            flashmem.stream(model, bad, example_inputs=(x,))
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(resident(model, x), ref)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (17, "17 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (3 * 1024, "3.00 KiB"),
    (512 * 2**20, "512.00 MiB"), (int(1.21 * 2**30), "1.21 GiB"), (5 * 2**30, "5.00 GiB"),
])
def test_fmt_bytes(n, text):
    assert fmt_bytes(n) == text


def test_align_up():
    assert [align_up(n, 64) for n in (0, 1, 63, 64, 65, 128)] == [0, 64, 64, 64, 128, 128]


# -- errors -----------------------------------------------------------------------------------------------
def test_error_hierarchy_is_exported():
    for cls in (BadBudget, BadModelFolder, BudgetTooSmall, DeviceUnavailable, PlanInvalid, TraceMismatch):
        assert issubclass(cls, FlashmemError)
        assert getattr(flashmem, cls.__name__) is cls
    err = BudgetTooSmall("msg", op="layer", need_bytes=10, budget_bytes=5)
    assert (err.op, err.need_bytes, err.budget_bytes, str(err)) == ("layer", 10, 5, "msg")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_cuda_without_a_gpu_is_device_unavailable():
    model = make_model("mlp")
    with pytest.raises(DeviceUnavailable, match="cpu"):
        flashmem.stream(model, "1MiB", device="cuda", example_inputs=(make_input("mlp"),))


def test_unknown_device_is_refused():
    with pytest.raises(FlashmemError, match="not supported"):
        flashmem.stream(make_model("mlp"), "1MiB", device="mps", example_inputs=(make_input("mlp"),))


def test_stream_needs_an_example_input():
    with pytest.raises(FlashmemError, match="example_inputs"):
        flashmem.stream(make_model("mlp"), "1MiB")


def test_stream_refuses_a_model_without_parameters():
    with pytest.raises(FlashmemError, match="no parameters"):
        flashmem.stream(nn.ReLU(), "1MiB", example_inputs=(torch.ones(2),))


# -- trace pieces -----------------------------------------------------------------------------------------
def test_input_signature_keys_shapes_and_dtypes():
    a = torch.zeros(2, 3, dtype=torch.long)
    assert input_signature((a,), {}) == input_signature((torch.ones(2, 3, dtype=torch.long),), {})
    assert input_signature((a,), {}) != input_signature((torch.zeros(2, 4, dtype=torch.long),), {})
    assert input_signature((a,), {}) != input_signature((a.int(),), {})
    assert input_signature((a,), {}) != input_signature((), {"input_ids": a})
    assert input_signature((a,), {"flag": True}) != input_signature((a,), {"flag": False})


def test_collect_weights_ties_and_nesting():
    model = Nested()
    mw, tensors = collect_weights(model, alignment=64)
    names = [w.name for w in mw.weights]
    assert len(names) == len(set(names)) == len(tensors)
    # tied parameters appear once, with one slot per module holding them
    shared = next(w for w in mw.weights if w.name == "shared.weight")
    assert set(shared.slots) == {("shared", "weight"), ("tied", "weight")}
    assert "tied.weight" not in names
    assert len(mw.weights) == len({id(p) for p in model.parameters()})
    for w, t in zip(mw.weights, tensors):
        assert w.nbytes == t.numel() * t.element_size() and w.shape == tuple(t.shape)
    # a container with its own weight: the most bytes needed at once are a Block's own scale plus its
    # biggest child's weight and bias (each rounded to the alignment)
    assert mw.max_working_bytes == align_up(32 * 4, 64) + align_up(64 * 32 * 4, 64) + align_up(64 * 4, 64)
    assert mw.max_working_module.startswith("blocks.")
    assert set(mw.owned) >= {"inp", "shared", "tied", "out", "blocks.0", "blocks.0.lin1"}


def test_buffers_are_weights():
    model = make_model("cnn")
    mw, _ = collect_weights(model, alignment=64)
    buffers = {w.name for w in mw.weights if w.is_buffer}
    assert {"bn1.running_mean", "bn1.running_var", "bn2.running_mean"} <= buffers
    assert "bn1.weight" not in buffers


# -- safetensors headers ----------------------------------------------------------------------------------
def test_read_header_locates_every_tensor(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(10, dtype=torch.float32), "b": torch.ones(3, 4, dtype=torch.float16),
               "c": torch.zeros(5, dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    assert set(header) == set(tensors)
    raw = path.read_bytes()
    for name, t in tensors.items():
        loc = header[name]
        assert (loc.dtype, loc.shape, loc.nbytes) == (t.dtype, tuple(t.shape), t.numel() * t.element_size())
        got = torch.frombuffer(bytearray(raw[loc.offset_bytes:loc.offset_bytes + loc.nbytes]), dtype=t.dtype)
        assert torch.equal(got.view(t.shape), t)


def test_read_header_rejects_truncated_and_garbage(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32)}, str(path))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(BadModelFolder, match="truncated"):
        read_header(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(BadModelFolder, match="too short"):
        read_header(tmp_path / "tiny.safetensors")
    (tmp_path / "junk.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 8)
    with pytest.raises(BadModelFolder, match="not valid JSON"):
        read_header(tmp_path / "junk.safetensors")


def test_cuda_call_cap_arithmetic(monkeypatch):
    """The CUDA mover caps the allocator for a call at what it cannot give back (allocated blocks and the
    free pieces of their segments) plus the budget's room beside the arena, gives cached free segments back
    first where they would overrun that, and restores the caller's fraction after the call (the torch.cuda
    calls are faked here; the CUDA suite runs the real ones)."""
    from types import SimpleNamespace

    from flashmem.run_cuda import CudaMover

    GiB = 2**30
    state = {"fraction": 0.75, "emptied": 0, "reserved": 5 * GiB}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=100 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda d: {"allocated_bytes.all.current": 3 * GiB,
                                                               "inactive_split_bytes.all.current": GiB // 4})
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: state["reserved"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: state.update(emptied=state["emptied"] + 1,
                                                                      reserved=3 * GiB + GiB // 4))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: state["fraction"])
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: state.update(fraction=f))
    mover = CudaMover.__new__(CudaMover)
    mover.device = torch.device("cuda", 0)
    mover.plan = SimpleNamespace(budget_bytes=2 * GiB, arena_bytes=GiB + GiB // 2, fixed_bytes=0)
    mover._cap()
    # 3.25 GiB that cannot be given back + 0.5 GiB of room; the 5 GiB reserved were over it: emptied first
    assert state["fraction"] == pytest.approx(3.75 / 100) and state["emptied"] == 1
    mover._uncap()
    assert state["fraction"] == 0.75
    mover.plan = SimpleNamespace(budget_bytes=4 * GiB, arena_bytes=GiB, fixed_bytes=0)
    mover._cap()
    assert state["fraction"] == pytest.approx(6.25 / 100) and state["emptied"] == 1  # under the cap: kept
    mover._uncap()
    mover._uncap()  # a second restore changes nothing
    assert state["fraction"] == 0.75


def test_staging_ring_reuses_bytes_only_after_the_copies_that_held_them():
    """Under a host budget, loads pass through a pinned ring first in, first out (`with_staging`). For many
    random plans: every load lies inside the ring, and for every earlier load whose ring bytes it reuses,
    it waits for that load's copy or a later one's (copies finish in order on one stream); the checker
    accepts the layout, and rejects it once one wait is dropped or one load is moved onto another's bytes."""
    import dataclasses
    import random

    from flashmem.check import staging_problems
    from flashmem.plan import Load, Plan, with_staging

    A = 512
    rng = random.Random(0)
    rejected = 0
    for _ in range(300):
        ring = rng.choice([4, 7, 16]) * A
        sizes = [rng.randint(1, ring) for _ in range(rng.randint(1, 40))]
        loads = tuple(Load(weight=j, start_step=j // 2, first_use=j, last_use=j, release_op=j, offset_bytes=0,
                           nbytes=n) for j, n in enumerate(sizes))
        plan = Plan(device="cuda:0", signature="s", budget_bytes=ring, arena_bytes=ring, resident_bytes=0,
                    activation_bytes=0, fixed_bytes=0, alignment=A, residents=(), loads=loads,
                    n_ops=len(loads), status="simple")
        st = with_staging(plan, ring, A).staging
        span = [(st.ring_offsets_bytes[j], st.ring_offsets_bytes[j] + align_up(n, A)) for j, n in enumerate(sizes)]
        for p, j in enumerate(st.order):
            assert 0 <= span[j][0] and span[j][1] <= ring
            for k in st.order[:p]:
                if span[k][0] < span[j][1] and span[j][0] < span[k][1]:
                    assert st.order.index(st.after[j]) >= st.order.index(k), (ring, sizes, j, k)
        assert list(staging_problems(dataclasses.replace(plan, staging=st))) == []
        waits = [j for j in range(len(loads)) if st.after[j] >= 0]
        if waits:
            j = rng.choice(waits)
            dropped = dataclasses.replace(st, after=tuple(-1 if i == j else a for i, a in enumerate(st.after)))
            assert any("before load" in p for p in staging_problems(dataclasses.replace(plan, staging=dropped)))
            rejected += 1
    assert rejected > 100
    import json

    from flashmem.cache import plan_from_dict

    staged = with_staging(plan, ring, A)
    assert plan_from_dict(json.loads(staged.to_json())) == staged  # the plan's JSON carries the staging
    with pytest.raises(BudgetTooSmall, match="staging ring"):
        with_staging(dataclasses.replace(plan, loads=(Load(0, 0, 0, 0, 0, 0, 5 * A),), n_ops=1), 4 * A, A)


def test_staged_store_reads_a_weight_larger_than_its_ring_in_pieces(tmp_path):
    """The synchronous reads of a host-budget store (the trace's, the residents') pass through the ring a
    ring's worth at a time: the bytes arrive whole even where the weight is several rings long."""
    from flashmem.store import FileStore, StagedStore

    tensors = [torch.randn(10_000), torch.randn(300)]
    store = StagedStore(FileStore.spill(tensors, ["a", "b"]), ring_bytes=4096)
    try:
        for i, t in enumerate(tensors):
            out = torch.empty(t.numel() * 4, dtype=torch.uint8)
            store.read_into(i, out)
            assert torch.equal(out.view(torch.float32), t)
        assert store.read_stage(1, 512).data_ptr() == store.ring.data_ptr() + 512
        assert torch.equal(store.ring[512:512 + 1200].view(torch.float32), tensors[1])
    finally:
        store.close()


def test_host_budget_is_refused_on_the_cpu_and_must_hold_the_largest_weight():
    from flashmem.build import _host_budget_check

    model = make_model("mlp")
    with pytest.raises(FlashmemError, match="host_budget applies to CUDA"):
        flashmem.stream(model, 10**9, device="cpu", example_inputs=(make_input("mlp"),), host_budget="1GiB")
    mw, _ = collect_weights(model, 64)
    largest = max(w.nbytes for w in mw.weights)
    with pytest.raises(BudgetTooSmall, match="the pinned staging ring must hold the largest weight") as info:
        _host_budget_check(mw, largest - 1)
    assert fmt_bytes(largest - 1) in str(info.value)
    _host_budget_check(mw, align_up(largest, 4096))  # enough


def test_host_store_pads_large_weights_to_pages_only_for_files():
    """A store of a model's own tensors aligns every weight to HOST_ALIGNMENT, as the arena does, so a bias
    and the next layer's matrix lie at the same distance in both and `CudaMover._copy_groups` moves a
    layer's loads of one step as one copy; weights read from files with O_DIRECT keep their large ones
    congruent to their file offsets modulo a page."""
    from types import SimpleNamespace

    from flashmem.files import DIRECT_ALIGN
    from flashmem.plan import Load
    from flashmem.run_cuda import CudaMover
    from flashmem.store import HOST_ALIGNMENT, PAGE_CONGRUENT_BYTES, HostStore

    big = PAGE_CONGRUENT_BYTES
    sizes = [big, 2048, big, 2048]  # weight, bias, weight, bias: each bias ends off a page
    own = HostStore(sizes, pin_now=False)
    assert own.offsets == [0, big, big + 2048, 2 * big + 2048]  # 2048 is a multiple of HOST_ALIGNMENT
    shifted = HostStore(sizes, pin_now=False, file_offsets=[0, 0, 100, 0])
    assert shifted.offsets[2] % DIRECT_ALIGN == 100 and shifted.offsets[2] > big + 2048
    from_files = HostStore(sizes, pin_now=False, file_offsets=[0] * 4)
    assert from_files.offsets == [0, big, align_up(big + 2048, DIRECT_ALIGN), align_up(big + 2048, DIRECT_ALIGN) + big]
    assert all(off % HOST_ALIGNMENT == 0 for off in own.offsets)

    loads, arena_off = [], 0
    for w, n in enumerate(sizes):  # all issued at step 0, one after another in the arena (512-aligned)
        loads.append(Load(weight=w, start_step=0, first_use=1, last_use=1, release_op=1, offset_bytes=arena_off,
                          nbytes=n))
        arena_off += align_up(n, 512)
    mover = CudaMover.__new__(CudaMover)
    mover.plan = SimpleNamespace(loads=tuple(loads), alignment=512)
    mover.arena = torch.zeros(arena_off, dtype=torch.uint8)
    mover.wait_free = [None] * len(loads)
    assert [done for *_, done in mover._copy_groups(own)[0]] == [(0, 1, 2, 3)]  # one copy
    assert [done for *_, done in mover._copy_groups(from_files)[0]] == [(0, 1), (2, 3)]  # the page gap splits


def test_cuda_copy_groups_merge_adjacent_loads_of_a_step_and_not_when_asked():
    """`CudaMover._copy_groups` (no GPU needed: views of host tensors stand in for the arena): loads issued at
    one step that follow each other in the arena and in host memory (alignment padding between them
    allowed), in one pinned chunk, move as one copy; a gap on either side, another chunk or another step
    starts a new copy. With merge=False (`merge_copies(False)`) every load is its own copy."""
    from types import SimpleNamespace

    from flashmem.plan import Load
    from flashmem.run_cuda import CudaMover

    def load(w, step, arena_off, n):
        return Load(weight=w, start_step=step, first_use=step + 1, last_use=step + 1, release_op=step + 1,
                    offset_bytes=arena_off, nbytes=n)

    # weights 0-2 adjacent everywhere (1 padded to 512); 3 follows 2 in the arena but not on the host;
    # 4 follows 3 in both but lies in the next pinned chunk; 5 is adjacent to 4 but issued a step later
    loads = (load(0, 0, 0, 512), load(1, 0, 512, 500), load(2, 0, 1024, 512), load(3, 0, 1536, 512),
             load(4, 0, 2048, 512), load(5, 1, 2560, 512))
    store = SimpleNamespace(offsets=[4096, 4608, 5120, 9000, 9512, 10024], chunk_of=[0, 0, 0, 0, 1, 1],
                            buffer=torch.zeros(16384, dtype=torch.uint8))
    mover = CudaMover.__new__(CudaMover)
    mover.plan = SimpleNamespace(loads=loads, alignment=512)
    mover.arena = torch.zeros(4096, dtype=torch.uint8)
    mover.wait_free = [None] * len(loads)
    merged = mover._copy_groups(store)
    assert [(dst.numel(), done) for dst, _, _, done in merged[0]] == [(1536, (0, 1, 2)), (512, (3,)), (512, (4,))]
    assert [done for *_, done in merged[1]] == [(5,)]
    dst, src, _, _ = merged[0][0]
    assert src.data_ptr() == store.buffer.data_ptr() + 4096 and dst.data_ptr() == mover.arena.data_ptr()
    mover._store = store
    mover.merge_copies(False)
    assert [done for gs in mover.groups.values() for *_, done in gs] == [(j,) for j in range(len(loads))]
    assert sum(d.numel() for gs in mover.groups.values() for d, *_ in gs) == sum(ld.nbytes for ld in loads)
