"""Stage 4 — QLoRA training within a wall-clock budget, resumable mid-run.

The loop is `transformers.Trainer` — the same loop, bf16 autocast and loss path TRL's `SFTTrainer` runs
(it subclasses Trainer) — fed the stage-1 tokens, whose labels already mask everything but assistant
turns. We skip SFTTrainer's own tokenization and its per-step entropy/accuracy metrics (an extra pass over
the full-vocabulary logits per step) because stage 1 already did the former and nobody reads the latter.

Budget: the stage's wall clock (model load + steps + saves) is the budget. `BudgetGuard` stops where the run
ends nearest the deadline (when half the next step plus the final save would reach it, a checkpoint due then counted
in the step: at most half a step over or under, where stopping before any crossing left up to a whole step unspent), or at the step cap (the user's `training.max_steps`,
else `CAP_FACTOR` (4) times the probe's estimate), whichever first, and saves a checkpoint every `checkpoint_minutes`. The
learning-rate schedule (cosine/linear) runs on *time* — progress = elapsed / budget — not on the probe's
step estimate, so the LR anneals exactly when the budget ends even when real steps run faster or slower
than the few the probe timed (data lengths vary; a 4-hour run drifts); when the step cap comes first,
progress = steps / cap leads instead, so the schedule completes whichever ends the run. Elapsed time is persisted every step (`heartbeat.json`,
written off the training thread: `Heartbeat`), so after a crash the rerun resumes from the newest complete checkpoint — optimizer, scheduler, RNG and data
position via Trainer's own resume — and counts the time already spent against the budget.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .common import (StageError, TrainingStopped, changed_file, complete_record, disk_full, fault_arg, fingerprint, human_seconds, in_a_deployment_run, is_complete,
                     locked, mark_folder_complete, maybe_fault, off_the_lost_terminal, progress_bar, read_json, safetensors_whole, stage_dir, write_json)
from .budget import stop_nearest
from .config import LoraSection, ModelSection, QuantSection, TrainingSection
from .data import DataRecord, load_split, rows_key
from .engine import dist, launch, recompute
from .engine.build import bookkeeping_trainer, build_model, collector_kept_off_the_model, count_params, drop_log_dicts, engine_for, keyed_training, training_args
from .engine.collate import (BatchTrace, PackedStream, PaddedCollator, PassPacks, collator_for, is_padding_free, steps_per_pass,
                             training_dataset)
from .engine.noise import add_embedding_noise
from .engine.unlikelihood import attach_unlikelihood, unlikelihood_exempt
from .models import code_commits, keep_code_commits, keyed_quant, load_tokenizer, recurrent_layers, resolve_device, resolve_model

# PaddedCollator is re-exported here for tasks/evaluate.py and tasks/merge.py (they import it from .train);
# its home is tasks/engine/collate.py.
__all__ = ["PaddedCollator", "TrainRecord", "build_model", "count_params", "train_adapter", "train_on_rank"]

TRAIN_VERSION = 2
CKPT_MARKER = "pipeline_checkpoint.json"  # written after Trainer finished a checkpoint: no marker = torn


class TrainRecord(BaseModel):
    key: str
    dir: str
    adapter_dir: str
    steps: int
    max_steps: int  # the step cap
    expected_steps: int  # the probe's estimate for the budget
    tokens_seen: int
    wall_seconds: float
    budget_seconds: float
    budget_error: float  # (wall - budget) / budget
    stopped_by: str  # max_steps | max_epochs | budget
    final_loss: float
    mean_loss: float
    first_loss: float
    trainable_params: int
    total_params: int
    resumed_from_step: int | None
    micro_batch_size: int
    grad_accum: int
    engine: str
    batch: dict = {}  # the optimizer batch: conversations and tokens per step (means), and the rule that makes it
    loss_curve_png: str
    tensorboard_dir: str
    gpus: int = 1  # data-parallel processes (training.gpus); tokens_seen and tokens/s are over all of them
    lora_targets: dict = {}  # what LoRA adapted and what it could not (tasks/models.py LoraTargets.as_dict); the model card says it
    offload_activations: bool = False  # the checkpointed layers' inputs waited in host memory (the probe's choice)
    compile_layers: bool = False  # the decoder layers ran compiled (training.compile, as the probe timed them)
    compile_seconds: float = 0.0  # compiling them, inside the budget (the probe counted it as fixed cost)
    passes: float | None = None  # tokens read / the data stage's training tokens: how many times the rows were read
    budget_stop: dict | None = None  # the budget's stop as the guard of the rank that made it weighed it (`BudgetGuard.stop_record`); None: something else ended the run

    def outputs_exist(self) -> bool:
        return (is_complete(Path(self.dir)) and (Path(self.adapter_dir) / "adapter_config.json").is_file()
                and safetensors_whole(Path(self.adapter_dir) / "adapter_model.safetensors")
                and Path(self.loss_curve_png).is_file()  # publish copies it
                and changed_file(Path(self.dir)) is None)  # the adapter changed in place since (same size) too, by the marker's list


class NonFiniteLoss(StageError):
    pass


# ---------------------------------------------------------------------------------------------------------
# The time-based schedule


CAP_FACTOR = 4  # the step cap without a user's training.max_steps: this many times the probe's estimate
# How `epoch_cap` turns training.max_epochs into whole steps, in the train key where max_epochs is set (`_keyed_sections`):
# 1 (in no key) rounded up, a step more than the passes allow; 2 (8eb10df) rounds down. Raise it whenever the cap a
# max_epochs gives changes, so the adapters capped the old way train again, once.
EPOCH_CAP_RULE = 2


def epoch_steps(max_epochs: float, per_pass: float, full_steps: float | None = None) -> float:
    """The steps `max_epochs` passes allow, unrounded: whole passes `per_pass` steps each, a part of a pass its share of
    `full_steps` (the pass in full steps: the padded recipe's last step of a pass takes only what is left, and its
    Trainer starts each pass afresh, so 0.9 of a 32-micro-batch pass at accum 5 is 5.76 steps, not 0.9 x 7 = 6.3;
    None: `per_pass`, the packed engines' stream, which runs on into the next pass)."""
    whole = math.floor(max_epochs) if full_steps is not None else 0
    return whole * per_pass + (max_epochs - whole) * (per_pass if full_steps is None else full_steps)


def passes_read(steps: int, per_pass: float, full_steps: float | None = None) -> float:
    """The passes over the rows `steps` steps read (`epoch_steps` turned round): whole passes, then the rest in full steps."""
    if full_steps is None:
        return steps / per_pass
    whole = math.floor(steps / per_pass)
    return whole + (steps - whole * per_pass) / full_steps


def epoch_cap(max_epochs: float | None, per_pass: float, full_steps: float | None = None) -> int | None:
    """The last step that reads the rows no more than `max_epochs` times, `per_pass` optimizer steps a pass
    (tasks/engine/collate.py `steps_per_pass`, from the rows as the engine deals them out: not the probe's tokens per
    step, the mean of the step or two it timed, which put max_epochs=1 at 1.10 and 0.92 passes on the tiny profile;
    `full_steps`: see `epoch_steps`); None without a cap. Whole steps, rounded down (`max_epochs: 2` means no more than
    two passes; rounded up, a pass of 32.5 steps capped max_epochs 1 at 33, a pack more than the pass), but at least one
    step: a max_epochs below a step trains one (`_epochs_note` says so)."""
    steps = epoch_steps(max_epochs, per_pass, full_steps) if max_epochs else 0.0
    if steps <= 0 or not math.isfinite(steps):  # a max_epochs the config takes (1e308) can overflow: no cap, as unset
        return None
    return max(1, math.floor(round(steps, 6)))  # rounded: 0.29 x 100 steps is 29 steps (28.999999999999996), not 28


def _epochs_note(max_epochs: float, train_tokens: int, per_pass: float, probe: Any, by_epochs: int, max_steps: int | None = None,
                 full_steps: float | None = None) -> str:
    """The log's words for training.max_epochs: its cap, and which cap ends the run: training.max_steps where it comes
    first (or at the same step as the pass cap or the probe's steps: the run is stopped by max_steps then), the budget
    where it buys no more steps than the pass cap, else the pass cap, with what it leaves of the budget."""
    buys = passes_read(probe.max_steps, per_pass, full_steps)
    allows = epoch_steps(max_epochs, per_pass, full_steps)
    # the passes the cap reads, not max_epochs itself: the cap is whole steps, at least one (0.0001 is a step's 0.03 passes)
    note = (f"; training.max_epochs {max_epochs:g}: {by_epochs} steps ({per_pass:g} a pass) read the {train_tokens:,} training tokens "
            f"{passes_read(by_epochs, per_pass, full_steps):.2f} times")
    if round(allows, 6) < 1:
        note += f" (it allows {allows:.2g} of a step; a run trains at least one)"
    # max_steps first: the probe caps its steps at it (tasks/probe.py), so probe.max_steps == max_steps where the budget buys more
    if max_steps is not None and max_steps <= min(by_epochs, probe.max_steps):
        return note + f"; training.max_steps {max_steps} is the cap: the run stops at step {max_steps} ({passes_read(max_steps, per_pass, full_steps):.2f} passes)"
    if min(by_epochs, max_steps or by_epochs) >= probe.max_steps:
        return note + f"; the budget is expected to end the run first, at ~{probe.max_steps} steps ({buys:.2f} passes)"
    return note + (f", where the budget buys ~{buys:.1f} passes: the run ends ~{(probe.max_steps - by_epochs) * probe.s_per_step:.0f} s "
                   "early (raise training.max_epochs, or add rows, to spend it)")


def time_schedule(kind: str, warmup_steps: int, progress, cap: int):
    """LR multiplier: linear warmup over steps, then cosine/linear/constant over the run's progress.

    Two things end training: the clock and the step cap. Progress is whichever is further along —
    max(elapsed / budget, steps done / cap) — so the schedule completes whichever ends the run (a cap reached
    early on a fast or idle machine would otherwise stop training at the peak LR).
    """

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        by_steps = (step - warmup_steps) / max(cap - warmup_steps, 1)  # HF's schedules: 0 after warmup, -> 1 at the cap
        p = min(max(progress(), by_steps), 1.0)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if kind == "linear":
            return 1.0 - p
        return 1.0

    return factor


# How stage 4 reads each step's loss for its log (logging_steps: 1, the default, logs every step). "each-step":
# transformers' own, a `.item()` right after the optimizer step is queued: the host waits for the GPU to finish the step,
# then logs, fetches and collates the next micro-batches and copies them over while the GPU idles, and only then queues
# the next forward. "deferred": the step's loss stays on the device (a copy) and is read at the next step's end, once
# that step's kernels are queued: the GPU runs it while the host logs and collates the one after. The log says the
# same numbers, a step later; a step that saves, evaluates or ends training reads at once. One process only (several
# ranks gather the loss in a collective: left as transformers makes it). bench/pipeline_gpu.py `--loss-read` sets it
# to time the two in one call (docs/PERF_NOTES.md "The stage's gap to its probe"). The default stays "each-step" until
# that call measures "deferred" faster: with the default optimizer (bitsandbytes' paged 8-bit) every step is already
# drained inside `optimizer.step()` (PERF_NOTES' list, row 1), so the deferred read is predicted to win nothing there.
LOSS_READS = ("deferred", "each-step")
LOSS_READ = "each-step"


def reads_deferred() -> bool:
    """Whether this process reads each step's loss a step late (LOSS_READ "deferred", one process): only then does the
    guard wait for the device near the deadline and date a log line by its step's end; "each-step" reads as stage 4 did
    before the switch existed."""
    return LOSS_READ == "deferred" and dist.world() == 1


def make_trainer(guard: "BudgetGuard", kind: str, warmup_steps: int, cap: int, bar: "BudgetBar | None" = None, **kwargs):
    """A Trainer whose LR schedule follows the wall clock or the step cap, whichever is further (see module docstring),
    showing `bar` (default a new BudgetBar) instead of Trainer's own, reading each step's loss as LOSS_READ says."""
    import torch

    class TimeBudgetTrainer(deferred_loss_read(bookkeeping_trainer())):  # token and FLOP counts on the host: no per-micro-batch sync
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, time_schedule(kind, warmup_steps, guard.progress, cap))
            return self.lr_scheduler

        def _get_train_sampler(self, train_dataset=None):
            # Packed passes are already in their seeded order and start at the resumed data position.
            if isinstance(train_dataset or self.train_dataset, PackedStream):
                return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)
            return super()._get_train_sampler(train_dataset)

    trainer = TimeBudgetTrainer(**kwargs)
    # BudgetGuard logs each step as one line (Trainer's own dicts would interleave); the bar runs on the budget's clock
    drop_log_dicts(trainer, bar=bar or BudgetBar(guard, cap))
    return trainer


