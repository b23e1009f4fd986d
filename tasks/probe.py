"""Stage 3 — throughput probe: turn "train for 4 hours" into a step budget.

Loads the model exactly as training will, runs a few untimed then a few timed optimizer steps on real
batches of the formatted data (same micro-batch, accumulation and engine), and measures seconds per step,
tokens/s, peak memory, the model-load time, a checkpoint's save and the final save (apart: a checkpoint writes the
optimizer state too). Then `max_steps` is the step where stage 4's guard stops at that speed: the run ends nearest the
budget (tasks/budget.py `planned_steps`, the guard's own rule), after fixed = load + the first step's excess over a step +
final save + the checkpoints it saves.

With `training.gpus` > 1 it runs under torchrun like the training stage (tasks/engine/launch.py) and times the
data-parallel step: s/step with N GPUs, tokens/s over all of them, the slowest rank's load, save and peak
memory, and the launch itself (imports, process group) counted as fixed cost.

With `budget.vram_gb` on a GPU it searches for the fastest setting that fits (same effective batch):
first the largest micro-batch that fits with every layer checkpointed (an out-of-memory trial is recorded and
the next smaller one tried; with `training.offload_activations: auto` a micro-batch that does not fit is tried again
with the checkpointed layers' inputs offloaded to host memory before a smaller one, and kept when it fits), then how
many decoder layers can skip recompute in the memory left (not when offloaded: the two exclude each other). Each layer
freed from recompute saves about a third of its step time (measured on one H200: 4 layers +3.7% within
16 GiB, all 32 +47% at 59 GiB; docs/PERF_NOTES.md). Where layers still recompute at that micro-batch, half of it is
timed too, with its own layer search (a layer's activations are half as large there, so about twice the layers go
free), and the faster of the two is kept (`half_micro_batch`); where `auto` offloaded the largest micro-batch because
it did not fit checkpointed, half of it is timed without the offload the same way. Two trials that free 4 and 8 layers give the cost per
layer (the first freed layers partly hide under the recompute transient, so a single trial against the fully
checkpointed peak underestimates it by half), a third confirms the extrapolated count; when a trial runs over the
budget, the count between the most that fitted and it is tried (an out-of-memory trial ends the search). The cache key includes
the hardware (the card, and how many of them the run trains on), so another GPU re-probes; a card added beside a
one-GPU run, or CUDA_VISIBLE_DEVICES, does not.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from pathlib import Path

from pydantic import BaseModel

from .budget import checkpoints_saved, planned_steps
from .common import StageError, building, changed_file, complete_record, fingerprint, is_complete, locked, maybe_fault, stage_dir, write_json
from .config import BudgetSection, LoraSection, ModelSection, QuantSection, TrainingSection
from .data import DataRecord, load_split, rows_key
from .engine import dist, launch, recompute, unlikelihood
from .engine.build import (bookkeeping_trainer, build_model, collector_kept_off_the_model, drop_log_dicts, engine_for, keyed_training,
                           training_args)
from .engine.collate import collator_for, is_padding_free, training_dataset
from .engine.unlikelihood import attach_unlikelihood, unlikelihood_exempt
from .models import (code_commits, hardware_id, keep_code_commits, keyed_quant, load_tokenizer, model_config, quiet_transformers, recurrent_layers, recurrent_layers_of, remote_code_key, resolve_device,
                     resolve_model)

PROBE_VERSION = 5  # 3: partial-recompute search; 4: median step, LM head on trained positions only (packed engines); 5: half the
# micro-batch timed (also of an offloaded one), smaller micro-batches keep the effective batch exactly (5 x 1 -> 1 x 5, not 2 x 2)


def start_seconds(launch_s: float, load_s: float, first_step_excess_s: float) -> float:
    """What the plan reserves before the steps: the launch, the load and the first step's excess over a step."""
    return launch_s + load_s + first_step_excess_s


