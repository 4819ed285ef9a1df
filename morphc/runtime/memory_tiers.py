"""Memory tiers of the cold-start executor: where weights start, and what "load" and "direct access" mean.

- `DiskTier` (CPU): the weights file (`morphc.runtime.weights_file`) on disk, memory-mapped.
  A *load* reads the layer's byte range into RAM with `preadv`s on I/O threads (GIL released,
  overlapping compute; the executor streams them as chunk reads); from the cold state with O_DIRECT
  where the file system allows it, so the disk writes straight into the tensors' memory (an arena of
  transparent huge pages allocated once) and no CPU copies out of the page cache while the other core
  computes. *Direct access* computes on tensors viewing the mapped pages, so only the pages an operator
  touches are read (an embedding lookup touches its rows).
- `HostTier` (GPU): weights in one host buffer registered with stock PyTorch's
  `torch.cuda.cudart().cudaHostRegister(ptr, nbytes, cudaHostRegisterMapped | Portable)`: page-locked,
  so a *load* is one DMA copy per contiguous run of layers on the channel's copy stream into a device
  arena allocated once; and mapped, so *direct access* hands kernels the buffer itself (CUDA's unified
  virtual addressing makes the host address valid on the device; it is wrapped as a CUDA tensor
  through `__cuda_array_interface__`, zero copy) and they read the weights over PCIe. Parallel
  transmission: channel c copies over GPU c's own PCIe link and forwards over the device link (needs
  several GPUs; not run). Run on an H100 (tests/test_cold_start_gpu.py, benchmarks/README.md); without
  a GPU those tests skip.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from morphc.runtime.weights_file import (
    LAYER_ALIGN,
    ColdStartError,
    LayerRange,
    WeightsFile,
    aligned_empty,
    contiguous_runs,
    open_direct,
)


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
        self._direct_fd = open_direct(self.weights.path) if self.direct_io and cold else None
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
