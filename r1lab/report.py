"""The report card: every stage against every held-out set, training curves, one sample each.

Built only from what the stages left in the run directory (eval.json, metrics.jsonl,
DONE, timings.json), so `r1lab report RUN_DIR` rebuilds it at any time.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

from r1lab.findings import check_findings, findings_markdown
from r1lab.model.checkpoint import atomic_write_text
from r1lab.training import read_jsonl

# The columns of the stage-by-stage table, as (label, key in an eval result).
COLUMNS = (
    ("pass@1", "pass@1"),
    ("cons@k", "cons@k"),
    ("format", "format_rate"),
    ("length", "mean_length"),
    ("self-check", "self_check_rate"),
    ("lang. consistency", "language_consistency"),
)


def _versions() -> str:
    import torch

    try:
        import transformers

        tf = transformers.__version__
    except ImportError:
        tf = "not installed"
    from r1lab import __version__

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"r1lab {__version__}, torch {torch.__version__}, transformers {tf}, "
        f"Python {platform.python_version()}; {platform.machine()} CPU with {os.cpu_count()} cores, GPU: {gpu}"
    )


def _eval_sets(result: dict) -> dict[str, dict]:
    """An eval.json holds one result per held-out set under "sets" (or is a single result)."""
    if "sets" in result and isinstance(result["sets"], dict):
        return result["sets"]
    return {result.get("task", "heldout"): result}


def _fmt(value, key: str) -> str:
    if value is None:
        return "–"
    if key == "mean_length":
        return f"{value:.1f}"
    return f"{100 * value:.1f}"


def stage_table(run_dir: Path, stages) -> list[str]:
    """One table per held-out set: a row per stage, as the paper's stage-by-stage table."""
    results: dict[str, dict[str, dict]] = {}
    sets_seen: list[str] = []
    for stage in stages:
        path = run_dir / "eval" / stage.name / "eval.json"
        if path.exists():
            results[stage.name] = _eval_sets(json.loads(path.read_text()))
            sets_seen += [name for name in results[stage.name] if name not in sets_seen]
    if not results:
        return ["_No stage has been evaluated yet._", ""]
    rows: list[str] = []
    for set_name in sets_seen:
        rows += [
            f"### {set_name}",
            "",
            "| stage | template | " + " | ".join(label for label, _ in COLUMNS) + " |",
            "|" + "---|" * (2 + len(COLUMNS)),
        ]
        for stage in stages:
            res = results.get(stage.name, {}).get(set_name)
            if res is None:
                continue
            cells = [stage.name, stage.eval_template or ""] + [
                _fmt(res.get(key), key) for _, key in COLUMNS
            ]
            rows.append("| " + " | ".join(cells) + " |")
        k = next((r[set_name].get("k") for r in results.values() if set_name in r), None)
        rows += [
            "",
            f"n = {next(iter(results.values())).get(set_name, {}).get('n_questions', '?')} questions, "
            f"k = {k} samples each.",
            "",
        ]
    rows += [
        "pass@1 (mean over the k samples), cons@k (majority vote), format, self-check "
        "(answers that verify or revise their work) and language consistency in %; length in tokens. Sampling settings are in each eval.json.",
        "",
    ]
    return rows


# The panels of a GRPO stage's curves: (title, keys tried in order, scale). Accuracy,
# format, length and self-checks over RL steps are the paper's Figures 2 and 3.
CURVES = (
    ("mean reward", ("reward",), 1.0),
    ("accuracy reward", ("rewards/accuracy/mean",), 1.0),
    ("format rate (%)", ("rewards/format/mean", "rewards/chat_format/mean"), 100.0),
    ("mean response length (tokens)", ("completions/mean_length",), 1.0),
    ("self-check rate (%)", ("completions/self_check_rate",), 100.0),
)


