"""Checkpoint folders: clear errors, atomic replacement, training-state resume."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import r1lab.model.checkpoint as ckpt
from r1lab.model.checkpoint import (
    atomic_dir,
    atomic_torch_save,
    atomic_write_text,
    latest_checkpoint,
    load_model,
    load_training_state,
    resolve_dir,
    save_model,
    save_training_state,
)
from r1lab.model.transformer import Transformer

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path, random_model):
    """(model, folder) for an untied tiny llama saved by r1lab."""
    model = random_model(tie_word_embeddings=False)
    return model, save_model(model, tmp_path / "model")


def same_weights(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def hidden_entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith("."))


# ---- saving and loading ----------------------------------------------------------------
def test_round_trip_writes_hf_layout(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    config = json.loads((folder / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((folder / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    loaded = load_model(folder)
    assert same_weights(model, loaded)
    assert dataclasses.replace(loaded.config, extra={}) == model.config
    assert hidden_entries(folder) == []


def test_tied_head_is_not_written_and_is_retied(tmp_path, random_model):
    model = random_model(tie_word_embeddings=True)
    save_model(model, tmp_path / "m")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert same_weights(model, loaded)
    assert all(p.requires_grad and p.is_leaf for p in loaded.parameters())


def test_broken_tie_is_refused(tmp_path, random_model):
    model = random_model(tie_word_embeddings=True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        save_model(model, tmp_path / "m")


def test_dtypes(tmp_path, random_model):
    model = random_model()
    save_model(model, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    auto = load_model(tmp_path / "bf16")
    assert auto.dtype == torch.bfloat16 and auto.inv_freq.dtype == torch.float32
    assert load_model(tmp_path / "bf16", dtype="float32").dtype == torch.float32
    assert load_model(tmp_path / "bf16", dtype=torch.float16).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        load_model(tmp_path / "bf16", dtype="int3")


def test_tokenizer_is_saved_alongside(tmp_path, random_model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "<unk>": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>")
    save_model(random_model(), tmp_path / "m", tokenizer=tok)
    again = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert again("hello world")["input_ids"] == [3, 4]


def test_the_api_saves_a_folder_load_model_reads(tmp_path, random_model):
    import r1lab

    model = random_model(model_type="qwen3")
    r1lab.save(model, tmp_path / "m")
    assert same_weights(model, load_model(tmp_path / "m"))


# ---- clear errors ----------------------------------------------------------------------
def test_missing_config(saved):
    _, folder = saved
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(folder)


def test_unsupported_model_type_lists_supported(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2'.*llama, qwen2, qwen3"):
        load_model(folder)


def test_missing_local_folder_never_goes_online(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        load_model("./org/name")


def test_hub_id_downloads_a_snapshot(saved, monkeypatch):
    _, folder = saved
    calls = []

    def fake(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    load_model("someorg/tiny-model")
    assert calls[0][0] == "someorg/tiny-model"
    assert not any("bin" in p for p in calls[0][1]["allow_patterns"])


def test_hub_failure_is_explained(monkeypatch):
    def fail(repo_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fail)
    with pytest.raises(OSError, match="'someorg/tiny-model' is not a local folder.*no network"):
        load_model("someorg/tiny-model")


def test_missing_shard_is_named(tmp_path, random_model):
    folder = save_model(random_model(), tmp_path / "m", max_shard_bytes=30_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = sorted(set(index["weight_map"].values()))[1]
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {name} listed"):
        load_model(tmp_path / "m")


def test_shape_mismatch_names_tensor_and_shapes(saved):
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError) as err:
        load_model(folder)
    message = str(err.value)
    assert "model.layers.0.mlp.gate_proj.weight: found [96, 64], expected [80, 64]" in message
    assert "model.layers.1.mlp.down_proj.weight: found [64, 96], expected [64, 80]" in message


def rewrite_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _, folder = saved
    rewrite_weights(folder, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(ValueError, match="missing.*model.layers.1.post_attention_layernorm.weight"):
        load_model(folder)


def test_unexpected_tensor_is_named_but_rotary_buffers_are_ignored(saved):
    model, folder = saved
    inv_freq = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_weights(folder, lambda t: t.update({inv_freq: torch.ones(8)}))
    assert same_weights(model, load_model(folder))
    rewrite_weights(folder, lambda t: t.update({"model.layers.0.mlp.up_proj.bias": torch.ones(96)}))
    with pytest.raises(ValueError, match="not used.*model.layers.0.mlp.up_proj.bias"):
        load_model(folder)


def test_pickle_only_folder_is_refused_without_unpickling(saved, monkeypatch):
    model, folder = saved
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called on a downloaded file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ValueError, match="only pytorch_model.bin.*safetensors"):
        load_model(folder)


def test_folder_without_weights(saved):
    _, folder = saved
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(folder)


# ---- atomic replacement ----------------------------------------------------------------
def test_failed_save_keeps_previous_checkpoint(saved, random_model, monkeypatch):
    first, folder = saved
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_model(random_model(seed=1), folder, max_shard_bytes=30_000)
    assert len(calls) == 2
    assert same_weights(first, load_model(folder))
    assert hidden_entries(folder) == []


def test_failed_exchange_keeps_previous_checkpoint(saved, random_model, monkeypatch):
    first, folder = saved

    def exchange(a, b):
        raise OSError(5, "Input/output error", str(b))

    monkeypatch.setattr(ckpt, "_exchange", exchange)
    with pytest.raises(OSError, match="Input/output"):
        save_model(random_model(seed=1), folder)
    monkeypatch.undo()
    assert same_weights(first, load_model(folder))
    assert hidden_entries(folder) == []


def test_failed_rename_puts_previous_checkpoint_back(saved, random_model, monkeypatch):
    """Where names cannot be exchanged: two renames, the first undone if the second fails."""
    first, folder = saved
    real_replace = os.replace
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)

    def replace(src, dst):
        if ".tmp-" in str(src) and str(dst) == str(folder):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_model(random_model(seed=1), folder)
    monkeypatch.undo()
    assert same_weights(first, load_model(folder))
    assert hidden_entries(folder) == []


KILL_SCRIPT = """
import os, shutil, sys, torch
from safetensors.torch import load_file
import r1lab.model.checkpoint as ckpt
from r1lab.model.config import ModelConfig
from r1lab.model.transformer import Transformer

