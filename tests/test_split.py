"""split_bytes: linear layers larger than it stream in blocks of output features, embedding tables larger
than it stay on the host and are read by rows. A model whose largest layer is larger than the budget then
runs within it; row reads are exact, split layers are compared with the whole model within a bound (their
blocks' matrix products may use other kernels), and every plan passes the checker (streaming checks it)."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import flashmem
from flashmem.check import check_plan
from flashmem.files import read_header
from flashmem.run_cpu import peak_rss_bytes, reset_peak_rss, rss_bytes
from flashmem.split import ROW_MULTIPLE, RowEmbedding, SplitLinear, split_model, sub_location
from flashmem.units import fmt_bytes

from conftest import hf_model, model_bytes, out_of, resident, save_folder

MiB = 2**20
KiB = 2**10


def close_enough(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Split blocks sum each output over the same inputs as the whole layer; only the kernel may differ,
    so fp32 results agree to within a few units in the last place of the largest value."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    bound = 1e-5 * ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} over the bound {bound:.3g}"


def big_vocab_neo(seed: int = 0) -> nn.Module:
    """GPT-Neo shape whose untied embedding table and LM head (4096 x 64 fp32, 1 MiB each) are most of it."""
    return hf_model("neo", seed, vocab_size=4096, tie_word_embeddings=False)


IDS = [torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(k)) for k in range(2)]


def test_split_linear_blocks_cover_the_output_features():
    # 1000 output features of 64 fp32 inputs (256 B a row) in blocks of at most 64 KiB: 256 rows a block
    # (a multiple of 64), so blocks 0:256, 256:512, 512:768, 768:1000.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1000), nn.ReLU(), nn.Linear(1000, 8))
    x = torch.randn(5, 64)
    ref = resident(model, x)
    split = split_model(model, 64 * KiB)
    assert split.linears == ("0",) and split.embeddings == ()  # 1000 x 64 x 4 = 250 KiB; 8 x 1000 x 4 = 31 KiB
    head = model[0]
    assert isinstance(head, SplitLinear) and head.bounds == (0, 256, 512, 768, 1000)
    assert [tuple(p.weight.shape) for p in head.parts] == [(256, 64)] * 3 + [(232, 64)]
    assert split.slices["0.parts.3.bias"].row_begin == 768 and split.slices["0.parts.3.bias"].row_end == 1000
    assert 256 % ROW_MULTIPLE == 0
    close_enough(resident(model, x), ref)


def test_sub_location_is_the_rows_bytes(tmp_path):
    from safetensors.torch import save_file

    table = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    save_file({"t": table}, str(tmp_path / "t.safetensors"))
    loc = read_header(tmp_path / "t.safetensors")["t"]
    rows = split_model(nn.Sequential(nn.Linear(4, 10)), 64).slices["0.parts.0.weight"]  # 64 B: 4 rows a block
    sub = sub_location(loc, rows)
    assert (rows.row_begin, rows.row_end) == (0, 4) and sub.shape == (4, 4) and sub.nbytes == 64
    raw = (tmp_path / "t.safetensors").read_bytes()[sub.offset_bytes:sub.offset_bytes + sub.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(4, 4), table[:4])


def test_budget_below_the_largest_layer_runs_with_split(streams):
    ref = [resident(big_vocab_neo(), x) for x in IDS]
    nbytes = model_bytes(big_vocab_neo())
    budget = nbytes // 10  # 245 KiB: a quarter of the 1 MiB LM head
    with pytest.raises(flashmem.BudgetTooSmall) as info:
        flashmem.stream(big_vocab_neo(), budget, device="cpu", example_inputs=(IDS[0],))
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "split_bytes" in notes and "1.00 MiB" in notes, notes  # the fix is named, with the layer's size
    sm = streams(big_vocab_neo(), budget, IDS[0], split_bytes="64KiB")
    assert sm.split.linears == ("lm_head",) and sm.split.embeddings == ("transformer.wte",)
    program, plan = sm.program, sm.plan
    check_plan(plan, program)
    assert plan.arena_bytes <= budget
    assert max(w.nbytes for w in program.weights) <= 64 * KiB + 4 * KiB  # a block, rounded to pages
    assert not any(w.name.startswith("transformer.wte") for w in program.weights)  # the table is not streamed
    assert sum(1 for w in program.weights if w.name.startswith("lm_head.parts.")) == 4096 // 256
    for _ in range(2):
        for x, r in zip(IDS, ref):
            with torch.no_grad():
                close_enough(out_of(sm(x)), r)
    assert sm.stats.streamed_bytes == plan.streamed_bytes > 15 * MiB // 16  # the LM head's blocks stream


class EmbedMLP(nn.Module):
    """An embedding table of 1 MiB (8192 x 32 fp32, with a padding row) in front of two small layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(8192, 32, padding_idx=0)
        self.mix = nn.Linear(32, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embed(ids))))


