"""The `finetune` flow: eight cached stages, wired the way you would draw them.

    data -> profile -> probe -> train -> evaluate -> merge -> publish -> export

Export (GGUF, Ollama Modelfile, opt-in GPTQ) is its own stage after publish rather than part of it: it can fail
on things publish should not (an architecture llama.cpp's converter lacks), it retries without republishing,
and changing `export.*` redoes only it; it adds its files to this run's published folder and its manifest (a folder
published by an earlier run is hard-linked into this run's, never rewritten).

Run it with `qlora-pipeline run --profile demo` (or `make run`), deploy it as `flows/finetune.py:finetune`.
Every stage is a Prefect task keyed on content, so a rerun reuses what is done and resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled

from tasks.common import TrainingStopped, artifacts_root, human_seconds, maybe_fault, process_space, read_json, recorded_process_gone, remove_dead_builds, safe_name, write_json
from tasks.config import DEFAULT_CONFIG_PATH, ConfigError, PipelineConfig, load_config
from tasks.hub import check_hub_reachable, hub_offline_restored, pin_hub_revisions
from tasks.preflight import check_model
from tasks.prefect_glue import CANCELLED_FROM_PREFECT, cancelling_in_prefect, task_options
from tasks.stages import data_task, evaluate_task, export_task, merge_task, probe_task, profile_task, publish_task, train_task

# The stages in the order the flow runs them (the drawing above).
STAGES = ("data", "profile", "probe", "train", "evaluate", "merge", "publish", "export")


class CancelledFromPrefect(TerminationSignal):
    """Prefect's Cancel stopped a stage, whose task run ended Cancelled (tasks/prefect_glue.py: cancelled_by_prefect): the
    SIGTERM's TerminationSignal raised again in the flow, so Prefect's flow engine ends the run as it ends any cancelled run."""


def _run_name() -> str:
    p = flow_run.parameters
    # The flow-run id's head keeps two runs started in the same second (same artifacts/) in distinct folders.
    unique = str(flow_run.id or "")[:4]
    if flow_run.name and re.fullmatch(rf".+-\d{{8}}-\d{{6}}-{re.escape(unique)}", flow_run.name):
        return flow_run.name  # a retry of this flow run (`prefect flow-run retry`): same name, same run folder
    try:
        b = run_config(p.get("profile"), p.get("hours"), p.get("minutes"), p.get("overrides"), p.get("config_path"), p.get("default_hours")).budget
        budget = budget_label(b.hours, b.minutes) or "no-budget"
    except ConfigError:
        budget = "no-budget"  # the flow reports the config error itself
    return safe_name(f"{p.get('profile') or 'default'}-{budget}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{unique}")


def run_config(profile: str | None, hours: float | None, minutes: float | None, overrides: list[str] | None,
               config_path: str | None, default_hours: float | None = None) -> PipelineConfig:
    """The run's config. A budget given as a parameter (hours, minutes, or both: they add up) replaces the profile's;
    without one the profile's (or `--set budget.*`) applies, and only without that `default_hours` (the deployment's
    nightly budget). A run with no budget at all is refused here, before stage 1."""
    path = config_path or DEFAULT_CONFIG_PATH
    cfg = load_config(path, profile, overrides or [], hours, minutes)
    if cfg.budget.seconds is None and default_hours is not None:
        cfg = load_config(path, profile, overrides or [], default_hours, None)
    if cfg.budget.seconds is None:
        raise ConfigError([f"budget: profile {cfg.profile!r} sets no time budget; pass one (-p hours=H or -p minutes=M on a "
                           "deployment run, --hours/--minutes on the command line) or set budget.hours in pipeline.yaml"])
    return cfg


def budget_label(hours: float | None, minutes: float | None) -> str | None:
    """`4h`, `5m`, `1h30m`; None when neither is set."""
    label = (f"{hours:g}h" if hours else "") + (f"{minutes:g}m" if minutes else "")
    return label or None


class RunSummary:
    """Stage -> status, cached, seconds, key outputs; written to artifacts/runs/<run>/summary.json.

    `status` says what happened to the run: running, completed, failed, cancelled (a stop signal ended training after a
    checkpoint, or Prefect's Cancel stopped a deployment run in a stage: `cancelled_stage`, or between two stages: the one
    it was about to start; Prefect's state is Cancelled too, the stage's task run's as well; rerunning the same command
    resumes it), crashed (its
    process died without a word: found by the next run on this machine), superseded (failed, cancelled or crashed, and a
    later run of the same config completed: `superseded_by`; that run lists it under `supersedes`). A retry of the same flow run (`prefect
    flow-run retry`) keeps the run's name and folder; the summary counts the attempt and keeps the earlier attempts'
    outcomes (`attempts`).
    """

    def __init__(self, artifacts_dir: str, run_name: str):
        self.root = artifacts_root(artifacts_dir)
        self.run_dir = self.root / "runs" / safe_name(run_name, "run name")
        self.earlier = _read_summary(self.run_dir / "summary.json") or {}  # this run's earlier attempt, on a retry
        attempts = list(self.earlier.get("attempts", []))
        if self.earlier:
            status = "crashed" if self.earlier.get("status") == "running" else self.earlier.get("status")
            attempts.append({"started": self.earlier.get("started"), "finished": self.earlier.get("finished"), "status": status,
                             "failed_stage": self.earlier.get("failed_stage"), "cancelled_stage": self.earlier.get("cancelled_stage")})
        self.data: dict[str, Any] = {
            "run": run_name, "started": _now(), "status": "running", "stages": {}, "config": None,
            "summary_path": str(self.run_dir / "summary.json"), "host": socket.gethostname(), "pid": os.getpid(),
            "process_space": process_space(),
            "flow_run_id": str(flow_run.id) if flow_run.id else None, "attempt": len(attempts) + 1, "attempts": attempts,
        }
        mark_crashed_runs(self.root, exclude=self.data["run"])

    def stage(self, name: str, task, *args, **kwargs):
        """Run one stage task; a cached result whose files are gone is recomputed, not trusted."""
        t0 = time.monotonic()
        entry = self.data["stages"].setdefault(name, {})
        try:
            state = task(*args, return_state=True, **kwargs)
            record = _record(state)
            cached = state.name == "Cached"
            # A record of another artifacts folder (one this one was copied from) is not this run's: its files are there.
            if cached and not (record.outputs_exist() and _inside(getattr(record, "dir", None), self.root)):
                state = task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
                record, cached = _record(state), False
        except BaseException as e:
            self._record_stop(name, entry, e, time.monotonic() - t0)
            raise
        entry.update(status="completed", cached=cached, seconds=round(time.monotonic() - t0, 2), outputs=record.model_dump(mode="json"))
        self.write()
        maybe_fault(f"after-{name}")  # tests only: a stop between this stage and the next
        return record

    @contextlib.contextmanager
    def stops_recorded(self):
        """Around the stages: a stop that reaches the flow between two of them (one recorded, the next not started;
        Prefect's Cancel lands wherever the process is) is recorded in the stage the run was about to start, as a stop in
        a stage is (`_record_stop`), that stage marked never started. It was left `running`, and the next run called it
        `crashed`. After the last stage it names none."""
        try:
            yield
        except BaseException as e:
            if self.data["status"] == "running":
                upcoming = next((s for s in STAGES if self.data["stages"].get(s, {}).get("status") != "completed"), None)
                entry = self.data["stages"].setdefault(upcoming, {}) if upcoming else {}
                self._record_stop(upcoming, entry, e, 0.0, started=False)
            raise

    def _record_stop(self, name: str | None, entry: dict, e: BaseException, seconds: float, started: bool = True) -> None:
        """Record how stage `name` ended when it raised `e`: `cancelled` for TrainingStopped, else `failed`, written before
        anything else can stop the process (a second signal, the runner's kill): never left `running`. A deployment run
        cancelled from Prefect (the runner or worker SIGTERMs the process, Prefect's handler raises TerminationSignal
        wherever it is) is then asked of the server, for a few seconds at most, and rewritten `cancelled` if it says so;
        a stage whose task run already found it so (CancelledFromPrefect) is not asked again."""
        stopped = isinstance(e, TrainingStopped)
        outcome = "cancelled" if stopped else "failed"
        entry.update(status=outcome, seconds=round(seconds, 2), **({"message": str(e)} if stopped else {"error": f"{type(e).__name__}: {e}"}))
        self.data[f"{outcome}_stage"] = name
        with _signals_held():
            self.finish(outcome)
        if isinstance(e, CancelledFromPrefect) or (isinstance(e, TerminationSignal) and cancelling_in_prefect()):
            entry.pop("error")
            entry.update(status="cancelled", message=CANCELLED_FROM_PREFECT if started else f"{CANCELLED_FROM_PREFECT} before the stage started")
            self.data["cancelled_stage"] = self.data.pop("failed_stage")
            with _signals_held():
                self.finish("cancelled")

    def finish(self, status: str) -> None:
        self.data.update(status=status, finished=_now())
        if status == "completed":
            self.data["supersedes"] = supersede_runs(self.root, self.data)
        self.write()

    def write(self) -> None:
        write_json(self.run_dir / "summary.json", self.data)
        write_json(self.root / "latest.json", {"run": self.data["run"], "summary": str(self.run_dir / "summary.json"), "status": self.data["status"]})


def _record(state):
    """A stage task's result. A Cancelled task (tasks/stages.py returns that state so the task run reads Cancelled, not
    Crashed) stops the flow: training stopped by a signal after a checkpoint raises TrainingStopped again, Prefect's
    Cancel its TerminationSignal (CancelledFromPrefect)."""
    if state.is_cancelled():
        if state.message == CANCELLED_FROM_PREFECT:
            raise CancelledFromPrefect(signal.SIGTERM)
        raise TrainingStopped(state.message)
    return state.result()


@contextlib.contextmanager
def _signals_held():
    """Stop signals (Ctrl-C, SIGTERM, SIGHUP) wait until the block ends: a summary being written is written whole. Each
    one that came is handed to its own handler after the block. (Blocking them with pthread_sigmask held them on this
    thread only: in a process with other threads, as a flow run's is, the kernel handed the signal to another thread and
    Python ran the handler here at once; a review, 2026-12-06.) Off the main thread Python runs no handler in the block
    anyway; a signal ignored stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) not in (signal.SIG_IGN, None)]  # None: not Python's
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(got):  # each once, in the order they came
            signal.raise_signal(s)


