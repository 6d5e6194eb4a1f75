"""The rollout half of GRPO: draw questions, sample a group of answers each, score them.

Kept apart from `grpo.py` so that the stage file holds the update and the loop.
Everything is reproducible from (seed, step): a resumed run draws and samples exactly
what the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r1lab.engine.generate import Completion, SamplingParams, sample
from r1lab.metrics import is_self_check
from r1lab.model.tokenizer import render_prompt
from r1lab.tasks.base import Example, Task, get_task
from r1lab.training import console

SAMPLE_TEXT_CHARS = 1500  # longest completion text kept in samples.jsonl

# Built-in rewards whose behaviour follows the prompt template (the structure they check,
# where they read the final answer): their options default to the run's template.
TEMPLATE_OPTIONS: dict[str, Callable[[str], dict]] = {
    "accuracy": lambda template: {"template_hint": template} if template != "plain" else {},
    "format": lambda template: (
        {"structure": template} if template in ("r1-zero", "r1-chat") else {}
    ),
}


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts: the same parts give the same seed on every machine."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def question_key(text: str) -> str:
    """A question as compared across train and eval sets (case and spacing ignored)."""
    return " ".join(text.split()).lower()


# ---- tasks ------------------------------------------------------------------------------------
class TaskMixture:
    """Training questions drawn from several tasks by weight.

    Each task gives a pool of training-split examples once (so a dataset is read and a
    generator run only at start); every step then draws from the pools with a generator
    seeded by (seed, step, round). Questions that appear in `exclude` (the held-out eval
    set) are removed from the pools, so training never sees an eval question even when a
    task has no separate train split.
    """

    def __init__(
        self,
        specs: Sequence[Any],
        pool_size: int,
        seed: int,
        exclude: set[str] | None = None,
    ):
        self.tasks: list[Task] = []
        self.pools: list[list[Example]] = []
        self.weights: list[float] = []
        self.seed = seed
        self.removed = 0
        for spec in specs:
            task = get_task(spec.name, **spec.options)
            pool = task.examples("train", n=pool_size, seed=seed)
            kept = [ex for ex in pool if question_key(ex.question) not in (exclude or set())]
            self.removed += len(pool) - len(kept)
            if not kept:
                raise ValueError(f"task {spec.name!r} gave no training examples")
            self.tasks.append(task)
            self.pools.append(kept)
            self.weights.append(spec.weight)

    def draw(self, n: int, step: int, round_: int = 0) -> list[tuple[Task, Example]]:
        """`n` (task, example) pairs for this step; no example twice within one draw if avoidable."""
        rng = random.Random(derive_seed(self.seed, "draw", step, round_))
        which = rng.choices(range(len(self.tasks)), weights=self.weights, k=n)
        out: list[tuple[Task, Example]] = []
        for t, count in sorted(Counter(which).items()):
            pool = self.pools[t]
            picks = rng.sample(pool, min(count, len(pool)))
            picks += rng.choices(pool, k=count - len(picks))
            out += [(self.tasks[t], ex) for ex in picks]
        rng.shuffle(out)
        return out


# ---- rewards ----------------------------------------------------------------------------------
def load_reward(name: str, options: dict, template: str) -> Callable:
    """A built-in reward by name, or `package.module:function` for a user's own callable."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(
                f"reward {name!r}: cannot import {attr!r} from {module_name!r} ({err})"
            ) from err
        if not callable(fn):
            raise ValueError(f"reward {name!r} is not callable")
        return fn(**options) if options else fn
    from r1lab.rewards.base import get_reward

    defaults = TEMPLATE_OPTIONS.get(name.removesuffix("_reward"), lambda _t: {})(template)
    return get_reward(name, **{**defaults, **options})


class RewardSet:
    """Reward functions with weights, scored together by `r1lab.rewards.combine_rewards`.

    A sample's total is None when a weighted function could not judge it; such a sample
    is left out of its group's statistics and gets advantage 0, so a failing checker
    neither rewards nor punishes (never a silent zero).
    """

    def __init__(self, specs: dict[str, Any], template: str):
        self.items: list[tuple[Callable, float]] = [
            (load_reward(name, dict(spec.options), template), spec.weight)
            for name, spec in specs.items()
        ]

    def add(self, fn: Callable, weight: float) -> None:
        self.items.append((fn, weight))

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any):
        from r1lab.rewards.combine import combine_rewards

        return combine_rewards(self.items, prompts, completions, **columns)


