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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_grad_enabled(False)
    try:
        return args.func(args)
    except MorphcError as exc:
        console.print(f"[bold red]error:[/bold red] {exc}", highlight=False, markup=True, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
