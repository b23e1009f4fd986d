"""qlora-pipeline — turn a base LLM into an instruction follower with QLoRA, within a time budget.

    qlora-pipeline run                                  # the default profile (demo: offline, CPU)
    qlora-pipeline run --profile mistral-7b --hours 4   # the seed recipe on your GPU
    qlora-pipeline run --profile tiny --set lora.r=4    # any pipeline.yaml key, dotted
    qlora-pipeline profiles                             # the profiles in pipeline.yaml, one line each
    qlora-pipeline chat [RUN] [--prompt TEXT]           # talk to a published run (latest by default)
    qlora-pipeline serve                                # run finetune/nightly (prefect.yaml) on its schedule here
    qlora-pipeline serve-model [RUN] [--format gguf]    # OpenAI-compatible endpoint on a published model (--api-key KEY)

Every stage is cached on content: rerun the same command after a crash and it resumes where it stopped.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import traceback

EXIT_CONFIG = 2
EXIT_STAGE = 1
EXIT_NOT_PAUSED = 3  # serve stopped but could not pause its deployment: the schedule stays live, nothing serves it


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    """A TCP port a client can be told: 0 (any free port) would serve where the printed curl line and the health wait
    do not look, and one above 65535 failed only after the model loaded, with uvicorn's traceback."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 1 to 65535, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlora-pipeline", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the eight-stage finetuning flow", description="Run the finetune flow: data -> profile -> probe -> train -> evaluate -> merge -> publish -> export.")
    run.add_argument("--profile", help="profile from pipeline.yaml (default: its default_profile, demo)")
    budget = run.add_mutually_exclusive_group()
    budget.add_argument("--hours", type=float, help="training time budget in hours (the probe turns it into steps)")
    budget.add_argument("--minutes", type=float, help="training time budget in minutes")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a pipeline.yaml key, e.g. --set lora.r=8 --set data.source=my.jsonl (repeatable)")
    run.add_argument("--config", help="path to another pipeline.yaml")

    sub.add_parser("profiles", help="list the profiles in pipeline.yaml, one line each on what it is for")

    chat = sub.add_parser("chat", help="chat with a published run (adapter or merged model)")
    chat.add_argument("run", nargs="?", help="run name: a folder under artifacts/runs (default: the latest)")
    chat.add_argument("--prompt", help="answer this one prompt and exit (otherwise interactive)")
    chat.add_argument("--merged", action="store_true", help="load the merged model instead of base + adapter (loaded as stage 5 evaluated them)")
    side = chat.add_mutually_exclusive_group()
    side.add_argument("--base", action="store_true", help="answer with the base model alone (the adapter switched off; the same template and "
                                                          "system prompt, as stage 5's base side)")
    side.add_argument("--compare", action="store_true", help="answer each prompt with the base model, then the tuned one, each under its "
                                                             "name and with its own chat: what tuning changed, on prompts of your own")
    chat.add_argument("--max-new-tokens", type=_at_least_one, default=256, help="cap on each answer's length in tokens (>= 1)")
    chat.add_argument("--artifacts-dir", help="where the runs are (default: pipeline.yaml's artifacts_dir, as `run` uses it; a relative path is taken from the project root, as there)")
    chat.add_argument("--trust-remote-code", action="store_true",
                      help="run the model's own Python code (its config's auto_map) to load it; on already where a run here that set "
                           "model.trust_remote_code: true published the folder and its .py files are unchanged since (stage 7 records "
                           "them under the artifacts folder), so needed for a folder copied in or whose code changed")

    serve = sub.add_parser("serve", help="register a prefect.yaml deployment (finetune/nightly) and execute its runs here",
                           description="Register finetune/<name> with the Prefect server at PREFECT_API_URL (start one with "
                                       "`prefect server start`) and execute its scheduled and triggered runs on this machine until Ctrl-C. "
                                       "Exits 0 once stopped with the deployment paused, 3 when it could not be paused "
                                       "(its schedule stays live with nothing serving it).")
    serve.add_argument("--deployment", default="nightly", help="the deployment of prefect.yaml to serve (default: nightly)")
    serve.add_argument("--name", help="register it under another name, e.g. nightly-<host> for one deployment per GPU machine")
    serve.add_argument("--collision-strategy", choices=["ENQUEUE", "CANCEL_NEW"],
                       help="a run that finds the GPU busy: ENQUEUE waits, CANCEL_NEW is cancelled (default: prefect.yaml's)")
    serve.add_argument("--paused", action="store_true", help="register the schedule inactive: runs only when triggered")

    sm = sub.add_parser("serve-model", help="serve a published model on an OpenAI-compatible endpoint (Ctrl-C stops it)",
                        description="Serve a published run's model at http://HOST:PORT/v1 (chat/completions): the merged "
                                    "folder with `transformers serve`, or its GGUF with llama.cpp's server (xllamacpp).")
    sm.add_argument("run", nargs="?", help="run name under artifacts/runs (default: the latest)")
    sm.add_argument("--format", choices=["merged", "gguf"], help="merged = transformers serve (the default); gguf = llama.cpp server")
    sm.add_argument("--gguf-type", help="which GGUF (f16, q8_0, ...; serves the gguf format); default q8_0 if exported")
    sm.add_argument("--host", default="127.0.0.1", help="listen address (default loopback; 0.0.0.0 exposes it to the network: set an API key)")
    sm.add_argument("--api-key", default=os.environ.get("QLORA_PIPELINE_API_KEY"),
                    help="require `Authorization: Bearer KEY` on every request but /health (default: $QLORA_PIPELINE_API_KEY; "
                         "the variable keeps the key out of the process list)")
    sm.add_argument("--port", type=_port, default=8000, help="listen port, 1 to 65535 (default 8000)")
    sm.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="let web pages of ORIGIN (scheme://host[:port], e.g. http://localhost:3000, or * for any) call the endpoint "
                         "from a browser (CORS; repeatable; gguf: one). Default: no CORS headers, browsers on other origins are refused "
                         "(the merged format; llama.cpp's server answers any origin)"),
    sm.add_argument("--ctx", type=int, default=4096, help="gguf: context length in tokens")
    sm.add_argument("--artifacts-dir", help="where the runs are (default: pipeline.yaml's artifacts_dir, as `run` uses it; a relative path is taken from the project root, as there)")
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


