"""Where the weights live between uses: the source that loads copy from.

- `HostStore` (CUDA): every weight once, in one exact-size host buffer registered with CUDA as pinned
  memory (PyTorch's pinned allocator would round a 5.6 GB request up to 8 GB); filled from files on
  several threads and pinned chunk by chunk as the reads land.
- `StagedStore` (CUDA with a host budget): the weights stay in their files; each call reads what it
  streams into a pinned staging ring of the host budget's size, and copies it onto the device from there.
- `FileStore` (CPU): every weight in safetensors files on storage, read with `pread` into the RAM arena.
- `MappedFiles` (CPU): the same files mapped copy-on-write, so a weight is used where the page cache holds
  it, without a copy; it is brought in (`hold`) and dropped (`unhold`) page by page.

Both stores offer `read_into(weight, dst)`, a synchronous copy used by the trace and for resident weights.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch

from .errors import CorruptWeights, FlashmemError
from .files import DIRECT_ALIGN, TensorLocation, open_direct, pread_into, read_header
from .units import align_up, fmt_bytes

HOST_ALIGNMENT = 512
PAGE_BYTES = 4096  # where a chunk of the host store starts: chunks are pinned one by one
PIN_CHUNK_BYTES = 256 << 20  # a background-filled host store is pinned in chunks of about this size
READ_PIECE_BYTES = 16 << 20  # the size of a single read of a background fill
# A weight of at least this many bytes lies at an offset congruent to its file offset modulo DIRECT_ALIGN (a
# page), so that its O_DIRECT reads land on whole pages: 1.52 GB/s against 1.30 when congruent modulo
# HOST_ALIGNMENT only (each 4 KiB block then straddles two pages; benchmarks/read_rate.py, H200 host, 2 GB
# cold, median of 3). Smaller weights keep to HOST_ALIGNMENT, so that runs of them copied as one stay whole.
PAGE_CONGRUENT_BYTES = 1 << 20


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor."""
    return t.reshape(-1).view(torch.uint8)


def page_aligned_bytes(nbytes: int) -> torch.Tensor:
    """A host uint8 tensor of `nbytes` (at least 1) whose storage starts on a page: an anonymous mapping.
    Registered with CUDA from its start, PyTorch then sees it as pinned (`is_pinned` asks about the
    storage's first byte), which a copy captured into a CUDA graph requires."""
    return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=torch.uint8)


