"""Procedural problem families: how each kind of problem is drawn, asked, worked and checked.

Four families, each with difficulty levels 1..3 (more digits, more terms):

- `arithmetic`: one multi-digit addition, subtraction or multiplication, worked by place value;
- `chain_sum`: the sum of k numbers, added left to right;
- `linear_equation`: a*x + b = c with an integer solution, worked by undoing b then a;
- `countdown`: reach a target using each given number once with + - *, worked as a search
  that rejects wrong tries ("Wait, 90 is not 30.") before the one that works.

Every step writes its arithmetic as `expression=value`, so a test (or a process reward) can
recompute it. Questions and reasoning exist in English and Chinese. The splits, the tasks
built on these families are in `r1lab.tasks.procedural`; the corpora written from them in
`r1lab.tasks.corpus`.
"""

from __future__ import annotations

import ast
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

LEVELS = (1, 2, 3)
TEST_FRACTION = 0.1
SPLITS = ("train", "test")

_OPS: dict[str, Callable[[int, int], int]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.floordiv,
}


# --- shared pieces ----------------------------------------------------------------------


def _say(lang: str, en: str, zh: str) -> str:
    return zh if lang == "zh" else en


def join_steps(steps: Sequence[str], lang: str) -> str:
    """Steps as one paragraph: spaces between English sentences, none between Chinese."""
    return ("" if lang == "zh" else " ").join(steps)


def answer_sentence(answer: str, lang: str, boxed: bool = False) -> str:
    """The closing sentence that states the answer (boxed in the R1 chat format)."""
    shown = f"\\boxed{{{answer}}}" if boxed else answer
    return _say(lang, f"The answer is {shown}.", f"答案是 {shown}。")


def _operand(x: int, first: bool = False) -> str:
    """A number as written inside an expression: negatives get parentheses after an operator."""
    return str(x) if x >= 0 or first else f"({x})"


class Pad:
    """Scratch paper: does one operation at a time and writes it down.

    A pad built with `slip=(index, delta)` gets its index-th result wrong by delta, and the
    solver carries the wrong value on, as a person would. That is how flawed solutions
    (imperfect base-model data, or a first attempt to be caught by a check) are made.
    """

    def __init__(self, slip: tuple[int, int] | None = None):
        self.slip = slip
        self.count = 0

    def calc(self, a: int, op: str, b: int) -> tuple[int, str]:
        if op == "/" and b != 0 and a % b:
            raise ValueError(f"{a}/{b} is not an integer")
        value = _OPS[op](a, b)
        if self.slip is not None and self.slip[0] == self.count:
            value += self.slip[1]
        self.count += 1
        return value, f"{_operand(a, first=True)}{op}{_operand(b)}={value}"


def _verdict(lang: str, got: int, expected: int) -> str:
    if got == expected:
        return _say(lang, "It checks out.", "结果正确。")
    return _say(
        lang,
        f"That gives {got}, not {expected}, so I made a mistake. Let me redo it.",
        f"得到 {got}，不是 {expected}，前面算错了，重新计算。",
    )


def _compute_question(expr: str, lang: str, rng: random.Random) -> str:
    forms = {
        "en": [f"What is {expr}?", f"Compute {expr}", f"{expr}=?"],
        "zh": [f"计算 {expr} 。", f"{expr} 等于多少？"],
    }
    return rng.choice(forms[lang])


_PLACES = {"en": ("ones", "tens", "hundreds", "thousands"), "zh": ("个位", "十位", "百位", "千位")}


def _place(part: int, lang: str) -> str:
    """Name of the place a single-digit part sits in: 30 -> 'tens' / '十位'."""
    return _PLACES[lang][len(str(part)) - 1]


def _place_parts(n: int) -> list[int]:
    """38 -> [30, 8]; 405 -> [400, 5]: the pieces mental arithmetic adds one at a time."""
    digits = str(n)
    parts = [int(d) * 10 ** (len(digits) - i - 1) for i, d in enumerate(digits)]
    return [p for p in parts if p] or [0]


_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:/\d+)?")
_MAX_ANSWER_CHARS = 200  # model output is graded here: keep parsing cheap and bounded


