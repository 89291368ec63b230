#!/usr/bin/env bash
# The depth study of docs/depth-study.md, as run on a 2-core CPU (opt-in; hours, resumable).
#   bash benchmarks/depth_study.sh toy     # toy lab: 6 variants x depths 8..1024 x 3 seeds (+ nrdm at gamma 0.01)
#   bash benchmarks/depth_study.sh image   # short budget: digits flow-shaped (6 variants, + nrdm gamma 0.01) and U-shaped
#   bash benchmarks/depth_study.sh unet    # converged: the quickstart U-Net, 2 units per level (7 forms) and 6 (5 forms)
#   bash benchmarks/depth_study.sh flow    # converged: the digits-flow preset, depth 6 (7 forms) and 12 (5 forms)
#   bash benchmarks/depth_study.sh fashion # converged: Fashion-MNIST, nrdm / adaln-zero / resnet, 3 seeds
# Each grid resumes where it stopped. SHARD=I/N runs every N-th cell from the I-th, so N processes
# (started with SHARD=0/N ... SHARD=N-1/N) share one grid and its results file.
set -euo pipefail
OUT=${OUT:-runs/depth-study}
SHARD=${SHARD:-0/1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TOY=(--depths 8 32 128 1024 --seeds 0 1 2 --width 32 --steps 120 --batch-size 128 --eval-n 1000 --sample-steps 20)
IMAGE=(--preset digits --depths 4 16 64 --steps 300 --batch-size 64 --width 64 --patch-size 4 --eval-n 250)
# converged budgets: each preset's own model and recipe, only the variant and depth change
ALL=(nrdm adaln scaled-skip resnet rezero adaln-zero depth-mup)
# at the deep setting the headline pair gets 3 seeds first, the other forms 1 (the CPU budget, docs/depth-study.md)
HEADLINE=(nrdm adaln-zero)
OTHERS=(resnet rezero depth-mup)
CONVERGED=(--backbones preset --gammas 0 --eval-n 500 --eval-points 4 --no-progress --shard "$SHARD")
SEEDS=(--seeds 0 1 2)
case "${1:-all}" in
  toy|all)
    nrdm lab toy --out "$OUT/toy" "${TOY[@]}" --gammas 0 --no-progress --shard "$SHARD"
    nrdm lab toy --out "$OUT/toy" "${TOY[@]}" --gammas 0.01 --variants nrdm resnet --no-progress --shard "$SHARD" ;;&
  image|all)
    nrdm lab image --out "$OUT/image" "${IMAGE[@]}" --gammas 0 --no-progress --shard "$SHARD"
    nrdm lab image --out "$OUT/image" "${IMAGE[@]}" --gammas 0.01 --variants nrdm --no-progress --shard "$SHARD"
    nrdm lab image --out "$OUT/image" "${IMAGE[@]}" --gammas 0 --backbones u-transformer \
      --variants nrdm resnet adaln-zero --no-progress --shard "$SHARD" ;;
  unet)
    nrdm lab image --out "$OUT/converged" --preset digits --depths 2 --variants "${ALL[@]}" --steps 1000 "${CONVERGED[@]}" "${SEEDS[@]}"
    nrdm lab image --out "$OUT/converged" --preset digits --depths 6 --variants "${HEADLINE[@]}" --steps 1000 "${CONVERGED[@]}" "${SEEDS[@]}"
    nrdm lab image --out "$OUT/converged" --preset digits --depths 6 --variants "${OTHERS[@]}" --steps 1000 "${CONVERGED[@]}" --seeds 0 ;;
  flow)
    # the headline forms first (9 cells, ~6 CPU-h), then the other four at depth 6
    nrdm lab image --out "$OUT/converged" --preset digits-flow --depths 6 --variants "${HEADLINE[@]}" resnet --steps 1500 "${CONVERGED[@]}" "${SEEDS[@]}"
    nrdm lab image --out "$OUT/converged" --preset digits-flow --depths 6 --variants "${ALL[@]}" --steps 1500 "${CONVERGED[@]}" "${SEEDS[@]}"
    nrdm lab image --out "$OUT/converged" --preset digits-flow --depths 12 --variants "${HEADLINE[@]}" --steps 1500 "${CONVERGED[@]}" "${SEEDS[@]}"
    nrdm lab image --out "$OUT/converged" --preset digits-flow --depths 12 --variants "${OTHERS[@]}" --steps 1500 "${CONVERGED[@]}" --seeds 0 ;;
  fashion)
    nrdm lab image --out "$OUT/converged" --preset fashion --depths 2 --variants nrdm adaln-zero resnet --steps 3000 \
      --set data.image_size=16 "${CONVERGED[@]}" "${SEEDS[@]}" ;;
  toy|image|all) ;;
  *) echo "usage: $0 toy|image|unet|flow|fashion|all" >&2; exit 2 ;;
esac
