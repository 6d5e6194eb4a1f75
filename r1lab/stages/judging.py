"""Sample and judge: the one path from questions to scored completions.

GRPO's rollout, the eval stage and rejection sampling all render questions with a template,
sample completions, and score them with reward functions whose options follow the template.
They do it here, so a question is asked and judged the same way wherever it is asked:

- `sample_completions`: prompts -> completions (k per prompt, grouped by prompt);
- `RewardSet` + `score_completions`: completions -> a `CombinedRewards` (per-function
  scores with reasons, weighted totals, counts of what could not be judged);
- `judge_samples`: the evaluation's view of the same scores (`SampleResult` per sample:
  correct, extracted answer, format, language consistency).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from r1lab import distributed
from r1lab.config import write_config
from r1lab.engine.generate import Completion, SamplingParams, sample
from r1lab.engine.sampling import prompt_keys
from r1lab.model.tokenizer import PromptTemplate, render_prompt, resolve_template
from r1lab.rewards import RewardResult, get_reward
from r1lab.rewards.base import NO_REASON
from r1lab.rewards.combine import CombinedRewards, combine_rewards
from r1lab.tasks.base import Example, Task
from r1lab.training import progress_bar, set_cpu_threads, set_seed

# Built-in rewards whose behaviour follows the prompt template (the structure they check,
# where they read the final answer): their options default to the structure the run's
# template is judged by (`judged_structure`).
TEMPLATE_OPTIONS: dict[str, Callable[[str], dict]] = {
    "accuracy": lambda template: {"template_hint": template} if template != "plain" else {},
    "format": lambda template: (
        {"structure": template} if template in ("r1-zero", "r1-chat") else {}
    ),
}


# ---- templates ----------------------------------------------------------------------------------
def judged_structure(template: str | PromptTemplate) -> str:
    """The structure completions to a template's prompts are judged by: its base template,
    "r1-zero", "r1-chat" or "plain", with the tokenizer's own chat template (`chat`,
    `r1-distill`) judged as "r1-chat" (`<think>` reasoning `</think>`, then a summary with
    the boxed answer)."""
    base = resolve_template(template).base
    return "r1-chat" if base == "chat" else base


def prompt_template(
    template: str | PromptTemplate, system: str | None = None, instruction: str | None = None
) -> tuple[PromptTemplate, str]:
    """(the template with `system` / `instruction` applied where given, the structure its
    completions are judged by: `judged_structure`). Every stage that asks questions (GRPO's
    rollouts and evaluation, the eval and rejection stages) renders them with the first."""
    try:
        spec = resolve_template(template)
    except KeyError as err:
        raise ValueError(err.args[0]) from None
    spec = PromptTemplate(
        spec.base,
        spec.system if system is None else system,
        spec.instruction if instruction is None else instruction,
    )
    return spec, judged_structure(spec)


# ---- sampling -----------------------------------------------------------------------------------
def render_prompts(
    template: str | PromptTemplate, questions: Sequence[Example | str], tokenizer
) -> list[str]:
    """Each question (an Example or its text) rendered with the prompt template."""
    return [
        render_prompt(template, q if isinstance(q, str) else q.question, tokenizer)
        for q in questions
    ]


def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    max_batch_size: int | None = None,
    questions_per_call: int | None = None,
    progress: bool = False,
    description: str = "sampling",
    prompt_ids: list[list[int]] | None = None,
    warn_context: bool = True,
    keys: Sequence[int] | None = None,
) -> list[Completion]:
    """`params.n` completions per prompt, grouped by prompt (`prompt_index` into `prompts`).

    A prompt's completions are drawn with its key (`keys`, one per prompt; by default
    (`params.seed`, its index in `prompts`): `r1lab.engine.sampling`), so they do not
    depend on `questions_per_call` (prompts per `sample` call, for the progress bar),
    `max_batch_size` (rows `sample` decodes at once) or which other prompts are sampled
    with them. `prompt_ids` spares tokenizing the prompts again when the caller already
    has them. `warn_context`: say (once, on stderr) how many prompts plus
    `max_new_tokens` exceed the model's context (`r1lab.api.warn_over_context`).
    """
    if not prompts:
        raise ValueError("no prompts to sample")
    ids = prompt_ids if prompt_ids is not None else tokenizer(list(prompts))["input_ids"]
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if warn_context and context:
        from r1lab.api import warn_over_context

        warn_over_context(ids, context, params.max_new_tokens)
    keys = prompt_keys(params, len(ids), keys)
    per_call = questions_per_call or len(ids)
    out: list[Completion] = []
    bar = progress_bar(description, total=len(prompts)) if progress else nullcontext(_no_advance)
    with bar as advance:
        for start in range(0, len(ids), per_call):
            end = start + per_call
            for c in sample(
                model, ids[start:end], params, tokenizer, max_batch_size, keys=keys[start:end]
            ):
                c.prompt_index += start
                out.append(c)
            advance(min(per_call, len(ids) - start))
    return out


def _no_advance(n: int = 1, info: str = "") -> None:
    return None


def sample_questions(
    model,
    tokenizer,
    template: str | PromptTemplate,
    questions: Sequence[Example | str],
    params: SamplingParams,
    **options: Any,
) -> tuple[list[str], list[list[int]], list[Completion]]:
    """Ask each question: render it with `template`, tokenize it and sample `params.n`
    completions of it. Returns (the prompts, their token ids, the completions grouped by
    prompt); `options` are `sample_completions`'s."""
    prompts = render_prompts(template, questions, tokenizer)
    prompt_ids = tokenizer(prompts)["input_ids"]
    completions = sample_completions(
        model, tokenizer, prompts, params, prompt_ids=prompt_ids, **options
    )
    return prompts, prompt_ids, completions


