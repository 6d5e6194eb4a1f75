"""Language consistency: shares of chain-of-thought words, computed by hand."""

from __future__ import annotations

import pytest

from r1lab.model.tokenizer import r1_chat_prompt, r1_zero_prompt
from r1lab.rewards import count_words, detect_language, get_reward
from r1lab.rewards.language import question_from_prompt

language_consistency_reward = get_reward("language_consistency")

EN_Q = "Tom has 3 apples and buys 5 more. How many apples does he have?"
ZH_Q = "小明有3个苹果，又买了5个。他一共有几个苹果？"


@pytest.mark.parametrize(
    "text, expected",
    [
        # Latin words of 2+ letters; single letters are variables; digits neutral
        ("Let x be 3, so we add 5 to it.", {"latin": 7}),  # Let be so we add to it
        ("我们有3个苹果", {"cjk": 6}),
        ("设 x = 3, then 答案是 8", {"cjk": 4, "latin": 1}),
        ("don't stop", {"latin": 2}),
        ("$\\frac{a}{b} + \\sqrt{x}$ equals \\alpha", {"latin": 1}),  # math and LaTeX neutral
        ("α + β = π", {}),  # Greek letters are math symbols
        ("Привет мир hello", {"cyrillic": 2, "latin": 1}),
        ("3 + 4 = 7", {}),
    ],
)
def test_count_words(text, expected):
    assert dict(count_words(text)) == expected


def test_detect_language_and_question_from_prompt():
    assert detect_language(EN_Q) == "latin"
    assert detect_language(ZH_Q) == "cjk"
    assert detect_language("2 + 3 = ?") is None
    # the R1-Zero template is English; the question inside it decides
    assert question_from_prompt(r1_zero_prompt(ZH_Q)) == ZH_Q.removesuffix(".")
    assert detect_language(question_from_prompt(r1_zero_prompt(ZH_Q))) == "cjk"
    assert question_from_prompt(r1_chat_prompt(ZH_Q)) == ZH_Q
    assert (
        question_from_prompt("<|im_start|>user\n" + ZH_Q + "<|im_end|>\n<|im_start|>assistant\n")
        == ZH_Q
    )


def think(cot: str) -> str:
    return f"<think>{cot}</think><answer>8</answer>"


CASES = [
    # (question, chain of thought, share)
    # English question, English reasoning: Tom has apples buys more so total is -> all Latin
    (EN_Q, "Tom has 3 apples, buys 5 more, so the total is 8.", 1.0),
    # Chinese question, Chinese reasoning: 3个 + 5个 = 8个 -> 个 个 个 = 3 CJK words, 0 Latin
    (ZH_Q, "3个 + 5个 = 8个", 1.0),
    # Chinese question, mixed: 他有 (2) 个苹果 (3) 再买 (2) 个 (1) = 8 CJK; so total is = 3 Latin
    (ZH_Q, "他有3个苹果，再买5个, so total is 8", 8 / 11),
    # English question, mixed: we add (2 Latin), 加起来是 (4 CJK) -> 2 / 6
    (EN_Q, "we add 3 + 5, 加起来是 8", 2 / 6),
    # Chinese question, all English reasoning -> 0
    (ZH_Q, "three plus five is eight", 0.0),
    # pure math reasoning: no words to be inconsistent with
    (ZH_Q, "3 + 5 = 8", 1.0),
    # LaTeX in Chinese reasoning is neutral: 所以 (2) 答案 (2) -> 4 CJK, 0 Latin
    (ZH_Q, "所以 $\\frac{16}{2} = 8$ 答案 \\boxed{8}", 1.0),
]


@pytest.mark.parametrize("question, cot, share", CASES)
def test_share_of_words_in_the_question_language(question, cot, share):
    prompt = r1_zero_prompt(question)
    result = language_consistency_reward([prompt], [think(cot)])
    assert result[0] == pytest.approx(share)


def test_no_chain_of_thought_scores_zero_with_reason():
    result = language_consistency_reward(["Q"] * 2, ["<answer>8</answer>", "<think>  </think> 8"])
    assert list(result) == [0.0, 0.0]
    assert result.reasons == ["no chain of thought"] * 2


def test_language_and_question_columns_override_the_prompt():
    completion = think("三加五等于八")
    # the prompt alone says English (no question marker found, English words)
    assert language_consistency_reward(["Add three and five"], [completion])[0] == 0.0
    assert (
        language_consistency_reward(["Add three and five"], [completion], language=["zh"])[0] == 1.0
    )
    assert (
        language_consistency_reward(["Add three and five"], [completion], question=[ZH_Q])[0] == 1.0
    )


def test_language_codes_map_to_scripts():
    cot = think("これは 三 です")  # kana (これは, です: 5) and one ideograph
    assert language_consistency_reward(["Q"], [cot], language=["ja"])[0] == 1.0
    assert language_consistency_reward(["Q"], [cot], language=["zh"])[0] == pytest.approx(1 / 6)
    assert language_consistency_reward(["Q"], [think("да hello")], language=["ru"])[0] == 0.5


def test_prefilled_prompt_reads_the_reasoning_before_the_closing_tag():
    prompt = r1_chat_prompt(ZH_Q) + "<think>\n"
    result = language_consistency_reward([prompt], ["先算 3 + 5 = 8 then done\n</think>\n答案是 8"])
    assert result[0] == pytest.approx(2 / 4)  # 先算 (2 CJK) vs then done (2 Latin)


def test_question_without_words_uses_default_language():
    prompt = r1_zero_prompt("23+45+17=?")
    result = language_consistency_reward([prompt], [think("23 plus 45 is 68")])
    assert result[0] == 1.0  # "plus", "is" are Latin; default language is English
