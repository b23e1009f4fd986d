"""Stage 5 on a finished demo adapter, outside the flow: the share measurements of docs/BENCHMARKS.md
("CPU demo: the training-data mix"), when a whole `make run` per share does not fit the machine's time.

    python bench/datamix_eval.py ARTIFACTS_DIR TRAIN_RECORD_JSON OUT_JSON [--set key=value ...]

Reads the demo profile (plus --set overrides, e.g. the data.mix the adapter was trained with), rebuilds or reuses
the data stage from the cache, and runs `evaluate_heldout` with the profile's eval settings.
"""

from __future__ import annotations

import json
import sys
import time

from tasks.common import read_json
from tasks.config import load_config
from tasks.data import load_dataset_records
from tasks.evaluate import evaluate_heldout
from tasks.train import TrainRecord


def main(argv: list[str]) -> int:
    art, train_json, out = argv[:3]
    sets = [a for a in argv[3:] if a != "--set"]
    cfg = load_config(profile="demo", overrides=[f"artifacts_dir={art}", *sets])
    t0 = time.monotonic()
    data = load_dataset_records(cfg.data, cfg.model, art)
    train = TrainRecord.model_validate(read_json(train_json))
    rec = evaluate_heldout(data, train, cfg.model, cfg.quant, cfg.eval, "cpu", art, log_fn=lambda m: print(m, flush=True),
                           system_prompt=cfg.data.system_prompt)
    result = {"data": data.model_dump(mode="json"), "train": train.model_dump(mode="json"), "eval": rec.model_dump(mode="json"),
              "eval_config": cfg.eval.model_dump(mode="json"), "seconds": round(time.monotonic() - t0, 1)}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: rec.model_dump(mode="json")[k] for k in ("base", "tuned", "verdict")}, indent=1)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