# ---- sampling ---------------------------------------------------------------------------------
@dataclass
class Group:
    """One question and the G completions sampled for it, with their scores."""

    task: Task
    example: Example
    prompt: str
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float | None] = field(default_factory=list)
    by_fn: dict[str, list[float | None]] = field(default_factory=dict)
    reasons: dict[str, list[str | None]] = field(default_factory=dict)

    @property
    def reward_std(self) -> float:
        """Sample std of the judged rewards (0 with fewer than two), as the advantage uses."""
        judged = [r for r in self.rewards if r is not None]
        if len(judged) < 2:
            return 0.0
        mean = sum(judged) / len(judged)
        return math.sqrt(sum((r - mean) ** 2 for r in judged) / (len(judged) - 1))

    @property
    def has_signal(self) -> bool:
        """At least two judged rewards that differ: the group has a non-zero advantage."""
        judged = [r for r in self.rewards if r is not None]
        return len(judged) >= 2 and max(judged) > min(judged)


@dataclass
class Rollout:
    """The groups to train on, plus every group sampled (dynamic sampling drops some)."""

    groups: list[Group]
    sampled: list[Group]
    rounds: int
    sample_s: float
    score_s: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(c.token_ids) for g in self.sampled for c in g.completions)


def sample_groups(
    model,
    tokenizer,
    drawn: list[tuple[Task, Example]],
    template: str,
    params: SamplingParams,
    max_batch_size: int | None = None,
) -> list[Group]:
    """Render each question with the template and sample `params.n` completions of it."""
    prompts = [render_prompt(template, ex.question, tokenizer) for _, ex in drawn]
    prompt_ids = [tokenizer(p)["input_ids"] for p in prompts]
    completions = sample(model, prompt_ids, params, tokenizer, max_batch_size=max_batch_size)
    g = params.n
    return [
        Group(task, ex, prompts[i], prompt_ids[i], completions[i * g : (i + 1) * g])
        for i, (task, ex) in enumerate(drawn)
    ]


def score_groups(groups: list[Group], rewards: RewardSet) -> None:
    """Score every completion of `groups` in one call per reward function (in place)."""
    flat = [(g, c) for g in groups for c in g.completions]
    columns = {
        "answer": [g.example.answer for g, _ in flat],
        "task": [g.task for g, _ in flat],
        "meta": [g.example.meta for g, _ in flat],
        "question": [g.example.question for g, _ in flat],
        "language": [g.example.meta.get("language") for g, _ in flat],
        "finish_reason": [c.finish_reason for _, c in flat],
        "completion_lengths": [len(c.token_ids) for _, c in flat],
    }
    scores = rewards([g.prompt for g, _ in flat], [c.text or "" for _, c in flat], **columns)
    start = 0
    for g in groups:
        end = start + len(g.completions)
        g.rewards = scores.total[start:end]
        g.by_fn = {k: v[start:end] for k, v in scores.scores.items()}
        g.reasons = {k: v[start:end] for k, v in scores.reasons.items()}
        start = end


def collect_rollout(
    model,
    tokenizer,
    mixture: TaskMixture,
    rewards: RewardSet,
    *,
    step: int,
    seed: int,
    questions: int,
    group_size: int,
    template: str,
    sampling: dict,
    dynamic_sampling: bool = False,
    max_resample: int = 0,
    max_batch_size: int | None = None,
) -> Rollout:
    """Sample and score `questions` groups for `step`.

    With `dynamic_sampling` (DAPO), groups whose rewards are all equal carry no gradient
    and are dropped; fresh questions are drawn and sampled, at most `max_resample` more
    rounds, until `questions` groups with a signal are found. The batch may end up
    smaller than `questions` when the rounds run out.
    """
    kept: list[Group] = []
    sampled: list[Group] = []
    sample_s = score_s = 0.0
    rounds = 0
    for round_ in range(1 + (max_resample if dynamic_sampling else 0)):
        need = questions - len(kept)
        if need <= 0:
            break
        rounds += 1
        params = SamplingParams(
            n=group_size, seed=derive_seed(seed, "sample", step, round_), **sampling
        )
        t0 = time.perf_counter()
        groups = sample_groups(
            model, tokenizer, mixture.draw(need, step, round_), template, params, max_batch_size
        )
        t1 = time.perf_counter()
        score_groups(groups, rewards)
        t2 = time.perf_counter()
        sample_s += t1 - t0
        score_s += t2 - t1
        sampled += groups
        kept += [g for g in groups if g.has_signal] if dynamic_sampling else groups
    return Rollout(kept[:questions], sampled, rounds, sample_s, score_s)


