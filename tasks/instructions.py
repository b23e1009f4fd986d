"""Generator and checkers for verifiable instruction-following tasks (the `embedded` data source).

Two kinds of rows, each with a checker that verifies an answer:

* constrained real instructions (tasks/constraints.py): a real instruction and answer (a ShareGPT or
  alpaca_en_demo first exchange, `data.embedded_bases`) with 1-3 of 25 constraint types attached in words and the
  answer transformed to satisfy them. The row's family is its first constraint type. These teach instruction
  following in general; `generate(..., bases=...)` makes them, the data stage supplies the bases.
* synthetic task families (below, a `task_share` of the rows; all rows when no bases are given):

No dataset can be downloaded in this environment, so the task families are synthetic instructions whose
answers a program can verify. Every task-family example belongs to one of 14 families:

    uppercase, lowercase, reverse_words, count_items, sort_numbers, arithmetic, bullet_list,
    json_object, extract_email, extract_date, repeat_word, first_letter, last_letter, yes_no

Each family has a generator (values -> prompt, canonical answer, check spec) and a checker
(check spec + raw model response -> bool). Canonical answers are short (mostly under ~30 tokens) and
carry no chatter, because a 135M-270M model finetuned for a few CPU minutes learns exact formats far
more easily than free text.

Split disjointness: the "heldout" split must measure instruction following, not memorisation, so it
differs from "train" in two ways:

* phrasing - each family has >= 3 train prompt templates and >= 2 heldout templates, disjoint sets;
* values   - words, names, email domains, JSON keys, sentence frames and number ranges come from
             disjoint pools. Arithmetic is the exception: splitting operand *ranges* would make
             heldout sums harder (a different skill), so each (op, a, b) question is assigned to
             one split by a stable hash; both splits share a difficulty but never a question.

Constrained rows split the same way: held-out rows use other instructions (a stable hash, `constraints.split_of`),
other phrasings and other value pools (end phrases, options, JSON keys...).

Usage::

    from tasks.instructions import generate, score
    records = [ex.to_record() for ex in generate(200, "heldout", seed=0)]  # task families only
    records = [ex.to_record() for ex in generate(200, "heldout", seed=0, bases=bases)]  # + constrained real instructions
    accuracy = sum(score(records, responses)) / len(records)
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Mapping, Sequence

from . import constraints
from .constraints import Base

FAMILIES: tuple[str, ...] = (
    "uppercase",
    "lowercase",
    "reverse_words",
    "count_items",
    "sort_numbers",
    "arithmetic",
    "bullet_list",
    "json_object",
    "extract_email",
    "extract_date",
    "repeat_word",
    "first_letter",
    "last_letter",
    "yes_no",
)

SPLITS: tuple[str, ...] = ("train", "heldout")
# Held-out constrained rows use real answers of at most this many words (before the constraint's transform), so a
# model can satisfy them within stage 5's generation cap (eval.max_new_tokens).
HELDOUT_ANSWER_WORDS = 50


@dataclass(frozen=True)
class Example:
    """One instruction with its canonical answer and the spec its checker needs.

    `check` is a dict, so instances are not hashable; use `to_record()` to store or compare them.
    """

    family: str
    prompt: str
    answer: str
    check: dict

    def messages(self) -> list[dict]:
        """Return the example as a two-turn chat: the user's prompt and the assistant's answer."""
        return [
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.answer},
        ]

    def to_record(self) -> dict:
        """Return a JSON-serializable record: chat messages, family name and check spec."""
        return {"messages": self.messages(), "family": self.family, "check": dict(self.check)}


# --------------------------------------------------------------------------------------------------
# Value pools, one per split. Disjointness is asserted in tests/test_instructions.py.

_WORDS: dict[str, tuple[str, ...]] = {
    "train": tuple(
        """
        apple river stone cloud garden window candle pencil forest bridge silver orange rabbit
        castle summer winter planet ocean mountain valley butter letter button carpet doctor engine
        farmer guitar hammer island jacket kitten ladder market needle office pepper quiet rocket
        saddle ticket umbrella velvet wallet yellow zebra anchor basket copper dragon empire falcon
        ginger harbor insect jungle kernel lemon marble nectar oyster parrot quartz ribbon salmon
        tunnel violet walnut yogurt arrow bread chair dance eagle flame grape horse ivory juice
        knife light music north olive piano queen robin sugar tiger uncle voice water youth actor
        beach coral daisy early fancy ghost happy lucky magic noble proud rapid sharp sweet tidy
        brave calm eager gentle honest jolly kind lively merry polite silly witty green purple blue
        red small large warm cold soft loud bright dark fresh heavy clean wild old new
        """.split()
    ),
    "heldout": tuple(
        """
        acorn badger cactus dolphin ember fossil glacier hazel igloo jigsaw koala lantern meadow
        nutmeg orchid pebble quiver raven spindle thimble urchin vortex willow yarrow zephyr almond
        beacon cobalt dune elbow fiddle goblet hermit jasper kettle locket mango nickel otter puzzle
        quill rustic sparrow turnip unicorn vessel wizard yonder zinc blossom canyon drizzle feather
        gravel hollow jelly kayak lagoon mitten nomad orbit paddle radish saffron tulip walrus
        bamboo chimney domino eclipse fjord gazelle harp icicle juniper kiwi lilac mosaic nebula
        oasis pretzel riddle scarf trumpet wombat crimson amber teal tiny huge fuzzy grumpy sleepy
        shiny dusty crisp mellow humble clever cozy
        """.split()
    ),
}

_NAMES: dict[str, tuple[str, ...]] = {
    "train": ("alice", "bob", "carol", "david", "emma", "frank", "grace", "henry", "julia", "kevin",
              "laura", "mike", "nina", "oscar", "paula", "sam"),
    "heldout": ("amir", "beatrix", "chen", "dmitri", "elena", "farid", "greta", "hugo", "ingrid",
                "jonas", "keiko", "lucas", "marta", "noor"),
}

_DOMAINS: dict[str, tuple[str, ...]] = {
    "train": ("example.com", "mail.org", "company.net", "school.edu", "shop.com"),
    "heldout": ("post.io", "studio.dev", "firm.co", "inbox.me"),
}

_JSON_KEYS: dict[str, tuple[str, ...]] = {
    "train": ("name", "color", "city", "animal", "food", "sport", "tool", "fruit", "song", "game"),
    "heldout": ("shape", "metal", "planet", "drink", "flower", "tree", "bird", "fabric"),
}

# Sentence frames that hide the email / date in some text; split so heldout contexts are new too.
_EMAIL_FRAMES: dict[str, tuple[str, ...]] = {
    "train": (
        "Please contact {name} at {email} about the {thing}.",
        "Send the {thing} to {email} by Friday.",
        "{name} can be reached at {email} for anything about the {thing}.",
    ),
    "heldout": (
        "For questions about the {thing}, write to {email} anytime.",
        "My new address is {email}, said {name}.",
    ),
}

_DATE_FRAMES: dict[str, tuple[str, ...]] = {
    "train": (
        "The {thing} meeting is on {date}.",
        "We shipped the {thing} on {date} after a delay.",
        "On {date} the {thing} was finished.",
    ),
    "heldout": (
        "Mark {date} in your calendar for the {thing} review.",
        "Her {thing} arrived {date}, right on time.",
    ),
}

# Number ranges are disjoint but both two-digit, so heldout is new values at the same difficulty.
_SORT_RANGE: dict[str, tuple[int, int]] = {"train": (10, 59), "heldout": (60, 99)}
_COMPARE_RANGE: dict[str, tuple[int, int]] = {"train": (1, 50), "heldout": (51, 99)}
_YEAR_RANGE: dict[str, tuple[int, int]] = {"train": (1990, 2009), "heldout": (2010, 2029)}

# --------------------------------------------------------------------------------------------------
# Prompt templates: family -> split -> templates. Placeholders are filled from the generator's
# fields; str.format ignores fields a template does not use.

_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "uppercase": {
        "train": (
            "Convert this text to uppercase: {phrase}",
            'Write "{phrase}" in all capital letters.',
            "Rewrite in uppercase: {phrase}",
            "Make every letter uppercase: {phrase}",
        ),
        "heldout": (
            "Please capitalize every letter of the following phrase and reply with only the "
            "result: {phrase}",
            "Shout this phrase back to me in ALL CAPS: {phrase}",
        ),
    },
    "lowercase": {
        "train": (
            "Convert this text to lowercase: {phrase}",
            'Write "{phrase}" in all lowercase letters.',
            "Rewrite in lowercase: {phrase}",
        ),
        "heldout": (
            "Turn every capital letter in the following phrase into a small letter and reply with "
            "only the result: {phrase}",
            "Give me this phrase with no capital letters at all: {phrase}",
        ),
    },
    "reverse_words": {
        "train": (
            "Reverse the order of the words: {words}",
            "Write these words in reverse order: {words}",
            "Reverse the word order of this sentence: {words}",
        ),
        "heldout": (
            "Take the words below and say them back starting from the last one and ending with the "
            "first one: {words}",
            "Read these words backwards, word by word, keeping each word unchanged: {words}",
        ),
    },
    "count_items": {
        "train": (
            "How many items are in this list? {items}",
            "Count the items in this list: {items}",
            "Here is a list: {items}. How many items does it have?",
        ),
        "heldout": (
            "Tell me the number of entries in the following comma-separated list, as a numeral "
            "only: {items}",
            "I wrote down {items}. How many things did I write down?",
        ),
    },
    "sort_numbers": {
        "train": (
            "Sort these numbers in {order} order: {nums}",
            "Arrange from {order_long}: {nums}",
            "Put these numbers in {order} order: {nums}",
        ),
        "heldout": (
            "Rearrange the following values so they go from {order_long}, separated by commas: "
            "{nums}",
            "List {nums} again, but ordered {order_long}.",
        ),
    },
    "arithmetic": {
        "train": (
            "What is {a} {sym} {b}?",
            "Compute {a} {sym} {b}.",
            "Calculate: {a} {sym} {b}",
        ),
        "heldout": (
            "Work out {a} {sym} {b} and reply with just the number.",
            "If you take {a} {op_word} {b}, what number do you get?",
        ),
    },
    "bullet_list": {
        "train": (
            "Pick exactly {n} of these words and list them as bullet points: {words}",
            "Write a bullet list with exactly {n} items chosen from: {words}",
            'Choose {n} words from this list and write each on its own line starting with "- ": '
            "{words}",
        ),
        "heldout": (
            "From the words {words}, select precisely {n} and present them as a dash-bulleted "
            "list.",
            'Make a list of exactly {n} bullets (one per line, each starting with "- ") using only '
            "words from: {words}",
        ),
    },
    "json_object": {
        "train": (
            'Output a JSON object with "{k1}" set to "{v1}" and "{k2}" set to "{v2}".',
            'Write JSON where {k1} is "{v1}" and {k2} is "{v2}".',
            'Return a JSON object with keys "{k1}" and "{k2}" whose values are "{v1}" and "{v2}".',
        ),
        "heldout": (
            "Encode this as a JSON object and nothing else: {k1} = {v1}, {k2} = {v2}",
            'Give me a JSON dictionary mapping the key "{k1}" to "{v1}" and the key "{k2}" to '
            '"{v2}", with no other keys.',
        ),
    },
    "extract_email": {
        "train": (
            "Extract the email address from this text: {text}",
            "What is the email address in this message? {text}",
            "Find the email address: {text}",
        ),
        "heldout": (
            "Read the note below and reply with only the email address it mentions. Note: {text}",
            "Which email address appears in the following sentence? {text}",
        ),
    },
    "extract_date": {
        "train": (
            "Extract the date from this text: {text}",
            "What date is mentioned here? {text}",
            "Find the date (YYYY-MM-DD) in this sentence: {text}",
        ),
        "heldout": (
            "Reply with only the calendar date that appears in the following note: {text}",
            "On which date does this happen? {text}",
        ),
    },
    "repeat_word": {
        "train": (
            'Repeat the word "{word}" {k} times.',
            'Write "{word}" {k} times, separated by spaces.',
            "Say {word} {k} times.",
        ),
        "heldout": (
            "Echo the following word exactly {k} times in a row on one line: {word}",
            "I need the word {word} written out {k} times with spaces between.",
        ),
    },
    "first_letter": {
        "train": (
            'What is the first letter of the word "{word}"?',
            "Give the first letter of {word}.",
            'Which letter does "{word}" start with?',
        ),
        "heldout": (
            "Reply with just the opening character of this word: {word}",
            "The word {word} begins with which letter?",
        ),
    },
    "last_letter": {
        "train": (
            'What is the last letter of the word "{word}"?',
            "Give the last letter of {word}.",
            'Which letter does "{word}" end with?',
        ),
        "heldout": (
            "Reply with just the final character of this word: {word}",
            "The word {word} finishes with which letter?",
        ),
    },
    "yes_no": {
        "train": (
            "Is {a} {rel} {b}?",
            "Answer yes or no: is {a} {rel} {b}?",
            "Yes or no: {a} is {rel} {b}.",
        ),
        "heldout": (
            "Tell me, with a single yes or no, whether {a} is {rel} {b}.",
            "Would it be correct to say that {a} is {rel} {b}? Reply yes or no.",
        ),
    },
}

# --------------------------------------------------------------------------------------------------
# Generators: (rng, split) -> (template fields, canonical answer, check spec).

_Generated = tuple[dict, str, dict]


def _phrase(rng: random.Random, split: str) -> str:
    return " ".join(rng.sample(_WORDS[split], rng.randint(2, 3)))


def _gen_uppercase(rng: random.Random, split: str) -> _Generated:
    phrase = _phrase(rng, split)
    return {"phrase": phrase}, phrase.upper(), {"expected": phrase.upper()}


def _gen_lowercase(rng: random.Random, split: str) -> _Generated:
    phrase = _phrase(rng, split)
    # Show the phrase in capitals or title case so the lowercase answer is never a plain copy.
    shown = phrase.upper() if rng.random() < 0.5 else phrase.title()
    return {"phrase": shown}, phrase, {"expected": phrase}


def _gen_reverse_words(rng: random.Random, split: str) -> _Generated:
    words = rng.sample(_WORDS[split], rng.randint(3, 5))
    answer = " ".join(reversed(words))
    return {"words": " ".join(words)}, answer, {"expected": answer}


def _gen_count_items(rng: random.Random, split: str) -> _Generated:
    items = rng.sample(_WORDS[split], rng.randint(2, 7))
    return {"items": ", ".join(items)}, str(len(items)), {"expected": len(items)}


def _gen_sort_numbers(rng: random.Random, split: str) -> _Generated:
    low, high = _SORT_RANGE[split]
    nums = rng.sample(range(low, high + 1), rng.randint(3, 5))
    descending = rng.random() < 0.5
    ordered = sorted(nums, reverse=descending)
    fields = {
        "nums": ", ".join(map(str, nums)),
        "order": "descending" if descending else "ascending",
        "order_long": "largest to smallest" if descending else "smallest to largest",
    }
    return fields, ", ".join(map(str, ordered)), {"expected": ordered}


_ARITHMETIC_OPS: dict[str, tuple[str, str, Callable[[int, int], int]]] = {
    "add": ("+", "plus", lambda a, b: a + b),
    "subtract": ("-", "minus", lambda a, b: a - b),
    "multiply": ("*", "times", lambda a, b: a * b),
}


def _split_of(*key: object) -> str:
    """Assign a value tuple to a split by a stable hash (~20% heldout); hash() is salted per run."""
    return "heldout" if zlib.crc32(repr(key).encode()) % 5 == 0 else "train"


def _gen_arithmetic(rng: random.Random, split: str) -> _Generated:
    while True:  # rejection sampling; ~5 draws on average for heldout
        op = rng.choice(tuple(_ARITHMETIC_OPS))
        if op == "multiply":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
        else:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            if op == "subtract" and a < b:
                a, b = b, a  # keep results non-negative: small models handle them far better
        if _split_of(op, a, b) == split:
            break
    sym, op_word, fn = _ARITHMETIC_OPS[op]
    result = fn(a, b)
    return {"a": a, "b": b, "sym": sym, "op_word": op_word}, str(result), {"expected": result}


def _gen_bullet_list(rng: random.Random, split: str) -> _Generated:
    n = rng.randint(2, 4)
    words = rng.sample(_WORDS[split], n + rng.randint(1, 3))
    answer = "\n".join(f"- {w}" for w in words[:n])
    return {"n": n, "words": ", ".join(words)}, answer, {"n": n, "allowed": words}


def _gen_json_object(rng: random.Random, split: str) -> _Generated:
    k1, k2 = rng.sample(_JSON_KEYS[split], 2)
    v1, v2 = rng.sample(_WORDS[split], 2)
    expected = {k1: v1, k2: v2}
    return {"k1": k1, "k2": k2, "v1": v1, "v2": v2}, json.dumps(expected), {"expected": expected}


def _gen_extract_email(rng: random.Random, split: str) -> _Generated:
    first, last = rng.sample(_NAMES[split], 2)
    email = f"{first}.{last}@{rng.choice(_DOMAINS[split])}"
    text = rng.choice(_EMAIL_FRAMES[split]).format(
        name=first.title(), email=email, thing=rng.choice(_WORDS[split])
    )
    return {"text": text}, email, {"expected": email}


def _gen_extract_date(rng: random.Random, split: str) -> _Generated:
    low, high = _YEAR_RANGE[split]
    # Day capped at 28 so every month is valid without a calendar lookup.
    date = f"{rng.randint(low, high):04d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    text = rng.choice(_DATE_FRAMES[split]).format(date=date, thing=rng.choice(_WORDS[split]))
    return {"text": text}, date, {"expected": date}


def _gen_repeat_word(rng: random.Random, split: str) -> _Generated:
    word, k = rng.choice(_WORDS[split]), rng.randint(2, 5)
    return {"word": word, "k": k}, " ".join([word] * k), {"word": word, "times": k}


def _gen_first_letter(rng: random.Random, split: str) -> _Generated:
    word = rng.choice(_WORDS[split])
    return {"word": word}, word[0], {"expected": word[0]}


def _gen_last_letter(rng: random.Random, split: str) -> _Generated:
    word = rng.choice(_WORDS[split])
    return {"word": word}, word[-1], {"expected": word[-1]}


def _gen_yes_no(rng: random.Random, split: str) -> _Generated:
    low, high = _COMPARE_RANGE[split]
    a, b = rng.sample(range(low, high + 1), 2)
    rel = rng.choice(("greater than", "less than"))
    truth = a > b if rel == "greater than" else a < b
    answer = "Yes" if truth else "No"
    return {"a": a, "b": b, "rel": rel}, answer, {"expected": answer.lower()}


_GENERATORS: dict[str, Callable[[random.Random, str], _Generated]] = {
    "uppercase": _gen_uppercase,
    "lowercase": _gen_lowercase,
    "reverse_words": _gen_reverse_words,
    "count_items": _gen_count_items,
    "sort_numbers": _gen_sort_numbers,
    "arithmetic": _gen_arithmetic,
    "bullet_list": _gen_bullet_list,
    "json_object": _gen_json_object,
    "extract_email": _gen_extract_email,
    "extract_date": _gen_extract_date,
    "repeat_word": _gen_repeat_word,
    "first_letter": _gen_first_letter,
    "last_letter": _gen_last_letter,
    "yes_no": _gen_yes_no,
}


def generate(n: int, split: str, seed: int, bases: Sequence[Base] = (), task_share: float = 0.2,
             max_chars: int | None = None, type_weights: Mapping[str, float] | None = None,
             keywords_added: float = 0.0) -> list[Example]:
    """Return `n` examples of `split` ("train" or "heldout").

    Without `bases`: the synthetic task families, round-robin as in FAMILIES. With `bases` (real instructions and
    answers, tasks/constraints.py): a `task_share` of the rows are task-family rows, the rest real instructions of
    this split (`constraints.split_of`) carrying one to three constraints, their primary type round-robin as in
    constraints.TYPES, or weighted by `type_weights` (type -> relative weight; a type not named weighs 1, 0 = never
    primary); every answer passed its checker, and prompt + answer fit `max_chars` characters. `keywords_added` (0..1) is
    the share of include_keywords / keyword_frequency constraints whose words are added to the answer rather than taken
    from it (constraints.build); 0 = the rows of before it existed.

    Deterministic for (n, split, seed, bases, task_share, max_chars, type_weights, keywords_added); the RNG does not depend on `n`,
    so a shorter list is a prefix of a longer one with the same arguments.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= task_share <= 1.0:
        raise ValueError(f"task_share must be in [0, 1], got {task_share}")
    if not 0.0 <= keywords_added <= 1.0:
        raise ValueError(f"keywords_added must be in [0, 1], got {keywords_added}")
    # A string seed is hashed with SHA-512 by random.Random, so it is stable across processes and
    # keeps the train and heldout streams independent for the same integer seed.
    rng = random.Random(f"instructions/{split}/{seed}")
    pool = _ConstraintPool(bases, split, max_chars, type_weights, keywords_added) if bases and task_share < 1.0 else None
    examples: list[Example] = []
    n_tasks = 0
    for i in range(n):
        if pool is None or int((i + 1) * task_share) > int(i * task_share):
            family = FAMILIES[n_tasks % len(FAMILIES)]
            n_tasks += 1
            fields, answer, check = _GENERATORS[family](rng, split)
            prompt = rng.choice(_TEMPLATES[family][split]).format(**fields)
            examples.append(Example(family=family, prompt=prompt, answer=answer, check=check))
        else:
            examples.append(pool.next(rng))
    return examples


