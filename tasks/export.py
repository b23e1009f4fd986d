"""Stage 8 — export the published model for serving: GGUF (llama.cpp, Ollama) and, opt-in, GPTQ 4-bit (vLLM).

Adds to the published folder `artifacts/runs/<run>/<output_name>/`:

    gguf/<output_name>-f16.gguf, gguf/<output_name>-q8_0.gguf   llama.cpp / Ollama / LM Studio
    Modelfile                                                    `ollama create NAME -f Modelfile`
    gptq-w4a16/                                                  vLLM (compressed-tensors), only with export.gptq

GGUF comes from llama.cpp's own `convert_hf_to_gguf.py`, the maintained converter. On PyPI it ships only
inside the llama-cpp-python source archive; we take that archive at a pinned version and sha256, keep only
the converter (+ its `conversion/` and `gguf-py/` packages, ~2 MB) and run it in a subprocess, so its
gguf-py never meets the `gguf` package installed here. Q4_K_M (`export.gguf: [..., q4_k_m]`, opt-in) needs llama.cpp's
C++ `llama-quantize`, which neither the prebuilt `xllamacpp` wheel nor gguf-py's Python quantizers (K-quants
dequantize only) expose: tasks/quantize.py builds it once from the same archive's llama.cpp sources with CMake and
quantizes the f16.

The Ollama Modelfile reproduces the training-time prompt format: its TEMPLATE is derived from the published
chat template (which already injects the training system prompt, see publish) by rendering sentinel
conversations, and is checked to render multi-turn conversations byte-identically to the Jinja template;
stop tokens are the data stage's end-of-turn ids, spelled as the vocabulary spells them.

Export is its own cached task after publish: a converter failure (unsupported architecture or tokenizer)
is one line naming it, every earlier stage stays cached, and a rerun after the fix redoes only the export. An export
writes only its own run's published folder: when publish was cached from an earlier run whose folder holds another
export, this run gets its own folder (the published files hard-linked), assembled next to it and renamed into place.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel

from .common import (REBUILD, StageError, building, cached_sha256, file_sha256, fingerprint, is_complete, locked, maybe_fault, process_space, read_json, safe_name,
                     stage_dir, usable_cores, write_json)
from .models import adds_bos, raised_by_template, template_message
from .quantize import GGUF_QUANT_TYPES, SourceArchive, ensure_quantizer, quantize_gguf

EXPORT_VERSION = 1
# llama.cpp's converter, taken from the llama-cpp-python source archive (PyPI); bump both together.
CONVERTER_PACKAGE = "llama-cpp-python"
CONVERTER_VERSION = "0.3.36"
CONVERTER_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
LLAMA_CPP_SOURCES = SourceArchive(CONVERTER_PACKAGE, CONVERTER_VERSION, CONVERTER_SHA256)  # llama-quantize is built from the same archive
GPTQ_SCRIPT = Path(__file__).resolve().parent / "gptq_w4a16.py"
MANIFEST = "MANIFEST.json"
CARD_BEGIN, CARD_END = "<!-- export:begin -->", "<!-- export:end -->"


class ExportRecord(BaseModel):
    key: str
    dir: str                    # cache folder holding the built artifacts
    published_dir: str          # where they were installed
    gguf: dict[str, str]        # outtype -> published path
    gguf_bytes: dict[str, int]
    modelfile: str | None
    gptq_dir: str | None
    stop_tokens: list[str]
    system_prompt: str | None
    seconds: dict[str, float]   # per artifact

    def outputs_exist(self) -> bool:
        """The build is there, and installed in the published folder as this record says: its files, and the card's deploy
        section for them (`card_says_it`)."""
        paths = [*self.gguf.values(), *([self.modelfile] if self.modelfile else []), *([self.gptq_dir] if self.gptq_dir else [])]
        return (is_complete(Path(self.dir)) and (Path(self.published_dir) / MANIFEST).is_file() and all(Path(p).exists() for p in paths)
                and self.card_says_it())

    def installed(self) -> dict[str, Any]:
        """What this export installed, as `deploy_section` reads it (built.json's form, paths relative to the folder; the
        record holds them absolute)."""
        pub = Path(self.published_dir)
        return {"gguf": {t: str(Path(p).relative_to(pub)) for t, p in self.gguf.items()},
                "modelfile": str(Path(self.modelfile).relative_to(pub)) if self.modelfile else None,
                "gptq": str(Path(self.gptq_dir).relative_to(pub)) if self.gptq_dir else None}

    def card_says_it(self) -> bool:
        """The published card holds this export's deploy section. A folder that stage 7 published again was built anew,
        without the export's files or that section: with export.gguf=[] and no GPTQ the section is all the export put in
        it, so its files could not tell (a Cached export was trusted, and the card kept no deploy section). One exported
        since with other settings holds theirs."""
        try:
            card = (Path(self.published_dir) / "README.md").read_text(encoding="utf-8")
            return f"{CARD_BEGIN}\n{deploy_section(Path(self.published_dir), self.installed())}{CARD_END}\n" in card
        except (OSError, ValueError):  # no card, or a path outside the folder: not this export's install
            return False


def build_key(merge, publish, export, data) -> str:
    """What the built files depend on: merged weights (merge key) + the published chat template + stop tokens + export
    settings + converter version. Names `cache/export/<key>/`, shared by every run that builds the same thing."""
    # The template lives in chat_template.jinja (transformers 5) or tokenizer_config.json (older): hash both.
    template_hash = [file_sha256(f) if f.is_file() else None
                     for f in (Path(publish.merged_dir) / "chat_template.jinja", Path(publish.merged_dir) / "tokenizer_config.json")]
    # A folder the converter reads through `converter_view` gets a key of its own: its GGUF exported before the view (on
    # transformers 5.17: a vocabulary llama.cpp refuses) is built again, not reused; every other key is as it was.
    view = ["converter view: byte_fallback off"] if export.gguf and byte_fallback_dropped(Path(publish.merged_dir)) else []
    # Likewise a GGUF whose end-of-turn token `mark_end_of_turn` writes in: exported before, it did not stop answers
    marked = end_of_turn_to_mark(Path(publish.merged_dir), data.stop_token_ids) if export.gguf else []
    return fingerprint("export", EXPORT_VERSION, merge.key, template_hash, data.stop_token_ids,
                       export.model_dump(mode="json"), CONVERTER_VERSION, *view, *([f"end of turn marked: {marked}"] if marked else []))


def end_of_turn_to_mark(folder: Path, stop_ids: list[int]) -> list[int]:
    """The stop ids of the saved tokenizer in `folder` (merged/) that `mark_end_of_turn` writes into its GGUF, told from
    tokenizer.json without converting: those that are not its EOS and whose text is none of LLAMA_EOG_TEXTS (an id it
    does not name: none, the key as before). Only for the export's key: the GGUF's own metadata decides what is written."""
    try:
        tok = _parsed_json(str((folder / "tokenizer.json").resolve()), cached_sha256(folder / "tokenizer.json"))
        conf = read_json(folder / "tokenizer_config.json")
    except (OSError, ValueError):
        return []
    if not isinstance(tok, dict):
        return []
    vocab = tok["model"].get("vocab") if isinstance(tok.get("model"), dict) else None
    texts = {i: text for text, i in vocab.items()} if isinstance(vocab, dict) else {}
    texts.update({t["id"]: t.get("content") for t in tok.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("id"), int)})
    eos = conf.get("eos_token") if isinstance(conf, dict) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return [i for i in stop_ids if texts.get(i) is not None and texts[i] != eos and texts[i] not in LLAMA_EOG_TEXTS]


def cache_key(merge, publish, export, data) -> str:
    """The task's key: the build + the published folder it completes. A new published folder (publish reran: eval,
    publish.*, output_name changed) gets its own export; the same folder with the same build is Cached."""
    return fingerprint(build_key(merge, publish, export, data), str(Path(publish.dir).resolve()))


# ---------------------------------------------------------------------------------------------------------
# The converter: pinned, verified, only the files we need


def converter_dir() -> Path:
    """Where the extracted converter lives: inside the active environment, next to its packages."""
    return Path(sys.prefix) / "share" / f"llama.cpp-convert-{CONVERTER_VERSION}"


def ensure_converter(log_fn=None) -> Path:
    """The converter's folder; fetched once with pip (sha256-checked) when missing. `make setup` calls this."""
    dest = converter_dir()
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    log_fn = log_fn or (lambda m: None)
    with locked(dest):
        if (dest / "convert_hf_to_gguf.py").is_file():
            return dest
        log_fn(f"export: fetching llama.cpp's converter ({CONVERTER_PACKAGE}=={CONVERTER_VERSION} source archive, ~77 MB, once)")
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   f"{CONVERTER_PACKAGE}=={CONVERTER_VERSION}", "-d", tmp, "-q"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            archives = list(Path(tmp).glob("*.tar.gz"))
            if done.returncode or not archives:
                last = (done.stderr.strip().splitlines() or ["no archive"])[-1]
                raise StageError(f"cannot download {CONVERTER_PACKAGE}=={CONVERTER_VERSION} for llama.cpp's GGUF converter ({last}); "
                                 "check your connection to PyPI, or set export.gguf=[] to skip GGUF")
            install_converter(archives[0], dest)
    return dest


def install_converter(archive: Path, dest: Path) -> None:
    """Verify the archive's sha256 and extract only the converter's files into `dest` (atomically)."""
    import tarfile

    got = file_sha256(archive)
    if got != CONVERTER_SHA256:
        raise StageError(f"{archive.name} has sha256 {got}, expected {CONVERTER_SHA256}; the download is corrupt or the "
                         "archive changed: delete it and rerun")
    prefix = f"llama_cpp_python-{CONVERTER_VERSION}/vendor/llama.cpp/"
    with building(dest, mark_complete=False) as tmp:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and m.isfile() and any(rel == k or rel.startswith(k) for k in CONVERTER_MEMBERS) and ".." not in rel.split("/"):
                    target = tmp / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise StageError(f"{archive.name} has no {prefix}convert_hf_to_gguf.py; CONVERTER_VERSION and the archive disagree")


