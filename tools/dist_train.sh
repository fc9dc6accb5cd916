#!/usr/bin/env bash
# Distributed training with torchrun, as mmdet's tools/dist_train.sh:
#   bash tools/dist_train.sh CONFIG NUM_PROCS [train.py args ...]
# NNODES, NODE_RANK, PORT, MASTER_ADDR as in mmdet. PYTHON picks the
# interpreter (default: the repo's .venv if present, else python).
# Without CUDA the processes train on CPU with the gloo backend.
set -euo pipefail
CONFIG=$1
GPUS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
here=$(cd "$(dirname "$0")" && pwd)
default_python=python
[ -x "$here/../.venv/bin/python" ] && default_python="$here/../.venv/bin/python"
PYTHONPATH="$here/..":${PYTHONPATH:-} \
exec "${PYTHON:-$default_python}" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --nproc_per_node="$GPUS" \
    --master_port="$PORT" \
    "$here/train.py" \
    "$CONFIG" \
    --launcher pytorch "${@:3}"
