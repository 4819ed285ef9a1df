"""Choosing between cost-model candidates without looking at split (b): validation families.

`benchmarks/cost_model.py`'s split (b), whole families held out of training, is the test set of the
issue's goal; a change chosen because it lowers (b) is fitted to (b). Changes to the model or to its
training data are judged here instead: families carved out of the *training* families are held out in
turn, one network is trained per (validation split, seed) on the rest, and each validation family's
MAPE is reported for the baseline and the candidate side by side. One seed's result moves by 2-3
points on these splits, so a candidate is adopted only if it wins by more than the spread between seeds.

A candidate is extra training data, other training options, or both: `--extra-db`, another records
database (e.g. one new corpus family, collected with `scripts/collect_cost_model_data.py --family F`),
whose samples are added to every training set and never tested; `--option KEY=VALUE` (repeatable), a
keyword of `cost_model.train` for the candidate's training (e.g. `node_loss=0.5`, `hidden=96`,
`op_dropout=0.1`), or a `CostModel` field that changes only how the trained network predicts
(`hide_unseen_ops=0`: the candidate is then the baseline's own network, predicting the other way).
`--with-b` also reports split (b), for information only. `--reuse-baseline RESULTS_JSON` takes the baseline's
runs from an earlier run of this script (training is deterministic: the same seed gives the same network, checked
to the last digit in session 16), so that a candidate costs only its own trainings; where an adopted candidate became
train()'s defaults, that file's candidate arm is today's baseline and is the one taken. Each run keeps its predictions
(`pred_ms`, in the order of `validation_configs`), so ensembles of the seeds' networks can be scored afterwards.
`--combine RESULTS_JSON ...` reports several earlier runs (of the same candidate, e.g. seeds 8-15 and 16-23 run
apart) as one. Every finished run is kept at once in `results/OUT.partial.json`: a killed invocation, run again with
the same arguments, trains only what it had not finished.

The rule (fixed in session 15, applied by `decide`): a candidate is adopted only if its mean MAPE over the seeds is
lower on every validation split and the mean of the paired differences (candidate - baseline, one per split and
seed) is more than 2 standard errors below zero.

    python benchmarks/cost_model_validation.py --extra-db benchmarks/results/cost_model_randcell.sqlite \\
        --seeds 0,1,2,3 --with-b --out cost_model_validation_randcell
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_average, markdown_table, write_results
from cost_model import metrics, split

DEFAULT_SPLITS = ("resblock,opt,hf-regnet", "vgg,bert,hf-efficientnet")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default=str(RESULTS / "cost_model.sqlite"))
    parser.add_argument("--extra-db", default=None,
                        help="records database whose samples are added to every training set (the candidate)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a cost_model.train keyword for the candidate's training (repeatable)")
    parser.add_argument("--split", action="append", default=None,
                        help=f"comma-separated training families held out together (repeatable; default "
                             f"{' and '.join(DEFAULT_SPLITS)})")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--with-b", action="store_true", help="also report split (b), for information only")
    parser.add_argument("--reuse-baseline", action="append", default=[], metavar="RESULTS_JSON",
                        help="take the baseline's runs from an earlier results file of this script (repeatable) "
                             "instead of training them again: training is deterministic (the same seed gives the "
                             "same network), so only the same --db and --steps are accepted")
    parser.add_argument("--combine", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="train nothing: report the runs of these earlier results files (same db, steps and "
                             "candidate) as one, with the rule's decision")
    parser.add_argument("--out", default="cost_model_validation")
    args = parser.parse_args()
    if args.combine:
        return _combine(parser, args)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    load_start = load_average()

    from morphc.predictors.corpus import HELD_OUT_FAMILIES
    from morphc.predictors.cost_model import TrainItem, make_query, train
    from morphc.predictors.dataset import load_samples

    samples = [s for s in load_samples(args.db) if not s.unstable]
    extra = [s for s in load_samples(args.extra_db) if not s.unstable] if args.extra_db else []
    train_s, _, test_b = split(samples, HELD_OUT_FAMILIES)  # the benchmark's split: (a)'s configs stay out too
    families = {s.family for s in train_s}
    splits = args.split or list(DEFAULT_SPLITS)
    for spec in splits:
        if unknown := [f for f in spec.split(",") if f not in families]:
            parser.error(f"--split {spec}: {', '.join(unknown)} is not a training family "
                         f"(training families: {', '.join(sorted(families))})")
    if overlap := {s.family for s in extra} & ({s.family for s in samples}):
        parser.error(f"--extra-db holds families already in --db ({', '.join(sorted(overlap))}): the candidate "
                     "must be new training data")
    options = _train_options(parser, args.option)
    if not extra and not options:
        parser.error("nothing to compare: give a candidate with --extra-db and/or --option KEY=VALUE")
    seeds = [int(x) for x in args.seeds.split(",")]
    predict_options = {k: options.pop(k) for k in PREDICT_TIME if k in options}
    arms = {"baseline": ([], {}), "candidate": (extra, options)}
    cases = [(spec, [s for s in train_s if s.family not in spec.split(",")],
              [s for s in train_s if s.family in spec.split(",")]) for spec in splits]
    if args.with_b:
        cases.append(("(b): " + ",".join(HELD_OUT_FAMILIES), train_s, test_b))

    runs: list[dict[str, Any]] = []
    reused = _reused_baseline(parser, args)
    settings = {"db": args.db, "extra_db": args.extra_db, "candidate_options": options,
                "predict_options": predict_options, "steps": args.steps, "members": 1,
                "baseline_options": _baseline_options()}
    partial = RESULTS / f"{args.out}.partial.json"
    done = _resumed_runs(partial, settings)
    start = time.time()
    for spec, fit, val in cases:
        true = np.asarray([s.latency_ms for s in val])
        for seed in seeds:
            models: dict[str, Any] = {}
            for arm, (added, train_options) in arms.items():
                items = [TrainItem(s.graph, s.config, s.latency_ms, s.runtime, s.family) for s in fit + added]
                if arm == "baseline" and (spec, seed) in reused:
                    runs.append(reused[spec, seed])
                    print(f"{spec} seed {seed} baseline: MAPE {runs[-1]['mape_pct']:.1f}% (reused)", flush=True)
                    continue
                if (spec, seed, arm) in done:
                    runs.append(done[spec, seed, arm])
                    print(f"{spec} seed {seed} {arm}: MAPE {runs[-1]['mape_pct']:.1f}% (resumed from {partial})",
                          flush=True)
                    continue
                if arm == "candidate" and not added and not train_options and "baseline" in models:
                    model = models["baseline"]  # it differs only at prediction (a reused baseline: trained below)
                else:
                    model = train(items, steps=args.steps, seed=seed, show_progress=False, **train_options)[0]
                models[arm] = model
                if arm == "candidate" and predict_options:
                    model = dataclasses.replace(model, **predict_options)
                pred = model.predict_queries([make_query(s.graph, s.config) for s in val])[0]
                per_family = {f: metrics(pred[i], true[i])["mape_pct"] for f in sorted({s.family for s in val})
                              if (i := [k for k, s in enumerate(val) if s.family == f])}
                runs.append({"split": spec, "seed": seed, "arm": arm, "train": len(items),
                             "mape_pct": metrics(pred, true)["mape_pct"], "per_family": per_family,
                             "pred_ms": [round(float(p), 6) for p in pred]})
                print(f"[{time.time() - start:6.0f} s] {spec} seed {seed} {arm}: MAPE {runs[-1]['mape_pct']:.1f}% "
                      + " ".join(f"{f} {v:.1f}" for f, v in per_family.items()), flush=True)
                _save_partial(partial, settings, runs)

    results: dict[str, Any] = {"samples": len(samples), "extra_samples": len(extra),
               "extra_families": sorted({s.family for s in extra}), "seeds": seeds, "runs": runs,
               "validation_configs": {spec: [[s.variant, s.family, str(s.config), s.latency_ms] for s in val]
                                      for spec, _, val in cases}}
    body = _report(runs, list(arms), seeds, results["validation_configs"])
    written = _write(args.out, results, body, settings, load_start)
    partial.unlink(missing_ok=True)
    return written


def _save_partial(path: Path, settings: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Keep the runs finished so far (each is minutes of training), so that a killed run resumes where it stopped:
    written to a temporary file and renamed, so a kill while writing leaves the previous state."""
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "runs": [r for r in runs if "reused_from" not in r]}))
    tmp.replace(path)


