"""`make test`'s schedule: the longest test files start first on the 2 xdist workers (tests/conftest.py LONGEST_FILES),
so the short ones fill in behind them and neither worker ends the suite alone on a long file."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from conftest import LONGEST_FILES, pytest_collection_modifyitems

TESTS = Path(__file__).resolve().parent


def test_every_file_named_longest_exists():
    """A renamed or removed file would otherwise drop to the end of the schedule without a word."""
    assert not [name for name in LONGEST_FILES if not (TESTS / name).is_file()]


def test_longest_files_come_first_and_each_file_keeps_its_own_order():
    items = [SimpleNamespace(path=TESTS / f, name=f"{f}::{n}") for f, n in
             [("test_config.py", 1), ("test_quantize.py", 1), ("test_config.py", 2), ("test_merge.py", 1), ("test_quantize.py", 2),
              ("test_resume_stages.py", 1)]]
    pytest_collection_modifyitems(None, items)
    assert [i.name for i in items] == ["test_quantize.py::1", "test_quantize.py::2", "test_resume_stages.py::1", "test_merge.py::1",
                                       "test_config.py::1", "test_config.py::2"]


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
