"""Stage 1 on real-shaped fixtures: every schema and file type, masking, the split, bad rows, the cache."""

from __future__ import annotations

import collections
import json

import pandas as pd
import pytest

from tasks.common import StageError, stage_dir
from tasks.data import cache_key, encode, load_dataset_records, load_heldout_meta, load_split, oasst_conversations, to_messages

# trl-lib/Capybara: a `messages` column of role/content dicts (plus a `source` column).
CAPYBARA = [
    {"source": "General-Instruct", "messages": [
        {"role": "user", "content": f"What is {i} plus {i}?"},
        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."},
        {"role": "user", "content": "And doubled again?"},
        {"role": "assistant", "content": f"That makes {4 * i}."},
    ]}
    for i in range(40)
]
# yahma/alpaca-cleaned: instruction / input / output.
ALPACA = [{"instruction": f"Reverse the word number {i}.", "input": "" if i % 2 else f"word{i}", "output": f"{i}drow"} for i in range(40)]


def _oasst_rows(n_trees: int = 20) -> list[dict]:
    # OpenAssistant/oasst1: one row per message; trees via parent_id; assistant replies ranked (0 = best).
    rows = []
    for t in range(n_trees):
        root = f"t{t}"
        lang = "en" if t % 4 else "de"
        rows.append({"message_id": root, "parent_id": None, "message_tree_id": root, "role": "prompter", "text": f"Question {t}?", "lang": lang, "rank": None, "deleted": False})
        for rank in (1, 0):
            rows.append({"message_id": f"{root}-a{rank}", "parent_id": root, "message_tree_id": root, "role": "assistant",
                         "text": f"{'best' if rank == 0 else 'worse'} answer {t}", "lang": lang, "rank": rank, "deleted": False})
        rows.append({"message_id": f"{root}-f", "parent_id": f"{root}-a0", "message_tree_id": root, "role": "prompter", "text": "Thanks, more?", "lang": lang, "rank": 0, "deleted": False})
        rows.append({"message_id": f"{root}-g", "parent_id": f"{root}-f", "message_tree_id": root, "role": "assistant", "text": f"More on {t}.", "lang": lang, "rank": 0, "deleted": False})
    return rows


def _cfg(tiny_cfg, source, **data):
    data_cfg = tiny_cfg.data.model_copy(update={"source": str(source), "heldout_size": 5, **data})
    return data_cfg, tiny_cfg.model


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        pd.DataFrame([{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in rows]).to_csv(path, index=False)
    elif kind == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("schema", ["capybara", "alpaca"])
def test_each_schema_and_file_type(tmp_path, tiny_cfg, shared_artifacts, kind, schema):
    rows = CAPYBARA if schema == "capybara" else ALPACA
    src = _write(tmp_path / f"d.{kind}", rows, kind)
    rec = load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert rec.n_train + rec.n_heldout == 40 and rec.n_heldout == 4  # 10% capped by heldout_size
    assert rec.dropped == {} and not rec.has_checkers


def test_oasst_trees_take_the_best_ranked_path_in_one_language(tmp_path, tiny_cfg, shared_artifacts):
    convs, dropped = oasst_conversations(_oasst_rows(), language="en")
    assert len(convs) == 15 and dropped["other language"] == 5
    assert [m["role"] for m in convs[0]] == ["user", "assistant", "user", "assistant"]
    assert all(c[1]["content"].startswith("best") for c in convs)
    src = _write(tmp_path / "oasst.jsonl", _oasst_rows(), "jsonl")
    rec = load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert rec.n_train + rec.n_heldout == 15


def test_a_language_filter_that_leaves_nothing_names_data_language(tmp_path, tiny_cfg, shared_artifacts):
    src = _write(tmp_path / "oasst.jsonl", _oasst_rows(), "jsonl")
    with pytest.raises(StageError, match=r"0 usable training rows \(other language: 20\); widen data.language"):
        load_dataset_records(*_cfg(tiny_cfg, src, language="fr"), shared_artifacts)


def test_labels_cover_assistant_tokens_only_with_eos(tiny_tok):
    msgs = CAPYBARA[3]["messages"]
    enc, reason = encode(tiny_tok, msgs, 512, "drop")
    assert reason is None
    labeled = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != -100]
    assert all(l in (-100, t) for t, l in zip(enc["input_ids"], enc["labels"]))
    text = tiny_tok.decode(labeled)
    # Both assistant turns are learned, user turns never, and the EOS closing each answer is learned.
    assert "6 plus" not in text.split("3 plus 3 is 6.")[0]
    assert "3 plus 3 is 6." in text and "That makes 12." in text
    assert "What is" not in text and "doubled again" not in text
    assert labeled.count(tiny_tok.eos_token_id) == 2


def test_heldout_is_disjoint_fixed_by_seed_and_never_trained(tmp_path, tiny_cfg, shared_artifacts):
    src = _write(tmp_path / "c.jsonl", CAPYBARA, "jsonl")
    rec = load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    train = {tuple(x) for x in load_split(rec, "train")["input_ids"]}
    held = {tuple(x) for x in load_split(rec, "heldout")["input_ids"]}
    assert train and held and not (train & held)
    again = load_dataset_records(*_cfg(tiny_cfg, src, seed=42, max_rows=40), shared_artifacts)
    assert {tuple(x) for x in load_split(again, "heldout")["input_ids"]} == held
    other = load_dataset_records(*_cfg(tiny_cfg, src, seed=7), shared_artifacts)
    assert {tuple(x) for x in load_split(other, "heldout")["input_ids"]} != held


def test_embedded_heldout_has_checkers_and_other_prompts(tiny_cfg, shared_artifacts):
    rec = load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)
    assert rec.has_checkers and rec.n_heldout == tiny_cfg.data.embedded_heldout
    meta = load_heldout_meta(rec)
    assert all("family" in m and "check" in m for m in meta)


def test_bad_rows_are_dropped_and_counted_by_reason(tmp_path, tiny_cfg, shared_artifacts):
    good = CAPYBARA[:20]
    bad = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "?"}]},  # unknown role
        {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]},  # empty turn
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},  # non-text
        {"messages": [{"role": "user", "content": "only a question"}]},  # no assistant turn
        {"messages": []},  # missing
        {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "long"}]},  # over max_length
    ]
    src = _write(tmp_path / "mixed.jsonl", good + bad, "jsonl")
    rec = load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert rec.n_train + rec.n_heldout == 20
    assert rec.dropped == {"unknown role": 1, "empty turn": 1, "non-text turn": 1, "no assistant turn": 1, "missing field": 1, "over max_length": 1}


def test_zero_usable_rows_is_an_error(tmp_path, tiny_cfg, shared_artifacts):
    src = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 3, "jsonl")
    with pytest.raises(StageError, match="0 usable training rows"):
        load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)


def test_unknown_columns_are_told_the_columns_read_and_the_rename(tmp_path, tiny_cfg, shared_artifacts):
    """A question/answer CSV was told "or set data.schema", which cannot help: every schema reads only its own columns
    (a review, 2026-12-06). The line names the columns that are read and the rename that fixes the file, after the key and
    the file they are in (a review: data.source's line named no file, where a data.mix entry's named its key and file)."""
    src = _write(tmp_path / "qa.csv", [{"question": "What is 2 + 2?", "answer": "4."}] * 20, "csv")
    with pytest.raises(StageError) as e:
        load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    msg = str(e.value)
    assert msg.startswith(f"data.source {str(src)!r}: cannot tell the schema from columns ['answer', 'question']; the columns read "
                          "are `messages`"), msg
    assert msg.endswith("rename the file's columns to one of these (here: question -> instruction, answer -> output)"), msg
    assert "data.schema" not in msg and "\n" not in msg


