"""LoRA adapters on the decoder's linear layers (Hu et al., 2021).

A targeted `nn.Linear` (by its last name: q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj) becomes a `LoraLinear`: the same frozen `weight` (and bias), plus
`lora_A` (r x in, small random) and `lora_B` (out x r, zeros), so the adapted layer is
`W x + (alpha / r) B A dropout(x)` and starts equal to the base. Only the adapters train.

Saving: a model folder holds the merged weights `W + (alpha / r) B A` under the usual
names (`save_model` merges, so the folder is a plain Hugging Face checkpoint), and
`write_adapter` writes the adapters alone in PEFT's layout (adapter_config.json and
adapter_model.safetensors with `base_model.model.<module>.lora_A.weight` keys).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraSettings(BaseModel):
    """The `lora` config section: rank, scale, target modules, dropout."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1)  # rank of the adapters
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / r
    targets: list[str] = Field(default_factory=lambda: list(DECODER_LINEARS), min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)  # on the adapters' input


class LoraLinear(nn.Linear):
    """An nn.Linear with a frozen weight and a trainable low-rank update."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear's: the weight is the base's own
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return out + F.linear(F.linear(self.dropout(x), a), b) * self.scale

    def delta(self) -> torch.Tensor:
        """The update to the weight: (alpha / r) B A, in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale


def apply_lora(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Swap the targeted linear layers for LoraLinear and freeze everything else; returns
    the adapted module names. Embeddings and the LM head are never targeted."""
    allowed = set(DECODER_LINEARS)
    wrong = [t for t in settings.targets if t not in allowed]
    if wrong:
        raise ValueError(f"lora targets {wrong}: choose among {', '.join(DECODER_LINEARS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in settings.targets and type(module) is nn.Linear:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            lora = LoraLinear(module, settings.r, settings.alpha, settings.dropout)
            setattr(parent, leaf, lora)
            names.append(name)
    if not names:
        raise ValueError(f"lora: no linear layer named {settings.targets} in the model")
    model.lora_settings = settings
    return names


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def merged_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the model's state dict) with each adapted weight merged and the adapter
    tensors dropped: what a plain checkpoint of the adapted model holds."""
    adapted = lora_modules(model)
    if not adapted:
        return state
    state = dict(state)
    for name, module in adapted.items():
        weight = state[f"{name}.weight"]
        merged = weight.float() + module.delta().to(weight.device)
        state[f"{name}.weight"] = merged.to(weight.dtype)
        state.pop(f"{name}.lora_A", None)
        state.pop(f"{name}.lora_B", None)
    return state


def write_adapter(model: nn.Module, folder: str | Path, base_model: str = "") -> Path:
    """The adapters alone, as PEFT saves them (`PeftModel.from_pretrained` reads them).

    Writes into `folder` as it is; a caller that needs the folder whole or absent wraps
    this in `checkpoint.atomic_dir` (this module stays below the checkpoint module).
    """
    from safetensors.torch import save_file

    adapted = lora_modules(model)
    if not adapted:
        raise ValueError("write_adapter: the model has no LoRA adapters")
    settings: LoraSettings = model.lora_settings
    tensors = {}
    for name, module in adapted.items():
        key = f"base_model.model.{name}"
        tensors[f"{key}.lora_A.weight"] = module.lora_A.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = module.lora_B.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted({n.rpartition(".")[2] for n in adapted}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder
