"""Readability filters on crafted texts, and rejection sampling on scripted samples."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import r1lab.stages.evaluate as ev
import r1lab.stages.judging as judging
import r1lab.stages.rejection as rej
from r1lab.config import ConfigError, build_config
from r1lab.engine.generate import Completion
from r1lab.rewards import get_reward
from r1lab.stages.readability import (
    FILTERS,
    has_code_block,
    has_long_paragraph,
    is_mixed_language,
    longest_paragraph,
    missing_structure,
    normalized_text,
    readability_problems,
)

GOOD = "<think>\nFirst, 23+45=68.\nThen 68+17=85.\n</think>\nThe answer is \\boxed{85}."


# --- readability filters -----------------------------------------------------------------


def test_a_readable_response_passes_every_filter():
    assert readability_problems(GOOD, language_consistency=1.0) == []


@pytest.mark.parametrize(
    "response",
    [
        "The answer is \\boxed{85}.",  # no reasoning block
        "<think>\n23+45=68\nThe answer is \\boxed{85}.",  # never closed
        "<think>\n23+45=68\n</think>\n",  # no summary
        "<think>\n  \n</think>\nThe answer is 85.",  # empty reasoning
        "Sure. <think>\n23+45=68\n</think>\nThe answer is 85.",  # text before the block
        "<think>\na\n</think>\n<think>\nb\n</think>\nThe answer is 85.",  # two blocks
    ],
)
def test_missing_structure(response):
    assert missing_structure(response)
    assert readability_problems(response) == ["structure"]


def test_structure_follows_the_template():
    zero = " <think> 23+45=68 </think> <answer> 68 </answer>"
    assert not missing_structure(zero, "r1-zero")
    assert missing_structure(GOOD, "r1-zero")  # no answer tag
    # A prompt ending with <think> starts the response inside the reasoning.
    assert not missing_structure("23+45=68\n</think>\nThe answer is 68.", prefilled=True)


def test_code_block_inside_the_reasoning_only():
    code_cot = "<think>\n```python\nprint(23+45)\n```\n</think>\nThe answer is \\boxed{68}."
    code_summary = "<think>\n23+45=68\n</think>\nIn Python:\n```python\nprint(68)\n```"
    assert has_code_block(code_cot) and readability_problems(code_cot) == ["code_block"]
    assert not has_code_block(code_summary) and readability_problems(code_summary) == []


def test_long_paragraph():
    sentence = "We add the numbers carefully. "  # 30 characters
    one_block = "<think>\n" + sentence * 60 + "\n</think>\nThe answer is 3."
    assert has_long_paragraph(one_block, max_chars=1500)
    assert readability_problems(one_block) == ["long_paragraph"]
    split = "<think>\n" + "\n\n".join([sentence * 20] * 3) + "\n</think>\nThe answer is 3."
    assert longest_paragraph(split) == len((sentence * 20).strip())
    assert readability_problems(split) == []
    assert has_long_paragraph(split, max_chars=500)


def test_mixed_language_uses_the_reward_score():
    question = "计算 23+45+17 。"
    english_cot = "<think>\nFirst, add 23 and 45 to get 68.\n</think>\n答案是 \\boxed{85}。"
    chinese_cot = "<think>\n先算 23+45=68。再算 68+17=85。\n</think>\n答案是 \\boxed{85}。"
    scores = get_reward("language_consistency")(
        ["p", "p"], [english_cot, chinese_cot], question=[question] * 2
    )
    assert scores[0] < 0.95 <= scores[1]
    assert readability_problems(english_cot, language_consistency=scores[0]) == ["mixed_language"]
    assert readability_problems(chinese_cot, language_consistency=scores[1]) == []
    assert not is_mixed_language(None)  # nothing judged: left to the structure filter


def test_filters_can_be_switched_off_and_are_checked():
    code_cot = "<think>\n```\nx\n```\n</think>\nok"
    assert readability_problems(code_cot, filters=[f for f in FILTERS if f != "code_block"]) == []
    with pytest.raises(ValueError, match="unknown readability filter.*known filters"):
        readability_problems(GOOD, filters=["spelling"])


def test_normalized_text_for_duplicates():
    assert normalized_text("<think>\nFirst,   ADD.\n</think>") == normalized_text(
        "<think> first, add. </think>"
    )


# --- rejection sampling --------------------------------------------------------------------


def chat(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning}\n</think>\nThe answer is \\boxed{{{answer}}}."


def script_for(answers: list[str]) -> dict[int, list[tuple[str, str]]]:
    """Eight samples per question, each meant to leave the funnel at a known place."""
    a0, a1 = answers
    long = "We add the numbers carefully. " * 60
    wrong = str(int(a1) + 1)
    return {
        0: [
            (chat("First, add.", a0), "stop"),  # kept
            (chat("First,   ADD.", a0), "stop"),  # duplicate of the first
            (chat("First, add.", str(int(a0) + 1)), "stop"),  # wrong
            ("<think>\nhmm\n</think>\nI do not know.", "stop"),  # no answer
            (f"<think>\n```\n{a0}\n```\n</think>\nThe answer is \\boxed{{{a0}}}.", "stop"),  # code
            (chat("Add left to right.", a0), "stop"),  # kept (second)
            (chat("Add right to left.", a0), "stop"),  # over the cap of 2
            (chat("Add them up.", a0), "length"),  # truncated
        ],
        1: [
            (f"The answer is \\boxed{{{a1}}}.", "stop"),  # structure
            (chat(long, a1), "stop"),  # long paragraph
            (chat("先算加法。", a1), "stop"),  # mixed language (the question is English)
            (chat("Add the numbers.", a1), "stop"),  # kept
            *[(chat("Add.", wrong), "stop")] * 4,  # wrong
        ],
    }


class FakeTokenizer:
    eos_token_id = None

    def __call__(self, texts):
        return {"input_ids": [[i + 1] for i in range(len(texts))]}


@pytest.fixture
def stage_dir(tmp_path):
    """A finished RL stage's directory (DONE and config), standing in for the checkpoint."""
    d = tmp_path / "reasoning-rl"
    d.mkdir()
    (d / "DONE").write_text(
        json.dumps({"fingerprint": "f00", "finished": "2026-01-01T00:00:00", "step": 12})
    )
    (d / "config.yaml").write_text("lr: 1.0e-05\n")
    return d


