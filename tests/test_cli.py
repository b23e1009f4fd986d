"""The command line: --help, profiles, and config errors as one clean line each with a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_help_explains_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "chat" in out and "profiles" in out and "resumes" in out
    try:
        main(["run", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert "--hours" in out and "--minutes" in out and "--set" in out and "--profile" in out


def test_profiles_lists_pipeline_yaml(capsys):
    assert main(["profiles"]) == 0
    assert {"demo", "tiny", "mistral-7b"} <= set(capsys.readouterr().out.split())


def test_config_errors_are_one_line_each_and_exit_2():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", "--set", "lora.r=0", "--set", "lora.rnk=3", "--hours", "-2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 3 and all(l.startswith("config error: ") for l in lines)
    assert "Traceback" not in proc.stderr


def test_unknown_profile_exit_2(capsys):
    assert main(["run", "--profile", "nope", "--minutes", "1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_chat_refuses_a_max_new_tokens_below_one_in_one_line(capsys):
    import pytest

    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            main(["chat", "--max-new-tokens", bad, "--prompt", "hi"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--max-new-tokens: must be an integer >= 1" in err and "Traceback" not in err, err


def test_chat_base_and_compare_exclude_each_other_and_reach_chat_as_its_sides(monkeypatch, capsys):
    import tasks.publish as publish_mod

    with pytest.raises(SystemExit) as e:
        main(["chat", "--base", "--compare", "--prompt", "hi"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(publish_mod, "chat", lambda *a, **kw: seen.append(kw["sides"]) or 0)
    for flags in ([], ["--base"], ["--compare"]):
        assert main(["chat", "--prompt", "hi", "--artifacts-dir", "/nonexistent", *flags]) == 0
    assert seen == [("tuned",), ("base",), ("base", "tuned")]


def test_serve_model_refuses_a_port_out_of_range_in_one_line_before_loading(capsys):
    # 70000 loaded the model, then failed with uvicorn's OverflowError traceback; 0 served on a random port while
    # the health wait looked at port 0: no "serving ... Try: curl" line ever came.
    for bad in ("0", "70000", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            main(["serve-model", "--port", bad, "--artifacts-dir", "/nonexistent"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--port: must be a port number from 1 to 65535" in err and "Traceback" not in err, err


def test_the_serving_hint_waits_for_health_on_loopback_past_an_http_proxy(monkeypatch):
    # With $http_proxy set, urlopen sent the /health probe to the proxy: the server answered, the hint never printed.
    import http.server
    import threading
    from types import SimpleNamespace

    from flows.cli import _wait_until_healthy

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    try:
        result = []
        probe = threading.Thread(target=lambda: result.append(_wait_until_healthy(SimpleNamespace(poll=lambda: None), "127.0.0.1", server.server_port)),
                                 daemon=True)
        probe.start()
        probe.join(timeout=15)
        assert result == [True]
    finally:
        server.shutdown()


_SWALLOWED = r"""
import os, signal, sys, time, weakref
from flows.cli import _stop_on_ctrl_c_or_sigterm

_stop_on_ctrl_c_or_sigterm()

class Held:
    pass

def collected(ref):
    os.kill(os.getpid(), signal.{sig})
    for _ in range(10_000):  # the handler runs here, inside the callback, and its KeyboardInterrupt is dropped
        pass

held = Held()
ref = weakref.ref(held, collected)
try:
    del held
    time.sleep(10)
    print("still running")