class ProbeRecord(BaseModel):
    key: str
    dir: str
    device: str
    hardware: str
    budget_seconds: float
    load_seconds: float
    save_seconds: float  # a checkpoint's save (a record without final_save_seconds: a checkpoint and the final save together)
    fixed_seconds: float
    s_per_step: float
    tokens_per_step: float
    tokens_per_s: float
    peak_mem_gb: float
    max_steps: int
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    engine: str
    trials: list[dict]
    gpus: int = 1  # data-parallel processes timed; grad_accum above is per rank (global batch = micro x accum x gpus)
    launch_seconds: float = 0.0  # several ranks: torchrun start, imports and process-group setup (part of fixed)
    recompute_free_layers: int = 0  # decoder layers whose activations are kept (no recompute) under checkpointing
    vram_budget_gb: float | None = None  # the memory budget the settings were chosen under (budget.vram_gb, auto resolved)
    offload_activations: bool = False  # the checkpointed layers' inputs wait in host memory (training.offload_activations)
    compile_layers: bool = False  # the decoder layers ran compiled (training.compile: layers, and the compiler worked)
    compile_seconds: float = 0.0  # what compiling them took (inside load_seconds, so inside the fixed cost)
    final_save_seconds: float | None = None  # the final save alone, adapter + tokenizer; None: a record from before it was timed apart
    checkpoint_minutes: float | None = None  # the checkpoint interval the plan counted (training.checkpoint_minutes; `planned_for`); None: a record from before it was kept
    first_step_excess_seconds: float = 0.0  # the first step's time over a timed one (the set-up in train(), first allocations and kernels): part of fixed; 0: a record from before it was counted

    @property
    def start_seconds(self) -> float:
        """What the plan reserves before the steps (`start_seconds`)."""
        return start_seconds(self.launch_seconds, self.load_seconds, self.first_step_excess_seconds)

    @property
    def final_save_cost(self) -> float:
        """What the final save costs: its own time, or in a record from before it was timed apart, `save_seconds` (a
        checkpoint and the final save together, what stage 4 reserved for the final save then)."""
        return self.save_seconds if self.final_save_seconds is None else self.final_save_seconds

    def planned_for(self, training: TrainingSection) -> "ProbeRecord":
        """This record with its plan (max_steps, fixed_seconds) for `training.checkpoint_minutes`: recomputed from its
        timings (`step_plan`, as the probe made it) where the interval is not the one it planned for. The interval is in
        no key (a new one must not re-time the steps), but the plan counts the checkpoints the run saves: a cached plan
        for hourly checkpoints kept its fixed cost and steps for a run that saves one every minute. Stage 4 trains on it.
        A record that times the final save apart but does not say its interval (cached by the code of d6e2ef8 to 3167fd7,
        this morning's) is replanned for any interval: its timings are all the plan needs, and the interval it counted is
        not known. One planned by the floor rule (`plan_rule`: no final save timed apart) is kept as it was made."""
        if self.final_save_seconds is None or self.checkpoint_minutes == training.checkpoint_minutes:
            return self
        steps, fixed = step_plan(self.budget_seconds, self.start_seconds, self.s_per_step, self.save_seconds,
                                 self.final_save_seconds, training.checkpoint_minutes, training.max_steps)
        return self.model_copy(update={"max_steps": steps, "fixed_seconds": fixed, "checkpoint_minutes": training.checkpoint_minutes})

    @property
    def checkpoint_words(self) -> str:
        """The checkpoints its fixed cost counts, as the step-budget artifact says them."""
        every = self.checkpoint_minutes
        if every is None:
            return "checkpoints"
        return f"a checkpoint every {every:g} min" if math.isfinite(every * 60) else "no checkpoints"

    @property
    def plan_rule(self) -> str:
        """The rule `max_steps` was planned with: "nearest", the step where stage 4's guard stops (the run ends nearest the
        budget: tasks/budget.py `planned_steps`), or "floor", floor((budget - fixed) / step), in a record cached before
        the probe planned with the guard's rule (it had no final_save_seconds: both came in one session, 2026-12-07)."""
        return "floor" if self.final_save_seconds is None else "nearest"

    def plan_words(self, short: bool = False) -> str:
        """What `max_steps` is, by the record's own rule: in full for the step-budget artifact, `short` for the log line."""
        if self.plan_rule == "floor":
            return ("the floor rule of an older cached probe: training may take a step more" if short else
                    f"floor((budget - fixed) / step), the steps that fit in the {self.budget_seconds:.0f}s budget: the plan of a probe "
                    "cached before the probe planned with training's own stop, which ends the run nearest the budget (up to a step more)")
        return "where training ends nearest the budget" if short else f"the step where training ends nearest the {self.budget_seconds:.0f}s budget"

    def outputs_exist(self) -> bool:
        return is_complete(Path(self.dir)) and changed_file(Path(self.dir)) is None  # its record.json as it was written


# Settings the probe's measurement and step plan do not depend on (a step costs the same at any learning rate or
# LoRA scale): in the train key, not here, so changing them retrains without re-probing. `checkpoint_minutes` enters
# the plan (the checkpoints the run saves), not the timings: a new interval replans from the cached timings at train
# time (`ProbeRecord.planned_for`) instead of re-timing the steps; it is bookkeeping (tasks/train.py BOOKKEEPING_KEYS).
NOT_TIMED = {"training": {"learning_rate", "lr_scheduler", "warmup_ratio", "weight_decay", "max_grad_norm",
                          "logging_steps", "keep_checkpoints", "checkpoint_minutes",
                          "neftune_noise_alpha",  # a few elementwise ops on the embeddings: not timed
                          "max_epochs"},  # where the run stops, not what a step costs (stage 4 turns it into its cap)
             "lora": {"alpha"}}


def keyed_budget(budget: BudgetSection) -> dict:
    """The budget as keyed: one length, one way of writing it. A whole number of hours is keyed in hours, any other
    length in minutes (to 9 decimals: `--hours 1.1` is 3960.0000000000005 s), so `--hours 1`, `--minutes 60` and
    `{hours: 0.5, minutes: 30}` share a probe, as do `--hours 1.1` and `--minutes 66` (they keyed apart). Whole hours
    (`--hours 4`) and minutes that are not whole hours (`--minutes 30`, the demo's `minutes: 4`) keep the keys they had;
    fractional hours (`--hours 0.5`) and whole hours in minutes (`--minutes 60`) were keyed as written and re-probe once."""
    keyed = budget.model_dump(mode="json")
    seconds = budget.seconds
    if seconds is not None:
        whole_hours = round(seconds, 6) % 3600 == 0
        keyed.update(hours=round(seconds / 3600, 9) if whole_hours else None, minutes=None if whole_hours else round(seconds / 60, 9))
    return keyed


def cache_key(data: DataRecord, model: ModelSection, quant: QuantSection, lora: LoraSection, training: TrainingSection, budget: BudgetSection, device: str) -> str:
    dev = resolve_device(device)
    # training.offload_activations counts only where it can act (`offload_can_apply`): elsewhere (the CPU, `off`, `auto`
    # without budget.vram_gb) the key is the one it had before the setting existed, and changing it reruns nothing.
    # training.compile likewise: `layers` is keyed (the step and the load time change, on any device), `off` is not.
    skip = (NOT_TIMED["training"] | (set() if offload_can_apply(training, budget, dev) else {"offload_activations"})
            | (set() if training.compile != "off" else {"compile"})
            | (set() if training.unlikelihood_alpha else {"unlikelihood_alpha"})  # keyed only when set: older keys stay
            # the candidate set: keyed only where it acts and is not the paper's (`written`, the keys from before it existed)
            | (set() if training.unlikelihood_alpha and training.unlikelihood_candidates != "written" else {"unlikelihood_candidates"}))
    # Values written out as what `auto` picks on this device are keyed as `auto` (`keyed_quant`, `keyed_training`).
    sections = [keyed_quant(quant, dev), lora.model_dump(mode="json", exclude=NOT_TIMED["lora"]),
                keyed_training(training, dev, skip), keyed_budget(budget)]
    if training.unlikelihood_alpha:
        sections.append({"unlikelihood_pass": unlikelihood.PASS_VERSION})
    # The card and how many of them the run trains on: what the measured step time follows (not how many are visible).
    # The model's own code where model.trust_remote_code makes transformers load it (`remote_code_key`; [] otherwise).
    return fingerprint("probe", PROBE_VERSION, rows_key(data), data.model_fingerprint, sections, hardware_id(dev, dist.gpus_used(training.gpus)),
                       *remote_code_key(model))