# ---- rewards ------------------------------------------------------------------------------------
class RewardSpec(BaseModel):
    """A reward function's weight and options (a bare number in YAML is just the weight)."""

    model_config = ConfigDict(extra="forbid")
    weight: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)


def load_reward(name: str, options: dict, template: str | PromptTemplate) -> Callable:
    """A built-in reward by name, or `package.module:function` / `file.py:function` for a
    user's own callable. A built-in's options default to what `template` (any prompt
    template, or a structure) asks of a completion (`TEMPLATE_OPTIONS`); `options` win."""
    if ":" in name:
        from r1lab.user_code import load_callable

        fn = load_callable(name, "reward")  # module:function or path/to/file.py:function
        return fn(**options) if options else fn
    structure = judged_structure(template)
    defaults = TEMPLATE_OPTIONS.get(name.removesuffix("_reward"), lambda _t: {})(structure)
    return get_reward(name, **{**defaults, **options})


class ByTask:
    """The accuracy reward, except for rows whose task names its own (code tasks: "code").

    A task with a `reward` attribute is judged by that reward (made once, by name, with
    the task's `reward_options`); every other row goes to the wrapped reward, in one call
    with exactly the columns it would have had alone, so a batch without such tasks is
    scored exactly as before. Scores and reasons come back in the batch's order.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "accuracy")
        self._own: dict[str, Callable] = {}
        # the last call's rows per task reward: name -> (rows, scores, reasons)
        self.last: dict[str, tuple[list[int], list, list]] = {}

    def _reward_of(self, task: Any) -> str | None:
        return getattr(task, "reward", None) if not isinstance(task, str) else None

    def __call__(self, prompts: list, completions: list[str], **columns: Any):
        tasks = columns.get("task")
        names = [self._reward_of(t) for t in tasks] if tasks is not None else []
        self.last = {}
        if not any(names):
            return self.fn(prompts, completions, **columns)
        scores: list[float | None] = [None] * len(completions)
        reasons: list[str | None] = [None] * len(completions)
        for name in dict.fromkeys(names):
            rows = [i for i, n in enumerate(names) if n == name]
            if name is None:
                fn = self.fn
            else:
                if name not in self._own:
                    task = tasks[rows[0]]
                    self._own[name] = get_reward(name, **dict(getattr(task, "reward_options", {})))
                fn = self._own[name]
            part = fn(
                [prompts[i] for i in rows],
                [completions[i] for i in rows],
                **{
                    k: [v[i] for i in rows] if isinstance(v, (list, tuple)) else v
                    for k, v in columns.items()
                },
            )
            given = getattr(part, "reasons", None) or [None] * len(part)
            for j, i in enumerate(rows):
                scores[i], reasons[i] = part[j], given[j]
            if name is not None:
                self.last[name] = (rows, list(part), list(given))
        return RewardResult(scores, reasons)


class RewardSet:
    """Reward functions with weights, scored together by `r1lab.rewards.combine_rewards`.

    A sample's total is None when a weighted function could not judge it; such a sample
    is left out of its group's statistics and gets advantage 0, so a failing checker
    neither rewards nor punishes (never a silent zero). The built-ins' options follow
    `template`, the prompt template the completions answer (`load_reward`).
    """

    def __init__(self, specs: dict[str, Any], template: str | PromptTemplate):
        self.items: list[tuple[Callable, float]] = [
            (load_reward(name, dict(spec.options), template), spec.weight)
            for name, spec in specs.items()
        ]
        # the accuracy reward defers to a task's own reward (code tasks run their tests)
        self.items = [
            (ByTask(fn) if name.removesuffix("_reward") == "accuracy" else fn, weight)
            for (fn, weight), name in zip(self.items, specs)
        ]

    def add(self, fn: Callable, weight: float) -> None:
        self.items.append((fn, weight))

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any):
        combined = combine_rewards(self.items, prompts, completions, **columns)
        for fn, _ in self.items:
            if isinstance(fn, ByTask):
                for name, part in fn.last.items():
                    if name not in combined.weights:
                        _log_only(combined, name, part)
        return combined


def _log_only(combined: CombinedRewards, name: str, part: tuple[list[int], list, list]) -> None:
    """A task's own reward (code) as a weight-0 column of its rows only, for the logs:
    `rewards/code/mean` is the mean over the code rows; other rows are None (no reason), so
    `rewards/code/none_frac` is the share of other tasks' rows plus the code rows not judged."""
    rows, values, given = part
    n = len(combined.total)
    scores: list[float | None] = [None] * n
    reasons: list[str | None] = [None] * n
    for i, value, reason in zip(rows, values, given):
        scores[i] = value
        reasons[i] = reason or (NO_REASON if value is None else None)
    combined.weights[name] = 0.0
    combined.scores[name] = scores
    combined.reasons[name] = reasons
    combined.none_reasons[name] = Counter(reasons[i] for i in rows if scores[i] is None)


