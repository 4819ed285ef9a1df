"""Fusion suite 2: the real all-MiniLM-L6-v2 as a sentence-embedding task + a BBC News topic classifier
fine-tuned from it separately, fused into one multi-task transformer by `fuse-models`.

Tasks (both read the same tokenized text, 64 tokens: headline and first sentences):
- `embed`: the pretrained all-MiniLM-L6-v2 unchanged (mean pooling + L2 normalisation, 384-d).
  Metric: *cosine agreement* with the original embeddings, the share of held-out articles whose
  fused embedding has cosine similarity >= 0.99 to the original's. An embedding service's vectors
  are compared with vectors already stored in an index built by the original model, so what must
  survive fusion is the embedding itself, not just some downstream accuracy; the threshold 0.99 keeps
  nearest-neighbour rankings practically unchanged. A downstream check is recorded too: 5-NN topic
  accuracy of the held-out embeddings against an index of the training articles' *original* embeddings.
- `topic`: a copy of MiniLM + masked mean pooling + a linear head, fine-tuned (all weights) on the
  BBC News training split for 5 topics. Metric: top-1 accuracy on the held-out split.

Stages: data and originals (cached under benchmarks/fusion/cache/, retrained when missing), the
two-task Program checked against the originals, then `fuse-models` (distillation on unlabelled
calibration texts, accuracy on held-out labelled texts), then latency of the 2 models vs the fused
model side by side at batch 1 and 8 on the same target. Results: benchmarks/results/fusion_suite2.{md,json}.

    python benchmarks/fusion/suite2_minilm.py                 # all: fine-tune once (5-9 min), search (10 min), timing
    python benchmarks/fusion/suite2_minilm.py --prepare-only  # data, fine-tuning, Program check, baseline latency
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import common  # noqa: E402  (benchmarks/common.py)
import text_common as tc  # noqa: E402

from morphc.zoo import SentenceEmbedding, minilm_tokenizer  # noqa: E402
from morphc.zoo.text_datasets import bbc_news, stratified_split  # noqa: E402

TASKS = ("embed", "topic")
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def finetune_config(args: argparse.Namespace) -> dict[str, Any]:
    return {"task": "bbc-topic", "base": "all-MiniLM-L6-v2", "seq_len": args.seq_len, "steps": args.steps,
            "batch": 16, "lr": 5e-5, "head_lr": 2e-3, "seed": 1, "split_seed": SPLIT_SEED,
            "test_fraction": TEST_FRACTION, "deduplicated": True, "version": 2}


def prepare(args: argparse.Namespace, log: Any = print) -> dict[str, Any]:
    """Data, the two original task models, tokenized splits."""
    tokenizer = minilm_tokenizer()
    train, test = stratified_split(bbc_news(), TEST_FRACTION, seed=SPLIT_SEED)
    train_x = tc.tokenize(train.texts, args.seq_len, tokenizer)
    test_x = tc.tokenize(test.texts, args.seq_len, tokenizer)
    embed = SentenceEmbedding(tc.load_minilm_encoder()).eval().requires_grad_(False)
    config = finetune_config(args)

    def build() -> torch.nn.Module:
        return tc.MeanPoolClassifier(tc.load_minilm_encoder(), len(train.classes))

    def train_fn(model: torch.nn.Module) -> dict[str, Any]:
        curve = tc.finetune(model, train_x, train.labels, steps=config["steps"], batch=config["batch"],
                            lr=config["lr"], head_lr=config["head_lr"], head="head", seed=config["seed"], log=log)
        acc = (tc.predict(model, test_x).argmax(1) == test.labels).double().mean().item()
        return {**curve, "test_accuracy": acc}

    topic, record = tc.cached_model("suite2-topic", config, build, train_fn, log=log)
    topic.requires_grad_(False)
    moved = tc.params_differ(topic.encoder, embed.encoder)
    if moved == 0.0:
        raise RuntimeError("the fine-tuned topic classifier's encoder equals the original MiniLM: not a separate model")
    return {"train": train, "test": test, "train_x": train_x, "test_x": test_x,
            "models": {"embed": embed, "topic": topic}, "finetune": record, "encoder_max_weight_change": moved}


def fusion_data(prep: dict[str, Any], args: argparse.Namespace) -> Any:
    """Calibration: unlabelled training texts; eval: the held-out split with topic labels.

    The held-out split is cut to a multiple of the batch size so the Program (static shapes) runs on it whole.
    """
    from morphc.passes.fusion.data import FusionData, TaskEval

    ids, mask = prep["train_x"]
    n_cal = min(args.calibration, len(ids))
    n_eval = len(prep["test"]) // args.batch * args.batch
    test_ids, test_mask = prep["test_x"]
    return FusionData(calibration=tc.batches((ids[:n_cal], mask[:n_cal]), args.batch),
                      eval_inputs=tc.batches((test_ids[:n_eval], test_mask[:n_eval]), args.batch),
                      tasks={"embed": TaskEval(labels=None, metric=tc.cosine_agreement),
                             "topic": TaskEval(labels=prep["test"].labels[:n_eval])})


METRICS = {"embed": f"share of embeddings with cosine >= {tc.COSINE_AGREEMENT} to the original's",
           "topic": "top-1 accuracy (5 topics)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=tc.SEQ_LEN)
    parser.add_argument("--steps", type=int, default=200, help="fine-tuning steps of the topic classifier")
    parser.add_argument("--batch", type=int, default=8, help="Program batch size for fusion (calibration/eval)")
    parser.add_argument("--calibration", type=int, default=1024, help="unlabelled calibration texts")
    parser.add_argument("--out", default="fusion_suite2")
    tc.add_fusion_arguments(parser, time_budget_s=480, distill_steps=300, distill_lr=3e-3)
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
    n_eval = len(data.tasks["topic"].labels)
    train_emb = tc.predict(models["embed"], prep["train_x"])
    knn = {"original": tc.knn_accuracy(reference["embed"], prep["test"].labels[:n_eval], train_emb,
                                       prep["train"].labels)}
    searched = tc.search(program, data, args)
    fused, fusion_report, after = searched.fused, searched.report, None
    if searched.outputs is not None:
        after = tc.score_tasks(searched.outputs, reference, data)
        knn["fused"] = tc.knn_accuracy(searched.outputs["embed"], prep["test"].labels[:n_eval], train_emb,
                                       prep["train"].labels)
        print(f"fusion: {searched.record['wall_seconds']:.0f} s, before {before}, after {after}")
    test_ids, test_mask = prep["test_x"]
    inputs_by_batch = {b: (test_ids[:b], test_mask[:b]) for b in (1, 8)}
    latency = [row for target in args.targets
               for row in tc.latency_table(models, inputs_by_batch, fused, fusion_report, target,
                                               args.latency_budget)]
    results = {"tasks": METRICS, "original": before, "fused": after, "knn5_topic_accuracy_of_embeddings": knn,
               "program_vs_models_max_err": lower_err, "finetune": prep["finetune"],
               "encoder_max_weight_change": prep["encoder_max_weight_change"], "search": searched.record,
               "latency": latency, "eval_examples": n_eval, "calibration_examples": args.calibration,
               "cache_mb": tc.cache_size_mb()}
    path = common.write_results(args.out, title="Fusion suite 2: MiniLM sentence embeddings + BBC topic classifier",
                                results=results, body_md=report(results, args), settings={
                                    "threads": threads, "seq_len": args.seq_len, "program_batch": args.batch,
                                    "max_acc_drop": args.max_acc_drop, "time_budget_s": args.time_budget,
                                    "strategy": args.strategy, "seed": args.seed, "targets": args.targets},
                                load_at_start=load_at_start)
    print(f"wrote {path} and {path.with_suffix('.json')}")


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    parts = ["## Per-task scores on the held-out split\n",
             common.markdown_table(tc.TASK_HEADER, tc.task_rows(METRICS, r["original"], r["fused"])),
             f"\nHeld-out: {r['eval_examples']} BBC News articles (deduplicated, stratified 20% split, seed 0), "
             f"{args.seq_len} tokens. Downstream check of the embed task: 5-NN topic accuracy against an index of "
             "the training articles' original embeddings: "
             + ", ".join(f"{k} {v:.4f}" for k, v in r["knn5_topic_accuracy_of_embeddings"].items()) + ".\n",
             "## Latency: the 2 models vs the fused model (median per call)\n",
             common.markdown_table(tc.LATENCY_HEADER, tc.latency_rows_md(r["latency"])),
             "\n`separate`: the two torch models one after the other (eager); `N-task Program`: both lowered into "
             "one morphc Program (no fusion) compiled for the target; `fused`: the fuse-models result compiled for "
             "the same target. Speedups are medians measured side by side in one process.\n",
             "## Search\n"]
    parts.append(tc.search_md(r["search"]))
    ft = r["finetune"]
    parts.append("## The fine-tuned classifier\n\n"
                 f"- config: `{ft['config']}` (cache key {ft['key']}, loaded from cache: {ft['cached']})\n"
                 f"- training: {ft['train_seconds']:.0f} s on {ft['threads']} thread(s); held-out accuracy "
                 f"{ft['metrics']['test_accuracy']:.4f}; loss per tenth of the run "
                 f"{[round(x, 3) for x in ft['metrics']['loss_curve']]}\n"
                 "- largest weight change of its encoder vs the original MiniLM: "
                 f"{r['encoder_max_weight_change']:.3g}\n"
                 f"- N-task Program vs the two torch models: max |error| {r['program_vs_models_max_err']:.2e}\n")
    return "\n".join(parts)


if __name__ == "__main__":
    main()
