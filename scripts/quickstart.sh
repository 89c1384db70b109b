#!/usr/bin/env bash
# The main job on the bundled default, end to end, from a fresh clone:
#   setup → prepare the corpora → pretrain the shared space on Open Clip Art → evaluate retrieval →
#   fine-tune a sentiment head on it (Rotten Tomatoes, held-out movies) → index the test images → text→image queries.
# Usage: bash scripts/quickstart.sh [extra config overrides, e.g. train.epochs=5]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
X=.venv/bin/xmodal
RUN=runs/quickstart
DATA=data/openclipart

echo "== 1/6 prepare the corpora (Open Clip Art rendered once, cached in $DATA; Rotten Tomatoes snippets)"
$X prepare openclipart --out "$DATA"
$X prepare rotten-tomatoes --out data/rotten-tomatoes

echo "== 2/6 pretrain the shared space (configs/pretrain.yaml)"
rm -rf "$RUN"
# The drawings are rendered at 128 px, so the image tower reads them at 128 px (224, the config's default for
# photos, would only upsample them at three times the cost).
$X pretrain --config configs/pretrain.yaml output_dir="$RUN" data.train="$DATA/manifest.csv" \
  model.towers.image.image_size=128 "$@"

echo "== 3/6 evaluate retrieval on the held-out test split"
$X evaluate --run "$RUN" --manifest "$DATA/manifest.csv" --split test --out "$RUN/eval_test.json"

echo "== 4/6 fine-tune a sentiment head on the pretrained space (Rotten Tomatoes; test movies unseen)"
rm -rf "$RUN-sentiment"
$X finetune --config configs/finetune_sentiment.yaml init_from="$RUN" output_dir="$RUN-sentiment"
$X evaluate --run "$RUN-sentiment" --manifest data/rotten-tomatoes/manifest.csv --split test --task sentiment

echo "== 5/6 index the test images"
$X index --run "$RUN" --manifest "$DATA/manifest.csv" --split test --modality image --out "$RUN/index"

echo "== 6/6 text→image queries"
for q in "a flag" "a map" "a bird" "a car"; do
  echo "--- query: $q"
  $X query --index "$RUN/index" --text "$q" -k 5
done
echo "done: $RUN (shared space: model.safetensors, metrics.jsonl, eval_test.json, index/), $RUN-sentiment (head)"
