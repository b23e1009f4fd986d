"""What the benchmark dedupe (tasks/sources.py `Deduper`) removes from the real training sources, rule by rule, and
how long it takes: ShareGPT's and alpaca_en_demo's conversations (as the data stage normalises them) and the embedded
generator's rows at the demo-gpu profile's settings (its real bases, then the rows built on the bases that are left).
Run it in two checkouts to compare rule sets: the counts and removed texts are printed and written as JSON.

    PYTHONPATH=. python bench/dedupe_check.py --passes 3 --out /tmp/dedupe-new.json [--show 20]

`--show N` prints N removed user turns of each rule (the false-positive check is reading them). Where the checkout's
`sources.canonical` exists, a second pass without it counts what the canonical form (NFKC ...) alone removes.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

from tasks import data as D
from tasks import instructions, sources
from tasks.benchmarks import benchmark_prompts
from tasks.config import load_config


def first_hit_turn(deduper: sources.Deduper, msgs: list[dict]) -> str:
    """The user turn that made `deduper` remove `msgs`."""
    return next(m["content"] for m in msgs if m["role"] == "user" and deduper.match([m]))


def scan(deduper: sources.Deduper, convs: list[list[dict]], passes: int) -> tuple[dict, float]:
    """(rule label -> removed user turns, CPU seconds of the fastest of `passes` passes) over conversations."""
    seconds = []
    for _ in range(passes):  # CPU time, fastest pass: the box is shared, wall time moves with the other sessions
        start = time.process_time()
        hits = [(c, h) for c in convs if (h := deduper.match(c))]
        seconds.append(time.process_time() - start)
    removed: dict[str, list[str]] = collections.defaultdict(list)
    for c, (bench, rule) in hits:
        removed[f"{bench}/{rule}"].append(first_hit_turn(deduper, c))
    return dict(sorted(removed.items())), min(seconds)


def generated_rows(cfg, deduper: sources.Deduper) -> tuple[list[list[dict]], dict, float]:
    """(the demo-gpu generator's rows built on the bases this deduper leaves, bases removed by rule, CPU seconds of the
    bases' step)."""
    data = cfg.data.model_copy(update={"mix": []})  # every base counted here, not left to the mix
    removed: collections.Counter = collections.Counter()
    start = time.process_time()
    bases, _ = D._embedded_bases(data, deduper, removed, cfg.artifacts_dir)  # reads and normalises both sources too
    seconds = time.process_time() - start
    rows = [ex.to_record()["messages"] for n, split in ((data.embedded_train, "train"), (data.embedded_heldout, "heldout"))
            for ex in instructions.generate(n, split, data.seed, bases, data.embedded_task_share, data.max_length * D.CHARS_PER_TOKEN_EMBEDDED)]
    return rows, {f"{b}/{r}": n for (b, r), n in sorted(removed.items())}, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts", help="where alpaca_en_demo's source archive is (or is fetched to)")
    ap.add_argument("--show", type=int, default=0, help="removed user turns to print per rule")
    ap.add_argument("--passes", type=int, default=1, help="match every conversation this many times; the fastest counts")
    ap.add_argument("--out", help="write the counts, seconds and removed turns as JSON")
    args = ap.parse_args()

    prompts = benchmark_prompts(["ifeval", "alpaca_eval"])
    start = time.perf_counter()
    deduper = sources.Deduper(prompts)
    report: dict = {"build_seconds": round(time.perf_counter() - start, 3), "sources": {}}
    convs = {}
    for name in ("pypi:sharegpt", "pypi:alpaca-en-demo"):
        rows, _ = sources.read_packaged(name, args.artifacts)
        convs[name] = D._normalise(rows, "auto", None, None, collections.Counter())
    cfg = load_config(profile="demo-gpu", overrides=[f"artifacts_dir={args.artifacts}"])
    rows, base_hits, base_seconds = generated_rows(cfg, deduper)
    convs["embedded (demo-gpu rows)"] = rows
    report["embedded_bases_removed"] = {"by": base_hits, "seconds": round(base_seconds, 2)}
    print(f"Deduper built in {report['build_seconds']} s; demo-gpu bases removed: {base_hits} ({base_seconds:.2f} s CPU)")
    for name, cs in convs.items():
        removed, seconds = scan(deduper, cs, args.passes)
        entry = {"conversations": len(cs), "seconds": round(seconds, 2), "removed": sum(map(len, removed.values())),
                 "by": {k: len(v) for k, v in removed.items()}, "turns": removed}
        if hasattr(sources, "canonical"):  # what the canonical form alone adds: the same rules on the raw text
            canonical, sources.canonical = sources.canonical, lambda text: text
            try:
                on_raw = sources.Deduper(prompts)
                raw = {id(c) for c in cs if on_raw.match(c)}
            finally:
                sources.canonical = canonical
            entry["canonical_form_only"] = [first_hit_turn(deduper, c) for c in cs if id(c) not in raw and deduper.match(c)]
        report["sources"][name] = entry
        print(f"{name}: {len(cs)} conversations, {entry['removed']} removed in {seconds:.2f} s CPU: {entry['by']}"
              + (f"; by the canonical form alone: {len(entry['canonical_form_only'])}" if "canonical_form_only" in entry else ""))
        for rule, turns in removed.items():
            for t in turns[:args.show]:
                print(f"    {rule}: {' '.join(t.split())[:200]!r}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
