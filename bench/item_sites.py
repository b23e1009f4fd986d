"""Where the fused engine's per-step `Tensor.item` calls come from (issue 19: 942 a step on the 15 GiB H100 stage,
~one per decoder-layer forward). Builds a random Mistral through the stage's own `build_model` (engine fused,
checkpointing, Liger on CUDA), runs forward + backward on one packed micro-batch under bf16 autocast, and counts each
Python-level `Tensor.item` call by its call site (3 frames), with the wall time spent inside it.

    PYTHONPATH=$PWD python bench/item_sites.py --device cuda --layers 8 --dropout 0.05 --out $OUT/items.json
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", default="")
    ap.add_argument("--artifacts", default="/tmp/item-sites-art", help="where the random model folder is written")
    args = ap.parse_args(argv)

    import torch

    from tasks.config import load_config
    from tasks.engine.build import build_model
    from tasks.engine.collate import collator_for
    from tasks.models import resolve_model

    art = args.artifacts
    shape = {"hidden_size": args.hidden, "intermediate_size": args.hidden * 11 // 4, "num_hidden_layers": args.layers,
             "num_attention_heads": 16, "num_key_value_heads": 4, "vocab_size": 32000}
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", "model.name=random:mistral",
                                                 f"model.random_config={json.dumps(shape)}"])
    lora = cfg.lora.model_copy(update={"dropout": args.dropout, "r": 16, "alpha": 32})
    model = build_model(resolve_model(cfg.model, art), cfg.model, cfg.quant, lora, True, args.device, "fused")
    collate = collator_for("fused", 0, model)
    g = torch.Generator().manual_seed(0)
    lengths, left = [], args.tokens
    while left > 0:
        n = min(left, int(torch.randint(60, 400, (1,), generator=g)))
        lengths.append(n)
        left -= n
    rows = [{"input_ids": (ids := torch.randint(3, 30000, (n,), generator=g).tolist()), "labels": [-100] * (n // 3) + ids[n // 3:]}
            for n in lengths]
    batch = {k: v.to(args.device) if isinstance(v, torch.Tensor) else v for k, v in collate(rows).items()}
    model.train()
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda")

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        if args.device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up: Triton/Liger compiles, first-call work
    calls: dict = collections.defaultdict(lambda: [0, 0.0])
    orig = torch.Tensor.item

    def item(self):
        frames = traceback.extract_stack(limit=5)[:-1]
        site = " <- ".join(f"{f.filename.split('site-packages/')[-1].split('/tasks/')[-1]}:{f.lineno}:{f.name}" for f in reversed(frames[-3:]))
        t0 = time.perf_counter()
        try:
            return orig(self)
        finally:
            c = calls[(str(self.device), site)]
            c[0] += 1
            c[1] += time.perf_counter() - t0

    torch.Tensor.item = item
    t0 = time.perf_counter()
    try:
        step()
    finally:
        torch.Tensor.item = orig
    wall = time.perf_counter() - t0
    sites = sorted(({"device": d, "site": s, "calls": n, "ms": round(t * 1e3, 2)} for (d, s), (n, t) in calls.items()),
                   key=lambda r: -r["calls"])
    out = {"layers": args.layers, "hidden": args.hidden, "dropout": args.dropout, "tokens": args.tokens, "samples": len(lengths),
           "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "step_ms": round(wall * 1e3, 1),
           "item_calls": sum(r["calls"] for r in sites), "sites": sites}
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