class HostStore:
    """All weights in one host buffer registered with CUDA as pinned memory, in chunks (runs of whole weights
    of about PIN_CHUNK_BYTES) that start on a page. Each weight lies at an offset congruent to its file
    offset (`file_offsets`) modulo `HOST_ALIGNMENT`, or a page for one of PAGE_CONGRUENT_BYTES or more, so
    that the aligned middle of its bytes in the file lands on an aligned address, as an O_DIRECT read needs
    (512 bytes on virtio-blk). Without file offsets (a model's own tensors) every weight is aligned to
    HOST_ALIGNMENT alone, as the arena is on CUDA: weights that follow each other in both then lie at the
    same distances, and the CUDA mover copies runs of them as one copy (page padding after each small
    weight kept about a third of ViT-L's and Whisper's neighbours from merging).

    `pin_now=True` pins the whole buffer at once (a model's own tensors are copied in right after). A store
    filled from files in the background (`fill_in_background`) is pinned chunk by chunk instead, each chunk
    just before its reads, so that pinning overlaps the storage reads rather than delaying the first of them."""

    def __init__(self, nbytes_per_weight: list[int], pin_now: bool = True, file_offsets: list[int] | None = None):
        self.offsets: list[int] = []
        self.chunk_of: list[int] = []  # per weight, its chunk
        self.chunk_starts: list[int] = []
        total = 0
        for w, n in enumerate(nbytes_per_weight):
            if not self.chunk_starts or total - self.chunk_starts[-1] >= PIN_CHUNK_BYTES:
                total = align_up(total, PAGE_BYTES)
                self.chunk_starts.append(total)
            modulus = DIRECT_ALIGN if file_offsets and n >= PAGE_CONGRUENT_BYTES else HOST_ALIGNMENT
            shift = file_offsets[w] % modulus if file_offsets else 0
            total = align_up(total - shift, modulus) + shift
            self.offsets.append(total)
            self.chunk_of.append(len(self.chunk_starts) - 1)
            total += n
        total = align_up(total, PAGE_BYTES)
        self.nbytes = nbytes_per_weight
        self.total_bytes = total
        # page-aligned, so that chunks registered one by one never share a page
        self.buffer = page_aligned_bytes(total)
        self._pinned: list[int] = []  # buffer offsets of the registered ranges
        self._pin_lock = threading.Lock()
        if pin_now:
            self._pin(0, total)

    def _pin(self, offset: int, nbytes: int) -> None:
        if not torch.cuda.is_available() or nbytes <= 0:
            return
        err = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr() + offset, nbytes, 0)
        if int(err) != 0:
            raise FlashmemError(f"could not pin {fmt_bytes(nbytes)} of host memory for the weights "
                                f"(cudaHostRegister error {int(err)}); free host memory or lower the "
                                f"model's size")
        with self._pin_lock:
            self._pinned.append(offset)

    def view(self, weight: int) -> torch.Tensor:
        off = self.offsets[weight]
        return self.buffer[off:off + self.nbytes[weight]]

    def fill_from_tensor(self, weight: int, t: torch.Tensor) -> None:
        self.view(weight).copy_(as_bytes(t.detach().contiguous()))

    @classmethod
    def for_sources(cls, sources: list) -> "HostStore":
        """An unpinned store laid out for `sources` (TensorLocations, or tensors), to `fill_in_background`."""
        return cls([s.nbytes for s in sources], pin_now=False,
                   file_offsets=[s.offset_bytes if isinstance(s, TensorLocation) else 0 for s in sources])

    def fill_in_background(self, sources: list, threads: int = 4, preparers: int | None = None) -> None:
        """Read every weight (a TensorLocation, or a tensor) into the buffer on `threads` threads, in weight
        order, in pieces of about READ_PIECE_BYTES (a large weight is read by every thread at once).
        `read_into` waits for its weight, so a model's first ops run while later weights are still being read
        (a cold start overlaps storage with compute); `wait_all` waits for every read and every pin.

        Two things keep the fill at the storage's rate. Helper threads (`preparers`) prepare the chunks in
        order, ahead of the readers, which wait for their chunk: they fault the pages in
        (MADV_POPULATE_WRITE) and on CUDA pin the chunk (cudaHostRegister); the readers then neither fault
        pages in nor contend with pinning. And the middle of each piece, between DIRECT_ALIGN boundaries of
        the file, is read with O_DIRECT (`files.pread_into`): the storage writes into the
        buffer, without a copy out of the page cache; a file mostly in the page cache is read through it.
        Measured (benchmarks/read_rate.py, H200 host, 4 GB cold, 16 MiB pieces on 4 threads, median of 3):
        1.51 GB/s raw into a prefaulted buffer; pinning each chunk after its reads, by the reader that
        completes it (the fill as it was), 1.30 (0.86x); pinning ahead 1.40 (0.92x); pinning ahead with
        O_DIRECT of whole page-aligned spans 1.63 (1.07x). This fill with one preparer (2 GB, median of 3):
        1.52 GB/s (0.94x of 1.63 raw) with page-congruent weights, 1.30 with weights congruent modulo 512
        only. With four (benchmarks/bench_cold.py, GPT-Neo-2.7B, 1.46 GB/s storage): the first output at 1.06x
        of the storage's time cold, and a warm start 2.2x faster than with one."""
        self._ready = [threading.Event() for _ in sources]
        self._fill_error: BaseException | None = None
        chunk_ready = [threading.Event() for _ in self.chunk_starts]
        chunk_end = self.chunk_starts[1:] + [self.total_bytes]
        pieces = []  # (weight, start, end) in weight order
        for w, src in enumerate(sources):
            n = self.nbytes[w]
            if isinstance(src, torch.Tensor) or n <= READ_PIECE_BYTES:
                pieces.append((w, 0, n))
                continue
            # the first cut on a DIRECT_ALIGN boundary of the file, so that later pieces have no unaligned head
            first = align_up(src.offset_bytes + READ_PIECE_BYTES, DIRECT_ALIGN) - src.offset_bytes
            cuts = [0] + list(range(first, n, READ_PIECE_BYTES)) + [n]
            pieces.extend((w, a, b) for a, b in zip(cuts, cuts[1:]))
        left_in_weight = [0] * len(sources)
        for w, _, _ in pieces:
            left_in_weight[w] += 1
        cursor = iter(pieces)
        lock = threading.Lock()

        def fail(err: BaseException) -> None:  # surfaced by read_into / wait_all
            self._fill_error = err
            for ev in self._ready + chunk_ready:
                ev.set()

        cuda = torch.cuda.is_available()
        chunks = iter(enumerate(self.chunk_starts))

        def prepare() -> None:
            try:
                while True:
                    with lock:
                        c, start = next(chunks, (None, None))
                    if c is None or self._fill_error is not None:
                        return
                    # a hint: where the kernel lacks it, the reads (or the pinning) fault the pages in
                    _libc.madvise(self.buffer.data_ptr() + start, chunk_end[c] - start, _MADV_POPULATE_WRITE)
                    if cuda:
                        self._pin(start, chunk_end[c] - start)
                    chunk_ready[c].set()
            except BaseException as err:
                fail(err)

        def work() -> None:
            fds: dict[str, tuple[int, int | None]] = {}  # path -> (buffered fd, O_DIRECT fd or None)
            try:
                while True:
                    with lock:
                        piece = next(cursor, None)
                    if piece is None or self._fill_error is not None:
                        return
                    w, a, b = piece
                    chunk_ready[self.chunk_of[w]].wait()
                    if self._fill_error is not None:
                        return
                    src = sources[w]
                    if isinstance(src, torch.Tensor):
                        self.fill_from_tensor(w, src)
                    elif b > a:
                        if src.path not in fds:
                            fds[src.path] = (os.open(src.path, os.O_RDONLY), open_direct(src.path))
                        fd, direct_fd = fds[src.path]
                        dst = self.buffer[self.offsets[w] + a:self.offsets[w] + b]
                        pread_into(fd, src.offset_bytes + a, memoryview(dst.numpy()), direct_fd)
                    with lock:
                        left_in_weight[w] -= 1
                        weight_done = left_in_weight[w] == 0
                    if weight_done:
                        self._ready[w].set()
            except BaseException as err:
                fail(err)
            finally:
                for fd, direct_fd in fds.values():
                    os.close(fd)
                    if direct_fd is not None:
                        os.close(direct_fd)

        # By default on CUDA as many preparers as readers: one thread faults in and pins about 1.3 GB/s (H200
        # host), below the storage's rate cold and a twelfth of the page cache's warm. Without CUDA one,
        # beside readers that share few cores.
        if preparers is None:
            preparers = threads if cuda else 1
        self._fillers = [threading.Thread(target=prepare, name=f"flashmem-pin-{k}", daemon=True)
                         for k in range(preparers)] + [
            threading.Thread(target=work, name=f"flashmem-read-{k}", daemon=True) for k in range(threads)]
        for t in self._fillers:
            t.start()

    def _wait(self, weight: int) -> None:
        ready = getattr(self, "_ready", None)
        if ready is not None:
            ready[weight].wait()
            if self._fill_error is not None:
                raise FlashmemError(f"reading the weights from storage failed: {self._fill_error}") from self._fill_error

    def wait_all(self) -> None:
        """Until every weight is in the buffer (and the buffer pinned)."""
        for t in getattr(self, "_fillers", ()):
            t.join()
        if getattr(self, "_fill_error", None) is not None:
            raise FlashmemError(f"reading the weights from storage failed: {self._fill_error}") from self._fill_error

    def read_into(self, weight: int, dst: torch.Tensor) -> None:
        self._wait(weight)
        dst.copy_(self.view(weight))

    def close(self) -> None:
        for t in getattr(self, "_fillers", ()):
            t.join()
        with self._pin_lock:
            pinned, self._pinned = self._pinned, []
        for off in pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr() + off)
        self.buffer = torch.empty(0, dtype=torch.uint8)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: CUDA may already be gone
            pass


