"""Calibrating a cost-model checkpoint to this machine's speed of the day.

Why: a checkpoint predicts the latencies of the machine its training data was measured on, and virtual
machines of one CPU model do not run at one speed. The 2-core AMD EPYC VM that measured the shipped
checkpoint's corpus ran the same programs 1.4-1.8x slower in sessions 15 and 16, under the same device
fingerprint, so nothing warned (docs/cost_model.md, "Calibration"). No graph feature can see that.

A calibration times a fixed set of probe programs here: the first corpus variant of every family the
checkpoint was trained on, at batch 1 and 8 and thread counts 1 and 2. Machines differ per kernel kind as
well as overall (on the Intel Xeon VM the EPYC checkpoint's linear layers ran at its speed, its other
operators 1.4-1.6x slower), so it fits, per thread count, one factor for each operator group of
`cost_model.SPEED_GROUPS` (convolutions, matrix products, the rest). `apply` scales each prediction by its
groups' factors weighted by their shares of its predicted node time. The probes are training programs of
the checkpoint, so the ratios measure the machine, not the model's error on new families. The measurements
go to a records database (`dataset.collect_corpus`), so a killed calibration keeps what it measured and
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphc.predictors.corpus import VARIANTS, Variant, variant
from morphc.predictors.cost_model import (
    SPEED_GROUPS,
    CostModel,
    CostModelError,
    CostModelWarning,
    load_or_default,
    make_query,
    nearest_factors,
)
from morphc.predictors.dataset import Sample, collect_corpus, load_samples, lowered
from morphc.predictors.features import extract
from morphc.predictors.profiler import LATENCY
from morphc.predictors.records import RecordsDB, device_fingerprint
from morphc.predictors.spaces import CpuConfig

CALIBRATION_FORMAT = "morphc-cost-model-calibration"
CALIBRATION_VERSION = 1
PROBE_BATCHES = (1, 8)
PROBE_THREADS = (1, 2)  # the corpus's thread counts: what the checkpoints were trained on
GROUPS = tuple(SPEED_GROUPS)
# How strongly each group's factor is held to the median ratio of all probes: weakly, so a group the probes
# show gets its own speed, and a group they barely contain (no convolution at all, say) keeps the common one
PRIOR_WEIGHT = 0.1
ROBUST_SCALE = 0.05  # residuals (log) beyond about 5% count linearly, not squared: one disturbed probe cannot pull


@dataclass(frozen=True)
class Probe:
    """One probe measurement against the checkpoint's prediction."""

    variant: str
    batch: int
    threads: int
    measured_ms: float
    predicted_ms: float  # by the uncalibrated checkpoint
    shares: tuple[float, ...]  # of its predicted node time, per SPEED_GROUPS group


@dataclass(frozen=True)
class Calibration:
    """Per thread count, log(time here / time the checkpoint predicts) of each operator group, fitted to probes."""

    checkpoint: str  # CostModel.digest of the checkpoint it was fitted to
    device_fingerprint: str  # the machine it was measured on
    measured_at: str  # UTC, when the last probe was measured: the speed of a VM drifts between days
    log_factors: dict[int, tuple[float, ...]]  # thread count -> one per GROUPS
    probes: tuple[Probe, ...] = field(default=(), repr=False)

    def factors(self, threads: int) -> dict[str, float]:
        """How many times slower than the checkpoint's machine each operator group runs here at `threads`."""
        return dict(zip(GROUPS, np.exp(nearest_factors(self.log_factors, threads)).tolist(), strict=True))

    def residuals(self) -> np.ndarray:
        """Each probe's log(measured / calibrated prediction): what the factors do not explain."""
        return np.asarray([math.log(p.measured_ms / _calibrated(p, self.log_factors[p.threads]))
                           for p in self.probes])

    def summary(self) -> str:
        scales = "; ".join(f"{t} thread{'s' * (t > 1)}: " + ", ".join(f"{g} x{f:.2f}"
                                                                      for g, f in self.factors(t).items())
                           for t in sorted(self.log_factors))
        spread = float(np.median(np.abs(self.residuals()))) if self.probes else float("nan")
        return (f"calibrated on {self.measured_at} from {len(self.probes)} probes: {scales} "
                f"(probes within a median {100 * (math.exp(spread) - 1):.1f}% of it)")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION, "checkpoint": self.checkpoint,
                "device_fingerprint": self.device_fingerprint, "measured_at": self.measured_at,
                "log_factors": {str(t): dict(zip(GROUPS, f, strict=True)) for t, f in sorted(self.log_factors.items())},
                "probes": [dataclasses.asdict(p) for p in self.probes]}
        path.write_text(json.dumps(body, indent=1) + "\n")
        return path