def deferred_loss_read(base):
    """`base` (a Trainer class) reading a step's loss one step late where LOSS_READ is "deferred" (see LOSS_READ): the
    log of step k (loss, grad norm, learning rate, epoch, tokens seen, as Trainer logs them at step k) is made at step
    k + 1's end, when step k + 1's kernels are queued, so the host's wait for step k's loss no longer empties the GPU's
    queue. A step that saves a checkpoint, evaluates or ends training (the budget, the cap, a signal) logs what is
    pending, then itself, at once, as Trainer does: a checkpoint's log history and the run's last line are complete."""
    import torch

    class DeferredLossRead(base):
        _pending_log: dict | None = None

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=None, **kw):
            self._log_pending()  # the previous step's: this step's kernels are queued behind it
            control, state = self.control, self.state
            if (not reads_deferred() or not control.should_log or state.global_step <= self._globalstep_last_logged
                    or control.should_save or control.should_evaluate or control.should_training_stop):
                return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                                        learning_rate=learning_rate, **kw)
            # Trainer's bookkeeping of a log, less the read: the loss sum moves to a device copy of its own (queued, not
            # waited for) and the running sum restarts, as after Trainer's read
            set_aside = getattr(self.compute_loss_func, "set_aside_parts", None)  # training.unlikelihood_alpha: this step's parts
            self._pending_log = {"loss_sum": tr_loss.detach().clone(), "steps": state.global_step - self._globalstep_last_logged,
                                 "grad_norm": grad_norm, "learning_rate": learning_rate, "start_time": start_time,
                                 "state": (state.global_step, state.epoch, state.num_input_tokens_seen),
                                 "parts": set_aside() if set_aside else None}
            tr_loss -= tr_loss
            self._globalstep_last_logged = state.global_step
            self.store_flos()

        def _log_pending(self) -> None:
            pending, self._pending_log = self._pending_log, None
            if pending is None:
                return
            loss = pending["loss_sum"].item()
            grad_norm = pending["grad_norm"]
            logs = {"loss": loss / pending["steps"]}
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm.item() if isinstance(grad_norm, torch.Tensor) else grad_norm
            logs["learning_rate"] = pending["learning_rate"] if pending["learning_rate"] is not None else self._get_learning_rate()
            self._total_loss_scalar += loss
            # Logged as at its own step: Trainer's log and the callbacks (BudgetGuard's line and NaN check, TensorBoard)
            # read the step, epoch and tokens seen from the state.
            now = (self.state.global_step, self.state.epoch, self.state.num_input_tokens_seen)
            self.state.global_step, self.state.epoch, self.state.num_input_tokens_seen = pending["state"]
            if pending["parts"] is not None:
                self.compute_loss_func.held_parts = pending["parts"]
            should_log = self.control.should_log  # this step's, which the callback handler's on_log clears
            try:
                self.log(logs, pending["start_time"])
            finally:
                self.control.should_log = should_log
                self.state.global_step, self.state.epoch, self.state.num_input_tokens_seen = now
                if pending["parts"] is not None:
                    self.compute_loss_func.held_parts = None

        def _inner_training_loop(self, *args, **kw):
            try:
                return super()._inner_training_loop(*args, **kw)
            finally:
                self._pending_log = None  # a run that raised mid-step: nothing of it is logged later (a resume starts afresh)

    return DeferredLossRead


# ---------------------------------------------------------------------------------------------------------
# Budget guard, checkpoints, NaN stop, Ctrl-C


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


SYNC_STEPS = 3  # a deferred loss read lets the host run up to two steps ahead of the GPU; one more for the margin


