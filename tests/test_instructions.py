"""Contracts of tasks/instructions.py.

Checkers accept right answers and reject near misses; canonical answers pass their own checker; the
heldout split shares no prompt, template or value pool with train; generation is deterministic,
balanced and JSON-serializable."""

import json
import re
from collections import Counter

import pytest

from tasks import instructions
from tasks.instructions import FAMILIES, Example, check_answer, generate, score

# family -> (check spec, accepted responses, rejected plausible wrong responses)
CASES = {
    "uppercase": (
        {"expected": "QUIET RIVER"},
        ["QUIET RIVER", "  QUIET RIVER.\n", '"QUIET RIVER"'],
        ["Quiet River", "quiet river", "QUIET RIVERS", "Sure! QUIET RIVER"],
    ),
    "lowercase": (
        {"expected": "jolly bright"},
        ["jolly bright", "jolly bright.", " jolly  bright "],
        ["Jolly bright", "JOLLY BRIGHT", "jolly"],
    ),
    "reverse_words": (
        {"expected": "silver engine dark"},
        ["silver engine dark", "Silver engine dark."],
        ["dark engine silver", "silver dark engine", "silver engine"],
    ),
    "count_items": (
        {"expected": 6},
        ["6", "6.", " 6\n"],
        ["5", "7", "six items", "There are 6 items."],
    ),
    "sort_numbers": (
        {"expected": [12, 19, 30]},
        ["12, 19, 30", "12,19,30", "12 19 30", "[12, 19, 30]", "12, 19, 30."],
        ["30, 19, 12", "12, 30, 19", "12, 19", "12, 19, 30, 30", "Sorted: 12, 19, 30"],
    ),
    "arithmetic": (
        {"expected": 49},
        ["49", "49.", "\n49 "],
        ["48", "50", "36 + 13 = 49", "forty-nine"],
    ),
    "bullet_list": (
        {"n": 3, "allowed": ["actor", "bridge", "garden", "purple"]},
        [
            "- actor\n- bridge\n- garden",
            "- purple\n\n- actor\n- garden\n",  # any offered words, blank lines ignored
            "- Actor.\n- bridge\n- garden",
        ],
        [
            "- actor\n- bridge",  # one bullet short
            "- actor\n- bridge\n- garden\n- purple",  # extra bullet
            "- actor\n- actor\n- bridge",  # duplicate
            "- actor\n- bridge\n- tiger",  # word not offered
            "* actor\n* bridge\n* garden",  # wrong bullet marker
            "Here you go:\n- actor\n- bridge\n- garden",  # chatter line
        ],
    ),
    "json_object": (
        {"expected": {"tool": "salmon", "song": "lively"}},
        [
            '{"tool": "salmon", "song": "lively"}',
            '{"song":"lively","tool":"salmon"}',
            '```json\n{"tool": "salmon", "song": "lively"}\n```',
        ],
        [
            '{"tool": "salmon", "song": "lively", "extra": "x"}',  # extra key
            '{"tool": "salmon"}',  # missing key
            '{"tool": "salmon", "song": "happy"}',  # wrong value
            "{'tool': 'salmon', 'song': 'lively'}",  # not JSON
            '["salmon", "lively"]',  # not an object
        ],
    ),
    "extract_email": (
        {"expected": "nina.kevin@mail.org"},
        ["nina.kevin@mail.org", "nina.kevin@mail.org.", "Nina.Kevin@mail.org"],
        ["nina@mail.org", "nina.kevin@mail.com", "Email: nina.kevin@mail.org"],
    ),
    "extract_date": (
        {"expected": "2001-11-22"},
        ["2001-11-22", "2001-11-22."],
        ["2001-11-21", "22/11/2001", "November 22, 2001"],
    ),
    "repeat_word": (
        {"word": "clean", "times": 4},
        ["clean clean clean clean", "clean, clean, clean, clean", "Clean clean clean clean."],
        ["clean clean clean", "clean clean clean clean clean", "clean clean dirty clean"],
    ),
    "first_letter": (
        {"expected": "s"},
        ["s", "S", '"s"', "s."],
        ["i", "si", "The first letter is s"],
    ),
    "last_letter": (
        {"expected": "e"},
        ["e", "E.", "'e'"],
        ["n", "ne", "e is the last letter"],
    ),
    "yes_no": (
        {"expected": "no"},
        ["No", "no.", "NO!", " No "],
        ["Yes", "Nope", "No, 4 is less than 45", "Yes and no"],
    ),
}


def test_every_family_has_cases_and_plumbing():
    assert len(FAMILIES) >= 12
    assert len(set(FAMILIES)) == len(FAMILIES)
    assert set(CASES) == set(FAMILIES)
    assert tuple(instructions._TEMPLATES) == FAMILIES
    assert tuple(instructions._GENERATORS) == FAMILIES
    assert set(instructions._CHECKERS) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_checker_accepts_right_and_rejects_wrong(family):
    check, right, wrong = CASES[family]
    for response in right:
        assert check_answer(family, check, response), f"{family} should accept {response!r}"
    for response in wrong:
        assert not check_answer(family, check, response), f"{family} should reject {response!r}"


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_canonical_answers_pass_their_checker(split):
    examples = generate(200 * len(FAMILIES), split, seed=3)
    failures = [ex for ex in examples if not check_answer(ex.family, ex.check, ex.answer)]
    assert not failures, failures[:3]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_canonical_answers_fail_other_examples_checks(split):
    """An answer that ignores the instruction should not pass: shifted answers fail most checks."""
    examples = generate(20 * len(FAMILIES), split, seed=4)
    by_family = {}
    for ex in examples:
        by_family.setdefault(ex.family, []).append(ex)
    for family, group in by_family.items():
        shifted = zip(group, group[1:] + group[:1])
        passed = sum(check_answer(family, a.check, b.answer) for a, b in shifted)
        # yes_no, letters and small counts collide by chance; everything else almost never does.
        assert passed < len(group) * 0.6, family


