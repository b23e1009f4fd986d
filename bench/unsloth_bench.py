"""Issue 19 item 6: Unsloth on exactly the workload of bench/gpu_bench.py, in its own process and package set.

The same as gpu_bench (the shared pieces live in bench/workload.py): the random-weight checkpoint of Mistral-7B-v0.1 or
Llama-3.1-8B shapes (`--shapes`, `--layers`), in the same folder under `--workdir` (written once per machine by
whichever script runs first); NF4 + double quant with bf16 compute; LoRA r16 / alpha 32 / dropout 0.05 on
q,k,v,o,gate,up,down; micro-batches of 4 x 4 accumulation, max length 2,048; the optimizer (`--optim`,
paged_adamw_8bit), lr 2e-4; the "full" (every sample 2,048 tokens) and "mixed" (log-normal lengths) sets from the same
seeds, read in the same order (a sequential sampler, as gpu_bench's); `--warmup` untimed optimizer steps, then timed
ones; real tokens/s excluding padding; peak GiB from torch.cuda.max_memory_allocated, under the same 15 GiB allocator
cap (the 16 GB fit check); per-step losses. Every run starts from the same LoRA weights (re-initialised under the seed).

Unsloth's own, as its docs and notebooks use it: FastLanguageModel.from_pretrained(folder, load_in_4bit=True,
max_seq_length=2048, dtype=bfloat16) (its NF4 load is bitsandbytes nf4 + double quant, bf16 compute: recorded as
`quantization`); FastLanguageModel.get_peft_model(..., use_gradient_checkpointing="unsloth") (its checkpointing with
the layer inputs offloaded to host memory; its fused LoRA kernels, which since 2026 run dropout > 0 inside them, so
dropout 0.05 stays on its fast path); TRL's SFTTrainer as `import unsloth` patches it (processing_class = the
tokenizer Unsloth loaded from the folder: the word-level one of workload.build_tokenizer, saved there).

Batching, Unsloth's best documented single-GPU settings for each set:
  unsloth-full          padding_free=True: 4 rows of 2,048 per micro-batch concatenated (no pad tokens either way)
  unsloth-mixed         padding_free=True, packing=False: the same 4 rows per micro-batch as gpu_bench's seed-mixed,
                        concatenated without padding, their lengths passed to Unsloth's varlen attention. This is what
                        an Unsloth user gets: its SFTTrainer turns padding-free on when `padding_free` is left unset
                        ("Padding-free auto-enabled"). Unsloth 2026.10's auto rule may pick padded batches + per-block
                        compile instead, but only on GPUs it measured (T4, A100, L4, RTX PRO 6000); on H100/H200 (sm90)
                        it keeps padding-free. Set explicitly here so the run does not depend on that rule.
  unsloth-packed-mixed  (--runs packed) packing=True: TRL's BFD packs of up to 2,048 tokens, 4 per micro-batch
                        (~8,192 tokens), Unsloth's "Packing enabled - training is >2x faster" setting. It changes which
                        samples share a step (so its losses do not pair with seed-mixed's), and is the closer analogue
                        of gpu_bench's fast/fused packs of <= 4 x 2,048 tokens.
Each record says what the trainer actually ran with (`padding_free`, `packing` after Unsloth's init) and whether the
tokens it counted equal the rows it was given (`tokens_match`).

Unsloth must be imported before transformers, trl and peft in its process, and it needs its own package set
(trl <= 1.15, datasets < 5): /work/shared/gpu/unsloth_wheels.sh. Here, once, from the repository root:

    bash ../shared/gpu/wheels.sh && bash ../shared/gpu/unsloth_wheels.sh     # .whl and .whl_u (git-ignored)

On the GPU machine (carry [".whl", ".whl_u"]); Unsloth alone:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_u \\
      .whl_u/*.whl $(ls .whl/*.whl | grep -v -E "/(trl|datasets|liger)") \\
    && PYTHONPATH=/tmp/site_u UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \\
       python3 bench/unsloth_bench.py --runs full,mixed,packed --out $OUT

Side by side in one call (gpu_bench writes the random checkpoint, Unsloth reads the same folder; each bench runs even
if the other failed, then one table with ratios to Unsloth):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \\
    && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site_u \\
      .whl_u/*.whl $(ls .whl/*.whl | grep -v -E "/(trl|datasets|liger)") || exit
    export PYTHONUNBUFFERED=1 UNSLOTH_DISABLE_STATISTICS=1 HF_HUB_OFFLINE=1
    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_bench.py --runs seed,fused --out $OUT
    PYTHONPATH=/tmp/site_u python3 bench/unsloth_bench.py --runs full,mixed,packed --out $OUT
    python3 bench/unsloth_table.py $OUT/results.json $OUT/unsloth.json --out $OUT/unsloth_table.md

A run that fails (an out-of-memory error under the cap, say) is a result in unsloth.json, as in gpu_bench; the exit
status is non-zero only when the bench itself could not start (no Unsloth, a bad flag).

Without a GPU (no torch, transformers or Unsloth imported): the plan, the rows each run reads and their tokens.

    python bench/unsloth_bench.py --dry
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workload import (  # noqa: E402  (numpy only: nothing here may import transformers before unsloth)
    ACCUM,
    CAP_GIB,
    GIB,
    LORA,
    MAX_LEN,
    MICRO,
    OPTIM,
    SHAPES,
    WORKDIR,
    build_tokenizer,
    checkpoint_dir,
    log,
    mixed_stats,
    synthetic_sets,
    trainer_classes,
    versions,
    write_random_checkpoint,
)

# family -> (run name, data set, the SFTConfig batching keys, what the table calls it)
RUNS = {
    "full": ("unsloth-full", "full", {"padding_free": True}, "padding-free"),
    "mixed": ("unsloth-mixed", "mixed", {"padding_free": True}, "padding-free"),
    "packed": ("unsloth-packed-mixed", "mixed", {"packing": True}, "packing (BFD, <= 2,048-token packs)"),
}
LOADED_FIRST = ("transformers", "trl", "peft")  # what `import unsloth` has to precede


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench"), help="folder; unsloth.json is written there")
    ap.add_argument("--optim", default=OPTIM, help="TrainingArguments.optim of every run (as gpu_bench's --optim)")
    ap.add_argument("--shapes", default="mistral-7b", choices=sorted(SHAPES), help="model shapes (random weights)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first --warmup untimed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", default="full,mixed", help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default=WORKDIR, help="the random checkpoint's folder, shared with bench/gpu_bench.py")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: start no run once this much has passed since launch (the ones done are written out)")
    ap.add_argument("--dry", action="store_true", help="print the plan and the rows each run reads; no GPU, no Unsloth")
    a = ap.parse_args(argv)
    a.families = [f for f in a.runs.split(",") if f]
    unknown = [f for f in a.families if f not in RUNS]
    if unknown or not a.families:
        ap.error(f"--runs {a.runs!r}: unknown run {', '.join(unknown) or '(none given)'}; "
                 f"choose from {', '.join(RUNS)}")
    if a.layers < 1:
        ap.error(f"--layers {a.layers}: needs at least 1")
    if not 0 <= a.warmup < a.steps:
        ap.error(f"--warmup {a.warmup} with --steps {a.steps}: needs 0 <= warmup < steps "
                 "(the timed steps are the rest)")
    return a


# ---------------------------------------------------------------------------------------------- plan


def plan(a: argparse.Namespace, full: dict, mixed: dict) -> list[dict]:
    """What each run reads. Padded and padding-free micro-batches take MICRO rows in order, so `steps` optimizer steps
    read the first MICRO x ACCUM x steps rows; packing reads as many rows as fill 4 x 2,048-token packs per micro-batch."""
    sets = {"full": full, "mixed": mixed}
    n_rows = MICRO * ACCUM * a.steps
    out = []
    for family in a.families:
        name, data, batching, label = RUNS[family]
        rows = sets[data]["rows"]
        entry = {"name": name, "family": family, "data": data, "batching": label, "sft_config": batching}
        if "packing" in batching:
            entry.update(rows=None, tokens=None)  # TRL's packer decides which rows fill each pack
        else:
            entry.update(rows=n_rows, tokens=sum(len(r["input_ids"]) for r in rows[:n_rows]))
        out.append(entry)
    return out


def print_plan(a: argparse.Namespace, runs: list[dict], mixed: dict) -> None:
    path = checkpoint_dir(Path(a.workdir), a.shapes, a.layers)
    state = "present" if (path / "config.json").exists() else "absent: the first GPU run writes it"
    print(f"unsloth_bench plan (--dry: nothing loaded, no GPU)\n"
          f"  checkpoint {path} ({state}); tokenizer saved beside it for Unsloth's load\n"
          f"  {a.shapes} shapes, {a.layers} layers, NF4 + double quant, bf16; LoRA r{LORA['r']}/a{LORA['lora_alpha']}/"
          f"dropout {LORA['lora_dropout']} on {len(LORA['target_modules'])} projections; micro {MICRO} x accum {ACCUM}, "
          f"max_len {MAX_LEN}, {a.optim}, use_gradient_checkpointing=\"unsloth\", allocator cap {CAP_GIB:g} GiB\n"
          f"  {a.steps} optimizer steps per run, the first {a.warmup} untimed; mixed set "
          f"{ {k: round(v, 1) for k, v in mixed_stats(mixed['lengths']).items()} }")
    for r in runs:
        reads = (f"{r['rows']} rows, {r['tokens']:,} tokens" if r["rows"] is not None
                 else "rows as TRL's BFD packer fills the packs")
        print(f"  {r['name']}: {r['data']} data, {r['batching']} ({r['sft_config']}): {reads}")


# ---------------------------------------------------------------------------------------------- model


def import_unsloth():
    """`import unsloth` ahead of transformers, trl and peft (it patches them as they load); a process that has them
    already gets one line saying so instead of a quietly unpatched run."""
    early = [m for m in LOADED_FIRST if m in sys.modules]
    if early:
        raise SystemExit(f"unsloth_bench: {', '.join(early)} imported before unsloth; run this file as its own process")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # no hub call from an offline machine
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import unsloth
    except ImportError as e:
        raise SystemExit(f"unsloth_bench: cannot import unsloth ({e}); install its package set as this file's "
                         "docstring says (../shared/gpu/unsloth_wheels.sh, PYTHONPATH=/tmp/site_u)") from e
    return unsloth


def load_model(a: argparse.Namespace, vocab: int):
    """The shared random checkpoint (written here if absent) with the word-level tokenizer saved beside it, loaded the
    Unsloth way, with LoRA attached. Returns (model, tokenizer, facts for the record)."""
    import torch
    from unsloth import FastLanguageModel

    path = write_random_checkpoint(a.layers, Path(a.workdir), a.shapes)
    if not (path / "tokenizer_config.json").exists():  # Unsloth loads the tokenizer from the model's folder
        build_tokenizer(vocab).save_pretrained(path)
    t = time.time()
    model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=MAX_LEN, dtype=torch.bfloat16,
                                                   load_in_4bit=True)
    facts = {"load_s": round(time.time() - t, 1), "model_gib": torch.cuda.memory_allocated() / GIB,
             "quantization": quantization(model)}
    model = FastLanguageModel.get_peft_model(model, **LORA, use_gradient_checkpointing="unsloth", random_state=a.seed)
    log(f"Unsloth NF4 model loaded in {facts['load_s']:.0f}s, {facts['model_gib']:.2f} GiB; quantization "
        f"{facts['quantization']}")
    return model, tok, facts


def quantization(model) -> dict | None:
    """The loaded model's bitsandbytes settings: the check that Unsloth's 4-bit load is gpu_bench's NF4 + double quant."""
    q = getattr(model.config, "quantization_config", None)
    if q is None:
        return None
    try:
        q = q if isinstance(q, dict) else q.to_dict()
    except Exception as e:  # noqa: BLE001  (a record field, not worth a failed run)
        return {"error": f"{type(e).__name__}: {e}"}
    return {k: str(q.get(k)) for k in ("quant_method", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                                       "bnb_4bit_compute_dtype")}


