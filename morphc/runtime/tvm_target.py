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
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from morphc.errors import did_you_mean
from morphc.ir.program import Program
from morphc.runtime.executable import CompileError, CompileReport, Executable, register_target

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


def supported_aten_ops() -> set[str]:
    """ATen overloads ('conv2d.default', ...) the Relax exported-program importer converts."""
    import_tvm()
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return set(ExportedProgramImporter().create_convert_map())


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
    for key in ("threads", "trials", "trials_per_task"):
        value = opts[key]
        if value is not None and value < (1 if key != "trials" else 0):
            raise CompileError(f"option '{key}' of target 'tvm' must be >= {1 if key != 'trials' else 0}, got {value}")
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

    gm = program.graph_module
    gm.eval()
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
    tvm = import_tvm()
    hashes = sorted(str(tvm.ir.structural_hash(t.dispatched[0])) for t in tasks)
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


def _tune(ms: Any, tasks: list[Any], target: Any, work: Path, trials: int, per_task: int | None,
          database: Any) -> None:
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    try:
        import xgboost  # noqa: F401
        cost_model = "xgb"
    except ImportError:  # the xgboost cost model is an extra of apache-tvm; random search still tunes
        cost_model = "random"
    per_task = per_task or max(1, -(-trials // len(tasks)))
    contexts = []
    loggers = get_loggers_from_work_dir(str(work), [t.task_name for t in tasks])
    for i, (task, logger) in enumerate(zip(tasks, loggers)):
        contexts.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
                                       search_strategy="evolutionary", task_name=task.task_name, logger=logger,
                                       rand_state=i + 1, num_threads=1).clone())
    runner = ms.runner.LocalRunner(evaluator_config=ms.runner.EvaluatorConfig(
        number=3, repeat=1, min_repeat_ms=20, enable_cpu_cache_flush=False))
    ms.tune.tune_tasks(tasks=contexts, task_weights=[float(t.weight) for t in tasks], work_dir=str(work),
                       max_trials_global=trials, max_trials_per_task=per_task,
                       num_trials_per_iter=min(16, per_task), builder=ms.builder.LocalBuilder(max_workers=1),
                       runner=runner, database=database, cost_model=cost_model)


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
    info["tasks"] = len(tasks)
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
            pruned = ms.database.JSONDatabase(work_dir=str(work / "pruned"))
            database.dump_pruned(pruned)  # keep the best record per workload
            db.put(TUNING_KIND, key, device, config, {
                "trials": opts["trials"], "tasks": len(tasks),
                "workloads": (work / "pruned" / "database_workload.json").read_text(),
                "tuning_records": (work / "pruned" / "database_tuning_record.json").read_text(),
                "tuning_seconds": info["tuning_seconds"] + float(stored.stats.get("tuning_seconds", 0) if stored else 0),
            })
            database = _json_db(ms, work / "pruned", None)
        elif stored is None:
            return mod, info
        info["records_replayed"] = len(database)
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
            notes.append(f"replayed {tuning['records_replayed']} stored tuning records; no tuning")
        elif _kind(opts) == "llvm":
            notes.append("untuned: TVM's default CPU pipeline schedules no loops (slow); set trials to tune")
        report = CompileReport(target=cls.target, notes=notes)
        return cls(program, report, built, opts, tuning)

    def cuda_source(self) -> str:
        """The generated CUDA C of a cuda build (empty for llvm)."""
        if not self.is_cuda:
            return ""
        lib = self.module.mod if hasattr(self.module, "mod") else self.module
        sources = [m.inspect_source() for m in lib.imports if m.kind == "cuda"]
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