folder, point = sys.argv[1], sys.argv[2]
model = Transformer(ModelConfig.from_file(os.path.join(folder, "config.json")))
weights = load_file(os.path.join(folder, "model.safetensors"))
model.load_state_dict({k: v + 1.0 for k, v in weights.items()})  # the "new" checkpoint
real_replace, real_save, real_exchange = os.replace, ckpt.save_file, ckpt._exchange
real_rmtree = shutil.rmtree
renames = []

def replace(src, dst):  # the two-rename fallback
    renames.append(src)
    if point == "fallback-after-aside" and len(renames) == 2:
        os._exit(17)
    real_replace(src, dst)
    if point == "fallback-after-swap" and len(renames) == 2:
        os._exit(17)

def exchange(a, b):
    if point.startswith("fallback"):
        return False
    if point == "before-swap":
        os._exit(17)
    if not real_exchange(a, b):
        os._exit(18)  # this file system cannot exchange names
    if point == "after-swap":
        os._exit(17)
    return True

def rmtree(path, *args, **kwargs):  # killed half way through deleting the old folder
    if point == "during-cleanup" and os.path.isdir(path) and ".tmp-" in str(path):
        os.remove(os.path.join(path, "model.safetensors"))
        os._exit(17)
    real_rmtree(path, *args, **kwargs)

def save_file(*args, **kwargs):
    real_save(*args, **kwargs)
    os._exit(17)

os.replace, ckpt._exchange, shutil.rmtree = replace, exchange, rmtree
if point == "during-write":
    ckpt.save_file = save_file
