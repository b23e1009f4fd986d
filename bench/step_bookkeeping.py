"""What stage 4's per-step bookkeeping costs the training thread: the heartbeat (`heartbeat.json`, fsynced) and
TensorBoard's flush, as stage 4 did them before (written / flushed on the training thread at every step) and as it does
them now (tasks/train.py `Heartbeat`: handed to a thread of its own; `tensorboard_writer`: flushed every TB_FLUSH_S).

    nice -n 19 .venv/bin/python bench/step_bookkeeping.py [--steps 300] [--step-ms 20] [--rounds 3] [--dir DIR]

Each variant runs `--steps` stand-in steps of `--step-ms`: `sleep` (the host waiting on the device, the GIL free, as in
a CUDA sync) and `busy` (Python holding the GIL: the worst case for a writer thread, which needs it briefly). It prints,
per variant, the training thread's time in the call (median, p90, mean) and the wall a step over the step alone (the
thread's contention included, and this shared machine's noise), each the median of `--rounds` round-robin rounds. `--dir`: where the files go (default: a temporary
folder on this machine's disk; point it at a network mount to price one). docs/PERF_NOTES.md ("The heartbeat and
TensorBoard off the step") quotes its numbers.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def stand_in_step(kind: str, seconds: float) -> None:
    if kind == "sleep":
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def run(kind: str, steps: int, step_s: float, call) -> dict:
    """`steps` stand-in steps, `call(step)` after each (None: the step alone): the call's own ms, the wall ms a step."""
    own = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        stand_in_step(kind, step_s)
        if call is not None:
            t = time.perf_counter()
            call(step)
            own.append(time.perf_counter() - t)
    wall = (time.perf_counter() - t0) / steps
    ms = sorted(1000 * x for x in own) or [0.0]
    return {"median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))], "mean": statistics.fmean(ms), "wall": 1000 * wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step-ms", type=float, default=20.0, help="the stand-in step's length")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds over the variants (medians reported)")
    ap.add_argument("--dir", default=None, help="folder for the heartbeat and the event files (default: a temporary one)")
    args = ap.parse_args()
    from transformers.integrations import TensorBoardCallback

    from tasks import train
    from tasks.common import write_json

    work = Path(tempfile.mkdtemp(prefix="step-bookkeeping-", dir=args.dir))
    step_s = args.step_ms / 1000
    logs = {"loss": 1.234, "grad_norm": 0.5, "learning_rate": 2e-4, "epoch": 0.1, "num_input_tokens_seen": 32768}  # stage 4's scalars
    state = types.SimpleNamespace(is_world_process_zero=True, global_step=0)

    def tb_call(callback):
        def call(step):
            state.global_step = step
            callback.on_log(None, state, None, logs=dict(logs))
        return call

    print(f"{args.steps} steps of {args.step_ms:g} ms, files in {work}")
    print(f"{'step':5} {'variant':46} {'own median':>10} {'p90':>7} {'mean':>7} {'wall/step over the step alone':>31}")
    from torch.utils.tensorboard import SummaryWriter

    for kind in ("sleep", "busy"):
        beat = train.Heartbeat(work / kind / "heartbeat.json")
        before_tb = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(work / kind / "tb-before")))
        after_tb = TensorBoardCallback(tb_writer=train.tensorboard_writer(work / kind / "tb-after"))
        variants = [
            ("the step alone", None),
            ("heartbeat: write_json on the step (before)", lambda step: write_json(work / kind / "hb-before.json", {"elapsed": step * step_s, "step": step})),
            ("heartbeat: Heartbeat.beat (now)", lambda step: beat.beat({"elapsed": step * step_s, "step": step})),
            ("tensorboard: on_log, flush every log (before)", tb_call(before_tb)),
            (f"tensorboard: on_log, flush every {train.TB_FLUSH_S:g} s (now)", tb_call(after_tb)),
        ]
        # round robin, `--rounds` times: the machine's load drifts; each variant's numbers are the median of its rounds
        results: dict[str, list[dict]] = {name: [] for name, _ in variants}
        for _ in range(args.rounds):
            for name, call in variants:
                results[name].append(run(kind, args.steps, step_s, call))
        alone = statistics.median(r["wall"] for r in results["the step alone"])
        for name, _ in variants[1:]:
            r = {k: statistics.median(x[k] for x in results[name]) for k in ("median", "p90", "mean", "wall")}
            print(f"{kind:5} {name:46} {r['median']:10.3f} {r['p90']:7.3f} {r['mean']:7.3f} {r['wall'] - alone:+31.3f}")
        beat.flush()
        before_tb.on_train_end(None, state, None)
        after_tb.on_train_end(None, state, None)
    print("ms; own = the training thread's time in the call; wall = the mean step's wall less the step alone's (noise: +-0.1 ms or more)")


if __name__ == "__main__":
    main()