def score_completions(
    rewards: RewardSet,
    prompts: Sequence[str],
    examples: Sequence[Example],
    tasks: Sequence[Task],
    completions: Sequence[Completion],
) -> CombinedRewards:
    """Score every completion (one call per reward function), in the order given.

    `prompts`, `examples` and `tasks` are per question; a completion's `prompt_index`
    says which question it answers.
    """
    owner = [c.prompt_index for c in completions]
    columns = {
        "answer": [examples[q].answer for q in owner],
        "task": [tasks[q] for q in owner],
        "meta": [examples[q].meta for q in owner],
        "question": [examples[q].question for q in owner],
        "language": [examples[q].meta.get("language") for q in owner],
        "finish_reason": [c.finish_reason for c in completions],
        "completion_lengths": [len(c.token_ids) for c in completions],
    }
    return rewards([prompts[q] for q in owner], [c.text or "" for c in completions], **columns)


def join_scores(parts: Sequence[CombinedRewards]) -> CombinedRewards:
    """The scores of several batches (e.g. dynamic-sampling rounds) as one, in order."""
    if len(parts) == 1:
        return parts[0]
    # a task's own reward's log-only column (code) may be in some parts only
    weights = {k: w for p in parts for k, w in p.weights.items()}

    def col(p: CombinedRewards, table: dict, k: str) -> list:
        return table[k] if k in table else [None] * len(p.total)

    return CombinedRewards(
        weights=weights,
        scores={k: [v for p in parts for v in col(p, p.scores, k)] for k in weights},
        reasons={k: [v for p in parts for v in col(p, p.reasons, k)] for k in weights},
        total=[v for p in parts for v in p.total],
        none_reasons={
            k: sum((p.none_reasons.get(k, Counter()) for p in parts), Counter()) for k in weights
        },
    )


