"""Config tuner evaluation over exhaustively profiled ground-truth tables.

    python benchmarks/tuner.py collect      # measure every config of every corpus model (resumable, ~flock'd)
    python benchmarks/tuner.py evaluate     # replay morphc and the baselines on the tables
    python benchmarks/tuner.py noise        # re-measure a sample of configs: how noisy are the tables?

`collect` measures all 208 configs of the CPU space (space.py: batch 1/2/4/8 x threads 1/2 x
{eager, eager+optimizing pipeline, ONNX Runtime x 4 optimization levels x 3 execution modes x
spinning on/off}) for every corpus model into benchmarks/data/tuner-groundtruth.sqlite (median of
9 timed runs after 2 warm-up runs, per config). `evaluate` replays every tuner against those tables,
so all tuners see identical measurements: models are split into folds and each fold's models are
held out of meta-training (whole models), the SLO of a model is a multiple of its fastest batch-1
latency, the objective is throughput per core with the SLO met. Reported: samples needed to reach
within 5% of the table's optimum (median and worst over held-out models), best-found quality at
budgets 5/10/20/30, for morphc (Morphling acquisition and ensemble EI) vs random, grid, Optuna TPE
and GP-BO, over several seeds. `--embedding gnn|both` conditions the meta-model on the shipped cost
model's graph embedding (each model re-lowered at batch 1 from its stored source) instead of, or
next to, the static one; baselines do not use the embedding, so such runs may pass `--tuners morphc-...`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from morphc.predictors.records import RecordsDB
from morphc.predictors.timing_lock import DEFAULT_TIMING_LOCK, timing_lock
from morphc.predictors.tuner.groundtruth import collect
from morphc.predictors.tuner.space import cpu_space

GROUND_TRUTH_DB = Path(__file__).resolve().parent / "data" / "tuner-groundtruth.sqlite"
LOCK = str(DEFAULT_TIMING_LOCK)

# (name, source): zoo small/base-ish models, HF configs of varied size, a fused twin-task program
CORPUS: list[tuple[str, str]] = [
    ("resnet-small", "zoo:resnet-small"),
    ("mobilenet_v2-small", "zoo:mobilenet_v2-small"),
    ("convnext-small", "zoo:convnext-small"),
    ("vit-small", "zoo:vit-small"),
    ("bert-small", "zoo:bert-small"),
    ("distilbert-small", "zoo:distilbert-small"),
    ("gpt2-small", "zoo:gpt2-small"),
    ("bert-mid", "zoo:bert-small?hidden_size=256,num_hidden_layers=4,num_attention_heads=4,"
                 "intermediate_size=1024,seq_len=64"),
    ("twin-tasks", "twin"),
    ("branchy_cnn", "zoo:branchy_cnn"),
    ("minilm", "zoo:minilm"),
]


def cmd_collect(args: argparse.Namespace) -> None:
    db = RecordsDB(args.db)
    corpus = [c for c in CORPUS if not args.models or c[0] in args.models]
    n = collect(db, corpus, cpu_space(), warmup=args.warmup, repeats=args.repeats, lock=LOCK,
                executor=args.executor, workers=args.workers, max_hold_s=args.max_hold_s)
    print(f"measured {n} configs; database {args.db} holds {len(db)} records")


def _folds(names: list[str], k: int) -> list[list[str]]:
    """k folds of whole models (round-robin over sorted names): each fold is held out of meta-training once."""
    ordered = sorted(names)
    return [ordered[i::k] for i in range(k)] if k < len(ordered) else [[n] for n in ordered]


def cmd_evaluate(args: argparse.Namespace) -> None:
    import time

    from rich.progress import Progress

    from morphc.predictors.tuner import evaluation as ev
    from morphc.predictors.tuner.groundtruth import load_tables
    from morphc.predictors.tuner.maml import MetaConfig

    load_start = common.load_average()
    space = cpu_space()
    tables = load_tables(RecordsDB(args.db), space)
    if args.models:
        tables = [t for t in tables if t.name in args.models]
    if len(tables) < 3:
        raise SystemExit(f"only {len(tables)} complete tables in {args.db}; run `collect` first")
    by_name = {t.name: t for t in tables}
    folds = _folds(list(by_name), args.folds)
    gnn = _gnn_embeddings(tables, progress_label=True) if args.embedding in ("gnn", "both") else {}
    tuners = args.tuners or list(ev.TUNERS)
    meta_cfg = MetaConfig(meta_steps=args.meta_steps, members=args.members, seed=args.meta_seed)
    runs: list[dict] = []
    meta_quality: list[dict] = []
    train_s = []
    with Progress() as progress:
        bar = progress.add_task("evaluating", total=len(tables) * len(args.slo_factors) * len(tuners))
        for fold in folds:
            progress.update(bar, description=f"meta-training without {', '.join(fold)}")
            fold_tables = _with_embedding(by_name, fold, args.embedding, gnn)
            start = time.perf_counter()
            meta = ev.train_meta([t for n, t in fold_tables.items() if n not in fold], meta_cfg)
            train_s.append(time.perf_counter() - start)
            for name in fold:
                table = fold_tables[name]
                meta_quality.append(_meta_quality(meta, table))
                for factor in args.slo_factors:
                    slo = ev.slo_for(table, factor)
                    best = ev.optimum(table, args.objective, slo)
                    for tuner in tuners:
                        progress.update(bar, description=f"{name} slo x{factor} {tuner}")
                        seeds = args.seeds if not tuner.startswith("morphc") else args.morphc_seeds
                        if tuner in ("gp-bo", "tpe"):
                            seeds = args.slow_seeds
                        for seed in range(seeds):
                            result = ev.replay(tuner, table, objective=args.objective, slo_ms=slo,
                                               budget=args.max_budget, seed=seed, meta=meta, delta=args.delta)
                            runs.append({"model": name, "slo_factor": factor, "slo_ms": slo, "tuner": tuner,
                                         "seed": seed, "optimum": best,
                                         "samples_to_5pct": ev.samples_to_within(result, best),
                                         "quality": {b: ev.quality_at(result, best, b) for b in BUDGETS},
                                         "curve": [v / best for v in result.best_so_far()],
                                         "chosen": [t.config.label() for t in result.trials[:10]]})
                        progress.advance(bar)
    summary = _summarize(runs, tuners, args)
    body = _markdown(summary, runs, tables, meta_quality, train_s, args, space)
    _plot(runs, tuners, args)
    settings = {"objective": args.objective, "slo_factors": args.slo_factors, "folds": len(folds),
                "max_budget": args.max_budget, "seeds": args.seeds, "slow_seeds (tpe, gp-bo)": args.slow_seeds,
                "morphc_seeds": args.morphc_seeds, "meta_steps": args.meta_steps, "members": args.members,
                "delta": args.delta, "embedding": EMBEDDING_LABELS[args.embedding], "space_size": len(space)}
    path = common.write_results(args.out, title="Meta-learned config tuner vs baselines (CPU ground truth)",
                                results={"summary": summary, "runs": runs, "meta_quality": meta_quality,
                                         "meta_train_s": train_s},
                                body_md=body, settings=settings, load_at_start=load_start)
    print(f"results written to {path}")


BUDGETS = (5, 10, 20, 30)
EMBEDDING_LABELS = {
    "static": "static (graph-level IR metadata)",
    "gnn": "gnn (cost model cpu-default embed() of the batch-1 Program, z-scored on each fold's training models)",
    "both": "both (static + gnn, each z-scored on each fold's training models, weighted 1/sqrt(dim), concatenated)",
}


def _gnn_embeddings(tables: list, progress_label: bool = False) -> dict[str, np.ndarray]:
    """The shipped cost model's graph embedding of every table's model, re-lowered from its stored source at
    batch 1 (the Program the static embedding was computed on, see groundtruth.register_model)."""
    from rich.progress import track

    from morphc.predictors.cost_model import load_default
    from morphc.predictors.records import program_fingerprint
    from morphc.predictors.tuner.sources import ModelSource

    cost_model = load_default()
    out = {}
    for table in track(tables, description="GNN embeddings (lowering at batch 1)", disable=not progress_label):
        program = ModelSource(table.source).program(1)
        if program_fingerprint(program) != table.fingerprint:
            raise SystemExit(f"re-lowering '{table.source}' gives another Program than the one measured "
                             f"(fingerprint {table.fingerprint}); the zoo model changed since `collect`")
        out[table.name] = np.asarray(cost_model.embed(program), dtype=np.float32)
    return out


def _with_embedding(by_name: dict, fold: list[str], kind: str, gnn: dict[str, np.ndarray]) -> dict:
    """The tables with the embedding `kind` for one fold: `static` as recorded; `gnn` and `both` normalized
    with statistics of the fold's meta-training models only (held-out models are transformed, never fitted)."""
    from dataclasses import replace

    from morphc.predictors.tuner.embedding import combine, standardize

    if kind == "static":
        return dict(by_name)
    names = list(by_name)
    train = [n for n in names if n not in fold]
    g_all = np.stack([gnn[n] for n in names])
    g_train = np.stack([gnn[n] for n in train])
    if kind == "gnn":
        rows = standardize(g_train, g_all)
    elif kind == "both":
        s_all = np.stack([by_name[n].embedding for n in names])
        s_train = np.stack([by_name[n].embedding for n in train])
        rows = combine({"static": (s_train, s_all), "gnn": (g_train, g_all)})
    else:
        raise SystemExit(f"unknown embedding '{kind}'; valid: {', '.join(EMBEDDING_LABELS)}")
    return {n: replace(by_name[n], embedding=row) for n, row in zip(names, rows)}


