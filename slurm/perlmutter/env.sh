#!/bin/bash
# brainfm job environment for NERSC Perlmutter: the one place to adapt (modules or container,
# Python, scratch paths, NCCL/libfabric). Sourced by every template in this folder.
#
#   BRAINFM_ROOT     repository checkout (default: the directory sbatch was called from)
#   BRAINFM_PYTHON   interpreter with brainfm installed (default: $BRAINFM_ROOT/.venv/bin/python)
#   BRAINFM_SCRATCH  data, runs and studies (default: $SCRATCH/brainfm)
#   BRAINFM_LOCAL=1  skip the Perlmutter modules and network settings (the local test cluster)

: "${BRAINFM_ROOT:=${SLURM_SUBMIT_DIR:-$PWD}}"
if [[ ! -f "$BRAINFM_ROOT/conf/train.yaml" ]]; then
  echo "brainfm: BRAINFM_ROOT=$BRAINFM_ROOT is not a brainfm checkout; submit from the repository root or export BRAINFM_ROOT" >&2
  exit 2
fi
export BRAINFM_ROOT
: "${BRAINFM_PYTHON:=$BRAINFM_ROOT/.venv/bin/python}"
: "${BRAINFM_SCRATCH:=${SCRATCH:-$BRAINFM_ROOT}/brainfm}"
export BRAINFM_PYTHON BRAINFM_SCRATCH

if [[ "${BRAINFM_LOCAL:-0}" != 1 ]]; then
  # Perlmutter GPU nodes: 4x A100, Slingshot-11 (libfabric cxi). Option A (default): the venv built
  # by `make install` on a login node with the cray/cudatoolkit modules loaded. Option B: a container
  # (podman-hpc / shifter): set BRAINFM_PYTHON="podman-hpc run --gpu ... python".
  module load cudatoolkit 2>/dev/null || true
  module load nccl 2>/dev/null || true
  # NCCL over libfabric (aws-ofi-nccl plugin); NERSC's recommended starting point
  export NCCL_NET_GDR_LEVEL=PHB
  export NCCL_CROSS_NIC=1
  export NCCL_SOCKET_IFNAME=hsn
  export FI_CXI_DISABLE_HOST_REGISTER=1
  export FI_MR_CACHE_MONITOR=userfaultfd
  export FI_CXI_DEFAULT_CQ_SIZE=131072
  export HDF5_USE_FILE_LOCKING=FALSE   # Lustre $SCRATCH
fi
# one OpenMP thread pool per rank, sized by the CPUs SLURM gave each task
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
# data, runs and checkpoints on $SCRATCH (Hydra overrides added before the user's own)
BRAINFM_PATH_OVERRIDES=("paths.data_dir=$BRAINFM_SCRATCH/data" "paths.output_dir=$BRAINFM_SCRATCH/outputs")
if [[ -n "${BRAINFM_SPLIT_DIR:-}" ]]; then BRAINFM_PATH_OVERRIDES+=("paths.split_dir=$BRAINFM_SPLIT_DIR"); fi

# `trainer=<default>` unless the arguments choose one
brainfm_trainer_default() {
  local default=$1; shift
  for a in "$@"; do [[ "$a" == trainer=* ]] && return; done
  echo "trainer=$default"
}
