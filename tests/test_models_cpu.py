"""Bit-exact outputs on the CPU: the streamed model against the same model with every weight resident
(torch.equal, never allclose), for GPT-2-, GPT-Neo- and Llama-shaped models, an MLP, a CNN and a model
with nested containers and reused modules, at budgets from the minimum up to the whole model; tied
weights; many calls in a row; inputs of another shape and more shapes than the plan cache holds;
keyword inputs; generate with a KV cache; calls that fail, stray from the trace, are interrupted, lose
their weight file, or overlap from two threads."""
from __future__ import annotations

import functools
import gc
import threading

import pytest
import torch

import flashmem
from flashmem.run_cpu import rss_bytes

from conftest import (ALL_KINDS, HF_KINDS, hf_model, make_input, make_model, minimum_budget, model_bytes, out_of,
                      resident)

# budgets: the minimum flashmem accepts, fractions of the model's bytes, and more than the whole model
BUDGETS = ["min", 0.35, 0.6, 1.0, 2.0]

CASES = [pytest.param(kind, which, id=f"{kind}-{which}") for kind in ALL_KINDS for which in BUDGETS]


@pytest.fixture(scope="module")
def cases():
    """Per kind: two inputs, their resident outputs (computed before any streaming), the model's bytes
    and the minimum budget."""
    out = {}
    for kind in ALL_KINDS:
        model = make_model(kind)
        xs = [make_input(kind, seed=1), make_input(kind, seed=2)]
        refs = [resident(model, x) for x in xs]
        low, lower = minimum_budget(lambda k=kind: make_model(k), xs[0])
        out[kind] = dict(xs=xs, refs=refs, nbytes=model_bytes(model), min=low, lower=lower)
    return out


def budget_of(case, which) -> int:
    return case["min"] if which == "min" else max(case["min"], int(which * case["nbytes"]))


@pytest.mark.parametrize("kind, which", CASES)
def test_streamed_equals_resident(kind, which, cases, streams):
    case = cases[kind]
    budget = budget_of(case, which)
    sm = streams(make_model(kind), budget, case["xs"][0])
    plan = sm.plan
    assert plan.total_bytes <= budget
    for _ in range(2):
        for x, ref in zip(case["xs"], case["refs"]):
            with torch.no_grad():
                out = out_of(sm(x))
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert torch.equal(out, ref)
    stats = sm.stats
    assert stats is not None and stats.streamed_bytes == plan.streamed_bytes
    assert stats.peak_bytes >= plan.resident_bytes
    if which in ("min", 0.35, 0.6):
        assert plan.loads, "a budget below the model's size must stream"
        assert plan.arena_bytes < case["nbytes"]
    if which == 2.0:
        assert plan.loads == () and plan.streamed_bytes == 0
    if which == "min":
        assert plan.residents == ()
        # the first error's need_bytes is a true lower bound: one byte less is refused
        with pytest.raises(flashmem.BudgetTooSmall):
            flashmem.stream(make_model(kind), case["lower"] - 1, example_inputs=(case["xs"][0],))


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_model_itself_streams_after_stream(kind, cases, streams):
    """Calling the model object (not the StreamedModel) goes through the same hooks."""
    case = cases[kind]
    model = make_model(kind)
    streams(model, budget_of(case, 0.35), case["xs"][0])
    with torch.no_grad():
        assert torch.equal(out_of(model(case["xs"][1])), case["refs"][1])


class ThreeBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from conftest import Block

        self.blocks = torch.nn.ModuleList([Block(32) for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("budget", [12_000, 20_000])
def test_container_weight_outlives_its_last_child(budget, streams):
    """Minimal reproducer: each Block uses its own `scale` after its last child (lin2) has run. At 12000 B
    the load of the next Block's lin1.weight lands on the bytes of this Block's `scale`; both this
    Block's `scale` load and its lin2 load end at the same op (last_use), and the load waits only for
    lin2's release, which comes before the Block exits."""
    torch.manual_seed(0)
    model = ThreeBlocks().eval()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    ref = resident(model, x)
    sm = streams(model, budget, x)
    assert sm.plan.loads and sm.plan.total_bytes <= budget
    for _ in range(2):
        with torch.no_grad():
            assert torch.equal(sm(x), ref)


def test_gpt_neo_has_global_and_local_layers():
    model = hf_model("neo")
    kinds = [layer.attn.attention_type for layer in model.transformer.h]
    assert kinds == ["global", "local"]
    assert model.config.window_size < make_input("neo").shape[1]  # the local window really cuts


@pytest.mark.parametrize("which", ["min", 0.5, 2.0])
def test_gpt2_tied_weight_is_one_weight_with_two_slots(which, cases, streams):
    case = cases["gpt2"]
    model = make_model("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    sm = streams(model, budget_of(case, which), case["xs"][0])
    tied = [w for w in sm.program.weights if ("lm_head", "weight") in w.slots]
    assert len(tied) == 1
    wte = tied[0]
    assert set(wte.slots) == {("transformer.wte", "weight"), ("lm_head", "weight")}
    assert [w.name for w in sm.program.weights].count(wte.name) == 1
    assert not any(w.name == "lm_head.weight" for w in sm.program.weights)
    # both modules use it: it is read by the first op and by the last one
    users = [op.index for op in sm.program.ops if wte.index in op.weights]
    assert users == [0, len(sm.program.ops) - 1]
    streamed = [l for l in sm.plan.loads if l.weight == wte.index]
    if which == 2.0:
        assert streamed == [] and any(r.weight == wte.index for r in sm.plan.residents)
    if which == "min":
        assert len(streamed) == 2  # loaded for the embedding and again for the head
    for x, ref in zip(case["xs"], case["refs"]):
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)


def test_many_calls_no_growth_and_exact(cases, streams):
    case = cases["gpt2"]
    sm = streams(make_model("gpt2"), budget_of(case, 0.5), case["xs"][0])
    assert sm.plan.loads
    rss = {}
    for i in range(1, 51):
        k = i % 2
        with torch.no_grad():
            out = out_of(sm(case["xs"][k]))
        assert torch.equal(out, case["refs"][k]), f"call {i}"
        del out
        if i in (10, 50):
            gc.collect()
            rss[i] = rss_bytes()
    assert len(sm._plans) == 1
    assert rss[50] - rss[10] <= 512 * 1024, f"RSS grew by {(rss[50] - rss[10]) / 2**20:.2f} MiB over 40 calls"


@pytest.mark.parametrize("kind", ["gpt2", "neo", "llama", "cnn"])
def test_other_shapes_are_planned_again_and_exact(kind, cases, streams):
    case = cases[kind]
    model = make_model(kind)
    if kind in HF_KINDS:
        others = [make_input(kind, seed=3, seq=7, batch=1), make_input(kind, seed=4, seq=20, batch=3)]
    else:
        others = [torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)),
                  torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(4))]
    other_refs = [resident(model, x) for x in others]
    sm = streams(model, budget_of(case, 0.5), case["xs"][0])
    assert len(sm._plans) == 1
    with torch.no_grad():
        assert torch.equal(out_of(sm(others[0])), other_refs[0])
        assert len(sm._plans) == 2
        assert torch.equal(out_of(sm(case["xs"][1])), case["refs"][1])  # back to the first plan
        assert len(sm._plans) == 2
        assert torch.equal(out_of(sm(others[1])), other_refs[1])
        assert len(sm._plans) == 3
        for x, ref in list(zip(others, other_refs)) + list(zip(case["xs"], case["refs"])):
            assert torch.equal(out_of(sm(x)), ref)
    assert len(sm._plans) == 3
    assert sm.plan.total_bytes <= sm.budget_bytes


