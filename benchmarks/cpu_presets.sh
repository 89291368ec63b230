#!/usr/bin/env bash
# The README's table of the three CPU presets, measured in one run (opt-in; at most about 50 minutes on an
# idle 2-core machine, 12 of them training, the only part that needs the machine idle). The quickstart
# (`digits`, conv U-Net) trains alone on all cores, then the two transformer presets (`digits-flow`,
# `digits-uvit`) train side by side, one thread each. Each run is then scored at the preset's guidance
# and at guidance 3: domain-network FID, recall and the rest from
# `nrdm eval --n 500 --sampler ddpm --steps 250`, and class accuracy from benchmarks/class_accuracy.py
# (n = 500, the preset's sampler). Run it without OMP_NUM_THREADS set.
#   bash benchmarks/cpu_presets.sh [OUT]                  # OUT: runs/cpu-presets; must not exist
#   SMOKE=1 bash benchmarks/cpu_presets.sh /tmp/presets   # 20 steps, n = 50, 1 classifier epoch: a check
set -euo pipefail
OUT=${1:-runs/cpu-presets}
HERE=$(dirname "$0")
if [[ -e $OUT ]]; then echo "$OUT exists: choose a new OUT so that every figure comes from this run" >&2; exit 1; fi
SET=() N=500 CLASSIFIER=()
if [[ -n ${SMOKE:-} ]]; then SET=(--set train.steps=20) N=50 CLASSIFIER=(--epochs 1); fi

nrdm train digits --out "$OUT/digits" --no-progress "${SET[@]}" > /dev/null
for preset in digits-flow digits-uvit; do
  OMP_NUM_THREADS=1 nrdm train "$preset" --out "$OUT/$preset" --no-progress "${SET[@]}" > /dev/null &
done
wait
for preset in digits digits-flow digits-uvit; do
  for guidance in preset 3; do
    cfg=() tag=$guidance
    [[ $guidance == 3 ]] && cfg=(--cfg 3)
    nrdm eval "$OUT/$preset" --n "$N" --sampler ddpm --steps 250 "${cfg[@]}" \
      --json "$OUT/$preset/eval-$tag.json" > /dev/null
    python "$HERE/class_accuracy.py" "$OUT/$preset" --n "$N" "${cfg[@]}" "${CLASSIFIER[@]}" \
      --json "$OUT/$preset/accuracy-$tag.json" > /dev/null
  done
done

python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("| preset | parameters | steps | training (wall) | steps/s | FID | class accuracy | recall "
      "| at guidance 3: FID / accuracy / recall |")
print("|---|---|---|---|---|---|---|---|---|")
for preset in ("digits", "digits-flow", "digits-uvit"):
    run = out / preset
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    params = next(r["params"] for r in log if r.get("event") == "start")
    last = [r for r in log if "loss" in r][-1]
    minutes, seconds = divmod(round(last["wall_seconds"]), 60)
    speed = last["step"] / last["wall_seconds"]
    figures = {}
    for tag in ("preset", "3"):
        metrics = json.loads((run / f"eval-{tag}.json").read_text())
        metrics = metrics.get("metrics", metrics)
        accuracy = json.loads((run / f"accuracy-{tag}.json").read_text())["class_accuracy"]
        figures[tag] = (metrics["fid"], accuracy, metrics["recall"])
    fid, acc, recall = figures["preset"]
    print(f"| `{preset}` | {params / 1e6:.2f}M | {last['step']:,} | {minutes} min {seconds:02d} s | {speed:.2f} "
          f"| {fid:.2f} | {acc:.3f} | {recall:.2f} | {' / '.join(f'{v:.2f}' for v in figures['3'])} |")
EOF
