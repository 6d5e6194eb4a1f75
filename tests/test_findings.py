"""The findings logic, self-check counting and the run-wide seed."""

from __future__ import annotations

import json
import math

import pytest

from r1lab import findings, pipeline
from r1lab.config import ConfigError, load_preset
from r1lab.metrics import is_self_check, question_mean, question_mean_stderr

# --- self-check counting -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "First, 23+45=68. Wait, let me verify by adding in reverse: 17+45=62.",
        "Then 68+17=85. Let me check: 85-17=68. It checks out.",
        "I made a mistake. Let me redo it.",
        "先算 23+45=68。等等，倒过来验算：17+45=62。",
        "得到 84，不是 85，前面算错了，重新计算。",
    ],
)
def test_self_checks_are_counted_in_both_languages(text):
    assert is_self_check(text)


@pytest.mark.parametrize(
    "text",
    ["First, 23+45=68. Then 68+17=85.", "<answer> 85 </answer>", "先算 23+45=68。再算 68+17=85。"],
)
def test_plain_work_is_not_a_self_check(text):
    assert not is_self_check(text)


def test_question_mean_and_its_stderr_treat_questions_as_the_unit():
    values = [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]]
    assert question_mean(values) == pytest.approx(0.5)
    # three per-question means 1, 0, 0.5: sample std 0.5, over sqrt(3)
    assert question_mean_stderr(values) == pytest.approx(0.5 / math.sqrt(3))
    assert question_mean_stderr([[0.3, 0.9]]) == 0.0
    with pytest.raises(ValueError, match="no samples"):
        question_mean([[1.0], []])


# --- findings on synthetic run dirs --------------------------------------------------------

EN, ZH = "What is 12+34+56?", "12+34+56 等于多少？"


def _set(question, p, lang=1.0, fmt=1.0, length=40.0, checks=0.1, se=0.02):
    return {
        "pass@1": p,
        "pass@1_stderr": se,
        "format_rate": fmt,
        "format_rate_stderr": se,
        "mean_length": length,
        "mean_length_stderr": 1.0,
        "self_check_rate": checks,
        "self_check_rate_stderr": 0.01,
        "language_consistency": lang,
        "language_consistency_stderr": 0.01,
        "samples": [{"question": question}],
    }


def _write(run_dir, stage, en, zh):
    path = run_dir / "eval" / stage / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"sets": {"en": en, "zh": zh}}))


def _paper_like_run(run_dir):
    """A run in which all four findings hold."""
    _write(run_dir, "base", _set(EN, 0.35, fmt=0.3, length=12, checks=0.0),
           _set(ZH, 0.30, fmt=0.3, length=12, checks=0.0))  # fmt: skip
    _write(run_dir, "r1-zero", _set(EN, 0.70, checks=0.15),
           _set(ZH, 0.66, lang=0.75, checks=0.15))  # fmt: skip
    _write(run_dir, "reasoning-rl", _set(EN, 0.80), _set(ZH, 0.78, lang=0.995))
    _write(run_dir, "general-rl", _set(EN, 0.85), _set(ZH, 0.84, lang=0.99))
    _write(run_dir, "student-rl", _set(EN, 0.30), _set(ZH, 0.25))
    _write(run_dir, "distill", _set(EN, 0.60), _set(ZH, 0.55))


def test_all_four_findings_hold_on_a_paper_like_run(tmp_path):
    _paper_like_run(tmp_path)
    result = findings.check_findings(tmp_path)
    assert [f.verdict for f in result] == ["holds"] * 4
    text = "\n".join(findings.findings_markdown(result))
    assert text.count(": holds.**") == 4 and "± " in text


