"""``--calibrate FILE``: calibration samples, from a file of text lines or a JSONL file of image prompts.

Text: each non-empty line is one sample, tokenized with the checkpoint's tokenizer (``--tokenizer``: a local folder or
a name in the Hugging Face cache; the default is the one CogVLM's scripts use for ``--local_tokenizer``), cut to the
model's ``max_sequence_length``, and given to the model the way SAT's language models take it: ``input_ids``,
``position_ids`` and a causal ``attention_mask``. One sample per forward, so no padding enters the statistics.

JSONL (CogVLM, CogAgent): each line is ``{"image": path, "text": prompt}`` (a relative path is relative to the
file's folder). The sample is what CogVLM's ``chat`` gives the model for that image and a one-turn question:
the checkout's own ``llama2_text_processor_inference`` (prompt template from the checkpoint's
``text_processor_version``, else ``chat`` as in its scripts), its position function and its image processors
(``get_image_processor`` at the vision tower's size, and at ``cross_image_pix`` for CogAgent). Those two modules
are loaded from the checkout's ``utils/utils`` by file, so its package ``__init__`` (which needs seaborn for
grounding) is not imported.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import QuantConfigError

#: what CogVLM's scripts pass as ``--local_tokenizer`` by default
DEFAULT_TOKENIZER = "lmsys/vicuna-7b-v1.5"


@dataclass
class ImagePrompt:
    """One JSONL calibration sample: an image file and the question asked about it."""

    image: str
    text: str


def read_lines(path: str, limit: Optional[int]) -> List[str]:
    """The first ``limit`` non-empty lines of ``path`` (all when None)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantConfigError(f"--calibrate {path}: cannot read it as text ({getattr(exc, 'strerror', None) or exc}); "
                               f"pass a UTF-8 file with one calibration text per line.") from None
    if not lines:
        raise QuantConfigError(f"--calibrate {path} holds no text; put one calibration text per line.")
    return lines[:limit] if limit else lines


def read_calibration_file(path: str, limit: Optional[int]) -> Tuple[str, List[Any]]:
    """``("text", lines)`` or, when the first line is a JSON object, ``("images", [ImagePrompt, ...])``."""
    lines = read_lines(path, limit)
    if not _is_jsonl(lines[0]):
        return "text", lines
    folder = os.path.dirname(os.path.abspath(path))
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuantConfigError(f"--calibrate {path} line {number} is not JSON ({exc.msg}); each line must be "
                                   f'{{"image": "path", "text": "question"}}.') from None
        if not (isinstance(record, dict) and isinstance(record.get("image"), str)
                and isinstance(record.get("text"), str)):
            raise QuantConfigError(f"--calibrate {path} line {number} needs an \"image\" path and a \"text\" "
                                   f'prompt (strings): {{"image": "photo.jpg", "text": "What is in the picture?"}}.')
        image = record["image"] if os.path.isabs(record["image"]) else os.path.join(folder, record["image"])
        if not os.path.isfile(image):
            raise QuantConfigError(f"--calibrate {path} line {number}: image {record['image']} not found (relative "
                                   f"paths are read from {folder}).")
        prompts.append(ImagePrompt(image, record["text"]))
    return "images", prompts


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


def _checkout_module(name: str) -> ModuleType:
    """``utils/utils/<name>.py`` of the CogVLM checkout the model classes came from (``--import utils.models``), or
    of the first ``sys.path`` entry (or the current folder) holding one, loaded on its own."""
    roots = []
    loaded = sys.modules.get("utils")
    if loaded is not None and getattr(loaded, "__file__", None):
        roots.append(os.path.dirname(os.path.dirname(loaded.__file__)))
    roots += [entry or os.getcwd() for entry in sys.path] + [os.getcwd()]
    for root in roots:
        path = os.path.join(root, "utils", "utils", f"{name}.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location(f"sat_quant_cogvlm_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise QuantConfigError("--calibrate with images needs CogVLM's text and image processors (utils/utils in the "
                           "CogVLM checkout): run from the checkout's folder with --import utils.models.")


def image_samples(prompts: List[ImagePrompt], args, tokenizer_name: str, dtype: torch.dtype) -> List[Dict[str, Any]]:
    """One CogVLM/CogAgent input per prompt, as the checkout's ``chat`` prepares it (see the module docstring)."""
    from PIL import Image, UnidentifiedImageError
    language, vision = _checkout_module("language"), _checkout_module("vision")
    version = getattr(args, "text_processor_version", None) or "chat"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub name is read from the local cache, never downloaded
    try:
        tokenizer = language.llama2_tokenizer(tokenizer_name, signal_type=version)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "no usable tokenizer"
        raise QuantConfigError(f"--tokenizer {tokenizer_name}: cannot load it ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); pass the folder of the checkpoint's tokenizer (e.g. a downloaded "
                               f"vicuna-7b-v1.5).") from None
    text_processor = language.llama2_text_processor_inference(tokenizer, int(args.max_sequence_length),
                                                             int(args.image_length))
    image_processor = vision.get_image_processor(args.eva_args["image_size"][0])
    cross_processor = vision.get_image_processor(args.cross_image_pix) if hasattr(args, "cross_image_pix") else None

    def cast(tensor):
        return tensor.to(dtype) if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() else tensor

    samples = []
    for prompt in prompts:
        try:
            with Image.open(prompt.image) as opened:
                picture = opened.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise QuantConfigError(f"--calibrate: cannot read {prompt.image} as an image ({exc}); pass JPEG or PNG "
                                   f"files.") from None
        processed = text_processor(text_processor.history_to_prompt(prompt.text, []))
        ids = processed.pop("input_ids")
        if ids.shape[1] > int(args.max_sequence_length):
            raise QuantConfigError(f"--calibrate: the prompt for {prompt.image} is {ids.shape[1]} tokens, more than "
                                   f"the model's {args.max_sequence_length}; shorten its text.")
        if int(ids.max()) >= int(args.vocab_size):
            raise QuantConfigError(f"--tokenizer gives token id {int(ids.max())}, outside this model's vocabulary of "
                                   f"{args.vocab_size}; pass the checkpoint's own tokenizer.")
        _, mask, positions = text_processor.get_func(ids[0], **processed)(ids[0])
        sample = dict(input_ids=ids, position_ids=positions, attention_mask=cast(mask), **processed)
        sample.update({f"vision_{k}": cast(v) for k, v in image_processor(picture).items()})
        if cross_processor is not None:
            sample.update({f"cross_{k}": cast(v) for k, v in cross_processor(picture).items()})
        samples.append(sample)
    return samples


__all__ = ["DEFAULT_TOKENIZER", "ImagePrompt", "read_lines", "read_calibration_file", "load_tokenizer", "text_samples",
           "image_samples"]
