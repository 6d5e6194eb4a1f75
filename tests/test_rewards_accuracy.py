"""Accuracy reward on real MATH-500 references: equivalent forms earn 1, wrong or gamed 0.

The references are read from the shared data folder (R1LAB_DATA, else ../shared/data);
the tests skip when it is absent.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from r1lab.rewards import AccuracyReward, get_reward
from r1lab.tasks import Example, Task, get_task
from r1lab.tasks.answers import judge_math

REPO = Path(__file__).resolve().parents[1]

accuracy_reward = get_reward("accuracy")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    path = Path(os.environ.get("R1LAB_DATA") or REPO.parent / "shared" / "data")
    if not (path / "math500.jsonl").is_file():
        pytest.skip(f"benchmark data not found in {path}")
    return path


@pytest.fixture(scope="module")
def math500(data_dir) -> dict[str, str]:
    """unique_id -> reference answer, straight from the file."""
    rows = [json.loads(line) for line in (data_dir / "math500.jsonl").open()]
    return {r["unique_id"]: r["answer"] for r in rows}


def zero(answer: str) -> str:
    """An R1-Zero completion answering `answer` in the answer tag."""
    return f" <think> working it out </think> <answer> {answer} </answer>"


def chat(answer: str) -> str:
    """An R1 chat completion with the answer boxed in the summary."""
    return f"<think>\nworking it out\n</think>\nSo the answer is $\\boxed{{{answer}}}$."


def score(completion: str, reference: str, prompt: str = "Q") -> tuple[float | None, str | None]:
    result = accuracy_reward([prompt], [completion], answer=[reference])
    return result[0], result.reasons[0]


# (MATH-500 unique_id, the reference as stored, an equivalent answer in another form)
EQUIVALENT = [
    ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("test/algebra/2584.json", "\\frac{14}{3}", "14/3"),
    ("test/algebra/2584.json", "\\frac{14}{3}", "4\\frac{2}{3}"),
    ("test/algebra/1349.json", "\\text{Evelyn}", "Evelyn"),
    ("test/precalculus/927.json", "90^\\circ", "90"),
    ("test/precalculus/927.json", "90^\\circ", "90^{\\circ}"),
    ("test/precalculus/44.json", "120^\\circ", "120°"),
    ("test/precalculus/990.json", "6 - 5i", "-5i + 6"),
    ("test/intermediate_algebra/428.json", "3, 5, 7", "7, 5, 3"),
    ("test/intermediate_algebra/1217.json", "x^5 - x^4 + x^3 - x^2 + x - 1", "x^5-x^4+x^3-x^2+x-1"),
    ("test/precalculus/24313.json", "\\cot x", "\\frac{\\cos x}{\\sin x}"),
    ("test/intermediate_algebra/662.json", "1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}"),
    (
        "test/precalculus/1300.json",
        "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}",
        "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}",
    ),
    ("test/intermediate_algebra/558.json", "(3,4]", "(3, 4]"),
    ("test/intermediate_algebra/515.json", "\\frac43", "\\dfrac{4}{3}"),
    ("test/prealgebra/1655.json", "\\dfrac{17}{50}", "0.34"),
    ("test/prealgebra/1655.json", "\\dfrac{17}{50}", "\\frac{17}{50}"),
    ("test/prealgebra/153.json", "\\frac 59", "5/9"),
    ("test/prealgebra/1003.json", "\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
    ("test/number_theory/598.json", ".0000672", "6.72 \\times 10^{-5}"),
    ("test/number_theory/410.json", ".35625", "\\frac{57}{160}"),
    ("test/counting_and_probability/508.json", "10,\\!080", "10080"),
    ("test/counting_and_probability/508.json", "10,\\!080", "10,080"),
    ("test/number_theory/417.json", "11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("test/counting_and_probability/737.json", "58,500", "58500"),
    ("test/precalculus/819.json", "\\text{(C)}", "C"),
    ("test/precalculus/819.json", "\\text{(C)}", "(C)"),
    ("test/precalculus/819.json", "\\text{(C)}", "\\textbf{(C)}"),
    ("test/algebra/2626.json", "\\$32,\\!348", "32348"),
    ("test/algebra/2626.json", "\\$32,\\!348", "\\$32,348"),
    ("test/algebra/2780.json", "\\$18.90", "18.9"),
    ("test/prealgebra/1203.json", "\\$36", "$36"),
    ("test/geometry/473.json", "864 \\mbox{ inches}^2", "864"),
    ("test/prealgebra/1044.json", "5.4 \\text{ cents}", "5.4"),
    ("test/geometry/826.json", "1\\frac{4}{5}", "\\frac{9}{5}"),
    ("test/geometry/826.json", "1\\frac{4}{5}", "1.8"),
    ("test/algebra/2470.json", "137 \\frac{1}{2}", "137.5"),
    ("test/algebra/2257.json", "\\frac9{19}", "\\frac{9}{19}"),
    ("test/algebra/2486.json", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", "(0.6, 8/3]"),
    ("test/intermediate_algebra/1992.json", "(0,9) \\cup (9,36)", "(0, 9) \\cup (9, 36)"),
    ("test/algebra/101.json", "x \\in [-2,7]", "[-2, 7]"),
    ("test/prealgebra/1784.json", "326.5", "\\frac{653}{2}"),
    (
        "test/intermediate_algebra/2015.json",
        "\\{1\\pm\\sqrt{5},-2\\}",
        "-2, 1+\\sqrt{5}, 1-\\sqrt{5}",
    ),
    ("test/precalculus/323.json", "y = 2x + 3", "2x + 3"),
    ("test/algebra/2036.json", "3\\sqrt{13}", "\\sqrt{117}"),
]


@pytest.mark.parametrize("uid, stored, form", EQUIVALENT)
@pytest.mark.parametrize("wrap", [zero, chat], ids=["answer-tag", "boxed"])
def test_equivalent_forms_of_real_references_earn_one(math500, uid, stored, form, wrap):
    reference = math500[uid]
    assert reference == stored  # the row is the one this case was written for
    assert score(wrap(form), reference) == (1.0, None)


# (unique_id, a wrong or gamed completion, the reason recorded)
WRONG = [
    ("test/algebra/2584.json", zero("4.67"), None),
    ("test/precalculus/927.json", zero("91"), None),
    ("test/intermediate_algebra/558.json", zero("[3,4]"), None),
    ("test/precalculus/819.json", zero("\\text{(D)}"), None),
    ("test/intermediate_algebra/428.json", zero("3, 5"), None),
    ("test/precalculus/807.json", zero("(3, \\pi)"), None),
    # the right answer, but only inside the reasoning
    (
        "test/algebra/2584.json",
        " <think> it is <answer>\\frac{14}{3}</answer> \\boxed{\\frac{14}{3}} </think> done",
        "no answer",
    ),
    (
        "test/algebra/2584.json",
        " <think> it is \\frac{14}{3} </think> <answer> 5 </answer>",
        None,
    ),
    # several candidates
    ("test/algebra/2584.json", zero("\\frac{14}{3} or 5"), "multiple answers"),
    ("test/algebra/2584.json", zero("\\boxed{\\frac{14}{3}} \\boxed{5}"), "multiple answers"),
    ("test/precalculus/927.json", zero("90, 45, 30"), "multiple answers"),
    ("test/precalculus/927.json", zero("90 \\text{ or } 45"), "multiple answers"),
    ("test/precalculus/927.json", zero("90 \\\\ 45"), "multiple answers"),
    ("test/precalculus/927.json", zero("45 \\\\ 90"), "multiple answers"),
    ("test/precalculus/927.json", zero("90 " * 400), "answer longer than 1000 characters"),
    # empty answer, no answer at all, reasoning never closed
    ("test/algebra/2584.json", " <think> hmm </think> <answer> </answer>", "empty answer"),
    ("test/algebra/2584.json", " <think> hmm </think> it is 14/3", "no answer"),
    ("test/algebra/2584.json", " <think> hmm <answer>\\frac{14}{3}</answer>", "no answer"),
    ("test/algebra/2584.json", "", "no answer"),
    # an answer math cannot read
    ("test/algebra/2584.json", zero("\\frac{"), None),
]


@pytest.mark.parametrize("uid, completion, reason", WRONG)
def test_wrong_or_gamed_answers_earn_zero(math500, uid, completion, reason):
    got, why = score(completion, math500[uid])
    assert got == 0.0
    if reason is not None:
        assert why == reason


def test_prefilled_prompt_only_the_final_answer_counts(math500):
    reference = math500["test/algebra/2584.json"]
    prompt = "<|user|>Find it.<|assistant|><think>\n"
    right = "it is \\frac{14}{3} </think> <answer> \\frac{14}{3} </answer>"
    hidden = "<answer>\\frac{14}{3}</answer> </think> <answer> 5 </answer>"
    unclosed = "it is <answer>\\frac{14}{3}</answer>"
    result = accuracy_reward([prompt] * 3, [right, hidden, unclosed], answer=[reference] * 3)
    assert list(result) == [1.0, 0.0, 0.0]
    assert result.reasons[2] == "no answer"


def test_every_math500_reference_verifies_against_itself(data_dir):
    """All 500 rows: through the reward, and through math-verify itself (no string path)."""
    rows = [json.loads(line) for line in (data_dir / "math500.jsonl").open()]
    refs = [r["answer"] for r in rows]
    result = AccuracyReward()(["Q"] * len(refs), [zero(a) for a in refs], answer=refs)
    assert list(result) == [1.0] * len(refs)
    boxed = AccuracyReward(template_hint="r1-chat")(
        ["Q"] * len(refs), [chat(a) for a in refs], answer=refs
    )
    assert list(boxed) == [1.0] * len(refs)
    start = time.perf_counter()
    failed = [a for a in refs if not judge_math(a, a, fast_path=False).correct]
    elapsed = time.perf_counter() - start
    assert failed == []
    assert elapsed < 60, f"math-verify took {elapsed:.1f} s for 500 checks"


def test_shuffled_references_do_not_match(math500):
    """Other rows' answers are wrong answers; equal values (two rows answering 4) excepted."""
    refs = list(math500.values())
    pairs = [(refs[i], refs[(i + 7) % len(refs)]) for i in range(0, len(refs), 5)]
    pairs = [(p, r) for p, r in pairs if p.strip() != r.strip()]
    result = accuracy_reward(
        ["Q"] * len(pairs), [zero(p) for p, _ in pairs], answer=[r for _, r in pairs]
    )
    wrongly_right = [pairs[i] for i, s in enumerate(result) if s != 0.0]
    assert wrongly_right == []