class StagedStore:
    """CUDA with a host budget: the weights stay in their files, and each call reads what it streams from
    storage into a pinned staging ring of `ring_bytes` (the host budget), from which it is copied onto the
    device. The host holds the ring and nothing more of the weights."""

    def __init__(self, files: "FileStore", ring_bytes: int):
        self.files = files
        self.nbytes = files.nbytes
        self.total_bytes = files.total_bytes
        self.ring_bytes = ring_bytes
        self.ring = page_aligned_bytes(ring_bytes)
        self._pinned = False
        if torch.cuda.is_available() and ring_bytes > 0:
            err = torch.cuda.cudart().cudaHostRegister(self.ring.data_ptr(), ring_bytes, 0)
            if int(err) != 0:
                raise FlashmemError(f"could not pin the {fmt_bytes(ring_bytes)} staging ring of the host budget "
                                    f"(cudaHostRegister error {int(err)}); free host memory or lower host_budget")
            self._pinned = True
        self._lock = threading.Lock()  # the ring is shared by synchronous reads; calls' reads are ordered

    def read_stage(self, weight: int, ring_offset: int) -> torch.Tensor:
        """Read `weight` from its file into the ring at `ring_offset`; returns that slice of the ring."""
        dst = self.ring[ring_offset:ring_offset + self.nbytes[weight]]
        self.files.read_into_view(weight, memoryview(dst.numpy()))
        return dst

    def read_into(self, weight: int, dst: torch.Tensor) -> None:
        """Synchronous (the trace, resident weights): through the ring, a ring's worth at a time."""
        flat = dst.reshape(-1)
        with self._lock:
            for a in range(0, self.nbytes[weight], self.ring_bytes):
                n = min(self.ring_bytes, self.nbytes[weight] - a)
                self.files.read_into_view(weight, memoryview(self.ring[:n].numpy()), start_bytes=a)
                flat[a:a + n].copy_(self.ring[:n])  # a synchronous copy: the ring is free again after it

    def check_unchanged(self) -> None:
        self.files.check_unchanged()

    def close(self) -> None:
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.ring.data_ptr())
            self._pinned = False
        self.ring = torch.empty(0, dtype=torch.uint8)
        self.files.close()

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
        self._crcs: dict[int, int] = {}
        self._stamps = {path: self._stamp(fd) for path, fd in self._fds.items()}

    def read_ahead(self, threads: int = 4, chunk_bytes: int = 16 * 2**20) -> bool:
        """Bring the files into the page cache on `threads` background threads (reads of `chunk_bytes`, in
        file order, several in flight: what storage needs to reach its rate) while the first call runs, if
        they take at most half of the memory available; True if started. The first call's own reads then
        find the page cache warm, or wait for the read in flight."""
        available = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
        if self.total_bytes > available // 2:
            return False
        jobs = iter([(fd, off) for fd in self._fds.values() for off in range(0, os.fstat(fd).st_size, chunk_bytes)])
        lock = threading.Lock()

        def work() -> None:
            sink = os.open(os.devnull, os.O_WRONLY)  # the kernel moves the bytes: no buffer in RSS
            try:
                while True:
                    with lock:
                        job = next(jobs, None)
                    if job is None or not self._fds:
                        return
                    os.sendfile(sink, job[0], job[1], chunk_bytes)
            except OSError:
                return  # only a hint: the call's own reads report failures
            finally:
                os.close(sink)

        self._readers = [threading.Thread(target=work, name=f"flashmem-readahead-{k}", daemon=True)
                         for k in range(threads)]
        for t in self._readers:
            t.start()
        return True

    @staticmethod
    def _stamp(fd: int) -> tuple[int, int]:
        st = os.fstat(fd)
        return st.st_size, st.st_mtime_ns

    def check_unchanged(self) -> None:
        """Refuse files whose size or modification time changed since they were opened."""
        for path, fd in self._fds.items():
            now = self._stamp(fd)
            if now != self._stamps[path]:
                was = self._stamps[path][0]
                how = "was truncated" if now[0] < was else "changed"
                raise FlashmemError(f"{path} {how} on storage while flashmem streams from it (it was {was} "
                                    f"bytes, now {now[0]}); restore the file and load the model again")

    def verify(self, weight: int, data) -> None:
        """Check `data` (a buffer of the weight's bytes just brought in) against the CRC-32 of the weight
        as first read from its file (taken on the first check)."""
        import zlib

        loc = self.locations[weight]
        if weight not in self._crcs:
            first = bytearray(loc.nbytes)
            pread_into(self._fds[loc.path], loc.offset_bytes, memoryview(first))
            self._crcs[weight] = zlib.crc32(first)
        got = zlib.crc32(data)
        if got != self._crcs[weight]:
            raise CorruptWeights(f"bytes {loc.offset_bytes}..{loc.offset_bytes + loc.nbytes} of {loc.path} "
                                 f"(a weight of shape {loc.shape}) differ from when they were first read "
                                 f"(CRC-32 {got:08x}, was {self._crcs[weight]:08x}); the file was rewritten or "
                                 f"the storage returns other data: restore the file and load the model again")

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

    def read_into_view(self, weight: int, dst: memoryview, start_bytes: int = 0) -> None:
        """Fill `dst` with the weight's bytes from `start_bytes` on."""
        loc = self.locations[weight]
        pread_into(self._fds[loc.path], loc.offset_bytes + start_bytes, dst)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for t in getattr(self, "_readers", ()):
            t.join()
        for fd in fds.values():
            os.close(fd)
        if self._owned_dir is not None:
            self._owned_dir.cleanup()
            self._owned_dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


