"""Procedural task families: worked solutions are right, splits are disjoint, seeds replay."""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from fractions import Fraction

import pytest

from r1lab.metrics import is_self_check
from r1lab.model.tokenizer import r1_chat_prompt, r1_zero_prompt
from r1lab.tasks import get_task, task_names
from r1lab.tasks.corpus import cold_start_examples, non_reasoning_examples, pretrain_documents
from r1lab.tasks.procedural import (
    FAMILY_NAMES,
    LEVELS,
    WorkedProblem,
    draw_problems,
    reasoning_steps,
    split_of,
    worked_problems,
)


def eval_examples(family: str = "procedural", n: int = 500, seed: int = 0, **options):
    """Held-out examples, as every stage draws them: the task's test split."""
    return get_task(family, **options).examples("test", n, seed)


# --- an independent checker for the arithmetic written in the reasoning --------------------

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_CHAIN = re.compile(r"[0-9+\-*/() ]+(?:=[0-9+\-*/() ]+)+")
_CJK = re.compile(r"[\u4e00-\u9fff]")
_CJK_OR_FULL_WIDTH = re.compile(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]")


def _value(expr: str) -> Fraction:
    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return walk(node.left) / walk(node.right)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unexpected syntax in {expr!r}")

    return walk(ast.parse(expr.strip(), mode="eval").body)


def equations(text: str) -> list[tuple[str, bool]]:
    """Every `a=b=c` chain of numeric expressions in the text, with whether it holds."""
    found = []
    for match in _CHAIN.finditer(text):
        parts = [p for p in match.group().split("=")]
        if any(not p.strip() for p in parts):
            continue
        values = [_value(p) for p in parts]
        found.append((match.group().strip(), all(v == values[0] for v in values)))
    return found


def true_answer(meta: dict) -> Fraction:
    """The answer recomputed from the problem itself (countdown: its target)."""
    family = meta["family"]
    if family == "chain_sum":
        return Fraction(sum(meta["terms"]))
    if family == "arithmetic":
        return _value(f"{meta['a']}{meta['op']}{meta['b']}")
    if family == "linear_equation":
        x = Fraction(meta["c"] - meta["b"], meta["a"])
        assert meta["a"] * x + meta["b"] == meta["c"]
        return x
    return Fraction(meta["target"])


def all_items(n_per_case: int = 40) -> list[WorkedProblem]:
    items = []
    for family in FAMILY_NAMES:
        for level in LEVELS:
            for split in ("train", "test"):
                items += worked_problems(
                    family, n_per_case, 7, levels=level, split=split, zh_fraction=0.5
                )
    return items


ITEMS = all_items()


# --- worked solutions ---------------------------------------------------------------------


def test_every_worked_solution_reaches_the_answer():
    for item in ITEMS:
        example = item.example()
        steps = example.meta["reasoning"]
        assert steps
        found = [eq for step in steps for eq in equations(step)]
        assert found, steps
        assert all(ok for _, ok in found), (example.question, found)
        want = true_answer(example.meta)
        if example.meta["family"] == "countdown":
            expr_value = _value(example.answer)
            assert expr_value == want
            literals = [int(t) for t in re.findall(r"\d+", example.answer)]
            assert Counter(literals) == Counter(example.meta["numbers"])
            assert found[-1][0].endswith(f"={example.meta['target']}")
        else:
            assert Fraction(example.answer) == want
            assert _value(found[-1][0].split("=")[-1]) == want
        task = get_task(example.meta["family"])
        assert task.verify(example.answer, example.answer, example)
        assert task.verify(example.answer, example.answer)