class TypeWeightsError(ValueError):
    """Bad `type_weights`, or no row for the types they weigh > 0: the fix is in data.embedded_type_weights."""


class _ConstraintPool:
    """The bases of one split, indexed by the constraint types each can take; `next` makes the next row."""

    TRIES = 40  # draws of (base, extra constraints) per row before moving to the next type
    EXTRA = (0, 0, 0, 1, 1, 2)  # how many constraints join the primary one: half the rows carry one, some three

    def __init__(self, bases: Sequence[Base], split: str, max_chars: int | None, type_weights: Mapping[str, float] | None = None,
                 keywords_added: float = 0.0):
        limit = HELDOUT_ANSWER_WORDS if split == "heldout" else None
        self.bases = [b for b in bases if constraints.split_of(b.instruction) == split
                      and (limit is None or len(constraints.words(b.response)) <= limit)]
        if not self.bases:
            raise ValueError(f"no {split} bases among {len(bases)} given: give more real instructions (data.embedded_bases)")
        self.fits = {t: [i for i, b in enumerate(self.bases) if constraints.CONSTRAINTS[t].fits(b)] for t in constraints.TYPES}
        self.types = [t for t in constraints.TYPES if self.fits[t]]
        weights = dict(type_weights or {})
        unknown, bad = constraints.type_weight_problems(weights)
        if unknown:
            raise TypeWeightsError(f"unknown constraint types {unknown} in type_weights; known: {', '.join(constraints.TYPES)}")
        if bad:
            raise TypeWeightsError(f"type weights must be finite numbers >= 0 (got {', '.join(f'{t}: {w!r}' for t, w in bad)})")
        # Primaries by smooth weighted round robin (nginx's): each row every type that can take it gains its weight, the one
        # with the most credit (the earlier on a tie) leads the row and pays those weights' total back. Over n rows a type
        # leads n * weight / total rows (+-1) in a fixed order, no sampling noise; equal weights are the plain round robin
        # over self.types. The weights are scaled to exact integers (Fraction: exact for any finite float), so equal weights
        # tie exactly (float credits of 0.1 or 1/3 drift and break ties) and no total overflows (two at 1e308).
        exact = {t: Fraction(weights.get(t, 1)) for t in self.types if weights.get(t, 1) > 0}
        if not exact:
            raise TypeWeightsError(f"no constraint type with a weight > 0 fits the {split} bases (types that fit: {', '.join(self.types)}); "
                                   "give those a weight in data.embedded_type_weights")
        scale = math.lcm(*(w.denominator for w in exact.values()))
        ints = {t: int(w * scale) for t, w in exact.items()}
        unit = math.gcd(*ints.values())
        self.weights = {t: w // unit for t, w in ints.items()}
        self.credit = dict.fromkeys(self.weights, 0)
        self.split, self.max_chars, self.keywords_added = split, max_chars, keywords_added

    def next(self, rng: random.Random) -> Example:
        left = dict(self.weights)
        for t, w in left.items():
            self.credit[t] += w
        while left:
            primary = max(left, key=self.credit.__getitem__)  # max keeps the first of equals: round-robin order
            example = self._row(rng, primary)
            if example is not None:
                self.credit[primary] -= sum(left.values())
                return example
            # No base within max_chars in TRIES draws: the type sits this row out uncharged, keeping the weight it gained, so
            # it leads a later row (its share kept when it fits there); the rest pay only their own weights back, so a type that
            # never fits leaves the others their exact shares among themselves.
            del left[primary]
        if len(self.weights) < len(self.types):  # types that might fit were left out by a weight of 0
            raise TypeWeightsError(
                f"no row within {self.max_chars} characters has a primary constraint of a type weighted > 0 "
                f"({', '.join(self.weights)}) in {self.TRIES} draws each from the {len(self.bases)} {self.split} bases; give other types "
                f"a weight > 0 in data.embedded_type_weights (types that fit: {', '.join(self.types)}), or raise data.max_length")
        raise ValueError(f"no constraint fits any of the {len(self.bases)} {self.split} bases within {self.max_chars} characters; "
                         "raise data.max_length or give more real instructions (data.embedded_bases)")

    def _row(self, rng: random.Random, primary: str) -> Example | None:
        """A row led by `primary`: up to TRIES draws of a base and extra constraints; None when none fits max_chars."""
        for _ in range(self.TRIES):
            base = self.bases[rng.choice(self.fits[primary])]
            names = [primary]
            for _ in range(rng.choice(self.EXTRA)):
                options = [t for t in self.types if t not in names and constraints.CONSTRAINTS[t].fits(base)
                           and all(constraints.compatible(t, x) for x in names)]
                if options:
                    names.append(rng.choice(options))
            row = constraints.build(rng, base, names, self.split, self.keywords_added)
            if row and (self.max_chars is None or len(row[0]) + len(row[1]) <= self.max_chars):
                prompt, answer, specs = row
                return Example(family=primary, prompt=prompt, answer=answer, check={"constraints": specs})
        return None


# --------------------------------------------------------------------------------------------------
# Checkers: (check spec, raw response) -> bool. Lenient about surrounding whitespace, wrapping
# quotes and a trailing period; strict about the content itself.

_QUOTES = "\"'`"


def _clean(response: str) -> str:
    text = response.strip()
    for _ in range(2):  # handles both '"ABC".' and '"ABC."'
        if text.endswith("."):
            text = text[:-1].rstrip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
            text = text[1:-1].strip()
    return text


def _squash(text: str) -> str:
    return " ".join(text.split())


def _parse_int(response: str) -> int | None:
    text = _clean(response)
    return int(text) if re.fullmatch(r"[-+]?\d+", text) else None


def _check_exact(check: dict, response: str) -> bool:
    return _squash(_clean(response)) == check["expected"]


def _check_casefold(check: dict, response: str) -> bool:
    return _squash(_clean(response)).lower() == check["expected"].lower()


def _check_int(check: dict, response: str) -> bool:
    return _parse_int(response) == check["expected"]


def _check_sort_numbers(check: dict, response: str) -> bool:
    text = _clean(response)
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1].strip()
    # Only numbers and comma/space separators: "2, 5, 9" and "2 5 9" pass, "Sorted: 2, 5, 9" fails.
    if not re.fullmatch(r"-?\d+(?:(?:\s*,\s*|\s+)-?\d+)*", text):
        return False
    return [int(x) for x in re.findall(r"-?\d+", text)] == check["expected"]


