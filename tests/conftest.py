"""Shared fixtures: the read-only data folder, tiny model configs and randomised models."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from r1lab.model.config import ModelConfig
from r1lab.model.transformer import Transformer

REPO_ROOT = Path(__file__).resolve().parents[1]


def save_random_micro_model(
    folder: Path,
    n_documents: int = 400,
    vocab_size: int = 512,
    *,
    texts: list[str] | None = None,
    size: str = "micro",
    **overrides,
) -> Path:
    """A seeded random model of a named size (micro by default) with a small BPE tokenizer,
    saved to `folder`. The tokenizer learns `texts`, by default `n_documents` of chain-sum
    pretraining text; `overrides` go to the model config."""
    from r1lab.model.checkpoint import save_model
    from r1lab.model.config import config_for_size
    from r1lab.model.tokenizer import train_tokenizer
    from r1lab.tasks.corpus import pretrain_documents

    if texts is None:
        texts = pretrain_documents("chain_sum", n=n_documents, seed=0)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    cfg = config_for_size(
        size,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    torch.manual_seed(0)
    save_model(Transformer(cfg), folder, tokenizer=tokenizer)
    return folder


# Small enough for milliseconds per forward, big enough for GQA (4 query heads, 2 kv heads).
TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared data folder (R1LAB_DATA, else <repo>/../shared/data); skips when absent."""
    path = Path(os.environ.get("R1LAB_DATA") or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        pytest.skip(f"shared data folder not found: {path}")
    return path


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Random weights everywhere, norms and biases included, so no parameter hides a bug.

    A default init leaves norm weights at 1 and biases at 0, where a missing or swapped
    tensor would go unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(std * noise)
    return model


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    """Factory: `tiny_config(model_type="qwen3", tie_word_embeddings=False, ...)`."""

    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**TINY, **overrides})

    return make


@pytest.fixture
def random_model(tiny_config) -> Callable[..., Transformer]:
    """Factory: a tiny fp32 `Transformer` with randomised weights; kwargs go to the config."""

    def make(seed: int = 0, **overrides) -> Transformer:
        return randomize_(Transformer(tiny_config(**overrides)), seed=seed).eval()

    return make


@pytest.fixture(scope="session")
def randomize() -> Callable[..., nn.Module]:
    """`randomize(model, seed=0)`: randomise any module's weights in place (ours or HF's)."""
    return randomize_


# A user reward module, as a researcher writes one (the module:function form).
REWARDS_MODULE = '''
def spread(prompts, completions, **columns):
    """Varies with the completion, so groups have a spread and the update has a gradient."""
    return [(len(c) % 5) / 4 for c in completions]

def constant(prompts, completions, **columns):
    return [1.0] * len(completions)

def never(prompts, completions, **columns):
    return [None] * len(completions)
'''


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    """A random micro model with a small BPE tokenizer, saved as a model folder."""
    return save_random_micro_model(tmp_path_factory.mktemp("micro") / "model")


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """`testrewards:<fn>` names a user reward function (the module:function form)."""
    (tmp_path / "testrewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "testrewards"
