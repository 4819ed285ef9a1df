"""The cold-start executor: run a scheduled Program's first inference with its weights off the device.

Memory tiers (where weights start, what "load" and "direct access" mean):

- `DiskTier` (CPU): weights in a safetensors file written in load order (`write_weights`: layer by
  layer, every layer page-aligned, every tensor 64-byte aligned; a scheduled program's loaded layers
  first and its direct-access layers after them, so its loads are one contiguous stream), memory-mapped.
  A *load* reads the layer's byte range into RAM with `preadv`s on I/O threads (GIL released,
  overlapping compute; 8 MB chunks, two in flight, see READ_DEPTH); from the cold state with O_DIRECT
  where the file system allows it, so the disk writes straight into the tensors' memory and no CPU
  copies out of the page cache while the other core computes. The RAM loads land in is backed by
  transparent huge pages (`aligned_empty`): physically contiguous 2 MB pages let the block layer send a
  few large requests where 4 KB pages scattered over RAM cap each request at ~1 MB (O_DIRECT bulk reads
  on this VM's virtio disk: 3.5-3.7 GB/s into huge pages, 1.5-1.6 GB/s into 4 KB pages). *Direct access*
  computes on tensors viewing the mapped pages, so only the pages an operator touches are read (an
  embedding lookup touches its rows). Cold is real:
  `evict()` drops the file's pages from the page cache with posix_fadvise(POSIX_FADV_DONTNEED)
  (after fsync; mapped pages cannot be dropped, so every run maps the file afresh and unmaps it
  after), and `resident_fraction()` checks it with mincore(2) through ctypes.
- `HostTier` (GPU): weights in one host buffer registered with stock PyTorch's
  `torch.cuda.cudart().cudaHostRegister(ptr, nbytes, cudaHostRegisterMapped | Portable)`: page-locked,
  so a *load* is one DMA copy per contiguous run of layers on the channel's copy stream into a device
  arena allocated once; and mapped, so *direct access* hands kernels the buffer itself (CUDA's unified
  virtual addressing makes the host address valid on the device; it is wrapped as a CUDA tensor
  through `__cuda_array_interface__`, zero copy) and they read the weights over PCIe. Parallel
  transmission: channel c copies over GPU c's own PCIe link and forwards over the device link (needs
  several GPUs; not run). Eager, the compute stream waits for loads with events and the CPU queues
  kernels ahead; `capture`/`replay` run the whole scheduled first inference as a CUDA graph. Run on
  an H100 (tests/test_cold_start_gpu.py, benchmarks/README.md); without a GPU those tests skip.

The executor walks the scheduled graph in order: a `morphc::prefetch` issues its layer's load on
its channel's I/O thread (FIFO, as the planner assumed; on disk the loads stream as chunk reads in
issue order with `read_depth` of them in flight), a `morphc::wait` blocks until that load
is done and yields the loaded tensor; plain `get_attr`s of direct-access layers yield views of
the tier. It records the real timeline: per layer load start/end (I/O thread) and compute
start/end (compute thread), plus the bytes the process read from storage (/proc/self/io).
Baselines are the same executor on programs scheduled with the other strategies of
`insert-load-schedule` (on-demand, pipeline, direct).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import gc
import json
import keyword
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from morphc.errors import MorphcError
from morphc.ir.load_plan import (
    PREFETCH,
    WAIT,
    Layer,
    Layers,
    LoadPlan,
    group_layers,
    group_members,
    is_schedule_node,
    reads_sparsely,
    weight_source,
)
from morphc.ir.metadata import op_name
from morphc.ir.program import Program

ALIGN = 64  # every tensor's start in a weights file
LAYER_ALIGN = 4096  # every layer's start, and the data section's: a page, and a block for O_DIRECT reads
SWITCH_INTERVAL_S = 2e-4
# disk tier: loads stream as chunk reads in issue order, READ_DEPTH of them in flight once compute has its
# first load, so the disk does not idle while the thread whose read just ended waits for the GIL behind
# the compute thread (1: one whole read per group, one at a time, PipeSwitch's loader). BERT-base's plan,
# interleaved A/Bs of 21-31 cold rounds: 0-2.7% faster than one group at a time (mean 1.3%; 1 MB chunks
# were 10% slower); ResNet-50's first compute 1.4 ms with the stream opened after it, 2.1-2.3 without
READ_DEPTH = 2
READ_CHUNK = 8 << 20
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


class ColdStartError(MorphcError):
    """The cold-start executor cannot run this program, weights file or device."""


# --- the weights file (disk tier) -------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    attr: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    def view_in(self, buffer: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """This tensor in `buffer` (uint8 bytes), whose first byte holds the file's byte `offset`."""
        return buffer[self.start - offset:self.end - offset].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class LayerRange:
    name: str
    start: int
    end: int
    attrs: tuple[str, ...]


def file_order(program: Program, layers: Layers | None = None) -> list[Layer]:
    """The order layers are written in: first use, except that a scheduled program's direct-access
    layers go after all its loaded ones. Its loads then read one contiguous stream from the start of
    the file (a table computed in place would otherwise sit between them: BERT's 94 MB word
    embeddings come first in first-use order, and the loads had to skip over them)."""
    layers = layers or group_layers(program)
    plan = program.annotation(LoadPlan)
    if plan is None or [layer.name for layer in layers] != [e[0] for e in plan.layers]:
        return list(layers)
    modes = plan.modes()
    return [layer for layer, m in zip(layers, modes) if m == "load"] + [
        layer for layer, m in zip(layers, modes) if m != "load"]


