"""Safetensors files on storage: where each tensor's bytes lie, checked against the files' sizes.

flashmem reads weights straight into its own buffers (pinned host memory on CUDA, the RAM arena on the
CPU), so it needs each tensor's byte range rather than a tensor: the safetensors header (8-byte
little-endian length, then JSON) gives it. Writing uses the safetensors library itself.
"""
from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BadModelFolder

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorLocation:
    """One tensor's bytes in one safetensors file."""
    path: str
    offset_bytes: int  # from the start of the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorLocation]:
    """Locations of every tensor in one safetensors file, validated against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadModelFolder(f"{path} is {size} bytes, too short to be a safetensors file; "
                                 f"re-download or re-convert it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100 * 2**20:
            raise BadModelFolder(f"{path}: header length {header_len} does not fit in the file's {size} "
                                 f"bytes; the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise BadModelFolder(f"{path}: the safetensors header is not valid JSON ({err}); "
                                 f"the file is corrupted") from None
    data_start = 8 + header_len
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry.get("dtype"))
        if dtype is None:
            raise BadModelFolder(f"{path}: tensor {name!r} has dtype {entry.get('dtype')!r}, which flashmem "
                                 f"does not stream; supported: {', '.join(_DTYPES)}")
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * dtype.itemsize
        if end - begin != nbytes:
            raise BadModelFolder(f"{path}: tensor {name!r} spans {end - begin} bytes but shape {shape} "
                                 f"of {dtype} needs {nbytes}; the file is corrupted")
        if data_start + end > size:
            raise BadModelFolder(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                                 f"{size} bytes; the file is truncated, re-download it")
        out[name] = TensorLocation(str(path), data_start + begin, nbytes, dtype, shape)
    return out


def index_folder(folder: Path) -> dict[str, TensorLocation]:
    """Locations of every tensor of a model folder (one model.safetensors or an index of shards)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = []
        for shard in sorted(set(weight_map.values())):
            shard_path = (folder / shard).resolve()
            if folder.resolve() not in shard_path.parents:
                raise BadModelFolder(f"{index} names shard {shard!r}, which lies outside the model folder; "
                                     f"refusing to read it")
            files.append(shard_path)
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        pickles = pickle_checkpoints(folder)
        if pickles:
            raise BadModelFolder(f"{', '.join(p.name for p in pickles)} in {folder} are pickle checkpoints, which "
                                 f"flashmem does not load by default (unpickling can run code from the file); "
                                 f"convert them to safetensors, or pass allow_pickle=True to load them with "
                                 f"torch.load(weights_only=True)")
        raise BadModelFolder(f"no *.safetensors files in {folder} (found: {', '.join(found) or 'nothing'}); "
                             f"flashmem streams safetensors only; convert the checkpoint with "
                             f"`model.save_pretrained(folder, safe_serialization=True)`")
    out: dict[str, TensorLocation] = {}
    for path in files:
        if not path.exists():
            raise BadModelFolder(f"shard {path.name} named by the index is missing from {folder}")
        out.update(read_header(path))
    return out


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def pickle_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint files in pickle format (PyTorch's .bin/.pt/.pth/.ckpt) in a folder."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix in PICKLE_SUFFIXES) if Path(folder).is_dir() else []


def convert_pickles(folder: Path, cache_root: Path) -> Path:
    """A safetensors copy of a folder's pickle checkpoints, loaded with `torch.load(weights_only=True)` (which
    refuses anything but tensors and plain containers), kept in `cache_root` and reused while the files are
    unchanged. Returns the folder to read instead: the original config plus model.safetensors."""
    import hashlib
    import pickle
    import shutil

    from safetensors.torch import save_file

    pickles = pickle_checkpoints(folder)
    stamp = hashlib.sha256("|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                    for p in pickles).encode()).hexdigest()[:24]
    target = cache_root / stamp
    if (target / "model.safetensors").exists():
        return target
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, tuple]] = set()
    for path in pickles:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            raise BadModelFolder(f"{path} does not load as weights only ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0]}); flashmem will not unpickle anything else") from None
        if not isinstance(state, dict):
            raise BadModelFolder(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                continue
            key = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), tuple(t.shape))
            if key in seen:
                continue  # a tied tensor: the model ties it again when built
            seen.add(key)
            tensors[name] = t.contiguous()
    staging = cache_root / f".{stamp}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(tensors, str(staging / "model.safetensors"))
    for extra in folder.iterdir():
        if extra.suffix == ".json" and extra.name != "model.safetensors.index.json":
            shutil.copy(extra, staging / extra.name)
    staging.rename(target)
    return target


DIRECT_ALIGN = 4096  # where an O_DIRECT read starts and ends in the file: the block of any ext4/xfs device
_libc = ctypes.CDLL(None, use_errno=True)  # ctypes releases the GIL around each call
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)


def pread_into(fd: int, offset_bytes: int, dst: memoryview, direct_fd: int | None = None) -> None:
    """Fill `dst` from file `fd` at `offset_bytes`, looping over short reads.

    With `direct_fd` (the same file opened with O_DIRECT), the part of the range between DIRECT_ALIGN
    boundaries of the file is read through it: the storage writes straight into `dst`, with no copy out of the
    page cache. The head and tail around that part go through `fd`, and so does the part itself where the
    device refuses it (EINVAL: `dst` there is not on the device's memory alignment, 512 bytes on virtio-blk).
    """
    if direct_fd is not None:
        a = -offset_bytes % DIRECT_ALIGN
        b = (offset_bytes + len(dst)) // DIRECT_ALIGN * DIRECT_ALIGN - offset_bytes
        if b > a:
            try:
                _pread_all(direct_fd, offset_bytes + a, dst[a:b])
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                _pread_all(fd, offset_bytes + a, dst[a:b])
            _pread_all(fd, offset_bytes, dst[:a])
            _pread_all(fd, offset_bytes + b, dst[b:])
            return
    _pread_all(fd, offset_bytes, dst)


def _pread_all(fd: int, offset_bytes: int, dst: memoryview) -> None:
    done = 0
    total = len(dst)
    while done < total:
        n = os.preadv(fd, [dst[done:]], offset_bytes + done)
        if n <= 0:
            raise BadModelFolder(f"read of {total} bytes at offset {offset_bytes} stopped after {done} bytes; "
                                 f"the file is truncated")
        done += n


def open_direct(path: str) -> int | None:
    """`path` opened with O_DIRECT for reading, or None where the file system refuses it (tmpfs) or the file
    is mostly in the page cache already (a warm start: reading it from there is ten times faster than from
    storage, and O_DIRECT would bypass it)."""
    try:
        if not hasattr(os, "O_DIRECT") or cached_fraction(path) >= 0.5:
            return None
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None


def cached_fraction(path: str) -> float:
    """The fraction of the file's pages in the page cache (mincore over a read-only mapping; 1.0 where it
    cannot be told, so that the caller keeps to the page cache)."""
    size = os.path.getsize(path)
    if size == 0:
        return 1.0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    try:
        mapped = np.frombuffer(mm, dtype=np.uint8)
        vec = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
        ok = _libc.mincore(mapped.ctypes.data, size, vec.ctypes.data) == 0
        del mapped
        return float((vec & 1).mean()) if ok else 1.0
    finally:
        mm.close()
