"""The `finetune/nightly` deployment as a user runs it: prefect.yaml parses against Prefect's own schema, and
against a real local server (subprocess, SQLite) `qlora-pipeline serve` registers it with its schedule,
`prefect deployment run ... -p` runs it to completion, and two runs at once never share the machine (the
second waits under ENQUEUE, is cancelled under CANCEL_NEW). `prefect deploy` registers the same thing to a
process work pool, and a `prefect worker` polling that pool executes a deployment run.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import pytest
import yaml

from prefect_local import PREFECT, ROOT, Serve, stop_process

STAGE_TASKS = ["1-data", "2-profile", "3-probe", "4-train", "5-evaluate", "6-merge", "7-publish", "8-export"]


def test_prefect_yaml_parses_and_names_the_flow_and_a_schedule():
    from prefect.cli.deploy._models import PrefectYamlModel

    from flows.deploy import ENTRYPOINT, load_deployment
    from flows.finetune import finetune

    raw = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(raw)  # the schema `prefect deploy` applies
    nightly = next(d for d in model.deployments if d.name == "nightly")
    assert nightly.entrypoint == ENTRYPOINT == "flows/finetune.py:finetune"
    assert [s.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.work_pool.name == "gpu-local"
    assert set(nightly.parameters) <= set(inspect.signature(finetune.fn).parameters), "a parameter the flow does not take"

    spec = load_deployment("nightly")
    assert (spec.concurrency_limit, spec.collision_strategy) == (1, "ENQUEUE")
    assert spec.parameters["profile"] and spec.parameters["default_hours"]


@pytest.mark.parametrize("given, expected", [
    ({"profile": "tiny", "minutes": 1}, 60.0),                    # was 4h1m: the deployment's hours added to the minutes
    ({"profile": "demo"}, "profile"),                             # was 4 hours: the profile's own budget applies
    ({"profile": "tiny", "hours": 0.5, "minutes": 6}, 2160.0),    # both given: they add up, as on the command line
    ({}, "default_hours"),                                        # the nightly run: mistral-7b sets none, the default applies
])
def test_deployment_run_parameters_replace_the_budget_never_add_to_it(given, expected):
    from flows.deploy import load_deployment
    from flows.finetune import budget_label, run_config
    from tasks.config import load_config

    params = {**load_deployment("nightly").parameters, **given}  # what Prefect passes: the defaults, then each -p
    cfg = run_config(params["profile"], params["hours"], params["minutes"], params["overrides"], None, params["default_hours"])
    if expected == "profile":
        expected = load_config(profile=params["profile"]).budget.seconds
    elif expected == "default_hours":
        expected = params["default_hours"] * 3600
    assert cfg.budget.seconds == expected
    if given.get("minutes") == 1:
        assert budget_label(cfg.budget.hours, cfg.budget.minutes) == "1m"


def test_a_run_without_a_budget_is_refused_before_stage_1(tmp_path):
    from flows.finetune import finetune
    from tasks.config import ConfigError

    art = tmp_path / "artifacts"
    with pytest.raises(ConfigError, match="budget: profile 'tiny' sets no time budget.*-p hours=H or -p minutes=M"):
        finetune.fn(profile="tiny", overrides=[f"artifacts_dir={art}", "budget.minutes=null"])
    assert not (art / "cache").exists()  # before: data and profile ran, then the probe failed


def test_a_broken_deployment_entry_is_reported_by_key(tmp_path):
    from flows.deploy import DeploymentSpecError, load_deployment

    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: nightly\n    entrypoint: flows/finetune.py:finetune\n"
                   "    schedules: [{interval: 60}]\n    concurrency_limit: {limit: 0, collision_strategy: DROP}\n")
    with pytest.raises(DeploymentSpecError) as e:
        load_deployment("nightly", bad)
    msg = str(e.value)
    assert "schedules[0]" in msg and "concurrency_limit.limit" in msg and "collision_strategy" in msg
    with pytest.raises(DeploymentSpecError, match="no deployment named 'weekly'"):
        load_deployment("weekly", bad)


# ---------------------------------------------------------------------------------------------------------
# How `qlora-pipeline serve` ends, in this process: Prefect's Runner is replaced by one that registers and then stops
# as told (its registering and serving are covered against a real server below); the pause on the way out is the real
# code, with Prefect's client against a dead server where the pause must fail.


class _Runner:
    """`prefect.runner.Runner` as serve uses it: add_flow registers (returns the deployment id), start serves."""

    ends_with: str = "ctrl-c serving"
    """ctrl-c serving | ctrl-c registering (a signal during add_flow, held until it returns) | error serving |
    ctrl-c before registering | sigterm serving (the runner's sys.exit(0)) | exit with a message serving |
    error and ctrl-c serving (a BaseExceptionGroup) | cancelled serving"""

    def __init__(self, name: str, pause_on_shutdown: bool):
        self.name = name

    def add_flow(self, flow, **kwargs):
        if self.ends_with == "ctrl-c before registering":
            raise KeyboardInterrupt
        if self.ends_with == "ctrl-c registering":
            os.kill(os.getpid(), signal.SIGINT)
        return uuid4()

    async def start(self):
        import asyncio

        ends = {"error serving": RuntimeError("runner lost its server"), "sigterm serving": SystemExit(0),
                "exit with a message serving": SystemExit("runner: port in use"),
                "error and ctrl-c serving": BaseExceptionGroup("runner", [RuntimeError("runner lost its server"), KeyboardInterrupt()]),
                "cancelled serving": asyncio.CancelledError("runner task cancelled")}
        raise ends.get(self.ends_with, KeyboardInterrupt())


class _Client:
    """Prefect's sync client, enough for `_pause_if_active`: the deployment reads as `paused` until it is paused."""

    def __init__(self, paused: bool):
        self.paused, self.pause_calls = paused, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_deployment(self, deployment_id):
        return SimpleNamespace(paused=self.paused)

    def pause_deployment(self, deployment_id):
        self.pause_calls += 1
        self.paused = True


@pytest.fixture
def serve_here(monkeypatch, tmp_path):
    """`main(["serve"])` in this process with the fake Runner; PREFECT_API_URL set to `url`. Signal handlers (serve sets
    SIGINT/SIGTERM) and the working directory (serve moves to the project root) are restored afterwards."""
    import prefect.runner
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.cli import main
    from prefect_local import free_port

    monkeypatch.setattr(prefect.runner, "Runner", _Runner)
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(ends_with: str, url: str = f"http://127.0.0.1:{free_port()}/api") -> int:  # default: nothing listens there
        monkeypatch.setattr(_Runner, "ends_with", ends_with)
        with temporary_settings({PREFECT_API_URL: url}):
            return main(["serve"])

    yield run
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.mark.parametrize("ends_with, traceback_of", [
    ("ctrl-c serving", None), ("ctrl-c registering", None), ("sigterm serving", None), ("exit with a message serving", None),
    ("error serving", "RuntimeError: runner lost its server"),
    # BaseExceptions that are faults: their traceback was dropped, as a Ctrl-C's is
    ("error and ctrl-c serving", "RuntimeError: runner lost its server"), ("cancelled serving", "CancelledError: runner task cancelled")])
def test_serve_exits_3_when_the_deployment_it_registered_could_not_be_paused(serve_here, capfd, ends_with, traceback_of):
    # The Prefect server is gone when serve stops: the schedule stays live with nothing serving it. This exited 0
    # (Ctrl-C registering: "stopped before serving", 0), so a script or systemd unit could not tell.
    from flows.cli import EXIT_NOT_PAUSED

    assert serve_here(ends_with) == EXIT_NOT_PAUSED == 3
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "NOT paused" in line]
    assert len(lines) == 1 and lines[0].startswith("finetune/nightly NOT paused (ConnectError"), err[-3000:]
    assert "pause it in the Prefect UI" in lines[0] and "stopped before serving" not in err
    # a fault that ended serving still shows its traceback; a stop request shows none, only a SystemExit's message
    assert ("Traceback" in err) == (traceback_of is not None), err[-3000:]
    assert traceback_of is None or traceback_of in err, err[-3000:]
    assert ("runner: port in use" in err) == (ends_with == "exit with a message serving"), err[-3000:]


