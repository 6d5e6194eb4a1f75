"""Reading the final answer out of a completion, and comparing it with a reference.

Shared by the rewards and the tasks, so that training and evaluation read answers the
same way.

Reading rules (`extract_answer`):

- Only text outside the reasoning counts. Text inside `<think> ... </think>` never does;
  a completion whose prompt pre-filled `<think>` starts inside the reasoning, so
  everything before a `</think>` that has no opening tag is reasoning too. A reasoning
  block that is never closed means the model never answered: no answer.
- The final answer is the content of the last `<answer> ... </answer>` outside the
  reasoning; without one, the content of the last `\\boxed{...}` (or `\\fbox{...}`).
  An answer tag holding exactly one `\\boxed{...}` is read as that box's content.

Comparison (`judge_math`, `judge_exact`) returns a `Verdict`: a score, or `None` with the
reason when the checker itself failed (math-verify raised or timed out). A failure of the
checker is never reported as a wrong answer, because a silent zero would teach the policy
that a correct answer was wrong.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from r1lab.tags import THINK_OPEN

logger = logging.getLogger(__name__)


_THINK_TAG = re.compile(r"</?think>")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")

# Seconds math-verify may spend on one parse or one comparison before we give up on it.
MATH_VERIFY_TIMEOUT_S = 5
# A final answer longer than this is a dump, not an answer; sympy is not asked to read it
# (parsing cost grows fast with length, and outside the main thread there is no timeout).
MAX_ANSWER_CHARS = 1000


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """A completion split into its reasoning and the rest.

    `thinking` is the text of all reasoning blocks joined by newlines; `outside` the text
    outside them; `closed` is False when a reasoning block was opened and never closed;
    `has_think` says whether any reasoning tag was seen at all.
    """

    thinking: str
    outside: str
    closed: bool
    has_think: bool


def split_think(completion: str, prefilled: bool = False) -> Parts:
    """Split a completion into reasoning and outside text.

    Tags are read as a nesting depth: text counts as outside only at depth 0. A
    `</think>` met at depth 0 means the completion began inside the reasoning (the prompt
    opened it), so everything outside seen so far was reasoning after all.
    `prefilled=True` says so up front (the prompt ended with `<think>`).
    """
    thinking: list[str] = []
    outside: list[str] = []
    depth = 1 if prefilled else 0
    pos = 0
    seen = prefilled
    for tag in _THINK_TAG.finditer(completion):
        seen = True
        chunk = completion[pos : tag.start()]
        (thinking if depth > 0 else outside).append(chunk)
        pos = tag.end()
        if tag.group() == THINK_OPEN:
            depth += 1
        elif depth > 0:
            depth -= 1
        else:  # a closing tag with nothing open: all before it was reasoning
            thinking.extend(outside)
            outside.clear()
    (thinking if depth > 0 else outside).append(completion[pos:])
    return Parts(
        thinking="\n".join(t for t in thinking if t.strip()),
        outside="".join(outside),
        closed=depth == 0,
        has_think=seen,
    )


def find_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` in `text`, braces balanced.

    A box whose braces never close is ignored (the model was cut off mid-answer).
    """
    found = []
    for m in _BOX_OPEN.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "{}":
                i += 2  # an escaped brace is content, not structure
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found.append(text[m.end() : i - 1])
    return found


def extract_answer(
    completion: str, template_hint: str | None = None, prefilled: bool = False
) -> str | None:
    """The final answer of a completion, stripped; `None` when there is none.

    `template_hint` picks where the answer is looked for first: "r1-zero" reads only the
    answer tag (the format that template asks for), "r1-chat" prefers the last box in the
    summary and falls back to an answer tag; anything else (None, "plain") reads the answer
    tag first, then the last box. An empty answer tag gives "" (an answer that is empty,
    judged wrong), not None.
    """
    parts = split_think(completion, prefilled=prefilled)
    if not parts.closed:
        return None
    text = parts.outside

    def from_tag() -> str | None:
        tags = _ANSWER_TAG.findall(text)
        if not tags:
            return None
        content = tags[-1].strip()
        boxes = find_boxed(content)
        return boxes[0].strip() if len(boxes) == 1 else content

    def from_box() -> str | None:
        boxes = find_boxed(text)
        return boxes[-1].strip() if boxes else None

    if template_hint == "r1-zero":
        return from_tag()
    if template_hint == "r1-chat":
        order = (from_box, from_tag)
    else:
        order = (from_tag, from_box)
    for read in order:
        answer = read()
        if answer is not None:
            return answer
    return None


# --- candidate lists --------------------------------------------------------------------

