"""The rollout half of GRPO: draw questions, sample a group of answers each, score them.

Kept apart from `grpo.py` so that the stage file holds the loop. Sampling and scoring are
`r1lab.stages.judging`'s, the same path the eval and rejection stages take.
Everything is reproducible from (seed, step): a resumed run draws and samples exactly
what the uninterrupted run would have.

Under torchrun (docs/distributed.md) rank r of W draws the same questions as one process
and keeps its contiguous share (a group never straddles ranks), samples and scores them
where it is, and `step_batch` hands every rank the whole step's sequences for the
update. Each question's completions are drawn with its own key, (seed, step, round, the
question's index in the round's draw) (`r1lab.engine.sampling`), so a question gets the
same completions on any number of ranks and in any batch: N ranks sample exactly what
one process samples (tests/test_distributed.py). With dynamic sampling, every rank
learns after each round how many groups all ranks kept, so every refill round draws the
one-process questions too, and the gathered batch is put in one process's order,
(round, index).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from r1lab import distributed
from r1lab.engine.generate import Completion, SamplingParams
from r1lab.engine.grpo_update import TrainBatch, train_batch
from r1lab.engine.sampling import sample_key
from r1lab.metrics import is_self_check
from r1lab.model.tokenizer import PromptTemplate
from r1lab.rewards.base import RewardError
from r1lab.rewards.combine import CombinedRewards
from r1lab.rl import zero_variance_groups
from r1lab.stages.judging import (
    RewardSet,
    join_scores,
    sample_questions,
    score_completions,
)
from r1lab.tasks.base import Example, Task
from r1lab.training import console

SAMPLE_TEXT_CHARS = 1500  # longest completion text kept in samples.jsonl
ZERO_STD_WARN_FRAC = 0.5  # warn when more of the groups than this carry no signal
ZERO_STD_WARN_EVERY = 25  # steps between two such warnings


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
            task = spec.task()
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
    # (round, index in that round's draw): one process's order of a step's groups, which
    # the batch gathered from N ranks is sorted back into
    order: tuple[int, int] = (0, 0)

    @property
    def has_signal(self) -> bool:
        """At least two judged rewards that differ: the group has a non-zero advantage."""
        return not bool(zero_variance_groups(self.rewards, len(self.rewards))[0])

    @property
    def reward_std(self) -> float:
        """Sample std of the judged rewards (0 without a spread), as the advantage uses."""
        if not self.has_signal:
            return 0.0
        judged = [r for r in self.rewards if r is not None]
        mean = sum(judged) / len(judged)
        return math.sqrt(sum((r - mean) ** 2 for r in judged) / (len(judged) - 1))


@dataclass
class Rollout:
    """The groups to train on, plus every group sampled (dynamic sampling drops some)."""

    groups: list[Group]
    sampled: list[Group]
    scores: CombinedRewards  # of every completion of `sampled`, in order
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
    template: str | PromptTemplate,
    params: SamplingParams,
    max_batch_size: int | None = None,
    warn_context: bool = False,
    keys: list[int] | None = None,
) -> tuple[list[Group], list[Completion]]:
    """Render each question with the template and sample `params.n` completions of it
    (drawn with the question's key in `keys`: `r1lab.engine.sampling`)."""
    prompts, prompt_ids, completions = sample_questions(
        model,
        tokenizer,
        template,
        [ex for _, ex in drawn],
        params,
        max_batch_size=max_batch_size,
        warn_context=warn_context,
        keys=keys,
    )
    g = params.n
    groups = [
        Group(task, ex, prompts[i], prompt_ids[i], completions[i * g : (i + 1) * g])
        for i, (task, ex) in enumerate(drawn)
    ]
    return groups, completions


def score_groups(
    groups: list[Group], completions: list[Completion], rewards: RewardSet
) -> CombinedRewards:
    """Score the groups' completions in one call per reward function; each group keeps its part."""
    scores = score_completions(
        rewards,
        [g.prompt for g in groups],
        [g.example for g in groups],
        [g.task for g in groups],
        completions,
    )
    start = 0
    for g in groups:
        end = start + len(g.completions)
        g.rewards = scores.total[start:end]
        g.by_fn = {k: v[start:end] for k, v in scores.scores.items()}
        g.reasons = {k: v[start:end] for k, v in scores.reasons.items()}
        start = end
    return scores


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
    template: str | PromptTemplate,
    sampling: dict,
    dynamic_sampling: bool = False,
    max_resample: int = 0,
    max_batch_size: int | None = None,
    rank: int = 0,
    world: int = 1,
    warn_context: bool = False,
) -> Rollout:
    """Sample and score `questions` groups for `step` (this rank's share of them).

    With `dynamic_sampling` (DAPO), groups whose rewards are all equal carry no gradient
    and are dropped; fresh questions are drawn and sampled, at most `max_resample` more
    rounds, until `questions` groups with a signal are found. The batch may end up
    smaller than `questions` when the rounds run out. `warn_context`: report prompts
    beyond the model's context (GRPO asks on the first step of a process).

    Every round draws the questions one process draws (`need` of them, the same on every
    rank) and rank r samples its contiguous share; the ranks then tell each other what
    they kept, so all of them know the next round's `need` and make the same collective
    calls, a rank whose share is empty included.
    """
    params = SamplingParams(n=group_size, **sampling)
    kept: list[Group] = []
    sampled: list[Group] = []
    scores: list[CombinedRewards] = []
    everyone_kept: list[tuple[int, int]] = []  # (round, index) of every rank's kept groups
    sample_s = score_s = 0.0
    rounds = 0
    for round_ in range(1 + (max_resample if dynamic_sampling else 0)):
        need = questions - len(everyone_kept)
        if need <= 0:
            break
        rounds += 1
        share = distributed.shard_of(need, rank, world)
        drawn = mixture.draw(need, step, round_)[share.start : share.stop]
        groups: list[Group] = []
        if drawn:  # a refill smaller than the world leaves some ranks without questions
            t0 = time.perf_counter()
            # a question's samples depend on (seed, step, round, index) only, not on the rank
            keys = [sample_key(seed, "grpo", step, round_, i) for i in share]
            groups, completions = sample_groups(
                model,
                tokenizer,
                drawn,
                template,
                params,
                max_batch_size,
                warn_context and not round_,
                keys=keys,
            )
            t1 = time.perf_counter()
            scores.append(score_groups(groups, completions, rewards))
            sample_s += t1 - t0
            score_s += time.perf_counter() - t1
            for g, i in zip(groups, share, strict=True):
                g.order = (round_, i)
        sampled += groups
        mine = [g for g in groups if g.has_signal] if dynamic_sampling else groups
        kept += mine
        everyone_kept += kept_by_all(mine, need, round_, dynamic_sampling)
    # a round draws only what is still needed, so all ranks together keep at most
    # `questions` groups: one process's kept[:questions] with nothing to cut
    return Rollout(kept, sampled, join_scores(scores), rounds, sample_s, score_s)


