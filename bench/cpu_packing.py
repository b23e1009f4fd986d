"""Issue 18.3: real tokens per second of the CPU training step, padded (the seed recipe's batches) vs packed
(the `fast` engine: padding-free rows, no cross-sample attention), on a profile's real data and model.

Each setting is stage 3 itself (`probe_throughput`: the model loaded as training loads it, warm-up steps, timed
steps on real batches), so the numbers are what the pipeline would plan with. Run on a quiet machine:

    python bench/cpu_packing.py --profile demo-gemma --out bench/results/cpu-packing.json
    python bench/cpu_packing.py --profile demo --steps 3 --set data.max_length=256
    python bench/cpu_packing.py --profile demo-gemma --runs packed-full,packed-full-all-logits --steps 2   # the LM head on trained positions only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.config import load_config  # noqa: E402
from tasks.data import load_dataset_records  # noqa: E402
from tasks import probe as probe_module  # noqa: E402
from tasks.engine import fastpath  # noqa: E402
from tasks.probe import PROBE_VERSION, probe_throughput  # noqa: E402

ACCEPTS = fastpath.accepts_logits_to_keep

SETTINGS = {  # name: training-section overrides
    "padded": {"engine": "padded"},
    "packed-full": {"engine": "fast", "packing": "full"},
    "packed-matched": {"engine": "fast", "packing": "matched"},
    # packed-full with the LM head on every position (before 2026-12-01 the only way): what `keep_logits` saves
    "packed-full-all-logits": {"engine": "fast", "packing": "full"},
}
ALL_LOGITS = {"packed-full-all-logits"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="demo-gemma")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=value overrides, as the CLI's --set")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per setting")
    ap.add_argument("--runs", default=",".join(SETTINGS), help="comma-separated subset of " + ", ".join(SETTINGS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cfg = load_config(profile=a.profile, overrides=[*a.set, "budget.minutes=60"])
    data = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    budget = cfg.budget.model_copy(update={"probe_warmup_steps": 1, "probe_steps": a.steps})
    rows = []
    for name in a.runs.split(","):
        training = cfg.training.model_copy(update=SETTINGS[name])
        if name in ALL_LOGITS:  # its own probe key, and the collator told the model cannot keep logits
            probe_module.PROBE_VERSION = f"{PROBE_VERSION}-all-logits"
            fastpath.accepts_logits_to_keep = lambda model: False
        else:
            probe_module.PROBE_VERSION, fastpath.accepts_logits_to_keep = PROBE_VERSION, ACCEPTS
        t0 = time.monotonic()
        rec = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, training, budget, "cpu", cfg.artifacts_dir)
        row = {"setting": name, "tokens_per_s": round(rec.tokens_per_s, 1), "s_per_step": round(rec.s_per_step, 2),
               "tokens_per_step": round(rec.tokens_per_step), "wall_s": round(time.monotonic() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"profile": a.profile, "model": cfg.model.name, "max_length": cfg.data.max_length,
              "micro_batch_size": cfg.training.micro_batch_size, "grad_accum": cfg.training.grad_accum,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"), "runs": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
