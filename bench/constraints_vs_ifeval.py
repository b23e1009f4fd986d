"""Do the embedded generator's training answers follow IFEval's rules as IFEval's own checkers read them?

Every constrained row's answer passes the project's checker (tasks/constraints.py) before it is trained on. Where the
project's definition of a rule differs from IFEval's (what a sentence, a paragraph, a highlight or a bullet is), the
model is taught the project's version and stage 5 scores IFEval's. This generates rows the way the data stage does,
maps each constraint to the IFEval instruction it mirrors (with IFEval's kwargs) and runs the official checker
(`if-verifiable`, strict) on the answer the row trains on. A type far under 100% teaches something IFEval counts wrong.

    python bench/constraints_vs_ifeval.py --rows 3000 --max-words 400 [--show TYPE]

Not mapped: fixed_answer (IFEval's options are fixed sentences ours do not use), start_phrase (no IFEval type).
"""

from __future__ import annotations

import argparse
import collections
import json

from tasks import data as D
from tasks import instructions
from tasks.benchmarks import check_ifeval, ifeval_mirror, ifeval_registry
from tasks.config import load_config

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--max-words", type=int, default=400, help="data.embedded_base_max_words")
    ap.add_argument("--split", default="train")
    ap.add_argument("--show", help="print failing answers of this constraint type")
    ap.add_argument("--out", help="write the per-type table as JSON")
    args = ap.parse_args()

    cfg = load_config(profile="demo-gpu", overrides=[f"data.embedded_base_max_words={args.max_words}"])
    bases, _ = D._embedded_bases(cfg.data, None, collections.Counter(), cfg.artifacts_dir)
    registry = ifeval_registry()
    tally: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    shown = 0
    for ex in instructions.generate(args.rows, args.split, cfg.data.seed, bases, 0.0, cfg.data.max_length * D.CHARS_PER_TOKEN_EMBEDDED):
        rec = ex.to_record()
        answer = rec["messages"][-1]["content"]
        for c in rec["check"].get("constraints", []):
            pairs = ifeval_mirror(c)
            if not pairs:
                continue
            row = {"instruction_id_list": [p[0] for p in pairs], "kwargs": [p[1] for p in pairs], "prompt": rec["messages"][-2]["content"]}
            verdicts = check_ifeval(row, answer, registry)
            ok = all(v.get("strict") for v in verdicts)
            tally[c["type"]][0] += ok
            tally[c["type"]][1] += 1
            if not ok and c["type"] == args.show and shown < 5:
                shown += 1
                print(f"--- {c} -> {verdicts}\n{answer[:600]}\n")
    table = {t: {"pass": k, "n": n, "share": round(k / n, 3)} for t, (k, n) in sorted(tally.items(), key=lambda kv: kv[1][0] / kv[1][1])}
    for t, v in table.items():
        print(f"{t:22s} {v['pass']:5d}/{v['n']:<5d} {v['share']:.1%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": args.rows, "max_words": args.max_words, "split": args.split, "types": table}, f, indent=1)


if __name__ == "__main__":
    main()
