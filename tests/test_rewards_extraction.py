"""Reading the final answer: think blocks, answer tags, boxes, candidate lists."""

from __future__ import annotations

import pytest

from r1lab.tasks.answers import (
    extract_answer,
    find_boxed,
    is_multiple_answers,
    normalize_answer,
    split_think,
)

EXTRACT_CASES = [
    # (completion, hint, expected)
    (" <think> 2+2=4 </think> <answer> 4 </answer>", None, "4"),
    ("<think>a</think><answer>1</answer> later <answer>2</answer>", None, "2"),
    ("<think>a</think>So \\boxed{\\frac{1}{2}}.", None, "\\frac{1}{2}"),
    ("<think>a</think>\\boxed{1} then \\fbox{2}", None, "2"),
    ("<think>a</think>\\boxed{\\left\\{1, 2\\right\\}}", None, "\\left\\{1, 2\\right\\}"),
    ("<think>a</think><answer>The answer is \\boxed{7}</answer>", None, "7"),
    ("<think>a</think><answer>\\boxed{3}, \\boxed{4}</answer>", None, "\\boxed{3}, \\boxed{4}"),
    # the answer tag wins over a box outside it; r1-chat prefers the box
    ("<think>a</think>\\boxed{5} <answer>6</answer>", None, "6"),
    ("<think>a</think>\\boxed{5} <answer>6</answer>", "r1-chat", "5"),
    ("<think>a</think>\\boxed{5}", "r1-zero", None),
    # inside the reasoning never counts
    ("<think>maybe <answer>3</answer> or \\boxed{3}</think> I give up", None, None),
    ("<think>x <answer>3</answer></think><answer>4</answer>", None, "4"),
    # prompt pre-filled <think>: all before the lone </think> is reasoning
    ("reasoning <answer>3</answer> </think> <answer>4</answer>", None, "4"),
    ("reasoning <answer>3</answer> </think> nothing", None, None),
    # unterminated reasoning: no answer
    ("<think> still thinking <answer>3</answer>", None, None),
    ("<think> a </think> <think> b <answer>3</answer>", None, None),
    # empty answer tag is an (empty) answer
    ("<think>a</think><answer>  </answer>", None, ""),
    # an unclosed box is ignored
    ("<think>a</think>\\boxed{12", None, None),
    # no reasoning block at all: the whole text is outside
    ("<answer>9</answer>", None, "9"),
    ("", None, None),
]


@pytest.mark.parametrize("completion, hint, expected", EXTRACT_CASES)
def test_extract_answer(completion, hint, expected):
    assert extract_answer(completion, hint) == expected


def test_prefilled_flag_makes_a_completion_without_closing_tag_unterminated():
    completion = "thinking... <answer>3</answer>"
    assert extract_answer(completion) == "3"
    assert extract_answer(completion, prefilled=True) is None


def test_split_think_parts():
    parts = split_think("<think> a </think> mid <think> b </think> end")
    assert (parts.thinking, parts.outside.split(), parts.closed) == (
        " a \n b ",
        ["mid", "end"],
        True,
    )
    pre = split_think("a </think> b")
    assert pre.thinking == "a " and pre.outside == " b" and pre.has_think
    assert not split_think("<think> a").closed
    assert not split_think("plain").has_think


def test_find_boxed_balances_braces():
    assert find_boxed("\\boxed{\\frac{a}{b}} and \\boxed {x^{2}}") == ["\\frac{a}{b}", "x^{2}"]
    assert find_boxed("\\boxed{\\{1\\}}") == ["\\{1\\}"]


MULTIPLE_CASES = [
    # (answer, reference, expected)
    ("3 or 4", "3", True),
    ("3 \\text{ or } 4", "3", True),
    ("\\boxed{3} \\boxed{4}", "3", True),
    ("3, 4, 5", "3", True),
    ("3; 4", "3", True),
    ("3 and 4", "3", True),
    ("3 \\\\ 4", "3", True),  # one candidate per line
    ("4 \\\\ 3", None, True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "3", False),  # rows of a matrix
    ("3", "3", False),
    ("1,000", "1000", False),  # thousands separator, not a list
    ("\\$32,348", "\\$32,\\!348", False),
    ("(3, 4)", "5", False),  # a tuple is one answer
    ("7, 5, 3", "3, 5, 7", False),  # the reference is itself a list
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}", False),
    ("-2, 1+\\sqrt5, 1-\\sqrt5", "\\{1\\pm\\sqrt{5},-2\\}", False),
    ("\\text{north}", "\\text{east}", False),  # "or" inside a word
    ("3 or 4", None, True),
    ("3, 4", None, False),  # without a reference a list may be the answer
]


@pytest.mark.parametrize("answer, reference, expected", MULTIPLE_CASES)
def test_is_multiple_answers(answer, reference, expected):
    assert is_multiple_answers(answer, reference) is expected


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90°"),
        ("10,\\!080", "10080"),
        ("\\$18", "18"),
        ("$\\left( 1, 2 \\right)$", "(1,2)"),
        ("\\text{(C)}", "(C)"),
        ("025", "25"),
        ("27.0", "27"),
        (".5", "0.5"),
        ("42.", "42"),
    ],
)
def test_normalize_answer_equal_forms(a, b):
    assert normalize_answer(a) == normalize_answer(b)


@pytest.mark.parametrize(
    "a, b", [("1,2", "12"), ("x", "X"), ("0.50", "0.5"), ("2.5", "25"), ("2 3", "23")]
)
def test_normalize_answer_keeps_different_strings_apart(a, b):
    # "0.50" vs "0.5" is equal in value but left to math-verify: normalisation is not maths.
    assert normalize_answer(a) != normalize_answer(b)
