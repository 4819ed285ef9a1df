"""Fusion suite 1: three CNNs of different architectures, trained separately, reading the same images.

Real data (Fashion-MNIST, Debian package dataset-fashion-mnist), three tasks on the same 28x28 images,
each model trained from scratch on its own labels:

- `item`   (10 classes): the Fashion-MNIST class, a small ResNet (residual blocks: a branching graph);
- `group`  (4 classes):  tops / bottoms+dresses / footwear / bags, a VGG-style plain CNN;
- `season` (3 classes):  summer / winter / all-season wear, an Inception-style CNN (parallel branches, concat).

The three are lowered into one Program (batch 1 for latency, batch 64 as the training twin) and
`fuse-models` searches for shared layers under max-acc-drop (default 1 point) on the 10k test images;
calibration is 20k unlabelled training images. Recorded: per-task accuracy of the originals and the
fused model, latency of the three models vs the fused model at batch 1 and 8 (eager and ONNX Runtime,
timed side by side), search wall time, candidates trained and filtered, the search report and plot.

    python benchmarks/fusion/suite1_cnns.py                  # train (cached), search, time (about 25 min)
    python benchmarks/fusion/suite1_cnns.py --time-budget 600 --max-candidates 20

Trained originals are cached in benchmarks/fusion/cache/ (gitignored; deterministic, retrained when
missing); the search state lives there too, so a killed run resumes without retraining candidates.
Training, the search and the timings run under one hold of /tmp/morphc-timing.lock (shared 2-core machine).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (benchmarks/common.py)
import fusion_common as fc  # noqa: E402

import morphc  # noqa: E402
from morphc.passes.fusion.data import FusionData, TaskEval, accuracy, batched  # noqa: E402
from morphc.passes.fusion.search import build_result  # noqa: E402
from morphc.zoo.cnn import BasicBlock, InceptionBlock  # noqa: E402
from morphc.zoo.datasets import fashion_mnist  # noqa: E402

MEAN, STD = 0.2860, 0.3530
# Fashion-MNIST classes: 0 T-shirt, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker, 8 Bag, 9 Boot
GROUP = torch.tensor([0, 1, 0, 1, 0, 2, 0, 2, 3, 2])  # tops, bottoms+dresses, footwear, bags
SEASON = torch.tensor([0, 2, 1, 0, 1, 0, 2, 2, 2, 1])  # summer, winter, all-season
TASKS = {"item": "10 Fashion-MNIST classes", "group": "4 groups", "season": "3 seasons"}


def item_net() -> nn.Module:
    """A small ResNet: stem, three residual blocks (one downsampling), global pool, linear."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        BasicBlock(16, 16), BasicBlock(16, 32, stride=2), BasicBlock(32, 48),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


def group_net() -> nn.Module:
    """VGG-style: plain 3x3 convolutions and max pooling."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 4))


def season_net() -> nn.Module:
    """Inception-style: two blocks of four parallel branches concatenated."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        InceptionBlock(32, 16, 24, 8, 16), nn.MaxPool2d(2), InceptionBlock(64, 32, 32, 16, 16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 3))


BUILDERS = {"item": item_net, "group": group_net, "season": season_net}


def load_data(n_train: int) -> dict[str, Any]:
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("test")

    def norm(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255.0 - MEAN) / STD)[:, None]

    labels_tr = {"item": ytr, "group": GROUP[ytr], "season": SEASON[ytr]}
    labels_te = {"item": yte, "group": GROUP[yte], "season": SEASON[yte]}
    return {"x_train": norm(xtr[:n_train]), "y_train": {k: v[:n_train] for k, v in labels_tr.items()},
            "x_calib": norm(xtr[n_train:n_train + 20000]) if n_train + 20000 <= len(xtr) else norm(xtr[-20000:]),
            "x_test": norm(xte), "y_test": labels_te}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-acc-drop", type=float, default=0.01)
    parser.add_argument("--time-budget", type=float, default=1500.0, help="search budget, seconds")
    parser.add_argument("--max-candidates", type=int, default=60)
    parser.add_argument("--strategy", default="anneal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=300, help="distillation steps per candidate")
    parser.add_argument("--lr", type=float, default=3e-3, help="distillation learning rate")
    parser.add_argument("--train-examples", type=int, default=40000, help="training images per original model")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--train-batch", type=int, default=64, help="batch size of the training twin Program")
    parser.add_argument("--targets", nargs="+", default=["eager", "onnxruntime"])
    parser.add_argument("--latency-budget", type=float, default=3.0, help="seconds of timed rounds per row")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="ignore the saved search state")
    parser.add_argument("--lock", choices=("all", "timing", "none"), default="all",
                        help="hold /tmp/morphc-timing.lock for everything (default), only for the final timings "
                             "(run the rest with `nice -n 19`), or not at all")
    parser.add_argument("--search-latency", choices=("measured", "cost-model"), default="measured",
                        help="latency the search filters candidates by: morphc's profiler, or the GNN cost model "
                             "(morphc.predictors.cost_model, no timing: valid without the lock)")
    parser.add_argument("--out", default="fusion_suite1")
    args = parser.parse_args()

    threads = common.set_threads(args.threads)
    print(f"suite 1: loading Fashion-MNIST ({args.train_examples} training images per model)")
    d = load_data(args.train_examples)
    # one hold of the timing lock for training, search and timings: re-queueing between phases on a
    # machine shared by several engineers costs more than it gives back
    with fc.timing_lock(args.lock == "all"):
        run(args, d, threads)


