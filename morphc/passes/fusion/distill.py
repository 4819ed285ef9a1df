"""Accuracy recovery of a fused candidate: adapter fit, distillation, learning-curve early stop, evaluation.

A candidate is rebuilt from the original Program and its mutation history (`replay`), so this runs
the same in this process, a pool worker or a Ray task (`evaluate_candidate` is a top-level function
taking one picklable `CandidateJob`). Steps:

1. adapter warm start: every merge adapter's last linear / 1x1 conv is fitted by least squares so
   that it maps the reused features onto the replaced layer's original features (on calibration
   inputs): distillation then starts close to the originals instead of from noise;
2. distillation: the parameters exclusive to merged tasks (their layers downstream of the merge,
   and the adapters) are trained to reproduce the original models' outputs on the unlabelled
   calibration batches (KL on softmax for classification tasks, normalised MSE otherwise); shared
   layers stay frozen, so tasks that were not merged keep their exact outputs;
3. learning-curve extrapolation: every `eval_every` steps the accuracy drop on a validation slice
   of the held-out inputs is measured and a power law `drop(t) = a + b * t^-c` is fitted; when the
   extrapolated drop at the step budget still exceeds the bound (hopeless) or the curve has flattened
   (nothing left to gain), training stops; the weights that did best on the validation slice (step 0,
   after the adapter fit, included) are kept, so training never leaves a candidate worse than it began.
   New adapter tensors learn at `lr`, the merged task's own pretrained layers at `lr / 3`;
4. evaluation: per-task scores on all held-out inputs; the candidate's accuracy drop is the worst task's.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from morphc.ir import serialization
from morphc.ir.metadata import op_name
from morphc.ir.program import Program
from morphc.ir.provenance import FusionAdapter
from morphc.passes.fusion.data import FusionData, accuracy
from morphc.passes.graph_utils import task_reach
from morphc.passes.mutators import MutationRecord, merges, replay, stable_seed

_BN_OPS = ("_native_batch_norm_legit_no_training", "batch_norm", "native_batch_norm", "_native_batch_norm_legit")


@dataclass(frozen=True)
class DistillConfig:
    """How hard each candidate is trained (small by default: candidates must be cheap on a CPU)."""

    steps: int = 300
    lr: float = 3e-3
    eval_every: int = 50
    temperature: float = 2.0
    val_examples: int = 512  # held-out examples the learning curve is measured on
    fit_examples: int = 256  # calibration examples for the adapters' least-squares warm start
    early_stop: bool = True
    seed: int = 0


@dataclass
class CandidateJob:
    """Everything a worker needs to rebuild, train and score one candidate."""

    program: bytes  # the original Program (saved), at the batch size training runs at
    records: tuple[str, ...]  # the candidate's mutation history (MutationRecord JSON)
    data: FusionData
    baseline: dict[str, float]  # the original models' per-task scores on the held-out data
    baseline_val: dict[str, float]  # ... and on the validation slice
    max_acc_drop: float
    config: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class CandidateResult:
    scores: dict[str, float]
    drop: float
    steps: int
    stopped: str  # "", "hopeless" (predicted to miss the bound) or "converged"
    curve: list[tuple[int, float]]
    weights: dict[str, torch.Tensor]
    seconds: float


# --- running programs on data of any batch size --------------------------------------------------


def batch_size(program: Program) -> int:
    return int(program.inputs[0].shape[0])


def chunks(program: Program, batches: Sequence[tuple[torch.Tensor, ...]], *, limit: int | None = None,
           pad: bool = True) -> list[tuple[tuple[torch.Tensor, ...], int]]:
    """Re-batch inputs to the program's static batch size: (inputs, rows that are real) per chunk.

    The last chunk is padded by repeating rows (outputs of padding are dropped) unless `pad=False`.
    """
    n_inputs = len(program.inputs)
    cat = [torch.cat([b[i] for b in batches]) for i in range(n_inputs)]
    total = int(cat[0].shape[0]) if limit is None else min(limit, int(cat[0].shape[0]))
    bs = batch_size(program)
    out = []
    for start in range(0, total, bs):
        real = min(bs, total - start)
        if real < bs and not pad:
            break
        parts = []
        for t in cat:
            piece = t[start:start + real]
            if real < bs:
                reps = math.ceil(bs / real)
                piece = torch.cat([piece] * reps)[:bs]
            parts.append(piece)
        out.append((tuple(parts), real))
    return out


@torch.no_grad()
def run_all(program: Program, chunked: Sequence[tuple[tuple[torch.Tensor, ...], int]]) -> dict[str, torch.Tensor]:
    """Outputs of the program over chunks, concatenated, by output name."""
    names = [o.name for o in program.outputs]
    acc: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for inputs, real in chunked:
        flat = program.graph_module(*inputs)
        for n, y in zip(names, flat):
            acc[n].append(y[:real])
    return {n: torch.cat(v) for n, v in acc.items()}


def task_output(program: Program, outputs: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The tensor a task is scored on: its output, or the first leaf of a structured output."""
    return next(outputs[o.name] for o in program.outputs if o.task == task)


