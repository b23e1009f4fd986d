"""Each GPU profile's architecture at its real shapes (random weights, nothing downloaded) through the default CUDA
engine (fused): loss parity with PEFT's own LoRA forward, then the probe's tokens/s and peak memory (issue 20.3).

Per profile of pipeline.yaml (llama-3.1-8b, qwen2.5-7b, gemma-3-4b, gemma-3-12b, phi-4-mini, mistral-7b-v0.3,
qwen3-moe-30b), with the profile's own LoRA / training / budget settings and `model.name=random:<type>` at the shapes
in SHAPES (from the models' published config.json):

1. parity: the model built twice, engine `fast` (PEFT's LoRA forward) and `fused` (tasks/engine/lora.py), LoRA dropout 0,
   the same seed, LoRA-B nudged off zero, the same packed micro-batches, AdamW: per-step loss, relative difference
   (target <= 1e-3). On a MoE model the experts' LoRA (PEFT target_parameters) runs PEFT's forward in both.
2. throughput: stage 3 (`probe_throughput`) with the profile's engine and budget.vram_gb (auto = the card's free
   memory): micro-batch found, layers freed from recompute, s/step, tokens/s, peak GiB, trainable parameters.

    python bench/gpu_archs.py --profiles llama-3.1-8b --out $OUT/llama.json       # one profile per device call (<10 min)
    python bench/gpu_archs.py --smoke --out /tmp/archs.json                       # every profile, 2 tiny layers, on CPU: plumbing
    python bench/gpu_archs.py --profiles qwen3-moe-30b --set 'lora.target_modules=[q_proj,k_proj,v_proj,o_proj]' --out x.json
                                                                                  # the MoE with its experts frozen: their LoRA's cost
    python bench/gpu_archs.py --profiles qwen3-moe-30b --in-memory --no-parity --one-trial --out $OUT/moe48.json
                                                                                  # all 48 layers of Qwen3-30B-A3B, no 61 GB folder

The random model folder (up to 61 GB for Qwen3-30B-A3B in bf16) is deleted after each profile. `--in-memory`
(model.random_weights=memory) writes none: each build makes the random weights on the GPU (seed 0, the folder's values)
and hands them to from_pretrained as a state dict, so the same layers are NF4 as from the folder (tests/test_architectures.py
checks module types, trainable parameters and loss against the folder path on CPU). The load peaks higher than a
folder's: the state dict and the model's copies of the 16-bit tensors are held at once (Qwen3-30B-A3B on an H200:
112 GiB while loading, 63 GiB in the steps; the probe records both, `load_peak_mem_gb` and `train_peak_mem_gb`).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import time
from pathlib import Path

# Real shapes (config.json of each model on the hub, as published); dtype bf16 halves the random folder.
SHAPES = {
    "llama-3.1-8b": ("llama", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                               "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}),
    "qwen2.5-7b": ("qwen2", {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                             "num_key_value_heads": 4, "vocab_size": 152064, "rope_theta": 1000000.0, "tie_word_embeddings": False}),
    "gemma-3-4b": ("gemma3", {"text_config": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
                                              "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208, "sliding_window": 1024},
                              "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                                "num_attention_heads": 16, "image_size": 896, "patch_size": 14},
                              "mm_tokens_per_image": 256}),
    "gemma-3-12b": ("gemma3", {"text_config": {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
                                               "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208, "sliding_window": 1024},
                               "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                                                 "num_attention_heads": 16, "image_size": 896, "patch_size": 14},
                               "mm_tokens_per_image": 256}),
    "phi-4-mini": ("phi3", {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
                            "num_key_value_heads": 8, "vocab_size": 200064, "partial_rotary_factor": 0.75, "tie_word_embeddings": True}),
    "mistral-7b-v0.3": ("mistral", {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                    "num_key_value_heads": 8, "vocab_size": 32768, "rope_theta": 1000000.0, "sliding_window": None}),
    "qwen3-moe-30b": ("qwen3_moe", {"hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                                    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                                    "num_experts_per_tok": 8, "vocab_size": 151936, "tie_word_embeddings": False}),
}
# The demo-gpu showcase's model (Gemma-3-270M base): 5 of every 6 layers attend within a 512-token window.
SHAPES["demo-gpu"] = ("gemma3_text", {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18, "num_attention_heads": 4,
                                      "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144, "sliding_window": 512,
                                      "query_pre_attn_scalar": 256, "max_position_embeddings": 32768})
SMOKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def shapes(profile: str, smoke: bool, layers: int | None = None) -> tuple[str, dict]:
    arch, real = SHAPES[profile]
    if not smoke:
        if layers and "text_config" in real:
            real = {**real, "text_config": {**real["text_config"], "num_hidden_layers": layers}}
        elif layers:
            real = {**real, "num_hidden_layers": layers}
        return arch, {**real, "dtype": "bfloat16"}
    if "text_config" in real:
        return arch, {**real, "text_config": {**SMOKE, "head_dim": 16}, "mm_tokens_per_image": 4,
                      "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "image_size": 28, "patch_size": 14}}
    small = {k: v for k, v in real.items() if k not in SMOKE and k != "vocab_size"}
    small.update(SMOKE)
    if "num_experts" in real:
        small.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if "head_dim" in real:
        small["head_dim"] = 16
    return arch, small


def parity(cfg, data, device: str, steps: int, engines: list[str]) -> dict:
    """Per-step loss of each engine against the first (PEFT's own forward: `fast`, or the seed recipe: `padded`), same
    rows in the same micro-batches of 4, dropout 0. `<engine>-noliger` builds the engine without Liger's kernels."""
    import torch

    from tasks.data import load_split
    from tasks.engine.build import build_model
    from tasks.engine.collate import collator_for
    from tasks.models import load_tokenizer, resolve_model

    ref = resolve_model(cfg.model, cfg.artifacts_dir)
    tok = load_tokenizer(ref, cfg.model)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in load_split(data, "train").select(range(4 * steps))]
    lora = cfg.lora.model_copy(update={"dropout": 0.0})
    losses = {}
    for name in engines:
        engine = name.removesuffix("-noliger")
        torch.manual_seed(0)
        model = build_model(ref, cfg.model, cfg.quant, lora, cfg.training.gradient_checkpointing, device, engine,
                            liger=not name.endswith("-noliger"))
        with torch.no_grad():
            for i, (n, p) in enumerate(model.named_parameters()):
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator(p.device).manual_seed(i))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        collate = collator_for(engine, tok.pad_token_id, model)
        losses[name] = []
        for i in range(steps):
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate(rows[4 * i:4 * i + 4]).items()}
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(loss.item())
        del model, opt, loss, batch
        gc.collect()  # PEFT models sit in reference cycles: without this the last one stays allocated into the probe's first trial
        if device == "cuda":
            torch.cuda.empty_cache()
    first = engines[0]
    out = {"rows_tokens": [len(r["input_ids"]) for r in rows], "loss": losses, "reference": first}
    for name in engines[1:]:
        out[f"rel_diff_{name}"] = max(abs(a - b) / abs(a) for a, b in zip(losses[first], losses[name]))
    worst = max((out[f"rel_diff_{n}"] for n in engines[1:]), default=0.0)
    out.update(max_rel_diff=worst, **{"passes_1e-3": worst <= 1e-3})
    return out


