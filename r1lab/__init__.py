"""r1lab: the DeepSeek-R1 training recipe, end to end.

The public names below load on first use (PEP 562), so `import r1lab.cli` and
`r1lab --help` do not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that owns it
_OWNERS = {
    "generate": "r1lab.api",
    "load": "r1lab.api",
    "save": "r1lab.api",
    "Completion": "r1lab.engine.generate",
    "SamplingParams": "r1lab.engine.generate",
    "ModelConfig": "r1lab.model.config",
    "Transformer": "r1lab.model.transformer",
}
__all__ = ["Completion", "ModelConfig", "SamplingParams", "Transformer", "generate", "load", "save"]

if TYPE_CHECKING:
    from r1lab.api import generate, load, save
    from r1lab.engine.generate import Completion, SamplingParams
    from r1lab.model.config import ModelConfig
    from r1lab.model.transformer import Transformer


def __getattr__(name: str):
    if name not in _OWNERS:
        raise AttributeError(f"module 'r1lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(_OWNERS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_OWNERS])