def scores(program: Program, outputs: dict[str, torch.Tensor], data: FusionData,
           reference: dict[str, torch.Tensor] | None, rows: int | None = None) -> dict[str, float]:
    """Per-task score: the task's metric against its labels, or against `reference` (the originals)."""
    out = {}
    for task, ev in data.tasks.items():
        y = task_output(program, outputs, task)
        n = int(y.shape[0]) if rows is None else rows
        if ev.labels is not None:
            out[task] = float(ev.metric(y[:n], ev.labels[:n]))
        else:
            assert reference is not None
            out[task] = float(ev.metric(y[:n], task_output(program, reference, task)[:n]))
    return out


# --- worker-side cache of the original program --------------------------------------------------

_PROGRAMS: dict[int, Program] = {}


def load_program_bytes(blob: bytes) -> Program:
    key = hash(blob)
    if key not in _PROGRAMS:
        fd, path = tempfile.mkstemp(suffix=".safetensors")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            _PROGRAMS.clear()  # one search at a time per worker: keep memory flat
            _PROGRAMS[key] = serialization.load(path)
        finally:
            os.unlink(path)
    return _PROGRAMS[key]


def program_bytes(program: Program) -> bytes:
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    os.close(fd)
    try:
        serialization.save(program, path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


# --- which tensors train --------------------------------------------------------------------------


def merged_tasks(original: Program, records: Sequence[MutationRecord]) -> set[str]:
    reach = task_reach(original)
    names = {n.name: n for n in original.graph.nodes}
    out: set[str] = set()
    for target, _ in merges(records):
        node = names.get(target)
        if node is not None:
            out |= set(reach[node])
    return out


def _is_running_stat(node: fx.Node) -> bool:
    """Batch-norm running statistics are not differentiable inputs: they stay fixed."""
    return all(op_name(u.target) in _BN_OPS and node in u.args[3:5] for u in node.users) and bool(node.users)


def trainable(program: Program, tasks: set[str]) -> list[str]:
    """Floating parameters read only by one of `tasks` (downstream of its merge, and its adapters)."""
    reach = task_reach(program)
    out = []
    for node in program.graph.nodes:
        if node.op != "get_attr" or len(reach[node]) != 1 or not reach[node] <= tasks:
            continue
        t = program.tensor(str(node.target))
        if t.is_floating_point() and not _is_running_stat(node) and str(node.target) not in out:
            out.append(str(node.target))
    return out


# --- adapter warm start ---------------------------------------------------------------------------


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.names = names
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = result.detach()
        return result


@torch.no_grad()
def capture(program: Program, chunked: Sequence[tuple[tuple[torch.Tensor, ...], int]],
            names: set[str]) -> dict[str, torch.Tensor]:
    acc: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for inputs, real in chunked:
        interp = _Capture(program.graph_module, names)
        interp.run(*inputs)
        for n in names:
            acc[n].append(interp.values[n][:real])
    return {n: torch.cat(v) for n, v in acc.items()}


@torch.no_grad()
def fit_adapters(candidate: Program, original: Program, chunked: Sequence[tuple[tuple[torch.Tensor, ...], int]],
                 ridge: float = 1e-3) -> int:
    """Least-squares fit of each adapter's last linear/1x1 conv onto the replaced layer's original values."""
    fitted = 0
    for node in list(candidate.graph.nodes):
        ann = candidate.annotation(FusionAdapter, node)
        if ann is None or not ann.params or op_name(node.target) not in ("linear", "conv2d"):
            continue
        if ann.replaces not in {n.name for n in original.graph.nodes}:
            continue
        x = capture(candidate, chunked, {node.args[0].name})[node.args[0].name]  # type: ignore[union-attr]
        y = capture(original, chunked, {ann.replaces})[ann.replaces]
        if op_name(node.target) == "conv2d":
            x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            y = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
        else:
            x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        if x.shape[0] > 20000:
            idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:20000]
            x, y = x[idx], y[idx]
        xa = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1).double()
        gram = xa.T @ xa + ridge * x.shape[0] * torch.eye(xa.shape[1], dtype=torch.float64)
        sol = torch.linalg.solve(gram, xa.T @ y.double())  # (in + 1, out)
        w_name, b_name = str(node.args[1].target), str(node.args[2].target)  # type: ignore[union-attr]
        w = sol[:-1].T.float().contiguous()
        if op_name(node.target) == "conv2d":
            w = w[:, :, None, None]
        candidate.graph_module.register_buffer(w_name, w)
        candidate.graph_module.register_buffer(b_name, sol[-1].float().contiguous())
        fitted += 1
    return fitted


