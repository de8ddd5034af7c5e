#!/usr/bin/env bash
# CogVLM with sat_quant on CPU, no downloads: the real CogVLMModel at a tiny size, saved in full precision,
# converted to 4-bit once, then chatted with through CogVLM's own (patched) cli_demo_sat.py.
#
#   bash examples/cogvlm_tiny_chat.sh [WORK_DIR]
#
# Needs a CogVLM checkout, patched or not: $COGVLM_DIR (default: ../shared/cogvlm beside this repository). It is
# copied into WORK_DIR and the patches it lacks are applied there; the original is not touched.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COGVLM_DIR="${COGVLM_DIR:-$REPO/../shared/cogvlm}"
. "$REPO/examples/_require.sh"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"  # absolute: the chat runs from the checkout
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 SAT_QUANT_COGVLM_DIR="$COGVLM_DIR"

echo "== 1. a copy of the CogVLM checkout with the patches it lacks (patched or not, the original is not touched)"
patched_copy "$WORK/CogVLM"

echo "== 2. a tiny CogVLM as a full-precision SAT checkpoint, a tokenizer and an image -> $WORK"
python -m sat_quant.testing.cogvlm_assets "$WORK"

echo "== 3. convert it to 4-bit once (quantized tensor by tensor, never whole in memory)"
PYTHONPATH="$WORK/CogVLM" sat-quant convert "$WORK/fp" "$WORK/int4" --quant 4 --quant-group-size 64 \
    --import utils.models --quiet --overwrite
sat-quant inspect "$WORK/int4" > "$WORK/int4-layers.txt"
head -n 3 "$WORK/int4-layers.txt"; tail -n 4 "$WORK/int4-layers.txt"

echo "== 4. chat: CogVLM's cli_demo_sat.py loads the 4-bit checkpoint directly (scripted stdin)"
cd "$WORK/CogVLM"
# two conversations ("clear" starts over): with random weights the model never says </s>, so each answer
# runs to --max_length and leaves no room for a second turn
printf '%s\n' "$WORK/image.png" "What is in this image?" clear "$WORK/image.png" "Describe the colours." stop | \
    python basic_demo/cli_demo_sat.py --from_pretrained "$WORK/int4" --local_tokenizer "$WORK/tokenizer" \
        --max_length 300 2>"$WORK/chat.log" || { tail -n 3 "$WORK/chat.log" >&2; exit 1; }  # SAT's log -> chat.log
echo
echo "(random weights: the answer is gibberish; the point is the path a real checkpoint takes)"

echo "== 5. memory: fp16 / bf16 / int8 / int4 for this model (built on meta, nothing allocated)"
PYTHONPATH="$WORK/CogVLM" sat-quant estimate --config "$WORK/fp/model_config.json" --import utils.models \
    --batch 1 --seq 300