def run(args: argparse.Namespace, d: dict[str, Any], threads: int) -> None:
    load_at_start = common.load_average()
    t0 = time.perf_counter()

    models: dict[str, nn.Module] = {}
    before: dict[str, float] = {}
    training: dict[str, Any] = {}
    for task, build in BUILDERS.items():
        config = {"task": task, "epochs": args.epochs, "batch": 128, "lr": 3e-3, "seed": args.seed,
                  "n": args.train_examples, "arch": build.__doc__}
        models[task], training[task] = fc.cached_classifier(task, build, d["x_train"], d["y_train"][task], config,
                                                            lock=False)
        before[task] = accuracy(fc.predict(models[task], d["x_test"]), d["y_test"][task])
        print(f"  {task}: test accuracy {before[task]:.4f} ({'cached' if training[task]['cached'] else 'trained'})")

    program = morphc.lower(models, d["x_test"][:1])
    twin = morphc.lower(models, d["x_test"][:args.train_batch])
    data = FusionData(calibration=batched([d["x_calib"]], 500), eval_inputs=batched([d["x_test"]], 500),
                      tasks={t: TaskEval(d["y_test"][t]) for t in models})
    state = fc.CACHE_DIR / f"{args.out}_state.sqlite"
    if args.fresh and state.exists():
        state.unlink()
    options = (f"max-acc-drop={args.max_acc_drop},strategy={args.strategy},max-candidates={args.max_candidates},"
               f"time-budget-s={args.time_budget},seed={args.seed},steps={args.steps},lr={args.lr},state={state}")
    ctx = morphc.PassContext(calibration=data, options={"fusion_train_program": twin})
    if args.search_latency == "cost-model":
        from morphc.predictors import cost_model, spaces

        ctx.cost_model = cost_model.load_default()
        ctx.options["latency_config"] = spaces.parse_config(f"threads={threads}")
    else:
        ctx.options.update(latency_fn=fc.profiler_latency(), latency_name="profiler")
    print(f"suite 1: fuse-models{{{options}}}")
    start = time.perf_counter()
    (fuse,) = morphc.Pipeline.parse(f"fuse-models{{{options}}}").passes
    result = fuse.run(program.clone(), ctx)
    wall = time.perf_counter() - start
    stats = dict(result.statistics)
    report = ctx.options["fusion_report"]
    report_md = report.write(common.RESULTS / f"{args.out}_search")
    best = report.outcome.best
    after = {t: best.scores[t] for t in models}
    print(f"suite 1: search {wall:.0f} s; accuracy before {before}, after {after}")
    print(report.markdown().split("### Every")[0])

    # the fused model at batch 8 is the same history replayed on the batch-8 Program + the trained tensors
    with fc.timing_lock(args.lock == "timing"):
        rows = fc.latency_rows(models, lambda b: morphc.lower(models, d["x_test"][:b]),
                               lambda prog: build_result(prog, best), (1, 8), tuple(args.targets),
                               args.latency_budget)

    results = {
        "tasks": TASKS, "original_accuracy": before, "fused_accuracy": after,
        "accuracy_drop": {t: before[t] - after[t] for t in models}, "training": training,
        "search": {"wall_seconds": wall, "options": options, "statistics": stats,
                   "report": str(report_md.relative_to(common.RESULTS)), "pareto": [c.summary() for c in report.pareto],
                   "best_merges": sorted(best.merges)},
        "latency": rows, "total_seconds": time.perf_counter() - t0,
    }
    task_rows = [[t, TASKS[t], f"{before[t]:.4f}", f"{after[t]:.4f}", f"{(before[t] - after[t]) * 100:+.2f} pt"]
                 for t in models]
    body = "\n".join([
        "Three CNNs of different architectures (ResNet-style `item`, VGG-style `group`, Inception-style `season`), "
        "each trained separately from scratch on its own labels of the same Fashion-MNIST images, fused by "
        "`fuse-models`; accuracy on the 10k test images.", "",
        "## Accuracy (10k Fashion-MNIST test images)", "",
        common.markdown_table(["task", "labels", "original", "fused", "drop"], task_rows), "",
        "## Latency: the 3 models vs the fused model (median per call, 1 thread)", "",
        common.markdown_table(fc.LATENCY_HEADER, fc.latency_md_rows(rows)), "",
        "`separate`: the three torch modules called one after another (eager); `N-task Program`: the three lowered "
        "into one morphc Program (no fusion) compiled for the target; `fused`: the fuse-models result compiled "
        "for the same target (batch 8: the same mutation history replayed on the batch-8 Program).", "",
        "## Search", "",
        f"- wall time {wall:.0f} s; `fuse-models{{{options}}}`",
        f"- candidates trained {stats['candidates_trained']:.0f} (resumed from state "
        f"{stats['candidates_resumed']:.0f}), filtered {stats['candidates_filtered']:.0f} "
        f"(latency {stats['candidates_filtered_latency']:.0f}, "
        f"dominated {stats['candidates_filtered_dominated']:.0f}), "
        f"stopped early as hopeless {stats['candidates_stopped_early']:.0f}, proposals {stats['proposals']:.0f}",
        f"- merges of the best candidate: {', '.join(f'{t}←{s}' for t, s in sorted(best.merges)) or 'none'}",
        f"- full search report with the Pareto plot: [{report_md.relative_to(common.RESULTS)}]"
        f"({report_md.relative_to(common.RESULTS)})",
    ])
    path = common.write_results(args.out, title="Fusion suite 1: three CNNs on Fashion-MNIST", results=results,
                                body_md=body, load_at_start=load_at_start,
                                settings={"threads": threads, "max_acc_drop": args.max_acc_drop,
                                          "train_examples": args.train_examples, "epochs": args.epochs,
                                          "steps": args.steps, "seed": args.seed, "lock": args.lock,
                                          "search_latency": args.search_latency})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
