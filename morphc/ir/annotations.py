"""Typed, frozen annotations attached to nodes or to a whole Program.

An annotation kind is a frozen dataclass registered under a stable `kind` string, so it can be
saved with the Program and validated by the verifier. Fields hold JSON values (str, int, float,
bool, None) and tuples of them; lists read back from JSON become tuples again.

Later capabilities (load plans, serving configs, fusion provenance, cost estimates) add their own
kinds with `@annotation(...)` without touching the IR.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from morphc.errors import SerializationError, did_you_mean

if TYPE_CHECKING:
    import torch.fx as fx

    from morphc.ir.program import Program

ANNOTATIONS_KEY = "morphc.annotations"  # node.meta[ANNOTATIONS_KEY] -> dict[kind, Annotation]
Scope = Literal["node", "program"]


class Annotation:
    """Base of every annotation kind. Subclasses are created with the `@annotation` decorator."""

    kind: ClassVar[str]
    scope: ClassVar[Scope]

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        """Problems with this annotation in its place (empty when valid). Override to add checks."""
        return []

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


_REGISTRY: dict[str, type[Annotation]] = {}
A = TypeVar("A", bound=type[Annotation])


def annotation(kind: str, *, scope: Scope) -> Callable[[A], A]:
    """Make a class a frozen dataclass annotation registered under `kind`."""

    def wrap(cls: A) -> A:
        if kind in _REGISTRY and _REGISTRY[kind].__qualname__ != cls.__qualname__:
            raise ValueError(f"annotation kind '{kind}' is already registered by {_REGISTRY[kind].__qualname__}")
        cls.kind = kind
        cls.scope = scope
        dc = dataclasses.dataclass(frozen=True)(cls)
        _REGISTRY[kind] = dc
        return dc

    return wrap


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def annotation_from_json(data: dict[str, Any]) -> Annotation:
    """Rebuild an annotation saved with `to_json`; clear error for unknown kinds or fields."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in _REGISTRY:
        raise SerializationError(
            f"unknown annotation kind {kind!r}{did_you_mean(str(kind), _REGISTRY)}; "
            f"known kinds: {', '.join(sorted(_REGISTRY))} (was the module defining it imported?)"
        )
    cls = _REGISTRY[kind]
    try:
        return cls(**{k: _tuplify(v) for k, v in data.items()})
    except TypeError as exc:
        raise SerializationError(f"annotation '{kind}' cannot be rebuilt from {data}: {exc}") from exc


# --- annotation kinds the core itself writes -------------------------------------------------


@annotation("shared-by", scope="node")
class SharedBy(Annotation):
    """This node computes a value several task models used to compute separately (set by `cse`)."""

    tasks: tuple[str, ...]

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        unknown = [t for t in self.tasks if t not in program.tasks]
        return [f"shared-by names unknown task(s) {unknown}; tasks are {list(program.tasks)}"] if unknown else []


@annotation("pipeline-history", scope="program")
class PipelineHistory(Annotation):
    """The pipeline texts applied to this Program, oldest first (written by the PassManager)."""

    pipelines: tuple[str, ...]


# --- serving configuration (written by the `annotate-config` pass, applied by morphc.runtime.serving) ---

SERVING_BACKENDS = ("eager", "onnxruntime")
SERVING_DEVICES = ("cpu", "cuda")
# backend options the runtime knows how to apply, with their valid values (None: any int >= 1)
SERVING_BACKEND_OPTIONS: dict[str, dict[str, tuple[Any, ...] | None]] = {
    "eager": {},
    "onnxruntime": {"optimization": ("disable", "basic", "extended", "all"),
                    "execution_mode": ("sequential", "parallel"), "inter_op_threads": None,
                    "allow_spinning": (True, False)},
}


@annotation("serving-config", scope="program")
class ServingConfig(Annotation):
    """The serving configuration chosen for this Program (batch, threads, backend and its options,
    GPU share), with the objective and SLO it was chosen for and what it measured.

    `pipeline` is pass pipeline text the runtime applies before serving ("" = none);
    `backend_options` is a tuple of (name, value) pairs; `sm_share` / `time_quota` are GPU knobs
    (CUDA MPS active-thread percentage, FaST-GShare time quota) and stay None on CPU;
    `flush_denormal` serves with subnormal floats flushed to zero (x86 FTZ/DAZ: Intel CPUs compute on
    subnormals through slow microcode assists; only values below 1.2e-38 change).
    """

    batch: int
    threads: int
    backend: str = "eager"
    device: str = "cpu"
    pipeline: str = ""
    backend_options: tuple[tuple[str, Any], ...] = ()
    sm_share: int | None = None
    time_quota: float | None = None
    flush_denormal: bool = False
    objective: str = "throughput-per-core"
    slo_ms: float | None = None
    latency_ms: float | None = None  # measured under this config (per batch)
    throughput: float | None = None  # measured requests per second
    trials: int = 0  # configurations measured to choose it
    tuner: str = ""

    def options(self) -> dict[str, Any]:
        return dict(self.backend_options)

    def validate(self, program: Program, node: fx.Node | None) -> list[str]:
        problems: list[str] = []
        if not isinstance(self.batch, int) or self.batch < 1:
            problems.append(f"batch must be an integer >= 1, got {self.batch!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            problems.append(f"threads must be an integer >= 1, got {self.threads!r}")
        if self.device not in SERVING_DEVICES:
            problems.append(f"device must be one of {', '.join(SERVING_DEVICES)}, got {self.device!r}")
        if self.backend not in SERVING_BACKENDS:
            problems.append(f"backend must be one of {', '.join(SERVING_BACKENDS)}, got {self.backend!r}")
        else:
            valid = SERVING_BACKEND_OPTIONS[self.backend]
            for key, value in self.backend_options:
                if key not in valid:
                    problems.append(f"backend '{self.backend}' has no option '{key}'; valid: {sorted(valid) or 'none'}")
                elif valid[key] is None and (not isinstance(value, int) or value < 1):
                    problems.append(f"option '{key}' must be an integer >= 1, got {value!r}")
                elif valid[key] is not None and value not in valid[key]:  # type: ignore[operator]
                    problems.append(f"option '{key}' must be one of {valid[key]}, got {value!r}")
        if self.sm_share is not None and (self.device != "cuda" or not 1 <= self.sm_share <= 100):
            problems.append(f"sm_share is a CUDA MPS percentage in 1..100 on device cuda, got {self.sm_share!r} "
                            f"on {self.device}")
        if self.time_quota is not None and (self.device != "cuda" or not 0 < self.time_quota <= 1):
            problems.append(f"time_quota is a share in (0, 1] on device cuda, got {self.time_quota!r} on {self.device}")
        if not isinstance(self.flush_denormal, bool):
            problems.append(f"flush_denormal must be true or false, got {self.flush_denormal!r}")
        elif self.flush_denormal and self.device != "cpu":
            problems.append("flush_denormal is a CPU knob (x86 FTZ/DAZ), got it on device "
                            f"{self.device}; valid there: false")
        if self.slo_ms is not None and self.slo_ms <= 0:
            problems.append(f"slo_ms must be > 0, got {self.slo_ms}")
        leading = {spec.shape[0] for spec in program.inputs if len(spec.shape) >= 1}
        if isinstance(self.batch, int) and leading and self.batch not in leading:
            problems.append(f"batch {self.batch} does not match the program's input batch "
                            f"({', '.join(str(s) for s in program.inputs)}); shapes are static: lower the "
                            f"models at batch {self.batch}")
        return problems
