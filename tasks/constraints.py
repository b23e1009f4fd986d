"""Verifiable constraints attached to real instructions: the embedded generator's general instruction-following rows.

A row is a real instruction (the first user turn of a ShareGPT or alpaca_en_demo conversation, `Base`) with one to
three constraints appended in words ("Answer in fewer than 60 words.", "Wrap the whole reply in double quotes."),
and the real answer *transformed* to satisfy them: cut to N sentences, regrouped into paragraphs or bullet points,
uppercased, wrapped in JSON, a title, a postscript or an end phrase added, the request repeated first, ... The
checker here verifies every answer before it is trained on (`build` rejects any that fails), and scores the
model's answers to the held-out rows in stage 5.

The 25 types mirror what users ask of an assistant; IFEval's 25 instruction types are the reference list, and all
but one are here (its `language:response_language` needs answers in other languages, which the sources don't
have), plus `start_phrase`. Phrasings, value pools and checkers are this project's own: no IFEval prompt or
phrase is copied (tests/test_constraints.py checks it against the full IFEval set).

Ours <- IFEval's: word_count, sentence_count, paragraph_count, paragraph_first_word <- length_constraints:*;
include_keywords, keyword_frequency, forbidden_words, letter_frequency <- keywords:*; capital_words, all_uppercase,
all_lowercase <- change_case:*; bullet_points, sections, highlights, json_format, title, fixed_answer <-
detectable_format:*; placeholders, postscript <- detectable_content:*; two_responses, repeat_request <- combination:*;
end_phrase, quotation <- startend:*; no_commas <- punctuation:no_comma; start_phrase is ours.

Each type has >= 4 train phrasings and >= 2 held-out phrasings (disjoint), and the value pools it draws phrases
from (end/start phrases, postscript notes, answer options, title examples, JSON keys) are split too, so stage 5
measures whether the constraint was learned, not one sentence.

A type's life in `build`: `shape` (transform the answer; types run in `stage` order: cut, added keywords, layout,
punctuation, emphasis, decoration, case, wrapping), then `settle` on the final answer (measured types choose their number
there: "at least 3 times" is counted on what the answer finally says), then `check`.

Definitions the checkers use (and the transforms, so they agree):
- word: a run of letters (any script) and digits, with inner apostrophes: `words()`.
- sentence: text up to . ! or ? after a letter (or a closing quote/bracket), or up to a line break: `sentences()`.
- paragraph: blocks separated by blank lines; `***` paragraphs: blocks separated by a line holding only `***`.
- bullet point: a line starting with `* ` or `- `.  highlight: `*text*` or `**text**` within a line.
"""

from __future__ import annotations

import json
import math
import random
import re
import zlib
from dataclasses import dataclass
from typing import Callable

# --------------------------------------------------------------------------------------------------
# Text measures shared by transforms and checkers


_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
# A sentence ends at . ! ? after a letter/percent/closing bracket or quote, or after . ! ? + a closing quote, or at a
# line break. Numbers like "1." or "3.5" don't end one.
_SENTENCE_BREAK = re.compile(r"(?:(?<=[A-Za-z%)\]\"'’”][.!?])|(?<=[.!?][\"'’”)]))[ \t]+|[ \t]*\n\s*")
_BLANK_LINE = re.compile(r"\n[ \t]*\n\s*")
_DIVIDER = re.compile(r"^[ \t]*\*\*\*[ \t]*$", re.M)
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.M)
_LIST_ITEM = re.compile(r"^(?:\d{1,2}[.)]|[-*•])[ \t]+(?=\S)")
_STAR_BULLET = re.compile(r"[ \t]*\*[ \t]")
_HIGHLIGHT = re.compile(r"\*\*[^*\n]+\*\*|(?<![*\w])\*(?![\s*])[^*\n]+?(?<![\s*])\*(?![*\w])")
_PLACEHOLDER = re.compile(r"\[[^\[\]\n]+\]")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)

STOPWORDS = frozenset(
    """a an the and or but if then so of to in on at by for with from as is are was were be been being it its this that
    these those there here you your yours we our i me my he she they them their his her what which who whom how why when
    where can could would should will shall may might must do does did done have has had not no yes very also just than
    too more most much many some any each every all both other such only own same into about over under again further
    once out up down off above below between through during before after while because until against among within
    without upon like well make made get got one two three first second new use used using way ways thing things""".split()
)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_BREAK.split(text.strip()) if re.search(r"[A-Za-z0-9]", s)]


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _BLANK_LINE.split(text.strip()) if p.strip()]


def divided_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in _DIVIDER.split(text.strip())]


_ALNUM = re.compile(r"[^\W_]+")  # letters (any script) and digits


def word_count(text: str, word: str) -> int:
    """Occurrences of `word` (letters/digits only), case-insensitive, not inside a longer word ("Römerberg" holds no "merberg")."""
    word = word.lower()
    return sum(1 for m in _ALNUM.finditer(text) if m.group(0).lower() == word)


def _first_span(text: str, word: str, skip_line: re.Pattern | None = None) -> tuple[int, int] | None:
    """Where `word` first occurs as a whole word (case-insensitive), outside lines that `skip_line` matches at their start."""
    word = word.lower()
    return next((m.span() for m in _ALNUM.finditer(text) if m.group(0).lower() == word
                 and not (skip_line and skip_line.match(text, text.rfind("\n", 0, m.start()) + 1))), None)


def capital_words(text: str) -> int:
    return sum(1 for w in re.findall(r"[A-Za-z]+", text) if len(w) >= 2 and w.isupper())


def _normal(text: str) -> str:
    return " ".join(text.split())


def _content_words(text: str) -> list[str]:
    """Distinct lowercase content words (>= 5 letters, not stopwords), in order of first appearance."""
    seen: dict[str, None] = {}
    for w in _ALNUM.findall(text):
        lw = w.lower()
        if len(lw) >= 5 and lw.isascii() and lw.isalpha() and lw not in STOPWORDS and lw not in seen:
            seen[lw] = None
    return list(seen)


def _is_list(text: str) -> bool:
    return sum(bool(_LIST_ITEM.match(line)) for line in text.splitlines()) >= 2


def _is_prose(text: str) -> bool:
    return not any(_LIST_ITEM.match(line) for line in text.splitlines())


RELATIONS: dict[str, Callable[[int, int], bool]] = {
    "at_least": lambda k, n: k >= n,
    "at_most": lambda k, n: k <= n,
    "less_than": lambda k, n: k < n,
    "more_than": lambda k, n: k > n,
    "exactly": lambda k, n: k == n,
}
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "at_least": ("at least", "no fewer than", "a minimum of"),
    "at_most": ("at most", "no more than", "a maximum of"),
    "less_than": ("fewer than", "less than", "under"),
    "more_than": ("more than", "over"),
    "exactly": ("exactly", "precisely"),
}
ORDINALS = ("first", "second", "third", "fourth", "fifth")


@dataclass(frozen=True)
class Base:
    """A real instruction and its real answer (one exchange), from `source`."""

    instruction: str
    response: str
    source: str


# --------------------------------------------------------------------------------------------------
# Value pools, split like the templates. Phrases carry no commas (so they combine with no_commas).