class _UserErrorConsoleFilter(logging.Filter):
    """Drops, from the console only, Prefect's failure records that carry a StageError/ConfigError traceback.

    Those errors are the user's to fix (a bad row, a typo): `cmd_run` prints them as one `error: ...` line, and a
    stack trace would bury it. Prefect's API handler sees the record first, so the UI keeps the full traceback;
    every other exception (a bug) still prints its traceback here.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from tasks.common import StageError
        from tasks.config import ConfigError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (StageError, ConfigError))


def _hide_user_error_tracebacks() -> None:
    import prefect  # noqa: F401  (configures Prefect's logging: the console handler sits on the root logger)

    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _UserErrorConsoleFilter) for f in handler.filters):
            handler.addFilter(_UserErrorConsoleFilter())


def _temporary_server_outside_ctrl_c() -> None:
    """Without PREFECT_API_URL, Prefect starts a temporary server as a child process. Ctrl-C signals the whole
    foreground process group: the server died first and the run then hung, reporting its state to it. Started
    in its own session, only this process gets Ctrl-C (training saves a checkpoint and stops, exit 130);
    Prefect stops the server when this process exits, and a watchdog in the server stops it when this process is
    killed without a chance to (SIGKILL, the OOM killer): no orphaned server per crash."""
    import subprocess
    import types

    from prefect.settings import get_current_settings

    if get_current_settings().api.url:  # a server of the user's: nothing to start (and its module, ~4 s of imports, unread)
        return
    from prefect.server.api import server

    if getattr(server.subprocess, "_detached", False):
        return
    detached = types.ModuleType("subprocess")
    detached.__dict__.update(vars(subprocess))
    detached.Popen = _guarded_server_popen
    detached._detached = True
    server.subprocess = detached  # only the prefect server module's view of subprocess


# Runs `python -m uvicorn ...` after starting tasks.common.stop_when_orphaned (the project's root first on the path:
# the server runs wherever Prefect starts it).
_SERVER_GUARD = """
import runpy, sys
parent = int(sys.argv.pop(1))
sys.path.insert(0, sys.argv.pop(1))
from tasks.common import stop_when_orphaned
stop_when_orphaned(parent)
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def _guarded_server_popen(args, *rest, **kwargs):
    import subprocess

    args = list(args)
    if args[1:3] == ["-m", "uvicorn"]:
        from tasks.common import PROJECT_ROOT

        args = [args[0], "-c", _SERVER_GUARD, str(os.getpid()), str(PROJECT_ROOT), *args[3:]]
    return subprocess.Popen(args, *rest, start_new_session=True, **kwargs)