# --- learning curve -------------------------------------------------------------------------------


def extrapolate(curve: Sequence[tuple[int, float]], at: int) -> tuple[float, float]:
    """Fit drop(t) = a + b * t^-c (c in a small grid, a and b by least squares) to the last points;
    returns (predicted drop at step `at`, predicted further improvement from the last point)."""
    pts = [(float(t), float(d)) for t, d in curve if t > 0]
    if len(pts) < 3:
        return pts[-1][1], float("inf")
    best: tuple[float, float, float] | None = None
    for c in (0.25, 0.5, 1.0, 2.0):
        xs = torch.tensor([t ** -c for t, _ in pts], dtype=torch.float64)
        ys = torch.tensor([d for _, d in pts], dtype=torch.float64)
        design = torch.stack([torch.ones_like(xs), xs], dim=1)
        sol = torch.linalg.lstsq(design, ys[:, None]).solution[:, 0]
        err = float(((design @ sol - ys) ** 2).sum())
        if best is None or err < best[0]:
            a, b = float(sol[0]), float(sol[1])
            best = (err, a + b * at ** -c, (a + b * pts[-1][0] ** -c) - (a + b * at ** -c))
    assert best is not None
    return best[1], best[2]


# --- the worker entry point -----------------------------------------------------------------------


def _loss(student: torch.Tensor, teacher: torch.Tensor, classify: bool, temperature: float) -> torch.Tensor:
    if classify and student.dim() == 2 and student.shape[-1] > 1:
        t = temperature
        return F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t * t
    return F.mse_loss(student, teacher) / (teacher.var() + 1e-8)


def evaluate_candidate(job: CandidateJob) -> CandidateResult:
    """Rebuild, warm-start, distil and score one candidate (deterministic for a job)."""
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evaluate(job, start)
    finally:
        torch.set_num_threads(threads)


