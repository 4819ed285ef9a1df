"""The `morphc` command line: list passes, apply pipelines to models or saved programs, print IR.

    morphc passes                                   # every pass with its options and docs
    morphc run "fold-constants,cse,dce" models.py:build -o out.safetensors --timing
    morphc run "cse,compile" zoo:branchy_cnn -o exe/          # a terminal pass saves an executable
    morphc run "$(cat repro/pipeline.txt)" repro/input.safetensors   # replay a crash reproducer
    morphc print out.safetensors
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

import morphc as mc
from morphc.errors import MorphcError

console = Console(stderr=True)


def _load_factory(spec: str) -> Any:
    """`file.py:factory` or `package.module:factory` -> the factory's return value."""
    module_ref, sep, attr = spec.rpartition(":")
    if not sep or not module_ref or not attr:
        raise MorphcError(f"model source '{spec}' must be 'file.py:factory', 'package.module:factory', "
                          "'zoo:NAME' or a saved program (.safetensors)")
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise MorphcError(f"model file '{path}' does not exist")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[path.stem] = module
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_ref)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise MorphcError(f"'{module_ref}' has no callable '{attr}'")
    return factory()


def load_source(source: str, batch_size: int = 1) -> mc.Program:
    """A Program from a saved file, a zoo model name, or a factory returning (models, example_inputs)."""
    if source.endswith(".safetensors"):
        return mc.load(source)
    if source.startswith("zoo:"):
        from morphc import zoo

        z = zoo.build(source.removeprefix("zoo:"), batch_size=batch_size)
        return mc.lower(z.model, z.example_inputs)
    made = _load_factory(source)
    if isinstance(made, mc.Program):
        return made
    if hasattr(made, "model") and hasattr(made, "example_inputs"):
        return mc.lower(made.model, made.example_inputs)
    if isinstance(made, tuple) and len(made) == 2:
        return mc.lower(made[0], made[1])
    raise MorphcError(f"factory '{source}' returned a {type(made).__name__}; return (models, example_inputs), "
                      "an object with .model and .example_inputs, or a morphc.Program")


def cmd_passes(args: argparse.Namespace) -> int:
    passes = mc.registered_passes()
    if args.json:
        data = [{"name": name, "preserves_semantics": cls.preserves_semantics, "terminal": cls.terminal,
                 "doc": (cls.__doc__ or "").strip(),
                 "options": [{"key": o.key, "type": o.type_name(), "default": o.format(o.default), "help": o.help}
                             for o in cls.options()]} for name, cls in passes.items()]
        print(json.dumps(data, indent=2))
        return 0
    table = Table(title="morphc passes", show_lines=True)
    table.add_column("pass", style="bold cyan")
    table.add_column("what it does")
    table.add_column("options")
    for name, cls in passes.items():
        kind = "terminal" if cls.terminal else ("semantics-preserving" if cls.preserves_semantics else "approximate")
        opts = "\n".join(f"{o.key}: {o.type_name()} = {o.format(o.default)}  {o.help}" for o in cls.options())
        table.add_row(name, f"{(cls.__doc__ or '').strip()}\n[dim]{kind}[/dim]", opts or "-")
    Console().print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    pipeline = mc.Pipeline.parse(args.pipeline)
    program = load_source(args.source, args.batch_size)
    instruments: list[mc.PassInstrument] = []
    timing = mc.PassTiming()
    instruments.append(timing)
    if args.print_ir_after_all or args.print_ir_after or args.print_ir_before_all:
        after: frozenset[str] | bool = True if args.print_ir_after_all else frozenset(args.print_ir_after or ())
        instruments.append(mc.PrintIR(before=bool(args.print_ir_before_all), after=after, stream=sys.stdout))
    if args.dump_ir:
        instruments.append(mc.DumpIR(Path(args.dump_ir)))
    ctx = mc.PassContext(opt_level=args.opt_level, verify_each=args.verify_each, instruments=instruments,
                         reproducer_dir=Path(args.reproducer_dir))
    with console.status(f"running {pipeline} on {program!r}"):
        result = pipeline.run(program, ctx)
    if args.timing:
        console.print(timing.report(), highlight=False, soft_wrap=True)
    out = Path(args.output) if args.output else None
    if isinstance(result, mc.Program):
        if out:
            mc.save(result, out)
            console.print(f"saved program to {out}")
        else:
            console.print(repr(result))
    else:
        if out:
            result.save(out)
            console.print(f"saved {result.target} executable to {out}")
        console.print(f"{result!r}: {result.report}", soft_wrap=True)
    return 0


