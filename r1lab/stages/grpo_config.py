"""`r1lab grpo`'s settings: every field with its default and description, the checks that
tie fields together, and which settings a run may resume under new values.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from r1lab.config import StageConfig
from r1lab.model.lora import LoraSettings
from r1lab.model.tokenizer import TemplateName
from r1lab.stages.judging import RewardSpec
from r1lab.stages.task_spec import TaskMixtureList, TaskSpec


class Config(StageConfig):
    """`r1lab grpo`. Defaults are the tiny CPU run (a 0.8M-parameter base, ~5 minutes).

    Step counts are rollouts: one step samples `questions_per_step` x `group_size`
    completions and makes `mu` x `mini_batches` optimizer steps on them. The presets
    r1-zero, dapo and dr-grpo hold the papers' settings for real checkpoints.
    """

    # what to train, on what
    model: str = Field("", description="model folder, hub id, or an earlier stage's run dir")
    tasks: TaskMixtureList = Field(default_factory=lambda: [TaskSpec(name="chain_sum")])
    # prompts: as `r1lab eval` renders them (r1lab.model.tokenizer.render_prompt); the
    # rewards' options follow the template (`chat` and `r1-distill` are judged as r1-chat)
    template: TemplateName = Field(
        "r1-zero", description="r1-zero | r1-chat | plain | chat | r1-distill | a .yaml file"
    )
    system_prompt: str | None = Field(
        None, description="system turn (chat templates) or preamble (plain, r1-zero)"
    )
    instruction: str | None = Field(None, description="appended to every question after a newline")
    rewards: dict[str, RewardSpec] = Field(
        default_factory=lambda: {"accuracy": RewardSpec(), "format": RewardSpec()}
    )
    # rollout
    group_size: int = Field(8, ge=2)
    questions_per_step: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(96, ge=1)
    rollout_batch_size: int = Field(0, ge=0, description="sequences decoded at once; 0 = all")
    dynamic_sampling: bool = False
    max_resample: int = Field(3, ge=0)
    mask_truncated: bool = False
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong penalty; 0 = off")
    overlong_penalty: float = Field(1.0, ge=0)
    # reward model (R1's last RL stage: preference rewards only late in the stage)
    reward_model: str | None = None
    reward_model_weight: float = 1.0
    reward_model_on: Literal["summary", "response"] = "summary"
    reward_model_last_steps: int | None = Field(None, ge=1)
    # optimisation
    steps: int = Field(120, ge=1)
    lr: float = Field(2e-5, gt=0)
    warmup_steps: int = Field(10, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)
    mu: int = Field(1, ge=1, description="inner epochs over each rollout")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per epoch of a rollout")
    micro_batch_size: int = Field(
        0, ge=0, description="sequences per forward; 0 = whole mini-batch"
    )
    packed: bool = Field(
        True,
        description="train on the sequences laid end to end without padding "
        "(r1lab.engine.fast_train); false: left/right-padded batches",
    )
    checkpoint_layers: bool | int | Literal["auto"] = Field(
        True,
        description="GPU: recompute layer activations in the backward (true: every layer, "
        "n: the first n); auto = only as many layers as free memory needs (not yet measured "
        "on a GPU)",
    )
    # objective
    beta: float = Field(0.001, ge=0, description="KL coefficient; 0 skips the reference model")
    eps_low: float = Field(0.2, ge=0)
    eps_high: float | None = Field(None, ge=0)
    ratio_level: Literal["token", "sequence"] = "token"
    aggregation: Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"] = (
        "seq-mean-token-mean"
    )
    lora: LoraSettings | None = None
    norm_length: float | None = Field(None, gt=0)
    adv_scale: Literal["group", "batch", "none"] = "group"
    adv_baseline: Literal["mean", "loo"] = "mean"
    ref_refresh_every: int = Field(
        400, ge=0, description="steps between reference updates; 0 = never"
    )
    # evaluation on held-out questions (the eval stage's protocol)
    eval_every: int = Field(40, ge=0, description="0 = only before and after")
    eval_n: int = Field(200, ge=1)
    eval_k: int = Field(4, ge=1)
    eval_task: TaskSpec | None = None
    eval_template: TemplateName | None = Field(
        None, description="None: template; system_prompt and instruction apply to both"
    )
    eval_temperature: float = Field(0.6, ge=0)
    eval_top_p: float = Field(0.95, gt=0, le=1)
    eval_max_new_tokens: int | None = Field(None, ge=1)
    # logging, checkpoints, limits
    log_samples: int = Field(2, ge=0)
    save_every: int = Field(40, ge=1)
    max_nan_steps: int = Field(3, ge=1)
    max_minutes: float | None = Field(None, gt=0)

    @field_validator("rewards", mode="before")
    @classmethod
    def _reward_weights(cls, value: Any) -> Any:
        """`{name: weight}` or `{name: {weight, options}}`."""
        if isinstance(value, dict):
            return {
                k: {"weight": v} if isinstance(v, (int, float)) else v for k, v in value.items()
            }
        return value

    @field_validator("rewards")
    @classmethod
    def _some_reward(cls, value: dict[str, RewardSpec]) -> dict[str, RewardSpec]:
        if not value:
            raise ValueError("at least one reward function is needed")
        if not any(spec.weight != 0 for spec in value.values()):
            raise ValueError("every reward has weight 0: nothing to learn from")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        batch = self.questions_per_step * self.group_size
        if self.mini_batches > batch:
            raise ValueError(
                f"mini_batches ({self.mini_batches}) cannot exceed questions_per_step * "
                f"group_size ({batch} sequences per rollout)"
            )
        if self.overlong_buffer > self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer ({self.overlong_buffer}) cannot exceed max_new_tokens ({self.max_new_tokens})"
            )
        return self


# Settings that do not change what a run computes: a run may resume under new values.
RESUME_NEUTRAL = {
    "max_minutes", "save_every", "log_samples", "max_nan_steps", "device", "rollout_batch_size",
    "checkpoint_layers",
}  # fmt: skip
