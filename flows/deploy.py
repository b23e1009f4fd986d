"""Scheduled runs: the `finetune/nightly` deployment, defined once in prefect.yaml and served from this machine.

    prefect server start                                    # API + UI (SQLite), http://127.0.0.1:4200
    qlora-pipeline serve                                    # register finetune/nightly and execute its runs here
    prefect deployment run finetune/nightly -p hours=2      # a run now, any parameter overridden
    qlora-pipeline serve --collision-strategy CANCEL_NEW    # a run that finds the GPU busy is cancelled, not queued

`serve` reads schedule, parameters and concurrency from prefect.yaml, so `prefect deploy --name nightly` (to a
process work pool, run by `prefect worker start`) and `qlora-pipeline serve` register the same deployment.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"
ENTRYPOINT = "flows/finetune.py:finetune"
COLLISION_STRATEGIES = ("ENQUEUE", "CANCEL_NEW")


@dataclass(frozen=True)
class CronSpec:
    cron: str
    """Cron expression, e.g. "0 2 * * *" (02:00 every night)."""
    timezone: str | None = None
    """IANA zone the cron is read in; None = UTC."""
    active: bool = True
    """False registers the schedule without firing it."""


@dataclass(frozen=True)
class DeploymentSpec:
    """What `serve` needs from one `deployments:` entry of prefect.yaml."""

    name: str
    """Deployment name; the full name is `finetune/<name>`."""
    entrypoint: str
    """`path/to/file.py:flow`, relative to the project root."""
    schedules: list[CronSpec]
    """Cron schedules; empty = runs only when triggered."""
    parameters: dict[str, Any]
    """Default flow parameters (profile, hours, minutes, default_hours, overrides); `-p key=value` overrides them per run.
    A run's hours/minutes replace the profile's budget; default_hours applies only when neither gives one."""
    concurrency_limit: int | None = 1
    """Runs of this deployment at once; 1 = one run per GPU machine."""
    collision_strategy: str = "ENQUEUE"
    """What a run that finds the limit reached does: ENQUEUE (waits) or CANCEL_NEW (is cancelled)."""
    description: str | None = None
    tags: list[str] = field(default_factory=list)


class DeploymentSpecError(ValueError):
    """prefect.yaml does not hold a usable deployment; the message names the key."""


class DeploymentNotPaused(RuntimeError):
    """`serve` stopped but could not pause the deployment it registered: its schedule stays active with nothing
    serving it. The one-line reason and the fix were printed when the pause failed."""


def load_deployment(name: str = "nightly", path: str | Path = PREFECT_YAML) -> DeploymentSpec:
    """Read deployment `name` from prefect.yaml; every problem is reported at once, naming the key."""
    path = Path(path)
    doc = yaml.safe_load(path.read_text()) or {}
    entries = {d.get("name"): d for d in doc.get("deployments") or [] if isinstance(d, dict)}
    if name not in entries:
        raise DeploymentSpecError(f"{path}: no deployment named {name!r} under `deployments:` (found: {sorted(map(str, entries))})")
    d = entries[name]
    problems: list[str] = []
    where = f"{path}: deployments[{name}]"

    schedules: list[CronSpec] = []
    for i, s in enumerate(d.get("schedules") or ([d["schedule"]] if d.get("schedule") else [])):
        if not isinstance(s, dict) or not s.get("cron"):
            problems.append(f"{where}.schedules[{i}]: only cron schedules are supported here, e.g. `- cron: \"0 2 * * *\"`")
            continue
        schedules.append(CronSpec(cron=str(s["cron"]), timezone=s.get("timezone"), active=bool(s.get("active", True))))

    limit_cfg = d.get("concurrency_limit")
    limit, strategy = (limit_cfg.get("limit"), limit_cfg.get("collision_strategy") or "ENQUEUE") if isinstance(limit_cfg, dict) else (limit_cfg, "ENQUEUE")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"{where}.concurrency_limit.limit: must be a positive integer (got {limit!r}); 1 = one run per GPU")
    if str(strategy).upper() not in COLLISION_STRATEGIES:
        problems.append(f"{where}.concurrency_limit.collision_strategy: {strategy!r} is not one of {', '.join(COLLISION_STRATEGIES)}")
    if not d.get("entrypoint"):
        problems.append(f"{where}.entrypoint: missing; use {ENTRYPOINT}")
    if problems:
        raise DeploymentSpecError("\n".join(problems))

    return DeploymentSpec(
        name=name, entrypoint=d["entrypoint"], schedules=schedules, parameters=dict(d.get("parameters") or {}),
        concurrency_limit=limit, collision_strategy=str(strategy).upper(), description=d.get("description"),
        tags=list(d.get("tags") or []),
    )


def serve(
    deployment: str = "nightly",
    *,
    name: str | None = None,
    collision_strategy: str | None = None,
    paused: bool = False,
    path: str | Path = PREFECT_YAML,
) -> None:
    """Register `finetune/<name>` with the Prefect server (PREFECT_API_URL) and execute its runs until Ctrl-C or SIGTERM;
    either, however early, leaves the deployment paused once registered (as Prefect's runner does when it stops).

    deployment: the prefect.yaml entry to read; name: register it under another name (one per GPU machine);
    collision_strategy: override prefect.yaml's ENQUEUE/CANCEL_NEW; paused: register the schedule inactive.
    Raises DeploymentNotPaused when the deployment it registered could not be paused on the way out.
    """
    import asyncio

    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.exceptions import TerminationSignal
    from prefect.runner import Runner
    from prefect.schedules import Cron

    from flows.finetune import finetune

    spec = load_deployment(deployment, path)
    strategy = (collision_strategy or spec.collision_strategy).upper()
    if strategy not in COLLISION_STRATEGIES:
        raise DeploymentSpecError(f"collision strategy {strategy!r} is not one of {', '.join(COLLISION_STRATEGIES)}")
    limit = None if spec.concurrency_limit is None else ConcurrencyLimitConfig(
        limit=spec.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy(strategy))
    schedules = [Cron(s.cron, timezone=s.timezone, active=s.active and not paused) for s in spec.schedules]
    name = name or spec.name
    # The deployment records the flow's entrypoint relative to the working directory: serve from the project
    # root so it reads `flows/finetune.py:finetune`, as prefect.yaml does.
    os.chdir(PROJECT_ROOT)
    # What `finetune.serve()` does, with the deployment's id kept: Prefect pauses it when the runner stops, but only
    # from inside the runner's startup; a Ctrl-C in the runner's first second (or between registering and starting)
    # left the schedule live with nothing serving it. The `finally` pauses it whenever this serve registered it.
    runner = Runner(name=name, pause_on_shutdown=True)
    deployment_id = None
    try:
        # Registering is one or two requests, made on Prefect's loop thread: a Ctrl-C here would leave the
        # request running and its id unknown. Held until registration ends, it then lands with the id known.
        with _signals_held():
            deployment_id = runner.add_flow(
                finetune, name=name, schedules=schedules, parameters=spec.parameters, concurrency_limit=limit,
                description=spec.description, tags=spec.tags,
                # No per-process `limit`: the server-side deployment limit decides, so a waiting or cancelled run
                # says why in the UI ("AwaitingConcurrencySlot", "Deployment concurrency limit reached.").
            )
        # asyncio.run, with its loop built whole first: a signal in the middle of the build (CI, a SIGTERM right after
        # "is being served") left half a loop, whose __del__ printed a traceback.
        aio, serving = asyncio.Runner(), None
        try:
            with _signals_held():
                aio.get_loop()
            print(f"Your flow 'finetune' is being served and polling for scheduled runs! Trigger a run with:\n\n"
                  f"\t$ prefect deployment run 'finetune/{name}'\n", flush=True)
            serving = runner.start()
            aio.run(serving)
        except (KeyboardInterrupt, TerminationSignal) as e:
            print(f"Received {type(e).__name__}, shutting down...", file=sys.stderr, flush=True)
        finally:
            try:
                aio.close()  # a second signal here cuts it short: the coroutine below is closed all the same
            finally:
                # Not started when a signal beat the loop to it: closed, no "never awaited" warning. One that started
                # was finished by aio.close(), or (a signal cut that short) is left alone: closing it would run its
                # cleanup with no loop.
                if serving is not None and inspect.getcoroutinestate(serving) == inspect.CORO_CREATED:
                    serving.close()
    finally:
        # Raised over whatever ended serving (a Ctrl-C, an error: kept as its __context__): a script or systemd unit
        # must be able to tell from the exit code that a schedule was left live with nothing serving it.
        if deployment_id is not None and not _pause_if_active(deployment_id, f"finetune/{name}"):
            raise DeploymentNotPaused(f"finetune/{name}")


@contextmanager
def _signals_held(reraise: bool = True):
    """Ctrl-C (SIGINT) and SIGTERM that arrive inside the block raise KeyboardInterrupt when it ends, not in it
    (`reraise=False`: they are dropped, for a block that is already the way out). Signals this process ignores stay
    ignored; off the main thread (no signal handlers there) nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if got and reraise:
        raise KeyboardInterrupt


def _pause_if_active(deployment_id: UUID, full_name: str) -> bool:
    """Pause the deployment, as the runner's own shutdown does (`Runner._pause_schedules`), when that did not run.
    True once it is paused; False, after one line saying why and what to do, when it could not be."""
    from prefect.client.orchestration import get_client

    try:
        # A second Ctrl-C or SIGTERM here (a user pressing again, systemd's stop) must not cut the pause short: Prefect's
        # runner answers SIGTERM with sys.exit(0), which left the schedule live behind an exit code of 0.
        with _signals_held(reraise=False), get_client(sync_client=True) as client:
            if client.read_deployment(deployment_id).paused:  # the runner's shutdown paused it
                return True
            client.pause_deployment(deployment_id)
        print(f"{full_name} paused: its schedule waits for the next `qlora-pipeline serve`", file=sys.stderr, flush=True)
        return True
    except (Exception, KeyboardInterrupt, SystemExit) as e:
        print(f"{full_name} NOT paused ({type(e).__name__}: {e}): its schedule stays active with nothing serving it; "
              f"pause it in the Prefect UI or start `qlora-pipeline serve` again", file=sys.stderr, flush=True)
        return False