@pytest.mark.parametrize("ends_with, paused_by_runner", [
    ("ctrl-c serving", False), ("ctrl-c serving", True), ("ctrl-c registering", False)])
def test_serve_exits_0_once_its_deployment_is_paused(serve_here, capfd, monkeypatch, ends_with, paused_by_runner):
    import prefect.client.orchestration

    client = _Client(paused=paused_by_runner)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: client)
    assert serve_here(ends_with) == 0
    assert client.paused and client.pause_calls == (0 if paused_by_runner else 1)
    err = capfd.readouterr().err
    assert "NOT paused" not in err and ("stopped before serving" in err) == (ends_with == "ctrl-c registering"), err[-3000:]


@pytest.mark.parametrize("server_up", [True, False], ids=["pauses", "server-gone"])
def test_a_second_sigterm_while_pausing_neither_cuts_the_pause_nor_exits_0_unpaused(serve_here, capfd, monkeypatch, server_up):
    """systemd's stop, or a user pressing again, while serve pauses its deployment: Prefect's runner answers SIGTERM
    with sys.exit(0), which cut the pause short and exited 0 with the schedule live (a review's repro, 2026-12-02)."""
    import sys

    import prefect.client.orchestration

    from flows.cli import EXIT_NOT_PAUSED

    async def start(self):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # Runner.start's handle_sigterm, once stopping
        raise KeyboardInterrupt

    class _SignalledClient(_Client):
        def read_deployment(self, deployment_id):
            os.kill(os.getpid(), signal.SIGTERM)
            if not server_up:
                raise ConnectionError("server gone")
            return super().read_deployment(deployment_id)

    client = _SignalledClient(paused=False)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: client)
    monkeypatch.setattr(_Runner, "start", start)
    assert serve_here("ctrl-c serving") == (0 if server_up else EXIT_NOT_PAUSED)
    assert client.paused == server_up
    err = capfd.readouterr().err
    assert ("NOT paused (ConnectionError" in err) != server_up, err[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_the_event_loop_is_built_stops_serve_without_a_traceback(serve_here, capfd, monkeypatch, sig):
    """CI, 2026-12-05: a SIGTERM right after "is being served" landed inside asyncio.run's loop construction (before
    its self-pipe existed); the half-built loop's __del__ then printed "Exception ignored ... Traceback ...
    AttributeError: ... '_ssock'" and "coroutine 'Runner.start' was never awaited"."""
    import asyncio.selector_events
    import sys

    build = asyncio.selector_events.BaseSelectorEventLoop._make_self_pipe

    sent = []

    def make_self_pipe(self):
        sent.append(sig)
        os.kill(os.getpid(), sig)  # its handler raises KeyboardInterrupt at the next bytecode: in the middle of the build
        build(self)

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # serve's hook passes other errors on to this one
    monkeypatch.setattr(asyncio.selector_events.BaseSelectorEventLoop, "_make_self_pipe", make_self_pipe)
    # "error serving": had Runner.start run (the signal missed the build), its RuntimeError would fail the test
    rc, client, never_awaited = _serve_against_a_fake_client(serve_here, monkeypatch, "error serving")
    assert rc == 0 and sent == [sig] and client.paused
    assert not unraisable, [(u.exc_type, u.exc_value, u.object) for u in unraisable]
    assert not never_awaited, never_awaited
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_signal_while_the_loop_closes_leaves_no_never_awaited_warning(serve_here, monkeypatch, sig):
    """A signal beats the loop to Runner.start (its coroutine made, not started), and a second one (Ctrl-C pressed
    again, systemd's SIGTERM after a Ctrl-C) lands while serve closes the loop: aio.close() raised, the
    serving.close() after it was skipped, and the coroutine's garbage collection warned "never awaited"."""
    import asyncio.base_events

    run, shutdown = asyncio.Runner.run, asyncio.base_events.BaseEventLoop.shutdown_default_executor
    sent = []

    def run_signalled(self, coro, **kwargs):
        sent.append("first")
        os.kill(os.getpid(), sig)  # before its task is made: the coroutine never starts
        return run(self, coro, **kwargs)

    def shutdown_signalled(self, *args):
        sent.append("second")
        os.kill(os.getpid(), sig)  # inside aio.close()
        return shutdown(self, *args)

    monkeypatch.setattr(asyncio.Runner, "run", run_signalled)
    monkeypatch.setattr(asyncio.base_events.BaseEventLoop, "shutdown_default_executor", shutdown_signalled)
    rc, client, never_awaited = _serve_against_a_fake_client(serve_here, monkeypatch, "ctrl-c serving")
    assert rc == 0 and sent == ["first", "second"] and client.paused
    assert not never_awaited, never_awaited


def _serve_against_a_fake_client(serve_here, monkeypatch, mode: str):
    """`serve_here(mode)` with Prefect's client faked and every warning recorded, garbage collected after (where a
    coroutine that never ran warns): its exit status, the fake client, and the "never awaited" warnings."""
    import gc
    import warnings

    import prefect.client.orchestration

    client = _Client(paused=False)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: client)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        rc = serve_here(mode)
        gc.collect()
    return rc, client, [str(w.message) for w in warned if "never awaited" in str(w.message)]