def window_check(device: str, window: int = 512, lengths=(1500, 300, 700, 40)) -> dict:
    """The varlen attention of a packed row with samples beyond a sliding window against fp32 sdpa with transformers'
    windowed mask (each query sees itself and window - 1 keys before it), sample by sample, and against masks one key
    narrower and wider: the right window has by far the smallest difference (peaked attention, q scaled 4x, so one
    key more or less moves outputs visibly). bf16, GQA 4:1, head_dim 256 as Gemma-3-270M."""
    import torch

    from tasks.engine.fastpath import varlen_attention_forward

    g = torch.Generator(device).manual_seed(0)
    T, hq, hkv, d = sum(lengths), 4, 1, 256
    q, k, v = (torch.randn(1, h, T, d, device=device, dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv))
    q = q * 4
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    module = torch.nn.Module().eval()
    out, _ = varlen_attention_forward(module, q, k, v, None, scaling=d ** -0.5, sliding_window=window, cu_seq_lens_q=cu,
                                      max_length_q=max(lengths))
    diffs, bounds = {}, cu.tolist()
    for w in (window - 1, window, window + 1):
        worst = 0.0
        for a, b in zip(bounds, bounds[1:]):
            i = torch.arange(b - a, device=device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, a:b].float(), k[:, :, a:b].float().repeat_interleave(hq // hkv, 1),
                v[:, :, a:b].float().repeat_interleave(hq // hkv, 1), attn_mask=mask[None, None], scale=d ** -0.5)
            worst = max(worst, (out[0, a:b].float() - ref[0].transpose(0, 1)).abs().max().item())
        diffs[f"window_{w}"] = worst
    return {"window": window, "lengths": list(lengths), "max_abs_diff_vs_fp32_sdpa": diffs,
            "matches_window": min(diffs, key=diffs.get) == f"window_{window}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profiles", default=",".join(SHAPES), help="comma-separated profiles of pipeline.yaml")
    ap.add_argument("--smoke", action="store_true", help="2 tiny layers of each architecture on CPU: plumbing only")
    ap.add_argument("--steps", type=int, default=5, help="parity steps")
    ap.add_argument("--engines", default="fast,fused",
                    help="parity: engines compared with the first, e.g. padded,fast-noliger,fast,fused (-noliger: without Liger)")
    ap.add_argument("--no-probe", action="store_true", help="parity only")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers instead of the real count (a smaller random folder)")
    ap.add_argument("--in-memory", action="store_true",
                    help="model.random_weights=memory: random weights built on the device at each build, no model folder written")
    ap.add_argument("--no-parity", action="store_true", help="skip the parity builds (two more models): the probe only")
    ap.add_argument("--one-trial", action="store_true",
                    help="one probe trial: the profile's micro-batch with every layer recomputed (budget.vram_gb=null: no memory search)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra pipeline.yaml overrides, e.g. --set 'lora.target_modules=[q_proj,k_proj,v_proj,o_proj]' (experts frozen)")
    ap.add_argument("--artifacts", default="/tmp/qlp-archs")
    ap.add_argument("--out", default="gpu_archs.json")
    args = ap.parse_args()

    import torch

    from tasks.config import load_config
    from tasks.data import load_dataset_records
    from tasks.models import resolve_model
    from tasks.preflight import check_model
    from tasks.probe import probe_throughput

    spec = importlib.util.spec_from_file_location("pipeline_gpu", Path(__file__).with_name("pipeline_gpu.py"))
    pipeline_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline_gpu)
    data_path = Path(args.artifacts) / "mixed.jsonl"
    data_path.parent.mkdir(parents=True, exist_ok=True)
    pipeline_gpu.mixed_chats(data_path, 400 if args.smoke else 1500)

    device = "cpu" if args.smoke else "cuda"
    results = {}
    log = lambda m: print(m, flush=True)  # noqa: E731
    for profile in args.profiles.split(","):
        arch, random_config = shapes(profile, args.smoke, args.layers)
        overrides = [f"model.name=random:{arch}", f"model.random_config={json.dumps(random_config)}", f"data.source={data_path}",
                     "data.heldout_size=20", "data.max_length=2048", f"artifacts_dir={args.artifacts}", f"device={device}",
                     "data.dedupe=[]"]  # synthetic chats, no benchmark text in them (and the device has no hub to read the benchmarks from)
        if args.in_memory:
            overrides += ["model.random_weights=memory"]
        if args.one_trial:
            overrides += ["budget.vram_gb=null", "training.gradient_checkpointing=true"]
        if args.smoke:
            overrides += ["data.max_length=256", "training.engine=fused", "budget.vram_gb=null", "training.micro_batch_size=2",
                          "training.grad_accum=1"]
        cfg = load_config(profile=profile, overrides=overrides + args.overrides, minutes=5)
        r: dict = {"arch": arch, "random_config": random_config, "overrides": args.overrides}
        try:
            t0 = time.monotonic()
            r["model_check"] = check_model(cfg.model, cfg.lora, cfg.quant, cfg.device, cfg.artifacts_dir, engine=cfg.training.engine)  # builds the random model once
            log(f"{profile}: random:{arch} built in {time.monotonic() - t0:.0f}s; " + " | ".join(r["model_check"]))
            data = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
            if arch.startswith("gemma3"):
                r["window_check"] = window_check(device)
                log(f"window check: {r['window_check']}")
            if not args.no_parity:
                r["parity"] = parity(cfg, data, device, args.steps, args.engines.split(","))
                log(f"{profile}: parity losses {json.dumps(r['parity']['loss'])}")
                log(f"{profile}: parity max rel diff {r['parity']['max_rel_diff']:.2e} over {args.steps} steps")
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            probe = None if args.no_probe else probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget,
                                                                cfg.device, cfg.artifacts_dir, log)
            if probe is not None:
                r["probe"] = {k: getattr(probe, k) for k in ("engine", "micro_batch_size", "grad_accum", "gradient_checkpointing",
                                                          "recompute_free_layers", "s_per_step", "tokens_per_s", "peak_mem_gb",
                                                          "vram_budget_gb", "load_seconds", "hardware", "trials")}
                log(f"{profile}: {probe.tokens_per_s:,.0f} tokens/s, peak {probe.peak_mem_gb:.2f} GiB ({len(probe.trials)} trial(s), "
                    f"model built in {probe.load_seconds:.0f} s); {time.monotonic() - t0:.0f} s for the profile")
        except Exception as e:  # one profile's failure is a result; the next profile still runs
            r["error"] = f"{type(e).__name__}: {e}"
            log(f"{profile}: FAILED {r['error']}")
        finally:
            shutil.rmtree(resolve_model(cfg.model, cfg.artifacts_dir).path, ignore_errors=True)  # up to 61 GB per model
        r["versions"] = {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}
        results[profile] = r
        Path(args.out).write_text(json.dumps(results, indent=1))  # after each profile: a timeout keeps what finished
    print("\n| profile | arch | parity max rel | micro x accum | free layers | s/step | tokens/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for profile, r in results.items():
        p, q = r.get("parity", {}), r.get("probe", {})
        print(f"| {profile} | {r['arch']} | {p.get('max_rel_diff', float('nan')):.1e} | {q.get('micro_batch_size')} x {q.get('grad_accum')} | "
              f"{q.get('recompute_free_layers')} | {q.get('s_per_step')} | {q.get('tokens_per_s')} | {q.get('peak_mem_gb')} |"
              + (f" {r['error']}" if "error" in r else ""))


if __name__ == "__main__":
    main()
