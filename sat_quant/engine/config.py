"""QuantConfig: the plain, JSON-serialisable description of how a model is quantized.

One config decides, for every linear layer by its module name, which format (or full precision)
it gets: ``plan`` globs first (mixed precision), then ``skip`` globs, then the default format.
"""
from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..errors import QuantConfigError
from .backends import BACKEND_CHOICES
from .formats import DEFAULT_FORMAT_FOR_BITS, FORMATS, LayerSpec, get_format

CONFIG_VERSION = 1
# LM heads stay full precision unless --quant-lm-head: they are small and very sensitive.
LM_HEAD_PATTERNS: Tuple[str, ...] = ("*lm_head", "*lm_head.*", "*output_layer")
FULL_PRECISION = "fp"  # plan value meaning "leave this layer unquantized"


@dataclass
class QuantConfig:
    """How to quantize a model. ``bits`` is what CogVLM users type (--quant 4 / 8)."""

    bits: int = 4
    format: Optional[str] = None          # None → DEFAULT_FORMAT_FOR_BITS[bits]
    group_size: Optional[int] = None      # None → the format's default
    skip: Tuple[str, ...] = ()            # globs on module names kept full precision
    plan: Dict[str, str] = field(default_factory=dict)  # glob → "fmt[:group]" or "fp"; exact name, then first match
    backend: str = "auto"
    quantize_lm_head: bool = False
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.skip = tuple(self.skip or ())
        self.plan = dict(self.plan or {})
        if self.format is None and self.bits in DEFAULT_FORMAT_FOR_BITS:
            self.format = DEFAULT_FORMAT_FOR_BITS[self.bits]

    # -- validation ---------------------------------------------------------------------------------
    def validate(self) -> "QuantConfig":
        """Check everything that does not need the model; raises QuantConfigError naming the flag."""
        if self.version != CONFIG_VERSION:
            raise QuantConfigError(f"quantization config version {self.version} is not supported by this sat_quant "
                                   f"(it reads version {CONFIG_VERSION}); upgrade sat_quant or re-convert the checkpoint.")
        if self.bits not in (4, 8):
            raise QuantConfigError(f"--quant {self.bits} is not supported; use --quant 4 or --quant 8.")
        fmt = get_format(self.format)
        if fmt.bits != self.bits:
            raise QuantConfigError(f"--quant-format {fmt.name} is a {fmt.bits}-bit format but --quant is {self.bits}; "
                                   f"use --quant {fmt.bits} or a {self.bits}-bit format "
                                   f"({', '.join(n for n, f in FORMATS.items() if f.bits == self.bits)}).")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 2):
            raise QuantConfigError(f"--quant-group-size {self.group_size} must be a positive even number (e.g. 64 or 128).")
        for pattern, value in self.plan.items():
            if value != FULL_PRECISION:
                try:
                    parse_plan_value(value, self.group_size)
                except QuantConfigError as exc:
                    raise QuantConfigError(f"--quant-plan entry '{pattern}': {exc}") from None
        if self.backend not in BACKEND_CHOICES:
            raise QuantConfigError(f"--quant-backend {self.backend} is unknown; use one of {', '.join(BACKEND_CHOICES)}.")
        return self

    # -- per layer ----------------------------------------------------------------------------------
    def _entry_for(self, name: str) -> Optional[Tuple[str, Optional[int]]]:
        """(format, group size) for the layer called ``name``, or None to keep it full precision."""
        value = self.plan.get(name)  # exact names first: checkpoints list every layer by name
        if value is None:
            value = next((v for pattern, v in self.plan.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if value is not None:
            return None if value == FULL_PRECISION else parse_plan_value(value, self.group_size)
        if any(fnmatch.fnmatchcase(name, p) for p in self.skip):
            return None
        if not self.quantize_lm_head and any(fnmatch.fnmatchcase(name, p) for p in LM_HEAD_PATTERNS):
            return None
        return self.format, self.group_size

    def format_for(self, name: str) -> Optional[str]:
        """Format name for the layer called ``name``, or None to keep it full precision."""
        entry = self._entry_for(name)
        return None if entry is None else entry[0]

    def spec_for(self, name: str, out_features: int, in_features: int) -> Optional[LayerSpec]:
        entry = self._entry_for(name)
        if entry is None:
            return None
        return get_format(entry[0]).spec(out_features, in_features, entry[1], where=name)

    def unmatched_patterns(self, names: List[str]) -> List[str]:
        """Skip/plan globs that match no layer (probably a typo: reported as a warning)."""
        patterns = list(self.skip) + list(self.plan)
        return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]

    # -- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["skip"] = list(self.skip)
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "QuantConfig":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise QuantConfigError(f"unknown keys {unknown} in quantization config; was it written by a newer sat_quant?")
        return cls(**known)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        return cls.from_dict(json.loads(text))


def parse_plan_value(value: str, default_group: Optional[int]) -> Tuple[str, Optional[int]]:
    """A plan value is a format name, optionally with its group size: "int8", "int4", "int4:64"."""
    name, _, group = value.partition(":")
    get_format(name)
    if not group:
        return name, default_group
    if not group.isdigit() or int(group) <= 0:
        raise QuantConfigError(f"plan value '{value}': the group size after ':' must be a positive integer")
    return name, int(group)


def load_plan_file(path: str) -> Dict[str, str]:
    """Read a ``--quant-plan`` JSON file: an object mapping module-name globs to a format name or "fp"."""
    try:
        with open(path) as f:
            plan = json.load(f)
    except OSError as exc:
        raise QuantConfigError(f"--quant-plan {path}: cannot read the file ({exc.strerror}).") from None
    except json.JSONDecodeError as exc:
        raise QuantConfigError(f"--quant-plan {path}: not valid JSON ({exc}).") from None
    if not isinstance(plan, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in plan.items()):
        raise QuantConfigError(f"--quant-plan {path}: expected a JSON object of glob → format name, e.g. "
                               '{"*.attention.*": "int8", "*": "int4"}.')
    return plan
