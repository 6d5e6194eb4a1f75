"""How often a stage's held-out samples reason inside `<think>`, from a run dir's eval samples.

    python benchmarks/findings/leak.py RUN_DIR [RUN_DIR ...]

A think block counts as reasoning when it holds a computation (an `=`), the same rule the
corpus test applies to the base's documents (tests/test_tasks_procedural.py). Prints, per
run and stage: pass@1, the share of samples that reason in `<think>`, the self-check rate
(`metrics.is_self_check`) and the mean completion length in characters.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from r1lab.metrics import is_self_check

THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.S)


def reasons_in_think(completion: str) -> bool:
    block = THINK.search(completion)
    return bool(block and "=" in block.group(1))


def stage_figures(samples: Path) -> dict[str, float]:
    rows = [json.loads(line) for line in samples.open(encoding="utf-8")]
    texts = [row["completion"] for row in rows]
    return {
        "samples": len(rows),
        "pass@1": sum(bool(row["correct"]) for row in rows) / len(rows),
        "reasoning in <think>": sum(map(reasons_in_think, texts)) / len(rows),
        "self-check": sum(map(is_self_check, texts)) / len(rows),
        "chars": sum(map(len, texts)) / len(rows),
    }


def main(run_dirs: list[str]) -> None:
    for run_dir in run_dirs:
        for samples in sorted(Path(run_dir).glob("eval/*/samples.jsonl")):
            figures = stage_figures(samples)
            shown = ", ".join(
                f"{k} {v:.0f}" if k in ("samples", "chars") else f"{k} {100 * v:.2f}%"
                for k, v in figures.items()
            )
            print(f"{run_dir} {samples.parent.name}: {shown}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