# --- checker failures are None, never a silent zero ------------------------------------


def test_math_verify_exception_gives_none_with_reason(monkeypatch):
    import math_verify

    def broken(*args, **kwargs):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(math_verify, "verify", broken)
    result = accuracy_reward(["Q"], [zero("0.5")], answer=["\\frac{1}{2}"])
    assert result[0] is None
    assert "math-verify" in result.reasons[0] and "sympy exploded" in result.reasons[0]


def test_math_verify_timeout_gives_none_with_reason(monkeypatch):
    import math_verify
    from math_verify.errors import TimeoutException

    def slow(*args, **kwargs):
        raise TimeoutException("Operation timed out!")

    monkeypatch.setattr(math_verify, "verify", slow)
    result = accuracy_reward(["Q"], [zero("0.5")], answer=["\\frac{1}{2}"])
    assert result[0] is None and "timeout" in result.reasons[0]


def test_missing_reference_is_not_judged():
    result = accuracy_reward(["Q", "Q"], [zero("1"), zero("1")], answer=["", None])
    assert list(result) == [None, None]
    assert result.reasons == ["no reference answer"] * 2


def test_answer_column_is_required():
    with pytest.raises(ValueError, match="answer"):
        accuracy_reward(["Q"], [zero("1")])


def test_reward_works_outside_the_main_thread():
    # math-verify's timeout uses SIGALRM (main thread only); elsewhere we run without it.
    out = {}
    thread = threading.Thread(
        target=lambda: out.setdefault(
            "r", accuracy_reward(["Q"], [zero("0.5")], answer=["\\frac12"])
        )
    )
    thread.start()
    thread.join()
    assert list(out["r"]) == [1.0]


