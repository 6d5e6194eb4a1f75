"""The readability filters of R1's rejection sampling, as checks on one response.

R1's third stage keeps only correct samples from the RL checkpoint and then drops chains
of thought that are hard to read: "mixed languages, long paragraphs, and code blocks"
(R1_RECIPE.md). We add the structure check, because SFT on a response without a closed
reasoning block followed by a summary would teach the model a broken format.

Each filter is a small pure function returning True when the response should be dropped,
so each can be tested on crafted text and counted separately in the rejection summary.
Language consistency itself is scored by the rewards module (the same number the RL stage
rewards); the filter only compares that score with a threshold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from r1lab.rewards.format import STRUCTURES, check_format
from r1lab.tasks.answers import split_think

# In the order they are applied; the rejection summary counts drops in this order.
FILTERS = ("structure", "code_block", "long_paragraph", "mixed_language")

DEFAULT_MAX_PARAGRAPH_CHARS = 1500
DEFAULT_MIN_LANGUAGE_CONSISTENCY = 0.95

# Blank lines end a paragraph, and so do the think tags (reasoning and summary are apart).
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n|</?think>")
_FENCE = "```"


def structure_problem(
    response: str, structure: str = "r1-chat", prefilled: bool = False
) -> str | None:
    """What is wrong with the response's structure, or None when it has it.

    The check is the format reward's (`r1lab.rewards.format.check_format`): one non-empty
    think block, then a non-empty summary ("r1-chat") or answer tag ("r1-zero").
    """
    return check_format(response, structure, prefilled=prefilled)


def missing_structure(response: str, structure: str = "r1-chat", prefilled: bool = False) -> bool:
    """True when the response lacks the reasoning-then-summary structure."""
    return structure_problem(response, structure, prefilled) is not None


def has_code_block(response: str, prefilled: bool = False) -> bool:
    """True when a fenced code block (```) appears inside the chain of thought.

    Code in the summary is fine (an answer may be code); in the reasoning it is the
    unreadable kind of chain of thought R1 filtered out.
    """
    parts = split_think(response, prefilled=prefilled)
    return _FENCE in parts.thinking


def paragraphs(text: str) -> list[str]:
    """Paragraphs: text between blank lines or think tags, stripped, empty ones dropped."""
    return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def longest_paragraph(text: str) -> int:
    """Length in characters of the longest paragraph (characters, so Chinese counts too)."""
    return max((len(p) for p in paragraphs(text)), default=0)


def has_long_paragraph(response: str, max_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS) -> bool:
    """True when any paragraph of the response is longer than `max_chars` characters."""
    return longest_paragraph(response) > max_chars


def is_mixed_language(
    language_consistency: float | None, threshold: float = DEFAULT_MIN_LANGUAGE_CONSISTENCY
) -> bool:
    """True when the chain of thought's language-consistency score is below `threshold`.

    A score of None (nothing the reward could judge, e.g. an empty chain of thought) is not
    mixed language; the structure filter deals with empty reasoning.
    """
    return language_consistency is not None and language_consistency < threshold


def readability_problems(
    response: str,
    *,
    language_consistency: float | None = None,
    filters: Iterable[str] = FILTERS,
    max_paragraph_chars: int = DEFAULT_MAX_PARAGRAPH_CHARS,
    min_language_consistency: float = DEFAULT_MIN_LANGUAGE_CONSISTENCY,
    structure: str = "r1-chat",
    prefilled: bool = False,
) -> list[str]:
    """Names of the enabled filters that reject `response`, in `FILTERS` order (empty = keep).

    `structure` is the format the response should have: "r1-chat" (`<think> ... </think>
    summary`, R1's SFT format) or "r1-zero" (the summary is an answer tag).
    """
    if structure not in STRUCTURES:
        raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
    enabled = set(check_filter_names(filters))
    checks = {
        "structure": lambda: missing_structure(response, structure, prefilled),
        "code_block": lambda: has_code_block(response, prefilled),
        "long_paragraph": lambda: has_long_paragraph(response, max_paragraph_chars),
        "mixed_language": lambda: is_mixed_language(language_consistency, min_language_consistency),
    }
    return [name for name in FILTERS if name in enabled and checks[name]()]


def check_filter_names(filters: Iterable[str]) -> list[str]:
    """The filter names as a list; an unknown name is an error that lists the known ones."""
    names = list(filters)
    unknown = [f for f in names if f not in FILTERS]
    if unknown:
        raise ValueError(
            f"unknown readability filter(s) {unknown}; known filters: {', '.join(FILTERS)}"
        )
    return names


def normalized_text(text: str) -> str:
    """Text for duplicate detection: case-folded, whitespace runs collapsed to one space."""
    return " ".join(text.casefold().split())
