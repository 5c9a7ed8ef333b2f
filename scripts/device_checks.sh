#!/usr/bin/env bash
# Every GPU check and figure of BENCHMARKS.md in one run on a GPU machine (one H200: about 7 minutes before
# the GPT-2 small step was added; at most 11 min by the steps' limits: run it as two calls with ONLY if needed).
#
#   bash scripts/device_checks.sh [OUT_DIR]     # default: $OUT, else ./device_out
#   ONLY="small_gpt main_job" bash scripts/device_checks.sh   # only these steps (names below)
#
# Needs jax (CUDA), optax, flax, chex, orbax-checkpoint, scikit-learn, tqdm, matplotlib;
# tomli_w and tensorboardX too, for the main job, and grain for the GPT-2 small step's token
# files (if the machine lacks them, put their wheels in .whl/ first, for the machine's Python:
# `pip download --no-deps -d .whl tomli_w tensorboardX grain array-record portpicker etils`;
# they are installed from there). The package is used from the tree (PYTHONPATH), not
# installed. Each step has its own time limit, so one hang does not cost the others;
# every log lands in OUT_DIR and `summary.txt` lists each step's exit status.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-device_out}}"
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/jaxopt_lab_site .whl/*.whl
  export PYTHONPATH="/tmp/jaxopt_lab_site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# tests/conftest.py defaults to the CPU: name the GPU first
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: $*" | tee -a "$out/summary.txt"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  echo "== $name: exit $rc" | tee -a "$out/summary.txt"
}

step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version --format=csv; python3 -c 'import jax; print(jax.__version__, jax.devices())'"
# kernels (Triton and Mosaic GPU) against their float64 / jnp references, compiled on the device
step kernel_tests 90 python3 -m pytest tests/kernels -q -p no:cacheprovider
# BENCHMARKS.md "Pallas kernels": KAT-B shapes (768 and 3072 channels), bf16 and fp32; the fused step
step bench_kernels 120 bash -c "python3 scripts/bench_kernels.py --grkan-shape 64,197,768 \
  && python3 scripts/bench_kernels.py --only grkan --grkan-shape 64,197,3072 \
  && python3 scripts/bench_kernels.py --only grkan --grkan-shape 64,197,3072 --dtype float32 \
  && python3 scripts/bench_kernels.py --only grkan --grkan-shape 64,197,3072 --impl mosaic_gpu \
  && python3 scripts/bench_kernels.py --only grkan --grkan-shape 64,197,3072 --dtype float32 --impl mosaic_gpu"
# block sizes per shape class: paste the BEST lines into grkan.TRITON_TUNED / lowrank_step.TRITON_STEP_TUNED
step tune 120 python3 scripts/tune_kernels.py --budget 12 --repeats 5 --out "$out/tuned.json"
# BENCHMARKS.md "Simulated workers" and "The main job on one GPU"
step workers 45 bash -c "python3 scripts/bench_workers.py --mode vmap --workers 1 8 64 \
  && python3 scripts/bench_workers.py --mode shard_map --workers 8 64"
step main_job 90 python3 scripts/bench_main_job.py --repeats 20
# BENCHMARKS.md "The main job on one GPU", GPT-2 small: 8 workers vmapped on the one GPU, DDP and DiLoCo
# (2 x 1024 tokens per worker) against one single-worker jitted step; random GPT-2 ids stand in for OpenWebText
small_gpt() {
  local data; data="$(mktemp -d)"
  python3 -c "import sys, numpy as np; r = np.random.default_rng(0)
for split, n in (('train', 4_000_000), ('val', 100_000)): r.integers(0, 50257, n, dtype=np.uint16).tofile(f'{sys.argv[1]}/{split}.bin')" "$data" \
  && python3 scripts/bench_main_job.py --config experiments/diloco_gpt_small.toml --ddp --repeats 5 \
       --set "data.path=$data" --set workers.mode=vmap --set train.batch_size=2
}
export -f small_gpt
step small_gpt 180 bash -c small_gpt
cat "$out/summary.txt"