def _number(text: str) -> Fraction | None:
    """Read a number leniently: '85', ' 85.0 ', '1,081', 'x = -5', '17/3'."""
    s = text.strip().replace(",", "").replace(" ", "").rstrip(".。")
    if s[:2].lower() == "x=":
        s = s[2:]
    if len(s) > _MAX_ANSWER_CHARS or not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except ZeroDivisionError:
        return None


_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def _eval_expression(text: str) -> tuple[int, list[int]] | None:
    """Value and integer literals of an expression made only of ints, + - * and brackets."""
    if len(text) > _MAX_ANSWER_CHARS:
        return None
    literals: list[int] = []

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            return _OPS[_AST_OPS[type(node.op)]](walk(node.left), walk(node.right))
        raise ValueError("only integers, + - * and brackets are allowed")

    try:
        return walk(ast.parse(text.strip(), mode="eval").body), literals
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


# --- families ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One problem. `key` names it independently of wording and language (the split uses it)."""

    family: str
    level: int
    key: str
    data: dict = field(hash=False, compare=False)


@dataclass
class Solution:
    steps: list[str]
    answer: str


class Family:
    """How one kind of problem is drawn, asked, worked, checked and graded."""

    name = "family"

    def sample(self, rng: random.Random, level: int) -> Problem:
        raise NotImplementedError

    def question(self, problem: Problem, lang: str, rng: random.Random) -> str:
        raise NotImplementedError

    def solve(self, problem: Problem, lang: str, pad: Pad) -> Solution:
        raise NotImplementedError

    def check(self, problem: Problem, claimed: str, lang: str) -> tuple[str, bool]:
        """A verification sentence ("Wait, let me verify: ...") and whether it passed."""
        raise NotImplementedError

    def slip(self, problem: Problem, rng: random.Random) -> tuple[int, int]:
        """A plausible one-off mistake: (operation index, error added to its result)."""
        n_ops = Pad()
        self.solve(problem, "en", n_ops)
        return rng.randrange(n_ops.count), rng.choice((-10, -1, 1, 10))

    def meta(self, problem: Problem) -> dict:
        """What the example keeps of the problem for checking (by default, all of its data)."""
        return dict(problem.data)

    def verify(self, predicted: str, reference: str, meta: dict | None = None) -> bool:
        got, want = _number(predicted), _number(reference)
        return got is not None and got == want


class ChainSum(Family):
    name = "chain_sum"
    _shape = {1: (3, 10, 99), 2: (4, 10, 99), 3: (4, 100, 999)}

    def sample(self, rng, level):
        k, lo, hi = self._shape[level]
        terms = [rng.randint(lo, hi) for _ in range(k)]
        return Problem(
            self.name, level, f"{self.name}:{'+'.join(map(str, terms))}", {"terms": terms}
        )

    def question(self, problem, lang, rng):
        return _compute_question("+".join(map(str, problem.data["terms"])), lang, rng)

    def _add_up(self, terms: list[int], pad: Pad) -> tuple[int, list[str]]:
        total, eqs = terms[0], []
        for t in terms[1:]:
            total, eq = pad.calc(total, "+", t)
            eqs.append(eq)
        return total, eqs

    def solve(self, problem, lang, pad):
        total, eqs = self._add_up(problem.data["terms"], pad)
        steps = [
            _say(
                lang,
                f"First, {eq}." if i == 0 else f"Then {eq}.",
                ("先算" if i == 0 else "再算") + f" {eq}。",
            )
            for i, eq in enumerate(eqs)
        ]
        return Solution(steps, str(total))

    def check(self, problem, claimed, lang):
        total, eqs = self._add_up(problem.data["terms"][::-1], Pad())
        said = _say(lang, ", ".join(eqs), "，".join(eqs))
        text = _say(
            lang,
            f"Wait, let me verify by adding in reverse: {said}. ",
            f"等等，倒过来验算：{said}。",
        )
        return text + _verdict(lang, total, int(claimed)), total == int(claimed)

    def meta(self, problem):
        return {"terms": list(problem.data["terms"])}