def _curve(steps: list[dict], keys: tuple[str, ...], scale: float) -> tuple[list, list]:
    key = next((k for k in keys if any(k in r for r in steps)), None)
    if key is None:
        return [], []
    points = [(r["step"], scale * r[key]) for r in steps if r.get(key) is not None]
    return [x for x, _ in points], [y for _, y in points]


def plot_rl_curves(run_dir: Path, stage_name: str) -> str | None:
    """PNG of reward, accuracy, format, length, self-checks and held-out pass@1 over RL steps."""
    records = read_jsonl(run_dir / stage_name / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4))
    for ax, (title, keys, scale) in zip(axes.flat, CURVES):
        ax.plot(*_curve(steps, keys, scale), lw=1)
        ax.set_title(title)
    evals = [r for r in records if "eval/pass@1" in r]
    pass_axis = axes.flat[len(CURVES)]
    if evals:
        pass_axis.plot(
            [r["step"] for r in evals], [100 * r["eval/pass@1"] for r in evals], marker="o"
        )
    pass_axis.set_title("held-out pass@1 (%)")
    for ax in axes.flat:
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{stage_name} (training rollouts)")
    fig.tight_layout()
    name = f"{stage_name}_curves.png"
    tmp = run_dir / f".{name}.tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(run_dir / name)
    return name


def _sample_of(run_dir: Path, stage_name: str) -> str | None:
    """One sampled response of the stage's evaluation (the first correct one if any)."""
    path = run_dir / "eval" / stage_name / "eval.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    samples = []
    for res in _eval_sets(result).values():
        samples += res.get("samples", [])
    if not samples:
        return None
    best = next((s for s in samples if s.get("correct")), samples[0])
    question = best.get("question", "")
    return f"Q: {question}\n\n{best.get('completion', best.get('text', ''))}"


def write_report(run_dir: str | Path, preset_name: str | None = None) -> Path:
    from r1lab.stage_graph import GRAPH

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    stages = [s for s in GRAPH if (run_dir / s.name).exists()]
    timings = (
        json.loads((run_dir / "timings.json").read_text())
        if (run_dir / "timings.json").exists()
        else {}
    )
    lines = [f"# r1lab report: {run_dir.name}", ""]
    lines += [
        f"- written {time.strftime('%Y-%m-%d %H:%M')}"
        + (f", preset `{preset_name}`" if preset_name else ""),
        f"- {_versions()}",
        "",
    ]

    lines += findings_markdown(check_findings(run_dir))
    lines += ["## Stages against held-out sets", ""]
    lines += stage_table(run_dir, stages)

    lines += [
        "## Stages",
        "",
        "| stage | what | status | train time | eval time | summary |",
        "|---|---|---|---|---|---|",
    ]
    for stage in stages:
        done = run_dir / stage.name / "DONE"
        info = json.loads(done.read_text()) if done.exists() else {}
        t = timings.get(stage.name, {})
        summary = ", ".join(
            f"{k}={_short(v)}"
            for k, v in info.items()
            if k not in ("fingerprint", "finished") and isinstance(v, (int, float, str))
        )[:160]
        lines.append(
            f"| {stage.name} | {stage.notes} | {'done' if done.exists() else 'unfinished'} | "
            f"{t.get('seconds', '–')} s | {t.get('eval_seconds', '–')} s | {summary} |"
        )
    lines.append("")

    curves = [(s.name, plot_rl_curves(run_dir, s.name)) for s in stages if s.kind == "grpo"]
    if any(png for _, png in curves):
        lines += ["## RL training curves", ""]
        for name, png in curves:
            if png:
                lines += [f"### {name}", "", f"![{name}]({png})", ""]

    lines += ["## One sampled response per stage", ""]
    for stage in stages:
        sample = _sample_of(run_dir, stage.name)
        if sample:
            lines += [f"### {stage.name}", "", "```", sample.strip(), "```", ""]

    lines += ["## Configs", "", "Each stage's full config is in `<run>/<stage>/config.yaml`.", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
