"""`r1lab rejection-sample`: many responses per question; keep the correct, readable ones.

R1's third stage (R1_RECIPE.md): sample many outputs from the RL checkpoint, keep only
correct ones, drop chains of thought with mixed languages, long paragraphs or code blocks,
and fine-tune on what is left. Distillation data is the same thing with a stronger model
as the teacher: its correct, readable samples.

Each sample goes through a funnel, and the summary counts where it left:

    unjudged -> no_answer -> wrong -> truncated -> structure -> code_block
      -> long_paragraph -> mixed_language -> duplicate -> over_cap -> kept

Correctness is the accuracy reward's (the judgment RL trained on); the readability checks
are `r1lab.stages.readability`; duplicates are responses equal after case and whitespace
normalisation for the same question; at most `max_per_question` are kept per question (the
first in sampling order), so one easy question cannot fill the dataset.

Writes `data.jsonl` (the SFT data: prompt, response, question, answer, meta, provenance),
`rejected.jsonl` (every dropped sample with its reason), `rejection.json` (the counts, per
set and in total) and `DONE` (naming the data file, which the pipeline hands to SFT).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field, field_validator

from r1lab import distributed
from r1lab.api import sampling_options
from r1lab.config import StageConfig, config_dict
from r1lab.engine.generate import SamplingParams
from r1lab.model.tokenizer import TemplateName
from r1lab.rewards.base import prefills_think
from r1lab.rewards.format import STRUCTURES
from r1lab.stages.judging import (
    SampleResult,
    describe_model,
    judged_structure,
    prompt_template,
    sample_and_judge,
    start_sampling_run,
)
from r1lab.stages.readability import (
    DEFAULT_MAX_PARAGRAPH_CHARS,
    DEFAULT_MIN_LANGUAGE_CONSISTENCY,
    FILTERS,
    check_filter_names,
    normalized_text,
    readability_problems,
)
from r1lab.stages.task_spec import TaskList, load_task_examples
from r1lab.tasks.base import Example
from r1lab.training import console, finished_summary, mark_done

DATA_FILE = "data.jsonl"
REJECTED_FILE = "rejected.jsonl"
SUMMARY_FILE = "rejection.json"
# Where a sample can leave the funnel, in order.
FUNNEL = ("unjudged", "no_answer", "wrong", "truncated", *FILTERS, "duplicate", "over_cap")


class Config(StageConfig):
    """Settings of one rejection-sampling run; defaults are the tiny CPU settings."""

    model: str  # model folder, hub id or stage run dir (the RL checkpoint, or a teacher)
    tasks: TaskList = Field(default_factory=lambda: [{"name": "chain_sum"}])
    n: int | None = 200  # questions per task when its spec has no "n" (None = all)
    split: str = "train"  # training questions: the held-out ones stay unseen
    samples_per_question: int = Field(default=8, ge=1)
    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=128, ge=1)
    template: TemplateName = "r1-chat"  # r1-zero | r1-chat | plain | chat | r1-distill | .yaml
    system_prompt: str | None = None  # system turn (chat) or preamble (plain, r1-zero)
    instruction: str | None = None  # appended to every question after a newline
    max_per_question: int = Field(default=2, ge=1)
    filters: list[str] = Field(default_factory=lambda: list(FILTERS))
    drop_truncated: bool = True  # a response cut by the budget never learned to stop
    deduplicate: bool = True
    max_paragraph_chars: int = Field(default=DEFAULT_MAX_PARAGRAPH_CHARS, ge=1)
    min_language_consistency: float = Field(default=DEFAULT_MIN_LANGUAGE_CONSISTENCY, ge=0, le=1)
    max_batch_size: int = Field(default=256, ge=1)
    write_rejected: bool = True
    min_kept: int = Field(default=1, ge=0)  # fewer kept samples than this is an error

    @field_validator("filters")
    @classmethod
    def _known_filters(cls, value: list[str]) -> list[str]:
        return check_filter_names(value)


@dataclass
class Selection:
    """What the funnel kept and dropped, with counts per exit."""

    kept: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    flagged: Counter = field(default_factory=Counter)  # readability flags among correct samples
    questions_with_kept: int = 0


def _exit(
    sample: SampleResult,
    readability: list[str],
    seen: set,
    key: tuple[str, str],
    kept_here: int,
    cfg: Config,
) -> str | None:
    """Where `sample` leaves the funnel (a FUNNEL name), or None when it is kept."""
    if not sample.judged:
        return "unjudged"
    if sample.answer is None:
        return "no_answer"
    if not sample.correct:
        return "wrong"
    if cfg.drop_truncated and sample.finish_reason == "length":
        return "truncated"
    if readability:
        return readability[0]
    if cfg.deduplicate and key in seen:
        return "duplicate"
    if kept_here >= cfg.max_per_question:
        return "over_cap"
    return None


def select_samples(
    examples: Sequence[Example],
    prompts: Sequence[str],
    rows: Sequence[Sequence[SampleResult]],
    cfg: Config,
    *,
    provenance: dict | None = None,
    label: str = "",
) -> Selection:
    """Run every sample through the funnel (see the module docstring); pure, no I/O.

    The funnel's settings (template, filters, drop_truncated, deduplicate, max_per_question
    and the readability thresholds) are read from `cfg`, the one place that defaults them.
    """
    filters = check_filter_names(cfg.filters)  # again: a model_copy skips the validators
    structure = judged_structure(cfg.template)
    structure = structure if structure in STRUCTURES else "r1-chat"
    out = Selection()
    seen: set[tuple[str, str]] = set()
    for ex, prompt, row in zip(examples, prompts, rows):
        kept_here = 0
        for index, sample in enumerate(row):
            out.counts["sampled"] += 1
            problems = readability_problems(
                sample.completion,
                language_consistency=sample.language_consistency,
                filters=filters,
                max_paragraph_chars=cfg.max_paragraph_chars,
                min_language_consistency=cfg.min_language_consistency,
                structure=structure,
                prefilled=prefills_think(prompt),
            )
            if sample.correct:
                out.counts["correct"] += 1
                out.flagged.update(problems)
            key = (normalized_text(ex.question), normalized_text(sample.completion))
            reason = _exit(sample, problems, seen, key, kept_here, cfg)
            record = {
                "prompt": prompt,
                "response": sample.completion,
                "question": ex.question,
                "answer": ex.answer,
                "meta": ex.meta,
                "task": label,
                "sample_index": index,
            }
            if reason is None:
                seen.add(key)
                kept_here += 1
                out.kept.append({**record, "provenance": provenance or {}})
                out.counts["kept"] += 1
            else:
                out.counts[reason] += 1
                out.rejected.append(
                    {
                        **record,
                        "reason": reason,
                        "predicted": sample.answer,
                        "finish_reason": sample.finish_reason,
                    }
                )
        out.questions_with_kept += kept_here > 0
    return out


def provenance_of(cfg: Config) -> dict:
    """Where every kept sample came from: the model (its stage and step), sampling, date."""
    model = describe_model(cfg.model)
    return {
        "model": model["path"],
        "stage": model.get("stage"),
        "step": model.get("step"),
        "model_finished": model.get("finished"),
        "model_fingerprint": model.get("fingerprint"),
        "sampling": {
            "template": cfg.template,
            "system_prompt": cfg.system_prompt,
            "instruction": cfg.instruction,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens,
            "samples_per_question": cfg.samples_per_question,
            "seed": cfg.seed,
        },
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _counts_summary(sel: Selection, n_questions: int) -> dict:
    counts = {name: sel.counts.get(name, 0) for name in ("sampled", "correct", *FUNNEL, "kept")}
    sampled = counts["sampled"]
    return {
        "questions": n_questions,
        "questions_with_kept": sel.questions_with_kept,
        "counts": counts,
        "flagged_among_correct": {name: sel.flagged.get(name, 0) for name in FILTERS},
        "accuracy": counts["correct"] / sampled if sampled else 0.0,
        "keep_rate": counts["kept"] / sampled if sampled else 0.0,
    }


def _jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows)


def print_summary(summary: dict) -> None:
    """The funnel on the console: one row per exit, one column per set and the total."""
    from rich.table import Table

    parts = {**summary["sets"], "total": summary["total"]}
    table = Table(title=f"rejection sampling: {summary['model']['path']}")
    table.add_column("")
    for label in parts:
        table.add_column(label, justify="right")
    for name in ("sampled", "correct", *FUNNEL, "kept"):
        table.add_row(name, *(str(part["counts"][name]) for part in parts.values()))
    console.print(table)


def run(cfg: Config, out_dir: str | Path, resume: bool = True) -> dict:
    """Sample, judge, filter and write the SFT data; returns the summary (rejection.json)."""
    from r1lab.model.checkpoint import atomic_write_text

    out, fingerprint = Path(out_dir), cfg.fingerprint()
    finished = finished_summary(out, fingerprint, SUMMARY_FILE) if resume else None
    if finished is not None:
        print_summary(finished)
        return finished
    model, tokenizer = start_sampling_run(cfg, out)
    provenance = provenance_of(cfg)
    params = SamplingParams(n=cfg.samples_per_question, **sampling_options(cfg))
    template, structure = prompt_template(cfg.template, cfg.system_prompt, cfg.instruction)
    kept, rejected, sets = [], [], {}
    total = Selection()
    for spec in cfg.tasks:
        spec, task, examples = load_task_examples(spec, cfg.n, cfg.split, cfg.seed)
        judged = sample_and_judge(
            model,
            tokenizer,
            task,
            examples,
            template,
            params,
            structure=structure,
            max_batch_size=cfg.max_batch_size,
            progress=True,
            description=f"rejection {spec.title}",
        )
        sel = select_samples(
            examples, judged.prompts, judged.rows, cfg, provenance=provenance, label=spec.title
        )
        sets[spec.title] = _counts_summary(sel, len(examples))
        kept += sel.kept
        rejected += sel.rejected
        total.counts.update(sel.counts)
        total.flagged.update(sel.flagged)
        total.questions_with_kept += sel.questions_with_kept

    n_questions = sum(s["questions"] for s in sets.values())
    summary = {
        "model": describe_model(cfg.model),
        "output": str((out / DATA_FILE).resolve()),
        "provenance": provenance,
        "config": config_dict(cfg),
        "sets": sets,
        "total": _counts_summary(total, n_questions),
    }
    main = distributed.is_main()  # torchrun: every rank has the selection, rank 0 writes
    if main:
        atomic_write_text(out / DATA_FILE, _jsonl(kept))
        if cfg.write_rejected:
            atomic_write_text(out / REJECTED_FILE, _jsonl(rejected))
        text = json.dumps(summary, indent=2, ensure_ascii=False, default=str) + "\n"
        atomic_write_text(out / SUMMARY_FILE, text)
        print_summary(summary)
    if len(kept) < cfg.min_kept:
        raise ValueError(
            f"rejection sampling kept {len(kept)} of {total.counts['sampled']} samples, fewer "
            f"than min_kept={cfg.min_kept} (see {out / SUMMARY_FILE} for where they were "
            "dropped; min_kept=0 accepts an empty result)"
        )
    if not kept and main:
        console.print(
            f"[bold yellow]WARNING[/]: rejection sampling kept no sample; {DATA_FILE} is empty"
        )
    if main:
        mark_done(
            out,
            fingerprint,
            output=summary["output"],
            kept=len(kept),
            sampled=total.counts["sampled"],
            keep_rate=round(summary["total"]["keep_rate"], 4),
        )
    distributed.barrier()
    return summary
