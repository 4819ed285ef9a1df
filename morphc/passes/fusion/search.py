"""The fusion search: simulated annealing over mutation sequences (GMorph's), with predictive filtering.

A state is a mutation history (merges applied to the original Program). Each round the strategy
proposes neighbours (add a merge, swap one, remove one); before anything is trained a proposal goes
through three filters, cheapest first:

1. cache: a structure already evaluated (in this run, or in the search state of a killed run) is reused;
2. rule-based pruning: a proposal whose merges include all merges of a candidate that already missed
   the accuracy bound is dominated by it (more sharing only loses accuracy) and is dropped;
3. latency: its latency (the cost model through `PassContext.cost_model`, else a latency function, by
   default measured) must beat the best candidate so far by `min_gain`, or it is not trained.

Survivors are distilled on the executor (`distill.evaluate_candidate`, with learning-curve early
stopping) and recorded in the search state as each finishes. Annealing accepts a faster candidate
within the bound, and a slower (already known) one with probability exp(-relative slowdown / T).
Strategies: `anneal`, `greedy` (always the merge that removes the most FLOPs, accept only gains),
`random` (random merge sets from the originals).
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from morphc.errors import MorphcError
from morphc.ir.metadata import node_meta
from morphc.ir.program import Program
from morphc.passes.fusion.data import FusionData
from morphc.passes.fusion.distill import (
    CandidateJob,
    CandidateResult,
    DistillConfig,
    baseline_scores,
    evaluate_candidate,
    program_bytes,
)
from morphc.passes.fusion.state import SearchState
from morphc.passes.graph_utils import task_reach
from morphc.passes.mutators import (
    MergeMutator,
    MutationError,
    MutationRecord,
    NoCandidates,
    Sampler,
    merges,
    program_digest,
    replay,
    structure_digest,
)

LatencyFn = Callable[[Program], float]  # seconds for one call on the program's example inputs
STRATEGIES = ("anneal", "greedy", "random")


class FusionSearchError(MorphcError, ValueError):
    """Bad search options (unknown strategy, budgets that allow nothing)."""


# --- latency -------------------------------------------------------------------------------------


def flops_latency(program: Program) -> float:
    """A deterministic latency estimate (seconds) from FLOPs, bytes moved and operator count.

    Used by tests and as a fallback: it orders candidates like a roofline model would, without timing.
    """
    flops = bytes_moved = calls = 0
    for n in program.graph.nodes:
        if n.op == "call_function":
            meta = node_meta(n)
            flops += meta.flops
            bytes_moved += meta.bytes_moved
            calls += 1
    return flops / 20e9 + bytes_moved / 10e9 + calls * 4e-6


def measured_latency(*, repeats: int = 15, warmup: int = 3, threads: int = 1) -> LatencyFn:
    """Median wall time of eager calls on the example inputs (for callers without a profiler or cost model)."""

    def latency(program: Program) -> float:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                args = program.example_inputs
                for _ in range(warmup):
                    program.graph_module(*args)
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    program.graph_module(*args)
                    samples.append(time.perf_counter() - start)
            return statistics.median(samples)
        finally:
            torch.set_num_threads(previous)

    return latency


def cost_model_latency(cost_model: Any, config: Any = None) -> LatencyFn:
    """Latency from a cost model (`predict(program, config) -> seconds`)."""
    return lambda program: float(cost_model.predict(program, config))


def cost_model_latency_name(cost_model: Any, config: Any = None) -> str:
    """What decides a cost model's latencies: the checkpoint (its digest), its calibration and the config. It is
    part of the search-state key, so a resumed search never mixes two models' numbers."""
    parts = ["cost-model", str(getattr(cost_model, "digest", type(cost_model).__name__))]
    if factors := getattr(cost_model, "log_factors", None):
        parts.append("calibrated " + hashlib.blake2b(repr(sorted(factors.items())).encode(), digest_size=4).hexdigest())
    parts.append(f"at {config}" if config is not None else "at the default config")
    return " ".join(parts)


# --- candidates and outcome ----------------------------------------------------------------------


