"""Profile the cost-model corpus on this machine into a records database (resumable).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/collect_cost_model_data.py \
        --db benchmarks/results/cost_model.sqlite --lock /tmp/morphc-timing.lock

Every (variant, batch) of morphc.predictors.corpus is lowered, its op graph stored, and its
end-to-end latency (threads 1 and 2, interleaved, median) and per-op latency measured. Killing it
loses nothing: run it again and it continues. The lock is held per variant, not for the whole run.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="benchmarks/results/cost_model.sqlite")
    parser.add_argument("--lock", default=None, help="flock this file while measuring each variant")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N variants")
    parser.add_argument("--cache", default=None, help="directory of lowered programs (reused when present)")
    parser.add_argument("--lock-chunk-s", type=float, default=120.0,
                        help="release the lock after this many seconds of measuring (others interleave)")
    parser.add_argument("--prepare-only", action="store_true", help="only lower the programs into --cache")
    parser.add_argument("--repeat", type=int, default=0,
                        help="measure the end-to-end latencies again as pass N (1, 2, ...): training learns the median")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="measure with subnormal floats flushed to zero on every intra-op thread (the serving "
                             "knob flush_denormal; kept under its own record keys): on CPUs that compute subnormals "
                             "slowly a program's latency otherwise depends on its values (docs/cost_model.md)")
    parser.add_argument("--refresh-op-graphs", action="store_true",
                        help="only re-extract the stored op graphs (after a new features.OPGRAPH_VERSION); "
                             "measures nothing")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_grad_enabled(False)
    from morphc.predictors.corpus import VARIANTS
    from morphc.predictors.dataset import collect_corpus, refresh_op_graphs
    from morphc.predictors.records import RecordsDB

    variants = [v for v in VARIANTS if not args.family or v.family in args.family][: args.limit]
    db = RecordsDB(args.db)
    if args.refresh_op_graphs:
        n = refresh_op_graphs(db, variants, cache_dir=args.cache)
        print(f"re-extracted {n} op graphs in {args.db}")
        return 0
    n = collect_corpus(db, variants, batches=[int(b) for b in args.batches.split(",")],
                       threads=[int(t) for t in args.threads.split(",")], lock=args.lock, cache_dir=args.cache,
                       prepare_only=args.prepare_only, lock_chunk_s=args.lock_chunk_s, repeat=args.repeat,
                       flush_denormal=args.flush_denormal)
    print(f"measured {n} (variant, batch) pairs now; {len(db)} records in {args.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