def _meta_quality(meta, table) -> dict:
    """Rank correlation of predicted and measured latency on a held-out model: zero-shot and after 5 measurements."""
    import numpy as np
    from scipy.stats import spearmanr

    feats = table.space.features()
    truth = np.log(table.latency_ms)
    zero = meta.predict(feats, table.embedding).mean(0)
    idx = np.random.default_rng(0).choice(len(truth), 5, replace=False)
    adapted = meta.predict(feats, table.embedding, meta.adapt(feats[idx], table.embedding, truth[idx])).mean(0)
    return {"model": table.name, "spearman_zero_shot": float(spearmanr(zero, truth)[0]),
            "spearman_after_5": float(spearmanr(adapted, truth)[0]),
            "mae_log_zero_shot": float(np.abs(zero - truth).mean()),
            "mae_log_after_5": float(np.abs(adapted - truth).mean())}


def _summarize(runs: list[dict], tuners: list[str], args: argparse.Namespace) -> dict:
    import numpy as np

    cap = args.max_budget + 1
    out: dict = {}
    for factor in args.slo_factors:
        per_factor = {}
        for tuner in tuners:
            rs = [r for r in runs if r["tuner"] == tuner and r["slo_factor"] == factor]
            models = sorted({r["model"] for r in rs})
            per_model = {m: float(np.median([r["samples_to_5pct"] or cap for r in rs if r["model"] == m]))
                         for m in models}
            per_factor[tuner] = {
                "median_samples": float(np.median(list(per_model.values()))),
                "worst_samples": float(max(per_model.values())),
                "mean_samples": float(np.mean([r["samples_to_5pct"] or cap for r in rs])),
                "missed_runs": sum(r["samples_to_5pct"] is None for r in rs), "runs": len(rs),
                "per_model": per_model,
                "quality": {b: float(np.mean([r["quality"][b] for r in rs])) for b in BUDGETS},
                "quality_worst": {b: float(np.min([r["quality"][b] for r in rs])) for b in BUDGETS},
            }
        out[str(factor)] = per_factor
    return out


