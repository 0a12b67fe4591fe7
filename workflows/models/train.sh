#!/usr/bin/env bash
# Reproduce the two shipped models (about 30-40 min each on a 2-core CPU, run side by side).
# Usage: bash workflows/models/train.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
data=${1:-../shared/data}
runs=${2:-runs}

tilesegment train --images "$data/monuseg/images" --labels "$data/monuseg/labels" \
  --label-kind instances --class-names background,nucleus -o "$runs/nuclei-he" --name nuclei-he \
  --depth 4 --base-channels 16 --tile-size 316 --batch-size 4 --epochs 30 --steps-per-epoch 60 \
  --val-fraction 0.17 --seed 0 --mpp 0.25 --threads 1 --loader-workers 1 --no-progress --overwrite &

tilesegment train --images "$data/isbi2012/train-volume.tif" --labels "$data/isbi2012/train-labels.tif" \
  --label-kind binary --class-names membrane,cell -o "$runs/membrane-em" --name membrane-em \
  --depth 4 --base-channels 16 --tile-size 316 --batch-size 4 --epochs 30 --steps-per-epoch 60 \
  --val-fraction 0.2 --select-metric rand_error --seed 0 --mpp 0.004 --threads 1 --loader-workers 1 --no-progress --overwrite &
wait

python workflows/models/package.py "$runs/nuclei-he" nuclei-he --images "$data/monuseg/images" --labels "$data/monuseg/labels"
python workflows/models/package.py "$runs/membrane-em" membrane-em --images "$data/isbi2012/train-volume.tif" --labels "$data/isbi2012/train-labels.tif"
