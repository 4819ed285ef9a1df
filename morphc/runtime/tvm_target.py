"""The TVM target: Program -> torch.export -> Relax -> (MetaSchedule tuning) -> tvm.compile -> Relax VM.

Route: `relax.frontend.torch.from_exported_program` on the Program's ATen graph (the exported-program
route; `from_fx` gets batch norm wrong, ../shared/FACTS.md), weights bound as constants, then
`tvm.compile` for `llvm` (CPU) or `cuda`. TVM's default CPU pipeline schedules no loop, which is
13-37x slower than eager torch; speed on CPU comes from MetaSchedule tuning (`trials` > 0), whose
records are kept in morphc's records database (kind "tvm-tuning", keyed by the tuning workloads'
structural hash, which covers ops and shapes, and the target) so compiling the same model again
replays them without tuning. apache-tvm is an optional dependency imported only here.

Options (PassContext.options["tvm"] or `compile_program(options=...)`):

    target           "llvm" (default), "cuda", or a TVM target in JSON-dict form
    mcpu             LLVM CPU for llvm ("host" = this machine's CPU, the default; "generic" for a
                     library that runs on any x86-64)
    threads          TVM runtime threads, and num-cores of the llvm target (default torch's)
    trials           MetaSchedule trial budget (default 0: no tuning, but records already stored for
                     this workload and target are applied)
    trials_per_task  cap per tuning task (default: trials spread evenly over the tasks)
    records          a RecordsDB or a path to one for tuning records (default: PassContext.records,
                     else $MORPHC_RECORDS, else ~/.cache/morphc/records.sqlite when trials > 0)
    arch             CUDA architecture for cuda (default sm_90)

CUDA: building needs no GPU; the executable keeps the generated CUDA source
(`exe.cuda_source()`), and `tvm.compile` turns it into a cubin with nvcc when the CUDA toolkit is
found. Running it needs a GPU (none on the machines this was developed on, so CUDA execution is
untested here; compile with `verify=False` where no GPU is present).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from morphc.errors import did_you_mean
from morphc.ir.program import Program
from morphc.runtime.executable import (
    CompileError,
    CompileReport,
    Executable,
    check_target_option,
    nodes_rejected,
    register_target,
)

LIB_FILE = "model.so"
CUDA_SOURCE_FILE = "model.cu"
OPTIONS_FILE = "tvm.json"
TUNING_KIND = "tvm-tuning"
_VALID_OPTIONS = ("target", "mcpu", "threads", "trials", "trials_per_task", "records", "arch")


def import_tvm() -> Any:
    try:
        import tvm
    except ImportError as exc:
        raise CompileError("the 'tvm' target needs apache-tvm: pip install 'morphc[tvm]'") from exc
    return tvm


@functools.cache
def supported_aten_ops() -> frozenset[str]:
    """ATen overloads ('conv2d.default', ...) the Relax exported-program importer converts."""
    import_tvm()
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().create_convert_map())


def unsupported(program: Program) -> dict[str, str]:
    """Nodes the importer has no converter for (custom torch.library ops, ATen ops it lacks)."""
    known = supported_aten_ops()

    def why(op: torch._ops.OpOverload) -> str | None:
        key = f"{op._opname}.{op._overloadname}"
        if op.namespace == "aten" and key in known:
            return None
        return f"TVM's Relax importer has no converter for {op.namespace}.{key}"

    return nodes_rejected(program, why)


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Validate and fill defaults; `records` is kept as given (a RecordsDB is not JSON)."""
    unknown = sorted(set(options) - set(_VALID_OPTIONS))
    if unknown:
        raise CompileError(f"target 'tvm' has no option(s) {unknown}{did_you_mean(unknown[0], _VALID_OPTIONS)}; "
                           f"valid options: {', '.join(_VALID_OPTIONS)}")
    target = options.get("target", "llvm")
    if isinstance(target, str):
        if target not in ("llvm", "cuda"):
            raise CompileError(f"option 'target' of target 'tvm' must be 'llvm', 'cuda' or a JSON-dict TVM target; "
                               f"got {target!r}{did_you_mean(target, ['llvm', 'cuda'])}")
    elif not (isinstance(target, dict) and target.get("kind") in ("llvm", "cuda")):
        raise CompileError(f"option 'target' of target 'tvm' as a dict needs kind 'llvm' or 'cuda'; got {target!r}")
    opts: dict[str, Any] = {
        "target": target,
        "mcpu": str(options.get("mcpu", "host")),
        "threads": int(options.get("threads") or torch.get_num_threads()),
        "trials": int(options.get("trials", 0)),
        "trials_per_task": None if options.get("trials_per_task") is None else int(options["trials_per_task"]),
        "arch": str(options.get("arch", "sm_90")),
    }
    for key, minimum in (("threads", 1), ("trials", 0), ("trials_per_task", 1)):
        check_target_option("tvm", key, opts[key], minimum=minimum)
    return opts