@pytest.fixture
def scripted(monkeypatch):
    """Sampler replaced by a script keyed by question number; no model is loaded."""
    script: dict = {}

    def fake_sample(model, prompt_ids, params, tokenizer=None, max_batch_size=None, keys=None):
        out = []
        for j, ids in enumerate(prompt_ids):
            for text, reason in script[ids[0] - 1][: params.n]:
                out.append(Completion(j, [5] * 10, [0.0] * 10, reason, text))
        return out

    monkeypatch.setattr(judging, "sample", fake_sample)
    monkeypatch.setattr(judging, "load_model_and_tokenizer", lambda *a: (None, FakeTokenizer()))
    return script


def make_config(model_dir, **overrides):
    base = {"model": str(model_dir), "tasks": [{"name": "chain_sum", "n": 2}], "device": "cpu"}
    return build_config(rej.Config, base, overrides)


def test_rejection_keeps_exactly_the_correct_readable_samples(stage_dir, scripted, tmp_path):
    cfg = make_config(stage_dir)
    _, _, examples = ev.load_task_examples(cfg.tasks[0], cfg.n, cfg.split, cfg.seed)
    scripted.update(script_for([ex.answer for ex in examples]))
    out = tmp_path / "rejection"
    summary = rej.run(cfg, out)

    counts = summary["total"]["counts"]
    expected = {
        "sampled": 16,
        "correct": 10,
        "unjudged": 0,
        "no_answer": 1,
        "wrong": 5,
        "truncated": 1,
        "structure": 1,
        "code_block": 1,
        "long_paragraph": 1,
        "mixed_language": 1,
        "duplicate": 1,
        "over_cap": 1,
        "kept": 3,
    }
    assert counts == expected
    assert summary["total"]["questions_with_kept"] == 2
    assert summary["sets"]["chain_sum"]["counts"] == expected

    rows = [json.loads(line) for line in (out / "data.jsonl").read_text().splitlines()]
    assert [r["response"] for r in rows] == [
        scripted[0][0][0],
        scripted[0][5][0],
        scripted[1][3][0],
    ]
    first = rows[0]
    assert first["question"] == examples[0].question and first["answer"] == examples[0].answer
    assert first["prompt"] == f"<|user|>{examples[0].question}<|assistant|>"
    assert first["meta"]["family"] == "chain_sum"
    prov = first["provenance"]
    assert prov["stage"] == "reasoning-rl" and prov["step"] == 12
    assert prov["model"] == str(stage_dir.resolve())
    assert prov["sampling"]["temperature"] == 0.6 and prov["sampling"]["samples_per_question"] == 8
    assert prov["date"]

    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert Counter(r["reason"] for r in rejected) == {
        k: v for k, v in expected.items() if k not in ("sampled", "correct", "kept") and v
    }
    done = json.loads((out / "DONE").read_text())
    assert done["output"] == str((out / "data.jsonl").resolve()) and done["kept"] == 3
    assert json.loads((out / "rejection.json").read_text())["total"]["counts"] == expected


