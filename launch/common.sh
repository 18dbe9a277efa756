# Sourced by tpu_vm.sh and gpu_slurm.sh: exit codes, usage errors and shell quoting.
# shellcheck shell=bash

readonly EXIT_USER_ERROR=2
readonly EXIT_PREEMPTED=143  # 128 + SIGTERM: a trainer stopped early, rerun to resume

# The running script's header comment, from its second line to the first blank one.
usage() {
  sed -n '2,/^$/{s/^# \{0,1\}//;p;}' "$0"
}

# One line whatever the values it quotes hold: a newline is shown as \n.
die_usage() {
  local message="$*"
  echo "$(basename "$0"): ${message//$'\n'/\\n}" >&2
  exit "$EXIT_USER_ERROR"
}

need_value() {
  [[ $# -ge 2 && -n $2 ]] || die_usage "$1 needs a value (see --help)"
}

# Quotes one word for a POSIX shell: unchanged when it is plainly safe, else in single quotes
# with each ' written as '\''. (A loop, not ${1//...}: bash 3.2, macOS's, treats quotes in a
# substitution's replacement differently.)
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
    return
  fi
  local rest=$1 out="'"
  while [[ $rest == *\'* ]]; do
    out+="${rest%%\'*}'\\''"
    rest=${rest#*\'}
  done
  printf '%s' "$out$rest'"
}

# Quotes every argument and joins them with spaces: a line that can be pasted into a shell.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}
