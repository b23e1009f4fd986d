"""Issue 6 benchmark: the seed QLoRA recipe and the project's fast engine, back to back on one GPU.

Builds the Mistral-7B-v0.1 architecture (`--shapes llama-3.1-8b`: Llama-3.1-8B's, a 128k vocabulary) with random
weights (no download), quantizes it to NF4 through
bitsandbytes, and trains LoRA r16 on q,k,v,o,gate,up,down through TRL's SFTTrainer on two synthetic sets:
"full" (every sample 2,048 tokens) and "mixed" (log-normal lengths, median ~500, p95 ~1,700, capped at 2,048).
Prints one table (real tokens/s excluding padding, peak memory, ratio to the seed on the same data) and the
loss-curve parity between the seed and the fast engine on the same micro-batches; writes everything as JSON.

    PYTHONUNBUFFERED=1 python bench/gpu_bench.py --out "$OUT"          # full run, ~8 min on one H100/H200
    python bench/gpu_bench.py --smoke --out /tmp/bench                  # 4 layers, 3 steps: plumbing check

Runs, in this order (Liger patches the model class, so every run after it has it):
  seed        SFTTrainer defaults: padded micro-batches of 4, sdpa, full recompute (the seed recipe)
  varlen      + padding-free packs of <= 4 x 2048 tokens, flash varlen attention (no Liger yet)
  fast        + Liger RMSNorm / SwiGLU / RoPE: the project's engine, full recompute (the <= 8 GB setting)
  fused       fast + the fused LoRA path (tasks/engine/lora.py): one LoRA-A matmul per shared input, LoRA-B
              added in place into the base output, dropout masks regenerated from a seed (issue 14)
  fusedstored the fused path with torch's dropout instead, dropped input + mask kept for backward as PEFT does
              (`fuse_lora(model, dropout="stored")`): the comparison for the seeded kernel
  fusedinmatmul the fused path with the dropout mask made inside the LoRA-A matmuls (`fuse_lora(model,
              dropout="inmatmul")`, tasks/engine/lora_kernels.py): no dropout pass of its own
  offload     fast, with the checkpointed layer inputs held in pinned host memory (transformers' offload=True)
  fused-offload fused, with the checkpointed layer inputs in pinned host memory through the pipeline's own
              `offload_checkpoints` (TRL's manager, copies on a side stream; training.offload_activations): issue 19.3
  varlen-compile varlen (PEFT's LoRA, no Liger yet) with each decoder layer compiled by the pipeline's own
              `compile_for_training` (training.compile: layers; inductor fuses the norms, RoPE and SwiGLU itself): issue 19.2
  fused-compile fused with each decoder layer compiled (the pipeline's default engine + training.compile: layers;
              inside a compiled layer the fused LoRA path hands over to PEFT's forward, Liger's kernels stay): issue 19.2
  fit16       fast, with the layers that a 16 GB card can hold freed from recompute (auto-fit from two probes)
  nockpt      fast, with as many layers as 90% of this card holds freed from recompute (large cards)
With --profile every run trains one more step under torch.profiler and records where that step's GPU time
goes (bench/profile_gpu.py: kernel time by category, idle gaps); the table lands in profile.md. The issue-14
side-by-side (one device call, < 9 min on an H200):

    python bench/gpu_bench.py --runs seedfull,fast,fused --profile --steps 5 --out "$OUT"

The issue-14 follow-up (seeded-dropout v2 against fast and the stored variant; only fused-full profiled; no run
starts that would end past 270 s, judged by the previous run's duration, so the call stays under 5 minutes with
whatever finished written out):

    python bench/gpu_bench.py --runs fast,fused,fusedstored --profile-runs fused-full --steps 5 --time-budget 270 --out "$OUT"

Dropout inside the LoRA-A matmuls against the seeded kernel's passes, full length and mixed (the in-matmul kernels are
first checked against the torch reference and timed alone: bench/graph_step.py `inmatmul_check`, in results.json's info):

    python bench/gpu_bench.py --runs fused,fusedinmatmul --out "$OUT"

Issue 19.3, TRL's side-stream offload against transformers' on the compute stream and the fused engine without either
(one device call):

    python bench/gpu_bench.py --runs fused,offload,fused-offload --out "$OUT"

The same offload with other settings in one call: each --offload-kwargs (a JSON object for `offload_checkpoints`: TRL's
max_fwd_stash_size, min_offload_size, ...; the pipeline's opt-in `prefetch`, which starts the backward's host-to-device
copies ahead of autograd) is one run, fused-offload-full, fused-offload-full-v1, ...:

    python bench/gpu_bench.py --runs fused,fused-offload --data full --optim adamw_torch_fused --trainer plain --full-rows \
        --offload-kwargs '{}' --offload-kwargs '{"prefetch": true}' --out "$OUT"

Issue 19.2, regional compilation against the same engine eager, both profiled (kernels per step, idle, host-bound gaps;
a compiled run records its compile seconds, the graphs its warm-up compiled, any compiled in the timed steps, the
layer calls there that no graph fitted (run eagerly) with the guards the first of them failed (`compile_eager_reason`:
torch logs no recompile reason under the stance that runs them eagerly) and every graph break by reason; the warm-up
runs through the trainer's own compute_loss, so its graphs see the steps' keyword arguments):

    python bench/gpu_bench.py --runs fused,fused-compile,varlen-compile --profile-runs fused-full,fused-compile-full --out "$OUT"

Runs marked `capped` execute with the allocator limited to 15 GiB (a 16 GiB card less CUDA context): they
finishing is the 16 GB fit check.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.profile_gpu import markdown as profile_markdown  # noqa: E402
from bench.profile_gpu import step_profiler  # noqa: E402
from tasks.engine.lora import dropout_backend, fuse_lora  # noqa: E402
from tasks.models import enable_checkpointing  # noqa: E402
from tasks.engine.fastpath import (  # noqa: E402
    PaddingFreeCollator,
    fast_attn_implementation,
    pack_by_tokens,
    packed_hf_dataset,
    prepare_fast_model,
)
from tasks.engine.compile import compile_for_training, compiled_graphs, trainer_loss, uncompile_layers, warmup_batches  # noqa: E402
from tasks.engine.recompute import PartialRecomputeCallback, offload_checkpoints, recompute_free_layers  # noqa: E402
from bench.workload import (  # noqa: E402  (the workload bench/unsloth_bench.py trains too)
    ACCUM,
    CAP_GIB,
    GIB,
    LORA,
    MAX_LEN,
    MICRO,
    OPTIM as DEFAULT_OPTIM,
    SHAPES,
    WORKDIR,
    build_tokenizer,
    collect_every,
    log,
    mixed_stats,
    synthetic_sets,
    trainer_classes,
    versions,
    write_random_checkpoint,
)

TOKEN_BUDGET = MICRO * MAX_LEN  # padding-free micro-batch: as many token slots as the seed's padded one
OPTIM = DEFAULT_OPTIM  # set from --optim in main()
TRAINER = "sft"  # set from --trainer in main(): "plain" = transformers' Trainer, stage 4's loop (issue 19's Trainer split)
FULL_ROWS = False  # set from --full-rows in main(): a pack of MICRO samples of MAX_LEN goes as (MICRO, MAX_LEN) rows, as stage 4 sends it
ARG_OVERRIDES: dict = {}  # training-argument ablations from main() (--logging-steps, --max-grad-norm, --nan-filter)
VOCAB = 32000  # set from --shapes in main(): the random token ids and the word-level tokenizer span the model's vocabulary


# ---------------------------------------------------------------------------------------------- model


def build_model(n_layers: int, workdir: Path, shapes: str = "mistral-7b"):
    """Random-weight model of `shapes` (Mistral-7B-v0.1 or Llama-3.1-8B) in bf16 on the GPU, saved once, reloaded in
    NF4 + double quant (the seed's load)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = write_random_checkpoint(n_layers, workdir, shapes)
    t = time.time()
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map={"": 0},
                                               dtype=torch.bfloat16, attn_implementation="sdpa")
    log(f"NF4 model loaded in {time.time() - t:.0f}s, {torch.cuda.memory_allocated() / GIB:.2f} GiB on the GPU")
    return model