# ---- the evaluation's judgment ------------------------------------------------------------------
@dataclass
class SampleResult:
    """One judged sample: what was written, what answer it gave, and how it was judged."""

    completion: str
    answer: str | None
    correct: bool
    judged: bool  # False when the checker failed (then `correct` is False and `reason` says why)
    reason: str | None
    finish_reason: str
    n_tokens: int
    format_ok: bool | None  # None when the template has no structure to check
    language_consistency: float | None


def evaluation_rewards(template: str) -> RewardSet:
    """Accuracy, the template's structure (none for "plain") and language consistency."""
    names = ["accuracy", "format", "language_consistency"]
    if template == "plain":
        names.remove("format")
    return RewardSet({name: RewardSpec() for name in names}, template)


def judge_samples(
    task: Task,
    examples: Sequence[Example],
    prompts: Sequence[str],
    completions: Sequence[Completion],
    template: str,
) -> list[list[SampleResult]]:
    """Judge every completion (accuracy, answer, format, language); one row per question."""
    from r1lab.rewards.base import prefills_think
    from r1lab.rewards.language import NO_CHAIN_OF_THOUGHT
    from r1lab.tasks.answers import extract_answer

    scored = score_completions(
        evaluation_rewards(template), prompts, examples, [task] * len(examples), completions
    )
    by_fn = list(scored.scores.values())
    accuracy, language = by_fn[0], by_fn[-1]
    structure = by_fn[1] if len(by_fn) == 3 else [None] * len(completions)
    reasons = list(scored.reasons.values())[0]
    # Readability is measured on responses that reason; one without reasoning has no language.
    language_reasons = scored.reasons.get("language_consistency") or [None] * len(completions)
    hint = template if template in ("r1-zero", "r1-chat") else None
    if getattr(task, "reward", None) == "code":  # a code task's answer is its program
        from r1lab.rewards.code import extract_code

        def extract_answer(text, _hint, prefilled):  # noqa: F811
            return extract_code(text, prefilled=prefilled)

    rows: list[list[SampleResult]] = [[] for _ in examples]
    for i, c in enumerate(completions):
        text, prompt = c.text or "", prompts[c.prompt_index]
        rows[c.prompt_index].append(
            SampleResult(
                completion=text,
                answer=extract_answer(text, hint, prefilled=prefills_think(prompt))
                or None,  # an empty answer is no answer: it never votes
                correct=accuracy[i] is not None and accuracy[i] >= 1.0,
                judged=accuracy[i] is not None,
                reason=reasons[i],
                finish_reason=c.finish_reason,
                n_tokens=len(c.token_ids),
                format_ok=None if structure[i] is None else structure[i] >= 1.0,
                language_consistency=None
                if language_reasons[i] == NO_CHAIN_OF_THOUGHT
                else language[i],
            )
        )
    return rows


@dataclass
class JudgedSet:
    """A held-out or training set asked, sampled and judged (the eval and rejection input)."""

    prompts: list[str]  # one per question, as the model was given it
    completions: list[Completion]  # grouped by question
    rows: list[list[SampleResult]]  # the judged samples, one list per question
    sample_s: float  # seconds spent rendering and sampling (judging excluded)


