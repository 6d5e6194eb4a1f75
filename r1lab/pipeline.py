"""`r1lab run`: the DeepSeek-R1 stage graph, each stage in its own run directory.

The graph (which stage reads which) is `r1lab.stage_graph`; this module runs it.

Stages meet only through their directories: a stage's config names the directories of the
stages it reads. A finished stage leaves `DONE` with the fingerprint of its config, so a
rerun skips it; a killed stage resumes from its own checkpoint. Every stage that yields a
model is evaluated with the same protocol on the same held-out sets, in `<run>/eval/<stage>`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import multiprocessing
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from r1lab.config import ConfigError, build_config, load_preset, parse_overrides, whole_values
from r1lab.rundir import (
    check_out_dir,
    decide_reuse,
    remove_run_dir,
    resume_neutral,
    run_dir_lock,
)
from r1lab.stage_graph import GRAPH, STAGE_COMMANDS, STAGE_NAMES, Stage, stage_inputs
from r1lab.training import console, is_done

STATUS_EVERY_S = 30.0  # with stages in parallel: seconds between two status lines
# Stage kinds that `r1lab run --nproc N` starts under torchrun (docs/distributed.md): all.
DISTRIBUTED_KINDS = ("pretrain", "sft", "grpo", "evaluate", "rejection", "reward_model")


@dataclass
class StageRecord:
    name: str
    status: str = "pending"  # pending | done | skipped (already done) | failed
    started: float = 0.0  # wall-clock start (time.time())
    seconds: float = 0.0
    eval_seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def stage_module(kind: str):
    return importlib.import_module(f"r1lab.stages.{kind}")


def _upstream_sample_file(stage_dir: Path) -> str:
    """The jsonl a rejection-sampling stage wrote (its summary names it)."""
    done = json.loads((stage_dir / "DONE").read_text())
    path = done.get("output") or done.get("samples_path") or str(stage_dir / "samples.jsonl")
    return str(path)


def stage_config(stage: Stage, run_dir: Path, preset: dict, overrides: dict, check_only=False):
    """The config of one stage: its preset section, wired to its inputs, then overrides.

    `check_only`: validate before anything ran, with the data of upstream stages that have
    not run yet standing in by name."""
    module = stage_module(stage.kind)
    section = whole_values(preset.get(stage.name, {}))
    wiring: dict = {}
    if stage.model_from:
        wiring["model"] = str(run_dir / stage.model_from)
    if stage.data_from:
        own = section.get("data", [])
        if check_only:  # upstream stages have not run yet: their sample files stand in by name
            files = [str(run_dir / d / "samples.jsonl") for d in stage.data_from]
        else:
            files = [_upstream_sample_file(run_dir / d) for d in stage.data_from]
            empty = [p for p in files if not Path(p).read_text().strip()]
            for path in empty:
                console.print(
                    f"[yellow]{stage.name}: {path} holds no samples; training on the other sources"
                )
            files = [p for p in files if p not in empty]
        wiring["data"] = list(own) + files
    if stage.reward_model_from:
        wiring["reward_model"] = str(run_dir / stage.reward_model_from)
    return build_config(
        module.Config,
        section,
        wiring,
        overrides.get(stage.name, {}),
        source=f"pipeline stage {stage.name!r}",
    )


def eval_config(stage: Stage, run_dir: Path, preset: dict, overrides: dict):
    module = stage_module("evaluate")
    section = {
        **whole_values(preset.get("eval", {})),
        "model": str(run_dir / stage.name),
        "template": stage.eval_template,
    }
    return build_config(module.Config, section, overrides.get("eval", {}), source="pipeline eval")


def check_configs(selected: list[Stage], run_dir: Path, preset: dict, parsed: dict) -> None:
    """Build every selected stage's config (and its evaluation's) before the first stage
    runs, so a typo in the last stage's settings fails in a second, not after the others."""
    skip_eval = bool(preset.get("pipeline", {}).get("skip_eval", False))
    for stage in selected:
        stage_config(stage, run_dir, preset, parsed, check_only=True)
        if stage.eval_template and not skip_eval:
            eval_config(stage, run_dir, preset, parsed)


def _select(only: str | None, from_stage: str | None) -> list[Stage]:
    for name in (only, from_stage):
        if name is not None and name not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
    if only:
        return [s for s in GRAPH if s.name == only]
    if from_stage:
        return list(GRAPH[STAGE_NAMES.index(from_stage) :])
    return list(GRAPH)