def test_switching_filters_off_keeps_more(stage_dir, scripted, tmp_path):
    cfg = make_config(
        stage_dir, filters=[], drop_truncated=False, deduplicate=False, max_per_question=8
    )
    _, _, examples = ev.load_task_examples(cfg.tasks[0], cfg.n, cfg.split, cfg.seed)
    scripted.update(script_for([ex.answer for ex in examples]))
    summary = rej.run(cfg, tmp_path / "rs")
    assert summary["total"]["counts"]["kept"] == 10  # every correct sample
    # The flags are still counted among the correct samples only when a filter is on.
    assert summary["total"]["flagged_among_correct"] == dict.fromkeys(FILTERS, 0)


def test_prompts_are_rendered_as_the_eval_stage_renders_them(stage_dir, scripted, tmp_path):
    """A system prompt and an instruction, as `r1lab eval` takes them; the judging keeps
    the template's structure (the same samples are kept as without them)."""
    prompting = dict(template="r1-chat", system_prompt="Be exact.", instruction="Box it.")
    cfg = make_config(stage_dir, **prompting)
    _, _, examples = ev.load_task_examples(cfg.tasks[0], cfg.n, cfg.split, cfg.seed)
    scripted.update(script_for([ex.answer for ex in examples]))
    summary = rej.run(cfg, tmp_path / "rs")
    assert summary["total"]["counts"]["kept"] == 3
    template = ev.prompt_template("r1-chat", "Be exact.", "Box it.")[0]
    asked = ev.render_prompts(template, examples, FakeTokenizer())
    expected = {ex.question: prompt for ex, prompt in zip(examples, asked)}
    rows = [json.loads(line) for line in (tmp_path / "rs" / "data.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["prompt"] == expected[row["question"]]
        assert (
            row["prompt"] == f"<|system|>Be exact.<|user|>{row['question']}\nBox it.<|assistant|>"
        )
        assert row["provenance"]["sampling"]["system_prompt"] == "Be exact."


def test_too_few_kept_is_an_error_with_the_counts_written(stage_dir, scripted, tmp_path):
    cfg = make_config(stage_dir)
    scripted.update({0: [(chat("x", "-1"), "stop")] * 8, 1: [(chat("x", "-1"), "stop")] * 8})
    out = tmp_path / "rs"
    with pytest.raises(ValueError, match="kept 0 of 16 samples.*min_kept=0 accepts"):
        rej.run(cfg, out)
    assert json.loads((out / "rejection.json").read_text())["total"]["counts"]["wrong"] == 16
    assert not (out / "DONE").exists()
    rej.run(cfg.model_copy(update={"min_kept": 0}), out)  # a wiring check may accept nothing
    assert (out / "data.jsonl").read_text() == "" and (out / "DONE").exists()


def test_finished_run_is_not_sampled_again(stage_dir, scripted, tmp_path, monkeypatch):
    cfg = make_config(stage_dir)
    _, _, examples = ev.load_task_examples(cfg.tasks[0], cfg.n, cfg.split, cfg.seed)
    scripted.update(script_for([ex.answer for ex in examples]))
    first = rej.run(cfg, tmp_path / "rs")
    monkeypatch.setattr(judging, "sample", lambda *a, **k: pytest.fail("sampled again"))
    assert rej.run(cfg, tmp_path / "rs")["total"] == first["total"]


def test_config_errors():
    with pytest.raises(ConfigError, match="unknown readability filter"):
        build_config(rej.Config, {"model": "m", "filters": ["spelling"]})
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        build_config(rej.Config, {"model": "m", "tasks": ["nope"]})
    with pytest.raises(ConfigError, match="samples_per_question"):
        build_config(rej.Config, {"model": "m", "samples_per_question": 0})
    with pytest.raises(ConfigError, match="field 'template'.*unknown template.*r1-distill"):
        build_config(rej.Config, {"model": "m", "template": "chatml"})
    for template in ("chat", "r1-distill", "plain"):
        assert build_config(rej.Config, {"model": "m", "template": template}).template == template
