#!/usr/bin/env bash
# Train a resjax experiment on a Cloud TPU VM or pod slice, from your own machine.
#
# What it does, in order:
#   1. packs this checkout as it is on disk (tracked files and untracked ones git does not ignore,
#      so an experiment edited but not committed runs as edited) into a tarball;
#   2. creates the TPU VM (gcloud compute tpus tpu-vm create), or reuses it when one of that name
#      is READY, or deletes and recreates it when it was PREEMPTED;
#   3. copies the tarball to every worker and installs it there (--worker=all): Python 3.12 and a
#      venv made by uv, then jax[tpu] and resjax (editable) into it. A tarball rather than a git
#      URL, so the VM runs exactly the code you have and needs no access to your repository;
#   4. runs `python -m resjax.main --config ... --workdir gs://... --multihost` on all workers at
#      once (one process per host; jax.distributed.initialize() finds the slice by itself);
#   5. copies results.md, figure.png, config.json and each run's metrics.jsonl / summary.json / tb
#      from the workdir to --results (checkpoints stay in GCS);
#   6. deletes the VM, also when the run fails or you press Ctrl-C, unless --keep.
#
# Example (ResNet-v2 Figure 2, one row at paper scale, on a spot v4-8):
#   launch/tpu_vm.sh --zone us-central2-b --accelerator v4-8 --spot --retry 5 \
#     --config 'experiments/resnetv2_fig2.py:scale=paper,run=identity' \
#     --workdir gs://MY_BUCKET/resjax/fig2_identity --config.optim.lr=0.05
#   Add --dry-run to print every command instead of running it. Arguments after `--` are passed
#   to resjax.main unchanged (e.g. `-- --mode=describe`).
#
# What it costs: a TPU is billed per chip-hour for as long as it is READY, training or idle, from
# create to delete. v4-N and v5p-N have N/2 chips, v5litepod-N and v6e-N have N; a v4-8 (4 chips)
# at the on-demand list price of about $3.2 a chip-hour is about $13 an hour, about $150 for a
# night left running by mistake; --spot/--preemptible cost a fraction of that but can be stopped at
# any time. Check the current price list for your zone. With --keep the VM goes on billing until
# you delete it (the command is printed at the end). The checkpoints in the GCS workdir cost
# ordinary storage rates until you delete them.
#
# How resume works: every step's state lives in the GCS workdir (orbax checkpoints, metrics, the
# summary of each finished run), never on the VM. A trainer that gets SIGTERM saves a checkpoint
# and exits 143. After a preemption (VM PREEMPTED or gone, or a worker exiting 143) or a lost
# connection, running the same command again recreates the VM and resumes from the workdir:
# finished runs are skipped, interrupted ones continue from their last checkpoint. --retry N does
# this by itself up to N times. Exit status: 0 done, 2 a usage or experiment error (nothing is
# retried), 143 preempted with no retries left (rerun to resume), anything else a failure.
#
# Needs: gcloud (authenticated, TPU API enabled), git and tar here; the VM's service account
# needs write access to the workdir's bucket.
#
# Options:
#   --config FILE[:ARGS]     experiment file inside this checkout (required)
#   --workdir gs://...       where checkpoints, logs and results go (required)
#   --zone ZONE              TPU zone, e.g. us-central2-b (required)
#   --accelerator TYPE       e.g. v4-8, v5litepod-16, v5p-8, v6e-8 (required)
#   --version VERSION        TPU software version (default: the one the TPU docs name for the type:
#                            tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5-lite for v5e,
#                            v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
#   --project PROJECT        Google Cloud project (default: gcloud's configured one)
#   --name NAME              VM name (default: resjax-<last part of the workdir>)
#   --spot | --preemptible   cheaper capacity that can be taken back
#   --retry N                after a preemption or lost connection, recreate and resume up to N
#                            times (default 0)
#   --results DIR            local folder for the copied results (default runs/<workdir name>)
#   --keep                   do not delete the VM at the end
#   --dry-run                print the commands, run nothing
#   --config.KEY=VALUE       passed to resjax.main unchanged (any number)
#   -h, --help               this text

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$REPO/launch/common.sh"
# Where the code and its environment live on every worker.
readonly REMOTE_TARBALL=/tmp/resjax-src.tar.gz
readonly REMOTE_PYTHON=3.12

