"""The probe's timed window and its step estimate (tasks/probe.py `StepWindow`, `step_seconds`): the logic, on CPU.

Two demo-gpu probes of Gemma-3-270M (same rows and batch, another training.seed; one H100, 2026-12-07) read 0.877 and
0.575 s a step from 4 timed steps, where their stages ran 0.631 and 0.703 s a step on average; the 15 GiB Mistral-7B
probe took the faster of 2 timed steps (3.12 s) where its stage ran 3.25 s a step. A short step now gets a window of
seconds, a slow outlier does not set the estimate, and the estimate is the mean of the typical steps."""

from __future__ import annotations

import pytest

from tasks.probe import OUTLIER_FACTOR, PROBE_MAX_TIMED_STEPS, PROBE_MIN_WINDOW_S, StepWindow, step_seconds, timed_window


def _timed_steps(window: StepWindow, step_s: float, limit: int = 1000) -> int:
    """Feed `window` steps of `step_s` (the clock from 100.0) until it says done; the timed steps it took."""
    window.start(100.0)
    now = 100.0
    for _ in range(limit):
        now += step_s
        if window.mark(now, 0):
            return len(window.deltas())
    raise AssertionError("the window never closed")


def test_a_short_step_gets_a_longer_timed_window_a_long_one_the_configured_steps():
    seconds, most = timed_window("cuda")
    assert (seconds, most) == (PROBE_MIN_WINDOW_S, PROBE_MAX_TIMED_STEPS) and seconds >= 5
    # demo-gpu's Gemma-3-270M step (~0.6 s) at its 3 warm-up and 4 timed steps: the window runs to the seconds
    assert _timed_steps(StepWindow(3, 4, seconds, most), 0.6) == 14  # 14 x 0.6 = 8.4 s, 4 steps would have been 2.4 s
    # Mistral-7B's ~3.1-s step at the default 1 + 2: one step more (6.2 s < 8 s), so a median of three exists
    assert _timed_steps(StepWindow(1, 2, seconds, most), 3.1) == 3
    # a step longer than the window: the configured steps, no more
    assert _timed_steps(StepWindow(1, 2, seconds, most), 9.0) == 2
    assert _timed_steps(StepWindow(1, 5, seconds, most), 9.0) == 5
    # a very short step stops at the cap, never below the configured steps
    assert _timed_steps(StepWindow(1, 2, seconds, most), 0.001) == PROBE_MAX_TIMED_STEPS
    assert _timed_steps(StepWindow(1, 60, seconds, most), 0.001) == 60


def test_off_the_gpu_the_window_is_the_configured_steps():
    """Tests and the CPU demo probe as before: the steps set, whatever their length."""
    assert _timed_steps(StepWindow(1, 2, *timed_window("cpu")), 0.001) == 2
    assert _timed_steps(StepWindow(0, 1, *timed_window("cpu")), 0.001) == 1


def test_the_window_times_from_the_last_warm_up_step_or_the_start_and_counts_its_tokens():
    w = StepWindow(2, 2)
    w.start(10.0)
    for t, tokens in ((12.0, 100), (13.0, 200), (14.5, 300), (15.0, 400)):
        done = w.mark(t, tokens)
    assert done and w.deltas() == [1.5, 0.5] and w.tokens() == 200
    assert w.first_step() == 2.0  # from the start, warm-up or not: the probe reserves its excess over a step (`_probe`)
    w = StepWindow(0, 2)
    w.start(10.0)
    w.mark(11.0, 50), w.mark(13.0, 90)
    assert w.deltas() == [1.0, 2.0] and w.tokens() == 90 and w.first_step() == 1.0


def test_an_outlier_step_does_not_set_the_estimate():
    """A step that compiles a kernel for a new shape (3x the rest on an H200) is left out wherever it falls."""
    assert step_seconds([1.8, 0.59], "cuda") == 0.59  # of two, the median is their mean: the slower is left out beyond 3x
    assert step_seconds([1.77, 0.59], "cuda") == pytest.approx(1.18)  # the showcase's pair, exactly 3x: kept (a GPU window
    # of seconds holds ~14 such steps, tests above)
    assert step_seconds([0.6] * 10 + [1.8], "cuda") == pytest.approx(0.6)
    assert step_seconds([1.8, 0.6, 0.6], "cuda") == pytest.approx(0.6)
    assert step_seconds([0.6, 0.6, 0.6 * OUTLIER_FACTOR + 0.01], "cuda") == pytest.approx(0.6)