def _inside(path: str | None, root: Path) -> bool:
    """`path` lies in the artifacts folder `root`: as written (a record's paths are `root`'s own spelling, and a folder
    inside it may be a link to another disk: cache/ or runs/ on a bigger one), or with links resolved (`root` spelled
    through a link to it)."""
    if path is None:
        return True
    return (Path(os.path.abspath(path)).is_relative_to(os.path.abspath(root))
            or Path(path).resolve().is_relative_to(root.resolve()))


def _read_summary(path: Path) -> dict[str, Any] | None:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def _other_summaries(root: Path, exclude: str):
    for path in sorted((root / "runs").glob("*/summary.json")):
        if path.parent.name != exclude and (data := _read_summary(path)) is not None:
            yield path, data


def mark_crashed_runs(root: Path, exclude: str) -> list[str]:
    """Runs of this machine still `running` whose process is gone (SIGKILL, power loss, OOM killer): `crashed`."""
    found = []
    for path, data in _other_summaries(root, exclude):
        if data.get("status") == "running" and recorded_process_gone(data.get("pid"), data.get("host"), data.get("process_space")):
            data.update(status="crashed", finished=_now(), crash_found_by=exclude)
            write_json(path, data)
            remove_dead_builds(path.parent)  # its published folder half assembled: no later run builds that one again
            found.append(data.get("run", path.parent.name))
    return found