# ---------------------------------------------------------------------------------------------- runs


def lora():
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **LORA)


def compile_trainer_layers(trainer, collator, device: str):
    """The pipeline's regional compilation of `trainer`'s model (as build_model does for training.compile: layers),
    warmed up on packed micro-batches of the workload's shape through the trainer's own `compute_loss`: SFTTrainer calls
    the model with `use_cache=False, fused_lm_head=True`, and its fused LM head calls the backbone past Liger's causal-LM
    forward, so a warm-up through `model(**batch)` left every layer call of the steps eager (`len(kwargs)` guards).
    Checkpointing is turned on first, as Trainer does only when `train()` starts: a warm-up before it kept every
    layer's activations (a fused-compile run first in its process ran out of memory at the 15 GiB cap, 2026-12-02).
    Not carried over: the `offload` and `every_n_layers` of `gradient_checkpointing_kwargs` (no compiled run here uses
    them; a warm-up without them would keep more on the device than the steps do)."""
    if trainer.args.gradient_checkpointing:
        kwargs = {k: v for k, v in (trainer.args.gradient_checkpointing_kwargs or {}).items() if k not in ("offload", "every_n_layers")}
        enable_checkpointing(trainer.model, kwargs or None)
    return compile_for_training(trainer.model, warmup_batches(collator, MICRO, MAX_LEN, VOCAB, padded=False), device,
                                torch.bfloat16, log, loss_fn=trainer_loss(trainer))