def test_rows_read_from_the_host_are_exact(streams):
    ids = torch.tensor([[0, 5, 8191, 5, 77], [4096, 0, 1, 2, 3]])
    ref = resident(EmbedMLP(), ids)
    sm = streams(EmbedMLP(), 16 * KiB, ids, split_bytes="256KiB")  # a budget of 1/64 of the table
    assert isinstance(sm.model.embed, RowEmbedding) and sm.split.linears == ()
    assert [w.name for w in sm.program.weights] == ["mix.weight", "mix.bias", "out.weight", "out.bias"]
    assert sm.model.embed._file is not None  # a CPU budget: rows are read from a file, RAM holds no table
    with torch.no_grad():
        assert torch.equal(sm(ids), ref)
        other = ids.flip(1)
        assert torch.equal(sm(other), resident(EmbedMLP(), other))


def test_split_bytes_must_be_positive():
    with pytest.raises(flashmem.BadBudget):
        flashmem.stream(EmbedMLP(), "1MiB", device="cpu", example_inputs=(torch.tensor([[1]]),), split_bytes="0")


@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_reads_blocks_and_rows_from_the_files(tmp_path, tied):
    """The blocks of a split layer are rows of the original weight in the files; a tied LM head (one
    weight in the files) is split into views of the table that the embedding reads by rows."""
    model = hf_model("neo", vocab_size=4096, tie_word_embeddings=tied)
    ref = [resident(model, x) for x in IDS]
    folder = save_folder(model, tmp_path / "neo")
    names = read_header(next(folder.glob("*.safetensors")))
    assert ("lm_head.weight" in names) != tied
    budget = model_bytes(model) // 8
    del model
    sm = flashmem.from_pretrained(folder, budget, example_inputs=(IDS[0],), split_bytes="128KiB")
    try:
        assert sm.split.linears == ("lm_head",) and sm.split.embeddings == ("transformer.wte",)
        assert sm.plan.arena_bytes <= budget
        for x, r in zip(IDS, ref):
            with torch.no_grad():
                close_enough(out_of(sm(x)), r)
    finally:
        sm.close()


