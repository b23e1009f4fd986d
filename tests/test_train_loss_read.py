"""Stage 4's deferred loss read (tasks/train.py LOSS_READ, `deferred_loss_read`): a step's loss is read for its log at the
next step's end, once that step's kernels are queued, instead of right after its optimizer step (where the host waits
for the GPU, which then idles while the host logs and collates). The log says the same numbers at the same steps; a
step that saves or ends training logs at once; near the deadline the guard waits for the device before it weighs."""

from __future__ import annotations

import types

import pytest
import torch

from tasks import train


def _tiny_run(tmp_path, mode: str, monkeypatch, unlikelihood: bool = False, steps: int = 5):
    """A tiny random Mistral through stage 4's Trainer (`make_trainer`, BudgetGuard, constant LR: the same numbers at any
    speed) on CPU, 2 micro-batches of 2 padded rows a step. Returns (log_history, events, loss sums per step, guard lines):
    events are ("forward", global_step during it) and ("log", step logged), in order."""
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback, TrainingArguments

    from datasets import Dataset
    from tasks.engine.collate import PaddedCollator
    from tasks.engine.unlikelihood import attach_unlikelihood

    monkeypatch.setattr(train, "LOSS_READ", mode)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("mistral", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1)
    model = AutoModelForCausalLM.from_config(cfg)
    rows = [list(range(3, 3 + n)) for n in (5, 9, 3, 12, 7, 4, 10, 6, 8, 11, 5, 9) * 2]  # 6 steps a pass: no pass ends in 5
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(output_dir=str(tmp_path / mode), use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, max_steps=steps, logging_steps=1, learning_rate=1e-2, save_strategy="no",
                             logging_nan_inf_filter=False, seed=0, remove_unused_columns=False, disable_tqdm=True,
                             include_num_input_tokens_seen="non_padding")
    lines = []
    guard = train.BudgetGuard(tmp_path / mode, 1e6, 0.0, 1e9, 0.0, 0.0, lines.append)
    events, sums = [], {}

    class Events(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if "loss" in (logs or {}):  # a step's log, not the end-of-training summary
                events.append(("log", state.global_step))

    extra = {}
    if unlikelihood:
        extra["compute_loss_func"], _ = attach_unlikelihood(model, 1.0)
        guard.loss_parts = extra["compute_loss_func"].take_parts
    trainer = train.make_trainer(guard, "constant", 0, steps, model=model, args=args, train_dataset=data,
                                 data_collator=PaddedCollator(pad_id=0), callbacks=[guard, Events()], **extra)
    model.register_forward_pre_hook(lambda *a: events.append(("forward", trainer.state.global_step)))
    real_step = trainer.training_step

    def training_step(*a, **kw):
        out = real_step(*a, **kw)
        step = trainer.state.global_step + 1
        sums[step] = sums.get(step, 0.0) + float(out)
        return out

    trainer.training_step = training_step
    trainer.train()
    return trainer.state.log_history, events, sums, lines


@pytest.mark.parametrize("unlikelihood", [False, True], ids=["cross-entropy", "unlikelihood"])
def test_the_deferred_read_logs_each_steps_own_loss_as_the_read_at_each_step_does(tmp_path, monkeypatch, unlikelihood):
    deferred, events, sums, lines = _tiny_run(tmp_path, "deferred", monkeypatch, unlikelihood)
    each, events_each, sums_each, lines_each = _tiny_run(tmp_path, "each-step", monkeypatch, unlikelihood)
    logged = [h for h in deferred if "loss" in h]
    assert [h["step"] for h in logged] == [1, 2, 3, 4, 5]
    for h in logged:  # each step's logged loss is that step's loss (Trainer's sum over its micro-batches)
        assert h["loss"] == pytest.approx(sums[h["step"]], rel=1e-5), (h, sums)
    # the same log, number for number, as transformers' read at each step (the speed metrics aside: they are clocks)
    clocks = ("train_runtime", "train_tokens_per_second", "train_samples_per_second", "train_steps_per_second")
    same = lambda history: [{k: v for k, v in h.items() if k not in clocks} for h in history]  # noqa: E731
    assert same(deferred) == same(each)
    # the guard's lines: the same loss, its cross-entropy and unlikelihood parts (a step's own) and learning rate
    assert [line.split(" lr ")[0] for line in lines] == [line.split(" lr ")[0] for line in lines_each] and len(lines) == 5
    if unlikelihood:
        assert all("unlikelihood" in line for line in lines)


def test_a_step_is_read_after_the_next_steps_kernels_are_queued_and_the_last_at_once(tmp_path, monkeypatch):
    """Deferred: step k's log comes after step k + 1's forwards were issued (the host queued them before it waited for
    step k's loss); the last step is logged before training returns. Each-step: before them."""
    _, events, _, _ = _tiny_run(tmp_path, "deferred", monkeypatch)
    _, events_each, _, _ = _tiny_run(tmp_path, "each-step", monkeypatch)

    def next_forward_before_log(evs, k):
        return evs.index(("forward", k)) < evs.index(("log", k))

    assert all(next_forward_before_log(events, k) for k in range(1, 5)), events
    assert not any(next_forward_before_log(events_each, k) for k in range(1, 5)), events_each
    assert [e for e in events if e[0] == "log"] == [("log", k) for k in range(1, 6)]


def test_a_step_that_saves_logs_at_once_so_the_checkpoint_holds_its_loss(tmp_path, monkeypatch):
    """A checkpoint's trainer_state.json holds every loss up to its step: a step the guard saves at is logged before."""
    real = train.BudgetGuard.on_step_end

    def save_at_3(self, args, state, control, **kw):
        out = real(self, args, state, control, **kw)
        control.should_save = state.global_step == 3
        return out

    monkeypatch.setattr(train.BudgetGuard, "on_step_end", save_at_3)
    _tiny_run(tmp_path, "deferred", monkeypatch)
    import json

    saved = json.loads((tmp_path / "deferred" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [h["step"] for h in saved["log_history"] if "loss" in h] == [1, 2, 3]


def _lagging_run(tmp_path, monkeypatch, budget_s: float, gpu_step_s: float, host_ahead_steps: int, sync: bool):
    """BudgetGuard where the host ends each step while the device is `host_ahead_steps` steps behind (a deferred loss
    read with an optimizer that does not synchronize): its clock at step k's end reads when the device ended step
    k - host_ahead_steps. `sync`: the guard's device_sync waits for the device (the clock then reads step k's end).
    Returns (steps, the device's end of the last step, the steps at which it synchronized)."""
    clock = [0.0]
    monkeypatch.setattr(train.time, "monotonic", lambda: clock[0])
    guard = train.BudgetGuard(tmp_path, budget_s, 0.0, 1e9, 0.0, 0.0)
    state = types.SimpleNamespace(global_step=0, max_steps=10_000)
    control = types.SimpleNamespace(should_training_stop=False, should_save=False)
    synced = []
    if sync:
        def device_sync():
            synced.append(state.global_step)
            clock[0] = state.global_step * gpu_step_s

        guard.device_sync = device_sync
    while not control.should_training_stop:
        state.global_step += 1
        clock[0] = max(clock[0], (state.global_step - host_ahead_steps) * gpu_step_s)
        guard.on_step_end(None, state, control)
    return state.global_step, state.global_step * gpu_step_s, synced


def test_budget_stops_stay_exact_when_the_host_runs_ahead_of_the_device(tmp_path, monkeypatch):
    """The stop weighs a clock that waited for the device: the run ends where the guard on an exact clock ends it
    (nearest the deadline, within half a step), where the lagging clock alone would run two steps over; and the guard
    waits only near the deadline, not at every step."""
    from tasks.budget import planned_steps

    exact = planned_steps(92.0, 0.0, 3.1, 1e9, 0.0, 0.0)
    steps, end, synced = _lagging_run(tmp_path, monkeypatch, 92.0, 3.1, 2, sync=True)
    assert steps == exact and abs(end - 92.0) <= 3.1 / 2 + 1e-9
    assert synced and synced[0] == 1 and len(synced) <= 1 + train.SYNC_STEPS + 1, synced  # the first step, then the last few
    late, late_end, _ = _lagging_run(tmp_path, monkeypatch, 92.0, 3.1, 2, sync=False)
    assert late == exact + 2 and late_end - 92.0 > 3.1  # what the wait prevents


def test_a_nan_loss_read_a_step_late_still_names_its_own_step(tmp_path, monkeypatch):
    """The NaN check reads the deferred log: it raises at the next step's end, naming the step whose loss was NaN."""
    monkeypatch.setenv("QLORA_PIPELINE_FAULT", "train:nan@3")  # the weights turn NaN during step 3
    with pytest.raises(train.NonFiniteLoss, match=r"loss became nan at step 3; no checkpoint was saved yet"):
        _tiny_run(tmp_path, "deferred", monkeypatch)


# --- review of perf-19b (2026-12-07): the each-step path must be main's ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tiny_cfg, shared_artifacts):
    from tasks.data import load_dataset_records

    return load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)


def test_the_each_step_read_on_cuda_never_makes_the_guard_wait_for_the_device(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path):
    """Stage 4 as on CUDA (the device resolved to "cuda", the model, engine and Trainer built on the CPU, the device's
    synchronize counted) with LOSS_READ each-step, a budget it stops by: main's guard never synchronized."""
    from tasks.probe import probe_throughput

    probe = probe_throughput(tiny_data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, tiny_cfg.training, tiny_cfg.budget, "cpu", shared_artifacts)
    probe = probe.model_copy(update={"max_steps": 10_000, "budget_seconds": 6.0, "key": "each-step-on-cuda"})
    training = tiny_cfg.training.model_copy(update={"max_steps": 4})
    monkeypatch.setattr(train, "LOSS_READ", "each-step")
    monkeypatch.setattr(train, "resolve_device", lambda d: "cuda")
    for name in ("build_model", "engine_for", "training_args"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _real=real, **kw: _real(*["cpu" if x == "cuda" else x for x in a],
                                                                            **{k: "cpu" if v == "cuda" else v for k, v in kw.items()}))
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **kw: syncs.append(1))
    out = tmp_path / "train"
    train._train(tiny_data, probe, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, "k", out, shared_artifacts, lambda line: None)
    assert syncs == []


def test_the_each_step_log_line_says_the_budget_used_when_it_is_logged_as_mains_did(tmp_path):
    """One step ends at 10.0 s, its log (each-step: the loss read, which waits for the device) comes at 10.8 s: main's
    line said 11 s used, 89 s left, 93 tok/s (1000 tokens / 10.8 s)."""
    clock = [0.0]
    lines = []
    guard = train.BudgetGuard(tmp_path, 100.0, 0.0, 1e9, 0.0, 0.0, lines.append, clock=lambda: clock[0])
    guard.last_ckpt = guard.last_step_t = 0.0
    args = types.SimpleNamespace(logging_steps=1)
    state = types.SimpleNamespace(global_step=1, max_steps=100, num_input_tokens_seen=1000)
    control = types.SimpleNamespace(should_training_stop=False, should_save=False)
    clock[0] = 10.0
    guard.on_step_end(args, state, control)
    clock[0] = 10.8
    guard.on_log(args, state, control, logs={"loss": 1.0, "learning_rate": 1e-3})
    assert lines[-1].endswith("93 tok/s budget used 11s left 89s"), lines
