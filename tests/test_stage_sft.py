"""The SFT stage: response-only loss, packing that keeps examples apart, clear data errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_random_micro_model

from r1lab.cli import main
from r1lab.config import ConfigError, build_config
from r1lab.engine.logprobs import token_logprobs
from r1lab.model.checkpoint import load_model, save_model
from r1lab.model.tokenizer import load_tokenizer, r1_chat_prompt
from r1lab.rows import DataError, read_jsonl
from r1lab.stages import sft, supervised
from r1lab.stages.data import mix_sources
from r1lab.stages.lm_loss import masked_nll
from r1lab.stages.packing import pack_rows, tokenize_examples
from r1lab.tasks.corpus import cold_start_examples
from r1lab.training import is_done

ROWS = [
    {
        "prompt": r1_chat_prompt("What is 12+30+4?"),
        "response": "<think>\n12+30=42\n42+4=46\n</think>\nThe answer is \\boxed{46}.",
    },
    {
        "prompt": r1_chat_prompt("计算 5+6+7 。"),
        "response": "<think>\n5+6=11\n11+7=18\n</think>\n答案是 \\boxed{18}。",
    },
    {"prompt": r1_chat_prompt("Compute 9+9+9."), "response": "The answer is \\boxed{27}."},
]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Micro models gain nothing from intra-op threads; on a busy machine they cost a lot."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A micro model folder with a tokenizer trained on chat-format examples."""
    examples = cold_start_examples("chain_sum", 300, 0, zh_fraction=0.3)
    return save_random_micro_model(
        tmp_path_factory.mktemp("base") / "model",
        vocab_size=400,
        texts=[e["prompt"] + e["response"] for e in examples],
    )


def micro_config(base, **overrides) -> sft.Config:
    settings = dict(
        model=str(base),
        n_examples=120,
        val_examples=12,
        batch_size=4,
        epochs=2,
        lr=3e-3,
        warmup_steps=2,
        log_every=5,
        eval_every=10,
        save_every=10,
    )
    return sft.Config(**{**settings, **overrides})


def test_prompt_tokens_are_masked_and_the_response_ends_with_eos(base):
    tokenizer = load_tokenizer(base)
    docs, masks, cut = tokenize_examples(ROWS, tokenizer, seq_len=256)
    assert cut == 0 and len(docs) == 3
    for row, ids, mask in zip(ROWS, docs, masks):
        prompt = tokenizer(row["prompt"])["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        assert ids == prompt + response + [tokenizer.eos_token_id]
        assert mask == [0] * len(prompt) + [1] * (len(response) + 1)


def test_packed_loss_is_the_response_loss_of_each_example_alone(base):
    """Packing three examples in one row gives the loss of the responses computed one by one:
    prompt tokens are no targets, and no example sees another."""
    model, tokenizer = load_model(base), load_tokenizer(base)
    docs, masks, _ = tokenize_examples(ROWS, tokenizer, seq_len=256)
    ids, pos, mask = pack_rows(docs, masks, seq_len=256, pad_id=tokenizer.pad_token_id)
    assert ids.shape[0] == 1
    with torch.no_grad():
        packed = masked_nll(model, ids, pos, mask)

    total, count = 0.0, 0
    for doc, doc_mask in zip(docs, masks):
        with torch.no_grad():
            logprobs, _ = token_logprobs(model, torch.tensor([doc]))
        targets = torch.tensor(doc_mask[1:], dtype=torch.bool)
        total -= float(logprobs[0][targets].sum())
        count += int(targets.sum())
    torch.testing.assert_close(float(packed), total / count, rtol=1e-5, atol=1e-5)


def test_sft_learns_the_responses_and_is_reused_when_done(base, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    summary = sft.run(micro_config(base), out)
    assert summary["stopped_by"] == "epochs" and summary["steps"] > 4
    assert summary["val_loss"] < summary["initial_val_loss"]
    assert is_done(out, micro_config(base).fingerprint())
    model, tokenizer = load_model(out / "model"), load_tokenizer(out / "model")
    assert model.config.vocab_size == len(tokenizer)
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, summary["steps"] + 1))

    monkeypatch.setattr(supervised, "train_step", lambda *a, **k: pytest.fail("trained again"))
    assert sft.run(micro_config(base), out)["val_loss"] == summary["val_loss"]


def test_killed_sft_resumes_where_it_stopped(base, tmp_path, monkeypatch):
    straight = sft.run(micro_config(base), tmp_path / "straight")
    out = tmp_path / "killed"
    real_save = supervised.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(supervised, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        sft.run(micro_config(base), out)
    monkeypatch.setattr(supervised, "save_checkpoint", real_save)
    resumed = sft.run(micro_config(base), out)
    assert resumed["resumed_from"] == 10 and resumed["steps"] == straight["steps"]
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-5)