def write_weights(program: Program, path: str | Path, layers: Layers | None = None) -> WeightsFile:
    """Write the program's weights as a safetensors file in load order (`file_order`), synced.

    Layer after layer (each layer one contiguous range, read with one call), every layer starting on
    a page (`LAYER_ALIGN`: a layer can then be read with O_DIRECT without touching its neighbours'
    bytes) and every tensor 64-byte aligned; alignment gaps are
    filled with small uint8 padding tensors so the file stays valid safetensors. Any file written
    from the program runs any schedule of it; the one written from the scheduled program reads fastest.
    """
    ordered = file_order(program, layers)
    path = Path(path)
    order = [a for layer in ordered for a in layer.attrs]
    header: dict[str, Any] = {}
    blobs: list[bytes | torch.Tensor] = []
    offset = 0
    pads = 0
    ranges = []
    for layer in ordered:
        start = None
        for attr in layer.attrs:
            t = program.tensor(attr).detach().cpu().contiguous()
            if t.dtype not in _DTYPES:
                raise ColdStartError(f"weight '{attr}' has dtype {t.dtype}, which the weights file cannot hold; "
                                     f"supported: {', '.join(str(d) for d in _DTYPES)}")
            align = ALIGN if start is not None else LAYER_ALIGN
            if offset % align:
                gap = align - offset % align
                header[f"__pad{pads}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
                blobs.append(bytes(gap))
                offset += gap
                pads += 1
            start = offset if start is None else start
            nbytes = t.numel() * t.element_size()
            header[attr] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                            "data_offsets": [offset, offset + nbytes]}
            blobs.append(t)
            offset += nbytes
        ranges.append((layer.name, start or 0, offset, layer.attrs))
    header["__metadata__"] = {"format": "morphc.weights", "layers": json.dumps(ranges), "order": json.dumps(order)}
    text = json.dumps(header, separators=(",", ":"))
    length = len(text.encode())
    length += (-(8 + length)) % LAYER_ALIGN  # the data section starts aligned too
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(length.to_bytes(8, "little"))
        f.write(text.encode().ljust(length, b" "))
        for blob in blobs:
            f.write(blob if isinstance(blob, bytes) else blob.view(torch.uint8).reshape(-1).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted: make them clean
    return WeightsFile(path)


class WeightsFile:
    """A weights file written by `write_weights`: its tensor and layer byte ranges, and the page cache."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ColdStartError(f"no weights file at '{self.path}' (write one with write_weights(program, path))")
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(n))
                meta = header.pop("__metadata__")
                layers = json.loads(meta["layers"])
            except (ValueError, KeyError) as exc:
                raise ColdStartError(f"'{self.path}' is not a morphc weights file (written by write_weights): "
                                     f"{exc!r}") from exc
        base = 8 + n
        self.data_start = base
        self.size = self.path.stat().st_size
        self.tensors = {name: TensorEntry(name, _FROM_NAME[e["dtype"]], tuple(e["shape"]),
                                          base + e["data_offsets"][0], base + e["data_offsets"][1])
                        for name, e in header.items() if not name.startswith("__pad")}
        self.layers = [LayerRange(name, base + s, base + e, tuple(attrs)) for name, s, e, attrs in layers]
        self._starts = sorted(e.start for e in self.tensors.values())
        self.by_name = {layer.name: layer for layer in self.layers}

    def check_program(self, program: Program, layers: Layers | None = None) -> None:
        layers = layers or group_layers(program)
        missing = [a for layer in layers for a in layer.attrs if a not in self.tensors]
        if missing:
            raise ColdStartError(f"weights file '{self.path}' lacks {len(missing)} tensor(s) the program reads, "
                                 f"e.g. {missing[:3]}; write it from this program with write_weights")

    def direct_span(self, start: int, end: int) -> int | None:
        """The end of an O_DIRECT read of [start, end): `end` rounded up to `LAYER_ALIGN`, if `start` is
        aligned and the rounding covers only padding (no other tensor starts there); else None."""
        if start % LAYER_ALIGN:
            return None
        end_up = end + (-end) % LAYER_ALIGN
        i = bisect.bisect_left(self._starts, end)
        return end_up if i == len(self._starts) or self._starts[i] >= end_up else None

    # page cache ----------------------------------------------------------------------------------

    def evict(self) -> None:
        """Drop the file's pages from the page cache (the cold state). Mapped pages stay: unmap first."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def cold_read_gbs(self, chunk_bytes: int = 64 << 20, *, direct: bool | None = None) -> float:
        """The storage's cold sequential read bandwidth for this file (GB/s): evict, then read it all on
        one thread, in `chunk_bytes` reads, into RAM the size of the file (every byte to its own place,
        as any loader must put them: into one reused buffer the same disk reads ~7% faster, a rate no
        loader can use). `direct=None`: through the page cache and with O_DIRECT where the file system
        allows it, the faster of the two (the physical floor of any loading schedule, for lower
        bounds); True or False: in that mode only (True falls back to the page cache where O_DIRECT is
        refused)."""
        can_direct = supports_o_direct(self.path)
        arena = aligned_empty(self.size + (-self.size) % LAYER_ALIGN)
        arena.zero_()  # fault the pages in before the clock starts, as the executor's arena is
        modes = [direct and can_direct] if direct is not None else [False] + ([True] if can_direct else [])
        return max(self._bulk_read_gbs(arena, chunk_bytes, direct=d) for d in modes)

    def _bulk_read_gbs(self, arena: torch.Tensor, chunk_bytes: int, *, direct: bool) -> float:
        """Evict, then read the whole file in `chunk_bytes` reads into `arena`, each byte to its own place."""
        self.evict()
        mv = memoryview(arena.numpy())
        chunk = max(LAYER_ALIGN, chunk_bytes - chunk_bytes % LAYER_ALIGN)
        fd = _open_direct(self.path) if direct else os.open(self.path, os.O_RDONLY)
        assert fd is not None
        done = 0
        try:
            t0 = time.perf_counter()
            while done < self.size:
                # O_DIRECT reads whole blocks: the last one is short at the end of the file
                n = os.preadv(fd, [mv[done:done + chunk] if direct else mv[done:min(done + chunk, self.size)]], done)
                if n <= 0:
                    break
                done += n
            seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
        return done / seconds / 1e9 if seconds > 0 else 0.0

    def read_latency_ms(self, *, direct: bool = True, samples: int = 16) -> float:
        """The fixed cost of one cold read here (ms): the median time of `samples` one-block reads at offsets
        spread over the evicted file (O_DIRECT where asked and allowed). What every read pays on top of its
        bytes, measured directly: the planner's per-read overhead is otherwise a small difference of two
        large noisy times (reading layer by layer against streaming), and came out as 0 on a slow disk day."""
        self.evict()
        fd = (_open_direct(self.path) if direct else None) or os.open(self.path, os.O_RDONLY)
        buf = aligned_empty(LAYER_ALIGN)
        mv = memoryview(buf.numpy())
        blocks = max(1, (self.size - self.data_start) // LAYER_ALIGN)
        offsets = [self.data_start // LAYER_ALIGN * LAYER_ALIGN + (k * blocks // samples) * LAYER_ALIGN
                   for k in range(samples)]
        times = []
        try:
            for off in offsets:
                t0 = time.perf_counter()
                os.preadv(fd, [mv], off)
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            os.close(fd)
        times.sort()
        return times[len(times) // 2]

    def readahead_bytes(self) -> int:
        """The kernel's read-ahead window for the file's block device (bytes; the largest of the
        machine's block devices when the file system has none of its own, e.g. overlayfs)."""
        dev = os.stat(self.path).st_dev
        own = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        candidates = [own / "queue" / "read_ahead_kb", own.parent / "queue" / "read_ahead_kb"] if own.exists() else []
        candidates = [c for c in candidates if c.exists()] or list(Path("/sys/block").glob("*/queue/read_ahead_kb"))
        values = []
        for c in candidates:
            with contextlib.suppress(OSError, ValueError):
                values.append(int(c.read_text()) * 1024)
        return max(values, default=0)

    def resident_fraction(self, start: int = 0, end: int | None = None) -> float:
        """Fraction of the file's pages (in [start, end)) in the page cache, from mincore(2)."""
        return resident_fraction(self.path, start, end)


_LIBC: Any = None


def resident_fraction(path: str | Path, start: int = 0, end: int | None = None) -> float:
    """Fraction of a file's pages in [start, end) that are in the page cache (mincore on a fresh map)."""
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    end = size if end is None else min(end, size)
    if end <= start:
        return 0.0
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        buf = (ctypes.c_char * size).from_buffer(mm)
        try:
            addr = ctypes.addressof(buf)
            first, last = start // page, (end + page - 1) // page
            vec = (ctypes.c_ubyte * (last - first))()
            if _LIBC.mincore(ctypes.c_void_p(addr + first * page), ctypes.c_size_t((last - first) * page), vec):
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(v & 1 for v in vec) / (last - first)
        finally:
            del buf
    finally:
        mm.close()


def contiguous_runs(layers: Sequence[LayerRange]) -> list[list[LayerRange]]:
    """Split layers into runs that follow each other in the file (alignment padding aside): each run
    is one read."""
    runs: list[list[LayerRange]] = []
    for layer in layers:
        if runs and 0 <= layer.start - runs[-1][-1].end < LAYER_ALIGN:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return runs


def read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io), None where unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# --- tiers -----------------------------------------------------------------------------------------


HUGE_PAGE = 2 << 20  # a transparent huge page on x86-64 and arm64 with 4 KB base pages


def aligned_empty(nbytes: int, phase: int = 0) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes` whose address is `phase` modulo `HUGE_PAGE` (so modulo
    `LAYER_ALIGN` too: O_DIRECT reads need their buffer aligned as their file offset is), in a private
    anonymous map the kernel is asked to back with transparent huge pages (madvise(MADV_HUGEPAGE); with
    THP off it gets 4 KB pages and works the same, slower). The tensor keeps the map alive."""
    if not 0 <= phase < LAYER_ALIGN:
        raise ValueError(f"phase must be in [0, {LAYER_ALIGN}), got {phase}")
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no MADV_HUGEPAGE on this platform or kernel
        mm.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(mm, dtype=torch.uint8)
    shift = (phase - raw.data_ptr()) % HUGE_PAGE
    return raw[shift:shift + nbytes]


def _open_direct(path: str | Path) -> int | None:
    """`path` opened for O_DIRECT reads; None where the platform or file system has none (tmpfs)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError:
        return None


def supports_o_direct(path: str | Path) -> bool:
    """Whether `path` can be opened for O_DIRECT reads here."""
    fd = _open_direct(path)
    if fd is None:
        return False
    os.close(fd)
    return True


class DiskTier:
    """CPU: file on disk -> RAM (see the module docstring). One run maps the file afresh."""

    name = "disk"

    def __init__(self, weights: WeightsFile, sparse: Sequence[str] = (), *, direct_io: bool = True) -> None:
        self.weights = weights
        self.sparse = tuple(sparse)  # direct-access layers touched sparsely (embedding lookups)
        self.direct_io = direct_io  # cold loads with O_DIRECT where possible (see the module docstring)
        self._direct_fd: int | None = None
        self.direct_reads = 0  # reads of the last run done with O_DIRECT ...
        self.cached_reads = 0  # ... and through the page cache
        self._lock = threading.Lock()  # the counters and the O_DIRECT descriptor: several reads may be in flight
        # RAM the loads read into: allocated and faulted in once, kept by the serving process (as
        # PipeSwitch's memory daemon keeps GPU memory), so a cold start does not also pay the kernel
        # for zero-filling fresh pages (for BERT-base about a third of the reading time)
        self._arena: torch.Tensor | None = None
        # every tensor's view of the arena, made once with it: building a group's ~200 views after its read
        # took the I/O thread ~0.6 ms under the GIL (MobileNetV2), time the disk sat idle
        self._views: dict[str, torch.Tensor] = {}
        self._mm: mmap.mmap | None = None
        self._base: torch.Tensor | None = None
        self._fd: int | None = None

    def begin(self, cold: bool) -> None:
        if self._arena is None:  # aligned as the file is, with room for a last read rounded up to a block
            self._arena = aligned_empty(self.weights.size - self.weights.data_start + LAYER_ALIGN,
                                        self.weights.data_start % LAYER_ALIGN)
            self._views = {attr: e.view_in(self._arena, self.weights.data_start)
                           for attr, e in self.weights.tensors.items()}
        self._arena.zero_()  # faults the pages in once, and leaves nothing of the last run behind
        if cold:
            self.weights.evict()
        self._fd = os.open(self.weights.path, os.O_RDONLY)
        # O_DIRECT only from the cold state: it reads the disk even where the page cache holds the file
        self._direct_fd = _open_direct(self.weights.path) if self.direct_io and cold else None
        self.direct_reads = self.cached_reads = 0
        # the map gets its own open file (a dup would share the loads' read-ahead state with the faults
        # and WILLNEED requests of direct access at the other end of the file)
        map_fd = os.open(self.weights.path, os.O_RDONLY)
        try:
            self._mm = mmap.mmap(map_fd, 0, access=mmap.ACCESS_COPY)  # private: tensors may be written, file not
        finally:
            os.close(map_fd)
        # no speculative read-around (read_ahead_kb may be MBs, and it reads *around* a fault, into the
        # neighbouring layers): a sparse lookup reads only its pages, a dense layer asks for its range
        self._mm.madvise(mmap.MADV_RANDOM)
        self._base = torch.frombuffer(self._mm, dtype=torch.uint8)

    def will_need(self, name: str) -> None:
        """A dense direct-access layer is about to be computed on: read exactly its pages (async)."""
        if name in self.sparse or self._mm is None:
            return
        r = self.weights.by_name[name]
        self._will_need(r.start, r.end)

    def _will_need(self, start: int, end: int) -> None:
        """Ask for the file's pages covering [start, end) (asynchronous reads)."""
        assert self._mm is not None
        aligned = start - start % mmap.PAGESIZE
        if end > aligned:
            self._mm.madvise(mmap.MADV_WILLNEED, aligned, end - aligned)

    def will_need_rows(self, attr: str, indices: torch.Tensor) -> None:
        """An embedding lookup on a table computed in place is about to run: ask for the pages of all the
        rows it touches at once (asynchronous reads queued together), instead of faulting them in one
        by one, each fault waiting behind the loads streaming in on the same disk."""
        if self._mm is None:
            return
        e = self.weights.tensors[attr]
        if len(e.shape) != 2 or e.shape[0] == 0:
            return
        row = (e.end - e.start) // e.shape[0]
        for i in torch.unique(indices).tolist():
            if 0 <= i < e.shape[0]:
                self._will_need(e.start + i * row, e.start + (i + 1) * row)

    def view(self, attr: str) -> torch.Tensor:
        """The tensor on the mapped pages (direct access: touching it reads only those pages)."""
        e = self.weights.tensors[attr]
        assert self._base is not None
        return e.view_in(self._base)

    def load(self, *layers: LayerRange) -> dict[str, torch.Tensor]:
        """Read the layers into their place in the arena with preadv, one call for each run of them that
        is contiguous in the file (one call for a whole group in a file written for the plan), on an
        I/O thread: the GIL is released while reading."""
        for run in contiguous_runs(layers):
            self.read_span(run[0].start, run[-1].end)
        return self.tensors(*layers)

    def spans(self, layers: Sequence[LayerRange], chunk: int) -> list[tuple[int, int]]:
        """The layers' contiguous runs cut into reads of at most `chunk` bytes (a multiple of
        `LAYER_ALIGN`, so every read but a run's last stays block-aligned for O_DIRECT)."""
        chunk = max(LAYER_ALIGN, chunk - chunk % LAYER_ALIGN)
        return [(s, min(s + chunk, run[-1].end)) for run in contiguous_runs(layers)
                for s in range(run[0].start, run[-1].end, chunk)]

    def tensors(self, *layers: LayerRange) -> dict[str, torch.Tensor]:
        """The layers' tensors in the arena (valid once their bytes are read)."""
        return {attr: self._views[attr] for layer in layers for attr in layer.attrs}

    def read_span(self, start: int, end: int) -> None:
        """Read the file's [start, end) into its place in the arena: with O_DIRECT where allowed, the rest
        (an unaligned tail, or all of it from a warm file) through the page cache. Thread-safe."""
        assert self._fd is not None and self._arena is not None
        base = self.weights.data_start
        done = self._read_direct(start, end)
        mv = memoryview(self._arena[start - base:end - base].numpy())
        if done < len(mv):
            with self._lock:
                self.cached_reads += 1
        while done < len(mv):
            n = os.preadv(self._fd, [mv[done:]], start + done)
            if n <= 0:
                names = [r.name for r in self.weights.layers if r.start < end and r.end > start]
                raise ColdStartError(f"short read of layer(s) {names} from '{self.weights.path}'")
            done += n

    def _read_direct(self, start: int, end: int) -> int:
        """Read [start, end) into the arena with O_DIRECT if the file, the range and the file system allow
        it; the bytes read (0 if not: the caller reads the rest through the page cache)."""
        span_end = self.weights.direct_span(start, end) if self._direct_fd is not None else None
        if span_end is None:
            return 0
        assert self._arena is not None and self._direct_fd is not None
        base = self.weights.data_start
        mv = memoryview(self._arena[start - base:span_end - base].numpy())
        try:
            n = os.preadv(self._direct_fd, [mv], start)  # a short read only at the end of the file
        except OSError:  # EINVAL: the file system refuses this alignment after all
            with self._lock:
                if self._direct_fd is not None:
                    os.close(self._direct_fd)
                    self._direct_fd = None
            return 0
        with self._lock:
            self.direct_reads += 1
        return min(n, end - start)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t` lives in the arena (the next run overwrites it)."""
        return self._arena is not None and t.untyped_storage().data_ptr() == self._arena.untyped_storage().data_ptr()

    def end(self) -> None:
        self._base = None
        gc.collect()
        if self._mm is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view (an output aliasing a weight)
                self._mm.close()  # then GC unmaps it later
            self._mm = None
        for fd in (self._fd, self._direct_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._direct_fd = None


CUDA_HOST_REGISTER_PORTABLE = 1
CUDA_HOST_REGISTER_MAPPED = 2

_TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.float64: "<f8", torch.int64: "<i8",
            torch.int32: "<i4", torch.int16: "<i2", torch.int8: "|i1", torch.uint8: "|u1", torch.bool: "|b1"}


class _CudaArray:
    """Exposes a device address as `__cuda_array_interface__` (v3) so torch can wrap it without a copy."""

    def __init__(self, interface: dict[str, Any], owner: torch.Tensor) -> None:
        self.__cuda_array_interface__ = interface
        self.owner = owner  # keep the host memory alive as long as the device view


def cuda_array_interface(host: torch.Tensor) -> dict[str, Any]:
    """The `__cuda_array_interface__` describing a registered (mapped) host tensor's memory."""
    if host.dtype not in _TYPESTR:
        raise ColdStartError(f"direct host access cannot wrap dtype {host.dtype}; supported: {list(_TYPESTR)}")
    if not host.is_contiguous():
        raise ColdStartError("direct host access needs a contiguous host tensor")
    return {"shape": tuple(host.shape), "typestr": _TYPESTR[host.dtype], "data": (host.data_ptr(), False),
            "strides": None, "version": 3}


def register_mapped(host: torch.Tensor, cudart: Any = None) -> None:
    """cudaHostRegister(ptr, nbytes, Mapped | Portable): make pinned-able host memory device-addressable."""
    cudart = cudart if cudart is not None else torch.cuda.cudart()
    flags = CUDA_HOST_REGISTER_MAPPED | CUDA_HOST_REGISTER_PORTABLE
    # the whole storage, not only the tensor's bytes: torch asks whether the *storage* is pinned before
    # it lets a copy into a CUDA graph (`aligned_empty` returns a slice of a larger map)
    storage = host.untyped_storage()
    err = cudart.cudaHostRegister(storage.data_ptr(), storage.nbytes(), flags)
    code = int(getattr(err, "value", err))
    if code != 0:
        raise ColdStartError(f"cudaHostRegister failed with CUDA error {code} for {storage.nbytes()} "
                             "bytes (is the memory already registered or pinned?)")


def direct_device_view(host: torch.Tensor, device: str = "cuda", cudart: Any = None,
                       as_tensor: Callable[..., torch.Tensor] = torch.as_tensor) -> torch.Tensor:
    """A CUDA tensor reading `host` over PCIe (DeepPlan's direct host access with stock PyTorch):
    register the memory as mapped, then wrap its (UVA) address as a device tensor (torch reads the
    pointer's attributes and refuses unregistered host memory). A failed wrap unregisters again: a
    later buffer at the same address could not be registered otherwise."""
    cudart = cudart if cudart is not None else torch.cuda.cudart()
    register_mapped(host, cudart)
    try:
        return as_tensor(_CudaArray(cuda_array_interface(host), host), device=device)
    except BaseException:
        cudart.cudaHostUnregister(host.untyped_storage().data_ptr())
        raise


@dataclass(frozen=True)
class PendingLoad:
    """A load queued on a GPU copy stream: its tensors (valid once `done` has happened on the stream
    that uses them) and the events that time it on the device."""

    tensors: dict[str, torch.Tensor]
    started: torch.cuda.Event | None  # None: untimed (a graph captured without marks)
    done: torch.cuda.Event  # what the compute stream waits for
    ended: torch.cuda.Event | None = None  # the timing mark of the end, where it is not `done` (captured)


class HostTier:
    """GPU: host memory -> device memory over PCIe on per-channel copy streams, and direct host access.

    The file's data section is read once into one host buffer (a serving process keeps its cold
    models' weights in host RAM, as PipeSwitch and DeepPlan do) and registered once with
    `cudaHostRegister(Mapped | Portable)`: that page-locks it, so a load is one DMA `cudaMemcpyAsync`
    per contiguous run of layers into one device arena allocated once (the tensors are views of it,
    made once), and it maps it, so a direct-access layer's kernels read its weights in place over
    PCIe. The compute stream waits for a load with `wait_event`, never the CPU: the compute thread
    queues kernels ahead as it does warm. Timings are CUDA events (`PendingLoad`).
    """

    name = "host"

    def __init__(self, weights: WeightsFile, device: str = "cuda:0", channels: int = 1) -> None:
        if not torch.cuda.is_available():
            raise ColdStartError("the host->GPU tier needs CUDA, and torch.cuda.is_available() is False on this "
                                 "machine; use device='cpu' (the disk tier)")
        if channels > torch.cuda.device_count():
            raise ColdStartError(f"parallel transmission over {channels} channels needs {channels} GPUs; "
                                 f"this machine has {torch.cuda.device_count()}")
        self.weights = weights
        dev = torch.device(device)
        self.device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        base = weights.data_start
        self._host = aligned_empty(weights.size - base)
        with open(weights.path, "rb") as f:
            f.seek(base)
            f.readinto(memoryview(self._host.numpy()))
        mapped = direct_device_view(self._host, str(self.device))
        self._registered = True
        self._mapped_views = {attr: e.view_in(mapped, base) for attr, e in weights.tensors.items()}
        self._host_views = {attr: e.view_in(self._host, base) for attr, e in weights.tensors.items()}
        # where loads land: allocated once and kept (PipeSwitch's memory daemon keeps GPU memory too), so a
        # cold start pays no cudaMalloc; every tensor a view of it, made once
        self._arena = torch.empty(self._host.numel(), dtype=torch.uint8, device=self.device)
        self._views = {attr: e.view_in(self._arena, base) for attr, e in weights.tensors.items()}
        self._staging: dict[int, torch.Tensor] = {}  # parallel transmission: a landing arena on each other GPU
        # channel 0 copies into the compute GPU; channel c > 0 over GPU c's link (parallel transmission).
        # High priority: torch hands out pooled streams round robin, 32 per priority, and a copy stream that
        # is the (low-priority) CUDA graph capture stream puts every copy before compute in the graph
        # (seen on the H100: BERT's graph plan computed only after all its copies, once earlier models'
        # executors had taken their streams from the same pool)
        self.streams = [torch.cuda.Stream(device=self.device if c == 0 else torch.device("cuda", c), priority=-1)
                        for c in range(channels)]

    def begin(self, cold: bool) -> None:
        """Cold: the device holds no weight (a layer computed before its load would see zeros). Warm: it
        holds them all (copied now, before the run), as a model that stayed resident does."""
        if cold:
            self._arena.zero_()
        else:
            self._arena.copy_(self._host)
        torch.cuda.synchronize(self.device)

    def resident(self, *layers: LayerRange) -> dict[str, torch.Tensor]:
        """The layers' tensors where a warm run finds them, on the device (what `load` yields, uncopied)."""
        return {attr: self._views[attr] for layer in layers for attr in layer.attrs}

    def view(self, attr: str) -> torch.Tensor:
        """The tensor as a device tensor on the mapped host memory (direct host access)."""
        return self._mapped_views[attr]

    def host_view(self, attr: str) -> torch.Tensor:
        return self._host_views[attr]

    def load(self, *layers: LayerRange, channel: int = 0, after: torch.cuda.Stream | None = None,
             timed: bool = True) -> PendingLoad:
        """Queue the layers' copies on `channel`'s copy stream (one copy per contiguous run of them in
        the file); returns at once. Channel c > 0 copies over GPU c's own PCIe link into GPU c, then
        forwards over the device link. `after`: the copies wait for that stream's work so far (under
        CUDA graph capture, the fork that puts them in the graph: their timing marks are then external
        events, recorded by the graph, and the compute stream's dependency a separate internal one)."""
        stream = self.streams[channel]
        base = self.weights.data_start
        captured = after is not None
        mark = (lambda: torch.cuda.Event(enable_timing=True, external=captured)) if timed else (lambda: None)
        started, ended = mark(), mark()
        done = ended if ended is not None and not captured else torch.cuda.Event()
        if after is not None:
            stream.wait_stream(after)
        with torch.cuda.stream(stream):
            if started is not None:
                started.record(stream)
            for run in contiguous_runs(layers):
                s, e = run[0].start - base, run[-1].end - base
                if channel == 0:
                    self._arena[s:e].copy_(self._host[s:e], non_blocking=True)
                else:
                    if channel not in self._staging:  # GPU c's landing arena, allocated once
                        self._staging[channel] = torch.empty_like(self._arena, device=f"cuda:{channel}")
                    hop = self._staging[channel]
                    hop[s:e].copy_(self._host[s:e], non_blocking=True)
                    self._arena[s:e].copy_(hop[s:e], non_blocking=True)  # device link
            if ended is not None and ended is not done:
                ended.record(stream)
            done.record(stream)
        return PendingLoad(self.resident(*layers), started, done, ended)

    def copy_gbs(self, repeats: int = 3) -> float:
        """The host->device copy rate of the whole weights (GB/s, best of `repeats` copies timed on the
        device): the streaming rate of this tier, as `WeightsFile.cold_read_gbs` is the disk's."""
        best = 0.0
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.streams[0]):
                a.record()
                self._arena.copy_(self._host, non_blocking=True)
                b.record()
            b.synchronize()
            best = max(best, self._arena.numel() / (a.elapsed_time(b) * 1e6))
        return best

    def holds(self, t: torch.Tensor) -> bool:
        """Whether `t` lives in the device arena (the next run overwrites it)."""
        return t.untyped_storage().data_ptr() == self._arena.untyped_storage().data_ptr()

    def end(self) -> None:
        torch.cuda.synchronize(self.device)

    def close(self) -> None:
        """Unregister the host buffer (its mapped views must not be used afterwards)."""
        if getattr(self, "_registered", False):
            self._registered = False
            torch.cuda.cudart().cudaHostUnregister(self._host.untyped_storage().data_ptr())
            getattr(self, "_mapped_views", {}).clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


# --- the timeline -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerTiming:
    name: str
    mode: str
    channel: int
    load_start_ms: float  # -1 for direct access
    load_end_ms: float
    compute_start_ms: float
    compute_end_ms: float
    wait_ms: float  # time compute stalled waiting for this layer's load (GPU: the device's stall)
    dispatch_ms: float = 0.0  # CPU time the compute thread spent on the segment (GPU: queueing its kernels)


@dataclass(frozen=True)
class Timeline:
    """What one cold run did, as measured: per layer, and in total."""

    strategy: str
    tier: str
    total_ms: float
    prologue_start_ms: float  # compute that reads no weight, before the first layer
    prologue_end_ms: float
    layers: tuple[LayerTiming, ...]
    read_bytes: int | None  # bytes read from storage during the run (None where /proc/self/io is missing)
    cold: bool

    def rows(self) -> list[tuple[float, float, float, float]]:
        return [(t.load_start_ms, t.load_end_ms, t.compute_start_ms, t.compute_end_ms) for t in self.layers]

    @property
    def reads_end_ms(self) -> float:
        """When the last load finished (0 when nothing was loaded)."""
        return max((t.load_end_ms for t in self.layers), default=0.0)

    @property
    def after_reads_ms(self) -> float:
        """The run's time after its last load: for on-demand, the compute on resident weights."""
        return self.total_ms - self.reads_end_ms

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(t) for t in self.layers]
        return d


