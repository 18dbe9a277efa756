#!/usr/bin/env bash
# Submit a resjax experiment to a SLURM GPU cluster, on one or many nodes.
#
# What it does: writes a batch script and hands it to sbatch on its standard input (with
# --dry-run it prints `sbatch <<'RESJAX_JOB'`, the script and the closing line: paste it to submit
# the same job). The job:
#   - asks for NODES nodes with G GPUs each and runs one process per GPU (NODES x G tasks). That is
#     the layout jax.distributed.initialize() reads from SLURM without help: process count and
#     index from SLURM_NTASKS / SLURM_PROCID, the coordinator on the first node at a port derived
#     from the job id, and GPU number SLURM_LOCALID for each process. srun runs with
#     --gpu-bind=none so every task sees all GPUs of its node and picks its own;
#   - creates the venv on first use when it is missing (python3 -m venv, then jax[cuda12] and this
#     checkout, editable), after the --setup line (e.g. `module load python/3.12 cuda/12`);
#   - runs `python -m resjax.main --config ... --workdir ... --multihost` under srun in this
#     checkout, which must be on a filesystem every node sees, as must the workdir;
#   - logs to WORKDIR/slurm-JOBID.out (appended across requeues).
#
# Example (ResNet-v2 Figure 2 at paper scale on 2 nodes x 4 GPUs, 12 hours at a time):
#   launch/gpu_slurm.sh --nodes 2 --gpus-per-node 4 --partition gpu --time 12:00:00 \
#     --account my_lab --config experiments/resnetv2_fig2.py:scale=paper \
#     --workdir /shared/runs/fig2 --config.batch_size=128
#   Add --dry-run to print it instead of submitting. Arguments after `--` are passed to
#   resjax.main unchanged.
#
# What it costs: the allocation is charged (to --account, in GPU-hours: nodes x GPUs x wall time)
# from start to end whether the GPUs are busy or not, and a requeued job pays for its compile and
# data load again. A job ends when training ends, so nothing stays running; a job that waits in
# the queue costs nothing. Cancel with `scancel JOBID`.
#
# How resume works: the job is submitted with --requeue and --signal=TERM@GRACE, so SLURM sends
# SIGTERM to the training processes GRACE seconds (default 120) before the time limit. resjax saves
# a checkpoint to the workdir and exits 143; the job then requeues itself (scontrol requeue, at
# most --max-requeues times) and, when it starts again, resumes from that checkpoint: finished runs
# are skipped, interrupted ones continue. A job preempted by the scheduler is requeued by SLURM
# and resumes the same way. Submitting the same command again also resumes. Exit 2 (a mistake in
# the experiment or its overrides) is never requeued.
#
# Options:
#   --config FILE[:ARGS]     experiment file (required)
#   --workdir DIR            shared directory for checkpoints, logs and results (required)
#   --nodes N                nodes (default 1)
#   --gpus-per-node G        GPUs per node, one process each (default 1)
#   --partition NAME         SLURM partition (default: the cluster's)
#   --time LIMIT             time limit per start, e.g. 12:00:00 (default: the partition's)
#   --account NAME           account to charge (default: yours)
#   --cpus-per-gpu N         CPUs for each process (default: the cluster's)
#   --job-name NAME          (default resjax-<last part of the workdir>)
#   --venv DIR               Python environment on the shared filesystem (default
#                            CHECKOUT/.venv-cuda, apart from the README's CPU-only .venv)
#   --jax SPEC               what the venv installs as jax when it creates it (default jax[cuda12])
#   --setup COMMAND          shell line run first in the job, e.g. 'module load python/3.12'
#   --grace SECONDS          SIGTERM this long before the time limit (default 120)
#   --max-requeues N         stop requeueing after N restarts (default 20)
#   --dry-run                print the commands and the batch script, submit nothing
#   --config.KEY=VALUE       passed to resjax.main unchanged (any number)
#   -h, --help               this text

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$REPO/launch/common.sh"

