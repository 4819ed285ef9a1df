"""The serving-configuration space the tuner searches, its features, and the objective.

Built on the device profiles of `morphc.predictors.spaces` (the GPU knobs come from the GPU
profile; the CPU batch and thread values of `cpu-v1` are pinned here so stored tables keep their
meaning when the profiler's sweep changes) and extended with what the serving runtime can apply
(`morphc.runtime.serving`): the target backend and its options.

CPU space (measured here), per (batch in 1,2,4,8) x (intra-op threads in 1,2):
    eager                      the Program as lowered
    eager + optimizing pipeline  `fold-batchnorm,fold-constants,cse,dce` first
    onnxruntime                optimization disable|basic|extended|all
                               x execution sequential | parallel with 1 or 2 inter-op threads
                               x thread spinning on|off
= 8 x 26 = 208 configurations.

GPU space (declared, not measurable on these machines: no GPU): batch x SM share (MPS active
thread percentage) x time quota, from the GPU profile (6 x 6 x 4 = 144 configurations).

Objective: higher is better. `throughput-per-core` (default) = requests/s per CPU core occupied,
`throughput` = requests/s, `latency` = 1000 / latency_ms; a config whose latency (one batch, which
is what a request waits for when the batch fills at once) exceeds the SLO is infeasible.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from morphc.errors import MorphcError
from morphc.ir.annotations import ServingConfig
from morphc.predictors import spaces

OPT_PIPELINE = "fold-batchnorm,fold-constants,cse,dce"
ORT_LEVELS = ("disable", "basic", "extended", "all")
OBJECTIVES = ("throughput-per-core", "throughput", "latency")


class TuningError(MorphcError, ValueError):
    """Bad tuning input: unknown objective or knob, an empty space, a budget below 1."""


class InfeasibleSLOError(MorphcError):
    """No measured configuration meets the latency SLO; the message names the fastest one."""


@dataclass(frozen=True, order=True)
class TuningConfig:
    """One point of the space. ONNX Runtime options are None for eager configs."""

    batch: int
    threads: int
    backend: str = "eager"
    pipeline: str = ""
    optimization: str | None = None
    execution_mode: str | None = None
    inter_op_threads: int | None = None
    allow_spinning: bool | None = None
    device: str = "cpu"
    sm_share: int | None = None
    time_quota: float | None = None
    flush_denormal: bool = False  # not a dimension of the spaces: a tuning run sets it for all (`with_flush`)

    def key(self) -> dict[str, Any]:
        """The records-database key (only the fields that are set; flush_denormal only when on, so the
        keys stored before it existed keep their meaning)."""
        return {k: v for k, v in asdict(self).items()
                if v is not None and v != "" and not (k == "flush_denormal" and not v)}

    @staticmethod
    def from_key(key: dict[str, Any]) -> TuningConfig:
        return TuningConfig(**key)

    def backend_options(self) -> tuple[tuple[str, Any], ...]:
        if self.backend != "onnxruntime":
            return ()
        opts = (("optimization", self.optimization), ("execution_mode", self.execution_mode),
                ("inter_op_threads", self.inter_op_threads), ("allow_spinning", self.allow_spinning))
        return tuple((k, v) for k, v in opts if v is not None)

    def to_serving(self, **extra: Any) -> ServingConfig:
        return ServingConfig(batch=self.batch, threads=self.threads, backend=self.backend, device=self.device,
                             pipeline=self.pipeline, backend_options=self.backend_options(),
                             sm_share=self.sm_share, time_quota=self.time_quota,
                             flush_denormal=self.flush_denormal, **extra)

    def cores(self) -> int:
        extra = (self.inter_op_threads or 1) - 1 if self.execution_mode == "parallel" else 0
        return self.threads + extra

    def label(self) -> str:
        if self.device == "cuda":
            return f"b{self.batch} sm{self.sm_share}% q{self.time_quota}"
        head = f"b{self.batch} t{self.threads} "
        tail = " ftz" if self.flush_denormal else ""
        if self.backend == "eager":
            return head + ("eager+opt" if self.pipeline else "eager") + tail
        mode = "seq" if self.execution_mode == "sequential" else f"par{self.inter_op_threads}"
        return head + f"ort {self.optimization} {mode}{' spin' if self.allow_spinning else ''}" + tail


@dataclass(frozen=True)
class TuningSpace:
    """A finite, ordered set of configs with a fixed-length feature vector for each."""

    name: str
    configs: tuple[TuningConfig, ...]
    measurable_here: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.configs)

    def index(self, config: TuningConfig) -> int:
        try:
            return self.configs.index(config)
        except ValueError:
            raise TuningError(f"config {config.label()} is not in space '{self.name}'") from None

    def restrict(self, *, batches: Iterable[int] | None = None) -> TuningSpace:
        """The sub-space with only these batch sizes (e.g. the one batch a saved Program has)."""
        allowed = set(batches) if batches is not None else None
        kept = tuple(c for c in self.configs if allowed is None or c.batch in allowed)
        if not kept:
            raise TuningError(f"no config of space '{self.name}' has batch in {sorted(allowed or [])}; "
                              f"batches: {sorted({c.batch for c in self.configs})}")
        return TuningSpace(f"{self.name}[batch={','.join(map(str, sorted(allowed or [])))}]", kept,
                           self.measurable_here, self.notes)

    def with_flush(self, on: bool) -> TuningSpace:
        """The same space with every config serving with subnormals flushed (or not): the meta-model's
        features stay the same, the measurements and the chosen annotation carry the knob."""
        if not on:
            return self
        if not self.measurable_here or any(c.device != "cpu" for c in self.configs):
            raise TuningError(f"flush_denormal is a CPU knob; space '{self.name}' is not a CPU space")
        return TuningSpace(f"{self.name}+ftz", tuple(dataclasses.replace(c, flush_denormal=True) for c in self.configs),
                           self.measurable_here, self.notes)

    def features(self) -> np.ndarray:
        """(n_configs, n_features) float32 matrix, the tuner's view of each config."""
        return np.stack([config_features(c) for c in self.configs]).astype(np.float32)


