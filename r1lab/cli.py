"""The `r1lab` command: one subcommand per stage, plus run, eval, report, generate and info.

Every stage subcommand takes `--preset NAME` (a YAML preset shipped in r1lab/presets, or a
path), `--out DIR` (its run directory) and `key=value` / `section.key=value` overrides.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import shutil
import sys
from contextlib import nullcontext

from r1lab.stage_graph import STAGE_COMMANDS as STAGES


def _stage_parser(sub, name: str, help_text: str, settings: str | None = None) -> None:
    p = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=settings,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default=None,
        help="preset name (see `r1lab presets`) or a YAML file; default: the tiny CPU settings",
    )
    p.add_argument("--out", required=True, help="run directory for this stage")
    _nproc_argument(p, "this stage's processes: N > 1 runs it under torchrun (FSDP2)")
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="resume from the run directory's last checkpoint (default on)",
    )
    p.add_argument("overrides", nargs="*", help="key=value or section.key=value")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive number of processes, got {text!r}")
    return int(text)


def _nproc_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--nproc", type=_positive_int, default=1, metavar="N", help=help_text)


def _stage_settings(stage: str) -> str:
    from r1lab.settings import settings_help

    module = importlib.import_module(f"r1lab.stages.{STAGES[stage][0]}")
    return settings_help(module.Config)


def _help_for(argv: list[str]) -> str | None:
    """The stage whose `--help` is asked for (its settings are listed), else None."""
    words = [a for a in argv if not a.startswith("-")]
    if words and words[0] in STAGES and ("-h" in argv or "--help" in argv):
        return words[0]
    return None


def build_parser(describe: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; `describe` names a stage whose settings its --help lists (the
    stage module is imported only then, so other commands start fast)."""
    parser = argparse.ArgumentParser(
        prog="r1lab",
        description="The DeepSeek-R1 recipe: GRPO, the four-stage R1 pipeline, distillation, evaluation.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback of an error (also R1LAB_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole R1 pipeline (default: the tiny CPU preset)")
    run.add_argument("--preset", default="tiny", help="pipeline preset (default tiny)")
    run.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    run.add_argument("--only", default=None, metavar="STAGE", help="run just this stage")
    run.add_argument(
        "--from",
        dest="from_stage",
        default=None,
        metavar="STAGE",
        help="rerun from this stage on (earlier finished stages are reused)",
    )
    run.add_argument(
        "--jobs",
        type=int,
        default=None,
        metavar="N",
        help="stages run at once where the graph allows, one CPU thread each "
        "(default: the preset's pipeline.jobs, else 2 on a machine with 2+ cores)",
    )
    _nproc_argument(
        run,
        "processes per stage: N > 1 runs each stage that can under torchrun, "
        "one stage at a time (docs/distributed.md)",
    )
    run.add_argument("overrides", nargs="*", help="stage.key=value, e.g. r1-zero.steps=50")

    for name, (_, _, help_text) in STAGES.items():
        _stage_parser(sub, name, help_text, _stage_settings(name) if name == describe else None)

    conf = sub.add_parser(
        "config",
        help="print a stage's resolved settings as YAML (save, edit, pass back with --preset)",
    )
    conf.add_argument("stage", choices=list(STAGES))
    conf.add_argument("--preset", default=None, help="preset name or YAML file to start from")
    conf.add_argument("overrides", nargs="*", help="key=value or section.key=value")

    rep = sub.add_parser("report", help="rebuild report.md and plots of a pipeline run dir")
    rep.add_argument("run_dir")

    gen = sub.add_parser("generate", help="sample from a model")
    gen.add_argument("--model", required=True, help="model folder, hub id or stage run dir")
    gen.add_argument("--prompt", required=True, action="append", help="prompt text (repeatable)")
    gen.add_argument(
        "--template",
        default="plain",
        help="plain | r1-zero | r1-chat | chat (the tokenizer's own) | r1-distill | a .yaml file",
    )
    gen.add_argument("--system", default=None, help="system prompt")
    gen.add_argument("--instruction", default=None, help="appended to each prompt")
    gen.add_argument("--show-prompt", action="store_true", help="print each prompt as sent")
    gen.add_argument("--temperature", type=float, default=0.6)
    gen.add_argument("--top-p", type=float, default=0.95)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--device", default="cpu")

    info = sub.add_parser("info", help="architecture and parameter count of a model folder")
    info.add_argument("path")

    sub.add_parser("presets", help="list the shipped presets")
    return parser


def _run_stage(args) -> int:
    from r1lab.config import load_stage_config
    from r1lab.rundir import LOCK_FILE, check_out_dir, run_dir_lock
    from r1lab.training import use_loggers

    module_name, section, _ = STAGES[args.command]
    module = importlib.import_module(f"r1lab.stages.{module_name}")
    cfg = load_stage_config(module.Config, section, args.preset, args.overrides)
    existed = bool(str(args.out).strip()) and os.path.exists(args.out)
    out = check_out_dir(args.out)
    try:
        # under torchrun rank 0 holds the lock for all ranks
        lock = run_dir_lock(out) if os.environ.get("RANK", "0") == "0" else nullcontext()
        with lock, use_loggers(cfg.loggers):
            module.run(cfg, out, resume=args.resume)
    except BaseException:
        if not existed and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(out)  # failed before writing anything: leave no empty run dir
        raise
    return 0