def run(name, model, tok, rows, engine, steps, warmup, seed, capped, n_free=0, packs=None, ckpt=True, offload=False, profile_dir=None,
        lora_dropout="seeded", side_stream_offload=False, compile_layers=False, offload_kwargs=None, gc_frozen=False, gc_every=0):
    """Train `steps` optimizer steps; time the last `steps - warmup`; return a result record. With
    `profile_dir`, one more step runs under torch.profiler (not timed) and its breakdown joins the record.
    `offload`: transformers' offload=True; `side_stream_offload`: the pipeline's (TRL's manager around each forward),
    `offload_kwargs` its keyword arguments (`offload_checkpoints(model, **offload_kwargs)`: TRL's, and `prefetch`).
    `compile_layers`: the pipeline's regional compilation (tasks/engine/compile.py), warmed up before the timed steps.
    `gc_frozen`: every object alive when training starts (the model, torch's and the libraries' own) moved out of the
    cyclic garbage collector's reach (`gc.freeze()`), so a full collection in a step walks only what the steps made.
    `gc_every`: the automatic collector off while training (`gc.disable()`), a generation-1 collection every `gc_every`
    steps instead (torchtitan's way), inside the step it ends, so the step's time and `gc_s` count it."""
    from datasets import Dataset
    from transformers import TrainingArguments
    from trl import SFTConfig

    BenchTrainer, StepTimer = trainer_classes(TRAINER)

    record = {"name": name, "engine": engine, "data": rows["name"], "capped_gib": CAP_GIB if capped else None,
              "n_recompute_free": n_free, "gradient_checkpointing": ckpt, "offload": offload, "side_stream_offload": side_stream_offload,
              "offload_kwargs": dict(offload_kwargs or {}) if side_stream_offload else None,
              "compile_layers": compile_layers, "trainer": TRAINER, "full_rows": FULL_ROWS, "arg_overrides": dict(ARG_OVERRIDES),
              "gc_frozen": gc_frozen, "gc_every": gc_every}
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_GIB * GIB / total) if capped else 1.0)
    args = dict(output_dir=f"/tmp/bench_out/{name}", max_steps=steps + (1 if profile_dir else 0), per_device_train_batch_size=MICRO,
                gradient_accumulation_steps=ACCUM, learning_rate=2e-4, logging_steps=1, save_strategy="no",
                report_to="none", bf16=True, gradient_checkpointing=ckpt, optim=OPTIM,
                max_length=MAX_LEN, seed=seed, dataloader_num_workers=0, disable_tqdm=True)
    if offload:  # transformers >= 5.17: checkpointed layer inputs live in pinned host memory
        args["gradient_checkpointing_kwargs"] = {"offload": True}
    if engine == "seed":
        dataset = Dataset.from_dict({"input_ids": [r["input_ids"] for r in rows["rows"]]})
        collator = None
    else:
        dataset = packed_hf_dataset(rows["rows"], packs)
        collator = PaddingFreeCollator(max_tokens=TOKEN_BUDGET, full_rows=(MICRO, MAX_LEN) if FULL_ROWS else None)
        args.update(per_device_train_batch_size=1, remove_unused_columns=False,
                    dataset_kwargs={"skip_prepare_dataset": True})
    args.update(ARG_OVERRIDES)
    if TRAINER == "plain" and engine == "seed":
        raise ValueError("--trainer plain runs the packed engines only (the seed's rows need SFTTrainer's tokenization)")
    if not ckpt:
        model.gradient_checkpointing_disable()  # earlier runs left the layers' flags on
    timer = StepTimer()
    callbacks = ([collect_every(gc_every)] if gc_every else []) + [timer] + ([PartialRecomputeCallback(n_free)] if n_free else [])
    profiler = step_profiler(steps, Path(profile_dir) / f"{name}.trace.json") if profile_dir else None
    if profiler is not None:
        callbacks.append(profiler)
    trainer = offloaded = None
    try:
        torch.manual_seed(seed)  # LoRA init and dropout masks: same stream for every engine
        if TRAINER == "plain":  # stage 4's loop: PEFT applied here, TrainingArguments without SFTConfig's keys
            from peft import get_peft_model

            plain = {k: v for k, v in args.items() if k not in ("max_length", "dataset_kwargs")}
            plain.setdefault("include_num_input_tokens_seen", "all")  # tasks/engine/build.py training_args on packed rows
            plain.setdefault("max_grad_norm", 0.3)  # the pipeline's default (SFTConfig's: 1.0; the same kernels)
            plain.setdefault("logging_nan_inf_filter", False)
            trainer = BenchTrainer(model=get_peft_model(model, lora()), args=TrainingArguments(**plain), train_dataset=dataset,
                                   processing_class=tok, data_collator=collator, callbacks=callbacks)
        else:
            trainer = BenchTrainer(model=model, args=SFTConfig(**args), train_dataset=dataset, processing_class=tok,
                                   data_collator=collator, peft_config=lora(), callbacks=callbacks)
        timer.trainer = trainer
        if engine == "fused":
            record["fused_layers"] = fuse_lora(trainer.model, dropout=lora_dropout)
            record["lora_dropout"] = lora_dropout
        if side_stream_offload:  # as build_model does for training.offload_activations (after fuse_lora there too)
            offloaded = offload_checkpoints(trainer.model, **(offload_kwargs or {}))
        graphs = None
        if compile_layers:  # as build_model does for training.compile: layers (last, after fuse_lora and offload there too)
            from torch._dynamo.utils import counters

            torch._logging.set_logs(recompiles=True, graph_breaks=True)
            breaks = dict(counters["graph_break"])  # torch's counters outlive torch._dynamo.reset(): this run's are the difference
            state = compile_trainer_layers(trainer, collator, "cuda")
            record.update(compile_seconds=round(state.seconds, 1), compile_graphs=state.graphs, compile_error=state.error)
            log(f"{name}: decoder layers compiled: {state.graphs} graphs in {state.seconds:.0f} s" + (f"; FAILED {state.error}" if state.error else ""))
            graphs, eager = compiled_graphs(), state.eager_calls
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if gc_frozen:
            gc.freeze()
        if gc_every:
            gc.disable()
        try:
            trainer.train()
        finally:
            gc.enable()
            gc.unfreeze()  # the next run starts as every run did
            timer.pauses.stop()  # on_train_end does not run when training raises (an OOM under the cap)
        if graphs is not None:
            record.update(compile_graphs_in_steps=compiled_graphs() - graphs, compile_active_at_end=trainer.model.layer_compile.active,
                          compile_eager_calls_in_steps=trainer.model.layer_compile.eager_calls - eager,
                          compile_eager_reason=trainer.model.layer_compile.eager_reason,
                          graph_breaks={k.splitlines()[0][:160]: v - breaks.get(k, 0) for k, v in counters["graph_break"].items()
                                        if v > breaks.get(k, 0)})
        timed = timer.steps[warmup:steps]
        secs = sum(s["s"] for s in timed)
        tokens = sum(s["tokens"] for s in timed)
        record.update(
            ok=True,
            tokens_per_s=tokens / secs,
            slots_per_s=sum(s["slots"] for s in timed) / secs,
            padding_share=1 - tokens / max(1, sum(s["slots"] for s in timed)),
            step_s=[round(s["s"], 3) for s in timer.steps],
            step_gc_s=[s["gc_s"] for s in timer.steps],  # the garbage collector's seconds in each step, by generation
            step_tokens=[s["tokens"] for s in timer.steps],
            peak_gib=torch.cuda.max_memory_allocated() / GIB,
            peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
            losses=[h["loss"] for h in trainer.state.log_history if "loss" in h][:steps],
        )
        if offloaded is not None and offloaded.prefetch is not None:  # summed over the run: warm-up, timed and profiled backwards
            record["prefetch_hits_misses"] = [offloaded.prefetch.hits, offloaded.prefetch.misses]
        if profiler is not None and profiler.result is not None:
            record["profile"] = profiler.result
            if "error" not in profiler.result:
                Path(profile_dir, f"{name}.trace.json").unlink(missing_ok=True)  # ~100 MB; the breakdown is kept
        if engine == "fused":
            stored = lora_dropout == "stored"
            record["dropout_backend"] = "torch (stored mask)" if stored else dropout_backend("cuda", lora_dropout)
        log(f"{name}: {record['tokens_per_s']:,.0f} real tok/s, peak {record['peak_gib']:.2f} GiB, "
            f"steps {record['step_s']}, losses {[round(x, 4) for x in record['losses']]}")
    except Exception as e:  # an OOM under the cap is a result ("does not fit"), not a crash
        record.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}",
                      peak_gib=torch.cuda.max_memory_allocated() / GIB)
        log(f"{name}: FAILED {record['error']}")
        traceback.print_exc()
    finally:
        if offloaded is not None:
            offloaded.remove()  # its wrapper sits on the base model's decoder stack, which the next run shares
        peft_model = trainer.model if trainer is not None else None
        if compile_layers and peft_model is not None:
            uncompile_layers(peft_model)  # the bare model goes on to the next run with its class's forward
            torch._dynamo.reset()
        if trainer is not None:
            trainer.optimizer = trainer.lr_scheduler = None
            trainer.accelerator.free_memory()
        del trainer
        if peft_model is not None and hasattr(peft_model, "unload"):
            model = peft_model.unload()  # back to the bare NF4 model for the next run
        del peft_model
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    return record, model


