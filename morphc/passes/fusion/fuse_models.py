"""The `fuse-models` pass: N task models sharing an input become one multi-task model that shares
layers, found by a search under an accuracy-drop bound (see `search.py`), accuracy recovered by
distillation (`distill.py`). Not semantics-preserving by design: outputs change within the bound.

    ctx = PassContext(calibration=FusionData(calibration=[...], eval_inputs=[...], tasks={...}))
    fused = PassManager("fuse-models{max-acc-drop=0.01,max-candidates=40}").run(program, ctx)

Services come through the context, never by import (passes -> ir only):
- latency: `ctx.options["latency_fn"]` (Program -> seconds) if set; else `latency=flops` (a
  deterministic estimate), or with `latency=auto` the cost model `ctx.cost_model.predict(program,
  ctx.options.get("latency_config"))`, else a measured median of eager calls;
- executor: `ctx.options["executor_factory"]` (name, max_workers=, address=) -> Executor if set; else
  `morphc.runtime.executors.get_executor`, imported inside the call. The executor is a runtime
  service the pass only *uses*; importing it lazily keeps the package graph one-way while the
  default still works without wiring (a factory in the options replaces it entirely);
- training at another batch size: `ctx.options["fusion_train_program"]`, the same models lowered
  at the batch size to distil with (mutations replay by node name at any batch size); without it
  candidates train at the program's own batch size;
- state: `state=<sqlite path>`, else beside `ctx.records`, else in memory;
- out: the report in `ctx.options["fusion_report"]` (and `report-dir=` writes it with a plot).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from morphc.errors import PassOptionError
from morphc.ir.program import Program
from morphc.passes.base import Pass, PassResult, option, register_pass
from morphc.passes.fusion import report as report_mod
from morphc.passes.fusion.data import FusionData, FusionDataError
from morphc.passes.fusion.distill import DistillConfig
from morphc.passes.fusion.search import (
    STRATEGIES,
    FusionSearch,
    LatencyFn,
    SearchConfig,
    build_result,
    cost_model_latency,
    cost_model_latency_name,
    flops_latency,
    measured_latency,
)
from morphc.passes.fusion.state import SearchState
from morphc.passes.manager import PassContext


def default_executor_factory(name: str, *, max_workers: int | None = None, address: str | None = None) -> Any:
    """`morphc.runtime.executors.get_executor`, imported here so `passes` does not depend on `runtime`."""
    from morphc.runtime.executors import get_executor

    return get_executor(name, max_workers=max_workers, address=address)


@register_pass
@dataclass(frozen=True)
class FuseModels(Pass):
    """Fuse task models into one multi-task model by merging layers, within an accuracy-drop bound."""

    name: ClassVar[str] = "fuse-models"
    preserves_semantics: ClassVar[bool] = False
    opt_level: ClassVar[int] = 1
    context_needs: ClassVar[tuple[str, ...]] = ("calibration",)

    max_acc_drop: float = option(0.01, "largest accepted accuracy drop of the worst task (0.01 = 1 point)")
    strategy: Literal["anneal", "greedy", "random"] = option("anneal", "search strategy")
    max_candidates: int = option(30, "candidates trained at most (counting those resumed from state)")
    time_budget_s: float = option(1800.0, "search time budget in seconds")
    seed: int = option(0, "seed of the search and of training")
    executor: str = option("", "local|ray (empty: PassContext.executor)")
    workers: int = option(1, "candidates trained in parallel")
    address: str = option("", "Ray cluster address (executor=ray)")
    state: str = option("", "SQLite file keeping the search state (resume after a kill)")
    steps: int = option(300, "distillation steps per candidate")
    lr: float = option(3e-3, "distillation learning rate")
    min_gain: float = option(0.03, "train a candidate only if predicted this much faster than the best")
    latency: Literal["auto", "measure", "flops"] = option("auto", "latency source: auto = cost model if set, "
                                                         "else measured")
    report_dir: str = option("", "directory to write the report (Markdown + plot) to")

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise PassOptionError(f"fuse-models: unknown strategy '{self.strategy}'; valid: {', '.join(STRATEGIES)}")
        if self.workers < 1:
            raise PassOptionError(f"fuse-models: workers must be >= 1, got {self.workers}")
        if not self.max_acc_drop >= 0:
            raise PassOptionError(f"fuse-models: max-acc-drop must be >= 0, got {self.max_acc_drop}")

    def search_config(self) -> SearchConfig:
        return SearchConfig(strategy=self.strategy, max_acc_drop=self.max_acc_drop,
                            max_candidates=self.max_candidates, time_budget_s=self.time_budget_s, seed=self.seed,
                            workers=self.workers, min_gain=self.min_gain,
                            distill=DistillConfig(steps=self.steps, lr=self.lr, seed=self.seed))

    def latency_fn(self, ctx: PassContext) -> tuple[LatencyFn, str]:
        """The latency source and its name (part of the search-state key: stored latencies depend on it)."""
        fn = ctx.options.get("latency_fn")
        if fn is not None:
            return fn, str(ctx.options.get("latency_name", "latency_fn"))
        if self.latency == "flops":
            return flops_latency, "flops"
        if self.latency == "auto" and ctx.cost_model is not None:
            config = ctx.options.get("latency_config")
            return cost_model_latency(ctx.cost_model, config), cost_model_latency_name(ctx.cost_model, config)
        return measured_latency(), "measured"

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        data = ctx.calibration
        if not isinstance(data, FusionData):
            raise FusionDataError(
                "fuse-models needs calibration and held-out data: PassContext(calibration=FusionData(calibration="
                "[input batches], eval_inputs=[input batches], tasks={task: TaskEval(labels)})) from "
                f"morphc.passes.fusion.data; got {type(data).__name__}")
        data.check([(s.shape, s.dtype) for s in program.inputs], program.tasks)
        if len(program.tasks) < 2:
            warnings.warn(f"fuse-models: the program has one task ({program.tasks[0]}); nothing to fuse",
                          stacklevel=2)
            return PassResult(program, modified=False, statistics={"candidates_trained": 0})
        train = ctx.options.get("fusion_train_program")
        if train is not None:
            check_twin(program, train)
        factory: Callable[..., Any] = ctx.options.get("executor_factory") or default_executor_factory
        executor = self.executor or ctx.executor or "local"
        if self.address:
            address = self.address
            base = factory
            factory = lambda name, max_workers=None: base(name, address=address)  # noqa: E731
        state = SearchState.from_context(self.state, ctx.records)
        try:
            latency_fn, latency_name = self.latency_fn(ctx)
            search = FusionSearch(program, data, self.search_config(), latency_fn=latency_fn, state=state,
                                  executor_factory=factory, executor=executor, train_program=train,
                                  on_candidate=ctx.options.get("fusion_on_candidate"),
                                  progress=bool(ctx.options.get("progress", True)), latency_name=latency_name)
            outcome = search.run()
        finally:
            state.close()
        report = report_mod.FusionReport(outcome, program.tasks)
        report_mod.set_last_report(report)
        ctx.options["fusion_report"] = report
        if self.report_dir:
            report.write(self.report_dir)
        stats: dict[str, float] = {
            "candidates_trained": outcome.trained, "candidates_resumed": outcome.resumed,
            "candidates_filtered": outcome.filtered_latency + outcome.filtered_dominated,
            "candidates_filtered_latency": outcome.filtered_latency,
            "candidates_filtered_dominated": outcome.filtered_dominated,
            "candidates_stopped_early": outcome.stopped_early, "proposals": outcome.proposals,
            "search_seconds": outcome.seconds, "met_bound": float(outcome.met_bound),
            "latency_before_ms": outcome.original.latency * 1e3, "latency_after_ms": outcome.best.latency * 1e3,
            "acc_drop": float(outcome.best.drop or 0.0), "merges": len(outcome.best.merges),
        }
        for task in program.tasks:
            stats[f"accuracy_before.{task}"] = outcome.original.scores.get(task, float("nan"))
            stats[f"accuracy_after.{task}"] = outcome.best.scores.get(task, float("nan"))
        if not outcome.met_bound:
            warnings.warn(f"fuse-models: no fused candidate met max-acc-drop={self.max_acc_drop} "
                          f"({outcome.trained + outcome.resumed} trained); returning the original models unchanged",
                          stacklevel=2)
            return PassResult(program, modified=False, statistics=stats)
        return PassResult(build_result(program, outcome.best), modified=True, statistics=stats)


def check_twin(program: Program, twin: Program) -> None:
    """The training program must be the same models at another batch size: same tasks and node names."""
    if twin.tasks != program.tasks or [n.name for n in twin.graph.nodes] != [n.name for n in program.graph.nodes]:
        raise FusionDataError(
            "ctx.options['fusion_train_program'] must be the same task models lowered at another batch size "
            f"(same tasks and node names); got tasks {list(twin.tasks)} vs {list(program.tasks)}")
