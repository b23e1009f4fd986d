"""`make test`'s schedule: the longest test files start first on the 2 xdist workers (tests/conftest.py LONGEST_FILES),
so the short ones fill in behind them and neither worker ends the suite alone on a long file."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import conftest
from conftest import LONGEST_FILES, QUANTIZER_FIXTURE, pytest_collection_modifyitems, pytest_sessionfinish, start_quantizer_build

TESTS = Path(__file__).resolve().parent


def test_every_file_named_longest_exists():
    """A renamed or removed file would otherwise drop to the end of the schedule without a word."""
    assert not [name for name in LONGEST_FILES if not (TESTS / name).is_file()]


def test_longest_files_come_first_and_each_file_keeps_its_own_order():
    items = [SimpleNamespace(path=TESTS / f, name=f"{f}::{n}") for f, n in
             [("test_config.py", 1), ("test_quantize.py", 1), ("test_config.py", 2), ("test_merge.py", 1), ("test_quantize.py", 2),
              ("test_resume_stages.py", 1)]]
    pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["test_resume_stages.py::1", "test_merge.py::1", "test_quantize.py::1", "test_quantize.py::2",
                                       "test_config.py::1", "test_config.py::2"]


def test_the_quantize_tests_start_after_the_long_files_so_the_background_build_runs_first():
    """test_quantize.py's Q4_K_M tests wait for llama-quantize, built in the background from the session's start: placed
    among the long files' first, they would wait for all of it (minutes) while the other worker runs alone."""
    long_files = [f for f, s in LONGEST_FILES.items() if s >= 60]
    assert long_files and all(LONGEST_FILES[f] > LONGEST_FILES["test_quantize.py"] for f in long_files)


def test_make_test_keeps_the_collected_order():
    """xdist reorders files by their number of tests unless told not to, which put the long files with few tests last."""
    recipe = re.search(r"^test: .*\n\t(.*)$", (TESTS.parent / "Makefile").read_text(), re.M).group(1)
    assert "--dist loadfile --no-loadscope-reorder" in recipe


