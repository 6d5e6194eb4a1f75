"""The paper's evaluation: k sampled answers per question, pass@1, cons@k, and their shape.

Protocol (R1_RECIPE.md): sample, never greedy, at temperature 0.6 and top-p 0.95; pass@1
is the mean correctness over the k samples of a question, averaged over questions;
cons@k is the accuracy of the majority-vote answer. Greedy decoding is an option for
comparison only (k is then 1 and the result says so).

Every stage that yields a model is evaluated with `run` (the `r1lab eval` command), and
GRPO's periodic evaluation calls `evaluate` on its live policy, so the numbers of a
training curve and of the report card are the same quantity. Correctness comes from the
accuracy reward (the same judgment the RL stages are trained on), structure from the
format reward of the template and language consistency from its reward.

Speed: all k samples of a batch of questions go through one `sample` call (prompt
prefilled once, its cache shared by the k rows), and texts are decoded once, by the
sampler, when a row finishes.
"""

from __future__ import annotations

import inspect
import json
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from r1lab import distributed
from r1lab.config import StageConfig, config_dict
from r1lab.engine.generate import SamplingParams
from r1lab.metrics import (
    is_self_check,
    length_stats,
    majority_correct,
    mean_pass_at_1,
    mean_pass_at_k,
    pass_at_1_stderr,
    question_mean,
    question_mean_stderr,
    rate,
    truncation_rate,
)
from r1lab.model.tokenizer import check_template
from r1lab.stages.judging import (
    SampleResult,
    describe_model,
    load_model_and_tokenizer,
    prompt_template,
    render_prompts,
    sample_and_judge,
    start_sampling_run,
)
from r1lab.stages.task_spec import TaskList, TaskSpec, load_task_examples, parse_task_spec
from r1lab.tasks import Example, Task, get_task
from r1lab.training import console, finished_summary, mark_done

BREAKDOWN_KEYS = ("subject", "level", "language", "family")
# Re-exported: the eval stage's public names for its task specs and judged samples.
__all__ = [
    "Config",
    "SampleResult",
    "TaskSpec",
    "describe_model",
    "evaluate",
    "evaluate_with_records",
    "load_model_and_tokenizer",
    "load_task_examples",
    "parse_task_spec",
    "run",
]


# --- config -------------------------------------------------------------------------------


class Config(StageConfig):
    """`r1lab eval`: the model, the held-out sets and the sampling protocol.

    `tasks` entries are a task name or a mapping: `{"name": "chain_sum", "n": 200}`,
    `{"name": "math500", "path": "data/math500.jsonl"}`; `n`, `split`, `seed` and `label`
    are read here, every other key is an option of the task. Defaults are the tiny CPU
    settings.
    """

    model: str  # model folder, hub id, or a stage run dir (its model/ is used)
    tasks: TaskList = Field(default_factory=lambda: [{"name": "chain_sum"}])
    n: int | None = 200  # questions per task when its spec has no "n" (None = all)
    split: str = "test"
    template: str = "r1-zero"  # r1-zero | r1-chat | plain | chat | r1-distill | a .yaml file
    system_prompt: str | None = None  # system turn (chat) or preamble (plain, r1-zero)
    instruction: str | None = None  # appended to every question after a newline
    k: int = Field(default=4, ge=1)
    temperature: float = Field(default=0.6, ge=0)
    top_p: float = Field(default=0.95, gt=0, le=1)
    max_new_tokens: int = Field(default=128, ge=1)
    greedy: bool = False
    max_batch_size: int = Field(default=256, ge=1)
    n_shown: int = Field(default=3, ge=0)  # sample responses kept in eval.json per task

    @field_validator("template")
    @classmethod
    def _known_template(cls, value: str) -> str:
        return check_template(value)

    @field_validator("tasks")
    @classmethod
    def _unique_labels(cls, value: list) -> list:
        # results are keyed by the set's label; TaskList has checked each spec already
        labels = [parse_task_spec(spec).title for spec in value]
        repeated = sorted({lbl for lbl in labels if labels.count(lbl) > 1})
        if repeated:
            raise ValueError(f"task labels must be unique, repeated: {repeated} (set 'label')")
        return value

    @model_validator(mode="after")
    def _greedy_means_one_sample(self):
        # Greedy decoding gives the same answer k times: one sample says it all.
        if self.greedy and self.k != 1:
            object.__setattr__(self, "k", 1)
        return self

    def protocol(self) -> dict[str, Any]:
        """`evaluate`'s options as this config sets them. Its fields carry the names of
        `evaluate_with_records`' keyword options (template ... n_shown), so an option is
        passed by name and a new one needs only a field of its name here."""
        options = inspect.signature(evaluate_with_records).parameters.values()
        names = [o.name for o in options if o.kind is o.KEYWORD_ONLY]
        return {name: getattr(self, name) for name in names if name in type(self).model_fields}


