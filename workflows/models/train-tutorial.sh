#!/usr/bin/env bash
# Train the tutorial models lesion-derm (PH2) and nuclei-fluo (DSB2018) side by side on a 2-core
# CPU, one torch thread each, beside nuclei-he's run (train.sh): about 1 h 45 min each with
# three runs sharing the two cores (see workflows/models/README.md).
# Usage: bash workflows/models/train-tutorial.sh [DATA_DIR] [RUNS_DIR] [--resume]
# Not H&E: the HED stain jitter is off (scale, intensity and blur jitter stay on).
# A run cut short by the end of a session continues from its last finished epoch with --resume
# (same command otherwise; the split, model and sampling options must not change).
set -euo pipefail
data=${1:-../shared/data}
runs=${2:-runs}
mode=${3:---overwrite}
splits=$(dirname "$0")/splits

# lesion-derm sees PH2 shrunk 3x (768 x 560 -> 256 x 187, the tutorials' size), where its 184 px
# receptive field spans the lesion and the skin around it; 364 px crops (180 px output, the
# largest that fits the smallest shrunk image, 184 px) hold a whole image with its mirror.
tilesegment train --images "$data/ph2/PH2 Dataset images" \
  --train-list "$splits/ph2-train.txt" --val-list "$splits/ph2-val.txt" \
  --label-kind binary --class-names background,lesion -o "$runs/lesion-derm" --name lesion-derm \
  --depth 4 --base-channels 16 --downsample 3 --tile-size 364 --batch-size 4 --epochs 14 --steps-per-epoch 75 \
  --optimizer adam --lr 1e-3 --lr-schedule cosine --augment --elastic-sigma 10 --hed-scale 0 --hed-shift 0 \
  --select-metric foreground_dice --seed 0 --threads 1 --no-progress "$mode" &

tilesegment train --images "$data/dsb2018/stage1_train" \
  --train-list "$splits/dsb2018-train.txt" --val-list "$splits/dsb2018-val.txt" \
  --label-kind instances --boundary-class --class-names background,nucleus,boundary -o "$runs/nuclei-fluo" --name nuclei-fluo \
  --depth 4 --base-channels 16 --tile-size 316 --batch-size 4 --epochs 18 --steps-per-epoch 200 \
  --optimizer adam --lr 1e-3 --lr-schedule cosine --augment --elastic-sigma 10 --hed-scale 0 --hed-shift 0 \
  --select-metric aji --seed 0 --threads 1 --no-progress "$mode" &
wait

python "$(dirname "$0")/package.py" "$runs/lesion-derm" lesion-derm --images "$data/ph2/PH2 Dataset images"
python "$(dirname "$0")/package.py" "$runs/nuclei-fluo" nuclei-fluo --images "$data/dsb2018/stage1_train"