def test_sft_from_jsonl_and_a_stage_run_dir(base, tmp_path):
    run_dir = tmp_path / "previous_stage"
    save_model(load_model(base), run_dir / "model", tokenizer=load_tokenizer(base))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 10))
    summary = sft.run(
        micro_config(run_dir, data=[str(data), "non-reasoning"], data_weights=[3, 1], epochs=1),
        tmp_path / "sft",
    )
    assert summary["base"] == str(run_dir / "model")
    assert summary["examples"] + summary["val_examples"] == 30 + 120


def test_mixture_weights_set_each_source_share():
    a = [{"prompt": "a", "response": str(i)} for i in range(10)]
    b = [{"prompt": "b", "response": str(i)} for i in range(30)]
    mixed = mix_sources([a, b], [1, 1], seed=0)
    assert len(mixed) == 40 and sum(r["prompt"] == "a" for r in mixed) == 20
    assert len({r["response"] for r in mixed if r["prompt"] == "a"}) == 10  # all used, then repeats
    assert len(mix_sources([a, b], None, seed=0)) == 40


def test_trl_prompt_completion_rows_train_as_prompt_response_rows(base, tmp_path):
    """TRL's `completion` is another name for `response` (also given with it, if equal)."""
    shapes = {
        "response": ROWS,
        "completion": [{"prompt": r["prompt"], "completion": r["response"]} for r in ROWS],
        "both": [{**r, "completion": r["response"]} for r in ROWS],
    }
    losses = {}
    for name, rows in shapes.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows * 10))
        cfg = micro_config(base, data=[str(data)], max_steps=2, log_every=1, val_examples=3)
        assert sft.load_examples(cfg, load_tokenizer(base)) == sft.load_examples(
            micro_config(base, data=[str(tmp_path / "response.jsonl")]), load_tokenizer(base)
        )
        sft.run(cfg, tmp_path / name)
        losses[name] = [
            r["loss"] for r in read_jsonl(tmp_path / name / "metrics.jsonl") if "loss" in r
        ]
    assert len(losses["response"]) == 2
    assert losses["completion"] == losses["both"] == losses["response"]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"prompt": "p", "response": "r"}\n{"prompt": "p", "response": \n',
            r"data\.jsonl line 2: invalid JSON",
        ),
        (
            '{"prompt": "p", "response": "r"}\n\n{"prompt": "p"}\n',
            r"data\.jsonl line 3: missing field 'response'",
        ),
        ('{"response": "r"}\n', r"data\.jsonl line 1: missing field 'prompt'"),
        ('{"prompt": "p", "response": 5}\n', r"line 1: field 'response' must be a string"),
        (
            '{"prompt": "p", "completion": "c"}\n{"prompt": "p", "response": "r", "completion": "c"}\n',
            r"data\.jsonl line 2: fields 'response' and 'completion' differ",
        ),
        ('{"prompt": "p", "completion": 5}\n', r"line 1: field 'completion' must be a string"),
        ('{"prompt": "p", "completion": " "}\n', r"line 1: field 'completion' is empty"),
        (
            '{"prompt": [{"role": "user", "content": "p"}], "completion": "c"}\n',
            r"line 1: field 'prompt' must be a string, got list \(a conversational",
        ),
        ('{"prompt": "p", "response": "  "}\n', r"line 1: field 'response' is empty"),
        ('["p", "r"]\n', r"line 1: expected a JSON object"),
        ("", r"data\.jsonl: no rows \(the file is empty\)"),
    ],
)
def test_bad_data_names_file_line_and_field_and_writes_nothing(base, tmp_path, text, message):
    data = tmp_path / "data.jsonl"
    data.write_text(text)
    out = tmp_path / "sft"
    with pytest.raises(DataError, match=message):
        sft.run(micro_config(base, data=[str(data)]), out)
    assert not out.exists()


@pytest.mark.parametrize(
    "source, error, message",
    [
        ("missing.jsonl", FileNotFoundError, "SFT data file not found"),
        ("cold_start", DataError, "built-in: cold-start, non-reasoning"),
    ],
)
def test_unknown_sources_are_named(base, tmp_path, source, error, message):
    out = tmp_path / "sft"
    with pytest.raises(error, match=message):
        sft.run(micro_config(base, data=[source]), out)
    assert not out.exists()


def test_cli_reports_a_bad_line_without_a_traceback(base, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "p"}\n')
    code = main(["sft", "--out", str(tmp_path / "sft"), f"model={base}", f"data={data}"])
    assert code == 2
    assert "line 1: missing field 'response'" in capsys.readouterr().err
    assert not (tmp_path / "sft").exists()


def test_config_requires_a_model_and_matching_weights():
    with pytest.raises(ConfigError, match="'model'"):
        build_config(sft.Config, {})
    with pytest.raises(ConfigError, match="data_weights"):
        build_config(sft.Config, {"model": "m", "data": ["cold-start"], "data_weights": [1, 2]})
    assert build_config(sft.Config, {"model": "m", "data": "x.jsonl"}).data == ["x.jsonl"]
