"""The evaluation stage: exact numbers from scripted samples, and an end-to-end run."""

from __future__ import annotations

import inspect
import json
from fractions import Fraction

import pytest
from conftest import save_random_micro_model

import r1lab.stages.evaluate as ev
import r1lab.stages.judging as judging
from r1lab.config import ConfigError, build_config
from r1lab.engine.generate import Completion
from r1lab.engine.sampling import sample_key
from r1lab.tasks.base import Example, Task

MAX_NEW = 16


class FractionTask(Task):
    """Answers are numbers; "0.5" and "1/2" are the same answer."""

    name = "fractions"

    def verify(self, predicted, reference, example=None):
        try:
            return Fraction(predicted.strip()) == Fraction(reference.strip())
        except (ValueError, ZeroDivisionError):
            return False


def ok(answer: str) -> str:
    return f" <think> add the numbers </think> <answer> {answer} </answer>"


# question -> the k=4 completions: (text, number of tokens, finish reason)
SCRIPT = {
    0: [
        (ok("0.5"), 10, "stop"),
        (ok("1/2"), 10, "stop"),
        (ok("3"), 10, "stop"),
        ("no idea", MAX_NEW, "length"),
    ],
    1: [(ok("4"), 10, "stop"), (ok("4"), 10, "stop"), (ok("3"), 10, "stop"), (ok("5"), 10, "stop")],
    2: [
        (ok("7"), 10, "stop"),
        (ok("7"), 10, "stop"),
        (ok("7"), 10, "stop"),
        (" <think> add the", MAX_NEW, "length"),
    ],
}
EXAMPLES = [
    Example("What is 1/4+1/4?", "1/2", {"level": 1}),
    Example("What is 1+2?", "3", {"level": 1}),
    Example("What is 3+4?", "7", {"level": 2}),
]


class FakeTokenizer:
    """Encodes prompt number i as [i + 1]; enough for a scripted sampler."""

    eos_token_id = None

    def __call__(self, texts):
        return {"input_ids": [[i + 1] for i in range(len(texts))]}


@pytest.fixture
def scripted(monkeypatch):
    """Replace the sampler with SCRIPT; records the calls it gets."""
    calls = []

    def fake_sample(model, prompt_ids, params, tokenizer=None, max_batch_size=None, keys=None):
        calls.append({"questions": [p[0] - 1 for p in prompt_ids], "params": params, "keys": keys})
        out = []
        for j, ids in enumerate(prompt_ids):
            for text, length, reason in SCRIPT[ids[0] - 1][: params.n]:
                out.append(Completion(j, [5] * length, [0.0] * length, reason, text))
        return out

    monkeypatch.setattr(judging, "sample", fake_sample)
    return calls


def test_scores_match_hand_computed_values(scripted):
    result = ev.evaluate(
        None,
        FakeTokenizer(),
        EXAMPLES,
        FractionTask(),
        k=4,
        max_new_tokens=MAX_NEW,
        max_batch_size=8,
        progress=False,
    )
    assert result["pass@1"] == pytest.approx((2 / 4 + 1 / 4 + 3 / 4) / 3)
    assert result["cons@k"] == pytest.approx(2 / 3)  # {0.5, 1/2} wins; "4" wins; "7" wins
    assert result["pass@k"] == {"1": pytest.approx(0.5), "4": pytest.approx(1.0)}
    assert result["format_rate"] == pytest.approx(10 / 12)
    assert result["answer_rate"] == pytest.approx(10 / 12)
    assert result["truncation_rate"] == pytest.approx(2 / 12)
    assert result["mean_length"] == pytest.approx((10 * 10 + 2 * MAX_NEW) / 12)
    # "no idea" has no chain of thought: no language to measure, so it is left out
    assert result["language_consistency"] == pytest.approx(1.0)
    assert result["n_questions"] == 3 and result["k"] == 4 and result["unjudged"] == 0
    assert result["sampling"] == {
        "greedy": False,
        "k": 4,
        "temperature": 0.6,
        "top_p": 0.95,
        "max_new_tokens": MAX_NEW,
        "seed": 0,
    }
    assert result["breakdown"]["level"] == {
        "1": {"n": 2, "pass@1": pytest.approx(3 / 8), "cons@k": pytest.approx(0.5)},
        "2": {"n": 1, "pass@1": pytest.approx(3 / 4), "cons@k": pytest.approx(1.0)},
    }
    shown = result["samples"][0]
    assert (
        shown["answer"] == "0.5" and shown["correct"] and shown["question"] == EXAMPLES[0].question
    )


def test_batches_hold_whole_questions_and_use_the_protocol(scripted):
    ev.evaluate(
        None, FakeTokenizer(), EXAMPLES, FractionTask(), k=4, max_batch_size=8, progress=False
    )
    assert [c["questions"] for c in scripted] == [[0, 1], [2]]  # 8 // 4 = 2 questions a batch
    params = scripted[0]["params"]
    assert (params.n, params.temperature, params.top_p) == (4, 0.6, 0.95)
    # question q is drawn with the key (seed, q), whatever batch it is in
    keys = [sample_key(0, q) for q in range(3)]
    assert [c["keys"] for c in scripted] == [keys[:2], keys[2:]]


def test_greedy_is_one_sample_at_temperature_zero(scripted):
    result = ev.evaluate(
        None, FakeTokenizer(), EXAMPLES, FractionTask(), k=4, greedy=True, progress=False
    )
    params = scripted[0]["params"]
    assert (params.n, params.temperature) == (1, 0.0)
    assert result["k"] == 1 and result["sampling"]["greedy"] is True
    assert result["pass@1"] == pytest.approx(2 / 3)  # first samples: 0.5 right, 4 wrong, 7 right
    assert result["cons@k"] == result["pass@1"]