def _resumed_runs(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int, str], Any]:
    """(split, seed, arm) -> a run an earlier, killed invocation with the same --out finished, if it ran with the
    same settings (training is deterministic: resuming gives what the full run would have); otherwise nothing,
    saying why."""
    import json

    if not path.is_file():
        return {}
    try:
        payload = json.loads(path.read_text())
        recorded, runs = payload["settings"], payload["runs"]
    except (ValueError, KeyError, TypeError) as err:
        print(f"ignoring {path}: not a partial results file of this script ({err})", flush=True)
        return {}
    if json.loads(json.dumps(settings)) != recorded:
        print(f"ignoring {path}: it was run with other settings ({recorded}); starting afresh", flush=True)
        return {}
    return {(r["split"], r["seed"], r["arm"]): r for r in runs}


def _reused_baseline(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[tuple[str, int], Any]:
    """(split, seed) -> a run recorded in the --reuse-baseline files that was trained with today's train() defaults,
    refusing another db or steps: the file's baseline arm, or its candidate arm when the candidate's options (and
    no extra data) are today's defaults, as session 17's conv+pool bound became."""
    import json

    today = _without_neutral(_baseline_options())
    found: dict[tuple[str, int], Any] = {}
    for path in args.reuse_baseline:
        payload = json.loads(Path(path).read_text())
        settings = payload["settings"]
        if Path(settings["db"]).resolve() != Path(args.db).resolve() or settings["steps"] != args.steps:
            parser.error(f"--reuse-baseline {path}: measured on db {settings['db']} with {settings['steps']} steps; "
                         f"this run uses {args.db} with {args.steps}")
        recorded = settings.get("baseline_options")
        if recorded is None:
            parser.error(f"--reuse-baseline {path}: its train() defaults were not recorded (before session 17): "
                         "train the baseline again")
        arms = {"baseline": _without_neutral(recorded),
                "candidate": _without_neutral(recorded | settings.get("candidate_options", {}))}
        arm = next((a for a, options in arms.items() if options == today
                    and (a == "baseline" or not settings.get("extra_db"))), None)
        if arm is None:
            parser.error(f"--reuse-baseline {path}: neither of its arms was trained with today's train() defaults "
                         f"{today} (baseline {arms['baseline']}, candidate {arms['candidate']}"
                         f"{' with --extra-db' if settings.get('extra_db') else ''}): train the baseline again")
        for run in payload["results"]["runs"]:
            if run["arm"] == arm:
                found[run["split"], run["seed"]] = {**run, "arm": "baseline", "reused_from": f"{path} ({arm})"}
    return found


# options train() has not always had (gained after earlier results files were written, or lost since: session
# 21's and 22's candidates), with the value at which training is as if the option did not exist
NEUTRAL: dict[str, Any] = {"correction_bound": 0.0, "correction_offset": False, "batch_blind_correction": False,
                           "kernel_decay": 0.0}


def _without_neutral(options: dict[str, Any]) -> dict[str, Any]:
    """`options` less those at their NEUTRAL value, so that a file recorded before an option was gained, or after
    it was lost, compares equal to today's options when it trained the same way (and unequal when it did not)."""
    return {k: v for k, v in options.items() if k not in NEUTRAL or v != NEUTRAL[k]}


# train() keywords a candidate may change; the rest (seed, steps, members, device, progress) the protocol fixes
TUNABLE = ("hidden", "layers", "batch_size", "lr", "weight_decay", "runtime_dropout", "op_dropout", "node_loss",
           "context_bound", "context_classes", "correction_bound", "correction_offset")
# CostModel fields that change only how a trained network predicts (0 or 1)
PREDICT_TIME = ("hide_unseen_ops",)


def _train_defaults() -> dict[str, Any]:
    """train()'s defaults of the TUNABLE keywords: what the baseline arm is trained with."""
    import inspect

    from morphc.predictors.cost_model import train

    return {k: p.default for k, p in inspect.signature(train).parameters.items() if k in TUNABLE}


def _baseline_options() -> dict[str, Any]:
    """`_train_defaults` as it reads back from a results file (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in _train_defaults().items()}


def _train_options(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, Any]:
    """`["node_loss=0.5", "hidden=96"]` -> {"node_loss": 0.5, "hidden": 96}, refusing what train() cannot take."""
    from morphc.predictors.cost_model import CostModel

    defaults = _train_defaults()
    defaults |= {f.name: f.default for f in dataclasses.fields(CostModel) if f.name in PREDICT_TIME}
    options: dict[str, Any] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        if not sep or key not in defaults:
            parser.error(f"--option {spec}: expected KEY=VALUE with KEY one of {', '.join(TUNABLE + PREDICT_TIME)}")
        kind = type(defaults[key])
        if kind is tuple:  # names joined by "+", e.g. context_classes=conv+pool
            options[key] = tuple(raw.split("+"))  # type: ignore[assignment]
            continue
        try:
            options[key] = bool(int(raw)) if kind is bool else kind(raw)
        except ValueError:
            parser.error(f"--option {spec}: {key} takes "
                         f"{'0 or 1' if kind is bool else 'an integer' if kind is int else 'a number'} "
                         f"(default {defaults[key]})")
    return options


def _combine(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Report the runs of several results files of one candidate as one (refusing files that differ in db, steps or
    candidate, or that repeat a run)."""
    import json

    payloads = [json.loads(Path(p).read_text()) for p in args.combine]
    keys = ("db", "extra_db", "candidate_options", "steps")
    first = payloads[0]["settings"]
    runs: list[dict[str, Any]] = []
    seen: set[tuple[str, int, str]] = set()
    for path, payload in zip(args.combine, payloads):
        if differ := [k for k in keys if payload["settings"].get(k) != first.get(k)]:
            parser.error(f"--combine {path}: its {', '.join(differ)} differ from {args.combine[0]}'s")
        for run in payload["results"]["runs"]:
            if (key := (run["split"], run["seed"], run["arm"])) in seen:
                parser.error(f"--combine {path}: {run['split']} seed {run['seed']} {run['arm']} is in two files")
            seen.add(key)
            runs.append(run)
    seeds = sorted({r["seed"] for r in runs})
    configs = {k: v for payload in payloads for k, v in payload["results"].get("validation_configs", {}).items()}
    results = {"combined_from": args.combine, "seeds": seeds, "runs": runs, "validation_configs": configs}
    body = _report(runs, ["baseline", "candidate"], seeds, configs)
    return _write(args.out, results, body, first, load_average())


def _write(out: str, results: dict[str, Any], body: str, settings: dict[str, Any], load_start: Any) -> int:
    path = write_results(out, title="Cost model: validation families (choosing without split (b))",
                         results=results, body_md=body, settings=settings, load_at_start=load_start)
    print(body)
    print(f"wrote {path}")
    return 0


def decide(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The protocol's rule over every (split, seed) that has both arms ((b) excluded): per-split means, the paired
    differences' mean, standard error and t, and whether the candidate is adopted."""
    by = {(r["split"], r["seed"], r["arm"]): r["mape_pct"] for r in runs if not r["split"].startswith("(b)")}
    pairs = sorted({(sp, seed) for sp, seed, _ in by if (sp, seed, "baseline") in by and (sp, seed, "candidate") in by})
    if len(pairs) < 2:
        raise ValueError(f"the rule needs at least 2 (split, seed) pairs with both arms, got {len(pairs)}")
    diffs = np.asarray([by[sp, seed, "candidate"] - by[sp, seed, "baseline"] for sp, seed in pairs])
    splits = list(dict.fromkeys(sp for sp, _ in pairs))
    means = {sp: {arm: float(np.mean([by[sp, seed, arm] for s2, seed in pairs if s2 == sp]))
                  for arm in ("baseline", "candidate")} for sp in splits}
    mean, se = float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs)))
    lower_everywhere = all(m["candidate"] < m["baseline"] for m in means.values())
    return {"pairs": len(pairs), "split_means": means, "mean_diff": mean, "se": se,
            "t": mean / se if se > 0 else float("-inf") if mean < 0 else float("inf"),
            "lower_on_every_split": lower_everywhere, "adopt": lower_everywhere and mean < -2 * se}


