"""r1lab: the DeepSeek-R1 training recipe, end to end."""

__version__ = "0.1.0"
