"""Baseline tuners on the same spaces and budgets: random, grid, Optuna TPE, GP-based BO.

All optimize the objective value directly (an SLO miss scores 0), as a user of these libraries
would; each measures distinct configs (a TPE proposal of an already-measured config is answered
from the cache and not counted). They plug into `smbo.run_loop` like the meta-learned tuner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from morphc.predictors.tuner.smbo import Trial
from morphc.predictors.tuner.space import TuningConfig, TuningError, TuningSpace

BASELINES = ("random", "grid", "tpe", "gp-bo")


@dataclass
class _Base:
    space: TuningSpace
    objective: str = "throughput-per-core"
    slo_ms: float | None = None
    seed: int = 0

    def _unmeasured(self, trials: Sequence[Trial]) -> list[int]:
        seen = {t.index for t in trials}
        return [i for i in range(len(self.space)) if i not in seen]


@dataclass
class RandomSearch(_Base):
    """Uniform sampling without replacement."""

    name: str = "random"

    def suggest(self, trials: Sequence[Trial]) -> int:
        order = np.random.default_rng(self.seed).permutation(len(self.space))
        seen = {t.index for t in trials}
        return int(next(i for i in order if i not in seen))


def _coarse(c: TuningConfig) -> bool:
    """The coarse grid: plain eager, and ONNX Runtime at the extreme optimization levels, sequential, spinning."""
    if c.backend == "eager":
        return not c.pipeline
    return c.optimization in ("disable", "all") and c.execution_mode == "sequential" and bool(c.allow_spinning)


@dataclass
class GridSearch(_Base):
    """Coarse grid first (every batch x threads, a few backend settings), then the remaining configs;
    the seed only shuffles the order within each level."""

    name: str = "grid"

    def suggest(self, trials: Sequence[Trial]) -> int:
        rng = np.random.default_rng(self.seed)
        coarse = [i for i, c in enumerate(self.space.configs) if _coarse(c)]
        rest = [i for i, c in enumerate(self.space.configs) if not _coarse(c)]
        order = list(rng.permutation(coarse)) + list(rng.permutation(rest))
        seen = {t.index for t in trials}
        return int(next(i for i in order if i not in seen))


@dataclass
class TPESearch(_Base):
    """Optuna's TPE (default settings: 10 random startup trials), define-by-run over the conditional space."""

    name: str = "tpe"
    _study: Any = field(default=None, init=False, repr=False)
    _waiting: list[tuple[Any, int]] = field(default_factory=list, init=False, repr=False)

    def _params(self, trial: Any) -> TuningConfig:
        space = self.space.configs
        batch = trial.suggest_categorical("batch", sorted({c.batch for c in space}))
        threads = trial.suggest_categorical("threads", sorted({c.threads for c in space}))
        backend = trial.suggest_categorical("backend", ["eager", "eager+opt", "onnxruntime"])
        if backend != "onnxruntime":
            matches = [c for c in space if c.batch == batch and c.threads == threads and c.backend == "eager"
                       and bool(c.pipeline) == (backend == "eager+opt")]
        else:
            level = trial.suggest_categorical("optimization", ["disable", "basic", "extended", "all"])
            mode = trial.suggest_categorical("mode", ["sequential", "parallel1", "parallel2"])
            spin = trial.suggest_categorical("spinning", [True, False])
            matches = [c for c in space if c.batch == batch and c.threads == threads and c.backend == "onnxruntime"
                       and c.optimization == level and bool(c.allow_spinning) == spin
                       and (c.execution_mode if c.execution_mode == "sequential"
                            else f"parallel{c.inter_op_threads}") == mode]
        if len(matches) != 1:
            raise TuningError(f"TPE parameters {trial.params} match {len(matches)} configs of the space")
        return matches[0]

    def suggest(self, trials: Sequence[Trial]) -> int:
        import optuna

        if self._study is None:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=self.seed))
        values = {t.index: t.value or 0.0 for t in trials}
        for trial, index in self._waiting:  # the configs it proposed have been measured since
            self._study.tell(trial, values.get(index, 0.0))
        self._waiting = []
        for _ in range(200):
            trial = self._study.ask()
            index = self.space.index(self._params(trial))
            if index not in values:
                self._waiting.append((trial, index))
                return index
            self._study.tell(trial, values[index])  # a repeat: answered from the cache, not measured
        return int(np.random.default_rng(self.seed + len(trials)).choice(self._unmeasured(trials)))


@dataclass
class GPBayesOpt(_Base):
    """Bayesian optimization with scikit-learn's GaussianProcessRegressor (Matern 5/2 + white noise) and
    expected improvement over the unmeasured configs; 3 random initial configs."""

    name: str = "gp-bo"
    initial: int = 3

    def suggest(self, trials: Sequence[Trial]) -> int:
        import warnings

        from scipy.stats import norm
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        unmeasured = self._unmeasured(trials)
        if len(trials) < self.initial:
            rng = np.random.default_rng(self.seed)
            order = rng.permutation(len(self.space))
            seen = {t.index for t in trials}
            return int(next(i for i in order if i not in seen))
        X = self.space.features().astype(np.float64)
        X = (X - X.mean(0)) / (X.std(0) + 1e-9)
        y = np.array([t.value or 0.0 for t in trials])
        scale = y.max() if y.max() > 0 else 1.0
        y = y / scale
        kernel = ConstantKernel(1.0) * Matern(length_scale=1.0, nu=2.5) + WhiteKernel(1e-3)
        gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gp.fit(X[[t.index for t in trials]], y)
        mu, sd = gp.predict(X[unmeasured], return_std=True)
        best = y.max()
        sd = np.maximum(sd, 1e-9)
        z = (mu - best) / sd
        ei = (mu - best) * norm.cdf(z) + sd * norm.pdf(z)
        return int(unmeasured[int(np.argmax(ei))])


def make_baseline(name: str, space: TuningSpace, *, objective: str, slo_ms: float | None, seed: int) -> Any:
    classes = {"random": RandomSearch, "grid": GridSearch, "tpe": TPESearch, "gp-bo": GPBayesOpt}
    if name not in classes:
        raise TuningError(f"unknown baseline '{name}'; valid: {', '.join(BASELINES)}")
    return classes[name](space, objective=objective, slo_ms=slo_ms, seed=seed)


