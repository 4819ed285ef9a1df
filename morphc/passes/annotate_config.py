"""`annotate-config`: choose the serving configuration and write it into the Program.

    annotate-config{slo-ms=20,objective=throughput-per-core,budget=10,strategy=ensemble-ei}

The tuner comes from the PassContext (`ctx.options["tuner"]`, an object with the `ConfigTuner`
protocol below, e.g. `morphc.predictors.tuner.service.ConfigTuner`), its measurements and trials go
to `ctx.records`, and `ctx.cost_model` is handed to it (the GNN embedding, when it has one). The
pass imports nothing from `morphc.predictors`: passes depend on the IR only, predictors bring
heavy optional dependencies (jax, optuna, scikit-learn) and a ground-truth database, and the
caller decides which tuner, meta-model and executor to use (`morphc tune` builds one). The
chosen config is written as a `serving-config` annotation and verified; `morphc.runtime.serving`
applies it. By default only the Program's own batch is searched (shapes are static); with
`rebatch=true` and a tuner that has the model's source, other batch sizes are searched too and the
result is the Program lowered at the chosen batch (so the pass does not claim `preserves_semantics`:
output shapes follow the batch; rewrites of earlier passes are not replayed on it, so put it
first). When no measured config meets the SLO, the pass fails with the fastest latency found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from morphc.errors import MorphcError, VerificationError
from morphc.ir.annotations import ServingConfig
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, option, register_pass
from morphc.passes.manager import PassContext


class TunerOutcome(Protocol):
    annotation: ServingConfig
    program: Program


class ConfigTuner(Protocol):
    """What the pass needs from `ctx.options["tuner"]`."""

    def tune(self, program: Program, *, slo_ms: float | None, objective: str, budget: int, strategy: str,
             seed: int, records: Any, cost_model: Any, rebatch: bool, flush_denormal: bool) -> TunerOutcome: ...


class MissingTunerError(MorphcError):
    """`annotate-config` ran without a tuner in the PassContext."""


@register_pass
@dataclass(frozen=True)
class AnnotateConfig(Pass):
    """Pick the serving config (batch, threads, backend and options) with the meta-learned tuner under a
    latency SLO, and write it as a `serving-config` annotation that the runtime applies."""

    name: ClassVar[str] = "annotate-config"
    preserves_semantics: ClassVar[bool] = False  # may return the program lowered at the chosen batch
    opt_level: ClassVar[int] = 0
    context_needs: ClassVar[tuple[str, ...]] = ("options['tuner']",)

    slo_ms: float = option(0.0, "latency SLO per batch in milliseconds (0: no SLO)")
    objective: Literal["throughput-per-core", "throughput", "latency"] = option(
        "throughput-per-core", "what to maximize among configs that meet the SLO")
    budget: int = option(10, "configurations to measure")
    strategy: Literal["morphling", "ensemble-ei"] = option("ensemble-ei", "acquisition of the SMBO loop")
    seed: int = option(0, "seed of the tuner (tie-breaking, baselines)")
    rebatch: bool = option(False, "search other batch sizes too and return the program lowered at the chosen one "
                                  "(needs a tuner with a model source; earlier rewrites are not replayed on it)")
    flush_denormal: bool = option(False, "measure and serve with subnormal floats flushed to zero (CPU FTZ/DAZ): "
                                         "Intel CPUs compute on subnormals through slow microcode assists")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        tuner = ctx.options.get("tuner")
        if tuner is None or not hasattr(tuner, "tune"):
            raise MissingTunerError(
                "annotate-config needs a tuner in PassContext.options['tuner'], e.g. "
                "morphc.predictors.tuner.service.ConfigTuner(source='zoo:NAME') (`morphc tune` sets one up); "
                f"got {type(tuner).__name__ if tuner is not None else 'none'}")
        if self.budget < 1:
            raise MorphcError(f"option 'budget' of pass 'annotate-config' must be >= 1, got {self.budget}")
        outcome = tuner.tune(program, slo_ms=self.slo_ms or None, objective=self.objective, budget=self.budget,
                             strategy=self.strategy, seed=self.seed, records=ctx.records, cost_model=ctx.cost_model,
                             rebatch=self.rebatch, flush_denormal=self.flush_denormal)
        chosen = outcome.program
        for kind, ann in program.annotations.items():  # a re-lowered program keeps the program-level history
            if chosen is not program and kind not in chosen.annotations:
                chosen.annotations[kind] = ann
        problems = outcome.annotation.validate(chosen, None)
        if problems:
            raise VerificationError([f"annotation 'serving-config': {p}" for p in problems], after_pass=self.name)
        chosen.annotate(outcome.annotation)
        ann = outcome.annotation
        stats = {"trials": float(ann.trials), "batch": float(ann.batch), "threads": float(ann.threads),
                 "latency_ms": float(ann.latency_ms or 0.0), "throughput": float(ann.throughput or 0.0)}
        return PassResult(chosen, modified=False, statistics=stats)
