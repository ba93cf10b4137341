#!/usr/bin/env bash
# Everything the GPU issue checks, in one call on a lent GPU machine (about 6 minutes), run from the
# repository root there. Prepare here first (no GPU needed): `make gpu-prep` builds the wheel and the
# Rust GPU tests into .gpu/ (ignored by git); then run `bash benches/gpu_session.sh`
# there with .gpu carried. The benchmarks' JSON (float32, float16, bfloat16 tensors) go under $OUT,
# the logs too, as one logs.tar.gz (the device tool brings back at most 8 files). Every step has its
# own time limit, so one hang costs only its own share.
set -u
OUT=${OUT:-/tmp/gpu-session}
LOGS=/tmp/gpu-logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 BATCHNORM_REQUIRE_GPU=1 PYTHONDONTWRITEBYTECODE=1
step() { echo; echo "=== $* ($(date +%T))"; }
summary=()
record() { summary+=("$1: rc $2"); }

step versions
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"

step install
python3 -m pip install -q --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -c "import batchnorm; print('batchnorm', batchnorm.__version__, batchnorm.cuda_versions())"

step "resource usage (nvcc, sm_90)"
timeout 60 nvcc -arch=sm_90 -std=c++17 -cubin --resource-usage -o /tmp/kernels.cubin src/cuda/kernels.cu 2>&1 \
  | grep -E "Function properties|registers|spill|Compiling entry" | paste - - - | sed 's/ptxas info    : //g' > "$LOGS/resources.txt"
grep -E "statistics_f32x4|normalize_f32x4|gradient_sums_f32x4|input_gradient_f32x4" -A0 "$LOGS/resources.txt" | cut -c1-300

step "rust GPU tests"
timeout 120 .gpu/cuda-tests --test-threads 1 --nocapture > "$LOGS/rust.log" 2>&1
rc=$?; record rust $rc; tail -25 "$LOGS/rust.log"

step "pytest (GPU suites)"
timeout 200 python3 -m pytest -q -rfEs -p no:cacheprovider --timeout 60 \
  tests/test_cuda.py tests/test_bad_input.py > "$LOGS/pytest.log" 2>&1
rc=$?; record pytest $rc; grep -E "passed|failed|error|SKIP|FAIL|Error" "$LOGS/pytest.log" | tail -40

step "compute-sanitizer memcheck (every kernel variant, every half value)"
timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 --print-limit 20 \
  .gpu/cuda-tests --test-threads 1 gpu_every_kernel_variant gpu_every_half_value > "$LOGS/memcheck.log" 2>&1
rc=$?; record memcheck $rc; tail -12 "$LOGS/memcheck.log"
for tool in racecheck synccheck initcheck; do
  step "compute-sanitizer $tool (smallest shapes)"
  timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 20 \
    .gpu/cuda-tests --test-threads 1 gpu_smallest_shapes > "$LOGS/$tool.log" 2>&1
  rc=$?; record "$tool" $rc; tail -8 "$LOGS/$tool.log"
done

step "where the time goes (device and host per call)"
timeout 90 python3 benches/gpu_diagnose.py > "$LOGS/diagnose.log" 2>&1
rc=$?; record diagnose $rc; cat "$LOGS/diagnose.log"

step "ncu per kernel (caches as the calls leave them)"
timeout 120 ncu --clock-control none --cache-control none -k regex:"statistics|normalize|gradient_sums|input_gradient" \
  --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
  python3 benches/gpu_diagnose.py --ncu-target > "$LOGS/ncu.log" 2>&1
rc=$?; record ncu $rc
grep -E "^  [a-z_0-9]+\(|gpu__time|dram__bytes" "$LOGS/ncu.log" | sed -E 's/\(ForwardArgs\)|\(BackwardArgs\)//; s/ +/ /g' | paste - - - - | cut -c1-160

for dtype in float32 float16 bfloat16; do
  step "benchmark ($dtype tensors)"
  limit=${BENCH_LIMIT:-170}; args=${BENCH_ARGS:-}
  # Half tensors run on a GPU only when asked until these runs have verified their kernels.
  [ "$dtype" != float32 ] && { limit=60; args=--quick; }
  BATCHNORM_UNVERIFIED_HALF_KERNELS=1 timeout "$limit" python3 -m batchnorm.bench_cuda $args --dtype $dtype --json "$OUT/bench_cuda_$dtype.json" \
    > "$LOGS/bench_$dtype.log" 2>&1
  rc=$?; record "bench $dtype" $rc; tail -4 "$LOGS/bench_$dtype.log"
done

step summary
printf '%s\n' "${summary[@]}"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" .
