"""The data of the supervised stages: procedural settings and prompt/response sources.

A source is a built-in generator, a dataset file or a Hugging Face dataset; every row is
checked, and a bad one is named by file, line and field. Batches are built from the rows in
`r1lab.stages.packing`, the loss in `r1lab.stages.lm_loss`, the loop in
`r1lab.stages.supervised`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from r1lab.config import StageConfig
from r1lab.rows import DataError, check_messages, read_hub_rows, read_rows

BUILTIN_SOURCES = ("cold-start", "non-reasoning")
# TRL's prompt-completion rows call the response `completion`: read as another name for it.
RESPONSE_ALIAS = "completion"
ROW_SHAPES = (
    "a row is {prompt, response} (or {prompt, completion}) or {messages: [{role, content}, ...]}"
)


class ProceduralConfig(StageConfig):
    """Settings of the stages that draw on the built-in procedural families."""

    families: list[str] = Field(default_factory=lambda: ["chain_sum"], min_length=1)
    levels: list[int] = Field(default_factory=lambda: [1], min_length=1)
    zh_fraction: float = Field(default=0.3, ge=0, le=1)  # share of questions posed in Chinese

    @field_validator("families", "levels", mode="before")
    @classmethod
    def _one_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) else value

    @field_validator("families")
    @classmethod
    def _known_families(cls, value: list[str]) -> list[str]:
        from r1lab.tasks.procedural import FAMILY_NAMES

        unknown = [f for f in value if f not in FAMILY_NAMES]
        if unknown:
            raise ValueError(f"unknown families {unknown}; known: {', '.join(FAMILY_NAMES)}")
        return value

    @field_validator("levels")
    @classmethod
    def _known_levels(cls, value: list[int]) -> list[int]:
        from r1lab.tasks.procedural import LEVELS

        if any(level not in LEVELS for level in value):
            raise ValueError(f"levels must be among {list(LEVELS)}, got {value}")
        return value


# ---- prompt/response sources -------------------------------------------------------------
def check_row(row: Any, where: str) -> dict:
    """One prompt/response example (TRL's `completion` is read as `response`), or a
    DataError that says where and what is wrong."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object with 'prompt' and 'response' (or 'messages'), "
            f"got {type(row).__name__}"
        )
    if "messages" in row and "prompt" not in row:
        return {"messages": check_messages(row["messages"], where)}
    response = response_field(row, where)
    for name in ("prompt", response):
        if name not in row:
            raise DataError(f"{where}: missing field {name!r} ({ROW_SHAPES})")
        if not isinstance(row[name], str):
            hint = " (a conversational prompt/completion pair is one messages row)"
            raise DataError(
                f"{where}: field {name!r} must be a string, got {type(row[name]).__name__}"
                + (hint if isinstance(row[name], list) else "")
            )
    if not row[response].strip():
        raise DataError(f"{where}: field {response!r} is empty")
    return {"prompt": row["prompt"], "response": row[response]}


def response_field(row: dict, where: str) -> str:
    """The field that holds a row's response: `response`, else `completion` (TRL's name
    for it). A row with both is an error unless they hold the same value."""
    if RESPONSE_ALIAS not in row:
        return "response"
    if "response" not in row:
        return RESPONSE_ALIAS
    if row["response"] != row[RESPONSE_ALIAS]:
        raise DataError(
            f"{where}: fields 'response' and '{RESPONSE_ALIAS}' differ; '{RESPONSE_ALIAS}' is "
            "another name for 'response', so give one of them"
        )
    return "response"


def read_examples(path: str | Path) -> list[dict]:
    """Prompt/response examples from a .jsonl / .json / .parquet file (`r1lab.rows`)."""
    path = Path(path)
    if not path.is_file():
        hint = " (a folder; pass the .jsonl file inside it)" if path.is_dir() else ""
        raise FileNotFoundError(f"SFT data file not found: {path}{hint}")
    return [check_row(row, where) for where, row in read_rows(path)]


def read_hf_dataset(spec: str) -> list[dict]:
    """Prompt/response examples from a Hugging Face dataset `org/name` or `org/name:split`."""
    name, _, split = spec.partition(":")
    rows = read_hub_rows(name, split=split or "train", needed_by=f"SFT data {spec!r}")
    return [check_row(row, where) for where, row in rows]


def builtin_examples(
    name: str,
    tokenizer,
    *,
    families: Sequence[str],
    levels: Sequence[int],
    n: int,
    zh_fraction: float,
    seed: int,
) -> list[dict]:
    """Generated procedural examples; prompts use the tokenizer's own chat format."""
    from r1lab.tasks import corpus

    make = {
        "cold-start": corpus.cold_start_examples,
        "non-reasoning": corpus.non_reasoning_examples,
    }[name]
    rows = make(
        list(families), n, seed, levels=list(levels), zh_fraction=zh_fraction, tokenizer=tokenizer
    )
    return [{"prompt": r["prompt"], "response": r["response"]} for r in rows]


def load_source(spec: str, tokenizer, **builtin_options) -> list[dict]:
    """A built-in generator name, a .jsonl path, or a Hugging Face dataset id."""
    if spec in BUILTIN_SOURCES:
        return builtin_examples(spec, tokenizer, **builtin_options)
    path = Path(spec)
    if path.suffix in (".jsonl", ".json") or path.exists():
        return read_examples(path)
    if "/" in spec:
        return read_hf_dataset(spec)
    raise DataError(
        f"unknown SFT data source {spec!r}: expected a .jsonl file, a Hugging Face dataset id "
        f"(org/name or org/name:split) or a built-in: {', '.join(BUILTIN_SOURCES)}"
    )


def mix_sources(
    sources: list[list[dict]], weights: Sequence[float] | None, seed: int
) -> list[dict]:
    """One shuffled list of examples from several sources.

    Without weights every example is used once. With weights the mixture keeps the total
    size, and source i makes up `w_i / sum(w)` of it: a small source is repeated, a large
    one subsampled (each without repeats before it cycles).
    """
    rng = random.Random(f"{seed}:mix")
    if weights is None:
        mixed = [row for rows in sources for row in rows]
    else:
        total, norm = sum(len(rows) for rows in sources), sum(weights)
        mixed = []
        for rows, weight in zip(sources, weights):
            k = round(total * weight / norm)
            order = list(range(len(rows)))
            rng.shuffle(order)
            mixed += [rows[order[i % len(rows)]] for i in range(k)]
    rng.shuffle(mixed)
    return mixed
