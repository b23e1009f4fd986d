"""How the merge check separates correct merges from wrong ones, on a trained adapter (issue 11).

Runs (or reuses, content-keyed) the data/probe/train stages of a profile, loads the adapter on its base exactly as
training did, and measures the check of tasks/merge.py for: correct merges saved in fp32 / bf16 / fp16, and three
wrong ones saved in bf16 — every LoRA scale x2 and x0.5, one module left out, and PEFT's merge into the 4-bit
weights (re-quantizing W + dW to NF4). Prints one row per case and writes JSON.

    python bench/merge_check.py --profile tiny --set quant.cpu_fallback=qlora --out merge_check_tiny.json   # CPU, NF4
    python bench/merge_check.py --profile demo --minutes 1.5 --set device=cuda --set model.name=/tmp/smol \
        --set model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf --set artifacts_dir=/tmp/qlp-gpu-artifacts --out $OUT/merge_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--out", default="merge_check.json")
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tasks import merge as M
    from tasks.config import load_config
    from tasks.data import load_dataset_records
    from tasks.models import compute_dtype, load_base_model, load_tokenizer, model_code_revisions, resolve_device, resolve_model, uses_4bit
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    cfg = load_config(profile=args.profile, overrides=args.overrides, minutes=args.minutes)
    art, device = cfg.artifacts_dir, resolve_device(cfg.device)
    data = load_dataset_records(cfg.data, cfg.model, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, device, art)
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    ref = resolve_model(cfg.model, art)
    tok = load_tokenizer(ref, cfg.model)
    model = PeftModel.from_pretrained(load_base_model(ref, cfg.model, cfg.quant, device), train.adapter_dir).eval()
    batch = M.check_batch(data, cfg.merge.check_prompts, tok.pad_token_id, device)
    layers = [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, BaseTunerLayer)]
    states = {f"correct {d}".replace("torch.", ""): (M.merged_state_dict(model, d)[0], d) for d in (torch.float32, torch.bfloat16, torch.float16)}
    for factor in (2.0, 0.5):
        for _, m in layers:
            m.scaling["default"] *= factor
        states[f"scale x{factor:g}"] = (M.merged_state_dict(model, torch.bfloat16)[0], torch.bfloat16)
        for _, m in layers:
            m.scaling["default"] /= factor
    left = dict(states["correct bfloat16"][0])
    name, layer = layers[len(layers) // 2]
    left[name + ".weight"] = M._as_source_layout(layer.get_base_layer(), M._dense_weight(layer.get_base_layer().weight)).to(torch.bfloat16).cpu()
    states[f"left out: {name}"] = (left, torch.bfloat16)
    if uses_4bit(cfg.quant, device):
        requant = copy.deepcopy(model)
        requant.merge_adapter()  # PEFT on bnb 4-bit layers: dequantize, add, re-quantize
        four = dict(states["correct bfloat16"][0])
        for n, m in requant.get_base_model().named_modules():
            if isinstance(m, BaseTunerLayer):
                four[n + ".weight"] = M._as_source_layout(m.get_base_layer(), M._dense_weight(m.get_base_layer().weight)).to(torch.bfloat16).cpu()
        states["merged into 4-bit"] = (four, torch.bfloat16)
        del requant
    reference, without = M.reference_logits(model, batch)
    base = model.get_base_model()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (state, dtype) in states.items():
            t0 = time.monotonic()
            out = Path(tmp) / label.replace(" ", "_").replace(":", "")
            M.save_merged(state, base.config, base.generation_config, dtype, out, code_revisions=model_code_revisions(cfg.model),
                          trust_remote_code=cfg.model.trust_remote_code, revision=ref.revision)  # as stage 6 calls it
            check = M.verify_merged(out, batch, reference, without, dtype, device, reference_dtype=compute_dtype(cfg.quant, device))
            rows.append({"case": label, **check.model_dump(), "seconds": round(time.monotonic() - t0, 2)})
            print(f"{label:40s} KL {check.kl_mean:.2e}  top-1 {check.top1_agreement:.2%}  mean|d| {check.mean_abs_diff:.2e}  "
                  f"max|d| {check.max_abs_diff:.2e}  unreproduced {check.unreproduced}  passed {check.passed}", flush=True)
    meta = {"profile": args.profile, "overrides": args.overrides, "device": device, "modules": len(layers), "train_steps": train.steps,
            "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "peft")}}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