# --- sampling and judging -----------------------------------------------------------------


def sampling_settings(
    k: int, temperature: float, top_p: float, max_new_tokens: int, greedy: bool, seed: int | None
) -> dict:
    """The sampling protocol as recorded in results (greedy shows as temperature 0, k 1)."""
    if greedy:
        k, temperature, top_p = 1, 0.0, 1.0
    return {"greedy": greedy, "k": k, "temperature": temperature, "top_p": top_p,
            "max_new_tokens": max_new_tokens, "seed": seed}  # fmt: skip


def answer_equivalence(task: Task, example: Example) -> Callable[[str, str], bool]:
    """Whether two answers to `example` are the same answer, by the task's own check.

    Used for the majority vote: the first answer of a group plays the reference. A check
    that fails (an error, math-verify giving up) counts as "not the same".
    """

    def same(representative: str, answer: str) -> bool:
        try:
            return task.judge(answer, representative, example).correct
        except Exception:  # noqa: BLE001  (a failed comparison only splits a vote)
            return False

    return same


# --- summarising --------------------------------------------------------------------------


def _scores(
    task: Task, examples: Sequence[Example], rows: list[list[SampleResult]], k: int
) -> dict:
    correct = [[s.correct for s in row] for row in rows]
    votes = [
        majority_correct([s.answer for s in row], flags, answer_equivalence(task, ex))
        for ex, row, flags in zip(examples, rows, correct)
    ]
    return {
        "pass@1": mean_pass_at_1(correct),
        "pass@1_stderr": pass_at_1_stderr(correct),
        "cons@k": rate(votes),
        "pass@k": {str(j): mean_pass_at_k(correct, j) for j in sorted({1, k})},
        "_votes": votes,
    }


def _breakdowns(
    examples: Sequence[Example], rows: list[list[SampleResult]], votes: list[bool]
) -> dict:
    """pass@1 and cons@k per value of each meta key that splits the set (subject, level, ...)."""
    out: dict[str, dict] = {}
    for key in BREAKDOWN_KEYS:
        groups: dict[str, list[int]] = defaultdict(list)
        for q, ex in enumerate(examples):
            if key in ex.meta:
                groups[str(ex.meta[key])].append(q)
        if len(groups) < 2:
            continue
        out[key] = {
            value: {
                "n": len(qs),
                "pass@1": mean_pass_at_1([[s.correct for s in rows[q]] for q in qs]),
                "cons@k": rate([votes[q] for q in qs]),
            }
            for value, qs in sorted(groups.items())
        }
    return out


def _shown(examples: Sequence[Example], rows: list[list[SampleResult]], n_shown: int) -> list[dict]:
    """The first sample of the first few questions, as the report shows them."""
    return [
        {
            "question": ex.question,
            "reference": ex.answer,
            "completion": row[0].completion,
            "answer": row[0].answer,
            "correct": row[0].correct,
            "finish_reason": row[0].finish_reason,
            "tokens": row[0].n_tokens,
        }
        for ex, row in list(zip(examples, rows))[:n_shown]
    ]


def _sample_stats(rows: list[list[SampleResult]]) -> dict:
    """Per-sample behaviour as question-level means with standard errors (the findings' inputs).

    A quantity a sample does not have (no format to check, no reasoning to judge for
    language) is left out; a question with none of it is left out of that mean.
    """
    measures = {
        "format_rate": lambda s: None if s.format_ok is None else float(s.format_ok),
        "mean_length": lambda s: float(s.n_tokens),
        "self_check_rate": lambda s: float(is_self_check(s.completion)),
        "language_consistency": lambda s: s.language_consistency,
    }
    out: dict = {}
    for name, measure in measures.items():
        values = [[v for v in map(measure, row) if v is not None] for row in rows]
        values = [row for row in values if row]
        out[name] = question_mean(values) if values else None
        out[f"{name}_stderr"] = question_mean_stderr(values) if values else None
    return out


