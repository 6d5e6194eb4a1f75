"""The stage graph of `r1lab run`, as data: which stage reads which.

The graph, as the paper describes it (R1_RECIPE.md):

    base ──> r1-zero                          (pure RL from the base: R1-Zero)
      ├────> cold-start ──> reasoning-rl ──> rejection ─┐
      │                                                 v
      ├──────────────────────────────────────────> rejection-sft ──> general-rl
      ├────> reward-model ──────────────────────────────────────────────┘
    student-base ──> student-rl               (RL directly on the small model)
      └────────────> distill <── distill-data <── general-rl   (SFT on the final model's samples)

`r1lab.pipeline` runs it; `r1lab.report` reads the run dirs it names.
"""

from __future__ import annotations

from dataclasses import dataclass

# The stage commands: `r1lab COMMAND` -> (module in r1lab.stages, preset section, one-line
# help). The CLI builds its subcommands from it; the pipeline launches a stage under
# torchrun through the command that runs its module.
STAGE_COMMANDS = {
    "pretrain": (
        "pretrain",
        "pretrain",
        "train a from-scratch decoder and its tokenizer on the procedural corpus",
    ),
    "sft": (
        "sft",
        "sft",
        "supervised fine-tuning (cold start, rejection-sampling SFT, distillation)",
    ),
    "grpo": (
        "grpo",
        "grpo",
        "GRPO reinforcement learning with rule rewards (R1-Zero and later RL stages)",
    ),
    "eval": ("evaluate", "eval", "the paper's evaluation: k samples per question, pass@1, cons@k"),
    "rejection-sample": (
        "rejection",
        "rejection",
        "sample, keep correct and readable responses, write SFT data",
    ),
    "reward-model": (
        "reward_model",
        "reward_model",
        "train a Bradley-Terry reward model on preference pairs",
    ),
}


@dataclass(frozen=True)
class Stage:
    name: str  # directory name under the run dir
    kind: str  # module in r1lab.stages
    model_from: str | None = None  # stage whose model this one starts from
    data_from: tuple[str, ...] = ()  # stages whose sample files this one trains on
    reward_model_from: str | None = None  # stage whose reward model this one uses
    eval_template: str | None = None  # template to evaluate with (None: not evaluated)
    notes: str = ""


GRAPH: tuple[Stage, ...] = (
    Stage(
        "base",
        "pretrain",
        eval_template="r1-zero",
        notes="pretrained from scratch (or a given checkpoint)",
    ),
    Stage(
        "r1-zero",
        "grpo",
        model_from="base",
        eval_template="r1-zero",
        notes="GRPO from base, rule rewards",
    ),
    Stage(
        "cold-start",
        "sft",
        model_from="base",
        eval_template="r1-chat",
        notes="SFT on readable long CoT",
    ),
    Stage(
        "reasoning-rl",
        "grpo",
        model_from="cold-start",
        eval_template="r1-chat",
        notes="GRPO + language-consistency reward",
    ),
    Stage("rejection", "rejection", model_from="reasoning-rl", notes="correct, readable samples"),
    Stage(
        "rejection-sft",
        "sft",
        model_from="base",
        data_from=("rejection",),
        eval_template="r1-chat",
        notes="SFT from base on rejection samples + non-reasoning data",
    ),
    Stage(
        "reward-model", "reward_model", model_from="base", notes="Bradley-Terry preference model"
    ),
    Stage(
        "general-rl",
        "grpo",
        model_from="rejection-sft",
        reward_model_from="reward-model",
        eval_template="r1-chat",
        notes="rule rewards + reward model late in the stage",
    ),
    Stage(
        "student-base", "pretrain", eval_template="r1-zero", notes="the smaller model's own base"
    ),
    Stage("distill-data", "rejection", model_from="general-rl", notes="the final model's samples"),
    Stage(
        "distill",
        "sft",
        model_from="student-base",
        data_from=("distill-data",),
        eval_template="r1-chat",
        notes="student SFT on the final model's samples",
    ),
    Stage(
        "student-rl",
        "grpo",
        model_from="student-base",
        eval_template="r1-zero",
        notes="GRPO on the student base, same budget",
    ),
)
STAGE_NAMES = tuple(s.name for s in GRAPH)


def stage_inputs(stage: Stage) -> list[str]:
    """The stages whose run dirs `stage` reads."""
    names = [stage.model_from, *stage.data_from, stage.reward_model_from]
    return [n for n in names if n]