def test_answers_are_short():
    for ex in generate(1000, "train", seed=0) + generate(1000, "heldout", seed=0):
        assert len(ex.answer.split()) <= 30, ex


def test_train_and_heldout_prompts_are_disjoint():
    train = {ex.prompt for ex in generate(3000, "train", seed=0)}
    heldout = {ex.prompt for ex in generate(3000, "heldout", seed=0)}
    assert not train & heldout


@pytest.mark.parametrize("family", FAMILIES)
def test_templates_are_disjoint_and_numerous(family):
    templates = instructions._TEMPLATES[family]
    assert len(templates["train"]) >= 3
    assert len(templates["heldout"]) >= 2
    assert not set(templates["train"]) & set(templates["heldout"])


def _template_regex(template):
    """Compile a template to a regex that matches any prompt it can produce."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile(".+?".join(re.escape(p) for p in parts) + r"\Z", flags=re.DOTALL)


def test_each_prompt_matches_only_its_own_splits_templates():
    for split, other in (("train", "heldout"), ("heldout", "train")):
        for ex in generate(len(FAMILIES) * 40, split, seed=1):
            own = instructions._TEMPLATES[ex.family][split]
            foreign = instructions._TEMPLATES[ex.family][other]
            assert any(_template_regex(t).match(ex.prompt) for t in own), ex.prompt
            assert not any(_template_regex(t).match(ex.prompt) for t in foreign), ex.prompt


@pytest.mark.parametrize(
    "pool", ["_WORDS", "_NAMES", "_DOMAINS", "_JSON_KEYS", "_EMAIL_FRAMES", "_DATE_FRAMES"]
)
def test_value_pools_are_disjoint(pool):
    pools = getattr(instructions, pool)
    assert len(set(pools["train"])) == len(pools["train"])
    assert not set(pools["train"]) & set(pools["heldout"])


@pytest.mark.parametrize("ranges", ["_SORT_RANGE", "_COMPARE_RANGE", "_YEAR_RANGE"])
def test_number_ranges_are_disjoint(ranges):
    (lo_a, hi_a), (lo_b, hi_b) = getattr(instructions, ranges).values()
    assert hi_a < lo_b or hi_b < lo_a


def test_arithmetic_questions_are_disjoint():
    words_to_symbols = {"plus": "+", "minus": "-", "times": "*"}

    def questions(split):
        out = set()
        for ex in generate(len(FAMILIES) * 300, split, seed=0):
            if ex.family == "arithmetic":
                a, op, b = re.search(r"(\d+) (\S+) (\d+)", ex.prompt).groups()
                out.add((int(a), words_to_symbols.get(op, op), int(b)))
        return out

    train, heldout = questions("train"), questions("heldout")
    assert train and heldout
    assert not train & heldout


def test_words_in_prompts_come_from_their_split_pool():
    heldout_words = set(instructions._WORDS["heldout"])
    for ex in generate(1000, "train", seed=2):
        tokens = set(ex.prompt.lower().replace(",", " ").replace('"', " ").split())
        assert not tokens & heldout_words, ex.prompt


def test_generation_is_deterministic():
    a = [ex.to_record() for ex in generate(300, "train", seed=7)]
    b = [ex.to_record() for ex in generate(300, "train", seed=7)]
    c = [ex.to_record() for ex in generate(300, "train", seed=8)]
    assert a == b
    assert a != c
    assert [ex.to_record() for ex in generate(100, "train", seed=7)] == a[:100]


def test_splits_differ_for_the_same_seed():
    train = generate(100, "train", seed=0)
    heldout = generate(100, "heldout", seed=0)
    assert [ex.prompt for ex in train] != [ex.prompt for ex in heldout]


def test_families_are_balanced_round_robin():
    n = len(FAMILIES) * 10 + 5
    examples = generate(n, "heldout", seed=0)
    assert [ex.family for ex in examples[: len(FAMILIES)]] == list(FAMILIES)
    counts = Counter(ex.family for ex in examples)
    assert set(counts) == set(FAMILIES)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_yes_no_answers_are_balanced():
    answers = Counter(ex.answer for ex in generate(len(FAMILIES) * 400, "train", seed=0)
                      if ex.family == "yes_no")
    assert 0.35 < answers["Yes"] / (answers["Yes"] + answers["No"]) < 0.65


def test_records_are_json_serializable_and_round_trip():
    examples = generate(len(FAMILIES) * 3, "train", seed=0)
    for ex in examples:
        record = json.loads(json.dumps(ex.to_record()))
        assert record["family"] == ex.family
        assert record["messages"] == [
            {"role": "user", "content": ex.prompt},
            {"role": "assistant", "content": ex.answer},
        ]
        assert check_answer(record["family"], record["check"], ex.answer)


def test_score_matches_check_answer():
    examples = generate(len(FAMILIES) * 2, "heldout", seed=5)
    records = [ex.to_record() for ex in examples]
    responses = [ex.answer if i % 2 == 0 else "I don't know" for i, ex in enumerate(examples)]
    assert score(records, responses) == [i % 2 == 0 for i in range(len(examples))]


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="split"):
        generate(10, "test", seed=0)
    with pytest.raises(ValueError, match="unknown family"):
        check_answer("poetry", {}, "x")
    with pytest.raises(ValueError, match="one response per record"):
        score([Example("yes_no", "p", "Yes", {"expected": "yes"}).to_record()], [])