def test_keyword_inputs_with_padding_mask(streams):
    model = make_model("llama")
    ids = make_input("llama", seed=5, seq=10, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in the first row
    ref = resident(model, input_ids=ids, attention_mask=mask)
    sm = streams(model, 150_000, example_kwargs=dict(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        assert torch.equal(out_of(sm(input_ids=ids, attention_mask=mask)), ref)


def test_a_failing_call_leaves_the_model_usable(cases, streams):
    case = cases["gpt2"]
    sm = streams(make_model("gpt2"), budget_of(case, 0.35), case["xs"][0])
    bad = case["xs"][0].clone()
    bad[0, 3] = 10**6  # same shape and dtype (no new plan), but the embedding fails on it
    with pytest.raises(IndexError):
        sm(bad)
    for x, ref in zip(case["xs"], case["refs"]):
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)


def test_a_submodule_called_alone_is_refused(cases, streams):
    case = cases["mlp"]
    model = make_model("mlp")
    sm = streams(model, budget_of(case, 0.35), case["xs"][0])
    with pytest.raises(flashmem.FlashmemError, match="called on its own"):
        model[0](case["xs"][0])
    with torch.no_grad():
        assert torch.equal(sm(case["xs"][0]), case["refs"][0])


def test_buffer_written_by_the_forward_is_refused():
    """BatchNorm in training mode updates its running stats: flashmem would lose the write, so the
    trace refuses (stream puts the model in eval mode, so train a submodule explicitly)."""
    model = make_model("cnn")
    x = make_input("cnn")

    class Train(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def train(self, mode=True):  # stay in training mode through model.eval()
            return super().train(True)

        def forward(self, x):
            return self.inner(x)

    with pytest.raises(flashmem.FlashmemError, match="wrote to buffer"):
        flashmem.stream(Train(model), "1MiB", example_inputs=(x,))


def test_generate_matches_resident(streams):
    """generate() with a KV cache: each new input signature's first call is traced; the cache must still
    be updated once per call."""
    model = make_model("llama")
    ids = make_input("llama", seed=6, seq=6, batch=1)
    kwargs = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
    sm = streams(model, 150_000, ids)
    with torch.no_grad():
        out = sm.generate(ids, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(out.logits, ref.logits))
    assert out.past_key_values.get_seq_length() == ref.past_key_values.get_seq_length()


def test_cache_passed_in_is_updated_once(streams):
    from transformers import DynamicCache

    model = make_model("llama")
    ids = make_input("llama", seed=6, seq=6, batch=1)
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        ref = out_of(model(ids, past_key_values=ref_cache, use_cache=True))
    sm = streams(model, 150_000, ids)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = out_of(sm(ids, past_key_values=cache, use_cache=True))
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 6
    assert torch.equal(out, ref)


def test_more_signatures_than_the_plan_cache_holds(streams):
    """Eleven batch sizes, twice over: plans are evicted past the cache's size and traced again, and every
    output stays exact."""
    from flashmem.streamed import MAX_PLANS

    model = make_model("mlp")
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(b, 32, generator=g) for b in range(1, MAX_PLANS + 4)]
    refs = [resident(model, x) for x in xs]
    sm = streams(model, 70_000, xs[0])
    for x, ref in list(zip(xs, refs)) * 2:
        with torch.no_grad():
            assert torch.equal(sm(x), ref)
        assert len(sm._plans) <= MAX_PLANS
    assert len(sm._plans) == MAX_PLANS


@pytest.mark.parametrize("cpu_reads", ["copy", "map"])
def test_storage_failure_surfaces_as_an_error(tmp_path, cpu_reads):
    """A weight file cut short after from_pretrained: the call fails with a FlashmemError naming the
    read (raised in the IO thread, surfaced in the caller; with mapped files, found before the call
    touches a page), and does not hang."""
    import shutil
    import threading

    from conftest import save_folder

    folder = save_folder(make_model("llama"), tmp_path / "model")
    sm = flashmem.from_pretrained(folder, "200KiB", cpu_reads=cpu_reads)
    try:
        assert sm.plan.loads
        path = folder / "model.safetensors"
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        result = {}

        def call():
            try:
                sm(torch.arange(8).unsqueeze(0))
                result["error"] = None
            except Exception as err:  # noqa: BLE001 - recorded for the assertion below
                result["error"] = err

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the call hung on a failed read"
        assert isinstance(result["error"], flashmem.FlashmemError)
        assert "truncated" in str(result["error"])
    finally:
        sm.close()
        shutil.rmtree(folder)


class Interrupted(torch.nn.Module):
    """A middle layer that raises KeyboardInterrupt once when armed (PyTorch does not run always_call
    hooks for it, so flashmem finds the cut-off call's state at the next call)."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(32, 32)
        self.b = torch.nn.Linear(32, 32)
        self.c = torch.nn.Linear(32, 8)
        self.armed = False

    def forward(self, x):
        x = self.b(self.a(x))
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return self.c(x)


def test_keyboard_interrupt_then_exact(streams):
    torch.manual_seed(0)
    model = Interrupted().eval()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    ref = resident(model, x)
    sm = streams(model, 6_000, x)
    assert sm.plan.loads
    model.armed = True
    with pytest.raises(KeyboardInterrupt):
        sm(x)
    # the cut-off call was ended at once: another thread's call is not refused as overlapping
    got = []
    worker = threading.Thread(target=lambda: got.append(sm(x).detach()))
    with torch.no_grad():
        worker.start()
        worker.join(timeout=60)
    assert got and torch.equal(got[0], ref)
    for _ in range(2):
        with torch.no_grad():
            assert torch.equal(sm(x), ref)


class Gated(torch.nn.Module):
    """Waits in the middle of its forward until released, so a second call can come in meanwhile."""

    def __init__(self):
        super().__init__()
        import threading

        self.a = torch.nn.Linear(32, 32)
        self.c = torch.nn.Linear(32, 8)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.gate = False

    def forward(self, x):
        x = self.a(x)
        if self.gate:
            self.entered.set()
            self.release.wait(30)
        return self.c(x)


def test_overlapping_call_from_another_thread_is_refused_without_harm(streams):
    import threading

    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    ref = resident(model, x)
    sm = streams(model, 4_400, x)  # a.weight + a.bias = 4352 B: everything streams
    assert sm.plan.loads
    model.gate = True
    result = {}

    def first():
        try:
            with torch.no_grad():
                result["out"] = sm(x)
        except Exception as err:  # noqa: BLE001 - recorded for the assertion below
            result["error"] = err

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    try:
        assert model.entered.wait(30)
        with pytest.raises(flashmem.FlashmemError, match="another thread"):
            sm(x)
    finally:
        model.release.set()
        thread.join(30)
    model.gate = False
    assert "error" not in result, f"the first call failed: {result.get('error')!r}"
    assert torch.equal(result["out"], ref)
    with torch.no_grad():
        assert torch.equal(sm(x), ref)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_mapped_files_stream_exactly_and_drop_their_pages(kind, streams):
    """cpu_reads="map": weights are used where the mapped files hold them. At the smallest budget the
    page footprints allow, outputs are exact, the plan budgets whole pages, and after each call the only
    pages held are the residents' (every streamed page was dropped)."""
    from flashmem.store import PAGE_BYTES

    xs = [make_input(kind), make_input(kind, seed=2)]
    refs = [resident(make_model(kind), x) for x in xs]
    budget, _ = minimum_budget(functools.partial(make_model, kind), xs[0], cpu_reads="map")
    sm = streams(make_model(kind), budget, xs[0], cpu_reads="map")
    plan, files = sm.plan, sm._files
    assert sm.cpu_reads == "map" and files is not None
    assert plan.loads and plan.total_bytes <= budget
    assert all(load.nbytes % PAGE_BYTES == 0 for load in plan.loads)
    resident_pages = sum(files.span_bytes(r.weight) for r in plan.residents) // PAGE_BYTES
    for _ in range(2):
        for x, ref in zip(xs, refs):
            with torch.no_grad():
                assert torch.equal(out_of(sm(x)), ref)
            assert files.held_pages() <= resident_pages
            assert sm.stats.streamed_bytes == plan.streamed_bytes


def test_auto_maps_large_tensors_and_copies_small_ones(streams):
    """"auto" copies where rounding to pages would cost over 1% (a model of tiny tensors) and maps a
    model of large tensors."""
    x = make_input("mlp")
    sm = streams(make_model("mlp"), "4MiB", x)
    assert sm.cpu_reads == "copy" and sm._files is None
    big = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512)).eval()
    xb = torch.randn(3, 512)
    ref = resident(big, xb)
    sm = streams(big, "1.2MiB", xb)
    assert sm.cpu_reads == "map" and sm.plan.loads
    with torch.no_grad():
        assert torch.equal(sm(xb), ref)


