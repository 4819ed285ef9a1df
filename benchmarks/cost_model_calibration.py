"""How far a cost-model checkpoint is from another machine's latencies, and how much a calibration brings back.

A checkpoint predicts the machine its corpus was measured on. On another machine, or on the same VM on a
slower day, a user has three choices: use it as it is, calibrate it (`morphc calibrate-cost-model`: about a
minute of probe programs, `morphc.predictors.calibration`), or measure the whole corpus there and retrain
(`scripts/collect_cost_model_data.py` + `morphc train-cost-model`: most of an hour). Given a records
database of the corpus measured on the machine in question, this scores, on every config of every variant
that is not a probe:

- `as shipped`: the checkpoint's own predictions;
- `calibrated (same pass)`: calibrated with the probe records of that same database (the probes' batch 1 and 8
  configs; the probe variants are then left out of the scoring): a factor per thread count and operator group;
- `one factor per thread count (same pass)`: the same probes' median ratio per thread count, for every
  operator alike (the simpler form, for comparison);
- `calibrated (--calibration)`: a calibration measured separately, at another moment, as a user would have it;
- `best single factor`: one factor per thread count fitted on the scored configs themselves, the most any
  calibration of this form could do (an optimistic bound, not a method);
- `--reference CHECKPOINT`: a checkpoint trained on that machine's own data (in-sample where it was trained on
  the same database: an optimistic reference for retraining).

    python benchmarks/cost_model_calibration.py --db today.sqlite --calibration cal.json --out cost_model_calibration
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_average, markdown_table, write_results
from cost_model import metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="records database of the corpus measured on the machine")
    parser.add_argument("--checkpoint", default=None, help="the checkpoint to calibrate (default: the shipped one)")
    parser.add_argument("--calibration", default=None, help="a calibration file measured separately")
    parser.add_argument("--reference", default=None, help="a checkpoint trained on the machine's own data")
    parser.add_argument("--out", default="cost_model_calibration")
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_start = load_average()

    from morphc.predictors import calibration, cost_model
    from morphc.predictors.cost_model import make_query
    from morphc.predictors.dataset import cpu_device, load_samples
    from morphc.predictors.records import RecordsDB

    model = cost_model.load_or_default(args.checkpoint)
    device = cpu_device(RecordsDB(args.db))
    samples = [s for s in load_samples(args.db, device=device) if not s.unstable]
    probe_names = {v.name for v in calibration.probe_variants(model)}
    probes = [s for s in samples if s.variant in probe_names and s.config.batch in calibration.PROBE_BATCHES
              and s.config.threads in calibration.PROBE_THREADS]
    scored = [s for s in samples if s.variant not in probe_names]
    true = np.asarray([s.latency_ms for s in scored])
    queries = [make_query(s.graph, s.config) for s in scored]
    threads = np.asarray([s.config.threads for s in scored])

    def predict(m: cost_model.CostModel, log_factors: dict[int, tuple[float, ...]] | None = None) -> np.ndarray:
        # the factors are set directly, not through calibration.apply: the database may describe another machine
        return dataclasses.replace(m.uncalibrated(), log_factors=log_factors or {}).predict_queries(queries)[0]

    def one_factor(log_ratio_by_threads: dict[int, float]) -> dict[int, tuple[float, ...]]:
        return {t: (v,) * len(calibration.GROUPS) for t, v in log_ratio_by_threads.items()}

    raw = predict(model)
    same_pass = calibration.fit(model, probes)
    probe_ratio = {t: float(np.median([math.log(p.measured_ms / p.predicted_ms) for p in same_pass.probes
                                       if p.threads == t])) for t in same_pass.log_factors}
    preds: dict[str, np.ndarray] = {"as shipped": raw,
                                    "one factor per thread count (same pass)": predict(model, one_factor(probe_ratio)),
                                    "calibrated (same pass)": predict(model, same_pass.log_factors)}
    measured_cal = None
    if args.calibration:
        measured_cal = calibration.load(args.calibration)
        if measured_cal.checkpoint != model.digest:  # its probe times, fitted again to this checkpoint (--refit)
            print(f"--calibration was fitted to checkpoint {measured_cal.checkpoint}: its probe times are fitted "
                  f"again to {model.digest}")
            measured_cal = dataclasses.replace(calibration.refit(model, measured_cal),
                                               measured_at=f"{measured_cal.measured_at}, refitted")
        preds["calibrated (--calibration)"] = predict(model, measured_cal.log_factors)
    best = {int(t): float(np.median(np.log(true[threads == t] / raw[threads == t]))) for t in np.unique(threads)}
    preds["best single factor"] = predict(model, one_factor(best))
    if args.reference:
        preds["reference (retrained)"] = predict(cost_model.load(args.reference))

    families = sorted({s.family for s in scored})
    fam = np.asarray([s.family for s in scored])
    results: dict[str, Any] = {
        "db": Path(args.db).name, "device": device, "checkpoint": model.meta["device_fingerprint"],
        "checkpoint_digest": model.digest, "scored_configs": len(scored), "probe_configs": len(probes),
        "factors": {"one factor (same pass)": _factors(probe_ratio), "same pass": same_pass.summary(),
                    "best single factor": _factors(best),
                    **({"--calibration": measured_cal.summary()} if measured_cal else {})},
        "overall": {k: metrics(p, true) for k, p in preds.items()},
        "by_family": {f: {k: metrics(p[fam == f], true[fam == f])["mape_pct"] for k, p in preds.items()}
                      for f in families},
        "by_family_ratio": {f: float(np.exp(np.mean(np.log(true[fam == f] / raw[fam == f])))) for f in families},
    }
    plot = _plot(preds, true, RESULTS / f"{args.out}.png")
    path = write_results(args.out, title="Cost-model calibration to another machine's speed", results=results,
                         body_md=_report(results, preds, plot), load_at_start=load_start,
                         settings={"db": Path(args.db).name, "checkpoint": Path(args.checkpoint).name
                                   if args.checkpoint else "shipped default",
                                   "calibration": args.calibration and Path(args.calibration).name,
                                   "reference": args.reference and Path(args.reference).name})
    print(path.read_text())
    return 0


def _factors(log_scale: dict[int, float]) -> dict[str, float]:
    return {str(t): round(math.exp(s), 3) for t, s in sorted(log_scale.items())}


def _report(results: dict[str, Any], preds: dict[str, np.ndarray], plot: str) -> str:
    rows = [[k, f"{m['mape_pct']:.1f}%", f"{m['within_10pct']:.0f}%", f"{m['spearman']:.3f}"]
            for k, m in results["overall"].items()]
    lines = [f"Database `{results['db']}` measured on `{results['device']}`; checkpoint measured on "
             f"`{results['checkpoint']}` (digest {results['checkpoint_digest']}). Scored: {results['scored_configs']} "
             f"configs of the non-probe variants; probes: {results['probe_configs']} configs.", "",
             "Factors (measured / predicted):", "", *[f"- {k}: {v}" for k, v in results["factors"].items()], "",
             markdown_table(["predictions", "MAPE", "within ±10%", "Spearman"], rows), "",
             "MAPE by family (and the family's geometric-mean measured / shipped prediction):", ""]
    keys = list(preds)
    fam_rows = [[f, f"{results['by_family_ratio'][f]:.2f}", *[f"{results['by_family'][f][k]:.1f}" for k in keys]]
                for f in results["by_family"]]
    lines += [markdown_table(["family", "measured / shipped", *keys], fam_rows), "",
              f"![predicted vs measured]({plot})"]
    return "\n".join(lines)


def _plot(preds: dict[str, np.ndarray], true: np.ndarray, path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for name in [k for k in preds if k != "best single factor"]:
        ax.scatter(true, preds[name], s=6, alpha=0.5, label=name)
    lo, hi = float(true.min()) * 0.8, float(true.max()) * 1.25
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="measured ms", ylabel="predicted ms", xlim=(lo, hi), ylim=(lo, hi),
           title="cost model on another machine's latencies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


if __name__ == "__main__":
    raise SystemExit(main())
