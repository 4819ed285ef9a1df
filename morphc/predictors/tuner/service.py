"""`ConfigTuner`: the meta-learned tuner as a service for the `annotate-config` pass and `morphc tune`.

Given a Program (and, optionally, the source it was lowered from, so other batch sizes can be
lowered too), it meta-trains or loads the meta-model, measures the configs the SMBO loop picks
(through an executor for sources; in this process for a bare Program), stores every measurement
and trial in the records DB (so a killed run resumes, and a config measured once is not measured
again), and returns the best config as a `serving-config` annotation with the Program lowered at
its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from morphc.ir.annotations import ServingConfig
from morphc.ir.program import Program
from morphc.predictors.records import RecordsDB, device_fingerprint, program_fingerprint
from morphc.predictors.tuner.embedding import embed
from morphc.predictors.tuner.groundtruth import (
    SERVING_LATENCY,
    ChunkJob,
    load_tables,
    measure_chunk,
    measure_config,
)
from morphc.predictors.tuner.maml import MetaConfig, MetaModel
from morphc.predictors.tuner.smbo import SMBOTuner, Trial, TrialLog, TuneResult
from morphc.predictors.tuner.sources import ModelSource
from morphc.predictors.tuner.space import TuningConfig, TuningError, TuningSpace, cpu_space

DEFAULT_GROUNDTRUTH = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "tuner-groundtruth.sqlite"


@dataclass(frozen=True)
class TuneOutcome:
    """What the pass writes: the annotation, the Program at the chosen batch, and the run behind it."""

    annotation: ServingConfig
    program: Program
    result: TuneResult


def _program_batch(program: Program) -> int:
    shapes = [s.shape for s in program.inputs if len(s.shape) >= 1]
    return int(shapes[0][0]) if shapes else 1


@dataclass
class ConfigTuner:
    """See the module docstring. `meta` defaults to one meta-trained on `groundtruth` (models other
    than the one being tuned); `source` enables the batch knob (else only the Program's batch)."""

    meta: MetaModel | None = None
    groundtruth: str | Path | None = DEFAULT_GROUNDTRUTH
    source: str | None = None
    space: TuningSpace = field(default_factory=cpu_space)
    embedding: str = "static"
    executor: str = "local"
    workers: int = 1
    warmup: int = 2
    repeats: int = 9
    lock: str | None = None
    meta_config: MetaConfig = field(default_factory=MetaConfig)
    on_trial: Callable[[Trial], None] | None = None
    last: TuneOutcome | None = field(default=None, init=False)  # the latest outcome (for reports)

    def meta_model(self, exclude: str | None = None) -> MetaModel:
        if self.meta is not None:
            return self.meta
        if self.groundtruth is None or not Path(self.groundtruth).exists():
            raise TuningError(f"no meta-model given and no ground-truth database at '{self.groundtruth}' to "
                              "meta-train one (collect it with `python benchmarks/tuner.py collect`)")
        from morphc.predictors.tuner.evaluation import train_meta

        tables = [t for t in load_tables(RecordsDB(self.groundtruth), self.space) if t.fingerprint != exclude]
        if not tables:
            raise TuningError(f"the ground-truth database '{self.groundtruth}' has no complete table for space "
                              f"'{self.space.name}'")
        self.meta = train_meta(tables, self.meta_config)
        return self.meta

    def tune(self, program: Program, *, slo_ms: float | None, objective: str, budget: int,
             strategy: str = "morphling", seed: int = 0, records: Any = None, cost_model: Any = None,
             delta: float = 0.5, rebatch: bool = True, flush_denormal: bool = False) -> TuneOutcome:
        """Tune `program`; with `rebatch` and a source, every batch of the space is searched; with
        `flush_denormal` every config is measured, and the chosen one served, with subnormals flushed."""
        db = records if isinstance(records, RecordsDB) else RecordsDB(records or ":memory:")
        source = ModelSource(self.source) if self.source else None
        base = source.program(1) if source and rebatch else program
        fp = program_fingerprint(base)
        if not rebatch:
            source = None
        space = self.space if source else self.space.restrict(batches=[_program_batch(program)])
        space = space.with_flush(flush_denormal)
        device = device_fingerprint("cpu")
        if not space.measurable_here:
            raise TuningError(f"space '{space.name}' cannot be measured here: {'; '.join(space.notes)}")
        emb = embed(base, self.embedding, cost_model)
        meta = self.meta_model(exclude=fp)
        if emb.shape[-1] != meta.params[0][0].shape[-2] - space.features().shape[1]:
            raise TuningError(f"the meta-model was trained with another embedding size than '{self.embedding}' gives")

        def evaluate(config: TuningConfig) -> float:
            stored = db.get(SERVING_LATENCY, fp, device, config.key())
            if stored is not None:
                return float(stored.stats["median_ms"])
            if source is not None:
                from morphc.runtime.executors import get_executor

                job = ChunkJob(source.text, (tuple(sorted(config.key().items())),), self.warmup, self.repeats,
                               self.lock)
                with get_executor(self.executor, max_workers=self.workers) as pool:
                    [(_, stats)] = pool.map(measure_chunk, [job])[0]
            else:
                stats = measure_config(program, config, warmup=self.warmup, repeats=self.repeats)
            db.put(SERVING_LATENCY, fp, device, config.key(), stats)
            return float(stats["median_ms"])

        run_id = f"{space.name}|{objective}|slo={slo_ms}|{strategy}|seed={seed}"
        tuner = SMBOTuner(meta, space, np.asarray(emb), objective=objective, slo_ms=slo_ms, acquisition=strategy,
                          delta=delta, seed=seed)
        result = tuner.run(evaluate, budget, log=TrialLog(db, fp, device, run_id), on_trial=self.on_trial)
        best = result.require_best()
        chosen = program if best.config.batch == _program_batch(program) or source is None \
            else source.program(best.config.batch).clone()
        annotation = best.config.to_serving(
            objective=objective, slo_ms=slo_ms, latency_ms=best.latency_ms,
            throughput=best.config.batch * 1000.0 / best.latency_ms, trials=len(result.trials),
            tuner=f"morphc-{strategy}")
        self.last = TuneOutcome(annotation, chosen, result)
        return self.last
