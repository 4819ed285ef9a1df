"""`morphc tune`: tune a model's serving config, show progress, a table and a plot, write the result.

    morphc tune zoo:resnet-small --slo-ms 5 --budget 10 -o tuned.safetensors --report tune.md --deploy pod.yaml

Runs the `annotate-config` pass (with `rebatch=true` for zoo/twin sources, so batch is searched)
with a `ConfigTuner` in the PassContext; measurements and trials go to `--records`, so a killed
run started again continues where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from morphc.ir.annotations import ServingConfig
from morphc.ir.program import Program
from morphc.predictors.records import RecordsDB
from morphc.predictors.tuner.smbo import Trial, TuneResult


def add_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("source", help="zoo:NAME[?key=value,...] | twin (batch is tuned too) | program.safetensors | "
                                  "file.py:factory (the program's own batch)")
    t.add_argument("--slo-ms", type=float, default=0.0, help="latency SLO per batch in ms (0: none)")
    t.add_argument("--objective", default="throughput-per-core",
                   choices=("throughput-per-core", "throughput", "latency"))
    t.add_argument("--budget", type=int, default=10, help="configurations to measure")
    t.add_argument("--strategy", default="morphling", choices=("morphling", "ensemble-ei"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--records", default=".morphc/tuning.sqlite", help="records DB for measurements and trials")
    t.add_argument("--groundtruth", default=None, help="ground-truth DB to meta-train on (default: the shipped one)")
    t.add_argument("--meta", default=None, help="meta-model checkpoint (.npz): loaded if it exists, else written")
    t.add_argument("--executor", default="local", help="where trials run: local | ray")
    t.add_argument("--repeats", type=int, default=9, help="timed runs per configuration (median)")
    t.add_argument("--lock", default=None, help="flock this file while measuring (shared machines)")
    t.add_argument("--flush-denormal", action="store_true",
                   help="measure and serve with subnormal floats flushed to zero (CPU FTZ/DAZ)")
    t.add_argument("-o", "--output", help="save the annotated program here (.safetensors)")
    t.add_argument("--report", help="write a Markdown report with a convergence plot here")
    t.add_argument("--deploy", help="write the deployment snippet (pod annotations) here")


def _table(result: TuneResult) -> Table:
    table = Table(title=f"tuning trials ({result.strategy}, stopped: {result.stopped})")
    for col in ("#", "config", "latency ms", "objective", "SLO met", "best so far"):
        table.add_column(col, justify="right" if col != "config" else "left")
    for n, (trial, best) in enumerate(zip(result.trials, result.best_so_far()), start=1):
        table.add_row(str(n), trial.config.label(), f"{trial.latency_ms:.3f}",
                      f"{trial.value:.1f}" if trial.value is not None else "-",
                      "yes" if trial.value is not None else "no", f"{best:.1f}")
    return table


def _report(path: Path, result: TuneResult, ann: ServingConfig, source: str, snippet: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(range(1, len(result.trials) + 1), result.best_so_far(), marker="o")
    ax.set_xlabel("configurations measured")
    ax.set_ylabel(f"best {result.objective}")
    ax.set_title(f"{source}: {result.strategy}")
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    rows = "\n".join(f"| {n} | {t.config.label()} | {t.latency_ms:.3f} | "
                     f"{t.value:.1f} |" if t.value is not None else f"| {n} | {t.config.label()} | "
                     f"{t.latency_ms:.3f} | SLO missed |" for n, t in enumerate(result.trials, start=1))
    path.write_text(
        f"# morphc tune {source}\n\nobjective {result.objective}, SLO {ann.slo_ms} ms, {len(result.trials)} "
        f"configurations measured ({result.strategy}).\n\nChosen: batch {ann.batch}, {ann.threads} thread(s), "
        f"backend {ann.backend} {dict(ann.backend_options)}{' + ' + ann.pipeline if ann.pipeline else ''}: "
        f"{ann.latency_ms:.3f} ms per batch, {ann.throughput:.1f} requests/s.\n\n![convergence]({png.name})\n\n"
        f"| # | config | latency ms | objective |\n|---|---|---|---|\n{rows}\n\n"
        f"Deployment snippet:\n\n```yaml\n{snippet}```\n")


def run(args: argparse.Namespace, program: Program, console: Console) -> int:
    from morphc.ir.serialization import save
    from morphc.passes.manager import PassContext, PassManager
    from morphc.predictors.tuner.maml import MetaModel
    from morphc.predictors.tuner.service import DEFAULT_GROUNDTRUTH, ConfigTuner
    from morphc.runtime.serving import deployment_snippet

    rebatch = args.source.startswith("zoo:") or args.source == "twin"
    meta = MetaModel.load(args.meta) if args.meta and Path(args.meta).exists() else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("meta-training, then tuning" if meta is None else "tuning", total=args.budget)

        def on_trial(trial: Trial) -> None:
            progress.update(task, advance=1, description=f"tuning: {trial.config.label()} {trial.latency_ms:.2f} ms")

        tuner = ConfigTuner(meta=meta, groundtruth=args.groundtruth or DEFAULT_GROUNDTRUTH,
                            source=args.source if rebatch else None, executor=args.executor, repeats=args.repeats,
                            lock=args.lock, on_trial=on_trial)
        records = RecordsDB(args.records)
        pipeline = (f"annotate-config{{slo-ms={args.slo_ms!r},objective={args.objective},budget={args.budget},"
                    f"strategy={args.strategy},seed={args.seed},rebatch={'true' if rebatch else 'false'},"
                    f"flush-denormal={'true' if args.flush_denormal else 'false'}}}")
        tuned = PassManager(pipeline).run(program, PassContext(options={"tuner": tuner}, records=records))
    if args.meta and meta is None and tuner.meta is not None:
        tuner.meta.save(args.meta)
    assert tuner.last is not None
    result = tuner.last.result
    ann = tuned.annotation(ServingConfig)
    assert ann is not None
    console.print(_table(result))
    console.print(f"[bold]chosen[/bold]: batch {ann.batch}, threads {ann.threads}, backend {ann.backend} "
                  f"{dict(ann.backend_options)} {ann.pipeline} -> {ann.latency_ms:.3f} ms, "
                  f"{ann.throughput:.1f} req/s ({len(result.trials)} measured)")
    snippet = deployment_snippet(ann, args.source.replace(":", "-").split("?")[0])
    if args.output:
        console.print(f"annotated program saved to {save(tuned, args.output)}")
    if args.deploy:
        Path(args.deploy).write_text(snippet)
        console.print(f"deployment snippet written to {args.deploy}")
    if args.report:
        _report(Path(args.report), result, ann, args.source, snippet)
        console.print(f"report written to {args.report}")
    return 0
