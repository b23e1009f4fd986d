"""What the thin `@task` wrappers share: content-keyed caching, JSON results, one log line, artifacts.

Cache keys come from each stage's own `cache_key(...)` (content hashes of its inputs + the stage's code
version), never from the flow-run id, so a second run with nothing changed hits every cache. Results are
persisted as JSON (no pickle) under `<artifacts>/.prefect-results`.
"""

from __future__ import annotations

import base64
import inspect
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.states import State

STAGE_RETRIES_IO = 2  # download/publish: transient network errors


def keyed_by(stage: str, key_fn: Callable[..., str]) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect cache_key_fn that calls the stage's `cache_key` with the matching task parameters."""
    sig = inspect.signature(key_fn)

    def cache_key_fn(context, parameters: dict[str, Any]) -> str:
        args = {k: v for k, v in parameters.items() if k in sig.parameters}
        return f"{stage}-{key_fn(**args)}-{artifacts_tag(parameters.get('artifacts_dir', ''))}"

    return cache_key_fn


def artifacts_tag(artifacts_dir: str) -> str:
    """The artifacts folder in every task's key: its records hold that folder's paths. The folder, not its spelling
    (`artifacts`, `artifacts/`, its absolute path or a link to it: one folder, one set of records)."""
    from .common import artifacts_root, fingerprint

    return fingerprint(str(artifacts_root(artifacts_dir).resolve()), length=8)


def task_options(artifacts_dir: str) -> dict[str, Any]:
    """Per-run options: results stored as JSON under this run's artifacts folder."""
    from .common import StageError, artifacts_root, writable_problem

    store = artifacts_root(artifacts_dir) / ".prefect-results"
    problem = writable_problem(str(store))
    if problem:
        raise StageError(problem)
    return {
        "persist_result": True,
        "result_serializer": "json",
        "result_storage": store,  # a Path: local storage without a server-side block
        "cache_expiration": timedelta(days=365),
    }


def in_flow_task_run() -> bool:
    """Whether this code runs as a task run of a flow run: only there does a task's returned state reach a caller that
    reads it (RunSummary.stage). `train_task.fn(...)` (a notebook, a test) or a task called outside any flow hands its
    return value to a caller that expects a record, so there a stop is raised, not returned."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    return ctx is not None and ctx.task_run.flow_run_id is not None


def cancelled_uncached(message: str) -> State:
    """A Cancelled state for a task to return when its work was stopped on purpose (TrainingStopped).

    Prefect's task engine records a raised KeyboardInterrupt as Crashed and has no exception that ends a task run
    Cancelled; a state the task returns becomes the task run's state. The engine commits a returned state to the task's
    cache key as it does a result (it skips only Failed ones), so the transaction is told not to write: the rerun must run
    the stage again (and resume), not find it Cached with nothing in it."""
    from prefect.states import Cancelled
    from prefect.transactions import get_transaction

    txn = get_transaction()
    if txn is not None:
        txn.write_on_commit = False
    return Cancelled(message=message)


def log(message: str) -> None:
    from prefect import get_run_logger

    get_run_logger().info(message)


def png_markdown(path: str | Path, alt: str) -> str:
    """An inline image for a Prefect markdown artifact (the UI can't read local files)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"![{alt}](data:image/png;base64,{data})"


def artifact_key(name: str) -> str:
    # Prefect artifact keys: lowercase letters, numbers and dashes only.
    import re

    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:60]
