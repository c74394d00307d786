#!/usr/bin/env bash
# The GPU checks of issue 16 as one prepared run that fits a 10-minute device lease (on an H200
# about 5 minutes before the tests, which are allowed 4 more): a population-100 generation part
# by part, the GA at H=1000 up to population 100,000, the training grid (the Flax loop timed on
# 2 of its 30 runs and scaled), group redundancy, and the library's tests on the GPU (8
# workers; the experiments' and docs' tests need packages the GPU image lacks, such as
# tensorflow-datasets and openpyxl; tests/conftest.py runs float32 products at 'highest'
# precision unless JAX_DEFAULT_MATMUL_PRECISION is set: at the default, TF32, 31 of these 422
# tests failed on an H200, 29 on float32 tolerances). Each step has its own time limit, so
# that one slow step leaves the others their time; logs go to $OUT (or ./gpu-logs). Run from
# the repository root: bash benchmarks/gpu.sh [STEP ...], where the steps are parts
# (benchmarks/ga_parts.py), ga, train, redundancy and tests; no argument runs them all. It stops
# at once where JAX sees no GPU (ALLOW_CPU=1 runs the steps on the CPU anyway, to try them).
set -u
all_steps="parts ga train redundancy tests"
case " $* " in *" -h "*|*" --help "*)
  sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;; esac
for s in "$@"; do
  [[ " $all_steps " == *" $s "* ]] || {
    echo "gpu.sh: unknown step '$s'; the steps are: $all_steps (none: all of them)" >&2; exit 2; }
done
steps=${*:-$all_steps}
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  [[ " $steps " == *" $name "* ]] || return 0
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}
( (command -v nvidia-smi >/dev/null && nvidia-smi -L) || echo "nvidia-smi: not found"
  python3 -c "import jax; print(jax.__version__, jax.devices())") 2>&1 \
  | tee "$out/env.txt"
if [[ "${ALLOW_CPU:-0}" != 1 ]] && ! python3 -c \
    "import sys, jax; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  echo "gpu.sh: JAX sees no GPU here, and these are the GPU checks; run it where one is lent" \
       "(ALLOW_CPU=1 runs the steps on the CPU anyway)." >&2
  exit 1
fi
step parts 90 python3 benchmarks/ga_parts.py --hidden 1000 --population 100
step ga 200 python3 benchmarks/ga.py --hidden 1000 --repeats 3 \
  --populations 100,1000,10000,100000
step train 120 python3 benchmarks/train.py --loop_runs 2
step redundancy 40 python3 benchmarks/redundancy.py --quick
lib_tests=(units masks models trace trace_user_models train train_api optax_pruning
           distinctiveness magnitude importance redundancy pruner_contract
           ga_operators ga_search ga_incremental ga_sharding)
step tests 240 python3 -m pytest -q -n 8 -p no:cacheprovider --durations=15 \
  $(printf "tests/test_%s.py " "${lib_tests[@]}")