def test_the_rename_hint_keeps_a_context_and_names_what_stays_unread(tmp_path, tiny_cfg, shared_artifacts):
    """A Dolly row was told `response -> output` only, after which its context was dropped without a word (a review,
    2026-12-06): alpaca's reader adds `input` to the prompt, so the context is renamed to it; what no reader takes
    (a category, a history, a system prompt) is named."""
    dolly = {"instruction": "Who wrote it?", "context": "Ann wrote the book.", "response": "Ann.", "category": "closed_qa"}
    src = _write(tmp_path / "dolly.jsonl", [dolly] * 20, "jsonl")
    with pytest.raises(StageError) as e:
        load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert str(e.value).endswith("(here: response -> output, context -> input; then still not read: category)"), str(e.value)
    row = {"prompt": "Hi?", "completion": "Hello.", "history": [["a", "b"]], "system": "Be brief."}
    src = _write(tmp_path / "chat.jsonl", [row] * 20, "jsonl")
    with pytest.raises(StageError) as e:
        load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert str(e.value).endswith("(here: prompt -> instruction, completion -> output; then still not read: history, system)"), str(e.value)


def test_malformed_jsonl_names_the_line(tmp_path, tiny_cfg, shared_artifacts):
    src = tmp_path / "broken.jsonl"
    src.write_text(json.dumps(CAPYBARA[0]) + "\n{not json\n")
    with pytest.raises(StageError, match=r"broken.jsonl:2: malformed JSON"):
        load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)


def test_a_json_error_reads_as_a_sentence_naming_file_line_and_column(tmp_path, tiny_cfg, shared_artifacts):
    """json's "Unterminated string starting at" read "... at at column 9" (a review, 2026-12-06); the .json form then
    read "...: Unterminated string starting; fix that line", a dangling "starting" (a second review): both put the
    position after json's words."""
    src = tmp_path / "cut.jsonl"
    src.write_text(json.dumps(CAPYBARA[0]) + '\n{"messages": "cut off')  # the file ends inside the string
    with pytest.raises(StageError) as e:
        load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert str(e.value) == f"{src}:2: malformed JSON (Unterminated string starting at column 14); fix or delete that line"
    src = tmp_path / "cut.json"
    src.write_text('[\n{"messages": "cut off')
    with pytest.raises(StageError) as e:
        load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert str(e.value) == f"{src}: invalid JSON (Unterminated string starting at line 2 column 14); fix that line"


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_a_leading_byte_order_mark_is_read_like_plain_utf8(tmp_path, tiny_cfg, shared_artifacts, kind):
    # Windows Notepad and Excel's "CSV UTF-8" begin the file with EF BB BF.
    plain = _write(tmp_path / f"plain.{kind}", CAPYBARA, kind)
    bom = tmp_path / f"bom.{kind}"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    a = load_dataset_records(*_cfg(tiny_cfg, plain), shared_artifacts)
    b = load_dataset_records(*_cfg(tiny_cfg, bom), shared_artifacts)
    assert (b.n_train, b.n_heldout, b.dropped) == (a.n_train, a.n_heldout, a.dropped)
    for split in ("train", "heldout"):
        assert load_split(b, split)["input_ids"] == load_split(a, split)["input_ids"]


