#!/bin/bash
# Submit sweep.sbatch as an array with one task per override line of FILE.
#   slurm/perlmutter/submit_sweep.sh FILE [sbatch options --] [Hydra overrides...]
set -euo pipefail
FILE=${1:?"usage: submit_sweep.sh FILE [sbatch options --] [overrides...]"}; shift
N=$(grep -c -v -E '^[[:space:]]*(#|$)' "$FILE" || true)
(( N > 0 )) || { echo "submit_sweep: $FILE has no override lines" >&2; exit 2; }
SBATCH_OPTS=()
if [[ " $* " == *" -- "* ]]; then
  while [[ "$1" != "--" ]]; do SBATCH_OPTS+=("$1"); shift; done; shift
fi
exec sbatch --array=0-$((N - 1)) "${SBATCH_OPTS[@]}" "$(dirname "$0")/sweep.sbatch" "$FILE" "$@"
