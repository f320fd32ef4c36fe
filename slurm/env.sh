# Environment for training jobs on a SLURM cluster: the sbatch script's srun sources it on every node
# just before torchrun. Adapt the module loads / virtualenv line and the NCCL interface to your site.

# --- your site: uncomment / edit ---------------------------------------------------------------
# module load cuda/12.8
# source /path/to/venv/bin/activate

# Triton compiles kernels on first use; a node-local cache avoids NFS lock contention and races.
export TRITON_CACHE_DIR="${TMPDIR:-/tmp}/triton-cache-${USER:-user}-${SLURM_JOB_ID:-local}"
export TORCH_EXTENSIONS_DIR="${TMPDIR:-/tmp}/torch-extensions-${USER:-user}"
# Hugging Face caches on shared storage so every node sees prepared datasets/tokenizers once.
export HF_HOME="${HF_HOME:-$HOME/.cache/huggingface}"
# One OpenMP thread per rank: the data loader workers have their own processes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TOKENIZERS_PARALLELISM=false
# NCCL: fail fast instead of hanging on a dead peer; keep NVLink SHARP/multicast off unless your
# site supports it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
# export NCCL_SOCKET_IFNAME=ib0       # the interface of your fast network
# export NCCL_IB_HCA=mlx5             # InfiniBand adapters
export PYTHONUNBUFFERED=1
