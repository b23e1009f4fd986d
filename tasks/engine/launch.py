"""Multi-GPU stages: the probe and the training stage under `torchrun`, one process per GPU, supervised by
the (Prefect) parent.

    training:
      gpus: 2        # or auto: every visible GPU; 1 (the default) trains in the task's own process

With `training.gpus` > 1 the stage function writes its inputs to a JSON file and calls `run_stage`, which
starts

    python -m torch.distributed.run --standalone --nproc-per-node N --tee 3 --log-dir <work>/launch \
        -m tasks.engine.launch worker <work>/launch-<stage>.json

streams rank 0's log lines to the stage's logger and the rest of the output to stderr, and, when a rank
dies, fails with one line naming the rank, its exit code and its last lines. Each rank imports and calls the
stage's entry named in the spec (`tasks.train:train_on_rank`, `tasks.probe:probe_on_rank`: the stage names
itself, so this module imports no stage and no import cycle runs through it) on its own GPU
(`device_map={"": local_rank}`): Trainer wraps the LoRA model in DDP (NCCL on GPUs, gloo on CPU), which
all-reduces the LoRA gradients bucket by bucket while the backward pass runs, and shards the packed dataset so
every rank trains on different batches. Rank 0
writes checkpoints, the heartbeat, the adapter and the stage record; the parent reads the record back.

`device=cpu` with `training.gpus=2` runs two CPU processes over gloo: the same path, for tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..common import StageError, TrainingStopped, in_a_deployment_run, off_the_lost_terminal, read_json, write_json
from .dist import is_main, local_rank, rank

STOP_GRACE_S = 600  # how long a stop may take: every rank finishes its step and the checkpoint is saved
# How long the stage waits on past torchrun's grace before it kills torchrun and the ranks itself: torchrun SIGKILLs a rank
# still stopping at the grace's end and then exits, which takes it a moment; the stage's own kill comes only after that.
KILL_AFTER_GRACE_S = 30
READER_WAIT_S = 5  # how long a stop leaves torchrun's output reader to pass its last lines on (stderr may be blocked)
LOG_PREFIX = "@@qlora-pipeline "  # rank 0's stage log lines; the parent hands them to the stage logger
TAIL_LINES = 4


# ---------------------------------------------------------------------------------------------------------
# Parent side: start torchrun, stream, supervise


def run_stage(stage: str, entry: str, inputs: dict[str, Any], n: int, work: Path, log_fn: Callable[[str], None],
              saved: Callable[[], Path | None] = lambda: None) -> dict:
    """Run `stage` ("train" | "probe") on `n` ranks; each calls `entry` ("module:function", taking the spec dict
    and a log function, returning a pydantic record on rank 0); return the record rank 0 wrote, or raise StageError.
    `saved` gives the newest checkpoint a rerun would resume from, if any (a stop that ended the ranks before they could
    save: TrainingStopped if there is one, else KeyboardInterrupt, as in one process)."""
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / f"launch-{stage}.json"
    result_path = work / f"result-{stage}.json"
    logs = work / "launch"
    for p in [result_path, *work.glob(f"error-{stage}-rank*.json")]:
        p.unlink(missing_ok=True)
    # CLOCK_MONOTONIC is shared by every process of the host: the ranks count the launch against the budget.
    write_json(spec_path, {**inputs, "stage": stage, "entry": entry, "result": str(result_path), "t_launch": time.monotonic()})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "--tee=3", f"--log-dir={logs}", "-m", "tasks.engine.launch", "worker", str(spec_path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast: not needed for LoRA-sized all-reduces
    # A stop (Ctrl-C, SIGTERM, SIGHUP) reaches the ranks through torchrun only: it starts each rank in a session of its
    # own, so a terminal's Ctrl-C reaches this process (and torchrun, when in its process group: see below), not the
    # ranks. torchrun passes the signal on and SIGKILLs a rank still running after its grace, 30 s by default, which a
    # large model's step plus checkpoint outlasts: killed before it saved. Its grace is this stage's own wait for a stop,
    # STOP_GRACE_S or a user's longer one (torch reads it from 2.12 on, pytorch#172596: 2.12.0's
    # torch/distributed/launcher/api.py does, 2.11.0's does not; 2.11 and older keep 30 s).
    grace = _stop_grace(env, stage, log_fn)
    env["PYTHONPATH"] = _python_path(env.get("PYTHONPATH"), stage, log_fn)
    # `python -m` puts the working folder first on sys.path, before the installed packages: a user's torch.py, signal.py
    # or tasks/ there was imported by torchrun and the ranks instead (Python >= 3.11, which the project requires; torchrun
    # passes its environment on to the ranks).
    env["PYTHONSAFEPATH"] = "1"
    # This launch's own mark, which the `finally` finds torchrun by if an exception cut Popen short (`_forked_child`):
    # found by its command line, another thread's launch of the same stage and work folder was taken for this one's,
    # stopped and called this stage's (a review, 2026-12-07).
    launch_mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    env[LAUNCH_MARK] = launch_mark
    _keep_sighup_ignored(env)
    log_fn(f"{stage}: launching {n} processes: {' '.join(cmd[1:])}")
    tail: deque[str] = deque(maxlen=40)
    forwarded = stop_signals_to_forward()
    # Every stop signal the stage's handlers took, in order, a Ctrl-C's too: the handlers only note them (_CtrlC,
    # `_forward_stop_signals`), and this function acts on them, in its main thread. A handler runs at any instruction,
    # another handler's included: the SIGTERM handler passed the signal on itself, and a Ctrl-C landing between its claim
    # of the one stop signal and the send raised there, so torchrun got nothing while the stage said a stop was under
    # way: the ranks trained on through the stage's whole wait and ended killed, unsaved (a review, 2026-12-07).
    came: list[signal.Signals] = []
    stop = _OneStop()  # the one stop signal torchrun gets from the stage
    oom_before = _oom_kills()
    heard: list[str] = []  # the stop signals torchrun said it received ("Received SIGTERM death signal")

    def show(line: str) -> None:
        text = re.sub(r"^\[(?:rank|default)\d+\]:", "", line.rstrip("\n"))
        if m := DEATH_SIGNAL.search(text):
            heard.append(m.group(1))
        if text.startswith(LOG_PREFIX):
            log_fn(text[len(LOG_PREFIX):])
        else:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))

    # The Ctrl-C handler is set first, inside the `try`, before torchrun starts. It raises nothing: the stage raises a
    # first Ctrl-C's KeyboardInterrupt itself where it looks (`ctrl_c.check`), once torchrun is started and read, and then
    # every 0.1 s: one that raised as Popen returned or the reader started (before the `try`, from Python's own handler)
    # ended the stage without waiting for torchrun's stop or killing it (a review, 2026-12-06).
    # Where that handler is set, torchrun starts in a process group of its own and gets the first Ctrl-C from the stage
    # alone, once, in the `except`: a terminal's Ctrl-C goes to its foreground process group, which torchrun was part of,
    # and one that came in Popen's own Python code, before the fork, reached no torchrun: the stop waited for one that
    # trained on, until the second Ctrl-C killed it (a review, 2026-12-07). Passed on as well while torchrun got the
    # terminal's, it would reach torchrun twice, and torchrun's second signal makes the ranks stop at once, unsaved. Out
    # of the terminal's group, torchrun also gets no SIGHUP from it (`nohup`: _keep_sighup_ignored) and no Ctrl-Z. So too
    # where this process ignores SIGINT (`trap "" INT`, a script's `cmd &`): there is no Ctrl-C to pass on, and torchrun,
    # which sets a SIGINT handler of its own, stopped the ranks on the terminal's all the same (flows/cli.py said so). With
    # another handler (someone else's, or this stage off the main thread) torchrun stays in this process's group, whose
    # Ctrl-C it gets from the terminal as before.
    # Each handler is recorded before it is set, and put back in the `finally` with no Ctrl-C raising: a Ctrl-C as they
    # were put back ended the stage with _CtrlC still SIGINT's handler, its first Ctrl-C used up: Ctrl-C did nothing
    # from then on in this process, and SIGTERM went to the ended torchrun (a review, 2026-12-06).
    previous: dict = {}
    ctrl_c = _CtrlC(came)
    # What Popen runs: torchrun through the program that has it die with this process.
    argv = _dying_with(os.getpid(), cmd)
    proc: subprocess.Popen | _Forked | None = None
    reader: threading.Thread | None = None
    killed = False
    seen_ended = False
    ended_at: int | None = None  # how many stop signals had come when the stage knew torchrun had ended: later ones stop nothing
    ctrl_c_after_the_end = False  # a first Ctrl-C came once torchrun had ended on its own: it stops nothing
    at_once = False  # a second SIGTERM or SIGHUP came: stop at once
    passes_ctrl_c_on = False  # torchrun in a process group of its own, its Ctrl-C passed on by the stage

    def finished() -> bool:
        """torchrun ended cleanly, not killed by the stage, and rank 0 wrote the record: a Ctrl-C now came too late."""
        return proc is not None and not killed and proc.returncode == 0 and result_path.is_file()

    def too_late(when: str, then: str = "stopping the run as asked") -> None:
        # Rank 0 completed the stage's folder before writing the record, so stopping loses nothing, and the user asked
        # to stop: going on to evaluate, merge and publish after a Ctrl-C (as the first fix did) is not what they asked.
        # Said just before the stage raises or hands a signal back: through `_logging_on`, a log_fn that raises
        # (BrokenPipeError) replaced what the stage ends with (a review, 2026-12-07).
        _logging_on(log_fn)(f"{stage}: {when}: its result is kept (its folder is complete: the rerun reuses it); {then}")
    try:
        # first: a Ctrl-C from here on reaches it, and no later one can raise in the stop
        passes_ctrl_c_on = ctrl_c.install(previous)
        # Before Popen too: a SIGTERM as Popen forked torchrun (waiting for its exec) went to the caller's handler, and
        # Prefect's raises: Popen re-raised without its child, and torchrun trained on, unwatched (a review, 2026-12-07).
        # Noted here, it is passed on in the loop's first turn. In a deployment run SIGTERM stays Prefect's
        # (`stop_signals_to_forward`), whose TerminationSignal may still land here: the `finally` finds and stops torchrun.
        _forward_stop_signals(previous, forwarded, stage, log_fn, came)
        own_group = passes_ctrl_c_on or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                text=True, errors="replace", bufsize=1, process_group=0 if own_group else None)
        # torchrun's output is read in a thread from the start, never in this one: a Ctrl-C's KeyboardInterrupt raised in
        # the middle of a read (in the text decoder, Python code, called on bytes already taken from the pipe) dropped
        # them, torchrun's "Received SIGINT death signal" line with them (6 of 18 stuck-rank stops; 0 of 26 since). The
        # thread also keeps the ranks' lines reaching the log during a stop ("saved"), and a full pipe from blocking
        # torchrun's copying of them.
        reader = read_in_background(proc.stdout, show)
        # Not proc.wait(): a Ctrl-C reached a thread blocked in waitpid late (0.25 s on an idle box; under load only after
        # the ranks had stopped and printed it, before the stage said it was stopping). The sleep's turns look at what came.
        while proc.poll() is None:
            ctrl_c.check()  # a first Ctrl-C: the `except` below
            passed_on = [s for s in came if s != signal.SIGINT]  # SIGTERM, SIGHUP
            if passed_on:
                stop.send(proc, passed_on[0])  # the first stop signal (none if a Ctrl-C's went before)
            if len(passed_on) > 1:  # as a second Ctrl-C does: in one process a second stop signal of any kind stops at once
                at_once = True
                raise KeyboardInterrupt
            time.sleep(0.1)
        ctrl_c.check()  # a Ctrl-C in the last turn came before torchrun was seen ended
        # Seen ended before any Ctrl-C raised: one from here on came after torchrun had ended on its own and stops nothing.
        seen_ended = True
        ended_at = len(came)
        # torchrun's last lines, its failure summary among them. Not one reader.join(): where the stage's stderr blocks (a
        # terminal paused with Ctrl-S, a stalled `2>&1 | less`) the reader blocks writing them, and a Ctrl-C or SIGTERM
        # waited unraised until the output moved again, forever if it never did (a review, 2026-12-07). Once a SIGTERM or
        # SIGHUP has come, the reader gets READER_WAIT_S more, as after a Ctrl-C (the `except`).
        stop_seen_at = None
        while True:
            reader.join(0.1)
            ctrl_c.check()
            if not reader.is_alive():
                break
            if stop_seen_at is None and any(s != signal.SIGINT for s in came):
                stop_seen_at = time.monotonic()
            if stop_seen_at is not None and time.monotonic() - stop_seen_at >= READER_WAIT_S:
                break
    except KeyboardInterrupt:
        if proc is None:
            # Popen returned nothing: a SIGINT handler not the stage's (someone else's) raised in it, before the fork or
            # after it (or as it returned). After the fork torchrun runs: the `finally` finds it and stops it, as it does
            # after Prefect's SIGTERM handler raised there (it stays in a deployment run).
            raise
        # A Ctrl-C that reached the stage once torchrun had ended (as its last lines were read) stops nothing: it said
        # "stopping" for an ended torchrun and dropped the record of a finished run (a review, 2026-12-06).
        stopping = None
        graceful = False  # the stop torchrun was given ran its course: each rank finished its step, or failed on its own
        if proc.poll() is None:
            # torchrun passes the Ctrl-C on: the ranks save a checkpoint and exit. In a process group of its own it has it from
            # here only (one held since before Popen's fork too); else from the terminal, as this process did.
            # torchrun's second stop signal stops the ranks at once, unsaved: a Ctrl-C after a forwarded SIGTERM was
            # that second signal while the stage said "Ctrl-C again to stop at once" (a review, 2026-12-07). It gets one.
            stopping, lost = STOP_WORDS[stage]
            first = False
            if at_once:
                ended = "again"
            else:
                first = stop.send(proc, signal.SIGINT) if passes_ctrl_c_on else stop.claim(signal.SIGINT)
                if first:
                    log_fn(f"{stage}: stopping: {stopping} (up to {-(-grace // 60)} min); Ctrl-C again to stop at once")
                elif passes_ctrl_c_on:
                    log_fn(f"{stage}: a stop is under way ({stop.name()} passed on to torchrun): {stopping} (up to "
                           f"{-(-grace // 60)} min); Ctrl-C again to stop at once")
                else:  # torchrun in this process's group: the terminal's Ctrl-C reached it too, its second stop signal
                    log_fn(f"{stage}: a stop was under way ({stop.name()} passed on to torchrun); torchrun had this Ctrl-C from "
                           f"the terminal as well, its second stop signal: its ranks stop at once; {lost}")
                # Any stop signal after this Ctrl-C (came holds the stage's own first Ctrl-C; a caller's handler's is not
                # there) stops at once: another Ctrl-C, SIGTERM, SIGHUP.
                after = came.index(signal.SIGINT) + 1 if signal.SIGINT in came else len(came)
                ended = _wait_for_stop(proc, came, after, grace + KILL_AFTER_GRACE_S)  # torchrun's own kill first
                if ended == "ended":
                    ended_at = len(came)
            graceful = ended == "ended" and (first or passes_ctrl_c_on)  # torchrun had one stop signal
            if ended != "ended":
                _kill_with_its_ranks(proc, stage, log_fn)
                killed = True  # what the kill left is stuck in the kernel and named: the `finally` does not stop it again
                log_fn(f"{stage}: stopped at once: {lost}" if ended == "again" else
                       f"{stage}: torchrun and its ranks had not ended {grace + KILL_AFTER_GRACE_S} s after the stop: killed; {lost}")
        if reader is not None:
            reader.join(timeout=READER_WAIT_S)
        if finished():  # the ranks finished: the Ctrl-C came too late to stop them, not to stop the run
            too_late(f"Ctrl-C after the {n} processes had finished" if stopping is None else
                     f"the {n} processes finished before the stop reached them")
            raise
        elif seen_ended or (stopping is None and not at_once):
            # They had failed on their own: reported below as without the Ctrl-C, whose KeyboardInterrupt hid which rank
            # died and how (a review, 2026-12-06). So too for a Ctrl-C that came in the poll's sleep as torchrun ended
            # (raised before the stage saw it end: `stopping` is None, nothing was passed on): it raised KeyboardInterrupt,
            # or a rank's TrainingStopped after a forwarded SIGTERM, hiding a rank's own crash (a review, 2026-12-07).
            # Said below, once what ended them is known: "their failure follows" was said here before the stop that the
            # ranks' records gave (TrainingStopped after a forwarded SIGTERM; a review, 2026-12-07).
            ctrl_c_after_the_end = True
        else:
            # What the ranks' records say (`_ranks_outcome`, as after a forwarded SIGTERM): a rank's own failure, or a saved
            # checkpoint (TrainingStopped). No failure after a stop at once: a rank killed in a collective breaks its
            # peers' connection, and theirs fail on it. Else this Ctrl-C's own KeyboardInterrupt.
            outcome = _ranks_outcome(stage, n, _rank_errors(stage, work), failures=graceful)
            if outcome is not None and (isinstance(outcome, TrainingStopped) or not isinstance(outcome, KeyboardInterrupt)):
                raise outcome from None
            raise
    finally:
        # A stop signal whose handler is still the caller's (a deployment run's SIGTERM: Prefect's, which raises
        # TerminationSignal) is only noted while the `finally` runs, and handed back to that handler at its end, once
        # torchrun is stopped and the stage's handlers are put back: a second Cancel in the wait for torchrun's stop raised
        # there, and the stage ended with torchrun mid-stop, unwatched, its own handlers never put back (a review,
        # 2026-12-07). Noted in `came` too: the wait takes it as a second stop signal (stop at once). First thing: a Cancel
        # whose handler ran at the `finally`'s first line (`say`'s, then; a pending signal's handler runs as a function
        # starts) left the `finally` before the restore: SIGINT stayed the stage's disarmed _CtrlC, SIGHUP the forwarder
        # to an ended torchrun (a review, 2026-12-07).
        held: list[signal.Signals] = []
        outer = _hold_stop_signals(previous, held, came)
        # Every line here goes through `say`: a log_fn that raises (print to a closed stdout: BrokenPipeError) cut the
        # `finally` short at its first line, before the wait for torchrun's stop and the handlers' restore: torchrun left
        # mid-stop, unwatched, and the stage's disarmed Ctrl-C handler left SIGINT's for good (a review, 2026-12-07).
        say = _logging_on(log_fn)
        # From here on no Ctrl-C is a first one: it stops at once, and no restore is cut short. `late`: a first Ctrl-C came
        # that the stage has not raised yet (its handler ran as the `finally` began: a pending one runs as a function
        # starts; one raising there put no handler back, a review, 2026-12-06): raised below once the handlers are back.
        unpressed, late = ctrl_c.disarm()
        ending = sys.exc_info()[1]  # what ends the stage here, if anything: a deployment run's Cancel (TerminationSignal)
        if proc is None and ending is not None:
            # It came in Popen after the fork (Popen re-raises without its child) or as Popen returned, before `proc` held
            # it: torchrun ran on, unwatched, until this process exited (a review, 2026-12-07). Found by this launch's mark.
            proc, unknown = _forked_child(launch_mark)
            if unknown is not None:
                # Nothing was found to stop, and whether torchrun started is not known: said, not taken as none started
                # (a review, 2026-12-07).
                say(f"{stage}: {type(ending).__name__} came as torchrun started, and torchrun could not be found to stop: "
                    f"{unknown}; if it started, it runs on unwatched (see `ps -ef | grep torch.distributed.run`) until it "
                    "ends or this process does (it dies with this process on Linux)")
        # This process is ending otherwise (a deployment run's Cancel): no rank outlives it.
        if proc is not None and not killed and proc.poll() is None:
            # the ranks finish the step and save a checkpoint, as on Ctrl-C (unless a stop was passed on before)
            sent = "SIGTERM passed on" if stop.send(proc, signal.SIGTERM) else f"{stop.name()} passed on before"
            why = type(ending).__name__ if ending is not None else "the stage's end"
            say(f"{stage}: {why} came while torchrun (pid {proc.pid}) ran: the stage waits for torchrun's stop before it "
                f"ends ({sent} to torchrun): {STOP_WORDS[stage][0]} (up to {-(-grace // 60)} min)")
            ended = _wait_for_stop(proc, came, len(came), grace + KILL_AFTER_GRACE_S)  # torchrun's own kill first
            if ended != "ended":
                # Said as the `except`'s kills are: the line above promised a checkpoint, and the log's last word was that
                # promise while the ranks were SIGKILLed unsaved (a review, 2026-12-07).
                _kill_with_its_ranks(proc, stage, say)
                killed = True
                lost = STOP_WORDS[stage][1]
                say(f"{stage}: stopped at once: {lost}" if ended == "again" else
                    f"{stage}: torchrun and its ranks had not ended {grace + KILL_AFTER_GRACE_S} s after the stop: killed; {lost}")
        seen = len(ctrl_c.later)
        # SIGINT's last (it was set first): put back first, a Ctrl-C right after it raised from Python's own handler here,
        # before SIGTERM's and SIGHUP's were put back, and those forwarded to the ended torchrun from then on (a review,
        # 2026-12-06). Never None: a handler set outside Python is not replaced (_forward_stop_signals).
        for sig, handler in [*outer.items(), *reversed(previous.items())]:
            signal.signal(sig, handler)
        raise_ctrl_c = False  # raised last, after the held signals: a Cancel held meanwhile still reaches Prefect's handler
        if unpressed and (late or len(ctrl_c.later) > seen):  # the user's first Ctrl-C, as the handlers were put back: theirs
            # Once the ranks had finished it stops no rank, as in the `except`: it says their result is kept, and stops the run.
            # Once torchrun had failed on its own (the `try` ran to its end: torchrun ended with a non-zero exit), it stops
            # nothing either, and its failure is reported below, as after the `except`'s Ctrl-C: raised here, KeyboardInterrupt
            # hid the rank's failure and the run read as interrupted (a review, 2026-12-07). A clean exit without a record
            # keeps the Ctrl-C (test_a_ctrl_c_at_the_stages_start_or_end_leaves_ctrl_c_and_sigterm_working).
            if finished():
                too_late(f"Ctrl-C after the {n} processes had finished")
                raise_ctrl_c = True
            elif ending is not None or proc is None or killed or not proc.returncode:
                raise_ctrl_c = True
            else:
                ctrl_c_after_the_end = True
        # A SIGTERM or SIGHUP that came once torchrun had ended, the stage ending with an exception of its own (the ranks'
        # outcome after a Ctrl-C's stop, a Ctrl-C's KeyboardInterrupt): it stops nothing, and was dropped without a word:
        # M2's line is said only where the stage goes on past this `finally` (a review, 2026-12-07).
        after_end = [s for s in came[ended_at:] if s != signal.SIGINT and s not in held] if ended_at is not None else []
        # torchrun had failed on its own, and something else ends the stage (a deployment run's Cancel, TerminationSignal, as
        # its last lines were read): the Cancel goes on (Prefect acknowledges it), and the failure that had already ended the
        # ranks is said first: it was neither raised nor said, and the run read as cancelled (a review, 2026-12-07).
        if seen_ended and ending is not None and not isinstance(ending, (StageError, TrainingStopped)) and proc.returncode:
            try:
                by = stop.sent[0].name if stop.sent else (heard[0] if heard else None)
                failed = str(_failure(stage, n, proc.returncode, proc.pid, work, logs, list(tail), oom_before, stopped_by=by,
                                      saved=saved))
            except Exception as e:  # noqa: BLE001 -- the clean-up goes on; what ended the ranks is said as far as known
                failed = f"torchrun exited {proc.returncode}; its failure could not be read ({type(e).__name__}: {e})"
            say(f"{stage}: {type(ending).__name__} after the {n} processes had ended (exit code {proc.returncode}): it stops "
                f"nothing; what had ended them: {failed}")
        # Once the ranks had finished, it is handed back to the caller's handler, as where the stage returns the record
        # (M2): after a Ctrl-C there too it was neither said nor handed back (a CLI under SIG_DFL ended as interrupted,
        # not by its SIGTERM; a review, 2026-12-07).
        names = " and ".join(dict.fromkeys(s.name for s in after_end))
        if ending is not None and after_end and finished():
            say(f"{stage}: {names} as the {n} processes finished: it stops nothing; the signal is handed back to the caller's "
                "handler")
            held += after_end
        elif ending is not None and after_end:
            then = "their failure follows" if isinstance(ending, StageError) else "the stage ends with its stop"
            say(f"{stage}: {names} after the {n} processes had ended (exit code {proc.returncode}): it stops nothing; {then}")
        for sig in dict.fromkeys(held):  # to the caller's handler, now back: Prefect's raises TerminationSignal
            signal.raise_signal(sig)
        if raise_ctrl_c:
            raise KeyboardInterrupt
    rc = proc.returncode
    failure = None
    if rc != 0:
        by = stop.sent[0].name if stop.sent else (heard[0] if heard else None)
        failure = _failure(stage, n, rc, proc.pid, work, logs, list(tail), oom_before, stopped_by=by, saved=saved)
    elif not result_path.is_file():
        failure = StageError(f"{stage}: the {n} processes exited cleanly but rank 0 wrote no record ({result_path}); see the "
                             "output above")
    if failure is not None:
        # A stop that came once torchrun had ended reached nothing: a Ctrl-C (the `except`), or a SIGTERM or SIGHUP that was
        # passed on to no one (all but the one sent, if any: it came as torchrun ended, or after), which was dropped without
        # a word (a review, 2026-12-07). Worded from what ended the ranks, known only now. Said through `_logging_on`: a
        # log_fn that raised here (BrokenPipeError) was what the stage raised, the rank's failure said and raised nowhere
        # (a review, 2026-12-07).
        after = ["Ctrl-C"] * ctrl_c_after_the_end + [s.name for s in came if s != signal.SIGINT][len(stop.sent):]
        if after:
            then = "their failure follows" if isinstance(failure, StageError) else "they had stopped already: their stop follows"
            _logging_on(log_fn)(f"{stage}: {' and '.join(dict.fromkeys(after))} after the {n} processes had ended (exit code "
                                f"{rc}): it stops nothing; {then}")
        raise failure
    caught = [s for s in came if s != signal.SIGINT]
    # Those the `finally` held (`_hold_stop_signals`: noted in `held` and `came`) it handed back already: handed back here
    # too, one SIGTERM reached a caller's handler that only notes it twice (a review, 2026-12-07). Said all the same.
    handed_back = list(caught)
    for sig in held:
        if sig in handed_back:
            handed_back.remove(sig)
    if caught:
        # A SIGTERM or SIGHUP that came as torchrun ended (as its last lines were read, as the handlers were put back: 0.1 s
        # and more) found no torchrun to pass it on to, or reached it after its ranks had finished: the stage returned the
        # record and the run went on as if it had not come (a review, 2026-12-07). It is the caller's again, now that its
        # handlers are back: raised here, it does what it would have done without the stage (SIG_DFL: this process ends;
        # Prefect's or a user's handler: theirs), after the line that says the result is kept. That line claims no stop: a
        # handler that only notes the signal lets the run go on, which "stopping the run as asked" denied (a review, 2026-12-07).
        too_late(f"{caught[0].name} as the {n} processes finished", "the signal is handed back to the caller's handler")
        for sig in dict.fromkeys(handed_back):
            signal.raise_signal(sig)
    return read_json(result_path)


# What a stop does in each stage, and what a stop at once loses: only training saves a checkpoint as it stops.
STOP_WORDS = {
    "train": ("each rank finishes its step and saves a checkpoint",
              "no checkpoint saved for this stop; the rerun resumes from the last saved one"),
    "probe": ("the ranks end their trial; the probe saves nothing, so the rerun probes again", "the rerun probes again"),
}


def _logging_on(log_fn: Callable[[str], None]) -> Callable[[str], None]:
    """`log_fn` for the lines of a clean-up that must run to its end: a line `log_fn` fails on goes to the process's own
    stderr as it is, if it can, and the clean-up goes on; what `log_fn` raised is dropped (the stage's own outcome, the
    exception already on its way out or the failure still to come, is what the stage ends with)."""

    def say(line: str) -> None:
        try:
            log_fn(line)
        except Exception:  # noqa: BLE001 -- a line that cannot be logged must not leave torchrun running
            with contextlib.suppress(Exception):
                sys.__stderr__.write(line + "\n")

    return say


def read_in_background(lines, show: Callable[[str], None]) -> threading.Thread:
    """A started daemon thread that hands each of `lines` to `show`, in the caller's context: a Prefect task's logger
    is found through it (a plain thread's first log line raised MissingContextError, which ended the thread, so the
    ranks' lines were lost and the pipe no longer drained; a review, 2026-12-06). A line `show` fails on goes to the
    process's own stderr as it is, if it can, and the reading goes on: a failure ended the thread, and torchrun, blocked
    on the full pipe, never ended, so neither did the stage (stderr a closed pipe: BrokenPipeError; a review, 2026-12-06).
    The first failure's traceback is printed once."""

    def read() -> None:
        failed = False
        for line in lines:
            try:
                show(line)
            except Exception:  # noqa: BLE001 -- whatever it is, the pipe must keep draining
                with contextlib.suppress(Exception):
                    if not failed:
                        failed = True
                        traceback.print_exc(file=sys.__stderr__)
                with contextlib.suppress(Exception):
                    sys.__stderr__.write(line)

    reader = threading.Thread(target=contextvars.copy_context().run, args=(read,), daemon=True)
    reader.start()
    return reader


def _stop_grace(env: dict[str, str], stage: str, log_fn: Callable[[str], None]) -> int:
    """Set torchrun's grace for a stop in `env` to the larger of the user's and STOP_GRACE_S, and return it.
    PET_SHUTDOWN_TIMEOUT (torchrun's --shutdown-timeout as an environment variable) overrides
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT: the user's value is the one torchrun would read."""
    name = next((v for v in ("PET_SHUTDOWN_TIMEOUT", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT") if env.get(v)), None)
    grace = STOP_GRACE_S
    if name is not None:
        try:
            users = int(env[name])
        except ValueError:
            raise StageError(f"{name}={env[name]!r} is not a whole number of seconds; unset it or set e.g. {STOP_GRACE_S}") from None
        if users < STOP_GRACE_S:
            saved = "saved its checkpoint" if stage == "train" else "ended its trial"  # the probe saves nothing
            log_fn(f"{stage}: {name}={users} raised to {STOP_GRACE_S}: torchrun SIGKILLs a rank still stopping after it, "
                   f"before the rank {saved}")
        grace = max(users, STOP_GRACE_S)
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = env["PET_SHUTDOWN_TIMEOUT"] = str(grace)
    return grace


def _kill_with_its_ranks(proc: subprocess.Popen | _Forked, stage: str, log_fn: Callable[[str], None]) -> None:
    """SIGKILL torchrun and every process under it. torchrun starts each rank in a session of its own: killed alone,
    it left the ranks running with PPID 1, training on and holding their GPU, after the stage had ended. A Ctrl-C
    meanwhile cannot cut it short: run_stage's handler (_CtrlC) raises on the first Ctrl-C only. The wait for them to
    go is KILL_WAIT_S: a process stuck in the kernel (uninterruptible sleep, STAT D: the GPU driver) ends only when the
    kernel call returns, and an endless wait left the terminal deaf to Ctrl-C; those still there are named in one line."""
    under = _descendants(proc.pid)  # before the kill: then they are no longer torchrun's
    proc.kill()
    for pid in under:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    left = _still_there(proc, under, KILL_WAIT_S)
    if left:
        pids = ",".join(map(str, left))
        log_fn(f"{stage}: processes {pids} (torchrun and its ranks) were sent SIGKILL but had not ended {KILL_WAIT_S} s later: "
               f"stuck in the kernel, most often the GPU driver; they end when it returns (a GPU reset or a reboot if never). "
               f"Ctrl-C works again; see them with `ps -o pid,stat,cmd -p {pids}` (STAT D: stuck in the kernel)")


KILL_WAIT_S = 30  # how long the kill of torchrun and its ranks waits for them to go before it says which are left


def _still_there(proc: subprocess.Popen | _Forked, others: list[int], timeout: float) -> list[int]:
    """Of `proc` (reaped here) and `others` (not this process's children: read from /proc), those still running
    after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    while any(map(running, others)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in [proc.pid] if proc.poll() is None] + [pid for pid in others if running(pid)]


LAUNCH_MARK = "QLORA_PIPELINE_LAUNCH"  # the environment variable that marks the torchrun of one run_stage call


def _forked_child(mark: str) -> tuple[_Forked | None, str | None]:
    """This process's child whose environment has LAUNCH_MARK=`mark`, as a _Forked (None if there is none), and why none
    could be looked for, if so (None if every child was looked at). Popen forks with vfork here (no preexec_fn): by the time
    an exception can land after the fork, the child has run its exec, so its environment is the one Popen gave it (kept by
    `_dying_with`'s program's exec of torchrun). The mark is this launch's alone: a command line is the same for every
    launch of a stage on one work folder."""
    children = _children()
    if not children:  # this process itself is in /proc if it can be read at all
        return None, "/proc could not be read (no /proc: not Linux, or not mounted)"
    wanted, unread = f"{LAUNCH_MARK}={mark}".encode(), []
    for pid in children.get(os.getpid(), []):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile
        except OSError as e:
            unread.append(f"{pid} ({e.strerror or e})")
            continue
        if wanted in environ.split(b"\0"):
            return _Forked(pid), None
    return None, f"the environment of child process {', '.join(unread)} could not be read from /proc" if unread else None


class _Forked:
    """torchrun known by its pid only, its Popen object lost: an exception (a deployment run's TerminationSignal) cut Popen
    short after its fork, or came as it returned. The little of a Popen that run_stage's `finally`, `_OneStop`,
    `_wait_for_stop` and `_kill_with_its_ranks` use."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by subprocess's clean-up of the lost Popen object, which has its exit code
                done, status = self.pid, 0
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not a pid reused since it was reaped
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class _OneStop:
    """The one stop signal torchrun gets from the stage, whichever comes first: a forwarded SIGTERM or SIGHUP, the first
    Ctrl-C passed on, the `finally`'s SIGTERM. torchrun passes its first on to the ranks (they finish the step and save)
    and takes a second as "stop at once": its `_shutdown` is cut short and the ranks are killed, unsaved. Sent by run_stage
    in its main thread, never from a signal handler (the `came` comment there)."""

    def __init__(self) -> None:
        self.tries = itertools.count()
        self.sent: list[signal.Signals] = []  # the one passed on (none if torchrun had ended)

    def send(self, proc: subprocess.Popen | _Forked, sig: signal.Signals) -> bool:
        """Send `sig` to torchrun if no stop signal went before; whether none had."""
        if next(self.tries) != 0:
            return False
        if proc.poll() is None:
            self.sent.append(sig)  # before: a signal's handler may run between the two
            proc.send_signal(sig)
        return True

    def claim(self, sig: signal.Signals) -> bool:
        """torchrun got `sig` from elsewhere (the terminal's Ctrl-C): no stop is sent from now on; whether it was the first."""
        if next(self.tries) != 0:
            return False
        self.sent.append(sig)
        return True

    def name(self) -> str:
        return self.sent[0].name if self.sent else "a stop signal"


class _CtrlC:
    """SIGINT while torchrun runs. The handler raises nothing, wherever it lands: it notes each Ctrl-C in `came` (run_stage's
    list of the stop signals that came), and holds the first for `check`, where run_stage raises its KeyboardInterrupt
    (the stop); each later one only lands in `later` too. So no Ctrl-C can cut short what the stage is doing: passing a
    stop on to torchrun (a Ctrl-C in the SIGTERM handler's send raised there, and torchrun got nothing; a review,
    2026-12-07), the kill of torchrun and its ranks (a third Ctrl-C in the instructions between the second's
    KeyboardInterrupt and the kill's ignore of Ctrl-C raised, and the ranks lived on; a review), Popen or the reader's
    start (it left the stage without the torchrun it had started, running). Which Ctrl-C is the first is chosen by one C
    call, `next(self.presses)`: a second handler run as the first one starts (Python may run one at any instruction, a
    handler's first too) takes the next number; no two can take 0. Set only in the main thread over Python's own Ctrl-C
    handler: SIGINT ignored (a run started in the background) or a handler of someone else's stays as it is, and so does
    Python's elsewhere, which raises KeyboardInterrupt in the main thread only."""

    def __init__(self, came: list[signal.Signals]) -> None:
        self.came = came
        self.presses = itertools.count()
        self.later: list[int] = []
        self.held = False  # the first Ctrl-C came and `check` has not raised it yet

    def __call__(self, signum, frame) -> None:
        self.came.append(signal.SIGINT)
        if next(self.presses) == 0:
            self.held = True
        else:
            self.later.append(signum)

    def check(self) -> None:
        """Raise the first Ctrl-C's KeyboardInterrupt if it came and was not raised yet."""
        if self.held:
            self.held = False
            raise KeyboardInterrupt

    def disarm(self) -> tuple[bool, bool]:
        """From here on no Ctrl-C is a first one (the stage is ending). Whether none was raised before, and whether one came
        that was not raised (it is the caller's to raise)."""
        first_unused = next(self.presses) == 0
        held = self.held
        return first_unused or held, held

    def install(self, replaced: dict) -> bool:
        """Set as SIGINT's handler where it may be (see the class); whether it was. The handler it replaces goes into
        `replaced` first: a Ctrl-C may raise as soon as `signal.signal` has returned, before its result could be stored."""
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            replaced[signal.SIGINT] = signal.default_int_handler
            signal.signal(signal.SIGINT, self)
            return True
        return False


def _wait_for_stop(proc: subprocess.Popen | _Forked, came: list[signal.Signals], seen: int, timeout: float) -> str:
    """Wait up to `timeout` seconds for torchrun to end: "ended", "again" (a stop signal after the first `seen` of `came`:
    stop at once) or "late"."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if len(came) > seen:
            return "again"
        if time.monotonic() >= deadline:
            return "late"
        time.sleep(0.1)
    return "ended"


def _dying_with(parent: int, cmd: list[str]) -> list[str]:
    """`cmd` as a program that receives SIGKILL when `parent`, this process, dies (Linux; `cmd` itself elsewhere). A
    SIGKILLed stage process (Prefect's kill of a cancelled flow after its grace, the OOM killer, `docker kill`) left
    torchrun running as an orphan, and with it the ranks, a stuck one on its GPU for good; each rank in turn dies with
    torchrun (`die_with_parent`). A small Python program sets PR_SET_PDEATHSIG and then becomes `cmd` (execv keeps it,
    the interpreter being no set-user-ID program). It was a preexec_fn before, Python code run between fork and exec in
    a process with threads (a flow run's), which Python's docs call not safe: the child may deadlock before exec; it also
    made subprocess fork the whole process instead of vfork (a review, 2026-12-06). The kernel sends the signal when the
    *thread* that started the process ends: this one, which waits in `run_stage` until torchrun has ended; a flow run's
    tasks run in its main thread (Prefect 3.9)."""
    if _prctl() is None:
        return cmd
    return [sys.executable, "-I", "-c", _DIE_WITH_PARENT, str(parent), *cmd]  # -I: no module of the working folder


# argv: the parent's pid, then the command. It died before the prctl: nothing would send the signal, so it ends here.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL); "
                    "os.getppid() == int(sys.argv[1]) or os.kill(os.getpid(), signal.SIGKILL); os.execv(sys.argv[2], sys.argv[2:])")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> None:
    """A rank: receive SIGKILL when torchrun, its parent, dies (Linux). torchrun passes on a stop and kills its ranks
    itself; killed (`_dying_with`), it could not, and a rank stuck in a collective would hold its GPU for good. torchrun
    starts every rank from its main thread, which lives as long as torchrun. A rank whose parent is already not
    torchrun (it died while the rank started, or the rank was started by hand) ends at once."""
    prctl = _prctl()
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        parent = b""
    if b"torch.distributed.run" not in parent:
        sys.exit(f"tasks.engine.launch worker: its parent (pid {os.getppid()}) is not torchrun: torchrun ended as this rank "
                 "started, or the rank was started by hand; the train/probe stage starts the ranks")


def _children() -> dict[int, list[int]]:
    """Each process's children (pid -> pids), read from /proc (Linux; {} elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])  # after the name, which may hold spaces
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def _descendants(pid: int) -> list[int]:
    """Every process under `pid`, read from /proc (Linux; [] elsewhere)."""
    children = _children()
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


FORWARDED = (signal.SIGTERM, signal.SIGHUP)


def stop_signals_to_forward() -> list[signal.Signals]:
    """FORWARDED, less SIGTERM in a deployment run: its SIGTERM stays Prefect's (its Cancel is acknowledged only by
    Prefect's handler; tasks/train.py): the flow run ends Cancelled and run_stage's `finally` stops torchrun, whose ranks
    save a checkpoint as they stop. Asked before torchrun starts: the first ask imports Prefect (seconds), and a Ctrl-C
    in that import, once the stage's handlers were set, left Prefect's modules half made (AttributeError from
    prefect.types later; a review, 2026-12-06). Less a signal this process ignores, too: `nohup` ignores SIGHUP so that a
    closed terminal does not stop the run, and forwarded, SIGHUP stopped torchrun and the ranks all the same (a review,
    2026-12-07); training in one process leaves an ignored signal ignored (tasks/train.py `_install_interrupt`)."""
    return [s for s in FORWARDED if signal.getsignal(s) is not signal.SIG_IGN and not (s == signal.SIGTERM and in_a_deployment_run())]


# The signals torchrun handles (stops its ranks on) unless told otherwise: torch's own default (2.9+ reads the variable).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


def _keep_sighup_ignored(env: dict[str, str]) -> None:
    """When this process ignores SIGHUP (`nohup`), start torchrun with it ignored too. torchrun inherits the ignore, but
    sets a handler of its own for SIGHUP, which stops the ranks: a closed terminal's SIGHUP, sent to the whole process
    group (the shell's to its jobs, the kernel's to the foreground group), reached torchrun directly and stopped a `nohup`
    run (a review, 2026-12-07). torchrun's --signals-to-handle (torch 2.9+, pytorch#160690), read from
    PET_SIGNALS_TO_HANDLE, lists the signals it sets a handler for; its launcher passes the list on to the code that sets
    them as TORCHELASTIC_SIGNALS_TO_HANDLE, overwriting that variable. SIGHUP is taken out of the user's PET_ list or
    torch's default. A user's TORCHELASTIC_SIGNALS_TO_HANDLE is not torchrun's list (it overwrites it): taken as one (set
    for another tool, say SIGUSR1), torchrun handled neither SIGINT nor SIGTERM under `nohup`, and a forwarded stop killed
    it and the ranks unsaved (a review, 2026-12-07). torch 2.8 and older read neither and handle SIGHUP whatever this says."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        handled = env.get("PET_SIGNALS_TO_HANDLE") or TORCHRUN_SIGNALS
        env["PET_SIGNALS_TO_HANDLE"] = ",".join(s.strip() for s in handled.split(",") if s.strip() not in ("SIGHUP", ""))


def _hold_stop_signals(ours: dict, held: list[signal.Signals], came: list[signal.Signals]) -> dict:
    """For run_stage's `finally`: have each stop signal whose handler is a Python one not the stage's (not in `ours`: a
    deployment run's SIGTERM, Prefect's) only noted in `held` and `came`; return the handlers replaced, to be put back.
    The stage's own handlers (in `ours`) already only note; SIG_DFL and SIG_IGN stay (SIG_DFL ends this process, and the
    ranks with it); off the main thread nothing can be set."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def hold(signum, frame):
        held.append(signal.Signals(signum))
        came.append(signal.Signals(signum))

    replaced = {}
    for sig in (signal.SIGINT, *FORWARDED):
        handler = signal.getsignal(sig)
        if sig not in ours and callable(handler):
            replaced[sig] = handler
            signal.signal(sig, hold)
    return replaced


def _forward_stop_signals(replaced: dict, signals: list[signal.Signals], stage: str, log_fn: Callable[[str], None],
                          came: list[signal.Signals]) -> None:
    """Have SIGTERM and SIGHUP passed on to torchrun, which passes them to the ranks: they finish the step, save a checkpoint
    and stop, as on Ctrl-C (tasks/train.py), and the stage ends with KeyboardInterrupt. `kill PID`, `docker stop`, a
    worker cancelling the flow run and a preempted machine signal this process only: it died and left torchrun and
    the ranks training on, with nothing saved. On SIGHUP (the terminal closed) the ranks' lines go to /dev/null.
    The handlers it replaces go into `replaced`, each before it is replaced (none off the main thread, where Python's stay).
    A handler set outside Python (a C library's, a program's that embeds Python) is not replaced, and its signal not
    forwarded: signal.getsignal gives None for it, which signal.signal cannot set back (TypeError as the stage ended), so
    replaced it would be lost for good, and a later SIGTERM would do nothing in this process but forward to an ended
    torchrun. Left in place, it handles that signal as before; the ranks stop only if it ends this process (they die
    with it: `_dying_with`). The handler only adds each signal that comes to `came`: run_stage, in its main thread, passes
    the stage's first stop signal on to torchrun (its second stops the ranks at once, unsaved), stops at once on a second,
    and raises one that came as torchrun ended again once the handlers are back, if the stage would otherwise return
    (torchrun had ended, or its ranks finished all the same)."""

    def forward(signum, frame):
        came.append(signal.Signals(signum))
        if signum == signal.SIGHUP:
            off_the_lost_terminal()

    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals:
        handler = signal.getsignal(sig)
        if handler is None:
            log_fn(f"{stage}: {sig.name} has a handler set outside Python (signal.getsignal gives None), which could not be put "
                   f"back: it stays, and {sig.name} is not passed on to torchrun")
            continue
        replaced[sig] = handler
        signal.signal(sig, forward)


def _failure(stage: str, n: int, rc: int, pid: int, work: Path, logs: Path, tail: list[str], oom_before: OomCount | None,
             stopped_by: str | None = None, saved: Callable[[], Path | None] = lambda: None) -> BaseException:
    """One line: which rank died first, how, and its last lines (or the exception it reported itself); or that torchrun
    itself (`pid`) was killed, and by whom if the kernel's OOM kill count (`oom_before` at the launch) tells; or the stop
    that ended it (`stopped_by`: `_stopped`)."""
    text = "\n".join(tail)
    root = text[text.rfind("Root Cause"):] if "Root Cause" in text else ""  # torchrun's failure summary
    stopped = _stopped(stage, rc, root, stopped_by, work, saved)
    if stopped is not None:
        return stopped
    last = [t for t in tail if t.strip() and not t.startswith(("=", "-", " "))][-TAIL_LINES:]
    if not root and rc < 0:  # killed by a signal with no summary written: torchrun itself, not a rank (it names those)
        return StageError(_torchrun_killed(stage, n, -rc, pid, oom_before, last, logs))
    m_rank = re.search(r"rank\s*:\s*(\d+)", root)
    m_code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    who = m_rank.group(1) if m_rank else "?"
    code = int(m_code.group(1)) if m_code else rc
    errors = _rank_errors(stage, work)
    # A rank that raised names the problem itself (NaN loss, a bad key, Ctrl-C); a rank killed by a signal
    # cannot, and the others then fail on the broken connection: report the killed one.
    err = errors.get(int(who)) if who.isdigit() else None
    if err is None and code >= 0 and errors:
        err = errors[min(errors)]
    if err is not None:
        return _ranks_outcome(stage, n, errors, err["rank"])
    if not who.isdigit():
        # Neither a failure summary naming a rank nor a rank's own report: "rank ? of 2 died" said more than is known.
        return StageError(f"{stage}: torchrun exited {rc}; no rank reported a failure (no failure summary naming a rank, no "
                          f"rank's error record); its last lines: {' | '.join(last) or '(none)'}; see the log at {logs}. "
                          f"{RERUN[stage]}")
    how, advice = f"exit code {code}", ""
    if code < 0:
        # The rank's signal. SIGKILL alone is the OOM killer's, and then only if its count went up (a review, 2026-12-07:
        # "out of host memory is the usual cause" was said of every signal, the count unread).
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGKILL":
            said, advice = _who_sigkilled(oom_before, _oom_kills())
            how += f" ({name}; {said})"
        else:
            how += f" ({name})"
    last = _rank_tail(logs, who) or last
    return StageError(f"{stage}: rank {who} of {n} died with {how}; its last lines: {' | '.join(last) or '(none)'}; "
                      f"full logs in {logs}. {advice}{RERUN[stage]}")


# What a rank that stopped as asked reports in its error record (tasks/train.py); any other exception is its own failure.
STOPPED = ("KeyboardInterrupt", "TrainingStopped")


def _failed_rank(errors: dict[int, dict], first: int | None = None) -> dict | None:
    """Of the ranks' error records (`_rank_errors`), one that names a failure of the rank's own, not the stop: rank
    `first`'s (the one torchrun's failure summary names) if it does, else the lowest rank's; None if none does. A rank
    that crashed on its own (CUDA, a NaN, a full disk) while a stop was on its way was reported as the stop (the CLI's
    `interrupted`, exit 130), its failure seen nowhere but in its log (a review, 2026-12-07)."""
    failed = {r: e for r, e in errors.items() if e["type"] not in STOPPED}
    if first in failed:
        return failed[first]
    return failed[min(failed)] if failed else None


def _ranks_outcome(stage: str, n: int, errors: dict[int, dict], first: int | None = None,
                   failures: bool = True) -> BaseException | None:
    """What the ranks' error records say ended them, the same after a Ctrl-C as after a forwarded SIGTERM or SIGHUP: a
    rank's own failure (`_failed_rank`, unless `failures` is False), as a StageError naming it; else the stop, as in one
    process: TrainingStopped if any rank saved a checkpoint as it stopped (the run is resumable: the flow records it
    Cancelled), else the KeyboardInterrupt of rank `first`'s stop record or the lowest rank's; None if there is no record.
    The Ctrl-C path raised any rank's TrainingStopped, `_failure` the stop of the summary-named or lowest rank: rank 0
    "interrupted before a checkpoint was saved" and rank 1 "checkpoint-3 saved" gave TrainingStopped after a Ctrl-C and
    KeyboardInterrupt (the flow: Crashed) after a SIGTERM (a review, 2026-12-07)."""
    failed = _failed_rank(errors, first) if failures else None
    if failed is not None:
        return StageError(f"{stage}: rank {failed['rank']} of {n} failed: {failed['type']}: {failed['message']}")
    saved = [r for r, e in errors.items() if e["type"] == "TrainingStopped"]
    if saved:
        return TrainingStopped(errors[min(saved)]["message"])
    stops = [r for r, e in errors.items() if e["type"] in STOPPED]
    if stops:
        return KeyboardInterrupt(errors[first if first in stops else min(stops)]["message"])
    return None


# torchrun's line for a stop signal it got (torch/distributed/elastic/agent/server/api.py: "Received Signals.SIGTERM
# death signal, shutting down workers")
DEATH_SIGNAL = re.compile(r"Received (?:Signals\.)?(SIG[A-Z]+) death signal")
RANK_STOP_CODES = [-s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)]  # torchrun's stop signals


def _stopped(stage: str, rc: int, root: str, by: str | None, work: Path, saved: Callable[[], Path | None]) -> BaseException | None:
    """The stop that ended torchrun, or None if it failed: a stop signal reached torchrun (`by`: the one the stage passed
    on, or the one torchrun said it received) and no rank reported anything. Ranks that still load the model (minutes
    for a large one) or run the probe have no stop handler: torchrun's SIGTERM ends them as Python's default does, with
    no record, and torchrun exits 1 (its SignalException) with no failure summary; the stage said "torchrun exited 1; no
    rank reported a failure ... Rerun", a StageError (the CLI's `error:`), not the stop that was asked for (a review,
    2026-12-07). As in one process (tasks/train.py): KeyboardInterrupt, or TrainingStopped when a checkpoint is there to
    resume from. No stop: torchrun SIGKILLed (the OOM killer, `kill -9`), a rank's own record (an error, or the stop
    it reported: `_failure` reads it), a failure summary naming a rank that exited other than by a stop signal."""
    if by is None or rc == -signal.SIGKILL or _rank_errors(stage, work):
        return None
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    if code is not None and int(code.group(1)) not in RANK_STOP_CODES:
        return None
    checkpoint = saved()
    if checkpoint is not None:
        return TrainingStopped(f"{stage}: stopped by {by} before the ranks saved a checkpoint; {checkpoint.name}, saved "
                               "earlier, is kept: rerun the same command to resume from it")
    if stage == "train":
        return KeyboardInterrupt(f"{stage}: stopped by {by} before a checkpoint was saved")
    return KeyboardInterrupt(f"{stage}: stopped by {by} (the probe saves nothing: the rerun probes again)")


# What a rerun after a failure does in each stage: only training resumes (the probe saves nothing).
RERUN = {"train": "Rerun the same command to resume from the newest checkpoint",
         "probe": "Rerun the same command: the probe starts over (it saves nothing)"}


def _torchrun_killed(stage: str, n: int, signum: int, pid: int, oom_before: OomCount | None, last: list[str], logs: Path) -> str:
    """The failure line for torchrun itself killed by `signum`. It said "rank ? of 2 died ... out of host memory is the
    usual cause" (a review, 2026-12-06): no rank had, and a `kill -9` of torchrun is no memory problem. The ranks die with
    torchrun (`die_with_parent`). Who killed it: `_who_sigkilled`."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    who = advice = ""
    if name == "SIGKILL":  # the OOM killer sends SIGKILL only
        who, advice = _who_sigkilled(oom_before, _oom_kills())
        who = f": {who}"
    ranks = "; its ranks ended with it" if _prctl() is not None else ""  # die_with_parent
    return (f"{stage}: torchrun itself (pid {pid}) was killed by {name}, not one of its {n} ranks{who}{ranks}; "
            f"its last lines: {' | '.join(last) or '(none)'}; full logs in {logs}. {advice}{RERUN[stage]}")


class OomCount(NamedTuple):
    """The kernel's OOM kill count as read from `counter` (a file with an `oom_kill N` line)."""
    counter: Path
    kills: int


# Where the OOM kills are counted: this process's cgroup (v2), whose memory.events counts the kills of its processes and
# its descendants' by any OOM killer, the host's too; else the host's own count (/proc/vmstat). In a container the host's
# count is the only one /proc/vmstat has: a kill in another container raised it, and a rank killed by `kill -9` meanwhile
# read as out of memory (a review, 2026-12-07). The cgroup is read from /proc/self/cgroup ("0::<path>": "/" in a container
# with a cgroup namespace of its own, which sees its own cgroup at the root), then the root's file. cgroup v1 is not read:
# its memory.oom_control counts a cgroup's own kills only, not those of the cgroups under it.
CGROUP_FS, PROC_SELF_CGROUP, VMSTAT = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup"), Path("/proc/vmstat")


def _oom_counters() -> list[Path]:
    """The files that may count this process's OOM kills, the narrowest first."""
    # Bytes, the path decoded as the file system does (os.fsdecode): a cgroup's name is any bytes but '/', and read_text
    # raised UnicodeDecodeError on a Latin-1 one, out of `_oom_kills` before torchrun started (a review, 2026-12-07).
    try:
        own = [os.fsdecode(line[3:]) for line in PROC_SELF_CGROUP.read_bytes().splitlines() if line.startswith(b"0::")]
    except (OSError, ValueError):
        own = []
    cgroups = [CGROUP_FS / own[0].strip("/") / "memory.events"] if own else []
    return list(dict.fromkeys([*cgroups, CGROUP_FS / "memory.events", VMSTAT]))


def _oom_kills() -> OomCount | None:
    """The kernel's OOM kill count from the first of `_oom_counters` that has one (Linux 4.13+), or None."""
    for counter in _oom_counters():
        try:
            for line in counter.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return OomCount(counter, int(value))
        except (OSError, ValueError):
            continue
    return None


def _who_sigkilled(before: OomCount | None, after: OomCount | None) -> tuple[str, str]:
    """Who sent a SIGKILL, as far as the OOM kill count read at the launch (`before`) and now (`after`) tells, and the
    advice that goes with it. The OOM killer sends SIGKILL only; the count says whether it killed anything meanwhile."""
    if before is not None and after is not None and before.counter != after.counter:
        # Both read, from two files (the cgroup's went away or became unreadable meanwhile): not comparable, and "no count
        # could be read" sent the user looking for a missing file (a review, 2026-12-07).
        return (f"by whom is not known: the OOM kill counter changed: {before.counter} oom_kill read {before.kills} at the "
                f"launch, {after.counter} oom_kill {after.kills} now, counts that cannot be compared (the kernel's OOM killer: "
                "see `dmesg | grep -i 'killed process'`; or another process: `kill -9`, a job scheduler's or container's stop)", "")
    if before is None or after is None:
        return ("by whom is not known: no OOM kill count could be read (the kernel's OOM killer: see `dmesg | grep -i 'killed "
                "process'`; or another process: `kill -9`, a job scheduler's or container's stop)", "")
    scope = "the host's" if after.counter == VMSTAT else "this cgroup's"
    read = f"{scope} OOM kill count ({after.counter} oom_kill) read {before.kills} at the launch, {after.kills} now"
    if after.kills > before.kills:
        return (f"most likely by the kernel's OOM killer: {read}: out of memory",
                "Free memory (other programs; fewer ranks: training.gpus) or give the container more. ")
    return (f"not by the kernel's OOM killer: {read}; by another process: `kill -9`, a job scheduler's or container's stop, "
            "a watchdog", "If a scheduler's or container's limit (time, memory) stopped it, give the run more. ")


def _python_path(users: str | None, stage: str, log_fn: Callable[[str], None]) -> str:
    """torchrun's and the ranks' PYTHONPATH: this project's root, then the user's entries less those that are the working
    folder ('.', '' and the like): PYTHONPATH=. (a common shell habit) put it back before the installed packages after
    PYTHONSAFEPATH had taken it away, and a torch.py there was imported by torchrun again (any module but this project's,
    whose root comes first; a review, 2026-12-06). Neither torchrun nor the ranks import anything of the user's; in the
    project's root the entries are left, the root being first anyway."""
    root = Path(__file__).resolve().parents[2]
    try:
        here = Path.cwd().resolve()
    except OSError:  # the working folder was deleted: nothing there to import
        here = root
    entries = users.split(os.pathsep) if users else []
    # os.path.realpath, not Path.resolve: that raised RuntimeError on a symlink loop (before Python 3.13), and the
    # launch failed on an entry Python itself skips (a review, 2026-12-06).
    dropped = [e for e in entries if here != root and Path(os.path.realpath(e or ".")) == here]
    if dropped:
        which = f"entry {dropped[0]!r} is" if len(dropped) == 1 else f"entries {', '.join(map(repr, dropped))} are"
        log_fn(f"{stage}: PYTHONPATH {which} the working folder ({here}): left out of torchrun's and the ranks' PYTHONPATH, "
               "so that a module there (a torch.py, a signal.py) is not imported instead of the real one")
    return os.pathsep.join([str(root), *(e for e in entries if e not in dropped)])


def _rank_errors(stage: str, work: Path) -> dict[int, dict]:
    """Rank -> the exception it reported before exiting (type, message): error-<stage>-rank<N>.json."""
    return {read_json(p)["rank"]: read_json(p) for p in sorted(work.glob(f"error-{stage}-rank*.json"))}


def _rank_tail(logs: Path, who: str) -> list[str]:
    """The last non-empty lines a rank printed (torchrun's --tee copies each rank's streams to files)."""
    if not who.isdigit():
        return []
    files = sorted(logs.glob(f"*/attempt_*/{who}/stderr.log"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    lines = [ln.strip() for ln in files[-1].read_text(errors="replace").splitlines() if ln.strip()]
    return [ln[:300] for ln in lines[-TAIL_LINES:]]


# ---------------------------------------------------------------------------------------------------------
# Rank side: `python -m tasks.engine.launch worker spec.json` (started by torchrun; not meant to be run by hand)


def worker(spec_path: str) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    spec = read_json(Path(spec_path))
    stage = spec["stage"]
    if spec["device"] == "cuda":
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=30), device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    log_fn = (lambda m: print(LOG_PREFIX + m, flush=True)) if is_main() else (lambda m: None)
    try:
        rec = _run_worker_stage(stage, spec, log_fn)
        if is_main():
            write_json(Path(spec["result"]), rec.model_dump(mode="json"))
    except BaseException as e:
        write_json(Path(spec["result"]).parent / f"error-{stage}-rank{rank()}.json",
                   {"rank": rank(), "type": type(e).__name__, "message": str(e).splitlines()[0] if str(e) else ""})
        raise
    dist.destroy_process_group()


def _run_worker_stage(stage: str, spec: dict, log_fn):
    module, _, name = spec["entry"].partition(":")
    if not module.startswith("tasks.") or not name:
        raise StageError(f"tasks.engine.launch: stage {stage!r} names entry {spec['entry']!r}; expected 'tasks.<module>:<function>'")
    return getattr(importlib.import_module(module), name)(spec, log_fn)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "worker":
        sys.exit("usage: python -m tasks.engine.launch worker <spec.json>  (started by torchrun from the train/probe stage)")
    die_with_parent()
    worker(sys.argv[2])