def test_byte_order_mark_keeps_the_clear_errors(tmp_path, tiny_cfg, shared_artifacts):
    bad_json = tmp_path / "bad.jsonl"  # a BOM file whose line 2 is broken: still named by line
    bad_json.write_bytes(b"\xef\xbb\xbf" + (json.dumps(CAPYBARA[0]) + "\n{not json\n").encode())
    with pytest.raises(StageError, match=r"bad.jsonl:2: malformed JSON"):
        load_dataset_records(*_cfg(tiny_cfg, bad_json), shared_artifacts)
    latin1 = tmp_path / "latin1.jsonl"  # the byte is counted from the start of the line, the BOM included
    latin1.write_bytes(b'\xef\xbb\xbf{"a": "caf\xe9"}\n')
    with pytest.raises(StageError, match=r"latin1.jsonl:1: not UTF-8 \(byte 13\)"):
        load_dataset_records(*_cfg(tiny_cfg, latin1), shared_artifacts)
    latin1_json = tmp_path / "latin1.json"
    latin1_json.write_bytes(b'\xef\xbb\xbf[{"a": "caf\xe9"}]')
    with pytest.raises(StageError, match=r"latin1.json: not UTF-8 text \(byte 14\)"):
        load_dataset_records(*_cfg(tiny_cfg, latin1_json), shared_artifacts)


def test_a_json_file_is_json_lines_only_when_each_line_is_a_row(tmp_path, tiny_cfg, shared_artifacts):
    lines = tmp_path / "lines.json"  # JSON lines under a .json name: read as such
    lines.write_text("".join(json.dumps(r) + "\n" for r in CAPYBARA))
    n = load_dataset_records(*_cfg(tiny_cfg, lines), shared_artifacts).n_train
    assert n > 0
    lines.write_text("".join(json.dumps(r) + "\n" for r in CAPYBARA) + "[]\n")  # a non-object row is dropped, as in .jsonl
    assert load_dataset_records(*_cfg(tiny_cfg, lines), shared_artifacts).dropped.get("not an object") == 1
    typo = tmp_path / "typo.json"  # a broken row of JSON lines is named at its own line
    typo.write_text("".join(json.dumps(r) + "\n" for r in CAPYBARA[:20]) + "{not json\n")
    with pytest.raises(StageError, match=r"typo\.json:21: malformed JSON"):
        load_dataset_records(*_cfg(tiny_cfg, typo), shared_artifacts)
    for name, body in (("list.json", json.dumps(CAPYBARA)), ("wrapped.json", json.dumps({"data": CAPYBARA}))):
        stray = tmp_path / name  # one value, then a line of U+00A0: a malformed .json file, named at its stray line
        stray.write_text(body + "\n\u00a0\n")
        with pytest.raises(StageError, match=rf"{name}: invalid JSON \(Extra data at line 2 column 1\)"):
            load_dataset_records(*_cfg(tiny_cfg, stray), shared_artifacts)