# Prints a command (to stdout in a dry run, else to stderr as a log line) and runs it unless dry.
run() {
  if [[ $dry_run == 1 ]]; then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# A line that says what a dry run cannot know in advance; pasted into a shell it does nothing.
note() {
  if [[ $dry_run == 1 ]]; then
    echo "# $*"
  else
    echo "tpu_vm.sh: $*" >&2
  fi
}

# ---------------------------------------------------------------- flags
config="" workdir="" zone="" accelerator="" version="" project="" name="" results=""
spot=0 preemptible=0 keep=0 dry_run=0 retry=0
overrides=()

while [[ $# -gt 0 ]]; do
  case $1 in
    --config|--workdir|--zone|--accelerator|--version|--project|--name|--results|--retry)
      need_value "$@"
      case $1 in
        --config) config=$2 ;;
        --workdir) workdir=$2 ;;
        --zone) zone=$2 ;;
        --accelerator) accelerator=$2 ;;
        --version) version=$2 ;;
        --project) project=$2 ;;
        --name) name=$2 ;;
        --results) results=$2 ;;
        --retry) retry=$2 ;;
      esac
      shift 2 ;;
    --config=*|--workdir=*|--zone=*|--accelerator=*|--version=*|--project=*|--name=*|\
    --results=*|--retry=*)
      set -- "${1%%=*}" "${1#*=}" "${@:2}"
      continue ;;
    --spot) spot=1; shift ;;
    --preemptible) preemptible=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --config.*=*) overrides+=("$1"); shift ;;
    --config.*) die_usage "write $1=VALUE as one argument" ;;
    --) shift; overrides+=("$@"); break ;;
    *) die_usage "unknown option $1 (see --help)" ;;
  esac
done