PAGE_BYTES = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_WILLNEED = 3
_MADV_POPULATE_READ = 22  # Linux 5.14+: fault pages in now; fails (EFAULT) where a read would raise SIGBUS
_MADV_POPULATE_WRITE = 23  # the same, writable (anonymous memory about to be written)
_libc = ctypes.CDLL(None, use_errno=True)  # ctypes releases the GIL around each call
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


class MappedFiles:
    """The files of a `FileStore`, mapped copy-on-write (a weight is a view of the page cache's pages; a
    write to one would stay private), with the pages each weight spans counted, so that a page is dropped
    from the process (MADV_DONTNEED) once no held weight spans it, and RSS follows the plan's budget.

    `hold(weight)` makes its pages resident (MADV_POPULATE_READ, on the caller's thread, the GIL released);
    `unhold(weight)` drops the pages no other held weight spans. A weight used while not held is still
    correct: the kernel faults its pages in. A file changed on storage after it was mapped is refused by
    `check_unchanged`, before a call touches it.
    """

    def __init__(self, store: FileStore):
        self.store = store
        self._bases: dict[str, torch.Tensor] = {}
        self._stamps: dict[str, tuple[int, int]] = {}
        self._counts: dict[str, np.ndarray] = {}
        for path, fd in store._fds.items():
            st = os.fstat(fd)
            self._stamps[path] = (st.st_size, st.st_mtime_ns)
            if st.st_size == 0:
                continue
            mm = mmap.mmap(fd, st.st_size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._bases[path] = torch.frombuffer(mm, dtype=torch.uint8)  # keeps the mapping alive
            self._counts[path] = np.zeros((st.st_size + PAGE_BYTES - 1) // PAGE_BYTES, dtype=np.int32)
        self._lock = threading.Lock()
        self.populate = True  # False where the kernel lacks MADV_POPULATE_READ: pages fault in on use
        self.spans = [self._span(loc) for loc in store.locations]

    def _span(self, loc: TensorLocation) -> tuple[int, int]:
        first = loc.offset_bytes // PAGE_BYTES
        last = (loc.offset_bytes + max(loc.nbytes, 1) - 1) // PAGE_BYTES
        return first, last + 1

    def span_bytes(self, weight: int) -> int:
        """Bytes of the pages weight `weight` touches: what holding it costs in RAM."""
        first, end = self.spans[weight]
        return (end - first) * PAGE_BYTES

    def view(self, weight: int) -> torch.Tensor:
        """The weight's bytes, as a uint8 view of the mapping."""
        loc = self.store.locations[weight]
        return self._bases[loc.path][loc.offset_bytes:loc.offset_bytes + loc.nbytes]

    def _madvise(self, path: str, first: int, end: int, advice: int) -> int:
        addr = self._bases[path].data_ptr() + first * PAGE_BYTES
        length = min((end - first) * PAGE_BYTES, self._stamps[path][0] - first * PAGE_BYTES)
        if _libc.madvise(addr, length, advice) == 0:
            return 0
        return ctypes.get_errno()

    def hold(self, weight: int) -> None:
        loc = self.store.locations[weight]
        if loc.nbytes == 0:
            return
        first, end = self.spans[weight]
        with self._lock:
            self._counts[loc.path][first:end] += 1
        if self.populate:
            err = self._madvise(loc.path, first, end, _MADV_POPULATE_READ)
            if err == 22:  # EINVAL: an older kernel; ask for read-ahead and let pages fault in on use
                self.populate = False
                self._madvise(loc.path, first, end, _MADV_WILLNEED)
            elif err:
                self.unhold(weight)  # the failed hold takes nothing: its counts go back, its pages out
                raise FlashmemError(f"reading {fmt_bytes(loc.nbytes)} at byte {loc.offset_bytes} of {loc.path} "
                                    f"failed ({os.strerror(err)}); the file was truncated or the storage "
                                    f"failed; check the file and load the model again")
        else:
            self._madvise(loc.path, first, end, _MADV_WILLNEED)

    def unhold(self, weight: int) -> None:
        loc = self.store.locations[weight]
        if loc.nbytes == 0:
            return
        first, end = self.spans[weight]
        with self._lock:
            counts = self._counts[loc.path]
            counts[first:end] -= 1
            free = counts[first:end] == 0
            if free.all():
                self._madvise(loc.path, first, end, _MADV_DONTNEED)
                return
            # drop each run of pages no held weight spans (the shared first or last page may stay)
            edges = np.flatnonzero(np.diff(np.concatenate(([0], free.view(np.int8), [0]))))
            for a, b in zip(edges[::2], edges[1::2]):
                self._madvise(loc.path, first + int(a), first + int(b), _MADV_DONTNEED)

    def held_pages(self) -> int:
        return int(sum((c > 0).sum() for c in self._counts.values()))

    def check_unchanged(self) -> None:
        self.store.check_unchanged()

    def release_all(self) -> None:
        """Drop every page and forget the holds (the views stay valid; pages fault back in if used)."""
        with self._lock:
            for path, counts in self._counts.items():
                counts[:] = 0
                self._madvise(path, 0, len(counts), _MADV_DONTNEED)