# --- the executor ----------------------------------------------------------------------------------


class ColdStartExecutor:
    """Runs a Program scheduled by `insert-load-schedule` from the cold state; see the module docstring."""

    def __init__(self, program: Program, weights: WeightsFile | str | Path, *, device: str = "cpu",
                 pin_threads: bool = True, direct_io: bool = True, read_depth: int = READ_DEPTH,
                 read_chunk: int = READ_CHUNK) -> None:
        plan = program.annotation(LoadPlan)
        if read_depth < 1 or read_chunk < LAYER_ALIGN:
            raise ColdStartError(f"read_depth must be >= 1 and read_chunk >= {LAYER_ALIGN} B; got {read_depth}, "
                                 f"{read_chunk}")
        self.read_depth, self.read_chunk = read_depth, read_chunk
        # compute on the first CPUs, I/O threads on the others, when there are CPUs for both
        self.pin_threads = pin_threads
        if plan is None:
            raise ColdStartError("the program has no load plan: run the 'insert-load-schedule' pass on it first")
        self.program = program
        self.plan = plan
        self.weights = weights if isinstance(weights, WeightsFile) else WeightsFile(weights)
        self.layers = group_layers(program)
        self.weights.check_program(program, self.layers)
        if [layer.name for layer in self.layers] != [e[0] for e in plan.layers]:
            raise ColdStartError("the program's layers no longer match its load plan (was it changed after "
                                 "insert-load-schedule?); schedule it again")
        self._groups = plan.groups()  # per layer: its read group (-1: direct access)
        self._members = group_members(self._groups)
        missing = [layer.name for layer in self.layers if layer.name not in self.weights.by_name]
        if missing:
            raise ColdStartError(f"weights file '{self.weights.path}' has no layer(s) {missing[:3]}: write it from "
                                 "this program with write_weights")
        if device.startswith("cuda"):
            self.tier: DiskTier | HostTier = HostTier(self.weights, device, plan.channels)
            # everything but the weights, which this tier streams in itself, goes to the GPU
            self.program = program = program.to(self.tier.device, skip=self.weights.tensors)
        elif device == "cpu":
            sparse = [layer.name for layer, mode in zip(self.layers, plan.modes())
                      if mode == "direct" and reads_sparsely(layer)]
            # cold loads with O_DIRECT by default, for every strategy. Measured here (same code, minutes
            # apart): pipelined loads start sooner without the kernel's read-ahead (ResNet-50's first layer
            # computed 1.0 ms in, against 11.4 ms behind an 8 MB read-ahead window); and into the huge-page
            # arena one bulk read streams faster too (on-demand reads of ResNet-50 43.5 against 48.8 ms
            # through the page cache, BERT-base 134 against 152 ms). Into 4 KB pages it streamed slower
            # than the page cache, which is why on-demand once kept the page cache
            self.tier = DiskTier(self.weights, sparse, direct_io=direct_io)
            # each read group's chunk reads for the disk stream, cut once: the plan fixes them
            self._spans = {g: self.tier.spans(self._group_ranges(g), read_chunk) for g in self._members if g >= 0}
        else:
            raise ColdStartError(f"unknown device {device!r}; valid: 'cpu' (disk tier) or 'cuda[:N]' (host tier)")
        self.device = device
        # embedding lookups computed in place on the disk tier: node -> the table's attribute, so the rows
        # a lookup touches are asked for together before it runs (see DiskTier.will_need_rows)
        sparse = self.tier.sparse if isinstance(self.tier, DiskTier) else ()
        sparse_attrs = {a for layer in self.layers if layer.name in sparse for a in layer.attrs}
        self._lookups: dict[fx.Node, str] = {}
        for n in program.graph.nodes:
            if n.op == "call_function" and op_name(n.target) == "embedding" and isinstance(n.args[0], fx.Node):
                source = weight_source(n.args[0])
                if source is not None and str(source.target) in sparse_attrs:
                    self._lookups[n] = str(source.target)
        # attributes computed on where they lie: only these need a view of the tier (a loaded weight's
        # get_attr only feeds its prefetch, and its wait yields the loaded tensor); making views for all
        # of MobileNetV2's 314 tensors took the compute thread 1.5 ms before its first operator
        self._direct_attrs = {a for layer, mode in zip(self.layers, plan.modes()) if mode == "direct"
                              for a in layer.attrs}
        segment = self.layers.segment_of()
        # (node, its segment) in order; `run` walks them with straight runs of operators compiled (see
        # `_compile_runs`), a CUDA graph capture one by one (captured once, its walk's speed does not matter)
        self._node_steps = [(n, segment.get(n.name) if n.op == "call_function" and not is_schedule_node(n) else None)
                            for n in program.graph.nodes]
        self._steps = _compile_runs(self._node_steps, set(self._lookups))

    def _group_ranges(self, group: int) -> list[LayerRange]:
        """The file ranges of read group `group`'s layers."""
        return [self.weights.by_name[self.layers.layers[i].name] for i in self._members[group]]

    def _attr_value(self, attr: str) -> torch.Tensor | None:
        """What a get_attr yields in the walk: a direct-access weight where it lies, None for a loaded one (its
        wait yields it), a tensor outside the weights file from the program (e.g. num_batches_tracked)."""
        if attr in self._direct_attrs:
            return self.tier.view(attr)
        return None if attr in self.weights.tensors else self.program.tensor(attr)

    def _groups_issued_at_start(self, groups: Sequence[int]) -> list[int]:
        """The read groups the plan issues before any compute (in plan order)."""
        return [groups[i] for i, entry in enumerate(self.plan.layers) if entry[1] == "load" and entry[2] < 0]

    def _cpus(self) -> tuple[set[int], set[int]]:
        """(compute CPUs, I/O CPUs) when the threads are pinned apart, else two empty sets."""
        if not self.pin_threads or not hasattr(os, "sched_setaffinity"):
            return set(), set()
        cpus = sorted(os.sched_getaffinity(0))
        threads = max(1, torch.get_num_threads())
        if len(cpus) <= threads:
            return set(), set()
        return set(cpus[:threads]), set(cpus[threads:])

    def run(self, *inputs: torch.Tensor, cold: bool = True) -> tuple[dict[str, torch.Tensor], Timeline]:
        """One first inference: evict (cold=True), then run with the plan; returns outputs and the timeline."""
        self.program.check_inputs(inputs)
        plan = self.plan
        n = len(self.layers)
        gpu = isinstance(self.tier, HostTier)
        if gpu:  # a request's inputs arrive in host memory
            inputs = tuple(t.to(self.tier.device, non_blocking=True) for t in inputs)  # type: ignore[union-attr]
        channels = max(1, plan.channels)
        load_marks: dict[int, tuple[Any, Any]] = {}
        seg_start: list[Any] = [None] * n
        seg_end: list[Any] = [None] * n
        dispatched = [0.0] * n  # CPU ms per segment
        stalls: dict[int, list[tuple[Any, Any]]] = {}  # per layer: (before, after) its wait for its load
        futures: dict[int, Future[Any]] = {}
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        compute_cpus, io_cpus = self._cpus()
        affinity = _pin_this_thread(compute_cpus)
        # an I/O thread per channel: disk, it reads while the compute thread computes; GPU, it queues the
        # copies on the channel's copy stream (~20 us of CPU each) while the compute thread queues kernels
        # disk with read_depth > 1: the loads become one stream of chunk reads in issue order, `read_depth` of
        # them in flight, so the disk never waits for a thread to come back (see `worker`)
        streamed = isinstance(self.tier, DiskTier) and self.read_depth > 1
        pools = [ThreadPoolExecutor(max_workers=self.read_depth if streamed else 1, thread_name_prefix=f"morphc-io{c}",
                                    initializer=_pin_this_thread, initargs=(io_cpus,)) for c in range(channels)]
        try:
            for pool in pools:  # start the I/O threads now: a cold model's server has them running already
                pool.submit(int).result()
            self.tier.begin(cold)
        except BaseException:
            _pin_this_thread(affinity)
            for pool in pools:
                pool.shutdown(wait=False)
            raise
        lock = threading.Lock()
        switch = sys.getswitchinterval()
        # the I/O thread needs the GIL for a moment between reads: with the default 5 ms switch interval
        # it would wait behind the compute thread's Python dispatch; 0.2 ms keeps the channel busy
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        rb0 = read_bytes()
        wall0 = time.perf_counter()
        clock: _Clock = _CudaClock() if gpu else _Clock()
        groups, members = self._groups, self._members

        def do_load(group: int, channel: int) -> dict[str, torch.Tensor] | PendingLoad:  # on the I/O thread
            if isinstance(self.tier, HostTier):  # queued: the copy stream's events time it
                pending = self.tier.load(*self._group_ranges(group), channel=channel)
                marks = (pending.started, pending.done)
                out: dict[str, torch.Tensor] | PendingLoad = pending
            else:
                start = clock.now()
                out = self.tier.load(*self._group_ranges(group))
                marks = (start, clock.now())
            with lock:
                for i in members[group]:
                    load_marks[i] = marks
            return out

        resident = gpu and not cold  # GPU warm: the weights are on the device already, nothing to copy
        backlog: list[int] = []  # disk stream: groups issued, their chunks not yet queued

        def issue(g: int) -> None:
            """Hand read group `g` to its channel's I/O thread, once."""
            if g in futures:
                return
            if resident:
                futures[g] = Future()
                futures[g].set_result(self.tier.resident(*self._group_ranges(g)))  # type: ignore[union-attr]
                return
            channel = plan.layers[g][3]
            if streamed:
                futures[g] = Future()
                backlog.append(g)
            else:
                futures[g] = pools[channel].submit(do_load, g, channel)

        def finish(g: int, start: Any) -> dict[str, torch.Tensor]:
            """Disk stream: group `g`'s last chunk is in; record its load and yield its tensors."""
            marks = (start, clock.now())
            with lock:
                for i in members[g]:
                    load_marks[i] = marks
            return self.tier.tensors(*self._group_ranges(g))  # type: ignore[union-attr]

        stream = _ChunkStream(self.tier, clock, finish) if streamed else None  # type: ignore[arg-type]

        def flush() -> None:
            """Queue the chunks of the groups issued since the last flush, all at once."""
            if stream is None or not backlog:
                return
            stream.add([(g, futures[g], self._spans[g]) for g in backlog])
            backlog.clear()

        if stream is not None:
            for k in range(self.read_depth):
                pools[0].submit(stream.work, k)

        # loads issued at the start go out before the walk reaches their prefetch nodes (the walk through
        # the graph's get_attrs first takes the compute thread a fraction of a millisecond)
        for g in self._groups_issued_at_start(groups):
            issue(g)
        flush()
        direct_dense = [m == "direct" and isinstance(self.tier, DiskTier) and layer.name not in self.tier.sparse
                        for layer, m in zip(self.layers, plan.modes())]
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        current: int | None = None
        prologue: list[Any] = [None, None]
        last_end: Any = clock.now()
        queued = False  # GPU: kernels queued since the last mark
        seg_wall = wall_last = 0.0  # when the CPU began the current segment, and finished its last operator

        def close_compute() -> None:
            """GPU: mark where the queued kernels end (CPU marks after every operator)."""
            nonlocal last_end, queued
            if queued:
                last_end, queued = clock.now(), False

        try:
            with torch.no_grad():
                for node, seg, run in self._steps:
                    if node.op == "placeholder":
                        env[node] = next(placeholders)
                    elif node.op == "get_attr":
                        env[node] = self._attr_value(str(node.target))
                    elif node.target is PREFETCH:
                        issue(groups[node.args[2]])
                        flush()
                        env[node] = env[node.args[0]]
                    elif node.target is WAIT:
                        i = node.args[1]
                        g = groups[i]
                        if g not in loaded:
                            close_compute()
                            before = clock.now()
                            got = futures[g].result()
                            if stream is not None:
                                stream.open()
                            if isinstance(got, PendingLoad):  # the compute stream waits, the CPU goes on queueing
                                torch.cuda.current_stream(self.tier.device).wait_event(got.done)  # type: ignore[union-attr]
                                got = got.tensors
                            loaded[g] = got
                            stalls.setdefault(i, []).append((before, clock.now()))
                        env[node] = loaded[g][str(_source(node).target)]
                    elif node.op == "call_function":
                        if seg != current and seg is not None:
                            close_compute()
                            wall = time.perf_counter()
                            if current is not None and current >= 0:
                                dispatched[current] += (wall_last - seg_wall) * 1e3
                                seg_end[current] = last_end
                            elif current == -1:
                                prologue[1] = last_end
                            if seg >= 0:
                                seg_start[seg] = clock.now()
                                if direct_dense[seg]:
                                    self.tier.will_need(self.layers.layers[seg].name)  # type: ignore[union-attr]
                            else:
                                prologue[0] = clock.now()
                            current, seg_wall = seg, wall
                        if run is not None:
                            run(env)
                        else:
                            args = fx.node.map_arg(node.args, env.__getitem__)
                            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
                            if node in self._lookups:
                                self.tier.will_need_rows(self._lookups[node], args[1])  # type: ignore[union-attr]
                            env[node] = node.target(*args, **kwargs)
                        wall_last = time.perf_counter()
                        if gpu:
                            queued = True
                        else:
                            last_end = clock.now()
                    elif node.op == "output":
                        leaves = fx.node.map_arg(node.args[0], env.__getitem__)
                close_compute()
                if current is not None and current >= 0:
                    dispatched[current] += (wall_last - seg_wall) * 1e3
                    seg_end[current] = last_end
                elif current == -1:
                    prologue[1] = last_end
                for f in futures.values():
                    f.result()
                if gpu:  # the first inference is over when its outputs are
                    torch.cuda.synchronize(self.tier.device)  # type: ignore[union-attr]
                wall_ms = (time.perf_counter() - wall0) * 1e3
        finally:
            _pin_this_thread(affinity)
            sys.setswitchinterval(switch)
            if stream is not None:
                stream.close()
            for pool in pools:
                pool.shutdown(wait=True)
            env.clear()
            loaded.clear()
            futures.clear()
            self.tier.end()
        rb1 = read_bytes()
        ms = clock.ms
        end = ms(last_end)
        load_times = {i: (ms(a), ms(b)) for i, (a, b) in load_marks.items()}
        # CPU: the run ends with its last read or compute; GPU: when the outputs were ready for the host
        total = wall_ms if gpu else max([end, *(e for _, e in load_times.values())])
        prologue_start, prologue_end = (-1.0 if m is None else ms(m) for m in prologue)
        timings = []
        ends = [-1.0 if m is None else ms(m) for m in seg_end]
        for i, (layer, entry) in enumerate(zip(self.layers, plan.layers)):
            ls, le = load_times.get(i, (-1.0, -1.0))
            cs, ce = (-1.0 if seg_start[i] is None else ms(seg_start[i])), ends[i]
            if cs < 0:  # an empty segment (the layer shares its first use with the next one)
                cs = ce = max([x for x in ends[:i] if x >= 0], default=max(prologue_end, 0.0))
            waited = sum(ms(b) - ms(a) for a, b in stalls.get(i, ()))
            timings.append(LayerTiming(layer.name, entry[1], entry[3], ls, le, cs, ce, waited, dispatched[i]))
        outputs = dict(zip((o.name for o in self.program.outputs), leaves))
        # an output that is a loaded weight must outlive the next run's loads
        outputs = {k: v.clone() if isinstance(v, torch.Tensor) and self.tier.holds(v) else v
                   for k, v in outputs.items()}
        timeline = Timeline(plan.strategy, self.tier.name, total, prologue_start, prologue_end, tuple(timings),
                            None if rb0 is None or rb1 is None else rb1 - rb0, cold)
        return outputs, timeline

    # --- CUDA graphs (GPU) ------------------------------------------------------------------------

    def capture(self, *inputs: torch.Tensor) -> None:
        """GPU: record this schedule's first inference as CUDA graphs, once, warm (a server prepares a
        model's kernels ahead, as PipeSwitch does; only the weights are cold): cold ones (the loads as
        copies on the copy streams, forked where the plan issues them; each wait an event edge; direct
        access reading mapped host memory), with and without timing marks (external events at every
        segment and load boundary, for the timeline), and a resident one (no copy). `replay` then runs
        them with no kernel queued by the CPU, which is what eager batch-1 inference spends most on."""
        if not isinstance(self.tier, HostTier):
            raise ColdStartError("CUDA graphs are for the GPU tier: build the executor with device='cuda'")
        self.program.check_inputs(inputs)
        self.run(*inputs, cold=True)  # kernels chosen, allocator primed, before capturing
        self._static = tuple(t.to(self.tier.device).clone() for t in inputs)
        self._graphs: dict[tuple[bool, bool], tuple[torch.cuda.CUDAGraph, Any, _GraphMarks | None]] = {}
        capture_stream = torch.cuda.Stream(device=self.tier.device)
        if any(capture_stream.cuda_stream == s.cuda_stream for s in self.tier.streams):
            raise ColdStartError("the CUDA graph capture stream is one of the copy streams: the copies would "
                                 "run before all compute")
        for cold, timed in ((True, False), (True, True), (False, False)):
            self.tier.begin(cold=False)
            graph = torch.cuda.CUDAGraph()
            marks = _GraphMarks(len(self.layers)) if timed else None
            with torch.no_grad(), torch.cuda.graph(graph, stream=capture_stream):
                leaves = self._walk_captured(self._static, cold, marks)
            self._graphs[cold, timed] = (graph, leaves, marks)

    def replay(self, *inputs: torch.Tensor, cold: bool = True,
               timed: bool = False) -> tuple[dict[str, torch.Tensor], Timeline]:
        """One first inference from the captured graph (cold: the device arena zeroed first, the weights
        copied in by the graph); its timeline's total is the wall time from the request to its outputs,
        and per layer (`timed`, cold only: the graph with marks, which cost a little) loads and compute."""
        if not getattr(self, "_graphs", None):
            raise ColdStartError("no CUDA graph captured: call capture(*inputs) first")
        if timed and not cold:
            raise ColdStartError("only the cold graph carries timing marks")
        self.program.check_inputs(inputs)
        graph, leaves, marks = self._graphs[cold, timed]
        self.tier.begin(cold)
        t0 = time.perf_counter()
        for static, x in zip(self._static, inputs):
            static.copy_(x, non_blocking=True)
        graph.replay()
        torch.cuda.synchronize(self.tier.device)  # type: ignore[union-attr]
        total = (time.perf_counter() - t0) * 1e3
        outputs = {o.name: t.clone() for o, t in zip(self.program.outputs, leaves)}
        rows = marks.rows(self.layers, self.plan) if marks is not None else ()
        return outputs, Timeline(self.plan.strategy, "host-graph", total, -1.0, -1.0, rows, None, cold)

    def _walk_captured(self, inputs: Sequence[torch.Tensor], cold: bool, marks: _GraphMarks | None) -> Any:
        """The scheduled graph's walk under capture: no thread, clock or synchronize, only the work (and
        timing marks where asked)."""
        tier = self.tier
        assert isinstance(tier, HostTier)
        plan = self.plan
        groups, members = self._groups, self._members
        compute = torch.cuda.current_stream(tier.device)
        pending: dict[int, PendingLoad | dict[str, torch.Tensor]] = {}
        forked: set[int] = set()  # channels whose copy stream joined the capture
        if marks is not None:
            marks.start.record()

        def issue(g: int) -> None:
            if g in pending:
                return
            layers = self._group_ranges(g)
            if cold:
                forked.add(plan.layers[g][3])
                load = tier.load(*layers, channel=plan.layers[g][3], after=compute, timed=marks is not None)
                if marks is not None:
                    for i in members[g]:
                        marks.loads[i] = (load.started, load.ended)
                pending[g] = load
            else:
                pending[g] = tier.resident(*layers)

        for g in self._groups_issued_at_start(groups):
            issue(g)
        env: dict[fx.Node, Any] = {}
        placeholders = iter(inputs)
        waited: set[int] = set()
        current: int | None = None
        for node, seg in self._node_steps:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "get_attr":
                env[node] = self._attr_value(str(node.target))
            elif node.target is PREFETCH:
                issue(groups[node.args[2]])
                env[node] = env[node.args[0]]
            elif node.target is WAIT:
                g = groups[node.args[1]]
                got = pending[g]
                if isinstance(got, PendingLoad):
                    if g not in waited:
                        compute.wait_event(got.done)
                        waited.add(g)
                    got = got.tensors
                env[node] = got[str(_source(node).target)]
            elif node.op == "call_function":
                if marks is not None and seg is not None and seg != current:
                    marks.boundary(current, seg)
                    current = seg
                env[node] = node.target(*fx.node.map_arg(node.args, env.__getitem__),
                                        **fx.node.map_arg(node.kwargs, env.__getitem__))
            elif node.op == "output":
                leaves = fx.node.map_arg(node.args[0], env.__getitem__)
        if marks is not None:
            marks.boundary(current, None)
        for channel in sorted(forked):  # join every fork before the capture ends
            compute.wait_stream(tier.streams[channel])
        return leaves