def _check_bullet_list(check: dict, response: str) -> bool:
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    if len(lines) != check["n"] or not all(line.startswith("- ") for line in lines):
        return False
    items = [_clean(line[2:]).lower() for line in lines]
    allowed = {w.lower() for w in check["allowed"]}
    return len(set(items)) == len(items) and all(item in allowed for item in items)


def _check_json_object(check: dict, response: str) -> bool:
    text = response.strip()
    # Models often wrap JSON in a markdown fence; the object inside is what was asked for.
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj == check["expected"]


def _check_repeat_word(check: dict, response: str) -> bool:
    tokens = [t for t in re.split(r"[\s,]+", _clean(response)) if t]
    return len(tokens) == check["times"] and all(t.lower() == check["word"].lower() for t in tokens)


def _check_yes_no(check: dict, response: str) -> bool:
    return _clean(response).rstrip("!").strip().lower() == check["expected"]


_CHECKERS: dict[str, Callable[[dict, str], bool]] = {
    "uppercase": _check_exact,  # case is the whole point of these two
    "lowercase": _check_exact,
    "reverse_words": _check_casefold,  # "Dog cat bird" still follows the instruction
    "count_items": _check_int,
    "sort_numbers": _check_sort_numbers,
    "arithmetic": _check_int,
    "bullet_list": _check_bullet_list,
    "json_object": _check_json_object,
    "extract_email": _check_casefold,  # email addresses are case-insensitive in practice
    "extract_date": _check_exact,
    "repeat_word": _check_repeat_word,
    "first_letter": _check_casefold,
    "last_letter": _check_casefold,
    "yes_no": _check_yes_no,
}


def check_answer(family: str, check: dict, response: str) -> bool:
    """Return True iff `response` (a raw model generation) satisfies the instruction of `check`: a task family's
    answer, or every constraint of a constrained real instruction (family = its primary constraint type)."""
    if family in constraints.CONSTRAINTS:
        return constraints.check_all(check["constraints"], response)
    checker = _CHECKERS.get(family)
    if checker is None:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES} or a constraint type {constraints.TYPES}")
    return checker(check, response)


def score(records: list[dict], responses: list[str]) -> list[bool]:
    """Check each response against its record (as made by Example.to_record); one bool per pair."""
    if len(records) != len(responses):
        raise ValueError(
            f"got {len(records)} records but {len(responses)} responses; "
            "pass one response per record"
        )
    return [check_answer(r["family"], r["check"], resp) for r, resp in zip(records, responses)]