def test_a_folder_source_is_keyed_on_its_files_content(tmp_path, tiny_cfg, shared_artifacts):
    # A partitioned parquet folder (pandas reads x.parquet/ whole) was keyed on its path: new rows in it were never read.
    import pandas as pd

    folder = tmp_path / "ds.parquet"
    folder.mkdir()
    pd.DataFrame([{"messages": json.dumps(r["messages"])} for r in CAPYBARA[:30]]).to_parquet(folder / "part-0.parquet")
    a = load_dataset_records(*_cfg(tiny_cfg, folder), shared_artifacts)
    assert load_dataset_records(*_cfg(tiny_cfg, folder), shared_artifacts).key == a.key  # unchanged: cached
    pd.DataFrame([{"messages": json.dumps(r["messages"])} for r in CAPYBARA[30:]]).to_parquet(folder / "part-0.parquet")
    b = load_dataset_records(*_cfg(tiny_cfg, folder), shared_artifacts)
    assert b.key != a.key and b.data_hash != a.data_hash
    other = tmp_path / "other"  # a symlinked folder inside: pandas reads through it, so the key hashes through it
    other.mkdir()
    pd.DataFrame([{"messages": json.dumps(r["messages"])} for r in CAPYBARA[:10]]).to_parquet(other / "part-1.parquet")
    (folder / "sub").symlink_to(other, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a link back up is walked once
    c = load_dataset_records(*_cfg(tiny_cfg, folder), shared_artifacts)
    pd.DataFrame([{"messages": json.dumps(r["messages"])} for r in CAPYBARA[10:20]]).to_parquet(other / "part-1.parquet")
    assert load_dataset_records(*_cfg(tiny_cfg, folder), shared_artifacts).key != c.key
    (tmp_path / "rows.jsonl").mkdir()  # any other folder is a one-line error, not IsADirectoryError
    with pytest.raises(StageError, match=r"rows\.jsonl' is a folder; give a \.jsonl file"):
        load_dataset_records(*_cfg(tiny_cfg, tmp_path / "rows.jsonl"), shared_artifacts)


def test_cache_is_reused_and_invalidated_by_content_and_config(tmp_path, tiny_cfg, shared_artifacts):
    src = _write(tmp_path / "c.jsonl", CAPYBARA, "jsonl")
    a = load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    b = load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert a == b
    c = load_dataset_records(*_cfg(tiny_cfg, src, max_length=120), shared_artifacts)
    assert c.key != a.key
    _write(src, CAPYBARA[:30], "jsonl")  # same path, new content
    d = load_dataset_records(*_cfg(tiny_cfg, src), shared_artifacts)
    assert d.key != a.key and d.n_train + d.n_heldout == 30


def test_to_messages_maps_sharegpt_roles():
    msgs, reason = to_messages({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "messages")
    assert reason is None and [m["role"] for m in msgs] == ["user", "assistant"]


def test_to_messages_merges_turns_of_one_role_in_a_row():
    """ShareGPT rows often hold two turns of one role in a row (an answer sent in two parts, a user who sent two
    messages); they were kept so, and a template that needs the roles in turn (Gemma's, Mistral's) refused the row. Each
    run of one role is one turn, the contents joined by a blank line, before the other checks: a trailing run of user
    turns still goes, and a second system turn right after the first is no longer "system turn not first"."""
    two_answers = {"conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."},
                                     {"from": "gpt", "value": "Or a pear."}, {"from": "human", "value": "Thanks!"}]}
    assert to_messages(two_answers, "messages") == ([{"role": "user", "content": "Name a fruit."},
                                                     {"role": "assistant", "content": "Apple.\n\nOr a pear."}], None)
    two_questions = {"conversations": [{"from": "human", "value": "Hi."}, {"from": "human", "value": "Name a fruit."},
                                       {"from": "gpt", "value": "Apple."}, {"from": "human", "value": "And a vegetable?"},
                                       {"from": "gpt", "value": "A leek."}]}
    assert to_messages(two_questions, "messages") == ([{"role": "user", "content": "Hi.\n\nName a fruit."},
                                                       {"role": "assistant", "content": "Apple."},
                                                       {"role": "user", "content": "And a vegetable?"},
                                                       {"role": "assistant", "content": "A leek."}], None)
    two_systems = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in English."},
                                {"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]}
    msgs, reason = to_messages(two_systems, "messages", system_prompt="Default prompt.")
    assert reason is None and msgs[0] == {"role": "system", "content": "Be brief.\n\nAnswer in English."} and len(msgs) == 3
    # A kept row that had turns merged is counted when a counter is given; a row that needed none is not.
    counts = collections.Counter()
    for row in (two_answers, two_questions, CAPYBARA[0]):
        to_messages(row, "messages", counts=counts)
    assert counts == {"merged": 2}
    # An empty turn still drops the row: joined to its neighbour it would hide behind the blank line.
    empty = {"messages": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "  "}, {"role": "assistant", "content": "Hello."}]}
    assert to_messages(empty, "messages") == (None, "empty turn")