class Arithmetic(Family):
    name = "arithmetic"
    _add_digits = {1: 2, 2: 3, 3: 4}
    _mul_digits = {1: (2, 1), 2: (2, 2), 3: (3, 2)}

    def sample(self, rng, level):
        op = rng.choice("+-*")
        if op == "*":
            da, db = self._mul_digits[level]
            a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (da, db))
            a, b = max(a, 2), max(b, 2)
        else:
            d = self._add_digits[level]
            a, b = rng.randint(10 ** (d - 1), 10**d - 1), rng.randint(10 ** (d - 1), 10**d - 1)
            if op == "-" and a < b:
                a, b = b, a
        if rng.random() < 0.5 and op != "-":
            a, b = b, a
        return Problem(self.name, level, f"{self.name}:{a}{op}{b}", {"a": a, "op": op, "b": b})

    def question(self, problem, lang, rng):
        d = problem.data
        return _compute_question(f"{d['a']}{d['op']}{d['b']}", lang, rng)

    def _multiply(self, a: int, b: int, pad: Pad, lang: str) -> tuple[int, list[str]]:
        """a*b by splitting the factor with more place-value parts, then adding partials."""
        split_a = len(_place_parts(a)) > len(_place_parts(b))
        parts = _place_parts(a if split_a else b)
        steps: list[str] = []
        if len(parts) > 1:
            whole, pieces = (a if split_a else b), "+".join(map(str, parts))
            steps.append(_say(lang, f"Split {whole} into {pieces}.", f"把 {whole} 拆成 {pieces}。"))
        partials = []
        for p in parts:
            value, eq = pad.calc(p, "*", b) if split_a else pad.calc(a, "*", p)
            partials.append(value)
            steps.append(_say(lang, f"The {_place(p, 'en')}: {eq}.", f"{_place(p, 'zh')}：{eq}。"))
        total = partials[0]
        for value in partials[1:]:
            total, eq = pad.calc(total, "+", value)
            steps.append(_say(lang, f"Add the parts: {eq}.", f"相加：{eq}。"))
        return total, steps

    def solve(self, problem, lang, pad):
        a, op, b = problem.data["a"], problem.data["op"], problem.data["b"]
        if op == "*":
            total, steps = self._multiply(a, b, pad, lang)
            return Solution(steps, str(total))
        parts = _place_parts(b)
        steps = []
        if len(parts) > 1:
            pieces = "+".join(map(str, parts))
            steps.append(_say(lang, f"Split {b} into {pieces}.", f"把 {b} 拆成 {pieces}。"))
        total = a
        verb = {"+": ("Add", "加"), "-": ("Subtract", "减")}[op]
        for p in parts:
            total, eq = pad.calc(total, op, p)
            en, zh = (
                f"{verb[0]} the {_place(p, 'en')}: {eq}.",
                f"{verb[1]}{_place(p, 'zh')}：{eq}。",
            )
            steps.append(_say(lang, en, zh))
        return Solution(steps, str(total))

    def check(self, problem, claimed, lang):
        a, op, b = problem.data["a"], problem.data["op"], problem.data["b"]
        pad, claim = Pad(), int(claimed)
        if op == "*":
            got, steps = self._multiply(b, a, pad, lang)  # the other split of the same product
            said = join_steps(steps, lang)
            text = _say(
                lang, f"Wait, let me verify the other way: {said} ", f"等等，换一种拆法验算：{said}"
            )
            return text + _verdict(lang, got, claim), got == claim
        inverse = "-" if op == "+" else "+"
        got, eq = pad.calc(claim, inverse, b)
        text = _say(lang, f"Wait, let me verify: {eq}. ", f"等等，验算一下：{eq}。")
        return text + _verdict(lang, got, a), got == a