class Heartbeat:
    """`heartbeat.json`, the elapsed time and step a crashed run's rerun counts against the budget (`_prior_elapsed`),
    written by a thread of its own instead of the training thread. `write_json` fsyncs, and stage 4 wrote it after every
    step while the GPU idled (a drained step: PERF_NOTES' list, row 4): a median 4-8 ms a step on this project's CPU box's disk,
    a round trip to the server or more on a network filesystem (docs/PERF_NOTES.md "The heartbeat and TensorBoard off
    the step"). `beat` hands the newest value over and returns; the thread writes the newest it holds, so a disk slower
    than a step skips values, never queues them.

    What a crash can lose from the count: the time since the newest value on disk, i.e. the step it was running plus at
    most two writes (the one in flight and the one before it: a few ms on a local disk, a network filesystem's fsync
    otherwise); writing on the training thread lost the step alone. `beat(..., wait=True)` (a checkpoint, a stop, a
    signal) and `flush` (the end of training) return once the value is on disk. A write that fails (a full disk) raises
    on the training thread at the next `beat` or `flush`, as it raised there before. The thread ends after IDLE_S
    without a beat and starts again with the next one: nothing is left running by a guard that was never ended."""

    IDLE_S = 30.0

    def __init__(self, path: Path):
        self.path = path
        self._cv = threading.Condition()
        self._newest: dict | None = None
        self._handed = 0  # values handed over so far
        self._written = 0  # the newest of them on disk (its number)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def beat(self, value: dict, wait: bool = False) -> None:
        """Hand `value` to the writer; `wait`: return once it is on disk."""
        with self._cv:
            self._raise_failure()
            newest, self._newest, self._handed = self._newest, value, self._handed + 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_newest, name="heartbeat", daemon=True)
                try:
                    self._thread.start()
                except BaseException:
                    # No thread (a pids limit's "can't start new thread", a Ctrl-C inside start): the value is not handed
                    # over, else `flush` would wait for a write nobody makes; the next beat starts a thread again.
                    self._newest, self._handed, self._thread = newest, self._handed - 1, None
                    raise
            self._cv.notify_all()
        if wait:
            self.flush()

    def flush(self) -> None:
        """Return once the newest value handed over is on disk (or its write failed: raised here)."""
        with self._cv:
            while not self._cv.wait_for(lambda: self._written >= self._handed or self._error is not None, timeout=1.0):
                if self._thread is None or not self._thread.is_alive():  # never wait on a writer that is gone
                    raise RuntimeError(f"heartbeat: its writer thread ended before writing the newest value to {self.path}")
            self._raise_failure()

    def _raise_failure(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_newest(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: self._thread is not me or self._handed > self._written, timeout=self.IDLE_S):
                    self._thread = None  # idle: the next beat starts another
                    return
                if self._thread is not me:
                    return  # its start raised in `beat` after all (a Ctrl-C while start waited for it): not the writer
                value, number = self._newest, self._handed
            try:
                write_json(self.path, value)
            except BaseException as e:  # noqa: BLE001 - raised on the training thread (`beat`, `flush`)
                with self._cv:
                    self._error, self._written = e, number
                    self._cv.notify_all()
                continue
            with self._cv:
                self._written = number
                self._cv.notify_all()


class BudgetGuard(_trainer_callback_base()):
    """Stops at the deadline, checkpoints every N minutes, refuses NaN/inf loss, saves on Ctrl-C.

    With several ranks (training.gpus > 1) every rank runs a guard on its own clock; the stop/save/interrupt
    decisions and the elapsed time are max-reduced over the ranks at each step, so all ranks stop and save at
    the same step (a rank that stopped alone would leave the others waiting in the next all-reduce) and the
    time-based LR schedule reads the same clock everywhere (else the replicas' LoRA weights drift apart). A budget stop
    is recorded as the rank that made it weighed it (`stop_record`). Rank 0 alone writes the heartbeat and the checkpoint
    markers.
    """

    def __init__(self, work: Path, budget_s: float, prior_elapsed: float, checkpoint_s: float, checkpoint_save_s: float, final_save_s: float,
                 log_fn=None, clock: Callable[[], float] | None = None):
        self.clock = clock or time.monotonic  # the guard's only clock: a test gives each rank its own (tests/test_multi_gpu.py)
        self.work = work
        self.budget_s = budget_s
        self.prior = prior_elapsed
        self.checkpoint_s = checkpoint_s  # how often a checkpoint falls due
        self.checkpoint_save_s = checkpoint_save_s  # what saving one costs (the probe's save_seconds)
        self.final_save_s = final_save_s  # what the final adapter's save costs, after the last step (the probe's final_save_cost)
        self.weighed: list[dict] = []  # this process's last two steps as `weigh` judged them
        self.budget_stop: dict | None = None  # a budget stop's weighing, for the record
        self.t0 = self.clock()
        self.last_ckpt = self.t0
        self.last_step_t = self.t0
        self.step_s: list[float] = []
        self.stopped_by = "max_steps"
        self.interrupted = False
        self.log_fn = log_fn
        self.losses: list[tuple[int, float]] = []
        self.synced_elapsed = prior_elapsed  # the ranks' common clock, updated every step (several ranks)
        self.data_position = lambda step: None  # packed engines: where in the data a checkpoint at `step` resumes
        self.tokens_at_start = 0  # tokens seen before this process (a resumed run's): not read in this process's time
        self.loss_parts = None  # training.unlikelihood_alpha: () -> {"ce", "ul"} since the last log line, shown with the loss
        self.parts_step = 0
        # Waits for the device's queued work (torch.cuda.synchronize on CUDA; None: nothing runs ahead of the host). With the
        # loss read deferred (LOSS_READ) the host may end a step while the GPU still runs the one or two before it: near
        # the deadline the guard waits for them before it reads its clock, so the stop weighs the steps that ran.
        self.device_sync: Callable[[], None] | None = None
        self.step_ends: dict[int, float] = {}  # the last steps' ends on the guard's clock: a log line made a step late says its own
        self.heartbeat = Heartbeat(work / "heartbeat.json")  # rank 0's, written off the training thread

    def elapsed(self) -> float:
        return self.prior + self.clock() - self.t0

    def progress(self) -> float:
        """Share of the trainable budget used (the LR schedule's clock)."""
        elapsed = self.synced_elapsed if dist.world() > 1 else self.elapsed()
        return min(max(elapsed / max(self.budget_s - self.final_save_s, 1e-9), 0.0), 1.0)

    def on_step_end(self, args, state, control, **kw):
        maybe_fault(f"train-rank{dist.rank()}-step{state.global_step}")  # test-only: `train-rank1-step3:kill`
        if self.device_sync is not None and self.near_deadline():
            self.device_sync()
        now = self.clock()
        self.step_s.append(now - self.last_step_t)
        self.last_step_t = now
        self.step_ends = {**{k: t for k, t in self.step_ends.items() if k > state.global_step - 4}, state.global_step: now}
        recent = sorted(self.step_s[-5:])[len(self.step_s[-5:]) // 2]
        # A checkpoint due at the last step (Trainer's max_steps: the user's, max_epochs' or the cap) would be written, then
        # removed unread once the final adapter is saved right after: its time went to nothing inside the budget.
        save = now - self.last_ckpt >= self.checkpoint_s and state.global_step < state.max_steps
        # Stop where the run ends nearest the deadline: now (ending at elapsed + the final save) unless one more step would
        # end nearer (elapsed + step + final save), i.e. stop once half a step and the final save reach it. Stopping before
        # any crossing ended a 90-s budget a 3.1-s step (3.4%) short (docs/BENCHMARKS.md, the 15 GiB stage, 2026-12-06). A
        # checkpoint due now is part of going on (a budget stop saves none): weighing the step alone ran half of it and the
        # checkpoint's save past the deadline. Each save at its own cost: the probe's one number for a checkpoint and the
        # final save together, reserved for the final save at every step, ended H100 runs ~0.4-0.5 s early.
        mine = self.weigh(state.global_step, self.elapsed(), recent, save) and state.global_step < state.max_steps
        stop, save, interrupted, self.synced_elapsed = dist.sync_max([mine, save, self.interrupted, self.elapsed()])
        if dist.is_main():
            # on disk before a checkpoint's marker, a stop's final save or a signal's exit; otherwise not waited for
            self.heartbeat.beat({"elapsed": self.synced_elapsed, "step": state.global_step}, wait=bool(stop or save or interrupted))
        if stop:
            # No checkpoint on a budget stop: the final adapter is saved right after, in the budget's time.
            self.stopped_by = "budget"
            self.budget_stop = self.stop_record(mine)
            control.should_training_stop = True
        if save and not stop:
            control.should_save = True
        if interrupted:
            self.interrupted = True
            control.should_training_stop = True
            control.should_save = True
        return control

    def near_deadline(self) -> bool:
        """Whether the budget could end within SYNC_STEPS steps (the slowest of the last five; the first step: always),
        a checkpoint's save and the final save: where the guard's stop must weigh a clock that waited for the device."""
        if not self.step_s:
            return True
        ahead = SYNC_STEPS * max(self.step_s[-5:]) + self.checkpoint_save_s + self.final_save_s
        return self.elapsed() + ahead >= self.budget_s

    def stop_record(self, mine: bool) -> dict:
        """The budget stop as the rank that made it weighed it (the first such rank), for TrainRecord.budget_stop. Each
        rank weighs on its own clock and the stop is any rank's: rank 0's own weighing, which rank 0 recorded alone, read
        as a run that went on (its last step ending well inside the budget) where another rank's clock had stopped it.
        Every rank reaches this at the same step (the stop is max-reduced), so all take part in the gather."""
        ranks = dist.all_gather([mine, self.weighed])
        rank = next((r for r, (stopped, _) in enumerate(ranks) if stopped), dist.rank())
        return {"budget_seconds": self.budget_s, "prior_elapsed": self.prior, "checkpoint_save_seconds": self.checkpoint_save_s,
                "final_save_seconds": self.final_save_s, "rank": rank, "steps": list(ranks[rank][1])}

    def weigh(self, step: int, elapsed: float, step_s: float, checkpoint_due: bool) -> bool:
        """`stop_nearest` at this step, kept (the last two steps) for the record: where stopping would end the run and
        where one more step would (with the checkpoint due now). With several ranks each weighs on its own clock and the
        stop is any rank's."""
        ahead = step_s + (self.checkpoint_save_s if checkpoint_due else 0.0)
        self.weighed = self.weighed[-1:] + [{"step": step, "elapsed": elapsed, "step_seconds": step_s, "checkpoint_due": checkpoint_due,
                                             "ends_if_stopped": elapsed + self.final_save_s, "ends_after_one_more": elapsed + ahead + self.final_save_s}]
        return stop_nearest(elapsed, ahead, self.final_save_s, self.budget_s)

    def on_train_end(self, args, state, control, **kw):
        self.heartbeat.flush()  # the last step's count on disk; a write that failed raises here
        return control

    def on_train_begin(self, args, state, control, **kw):
        self.tokens_at_start = int(state.num_input_tokens_seen or 0)  # the checkpoint's count when resuming
        self.parts_step = state.global_step  # a resumed run's first line covers the steps since the resume
        return control

    def on_step_begin(self, args, state, control, model=None, **kw):
        nan_at = fault_arg("train", "nan")  # test-only `train:nan@N` (docs/RELIABILITY.md): weights turn NaN in step N
        if nan_at and model is not None and state.global_step + 1 == int(nan_at):
            import torch

            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            last = newest_checkpoint(self.work)
            where = f"the last good checkpoint is {last.name}" if last else "no checkpoint was saved yet"
            raise NonFiniteLoss(f"loss became {loss} at step {state.global_step}; {where}. Lower training.learning_rate or check the data")
        self.losses.append((state.global_step, loss))
        if self.log_fn and dist.is_main() and state.global_step % max(args.logging_steps, 1) == 0:
            # deferred read: the step's end (its log comes a step later); each-step: the clock at the log, as before the switch
            at = self.step_ends.get(state.global_step, self.clock()) if reads_deferred() else self.clock()
            used = self.prior + at - self.t0
            left = max(self.budget_s - used, 0)
            tok_s = (state.num_input_tokens_seen or 0) - self.tokens_at_start
            tok_s = tok_s / max(at - self.t0, 1e-9) if tok_s > 0 else 0
            # one rank's parts are its share of the step's loss (the Trainer sums the ranks'): shown on one process only
            parts = self.loss_parts() if self.loss_parts and dist.world() == 1 else {}
            steps = max(state.global_step - self.parts_step, 1)  # the loss shown is the mean over the steps since the last line
            self.parts_step = state.global_step
            split = f" (cross-entropy {parts['ce'] / steps:.4f} + unlikelihood {parts['ul'] / steps:.4f} x alpha)" if parts else ""
            self.log_fn(f"step {state.global_step}/{state.max_steps} loss {loss:.4f}{split} lr {logs.get('learning_rate', 0):.2e} "
                        f"{tok_s:,.0f} tok/s budget used {used:.0f}s left {left:.0f}s")

    def on_save(self, args, state, control, **kw):
        self.last_ckpt = self.last_step_t = self.clock()  # the next step is timed without this save (on_step_end adds it when due)
        dist.barrier()  # every rank has written its part (its RNG state) before the marker says complete
        ckpt = self.work / f"checkpoint-{state.global_step}"
        if dist.is_main() and ckpt.is_dir():
            write_json(ckpt / CKPT_MARKER, {"step": state.global_step, "elapsed": self.elapsed(), "files": sorted(p.name for p in ckpt.iterdir()),
                                            "data_position": self.data_position(state.global_step)})
        return control


class BudgetBar(_trainer_callback_base()):
    """Stage 4's progress bar on the run's clock. The budget ends training, the step cap (4x the probe's estimate) is a
    backstop, so Trainer's bar over steps showed an ETA several times too long: `787/3924 [09:52<40:42]` one second
    before an H200 run's 600 s budget ended (2026-12-02). Its progress is the LR schedule's: elapsed / budget, or
    steps / cap when the cap (a user's training.max_steps) is further along."""

    def __init__(self, guard: BudgetGuard, cap: int):
        self.guard, self.cap, self.bar = guard, cap, None

    def position(self, step: int) -> float:
        budget = self.guard.budget_s
        return min(max(self.guard.elapsed() / budget, step / max(self.cap, 1)), 1.0) * budget

    def on_train_begin(self, args, state, control, **kw):
        if state.is_world_process_zero:
            # The position is in budget seconds, but when the cap leads it is not the clock: show the share of the run.
            self.bar = progress_bar(total=round(self.guard.budget_s), initial=round(self.position(state.global_step)), desc="train",
                                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}{postfix}]")

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.set_postfix_str(f"step {state.global_step} (cap {self.cap}), budget {self.guard.budget_s:.0f} s", refresh=False)
            self.bar.update(max(self.position(state.global_step) - self.bar.n, 0))

    def on_train_end(self, args, state, control, **kw):
        self.close()

    def close(self) -> None:
        """End the bar's line; also called in `_train`'s finally, as an exception skips on_train_end."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def newest_checkpoint(work: Path) -> Path | None:
    """The newest checkpoint that finished writing; torn ones (no marker, missing files) are skipped."""
    ckpts = sorted((p for p in work.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    for c in ckpts:
        marker = c / CKPT_MARKER
        if not marker.is_file():
            continue
        try:
            info = read_json(marker)
        except (json.JSONDecodeError, OSError):
            continue
        if all((c / f).exists() for f in info.get("files", [])) and (c / "trainer_state.json").is_file():
            return c
    return None


def _prior_elapsed(work: Path) -> float:
    hb = work / "heartbeat.json"
    try:
        return float(read_json(hb)["elapsed"]) if hb.is_file() else 0.0
    except (json.JSONDecodeError, KeyError, OSError, ValueError):
        return 0.0


# ---------------------------------------------------------------------------------------------------------
# The stage


# Keys that change how training is logged and saved, not the adapter it trains: in no cache key, so changing them
# reruns nothing (a crash-safety or logging setting must not cost a retrain). README: "Resume, caching".
BOOKKEEPING_KEYS = frozenset({"logging_steps", "keep_checkpoints", "checkpoint_minutes"})
# Keys the probe's key holds exactly where they act (tasks/probe.py `offload_can_apply`; stage 4 offloads as the probe
# chose, and retries offloaded on out-of-memory under the same condition): `probe.key` carries them into this key.
UL_CANDIDATES_WORDS = {"written": "the tokens already written", "continuations": "the continuations of earlier occurrences of each token"}
"""training.unlikelihood_candidates as stage 4's first log line names it."""

PROBE_KEYED = frozenset({"offload_activations", "compile"})  # compile: keyed by the probe where `layers` (tasks/probe.py)


def cache_key(data: DataRecord, probe: Any, model: ModelSection, quant: QuantSection, lora: LoraSection, training: TrainingSection) -> str:
    return _train_key(data, probe, _keyed_sections(probe, quant, lora, training))


def _train_key(data: DataRecord, probe: Any, sections: list) -> str:
    return fingerprint("train", TRAIN_VERSION, rows_key(data), data.model_fingerprint, probe.key, sections)


def _sections_of_older_epoch_rules(probe: Any, quant: QuantSection, lora: LoraSection, training: TrainingSection) -> list[tuple[list, str]]:
    """(keyed sections, the rule in words) of this training under each earlier EPOCH_CAP_RULE, the first those from before
    the rule was keyed; none without max_epochs (the rule is in no key then)."""
    if not training.max_epochs:
        return []
    keyed = _keyed_sections(probe, quant, lora, training)[:-1]  # less {"epoch_cap_rule": EPOCH_CAP_RULE}
    older = [(keyed, "made before max_epochs' step-cap rule was in the key")]
    return older + [(keyed + [{"epoch_cap_rule": r}], f"made under max_epochs' step-cap rule {r}") for r in range(2, EPOCH_CAP_RULE)]


def keys_of_older_epoch_rules(data: DataRecord, probe: Any, quant: QuantSection, lora: LoraSection, training: TrainingSection) -> list[tuple[str, str]]:
    """(train key, the rule in words) of this training under each earlier EPOCH_CAP_RULE (`_sections_of_older_epoch_rules`)."""
    return [(_train_key(data, probe, sections), words) for sections, words in _sections_of_older_epoch_rules(probe, quant, lora, training)]


def budgetless_keys_of_older_epoch_rules(data: DataRecord, probe: Any, quant: QuantSection, lora: LoraSection,
                                         training: TrainingSection) -> dict[str, str]:
    """{budgetless key: the rule in words} of this training under each earlier EPOCH_CAP_RULE, for
    `checkpoint_of_another_budget`: a run interrupted under an older rule and rerun with another budget."""
    return {_budgetless_key(data, probe, sections): words for sections, words in _sections_of_older_epoch_rules(probe, quant, lora, training)}


def _older_rule_not_resumed() -> str:
    """Why a checkpoint of an older EPOCH_CAP_RULE is not resumed, and what to do with its folder, in words."""
    return (f"it is not resumed: the step cap max_epochs gives changed with the rule (EPOCH_CAP_RULE {EPOCH_CAP_RULE} now), so "
            "training starts again from step 0 (once no older checkout runs in that folder, delete it to free its space)")


def checkpoint_of_an_older_epoch_rule(out: Path, older: list[tuple[str, str]]) -> str | None:
    """The line to log when this max_epochs training finds no checkpoint of its own but one of the same data, model and
    settings under the train key of an older EPOCH_CAP_RULE (`keys_of_older_epoch_rules`): a run interrupted before the
    rule changed (or was keyed, d862cb4), which the rerun did not resume and did not say so. Not resumed: its steps were
    capped by the old rule (which rounded up: up to a step more than the passes allow), and the rule is keyed so that such
    a training runs again. A folder this user cannot read (another user's, in a shared artifacts folder) is passed over:
    the line is worth no failed stage."""
    for key, words in older:
        other = out.parent / key
        try:
            ckpt = newest_checkpoint(other / "work") if other.is_dir() and not is_complete(other) else None
        except OSError:
            continue
        if ckpt is not None:
            return (f"train: a checkpoint of an interrupted run of this data, model and settings exists under cache/train/{key} at "
                    f"step {ckpt.name.split('-')[-1]}, {words}; {_older_rule_not_resumed()}")
    return None


def _keyed_sections(probe: Any, quant: QuantSection, lora: LoraSection, training: TrainingSection) -> list:
    # training.neftune_noise_alpha: keyed only when set, so the keys of runs without it are the ones they had before it existed
    unset = set() if training.neftune_noise_alpha else {"neftune_noise_alpha"}
    unset |= set() if training.unlikelihood_alpha else {"unlikelihood_alpha"}
    # the candidate set likewise: keyed only where it acts and is not the paper's `written`
    unset |= set() if training.unlikelihood_alpha and training.unlikelihood_candidates != "written" else {"unlikelihood_candidates"}
    unset |= set() if training.max_epochs else {"max_epochs"}
    # `auto` written out as what it picks on the probe's device is keyed as `auto`, as in the probe's key
    dev = getattr(probe, "device", None)
    keyed = [keyed_quant(quant, dev), lora.model_dump(mode="json"), keyed_training(training, dev, set(BOOKKEEPING_KEYS | PROBE_KEYED) | unset)]
    # The rule that turns max_epochs into a step cap, where max_epochs is set (its value alone kept the key of an adapter
    # capped by the old rule, so it was reused); unset, the keys stay the ones they had before the rule was keyed.
    return keyed + [{"epoch_cap_rule": EPOCH_CAP_RULE}] if training.max_epochs else keyed


BUDGETLESS = "budgetless_key.json"  # in work/: the training's key but for its budget, and the budget (`checkpoint_of_another_budget`)


def budgetless_key(data: DataRecord, probe: Any, quant: QuantSection, lora: LoraSection, training: TrainingSection) -> str:
    """`cache_key` without the budget (`probe.key` holds it: tasks/probe.py `keyed_budget`): the same data, model and
    settings on the same hardware."""
    return _budgetless_key(data, probe, _keyed_sections(probe, quant, lora, training))


def _budgetless_key(data: DataRecord, probe: Any, sections: list) -> str:
    return fingerprint("train-any-budget", TRAIN_VERSION, rows_key(data), data.model_fingerprint, getattr(probe, "hardware", None),
                       getattr(probe, "gpus", 1), sections)


def checkpoint_of_another_budget(work: Path, same: str, budget_s: float, older: dict[str, str] | None = None) -> str | None:
    """The line to log when a training of the same data, model and settings under another budget was stopped with a
    checkpoint. The budget is keyed, so this training starts from step 0, which it did without a word: a run stopped
    with Ctrl-C and rerun with `--minutes 8` instead of 5 looked like a resume that forgot its steps. `older`
    ({budgetless key: the rule in words}, `budgetless_keys_of_older_epoch_rules`): such a run made under an older
    EPOCH_CAP_RULE is named too, as not resumable at any budget (`checkpoint_of_an_older_epoch_rule` names one of this
    very budget). Folders this user cannot read are passed over."""
    older = older or {}
    found = []
    for other in work.parent.parent.glob(f"*/work/{BUDGETLESS}"):
        try:
            if other.parent == work or is_complete(other.parent.parent):
                continue
            info = read_json(other)
            key = info.get("key")
            ckpt = newest_checkpoint(other.parent) if (key == same or key in older) and info.get("budget_seconds") != budget_s else None
            if ckpt is not None:
                found.append((ckpt.stat().st_mtime, other.parent.parent.name, int(ckpt.name.split("-")[-1]),
                              float(info["budget_seconds"]), older.get(key)))
        except (OSError, ValueError, TypeError, AttributeError):  # unreadable, or a budgetless_key.json not of the saved form
            continue
    if not found:
        return None
    _, key, step, old, words = max(found)  # the newest, should several budgets have been tried
    budgets = f"{human_seconds(old)} -> {human_seconds(budget_s)}"
    if words:
        return (f"train: a checkpoint of an interrupted run of this data, model and settings exists under cache/train/{key} at "
                f"step {step}, {words}, under another budget ({budgets}); {_older_rule_not_resumed()}")
    return (f"train: a checkpoint from an interrupted run of this data and model exists under cache/train/{key} at step {step}, "
            f"but the budget changed ({budgets}), so training starts again from step 0; rerun with the old budget to resume it")


def train_adapter(data: DataRecord, probe: Any, model: ModelSection, quant: QuantSection, lora: LoraSection, training: TrainingSection, artifacts_dir: str, log_fn=None) -> TrainRecord:
    """Stage 4: train LoRA adapters for `probe.max_steps` steps or until the budget runs out; resumable."""
    key = cache_key(data, probe, model, quant, lora, training)
    out = stage_dir(artifacts_dir, "train", key)
    log_fn = log_fn or (lambda m: None)
    with locked(out, log_fn=log_fn):  # an identical run training this folder: says so, waits, then reuses its adapter
        if is_complete(out):
            return complete_record(out, TrainRecord)
        probe = _planned_for(probe, training, out / "work", log_fn)
        n = getattr(probe, "gpus", 1)  # the probe measured the step time with this many ranks
        if n > 1 and dist.world() == 1:
            resolve_model(model, artifacts_dir)  # build/convert once here, not in N ranks at once
            inputs = {"data": data.model_dump(mode="json"), "probe": probe.model_dump(mode="json"), "device": probe.device,
                      **{k: s.model_dump(mode="json", by_alias=True) for k, s in (("model", model), ("quant", quant), ("lora", lora), ("training", training))},
                      "key": key, "out": str(out), "artifacts_dir": artifacts_dir,
                      "code_commits": code_commits(model)}  # the other repository's code at the commit the key holds
            return TrainRecord.model_validate(launch.run_stage("train", "tasks.train:train_on_rank", inputs, n, out / "work", log_fn,
                                                               saved=lambda: newest_checkpoint(out / "work")))
        from .engine.fastpath import kernel_patch_scope

        with kernel_patch_scope():  # Liger's module-wide patches end with the stage: stage 5 loads the model a user loads
            return _train_shrinking_on_oom(data, probe, model, quant, lora, training, key, out, artifacts_dir, log_fn)


PLAN = "plan.json"  # in work/: the step plan a run started with (max_steps, fixed_seconds, checkpoint_minutes), kept by its resume


def _planned_for(probe: Any, training: TrainingSection, work: Path, log_fn) -> Any:
    """The probe's plan for this run: for its checkpoint interval (`ProbeRecord.planned_for`), said in one line where its
    steps or fixed cost differ from the probe's own plan (nothing is said where they do not), and kept in `work` (PLAN);
    a run resuming from a checkpoint keeps the plan it started with (PLAN; none there: the probe's own, as runs made
    before the plan was kept trained on), whatever the interval now. The interval is in no key, so a run stopped and
    rerun with another one resumes in the same folder, and replanned there its warm-up and step cap (the LR schedule's
    clock) changed mid-run (a review, 2026-12-07); the new interval changes only when its checkpoints are saved."""
    if newest_checkpoint(work) is not None:
        kept = read_json(work / PLAN) if (work / PLAN).is_file() else {}
        started = probe.model_copy(update=kept) if kept else probe
        if started.checkpoint_minutes is not None and started.checkpoint_minutes != training.checkpoint_minutes:
            log_fn(f"train: resuming on the plan the run started with (~{started.max_steps} steps, planned for a checkpoint every "
                   f"{started.checkpoint_minutes:g} min), not replanned for training.checkpoint_minutes={training.checkpoint_minutes:g}: "
                   "the new interval sets only when its checkpoints are saved")
        return started
    planned = probe.planned_for(training)
    # The same plan: the interval it counted (a record that does not say it), or none saves a checkpoint within the budget.
    same = (planned.max_steps, planned.fixed_seconds) == (probe.max_steps, probe.fixed_seconds)
    if not same and probe.checkpoint_minutes is None:
        log_fn(f"train: the cached probe does not say which checkpoint interval its plan counted (a record from before it was kept): "
               f"replanned from its timings for training.checkpoint_minutes={training.checkpoint_minutes:g}, ~{planned.max_steps} steps "
               f"after {planned.fixed_seconds:.0f}s fixed (it said {probe.max_steps} after {probe.fixed_seconds:.0f}s); the steps are not timed again")
    elif not same:
        log_fn(f"train: training.checkpoint_minutes={training.checkpoint_minutes:g}, the probe planned for {probe.checkpoint_minutes:g}: "
               f"from its timings, ~{planned.max_steps} steps after {planned.fixed_seconds:.0f}s fixed (it said {probe.max_steps} after "
               f"{probe.fixed_seconds:.0f}s); the steps are not timed again")
    if dist.is_main():
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / PLAN, {"max_steps": planned.max_steps, "fixed_seconds": planned.fixed_seconds,
                                 "checkpoint_minutes": planned.checkpoint_minutes})
    return planned