def test_rows_with_turns_of_one_role_in_a_row_train_under_a_template_that_needs_the_roles_in_turn(
        tmp_path, tiny_cfg, shared_artifacts, monkeypatch):
    """Under Gemma-2's template ("Conversation roles must alternate") the rows train, merged; the record and stage 1's
    log line say how many rows had turns merged."""
    from tasks import stages

    rows = [
        {"conversations": [{"from": "human", "value": "Name a fruit."}, {"from": "gpt", "value": "Apple."}, {"from": "gpt", "value": "Or a pear."}]},
        {"conversations": [{"from": "human", "value": "Hi."}, {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]},
    ]
    data, _ = _cfg(tiny_cfg, _write(tmp_path / "repeats.jsonl", CAPYBARA[:20] + rows, "jsonl"))
    rec = load_dataset_records(data, _gemma2(tiny_cfg), shared_artifacts)
    assert rec.n_train + rec.n_heldout == 22 and rec.dropped == {} and rec.merged == 2
    said = []
    monkeypatch.setattr(stages, "log", said.append)
    assert stages.data_task.fn(data, _gemma2(tiny_cfg), shared_artifacts) == rec  # the finished stage, found by its key
    assert "dropped none, 2 rows had turns of one role in a row merged into one turn (joined by a blank line);" in said[0], said


def test_an_embedded_source_without_heldout_rows_names_the_embedded_keys(tiny_cfg, shared_artifacts, monkeypatch):
    """Every generated held-out row repeats a training row, so dedupe removes them all: the advice names the keys the
    embedded source reads (data.embedded_heldout, data.embedded_train), never data.max_rows, which it does not read
    (the old advice: "add rows to 'embedded' or raise data.max_rows (now 10)"). The count is of held-out rows only:
    the training rows here repeat too (each twice), which the old count of every repeat (15) took in."""
    from tasks import instructions

    generate = instructions.generate
    monkeypatch.setattr(instructions, "generate", lambda n, split, *a, **kw: list(generate(n, "train", *a, **kw)) * (2 if split == "train" else 1))
    data = tiny_cfg.data.model_copy(update={"max_rows": 10, "embedded_train": 12, "embedded_heldout": 3})
    with pytest.raises(StageError) as e:
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    msg = str(e.value)
    assert msg == ("data.source 'embedded': 0 usable held-out rows: all 3 generated held-out rows were removed before formatting (3 as "
                   "repeats of training rows); raise data.embedded_heldout (now 3) or lower data.embedded_train (now 12: fewer training "
                   "rows to repeat)"), msg
    assert "max_rows" not in msg


def test_an_embedded_heldout_row_removed_as_a_benchmark_prompt_is_counted_and_named(tiny_cfg, shared_artifacts, monkeypatch):
    """A held-out row that matches a benchmark prompt is removed before any repeat check: it was counted nowhere (the
    message read as if repeats were the cause and named no key for it); now it is counted, singular, with data.seed."""
    from tasks import instructions, sources

    generate, match, held = instructions.generate, sources.Deduper.match, set()

    def generate_noting_heldout(n, split, *a, **kw):
        recs = list(generate(n, split, *a, **kw))
        held.update(next(m["content"] for m in r.to_record()["messages"] if m["role"] == "user") for r in recs if split == "heldout")
        return recs

    monkeypatch.setattr(instructions, "generate", generate_noting_heldout)
    monkeypatch.setattr(sources.Deduper, "match", lambda self, msgs: ("ifeval", "exact") if any(
        m["role"] == "user" and m["content"] in held for m in msgs) else match(self, msgs))
    data = tiny_cfg.data.model_copy(update={"embedded_train": 11, "embedded_heldout": 1})
    with pytest.raises(StageError) as e:
        load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    assert str(e.value) == ("data.source 'embedded': 0 usable held-out rows: the 1 generated held-out row was removed before formatting "
                            f"(1 as a benchmark prompt); raise data.embedded_heldout (now 1) or change data.seed (now {data.seed}: other "
                            "generated rows)"), str(e.value)


# Gemma-2's chat template, its turns closed by the tiny tokenizer's EOS instead of <end_of_turn> (which it lacks): it
# refuses a system turn and turns out of order with raise_exception.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
SYSTEM_ROW = {"messages": [{"role": "system", "content": "You are terse."}, *CAPYBARA[0]["messages"][:2]]}


def _gemma2(tiny_cfg):
    return tiny_cfg.model.model_copy(update={"chat_template": GEMMA2_TEMPLATE})


def _count_encodes(monkeypatch) -> list:
    """The calls stage 1 makes to `encode` (tokenizing a row), counted."""
    from tasks import data as data_stage

    calls, real = [], data_stage.encode
    monkeypatch.setattr(data_stage, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_rows_with_their_own_system_turn_under_a_template_that_refuses_one_name_the_row_before_any_tokenizing(
        tmp_path, tiny_cfg, shared_artifacts, monkeypatch):
    """Data rows carrying a system turn, with Gemma-2's template ("System role not supported"): stage 1 died in a
    traceback from Jinja. It is one line naming the source, the first such row (counted from 1), how many, the template's
    words and the fix, before a single row is tokenized; nothing is written."""
    rows = CAPYBARA[:2] + [SYSTEM_ROW] + CAPYBARA[2:20] + [SYSTEM_ROW]
    data, model = _cfg(tiny_cfg, _write(tmp_path / "with_system.jsonl", rows, "jsonl"))
    encodes = _count_encodes(monkeypatch)
    with pytest.raises(StageError) as e:
        load_dataset_records(data, _gemma2(tiny_cfg), shared_artifacts)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"data.source {data.source!r} line 3 (and 1 other row) opens with its own system turn"), msg
    assert "model.chat_template refuses: System role not supported" in msg, msg
    assert "remove the system turns from the data (or move their text into the first user turn)" in msg, msg
    assert "set model.chat_template to a template that takes a system turn" in msg, msg
    assert encodes == []
    out = stage_dir(shared_artifacts, "data", cache_key(data, _gemma2(tiny_cfg), shared_artifacts))
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))  # no stage folder, finished or half-built
    # The same rows without their system turns train under that template.
    plain = _write(tmp_path / "plain.jsonl", CAPYBARA[:20], "jsonl")
    assert load_dataset_records(_cfg(tiny_cfg, plain)[0], _gemma2(tiny_cfg), shared_artifacts).n_train > 0


def test_a_row_of_json_lines_is_named_by_the_line_it_stands_on(tmp_path, tiny_cfg, shared_artifacts):
    """A JSON lines file with blank lines (a paragraph break between groups of rows, a trailing blank line per row): the
    error named the system row by its count among the rows (3), and the user who opened the file at line 3 found a blank
    line or another row. It names the line the row stands on, counted as an editor counts; the same under a .json name."""
    rows = [json.dumps(r) for r in CAPYBARA[:2]]
    body = rows[0] + "\n\n" + rows[1] + "\n   \n\n" + json.dumps(SYSTEM_ROW) + "\n" + "".join(json.dumps(r) + "\n" for r in CAPYBARA[2:20])
    assert body.splitlines()[5] == json.dumps(SYSTEM_ROW)  # line 6 of the file, the third row
    for name in ("gaps.jsonl", "gaps.json"):
        path = tmp_path / name
        path.write_text(body)
        data, _ = _cfg(tiny_cfg, path)
        with pytest.raises(StageError) as e:
            load_dataset_records(data, _gemma2(tiny_cfg), shared_artifacts)
        assert str(e.value).startswith(f"data.source {data.source!r} line 6 opens with its own system turn"), str(e.value)


def test_a_mix_source_with_system_turns_names_the_mix_source_and_row(tmp_path, tiny_cfg, shared_artifacts):
    main = _write(tmp_path / "main.jsonl", CAPYBARA[:20], "jsonl")
    extra = _write(tmp_path / "extra.json", [SYSTEM_ROW] + CAPYBARA[20:30], "json")
    data, _ = _cfg(tiny_cfg, main)
    data.mix = [{"source": str(extra), "rows": 5, "heldout": 2}]
    with pytest.raises(StageError) as e:
        load_dataset_records(data, _gemma2(tiny_cfg), shared_artifacts)
    assert str(e.value).startswith(f"data.mix source {str(extra)!r} row 1 opens with its own system turn"), str(e.value)