# Fixes to what the packed engines (fast, fused) compute for one kind of model, by its (text) model_type: each is in that
# kind's probe key on those engines, so in stage 4's, which holds it. The keys cannot see code, and TRAIN_VERSION would
# retrain every model for a fix that changed one kind's: without these, an adapter trained on the wrong attention came
# back from the cache after the fix (a review: a llama4_text adapter trained at b21e026^ was Cached at HEAD, its
# evaluation and merge with it). Add a kind's fix here when it changes what its training computes.
PACKED_ENGINE_FIXES = {
    "llama4_text": "chunked attention per chunk on packed and plain rows (b21e026), queries position-scaled per sample (cd180de)",
    "gpt_oss": "attention sinks kept on packed rows, plain rows and padded batches (e019f7e)",
}


def probe_key(data: DataRecord, model: ModelSection, quant: QuantSection, lora: LoraSection, training: TrainingSection,
              budget: BudgetSection, device: str, artifacts_dir: str) -> str:
    """`cache_key`, and a key of its own for a model that engine auto trains padded on CUDA because it carries a state
    along a row (the key it had before held a probe of the fused engine, and stage 4's key, which holds this one, an
    adapter trained on packed rows, one conversation's state reaching the next), or whose packed-engine training a fix
    changed (`PACKED_ENGINE_FIXES`). The padded engine's keys, and other models', are as they were."""
    key = cache_key(data, model, quant, lora, training, budget, device)
    dev = resolve_device(device)
    if engine_for(training, dev) == "padded":
        return key
    config = model_config(resolve_model(model, artifacts_dir), model)
    if training.engine == "auto" and dev == "cuda" and recurrent_layers_of(config):
        return fingerprint(key, "engine auto: padded, state along a row")
    fix = PACKED_ENGINE_FIXES.get(config.get_text_config().model_type)
    return fingerprint(key, fix) if fix else key


