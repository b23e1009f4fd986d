"""Issue 12: wall time of the whole evaluate stage for a profile (default demo), without training first.

Builds the profile's data (stage 1, cached under artifacts/), saves a freshly initialised LoRA adapter (B = 0, so
"tuned" answers equal the base's: the numbers are the BASE model's on both sides, the cost is the real one), then
runs `evaluate_heldout` exactly as stage 5 does and prints its seconds and the per-benchmark seconds.

    PYTHONPATH=$PWD python bench/eval_stage_time.py                     # demo profile, CPU
    PYTHONPATH=$PWD python bench/eval_stage_time.py --set eval.benchmarks=[]   # the embedded tasks alone
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()

    from peft import get_peft_model

    from tasks.common import fingerprint
    from tasks.config import load_config
    from tasks.data import load_dataset_records
    from tasks.evaluate import evaluate_heldout
    from tasks.models import load_base_model, lora_config, lora_targets, resolve_device, resolve_model

    cfg = load_config(profile=a.profile, overrides=a.overrides)
    device = resolve_device(cfg.device)
    data = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    adapter = Path(cfg.artifacts_dir) / "bench" / f"zero-adapter-{fingerprint(data.key, cfg.lora.model_dump(mode='json'))}"
    if not (adapter / "adapter_config.json").is_file():
        base = load_base_model(resolve_model(cfg.model, cfg.artifacts_dir), cfg.model, cfg.quant, device)
        get_peft_model(base, lora_config(cfg.lora, lora_targets(base, cfg.lora))).save_pretrained(adapter)
    train = SimpleNamespace(key=f"zero-{adapter.name}-{time.time()}", adapter_dir=str(adapter))  # fresh key: never a cache hit
    t0 = time.monotonic()
    rec = evaluate_heldout(data, train, cfg.model, cfg.quant, cfg.eval, cfg.device, cfg.artifacts_dir, print, system_prompt=cfg.data.system_prompt)
    wall = time.monotonic() - t0
    out = {"profile": a.profile, "overrides": a.overrides, "evaluate_s": round(wall, 1),
           "benchmarks_s": {k: v["seconds"] for k, v in rec.benchmarks.items()},
           "embedded_accuracy": rec.base.get("accuracy"), "n_prompts": rec.n_prompts,
           "metrics": {k: {m: v["base"] for m, v in s["metrics"].items()} for k, s in rec.benchmarks.items()},
           "answers": rec.benchmarks.get("alpaca_eval", {}).get("answers", {}).get("base")}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