_OR_WORD = re.compile(r"(?:\\text\{\s*or\s*\}|\\mbox\{\s*or\s*\}|\bor\b)")
_ENVIRONMENT = re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)
_AND_WORD = re.compile(r"(?:\\text\{\s*and\s*\}|\\mbox\{\s*and\s*\}|\band\b)")


def _top_level_split(text: str, sep: str) -> list[str]:
    """Split on `sep` only outside (), [], {} so tuples and intervals stay whole."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _is_list(text: str) -> bool:
    """True when `text` is a top-level list of several items (commas or semicolons)."""
    text = normalize_answer(text)  # drops thousands separators, delimiters, spacing
    for sep in ",;":
        items = [p for p in _top_level_split(text, sep) if p.strip()]
        if len(items) > 1:
            return True
    return False


def _single_valued(reference: str) -> bool:
    """True when a reference is one value: no list, set, tuple, matrix, "and", "or", ±, ∪."""
    if _OR_WORD.search(reference) or _AND_WORD.search(reference):
        return False
    return not re.search(r",|;|\\pm|\\mp|\\cup|\\\\|matrix", normalize_answer(reference))


def is_multiple_answers(answer: str, reference: str | None = None) -> bool:
    """True when `answer` offers several candidates instead of one final answer.

    Hedging ("3 or 4", two boxes, "3, 4, 5" for a single-valued question) would let a
    policy collect reward by listing guesses, so it is judged wrong. The rules:

    - more than one `\\boxed{}` in the answer;
    - lines: a LaTeX line break `\\\\` between two non-empty parts outside a matrix or
      other environment;
    - alternatives joined by the word "or" (unless the reference itself says "or");
    - when a reference is given and it is a single value (no comma, set, matrix, ±, "and",
      "or"): a top-level list (commas or semicolons outside brackets, thousands separators
      excepted) or items joined by "and".

    A list answer to a question whose reference is a list ("3, 5, 7") is not flagged:
    that is one answer, compared as a whole.
    """
    if len(find_boxed(answer)) > 1:
        return True
    lines = [line for line in _ENVIRONMENT.sub(" ", answer).split("\\\\") if line.strip()]
    if len(lines) > 1:
        return True
    ref = reference or ""
    if _OR_WORD.search(answer) and not _OR_WORD.search(ref):
        return True
    if reference is not None and _single_valued(reference):
        if _is_list(answer) or _AND_WORD.search(answer):
            return True
    return False


# --- normalisation (the cheap path) -----------------------------------------------------

_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,!;: ]|\\q?quad")
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°")


def normalize_answer(answer: str) -> str:
    """A canonical string for cheap equality: same string means same answer.

    Only rewrites that never change the value: math delimiters, spacing (except between
    two digits),
    \\left/\\right, \\dfrac -> \\frac, degree marks, \\text{} wrappers, thousands
    separators in a plain number, leading zeros and a ".0" tail of an integer, a final
    period. Anything subtler is left to math-verify.
    """
    s = answer.strip()
    s = re.sub(r"^\$+|\$+$", "", s).strip()
    if s.startswith("\\(") and s.endswith("\\)") or s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    s = s.rstrip(".").strip()
    s = _SPACING.sub("", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _DEGREES.sub("", s)
    s = _TEXT_WRAP.sub(r"\1", s)
    s = s.replace("{,}", ",").replace("\\$", "")
    s = re.sub(r"(?<=\d)\s+(?=\d)", " ", s)  # "2 3" is not "23": keep one space there
    s = re.sub(r"(?<!\d)\s+|\s+(?!\d)", "", s)
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"[+-]?\d+(?:\.0*)?", s):
        s = str(int(s.split(".")[0]))
    s = re.sub(r"^([+-]?)\.(?=\d)", r"\g<1>0.", s)
    return s


# --- judging ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """The result of checking one answer.

    `score` is in [0, 1] (1 = correct), or None when the checker failed; `reason` says
    why the score is None, or names a notable judged case ("no answer"); None otherwise.
    """

    score: float | None
    reason: str | None = None

    @property
    def correct(self) -> bool:
        return self.score is not None and self.score >= 1.0


def judge_exact(predicted: str, reference: str) -> Verdict:
    """Exact match after `normalize_answer` (for answers that are labels or plain ints)."""
    return Verdict(1.0 if normalize_answer(predicted) == normalize_answer(reference) else 0.0)


class MathVerifyTimeout(Exception):
    """math-verify ran past its time limit."""


def _timeout_s() -> int | None:
    # math-verify's timeouts use SIGALRM, which exists only in the main thread; elsewhere
    # we run without one rather than fail every check.
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_S
    return None


def _mv_parse(text: str) -> list:
    from math_verify import parse
    from math_verify.errors import TimeoutException

    try:
        return parse(text, parsing_timeout=_timeout_s(), raise_on_error=True)
    except TimeoutException as e:  # a BaseException in math-verify; turn it into ours
        raise MathVerifyTimeout(f"parsing {text[:80]!r}") from e


@functools.lru_cache(maxsize=8192)
def _parse_reference(reference: str) -> tuple:
    # References repeat across a group of samples; parse each once.
    return tuple(_mv_parse(f"${reference}$"))


def _prediction_for_parsing(predicted: str) -> str:
    """The prediction as math-verify should see it: LaTeX inside `$...$`.

    An answer already carrying math delimiters or a box is passed as is; a lone `$` is a
    currency sign ("$18"), not a delimiter, and is dropped.
    """
    s = predicted.strip()
    if s.count("$") - s.count("\\$") == 1:
        s = s.replace("\\$", "\x00").replace("$", "").replace("\x00", "\\$")
    if "$" in s.replace("\\$", "") or "\\(" in s or "\\[" in s or find_boxed(s):
        return s
    return f"${s}$"


_RATIONAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_DECIMALS = re.compile(r"\d*\.(\d+)")


def _as_rational(text: str) -> Fraction | None:
    """The exact value of a plain written decimal ("0.0000672", "-3", "27.0"), else None
    (fractions and everything else are left to math-verify)."""
    s = normalize_answer(text)
    return Fraction(s) if _RATIONAL.fullmatch(s) else None


def _written_decimals(text: str) -> int:
    """The most digits written after a decimal point in `text`: math-verify's float rounding
    must keep them all, or ".0000673" rounds to ".0000672"'s value."""
    return max((len(m.group(1)) for m in _DECIMALS.finditer(text)), default=0)


