"""Shared fixtures: the tiny profile, a private artifacts folder, and a Prefect test server."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The suite's own Prefect home (database, profiles, logs), set before anything imports Prefect: its runs (tiny-...,
# some FAILED or CRASHED by design) never land in the user's Prefect history, and a PREFECT_API_URL from the
# user's environment or profile cannot point the tests at their server. Removed when the session ends.
TEST_PREFECT_HOME = tempfile.mkdtemp(prefix="qlora-pipeline-tests-prefect-")
os.environ["PREFECT_HOME"] = TEST_PREFECT_HOME
os.environ["PREFECT_PROFILES_PATH"] = os.path.join(TEST_PREFECT_HOME, "profiles.toml")
for _var in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
    os.environ.pop(_var, None)
atexit.register(shutil.rmtree, TEST_PREFECT_HOME, True)
# The suite's own user cache folder (XDG_CACHE_HOME), for the same reason and set as early: the memos tasks/common.py
# `user_cache_dir` keeps (the rendering fingerprints of tasks/data.py, `cached_sha256`'s digests) were written into the
# user's real ~/.cache/qlora-pipeline/ by every session and never pruned (109 rendering memos and 6.9 MB of digests on
# the dev box, 2026-12-06), and a memo left by an earlier session could let a test pass that a fresh machine fails.
# Processes the tests start inherit it. Tests of the real-location logic set HOME/XDG_CACHE_HOME themselves
# (tests/test_cache_keys.py `test_the_user_cache_folder_*`). Removed when the session ends.
TEST_CACHE_HOME = tempfile.mkdtemp(prefix="qlora-pipeline-tests-cache-")
os.environ["XDG_CACHE_HOME"] = TEST_CACHE_HOME
atexit.register(shutil.rmtree, TEST_CACHE_HOME, True)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under xdist (`make test`: 2 workers on a 2-core box) each worker, and every process it starts, gets its share of the
# cores for torch's intra-op threads, set before torch is imported. Left at torch's default (all cores each), the
# workers' OpenMP threads wait on each other's preempted threads: tests/test_train.py took 72 s of CPU under a load of 2
# against 26 s with one thread (2026-12-02). An OMP_NUM_THREADS already set wins. The cores are those this process may
# run on (taskset, a container's cpuset), as torch counts them, not the host's.


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _library_bar_settings_stay_in_their_test():
    """`flows.cli.main`, called in-process by many tests, sets TQDM_MININTERVAL/MAXINTERVAL/DELAY off a terminal (as it
    does for a user's run); left set they would change how the next test's bars draw in that worker."""
    from tasks.common import LIBRARY_BAR_SETTINGS

    before = {name: os.environ.get(name) for name in LIBRARY_BAR_SETTINGS}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def shared_artifacts(tmp_path_factory) -> str:
    """One artifacts dir per test session: the tiny model is built once and reused (it is content-keyed)."""
    return str(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def tiny_cfg(shared_artifacts):
    from tasks.config import load_config

    return load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}"])


@pytest.fixture(scope="session")
def tiny_tok(tiny_cfg, shared_artifacts):
    from tasks.models import load_tokenizer, resolve_model

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    return load_tokenizer(ref, tiny_cfg.model)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `prefect server start` subprocess per test module (tests/prefect_local.py), for tests whose
    subprocesses (`serve`, workers, the CLI) must reach the API."""
    from prefect_local import LocalServer

    srv = LocalServer(tmp_path_factory.mktemp("prefect-home")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def smollm2_artifacts(tmp_path_factory) -> str:
    """publish_smollm2's artifacts dir: one for the whole test run, which xdist's workers share. What its runs start
    from, SmolLM2-135M's model folder (~12 s on this box) and the demo data stage (~30 s), is content-keyed: built by
    the first worker that needs it (test_export.py's fixture, early in `make test`) and found by the other's
    (test_quantize.py's, late), where each worker built its own before. A stage both build at once is still whole
    (tasks.common.building); the runs' names differ."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "smollm2-artifacts"
    folder.mkdir(exist_ok=True)
    return str(folder)


@pytest.fixture(scope="session")
def publish_smollm2(smollm2_artifacts):
    """Builds a published run of SmolLM2-135M (its HF weights stand in for a merged model, with `system` as the
    training system prompt) and exports it with the demo profile's export settings plus `overrides`:
    `publish(run, system, overrides, log_fn) -> (ExportRecord, published folder, held-out chats, data record)`.
    The run is `<smollm2_artifacts>/runs/<run>/smollm2`; serve-model and chat find it by `run`."""

    def publish(run: str, system: str, overrides: tuple[str, ...] = (), log_fn=None):
        import json
        from types import SimpleNamespace

        from tasks.common import write_json
        from tasks.config import load_config
        from tasks.data import load_dataset_records
        from tasks.export import export_artifacts
        from tasks.models import resolve_model
        from tasks.publish import MANIFEST, install_system_prompt

        cfg = load_config(profile="demo", overrides=[f"artifacts_dir={smollm2_artifacts}", "data.embedded_train=64", "data.embedded_heldout=16",
                                                     "data.heldout_size=16", *overrides])
        data = load_dataset_records(cfg.data, cfg.model, smollm2_artifacts)
        ref = resolve_model(cfg.model, smollm2_artifacts)
        runs = Path(smollm2_artifacts) / "runs"
        pub = runs / run / "smollm2"
        if not pub.exists():
            shutil.copytree(ref.path, pub / "merged", ignore=shutil.ignore_patterns("COMPLETE"))
            install_system_prompt(pub / "merged", system)
            (pub / "README.md").write_text("# card\n")
            write_json(pub / "summary.json", {"data": {"stop_token_ids": data.stop_token_ids}})
            write_json(pub / MANIFEST, {"files": []})
            write_json(runs / run / "summary.json", {"published": str(pub)})
        rec = export_artifacts(SimpleNamespace(key=ref.fingerprint), SimpleNamespace(dir=str(pub), merged_dir=str(pub / "merged")),
                               data, cfg.export, system, smollm2_artifacts, log_fn)
        heldout = [json.loads(l)["messages"] for l in (Path(data.dir) / "heldout.jsonl").read_text().splitlines()]
        return rec, pub, heldout, data

    return publish


# `make test` runs the files on 2 xdist workers, a file at a time per worker (--dist loadfile), in the order collected
# (the Makefile passes --no-loadscope-reorder: xdist's own order, most tests first, put these files, which hold few
# but long tests, last, so the suite ended on one worker running them while the other had nothing left). Longest
# first: the short files then fill in behind them on whichever worker frees up, and both finish together.
# Seconds = each file's total (setup + call + teardown of every test) in the fresh-clone `make test --durations=0` run of
# 2026-12-06 00:28 UTC at 222dcc6 (both workers busy: 2,758 s in all, 23 min 22 s of pytest; the box otherwise idle),
# files of 15 s and more (test_cache_keys.py and test_second_half.py, unnamed before, ran last on one worker);
# test_export.py less the SmolLM2 artifacts its fixture now shares with test_quantize.py (45 -> 21 s of setup, b1d02db).
# Files not named here run after them, in their usual order.
# test_multi_gpu.py: 544 s measured alone (pytest -q, one process) on 2026-12-07 20:00 UTC at suite-14 (8e46eed), the box
# loaded by two other helpers' tests (load 4-5), against 124 s in that run: its 100 tests and the
# two-rank stop tests put it among the longest; in the 2026-12-07 17:48 `make test` its nine slowest tests alone took
# ~330 s. Unscaled: in a `make test` it reads less, but it belongs at the front with test_compile.py.
# test_use_the_model.py (428 tests, up from 202 s in the 2026-12-06 run) and test_multi_gpu.py: measured alone (pytest -q
# --durations, one process, nice 19) on 2026-12-07 at suite-15, the box shared with other helpers (load 2.5-4.7): 916 s
# and 371-402 s. Both alone numbers, one box and hour: their ratio orders them (the 428 serving tests, most of them
# waiting on a server subprocess, now the longest file), not the seconds of a `make test`. At 202 s it started behind
# six files; not yet checked in a whole `make test`.
# Measured again alone, one after the other (pytest -q --durations=0, one process, nice 19) on 2026-12-08 01:39-02:02 UTC at
# suite16 (697320e), the box shared with two other helpers' setups and tests (load 2-5): test_use_the_model.py 1,038 s
# (433 passed), test_multi_gpu.py 333 s (100 passed). The numbers below are those.
# test_quantize.py is the exception: 80 s in that run, and placed after the long files on purpose, so the llama-quantize
# build (started in the background as the session begins, below) has most of the suite's first ten minutes before its
# Q4_K_M tests need the binary.
LONGEST_FILES = {"test_compile.py": 337, "test_export.py": 290, "test_deploy.py": 256, "test_faults.py": 240,
                 "test_architectures.py": 230, "test_use_the_model.py": 1038, "test_resume.py": 198, "test_resume_stages.py": 149,
                 "test_multi_gpu.py": 333, "test_constraints.py": 94, "test_bad_inputs.py": 71, "test_ui_browser.py": 71,
                 "test_cache_keys.py": 67, "test_flow.py": 51, "test_merge.py": 50, "test_quantize.py": 45,
                 "test_second_half.py": 37, "test_data_mix.py": 20, "test_train.py": 20, "test_bench_scripts.py": 19,
                 "test_imports.py": 19, "test_benchmarks.py": 16, "test_data.py": 15}


def pytest_collection_modifyitems(config, items):
    """Longest files first (LONGEST_FILES), each file's tests in their own order (a stable sort)."""
    items.sort(key=lambda item: -LONGEST_FILES.get(item.path.name, 0))


# llama.cpp's llama-quantize (tasks/quantize.py), which the Q4_K_M tests need, is built once per environment: ~300 s of
# CPU on 2 cores (docs/BENCHMARKS.md "llama-quantize build"). Built inside their fixture, it held one worker for 270-390 s
# of every fresh-clone `make test`, while the suite as a whole leaves cores idle (the workers' tests wait on Prefect
# servers, subprocess starts and polls). So one process of the session (xdist's gw0, or the only one) starts the same
# build at the lowest priority as soon as collection shows those tests will run, and the fixture finds the binary, or
# waits for it on the build's own file lock (ensure_quantizer), which also keeps the two from building twice. A build
# that fails in the background is simply tried again by the fixture, which reports the error as before.
QUANTIZER_FIXTURE = "q4_export"  # tests/test_quantize.py: the fixture whose export runs llama-quantize
# The build stops as on Ctrl-C once the session's process is gone without ending it (killed, or torn down by xdist
# after a Ctrl-C to pytest): no build left running after the suite.
STOP_WHEN_ORPHANED = """import os, signal, sys, threading, time
def _watch(parent=int(sys.argv[1])):
    while os.getppid() == parent:
        time.sleep(1)
    os.killpg(0, signal.SIGINT)
threading.Thread(target=_watch, daemon=True).start()
"""
_BUILD = STOP_WHEN_ORPHANED + "from tasks.export import LLAMA_CPP_SOURCES; from tasks.quantize import ensure_quantizer; ensure_quantizer(LLAMA_CPP_SOURCES, print)"
_background_build: subprocess.Popen | None = None


def start_quantizer_build(items, worker: str, collect_only: bool = False, log_dir: str = TEST_PREFECT_HOME) -> subprocess.Popen | None:
    """The background build, when these `items` include a test of QUANTIZER_FIXTURE, this process is the one to start it
    (`worker` gw0) and the binary is not built yet; None otherwise."""
    if collect_only or worker != "gw0" or not any(QUANTIZER_FIXTURE in getattr(i, "fixturenames", ()) for i in items):
        return None
    from tasks.export import LLAMA_CPP_SOURCES
    from tasks.quantize import quantizer_path

    if quantizer_path(LLAMA_CPP_SOURCES).is_file():
        return None
    return spawn_build([sys.executable, "-c", _BUILD, str(os.getpid())], stdout=open(os.path.join(log_dir, "llama-quantize-build.log"), "w"))


def spawn_build(cmd: list[str], **popen) -> subprocess.Popen:
    """`cmd` at the lowest priority, in its own session, with Ctrl-C restored: a suite started in the background (CI,
    `make test &`) hands its children SIGINT ignored, and the build would then stop only on SIGKILL, leaving its
    temporary folder behind."""

    def lowest_priority_and_ctrl_c():
        os.nice(19)
        # Where the kernel groups a session's processes for the scheduler (sched_autogroup_enabled: 1 here by default,
        # likely on CI), nice ranks processes only within one group: the build's new session was a group of its own at
        # nice 0, as heavy as all the suite's workers together — up to a core of the 2 for its ~300 s. The group's nice.
        try:
            with open("/proc/self/autogroup", "w") as group:
                group.write("19")
        except OSError:  # no autogroup support: os.nice alone does it
            pass
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lowest_priority_and_ctrl_c, **popen)


def pytest_collection_finish(session):
    """Also: what the test modules imported (torch, transformers, PEFT, Prefect: ~0.5 M objects) is frozen out of the
    cyclic garbage collector's reach. Each full collection walked all of it, ~0.3-0.5 s on this box, 34 of them in
    test_train.py alone (docs/BENCHMARKS.md "The garbage collector in the suite"); what the tests make is collected
    as before."""
    global _background_build
    gc.collect()
    gc.freeze()
    _background_build = start_quantizer_build(session.items, os.environ.get("PYTEST_XDIST_WORKER", "gw0"),
                                              session.config.option.collectonly)


def pytest_sessionfinish(session, exitstatus):
    """A session that ends early (Ctrl-C, -x, --maxfail) stops the build: Ctrl-C to its process group, so its temporary
    folder is removed; the binary is written whole or not at all. Otherwise it is left to finish (another worker's
    Q4_K_M tests may be waiting for it)."""
    proc = _background_build
    if proc is None or proc.poll() is not None:
        return
    if exitstatus == pytest.ExitCode.INTERRUPTED or session.shouldstop or session.shouldfail:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