def _config(args) -> int:
    from r1lab.settings import config_yaml, resolved_config

    module_name, section, _ = STAGES[args.stage]
    module = importlib.import_module(f"r1lab.stages.{module_name}")
    cfg, missing = resolved_config(module.Config, section, args.preset, args.overrides)
    text = config_yaml(cfg, missing, name=module_name)
    # a file passed back with --preset is read by stage section
    print(
        f"{section}:\n" + "".join(f"  {line}\n" if line else "\n" for line in text.splitlines()),
        end="",
    )
    return 0


def _generate(args) -> int:
    import r1lab
    from r1lab.api import sampling_options
    from r1lab.config import resolve_device
    from r1lab.model.tokenizer import render_prompt

    model, tokenizer = r1lab.load(args.model, device=resolve_device(args.device))
    prompts = [
        render_prompt(args.template, p, tokenizer, system=args.system, instruction=args.instruction)
        for p in args.prompt
    ]
    if args.show_prompt:
        for i, p in enumerate(prompts):
            print(f"--- prompt {i} as sent\n{p}")
    # the sampling flags are named after SamplingParams' fields
    outs = r1lab.generate(model, tokenizer, prompts, n=args.n, **sampling_options(args))
    for c in outs:
        print(f"--- prompt {c.prompt_index} ({c.finish_reason}, {len(c.token_ids)} tokens)")
        print(c.text)
    return 0


def _info(args) -> int:
    from r1lab.model.checkpoint import resolve_model_dir
    from r1lab.model.config import ModelConfig

    folder = resolve_model_dir(args.path)
    cfg = ModelConfig.from_file(folder / "config.json")
    rope = cfg.rope_type if cfg.rope_scaling else "default"
    print(f"model folder     {folder}")
    print(f"architecture     {cfg.model_type} ({cfg.to_hf_dict()['architectures'][0]})")
    print(f"parameters       {cfg.num_parameters():,}")
    print(f"layers           {cfg.num_hidden_layers}")
    print(f"hidden size      {cfg.hidden_size} (MLP {cfg.intermediate_size})")
    print(
        f"attention heads  {cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value, head dim {cfg.head_dim}"
    )
    print(f"vocabulary       {cfg.vocab_size}")
    print(
        f"context          {cfg.max_position_embeddings} (rope theta {cfg.rope_theta:g}, scaling {rope})"
    )
    print(f"embeddings       {'tied' if cfg.tie_word_embeddings else 'untied'}")
    extras = [n for n, on in (("qkv bias", cfg.attention_bias), ("qk-norm", cfg.qk_norm)) if on]
    if extras:
        print(f"features         {', '.join(extras)}")
    return 0


def error_line(err: BaseException) -> str | None:
    """The one-line message of an input or environment error (None: a bug, keep the trace)."""
    from r1lab.config import ConfigError
    from r1lab.distributed import DistributedError
    from r1lab.training import NonFiniteLossError

    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "missing key"
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
        where = f" ({err.filename})" if err.filename else ""
        if err.errno == errno.ENOSPC:
            return f"no space left on the device{where}; free some and rerun (the run resumes)"
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"cannot write{where}: {err.strerror}; choose a writable --out"
        return f"{err.strerror or err}{where}"
    if isinstance(
        err, (ConfigError, ValueError, FileNotFoundError, NonFiniteLossError, DistributedError)
    ):
        return str(err)
    if type(err).__name__ == "NonFiniteLossError":  # grpo's own, older class
        return str(err)
    if isinstance(err, RuntimeError) and (
        "PytorchStreamWriter" in str(err) or "No space left" in str(err)
    ):
        return f"writing a checkpoint failed (disk full or unwritable?): {err}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_help_for(argv))
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        # argparse fills the positional overrides once, from the first run of positionals,
        # so key=value words after a flag (`config STAGE --preset P k=v`, `grpo a=1 --out
        # D b=2`) come back unparsed: they are overrides too, in the order given
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    torchrun = os.environ.get("WORLD_SIZE", "1") != "1"  # one of torchrun's processes
    if args.command in STAGES and args.nproc > 1 and not torchrun:
        # --nproc N: the same command under torchrun; N = 1 runs here
        import subprocess

        from r1lab.distributed import torchrun_command

        return subprocess.call(torchrun_command(argv))
    try:
        if torchrun:
            from r1lab import distributed

            distributed.init("cuda" if distributed.torch.cuda.is_available() else "cpu")
        if args.command in STAGES:
            code = _run_stage(args)
            if torchrun:  # every rank finished before any tears its connections down
                distributed.close(wait=True)
            return code
        if args.command == "run":
            from r1lab.pipeline import run_pipeline

            run_pipeline(
                args.preset,
                args.out,
                only=args.only,
                from_stage=args.from_stage,
                overrides=args.overrides,
                jobs=args.jobs,
                nproc=args.nproc,
            )
            return 0
        if args.command == "report":
            from r1lab.report import write_report

            print(write_report(args.run_dir))
            return 0
        if args.command == "generate":
            return _generate(args)
        if args.command == "info":
            return _info(args)
        if args.command == "config":
            return _config(args)
        if args.command == "presets":
            from r1lab.config import preset_names

            print("\n".join(preset_names()))
            return 0
    except Exception as err:  # noqa: BLE001  (input and environment errors: one line)
        msg = error_line(err)
        if msg is None or args.debug or os.environ.get("R1LAB_DEBUG") == "1":
            raise
        who = f" (rank {os.environ.get('RANK')})" if torchrun else ""
        print(f"r1lab {args.command}{who}: error: {msg}", file=sys.stderr)
        print("(rerun with r1lab --debug ... for the traceback)", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
