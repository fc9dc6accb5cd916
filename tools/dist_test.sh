#!/usr/bin/env bash
# Distributed testing with torchrun, as mmdet's tools/dist_test.sh:
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCS [test.py args ...]
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
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
    "$here/test.py" \
    "$CONFIG" \
    "$CHECKPOINT" \
    --launcher pytorch "${@:4}"