def convert_to_gguf(model_dir: Path, out_file: Path, outtype: str, converter: Path, stop_ids: list[int] = ()) -> list[str]:
    """Run llama.cpp's converter in a subprocess (on `converter_view` of the folder); a failure becomes one line naming
    the reason. `stop_ids` (the published stop ids: the chat template's end-of-turn tokens and EOS) that llama.cpp would
    not end an answer at are then marked in the GGUF (`mark_end_of_turn`); returns the line that says what could not be."""
    with tempfile.TemporaryDirectory(dir=out_file.parent, prefix=".converter-view-") as work:
        view = converter_view(model_dir, Path(work))
        cmd = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(view), "--outfile", str(out_file), "--outtype", outtype]
        env = {**os.environ, "PYTHONPATH": str(converter), "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(converter))
    if done.returncode or not out_file.is_file():
        raise StageError(f"llama.cpp's GGUF converter cannot convert {model_dir.name}: {converter_failure(done.stderr)}; "
                         "set export.gguf=[] to skip GGUF (the merged model is published), then rerun")
    return mark_end_of_turn(out_file, list(stop_ids)) if stop_ids else []


# The token texts llama.cpp ends generation at whatever a GGUF's metadata says: its vocabulary loader (src/llama-vocab.cpp,
# llama_vocab::impl::load, "maintain a list of tokens that cause end-of-generation ... based on the token text") adds
# them to its end-of-generation ids beside the GGUF's EOS, EOT and EOM ids. As in llama-cpp-python 0.3.36's llama.cpp
# (CONVERTER_VERSION); every one is in xllamacpp 2026.10.11549's library too (its strings, 2026-12-07).
LLAMA_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>",
    "<eos>", "<turn|>", "<|tool_response>", "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})
# The GGUF keys llama.cpp also ends generation at (their ids), in the order a template's own end-of-turn token takes them.
END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def llama_eog_drops(texts: set[str]) -> dict[str, str]:
    """The texts llama.cpp's vocabulary loader takes out of its end-of-generation ids again, once it has added the text
    list and the GGUF's EOS, EOT and EOM ids (a mark is taken out too), where those ids' `texts` hold: each with the
    texts that make it so (llama-vocab.cpp, after LLAMA_EOG_TEXTS: gpt-oss's and solar-open's '<|end|>', gemma4's and
    plamo's '</s>'). A GGUF answer then runs on past it to max_tokens (a review, 2026-12-07: 64/64 tokens)."""
    drops = {}
    call = next((t for t in ("<|call|>", "<|calls|>") if t in texts), None)
    if call and "<|end|>" in texts and (also := next((t for t in ("<|return|>", "<|flush|>") if t in texts), None)):
        drops["<|end|>"] = f"{also!r} and {call!r}"
    if "</s>" in texts and (marker := next((t for t in ("<|tool_response>", "<|plamo:eos|>") if t in texts), None)):
        drops["</s>"] = repr(marker)
    return drops


def end_of_turn_plan(fields: dict, stop_ids: list[int]) -> tuple[dict[str, int], list[int], dict[int, str]]:
    """What a GGUF of these metadata `fields` (GGUFReader's) does with `stop_ids`, the published stop ids llama.cpp
    should end an answer at. llama.cpp ends generation at its EOS, EOT and EOM ids and at the tokens whose text is one of
    LLAMA_EOG_TEXTS, less `llama_eog_drops`. Of the rest: `marks` (key -> id), those the free END_OF_TURN_KEYS take
    (what `mark_end_of_turn` writes); `left`, those no free key is left for; `dropped` (id -> why), those llama.cpp
    takes out again whatever the file says, so a mark would not help."""
    tokens = fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in fields else []
    ends = {i for i, text in enumerate(tokens) if text in LLAMA_EOG_TEXTS}
    ends |= {i for k in ("tokenizer.ggml.eos_token_id", *END_OF_TURN_KEYS) if k in fields and 0 <= (i := fields[k].contents()) < len(tokens)}
    drops = llama_eog_drops({tokens[i] for i in ends})
    dropped = {i: drops[tokens[i]] for i in stop_ids if i in ends and tokens[i] in drops}
    unmarked = [i for i in stop_ids if 0 <= i < len(tokens) and i not in ends]
    free = [k for k in END_OF_TURN_KEYS if k not in fields]
    return dict(zip(free, unmarked)), unmarked[len(free):], dropped


def _named(ids, tokens) -> str:
    return ", ".join(f"{tokens[i]!r} (id {i})" for i in ids)


# The dropped texts llama.cpp re-types as user-defined (llama-vocab.cpp: gpt-oss's '<|end|>'): still one token in a
# prompt, and its text reaches the answer, so a stop string ends the answer there. '</s>' it re-types as a normal token:
# the chat template's '</s>' in the prompt is read as plain text too ('<', '/', 's', '>'), so the model sees garbled
# turns (SmolLM2 respelt so, xllamacpp 2026.10.11549: 64/64 tokens of nonsense, with or without "stop": ["</s>"]).
STOP_STRING_ENDS = frozenset({"<|end|>"})


def dropped_line(dropped: dict[int, str], tokens: list[str]) -> str:
    """The clause naming the stop ids llama.cpp takes out of its end-of-generation ids, why, and the fix that works for
    each (measured on xllamacpp's server): a text it still keeps as one token (STOP_STRING_ENDS) ends answers as a stop
    string, which serve-model sets as the server's default; '</s>' leaves only the merged format."""
    why = " and ".join(dict.fromkeys(f"{tokens[i]!r} where the vocabulary also has {because}" for i, because in dropped.items()))
    said = [f"llama.cpp's vocabulary loader takes {why} out of its end-of-generation ids again, a GGUF mark too (a rerun cannot help)"]
    if texts := ", ".join(dict.fromkeys(repr(tokens[i]) for i in dropped if tokens[i] in STOP_STRING_ENDS)):
        said.append(f"serve-model --format gguf ends answers at {texts} as a stop string by default (llama-server: -r {texts}); "
                    f"a request that sends its own \"stop\" replaces that default, so add {texts} to it")
    if texts := ", ".join(dict.fromkeys(repr(tokens[i]) for i in dropped if tokens[i] not in STOP_STRING_ENDS)):
        said.append(f"it reads {texts} in the chat template's prompt as plain text too, so the model sees garbled turns and a "
                    "\"stop\" string does not help: serve with --format merged")
    return "; ".join(said)


def exported_here(gguf_file: Path, folder: Path) -> bool:
    """`gguf_file` is a GGUF this project's export installed in the published `folder`: its MANIFEST lists it at that
    size (the export rewrites the manifest after installing its GGUFs). One put there by hand (quantized with one's own
    llama.cpp, downloaded) is not, nor one replaced since by a file of another size (the size, not the sha256 the
    manifest also holds: hashing a multi-GB GGUF at every serve-model start costs more than the advice is worth)."""
    try:
        files = read_json(folder / MANIFEST)["files"]
        rel = str(gguf_file.resolve().relative_to(folder.resolve()))
        return any(f["path"] == rel and f["bytes"] == gguf_file.stat().st_size for f in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def mark_command(gguf_file: Path, marks: dict[str, int]) -> str:
    """The command that writes `marks` (END_OF_TURN_KEYS key -> id) into `gguf_file`: gguf's own gguf-new-metadata (the
    `gguf` package this project installs; its gguf-set-metadata only changes keys a file already has), into a new file
    that then replaces it. A `.marked` file left from an earlier try is removed first: gguf-new-metadata asks before
    overwriting one and exits 0 without writing on any answer but YES, so the `mv` would have put the stale file in place."""
    import shlex

    script = Path(sys.executable).with_name("gguf-new-metadata")
    tool = shlex.quote(str(script)) if script.is_file() else f"{shlex.quote(sys.executable)} -m gguf.scripts.gguf_new_metadata"
    ids = " ".join(f"--special-token-by-id {key.split('.')[-1].removesuffix('_token_id')} {i}" for key, i in marks.items())
    src, tmp = shlex.quote(str(gguf_file)), shlex.quote(str(gguf_file) + ".marked")
    return f"rm -f {tmp} && {tool} {src} {tmp} {ids} && mv {tmp} {src}"


def answer_end(folder: Path, stops: list[int]) -> int | None:
    """The published stop id the answers of the model in `folder` end with (`answer_end_id` on its merged/ tokenizer);
    None where that cannot be told (no merged/ folder, a tokenizer that needs its own code, a template that does not
    render). From local files alone, and never the folder's code: a folder without merged/ (a GGUF or an adapter kept
    alone) was a Hub repo id to transformers where its path was relative ("pub/merged": 46 s of retries with no
    network, HF_HUB_OFFLINE unset), and a tokenizer with an auto_map got transformers' "run the custom code? [y/N]"
    prompt on a terminal (a 15 s wait, and a "y" ran it, where serve-model has no --trust-remote-code to ask for that)."""
    merged = folder / "merged"
    if not merged.is_dir():
        return None
    from transformers import AutoTokenizer

    from .data import answer_end_id

    try:
        return answer_end_id(AutoTokenizer.from_pretrained(str(merged), local_files_only=True, trust_remote_code=False), stops)
    except Exception:  # any loader or template error: not told, every stop id is judged
        return None


class GgufStops(NamedTuple):
    line: str | None       # printed before serving: a warning where answers run on, else a note, else None
    strings: list[str]     # stop strings the server ends answers at by default (llama.cpp's antiprompt)


def gguf_stops(gguf_file: Path, folder: Path) -> GgufStops:
    """How llama.cpp's server ends the answers of `gguf_file` at the stop ids of the published `folder` (its summary.json's
    data.stop_token_ids), judged on the one the model's answers end with (`answer_end`; every one where that cannot be
    told): those it would not end at (`end_of_turn_plan`) give a warning line naming why and the fix that works; a
    dropped text that a stop string ends (STOP_STRING_ENDS) is a default stop string instead, with a note. Rerunning the
    export is named only where it would mark the id (a GGUF it exported before `mark_end_of_turn`, a free key); a GGUF it
    did not export (`exported_here`) gets the gguf-new-metadata command that marks it. Nothing where the summary or the
    GGUF does not tell (merged serving and `chat` say what is wrong with a summary)."""
    from gguf import GGUFReader

    try:
        summary = read_json(folder / "summary.json")
        stops = [i for i in summary["data"]["stop_token_ids"] if isinstance(i, int) and not isinstance(i, bool)]
        fields = GGUFReader(str(gguf_file)).fields
        marks, left, dropped = end_of_turn_plan(fields, stops)
        tokens = fields["tokenizer.ggml.tokens"].contents() if marks or left or dropped else []
    except Exception:  # a damaged GGUF (any error of gguf's reader) is serve_gguf's to name; a warning never stops the start
        return GgufStops(None, [])
    if (marks or left or dropped) and (end := answer_end(folder, stops)) is not None:
        marks, left, dropped = end_of_turn_plan(fields, [end])  # the others never end its answers: no warning for them
    if not (marks or left or dropped):
        return GgufStops(None, [])
    strings = list(dict.fromkeys(tokens[i] for i in dropped if tokens[i] in STOP_STRING_ENDS))
    why = []
    if marks and exported_here(gguf_file, folder):
        why.append(f"{_named(marks.values(), tokens)} not marked (exported before the export marked it): rerun the run's "
                   "`qlora-pipeline run` command to export it again, or serve with --format merged")
    elif marks:
        why.append(f"{_named(marks.values(), tokens)} not marked as {' and '.join(marks)} (a GGUF the export did not write): "
                   f"mark it with `{mark_command(gguf_file, marks)}`, or serve with --format merged")
    if left:
        why.append(f"a GGUF holds two such ids ({', '.join(END_OF_TURN_KEYS)}), both taken here, so {_named(left, tokens)} "
                   "cannot be marked: serve with --format merged")
    if dropped:
        why.append(dropped_line(dropped, tokens))
    running = [*marks.values(), *left, *(i for i in dropped if tokens[i] not in STOP_STRING_ENDS)]
    if not running:  # only stop strings: the answers end
        return GgufStops(f"note: llama.cpp does not end {gguf_file.name}'s answers at {_named(dropped, tokens)}, the chat template's "
                         f"end of turn, by token: {'; '.join(why)}", strings)
    return GgufStops(f"warning: {gguf_file.name} does not end answers at {_named([*marks.values(), *left, *dropped], tokens)}, "
                     f"published stop ids (the chat template's end of turn): llama.cpp's answers run on to max_tokens; "
                     f"{'; '.join(why)}", strings)


def mark_end_of_turn(gguf_file: Path, stop_ids: list[int]) -> list[str]:
    """Write into `gguf_file` (rewritten in place) each of `stop_ids` that llama.cpp would not end an answer at: not the
    GGUF's EOS, EOT or EOM id, and a token whose text is none of LLAMA_EOG_TEXTS (a template closing its turns with a
    token of its own). Merged serving stops at every stop id (serving_model_folder); llama.cpp at its end-of-generation
    ids alone, so such a template's GGUF answers ran on past the end of the turn to max_tokens (a review, 2026-12-07).
    The converter writes no EOT for most architectures; it goes into the EOT key, a second into the EOM key (llama.cpp
    ends generation at both alike). Returns the lines that say which stop ids found no free key (none, usually; Ollama
    still stops at them: the Modelfile's `stop` parameters) and which ones llama.cpp takes out of its end-of-generation
    ids again (`llama_eog_drops`: not marked, a mark is taken out too). Nothing to mark leaves the file as it is."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    reader = GGUFReader(str(gguf_file))
    fields = reader.fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    marks, left, dropped = end_of_turn_plan(fields, stop_ids)
    if marks:
        tmp = gguf_file.with_name(gguf_file.name + ".marking")
        writer = GGUFWriter(str(tmp), arch=fields["general.architecture"].contents(), endianess=reader.endianess)
        if "general.alignment" in fields:
            writer.data_alignment = fields["general.alignment"].contents()
        for field in fields.values():  # as gguf's own gguf_new_metadata.py copies them: the writer adds these two itself
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == GGUFValueType.ARRAY else None)
        for key, token in marks.items():
            writer.add_key_value(key, token, GGUFValueType.UINT32)
        for tensor in reader.tensors:
            writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
        writer.close()
        del reader, fields  # the memory map of the old file
        os.replace(tmp, gguf_file)
    said = []
    if left:
        said.append(f"export: llama.cpp's server will not end answers at {_named(left, tokens)}: the GGUF has no free end-of-turn "
                    f"key left ({', '.join(END_OF_TURN_KEYS)} are taken); Ollama stops there (the Modelfile's stop parameters), "
                    "or serve with --format merged")
    if dropped:
        said.append(f"export: llama.cpp's server will not end answers at {_named(dropped, tokens)}: {dropped_line(dropped, tokens)}")
    return said


def converter_view(model_dir: Path, work: Path) -> Path:
    """The folder llama.cpp's converter reads: `model_dir` itself, or, for a byte-level BPE tokenizer saved with
    `byte_fallback` on (`byte_fallback_dropped`), a folder in `work` of links to its files with that flag off in
    tokenizer.json."""
    fixed = byte_fallback_dropped(model_dir)
    if fixed is None:
        return model_dir
    view = work / model_dir.name  # the converter names the model from its folder
    view.mkdir(parents=True)
    for p in model_dir.iterdir():
        if p.name != "tokenizer.json":
            (view / p.name).symlink_to(p.resolve())
    (view / "tokenizer.json").write_text(json.dumps(fixed, ensure_ascii=False), encoding="utf-8")
    return view


def byte_fallback_dropped(model_dir: Path) -> dict | None:
    """`model_dir`'s tokenizer.json with byte fallback off, where it is a byte-level BPE saved with it on; else None.
    transformers 5.17 builds a GGUF's "gpt2" tokenizer that way (byte fallback, a ByteFallback/Fuse/Replace decoder; 5.25
    does not), and the converter's vocabulary check (gguf-py's LlamaHfVocab: BPE + byte_fallback + a Sequence decoder) then
    takes it for Llama's SentencePiece one: the GGUF's vocabulary said SPM, and llama.cpp refused it ("SPM vocabulary, but
    newline token not found"; SmolLM2 on transformers 5.17, 2026-12-07). A byte-level BPE encodes every byte, so byte
    fallback never acts: the same ids either way. In the export's key (`build_key`) where it changes what is converted."""
    try:
        path = model_dir / "tokenizer.json"
        data = _parsed_json(str(path.resolve()), cached_sha256(path))
    except (OSError, ValueError):
        return None
    model = data.get("model") if isinstance(data, dict) else None
    if not (isinstance(model, dict) and model.get("type") == "BPE" and model.get("byte_fallback") and _byte_level(data.get("pre_tokenizer"))):
        return None
    return {**data, "model": {**model, "byte_fallback": False}}


@functools.lru_cache(maxsize=8)
def _parsed_json(path: str, sha256: str) -> Any:
    """The JSON of the file at `path`, parsed once per content (`sha256`: `cached_sha256`, remembered per version of the
    file, its ctime and inode too, and never for a file changed in the last moments): `build_key` reads merged/'s
    tokenizer.json (~10 MB for a 150k vocabulary) each time a run asks for the export's key, and a file rewritten since
    is parsed again, even at the same size and mtime (a coarse clock, `cp -p`). Shared between callers: never changed in
    place."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _byte_level(pre: Any) -> bool:
    """Whether a tokenizer.json pre-tokenizer splits to bytes (ByteLevel, alone or in a Sequence)."""
    if not isinstance(pre, dict):
        return False
    return pre.get("type") == "ByteLevel" or any(_byte_level(p) for p in pre.get("pretokenizers") or [] if pre.get("type") == "Sequence")


def converter_failure(stderr: str) -> str:
    """The converter's reason in a few words: the architecture it lacks, the tokenizer it does not know, or its last line."""
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    for line in lines:
        m = re.search(r"Model (\S+) is not supported", line)
        if m:
            return f"architecture {m.group(1)} is not supported by its version {CONVERTER_VERSION}"
    for line in reversed(lines):
        if "pre-tokenizer was not recognized" in line:
            return "its tokenizer's pre-tokenizer is not one llama.cpp knows (BPE pre-tokenizer not recognized)"
        m = re.search(r"Architecture '?(\w+)'? not supported", line)
        if m:
            return f"architecture {m.group(1)} is not supported by its version {CONVERTER_VERSION}"
    return lines[-1][:300] if lines else "no output"


# ---------------------------------------------------------------------------------------------------------
# Ollama Modelfile: the chat template as per-role prefix/suffix pairs


SENTINEL = "\u2063qLoRa-{}\u2063"  # invisible separator: never in a real template


def _render(tok, messages, gen: bool = False) -> str:
    """The template's text as llama.cpp/Ollama must see it: without the BOS they add themselves (`adds_bos`)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    bos = tok.bos_token or ""
    return text[len(bos):] if bos and adds_bos(tok) and text.startswith(bos) else text


def template_parts(tok) -> dict[str, tuple[str, str]]:
    """Split a chat template into role -> (prefix, suffix) by rendering sentinel conversations.

    The assistant prefix is the generation prompt. Raises StageError when the template is not expressible
    that way (role text depends on position or content): a silently different Modelfile would be worse.
    """
    s = {r: SENTINEL.format(r) for r in ("system", "user", "assistant")}
    msgs = [{"role": r, "content": s[r]} for r in ("system", "user", "assistant")]
    fix = "set export.modelfile=false or model.chat_template"
    try:
        full = _render(tok, msgs + [{"role": "user", "content": s["user"]}])
        sys_pre, rest = full.split(s["system"], 1)
        sys_suf_user_pre, rest = rest.split(s["user"], 1)
        user_suf_asst_pre, rest = rest.split(s["assistant"], 1)
        asst_suf_user_pre, last_user_suf = rest.split(s["user"], 1)
        asst_suf = _render(tok, msgs).split(s["assistant"], 1)[1]
        user_suf = _render(tok, msgs[:2]).split(s["user"], 1)[1]
        gen_tail = _render(tok, msgs[:2], gen=True).split(s["user"], 1)[1]
    except ValueError as e:
        raise StageError(f"the chat template drops or rewrites message content, so no Ollama TEMPLATE can reproduce it; {fix}") from e
    if last_user_suf != user_suf or not gen_tail.startswith(user_suf) or not asst_suf_user_pre.startswith(asst_suf):
        raise StageError(f"the chat template's turns are not self-contained (a turn's text depends on the next one); {fix}")
    asst_pre = gen_tail[len(user_suf):]
    user_pre = asst_suf_user_pre[len(asst_suf):]
    if user_suf_asst_pre != user_suf + asst_pre or not sys_suf_user_pre.endswith(user_pre):
        raise StageError(f"the chat template renders a role's header differently by position; {fix}")
    return {"system": (sys_pre, sys_suf_user_pre[: len(sys_suf_user_pre) - len(user_pre)]),
            "user": (user_pre, user_suf), "assistant": (asst_pre, asst_suf)}


def default_system(tok, parts: dict[str, tuple[str, str]]) -> str | None:
    """The system text the template inserts when a chat has none (SmolLM2's "You are a helpful AI assistant..."), or None."""
    text = _render(tok, [{"role": "user", "content": "x"}], gen=True)
    (sp, ss), (up, _) = parts["system"], parts["user"]
    if sp and text.startswith(sp) and (ss + up) in text[len(sp):]:
        return text[len(sp): text.index(ss + up, len(sp))]
    return None


def render_with_parts(parts: dict[str, tuple[str, str]], messages: list[dict], add_generation_prompt: bool) -> str:
    """What the Modelfile's TEMPLATE renders (the Go template below, in Python), for the equivalence check."""
    out = ""
    for m in messages:
        pre, suf = parts[m["role"]]
        out += pre + m["content"] + suf
    if add_generation_prompt and messages and messages[-1]["role"] != "assistant":
        out += parts["assistant"][0]
    return out


def check_template_equivalence(tok, parts: dict[str, tuple[str, str]], system_prompt: str | None) -> None:
    """The derived TEMPLATE must render like the Jinja template: with/without system turn, multi-turn, generation prompt."""
    sys_turn = [{"role": "system", "content": system_prompt or "Answer briefly."}]
    convs = [
        [{"role": "user", "content": "Say hi."}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Times 3?"}],
    ]
    for conv in convs:
        for msgs in (sys_turn + conv, conv):
            want = _render(tok, msgs, gen=True)
            explicit = msgs if msgs[0]["role"] == "system" else ([{"role": "system", "content": system_prompt}] + msgs if system_prompt else msgs)
            got = render_with_parts(parts, explicit, True)
            if got != want:
                raise StageError(f"the Ollama TEMPLATE derived from the chat template renders {got[:80]!r}... where the template renders "
                                 f"{want[:80]!r}...; set export.modelfile=false or model.chat_template")


def _go_str(s: str) -> str:
    """Literal text as a Go template action: a quoted Go string (JSON's escapes are Go's), so `{{-` trimming around
    the template's structure never eats the format's own newlines."""
    return "{{ " + json.dumps(s, ensure_ascii=False) + " }}"


def ollama_template(parts: dict[str, tuple[str, str]]) -> str:
    """Ollama's TEMPLATE (Go text/template over .Messages) rendering exactly like `render_with_parts`."""
    (sp, ss), (up, us), (ap, as_) = parts["system"], parts["user"], parts["assistant"]
    # Ollama puts the Modelfile's SYSTEM into .Messages as a first system message when a request has none.
    return (
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        f'{{{{- if eq .Role "system" }}}}{_go_str(sp)}{{{{ .Content }}}}{_go_str(ss)}\n'
        f'{{{{- else if eq .Role "user" }}}}{_go_str(up)}{{{{ .Content }}}}{_go_str(us)}\n'
        f"{{{{- if $last }}}}{_go_str(ap)}{{{{ end }}}}\n"
        f'{{{{- else if eq .Role "assistant" }}}}{_go_str(ap)}{{{{ .Content }}}}{_go_str(as_)}\n'
        "{{- end }}\n"
        "{{- end }}"
    )


def modelfile_text(gguf_rel: str, parts: dict[str, tuple[str, str]], stops: list[str], system_prompt: str | None, num_ctx: int) -> str:
    lines = [
        "# Ollama: ollama create <name> -f Modelfile && ollama run <name>",
        "# Written by qlora-pipeline's export stage: the prompt format the model was trained with.",
        f"FROM {gguf_rel}",
        f'TEMPLATE """{ollama_template(parts)}"""',
    ]
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in stops]
    lines += [f"PARAMETER num_ctx {num_ctx}", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict[str, Any]:
    """Instructions of a Modelfile (FROM, TEMPLATE, SYSTEM, PARAMETER ...), as Ollama's parser reads them."""
    out: dict[str, Any] = {"PARAMETER": []}
    pos = 0
    pat = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER|ADAPTER|LICENSE|MESSAGE)\s+("""(.*?)"""|(.*?))\s*$', re.S | re.M)
    for m in pat.finditer(text):
        if text[pos:m.start()].strip() and not all(l.strip().startswith("#") or not l.strip() for l in text[pos:m.start()].splitlines()):
            raise ValueError(f"unparsed text before {m.group(1)}: {text[pos:m.start()][:60]!r}")
        value = m.group(3) if m.group(3) is not None else m.group(4)
        if m.group(1) == "PARAMETER":
            name, _, v = value.partition(" ")
            out["PARAMETER"].append((name, v.strip().strip('"')))
        else:
            out[m.group(1)] = value
        pos = m.end()
    return out


# ---------------------------------------------------------------------------------------------------------
# The stage


def export_artifacts(merge, publish, data, export, system_prompt: str | None, artifacts_dir: str, log_fn=None,
                     run_name: str | None = None, trust_remote_code: bool = False) -> ExportRecord:
    """Stage 8: build GGUF (+ Modelfile, + GPTQ if asked) once per build key, then install them into this run's
    published folder. When publish was cached from an earlier run, that run's folder is left as it is (a published
    folder never changes under its run's records) and this run gets its own: the same files, hard-linked, plus this
    export. `trust_remote_code`: model.trust_remote_code, which merged/'s tokenizer loads by as every other stage's
    (a tokenizer of the model's own code, its auto_map kept in merged/, loads only so)."""
    log_fn = log_fn or (lambda m: None)
    key = cache_key(merge, publish, export, data)
    out = stage_dir(artifacts_dir, "export", build_key(merge, publish, export, data))
    with locked(out):
        if not is_complete(out):
            _build(merge, publish, data, export, system_prompt, out, log_fn, trust_remote_code)
    built = _built(out)
    source = Path(publish.dir)
    target = source if run_name is None or source.parent.name == safe_name(run_name) else source.parent.parent / safe_name(run_name) / source.name
    with locked(target):
        return _install(out, source, target, built, key, log_fn, export.model_dump(mode="json"))


def _built(out: Path) -> dict[str, Any]:
    """built.json of the complete export folder `out`; one whose record cannot be read or whose built files are gone (a
    GGUF deleted to save space) is a StageError naming the folder and the fix, not a raw error in the install."""
    try:
        built = read_json(out / "built.json")
        files = [*built["gguf"].values(), *([built["modelfile"]] if built["modelfile"] else []), *([built["gptq"]] if built["gptq"] else [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StageError(f"{out} is marked complete but its built.json cannot be read ({type(e).__name__}: {e}); {REBUILD}") from e
    gone = [f for f in files if not (out / f).exists()]
    if gone:
        raise StageError(f"{out} is marked complete but {', '.join(gone)} {'is' if len(gone) == 1 else 'are'} gone; {REBUILD}")
    return built


def _build(merge, publish, data, export, system_prompt, out: Path, log_fn, trust_remote_code: bool = False) -> None:
    from transformers import AutoTokenizer

    maybe_fault("export")
    src = Path(publish.merged_dir)  # the published copy: its chat template carries the training system prompt
    name = Path(publish.dir).name
    # trust_remote_code always given: left out, a tokenizer with an auto_map stopped the stage with transformers'
    # ValueError, after its "run the custom code? [y/N]" prompt where the run had a terminal
    tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code)
    stops = [tok.convert_ids_to_tokens(i) for i in data.stop_token_ids]
    seconds: dict[str, float] = {}
    built: dict[str, Any] = {"gguf": {}, "modelfile": None, "gptq": None, "stop_tokens": stops, "system_prompt": system_prompt, "seconds": seconds}
    notes: list[str] = []
    with building(out) as tmp:
        if export.gguf:
            converter = ensure_converter(log_fn)
            (tmp / "gguf").mkdir()
            for outtype in export.gguf:
                t0 = time.monotonic()
                f = tmp / "gguf" / f"{name}-{outtype}.gguf"
                if outtype in GGUF_QUANT_TYPES:  # llama-quantize from the f16 (converted here if not asked for)
                    f16 = tmp / "gguf" / f"{name}-f16.gguf"
                    if not f16.is_file():
                        f16 = tmp / f"{name}-f16.gguf"
                        notes += convert_to_gguf(src, f16, "f16", converter, data.stop_token_ids)  # its marks go with it
                    quantize_gguf(ensure_quantizer(LLAMA_CPP_SOURCES, log_fn), f16, f, GGUF_QUANT_TYPES[outtype])
                    if f16.parent == tmp:
                        f16.unlink()
                else:
                    notes += convert_to_gguf(src, f, outtype, converter, data.stop_token_ids)
                seconds[f"gguf-{outtype}"] = round(time.monotonic() - t0, 2)
                built["gguf"][outtype] = f"gguf/{f.name}"
                log_fn(f"export: {f.name} ({f.stat().st_size / 2**20:.0f} MiB) in {seconds[f'gguf-{outtype}']:.0f}s")
            for line in dict.fromkeys(notes):  # said once, not once per GGUF
                log_fn(line)
            if export.modelfile:
                parts = template_parts(tok)
                # Training saw the configured system prompt, or else the template's own default system turn.
                system = system_prompt or default_system(tok, parts)
                check_template_equivalence(tok, parts, system)
                target = export.modelfile_gguf if export.modelfile_gguf in built["gguf"] else export.gguf[-1]
                (tmp / "Modelfile").write_text(modelfile_text(f"./{built['gguf'][target]}", parts, stops, system, export.num_ctx), encoding="utf-8")
                built["system_prompt"] = system
                built["modelfile"] = "Modelfile"
        if export.gptq:
            t0 = time.monotonic()
            run_gptq(src, tmp / "gptq-w4a16", Path(data.dir) / "train", export, log_fn, trust_remote_code)
            seconds["gptq-w4a16"] = round(time.monotonic() - t0, 2)
            built["gptq"] = "gptq-w4a16"
        write_json(tmp / "built.json", built)


def run_gptq(src: Path, dest: Path, calib_split: Path, export, log_fn, trust_remote_code: bool = False) -> None:
    """GPTQ W4A16 (compressed-tensors) with llmcompressor, in its own environment (it pins an older transformers);
    `trust_remote_code` (model.trust_remote_code) is what its model and tokenizer load by, as in `_build`."""
    python = Path(export.gptq_python)
    if not python.is_absolute():
        from .common import PROJECT_ROOT

        python = PROJECT_ROOT / python
    if not python.is_file():
        raise StageError(f"export.gptq needs llmcompressor's own environment at {python}; create it with `make gptq-env` "
                         "(or set export.gptq=false)")
    log_fn(f"export: GPTQ W4A16 with llmcompressor ({export.gptq_samples} calibration conversations)")
    cmd = [str(python), str(GPTQ_SCRIPT), str(src), str(dest), "--calib", str(calib_split), "--samples", str(export.gptq_samples),
           *(["--trust-remote-code"] if trust_remote_code else [])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode or not (dest / "config.json").is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise StageError(f"GPTQ export failed ({last}); see `{' '.join(cmd)}`; set export.gptq=false to skip it")


EXPORT_OWNED = ("gguf/", "gptq-w4a16/", "Modelfile")  # what an export adds to a published folder; replaced by the next


def _install(out: Path, source: Path, pub: Path, built: dict, key: str, log_fn, export_settings: dict | None = None) -> ExportRecord:
    """Assemble `pub` next to it, then rename it into place: the published files of `source` (hard-linked, or copied
    across filesystems; the card and manifest copied, as they are rewritten) without an earlier export's files, the
    built files linked in, the card's deploy section and the manifest rewritten last. A crash leaves `pub` as it was."""
    rels = [*built["gguf"].values(), *([built["modelfile"]] if built["modelfile"] else [])]
    gptq_files = sorted(p.relative_to(out) for p in (out / built["gptq"]).rglob("*") if p.is_file()) if built["gptq"] else []
    wanted = sorted({*rels, *map(str, gptq_files)})
    with building(pub, mark_complete=False) as tmp:
        for f in sorted(x for x in source.rglob("*") if x.is_file()):
            rel = str(f.relative_to(source))
            if not rel.startswith(EXPORT_OWNED):
                _place(f, tmp / rel, link=rel not in ("README.md", MANIFEST, "pipeline.yaml"))
        for rel in wanted:
            _place(out / rel, tmp / rel, link=True)
        if source != pub:
            _rehome(tmp, source, pub, export_settings)
        _update_card(tmp, built, shown=pub)
        _update_manifest(tmp)
    gguf = {t: str(pub / r) for t, r in built["gguf"].items()}
    return ExportRecord(
        key=key, dir=str(out), published_dir=str(pub), gguf=gguf, gguf_bytes={t: Path(p).stat().st_size for t, p in gguf.items()},
        modelfile=str(pub / built["modelfile"]) if built["modelfile"] else None,
        gptq_dir=str(pub / built["gptq"]) if built["gptq"] else None,
        stop_tokens=built["stop_tokens"], system_prompt=built["system_prompt"], seconds=built["seconds"],
    )


def _rehome(folder: Path, source: Path, pub: Path, export_settings: dict | None) -> None:
    """A folder made from another run's published files describes this run: the card names this run and this
    folder (its snippet, `chat`, `serve-model`), and pipeline.yaml holds the export settings this folder was built with."""
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8").replace(str(source), str(pub)).replace(source.parent.name, pub.parent.name)
        card.write_text(text, encoding="utf-8")
    conf = folder / "pipeline.yaml"
    if conf.is_file() and export_settings is not None:
        import yaml

        data = yaml.safe_load(conf.read_text(encoding="utf-8")) or {}
        if isinstance(data, dict):
            data["export"] = export_settings
            conf.write_text(f"# published by run {source.parent.name}; exported by run {pub.parent.name} with the export settings below\n"
                            + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)  # same filesystem: no second copy of a multi-GB file
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def _update_card(folder: Path, built: dict, shown: Path) -> None:
    card = folder / "README.md"
    if not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    text = re.sub(re.escape(CARD_BEGIN) + ".*?" + re.escape(CARD_END) + "\n?", "", text, flags=re.S)
    text = text.rstrip("\n") + "\n\n" + CARD_BEGIN + "\n" + deploy_section(shown, built, files=folder) + CARD_END + "\n"
    if text != card.read_text(encoding="utf-8"):  # the same section again: the card keeps its mtime (a rerun's install)
        card.write_text(text, encoding="utf-8")


def deploy_section(pub: Path, built: dict, files: Path | None = None) -> str:
    """The card's deploy section for what an export `built` into the published folder `pub` (the paths it prints).
    Its llama-server command passes, as `-r` (llama.cpp's --reverse-prompt, which llama-server takes as the default of a
    request's "stop"), the stop strings serve-model sets as that default for the GGUF (`gguf_stops`: an end of turn
    llama.cpp drops, gpt-oss's '<|end|>'): without them the card's command ran answers on to max_tokens where
    serve-model's stopped. `files`: the folder that holds the GGUF and summary.json now, read for them (`pub` where
    None; the folder being assembled before it is renamed into place)."""
    import shlex

    lines = ["## Deploy", ""]
    if built["gguf"]:
        names = ", ".join(f"`{r}`" for r in built["gguf"].values())
        q = built["gguf"].get("q8_0") or next(iter(built["gguf"].values()))
        stops = gguf_stops((files or pub) / q, files or pub).strings
        reverse = "".join(f" -r {shlex.quote(s)}" for s in stops)
        lines += [f"GGUF for llama.cpp: {names} (converted by llama.cpp's `convert_hf_to_gguf.py`, llama-cpp-python {CONVERTER_VERSION}).",
                  "```sh", f"llama-server -m {pub / q} --jinja{reverse} --port 8080      # OpenAI-compatible, chat template from the GGUF",
                  f"qlora-pipeline serve-model {pub.parent.name} --format gguf", "```"]
        if stops:
            said = ", ".join(f"`{s}`" for s in stops)
            lines += ["", f"`-r`: llama.cpp does not end this model's answers at {said}, its chat template's end of turn, by token; "
                      f"the stop string ends them there, as `serve-model` does. A request that sends its own `\"stop\"` replaces "
                      f"it: add {said} to that list."]
    if built["modelfile"]:
        lines += ["", "Ollama (TEMPLATE, SYSTEM and stop tokens as in training):", "```sh",
                  f"cd {pub} && ollama create {pub.name} -f Modelfile && ollama run {pub.name}", "```"]
    if built["gptq"]:
        lines += ["", "vLLM, GPTQ W4A16 (compressed-tensors):", "```sh", f"vllm serve {pub / built['gptq']}", "```"]
    lines += ["", "vLLM, 16/32-bit merged model:", "```sh", f"vllm serve {pub / 'merged'}", "```", ""]
    return "\n".join(lines)


def _update_manifest(pub: Path) -> None:
    """The manifest lists every file again (sizes + sha256), written last: `is_published` stays the truth."""
    manifest = read_json(pub / MANIFEST) if (pub / MANIFEST).is_file() else {"files": []}
    old = {f["path"]: f for f in manifest["files"]}
    entries = []
    for p in sorted(x for x in pub.rglob("*") if x.is_file() and x.name != MANIFEST and not x.name.startswith(".")):
        rel = str(p.relative_to(pub))
        size = p.stat().st_size
        same = old.get(rel) and old[rel]["bytes"] == size and rel != "README.md" and not rel.startswith(("gguf/", "gptq-w4a16/", "Modelfile"))
        entries.append(old[rel] if same else {"path": rel, "bytes": size, "sha256": file_sha256(p)})
    if entries != manifest["files"]:  # the same files: the manifest keeps its bytes and mtime (a rerun's install)
        write_json(pub / MANIFEST, {**manifest, "files": entries})  # its other keys (publish_version) kept: publish reads them


# ---------------------------------------------------------------------------------------------------------
# serve-model: an OpenAI-compatible endpoint on a published model


def gguf_to_serve(folder: Path, gguf_type: str | None) -> Path:
    every = sorted((folder / "gguf").glob("*.gguf"))
    # Q8_0, Q4_K_M: the names llama.cpp and Ollama print; the files are named in export.gguf's lower case
    files = [f for f in every if f.stem.lower().endswith(f"-{gguf_type.lower()}")] if gguf_type else every
    if not files:
        there = f"; it has {', '.join(f.stem.rsplit('-', 1)[-1] for f in every)} (--gguf-type)" if every else ""
        raise StageError(f"{folder} has no {gguf_type + ' ' if gguf_type else ''}GGUF (gguf/*.gguf){there}; run the export stage "
                         "(`qlora-pipeline run`, with export.gguf set) or serve with --format merged")
    gguf = next((f for f in files if f.stem.endswith("-q8_0")), files[0])
    require_gguf_header(gguf)
    return gguf


def require_gguf_header(gguf: Path) -> None:
    """One line naming a damaged GGUF, checked before llama.cpp loads it (which fails with a traceback)."""
    import struct

    with open(gguf, "rb") as f:
        head = f.read(24)
    magic, version, tensors, kvs = struct.unpack("<4sIQQ", head) if len(head) == 24 else (b"", 0, 0, 0)
    if magic != b"GGUF" or version not in (2, 3) or not 0 < tensors < 1 << 20 or kvs >= 1 << 20:
        raise StageError(f"{gguf} is damaged (not a GGUF v2/v3 header); delete it and rerun `qlora-pipeline run` to export it again, "
                         "or serve with --format merged")


API_KEY_ENV = "QLORA_PIPELINE_API_KEY"  # how serve-model hands the key to its server process (never on a command line)
# A pinned server answers these and nothing else: `transformers serve` also has /load_model (any Hub id or local path)
# and /reset, which a client of a one-model endpoint has no business calling.
SERVED_PATHS = ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/responses")
MODEL_PATH = "/v1/models/"  # + a model id: OpenAI's retrieve-model (`served_model_route`), served too


CORS_ORIGIN_FORM = "scheme://host[:port] as a browser sends it (e.g. http://localhost:3000), or *"


def cors_origin_problem(origin: str) -> str | None:
    """Why `origin` cannot be a --cors-origin (one line naming it and the fix), or None: `*` (any origin) or an origin
    exactly as a browser sends it in its Origin header, which CORS compares as a string: a lower-case scheme and host, a
    port only where it is not the scheme's default, no path (not even '/'). "http://localhost:3000/" or
    "http://LOCALHOST:3000", "http://127.1:3000" or "http://bücher.example" would never match what a browser sends
    (`origin_host`: the URL standard's serialization): refused with the spelling that does."""
    from urllib.parse import urlsplit

    said = f"--cors-origin {origin!r}"
    if origin == "*":
        return None
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)([/?#].*)?", origin)
    if not m or not m[2] or re.search(r"[\s@,]", m[2]):  # no host, a user, a space, a list in one value
        return f"{said} is not an origin: give {CORS_ORIGIN_FORM}, one per --cors-origin"
    try:
        parts = urlsplit(f"{m[1]}://{m[2]}")
        port = parts.port
    except ValueError:
        return f"{said} has no valid host[:port] (a port is 1 to 65535): give {CORS_ORIGIN_FORM}"
    if not parts.hostname or port == 0:
        return f"{said} has no valid host[:port] (a port is 1 to 65535): give {CORS_ORIGIN_FORM}"
    host = origin_host(m[2].rpartition("]")[0] + "]" if m[2].startswith("[") else m[2].rpartition(":")[0] or m[2])
    if host is None:
        return f"{said} has no host a browser can send (a domain name, or an IP address): give {CORS_ORIGIN_FORM}"
    default = {"http": 80, "https": 443}.get(m[1].lower())
    spelt = f"{m[1].lower()}://{host}" + (f":{port}" if port is not None and port != default else "")  # 'http://x:' is 'http://x'
    if m[3] or spelt != origin:  # a path, upper case, the default port, another spelling of the host: the browser sends `spelt`
        return (f"{said} never matches what a browser sends (its Origin header has no path, a lower-case scheme and host, a "
                f"domain in punycode, an IP address and port in their shortest form, no default port): give {spelt}")
    return None


def origin_host(host: str) -> str | None:
    """`host` (of a URL's netloc, an IPv6 address in brackets) as the URL standard serializes it, which is what a browser
    puts in its Origin header, or None where it is no host: percent-escapes decoded, an IPv6 address compressed in lower
    case (IPv4-mapped ones in hex too: [::ffff:7f00:1]), an IPv4 address in four decimal parts (a host whose last label
    is a number is one, as '127.1' and '0x7f.0.0.1' are, read as inet_aton does), a domain in lower case and punycode."""
    import ipaddress
    import socket
    from urllib.parse import unquote

    if host.startswith("["):
        try:
            words = [int.from_bytes(pair) for pair in zip(*[iter(ipaddress.IPv6Address(host[1:-1]).packed)] * 2)]
        except ValueError:
            return None
        # the longest run of two or more zero pieces (the first of equal ones) is written '::'
        runs = [(j - i, i) for i in range(8) for j in range(i + 2, 9) if not any(words[i:j])]
        if not runs:
            return "[" + ":".join(f"{w:x}" for w in words) + "]"
        size, at = max(runs, key=lambda r: (r[0], -r[1]))
        return "[" + ":".join(f"{w:x}" for w in words[:at]) + "::" + ":".join(f"{w:x}" for w in words[at + size:]) + "]"
    host = unquote(host)
    if not host.isascii():
        # UTS #46, non-transitional, as the URL standard (browsers) maps a domain: Python's "idna" codec is IDNA 2003,
        # which maps 'ß' and final 'ς' away ('faß.de' -> 'fass.de'; a browser sends 'xn--fa-hia.de'). The idna package is
        # declared in pyproject.toml (idna>=2.0). Non-transitional is its default since 2.0; `transitional` is left out:
        # idna 3.12 deprecated that argument and says a future version removes it.
        import idna

        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError):
            return None
    host = host.lower()
    if re.fullmatch(r"(0x[0-9a-f]*|[0-9]+)", host.removesuffix(".").rpartition(".")[2]):  # ends in a number: an IPv4 address
        try:
            return str(ipaddress.IPv4Address(socket.inet_aton(host.removesuffix("."))))
        except OSError:
            return None
    return None if re.search(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f]", host) else host  # the URL standard's forbidden domain code points


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_free_port(host: str, port: int) -> None:
    """One line naming the port and the fix when serve-model could not listen on host:port, checked before any
    server starts: llama.cpp's server otherwise fails with a RuntimeError traceback, and transformers serve only
    after loading the model. SO_REUSEADDR as the servers set it: a port whose last server just stopped is free."""
    try:
        # every address the name resolves to (localhost: ::1 and 127.0.0.1), as the servers bind them all
        for family, kind, proto, _, address in dict.fromkeys(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)):
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind(address)
    except OSError as e:
        import errno

        if e.errno == errno.EADDRINUSE:
            raise StageError(f"port {port} on {host} is already in use; stop what is listening there or pick another port "
                             f"with --port (e.g. --port {port + 1})") from e
        raise StageError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --host or --port") from e


def serve_gguf(gguf: Path, host: str, port: int, n_ctx: int, name: str, api_key: str | None = None, ready=None,
               cors_origin: str | None = None, default_stops: list[str] = ()) -> None:
    """llama.cpp's own HTTP server (xllamacpp) on the GGUF, with its embedded chat template; blocks until Ctrl-C.

    The model is listed and requested as `name` (the published name); with `api_key` every request but /health needs
    `Authorization: Bearer <key>` (llama.cpp's own check). `cors_origin` (one origin or "*"): the only origin its CORS
    headers name (GGUF_CORS_HEADERS); None names none, as the merged format (llama.cpp's own default names back any origin).
    `default_stops`: the texts its answers end at where a request sends no "stop" of its own (`gguf_stops`)."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = str(gguf)
    params.model_alias = {name}
    params.hostnames = [host]
    params.port = port
    params.n_ctx = n_ctx
    params.use_jinja = True  # the GGUF's chat template (training system prompt included), not a built-in guess
    params.n_parallel = 1
    params.cpuparams.n_threads = usable_cores()
    if default_stops:  # llama-server's -r: the default of a request's "stop" (tools/server: params_from_json_cmpl)
        params.antiprompt = list(default_stops)
    if api_key:
        params.api_keys = [api_key]
    if cors_origin:
        # llama.cpp sends cors_origins as it is in Access-Control-Allow-Origin (a list there matches no browser: one
        # origin), answering a preflight before its key check; cors_headers likewise (see GGUF_CORS_HEADERS)
        params.cors_origins, params.cors_origins_explicit, params.cors_credentials = cors_origin, True, False
        params.cors_headers = GGUF_CORS_HEADERS
    else:
        # llama.cpp's default (cors_origins "*" not explicit, credentials on) names back whatever origin asks, so any
        # page open in a browser could read the answers. No CORS header, as the merged format's default: llama.cpp
        # sets Access-Control-Allow-Origin to cors_origins on every answer (an empty one too: measured), and
        # cors_methods / cors_headers on a preflight's, through cpp-httplib's set_header, which drops a value that is
        # no valid header value (GGUF_NO_HEADER). What stays (tools/server/server-http.cpp, the pre-routing handler):
        # every OPTIONS is answered 200 with `Access-Control-Allow-Credentials: false`, a literal no setting omits,
        # before any route; no browser reads an answer without Access-Control-Allow-Origin.
        params.cors_origins, params.cors_origins_explicit, params.cors_credentials = GGUF_NO_HEADER, True, False
        params.cors_methods = params.cors_headers = GGUF_NO_HEADER
    try:
        server = xlc.Server(params)
    except RuntimeError as e:  # a GGUF that passed the header check but does not load (truncated, wrong tensors, ...)
        raise StageError(f"llama.cpp cannot load {gguf} ({e}); delete it and rerun `qlora-pipeline run` to export it again, "
                         "or serve with --format merged") from e
    try:
        if ready:
            ready(server.listening_address)
        stop = {"now": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
        try:
            while not stop["now"]:
                time.sleep(0.2)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except KeyboardInterrupt:
        pass
    finally:
        held = [server]
        del server  # the list holds the last reference, which stop_gguf_server drops
        stop_gguf_server(held)


# llama.cpp's Access-Control-Allow-Headers for a --cors-origin, sent as it is: by the Fetch standard its default "*"
# never covers Authorization, which a keyed request sends (Chromium 156 still lets it by, measured 2026-12-07; a browser
# that follows the standard need not); "*" beside it covers the rest (Content-Type, the OpenAI JS SDK's x-stainless-*).
GGUF_CORS_HEADERS = "Authorization, *"
# A CORS setting llama.cpp sends as no header at all: cpp-httplib's Response::set_header adds a header only when its
# value is a valid field value (detail::fields::is_field_value: empty, or starting and ending with a visible character),
# so a lone space is dropped where "" was sent as an empty Access-Control-Allow-Origin.
GGUF_NO_HEADER = " "
GGUF_STOP_GRACE_S = 5  # how long a stop waits for llama.cpp's server to finish the requests it is answering


def stop_gguf_server(held: list) -> None:
    """Drop the last reference to an xllamacpp Server (`held`'s only item): its destructor stops the HTTP loop and frees the model.

    It first waits for every request in flight, and a streamed answer holds it until its client gives up (measured:
    SIGTERM during a 4000-token stream, still running after 30 s; the client's own timeout was 150 s). The
    destructor holds the GIL, so no Python thread or signal handler can time it out: faulthandler's watchdog, a C
    thread, ends the process (exit 1) after GGUF_STOP_GRACE_S, cutting those requests off."""
    import faulthandler

    print(f"stopping (requests still being answered are cut off after {GGUF_STOP_GRACE_S} s)", file=sys.stderr, flush=True)
    with open(os.devnull, "w") as devnull:  # the watchdog dumps every thread's stack first: nobody needs that here
        faulthandler.dump_traceback_later(GGUF_STOP_GRACE_S, exit=True, file=devnull)
        try:
            held.clear()
        finally:
            faulthandler.cancel_dump_traceback_later()


SERVING_FOLDER_PREFIX = "qlora-serve-"  # the merged server's folder, in the temp folder ($TMPDIR)
SERVING_OWNER = ".owner.json"  # in it: the serve-model process that owns it and its server (pid, start time), their process space


def process_start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks after boot: /proc/<pid>/stat's 22nd field), or None where there is no
    /proc, no such process, or only a zombie of it (state Z: it has exited and its parent has not reaped it; a review
    found such an owner's serving folder kept). With the pid it names one process: a pid alone may have been reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie (or dead) process keeps its start time: runs nothing


def make_serving_folder(parent: Path | None = None) -> Path:
    """A new, private qlora-serve-* folder in `parent` (the temp folder) for one merged server, recording this process
    as its owner, which removes it once the server has exited; `remove_stale_serving_folders` removes it should this
    process be killed first."""
    folder = Path(tempfile.mkdtemp(prefix=SERVING_FOLDER_PREFIX, dir=parent))
    write_json(folder / SERVING_OWNER, {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "process_space": process_space()})
    return folder


def record_server(folder: Path, pid: int) -> None:
    """Adds the server serving from `folder` (process `pid`) to its owner record: an orphaned server still stopping
    (`stop_when_orphaned`) keeps its folder, as its owner does."""
    owner = read_json(folder / SERVING_OWNER)
    write_json(folder / SERVING_OWNER, {**owner, "server": {"pid": pid, "start_time": process_start_time(pid)}})


SERVING_OWNER_MAX_BYTES = 4096  # a record serve-model writes is ~200 bytes: a larger file is none of its records
PID_LIMIT = 2**22  # the kernel's PID_MAX_LIMIT on 64-bit: no pid reaches it (pid_max itself may have been lowered since)


def read_serving_owner(folder: Path) -> dict | None:
    """The owner record in `folder` as serve-model wrote it, or None for anything else: no record, a link, a FIFO or
    device (a FIFO's read would block the start forever), a file over SERVING_OWNER_MAX_BYTES, no JSON object. Anyone
    can make a qlora-serve-* folder in the shared temp folder (a review, 2026-12-06), so the record is opened without
    following a link and without waiting, and read only once it is known to be a small regular file."""
    import stat

    path = folder / SERVING_OWNER
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)  # what was opened: it may have been swapped since the lstat
        if not stat.S_ISREG(info.st_mode) or info.st_size > SERVING_OWNER_MAX_BYTES:
            return None
        data = os.read(fd, SERVING_OWNER_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        owner = json.loads(data) if len(data) <= SERVING_OWNER_MAX_BYTES else None
    except ValueError:  # UnicodeDecodeError included
        return None
    return owner if isinstance(owner, dict) else None


def recorded_process(entry: Any) -> tuple[int, str | None] | None:
    """(pid, start time) of a process in an owner record, or None if `entry` is not one serve-model writes: a pid that is
    an int (not a bool) in 1..PID_LIMIT - 1 and a start time that is a string or null. A pid beyond any platform's
    (10**30) made os.kill raise OverflowError, a start time of another type counted a live owner as gone."""
    if not isinstance(entry, dict):
        return None
    pid, start_time = entry.get("pid"), entry.get("start_time")
    if type(pid) is not int or not 1 <= pid < PID_LIMIT or not (start_time is None or isinstance(start_time, str)):
        return None
    return pid, start_time


def _owner_alive(pid: int, start_time: str | None) -> bool:
    if start_time is not None:  # the same pid started at another time is another process: the owner is gone
        return process_start_time(pid) == start_time
    try:  # no /proc where the owner ran: its pid alone, kept while any process has it
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process has it (PermissionError), or the pid cannot be asked about: keep the folder
        return True
    return True


def remove_stale_serving_folders(parent: Path | None = None) -> list[Path]:
    """The qlora-serve-* folders in `parent` (the temp folder) whose serve-model is gone, removed; returns them.

    serve-model removes its folder once its server has exited, but a serve-model killed with SIGKILL (the OOM killer,
    `docker kill`) never gets to: its server stops (`stop_when_orphaned`) and the folder stayed, one per kill. A folder
    is removed only when its owner record (SERVING_OWNER) names processes of this process space that no longer run,
    serve-model and its server alike: each pid is gone, or has been reused by a process that started at another time. A folder without a readable record
    (made by an older serve-model, being made now, another user's), with a record serve-model did not write (not a small
    regular file, a pid or start time of the wrong type: `read_serving_owner`, `recorded_process`), or of another
    process space (a container sharing /tmp numbers its processes apart) may be a live server's: left alone."""
    parent = Path(parent or tempfile.gettempdir())
    space = process_space()
    removed = []
    try:
        folders = sorted(parent.glob(f"{SERVING_FOLDER_PREFIX}*"))
    except OSError:  # a temp folder that cannot be listed: nothing to clean, the start goes on
        return removed
    for folder in folders:
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            owner = read_serving_owner(folder)
            if owner is None or owner.get("process_space") != space:
                continue
            processes = [recorded_process(owner), *([recorded_process(owner["server"])] if "server" in owner else [])]
            if None in processes or any(_owner_alive(pid, start_time) for pid, start_time in processes):
                continue  # a record serve-model did not write is left alone, as a live owner's is
        except (OSError, ValueError, OverflowError):  # one folder's problem must not stop the start
            continue
        shutil.rmtree(folder, ignore_errors=True)  # not the folder a link points to, nor what links in it point to
        if not folder.exists():
            removed.append(folder)
    return removed


def transformers_serve_command(merged: Path, name: str, host: str, port: int, workdir: str | Path, stop_ids: list[int],
                               cors_origins: list[str] = ()) -> list[str]:
    """`transformers serve` (FastAPI, OpenAI-compatible) with the merged folder preloaded under `name`, its answers
    ending at `stop_ids` too (serving_model_folder), run by `serve_merged` in its own process, in `workdir` (which the
    caller removes once that process has exited); the API key, if any, travels in the environment ($QLORA_PIPELINE_API_KEY)."""
    return [sys.executable, "-m", "tasks.export", "serve-merged", str(merged), "--name", name, "--host", host, "--port", str(port),
            "--workdir", str(workdir), "--parent", str(os.getpid()), "--stop-ids", *map(str, stop_ids),
            *(a for origin in cors_origins for a in ("--cors-origin", origin))]


def serving_model_folder(merged: Path, dest: Path, stop_ids: list[int]) -> None:
    """`dest`: the merged model as the server loads it, a link to each file of `merged`, whose generation_config.json
    (a file of its own) ends generation at `stop_ids` too: the published stop ids (the chat template's end-of-turn
    tokens and EOS), which stage 5 and `chat` generate with. transformers serve stops at the generation config's
    eos_token_id alone, which is the base's: under a template whose turns end with a special token that is not the
    base's EOS (Qwen2.5 base's ChatML <|im_end|>, a Llama-3.1 base under Llama 3's <|eot_id|>), answers ran on past
    the end of the turn into turns the model made up, to the length limit (a review, 2026-12-07). A merged folder
    without a generation_config.json (save_pretrained writes none for a model class that cannot generate by itself; a
    folder made by hand) gets one all the same: what transformers derives from config.json (its EOS), plus `stop_ids`."""
    from .publish import generation_config_ending_at

    merged = merged.resolve()
    dest.mkdir()
    for entry in merged.iterdir():
        if entry.name != "generation_config.json":
            (dest / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    settings = generation_config_ending_at(merged, stop_ids)  # a folder published since PUBLISH_VERSION 6 holds them already
    if settings is not None:  # else no model to load: the server says so
        write_json(dest / "generation_config.json", settings)


def serve_merged(merged: Path, name: str, host: str, port: int, api_key: str | None, workdir: Path, stop_ids: list[int],
                 cors_origins: list[str] = ()) -> None:
    """`transformers serve`, pinned to the merged folder under the published `name`, with an optional API key.

    transformers serve names a pinned local model by the path it was given (/v1/models shows the path, answers carry
    it). So the server runs in a private folder (`workdir`, holding only its owner's record) where `name` is a folder
    of links to the merged folder's files (serving_model_folder: its answers end at `stop_ids` too): it loads the same
    weights, lists and answers as `name`, and no path leaves the machine. A request
    naming another model is answered by this one, as llama.cpp's server does (`answer_as_openai_does`). It has no
    API-key option: a middleware checks the key, and only the inference routes (SERVED_PATHS) are answered (ServedOnly),
    which also answers browsers from `cors_origins` (CORS; none: no CORS headers at all, a preflight refused)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from transformers.cli import serve as hf_serve
    from transformers.cli.serving import server as hf_server
    from transformers.cli.serving import utils as hf_utils

    build = hf_server.build_server

    def build_guarded(*args, **kwargs):
        app = build(*args, **kwargs)
        served_model_route(app, kwargs["model_manager"] if "model_manager" in kwargs else args[0])
        answer_head_where_get_is_served(app)
        if not hasattr(hf_utils, "CancelOnDisconnect"):  # transformers <= 5.24 (5.17): 5.25 adds its own
            app.add_middleware(CancelOnDisconnect)
        app.add_middleware(ServedOnly, name=name, api_key=api_key, cors_origins=cors_origins)  # the outermost layer: added last

        @app.exception_handler(StarletteHTTPException)
        async def routing_error(request, exc):
            # Starlette's own 404/405 ({"detail": "Method Not Allowed"}): OpenAI's clients read error.message and
            # printed nothing useful (a review, 2026-12-06). A wrong method names the ones the path takes.
            path = request.url.path.rstrip("/") or "/"
            if exc.status_code == 405:  # Starlette's Allow header names one route's methods: /v1/models said OPTIONS
                # Allow names every method some route of the path answers: HEAD where GET is
                # (answer_head_where_get_is_served; Allow said GET alone there, a review, 2026-12-07), and OPTIONS where
                # transformers declares it (/v1/models: `@app.options`, the model list; it was left out as if CORS
                # answered it, and CORS answers only a preflight, with its Origin headers: a second review, 2026-12-07)
                # (a route's pattern: /v1/models/{model} answers GET on /v1/models/x)
                allowed = sorted({m for route in request.app.routes if getattr(route, "path_regex", None) and route.path_regex.match(path)
                                  for m in getattr(route, "methods", None) or ()})
                # the Allow header as the message says (Starlette's named OPTIONS alone on /v1/models; a second review)
                return openai_error(f"{request.method} is not allowed on {path}; send {' or '.join(allowed) or 'another method'}",
                                    None, 405, headers={**(exc.headers or {}), **({"Allow": ", ".join(allowed)} if allowed else {})})
            unreadable = unreadable_body(exc.__cause__) if exc.status_code == 400 else None
            if unreadable:  # FastAPI's "There was an error parsing the body", its reason left in __cause__
                return openai_error(unreadable, None)
            return openai_error(f"{request.method} {path}: {exc.detail}", None, exc.status_code, headers=exc.headers)

        @app.exception_handler(RequestValidationError)
        async def not_an_object(request, exc):  # FastAPI's 422 {"detail": [...]} for a body that is no JSON object
            return openai_error(body_problem(exc.errors(), exc.body), None)

        return app

    hf_server.build_server = build_guarded  # serve.py imports it from the module when the server is built
    filter_out_of_memory_logs()
    _bounded_graceful_shutdown()
    answer_as_openai_does()
    honour_max_completion_tokens()
    name_answers_as_served()
    list_only_the_served_model(name)
    # Not a TemporaryDirectory of its own: uvicorn ends a stop by raising the signal it caught again, and the process
    # died of it before the folder was removed (one /tmp/qlora-serve-* left per stop). serve-model owns the folder.
    serving_model_folder(merged, workdir / name, stop_ids)
    os.chdir(workdir)
    signal.signal(signal.SIGTERM, _exit_after_stop)
    signal.signal(STOP_NOW_SIGNAL, _exit_now)
    hf_serve.Serve(force_model=name, host=host, port=port)


# How long a stream the stop's grace cut off waits for its client to read its ending (ServedOnly.end_cut): well within
# the 5 s serve-model waits for the server beyond GGUF_STOP_GRACE_S before it sends SIGINT (flows/cli.py).
CUT_END_S = 2


class ServedOnly:
    """The merged server's outermost ASGI layer: only the inference routes (SERVED_PATHS, MODEL_PATH) are answered, a POST body is
    read as JSON whatever its Content-Type, and with an API key every route but /health needs it.

    A plain ASGI middleware, not Starlette's BaseHTTPMiddleware (`@app.middleware("http")`, which it was): that one runs
    the app in a task of its own and raises "RuntimeError: No response returned." when the app ends without starting
    an answer, as it does when the client leaves first (transformers' CancelOnDisconnect cancels the request's
    handling): a stream held until its first token (answer_once_generating) or a non-streamed answer still generating
    logged "Exception in ASGI application" with a traceback (a review, 2026-12-07). Here the app just returns, and
    uvicorn, which saw the client leave, logs nothing. A request still answered when a stop's grace ends
    (_bounded_graceful_shutdown) is cancelled by uvicorn: it ends here, its stream closed or a 503 sent if nothing was,
    where uvicorn would log the cancellation with a traceback (BaseHTTPMiddleware's task group took it quietly).

    With `cors_origins` (serve-model --cors-origin), browsers on those origins are answered (Starlette's CORSMiddleware,
    `with_cors`): a preflight before the key check, since a browser sends it without the Authorization header its real
    request will carry, and every answer, the 401 and 404 this layer sends included, with the CORS headers a browser
    needs to read it. The CORS layer sits inside this one, not around it: `end_cut` finds uvicorn's connection through
    the `send` it is given, which CORSMiddleware would wrap. Without origins no CORS header is ever sent."""

    def __init__(self, app, name: str, api_key: str | None, cors_origins: list[str] = ()) -> None:
        self.cors_origins = list(cors_origins)
        self.app, self.name, self.api_key = self.with_cors(app), name, api_key
        self.answering: set[asyncio.Task] = set()  # the requests under way (their tasks), which a stop waits for
        self.server = None  # the uvicorn Server serving this app (serving_server), once seen: it says when to force quit

    async def __call__(self, scope, receive, send) -> None:
        self.server = self.server or serving_server()
        if scope["type"] == "lifespan":  # its startup and shutdown
            return await self.app(scope, self.shutdown_after_the_cut(receive), send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.cors_origins and is_preflight(scope):  # answered by the CORS layer alone, whatever the path and key
            return await self.app(scope, receive, send)
        scope, refused = self.guarded(scope)
        if refused is not None:
            return await self.with_cors(refused)(scope, receive, send)
        task = asyncio.current_task()
        self.answering.add(task)
        try:
            await self.answered(scope, receive, send)
        finally:
            self.answering.discard(task)

    def shutdown_after_the_cut(self, receive):
        """The lifespan's `receive`, which hands the app its shutdown once the requests the stop's grace cut off have
        ended (end_cut). uvicorn cancels them, then shuts the app down, and the process ends with its event loop,
        cancelling what is still running: on transformers 5.17, whose `@app.middleware("http")` (a task group) the
        cancellation went through, it reached this layer a few turns of the loop later, after the loop had ended, and a
        cut stream ended without its error and [DONE], a held request with no answer at all instead of the 503 (both
        shown on 5.17; the same layers in Starlette alone cut the ending off too). Bounded: each ending takes at most
        CUT_END_S, and the requests were cancelled. A second Ctrl-C ends the wait, as it ends uvicorn's own (its
        force quit): the wait held the exit for the rest of its window (a review, 2026-12-07)."""

        async def receiving():
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self.answering:
                await self.until_done_or_forced(asyncio.wait(set(self.answering)), CUT_END_S + 1)
            return message

        return receiving

    def with_cors(self, app):
        """`app` answering browsers from the served origins (`cors_middleware`), or `app` itself where there are none."""
        return cors_middleware(app, self.cors_origins) if self.cors_origins else app

    def forced(self) -> bool:
        """Whether uvicorn was told to quit without waiting (a second Ctrl-C during a stop: its `force_exit`)."""
        return bool(getattr(self.server, "force_exit", False))

    async def until_done_or_forced(self, awaitable, timeout: float) -> bool:
        """Await `awaitable` for at most `timeout` s, or until uvicorn is told to force quit (checked every 0.1 s, as
        uvicorn checks it in its own waits): whether it finished. Unfinished, it is cancelled. A first 0.1 s is given
        even when forced, so that an ending a client reads goes out (it takes a few ms)."""
        loop = asyncio.get_running_loop()
        task, deadline = asyncio.ensure_future(awaitable), loop.time() + timeout
        try:
            while not task.done() and loop.time() < deadline:
                await asyncio.wait({task}, timeout=min(0.1, deadline - loop.time()))
                if self.forced():
                    break
            return task.done() and not task.cancelled()
        finally:
            task.cancel()  # nothing once it is done

    async def answered(self, scope, receive, send) -> None:
        """Answer a request the guard let through, ending it if the stop's grace cuts it off (end_cut)."""
        started = ended = False
        sent = SentStream()

        async def noting(message) -> None:
            nonlocal started, ended
            await send(message)
            # noted once it went: uvicorn's send waits for the client to drain what it was sent *before* it writes, so
            # a send the stop cancels has not written its message (a review of server-fixes-6, 2026-12-07)
            started = started or message["type"] == "http.response.start"
            ended = ended or message["type"] == "http.response.body" and not message.get("more_body", False)
            sent.note(message)

        try:
            await self.app(scope, receive, noting)
        except asyncio.CancelledError:  # the stop's grace is over (a client leaving is CancelOnDisconnect's, not raised)
            await self.end_cut(scope, receive, send, started, ended, sent)

    async def end_cut(self, scope, receive, send, started: bool, ended: bool, sent: "SentStream") -> None:
        """End a request the stop's grace cut off: a stream as OpenAI's API ends a failed one (the client can tell it was
        cut), a request not yet answered with a 503. Sent within CUT_END_S: a client that stops reading held the stop
        past its grace, uvicorn's send waiting for it to drain, however long (a review of server-fixes-6,
        2026-12-07); not read by then, or by a second Ctrl-C, its connection is closed (aborted: closing waits for
        the unread data to go)."""
        if started and ended:
            return
        if started:
            ending = send({"type": "http.response.body", "body": sent.cut_end(scope["path"]), "more_body": False})
        else:
            ending = self.with_cors(openai_error(f"the server stopped before answering (requests still answered {GGUF_STOP_GRACE_S} s "
                                                 "after a stop are cut off); send the request again once it is back", None, 503,
                                                 kind="server_error"))(scope, receive, send)
        try:
            done = await self.until_done_or_forced(ending, CUT_END_S)
        except asyncio.CancelledError:  # a forced quit ended the event loop, which cancels what still runs: this too
            asyncio.current_task().uncancel()
            done = False
        if not done:
            transport = getattr(getattr(send, "__self__", None), "transport", None)  # uvicorn's request cycle's
            if transport is not None:
                transport.abort()
                try:
                    await asyncio.sleep(0)  # the connection is lost (uvicorn notes it) before the app returns
                except asyncio.CancelledError:  # the loop ending (a forced quit) once the connection was lost: done
                    asyncio.current_task().uncancel()

    def guarded(self, scope: dict) -> tuple[dict, Any]:
        """(the request's scope as the app reads it, None), or (scope, the error response answering it)."""
        path, method = scope["path"].rstrip("/") or "/", scope["method"]
        if self.api_key and path != "/health" and not self.authorized(scope):
            # before the path's 404, which names the served model: a client without the key learns nothing of it (a review)
            return scope, openai_error("invalid or missing API key: send Authorization: Bearer <key>", None, 401,
                                       kind="authentication_error", code="invalid_api_key")
        if path not in SERVED_PATHS and not path.startswith(MODEL_PATH):
            return scope, openai_error(f"{method} {path} is not served; this endpoint serves {self.name} at "
                                       f"{', '.join(SERVED_PATHS)} and {MODEL_PATH}{self.name} only", None, 404)
        # a served path with a trailing slash is served, not redirected: Starlette's 307 had an empty body (`curl -d`
        # printed nothing) and a Location built from the Host header (http:// behind a TLS proxy; a second review)
        scope = {**scope, "path": path}
        if method == "POST":
            # OpenAI's API and llama.cpp's server read a POST body as JSON whatever its Content-Type (`curl -d`
            # sends a form type, Python's `requests` none at all); FastAPI refused both as "no JSON object".
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-type"] + [(b"content-type", b"application/json")]
        return scope, None

    def authorized(self, scope: dict) -> bool:
        """Whether the request carries the API key (`Authorization: Bearer <key>`, or `x-api-key`)."""
        import hmac

        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        auth = headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())


CORS_METHODS = ("GET", "HEAD", "POST")  # what the served paths take: the method a preflight asks for is one of them


def cors_middleware(app, origins: list[str]):
    """`app` behind Starlette's CORSMiddleware for the browser `origins` (or "*"). allow_headers "*" makes it name back
    the headers a preflight asks for (Authorization, Content-Type, the OpenAI JS SDK's x-stainless-*) one by one: by the
    Fetch standard a "*" in Access-Control-Allow-Headers never covers Authorization, which a keyed request sends.
    No credentials: the key travels in a header, not a cookie, and so "*" can mean any origin."""
    from starlette.middleware.cors import CORSMiddleware

    return CORSMiddleware(app, allow_origins=list(origins), allow_methods=CORS_METHODS, allow_headers=["*"])


def is_preflight(scope: dict) -> bool:
    """Whether an HTTP request is a browser's CORS preflight: OPTIONS with Origin and Access-Control-Request-Method, as
    CORSMiddleware tells one (anything else, an OPTIONS without them included, is an ordinary request)."""
    names = {k for k, _ in scope.get("headers", ())}
    return scope["method"] == "OPTIONS" and b"origin" in names and b"access-control-request-method" in names


def serving_server():
    """The uvicorn Server serving this process, or None: the owner of the SIGINT handler, which uvicorn's Server sets
    to its own `handle_exit` for as long as it serves (capture_signals). Its `force_exit` is how uvicorn itself knows
    of a second Ctrl-C during a stop (or a first, once something else stopped it)."""
    handler = signal.getsignal(signal.SIGINT)
    server = getattr(handler, "__self__", None)
    return server if getattr(handler, "__name__", None) == "handle_exit" and hasattr(server, "force_exit") else None


class CancelOnDisconnect:
    """Cancels the handling of a request whose client leaves before its answer is complete, as transformers 5.25's
    middleware of that name does; added where transformers has none (5.17, the GPU machine's). There a non-streamed
    answer whose client left was generated to its end (its max_tokens, or the context's), holding every later request
    that long: only a stream's end cancelled its generation. The cancellation ends the handler's wait, and the
    generation with it (until_client_leaves)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        handling = asyncio.current_task()
        messages: asyncio.Queue = asyncio.Queue()
        answered = False

        async def send_and_note_the_end(message) -> None:
            nonlocal answered
            await send(message)
            answered = answered or message["type"] == "http.response.body" and not message.get("more_body", False)

        async def pass_messages_on() -> None:
            while True:
                message = await receive()
                messages.put_nowait(message)
                if message["type"] == "http.disconnect":
                    if not answered:
                        handling.cancel()
                    return

        watcher = asyncio.create_task(pass_messages_on())
        try:
            await self.app(scope, messages.get, send_and_note_the_end)
        except asyncio.CancelledError:
            if not watcher.done():  # the server stopping, not the client leaving
                raise
            handling.uncancel()
        finally:
            watcher.cancel()


class SentStream:
    """What a served answer sent so far, noted from its ASGI messages (SentStream.note): whether it is a stream of
    server-sent events and, for a Responses stream, its response object (response.created and response.in_progress
    carry it) and its last event's sequence_number. Enough to end it when the stop's grace cuts it off (cut_end)."""

    SEQUENCE = re.compile(rb'"sequence_number":\s*(-?\d+)')
    ENDS = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')  # a Responses stream's last event

    def __init__(self) -> None:
        self.events, self.response, self.sequence, self.over = False, None, -1, False

    def note(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.events = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in message.get("headers") or ())
            return
        body = (message.get("body") or b"") if self.events else b""
        # a chat stream's [DONE] is a part of its own (a text holding "data: [DONE]" is inside a JSON string)
        self.over = self.over or body.startswith(b"data: [DONE]") or any(end in body for end in self.ENDS)
        numbers = self.SEQUENCE.findall(body) if b'"sequence_number"' in body else ()
        if numbers:
            self.sequence = max(self.sequence, *(int(n) for n in numbers))
        if b'"response.created"' in body or b'"response.in_progress"' in body:
            for line in body.split(b"\n"):
                try:
                    event = json.loads(line.removeprefix(b"data: ")) if line.startswith(b"data: {") else None
                except ValueError:
                    continue
                if isinstance(event, dict) and isinstance(event.get("response"), dict):
                    self.response = event["response"]

    def cut_end(self, path: str) -> bytes:
        """The events that end this answer's stream, cut off at `path` by the stop's grace, as OpenAI's API ends a
        stream that failed (a cut stream ended with no last event, and its client could not tell it from a dropped
        connection; a review, 2026-12-07): chat and completions, an error object (OpenAI's chat API has no
        finish_reason for an answer the server broke off; the openai client raises the error as an APIError) and
        [DONE]; Responses, `error` and `response.failed` with status "failed", as transformers' own failed stream. A
        response that is no stream, or a stream whose last event went out, just ends."""
        if not self.events or self.over:  # no stream, or one whose last event went out
            return b""
        message = (f"the server stopped while this answer was being generated (an answer still streaming "
                   f"{GGUF_STOP_GRACE_S} s after a stop is cut off): the answer is incomplete; send the request again once "
                   "the server is back")
        if path != "/v1/responses":
            error = {"message": message, "type": "server_error", "param": None, "code": None}
            return f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()
        error = {"type": "error", "sequence_number": self.sequence + 1, "code": "server_error", "message": message, "param": None}
        failed = {"type": "response.failed", "sequence_number": self.sequence + 2,
                  "response": {**(self.response or {}), "status": "failed", "output": [],
                               "error": {"code": "server_error", "message": message}}}
        return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in (error, failed)).encode()


def served_model_route(app, model_manager) -> None:
    """GET /v1/models/{model}: OpenAI's retrieve-model, which the openai client's `models.retrieve(id)` and LangChain's
    model checks call, and which transformers serve lacks (a 404 "is not served" for the served model itself). The
    served model's entry as /v1/models lists it; any other id a 404 in OpenAI's error shape, code model_not_found."""
    from fastapi.responses import JSONResponse

    @app.get(MODEL_PATH + "{model:path}")  # :path: an id with a slash ('org/model') is an id, not another route
    def retrieve_model(model: str):
        listed = model_manager.list_models() if hasattr(model_manager, "list_models") else model_manager.get_gen_models()
        entry = next((m for m in listed if m.get("id") == model), None)
        if entry is None:
            served = ", ".join(m.get("id", "?") for m in listed)
            return openai_error(f"the model {model!r} does not exist: this endpoint serves {served}", "model", 404, code="model_not_found")
        return JSONResponse(entry)


def answer_head_where_get_is_served(app) -> None:
    """Every GET route of `app` (/health, /v1/models) answers HEAD too, as HTTP asks of a GET resource: its headers
    (status, Content-Type, Content-Length) with no body, which uvicorn leaves out of any answer to a HEAD. FastAPI's
    routes take only the methods they were declared with: the HEAD that monitors and load balancers probe with was a
    405 (a review, 2026-12-07). Starlette's own Route adds HEAD to GET the same way."""
    for route in app.routes:
        methods = getattr(route, "methods", None)
        if isinstance(methods, set) and "GET" in methods:
            methods.add("HEAD")


def _exit_after_stop(signum, frame) -> None:
    """SIGTERM's handler in the merged server. uvicorn ends its stop by raising the signal it caught again, whose default
    action killed the process there, before multiprocessing's exit handlers unlinked the semaphores of the queues to
    the model's process (transformers' EngineClient.start_process): the resource tracker then warned of "7 leaked
    semaphore objects" on every stop. The stop is over by then: run the exit handlers, then exit at once, as the signal
    did (a sys.exit would first run the event loop again, to log each request the stop cut off as a traceback)."""
    import atexit

    _EXITING["now"] = True
    atexit._run_exitfuncs()
    os._exit(0)


_EXITING = {"now": False}  # the merged server runs its exit handlers: a stop-now signal then only kills the model's process


STOP_NOW_SIGNAL = signal.SIGUSR1  # serve-model's second Ctrl-C to the merged server: stop now, not gracefully


def _exit_now(signum, frame) -> None:
    """STOP_NOW_SIGNAL's handler in the merged server: a second Ctrl-C, which no longer waits for the graceful stop.
    serve-model SIGKILLed the server there, and multiprocessing's exit handlers never ran: the resource tracker then
    warned of "6 leaked semaphore objects" (the queues to the model's process, EngineClient.start_process). Kill the
    model's process (it may be generating; it holds nothing of its own to clean up), then run the exit handlers, which
    unlink those semaphores, and exit at once."""
    import multiprocessing

    for child in multiprocessing.active_children():
        child.kill()
    if not _EXITING["now"]:  # else the exit handlers this signal interrupted go on, and exit
        _exit_after_stop(signum, frame)


def _bounded_graceful_shutdown() -> None:
    """uvicorn, as transformers serve builds it, waits on a stop for every open request however long: a stream held
    serve-model's Ctrl-C for 30 s, then a SIGKILL (a review, 2026-12-06), and on Python >= 3.12 even uvicorn's second
    signal does not end the wait (`server.wait_closed()` waits for open connections: uvicorn PR #2145). Its
    `timeout_graceful_shutdown` cancels what is still answered after GGUF_STOP_GRACE_S, as llama.cpp's stop does, and
    the app still shuts down (its model process with it). A value transformers passes itself is kept."""
    import uvicorn

    if getattr(uvicorn.Config, "_qlora_bounded", False):
        return

    class Config(uvicorn.Config):
        _qlora_bounded = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("timeout_graceful_shutdown", GGUF_STOP_GRACE_S)
            super().__init__(*args, **kwargs)

    uvicorn.Config = Config  # serve.py looks it up on the module when the server is built


# transformers 5.17 (the GPU image) serves a pinned model otherwise than 5.25 in three ways that OpenAI's clients see;
# each function below makes 5.17 answer as 5.25 does and leaves a transformers that already does alone.

def honour_max_completion_tokens() -> None:
    """A chat request's `max_completion_tokens` (OpenAI's length limit; `max_tokens` is its deprecated name) limits the
    answer, as `max_tokens` does. transformers 5.17 lists it among the fields it ignores: the answer ran to the default
    limit, and a limit beyond the context was no 400 (`refusal` reads the limit from the generation settings)."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler as handler

    if "max_completion_tokens" not in handler._unused_fields:  # 5.25 on reads it
        return
    build = handler._build_generation_config

    def build_with_limit(self, body: dict, *args, **kwargs):
        config = build(self, body, *args, **kwargs)
        if body.get("max_completion_tokens") is not None:  # first, as 5.25 reads it: it wins over max_tokens
            set_setting(config, "max_new_tokens", int(body["max_completion_tokens"]))
        return config

    handler._build_generation_config = build_with_limit
    handler._unused_fields = handler._unused_fields - {"max_completion_tokens"}  # no "Ignoring unsupported fields" line


def name_answers_as_served() -> None:
    """Answers name the model as it was served (`--name`), as 5.25's do. transformers 5.17 names a model
    `<name>@main` (ModelManager.process_model_name, the form its loader splits), and its handlers put that name in
    every answer's "model"; they use it otherwise only as the key of the model's generation manager."""
    from transformers.cli.serving.utils import BaseHandler

    resolve = BaseHandler.__dict__.get("_resolve_model")
    if resolve is None or getattr(resolve, "served_name", False):  # 5.25 on: a local folder keeps its name
        return

    def resolve_as_served(self, body: dict):
        model_id, model, processor = resolve(self, body)
        return self.model_manager.force_model or model_id, model, processor

    resolve_as_served.served_name = True
    BaseHandler._resolve_model = resolve_as_served


def list_only_the_served_model(name: str) -> None:
    """/v1/models lists the served model alone, under `name`, as 5.25 lists a pinned server's model. transformers 5.17
    lists the generative models of the Hugging Face cache instead: not the served one, and a 500 (CacheNotFound) on a
    machine that never downloaded anything."""
    from transformers.cli.serving.model_manager import ModelManager

    if hasattr(ModelManager, "list_models"):  # 5.25 on: a pinned server lists its model alone
        return
    # 5.25's entry; the pinned model is loaded before the server starts and never unloaded
    entry = {"owned_by": "local", "id": name, "object": "model", "created": 0, "status": {"value": "loaded"}}
    ModelManager.get_gen_models = staticmethod(lambda cache_dir=None: [dict(entry)])


def openai_error(message: str, param: str | None, status: int = 400, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
    """An OpenAI-style error body (what clients parse), not FastAPI's `{"detail": ...}` or a bare 500: `kind` is its
    "type", `code` OpenAI's machine-readable reason where it has one."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status, headers=headers)


def body_problem(errors: list[dict], body: Any) -> str:
    """One line for FastAPI's refusal of a request body: where its JSON breaks, or that it is no JSON object."""
    broken = next((e for e in errors if e.get("type") == "json_invalid"), None)
    if broken is not None:
        doc = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
        reason = json.JSONDecodeError(broken.get("ctx", {}).get("error", "invalid JSON"), doc, broken["loc"][-1])
        return f"the request body is not valid JSON: {reason}"
    return "the request body must be a JSON object"


def unreadable_body(cause: BaseException | None) -> str | None:
    """One line for a request body FastAPI could not parse for another reason than invalid JSON (`cause`: what its
    JSON parser raised), else None. Valid JSON that Python's parser will not read, a body nested beyond its recursion
    limit or an integer of more digits than int() converts, was "There was an error parsing the body", no reason
    given (a review, 2026-12-07), where the same JSON inside a field is named as nested too deeply or too long."""
    if isinstance(cause, RecursionError):
        return nested_too_deeply("the request body", "send flatter JSON")  # beyond Python's parser: beyond the cap
    if isinstance(cause, ValueError) and "int_max_str_digits" in str(cause):
        return (f"the request body holds an integer of more than {sys.get_int_max_str_digits()} digits, which Python's "
                "JSON parser does not read: send a shorter number")
    if isinstance(cause, UnicodeDecodeError):  # a Latin-1 "café": the codec's reason alone said no fix (a review, 2026-12-07)
        return (f"the request body is not UTF-8 text (byte 0x{cause.object[cause.start]:02x} at position {cause.start} is "
                "no UTF-8): send it encoded as UTF-8, as JSON must be")
    if cause is not None:
        text = str(cause).strip()
        return f"the request body cannot be read: {type(cause).__name__}" + (f": {text.splitlines()[0]}" if text else "")
    return None


TEXT_PARTS = ("text", "input_text", "output_text")  # content parts whose "text" transformers serve reads
ITEM_FIELDS = {"function_call": ("call_id", "name", "arguments"), "function_call_output": ("call_id", "output")}  # Responses input items


def content_problem(content: Any, where: str, role: str | None = None) -> tuple[str, str] | None:
    """(message, field) when a message's content (at `where`, e.g. `messages[0].content`) is neither text, nothing,
    nor a non-empty list of content parts as transformers serve reads them, else None. An assistant's (`role`) content
    may hold OpenAI's refusal parts, {"type": "refusal", "refusal": ...}: read as its text (refusals_as_text)."""
    if content is None or isinstance(content, str):
        return None
    if not isinstance(content, list):
        return f"{where} must be a string or a list of content parts, got {type(content).__name__} {content!r:.40}", where
    if not content:  # serve rendered the turn as empty and answered it, with a 200 (a review, 2026-12-06)
        return f"{where} is an empty list: send a string or at least one text part ({{\"type\": \"text\", \"text\": ...}})", where
    for i, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            return (f"{where}[{i}] must be a content part with a \"type\", e.g. {{\"type\": \"text\", \"text\": \"Hi\"}}, "
                    f"got {part!r:.40}"), f"{where}[{i}]"
        if part["type"] == "refusal":
            # the assistant's own words, as OpenAI's API answered them: carried as its text (serve refused the part)
            if role != "assistant":
                return f"{where}[{i}] is a refusal part, which only an assistant turn holds; send the text as a text part", f"{where}[{i}]"
            if not isinstance(part.get("refusal"), str):
                return f"{where}[{i}].refusal must be a string (a 'refusal' part holds its text there)", f"{where}[{i}].refusal"
            continue
        if part["type"] not in TEXT_PARTS:
            # serve's text-only (LLM) reading keeps a message's text parts and drops the rest: an image, audio or
            # file part was left out of the prompt, with a 200 answering as if it had not been sent (a review, 2026-12-06)
            return (f"{where}[{i}] is of type {part['type']!r:.30}, which this server cannot read: the served model takes "
                    "text only (the part would be dropped); send text parts ({\"type\": \"text\", \"text\": ...}) only"), f"{where}[{i}]"
        if not isinstance(part.get("text"), str):
            return f"{where}[{i}].text must be a string (a {part['type']!r} part holds its text there)", f"{where}[{i}].text"
    return None


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's; "developer" is read as "system"
# (its newer name); "function" is the deprecated tool-result role older clients still send, with an assistant turn's
# function_call standing in for its content


def message_problem(message: dict, i: int) -> tuple[str, str] | None:
    """(message, field) for chat message `i` with a role OpenAI's API does not take, or no content where one is needed
    (an assistant turn may carry tool_calls, or the older function_call, instead), else None. transformers serve hands
    any role and a missing content to the chat template, which rendered them as it could: a 200 with some answer (a
    review, 2026-12-06)."""
    role, content = message["role"], message.get("content")
    if role not in CHAT_ROLES:
        return f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r:.40}", f"messages[{i}].role"
    calls = role == "assistant" and (message.get("tool_calls") or message.get("function_call"))
    declined = role == "assistant" and content is None and isinstance(message.get("refusal"), str)  # refusal_as_text
    if (content is None or content == []) and not calls and not declined:
        needs = "content (or tool_calls)" if role == "assistant" else "content"
        return (f"messages[{i}] (role {role!r}) has no {needs}" + (" (an empty list)" if content == [] else "") +
                ": send a string or a list of text parts"), f"messages[{i}].content"
    if role == "assistant" and message.get("tool_calls") is not None:
        problem = tool_calls_problem(message["tool_calls"], f"messages[{i}].tool_calls")
        if problem:
            return problem
    if message.get("function_call") is not None:
        # the pre-tools API's call: serve reads tool_calls only, so the turn reached the template empty (a 200; a review)
        call = message["function_call"]
        shaped = role == "assistant" and isinstance(call, dict) and isinstance(call.get("name"), str)
        problem = arguments_problem(call.get("arguments"), f"messages[{i}].function_call.arguments") if shaped else None
        if problem:  # named as the call's arguments (the call itself, shown below, could be "[" * 100000 of them)
            return problem[0], f"messages[{i}].function_call"
        if not shaped:
            return (f"messages[{i}].function_call must be an assistant turn's {{\"name\": ..., \"arguments\": \"<JSON>\"}} "
                    f"(arguments a string of a JSON object), got {preview(call, 60)}"), f"messages[{i}].function_call"
    return None if content == [] else content_problem(content, f"messages[{i}].content", role)


def arguments_problem(arguments: Any, where: str) -> tuple[str, str] | None:
    """(message, field) for a tool call's `arguments` (at `where`) that are no string of JSON, else None: serve parses
    them for the chat template, and a string that is no JSON was a 400 naming nothing ("malformed request:
    JSONDecodeError: Expecting value: line 1 column 1"; a review, 2026-12-06)."""
    if no_arguments(arguments):
        return None
    if not isinstance(arguments, str):
        return (f"{where} must be a string holding JSON, e.g. {json.dumps(json.dumps({'city': 'Paris'}))}, got "
                f"{type(arguments).__name__} {preview(arguments, 40)}"), where
    try:
        value = strict_json(arguments)
    except JsonNumberTooLong as e:
        return f"{where}: {e}", where
    except ValueError as e:
        return f"{where} is not valid JSON ({json_error(e)}): send the call's arguments as a JSON string, got {arguments!r:.60}", where
    except JsonTooDeep:
        return nested_too_deeply(where, "send the call's arguments as a flatter JSON object", f"{arguments!r:.40}"), where
    if not isinstance(value, dict):
        # serve parses them for the chat template, which reads them as a mapping (Qwen's `arguments|items`): "[1, 2]"
        # or "3" reached it as a list or a number (a TypeError, or a prompt without them; a review, 2026-12-07)
        return (f"{where} must be a JSON object of the call's arguments by name, e.g. {json.dumps(json.dumps({'city': 'Paris'}))}, "
                f"got a JSON {JSON_TYPES.get(type(value), type(value).__name__)}: {arguments!r:.60}"), where
    return None


JSON_TYPES = {list: "array", int: "number", float: "number", str: "string", bool: "boolean", type(None): "null"}  # as JSON names them


# Arrays or objects inside each other, at most, in a request's JSON (a field's value, a tool call's arguments). Python's
# parser reads ~950 levels, but transformers copies each message, tool and template argument recursively before
# rendering (_message_objects_to_dicts, _plain_template_data: two frames a level) and raised RecursionError from ~490
# levels, a 500 with a ~3000-line traceback (a review, 2026-12-07). Not 64: a JSON schema spends up to 7 levels per
# level of object nesting (properties, the property, anyOf, [0], items, anyOf, [0]), and a strict tool schema of 10
# object levels (OpenAI's strict-mode cap) is 69 levels under `tools` (a review, 2026-12-07); 200 keeps that margin.
MAX_JSON_DEPTH = 200


def nested_too_deeply(where: str, fix: str = "send it flatter", got: str = "") -> str:
    """What to say of JSON at `where` (a field, "the request body") that nests arrays or objects beyond MAX_JSON_DEPTH
    levels, or beyond what Python's parser reads (farther still), with what was `got` (its start) and the `fix`: one
    wording wherever it is found (it was worded four ways; a review, 2026-12-07)."""
    return (f"{where} is nested too deeply (arrays or objects inside each other more than {MAX_JSON_DEPTH} levels deep"
            + (f", got {got}" if got else "") + f"): {fix}")


class JsonNumberTooLong(ValueError):
    """A request's JSON text holding an integer of more digits than Python's int() converts (sys.get_int_max_str_digits):
    valid JSON, which Python's parser does not read."""


class JsonTooDeep(Exception):
    """A request's JSON text (a tool call's arguments, generation_config) nested deeper than MAX_JSON_DEPTH levels,
    or than Python's parser goes."""


class JsonFindings(NamedTuple):
    """What json_findings found in a JSON value: the path (keys and indices) to the first of each, else None."""
    too_deep: list | None  # an array or object nested more than the limit's levels deep
    surrogate: tuple[list, str, bool] | None  # (path, the text, whether it is a key of the object at the path): a lone surrogate
    not_finite: tuple[list, float] | None  # (path, the value): NaN, Infinity or a number beyond a float (1e400)


def json_findings(value: Any, limit: int = MAX_JSON_DEPTH, depth: int = 1) -> JsonFindings:
    """One walk of `value` (at level `depth`: 1 for a field's value, 0 for a request body, whose fields' own values
    are numbers checked by name) for what a chat template cannot take: arrays or objects nested more than `limit`
    levels deep; a string, or key, that cannot be encoded as UTF-8 (JSON's "\\ud800" escape, valid JSON, reads as a
    lone UTF-16 surrogate, which no tokenizer encodes); a float that is not finite (Python's parser reads NaN,
    Infinity and 1e400, no JSON, and a template's tojson writes them back as such). A loop, not a recursion (the value
    may be ~950 deep), its stack holding the arrays and objects still to read with a link to their parent, not a path
    per value: a path was copied for every value and a 2 MB body cost ~1.2 GB and ~10 s (a review, 2026-12-07). The
    path is built only for what is found."""
    def path(link: tuple | None, *last) -> list:
        keys = list(last)
        while link is not None:
            link, key = link
            keys.append(key)
        return keys[::-1]

    def encodes(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    too_deep = surrogate = not_finite = None
    if isinstance(value, str) and not encodes(value):
        surrogate = [], value, False
    elif isinstance(value, float) and depth > 0 and not math.isfinite(value):
        not_finite = [], value
    stack = [(value, depth, None)] if isinstance(value, (dict, list)) else []
    while stack:
        node, level, link = stack.pop()
        if level > limit and too_deep is None:
            too_deep = path(link)
        containers = []
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            if isinstance(key, str) and surrogate is None and not key.isascii() and not encodes(key):
                surrogate = path(link), key, True
            if isinstance(child, (dict, list)):
                containers.append((key, child))
            elif isinstance(child, str):
                if surrogate is None and not child.isascii() and not encodes(child):
                    surrogate = path(link, key), child, False
            elif isinstance(child, float) and level > 0 and not_finite is None and not math.isfinite(child):
                not_finite = path(link, key), child
        stack.extend((child, level + 1, (link, key)) for key, child in reversed(containers))
    return JsonFindings(too_deep, surrogate, not_finite)


def json_path(field: str, path: list, shown: int = 3) -> str:
    """`field` and the first `shown` keys or indices of `path` under it, as the request names them:
    tools[0].function.parameters (a path of MAX_JSON_DEPTH levels would fill the message)."""
    return field + "".join(f"[{key}]" if isinstance(key, int) else f".{key}" for key in path[:shown])


def surrogate_message(where: str, text: str, key: bool = False) -> str:
    """What to say of `text` (at `where`, or a key of the object there) that holds a lone surrogate (json_findings),
    on one line."""
    bad = next(c for c in text if 0xD800 <= ord(c) <= 0xDFFF)
    return (f"{'a key of ' if key else ''}{where} holds a lone UTF-16 surrogate (\\u{ord(bad):04x}), which is no Unicode "
            "character and cannot be encoded as UTF-8: send the text's own characters (a character beyond U+FFFF as a "
            "surrogate pair, e.g. \\ud83d\\ude00)")


def unencodable_text_problem(found: JsonFindings) -> tuple[str, str | None] | None:
    """(message, field) for a request (its json_findings) whose text (any string, or key, of any field) cannot be
    encoded as UTF-8, else None: it was a 400 "malformed request: TypeError: TextEncodeInput must be Union[...]" naming
    no field (a review, 2026-12-07). Checked before any other problem, whose message might quote the text."""
    if found.surrogate is None:
        return None
    path, text, key = found.surrogate
    if not path:  # a field's own name
        return surrogate_message("the request body", text, key=True), None
    where = json_path(str(path[0]), path[1:], 8)
    return surrogate_message(where, text, key), where


def nested_too_deeply_problem(found: JsonFindings) -> tuple[str, str] | None:
    """(message, field) for a request (its json_findings) with a field whose value nests arrays or objects more than
    MAX_JSON_DEPTH levels deep, else None: any field, as transformers copies messages, tools (their parameters'
    schemas) and chat_template_kwargs recursively, and this server's own checks print a field's value (json.dumps
    recurses too)."""
    if found.too_deep is None:
        return None
    where = json_path(str(found.too_deep[0]), found.too_deep[1:])
    return nested_too_deeply(where), where


def nested_beyond_the_cap(body: dict) -> bool:
    """Whether a request's JSON nests arrays or objects more than MAX_JSON_DEPTH levels: the body itself, or JSON text
    in one of the strings transformers parses and copies too (parsed_strings: a call's arguments, generation_config).
    request_problem refuses such a request before the handler reads it; asked again where the handler raised
    RecursionError, to tell a request nested beyond what was checked (the request's) from the server's own failure.
    Other strings are text for the model, which nothing parses: a user message quoting deep JSON was read as nested
    too deeply, and the server's own failure on it told the client to send flatter JSON (a review of server-fixes-6,
    2026-12-07)."""
    if json_findings(body, depth=0).too_deep is not None:
        return True
    for text in parsed_strings(body):
        try:
            strict_json(text)
        except JsonTooDeep:
            return True
        except ValueError:  # no JSON: nothing nested
            pass
    return False


def parsed_strings(body: dict) -> list[str]:
    """The strings of a request that transformers serve parses as JSON: generation_config, and each tool call's
    arguments (a chat turn's tool_calls and function_call, a Responses function_call item's)."""
    found = [body.get("generation_config")]
    for message in body.get("messages") if isinstance(body.get("messages"), list) else ():
        if not isinstance(message, dict):
            continue
        calls = message.get("tool_calls") if isinstance(message.get("tool_calls"), list) else []
        found += [call["function"].get("arguments") for call in calls if isinstance(call, dict) and isinstance(call.get("function"), dict)]
        if isinstance(message.get("function_call"), dict):
            found.append(message["function_call"].get("arguments"))
    for item in body.get("input") if isinstance(body.get("input"), list) else ():
        if isinstance(item, dict) and item.get("type") == "function_call":
            found.append(item.get("arguments"))
    return [text for text in found if isinstance(text, str)]


def not_finite_problem(found: JsonFindings) -> tuple[str, str] | None:
    """(message, field) for a request (its json_findings) holding NaN, Infinity or a number beyond a float (1e400,
    read as Infinity) inside a field's value, else None. FastAPI's parser (Python's json) reads them in the body
    itself; in a tool's parameters or a chat_template_kwargs value they reached the template as they were and its
    tojson wrote NaN/Infinity, no JSON, into the prompt (a review, 2026-12-07), where a call's arguments refuse them
    (strict_json). A field's own value is a number checked by name."""
    if found.not_finite is None:
        return None
    path, value = found.not_finite
    where = json_path(str(path[0]), path[1:], 8)
    read = "NaN" if math.isnan(value) else f"{'-' if value < 0 else ''}Infinity (or a number beyond a 64-bit float's range, e.g. 1e400)"
    return (f"{where} holds {read}, which JSON has no value for (the chat template would write it into the prompt as "
            "such): send a finite number, or null"), where


def strict_json(text: str) -> Any:
    """`text` parsed as JSON (RFC 8259) is. Python's json also takes NaN, Infinity and -Infinity, which are no JSON:
    '{"a": NaN}' was taken as a call's arguments (a review, 2026-12-07); they are a ValueError here, as any text that
    does not parse. Arrays or objects nested deeper than the parser goes ("[" * 100000 is valid JSON) raised
    RecursionError, a 500 with a traceback (the same review): JsonTooDeep here. A number beyond a float (1e400, valid
    JSON syntax) is read as Infinity without asking parse_constant, and a template's `tojson` rendered it as Infinity
    (a review, 2026-12-07): a ValueError too."""
    def no_constant(name: str):
        raise ValueError(f"{name} is not a JSON value: JSON has no NaN or Infinity; send a number or null")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):
            raise ValueError(f"{number:.40} is beyond a 64-bit float's range: it would be read as "
                             f"{'-' if value < 0 else ''}Infinity, which JSON has no value for; send a smaller number")
        return value

    def integer(digits: str) -> int:
        # int() raised "Exceeds the limit (4300 digits) ...; use sys.set_int_max_str_digits()": valid JSON called
        # invalid, with advice for the server's Python (a review, 2026-12-07)
        limit = sys.get_int_max_str_digits()
        if limit and len(digits.lstrip("-")) > limit:
            raise JsonNumberTooLong(f"it holds an integer of {len(digits.lstrip('-'))} digits, more than the {limit} this "
                                    "server's JSON parser reads: send a shorter number")
        return int(digits)

    try:
        value = json.loads(text, parse_constant=no_constant, parse_float=finite, parse_int=integer)
    except RecursionError:
        raise JsonTooDeep() from None
    found = json_findings(value)
    if found.too_deep is not None:
        raise JsonTooDeep()
    if found.surrogate is not None:  # "\\ud800" is JSON's syntax, but the template's tojson writes a character no tokenizer encodes
        _, text, key = found.surrogate
        raise ValueError(surrogate_message("an object in it" if key else "a string in it", text, key))
    return value


def json_error(e: ValueError) -> str:
    """What strict_json's ValueError says, in one line: the parser's reason and where, or the constant refused."""
    return f"{e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError) else str(e)


def no_arguments(arguments: Any) -> bool:
    """Whether a tool call's `arguments` are an empty (or whitespace-only) string: what many clients and gateways send
    back for a call of a tool that takes no arguments (GitHub Copilot CLI, LangChain's tool parsers, models behind
    OpenAI-compatible gateways), and OpenAI's API takes. It is no JSON: a 400 here refused every later turn of such a
    conversation (a review, 2026-12-06). It is read as "{}" (arguments_as_served)."""
    return isinstance(arguments, str) and not arguments.strip()


def arguments_as_served(call: dict) -> dict:
    """A tool call (a chat's `function`, a legacy `function_call`, a Responses function_call item) whose empty
    `arguments` (no_arguments) are "{}", which serve parses for the chat template as a call without arguments."""
    return {**call, "arguments": "{}"} if no_arguments(call.get("arguments")) else call


def tool_calls_problem(calls: Any, where: str) -> tuple[str, str] | None:
    """(message, field) for an assistant turn's `tool_calls` (at `where`) that are no list of function calls with a
    name and arguments as a string of JSON, else None: serve indexed and parsed them as they came (a KeyError or a
    JSONDecodeError, a 400 naming nothing)."""
    if not isinstance(calls, list):
        return f"{where} must be a list of tool calls, got {type(calls).__name__} {preview(calls, 40)}", where
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return (f"{where}[{j}].function must be {{\"name\": ..., \"arguments\": \"<JSON>\"}} (a tool call is {{\"id\": ..., "
                    f"\"type\": \"function\", \"function\": ...}}), got {preview(call, 60)}"), f"{where}[{j}].function"
        problem = arguments_problem(function.get("arguments"), f"{where}[{j}].function.arguments")
        if problem:
            return problem
    return None


def chat_messages_problem(messages: Any) -> tuple[str, str] | None:
    """(message, field) for a chat request's `messages` that are no list of messages OpenAI's API takes, else None."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
        return "messages must be a non-empty list of {\"role\", \"content\"} objects", "messages"
    for i, message in enumerate(messages):
        problem = message_problem(message, i)
        if problem:
            return problem
    return None


def one_prompt(prompt: Any) -> Any:
    """A completions `prompt` sent as a list of one string (OpenAI's API takes a string or a list of them; LangChain's
    OpenAI LLM always sends a list, one prompt in it for one call) as that string; any other value as it is."""
    return prompt[0] if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str) else prompt


def developer_as_system(messages: list[dict]) -> list[dict]:
    """`messages` (a chat's, or a Responses `input`'s items) with OpenAI's "developer" turns as "system" ones: its
    newer name for them, which the chat template the model was trained with does not know (it would render an unknown
    header, or none). Items without a role (a Responses function_call) are kept as they are."""
    return [{**m, "role": "system"} if m.get("role") == "developer" else m for m in messages]


def refusals_as_text(content: Any, text_type: str = "text") -> Any:
    """An assistant turn's content with each refusal part ({"type": "refusal", "refusal": ...}, OpenAI's answer when
    the model declined) as a text part of `text_type`: the assistant's words, which the chat template renders as its
    text. serve reads text parts only (the refusal was a 400 before, naming the part)."""
    if not isinstance(content, list):
        return content
    return [{"type": text_type, "text": p["refusal"]} if isinstance(p, dict) and p.get("type") == "refusal" else p for p in content]


def refusal_as_text(message: dict) -> Any:
    """An assistant turn's content, or its `refusal` when it has none: OpenAI's chat API answers a declined request
    with content null and the words in `refusal`, and a client sends that answer back as it came (the openai
    package's message). serve reads content only: it was a 400 ("has no content"; a review of served-fields)."""
    content = message.get("content")
    return message["refusal"] if content is None and isinstance(message.get("refusal"), str) else content


def history_as_served(messages: list[dict]) -> list[dict]:
    """A chat's `messages` as transformers serve reads them: developer turns as system ones (developer_as_system),
    a declined turn's refusal and refusal parts as text (refusal_as_text, refusals_as_text), and the pre-tools API's
    assistant `function_call` as a tool call, its `function` result as that call's `tool` result, and a call's empty
    arguments as "{}" (arguments_as_served). serve reads
    tool_calls only: a function_call turn reached the chat template empty, with a 200 (a review, 2026-12-06); as a tool
    call, a template that renders tool calls renders it and one that does not is refused (ToolsNotRendered), as a
    history's tool_calls are."""
    served, call_id = [], None
    for i, m in enumerate(developer_as_system(messages)):
        if m.get("role") == "assistant":
            m = {**m, "content": refusals_as_text(refusal_as_text(m))}
            if "tool_calls" in m and m["tool_calls"] is None:  # null is not sent (OpenAI's reading; the openai package's
                del m["tool_calls"]  # message sends it back so): transformers 5.17 iterated it, a TypeError (500)
            if isinstance(m.get("tool_calls"), list):
                m["tool_calls"] = [{**c, "function": arguments_as_served(c["function"])} for c in m["tool_calls"]]
            if m.get("function_call") is not None:
                call_id = f"call_function_{i}"
                call = {"id": call_id, "type": "function", "function": arguments_as_served(dict(m["function_call"]))}
                m = {**{k: v for k, v in m.items() if k != "function_call"}, "tool_calls": [*(m.get("tool_calls") or []), call]}
        elif m.get("role") == "function" and call_id is not None:
            m = {"role": "tool", "tool_call_id": call_id, "content": m.get("content")}
        served.append(m)
    return served


RESPONSE_ROLES = ("system", "developer", "user", "assistant")  # a Responses input message's; tool results come as
# function_call_output items, and "developer" is read as "system" as in a chat


def response_input_as_system(given: Any) -> Any:
    """A Responses `input` with every developer message item read as a system one (`developer_as_system`), wherever it
    is in the list: not only when the first item has a role (a review: after a first function_call_output item a
    developer item was left as it came); an assistant item's refusal parts are read as its text (refusals_as_text).
    A function_call item's empty arguments are "{}" (arguments_as_served). A string, or a list's content parts (no
    role), is returned as it is."""
    if not isinstance(given, list):
        return given
    return [{**m, "content": refusals_as_text(m.get("content"), "output_text")} if m.get("role") == "assistant" else
            arguments_as_served(m) if m.get("type") == "function_call" else m for m in developer_as_system(given)]


def instructions_kept_with_system(body: dict) -> dict:
    """A Responses request whose `instructions` and first input item, a system (or developer) message, are one system
    message: instructions first, then that message's text. transformers serve put the instructions in place of that
    message's content, so the input's own system message was lost, with a 200 (a review, 2026-12-06); OpenAI's API
    keeps both. Any other request is returned as it is."""
    given, instructions = body.get("input"), body.get("instructions")
    if not instructions or not isinstance(given, list) or not given or given[0].get("role") not in ("system", "developer"):
        return body
    first, content = given[0], given[0].get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in TEXT_PARTS for p in content):
        content = " ".join(p.get("text") or "" for p in content)  # as serve joins a message's text parts
    joined = (f"{instructions}\n\n{content}" if isinstance(content, str) else
              [{"type": "input_text", "text": instructions}, *(content or [])])
    return {**{k: v for k, v in body.items() if k != "instructions"}, "input": [{**first, "content": joined}, *given[1:]]}


def _message_item(item: dict) -> bool:
    return "role" in item or item.get("type") == "message"


def _item_reference(item: dict) -> bool:
    """A Responses input item that names an earlier item by id instead of holding it: {"type": "item_reference", "id":
    ...}, or {"id": ...} alone (OpenAI's type is optional there)."""
    return item.get("type") == "item_reference" or ("id" in item and "type" not in item and "role" not in item)


def _conversation_item(item: dict) -> bool:
    """A Responses input item of a conversation (a message, a function call or its output, a reasoning item), not a
    content part."""
    return _message_item(item) or item.get("type") in (*ITEM_FIELDS, "reasoning")


def input_problem(given: Any) -> tuple[str, str] | None:
    """(message, field) for a Responses `input` that transformers serve cannot turn into messages, else None. Every
    message item (one with a role, or of type "message") is checked wherever it is: transformers serve reads a list
    whose first item has no "role" as one user message's content parts, and a later {"type": "message", "role":
    "wizard"} item passed as a part of it (a 200; a review, 2026-12-06). Such a list holds content parts only: a
    conversation's item in it (a message, a function call or its output) is refused, as serve would drop it."""
    if not (isinstance(given, str) and given) and not (isinstance(given, list) and given and all(isinstance(i, dict) for i in given)):
        return "input must be a non-empty string or a non-empty list of input items (objects)", "input"
    if isinstance(given, str):
        return None
    for i, item in enumerate(given):
        if _item_reference(item):  # serve stores no items: it dropped the reference (a 200) or named no field (a 422)
            return (f"input[{i}] is an item_reference ({item.get('id')!r:.40}), which is not supported: this server keeps "
                    "no items (transformers serve stores none to look up); send the item itself in `input` (the message, "
                    "function call or its output, with its content) in its place"), f"input[{i}]"
    for i, item in enumerate(given):
        if _message_item(item):
            # transformers serve hands any role, and a missing content as "", to the chat template: a 200 with some
            # answer (a review, 2026-12-06), where OpenAI's API and a chat request here answer 400
            role = item.get("role")
            if not isinstance(role, str) or role not in RESPONSE_ROLES:
                return f"input[{i}].role must be one of {', '.join(RESPONSE_ROLES)}, got {role!r:.40}", f"input[{i}].role"
            if item.get("content") is None:
                return (f"input[{i}] (role {role!r}) has no content: send a string or a list of input_text parts",
                        f"input[{i}].content")
            problem = content_problem(item.get("content"), f"input[{i}].content", role)
            if problem:
                return problem
        elif "role" in given[0]:  # a conversation's other items: function calls and their outputs
            for key in ITEM_FIELDS.get(item.get("type"), ()):
                if not isinstance(item.get(key), str) and not (key == "output" and isinstance(item.get(key), list)):
                    return f"input[{i}] (a {item['type']!r} item) needs {key!r} as a string, got {item.get(key)!r:.40}", f"input[{i}].{key}"
            if item.get("type") == "function_call":  # parsed for the chat template, as a chat's tool call is
                problem = arguments_problem(item["arguments"], f"input[{i}].arguments")
                if problem:
                    return problem
            if item.get("type") == "function_call_output" and isinstance(item.get("output"), list):
                # serve keeps an output list's text parts only: an input_image in it was dropped, with a 200 (a review)
                problem = content_problem(item["output"], f"input[{i}].output")
                if problem:
                    return problem
    if "role" in given[0]:
        return None
    # transformers serve reads a list whose first item has no role as one user message's content parts and keeps only its
    # text (image, audio) parts: a message, function call or output item among them was dropped with a 200, a developer
    # item after an input_text part or a user question after a first function_call_output (a review, 2026-12-06)
    for i, item in enumerate(given):
        if _conversation_item(item):
            what = "a message item" if _message_item(item) else f"a {item['type']!r} item"
            if i == 0:
                return (f"input[0]: {what} cannot open the input without a role (it would be read as a content part and "
                        "dropped); start with the conversation's messages (a role each), e.g. the user's question, then "
                        "the function call and its output"), "input[0]"
            fix = ("give every item a role (or send the parts as one message's content)" if _message_item(item) else
                   "send the parts as a message's content, e.g. {\"role\": \"user\", \"content\": [...]}")
            return f"input[{i}]: {what} cannot follow content parts; {fix}", f"input[{i}]"
    return content_problem(given, "input")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    """Whether `value` is a finite JSON number (not a boolean). A JSON integer has no size limit: one beyond a float
    (10**400) is not finite either; math.isfinite raised OverflowError on it, a 500 (a review, 2026-12-07)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def template_failure(e: Exception, kind: str, body: dict | None = None) -> tuple[str, str]:
    """(message, field) for a chat template that raised `e` rendering a request (`body`, as served: a Responses
    request's input and instructions as transformers serve reads them): its own refusal (a jinja2.TemplateError:
    `raise_exception`, an undefined name) or an error in its code (a TypeError reading a field as another type than it
    has). The field is the chat message it was rendering where its traceback shows it (`template_message_index`): a
    chat's messages[i], a Responses request's input[i] or its instructions (response_turn_fields), else the request's
    messages (input); the message names the template's line and its own words."""
    import jinja2

    index = template_message_index(e)
    instructions = kind == "response" and bool((body or {}).get("instructions"))
    if kind == "chat":
        field = f"messages[{index}]" if index is not None else "messages"
    else:
        fields = response_turn_fields((body or {}).get("input"), instructions)
        field = fields[index] if index is not None and index < len(fields) else "input"
    line = template_line(e)
    at = f" (template line {line})" if line else ""
    sent = (" (sent as a system turn)" if field == "instructions" else
            " (with instructions, sent as a system turn)" if instructions and field == "input" else "")
    if isinstance(e, jinja2.TemplateError):
        return f"the model's chat template refused {field}{sent}{at}: {template_message(e)}", field
    return (f"the model's chat template failed on {field}{sent}{at}: {template_message(e)}; send it in the shape the "
            "template reads (each field of the type it expects), or serve the model with a chat template that renders it"), field


def response_turn_fields(given: Any, instructions: bool) -> list[str]:
    """The field of a Responses request that each chat message transformers serve makes of it holds, in order
    (ResponseHandler._normalize_input): `instructions` a system turn in front; each message item one turn
    (input[i]); a function_call item folded into the assistant turn before it (named by that turn's first item), or
    opening one; a function_call_output item a tool turn; a reasoning item no turn of its own. A string or a list of
    content parts is one user turn: "input". A template failure named the whole input before (a review, 2026-12-07)."""
    fields, last_role = [], None
    if isinstance(given, list) and given and isinstance(given[0], dict) and "role" in given[0]:
        for i, item in enumerate(given):
            if "role" in item:
                fields.append(f"input[{i}]")
                last_role = item["role"]
            elif item.get("type") == "function_call":
                if last_role != "assistant":
                    fields.append(f"input[{i}]")
                last_role = "assistant"
            elif item.get("type") == "function_call_output":
                fields.append(f"input[{i}]")
                last_role = "tool"
    else:
        fields = ["input"]
    # serve puts instructions in place of a first system message's content; instructions_kept_with_system has joined
    # the two into that message (the request then has no instructions)
    return ["instructions", *fields] if instructions else fields


def _template_frames(e: BaseException):
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename in ("<template>", "<unknown>"):  # as jinja names a template's code
            yield tb
        tb = tb.tb_next


def template_line(e: BaseException) -> int | None:
    """The line of the chat template `e` was raised at (its syntax error's, or its traceback's innermost template
    frame's), or None."""
    line = getattr(e, "lineno", None)
    for tb in _template_frames(e):
        line = tb.tb_lineno
    return line


def template_message_index(e: BaseException) -> int | None:
    """The index in the request's messages of the chat message the template was rendering when it raised `e`, or None
    when its traceback does not tell one. jinja shows a template's variables as the locals of its frames: the message
    is the one that a variable (its loop's, e.g. `message`) is, the innermost frame that has one deciding. It is looked
    up in the list the template was given (given_messages: the server's messages, one for one), not in the template's
    own `messages`, which a template may rebind: Llama 3.1's takes the system turn off (`messages[1:]`), this
    project's puts its default system turn in front (`[system] + messages`), and an index there named the message
    before or after the failing one, or none of the request's (a review, 2026-12-07). A message the template made
    itself is none of the request's. Only where the given list is not found is the template's `messages` read."""
    given = given_messages(e)
    index = None
    for tb in _template_frames(e):
        local = tb.tb_frame.f_locals
        messages = given if given is not None else local.get("messages")
        if not isinstance(messages, list):
            continue
        held = {i for name, value in local.items() if name != "messages" for i, m in enumerate(messages) if value is m}
        if len(held) == 1:
            index = held.pop()
    return index


def given_messages(e: BaseException) -> list | None:
    """The `messages` a chat template that raised `e` was given to render, as its traceback holds them (the jinja
    Context of the template's render call), or None. transformers hands the template a copy of the messages the server
    passed to apply_chat_template (render_jinja_template's _plain_template_data): the same messages in the same order,
    each a new object, so the template's variables are these, not the server's."""
    from jinja2.runtime import Context

    tb = e.__traceback__
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, Context) and isinstance(value.parent.get("messages"), list):
                return value.parent["messages"]
        tb = tb.tb_next
    return None


@dataclass(frozen=True)
class ModelLimits:
    """What a setting's range depends on: the model's vocabulary and context, in tokens (None: not known yet, as
    when request_problem reads the body before the model is at hand; the bound is then checked in `refusal`)."""
    vocab: int | None = None
    context: int | None = None
    new_tokens: int | None = None  # the request's length limit, in `refusal`


def _token_id(value, limits: ModelLimits) -> bool:
    return _integer(value) and value >= 0 and (limits.vocab is None or value < limits.vocab)


def _token_ids(value, limits: ModelLimits, empty: bool = True) -> bool:
    return isinstance(value, list) and (empty or bool(value)) and all(_token_id(v, limits) for v in value)


def _id_or_ids(value, limits: ModelLimits) -> bool:
    return _token_id(value, limits) or _token_ids(value, limits, empty=False)


def _length(low: int):
    return lambda v, limits: _integer(v) and low <= v and (limits.context is None or v <= limits.context)


def _between(low: float, high: float, low_open: bool = False, high_open: bool = False):
    return lambda v, limits: _number(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)


def _integer_from(low: int, high: int):
    return lambda v, limits: _integer(v) and low <= v <= high


_FLAG = ("true or false", lambda v, limits: isinstance(v, bool))


def _bad_words(value, limits: ModelLimits) -> bool:
    return isinstance(value, list) and bool(value) and all(_token_ids(w, limits, empty=False) for w in value)


def _sequence_bias(value, limits: ModelLimits) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(p, list) and len(p) == 2 and _token_ids(p[0], limits, empty=False) and isinstance(p[1], float)
        and -MAX_BIAS <= p[1] <= MAX_BIAS for p in value)


def _decay(value, limits: ModelLimits) -> bool:
    """exponential_decay_length_penalty's [start, factor]: the end-of-sequence logit grows by factor ** (new tokens
    past start), a Python float power that overflows (OverflowError in generation); kept within MAX_DECAY_GROWTH at the
    request's length limit (else the context)."""
    if not (isinstance(value, list) and len(value) == 2 and _integer(value[0]) and value[0] >= 0 and _number(value[1])
            and 1 < value[1] <= 10):
        return False
    reach = limits.new_tokens or limits.context
    return limits.context is None or (value[0] < limits.context and
                                      (reach - value[0]) * math.log(value[1]) <= math.log(MAX_DECAY_GROWTH))


WATERMARKING = {"greenlist_ratio": _between(0, 1, low_open=True, high_open=True), "bias": _between(-100, 100),
                "hashing_key": lambda v, limits: _integer(v) and 0 <= v < 2 ** 32,
                "seeding_scheme": lambda v, limits: v in ("lefthash", "selfhash"),
                "context_width": lambda v, limits: _integer(v) and 1 <= v <= 16}


def _watermarking(value, limits: ModelLimits) -> bool:
    return isinstance(value, dict) and all(k in WATERMARKING and WATERMARKING[k](v, limits) for k, v in value.items())


MAX_BEAMS = 16  # each beam is a sequence generated alongside the others: memory and time grow with it
MAX_TIME_S = 600  # the server answers one request at a time: a longer one holds every other behind it
# Multipliers and biases of the logits, kept where float32 logits stay finite at any accepted temperature: an
# infinite logit makes the sampling probabilities nan, and generation fails (repetition_penalty 1e-300, a bias 1e300)
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 100
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100
MAX_BIAS = 100  # OpenAI's logit_bias range
MAX_DECAY_GROWTH = 1e30  # exponential_decay_length_penalty's most growth of a logit: times a logit it stays a finite float32
# OpenAI's -2 to 2, where serve's repetition_penalty = 1 + frequency_penalty stays within MIN_REPETITION_PENALTY
MIN_FREQUENCY_PENALTY, MAX_FREQUENCY_PENALTY = MIN_REPETITION_PENALTY - 1, 2
MAX_LENGTH_PENALTY = 3
MAX_LOOKUP_TOKENS = 64  # prompt lookup's candidate tokens per step; more only costs (it was unbounded: 2**70 hung)
MAX_MATCHING_NGRAM = 16  # prompt lookup's n-gram: each step searches the prompt for it

# The generate() settings a request's `generation_config` field (transformers serve's JSON string of them) may set:
# what it must be, and whether a value is that, given the model's limits. Anything else is refused by name: generate()
# takes many more arguments, and some of those fail in generation only, or change the shared model for every later
# request (assistant_early_exit), or run for as long as their value asks (encoder_no_repeat_ngram_size 2**70).
ALLOWED_SETTINGS = {
    "max_new_tokens": ("an integer from 1 to the model's context", _length(1)),
    "max_length": ("an integer from 1 to the model's context", _length(1)),
    "min_new_tokens": ("an integer from 0 to the model's context", _length(0)),
    "min_length": ("an integer from 0 to the model's context", _length(0)),
    "do_sample": _FLAG,
    "use_cache": _FLAG,
    "low_memory": _FLAG,
    # below 0.001 the scaled logits overflow to inf (1e-300: "probability tensor contains inf, nan"); above 100 all is
    # noise; 0 is greedy decoding, as the top-level temperature's 0 (settings_as_sent turns do_sample off)
    "temperature": (f"0 (greedy) or a number from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}",
                    lambda v, limits: v == 0 or _between(MIN_TEMPERATURE, MAX_TEMPERATURE)(v, limits)),
    "top_k": ("an integer >= 0 (0: no top-k)", lambda v, limits: _integer(v) and v >= 0),
    "top_p": ("a number from 0 to 1", _between(0, 1)),
    "min_p": ("a number from 0 to 1", _between(0, 1)),
    "typical_p": ("a number > 0 and <= 1", _between(0, 1, low_open=True)),
    "epsilon_cutoff": ("a number >= 0 and < 1", _between(0, 1, high_open=True)),
    "eta_cutoff": ("a number >= 0 and < 1", _between(0, 1, high_open=True)),
    "repetition_penalty": (f"a number from {MIN_REPETITION_PENALTY} to {MAX_REPETITION_PENALTY} (1: none)",
                           _between(MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)),
    "no_repeat_ngram_size": ("an integer from 0 to the model's context", _length(0)),
    "num_beams": (f"an integer from 1 to {MAX_BEAMS}", _integer_from(1, MAX_BEAMS)),
    "num_return_sequences": (f"an integer from 1 to {MAX_BEAMS} (only the first is answered)",
                             _integer_from(1, MAX_BEAMS)),
    # beam search divides by length ** length_penalty: an integer 100 overflowed ("int too big to convert"), and
    # an integer 4 does at 2**16 tokens; within 3 it stays in range for any context up to 2**21 tokens
    "length_penalty": (f"a number from -{MAX_LENGTH_PENALTY} to {MAX_LENGTH_PENALTY}", _between(-MAX_LENGTH_PENALTY, MAX_LENGTH_PENALTY)),
    "early_stopping": ('true, false or "never"', lambda v, limits: isinstance(v, bool) or v == "never"),
    "bad_words_ids": ("a non-empty list of non-empty lists of token ids in the model's vocabulary, e.g. [[42], [7, 8]]", _bad_words),
    "sequence_bias": ("a non-empty list of [token ids, bias] pairs, the ids in the model's vocabulary and each bias a "
                      f"number from -{MAX_BIAS}.0 to {MAX_BIAS}.0 with a decimal point, e.g. [[[42], -5.0]]", _sequence_bias),
    "suppress_tokens": ("a list of token ids in the model's vocabulary", _token_ids),
    "begin_suppress_tokens": ("a list of token ids in the model's vocabulary", _token_ids),
    # an empty list adds no stop: sets_nothing leaves it out, and the model's own end-of-turn ids stop generation
    "eos_token_id": ("a token id in the model's vocabulary or a list of them ([]: only the model's own)", _id_or_ids),
    "forced_eos_token_id": ("a token id in the model's vocabulary or a non-empty list of them", _id_or_ids),
    "decoder_start_token_id": ("a token id in the model's vocabulary or a non-empty list of them", _id_or_ids),
    "forced_bos_token_id": ("a token id in the model's vocabulary", _token_id),
    "pad_token_id": ("a token id in the model's vocabulary", _token_id),
    "renormalize_logits": _FLAG,
    "remove_invalid_values": _FLAG,
    "max_time": (f"a number of seconds > 0 and <= {MAX_TIME_S}", _between(0, MAX_TIME_S, low_open=True)),
    "prompt_lookup_num_tokens": (f"an integer from 1 to {MAX_LOOKUP_TOKENS}",
                                 _integer_from(1, MAX_LOOKUP_TOKENS)),
    "max_matching_ngram_size": (f"an integer from 1 to {MAX_MATCHING_NGRAM}",  # prompt lookup's n-gram to match
                                _integer_from(1, MAX_MATCHING_NGRAM)),
    "bos_token_id": ("a token id in the model's vocabulary", _token_id),
    # only their neutral values: another guidance_scale runs the model twice per token (classifier-free guidance),
    # another diversity_penalty needs group beam search, which transformers 5 moved out of generate()
    "guidance_scale": ("1 (no guidance)", lambda v, limits: _number(v) and v == 1),
    "diversity_penalty": ("0 (no penalty)", lambda v, limits: _number(v) and v == 0),
    "exponential_decay_length_penalty": ("[start, factor]: start an integer >= 0 below the model's context, factor a number "
                                         f"> 1 and <= 10, with factor ** (the request's length limit - start) <= {MAX_DECAY_GROWTH:g} "
                                         "(lower the factor or the length limit)", _decay),
    # the two caches that run wherever the model does (offloaded ones need a GPU, paged and quantized another path)
    "cache_implementation": ('"dynamic" or "static"', lambda v, limits: v in ("dynamic", "static")),
    "watermarking_config": ("an object of watermarking settings: greenlist_ratio (> 0 and < 1), bias (a number from -100 "
                            'to 100), hashing_key (an integer from 0 to 2**32 - 1), seeding_scheme ("lefthash" or '
                            '"selfhash"), context_width (an integer from 1 to 16)', _watermarking),
    "stop_strings": ("a string or a list of strings", lambda v, limits: isinstance(v, str) or (
        isinstance(v, list) and all(isinstance(x, str) for x in v))),
}

# Refused with their own reason: the server writes the answer, and seeds generation from the top-level field
OUTPUT_SETTINGS = ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states")
REFUSED_BECAUSE = {
    **dict.fromkeys(OUTPUT_SETTINGS, "the server writes the answer itself (text, finish reason, usage) and returns no "
                                     "scores, logits, attentions or hidden states; leave it out"),
    "seed": 'set it as the request\'s top-level "seed" field (an integer from -2**63 to 2**64 - 1), not in generation_config',
    "trust_remote_code": "a request cannot run a repository's code",
}


# What a model's generation_config.json holds besides its settings (pasted in whole, they are left out)
IGNORED_SETTINGS = ("transformers_version", "_from_model_config")
# Settings whose value is a float in transformers' logits processors: a JSON 2 (JavaScript's 2.0) is an int there,
# and RepetitionPenaltyLogitsProcessor refused it ("has to be a strictly positive float, but is 2") in generation
FLOAT_SETTINGS = ("temperature", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
                  "length_penalty", "max_time", "guidance_scale", "diversity_penalty")


def sets_nothing(name: str, value: Any) -> bool:
    """A setting that leaves generation as it is: any null, a model's file's bookkeeping, a refused one set off, an
    empty eos_token_id list. generate() would put that list over the model's own end-of-sequence ids (transformers
    5.25: an IndexError without a pad token, else no end-of-turn stop at all); read as "no stop added", it is left out."""
    return (value is None or name in IGNORED_SETTINGS or (name in REFUSED_BECAUSE and name != "seed" and not value)
            or (name == "eos_token_id" and value == []))


def settings_as_sent(settings: dict) -> dict:
    """A request's generation_config (checked by generation_config_problem) as generate() is to get it: what sets
    nothing left out, JSON integers of float settings as floats, and a temperature of 0 read as greedy decoding, as
    serve reads the top-level temperature's 0."""
    sent = {name: float(value) if name in FLOAT_SETTINGS and _integer(value) else value
            for name, value in settings.items() if not sets_nothing(name, value)}
    if "exponential_decay_length_penalty" in sent:  # an integer factor's power is an int: unbounded, then no float
        start, factor = sent["exponential_decay_length_penalty"]
        sent["exponential_decay_length_penalty"] = [start, float(factor)]
    if sent.get("temperature") == 0:
        sent["do_sample"] = False
    return sent


def setting_problem(name: str, value: Any, limits: ModelLimits = ModelLimits()) -> str | None:
    """What is wrong with one `generation_config` setting (what sets nothing is left alone: sets_nothing), else None."""
    if sets_nothing(name, value):
        return None
    if name in REFUSED_BECAUSE:
        return f"generation_config's {name} is not accepted: {REFUSED_BECAUSE[name]}"
    if name not in ALLOWED_SETTINGS:
        return f"generation_config's {name} is not accepted; README's serve-model section lists what is"
    want, fits = ALLOWED_SETTINGS[name]
    if fits(value, limits):
        return None
    vocab = f" (the vocabulary has {limits.vocab} tokens, ids 0 to {limits.vocab - 1})" if limits.vocab and "token id" in want else ""
    context = f" ({limits.context} tokens)" if limits.context and "model's context" in want else ""
    return f"generation_config's {name} must be {want}{vocab}{context}, got {preview(value, 60)}"


def merged_settings_problem(model_defaults, settings, asked: dict) -> str | None:
    """transformers' own refusal of the settings generation will run with, else None. `settings`: what serve's builder
    made of the request (its generation_config, and its top-level fields: a temperature of 0 turns sampling off,
    above 0 the layer turns it on); `model_defaults`: the model's generation config, under them; `asked`: the
    request's generation_config. They are merged as generate() merges them (merged_generation_config) and validated
    as it validates them (validate(): a ValueError for what it cannot run; bad_words_ids and sequence_bias only in
    their logits processors). The message names the request's settings transformers names (both, when they clash)."""
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor, SequenceBiasLogitsProcessor

    try:
        config = merged_generation_config(model_defaults, settings)
        config.validate()
        if config.bad_words_ids is not None:
            NoBadWordsLogitsProcessor(config.bad_words_ids)
        if config.sequence_bias is not None:
            SequenceBiasLogitsProcessor(config.sequence_bias)
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        return transformers_refusal(e, asked)
    return None


def transformers_refusal(error: Exception, asked: dict, read: str = "merged with the request's temperature and the "
                         "model's own settings") -> str:
    """transformers' refusal of the request's generation_config `asked`, on one line, naming the settings it names;
    `read`: what transformers saw."""
    text = " ".join(str(error).split())
    named = [name for name in asked if f"`{name}`" in text or f" {name} " in f" {text} "] or list(asked)
    if asked.get("do_sample") is True and "do_sample" in text:
        text += " (the request's temperature of 0 turns do_sample off)"
    return f"generation_config's {', '.join(named) or 'settings'} refused by transformers ({read}): {text}"


class ToolsNotRendered(Exception):
    """The model's chat template rendered the request's `tools` (or its turns' tool calls) as nothing: a 400 naming
    `param`."""

    def __init__(self, message: str, param: str = "tools") -> None:
        super().__init__(message)
        self.param = param


# What rendered_with_tools_checked asks the chat template with in place of a request's tool calls and tools: another
# call, another tool. A template that renders them renders these otherwise; one that does not renders the same prompt.
CHANGED_CALL = {"name": "zz_changed_call", "arguments": {"zz_changed_argument": "zz changed value"}}
SENTINEL_TOOLS = [{"type": "function", "function": {"name": "zz_sentinel_tool", "description": "zz sentinel tool",
                                                     "parameters": {"type": "object", "properties": {"zz_sentinel_argument": {"type": "string"}}}}}]


def with_tool_calls_changed(messages: list[dict], names: bool = True) -> list[dict]:
    """`messages` with each turn's tool calls changed to another call (CHANGED_CALL's name, unless not `names`, and
    arguments; the call's id kept, which templates check the form of, and which alone is no rendering of the call): a
    template that renders tool calls renders another prompt, one that does not renders the same. Not left out: a
    template may read tool_calls only to refuse a turn without them (Mistral's) and render the content alone, which
    read as rendering them (a review, 2026-12-07). Not `names`: the arguments alone change,
    rendered_with_tools_checked's first ask, so a template that renders the names and refuses a call of a function it
    was not given is read aright."""
    def changed(call: Any) -> Any:
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            return call
        arguments = CHANGED_CALL["arguments"]
        return {**call, "function": {**call["function"], **({"name": CHANGED_CALL["name"]} if names else {}),
                                     "arguments": json.dumps(arguments) if isinstance(call["function"].get("arguments"), str) else arguments}}

    return [{**m, "tool_calls": [changed(c) for c in m["tool_calls"]]} if isinstance(m, dict) and isinstance(m.get("tool_calls"), list)
            and m["tool_calls"] else m for m in messages]


def with_tools_described_otherwise(tools: list) -> list:
    """`tools` with each one's description and parameters changed to SENTINEL_TOOLS' (its name kept): what
    rendered_with_tools_checked asks with first, so a template that renders the names and refuses a tool it does not
    know by name is read aright (SENTINEL_TOOLS, the names changed, second). A chat tool holds them in its `function`,
    a Responses one may be flat."""
    sentinel = {k: SENTINEL_TOOLS[0]["function"][k] for k in ("description", "parameters")}

    def changed(tool: Any) -> Any:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            return {**tool, "function": {**tool["function"], **sentinel}}
        return {**tool, **sentinel} if isinstance(tool, dict) else tool

    return [changed(tool) for tool in tools]


def rendered_with_tools_checked(kind: str, render, messages: list, tools: Any):
    """The chat template's rendering of a `kind` request's `messages` with its `tools` (`render(messages, tools)`, as
    the installed transformers serve renders them), refusing tools or tool calls the template leaves out (a 400,
    ToolsNotRendered): transformers hands them to any template, and one that does not read them (the tiny run's)
    rendered the prompt as without them, so the model was asked to answer with no tool to call, or saw an empty turn
    in place of its own call, with a 200 (reviews, 2026-12-06)."""
    inputs = render(messages, tools)

    def same_prompt(changes: list[tuple[list, Any]], what: str) -> bool:
        """Whether the request rendered with its tools (or its tool calls, `what`) changed to others, each of `changes`
        (messages, tools) in turn, is the same prompt every time: the template does not render them. Changed, not left
        out: a template may read what is left out only to refuse a rendering without it (Mistral's refuses an
        assistant turn with neither content nor tool calls) and render something else (a review, 2026-12-07). A change
        the template refuses (a call of a function, a tool, it does not know by name) shows it reads what was changed:
        rendered, as another prompt is. The first change keeps the names, so a template that renders the names and
        refuses an unknown one is not read as rendering nothing, and the names change last (a review of
        server-fixes-6, 2026-12-07). Only a failure that is not the template's tells nothing: where no change decides,
        they are taken as rendered, and the log says the check could not tell."""
        failed = None
        for changed, changed_tools in changes:
            try:
                other = render(changed, changed_tools)
            except Exception as e:
                if raised_by_template(e):
                    return False
                failed = failed or e
                continue
            if _token_list(inputs) != _token_list(other):
                return False
        if failed is None:
            return True
        log_render_check_undecided(kind, what, failed)
        return False

    if tools and same_prompt([(messages, with_tools_described_otherwise(tools)), (messages, SENTINEL_TOOLS)], "tools"):
        raise ToolsNotRendered("tools are not supported by this model: its chat template renders no tools (the prompt is "
                               "the same with other tools), so the model would never see them; leave tools out, or "
                               "serve a model whose chat template renders tools")
    if any(isinstance(m, dict) and m.get("tool_calls") for m in messages) and \
            same_prompt([(with_tool_calls_changed(messages, names=False), tools), (with_tool_calls_changed(messages), tools)], "tool calls"):
        # the tiny run's template renders an assistant turn's content only: a tool call in the history (chat
        # tool_calls, a Responses function_call item) was an empty turn, with a 200 (a review, 2026-12-06)
        where = "messages" if kind == "chat" else "input"
        raise ToolsNotRendered(f"{where} {'hold' if kind == 'chat' else 'holds'} a tool call (an assistant turn's tool_calls{' or function_call' if kind == 'chat' else ', a function_call item'}) "
                               "this model's chat template does not render: the model would see an empty turn "
                               "in its place; send the call and its result as text, or serve a model whose "
                               "chat template renders tool calls", where)
    return inputs


def processor_checking_tools(kind: str, processor):
    """`processor` for one `kind` request of transformers <= 5.24's serve (5.17's), whose handle_request renders the
    request with `processor.apply_chat_template(messages, tools=..., ...)` itself (5.25 has render_messages): a
    shallow copy whose apply_chat_template is rendered_with_tools_checked, the same arguments but the messages and
    tools kept for each rendering. A copy, not a wrapper: serve asks isinstance(processor, PreTrainedTokenizerBase)
    (get_model_modality); and not the shared processor changed, which every request and the model's own use reach.
    Hooked where 5.25's method alone was, the check never ran on 5.17: tools and tool calls the template leaves out
    were answered with a 200 (a helper's finding, 2026-12-07)."""
    import copy

    plain = processor.apply_chat_template
    checking = copy.copy(processor)

    def apply_chat_template(conversation, *args, tools=None, **kwargs):
        return rendered_with_tools_checked(kind, lambda m, t: plain(m, *args, tools=t, **kwargs), conversation, tools)

    checking.apply_chat_template = apply_chat_template
    return checking


def _token_list(inputs) -> list:
    ids = inputs["input_ids"]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class SettingsRefused(ValueError):
    """transformers <= 5.24's serve refused the request's settings as it built their GenerationConfig."""


def merged_generation_config(model_defaults, settings):
    """The GenerationConfig generate() runs with: transformers 5.25's serve hands generate() keyword settings, which
    it puts over a copy of the model's generation config (`update`, values of None left out, as GenerateRunner does);
    transformers <= 5.24's serve builds the GenerationConfig itself (`settings` is one)."""
    import copy

    from transformers import GenerationConfig

    if isinstance(settings, GenerationConfig):
        return copy.deepcopy(settings)
    config = copy.deepcopy(model_defaults) if model_defaults is not None else GenerationConfig()
    config.update(**{k: v for k, v in settings.items() if v is not None and k != "seed"})
    return config


def generation_config_problem(raw: Any, limits: ModelLimits = ModelLimits()) -> tuple[str, str] | None:
    """(message, field) for a request's `generation_config` (transformers serve's JSON string of generate() settings)
    that holds no JSON object, or sets a setting this server does not accept or to a value out of its range
    (setting_problem; the bounds that need the model's vocabulary or context only when `limits` has them), else None."""
    example = json.dumps(json.dumps({"num_beams": 3}))
    if raw is None:
        return None
    if not isinstance(raw, str):
        return (f"generation_config must be a string holding a JSON object of generate() settings, e.g. {example}, "
                f"got {type(raw).__name__} {raw!r:.40}"), "generation_config"
    try:
        settings = strict_json(raw)
    except ValueError as e:
        return f"generation_config must hold a JSON object of generate() settings, e.g. {example}: {e}", "generation_config"
    except JsonTooDeep:
        return nested_too_deeply("generation_config", f"send a JSON object of generate() settings, e.g. {example}", f"{raw!r:.40}"), "generation_config"
    if not isinstance(settings, dict):
        return (f"generation_config must hold a JSON object of generate() settings, e.g. {example}, "
                f"got {type(settings).__name__} {settings!r:.40}"), "generation_config"
    for name, value in settings.items():
        problem = setting_problem(name, value, limits)
        if problem:
            return problem, "generation_config"
    problem = no_token_left(settings, limits.vocab)
    return (problem, "generation_config") if problem else None


def no_token_left(settings: dict, vocab: int | None) -> str | None:
    """Settings (each in range) that together forbid every token of the vocabulary at some step: sampling's
    probabilities are then nan, and generation fails ("probability tensor contains either inf, nan")."""
    if not vocab:
        return None
    forbidding = {"suppress_tokens": settings.get("suppress_tokens") or [],
                  "begin_suppress_tokens": settings.get("begin_suppress_tokens") or [],
                  "bad_words_ids": [w[0] for w in settings.get("bad_words_ids") or [] if len(w) == 1]}
    if settings.get("min_new_tokens") or settings.get("min_length"):  # the end-of-sequence ids are forbidden until then
        eos = settings.get("eos_token_id")
        forbidding["eos_token_id"] = [eos] if isinstance(eos, int) else eos or []
    if len(set().union(*forbidding.values())) < vocab:
        return None
    named = [name for name in ("min_new_tokens", "min_length") if "eos_token_id" in forbidding and settings.get(name)]
    named += [name for name, ids in forbidding.items() if ids]
    return f"generation_config's {', '.join(named)} forbid every token of the model's vocabulary ({vocab} tokens): leave some to generate"


def _asks_for_text(value: Any) -> bool:
    return isinstance(value, dict) and value.get("type") == "text"


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(x, str) for x in value)


def _one_of(*values: str):
    return lambda v, body: isinstance(v, str) and v in values


def _shows_tools(body: dict) -> bool:
    """Whether the request's tools (or functions) reach the model: sent, and tool_choice (function_call) not "none"."""
    return bool(body.get("tools") or body.get("functions")) and "none" not in (body.get("tool_choice"), body.get("function_call"))


@dataclass(frozen=True)
class Unanswerable:
    """A request field this server cannot honour (transformers serve ignores it, or the model has no such ability):
    the type OpenAI's API gives it, and the values that ask for nothing more than the plain answer served. A value of
    another type is a 400 naming the type (`"logprobs": "auto"` was taken as false, with a 200); a value of its type
    that asks for more is a 400 saying `why` (it was answered as if not sent). null is never sent."""

    expected: str  # its type, as the 400 says it
    typed: Any  # (value, body) -> whether the value is of that type
    answered: str  # the values that ask for nothing more, as the 400 says them
    as_answered: Any  # (value, body) -> whether the value asks for nothing more
    why: str = ""  # why another value cannot be answered; "" = serve ignores the field


_BOOL = lambda v, body: isinstance(v, bool)  # noqa: E731
_OBJECT = lambda v, body: isinstance(v, dict)  # noqa: E731
_NEVER = lambda v, body: False  # noqa: E731
_ALWAYS = lambda v, body: True  # noqa: E731
_TOOL_CHOICE = lambda v, body: v in ("none", "auto", "required") or isinstance(v, dict)  # noqa: E731
_AUTO_OR_NONE = lambda v, body: v in ("auto", "none")  # noqa: E731  "none": served without the tools (tools_left_out)
_NO_MORE_THAN_ONE_CALL = ("this server cannot hold the model to one tool call (its chat template does not say so and "
                          "generation does not enforce it)")
_REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# OpenAI's Responses `include` values (its API reference; the openai package's ResponseIncludable): only encrypted
# reasoning has nothing to include here (the model does no reasoning), as a stateless client (store false) asks for it;
# each other one asks for output this server does not give (log probabilities, tool results, image URLs)
INCLUDE_NOTHING_TO_ADD = ("reasoning.encrypted_content",)

# Fields transformers serve lists as unused (UNUSED_*_FIELDS in transformers/cli/serving), and those it reads but
# cannot honour, each with its type and the values that ask for nothing more than its answer already is; any other
# value asked for an answer of another meaning or shape (JSON, a tool call, log probabilities, the echoed prompt,
# audio, a web search, reasoning) and got plain text, with a 200 (reviews, 2026-12-06).
IGNORED_FIELDS = {
    "chat": {"response_format": Unanswerable("an object", _OBJECT, '{"type": "text"}', lambda v, body: v == {} or _asks_for_text(v)),
             "tool_choice": Unanswerable('"none", "auto", "required" or an object', _TOOL_CHOICE, '"auto" or "none"', _AUTO_OR_NONE),
             "functions": Unanswerable("a list of functions", lambda v, body: isinstance(v, list), "nothing (send `tools` instead)",
                                       lambda v, body: v == [] or body.get("function_call") == "none"),
             "function_call": Unanswerable('"none", "auto" or an object', _TOOL_CHOICE, '"auto" or "none" (send `tools` instead)', _AUTO_OR_NONE),
             "logprobs": Unanswerable("true or false", _BOOL, "false", lambda v, body: v is False),
             "top_logprobs": Unanswerable("an integer", lambda v, body: _integer(v), "0", lambda v, body: v == 0),
             "modalities": Unanswerable("a list of strings", lambda v, body: _strings(v), '["text"]', lambda v, body: v in ([], ["text"])),
             "audio": Unanswerable("an object", _OBJECT, "nothing", _NEVER),
             "presence_penalty": Unanswerable("a number", lambda v, body: _number(v), "0 (frequency_penalty is applied)", lambda v, body: v == 0),
             "parallel_tool_calls": Unanswerable("true or false", _BOOL, "true", lambda v, body: v is True or not _shows_tools(body), _NO_MORE_THAN_ONE_CALL),
             "web_search_options": Unanswerable("an object", _OBJECT, "nothing", _NEVER,
                                                "this server has no web search (the model would answer from its weights alone, as if searching found nothing)"),
             # serve ignores both reasoning fields; the pipeline's models do no reasoning: only "none" is what they answer
             "reasoning_effort": Unanswerable(" or ".join(f'"{e}"' for e in _REASONING_EFFORTS), _one_of(*_REASONING_EFFORTS), '"none"',
                                              lambda v, body: v == "none"),
             # a prediction only speeds generation up (OpenAI's Predicted Outputs): the answer is the same without it
             "prediction": Unanswerable('an object such as {"type": "content", "content": ...}', lambda v, body: isinstance(v, dict) and v.get("type") == "content",
                                        "anything", _ALWAYS),
             "verbosity": Unanswerable('"low", "medium" or "high"', _one_of("low", "medium", "high"), '"medium"', lambda v, body: v == "medium")},
    "completion": {"echo": Unanswerable("true or false", _BOOL, "false", lambda v, body: v is False),
                   "logprobs": Unanswerable("an integer", lambda v, body: _integer(v), "nothing", _NEVER),
                   "presence_penalty": Unanswerable("a number", lambda v, body: _number(v), "0 (frequency_penalty is applied)", lambda v, body: v == 0)},
    "response": {"text": Unanswerable("an object", _OBJECT, '{"format": {"type": "text"}}',
                                      lambda v, body: set(v) <= {"format", "verbosity"} and (v.get("format") is None or _asks_for_text(v.get("format")))
                                      and v.get("verbosity") in (None, "medium")),
                 "tool_choice": Unanswerable('"none", "auto", "required" or an object', _TOOL_CHOICE, '"auto" or "none"', _AUTO_OR_NONE),
                 "top_logprobs": Unanswerable("an integer", lambda v, body: _integer(v), "0", lambda v, body: v == 0),
                 "include": Unanswerable("a list of strings", lambda v, body: _strings(v), f"only {json.dumps(list(INCLUDE_NOTHING_TO_ADD))}",
                                         lambda v, body: set(v) <= set(INCLUDE_NOTHING_TO_ADD)),
                 "conversation": Unanswerable("a string or an object", lambda v, body: isinstance(v, (str, dict)),
                                              "nothing (send the whole conversation in `input`)", _NEVER,
                                              "this server keeps no conversation history (transformers serve stores none)"),
                 "prompt": Unanswerable("an object", _OBJECT, "nothing (send the prompt's text in `instructions` and `input`)", _NEVER),
                 "background": Unanswerable("true or false", _BOOL, "false (answers are given as the request waits)", lambda v, body: v is False),
                 "parallel_tool_calls": Unanswerable("true or false", _BOOL, "true", lambda v, body: v is True or not _shows_tools(body), _NO_MORE_THAN_ONE_CALL),
                 "reasoning": Unanswerable("an object", _OBJECT, '{"effort": "none"}', lambda v, body: v.get("effort") in (None, "none")),
                 # limits calls to OpenAI's built-in tools, which this server refuses (tools_problem): nothing to limit
                 "max_tool_calls": Unanswerable("an integer >= 1", lambda v, body: _integer(v) and v >= 1, "anything", _ALWAYS),
                 # "auto" drops input items that do not fit the context; an input that fits is answered as asked, and one
                 # that does not is refused naming truncation (answer_as_openai_does' refusal)
                 "truncation": Unanswerable('"auto" or "disabled"', _one_of("auto", "disabled"), "anything", _ALWAYS)},
}


def tools_problem(kind: str, tools: Any, shown: bool = True) -> tuple[str, str] | None:
    """(message, field) for `tools` that are no list of function tools, else None: transformers serve's
    _normalize_tools calls .items() on each, so a string or an object was a 500 and a traceback, a list of numbers a
    400 naming no field, and a tool with no function reached the chat template as an unnamed one (a review,
    2026-12-06). A chat tool is {"type": "function", "function": {"name": ...}}; a Responses one may be flat,
    {"type": "function", "name": ...}. Tools that are not `shown` (tool_choice "none": tools_left_out serves the
    request without them) need only be a list of tools, each with a "type": OpenAI's built-in ones ({"type":
    "web_search"}) included, which were a 400 on tools[0] although none of them would reach the model (a review)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        return f"tools must be a list of function tools, got {type(tools).__name__} {preview(tools, 40)}", "tools"
    if not shown:
        bad = next((i for i, tool in enumerate(tools) if not (isinstance(tool, dict) and isinstance(tool.get("type"), str))), None)
        return None if bad is None else (f"tools[{bad}] must be a tool with a \"type\", e.g. {{\"type\": \"function\", ...}}, "
                                         f"got {preview(tools[bad], 60)}", f"tools[{bad}]")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        flat = kind == "response" and isinstance(tool, dict) and function is None and isinstance(tool.get("name"), str)
        if not isinstance(tool, dict) or tool.get("type") != "function" or not (named or flat):
            example = ('{"type": "function", "name": "get_weather", "parameters": {...}}' if kind == "response" else
                       '{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}')
            return (f"tools[{i}] must be a function tool with a name, e.g. {example} (this server runs function tools "
                    f"only), got {preview(tool, 60)}"), f"tools[{i}]"
    return None


LEGACY_TOOL_FIELDS = {"functions": "tools", "function_call": "tool_choice"}  # the chat API's deprecated names, and their successors


def legacy_functions_problem(body: dict) -> tuple[str, str] | None:
    """(message, field) for a chat request that mixes the deprecated `functions` / `function_call` with `tools` /
    `tool_choice`, else None. OpenAI's API refuses functions with tools (a 400: "functions" and "tools" cannot both be
    provided); its reference gives no precedence between function_call and tool_choice. Here one mix was answered with
    the tools silently dropped (tools + function_call "none"), another refused as unsupported functions (functions +
    tool_choice "none"; a review, 2026-12-06): any mix is now a 400 naming both fields, as OpenAI's refusal does."""
    legacy = [f for f in LEGACY_TOOL_FIELDS if body.get(f) is not None]
    current = [f for f in LEGACY_TOOL_FIELDS.values() if body.get(f) is not None]
    if not legacy or not current:
        return None
    return (f"{legacy[0]} and {current[0]} cannot both be sent: {', '.join(legacy)} "
            f"{'is the deprecated form' if len(legacy) == 1 else 'are the deprecated forms'} of tools / tool_choice; "
            f"send tools with tool_choice (or functions with function_call), not a mix"), legacy[0]


# Fields that change nothing in the answer's text but are read as their type: `"stream": "false"` (a string) streamed
FIELD_TYPES = {"stream": ("true or false", bool), "store": ("true or false", bool), "stream_options": ("an object", dict),
               "metadata": ("an object", dict), "user": ("a string", str), "service_tier": ("a string", str),
               "safety_identifier": ("a string", str), "prompt_cache_key": ("a string", str),
               # serve's own (chat): "x" was a 400 naming no field ("TypeError: 'str' object is not a mapping")
               "chat_template_kwargs": ("an object", dict)}


# The chat template's arguments serve sets itself (BaseHandler.render_messages, apply_chat_template and the template's
# own render call), and what the request holds in their place: one in chat_template_kwargs was a TypeError ("got
# multiple values for keyword argument"), a 400 naming nothing (a review, 2026-12-06), or would have replaced the
# conversation. Others (chat_template, enable_thinking, a template's own switches) are the template's to read.
SERVED_TEMPLATE_ARGUMENTS = {
    "conversation": "the request's messages", "messages": "the request's messages", "tools": "the request's tools",
    "documents": "nothing (this server sends no documents)", "add_generation_prompt": "true: the answer is a new assistant turn",
    "continue_final_message": "false: the answer is a new assistant turn", "tokenize": "true", "return_tensors": "the server's",
    "return_dict": "true", "return_assistant_tokens_mask": "false", "tokenizer_kwargs": "the server's",
    "padding": "none: one prompt per request", "truncation": "none: a prompt too long is refused, never cut",
    "max_length": "none: the model's context is the limit", "load_audio_from_video": "the server's"}


def chat_template_kwargs_problem(kwargs: Any) -> tuple[str, str] | None:
    """(message, field) for chat_template_kwargs naming an argument of the chat template this server sets itself
    (SERVED_TEMPLATE_ARGUMENTS), else None."""
    clash = [k for k in (kwargs or {}) if k in SERVED_TEMPLATE_ARGUMENTS]
    if not clash:
        return None
    key = clash[0]
    where = {"conversation": "messages", "messages": "messages", "tools": "tools"}.get(key)
    fix = f"send it in the request's {where} instead" if where else "leave it out"
    return (f"chat_template_kwargs.{key} is set by this server itself ({SERVED_TEMPLATE_ARGUMENTS[key]}), not by a request; "
            f"{fix}" + (f" (also set by the server: {', '.join(clash[1:])})" if clash[1:] else "")), f"chat_template_kwargs.{key}"


def shown_value(value: Any) -> str:
    """`value`'s JSON type and its start, for a message; an integer beyond a float (10**400), which a number field
    refuses, as its size: "must be a number, got int 1000..." read as refusing a number (a review, 2026-12-07)."""
    if isinstance(value, int) and not isinstance(value, bool) and not _number(value):
        return f"an integer of {len(str(abs(value)))} digits, beyond what a 64-bit float holds"
    return f"{type(value).__name__} {preview(value, 60)}"


def ignored_field_problem(kind: str, body: dict) -> tuple[str, str] | None:
    """(message, field) for a field this server cannot honour (IGNORED_FIELDS) sent with a value of another type than
    OpenAI's API gives it, or one that asks for another answer than the one served, else None."""
    for field, (expected, kind_of) in FIELD_TYPES.items():
        value = body.get(field)
        if value is not None and (not isinstance(value, kind_of) or (kind_of is not bool and isinstance(value, bool))):
            return f"{field} must be {expected}, got {type(value).__name__} {preview(value, 60)}", field
    problem = chat_template_kwargs_problem(body.get("chat_template_kwargs"))
    if problem:
        return problem
    for field, spec in IGNORED_FIELDS[kind].items():
        value = body.get(field)
        if value is None:
            continue
        if not spec.typed(value, body):
            return f"{field} must be {spec.expected}, got {shown_value(value)}", field
        if not spec.as_answered(value, body):
            why = spec.why or f"this server (transformers serve) ignores {field} and would answer plain text as if it were not sent"
            return f"{field} {preview(value, 60)} is not supported: {why}; leave {field} out, or send {spec.answered}", field
    return None


def nulls_left_out(body: dict) -> dict:
    """The request without its fields sent as null: OpenAI's API reads null as not sent (the openai package sends it for
    a keyword given None). serve read some as their value: Responses `"parallel_tool_calls": null` went into its
    Response object, a 400 naming no field ("malformed request: ValidationError"), and streamed, a 200 with an empty
    stream and a traceback (a review of served-fields). request_problem reads null as not sent already."""
    return {k: v for k, v in body.items() if v is not None}


def tools_left_out(body: dict) -> dict:
    """The request without its tools (and the older functions) when tool_choice (function_call) is "none": OpenAI's
    model then sees no tool to call and answers with a message. transformers serve ignores tool_choice: it showed the
    model the tools, and parsed a tool call from its answer (a 400 here before; LangChain sends "none" with its
    tools). Without them the chat template renders none, and response_template_as_served keeps any call-like
    text of the answer as its text. Any other request is returned as it is."""
    if "none" not in (body.get("tool_choice"), body.get("function_call")):
        return body
    return {k: v for k, v in body.items() if k not in ("tools", "functions")}


def template_keeping_whitespace(template: dict | None) -> dict | None:
    """A transformers response template whose text fields (the answer's text, its reasoning) keep their leading and
    trailing whitespace: the whole-answer parser strips each text field by default (its `text` content parser), the
    stream parser sends the text as it comes, so a non-streamed answer lost the whitespace a streamed one kept (a
    review, 2026-12-06). Read this way, a non-streamed answer is its stream's text, joined.

    Only a template whose one field is the text: one with other regions (reasoning, tool calls) writes whitespace
    between them that is its markup, not the answer's, and that the strip is there to drop. Kept, Qwen 3's and 3.5's
    answers (their fallback templates) came with reasoning_content "\n\n" when thinking was off (the prompt's
    "<think>\n\n</think>\n\n") and content opening with "\n\n" (a second review, 2026-12-06)."""
    if not isinstance(template, dict) or not isinstance(template.get("fields"), dict) or len(template["fields"]) != 1:
        return template
    fields = {name: {**field, "content_args": {**(field.get("content_args") or {}), "strip": False}}
              if isinstance(field, dict) and field.get("content", "text") == "text" else field
              for name, field in template["fields"].items()}
    return {**template, "fields": fields}


def template_reasoning_as_read(template: dict | None) -> dict | None:
    """A transformers response template whose reasoning field has the name this transformers' serve reads reasoning
    under. 5.25 reads `reasoning_content` (its fallbacks' name, and the one it asks templates for) and `thinking`
    (Hub templates that still use it); 5.17 reads `thinking` alone: a tokenizer's own template naming its reasoning
    `reasoning_content` had its reasoning dropped there, from the answer (parse_assistant_message) and from the
    stream (response_events_to_chunks) alike. On 5.17 that field is read as `thinking`, which its handlers answer as
    reasoning_content, as 5.25's do."""
    from transformers.cli.serving import utils

    fields = template.get("fields") if isinstance(template, dict) else None
    if hasattr(utils, "_REASONING_FIELDS") or not isinstance(fields, dict) or "reasoning_content" not in fields or "thinking" in fields:
        return template
    return {**template, "fields": {("thinking" if name == "reasoning_content" else name): field for name, field in fields.items()}}


def template_without_tool_calls(template: dict | None) -> dict | None:
    """A transformers response template (what serve parses an answer's reasoning, tool calls and text with) that
    reads no tool calls: the text a call's markup spans is the answer's text."""
    if not isinstance(template, dict) or "tool_calls" not in (template.get("fields") or {}):
        return template
    return {**template, "fields": {k: v for k, v in template["fields"].items() if k != "tool_calls"}}


API_NAMES = {"chat": "chat completions", "completion": "completions", "response": "Responses"}
LAYER_FIELDS = {"response": ("stop", "logit_bias")}  # taken out of a Responses request before serve reads it (answer_as_openai_does)


@functools.cache
def known_fields(kind: str) -> frozenset[str] | None:
    """The fields a request to the `kind` endpoint may hold: those of OpenAI's API that transformers serve's params
    class has, its own (generation_config, seed, ...) and this server's (LAYER_FIELDS); None when the installed
    transformers names none (its handler then checks the fields itself)."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler

    handler = {"chat": ChatCompletionHandler, "completion": CompletionHandler, "response": ResponseHandler}[kind]
    keys = getattr(getattr(handler, "_valid_params_class", None), "__mutable_keys__", None)
    return frozenset(keys) | frozenset(LAYER_FIELDS.get(kind, ())) if keys else None


def unknown_field_problem(kind: str, body: dict) -> tuple[str, str] | None:
    """(message, field) for the first field of `body` the `kind` endpoint does not know, else None: serve's own check
    was a 400 whose message was a Python set and whose param was null (a review, 2026-12-06)."""
    known = known_fields(kind)
    unknown = sorted(f for f in body if known is not None and f not in known)
    if not unknown:
        return None
    field = unknown[0]
    return (f"{field} is not a field of the {API_NAMES[kind]} API on this server (OpenAI's fields, and generation_config "
            f"and seed); check its spelling, or leave {field} out" + (f" (also unknown: {', '.join(unknown[1:4])})" if unknown[1:] else "")), field


MAX_TOKEN_ID_DIGITS = 10  # a logit_bias key's digits, at most: no vocabulary has 10**10 tokens


def unsupported_field_problem(kind: str, body: dict) -> tuple[str, str] | None:
    """(message, field) for a field of `body` this server does not support as sent, read at its top level (cheap
    whatever the field holds), else None: previous_response_id, the deprecated functions mixed with tools, a field
    serve ignores or cannot honour (ignored_field_problem)."""
    if kind == "response" and body.get("previous_response_id") is not None:
        # serve lists it unused: the follow-up was answered without its history
        return ("previous_response_id is not supported: this server keeps no conversation history (transformers serve "
                "ignores the field); send the whole conversation in `input` (each item with its role), without "
                "previous_response_id"), "previous_response_id"
    return (legacy_functions_problem(body) if kind == "chat" else None) or ignored_field_problem(kind, body)


def request_problem(kind: str, body: dict) -> tuple[str, str] | None:
    """(message, field) for a request to the `kind` endpoint that transformers serve would answer with a 500 and a
    traceback (or a FastAPI 422), or would answer otherwise than asked (`n` > 1), else None."""
    found = json_findings(body, depth=0)  # one walk of the whole body (a loop: no size or nesting makes it recurse)
    # The fields' own refusals before the nesting: a response_format (a JSON schema) both unsupported and nested beyond
    # MAX_JSON_DEPTH was told to send it flatter, then refused for the field (a review, 2026-12-07). These read each
    # field at its top level only and quote it by preview, encoded no deeper than a message shows.
    problem = unencodable_text_problem(found) or unknown_field_problem(kind, body) or unsupported_field_problem(kind, body) or \
        nested_too_deeply_problem(found) or not_finite_problem(found)
    if problem:
        return problem
    if body.get("stream_options") is not None and not body.get("stream"):
        # OpenAI's API refuses it ("only allowed when stream is true"); serve read it in a stream only, so a client
        # asking for a stream's usage chunk (include_usage) with stream false got a 200 whose stream it never asked for
        return ("stream_options is only allowed when stream is true: send \"stream\": true for a streamed answer, or leave "
                "stream_options out (a whole answer carries its usage)"), "stream_options"
    if kind == "chat":
        problem = chat_messages_problem(body.get("messages"))
        if problem:
            return problem
    elif kind == "completion":
        prompt = one_prompt(body.get("prompt"))
        if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) for p in prompt):
            return (f"prompt holds {len(prompt)} prompts: this server answers one prompt per request; send each in a "
                    "request of its own"), "prompt"
        if not isinstance(prompt, str) or not prompt:
            return (f"prompt must be a non-empty string, or a list of one (one prompt per request; token ids are not "
                    f"read: send the text), got {type(prompt).__name__} {str(prompt)[:40]!r}"), "prompt"
        if not isinstance(body.get("suffix"), (str, type(None))):
            return f"suffix must be a string, got {body['suffix']!r:.40}", "suffix"
    else:
        problem = input_problem(body.get("input"))
        if problem:
            return problem
        if not isinstance(body.get("instructions"), (str, type(None))):
            return f"instructions must be a string, got {body['instructions']!r:.40}", "instructions"
    problem = tools_problem(kind, body.get("tools"), _shows_tools(body)) if kind != "completion" else None
    if problem:
        return problem
    for field in ("n", "best_of"):  # transformers serve ignored both and answered one choice
        value = body.get(field)
        if value is not None and (isinstance(value, bool) or value != 1):
            return f"{field} must be 1: this server answers one choice per request, got {value!r:.40}; leave {field} out and send the request again for another answer", field
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):  # chat, completions, responses
        value = body.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{field} must be an integer >= 1, got {value!r}", field
    bias = body.get("logit_bias")
    if bias is not None and not (isinstance(bias, dict) and all(_number(v) and -MAX_BIAS <= v <= MAX_BIAS and
                                                               str(k).isascii() and str(k).isdigit() for k, v in bias.items())):
        return f"logit_bias must map token ids to numbers from -{MAX_BIAS} to {MAX_BIAS}, e.g. {{\"42\": -100}}", "logit_bias"
    long = next((str(k) for k in bias or {} if len(str(k)) > MAX_TOKEN_ID_DIGITS), None)
    if long is not None:  # int() of more than 4300 digits raised in `refusal`: "malformed request: ValueError", no field named
        return (f"logit_bias names token id {long[:20]}... ({len(long)} digits), beyond any model's vocabulary: send the "
                f"ids of tokens of this model's vocabulary (at most {MAX_TOKEN_ID_DIGITS} digits)"), "logit_bias"
    temperature = body.get("temperature")  # 0: greedy; a number as ALLOWED_SETTINGS' temperature else
    if temperature is not None and not (_number(temperature) and (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE)):
        return (f"temperature must be 0 (greedy) or a number from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}, "
                f"got {temperature!r:.40}"), "temperature"
    penalty = body.get("frequency_penalty")  # serve runs it as repetition_penalty = 1 + frequency_penalty, which must be > 0
    if penalty is not None and not (_number(penalty) and MIN_FREQUENCY_PENALTY <= penalty <= MAX_FREQUENCY_PENALTY):
        return (f"frequency_penalty must be a number from {MIN_FREQUENCY_PENALTY} to {MAX_FREQUENCY_PENALTY} on this server "
                "(it runs as transformers' repetition_penalty = 1 + frequency_penalty, which must be above 0: a negative "
                f"penalty cannot be expressed), got {penalty!r:.40}"), "frequency_penalty"
    top_p = body.get("top_p")
    if top_p is not None and not (_number(top_p) and 0 < top_p <= 1):
        return f"top_p must be a number > 0 and <= 1, got {top_p!r:.40}", "top_p"
    seed = body.get("seed")  # torch.manual_seed's range; beyond it the model's process fails, after a stream's 200
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2 ** 63 <= seed < 2 ** 64):
        return f"seed must be an integer from {-2 ** 63} to {2 ** 64 - 1}, got {seed!r:.40}", "seed"
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(x, str) for x in stop))):
        return f"stop must be a string or a list of strings, got {stop!r}", "stop"
    problem = generation_config_problem(body.get("generation_config"))
    if problem or body.get("generation_config") is None:
        return problem
    settings = json.loads(body["generation_config"])
    beams = settings.get("num_beams")
    if settings.get("low_memory") and beams is not None and beams > 1:  # generate() refuses it, a ValueError naming no key
        return (f"generation_config's low_memory true cannot be used with num_beams {beams}: transformers' beam search no "
                "longer has a low-memory mode; leave low_memory out", "generation_config")
    if not body.get("stream"):
        return None
    if beams is not None and beams > 1:  # generate() refuses a streamer with beam search: a stream's 200 and an error event
        return (f"generation_config's num_beams {beams} cannot be streamed: transformers' generate() takes no streamer with "
                'beam search; send "stream": false, or num_beams 1', "generation_config")
    sequences = settings.get("num_return_sequences")
    if sequences is not None and sequences > 1:  # the streamer gets every sequence's tokens interleaved, as one answer
        return (f"generation_config's num_return_sequences {sequences} cannot be streamed: transformers' streamer would "
                'interleave the sequences in one answer; send "stream": false (the first is answered), or leave it out',
                "generation_config")
    return None


def configured_limit(raw: str | None, prompt: int) -> tuple[str, int] | None:
    """(the setting, new tokens) for the length limit of a request's generation_config (its max_new_tokens, else its
    max_length, which counts the `prompt`'s tokens), else None."""
    settings = json.loads(raw) if raw else {}
    if settings.get("max_new_tokens") is not None:
        return "generation_config's max_new_tokens", settings["max_new_tokens"]
    if settings.get("max_length") is not None:
        return "generation_config's max_length", settings["max_length"] - prompt
    return None


def stop_strings(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def take_generation_config(body: dict) -> list[str]:
    """A request's `generation_config` field (transformers serve's JSON of generate() settings) rewritten in `body` as
    generate() is to get it (settings_as_sent), and its `stop_strings` taken out of it and returned, to be read as
    `stop` is: transformers' own stop_strings also match the prompt's end, and the answer kept them. A field that holds
    no JSON object, or a setting out of range, was refused before (generation_config_problem)."""
    if body.get("generation_config") is None:
        return []
    settings = settings_as_sent(json.loads(body["generation_config"]))
    stops = stop_strings(settings.pop("stop_strings", None))
    if settings:
        body["generation_config"] = json.dumps(settings)
    else:  # nothing set: transformers <= 5.24 would build its settings afresh, not from the model's, for "{}"
        del body["generation_config"]
    return stops


def cut_at_stop(text: str, stops: list[str]) -> str | None:
    """`text` up to (excluding) its earliest stop string, or None when it holds none."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(hits)] if hits else None


def stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string: held back while streaming."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


def cut_answer(kind: str, answer: dict, stops: list[str], suffix: str | None = None) -> bool:
    """Cut a `kind` endpoint's JSON answer before its earliest stop string, in place; True when it held one.
    A completion's `suffix` (appended by transformers after the generated text) stays."""
    if kind == "response":
        holders = [(p, "text") for item in answer.get("output") or [] if item.get("type") == "message"
                   for p in item.get("content") or [] if p.get("type") == "output_text"]
    else:
        choice = answer["choices"][0]
        holders = [(choice["message"], "content") if kind == "chat" else (choice, "text")]
    cut_any = False
    for holder, key in holders:
        text = holder.get(key) or ""
        tail = suffix if suffix and text.endswith(suffix) else ""
        cut = cut_at_stop(text[:len(text) - len(tail)], stops)
        if cut is not None:
            holder[key], cut_any = cut + tail, True
    if cut_any and kind != "response":
        answer["choices"][0]["finish_reason"] = "stop"
    return cut_any


class StopAtStrings:
    """generate()'s stopping criterion for a request's stop strings: a sequence ends once the text it generated holds
    one (OpenAI's API and llama.cpp's server look in the generated text only). transformers' own (StopStringCriteria,
    the `stop_strings` setting) reads the prompt's tokens too: a stop string spelled by the prompt's end and the
    answer's first tokens ended the answer there, with no stop in it to cut.

    Each call reads each row afresh from its own tokens, and carries nothing of a row to the next call: beam search
    hands it candidate hypotheses reordered at every step, and assisted decoding (prompt lookup) proposed tokens it
    may take back. A row's last generated tokens are decoded (never the prompt's), enough of them to hold the longest
    stop string: a character is at most 4 UTF-8 bytes and a token at least one, plus 3 tokens for a character whose
    first bytes end the text, plus the most tokens a step added (several when assisted decoding accepts a run of
    them). So the cost per step stays bounded, however long or degenerate the answer. The bytes of a character not
    yet whole (decoded as "\ufffd") are no text yet, at either end of the window: a stop string completed just before
    them counts at once. Tokens that decode to nothing (special tokens, skipped as the served text skips them) are
    the one thing that narrows the window. A plain callable, as generate() takes one: subclassing transformers'
    StoppingCriteria would import transformers with this module, for every CLI command."""

    def __init__(self, tokenizer, stops: list[str], prompt_len: int) -> None:
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        self.per_step = 4 * max(len(s) for s in stops) + 3  # tokens that hold the longest stop string and a partial character
        self.seen, self.most_added = prompt_len, 1  # the length of the last call's rows; the most tokens a step added

    def __getstate__(self) -> dict:
        # transformers >= 5.25 generates in a process of its own: the tokenizer crosses by name, not as megabytes
        return {**self.__dict__, "tokenizer": self.tokenizer.name_or_path}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, tokenizer=cached_tokenizer(state["tokenizer"]))

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        length = input_ids.shape[1]
        self.most_added, self.seen = max(self.most_added, length - self.seen), length
        # one token more than most_added: assisted decoding accepts its candidates and a token of its own after them
        start = max(self.prompt_len, length - self.per_step - self.most_added)
        texts = self.tokenizer.batch_decode(input_ids[:, start:].tolist(), skip_special_tokens=True)
        return torch.tensor([self.holds_stop(text) for text in texts], dtype=torch.bool, device=input_ids.device)

    def holds_stop(self, text: str) -> bool:
        text = text.strip("\ufffd")  # a character's first bytes at the end, its last ones where the window starts
        return any(s in text for s in self.stops)


@functools.cache
def cached_tokenizer(source: str):
    """A tokenizer by name or folder, loaded once per process (StopAtStrings in transformers 5.25's model process)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def preview(value: Any, limit: int) -> str:
    """The first `limit` characters of `value` (a request's, so JSON) as JSON, for an error message: encoded lazily and
    no further than that. json.dumps(value)[:limit] encoded all of it first: a 2 MB field of the wrong type held ~100 MB
    for a 60-character message (a review, 2026-12-07)."""
    text, size = [], 0
    for chunk in json.JSONEncoder().iterencode(value):
        text.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return "".join(text)[:limit]


def setting(gen, name: str):
    """A generation setting of transformers serve's request: a GenerationConfig (transformers <= 5.24) or the
    keyword arguments of generate() (5.25 on, which generates in a process of its own)."""
    return gen.get(name) if isinstance(gen, dict) else getattr(gen, name, None)


def set_setting(gen, name: str, value) -> None:
    if isinstance(gen, dict):
        gen[name] = value
    else:
        setattr(gen, name, value)


class RewritingQueue:
    """A stream's queue (`await get()`, `get_nowait()`, `empty()`) that passes on what `_take` makes of each item the
    queue it wraps gives: `_take` appends to `ready` what is to go out (nothing while it holds text back, or several).
    Whatever else a handler asks of it is the wrapped queue's."""

    def __init__(self, queue) -> None:
        from collections import deque

        self.queue = queue
        self.ready: deque = deque()

    def _take(self, item) -> None:
        raise NotImplementedError

    async def get(self):
        while not self.ready:
            self._take(await self.queue.get())
        return self.ready.popleft()

    def get_nowait(self):
        while not self.ready:
            self._take(self.queue.get_nowait())  # asyncio.QueueEmpty when nothing came yet, as the handlers expect
        return self.ready.popleft()

    def empty(self) -> bool:
        """Whether `get_nowait` would find nothing: text held back does not count."""
        while not self.ready and not self.queue.empty():
            self._take(self.queue.get_nowait())
        return not self.ready

    def __getattr__(self, name: str):
        return getattr(self.queue, name)


class StopCuttingQueue(RewritingQueue):
    """The generation queue a transformers serve handler reads (`await get()`, `get_nowait()`), passing answer text
    only up to the earliest stop string. The end of the text that could still grow into a stop string is held back
    until it does not; at a stop the rest is dropped, `on_stop` runs, and the handler gets the end of the stream (None).
    Reasoning text, tool calls and errors pass as they come."""

    def __init__(self, queue, stops: list[str], on_stop) -> None:
        super().__init__(queue)
        self.stops, self.on_stop = stops, on_stop
        self.text, self.sent, self.stopped = "", 0, False

    def _take(self, item) -> None:
        from transformers.cli.serving.utils import ReasoningText

        if self.stopped:
            return
        if isinstance(item, str) and not isinstance(item, ReasoningText):
            self.text += item
            cut = cut_at_stop(self.text, self.stops)
            end = len(cut) if cut is not None else len(self.text) - stop_prefix_len(self.text, self.stops)
            if end > self.sent:
                self.ready.append(self.text[self.sent:end])
                self.sent = end
            if cut is not None:
                self.stopped = True
                self.on_stop()
                self.ready.append(None)
            return
        if item is None and len(self.text) > self.sent:  # held back as a possible stop string that never completed
            self.ready.append(self.text[self.sent:])
            self.sent = len(self.text)
        self.ready.append(item)

def out_of_memory(error: BaseException | str) -> bool:
    """Whether `error` (an exception, or a stream's error text) is the model running out of memory: torch's
    OutOfMemoryError where generation runs in this process (transformers <= 5.24), or its text as transformers >= 5.25's
    model process sends it across ("OutOfMemoryError: CUDA out of memory. ..."), or as transformers <= 5.24 streams
    it (str(e) alone: "CUDA out of memory. ..."); on the CPU, torch's allocator's RuntimeError (CPU_OUT_OF_MEMORY),
    with its type name or without, or Python's MemoryError."""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    while text.startswith("RuntimeError: "):  # the model process's wrapping, once or twice
        text = text.removeprefix("RuntimeError: ")
    # 5.17's stream (the GPU image's) sends the bare text: it was no out-of-memory error there (a review, 2026-12-07).
    # The CPU's and Apple's are RuntimeErrors, not OutOfMemoryError (a CPU server's was still a 500; a second review).
    return text.startswith(("OutOfMemoryError", "MemoryError", OUT_OF_MEMORY, CUDA_OUT_OF_MEMORY)) or \
        any(mark in text.split("\n", 1)[0] for mark in CPU_OUT_OF_MEMORY)


CUDA_OUT_OF_MEMORY = "CUDA out of memory."  # how torch's OutOfMemoryError on a GPU starts its text


CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory", "MPS backend out of memory")


OUT_OF_MEMORY = "the model ran out of memory"  # how out_of_memory_message starts


def out_of_memory_message(prompt: int, kind: str, limit_field: str | None, device: str) -> str:
    """One line for a generation that ran out of the memory of `device` (memory_device): the prompt fit the model's
    context (that is checked before generation, `refusal`), not the memory of the device serving it. The model's
    process frees what the failed generation held and serves the next request."""
    lower = limit_field or LIMIT_FIELDS[kind][0]
    more = "on a machine with more memory (RAM)" if device == "cpu" else f"on a device with more memory than {device}"
    return (f"{OUT_OF_MEMORY} on {device} generating an answer to this prompt of {prompt} tokens (it fits the model's "
            f"context, but not the memory of {device}): shorten the {PROMPT_FIELDS[kind]}, or lower {lower}, "
            f"or serve the model {more}; the server goes on serving other requests")


def memory_device(error: str) -> str:
    """The device whose memory an out-of-memory `error` (its text) ran out of: the GPU CUDA's message names ("GPU 1
    has a total capacity of ..."), the CPU for its allocator's error or Python's MemoryError, Apple's GPU for MPS's,
    else the device the model serves on (serving_device). The message said "GPU memory" on a CPU server too (a review,
    2026-12-07)."""
    gpu = re.search(r"\bGPU (\d+)\b", error)
    if gpu:
        return f"cuda:{gpu.group(1)}"
    if "MPS backend" in error:
        return "mps"
    if "DefaultCPUAllocator" in error or error.removeprefix("RuntimeError: ").startswith("MemoryError"):
        return "cpu"
    return serving_device()


@functools.cache
def serving_device() -> str:
    """The device the merged server's model is on: transformers serve loads it with device_map "auto", which puts it
    (its first layers, when several GPUs share it) on the first GPU, else Apple's, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda:0"
    return "mps" if torch.backends.mps.is_available() else "cpu"


OUT_OF_MEMORY_LOG = "transformers.cli.serving.out_of_memory"  # the logger of the one line per out-of-memory request


def log_out_of_memory(prompt: int, kind: str, device: str, streaming: bool = False) -> None:
    """The one line the server logs for a request that ran out of memory, at warning: the request was answered (a
    400, code out_of_memory, or its stream's error event once tokens had gone out: `streaming`) and the server goes
    on serving. transformers' own traceback of it is left out (OutOfMemoryLogFilter): one per such request buried
    the log (a review, 2026-12-07)."""
    from transformers.utils import logging as hf_logging

    told = "its stream ended with an out_of_memory error event" if streaming else "answered 400 (out_of_memory)"
    hf_logging.get_logger(OUT_OF_MEMORY_LOG).warning(
        f"out of memory on {device}: a {API_NAMES[kind]} request's prompt of {prompt} tokens did not fit with its answer; "
        f"{told}. If this is frequent, ask clients for shorter prompts or lower length limits, or serve on a device with "
        "more memory; serving goes on")


SERVE_MODEL_LOG = "transformers.cli.serving.serve_model"  # the logger of this server's own lines on a request


def log_server_failure(kind: str, error: BaseException) -> None:
    """One line naming the `kind` of request the server failed on with `error` (answered 500), then its traceback cut
    to the first and last frames and the depth (capped_traceback): a RecursionError's whole traceback is ~1000 frames,
    ~3000 lines of the log for one request (a review of server-fixes-6, 2026-12-07)."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger(SERVE_MODEL_LOG).error(
        f"a {API_NAMES[kind]} request failed with {type(error).__name__} before generation, on JSON within the "
        f"{MAX_JSON_DEPTH} levels request_problem takes: this server's failure, answered 500\n{capped_traceback(error)}")


def capped_traceback(error: BaseException, ends: int = 3) -> str:
    """`error`'s traceback as Python prints it, its first and last `ends` frames only, with how many it has: where it
    was met, and where the recursion (or failure) was, without the frames repeated between."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    shown = traceback.format_list(frames) if len(frames) <= 2 * ends else (
        traceback.format_list(frames[:ends]) + [f"  ... {len(frames) - 2 * ends} frames more ...\n"] + traceback.format_list(frames[-ends:]))
    return (f"Traceback (most recent call last), {len(frames)} frames deep:\n" + "".join(shown) +
            "".join(traceback.format_exception_only(error))).rstrip("\n")


def log_render_check_undecided(kind: str, what: str, refusal: BaseException) -> None:
    """One line saying rendered_with_tools_checked could not tell whether the chat template renders a `kind`
    request's `what` (tools, tool calls): rendering a change failed other than in the template (`refusal`: the first
    failure), no other change was another prompt, and the request was served."""
    from transformers.utils import logging as hf_logging

    text = str(refusal).strip()
    hf_logging.get_logger(SERVE_MODEL_LOG).warning(
        f"could not tell whether the chat template renders a {API_NAMES[kind]} request's {what}: rendering them "
        f"changed failed outside the template ({type(refusal).__name__}" + (f": {text.splitlines()[0][:200]}" if text else "") +
        "); served as if it renders them")


class OutOfMemoryLogFilter(logging.Filter):
    """Leaves out transformers serve's own records of a request that ran out of memory: the model's process logs it
    with its traceback ("A request failed"), the Responses stream once more ("Exception in response generation").
    log_out_of_memory's line says it once; any other failure keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OUT_OF_MEMORY_LOG or not record.name.startswith("transformers"):
            return True
        if record.exc_info and record.exc_info[1] is not None and out_of_memory(record.exc_info[1]):
            return False
        return OUT_OF_MEMORY not in record.getMessage()


def filter_out_of_memory_logs() -> None:
    """OutOfMemoryLogFilter on the handlers of transformers' logs (its library logger's, where its serving modules' records
    go), in this process: the server's, and the model's process (imported as __mp_main__)."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # its handler is made on first use
    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, OutOfMemoryLogFilter) for f in handler.filters):
            handler.addFilter(OutOfMemoryLogFilter())


REASONING_FIELDS = ("reasoning_content", "thinking")  # a response template's reasoning fields, as transformers serve reads them


def stripped_text(template: dict | None) -> set[str]:
    """Which of an answer's texts ("content", "reasoning") transformers' whole-answer parser strips with response
    `template` (its text fields' `strip`, on unless turned off: template_keeping_whitespace)."""
    fields = template.get("fields") if isinstance(template, dict) else None
    if not isinstance(fields, dict):
        return set()
    kinds = {"content": "content", **{name: "reasoning" for name in REASONING_FIELDS}}
    return {kinds[name] for name, field in fields.items() if name in kinds and isinstance(field, dict)
            and field.get("content", "text") == "text" and (field.get("content_args") or {}).get("strip", True)}


class StrippedTextQueue(RewritingQueue):
    """A stream's queue (`await get()`, `get_nowait()`, `empty()`) whose answer text and reasoning (the kinds in
    `stripped`) come as the whole-answer parser reads them: without the whitespace at their start and end. Its
    stream parser sends the text as it comes: on Qwen 3's template (thinking on or off) the reasoning began with
    "\n" or was "\n\n" alone, and the content began with "\n\n", whitespace-only deltas the non-streamed answer
    has not, whose content differed from the stream's joined (a review, 2026-12-07). So a text's leading whitespace
    is dropped, and whitespace after its last other character held back until more text follows (then sent with
    it) or the text ends (then dropped). Tool calls, the end and errors pass as they come. A stop string cuts the text
    after this (StopCuttingQueue): cut right after whitespace, the text ends with it, as the non-streamed answer cut at
    the same stop does, and that whitespace may be a delta of its own ("Para1", "\n\n" for stop "Para2")."""

    def __init__(self, queue, stripped: set[str]) -> None:
        super().__init__(queue)
        self.stripped = stripped
        self.started: set[str] = set()
        self.held: dict[str, str] = {}

    def _take(self, item) -> None:
        from transformers.cli.serving.utils import ReasoningText

        kind = "reasoning" if isinstance(item, ReasoningText) else "content" if isinstance(item, str) else None
        if kind not in self.stripped:
            self.ready.append(item)
            return
        text = self.held.get(kind, "") + (item if kind in self.started else item.lstrip())
        if not text:
            return
        self.started.add(kind)
        body = text.rstrip()
        self.held[kind] = text[len(body):]
        if body:
            self.ready.append(type(item)(body))

class ErrorNamingQueue:
    """A stream's queue (`await get()`, `get_nowait()`, `empty()`) whose error item (transformers' _StreamError, which
    the handlers send as the stream's last event) carries `name_error(text)` in place of its text. `first` is the
    first item taken from it (None until one came): text, the end, or the error that ended generation before any text."""

    def __init__(self, queue, name_error) -> None:
        self.queue, self.name_error = queue, name_error
        self.first: Any = None
        self.came = False

    def _named(self, item):
        if type(item).__name__ == "_StreamError":
            item.msg = self.name_error(item.msg)
        if not self.came:
            self.first, self.came = item, True
        return item

    async def get(self):
        return self._named(await self.queue.get())

    def get_nowait(self):
        return self._named(self.queue.get_nowait())

    def empty(self) -> bool:
        return self.queue.empty()

    def __getattr__(self, name: str):  # every stream goes through it now, not only one with stop strings: the rest as it is
        return getattr(self.queue, name)


class StopCuttingManager:
    """A transformers serve generation manager whose streamed text ends before the earliest stop string, and whose
    stream's error says what to do when the model ran out of memory (`name_error`); it keeps the streamer, whose
    token count tells an answer cut short by the length limit."""

    def __init__(self, manager, stops: list[str], gen_config, name_error=lambda text: text, stripped=lambda: set()) -> None:
        self.manager, self.stops, self.gen_config, self.name_error = manager, stops, gen_config, name_error
        self.stripped = stripped  # () -> the texts the stream's response template strips (stripped_text)
        self.streamer = self.named = None

    def generate_streaming(self, *args, **kwargs):
        queue, self.streamer = self.manager.generate_streaming(*args, **kwargs)
        if kwargs.get("response_parser") is not None and self.stripped():
            queue = StrippedTextQueue(queue, self.stripped())
        queue = self.named = ErrorNamingQueue(queue, self.name_error)
        if not self.stops:
            return queue, self.streamer

        def on_stop() -> None:
            self.streamer.cancel()  # StopAtStrings ended generation at this token already; continuous batching takes no criterion
            # The handlers call it a "length" finish when max_new_tokens tokens came; a stop string is a stop. generate()
            # works on its own copy of the settings, so this changes nothing but that reading.
            set_setting(self.gen_config, "max_new_tokens", None)

        return StopCuttingQueue(queue, self.stops, on_stop), self.streamer

    def cut_short(self) -> bool:
        """Whether generation ended at the length limit (the handlers' own "length" reading)."""
        limit = setting(self.gen_config, "max_new_tokens")
        return self.streamer is not None and limit is not None and self.streamer.total_tokens >= limit

    def __getattr__(self, name: str):
        return getattr(self.manager, name)


class StoppingModel:
    """The model, whose generate() also takes `criteria`: transformers <= 5.24's managers call generate() with the
    request's GenerationConfig, which has no place for a stopping criterion."""

    def __init__(self, model, criteria: list) -> None:
        self.model, self.criteria = model, criteria

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, stopping_criteria=[*(kwargs.pop("stopping_criteria", None) or ()), *self.criteria], **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.model, name)


class StoppingEngine:
    """transformers >= 5.25's model-process client, whose answers that do not stream are generated by
    `generate_until_stop`: its own non-streaming generate() puts its cancel check in place of the request's stopping
    criteria (GenerateRunner.generate), so StopAtStrings never ran there. Its streamed generation keeps them, but takes
    no streamer with beam search, and streams several tokens a step with prompt lookup.

    The function goes as a request that streams, so that the model's process hands it its streamer, whose `put` raises
    once the request is cancelled: `generate_until_stop` asks it at every step, and sends the answer's tokens through it
    at the end (a streaming request's result is dropped). A client that leaves cancels its handler (transformers'
    CancelOnDisconnect), and with it the await below, which then sends the cancel, as transformers' own
    generate_non_streaming does.
    Sent with `_send_request`, the call under both: `submit` sends no streamer, and `submit_streaming` hands its errors
    on as text only, so a generate() setting it refuses (a ValueError, a 400) would be a 500."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict) -> tuple[str, int, list[int]]:
        tokens = GeneratedTokens()
        await self.engine._send_request("submit", args=(generate_until_stop, (dict(inputs), generation_kwargs)), streamer=tokens)
        return self.engine.processor.decode(tokens.ids, skip_special_tokens=True), prompt_tokens(inputs), tokens.ids

    def __getattr__(self, name: str):
        return getattr(self.engine, name)


class GeneratedTokens:
    """The API server's end of a StoppingEngine request: keeps the tokens the model's process streams (in place of
    transformers' Detokenizer, which decodes them into text)."""

    def __init__(self) -> None:
        self.ids: list[int] = []

    def put_token(self, token_id: int) -> None:
        self.ids.append(token_id)


async def until_client_leaves(given: dict, answering):
    """`await answering()`, a non-streamed answer's generation, ended when its handling is cancelled (its client left:
    CancelOnDisconnect). transformers >= 5.25's model-process client cancels its own generation then (`given` has its
    `engine`). <= 5.24 (5.17) generates with the model on a thread, which a cancelled await left running to the
    answer's end: the model (`given["model"]`, replaced) now also stops at a step once the handling was cancelled, and
    the generation is awaited in a task of its own, so that its end finds its future still waited for (a cancelled
    one made the thread's set_result an error in the log)."""
    if "engine" in given or "model" not in given:
        return await answering()
    import threading

    left = threading.Event()
    given["model"] = StoppingModel(given["model"], [until_set(left)])
    generating = asyncio.ensure_future(answering())
    try:
        return await asyncio.shield(generating)
    except asyncio.CancelledError:
        left.set()
        generating.add_done_callback(lambda task: task.cancelled() or task.exception())  # its end, whatever, is nobody's
        raise


def until_set(event):
    """generate()'s stopping criterion that ends a generation once `event` (a threading.Event) is set."""

    def check(input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return check


def generate_until_stop(model, processor, inputs: dict, generation_kwargs: dict, streamer=None) -> list[int]:
    """The generated tokens of a request, in transformers >= 5.25's model process: GenerateRunner.generate's own
    generate() call, with the request's stopping criteria (StopAtStrings) kept. With the request's `streamer`
    (StoppingEngine sends it as one that streams), generation ends once the request is cancelled, and the tokens go
    out through it."""
    import torch

    # transformers' own call sets `tokenizer` and `streamer` after the request's settings: a generation_config naming
    # either must not reach generate() twice or as the request's value (a review, 2026-12-04)
    kwargs = {name: value for name, value in generation_kwargs.items() if value is not None and name not in ("tokenizer", "streamer")}
    seed = kwargs.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    model_inputs = {key: value.to(model.device) if hasattr(value, "to") else value for key, value in inputs.items()}
    if hasattr(model, "has_talker"):  # a model that may also speak (Qwen2.5-Omni): text only, as transformers serve asks
        kwargs["generation_mode"] = "text"
    if streamer is not None:
        streamer.put(model_inputs["input_ids"].cpu())  # the prompt, which it sends nothing for, as generate() does
        kwargs["stopping_criteria"] = [*kwargs.get("stopping_criteria", []), until_cancelled(streamer)]
    sequences = model.generate(**model_inputs, **kwargs, tokenizer=processor)
    ids = sequences[0, model_inputs["input_ids"].shape[-1]:]
    if streamer is not None:
        streamer.put(ids.cpu())
    return ids.tolist()


def until_cancelled(streamer):
    """generate()'s stopping criterion that ends a generation once its request is cancelled: the model process's
    streamer raises then (transformers' _TokenStreamer). It is handed no tokens: with beam search the rows are
    candidates, not the answer, and generate() itself takes no streamer then."""

    def check(input_ids, scores, **kwargs):
        import torch

        streamer.put(input_ids.new_empty(0).cpu())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return check


def prompt_tokens(inputs: dict) -> int:
    ids = inputs["input_ids"]
    return len(ids) if isinstance(ids, list) else ids.shape[-1]


def streams_submitted_functions(engine) -> bool:
    """Whether transformers' model-process client can send a submitted function as a request that streams, as
    StoppingEngine does: through `_send_request`'s `streamer` (transformers 5.25), the one call it makes."""
    import inspect

    send = getattr(engine, "_send_request", None)
    return callable(send) and "streamer" in inspect.signature(send).parameters


def unstreamed_stop_refusal(engine, field: str = "stop") -> str | None:
    """Why a non-streamed request with stop strings cannot be answered by `engine` (transformers >= 5.25's
    model-process client), else None: StoppingEngine needs streams_submitted_functions. Asked before generation,
    so that the client gets it, not a 500 with the reason in the server's log. `field`: where the request set them,
    `stop` or generation_config (its stop_strings)."""
    if streams_submitted_functions(engine):
        return None
    import transformers

    asked = "`stop`" if field == "stop" else "generation_config's stop_strings"
    return (f"{asked} without \"stream\": true is not supported on this server's transformers ({transformers.__version__}), "
            f"whose EngineClient._send_request takes no `streamer`: send \"stream\": true, or leave {asked} out, or serve "
            "with a transformers whose EngineClient._send_request takes a streamer (5.25's does)")


def stop_generating_at(given: dict, stops: list[str], streaming: bool) -> None:
    """Make a handler's generation end at the request's stop strings, looked for in the generated text only
    (StopAtStrings); `given`: the handler's arguments, by name, changed in place. transformers >= 5.25 takes the
    criterion in generate()'s kwargs, sent to the model's process; <= 5.24 through the model."""
    processor = given["engine"].processor if "engine" in given else given["processor"]
    criteria = [StopAtStrings(getattr(processor, "tokenizer", processor), stops, prompt_tokens(given["inputs"]))]
    if "engine" in given:
        given["generation_kwargs"]["stopping_criteria"] = criteria
        if not streaming:  # a transformers whose client cannot send it was refused before (unstreamed_stop_refusal)
            given["engine"] = StoppingEngine(given["engine"])
    else:
        given["model"] = StoppingModel(given["model"], criteria)


def mark_incomplete(response: dict) -> None:
    """A Responses API answer cut by the length limit, as OpenAI reports it: status "incomplete", the reason in
    `incomplete_details`, its message "incomplete" too (transformers serve said "completed"). In place."""
    response["status"], response["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
    for item in response.get("output") or []:
        if item.get("type") == "message":
            item["status"] = "incomplete"


def named_events(part: str, cut_short=lambda: False) -> str:
    """Responses API events with their `event: <type>` line, as OpenAI's API and llama.cpp's server send them
    (transformers serve sends `data:` lines only; clients that dispatch on the SSE event name saw nothing). When
    `cut_short()` (asked only once generation is over), the message ends "incomplete" and the stream with
    `response.incomplete`, as OpenAI's does, not `response.completed`."""
    out = []
    for raw in (e for e in part.split("\n\n") if e.strip()):
        try:
            event = json.loads(raw.removeprefix("data: "))
        except ValueError:
            event = None
        kind = event.get("type") if isinstance(event, dict) else None
        if kind in ("response.output_item.done", "response.completed") and cut_short():
            if kind == "response.completed":
                event["type"] = kind = "response.incomplete"
                mark_incomplete(event["response"])
            elif event["item"].get("type") == "message":
                event["item"]["status"] = "incomplete"
            raw = "data: " + json.dumps(event)
        if kind in ("error", "response.failed"):
            raw = "data: " + json.dumps(error_event_as_openai_does(event))
        out.append((f"event: {kind}\n" if isinstance(kind, str) else "") + raw + "\n\n")
    return "".join(out)


def error_event_as_openai_does(event: dict) -> dict:
    """A Responses stream's `error` or `response.failed` event with the code and param OpenAI's carry: transformers'
    error event had neither, and its failed response said "server_error" for a generation that ran out of memory,
    where the same request without streaming is a 400 with code "out_of_memory" (a second review, 2026-12-06): a
    client that retries server errors retried it."""
    error = event if event.get("type") == "error" else (event.get("response") or {}).get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return event
    memory = out_of_memory(error["message"])
    error["code"] = "out_of_memory" if memory else error.get("code") or "server_error"
    if event.get("type") == "error":
        error["param"] = PROMPT_FIELDS["response"] if memory else error.get("param")
    return event


def error_as_openai_does(part: str, kind: str) -> str:
    """A chat or completions stream's part with its error event, transformers' `data: {"error": "<text>"}`, in
    OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: the openai client shows a string error as "An
    error occurred during streaming", and nothing of the text. Any other part is returned as it is."""
    if '"error"' not in part:
        return part
    out = []
    for raw in part.split("\n\n"):
        try:
            event = json.loads(raw.removeprefix("data: ")) if raw.startswith("data: {") else None
        except ValueError:
            event = None
        if isinstance(event, dict) and isinstance(event.get("error"), str):
            text = event["error"]
            memory = out_of_memory(text)
            event["error"] = {"message": text, "type": "invalid_request_error" if memory else "server_error",
                              "param": PROMPT_FIELDS[kind] if memory else None, "code": "out_of_memory" if memory else None}
            raw = "data: " + json.dumps(event)
        out.append(raw)
    return "\n\n".join(out)


PROMPT_FIELDS = {"chat": "messages", "completion": "prompt", "response": "input"}
LIMIT_FIELDS = {"chat": ("max_completion_tokens", "max_tokens"), "completion": ("max_tokens",), "response": ("max_output_tokens",)}  # first given wins


def answer_as_openai_does() -> None:
    """Make transformers serve's generation endpoints (/v1/chat/completions, /v1/completions, /v1/responses) answer as
    OpenAI's API and llama.cpp's server do, all three the same way:
    - generation stops at a `stop` string in the generated text (StopAtStrings; transformers' own stop_strings also
      matched the prompt's end) and the text ends before the earliest one (transformers returned it; the Responses
      API refused `stop`); `stop_strings` inside the `generation_config` field are read the same way; an empty stop
      string stops nothing; `logit_bias` works on every endpoint;
    - a chat or completions stream ends with `data: [DONE]` (strict SSE clients wait for it); a Responses stream ends
      with its `response.completed` event (`response.incomplete` when the length limit cut it, as the answer's status
      says), each event named by an `event:` line, and without `"stream"` the answer is one JSON object (transformers
      streamed it: the openai client failed to parse it);
    - a request's `"model"` is not checked: the one model is answered, named as published (llama.cpp's reading);
    - tool_choice "none" is answered with a message: served without the tools (tools_left_out); no tool call is parsed
      from the answer of a request that shows no tool, and a non-streamed answer keeps the whitespace its stream
      would (response_template_as_served); an assistant's refusal (part
      or field) is its text, a legacy function_call a tool call (history_as_served);
    - a malformed request (no messages/prompt/input, an unknown field or one of the wrong type, both named, a `generation_config` that holds no
      JSON object, a setting not in ALLOWED_SETTINGS or out of its range, settings transformers refuses as generate()
      will run them (merged_settings_problem), beam search in a stream, a length limit
      < 1, `n` > 1, a prompt plus length limit beyond the model's context, a logit_bias id beyond its vocabulary) is a
      400 naming the field, streamed or not, and never a 500 with a traceback in the server's log; so is a
      non-streamed `stop` on a transformers that cannot send it (unstreamed_stop_refusal). Without a length limit,
      generation stops at the end of the context, as llama.cpp's does."""
    import inspect
    from contextvars import ContextVar

    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler

    # A request's stop strings and logit bias, taken out of its body before the handler's own field check (the
    # Responses handler refuses both: OpenAI's Responses API has neither) and applied here (the logit bias to its
    # generation settings, the stop strings by `stop_generating_at`);
    # the length-limit field it named; whether its generation started (errors before that are the request's).
    request_options: ContextVar[dict] = ContextVar("request_options", default={})

    def refusal(given: dict, kind: str) -> JSONResponse | None:
        """A 400 for what generation would fail on or cut short, checked before any token is generated: a stream's
        200 goes out with its first event, too early for a 400. `given`: the handler's arguments, by name."""
        # <= 5.24: the model and its GenerationConfig; 5.25 on: the model's process (`engine`) and generate()'s kwargs
        config = given["engine"].model_config if "engine" in given else given["model"].config
        gen = generation_settings(given)
        text_config = config.get_text_config()
        n = prompt_tokens(given["inputs"])
        field = PROMPT_FIELDS[kind]
        options = request_options.get()
        limit = getattr(text_config, "max_position_embeddings", None)
        dropped = " (truncation \"auto\" is not done here: this server drops no input items)" if options.get("truncation") == "auto" else ""
        if limit and n >= limit:
            return openai_error(f"the prompt is {n} tokens, and the model's context is {limit} tokens "
                                f"(max_position_embeddings); shorten the {field}{dropped}", "truncation" if dropped else field)
        asked = setting(gen, "max_new_tokens")
        given_field = options.get("limit_field")
        configured = configured_limit(options.get("generation_config"), n)
        if not given_field and configured:
            # generation_config's own limit, which serve's default (at least 1024 new tokens) had overwritten
            given_field, asked = configured
            set_setting(gen, "max_new_tokens", asked)
            if asked < 1:
                return openai_error(f"{given_field} leaves no token to generate after the prompt's {n} tokens", "generation_config")
        if limit and not given_field:
            # No limit asked for: stop at the end of the context, as llama.cpp does (transformers serve's own default,
            # max(the model's max_new_tokens, 1024), cut longer answers short and called it "length").
            set_setting(gen, "max_new_tokens", limit - n)
        elif limit and asked and n + asked > limit:  # OpenAI refuses it; generating past max_position_embeddings is garbage or a crash
            return openai_error(f"the prompt is {n} tokens and {given_field} asks for {asked} more, beyond the model's context "
                                f"of {limit} tokens (max_position_embeddings): lower {given_field} to {limit - n} or less, "
                                f"or shorten the {field}{dropped}", "truncation" if dropped else given_field.split("'")[0])
        vocab = getattr(text_config, "vocab_size", None)
        beyond = sorted(int(k) for k in options.get("logit_bias") or {} if vocab and int(k) >= vocab)
        if beyond:
            return openai_error(f"logit_bias names token ids beyond the model's vocabulary of {vocab} tokens "
                                f"(ids 0 to {vocab - 1}): {', '.join(map(str, beyond[:5]))}", "logit_bias")
        # the request's settings again, now with the bounds that need the model (token ids, lengths), then as generate()
        # will run them: merged with the model's own and the request's temperature, and validated by transformers
        problem = generation_config_problem(options.get("generation_config"), ModelLimits(vocab, limit, setting(gen, "max_new_tokens")))
        if problem:
            return openai_error(*problem)
        model_defaults = given["engine"].generation_config if "engine" in given else getattr(given["model"], "generation_config", None)
        asked = json.loads(options["generation_config"]) if options.get("generation_config") else {}
        refused = merged_settings_problem(model_defaults, gen, asked)
        return openai_error(refused, "generation_config") if refused else None

    def generation_settings(given: dict):
        return given["generation_kwargs"] if "generation_kwargs" in given else given["gen_config"]

    def conform(handler: type, kind: str) -> None:
        # The request's generation settings: a GenerationConfig up to transformers 5.24, generate()'s kwargs from 5.25
        build_name = "_build_generation_kwargs" if hasattr(handler, "_build_generation_kwargs") else "_build_generation_config"
        handle, build = handler.handle_request, getattr(handler, build_name)
        streaming, non_streaming = handler._streaming, handler._non_streaming
        stream_sig, answer_sig = inspect.signature(streaming), inspect.signature(non_streaming)

        async def handle_request(self, body: dict, request_id: str):
            problem = request_problem(kind, body)
            if problem:
                return openai_error(*problem)
            body = tools_left_out(nulls_left_out(body))
            if kind == "chat":
                body["messages"] = history_as_served(body["messages"])
            elif kind == "completion":
                body["prompt"] = one_prompt(body["prompt"])
            elif kind == "response":
                body["input"] = response_input_as_system(body["input"])
                body = instructions_kept_with_system(body)
            configured = take_generation_config(body)
            stops = [x for x in stop_strings(body.pop("stop", None)) if x]
            options = {"stop": stops + [x for x in configured if x], "logit_bias": body.pop("logit_bias", None),
                       "stop_field": "stop" if stops else "generation_config", "generation_config": body.get("generation_config"),
                       "limit_field": next((f for f in LIMIT_FIELDS[kind] if body.get(f) is not None), None), "generating": False,
                       "no_tool_calls": not _shows_tools(body), "truncation": body.get("truncation")}
            if self.model_manager.force_model is not None:
                body["model"] = self.model_manager.force_model
            if kind == "response":
                body.setdefault("stream", False)
            reset = request_options.set(options)
            try:
                answer = await handle(self, body, request_id)
                once_generating = getattr(answer, "once_generating", None)  # a stream (stream's response)
                return await once_generating() if once_generating is not None else answer
            except SettingsRefused as e:
                return openai_error(str(e), "generation_config")
            except ToolsNotRendered as e:
                return openai_error(str(e), e.param)
            except HTTPException as e:  # the handler's own checks (unknown fields, ...): FastAPI's 422 {"detail": ...}
                return openai_error(str(e.detail), None, 400 if e.status_code == 422 else e.status_code)
            except Exception as e:
                if raised_by_template(e):
                    # the chat template refused the conversation (Gemma-2's raise_exception('System role not supported')
                    # for a system or developer turn, or Responses instructions): a 500 and a traceback (a review,
                    # 2026-12-06); or failed on it (a TypeError reading a field as another type): a 400 naming no
                    # field, or a 500 for another error (a review, 2026-12-07)
                    return openai_error(*template_failure(e, kind, body))
                if isinstance(e, RecursionError) and not options["generating"]:
                    # request_problem refuses JSON nested beyond MAX_JSON_DEPTH: a request nested deeper all the same
                    # (a check that missed it) is refused, as before; on one within the cap, the recursion is this
                    # server's own failure, logged and a 500, not a 400 telling the client to flatten a flat request
                    # (a review, 2026-12-07)
                    if nested_beyond_the_cap(body):
                        return openai_error(nested_too_deeply("the request", "send flatter JSON"), None)
                    log_server_failure(kind, e)
                    return openai_error(f"the server failed reading this {API_NAMES[kind]} request (RecursionError: Python's "
                                        f"recursion limit was reached on JSON within the {MAX_JSON_DEPTH} levels it "
                                        "takes): the server's failure, not the request's; its log holds the traceback",
                                        None, 500, kind="server_error")
                # Before generation, the handlers index and convert the request's fields as they come: what fails there
                # is the request (a field request_problem does not check). A ValueError from generation is what it
                # refuses in the request's settings; anything else from generation, or of another type, is the
                # server's own failure: a 500.
                if not isinstance(e, (TypeError, KeyError, ValueError)) or options["generating"] and not isinstance(e, ValueError):
                    raise
                line = str(e).strip().splitlines()[0] if str(e).strip() else ""
                return openai_error(f"malformed request: {type(e).__name__}" + (f": {line}" if line else ""), None)
            finally:
                request_options.reset(reset)

        def build_generation_config(self, *args, **kwargs):
            options = request_options.get()
            body = args[0] if args else kwargs.get("body") or {}
            if build_name == "_build_generation_config" and body.get("generation_config") and (body.get("temperature") or 0) > 0:
                # <= 5.24 (5.17) builds GenerationConfig(**the request's settings) before it reads the temperature, and
                # validates them then: a setting that needs sampling ("num_return_sequences": 2) at temperature 0.7 was
                # a 400 ("Greedy methods ... do not support"), where 5.25 answers it. Sampling is what a temperature
                # above 0 turns on below (as 5.25 does), so the settings are built with it
                settings = json.loads(body["generation_config"])
                if isinstance(settings, dict) and "do_sample" not in settings:
                    body = {**body, "generation_config": json.dumps({**settings, "do_sample": True})}
                    args, kwargs = ((body, *args[1:]), kwargs) if args else (args, {**kwargs, "body": body})
            try:
                config = build(self, *args, **kwargs)
            except ValueError as e:  # <= 5.24: GenerationConfig(**the request's settings) validates them as it is built
                read = ("alone: this transformers' serve reads them before the request's temperature; a setting that "
                        'needs sampling needs "do_sample": true here')
                raise SettingsRefused(transformers_refusal(e, json.loads(options.get("generation_config") or "{}"), read)) from e
            if body.get("temperature") is not None and (setting(config, "temperature") or 0) > 0:
                # transformers serve only turns sampling off (at temperature 0): a model whose generation config has no
                # do_sample (mistralai/Mistral-7B-v0.1) answered greedily at any temperature, whatever the seed
                set_setting(config, "do_sample", True)
            if options.get("logit_bias"):  # transformers refused an integer bias (OpenAI's own examples send them) with a 500
                set_setting(config, "sequence_bias", {(int(k),): float(v) for k, v in options["logit_bias"].items()})
            return config

        def render_messages(self, engine, messages, body):
            """transformers >= 5.25's rendering (BaseHandler.render_messages), refusing what the chat template leaves out
            (rendered_with_tools_checked)."""
            return rendered_with_tools_checked(kind, lambda m, tools: render(self, engine, m, {**body, "tools": tools}),
                                               messages, body.get("tools"))

        def resolve_model(self, body):
            """transformers <= 5.24's handlers render in handle_request itself, with the processor this returns:
            one that refuses what the chat template leaves out (processor_checking_tools)."""
            # the base class's at each call, not as it was now: name_answers_as_served replaces BaseHandler's later
            model_id, model, processor = resolve(self, body) if resolve else super(handler, self)._resolve_model(body)
            return model_id, model, processor_checking_tools(kind, processor)

        def check_prompt_length(self, *args, **kwargs):
            """transformers 5.25's own check, a ValueError before the handler: `refusal` does it, naming the field."""

        async def answer(self, *args, **kwargs):
            bound = answer_sig.bind(self, *args, **kwargs)
            given = bound.arguments
            gen_config = generation_settings(given)
            refused = refusal(given, kind)
            if refused:
                return refused
            options = request_options.get()
            stops = options["stop"]
            cannot_stop = bool(stops) and "engine" in given and unstreamed_stop_refusal(given["engine"], options["stop_field"])
            if cannot_stop:  # a 400, not a 501: the request can be changed to be answered, and clients retry 5xx
                return openai_error(cannot_stop, options["stop_field"])
            options["generating"] = True
            if stops:
                stop_generating_at(given, stops, streaming=False)
            try:
                response = await until_client_leaves(given, lambda: non_streaming(*bound.args, **bound.kwargs))
            except Exception as e:
                # a 500 before, the reason in the log only (a review, 2026-12-06); a 400, not a 5xx: the same request
                # fails again (clients retry 5xx), a shorter one is answered
                if not out_of_memory(e):
                    raise
                n, device = prompt_tokens(given["inputs"]), memory_device(f"{type(e).__name__}: {e}")
                log_out_of_memory(n, kind, device)
                return openai_error(out_of_memory_message(n, kind, options["limit_field"], device), PROMPT_FIELDS[kind], code="out_of_memory")
            body = json.loads(response.body)
            cut = bool(stops) and cut_answer(kind, body, stops, given.get("suffix"))
            limit = setting(gen_config, "max_new_tokens")  # the handlers' "length" reading: as many tokens came as were allowed
            incomplete = kind == "response" and not cut and limit is not None and body.get("usage", {}).get("output_tokens", 0) >= limit
            if incomplete:
                mark_incomplete(body)
            return JSONResponse(body) if cut or incomplete else response

        def stream(self, *args, **kwargs):
            bound = stream_sig.bind(self, *args, **kwargs)
            given = bound.arguments
            refused = refusal(given, kind)
            if refused:
                return refused
            options = request_options.get()
            options["generating"] = True
            if options["stop"]:
                stop_generating_at(given, options["stop"], streaming=True)
            generator = "engine" if "engine" in given else "gen_manager"  # what generates: 5.25's model process, or the manager
            n = prompt_tokens(given["inputs"])

            def name_error(text: str) -> str:
                if not out_of_memory(text):
                    return text
                # before the stream's first item, its answer is a 400 (answer_once_generating); after it, an error event
                log_out_of_memory(n, kind, memory_device(text), streaming=manager.named is not None and manager.named.came)
                return out_of_memory_message(n, kind, options["limit_field"], memory_device(text))

            manager = given[generator] = StopCuttingManager(given[generator], options["stop"], generation_settings(given), name_error,
                                                            lambda: stripped_text(options.get("response_template")))
            original = streaming(*bound.args, **bound.kwargs)
            source = original.body_iterator

            async def events():
                try:
                    async for part in source:
                        yield named_events(part, manager.cut_short) if kind == "response" else error_as_openai_does(part, kind)
                finally:  # a client gone: closing the source cancels generation, and nothing more is sent
                    await source.aclose()
                if kind != "response":
                    yield "data: [DONE]\n\n"

            async def answer_once_generating():
                """The stream's response once generation has sent its first item, or a 400 if that item is an
                out-of-memory error. The status line goes out with the stream's first byte (the role chunk, sent
                before generation starts): a prompt that ran out of memory in prefill was a 200 whose one event was
                the error, where the same request without streaming is a 400 (a review, 2026-12-07). So the stream's
                first parts are held until then, and sent ahead of the rest.
                Once tokens have been sent, a later out-of-memory error stays an error event in the stream: its 200
                and the answer's first tokens are on the wire, and an event is the one way left to tell the client
                (OpenAI's API ends a failing stream the same way)."""
                parts, held = response.body_iterator, []
                try:
                    async for part in parts:
                        held.append(part)
                        if manager.named is None or manager.named.came:
                            break
                except BaseException:  # the client left meanwhile (CancelOnDisconnect): generation stops with it
                    await parts.aclose()
                    raise
                first = manager.named.first if manager.named is not None else None
                if type(first).__name__ == "_StreamError" and out_of_memory(first.msg):
                    await parts.aclose()
                    return openai_error(first.msg, PROMPT_FIELDS[kind], code="out_of_memory")

                async def held_then_the_rest():
                    try:
                        for part in held:
                            yield part
                        async for part in parts:
                            yield part
                    finally:
                        await parts.aclose()

                # the handler's own response class: 5.25's notices a client gone through its CancelOnDisconnect middleware
                return type(original)(held_then_the_rest(), media_type="text/event-stream")

            # handle_request awaits it (the handlers return this response as it is); a response that is not this one
            # as it was returned streams from its first byte, as before
            response = type(original)(events(), media_type="text/event-stream")
            response.once_generating = answer_once_generating
            return response

        handler.handle_request = handle_request
        setattr(handler, build_name, build_generation_config)
        if kind != "completion" and hasattr(handler, "render_messages"):  # transformers 5.25's
            render = handler.render_messages
            handler.render_messages = render_messages
        elif kind != "completion":  # <= 5.24 (5.17): handle_request calls the processor's apply_chat_template itself
            resolve = handler.__dict__.get("_resolve_model")  # the handler's own, if it has one
            handler._resolve_model = resolve_model
        if hasattr(handler, "_check_prompt_length"):
            handler._check_prompt_length = check_prompt_length
        handler._streaming, handler._non_streaming = stream, answer
        handler._openai_conformant = True

    for handler, kind in ((ChatCompletionHandler, "chat"), (CompletionHandler, "completion"), (ResponseHandler, "response")):
        if not handler.__dict__.get("_openai_conformant"):
            conform(handler, kind)
    response_template_as_served(request_options)


def response_template_as_served(request_options) -> None:
    """Make transformers serve read answers with its response template (get_response_template, which both its stream
    parser and its whole-answer parser read; 5.17 and 5.25 alike, each calling it from its own module):
    - keeping the text's whitespace (template_keeping_whitespace): a non-streamed answer is its stream's text;
    - reading the reasoning whatever the template names it (template_reasoning_as_read);
    - parsing no tool call from the answer of a request that shows the model no tool (`request_options`'
      no_tool_calls): none sent, or tool_choice "none" (tools_left_out). A call-like text the model writes all the
      same is its answer's text, as OpenAI's model, shown no tool, answers a message: serve parsed calls from every
      answer of a model whose template reads them (Qwen's, Gemma's), a request without tools getting finish_reason
      "tool_calls" and calls of a function it never declared (a review of served-fields).
    A transformers without it is left alone."""
    from transformers.cli.serving import utils

    template_of = getattr(utils, "get_response_template", None)
    if template_of is None or getattr(template_of, "_as_served", False):
        return

    def get_response_template(processor, config):
        template = template_reasoning_as_read(template_keeping_whitespace(template_of(processor, config)))
        options = request_options.get()
        template = template_without_tool_calls(template) if options.get("no_tool_calls") else template
        if options:  # a request's (not the variable's shared default): what its stream's text is stripped as (StrippedTextQueue)
            options["response_template"] = template
        return template

    get_response_template._as_served = True
    utils.get_response_template = get_response_template


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m tasks.export", description="serve-model's server process (see flows/cli.py)")
    sub = p.add_subparsers(dest="command", required=True)
    sm = sub.add_parser("serve-merged")
    sm.add_argument("merged", type=Path)
    sm.add_argument("--name", required=True)
    sm.add_argument("--host", default="127.0.0.1")
    sm.add_argument("--port", type=int, default=8000)
    sm.add_argument("--workdir", type=Path, required=True, help="an empty folder to serve from (the caller removes it)")
    sm.add_argument("--parent", type=int, help="stop when this process (serve-model) is gone, even killed with SIGKILL")
    sm.add_argument("--stop-ids", type=int, nargs="*", default=[], help="token ids that end an answer besides the model's EOS")
    sm.add_argument("--cors-origin", action="append", default=[], help="a browser origin the server answers (CORS), or *; repeatable")
    args = p.parse_args(argv)
    if args.parent:
        from .common import stop_when_orphaned

        stop_when_orphaned(args.parent)
    serve_merged(args.merged, args.name, args.host, args.port, os.environ.get(API_KEY_ENV) or None, args.workdir, args.stop_ids,
                 args.cors_origin)
    return 0


if __name__ == "__mp_main__":
    # The model's process transformers serve spawns from serve-merged runs this module under this name first. tqdm's
    # first bar there ("Loading weights") made a cross-process lock, a named semaphore, which transformers' SIGTERM to
    # that process at each stop left to the resource tracker ("1 leaked semaphore objects"). One process draws there.
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    # the model's process logs each request that ran out of memory with its traceback: the server logs it in one line
    filter_out_of_memory_logs()

if __name__ == "__main__":
    sys.exit(_main())