def test_reasoning_is_in_the_question_language():
    for item in ITEMS:
        example = item.example()
        steps = example.meta["reasoning"]
        assert bool(_CJK.search(example.question)) == (example.meta["language"] == "zh")
        if example.meta["language"] == "zh":  # a bare "47+30=77。" step has no words to judge
            assert _CJK.search("".join(steps))
            assert all(_CJK_OR_FULL_WIDTH.search(step) for step in steps)
        else:
            assert not any(_CJK_OR_FULL_WIDTH.search(step) for step in steps)


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_reasoning_modes(lang):
    rng = random.Random(0)
    for item in ITEMS[::3]:
        want = true_answer(item.example().meta)
        steps, answer = reasoning_steps(item, lang, "check", rng)
        assert all(ok for s in steps for _, ok in equations(s))
        assert item.family.verify(answer, item.solution.answer, item.example().meta)

        steps, answer = reasoning_steps(item, lang, "flawed", rng)
        checks = [ok for s in steps for _, ok in equations(s)]
        assert checks.count(False) == 1, steps
        assert not item.family.verify(answer, item.solution.answer, item.example().meta)

        steps, answer = reasoning_steps(item, lang, "correct", rng)
        checks = [ok for s in steps for _, ok in equations(s)]
        assert checks.count(False) == 1 and checks[-1], steps
        assert item.family.verify(answer, item.solution.answer, item.example().meta)
        if item.problem.family != "countdown":
            assert Fraction(answer) == want


def test_levels_shape_the_problems():
    for item in worked_problems("chain_sum", 200, 0, levels=1):
        terms = item.example().meta["terms"]
        assert len(terms) == 3 and all(10 <= t <= 99 for t in terms)
    lengths = {
        level: sum(
            len(i.solution.steps) for i in worked_problems("countdown", 100, 0, levels=level)
        )
        for level in LEVELS
    }
    assert lengths[1] < lengths[3]
    digits = {
        level: max(
            abs(i.example().meta["c"])
            for i in worked_problems("linear_equation", 100, 0, levels=level)
        )
        for level in LEVELS
    }
    assert digits[1] < digits[2] < digits[3]


# --- verification -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "predicted", "reference", "expected"),
    [
        ("chain_sum", "85", "85", True),
        ("chain_sum", " 85.0 ", "85", True),
        ("chain_sum", "85.", "85", True),
        ("chain_sum", "86", "85", False),
        ("chain_sum", "", "85", False),
        ("chain_sum", "eighty-five", "85", False),
        ("arithmetic", "1,081", "1081", True),
        ("arithmetic", "-5", "-5", True),
        ("linear_equation", "x = -5", "-5", True),
        ("linear_equation", "-10/2", "-5", True),
        ("linear_equation", "5", "-5", False),
        ("countdown", "(3+7)*9", "(3+7)*9", True),
        ("countdown", "9*(7+3)", "(3+7)*9", True),
        ("countdown", "(3+7)*9=90", "(3+7)*9", True),
        ("countdown", "(3+7)*9=91", "(3+7)*9", False),
        ("countdown", "90", "(3+7)*9", False),
        ("countdown", "(3+7)*9+0", "(3+7)*9", False),
        ("countdown", "10*9", "(3+7)*9", False),
        ("countdown", "__import__('os')", "(3+7)*9", False),
        ("countdown", "3+7*9", "(3+7)*9", False),
    ],
)
def test_verify(family, predicted, reference, expected):
    assert get_task(family).verify(predicted, reference) is expected


def test_countdown_accepts_other_solutions_with_the_example():
    task = get_task("countdown", levels=2)
    for example in task.examples("test", 30):
        numbers = example.meta["numbers"]
        assert task.verify(example.answer, example.answer, example)
        reordered = "+".join(map(str, numbers))
        total = sum(numbers)
        assert task.verify(reordered, reordered, example)  # a different valid expression
        assert task.verify(reordered, example.answer, example) == (total == example.meta["target"])


def test_registry():
    names = set(task_names())
    assert {"arithmetic", "chain_sum", "linear_equation", "countdown", "procedural"} <= names
    task = get_task("chain_sum", levels=(1, 2), zh_fraction=0.5)
    assert task.name == "chain_sum"
    examples = task.examples("test", 50, seed=3)
    assert len(examples) == 50 and {e.meta["level"] for e in examples} == {1, 2}
    assert len({e.meta["key"] for e in examples}) == 50
    mixture = get_task("procedural").examples("train", 100)
    assert {e.meta["family"] for e in mixture} == set(FAMILY_NAMES)
    with pytest.raises(ValueError, match="levels"):
        get_task("chain_sum", levels=4)
    with pytest.raises(ValueError, match="split"):
        get_task("chain_sum").examples("validation", 3)


# --- splits and seeds ---------------------------------------------------------------------


