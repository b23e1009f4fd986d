"""Issue 18 item 5: the recipe settings' stage-5 results side by side, one markdown row per setting.

    python bench/recipes_table.py NAME=DIR [NAME=DIR ...]

Each DIR holds what `bench/gpu_showcase.sh poll` brings back (eval.json.xz or eval.json). Every number is read from
the run's own eval.json: the verdicts and intervals are stage 5's, nothing is recomputed here.
"""
import json
import lzma
import sys
from pathlib import Path


def load(run_dir: Path) -> dict:
    xz = run_dir / "eval.json.xz"
    return json.loads(lzma.open(xz).read() if xz.exists() else (run_dir / "eval.json").read_text())


def pct(m: dict, key: str) -> str:
    r = m[key]
    lo, hi = r["gain_ci"]
    return (f"{100 * r['base']['value']:.1f} → {100 * r['tuned']['value']:.1f} "
            f"({100 * r['gain']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], {r['verdict']})")


def row(name: str, e: dict) -> str:
    ife, alp = e["benchmarks"]["ifeval"], e["benchmarks"]["alpaca_eval"]
    im, am = ife["metrics"], alp["metrics"]
    loss = am["reference_loss"]
    words = am["answer_words"]
    return " | ".join([
        name, pct(im, "prompt_loose"), pct(im, "instruction_loose"), pct(im, "prompt_strict"),
        f"{loss['base']['value']:.3f} → {loss['tuned']['value']:.3f} ({loss['gain']:+.3f} [{loss['gain_ci'][0]:+.3f}, {loss['gain_ci'][1]:+.3f}])",
        f"{words['tuned']['median']:.0f}",
        f"{100 * ife['eos_share']['tuned']:.0f}% / {100 * alp['eos_share']['tuned']:.0f}%",
        f"{e['tuned']['loss_by_source'].get('pypi:sharegpt', float('nan')):.3f}",
        f"{100 * e['base']['accuracy']:.1f} → {100 * e['tuned']['accuracy']:.1f}",
    ])


if __name__ == "__main__":
    head = ["setting", "IFEval prompt-loose", "IFEval instruction-loose", "IFEval prompt-strict",
            "AlpacaEval reference loss", "AlpacaEval median words (ref 347)", "ends at EOS (IFEval / Alpaca)",
            "held-out ShareGPT loss (tuned)", "own held-out constraints"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for arg in sys.argv[1:]:
        name, _, d = arg.partition("=")
        print("| " + row(name, load(Path(d))) + " |")
