"""Scheduled runs: the `finetune/nightly` deployment, defined once in prefect.yaml and served from this machine.

    prefect server start                                    # API + UI (SQLite), http://127.0.0.1:4200
    qlora-pipeline serve                                    # register finetune/nightly and execute its runs here
    prefect deployment run finetune/nightly -p hours=2      # a run now, any parameter overridden
    qlora-pipeline serve --collision-strategy CANCEL_NEW    # a run that finds the GPU busy is cancelled, not queued

`serve` reads schedule, parameters and concurrency from prefect.yaml, so `prefect deploy --name nightly` (to a
process work pool, run by `prefect worker start`) and `qlora-pipeline serve` register the same deployment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Register `finetune/<name>` with the Prefect server (PREFECT_API_URL) and execute its runs until Ctrl-C.

    deployment: the prefect.yaml entry to read; name: register it under another name (one per GPU machine);
    collision_strategy: override prefect.yaml's ENQUEUE/CANCEL_NEW; paused: register the schedule inactive.
    """
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from flows.finetune import finetune

    spec = load_deployment(deployment, path)
    strategy = (collision_strategy or spec.collision_strategy).upper()
    if strategy not in COLLISION_STRATEGIES:
        raise DeploymentSpecError(f"collision strategy {strategy!r} is not one of {', '.join(COLLISION_STRATEGIES)}")
    limit = None if spec.concurrency_limit is None else ConcurrencyLimitConfig(
        limit=spec.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy(strategy))
    schedules = [Cron(s.cron, timezone=s.timezone, active=s.active and not paused) for s in spec.schedules]
    # The deployment records the flow's entrypoint relative to the working directory: serve from the project
    # root so it reads `flows/finetune.py:finetune`, as prefect.yaml does.
    os.chdir(PROJECT_ROOT)
    finetune.serve(
        name=name or spec.name, schedules=schedules, parameters=spec.parameters, global_limit=limit,
        description=spec.description, tags=spec.tags,
        # No per-process `limit`: the server-side deployment limit decides, so a waiting or cancelled run says
        # why in the UI ("AwaitingConcurrencySlot", "Deployment concurrency limit reached.").
    )
