"""`flashmem.from_pretrained`: a Hugging Face-style model folder (config.json plus *.safetensors),
built on the meta device and streamed from its files without a full copy in RAM.

On CUDA every weight is read once from the files into pinned host memory, on several threads in the
background, while the first call (the trace) already runs: a weight it needs first is waited for, so
storage reads overlap compute from the first op. On the CPU the weights stay in the files and are read
(or mapped) as the plan says, so RAM holds no more than the budget.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import BadModelFolder
from .files import TensorLocation, convert_pickles, index_folder, pickle_checkpoints
from .split import Split, row_embeddings, sub_location
from .store import FileStore, HostStore, StagedStore
from .build import build, default_cache_dir
from .streamed import StreamedModel
from .trace import ModelWeights


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise BadModelFolder(f"config.json names architectures {getattr(config, 'architectures', None)!r}, none of "
                         f"which transformers {transformers.__version__} provides; build the model yourself "
                         f"and use flashmem.stream(model, ...)")


def build_on_meta(path: Path, dtype: torch.dtype | None, trust_remote_code: bool = False) -> nn.Module:
    """The model of a folder with its parameters on the meta device (buffers real, on the CPU)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise BadModelFolder(f"{path} has no config.json; a model folder holds config.json and *.safetensors")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = _model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype) if dtype is not None else cls._from_config(config)
    model.tie_weights()  # tied parameters (an LM head on the embedding) become one, as from_pretrained does
    return model.eval()


def _file_dtype(locations) -> torch.dtype | None:
    for loc in locations.values():
        if loc.dtype.is_floating_point:
            return loc.dtype
    return None


def from_pretrained(path: str | Path, budget, device: str = "cpu", example_inputs: tuple | None = None,
                    example_kwargs: dict | None = None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, planner: str = "simple",
                    cache_dir: str | Path | None = None, allow_pickle: bool = False,
                    debug=None, cpu_reads: str = "auto", host_budget=None, split_bytes=None,
                    lazy_trace: bool = False, cuda_graphs: bool = False) -> StreamedModel:
    """Stream the model in folder `path` under `budget` on `device`.

    example_inputs default to 8 token ids for a model with a vocabulary. `dtype` defaults to the files'
    floating dtype. A model folder is untrusted input: `trust_remote_code` stays off unless you turn it on,
    and pickle checkpoints (.bin, .pt) are refused unless `allow_pickle=True`, which loads them with
    `torch.load(weights_only=True)` into a safetensors copy under ~/.cache/flashmem/converted.
    `cpu_reads` is as for `flashmem.stream`. `host_budget` (CUDA): the weights stay in the folder's files
    and each call reads what it streams through a pinned staging ring of this size, so a model larger than
    the machine's RAM runs; without it, the weights are read once into pinned host memory.
    `split_bytes` is as for `flashmem.stream`; a split layer's blocks are read from the original's rows in
    the files, and a table read by rows is read from its file (only the rows a call names).
    `lazy_trace=True` returns at once (weights still being read in the background on CUDA) and traces at
    the first call, whose output is the trace's: from storage to a first output takes one forward.
    `cuda_graphs` is as for `flashmem.stream`.
    """
    path = Path(path)
    if allow_pickle and not list(path.glob("*.safetensors")) and pickle_checkpoints(path):
        path = convert_pickles(path, default_cache_dir().parent / "converted")
    locations = index_folder(path)
    dtype = dtype or _file_dtype(locations)
    model = build_on_meta(path, dtype, trust_remote_code)
    if example_inputs is None and example_kwargs is None and not lazy_trace:
        vocab = getattr(model.config, "vocab_size", None)
        if vocab is None:
            raise BadModelFolder("pass example_inputs: flashmem traces the model with one real input")
        example_inputs = (torch.arange(8).remainder(vocab).unsqueeze(0),)

    split: list[Split] = []

    def on_split(done: Split) -> None:
        split.append(done)
        for name, emb in row_embeddings(model):
            emb.use_file(_locate(done.tables[name], locations, name + ".weight"))

    def source(mw: ModelWeights, tensors, device, host_budget_bytes=None):
        # Each weight comes from the files; a buffer the files lack (non-persistent) from the model itself.
        found = []
        for w, t in zip(mw.weights, tensors):
            names = [f"{m}.{a}" if m else a for m, a in w.slots]
            loc = next((locations[n] for n in names if n in locations), None)
            rows = next((split[0].slices[n] for n in names if split and n in split[0].slices), None)
            if loc is None and rows is not None:  # a block of a split layer: rows of the original's bytes
                loc = sub_location(_locate(rows.originals, locations, w.name), rows)
            if loc is None:
                if w.is_buffer and t.device.type != "meta":
                    found.append(t)
                    continue
                raise BadModelFolder(f"weight {w.name!r} (shape {w.shape}) is in none of the safetensors files of "
                                     f"{path}; the folder is incomplete or for another model")
            if loc.shape != w.shape:
                raise BadModelFolder(f"weight {w.name!r} has shape {loc.shape} in {Path(loc.path).name} but the "
                                     f"model built from config.json expects {w.shape}; the config and the "
                                     f"weights are for different models")
            if loc.dtype != w.dtype:
                raise BadModelFolder(f"weight {w.name!r} is {loc.dtype} in {Path(loc.path).name} but the model "
                                     f"was built in {w.dtype}; pass dtype={loc.dtype}")
            found.append(loc)
        if host_budget_bytes is not None:
            return StagedStore(FileStore.spill(found, [w.name for w in mw.weights]), host_budget_bytes)
        if device.type == "cuda":  # read in the background: the trace (the first call) starts at once
            store = HostStore.for_sources(found)
            store.fill_in_background(found)
            return store
        store = FileStore.spill(found, [w.name for w in mw.weights])
        try:
            store.read_ahead()  # a cold start: the kernel reads ahead while the trace computes
        except OSError:
            pass
        return store

    return build(model, budget, device, example_inputs, example_kwargs, source=source, planner=planner,
                 cache_dir=cache_dir, eager_store=True, debug=debug, cpu_reads=cpu_reads,
                 host_budget=host_budget, split_bytes=split_bytes, on_split=on_split, lazy_trace=lazy_trace,
                 cuda_graphs=cuda_graphs)


def _locate(names: tuple[str, ...], locations: dict[str, TensorLocation], what: str) -> TensorLocation:
    loc = next((locations[n] for n in names if n in locations), None)
    if loc is None:
        raise BadModelFolder(f"weight {what!r} (from {', '.join(names)}) is in none of the folder's safetensors "
                             f"files; the folder is incomplete or for another model")
    return loc
