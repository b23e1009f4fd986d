"""Bad inputs, as a user hits them: each is refused with a non-zero exit and ONE line naming the problem and
the fix, no Python traceback, and nothing already finished is lost. docs/RELIABILITY.md tables every case.

How each case is driven:
- config problems: the real command (`python -m flows.cli run ...`) in a subprocess; they fail before Prefect
  starts, so each takes about a second;
- problems found inside a stage (data, model files): `flows.cli.main([...])` — the same entry point, flow,
  Prefect logging and error printing — in this process against the session's Prefect test server, with the
  process's stdout/stderr captured at the file-descriptor level (a subprocess would pay ~30 s of Prefect
  server start and imports per case); `test_stage_error_in_a_real_process_prints_one_line` proves the same in
  a subprocess;
- Ctrl-C mid-training: a subprocess that receives SIGINT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_one_clear_line

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}
# Refuses a system turn as Gemma-2's template does (braces doubled: STAGE_CASES are str.format-ed)
NO_SYSTEM = ("{{% for m in messages %}}{{% if m['role'] == 'system' %}}{{{{ raise_exception('System role not supported') }}}}{{% endif %}}"
             "{{{{ m['content'] }}}}{{{{ eos_token }}}}{{% endfor %}}")


def cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", "run", "--profile", "tiny", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------------------
# Config problems: refused before any work starts (exit 2, `config error: ...`)


@pytest.fixture(scope="module")
def bad_config_file(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("configs")
    text = (ROOT / "pipeline.yaml").read_text()
    typo = d / "typo.yaml"
    typo.write_text(text.replace("    learning_rate: 2.0e-4", "    learnin_rate: 2.0e-4", 1))
    broken = d / "broken.yaml"
    broken.write_text("defaults:\n  lora: {r: 8\nprofiles: {}\n")
    a_file = d / "a-file"
    a_file.write_text("not a folder")
    return {"typo": typo, "broken": broken, "a_file": a_file}


CONFIG_CASES = [
    # id, CLI args, words the one line must hold (problem + fix)
    ("unknown-key-typo", ["--set", "lora.rnk=3"], ["lora.rnk", "unknown key"]),
    ("unknown-key-suggests", ["--set", "learning_rate=1e-4"], ["unknown key", "did you mean training.learning_rate"]),
    ("wrong-type", ["--set", "training.micro_batch_size=many"], ["training.micro_batch_size", "integer", "'many'"]),
    ("wrong-type-section", ["--set", "lora=8"], ["lora", "dictionary"]),
    ("hours-zero", ["--hours", "0"], ["budget.hours", "must be > 0", "--hours 4"]),
    ("hours-negative", ["--hours", "-2"], ["budget.hours", "must be > 0"]),
    ("minutes-negative", ["--minutes", "-5"], ["budget.minutes", "must be > 0"]),
    ("hours-absurd", ["--hours", "1000"], ["1000 hours", "720-hour limit", "--minutes"]),
    ("lora-r-zero", ["--set", "lora.r=0"], ["lora.r", "must be > 0", "16"]),
    ("lora-r-negative", ["--set", "lora.r=-4"], ["lora.r", "must be > 0"]),
    ("lora-alpha-zero", ["--set", "lora.alpha=0"], ["lora.alpha", "must be > 0"]),
    ("lora-no-targets", ["--set", "lora.target_modules=[]"], ["lora.target_modules", "empty", "q_proj"]),
    ("set-without-equals", ["--set", "lora.r"], ["--set 'lora.r'", "dotted.key=value"]),
    ("set-bad-dotted-key", ["--set", "lora..r=4"], ["is not a dotted key", "training.learning_rate=1e-4"]),
    ("set-empty-key", ["--set", "=4"], ["is not a dotted key"]),
    ("set-into-a-value", ["--set", "output_name.x=1"], ["output_name.x", "unknown key"]),
    ("4bit-on-cuda-without-gpu", ["--set", "device=cuda"], ["device", "no CUDA GPU", "device=auto"]),
    ("output-name-escapes", ["--set", "output_name=../../etc"], ["output_name", "folder name"]),
    ("hub-repo-id-path", ["--set", "publish.hub_repo_id=../../x"], ["publish.hub_repo_id", "user/name"]),
]


@pytest.mark.parametrize("case_id, args, needles", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_problem_is_one_line_exit_2(case_id, args, needles, tmp_path):
    art = tmp_path / "artifacts"
    proc = cli("--set", f"artifacts_dir={art}", *(["--minutes", "1"] if "--hours" not in args and "--minutes" not in args else []), *args)
    assert proc.returncode == 2, proc.stderr
    assert_one_clear_line(proc.stderr + proc.stdout, "config error: ", *needles)
    assert not (art / "cache").exists()  # refused before any work started


def test_unknown_profile_lists_the_real_ones():
    proc = cli("--minutes", "1", "--profile", "mistral7b")  # the last --profile wins
    assert proc.returncode == 2
    assert_one_clear_line(proc.stderr, "config error: ", "profile 'mistral7b' does not exist", "mistral-7b", "demo")


def test_typo_in_config_file_names_the_key(bad_config_file):
    proc = cli("--minutes", "1", "--config", str(bad_config_file["typo"]))
    assert proc.returncode == 2
    assert_one_clear_line(proc.stderr, "config error: ", "training.learnin_rate", "unknown key")


def test_broken_yaml_names_the_file(bad_config_file):
    proc = cli("--minutes", "1", "--config", str(bad_config_file["broken"]))
    assert proc.returncode == 2
    line = assert_one_clear_line(proc.stderr, "config error: ", "not valid YAML at line", "fix that line")
    assert "broken.yaml" in line


def test_unwritable_artifacts_dir(bad_config_file):
    proc = cli("--minutes", "1", "--set", f"artifacts_dir={bad_config_file['a_file']}/artifacts")
    assert proc.returncode == 2
    assert_one_clear_line(proc.stderr, "config error: ", "is not writable", "--set artifacts_dir=")


# ---------------------------------------------------------------------------------------------------------
# Problems found inside a stage: `error: ...`, exit 1, finished work kept


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("inputs")
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (d / "malformed.jsonl").write_text(lines([GOOD, GOOD]) + '{"messages": [oops\n' + lines([GOOD]))
    (d / "empty.jsonl").write_text("")
    (d / "schema.jsonl").write_text(lines([{"prompt": "a", "completion": "b"}] * 5))
    (d / "roles.jsonl").write_text(lines([{"messages": [{"role": "wizard", "content": "a"}, {"role": "oracle", "content": "b"}]}] * 5))
    (d / "empty_turns.jsonl").write_text(lines([{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": ""}]}] * 5))
    (d / "latin1.jsonl").write_bytes(lines([GOOD]).encode() + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'.encode("latin-1"))
    (d / "one_mb.jsonl").write_text(lines([{"messages": [{"role": "user", "content": "x" * (1 << 20)}, {"role": "assistant", "content": "ok"}]}]))
    (d / "overlong.jsonl").write_text(lines([{"messages": [{"role": "user", "content": f"word{i} " * 400}, {"role": "assistant", "content": "ok"}]} for i in range(10)]))
    (d / "invalid.json").write_text('[{"messages": [}]')
    chats = [{"messages": [{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}]} for w in ("hi", "yes", "no", "ok", "bye")]
    chats[1]["messages"].insert(0, {"role": "system", "content": "Be terse."})
    (d / "system_turns.jsonl").write_text(lines(chats))
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prefect_server):
    """An artifacts folder holding a finished data stage (the good tiny run): the bad runs must not touch it."""
    from tasks.config import load_config
    from tasks.data import load_dataset_records

    art = str(tmp_path_factory.mktemp("artifacts"))
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}"])
    rec = load_dataset_records(cfg.data, cfg.model, art)
    files = {str(p.relative_to(rec.dir)): p.stat().st_size for p in Path(rec.dir).rglob("*") if p.is_file()}
    return {"art": art, "dir": Path(rec.dir), "files": files, "model_dir": Path(rec.model_ref)}


def assert_nothing_lost(finished: dict) -> None:
    from tasks.common import is_complete

    assert is_complete(finished["dir"])
    now = {str(p.relative_to(finished["dir"])): p.stat().st_size for p in finished["dir"].rglob("*") if p.is_file()}
    assert now == finished["files"]
    art = Path(finished["art"])
    assert not list(art.glob("cache/*/.*.tmp-*")), "a half-built stage folder was left behind"


def run_in_process(capfd, finished: dict, *args: str) -> tuple[int, str]:
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import main

    for h in logging.getLogger().handlers:  # Prefect's console handler still holds an earlier test's (closed) capture
        if isinstance(h, PrefectConsoleHandler):
            h.stream = h.console.file = sys.stderr
    capfd.readouterr()
    code = main(["run", "--profile", "tiny", "--set", f"artifacts_dir={finished['art']}", *args])
    out, err = capfd.readouterr()
    return code, out + err


@pytest.fixture(scope="module")
def model_folders(finished, tmp_path_factory) -> dict[str, Path]:
    """Broken copies of the tiny model: no weights, a truncated safetensors file, pickle-only weights."""
    import torch
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("models")
    src = finished["model_dir"]
    out = {}
    for name in ("no_weights", "truncated", "pickle_only"):
        out[name] = d / name
        shutil.copytree(src, out[name])
    (out["no_weights"] / "model.safetensors").unlink()
    weights = out["truncated"] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    torch.save(load_file(str(out["pickle_only"] / "model.safetensors")), out["pickle_only"] / "pytorch_model.bin")
    (out["pickle_only"] / "model.safetensors").unlink()
    return out


STAGE_CASES = [
    # id, extra CLI args (input names are filled in), words the `error:` line must hold
    ("malformed-jsonl-line", ["data.source={inputs}/malformed.jsonl"], ["malformed.jsonl:3", "malformed JSON", "fix or delete that line"]),
    ("empty-file", ["data.source={inputs}/empty.jsonl"], ["is empty", "at least one conversation"]),
    ("wrong-schema", ["data.source={inputs}/schema.jsonl"], ["cannot tell the schema", "completion", "prompt -> instruction, completion -> output"]),
    ("unknown-roles", ["data.source={inputs}/roles.jsonl"], ["0 usable training rows", "unknown role: 5", "use roles", "assistant"]),
    ("empty-turns", ["data.source={inputs}/empty_turns.jsonl"], ["0 usable training rows", "empty turn: 5", "remove empty messages"]),
    ("non-utf8-bytes", ["data.source={inputs}/latin1.jsonl"], ["latin1.jsonl:2", "not UTF-8", "re-save the file as UTF-8"]),
    ("one-mb-example", ["data.source={inputs}/one_mb.jsonl"], ["over max_length: 1", "raise data.max_length"]),
    ("all-rows-over-max-length", ["data.source={inputs}/overlong.jsonl"], ["over max_length: 10", "raise data.max_length", "overlong=truncate"]),
    ("invalid-json-file", ["data.source={inputs}/invalid.json"], ["invalid.json", "invalid JSON (", "at line 1 column"]),
    ("missing-dataset-path", ["data.source={inputs}/nope.jsonl"], ["nope.jsonl", "file not found", "give an existing"]),
    ("hub-dataset-offline", ["data.source=someone/some-dataset"], ["cannot reach the hub", "use a local file or the demo profile"]),
    # tests run with HF_HUB_OFFLINE=1 (conftest): the user's own offline mode, which "connect to the network" cannot fix
    ("hub-model-offline", ["model.name=someone/some-model"], ["cannot reach the hub", "unset HF_HUB_OFFLINE", "use a local folder or the demo profile"]),
    ("hub-model-invalid-id", ["model.name=someorg/a--b"], ["model.name 'someorg/a--b' is not a hub id or a local folder", "fix the name"]),
    ("missing-model-folder", ["model.name={inputs}/no-such-model/"], ["neither a local folder nor a hub id"]),
    ("model-without-weights", ["model.name={models}/no_weights"], ["has no weight files", "copy the complete model folder"]),
    ("truncated-safetensors", ["model.name={models}/truncated"], ["truncated or corrupt", "download the model again"]),
    ("pickle-weights-refused", ["model.name={models}/pickle_only"], ["only pickle .bin weights", "safetensors", "model.allow_pickle=true"]),
    # rows carrying their own system turn under a template that refuses one: found in stage 1 (only reading the data shows them)
    ("rows-with-system-turns", ["data.source={inputs}/system_turns.jsonl", "model.chat_template=" + NO_SYSTEM],
     ["system_turns.jsonl' line 2 opens with its own system turn", "model.chat_template refuses: System role not supported",
      "move their text into the first user turn"]),
    ("target-module-missing", ["lora.target_modules=[q_proj,qkv_proj]"], ["lora.target_modules", "qkv_proj not in this model", "its linear layers are", "o_proj"]),
]


@pytest.mark.parametrize("case_id, sets, needles", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_stage_problem_is_one_line_exit_1_and_keeps_finished_work(case_id, sets, needles, capfd, finished, inputs, model_folders):
    sets = [s.format(inputs=inputs, models=model_folders["no_weights"].parent) for s in sets]
    args = [a for s in sets for a in ("--set", s)]
    code, output = run_in_process(capfd, finished, "--minutes", "1", *args)
    assert code == 1, output[-3000:]
    assert_one_clear_line(output, "error: ", *needles)
    assert_nothing_lost(finished)


def test_tokenizer_without_chat_template_gets_the_default_and_says_so(finished, caplog, tmp_path):
    from tasks.config import load_config
    from tasks.data import load_dataset_records
    from tasks.models import DEFAULT_CHAT_TEMPLATE

    folder = tmp_path / "no_template"
    shutil.copytree(finished["model_dir"], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={finished['art']}", f"model.name={folder}"])
    rec = load_dataset_records(cfg.data, cfg.model, finished["art"])  # works: this is not an error
    assert (Path(rec.dir) / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    said = [r.getMessage() for r in caplog.records if "no chat template" in r.getMessage()]
    assert len(said) == 1 and "project's default" in said[0] and "model.chat_template" in said[0]


def test_one_oversized_row_among_good_ones_is_dropped_and_counted(finished, tmp_path):
    from tasks.config import load_config
    from tasks.data import load_dataset_records

    src = tmp_path / "mixed.jsonl"
    big = {"messages": [{"role": "user", "content": "x" * (1 << 20)}, {"role": "assistant", "content": "ok"}]}
    weird = {"messages": [{"role": "wizard", "content": "a"}, {"role": "assistant", "content": "b"}]}
    goods = [{"messages": [{**GOOD["messages"][0], "content": f"{GOOD['messages'][0]['content']} ({i})"}, *GOOD["messages"][1:]]} for i in range(20)]
    src.write_text("".join(json.dumps(r) + "\n" for r in goods + [big, weird]))
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={finished['art']}", f"data.source={src}"])
    rec = load_dataset_records(cfg.data, cfg.model, finished["art"])
    assert rec.dropped == {"over max_length": 1, "unknown role": 1}
    assert rec.n_train + rec.n_heldout == 20


def test_deleted_cached_results_are_recomputed_through_the_cli(capfd, finished, tmp_path):
    from flows.cli import main

    art = tmp_path / "artifacts"
    args = ["run", "--profile", "tiny", "--set", f"artifacts_dir={art}"]
    assert main(args) == 0
    shutil.rmtree(art / ".prefect-results")  # Prefect's records of finished stages ...
    shutil.rmtree(next(p for p in art.glob("cache/merge/*") if p.is_dir()))  # ... and one stage's own output folder
    capfd.readouterr()
    assert main(args) == 0, capfd.readouterr().err[-3000:]
    summary = json.loads((Path(json.loads((art / "latest.json").read_text())["summary"])).read_text())
    assert summary["status"] == "completed"
    assert next(art.glob("cache/merge/*/COMPLETE"))


@pytest.mark.slow
def test_stage_error_in_a_real_process_prints_one_line(tmp_path, inputs, prefect_server):
    """The same contract in a real `qlora-pipeline run` process: Prefect's logs carry no traceback either. Against the
    session's Prefect server: the error line is the point, not a temporary server's start (~10 s of CPU)."""
    from prefect.settings import get_current_settings

    art = tmp_path / "artifacts"
    proc = cli("--minutes", "1", "--set", f"artifacts_dir={art}", "--set", f"data.source={inputs}/malformed.jsonl", timeout=300,
               env={"PREFECT_API_URL": str(get_current_settings().api.url)})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert_one_clear_line(proc.stderr + proc.stdout, "error: ", "malformed.jsonl:3", "fix or delete that line")
    assert "Retries are exhausted" not in proc.stderr and "Retrying" not in proc.stderr  # a bad row is not retried


