"""Split: ops whose weights are too large for the budget become smaller ones, before the trace.

`split_model(model, max_bytes)` rewrites the model in place, where `split_bytes=` asks for it:

- an `nn.Linear` (that type exactly: a subclass may be read other than by calling it) whose weight is
  larger than `max_bytes` becomes a `SplitLinear`, whose children are
  `nn.Linear`s over consecutive blocks of its output features (rows of the weight: contiguous in memory and
  in the model's files). Each child is an op of its own, so its weight streams on its own: a matrix larger
  than the budget runs in pieces, and the pieces' loads spread over several steps. A block's matrix product
  may pick other kernels than the whole one's, so outputs can differ in the last bits; that is why
  splitting is asked for, never done by default.
- an `nn.Embedding` whose table is larger than `max_bytes` becomes a `RowEmbedding`: the table stays on
  the host (a tensor in RAM, or mapped from a file, so that only the rows read are paged in) and each call
  gathers the rows its ids name there and copies just those to the device. A gather is exact: outputs are
  bit-identical. Its output counts as activations, as the embedding's output always did.

`Split` records what was done: for every new weight, the original weight and rows it is a view of (so a
model built on the meta device finds its bytes in the original's file), and the embeddings made.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import BadModelFolder, FlashmemError
from .files import TensorLocation, pread_into, read_header
from .units import fmt_bytes

# Rows per block are a multiple of this (where a block holds that many), for kernel-friendly matrix widths.
ROW_MULTIPLE = 64


@dataclass(frozen=True)
class RowSlice:
    """A weight that is rows [row_begin, row_end) of an original weight of the model."""
    originals: tuple[str, ...]  # the original weight's names (module and attribute; several where it is tied)
    row_begin: int
    row_end: int


@dataclass(frozen=True)
class Split:
    """What `split_model` did."""
    max_bytes: int
    slices: dict[str, RowSlice]  # new weight name -> the original rows it holds
    tables: dict[str, tuple[str, ...]]  # RowEmbedding module -> the names of the table it reads
    linears: tuple[str, ...]  # modules that became SplitLinear
    embeddings: tuple[str, ...]  # modules that became RowEmbedding

    def describe(self) -> str:
        parts = []
        if self.linears:
            parts.append(f"{len(self.linears)} linear layers in blocks of at most {fmt_bytes(self.max_bytes)} "
                         f"({', '.join(self.linears)})")
        if self.embeddings:
            parts.append(f"{len(self.embeddings)} embedding tables read by rows on the host "
                         f"({', '.join(self.embeddings)})")
        return "; ".join(parts) if parts else "nothing split"


def sub_location(loc: TensorLocation, rows: RowSlice) -> TensorLocation:
    """The location of rows `rows` of the tensor at `loc` (rows are contiguous in a safetensors file)."""
    row_bytes = loc.nbytes // loc.shape[0]
    n_rows = rows.row_end - rows.row_begin
    return TensorLocation(loc.path, loc.offset_bytes + rows.row_begin * row_bytes, n_rows * row_bytes, loc.dtype,
                          (n_rows,) + tuple(loc.shape[1:]))


class SplitLinear(nn.Module):
    """`nn.Linear` as blocks of output features: `parts[k]` computes features `bounds[k]:bounds[k + 1]`,
    written into one output (no second copy of it, as a concatenation would make)."""

    def __init__(self, parts: list[nn.Linear], bounds: list[int]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.bounds = tuple(bounds)
        self.in_features = parts[0].in_features
        self.out_features = bounds[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.parts[0](x)
        out = first.new_empty(first.shape[:-1] + (self.out_features,))
        out[..., self.bounds[0]:self.bounds[1]] = first
        del first
        for k in range(1, len(self.parts)):
            out[..., self.bounds[k]:self.bounds[k + 1]] = self.parts[k](x)
        return out

    def __getattr__(self, name: str):
        if name in ("weight", "bias"):
            raise AttributeError(f"this linear layer was split by split_bytes into {len(self.parts)} blocks of "
                                 f"output features; its {name} is theirs (parts[k].{name}, rows "
                                 f"bounds[k]:bounds[k + 1]). Code that reads the whole {name} needs split_bytes "
                                 f"above the layer's size")
        return super().__getattr__(name)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, parts={len(self.parts)}"


class RowEmbedding(nn.Module):
    """`nn.Embedding` whose table stays on the host: each call gathers the rows its ids name there and
    copies them to the ids' device. The table is a tensor in RAM (`weight`, a plain attribute, not a
    parameter, so flashmem neither streams nor budgets it on the device), or rows of a file that each
    call `pread`s (a mapping would not do: the kernel maps whole folios around each row read, 25 MiB of a
    32 MiB table for 32 random rows, measured)."""

    def __init__(self, table: torch.Tensor, padding_idx: int | None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = table.shape
        self.padding_idx = padding_idx
        self.weight = table  # in RAM; meta where the rows come from a file (`use_file`)
        self._file: tuple[int, int, int] | None = None  # (fd, offset of row 0, bytes a row)
        self._tmp: tempfile.TemporaryDirectory | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        host_ids = ids.to("cpu")  # the call's first sync: nothing of this call is queued yet
        if self._file is None:
            if self.weight.device.type == "meta":
                raise FlashmemError("this RowEmbedding has no table (its model was built on the meta device); "
                                    "stream its folder with flashmem.from_pretrained")
            return nn.functional.embedding(host_ids, self.weight, self.padding_idx).to(ids.device)
        return nn.functional.embedding(*self._read_rows(host_ids)).to(ids.device)

    def _read_rows(self, host_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions into the rows read, the rows): each distinct id's row read once from the file."""
        distinct, inverse = torch.unique(host_ids, return_inverse=True)
        if distinct.numel() and (distinct[0] < 0 or distinct[-1] >= self.num_embeddings):
            raise IndexError(f"token id {int(distinct[0] if distinct[0] < 0 else distinct[-1])} is outside the "
                             f"embedding table's {self.num_embeddings} rows")
        fd, base, row_bytes = self._file
        rows = torch.empty((distinct.numel(), self.embedding_dim), dtype=self.weight.dtype)
        raw = memoryview(rows.view(torch.uint8).numpy()).cast("B")
        for k, i in enumerate(distinct.tolist()):
            pread_into(fd, base + i * row_bytes, raw[k * row_bytes:(k + 1) * row_bytes])
        return inverse, rows

    def use_file(self, loc: TensorLocation) -> None:
        """Read the table's rows from their file at each call, so RAM never holds the table."""
        want = (self.num_embeddings, self.embedding_dim)
        if tuple(loc.shape) != want or loc.dtype != self.weight.dtype:
            raise BadModelFolder(f"embedding table in {Path(loc.path).name} is {loc.dtype} of shape {loc.shape}, but "
                                 f"the model expects {self.weight.dtype} of shape {want}; the config and the "
                                 f"weights are for different models (or pass the files' dtype)")
        self.close()
        self._file = (os.open(loc.path, os.O_RDONLY), loc.offset_bytes, loc.nbytes // loc.shape[0])
        self.weight = torch.empty(want, dtype=loc.dtype, device="meta")

    def spill(self) -> None:
        """Move the table from RAM to a private file whose rows each call reads (a CPU budget, or a host
        budget, then holds none of it)."""
        from safetensors.torch import save_file

        tmp = tempfile.TemporaryDirectory(prefix="flashmem-rows-")
        path = Path(tmp.name) / "table.safetensors"
        save_file({"table": self.weight.detach().contiguous()}, str(path))
        self.use_file(read_header(path)["table"])
        self._tmp = tmp

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file[0])
            self._file = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows gathered on the host"


