"""The Bradley-Terry reward model learns a procedural preference and plugs into GRPO."""

import json

import pytest
from conftest import save_random_micro_model

from r1lab.rewards.reward_model import text_to_judge
from r1lab.stages import reward_model as rm_stage
from r1lab.tasks.corpus import pretrain_documents


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random micro decoder with a tokenizer trained on the procedural corpus."""
    texts = pretrain_documents("chain_sum", n=400, seed=0, zh_fraction=0.3)
    return save_random_micro_model(
        tmp_path_factory.mktemp("base") / "model", vocab_size=400, texts=texts
    )


def test_reward_model_learns_procedural_preference(base_dir, tmp_path):
    cfg = rm_stage.Config(
        model=str(base_dir), n_pairs=300, epochs=2, batch_size=16, lr=3e-3, max_length=64
    )
    summary = rm_stage.run(cfg, tmp_path / "rm")
    assert summary["heldout_pair_accuracy"] >= 0.7
    assert summary["heldout_pair_accuracy"] > summary["heldout_pair_accuracy_before"]
    # The saved model scores like the trained one and ranks a clear answer over a refusal.
    scorer = rm_stage.RewardModelScorer(tmp_path / "rm")
    prompt = "<|user|>What is 12+30+41?<|assistant|>"
    good = scorer([prompt], ["The answer is \\boxed{83}."])[0]
    bad = scorer([prompt], ["I am not sure, I cannot answer this."])[0]
    assert good > bad
    # A rerun with the same config is skipped and returns the recorded summary.
    again = rm_stage.run(cfg, tmp_path / "rm")
    assert again["heldout_pair_accuracy"] == summary["heldout_pair_accuracy"]


def test_pairs_file_errors_name_file_and_line(base_dir, tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text(
        json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
        + "\n"
        + json.dumps({"prompt": "p"})
        + "\n"
    )
    cfg = rm_stage.Config(model=str(base_dir), data=[str(bad)])
    with pytest.raises(ValueError, match=r"pairs.jsonl line 2: missing or non-text field 'chosen'"):
        rm_stage.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out" / "model").exists()


def test_training_and_scoring_judge_the_same_summary():
    judged = "<think>\n1+1=2\n</think>\nThe answer is 2."
    assert text_to_judge("", judged) == "The answer is 2."
    assert text_to_judge("", "no think block") == "no think block"
    assert text_to_judge("", "<think>\nstill thinking") is None  # nothing to judge
    assert text_to_judge("", judged, on="response") == judged


def test_pairs_without_a_summary_are_left_out_of_training(base_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "p", "chosen": "<think>a</think> yes", "rejected": "<think>b</think> no"},
        {"prompt": "p", "chosen": "<think>a</think> yes", "rejected": "<think>never closed"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = rm_stage.load_pairs(rm_stage.Config(model=str(base_dir), data=[str(pairs)]))
    assert kept == [{"prompt": "p", "chosen": "yes", "rejected": "no"}]
