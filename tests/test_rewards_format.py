"""Format rewards: the R1-Zero and R1 chat structures, with and without a pre-filled <think>."""

from __future__ import annotations

import pytest

from r1lab.rewards import get_reward
from r1lab.rewards.format import check_format

format_reward = get_reward("format")
chat_format_reward = get_reward("chat_format")

ZERO_CASES = [
    # (completion, expected score)
    (" <think> 2+2 is 4 </think> <answer> 4 </answer>", 1.0),
    ("<think>\nreasoning\n</think>\n<answer>\n4\n</answer>\n\n", 1.0),
    ("<think>a</think><answer>4</answer>", 1.0),
    ("<think> a </think> <answer> 4 </answer> and more text", 0.0),  # text after </answer>
    ("preamble <think> a </think> <answer> 4 </answer>", 0.0),  # text before <think>
    ("<think> a </think> middle <answer> 4 </answer>", 0.0),  # text between the blocks
    ("<think> a </think> <answer> 4 </answer> <answer> 5 </answer>", 0.0),  # two answers
    ("<think> a </think> <think> b </think> <answer> 4 </answer>", 0.0),  # two think blocks
    ("<think> a <answer> 4 </answer> </think>", 0.0),  # answer inside the reasoning
    ("<think> a </think>", 0.0),  # no answer
    ("<answer> 4 </answer>", 0.0),  # no reasoning
    ("<think>   </think> <answer> 4 </answer>", 0.0),  # empty reasoning
    ("<think> a </think> <answer>  </answer>", 0.0),  # empty answer
    ("<answer> 4 </answer> <think> a </think>", 0.0),  # wrong order
    ("<think> a <answer> 4 </answer>", 0.0),  # never closed
    ("", 0.0),
]


@pytest.mark.parametrize("completion, expected", ZERO_CASES)
def test_r1_zero_format(completion, expected):
    result = format_reward(["Q"], [completion])
    assert list(result) == [expected]
    assert (result.reasons[0] is None) == (expected == 1.0)


CHAT_CASES = [
    ("<think>\nreasoning\n</think>\nThe answer is $\\boxed{4}$.", 1.0),
    ("  <think>r</think>s", 1.0),
    ("<think> r </think> <answer> 4 </answer>", 1.0),  # a summary may hold an answer tag
    ("<think> r </think>   \n", 0.0),  # no summary
    ("<think> r </think>", 0.0),
    ("summary only", 0.0),
    ("text <think> r </think> summary", 0.0),
    ("<think> r </think> s <think> again </think> t", 0.0),
    ("<think>  </think> summary", 0.0),
]


@pytest.mark.parametrize("completion, expected", CHAT_CASES)
def test_r1_chat_format(completion, expected):
    assert list(chat_format_reward(["Q"], [completion])) == [expected]


@pytest.mark.parametrize(
    "structure, completion, expected",
    [
        ("r1-zero", " reasoning </think> <answer> 4 </answer>", 1.0),
        ("r1-zero", " <think> reasoning </think> <answer> 4 </answer>", 0.0),  # opened twice
        ("r1-zero", " reasoning <answer> 4 </answer>", 0.0),  # never closed
        ("r1-chat", "\nreasoning\n</think>\nsummary", 1.0),
        ("r1-chat", "\nreasoning\n</think>\n", 0.0),
    ],
)
def test_prompt_that_prefills_think(structure, completion, expected):
    prompt = "<|user|>What is 2+2?<|assistant|><think>\n"
    reward = get_reward("format", structure=structure)
    assert list(reward([prompt], [completion])) == [expected]
    if expected == 1.0:  # after a prompt that does not open the block, <think> is missing
        assert list(reward(["What is 2+2?"], [completion])) == [0.0]


def test_reasons_say_what_is_wrong():
    assert check_format("<think> a </think>") == "no <answer>"
    assert (
        check_format("<think> a </think> <think> b </think> <answer>1</answer>") == "2 <think> tags"
    )
    assert check_format("<think> </think> <answer>1</answer>") == "empty reasoning"
    assert check_format("<think> a </think>", "r1-chat") == "no summary after </think>"


def test_batch_and_chat_style_prompts():
    prompts = [[{"role": "user", "content": "Q"}], "Q"]
    completions = ["<think>a</think><answer>1</answer>", "nope"]
    assert list(format_reward(prompts, completions)) == [1.0, 0.0]
    with pytest.raises(ValueError, match="prompts"):
        format_reward(["Q"], completions)
    with pytest.raises(ValueError, match="structure"):
        get_reward("format", structure="xml")
