"""Issue 18, the length target: how long the answers a data stage trains on are, in words as stage 5 counts them
(`len(text.split())` of each assistant turn, decoded from the labelled token spans), to set beside the tuned model's
answer lengths (stage 5's `median_words_loops_cut`).

    python bench/answer_lengths.py DATA_DIR TOKENIZER_DIR [--rows 3000] [--seed 2]

DATA_DIR is a data stage's folder (`cache/data/<key>`, its `train` split saved by datasets); TOKENIZER_DIR the model's
(the demo-gpu profile: `artifacts/cache/models/<fingerprint>`). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

IGNORE = -100


def assistant_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of trained-on tokens of one row: one per assistant turn (the data stage masks everything else)."""
    spans, run = [], []
    for token, label in zip(input_ids, labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            spans.append(run)
            run = []
    if run:
        spans.append(run)
    return spans


def sampled_turns(data_dir: Path, tokenizer_dir: Path, rows: int, seed: int) -> tuple[int, list[list[str]]]:
    """`rows` training rows drawn at `seed` from a data stage's `train` split: how many rows it holds, and each drawn
    row's assistant turns decoded (`assistant_spans`)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ds = load_from_disk(str(data_dir / "train"))
    picked = random.Random(seed).sample(range(len(ds)), min(rows, len(ds)))
    return len(ds), [[tok.decode(s, skip_special_tokens=True) for s in assistant_spans(ds[i]["input_ids"], ds[i]["labels"])]
                     for i in picked]


def lengths(data_dir: Path, tokenizer_dir: Path, rows: int, seed: int) -> dict:
    total, sampled = sampled_turns(data_dir, tokenizer_dir, rows, seed)
    turns, first = [], []
    for row in sampled:
        words = [len(t.split()) for t in row]
        turns += words
        first += words[:1]
    q = sorted(turns)
    at = lambda p: q[min(len(q) - 1, int(p * len(q)))]  # noqa: E731
    return {"rows": len(sampled), "of": total, "turns": len(turns), "median_turn_words": statistics.median(turns),
            "p25": at(0.25), "p75": at(0.75), "p90": at(0.9), "median_first_answer_words": statistics.median(first),
            "first_at_least_174": round(sum(w >= 174 for w in first) / len(first), 4),
            "first_at_least_347": round(sum(w >= 347 for w in first) / len(first), 4)}


def cli(measure) -> None:
    """`python <script> DATA_DIR TOKENIZER_DIR [--rows N] [--seed S]`: prints `measure(...)` as one JSON line."""
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("tokenizer_dir", type=Path)
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=2)
    a = ap.parse_args()
    print(json.dumps(measure(a.data_dir, a.tokenizer_dir, a.rows, a.seed)))


def main() -> None:
    cli(lengths)


if __name__ == "__main__":
    main()