_POOLS: dict[str, dict[str, tuple]] = {
    "end_phrase": {
        "train": ("Write back if anything is unclear.", "Hope this helps!", "That covers the main points.",
                  "Thanks for reading.", "Good luck!", "Feel free to ask for more details."),
        "heldout": ("I hope that answers your question.", "Happy to help further.", "That is my answer.", "Enjoy!"),
    },
    "start_phrase": {
        "train": ("Sure thing.", "Here is my answer.", "Good question!", "Of course.", "Glad you asked."),
        "heldout": ("Certainly.", "Let me explain.", "Here goes."),
    },
    "postscript": {
        "train": ("I hope this is useful.", "Ask me if anything is unclear.", "Tell me if you want a longer version.",
                  "Thanks for the interesting question."),
        "heldout": ("Let me know how it goes.", "I can add examples if you like."),
    },
    "options": {
        "train": (("Yes, I'm sure.", "No, I don't think so.", "I can't tell."),
                  ("Yes.", "No.", "Maybe."),
                  ("Definitely yes.", "Definitely not.", "It depends.")),
        "heldout": (("Absolutely.", "Absolutely not.", "Hard to say."),
                    ("Correct.", "Incorrect.", "Unclear.")),
    },
    "title_example": {
        "train": ("<<a short guide>>", "<<my answer>>", "<<notes on the topic>>", "<<the plan>>"),
        "heldout": ("<<summary>>", "<<an overview>>"),
    },
    "json_key": {"train": ("answer", "response", "text"), "heldout": ("reply", "content")},
    "placeholder": {
        "train": ("name", "date", "address", "company", "phone number", "email", "city", "amount", "job title",
                  "zip code", "signature", "country"),
        "heldout": ("recipient", "location", "time", "website", "product", "department", "order number", "price"),
    },
    "filler": {
        "train": ("very", "really", "basically", "actually", "simply", "literally", "obviously", "definitely"),
        "heldout": ("honestly", "extremely", "totally", "truly"),
    },
    "section_marker": {"train": ("Section", "SECTION", "Part"), "heldout": ("PART", "Chapter")},
    # Off-topic nouns for keywords added to an answer that the instruction gives none for (data.embedded_keywords_added):
    # IFEval asks for words such as "correlated" or "compensated" in answers about anything else.
    "keyword": {
        "train": ("balance", "harvest", "lantern", "journey", "library", "weather", "kitchen", "garden", "budget", "window",
                  "market", "bridge", "season", "village", "engine", "orchard", "compass", "ladder", "ribbon", "canvas",
                  "harbor", "blanket", "thunder", "pencil", "mirror", "meadow", "tunnel", "feather", "cabinet", "voyage"),
        "heldout": ("anchor", "lighthouse", "quarry", "glacier", "satchel", "furnace", "beacon", "tapestry", "chimney",
                    "pavilion", "kettle", "vineyard"),
    },
    # The sentence that carries added keywords into the answer; {w} = the words joined by "and". No commas (no_commas).
    "keyword_sentence": {
        "train": ("It also bears on {w}.", "This touches on {w} as well.", "There is a link to {w} too.",
                  "Keep {w} in mind here as well.", "One can relate this to {w} too.", "The same thinking applies to {w}."),
        "heldout": ("It has a bearing on {w} too.", "Much the same goes for {w}.", "Think of {w} in this light as well."),
    },
}

# Imperative openers and question words dropped when a title is made from the instruction.
_TITLE_SKIP = STOPWORDS | frozenset(
    "write describe explain give tell list create generate provide please help want need know name compose summarize "
    "suggest find show rewrite draft design answer identify outline classify compare discuss following provided given "
    "based type sentence text paragraph article".split()
)
_LETTER_HINTS = re.compile(r"\b(letter|email|e-mail|message|note|invitation|speech|announcement)\b", re.I)

# --------------------------------------------------------------------------------------------------
# Constraint types


Shaped = tuple[dict, str] | None  # (partial spec, new answer) or None when this base can't take the constraint


@dataclass(frozen=True)
class Constraint:
    name: str
    stage: int  # shaping order: 5 cut, 10 added keywords, 20 layout, 30 punctuation, 50 emphasis, 60-90 decoration, 92 case, 98 wrap
    conflicts: frozenset[str]
    fits: Callable[[Base], bool]
    shape: Callable[[random.Random, Base, str, str], Shaped]  # (rng, base, answer, split)
    settle: Callable[[random.Random, dict, Base, str, str], dict | None]  # (rng, partial, base, final answer, split)
    check: Callable[[dict, str], bool]
    templates: dict[str, tuple[str, ...]]


def _keep(rng, base, text, split) -> Shaped:
    return {}, text


def _as_is(rng, partial, base, text, split) -> dict | None:
    return partial


def _any(base: Base) -> bool:
    return True