def _calibrated(probe: Probe, log_factors: Sequence[float]) -> float:
    return probe.predicted_ms * float(np.dot(probe.shares, np.exp(log_factors)))


def load(path: str | Path) -> Calibration:
    """Read a saved calibration; CostModelError naming the problem for anything else."""
    try:
        body = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise CostModelError(f"calibration '{path}' does not exist (make one with `morphc calibrate-cost-model`)") \
            from exc
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CostModelError(f"calibration '{path}' is not readable JSON: {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != CALIBRATION_FORMAT \
            or body.get("version") != CALIBRATION_VERSION:
        found = (f"format {body.get('format')!r} version {body.get('version')}" if isinstance(body, dict)
                 else f"a JSON {type(body).__name__}")
        raise CostModelError(f"calibration '{path}' is {found}; this morphc reads {CALIBRATION_FORMAT!r} "
                             f"version {CALIBRATION_VERSION}")
    try:
        groups = {int(t): f for t, f in body["log_factors"].items()}
        if any(sorted(f) != sorted(GROUPS) for f in groups.values()):
            raise ValueError(f"its operator groups are not {list(GROUPS)}")
        log_factors = {t: tuple(float(f[g]) for g in GROUPS) for t, f in groups.items()}
        probes = tuple(Probe(**{**p, "shares": tuple(p["shares"])}) for p in body["probes"])
        cal = Calibration(str(body["checkpoint"]), str(body["device_fingerprint"]), str(body["measured_at"]),
                          log_factors, probes)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CostModelError(f"calibration '{path}' is malformed: {exc!r}") from exc
    if not log_factors or not all(math.isfinite(v) for f in log_factors.values() for v in f):
        raise CostModelError(f"calibration '{path}' holds no finite factors: {body['log_factors']}")
    return cal


def probe_variants(model: CostModel) -> list[Variant]:
    """The first corpus variant of every family `model` was trained on (every family if it does not say)."""
    trained = set(model.meta.get("trained", {}).get("groups") or {v.family for v in VARIANTS})
    first: dict[str, Variant] = {}
    for v in VARIANTS:
        if v.family in trained:
            first.setdefault(v.family, v)
    if not first:
        raise CostModelError(f"the checkpoint was trained on families {sorted(trained)}, none of which the corpus "
                             "has: there is nothing to calibrate it with")
    return list(first.values())


def fit(model: CostModel, samples: Sequence[Sample]) -> Calibration:
    """The calibration of `model` to the machine `samples` were measured on. Per thread count, each operator
    group's factor f_g is fitted so that predicted x sum_g(share_g x f_g) matches the measurements in log space,
    with a robust loss (one disturbed probe cannot pull) and a weak pull of every f_g towards the median ratio
    of all probes (a group the probes barely hold keeps that)."""
    from scipy.optimize import least_squares

    if model.device_kind != "cpu":
        raise CostModelError(f"only CPU checkpoints can be calibrated (this one is '{model.device_kind}'): a "
                             "GPU's speed is set by its SM share, a config knob")
    usable = [s for s in samples if not s.unstable]
    if not usable:
        raise CostModelError("no usable probe measurements to calibrate with (all were disturbed: measure again "
                             "on a quieter machine)")
    if disturbed := [s for s in samples if s.unstable]:
        warnings.warn(f"{len(disturbed)} of {len(samples)} probe measurements were disturbed (spread too wide, or "
                      "contended) and are left out: "
                      + ", ".join(f"{s.variant} batch {s.config.batch} threads {s.config.threads}" for s in disturbed)
                      + " (calibrate with a new --db on a quieter machine to measure them again)",
                      CostModelWarning, stacklevel=2)
    predicted, _, shares = model.predict_with_shares([make_query(s.graph, s.config) for s in usable])
    probes = tuple(Probe(s.variant, s.config.batch, s.config.threads, s.latency_ms, float(p), tuple(sh.tolist()))
                   for s, p, sh in zip(usable, predicted, shares, strict=True))
    log_factors = {}
    for t in sorted({p.threads for p in probes}):
        these = [p for p in probes if p.threads == t]
        share = np.asarray([p.shares for p in these])
        log_ratio = np.log([p.measured_ms / p.predicted_ms for p in these])
        common = float(np.median(log_ratio))

        def residuals(theta: np.ndarray, share: np.ndarray = share, log_ratio: np.ndarray = log_ratio,
                      common: float = common) -> np.ndarray:
            return np.concatenate([np.log(share @ np.exp(theta)) - log_ratio, PRIOR_WEIGHT * (theta - common)])

        found = least_squares(residuals, np.full(len(GROUPS), common), loss="soft_l1", f_scale=ROBUST_SCALE)
        log_factors[t] = tuple(float(v) for v in found.x)
    return Calibration(model.digest, device_fingerprint("cpu"), _now(), log_factors, probes)


def calibrate(model: CostModel, db: RecordsDB | str | Path, *, cache_dir: str | Path | None = None,
              show_progress: bool = True) -> Calibration:
    """Measure the probes into `db` (those it already holds for this machine are not measured again) and
    fit `model` to them. Use a new database to calibrate afresh: the speed of a VM drifts between days."""
    db = db if isinstance(db, RecordsDB) else RecordsDB(db)
    variants = probe_variants(model)
    collect_corpus(db, variants, batches=PROBE_BATCHES, threads=PROBE_THREADS, ops=False, cache_dir=cache_dir,
                   show_progress=show_progress)
    names = {v.name for v in variants}
    samples = [s for s in load_samples(db, device=device_fingerprint("cpu"))
               if s.variant in names and s.config.batch in PROBE_BATCHES and s.config.threads in PROBE_THREADS]
    cal = fit(model, samples)
    created = max(r.created for r in db.query(kind=LATENCY, device=device_fingerprint("cpu")))
    return dataclasses.replace(cal, measured_at=_now(created))


def refit(model: CostModel, previous: Calibration, *, cache_dir: str | Path | None = None) -> Calibration:
    """`previous`'s probe measurements fitted again, to `model`: after an upgrade brings another checkpoint,
    a calibration file is enough, nothing is timed again. The result still describes this machine's speed on
    the day `previous` was measured (its `measured_at`); calibrate afresh where that may have drifted."""
    _check_measured_here(previous, "its probe times are not this machine's; ")
    if not previous.probes:
        raise CostModelError("the calibration holds no probe measurements to fit again: calibrate afresh "
                             "(`morphc calibrate-cost-model`)")
    samples = []
    for p in previous.probes:
        try:
            v = variant(p.variant)
        except KeyError as exc:
            raise CostModelError(f"the calibration's probe '{p.variant}' is not a corpus variant of this morphc: "
                                 "calibrate afresh (`morphc calibrate-cost-model`)") from exc
        samples.append(Sample(v.name, v.family, "", extract(lowered(v, p.batch, cache_dir)),
                              CpuConfig(batch=p.batch, threads=p.threads), p.measured_ms, None, None))
    return dataclasses.replace(fit(model, samples), measured_at=previous.measured_at)


def apply(model: CostModel, calibration: Calibration) -> CostModel:
    """`model` predicting this machine's latencies: refused where the calibration belongs to another
    checkpoint or another machine."""
    if calibration.checkpoint != model.digest:
        raise CostModelError(f"the calibration was fitted to checkpoint {calibration.checkpoint}, not this one "
                             f"({model.digest}): calibrate this checkpoint (`morphc calibrate-cost-model`, or "
                             "`--refit` that file to fit its probe times again without measuring)")
    _check_measured_here(calibration)
    return dataclasses.replace(model.uncalibrated(), log_factors=dict(calibration.log_factors))


def _check_measured_here(calibration: Calibration, why: str = "") -> None:
    """Refuse a calibration measured on another machine (`why`: what that means for the caller)."""
    here = device_fingerprint("cpu")
    if calibration.device_fingerprint != here:
        raise CostModelError(f"the calibration was measured on '{calibration.device_fingerprint}', this machine is "
                             f"'{here}': {why}calibrate here (`morphc calibrate-cost-model`)")


def load_calibrated(calibration: str | Path, checkpoint: str | Path | None = None) -> CostModel:
    """The checkpoint (default: the shipped one for this machine) with the calibration saved at `calibration`
    applied: what a PassContext's `cost_model` should be on a machine that was calibrated."""
    return apply(load_or_default(checkpoint), load(calibration))


def _now(timestamp: float | None = None) -> str:
    when = _dt.datetime.fromtimestamp(timestamp, _dt.UTC) if timestamp is not None else _dt.datetime.now(_dt.UTC)
    return when.strftime("%Y-%m-%d %H:%M UTC")