class _GraphMarks:
    """Timing marks recorded by a captured graph (external events, which a replay records): the start,
    each segment's start and end on the compute stream, each load's start and end on its copy stream."""

    def __init__(self, n: int) -> None:
        self.start = torch.cuda.Event(enable_timing=True, external=True)
        self.seg: list[list[torch.cuda.Event | None]] = [[None, None] for _ in range(n)]
        self.loads: dict[int, tuple[torch.cuda.Event | None, torch.cuda.Event | None]] = {}

    def boundary(self, ending: int | None, starting: int | None) -> None:
        event = torch.cuda.Event(enable_timing=True, external=True)
        event.record()
        if ending is not None and ending >= 0:
            self.seg[ending][1] = event
        if starting is not None and starting >= 0:
            self.seg[starting][0] = event

    def rows(self, layers: Layers, plan: LoadPlan) -> tuple[LayerTiming, ...]:
        def ms(e: torch.cuda.Event | None) -> float:
            return -1.0 if e is None else float(self.start.elapsed_time(e))

        out = []
        last = 0.0
        for i, (layer, entry) in enumerate(zip(layers, plan.layers)):
            ls, le = (ms(a) for a in self.loads.get(i, (None, None)))
            cs, ce = (ms(e) for e in self.seg[i])
            if cs < 0:  # an empty segment (the layer shares its first use with the next one)
                cs = ce = last
            last = ce
            out.append(LayerTiming(layer.name, entry[1], entry[3], ls, le, cs, ce, 0.0))
        return tuple(out)