def fused_selfcheck() -> dict:
    """The fused path's seeded dropout on this GPU: the same seed gives the same mask, P(drop) = p, and LoraA's
    forward/backward equal the plain formula with that mask (bf16 tolerances). Milliseconds; runs before the
    fused runs so a wrong kernel shows up as a named failure, not as a quietly different loss."""
    from tasks.engine.lora import LoraA, seeded_dropout

    p, seed = 0.05, 1234
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = (torch.randn(48, 4096, device="cuda") * 0.02).requires_grad_()
    keep = seeded_dropout(torch.ones_like(x), p, seed) != 0
    same = bool(torch.equal(keep, seeded_dropout(torch.ones_like(x), p, seed) != 0))
    out = LoraA.apply(x, a, p, seed, torch.bfloat16)
    g = torch.randn_like(out)
    out.backward(g)
    xr, ar = x.detach().float().requires_grad_(), a.detach().clone().requires_grad_()
    ref = (xr * keep / (1 - p)) @ ar.t()
    ref.backward(g.float())

    def rel(u, v):
        u, v = u.detach().float(), v.detach()
        return float((u - v).norm() / v.norm())

    y = torch.randn(3 * 4096 + 5, device="cuda", dtype=torch.bfloat16)  # partial last block: in place == out of place
    inplace_ok = bool(torch.equal(seeded_dropout(y.clone(), p, seed, inplace=True), seeded_dropout(y, p, seed)))
    res = {"backend": dropout_backend("cuda"), "same_mask_same_seed": same, "inplace_same": inplace_ok,
           "drop_share": round(1 - keep.float().mean().item(), 5),
           "rel_err_out": rel(out, ref), "rel_err_grad_x": rel(x.grad, xr.grad), "rel_err_grad_a": rel(a.grad, ar.grad)}
    res["ok"] = same and inplace_ok and abs(res["drop_share"] - p) < 0.002 and \
        max(res["rel_err_out"], res["rel_err_grad_x"], res["rel_err_grad_a"]) < 2e-2
    del x, a, keep, out, g, xr, ar, ref
    torch.cuda.empty_cache()
    return res