ckpt.save_model(model, folder)
"""


# kill point -> the weights a load finds afterwards
KILL_POINTS = {
    "during-write": "old",
    "before-swap": "old",
    "after-swap": "new",
    "during-cleanup": "new",
    "fallback-after-aside": "old",  # no exchange: model/ missing, its aside copy is found
    "fallback-after-swap": "new",
}


def test_killed_save_leaves_a_whole_checkpoint(tmp_path, random_model):
    """A process killed (no cleanup at all) at any point of replacing model/ leaves a whole
    model under model/ (names exchanged in one step); only where the file system cannot
    exchange names is there a moment without it, and loaders then find the aside copy."""
    first = random_model(tie_word_embeddings=False)
    runs = {}
    for point in KILL_POINTS:  # one child per kill point, run side by side
        folder = save_model(first, tmp_path / point / "model")
        runs[point] = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), str(folder), point],
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    no_exchange = []
    for point, survivor in KILL_POINTS.items():
        folder = tmp_path / point / "model"
        _, stderr = runs[point].communicate(timeout=120)
        if runs[point].returncode == 18:
            no_exchange.append(point)
            continue
        assert runs[point].returncode == 17, stderr
        aside = point == "fallback-after-aside"
        assert folder.exists() == (not aside), point
        if not aside:  # what transformers or any reader of model/ sees: a whole folder
            assert (folder / "config.json").exists() and (folder / "model.safetensors").exists()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = load_model(folder)
        assert any("interrupted" in str(w.message) for w in caught) == aside, point
        shift = 0.0 if survivor == "old" else 1.0
        for name, tensor in first.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor + shift), (point, name)

        # The next save restores an aside copy first, then removes every leftover.
        save_model(first, folder)
        assert same_weights(first, load_model(folder))
        assert hidden_entries(folder) == []
    if no_exchange:
        pytest.skip(f"this file system cannot exchange names ({', '.join(no_exchange)})")


def test_atomic_dir_discards_a_failed_block(tmp_path):
    target = tmp_path / "state"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "one"
    assert resolve_dir(target) == target
    assert hidden_entries(target) == []


def test_atomic_files_keep_old_content_on_failure(tmp_path):
    text_file, torch_file = tmp_path / "notes.json", tmp_path / "obj.pt"
    atomic_write_text(text_file, "old")
    atomic_torch_save({"x": torch.ones(2)}, torch_file)
    with pytest.raises(Exception):  # noqa: B017 - any pickling error will do
        atomic_torch_save({"f": lambda: None}, torch_file)
    assert torch.equal(torch.load(torch_file, weights_only=True)["x"], torch.ones(2))
    atomic_write_text(text_file, "new")
    assert text_file.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "obj.pt"]


# ---- training state --------------------------------------------------------------------
def draws() -> tuple:
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def train_steps(model, optimizer, scheduler, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randint(0, 101, (2, 8))).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def make_optimizer(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return optimizer, scheduler


def test_training_state_round_trip(tmp_path, random_model):
    model = random_model().train()
    optimizer, scheduler = make_optimizer(model)
    train_steps(model, optimizer, scheduler, 3)
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    state_dir = tmp_path / "run" / "sft" / "state"
    save_training_state(
        state_dir,
        optimizer=optimizer,
        scheduler=scheduler,
        step=3,
        data_position={"epoch": 0, "index": 48},
        extra={"best_eval": 0.25},
    )
    after_save = draws()
    train_steps(model, optimizer, scheduler, 2)  # moves every generator and the optimizer
    draws()

    fresh_optimizer, fresh_scheduler = make_optimizer(model)
    info = load_training_state(state_dir, fresh_optimizer, fresh_scheduler)
    assert info == {
        "step": 3,
        "data_position": {"epoch": 0, "index": 48},
        "extra": {"best_eval": 0.25},
    }
    assert draws() == after_save
    restored = fresh_optimizer.state_dict()
    assert restored["param_groups"] == saved_optimizer["param_groups"]
    for key, value in saved_optimizer["state"].items():
        for name, tensor in value.items():
            assert torch.equal(restored["state"][key][name], tensor)
    assert fresh_scheduler.last_epoch == 3
    assert fresh_scheduler.get_last_lr() == pytest.approx([1e-3 / 4])
    assert latest_checkpoint(tmp_path / "run" / "sft") == state_dir
    assert latest_checkpoint(tmp_path / "run" / "other") is None


def test_training_state_extra_must_be_json(tmp_path, random_model):
    optimizer, _ = make_optimizer(random_model())
    with pytest.raises(TypeError, match="JSON"):
        save_training_state(
            tmp_path / "s", optimizer=optimizer, step=1, data_position=0, extra={"t": torch.ones(1)}
        )
    assert not (tmp_path / "s").exists()


def test_missing_training_state(tmp_path):
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        load_training_state(tmp_path / "state")