def _evaluate(job: CandidateJob, start: float) -> CandidateResult:
    cfg = job.config
    original = load_program_bytes(job.program)
    records = [MutationRecord.from_json(t) for t in job.records]
    candidate = replay(original, records)
    torch.manual_seed(cfg.seed ^ stable_seed(*job.records))
    tasks = merged_tasks(original, records)
    calib = chunks(original, job.data.batches("calibration"), pad=False) or chunks(
        original, job.data.batches("calibration"))
    eval_chunks = chunks(original, job.data.batches("eval"))
    val_chunks = chunks(original, job.data.batches("eval"), limit=cfg.val_examples)
    val_rows = sum(r for _, r in val_chunks)

    fit_adapters(candidate, original, calib[: max(1, math.ceil(cfg.fit_examples / batch_size(original)))])
    names = trainable(candidate, tasks)
    params = []
    for name in names:
        t = candidate.tensor(name).detach().clone().requires_grad_(True)
        candidate.graph_module.register_buffer(name, t)
        params.append(t)

    needs_reference = any(ev.labels is None for ev in job.data.tasks.values())
    ref_val = run_all(original, val_chunks) if needs_reference else None
    out_names = [o.name for o in candidate.outputs]
    out_tasks = [o.task for o in candidate.outputs]
    classify = {t: ev.metric is accuracy for t, ev in job.data.tasks.items()}
    curve: list[tuple[int, float]] = []
    stopped = ""
    steps = 0

    def val_drop() -> float:
        got = scores(candidate, run_all(candidate, val_chunks), job.data, ref_val, rows=val_rows)
        return max(job.baseline_val[t] - got[t] for t in got)

    best: tuple[float, list[torch.Tensor]] | None = None

    def checkpoint(step: int) -> None:
        nonlocal best
        curve.append((step, val_drop()))
        if best is None or curve[-1][1] < best[0]:
            best = (curve[-1][1], [t.detach().clone() for t in params])

    if params and cfg.steps > 0:
        teachers: dict[int, dict[str, torch.Tensor]] = {}
        # new adapter tensors learn at `lr`; the merged task's own (trained) layers more gently
        adapter_params = {p for n in candidate.graph.nodes
                          if (a := candidate.annotation(FusionAdapter, n)) is not None for p in a.params}
        groups = [{"params": [t for n, t in zip(names, params) if n in adapter_params], "lr": cfg.lr},
                  {"params": [t for n, t in zip(names, params) if n not in adapter_params], "lr": cfg.lr / 3}]
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
        order = torch.randperm(len(calib) * (cfg.steps // max(1, len(calib)) + 1)) % len(calib)
        checkpoint(0)
        for step in range(1, cfg.steps + 1):
            i = int(order[step - 1])
            inputs, _ = calib[i]
            if i not in teachers:
                with torch.no_grad():
                    teachers[i] = dict(zip(out_names, original.graph_module(*inputs)))
            with torch.enable_grad():
                flat = candidate.graph_module(*inputs)
                loss = sum(_loss(y, teachers[i][n], classify.get(t, False), cfg.temperature)
                           for n, t, y in zip(out_names, out_tasks, flat) if t in tasks)
                opt.zero_grad()
                loss.backward()  # type: ignore[union-attr]
            opt.step()
            sched.step()
            steps = step
            if step % cfg.eval_every == 0 or step == cfg.steps:
                checkpoint(step)
                # judge a curve only from three points taken while training, and not before half the budget
                if step < cfg.steps and cfg.early_stop and len(curve) >= 4 and 2 * step >= cfg.steps:
                    predicted, gain = extrapolate(curve[1:], cfg.steps)  # step 0 is before training
                    # two standard errors of a paired accuracy difference on the validation slice
                    margin = 2 * math.sqrt(max(curve[-1][1], job.max_acc_drop, 0.0) / max(1, val_rows))
                    bar = job.max_acc_drop + margin
                    if predicted > bar and curve[-1][1] > bar:
                        stopped = "hopeless"
                        break
                    if curve[-1][1] <= job.max_acc_drop / 2 and gain < job.max_acc_drop / 10:
                        stopped = "converged"
                        break
    if best is not None:  # the weights that did best on the validation slice (training never makes it worse)
        for t, saved in zip(params, best[1]):
            t.data.copy_(saved)
    for t in params:
        t.requires_grad_(False)
    ref_eval = run_all(original, eval_chunks) if needs_reference else None
    got = scores(candidate, run_all(candidate, eval_chunks), job.data, ref_eval)
    drop = max(job.baseline[t] - got[t] for t in got)
    weights = {name: candidate.tensor(name).detach().clone() for name in trainable(candidate, tasks)}
    return CandidateResult(got, drop, steps, stopped, curve, weights, time.perf_counter() - start)


def baseline_scores(original: Program, data: FusionData,
                    val_examples: int) -> tuple[dict[str, float], dict[str, float]]:
    """The original models' scores on all held-out inputs and on the validation slice."""
    eval_chunks = chunks(original, data.batches("eval"))
    ref = run_all(original, eval_chunks)
    full = scores(original, ref, data, ref)
    val_chunks = chunks(original, data.batches("eval"), limit=val_examples)
    rows = sum(r for _, r in val_chunks)
    ref_val = run_all(original, val_chunks)
    return full, scores(original, ref_val, data, ref_val, rows=rows)
