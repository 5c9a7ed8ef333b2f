#!/usr/bin/env bash
# The GPU checks and figures BENCHMARKS.md still lacks, in one run on a GPU machine.
#
#   bash scripts/device_checks.sh [OUT_DIR]     # default: ./device_out
#
# Needs jax (CUDA), optax, flax, chex, orbax-checkpoint and scikit-learn; the
# package is used from the tree (PYTHONPATH), not installed. Each step has its
# own time limit so one hang does not cost the others; every log lands in
# OUT_DIR, and `summary.txt` there lists each step's exit status. The limits
# add up to 570 s, inside one 10-minute call.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-device_out}}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 40 "$out/$name.log"
  echo "== $name: exit $rc" | tee -a "$out/summary.txt"
}

step env 30 python3 -c "import jax; print(jax.__version__, jax.devices())"
# kernels against their references on the device (the GPU-only test included)
step kernel_tests 180 python3 -m pytest tests/kernels -q
# BENCHMARKS.md "Pallas kernels": bandwidth fraction and speedup over XLA
step bench_kernels 180 python3 scripts/bench_kernels.py
# BENCHMARKS.md "Simulated workers": several workers per device under shard_map, and vmap
step bench_workers_shard_map 90 python3 scripts/bench_workers.py --mode shard_map --workers 8 64
step bench_workers_vmap 90 python3 scripts/bench_workers.py --mode vmap --workers 1 8 64
cat "$out/summary.txt"