# --- how a row is compared -------------------------------------------------------------


def test_exact_kind_and_verify_and_task_columns():
    exact = AccuracyReward(kind="exact")
    assert list(exact(["Q"] * 2, [zero("B"), zero("b")], answer=["B", "B"])) == [1.0, 0.0]

    def half(pred, ref):
        return 0.5

    def crash(pred, ref):
        raise KeyError("boom")

    result = accuracy_reward(
        ["Q"] * 2, [zero("1"), zero("1")], answer=["1", "1"], verify=[half, crash]
    )
    assert result[0] == 0.5 and result[1] is None and "boom" in result.reasons[1]

    class Parity(Task):
        name = "parity"

        def verify(self, predicted, reference, example: Example | None = None):
            return int(predicted) % 2 == int(reference) % 2

    result = accuracy_reward(
        ["Q"] * 3,
        [zero("3"), zero("4"), zero("4")],
        answer=["1", "1", "1"],
        task=[Parity(), Parity(), "math500"],
    )
    assert list(result) == [1.0, 0.0, 0.0]


def test_task_column_by_name_uses_the_task_judge():
    task = get_task("jsonl", path="unused.jsonl", kind="exact")
    result = accuracy_reward(
        ["Q"] * 2, [zero("0.5"), zero("0.5")], answer=["1/2", "1/2"], task=[task, "math500"]
    )
    assert list(result) == [0.0, 1.0]  # exact string match vs math-verify
    result = accuracy_reward(["Q"], [zero("1")], answer=["1"], task=["no-such-task"])
    assert result[0] is None and "no-such-task" in result.reasons[0]
