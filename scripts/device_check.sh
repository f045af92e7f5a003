#!/usr/bin/env bash
# The prepared GPU check: one call of the device tool, about 8 minutes on one H200.
#
#   1. benchmarks/cuda_check.py: FAVOR+ on CUDA equals the CPU (float32, padded), bf16 autocast
#      stays finite at L = 32,768, a bf16-mixed training step, decoding = full forward,
#      embeddings ignore padding (PASS / FAIL lines);
#   2. benchmarks/attention.py on CUDA, float32 and bf16 (the GPU attention table);
#   3. benchmarks/train_throughput.py on CUDA, bf16-mixed, the concat model with 6 layers
#      (tokens/s and peak GPU memory, FAVOR+ against exact attention).
# Each step has its own time limit and a failing step does not stop the next: whatever ran comes
# back under $OUT (logs and JSON), with summary.txt listing each step's exit status. The device
# tool returns at most 8 files, so the script writes exactly 8: summary.txt, environment.txt
# (versions and the wheel install), four logs and the attention benchmark's two JSON tables.
#
# The device has no network. Its image has torch, pytorch-lightning, h5py, tokenizers,
# safetensors and xxhash; performer-pytorch (the attention benchmark's peer) travels as wheels.
# Here, before the call (pure-Python wheels, a few KB):
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl performer-pytorch==1.1.4 \
#       local-attention axial-positional-embedding hyper-connections torch-einops-utils
# then call the device tool's run with
#   command="bash scripts/device_check.sh", carry=[".whl"], timeout_s=600
# Without .whl the performer-pytorch rows report an import error and the rest runs.
#
# Dry run on a CPU (checks the script, not a GPU): DEVICE=cpu QUICK=1 bash scripts/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"

source scripts/device_env.sh environment.txt
status=$?
[ "$DEVICE" != cpu ] && ls .whl/*.whl >/dev/null 2>&1 && echo "wheels: exit $status" >>"$summary"

# step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the status.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "==> $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 25 "$OUT/$name.log"
}

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} >>"$OUT/environment.txt" 2>&1

if [ "$QUICK" = 1 ]; then
    check_size=(--quick)
    lengths=(1024)
    train_lengths=(1024)
    layers=1
else
    check_size=()
    lengths=(1024 8192 32768)
    train_lengths=(8192 32768)
    layers=6
fi

step cuda_check 90 "$PYTHON" benchmarks/cuda_check.py --device "$DEVICE" "${check_size[@]}"
for dtype in fp32 bf16; do
    [ "$DEVICE" = cpu ] && [ "$dtype" = bf16 ] && continue  # the CPU benchmark is float32
    limit=150
    [ "$dtype" = bf16 ] && limit=180  # bf16 runs more cells within the budget: 150 s is short
    step "attention_$dtype" "$limit" "$PYTHON" benchmarks/attention.py --device "$DEVICE" \
        --dtype "$dtype" --lengths "${lengths[@]}" --budget-s 5 --timeout-s 60 \
        --json "$OUT/attention_$dtype.json"
done
precision=bf16-mixed
[ "$DEVICE" = cpu ] && precision=32-true
step train_throughput 150 "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" \
    --precision "$precision" --layers "$layers" --lengths "${train_lengths[@]}" --steps 3 \
    --budget_s 20 --timeout 120

echo "==> summary"
cat "$summary"
! grep -Ev "exit 0( |$)" "$summary" | grep -q .  # success only if every step exited 0
