"""Corpora written from the procedural families, one writer per training stage.

`pretrain_documents` (the base model's text, shaped like web text: worked reasoning only in
template-free forms), `cold_start_examples` (readable chains of thought in the R1 chat
format) and `non_reasoning_examples` (requests answered without a chain of thought). Every writer
draws from the train split only (`r1lab.tasks.procedural.worked_problems`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from r1lab.model.tokenizer import r1_chat_prompt, r1_zero_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

from r1lab.tasks.families import FAMILY_NAMES, answer_sentence, join_steps
from r1lab.tasks.procedural import WorkedProblem, reasoning_steps, worked_problems

# --- corpus writers -----------------------------------------------------------------------


# Remarks a base model's corpus puts in a <think> block under the R1-Zero template: a
# thought that is not reasoning. None of them opens a worked solution: a remark that did
# ("Let me think.") would be learned as closed at once under the template.
BRIEF_REMARKS = {
    "en": ("I know this one.", "Easy.", "This one is quick."),
    "zh": ("这题简单。", "我知道答案。"),
}
# The non-reasoning rows' request, in the asker's language, by the language wanted back.
TRANSLATE_REQUEST = {
    "en": {"zh": "Translate into Chinese: "},
    "zh": {"en": "翻译成英文："},
}
# Opens worked solutions in the template-free text, the way it does in web text.
THINK_OPENER = {"en": "Let me think.", "zh": "让我想想。"}


def pretrain_documents(
    families: str | Sequence[str] = FAMILY_NAMES,
    n: int = 10_000,
    seed: int = 0,
    *,
    levels: int | Sequence[int] = (1,),
    zh_fraction: float = 0.0,
    r1_zero_fraction: float = 0.1,
    brief_think_fraction: float = 0.4,
    no_reasoning_fraction: float = 0.2,
    flawed_fraction: float = 0.1,
    check_fraction: float = 0.2,
    opener_fraction: float = 0.5,
    chat_fraction: float = 0.5,
    mixed_language_fraction: float = 0.3,
    scratchpad_fraction: float = 0.0,
    template_fraction: float = 1.0,
) -> list[str]:
    """The base model's corpus, shaped like the text a real base model learns from.

    The R1-Zero template never frames worked reasoning here: what R1-Zero's RL is meant to
    elicit under the template must not be in the base's corpus under it.

    - `r1_zero_fraction` of documents are R1-Zero conversations answered *briefly*:
      `r1_zero_prompt(q) + " <answer> X </answer>"`, or, for `brief_think_fraction` of
      them, with a remark that is not reasoning in the think block (`BRIEF_REMARKS`:
      " <think> Easy. </think> <answer> X </answer>"). No steps, no checks.
    - The rest are template-free text, `"q\nsteps\nThe answer is X."`, where the ability
      lives: `no_reasoning_fraction` answer at once; of the worked ones, `flawed_fraction`
      carry one wrong step to a wrong answer (the base must be imperfect), `check_fraction`
      verify their answer ("Wait, let me verify: ..."), half of those after a slip they
      catch and redo; `opener_fraction` open with "Let me think." (`THINK_OPENER`).
      `chat_fraction` of the template-free documents are a plain dialogue,
      `"User: q. Assistant: steps The answer is X."`, as forums and chat logs are: the
      R1-Zero prompt ends the same way, with neither its instruction nor its tags.
    - `mixed_language_fraction` of Chinese questions are answered in English (the language
      mixing R1-Zero shows, which the language-consistency reward later removes).
    - `scratchpad_fraction` of the worked template-free documents keep their steps in a
      `<think> ... </think>` scratchpad before the answer sentence (`"q\n<think> steps
      </think>\nThe answer is X."`), the way notes and forum posts mark working: the tag
      then means "working" outside the template, never "working under the template".
    - `template_fraction` of the brief `<answer>` documents carry the R1-Zero prompt; the
      rest are plain dialogues (`"User: q. Assistant: <answer> X </answer>"`). At 0 the base
      never sees the template, as a real base model never saw it before R1.
    """
    fractions = (no_reasoning_fraction, flawed_fraction, check_fraction)
    if any(f < 0 for f in fractions) or sum(fractions) > 1:
        raise ValueError(f"reasoning-form fractions must be >= 0 and sum to <= 1, got {fractions}")
    for name, value in (
        ("r1_zero_fraction", r1_zero_fraction),
        ("brief_think_fraction", brief_think_fraction),
        ("opener_fraction", opener_fraction),
        ("chat_fraction", chat_fraction),
        ("mixed_language_fraction", mixed_language_fraction),
        ("scratchpad_fraction", scratchpad_fraction),
        ("template_fraction", template_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    docs = []
    rng = random.Random(f"{seed}:pretrain:form")
    for item in worked_problems(
        families, n, seed, levels=levels, zh_fraction=zh_fraction, stream="pretrain"
    ):
        lang = item.lang
        if lang == "zh" and rng.random() < mixed_language_fraction:
            lang = "en"
        answer = item.solution.answer
        if rng.random() < r1_zero_fraction:
            think = ""
            if rng.random() < brief_think_fraction:
                think = f" <think> {rng.choice(BRIEF_REMARKS[lang])} </think>"
            prompt = r1_zero_prompt(item.question)
            # drawn only when it can differ, so the default corpus stays what it was
            if template_fraction < 1.0 and rng.random() >= template_fraction:
                prompt = f"User: {item.question}. Assistant:"
            docs.append(f"{prompt}{think} <answer> {answer} </answer>")
            continue
        chat = rng.random() < chat_fraction
        u = rng.random()
        if u < no_reasoning_fraction:
            docs.append(_plain_document(item.question, [], answer, lang, chat))
            continue
        if u < no_reasoning_fraction + flawed_fraction:
            mode = "flawed"
        elif u < sum(fractions):
            mode = rng.choice(("check", "correct"))
        else:
            mode = "clean"
        steps, answer = reasoning_steps(item, lang, mode, rng)
        if rng.random() < opener_fraction:
            steps = [THINK_OPENER[lang], *steps]
        scratchpad = scratchpad_fraction > 0.0 and rng.random() < scratchpad_fraction
        docs.append(_plain_document(item.question, steps, answer, lang, chat, scratchpad))
    return docs


def _plain_document(
    question: str, steps: list[str], answer: str, lang: str, chat: bool, scratchpad: bool = False
) -> str:
    """A template-free document: question, reasoning, answer; as text or as a dialogue,
    with the reasoning in a `<think>` scratchpad when `scratchpad`."""
    closing = answer_sentence(answer, lang)
    working = join_steps(steps, lang)
    if scratchpad and steps:
        working = f"<think> {working} </think>"
    if chat:
        reply = (
            f"{working} {closing}" if scratchpad and steps else join_steps([*steps, closing], lang)
        )
        return f"User: {question}. Assistant: {reply}"
    body = f"{working}\n" if steps else ""
    return f"{question}\n{body}{closing}"


def cold_start_examples(
    families: str | Sequence[str] = FAMILY_NAMES,
    n: int = 1000,
    seed: int = 0,
    *,
    levels: int | Sequence[int] = (1,),
    zh_fraction: float = 0.0,
    check_fraction: float = 0.2,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> list[dict]:
    """Readable R1 chat format chains of thought for the cold-start SFT.

    `response` is `"<think>\\nstep\\nstep\\n</think>\\nThe answer is \\boxed{X}."`, one step
    a line, all in the question's language; `check_fraction` of them verify the answer
    (half after catching and fixing a slip), the reflection R1's cold-start data shows.
    Every final answer is correct. `prompt` comes from `r1_chat_prompt`.
    """
    rows = []
    rng = random.Random(f"{seed}:cold_start:form")
    for item in worked_problems(
        families, n, seed, levels=levels, zh_fraction=zh_fraction, stream="cold_start"
    ):
        mode = rng.choice(("check", "correct")) if rng.random() < check_fraction else "clean"
        steps, answer = reasoning_steps(item, item.lang, mode, rng)
        thought = "\n".join(steps)
        response = f"<think>\n{thought}\n</think>\n{answer_sentence(answer, item.lang, boxed=True)}"
        rows.append(_row(item, r1_chat_prompt(item.question, tokenizer), response))
    return rows


def non_reasoning_examples(
    families: str | Sequence[str] = FAMILY_NAMES,
    n: int = 1000,
    seed: int = 0,
    *,
    levels: int | Sequence[int] = (1,),
    zh_fraction: float = 0.0,
    tokenizer: PreTrainedTokenizerFast | None = None,
) -> list[dict]:
    """Prompt/response pairs that need no chain of thought: translating a question.

    R1's SFT mixes non-reasoning data (writing, factual QA, self-cognition, translation)
    with the reasoning data. Here each row asks for a question in the other language
    (`"Translate into Chinese: What is 90+68+49?"` -> `"90+68+49 等于多少？"`), answered at
    once. It is deliberately not the same sums answered directly: a model also taught to
    write `\\boxed{X}` straight from a question stops copying the result of its own
    reasoning into the box (tiny run, seed 2: rejection-SFT 7% pass@1 with 300 such rows
    beside ~1,600 reasoning samples, 60% without them).
    """
    rows = []
    rng = random.Random(f"{seed}:non_reasoning:wording")
    for item in worked_problems(
        families, n, seed, levels=levels, zh_fraction=zh_fraction, stream="non_reasoning"
    ):
        target = "en" if item.lang == "zh" else "zh"
        request = TRANSLATE_REQUEST[item.lang][target] + item.question
        translated = item.family.question(item.problem, target, rng)
        rows.append(
            {
                **_row(item, r1_chat_prompt(request, tokenizer), translated),
                "question": request,
                "answer": translated,
                "language": item.lang,
            }
        )
    return rows


def _row(item: WorkedProblem, prompt: str, response: str) -> dict:
    return {
        "prompt": prompt,
        "response": response,
        "question": item.question,
        "answer": item.solution.answer,
        "family": item.problem.family,
        "level": item.problem.level,
        "language": item.lang,
    }
