"""False better/regressed calls of stage 5's IFEval instruction-level verdict when nothing changed (issue 21 item 8).

Base and tuned answers are drawn alike (each prompt passes with probability --p), and the instructions of one
answer pass or fail together, as real ones mostly do. Counts how often each procedure calls a difference at 95%:
the old one (bootstrap over instructions), the current one (`_paired_clustered`: bootstrap over prompts + exact
sign test) and the prompt level (exact McNemar).

    PYTHONPATH=$PWD python bench/eval_null_sim.py --sims 400      # ~30 s on one CPU core
"""

from __future__ import annotations

import argparse
import random

from tasks import evaluate as ev


def main() -> None:
    a = argparse.ArgumentParser()
    a.add_argument("--sims", type=int, default=400)
    a.add_argument("--prompts", type=int, default=48)
    a.add_argument("--per-prompt", type=int, default=3, help="instructions per prompt (they pass or fail together)")
    a.add_argument("--p", type=float, default=0.4, help="chance that an answer passes its instructions")
    args = a.parse_args()
    rng = random.Random(1)
    m, c = args.prompts, args.per_prompt
    clusters = [i for i in range(m) for _ in range(c)]
    calls = {"old: bootstrap over instructions": 0, "new: bootstrap over prompts + sign test": 0, "prompt level: exact McNemar": 0}
    for s in range(args.sims):
        base, tuned = ([y for _ in range(m) for y in [rng.random() < args.p] * c] for _ in range(2))
        lo, hi = ev.paired_bootstrap([float(x) for x in base], [float(x) for x in tuned], rounds=1000, seed=s)
        calls["old: bootstrap over instructions"] += lo > 0 or hi < 0
        calls["new: bootstrap over prompts + sign test"] += ev._paired_clustered(base, tuned, clusters, 0.95)["verdict"] != "unclear"
        calls["prompt level: exact McNemar"] += ev.mcnemar_exact(base[::c], tuned[::c])["verdict"] != "unclear"
    print(f"{args.sims} simulations, {m} prompts x {c} instructions failing together, pass rate {args.p}; nominal 5%:")
    for k, v in calls.items():
        print(f"  {k}: {v / args.sims:.1%} false calls")


if __name__ == "__main__":
    main()