ENSEMBLE = 4  # members of the shipped checkpoint (cost_model.DEFAULT_MEMBERS), for the ensembles' table


def ensembles(runs: list[dict[str, Any]], configs: dict[str, list[Any]], size: int = ENSEMBLE
              ) -> dict[tuple[str, str], list[tuple[list[int], float]]]:
    """(split, arm) -> [(seeds, MAPE)] of ensembles of `size` consecutive seeds' networks, each predicting the mean
    of its members' log latencies as a shipped checkpoint does (runs without stored predictions are left out)."""
    out: dict[tuple[str, str], list[tuple[list[int], float]]] = {}
    by, measured = _stored_predictions(runs, configs)
    for spec, arm in dict.fromkeys((sp, arm) for sp, arm, _ in by):
        true = measured[spec]
        seeds = sorted(seed for sp, a, seed in by if (sp, a) == (spec, arm))
        for i in range(0, len(seeds) - size + 1, size):
            group = seeds[i:i + size]
            out.setdefault((spec, arm), []).append((group, _ensemble_mape([by[spec, arm, s] for s in group], true)))
    return out


def _stored_predictions(runs: list[dict[str, Any]], configs: dict[str, list[Any]]
                        ) -> tuple[dict[tuple[str, str, int], list[float]], dict[str, np.ndarray]]:
    """(split, arm, seed) -> the run's stored predictions, and split -> the measured latencies they are scored
    against (runs without stored predictions, or of a split without its configs, are left out)."""
    by = {(r["split"], r["arm"], r["seed"]): r["pred_ms"] for r in runs if "pred_ms" in r and r["split"] in configs}
    return by, {spec: np.asarray([c[3] for c in configs[spec]]) for spec in dict.fromkeys(sp for sp, _, _ in by)}


