"""Two stage-5 runs on the same prompts, prompt by prompt: IFEval prompt-level loose (tuned), AlpacaEval answers that
loop to the cap (`tasks.benchmarks.ends_in_loop`, today's detector), answers that end at end-of-turn, the reference loss
(token-weighted), and median words; each difference B - A with a paired bootstrap 95% interval (resampling prompts).

    PYTHONPATH=$PWD python bench/paired_runs.py bench/results/h200-gemma-recipe-m2-2026-12-04 bench/results/h100-gemma-recipe-p-2026-12-06

Each argument is a folder holding a run's eval.json.xz (or eval.json).
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import statistics
from pathlib import Path

from tasks.benchmarks import ends_in_loop


def rows(run: str, bench: str) -> dict:
    folder = Path(run)
    path = folder / "eval.json.xz"
    data = json.loads(lzma.open(path).read() if path.exists() else (folder / "eval.json").read_text())
    return {r["id"]: r for r in data["benchmark_rows"][bench]}


def interval(values: list[float], stat, resamples: int, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(values)
    draws = sorted(stat([values[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples))
    return draws[int(0.025 * resamples)], draws[int(0.975 * resamples) - 1]


def share_diff(name: str, a: list[bool], b: list[bool], resamples: int) -> None:
    d = [int(y) - int(x) for x, y in zip(a, b)]
    lo, hi = interval(d, lambda v: sum(v) / len(v), resamples)
    n = len(d)
    print(f"{name}: A {100 * sum(a) / n:.1f}%  B {100 * sum(b) / n:.1f}%  B - A {100 * sum(d) / n:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
          f"  (B only {d.count(1)}, A only {d.count(-1)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--resamples", type=int, default=5000)
    args = ap.parse_args()

    ia, ib = rows(args.a, "ifeval"), rows(args.b, "ifeval")
    ids = sorted(set(ia) & set(ib))
    ok = lambda r: all(c["loose"] for c in r["tuned_checks"])  # noqa: E731
    share_diff(f"IFEval prompt-loose, tuned ({len(ids)} prompts)", [ok(ia[i]) for i in ids], [ok(ib[i]) for i in ids], args.resamples)

    aa, ab = rows(args.a, "alpaca_eval"), rows(args.b, "alpaca_eval")
    ids = sorted(set(aa) & set(ab))
    loops = lambda r: ends_in_loop(r["tuned"], r["tuned_stopped"])  # noqa: E731
    share_diff(f"AlpacaEval answers that loop ({len(ids)} prompts)", [loops(aa[i]) for i in ids], [loops(ab[i]) for i in ids], args.resamples)
    share_diff("AlpacaEval answers that end at end-of-turn", [bool(aa[i]["tuned_stopped"]) for i in ids],
               [bool(ab[i]["tuned_stopped"]) for i in ids], args.resamples)
    pairs = [(aa[i]["tuned_nll"], ab[i]["tuned_nll"], aa[i]["ref_tokens"]) for i in ids]
    loss = lambda v: (sum(b for _, b, _ in v) - sum(a for a, _, _ in v)) / sum(t for _, _, t in v)  # noqa: E731
    lo, hi = interval(pairs, loss, min(args.resamples, 2000))
    tokens = sum(t for _, _, t in pairs)
    print(f"AlpacaEval reference loss (token-weighted): A {sum(a for a, _, _ in pairs) / tokens:.3f}  B {sum(b for _, b, _ in pairs) / tokens:.3f}"
          f"  B - A {loss(pairs):+.4f} [{lo:+.4f}, {hi:+.4f}]")
    for name, rs in (("A", aa), ("B", ab)):
        words = [len(rs[i]["tuned"].split()) for i in ids]
        ended = [w for w, i in zip(words, ids) if rs[i]["tuned_stopped"]]
        print(f"{name} median words {statistics.median(words):.0f}, of the answers that end {statistics.median(ended):.0f}")


if __name__ == "__main__":
    main()
