"""Estimate IFEval prompt-level loose at a higher generation cap from answers generated at a lower one (an estimate,
not a measurement): an answer that ends in an exact periodic loop (its last two periods equal, period >= 20
characters: the cap cut it mid-loop) is continued by that period to FACTOR x its length and re-scored with the official checkers; every other
answer keeps its verdict (a cut answer with no exact period is not guessed at). eval.json's rows carry no stop flag,
so a short answer that ended by itself on two equal periods is continued too (7 of d's 70 tuned ones; the numbers
printed do not move).

    python bench/ifeval_cap_estimate.py RUN/eval.json.xz [FACTOR]     # FACTOR default 1280/512
"""
import json
import lzma
import sys

from tasks import benchmarks as B

e = json.loads(lzma.open(sys.argv[1]).read())
rows = e['benchmark_rows']['ifeval']
bench_rows, _ = B.load_benchmark('ifeval')
factor = float(sys.argv[2]) if len(sys.argv) > 2 else 1280 / 512
by_prompt = {r['prompt']: r for r in bench_rows}
reg = B.ifeval_registry()


def period(t):
    n = len(t)
    for p in range(20, n // 3):
        seg = t[n - 2 * p:]
        if all(seg[i] == seg[i + p] for i in range(p)):
            return p
    return None


def extend(t, factor):
    p = period(t)
    if p is None:
        return t, False
    target = int(len(t) * factor)
    out = list(t)
    while len(out) < target:
        out.append(out[len(out) - p])
    return ''.join(out), True


for who in ('base', 'tuned'):
    before = after = ext = 0
    for r in rows:
        row = by_prompt[r['prompt']]
        ans = r[who]
        ok0 = all(c['loose'] for c in r[f'{who}_checks'])
        before += ok0
        new, did = extend(ans, factor)
        ext += did
        if did:
            checks = B.check_ifeval(row, new, reg)
            after += all(c['loose'] for c in checks)
        else:
            after += ok0
    print(f"{who}: prompt-loose as generated {100 * before / len(rows):.1f}%, estimated at {factor:.2f}x the cap "
          f"{100 * after / len(rows):.1f}% ({ext} looping answers continued)")