def train_on_rank(spec: dict, log_fn) -> TrainRecord | None:
    """One rank's training under torchrun (tasks/engine/launch.py calls it with the spec `train_adapter` wrote)."""
    from .probe import ProbeRecord

    sections = (ModelSection.model_validate(spec["model"]), QuantSection.model_validate(spec["quant"]),
                LoraSection.model_validate(spec["lora"]), TrainingSection.model_validate(spec["training"]))
    keep_code_commits(spec.get("code_commits") or {})
    return _train(DataRecord.model_validate(spec["data"]), ProbeRecord.model_validate(spec["probe"]), *sections,
                  spec["key"], Path(spec["out"]), spec["artifacts_dir"], log_fn, t_start=spec["t_launch"])


def _train_shrinking_on_oom(data, probe, model, quant, lora, training, key, out: Path, artifacts_dir: str, log_fn) -> TrainRecord:
    """`_train`, retried on out-of-memory (it resumes from the last checkpoint) in the probe's order: every layer
    checkpointed first, then, where `auto` offload acts (`offload_may_help`), the same micro-batch offloaded, then the next
    smaller micro-batch that divides micro x accum (`dist.smaller_micro_batch`: 8 x 1 -> 4 x 2, 5 x 1 -> 1 x 5; the same
    effective batch), down to micro-batch 1. The record says the
    setting that finished. Disk full is a clear error."""
    import torch

    while True:
        try:
            return _train(data, probe, model, quant, lora, training, key, out, artifacts_dir, log_fn)
        except torch.OutOfMemoryError as e:
            mb, ga, offloaded = probe.micro_batch_size, probe.grad_accum, getattr(probe, "offload_activations", False)
            at = f"micro-batch {mb} x accum {ga}" + (f" ({recompute.OFFLOAD_NOTE})" if offloaded else "")
            if probe.recompute_free_layers:
                # Memory the probe did not see (another process on the GPU, a longer pack): recompute every layer first.
                # (the probe's count; stage 4 frees at most the decoder's layers, which a record from before 65f30ca may exceed)
                log_fn(f"train: out of memory with the probe's {probe.recompute_free_layers} layers without recompute; retrying with all layers checkpointed")
                probe = probe.model_copy(update={"recompute_free_layers": 0})
            elif not offloaded and offload_may_help(probe, training):
                log_fn(f"train: out of memory at {at}; retrying it with the {recompute.OFFLOAD_NOTE}")
                probe = probe.model_copy(update={"offload_activations": True})
            elif mb <= 1:
                raise StageError(f"training ran out of memory even at {at}; lower data.max_length, "
                                 + ("" if offloaded or resolve_device(probe.device) != "cuda" else f"{recompute.OFFLOAD_FIX}, ")
                                 + "set training.gradient_checkpointing=true or use a smaller model") from e
            else:
                new_mb = dist.smaller_micro_batch(mb, mb * ga)  # this rank's micro x accum, exactly (5 x 1 -> 1 x 5)
                new_ga = mb * ga // new_mb
                # auto: the smaller micro-batch without offload first, as the probe orders them; on: offloaded throughout
                offload = offloaded and training.offload_activations == "on"
                log_fn(f"train: out of memory at {at}; retrying at {new_mb} x {new_ga} (same effective batch"
                       + (f", {recompute.OFFLOAD_NOTE})" if offload else ")"))
                probe = probe.model_copy(update={"micro_batch_size": new_mb, "grad_accum": new_ga, "offload_activations": offload})
        except OSError as e:
            if not disk_full(e):
                raise
            last = newest_checkpoint(out / "work")
            kept = f"the last complete checkpoint ({last.name}) is intact" if last else "no checkpoint had been saved yet"
            raise StageError(f"disk full while training saved to {out}; {kept}. Free some space and rerun the same command to resume") from e
        gc.collect()  # outside the except block: the OOM traceback no longer pins the failed attempt's tensors
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def offload_may_help(probe: Any, training: TrainingSection) -> bool:
    """Whether stage 4 may retry an out-of-memory offloaded: where the probe's memory search would have tried it
    (training.offload_activations=auto with a memory budget, checkpointing, on CUDA: tasks/probe.py `offload_can_apply`,
    so the probe key already holds the setting wherever it acts here)."""
    return (training.offload_activations == "auto" and getattr(probe, "vram_budget_gb", None) is not None
            and probe.gradient_checkpointing and resolve_device(probe.device) == "cuda")


