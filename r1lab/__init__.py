"""r1lab: the DeepSeek-R1 training recipe, end to end."""

__version__ = "0.1.0"

from r1lab.api import generate, load, save  # noqa: E402
from r1lab.engine.generate import Completion, SamplingParams  # noqa: E402
from r1lab.model.config import ModelConfig  # noqa: E402
from r1lab.model.transformer import Transformer  # noqa: E402

__all__ = ["Completion", "ModelConfig", "SamplingParams", "Transformer", "generate", "load", "save"]
