"""The `finetune` flow: eight cached stages, wired the way you would draw them.

    data -> profile -> probe -> train -> evaluate -> merge -> publish -> export

Export (GGUF, Ollama Modelfile, opt-in GPTQ) is its own stage after publish rather than part of it: it can fail
on things publish should not (an architecture llama.cpp's converter lacks), it retries without republishing,
and changing `export.*` redoes only it; it adds its files to the published folder and its manifest.

Run it with `qlora-pipeline run --profile demo` (or `make run`), deploy it as `flows/finetune.py:finetune`.
Every stage is a Prefect task keyed on content, so a rerun reuses what is done and resumes where it stopped.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.common import artifacts_root, human_seconds, safe_name, write_json
from tasks.config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from tasks.preflight import check_model
from tasks.prefect_glue import task_options
from tasks.stages import data_task, evaluate_task, export_task, merge_task, probe_task, profile_task, publish_task, train_task


def _run_name() -> str:
    p = flow_run.parameters
    budget = budget_label(p.get("hours"), p.get("minutes"))
    if budget is None:  # the budget comes from the profile (or --set budget.*): name that one
        try:
            b = load_config(p.get("config_path") or DEFAULT_CONFIG_PATH, p.get("profile"), p.get("overrides") or []).budget
            budget = budget_label(b.hours, b.minutes)
        except ConfigError:
            budget = None  # the flow reports the config error itself
    budget = budget or "no-budget"
    # The flow-run id's head keeps two runs started in the same second (same artifacts/) in distinct folders.
    unique = str(flow_run.id or "")[:4]
    return safe_name(f"{p.get('profile') or 'default'}-{budget}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{unique}")


def budget_label(hours: float | None, minutes: float | None) -> str | None:
    """`4h`, `5m`, `1h30m`; None when neither is set."""
    label = (f"{hours:g}h" if hours else "") + (f"{minutes:g}m" if minutes else "")
    return label or None


class RunSummary:
    """Stage -> status, cached, seconds, key outputs; written to artifacts/runs/<run>/summary.json."""

    def __init__(self, artifacts_dir: str, run_name: str, config: dict[str, Any]):
        self.root = artifacts_root(artifacts_dir)
        self.run_dir = self.root / "runs" / safe_name(run_name, "run name")
        self.data: dict[str, Any] = {
            "run": run_name, "started": _now(), "status": "running", "stages": {}, "config": config,
            "summary_path": str(self.run_dir / "summary.json"),
        }

    def stage(self, name: str, task, *args, **kwargs):
        """Run one stage task; a cached result whose files are gone is recomputed, not trusted."""
        t0 = time.monotonic()
        entry = self.data["stages"].setdefault(name, {})
        try:
            state = task(*args, return_state=True, **kwargs)
            record = state.result()
            cached = state.name == "Cached"
            if cached and not record.outputs_exist():
                state = task.with_options(refresh_cache=True)(*args, return_state=True, **kwargs)
                record, cached = state.result(), False
        except BaseException as e:
            entry.update(status="failed", seconds=round(time.monotonic() - t0, 2), error=f"{type(e).__name__}: {e}")
            self.finish("failed")
            raise
        entry.update(status="completed", cached=cached, seconds=round(time.monotonic() - t0, 2), outputs=record.model_dump(mode="json"))
        self.write()
        return record

    def finish(self, status: str) -> None:
        self.data.update(status=status, finished=_now())
        self.write()

    def write(self) -> None:
        write_json(self.run_dir / "summary.json", self.data)
        write_json(self.root / "latest.json", {"run": self.data["run"], "summary": str(self.run_dir / "summary.json"), "status": self.data["status"]})


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@flow(name="finetune", flow_run_name=_run_name, validate_parameters=True)
def finetune(
    profile: str | None = None,
    hours: float | None = None,
    minutes: float | None = None,
    overrides: list[str] | None = None,
    config_path: str | None = None,
) -> dict[str, Any]:
    """QLoRA-finetune a base model into an instruction follower within a time budget.

    profile: a profile of pipeline.yaml (demo, tiny, mistral-7b, ...); hours/minutes: the training budget;
    overrides: `dotted.key=value` settings; config_path: another pipeline.yaml.
    """
    cfg = load_config(config_path or DEFAULT_CONFIG_PATH, profile, overrides or [], hours, minutes)
    art = cfg.artifacts_dir
    opts = task_options(art)
    for line in check_model(cfg.model, cfg.lora, cfg.quant, cfg.device, art):  # model-dependent checks: seconds, before stage 1
        get_run_logger().info(line)
    run = RunSummary(art, flow_run.name or _run_name(), cfg.model_dump(mode="json", by_alias=True))

    data = run.stage("data", data_task.with_options(**opts), cfg.data, cfg.model, art)
    prof = run.stage("profile", profile_task.with_options(**opts), data, art)
    probe = run.stage("probe", probe_task.with_options(**opts), data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, cfg.device, art)
    train = run.stage("train", train_task.with_options(**opts), data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    evalr = run.stage("evaluate", evaluate_task.with_options(**opts), data, train, cfg.model, cfg.quant, cfg.eval, cfg.device, art,
                      cfg.data.system_prompt)
    merged = run.stage("merge", merge_task.with_options(**opts), data, train, cfg.model, cfg.quant, cfg.merge, cfg.device, art)
    records = {"data": data, "profile": prof, "probe": probe, "train": train, "evaluate": evalr, "merge": merged}
    published = run.stage("publish", publish_task.with_options(**opts), cfg, run.data["run"], records)
    run.data["published"] = published.dir
    run.stage("export", export_task.with_options(**opts), merged, published, data, cfg.export, cfg.data.system_prompt, art)

    run.finish("completed")
    total = sum(s["seconds"] for s in run.data["stages"].values())
    get_run_logger().info(f"finetune: done in {human_seconds(total)}; summary: {run.run_dir / 'summary.json'}")
    return run.data