def supersede_runs(root: Path, done: dict[str, Any]) -> list[str]:
    """Failed, cancelled or crashed runs of the same config as this completed one: `superseded` (their outcome kept)."""
    names = []
    for path, data in _other_summaries(root, done["run"]):
        if data.get("status") in ("failed", "crashed", "cancelled") and data.get("config") == done["config"]:
            data.update(status="superseded", outcome=data["status"], superseded_by=done["run"])
            write_json(path, data)
            names.append(data.get("run", path.parent.name))
    return names


def unfinished_revisions(root: Path, exclude: str, requested: dict[str, Any]) -> dict[str, Any] | None:
    """The hub commits of the newest failed, cancelled or crashed run of the same command: rerunning it resumes it (its stages and
    checkpoints are keyed on those commits), even when the hub's `main` moved since."""
    for _, data in sorted(_other_summaries(root, exclude), key=lambda pd: str(pd[1].get("started", "")), reverse=True):
        if data.get("status") in ("failed", "crashed", "cancelled") and data.get("requested_config") == requested and data.get("hub_revisions"):
            return data["hub_revisions"]
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@flow(name="finetune", flow_run_name=_run_name, validate_parameters=True)
def finetune(
    profile: str | None = None,
    hours: float | None = None,
    minutes: float | None = None,
    overrides: list[str] | None = None,
    config_path: str | None = None,
    default_hours: float | None = None,
) -> dict[str, Any]:
    """QLoRA-finetune a base model into an instruction follower within a time budget.

    profile: a profile of pipeline.yaml (demo, tiny, mistral-7b, ...); hours/minutes: the training budget, replacing
    the profile's; overrides: `dotted.key=value` settings; config_path: another pipeline.yaml; default_hours: the
    budget when neither hours/minutes nor the profile give one (a deployment's default).
    """
    with hub_offline_restored():  # a cached model loaded offline (check_hub_reachable): offline for this run only
        return _finetune(profile, hours, minutes, overrides, config_path, default_hours)


