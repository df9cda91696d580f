#!/usr/bin/env bash
#SBATCH --job-name=dsig
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# Multi-node training with SLURM: sbatch projects/Distillation/tools/slurm_train.sh CONFIG [KEY VALUE ...]
#   Submit from the repository root (it must be on a filesystem every node sees), or set
#   DSIG_ROOT. Change the #SBATCH lines above, or override them: sbatch --nodes 4 ...
# The batch step starts one task per node (srun); each task runs train_net.py, whose launch
# starts one process per GPU of its node over NCCL (detectron2's launch): node 0 of the job is
# the rendezvous (port DSIG_PORT, default derived from the job id). Runs resume from the last
# checkpoint of OUTPUT_DIR (default ./output/slurm.<config name>), so a requeued job continues.
# The schedule of a config assumes its SOLVER.IMS_PER_BATCH over all GPUs; to keep the
# original's 2 images per GPU on any GPU count, add SOLVER.REFERENCE_WORLD_SIZE 4 (the README's
# "Other GPU counts"). DSIG_DRY_RUN=1 prints each node's command instead of running it.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '10,19p' "$0"; exit 2
fi
# sbatch runs a copy of this file from its spool folder: the repository is where the job was
# submitted from, not where $0 lives.
ROOT=${DSIG_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
SELF=$ROOT/projects/Distillation/tools/slurm_train.sh
if [ ! -f "$ROOT/projects/Distillation/train_net.py" ]; then
  echo "slurm_train.sh: $ROOT is not the dsig repository; submit from its root or set DSIG_ROOT" >&2
  exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "slurm_train.sh: not inside a SLURM job; submit it with sbatch" >&2; exit 2
fi
if [ -z "${DSIG_SLURM_TASK:-}" ]; then  # the batch step: one task per node runs the rest
  exec env DSIG_SLURM_TASK=1 srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash "$SELF" "$@"
fi

CONFIG=$1; shift
if [ $(($# % 2)) -ne 0 ]; then
  echo "slurm_train.sh: options must be KEY VALUE pairs, got an odd count ($#): $*" >&2; exit 2
fi
cd "$ROOT"
[ -f "$CONFIG" ] || { echo "slurm_train.sh: config '$CONFIG' not found in $ROOT" >&2; exit 2; }
PY=${PYTHON:-.venv/bin/python}
NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NODE_RANK=${SLURM_NODEID:-0}
MASTER=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${DSIG_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# GPUs of this node: what SLURM gave the task, else every visible one
GPUS=${SLURM_GPUS_ON_NODE:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
name=$(basename "${CONFIG%.*}")
cmd=("$PY" projects/Distillation/train_net.py --config-file "$CONFIG" --resume
     --num-gpus "$GPUS" --num-machines "$NODES" --machine-rank "$NODE_RANK"
     --dist-url "tcp://$MASTER:$PORT" OUTPUT_DIR "./output/slurm.$name" "$@")
echo "[slurm_train] node $NODE_RANK of $NODES ($(hostname)), $GPUS GPU(s), rendezvous $MASTER:$PORT"
if [ "${DSIG_DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo; exit 0
fi
exec "${cmd[@]}"
