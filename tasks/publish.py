"""Stage 7 — publish one self-contained folder per run, optionally push it to the Hugging Face Hub; and chat.

`artifacts/runs/<run>/<output_name>/`: adapter (+ tokenizer and chat template), merged model, the resolved
pipeline.yaml, provenance (data hash, model fingerprint, keys), summary/eval JSON, plots, TensorBoard logs,
and a model card. The folder is assembled under a temporary name and renamed into place, with a
MANIFEST.json of file hashes written last: an interrupted publish never leaves a folder that looks
complete. The hub push (if configured) retries on its own and runs only after everything local is saved.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from . import evaluate as eval_stage
from .common import StageError, artifacts_root, building, disk_full, file_sha256, fingerprint, maybe_fault, read_json, safe_name, write_json
from .config import PipelineConfig

MANIFEST = "MANIFEST.json"
PUBLISH_VERSION = 2  # 2: the published chat template carries data.system_prompt
PUSH_ATTEMPTS = 3


class PublishRecord(BaseModel):
    dir: str
    adapter_dir: str
    merged_dir: str
    model_card: str
    files: int
    bytes: int
    pushed_to: str | None
    push_error: str | None

    def outputs_exist(self) -> bool:
        return is_published(Path(self.dir))


def lora_targets_markdown(train, lora) -> str:
    """What LoRA adapted and what it could not (stage 4's record; a record from before it was kept: the configured names)."""
    t = getattr(train, "lora_targets", None) or {}
    if not t:
        return ", ".join(lora.target_modules) if isinstance(lora.target_modules, list) else lora.target_modules
    line = ", ".join(t["modules"]) or "no linear layer"
    if t.get("parameters"):
        line += f" + the routed experts' weights {', '.join(t['parameters'])} ({t['experts']} experts a layer)"
    if t.get("not_adapted"):
        line += "; **not adapted**: " + "; ".join(t["not_adapted"])
    return line


def is_published(folder: Path) -> bool:
    """Complete = manifest present and every listed file there with its size."""
    man = folder / MANIFEST
    if not man.is_file():
        return False
    try:
        files = read_json(man)["files"]
    except (json.JSONDecodeError, KeyError, OSError):
        return False
    return all((folder / f["path"]).is_file() and (folder / f["path"]).stat().st_size == f["bytes"] for f in files)


def publish_artifacts(cfg: PipelineConfig, run_name: str, records: dict[str, Any], log_fn=None) -> PublishRecord:
    """Stage 7: assemble the run's folder atomically; then push to the hub if configured."""
    log_fn = log_fn or (lambda m: None)
    maybe_fault("publish")
    run_dir = artifacts_root(cfg.artifacts_dir) / "runs" / safe_name(run_name, "run name")
    final = run_dir / safe_name(cfg.output_name, "output_name")
    if not is_published(final):
        try:
            _assemble(cfg, run_name, records, final)
        except OSError as e:
            if not disk_full(e):
                raise
            raise StageError(f"disk full while publishing to {final} (the partial copy was removed); free some space and rerun "
                             "the same command: every finished stage is cached") from e
    files = read_json(final / MANIFEST)["files"]
    rec = PublishRecord(
        dir=str(final),
        adapter_dir=str(final / "adapter"),
        merged_dir=str(final / "merged"),
        model_card=str(final / "README.md"),
        files=len(files),
        bytes=sum(f["bytes"] for f in files),
        pushed_to=None,
        push_error=None,
    )
    if cfg.publish.hub_repo_id:
        try:
            rec.pushed_to = push_to_hub(final, cfg, log_fn)
        except StageError as e:
            rec.push_error = str(e)
    return rec


def _assemble(cfg: PipelineConfig, run_name: str, records: dict[str, Any], final: Path) -> None:
    with building(final, mark_complete=False) as tmp:  # the manifest, written last, is this folder's completeness record
        train, merge, evalr, data, prof, probe = (records[k] for k in ("train", "merge", "evaluate", "data", "profile", "probe"))
        shutil.copytree(train.adapter_dir, tmp / "adapter")
        shutil.copytree(merge.merged_dir, tmp / "merged")
        if cfg.data.system_prompt:
            # Training prepended this system turn to every chat; the published template adds it whenever a chat has
            # none, so `chat`, `transformers serve`, the GGUF and any user of the tokenizer prompt the model as trained.
            for folder in (tmp / "adapter", tmp / "merged"):
                install_system_prompt(folder, cfg.data.system_prompt)
        (tmp / "plots").mkdir()
        shutil.copy2(prof.histogram_png, tmp / "plots" / "length_histogram.png")
        shutil.copy2(train.loss_curve_png, tmp / "plots" / "loss_curve.png")
        shutil.copy2(evalr.chart_png, tmp / "plots" / "eval_chart.png")
        if Path(train.tensorboard_dir).is_dir():
            shutil.copytree(train.tensorboard_dir, tmp / "tensorboard")
        shutil.copy2(evalr.eval_json, tmp / "eval.json")
        (tmp / "pipeline.yaml").write_text(
            "# The resolved config of this run (defaults <- profile <- overrides).\n"
            + yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False), encoding="utf-8")
        provenance = {
            "run": run_name,
            "profile": cfg.profile,
            "base_model": cfg.model.name,
            "base_model_fingerprint": data.model_fingerprint,
            "data_source": data.source,
            "data_sources": data.sources,  # per source: file, sha256, license, rows used (data.mix)
            "data_dedupe": data.dedupe,  # benchmark prompts removed from the training data
            "data_hash": data.data_hash,
            "chat_template_hash": data.chat_template_hash,
            "stage_keys": {k: getattr(v, "key", None) for k, v in records.items()},
        }
        write_json(tmp / "provenance.json", provenance)
        write_json(tmp / "summary.json", {k: v.model_dump(mode="json") for k, v in records.items()})
        (tmp / "README.md").write_text(model_card(cfg, run_name, records, final), encoding="utf-8")
        # Manifest last: its presence (with matching sizes) is what "complete" means.
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / MANIFEST, {"files": [{"path": str(p.relative_to(tmp)), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]})


