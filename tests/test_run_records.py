"""Run records and hub revisions (issue 23 items 3 and 7): a hub outage changes no key, an unpinned hub model is keyed
on the commit it was resolved to, and summaries say what happened to a run — resumed, superseded, crashed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest


HUB = ["data.source=someorg/somedata", "model.name=someorg/somemodel", "data.dedupe=[]"]


def _cfg(tmp_path, *overrides):
    from tasks.config import load_config

    return load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path / 'artifacts'}", *overrides])


def _no_hub_tokenizer(monkeypatch):
    """The data key holds how the model's tokenizer renders a fixed conversation (tasks/data.py `rendering_fingerprint`);
    someorg/somemodel has no tokenizer to load offline, so it renders as a stand-in made of what the real one's memo is
    kept under (`render_stamp`: the model's commit with it), as in test_cache_keys.py."""
    from tasks import data as data_mod

    monkeypatch.setattr(data_mod, "rendering_fingerprint", lambda model, artifacts_dir: data_mod.render_stamp(model)[:16])


def _hub(monkeypatch, answers: dict[str, str] | Exception):
    """The hub's answers (name -> commit), or the error every lookup raises (an outage, a timeout)."""
    from tasks import hub

    asked = []

    def ask(kind, name, token):
        asked.append(name)
        if isinstance(answers, Exception):
            raise answers
        return answers[name]

    monkeypatch.setattr(hub, "ask_hub", ask)
    return asked


def _hf_api(monkeypatch, answer: str | None | Exception):
    """huggingface_hub's HfApi, under the real ask_hub: every model_info/dataset_info returns `answer` as the commit or
    raises it. Returns the names asked, in order."""
    import huggingface_hub

    asked = []

    class FakeHfApi:
        def model_info(self, name, timeout=None, token=None):
            asked.append(name)
            if isinstance(answer, Exception):
                raise answer
            return SimpleNamespace(sha=answer)

        dataset_info = model_info

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return asked


def _http_error(cls, status: int):
    """The error huggingface_hub raises for the hub's HTTP `status` (with its response, as hf_raise_for_status gives it)."""
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/someorg/somemodel"))
    return cls(f"{status} Client Error for url https://huggingface.co/api/models/someorg/somemodel", response=response)


def test_a_hub_outage_keeps_the_keys_of_the_last_resolved_commits(tmp_path, monkeypatch):
    """Before: the data key was sha-based when the hub answered and "main"-based on a timeout, so a run resumed
    during an outage retrained from scratch. Now the commit resolved earlier is reused, and the run says so."""
    _no_hub_tokenizer(monkeypatch)
    from tasks.data import cache_key
    from tasks.hub import pin_hub_revisions

    cfg = _cfg(tmp_path, *HUB)
    _hub(monkeypatch, {"someorg/somedata": "d" * 40, "someorg/somemodel": "m" * 40})
    online, revisions, warnings = pin_hub_revisions(cfg)
    assert (online.data.revision, online.model.revision) == ("d" * 40, "m" * 40) and not warnings
    assert {e["how"] for e in revisions.values()} == {"resolved"}

    _hub(monkeypatch, TimeoutError("read timed out after 10 s"))
    outage, revisions, warnings = pin_hub_revisions(cfg)
    assert cache_key(outage.data, outage.model, outage.artifacts_dir) == cache_key(online.data, online.model, online.artifacts_dir)
    assert len(warnings) == 2 and all("cannot resolve" in w and "TimeoutError" in w and "revision=<commit>" in w for w in warnings)
    assert revisions["data"]["revision"] == "d" * 40 and "hub unreachable" in revisions["data"]["how"]


def test_an_unpinned_hub_model_is_keyed_on_the_commit_main_points_at(tmp_path, monkeypatch):
    """Before, a hub model without model.revision was keyed on null: an upstream update was never seen."""
    _no_hub_tokenizer(monkeypatch)
    from tasks.data import cache_key
    from tasks.hub import pin_hub_revisions

    cfg = _cfg(tmp_path, *HUB)
    keys = []
    for commit in ("1" * 40, "2" * 40):
        _hub(monkeypatch, {"someorg/somedata": "d" * 40, "someorg/somemodel": commit})
        pinned, _, _ = pin_hub_revisions(cfg)
        keys.append(cache_key(pinned.data, pinned.model, pinned.artifacts_dir))
    assert keys[0] != keys[1]


def test_never_resolved_is_said_and_a_retry_reuses_its_first_attempts_commits(tmp_path, monkeypatch):
    from tasks.hub import pin_hub_revisions

    cfg = _cfg(tmp_path, *HUB)
    _hub(monkeypatch, ConnectionError("Couldn't reach the hub"))
    pinned, revisions, warnings = pin_hub_revisions(cfg)
    assert pinned.data.revision is None and revisions["data"]["how"].startswith("unresolved")
    assert any("no earlier run recorded a commit" in w for w in warnings)

    earlier = {"data": {"name": "someorg/somedata", "revision": "e" * 40, "how": "resolved"},
               "model": {"name": "someorg/somemodel", "revision": "f" * 40, "how": "resolved"}}
    asked = _hub(monkeypatch, {"someorg/somedata": "x" * 40, "someorg/somemodel": "y" * 40})
    pinned, revisions, warnings = pin_hub_revisions(cfg, earlier)
    assert (pinned.data.revision, pinned.model.revision) == ("e" * 40, "f" * 40) and asked == [] and not warnings


def test_an_offline_hub_model_fails_in_one_line_before_the_model_checks_and_a_cached_one_loads_offline(tmp_path, monkeypatch, prefect_server):
    """Before, the model checks ran first and sat through huggingface_hub's retries (~48 s, ~45 log lines offline)
    before their one-line error, and as long before a cached model loaded. Now the hub's one metadata call, made to pin
    the revision, tells it; a model in the local hub cache goes on to the model checks with huggingface_hub offline."""
    import huggingface_hub.constants
    import pytest

    import flows.finetune
    from flows.finetune import finetune
    from tasks.common import StageError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # restored after: the run turns it on
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = _hub(monkeypatch, ConnectionError("[Errno -2] Name or service not known"))
    checked = []

    def check_model(*args, **kwargs):
        checked.append((args[0].name, huggingface_hub.constants.is_offline_mode()))
        raise StageError("the model checks ran")  # what loading the model would start with: the retries

    monkeypatch.setattr(flows.finetune, "check_model", check_model)
    overrides = [f"artifacts_dir={tmp_path / 'artifacts'}", "model.name=someorg/somemodel"]
    with pytest.raises(StageError, match=r"^cannot reach the hub for 'someorg/somemodel' \(ConnectionError: .*not in the local hub cache"):
        finetune(profile="tiny", overrides=overrides)
    assert checked == [] and asked == ["someorg/somemodel"]  # asked once: the check reuses pinning's answer

    snapshot = tmp_path / "hub" / "models--someorg--somemodel" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    with pytest.raises(StageError, match="the model checks ran"):  # cached: on to the checks, which load it from the cache
        finetune(profile="tiny", overrides=overrides)
    assert checked == [("someorg/somemodel", True)]  # True: huggingface_hub offline while the checks ran
    assert asked == ["someorg/somemodel"] * 2  # once a run
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ  # and undone after the run


def test_local_and_packaged_sources_ask_no_hub(tmp_path, monkeypatch):
    from tasks.hub import pin_hub_revisions

    asked = _hub(monkeypatch, AssertionError("no hub lookup for local data"))
    cfg = _cfg(tmp_path)  # random model, embedded data
    assert pin_hub_revisions(cfg) == (cfg, {}, [])
    assert asked == []


# ---------------------------------------------------------------------------------------------------------
# Run records


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _summary(art, run):
    from tasks.common import read_json

    return read_json(art / "runs" / run / "summary.json")


def _write_summary(art, run, **fields):
    from tasks.common import write_json

    write_json(art / "runs" / run / "summary.json", {"run": run, "stages": {}, **fields})


def test_a_killed_run_is_found_crashed_by_the_next_run(tmp_path):
    """Before, a SIGKILLed run's summary said `running` forever."""
    from flows.finetune import RunSummary

    art = tmp_path / "artifacts"
    host = socket.gethostname()
    _write_summary(art, "killed", status="running", host=host, pid=_dead_pid())
    _write_summary(art, "alive", status="running", host=host, pid=os.getpid())
    _write_summary(art, "elsewhere", status="running", host=host + "-other", pid=_dead_pid())
    RunSummary(str(art), "next")
    assert _summary(art, "killed")["status"] == "crashed" and _summary(art, "killed")["crash_found_by"] == "next"
    assert _summary(art, "alive")["status"] == "running"  # its process is alive
    assert _summary(art, "elsewhere")["status"] == "running"  # another machine's process: not ours to judge


def test_a_live_run_of_another_pid_namespace_on_this_host_is_not_marked_crashed(tmp_path):
    """A container sharing the host's name (host network, `--uts=host`) and the artifacts folder numbers its processes
    apart: its live run's pid is no process here, and the next run of the host marked it crashed (a review, 2026-12-05).
    A summary records its process space; one of another space is not judged, one of this space (or of before the field
    was recorded, on this host) still is."""
    from flows.finetune import RunSummary
    from tasks.common import process_space

    art = tmp_path / "artifacts"
    host = socket.gethostname()
    _write_summary(art, "container", status="running", host=host, pid=_dead_pid(), process_space=f"{process_space()}x")
    _write_summary(art, "here", status="running", host=host, pid=_dead_pid(), process_space=process_space())
    _write_summary(art, "older", status="running", host=host, pid=_dead_pid())
    assert RunSummary(str(art), "next").data["process_space"] == process_space()
    assert _summary(art, "container")["status"] == "running"
    assert _summary(art, "here")["status"] == "crashed" and _summary(art, "older")["status"] == "crashed"


def test_a_crashed_runs_half_published_folder_is_removed_when_the_crash_is_found(tmp_path):
    """A publish (or export) killed mid-copy left `.<name>.tmp-*` (the merged model's copy) in its own run's folder,
    which no later run builds again (a rerun is a new run, with a new folder): removed when the next run finds the crash."""
    from flows.finetune import RunSummary
    from tasks.common import process_space

    art = tmp_path / "artifacts"
    host = socket.gethostname()
    dead = _dead_pid()
    _write_summary(art, "killed", status="running", host=host, pid=dead)
    half = art / "runs" / "killed" / f".model.tmp-{process_space()}-{dead}-abc123"
    (half / "merged").mkdir(parents=True)
    RunSummary(str(art), "next")
    assert _summary(art, "killed")["status"] == "crashed" and not half.exists()


def test_a_completed_run_supersedes_failed_and_crashed_runs_of_its_config(tmp_path):
    from flows.finetune import RunSummary

    art = tmp_path / "artifacts"
    config = {"profile": "tiny", "lora": {"r": 8}}
    _write_summary(art, "failed", status="failed", config=config)
    _write_summary(art, "crashed", status="crashed", config=config)
    _write_summary(art, "other-config", status="failed", config={**config, "lora": {"r": 4}})
    run = RunSummary(str(art), "resumed")
    run.data["config"] = config
    run.finish("completed")
    assert sorted(run.data["supersedes"]) == ["crashed", "failed"]
    for name, outcome in (("failed", "failed"), ("crashed", "crashed")):
        s = _summary(art, name)
        assert (s["status"], s["outcome"], s["superseded_by"]) == ("superseded", outcome, "resumed")
    assert _summary(art, "other-config")["status"] == "failed"


def test_a_retried_run_keeps_its_folder_and_counts_its_attempts(tmp_path):
    from flows.finetune import RunSummary

    art = tmp_path / "artifacts"
    first = RunSummary(str(art), "tiny-1m-20261201-101500-ab12")
    first.data["failed_stage"] = "train"
    first.finish("failed")
    retry = RunSummary(str(art), "tiny-1m-20261201-101500-ab12")
    retry.finish("completed")
    s = _summary(art, "tiny-1m-20261201-101500-ab12")
    assert s["status"] == "completed" and s["attempt"] == 2
    assert [(a["status"], a["failed_stage"]) for a in s["attempts"]] == [("failed", "train")]


def test_a_retried_cancelled_run_says_where_its_attempt_was_cancelled(tmp_path):
    """A review: after `prefect flow-run retry` of a cancelled run its attempt read {'status': 'cancelled',
    'failed_stage': None}, not the stage it was cancelled in."""
    from flows.finetune import RunSummary

    art = tmp_path / "artifacts"
    first = RunSummary(str(art), "tiny-1m-20261201-101500-ab12")
    first.data["cancelled_stage"] = "train"
    first.finish("cancelled")
    RunSummary(str(art), "tiny-1m-20261201-101500-ab12").finish("completed")
    attempt, = _summary(art, "tiny-1m-20261201-101500-ab12")["attempts"]
    assert (attempt["status"], attempt["cancelled_stage"], attempt["failed_stage"]) == ("cancelled", "train", None), attempt


def test_a_retry_keeps_the_run_name(monkeypatch):
    """`prefect flow-run retry` re-resolves the run name: it used to get a new timestamp, so the run was renamed,
    `retry <old name>` answered "not found" and the failed attempt's folder stayed `failed`."""
    from flows import finetune as ft

    name = "tiny-1m-20261201-101500-ab12"
    params = {"profile": "tiny", "overrides": []}
    monkeypatch.setattr(ft, "flow_run", SimpleNamespace(name=name, id="ab12cdef-0000", parameters=params))
    assert ft._run_name() == name
    monkeypatch.setattr(ft, "flow_run", SimpleNamespace(name="clever-fox", id="ab12cdef-0000", parameters=params))
    fresh = ft._run_name()  # a new flow run (Prefect's generated name): our name
    assert fresh.startswith("tiny-1m-") and fresh.endswith("-ab12")


def test_rerunning_a_crashed_run_reuses_its_hub_commits_though_main_moved(tmp_path, monkeypatch):
    """Resume = the same command again: it must find the crashed run's stages and checkpoints, keyed on the commits that
    run resolved, not on where `main` points now (review of issue 23: only a retry reused them)."""
    from flows.finetune import unfinished_revisions
    from tasks.common import write_json
    from tasks.hub import pin_hub_revisions

    cfg = _cfg(tmp_path, *HUB)
    requested = cfg.model_dump(mode="json", by_alias=True)
    _hub(monkeypatch, {"someorg/somedata": "d" * 40, "someorg/somemodel": "1" * 40})
    first, revisions, _ = pin_hub_revisions(cfg)
    root = tmp_path / "artifacts"
    write_json(root / "runs" / "r1" / "summary.json", {"run": "r1", "status": "crashed", "started": "2026-12-01T10:00:00+00:00",
                                                      "requested_config": requested, "hub_revisions": revisions})
    _hub(monkeypatch, {"someorg/somedata": "d" * 40, "someorg/somemodel": "2" * 40})  # main moved after the crash
    earlier = unfinished_revisions(root, "r2", requested)
    again, _, _ = pin_hub_revisions(cfg, earlier)
    assert again.model.revision == first.model.revision == "1" * 40
    other = cfg.model_copy(update={"output_name": "another"}).model_dump(mode="json", by_alias=True)
    assert unfinished_revisions(root, "r2", other) is None  # another command starts fresh from main


def test_ctrl_c_in_training_after_a_checkpoint_is_cancelled_in_prefect_and_the_summary(tmp_path, monkeypatch, prefect_server):
    """Before, a Ctrl-C that stopped training with a checkpoint ended the flow run Crashed ("aborted by an interrupt
    signal") and the summary `failed`, though the user stopped it on purpose and the rerun resumes it. Now both say
    cancelled, with how to resume; the train task run too (it read Crashed under the Cancelled flow run), and its
    Cancelled state is not cached: the rerun trains on from the checkpoint."""
    import json
    import signal
    from pathlib import Path

    import pytest

    import tasks.train
    from flows.finetune import finetune
    from helpers import task_run_states

    def ctrl_c_as_training_starts(stage):  # what Ctrl-C runs: the handler training installed (tasks/train.py)
        if stage == "train":
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

    monkeypatch.setattr(tasks.train, "maybe_fault", ctrl_c_as_training_starts)
    art = tmp_path / "artifacts"
    # Ctrl-C as a terminal hands it: a suite started in the background (`nohup make test &`) hands its workers SIGINT
    # ignored, which training keeps ignoring (no handler of its own to call)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        state = finetune(profile="tiny", overrides=[f"artifacts_dir={art}"], return_state=True)
    except KeyboardInterrupt as e:  # not into pytest, which would stop the session
        pytest.fail(f"the flow raised {e!r} instead of ending Cancelled")
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert state.is_cancelled(), state
    assert "checkpoint-1 saved" in state.message and "rerun the same command to resume" in state.message, state.message
    summary = json.loads(Path(json.loads((art / "latest.json").read_text())["summary"]).read_text())
    assert summary["status"] == "cancelled" and summary["cancelled_stage"] == "train" and "failed_stage" not in summary
    assert summary["stages"]["train"]["status"] == "cancelled" and "rerun the same command" in summary["stages"]["train"]["message"]
    train = task_run_states(state.state_details.flow_run_id)["4-train"]
    assert train.is_cancelled() and "checkpoint-1 saved" in train.message, train

    monkeypatch.setattr(tasks.train, "maybe_fault", lambda stage: None)
    again = finetune(profile="tiny", overrides=[f"artifacts_dir={art}"], return_state=True)
    assert again.is_completed(), again
    rerun = json.loads(Path(json.loads((art / "latest.json").read_text())["summary"]).read_text())
    assert not rerun["stages"]["train"]["cached"] and rerun["stages"]["train"]["outputs"]["resumed_from_step"] == 1
    assert task_run_states(again.state_details.flow_run_id)["4-train"].is_completed()


def test_a_stopped_train_task_outside_a_flow_raises_training_stopped(tmp_path, monkeypatch, prefect_server):
    """A review: the train task returned a Cancelled state for a stop wherever it ran, so a notebook calling
    `train_task.fn(...)`, or the task outside a flow, got a State back where a record or TrainingStopped was due. The state
    is returned only in a flow's task run (RunSummary.stage reads it; the Ctrl-C test above); elsewhere the stop raises."""
    import pytest

    from tasks import stages
    from tasks.common import TrainingStopped
    from tasks.prefect_glue import task_options

    def stopped(*args, **kwargs):
        raise TrainingStopped("training stopped by a signal at step 3, checkpoint-3 saved; rerun the same command to resume from it")

    monkeypatch.setattr(stages.train_stage, "train_adapter", stopped)
    args = (None, None, None, None, None, None, str(tmp_path))
    with pytest.raises(TrainingStopped, match="checkpoint-3 saved"):
        stages.train_task.fn(*args)
    outside = stages.train_task.with_options(cache_key_fn=lambda *_: "train-fixed-key", **task_options(str(tmp_path)))
    for _ in range(2):  # the second call: nothing was cached under the key
        with pytest.raises(TrainingStopped, match="checkpoint-3 saved"):
            outside(*args)


def test_a_deployment_run_cancelled_from_prefect_is_recorded_cancelled_in_its_stage(tmp_path, monkeypatch, prefect_server):
    """Before, a deployment run cancelled from Prefect mid-stage was recorded `failed` (`failed_stage`): the runner's
    SIGTERM reaches the stage as Prefect's TerminationSignal, which the summary took for an error. Now, while the run is
    Cancelling, it is `cancelled` with `cancelled_stage`; a SIGTERM to a run nobody cancelled still fails it.
    In-process: the fault hook at training's start does what Prefect's Cancel does, the state first, then the signal
    (the real runner's SIGTERM: tests/test_deploy.py::test_cancelling_a_run_mid_training_ends_cancelled)."""
    import json
    import signal
    from pathlib import Path

    import pytest
    from prefect import get_client
    from prefect.exceptions import TerminationSignal
    from prefect.runtime import flow_run
    from prefect.states import Cancelling

    import tasks.train
    from flows.finetune import finetune
    from helpers import task_run_states

    def cancel_from_prefect(stage, cancel=True):
        if stage == "train":
            if cancel:
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled in the UI"), force=True)
            raise TerminationSignal(signal.SIGTERM)  # what Prefect's SIGTERM handler raises (capture_sigterm)

    # Prefect sends an unexpected SIGTERM on to the handler it replaced (capture_sigterm): here that is not pytest's death.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        for cancel, art in ((True, tmp_path / "cancelled"), (False, tmp_path / "killed")):
            monkeypatch.setattr(tasks.train, "maybe_fault", lambda stage: cancel_from_prefect(stage, cancel))
            with pytest.raises(TerminationSignal):
                finetune(profile="tiny", overrides=[f"artifacts_dir={art}"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    for cancel, art in ((True, tmp_path / "cancelled"), (False, tmp_path / "killed")):
        summary = json.loads(Path(json.loads((art / "latest.json").read_text())["summary"]).read_text())
        tasks = task_run_states(summary["flow_run_id"])
        assert all(tasks[name].is_completed() for name in ("1-data", "2-profile", "3-probe")), tasks
        if cancel:
            assert summary["status"] == "cancelled" and summary["cancelled_stage"] == "train" and "failed_stage" not in summary, summary
            assert summary["stages"]["train"] == {**summary["stages"]["train"], "status": "cancelled", "message": "cancelled from Prefect"}
            # the stage's task run too: it read Crashed (Prefect's task engine takes any TerminationSignal for a crash)
            assert tasks["4-train"].is_cancelled() and tasks["4-train"].message == "cancelled from Prefect", tasks["4-train"]
        else:
            assert summary["status"] == "failed" and summary["failed_stage"] == "train" and "cancelled_stage" not in summary, summary
            assert tasks["4-train"].is_crashed(), tasks["4-train"]


def test_prefects_cancel_in_a_stage_other_than_training_ends_that_task_run_cancelled(tmp_path, monkeypatch, prefect_server):
    """Every stage's task, not only training's, ends Cancelled when Prefect's Cancel stops it (Prefect's task engine records
    the SIGTERM's TerminationSignal as a crash); the stage before it stays Completed, none after it starts."""
    import json
    import signal
    from pathlib import Path

    import pytest
    from prefect import get_client
    from prefect.exceptions import TerminationSignal
    from prefect.runtime import flow_run
    from prefect.states import Cancelling

    from flows.finetune import finetune
    from helpers import task_run_states
    from tasks import stages

    def cancelled_while_profiling(*args, **kwargs):
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run.id, Cancelling(message="cancelled in the UI"), force=True)
        raise TerminationSignal(signal.SIGTERM)  # what Prefect's SIGTERM handler raises (capture_sigterm)

    monkeypatch.setattr(stages.profile_stage, "profile_lengths", cancelled_while_profiling)
    art = tmp_path / "artifacts"
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # Prefect sends the signal on to the handler it replaced
    try:
        with pytest.raises(TerminationSignal):
            finetune(profile="tiny", overrides=[f"artifacts_dir={art}"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = json.loads(Path(json.loads((art / "latest.json").read_text())["summary"]).read_text())
    assert summary["status"] == "cancelled" and summary["cancelled_stage"] == "profile", summary
    tasks = task_run_states(summary["flow_run_id"])
    assert set(tasks) == {"1-data", "2-profile"} and tasks["1-data"].is_completed(), tasks
    assert tasks["2-profile"].is_cancelled() and tasks["2-profile"].message == "cancelled from Prefect", tasks["2-profile"]


def test_asking_prefect_whether_a_stopped_run_was_cancelled_takes_seconds_when_its_api_fails_or_hangs(monkeypatch):
    """A review: the question had the client's own retries and timeout, and summary.json waited on it: an API answering
    503 took 134 s (6 requests), one that accepts and never answers minutes; the runner kills the process 30 s after its
    SIGTERM, so the summary stayed `running`. Now one request, a few seconds at most."""
    import threading
    import time
    import uuid
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import prefect.runtime
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks import prefect_glue

    hits = []

    class Unavailable(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    busy = HTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=busy.serve_forever, daemon=True).start()
    silent = socket.socket()  # accepts (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    monkeypatch.setattr(prefect.runtime, "flow_run", SimpleNamespace(id=uuid.uuid4()))
    try:
        for port in (busy.server_port, silent.getsockname()[1]):
            with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
                t0 = time.monotonic()
                assert prefect_glue.cancelling_in_prefect() is False
                assert time.monotonic() - t0 < prefect_glue.CANCEL_QUERY_SECONDS + 2, time.monotonic() - t0
    finally:
        busy.shutdown()
        silent.close()
    assert len(hits) == 1, hits


def test_a_stopped_stage_is_recorded_before_prefect_is_asked_and_a_second_signal_cannot_leave_it_running(tmp_path, monkeypatch):
    """A review: a SIGTERM'd stage was recorded only after the server answered whether the run was being cancelled, so a
    runner's kill or a second SIGTERM during the question (TerminationSignal is no Exception) left the summary `running`.
    Now it is written `failed` first, then `cancelled` if the server says so; a second signal leaves it `failed`."""
    import json
    import signal

    import pytest
    from prefect.exceptions import TerminationSignal

    from flows import finetune as ft

    def stage(return_state):
        raise TerminationSignal(signal.SIGTERM)

    on_disk = []

    def server_says(answer):
        def ask():
            on_disk.append(json.loads((art / "runs" / answer / "summary.json").read_text())["status"])
            if answer == "second-signal":
                raise TerminationSignal(signal.SIGTERM)
            return answer == "cancelling"
        return ask

    art = tmp_path / "artifacts"
    for answer in ("cancelling", "not-cancelling", "second-signal"):
        monkeypatch.setattr(ft, "cancelling_in_prefect", server_says(answer))
        with pytest.raises(TerminationSignal):
            ft.RunSummary(str(art), answer).stage("train", stage)
    assert on_disk == ["failed"] * 3
    cancelled, failed, twice = (_summary(art, name) for name in ("cancelling", "not-cancelling", "second-signal"))
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_stage"] == "train" and "failed_stage" not in cancelled, cancelled
    assert cancelled["stages"]["train"]["message"] == "cancelled from Prefect" and "error" not in cancelled["stages"]["train"]
    for s in (failed, twice):
        assert s["status"] == "failed" and s["failed_stage"] == "train" and "cancelled_stage" not in s, s


def test_a_stop_between_stages_is_recorded_in_the_stage_about_to_start(tmp_path, monkeypatch):
    """A review: Prefect's Cancel landing after one stage was recorded and before the next started stopped the flow outside
    any stage, and the summary stayed `running` (the next run then called it `crashed`). Now it is recorded as a stop in
    the stage the run was about to start, marked never started: `cancelled` while Prefect is cancelling the run, else
    `failed`; after the last stage it names none. (Through a real server: test_deploy.py's
    test_cancelling_a_run_between_stages_records_it_cancelled.)"""
    import signal

    import pytest
    from prefect.exceptions import TerminationSignal

    from flows import finetune as ft

    def done(return_state):
        return SimpleNamespace(is_cancelled=lambda: False, name="Completed",
                               result=lambda: SimpleNamespace(outputs_exist=lambda: True, model_dump=lambda mode: {}))

    art = tmp_path / "artifacts"
    for name, cancelling, finished in (("cancelled", True, ["data"]), ("killed", False, ["data", "profile"]), ("last", True, list(ft.STAGES))):
        monkeypatch.setattr(ft, "cancelling_in_prefect", lambda: cancelling)
        run = ft.RunSummary(str(art), name)
        with pytest.raises(TerminationSignal), run.stops_recorded():
            for stage in finished:
                run.stage(stage, done)
            raise TerminationSignal(signal.SIGTERM)  # between that stage and the next
    cancelled, killed, last = (_summary(art, name) for name in ("cancelled", "killed", "last"))
    assert cancelled["status"] == "cancelled" and cancelled["cancelled_stage"] == "profile" and "failed_stage" not in cancelled, cancelled
    assert cancelled["stages"]["data"]["status"] == "completed"
    assert cancelled["stages"]["profile"] == {"status": "cancelled", "seconds": 0, "message": "cancelled from Prefect before the stage started"}
    assert killed["status"] == "failed" and killed["failed_stage"] == "probe" and "cancelled_stage" not in killed, killed
    assert killed["stages"]["probe"] == {"status": "failed", "seconds": 0, "error": "TerminationSignal: 15"}, killed["stages"]
    assert last["status"] == "cancelled" and last["cancelled_stage"] is None, last
    assert all(s["status"] == "completed" for s in last["stages"].values()), last["stages"]


def test_a_hub_that_answers_not_found_is_not_called_unreachable(monkeypatch):
    """A review: a misspelt model id while online (the hub's 404) was told 'cannot reach the hub ... connect to the
    network' and, if cached under that name, loaded offline. The hub's own answer goes on to the model checks."""
    from huggingface_hub.errors import RepositoryNotFoundError

    import tasks.hub as hub
    from tasks.config import load_config

    _hf_api(monkeypatch, _http_error(RepositoryNotFoundError, 404))
    cfg = load_config(profile="tiny", overrides=["model.name=someorg/typo-model"])
    assert hub.check_hub_reachable(cfg, {}) == []
    assert hub.hub_reply(ConnectionError("Name or service not known")) == "unreachable"


def test_only_the_hubs_own_answer_is_read_as_one(tmp_path, monkeypatch):
    """A review: hub_answered took any RuntimeError for the hub's answer, so one from a full disk or a bug sent a model
    the hub was never asked about on to the model checks, as if the hub had answered. Now only ask_hub's HubAnswered is:
    raised for the hub's word on the name (a misspelt id, a private or gated model) and a reply with no commit; the
    messages still name the hub's own error class. An error that is no lookup error (a full disk, a bug) is raised as it
    is, not told as an unreachable hub (a second review)."""
    import huggingface_hub.constants
    import pytest
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    import tasks.hub as hub
    from tasks.common import StageError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the user's is told apart (tests set it)
    cfg = _cfg(tmp_path, "model.name=someorg/somemodel")
    for error in (_http_error(RepositoryNotFoundError, 404), _http_error(RepositoryNotFoundError, 401), _http_error(GatedRepoError, 403)):
        _hf_api(monkeypatch, error)
        with pytest.raises(hub.HubAnswered) as e:
            hub.ask_hub("model", "someorg/somemodel", None)
        assert hub.hub_reply(e.value) == "answered" and e.value.__cause__ is error
        assert hub.check_hub_reachable(cfg, {}) == []  # on to the model checks, which say what the hub said
        _, _, warnings = hub.pin_hub_revisions(cfg)
        assert f"({type(error).__name__}: {error.response.status_code} Client Error" in warnings[0], warnings
    _hf_api(monkeypatch, None)
    with pytest.raises(hub.HubAnswered, match="the hub gave no commit"):
        hub.ask_hub("model", "someorg/somemodel", None)

    # (a KeyError or ValueError from the lookup is a reply that is not the hub API's: an unreachable hub, tested below)
    for error in (RuntimeError("No space left on device"), AttributeError("'NoneType' object has no attribute 'sha'")):
        _hf_api(monkeypatch, error)
        assert hub.hub_reply(error) is None
        with pytest.raises(type(error)) as e:
            hub.check_hub_reachable(cfg, {})
        assert e.value is error
        with pytest.raises(type(error)):
            hub.pin_hub_revisions(cfg)
    _hf_api(monkeypatch, ConnectionError("[Errno -2] Name or service not known"))  # no connection: that is "cannot reach"
    with pytest.raises(StageError, match=r"^cannot reach the hub for 'someorg/somemodel' \(ConnectionError: .*not in the local hub cache; connect"):
        hub.check_hub_reachable(cfg, {})


def test_the_hubs_one_answer_to_pinning_is_reused_by_the_reachability_check(tmp_path, monkeypatch):
    """A review: with the hub out of reach, pin_hub_revisions asked it about the model, then check_hub_reachable asked
    again, so a user with no network waited for two lookups (and could see two sets of huggingface_hub's retries). Now
    each run asks once, as the flow calls them: pin, then check on pin's revisions; a commit pinned by an earlier attempt
    is checked with one lookup of its own, since what the hub said to that attempt is no answer for this one."""
    import huggingface_hub.constants
    import pytest
    from huggingface_hub.errors import RepositoryNotFoundError

    import tasks.hub as hub
    from tasks.common import StageError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    cfg = _cfg(tmp_path, "model.name=someorg/somemodel")

    def pin_then_check(earlier=None):
        pinned, revisions, _ = hub.pin_hub_revisions(cfg, earlier)
        with hub.hub_offline_restored():  # as the flow runs them: the offline switch lasts the run
            return revisions, hub.check_hub_reachable(pinned, revisions)

    asked = _hf_api(monkeypatch, ConnectionError("[Errno -2] Name or service not known"))
    with pytest.raises(StageError, match=r"^cannot reach the hub for 'someorg/somemodel' \(ConnectionError: \[Errno -2\] Name or"):
        pin_then_check()
    assert asked == ["someorg/somemodel"]

    snapshot = tmp_path / "hub" / "models--someorg--somemodel" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    asked.clear()
    revisions, lines = pin_then_check()
    assert asked == ["someorg/somemodel"] and len(lines) == 1 and "loading it from the local hub cache" in lines[0], lines
    assert revisions["model"]["hub"] == "unreachable" and revisions["model"]["why"].startswith("ConnectionError: ")

    asked = _hf_api(monkeypatch, _http_error(RepositoryNotFoundError, 404))  # online, a misspelt id: on to the model checks
    assert pin_then_check()[1] == [] and asked == ["someorg/somemodel"]

    asked = _hf_api(monkeypatch, ConnectionError("[Errno -2] Name or service not known"))
    earlier = {"model": {"name": "someorg/somemodel", "revision": "a" * 40, "how": "hub unreachable (...)", "hub": "unreachable",
                         "why": "ConnectionError: an hour ago"}}
    revisions, lines = pin_then_check(earlier)  # the earlier attempt's commit is reused; the hub is asked now, once
    assert asked == ["someorg/somemodel"] and "hub" not in revisions["model"] and "(ConnectionError: [Errno -2]" in lines[0], lines


def _hub_error(status: int, headers: dict | None = None) -> Exception:
    """What huggingface_hub's own hf_raise_for_status raises for a reply with this status (its class picked from the
    status and headers as it does)."""
    import httpx2
    from huggingface_hub.utils import hf_raise_for_status

    response = httpx2.Response(status, headers=headers or {}, request=httpx2.Request("GET", "https://huggingface.co/api/models/someorg/somemodel"))
    try:
        hf_raise_for_status(response)
    except Exception as e:
        return e
    raise AssertionError(f"no error for {status}")


def _cache_model(tmp_path, name="someorg/somemodel", sha="a" * 40):
    snapshot = tmp_path / "hub" / f"models--{name.replace('/', '--')}" / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(sha)


def test_a_rate_limit_or_an_outage_reply_is_neither_the_hubs_answer_nor_an_unreachable_hub(tmp_path, monkeypatch):
    """A second review: a 429 (rate limit) or a 5xx on the one model lookup was read as "cannot reach the hub", so an
    uncached model was refused with "connect to the network" (the hub had answered), and a cached one switched the whole
    run offline (an uncached hub dataset then failed). Before the branch such a run went on to the model checks, whose
    downloads retry; it does again, online, with the status in a warning. A proxy's 407 and a 408 are no answer about the
    name either (they were taken for one); only real no-connection errors are "unreachable"."""
    import httpx2
    import huggingface_hub.constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    import tasks.hub as hub

    for status in (400, 401, 403, 404, 410):
        _hf_api(monkeypatch, _hub_error(status))
        with pytest.raises(hub.HubAnswered):
            hub.ask_hub("model", "someorg/somemodel", None)
    for status in (407, 408, 409, 429, 451, 500, 502, 503):
        error = _hub_error(status)
        _hf_api(monkeypatch, error)
        with pytest.raises(type(error)):
            hub.ask_hub("model", "someorg/somemodel", None)
        assert hub.hub_reply(error) == "failed", status
    for error in (ConnectionError("down"), TimeoutError("timed out"), OfflineModeIsEnabled("offline"),
                  httpx2.ConnectError("[Errno -2] Name or service not known"), httpx2.ReadTimeout("read timed out")):
        assert hub.hub_reply(error) == "unreachable", error

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = _cfg(tmp_path, "model.name=someorg/somemodel")
    rate_limited = _hub_error(429, {"RateLimit": '"api";r=0;t=55', "RateLimit-Policy": '"fixed window";"api";q=2500;w=300'})

    def pin_then_check(c):
        pinned, revisions, warnings = hub.pin_hub_revisions(c)
        with hub.hub_offline_restored():
            lines = hub.check_hub_reachable(pinned, revisions)
            return revisions, warnings + lines, huggingface_hub.constants.HF_HUB_OFFLINE

    for cached in (False, True):
        if cached:
            _cache_model(tmp_path)
        for error in (rate_limited, _hub_error(503), _hub_error(407), _hub_error(408)):
            asked = _hf_api(monkeypatch, error)
            revisions, lines, offline = pin_then_check(cfg)
            status = str(error.response.status_code)
            assert not offline and asked == ["someorg/somemodel"], (status, cached)
            assert revisions["model"]["hub"] == "failed" and len(lines) == 1 and status in lines[0], lines

    # a revision pinned in the config: the check's own lookup gets the 429, and says so
    asked = _hf_api(monkeypatch, rate_limited)
    _, lines, offline = pin_then_check(_cfg(tmp_path, "model.name=someorg/somemodel", "model.revision=" + "a" * 40))
    assert not offline and asked == ["someorg/somemodel"] and len(lines) == 1 and "429" in lines[0], lines


def test_a_reply_that_is_not_the_hubs_api_is_an_unreachable_hub(tmp_path, monkeypatch):
    """A review: an HTML page with a 200 (a captive portal, a corporate proxy, a wrong HF_ENDPOINT) crashed the run with
    a raw JSONDecodeError from the pinning, and a 3xx with a JSON body without `id` with KeyError: 'id'. Such a reply says
    nothing about the name: it is an unreachable hub (a cached model loads offline, an uncached one is the one-line
    "cannot reach the hub") with the reply's fault in the message. Real replies, from a server on loopback."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import huggingface_hub.constants

    import tasks.hub as hub
    from tasks.common import StageError

    reply = {}

    class NotTheHub(BaseHTTPRequestHandler):
        def do_GET(self):
            body = reply["body"].encode()
            self.send_response(reply["status"])
            self.send_header("Content-Type", reply["type"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotTheHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # HF_ENDPOINT, read as huggingface_hub is imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = _cfg(tmp_path, "model.name=someorg/somemodel")

    def pin_then_check():
        pinned, revisions, warnings = hub.pin_hub_revisions(cfg)
        with hub.hub_offline_restored():
            return revisions, warnings + hub.check_hub_reachable(pinned, revisions)

    replies = ((200, "text/html", "<html><body>Sign in to the guest network</body></html>", "JSONDecodeError: Expecting value"),
               (302, "application/json", '{"error": "moved"}', "KeyError: 'id'"),
               (200, "application/json", '["another", "API"]', "TypeError: "))  # a review: JSON that is no object
    try:
        for status, kind, body, fault in replies:
            reply.update(status=status, type=kind, body=body)
            with pytest.raises(ConnectionError, match=f"^the hub's reply at {endpoint} is not its API's: {fault}"):
                hub.ask_hub("model", "someorg/somemodel", None)
            with pytest.raises(StageError) as e:
                pin_then_check()
            msg = str(e.value)
            assert msg.startswith(f"cannot reach the hub for 'someorg/somemodel' (ConnectionError: the hub's reply at {endpoint} "
                                  f"is not its API's: {fault}") and "not in the local hub cache; connect" in msg and "\n" not in msg, msg
        _cache_model(tmp_path)
        for status, kind, body, fault in replies:
            reply.update(status=status, type=kind, body=body)
            revisions, lines = pin_then_check()
            assert revisions["model"]["hub"] == "unreachable" and fault in revisions["model"]["why"], revisions
            assert "loading it from the local hub cache" in lines[-1] and fault in lines[-1], lines
    finally:
        server.shutdown()


def test_an_entry_says_how_the_hub_replied(tmp_path, monkeypatch):
    """A second review: an entry reused from the record read 'how': 'hub unreachable (...401...)' beside 'hub': 'answered'.
    `how` now words what `hub` says."""
    import tasks.hub as hub

    cfg = _cfg(tmp_path, "model.name=someorg/somemodel")
    _hf_api(monkeypatch, "b" * 40)
    hub.pin_hub_revisions(cfg)  # recorded in this artifacts folder
    for error, said, how in ((_hub_error(401), "answered", "hub answered (RepositoryNotFoundError: 401"),
                             (_hub_error(429), "failed", "hub lookup failed (HfHubHTTPError: 429"),
                             (ConnectionError("down"), "unreachable", "hub unreachable (ConnectionError: down)")):
        _hf_api(monkeypatch, error)
        entry = hub.pin_hub_revisions(cfg)[1]["model"]
        assert entry["hub"] == said and entry["revision"] == "b" * 40 and entry["how"].startswith(how), entry


def test_user_offline_mode_with_an_uncached_model_is_told_to_unset_it(tmp_path, monkeypatch):
    """A second review: with HF_HUB_OFFLINE=1 set by the user and the model not cached, the run said "connect to the
    network", which cannot help while huggingface_hub is told to stay offline."""
    import huggingface_hub.constants

    import tasks.hub as hub
    from tasks.common import StageError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real HfApi refuses to ask: no network
    cfg = _cfg(tmp_path, "model.name=someorg/somemodel")
    pinned, revisions, _ = hub.pin_hub_revisions(cfg)
    assert revisions["model"]["hub"] == "unreachable"
    with pytest.raises(StageError) as e:
        hub.check_hub_reachable(pinned, revisions)
    msg = str(e.value)
    assert msg.startswith("cannot reach the hub for 'someorg/somemodel': huggingface_hub is offline (HF_HUB_OFFLINE=1)"), msg
    assert "unset HF_HUB_OFFLINE (or download it once)" in msg and "connect to the network" not in msg, msg


def test_an_invalid_hub_id_is_one_line_naming_the_key(tmp_path, monkeypatch):
    """A second review: model.name 'someorg/a--b' crashed with huggingface_hub's HFValidationError traceback."""
    import tasks.hub as hub
    from tasks.common import StageError

    asked = _hf_api(monkeypatch, "b" * 40)
    for key, name, extra, said in (("model.name", "someorg/a--b", [], "local folder"),
                                   ("model.name", "someorg/bad name", ["model.revision=" + "a" * 40], "local folder"),
                                   ("data.source", "someorg/a--b", [], "local file")):
        cfg = _cfg(tmp_path, f"{key}={name}", *extra)
        with pytest.raises(StageError) as e:
            hub.pin_hub_revisions(cfg)
        msg = str(e.value)
        assert msg.startswith(f"{key} {name!r} is not a hub id or a {said}: ") and msg.endswith("; fix the name") and "\n" not in msg, msg
        if key == "model.name":
            with pytest.raises(StageError, match="is not a hub id"):
                hub.check_hub_reachable(cfg, {})
    assert asked == []


def test_offline_mode_turned_on_for_a_run_is_undone_after_it(monkeypatch):
    """A review: check_hub_reachable's offline switch stayed on for the process, so a library caller's next run (or a
    test's) pinned nothing and loaded offline with the network back."""
    import os

    import huggingface_hub
    import pytest

    from tasks.hub import hub_offline_restored

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(RuntimeError):
        with hub_offline_restored():
            huggingface_hub.constants.HF_HUB_OFFLINE = True
            os.environ["HF_HUB_OFFLINE"] = "1"
            raise RuntimeError("the run failed")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and "HF_HUB_OFFLINE" not in os.environ


def test_a_stop_signal_during_a_summary_write_waits_for_it_in_a_process_with_threads():
    """A review: the summary's write blocked the stop signals with pthread_sigmask, which holds them on the calling
    thread only; in a process with other threads (a flow run's) the kernel handed SIGTERM to another thread and Python
    ran its handler in the block at once. Now each stop signal that comes waits for the block's end, then reaches its
    own handler, once."""
    import os
    import signal
    import threading
    import time

    from flows.finetune import _signals_held

    ran: list[str] = []
    inside = threading.Event()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # a thread the kernel may hand the signal to
    other.start()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ran.append("inside" if inside.is_set() else "after"))
    try:
        with _signals_held():
            inside.set()
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:  # bytecode running: a pending handler would run here
                time.sleep(0.01)
            inside.clear()
        assert ran == ["after"], ran
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop.set()
