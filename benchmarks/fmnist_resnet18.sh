#!/usr/bin/env bash
# Fashion-MNIST, ResNet-18 from scratch (--scheme none), then a layer-max fine-tune from that
# checkpoint. The figures in docs/results.md come from this script on one H100.
#   WNCONVERT="python -m wnconvert.cli" DATA=fashion-mnist:/path bash benchmarks/fmnist_resnet18.sh
set -euo pipefail
export WNCONVERT_OFFLINE=1   # both runs start from --weights none or a local file
WNCONVERT=${WNCONVERT:-wnconvert}
DATA=${DATA:-fashion-mnist}
RUNS=${RUNS:-runs}
WORKERS=${WORKERS:-12}
EPOCHS=${EPOCHS:-40}
FT_EPOCHS=${FT_EPOCHS:-5}
$WNCONVERT finetune resnet18 --data "$DATA" --weights none --scheme none --image-size 64 \
  --epochs "$EPOCHS" --batch-size 256 --optimizer sgd --lr 0.1 --nesterov --weight-decay 5e-4 \
  --label-smoothing 0.1 --warmup-epochs 2 --workers "$WORKERS" --out "$RUNS/fmnist-r18-none" --overwrite
$WNCONVERT finetune resnet18 --data "$DATA" --weights "$RUNS/fmnist-r18-none/checkpoint.safetensors" \
  --scheme layer-max --image-size 64 --epochs "$FT_EPOCHS" --batch-size 256 --optimizer sgd --lr 0.005 \
  --nesterov --label-smoothing 0.1 --workers "$WORKERS" --out "$RUNS/fmnist-r18-layermax" --overwrite