def _fmt_samples(x: float, cap: int) -> str:
    return f">{cap - 1}" if x >= cap else f"{x:g}"


def _markdown(summary: dict, runs: list[dict], tables: list, meta_quality: list[dict], train_s: list[float],
              args: argparse.Namespace, space) -> str:
    import numpy as np


    cap = args.max_budget + 1
    lines = [f"Space: `{space.name}`, {len(space)} CPU configs per model (batch 1/2/4/8 x threads 1/2 x "
             "{eager, eager + `fold-batchnorm,fold-constants,cse,dce`, ONNX Runtime x optimization "
             "disable/basic/extended/all x sequential/parallel(1 or 2 inter-op threads) x spinning on/off}). "
             f"Ground truth: {len(tables)} models, every config measured once (median of 9 runs after 2 warm-up), "
             f"{len(tables) * len(space)} measurements in `benchmarks/data/tuner-groundtruth.sqlite`.",
             "",
             f"Objective: {args.objective} with the latency SLO met; SLO = factor x the model's fastest batch-1 "
             f"latency. Whole models held out of meta-training ({args.folds}-fold over models). Meta-model: "
             f"MAML ensemble of {args.members} MLPs, {args.meta_steps} meta-steps, "
             + ("embedding = static graph features from IR metadata (FLOPs, bytes, params, node count, op mix; "
                "the GNN `embed()` is a drop-in option not used here). " if args.embedding == "static"
                else f"embedding = {EMBEDDING_LABELS[args.embedding]} (`--embedding {args.embedding}`). ")
             + f"morphc is deterministic given its meta-model (the seed only "
             f"breaks ties): {args.morphc_seeds} seed(s); random/grid {args.seeds} seeds, TPE and GP-BO "
             f"{args.slow_seeds} seeds. Budget cap {args.max_budget} ({_fmt_samples(cap, cap)} = not reached).",
             "", "Models: " + ", ".join(f"{t.name} ({t.latency_ms.min():.2f}-{t.latency_ms.max():.1f} ms)"
                                        for t in tables), ""]
    for factor, per in summary.items():
        lines += [f"## SLO = {factor} x fastest batch-1 latency", ""]
        header = ["tuner", "samples to 5% (median over models)", "worst model", "mean over runs",
                  "runs missing 5%"] + [f"quality @{b}" for b in BUDGETS]
        rows = [[t, _fmt_samples(v["median_samples"], cap), _fmt_samples(v["worst_samples"], cap),
                 f"{v['mean_samples']:.1f}", f"{v['missed_runs']}/{v['runs']}"]
                + [f"{v['quality'][b]:.3f}" for b in BUDGETS] for t, v in per.items()]
        lines += [common.markdown_table(header, rows), ""]
        if "tpe" in per:
            for t in per:
                if t.startswith("morphc"):
                    ratio = per["tpe"]["median_samples"] / per[t]["median_samples"]
                    bound = ">=" if per["tpe"]["median_samples"] >= cap else ""
                    lines.append(f"- {t}: {bound}{ratio:.1f}x fewer samples than TPE (median samples to within 5%"
                                 f"{'; TPE capped at the budget' if bound else ''})")
        lines += ["", "Per held-out model (median samples to 5% over seeds):", ""]
        models = sorted(next(iter(per.values()))["per_model"])
        lines += [common.markdown_table(["model", *per.keys()],
                                 [[m, *(_fmt_samples(per[t]["per_model"][m], cap) for t in per)] for m in models]),
                  ""]
    lines += ["## Meta-model accuracy on held-out models", "",
              common.markdown_table(["model", "Spearman zero-shot", "Spearman after 5 measurements",
                                     "MAE log zero-shot", "MAE log after 5"],
                             [[q["model"], f"{q['spearman_zero_shot']:.2f}", f"{q['spearman_after_5']:.2f}",
                               f"{q['mae_log_zero_shot']:.2f}", f"{q['mae_log_after_5']:.2f}"] for q in meta_quality]),
              "", f"Meta-training time per fold: {np.mean(train_s):.0f} s (shared 2-core CPU).", "",
              f"![best found vs samples]({args.out}.png)", ""]
    return "\n".join(lines)


