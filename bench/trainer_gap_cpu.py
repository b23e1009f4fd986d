"""Issue 19: what TRL's SFTTrainer (bench/gpu_bench.py's fused runs) and stage 4's plain Trainer add to one optimizer
step over bench/graph_step.py's own loop, counted on CPU with torch.profiler.

CPU wall time says nothing about an H200's; what carries over is *what runs*: the aten ops of one optimizer step (each
one a kernel or more on the GPU), the ops that read a device value back to the host (`aten::_local_scalar_dense`:
`.item()`, `bool(tensor)`; `aten::nonzero`: boolean indexing) — each a full drain of the CUDA queue — and the host
time outside the model (data, collation, callbacks, logging). The three paths share one tiny random Mistral
(a few layers, short rows), PEFT LoRA on the seven projections, the project's `fuse_lora` (seeded dropout, its torch
reference on CPU), non-reentrant checkpointing and bf16 autocast, and train on the same token rows:

    own      graph_step.train_steps: (MICRO, LEN) rows, input_ids = labels, `model(...).loss / ACCUM`, AdamW(foreach)
    sft      gpu_bench.run: SFTTrainer on packed_hf_dataset + PaddingFreeCollator, the varlen attention registered
             (on CPU it runs one sdpa per sample; on CUDA torch's varlen flash kernel), TRL's fused LM head
    stage4   tasks/train.py's loop before 2026-12-04: transformers.Trainer (no TRL head: the model's own loss), same
             collator, training_args' choices (include_num_input_tokens_seen, logging_nan_inf_filter=False, max_grad_norm 0.3)
    stage4-host  the same with tasks/engine/build.py's bookkeeping_trainer (token and FLOP counts on the host)

What cannot match the GPU and is said so in the output: Liger (CUDA only) is absent, so the own loop's and stage 4's
loss is transformers' full-logits cross-entropy here, where on the H200 it is Liger's fused linear cross-entropy; TRL's
head runs its torch tiles, not its Triton kernel, but takes its CUDA path's compact (boolean-indexed) branch
(`--trl-compact`, default on) so its syncs are counted; bitsandbytes' NF4 is not used (bf16 base weights).

    PYTHONPATH=$PWD python bench/trainer_gap_cpu.py --out /tmp/gap            # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item", "aten::is_nonzero")
CHECKPOINTING = {"use_reentrant": False, "preserve_rng_state": False}  # graph_step's


def tiny_model(layers: int, vocab: int, seed: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench.workload import LORA
    from tasks.engine.lora import fuse_lora

    cfg = AutoConfig.for_model("mistral", vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=4096,
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    fuse_lora(model, dropout="seeded")
    return model


STUB = "gap_stub"


def stub_attention(module, query, key, value, attention_mask, **kwargs):
    """One op in place of attention, on every path (`--attention stub`): the GPU runs one flash kernel either way (sdpa's
    batched causal on the own loop, torch's varlen on the Trainer paths), which CPU op counts cannot compare."""
    return query.transpose(1, 2), None


def use_attention(model, kind: str) -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from tasks.engine.fastpath import _varlen_mask, register_varlen_attention

    if kind == "stub":
        AttentionInterface.register(STUB, stub_attention)
        AttentionMaskInterface.register(STUB, _varlen_mask)  # no mask without a cache, as the varlen path's
        model.set_attn_implementation(STUB)
    elif kind == "varlen":
        model.set_attn_implementation(register_varlen_attention())


def rows(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=g).tolist()


def op_counts(prof) -> dict[str, int]:
    return {e.key: e.count for e in prof.key_averages()}


class SyncSites(torch.utils._python_dispatch.TorchDispatchMode):
    """Where each host read-back is called from (`_local_scalar_dense`: `.item()`, `bool(t)`, `float(t)`; `nonzero`:
    boolean indexing): the innermost Python frame outside torch, file:line. On CUDA each is a drain of the queue when
    its tensor lives on the device; `tensor_on` says whether the tensor was a model-side tensor (produced by the step)
    or one the host made (a CPU tensor on the GPU too), told apart by the frame."""

    def __init__(self):
        super().__init__()
        self.sites = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in ("aten._local_scalar_dense", "aten.nonzero"):
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno} {frames[-1].name}" if frames else "(C++)"
            where = re.sub(r".*/(site-packages|wt-trainer-gap|main)/", "", where)
            self.sites[f"{name.split('.')[1]} @ {where}"] += 1
        return func(*args, **(kwargs or {}))