@pytest.mark.skipif(not reset_peak_rss(), reason="/proc/self/clear_refs is not writable here")
def test_rss_stays_within_a_tenth_of_the_weights(tmp_path):
    """A folder of 68 MiB (embedding table and LM head 32 MiB each) streamed at 10% of its bytes: during
    each call the process grows by no more than the budget, the activations and 8 MiB of overhead
    (test_budget_cpu.py says what it is made of); either large layer alone would be 5x the budget."""
    model = hf_model("neo", vocab_size=32768, hidden_size=256, num_heads=4, tie_word_embeddings=False)
    nbytes = model_bytes(model)
    assert 60 * MiB < nbytes < 80 * MiB
    x = torch.randint(0, 32768, (1, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = out_of(model(x))
        gc.collect()
        reset_peak_rss()
        before = rss_bytes()
        out_of(model(x))
        activations = peak_rss_bytes() - before
    folder = save_folder(model, tmp_path / "neo")
    del model
    gc.collect()
    budget = nbytes // 10
    sm = flashmem.from_pretrained(folder, budget, example_inputs=(x,), split_bytes="2MiB")
    try:
        for i in range(3):
            gc.collect()
            start = rss_bytes()
            reset_peak_rss()
            with torch.no_grad():
                out = out_of(sm(x))
            growth = peak_rss_bytes() - start
            close_enough(out, ref)
            del out
            assert growth <= budget + activations + 8 * MiB, (
                f"call {i}: RSS grew by {fmt_bytes(growth)} at a budget of {fmt_bytes(budget)} "
                f"(activations {fmt_bytes(activations)})")
        assert sm.stats.streamed_bytes > nbytes // 2
    finally:
        sm.close()


def _settle() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_split_runs_below_the_largest_layer_within_the_budget():
    """An fp16 Llama shape whose embedding table and LM head are 64 MiB each, at a budget of 48 MiB, less
    than the LM head alone (the reference run made the cuBLAS workspace, so none is counted; the logits take
    a 20 MiB segment of the caching allocator, the trace's scratch 10 MiB): refused whole, run split, with
    the caching allocator's reserved memory grown by at most the budget and the logits within 4 fp16 units in the last place of the whole
    model's (a block's matrix product may pick another kernel)."""
    def build():
        return hf_model("llama", vocab_size=65536, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False).half()

    xs = [torch.randint(0, 65536, (2, 32), generator=torch.Generator().manual_seed(k)).cuda() for k in range(2)]
    model = build().cuda()
    with torch.no_grad():
        refs = [out_of(model(x)).clone() for x in xs]
    del model
    _settle()
    budget = 48 * MiB
    with pytest.raises(flashmem.BudgetTooSmall):
        flashmem.stream(build(), budget, device="cuda", example_inputs=(xs[0],))
    _settle()
    model = build()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    sm = flashmem.stream(model, budget, device="cuda", example_inputs=(xs[0],), split_bytes="4MiB")
    try:
        assert sm.split.linears == ("lm_head",) and sm.split.embeddings == ("model.embed_tokens",)
        peaks = [torch.cuda.max_memory_reserved()]
        for i in range(4):
            with torch.no_grad():
                out = out_of(sm(xs[i % 2]))
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_reserved())
            ref = refs[i % 2]
            assert out.dtype == ref.dtype and out.shape == ref.shape
            diff = (out.float() - ref.float()).abs().max().item()
            assert diff <= 4 * 2**-10 * ref.abs().max().item(), f"call {i}: max |diff| {diff}"
            del out
        growth = max(peaks) - before
        assert growth <= budget, f"reserved memory grew by {fmt_bytes(growth)} at a budget of {fmt_bytes(budget)}"
        assert sm.stats.streamed_bytes == sm.plan.streamed_bytes > 40 * MiB  # most of the LM head's blocks
    finally:
        sm.close()
        _settle()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rows_read_from_the_host_are_exact():
    ids = torch.tensor([[0, 5, 8191, 5, 77], [4096, 0, 1, 2, 3]]).cuda()
    model = EmbedMLP().cuda()
    with torch.no_grad():
        ref = model(ids)
    del model
    _settle()
    sm = flashmem.stream(EmbedMLP(), 40 * MiB, device="cuda", example_inputs=(ids,), split_bytes="256KiB")
    try:
        assert isinstance(sm.model.embed, RowEmbedding)
        with torch.no_grad():
            for _ in range(2):
                out = sm(ids)
                assert out.device.type == "cuda" and torch.equal(out, ref)
    finally:
        sm.close()
        _settle()


def test_only_plain_linear_layers_split():
    # nn.MultiheadAttention reads out_proj.weight (a NonDynamicallyQuantizableLinear) without calling
    # out_proj: a subclass is left whole, and reading a split layer's whole weight says what happened.
    torch.manual_seed(0)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(64, 4, batch_first=True), "head": nn.Linear(64, 512)})
    split = split_model(model, 4 * KiB)  # out_proj is 16 KiB; the head 128 KiB, 32 blocks of 16 rows (256 B each)
    assert split.linears == ("head",)
    assert type(model["attn"].out_proj) is not SplitLinear
    with pytest.raises(AttributeError, match="split by split_bytes into 32 blocks"):
        model["head"].weight