except KeyboardInterrupt:
    print("stopped")
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_stop_signal_handled_inside_a_weakref_callback_still_stops_serve(sig):
    # CI: a SIGTERM in serve's startup raised its KeyboardInterrupt inside a weakref callback run by the garbage
    # collector; Python dropped it ("Exception ignored in ...") and serve kept serving until SIGKILL 30 s later.
    out = subprocess.run([sys.executable, "-c", _SWALLOWED.replace("{sig}", sig)], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "stopped", (out.stdout, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]


LIBRARY_BARS = r'''
import json, sys
from flows.cli import _quiet_environment
_quiet_environment()  # what `qlora-pipeline` does first
import tqdm.std
clock = [1000.0]
tqdm.std.time = lambda: clock[0]  # tqdm's clock, moved by hand: minutes of bars in a second
from huggingface_hub.utils import tqdm as hub_tqdm
from transformers.utils.logging import tqdm as transformers_tqdm
from tasks.common import progress_bar
def run(make, desc, steps, every_s):
    sys.stderr.write(f"<{desc}>")
    bar = make(total=steps, desc=desc)
    for _ in range(steps):
        clock[0] += every_s
        bar.update(1)
    bar.close()
    sys.stderr.write(f"</{desc}>")
run(transformers_tqdm, "Loading weights", 21, 0.01)  # a small model's load: 0.2 s
run(transformers_tqdm, "Writing model shards", 2, 0.5)
run(hub_tqdm, "Fetching 4 files", 240, 0.5)  # a download of two minutes, a chunk every 0.5 s
run(progress_bar, "evaluate", 4, 0.1)  # a stage's own bar: drawn when it starts, and when it closes
'''


def _bar_draws(env: dict) -> dict[str, str]:
    """What each bar of LIBRARY_BARS wrote to stderr, a pipe (no terminal) as under Prefect, CI or `make run > log`."""
    import os
    import re

    proc = subprocess.run([sys.executable, "-c", LIBRARY_BARS], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if not k.startswith("TQDM_")} | env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(re.findall(r"<([^>]+)>(.*?)</\1>", proc.stderr, re.S))


def test_library_bars_draw_off_a_terminal_only_past_thirty_seconds_and_then_twice_a_minute():
    """`make run > log` (tiny profile, 2026-12-03): 28 bar draws in the log, 14 of them transformers' "Loading weights"
    and "Writing model shards" (0% and 100% of loads that took a fraction of a second, 5 of them); a 7B's download or
    load drew every 0.1 s, a log line each. Off a terminal the libraries' bars now draw as the stages' own do: a bar done
    within 30 s draws nothing, a longer one every 30 s with its ETA and when it closes; the stages' bars still draw when
    they start. A TQDM_MININTERVAL the user set wins."""
    drawn = _bar_draws({})
    assert drawn["Loading weights"] == "" and drawn["Writing model shards"] == "", drawn
    download = drawn["Fetching 4 files"]
    assert 3 <= download.count("Fetching 4 files:") <= 6, download  # 30 s, 60 s, 90 s, 120 s and the close, no more
    assert "00:30<01:30" in download, download  # elapsed < remaining: the ETA
    assert drawn["evaluate"].count("evaluate:") >= 2 and "0/4" in drawn["evaluate"], drawn["evaluate"]
    assert _bar_draws({"TQDM_MININTERVAL": "0", "TQDM_DELAY": "0"})["Fetching 4 files"].count("Fetching 4 files:") > 200


class _Server:
    """A stand-in for transformers serve's process: which signals it got, and how it answers each wait."""

    def __init__(self, *waits):
        self.signals, self.waits, self.killed = [], list(waits), False

    def send_signal(self, sig):
        self.signals.append(sig)

    def wait(self, timeout=None):
        outcome = self.waits.pop(0) if self.waits else 0
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def kill(self):
        self.killed = True


def test_serve_model_stops_the_merged_server_gracefully_then_forces_it_and_a_second_ctrl_c_kills_it():
    import signal
    import subprocess

    from flows.cli import _stop_merged_server

    idle = _Server(0)  # ends on SIGTERM
    _stop_merged_server(idle)
    assert idle.signals == [signal.SIGTERM] and not idle.killed
    busy = _Server(subprocess.TimeoutExpired("serve", 5), 0)  # a request still being answered: uvicorn's second signal
    _stop_merged_server(busy)
    assert busy.signals == [signal.SIGTERM, signal.SIGINT] and not busy.killed
    from tasks.export import STOP_NOW_SIGNAL

    slow = _Server(subprocess.TimeoutExpired("serve", 5), subprocess.TimeoutExpired("serve", 10), 0)  # ends on the stop-now signal
    _stop_merged_server(slow)
    assert slow.signals == [signal.SIGTERM, signal.SIGINT, STOP_NOW_SIGNAL] and not slow.killed
    stuck = _Server(*[subprocess.TimeoutExpired("serve", 5)] * 3)
    _stop_merged_server(stuck)
    assert stuck.signals == [signal.SIGTERM, signal.SIGINT, STOP_NOW_SIGNAL] and stuck.killed
    again = _Server(KeyboardInterrupt(), 0)  # Ctrl-C pressed again while it waits: stopped at once (its exit handlers run), no traceback
    _stop_merged_server(again)
    assert again.signals == [signal.SIGTERM, STOP_NOW_SIGNAL] and not again.killed
    deaf = _Server(KeyboardInterrupt(), subprocess.TimeoutExpired("serve", 5))  # ... and should it not end then: killed
    _stop_merged_server(deaf)
    assert deaf.signals == [signal.SIGTERM, STOP_NOW_SIGNAL] and deaf.killed
    third = _Server(KeyboardInterrupt(), KeyboardInterrupt(), 0)  # ... and once more while the killed server exits
    _stop_merged_server(third)
    assert third.killed and not third.waits
