#!/usr/bin/env bash
# Copy a finished `tvlens train` run into the package's shipped checkpoints (no resume state).
# usage: benchmarks/ship.sh RUN_DIR NAME
set -euo pipefail
run=$1; name=$2
dst=tvlens/checkpoints/$name
rm -rf "$dst"; mkdir -p "$dst"
cp "$run"/step_*.safetensors "$run"/step_*.json "$run"/log.jsonl "$run"/train_config.json "$dst"/
du -sh "$dst"