def test_a_mapped_read_past_the_end_of_a_truncated_file_raises(tmp_path):
    """Bringing in pages that a truncated file no longer has raises FlashmemError (MADV_POPULATE_READ
    reports what would otherwise be a SIGBUS at the first read); nothing reads the missing pages."""
    from safetensors.torch import save_file

    from flashmem.files import read_header
    from flashmem.store import FileStore, MappedFiles

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4096), "b": torch.ones(65536)}, str(path))
    header = read_header(path)
    store = FileStore([header["a"], header["b"]])
    files = MappedFiles(store)
    files.hold(1)
    files.unhold(1)
    with open(path, "r+b") as f:
        f.truncate(header["b"].offset_bytes + 4096)
    with pytest.raises(flashmem.FlashmemError, match="truncated"):
        files.check_unchanged()
    if files.populate:  # kernels without MADV_POPULATE_READ fault pages in on use only
        with pytest.raises(flashmem.FlashmemError, match="truncated or the storage failed"):
            files.hold(1)
    store.close()


@pytest.mark.parametrize("cpu_reads", ["copy", "map"])
def test_verify_finds_bytes_rewritten_in_place(tmp_path, cpu_reads):
    """DebugOptions(verify=True): a streamed weight's bytes rewritten in the file (size and modification
    time kept, so only the content tells) raise CorruptWeights, not a wrong output; with the bytes put
    back, the next call is exact."""
    import os

    from conftest import save_folder
    from flashmem.files import index_folder

    model = hf_model("llama", seed=0, hidden_size=128, intermediate_size=256)
    x = torch.arange(8).unsqueeze(0)
    ref = resident(model, x)
    folder = save_folder(model, tmp_path / "model")
    sm = flashmem.from_pretrained(folder, model_bytes(model) // 3, example_inputs=(x,), cpu_reads=cpu_reads,
                                  debug=flashmem.DebugOptions(verify=True))
    try:
        assert sm.cpu_reads == cpu_reads and sm.plan.loads
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)
        streamed = sm.program.weights[sm.plan.loads[-1].weight]
        loc = next(loc for name, loc in index_folder(folder).items() if name == streamed.name)
        path = folder / "model.safetensors"
        st = path.stat()
        with open(path, "r+b") as f:
            f.seek(loc.offset_bytes)
            original = f.read(64)
            f.seek(loc.offset_bytes)
            f.write(bytes(b ^ 0x5A for b in original))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(flashmem.CorruptWeights, match="differ from when they were first read"):
            with torch.no_grad():
                sm(x)
        with open(path, "r+b") as f:
            f.seek(loc.offset_bytes)
            f.write(original)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)
    finally:
        sm.close()