def make_target(opts: dict[str, Any]) -> Any:
    """The TVM Target (JSON-dict form: TVM 0.27 rejects flag strings)."""
    tvm = import_tvm()
    target = opts["target"]
    if isinstance(target, dict):
        return tvm.target.Target(target)
    if target == "cuda":
        host = {"kind": "llvm"}
        return tvm.target.Target({"kind": "cuda", "arch": opts["arch"]}, host=host)
    spec: dict[str, Any] = {"kind": "llvm", "num-cores": opts["threads"]}
    mcpu = opts["mcpu"]
    if mcpu == "host":
        mcpu = tvm.target.codegen.llvm_get_system_cpu()
    if mcpu and mcpu != "generic":
        spec["mcpu"] = mcpu
    return tvm.target.Target(spec)


def to_relax(program: Program) -> Any:
    """The Program as a Relax IRModule with weights bound as constants (one tuple output)."""
    import_tvm()
    from tvm.relax.frontend.torch import from_exported_program

    gm = _views_as_reshapes(program.graph_module)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(gm, tuple(program.example_inputs), strict=False)
    except Exception as exc:
        raise CompileError(f"torch.export of the program failed for target 'tvm': {_first_line(exc)}") from exc
    try:
        return from_exported_program(exported, keep_params_as_input=False, unwrap_unit_return_tuple=False)
    except Exception as exc:  # the importer raises AssertionError/ValueError naming the op
        raise CompileError(f"TVM's Relax importer could not convert the program: {_first_line(exc)} "
                           "(compile with fallback to run unsupported ops in torch)") from exc