def parity(a: dict, b: dict) -> dict | None:
    if not (a.get("ok") and b.get("ok")):
        return None
    la, lb = a["losses"], b["losses"]
    n = min(len(la), len(lb))
    rel = [abs(x - y) / abs(x) for x, y in zip(la[:n], lb[:n])]
    return {"steps": n, a["name"]: la[:n], b["name"]: lb[:n], "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / n}


def table(results: list[dict], gpu: str) -> str:
    seed = {r["data"]: r for r in results if r["engine"] == "seed" and r.get("ok")}
    lines = [f"GPU: {gpu}", "| run | recipe | data | real tokens/s | peak GiB | x seed | 16 GiB cap |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | {r['engine']} | {r['data']} | failed: {r['error'][:60]} | "
                         f"{r.get('peak_gib', 0):.2f} | - | {'yes' if r['capped_gib'] else 'no'} |")
            continue
        base = seed.get(r["data"])
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        recipe = r["engine"]
        if not r["gradient_checkpointing"]:
            recipe += " (no recompute)"
        elif r.get("offload"):
            recipe += " (checkpoints offloaded to host)"
        elif r.get("side_stream_offload"):
            recipe += " (checkpoints offloaded to host, side stream" + (f", {json.dumps(r['offload_kwargs'])}" if r.get("offload_kwargs") else "") + ")"
        elif r.get("compile_layers"):
            recipe += f" (decoder layers compiled, {r.get('compile_seconds', 0):.0f} s)"
        elif r.get("lora_dropout") == "stored":
            recipe += " (torch dropout, mask stored)"
        elif r.get("lora_dropout") == "inmatmul":
            recipe += " (dropout inside the LoRA-A matmuls)"
        elif r["n_recompute_free"]:
            recipe += f" ({r['n_recompute_free']} layers without recompute)"
        cap = "fits" if r["capped_gib"] else "uncapped"
        lines.append(f"| {r['name']} | {recipe} | {r['data']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {ratio} | {cap} |")
    return "\n".join(lines)


def offload_kwargs_arg(text: str) -> dict:
    """--offload-kwargs: a JSON object (argparse turns the ValueError into a one-line usage error)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"needs a JSON object of offload_checkpoints' keyword arguments: {text}")
    return value


def offload_variants(kwargs_list: list[dict] | None) -> list[tuple[str, dict]]:
    """The fused-offload runs: one per --offload-kwargs (none given: TRL's defaults), the first named as before."""
    return [("fused-offload-full" + (f"-v{i}" if i else ""), kw) for i, kw in enumerate(kwargs_list or [{}])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench"))
    ap.add_argument("--optim", default=DEFAULT_OPTIM, help="TrainingArguments.optim of every run (issue 19.1: adamw_torch_fused)")
    ap.add_argument("--shapes", default="mistral-7b", choices=sorted(SHAPES), help="model shapes (random weights)")
    ap.add_argument("--trainer", default="sft", choices=("sft", "plain"),
                    help="sft: TRL's SFTTrainer (its fused LM head and per-micro-batch metrics); plain: transformers' Trainer, "
                         "stage 4's loop (the model's own loss); packed engines only")
    ap.add_argument("--full-rows", action="store_true",
                    help="send a pack of micro-batch samples that each fill max_length as plain rows (stage 4's collator since "
                         "2026-12-04), not one packed varlen row")
    ap.add_argument("--data", default="full,mixed", help="which data sets the fused family trains: full, mixed or both")
    ap.add_argument("--logging-steps", type=int, default=None, help="TrainingArguments.logging_steps (default 1)")
    ap.add_argument("--max-grad-norm", type=float, default=None, help="TrainingArguments.max_grad_norm (default 1.0; 0 = no clipping)")
    ap.add_argument("--nan-filter", type=int, choices=(0, 1), default=None,
                    help="TrainingArguments.logging_nan_inf_filter (default 1: an isnan/isinf read-back after every micro-batch)")
    ap.add_argument("--smoke", action="store_true", help="4 layers, 3 steps: checks the plumbing in ~2 min")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (first --warmup untimed)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--runs", default="seed,varlen,fast,fit16,nockpt", help="comma list of run families")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--workdir", default=WORKDIR, help="where the random checkpoint is written once (bench/unsloth_bench.py reads it too)")
    ap.add_argument("--profile", action="store_true", help="profile one extra step of each run (bench/profile_gpu.py)")
    ap.add_argument("--profile-runs", default="", help="comma list of run names to profile (e.g. fused-full); implies --profile for those only")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: start no run once this much has passed since launch (the ones done are written out)")
    ap.add_argument("--offload-kwargs", action="append", type=offload_kwargs_arg, default=None, metavar="JSON",
                    help="a JSON object passed to offload_checkpoints for the fused-offload run (TRL's use_pin_memory, "
                         "use_streams, min_offload_size, max_fwd_stash_size; the pipeline's prefetch); repeated: one run each, "
                         "fused-offload-full, fused-offload-full-v1, ... (e.g. '{}' '{\"prefetch\": true}')")
    a = ap.parse_args()
    if a.full_rows and a.trainer != "plain":
        # TRL's SFTTrainer counts a train batch's tokens from its attention_mask or position_ids and raises on a batch
        # with neither, which plain rows are (trl 1.16: "Expected 'attention_mask' or 'position_ids' in inputs")
        ap.error("--full-rows needs --trainer plain (stage 4's loop): SFTTrainer refuses rows without attention_mask or position_ids")
    global VOCAB, OPTIM, TRAINER, FULL_ROWS
    VOCAB, OPTIM, TRAINER, FULL_ROWS = SHAPES[a.shapes][1]["vocab_size"], a.optim, a.trainer, a.full_rows
    for key, value in (("logging_steps", a.logging_steps), ("max_grad_norm", a.max_grad_norm),
                       ("logging_nan_inf_filter", None if a.nan_filter is None else bool(a.nan_filter))):
        if value is not None:
            ARG_OVERRIDES[key] = value
    t_start = time.time()
    layers = a.layers or (4 if a.smoke else 32)
    steps = a.steps or (3 if a.smoke else 6)
    warmup = a.warmup if a.warmup is not None else (1 if a.smoke else 2)
    families = set(a.runs.split(","))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"versions": versions(), "shapes": a.shapes, "optim": a.optim, "trainer": a.trainer, "arg_overrides": dict(ARG_OVERRIDES), "layers": layers, "steps": steps, "warmup": warmup, "date": time.strftime("%Y-%m-%d"),
            "recipe": f"NF4+double quant, bf16, LoRA r16/a32/dropout0.05 on 7 proj, micro {MICRO} x accum {ACCUM}, "
                      f"max_len {MAX_LEN}, {a.optim}, " + ("TRL SFTTrainer" if a.trainer == "sft" else "transformers Trainer (stage 4's loop)"),
            "cap_gib": CAP_GIB}
    log(json.dumps(info["versions"]))

    # Data: enough rows for `steps` optimizer steps of either engine.
    full, mixed = synthetic_sets(steps, a.seed, VOCAB)
    n_full, lengths = len(full["rows"]), mixed["lengths"]
    full_packs = [list(range(i, i + MICRO)) for i in range(0, n_full, MICRO)]  # = the seed's sequential batches
    mixed_packs = pack_by_tokens(lengths, TOKEN_BUDGET, a.seed)
    info["mixed"] = {**mixed_stats(lengths), "pack_fill": sum(lengths) / (len(mixed_packs) * TOKEN_BUDGET)}
    log(f"mixed set: {info['mixed']}")

    model = build_model(layers, Path(a.workdir), a.shapes)
    tok = build_tokenizer(VOCAB)
    results: list[dict] = []

    profile_only = {n for n in a.profile_runs.split(",") if n}

    last_run_s = [0.0]  # the previous run's duration: a run that would end past the budget does not start

    def go(name, *args, **kwargs):
        nonlocal model
        used = time.time() - t_start
        if a.time_budget is not None and used + last_run_s[0] > a.time_budget:
            log(f"{name}: skipped, {used:.0f}s used + ~{last_run_s[0]:.0f}s for it > the {a.time_budget:.0f}s budget")
            info.setdefault("skipped_for_time", []).append(name)
            return {"name": name, "ok": False, "skipped": True}
        if profile_only and "profile_dir" not in kwargs and name in profile_only:
            kwargs["profile_dir"] = str(out / "profiles")
        t_run = time.time()
        record, model = run(name, *args, **kwargs)
        last_run_s[0] = time.time() - t_run
        record["run_s"] = round(last_run_s[0], 1)
        results.append(record)
        (out / "results.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
        return record

    prof = {"profile_dir": str(out / "profiles")} if a.profile else {}
    if "seed" in families or "seedfull" in families:
        go("seed-full", model, tok, full, "seed", steps, warmup, a.seed, capped=True, **prof)
    if "seed" in families:
        go("seed-mixed", model, tok, mixed, "seed", steps, warmup, a.seed, capped=True)
    model.set_attn_implementation(fast_attn_implementation("cuda"))
    if "varlen" in families:
        go("varlen-mixed", model, tok, mixed, "varlen", steps, warmup, a.seed, capped=True, packs=mixed_packs)
    if "varlen-compile" in families:  # before Liger patches the classes: inductor's own norms, RoPE and SwiGLU
        go("varlen-compile-full", model, tok, full, "varlen", steps, warmup, a.seed, capped=True, packs=full_packs,
           compile_layers=True, **prof)
    model = prepare_fast_model(model)
    info["liger_applied"] = bool(getattr(model, "_fastpath_liger", False))
    fast_full = None
    if families & {"fast", "fastfull", "fit16", "nockpt"}:
        fast_full = go("fast-full", model, tok, full, "fast", steps, warmup, a.seed, capped=True, packs=full_packs, **prof)
    if "fast" in families:
        go("fast-mixed", model, tok, mixed, "fast", steps, warmup, a.seed, capped=True, packs=mixed_packs, **prof)
    if families & {"fused", "fusedstored", "fused-offload", "fused-offload-gcfrozen", "fused-offload-gcmanual", "fusedinmatmul"}:
        info["fused_selfcheck"] = fused_selfcheck()
        log(f"fused LoRA self-check: {info['fused_selfcheck']}")
    if "fusedinmatmul" in families:
        from bench.graph_step import safe_inmatmul_check

        info["inmatmul_check"] = safe_inmatmul_check(a.shapes)
        log(f"in-matmul dropout check: {info['inmatmul_check']}")
    if "fused" in families and "full" in a.data.split(","):
        go("fused-full", model, tok, full, "fused", steps, warmup, a.seed, capped=True, packs=full_packs, **prof)
    if "fusedstored" in families:  # before the mixed runs: the full-row comparison matters most in a short call
        go("fusedstored-full", model, tok, full, "fused", steps, warmup, a.seed, capped=True, packs=full_packs,
           lora_dropout="stored", **prof)
    if "fusedinmatmul" in families:
        go("fusedinmatmul-full", model, tok, full, "fused", steps, warmup, a.seed, capped=True, packs=full_packs,
           lora_dropout="inmatmul", **prof)
    if "fused" in families and "mixed" in a.data.split(","):
        go("fused-mixed", model, tok, mixed, "fused", steps, warmup, a.seed, capped=True, packs=mixed_packs, **prof)
    if "fused-compile" in families:
        go("fused-compile-full", model, tok, full, "fused", steps, warmup, a.seed, capped=True, packs=full_packs,
           compile_layers=True, **prof)
        go("fused-compile-mixed", model, tok, mixed, "fused", steps, warmup, a.seed, capped=True, packs=mixed_packs,
           compile_layers=True, **prof)
    if "fusedinmatmul" in families:
        go("fusedinmatmul-mixed", model, tok, mixed, "fused", steps, warmup, a.seed, capped=True, packs=mixed_packs,
           lora_dropout="inmatmul", **prof)
    if "fusedstored" in families:
        go("fusedstored-mixed", model, tok, mixed, "fused", steps, warmup, a.seed, capped=True, packs=mixed_packs,
           lora_dropout="stored", **prof)
    if "offload" in families:
        go("offload-full", model, tok, full, "fast", steps, warmup, a.seed, capped=True, packs=full_packs, offload=True)
    if "fused-offload" in families:
        info["offload_variants"] = dict(offload_variants(a.offload_kwargs))
        for name, kwargs in offload_variants(a.offload_kwargs):
            go(name, model, tok, full, "fused", steps, warmup, a.seed, capped=True, packs=full_packs,
               side_stream_offload=True, offload_kwargs=kwargs, **prof)
    if "fused-offload-gcmanual" in families:  # the same, the automatic collector off, generation 1 every 10 steps
        go("fused-offload-full-gcmanual", model, tok, full, "fused", steps, warmup, a.seed, capped=True, packs=full_packs,
           side_stream_offload=True, offload_kwargs={}, gc_frozen=True, gc_every=10, **prof)
    if "fused-offload-gcfrozen" in families:  # TRL's offload as is, the collector frozen at the start (PERF_NOTES.md)
        # on each --data asked for (it ran on full rows only, whatever --data said: a 2026-12-06 call asked for mixed)
        for name, rows, packs in (("full", full, full_packs), ("mixed", mixed, mixed_packs)):
            if name in a.data.split(","):
                go(f"fused-offload-{name}-gcfrozen", model, tok, rows, "fused", steps, warmup, a.seed, capped=True, packs=packs,
                   side_stream_offload=True, offload_kwargs={}, gc_frozen=True, **prof)

    if families & {"fit16", "nockpt"} and fast_full and fast_full.get("ok"):
        # Two probes above the recompute transient: their difference is the true per-layer cost (one probe against
        # the fully checkpointed peak underestimates it, since part of the kept activations hides under the
        # transient of recomputing a layer: seen on the first H200 run, 0.87 GiB estimated vs ~1.7 real).
        k1, k2 = (1, 2) if layers <= 4 else (4, 8)
        p1 = go(f"probe{k1}-full", model, tok, full, "fast", 2, 1, a.seed, capped=False, n_free=k1, packs=full_packs)
        p2 = go(f"probe{k2}-full", model, tok, full, "fast", 2, 1, a.seed, capped=False, n_free=k2, packs=full_packs)
        if p1.get("ok") and p2.get("ok"):
            per_layer = max(1e-3, (p2["peak_gib"] - p1["peak_gib"]) / (k2 - k1))
            card = torch.cuda.get_device_properties(0).total_memory / GIB
            fits_k1 = p1["peak_gib"] <= CAP_GIB - 0.75
            n16 = k1 + recompute_free_layers(p1["peak_gib"], per_layer, CAP_GIB, layers - k1, margin_gb=0.75) if fits_k1 else 0
            nbig = k1 + recompute_free_layers(p1["peak_gib"], per_layer, 0.9 * card, layers - k1, margin_gb=1.0)
            info["recompute_fit"] = {"per_layer_gib": per_layer, "peak_full_gib": fast_full["peak_gib"],
                                     f"peak_{k1}_free_gib": p1["peak_gib"], f"peak_{k2}_free_gib": p2["peak_gib"],
                                     "n_free_16gib": n16, "n_free_card": nbig, "card_gib": card}
            log(f"recompute auto-fit: {info['recompute_fit']}")
            if "fit16" in families and n16 > 0:
                for data, packs in ((full, full_packs), (mixed, mixed_packs)):
                    go(f"fit16-{data['name']}", model, tok, data, "fast", steps, warmup, a.seed, capped=True,
                       n_free=n16, packs=packs)
            if "nockpt" in families:
                ckpt = nbig < layers
                for data, packs in ((full, full_packs), (mixed, mixed_packs)):
                    go(f"nockpt-{data['name']}", model, tok, data, "fast", steps, warmup, a.seed, capped=False,
                       n_free=nbig if ckpt else 0, ckpt=ckpt, packs=packs)

    results[:] = [r for r in results if not r.get("skipped")]
    by = {r["name"]: r for r in results}
    info["parity"] = {k: parity(by[a_], by[b_]) for k, (a_, b_) in
                      {"seed-vs-fast-full": ("seed-full", "fast-full"),
                       "seed-vs-fused-full": ("seed-full", "fused-full"),
                       "fast-vs-fused-mixed": ("fast-mixed", "fused-mixed"),
                       "fast-vs-fusedstored-full": ("fast-full", "fusedstored-full"),
                       "fast-vs-fused-full": ("fast-full", "fused-full"),
                       "fused-vs-fusedinmatmul-full": ("fused-full", "fusedinmatmul-full"),
                       **{f"fused-vs-{name}": ("fused-full", name) for name, _ in offload_variants(a.offload_kwargs)},
                       "fused-vs-fused-compile-full": ("fused-full", "fused-compile-full"),
                       "fused-vs-fused-compile-mixed": ("fused-mixed", "fused-compile-mixed"),
                       "seed-vs-nockpt-full": ("seed-full", "nockpt-full")}.items() if a_ in by and b_ in by}
    text = table(results, info["versions"]["gpu"])
    (out / "results.json").write_text(json.dumps({"info": info, "results": results}, indent=1))
    (out / "table.md").write_text(text + "\n")
    print("\n" + text)
    profiles = {r["name"]: r["profile"] for r in results if r.get("profile")}
    if profiles:
        (out / "profile.md").write_text(profile_markdown(profiles) + "\n")
        print("\n" + profile_markdown(profiles))
    for k, v in info["parity"].items():
        if v:
            print(f"loss parity {k}: max rel diff {v['max_rel_diff']:.2e}, mean {v['mean_rel_diff']:.2e} over {v['steps']} steps")


if __name__ == "__main__":
    main()
