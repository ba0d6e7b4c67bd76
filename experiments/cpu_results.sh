#!/usr/bin/env bash
# CPU-sized Fashion-MNIST results behind README's "Results" table (2-core CPU).
# The quick.py model and recipe with each of the paper's attention encodings, and the small CNN.
# Usage: bash experiments/cpu_results.sh [workdir_root]
set -euo pipefail
root=${1:-runs/cpu}
mkdir -p "$root"
for enc in quadratic generalized learned learned_content; do
  python -m experiments.main --config=experiments/configs/quick.py --workdir="$root/$enc" \
    --config.model.encoding=$enc --config.progress_bar=False
done
python -m experiments.main --config=experiments/configs/fashion_small_cnn.py \
  --workdir="$root/small_cnn" --config.progress_bar=False
python -m experiments.results_table "$root"/quadratic "$root"/generalized "$root"/learned \
  "$root"/learned_content "$root"/small_cnn --out experiments/results/fashion_cpu.json
