"""The thin Prefect tasks around each stage: caching (content keys), retries (I/O stages only), one log
line and the UI artifacts. The stage modules themselves stay importable without Prefect (notebooks, the GPU
benchmark machine); the flow in `flows/finetune.py` wires these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import State, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from . import data as data_stage
from . import evaluate as eval_stage
from . import export as export_stage
from . import merge as merge_stage
from . import probe as probe_stage
from . import profile as profile_stage
from . import publish as publish_stage
from . import train as train_stage
from .common import StageError, TrainingStopped, read_json
from .config import BudgetSection, DataSection, EvalSection, ExportSection, LoraSection, MergeSection, ModelSection, PipelineConfig, QuantSection, TrainingSection
from .data import DataRecord
from .engine.recompute import OFFLOAD_NOTE
from .evaluate import EvalRecord
from .export import ExportRecord
from .merge import MergeRecord
from .prefect_glue import STAGE_RETRIES_IO, artifact_key, artifacts_tag, cancelled_by_prefect, cancelled_uncached, in_flow_task_run, keyed_by, log, png_markdown
from .probe import ProbeRecord
from .profile import ProfileRecord
from .publish import PublishRecord
from .train import TrainRecord



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper: caching, retries (the hub download is I/O), one log line.




def _retry_io_only(task, task_run, state) -> bool:
    """Retry transient errors (network); a StageError (bad row, missing file) fails the same way every time."""
    try:
        state.result()
    except StageError as e:
        return e.retryable
    except Exception:
        return True
    return False


@task(name="1-data", cache_key_fn=keyed_by("data", data_stage.cache_key), retries=STAGE_RETRIES_IO, retry_delay_seconds=10,
      retry_condition_fn=_retry_io_only)
@cancelled_by_prefect
def data_task(data: DataSection, model: ModelSection, artifacts_dir: str) -> DataRecord:
    import datasets

    datasets.disable_progress_bars()  # one log line per stage, not a bar per shard
    rec = data_stage.load_dataset_records(data, model, artifacts_dir, log)
    dropped = ", ".join(f"{k}: {v}" for k, v in rec.dropped.items()) or "none"
    merged = (f", {rec.merged} row{'s' if rec.merged > 1 else ''} had turns of one role in a row merged into one turn "
              "(joined by a blank line)") if rec.merged else ""
    split = (f" ({rec.split} multi-turn conversations train as one example per answer, in the conversation cut after it: the "
             "chat template renders past answers otherwise)") if rec.split else ""
    log(f"data: {rec.n_train} train / {rec.n_heldout} held-out {'examples' if rec.split else 'conversations'}{split}, "
        f"{rec.train_tokens:,} train tokens, dropped {dropped}{merged}; hash {rec.data_hash}")
    if len(rec.sources) > 1:
        log("data: mix " + ", ".join(f"{s['source']} {s['n_train']} train / {s['n_heldout']} held-out" for s in rec.sources)
            + f"; benchmark dedupe removed {rec.dedupe.get('removed', 0)} conversations"
            + (f" ({', '.join(f'{k}: {v}' for k, v in rec.dedupe['removed_by'].items())})" if rec.dedupe.get("removed_by") else ""))
        for s in rec.sources[1:]:
            if s["n_train"] < s["wanted"]:
                get_run_logger().warning(f"data: {s['source']} gave {s['n_train']} of the {s['wanted']} training rows its share asks "
                                         "for (too few usable rows); the mix leans to the other sources")
    return rec



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper: caching, one log line, table + markdown artifacts.




@task(name="2-profile", cache_key_fn=keyed_by("profile", profile_stage.cache_key))
@cancelled_by_prefect
def profile_task(data: DataRecord, artifacts_dir: str) -> ProfileRecord:
    rec = profile_stage.profile_lengths(data, artifacts_dir, log)
    t = rec.stats["total"]
    log(f"profile: total tokens p50 {t['p50']:.0f}, p95 {t['p95']:.0f}, p99 {t['p99']:.0f}, max {t['max']:.0f}; "
        f"{rec.over_max_length} examples over max_length={rec.max_length}; suggested {rec.suggested_max_length}")
    if rec.warning:
        get_run_logger().warning(rec.warning)
    create_table_artifact(
        key=artifact_key("token-lengths"),
        table=[{"tokens": k, **{m: round(v, 1) for m, v in s.items()}} for k, s in rec.stats.items()],
        description="Token-length profile of the training split",
    )
    create_markdown_artifact(
        key=artifact_key("token-length-histogram"),
        markdown="## Token lengths\n\n" + profile_stage.markdown_table(rec) + f"\n\n{rec.warning or ''}\n\n" + png_markdown(rec.histogram_png, "histogram"),
        description="Length histogram",
    )
    return rec



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper




@task(name="3-probe", cache_key_fn=keyed_by("probe", probe_stage.probe_key))
@cancelled_by_prefect
def probe_task(data: DataRecord, model: ModelSection, quant: QuantSection, lora: LoraSection, training: TrainingSection, budget: BudgetSection, device: str, artifacts_dir: str) -> ProbeRecord:
    rec = probe_stage.probe_throughput(data, model, quant, lora, training, budget, device, artifacts_dir, log)
    log(f"probe: {rec.s_per_step:.3f} s/step, {rec.tokens_per_s:,.0f} tokens/s, peak {rec.peak_mem_gb:.2f} GB on {rec.hardware}; "
        f"budget {rec.budget_seconds:.0f}s - fixed {rec.fixed_seconds:.0f}s (load {rec.load_seconds:.1f}s, "
        + (f"first step +{rec.first_step_excess_seconds:.1f}s, " if rec.first_step_excess_seconds else "")
        + f"final save {rec.final_save_cost:.1f}s, "
        f"checkpoints {rec.save_seconds:.1f}s each) -> max_steps {rec.max_steps} ({rec.plan_words(short=True)}) at micro-batch {rec.micro_batch_size} x accum {rec.grad_accum}"
        + (f", {OFFLOAD_NOTE}" if rec.offload_activations else "")
        + (f", {rec.recompute_free_layers} layers without recompute" if rec.recompute_free_layers else "")
        + (f", decoder layers compiled ({rec.compile_seconds:.0f} s, in the fixed cost)" if rec.compile_layers else ""))
    trials = "\n".join(f"| {t['micro_batch_size']} | {t['grad_accum']} | {t['gradient_checkpointing']} | {t.get('recompute_free_layers', 0)} | "
                       f"{t.get('offload_activations', False)} | {t.get('compile_layers', False)} | {t.get('s_per_step', '-')} | {t.get('peak_mem_gb', '-')} | {t.get('fits')} {t.get('error', '')} |"
                       for t in rec.trials)
    create_markdown_artifact(
        key=artifact_key("probe-budget"),
        markdown=(f"## Step budget\n\n`max_steps = {rec.max_steps}`: at {rec.s_per_step:.3f} s/step after {rec.fixed_seconds:.1f}s fixed "
                  f"(load, " + ("the first step's excess over a step, " if rec.first_step_excess_seconds else "")
                  + f"final save, {rec.checkpoint_words}), {rec.plan_words()} "
                  f"(or training.max_steps, where that comes first)"
                  f"\n\nHardware: `{rec.hardware}`; {rec.tokens_per_s:,.0f} tokens/s; "
                  f"peak {rec.peak_mem_gb:.2f} GB" + (f"; {OFFLOAD_NOTE}" if rec.offload_activations else "") + ".\n\n"
                  f"| micro-batch | accum | checkpointing | layers without recompute | offloaded | compiled | s/step | peak GB | fits |\n"
                  f"|---|---|---|---|---|---|---|---|---|\n{trials}\n"),
        description="Throughput probe and step budget",
    )
    return rec



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper (no retries: a failed run resumes from its checkpoint when rerun)




@task(name="4-train", cache_key_fn=keyed_by("train", train_stage.cache_key))
@cancelled_by_prefect
def train_task(data: DataRecord, probe: Any, model: ModelSection, quant: QuantSection, lora: LoraSection, training: TrainingSection, artifacts_dir: str) -> TrainRecord | State:
    try:
        rec = train_stage.train_adapter(data, probe, model, quant, lora, training, artifacts_dir, log)
    except TrainingStopped as e:  # a stop signal, a checkpoint saved: Cancelled (raised, Prefect records it Crashed)
        if not in_flow_task_run():
            raise  # .fn() or outside a flow: the caller expects a record or the exception, not a state
        return cancelled_uncached(str(e))  # the flow turns it back into TrainingStopped (flows/finetune.py)
    log(f"train: {rec.steps}/{rec.max_steps} steps, {rec.tokens_seen:,} tokens, loss {rec.first_loss:.3f} -> {rec.final_loss:.3f}, "
        f"wall {rec.wall_seconds:.0f}s of {rec.budget_seconds:.0f}s budget ({rec.budget_error:+.1%}), stopped by {rec.stopped_by}"
        + (f", {rec.passes:.2f} passes over the training rows" if rec.passes is not None else ""))
    create_table_artifact(key=artifact_key("training"), table=[{k: v for k, v in rec.model_dump().items() if not isinstance(v, (dict, list))}],
                          description="Training outcome")
    create_markdown_artifact(key=artifact_key("loss-curve"), markdown="## Training loss\n\n" + png_markdown(rec.loss_curve_png, "loss curve"),
                             description="Loss curve")
    return rec



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper




@task(name="5-evaluate", cache_key_fn=keyed_by("eval", eval_stage.cache_key))
@cancelled_by_prefect
def evaluate_task(data: DataRecord, train, model: ModelSection, quant: QuantSection, eval: EvalSection, device: str, artifacts_dir: str,
                  system_prompt: str | None = None) -> EvalRecord:
    rec = eval_stage.evaluate_heldout(data, train, model, quant, eval, device, artifacts_dir, log, system_prompt=system_prompt)
    if rec.accuracy_gain is not None:
        log(f"evaluate: accuracy base {rec.base['accuracy']:.1%} {rec.base['ci']} -> tuned {rec.tuned['accuracy']:.1%} {rec.tuned['ci']} "
            f"(gain {rec.accuracy_gain:+.1%}, CI {rec.gain_ci}); beats base beyond CIs: {rec.beats_base}")
    log(f"evaluate: loss base {rec.base['loss']:.3f} -> tuned {rec.tuned['loss']:.3f}; stopped by EOS base {rec.base['eos_share']:.0%}, tuned {rec.tuned['eos_share']:.0%}")
    table = rec.per_family + ([{"family": "OVERALL", "n": rec.n_prompts, "base_accuracy": rec.base["accuracy"], "tuned_accuracy": rec.tuned["accuracy"],
                                "base_ci": rec.base["ci"], "tuned_ci": rec.tuned["ci"]}] if rec.per_family else
                              [{"metric": k, "base": rec.base[k], "tuned": rec.tuned[k]} for k in ("loss", "perplexity", "eos_share")])
    create_table_artifact(key=artifact_key("eval-base-vs-tuned"), table=table, description="Held-out accuracy per family, base vs tuned")
    samples = read_json(Path(rec.eval_json)).get("samples", [])[:eval.samples]  # all are stored; the report shows eval.samples
    create_markdown_artifact(key=artifact_key("eval-report"), markdown=eval_stage.markdown_report(rec, samples) + "\n\n" + png_markdown(rec.chart_png, "eval chart"),
                             description="Evaluation summary and samples")
    if rec.benchmarks or rec.verdict:
        for line in rec.verdict.get("lines", []):
            log(f"evaluate: {line}")
        create_markdown_artifact(key=artifact_key("eval-verdict"), markdown=eval_stage.benchmark_markdown(rec),
                                 description="Standard benchmarks base vs tuned, with the verdict and warnings")
    return rec



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper




@task(name="6-merge", cache_key_fn=keyed_by("merge", merge_stage.cache_key))
@cancelled_by_prefect
def merge_task(data: DataRecord, train, model: ModelSection, quant: QuantSection, merge: MergeSection, device: str, artifacts_dir: str) -> MergeRecord:
    rec = merge_stage.merge_adapter(data, train, model, quant, merge, device, artifacts_dir, log)
    create_markdown_artifact(
        key=artifact_key("merge-check"),
        markdown=(f"## Merge check\n\n{rec.merged_modules} LoRA modules merged in fp32 arithmetic into the base "
                  f"(dequantized from 4-bit: {rec.dequantized_from_4bit}), saved as `{rec.dtype}`. Reloaded from disk and compared "
                  f"with base + adapter on {rec.check_prompts} held-out prompts ({rec.check.positions} tokens):\n\n"
                  "| measure | value | limit |\n|---|---|---|\n"
                  f"| mean KL(base+adapter ‖ merged), nats/token | {rec.check.kl_mean:.2e} | ≤ {rec.check.limits['max_kl_mean']:.0e} |\n"
                  f"| top-1 agreement | {rec.check.top1_agreement:.2%} | ≥ {rec.check.limits['min_top1']:.0%} |\n"
                  f"| mean / max abs logit difference | {rec.check.mean_abs_diff:.2e} / {rec.check.max_abs_diff:.2e} | — |\n"
                  f"| adapter's own effect, KL(base+adapter ‖ base) | {rec.check.adapter_kl:.2e} | — |\n\n`{rec.merged_dir}`"),
        description="Merged model equivalence",
    )
    return rec



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper: cached on the content of what is published (not the run name), so a rerun with nothing
# changed points at the folder already published. The hub push retries inside; no task-level retries.





def _publish_key(context, parameters: dict[str, Any]) -> str:
    # The artifacts folder's tag as every other stage has it: a copy of artifacts/ (its .prefect-results too) got back
    # the record of the folder published in the original, and stage 8 then wrote this run's folder there.
    cfg = parameters["cfg"]
    return "publish-" + publish_stage.cache_key(cfg, parameters["records"]) + "-" + artifacts_tag(cfg.artifacts_dir)


@task(name="7-publish", cache_key_fn=_publish_key)
@cancelled_by_prefect
def publish_task(cfg: PipelineConfig, run_name: str, records: dict[str, Any]) -> PublishRecord:
    rec = publish_stage.publish_artifacts(cfg, run_name, records, log)
    log(f"publish: {rec.files} files ({rec.bytes / 2**20:.1f} MiB) in {rec.dir}" + (f"; pushed to {rec.pushed_to}" if rec.pushed_to else ""))
    create_link_artifact(key=artifact_key("published-model"), link=Path(rec.dir).resolve().as_uri(), link_text=rec.dir, description="Published run folder")
    if rec.push_error:
        raise StageError(rec.push_error)
    return rec



# ---------------------------------------------------------------------------------------------------------
# Prefect wrapper: keyed on the merged weights + published template + export settings + the published folder it
# completes (a folder published from an earlier run is copied into this run's, never rewritten). Retried once: the
# one-time converter download is I/O; a converter failure (unsupported architecture) is a StageError, not retried.


@task(name="8-export", cache_key_fn=keyed_by("export", export_stage.cache_key), retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retry_io_only)
@cancelled_by_prefect
def export_task(merge: MergeRecord, publish: PublishRecord, data: DataRecord, export: ExportSection, system_prompt: str | None, artifacts_dir: str,
                run_name: str | None = None, trust_remote_code: bool = False) -> ExportRecord:
    rec = export_stage.export_artifacts(merge, publish, data, export, system_prompt, artifacts_dir, log, run_name=run_name,
                                        trust_remote_code=trust_remote_code)
    made = [f"{t} {rec.gguf_bytes[t] / 2**20:.0f} MiB" for t in rec.gguf] + (["Modelfile"] if rec.modelfile else []) + (["GPTQ W4A16"] if rec.gptq_dir else [])
    log(f"export: {', '.join(made) or 'nothing (export.gguf=[], export.gptq=false)'} in {sum(rec.seconds.values()):.0f}s"
        + (f"; stop tokens {rec.stop_tokens}" if rec.modelfile else ""))
    if rec.gguf or rec.gptq_dir:
        create_markdown_artifact(key=artifact_key("export"), markdown=export_stage.deploy_section(Path(rec.published_dir), rec.installed()),
                                 description="Serving formats")
    return rec
