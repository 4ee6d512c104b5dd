#!/usr/bin/env bash
# The whole NASiam pipeline on the full CIFAR-10 training split, as fast as one GPU takes it: a head search, a
# pretraining with the searched heads, and the kNN monitor on the 2k test subset; every speed flag on, offline.
# Prints one JSON object (kNN reached, seconds per stage, images/s). Target on one GPU: under 5 minutes in all.
#
#   bash benchmarks/speedrun.sh                  # one GPU
#   bash benchmarks/speedrun.sh --cpu-smoke      # the same stages at toy sizes on the CPU (checks the script: minutes)
#   bash benchmarks/speedrun.sh --train_file path/to/train.parquet --test_file path/to/test.parquet
#
# Data: --train_file (default ../shared/data/cifar10-full/train.parquet, the source's 50,000 JPEGs) and --test_file
# (default ../shared/data/cifar10/test.parquet, 2,000 labelled images). On a machine that does not see ../shared
# (the GPU machine), copy both files into .speedrun-data/ of the checkout first (ignored by git, carried along):
#     mkdir -p .speedrun-data && cp ../shared/data/cifar10-full/train.parquet .speedrun-data/train.parquet \
#         && cp ../shared/data/cifar10/test.parquet .speedrun-data/test.parquet
# The data layer needs `datasets` (and its dependencies), which the GPU image lacks: download the wheels once into
# .whl/ (see the device tool's README for the pip download line; datasets, dill, xxhash, multiprocess, fsspec,
# pyarrow, pandas if missing) and this script installs them into a private folder when it finds them.
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
TRAIN=""
TEST=""
FRAMEWORK=simclr
SEARCH_EPOCHS=4
PRETRAIN_EPOCHS=30
BATCH=512
OUT=${SPEEDRUN_OUT:-runs/speedrun}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --train_file) TRAIN=$2; shift ;;
    --test_file) TEST=$2; shift ;;
    --framework) FRAMEWORK=$2; shift ;;
    --search_epochs) SEARCH_EPOCHS=$2; shift ;;
    --pretrain_epochs) PRETRAIN_EPOCHS=$2; shift ;;
    --output_dir) OUT=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "speedrun: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

pick() {  # the first existing file among the arguments
  for f in "$@"; do [ -n "$f" ] && [ -f "$f" ] && { echo "$f"; return; }; done
  return 1
}
TRAIN=$(pick "$TRAIN" .speedrun-data/train.parquet ../shared/data/cifar10-full/train.parquet) \
  || { echo "speedrun: no training data: pass --train_file or copy it into .speedrun-data/ (see the header)" >&2; exit 2; }
TEST=$(pick "$TEST" .speedrun-data/test.parquet ../shared/data/cifar10/test.parquet) \
  || { echo "speedrun: no test data: pass --test_file or copy it into .speedrun-data/ (see the header)" >&2; exit 2; }

PYTHON=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels carried to a machine without them (the GPU image has no datasets)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/speedrun-site .whl/*.whl
  export PYTHONPATH=/tmp/speedrun-site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$SMOKE" = 1 ]; then
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --dynamo_backend no)
  SPEED=(--mixed_precision bf16 --channels_last)
  SIZE=(--max_train_samples 256 --max_eval_samples 200)
  SEARCH_EPOCHS=1; PRETRAIN_EPOCHS=1; BATCH=32
else
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes 1 --num_machines 1 --dynamo_backend no)
  SPEED=(--mixed_precision bf16 --channels_last --augmentation_device accelerator --dataloader_num_workers 8)
  SIZE=()
fi
COMMON=(--train_file "$TRAIN" --validation_file "$TEST" --image_size 32 --per_device_train_batch_size "$BATCH"
        --seed 0 --overwrite_output_dir --checkpointing_steps no --logging_steps 50 "${SPEED[@]}" "${SIZE[@]}")
mkdir -p "$OUT"

now() { "$PYTHON" -c 'import time; print(time.time())'; }
t0=$(now)
"${LAUNCH[@]}" training/search.py "${COMMON[@]}" --framework "$FRAMEWORK" --output_dir "$OUT/search" \
  --num_train_epochs "$SEARCH_EPOCHS" --hessian_every 0 > "$OUT/search.log" 2>&1 \
  || { tail -20 "$OUT/search.log" >&2; exit 1; }
t1=$(now)
"${LAUNCH[@]}" training/pretrain.py "${COMMON[@]}" --genotype "$OUT/search" --output_dir "$OUT/model" \
  --num_train_epochs "$PRETRAIN_EPOCHS" --knn_every "$PRETRAIN_EPOCHS" > "$OUT/pretrain.log" 2>&1 \
  || { tail -20 "$OUT/pretrain.log" >&2; exit 1; }
t2=$(now)

"$PYTHON" - "$OUT" "$t0" "$t1" "$t2" "$SMOKE" "$FRAMEWORK" "$SEARCH_EPOCHS" "$PRETRAIN_EPOCHS" "$BATCH" <<'EOF'
import json, sys
from pathlib import Path
out, t0, t1, t2 = Path(sys.argv[1]), *map(float, sys.argv[2:5])
smoke, framework, search_epochs, pretrain_epochs, batch = sys.argv[5] == "1", sys.argv[6], *map(int, sys.argv[7:10])
search = json.loads((out / "search" / "search_history.json").read_text())
history = json.loads((out / "model" / "training_history.json").read_text())
epochs = history["epochs"]
knn = [e["knn_top1"] for e in epochs if e.get("knn_top1") is not None]
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception:  # pragma: no cover
    device = "unknown"
print(json.dumps({
    "mode": "cpu-smoke" if smoke else "gpu", "device": device, "framework": framework,
    "genotype": search["genotype"], "search_epochs": search_epochs, "pretrain_epochs": pretrain_epochs,
    "per_device_batch": batch, "knn_top1": knn[-1] if knn else None, "knn_target": 85.0,
    "seconds": {"search": round(t1 - t0, 1), "pretrain_and_knn": round(t2 - t1, 1), "total": round(t2 - t0, 1)},
    "pretrain_images_per_second": round(max(e["images_per_second"] for e in epochs), 1),
    "final_loss": epochs[-1]["loss"],
}, indent=2))
EOF