def test_an_input_of_another_dtype_is_planned_again(streams):
    """Token ids as int32 after a trace with int64: a new signature, traced and planned, exact; an input the
    model itself rejects (float ids) fails as it would resident, and the StreamedModel stays usable."""
    model = hf_model("llama", seed=0)
    x64 = torch.arange(10).unsqueeze(0) * 3 % 100
    x32 = x64.to(torch.int32)
    refs = [resident(hf_model("llama", seed=0), x) for x in (x64, x32)]
    sm = streams(model, model_bytes(model) // 3, x64)
    with torch.no_grad():
        assert torch.equal(out_of(sm(x32)), refs[1])
        assert len(sm._plans) == 2
        with pytest.raises(RuntimeError):
            hf_model("llama", seed=0)(x64.float())  # the resident model rejects it ...
        with pytest.raises(RuntimeError):
            sm(x64.float())  # ... and so does the streamed one
        assert torch.equal(out_of(sm(x64)), refs[0])
        assert torch.equal(out_of(sm(x32)), refs[1])


def test_a_closed_model_says_its_weights_went_with_flashmem():
    """After StreamedModel.close() the model's parameters are gone with flashmem's store: calling the
    model raises a FlashmemError that says so (not a meta-device error from deep inside the forward)."""
    model = make_model("mlp")
    x = make_input("mlp")
    sm = flashmem.stream(model, model_bytes(model) * 9 // 10, device="cpu", example_inputs=(x,))
    assert sm.plan.loads
    sm(x)
    sm.close()
    with pytest.raises(flashmem.FlashmemError, match="was closed"):
        model(x)
    sm.close()  # twice is harmless
    with pytest.raises(flashmem.FlashmemError, match="was closed"):
        model(x)
