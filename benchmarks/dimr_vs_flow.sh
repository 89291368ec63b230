#!/usr/bin/env bash
# DiMR-tiny (digits-dimr: a transformer branch on 8x8 patch tokens, a ConvNeXt branch at 16x16) against the
# flow-shaped transformer of equal parameters and patch size (digits-flow), nrdm units, 3 seeds, at equal
# wall-clock (the step counts below follow the measured step-time ratio, benchmarks/preset_throughput.py);
# then the paper's two ablations at seed 0: a ConvNeXt first branch, and adaLN-Zero units. Opt-in; about
# 10-20 CPU-minutes per cell, resumable; SHARD=I/N splits every grid over N processes (docs/dimr.md).
#   SHARD=0/2 bash benchmarks/dimr_vs_flow.sh & SHARD=1/2 bash benchmarks/dimr_vs_flow.sh
set -euo pipefail
OUT=${OUT:-runs/dimr}
SHARD=${SHARD:-0/1}
FLOW_STEPS=${FLOW_STEPS:-1500}
DIMR_STEPS=${DIMR_STEPS:-1000}          # a DiMR step took 1.53x a flow step (2 cores, fp32, batch 64)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--backbones preset --gammas 0 --eval-n 500 --eval-points 4 --no-progress --shard "$SHARD")
# the flow arm is the depth study's digits-flow nrdm cells (the same preset, steps and evaluation):
# with FLOW_OUT pointing at that study's converged grid, finished cells are not trained again
FLOW_OUT=${FLOW_OUT:-runs/depth-study/converged}
nrdm lab image --out "$FLOW_OUT" --preset digits-flow --depths 6 --variants nrdm --seeds 0 1 2 --steps "$FLOW_STEPS" "${COMMON[@]}"
nrdm lab image --out "$OUT/compare" --preset digits-dimr --depths 5 --variants nrdm --seeds 0 1 2 --steps "$DIMR_STEPS" "${COMMON[@]}"
nrdm lab image --out "$OUT/convnext-first" --preset digits-dimr --depths 5 --variants nrdm --seeds 0 \
  --steps "$DIMR_STEPS" --set model.first_branch=convnext "${COMMON[@]}"
nrdm lab image --out "$OUT/adaln-zero" --preset digits-dimr --depths 5 --variants adaln-zero --seeds 0 \
  --steps "$DIMR_STEPS" "${COMMON[@]}"
python "$(dirname "$0")/dimr_report.py" --flow "$FLOW_OUT/results.jsonl" --dimr "$OUT/compare/results.jsonl" \
  --ablation "ConvNeXt first branch=$OUT/convnext-first/results.jsonl" --ablation "adaLN-Zero units=$OUT/adaln-zero/results.jsonl" \
  --out "$OUT"