def judge_math(predicted: str, reference: str, fast_path: bool = True) -> Verdict:
    """Mathematical equivalence of a final answer and a reference, with math-verify.

    The reference is parsed as LaTeX wrapped in `$...$`. A string match after
    `normalize_answer` settles most cases without sympy (`fast_path`). math-verify
    exceptions and timeouts give `Verdict(None, reason)`: the checker failed, not the
    model. A prediction that math-verify cannot read at all, or longer than
    `MAX_ANSWER_CHARS`, is a wrong answer. Two plain written decimals (or integers) are
    compared exactly as rationals; otherwise math-verify rounds floats to no fewer
    digits than either side writes out (never fewer than its default 6), so a written
    digit is never rounded away.
    """
    from math_verify import verify
    from math_verify.errors import TimeoutException

    if not predicted.strip():
        return Verdict(0.0, "empty answer")
    if len(predicted) > MAX_ANSWER_CHARS:
        return Verdict(0.0, f"answer longer than {MAX_ANSWER_CHARS} characters")
    if fast_path and normalize_answer(predicted) == normalize_answer(reference):
        return Verdict(1.0)
    exact = _as_rational(predicted), _as_rational(reference)
    if None not in exact:  # two written numbers: compared exactly, no rounding
        return Verdict(1.0 if exact[0] == exact[1] else 0.0)
    rounding = max(6, _written_decimals(predicted), _written_decimals(reference))
    try:
        gold = _parse_reference(reference)
        if not gold:
            return Verdict(None, f"math-verify could not parse the reference {reference!r}")
        pred = _mv_parse(_prediction_for_parsing(predicted))
    except MathVerifyTimeout:
        return Verdict(None, "math-verify timeout while parsing")
    except Exception as e:  # noqa: BLE001  (any failure of the checker is reported)
        return Verdict(None, f"math-verify parse error: {type(e).__name__}: {e}"[:300])
    if not pred:
        return Verdict(0.0, "unparsable answer")
    failure = None
    # Pair by pair so that one comparison that raises does not hide another that matches.
    for g in gold:
        for p in pred:
            try:
                if verify(
                    g,
                    p,
                    float_rounding=rounding,
                    numeric_precision=max(15, rounding + 5),
                    timeout_seconds=_timeout_s(),
                    raise_on_error=True,
                ):
                    return Verdict(1.0)
            except TimeoutException:
                failure = "math-verify timeout while comparing"
            except Exception as e:  # noqa: BLE001
                failure = f"math-verify compare error: {type(e).__name__}: {e}"[:300]
    if failure is not None:
        logger.warning("%s (prediction %r, reference %r)", failure, predicted[:80], reference)
        return Verdict(None, failure)
    return Verdict(0.0)