def profiler():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def own_loop(model, data, micro: int, accum: int, steps: int, attention: str) -> dict:
    """bench/graph_step.py train_steps() on CPU: the same calls, autocast on the CPU."""
    if attention == "stub":
        use_attention(model, "stub")
    from tasks.models import enable_checkpointing

    enable_checkpointing(model, CHECKPOINTING)
    model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)  # graph_step: fused=True (CUDA); CPU: foreach
    batches = [torch.tensor(data[i:i + micro]) for i in range(0, len(data), micro)]

    def step(s):
        total = torch.zeros(())
        for m in range(accum):
            ids = batches[(s * accum + m) % len(batches)]
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss / accum
            loss.backward()
            total += loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        return float(total)

    for s in range(steps - 1):
        step(s)
    with profiler() as prof:
        t = time.perf_counter()
        step(steps - 1)
        wall = time.perf_counter() - t
    sites = SyncSites()
    with sites:  # a second pass of the same step for the call sites (the dispatch mode slows it: not timed)
        step(steps)
    return {"ops": op_counts(prof), "sync_sites": dict(sites.sites.most_common()), "wall_s": wall}


def trainer_path(model, data, micro: int, accum: int, steps: int, kind: str, tokenizer, attention: str, profile: bool = True) -> dict:
    """gpu_bench.run's fused-full (kind "sft") or stage 4's Trainer (kind "stage4"), one optimizer step profiled."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from trl import SFTConfig

    from bench.workload import trainer_classes
    from tasks.engine.fastpath import PaddingFreeCollator, packed_hf_dataset

    use_attention(model, attention)  # "varlen": gpu_bench's fast_attn_implementation("cuda") (per-sample sdpa on CPU)
    length = len(data[0])
    packs = [list(range(i, i + micro)) for i in range(0, len(data), micro)]
    dataset = packed_hf_dataset([{"input_ids": r, "labels": r} for r in data], packs)
    collator = PaddingFreeCollator(max_tokens=micro * length)

    class Probe(TrainerCallback):
        """Profile the last optimizer step, from its first micro-batch fetch to on_step_end, as StepTimer times it
        (from the previous on_step_end: the fetch of the next step's micro-batches is inside the timed step)."""

        def __init__(self):
            self.prof, self.wall, self.t, self.sites = None, None, None, SyncSites()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == steps - 2:  # one step with the dispatch mode for the call sites, then one profiled
                self.sites.__enter__()
            elif state.global_step == steps - 1:
                self.sites.__exit__(None, None, None)
                self.prof = profiler()
                self.prof.__enter__()
                self.t = time.perf_counter()
            elif state.global_step == steps and self.prof is not None:
                self.wall = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)

    probe = Probe()
    callbacks = [probe] if profile else []
    common = dict(output_dir=f"/tmp/trainer_gap_{kind}", max_steps=steps, gradient_accumulation_steps=accum, learning_rate=2e-4,
                  save_strategy="no", report_to="none", bf16=True, gradient_checkpointing=True, use_cpu=True, seed=0,
                  dataloader_num_workers=0, disable_tqdm=True, per_device_train_batch_size=1, remove_unused_columns=False)
    if kind == "sft":
        BenchTrainer, _ = trainer_classes()
        args = SFTConfig(**common, logging_steps=1, optim="adamw_torch", max_length=length,
                         dataset_kwargs={"skip_prepare_dataset": True})
        trainer = BenchTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, data_collator=collator,
                               callbacks=callbacks)
    else:  # tasks/engine/build.py training_args: the choices that change a step
        args = TrainingArguments(**common, logging_steps=1, optim="adamw_torch", max_grad_norm=0.3, weight_decay=0.0,
                                 logging_nan_inf_filter=False, include_num_input_tokens_seen="all")
        if kind == "stage4":  # transformers' Trainer as stage 4 ran it before bookkeeping_trainer
            trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks)
        else:  # "stage4-host": stage 4's Trainer now (tasks/engine/build.py bookkeeping_trainer)
            from tasks.engine.build import bookkeeping_trainer

            trainer = bookkeeping_trainer()(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=callbacks)
    trainer.train()
    if not profile:
        return {}
    return {"ops": op_counts(probe.prof), "sync_sites": dict(probe.sites.sites.most_common()), "wall_s": probe.wall}


GLUE = {  # Trainer methods around the model's forward and backward: host work that the own loop does not do
    "get_batch_samples (fetch + collate + to device, 4 micro-batches)": ("transformers.Trainer", "get_batch_samples"),
    "floating_point_ops (per micro-batch)": ("transformers.Trainer", "floating_point_ops"),
    "_track_num_input_tokens (per micro-batch)": ("transformers.Trainer", "_track_num_input_tokens"),
    "_clip_grad_norm": ("transformers.Trainer", "_clip_grad_norm"),
    "_maybe_log_save_evaluate (log, callbacks)": ("transformers.Trainer", "_maybe_log_save_evaluate"),
    "callback on_step_end": ("transformers.trainer_callback.CallbackHandler", "on_step_end"),
    "model.train() per micro-batch": ("torch.nn.Module", "train"),
}


