"""What the thin `@task` wrappers share: content-keyed caching, JSON results, one log line, artifacts.

Cache keys come from each stage's own `cache_key(...)` (content hashes of its inputs + the stage's code
version), never from the flow-run id, so a second run with nothing changed hits every cache. Results are
persisted as JSON (no pickle) under `<artifacts>/.prefect-results`.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import inspect
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.states import State

STAGE_RETRIES_IO = 2  # download/publish: transient network errors
# How long a stopped run asks the server whether it was cancelled from Prefect: well inside the runner's 30 s (docker
# stop's 10 s) between its SIGTERM and its kill.
CANCEL_QUERY_SECONDS = 3.0
CANCELLED_FROM_PREFECT = "cancelled from Prefect"  # the stage's message, in its task run and in summary.json


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


def cancelling_in_prefect(seconds: float = CANCEL_QUERY_SECONDS) -> bool:
    """Whether this flow run is being cancelled from Prefect (the UI's Cancel, `prefect flow-run cancel`): the server holds
    it Cancelling (Cancelled, once the runner has marked it) while the runner or worker stops its process. False without a
    flow run, or an API that does not answer within `seconds`: the runner kills the process 30 s after its SIGTERM (docker
    stop after 10 s), and the client's own retries and timeout took minutes. One request, no retries, in a thread joined
    with that deadline (a second signal still reaches the main thread)."""
    from prefect import get_client
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_REQUEST_TIMEOUT, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    if flow_run.id is None:
        return False
    run_id, answer = flow_run.id, []

    def ask() -> None:
        try:
            with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 0, PREFECT_API_REQUEST_TIMEOUT: seconds}):
                with get_client(sync_client=True, httpx_settings={"timeout": seconds}) as client:
                    answer.append(client.read_flow_run(run_id).state)
        except Exception:
            pass

    context = contextvars.copy_context()  # the API URL may be a setting of this context (a test harness), not the env
    asking = threading.Thread(target=context.run, args=(ask,), name="cancelling-in-prefect", daemon=True)
    asking.start()
    asking.join(seconds)
    state = answer[0] if answer else None
    return state is not None and (state.is_cancelling() or state.is_cancelled())


def cancelled_by_prefect(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stage task body that Prefect's Cancel stops ends its task run Cancelled, not Crashed.

    The runner (or worker) cancels a deployment run with a SIGTERM, which Prefect's handler turns into TerminationSignal
    wherever the stage is. Prefect's task engine records that as a crash whatever the flow run's state (task_engine.py,
    `except TerminationSignal: self.handle_crash(exc)`): the UI showed a red Crashed stage under a Cancelled run. Caught
    here, in the stage, a run the server holds Cancelling returns a Cancelled state instead (not cached: the rerun does
    the stage); the flow reads it as a stop (RunSummary.stage). Any other SIGTERM, or one outside a flow, is raised on."""
    from prefect.exceptions import TerminationSignal

    @functools.wraps(fn)
    def stage_body(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TerminationSignal:
            if in_flow_task_run() and cancelling_in_prefect():
                return cancelled_uncached(CANCELLED_FROM_PREFECT)
            raise

    return stage_body


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
