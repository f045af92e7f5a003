#!/usr/bin/env bash
# The command-line verbs on a GPU, end to end: a short bf16-mixed `protperf train` of the tiny
# config, then `evaluate`, `embed` and `generate` on the device, after benchmarks/cuda_check.py.
# Then benchmarks/profile_favor.py and the training benchmark, eager against torch.compile.
# About 6 minutes on one H200, most of it the profiles and the compile comparison. Before the
# call, here:
#   protperf prepare-data --source ../shared/data/proteomes/UP000000625-E.coli.fasta.gz \
#       --out .devdata/data --concat-length 1024 --ood-families none --overwrite
#   gzip -dc ../shared/data/proteomes/UP000000625-E.coli.fasta.gz |
#       awk '/^>/ { n++ } n <= 100' > .devdata/sample.fasta
# and carry .devdata and .whl (docstring_parser, biopython and
# isal wheels for Python 3.12 beside the performer-pytorch ones; see scripts/device_check.sh):
#   command="bash scripts/device_cli_check.sh", carry=[".whl", ".devdata"]
# Dry run on a CPU: DEVICE=cpu bash scripts/device_cli_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device-out}
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
RUN=${RUN:-/tmp/protperf-cli-run}
STEPS=${STEPS:-300}  # training steps, validation every third of them
DATA=${DATA:-.devdata}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/device_env.sh wheels.log
protperf() { "$PYTHON" -c 'import sys; from protperf.cli import main; sys.exit(main())' "$@"; }
accelerator=gpu precision=bf16-mixed size=()
[ "$DEVICE" = cpu ] && accelerator=cpu precision=32-true size=(--quick)

echo "==> cuda_check"
"$PYTHON" benchmarks/cuda_check.py --device "$DEVICE" "${size[@]}" 2>&1 | tee "$OUT/cuda_check.log" || true
echo "==> train"
rm -rf "$RUN"
protperf train --config configs/tiny-cpu.yaml --data "$DATA/data" --run-dir "$RUN" \
    --trainer.accelerator "$accelerator" --trainer.devices 1 --trainer.precision "$precision" \
    --trainer.max_steps "$STEPS" --trainer.val_check_interval $((STEPS / 3)) --no-test 2>&1 | tee "$OUT/train.log" | tail -n 15
echo "==> evaluate"
protperf evaluate --model "$RUN" --data "$DATA/data" --split test valid --device "$DEVICE" \
    --precision "${precision%-true}" 2>&1 | tee "$OUT/evaluate.log"
echo "==> embed"
protperf embed "$DATA/sample.fasta" --model "$RUN" -o "$OUT/embeddings.h5" --per-residue \
    --device "$DEVICE" 2>&1 | tail -n 5
"$PYTHON" -c "import h5py, sys; f = h5py.File(sys.argv[1]); print({k: f[k].shape for k in f})" \
    "$OUT/embeddings.h5"
echo "==> generate"
protperf generate --model "$RUN" -n 3 --seed 0 --device "$DEVICE" -o "$OUT/generated.fasta"
cat "$OUT/generated.fasta"
ls "$RUN"
echo "==> profile_favor"  # launches against device time, eager (and compiled on the GPU)
if [ "$DEVICE" = cpu ]; then
    profiles=("--lengths 256 512 --no-autocast")
else
    profiles=("" "--compile")
fi
for extra in "${profiles[@]}"; do
    # shellcheck disable=SC2086  # $extra holds several options
    timeout 150 "$PYTHON" benchmarks/profile_favor.py --device "$DEVICE" --top 8 $extra \
        2>&1 | grep -v "^USDT" | tee -a "$OUT/compile.log" | grep -E "^#|L="
done
echo "==> train_throughput --compile"  # torch.compile against eager, 8k and 32k
if [ "$DEVICE" = cpu ]; then  # the dry run: one small configuration
    sizes=(--layers 1 --dim 64 --heads 2 --ff_dim 128 --num_features 32 --lengths 256
        --configs "FAVOR+ causal")
else
    # 2 layers (the CPU benchmark's shape): compiling 6 would take most of the call.
    sizes=(--layers 2 --lengths 8192 32768 --configs "FAVOR+ causal" "FAVOR+ bidirectional"
        "exact causal")
fi
for mode in eager compile; do
    flag=()
    [ "$mode" = compile ] && flag=(--compile)
    timeout 300 "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" \
        --precision "$precision" --steps 3 --warmup 2 --timeout 150 "${sizes[@]}" "${flag[@]}" \
        2>&1 | tee -a "$OUT/compile.log" | grep -v "^#   "
done
