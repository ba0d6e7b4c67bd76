#!/usr/bin/env bash
# The quick model (experiments/configs/quick.py) trained for 6 epochs with random crops (padding
# 2) and flips, once per positional encoding, on Fashion-MNIST on the CPU: the "Encodings and
# augmentation, 6 epochs" table of docs/experiments.md. Each run's config.json, metrics.jsonl,
# summary.json and attention maps (plots/attention_maps.png) are copied into
# experiments/results/fashion_cpu/<encoding>/, and the table of the runs is printed (and written
# to <workdir_root>/table.json) by experiments.results_table.
# Expected runtime: 6 to 11 minutes per run on a 2-core CPU.
# Usage: bash experiments/cpu_results.sh [workdir_root]
set -euo pipefail
root=${1:-runs/cpu}
results=experiments/results/fashion_cpu
mkdir -p "$root"
encodings=(quadratic generalized learned)
for enc in "${encodings[@]}"; do
  python -m experiments.main --config=experiments/configs/quick.py --workdir="$root/$enc" \
    --config.model.encoding=$enc --config.num_epochs=6 --config.dataset.crop_padding=2 \
    --config.dataset.flip=True --config.progress_bar=False
  mkdir -p "$results/$enc"
  cp "$root/$enc"/{config.json,metrics.jsonl,summary.json} "$results/$enc/"
  if [[ -f "$root/$enc/plots/attention_maps.png" ]]; then
    cp "$root/$enc/plots/attention_maps.png" "$results/$enc/"
  fi
done
python -m experiments.results_table "${encodings[@]/#/$root/}" --out "$root/table.json"
