#!/usr/bin/env bash
# The first check of brainfm on a GPU machine that has no network (the workplace's device machine: its own
# python3 with torch + CUDA, Lightning, torchmetrics, einops, h5py, ...; no hydra-core or omegaconf).
#
#   scripts/gpu_check.sh --prepare       HERE, with network (`make gpu-wheels`): build brainfm's wheel and fetch the
#                                        pure-Python packages the GPU image lacks into $GPU_CHECK_WHEELS (.gpu-wheels/,
#                                        git-ignored), with the SwiFT ver7 parity fixture; prints its size and contents
#   scripts/gpu_check.sh                 THERE (`make gpu-check`): install brainfm from that folder beside the image's
#                                        torch (pip --no-index --no-deps: nothing fetched, torch never installed),
#                                        report the torch features brainfm uses, run `pytest -m cuda tests/test_cuda.py`
#                                        and a short bench-gpu (GPT 202m, Swin4D v9 202m: SDPA / flex / compiled),
#                                        within GPU_CHECK_BUDGET_S (480 s); reports go to $OUT (./gpu-check-out)
#   scripts/gpu_check.sh --dry-run       check the wheel folder and print every command the check would run; run none
#   scripts/gpu_check.sh --install-only  install from the wheel folder and check that brainfm imports from there
#   scripts/gpu_check.sh --list-packages the packages --prepare fetches besides brainfm (one a line)
#
# Environment: GPU_CHECK_WHEELS (.gpu-wheels), OUT (./gpu-check-out), PYTHON (python3; --prepare: .venv/bin/python
# when it exists), GPU_CHECK_SITE (where the wheels are installed; default a new temporary folder, which must not
# exist yet), GPU_CHECK_BUDGET_S (480), GPU_CHECK_ALLOW_CPU=1 (run the whole check without a GPU: the cuda tests
# with BRAINFM_CUDA_TESTS_ON_CPU=1 and the benchmark's CPU sizes; for developing this script).
# Exit status: 0 all passed, 1 a phase failed or ran out of time (summary.md says which), 2 bad input or setup.
set -uo pipefail

# What the CUDA tests and bench-gpu import that the GPU image lacks (tests/test_gpu_check.py checks this list against
# the image's package list with an import blocker): Hydra composes the configs, OmegaConf holds them, and OmegaConf's
# grammar needs the ANTLR runtime (an sdist only on PyPI: built into a pure-Python wheel here); brainfm.training
# (the Lightning test) imports the data layer, whose orientation module imports nibabel at its top. MONAI, captum,
# webdataset, deepspeed and optuna are left out: nothing on that path imports them.
GPU_WHEEL_PACKAGES=(hydra-core omegaconf antlr4-python3-runtime nibabel)
# never installed from the wheel folder: the image's own torch / CUDA stack is used as it is
NEVER_INSTALLED='^(torch|torchvision|torchaudio|triton|nvidia_[a-z0-9_]+|pytorch_triton[a-z0-9_]*)-'
MAX_FOLDER_BYTES=$((64 * 1024 * 1024))  # what the device tool carries besides the working tree

# relative paths in the environment are taken from where the script was started; then it works in the repository
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WHEELS=$(absolute "${GPU_CHECK_WHEELS:-$REPO/.gpu-wheels}")
OUT=$(absolute "${OUT:-$REPO/gpu-check-out}")
[ -z "${GPU_CHECK_SITE:-}" ] || GPU_CHECK_SITE=$(absolute "$GPU_CHECK_SITE")
cd "$REPO" || exit 2
SHOWN=${WHEELS#"$REPO"/}  # the folder as the device tool's carry names it (relative to the repository)
MODE=check

die() { echo "gpu_check: $*" >&2; exit 2; }

for arg in "$@"; do
  case "$arg" in
    --prepare) MODE=prepare ;;
    --dry-run) MODE=dry-run ;;
    --install-only) MODE=install-only ;;
    --list-packages) printf '%s\n' "${GPU_WHEEL_PACKAGES[@]}"; exit 0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$arg' (one of --prepare, --dry-run, --install-only, --list-packages, --help)" ;;
  esac
done