def test_train_and_test_never_share_a_question():
    for family in FAMILY_NAMES:
        train = {p.key for p in draw_problems(family, 2000, 0, levels=LEVELS, split="train")}
        test = {p.key for p in draw_problems(family, 300, 0, levels=LEVELS, split="test")}
        assert train and test and not train & test
    held_out = eval_examples(n=200, seed=0, levels=(1, 2), zh_fraction=0.5)
    assert all(e.meta["split"] == "test" for e in held_out)
    docs = pretrain_documents(n=3000, seed=0, levels=(1, 2), zh_fraction=0.5)
    cold = cold_start_examples(n=500, seed=0, levels=(1, 2), zh_fraction=0.5)
    asked = {row["question"] for row in cold} | {_question_of(doc) for doc in docs}
    assert all(example.question not in asked for example in held_out)


def test_split_share():
    keys = [f"chain_sum:{i}" for i in range(20000)]
    share = sum(split_of(k) == "test" for k in keys) / len(keys)
    assert 0.09 < share < 0.11


def test_seeds_replay():
    kwargs = {"n": 200, "levels": LEVELS, "zh_fraction": 0.4}
    assert pretrain_documents(seed=1, **kwargs) == pretrain_documents(seed=1, **kwargs)
    assert pretrain_documents(seed=1, **kwargs) != pretrain_documents(seed=2, **kwargs)
    assert cold_start_examples(seed=1, **kwargs) == cold_start_examples(seed=1, **kwargs)
    assert non_reasoning_examples(seed=1, **kwargs) == non_reasoning_examples(seed=1, **kwargs)
    assert eval_examples(seed=1, **kwargs) == eval_examples(seed=1, **kwargs)
    assert eval_examples(seed=1, **kwargs) != eval_examples(seed=2, **kwargs)
    task = get_task("countdown", levels=LEVELS)
    assert task.examples("train", 50, seed=4) == task.examples("train", 50, seed=4)


def test_small_spaces_run_out_with_a_warning():
    with pytest.warns(UserWarning, match="distinct test problems"):
        examples = eval_examples("linear_equation", n=5000, levels=1)
    assert 0 < len(examples) < 5000
    assert len({e.meta["key"] for e in examples}) == len(examples)


# --- corpus writers -----------------------------------------------------------------------


def _question_of(doc: str) -> str:
    if " Assistant:" in doc:
        return doc.split("User: ", 1)[1].split(". Assistant:", 1)[0]
    return doc.split("\n", 1)[0]


def _completion(doc: str) -> str:
    return doc.split(" Assistant:", 1)[1] if " Assistant:" in doc else doc.split("\n", 1)[1]


def _think_block(completion: str) -> str | None:
    match = re.search(r"<think>(.*?)</think>", completion, re.DOTALL)
    return match.group(1) if match else None


@pytest.mark.parametrize("seed", [0, 1])
def test_no_reasoning_inside_think_after_the_r1_zero_prompt(seed):
    """The corpus rule: under the R1-Zero template the base only ever sees brief answers.

    No step (an `=`), no number, no self-check inside a <think> block that follows the
    R1-Zero prompt, and nothing but the answer tag after it, for every family and level.
    """
    docs = pretrain_documents(n=3000, seed=seed, levels=LEVELS, zh_fraction=0.5)
    head = r1_zero_prompt("").split("User:")[0]
    templated = [d for d in docs if d.startswith(head)]
    assert templated, "the corpus has R1-Zero conversations (the base must know the template)"
    for doc in templated:
        completion = _completion(doc)
        think = _think_block(completion)
        if think is not None:
            assert think.strip() and not re.search(r"[0-9=]", think), doc
            assert not is_self_check(think), doc
        after_think = completion.split("</think>")[-1]
        assert re.fullmatch(r" <answer> [^<]+ </answer>", after_think), doc


def test_reasoning_and_self_checks_live_in_template_free_text():
    docs = pretrain_documents(n=2000, seed=0, zh_fraction=0.5)
    head = r1_zero_prompt("").split("User:")[0]
    plain = [d for d in docs if not d.startswith(head)]
    assert all(re.search(r"(The answer is .+\.|答案是 .+。)$", d) for d in plain)
    worked = [d for d in plain if "=" in _completion(d)]
    assert worked and any(is_self_check(d) for d in worked)
    assert any(not ok for d in worked for _, ok in equations(_completion(d)))  # flawed ones
    zh_worked = [d for d in worked if _CJK.search(_question_of(d))]
    assert any(not _CJK.search(_completion(d)) for d in zh_worked)  # mixed language


