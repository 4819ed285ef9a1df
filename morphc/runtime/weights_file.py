"""The weights file of the cold-start disk tier, and reading it from the cold state.

`write_weights` writes a Program's weights as a safetensors file in load order (`file_order`): layer by
layer, every layer page-aligned, every tensor 64-byte aligned, a scheduled program's loaded layers first
and its direct-access layers after them, so its loads are one contiguous stream. `WeightsFile` reads
its layout back and owns the page cache side: cold is real, `evict()` drops the file's pages with
posix_fadvise(POSIX_FADV_DONTNEED) (after fsync; mapped pages cannot be dropped, so every run maps the
file afresh and unmaps it after), and `resident_fraction()` checks it with mincore(2) through ctypes.
`cold_read_gbs` measures the bulk read rate the cold-start bound is computed from.

Reading helpers shared by the tiers: `aligned_empty` (RAM backed by transparent huge pages, aligned as
the file is, so O_DIRECT reads can land in it: physically contiguous 2 MB pages let the block layer send
a few large requests where 4 KB pages scattered over RAM cap each request at ~1 MB; O_DIRECT bulk reads
on this VM's virtio disk: 3.5-3.7 GB/s into huge pages, 1.5-1.6 GB/s into 4 KB pages), `open_direct`,
`contiguous_runs`.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import json
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from morphc.errors import MorphcError
from morphc.ir.load_plan import (
    Layer,
    Layers,
    LoadPlan,
    group_layers,
)
from morphc.ir.program import Program

ALIGN = 64  # every tensor's start in a weights file
LAYER_ALIGN = 4096  # every layer's start, and the data section's: a page, and a block for O_DIRECT reads
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


class ColdStartError(MorphcError):
    """The cold-start executor cannot run this program, weights file or device."""


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
        fd = open_direct(self.path) if direct else os.open(self.path, os.O_RDONLY)
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
        fd = (open_direct(self.path) if direct else None) or os.open(self.path, os.O_RDONLY)
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


def open_direct(path: str | Path) -> int | None:
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
    fd = open_direct(path)
    if fd is None:
        return False
    os.close(fd)
    return True
