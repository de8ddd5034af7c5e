"""``--calibrate FILE``: calibration samples for a language model, from a file of text lines.

Each non-empty line is one sample, tokenized with the checkpoint's tokenizer (``--tokenizer``: a local folder or a
name in the Hugging Face cache; the default is the one CogVLM's scripts use for ``--local_tokenizer``), cut to the
model's ``max_sequence_length``, and given to the model the way SAT's language models take it: ``input_ids``,
``position_ids`` and a causal ``attention_mask``. One sample per forward, so no padding enters the statistics.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

import torch

from ..errors import QuantConfigError

#: what CogVLM's scripts pass as ``--local_tokenizer`` by default
DEFAULT_TOKENIZER = "lmsys/vicuna-7b-v1.5"


def read_lines(path: str, limit: Optional[int]) -> List[str]:
    """The first ``limit`` non-empty lines of ``path`` (all when None); JSONL image prompts are refused here."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantConfigError(f"--calibrate {path}: cannot read it as text ({getattr(exc, 'strerror', None) or exc}); "
                               f"pass a UTF-8 file with one calibration text per line.") from None
    if not lines:
        raise QuantConfigError(f"--calibrate {path} holds no text; put one calibration text per line.")
    if _is_jsonl(lines[0]):
        raise QuantConfigError(f"--calibrate {path} is JSONL (image prompts): only text lines are supported so far; "
                               f"pass a file of text lines (the language model is calibrated on them).")
    return lines[:limit] if limit else lines


def _is_jsonl(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def load_tokenizer(name: str):
    """A Hugging Face tokenizer from a local folder or the local cache (never downloaded)."""
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "no usable tokenizer"
        raise QuantConfigError(f"--tokenizer {name}: cannot load it ({type(exc).__name__}: {str(exc)[:200]}); pass "
                               f"the folder of the checkpoint's tokenizer (e.g. a downloaded vicuna-7b-v1.5).") from None


def text_samples(lines: List[str], tokenizer, max_length: int, vocab_size: int) -> List[Dict[str, Any]]:
    """One SAT language-model input per line: ids [1, n], positions 0..n-1, a causal mask [1, 1, n, n]."""
    samples = []
    for line in lines:
        ids = tokenizer(line, add_special_tokens=True)["input_ids"][:max_length]
        if not ids:
            continue
        if max(ids) >= vocab_size:
            raise QuantConfigError(f"--tokenizer gives token id {max(ids)}, outside this model's vocabulary of "
                                   f"{vocab_size}; pass the checkpoint's own tokenizer.")
        n = len(ids)
        samples.append({"input_ids": torch.tensor([ids]), "position_ids": torch.arange(n).unsqueeze(0),
                        "attention_mask": torch.ones(1, 1, n, n).tril()})
    return samples


__all__ = ["DEFAULT_TOKENIZER", "read_lines", "load_tokenizer", "text_samples"]
