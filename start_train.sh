#!/usr/bin/env bash
# Usage: ./start_train.sh MODE CONFIG [KEY VALUE ...]
#   MODE: train | eval | debugtrain (one process, one image per batch)
# Datasets of your own: DSIG_COCO_DATASETS="name=ann.json,image_root;..." (COCO json).
# The output directory derives from the config path as in the original DSIG repository:
#   projects/Distillation/configs/X.yaml -> ./output/Distillation.configs.X
# GPUs: NUM_GPUS (environment) or every visible GPU; without a GPU it runs on the CPU.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,7p' "$0"; exit 2
fi
MODE=$1; CONFIG=$2; shift 2
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
name=$(echo "${CONFIG%.*}" | tr '/' '.')
name=${name#projects.}
OUT=./output/$name
if [ -n "${NUM_GPUS:-}" ]; then
  GPUS=$NUM_GPUS
else
  GPUS=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
echo "[start_train] $MODE $CONFIG -> $OUT ($GPUS process(es)) at $(date)"
case "$MODE" in
  train)
    "$PY" projects/Distillation/train_net.py --config-file "$CONFIG" --num-gpus "$GPUS" \
      --resume --dist-url auto OUTPUT_DIR "$OUT" TEST.EVAL_PERIOD 0 "$@" ;;
  eval)
    "$PY" projects/Distillation/train_net.py --config-file "$CONFIG" --num-gpus "$GPUS" \
      --eval-only --dist-url auto OUTPUT_DIR "$OUT.eval" MODEL.WEIGHTS "$OUT/model_final.pth" "$@" ;;
  debugtrain)
    "$PY" projects/Distillation/train_net.py --config-file "$CONFIG" --num-gpus 1 \
      OUTPUT_DIR "$OUT.debug" SOLVER.IMS_PER_BATCH 1 "$@" ;;
  *)
    echo "unknown mode $MODE (train | eval | debugtrain)" >&2; exit 2 ;;
esac
echo "[start_train] finished at $(date)"
