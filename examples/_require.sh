# Sourced by the examples: refuse, in one line each, a missing CogVLM checkout or missing CogVLM dependencies.
if [ ! -f "$COGVLM_DIR/utils/models/cogvlm_model.py" ]; then
    echo "$0: no CogVLM checkout at $COGVLM_DIR; clone https://github.com/THUDM/CogVLM and set COGVLM_DIR to it" >&2
    exit 2
fi
python -c "import timm, einops, sentencepiece, transformers" 2>/dev/null || {
    echo "$0: CogVLM's model code needs timm, einops, sentencepiece and transformers: pip install -e '.[cogvlm]'" >&2
    exit 2
}
