"""ModelConfig: the decoder's shape, read from and written to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

# model_type -> the transformers class that opens our saved folders.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelConfig:
    """Every field the decoder needs; names follow Hugging Face's `config.json`."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # unknown config.json keys, written back as read

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        # These follow from the architecture, as they do in transformers.
        if self.model_type == "qwen2":
            self.attention_bias = True
        self.qk_norm = self.model_type == "qwen3"
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; set head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        rope_type = self.rope_type
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope_scaling type {rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    # ---- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        """Read a transformers config dict (v4 or v5 style rope keys)."""
        model_type = raw.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"{source}: unsupported model_type {model_type!r}; supported: "
                f"{', '.join(ARCHITECTURES)}"
            )
        if raw.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention is not supported")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "qk_norm"}
        kwargs = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        # transformers v5 keeps rope settings in `rope_parameters`.
        rope_params = raw.get("rope_parameters")
        if isinstance(rope_params, dict):
            kwargs.setdefault("rope_theta", rope_params.get("rope_theta", 10000.0))
            if rope_params.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        kwargs["extra"] = {k: v for k, v in raw.items() if k not in names}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    def to_hf_dict(self) -> dict:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name in ("extra", "qk_norm"):
                continue
            out[f.name] = getattr(self, f.name)
        out["model_type"] = self.model_type
        out["architectures"] = [ARCHITECTURES[self.model_type]]
        if self.model_type == "qwen2":
            out.pop("attention_bias", None)  # implied by the architecture
            out.setdefault("use_sliding_window", False)
        out["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_scaling:
            out["rope_parameters"].update(
                {k: v for k, v in self.rope_scaling.items() if k not in ("type",)}
            )
        out.setdefault("hidden_act", "silu")
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return cls.from_hf_dict(raw, source=str(path))

    def num_parameters(self) -> int:
        d, hd = self.hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        attn += 2 * hd if self.qk_norm else 0
        mlp = 3 * d * self.intermediate_size
        layer = attn + mlp + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + d


# Named shapes for models trained from scratch. The vocabulary comes from the tokenizer.
# One row per size, one column per ModelConfig field in SIZE_FIELDS.
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
)
_SIZE_ROWS = {
    #               hidden   MLP  layers heads kv  context
    # A few thousand parameters: unit tests and the CI micro pipeline.
    "micro":        (32,     64,  2,     4,    2,  256),
    # ~0.8M parameters: learns 2-digit arithmetic in minutes on a 2-core CPU.
    "tiny":         (128,   384,  4,     4,    2,  256),
    # ~0.3M parameters: the smaller student of the tiny distillation run.
    "tiny-student": (96,    256,  2,     4,    2,  256),
    # ~10M parameters: a few minutes on one GPU.
    "small":        (384,  1024,  6,     6,    2, 1024),
    # ~110M parameters (+ embeddings): a one-GPU speedrun size.
    "base":         (768,  2048, 12,    12,    4, 2048),
}  # fmt: skip
SIZES: dict[str, dict] = {name: dict(zip(SIZE_FIELDS, row)) for name, row in _SIZE_ROWS.items()}


def config_for_size(size: str, vocab_size: int, **overrides) -> ModelConfig:
    """A from-scratch config by name; an unknown name lists the known ones."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(SIZES)}")
    return ModelConfig(vocab_size=vocab_size, **{**SIZES[size], **overrides})
