"""Tokenizer training, loading and prompt templates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from r1lab.model.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    R1_ZERO_TEMPLATE,
    SPECIAL_TOKENS,
    SYSTEM,
    TEMPLATES,
    USER,
    load_tokenizer,
    r1_chat_prompt,
    r1_zero_prompt,
    render_prompt,
    save_tokenizer,
    train_tokenizer,
)
from r1lab.tags import ANSWER_CLOSE, ANSWER_OPEN, REASONING_TAGS, THINK_CLOSE, THINK_OPEN
from r1lab.tasks.corpus import pretrain_documents

# Measured: after training on 2,000 documents the whole template (question left out) takes
# 19 tokens: the 8 tag ids, the 8 pieces of text between them, and ". Assistant:" as 2.
TEMPLATE_TOKENS_MEASURED = 19

TEXTS = [
    "What is 23+45+17? First, 23+45=68. Then 68+17=85.",
    "  leading spaces, trailing spaces  \n\ttabs\r\nand a . b , c ' s -- \\boxed{x}",
    "计算 23+45+17 。先算 23+45=68。再算 68+17=85。答案是 85。",
    "mixed 中文 and English, emoji 🙂, accents éàü, ünïcödé ½",
    "",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return pretrain_documents(n=2000, seed=0, zh_fraction=0.3)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, vocab_size=1024)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_round_trip_corpus(tokenizer, corpus):
    for doc in corpus[:300]:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


def test_special_tokens_are_single_ids(tokenizer):
    ids = {}
    for token in SPECIAL_TOKENS + REASONING_TAGS:
        encoded = tokenizer.encode(token)
        assert len(encoded) == 1, token
        ids[token] = encoded[0]
        assert tokenizer.convert_ids_to_tokens(encoded[0]) == token
    assert len(set(ids.values())) == len(ids)
    assert tokenizer.bos_token == BOS and tokenizer.bos_token_id == ids[BOS]
    assert tokenizer.eos_token == EOS and tokenizer.eos_token_id == ids[EOS]
    assert tokenizer.pad_token == PAD and tokenizer.pad_token_id == ids[PAD]


def test_tags_survive_decode_role_markers_do_not(tokenizer):
    text = (
        f"{USER}q{ASSISTANT}{THINK_OPEN}\n1+2=3\n{THINK_CLOSE} {ANSWER_OPEN} 3 {ANSWER_CLOSE}{EOS}"
    )
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    skipped = tokenizer.decode(ids, skip_special_tokens=True)
    assert skipped == f"q{THINK_OPEN}\n1+2=3\n{THINK_CLOSE} {ANSWER_OPEN} 3 {ANSWER_CLOSE}"


def test_tags_split_from_neighbouring_text(tokenizer):
    ids = tokenizer.encode("x<think>y</think>z")
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert THINK_OPEN in tokens and THINK_CLOSE in tokens


def test_digits_are_split_one_by_one(tokenizer):
    for text in ["12345", "x=2024.", "计算 9876+10", "(-42)*7=-294"]:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(text))
        digits = [t for t in tokens if any(c.isdigit() for c in t)]
        assert all(len(t) == 1 for t in digits), tokens
        assert len(digits) == sum(c.isdigit() for c in text)


def test_r1_zero_template_compresses(tokenizer):
    prefix, suffix = R1_ZERO_TEMPLATE.split("{prompt}")
    n_tokens = len(tokenizer.encode(prefix)) + len(tokenizer.encode(suffix))
    assert n_tokens <= TEMPLATE_TOKENS_MEASURED + 5
    assert len(prefix + suffix) > 300  # characters: the compression is real


def test_documents_fit_a_short_context(tokenizer, corpus):
    lengths = [len(tokenizer.encode(doc)) for doc in corpus]
    assert max(lengths) <= 256
    assert sum(lengths) / len(lengths) <= 96


def test_vocab_size_is_respected(corpus):
    tokenizer = train_tokenizer(corpus, vocab_size=400)
    assert len(tokenizer) <= 400
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(corpus, vocab_size=100)


def test_saved_config_uses_names_transformers_4_and_5_share(tokenizer, tmp_path):
    """transformers 4.x cannot load `TokenizersBackend` or a list of `extra_special_tokens`."""
    import json

    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "extra_special_tokens" not in config
    assert USER in config["additional_special_tokens"]
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert USER in loaded.all_special_tokens and loaded.pad_token == tokenizer.pad_token


def test_save_and_load(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)
    plain = AutoTokenizer.from_pretrained(str(tmp_path))
    for other in (loaded, plain):
        assert len(other) == len(tokenizer)
        for text in TEXTS + [f"{USER}hi{ASSISTANT}{THINK_OPEN} 1 {THINK_CLOSE}{EOS}"]:
            assert other.encode(text) == tokenizer.encode(text)
            assert other.decode(other.encode(text)) == text
        assert (other.bos_token_id, other.eos_token_id, other.pad_token_id) == (
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            tokenizer.pad_token_id,
        )
        assert r1_chat_prompt("What is 2+2?", other) == f"{USER}What is 2+2?{ASSISTANT}"


def test_chat_template_renders_r1_format(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\n2+2=4\n</think>\nThe answer is \\boxed{4}."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        f"{SYSTEM}Be brief.{USER}What is 2+2?{ASSISTANT}"
        f"<think>\n2+2=4\n</think>\nThe answer is \\boxed{{4}}.{EOS}"
    )
    prompt = tokenizer.apply_chat_template(
        messages[1:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt == r1_chat_prompt("What is 2+2?") == r1_chat_prompt("What is 2+2?", tokenizer)


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_tokenizer(tmp_path)


def _recipe_template() -> str | None:
    for candidate in (
        Path(__file__).resolve().parents[1] / "shared" / "R1_RECIPE.md",
        Path("/work/shared/R1_RECIPE.md"),
    ):
        if candidate.is_file():
            text = candidate.read_text()
            block = re.search(r"Prompt template.*?\n\n((?: {4}.*\n)+)", text)
            if block:
                return " ".join(line.strip() for line in block.group(1).splitlines())
    return None


def test_r1_zero_template_is_the_recipe_text():
    recipe = _recipe_template()
    if recipe is None:
        pytest.skip("R1_RECIPE.md not available")
    assert R1_ZERO_TEMPLATE.replace("{prompt}", "prompt") == recipe


def test_templates():
    question = "What is 2+2?"
    assert r1_zero_prompt(question).endswith(f"User: {question}. Assistant:")
    assert r1_zero_prompt(question) == R1_ZERO_TEMPLATE.replace("{prompt}", question)
    assert render_prompt("r1-zero", question) == r1_zero_prompt(question)
    assert render_prompt("r1-chat", question) == f"{USER}{question}{ASSISTANT}"
    assert render_prompt("plain", question) == question
    assert set(TEMPLATES) == {"r1-zero", "r1-chat", "plain"}
    with pytest.raises(KeyError, match="plain, r1-chat, r1-zero"):
        render_prompt("chatml", question)
