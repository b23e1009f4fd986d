"""A real Prefect server (and `qlora-pipeline serve`) in subprocesses, as a user runs them: a free loopback
port, SQLite under a private PREFECT_HOME, no telemetry. Shared by the deployment, resume and browser tests;
the in-process `prefect_server` fixture of conftest.py can't be reached by other processes or a browser.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PREFECT = str(Path(sys.executable).parent / "prefect")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "CRASHED"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`prefect server start` on 127.0.0.1:<free port>; `env` is what every client subprocess needs.

    Each server has its own PREFECT_HOME and database. The first one a test process starts migrates its new database
    (~8 s of CPU of its ~11 s start on this 2-core box); a copy of that database as it stood once healthy, before any
    test used it, then starts each later server of the process (~4 s): the same empty, migrated database."""

    # this process's migrated, unused database (not Prefect's memo_store.toml: its hash holds the database URL, which
    # names each server's own home, so a copied memo never matches and the blocks are registered again either way)
    _template: Path | None = None
    TEMPLATE_FILES = ("prefect.db",)

    def __init__(self, home: Path, log: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.home = home
        self.log = log or home / "server.log"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_UI_API_URL": self.api,  # the UI calls this from the browser; default is port 4200
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",  # a queued run retries its slot after 3s, not 30s
            "PREFECT_RUNNER_POLL_FREQUENCY": "2",  # `serve` looks for due runs every 2s, not 10s
            "PYTHONPATH": str(ROOT),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        self.env.pop("QLORA_PIPELINE_FAULT", None)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> LocalServer:
        self.home.mkdir(parents=True, exist_ok=True)
        if LocalServer._template and not (self.home / "prefect.db").exists():
            for name in self.TEMPLATE_FILES:
                if (LocalServer._template / name).is_file():
                    shutil.copy2(LocalServer._template / name, self.home / name)
        self.proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                                     env=self.env, cwd=self.home, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.api}/health", timeout=2) as r:
                    healthy = r.status == 200
            except OSError:
                healthy = False
                time.sleep(0.5)
            if healthy:
                if LocalServer._template is None:
                    LocalServer._template = self._save_template()
                return self
        self.stop()
        raise TimeoutError(f"prefect server not healthy after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def _save_template(self) -> Path:
        """A consistent copy of this server's database (SQLite's backup API, safe while the server runs)."""
        template = Path(tempfile.mkdtemp(prefix="prefect-db-template-"))
        atexit.register(shutil.rmtree, template, True)
        with closing(sqlite3.connect(self.home / "prefect.db")) as src, closing(sqlite3.connect(template / "prefect.db")) as dst:
            src.backup(dst)
        return template

    def stop(self) -> None:
        stop_process(self.proc)

    # --- the REST API, enough for tests (no client settings to leak into the pytest process) ---

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return self._call(urllib.request.Request(f"{self.api}{path}", data=json.dumps(body or {}).encode(),
                                                 method="POST", headers={"Content-Type": "application/json"}))

    def get(self, path: str) -> Any:
        return self._call(urllib.request.Request(f"{self.api}{path}"))

    @staticmethod
    def _call(req: urllib.request.Request, attempts: int = 6) -> Any:
        """One request, retried on 503 as Prefect's own client does: the server answers 503 "Service
        Unavailable" when SQLite is busy (`prefect.server.api.server.is_client_retryable_exception`), which a
        loaded 2-core CI machine hits while several processes write to the same database."""
        for attempt in range(attempts):
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    return json.loads(r.read() or "null")
            except urllib.error.HTTPError as e:
                if e.code != 503 or attempt == attempts - 1:
                    raise
                time.sleep(0.5 * 2**attempt)

    def flow_run(self, run_id: str) -> dict[str, Any]:
        return self.get(f"/flow_runs/{run_id}")

    def task_runs(self, run_id: str) -> list[dict[str, Any]]:
        return self.post("/task_runs/filter", {"flow_runs": {"id": {"any_": [run_id]}}, "sort": "EXPECTED_START_TIME_ASC"})

    def state_names(self, run_id: str) -> list[str]:
        return [s["name"] for s in self.get(f"/flow_run_states/?flow_run_id={run_id}")]

    def wait(self, run_id: str, timeout: float = 400, states: set[str] = TERMINAL) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in states:
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} still {run['state_type']} ({run['state_name']}) after {timeout}s")

    def wait_for_task(self, run_id: str, prefix: str, timeout: float = 300) -> None:
        """Until the run has a task run named `prefix`* (a stage has started); fails if the run ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(t["name"].startswith(prefix) for t in self.task_runs(run_id)):
                return
            assert self.flow_run(run_id)["state_type"] not in TERMINAL, f"run {run_id} ended before reaching {prefix}"
            time.sleep(0.5)
        raise TimeoutError(f"run {run_id} did not reach {prefix} in {timeout}s")

    def prefect(self, *args: str, timeout: float = 180, env: dict[str, str] | None = None) -> str:
        """Run the `prefect` CLI against this server; returns its output, raises with it on failure."""
        out = subprocess.run([PREFECT, *args], env={**self.env, **(env or {})}, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out.stdout + out.stderr

    def run_deployment(self, name: str, **params: Any) -> str:
        """`prefect deployment run NAME -p key=json ...` as a user types it; returns the flow-run id."""
        args = [a for k, v in params.items() for a in ("-p", f"{k}={json.dumps(v)}")]
        out = self.prefect("deployment", "run", name, *args)
        for line in out.splitlines():
            if "UUID:" in line:
                return line.split("UUID:")[1].strip()
        raise AssertionError(f"no flow-run id in the output of prefect deployment run:\n{out}")


class Serve:
    """`qlora-pipeline serve ...` in a subprocess (the README's command); ready once its deployment exists."""

    def __init__(self, server: LocalServer, *args: str, log: Path, env: dict[str, str] | None = None):
        self.server, self.args, self.log = server, args, log
        self.env = {**server.env, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180, poll: float = 0.5) -> Serve:
        offset = self.log.stat().st_size if self.log.exists() else 0  # the same log across restarts
        # Started with SIGINT ignored, as a script or CI starts a background command (and as pytest's children were
        # whenever the suite itself ran in the background): stop() must still end it with Ctrl-C.
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *self.args], env=self.env, cwd=ROOT,
                                     stdout=self.log.open("a"), stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if b"is being served" in self.log.read_bytes()[offset:]:  # printed once the deployment is registered
                return self
            time.sleep(poll)
        self.stop()
        raise TimeoutError(f"serve did not start within {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        """Ctrl-C: the runner cancels nothing that's done, pauses the schedule, exits 0 (stop_process SIGKILLs it after
        30 s otherwise: returncode -9)."""
        stop_process(self.proc, signal.SIGINT)


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop a process group we started, politely first."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass
