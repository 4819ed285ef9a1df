"""Device profiles and their serving-configuration spaces: the knobs a latency depends on.

A `DeviceProfile` declares, per device kind, which resource knobs exist, which values are swept
when profiling, and *how each knob is applied when measuring* (the profiler and the cost model
read the same declaration, so a config means the same thing at collection and prediction time).

CPU (measured here): batch size (the Program is lowered with example inputs of that batch: shapes
are static), intra-op threads (`torch.set_num_threads`) and flushing subnormals to zero (on every
intra-op thread, `morphc.runtime.denormals`). GPU (RaPP's and FaST-GShare's space):
batch size, SM share (the MPS active-thread percentage, `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`, read
by CUDA when the process creates its context, so one process measures one share:
`gpu_collect` starts one worker per share under an MPS daemon) and time quota (the share of each
scheduling window the process may hold the GPU, FaST-GShare's token bucket). Batch and SM share
are measurable where a GPU is (and, below 100%, where an MPS daemon runs: the collection checks
that it does and says so when it does not); the time quota needs FaST-GShare's scheduler, which
morphc does not have, so GPU measurements are all at time_quota=1.0 and a lower quota is refused
(`DeviceUnavailableError`), never faked. A knob's `measurable_here` answers for this machine.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from morphc.errors import MorphcError


class DeviceUnavailableError(MorphcError):
    """A config names a device this machine cannot measure (e.g. a GPU config without a GPU)."""


class ConfigError(MorphcError, ValueError):
    """A serving config with an unknown knob or a value outside its valid range."""


MPS_CONTROL = "nvidia-cuda-mps-control"  # the MPS control daemon's executable
# SM shares at which GPU per-operator latencies are measured: the two columns of the GPU runtime features
# (features.node_features), as 1 and 2 threads are on CPU (RaPP: per-op latency under a few resource shares)
GPU_RUNTIME_SHARES: tuple[int, int] = (100, 50)


def gpu_available() -> bool:
    """Whether torch sees a CUDA device (imported and asked only when called: no CUDA at import)."""
    import torch

    return bool(torch.cuda.is_available())


# What a knob needs to be measured, checked by `Knob.measurable_here`: "" nothing beyond the CPU.
_NEEDS: dict[str, Any] = {
    "": lambda: True,
    "gpu": lambda: gpu_available(),  # looked up when asked (tests stand in for it)
    "gpu+mps": lambda: gpu_available() and shutil.which(MPS_CONTROL) is not None,
    "fast-gshare": lambda: False,  # FaST-GShare's token-bucket scheduler: not part of morphc
}


@dataclass(frozen=True)
class Knob:
    """One resource knob: the values profiling sweeps, how the profiler applies it, what measuring it needs."""

    name: str
    values: tuple[Any, ...]
    applied: str  # how the knob is applied when measuring (shown by `morphc profile --space`)
    needs: str = ""  # "" (nothing), "gpu", "gpu+mps" or "fast-gshare"

    def __post_init__(self) -> None:
        if self.needs not in _NEEDS:
            raise ValueError(f"Knob.needs must be one of {sorted(_NEEDS)}, got {self.needs!r}")

    @property
    def measurable_here(self) -> bool:
        """Whether this machine can measure the knob's values (for sm_share: an MPS control daemon is
        installed; whether it runs is only known by starting it, which the GPU collection does)."""
        return bool(_NEEDS[self.needs]())


@dataclass(frozen=True)
class CpuConfig:
    """A CPU serving config: intra-op `threads`, `batch` (None: the Program's own batch), and whether
    subnormal floats are flushed to zero (`flush_denormal`, as the serving knob of that name)."""

    threads: int = 1
    batch: int | None = None
    flush_denormal: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.flush_denormal, bool):
            raise ValueError(f"CpuConfig.flush_denormal must be true or false, got {self.flush_denormal!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"CpuConfig.threads must be >= 1, got {self.threads}")
        if self.batch is not None and (not isinstance(self.batch, int) or self.batch < 1):
            raise ValueError(f"CpuConfig.batch must be None (the program's batch) or >= 1, got {self.batch}")

    device = "cpu"

    def with_batch(self, batch: int) -> CpuConfig:
        return CpuConfig(threads=self.threads, batch=batch, flush_denormal=self.flush_denormal)

    def as_record(self) -> dict[str, Any]:
        """The records-database key of this config (flush_denormal only when on: the keys stored before
        it existed keep their meaning)."""
        key = asdict(self)
        if not self.flush_denormal:
            del key["flush_denormal"]
        return key


@dataclass(frozen=True)
class GpuConfig:
    """A GPU serving config (RaPP's resource space): batch, SM share in percent, time quota in (0, 1]."""

    batch: int | None = None
    sm_share: int = 100  # MPS active-thread percentage, 1..100
    time_quota: float = 1.0  # share of each scheduling window, (0, 1]

    device = "cuda"

    def __post_init__(self) -> None:
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"GpuConfig.batch must be None or >= 1, got {self.batch}")
        if not 1 <= self.sm_share <= 100:
            raise ValueError(f"GpuConfig.sm_share is an MPS active-thread percentage in 1..100, got {self.sm_share}")
        if not 0 < self.time_quota <= 1:
            raise ValueError(f"GpuConfig.time_quota must be in (0, 1], got {self.time_quota}")

    def with_batch(self, batch: int) -> GpuConfig:
        return GpuConfig(batch=batch, sm_share=self.sm_share, time_quota=self.time_quota)

    def as_record(self) -> dict[str, Any]:
        """The records-database key of this config."""
        return asdict(self)


Config = CpuConfig | GpuConfig


@dataclass(frozen=True)
class DeviceProfile:
    """A device kind with its declared knobs; `configs()` enumerates the profiling grid."""

    kind: str
    knobs: tuple[Knob, ...]
    description: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def knob(self, name: str) -> Knob:
        for k in self.knobs:
            if k.name == name:
                return k
        raise ConfigError(f"device '{self.kind}' has no knob '{name}' (knobs: {[k.name for k in self.knobs]})")

    def configs(self, **overrides: tuple[Any, ...]) -> Iterator[Config]:
        """Every config of the grid (a knob's values can be narrowed with `name=(v1, v2)`)."""
        for name in overrides:
            self.knob(name)
        names = [k.name for k in self.knobs]
        grids = [overrides.get(k.name, k.values) for k in self.knobs]
        for values in itertools.product(*grids):
            yield config_from_dict(self.kind, dict(zip(names, values)))


CPU = DeviceProfile(
    kind="cpu",
    knobs=(
        Knob("batch", (1, 4, 8), "the Program is lowered with example inputs of this batch (static shapes)"),
        Knob("threads", (1, 2), "torch.set_num_threads(threads) around the timed calls, restored afterwards"),
        Knob("flush_denormal", (False,), "subnormals flushed to zero on every intra-op thread around the timed "
             "calls (morphc.runtime.denormals, as served); the corpus is collected unflushed unless "
             "--flush-denormal"),
    ),
    description="eager torch on CPU cores shared with other processes",
    notes=("the 1-minute load average is stored with every measurement (other processes share the cores)",),
)

GPU = DeviceProfile(
    kind="cuda",
    knobs=(
        Knob("batch", (1, 2, 4, 8, 16, 32), "the Program is lowered with example inputs of this batch and run eagerly "
             "on the GPU (parameters and inputs moved there once)", needs="gpu"),
        Knob("sm_share", (10, 20, 30, 50, 70, 100),
             "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the measuring process, set before it creates its CUDA context, "
             "under an MPS control daemon (one worker process per share), as RaPP; without a working MPS daemon "
             "only 100 is measured", needs="gpu+mps"),
        Knob("time_quota", (0.25, 0.5, 0.75, 1.0),
             "share of each scheduling window the process may run kernels (FaST-GShare's time token bucket): "
             "not applied, morphc has no such scheduler; GPU measurements are at 1.0 (the whole window) and "
             "a lower quota is refused", needs="fast-gshare"),
    ),
    description="eager torch on one CUDA device; SM share through MPS (scripts/collect_gpu_profile.py checks "
                "that MPS runs and falls back to share 100 when it does not), time quota 1.0 only",
    notes=("a GPU profile is measured on the machine that has the GPU, into its own records database",),
)

PROFILES: dict[str, DeviceProfile] = {"cpu": CPU, "cuda": GPU}


def profile_of(kind: str) -> DeviceProfile:
    try:
        return PROFILES[kind]
    except KeyError:
        raise ConfigError(f"unknown device kind '{kind}'; valid: {sorted(PROFILES)}") from None


def config_from_dict(kind: str, values: Mapping[str, Any]) -> Config:
    """A config from a {knob: value} mapping, refusing unknown knobs with the valid ones named."""
    cls = CpuConfig if kind == "cpu" else GpuConfig if kind == "cuda" else None
    if cls is None:
        raise ConfigError(f"unknown device kind '{kind}'; valid: {sorted(PROFILES)}")
    valid = set(cls.__dataclass_fields__)
    unknown = set(values) - valid
    if unknown:
        raise ConfigError(f"{cls.__name__} has no knob(s) {sorted(unknown)}; valid knobs: {sorted(valid)}")
    try:
        return cls(**dict(values))
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def parse_config(text: str, kind: str = "cpu") -> Config:
    """`"batch=8,threads=2"` -> CpuConfig(threads=2, batch=8) (the CLI's config syntax)."""
    values: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = part.partition("=")
        if not sep:
            raise ConfigError(f"config item '{part}' must be knob=value (e.g. 'batch=8,threads=2')")
        if raw.strip().lower() in ("true", "false"):
            values[key.strip()] = raw.strip().lower() == "true"
            continue
        try:
            values[key.strip()] = int(raw)
        except ValueError:
            try:
                values[key.strip()] = float(raw)
            except ValueError:
                raise ConfigError(f"config value '{raw}' of '{key}' is not a number") from None
    return config_from_dict(kind, values)