def test_plain_template_has_no_format_rate(scripted):
    result = ev.evaluate(
        None, FakeTokenizer(), EXAMPLES, FractionTask(), k=2, template="plain", progress=False
    )
    assert result["format_rate"] is None


@pytest.mark.parametrize("k", [0, -1, 1.5])
def test_bad_k_is_an_error(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        ev.evaluate(None, FakeTokenizer(), EXAMPLES, FractionTask(), k=k, progress=False)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="no examples"):
        ev.evaluate(None, FakeTokenizer(), [], FractionTask(), progress=False)
    with pytest.raises(ValueError, match="unknown template"):
        ev.evaluate(
            None, FakeTokenizer(), EXAMPLES, FractionTask(), template="chatml", progress=False
        )
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        ev.evaluate(None, FakeTokenizer(), EXAMPLES, "nope", progress=False)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="unknown task 'nope'.*known tasks"):
        build_config(ev.Config, {"model": "m", "tasks": [{"name": "nope"}]})
    with pytest.raises(ConfigError, match="'k'"):
        build_config(ev.Config, {"model": "m", "k": 0})
    with pytest.raises(ConfigError, match="unknown template"):
        build_config(ev.Config, {"model": "m", "template": "chatml"})
    with pytest.raises(ConfigError, match="model"):
        build_config(ev.Config, {})
    with pytest.raises(ConfigError, match="labels must be unique"):
        build_config(
            ev.Config, {"model": "m", "tasks": ["chain_sum", {"name": "chain_sum", "n": 5}]}
        )
    cfg = build_config(ev.Config, {"model": "m", "greedy": True, "k": 8})
    assert cfg.k == 1


def test_the_config_sets_every_evaluate_option_by_name():
    # `r1lab eval` passes its fields to evaluate by name; all but the progress bar are settable
    cfg = build_config(ev.Config, {"model": "m", "k": 2, "n_shown": 1, "instruction": "x"})
    options = inspect.signature(ev.evaluate_with_records).parameters.values()
    expected = {o.name for o in options if o.kind is o.KEYWORD_ONLY} - {"progress"}
    assert set(cfg.protocol()) == expected
    assert cfg.protocol() | {"k": 2, "n_shown": 1, "instruction": "x"} == cfg.protocol()


def test_task_spec_options_reach_the_task():
    spec, task, examples = ev.load_task_examples(
        {"name": "chain_sum", "n": 5, "levels": [2], "label": "sums-l2"}
    )
    assert spec.label == "sums-l2" and len(examples) == 5
    assert all(ex.meta["level"] == 2 for ex in examples)
    with pytest.raises(ConfigError, match="bad options"):
        ev.load_task_examples({"name": "chain_sum", "colour": "red"})


# --- a real (random) model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny model with a BPE tokenizer, saved as a stage run dir."""
    from r1lab.tasks.corpus import pretrain_documents

    run_dir = tmp_path_factory.mktemp("stage")
    save_random_micro_model(
        run_dir / "model", vocab_size=300, texts=pretrain_documents("chain_sum", n=200)
    )
    (run_dir / "DONE").write_text(json.dumps({"fingerprint": "abc", "finished": "now", "step": 7}))
    return run_dir


def test_random_model_end_to_end(tiny_model_dir):
    model, tokenizer = ev.load_model_and_tokenizer(str(tiny_model_dir), "cpu", "float32")
    spec, task, examples = ev.load_task_examples({"name": "chain_sum", "n": 6})
    result = ev.evaluate(
        model, tokenizer, examples, task, k=3, max_new_tokens=8, max_batch_size=6, progress=False
    )
    assert result["n_questions"] == 6 and result["k"] == 3
    assert 0.0 <= result["pass@1"] <= result["pass@k"]["3"] <= 1.0
    assert 0.0 <= result["cons@k"] <= 1.0
    assert 0 < result["mean_length"] <= 8 and result["length"]["max"] <= 8
    assert 0.0 <= result["truncation_rate"] <= 1.0
    assert len(result["samples"]) == 3


def test_stage_writes_results_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    cfg = build_config(
        ev.Config,
        {
            "model": str(tiny_model_dir),
            "tasks": [{"name": "chain_sum", "n": 4}, {"name": "arithmetic", "n": 3}],
            "k": 2,
            "max_new_tokens": 6,
            "device": "cpu",
        },
    )
    out = tmp_path / "eval"
    report = ev.run(cfg, out)
    saved = json.loads((out / "eval.json").read_text())
    assert saved["sets"].keys() == {"chain_sum", "arithmetic"}
    assert saved["sets"]["chain_sum"]["n_questions"] == 4
    assert saved["model"]["stage"] == tiny_model_dir.name and saved["model"]["step"] == 7
    assert report["sets"]["arithmetic"]["pass@1"] == saved["sets"]["arithmetic"]["pass@1"]
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == (4 + 3) * 2
    assert "| chain_sum | 4 | 2 |" in (out / "eval.md").read_text()
    assert json.loads((out / "DONE").read_text())["fingerprint"] == cfg.fingerprint()

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished evaluation must not sample again")

    monkeypatch.setattr(judging, "sample", no_sampling)
    assert ev.run(cfg, out)["sets"] == saved["sets"]
