"""The pretrain stage on the micro model: it learns, saves a loadable model, stops, resumes."""

from __future__ import annotations

import json

import pytest
import torch

from r1lab.config import ConfigError, build_config
from r1lab.model.checkpoint import load_model, save_model
from r1lab.model.config import config_for_size
from r1lab.model.tokenizer import load_tokenizer, r1_zero_prompt, train_tokenizer
from r1lab.model.transformer import Transformer
from r1lab.rows import read_jsonl
from r1lab.stages import pretrain, supervised
from r1lab.stages.packing import pack_rows
from r1lab.stages.pretrain import encode_documents, split_prompt
from r1lab.training import is_done

# A few seconds on a CPU: 240 short documents, a few thousand parameters, 12 steps.
MICRO = dict(
    size="micro",
    n_documents=240,
    val_documents=40,
    vocab_size=600,
    seq_len=128,
    batch_size=8,
    lr=5e-3,
    warmup_steps=2,
    max_steps=12,
    max_minutes=None,
    log_every=4,
    eval_every=6,
    save_every=6,
)


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Micro models gain nothing from intra-op threads; on a busy machine they cost a lot."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Killed(Exception):
    """Stands in for the process dying right after a checkpoint."""


def micro_config(**overrides) -> pretrain.Config:
    return pretrain.Config(**{**MICRO, **overrides})


def test_pretrain_writes_a_loadable_model_whose_loss_fell(tmp_path):
    out = tmp_path / "pretrain"
    summary = pretrain.run(micro_config(), out)

    assert summary["steps"] == 12 and summary["stopped_by"] == "max_steps"
    assert summary["val_loss"] < summary["initial_val_loss"] - 0.5
    assert is_done(out, micro_config().fingerprint())
    model, tokenizer = load_model(out / "model"), load_tokenizer(out / "model")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    ids = torch.tensor([tokenizer("What is 12+34+56?")["input_ids"]])
    assert torch.isfinite(model(ids)).all()

    records = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 13))
    assert all(
        {"learning_rate", "grad_norm", "train/tokens_per_s"} <= r.keys()
        for r in records
        if "loss" in r
    )
    assert any("val_loss" in r for r in records)
    assert (out / "config.yaml").exists() and (out / "state" / "trainer_state.json").exists()


def test_a_finished_run_is_reused_without_training(tmp_path, monkeypatch):
    out = tmp_path / "pretrain"
    first = pretrain.run(micro_config(max_steps=2), out)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(supervised, "train_step", no_training)
    again = pretrain.run(micro_config(max_steps=2), out)
    assert again["val_loss"] == first["val_loss"] and again["steps"] == 2


def test_killed_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_one(
    tmp_path, monkeypatch
):
    straight = tmp_path / "straight"
    pretrain.run(micro_config(), straight)

    out = tmp_path / "killed"
    real_save = supervised.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(supervised, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        pretrain.run(micro_config(), out)
    assert not (out / "DONE").exists()
    assert json.loads((out / "state" / "trainer_state.json").read_text())["step"] == 6

    monkeypatch.setattr(supervised, "save_checkpoint", real_save)
    summary = pretrain.run(micro_config(), out)
    assert summary["resumed_from"] == 6 and summary["steps"] == 12
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))  # steps 7.. logged once, after the resume

    a, b = load_model(straight / "model"), load_model(out / "model")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_resuming_with_other_settings_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "pretrain"
    real_save = supervised.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(supervised, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        pretrain.run(micro_config(), out)
    monkeypatch.setattr(supervised, "save_checkpoint", real_save)
    with pytest.raises(ConfigError, match="lr"):
        pretrain.run(micro_config(lr=1e-3), out)
    summary = pretrain.run(micro_config(lr=1e-3, max_steps=2), out, resume=False)
    assert summary["resumed_from"] is None and summary["steps"] == 2


def test_time_budget_stops_early_and_still_saves(tmp_path):
    out = tmp_path / "pretrain"
    summary = pretrain.run(micro_config(max_minutes=1e-4, max_steps=1000), out)
    assert summary["stopped_by"] == "max_minutes" and summary["steps"] < 1000
    assert load_model(out / "model") is not None and (out / "DONE").exists()


def test_init_from_takes_a_given_checkpoint_as_the_base(tmp_path):
    texts = ["What is 1+2? The answer is 3."] * 20
    tokenizer = train_tokenizer(texts, 280)
    base = tmp_path / "base"
    save_model(Transformer(config_for_size("micro", len(tokenizer))), base, tokenizer=tokenizer)

    out = tmp_path / "pretrain"
    summary = pretrain.run(pretrain.Config(init_from=str(base)), out)
    assert summary["init_from"] == str(base) and is_done(out)
    assert load_model(out / "model").config.vocab_size == len(tokenizer)
    assert len(load_tokenizer(out / "model")) == len(tokenizer)


def test_packing_keeps_documents_whole_and_targets_every_token_but_the_first():
    docs = [[5] * 50, [6] * 70, [7] * 30, [8] * 60]
    ids, pos, mask = pack_rows(docs, [[1] * len(d) for d in docs], seq_len=128, pad_id=0)
    assert ids.shape == (2, 128)
    starts = (pos == 0).nonzero().tolist()
    for row, col in starts:
        token = int(ids[row, col])
        if token:  # a document starts here: all of it is in this row
            length = len(next(d for d in docs if d[0] == token))
            assert (ids[row, col : col + length] == token).all()
            assert mask[row, col] == 0 and mask[row, col + 1 : col + length].all()
    assert int(mask.sum()) == sum(len(d) - 1 for d in docs)


def test_r1_zero_documents_are_encoded_as_the_prompt_is_encoded_alone():
    question = "What is 12+34+56?"
    completion = " <think> First, 12+34=46. Then 46+56=102. </think> <answer> 102 </answer>"
    docs = [r1_zero_prompt(question) + completion, "What is 1+2+3?\nThe answer is 6."]
    tokenizer = train_tokenizer(docs * 20, 400)
    assert split_prompt(docs[0]) == (r1_zero_prompt(question), completion)
    assert split_prompt(docs[1]) == ("", docs[1])

    ids = encode_documents(docs, tokenizer)
    prompt_ids = tokenizer(r1_zero_prompt(question))["input_ids"]
    assert ids[0][: len(prompt_ids)] == prompt_ids  # what the sampler will be given
    assert all(doc[-1] == tokenizer.eos_token_id for doc in ids)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"families": ["nope"]}, "families"),
        ({"levels": [7]}, "levels"),
        ({"size": "huge"}, "size"),
        ({"lr": -1}, "lr"),
        ({"size": "micro", "seq_len": 1000}, "seq_len"),
        ({"families": ["chain_sum"], "family_weights": [1, 2]}, "family_weights"),
        ({"corpus_options": {"typo_fraction": 0.1}}, "corpus_options"),
    ],
)
def test_a_bad_setting_names_its_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        build_config(pretrain.Config, overrides)