def test_data_system_prompt_under_a_template_that_refuses_it_is_one_line_in_stage_1_too(tmp_path, tiny_cfg, shared_artifacts):
    """The model check before stage 1 says this in a run; stage 1 called on its own (a test, a notebook) says the same."""
    data, _ = _cfg(tiny_cfg, _write(tmp_path / "plain.jsonl", CAPYBARA[:20], "jsonl"), system_prompt="Answer briefly.")
    with pytest.raises(StageError, match=r"^model.chat_template: refuses the system turn that data.system_prompt adds: System role not "
                                         r"supported \(line 1\); unset data.system_prompt"):
        load_dataset_records(data, _gemma2(tiny_cfg), shared_artifacts)


@pytest.mark.parametrize("row, said", [
    ({"messages": [{"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "First   question,\nthen"},
                   {"role": "assistant", "content": "One answer."}]}, "Conversation roles must alternate"),
    ({"messages": [{"role": "user", "content": "First   question,\nthen"}, {"role": "assistant", "content": "Divide"}]},
     "ZeroDivisionError: integer division or modulo by zero"),
], ids=["roles-must-alternate", "runtime-error"])
def test_a_row_the_template_refuses_for_another_reason_is_one_line_quoting_it(tmp_path, tiny_cfg, shared_artifacts, row, said):
    """Gemma-2's "Conversation roles must alternate" on a row that opens with an answer (two turns of one role in a row are
    merged, not refused), or the template's own runtime error on one row's content: one line quoting the row, not a traceback."""
    template = GEMMA2_TEMPLATE.replace("{{ '<start_of_turn>'", "{% if message['content'] == 'Divide' %}{{ 1 // 0 }}{% endif %}{{ '<start_of_turn>'")
    data, _ = _cfg(tiny_cfg, _write(tmp_path / "odd_row.jsonl", CAPYBARA[:20] + [row], "jsonl"))
    model = tiny_cfg.model.model_copy(update={"chat_template": template})
    with pytest.raises(StageError) as e:
        load_dataset_records(data, model, shared_artifacts)
    msg = str(e.value)
    roles = "assistant, user, assistant" if said.startswith("Conversation") else "user, assistant"
    assert "\n" not in msg and msg.startswith(f"data.source {data.source!r}: the chat template cannot render the conversation (roles: "
                                              f"{roles}) whose first user turn is 'First question, then': {said}"), msg
    assert "fix or remove that row" in msg, msg


def test_a_refused_row_behind_a_shared_preamble_is_quoted_by_both_ends(tmp_path, tiny_cfg, shared_artifacts):
    """Alpaca-style rows open with the same preamble: the opening alone matched all 30 rows of a review's file. The quote
    carries the turn's end too, where the rows differ."""
    preamble = "Below is an instruction that describes a task. Write a response that appropriately completes the request. "
    rows = [{"messages": [{"role": "user", "content": f"{preamble}Instruction: name fruit number {i}."},
                          {"role": "assistant", "content": f"Fruit {i}."}]} for i in range(30)]
    rows[17] = {"messages": [{"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": f"{preamble}Instruction: list three colours please."},
                             {"role": "assistant", "content": "Red."}]}
    data, _ = _cfg(tiny_cfg, _write(tmp_path / "alpaca.jsonl", rows, "jsonl"))
    with pytest.raises(StageError) as e:
        load_dataset_records(data, _gemma2(tiny_cfg), shared_artifacts)
    msg = str(e.value)
    assert "(roles: assistant, user, assistant)" in msg and "list three colours please.'" in msg, msg
