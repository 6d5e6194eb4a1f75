"""LoRA adapters on the decoder's linear layers (Hu et al., 2021).

A targeted `nn.Linear` (by its last name: q_proj, k_proj, v_proj, o_proj, gate_proj,
up_proj, down_proj) becomes a `LoraLinear`: the same frozen `weight` (and bias), plus
`lora_A` (r x in, small random) and `lora_B` (out x r, zeros), so the adapted layer is
`W x + (alpha / r) B A dropout(x)` and starts equal to the base. Only the adapters train.

Saving: a model folder holds the merged weights `W + (alpha / r) B A` under the usual
names (`save_model` merges, so the folder is a plain Hugging Face checkpoint), and
`write_adapter` writes the adapters alone in PEFT's layout (adapter_config.json and
adapter_model.safetensors with `base_model.model.<module>.lora_A.weight` keys).

Views (what GRPO needs besides the policy, without a second copy of the weights): both
are modules whose every tensor other than the adapted layers' is the policy's own.
`reference_view` is the base with the adapters off, and after a `load_state_dict` of the
policy's state the base plus a frozen snapshot of the adapters (a refreshed reference);
`merged_view` holds `W + (alpha / r) B A` as plain linear layers, for the samplers, which
read weights directly; `refresh_merged` recomputes it after the adapters moved.
"""

from __future__ import annotations

import copy
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
        self.active = True  # False: the layer is its base (a reference view before a refresh)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.active:
            return out
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


# ---- the adapters as a checkpoint part, and views sharing the base ---------------------------
ADAPTER_SUFFIXES = (".lora_A", ".lora_B")


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of `model` by state-dict name (the tensors themselves, detached)."""
    out = {}
    for name, module in lora_modules(model).items():
        out[f"{name}.lora_A"] = module.lora_A.detach()
        out[f"{name}.lora_B"] = module.lora_B.detach()
    return out


@torch.no_grad()
def load_adapters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapters into `model` from a state dict holding at least every adapter of it
    (other keys, such as the base weights of a whole state dict, are ignored)."""
    mine = adapter_state(model)
    missing = sorted(k for k in mine if k not in state)
    if missing:
        raise KeyError(f"load_adapters: the state has no {', '.join(missing[:3])} ...")
    for key, tensor in mine.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"load_adapters: {key} is {tuple(state[key].shape)} in the state, "
                f"{tuple(tensor.shape)} in the model (another rank or targets?)"
            )
        tensor.copy_(state[key])


class AdapterState:
    """A LoRA model's trained state, its adapters, as a checkpoint part (`state_dict` and
    `load_state_dict` over lora_A / lora_B only; the frozen base is the model folder's)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_adapters(self.model, state)


def _shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules whose tensors, the adapters excepted, are `model`'s own."""
    named = [*model.named_parameters(), *model.named_buffers()]
    memo: dict[int, object] = {id(t): t for n, t in named if not n.endswith(ADAPTER_SUFFIXES)}
    if hasattr(model, "config"):
        memo[id(model.config)] = model.config  # one config: the compiled-layer cache keys on it
    return copy.deepcopy(model, memo)


class _ReferenceState:
    """Mixed into a reference view's class: its own state is its adapter snapshot (the base
    tensors are the policy's), and loading one switches the adapters on."""

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        return {k: v for k, v in state.items() if k.endswith(ADAPTER_SUFFIXES)}

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        load_adapters(self, state)
        for module in lora_modules(self).values():
            module.active = True


_REFERENCE_CLASSES: dict[type, type] = {}


def reference_view(model: nn.Module) -> nn.Module:
    """The frozen base of a LoRA model, for the KL term, without a second copy of the weights.

    Every tensor but the adapters is `model`'s own (same storage). The view's adapters are
    frozen and off, so it computes the base model exactly; `load_state_dict` of the policy's
    state (a reference refresh) or of a saved view copies the adapters in and turns them on:
    the reference is then the policy of that moment, still at the cost of the adapters.
    `state_dict` holds the adapters only.
    """
    if not lora_modules(model):
        raise ValueError("reference_view: the model has no LoRA adapters")
    view = _shared_copy(model)
    for module in lora_modules(view).values():
        module.active = False
        module.lora_A.requires_grad_(False)
        module.lora_B.requires_grad_(False)
    cls = type(view)
    if cls not in _REFERENCE_CLASSES:
        _REFERENCE_CLASSES[cls] = type(f"Reference{cls.__name__}", (_ReferenceState, cls), {})
    view.__class__ = _REFERENCE_CLASSES[cls]
    return view.eval()


def merged_view(model: nn.Module) -> nn.Module:
    """A plain model for the samplers: `W + (alpha / r) B A` in place of each LoRA layer.

    Embeddings, norms, the LM head and every layer without adapters are `model`'s own
    tensors; only the adapted layers' merged weights are new, in the base's dtype. The
    samplers read weights directly, so they see the adapted model through this view;
    call `refresh_merged` after the adapters change.
    """
    adapted = lora_modules(model)
    if not adapted:
        raise ValueError("merged_view: the model has no LoRA adapters")
    view = _shared_copy(model)
    for name, lora in lora_modules(view).items():
        parent = view.get_submodule(name.rpartition(".")[0]) if "." in name else view
        plain = nn.Linear(lora.in_features, lora.out_features, bias=False, device="meta")
        plain.weight = nn.Parameter(torch.empty_like(lora.weight), requires_grad=False)
        plain.bias = lora.bias  # shared (frozen)
        setattr(parent, name.rpartition(".")[2], plain)
    view.__dict__.pop("lora_settings", None)
    refresh_merged(view, model)
    return view.eval()


@torch.no_grad()
def refresh_merged(view: nn.Module, model: nn.Module) -> None:
    """Recompute the merged weights of `view` from `model`'s current adapters: merged in
    fp32, rounded once to the view's dtype (as `merged_state` saves them)."""
    for name, lora in lora_modules(model).items():
        view.get_submodule(name).weight.copy_(lora.weight.float() + lora.delta())