def _train(data, probe, model_cfg, quant, lora, training, key, out: Path, artifacts_dir: str, log_fn, t_start: float | None = None) -> TrainRecord | None:
    """The stage's work, in this process; under torchrun every rank runs it and rank 0 returns the record."""
    import torch
    from transformers.integrations import TensorBoardCallback

    t_stage = t_start or time.monotonic()  # several ranks: from the launch, so startup counts against the budget
    main = dist.is_main()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    prior = _prior_elapsed(work)
    resume = newest_checkpoint(work)
    for torn in work.glob("checkpoint-*"):
        if main and torn.is_dir() and resume is not None and torn != resume and not (torn / CKPT_MARKER).is_file():
            shutil.rmtree(torn, ignore_errors=True)  # cut off mid-write: never used
    budget_s = float(probe.budget_seconds)
    if main:
        same = budgetless_key(data, probe, quant, lora, training)
        older = budgetless_keys_of_older_epoch_rules(data, probe, quant, lora, training)
        if resume is None and (line := checkpoint_of_another_budget(work, same, budget_s, older)):
            log_fn(line)
        if resume is None and (line := checkpoint_of_an_older_epoch_rule(out, keys_of_older_epoch_rules(data, probe, quant, lora, training))):
            log_fn(line)
        write_json(work / BUDGETLESS, {"key": same, "budget_seconds": budget_s})
    if prior >= budget_s and resume is not None:
        log_fn(f"train: budget already spent before the crash ({prior:.0f}s of {budget_s:.0f}s); finishing from {resume.name}")
    device = resolve_device(probe.device)
    ref = resolve_model(model_cfg, artifacts_dir)
    engine = engine_for(training, device, recurrent_layers(ref, model_cfg))
    mb, ga, gc = probe.micro_batch_size, probe.grad_accum, probe.gradient_checkpointing

    torch.manual_seed(training.seed)
    offload = getattr(probe, "offload_activations", False)  # the probe chose it (tasks/probe.py); never on the CPU
    compiled = getattr(probe, "compile_layers", False)  # the probe timed compiled layers (and its compiler worked)
    model = build_model(ref, model_cfg, quant, lora, gc, device, engine, liger=training.liger, offload=offload,
                        compile_layers=compiled, batch_shape=(mb, data.max_length), log_fn=log_fn)
    state = model.layer_compile
    if training.neftune_noise_alpha:
        add_embedding_noise(model, training.neftune_noise_alpha)
    n_free = probe.recompute_free_layers if gc else 0
    if n_free:
        # What the probe found to fit (tasks/probe.py), at most the text decoder's layers (a record probed before they
        # were counted alone may name more: a multimodal model's vision layers, which a text-only run never runs).
        n_free = recompute.set_recompute_free_layers(model, n_free)
    trainable, total = count_params(model)
    train_ds = load_split(data, "train")
    tok = load_tokenizer(ref, model_cfg)
    extra = {}
    if training.unlikelihood_alpha:
        extra["compute_loss_func"], _ = attach_unlikelihood(model, training.unlikelihood_alpha, exempt=unlikelihood_exempt(tok, data.stop_token_ids),
                                                            candidates=training.unlikelihood_candidates)
    guard = BudgetGuard(work, budget_s, prior, training.checkpoint_minutes * 60, probe.save_seconds, probe.final_save_cost, log_fn)
    guard.t0 = t_stage  # the budget covers loading too
    if device == "cuda" and reads_deferred():  # each-step: the loss read waits for the device each step (no guard sync)
        guard.device_sync = torch.cuda.synchronize
    if "compute_loss_func" in extra:
        guard.loss_parts = extra["compute_loss_func"].take_parts
    guard.last_ckpt = guard.clock()
    collator = collator_for(engine, tok.pad_token_id, model, (mb, data.max_length))
    if dist.world() > 1:
        collator = BatchTrace(collator)

    # The clock stops training; the step cap is a backstop (the user's hard cap, else 4x the estimate: a probe of a
    # few steps misjudged an H200 run's step time 3x, and a 2x cap ended it at 61% of its budget).
    cap = training.max_steps or CAP_FACTOR * probe.max_steps
    n = dist.world()
    # training.max_epochs: where the budget buys more passes over the rows than that, the run ends at the last step
    # within them (`epoch_cap`; the schedule completes there: `time_schedule` follows the cap when it leads). The packed
    # engines pack each pass once (`packs`): the first pass's packs make the cap, then the stream trains on those packs.
    lengths = [len(x) for x in train_ds["input_ids"]]  # read once: the cap, the stream and the batch line take them
    packs = PassPacks(lengths, training.packing, mb, data.max_length) if is_padding_free(engine) else None
    per_pass = steps_per_pass(engine, lengths, mb, ga, n, data.max_length, training.seed, packing=training.packing,
                              packs=packs) if training.max_epochs else 0.0
    # the padded recipe's part of a pass is its full steps (`epoch_steps`); the packed stream's runs on: per_pass
    full_steps = (steps_per_pass(engine, lengths, mb, ga, n, data.max_length, training.seed, partial=True)
                  if training.max_epochs and packs is None else None)
    by_epochs = epoch_cap(training.max_epochs, per_pass, full_steps)
    planned = probe.max_steps
    if by_epochs is not None and by_epochs < cap:
        cap, guard.stopped_by = by_epochs, "max_epochs"
        planned = min(planned, by_epochs)
    done = int(resume.name.split("-")[-1]) if resume else 0
    packs_per_step = ga * n  # packed engines: one pack per forward on each rank
    start = read_json(resume / CKPT_MARKER).get("data_position") if resume else None
    dataset, per_device = training_dataset(engine, train_ds, mb, data.max_length, training.seed, packing=training.packing,
                                           min_packs=(cap - done) * packs_per_step, start=start, packs=packs)
    args = training_args(training, work, device, quant, micro_batch_size=per_device, grad_accum=ga, max_steps=cap, gradient_checkpointing=gc, keep=training.keep_checkpoints, padding_free=is_padding_free(engine))
    batch = batch_size(dataset, per_device * ga * n, lengths, training.packing)
    if isinstance(dataset, PackedStream):
        # Resume by rows trained on, not by batch count: the stream already starts at the checkpoint's position.
        args.ignore_data_skip = True
        guard.data_position = lambda step: dataset.position_after((step - done) * packs_per_step)
    warmup = int(round(training.warmup_ratio * planned))
    bar = BudgetBar(guard, cap)
    tb_dir = out / "work" / "tensorboard"
    tb_writer = tensorboard_writer(tb_dir) if main else None  # closed below when the set-up raises, else in the finally
    callbacks = [guard, TensorBoardCallback(tb_writer=tb_writer)] if main else [guard]
    try:
        trainer = make_trainer(
            guard, training.lr_scheduler, warmup, cap, bar,
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=collator,
            callbacks=callbacks,
            **extra,
        )
        log_fn(f"train: {trainable:,} trainable of {total:,} params ({100 * trainable / total:.2f}%), engine {engine}, "
               f"micro-batch {mb} x accum {ga}" + (f" on each of {n} ranks" if n > 1 else "") +
               (f", {n_free} layers without recompute" if n_free else "") + (f", {recompute.OFFLOAD_NOTE}" if offload else "") +
               (f", decoder layers compiled in {state.seconds:.0f} s" if state is not None and state.active else "") +
               (f", NEFTune noise alpha {training.neftune_noise_alpha:g} on the input embeddings" if training.neftune_noise_alpha else "") +
               (f", unlikelihood alpha {training.unlikelihood_alpha:g} on {UL_CANDIDATES_WORDS[training.unlikelihood_candidates]}"
                if training.unlikelihood_alpha else "") +
               f"; optimizer batch ~{batch['conversations']:.1f} conversations / ~{batch['tokens']:,.0f} tokens ({batch['rule']})"
               f", ~{probe.max_steps} steps expected (cap {cap}), budget {budget_s:.0f}s"
               + (_epochs_note(training.max_epochs, data.train_tokens, per_pass, probe, by_epochs, training.max_steps, full_steps) if by_epochs is not None else "")
               + (f", resuming from {resume.name} ({prior:.0f}s already spent)" if resume else ""))
        previous = _install_interrupt(guard)
    except BaseException:
        if tb_writer is not None:  # e.g. a setting Trainer refuses: the writer's thread is not left running
            with contextlib.suppress(Exception):
                tb_writer.close()
        raise
    try:
        with collector_kept_off_the_model():
            maybe_fault("train")
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        bar.close()  # before the error is printed: a NaN loss, an OOM or Ctrl-C ends the bar's line, not the message's start
        _restore_interrupt(previous)
        # Training raised: the heartbeat's pending value on disk before an out-of-memory retry reads it (`_prior_elapsed`);
        # a failed write is not raised over the error in flight (the normal end flushed in on_train_end, raising).
        with contextlib.suppress(Exception):
            guard.heartbeat.flush()
        if tb_writer is not None:
            with contextlib.suppress(Exception):
                tb_writer.close()  # TensorBoardCallback closes it at the end of training, not when training raises
    if guard.interrupted:
        saved = newest_checkpoint(work)
        if saved is None:
            raise KeyboardInterrupt("training interrupted before a checkpoint was saved")
        raise TrainingStopped(f"training stopped by a signal at step {trainer.state.global_step}, {saved.name} saved; "
                              "rerun the same command to resume from it")
    if n > 1:
        # Per-rank provenance: steps must agree; the batch fingerprints show each rank trained on its own shard.
        write_json(work / "ranks" / f"rank-{dist.rank()}.json", {"rank": dist.rank(), "steps": trainer.state.global_step,
                   "stopped_by": guard.stopped_by, "saved_adapter": main, "batches": collator.fingerprints})
    if not main:
        return None

    with locked(out / "final"):
        adapter_tmp = out / ".adapter.tmp"
        shutil.rmtree(adapter_tmp, ignore_errors=True)
        trainer.model.save_pretrained(str(adapter_tmp), safe_serialization=True)
        tok.save_pretrained(str(adapter_tmp))
        adapter = out / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        os.replace(adapter_tmp, adapter)

    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    wall = guard.elapsed()
    png = out / "loss_curve.png"
    _plot_loss(history, png)
    write_json(out / "log_history.json", history)
    rec = TrainRecord(
        key=key,
        dir=str(out),
        adapter_dir=str(out / "adapter"),
        steps=trainer.state.global_step,
        max_steps=cap,
        expected_steps=probe.max_steps,
        tokens_seen=int(trainer.state.num_input_tokens_seen or 0),
        wall_seconds=round(wall, 2),
        budget_seconds=budget_s,
        budget_error=round((wall - budget_s) / budget_s, 4),
        stopped_by=guard.stopped_by,
        final_loss=float(losses[-1]) if losses else float("nan"),
        mean_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
        first_loss=float(losses[0]) if losses else float("nan"),
        trainable_params=trainable,
        total_params=total,
        resumed_from_step=int(resume.name.split("-")[-1]) if resume else None,
        micro_batch_size=mb,
        grad_accum=ga,
        engine=engine,
        batch=batch,
        loss_curve_png=str(png),
        tensorboard_dir=str(tb_dir),
        gpus=n,
        lora_targets=model.lora_targets.as_dict(),
        offload_activations=offload,
        compile_layers=state is not None and state.active,
        compile_seconds=round(state.seconds, 2) if state is not None else 0.0,
        passes=round(int(trainer.state.num_input_tokens_seen or 0) / data.train_tokens, 3) if data.train_tokens else None,
        budget_stop=guard.budget_stop,
    )
    write_json(out / "record.json", rec.model_dump(mode="json"))
    # Each file's size and sha256 but work/'s (checkpoints removed next, torchrun's logs still written under several
    # GPUs): an adapter cut short or changed in place since is refused (`changed_file`), not evaluated and merged.
    mark_folder_complete(out, record_files=True, leave_out=("work/",))
    # Checkpoints have done their job once the adapter is saved; keep the disk for the next run.
    for c in work.glob("checkpoint-*"):
        shutil.rmtree(c, ignore_errors=True)
    return rec