def test_each_finding_fails_on_its_own_counterexample(tmp_path):
    _paper_like_run(tmp_path)
    # R1-Zero's base already writes the format: nothing to discover.
    (tmp_path / "eval" / "base" / "eval.json").unlink()
    _write(tmp_path / "x", "base", _set(EN, 0.35, fmt=0.95, length=12), _set(ZH, 0.3, length=12))
    (tmp_path / "eval" / "base").rmdir()
    (tmp_path / "x" / "eval" / "base").rename(tmp_path / "eval" / "base")
    first = findings.r1_zero_discovers(tmp_path)
    assert first.verdict == "does not hold"
    assert [c.holds for c in first.criteria][0] is False

    # Distillation ahead in English only: the finding needs both languages.
    (tmp_path / "eval" / "distill" / "eval.json").write_text(
        json.dumps({"sets": {"en": _set(EN, 0.6), "zh": _set(ZH, 0.27)}})
    )
    assert findings.distillation_wins(tmp_path).verdict == "does not hold"


def test_a_gain_within_noise_does_not_count(tmp_path):
    _paper_like_run(tmp_path)
    # general-rl 3 points above r1-zero with standard errors of 4 points: not beyond 2 SE.
    (tmp_path / "eval" / "general-rl" / "eval.json").write_text(
        json.dumps({"sets": {"en": _set(EN, 0.73, se=0.04), "zh": _set(ZH, 0.69, se=0.04)}})
    )
    for stage in ("r1-zero",):
        path = tmp_path / "eval" / stage / "eval.json"
        data = json.loads(path.read_text())
        for res in data["sets"].values():
            res["pass@1_stderr"] = 0.04
        path.write_text(json.dumps(data))
    assert findings.r1_beats_r1_zero(tmp_path).verdict == "does not hold"


def test_readability_needs_mixing_first_and_no_accuracy_cost(tmp_path):
    _paper_like_run(tmp_path)
    _write(tmp_path / "y", "reasoning-rl", _set(EN, 0.8), _set(ZH, 0.60, lang=0.995))
    path = tmp_path / "eval" / "reasoning-rl" / "eval.json"
    path.write_text((tmp_path / "y" / "eval" / "reasoning-rl" / "eval.json").read_text())
    finding = findings.readability(tmp_path)
    assert finding.verdict == "does not hold"
    assert [c.holds for c in finding.criteria] == [True, True, True, False]


def test_readability_needs_r1_zero_to_reason_first(tmp_path):
    """Brief answers in English to Chinese questions are not language mixing in reasoning."""
    _paper_like_run(tmp_path)
    path = tmp_path / "eval" / "r1-zero" / "eval.json"
    path.write_text(
        json.dumps(
            {"sets": {"en": _set(EN, 0.1, length=13), "zh": _set(ZH, 0.1, lang=0.7, length=13)}}
        )
    )
    finding = findings.readability(tmp_path)
    assert finding.verdict == "does not hold"
    assert [c.holds for c in finding.criteria][:2] == [False, True]


def test_a_missing_stage_is_not_checked_rather_than_failed(tmp_path):
    _paper_like_run(tmp_path)
    (tmp_path / "eval" / "student-rl" / "eval.json").unlink()
    finding = findings.distillation_wins(tmp_path)
    assert not finding.holds and finding.verdict.startswith("not checked")


# --- the run-wide seed ---------------------------------------------------------------------


def test_seed_reaches_every_stage_and_the_evaluation(tmp_path):
    parsed = pipeline._spread_seed({"seed": 2, "r1-zero": {"seed": 7, "steps": 3}})
    preset = load_preset("micro")
    for stage in pipeline.GRAPH:
        if stage.data_from:  # wired to upstream sample files that do not exist here
            continue
        cfg = pipeline.stage_config(stage, tmp_path, preset, parsed)
        assert cfg.seed == (7 if stage.name == "r1-zero" else 2), stage.name
    assert pipeline.eval_config(pipeline.GRAPH[0], tmp_path, preset, parsed).seed == 2
    assert pipeline._spread_seed({"eval": {"k": 2}}) == {"eval": {"k": 2}}
    with pytest.raises(ConfigError, match="seed"):
        pipeline._spread_seed({"seed": "one"})