class _ChunkStream:
    """The disk tier's loads as one queue of chunk reads in issue order, taken by `depth` workers (see
    READ_DEPTH); a group's future gets `finish(group, first chunk's start)` once its last chunk is in."""

    def __init__(self, tier: DiskTier, clock: _Clock, finish: Callable[[int, Any], Any]) -> None:
        self.tier, self.clock, self.finish = tier, clock, finish
        self.chunks: collections.deque[tuple[int, int, int]] = collections.deque()  # (group, start, end)
        self.more = threading.Condition()
        self.futures: dict[int, Future[Any]] = {}
        self.left: dict[int, int] = {}  # per group: chunks not yet read
        self.first_start: dict[int, Any] = {}
        self.finished = False
        # one read in flight until compute has its first load: until then that load is the critical path,
        # and a second read would share the disk with it (ResNet-50's first compute: 1.4 ms, 2.3 without)
        self.opened = threading.Event()

    def add(self, groups: Sequence[tuple[int, Future[Any], Sequence[tuple[int, int]]]]) -> None:
        """Queue these groups' chunk reads (group, its future, its chunks) behind those queued already."""
        with self.more:
            for g, future, spans in groups:
                self.futures[g], self.left[g] = future, len(spans)
                self.chunks.extend((g, a, b) for a, b in spans)
            self.more.notify_all()

    def open(self) -> None:
        """Compute has its first load: let every worker read."""
        self.opened.set()

    def close(self) -> None:
        """The run is over: workers leave once the queue is empty."""
        self.opened.set()
        with self.more:
            self.finished = True
            self.more.notify_all()

    def work(self, k: int) -> None:
        """Worker `k`: read chunks in queue order until the run is over (all but the first once open)."""
        if k:
            self.opened.wait()
        while True:
            try:
                g, a, b = self.chunks.popleft()
            except IndexError:
                with self.more:
                    while not self.chunks and not self.finished:
                        self.more.wait()
                    if not self.chunks:
                        return
                continue
            self.first_start.setdefault(g, self.clock.now())
            future = self.futures[g]
            try:
                self.tier.read_span(a, b)
            except BaseException as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            with self.more:
                self.left[g] -= 1
                if self.left[g] or future.done():
                    continue
            future.set_result(self.finish(g, self.first_start[g]))