def candidate_settings(training: TrainingSection, budget: BudgetSection, device: str, ranks: int = 1) -> list[tuple[int, int, bool, bool]]:
    """(micro_batch, accum, checkpointing, offload) to try in turn until one fits, each exactly the configured effective
    batch over `ranks` GPUs (`dist.smaller_micro_batch`: 5 x 1 steps down to 1 x 5, never to 2 x 2). Without
    checkpointing in the config it is tried as asked first; skipping recompute where memory allows is the
    layer search's job (`next_free_trial`), not a candidate here.

    Offload applies to checkpointed settings on CUDA only (on the CPU activations are in host memory already):
    `on` offloads each of them; `auto` tries each micro-batch without it, then with it, so offload is used only where
    the fully checkpointed micro-batch does not fit, and a larger micro-batch offloaded comes before a smaller one."""
    mb, ga, gc = training.micro_batch_size, training.grad_accum, training.gradient_checkpointing
    mode = training.offload_activations if device == "cuda" else "off"
    if device != "cuda" or budget.vram_gb is None:
        return [(mb, ga, gc, gc and mode == "on")]
    offloads = {"off": (False,), "on": (True,), "auto": (False, True)}[mode]
    r = ranks if ga % ranks == 0 else 1  # not a multiple: the probe's first trial says so (dist.per_rank_accum)
    per_rank = mb * ga // r
    out = [] if gc else [(mb, ga, False, False)]
    m = mb
    while m:
        out += [(m, per_rank // m * r, True, offload) for offload in offloads]
        m = dist.smaller_micro_batch(m, per_rank)
    return [s for i, s in enumerate(out) if s not in out[:i]]


def setting_words(trial: dict) -> str:
    """A trial's memory setting as the logs say it: micro-batch x accum, which layers recompute, offload."""
    words = f"micro-batch {trial['micro_batch_size']} x accum {trial['grad_accum']}"
    if not trial["gradient_checkpointing"]:
        return words + " without gradient checkpointing"
    if trial["offload_activations"]:
        return words + f", every layer checkpointed, {recompute.OFFLOAD_NOTE}"
    free, layers = trial.get("recompute_free_layers", 0), trial.get("layers")
    return words + (f", {free} of {layers} layers without recompute" if free else ", every layer checkpointed")


def offload_can_apply(training: TrainingSection, budget: BudgetSection, device: str) -> bool:
    """Whether training.offload_activations can change what the probe picks (and so stage 4, which follows the probe and
    retries offloaded on out-of-memory under the same condition): some candidate setting offloads. On CUDA, `on` with
    gradient checkpointing, or `auto` with budget.vram_gb (its memory search reaches checkpointed settings even from
    gradient_checkpointing=false); never on the CPU, never `off`, not `auto` without a memory budget (= off there)."""
    return any(offload for *_, offload in candidate_settings(training, budget, device))


FREE_PROBES = (4, 8)  # layers freed from recompute in the two trials that measure the cost per layer
FREE_TRIALS = 4  # at most this many trials of freed layers (the two measuring ones and two from the cost per layer)
FREE_MARGIN_GB = 0.75  # left under budget.vram_gb: allocator fragmentation, the CUDA context, eval batches


def vram_budget(vram_gb: float | str | None, device: str) -> float | None:
    """`budget.vram_gb` in GiB for this process: `auto` is the memory free on the GPU now (what other processes
    hold is not ours to use), the same on every rank (the smallest), so all ranks take the same decisions."""
    if device != "cuda" or vram_gb is None:
        return None
    if vram_gb != "auto":
        return float(vram_gb)
    import torch

    free, _ = torch.cuda.mem_get_info()
    return round(-dist.sync_max([-free / 2**30])[0], 2)


def next_free_trial(n_layers: int, vram_gb: float, measured: dict[int, float], over: dict[int, float] | None = None,
                    margin_gb: float = FREE_MARGIN_GB) -> int | None:
    """The next number of recompute-free layers to time, or None when the search is done.

    `measured` maps layers freed -> peak GiB of the trials that fitted (0 = fully checkpointed); `over` the same for
    trials that ran but peaked above the budget (an out-of-memory trial has no peak: the caller stops there). Order:
    the two measuring trials (4 and 8, clipped to the model's depth), then counts from the cost per layer: extrapolated
    beyond the two that fitted, or between the most that fitted and the fewest that did not where one did not (8 free
    over a 15 GiB budget where 4 left 3.6 GiB unused, 2026-12-06: 6 fit). At most FREE_TRIALS trials (each loads the
    model again): the peaks are near linear in the freed layers, so one or two settle it.
    """
    fit, tried = max(measured), set(measured) | set(over or {})
    over = {k: peak for k, peak in (over or {}).items() if k > fit}  # counts at or below one that fitted say nothing
    if len(tried) - 1 >= FREE_TRIALS:
        return None
    for k in FREE_PROBES:
        k = min(k, n_layers)
        if any(o <= k for o in over):
            break  # did not fit: the count lies below it
        if k not in tried:
            return k
    if over:
        ceiling = min(over)
        per_layer = (over[ceiling] - measured[fit]) / (ceiling - fit)
        target = fit + recompute.recompute_free_layers(measured[fit], per_layer, vram_gb, ceiling - fit - 1, margin_gb)
    else:
        lo, hi = (min(k, n_layers) for k in FREE_PROBES)
        if hi == lo or hi == n_layers or not {lo, hi} <= set(measured):
            return None
        per_layer = (measured[hi] - measured[lo]) / (hi - lo)
        target = hi + recompute.recompute_free_layers(measured[hi], per_layer, vram_gb, n_layers - hi, margin_gb)
    return target if target > fit and target not in tried else None


def half_micro_batch(base: dict, free: int) -> tuple[int, int] | None:
    """(micro_batch, accum) of the one smaller setting the probe also times, or None: half of `base`'s micro-batch, the
    same effective batch, where `base` (the largest micro-batch that fits, checkpointed) left layers recomputed after its
    layer search freed `free` of them. Recompute costs about a third of a layer's step (all 32 of Mistral's layers free:
    +47% at 59 GiB on one H200), and a layer's saved activations scale with the micro-batch, so at half of it about twice
    the layers fit without recompute; what a smaller micro-batch costs (twice the weight dequantizations and launches a
    step) is the card's and the model's, so both are timed and the faster kept. Only once: a quarter would pay those
    costs twice for what half already bought. None where half the micro-batch cannot hold the same effective batch
    exactly (an odd one: 5 x 1 would become 2 x 3, six samples a step): the search picks the faster setting of one recipe,
    it does not change the recipe. An offloaded `base` (free = 0) has a half too: the probe times it without the offload
    where `auto` chose the offload only because the fully checkpointed micro-batch did not fit (`_probe`)."""
    mb, ga = base["micro_batch_size"], base["grad_accum"]
    if mb < 2 or free >= base["layers"] or (mb * ga) % (mb // 2):
        return None
    return mb // 2, mb * ga // (mb // 2)


def _half_search(args: tuple, base: dict, free: int, why: str, vram_gb: float, max_length: int, log_fn, exempt, trials: list) -> None:
    """Time half of `base`'s micro-batch (`half_micro_batch`), checkpointed and not offloaded, and where it fits its own
    layer search, appending each trial to `trials` (the probe keeps the fastest that fits). `why`: the log's reason."""
    if not (half := half_micro_batch(base, free)):
        return
    mb, ga = half
    log_fn(f"probe: {why}: trying micro-batch {mb} x accum {ga}, whose layers each hold {mb}/{base['micro_batch_size']} of the activations")
    then = "keeping the offloaded micro-batch" if base["offload_activations"] else "keeping the larger micro-batch"
    trial = _trial(*args, mb, ga, True, 0, max_length, log_fn, then=then, exempt=exempt)
    trials.append(trial)
    if trial.get("fits"):
        _free_layer_search(args, trial, vram_gb, max_length, log_fn, exempt, trials)


def _free_layer_search(args: tuple, base: dict, vram_gb: float, max_length: int, log_fn, exempt, trials: list) -> int:
    """Time settings of `base`'s micro-batch with layers freed from recompute (`next_free_trial`), appending each trial
    to `trials`; the most layers freed by a trial that fitted (0 when none did)."""
    measured, over = {0: base["peak_mem_gb"]}, {}
    while (k := next_free_trial(base["layers"], vram_gb, measured, over)) is not None:
        trial = _trial(*args, base["micro_batch_size"], base["grad_accum"], True, k, max_length, log_fn, exempt=exempt)
        trials.append(trial)
        if trial.get("error"):
            break  # out of memory: no peak to learn from, and the allocator may not recover another time
        (measured if trial.get("fits") else over)[k] = trial["peak_mem_gb"]
    return max(measured)


def probe_throughput(data: DataRecord, model: ModelSection, quant: QuantSection, lora: LoraSection, training: TrainingSection, budget: BudgetSection, device: str, artifacts_dir: str, log_fn=None) -> ProbeRecord:
    """Stage 3: measure s/step and turn the time budget into max_steps."""
    if budget.seconds is None:
        raise StageError("budget: no time budget; pass --hours H or --minutes M (or set budget.hours in pipeline.yaml)")
    key = probe_key(data, model, quant, lora, training, budget, device, artifacts_dir)
    out = stage_dir(artifacts_dir, "probe", key)
    log_fn = log_fn or (lambda m: None)
    with locked(out, log_fn=log_fn):
        if is_complete(out):
            return complete_record(out, ProbeRecord)
        n = dist.world_size(training.gpus, device)
        if n > 1 and dist.world() == 1:
            dist.per_rank_accum(training.grad_accum, n)  # fail before starting N processes
            resolve_model(model, artifacts_dir)  # build/convert once here, not in N ranks at once
            inputs = {"data": data.model_dump(mode="json"), "device": resolve_device(device), "key": key, "out": str(out), "artifacts_dir": artifacts_dir,
                      "code_commits": code_commits(model),  # the other repository's code at the commit the key holds
                      **{k: s.model_dump(mode="json", by_alias=True) for k, s in (("model", model), ("quant", quant), ("lora", lora), ("training", training), ("budget", budget))}}
            return ProbeRecord.model_validate(launch.run_stage("probe", "tasks.probe:probe_on_rank", inputs, n, out.parent / f".{out.name}.launch", log_fn))
        from .engine.fastpath import kernel_patch_scope

        with kernel_patch_scope():  # Liger's module-wide patches end with the stage (tasks/engine/fastpath.py)
            return _probe(data, model, quant, lora, training, budget, resolve_device(device), key, out, artifacts_dir, log_fn)


def probe_on_rank(spec: dict, log_fn) -> ProbeRecord | None:
    """One rank's probe under torchrun (tasks/engine/launch.py calls it with the spec `probe_throughput` wrote)."""
    sections = (ModelSection.model_validate(spec["model"]), QuantSection.model_validate(spec["quant"]),
                LoraSection.model_validate(spec["lora"]), TrainingSection.model_validate(spec["training"]),
                BudgetSection.model_validate(spec["budget"]))
    keep_code_commits(spec.get("code_commits") or {})
    return _probe(DataRecord.model_validate(spec["data"]), *sections, spec["device"], spec["key"], Path(spec["out"]),
                  spec["artifacts_dir"], log_fn, t_start=spec["t_launch"])


def _probe(data, model_cfg, quant, lora, training, budget, device, key, out, artifacts_dir, log_fn, t_start: float | None = None) -> ProbeRecord | None:
    """The probe's work, in this process; under torchrun every rank runs it and rank 0 returns the record."""
    n = dist.world()
    launch_s = dist.sync_max([time.monotonic() - t_start])[0] if t_start else 0.0
    ref = resolve_model(model_cfg, artifacts_dir)
    engine = engine_for(training, device, recurrent_layers(ref, model_cfg))
    tok = load_tokenizer(ref, model_cfg)
    train_ds = load_split(data, "train")
    budget = budget.model_copy(update={"vram_gb": vram_budget(budget.vram_gb, device)})  # auto -> GiB free now
    if budget.vram_gb is not None:
        log_fn(f"probe: memory budget {budget.vram_gb:.2f} GiB")
    args = (ref, model_cfg, quant, lora, training, budget, device, engine, train_ds, tok)
    exempt = unlikelihood_exempt(tok, data.stop_token_ids)  # as stage 4 exempts them: the pass it times is stage 4's
    if training.offload_activations == "on" and device != "cuda":
        log_fn(f"probe: training.offload_activations=on does nothing on the {device}: activations already live in host memory")
    trials = []
    candidates = candidate_settings(training, budget, device, n)
    for i, (mb, ga, gc, offload) in enumerate(candidates):  # grows on out-of-memory (below)
        ga = dist.per_rank_accum(ga, n)  # same global batch over n ranks
        after = candidates[i + 1] if i + 1 < len(candidates) else None
        if after and after[0] == mb:  # the same micro-batch next: checkpointed, or offloaded
            then = "trying it with gradient checkpointing" if after[2] and not gc else f"trying it with the {recompute.OFFLOAD_NOTE}"
        else:  # on the CPU or without budget.vram_gb the smaller one is appended below, on the error
            then = "trying a smaller micro-batch" if after or mb > 1 else "nothing smaller to try"
        trial = _trial(*args, mb, ga, gc, 0, data.max_length, log_fn, offload=offload, then=then, exempt=exempt)
        trials.append(trial)
        if trial.get("error") and mb > 1 and not any(c[0] < mb for c in candidates):
            # No smaller setting queued (CPU, or no budget.vram_gb): the next smaller micro-batch, the same effective batch.
            smaller = dist.smaller_micro_batch(mb, mb * ga)  # ga is this rank's here
            candidates.append((smaller, mb * ga // smaller * n, gc, offload))
        if trial.get("fits"):
            break  # the largest micro-batch that fits (half of it is timed too where layers stay recomputed: below)
    base = next((t for t in trials if t.get("fits")), None)
    # The layer searches and the half micro-batch: one GPU with a memory budget only (vram_gb is None off the GPU); not
    # under several ranks, where an out-of-memory trial cannot be recovered from (the others wait in the all-reduce).
    search = budget.vram_gb is not None and n == 1
    half_args = (budget.vram_gb, data.max_length, log_fn, exempt, trials)
    if base and base["offload_activations"]:
        whole = "a layer without recompute would go to host memory whole"
        if search and training.offload_activations == "auto" and half_micro_batch(base, 0):
            # auto offloaded because this micro-batch did not fit fully checkpointed; half of it may, without the offload's
            # copies and with layers free: which is faster is measured (offload cost 0.15% to 8% of a step on the H100s and the
            # H200 measured, docs/BENCHMARKS.md "offload beside Unsloth", "the rows beside Unsloth")
            _half_search(args, base, 0, f"micro-batch {base['micro_batch_size']} fits only offloaded, every layer checkpointed "
                         f"({whole})", *half_args)
        else:
            log_fn(f"probe: every layer stays checkpointed: offloaded, {whole}")
    elif base and base["gradient_checkpointing"] and search:
        # Spend the memory left on layers that skip recompute.
        free = _free_layer_search(args, base, budget.vram_gb, data.max_length, log_fn, exempt, trials)
        # Layers still recomputed at the largest micro-batch: half of it holds half the activations a layer, so about
        # twice the layers run without recompute in the same memory; which is faster is measured, not assumed.
        _half_search(args, base, free, f"{base['layers'] - free} of {base['layers']} layers still recompute at micro-batch "
                     f"{base['micro_batch_size']}", *half_args)
    fitting = [t for t in trials if t.get("fits")]
    if not fitting:
        offloaded = any(t["offload_activations"] for t in trials)
        raise StageError("out of memory even at micro-batch 1" + (f" with the {recompute.OFFLOAD_NOTE}" if offloaded else "")
                         + f" (budget.vram_gb={budget.vram_gb}); lower data.max_length, "
                         + ("" if offloaded or device != "cuda" else f"{recompute.OFFLOAD_FIX}, ")
                         + "set training.gradient_checkpointing=true or use a smaller model")
    best = min(fitting, key=lambda t: t["s_per_step"])
    if len(fitting) > 1:  # the searches timed several: say which one stage 4 runs
        log_fn(f"probe: keeping {setting_words(best)}, the fastest of the {len(fitting)} settings that fit")

    budget_s = float(budget.seconds)
    launch_s = round(launch_s, 2)  # as the record keeps it: a plan made again from the record (`planned_for`) is this one
    # Stage 4's first step runs over its others as the probe's did (Trainer's set-up inside train(), the first batch's
    # allocations and kernels: ~4 s on the 15 GiB H100 stage of 2026-12-07, ~1 step a minute on its 3-minute budget, which
    # the plan counted as a plain step): reserved with the load. Stage 4 starts in a fresh process, cold, as the probe's
    # first timed trial did; a later trial (the one picked, often) starts with the kernels compiled and the allocator's
    # pools filled by those before it, so its first step says less: the largest excess of the trials is reserved.
    first_excess = max((t["first_step_excess_seconds"] for t in trials if "first_step_excess_seconds" in t), default=0.0)
    max_steps, fixed = step_plan(budget_s, start_seconds(launch_s, best["load_seconds"], first_excess), best["s_per_step"],
                                 best["save_seconds"], best["final_save_seconds"], training.checkpoint_minutes, training.max_steps)
    rec = ProbeRecord(
        key=key,
        dir=str(out),
        device=device,
        hardware=hardware_id(device, n),
        budget_seconds=budget_s,
        load_seconds=best["load_seconds"],
        save_seconds=best["save_seconds"],
        final_save_seconds=best["final_save_seconds"],
        fixed_seconds=fixed,
        s_per_step=best["s_per_step"],
        tokens_per_step=best["tokens_per_step"],
        tokens_per_s=best["tokens_per_s"],
        peak_mem_gb=best["peak_mem_gb"],
        max_steps=max_steps,
        micro_batch_size=best["micro_batch_size"],
        grad_accum=best["grad_accum"],
        gradient_checkpointing=best["gradient_checkpointing"],
        recompute_free_layers=best.get("recompute_free_layers", 0),
        vram_budget_gb=budget.vram_gb,
        offload_activations=best["offload_activations"],
        compile_layers=best.get("compile_layers", False),
        compile_seconds=best.get("compile_seconds", 0.0),
        engine=engine,
        trials=trials,
        gpus=n,
        launch_seconds=launch_s,
        checkpoint_minutes=training.checkpoint_minutes,
        first_step_excess_seconds=first_excess,
    )
    if not dist.is_main():
        return None
    with building(out, record_files=True) as tmp:  # a record.json edited since is refused (`changed_file`)
        write_json(tmp / "record.json", rec.model_dump(mode="json"))
    return rec


def step_plan(budget_s: float, start_s: float, step_s: float, save_s: float, final_save_s: float, checkpoint_minutes: float,
              max_steps: int | None) -> tuple[int, float]:
    """The probe's plan from its timings: (max_steps, fixed_seconds). max_steps is where stage 4's guard stops at the
    probed speed, the run ending nearest the budget (floor((budget - fixed) / step) planned a step fewer where the guard
    ran one more: the log said N, the run did N + 1), at most training.max_steps; fixed is all but the steps of that
    run: the start (launch, load and the first step's excess over a step: `ProbeRecord.start_seconds`), the final save and
    the checkpoints it saves every `checkpoint_minutes`."""
    every_s = checkpoint_minutes * 60
    steps = planned_steps(budget_s, start_s, step_s, every_s, save_s, final_save_s)
    if max_steps:
        steps = min(steps, max_steps)
    return steps, round(start_s + final_save_s + save_s * checkpoints_saved(steps, step_s, every_s), 2)


def _trial(ref, model_cfg, quant, lora, training, budget, device, engine, train_ds, tok, mb, ga, gc, n_free, max_length, log_fn,
           offload: bool = False, then: str = "trying a smaller micro-batch", exempt=()) -> dict:
    """Time one setting; an out-of-memory is a recorded trial that does not fit (one rank of several: an error).
    `then` says what the search tries after an out-of-memory."""
    import gc as pygc

    import torch

    trial = {"micro_batch_size": mb, "grad_accum": ga, "gradient_checkpointing": gc, "recompute_free_layers": n_free, "offload_activations": offload}
    how = ", ".join(([f"{n_free} layers without recompute"] if n_free else []) + ([recompute.OFFLOAD_NOTE] if offload else []))
    try:
        maybe_fault("probe")  # test-only (docs/RELIABILITY.md); here so an injected OOM hits a trial
        trial.update(_time_setting(ref, model_cfg, quant, lora, training, budget, device, engine, train_ds, tok, mb, ga, gc, n_free, max_length, offload,
                                   log_fn=log_fn, exempt=exempt))
        trial["fits"] = budget.vram_gb is None or trial["peak_mem_gb"] <= budget.vram_gb
        if trial.get("compile_layers"):
            how = ", ".join(([how] if how else []) + [compile_note(trial)])
        log_fn(f"probe: micro-batch {mb} x accum {ga}, checkpointing {gc}" + (f" ({how})" if how else "")
               + f": {trial['s_per_step']:.2f} s/step, {trial['tokens_per_s']:,.0f} tokens/s, peak {trial['peak_mem_gb']:.2f} GiB"
               + (f" (the load's; the steps' {trial['train_peak_mem_gb']:.2f})" if trial.get("load_peak_mem_gb", 0) > trial.get("train_peak_mem_gb", trial["peak_mem_gb"]) else ""))
    except torch.OutOfMemoryError as e:
        if dist.world() > 1:
            raise StageError(f"probe: micro-batch {mb} x accum {ga} (checkpointing {gc}" + (f", {how}" if how else "") + ") ran out of "
                             f"memory on rank {dist.rank()}; with training.gpus > 1 set training.micro_batch_size / gradient_checkpointing"
                             + ("" if offload or device != "cuda" else " / offload_activations=on (with gradient_checkpointing)")
                             + " to a setting that fits (a training.gpus=1 probe with budget.vram_gb finds one)") from e
        trial.update(fits=False, error="out of memory")
        log_fn(f"probe: micro-batch {mb} x accum {ga} (checkpointing {gc}" + (f", {how}" if how else "") + ") ran out of memory"
               + ("" if n_free else f"; {then}"))
    pygc.collect()  # outside the except block: the traceback no longer pins the failed trial's tensors
    if device == "cuda":
        torch.cuda.empty_cache()
    return trial


def _time_setting(ref, model_cfg, quant, lora, training, budget, device, engine, train_ds, tok, mb, ga, gc, n_free, max_length, offload=False,
                  log_fn=None, exempt=()) -> dict:
    import torch
    from transformers import TrainerCallback

    from .engine.compile import compiled_graphs

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    model = build_model(ref, model_cfg, quant, lora, gc, device, engine, liger=training.liger, offload=offload,
                        compile_layers=training.compile == "layers", batch_shape=(mb, max_length), log_fn=log_fn)
    load_s = time.monotonic() - t0  # with training.compile: layers, the compile too (build_model's warm-up)
    # The load's own peak apart from the steps': a load can peak above training (a random model built in memory holds its
    # 16-bit weights beside the 4-bit ones), and the trial's peak, what must fit, is the larger of the two.
    load_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_layers = len(recompute.checkpointed_layers(model))
    if gc and n_free:
        recompute.set_recompute_free_layers(model, n_free)

    window = StepWindow(budget.probe_warmup_steps, budget.probe_steps, *timed_window(device))

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            done = window.mark(time.monotonic(), int(state.num_input_tokens_seen or 0))
            # Several ranks: any rank's window ends everyone's (each rank reads its own clock; one alone stopping would
            # leave the others waiting in the next all-reduce).
            control.should_training_stop = control.should_training_stop or bool(dist.sync_max([float(done)])[0])

    with tempfile.TemporaryDirectory() as tmp:
        dataset, per_device = training_dataset(engine, train_ds, mb, max_length, training.seed, packing=training.packing)
        args = training_args(training, Path(tmp), device, quant, micro_batch_size=per_device, grad_accum=ga, max_steps=window.warmup + window.most,
                             gradient_checkpointing=gc, padding_free=is_padding_free(engine))
        args.disable_tqdm = True
        extra = {}
        if training.unlikelihood_alpha:  # the head's extra pass is in the steps timed, as stage 4 runs it
            extra["compute_loss_func"], _ = attach_unlikelihood(model, training.unlikelihood_alpha, exempt=exempt,
                                                                candidates=training.unlikelihood_candidates)
        trainer = bookkeeping_trainer()(model=model, args=args, train_dataset=dataset, data_collator=collator_for(engine, tok.pad_token_id, model, (mb, max_length)),
                                        callbacks=[Marks()], **extra)  # stage 4's bookkeeping: the steps it times are stage 4's
        drop_log_dicts(trainer)
        state = model.layer_compile
        with quiet_transformers(), collector_kept_off_the_model():  # as stage 4 runs its steps
            graphs, eager = compiled_graphs(), (state.eager_calls if state is not None else 0)
            window.start(time.monotonic())
            trainer.train()
            # In the steps, not the warm-up: graphs compiled (none: torch runs a variant it has no graph for eagerly) and
            # the layer calls that ran eagerly so (a variant the warm-up did not foresee, at the eager speed).
            late_graphs = compiled_graphs() - graphs
            late_eager = (state.eager_calls if state is not None else 0) - eager
        # Checkpoint cost: adapter + optimizer + scheduler state, as BudgetGuard's checkpoints write them.
        t1 = time.monotonic()
        trainer._save_checkpoint(trainer.model, trial=None)
        t2 = time.monotonic()
        # ... and, timed apart, the final save after the last step: adapter + tokenizer (a 262k-vocab tokenizer takes
        # seconds). Apart, because the guard reserves the final save at every step and a checkpoint only where one is
        # due: the two as one number reserved the checkpoint's optimizer state too, ending H100 runs ~0.4-0.5 s early.
        trainer.model.save_pretrained(str(Path(tmp) / "final"), safe_serialization=True)
        tok.save_pretrained(str(Path(tmp) / "final"))
        save_s, final_save_s = t2 - t1, time.monotonic() - t2
    deltas, tokens = window.deltas(), window.tokens()
    s_per_step = step_seconds(deltas, device)
    first_s = window.first_step()
    train_peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else _rss_gb()
    load_peak = train_peak if load_peak is None else load_peak  # on CPU the process's RSS high-water mark holds both
    # Several ranks: the slowest rank's timings and the largest peak (the step is as slow as its slowest rank).
    load_s, save_s, final_save_s, s_per_step, first_s, load_peak, train_peak = dist.sync_max([load_s, save_s, final_save_s, s_per_step, first_s,
                                                                                              load_peak, train_peak])
    peak = max(load_peak, train_peak)
    compiled = {} if state is None else {"compile_layers": state.active, "compile_seconds": round(state.seconds, 2),
                                         "compile_graphs": state.graphs, "compile_graphs_in_steps": late_graphs,
                                         "compile_eager_calls_in_steps": late_eager}
    del trainer, model
    return {
        **compiled,
        "load_seconds": round(load_s, 3),
        "save_seconds": round(save_s, 3),
        "final_save_seconds": round(final_save_s, 3),
        "s_per_step": round(s_per_step, 4),
        "first_step_seconds": round(first_s, 3),  # from train()'s call to the first step's end: Trainer's set-up and step 1
        "first_step_excess_seconds": round(max(first_s - s_per_step, 0.0), 3),  # reserved in the plan with the load
        "tokens_per_step": round(tokens / len(deltas), 1),
        "tokens_per_s": round(tokens / len(deltas) / max(s_per_step, 1e-9), 1),
        "peak_mem_gb": round(peak, 3),
        "load_peak_mem_gb": round(load_peak, 3),
        "train_peak_mem_gb": round(train_peak, 3),
        "layers": n_layers,
        "step_times": [round(d, 4) for d in deltas],  # the timed steps, for a reader comparing them with stage 4's
    }


def compile_note(trial: dict) -> str:
    """How a trial's compiled layers read in the log: graphs and seconds of the warm-up, and any compiled in the steps."""
    late, eager = trial.get("compile_graphs_in_steps", 0), trial.get("compile_eager_calls_in_steps", 0)
    return (f"decoder layers compiled: {trial['compile_graphs']} graphs in {trial['compile_seconds']:.0f} s"
            + (f", {late} more in the timed steps" if late else "")
            + (f", {eager} layer calls in the steps ran eagerly (a variant the warm-up did not compile)" if eager else ""))


# The timed window on a GPU: at least budget.probe_steps steps and PROBE_MIN_WINDOW_S seconds, at most
# PROBE_MAX_TIMED_STEPS steps. Two or four steps of a small model were 1.2-3.5 s of timing: two demo-gpu probes of
# Gemma-3-270M (same rows and batch, another seed; one H100, 2026-12-07) read 0.877 and 0.575 s a step where their
# stages ran 0.631 and 0.703 s on average, steps spreading 0.51-0.79 s (p10-p90) with the packs they drew. A window of
# seconds holds ~14 such steps and costs ~6 s more; a 3-s step (Mistral-7B) gets one step more than its two (the median
# of three, not the faster of two). On the CPU (tests, the CPU demo) the window is budget.probe_steps as set.
PROBE_MIN_WINDOW_S = 8.0
PROBE_MAX_TIMED_STEPS = 40
OUTLIER_FACTOR = 1.5  # a timed step this many times the typical one (the median) is left out of the estimate


def timed_window(device: str) -> tuple[float, int]:
    """(least seconds, most steps) of the probe's timed window on `device` (`StepWindow`): PROBE_MIN_WINDOW_S and
    PROBE_MAX_TIMED_STEPS on CUDA, none (the configured steps) elsewhere."""
    return (PROBE_MIN_WINDOW_S, PROBE_MAX_TIMED_STEPS) if device == "cuda" else (0.0, 0)


class StepWindow:
    """The probe's steps as they end: `warmup` untimed, then timed ones until there are at least `least` of them and
    they span at least `min_seconds`, or `most` of them (never fewer than `least`). A short step gets a longer run of
    steps, a long one the `least` configured: the window, not the count, sets how much timing noise (the packs a step
    draws, a kernel compiled for a new shape, the clocks) reaches the estimate."""

    def __init__(self, warmup: int, least: int, min_seconds: float = 0.0, most: int = 0):
        self.warmup, self.least, self.min_seconds = warmup, max(least, 1), min_seconds
        self.most = max(most, self.least)
        self.marks: list[tuple[float, int]] = []  # (time, tokens seen) at each step's end
        self.t_start = 0.0

    def start(self, now: float) -> None:
        """Training begins (the timed window's start where there is no warm-up step)."""
        self.t_start = now

    def mark(self, now: float, tokens_seen: int) -> bool:
        """A step ended at `now` with `tokens_seen` tokens read so far; True when the window is complete."""
        self.marks.append((now, tokens_seen))
        timed = len(self.marks) - self.warmup
        if timed >= self.most:
            return True
        return timed >= self.least and now - self._opening()[0] >= self.min_seconds

    def _opening(self) -> tuple[float, int]:
        return self.marks[self.warmup - 1] if self.warmup else (self.t_start, 0)

    def first_step(self) -> float:
        """The first step's duration from `start` (training's set-up in train() included), timed or not."""
        return self.marks[0][0] - self.t_start if self.marks else 0.0

    def deltas(self) -> list[float]:
        """The timed steps' durations."""
        times = [self._opening()[0]] + [t for t, _ in self.marks[self.warmup:]]
        return [b - a for a, b in zip(times, times[1:])]

    def tokens(self) -> int:
        """Tokens the timed steps read."""
        return self.marks[-1][1] - self._opening()[1]


def step_seconds(deltas: list[float], device: str) -> float:
    """The probe's step time from its timed steps on `device`. On CUDA (its window of seconds, `timed_window`): the mean
    of those no slower than OUTLIER_FACTOR x the median. Not the plain mean: a step that compiles a kernel for a
    new shape (Triton specializes on sizes; packed rows vary) took 3x the rest on an H200 and made a whole run's step
    estimate 3x short, so the step cap ended it at 61% of its budget. Not the median or the faster of two either: stage
    4 pays its slower steps too (demo-gpu's ran a mean 5% over their median), and the faster of two timed steps read
    3.12 s where the 15 GiB stage ran 3.25 s a step (2026-12-07, one H100). The median, not the lower one: a lower
    median of 0 s kept only the 0-s steps (an estimate of 0 s plans ~1e10 steps), and of [0.5, 0.5, 1, 1] kept the
    fast half. Where only 0-s steps are kept (a median of 0 s, or [0, 0, 1, 1]: 1 > 1.5 x 0.5) the estimate is the
    mean of all, never 0 from steps that took time. Of two steps the median is their mean: the slower is left out only
    beyond 3x the faster (a GPU window has two steps only where a step takes over PROBE_MIN_WINDOW_S). Elsewhere (tests,
    the CPU demo: the configured steps) the rule from before the window (2026-12-07): the median of three or more, else
    the faster of two (or the one)."""
    if not deltas:
        raise ValueError("no timed probe step")
    if device != "cuda":
        return statistics.median(deltas) if len(deltas) >= 3 else min(deltas)
    typical = statistics.median(deltas)
    kept = statistics.fmean([d for d in deltas if d <= OUTLIER_FACTOR * typical])
    return kept if kept > 0 else statistics.fmean(deltas)  # only 0-s steps kept: never 0 from steps that took time


def _rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