def cmd_print(args: argparse.Namespace) -> int:
    sys.stdout.write(str(load_source(args.source, args.batch_size)))
    return 0


PAGE_FAULT_HINT = 100  # page faults per call from which `morphc profile` says where they come from


def cmd_profile(args: argparse.Namespace) -> int:
    """Measure latency (and per-op latency) into a records DB; or profile the cost-model corpus; or show knobs."""
    from dataclasses import asdict

    from morphc.predictors import profiler, records, spaces

    if args.space:
        for profile in spaces.PROFILES.values():
            console.print(f"[bold]{profile.kind}[/bold]: {profile.description}")
            for k in profile.knobs:
                here = "" if k.measurable_here else " [dim](not measurable on this machine)[/dim]"
                console.print(f"  {k.name} in {list(k.values)}: {k.applied}{here}")
        return 0
    db = records.RecordsDB(args.db)
    threads = [int(t) for t in args.threads.split(",")]
    if args.corpus:
        from morphc.predictors.corpus import VARIANTS
        from morphc.predictors.dataset import collect_corpus

        variants = [v for v in VARIANTS if not args.family or v.family in args.family]
        n = collect_corpus(db, variants, batches=[int(b) for b in args.batches.split(",")], threads=threads,
                           lock=args.lock, repeat=args.repeat)
        console.print(f"measured {n} (variant, batch) pairs now; {len(db)} records in {args.db}")
        return 0
    if not args.source:
        raise MorphcError("morphc profile needs a model source (or --corpus, or --space)")
    program = load_source(args.source, args.batch_size)
    configs = [spaces.CpuConfig(threads=t) for t in threads]
    profiler.collect([program], configs, db, repeats=args.repeats)
    device, fp = records.device_fingerprint("cpu"), records.program_fingerprint(program)
    table = Table(title=f"latency of {args.source} (batch {profiler.program_batch(program)})")
    for col in ("threads", "median ms", "p10 ms", "p90 ms", "runs", "outliers", "load", "faults/call"):
        table.add_column(col)
    faulting = []
    for c in configs:
        config = profiler.resolve_config(program, c)
        rec = db.get(profiler.LATENCY, fp, device, asdict(config))
        assert rec is not None
        s = rec.stats
        faults = s.get("page_faults")  # records made before session 19 did not count them
        table.add_row(str(config.threads), f"{s['median_ms']:.3f}", f"{s['p10_ms']:.3f}", f"{s['p90_ms']:.3f}",
                      str(s["runs"]), str(s["outliers"]), str(s.get("load_before")),
                      "-" if faults is None else f"{faults:.0f}")
        if faults is not None and faults >= PAGE_FAULT_HINT:
            faulting.append(f"{faults:.0f} at {config.threads} thread(s)")
        if args.ops:
            ops = profiler.profile_ops(program, config)
            db.put(profiler.OP_LATENCY, fp, device, asdict(config), ops)
    Console().print(table)
    if faulting:
        console.print(f"[yellow]page faults per call: {', '.join(faulting)}.[/yellow] The allocator hands freed "
                      "activations back to the system after each call and faults them in again (about 2 us per "
                      "fault on the machine of docs/cost_model.md, session 19). A heap that keeps its memory avoids "
                      "it: jemalloc or tcmalloc, or glibc with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ set "
                      "high (e.g. 1073741824).")
    console.print(f"records in {args.db} (model {fp})")
    return 0