# ---- what a rollout says ------------------------------------------------------------------
def rollout_metrics(rollout: Rollout, dynamic_sampling: bool = False) -> dict[str, Any]:
    """Reward, length and signal statistics over every group sampled this step."""
    from r1lab.rewards.combine import CombinedRewards

    groups = rollout.sampled
    combined = CombinedRewards(
        weights={},
        scores={k: [v for g in groups for v in g.by_fn[k]] for k in groups[0].by_fn},
        reasons={},
        total=[r for g in groups for r in g.rewards],
    )
    out: dict[str, Any] = combined.metrics()
    out["reward_std"] = sum(g.reward_std for g in groups) / len(groups)
    out["frac_reward_zero_std"] = sum(not g.has_signal for g in groups) / len(groups)
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    reasons = [c.finish_reason for g in groups for c in g.completions]
    out["completions/mean_length"] = sum(lengths) / len(lengths)
    texts = [c.text or "" for g in groups for c in g.completions]
    out["completions/self_check_rate"] = sum(map(is_self_check, texts)) / len(texts)
    out["completions/clipped_ratio"] = sum(r == "length" for r in reasons) / len(reasons)
    out["rollout/tokens_per_s"] = sum(lengths) / max(rollout.sample_s, 1e-9)
    if dynamic_sampling:
        out["dynamic_sampling/rounds"] = rollout.rounds
        out["dynamic_sampling/kept_groups"] = len(rollout.groups)
    return out


def not_judged(rollout: Rollout) -> dict[str, Counter]:
    """Per reward function, how often each reason for a None score came up."""
    out: dict[str, Counter] = {}
    for g in rollout.sampled:
        for fn, scores in g.by_fn.items():
            for s, why in zip(scores, g.reasons[fn]):
                if s is None:
                    out.setdefault(fn, Counter())[why or "no reason given"] += 1
    return out


def check_judged(rollout: Rollout, step: int) -> None:
    """Stop on a step where nothing could be judged; say loudly when some of it was not."""
    reasons = not_judged(rollout)
    if all(r is None for g in rollout.sampled for r in g.rewards):
        detail = "; ".join(f"{fn}: {dict(c.most_common(3))}" for fn, c in reasons.items())
        raise RuntimeError(
            f"step {step}: no completion could be judged by the rewards (every total reward is "
            f"None), so there is nothing to learn from. Reasons: {detail or 'none given'}. "
            "Check the reward functions and the task's reference answers."
        )
    for fn, counter in reasons.items():
        top = ", ".join(f"{why!r} x{n}" for why, n in counter.most_common(3))
        console.print(
            f"[yellow]step {step}: reward {fn} could not judge {sum(counter.values())} completions: {top}"
        )


def sample_records(rollout: Rollout, step: int, k: int) -> list[dict]:
    """The first completion of the first `k` groups, for samples.jsonl."""
    out = []
    for g in rollout.sampled[:k]:
        c = g.completions[0]
        out.append(
            {
                "step": step,
                "question": g.example.question,
                "answer": g.example.answer,
                "completion": (c.text or "")[:SAMPLE_TEXT_CHARS],
                "reward": g.rewards[0],
                "rewards": {fn: v[0] for fn, v in g.by_fn.items()},
                "reasons": {fn: v[0] for fn, v in g.reasons.items() if v[0]},
                "finish_reason": c.finish_reason,
                "length": len(c.token_ids),
                "group_rewards": g.rewards,
            }
        )
    return out