def model_card(cfg: PipelineConfig, run_name: str, records: dict[str, Any], final: Path) -> str:
    train, evalr, merge, data, probe = (records[k] for k in ("train", "evaluate", "merge", "data", "probe"))
    b, t = evalr.base, evalr.tuned
    base_for_snippet = cfg.model.name if not cfg.model.name.startswith(("pypi:", "random:")) else data.model_ref
    system = cfg.data.system_prompt
    sys_msg = f'{{"role": "system", "content": {json.dumps(system, ensure_ascii=False)}}},  # as in training\n            ' if system else ""
    sys_line = (f"\n- System prompt (every training chat began with it; the published chat template adds it when a chat has "
                f"no system turn): {json.dumps(system, ensure_ascii=False)}") if system else ""
    acc_rows = ""
    if "accuracy" in b:
        acc_rows = (f"| verifiable accuracy | {b['accuracy']:.1%} [{b['ci'][0]:.1%}, {b['ci'][1]:.1%}] | "
                    f"{t['accuracy']:.1%} [{t['ci'][0]:.1%}, {t['ci'][1]:.1%}] |\n")
    fam = ""
    if evalr.per_family:
        fam = "\n| family | n | base | tuned |\n|---|---|---|---|\n" + "".join(
            f"| {r['family']} | {r['n']} | {r['base_accuracy']:.0%} | {r['tuned_accuracy']:.0%} |\n" for r in evalr.per_family)
    return f"""---
library_name: peft
base_model: {cfg.model.name}
tags: [qlora, lora, sft, qlora-pipeline]
---

# {cfg.output_name}

LoRA adapter (and a merged {merge.dtype} copy) for **{cfg.model.name}**, trained by
qlora-pipeline (see the project's README.md) run `{run_name}` (profile `{cfg.profile}`).

## Training
- Data: `{data.source}`{' + ' + ', '.join(f'`{m.source}`' for m in cfg.data.mix) if cfg.data.mix else ''} — {data.n_train:,} training / {data.n_heldout:,} held-out conversations, data hash `{data.data_hash}`;
  loss on assistant tokens only, end-of-turn learned.{sys_line}
{data_sources_markdown(data)}- Recipe: {'NF4 4-bit base' + (' + double quant' if cfg.quant.double_quant else '') if train.engine and records['probe'].device == 'cuda' and cfg.quant.load_in_4bit else 'base in ' + str(merge.dtype)},
  LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout} on {lora_targets_markdown(train, cfg.lora)}
  ({train.trainable_params:,} trainable parameters); micro-batch {train.micro_batch_size} x accumulation {train.grad_accum};
  LR {cfg.training.learning_rate} {cfg.training.lr_scheduler}; engine `{train.engine}`.
- Time budget: {train.budget_seconds / 60:.1f} min on `{probe.hardware}`; the probe measured {probe.s_per_step:.3f} s/step and set
  {probe.max_steps} steps; trained {train.steps} steps ({train.tokens_seen:,} tokens) in {train.wall_seconds / 60:.1f} min
  (budget error {train.budget_error:+.1%}, stopped by {train.stopped_by}). Loss {train.first_loss:.3f} → {train.final_loss:.3f}.

## Evaluation (held-out prompts, greedy)
| metric | base | tuned |
|---|---|---|
| loss (assistant tokens) | {b['loss']:.3f} | {t['loss']:.3f} |
| perplexity | {b['perplexity']:.2f} | {t['perplexity']:.2f} |
{acc_rows}| stopped by EOS | {b['eos_share']:.0%} | {t['eos_share']:.0%} |
{fam}
{eval_stage.benchmark_markdown(evalr).replace("## ", "### ")}
Merge check ({merge.merged_modules} LoRA modules merged in fp32, saved {merge.dtype}; merged model reloaded from disk vs
base + adapter on {merge.check_prompts} held-out prompts): mean KL {merge.kl_mean:.2e} nats/token
(limit {merge.check.limits['max_kl_mean']:.0e}), top-1 agreement {merge.top1_agreement:.2%}, mean |Δlogit| {merge.mean_abs_diff:.2e};
the adapter's own effect on the same prompts is KL {merge.check.adapter_kl:.2e}.

## Use it
```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{final / 'adapter'}")  # base: {base_for_snippet}
tokenizer = AutoTokenizer.from_pretrained("{final / 'adapter'}")
messages = [{sys_msg}{{"role": "user", "content": "Write the word 'cat' in uppercase."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
Or the merged model: `AutoModelForCausalLM.from_pretrained("{final / 'merged'}")`, or `qlora-pipeline chat {run_name}`.

Files: `adapter/`, `merged/`, `pipeline.yaml` (resolved config), `provenance.json`, `eval.json`, `summary.json`,
`plots/`, `tensorboard/`, `MANIFEST.json` (sha256 of every file).
"""


def template_with_system(template: str, system_prompt: str) -> str:
    """`template`, rendering `system_prompt` as the system turn of any chat that has none (as training did).

    Prepended, not edited in: works for any template that reads `messages`; nothing is printed by the prefix.
    """
    literal = json.dumps(system_prompt, ensure_ascii=False)  # a valid Jinja string literal (HF and llama.cpp engines)
    return ("{%- if messages and messages[0]['role'] != 'system' %}"
            f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
            "{%- endif %}" + template)


def install_system_prompt(folder: Path, system_prompt: str) -> None:
    """Rewrite a saved tokenizer's chat template (chat_template.jinja and/or tokenizer_config.json) with the system prompt."""
    jinja, tcfg = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    done = False
    if jinja.is_file():
        jinja.write_text(template_with_system(jinja.read_text(encoding="utf-8"), system_prompt), encoding="utf-8")
        done = True
    if tcfg.is_file():
        conf = read_json(tcfg)
        if isinstance(conf.get("chat_template"), str):
            conf["chat_template"] = template_with_system(conf["chat_template"], system_prompt)
            tcfg.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            done = True
    if not done:
        raise StageError(f"{folder} has no chat template to carry data.system_prompt; the tokenizer must be saved with its template")


def data_sources_markdown(data) -> str:
    """Where each training source came from, its license, how many rows it gave, and the benchmark dedupe."""
    if not data.sources:
        return ""
    lines = ["", "| source | origin | license | sha256 | train | held-out |", "|---|---|---|---|---|---|"]
    for s in data.sources:
        sha = f"`{s['sha256'][:12]}…`" if s.get("sha256") else "—"
        lines.append(f"| `{s['source']}` | {s.get('origin') or s.get('dist') or s['source']} | {s.get('license') or 'see the source'} | "
                     f"{sha} | {s['n_train']:,} | {s['n_heldout']:,} |")
    d = data.dedupe
    if d.get("benchmarks"):
        bench = ", ".join(f"{k} ({v} prompts)" for k, v in d["benchmarks"].items())
        by = ", ".join(f"{k}: {v}" for k, v in d["removed_by"].items()) or "none matched"
        lines += ["", f"Never trained on an evaluation prompt: every conversation was checked against {bench}; a user turn matching "
                  f"a prompt ({'; '.join(d['rules'])}) removes the conversation. Removed: **{d['removed']}** ({by})."]
    else:
        lines += ["", "Benchmark dedupe was off (`data.dedupe: []`)."]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: Path, cfg: PipelineConfig, log_fn) -> str:
    """Upload the adapter (and merged model if configured); the token comes from the environment only."""
    token = os.environ.get(cfg.publish.token_env)
    repo = cfg.publish.hub_repo_id
    if not token:
        raise StageError(f"publish.hub_repo_id is set but ${cfg.publish.token_env} is empty; export a write token (local files are saved)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    ignore = None if cfg.publish.push_merged else ["merged/*"]
    last = None
    for attempt in range(1, PUSH_ATTEMPTS + 1):
        try:
            api.create_repo(repo, private=cfg.publish.private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=str(folder), ignore_patterns=ignore, commit_message=f"qlora-pipeline {folder.name}")
            return f"https://huggingface.co/{repo}"
        except Exception as e:  # network errors come in many classes
            last = e
            log_fn(f"publish: push attempt {attempt}/{PUSH_ATTEMPTS} failed ({type(e).__name__})")
            if attempt < PUSH_ATTEMPTS:
                time.sleep(min(2 ** attempt, 10))
    raise StageError(f"cannot push to the hub repo {repo!r} ({type(last).__name__}); everything is saved locally in {folder} — retry when online")


# ---------------------------------------------------------------------------------------------------------
# chat


def find_run(run: str | None, artifacts_dir: str) -> Path:
    root = artifacts_root(artifacts_dir)
    if run is None:
        latest = root / "latest.json"
        if not latest.is_file():
            raise StageError(f"no runs in {root}; run `qlora-pipeline run` first or name a run")
        run = read_json(latest)["run"]
    run_dir = root / "runs" / safe_name(run, "run")
    # A fully cached rerun publishes nothing new: its summary points at the folder an earlier run published.
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            published = read_json(summary).get("published")
        except (json.JSONDecodeError, OSError):
            published = None
        # Only a folder inside this artifacts root: a summary never sends `chat` or `serve-model` elsewhere.
        if published and Path(published).resolve().is_relative_to(root.resolve() / "runs") and is_published(Path(published)):
            return Path(published)
    candidates = [p for p in run_dir.iterdir() if p.is_dir() and is_published(p)] if run_dir.is_dir() else []
    if not candidates:
        raise StageError(f"run {run!r} has no published model under {run_dir}; finish it with `qlora-pipeline run` (it resumes)")
    return candidates[0]


def chat(run: str | None, prompt: str | None, *, merged: bool = False, max_new_tokens: int = 256, artifacts_dir: str = "artifacts") -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    folder = find_run(run, artifacts_dir)
    path = folder / ("merged" if merged else "adapter")
    tok = AutoTokenizer.from_pretrained(str(path))
    if merged:
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)
    else:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    stops = read_json(folder / "summary.json")["data"]["stop_token_ids"]
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        enc = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id, streamer=streamer)
        reply = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        history.append({"role": "assistant", "content": reply})

    if prompt is not None:
        answer(prompt)
        return 0
    print(f"chatting with {folder.name} ({'merged' if merged else 'adapter'}); empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        answer(text)
    return 0


def cache_key(cfg: PipelineConfig, records: dict[str, Any]) -> str:
    """Content of what is published (config without the budget + upstream keys), not the run name."""
    # The export section is stage 8's: changing it re-exports into the same published folder, it does not republish.
    return fingerprint("publish", PUBLISH_VERSION, cfg.model_dump(mode="json", exclude={"budget", "export"}), {k: getattr(v, "key", None) for k, v in records.items()})
