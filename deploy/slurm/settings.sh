# geomgen on Slurm: the one file to edit. Every job script here sources it.
#
# `geomgen slurm submit` copies these scripts into its state dir and sets the
# values marked (submit) in the jobs' environment, which win over the defaults
# below; to submit by hand instead, edit the defaults and run from this folder:
#   sbatch broker.sbatch; sbatch gpu-workers.sbatch; sbatch sdf-workers.sbatch
# Resources (CPUs, GPUs, time, partition) are the #SBATCH lines of each script;
# `submit` sets tasks, GPUs and partition on the sbatch command line.

# How a job finds geomgen on the compute nodes: activate its environment here.
# source /shared/envs/geomgen/bin/activate
# module load cuda/12.4
GEOMGEN_SLURM_CMD=${GEOMGEN_SLURM_CMD:-geomgen}

# Shared folder every node reads: the broker's address (broker.address), the
# CURVE keys (keys/) and the logs (logs/). (submit: --state-dir)
GEOMGEN_SLURM_STATE_DIR=${GEOMGEN_SLURM_STATE_DIR:-$HOME/geomgen-slurm}

# The broker's key folder (geomgen keys init), with the peer keys named below.
# (submit: --keys, default STATE_DIR/keys)
GEOMGEN_SLURM_KEYS=${GEOMGEN_SLURM_KEYS:-$GEOMGEN_SLURM_STATE_DIR/keys}
GEOMGEN_SLURM_GPU_WORKER_KEY=${GEOMGEN_SLURM_GPU_WORKER_KEY:-$GEOMGEN_SLURM_KEYS/gpu-workers/slurm-gpu-worker.key_secret}
GEOMGEN_SLURM_SDF_WORKER_KEY=${GEOMGEN_SLURM_SDF_WORKER_KEY:-$GEOMGEN_SLURM_KEYS/sdf-workers/slurm-sdf-worker.key_secret}
GEOMGEN_SLURM_CLIENT_KEY=${GEOMGEN_SLURM_CLIENT_KEY:-$GEOMGEN_SLURM_KEYS/clients/slurm-client.key_secret}

# The GPU workers' backend: hunyuan3d, sam3d, or a CPU one. (submit: --backend)
GEOMGEN_SLURM_BACKEND=${GEOMGEN_SLURM_BACKEND:-hunyuan3d}

# The broker binds this interface (0.0.0.0: all; CURVE keys guard the ports)
# and this base port and the next three (0: four free ones, picked at start).
GEOMGEN_SLURM_BIND=${GEOMGEN_SLURM_BIND:-0.0.0.0}
GEOMGEN_SLURM_PORT=${GEOMGEN_SLURM_PORT:-0}
# The host name other nodes reach the broker's node by (default: its hostname).
GEOMGEN_SLURM_ADVERTISE=${GEOMGEN_SLURM_ADVERTISE:-}

# Extra options of each role, e.g. "--backend-option mode=turbo" for the GPU
# workers or "--max-jobs 50000" for the broker.
GEOMGEN_SLURM_BROKER_ARGS=${GEOMGEN_SLURM_BROKER_ARGS:-}
GEOMGEN_SLURM_GPU_WORKER_ARGS=${GEOMGEN_SLURM_GPU_WORKER_ARGS:-}
GEOMGEN_SLURM_SDF_WORKER_ARGS=${GEOMGEN_SLURM_SDF_WORKER_ARGS:-}

# Seconds a worker job waits for the broker's address before it gives up.
GEOMGEN_SLURM_ADDRESS_WAIT_S=${GEOMGEN_SLURM_ADDRESS_WAIT_S:-3600}
