#!/usr/bin/env bash
# Testing on a slurm cluster with srun, as mmdet's tools/slurm_test.sh:
#   [GPUS=8] [GPUS_PER_NODE=8] bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args ...]
# GPUS, GPUS_PER_NODE, CPUS_PER_TASK, SRUN_ARGS, GRES, MASTER_PORT, PYTHON: as in
# tools/slurm_train.sh.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] bash $0 PARTITION JOB_NAME CONFIG CHECKPOINT [test.py args ...]" >&2
  exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
read -r -a srun_args <<< "${SRUN_ARGS:-}"
here=$(cd "$(dirname "$0")" && pwd)
default_python=python
[ -x "$here/../.venv/bin/python" ] && default_python="$here/../.venv/bin/python"
GRES=${GRES-gpu:$GPUS_PER_NODE}
gres=()
[ -n "$GRES" ] && gres=("--gres=$GRES")
PYTHONPATH="$here/..":${PYTHONPATH:-} \
exec srun --partition="$PARTITION" \
    --job-name="$JOB_NAME" \
    "${gres[@]}" \
    --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    "${srun_args[@]}" \
    "${PYTHON:-$default_python}" -u "$here/test.py" "$CONFIG" "$CHECKPOINT" \
    --launcher=slurm "${@:5}"