def reset_lora(model, seed: int) -> int:
    """PEFT's default LoRA init again (A kaiming-uniform, B zero) under `seed`, in place: every run starts from the same
    adapter, as gpu_bench's do (it builds a fresh one per run). Returns how many LoRA layers were reset."""
    import torch

    n = 0
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and isinstance(lora_b, torch.nn.ModuleDict):
                for key in lora_a:
                    torch.nn.init.kaiming_uniform_(lora_a[key].weight, a=math.sqrt(5))
                    torch.nn.init.zeros_(lora_b[key].weight)
                    n += 1
    if n == 0:
        raise RuntimeError("no LoRA layers found on the Unsloth model (get_peft_model attached none?)")
    return n


# ---------------------------------------------------------------------------------------------- runs


def run(entry: dict, rows: dict, model, tok, a: argparse.Namespace) -> dict:
    """Train `a.steps` optimizer steps; time the last `a.steps - a.warmup`; return a record with gpu_bench's fields."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig

    BenchTrainer, StepTimer = trainer_classes()  # bench/workload.py
    name = entry["name"]
    record = {"name": name, "engine": "unsloth", "data": entry["data"], "batching": entry["batching"],
              "capped_gib": CAP_GIB, "n_recompute_free": 0, "gradient_checkpointing": "unsloth", "offload": False,
              "steps": a.steps, "warmup": a.warmup}
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / total))
    args = dict(output_dir=f"/tmp/bench_out/{name}", max_steps=a.steps, per_device_train_batch_size=MICRO,
                gradient_accumulation_steps=ACCUM, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                report_to="none", bf16=True, optim=a.optim, max_length=MAX_LEN, seed=a.seed, dataloader_num_workers=0,
                disable_tqdm=True, **entry["sft_config"])
    dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows["rows"]]})  # as gpu_bench's seed runs
    timer = StepTimer()
    trainer = None
    try:
        record["lora_layers_reset"] = reset_lora(model, a.seed)
        torch.manual_seed(a.seed)  # dropout masks: the same stream for every run
        trainer = BenchTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tok,
                               callbacks=[timer])
        timer.trainer = trainer
        record.update(padding_free=bool(getattr(trainer.args, "padding_free", False)),
                      packing=bool(getattr(trainer.args, "packing", False)))
        wanted = entry["sft_config"]
        if any(record[k] != v for k, v in wanted.items()):  # Unsloth turns them off where it cannot use them
            log(f"{name}: asked for {wanted}, the trainer runs with padding_free={record['padding_free']}, "
                f"packing={record['packing']}")
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        record["start_gib"] = torch.cuda.memory_allocated() / GIB
        try:
            trainer.train()
        finally:
            timer.pauses.stop()  # on_train_end does not run when training raises
        timed = timer.steps[a.warmup:a.steps]
        secs = sum(s["s"] for s in timed)
        tokens = sum(s["tokens"] for s in timed)
        counted = sum(s["tokens"] for s in timer.steps)
        record.update(
            ok=True,
            tokens_per_s=tokens / secs,
            slots_per_s=sum(s["slots"] for s in timed) / secs,
            padding_share=1 - tokens / max(1, sum(s["slots"] for s in timed)),
            step_s=[round(s["s"], 3) for s in timer.steps],
            step_gc_s=[s["gc_s"] for s in timer.steps],  # the garbage collector's seconds in each step, by generation
            step_tokens=[s["tokens"] for s in timer.steps],
            tokens_expected=entry["tokens"],
            tokens_match=None if entry["tokens"] is None else counted == entry["tokens"],
            peak_gib=torch.cuda.max_memory_allocated() / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
            losses=[h["loss"] for h in trainer.state.log_history if "loss" in h][:a.steps],
        )
        if record["tokens_match"] is False:
            log(f"{name}: counted {counted:,} tokens over the {a.steps} steps, the rows hold {entry['tokens']:,}")
        log(f"{name}: {record['tokens_per_s']:,.0f} real tok/s, peak {record['peak_gib']:.2f} GiB, "
            f"steps {record['step_s']}, losses {[round(x, 4) for x in record['losses']]}")
    except Exception as e:  # an OOM under the cap is a result ("does not fit"), not a crash
        record.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}",
                      peak_gib=torch.cuda.max_memory_allocated() / GIB)
        log(f"{name}: FAILED {record['error']}")
        traceback.print_exc()
    finally:
        if trainer is not None:
            trainer.optimizer = trainer.lr_scheduler = None
            trainer.accelerator.free_memory()
        del trainer
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return record


def summary(results: list[dict], gpu: str) -> str:
    lines = [f"GPU: {gpu}", "| run | batching | data | real tokens/s | peak GiB | 16 GiB cap |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if r.get("ok"):
            lines.append(f"| {r['name']} | {r['batching']} | {r['data']} | {r['tokens_per_s']:,.0f} | "
                         f"{r['peak_gib']:.2f} | fits |")
        else:
            lines.append(f"| {r['name']} | {r['batching']} | {r['data']} | failed: {r['error'][:60]} | "
                         f"{r.get('peak_gib', 0):.2f} | - |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    t_start = time.time()
    vocab = SHAPES[a.shapes][1]["vocab_size"]
    full, mixed = synthetic_sets(a.steps, a.seed, vocab)
    runs = plan(a, full, mixed)
    if a.dry:
        print_plan(a, runs, mixed)
        return 0

    unsloth = import_unsloth()
    model, tok, facts = load_model(a, vocab)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"versions": {**versions(), "unsloth": unsloth.__version__}, "shapes": a.shapes, "optim": a.optim,
            "layers": a.layers, "steps": a.steps, "warmup": a.warmup, "date": time.strftime("%Y-%m-%d"),
            "recipe": f"Unsloth FastLanguageModel NF4 (4-bit, bf16), LoRA r16/a32/dropout0.05 on 7 proj, "
                      f"use_gradient_checkpointing=unsloth, micro {MICRO} x accum {ACCUM}, max_len {MAX_LEN}, "
                      f"{a.optim}, TRL SFTTrainer as Unsloth patches it",
            "cap_gib": CAP_GIB, "mixed": mixed_stats(mixed["lengths"]), **facts,
            "unsloth_env": {k: v for k, v in os.environ.items() if k.startswith("UNSLOTH_")}}
    log(json.dumps(info["versions"]))
    sets = {"full": full, "mixed": mixed}
    results: list[dict] = []
    last_run_s = 0.0  # the previous run's duration: a run that would end past the budget does not start
    for entry in runs:
        used = time.time() - t_start
        if a.time_budget is not None and used + last_run_s > a.time_budget:
            log(f"{entry['name']}: skipped, {used:.0f}s used + ~{last_run_s:.0f}s for it > the "
                f"{a.time_budget:.0f}s budget")
            info.setdefault("skipped_for_time", []).append(entry["name"])
            continue
        t_run = time.time()
        record = run(entry, sets[entry["data"]], model, tok, a)
        last_run_s = time.time() - t_run
        record["run_s"] = round(last_run_s, 1)
        results.append(record)
        (out / "unsloth.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    (out / "unsloth.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    print("\n" + summary(results, info["versions"]["gpu"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
