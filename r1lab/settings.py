"""Every stage's settings, discoverable: `r1lab STAGE --help` and `r1lab config STAGE`.

A setting's one-line description is its pydantic `description`, else the `# comment` that
follows it in the config class source (the stage modules document their fields that way),
found in the class that declares the field or in one of its bases.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_jsonable_python

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def _source_comments(cls: type) -> dict[str, str]:
    """{field: its trailing comment} from the class bodies of `cls` and its bases."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass is BaseModel:
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = _FIELD_LINE.match(line)
            if m and m.group(2) and m.group(1) in klass.__annotations__:
                found[m.group(1)] = m.group(2).strip()
    return found


def type_name(annotation: Any) -> str:
    if annotation is None or annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a checked type (e.g. TemplateName) shows as its base type
        return type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(arg) for arg in typing.get_args(annotation))
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = repr(annotation).replace("typing.", "")
    return re.sub(r"\b(?:\w+\.)+(\w+)", r"\1", text)


def default_of(field) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.default is PydanticUndefined else field.default


def settings_rows(cls: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) of every field, in declaration order."""
    comments = _source_comments(cls)
    rows = []
    for name, field in cls.model_fields.items():
        if field.is_required():
            default = "(required)"
        else:
            value = default_of(field)
            value = to_jsonable_python(value, fallback=str)
            default = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
            default = default.removesuffix("\n...").removesuffix(" ...").strip()
        description = field.description or comments.get(name) or FALLBACK.get(name, "")
        rows.append((name, type_name(field.annotation), default, description))
    return rows


def settings_help(cls: type[BaseModel]) -> str:
    """The settings block of `r1lab STAGE --help`: one line (or two) per field."""
    rows = settings_rows(cls)
    width = max(len(n) for n, *_ in rows)
    out = ["settings (key=value on the command line, or a YAML file passed as --preset):"]
    for name, kind, default, description in rows:
        out.append(f"  {name:<{width}}  {kind} = {default}")
        if description:
            out.append(f"  {'':<{width}}    {description}")
    out.append("")
    out.append("`r1lab config STAGE [--preset P] [key=value ...]` prints the resolved settings.")
    return "\n".join(out)


def config_yaml(cfg: BaseModel, missing: set[str] = frozenset(), name: str | None = None) -> str:
    """`cfg` as YAML, each field under a comment with its type and description, headed by
    `name` (default: the name of the module that defines the config)."""
    comments = _source_comments(type(cfg))
    data = {n: to_jsonable_python(getattr(cfg, n), fallback=str) for n in type(cfg).model_fields}
    parts = [f"# {name or type(cfg).__module__.rsplit('.', 1)[-1]} settings\n"]
    for name, field in type(cfg).model_fields.items():
        note = field.description or comments.get(name) or FALLBACK.get(name, "")
        required = " (required: fill it in)" if name in missing else ""
        head = f"# {type_name(field.annotation)}{required}" + (f": {note}" if note else "")
        parts.append(head + "\n" + yaml.safe_dump({name: data[name]}, sort_keys=False))
    return "".join(parts)


def resolved_config(cls: type[BaseModel], stage: str, preset: str | None, overrides: list[str]):
    """(config, names of required fields left empty) for `r1lab config`."""
    from r1lab.config import load_stage_config

    given = {item.split("=", 1)[0].split(".", 1)[0] for item in overrides if "=" in item}
    missing = {n for n, f in cls.model_fields.items() if f.is_required() and n not in given}
    if preset:
        from r1lab.config import load_preset

        section = load_preset(preset).get(stage) or {}
        missing -= set(section)
    fill = [f"{n}=" for n in sorted(missing) if cls.model_fields[n].annotation is str]
    return load_stage_config(cls, stage, preset, [*fill, *overrides]), missing


# One-line descriptions of fields whose class source carries no comment (the shared names
# mean the same in every stage that has them).
FALLBACK: dict[str, str] = {
    "loggers": "mirror metrics.jsonl to: tensorboard, wandb (optional packages)",
    "lora": "LoRA adapters {r, alpha, targets, dropout}; null trains every weight",
    "seed": "random seed (data order, sampling, initialisation)",
    "families": "procedural task families the built-in data draws from",
    "levels": "difficulty levels of the procedural tasks",
    "init_from": "start from this model folder / hub id instead of random weights",
    "n_documents": "documents in the generated pretraining corpus",
    "corpus_options": "knobs of the procedural corpus generator",
    "size": "model size name (config_for_size), e.g. micro, tiny, small",
    "model_overrides": "ModelConfig fields that replace the size's defaults",
    "init_std": "standard deviation of the random initial weights",
    "lr": "peak learning rate (AdamW)",
    "warmup_steps": "linear warmup steps before the schedule",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas",
    "max_steps": "optimizer steps (a cap on the run)",
    "max_nan_steps": "stop after this many NaN/inf steps in a row",
    "log_every": "steps between metrics.jsonl records",
    "eval_every": "steps between evaluations",
    "save_every": "steps between checkpoints (resume points)",
    "data": "sources: built-in generators, .jsonl/.json/.parquet files or hub dataset ids",
    "seq_len": "tokens per packed training row",
    "epochs": "passes over the data",
    "grad_clip": "gradient norm clip (0 = off)",
    "gradient_checkpointing": "recompute activations in the backward pass to save memory",
    "tasks": "training tasks: names or {name, weight, path, ...} mappings",
    "template": "prompt template: r1-zero, r1-chat or plain",
    "rewards": "reward name (or file.py:fn / module:fn) -> weight or {weight, options}",
    "group_size": "completions sampled per question (G in GRPO)",
    "questions_per_step": "questions per rollout batch",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling threshold",
    "max_new_tokens": "cap on generated tokens per completion",
    "dynamic_sampling": "DAPO: resample groups whose rewards are all equal",
    "max_resample": "DAPO: resampling rounds per step at most",
    "mask_truncated": "leave completions cut at max_new_tokens out of the loss",
    "overlong_penalty": "DAPO: size of the soft overlong penalty",
    "reward_model": "a reward model run dir added to the rule rewards",
    "reward_model_weight": "weight of the reward model's score",
    "reward_model_on": "what the reward model reads: the summary or the whole response",
    "reward_model_last_steps": "use the reward model only in the last N steps (None = all)",
    "steps": "GRPO steps (rollout + update)",
    "lr_schedule": "learning-rate schedule after warmup",
    "eps_low": "PPO clip range below 1",
    "eps_high": "PPO clip range above 1 (None = eps_low; DAPO clip-higher)",
    "ratio_level": "importance ratio per token or per sequence (GSPO)",
    "aggregation": "how token losses are averaged (GRPO, DAPO token-mean, Dr. GRPO)",
    "norm_length": "constant length for seq-mean-token-sum-norm (None = max_new_tokens)",
    "adv_scale": "advantage divided by the group's, the batch's or no std",
    "adv_baseline": "advantage baseline: group mean or leave-one-out",
    "eval_n": "questions in each evaluation",
    "eval_k": "samples per evaluation question",
    "eval_task": "evaluation task (default: the training tasks' held-out split)",
    "eval_template": "evaluation prompt template (None = template)",
    "eval_temperature": "evaluation sampling temperature",
    "eval_top_p": "evaluation nucleus threshold",
    "eval_max_new_tokens": "evaluation generation cap (None = max_new_tokens)",
    "log_samples": "completions written to samples.jsonl per step",
    "max_minutes": "wall-clock budget of the stage",
    "split": "dataset split evaluated",
    "k": "samples per question (pass@1 averages them, cons@k votes)",
    "greedy": "one greedy sample per question instead of k samples",
    "max_batch_size": "sequences decoded at once",
    "samples_per_question": "completions sampled per question",
    "max_per_question": "accepted responses kept per question at most",
    "filters": "readability and correctness filters applied",
    "deduplicate": "drop repeated responses to the same question",
    "max_paragraph_chars": "readability: longest paragraph allowed",
    "min_language_consistency": "readability: least share of words in the question's language",
    "write_rejected": "also write the rejected samples",
    "n_pairs": "preference pairs built",
    "judge": "what the reward model scores: the summary or the whole response",
    "heldout_fraction": "share of pairs held out for accuracy",
    "batch_size": "rows (or pairs) per optimizer step",
    "max_length": "tokens per sequence at most",
}
