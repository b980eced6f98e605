#!/usr/bin/env bash
# CPU quickstart: build local shards from generated images (once), then pre-train a tiny DyNet with
# dynamic S/L switching on 2 CPU ranks under the deepspeed launcher, tracked in a local MLflow.
#   bash launch/quickstart.sh [dotted.key=value ...]      (overrides go to launch/pretrain.py)
# Everything it writes (data/quickstart, runs/quickstart, mlflow.db, mlartifacts) goes into
# $DYNTRAIN_QUICKSTART_DIR (default: the repository root).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DYNTRAIN_QUICKSTART_DIR:-$REPO}
RANKS=${DYNTRAIN_QUICKSTART_RANKS:-2}
[ -x "$REPO/.venv/bin/deepspeed" ] || bash "$REPO/launch/setup.sh"
PY="$REPO/.venv/bin/python"
mkdir -p "$WORK"
cd "$WORK"

DATA=data/quickstart
if ! compgen -G "$DATA/shards/*.tar" >/dev/null; then
    echo "== building quickstart shards in $WORK/$DATA"
    "$PY" -c "import sys; sys.path.insert(0, '$REPO')
from dyntrain.data.synthetic import write_synthetic_images
write_synthetic_images('$DATA/images', 48, size=(768, 1024), seed=0)"
    "$PY" "$REPO/launch/make_shards.py" --src "$DATA/images" --out "$DATA/shards" --shard-samples 16
fi

echo "== pre-training on $RANKS CPU ranks (deepspeed launcher, gloo)"
export DS_ACCELERATOR=cpu
PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$REPO/.venv/bin/deepspeed" --num_gpus "$RANKS" --master_port "$PORT" "$REPO/launch/pretrain.py" \
    --config "$REPO/configs/quickstart.yaml" "$@"

echo
echo "== done"
echo "MLflow runs:   cd $WORK && $REPO/.venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"
echo "               (experiment dynet-quickstart; or: $PY $REPO/launch/compare.py --experiment dynet-quickstart)"
echo "checkpoints:   $WORK/runs/quickstart/checkpoints"