def sample_and_judge(
    model,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    template: str | PromptTemplate,
    params: SamplingParams,
    *,
    structure: str,
    max_batch_size: int,
    progress: bool,
    description: str,
) -> JudgedSet:
    """`params.n` completions of each question, judged with the template's `structure`.

    A `sample` call takes as many whole questions as fit in `max_batch_size` rows; how a
    question's draws are seeded is `sample_completions`'s rule. The eval and rejection
    stages both sample through here, so they ask, batch and judge a set alike.

    Under torchrun each rank samples and judges its contiguous share of the questions,
    question i still drawn with the key (seed, i), and every rank gets the whole set back
    in question order: the one-process result, whatever the number of ranks.
    """
    started = time.perf_counter()
    keys = prompt_keys(params, len(examples))
    if params.seed is None and distributed.active():
        keys = distributed.all_gather_objects(keys)[0]  # rank 0's random draw for all
    share = distributed.shard_of(len(examples))
    mine = list(examples[share.start : share.stop])
    prompts, completions, rows = [], [], []
    if mine:
        prompts, _, completions = sample_questions(
            model,
            tokenizer,
            template,
            mine,
            params,
            max_batch_size=max_batch_size,
            questions_per_call=max(1, max_batch_size // params.n),
            progress=progress,
            description=description,
            keys=keys[share.start : share.stop],
        )
    sample_s = time.perf_counter() - started
    if mine:
        rows = judge_samples(task, mine, prompts, completions, structure)
    return gather_judged(JudgedSet(prompts, completions, rows, sample_s))


def gather_judged(part: JudgedSet) -> JudgedSet:
    """Every rank's share of a set, joined in rank order (= question order); the sampling
    time is the slowest rank's. One process: `part` itself."""
    parts = distributed.all_gather_objects(part)
    if len(parts) == 1:
        return part
    whole = JudgedSet([], [], [], max(p.sample_s for p in parts))
    for p in parts:
        for c in p.completions:
            c.prompt_index += len(whole.prompts)
        whole.prompts += p.prompts
        whole.completions += p.completions
        whole.rows += p.rows
    return whole


# ---- the model that samples ---------------------------------------------------------------------
def load_model_and_tokenizer(model_path: str, device: str, dtype: str):
    """The model (on the resolved device and dtype) and its tokenizer, which must exist."""
    from r1lab.api import load
    from r1lab.config import resolve_device, resolve_dtype

    dev = distributed.local_device(resolve_device(device))  # torchrun: the rank's own GPU
    model, tokenizer = load(model_path, dtype=resolve_dtype(dtype, dev), device=dev)
    if tokenizer is None:
        raise FileNotFoundError(f"{model_path}: no tokenizer next to the model")
    return model, tokenizer


def start_sampling_run(cfg, out: Path):
    """Begin an eval or rejection run in `out`: its config.yaml (rank 0 writes the run
    dir), the CPU threads and seed, and the model that samples with its tokenizer, which
    are returned."""
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        write_config(cfg, out / "config.yaml")
    set_cpu_threads()
    set_seed(cfg.seed)
    return load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)


def describe_model(path: str | Path) -> dict:
    """Where a model came from: its path, and the stage, step and config of its run dir.

    A stage run dir holds `DONE` (fingerprint, finish time, the stage's own summary such as
    its kind and last step) and `config.yaml`; a bare model folder has neither, and only its path is
    known.
    """
    import yaml

    path = Path(path)
    info: dict[str, Any] = {"path": str(path.resolve()) if path.exists() else str(path)}
    run_dir = path.parent if path.name == "model" and (path.parent / "DONE").exists() else path
    done, config = run_dir / "DONE", run_dir / "config.yaml"
    if done.is_file():
        record = json.loads(done.read_text())
        info["stage"] = run_dir.name
        info["stage_kind"] = record.get("stage")
        info["step"] = record.get("step", record.get("steps"))
        info["finished"] = record.get("finished")
        info["fingerprint"] = record.get("fingerprint")
    if config.is_file():
        try:
            info["stage_config"] = yaml.safe_load(config.read_text())
        except yaml.YAMLError:
            info["stage_config"] = None
    return info