def _finetune(profile, hours, minutes, overrides, config_path, default_hours) -> dict[str, Any]:
    cfg = run_config(profile, hours, minutes, overrides, config_path, default_hours)
    art = cfg.artifacts_dir
    opts = task_options(art)
    run = RunSummary(art, flow_run.name or _run_name())
    requested = cfg.model_dump(mode="json", by_alias=True)  # before pinning: what a rerun of the same command asks for
    earlier = run.earlier.get("hub_revisions") or unfinished_revisions(run.root, run.data["run"], requested)
    cfg, run.data["hub_revisions"], warnings = pin_hub_revisions(cfg, earlier)
    run.data["requested_config"] = requested
    # Pinned first, then checked on pinning's answer: the hub's one metadata call (no retries, not repeated) tells an
    # offline, uncached model in a line, and has a cached one loaded offline, where the model checks sat through ~48 s
    # of huggingface_hub's retries.
    warnings += check_hub_reachable(cfg, run.data["hub_revisions"])
    for line in warnings:
        get_run_logger().warning(line)
    for line in check_model(cfg.model, cfg.lora, cfg.quant, cfg.device, art, cfg.data.system_prompt, cfg.training.engine):  # model-dependent checks: seconds, before stage 1
        get_run_logger().info(line)
    run.data["config"] = cfg.model_dump(mode="json", by_alias=True)
    run.write()  # from the start: a run killed in stage 1 is found `crashed` by the next one
    with run.stops_recorded():
        return _run_stages(run, cfg, art, opts)


def _run_stages(run: RunSummary, cfg: PipelineConfig, art: str, opts: dict[str, Any]) -> dict[str, Any]:
    try:
        data = run.stage("data", data_task.with_options(**opts), cfg.data, cfg.model, art)
        prof = run.stage("profile", profile_task.with_options(**opts), data, art)
        probe = run.stage("probe", probe_task.with_options(**opts), data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, cfg.device, art)
        train = run.stage("train", train_task.with_options(**opts), data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
        evalr = run.stage("evaluate", evaluate_task.with_options(**opts), data, train, cfg.model, cfg.quant, cfg.eval, cfg.device, art,
                          cfg.data.system_prompt)
        merged = run.stage("merge", merge_task.with_options(**opts), data, train, cfg.model, cfg.quant, cfg.merge, cfg.device, art)
        records = {"data": data, "profile": prof, "probe": probe, "train": train, "evaluate": evalr, "merge": merged}
        published = run.stage("publish", publish_task.with_options(**opts), cfg, run.data["run"], records)
        run.data["published"] = published.dir
        exported = run.stage("export", export_task.with_options(**opts), merged, published, data, cfg.export, cfg.data.system_prompt, art, run.data["run"],
                             cfg.model.trust_remote_code)
        run.data["published"] = exported.published_dir  # this run's folder when publish was cached from an earlier run
    except TrainingStopped as e:  # stopped on purpose with a checkpoint, resumable: Cancelled (Crashed reads as a failure)
        get_run_logger().info(f"finetune: {e}")
        return Cancelled(message=f"{e} (summary: {run.run_dir / 'summary.json'})")

    run.finish("completed")
    total = sum(s["seconds"] for s in run.data["stages"].values())
    get_run_logger().info(f"finetune: done in {human_seconds(total)}; summary: {run.run_dir / 'summary.json'}")
    return run.data