quoted() { printf '%q ' "$@"; }
human() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# check_folder DIR: the wheel folder holds pure-Python wheels only, exactly one of them brainfm's, none of torch's
check_folder() {
  local dir=$1 whl name n_brainfm=0
  [ -d "$dir" ] || die "no wheel folder at $dir: prepare it where there is network with \`make gpu-wheels\` (scripts/gpu_check.sh --prepare), then carry it (the device tool's carry: [\"${dir#"$REPO"/}\"])"
  shopt -s nullglob
  local all=("$dir"/*.whl)
  shopt -u nullglob
  [ ${#all[@]} -gt 0 ] || die "$dir holds no wheels: run \`make gpu-wheels\`"
  for whl in "${all[@]}"; do
    name=$(basename "$whl")
    if [[ "$name" =~ $NEVER_INSTALLED ]]; then
      die "$dir/$name: the GPU machine's own torch/CUDA stack is used as it is, never a wheel of it; remove it (make gpu-wheels never fetches one)"
    fi
    [[ "$name" =~ -(py3|py2\.py3)-none-any\.whl$ ]] || die "$dir/$name is not a pure-Python wheel (py3-none-any): it may not run on the GPU machine's Python; rebuild the folder with \`make gpu-wheels\`"
    [[ "$name" =~ ^brainfm- ]] && n_brainfm=$((n_brainfm + 1))
  done
  [ "$n_brainfm" -eq 1 ] || die "$dir must hold exactly one brainfm wheel (found $n_brainfm): run \`make gpu-wheels\`"
  WHEEL_FILES=("${all[@]}")
}

# ------------------------------------------------------------------------------------------------- --prepare (here)
if [ "$MODE" = prepare ]; then
  if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
  "$PY" -m pip --version >/dev/null 2>&1 || die "$PY has no pip (set PYTHON=<a python with pip>, or run make install)"
  tmp=$(mktemp -d "${WHEELS%/}.tmp.XXXXXX") || die "cannot create a temporary folder beside $WHEELS"
  build=$(mktemp -d) || die "cannot create a temporary build folder"
  trap 'rm -rf "$tmp" "$build"' EXIT
  pip_q=("$PY" -m pip --disable-pip-version-check -q)
  # this machine's pip configuration adds local mirrors (file:// indexes) that lack some packages; pip notes each
  # miss ("Location ... is ignored") and then takes the package from the registry: those notes are dropped
  exec 3>&2 2> >(grep -v "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory" >&3)

  echo "brainfm's wheel (from this working tree: pyproject.toml, README.md, src/)"
  cp -r pyproject.toml README.md src "$build"/ || die "cannot copy the sources to $build"
  find "$build" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
  "${pip_q[@]}" wheel --no-deps --no-build-isolation -w "$tmp" "$build" || die "building brainfm's wheel failed"

  for pkg in "${GPU_WHEEL_PACKAGES[@]}"; do
    version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg" 2>/dev/null) \
      || die "$pkg is not installed in $PY: the wheels take the versions brainfm is tested with here (run make install)"
    echo "$pkg==$version (the version installed here)"
    "${pip_q[@]}" wheel --no-deps --no-build-isolation -w "$tmp" "$pkg==$version" || die "fetching $pkg==$version failed"
  done
  check_folder "$tmp"

  shared=${BRAINFM_SHARED:-$REPO/../shared}
  if [ -d "$shared/fixtures/swift_v7_parity" ]; then
    mkdir -p "$tmp/fixtures" && cp -r "$shared/fixtures/swift_v7_parity" "$tmp/fixtures/" && chmod -R u+w "$tmp/fixtures" \
      || die "cannot copy the SwiFT parity fixture"
    echo "fixtures/swift_v7_parity (from $shared/fixtures; the CUDA parity test reads it there)"
  else
    echo "WARNING: no SwiFT parity fixture at $shared/fixtures/swift_v7_parity (set BRAINFM_SHARED): its CUDA test will skip" >&2
  fi
  (cd "$tmp" && find . -type f ! -name MANIFEST.txt -print0 | sort -z | xargs -0 sha256sum) > "$tmp/MANIFEST.txt"
  size=$(du -sb "$tmp" | cut -f1)
  if [ "$size" -gt "$MAX_FOLDER_BYTES" ]; then
    die "the folder would be $(human "$size"), over the 64 MiB the device tool carries; nothing was replaced"
  fi
  rm -rf "$WHEELS" && mv "$tmp" "$WHEELS" || die "cannot move the new folder to $WHEELS"
  echo
  echo "$SHOWN: $(human "$size") in all (limit 64 MiB; the working tree travels beside it)"
  (cd "$WHEELS" && for f in *.whl; do printf '  %-70s %s\n' "$f" "$(human "$(stat -c %s "$f")")"; done)
  [ -d "$WHEELS/fixtures" ] && printf '  %-70s %s\n' "fixtures/swift_v7_parity/" "$(human "$(du -sb "$WHEELS/fixtures" | cut -f1)")"
  echo "Carry it with the device tool (carry: [\"$SHOWN\"]) and run \`make gpu-check\` there."
  exit 0
fi

# ------------------------------------------------------------------------------------- install / check (there)
PY=${PYTHON:-python3}
check_folder "$WHEELS"
BUDGET=${GPU_CHECK_BUDGET_S:-480}
[[ "$BUDGET" =~ ^[0-9]+$ ]] || die "GPU_CHECK_BUDGET_S=$BUDGET is not a number of seconds"
if [ "$MODE" != dry-run ]; then
  "$PY" -c "import torch" 2>/dev/null || die "$PY cannot import torch: run this with the GPU machine's python (PYTHON=...)"
  if [ "$MODE" = check ] && [ -z "${GPU_CHECK_ALLOW_CPU:-}" ]; then
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
      || die "no CUDA device visible to $PY (torch.cuda.is_available() is False): run this on the GPU machine; here, --dry-run shows what it would do"
  fi
fi
OWN_SITE=
if [ -n "${GPU_CHECK_SITE:-}" ]; then
  SITE=$GPU_CHECK_SITE
  [ "$MODE" = dry-run ] || [ ! -e "$SITE" ] || die "GPU_CHECK_SITE=$SITE exists already: name a new folder (the install must not mix with an older one)"
elif [ "$MODE" = dry-run ]; then
  SITE='<new temporary folder>/site'  # printed only
else
  OWN_SITE=$(mktemp -d) || die "cannot create a temporary folder"
  SITE=$OWN_SITE/site
  # the check removes its install at the end; --install-only keeps it (it says where)
  [ "$MODE" = check ] && trap 'rm -rf "$OWN_SITE"' EXIT
fi

# pip: no index, no dependencies, no pip configuration of the machine (files or PIP_* variables: find-links,
# constraints): only these files
mapfile -t PIP_VARS < <(env | sed -n 's/^\(PIP_[A-Za-z0-9_]*\)=.*/-u\n\1/p')
INSTALL=(env "${PIP_VARS[@]}" PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir
         --disable-pip-version-check --target "$SITE" "${WHEEL_FILES[@]}")
PYTEST=("$PY" -m pytest -p no:cacheprovider -m cuda tests/test_cuda.py -ra --durations=15 --junitxml="$OUT/pytest.xml")
BENCH_COMMON=(--sizes 202m --steps 3 --warmup 1 --no-families)
BENCH_GPT=("$PY" scripts/bench_gpu.py --only gpt --max-batch 256 "${BENCH_COMMON[@]}")
BENCH_SWIN=("$PY" scripts/bench_gpu.py --only swin4d_v9 --max-batch 16 "${BENCH_COMMON[@]}")
export_env() {
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" BRAINFM_ROOT="$REPO" BRAINFM_CONFIG_DIR="$REPO/conf" PYTHONUNBUFFERED=1
  # the parity fixture travels in the wheel folder (the ../shared beside a checkout does not)
  if [ -d "$WHEELS/fixtures/swift_v7_parity" ]; then export BRAINFM_SHARED=$WHEELS; fi
}

if [ "$MODE" = dry-run ]; then
  echo "wheel folder $WHEELS: ${#WHEEL_FILES[@]} pure-Python wheels, none of torch"
  echo "install: $(quoted "${INSTALL[@]}")"
  echo "environment: PYTHONPATH=$SITE BRAINFM_ROOT=$REPO BRAINFM_CONFIG_DIR=$REPO/conf" \
       "$([ -d "$WHEELS/fixtures/swift_v7_parity" ] && echo "BRAINFM_SHARED=$WHEELS")"
  echo "features: $PY -m brainfm.bench.torch_features (into summary.md)"
  echo "pytest: $(quoted "${PYTEST[@]}")"
  echo "bench: $(quoted "${BENCH_GPT[@]}")"
  echo "bench: $(quoted "${BENCH_SWIN[@]}")"
  echo "reports: $OUT (summary.md, pytest.txt, pytest.xml, bench_gpu.md, gpu_check.log)"
  exit 0
fi

install() {
  echo "+ $(quoted "${INSTALL[@]}")"
  "${INSTALL[@]}" || return 1
  export_env
  # brainfm from the wheel just installed, torch from the image (never from $SITE)
  "$PY" - "$SITE" <<'EOF' || return 1
import os, sys
import brainfm, torch
site = os.path.realpath(sys.argv[1])
where = os.path.realpath(brainfm.__file__)
assert where.startswith(site + os.sep), f"brainfm imports from {where}, not from the wheels installed in {site}"
assert not os.path.realpath(torch.__file__).startswith(site + os.sep), "torch was installed from the wheel folder"
assert not os.path.exists(os.path.join(site, "torch")), "torch was installed from the wheel folder"
print(f"brainfm {getattr(brainfm, '__version__', '?')} from {where}; torch {torch.__version__} from {os.path.dirname(torch.__file__)}")
EOF
}

if [ "$MODE" = install-only ]; then
  install || die "installing from $WHEELS failed"
  echo "installed in $SITE"
  exit 0
fi

# ------------------------------------------------------------------------------------------------------- check
mkdir -p "$OUT" || die "cannot create $OUT"
rm -f "$OUT"/{summary.md,pytest.txt,pytest.xml,bench_gpu.md,gpu_check.log}
exec > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
START=$SECONDS
declare -a PHASES=()
status=0
left() { echo $((BUDGET - (SECONDS - START))); }

# run_phase NAME SECONDS LOG CMD...: run CMD for at most SECONDS (SIGINT first, then SIGKILL 20 s later), its output
# to the console (gpu_check.log) and to LOG too; records the outcome in PHASES
run_phase() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  if [ "$limit" -lt 20 ]; then
    PHASES+=("| $name | not run | the budget of ${BUDGET} s was spent |"); status=1; return
  fi
  echo; echo "== $name (at most $limit s)"; echo "+ $(quoted "$@")"
  timeout -s INT -k 20 "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) outcome=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then outcome="stopped after $limit s"; status=1
  elif [ "$rc" -ne 0 ]; then outcome="failed (exit $rc)"; status=1; fi
  PHASES+=("| $name | $outcome | ${took} s |")
}

echo "== install brainfm from $WHEELS into $SITE"
t0=$SECONDS
if install; then PHASES+=("| install | ok | $((SECONDS - t0)) s |")
else PHASES+=("| install | failed | $((SECONDS - t0)) s |"); status=1; fi

features=$(mktemp)
if [ "$status" -eq 0 ]; then
  "$PY" -m brainfm.bench.torch_features --out "$features" || { PHASES+=("| torch features | failed | |"); status=1; }
  [ -n "${GPU_CHECK_ALLOW_CPU:-}" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
    && export BRAINFM_CUDA_TESTS_ON_CPU=1 && echo "no GPU (GPU_CHECK_ALLOW_CPU): the cuda tests run on the CPU"
  # time boxes (of 480 s: ~15 s install and features, pytest <= 270 s, GPT <= 80 s, Swin4D the rest, >= 110 s)
  run_phase "pytest -m cuda" "$(( $(left) - 190 < 270 ? $(left) - 190 : 270 ))" "$OUT/pytest.txt" "${PYTEST[@]}"
  bench_tmp=$(mktemp -d)
  run_phase "bench-gpu gpt (202m on a GPU)" "$(( $(left) - 110 < 80 ? $(left) - 110 : 80 ))" /dev/null \
    "${BENCH_GPT[@]}" --out "$bench_tmp/gpt.md"
  run_phase "bench-gpu swin4d_v9 (202m on a GPU)" "$(( $(left) - 10 ))" /dev/null "${BENCH_SWIN[@]}" --out "$bench_tmp/swin.md"
  { for f in "$bench_tmp/gpt.md" "$bench_tmp/swin.md"; do [ -f "$f" ] && cat "$f" && echo; done; } > "$OUT/bench_gpu.md.tmp"
  if [ -s "$OUT/bench_gpu.md.tmp" ]; then mv "$OUT/bench_gpu.md.tmp" "$OUT/bench_gpu.md"; else rm -f "$OUT/bench_gpu.md.tmp"; fi
  rm -rf "$bench_tmp"
fi

{
  echo "# gpu-check, $(date -u '+%Y-%m-%d %H:%M UTC'), $((SECONDS - START)) s of a ${BUDGET} s budget"
  echo
  "$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device', '-', 'python', __import__('platform').python_version())" 2>/dev/null
  echo
  echo "| phase | outcome | time |"; echo "|---|---|---|"
  printf '%s\n' "${PHASES[@]}"
  echo
  [ -s "$features" ] && cat "$features" && echo
  grep -E '^(FAILED|ERROR|SKIPPED)|^=+ .*(passed|failed|error|skipped)' "$OUT/pytest.txt" 2>/dev/null | sed 's/^/    /'
  echo
  echo "wheels: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
} > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
rm -f "$features"
echo; cat "$OUT/summary.md"
exec 1>&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $status
