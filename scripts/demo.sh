#!/usr/bin/env bash
# protperf end to end on real proteins, on a CPU: prepare-data -> train -> evaluate -> embed ->
# generate. `make demo` runs it after installing protperf; 8 to 11 minutes on 2 cores.
# Everything it writes goes to demo/ (git-ignored):
#
#   demo/data/              tokenized HDF5 dataset (train/valid/test splits, a held-out organism as ood)
#   demo/run/               the training run: config.yaml, logs/, checkpoints/, export/, curves.png
#   demo/eval.md            accuracy and perplexity per split next to the unigram baseline
#   demo/sample.fasta       200 proteins of E. coli, and demo/embeddings.h5, their embeddings
#   demo/generated.fasta    5 proteins sampled from the model
#
# Settings, from the environment (the tests use them to run the same script in seconds):
#   DEMO_DIR          output folder (default demo)
#   SHARED_DATA       the real data shipped beside the project (default ../shared/data)
#   DEMO_TRAIN_ARGS   extra `protperf train` options, appended last (they win)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protperf > /dev/null; then
    echo "demo.sh: protperf is not on PATH: run \`make demo\`, or \`. .venv/bin/activate\` first" >&2
    exit 1
fi

DEMO_DIR=${DEMO_DIR:-demo}
SHARED_DATA=${SHARED_DATA:-../shared/data}
read -r -a train_args <<< "${DEMO_TRAIN_ARGS:-}"
PROTEOMES=$SHARED_DATA/proteomes
start=$SECONDS
mkdir -p "$DEMO_DIR"

step() { printf '\n==> [%3ds] %s\n' $((SECONDS - start)) "$*"; }

# 1. Data: four bacterial proteomes split into train / valid / test (5% each to valid and test),
# and a whole eukaryote, yeast, held out as ood: how well does the model carry over to an
# organism it never saw? About 21,000 proteins; a second.
step "prepare-data: 4 bacterial proteomes + S. cerevisiae held out -> $DEMO_DIR/data"
if [[ -d $PROTEOMES ]]; then
    sources=(
        "$PROTEOMES/UP000000625-E.coli.fasta.gz"
        "$PROTEOMES/UP000001014-S.typhimurium.fasta.gz"
        "$PROTEOMES/UP000001425-Synechocystis.fasta.gz"
        "$PROTEOMES/UP000002717-S.elongatus.fasta.gz"
    )
    ood=("$PROTEOMES/UP000002311-S.cerevisiae.fasta.gz")
else
    # No shared data here: the same reference proteomes straight from UniProt's REST API
    # (network needed; about 15 MB).
    echo "no $PROTEOMES: downloading the proteomes from rest.uniprot.org" >&2
    rest="https://rest.uniprot.org/uniprotkb/stream?format=fasta&compressed=true&query=proteome:"
    sources=("${rest}UP000000625" "${rest}UP000001014" "${rest}UP000001425" "${rest}UP000002717")
    ood=("${rest}UP000002311")
fi
protperf prepare-data --source "${sources[@]}" --ood-source "${ood[@]}" \
    --out "$DEMO_DIR/data" --concat-length 1024 --valid-fraction 0.05 --test-fraction 0.05 \
    --ood-families none --overwrite

# 2. Train the tiny CPU model (configs/tiny-cpu.yaml: 3 layers, d 128, generalized FAVOR+) for
# 2,500 steps, about 6 minutes. `evaluate` below tests it, so training skips its own test.
step "train: configs/tiny-cpu.yaml -> $DEMO_DIR/run"
rm -rf "$DEMO_DIR/run"
protperf train --config configs/tiny-cpu.yaml --data "$DEMO_DIR/data" --run-dir "$DEMO_DIR/run" \
    --trainer.max_steps 2500 --no-test ${train_args[@]+"${train_args[@]}"}

# 3. Accuracy and perplexity on test and on the held-out organism, next to the unigram baseline.
step "evaluate: test and ood -> $DEMO_DIR/eval.md"
protperf evaluate --model "$DEMO_DIR/run" --data "$DEMO_DIR/data" | tee "$DEMO_DIR/eval.md"

# 4. Embeddings of 200 E. coli proteins, per protein and per residue.
step "embed: 200 E. coli proteins -> $DEMO_DIR/embeddings.h5"
if [[ -d $PROTEOMES ]]; then
    gzip -dc "$PROTEOMES/UP000000625-E.coli.fasta.gz" |
        awk '/^>/ { n++ } n <= 200' > "$DEMO_DIR/sample.fasta"  # reads it all: no SIGPIPE
else
    curl -fsSL "https://rest.uniprot.org/uniprotkb/search?format=fasta&size=200&query=proteome:UP000000625" \
        > "$DEMO_DIR/sample.fasta"
fi
protperf embed "$DEMO_DIR/sample.fasta" --model "$DEMO_DIR/run" -o "$DEMO_DIR/embeddings.h5" \
    --per-residue --overwrite

# 5. Five new proteins sampled from the model.
step "generate: 5 proteins -> $DEMO_DIR/generated.fasta"
protperf generate --model "$DEMO_DIR/run" -n 5 -o "$DEMO_DIR/generated.fasta" --overwrite
head -n 4 "$DEMO_DIR/generated.fasta"

step "done in $((SECONDS - start)) s. Outputs:"
cat <<DONE
  training curves    $DEMO_DIR/run/curves.png
  metrics (CSV)      $DEMO_DIR/run/logs/version_0/metrics.csv
  exported model     $DEMO_DIR/run/export/  (model.safetensors, config.json, tokenizer.json)
  evaluation table   $DEMO_DIR/eval.md
  embeddings         $DEMO_DIR/embeddings.h5  (ids, mean: N x 128, residues + offsets)
  generated proteins $DEMO_DIR/generated.fasta
DONE