class LinearEquation(Family):
    name = "linear_equation"
    # level: (coefficient range, solution range, constant range, negatives allowed)
    _ranges = {
        1: ((2, 9), (1, 20), (1, 50), False),
        2: ((2, 12), (-20, 20), (1, 60), True),
        3: ((11, 49), (-99, 99), (100, 999), True),
    }

    def sample(self, rng, level):
        (a_lo, a_hi), (x_lo, x_hi), (b_lo, b_hi), signed = self._ranges[level]
        a, x, b = rng.randint(a_lo, a_hi), rng.randint(x_lo, x_hi), rng.randint(b_lo, b_hi)
        if signed and rng.random() < 0.5:
            b = -b
        if signed and level == 3 and rng.random() < 0.3:
            a = -a
        c = a * x + b
        return Problem(
            self.name,
            level,
            f"{self.name}:{self.equation(a, b, c)}",
            {"a": a, "b": b, "c": c, "x": x},
        )

    @staticmethod
    def equation(a: int, b: int, c: int) -> str:
        return f"{a}x{'+' if b >= 0 else '-'}{abs(b)}={c}"

    def question(self, problem, lang, rng):
        d = problem.data
        eq = self.equation(d["a"], d["b"], d["c"])
        forms = {
            "en": [f"Solve for x: {eq}", f"Find x if {eq}", f"{eq}, x=?"],
            "zh": [f"解方程 {eq} 。", f"求 x：{eq} 。"],
        }
        return rng.choice(forms[lang])

    def solve(self, problem, lang, pad):
        a, b, c = problem.data["a"], problem.data["b"], problem.data["c"]
        if b >= 0:
            rhs, eq = pad.calc(c, "-", b)
            first = _say(
                lang, f"Subtract {b} from both sides: {a}x={eq}.", f"两边减去 {b}：{a}x={eq}。"
            )
        else:
            rhs, eq = pad.calc(c, "+", -b)
            first = _say(lang, f"Add {-b} to both sides: {a}x={eq}.", f"两边加上 {-b}：{a}x={eq}。")
        x, eq = pad.calc(rhs, "/", a)
        second = _say(lang, f"Divide both sides by {a}: x={eq}.", f"两边除以 {a}：x={eq}。")
        return Solution([first, second], str(x))

    def slip(self, problem, rng):
        a = problem.data["a"]
        # Keep the division exact: miss the subtraction by a multiple of a, or the quotient by 1.
        return rng.choice(((0, a), (0, -a), (1, 1), (1, -1)))

    def check(self, problem, claimed, lang):
        a, b, c = problem.data["a"], problem.data["b"], problem.data["c"]
        pad = Pad()
        ax, eq1 = pad.calc(a, "*", int(claimed))
        lhs, eq2 = pad.calc(ax, "+" if b >= 0 else "-", abs(b))
        text = _say(lang, f"Wait, let me verify: {eq1}, {eq2}. ", f"等等，代入验算：{eq1}，{eq2}。")
        return text + _verdict(lang, lhs, c), lhs == c