# Makes a path absolute against the current directory (the nodes do not share our cwd).
absolute() {
  if [[ $1 == /* ]]; then printf '%s' "$1"; else printf '%s/%s' "$PWD" "${1#./}"; fi
}

# ---------------------------------------------------------------- flags
config="" workdir="" partition="" time_limit="" account="" cpus_per_gpu="" job_name=""
venv="" jax_spec="jax[cuda12]" setup="" nodes=1 gpus_per_node=1 grace=120 max_requeues=20
dry_run=0
overrides=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --config|--workdir|--nodes|--gpus-per-node|--partition|--time|--account|--cpus-per-gpu|\
    --job-name|--venv|--jax|--setup|--grace|--max-requeues)
      need_value "$@"
      case $1 in
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --nodes) nodes=$2 ;;
        --gpus-per-node) gpus_per_node=$2 ;;
        --partition) partition=$2 ;;
        --time) time_limit=$2 ;;
        --account) account=$2 ;;
        --cpus-per-gpu) cpus_per_gpu=$2 ;;
        --job-name) job_name=$2 ;;
        --venv) venv=$2 ;;
        --jax) jax_spec=$2 ;;
        --setup) setup=$2 ;;
        --grace) grace=$2 ;;
        --max-requeues) max_requeues=$2 ;;
      esac
      shift 2 ;;
    --config=*|--workdir=*|--nodes=*|--gpus-per-node=*|--partition=*|--time=*|--account=*|\
    --cpus-per-gpu=*|--job-name=*|--venv=*|--jax=*|--setup=*|--grace=*|--max-requeues=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --config.*=*) overrides+=("$1"); shift ;;
    --config.*) die_usage "write $1=VALUE as one argument" ;;
    --) shift; overrides+=("$@"); break ;;
    *) die_usage "unknown option $1 (see --help)" ;;
  esac
done

[[ -n $config ]] || die_usage "missing --config experiments/FILE.py[:args]"
[[ -n $workdir ]] || die_usage "missing --workdir DIR (a directory every node can see)"
[[ $workdir != *://* ]] || die_usage "--workdir must be a shared filesystem path here, not $workdir"
# These go into #SBATCH lines as they are: a newline there would start a line of its own.
[[ $workdir != *$'\n'* ]] || die_usage "--workdir must not contain a newline: $workdir"
[[ -z $partition || $partition =~ ^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$ ]] \
  || die_usage "bad --partition $partition: use a partition name (letters, digits, . _ -;" \
       "a comma between several)"
[[ -z $account || $account =~ ^[A-Za-z0-9_.-]+$ ]] \
  || die_usage "bad --account $account: use an account name (letters, digits, . _ -)"
[[ -z $time_limit || $time_limit =~ ^([0-9]+-)?[0-9]+(:[0-9]+){0,2}$ \
   || $time_limit =~ ^(UNLIMITED|unlimited|INFINITE|infinite)$ ]] \
  || die_usage "bad --time $time_limit: use MINUTES, HH:MM:SS or DAYS-HH:MM:SS, e.g. 12:00:00"
for pair in "--nodes:$nodes" "--gpus-per-node:$gpus_per_node" "--grace:$grace"; do
  [[ ${pair#*:} =~ ^[1-9][0-9]*$ ]] \
    || die_usage "${pair%%:*} takes a positive whole number, not ${pair#*:}"
done
[[ $max_requeues =~ ^[0-9]+$ ]] || die_usage "--max-requeues takes a whole number, not $max_requeues"
[[ -z $cpus_per_gpu || $cpus_per_gpu =~ ^[1-9][0-9]*$ ]] \
  || die_usage "--cpus-per-gpu takes a positive whole number, not $cpus_per_gpu"

config_file=${config%%:*}
config_args=""
if [[ $config == *:* ]]; then config_args=:${config#*:}; fi
[[ -f $config_file ]] || die_usage "no experiment file $config_file: check the --config path"
config="$(absolute "$config_file")$config_args"
workdir=$(absolute "${workdir%/}")
venv=$(absolute "${venv:-$REPO/.venv-cuda}")
if [[ -z $job_name ]]; then
  job_name=resjax-$(basename "$workdir")
  job_name=${job_name//[^A-Za-z0-9_.-]/-}  # a workdir may hold spaces and more; a job name not
fi
[[ $job_name =~ ^[A-Za-z0-9_.-]+$ ]] || die_usage "bad --job-name $job_name: use letters, digits, . _ -"
num_tasks=$((nodes * gpus_per_node))

# ---------------------------------------------------------------- the batch script
resjax_cmd=("$venv/bin/python" -m resjax.main --config "$config" --workdir "$workdir")
resjax_cmd+=(${overrides[@]+"${overrides[@]}"} --multihost)

batch_script() {
  echo "#!/bin/bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks=$num_tasks"
  echo "#SBATCH --ntasks-per-node=$gpus_per_node"
  echo "#SBATCH --gpus-per-node=$gpus_per_node"
  [[ -z $cpus_per_gpu ]] || echo "#SBATCH --cpus-per-task=$cpus_per_gpu"
  [[ -z $partition ]] || echo "#SBATCH --partition=$partition"
  [[ -z $account ]] || echo "#SBATCH --account=$account"
  [[ -z $time_limit ]] || echo "#SBATCH --time=$time_limit"
  echo "#SBATCH --requeue"
  echo "#SBATCH --signal=TERM@$grace"
  echo "#SBATCH --open-mode=append"
  echo "#SBATCH --output=$workdir/slurm-%j.out"
  echo "#SBATCH --chdir=$REPO"
  cat <<EOF
# Written by launch/gpu_slurm.sh. --signal (without B:) sends SIGTERM to the training processes,
# not to this shell: they checkpoint and exit $EXIT_PREEMPTED, and this shell requeues the job.
set -uo pipefail
trap 'echo "resjax: this shell got SIGTERM; waiting for srun to finish checkpointing" >&2' TERM
echo "resjax: job \$SLURM_JOB_ID start \${SLURM_RESTART_COUNT:-0} on \$SLURM_JOB_NODELIST at \$(date)"
EOF
  [[ -z $setup ]] || echo "$setup"
  cat <<EOF
if [ ! -x $(quote "$venv/bin/python") ]; then
  echo "resjax: creating the venv $(quote "$venv")"
  if ! python3 -m venv $(quote "$venv") \\
      || ! $(quote "$venv/bin/pip") install --quiet $(quote "$jax_spec") -e $(quote "$REPO"); then
    echo "resjax: could not create the venv $(quote "$venv"): see --setup and --venv" >&2
    exit 1
  fi
fi
srun --gpu-bind=none $(quote_all "${resjax_cmd[@]}")
rc=\$?
if [ "\$rc" -eq $EXIT_PREEMPTED ] && [ "\${SLURM_RESTART_COUNT:-0}" -lt $max_requeues ]; then
  echo "resjax: stopped before the time limit with a checkpoint saved; requeueing"
  scontrol requeue "\$SLURM_JOB_ID"
fi
exit "\$rc"
EOF
}

# ---------------------------------------------------------------- main
mkdir_cmd=(mkdir -p "$workdir")
if [[ $dry_run == 1 ]]; then
  quote_all "${mkdir_cmd[@]}"
  echo
  echo "sbatch <<'RESJAX_JOB'"
  batch_script
  echo "RESJAX_JOB"
  exit 0
fi
command -v sbatch >/dev/null \
  || die_usage "sbatch not found: run this on a SLURM login node (or use --dry-run)"
echo "+ $(quote_all "${mkdir_cmd[@]}")" >&2
"${mkdir_cmd[@]}"
echo "+ sbatch <<'RESJAX_JOB'" >&2
batch_script >&2
echo "RESJAX_JOB" >&2
batch_script | sbatch
