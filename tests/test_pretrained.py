"""flashmem.from_pretrained on folders written with save_pretrained (safetensors): one file and sharded,
tied and untied heads, fp32 and bf16, exact against the resident model; and broken folders (missing
shard, truncated file, no config, no weights, mismatched config or dtype) raising BadModelFolder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

import flashmem
from flashmem import BadModelFolder

from conftest import hf_model, make_input, model_bytes, out_of, resident, save_folder


def reference(kind: str, *xs, **overrides):
    model = hf_model(kind, **overrides)
    return [resident(model, x) for x in xs], model_bytes(model)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 2.0])
@pytest.mark.parametrize("folder_name, kind", [("llama_folder", "llama"), ("llama_sharded_folder", "llama"),
                                               ("gpt2_folder", "gpt2")])
def test_folder_streams_exactly(folder_name, kind, fraction, request):
    folder = request.getfixturevalue(folder_name)
    xs = [make_input(kind, seed=1), make_input(kind, seed=2)]
    refs, nbytes = reference(kind, *xs)
    budget = int(fraction * nbytes)
    sm = flashmem.from_pretrained(folder, budget, example_inputs=(xs[0],))
    try:
        assert sm.plan.total_bytes <= budget
        if fraction < 1:
            assert sm.plan.loads
        else:
            assert sm.plan.loads == ()
        for x, ref in zip(xs + xs, refs + refs):
            with torch.no_grad():
                assert torch.equal(out_of(sm(x)), ref)
    finally:
        sm.close()


def test_tied_head_is_read_once_from_the_files(gpt2_folder):
    from safetensors import safe_open

    with safe_open(str(gpt2_folder / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" not in names  # save_pretrained stores the tied weight once
    sm = flashmem.from_pretrained(gpt2_folder, "200KiB")
    try:
        tied = [w for w in sm.program.weights if ("lm_head", "weight") in w.slots]
        assert len(tied) == 1 and ("transformer.wte", "weight") in tied[0].slots
    finally:
        sm.close()


def test_default_example_input_is_eight_tokens(llama_folder):
    x = torch.arange(8).unsqueeze(0)
    (ref,), _ = reference("llama", x)
    sm = flashmem.from_pretrained(llama_folder, "200KiB")
    try:
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)
        assert len(sm._plans) == 1  # the call used the plan traced at load time
    finally:
        sm.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_folder(dtype, tmp_path):
    from transformers import LlamaForCausalLM

    save_folder(hf_model("llama", dtype=dtype), tmp_path)
    # the reference: the folder loaded by transformers itself, every weight resident
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    x = make_input("llama")
    ref = resident(model, x)
    assert ref.dtype == dtype
    sm = flashmem.from_pretrained(tmp_path, model_bytes(model) // 3, example_inputs=(x,))
    try:
        assert {w.dtype for w in sm.program.weights if not w.is_buffer} == {dtype}
        assert sm.plan.loads
        with torch.no_grad():
            out = out_of(sm(x))
        assert out.dtype == ref.dtype and torch.equal(out, ref)
    finally:
        sm.close()


def test_gpt_neo_folder(tmp_path):
    model = hf_model("neo")
    x = make_input("neo")
    ref = resident(model, x)
    save_folder(model, tmp_path)
    sm = flashmem.from_pretrained(tmp_path, model_bytes(model) // 3, example_inputs=(x,))
    try:
        with torch.no_grad():
            assert torch.equal(out_of(sm(x)), ref)
    finally:
        sm.close()


# -- broken folders ---------------------------------------------------------------------------------------
def copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_missing_shard(llama_sharded_folder, tmp_path):
    folder = copy(llama_sharded_folder, tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / shard).unlink()
    with pytest.raises(BadModelFolder) as info:
        flashmem.from_pretrained(folder, "1MiB")
    msg = str(info.value)
    assert shard in msg and "missing" in msg


def test_truncated_file(llama_folder, tmp_path):
    folder = copy(llama_folder, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 1000])
    with pytest.raises(BadModelFolder) as info:
        flashmem.from_pretrained(folder, "1MiB")
    msg = str(info.value)
    assert "truncated" in msg and "model.safetensors" in msg


def test_truncated_shard(llama_sharded_folder, tmp_path):
    folder = copy(llama_sharded_folder, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(BadModelFolder, match="truncated|does not fit|corrupted"):
        flashmem.from_pretrained(folder, "1MiB")


def test_no_config(llama_folder, tmp_path):
    folder = copy(llama_folder, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(BadModelFolder, match="config.json"):
        flashmem.from_pretrained(folder, "1MiB")


def test_no_weights(llama_folder, tmp_path):
    folder = copy(llama_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(BadModelFolder, match=r"no \*\.safetensors files.*config\.json"):
        flashmem.from_pretrained(folder, "1MiB")
    with pytest.raises(BadModelFolder):
        flashmem.from_pretrained(tmp_path / "does-not-exist", "1MiB")


def test_weights_for_another_model(llama_folder, tmp_path):
    folder = copy(llama_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadModelFolder, match="different models"):
        flashmem.from_pretrained(folder, "1MiB")


def test_weight_missing_from_the_files(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy(llama_folder, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(n for n in tensors if n.endswith("mlp.up_proj.weight"))
    del tensors[name]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(BadModelFolder) as info:
        flashmem.from_pretrained(folder, "1MiB")
    assert name in str(info.value) and "incomplete" in str(info.value)


def test_dtype_other_than_the_files(llama_folder):
    with pytest.raises(BadModelFolder, match="pass dtype=torch.float32"):
        flashmem.from_pretrained(llama_folder, "1MiB", dtype=torch.float16)


def test_shard_outside_the_folder_is_refused(llama_sharded_folder, tmp_path):
    folder = copy(llama_sharded_folder, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    shutil.copy(folder / index["weight_map"][first], tmp_path / "elsewhere.safetensors")
    index["weight_map"][first] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(BadModelFolder, match="outside the model folder"):
        flashmem.from_pretrained(folder, "1MiB")


def test_host_store_reads_in_the_background_and_waits_per_weight(tmp_path, monkeypatch):
    """The pinned host store of a CUDA from_pretrained fills on several threads, large weights in pieces
    read by several threads, pinned chunk by chunk (pinning is a no-op without CUDA); each read waits for its
    weight, the bytes are the file's, and a failed read surfaces in the reader."""
    from safetensors.torch import save_file

    from flashmem import store as store_mod
    from flashmem.files import TensorLocation, read_header
    from flashmem.store import HostStore

    monkeypatch.setattr(store_mod, "READ_PIECE_BYTES", 1000)  # most weights in several pieces
    monkeypatch.setattr(store_mod, "PIN_CHUNK_BYTES", 3 * 4096)  # several weights per chunk, several chunks
    tensors = {f"w{i}": torch.randn(1000 + 37 * i) for i in range(20)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    header = read_header(tmp_path / "w.safetensors")
    locs = [header[f"w{i}"] for i in range(20)]
    store = HostStore([loc.nbytes for loc in locs], pin_now=False)
    assert store.buffer.data_ptr() % 4096 == 0 and all(off % 4096 == 0 for off in store.chunk_starts)
    assert 1 < len(store.chunk_starts) < 20 and store.total_bytes % 4096 == 0
    store.fill_in_background(locs + [], threads=3)
    for i in reversed(range(20)):
        out = torch.empty(locs[i].nbytes, dtype=torch.uint8)
        store.read_into(i, out)
        assert torch.equal(out.view(torch.float32), tensors[f"w{i}"])
    store.wait_all()
    store.close()
    # several threads preparing chunks at once (CUDA's default), readers waiting for each chunk
    store = HostStore([loc.nbytes for loc in locs], pin_now=False)
    store.fill_in_background(locs, threads=2, preparers=3)
    store.wait_all()
    for i in range(20):
        assert torch.equal(store.view(i).view(torch.float32), tensors[f"w{i}"]), i
    store.close()
    missing = TensorLocation(str(tmp_path / "gone.safetensors"), 8, 16, torch.float32, (4,))
    store = HostStore([16, 16])
    store.fill_in_background([missing, missing], threads=2)
    with pytest.raises(flashmem.FlashmemError, match="reading the weights from storage failed"):
        store.read_into(1, torch.empty(16, dtype=torch.uint8))
    with pytest.raises(flashmem.FlashmemError):
        store.wait_all()
    store.close()


def test_host_store_reads_with_o_direct_bit_exact(tmp_path, monkeypatch):
    """A cold file is read with O_DIRECT between DIRECT_ALIGN boundaries and through the page cache around
    them: the bytes equal a plain read for tensors at unaligned offsets, for pieces that cut a weight, and for
    the last tensor of a file whose size is not a multiple of the alignment; where the device refuses the
    O_DIRECT read (a destination off its memory alignment) the same bytes come through the page cache; a
    file truncated under the fill fails in the reader."""
    import fcntl
    import os

    from safetensors.torch import save_file

    from flashmem import files as files_mod
    from flashmem import store as store_mod
    from flashmem.files import DIRECT_ALIGN, pread_into, read_header
    from flashmem.store import HostStore

    monkeypatch.setattr(store_mod, "READ_PIECE_BYTES", 3 * DIRECT_ALIGN)  # weights cut into pieces
    monkeypatch.setattr(store_mod, "PAGE_CONGRUENT_BYTES", 20000)  # the larger weights congruent modulo a page
    monkeypatch.setattr(store_mod, "PIN_CHUNK_BYTES", 8 * 4096)
    monkeypatch.setattr(files_mod, "cached_fraction", lambda path: 0.0)  # as cold, whatever the cache holds
    g = torch.Generator().manual_seed(0)
    tensors = {"a0": torch.randint(0, 256, (13,), dtype=torch.uint8, generator=g)}  # later offsets unaligned
    tensors.update({f"w{i}": torch.randint(0, 256, (2000 + 4133 * i,), dtype=torch.uint8, generator=g)
                    for i in range(8)})
    tensors["z"] = torch.randint(0, 256, (3 * DIRECT_ALIGN + 77,), dtype=torch.uint8, generator=g)
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    assert path.stat().st_size % DIRECT_ALIGN != 0
    header = read_header(path)
    assert any(loc.offset_bytes % 512 for loc in header.values())
    direct = files_mod.open_direct(str(path))
    if direct is None:
        pytest.skip("this file system refuses O_DIRECT")
    direct_reads = []  # per read, whether it went through an O_DIRECT descriptor
    real = files_mod._pread_all
    monkeypatch.setattr(files_mod, "_pread_all", lambda fd, off, dst: (
        direct_reads.append(bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)), real(fd, off, dst)))
    names = sorted(tensors, reverse=True)  # weight order is not file order
    locs = [header[n] for n in names]
    store = HostStore.for_sources(locs)
    for loc, off in zip(locs, store.offsets):
        assert (off - loc.offset_bytes) % (DIRECT_ALIGN if loc.nbytes >= 20000 else 512) == 0
    assert any(loc.nbytes >= 20000 for loc in locs) and any(loc.nbytes < 20000 for loc in locs)
    store.fill_in_background(locs, threads=3)
    for n, loc in zip(names, locs):
        out = torch.empty(loc.nbytes, dtype=torch.uint8)
        store.read_into(names.index(n), out)
        assert torch.equal(out, tensors[n]), n
    store.wait_all()
    store.close()
    assert any(direct_reads) and not all(direct_reads)
    fd = os.open(path, os.O_RDONLY)
    try:
        loc = header["z"]
        dst = store_mod.page_aligned_bytes(loc.nbytes + 8)[8:]  # off the device's memory alignment: refused
        pread_into(fd, loc.offset_bytes, memoryview(dst.numpy()), direct)
        assert torch.equal(dst, tensors["z"])
    finally:
        os.close(fd)
        os.close(direct)
    os.truncate(path, header["w3"].offset_bytes + 100)
    store = HostStore.for_sources(locs)
    store.fill_in_background(locs, threads=2)
    with pytest.raises(flashmem.FlashmemError, match="reading the weights from storage failed"):
        store.wait_all()
    store.close()
