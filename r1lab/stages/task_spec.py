"""One task spec for every stage that draws questions: GRPO's mixture, eval sets, rejection.

A spec names a task and carries the task's own options. Both shapes the presets use are
accepted, and mean the same:

    {name: chain_sum, options: {zh_fraction: 0.3}}
    {name: chain_sum, zh_fraction: 0.3}

A user's file is an option like any other: `{name: math500, path: data/math500.jsonl}`.
`weight` is read by GRPO's mixture; `n`, `split`, `seed` and `label` by the eval and
rejection stages (the held-out set's size, split, seed and name in reports).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_serializer,
    model_validator,
)

from r1lab.config import ConfigError
from r1lab.tasks import Example, Task, get_task, task_names


class TaskSpec(BaseModel):
    """A task by name, its options, and how many of its questions to use."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    weight: float = Field(1.0, gt=0)
    options: dict[str, Any] = Field(default_factory=dict)
    n: int | None = Field(None, ge=1)
    split: str | None = None
    seed: int | None = None
    label: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _gather_options(cls, value: Any) -> Any:
        """A bare name is `{name}`; keys that are not fields are the task's options."""
        if isinstance(value, str):
            return {"name": value}
        if not isinstance(value, dict):
            return value
        if not isinstance(value.get("name"), str):
            raise ValueError(f"task spec {value!r}: expected a task name or a mapping with 'name'")
        spread = {k: v for k, v in value.items() if k not in cls.model_fields}
        if not spread:
            return value
        given = value.get("options") or {}
        if not isinstance(given, dict):
            return value  # field validation reports the bad type
        both = sorted(set(spread) & set(given))
        if both:
            raise ValueError(
                f"task {value['name']!r}: {both} given both inside and outside 'options'"
            )
        kept = {k: v for k, v in value.items() if k in cls.model_fields}
        return {**kept, "options": {**given, **spread}}

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        # Unset eval fields stay out of config.yaml, so GRPO's saved configs (name, weight,
        # options) read the same as before these fields existed and old runs still resume.
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in _EVAL_FIELDS}

    @property
    def title(self) -> str:
        """The set's name in results: `label`, else the task name."""
        return self.label or self.name

    def check_known(self) -> TaskSpec:
        """Raise ValueError for a task name nobody registered (listing the known ones)."""
        known = task_names()
        if self.name not in known:
            raise ValueError(f"unknown task {self.name!r}; known tasks: {', '.join(known)}")
        return self

    def task(self) -> Task:
        return get_task(self.name, **self.options)


_EVAL_FIELDS = ("n", "split", "seed", "label")


def parse_task_spec(spec: str | dict | TaskSpec) -> TaskSpec:
    """A known task's `TaskSpec` from a config entry (ValueError otherwise)."""
    if isinstance(spec, TaskSpec):
        return spec.check_known()
    try:
        return TaskSpec.model_validate(spec).check_known()
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        errors = getattr(err, "errors", None)
        if callable(errors):
            detail = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg'].removeprefix('Value error, ')}"
                for e in errors()
            )
            raise ValueError(f"task spec {spec!r}: {detail}") from None
        raise


def check_task_list(specs: list) -> list:
    """At least one spec, each naming a known task (ValueError otherwise); returned as
    written, so config.yaml and the fingerprint show the specs the way the user gave them."""
    if not specs:
        raise ValueError("at least one task is needed")
    for spec in specs:
        parse_task_spec(spec)
    return specs


# The eval and rejection stages' `tasks` setting: task names or spec mappings, as written.
TaskList = Annotated[list[str | dict[str, Any]], AfterValidator(check_task_list)]


def mixture_entries(value: Any) -> Any:
    """A training mixture's specs as a list: also `{name: weight}`, a bare name, and a list
    whose entries are names or spec mappings."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        return [{"name": k, "weight": w} for k, w in value.items()]
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


def check_mixture(specs: list[TaskSpec]) -> list[TaskSpec]:
    if not specs:
        raise ValueError("at least one task is needed")
    return specs


# GRPO's `tasks` setting: the training mixture, each task drawn by its `weight`.
TaskMixtureList = Annotated[
    list[TaskSpec], BeforeValidator(mixture_entries), AfterValidator(check_mixture)
]


def load_task_examples(
    spec: str | dict | TaskSpec, n: int | None = None, split: str = "test", seed: int = 0
) -> tuple[TaskSpec, Task, list[Example]]:
    """The task and its examples; the spec's own n/split/seed win over the arguments."""
    spec = parse_task_spec(spec)
    try:
        task = spec.task()
    except TypeError as err:
        raise ConfigError(f"task {spec.name!r}: bad options {spec.options} ({err})") from err
    examples = task.examples(
        spec.split or split,
        spec.n if spec.n is not None else n,
        spec.seed if spec.seed is not None else seed,
    )
    if not examples:
        raise ConfigError(f"task {spec.title!r} gave no examples (split {spec.split or split!r})")
    return spec, task, examples
