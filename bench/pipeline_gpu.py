"""The pipeline's own stages on a GPU: data -> probe -> train with a short time budget, Mistral-7B shapes.

Runs the real stage functions (not the benchmark harness) on the random-weight Mistral-7B-v0.1
architecture (exact shapes: hidden 4096, 32 layers, GQA 8 KV heads, vocab 32000) with the seed's QLoRA
recipe, on a synthetic mixed-length chat set (log-normal lengths, median ~500 tokens, capped at 2048), and
reports s/step, tokens/s, peak GB and the training stage's budget error. Prefect is not needed.

    python bench/pipeline_gpu.py --engine fast --minutes 3 --out results.json
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
    ap.add_argument("--engine", default="fast", choices=["fast", "padded"])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--vram-gb", type=float, default=None)
    ap.add_argument("--artifacts", default="/tmp/qlp-artifacts")
    ap.add_argument("--out", default="pipeline_gpu.json")
    args = ap.parse_args()

    import torch

    from tasks.config import load_config
    from tasks.data import load_dataset_records
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    data_path = Path(args.artifacts) / "mixed.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    mixed_chats(data_path, 3000)
    overrides = [
        "model.name=random:mistral",
        "model.random_config=" + json.dumps(MISTRAL_7B),
        f"data.source={data_path}",
        "data.heldout_size=50",
        f"training.engine={args.engine}",
        "training.checkpoint_minutes=1.5",
        f"artifacts_dir={args.artifacts}",
    ]
    if args.vram_gb:
        overrides.append(f"budget.vram_gb={args.vram_gb}")
    cfg = load_config(profile="mistral-7b", overrides=overrides, minutes=args.minutes)
    log = lambda m: print(m, flush=True)  # noqa: E731

    t = time.monotonic()
    data = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    log(f"data: {data.n_train} train rows, {data.train_tokens:,} tokens, dropped {data.dropped} in {time.monotonic() - t:.0f}s (includes building the random 7B)")
    t = time.monotonic()
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, cfg.device, cfg.artifacts_dir, log)
    log(f"probe: {probe.s_per_step:.2f} s/step, {probe.tokens_per_s:,.0f} tok/s, peak {probe.peak_mem_gb:.2f} GB, "
        f"load {probe.load_seconds:.0f}s, save {probe.save_seconds:.1f}s -> {probe.max_steps} steps ({time.monotonic() - t:.0f}s)")
    torch.cuda.reset_peak_memory_stats()
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.artifacts_dir, log)
    peak = torch.cuda.max_memory_allocated() / 2**30
    tok_s = train.tokens_seen / max(train.wall_seconds - probe.load_seconds, 1e-9)
    result = {
        "card": torch.cuda.get_device_name(0), "engine": args.engine, "budget_s": train.budget_seconds,
        "wall_s": train.wall_seconds, "budget_error": train.budget_error, "stopped_by": train.stopped_by,
        "steps": train.steps, "expected_steps": train.expected_steps, "tokens_seen": train.tokens_seen,
        "train_tokens_per_s_excl_load": round(tok_s), "probe_s_per_step": probe.s_per_step,
        "probe_tokens_per_s": probe.tokens_per_s, "peak_gb_train": round(peak, 2), "trainable": train.trainable_params,
        "first_loss": train.first_loss, "final_loss": train.final_loss,
        "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft", "bitsandbytes")},
    }
    print(json.dumps(result, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