def time_glue():
    """Wrap GLUE's methods with wall-clock accumulators; returns the totals (ms) and the call counts."""
    import importlib

    totals, calls = collections.Counter(), collections.Counter()
    for label, (owner, attr) in GLUE.items():
        module, cls = owner.rsplit(".", 1)
        klass = getattr(importlib.import_module(module), cls)
        original = getattr(klass, attr)

        depth = collections.Counter()

        def wrapped(*args, _original=original, _label=label, _depth=depth, **kwargs):
            if _depth[_label]:  # Module.train recurses into the children: time the outermost call only
                return _original(*args, **kwargs)
            _depth[_label] += 1
            t = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                _depth[_label] -= 1
                totals[_label] += (time.perf_counter() - t) * 1e3
                calls[_label] += 1
        setattr(klass, attr, wrapped)
    return totals, calls


def summarize(results: dict, top: int) -> dict:
    names = list(results)
    keys = sorted(set().union(*(r["ops"] for r in results.values())))
    aten = {n: sum(c for k, c in r["ops"].items() if k.startswith("aten::")) for n, r in results.items()}
    syncs = {n: {k: r["ops"].get(k, 0) for k in SYNC_OPS} for n, r in results.items()}
    base = names[0]
    diff = []
    for k in keys:
        counts = {n: results[n]["ops"].get(k, 0) for n in names}
        spread = max(counts.values()) - counts[base]
        if spread or any(c == 0 for c in counts.values()):
            if k.startswith(("aten::", "autograd::", "Optimizer", "ChunkedLogProb", "Lora", "CheckpointFunction")) or spread:
                diff.append({"op": k, **counts})
    diff.sort(key=lambda d: -max(abs(d[n] - d[base]) for n in names))
    return {"aten_ops_per_step": aten, "sync_ops_per_step": syncs, "sync_sites": {n: r["sync_sites"] for n, r in results.items()}, "wall_s_cpu": {n: round(r["wall_s"], 3) for n, r in results.items()},
            "ops_differing": diff[:top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--len", type=int, default=128, help="tokens per row (the GPU runs 2,048)")
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per path; the last one is profiled")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--paths", default="own,sft,stage4,stage4-host")
    ap.add_argument("--trl-compact", type=int, default=1, help="1: TRL's head takes its CUDA branch (boolean indexing)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--attention", default="stub", choices=("stub", "varlen"),
                    help="stub: one op for attention on every path (default); varlen: the Trainer paths register the varlen "
                         "attention as gpu_bench does (CPU: one sdpa per sample), the own loop keeps sdpa")
    ap.add_argument("--out", default="/tmp/trainer_gap")
    ap.add_argument("--time-glue", action="store_true",
                    help="time the Trainer's host work around the model (GLUE) per optimizer step instead of counting ops; "
                         "use the GPU's row geometry: --len 2048 --layers 32 (hidden stays tiny)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.trl_compact:
        import trl.trainer.utils as trl_utils

        trl_utils._use_triton = lambda device: True  # only the head's branch; its kernels stay the torch tiles
    from bench.workload import build_tokenizer

    tok = build_tokenizer(a.vocab)
    data = rows(a.micro * a.accum * a.steps, a.len, a.vocab, seed=0)
    if a.time_glue:
        glue = {}
        for path in [p for p in a.paths.split(",") if p != "own"]:
            totals, calls = time_glue()
            model = tiny_model(a.layers, a.vocab, seed=0)
            trainer_path(model, data, a.micro, a.accum, a.steps, path, tok, a.attention, profile=False)
            glue[path] = {k: {"ms_per_step": round(v / a.steps, 2), "calls_per_step": calls[k] / a.steps} for k, v in totals.items()}
            import importlib
            for label, (owner, attr) in GLUE.items():  # unwrap for the next path
                module, cls = owner.rsplit(".", 1)
                klass = getattr(importlib.import_module(module), cls)
                setattr(klass, attr, getattr(klass, attr).__kwdefaults__["_original"])
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "trainer_glue_cpu.json").write_text(json.dumps({"args": vars(a), "glue": glue}, indent=1))
        print(json.dumps(glue, indent=1))
        return
    results = {}
    for path in a.paths.split(","):
        model = tiny_model(a.layers, a.vocab, seed=0)
        t = time.perf_counter()
        results[path] = own_loop(model, data, a.micro, a.accum, a.steps, a.attention) if path == "own" else \
            trainer_path(model, data, a.micro, a.accum, a.steps, path, tok, a.attention)
        print(f"{path}: {time.perf_counter() - t:.1f} s", flush=True)
    summary = summarize(results, a.top)
    meta = {"torch": torch.__version__, "layers": a.layers, "len": a.len, "micro": a.micro, "accum": a.accum, "vocab": a.vocab,
            "trl_compact": bool(a.trl_compact), "attention": a.attention, "note": "CPU, no Liger, no NF4: op counts and syncs, not GPU time"}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trainer_gap_cpu.json").write_text(json.dumps({"meta": meta, "summary": summary,
                                                           "ops": {n: r["ops"] for n, r in results.items()}}, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "ops_differing"}, indent=1))
    names = list(results)
    print("| op | " + " | ".join(names) + " |")
    for d in summary["ops_differing"]:
        print(f"| {d['op']} | " + " | ".join(str(d[n]) for n in names) + " |")


if __name__ == "__main__":
    main()