TB_FLUSH_S = 10.0  # TensorBoard's event file reaches the disk this often (and when training ends), not at every log line


def tensorboard_writer(log_dir: Path, flush_s: float = TB_FLUSH_S):
    """Stage 4's TensorBoard writer: a SummaryWriter that flushes every `flush_s` seconds, not at every log.
    transformers' TensorBoardCallback flushes its writer after each log, i.e. after every step at logging_steps 1: a
    wait for the writer's thread to write the step's scalars, then the file's flush, on the training thread while the
    GPU idles (PERF_NOTES' list, row 5). Here that flush is a no-op until `flush_s` has passed since the last; the
    writer's own thread flushes on the same interval (`flush_secs`) and close (the end of training) writes the rest.
    A TensorBoard open on a running training sees its scalars up to `flush_s` late; a run killed outright (SIGKILL, power)
    loses at most its last `flush_s` of scalars (the run's log has every step's line)."""
    from torch.utils.tensorboard import SummaryWriter

    class IntervalFlushWriter(SummaryWriter):
        def __init__(self, *args, **kw):
            self.flushed = time.monotonic()
            super().__init__(*args, **kw)

        def flush(self) -> None:
            now = time.monotonic()
            if now - self.flushed >= flush_s:
                self.flushed = now
                super().flush()

    return IntervalFlushWriter(log_dir=str(log_dir), flush_secs=flush_s)


