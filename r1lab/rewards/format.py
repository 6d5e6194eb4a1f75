"""Format: does the completion have the structure the template asks for?

Two structures (whitespace between the parts is free):

- "r1-zero": `<think> reasoning </think> <answer> answer </answer>` and nothing but
  whitespace after `</answer>` (the R1-Zero template's instruction);
- "r1-chat": `<think> reasoning </think> summary` (R1's cold-start format).

Each tag appears exactly once, and the reasoning, answer and summary are not blank:
an empty block is the shape of the format without its substance. When the prompt ends
with `<think>` (the template pre-fills it), the completion starts inside the reasoning
and must not open it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from r1lab.rewards.base import RewardFunction, RewardResult, prefills_think, register_reward
from r1lab.tags import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN


@dataclass(frozen=True)
class _Shape:
    """A structure: its tags (each exactly once) and its whole-text pattern, whose groups
    are the reasoning and the part after it; with what to say when either is off."""

    tags: tuple[str, ...]
    pattern: re.Pattern
    mismatch: str  # the text is not in the pattern
    empty_tail: str  # the part after the reasoning is blank


_SHAPES = {
    "r1-zero": _Shape(
        (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE),
        re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL),
        "not <think>...</think> <answer>...</answer> with nothing around",
        "empty answer",
    ),
    "r1-chat": _Shape(
        (THINK_OPEN, THINK_CLOSE),
        re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL),
        "text before <think>",
        "no summary after </think>",
    ),
}
STRUCTURES = tuple(_SHAPES)


def check_format(
    completion: str, structure: str = "r1-zero", prefilled: bool = False
) -> str | None:
    """None when `completion` has the structure, else what is wrong with it."""
    text = THINK_OPEN + completion if prefilled else completion
    shape = _SHAPES.get(structure, _SHAPES["r1-chat"])  # any other name: the chat structure
    for tag in shape.tags:
        count = text.count(tag)
        if count != 1:
            return f"{count} {tag} tags" if count else f"no {tag}"
    m = shape.pattern.fullmatch(text)
    if m is None:
        return shape.mismatch
    if not m.group(1).strip():
        return "empty reasoning"
    if not m.group(2).strip():
        return shape.empty_tail
    return None


class FormatReward(RewardFunction):
    """1.0 when the completion has the `structure`, else 0.0 (the reason says what is off)."""

    def __init__(self, structure: str = "r1-zero", name: str | None = None):
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        super().__init__(name or ("format" if structure == "r1-zero" else "chat_format"))
        self.structure = structure

    def score(self, prompts: list[str], completions: list[str], **_: Any) -> RewardResult:
        reasons = [
            check_format(c, self.structure, prefilled=prefills_think(p))
            for p, c in zip(prompts, completions)
        ]
        return RewardResult([0.0 if r else 1.0 for r in reasons], reasons)


@register_reward("format")
def make_format_reward(structure: str = "r1-zero") -> FormatReward:
    """A fresh format reward for `structure` ("r1-zero" or "r1-chat")."""
    return FormatReward(structure)


@register_reward("chat_format")
def make_chat_format_reward() -> FormatReward:
    """A fresh format reward for the R1 chat structure."""
    return FormatReward("r1-chat")
