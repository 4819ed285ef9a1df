"""Collect a GPU latency profile (batch x MPS SM share) of the cost-model corpus into a records DB.

On the GPU machine, from the repository root (morphc need not be installed):

    mkdir -p $OUT && PYTHONPATH=$PWD timeout 420 python3 scripts/collect_gpu_profile.py \
        --db $OUT/gpu.sqlite --budget-s 360 2>&1 | tee $OUT/collect.log

It checks CUDA, then whether MPS applies SM shares here (its own control daemon; a probe client at
100% and one at the lowest share must differ visibly), lowers `--per-family` variants of every
corpus family at `--batches` in parallel processes, and runs one measuring worker per SM share
(only 100 when MPS does not work, saying why), committing each record as it is measured. After
`--budget-s` seconds it starts nothing new; what was measured stays. A JSON summary (MPS status and
its evidence, failures, records per share) is written next to the database. Read it back with
`python benchmarks/cost_model.py --device cuda --db gpu.sqlite`.

`--dry-run` runs every step on the CPU (HostBackend, no MPS), into a database whose device says
DRY-RUN: for checking the orchestration where there is no GPU, never as data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", required=True, help="records database to write (created; resumed if it exists)")
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="wall-clock budget: no new work starts after it (default 360)")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--shares", default="100,50,20",
                        help="MPS SM shares in percent (default 100,50,20; only 100 where MPS does not work)")
    parser.add_argument("--per-family", type=int, default=4, help="variants per corpus family (default 4)")
    parser.add_argument("--family", action="append", help="only these families (repeatable; default all)")
    parser.add_argument("--processes", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)),
                        help="lowering processes (default: cores - 2, at most 14)")
    parser.add_argument("--cache", default="/tmp/morphc-gpu-cache", help="directory of lowered programs")
    parser.add_argument("--work-dir", default="/tmp/morphc-gpu-work", help="MPS pipe/log directories, job list")
    parser.add_argument("--target-s", type=float, default=0.1, help="timed seconds per (program, share)")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-operator profiles")
    parser.add_argument("--repeat", type=int, default=0,
                        help="measurement pass N >= 1: time the programs again into the same --db, as their pass N "
                             "(no per-operator profiles); benchmarks/cost_model.py then reports the re-measurement "
                             "noise floor and learns the median of the passes")
    parser.add_argument("--summary", default=None, help="summary JSON (default: the db path with .json)")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU, no GPU (a DRY-RUN device)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from morphc.predictors.corpus import HELD_OUT_FAMILIES, VARIANTS
    from morphc.predictors.gpu_collect import CollectionSettings, collect_gpu_profile, select_variants

    variants = select_variants(VARIANTS, args.per_family, args.family)
    missing = set(HELD_OUT_FAMILIES) - {v.family for v in variants}
    if missing:
        print(f"note: held-out families {sorted(missing)} are not collected: split (b) of benchmarks/cost_model.py "
              f"will lack them")
    settings = CollectionSettings(
        db=Path(args.db), variants=variants, batches=[int(b) for b in args.batches.split(",")],
        shares=[int(s) for s in args.shares.split(",")], budget_s=args.budget_s, cache_dir=Path(args.cache),
        work_dir=Path(args.work_dir), processes=args.processes, target_s=args.target_s, ops=not args.no_ops,
        repeat=args.repeat,
        backend="host" if args.dry_run else "cuda", summary=Path(args.summary) if args.summary else None)
    summary = collect_gpu_profile(settings, log=lambda m: print(m, flush=True))
    print(json.dumps({k: summary.get(k) for k in ("device", "shares_measured", "records", "wall_s", "error")},
                     default=str))
    return 2 if "error" in summary else 0


if __name__ == "__main__":
    sys.exit(main())
