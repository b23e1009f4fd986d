"""One table from a bench/gpu_bench.py results.json and a bench/unsloth_bench.py unsloth.json: every run's real
tokens/s and peak GiB, with its ratio to Unsloth on the same data (the fastest Unsloth run that finished on that
set: unsloth-full for full; unsloth-mixed or unsloth-packed-mixed for mixed, named under the table).

    python bench/unsloth_table.py OUT/results.json OUT/unsloth.json [--out OUT/unsloth_table.md]

The two files must describe the same workload on the same GPU: shapes, layers, optimizer and GPU name are compared
(a results.json from before --shapes / --optim existed counts as mistral-7b / paged_adamw_8bit, the only values then),
and a difference is one line naming it, exit status 2. Different step counts only add a note.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.workload import OPTIM  # noqa: E402

MUST_MATCH = {"shapes": "mistral-7b", "layers": None, "optim": OPTIM}  # key -> value assumed where a file lacks it


def recipe(r: dict) -> str:
    """gpu_bench's engine plus the switches that set the run apart; Unsloth's runs by their batching."""
    if r.get("engine") == "unsloth":
        return f"Unsloth, {r.get('batching', '?')}"
    extras = []
    if r.get("gradient_checkpointing") is False:
        extras.append("no recompute")
    if r.get("n_recompute_free"):
        extras.append(f"{r['n_recompute_free']} layers without recompute")
    if r.get("offload"):
        extras.append("checkpoints offloaded to host")
    if r.get("side_stream_offload"):
        extras.append("checkpoints offloaded to host, side stream")
    if r.get("compile_layers"):
        extras.append("decoder layers compiled")
    if r.get("lora_dropout") == "stored":
        extras.append("torch dropout, mask stored")
    return r.get("engine", "?") + (f" ({', '.join(extras)})" if extras else "")


def mismatches(ours: dict, theirs: dict) -> list[str]:
    """The workload keys (and the GPU) on which the two files' info blocks differ, as 'key A vs B'."""
    out = []
    for key, assumed in MUST_MATCH.items():
        a, b = ours.get(key, assumed), theirs.get(key, assumed)
        if a != b:
            out.append(f"{key} {a} vs {b}")
    gpu_a, gpu_b = ours.get("versions", {}).get("gpu"), theirs.get("versions", {}).get("gpu")
    if gpu_a != gpu_b:
        out.append(f"gpu {gpu_a} vs {gpu_b}")
    return out


def table(bench: dict, unsloth: dict) -> str:
    """Markdown: gpu_bench's runs, then Unsloth's, each with its ratio to the reference Unsloth run on its data."""
    refs: dict[str, dict] = {}
    for r in unsloth["results"]:
        if r.get("ok") and r["tokens_per_s"] > refs.get(r["data"], {}).get("tokens_per_s", 0):
            refs[r["data"]] = r
    lines = [f"GPU: {bench['info'].get('versions', {}).get('gpu')}",
             "| run | recipe | data | real tokens/s | peak GiB | x Unsloth |", "|---|---|---|---|---|---|"]
    for r in bench["results"] + unsloth["results"]:
        if not r.get("ok"):
            lines.append(f"| {r['name']} | {recipe(r)} | {r.get('data', '?')} | failed: {r.get('error', '?')[:60]} | "
                         f"{r.get('peak_gib', 0):.2f} | - |")
            continue
        ref = refs.get(r["data"])
        ratio = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref else "-"
        lines.append(f"| {r['name']} | {recipe(r)} | {r['data']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | "
                     f"{ratio} |")
    named = ", ".join(f"{data}: {r['name']} ({r['tokens_per_s']:,.0f} tok/s, {r['peak_gib']:.2f} GiB)"
                      for data, r in sorted(refs.items()))
    lines.append("")
    lines.append("x Unsloth = real tokens/s over the fastest finished Unsloth run on the same data "
                 f"({named or 'none finished'}).")
    a, b = bench["info"], unsloth["info"]
    if (a.get("steps"), a.get("warmup")) != (b.get("steps"), b.get("warmup")):
        lines.append(f"Note: gpu_bench timed steps {a.get('warmup')}..{a.get('steps')}, "
                     f"Unsloth {b.get('warmup')}..{b.get('steps')}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="bench/gpu_bench.py's results.json")
    ap.add_argument("unsloth", type=Path, help="bench/unsloth_bench.py's unsloth.json")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    a = ap.parse_args(argv)
    files = {}
    for label, path in (("results", a.results), ("unsloth", a.unsloth)):
        try:
            data = json.loads(path.read_text())
            if not (isinstance(data, dict) and isinstance(data.get("info"), dict)
                    and isinstance(data.get("results"), list)):
                raise ValueError("no 'info' object and 'results' list in it")
        except (OSError, ValueError) as e:
            print(f"unsloth_table: cannot read {label} file {path} ({e}); give gpu_bench's results.json, then "
                  "unsloth_bench's unsloth.json", file=sys.stderr)
            return 2
        files[label] = data
    diff = mismatches(files["results"]["info"], files["unsloth"]["info"])
    if diff:
        print(f"unsloth_table: not the same workload: {'; '.join(diff)} ({a.results} vs {a.unsloth}); run both "
              "benches with the same --shapes, --layers and --optim on one GPU", file=sys.stderr)
        return 2
    text = table(files["results"], files["unsloth"])
    if a.out is not None:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