def config_features(c: TuningConfig) -> np.ndarray:
    """Numeric description of a config: log batch, threads, backend and option one-hots, cores."""
    if c.device == "cuda":
        return np.array([np.log2(c.batch), (c.sm_share or 100) / 100, c.time_quota or 1.0], dtype=np.float32)
    ort = c.backend == "onnxruntime"
    level = [float(ort and c.optimization == lvl) for lvl in ORT_LEVELS]
    return np.array([
        np.log2(c.batch), c.threads - 1.0, float(c.backend == "eager" and not c.pipeline),
        float(c.backend == "eager" and bool(c.pipeline)), float(ort), *level,
        float(c.execution_mode == "parallel"), float((c.inter_op_threads or 1) - 1), float(bool(c.allow_spinning)),
        np.log2(c.cores()),
    ], dtype=np.float32)


# Pinned, not read from spaces.CPU: a named space must not change under stored tables when the
# profiler's sweep changes (cpu-v1 was collected with these values).
CPU_V1_BATCHES = (1, 2, 4, 8)
CPU_V1_THREADS = (1, 2)


def cpu_space(batches: Sequence[int] | None = None, threads: Sequence[int] | None = None) -> TuningSpace:
    """The CPU space (see the module docstring): cpu-v1, or a sub-space with other batch/thread values."""
    batches = tuple(batches or CPU_V1_BATCHES)
    threads = tuple(threads or CPU_V1_THREADS)
    for t in threads:
        spaces.CpuConfig(threads=t, batch=batches[0])  # the CPU profile validates the knob values
    configs: list[TuningConfig] = []
    for b, t in itertools.product(batches, threads):
        configs.append(TuningConfig(b, t, "eager"))
        configs.append(TuningConfig(b, t, "eager", OPT_PIPELINE))
        for level, (mode, inter), spin in itertools.product(
                ORT_LEVELS, (("sequential", None), ("parallel", 1), ("parallel", 2)), (True, False)):
            configs.append(TuningConfig(b, t, "onnxruntime", "", level, mode, inter, spin))
    name = "cpu-v1" if (batches, threads) == (CPU_V1_BATCHES, CPU_V1_THREADS) else "cpu-custom"
    return TuningSpace(name, tuple(configs))


def gpu_space() -> TuningSpace:
    """The GPU space (batch x SM share x time quota), declared from the GPU profile; not measurable here."""
    profile = spaces.GPU
    configs = tuple(TuningConfig(batch=b, threads=1, device="cuda", sm_share=s, time_quota=q)
                    for b, s, q in itertools.product(profile.knob("batch").values, profile.knob("sm_share").values,
                                                     profile.knob("time_quota").values))
    return TuningSpace("cuda-v1", configs, measurable_here=False,
                       notes=("declared only: no GPU on this project's machines, so no GPU table is collected",))


def space_named(name: str) -> TuningSpace:
    spaces_by_name = {"cpu-v1": cpu_space, "cuda-v1": gpu_space}
    if name not in spaces_by_name:
        raise TuningError(f"unknown tuning space '{name}'; valid: {sorted(spaces_by_name)}")
    return spaces_by_name[name]()


def objective_value(config: TuningConfig, latency_ms: float, objective: str, slo_ms: float | None) -> float | None:
    """Higher-is-better score of a measured config, or None when it misses the SLO."""
    if objective not in OBJECTIVES:
        raise TuningError(f"unknown objective '{objective}'; valid: {', '.join(OBJECTIVES)}")
    if slo_ms is not None and latency_ms > slo_ms:
        return None
    if objective == "latency":
        return 1000.0 / latency_ms
    throughput = config.batch * 1000.0 / latency_ms
    return throughput / config.cores() if objective == "throughput-per-core" else throughput


def objective_vector(space: TuningSpace, latency_ms: np.ndarray, objective: str, slo_ms: float | None) -> np.ndarray:
    """Objective of every config from a latency vector; infeasible configs get 0."""
    values = [objective_value(c, float(lat), objective, slo_ms) for c, lat in zip(space.configs, latency_ms)]
    return np.array([v if v is not None else 0.0 for v in values], dtype=np.float64)
