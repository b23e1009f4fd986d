"""Issue 18, the loops: do the answers a data stage trains on repeat themselves? Greedy decoding of the tuned demo-gpu
model ends ~30% of its AlpacaEval answers in a loop to the cap; if the training answers carried loops, the model could
have learned them there. Per assistant turn (decoded from the labelled spans, as bench/answer_lengths.py): whether its
end repeats what it wrote before (stage 5's loop detectors, `tasks.benchmarks`, applied as if the turn were cut at the
cap), and the share of its words inside a 10-word span it had already written (Gopher's duplicate n-gram rule, Rae et
al. 2021, whose threshold for 10-grams is 10% of characters; here of words).

    python bench/answer_repeats.py DATA_DIR TOKENIZER_DIR [--rows 3000] [--seed 2]

Prints one JSON line.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.answer_lengths import cli, sampled_turns  # noqa: E402


def repeated_share(words: list[str], n: int = 10) -> float:
    """The share of `words` inside an n-word span that occurred earlier in the same text."""
    seen, repeated = set(), [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            repeated[i:i + n] = [True] * n
        seen.add(gram)
    return sum(repeated) / max(len(words), 1)


def repeats(data_dir: Path, tokenizer_dir: Path, rows: int, seed: int) -> dict:
    from tasks.benchmarks import loop_start

    total, sampled = sampled_turns(data_dir, tokenizer_dir, rows, seed)
    turns = [t for row in sampled for t in row]
    # " x": a word for the detector to drop as the one the cap cut, so the turn's own last word is compared
    ends = sum(loop_start(t + " x", False) is not None for t in turns)
    shares = [repeated_share(t.split()) for t in turns]
    return {"rows": len(sampled), "of": total, "turns": len(turns), "end_in_a_repeat": round(ends / len(turns), 4),
            "repeated_10grams_over_10pct": round(sum(s > 0.1 for s in shares) / len(turns), 4),
            "repeated_10grams_over_20pct": round(sum(s > 0.2 for s in shares) / len(turns), 4)}


if __name__ == "__main__":
    cli(repeats)