def batch_size(dataset, forwards_per_step: int, lengths: list[int], packing: str = "full") -> dict:
    """What one optimizer step trains on, in conversations and real tokens (means over a pass of the data): padded
    micro-batches hold `micro` conversations each; packs hold as many as `training.packing` puts in them. `lengths`:
    the training rows' tokens, as stage 4 read them once (a read is ~1.2 s at 60k rows)."""
    if isinstance(dataset, PackedStream):
        convs, tokens, largest = dataset.per_pack()
        rule = f"{forwards_per_step} packs ({packing}: ~{convs:.1f} conversations, up to {largest:,} tokens each)"
        return {"conversations": round(convs * forwards_per_step, 1), "tokens": round(tokens * forwards_per_step), "rule": rule}
    mean_len = sum(lengths) / max(len(lengths), 1)
    return {"conversations": float(forwards_per_step), "tokens": round(forwards_per_step * mean_len),
            "rule": f"{forwards_per_step} padded conversations"}


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _install_interrupt(guard: BudgetGuard):
    """First Ctrl-C or SIGTERM: finish the step, save a checkpoint, stop. A second one: stop at once.

    SIGTERM too: `kill`, `docker stop`, systemd, a preempted cloud machine or Slurm's time limit ask a run to stop with
    it, and it ended training on the spot (Prefect's "aborted by a termination signal"), losing every step since the
    last periodic checkpoint (up to training.checkpoint_minutes of work). SIGHUP too: the terminal closed (an ssh
    session dropped); what is still written to it then goes to /dev/null, as writing to a hung-up terminal fails.

    A signal this process inherited as ignored (`nohup` ignores SIGHUP; `trap "" INT` and a script's `cmd &` ignore
    SIGINT) stays ignored in training as it is in every other stage, as Python leaves it: a closed terminal no longer
    stops a `nohup` run in stage 4 only, and Ctrl-C does not stop only stage 4 of a run started with SIGINT ignored."""

    def handler(signum, frame):
        if guard.interrupted:
            raise KeyboardInterrupt
        guard.interrupted = True
        if signum == signal.SIGHUP:
            off_the_lost_terminal()

    try:
        return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS
                if signal.getsignal(sig) is not signal.SIG_IGN and not (sig == signal.SIGTERM and in_a_deployment_run())}
    except ValueError:  # not the main thread: leave Python's default
        return None


def _restore_interrupt(previous) -> None:
    for sig, handler in (previous or {}).items():
        try:
            signal.signal(sig, handler)
        except (ValueError, TypeError):
            pass


def _plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(h["step"], h["loss"]) for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    if pts:
        ax.plot(*zip(*pts), marker=".", linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