def _plot(runs: list[dict], tuners: list[str], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np


    factors = args.slo_factors
    fig, axes = plt.subplots(1, len(factors), figsize=(5 * len(factors), 3.5), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        for tuner in tuners:
            curves = [r["curve"] for r in runs if r["tuner"] == tuner and r["slo_factor"] == factor]
            if curves:
                ax.plot(range(1, args.max_budget + 1), np.mean(curves, axis=0), label=tuner)
        ax.axhline(0.95, color="grey", linestyle=":")
        ax.set_xlabel("configurations measured")
        ax.set_ylabel("best found / optimum (mean)")
        ax.set_title(f"SLO = {factor} x fastest batch-1")
        ax.set_ylim(0, 1.02)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(common.RESULTS / f"{args.out}.png", dpi=100)
    plt.close(fig)


def cmd_noise(args: argparse.Namespace) -> None:
    """Re-measure a random sample of configs of some models and compare with the stored table."""
    import numpy as np

    from morphc.predictors.tuner.groundtruth import load_tables, measure_config, prepare

    load_start = common.load_average()
    space = cpu_space()
    tables = [t for t in load_tables(RecordsDB(args.db), space) if not args.models or t.name in args.models]
    rng = np.random.default_rng(0)
    rows, ratios = [], []
    for table in tables[: args.n_models]:
        idx = rng.choice(len(space), args.per_model, replace=False)
        with timing_lock(LOCK):
            for i in idx:
                c = space.configs[i]
                program, onnx = prepare(table.source, c.batch, c.backend == "onnxruntime")
                again = measure_config(program, c, onnx_model=onnx)["median_ms"]
                ratios.append(again / table.latency_ms[i])
                rows.append([table.name, c.label(), f"{table.latency_ms[i]:.3f}", f"{again:.3f}",
                             f"{again / table.latency_ms[i]:.2f}"])
    logr = np.abs(np.log(ratios))
    body = (f"Re-measured {len(ratios)} configs: median |log ratio| {np.median(logr):.3f} "
            f"(x{np.exp(np.median(logr)):.2f}), 90th percentile x{np.exp(np.percentile(logr, 90)):.2f}.\n\n"
            + common.markdown_table(["model", "config", "table ms", "again ms", "ratio"], rows))
    path = common.write_results("tuner_noise", title="Ground-truth table noise (re-measured configs)",
                                results={"ratios": ratios}, body_md=body,
                                settings={"per_model": args.per_model, "n_models": args.n_models},
                                load_at_start=load_start)
    print(body.splitlines()[0], f"-> {path}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.fn(args)


def build_parser() -> argparse.ArgumentParser:
    """The command line (separate from main so a test can check what parses without running anything)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="measure the ground-truth tables (resumable)")
    c.add_argument("--db", default=str(GROUND_TRUTH_DB))
    c.add_argument("--models", nargs="*", help="only these corpus names")
    c.add_argument("--warmup", type=int, default=2)
    c.add_argument("--repeats", type=int, default=9)
    c.add_argument("--executor", default="local")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--max-hold-s", type=float, default=900.0, help="release the timing lock between models after this")
    c.set_defaults(fn=cmd_collect)
    e = sub.add_parser("evaluate", help="replay the tuners on the tables")
    e.add_argument("--db", default=str(GROUND_TRUTH_DB))
    e.add_argument("--models", nargs="*")
    e.add_argument("--tuners", nargs="*")
    e.add_argument("--objective", default="throughput-per-core")
    e.add_argument("--slo-factors", nargs="*", type=float, default=[3.0])
    e.add_argument("--folds", type=int, default=4)
    e.add_argument("--max-budget", type=int, default=40)
    e.add_argument("--seeds", type=int, default=5)
    e.add_argument("--slow-seeds", type=int, default=3)
    e.add_argument("--morphc-seeds", type=int, default=1)
    e.add_argument("--meta-steps", type=int, default=1500)
    e.add_argument("--members", type=int, default=4)
    e.add_argument("--meta-seed", type=int, default=0)
    e.add_argument("--delta", type=float, default=0.5)
    e.add_argument("--embedding", choices=list(EMBEDDING_LABELS), default="static",
                   help="model embedding of the meta-model: static IR metadata, the cost model's GNN embed(), or both")
    e.add_argument("--out", default="tuner")
    e.set_defaults(fn=cmd_evaluate)
    n = sub.add_parser("noise", help="re-measure a sample of configs and compare with the tables")
    n.add_argument("--db", default=str(GROUND_TRUTH_DB))
    n.add_argument("--models", nargs="*")
    n.add_argument("--n-models", type=int, default=3)
    n.add_argument("--per-model", type=int, default=15)
    n.set_defaults(fn=cmd_noise)
    return parser


if __name__ == "__main__":
    main()