def _views_as_reshapes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy whose `aten.view`s are `aten.reshape`s: the importer's decompositions can change the
    strides a view relied on (GPT-2's attention), while reshape is valid for any strides."""
    import copy

    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    out = torch.fx.GraphModule(gm, graph)
    out.eval()
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- MetaSchedule tuning with records in morphc's records database ----------------------------


def _records_db(records: Any) -> Any:
    """A RecordsDB from an object, a path, $MORPHC_RECORDS or the default cache file."""
    from morphc.predictors.records import RecordsDB  # imported lazily: only tuning needs it

    if records is not None and not isinstance(records, (str, os.PathLike)):
        return records
    path = records or os.environ.get("MORPHC_RECORDS") or Path.home() / ".cache" / "morphc" / "records.sqlite"
    return RecordsDB(path)


def _target_json(target: Any) -> str:
    return json.dumps(dict(target.export()), sort_keys=True, default=str)


def workload_key(tasks: list[Any], target: Any) -> str:
    """What tuning records depend on: every task's TIR (ops, shapes, dtypes) and the target."""
    import_tvm()
    from tvm_ffi import structural_hash

    hashes = sorted(str(structural_hash(t.dispatched[0])) for t in tasks)
    text = "\n".join([_target_json(target), *hashes])
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="morphc-tvm-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _json_db(ms: Any, work: Path, stats: dict[str, Any] | None) -> Any:
    if stats:
        (work / "database_workload.json").write_text(stats["workloads"])
        (work / "database_tuning_record.json").write_text(stats["tuning_records"])
    return ms.database.JSONDatabase(work_dir=str(work))


def _register_tensor_intrinsics(kind: str) -> None:
    """Register only the tensor intrinsics of this target kind before MetaSchedule imports them all.

    `TuneContext` and the default builder import `tvm.s_tir.tensor_intrin`, which parses every
    intrinsic of every backend in TVMScript: 25 s idle and over 3 minutes under load on this
    machine, 70% of it CUDA's. A package module without its __init__ stands in for it, with the
    intrinsics of `kind` (x86 for llvm, cuda for cuda) imported into it.
    """
    name = "tvm.s_tir.tensor_intrin"
    wanted = f"{name}.{'cuda' if kind == 'cuda' else 'x86'}"
    if name not in sys.modules:
        import tvm.s_tir

        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType(name, "TVM tensor intrinsics (registered per target kind by morphc)")
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = name
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
    importlib.import_module(wanted)


def _tune(ms: Any, tasks: list[Any], target: Any, work: Path, trials: int, per_task: int | None,
          database: Any) -> None:
    import tvm_ffi
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    if tvm_ffi.__version__.startswith("0.1.15"):  # tvm::ffi::ToJSONGraph segfaults: MetaSchedule saves JSON
        raise CompileError(f"MetaSchedule tuning crashes with apache-tvm-ffi {tvm_ffi.__version__} and apache-tvm "
                           "0.27 (segfault in ToJSONGraph); install apache-tvm-ffi==0.1.14.post0, or compile "
                           "with trials=0")
    _register_tensor_intrinsics(target.kind.name)

    try:
        import xgboost  # noqa: F401
        cost_model = "xgb"
    except ImportError:  # xgboost comes with morphc[tvm]; without it random search still tunes, slowly
        cost_model = "random"
    per_task = per_task or max(1, -(-trials // len(tasks)))
    # evolutionary search pays off with a cost model and many trials; small budgets sample the space
    strategy = "evolutionary" if cost_model == "xgb" and per_task >= 64 else "replay-trace"
    contexts = []
    # MetaSchedule re-lists its logger's handlers by name in a dictConfig (which replaces them anyway); an
    # unnamed one (e.g. a test runner's log capture) makes that fail on a second tuning in the process
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.handlers = [h for h in ms_logger.handlers if h.get_name()]
    loggers = get_loggers_from_work_dir(str(work), [t.task_name for t in tasks])
    for i, (task, logger) in enumerate(zip(tasks, loggers)):
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                                       search_strategy=strategy, task_name=task.task_name, logger=logger,
                                       rand_state=i + 1, num_threads=1).clone())
    builder, runner = _in_process_builder_and_runner(ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False))
    ms.tune.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=str(work),
                       max_trials_global=trials, max_trials_per_task=per_task,
                       num_trials_per_iter=min(16, per_task), builder=builder, runner=runner,
                       database=database, cost_model=cost_model)