def kept_by_all(
    mine: list[Group], need: int, round_: int, dynamic_sampling: bool
) -> list[tuple[int, int]]:
    """The (round, index) of the groups all ranks kept in this round, in index order.

    Without dynamic sampling every group is kept, which every rank knows without asking:
    the step then makes no collective call of its own here.
    """
    if not dynamic_sampling:
        return [(round_, i) for i in range(need)]
    # rank order is index order: each rank holds a contiguous share of the round's draw
    return [o for part in distributed.all_gather_objects([g.order for g in mine]) for o in part]


def step_batch(groups: Sequence[Group], **advantage_options) -> TrainBatch | None:
    """The step's sequences from every rank's groups, in one process's order, with their
    advantages (`train_batch`'s options: group_size, adv_scale, adv_baseline, mask_truncated).

    The ranks' groups are gathered first (prompt and completion tokens, log-probs, rewards)
    and sorted by (round, index); rank by rank is one process's order only when every rank
    kept groups of a single round. Advantages are computed on the whole step's groups, as
    one process computes them, so `adv_scale: batch` takes the std over every rank's groups.
    """
    if distributed.world_size() > 1:
        mine = [_Gathered(g.order, g.prompt_ids, g.completions, g.rewards) for g in groups]
        everyone = [x for part in distributed.all_gather_objects(mine) for x in part]
        groups = sorted(everyone, key=lambda g: g.order)
    return train_batch(groups, **advantage_options) if groups else None


@dataclass
class _Gathered:
    """What the update needs of a group, sent between ranks (not its task or example)."""

    order: tuple[int, int]
    prompt_ids: list[int]
    completions: list[Completion]
    rewards: list[float | None]