[[ -n $config ]] || die_usage "missing --config experiments/FILE.py[:args]"
[[ -n $workdir ]] || die_usage "missing --workdir gs://BUCKET/PATH"
[[ $workdir == gs://?* ]] \
  || die_usage "--workdir must be a gs:// path: the workers cannot see this machine's disk"
[[ -n $zone ]] || die_usage "missing --zone (e.g. us-central2-b for v4, us-west4-a for v5e)"
[[ -n $accelerator ]] || die_usage "missing --accelerator (e.g. v4-8, v5litepod-16)"
[[ $spot == 1 && $preemptible == 1 ]] \
  && die_usage "--spot and --preemptible exclude each other: pick one"
[[ $retry =~ ^[0-9]+$ ]] || die_usage "--retry takes a whole number, not $retry"

# The experiment file must be inside this checkout: only the checkout travels to the VM.
config_file=${config%%:*}
config_args=""
if [[ $config == *:* ]]; then config_args=:${config#*:}; fi
[[ -f $config_file ]] || die_usage "no experiment file $config_file: check the --config path"
config_abs="$(cd "$(dirname "$config_file")" && pwd)/$(basename "$config_file")"
[[ $config_abs == "$REPO"/* ]] \
  || die_usage "the experiment file must be inside $REPO, which is what the VM gets"
remote_config=${config_abs#"$REPO"/}$config_args

workdir=${workdir%/}
run_name=$(basename "${workdir#gs://}")
if [[ -z $version ]]; then
  case $accelerator in
    v2-*|v3-*|v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-*|v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die_usage "no default --version for accelerator $accelerator: pass --version" ;;
  esac
fi
if [[ -z $name ]]; then
  # TPU names: lowercase letters, digits and hyphens, starting with a letter, at most 63 long.
  name=$(printf 'resjax-%s' "$run_name" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | cut -c1-63)
  while [[ $name == *- ]]; do name=${name%-}; done
fi
[[ $name =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
  || die_usage "bad --name $name: use lowercase letters, digits and hyphens, at most 63"
results=${results:-runs/$run_name}
tarball=${TMPDIR:-/tmp}/$name.tar.gz

# ---------------------------------------------------------------- the commands
# gcloud flags every TPU command shares.
where=(--zone="$zone")
[[ -n $project ]] && where+=(--project="$project")

create_cmd=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
            --accelerator-type="$accelerator" --version="$version")
[[ $spot == 1 ]] && create_cmd+=(--spot)
[[ $preemptible == 1 ]] && create_cmd+=(--preemptible)
delete_cmd=(gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet)
ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all)

# Run on each worker by its login shell. uv brings its own Python: the TPU images ship 3.10 and
# jax needs 3.11 or newer (--break-system-packages only where the image's pip insists on it).
# The checkout is unpacked afresh each time, so a rerun installs the code as it is now; the venv
# is kept when the VM is reused.
install_script="set -e; python3 -m pip install --user --quiet --upgrade uv \
|| python3 -m pip install --user --quiet --upgrade --break-system-packages uv; \
[ -x ~/resjax-venv/bin/python ] || ~/.local/bin/uv venv --quiet --python $REMOTE_PYTHON ~/resjax-venv; \
rm -rf ~/resjax; mkdir -p ~/resjax; tar -xzf $REMOTE_TARBALL -C ~/resjax; \
~/.local/bin/uv pip install --quiet --python ~/resjax-venv/bin/python 'jax[tpu]' -e ~/resjax"

resjax_args=(-m resjax.main --config "$remote_config" --workdir "$workdir")
resjax_args+=(${overrides[@]+"${overrides[@]}"} --multihost)
# The marker line lets this script tell each worker's exit status apart from ssh's own.
run_script="cd ~/resjax && ~/resjax-venv/bin/python $(quote_all "${resjax_args[@]}"); \
rc=\$?; echo \"resjax-exit=\$rc on \$(hostname)\"; exit \$rc"

vm_state() {
  gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' 2>/dev/null \
    || echo ABSENT
}

# Packs the files git lists (a tracked file deleted but not `git rm`-ed makes tar fail: rm it).
pack_checkout() {
  if [[ $dry_run == 1 ]]; then
    echo "$(quote_all git -C "$REPO" ls-files -z --cached --others --exclude-standard) |" \
         "$(quote_all tar -C "$REPO" --null -T - -czf "$tarball")"
  else
    echo "+ packing $REPO into $tarball" >&2
    git -C "$REPO" ls-files -z --cached --others --exclude-standard \
      | tar -C "$REPO" --null -T - -czf "$tarball"
  fi
}

# Makes sure a READY VM of this name exists: creates it, or replaces a preempted one. Returns 1
# when the create fails (no capacity for a spot slice is the usual reason).
ensure_vm() {
  if [[ $dry_run == 1 ]]; then
    note "if $name is already READY the create is skipped; if it is PREEMPTED it is deleted first"
    run "${create_cmd[@]}"
    return 0
  fi
  local state
  state=$(vm_state)
  case $state in
    READY) note "$name is READY: reusing it" ;;
    ABSENT) run "${create_cmd[@]}" || return 1 ;;
    PREEMPTED|TERMINATED|STOPPED)
      note "$name is $state: deleting it and creating it again"
      run "${delete_cmd[@]}" || return 1
      run "${create_cmd[@]}" || return 1 ;;
    *) note "$name is $state; wait until it is READY or delete it, then rerun"
       exit 1 ;;
  esac
  vm_up=1
}

install_workers() {
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$REMOTE_TARBALL" "${where[@]}" --worker=all \
    || return 1
  run "${ssh_all[@]}" --command="$install_script"
}

# Runs the experiment on all workers and sets `outcome` to ok, user_error, preempted,
# disconnected or failed (with `run_rc`).
run_workers() {
  if [[ $dry_run == 1 ]]; then
    run "${ssh_all[@]}" --command="$run_script"
    outcome=ok
    return
  fi
  local log statuses
  log=$(mktemp "${TMPDIR:-/tmp}/resjax-run.XXXXXX")
  echo "+ $(quote_all "${ssh_all[@]}" --command="$run_script")" >&2
  set +e
  "${ssh_all[@]}" --command="$run_script" 2>&1 | tee "$log"
  statuses=("${PIPESTATUS[@]}")
  set -e
  run_rc=${statuses[0]}
  local state
  if grep -Eq "resjax-exit=$EXIT_USER_ERROR( |\$)" "$log"; then
    outcome=user_error
  elif [[ $run_rc == 0 ]] && ! grep -Eq "resjax-exit=[1-9]" "$log"; then
    outcome=ok
  else
    state=$(vm_state)
    if [[ $state != READY ]] || grep -Eq "resjax-exit=$EXIT_PREEMPTED( |\$)" "$log"; then
      outcome=preempted
      echo "tpu_vm.sh: preempted (VM $state); the checkpoints are in $workdir" >&2
    elif [[ $run_rc == 255 ]]; then
      outcome=disconnected  # ssh lost the workers while the VM stayed up
      echo "tpu_vm.sh: lost the ssh connection to the workers" >&2
    else
      outcome=failed
    fi
  fi
  rm -f "$log"
}

fetch_results() {
  run mkdir -p "$results"
  run gcloud storage rsync --recursive --exclude='(^|.*/)ckpt/.*' "$workdir" "$results"
}

# Deletes the VM on every way out of a real run (also errors and Ctrl-C), unless --keep.
vm_up=0
cleanup() {
  local rc=$?
  if [[ $vm_up == 1 ]]; then
    if [[ $keep == 1 ]]; then
      echo "tpu_vm.sh: $name is still running and billing; delete it with:" >&2
      echo "  $(quote_all "${delete_cmd[@]}")" >&2
    else
      run "${delete_cmd[@]}" || echo "tpu_vm.sh: deleting $name failed: check the console" >&2
    fi
  fi
  exit "$rc"
}

# ---------------------------------------------------------------- main
[[ $dry_run == 1 ]] || trap cleanup EXIT
pack_checkout
attempt=0
outcome="" run_rc=0
while true; do
  if ! ensure_vm; then
    outcome=no_vm
  elif ! install_workers; then
    # A worker that vanishes mid-install is a preemption; anything else is a failure.
    if [[ $(vm_state) == READY ]]; then outcome=failed run_rc=1; else outcome=preempted; fi
  else
    run_workers
  fi
  case $outcome in
    ok) break ;;
    user_error) exit "$EXIT_USER_ERROR" ;;
    preempted|disconnected|no_vm)
      if (( attempt < retry )); then
        attempt=$((attempt + 1))
        if [[ $outcome == no_vm ]]; then
          note "could not create $name; trying again in 60 s (retry $attempt of $retry)"
          sleep 60
        else
          note "resuming from $workdir (retry $attempt of $retry)"
        fi
        continue
      fi
      if [[ $outcome == no_vm ]]; then
        exit 1
      fi
      note "stopped early; rerun the same command to resume from $workdir"
      exit "$EXIT_PREEMPTED" ;;
    *) exit "$run_rc" ;;
  esac
done
fetch_results
if [[ $dry_run == 1 ]]; then
  if [[ $keep == 1 ]]; then
    note "--keep: $name stays up, billing, until: $(quote_all "${delete_cmd[@]}")"
  else
    run "${delete_cmd[@]}"
  fi
fi