def summarize(
    task: Task,
    examples: Sequence[Example],
    rows: list[list[SampleResult]],
    *,
    template: str,
    settings: dict,
    n_shown: int = 3,
) -> dict:
    """The result of one held-out set (the dict `evaluate` returns; eval.json's per-set entry)."""
    samples = [s for row in rows for s in row]
    scores = _scores(task, examples, rows, settings["k"])
    votes = scores.pop("_votes")
    lengths = [s.n_tokens for s in samples]
    unjudged = Counter(s.reason or "not judged" for s in samples if not s.judged)
    return {
        **_sample_stats(rows),
        "task": task.name,
        "n_questions": len(examples),
        "k": settings["k"],
        "template": template,
        "sampling": settings,
        **scores,
        "answer_rate": rate([s.answer is not None for s in samples]),
        "length": length_stats(lengths),
        "truncation_rate": truncation_rate([s.finish_reason for s in samples]),
        "unjudged": sum(unjudged.values()),
        "unjudged_reasons": dict(unjudged.most_common(5)),
        "breakdown": _breakdowns(examples, rows, votes),
        "samples": _shown(examples, rows, n_shown),
    }


# --- the reusable entry point -------------------------------------------------------------
def evaluate_with_records(
    model,
    tokenizer,
    examples: Sequence[Example],
    task: Task | str,
    *,
    template: str = "r1-zero",
    system_prompt: str | None = None,
    instruction: str | None = None,
    k: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 128,
    greedy: bool = False,
    seed: int | None = 0,
    max_batch_size: int = 256,
    progress: bool = True,
    n_shown: int = 3,
) -> tuple[dict, list[list[SampleResult]]]:
    """`evaluate`, also returning every judged sample (one list per question)."""
    if isinstance(task, str):
        task = get_task(task)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer (samples per question), got {k!r}")
    if not examples:
        raise ValueError("no examples to evaluate")
    spec, style = prompt_template(template, system_prompt, instruction)
    if greedy:
        k = 1
    settings = sampling_settings(k, temperature, top_p, max_new_tokens, greedy, seed)
    params = SamplingParams(
        temperature=settings["temperature"],
        top_p=settings["top_p"],
        max_new_tokens=max_new_tokens,
        n=k,
        seed=seed,
    )
    started = time.perf_counter()
    judged = sample_and_judge(
        model,
        tokenizer,
        task,
        examples,
        spec,
        params,
        structure=style,
        max_batch_size=max_batch_size,
        progress=progress,
        description=f"eval {task.name}",
    )
    rows = judged.rows
    result = summarize(task, examples, rows, template=style, settings=settings, n_shown=n_shown)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for c in judged.completions)
    result["timing"] = {
        "seconds": round(seconds, 3),
        "sampling_seconds": round(judged.sample_s, 3),
        "judging_seconds": round(seconds - judged.sample_s, 3),
        "tokens_per_s": round(tokens / max(judged.sample_s, 1e-9), 1),
    }
    return result, rows


def evaluate(model, tokenizer, examples: Sequence[Example], task: Task | str, **options) -> dict:
    """Evaluate `model` on `examples` with the paper's protocol; returns the result dict.

    Keys: pass@1 (mean over the k samples, then over questions) and its standard error,
    cons@k (majority vote, answers grouped by the task's own equivalence), pass@k (the
    unbiased estimator, for 1 and k), format_rate (the template's structure; None for
    "plain"), language_consistency, answer_rate, mean_length and length stats (tokens),
    truncation_rate, unjudged (checker failures, counted wrong), n_questions, k, sampling,
    breakdown (per subject / level / language / family when the examples' meta splits the
    set), samples (a few responses) and timing. `greedy=True` forces k=1, temperature 0.
    The options (template, k, temperature, top_p, max_new_tokens, greedy, seed,
    max_batch_size, progress, n_shown) are `evaluate_with_records`'s.
    """
    return evaluate_with_records(model, tokenizer, examples, task, **options)[0]


# --- the stage ----------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


TABLE_COLUMNS = (
    ("set", lambda r: r["_label"]),
    ("n", lambda r: str(r["n_questions"])),
    ("k", lambda r: "greedy" if r["sampling"]["greedy"] else str(r["k"])),
    ("pass@1", lambda r: f"{_pct(r['pass@1'])} ± {_pct(r['pass@1_stderr'])}"),
    ("cons@k", lambda r: _pct(r["cons@k"])),
    ("pass@k", lambda r: _pct(r["pass@k"][str(r["k"])])),
    ("format", lambda r: _pct(r["format_rate"])),
    ("lang.", lambda r: _pct(r["language_consistency"])),
    ("length", lambda r: f"{r['mean_length']:.1f}"),
    ("truncated", lambda r: _pct(r["truncation_rate"])),
)


