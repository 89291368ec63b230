#!/usr/bin/env bash
# The training options against the plain loss at equal steps, 3 seeds, on the transformer presets
# (opt-in; 12-15 CPU-minutes per 600-750-step cell on this 2-core machine). Each option is its own lab grid, so each
# has its own summary (FID and class accuracy, mean +- std over seeds) in runs/options/<preset>-<option>/, and at the
# end benchmarks/arm_report.py compares each option with the plain loss seed by seed
# (runs/options/options-<preset>-nrdm.png). The lab trains the plain loss unless --set asks for an option, so the
# plain arm stays plain now that the presets train with Min-SNR-gamma. docs/training-options.md's grids:
#   STEPS=750 EVAL_POINTS=2 PLAIN_OUT=runs/depth-study/converged bash benchmarks/training_options.sh digits-flow
#   STEPS=600 EVAL_POINTS=2 SHARD=0/2 bash benchmarks/training_options.sh digits-uvit & SHARD=1/2 ...  # 2 processes
# The plain arm is the preset's model and recipe with the plain loss, exactly what the depth study's converged
# grid trains for nrdm at the preset's depth (same seeds and evaluation): PLAIN_OUT=runs/depth-study/converged
# reports those finished cells as the plain arm instead of training it. STEPS (default: the preset's) and EVAL_POINTS (4) set a
# shorter budget: with the constant lr, a plain cell's first STEPS steps are exactly a STEPS-step run, so
# longer plain cells still pair at the shared evaluation steps (STEPS=750 EVAL_POINTS=2: 375 and 750).
set -euo pipefail
PRESET=${1:-digits-flow}
OUT=${OUT:-runs/options}
SHARD=${SHARD:-0/1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
depth=$(python -c "from nrdm.config import load_config; print(load_config('$PRESET').model.depth)")
steps=${STEPS:-$(python -c "from nrdm.config import load_config; print(load_config('$PRESET').train.steps)")}
GRID=(--preset "$PRESET" --backbones preset --variants nrdm --depths "$depth" --gammas 0 --seeds 0 1 2
      --steps "$steps" --eval-n 500 --eval-points "${EVAL_POINTS:-4}" --no-progress)
declare -A OPTIONS=(
  [plain]=""
  [min-snr]="diffusion.min_snr_gamma=5"
  [logit-normal]="diffusion.timestep_sampling=logit-normal"
  [cosine]="train.lr_schedule=cosine"
)
# 3 seeds over N processes leave the first process the extra cells of every arm; the k-th arm starts
# its shards at process k instead, so the extra cells go round the processes
shard_index=${SHARD%/*} shard_count=${SHARD#*/} k=0
for name in plain min-snr logit-normal cosine; do
  sets=()
  [[ -n "${OPTIONS[$name]}" ]] && sets=(--set "${OPTIONS[$name]}")
  out="$OUT/$PRESET-$name"
  if [[ $name == plain && -n "${PLAIN_OUT:-}" ]]; then k=$((k + 1)); continue; fi
  nrdm lab image --out "$out" "${GRID[@]}" "${sets[@]}" --shard "$(( (shard_index + k) % shard_count ))/$shard_count"
  k=$((k + 1))
done
# the options against the plain loss, paired by seed (table and plot; on the cells finished so far)
arms=(--arm "plain=${PLAIN_OUT:-$OUT/$PRESET-plain}/results.jsonl")
for name in min-snr logit-normal cosine; do arms+=(--arm "$name=$OUT/$PRESET-$name/results.jsonl"); done
python "$(dirname "$0")/arm_report.py" --preset "$PRESET" --name options "${arms[@]}" --out "$OUT"
