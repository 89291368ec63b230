#!/usr/bin/env bash
# Gate sharing (adaLN-single, `model.gate_source: shared`) against per-unit gate heads on the digits-flow
# preset at equal steps, 3 seeds, nrdm and adaln-zero units (opt-in; ~35-40 CPU-minutes per cell,
# resumable; SHARD=I/N splits the grid over N processes). The per-unit arm is the depth study's
# digits-flow cells (the same preset, steps and evaluation): with BASE_OUT pointing at that study's
# converged grid, its finished cells are not trained again. At the end benchmarks/arm_report.py compares the
# arms seed by seed (OUT/gate-sharing-digits-flow-<variant>.png).
#   SHARD=0/2 bash benchmarks/gate_sharing.sh & SHARD=1/2 bash benchmarks/gate_sharing.sh
set -euo pipefail
OUT=${OUT:-runs/gate-sharing}
BASE_OUT=${BASE_OUT:-runs/depth-study/converged}
SHARD=${SHARD:-0/1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--preset digits-flow --backbones preset --depths 6 --variants nrdm adaln-zero --seeds 0 1 2 --steps 1500
        --gammas 0 --eval-n 500 --eval-points 4 --no-progress --shard "$SHARD")
nrdm lab image --out "$OUT" "${COMMON[@]}" --set model.gate_source=shared
nrdm lab image --out "$BASE_OUT" "${COMMON[@]}"
for variant in nrdm adaln-zero; do          # shared against per-unit heads, paired by seed (table and plot)
  python "$(dirname "$0")/arm_report.py" --preset digits-flow --variant "$variant" --name gate-sharing \
    --arm "per-unit=$BASE_OUT/results.jsonl" --arm "shared=$OUT/results.jsonl" --out "$OUT"
done