def cmd_run(args) -> int:
    from tasks.common import StageError, writable_problem

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # before Prefect reads it; busy machines are slow
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
        problem = writable_problem(cfg.artifacts_dir)
        if problem:
            raise ConfigError([problem])
    except ConfigError as e:
        for line in e.problems:
            print(f"config error: {line}", file=sys.stderr)
        return EXIT_CONFIG

    from prefect.exceptions import CancelledRun

    from flows.finetune import finetune

    _hide_user_error_tracebacks()
    _temporary_server_outside_ctrl_c()
    # What the imports made (~0.5 M objects: torch, transformers, PEFT, Prefect) lives as long as the run: out of the
    # cyclic collector's reach, whose every full collection walked it (~0.3-0.5 s each on 2 CPU cores; a tiny-profile run
    # made 15). What the stages make is collected as before. Collected first: a caller's dead cycles (a test worker runs
    # `main(["run", ...])` in-process) are freed, not frozen with the rest for the life of the process.
    gc.collect()
    gc.freeze()
    # Ctrl-C stops a run in any stage (in training after a checkpoint, exit 130); a stop signal the run inherited as
    # ignored (`nohup`, `trap "" INT`, a script's `cmd &`) stays ignored in every stage, training's too (tasks/train.py
    # `_install_interrupt`), as Python leaves it; serve-model alone takes SIGINT back (`_stop_on_ctrl_c_or_sigterm`).
    # Under training.gpus > 1 too: the launcher (tasks/engine/launch.py) forwards no ignored signal, and starts torchrun,
    # which sets handlers of its own, out of the terminal's process group and with SIGHUP left ignored (torch 2.9+).
    try:
        result = finetune(profile=cfg.profile, hours=hours, minutes=minutes, overrides=args.overrides, config_path=str(path))
    except (StageError, ConfigError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_STAGE
    except (KeyboardInterrupt, CancelledRun):  # CancelledRun: the flow ended Cancelled, training stopped after a checkpoint
        print("interrupted: finished stages and the last training checkpoint are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"results: {result.get('published') or result.get('summary_path')}")
    return 0


def cmd_profiles(args) -> int:
    from tasks.config import profile_descriptions

    described = profile_descriptions()
    width = max(map(len, described), default=0)
    print("\n".join(f"{name:<{width}}  {text}".rstrip() for name, text in described.items()))
    return 0


def _artifacts_dir(given: str | None) -> str:
    """--artifacts-dir, else the one `qlora-pipeline run` writes to by default: pipeline.yaml's artifacts_dir (its default
    profile's). A pipeline.yaml pointed at a bigger disk sent `run` there while `chat` and `serve-model` went on
    looking in the project's artifacts/ ("no runs")."""
    if given is not None:
        return given
    from tasks import config

    try:
        return config.load_config(config.DEFAULT_CONFIG_PATH).artifacts_dir
    except config.ConfigError:  # a pipeline.yaml that does not load: `run` says why; the runs are then where they always were
        return "artifacts"


def cmd_chat(args) -> int:
    from tasks.common import StageError
    from tasks.publish import chat

    try:
        sides = ("base", "tuned") if args.compare else ("base",) if args.base else ("tuned",)
        return chat(args.run, args.prompt, merged=args.merged, max_new_tokens=args.max_new_tokens, artifacts_dir=_artifacts_dir(args.artifacts_dir),
                    trust_remote_code=args.trust_remote_code, sides=sides)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STAGE
    except KeyboardInterrupt:  # while the model loads, or during a --prompt answer: stop without a traceback
        print("\nstopped", file=sys.stderr)
        return 130


def cmd_serve_model(args) -> int:
    import shutil
    import subprocess

    from tasks.common import StageError
    from tasks.export import (API_KEY_ENV, cors_origin_problem, gguf_stops, gguf_to_serve, is_loopback, make_serving_folder,
                              record_server, remove_stale_serving_folders, require_free_port, serve_gguf, transformers_serve_command)
    from tasks.publish import answer_stop_ids, find_run, own_code_file, require_current, require_safetensors

    if args.gguf_type and args.format == "merged":
        print(f"error: --gguf-type {args.gguf_type} picks a GGUF, which --format merged does not serve; drop one of them", file=sys.stderr)
        return EXIT_CONFIG
    args.format = args.format or ("gguf" if args.gguf_type else "merged")  # --gguf-type f16 served the merged model
    if bad := next(filter(None, map(cors_origin_problem, args.cors_origin)), None):
        print(f"error: {bad}", file=sys.stderr)
        return EXIT_CONFIG
    if args.format == "gguf" and len(set(args.cors_origin)) > 1:
        print(f"error: --format gguf answers one --cors-origin (llama.cpp's server names one origin, or *), given {len(set(args.cors_origin))}: "
              f"{', '.join(args.cors_origin)}; keep one, or serve the merged format, which answers several", file=sys.stderr)
        return EXIT_CONFIG
    try:
        folder = find_run(args.run, _artifacts_dir(args.artifacts_dir))
        gguf = gguf_to_serve(folder, args.gguf_type) if args.format == "gguf" else None
        if not gguf:
            require_current(folder, merged=True)  # a tokenizer publish would refuse: one line, not the server's traceback
            require_safetensors(folder / "merged")  # before any load: a pickle can run code when unpickled
            if own := own_code_file(folder / "merged"):  # transformers serve would stop with a traceback after starting
                raise StageError(f"serve-model (merged) serves through transformers serve, which loads transformers' own model and "
                                 f"tokenizer classes only, and {folder / 'merged' / own} names code of the model's own (auto_map); "
                                 f"talk to it with `qlora-pipeline chat {folder.parent.name} --merged`, or serve its GGUF (--format gguf) "
                                 "if the export made one")
        require_free_port(args.host, args.port)
        if not gguf:
            stop_ids = answer_stop_ids(folder)  # before the serving folder is made: a bad summary leaves none behind
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_STAGE
    if not args.api_key and not is_loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches port {args.port} can use the model; "
              f"pass --api-key or set ${API_KEY_ENV}", file=sys.stderr, flush=True)
    stops = gguf_stops(gguf, folder) if gguf else None
    if stops and stops.line:
        print(stops.line, file=sys.stderr, flush=True)
    if not args.api_key and "*" in args.cors_origin:  # loopback too: the browser runs on this machine
        print(f"warning: --cors-origin * without an API key: any web page open in a browser that reaches port {args.port} can use "
              f"the model; name the page's origin or pass --api-key", file=sys.stderr, flush=True)
    _stop_on_ctrl_c_or_sigterm()
    name = folder.name  # the published name: what the request's "model" says, and all /v1/models shows
    url = f"http://{args.host}:{args.port}/v1"
    what = f"{gguf.name} (llama.cpp)" if gguf else f"{name} (transformers serve, merged model)"
    # The key itself is never printed: name the variable when it came from there, else a placeholder to replace.
    from_env = args.api_key and os.environ.get(API_KEY_ENV) == args.api_key
    auth = (f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if from_env else " -H 'Authorization: Bearer <your --api-key>'") if args.api_key else ""
    hint = (f"serving {what} at {url} (OpenAI-compatible); Ctrl-C stops it. Try:\n  curl {url}/chat/completions -H 'Content-Type: "
            f"application/json'{auth} -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'")
    if gguf:
        try:
            serve_gguf(gguf, args.host, args.port, args.ctx, name, api_key=args.api_key, ready=lambda addr: print(hint, file=sys.stderr, flush=True),
                       cors_origin=args.cors_origin[0] if args.cors_origin else None, default_stops=stops.strings)
        except StageError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_STAGE
        print("stopped", file=sys.stderr)
        return 0
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    if args.api_key:
        env[API_KEY_ENV] = args.api_key
    # Its own session: Ctrl-C reaches this process only, which stops the server and waits for it (no orphan).
    stale = remove_stale_serving_folders()  # left by a serve-model killed before it could remove its own
    if stale:
        print(f"removed {len(stale)} serving folder(s) left by a killed serve-model: {', '.join(map(str, stale))}", file=sys.stderr)
    workdir = make_serving_folder()  # the server's folder: this process removes it once the server has exited
    command = transformers_serve_command(folder / "merged", name, args.host, args.port, workdir, stop_ids, args.cors_origin)
    proc = subprocess.Popen(command, start_new_session=True, env=env)
    try:
        record_server(workdir, proc.pid)
        # The hint once the model answers, not before: a model that fails to load must not follow a "Try: curl".
        if not _wait_until_healthy(proc, args.host, args.port):
            print(f"error: the merged model's server stopped before it served (exit {proc.returncode}); see its message above",
                  file=sys.stderr)
            return EXIT_STAGE
        print(hint, file=sys.stderr, flush=True)
        code = proc.wait()
        if code != 0:  # killed (a negative code: the signal) or failed while serving: say so, exit as a stage error
            how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
            print(f"error: the merged model's server {how} while serving; see its message above, then rerun serve-model",
                  file=sys.stderr)
            return EXIT_STAGE
        return 0
    except KeyboardInterrupt:
        _stop_merged_server(proc)
        print("stopped", file=sys.stderr)
        return 0
    finally:
        if proc.poll() is not None:  # however it exited: its own stop ends by the signal it caught, before any cleanup
            shutil.rmtree(workdir, ignore_errors=True)


STOP_NOW_S = 5  # how long a merged server told to stop now may take to kill its model's process and exit


def _stop_merged_server(proc) -> None:
    """Stops transformers serve as the gguf backend stops llama.cpp's: SIGTERM (not SIGINT: it also ends a server still
    loading, whose SIGINT may be ignored, inherited as above), so uvicorn takes no new request and waits for the open
    ones for GGUF_STOP_GRACE_S (its `timeout_graceful_shutdown`), then cuts them off and stops; should it not, a second
    signal (uvicorn's "force quit"), then SIGKILL. A stream no longer holds the stop for 30 s before a SIGKILL (a review, 2026-12-06).
    Another Ctrl-C meanwhile, or a server that did not stop, gets STOP_NOW_SIGNAL: the server kills its model's process
    and exits at once, after multiprocessing's exit handlers (a SIGKILL there left its semaphores to the resource
    tracker, which warned of them as leaked); a third Ctrl-C, or a server that does not end in STOP_NOW_S, a SIGKILL.
    No traceback on the way."""
    import signal
    import subprocess

    from tasks.export import GGUF_STOP_GRACE_S, STOP_NOW_SIGNAL

    try:
        # the server's own graceful stop ends by then (tasks/export.py `_bounded_graceful_shutdown`)
        for sig, wait_s in ((signal.SIGTERM, GGUF_STOP_GRACE_S + 5), (signal.SIGINT, 10), (STOP_NOW_SIGNAL, STOP_NOW_S)):
            proc.send_signal(sig)
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue
    except KeyboardInterrupt:  # another Ctrl-C: stop now
        try:
            proc.send_signal(STOP_NOW_SIGNAL)
            proc.wait(timeout=STOP_NOW_S)
            return
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            pass
    proc.kill()
    while True:
        try:
            proc.wait()
            return
        except KeyboardInterrupt:  # yet another Ctrl-C while the killed server exits: it is going already
            continue


def _wait_until_healthy(proc, host: str, port: int) -> bool:
    """True once the server at host:port answers /health, False if `proc` exits first."""
    import time
    import urllib.request

    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url = f"http://{f'[{local}]' if ':' in local else local}:{port}/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through $http_proxy
    while proc.poll() is None:
        try:
            with opener.open(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def _stop_on_ctrl_c_or_sigterm() -> None:
    """Ctrl-C (SIGINT), SIGTERM (`kill`, `docker stop`, systemd) and SIGHUP (closed terminal) all stop serve-model and serve cleanly. Set here, not
    inherited: a shell without job control starts background commands (`serve-model &` in a script, CI) with SIGINT
    ignored, and Python then installs no KeyboardInterrupt handler: Ctrl-C would do nothing."""
    import signal
    import threading

    sent = [signal.SIGINT]  # the last stop signal, as the KeyboardInterrupt does not say which one raised it

    def interrupt(signum, frame):
        sent[0] = signum
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)  # the terminal was closed: stop the server rather than die and orphan it

    previous_hook = sys.unraisablehook

    def send_again(unraisable):
        # A handler's KeyboardInterrupt lands wherever the main thread is; inside a weakref callback or a __del__ run
        # by the garbage collector Python prints "Exception ignored in ..." and drops it: serve went on serving
        # (CI, a SIGTERM in the runner's startup: killed 30 s later). Send the signal again from another thread: it is
        # handled at the main thread's next bytecode, by whichever handler holds it then (Prefect's, once it serves).
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            return previous_hook(unraisable)
        threading.Timer(0.01, os.kill, (os.getpid(), sent[0])).start()

    sys.unraisablehook = send_again


def _quiet_environment() -> None:
    from tasks.common import quiet_library_bars

    quiet_library_bars()  # before anything imports tqdm, which reads its settings then
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline machines: no telemetry errors
    # bitsandbytes warns at import on CPU that an optional kernels package is missing; we don't use it.
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def cmd_serve(args) -> int:
    # Ctrl-C stops serve cleanly however this process was started: a script or CI starts background commands with
    # SIGINT ignored, and Ctrl-C then did nothing (the tests waited 30 s, then SIGKILL). SIGTERM does the same until
    # the runner starts and takes it over (its own graceful shutdown); both end with the deployment paused.
    from flows.deploy import DeploymentNotPaused

    _stop_on_ctrl_c_or_sigterm()
    try:
        return _serve(args)
    except DeploymentNotPaused as e:
        # Its one line (why, and the fix) was printed when the pause failed.
        _show_replaced(e.__context__)
        return EXIT_NOT_PAUSED
    except KeyboardInterrupt:
        # Before the runner started (importing, registering): nothing to shut down, and a registered deployment was
        # paused on the way out. Exit 0 as a Ctrl-C once serving does (Prefect's runner): serve only ever ends on
        # request, so a script sees one exit code for "stopped", however early.
        print("stopped before serving", file=sys.stderr)
        return 0


def _show_replaced(ended_serving: BaseException | None) -> None:
    """Show what ended serving (DeploymentNotPaused replaced it) as it shows when the pause works: a stop request
    (a Ctrl-C, caught in serve or not; a SystemExit) prints no traceback, only a SystemExit's message if it carries one;
    anything else is a fault and prints its traceback, a BaseException too (an asyncio cancellation, an error grouped
    with a Ctrl-C in a BaseExceptionGroup), not only an Exception."""
    if ended_serving is None or isinstance(ended_serving, KeyboardInterrupt):
        return
    if isinstance(ended_serving, SystemExit):
        # Prefect's runner answers SIGTERM with sys.exit(0): a stop request, as a Ctrl-C is.
        if ended_serving.code is not None and not isinstance(ended_serving.code, int):
            print(ended_serving.code, file=sys.stderr)
        return
    traceback.print_exception(ended_serving)


def _serve(args) -> int:
    from prefect.settings import get_current_settings

    from flows.deploy import DeploymentSpecError, serve

    if not get_current_settings().api.url:  # else Prefect serves against a throwaway in-process server: no UI, no runs
        print("config error: no Prefect server to serve against; start one with `prefect server start` and point at it "
              "once with `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`", file=sys.stderr)
        return EXIT_CONFIG
    try:
        serve(args.deployment, name=args.name, collision_strategy=args.collision_strategy, paused=args.paused)
    except DeploymentSpecError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_environment()
    return {"run": cmd_run, "profiles": cmd_profiles, "chat": cmd_chat, "serve": cmd_serve, "serve-model": cmd_serve_model}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