def test_pretrain_documents_options():
    docs = pretrain_documents(
        "chain_sum",
        n=300,
        r1_zero_fraction=0.0,
        no_reasoning_fraction=0.0,
        flawed_fraction=0.0,
        check_fraction=0.0,
        opener_fraction=1.0,
        chat_fraction=0.0,
    )
    for doc in docs:
        completion = _completion(doc)
        assert re.fullmatch(r"Let me think\. First, .*\nThe answer is \d+\.", completion)
        assert all(ok for _, ok in equations(completion))
    dialogues = pretrain_documents("chain_sum", n=100, r1_zero_fraction=0.0, chat_fraction=1.0)
    assert all(re.fullmatch(r"User: .+\. Assistant: .*The answer is \d+\.", d) for d in dialogues)
    assert not any("<think>" in d or "<answer>" in d for d in dialogues)
    templated = pretrain_documents("chain_sum", n=100, r1_zero_fraction=1.0, brief_think_fraction=0)
    assert all(_completion(d).startswith(" <answer> ") for d in templated)
    with pytest.raises(ValueError, match="fractions"):
        pretrain_documents(n=1, no_reasoning_fraction=0.6, flawed_fraction=0.6)
    with pytest.raises(ValueError, match="opener_fraction"):
        pretrain_documents(n=1, opener_fraction=1.5)
    with pytest.raises(ValueError, match="unknown families"):
        pretrain_documents("sudoku", n=1)


def test_cold_start_examples():
    rows = cold_start_examples(n=400, seed=0, levels=LEVELS, zh_fraction=0.5)
    pattern = re.compile(r"<think>\n(.+\n)+</think>\n(The answer is|答案是) \\boxed\{(.+)\}[.。]")
    for row in rows:
        assert row["prompt"] == r1_chat_prompt(row["question"])
        match = pattern.fullmatch(row["response"])
        assert match, row["response"]
        assert match.group(3) == row["answer"]
        thought = row["response"].split("</think>")[0]
        assert bool(_CJK.search(thought)) == (row["language"] == "zh")
        ok = [good for _, good in equations(thought)]
        assert ok[-1] and ok.count(False) <= 1
        task = get_task(row["family"])
        assert task.verify(match.group(3), row["answer"])
    assert (
        0.1
        < sum("verify" in r["response"] or "验算" in r["response"] for r in rows) / len(rows)
        < 0.3
    )


def test_non_reasoning_examples():
    """Translation requests answered at once: no chain of thought, and never a sum's answer
    (so SFT on them cannot teach writing the boxed answer without reasoning)."""
    rows = non_reasoning_examples(n=100, seed=0, zh_fraction=0.5)
    assert {r["language"] for r in rows} == {"en", "zh"}
    for row in rows:
        assert "<think>" not in row["response"] and "\\boxed" not in row["response"]
        assert row["prompt"] == r1_chat_prompt(row["question"])
        asked_zh = row["question"].startswith("翻译成英文：")
        assert asked_zh == (row["language"] == "zh")
        assert asked_zh or row["question"].startswith("Translate into Chinese: ")
        # the same numbers come back, in the other language
        numbers = re.findall(r"\d+", row["question"])
        assert re.findall(r"\d+", row["response"]) == numbers
        has_cjk = bool(re.search(r"[\u4e00-\u9fff]", row["response"]))
        assert has_cjk == (not asked_zh) or row["response"].endswith("=?")


def test_eval_examples_are_distinct_and_held_out():
    examples = eval_examples(n=300, seed=0, levels=LEVELS, zh_fraction=0.3)
    assert len(examples) == 300
    assert len({e.meta["key"] for e in examples}) == 300
    assert all(split_of(e.meta["key"]) == "test" for e in examples)
    share_zh = sum(e.meta["language"] == "zh" for e in examples) / len(examples)
    assert 0.2 < share_zh < 0.4