def _spread_seed(overrides: dict) -> dict:
    """`seed=N` on the command line seeds every stage and every evaluation's sampling.

    A stage section's own `STAGE.seed=M` still wins for that stage. The evaluation draws
    its held-out questions with this seed too (unless a task spec pins its own `seed`), so
    each seed is scored on its own sample of the test split.
    """
    if "seed" not in overrides:
        return overrides
    seed = overrides.pop("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    for name in (*STAGE_NAMES, "eval"):
        section = overrides.setdefault(name, {})
        if isinstance(section, dict):
            section.setdefault("seed", seed)
    return overrides


def _check_overrides(overrides: dict) -> None:
    known = set(STAGE_NAMES) | {"eval"}
    for key, value in overrides.items():
        if key not in known or not isinstance(value, dict):
            raise ConfigError(
                f"pipeline override {key!r}: write seed=N, or STAGE.key=value with STAGE one of {', '.join(sorted(known))}"
            )


def run_pipeline(
    preset_name: str = "tiny",
    out: str | None = None,
    *,
    only: str | None = None,
    from_stage: str | None = None,
    overrides: list[str] | None = None,
    jobs: int | None = None,
    nproc: int = 1,
) -> Path:
    """Run (or resume) the stage graph of `preset_name` in `out`; returns the report path.

    `jobs` stages run at once where the graph allows (default: the preset's
    `pipeline.jobs`, else 2 when the machine has 2 cores or more). Every stage trains on
    one CPU thread, so on a 2-core machine the student branch (student-base, student-rl)
    and the side stages (r1-zero, reward-model) run beside the main line instead of after
    it. With more than one job each stage runs in its own process and writes its console
    output to `<run>/logs/<stage>.log`; `jobs=1` runs them in this process, in order.

    `nproc` > 1: every stage of `DISTRIBUTED_KINDS` and every evaluation runs on that many
    processes under torchrun, launched as `r1lab STAGE --nproc N` launches it, one stage
    at a time (each stage has all the processes; `jobs` is then 1).
    """
    preset = load_preset(preset_name)
    if not set(preset) & set(STAGE_NAMES):
        raise ConfigError(
            f"preset {preset_name!r} has no pipeline stage sections (it has: {', '.join(preset) or 'nothing'}); "
            f"a pipeline preset names stages among {', '.join(STAGE_NAMES)}"
        )
    parsed = _spread_seed(parse_overrides(overrides or []))
    _check_overrides(parsed)
    selected = _select(only, from_stage)
    check_configs(selected, Path(out or f"runs/{preset_name}").resolve(), preset, parsed)
    run_dir = check_out_dir(out if out is not None else f"runs/{preset_name}").resolve()
    with run_dir_lock(run_dir):
        return _run_locked(preset_name, preset, run_dir, selected, from_stage, parsed, jobs, nproc)


def _run_locked(preset_name, preset, run_dir, selected, from_stage, parsed, jobs, nproc) -> Path:
    if from_stage:
        # Rerun from this stage on: its directory and every later one start afresh.
        for stage in selected:
            for d in (run_dir / stage.name, run_dir / "eval" / stage.name):
                remove_run_dir(d)

    settings = preset.get("pipeline", {})
    skip_eval = bool(settings.get("skip_eval", False))
    if jobs is None:
        jobs = int(settings.get("jobs", min(2, os.cpu_count() or 1)))
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if nproc < 1:
        raise ConfigError(f"nproc must be at least 1, got {nproc}")
    if nproc > 1:
        jobs = 1  # a stage on N processes has them all
    started = time.time()
    job = (preset_name, str(run_dir), parsed, skip_eval, nproc)
    from r1lab.report import write_report

    try:
        if jobs == 1 or len(selected) == 1:
            for index, stage in enumerate(selected, 1):
                console.rule(
                    f"[bold]stage {index}/{len(selected)}: {stage.name}[/] ({stage.notes}) — "
                    f"elapsed {_fmt(time.time() - started)}{_eta(run_dir, selected[index - 1 :])}"
                )
                _write_timings(run_dir, run_stage(stage.name, *job))
        else:
            _run_in_parallel(selected, job, jobs, run_dir, started)
    except Exception:
        # what did finish is still worth a report; the error then says what did not
        with contextlib.suppress(Exception):
            partial = write_report(run_dir, preset_name=preset_name)
            console.print(f"[yellow]report of the finished stages: {partial}")
        raise

    report = write_report(run_dir, preset_name=preset_name)
    console.rule(f"[bold green]pipeline finished in {_fmt(time.time() - started)}: {report}")
    return report


def run_stage(
    name: str, preset_name: str, run_dir: str, parsed: dict, skip_eval: bool, nproc: int = 1
) -> StageRecord:
    """One stage and its evaluation: skipped when done with these settings, else (re)run
    (on `nproc` processes under torchrun when it can: `launch_stage`)."""
    stage = next(s for s in GRAPH if s.name == name)
    run_dir = Path(run_dir)
    preset = load_preset(preset_name)
    record = StageRecord(stage.name, started=time.time())
    cfg = stage_config(stage, run_dir, preset, parsed)
    stage_dir = run_dir / stage.name
    module = stage_module(stage.kind)
    inputs = [run_dir / n for n in stage_inputs(stage)]
    stage_dir.mkdir(parents=True, exist_ok=True)
    with run_dir_lock(stage_dir):
        reuse = decide_reuse(stage_dir, cfg, resume_neutral(module), inputs)
        if reuse.action == "restart":
            console.print(f"[yellow]{stage.name}: {reuse.reason}; running it again")
        if reuse.wipe:
            remove_run_dir(stage_dir, keep_lock=True)
        record.status = "skipped" if reuse.action == "reuse" else "done"
        eval_dir = run_dir / "eval" / stage.name
        if record.status == "done":
            remove_run_dir(eval_dir)  # a model trained anew is evaluated anew
        torchrun = nproc > 1 and stage.kind in DISTRIBUTED_KINDS and record.status == "done"
        if not torchrun:
            module.run(cfg, stage_dir, resume=reuse.resume)
    if torchrun:  # its rank 0 takes the stage dir's lock; the run dir's stays held here
        launch_stage(stage.kind, cfg, stage_dir, reuse.resume, nproc)
    record.seconds = time.time() - record.started
    if stage.eval_template and not skip_eval:
        t1 = time.time()
        ecfg = eval_config(stage, run_dir, preset, parsed)
        if nproc > 1 and not is_done(eval_dir, ecfg.fingerprint()):
            launch_stage("evaluate", ecfg, eval_dir, True, nproc)
        else:
            stage_module("evaluate").run(ecfg, eval_dir, resume=True)
        record.eval_seconds = time.time() - t1
    return record


def launch_stage(kind: str, cfg, out: Path, resume: bool, nproc: int) -> None:
    """Run a stage module on `nproc` processes: `r1lab STAGE --nproc N` with `cfg` written
    as a preset file, through the same torchrun launcher the command uses."""
    import subprocess
    import tempfile

    import yaml

    from r1lab.distributed import DistributedError, torchrun_command

    command, section = next((c, s) for c, (mod, s, _) in STAGE_COMMANDS.items() if mod == kind)
    with tempfile.TemporaryDirectory(prefix="r1lab-stage-") as tmp:
        preset = Path(tmp) / f"{section}.yaml"
        # loggers are no setting of the dump (config.yaml, fingerprint), but of the run
        settings = {**cfg.model_dump(mode="json"), "loggers": list(cfg.loggers)}
        preset.write_text(yaml.safe_dump({section: settings}))
        argv = [command, "--nproc", str(nproc), "--preset", str(preset), "--out", str(out)]
        code = subprocess.call(torchrun_command([*argv, "--resume" if resume else "--no-resume"]))
    if code != 0:
        raise DistributedError(
            f"{command} in {out} on {nproc} processes ended with exit code {code} (its "
            "ranks' errors are above); rerun the pipeline to resume it"
        )


def _run_in_parallel(selected: list[Stage], job: tuple, jobs: int, run_dir: Path, started: float):
    """Start every stage whose inputs are finished, up to `jobs` at once, longest path first.

    A stage's inputs that are not part of this run (`--only`, `--from`) must already be on
    disk, as in the sequential order. If a stage fails, the running ones finish, nothing new
    starts, and the first error is raised.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    names = {s.name for s in selected}
    pending = list(selected)
    finished: set[str] = set()
    priority = _path_lengths(run_dir)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    running: dict = {}
    error: BaseException | None = None
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
        while pending or running:
            ready = [
                s for s in pending if all(n in finished or n not in names for n in stage_inputs(s))
            ]
            ready.sort(key=lambda s: -priority.get(s.name, 0.0))
            while ready and len(running) < jobs and error is None:
                stage = ready.pop(0)
                pending.remove(stage)
                log = logs / f"{stage.name}.log"
                running[pool.submit(_logged_stage, stage.name, job, str(log))] = stage
                left = [s.name for s in pending + list(running.values())]
                eta = _parallel_eta(run_dir, left, priority)
                console.print(
                    f"[bold]start {stage.name}[/] ({stage.notes}) — elapsed "
                    f"{_fmt(time.time() - started)}{eta}; log: {log}"
                )
            if not running:
                break
            done, _ = wait(list(running), timeout=STATUS_EVERY_S, return_when=FIRST_COMPLETED)
            if not done:  # a heartbeat: what each running stage last said in its log
                for stage in running.values():
                    console.print(
                        f"  {stage.name}: {_last_line(logs / f'{stage.name}.log')} — elapsed "
                        f"{_fmt(time.time() - started)}",
                        highlight=False,
                    )
            for future in done:
                stage = running.pop(future)
                try:
                    record = future.result()
                except BaseException as err:  # noqa: BLE001 - reported after the others end
                    console.print(f"[red]{stage.name} failed: {err} (see {logs / stage.name}.log)")
                    error = error or err
                    continue
                finished.add(stage.name)
                _write_timings(run_dir, record)
                console.print(
                    f"[green]{record.status} {stage.name}[/] in {_fmt(record.seconds + record.eval_seconds)}"
                    f" — {len(finished)}/{len(selected)} stages, elapsed {_fmt(time.time() - started)}"
                )
            if error is not None:
                pending.clear()
    if error is not None:
        raise error


def _last_line(path: Path, width: int = 90) -> str:
    """The last non-empty line of a stage's log (its latest progress line), shortened."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return "starting"
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return escape(lines[-1][:width]) if lines else "starting"


def _worker_init() -> None:
    """A stage process dies with the pipeline: a killed `r1lab run` leaves no stage writing."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def _logged_stage(name: str, job: tuple, log_path: str) -> StageRecord:
    """`run_stage` in a worker process, its console output into the stage's log file."""
    os.environ.setdefault("R1LAB_NO_PROGRESS", "1")  # no bars in a file
    with (
        open(log_path, "a") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        console.file = log
        return run_stage(name, *job)


def _parallel_eta(run_dir: Path, left: list[str], lengths: dict[str, float]) -> str:
    """The longest chain of stages still to finish, when the last run timed all of them."""
    if not left or not set(left) <= set(_last_seconds(run_dir)):
        return ""
    return f", eta ~{_fmt(max(lengths[n] for n in left))} (from the last run's timings)"


def _path_lengths(run_dir: Path) -> dict[str, float]:
    """Seconds from each stage's start to the end of the longest chain of stages after it.

    From the last run's timings where known (60 s otherwise): the scheduler starts the
    stage on the critical path first.
    """
    seconds = _last_seconds(run_dir)
    lengths: dict[str, float] = {}
    for stage in reversed(GRAPH):  # GRAPH lists every stage after its inputs
        after = [lengths[s.name] for s in GRAPH if stage.name in stage_inputs(s)]
        lengths[stage.name] = seconds.get(stage.name, 60.0) + max(after, default=0.0)
    return lengths


def _write_timings(run_dir: Path, record: StageRecord) -> None:
    """`<run>/timings.json`: seconds per stage (the report shows them; ETAs use them)."""
    from r1lab.model.checkpoint import atomic_write_text

    path = run_dir / "timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    if record.status == "done" or record.name not in data:
        data[record.name] = {
            "seconds": round(record.seconds, 1),
            "eval_seconds": round(record.eval_seconds, 1),
            "started": round(record.started, 1),
        }
    data["_host"] = {"machine": platform.machine(), "python": platform.python_version()}
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _last_seconds(run_dir: Path) -> dict[str, float]:
    """Each stage's train + eval seconds in the last run (`<run>/timings.json`), if any."""
    path = run_dir / "timings.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    return {name: t["seconds"] + t["eval_seconds"] for name, t in data.items() if name != "_host"}


def _eta(run_dir: Path, remaining: list[Stage]) -> str:
    """The sum of the last run's times of the stages still to do (one at a time)."""
    seconds = _last_seconds(run_dir)
    known = [
        seconds[s.name]
        for s in remaining
        if s.name in seconds and not (run_dir / s.name / "DONE").exists()
    ]
    if not known:
        return ""
    return f", eta ~{_fmt(sum(known))} (from the last run's timings)"


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s"