def test_the_estimate_is_the_mean_of_the_typical_steps_not_the_fastest():
    """Stage 4 pays its slower steps too: the faster of two timed steps (3.12 s) read 4% under the 15 GiB stage's 3.25 s,
    and demo-gpu's steps ran a mean 5% over their median."""
    assert step_seconds([3.12, 3.25], "cuda") == pytest.approx(3.185)
    skewed = [0.52, 0.55, 0.57, 0.60, 0.62, 0.71, 0.79]
    assert step_seconds(skewed, "cuda") == pytest.approx(sum(skewed) / len(skewed))
    assert step_seconds([0.7], "cuda") == 0.7
    with pytest.raises(ValueError):
        step_seconds([], "cuda")


def test_the_probe_times_the_window_its_device_asks_for(tiny_cfg, shared_artifacts, monkeypatch):
    """`_time_setting` runs the Trainer until the window closes (not a fixed warm-up + probe_steps) and keeps each timed
    step in the trial; its s_per_step is `step_seconds` of them. A window of seconds no CPU step reaches ends at its cap.
    The first step's time over a step is in the plan's fixed cost."""
    import tasks.probe as probe_mod
    from tasks.data import load_dataset_records

    data = load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)
    for minutes, window, timed in ((0.71, (1e9, 5), 5), (0.73, (0.0, 5), tiny_cfg.budget.probe_steps)):
        monkeypatch.setattr(probe_mod, "timed_window", lambda device, w=window: w)
        budget = tiny_cfg.budget.model_copy(update={"minutes": minutes})  # a key of its own: not the suite's cached probe
        rec = probe_mod.probe_throughput(data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, tiny_cfg.training, budget, "cpu", shared_artifacts)
        (trial,) = rec.trials
        assert len(trial["step_times"]) == timed, trial
        assert rec.s_per_step == pytest.approx(step_seconds(trial["step_times"], "cpu"), abs=1e-3)
        assert rec.tokens_per_step > 0
        # the first step's excess over a step (Trainer's set-up in train() and step 1) is planned with the load
        assert trial["first_step_excess_seconds"] == pytest.approx(max(trial["first_step_seconds"] - rec.s_per_step, 0.0), abs=2e-3)
        assert rec.first_step_excess_seconds == trial["first_step_excess_seconds"]
        assert rec.start_seconds == rec.launch_seconds + rec.load_seconds + rec.first_step_excess_seconds
        assert (rec.max_steps, rec.fixed_seconds) == probe_mod.step_plan(rec.budget_seconds, rec.start_seconds, rec.s_per_step, rec.save_seconds,
                                                                         rec.final_save_seconds, tiny_cfg.training.checkpoint_minutes,
                                                                         tiny_cfg.training.max_steps)


# --- review of perf-19b (2026-12-07) -------------------------------------------------------------------------------------


def test_off_the_gpu_the_estimate_is_mains_on_the_same_step_times():
    """main's `step_seconds`: the median of three or more timed steps, else the faster of two (or the one)."""
    import statistics

    for deltas in ([1.0, 1.4], [1.77, 0.59, 0.61, 0.60], [0.5, 0.6, 0.7, 0.8]):
        mains = statistics.median(deltas) if len(deltas) >= 3 else min(deltas)
        assert step_seconds(deltas, "cpu") == pytest.approx(mains), deltas


def test_a_lower_median_of_zero_does_not_drop_every_step_that_took_time():
    from tasks.probe import step_plan

    s = step_seconds([0.0, 0.0, 1.0, 1.0], "cuda")
    assert s > 0
    steps, _ = step_plan(60.0, 1.0, s, 0.1, 0.1, 1.0, None)
    assert steps < 1000


def test_the_typical_step_is_the_median_not_the_lower_median():
    """The lower median of [0.5, 0.5, 1, 1] (0.5) left the slow half out as outliers (1 > 0.75): 0.5 s a step where the
    median keeps all four (1 <= 1.5 x 0.75); where only 0-s steps would be kept (a median of 0 s) the estimate is the
    mean of all steps, never 0 from steps that took time."""
    assert step_seconds([0.5, 0.5, 1.0, 1.0], "cuda") == pytest.approx(0.75)
    assert step_seconds([0.0, 0.0, 0.0, 1.0], "cuda") == pytest.approx(0.25)
    assert step_seconds([0.0, 0.0], "cuda") == 0.0
