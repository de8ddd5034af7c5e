# Sourced by the examples: refuse, in one line each, a missing CogVLM checkout or missing CogVLM dependencies.
if [ ! -f "$COGVLM_DIR/utils/models/cogvlm_model.py" ]; then
    echo "$0: no CogVLM checkout at $COGVLM_DIR; clone https://github.com/THUDM/CogVLM and set COGVLM_DIR to it" >&2
    exit 2
fi
python -c "import timm, einops, sentencepiece, transformers" 2>/dev/null || {
    echo "$0: CogVLM's model code needs timm, einops, sentencepiece and transformers: pip install -e '.[cogvlm]'" >&2
    exit 2
}

# patched_copy DEST: a copy of $COGVLM_DIR at DEST with every patch of patches/ applied that it lacks (`git apply
# --check` accepts it); one already applied (`git apply --reverse --check` accepts it) is left as is; one that is
# neither (another CogVLM version, local edits) stops the example with one line. The original is never touched.
patched_copy() {
    local dest="$1" p name added=0 present=0
    if [ "$(realpath -m "$dest")" = "$(realpath -m "$COGVLM_DIR")" ]; then
        echo "$0: the work folder's CogVLM copy would be COGVLM_DIR itself; use another work folder" >&2
        exit 2
    fi
    rm -rf "$dest" && cp -r "$COGVLM_DIR" "$dest"
    for p in "$REPO"/patches/*.patch; do
        name="$(basename "$p")"
        # git looks no further up than the copy: an enclosing repository must not redirect the patch's paths
        if (cd "$dest" && GIT_CEILING_DIRECTORIES="$(dirname "$dest")" git apply --check "$p" 2>/dev/null); then
            (cd "$dest" && GIT_CEILING_DIRECTORIES="$(dirname "$dest")" git apply "$p")
            added=$((added + 1))
        elif (cd "$dest" && GIT_CEILING_DIRECTORIES="$(dirname "$dest")" git apply --reverse --check "$p" 2>/dev/null); then
            present=$((present + 1))
        else
            echo "$0: patches/$name neither applies to $COGVLM_DIR nor is already applied there (another CogVLM version or local edits?); start from a clean clone of https://github.com/THUDM/CogVLM" >&2
            exit 2
        fi
    done
    echo "patches: $added applied, $present already present"
}