def _pick_relation_count(rng: random.Random, k: int, low: int, long: tuple[int, int]) -> tuple[str, int]:
    """A (relation, n) that the count `k` satisfies, n >= `low`, with slack: the number asked is rarely exactly k.

    `long` = (short_below, long_from): a lower bound ("at least"/"more than") is asked of 85% of the answers with
    k >= long_from and 15% of those with k < short_below, as IFEval asks them ("at least 300 words", "less than 50"):
    drawn evenly, most "at least" rows asked for a short answer's length and none for a long one's (h's model, on
    2026-12-02, wrote 150-300 words where IFEval asked "at least 300-1,200" and failed 18 of 22 such prompts)."""
    lower = ["at_least"] + (["more_than"] if k > low else [])
    upper = ["at_most", "less_than"]
    p_lower = 0.85 if k >= long[1] else 0.15 if k < long[0] else len(lower) / (len(lower) + len(upper))
    rel = rng.choice(lower if rng.random() < p_lower else upper)
    slack = max(1, k // 5)
    if rel == "at_least":
        n = rng.randint(max(low, k - slack), max(low, k))
    elif rel == "more_than":
        n = rng.randint(max(low, k - slack - 1), k - 1)
    elif rel == "at_most":
        n = rng.randint(k, k + slack)
    else:
        n = rng.randint(k + 1, k + 1 + slack)
    return rel, max(low, n)


def _round_count(rng: random.Random, rel: str, n: int) -> int:
    """Word counts are asked in round numbers (multiples of 5, 10, or 50 from 200 on, as IFEval's 250/300/350/400), rounded
    in the direction that keeps the relation."""
    step = 50 if n >= 200 else 10 if n >= 40 else 5
    if n < step:
        return n
    return (n // step) * step if rel in ("at_least", "more_than") else -(-n // step) * step


# ---- length: sentences, words, paragraphs


def _shape_cut(rng, base, text, split) -> Shaped:
    """Sometimes cut the answer to its first sentences (kept short answers are what 'in at most N' teaches)."""
    sents = sentences(text)
    if len(sents) >= 3 and _is_prose(text) and rng.random() < 0.4:
        keep = rng.randint(1, min(len(sents) - 1, 4))
        return {"cut": True}, " ".join(sents[:keep])
    return {"cut": False}, text


def _settle_sentences(rng, partial, base, text, split) -> dict | None:
    """A sentence count that holds under both readings of the answer: ours (a line break ends a sentence) and IFEval's
    (NLTK's punkt: reads through line breaks, splits after some list numbers, keeps "Dr. Smith" whole): "at least" is
    drawn from the lower count, "at most"/"fewer than" above the higher, "exactly" only where they agree. Without
    punkt's data (llama-index-core not installed) the other reading is ours with the line breaks read through."""
    from .benchmarks import ifeval_sentence_count

    k = len(sentences(text))
    if k == 0:
        return None
    other = ifeval_sentence_count(text)
    if other is None:
        other = len(sentences(re.sub(r"\s*\n\s*", " ", text)))
    lo, hi = min(k, other), max(k, other)
    if partial["cut"] and lo == hi and rng.random() < 0.5:
        return {"relation": "exactly", "n": k}
    rel, n = _pick_relation_count(rng, max(lo, 1), low=1, long=(4, 8))
    if rel in ("at_most", "less_than"):
        n += hi - max(lo, 1)
    return {"relation": rel, "n": n}


def _settle_words(rng, partial, base, text, split) -> dict | None:
    """A word count that holds under both readings, as for sentences: ours (`words`) and IFEval's (`\\w+` runs: "don't"
    is two words there, "snake_case" one): a lower bound is drawn from the lower count, an upper one above the higher."""
    k, other = len(words(text)), len(re.findall(r"\w+", text))
    lo, hi = min(k, other), max(k, other)
    if lo < 3:
        return None
    rel, n = _pick_relation_count(rng, lo, low=3, long=(60, 150))
    if rel in ("at_most", "less_than"):
        n += hi - lo
    n = _round_count(rng, rel, n)
    return {"relation": rel, "n": n} if RELATIONS[rel](lo, n) and RELATIONS[rel](hi, n) else None


def _check_count(measure: Callable[[str], int]) -> Callable[[dict, str], bool]:
    return lambda spec, text: RELATIONS[spec["relation"]](measure(text), spec["n"])


def _groups(rng: random.Random, text: str, lo: int = 2, hi: int = 4) -> list[str] | None:
    """The answer as 2-4 blocks: its own paragraphs when it has lo..hi of them, else its sentences regrouped."""
    paras = paragraphs(text)
    if lo <= len(paras) <= hi:
        return paras
    if not _is_prose(text):
        return None
    sents = sentences(text)
    if len(sents) < lo:
        return None
    n = rng.randint(lo, min(hi, len(sents)))
    cuts = sorted(rng.sample(range(1, len(sents)), n - 1))
    return [" ".join(sents[a:b]) for a, b in zip([0, *cuts], [*cuts, len(sents)])]


def _shape_divided(rng, base, text, split) -> Shaped:
    groups = _groups(rng, text)
    return None if groups is None else ({"n": len(groups)}, "\n\n***\n\n".join(groups))


def _check_divided(spec, text) -> bool:
    parts = divided_paragraphs(text)
    return len(parts) == spec["n"] and all(re.search(r"\w", p) for p in parts)


def _first_word(paragraph: str) -> str | None:
    m = re.match(r"[^A-Za-z0-9]*([A-Za-z]+)", paragraph)
    return m.group(1).lower() if m else None


def _plain_first_word(paragraph: str) -> str:
    """The paragraph's first whitespace-separated token, quotes dropped in front, cut at its first punctuation mark,
    lowercased: how IFEval's nth_paragraph_first_word reads it (so "(Good" or "* David" is not "good" or "david")."""
    token = paragraph.split()[0].lstrip("'").lstrip('"') if paragraph.split() else ""
    return re.split(r"""[.,?!'"]""", token, maxsplit=1)[0].lower()


def _shape_first_word(rng, base, text, split) -> Shaped:
    groups = _groups(rng, text)
    if groups is None:
        return None
    i = rng.randint(1, len(groups))
    word = _first_word(groups[i - 1])
    if word is None or _plain_first_word(groups[i - 1]) != word:  # a paragraph opening with a bullet, bracket, symbol
        return None
    return {"n": len(groups), "i": i, "word": word}, "\n\n".join(groups)


def _settle_first_word(rng, partial, base, text, split) -> dict | None:
    """The shaped paragraph's first word, read again on the final answer: a later highlight (`*Please* ...`) or quote
    changes how IFEval reads it."""
    paras = paragraphs(text)
    ok = len(paras) == partial["n"] and _plain_first_word(paras[partial["i"] - 1]) == partial["word"]
    return partial if ok else None


def _check_first_word(spec, text) -> bool:
    paras = paragraphs(text)
    return len(paras) == spec["n"] and _first_word(paras[spec["i"] - 1]) == spec["word"]


# ---- content: keywords, letters, capitals


def _settle_include(rng, partial, base, text, split) -> dict | None:
    """Mostly words the instruction does not predict: ones the answer uses once, of 7+ letters ("fermentation", not
    "coffee" in an answer about coffee). A row whose keywords are the topic's own words shows nothing to copy from
    the request, and IFEval asks for off-topic words ("correlated" in a meeting invitation): setting g's model, trained
    on topical keywords, included them on 18% of IFEval's prompts."""
    if "added" in partial:  # the words were added to the answer (`_shape_add_include`)
        return _settle_added(partial, text, {"keywords": partial["added"]})
    asked = set(_content_words(base.instruction))
    cands = [w for w in _content_words(base.response) if w not in asked and word_count(text, w)]
    if not cands:
        return None
    k = rng.choice((1, 2, 2, 3))
    rare = [w for w in cands if len(w) >= 7 and word_count(text, w) == 1]
    pool = rare if len(rare) >= k and rng.random() < 0.85 else cands
    return {"keywords": rng.sample(pool, min(len(pool), k))}


def _check_include(spec, text) -> bool:
    return all(word_count(text, w) > 0 for w in spec["keywords"])


# Keywords added to the answer (data.embedded_keywords_added, training rows only). `_settle_include` and `_settle_frequency`
# take their words from the answer as written, so such a row's answer is what it would be without the request: it teaches
# that the request can be ignored. The base Gemma-3-270M passes IFEval's keywords:existence 72% (it copies the prompt,
# which holds the words), setting i's models 18-28%. These rows show the answer changed to say the words asked for.


def _words_to_add(rng: random.Random, base: Base, split: str, k: int) -> list[str]:
    """k words the real answer never uses: the instruction's own content words first (not its imperative openers such as
    "describe" or "following", nor adverbs), then ordinary nouns from the split's pool (IFEval asks for off-topic words)."""
    own = [w for w in _content_words(base.instruction)
           if w not in _TITLE_SKIP and not w.endswith("ly") and not word_count(base.response, w)]
    picked = rng.sample(own, min(len(own), k))
    pool = [w for w in _POOLS["keyword"][split] if w not in picked and not word_count(base.response, w)]
    return picked + rng.sample(pool, min(len(pool), k - len(picked)))


def _insert_sentence(rng: random.Random, text: str, sentence: str) -> str:
    """`sentence` after one of the answer's sentences, any of them (the last one too), on that sentence's line. Only after
    a real end (. ! ? not closing "e.g." or "Dr."), never on a list item's line; an answer without one (a list, a phrase)
    gets it as a paragraph of its own at the end."""
    ends = [m.start() for m in _SENTENCE_BREAK.finditer(text)] + [len(text)]

    def fits(p: int) -> bool:
        line = text[text.rfind("\n", 0, p) + 1:p].strip()
        return text[p - 1:p] in (".", "!", "?") and not _ABBREVIATION_END.search(text[max(0, p - 8):p]) \
            and not _LIST_ITEM.match(line) and not _BULLET.match(line)

    ends = [p for p in ends if p > 0 and fits(p)]
    if not ends:
        return f"{text.rstrip()}\n\n{sentence}"
    p = rng.choice(ends)
    return f"{text[:p]} {sentence}{text[p:]}"


def _keyword_sentence(rng: random.Random, split: str, added: list[str], templates: list[str] | None = None) -> str:
    return rng.choice(templates or _POOLS["keyword_sentence"][split]).format(w=" and ".join(added))


def _shape_add_include(rng, base, text, split) -> Shaped:
    """1-3 words the answer lacks, said in one added sentence; `_settle_include` asks for exactly these."""
    added = _words_to_add(rng, base, split, rng.choice((1, 2, 2, 3)))
    if not added:
        return None
    return {"added": added}, _insert_sentence(rng, text, _keyword_sentence(rng, split, added))


def _shape_add_frequency(rng, base, text, split) -> Shaped:
    """One word the answer lacks, added in n (2-3) sentences of different wording; asked "at least n times"."""
    added = _words_to_add(rng, base, split, 1)
    if not added:
        return None
    n = rng.choice((2, 2, 3))
    for template in rng.sample(_POOLS["keyword_sentence"][split], n):
        text = _insert_sentence(rng, text, _keyword_sentence(rng, split, added, [template]))
    return {"added": added, "n": n}, text


def _settle_added(partial: dict, text: str, spec: dict) -> dict | None:
    """The spec for words a shape added, when the final answer (after case, layout, wrapping) still says them."""
    return spec if all(word_count(text, w) for w in partial["added"]) else None


def _settle_frequency(rng, partial, base, text, split) -> dict | None:
    if "added" in partial:  # the word was added n times (`_shape_add_frequency`)
        return _settle_added(partial, text, {"word": partial["added"][0], "relation": "at_least", "n": partial["n"]})
    counts = {w: c for w in _content_words(base.response) if (c := word_count(text, w))}
    if not counts:
        return None
    repeated = [w for w, c in counts.items() if c >= 2]
    if repeated and rng.random() < 0.3:
        # the answer's most used word, asked as often as it is used: IFEval asks 5-10 times on 10 of its 29 "at least"
        # prompts, and a draw from 2..k over all repeated words asked 2-3 on most rows
        word = max(repeated, key=counts.get)
        k = counts[word]
        return {"word": word, "relation": "at_least", "n": rng.randint(max(2, k - 1), k)}
    word = rng.choice(repeated if repeated and rng.random() < 0.7 else list(counts))
    k = counts[word]
    if k >= 2 and rng.random() < 0.6:
        return {"word": word, "relation": "at_least", "n": rng.randint(2, k)}
    # "fewer than n": n above every occurrence, inside longer words too ("project" in "projects"), which is how
    # IFEval's keywords:frequency counts; the whole-word count the checker reads is never more
    k_any = len(re.findall(re.escape(word), text, flags=re.I))
    return {"word": word, "relation": "less_than", "n": rng.randint(k_any + 1, k_any + 2)}


def _check_frequency(spec, text) -> bool:
    return RELATIONS[spec["relation"]](word_count(text, spec["word"]), spec["n"])


def _settle_forbidden(rng, partial, base, text, split) -> dict | None:
    topical = [w for w in _content_words(base.instruction) if not word_count(text, w)]
    filler = [w for w in _POOLS["filler"][split] if not word_count(text, w)]
    k = rng.choice((1, 2, 2, 3))
    picked = rng.sample(topical, min(len(topical), rng.randint(0, k)))
    picked += rng.sample(filler, min(len(filler), k - len(picked)))
    return {"keywords": picked} if picked else None


def _check_forbidden(spec, text) -> bool:
    return all(word_count(text, w) == 0 for w in spec["keywords"])


def _settle_letter(rng, partial, base, text, split) -> dict | None:
    low = text.lower()
    counts = {c: low.count(c) for c in "abcdefghiklmnoprstuwy" if low.count(c) >= 2}
    if not counts:
        return None
    letter = rng.choice(sorted(counts))
    k = counts[letter]
    if rng.random() < 0.6:
        return {"letter": letter, "relation": "at_least", "n": rng.randint(max(1, k - k // 4), k)}
    return {"letter": letter, "relation": "less_than", "n": rng.randint(k + 1, k + 1 + k // 4)}


def _check_letter(spec, text) -> bool:
    return RELATIONS[spec["relation"]](text.lower().count(spec["letter"]), spec["n"])


def _shape_capitals(rng, base, text, split) -> Shaped:
    if rng.random() < 0.3:
        return {"emphasized": 0}, text
    cands = [w for w in _content_words(base.response) if word_count(text, w)]
    chosen = rng.sample(cands, min(len(cands), rng.randint(1, 4)))
    for w in chosen:
        a, b = _first_span(text, w)
        text = text[:a] + w.upper() + text[b:]
    return {"emphasized": len(chosen)}, text


def _settle_capitals(rng, partial, base, text, split) -> dict | None:
    """A count that holds under both readings, as for sentences: ours (runs of 2+ capital letters) and IFEval's (NLTK
    tokens that are upper case, `benchmarks.ifeval_capital_count`: "Self-REFLECTION" is one token and not capital, "I"
    is). "At least" is drawn from the lower count, "fewer than" above the higher."""
    from .benchmarks import ifeval_capital_count

    k, other = capital_words(text), ifeval_capital_count(text)
    lo = k if other is None else min(k, other)
    if partial["emphasized"] and lo >= 1:
        return {"relation": "at_least", "n": rng.randint(max(1, lo - 1), lo)}
    # "fewer than n": n above every all-capitals run of letters, one-letter ones too ("I", "Plan A"), which IFEval
    # counts; ours skips them, so never more
    k_any = max(sum(1 for w in re.findall(r"[^\W\d_]+", text) if w.isupper()), other or 0)
    return {"relation": "less_than", "n": rng.randint(k_any + 1, k_any + 3)}


# ---- format: bullets, sections, highlights, JSON, title, placeholders, two responses, fixed answer


def _shape_bullets(rng, base, text, split) -> Shaped:
    lines = text.splitlines()
    if _is_list(text) and all(not line.startswith((" ", "\t")) for line in lines):
        items = [bool(_LIST_ITEM.match(line)) for line in lines]
        if not 2 <= sum(items) <= 10:
            return None
        out = [("* " + _LIST_ITEM.sub("", line, count=1)) if is_item else line for line, is_item in zip(lines, items)]
        return {"n": sum(items)}, "\n".join(out)
    sents = sentences(text)
    if not _is_prose(text) or not 2 <= len(sents) <= 7:
        return None
    return {"n": len(sents)}, "\n".join("* " + s for s in sents)


def _check_bullets(spec, text) -> bool:
    return len(_BULLET.findall(text)) == spec["n"]


def _shape_sections(rng, base, text, split) -> Shaped:
    groups = _groups(rng, text)
    if groups is None:
        return None
    marker = rng.choice(_POOLS["section_marker"][split])
    return {"marker": marker, "n": len(groups)}, "\n\n".join(f"{marker} {i}\n{g}" for i, g in enumerate(groups, 1))


def _check_sections(spec, text) -> bool:
    # A header is a line starting "<marker> <k>" (a heading may follow on the line: "Section 1: Costs").
    parts = re.split(rf"^[ \t]*{re.escape(spec['marker'])} (\d+)\b", text.strip(), flags=re.M)
    # parts: [preamble (a title, an opening line: allowed), num1, body1, num2, body2, ...]
    nums, bodies = parts[1::2], parts[2::2]
    return [int(x) for x in nums] == list(range(1, spec["n"] + 1)) and all(re.search(r"\w", b) for b in bodies)


# How many highlights or placeholders a row shapes. Requests run from 1 to 15 (IFEval's 541 prompts ask for 1-3
# highlights 37 times and 5-15 times 10; placeholders 1-3 16 times, 5-20 11): rows of 1-3 never showed "at least 5",
# and setting g's model, asked for 3-6 highlights, marked one or two words.
_MANY = (1, 2, 2, 3, 3, 4, 5, 6, 8)


def _shape_highlights(rng, base, text, split) -> Shaped:
    cands = [w for w in _content_words(base.response) if word_count(text, w)]
    if not cands:
        return None
    chosen = rng.sample(cands, min(len(cands), rng.choice(_MANY)))
    for w in chosen:
        # never on a "* " bullet line: IFEval's highlight pattern (\*[^\n\*]*\*) pairs the bullet's asterisk with
        # the highlight's first one and counts one fewer than there are
        span = _first_span(text, w, skip_line=_STAR_BULLET)
        if span and text[span[0] - 1:span[0]] != "*" and text[span[1]:span[1] + 1] != "*":
            a, b = span
            text = f"{text[:a]}*{text[a:b]}*{text[b:]}"
    return {}, text


def _at_least(pattern: re.Pattern):
    """(settle, check) for "at least n matches of `pattern`": n is drawn from the matches the shaped answer has."""

    def settle(rng, partial, base, text, split) -> dict | None:
        k = len(pattern.findall(text))  # half the rows ask for what the answer has, so large counts are asked too
        return {"n": k if rng.random() < 0.5 else rng.randint(1, k)} if k else None

    def check(spec, text) -> bool:
        return len(pattern.findall(text)) >= spec["n"]

    return settle, check


_settle_highlights, _check_highlights = _at_least(_HIGHLIGHT)
_settle_placeholders, _check_placeholders = _at_least(_PLACEHOLDER)


def _shape_json(rng, base, text, split) -> Shaped:
    out = json.dumps({rng.choice(_POOLS["json_key"][split]): text}, indent=2, ensure_ascii=False)
    return {}, (f"```json\n{out}\n```" if rng.random() < 0.4 else out)


def _check_json(spec, text) -> bool:
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    try:
        obj = json.loads(fenced.group(1) if fenced else body)
    except json.JSONDecodeError:
        return False
    return isinstance(obj, (dict, list)) and bool(obj)


def _title_of(base: Base) -> str | None:
    first = sentences(base.instruction)[:1]
    kept = [w for w in words(first[0] if first else "") if w.lower() not in _TITLE_SKIP and w.isalpha()][:4]
    return " ".join(w if w.isupper() else w.capitalize() for w in kept) if kept else None


def _shape_title(rng, base, text, split) -> Shaped:
    title = _title_of(base)
    return None if title is None else ({}, f"<<{title}>>\n\n{text}")


def _check_title(spec, text) -> bool:
    first = text.strip().split("\n", 1)[0].strip()
    return re.fullmatch(r"<<[^<>\n]*\w[^<>\n]*>>", first) is not None and len(text.strip()) > len(first)


def _shape_placeholders(rng, base, text, split) -> Shaped:
    pool = _POOLS["placeholder"][split]
    k = min(len(pool), rng.choice(_MANY))
    if _LETTER_HINTS.search(base.instruction) and rng.random() < 0.7:  # a letter greets the person it is for
        greeted = pool[0]  # "name" / "recipient"
        text = f"Dear [{greeted}]\n\n{text}"
        names = rng.sample(pool[1:], k - 1)
    else:
        names = rng.sample(pool, k)
    if len(names) > 2:  # a form to fill in, one line a field
        text += "\n\n" + rng.choice(("To adapt it fill in:", "Your details:", "Fill in:")) + "\n" + "\n".join(
            f"{n[0].upper()}{n[1:]}: [{n}]" for n in names)
    elif names:
        listed = " and ".join(f"[{n}]" for n in names)
        text += "\n\n" + rng.choice(("Fill in {0} for your own case.", "Replace {0} with your details.",
                                     "Adapt it by filling in {0}.")).format(listed)
    return {}, text


def _shape_two(rng, base, text, split) -> Shaped:
    sents = sentences(text)
    if len(sents) < 2:
        return None
    short = sents[0] if len(words(sents[0])) >= 6 or len(sents) < 3 else " ".join(sents[:2])
    return {}, f"{short}\n******\n{text}"


def _check_two(spec, text) -> bool:
    parts = [_normal(p) for p in text.split("******")]
    return len(parts) == 2 and all(re.search(r"\w", p) for p in parts) and parts[0] != parts[1]


_YES_NO_Q = re.compile(r"(is|are|can|do|does|did|should|will|would|was|were|could|has|have)\b[^\n]*\?\s*$", re.I | re.S)
_YES_NO_A = re.compile(r"\s*(yes|no)\b", re.I)


def _fits_yes_no(base: Base) -> bool:
    return bool(_YES_NO_Q.match(base.instruction.strip()) and _YES_NO_A.match(base.response))


def _shape_options(rng, base, text, split) -> Shaped:
    options = list(rng.choice(_POOLS["options"][split]))
    yes = _YES_NO_A.match(base.response).group(1).lower() == "yes"
    return {"options": options}, options[0 if yes else 1]


def _check_options(spec, text) -> bool:
    return _normal(text.strip().strip('"')) in spec["options"]


# ---- framing: start/end phrases, postscript, repeat the request, case, quotes, commas


# A sentence that leans on what came before it, or opens/closes a chat turn, reads wrong moved to the end.
_LEANING = re.compile(r"(it|its|this|these|that|those|they|their|them|he|she|his|her|also|however|so|then|but|and|or|"
                      r"sure|yes|no|thanks|thank|certainly|hello|hi|i|i'm|i'd|i'll|i've|sorry|of course)\b", re.I)
_ABBREVIATION_END = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|dr|mr|mrs|ms|st|no|u\.s|jr|sr)|\b[A-Z])\.$", re.I)


def _movable(sentence: str, text: str) -> bool:
    """A sentence that can close the answer instead: 3-16 words, capitalised, a whole sentence (not cut at "Dr." or
    "e.g."), standing on its own (no brackets, quotes, markdown, no pointer back to what came before), said once, and
    sharing its line with other text (a line that is one sentence is a poem line, a list item or an option: moving it
    breaks the layout)."""
    if not (3 <= len(words(sentence)) <= 16 and sentence[:1].isupper() and sentence[-1] in ".!?"):
        return False
    if re.search(r"[()\[\]\"*`_#:]", sentence) or _LEANING.match(sentence) or _ABBREVIATION_END.search(sentence):
        return False
    if text.count(sentence) != 1:
        return False
    start = text.index(sentence)
    line = text[text.rfind("\n", 0, start) + 1:(text.find("\n", start) + 1 or len(text) + 1) - 1]
    return line.strip() != sentence and not _LIST_ITEM.match(line.strip())


def _shape_end(rng, base, text, split) -> Shaped:
    """Many rows end on one of the answer's own sentences (`_movable`; never its first or last), moved to the end and
    named in the request: thousands of distinct phrases, so the row shows copying the requested words, where a pool
    of six closings is learned by heart (IFEval asks for phrases of its own: setting g's model ended with them on 27% of
    its prompts). The rest close with a phrase from the split's pool."""
    if rng.random() < 0.7:
        cands = [x for x in sentences(text)[1:-1] if _movable(x, text)]
        if cands:
            phrase = rng.choice(cands)
            rest = _tidy(re.sub(re.escape(phrase) + r"[ \t]*", "", text, count=1))
            return {"phrase": phrase}, rest + rng.choice(("\n\n", " ")) + phrase
    phrase = rng.choice(_POOLS["end_phrase"][split])
    return {"phrase": phrase}, text.rstrip() + rng.choice(("\n\n", " ")) + phrase


def _check_end(spec, text) -> bool:
    body = text.rstrip()
    return body.endswith(spec["phrase"]) and bool(re.search(r"\w", body[: -len(spec["phrase"])]))


def _shape_start(rng, base, text, split) -> Shaped:
    phrase = rng.choice(_POOLS["start_phrase"][split])
    return {"phrase": phrase}, phrase + ("\n\n" if "\n" in text or rng.random() < 0.3 else " ") + text


def _check_start(spec, text) -> bool:
    body = text.lstrip()
    return body.startswith(spec["phrase"]) and bool(re.search(r"\w", body[len(spec["phrase"]):]))


def _shape_postscript(rng, base, text, split) -> Shaped:
    marker = rng.choice(("P.S.", "P.P.S.", "PS:"))
    return {"marker": marker}, f"{text.rstrip()}\n\n{marker} {rng.choice(_POOLS['postscript'][split])}"


def _check_postscript(spec, text) -> bool:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return any(line.startswith(spec["marker"]) and re.search(r"\w", line[len(spec["marker"]):]) for line in lines[1:])


def _shape_repeat(rng, base, text, split) -> Shaped:
    return {"request": base.instruction.strip()}, f"{base.instruction.strip()}\n\n{text}"


def _check_repeat(spec, text) -> bool:
    body, request = _normal(text), _normal(spec["request"])
    return body.startswith(request) and bool(re.search(r"\w", body[len(request):]))


def _check_upper(spec, text) -> bool:
    return bool(re.search(r"[A-Z]", text)) and not re.search(r"[a-z]", text)


def _check_lower(spec, text) -> bool:
    return bool(re.search(r"[a-z]", text)) and not re.search(r"[A-Z]", text)


def _shape_no_commas(rng, base, text, split) -> Shaped:
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    return {}, re.sub(r"\s*,\s*", " ", text)


def _check_quoted(spec, text) -> bool:
    body = text.strip()
    return len(body) > 2 and body[0] == body[-1] == '"' and bool(re.search(r"\w", body[1:-1]))


# fixed_answer replaces the whole answer with an option, so it takes no other constraint.
_ALL = frozenset({"word_count", "sentence_count", "paragraph_count", "paragraph_first_word", "include_keywords", "keyword_frequency",
                  "forbidden_words", "letter_frequency", "capital_words", "all_uppercase", "all_lowercase", "bullet_points", "sections",
                  "highlights", "json_format", "title", "placeholders", "postscript", "two_responses", "fixed_answer", "repeat_request",
                  "start_phrase", "end_phrase", "no_commas", "quotation"})
LAYOUTS = frozenset({"bullet_points", "sections", "paragraph_count", "paragraph_first_word", "two_responses", "fixed_answer"})
_CASE = frozenset({"all_uppercase", "all_lowercase", "capital_words"})
_WRAPS = frozenset({"json_format", "quotation"})


def _c(name, stage, conflicts, templates, *, fits=_any, shape=_keep, settle=_as_is, check) -> Constraint:
    return Constraint(name, stage, frozenset(conflicts) - {name}, fits, shape, settle, check, templates)


CONSTRAINTS: dict[str, Constraint] = {c.name: c for c in (
    _c("word_count", 5, {"sentence_count"}, check=_check_count(lambda t: len(words(t))), shape=_shape_cut, settle=_settle_words, templates={
        "train": ("Answer in {rel} {n} words.", "Your response should be {rel} {n} words long.",
                  "Use {rel} {n} words in your reply.", "Write {rel} {n} words.", "Keep the word count of your answer {rel} {n}."),
        "heldout": ("The reply must contain {rel} {n} words.", "Respond with {rel} {n} words in total."),
    }),
    _c("sentence_count", 5, {"word_count"}, check=_check_count(lambda t: len(sentences(t))), shape=_shape_cut, settle=_settle_sentences, templates={
        "train": ("Answer in {rel} {n} sentence{s}.", "Your response should be {rel} {n} sentence{s} long.",
                  "Write {rel} {n} sentence{s} in total.", "Use {rel} {n} sentence{s}."),
        "heldout": ("The whole reply must consist of {rel} {n} sentence{s}.", "Respond with {rel} {n} sentence{s}."),
    }),
    _c("paragraph_count", 20, LAYOUTS, check=_check_divided, shape=_shape_divided, templates={
        "train": ("Write {n} paragraphs and put the markdown divider *** between them.",
                  "Split your answer into {n} paragraphs separated by a line containing only ***.",
                  "Organize the reply as {n} paragraphs divided by ***.",
                  "Your response needs {n} paragraphs, with *** on its own line between each pair."),
        "heldout": ("Use *** on a line by itself to separate the {n} paragraphs of your answer.",
                    "Give {n} paragraphs; mark the break between consecutive ones with ***."),
    }),
    _c("paragraph_first_word", 20, LAYOUTS | {"title", "postscript", "repeat_request", "start_phrase", "placeholders"},
       check=_check_first_word, shape=_shape_first_word, settle=_settle_first_word, templates={
        "train": ("Write exactly {n} paragraphs separated by blank lines, and start paragraph {i} with the word '{word}'.",
                  "Answer in {n} paragraphs (an empty line between them); the {nth} paragraph must begin with \"{word}\".",
                  "Use {n} paragraphs with a blank line between each. Begin the {nth} one with the word {word}.",
                  "Give {n} paragraphs separated by empty lines, paragraph number {i} starting with '{word}'."),
        "heldout": ("Split the reply into {n} paragraphs using empty lines, making sure the {nth} paragraph opens with the word \"{word}\".",
                    "I want {n} blank-line-separated paragraphs, and the {nth} should start with {word}."),
    }),
    # stage 10 (a no-op shape) so that a keyword sentence added under data.embedded_keywords_added goes in after the cut and
    # before layout, case and wrapping, which then apply to it
    _c("include_keywords", 10, set(), check=_check_include, settle=_settle_include, templates={
        "train": ("Make sure your answer includes the words {keywords}.", "Use the keywords {keywords} somewhere in your response.",
                  "Your reply must mention {keywords}.", "Be sure to work the words {keywords} into the answer."),
        "heldout": ("The words {keywords} have to appear in what you write.", "Include these terms in the response: {keywords}."),
    }),
    _c("keyword_frequency", 10, set(), check=_check_frequency, settle=_settle_frequency, templates={
        "train": ("Use the word '{word}' {rel} {n} times.", "The word \"{word}\" should appear {rel} {n} times in your answer.",
                  "Mention {word} {rel} {n} times.", "Your response needs the word '{word}' {rel} {n} times."),
        "heldout": ("Make \"{word}\" show up {rel} {n} times.", "Write the word {word} {rel} {n} times in the reply."),
    }),
    _c("forbidden_words", 99, set(), check=_check_forbidden, settle=_settle_forbidden, templates={
        "train": ("Do not use the words {keywords}.", "Avoid the words {keywords} in your answer.",
                  "Your response must not contain {keywords}.", "Write the answer without using {keywords}."),
        "heldout": ("Keep the words {keywords} out of your reply.", "Never say {keywords} in the response."),
    }),
    _c("letter_frequency", 99, set(), check=_check_letter, settle=_settle_letter, templates={
        "train": ("The letter '{letter}' should appear {rel} {n} times in your response.", "Use the letter {letter} {rel} {n} times.",
                  "Make sure the letter \"{letter}\" occurs {rel} {n} times.", "Your answer should contain the letter '{letter}' {rel} {n} times."),
        "heldout": ("Write it so that '{letter}' shows up {rel} {n} times.", "Count the letter {letter}: it must appear {rel} {n} times in the reply."),
    }),
    _c("capital_words", 50, _CASE, check=_check_count(capital_words), shape=_shape_capitals, settle=_settle_capitals, templates={
        "train": ("Use {rel} {n} word{s} written entirely in capital letters.", "Include {rel} {n} word{s} in ALL CAPS.",
                  "Your answer should contain {rel} {n} fully capitalized word{s}.", "Write {rel} {n} word{s} in all capital letters."),
        "heldout": ("The reply should have {rel} {n} word{s} typed in uppercase only.", "Capitalize every letter of {rel} {n} word{s} in your response."),
    }),
    _c("all_uppercase", 92, _CASE | {"start_phrase", "end_phrase", "sections", "repeat_request", "fixed_answer", "json_format"},
       check=_check_upper, shape=lambda rng, base, text, split: ({}, text.upper()), templates={
        "train": ("Write your whole answer in capital letters.", "Respond using only uppercase letters.",
                  "Make every letter of your reply uppercase.", "Answer in ALL CAPS with no lowercase letters at all."),
        "heldout": ("Please type the complete response in upper case.", "No lowercase letters anywhere in your answer: capitals only."),
    }),
    _c("all_lowercase", 92, _CASE | {"start_phrase", "end_phrase", "sections", "repeat_request", "fixed_answer", "postscript"},
       check=_check_lower, shape=lambda rng, base, text, split: ({}, text.lower()), templates={
        "train": ("Write your entire response in lowercase letters; no capitals are allowed.", "Use only lowercase letters in your answer.",
                  "Respond in all lowercase, without a single capital letter.", "Do not use any capital letters in your reply."),
        "heldout": ("Type everything in small letters only.", "Your reply must be entirely lower case."),
    }),
    _c("bullet_points", 20, LAYOUTS, check=_check_bullets, shape=_shape_bullets, templates={
        "train": ("Your answer must contain exactly {n} bullet point{s} in markdown, each line starting with \"* \".",
                  "Use exactly {n} markdown bullet point{s}, such as:\n* first point\n* second point",
                  "Present the answer as {n} bullet point{s}.", "Format the reply with exactly {n} markdown bullet point{s}."),
        "heldout": ("Give the answer as a markdown list of exactly {n} item{s}.", "I want precisely {n} bullet point{s} (markdown, starting with *)."),
    }),
    _c("sections", 20, LAYOUTS, check=_check_sections, shape=_shape_sections, templates={
        "train": ("Split your response into {n} sections and mark the start of each with \"{marker} X\", where X is its number.",
                  "Organize the answer in {n} sections labelled {marker} 1, {marker} 2 and so on.",
                  "Your reply must have {n} sections; begin each one with {marker} followed by its number.",
                  "Use {n} numbered sections, each headed '{marker} N'."),
        "heldout": ("Break the answer into {n} parts, starting each part with the heading {marker} and its number.",
                    "Structure your reply as {n} labelled sections ({marker} 1 to {marker} {n})."),
    }),
    _c("highlights", 50, {"bullet_points"}, check=_check_highlights, shape=_shape_highlights, settle=_settle_highlights, templates={
        "train": ("Highlight at least {n} part{s} of your answer with markdown, for example *key point*.",
                  "Use markdown to emphasize at least {n} part{s} of the text, like *this*.",
                  "Mark at least {n} important word{s} or phrase{s} in italics with asterisks (*like this*).",
                  "Put asterisks around at least {n} key word{s} to highlight them."),
        "heldout": ("Emphasize {n} or more part{s} of the reply using *single asterisks*.",
                    "Make a minimum of {n} span{s} of text stand out with markdown italics (*...*)."),
    }),
    _c("json_format", 98, _WRAPS | LAYOUTS | {"title", "postscript", "start_phrase", "end_phrase", "repeat_request", "placeholders"},
       check=_check_json, shape=_shape_json, templates={
        "train": ("Give the whole answer as valid JSON.", "Format your entire reply as a JSON object.",
                  "Return the response as JSON; a markdown code block around it is fine.", "Put your answer in JSON and output nothing outside it."),
        "heldout": ("The complete reply must parse as JSON.", "Respond only with JSON."),
    }),
    _c("title", 80, {"repeat_request", "start_phrase", "quotation", "fixed_answer", "json_format", "two_responses"},
       check=_check_title, shape=_shape_title, templates={
        "train": ("Give your answer a title between double angle brackets, for example {example}.",
                  "Start with a title in double angle brackets, like {example}.",
                  "Put a title at the top, enclosed in << and >>.",
                  "Include a title such as {example} (in double angle brackets) at the beginning."),
        "heldout": ("Begin the reply with a heading surrounded by << >>, e.g. {example}.",
                    "Add a title inside double angle brackets on the first line."),
    }),
    _c("placeholders", 60, {"fixed_answer"}, check=_check_placeholders, shape=_shape_placeholders, settle=_settle_placeholders, templates={
        "train": ("Include at least {n} placeholder{s} in square brackets, like [{example}].",
                  "Your answer must contain at least {n} placeholder{s} written in square brackets, for example [{example}].",
                  "Add {n} or more placeholders such as [{example}] in square brackets.",
                  "Leave at least {n} fill-in-the-blank placeholder{s} in square brackets (e.g. [{example}])."),
        "heldout": ("Put at least {n} bracketed placeholder{s} like [{example}] in the text.",
                    "The reply should have a minimum of {n} square-bracket placeholder{s}, e.g. [{example}]."),
    }),
    _c("postscript", 70, {"end_phrase", "fixed_answer", "json_format"}, check=_check_postscript, shape=_shape_postscript, templates={
        "train": ("When you are done, write a postscript opening with {marker}", "Finish with a postscript that begins with {marker}",
                  "Add a note after your answer, starting with {marker}", "Please sign off with a postscript beginning {marker}"),
        "heldout": ("Close your reply with an extra note introduced by {marker}", "Append a short postscript ({marker}) to the end."),
    }),
    _c("two_responses", 20, LAYOUTS | {"repeat_request", "title"}, check=_check_two, shape=_shape_two, templates={
        "train": ("Give two different responses, separated by six asterisks (******).",
                  "Write two versions of the answer, a short one and a longer one, with ****** between them.",
                  "Provide two distinct answers and separate them with a line of six asterisks: ******",
                  "Answer twice, in two different ways, putting ****** between the two answers."),
        "heldout": ("I'd like two alternative replies; divide them using ******.", "Offer a pair of different responses separated by the string ******."),
    }),
    _c("fixed_answer", 20, _ALL, check=_check_options, shape=_shape_options, fits=_fits_yes_no, templates={
        "train": ("Reply with one option from this list: {options}", "Reply using only one of these: {options}",
                  "Choose one answer from {options} and say nothing else.", "Your entire reply must be one of: {options}"),
        "heldout": ("Respond with exactly one of the options {options} and nothing more.", "Pick from {options} as your whole answer."),
    }),
    _c("repeat_request", 85, {"title", "start_phrase", "quotation", "json_format", "no_commas", "fixed_answer", "two_responses"},
       check=_check_repeat, shape=_shape_repeat, templates={
        "train": ("First copy my request exactly as written (without these extra instructions), then answer it.",
                  "Start by restating the request verbatim, leaving out these extra instructions, and then respond.",
                  "Say the request again, word for word, before you answer it, but not these added instructions.",
                  "Begin your reply by repeating the request unchanged (minus these instructions); after that, answer."),
        "heldout": ("Echo the question back exactly as I wrote it (skip these instructions), then reply.",
                    "Your answer should open with an exact copy of my request, without these instructions, followed by the response."),
    }),
    _c("start_phrase", 87, {"title", "repeat_request", "json_format", "quotation", "fixed_answer"}, check=_check_start, shape=_shape_start, templates={
        "train": ("Begin your response with \"{phrase}\"", "Start your answer with the exact words: {phrase}",
                  "The first words of your reply must be \"{phrase}\"", "Open with \"{phrase}\" and then answer."),
        "heldout": ("Make sure the reply starts exactly with \"{phrase}\"", "Your first words should be: {phrase}"),
    }),
    _c("end_phrase", 88, {"postscript", "json_format", "quotation", "fixed_answer"}, check=_check_end, shape=_shape_end, templates={
        "train": ("Your reply has to finish with the words \"{phrase}\" and nothing after them.", "Finish your answer with these exact words: {phrase}",
                  "The last words of your reply must be \"{phrase}\"", "Close with the phrase \"{phrase}\" with no other words following it."),
        "heldout": ("Make sure your reply ends exactly with \"{phrase}\"", "Wrap up by writing \"{phrase}\" as the very last thing."),
    }),
    _c("no_commas", 30, {"repeat_request", "fixed_answer"}, check=lambda spec, text: "," not in text, shape=_shape_no_commas, templates={
        "train": ("Write the answer without a single comma.", "Avoid commas entirely in your reply.",
                  "No commas are allowed anywhere in your answer.", "Leave out all commas when you write the response."),
        "heldout": ("Your reply must contain zero commas.", "Use no comma characters at all."),
    }),
    _c("quotation", 99, _WRAPS | {"title", "start_phrase", "end_phrase", "repeat_request", "fixed_answer"}, check=_check_quoted,
       fits=lambda base: not base.response.startswith('"'), shape=lambda rng, base, text, split: ({}, f'"{text.strip()}"'), templates={
        "train": ("Put your whole answer inside double quotes.", "Enclose the entire reply in double quotation marks.",
                  "Your response must begin and end with a double quote (\").", "Surround everything you write with double quotes."),
        "heldout": ("Quote your full answer, using \" at the very start and the very end.",
                    "Place the complete response between a pair of double quotation marks."),
    }),
)}
TYPES: tuple[str, ...] = tuple(CONSTRAINTS)
assert set(TYPES) == _ALL


def type_weight_problems(weights: dict) -> tuple[list, list[tuple]]:
    """What is wrong in a mapping of constraint type -> weight (data.embedded_type_weights): the names that are no
    constraint type (as given, in name order), and the (type, weight) pairs whose weight is not a finite number >= 0 (a
    bool is none: YAML's `true` would otherwise count as 1). One check for the config (at load) and the generator
    (tasks/instructions.py), each of which words the error for its own reader."""
    unknown = sorted((t for t in weights if str(t) not in TYPES), key=str)
    bad = [(t, w) for t, w in weights.items() if isinstance(w, bool) or not (isinstance(w, (int, float)) and 0 <= w < math.inf)]
    return unknown, bad


def compatible(a: str, b: str) -> bool:
    return a != b and b not in CONSTRAINTS[a].conflicts and a not in CONSTRAINTS[b].conflicts


# --------------------------------------------------------------------------------------------------
# Phrasing: a spec -> one sentence of the prompt; several sentences -> the prompt


def _quoted_list(items: list[str], rng: random.Random) -> str:
    q = rng.choice(("'{}'", '"{}"'))
    shown = [q.format(w) for w in items]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def render(name: str, spec: dict, rng: random.Random, split: str) -> str:
    """One phrasing of constraint `name` with `spec`'s values, drawn from the split's templates."""
    n = spec.get("n", 0)
    fields = {
        **spec,
        "s": "" if n == 1 else "s",
        "rel": rng.choice(RELATION_WORDS[spec["relation"]]) if "relation" in spec else "",
        "keywords": _quoted_list(spec.get("keywords", ["?"]), rng),
        "options": " / ".join(f'"{o}"' for o in spec.get("options", ())),
        "nth": ORDINALS[spec["i"] - 1] if "i" in spec else "",
        "example": rng.choice(_POOLS["placeholder" if name == "placeholders" else "title_example"][split]),
    }
    text = rng.choice(CONSTRAINTS[name].templates[split]).format(**fields)
    return text[0].upper() + text[1:]


_LAYOUTS: tuple[str, ...] = ("inline", "paragraph", "before", "list")
_LIST_HEADS = ("Requirements:", "Constraints:", "Please follow these rules:", "Instructions for the answer:")


def compose(instruction: str, phrases: list[str], rng: random.Random) -> str:
    """The prompt: the instruction with the constraint sentences after it, before it, or as a list under it."""
    instruction = instruction.strip()
    layout = rng.choice(_LAYOUTS)
    if layout == "inline" and re.search(r"[.?!:]$", instruction) and "\n" not in instruction:
        return instruction + " " + " ".join(phrases)
    if layout == "before":
        return " ".join(phrases) + "\n\n" + instruction
    if layout == "list" and len(phrases) > 1:
        return instruction + "\n\n" + rng.choice(_LIST_HEADS) + "\n" + "\n".join("- " + p for p in phrases)
    return instruction + "\n\n" + " ".join(phrases)


# --------------------------------------------------------------------------------------------------
# Building one row, and checking an answer


# The shapes that add the asked-for words to the answer, drawn instead of a type's own for a share of its rows
ADDING_SHAPES: dict[str, Callable[[random.Random, Base, str, str], Shaped]] = {
    "include_keywords": _shape_add_include,
    "keyword_frequency": _shape_add_frequency,
}


def build(rng: random.Random, base: Base, names: list[str], split: str,
          keywords_added: float = 0.0) -> tuple[str, str, list[dict]] | None:
    """(prompt, answer, specs) for `base` under the constraints `names` (first = the row's family), or None when the
    base can't take them. The answer is verified by `check_all` here: nothing that fails its own check comes out.

    `keywords_added` (0..1): the share of include_keywords / keyword_frequency constraints whose words are added to the
    answer (ADDING_SHAPES) instead of taken from it. 0 draws nothing more from `rng`: the rows of before it existed."""
    text = _tidy(base.response)
    partial: dict[str, dict] = {}
    for name in sorted(names, key=lambda x: CONSTRAINTS[x].stage):
        shape = CONSTRAINTS[name].shape
        if keywords_added and name in ADDING_SHAPES and rng.random() < keywords_added:
            shape = ADDING_SHAPES[name]
        shaped = shape(rng, base, text, split)
        if shaped is None:
            return None
        partial[name], text = shaped
    specs = []
    for name in names:
        spec = CONSTRAINTS[name].settle(rng, partial[name], base, text, split)
        if spec is None:
            return None
        specs.append({"type": name, **spec})
    if not check_all(specs, text):
        return None
    phrases = [render(s["type"], {k: v for k, v in s.items() if k != "type"}, rng, split) for s in specs]
    rng.shuffle(phrases)
    return compose(base.instruction, phrases, rng), text, specs


def check_all(specs: list[dict], response: str) -> bool:
    """True iff `response` satisfies every constraint spec (each {"type": name, ...values})."""
    for spec in specs:
        c = CONSTRAINTS.get(spec.get("type"))
        if c is None:
            raise ValueError(f"unknown constraint type {spec.get('type')!r}; expected one of {TYPES}")
        if not c.check(spec, response):
            return False
    return True


# --------------------------------------------------------------------------------------------------
# Bases: which real conversations can carry a constraint


def _tidy(text: str) -> str:
    """Trailing spaces off every line, at most one blank line in a row."""
    return re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in text.strip().splitlines())).strip()


def split_of(instruction: str) -> str:
    """Held-out or train, by a stable hash of the instruction (15% held out): one instruction never lands in both."""
    return "heldout" if zlib.crc32(_normal(instruction).casefold().encode()) % 20 < 3 else "train"


MAX_BASE_INSTRUCTION_WORDS = 100  # IFEval's prompts run to ~100 words


def base_of(messages: list[dict], source: str, max_words: int) -> Base | None:
    """The conversation's first exchange as a Base, or None when it is no good as one: the instruction over 100 words,
    the answer under 5 or over `max_words` words, or holding code, tables, links or HTML (a transform such as
    uppercasing or dropping commas would break those; backslashes: escaped markdown, LaTeX), a line over 1,200
    characters, or more than 20 line breaks (outlines, poems and lyrics: the length shapes join lines into sentences).
    (Until 2026-12-02: instructions of <= 60 words and lines of <= 400 characters, which dropped plain prose paragraphs
    of ~70 words and left demo-gpu 1,871 bases, 30 of them 400-600 words; now 2,757 and 66.)"""
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) < 2 or turns[0]["role"] != "user" or turns[1]["role"] != "assistant":
        return None
    instruction, response = (_tidy(turns[i]["content"]) for i in (0, 1))
    if not 2 <= len(words(instruction)) <= MAX_BASE_INSTRUCTION_WORDS or not 5 <= len(words(response)) <= max_words:
        return None
    if re.search(r"```|\||https?://|</?[a-zA-Z]+>|\t|\*\*\*|\[|\{|<<|\r|\\", response) or re.search(r"```|<<|\r", instruction):
        return None
    if any(len(line) > 1200 for line in response.splitlines()) or response.count("\n") > 20:
        return None
    return Base(instruction, response, source)
