"""The tags of the R1 output format, defined once.

The tokenizer makes each a single token (`r1lab.model.tokenizer`), the answer parsers and
the format reward read them from decoded text (`r1lab.tasks.answers`, `r1lab.rewards`).
"""

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
