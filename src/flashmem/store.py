"""Where the weights live between uses: the source that loads copy from.

- `HostStore` (CUDA): every weight once, in one exact-size host buffer registered with CUDA as pinned
  memory (PyTorch's pinned allocator would round a 5.6 GB request up to 8 GB).
- `FileStore` (CPU): every weight in safetensors files on storage, read with `pread` into the RAM arena.

Both offer `read_into(weight, dst)`, a synchronous copy used by the trace and for resident weights.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import FlashmemError
from .files import TensorLocation, pread_into, read_header
from .units import align_up, fmt_bytes

HOST_ALIGNMENT = 512


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor."""
    return t.reshape(-1).view(torch.uint8)


class HostStore:
    """All weights in one pinned host buffer, each at a `HOST_ALIGNMENT`-aligned offset."""

    def __init__(self, nbytes_per_weight: list[int]):
        self.offsets = []
        total = 0
        for n in nbytes_per_weight:
            self.offsets.append(total)
            total += align_up(n, HOST_ALIGNMENT)
        self.nbytes = nbytes_per_weight
        self.total_bytes = total
        self.buffer = torch.empty(max(total, 1), dtype=torch.uint8)
        self._registered = False
        if torch.cuda.is_available() and total > 0:
            err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), total, 0)
            if int(err) != 0:
                raise FlashmemError(f"could not pin {fmt_bytes(total)} of host memory for the weights "
                                    f"(cudaHostRegister error {int(err)}); free host memory or lower the "
                                    f"model's size")
            self._registered = True

    def view(self, weight: int) -> torch.Tensor:
        off = self.offsets[weight]
        return self.buffer[off:off + self.nbytes[weight]]

    def fill_from_tensor(self, weight: int, t: torch.Tensor) -> None:
        self.view(weight).copy_(as_bytes(t.detach().contiguous()))

    def fill_from_file(self, weight: int, loc: TensorLocation) -> None:
        fd = os.open(loc.path, os.O_RDONLY)
        try:
            pread_into(fd, loc.offset_bytes, memoryview(self.view(weight).numpy()))
        finally:
            os.close(fd)

    def read_into(self, weight: int, dst: torch.Tensor) -> None:
        dst.copy_(self.view(weight))

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
            self._registered = False
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


class FileStore:
    """Weights in safetensors files; `read_into` preads one weight into a CPU buffer."""

    def __init__(self, locations: list[TensorLocation], *, owned_dir: tempfile.TemporaryDirectory | None = None):
        self.locations = locations
        self.nbytes = [loc.nbytes for loc in locations]
        self.total_bytes = sum(self.nbytes)
        self._fds: dict[str, int] = {}
        for loc in locations:
            if loc.path not in self._fds:
                self._fds[loc.path] = os.open(loc.path, os.O_RDONLY)
        self._owned_dir = owned_dir

    @classmethod
    def spill(cls, sources: list[torch.Tensor | TensorLocation], names: list[str]) -> "FileStore":
        """A store over `sources`: locations in files stay where they are; tensors are written to a
        private safetensors file first, so RAM can drop them."""
        from safetensors.torch import save_file

        tensors = {n: t.detach().contiguous() for n, t in zip(names, sources) if isinstance(t, torch.Tensor)}
        if not tensors:
            return cls(list(sources))
        owned = tempfile.TemporaryDirectory(prefix="flashmem-spill-")
        path = Path(owned.name) / "weights.safetensors"
        save_file(tensors, str(path))
        header = read_header(path)
        return cls([header[n] if n in tensors else s for n, s in zip(names, sources)], owned_dir=owned)

    def read_into(self, weight: int, dst: torch.Tensor) -> None:
        self.read_into_view(weight, memoryview(dst.numpy()))

    def read_into_view(self, weight: int, dst: memoryview) -> None:
        loc = self.locations[weight]
        pread_into(self._fds[loc.path], loc.offset_bytes, dst)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