@dataclass
class Evaluated:
    """One distinct candidate structure and what is known about it."""

    key: str
    history: tuple[str, ...]
    merges: frozenset[tuple[str, str]]
    latency: float
    status: str  # "original", "trained", "filtered-latency", "filtered-dominated"
    scores: dict[str, float] = field(default_factory=dict)
    drop: float | None = None
    steps: int = 0
    stopped: str = ""
    seconds: float = 0.0
    resumed: bool = False
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def feasible(self, bound: float) -> bool:
        return self.drop is not None and self.drop <= bound + 1e-12

    def summary(self) -> dict[str, Any]:
        return {"key": self.key, "merges": sorted(self.merges), "latency_ms": self.latency * 1e3,
                "status": self.status, "drop": self.drop, "scores": self.scores, "steps": self.steps,
                "stopped": self.stopped, "seconds": self.seconds, "resumed": self.resumed}


@dataclass
class SearchOutcome:
    original: Evaluated
    best: Evaluated
    candidates: list[Evaluated]  # every distinct structure seen, in order of first sight
    trained: int  # trained in this run
    resumed: int  # taken from the search state (trained by an earlier, interrupted run)
    filtered_latency: int
    filtered_dominated: int
    stopped_early: int
    proposals: int
    seconds: float
    max_acc_drop: float
    latency_source: str = ""  # where candidates' latencies came from: "measured", "flops", "cost-model", ...

    @property
    def met_bound(self) -> bool:
        return self.best is not self.original

    def pareto(self) -> list[Evaluated]:
        """Trained candidates (and the originals) not beaten on both latency and accuracy drop."""
        pts = [c for c in [self.original, *self.candidates] if c.drop is not None]
        front = [c for c in pts if not any((o.latency <= c.latency and (o.drop or 0) <= (c.drop or 0))
                                           and (o.latency < c.latency or (o.drop or 0) < (c.drop or 0)) for o in pts)]
        return sorted(front, key=lambda c: c.latency)


@dataclass(frozen=True)
class SearchConfig:
    strategy: str = "anneal"
    max_acc_drop: float = 0.01
    max_candidates: int = 30  # candidates trained, counting those resumed from the state
    time_budget_s: float = 1800.0
    seed: int = 0
    workers: int = 1
    min_gain: float = 0.03  # a candidate is trained only if predicted at least this much faster than the best
    temperature: float = 0.05  # initial annealing temperature (relative latency change)
    cooling: float = 0.95
    max_proposals: int = 400
    adapters: bool = True
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise FusionSearchError(f"unknown strategy '{self.strategy}'; valid: {', '.join(STRATEGIES)}")
        if self.max_acc_drop < 0:
            raise FusionSearchError(f"max-acc-drop must be >= 0, got {self.max_acc_drop}")
        if self.workers < 1:
            raise FusionSearchError(f"workers must be >= 1, got {self.workers}")


# --- strategies ----------------------------------------------------------------------------------