def _blocks(rows: int, row_bytes: int, max_bytes: int) -> list[int]:
    """Bounds of blocks of rows of at most `max_bytes` each (rounded to ROW_MULTIPLE rows where possible)."""
    per_block = max(max_bytes // row_bytes, 1)
    if per_block >= ROW_MULTIPLE:
        per_block = per_block // ROW_MULTIPLE * ROW_MULTIPLE
    return list(range(0, rows, per_block)) + [rows]


def _split_linear(lin: nn.Linear, max_bytes: int) -> SplitLinear:
    w = lin.weight
    bounds = _blocks(w.shape[0], w[0].numel() * w.element_size(), max_bytes)
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        part = nn.Linear(lin.in_features, b - a, bias=lin.bias is not None, device="meta", dtype=w.dtype)
        part.weight = nn.Parameter(w.detach()[a:b], requires_grad=False)
        if lin.bias is not None:
            part.bias = nn.Parameter(lin.bias.detach()[a:b], requires_grad=False)
        parts.append(part)
    return SplitLinear(parts, bounds)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def split_model(model: nn.Module, max_bytes: int) -> Split:
    """Split, in place, the linear layers and embedding tables of `model` larger than `max_bytes` (see the
    module's docstring). Weights tied to a split one (an LM head on the embedding table) are found by
    identity: each view keeps pointing at the same bytes."""
    if max_bytes <= 0:
        raise FlashmemError(f"split_bytes must be positive (it was {max_bytes} B); pass a size such as '64MiB'")
    names: dict[int, tuple[str, ...]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for attr, p in module.named_parameters(recurse=False):
            names[id(p)] = names.get(id(p), ()) + (f"{mod_name}.{attr}" if mod_name else attr,)
    slices: dict[str, RowSlice] = {}
    tables: dict[str, tuple[str, ...]] = {}
    linears, embeddings = [], []
    # Exact types only: a subclass may be used other than by calling it (nn.MultiheadAttention reads its
    # out_proj's weight, a NonDynamicallyQuantizableLinear, without calling out_proj).
    targets = [(name, m) for name, m in model.named_modules()
               if (type(m) is nn.Linear and _nbytes(m.weight) > max_bytes)
               or (type(m) is nn.Embedding and _nbytes(m.weight) > max_bytes and m.max_norm is None)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            new = _split_linear(module, max_bytes)
            for k, (a, b) in enumerate(zip(new.bounds, new.bounds[1:])):
                slices[f"{name}.parts.{k}.weight"] = RowSlice(names[id(module.weight)], a, b)
                if module.bias is not None:
                    slices[f"{name}.parts.{k}.bias"] = RowSlice(names[id(module.bias)], a, b)
            linears.append(name)
        else:
            new = RowEmbedding(module.weight.detach(), module.padding_idx)
            tables[name] = names[id(module.weight)]
            embeddings.append(name)
        setattr(parent, attr, new)
    return Split(max_bytes, slices, tables, tuple(linears), tuple(embeddings))


def row_embeddings(model: nn.Module) -> list[tuple[str, RowEmbedding]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RowEmbedding)]
