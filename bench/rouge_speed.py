"""Stage 5's AlpacaEval ROUGE-L: rouge-score's own scorer vs `tasks.benchmarks.rouge_l_f1` (rapidfuzz LCS), on real
answers. Scores what the stage scores, 805 references x (base, tuned) x (cut to the shorter answer, whole), with
each, checks that every score is the same number (and type), and prints the seconds of each.

    PYTHONPATH=$PWD python bench/rouge_speed.py        # recipe h's answers (805 x 2, median ~350 words base)
    PYTHONPATH=$PWD python bench/rouge_speed.py --eval bench/results/h200-gemma-recipe-d-2026-12-02/eval.json.xz
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--eval", default="bench/results/h200-gemma-recipe-h-2026-12-02/eval.json.xz",
                    help="an eval.json(.xz) whose benchmark_rows.alpaca_eval hold the base and tuned answers")
    a = ap.parse_args()

    from absl import logging as absl_logging
    from rouge_score import rouge_scorer

    from tasks import benchmarks as bench

    absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)
    refs = [r["reference"] for r in bench.load_benchmark("alpaca_eval", "packaged")[0]]
    opener = lzma.open if a.eval.endswith(".xz") else open
    with opener(a.eval, "rt") as f:
        rows = json.load(f)["benchmark_rows"]["alpaca_eval"]
    if len(rows) != len(refs):
        sys.exit(f"{a.eval}: {len(rows)} AlpacaEval rows, the benchmark has {len(refs)}; pick a run of the full set")
    base, tuned = [r["base"] for r in rows], [r["tuned"] for r in rows]
    cut = [bench.cut_to_shorter(b, t) for b, t in zip(base, tuned)]
    answers = [[c[0] for c in cut], [c[1] for c in cut], base, tuned]  # the stage's 4 reference_overlap calls

    t0 = time.perf_counter()
    new = [[bench.rouge_l_f1(ref, hyp) for hyp, ref in zip(texts, refs)] for texts in answers]
    t_new = time.perf_counter() - t0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    t0 = time.perf_counter()
    old = [[scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(texts, refs)] for texts in answers]
    t_old = time.perf_counter() - t0

    differ = sum(repr(o) != repr(n) for olds, news in zip(old, new) for o, n in zip(olds, news))
    n = sum(map(len, answers))
    print(f"{n} scores: rouge-score {t_old:.2f} s, rapidfuzz {t_new:.2f} s ({t_old / t_new:.0f}x); differing: {differ}")
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