class Strategy(Sampler):
    """A search strategy: samples mutation choices (a Sampler), proposes neighbours, accepts moves."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choice(self, candidates: Sequence[Any], mutator: Any, program: Program, index: int) -> Any:
        """Merges between layers at a similar relative depth of their tasks are proposed more often
        (as GMorph pairs layers by position); other decisions are uniform."""
        if not (candidates and isinstance(candidates[0], tuple) and len(candidates[0]) == 2):
            return candidates[self.rng.randrange(len(candidates))]
        depth = relative_depths(program, {n for c in candidates for n in c})
        weights = [math.exp(-abs(depth[t] - depth[s]) / 0.15) for t, s in candidates]
        return self.rng.choices(list(candidates), weights=weights)[0]

    def moves(self) -> tuple[tuple[str, float], ...]:
        return (("add", 0.6), ("swap", 0.3), ("remove", 0.1))

    def accept(self, current: Evaluated, proposal: Evaluated, temperature: float) -> bool:
        delta = (proposal.latency - current.latency) / max(current.latency, 1e-12)
        return delta < 0 or self.rng.random() < math.exp(-delta / max(temperature, 1e-9))


class Anneal(Strategy):
    pass


class Greedy(Strategy):
    """Picks a merge that removes the most FLOPs (sources weighted by depth similarity); accepts only gains."""

    def choice(self, candidates: Sequence[Any], mutator: Any, program: Program, index: int) -> Any:
        reach = task_reach(program)
        saved = {c: _exclusive_upstream_flops(program, c[0], reach) for c in candidates}
        top = max(saved.values())
        return super().choice([c for c in candidates if saved[c] == top], mutator, program, index)

    def moves(self) -> tuple[tuple[str, float], ...]:
        return (("add", 1.0),)

    def accept(self, current: Evaluated, proposal: Evaluated, temperature: float) -> bool:
        return proposal.latency < current.latency


class RandomStrategy(Strategy):
    """Random merge sets drawn from the originals; keeps no current state."""

    def moves(self) -> tuple[tuple[str, float], ...]:
        return (("fresh", 1.0),)

    def accept(self, current: Evaluated, proposal: Evaluated, temperature: float) -> bool:
        return False


def relative_depths(program: Program, names: set[str]) -> dict[str, float]:
    """For each named node: the share of its tasks' FLOPs computed upstream of it (0 = input, 1 = output)."""
    reach = task_reach(program)
    upstream: dict[Any, int] = {}
    for n in program.graph.nodes:
        upstream[n] = node_meta(n).flops + sum(upstream[i] for i in set(n.all_input_nodes))
    task_flops = {t: 1 for t in program.tasks}
    for spec, leaf in zip(program.outputs, program.output_node.args[0]):
        task_flops[spec.task] = max(task_flops[spec.task], upstream.get(leaf, 1))
    out = {}
    for name in names:
        node = program.node(name)
        total = max(task_flops[t] for t in reach[node]) if reach[node] else 1
        out[name] = min(1.0, upstream[node] / total)
    return out


def _exclusive_upstream_flops(program: Program, target: str, reach: dict[Any, frozenset[str]]) -> int:
    node = program.node(target)
    owner = reach[node]
    seen, stack, total = set(), [node], 0
    while stack:
        n = stack.pop()
        for i in n.all_input_nodes:
            if i not in seen and reach[i] == owner:
                seen.add(i)
                total += node_meta(i).flops
                stack.append(i)
    return total


def make_strategy(name: str, seed: int) -> Strategy:
    rng = random.Random(seed)
    return {"anneal": Anneal, "greedy": Greedy, "random": RandomStrategy}[name](rng)


# --- the search ----------------------------------------------------------------------------------


def search_key(original: Program, data: FusionData, config: SearchConfig, latency_name: str = "") -> str:
    """What a finished candidate's result depends on: program, data, bound, training options (and where
    latencies come from, since they are stored too)."""
    h = hashlib.blake2b((program_digest(original) + latency_name).encode(), digest_size=12)
    for batch in data.batches("calibration") + data.batches("eval"):
        for t in batch:
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for name, ev in sorted(data.tasks.items()):
        h.update(name.encode())
        h.update(getattr(ev.metric, "__qualname__", str(ev.metric)).encode())
        if ev.labels is not None:
            h.update(ev.labels.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr((config.max_acc_drop, config.distill, config.adapters)).encode())
    return h.hexdigest()