def table_rows(sets: dict[str, dict]) -> list[list[str]]:
    return [
        [fn({**res, "_label": label}) for _, fn in TABLE_COLUMNS] for label, res in sets.items()
    ]


def markdown_table(report: dict) -> str:
    """eval.md: one line per held-out set, in percent, plus what was evaluated and how."""
    s = report["sampling"]
    how = (
        "greedy"
        if s["greedy"]
        else f"k={s['k']}, temperature {s['temperature']}, top-p {s['top_p']}"
    )
    lines = [
        f"# Evaluation of `{report['model']['path']}`",
        "",
        f"Template `{report['template']}`; {how}; up to {s['max_new_tokens']} new tokens; "
        f"{report['date']}.",
        "",
        "| " + " | ".join(name for name, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report["sets"])]
    lines += [
        "",
        "pass@1 (± standard error over questions), cons@k, pass@k, format, language "
        "consistency and truncated in %; length = mean response tokens.",
        "",
    ]
    return "\n".join(lines)


def print_table(report: dict) -> None:
    """The results on the console: one column per set, so it fits a narrow terminal."""
    from rich.table import Table

    table = Table(title=f"eval: {report['model']['path']} ({report['template']})")
    rows = table_rows(report["sets"])
    table.add_column("")
    for row in rows:
        table.add_column(row[0], justify="right")
    for i, (name, _) in enumerate(TABLE_COLUMNS[1:], 1):
        table.add_row(name, *(row[i] for row in rows))
    console.print(table)


def _write_json(path: Path, data: Any) -> None:
    from r1lab.model.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _write_samples(
    path: Path, per_set: dict[str, tuple[list[Example], list[list[SampleResult]], list[str]]]
) -> None:
    """One line per sample, with the exact prompt the model was given."""
    from r1lab.model.checkpoint import atomic_write_text

    lines = []
    for label, (examples, rows, prompts) in per_set.items():
        for q, (ex, row, prompt) in enumerate(zip(examples, rows, prompts)):
            for j, s in enumerate(row):
                record = {
                    "set": label,
                    "question_index": q,
                    "sample": j,
                    "question": ex.question,
                    "prompt": prompt,
                    "reference": ex.answer,
                    **asdict(s),
                }
                lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def run(cfg: Config, out_dir: str | Path, resume: bool = True) -> dict:
    """Evaluate `cfg.model` on every set of `cfg.tasks`; writes eval.json, eval.md, samples.jsonl.

    A finished evaluation with the same settings (DONE with this config's fingerprint) is
    read back instead of recomputed when `resume` is on.
    """
    out, fingerprint = Path(out_dir), cfg.fingerprint()
    finished = finished_summary(out, fingerprint, "eval.json") if resume else None
    if finished is not None:
        print_table(finished)
        return finished
    model, tokenizer = start_sampling_run(cfg, out)
    sets: dict[str, dict] = {}
    records = {}
    for spec in cfg.tasks:
        spec, task, examples = load_task_examples(spec, cfg.n, cfg.split, cfg.seed)
        result, rows = evaluate_with_records(model, tokenizer, examples, task, **cfg.protocol())
        sets[spec.title] = result
        template = prompt_template(cfg.template, cfg.system_prompt, cfg.instruction)[0]
        records[spec.title] = (examples, rows, render_prompts(template, examples, tokenizer))

    report = {
        "model": describe_model(cfg.model),
        "template": cfg.template,
        "sampling": sampling_settings(
            cfg.k, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.greedy, cfg.seed
        ),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config_dict(cfg),
        "sets": sets,
    }
    if distributed.is_main():  # torchrun: every rank has the results, rank 0 writes them
        from r1lab.model.checkpoint import atomic_write_text

        _write_samples(out / "samples.jsonl", records)
        _write_json(out / "eval.json", report)
        atomic_write_text(out / "eval.md", markdown_table(report))
        print_table(report)
        headline = {f"{label}/pass@1": round(res["pass@1"], 4) for label, res in sets.items()}
        mark_done(out, fingerprint, **headline)
    distributed.barrier()
    return report
