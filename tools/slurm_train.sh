#!/usr/bin/env bash
# Training on a slurm cluster with srun, as mmdet's tools/slurm_train.sh:
#   [GPUS=16] [GPUS_PER_NODE=8] bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args ...]
# GPUS: processes (one per GPU) in all, GPUS_PER_NODE: per node,
# CPUS_PER_TASK: CPU cores per process (dataloader workers), SRUN_ARGS: more
# srun options (e.g. "--quotatype=auto" or "--requeue"), GRES: srun's --gres
# (default gpu:GPUS_PER_NODE; GRES= on a CPU partition: gloo). MASTER_PORT
# (default 29500) if two jobs share a node. PYTHON picks the interpreter (default: the
# repo's .venv if present, else python).
# Every rank runs tools/train.py --launcher slurm; rank 0 alone takes the
# work_dir lock, removes partial checkpoints and checks the dataset. A job
# slurm requeues (preemption, --requeue) resumes from the newest complete
# checkpoint in WORK_DIR. Batch jobs: tools/slurm_train.sbatch.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] bash $0 PARTITION JOB_NAME CONFIG WORK_DIR [train.py args ...]" >&2
  exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
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
    "${PYTHON:-$default_python}" -u "$here/train.py" "$CONFIG" \
    --work-dir="$WORK_DIR" --launcher=slurm "${@:5}"