def cmd_train_cost_model(args: argparse.Namespace) -> int:
    """Train the GNN cost model on a records DB of corpus measurements and save a checkpoint."""
    from morphc.predictors.cost_model import DEFAULT_MEMBERS, TrainItem, train
    from morphc.predictors.dataset import cpu_device, load_samples
    from morphc.predictors.records import RecordsDB

    device = cpu_device(RecordsDB(args.db)) if Path(args.db).is_file() else None
    samples = [s for s in load_samples(args.db, device=device) if not s.unstable]
    if not samples:
        raise MorphcError(f"'{args.db}' holds no corpus measurements for this machine; collect them with "
                          "`morphc profile --corpus --db ...`")
    model, losses = train([TrainItem(s.graph, s.config, s.latency_ms, s.runtime, s.family) for s in samples],
                          steps=args.steps, seed=args.seed, device=device,
                          members=args.members or DEFAULT_MEMBERS)
    model.meta["trained"].update(db=Path(args.db).name, statistic="p10_ms")
    path = model.save(args.output)
    console.print(f"trained on {len(samples)} samples, final loss {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                  f"(MSE of log latency); saved {path}")
    return 0


def _cost_model(checkpoint: str | None, calibration_path: str | None) -> Any:
    """The checkpoint at `checkpoint` (None: the shipped one for this machine), calibrated to this machine with
    the calibration file at `calibration_path` where given."""
    from morphc.predictors import calibration, cost_model

    model = cost_model.load_or_default(checkpoint)
    if not calibration_path:
        return model
    cal = calibration.load(calibration_path)
    console.print(f"[dim]{cal.summary()}[/dim]")
    return calibration.apply(model, cal)


SHIPPED = "shipped"  # `--cost-model` with no path: the checkpoint shipped with morphc for this machine


def _add_cost_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--cost-model`: fuse-models (`latency=auto`) predicts each candidate's latency instead of timing it."""
    parser.add_argument("--cost-model", nargs="?", const=SHIPPED, metavar="CHECKPOINT",
                        help="give passes the latency cost model: the shipped one for this machine, or the checkpoint "
                             "at CHECKPOINT (fuse-models{latency=auto} then predicts instead of timing)")
    parser.add_argument("--calibration", help="with --cost-model: its calibration to this machine "
                                              "(`morphc calibrate-cost-model`)")
    parser.add_argument("--latency-config", default="threads=1", metavar="CONFIG",
                        help='with --cost-model: the config latencies are predicted at, e.g. "threads=2" '
                             '(default %(default)s; without batch=, the program\'s own batch)')


def _with_cost_model(ctx: mc.PassContext, args: argparse.Namespace) -> mc.PassContext:
    """`ctx` with the cost model and latency config that `--cost-model` asks for (unchanged without it)."""
    if args.cost_model is None:
        if args.calibration:
            raise MorphcError("--calibration calibrates a cost model: give --cost-model too")
        return ctx
    from morphc.predictors import spaces

    ctx.cost_model = _cost_model(None if args.cost_model == SHIPPED else args.cost_model, args.calibration)
    ctx.options["latency_config"] = spaces.parse_config(args.latency_config, ctx.cost_model.device_kind)
    return ctx


def cmd_calibrate_cost_model(args: argparse.Namespace) -> int:
    """Time the probe programs here and save the scale that turns the checkpoint's predictions into this
    machine's (morphc.predictors.calibration)."""
    import datetime as dt

    from morphc.predictors import calibration, cost_model

    model = cost_model.load_or_default(args.checkpoint)
    if args.refit:
        if args.db:
            raise MorphcError("--refit fits a calibration file's stored probe times again, it measures nothing: "
                              "give --db or --refit, not both")
        cal = calibration.refit(model, calibration.load(args.refit), cache_dir=args.cache)
        where = f"probe times of {args.refit} (measured {cal.measured_at})"
    else:
        db = args.db or f".morphc/calibration-{dt.datetime.now(dt.UTC):%Y-%m-%d}.sqlite"
        Path(db).parent.mkdir(parents=True, exist_ok=True)
        cal = calibration.calibrate(model, db, cache_dir=args.cache)
        where = f"measurements in {db}"
    path = cal.save(args.output)
    console.print(f"{cal.summary()}\n{where}; saved {path} (use it with --calibration {path})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict a program's latency under one or more configs with a cost-model checkpoint."""
    from morphc.predictors import spaces

    model = _cost_model(args.checkpoint, args.calibration)
    program = load_source(args.source, args.batch_size)
    configs = [spaces.parse_config(c, model.device_kind) for c in (args.config or ["threads=1"])]
    preds = model.predict_many([(program, c) for c in configs])
    for c, p in zip(configs, preds):
        print(f"{c}: {p * 1e3:.4f} ms")
    return 0


def cmd_serve_cost_model(args: argparse.Namespace) -> int:
    """Serve predictions until interrupted."""
    from morphc.predictors.service import make_server

    model = _cost_model(args.checkpoint, args.calibration)
    server = make_server(model, args.host, args.port)
    host, port = server.server_address[:2]
    console.print(f"serving {model.device_kind} latency predictions on http://{host}:{port} "
                  "(GET /v1/model, POST /v1/predict); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    """Fuse task models: the factory returns (models, example_inputs, FusionData[, training example inputs])."""
    from morphc.passes.fusion.data import FusionData

    made = _load_factory(args.source)
    if not (isinstance(made, tuple) and len(made) in (3, 4) and isinstance(made[2], FusionData)):
        raise MorphcError(f"factory '{args.source}' must return (models dict, example_inputs, FusionData) or "
                          "(models dict, example_inputs, FusionData, training example_inputs); "
                          f"got {type(made).__name__}")
    models, example_inputs, data = made[:3]
    options: dict[str, Any] = {"progress": True}
    if len(made) == 4:
        options["fusion_train_program"] = mc.lower(models, made[3])
    program = mc.lower(models, example_inputs)
    ctx = _with_cost_model(mc.PassContext(calibration=data, options=options), args)
    fused = mc.PassManager(f"fuse-models{{{args.options}}}" if args.options else "fuse-models").run(program, ctx)
    report = ctx.options["fusion_report"]
    sys.stdout.write(report.markdown())
    if args.report:
        console.print(f"wrote {report.write(args.report)}")
    if args.output:
        mc.save(fused, args.output)
        console.print(f"saved fused program to {args.output}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from morphc.predictors.tuner import command

    if args.source.startswith("zoo:") or args.source == "twin":
        from morphc.predictors.tuner.sources import ModelSource

        program = ModelSource(args.source).program(1)
    else:
        program = load_source(args.source)
    return command.run(args, program, console)


def cmd_cold_start(args: argparse.Namespace) -> int:
    """Schedule a program's cold start, export the plan, and optionally run it cold (disk tier)."""
    from morphc.passes.load_schedule import export_plan
    from morphc.predictors.layer_profile import profile_layers
    from morphc.predictors.records import RecordsDB
    from morphc.runtime.cold_start import ColdStartExecutor
    from morphc.runtime.weights_file import write_weights

    program = load_source(args.source, args.batch_size)
    db = RecordsDB(args.db) if args.db else None
    if args.measure:
        assert db is not None
        weights = write_weights(program, args.weights)
        with console.status("measuring the per-layer profile from the cold state"):
            profile_layers(program, db, weights, runs=args.runs, refresh=True)
    text = f"insert-load-schedule{{strategy={args.strategy},channels={args.channels}}}"
    scheduled = mc.Pipeline.parse(text).run(program, mc.PassContext(device=args.device, records=db))
    plan = scheduled.annotation(mc.ir.load_plan.LoadPlan)
    console.print(f"{plan.strategy}: {plan.modes().count('load')} layers loaded, {plan.modes().count('direct')} "
                  f"direct, predicted {plan.predicted_total_ms:.2f} ms (costs: {plan.profile})")
    measured = None
    if args.run:
        weights = write_weights(scheduled, args.weights)  # in the plan's layout: its loads one stream
        _, timeline = ColdStartExecutor(scheduled, weights).run(*scheduled.example_inputs, cold=True)
        measured = timeline.rows()
        console.print(f"measured cold first inference: {timeline.total_ms:.2f} ms, read "
                      f"{(timeline.read_bytes or 0) / 1e6:.1f} MB from storage")
    for out in args.output or ():
        export_plan(scheduled, out, measured if out.endswith(".md") else None)
        console.print(f"wrote {out}")
    if args.save:
        mc.save(scheduled, args.save)
        console.print(f"saved scheduled program to {args.save}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="morphc", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("passes", help="list registered passes with their options")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_passes)

    r = sub.add_parser("run", help="apply a pipeline to models or a saved program and save the result")
    r.add_argument("pipeline", help='pipeline text, e.g. "fold-constants,cse,dce,compile{target=eager}"')
    r.add_argument("source", help="file.py:factory | package.module:factory | zoo:NAME | program.safetensors")
    r.add_argument("-o", "--output", help="where to save the program (.safetensors) or executable (directory)")
    r.add_argument("--batch-size", type=int, default=1, help="batch size of zoo example inputs")
    r.add_argument("--opt-level", type=int, default=2)
    r.add_argument("--verify-each", action="store_true", help="verify the IR after every pass")
    r.add_argument("--timing", action="store_true", help="print per-pass time and statistics")
    r.add_argument("--print-ir-after-all", action="store_true")
    r.add_argument("--print-ir-before-all", action="store_true")
    r.add_argument("--print-ir-after", action="append", metavar="PASS", help="print IR after this pass (repeatable)")
    r.add_argument("--dump-ir", metavar="DIR", help="write the IR after each pass into DIR")
    r.add_argument("--reproducer-dir", default=str(mc.passes.manager.DEFAULT_REPRODUCER_DIR),
                   help="where a failing pass writes its reproducer")
    r.set_defaults(func=cmd_run)

    pr = sub.add_parser("print", help="print the IR of a saved program or a model source")
    pr.add_argument("source")
    pr.add_argument("--batch-size", type=int, default=1)
    pr.set_defaults(func=cmd_print)

    pf = sub.add_parser("profile", help="measure latency (end-to-end, per-op) into a records database")
    pf.add_argument("source", nargs="?", help="model source as for `run` (omit with --corpus / --space)")
    pf.add_argument("--db", default=".morphc/records.sqlite", help="records database (SQLite)")
    pf.add_argument("--batch-size", type=int, default=1)
    pf.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    pf.add_argument("--repeats", type=int, default=30)
    pf.add_argument("--ops", action="store_true", help="also measure per-operator latency")
    pf.add_argument("--corpus", action="store_true", help="profile the cost-model corpus (resumable)")
    pf.add_argument("--family", action="append", help="with --corpus: only this family (repeatable)")
    pf.add_argument("--batches", default="1,2,4,8,16", help="with --corpus: batch sizes")
    pf.add_argument("--repeat", type=int, default=0,
                    help="with --corpus: measure again as pass N (1, 2, ...); training learns the median of the passes")
    pf.add_argument("--lock", default=None, help="with --corpus: flock this file per variant while measuring")
    pf.add_argument("--space", action="store_true", help="show the device profiles and their knobs")
    pf.set_defaults(func=cmd_profile)

    tc = sub.add_parser("train-cost-model", help="train the GNN latency model on corpus records")
    tc.add_argument("--db", default="benchmarks/results/cost_model.sqlite")
    tc.add_argument("-o", "--output", default=".morphc/cost-model.npz")
    tc.add_argument("--steps", type=int, default=3000)
    tc.add_argument("--seed", type=int, default=0)
    tc.add_argument("--members", type=int, default=None,
                    help="independently seeded networks whose log predictions are averaged (an ensemble; "
                         "default: as many as the shipped checkpoint has)")
    tc.set_defaults(func=cmd_train_cost_model)

    pd = sub.add_parser("predict", help="predict a program's latency with the cost model")
    pd.add_argument("source", help="model source as for `run`")
    pd.add_argument("--config", action="append", help='e.g. "threads=2" or "batch=8,threads=1" (repeatable)')
    pd.add_argument("--checkpoint", help="cost-model checkpoint (default: the one shipped with morphc)")
    pd.add_argument("--calibration", help="a calibration of the checkpoint to this machine "
                                          "(`morphc calibrate-cost-model`): predict this machine's latencies")
    pd.add_argument("--batch-size", type=int, default=1)
    pd.set_defaults(func=cmd_predict)

    ca = sub.add_parser("calibrate-cost-model", help="time probe programs here and scale a checkpoint's "
                                                     "predictions to this machine's speed (about 2 minutes)")
    ca.add_argument("--checkpoint", help="cost-model checkpoint (default: the one shipped with morphc)")
    ca.add_argument("--db", help="records database of the probe measurements (default: "
                                 ".morphc/calibration-<UTC date>.sqlite; a database that holds them is not "
                                 "measured again: name a new one to calibrate afresh)")
    ca.add_argument("--refit", metavar="CALIBRATION",
                    help="time nothing: fit this calibration file's probe times again, to --checkpoint (after an "
                         "upgrade brought another checkpoint, whose calibration files are then refused)")
    ca.add_argument("-o", "--output", default=".morphc/cost-model-calibration.json")
    ca.add_argument("--cache", help="directory of lowered probe programs (reused when present)")
    ca.set_defaults(func=cmd_calibrate_cost_model)

    sv = sub.add_parser("serve-cost-model", help="answer latency predictions over HTTP (GET /v1/model, "
                                                 "POST /v1/predict; see morphc.predictors.service)")
    sv.add_argument("--checkpoint", help="cost-model checkpoint (default: the one shipped with morphc)")
    sv.add_argument("--calibration", help="a calibration of the checkpoint to this machine")
    sv.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: this machine only)")
    sv.add_argument("--port", type=int, default=8765)
    sv.set_defaults(func=cmd_serve_cost_model)

    fu = sub.add_parser("fuse", help="fuse task models into one multi-task model within an accuracy bound")
    fu.add_argument("source", help="file.py:factory returning (models, example_inputs, FusionData[, train inputs])")
    fu.add_argument("--options", default="", help='fuse-models options, e.g. "max-acc-drop=0.01,max-candidates=20"')
    fu.add_argument("-o", "--output", help="where to save the fused program (.safetensors)")
    fu.add_argument("--report", metavar="DIR", help="write the search report (Markdown + Pareto plot) into DIR")
    _add_cost_model_arguments(fu)
    fu.set_defaults(func=cmd_fuse)
    tu = sub.add_parser("tune", help="find the best serving config (meta-learned SMBO) and annotate the program")
    from morphc.predictors.tuner.command import add_arguments as _tune_arguments

    _tune_arguments(tu)
    tu.set_defaults(func=cmd_tune)

    cs = sub.add_parser("cold-start", help="plan (and run) a first inference with the weights on disk")
    cs.add_argument("source", help="model source as for `run`")
    cs.add_argument("--strategy", default="plan", choices=["plan", "pipeline", "on-demand", "direct"])
    cs.add_argument("--channels", type=int, default=1, help="parallel transmission channels (GPUs)")
    cs.add_argument("--device", default="cpu", help="cpu (disk tier) or cuda (host tier: plans only here)")
    cs.add_argument("--db", default=".morphc/records.sqlite", help="records database with layer profiles")
    cs.add_argument("--weights", default=".morphc/cold-start-weights.safetensors",
                    help="where to write the weights file for --measure/--run (a real disk, not tmpfs)")
    cs.add_argument("--measure", action="store_true", help="measure the per-layer profile first (cold runs)")
    cs.add_argument("--runs", type=int, default=3, help="cold runs per baseline when measuring")
    cs.add_argument("--run", action="store_true", help="run the plan once from the cold state and report it")
    cs.add_argument("-o", "--output", action="append", help="export the plan: plan.json or plan.md (repeatable)")
    cs.add_argument("--save", help="save the scheduled program (.safetensors)")
    cs.add_argument("--batch-size", type=int, default=1)
    cs.set_defaults(func=cmd_cold_start)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with torch.no_grad():  # inference tool; training steps (fusion) enable grad themselves
            return args.func(args)
    except MorphcError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, markup=True, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
