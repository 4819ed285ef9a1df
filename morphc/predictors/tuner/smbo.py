"""The SMBO loop: start from the meta-model, measure the config the acquisition picks, adapt, repeat.

Each step adapts the meta-model to every measurement so far (closed-form offset + MAML inner steps)
and scores every unmeasured config in log-objective space, weighted by its predicted probability
of meeting the latency SLO:

- `morphling` (Morphling, SoCC'21): prediction of the adapted model f_θ' plus δ·|f_θ' - f_θ|, where
  f_θ is the meta-initialization with only its offset fitted: configs whose prediction the
  measurements moved most are the ones the meta-model knew least about.
- `ensemble-ei`: expected improvement over the best feasible measurement, with the mean and spread
  of the adapted ensemble members.

The loop stops at the budget, after `patience` trials without a 1% improvement (if set), or when
the space is exhausted. Trials go to a `TrialLog` (records DB) as they are measured; a run started
again with the same log continues from them instead of measuring again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from morphc.predictors.records import RecordsDB
from morphc.predictors.tuner.maml import MetaModel
from morphc.predictors.tuner.space import (
    OBJECTIVES,
    InfeasibleSLOError,
    TuningConfig,
    TuningError,
    TuningSpace,
    objective_value,
)

ACQUISITIONS = ("morphling", "ensemble-ei")
TUNING_TRIAL = "tuning-trial"


@dataclass(frozen=True)
class Trial:
    """One measured config: latency (ms per batch) and objective (None: SLO missed)."""

    index: int
    config: TuningConfig
    latency_ms: float
    value: float | None


@dataclass
class TuneResult:
    """What a tuning run measured, in order, and why it stopped."""

    trials: list[Trial]
    strategy: str
    stopped: str
    slo_ms: float | None
    objective: str

    @property
    def best(self) -> Trial | None:
        feasible = [t for t in self.trials if t.value is not None]
        return max(feasible, key=lambda t: t.value) if feasible else None  # type: ignore[arg-type,return-value]

    @property
    def fastest(self) -> Trial:
        return min(self.trials, key=lambda t: t.latency_ms)

    def require_best(self) -> Trial:
        """The best feasible trial, or InfeasibleSLOError naming the fastest config measured."""
        best = self.best
        if best is not None:
            return best
        fastest = self.fastest
        raise InfeasibleSLOError(
            f"no configuration met the latency SLO of {self.slo_ms:g} ms after {len(self.trials)} trial(s) "
            f"({self.strategy}); the fastest measured was {fastest.latency_ms:.3g} ms per batch "
            f"({fastest.config.label()}): raise slo-ms to at least {math.ceil(fastest.latency_ms * 100) / 100:g}, "
            "or give the tuner a larger budget")

    def best_so_far(self) -> list[float]:
        """Best feasible objective after each trial (0 until one is feasible)."""
        out, best = [], 0.0
        for t in self.trials:
            best = max(best, t.value or 0.0)
            out.append(best)
        return out


Evaluate = Callable[[TuningConfig], float]  # config -> measured latency in ms


class TrialLog:
    """Trials of one tuning run in the records DB (kind `tuning-trial`), keyed by model, device and run id."""

    def __init__(self, db: RecordsDB, model: str, device: str, run: str) -> None:
        self.db, self.model, self.device, self.run = db, model, device, run

    def load(self) -> list[tuple[TuningConfig, float]]:
        rows = [r for r in self.db.query(TUNING_TRIAL, self.model, self.device) if r.config.get("run") == self.run]
        rows.sort(key=lambda r: r.stats["order"])
        return [(TuningConfig.from_key({k: v for k, v in r.config.items() if k != "run"}), r.stats["latency_ms"])
                for r in rows]

    def append(self, order: int, config: TuningConfig, latency_ms: float, value: float | None) -> None:
        self.db.put(TUNING_TRIAL, self.model, self.device, {**config.key(), "run": self.run},
                    {"order": order, "latency_ms": latency_ms, "value": value})


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(z)


@dataclass
class SMBOTuner:
    """Meta-learned SMBO over a finite space (see the module docstring)."""

    meta: MetaModel
    space: TuningSpace
    embedding: np.ndarray
    objective: str = "throughput-per-core"
    slo_ms: float | None = None
    acquisition: str = "morphling"
    delta: float = 0.5
    patience: int | None = None
    seed: int = 0
    name: str = field(default="morphc", init=False)

    def __post_init__(self) -> None:
        if self.acquisition not in ACQUISITIONS:
            raise TuningError(f"unknown acquisition '{self.acquisition}'; valid: {', '.join(ACQUISITIONS)}")
        if self.objective not in OBJECTIVES:
            raise TuningError(f"unknown objective '{self.objective}'; valid: {', '.join(OBJECTIVES)}")
        self.features = self.space.features()
        configs = self.space.configs
        batch = np.array([c.batch for c in configs], dtype=np.float64)
        cores = np.array([c.cores() for c in configs], dtype=np.float64)
        # log objective = log_scale - log latency
        if self.objective == "throughput-per-core":
            self.log_scale = np.log(batch * 1000.0 / cores)
        elif self.objective == "throughput":
            self.log_scale = np.log(batch * 1000.0)
        else:
            self.log_scale = np.full(len(configs), np.log(1000.0))

    def _log_objective(self, log_latency: np.ndarray) -> np.ndarray:
        return self.log_scale[None, :] - log_latency

    def _feasible_prob(self, log_latency: np.ndarray) -> np.ndarray:
        if self.slo_ms is None:
            return np.ones(log_latency.shape[1])
        mu, sd = log_latency.mean(0), log_latency.std(0) + 0.15
        return _norm_cdf((math.log(self.slo_ms) - mu) / sd)

    def scores(self, trials: Sequence[Trial]) -> np.ndarray:
        """Acquisition value of every config of the space (measured ones get -inf)."""
        idx = np.array([t.index for t in trials], dtype=np.int64)
        logs = np.log(np.array([t.latency_ms for t in trials], dtype=np.float64))
        adapted = self.meta.predict(self.features, self.embedding,
                                    self.meta.adapt(self.features[idx], self.embedding, logs) if len(idx) else None)
        p_feas = self._feasible_prob(adapted)
        lo = self._log_objective(adapted)
        if self.acquisition == "morphling":
            if len(idx):
                init = self.meta.predict(self.features, self.embedding,
                                         self.meta.adapt(self.features[idx], self.embedding, logs, steps=0))
                bonus = self.delta * np.abs(adapted.mean(0) - init.mean(0))
            else:
                bonus = 0.0
            score = lo.mean(0) + bonus + np.log(np.maximum(p_feas, 1e-12))
        else:
            mu, sd = lo.mean(0), lo.std(0) + 0.05
            feasible = [t.value for t in trials if t.value is not None]
            if feasible:
                z = (mu - math.log(max(feasible))) / sd
                ei = sd * (z * _norm_cdf(z) + np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
                score = np.log(np.maximum(ei, 1e-300)) + np.log(np.maximum(p_feas, 1e-12))
            else:  # nothing feasible yet: the likeliest feasible config, tie-broken by predicted objective
                score = np.log(np.maximum(p_feas, 1e-12)) + 1e-3 * mu
        score = np.asarray(score, dtype=np.float64).copy()
        score[idx] = -np.inf
        return score

    def suggest(self, trials: Sequence[Trial]) -> int:
        score = self.scores(trials)
        best = np.flatnonzero(score == score.max())
        return int(best[np.random.default_rng(self.seed + len(trials)).integers(len(best))])

    def run(self, evaluate: Evaluate, budget: int, *, log: TrialLog | None = None,
            on_trial: Callable[[Trial], None] | None = None) -> TuneResult:
        return run_loop(self, evaluate, budget, log=log, on_trial=on_trial, patience=self.patience,
                        strategy=f"morphc ({self.acquisition})")


class Suggester:
    """What every tuner provides to `run_loop`: the next index to measure given the trials so far."""

    space: TuningSpace
    objective: str
    slo_ms: float | None

    def suggest(self, trials: Sequence[Trial]) -> int:  # pragma: no cover - interface
        raise NotImplementedError


def run_loop(tuner: Any, evaluate: Evaluate, budget: int, *, log: TrialLog | None = None,
             on_trial: Callable[[Trial], None] | None = None, patience: int | None = None,
             strategy: str = "") -> TuneResult:
    """Measure up to `budget` distinct configs picked by `tuner.suggest`, resuming from `log`."""
    if budget < 1:
        raise TuningError(f"budget must be >= 1 measurement, got {budget}")
    space = tuner.space
    trials: list[Trial] = []

    def record(index: int, latency: float) -> Trial:
        config = space.configs[index]
        trial = Trial(index, config, latency, objective_value(config, latency, tuner.objective, tuner.slo_ms))
        trials.append(trial)
        if on_trial is not None:
            on_trial(trial)
        return trial

    for config, latency in (log.load() if log is not None else []):
        record(space.index(config), latency)
    stopped = "budget"
    since_improvement, best = 0, 0.0
    while len(trials) < budget:
        if len(trials) == len(space):
            stopped = "exhausted"
            break
        if patience is not None and since_improvement >= patience:
            stopped = "patience"
            break
        index = tuner.suggest(trials)
        if any(t.index == index for t in trials):
            raise TuningError(f"{strategy or type(tuner).__name__} suggested config {index} twice")
        latency = float(evaluate(space.configs[index]))
        trial = record(index, latency)
        if log is not None:
            log.append(len(trials) - 1, trial.config, latency, trial.value)
        if (trial.value or 0.0) > best * 1.01:
            best, since_improvement = trial.value or 0.0, 0
        else:
            since_improvement += 1
    return TuneResult(trials, strategy or type(tuner).__name__, stopped, tuner.slo_ms, tuner.objective)
