"""qlora-pipeline — turn a base LLM into an instruction follower with QLoRA, within a time budget.

    qlora-pipeline run                                  # the default profile (demo: offline, CPU)
    qlora-pipeline run --profile mistral-7b --hours 4   # the seed recipe on your GPU
    qlora-pipeline run --profile tiny --set lora.r=4    # any pipeline.yaml key, dotted
    qlora-pipeline profiles                             # list the profiles in pipeline.yaml
    qlora-pipeline chat [RUN] [--prompt TEXT]           # talk to a published run (latest by default)

Every stage is cached on content: rerun the same command after a crash and it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_CONFIG = 2
EXIT_STAGE = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the seven-stage finetuning flow", description="Run the finetune flow: data -> profile -> probe -> train -> evaluate -> merge -> publish.")
    run.add_argument("--profile", help="profile from pipeline.yaml (default: its default_profile, demo)")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=float, help="training time budget in hours (the probe turns it into steps)")
    budget.add_argument("--minutes", type=float, help="training time budget in minutes")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a pipeline.yaml key, e.g. --set lora.r=8 --set data.source=my.jsonl (repeatable)")
    run.add_argument("--config", help="path to another pipeline.yaml")

    sub.add_parser("profiles", help="list the profiles in pipeline.yaml")

    chat = sub.add_parser("chat", help="chat with a published run (adapter or merged model)")
    chat.add_argument("run", nargs="?", help="run name under artifacts/runs (default: the latest)")
    chat.add_argument("--prompt", help="answer this one prompt and exit (otherwise interactive)")
    chat.add_argument("--merged", action="store_true", help="load the merged model instead of base + adapter")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--artifacts-dir", default="artifacts")
    return p


def _ask_budget() -> float | None:
    """The seed's interactive question, only when a person is at the terminal."""
    if not sys.stdin.isatty():
        return None
    while True:
        answer = input("How many hours should training run? (e.g. 4 or 0.5) ").strip()
        try:
            hours = float(answer)
            if hours > 0:
                return hours
        except ValueError:
            pass
        print("please type a positive number of hours")


def cmd_run(args) -> int:
    from tasks.common import StageError
    from tasks.config import DEFAULT_CONFIG_PATH, ConfigError, load_config

    path = args.config or DEFAULT_CONFIG_PATH
    hours, minutes = args.hours, args.minutes
    try:
        cfg = load_config(path, args.profile, args.overrides, hours, minutes)  # validate before any work
        if cfg.budget.seconds is None:
            hours = _ask_budget()
            if hours is None:
                raise ConfigError(["budget: no time budget; pass --hours H or --minutes M (or set budget.hours in pipeline.yaml)"])
            cfg = load_config(path, args.profile, args.overrides, hours, None)
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG

    from flows.finetune import finetune

    try:
        result = finetune(profile=cfg.profile, hours=hours, minutes=minutes, overrides=args.overrides, config_path=str(path))
    except (StageError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STAGE
    except KeyboardInterrupt:
        print("interrupted: finished stages and the last training checkpoint are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"results: {result.get('published') or result.get('summary_path')}")
    return 0


def cmd_profiles(args) -> int:
    from tasks.config import profile_names

    print("\n".join(profile_names()))
    return 0


def cmd_chat(args) -> int:
    from tasks.common import StageError
    from tasks.publish import chat

    try:
        return chat(args.run, args.prompt, merged=args.merged, max_new_tokens=args.max_new_tokens, artifacts_dir=args.artifacts_dir)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STAGE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"run": cmd_run, "profiles": cmd_profiles, "chat": cmd_chat}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
