"""Replaying tuners against ground-truth tables: identical data for every tuner, no re-measurement.

Shared by `benchmarks/tuner.py` and the tests: meta-training from tables, the per-model SLO, the
optimum, running morphc or a baseline with a table as the measurement function, and the metrics
(samples needed to get within 5% of the optimum, best found at a budget).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from morphc.predictors.tuner.baselines import BASELINES, make_baseline
from morphc.predictors.tuner.groundtruth import Table
from morphc.predictors.tuner.maml import MetaConfig, MetaModel, TaskData, meta_train
from morphc.predictors.tuner.smbo import ACQUISITIONS, SMBOTuner, TuneResult, run_loop
from morphc.predictors.tuner.space import TuningConfig, objective_vector

TUNERS = tuple(f"morphc-{a}" for a in ACQUISITIONS) + BASELINES


def task_data(table: Table) -> TaskData:
    return TaskData(table.space.features(), table.embedding, np.log(table.latency_ms).astype(np.float32))


def train_meta(tables: Sequence[Table], config: MetaConfig | None = None) -> MetaModel:
    """Meta-train on these tables (the held-out models must not be among them)."""
    return meta_train([task_data(t) for t in tables], config, names=[t.name for t in tables])


def slo_for(table: Table, factor: float) -> float:
    """A per-model SLO: `factor` x the lowest batch-1 latency of any config (tables span 0.1-100 ms)."""
    batch1 = [lat for c, lat in zip(table.space.configs, table.latency_ms) if c.batch == 1]
    return float(factor * min(batch1))


def optimum(table: Table, objective: str, slo_ms: float | None) -> float:
    return float(objective_vector(table.space, table.latency_ms, objective, slo_ms).max())


def evaluator(table: Table) -> Any:
    by_config = dict(zip(table.space.configs, table.latency_ms))

    def evaluate(config: TuningConfig) -> float:
        return float(by_config[config])

    return evaluate


def replay(tuner: str, table: Table, *, objective: str, slo_ms: float | None, budget: int, seed: int,
           meta: MetaModel | None = None, delta: float = 0.5) -> TuneResult:
    """Run one tuner on one table for `budget` distinct measurements."""
    if tuner.startswith("morphc-"):
        if meta is None:
            raise ValueError(f"tuner '{tuner}' needs a meta-model trained without '{table.name}'")
        smbo = SMBOTuner(meta, table.space, table.embedding, objective=objective, slo_ms=slo_ms,
                         acquisition=tuner.removeprefix("morphc-"), delta=delta, seed=seed)
        return smbo.run(evaluator(table), budget)
    base = make_baseline(tuner, table.space, objective=objective, slo_ms=slo_ms, seed=seed)
    return run_loop(base, evaluator(table), budget, strategy=tuner)


def samples_to_within(result: TuneResult, best: float, tolerance: float = 0.05) -> int | None:
    """1-based number of measurements after which the best found is within `tolerance` of `best`."""
    for n, value in enumerate(result.best_so_far(), start=1):
        if value >= (1.0 - tolerance) * best:
            return n
    return None


def quality_at(result: TuneResult, best: float, budget: int) -> float:
    """Best found after `budget` measurements, as a fraction of the optimum."""
    curve = result.best_so_far()
    return curve[min(budget, len(curve)) - 1] / best if best > 0 else 0.0
