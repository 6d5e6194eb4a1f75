"""Language consistency: the share of chain-of-thought words in the question's language.

R1 adds this reward in its reasoning RL stage against language mixing. Languages are
told apart by script, which separates English from Chinese (the mixing R1 saw) and any
script from another, but not two languages of one script (English from French).

Counting words:
- a run of Latin letters of length >= 2 is one word; a single letter is a variable
  ("let x be"), neutral;
- each CJK ideograph (and each kana) is one word, as those scripts do not space words;
- a run of letters of any other script (Cyrillic, Hangul, Arabic, ...) is one word;
- digits, punctuation, math symbols, Greek letters, LaTeX commands and math spans
  (`$...$`, `\\(...\\)`, `\\[...\\]`) are neutral: math reads the same in any language.

Decisions:
- The question's language comes from a `language` column (codes "en", "zh", ... or a
  script name) when given, else from the question text (a `question` column, or the
  question found inside the prompt's template), by majority of its words. A question
  with no words ("23+45=?") is taken to be in `default_language` ("en").
- No reasoning at all scores 0.0 (reason "no chain of thought"): the reward is about the
  chain of thought, and the format reward already judges the structure; 0.0 rather than
  None so that a policy cannot escape the term by not thinking.
- Reasoning with no words (pure math) scores 1.0: nothing in it is in another language.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

from r1lab.rewards.base import RewardFunction, RewardResult, prefills_think, register_reward
from r1lab.tasks.answers import split_think

# Language codes -> the scripts they are written in. Other scripts may be named directly
# ("cyrillic", "hangul", "arabic", ...): the first word of their Unicode character names.
LANGUAGE_SCRIPTS: dict[str, tuple[str, ...]] = {
    "en": ("latin",),
    "fr": ("latin",),
    "de": ("latin",),
    "es": ("latin",),
    "it": ("latin",),
    "pt": ("latin",),
    "zh": ("cjk",),
    "ja": ("cjk", "hiragana", "katakana"),
    "ko": ("hangul",),
    "ru": ("cyrillic",),
    "uk": ("cyrillic",),
    "ar": ("arabic",),
}

_MATH_SPAN = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]", re.DOTALL)
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_NEUTRAL_SCRIPTS = {"greek", "mathematical", "digit"}
_UNSPACED = {"cjk", "hiragana", "katakana"}  # one character is one word


def _script(ch: str) -> str | None:
    """The script of a letter (lowercase Unicode name prefix), or None if not a letter."""
    if "a" <= ch <= "z" or "A" <= ch <= "Z":
        return "latin"
    if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or "\uf900" <= ch <= "\ufaff":
        return "cjk"
    if ch.isascii() or not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return None
    if " LATIN " in f" {name} ":  # accented and full-width Latin letters
        return "latin"
    script = name.split(" ", 1)[0].lower()
    return None if script in _NEUTRAL_SCRIPTS else script


def count_words(text: str) -> Counter:
    """Words of `text` per script, by the counting rules of this module."""
    text = _MATH_SPAN.sub(" ", text)
    text = _LATEX_COMMAND.sub(" ", text)
    counts: Counter = Counter()
    run_script, run_len = None, 0

    def close_run() -> None:
        if run_script is not None and not (run_script == "latin" and run_len < 2):
            counts[run_script] += 1

    for ch in text:
        script = _script(ch)
        if script is not None and script == run_script:
            run_len += 1
            continue
        if ch in "'\u2019" and run_script == "latin":
            continue  # an apostrophe inside a Latin word ("don't") does not split it
        close_run()
        run_script, run_len = None, 0
        if script in _UNSPACED:
            counts[script] += 1
        elif script is not None:
            run_script, run_len = script, 1
    close_run()
    return counts


def detect_language(text: str) -> str | None:
    """The script most of the words of `text` are in ("latin", "cjk", ...), None if no words.

    Kana counts towards CJK here, so a Japanese question is told apart from Latin text.
    """
    counts = count_words(text)
    counts["cjk"] += counts.pop("hiragana", 0) + counts.pop("katakana", 0)
    counts = +counts
    if not counts:
        return None
    return max(sorted(counts), key=lambda s: counts[s])


# Where templates put the question: (opening marker, closing marker).
_QUESTION_MARKERS = (
    ("<|im_start|>user", "<|im_end|>"),
    ("<|start_header_id|>user<|end_header_id|>", "<|eot_id|>"),
    ("<|user|>", "<|assistant|>"),
    ("<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"),
    ("[INST]", "[/INST]"),
    ("User:", "Assistant:"),
)


def question_from_prompt(prompt: str) -> str:
    """The question inside a rendered prompt (the template's own words would outvote it)."""
    for start, end in _QUESTION_MARKERS:
        i = prompt.rfind(start)
        if i < 0:
            continue
        j = prompt.find(end, i + len(start))
        body = prompt[i + len(start) : j if j >= 0 else len(prompt)]
        return body.strip().removesuffix(".")
    return prompt


# The reason a completion without a chain of thought gets: a reward of 0 (RL must not pay
# for skipping the reasoning), but nothing to measure for readability (evaluation skips it).
NO_CHAIN_OF_THOUGHT = "no chain of thought"


def consistency(thinking: str, language: str) -> float:
    """Share of the words of `thinking` written in `language`'s script (1.0 if no words)."""
    counts = count_words(thinking)
    total = sum(counts.values())
    if total == 0:
        return 1.0
    scripts = LANGUAGE_SCRIPTS.get(language, (language,))
    return sum(counts[s] for s in scripts) / total


class LanguageConsistencyReward(RewardFunction):
    """Share of chain-of-thought words in the question's language (see module docstring)."""

    def __init__(self, default_language: str = "en", name: str = "language_consistency"):
        super().__init__(name)
        self.default_language = default_language

    def score(
        self,
        prompts: list[str],
        completions: list[str],
        question: list[str] | None = None,
        language: list[str | None] | None = None,
        **_: Any,
    ) -> RewardResult:
        scores, reasons = [], []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            lang = language[i] if language is not None else None
            if not lang:
                text = question[i] if question is not None else question_from_prompt(prompt)
                lang = detect_language(text) or self.default_language
            thinking = split_think(completion, prefilled=prefills_think(prompt)).thinking
            if not thinking.strip():
                scores.append(0.0)
                reasons.append(NO_CHAIN_OF_THOUGHT)
                continue
            scores.append(consistency(thinking, lang))
            reasons.append(None)
        return RewardResult(scores, reasons)


@register_reward("language_consistency")
def make_language_consistency_reward(default_language: str = "en") -> LanguageConsistencyReward:
    """A fresh language-consistency reward."""
    return LanguageConsistencyReward(default_language)