class FusionSearch:
    """One search; `run()` returns a SearchOutcome. See the module docstring."""

    def __init__(self, original: Program, data: FusionData, config: SearchConfig, *, latency_fn: LatencyFn,
                 state: SearchState, executor_factory: Callable[..., Any], executor: str = "local",
                 train_program: Program | None = None,
                 on_candidate: Callable[[Evaluated], None] | None = None, progress: bool = True,
                 latency_name: str = "") -> None:
        self.original = original
        self.train_program = train_program if train_program is not None else original
        self.data = data
        self.config = config
        self.latency_fn = latency_fn
        self.state = state
        self.executor_factory = executor_factory
        self.executor_name = executor
        self.on_candidate = on_candidate
        self.progress = progress
        self.key = search_key(self.train_program, data, config, latency_name)
        self.latency_name = latency_name
        self.strategy = make_strategy(config.strategy, config.seed)
        self.seen: dict[str, Evaluated] = {}
        self.failed: list[frozenset[tuple[str, str]]] = []
        self.counts = {"trained": 0, "resumed": 0, "filtered-latency": 0, "filtered-dominated": 0,
                       "stopped": 0, "proposals": 0}
        self._programs: dict[tuple[str, ...], Program] = {}

    # -- helpers --

    def _program(self, history: tuple[str, ...]) -> Program:
        if history not in self._programs:
            if len(self._programs) > 64:
                self._programs.clear()
            self._programs[history] = replay(self.original, [MutationRecord.from_json(t) for t in history])
        return self._programs[history]

    def _latency(self, key: str, program: Program) -> float:
        cached = self.state.get_latency(self.key, key)
        if cached is not None:
            return cached
        value = float(self.latency_fn(program))
        self.state.put_latency(self.key, key, value)
        return value

    def _propose(self, current: Evaluated) -> tuple[str, ...] | None:
        """A neighbour history of `current`, or None when the move does not apply."""
        moves = self.strategy.moves()
        move = self.strategy.rng.choices([m for m, _ in moves], weights=[w for _, w in moves])[0]
        base = list(current.history)
        if move == "fresh":
            base = []
            n = self.strategy.rng.randint(1, max(1, 2 * (len(self.original.tasks) - 1)))
            return self._add(tuple(base), n)
        if move in ("remove", "swap"):
            merge_idx = [i for i, t in enumerate(base) if MutationRecord.from_json(t).mutator == "merge"]
            if not merge_idx:
                return None
            del base[self.strategy.rng.choice(merge_idx)]
            if move == "remove":  # later merges may build on the removed one: then the move does not apply
                try:
                    self._program(tuple(base))
                except MutationError:
                    return None
                return tuple(base)
        return self._add(tuple(base), 1)

    def _add(self, history: tuple[str, ...], n: int) -> tuple[str, ...] | None:
        try:
            program = self._program(history).clone()
            for _ in range(n):
                record = MergeMutator(adapters=self.config.adapters).apply(program, self.strategy)
                history = (*history, record.to_json())
        except NoCandidates:
            return history if n > 1 and history else None
        except MutationError:
            return None
        return history

    def _evaluated_from_state(self, key: str, history: tuple[str, ...], latency: float) -> Evaluated | None:
        stored = self.state.get(self.key, key)
        if stored is None:
            return None
        s = stored.stats
        return Evaluated(key, tuple(stored.history), merges([MutationRecord.from_json(t) for t in stored.history]),
                         stored.latency if stored.latency is not None else latency, stored.status,
                         dict(s.get("scores", {})), s.get("drop"), int(s.get("steps", 0)), str(s.get("stopped", "")),
                         float(s.get("seconds", 0.0)), True, stored.weights)

    def _job(self, history: tuple[str, ...]) -> CandidateJob:
        return CandidateJob(self._blob, history, self.data, self._baseline, self._baseline_val,
                            self.config.max_acc_drop, self.config.distill)

    # -- main loop --

    def run(self) -> SearchOutcome:
        start = time.perf_counter()
        cfg = self.config
        self._blob = program_bytes(self.train_program)
        self._baseline, self._baseline_val = baseline_scores(self.train_program, self.data, cfg.distill.val_examples)
        key0 = structure_digest(self.original)
        original = Evaluated(key0, (), frozenset(), self._latency(key0, self.original), "original",
                             dict(self._baseline), 0.0)
        self.seen[key0] = original
        current = best = original
        temperature = cfg.temperature
        idle_rounds = 0
        columns = (TextColumn("fusion search [{task.fields[status]}]"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=Console(stderr=True), disable=not self.progress, transient=True) as bar, \
                self.executor_factory(self.executor_name, max_workers=cfg.workers) as pool:
            task = bar.add_task("search", total=cfg.max_candidates, status="starting")
            while True:
                budget_left = cfg.max_candidates - self.counts["trained"] - self.counts["resumed"]
                if (budget_left <= 0 or time.perf_counter() - start > cfg.time_budget_s
                        or self.counts["proposals"] >= cfg.max_proposals or idle_rounds >= 60):
                    break
                batch: list[Evaluated] = []
                jobs: list[Evaluated] = []
                for _ in range(min(cfg.workers, budget_left)):
                    self.counts["proposals"] += 1
                    history = self._propose(current)
                    if history is None:
                        continue
                    program = self._program(history)
                    key = structure_digest(program)
                    if key in self.seen:
                        batch.append(self.seen[key])
                        continue
                    latency = self._latency(key, program)
                    ev = self._evaluated_from_state(key, history, latency)
                    if ev is not None:
                        self.counts["resumed"] += 1
                        bar.advance(task)
                    else:
                        ms = merges([MutationRecord.from_json(t) for t in history])
                        ev = Evaluated(key, history, ms, latency, "pending")
                        if any(f <= ms for f in self.failed):
                            ev.status = "filtered-dominated"
                            self.counts["filtered-dominated"] += 1
                        elif latency > best.latency * (1 - cfg.min_gain):
                            ev.status = "filtered-latency"
                            self.counts["filtered-latency"] += 1
                        else:
                            jobs.append(ev)
                    self.seen[key] = ev
                    batch.append(ev)
                if jobs:
                    idle_rounds = 0
                    bar.update(task, status=f"training {len(jobs)}, best {best.latency * 1e3:.2f} ms")
                    for i, result in pool.map_unordered(evaluate_candidate, [self._job(e.history) for e in jobs]):
                        self._finish(jobs[i], result)
                        bar.advance(task)
                else:
                    idle_rounds += 1
                for ev in batch:
                    if ev.drop is not None and not ev.feasible(cfg.max_acc_drop) and ev.merges not in self.failed:
                        self.failed.append(ev.merges)
                    if not ev.feasible(cfg.max_acc_drop):
                        continue
                    if ev.latency < best.latency:
                        best = ev
                    if ev is not current and self.strategy.accept(current, ev, temperature):
                        current = ev
                temperature *= cfg.cooling
                for ev in self.seen.values():  # keep weights only where they can still be the answer
                    if ev is not best and ev.weights:
                        ev.weights = {}
        candidates = [e for e in self.seen.values() if e is not original]
        return SearchOutcome(original, best, candidates, self.counts["trained"], self.counts["resumed"],
                             self.counts["filtered-latency"], self.counts["filtered-dominated"], self.counts["stopped"],
                             self.counts["proposals"], time.perf_counter() - start, cfg.max_acc_drop,
                             self.latency_name)

    def _finish(self, ev: Evaluated, result: CandidateResult) -> None:
        ev.status = "trained"
        ev.scores, ev.drop, ev.steps, ev.stopped, ev.seconds = (result.scores, result.drop, result.steps,
                                                                result.stopped, result.seconds)
        feasible = ev.feasible(self.config.max_acc_drop)
        ev.weights = result.weights if feasible else {}
        self.counts["trained"] += 1
        self.counts["stopped"] += bool(result.stopped == "hopeless")
        stats = {"scores": ev.scores, "drop": ev.drop, "steps": ev.steps, "stopped": ev.stopped,
                 "seconds": ev.seconds, "curve": result.curve}
        self.state.put(self.key, ev.key, ev.history, ev.status, ev.latency, stats, ev.weights or None)
        if self.on_candidate is not None:
            self.on_candidate(ev)


def build_result(original: Program, best: Evaluated) -> Program:
    """The best candidate on `original` (any batch size): replayed history plus its trained weights."""
    program = replay(original, [MutationRecord.from_json(t) for t in best.history])
    for name, tensor in best.weights.items():
        if not hasattr(program.graph_module, name):
            raise FusionSearchError(f"trained tensor '{name}' is not a parameter of the replayed candidate")
        program.graph_module.register_buffer(name, tensor.clone())
    return program