def test_each_xdist_worker_gives_torch_its_share_of_the_cores():
    """A worker of `pytest -n 2` (and every process it starts) runs torch on its share of the cores it may use, not on
    all cores; limited to one core (taskset, a container's cpuset) it gets one thread, not the host's count."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = "import conftest, os, torch; print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])"
    cores = sorted(os.sched_getaffinity(0))
    runs = [(2, None, max(1, len(cores) // 2)), (1, None, len(cores)), (1, {cores[0]}, 1)]
    for workers, pinned, share in runs:
        out = subprocess.run([sys.executable, "-c", code], cwd=TESTS, env={**env, "PYTEST_XDIST_WORKER_COUNT": str(workers)},
                             capture_output=True, text=True, timeout=120,
                             preexec_fn=(lambda: os.sched_setaffinity(0, pinned)) if pinned else None)
        assert out.stdout.split() == [str(share), str(share)], (workers, pinned, out.stderr[-2000:])


# ---------------------------------------------------------------------------------------------------------
# llama-quantize built in the background (tests/conftest.py start_quantizer_build)


def _items(*fixtures: str) -> list[SimpleNamespace]:
    return [SimpleNamespace(fixturenames=["request", f]) for f in fixtures]


def test_the_quantizer_build_starts_once_per_session_only_when_its_tests_will_run(monkeypatch, tmp_path):
    started: list[tuple] = []
    monkeypatch.setattr(conftest.subprocess, "Popen", lambda *a, **kw: started.append((a, kw)) or "build")
    monkeypatch.setenv("QLORA_PIPELINE_TOOLS", str(tmp_path / "tools"))  # where the fixture's ensure_quantizer looks
    wanted = _items("tiny_cfg", QUANTIZER_FIXTURE)
    assert start_quantizer_build(_items("tiny_cfg", "server"), "gw0", log_dir=str(tmp_path)) is None  # no Q4_K_M test collected
    assert start_quantizer_build(wanted, "gw1", log_dir=str(tmp_path)) is None  # gw0 starts it for the whole session
    assert start_quantizer_build(wanted, "gw0", collect_only=True, log_dir=str(tmp_path)) is None
    assert not started
    assert start_quantizer_build(wanted, "gw0", log_dir=str(tmp_path)) == "build"
    (cmd,), kw = started[0]
    assert cmd[0] == sys.executable and "ensure_quantizer(LLAMA_CPP_SOURCES" in cmd[2]  # the build `make quantizer` runs
    assert cmd[2].startswith(conftest.STOP_WHEN_ORPHANED) and cmd[3] == str(os.getpid())
    kw["stdout"].close()
    assert kw["start_new_session"] and kw["stdout"].name == str(tmp_path / "llama-quantize-build.log")
    from tasks.export import LLAMA_CPP_SOURCES
    from tasks.quantize import quantizer_path

    binary = quantizer_path(LLAMA_CPP_SOURCES)
    binary.parent.mkdir(parents=True)
    binary.write_bytes(b"built")
    assert start_quantizer_build(wanted, "gw0", log_dir=str(tmp_path)) is None and len(started) == 1  # already built


def test_the_quantize_tests_use_the_fixture_that_starts_the_build():
    """A renamed fixture would silently put the build back inside the tests (minutes of one worker)."""
    import test_quantize

    users = {n for n, f in vars(test_quantize).items() if n.startswith("test_") and QUANTIZER_FIXTURE in inspect.signature(f).parameters}
    assert users == {"test_q4_k_m_is_a_third_of_f16_and_agrees_with_the_merged_model", "test_q4_k_m_loads_in_the_llama_cpp_server_and_answers"}


def test_the_fixtures_quantizer_waits_for_a_build_in_progress_instead_of_building_again(monkeypatch, tmp_path):
    """What makes the background build safe: ensure_quantizer, finding another process building (its lock held), waits
    and takes that process's binary."""
    from tasks import quantize
    from tasks.export import LLAMA_CPP_SOURCES

    monkeypatch.setenv("QLORA_PIPELINE_TOOLS", str(tmp_path))
    binary = quantize.quantizer_path(LLAMA_CPP_SOURCES)
    code = ("import sys; from pathlib import Path; from tasks.common import locked; b = Path(sys.argv[1])\n"
            "with locked(b.parent):\n    print('building', flush=True); sys.stdin.readline()\n"
            "    b.parent.mkdir(parents=True, exist_ok=True); b.write_bytes(b'built')")
    other = subprocess.Popen([sys.executable, "-c", code, str(binary)], cwd=TESTS.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline() == "building\n"
    monkeypatch.setattr(quantize, "download_archive", lambda *a: pytest.fail("built a second time"))
    import threading

    threading.Timer(0.5, lambda: (other.stdin.write("done\n"), other.stdin.flush())).start()
    assert quantize.ensure_quantizer(LLAMA_CPP_SOURCES) == binary and binary.read_bytes() == b"built"
    assert other.wait(timeout=60) == 0


@pytest.mark.parametrize("ends, stopped", [("normally", False), ("on -x", True)])
def test_a_session_that_ends_early_stops_the_build_and_one_that_ends_normally_lets_it_finish(monkeypatch, ends, stopped):
    """Stopped with Ctrl-C, which it handles (its temporary folder removed) even when the suite itself was started with
    SIGINT ignored, as a background job is (the build then waited 30 s for its SIGKILL)."""
    import signal
    import threading

    code = ("import sys\ntry:\n    print('building', flush=True); sys.stdin.readline(); print('finished')\n"
            "except KeyboardInterrupt:\n    print('cleaned up'); sys.exit(1)")
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a suite started in the background
    try:
        build = conftest.spawn_build([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    monkeypatch.setattr(conftest, "_background_build", build)
    session = SimpleNamespace(shouldstop=False, shouldfail=ends == "on -x")
    assert build.stdout.readline() == "building\n"  # under way: a Ctrl-C now reaches the build, not the interpreter's start
    if not stopped:
        threading.Timer(0.5, lambda: (build.stdin.write("\n"), build.stdin.flush())).start()
    pytest_sessionfinish(session, pytest.ExitCode.TESTS_FAILED if stopped else pytest.ExitCode.OK)
    assert build.poll() is not None  # never left running past the session
    assert (build.returncode, build.stdout.read()) == ((1, "cleaned up\n") if stopped else (0, "finished\n"))


def test_a_build_whose_session_is_gone_stops_as_on_ctrl_c(tmp_path):
    """pytest killed, or its xdist worker torn down after a Ctrl-C without its session ending: the build does not run on."""
    import time

    log = tmp_path / "build.log"
    code = conftest.STOP_WHEN_ORPHANED + "print('building', flush=True)\ntry:\n    time.sleep(600)\nexcept KeyboardInterrupt:\n    print('cleaned up')"
    session = ("import conftest, os, sys\n"  # a stand-in for the test session: starts the build, then dies
               f"b = conftest.spawn_build([sys.executable, '-c', {code!r}, str(os.getpid())], stdout=open({str(log)!r}, 'w'))\n"
               "print(b.pid, flush=True); sys.stdin.readline()")
    parent = subprocess.Popen([sys.executable, "-c", session], cwd=TESTS, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while "building" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    parent.kill()
    parent.wait()
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # reaped by init once it exits
        time.sleep(0.2)
    assert log.read_text() == "building\ncleaned up\n"


def test_the_build_runs_at_the_lowest_priority_in_its_scheduler_group_too():
    """nice ranks processes only within one scheduler group where the kernel groups sessions (autogroup): the build's
    own session was a group at nice 0, as heavy as the suite's workers together. Its process and its group read 19."""
    import os

    code = "import os\nprint(os.nice(0))\ntry:\n    print(open('/proc/self/autogroup').read().split()[-1])\nexcept OSError:\n    print('none')"
    build = conftest.spawn_build([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out, _ = build.communicate(timeout=60)
    nice, group = out.split()
    assert nice == "19", out
    if os.path.exists("/proc/self/autogroup"):
        assert group == "19", out