class Countdown(Family):
    name = "countdown"
    # level: (how many numbers, their range, most wrong tries shown before the right one)
    _shape = {1: (3, 1, 12, 1), 2: (4, 1, 9, 2), 3: (4, 2, 25, 2)}

    @staticmethod
    def expression(numbers: Sequence[int], ops: Sequence[str]) -> str:
        """Left-to-right chain as a normal expression: (3+7)*9, 9*7-3."""
        expr, additive = str(numbers[0]), False
        for op, n in zip(ops, numbers[1:]):
            if op == "*" and additive:
                expr = f"({expr})"
            expr, additive = f"{expr}{op}{n}", op in "+-"
        return expr

    @staticmethod
    def _chain_value(numbers: Sequence[int], ops: Sequence[str]) -> int | None:
        value = numbers[0]
        for op, n in zip(ops, numbers[1:]):
            value = _OPS[op](value, n)
            if value <= 0:
                return None
        return value

    def _random_try(self, rng: random.Random, numbers: list[int]) -> tuple[list[int], list[str]]:
        order = rng.sample(numbers, len(numbers))
        return order, [rng.choice("+-*") for _ in order[1:]]

    def sample(self, rng, level):
        k, lo, hi, most_wrong = self._shape[level]
        while True:
            numbers = [rng.randint(lo, hi) for _ in range(k)]
            order, ops = self._random_try(rng, numbers)
            target = self._chain_value(order, ops)
            if target is None or target > 999 or target in numbers:
                continue
            wrong: list[tuple[list[int], list[str]]] = []
            n_wrong = rng.randint(1, most_wrong)
            for _ in range(50):
                if len(wrong) == n_wrong:
                    break
                cand = self._random_try(rng, numbers)
                value = self._chain_value(*cand)
                if value is not None and value != target and cand not in wrong:
                    wrong.append(cand)
            if not wrong:
                continue
            key = f"{self.name}:{','.join(map(str, sorted(numbers)))}->{target}"
            shown = rng.sample(numbers, k)
            data = {"numbers": shown, "target": target, "tries": [*wrong, (order, ops)]}
            return Problem(self.name, level, key, data)

    def question(self, problem, lang, rng):
        nums, t = problem.data["numbers"], problem.data["target"]
        en_nums, zh_nums = ", ".join(map(str, nums)), "、".join(map(str, nums))
        forms = {
            "en": [
                f"Use each of {en_nums} once with + - * to make {t}",
                f"Using the numbers {en_nums} once each and + - *, reach {t}",
            ],
            "zh": [
                f"用 {zh_nums} 各一次，通过 + - * 得到 {t} 。",
                f"用数字 {zh_nums}（每个用一次）和 + - * 算出 {t} 。",
            ],
        }
        return rng.choice(forms[lang])

    def _run(self, numbers: Sequence[int], ops: Sequence[str], pad: Pad) -> tuple[int, list[str]]:
        value, eqs = numbers[0], []
        for op, n in zip(ops, numbers[1:]):
            value, eq = pad.calc(value, op, n)
            eqs.append(eq)
        return value, eqs

    def solve(self, problem, lang, pad):
        target, steps = problem.data["target"], []
        answer = ""
        for order, ops in problem.data["tries"]:
            value, eqs = self._run(order, ops, pad)
            said = _say(lang, ", ".join(eqs), "，".join(eqs))
            answer = self.expression(order, ops)
            if value == target:
                steps.append(
                    _say(
                        lang,
                        f"Try {said}. That reaches {target}.",
                        f"试试 {said}。正好是 {target}。",
                    )
                )
                break
            steps.append(
                _say(
                    lang,
                    f"Try {said}. Wait, {value} is not {target}.",
                    f"试试 {said}。等等，{value} 不是 {target}。",
                )
            )
        return Solution(steps, answer)

    def slip(self, problem, rng):
        # Misjudge a wrong try: its last result comes out as the target, so it is "accepted".
        order, ops = problem.data["tries"][0]
        true_value = self._run(order, ops, Pad())[0]
        return len(ops) - 1, problem.data["target"] - true_value

    def check(self, problem, claimed, lang):
        # A claimed answer is always one of the tries; redo its chain without slipping.
        order, ops = next(t for t in problem.data["tries"] if self.expression(*t) == claimed)
        value, eqs = self._run(order, ops, Pad())
        said = _say(lang, ", ".join(eqs), "，".join(eqs))
        text = _say(lang, f"Wait, let me verify: {said}. ", f"等等，验算一下：{said}。")
        target = problem.data["target"]
        return text + _verdict(lang, value, target), value == target

    def meta(self, problem):
        return {"numbers": list(problem.data["numbers"]), "target": problem.data["target"]}

    def verify(self, predicted, reference, meta=None):
        """Any expression that uses exactly the given numbers and reaches the target."""
        want = _eval_expression(reference)
        if want is None:
            return False
        text = predicted.strip().replace("×", "*").replace("−", "-").rstrip(".。")
        if "=" in text:  # "(3+7)*9=90": accept a stated result only if it is the target
            text, _, stated = text.rpartition("=")
            if _number(stated) != want[0]:
                return False
        got = _eval_expression(text)
        if got is None:
            return False
        numbers = (meta or {}).get("numbers") or want[1]
        return got[0] == want[0] and Counter(got[1]) == Counter(numbers)


FAMILIES: dict[str, Family] = {
    f.name: f for f in (Arithmetic(), ChainSum(), LinearEquation(), Countdown())
}
FAMILY_NAMES = tuple(FAMILIES)
