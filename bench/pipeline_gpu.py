"""The pipeline's own stages on a GPU: data -> probe -> train with a short time budget, Mistral-7B shapes.

Runs the real stage functions (not the benchmark harness) on the random-weight Mistral-7B-v0.1
architecture (exact shapes: hidden 4096, 32 layers, GQA 8 KV heads, vocab 32000) with the seed's QLoRA
recipe, on a synthetic mixed-length chat set (log-normal lengths, median ~500 tokens, capped at 2048), and
reports s/step, tokens/s, peak GB and the training stage's budget error. Prefect is not needed.

    python bench/pipeline_gpu.py --engine fast --minutes 3 --out results.json
    python bench/pipeline_gpu.py --gpus 1,2 --minutes 1.5 --out multi.json   # issue 8: 1 then 2 GPUs, same data
    python bench/pipeline_gpu.py --engine fused --vram-gb 15 --minutes 1.5 --set training.compile=layers --out c.json  # issue 19

With `--gpus 1,2` it runs the probe + training stage once per GPU count (training.gpus=N: N > 1 goes through
torchrun, tasks/engine/launch.py) on the same data and model, and adds the scaling (tokens/s with N GPUs over 1) and
the loss parity: the same global batch (micro x accum) sees the same packs at step k whatever N is, so step 1's
loss must agree to bf16 noise; later steps drift apart slowly because the LR schedule runs on time, and N
GPUs reach step k sooner.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

MISTRAL_7B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768, "rope_theta": 10000.0,
    "sliding_window": 4096, "dtype": "bfloat16",
}
WORDS = "apple river stone cloud garden window candle pencil forest bridge silver orange rabbit castle summer".split()


def mixed_chats(path: Path, n: int, seed: int = 0) -> None:
    """Conversations whose token counts follow a log-normal (median ~500, p95 ~1,700), as real SFT data does."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            tokens = min(int(math.exp(rng.gauss(math.log(500), 0.75))), 2000)
            words = max(tokens // 2, 4)  # the byte-level BPE averages ~2 tokens per word here
            q = " ".join(rng.choice(WORDS) for _ in range(max(words // 4, 2)))
            a = " ".join(rng.choice(WORDS) for _ in range(max(words - words // 4, 2)))
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="fast", choices=["fast", "fused", "padded"])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--vram-gb", type=float, default=None)
    ap.add_argument("--artifacts", default="/tmp/qlp-artifacts")
    ap.add_argument("--gpus", default="1", help="comma-separated GPU counts to run in turn, e.g. 1,2")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the Mistral-7B shapes (fewer: a quicker smoke run)")
    ap.add_argument("--out", default="pipeline_gpu.json")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides, after the bench's own (issue 19: training.compile=layers, "
                         "training.offload_activations=auto, training.optimizer=adamw_torch_fused)")
    args = ap.parse_args()

    data_path = Path(args.artifacts) / "mixed.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    mixed_chats(data_path, 3000)
    overrides = [
        "model.name=random:mistral",
        "model.random_config=" + json.dumps({**MISTRAL_7B, "num_hidden_layers": args.layers}),
        f"data.source={data_path}",
        "data.heldout_size=50",
        f"training.engine={args.engine}",
        "training.checkpoint_minutes=1.5",
        f"artifacts_dir={args.artifacts}",
    ]
    # No --vram-gb: one probe trial at the recipe's setting (4 x 4, all layers checkpointed). --vram-gb N: the search
    # (largest micro-batch that fits checkpointed, then as many layers without recompute as fit; tasks/probe.py).
    overrides.append(f"budget.vram_gb={args.vram_gb or 'null'}")
    overrides += args.extra
    log = lambda m: print(m, flush=True)  # noqa: E731
    counts = [int(g) for g in args.gpus.split(",")]
    results = []
    for n in counts:
        results.append(run_once(overrides + [f"training.gpus={n}"], args, log))
        out = results[0] if len(results) == 1 and len(counts) == 1 else {"runs": results, **compare(results)}
        Path(args.out).write_text(json.dumps(out, indent=1))  # after each run: a timeout keeps what finished
    print(json.dumps(out, indent=1), flush=True)
    if len(results) > 1:
        print("\n| GPUs | card | probe s/step | steps | wall / budget | budget error | tokens/s (excl. load) | per GPU | x 1 GPU | first loss | final loss |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['gpus']} | {r['card']} | {r['probe_s_per_step']:.2f} | {r['steps']} ({r['expected_steps']}) | {r['wall_s']:.1f} / {r['budget_s']:.0f} s | "
                  f"{r['budget_error']:+.2%} | {r['train_tokens_per_s_excl_load']:,} | {r['train_tokens_per_s_excl_load'] / r['gpus']:,.0f} | "
                  f"{r['train_tokens_per_s_excl_load'] / results[0]['train_tokens_per_s_excl_load']:.2f} | {r['first_loss']:.4f} | {r['final_loss']:.4f} |")
        print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)


def run_once(overrides: list[str], args, log) -> dict:
    import gc

    import torch

    from tasks.config import load_config
    from tasks.data import load_dataset_records
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    cfg = load_config(profile="mistral-7b", overrides=overrides, minutes=args.minutes)
    n = cfg.training.gpus
    t = time.monotonic()
    data = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    log(f"data: {data.n_train} train rows, {data.train_tokens:,} tokens, dropped {data.dropped} in {time.monotonic() - t:.0f}s (includes building the random 7B)")
    t = time.monotonic()
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, cfg.device, cfg.artifacts_dir, log)
    log(f"probe ({n} GPU): {probe.micro_batch_size} x {probe.grad_accum}, {probe.recompute_free_layers} layers without recompute, {probe.s_per_step:.2f} s/step, {probe.tokens_per_s:,.0f} tok/s, peak {probe.peak_mem_gb:.2f} GB, "
        f"load {probe.load_seconds:.0f}s, launch {probe.launch_seconds:.0f}s, checkpoint {probe.save_seconds:.1f}s, final save {probe.final_save_cost:.1f}s -> {probe.max_steps} steps ({time.monotonic() - t:.0f}s)")
    torch.cuda.reset_peak_memory_stats()
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.artifacts_dir, log)
    # One process: this process's peak. Several: the probe's (the largest rank's, same setting).
    peak = torch.cuda.max_memory_allocated() / 2**30 if n == 1 else probe.peak_mem_gb
    tok_s = train.tokens_seen / max(train.wall_seconds - probe.load_seconds - probe.launch_seconds, 1e-9)
    history = json.loads((Path(train.dir) / "log_history.json").read_text())
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "gpus": n, "card": torch.cuda.get_device_name(0), "engine": args.engine, "budget_s": train.budget_seconds,
        "wall_s": train.wall_seconds, "budget_error": train.budget_error, "stopped_by": train.stopped_by,
        "steps": train.steps, "expected_steps": train.expected_steps, "tokens_seen": train.tokens_seen,
        "train_tokens_per_s_excl_load": round(tok_s), "train_tokens_per_s_incl_load": round(train.tokens_seen / train.wall_seconds),
        "probe_s_per_step": probe.s_per_step, "probe_tokens_per_s": probe.tokens_per_s, "probe_launch_s": probe.launch_seconds,
        "probe_load_s": probe.load_seconds, "micro_batch_size": probe.micro_batch_size, "grad_accum_per_gpu": probe.grad_accum,
        "recompute_free_layers": probe.recompute_free_layers, "probe_trials": probe.trials, "layers": args.layers,
        "peak_gb_train": round(peak, 2), "trainable": train.trainable_params,
        "first_loss": train.first_loss, "final_loss": train.final_loss,
        "loss_curve": [round(h["loss"], 5) for h in history if "loss" in h],
        "overrides": args.extra, "compile": cfg.training.compile, "offload_activations": cfg.training.offload_activations,
        "optimizer": cfg.training.optimizer,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
    }


def compare(results: list[dict]) -> dict:
    """Scaling and loss parity of every run against the first (1 GPU)."""
    base = results[0]
    out = {"scaling": {}, "loss_parity": {}}
    for r in results[1:]:
        out["scaling"][f"{r['gpus']}_vs_{base['gpus']}"] = round(r["train_tokens_per_s_excl_load"] / base["train_tokens_per_s_excl_load"], 3)
        k = min(len(r["loss_curve"]), len(base["loss_curve"]))
        rel = [abs(a - b) / abs(b) for a, b in zip(r["loss_curve"][:k], base["loss_curve"][:k])]
        out["loss_parity"][f"{r['gpus']}_vs_{base['gpus']}"] = {
            "step1_rel_diff": round(rel[0], 6) if rel else None,
            "steps_compared": k,
            "max_rel_diff_first5": round(max(rel[:5]), 5) if rel else None,
            "mean_rel_diff_all": round(sum(rel) / k, 5) if k else None,
        }
    return out


if __name__ == "__main__":
    main()
