#!/usr/bin/env bash
# The same tiny CogVLM chat under `torchrun --nproc_per_node 2` (model parallel 2, gloo on CPU): the 4-bit
# checkpoint saved at model-parallel size 1 is split per rank without dequantizing; `sat-quant reshard`
# writes the mp=2 shards ahead of time so later starts read only their own file.
#
#   bash examples/cogvlm_tiny_mp2.sh [WORK_DIR]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COGVLM_DIR="${COGVLM_DIR:-$REPO/../shared/cogvlm}"
. "$REPO/examples/_require.sh"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"  # absolute: the chat runs from the checkout
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 SAT_QUANT_COGVLM_DIR="$COGVLM_DIR"

patched_copy "$WORK/CogVLM"  # the checkout, patched or not, copied with the patches it lacks

[ -d "$WORK/fp" ] || python -m sat_quant.testing.cogvlm_assets "$WORK"
# group 64: the tiny EVA's 1920-wide MLP splits into 960 columns per rank, which 128 does not divide
[ -d "$WORK/int4" ] || PYTHONPATH="$WORK/CogVLM" sat-quant convert "$WORK/fp" "$WORK/int4" --quant 4 \
    --quant-group-size 64 --import utils.models --quiet
PYTHONPATH="$WORK/CogVLM" sat-quant reshard "$WORK/int4" "$WORK/int4-mp2" --mp 2 --import utils.models --overwrite

cd "$WORK/CogVLM"
printf '%s\n' "$WORK/image.png" "What is in this image?" stop | \
    torchrun --nproc_per_node 2 basic_demo/cli_demo_sat.py --from_pretrained "$WORK/int4-mp2" \
        --local_tokenizer "$WORK/tokenizer" --max_length 300 2>"$WORK/chat-mp2.log" || {
    tail -n 3 "$WORK/chat-mp2.log" >&2; exit 1; }  # SAT's and torchrun's log -> chat-mp2.log; on failure its end
