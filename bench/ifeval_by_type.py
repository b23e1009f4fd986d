"""Issue 18: IFEval (loose) pass rate per instruction type, one column per run, sorted by what the last run loses.

    python bench/ifeval_by_type.py NAME=DIR [NAME=DIR ...] > DIR_LAST/ifeval-by-instruction.txt

Each DIR holds what `bench/gpu_showcase.sh poll` brings back (eval.json.xz or eval.json); the checks are stage 5's own
(if-verifiable's), read from its benchmark rows, never recomputed. The base column is the last run's base: runs at an
older generation cap had a different base (IFEval's cap went 512 -> 1,280 tokens on 2026-12-02). `lost` is how many
instructions of that type the last run still fails, n * (1 - pass rate): where the next points are.
"""
import json
import lzma
import sys
from collections import defaultdict
from pathlib import Path


def load_rows(run_dir: Path) -> list[dict]:
    xz = run_dir / "eval.json.xz"
    e = json.loads(lzma.open(xz).read() if xz.exists() else (run_dir / "eval.json").read_text())
    return e["benchmark_rows"]["ifeval"]


def pass_rates(rows: list[dict], side: str) -> dict[str, tuple[int, float]]:
    passed, total = defaultdict(int), defaultdict(int)
    for row in rows:
        for check in row[f"{side}_checks"]:
            total[check["id"]] += 1
            passed[check["id"]] += bool(check["loose"])
    return {k: (total[k], passed[k] / total[k]) for k in total}


def main(args: list[str]) -> None:
    if not args or any("=" not in a for a in args):
        sys.exit("usage: python bench/ifeval_by_type.py NAME=DIR [NAME=DIR ...]")
    runs = [(name, load_rows(Path(d))) for name, d in (a.split("=", 1) for a in args)]
    base = pass_rates(runs[-1][1], "base")
    tuned = [(name, pass_rates(rows, "tuned")) for name, rows in runs]
    last = tuned[-1][1]
    order = sorted(last, key=lambda k: -last[k][0] * (1 - last[k][1]))
    names = "".join(f"{name:>6}" for name, _ in tuned)
    print(f"{'instruction (IFEval, loose)':<46}{'n':>4}  base{names}  lost")
    for k in order:
        n, _ = last[k]
        cols = "".join(f"{100 * rates.get(k, (0, float('nan')))[1]:5.0f}%" for _, rates in tuned)
        print(f"{k:<46}{n:>4}{100 * base[k][1]:5.0f}%{cols}{n * (1 - last[k][1]):6.1f}")


if __name__ == "__main__":
    main(sys.argv[1:])