class _Clock:
    """Marks of when things happened, in ms since the run began: CPU, the wall clock as they happen."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def now(self) -> Any:
        return (time.perf_counter() - self.t0) * 1e3

    def ms(self, mark: Any) -> float:
        return float(mark)


class _CudaClock(_Clock):
    """GPU: marks are events recorded on the current stream (the CPU runs ahead of the device: a mark
    happens when the device reaches it), read once the run has synchronized."""

    def __init__(self) -> None:
        super().__init__()
        self.start = self.now()

    def now(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, mark: Any) -> float:
        return float(self.start.elapsed_time(mark))


def _pin_this_thread(cpus: set[int] | None) -> set[int] | None:
    """Run the calling thread on `cpus` (nothing when empty or None); returns the CPUs it ran on before,
    None when it was not pinned. Pinning only helps timings: a refusal (a cpuset) leaves it as it was."""
    if not cpus:
        return None
    try:
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)  # 0: this thread
    except OSError:
        return None
    return before


Step = tuple[fx.Node, "int | None", "Callable[[dict[fx.Node, Any]], None] | None"]


def _compile_runs(steps: Sequence[tuple[fx.Node, int | None]], singles: Collection[fx.Node]) -> list[Step]:
    """The walk's steps, with every run of two or more operators of one segment (no schedule node, none in
    `singles`) made one generated function over the walk's environment, its marks taken once after its last
    operator: interpreting each node (two `map_arg`s, the dispatch on its kind, a timing mark) cost BERT-base's
    compute 1.2-1.6 ms of ~86 ms. The first node of a run stands for it."""

    def compilable(n: fx.Node) -> bool:
        return n.op == "call_function" and not is_schedule_node(n) and n not in singles

    out: list[Step] = []
    i = 0
    while i < len(steps):
        node, seg = steps[i]
        j = i + 1
        if compilable(node):
            while j < len(steps) and steps[j][1] == seg and compilable(steps[j][0]):
                j += 1
        out.append((node, seg, _run_function([n for n, _ in steps[i:j]]) if j - i > 1 else None))
        i = j
    return out


def _run_function(nodes: Sequence[fx.Node]) -> Callable[[dict[fx.Node, Any]], None]:
    """One Python function computing `nodes` in order, each into `env[node]` (what interpreting them one by
    one does, without the interpreter)."""
    names: dict[str, Any] = {}

    def bind(value: Any, prefix: str) -> str:
        name = f"{prefix}{len(names)}"
        names[name] = value
        return name

    def expr(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"env[{bind(a, 'n')}]"
        if isinstance(a, tuple):
            return "(" + "".join(f"{expr(x)}, " for x in a) + ")"
        if isinstance(a, list):
            return "[" + ", ".join(expr(x) for x in a) + "]"
        if isinstance(a, dict):
            return "{" + ", ".join(f"{bind(k, 'c')}: {expr(v)}" for k, v in a.items()) + "}"
        if isinstance(a, slice):
            return f"slice({expr(a.start)}, {expr(a.stop)}, {expr(a.step)})"
        return bind(a, "c")

    lines = ["def run(env):"]
    for node in nodes:
        args = [expr(a) for a in node.args]
        args += [f"{k}={expr(v)}" if k.isidentifier() and not keyword.iskeyword(k) else
                 f"**{{{bind(k, 'c')}: {expr(v)}}}" for k, v in node.kwargs.items()]
        lines.append(f"    env[{bind(node, 'n')}] = {bind(node.target, 'f')}({', '.join(args)})")
    scope = dict(names)
    exec(compile("\n".join(lines), f"<morphc cold-start run {nodes[0].name}..{nodes[-1].name}>", "exec"), scope)
    return scope["run"]


def _source(node: fx.Node) -> fx.Node:
    while is_schedule_node(node):
        node = node.args[0]  # type: ignore[assignment]
    return node


def run_cold(program: Program, weights: WeightsFile | str | Path, inputs: Sequence[torch.Tensor], *,
             runs: int = 1, device: str = "cpu") -> list[Timeline]:
    """`runs` cold first inferences of a scheduled program; the timelines in order."""
    exe = ColdStartExecutor(program, weights, device=device)
    return [exe.run(*inputs, cold=True)[1] for _ in range(runs)]
