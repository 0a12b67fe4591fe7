#!/usr/bin/env bash
# Reproduce the two shipped models (about 30-40 min each on a 2-core CPU, run side by side).
# Usage: bash workflows/models/train.sh [DATA_DIR] [RUNS_DIR]
set -euo pipefail
data=${1:-../shared/data}
runs=${2:-runs}
mode=${3:---overwrite}

# nuclei-he (issue 11): MoNuSeg + TNBC, split by source slide / patient (splits/nuclei-he-*.txt,
# image<TAB>label paths relative to DATA_DIR), three classes (background, interior, boundary)
# whose interiors seed the instances, HED stain / scale / blur / intensity augmentation.
lists=$runs/lists
mkdir -p "$lists"
abs=$(cd "$data" && pwd)
for split in train val; do
  sed "s|^|$abs/|; s|\t|\t$abs/|" "$(dirname "$0")/splits/nuclei-he-$split.txt" > "$lists/nuclei-he-$split.txt"
done
tilesegment train --train-list "$lists/nuclei-he-train.txt" --val-list "$lists/nuclei-he-val.txt" \
  --label-kind instances --boundary-class --class-names background,nucleus,boundary \
  -o "$runs/nuclei-he" --name nuclei-he \
  --depth 4 --base-channels 16 --tile-size 316 --batch-size 4 --epochs 25 --steps-per-epoch 130 \
  --select-metric aji --seed 0 --mpp 0.25 --threads 1 --no-progress "$mode" &

tilesegment train --images "$data/isbi2012/train-volume.tif" --labels "$data/isbi2012/train-labels.tif" \
  --label-kind binary --class-names membrane,cell -o "$runs/membrane-em" --name membrane-em \
  --depth 4 --base-channels 16 --tile-size 316 --batch-size 4 --epochs 30 --steps-per-epoch 60 \
  --val-fraction 0.2 --select-metric rand_error --seed 0 --mpp 0.004 --threads 1 --loader-workers 1 --no-progress "$mode" &
wait

python "$(dirname "$0")/package.py" "$runs/nuclei-he" nuclei-he --val-list "$lists/nuclei-he-val.txt"
python workflows/models/package.py "$runs/membrane-em" membrane-em --images "$data/isbi2012/train-volume.tif" --labels "$data/isbi2012/train-labels.tif"
