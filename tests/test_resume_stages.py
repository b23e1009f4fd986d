"""A failed stage, fixed and rerun, as the issue asks: inject a failure into stage 4 (train) or 6 (merge) with
the test-only QLORA_PIPELINE_FAULT, watch the run fail, remove the fault, run again — through the CLI and
through the deployment (`prefect flow-run retry <name>` against a local server).
The rerun starts at the failed stage (earlier ones report cached), completes, and publishes what a clean run
publishes. Through the CLI a train fault, then a merge fault, then none, in one chain; tests/test_resume.py covers
SIGKILL and stop signals mid-training.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefect_local import ROOT, LocalServer, Serve

pytestmark = pytest.mark.slow

STAGES = ["data", "profile", "probe", "train", "evaluate", "merge", "publish", "export"]
# A constant LR without warmup: the default schedule follows the wall clock, so two clean runs would differ in
# their last digits; with it, "the same artifacts as a clean run" can be checked number for number.
DETERMINISTIC = ["training.lr_scheduler=constant", "training.warmup_ratio=0"]


def _cli(server: LocalServer, art: Path, fault: str | None = None) -> tuple[int, str, float]:
    """`qlora-pipeline run --profile tiny ...` in a subprocess against the local server; (exit code, output, seconds)."""
    env = dict(server.env)
    if fault:
        env["QLORA_PIPELINE_FAULT"] = fault
    sets = [a for kv in [f"artifacts_dir={art}", *DETERMINISTIC] for a in ("--set", kv)]
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--minutes", "1", *sets],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


def _summary(art: Path) -> dict:
    return json.loads(Path(json.loads((art / "latest.json").read_text())["summary"]).read_text())


def _published(art: Path) -> tuple[set[str], dict]:
    """The published folder's file list (TensorBoard's event file name holds host/pid/time) and eval numbers."""
    pub = Path(_summary(art)["published"])
    files = {re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents", str(p.relative_to(pub))) for p in pub.rglob("*") if p.is_file()}
    ev = json.loads((pub / "eval.json").read_text())
    return files, {k: ev[k] for k in ("n_prompts", "base", "tuned", "per_family", "accuracy_gain")}


def _cached_from(stage: str) -> dict[str, bool]:
    """What a rerun after a failure in `stage` must report: everything before it cached, the rest recomputed."""
    k = STAGES.index(stage)
    return {s: i < k for i, s in enumerate(STAGES)}


@pytest.fixture(scope="module")
def clean(server, tmp_path_factory):
    """One clean run to compare against: its published files, eval numbers and duration."""
    art = tmp_path_factory.mktemp("clean") / "artifacts"
    rc, out, seconds = _cli(server, art)
    assert rc == 0, out[-3000:]
    files, numbers = _published(art)
    stages = _summary(art)["stages"]
    return {"files": files, "eval": numbers, "seconds": seconds, "stage_seconds": {s: v["seconds"] for s, v in stages.items()}}


def test_train_then_merge_failure_each_rerun_resumes_at_the_failed_stage_and_matches_a_clean_run(server, clean, tmp_path):
    # Three runs of the same command: a fault in train, then (fixed there) one in merge, then none.
    art = tmp_path / "artifacts"
    rc, out, _ = _cli(server, art, fault="train")
    assert rc != 0 and "injected failure in stage train" in out, out[-3000:]
    failed = _summary(art)
    assert failed["status"] == "failed" and failed["stages"]["train"]["status"] == "failed"
    assert {s for s, v in failed["stages"].items() if v["status"] == "completed"} == {"data", "profile", "probe"}

    rc, out, _ = _cli(server, art, fault="merge")  # resumes at train, then fails in merge
    assert rc != 0 and "injected failure in stage merge" in out, out[-3000:]
    failed = _summary(art)
    assert failed["status"] == "failed" and failed["stages"]["merge"]["status"] == "failed"
    done = {s: v["cached"] for s, v in failed["stages"].items() if v["status"] == "completed"}
    assert done == {s: c for s, c in _cached_from("train").items() if s in ("data", "profile", "probe", "train", "evaluate")}

    rc, out, seconds = _cli(server, art)
    assert rc == 0, out[-3000:]
    resumed = _summary(art)
    assert resumed["status"] == "completed"
    assert {s: v["cached"] for s, v in resumed["stages"].items()} == _cached_from("merge")
    assert _published(art) == (clean["files"], clean["eval"])
    # a new run of the same config completed: each failed one says so
    earlier = [json.loads(p.read_text()) for p in (art / "runs").glob("*/summary.json") if p.parent.name != resumed["run"]]
    assert [(e["status"], e["outcome"], e["superseded_by"]) for e in earlier] == [("superseded", "failed", resumed["run"])] * 2

    before = ("data", "profile", "probe", "train", "evaluate")
    print(f"\n[resume timing] CLI: clean run {clean['seconds']:.1f}s wall, {sum(clean['stage_seconds'].values()):.1f}s in stages "
          f"({'+'.join(before)} {sum(clean['stage_seconds'][s] for s in before):.1f}s); rerun after the merge failure "
          f"{seconds:.1f}s wall, {sum(v['seconds'] for v in resumed['stages'].values()):.1f}s in stages "
          f"({'+'.join(before)} cached: {sum(resumed['stages'][s]['seconds'] for s in before):.1f}s)")


# ---------------------------------------------------------------------------------------------------------
# Through the deployment: the fault lives in the serving process's environment (a bug in the deployed code);
# "fixing" it means restarting `qlora-pipeline serve` without it, then rerunning.


def _deployment_run(server: LocalServer, art: Path) -> str:
    return server.run_deployment("finetune/nightly", profile="tiny", hours=None, minutes=1,
                                 overrides=[f"artifacts_dir={art}", *DETERMINISTIC])


def test_failure_in_a_deployment_run_then_flow_run_retry_resumes_at_that_stage(server, clean, tmp_path):
    # A new run after a failure is the same flow started again, through the runner or the CLI (the chain above); a retry
    # is the same flow run, its name and folder kept, its attempts counted.
    stage = "train"
    art, log = tmp_path / "artifacts", tmp_path / "serve.log"
    faulty = Serve(server, "--paused", log=log, env={"QLORA_PIPELINE_FAULT": stage}).start()
    try:
        run_id = _deployment_run(server, art)
        failed = server.wait(run_id)
    finally:
        faulty.stop()
    assert failed["state_type"] == "FAILED", (failed["state"], log.read_text()[-3000:])
    assert _summary(art)["stages"][stage]["status"] == "failed"

    fixed = Serve(server, "--paused", log=log).start()
    try:
        t0 = time.monotonic()
        server.prefect("flow-run", "retry", failed["name"])  # the same flow run, by its name (README: id or name)
        done = server.wait(run_id)
        seconds = time.monotonic() - t0
    finally:
        fixed.stop()
    assert done["state_type"] == "COMPLETED", (done["state"], log.read_text()[-3000:])
    resumed = _summary(art)
    assert done["name"] == failed["name"] == resumed["run"] and len(list((art / "runs").iterdir())) == 1
    assert resumed["attempt"] == 2 and [a["status"] for a in resumed["attempts"]] == ["failed"]
    assert {s: v["cached"] for s, v in resumed["stages"].items()} == _cached_from(stage)
    assert _published(art) == (clean["files"], clean["eval"])
    cached = [t for t in server.task_runs(run_id) if t["state_name"] == "Cached"]
    assert len(cached) >= STAGES.index(stage), "the UI shows the stages before the failure as Cached"
    print(f"\n[resume timing] flow-run retry after a {stage} failure: {seconds:.1f}s from rerun to Completed, "
          f"{sum(v['seconds'] for v in resumed['stages'].values()):.1f}s in stages (clean: {sum(clean['stage_seconds'].values()):.1f}s)")
