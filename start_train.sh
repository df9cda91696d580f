#!/usr/bin/env bash
# Usage: ./start_train.sh MODE CONFIG [KEY VALUE ...]
#        ./start_train.sh predict CONFIG INPUT [KEY VALUE | --OPTION VALUE ...]
#   MODE: train | eval | debugtrain (one process, one image per batch) | check (the config end
#   to end, offline, training nothing: weights, datasets, one iteration; prints the overrides
#   that make it run here) | predict (tools/predict.py on INPUT, an image, a folder or a COCO
#   json, with the run's model_final.pth, of a DSIG run its student: drawn images and a COCO
#   results json in the .predict folder; its options, e.g. --score-threshold 0.3, as pairs)
# CONFIG: a path from the current directory (or from the repository root); the run itself
#   starts in the repository root, where relative paths in KEY VALUE are read.
# Datasets of your own: DSIG_COCO_DATASETS="name=ann.json,image_root;..." (COCO json).
# The output directory derives from the config path as in the original DSIG repository:
#   projects/Distillation/configs/X.yaml -> ./output/Distillation.configs.X (eval: .eval,
#   debugtrain: .debug, predict: .predict; a config outside the repository: ./output/X);
#   OUTPUT_DIR overrides it.
# GPUs: NUM_GPUS (environment) or every visible GPU; without a GPU it runs on the CPU.
# DSIG_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,17p' "$0"; exit 2
fi
MODE=$1; CONFIG=$2; shift 2
# Everything that can be refused is refused before torch is imported or a banner printed.
case "$MODE" in
  train|eval|debugtrain|check|predict) ;;
  *) echo "start_train.sh: unknown mode '$MODE'; use train, eval, debugtrain, check or predict" >&2
     exit 2 ;;
esac
if [ "$MODE" = predict ]; then  # INPUT, read from the caller's directory (the script cds below)
  if [ $# -lt 1 ]; then
    echo "start_train.sh: predict needs an INPUT after the config: an image, a folder of images or a COCO json" >&2
    exit 2
  fi
  INPUT=$1; shift
  if [ ! -e "$INPUT" ]; then
    echo "start_train.sh: predict input '$INPUT' not found (looked in $(pwd))" >&2; exit 2
  fi
  INPUT_ABS=$(cd "$(dirname "$INPUT")" && pwd -P)/$(basename "$INPUT")
fi
if [ $(($# % 2)) -ne 0 ]; then
  echo "start_train.sh: options must be KEY VALUE pairs, got an odd count ($#): $*" >&2; exit 2
fi
ROOT=$(cd "$(dirname "$0")" && pwd -P)
# The config is read from the caller's directory first (the script cds below), then from the
# repository root, as the README's commands give it.
if [ -f "$CONFIG" ]; then
  CONFIG_ABS=$(cd "$(dirname "$CONFIG")" && pwd -P)/$(basename "$CONFIG")
elif [ -f "$ROOT/$CONFIG" ]; then
  CONFIG_ABS=$(cd "$(dirname "$ROOT/$CONFIG")" && pwd -P)/$(basename "$CONFIG")
else
  echo "start_train.sh: config '$CONFIG' not found (looked in $(pwd) and in $ROOT)" >&2; exit 2
fi
cd "$ROOT"
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# Name from the path inside the repository (normalised: no leading ./ or /, no ..), so
# absolute and ./ paths name the same folder as the README's form.
case "$CONFIG_ABS" in
  "$ROOT"/*) rel=${CONFIG_ABS#"$ROOT"/} ;;
  *) rel=$(basename "$CONFIG_ABS") ;;
esac
name=$(echo "${rel%.*}" | tr '/' '.')
name=${name#projects.}
OUT=./output/$name
case "$MODE" in
  train) RUN_DIR=$OUT ;;
  eval) RUN_DIR=$OUT.eval ;;
  debugtrain) RUN_DIR=$OUT.debug ;;
  check) RUN_DIR= ;;
  predict) RUN_DIR=$OUT.predict ;;
esac
WEIGHTS=$OUT/model_final.pth
# detectron2 applies KEY VALUE pairs in order: the last OUTPUT_DIR / MODEL.WEIGHTS given wins.
args=("$@")
for ((i = 0; i < ${#args[@]}; i += 2)); do
  case "${args[i]}" in
    OUTPUT_DIR|--output) RUN_DIR=${args[i + 1]} ;;
    MODEL.WEIGHTS|--weights) WEIGHTS=${args[i + 1]} ;;
  esac
done
if [ "$MODE" = debugtrain ] || [ "$MODE" = predict ]; then
  GPUS=1
elif [ -n "${NUM_GPUS:-}" ]; then
  GPUS=$NUM_GPUS
else
  GPUS=$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
TRAIN=projects/Distillation/train_net.py
case "$MODE" in
  train)
    cmd=("$PY" "$TRAIN" --config-file "$CONFIG_ABS" --num-gpus "$GPUS" --resume --dist-url auto
         OUTPUT_DIR "$OUT" TEST.EVAL_PERIOD 0 "$@") ;;
  eval)
    cmd=("$PY" "$TRAIN" --config-file "$CONFIG_ABS" --num-gpus "$GPUS" --eval-only
         --dist-url auto OUTPUT_DIR "$OUT.eval" MODEL.WEIGHTS "$OUT/model_final.pth" "$@") ;;
  debugtrain)
    cmd=("$PY" "$TRAIN" --config-file "$CONFIG_ABS" --num-gpus 1
         OUTPUT_DIR "$OUT.debug" SOLVER.IMS_PER_BATCH 1 "$@") ;;
  check)  # the batch is checked against the processes `train` would start
    cmd=("$PY" "$TRAIN" --config-file "$CONFIG_ABS" --check --num-gpus "$GPUS" "$@") ;;
  predict)  # one process; the GPU when there is one
    cmd=("$PY" projects/Distillation/tools/predict.py "$INPUT_ABS" --config-file "$CONFIG_ABS"
         --weights "$WEIGHTS" --output "$RUN_DIR" "$@") ;;
esac
where() {  # a path as the run reads it: relative ones from the repository root
  case "$1" in /*) echo "$1" ;; *) echo "$ROOT/${1#./}" ;; esac
}
banner="[start_train] $MODE $CONFIG -> $(where "$RUN_DIR")"
[ "$MODE" = eval ] && banner="$banner (weights $(where "$WEIGHTS"))"
banner="$banner ($GPUS process(es))"
[ "$MODE" = predict ] && banner="[start_train] predict $CONFIG on $INPUT -> $(where "$RUN_DIR") \
(weights $(where "$WEIGHTS"))"
[ "$MODE" = check ] && banner="[start_train] check $CONFIG: trains nothing, downloads nothing (the \
batch is checked for $GPUS process(es))"
echo "$banner at $(date)"
if [ "${DSIG_DRY_RUN:-0}" = 1 ]; then
  echo "[start_train] dry run, in $ROOT:"; printf '%q ' "${cmd[@]}"; echo; exit 0
fi
status=0
"${cmd[@]}" || status=$?
echo "[start_train] finished at $(date)$([ $status = 0 ] || echo " (exit status $status)")"
exit $status