def _ensemble_mape(members: list[list[float]], true: np.ndarray) -> float:
    """MAPE of the ensemble that predicts the mean of its members' log latencies, as a shipped checkpoint does."""
    return metrics(np.exp(np.mean([np.log(m) for m in members], axis=0)), true)["mape_pct"]


def mixed_ensembles(runs: list[dict[str, Any]], configs: dict[str, list[Any]], size: int = ENSEMBLE
                    ) -> list[dict[str, Any]]:
    """Per split and group of `size` consecutive seeds with both arms' predictions: the MAPE of the baseline's
    ensemble, of the candidate's, and of a mixed one (half the members from each arm; the mean over the two ways of
    splitting the group, {baseline first half + candidate second half} and the reverse). Session 20's question: the
    arms err on different families, so half of each may beat four of one at the same query cost."""
    by, measured = _stored_predictions(runs, configs)
    out = []
    for spec, true in measured.items():
        seeds = sorted(s for sp, a, s in by if sp == spec and a == "baseline" and (spec, "candidate", s) in by)
        for i in range(0, len(seeds) - size + 1, size):
            group, half = seeds[i:i + size], size // 2
            first, second = group[:half], group[half:]
            mixed = [_ensemble_mape([by[spec, a, s] for s in first] + [by[spec, b, s] for s in second], true)
                     for a, b in (("baseline", "candidate"), ("candidate", "baseline"))]
            out.append({"split": spec, "seeds": group, "mixed": float(np.mean(mixed)),
                        **{arm: _ensemble_mape([by[spec, arm, s] for s in group], true)
                           for arm in ("baseline", "candidate")}})
    return out