def _in_process_builder_and_runner(config: Any) -> tuple[Any, Any]:
    """Build and measure candidates in this process. MetaSchedule's LocalBuilder starts a fresh
    worker per batch, and each worker spends 25-50 s on this machine importing
    tvm.s_tir.tensor_intrin before building anything; here that import is already paid."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture, _worker_func

    @derived_object
    class InProcessBuilder(PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for inp in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(inp.mod, inp.target, None)), None))
                except Exception as exc:  # a candidate that fails to build is a tuning result, not a crash
                    results.append(BuilderResult(None, f"in-process build failed: {_first_line(exc)}"))
            return results

    @derived_object
    class InProcessRunner(PyRunner):
        def run(self, runner_inputs: list[Any]) -> list[Any]:
            futures = []
            for inp in runner_inputs:
                try:
                    costs = _worker_func(None, None, None, config, 1, str(inp.artifact_path), str(inp.device_type),
                                         tuple(arg.as_json() for arg in inp.args_info))
                    futures.append(LocalRunnerFuture(res=costs))
                except Exception as exc:
                    futures.append(LocalRunnerFuture(error_message=f"in-process run failed: {_first_line(exc)}"))
            return futures

    return InProcessBuilder(), InProcessRunner()


def _reads_indices(mod: Any) -> bool:
    """Whether a task's PrimFunc takes an int32/int64 tensor (gather indices: `take`, `index_tensor`, ...).
    MetaSchedule measures candidates on random inputs, and random indices are out of bounds."""
    return any(str(getattr(param, "dtype", "")) in ("int32", "int64")
               for func in mod.functions.values() for param in getattr(func, "params", ()))


def schedule(mod: Any, target: Any, opts: dict[str, Any], records: Any) -> tuple[Any, dict[str, Any]]:
    """Tune (or replay stored records for) the module's TIR tasks; returns the scheduled module.

    Without trials and without stored records the module is returned as it is (TVM's default
    pipeline then schedules nothing on CPU; CUDA gets dlight's default GPU schedules in tvm.compile).
    """
    tvm = import_tvm()
    from tvm import relax
    from tvm.relax import transform
    from tvm.s_tir import meta_schedule as ms

    info: dict[str, Any] = {"trials_run": 0, "records_replayed": 0, "tasks": 0, "tuning_seconds": 0.0}
    if opts["trials"] == 0 and records is None and not os.environ.get("MORPHC_RECORDS"):
        return mod, info  # nothing to tune and nowhere to look for stored records
    with target:
        mod = tvm.transform.Sequential([transform.DecomposeOpsForInference(), transform.CanonicalizeBindings(),
                                        relax.pipeline.zero_pipeline()])(mod)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target, {})
             if not t.mod.attrs.get("tirx.is_scheduled", False)]
    gathers = [t for t in tasks if _reads_indices(t.dispatched[0])]
    tasks = [t for t in tasks if t not in gathers]
    info["tasks"] = len(tasks)
    if gathers:  # measured in process on random inputs, out-of-bounds indices would crash the process
        info["untuned_gathers"] = sorted(t.task_name for t in gathers)
    if not tasks:
        return mod, info
    db = _records_db(records)
    from morphc.predictors.records import device_fingerprint

    key, device = workload_key(tasks, target), device_fingerprint("cuda" if target.kind.name == "cuda" else "cpu")
    config = {"target": _target_json(target)}
    info["workload"] = key
    stored = db.get(TUNING_KIND, key, device, config)
    have = int(stored.stats.get("trials", 0)) if stored else 0
    with _workdir() as work:
        database = _json_db(ms, work, stored.stats if stored else None)
        if opts["trials"] > have:  # tune the difference; earlier records seed the search
            start = time.perf_counter()
            _tune(ms, tasks, target, work, opts["trials"] - have, opts["trials_per_task"], database)
            info["tuning_seconds"] = time.perf_counter() - start
            info["trials_run"] = opts["trials"] - have
            (work / "pruned").mkdir()
            pruned = ms.database.JSONDatabase(work_dir=str(work / "pruned"))
            database.dump_pruned(pruned)  # keep the best record per workload
            db.put(TUNING_KIND, key, device, config, {
                "trials": opts["trials"], "tasks": len(tasks),  # the budget these records answer
                "workloads": (work / "pruned" / "database_workload.json").read_text(),
                "tuning_records": (work / "pruned" / "database_tuning_record.json").read_text(),
                "tuning_seconds": info["tuning_seconds"] + (stored.stats.get("tuning_seconds", 0.0) if stored else 0.0),
            })
            database = _json_db(ms, work / "pruned", None)
        elif stored is None:
            return mod, info
        info["records_replayed"] = len(database)
        info["records_trials"] = max(have, opts["trials"])
        with target, database:
            mod = transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    return mod, info


# --- the executable -------------------------------------------------------------------------


def _set_threads(threads: int) -> None:
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(0, threads)


@register_target
class TvmExecutable(Executable):
    """Runs the Program as a TVM Relax VM executable (llvm on CPU, or cuda)."""

    target = "tvm"
    uses_records = True

    def __init__(self, program: Program, report: CompileReport, module: Any, options: dict[str, Any],
                 tuning: dict[str, Any] | None = None) -> None:
        super().__init__(program, report)
        tvm = import_tvm()
        from tvm import relax

        self.module = module  # the built executable (tvm.compile result or a loaded library)
        self.options = options
        self.tuning = dict(tuning or {})
        self.is_cuda = _kind(options) == "cuda"
        self.device = tvm.cuda(0) if self.is_cuda else tvm.cpu(0)
        self._vm: Any = None
        if not self.is_cuda:
            _set_threads(options["threads"])
            self._vm = relax.VirtualMachine(module, self.device)

    @classmethod
    def compile(cls, program: Program, options: dict[str, Any]) -> TvmExecutable:
        opts = check_options(options)
        tvm = import_tvm()
        target = make_target(opts)
        mod = to_relax(program)
        mod, tuning = schedule(mod, target, opts, options.get("records"))
        try:
            built = tvm.compile(mod, target=target)
        except Exception as exc:
            raise CompileError(f"tvm.compile for {target.kind.name} failed: {_first_line(exc)}") from exc
        notes = [f"tvm target {_target_json(target)}"]
        if tuning.get("trials_run"):
            notes.append(f"tuned {tuning['tasks']} tasks with {tuning['trials_run']} MetaSchedule trials in "
                         f"{tuning['tuning_seconds']:.1f} s (records stored)")
        elif tuning.get("records_replayed"):
            notes.append(f"replayed {tuning['records_replayed']} stored tuning records (a "
                         f"{tuning.get('records_trials', '?')}-trial search); no tuning")
        elif _kind(opts) == "llvm":
            notes.append("untuned: TVM's default CPU pipeline schedules no loops (slow); set trials to tune")
        if tuning.get("untuned_gathers"):
            notes.append(f"not tuned (integer index inputs, unsafe to measure on random data): "
                         f"{', '.join(tuning['untuned_gathers'])}")
        report = CompileReport(target=cls.target, notes=notes)
        return cls(program, report, built, opts, tuning)

    @classmethod
    def unsupported_nodes(cls, program: Program, options: dict[str, Any]) -> dict[str, str]:
        return unsupported(program)

    def cuda_source(self) -> str:
        """The generated CUDA C of a cuda build (empty for llvm)."""
        if not self.is_cuda:
            return ""
        lib = self.module.mod if hasattr(self.module, "mod") else self.module
        sources, stack = [], [lib]
        while stack:
            mod = stack.pop()
            if mod.kind == "cuda":
                sources.append(mod.inspect_source())
            stack.extend(mod.imports)
        return "\n".join(sources)

    def run(self, *args: torch.Tensor) -> dict[str, torch.Tensor]:
        import tvm

        if self._vm is None:
            if not torch.cuda.is_available() and not self.device.exist:
                raise CompileError("this TVM executable was built for cuda and needs a GPU to run; none is present")
            from tvm import relax

            self._vm = relax.VirtualMachine(self.module, self.device)
        inputs = [tvm.runtime.tensor(a.detach().cpu().contiguous().numpy(), self.device) for a in args]
        result = self._vm["main"](*inputs)
        flat = list(result) if not hasattr(result, "numpy") else [result]
        return {o.name: torch.from_numpy(t.numpy()) for o, t in zip(self.program.outputs, flat)}

    def save_artifacts(self, directory: Path) -> None:
        if self.is_cuda:
            (directory / CUDA_SOURCE_FILE).write_text(self.cuda_source())
        self.module.export_library(str(directory / LIB_FILE))
        (directory / OPTIONS_FILE).write_text(json.dumps({**self.options, "tuning": self.tuning}, indent=2,
                                                         default=str))

    @classmethod
    def load_from(cls, directory: Path, program: Program, report: CompileReport) -> TvmExecutable:
        tvm = import_tvm()
        options = json.loads((directory / OPTIONS_FILE).read_text())
        tuning = options.pop("tuning", {})
        module = tvm.runtime.load_module(str(directory / LIB_FILE))
        return cls(program, report, module, options, tuning)


def _kind(opts: dict[str, Any]) -> str:
    target = opts["target"]
    return str(target["kind"] if isinstance(target, dict) else target)
