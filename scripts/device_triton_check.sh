#!/usr/bin/env bash
# The prepared GPU check of FAVOR+'s Triton kernels: one call of the device tool, at most about
# 8 minutes on one H200, every figure the kernels are judged by.
#
#   1. checks (benchmarks/cuda_check.py --triton): the Triton kernels equal the CPU, the causal
#      past is bit for bit unmoved by the future, bf16 autocast at L = 131,072 stays finite, and
#      on real protein batches the relative error of the Triton and the PyTorch kernels against
#      float64 (scripts/device_check.sh runs the general GPU checks, through "auto" on Triton);
#   2. attention (benchmarks/attention.py, bf16, forward + backward): the Triton kernels, the
#      PyTorch kernels and SDPA at L = 8,192, 32,768 and 131,072, both directions;
#   3. train (benchmarks/train_throughput.py, bf16-mixed, the 6-layer concat model, Triton
#      backend): FAVOR+ against OPT and exact attention at L = 8,192 and 32,768;
#   4. long: the same model's training step at L = 131,072, both directions (tokens/s, peak GPU
#      memory), then the longest causal L that trains, doubling from 131,072, with gradient
#      checkpointing.
# Each step has its own time limit and a failing step does not stop the next: whatever ran comes
# back under $OUT, with summary.txt listing each step's exit status. The device tool returns at
# most 8 files, so the script writes exactly 8: summary.txt, environment.txt, checks.log,
# checks.json, attention.log, attention.json, train.log and long.log.
#
# The device has Triton and no network. The accuracy check reads a proteome carried in .devdata;
# here, before the call (once):
#   grep -qx '/.devdata/' .git/info/exclude || echo /.devdata/ >> .git/info/exclude
#   mkdir -p .devdata && cp ../shared/data/proteomes/UP000000625-E.coli.fasta.gz \
#       .devdata/proteome.fasta.gz
# then call the device tool's run with
#   command="bash scripts/device_triton_check.sh", carry=[".devdata"], timeout_s=600
# (without .devdata the accuracy check uses random residues and says so).
#
# Dry run on a CPU (checks the script, not a GPU; Triton's interpreter, tiny sizes):
#   DEVICE=cpu bash scripts/device_triton_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: >"$summary"

source scripts/device_env.sh environment.txt
[ "$DEVICE" = cpu ] && export TRITON_INTERPRET=1 # the Triton kernels on CPU tensors

# step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, record the status.
step() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "==> $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status in $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 30 "$OUT/$name.log"
}

{
    date -u
    command -v nvidia-smi >/dev/null && nvidia-smi
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(0))"
    "$PYTHON" -c "import triton; print('triton', triton.__version__)"
} >>"$OUT/environment.txt" 2>&1

fasta=()
[ -f .devdata/proteome.fasta.gz ] && fasta=(--fasta .devdata/proteome.fasta.gz)
if [ "$DEVICE" = cpu ]; then
    check_size=(--quick)
    attention_size=(--dtype fp32 --lengths 64 --heads 2 --head-dim 16 --num-features 32)
    model=(--layers 1 --dim 64 --heads 2 --ff_dim 128 --num_features 32 --precision 32-true)
    train_lengths=(64)
    train_configs=(--configs "OPT (attention = V)" "FAVOR+ causal" "exact causal")
    long_lengths=(128)
    longest_budget=1 # one doubling
else
    check_size=()
    attention_size=(--dtype bf16 --lengths 8192 32768 131072)
    model=(--layers 6 --precision bf16-mixed)
    train_lengths=(8192 32768)
    train_configs=() # all five: OPT, FAVOR+ and exact, both directions
    long_lengths=(131072)
    longest_budget=60
fi

step checks 90 "$PYTHON" benchmarks/cuda_check.py --device "$DEVICE" --triton "${check_size[@]}" \
    "${fasta[@]}" --json "$OUT/checks.json"
step attention 150 "$PYTHON" benchmarks/attention.py --device "$DEVICE" "${attention_size[@]}" \
    --implementations protperf-triton protperf exact --budget-s 2 --repeats 5 --timeout-s 60 \
    --json "$OUT/attention.json"
step train 100 "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" "${model[@]}" \
    --backend triton --lengths "${train_lengths[@]}" "${train_configs[@]}" --steps 3 --budget_s 5 \
    --timeout 60 --no_loader
# 131,072 in both directions, then (checkpointed, causal: the concat model) the longest L.
step long 140 bash -c '"$0" benchmarks/train_throughput.py "$@" --configs "FAVOR+ causal" \
    "FAVOR+ bidirectional" --steps 2 --budget_s 5 --timeout 60 --no_loader &&
    "$0" benchmarks/train_throughput.py "$@" --configs "FAVOR+ causal" --steps 1 --timeout 60 \
    --no_loader --gradient_checkpointing --longest --longest_budget_s '"$longest_budget" \
    "$PYTHON" --device "$DEVICE" "${model[@]}" --backend triton --lengths "${long_lengths[@]}"

echo "==> summary"
cat "$summary"
grep -h "^longest" "$OUT/long.log" 2>/dev/null
! grep -Ev "exit 0( |$)" "$summary" | grep -q . # success only if every step exited 0
