#!/usr/bin/env bash
# The two studies that need more compute than a 2-core CPU has, sized for one GPU and a fixed
# wall-clock budget (default 420 s of training, then about a minute of analysis):
#
#  1. the grid of heads with the paper's full-size network (experiments/configs/grid.py:paper_size:
#     6 blocks of 9 Gaussian heads, D = 400, bfloat16, the paper's SGD recipe, Fashion-MNIST at
#     14x14 tokens), trained for as many of its 20 epochs as fit; the grid measures of
#     experiments.grid_formation on the epochs logged;
#  2. the data-efficiency study's full-data points with larger models
#     (experiments/configs/data_scaling.py:large, 7 models x 3 seeds), three runs at a time.
#
# Both share the GPU. Runs resume when the script is run again with the same root. Results go to
# <out>: grid_formation_paper_size.{json,png}, data_scaling_large.{json,png}, and each run's
# config.json / metrics.jsonl / centers.jsonl / summary.json.
#
# Usage: bash experiments/gpu_studies.sh [root=runs/gpu] [out=experiments/results] [seconds=420]
set -uo pipefail
root=${1:-runs/gpu}
out=${2:-experiments/results}
seconds=${3:-420}
mkdir -p "$root" "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU

timeout "$seconds" python -m experiments.main --config=experiments/configs/grid.py:paper_size \
  --workdir="$root/grid_paper_size" --config.progress_bar=False >"$root/grid_paper_size.log" 2>&1 &
grid=$!
timeout "$seconds" python -m experiments.data_scaling \
  --config=experiments/configs/data_scaling.py:large --config.scaling.train_sizes="(-1,)" \
  --workdir="$root/data_scaling_large" --workers=3 --out="$root/data_scaling_large.json" \
  --plot="" >"$root/data_scaling_large.log" 2>&1 &
scaling=$!
wait "$grid"
echo "grid run exit code $? (124: stopped at the time budget)"
wait "$scaling"
echo "data-scaling runs exit code $? (124: stopped at the time budget)"

python -m experiments.grid_formation --workdirs="$root/grid_paper_size" \
  --out="$out/grid_formation_paper_size.json" --plot="$out/grid_formation_paper_size.png"
python -m experiments.data_scaling --config=experiments/configs/data_scaling.py:large \
  --config.scaling.train_sizes="(-1,)" --workdir="$root/data_scaling_large" --aggregate_only \
  --out="$out/data_scaling_large.json" --plot="$out/data_scaling_large.png"

runs="$out/gpu_runs"
for d in "$root/grid_paper_size" "$root"/data_scaling_large/*/n*/s*; do
  [[ -d "$d" ]] || continue
  dest="$runs/${d#"$root"/}"
  mkdir -p "$dest"
  for f in config.json metrics.jsonl centers.jsonl summary.json; do
    [[ -f "$d/$f" ]] && cp "$d/$f" "$dest/"
  done
done
cp "$root"/*.log "$runs/" 2>/dev/null
exit 0
