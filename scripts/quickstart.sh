#!/usr/bin/env bash
# The main job on the bundled default, end to end, from a fresh clone:
#   setup → prepare Open Clip Art → pretrain the shared space → evaluate retrieval → index → text→image queries.
# Usage: bash scripts/quickstart.sh [extra config overrides, e.g. train.epochs=5]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
X=.venv/bin/xmodal
RUN=runs/quickstart
DATA=data/openclipart

echo "== 1/5 prepare the Open Clip Art corpus (rendered once, cached in $DATA)"
$X prepare openclipart --out "$DATA"

echo "== 2/5 pretrain the shared space (configs/pretrain.yaml)"
rm -rf "$RUN"
$X pretrain --config configs/pretrain.yaml output_dir="$RUN" data.train="$DATA/manifest.csv" "$@"

echo "== 3/5 evaluate retrieval on the held-out test split"
$X evaluate --run "$RUN" --manifest "$DATA/manifest.csv" --split test --out "$RUN/eval_test.json"

echo "== 4/5 index the test images"
$X index --run "$RUN" --manifest "$DATA/manifest.csv" --split test --modality image --out "$RUN/index"

echo "== 5/5 text→image queries"
for q in "a red car" "a cat" "christmas tree" "a map of europe"; do
  echo "--- query: $q"
  $X query --index "$RUN/index" --text "$q" -k 5
done
echo "done: run folder $RUN (model.safetensors, metrics.jsonl, eval_test.json, index/)"