def decide_mixed(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """`decide`'s rule over `mixed_ensembles`' groups, with the mixed ensemble as the candidate and the baseline's
    ensemble as the baseline, one pair per (split, group of seeds)."""
    return decide([{"split": g["split"], "seed": g["seeds"][0], "arm": arm, "mape_pct": g[key]}
                   for g in groups for arm, key in (("baseline", "baseline"), ("candidate", "mixed"))])


def _report(runs: list[dict[str, Any]], arms: list[str], seeds: list[int],
            configs: dict[str, list[Any]] | None = None) -> str:
    """One row per split and seed, the arms side by side; then each split's mean and spread over seeds, the
    rule's decision, and (for information) ensembles of the seeds' networks."""
    by = {(r["split"], r["seed"], r["arm"]): r for r in runs}
    splits = list(dict.fromkeys(r["split"] for r in runs))
    rows = []
    for spec in splits:
        for seed in seeds:
            rows.append([spec, seed] + [_cell(by[spec, seed, arm]) for arm in arms])
    summary = []
    for spec in splits:
        means = [[by[spec, seed, arm]["mape_pct"] for seed in seeds] for arm in arms]
        summary.append([spec] + [f"{np.mean(m):.1f} (range {min(m):.1f}-{max(m):.1f})" for m in means])
    note = ("(b) is the benchmark's test set: reported for information, never for choosing."
            if any(s.startswith("(b)") for s in splits) else "")
    return "\n\n".join([
        "MAPE of one network per run (static features), trained on the training families minus the held-out "
        "ones; per family in brackets.",
        markdown_table(["held out", "seed", *arms], rows),
        "Mean over seeds:",
        markdown_table(["held out", *arms], summary),
        _decision_line(runs),
        _ensemble_table(runs, arms, configs or {}),
        _mixed_table(runs, configs or {}),
        note,
    ]).strip() + "\n"


def _ensemble_table(runs: list[dict[str, Any]], arms: list[str], configs: dict[str, list[Any]]) -> str:
    found = ensembles(runs, configs)
    splits = list(dict.fromkeys(sp for sp, _ in found))
    rows = [[sp, ", ".join(f"{seeds[0]}-{seeds[-1]}" for seeds, _ in found[sp, arms[0]])]
            + [" / ".join(f"{m:.1f}" for _, m in found.get((sp, arm), [])) for arm in arms]
            for sp in splits if (sp, arms[0]) in found]
    if not rows:
        return ""
    return (f"For information (not the rule): ensembles of {ENSEMBLE} consecutive seeds' networks, each predicting the "
            f"mean of its members' log latencies as the shipped checkpoint does. MAPE per ensemble:\n\n"
            + markdown_table(["held out", "seeds", *arms], rows))


def _decision_line(runs: list[dict[str, Any]]) -> str:
    return _verdict(lambda: decide(runs), "(split, seed) pairs", "The candidate")


def _verdict(decision: Callable[[], dict[str, Any]], unit: str, subject: str) -> str:
    """The rule's decision in words; "none" where there are too few pairs (the report is still written)."""
    try:
        d = decision()
    except ValueError as exc:
        return f"Decision: none ({exc})."
    verdict = "**adopted**" if d["adopt"] else "**not adopted**"
    return (f"Decision by the rule (candidate lower on every split, and the mean paired difference more than 2 "
            f"standard errors below zero): over {d['pairs']} {unit} the paired difference is "
            f"{d['mean_diff']:+.2f} ± {d['se']:.2f} points (t = {d['t']:.2f}); lower on every split: "
            f"{'yes' if d['lower_on_every_split'] else 'no'}. {subject} is {verdict}.")


def _mixed_table(runs: list[dict[str, Any]], configs: dict[str, list[Any]]) -> str:
    groups = mixed_ensembles(runs, configs)
    if len(groups) < 2:
        return ""
    rows = [[g["split"], f"{g['seeds'][0]}-{g['seeds'][-1]}", f"{g['baseline']:.1f}", f"{g['candidate']:.1f}",
             f"{g['mixed']:.1f}"] for g in groups]
    return (f"Mixed ensembles (session 20's question; its rule is `decide`'s, one pair per split and group): "
            f"{ENSEMBLE} members, half from each arm, the mean over the two ways of splitting the group. MAPE:\n\n"
            + markdown_table(["held out", "seeds", "baseline", "candidate", "mixed"], rows) + "\n\n"
            + _verdict(lambda: decide_mixed(groups), "(split, group) pairs", "The mixed ensemble"))


def _cell(run: dict[str, Any]) -> str:
    families = ", ".join(f"{f} {v:.1f}" for f, v in run["per_family"].items())
    return f"**{run['mape_pct']:.1f}%** ({families})"


if __name__ == "__main__":
    sys.exit(main())
