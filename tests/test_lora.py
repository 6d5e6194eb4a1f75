"""LoRA: only adapters train, the saved model is base + (alpha/r) B A, adapters in PEFT layout."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from r1lab.model.checkpoint import load_model, save_model
from r1lab.model.lora import LoraSettings, apply_lora, lora_modules, write_adapter
from r1lab.training import make_optimizer


def test_a_step_changes_only_adapter_weights(random_model):
    model = random_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoraSettings(r=4, alpha=8))
    assert len(names) == 7 * model.config.num_hidden_layers
    optimizer = make_optimizer(model, lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    for _ in range(2):  # B starts at zero, so A moves from the second step on
        logits = model(ids)
        logits = logits.logits if hasattr(logits, "logits") else logits
        logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    changed = [k for k in after if k.endswith(("lora_A", "lora_B")) and k not in before]
    assert changed and all(after[k].abs().sum() > 0 for k in changed if k.endswith("lora_B"))


def test_the_saved_model_is_base_plus_scaled_ba(random_model, tmp_path):
    model = random_model()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraSettings(r=2, alpha=6, targets=["q_proj", "down_proj"]))
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B, std=0.1)
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        adapted = model(ids)
    save_model(model, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    for name, module in lora_modules(model).items():
        expected = base[f"{name}.weight"] + 3.0 * module.lora_B @ module.lora_A
        assert torch.allclose(merged.state_dict()[f"{name}.weight"], expected, atol=1e-6)
    for key, value in merged.state_dict().items():
        if not key.endswith(("q_proj.weight", "down_proj.weight")):
            assert torch.equal(value, base[key]), key
    with torch.no_grad():
        again = merged(ids)
    get = lambda o: o.logits if hasattr(o, "logits") else o  # noqa: E731
    assert torch.allclose(get(adapted), get(again), atol=1e-5)


def test_adapters_are_saved_in_peft_layout(random_model, tmp_path):
    model = random_model()
    apply_lora(model, LoraSettings(r=4, alpha=16, targets=["q_proj", "v_proj"]))
    folder = write_adapter(model, tmp_path / "adapter", base_model="org/base")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["q_proj", "v_proj"]
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, model.config.hidden_size)
    assert len(tensors) == 2 * 2 * model.config.num_hidden_layers


def test_bad_targets_are_named(random_model):
    with pytest.raises(ValueError, match="lora targets \\['lm_head'\\]"):
        apply_lora(random_model(), LoraSettings(targets=["lm_head"]))


def test_sft_with_lora_saves_merged_model_and_adapter(tmp_path, monkeypatch):
    from r1lab.stages import sft
    from tests.test_loggers import _micro

    monkeypatch.setenv("R1LAB_NO_PROGRESS", "1")
    _micro(tmp_path / "base")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "response": f"{i + 1}"}) + "\n" for i in range(16))
    )
    cfg = sft.Config(
        model=str(tmp_path / "base"),
        data=[str(data)],
        batch_size=4,
        max_steps=3,
        val_examples=0,
        warmup_steps=0,
        lr=1e-2,
        lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
    )
    sft.run(cfg, tmp_path / "run")
    base, tuned = load_model(tmp_path / "base"), load_model(tmp_path / "run" / "model")
    b, t = base.state_dict(), tuned.state_dict()
    moved = sorted(k for k in b if not torch.equal(b[k], t[k]))
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_peft_reads_the_saved_adapter_and_gives_the_same_logits(random_model, tmp_path):
    """The adapter/ folder is a real PEFT adapter: PEFT loads it onto the base in
    transformers and computes the adapted model's logits."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = random_model()
    save_model(model, tmp_path / "base")
    apply_lora(model, LoraSettings(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    for module in lora_modules(model).values():
        with torch.no_grad():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
    write_adapter(model, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        ours = model(ids)
        theirs = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits
    ours = ours.logits if hasattr(ours, "logits") else ours
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (theirs - base_logits).abs().max() > 1e-3  # the adapter was applied, not ignored
