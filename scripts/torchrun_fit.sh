#!/bin/bash
# Multi-node training without SLURM: torchrun starts one process per GPU on each node, Lightning reads
# torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT).
#
# Run the same command on every node (here 2 nodes × 1 GPU), HOST:PORT = a reachable port on the first node:
#   NNODES=2 NPROC=1 RDZV=node0.example:29500 scripts/torchrun_fit.sh experiments/digits/teacher.yaml --run_dir runs/teacher-2x1
#
# The run directory must be on a file system every node sees (checkpoints and metrics.json are written
# by rank 0, every rank reads the config). The generator stage also needs
# --trainer.strategy ddp_find_unused_parameters_true (its two backward passes each use one network).
set -euo pipefail

CONFIG=${1:?usage: NNODES=N NPROC=G RDZV=HOST:PORT scripts/torchrun_fit.sh CONFIG.yaml --run_dir DIR [args...]}
shift
NNODES=${NNODES:-1}
NPROC=${NPROC:-1}
RDZV=${RDZV:-localhost:29500}
STRATEGY=${STRATEGY:-ddp}
export WANDB_MODE=${WANDB_MODE:-offline}

torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV" --rdzv_id "${RDZV_ID:-vitkd}" \
    -m vitkd.fit --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$NPROC" --trainer.strategy "$STRATEGY" \
    "$@"