def test_serve_stopped_before_registering_exits_0_and_pauses_nothing(serve_here, capfd, monkeypatch):
    import prefect.client.orchestration

    monkeypatch.setattr(prefect.client.orchestration, "get_client", lambda sync_client: pytest.fail("nothing to pause"))
    assert serve_here("ctrl-c before registering") == 0
    err = capfd.readouterr().err
    assert "stopped before serving" in err and "paused" not in err, err[-3000:]


# ---------------------------------------------------------------------------------------------------------
# Against a real server


@pytest.fixture(scope="module")
def served(server, tmp_path_factory):
    """`qlora-pipeline serve`: finetune/nightly from prefect.yaml (ENQUEUE), runs executed here."""
    proc = Serve(server, log=tmp_path_factory.mktemp("serve") / "serve.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    """One artifacts folder for the module: the first run computes, later ones hit the caches (seconds), which
    doesn't weaken the concurrency tests: both runs are submitted in the same poll, so the second asks for the
    slot while the first holds it, however short the first is."""
    return tmp_path_factory.mktemp("deploy") / "artifacts"


def _tiny(art: Path) -> dict:
    # The per-run overrides a user passes with -p: a tiny model, one minute, a private artifacts folder.
    return {"profile": "tiny", "hours": None, "minutes": 1, "overrides": [f"artifacts_dir={art}"]}


def _interval(run: dict) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(run["start_time"]), datetime.fromisoformat(run["end_time"])


@pytest.mark.slow
def test_serve_registers_nightly_and_deployment_run_completes(server, served, art):
    dep = server.get("/deployments/name/finetune/nightly")
    assert dep["entrypoint"] == "flows/finetune.py:finetune"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]
    assert dep["global_concurrency_limit"]["limit"] == 1
    assert dep["concurrency_options"]["collision_strategy"] == "ENQUEUE"

    run_id = server.run_deployment("finetune/nightly", **_tiny(art))  # `prefect deployment run finetune/nightly -p ...`
    run = server.wait(run_id)
    assert run["state_type"] == "COMPLETED", (run["state"], served.log.read_text()[-3000:])
    assert run["name"].startswith("tiny-1m-")  # <profile>-<budget>-<date>
    assert run["parameters"]["profile"] == "tiny"
    names = sorted(t["name"].rsplit("-", 1)[0] for t in server.task_runs(run_id))
    assert names == STAGE_TASKS
    assert (art / "latest.json").is_file() and list(art.glob("runs/tiny-1m-*/summary.json"))


@pytest.mark.slow
def test_two_runs_at_once_queue_one_after_the_other(server, served, art):
    dep = server.get("/deployments/name/finetune/nightly")
    params = _tiny(art)
    ids = [server.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"] for _ in range(2)]
    runs = [server.wait(i) for i in ids]
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], [r["state"] for r in runs]

    first, second = sorted(runs, key=lambda r: r["start_time"])
    assert _interval(first)[1] <= _interval(second)[0], "the two runs overlapped"
    assert "AwaitingConcurrencySlot" in server.state_names(second["id"])  # what the UI shows as the reason


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopped_as_soon_as_it_serves_the_deployment_ends_paused(server, tmp_path, sig):
    # "is being served" shows once the deployment is registered, while the runner is still starting (its client,
    # process manager, ...). Prefect pauses the deployment in the runner's shutdown, which a signal in that first
    # second skipped: exit 0, "shutting down", and the schedule left live with nothing serving it (4 of 4 for
    # Ctrl-C in a review; SIGTERM killed the process outright). Polled every 0.05 s to land in that window.
    name = f"stopped-early-{sig.name.lower()}"
    proc = Serve(server, "--name", name, log=tmp_path / "serve.log").start(poll=0.05).proc
    stop_process(proc, sig)
    log = (tmp_path / "serve.log").read_text()
    assert proc.returncode == 0 and "Traceback" not in log, log[-3000:]
    assert server.get(f"/deployments/name/finetune/{name}")["paused"], log[-3000:]


@pytest.mark.slow
def test_cancel_new_cancels_the_second_run(server, art, tmp_path):
    cancel = Serve(server, "--name", "nightly-cancel", "--collision-strategy", "CANCEL_NEW", "--paused",
                   log=tmp_path / "serve-cancel.log").start()
    try:
        dep = server.get("/deployments/name/finetune/nightly-cancel")
        assert dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
        assert not any(s["active"] for s in dep["schedules"])  # --paused
        # The second run is created once the first is training, and must find the slot held. So the first run
        # computes (a fresh artifacts folder, not the module's caches) and trains on the clock for ~20 s (no
        # step cap): the tiny profile's 12 capped steps took seconds, and the runner, polling every 2 s, once
        # started the second run after the first had finished (both COMPLETED).
        params = {**_tiny(tmp_path / "artifacts"), "minutes": 0.35}
        params["overrides"] = [*params["overrides"], "training.max_steps=null"]
        first = server.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]
        server.wait_for_task(first, "4-train")
        second = server.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]
        runs = [server.wait(first), server.wait(second)]
    finally:
        cancel.stop()
    assert cancel.proc.returncode == 0, "serve, started with SIGINT ignored, did not stop on Ctrl-C (killed after 30 s)"
    by_state = {r["state_type"]: r for r in runs}
    assert set(by_state) == {"COMPLETED", "CANCELLED"}, [r["state"] for r in runs]
    assert "concurrency limit" in by_state["CANCELLED"]["state"]["message"]


@pytest.mark.slow
def test_prefect_deploy_to_a_process_pool_and_a_worker_runs_it(server, art, tmp_path):
    # Runs last in this module: it re-registers finetune/nightly with a work pool instead of the served runner.
    # README "The control plane on one machine, the GPU worker on another", on loopback: server, pool, deploy,
    # worker, `prefect deployment run`.
    server.prefect("work-pool", "create", "gpu-local", "--type", "process")
    server.prefect("--no-prompt", "deploy", "--name", "nightly", timeout=300)
    dep = server.get("/deployments/name/finetune/nightly")
    assert dep["work_pool_name"] == "gpu-local"
    assert dep["entrypoint"] == "flows/finetune.py:finetune"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]
    assert dep["global_concurrency_limit"]["limit"] == 1
    # prefect.yaml: hours unset (a run's own budget replaces the profile's), 4 hours only when nothing else gives one
    assert dep["parameters"]["profile"] == "mistral-7b" and dep["parameters"].get("hours") is None and dep["parameters"]["default_hours"] == 4
    pool = server.get("/work_pools/gpu-local")
    assert pool["type"] == "process"

    log = tmp_path / "worker.log"
    # SIGINT as in a terminal, whatever this suite inherited: Prefect's worker stops on Ctrl-C only when it is not ignored.
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "gpu-local", "--name", "gpu-box"], cwd=ROOT,
                              env={**server.env, "PREFECT_WORKER_QUERY_SECONDS": "2"},
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        run_id = server.run_deployment("finetune/nightly", **_tiny(art))
        run = server.wait(run_id)
    finally:
        stop_process(worker, signal.SIGINT)
    assert run["state_type"] == "COMPLETED", (run["state"], log.read_text()[-3000:])
    assert run["work_pool_name"] == "gpu-local"
    worker_rec = server.post("/work_pools/gpu-local/workers/filter", {})
    assert [w["name"] for w in worker_rec] == ["gpu-box"]  # the worker that picked it up reported in
    assert sorted(t["name"].rsplit("-", 1)[0] for t in server.task_runs(run_id)) == STAGE_TASKS


def _cancel_from_prefect(server, run: str) -> dict:
    """Cancel flow run `run` as the UI's Cancel does (the server holds it Cancelling; its runner stops the process), and
    wait for its final state."""
    server.post(f"/flow_runs/{run}/set_state", {"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    return server.wait(run)


def _latest_summary(art: Path) -> dict:
    """The summary.json of the newest run in artifacts folder `art`."""
    import json

    return json.loads(Path(json.loads((art / "latest.json").read_text())["summary"]).read_text())


@pytest.mark.slow
def test_cancelling_a_run_mid_training_ends_cancelled(server, tmp_path):
    # Training stops on SIGTERM as on Ctrl-C (a checkpoint at that step). The runner cancelling a deployment run sends
    # SIGTERM too, acknowledged only while Prefect's handler is installed: with training's, the run ended Crashed
    # ("aborted by an interrupt signal"), not Cancelled, its cancellation hooks not run.
    import json
    import time

    srv = Serve(server, "--name", "cancel-mid-training", "--paused", log=tmp_path / "serve.log").start()
    art = tmp_path / "artifacts"
    try:
        dep = server.get("/deployments/name/finetune/cancel-mid-training")
        params = {**_tiny(art), "minutes": 0.6}
        params["overrides"] = [*params["overrides"], "training.max_steps=null", "training.checkpoint_minutes=60"]
        run = server.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": params})["id"]
        server.wait_for_task(run, "4-train")
        deadline, step = time.monotonic() + 200, 0
        while time.monotonic() < deadline and step < 10:
            beat = sorted(art.glob("cache/train/*/work/heartbeat.json"))
            step = json.loads(beat[0].read_text())["step"] if beat else 0
            time.sleep(0.2)
        final = _cancel_from_prefect(server, run)
    finally:
        srv.stop()
    assert final["state_type"] == "CANCELLED", (final["state"], (tmp_path / "serve.log").read_text()[-3000:])
    # The run's summary says so too, in its stage (it was `failed`, `failed_stage: train`).
    summary = _latest_summary(art)
    assert summary["status"] == "cancelled" and summary["cancelled_stage"] == "train" and "failed_stage" not in summary, summary
    assert summary["stages"]["train"]["message"] == "cancelled from Prefect", summary["stages"]["train"]
    # The UI too: the stage Cancel stopped reads Cancelled, the ones before it Completed (it read Crashed: Prefect's task
    # engine records a TerminationSignal in a task as a crash, whatever the flow run's state).
    tasks = {t["name"].rsplit("-", 1)[0]: t["state"] for t in server.task_runs(run)}
    assert {name: s["type"] for name, s in tasks.items()} == {"1-data": "COMPLETED", "2-profile": "COMPLETED", "3-probe": "COMPLETED",
                                                              "4-train": "CANCELLED"}, tasks
    assert tasks["4-train"]["message"] == "cancelled from Prefect", tasks["4-train"]


@pytest.mark.slow
def test_cancelling_a_run_between_stages_records_it_cancelled(server, tmp_path):
    # A Cancel after one stage finished and before the next started stopped the flow outside any stage: the run ended
    # Cancelled in Prefect, its summary stayed `running` and the next run on the machine marked it `crashed`.
    import time

    srv = Serve(server, "--name", "cancel-between-stages", "--paused", log=tmp_path / "serve.log",
                env={"QLORA_PIPELINE_FAULT": "after-data:sleep@120"}).start()
    art = tmp_path / "artifacts"
    try:
        dep = server.get("/deployments/name/finetune/cancel-between-stages")
        run = server.post(f"/deployments/{dep['id']}/create_flow_run", {"parameters": _tiny(art)})["id"]
        deadline, summary = time.monotonic() + 200, {}
        while time.monotonic() < deadline and summary.get("stages", {}).get("data", {}).get("status") != "completed":
            summary = _latest_summary(art) if (art / "latest.json").is_file() else {}
            time.sleep(0.2)
        final = _cancel_from_prefect(server, run)
    finally:
        srv.stop()
    assert final["state_type"] == "CANCELLED", (final["state"], (tmp_path / "serve.log").read_text()[-3000:])
    summary = _latest_summary(art)
    assert summary["status"] == "cancelled" and summary["cancelled_stage"] == "profile" and "failed_stage" not in summary, summary
    assert summary["stages"]["data"]["status"] == "completed", summary["stages"]
    assert summary["stages"]["profile"] == {"status": "cancelled", "seconds": 0, "message": "cancelled from Prefect before the stage started"}, summary["stages"]
    assert {t["name"].rsplit("-", 1)[0]: t["state_type"] for t in server.task_runs(run)} == {"1-data": "COMPLETED"}