SUMMED_METRICS = {"rollout/tokens_per_s", "dynamic_sampling/kept_groups"}


def merge_metrics(record: dict[str, Any], groups: int) -> dict[str, Any]:
    """Rollout metrics of all ranks: sums of rates and counts, group-weighted means else."""
    everyone = distributed.all_gather_objects((record, groups))
    if len(everyone) == 1:
        return record
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r, _ in everyone for k in r):
        values = [(r[key], w) for r, w in everyone if isinstance(r.get(key), (int, float))]
        if not values:
            out[key] = record.get(key)
        elif key in SUMMED_METRICS:
            out[key] = sum(v for v, _ in values)
        elif key == "dynamic_sampling/rounds":
            out[key] = max(v for v, _ in values)
        else:
            out[key] = sum(v * w for v, w in values) / max(sum(w for _, w in values), 1)
    return out


# ---- what a rollout says ------------------------------------------------------------------
def rollout_metrics(rollout: Rollout, dynamic_sampling: bool = False) -> dict[str, Any]:
    """Reward, length and signal statistics over every group sampled this step."""
    groups = rollout.sampled
    out: dict[str, Any] = rollout.scores.metrics()
    out["reward_std"] = sum(g.reward_std for g in groups) / len(groups)
    zero_std = zero_variance_groups(rollout.scores.total, len(groups[0].completions))
    out["frac_reward_zero_std"] = int(zero_std.sum()) / len(groups)
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


def check_judged(rollout: Rollout, step: int) -> None:
    """Stop on a step where nothing could be judged; say loudly when some of it was not."""
    reasons = {fn: c for fn, c in rollout.scores.none_reasons.items() if c}
    if all(r is None for r in rollout.scores.total):
        n = len(rollout.scores.total)
        silent = [fn for fn, v in rollout.scores.scores.items() if all(x is None for x in v)]
        detail = "; ".join(f"{fn}: {dict(c.most_common(3))}" for fn, c in reasons.items())
        raise RewardError(
            f"step {step}: no completion could be judged: reward "
            f"{' and '.join(silent) or '?'} returned None for all {n} completions (reasons: "
            f"{detail or 'none given'}); check that reward function and the task's answers"
        )
    for fn, counter in reasons.items():
        top = ", ".join(f"{why!r} x{n}" for why, n in counter.most_common(3))
        console.print(
            f"[yellow]step {step}: reward {fn} could not judge {sum(counter.values())} completions: {top}"
        )


def sample_records(rollout: Rollout, step: int, k: int) -> list[dict]:
    """The first completion of the first `k` groups, for samples.jsonl (with the prompt as
    the model was given it)."""
    out = []
    for g in rollout.sampled[:k]:
        c = g.completions[0]
        out.append(
            {
                "step": step,
                "question": g.example.question,
                "prompt": g.prompt,
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


# ---- signal and console ------------------------------------------------------------------------
def warn_zero_variance(frac: float, step: int, last_warned: int | None) -> int | None:
    """A loud warning when most groups have no reward spread (no learning signal)."""
    if frac <= ZERO_STD_WARN_FRAC or (
        last_warned is not None and step - last_warned < ZERO_STD_WARN_EVERY
    ):
        return last_warned
    message = (
        f"step {step}: {100 * frac:.0f}% of the groups have zero reward variance (all "
        "completions of a question scored the same), so their advantages are 0 and they "
        "teach nothing. Look at samples.jsonl: are the rewards right? If the questions are "
        "all too easy or too hard, change the task mix, or raise group_size or temperature, "
        "or set dynamic_sampling=true."
    )
    console.print(f"[bold red]WARNING: {message}")
    return step


def console_line(step: int, total: int, m: dict[str, Any]) -> str:
    fns = " ".join(
        f"{k.split('/')[1]} {m[k]:.2f}"
        for k in m
        if k.startswith("rewards/") and k.endswith("/mean")
    )
    return (
        f"step {step}/{total} reward {m['reward']:.3f} ({fns}) zero-std {m['frac_reward_zero_std']:.2f} "
        f"len {m['completions/mean_length']:.0f} kl {m['kl']:.2e} ent {m['entropy']:.2f} "
        f"gn {m['grad_norm']:.2f} lr {m['learning_rate']:.1e} {m['step_time']:.1f}s"
    )
