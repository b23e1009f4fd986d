"""Export for serving (stage 8) and the published model as a user meets it.

Fast: the chat template -> Ollama TEMPLATE split, the training system prompt in the published template, the
converter's one-line errors, the flow with a model llama.cpp cannot convert (earlier stages intact, a fixed
rerun redoes only the export), `chat` after a fully cached run, run names, the suite's own Prefect home.
Slow (one SmolLM2-135M conversion per session, the real converter): GGUF f16/q8_0 logits vs the HF model,
a real llama.cpp server answering like the HF model, the Modelfile's stop tokens in the GGUF vocabulary,
`serve-model` over HTTP on loopback for both formats with a clean Ctrl-C, GPTQ W4A16 when its env exists.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tasks.common import PROJECT_ROOT, StageError

SYSTEM = "Follow the instruction exactly."


def _patched(tok, system: str | None):
    import copy

    from tasks.publish import template_with_system

    tok = copy.deepcopy(tok)
    if system:
        tok.chat_template = template_with_system(tok.chat_template, system)
    return tok


# ---------------------------------------------------------------------------------------------------------
# Fast: templates, Modelfile, errors


def test_published_template_adds_the_training_system_prompt_only_when_a_chat_has_none(tiny_tok):
    tok = _patched(tiny_tok, SYSTEM)
    user = [{"role": "user", "content": "Say 'ok'."}]
    explicit = [{"role": "system", "content": SYSTEM}, *user]
    assert tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == \
        tiny_tok.apply_chat_template(explicit, tokenize=False, add_generation_prompt=True)
    other = [{"role": "system", "content": "Be terse."}, *user]
    assert tok.apply_chat_template(other, tokenize=False) == tiny_tok.apply_chat_template(other, tokenize=False)
    assert SYSTEM not in tok.apply_chat_template(other, tokenize=False)


def test_system_prompt_with_quotes_and_newlines_survives_the_template(tiny_tok):
    odd = 'Say "yes".\nNever \'no\' {{ x }} {% y %} ü'
    tok = _patched(tiny_tok, odd)
    text = tok.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False)
    assert odd.strip() in text


def _smol_like_tokenizer(tiny_tok):
    """The tiny tokenizer with SmolLM2's chat template (its default system turn included)."""
    import copy

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                         "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
                         "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    return tok


@pytest.mark.parametrize("system", [SYSTEM, None])
@pytest.mark.parametrize("template", ["project-default", "smollm2"])
def test_ollama_template_renders_like_the_chat_template(tiny_tok, template, system):
    from tasks.export import check_template_equivalence, default_system, render_with_parts, template_parts

    base = tiny_tok if template == "project-default" else _smol_like_tokenizer(tiny_tok)
    tok = _patched(base, system)
    parts = template_parts(tok)
    effective = system or default_system(tok, parts)
    if template == "smollm2":
        assert parts["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
        assert parts["assistant"] == ("<|im_start|>assistant\n", "<|im_end|>\n")
        assert effective == (system or "You are a helpful AI assistant named SmolLM, trained by Hugging Face")
    else:
        assert effective == system  # the project's default template injects nothing
    check_template_equivalence(tok, parts, effective)  # raises on any difference
    conv = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    explicit = ([{"role": "system", "content": effective}] if effective else []) + conv
    assert render_with_parts(parts, explicit, True) == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_template_that_rewrites_content_is_refused_not_approximated(tiny_tok):
    import copy

    from tasks.export import template_parts

    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}\n{% endfor %}"
    with pytest.raises(StageError, match="export.modelfile=false"):
        template_parts(tok)


def test_modelfile_structure(tiny_tok):
    from tasks.export import modelfile_text, ollama_template, parse_modelfile, template_parts

    parts = template_parts(_patched(_smol_like_tokenizer(tiny_tok), SYSTEM))
    text = modelfile_text("./gguf/m-q8_0.gguf", parts, ["<|im_end|>"], SYSTEM, 2048)
    mf = parse_modelfile(text)
    assert mf["FROM"] == "./gguf/m-q8_0.gguf"
    assert mf["SYSTEM"] == SYSTEM
    assert mf["TEMPLATE"] == ollama_template(parts)
    assert ("stop", "<|im_end|>") in mf["PARAMETER"] and ("num_ctx", "2048") in mf["PARAMETER"]
    # Every literal of the format is a quoted Go string: `{{-` trimming cannot eat the format's newlines.
    assert '{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}' in mf["TEMPLATE"]
    assert mf["TEMPLATE"].count("{{ .Content }}") == 3 and "$last" in mf["TEMPLATE"]


GO_RENDER = r"""package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	src, _ := os.ReadFile(os.Args[1])
	var data struct{ Messages []Message }
	if err := json.NewDecoder(os.Stdin).Decode(&data.Messages); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(string(src)))
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.skipif(shutil.which("go") is None, reason="needs a Go toolchain (Debian: apt-get install golang-go)")
@pytest.mark.parametrize("system", [SYSTEM, None])
def test_ollama_template_executes_in_go_like_the_chat_template(tiny_tok, tmp_path, system):
    """Ollama's TEMPLATE is Go text/template over .Messages (SYSTEM prepended as a message when a chat has none):
    executed by Go itself, it renders what the Jinja chat template renders."""
    from tasks.export import default_system, ollama_template, template_parts

    tok = _patched(_smol_like_tokenizer(tiny_tok), system)
    parts = template_parts(tok)
    effective = system or default_system(tok, parts)
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "t.tmpl").write_text(ollama_template(parts))
    env = {**os.environ, "GOCACHE": str(tmp_path / "gocache"), "GOFLAGS": "-mod=mod", "GO111MODULE": "off"}
    subprocess.run(["go", "build", "-o", str(tmp_path / "render"), str(tmp_path / "render.go")], check=True, env=env, timeout=600)
    convs = [[{"role": "user", "content": "Say hi."}],
             [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "Times {{3}}?"}]]
    for conv in convs:
        messages = [{"role": "system", "content": effective}, *conv]  # what Ollama hands the template
        got = subprocess.run([str(tmp_path / "render"), str(tmp_path / "t.tmpl")], input=json.dumps(messages), capture_output=True,
                             text=True, check=True, timeout=60).stdout
        assert got == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)


def test_converter_failure_is_named_in_one_line():
    from tasks.export import converter_failure

    err = "INFO:hf-to-gguf:Loading model: x\nERROR:hf-to-gguf:Model FancyNetForCausalLM is not supported\n"
    assert converter_failure(err) == "architecture FancyNetForCausalLM is not supported by its version 0.3.36"
    err = "Traceback...\nNotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()\n"
    assert "pre-tokenizer" in converter_failure(err)


def test_converter_archive_is_pinned_by_sha256(tmp_path):
    from tasks.export import install_converter

    bogus = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    bogus.write_bytes(b"not the archive")
    with pytest.raises(StageError, match="sha256"):
        install_converter(bogus, tmp_path / "conv")
    assert not (tmp_path / "conv").exists()


def test_unconvertible_tokenizer_is_one_line_error(tiny_cfg, shared_artifacts, tmp_path):
    """The tiny model's byte-level BPE is not a pre-tokenizer llama.cpp knows: a one-line StageError, no GGUF."""
    from tasks.export import convert_to_gguf, ensure_converter
    from tasks.models import resolve_model

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    with pytest.raises(StageError) as e:
        convert_to_gguf(Path(ref.path), tmp_path / "x.gguf", "f16", ensure_converter())
    msg = str(e.value)
    assert "\n" not in msg and "pre-tokenizer" in msg and "export.gguf=[]" in msg
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------------------
# The flow: export is stage 8; its failure leaves earlier stages intact; the fix redoes only it


@pytest.mark.slow
def test_export_failure_keeps_earlier_stages_and_fixed_rerun_redoes_only_export(prefect_server, tmp_path):
    from flows.finetune import finetune

    art = tmp_path / "artifacts"
    base = [f"artifacts_dir={art}", f"data.system_prompt={SYSTEM}"]
    with pytest.raises(StageError) as e:
        finetune(profile="tiny", overrides=[*base, "export.gguf=[f16]"])
    assert "\n" not in str(e.value) and "GGUF converter cannot convert" in str(e.value)
    latest = json.loads((art / "latest.json").read_text())
    failed = json.loads(Path(latest["summary"]).read_text())
    assert failed["status"] == "failed" and failed["stages"]["export"]["status"] == "failed"
    assert all(failed["stages"][s]["status"] == "completed" for s in ("data", "train", "merge", "publish"))
    assert "-1m-" in failed["run"], "the run name carries the profile's budget (tiny: 1 minute)"

    fixed = finetune(profile="tiny", overrides=[*base, "export.gguf=[]"])
    assert fixed["status"] == "completed" and list(fixed["stages"])[-1] == "export"
    assert [s for s, v in fixed["stages"].items() if not v["cached"]] == ["export"]
    pub = Path(fixed["published"])
    card = (pub / "README.md").read_text()
    assert "github.com" not in card and json.dumps(SYSTEM) in card and '"role": "system"' in card

    # `chat` without a run name after that fully cached rerun: found through the run's summary.json.
    from tasks.publish import find_run

    assert find_run(None, str(art)) == pub
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "chat", "--prompt", "Say ok.", "--max-new-tokens", "4",
                           "--artifacts-dir", str(art)], capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_find_run_follows_the_summary_of_a_cached_run(tmp_path):
    from tasks.common import write_json
    from tasks.publish import MANIFEST, find_run

    first = tmp_path / "runs" / "demo-5m-1" / "model"
    (first / "merged").mkdir(parents=True)
    (first / "merged" / "config.json").write_text("{}")
    write_json(first / MANIFEST, {"files": [{"path": "merged/config.json", "bytes": 2, "sha256": "x"}]})
    write_json(tmp_path / "runs" / "demo-5m-2" / "summary.json", {"published": str(first), "status": "completed"})
    write_json(tmp_path / "latest.json", {"run": "demo-5m-2"})
    assert find_run(None, str(tmp_path)) == first
    assert find_run("demo-5m-2", str(tmp_path)) == first
    with pytest.raises(StageError, match="no published model"):
        find_run("demo-5m-3", str(tmp_path))
    # A summary pointing outside this artifacts folder is not followed.
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    shutil.copytree(first, outside)
    write_json(tmp_path / "runs" / "demo-5m-4" / "summary.json", {"published": str(outside)})
    with pytest.raises(StageError, match="no published model"):
        find_run("demo-5m-4", str(tmp_path))


def test_budget_label_names_the_real_budget():
    from flows.finetune import budget_label

    assert budget_label(None, 5) == "5m" and budget_label(4, None) == "4h" and budget_label(1, 30) == "1h30m"
    assert budget_label(None, None) is None


def test_suite_runs_against_its_own_prefect_home():
    from prefect.settings import get_current_settings

    from conftest import TEST_PREFECT_HOME

    s = get_current_settings()
    assert Path(s.home).resolve() == Path(TEST_PREFECT_HOME).resolve()
    assert Path(s.home).resolve() != (Path.home() / ".prefect").resolve()
    # The database is the suite's (or, once a test started prefect_test_harness, the harness's temporary one): never the user's.
    url = s.server.database.connection_url
    url = str(url.get_secret_value() if hasattr(url, "get_secret_value") else url)
    assert str((Path.home() / ".prefect").resolve()) not in url
    # Subprocesses (the CLI tests) inherit it.
    out = subprocess.run([sys.executable, "-c", "from prefect.settings import get_current_settings as g; print(g().home)"],
                         capture_output=True, text=True, timeout=120).stdout.strip()
    assert Path(out).resolve() == Path(TEST_PREFECT_HOME).resolve()


@pytest.mark.parametrize("fmt", ["gguf", "merged"])
def test_serve_model_on_a_port_in_use_is_one_line_naming_the_port(tmp_path, fmt):
    """A port another process listens on: `error: ...` naming the port and --port, exit 1, before any server starts
    (llama.cpp's server ended in a RuntimeError traceback; transformers serve would fail only after loading the
    model). The weights are stubs: nothing loads them."""
    import struct

    from tasks.common import write_json
    from tasks.publish import MANIFEST

    pub = tmp_path / "runs" / "busy" / "model"
    (pub / "gguf").mkdir(parents=True)
    # headers only (v3, 1 tensor, 0 keys; an empty safetensors index): they pass the damaged-file checks
    (pub / "gguf" / "model-q8_0.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0))
    (pub / "merged").mkdir()
    (pub / "merged" / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    write_json(pub / MANIFEST, {"files": []})
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "serve-model", "busy", "--format", fmt, "--port", str(port),
                               "--artifacts-dir", str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out[-3000:]
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0] and f"--port {port + 1}" in lines[0]


def test_busy_port_is_found_on_every_address_the_host_resolves_to(monkeypatch):
    """`localhost` resolving to ::1 first, with 127.0.0.1 taken: the servers bind both, so the check tries both."""
    from tasks.export import require_free_port

    real = socket.getaddrinfo
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("::1", *a, **k) + real("127.0.0.1", *a, **k))
        with pytest.raises(StageError, match=f"port {port} on localhost is already in use"):
            require_free_port("localhost", port)
    require_free_port("localhost", port)  # released: free on both


# ---------------------------------------------------------------------------------------------------------
# Slow: the real SmolLM2-135M, converted once per session


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def smol_export(publish_smollm2):
    """SmolLM2-135M published and exported to GGUF f16 + q8_0 (the demo profile's export)."""
    return publish_smollm2("smol-export", SYSTEM)


def _hf(pub: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(pub / "merged"))
    model = AutoModelForCausalLM.from_pretrained(str(pub / "merged"), dtype=torch.float32).eval()
    return tok, model


@pytest.mark.slow
def test_gguf_logits_agree_with_the_merged_model(smol_export):
    """Reloaded with transformers (`gguf_file=`): top-1 agreement on held-out chats, f16 >= 99%, q8_0 >= 90%. Each file
    parsed once, as the pipeline loads a GGUF (tasks.models.gguf_parsed_once): the same loader and weights, ~40 s less a file."""
    import torch
    from transformers import AutoModelForCausalLM

    from tasks.models import gguf_parsed_once

    rec, pub, heldout, _ = smol_export
    tok, ref_model = _hf(pub)
    texts = [tok.apply_chat_template(m[1:], tokenize=False) for m in heldout[:6]]  # system turn from the template
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"].bool()
    with torch.inference_mode():
        want = ref_model(**enc).logits.argmax(-1)[mask]
    agreement = {}
    for outtype, path in rec.gguf.items():
        with gguf_parsed_once():
            g = AutoModelForCausalLM.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, dtype=torch.float32).eval()
        with torch.inference_mode():
            got = g(**enc).logits.argmax(-1)[mask]
        agreement[outtype] = float((got == want).float().mean())
        del g
    print(f"\nGGUF top-1 agreement with the HF model on {int(mask.sum())} held-out tokens: {agreement}")
    assert agreement["f16"] >= 0.99 and agreement["q8_0"] >= 0.90, agreement


@pytest.mark.slow
def test_modelfile_stop_tokens_exist_in_the_gguf_vocabulary(smol_export):
    import gguf

    from tasks.export import parse_modelfile

    rec, pub, _, _ = smol_export
    mf = parse_modelfile(Path(rec.modelfile).read_text())
    target = (pub / mf["FROM"]).resolve()
    assert target.is_file() and target.name.endswith("-q8_0.gguf")
    reader = gguf.GGUFReader(str(target))
    field = reader.fields["tokenizer.ggml.tokens"]
    vocab = {bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data}
    stops = [v for k, v in mf["PARAMETER"] if k == "stop"]
    assert stops == ["<|im_end|>"] and all(s in vocab for s in stops)
    assert mf["SYSTEM"] == SYSTEM
    template = bytes(reader.fields["tokenizer.chat_template"].parts[-1]).decode()
    assert SYSTEM in template, "the GGUF's embedded chat template carries the training system prompt"
    card = (pub / "README.md").read_text()
    assert "## Deploy" in card and "ollama create" in card and card.count("## Deploy") == 1
    manifest = json.loads((pub / "MANIFEST.json").read_text())
    assert {"Modelfile", f"gguf/{target.name}"} <= {f["path"] for f in manifest["files"]}


def _post(url: str, body: dict, timeout: float = 300, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _wait_ready(proc, url: str, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, _output(proc)[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)  # a server start found ~0.4 s sooner on average than at a poll a second
    raise AssertionError(f"{url} not ready in {timeout}s")


def _serve_model(pub_run: str, art: str, fmt: str, port: int, *extra: str):
    # Output to a file, not a pipe nobody reads while the server runs: a server's logs fill a 64 KiB pipe, and a child
    # blocked on a full pipe cannot shut down on Ctrl-C (seen: a 60-s hang in the fresh-clone run).
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve-{fmt}-", suffix=".log", delete=False)
    # Started with SIGINT ignored, as a shell without job control starts a background command (`make test &`, a
    # script's `serve-model &`): serve-model must still stop on Ctrl-C. (Found: both tests hung for 60 s whenever the
    # suite itself ran in the background, and passed in a terminal.)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", pub_run, "--format", fmt, "--port", str(port),
                             "--artifacts-dir", art, "--ctx", "1024", *extra],
                            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    proc.log_path = log.name
    return proc


def _output(proc) -> str:
    return Path(proc.log_path).read_text(errors="replace")


def _stop_with(proc, sig=signal.SIGINT) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.mark.slow
def test_serve_model_gguf_answers_like_the_merged_model_and_stops_on_ctrl_c(smol_export, smollm2_artifacts):
    """A real llama.cpp server (xllamacpp) on the f16 GGUF via `serve-model --format gguf`: a held-out prompt's
    greedy answer equals the HF model's, it stops at end-of-turn, and Ctrl-C shuts it down with exit 0.
    (f16: q8_0 agrees on ~97% of tokens, so a long greedy answer may fork; its logits are checked above.)"""
    import torch

    rec, pub, heldout, data = smol_export
    tok, model = _hf(pub)
    # The first held-out prompt the HF model answers and closes within 32 tokens with no near-tie on the way: a
    # greedy step whose top-2 logits are within 0.25 may flip under llama.cpp's f16 kernels (measured: SmolLM2's
    # 'SHEET' vs 'SHEEP' at a margin of 0.001), which says nothing about the export.
    for conv in heldout:
        prompt = conv[1:-1]  # user turn only: the published template adds the training system prompt
        enc = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=32, do_sample=False, eos_token_id=data.stop_token_ids,
                                 output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, enc["input_ids"].shape[1]:]
        margin = min(float(t[0] - t[1]) for t in (sc[0].topk(2).values for sc in out.scores))
        if new[-1].item() in data.stop_token_ids and margin >= 0.25:
            break
    else:
        pytest.fail("the HF model closed no held-out answer within 32 tokens without a near-tie")
    want = tok.decode(new, skip_special_tokens=True).strip()

    port = _free_port()
    proc = _serve_model("smol-export", smollm2_artifacts, "gguf", port, "--gguf-type", "f16", "--api-key", "k-gguf")
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health")
        request = {"model": pub.name, "messages": prompt, "max_tokens": 32, "temperature": 0, "top_k": 1}
        with pytest.raises(urllib.error.HTTPError) as denied:  # llama.cpp's own API-key check
            _post(f"http://127.0.0.1:{port}/v1/chat/completions", request)
        assert denied.value.code == 401
        got = _post(f"http://127.0.0.1:{port}/v1/chat/completions", request, key="k-gguf")
        # another model's name is answered by the one model, named as published: what the merged format does too
        other = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {**request, "model": "gpt-4o-mini", "max_tokens": 2}, key="k-gguf")
        assert other["model"] == pub.name, other
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer k-gguf"})
        with urllib.request.urlopen(req, timeout=60) as r:
            models = json.loads(r.read())
        assert [m["id"] for m in models["data"]] == [pub.name], models  # listed under the published name
    finally:
        rc = _stop_with(proc)
    answer = got["choices"][0]["message"]["content"].strip()
    print(f"\nprompt: {prompt[-1]['content']!r}\nHF: {want!r}\nllama.cpp f16: {answer!r} ({got['choices'][0]['finish_reason']})")
    assert answer == want
    assert got["choices"][0]["finish_reason"] == "stop" and "<|im_end|>" not in answer
    assert rc == 0 and "stopped" in _output(proc)


@pytest.mark.slow
def test_serve_model_merged_with_transformers_serve_stops_on_sigterm(smol_export, smollm2_artifacts):
    """`docker stop` / systemd / `kill` send SIGTERM: the server behind serve-model stops too (no orphan on the port)."""
    rec, pub, heldout, _ = smol_export
    port = _free_port()
    proc = _serve_model("smol-export", smollm2_artifacts, "merged", port)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health")
        got = _post(f"http://127.0.0.1:{port}/v1/chat/completions",
                    {"model": pub.name, "messages": heldout[0][1:-1], "max_tokens": 16, "temperature": 0})  # the published name
    finally:
        rc = _stop_with(proc, signal.SIGTERM)
    assert got["choices"][0]["message"]["content"].strip()
    assert rc == 0 and "stopped" in _output(proc)
    with pytest.raises(OSError):  # the server process is gone, not left listening
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


GPTQ_PY = PROJECT_ROOT / ".venv-gptq" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not GPTQ_PY.is_file(), reason="llmcompressor's environment not created (make gptq-env)")
def test_gptq_w4a16_reloads_and_generates(smol_export, tmp_path):
    from tasks.export import GPTQ_SCRIPT

    rec, pub, heldout, data = smol_export
    out = tmp_path / "gptq"
    subprocess.run([str(GPTQ_PY), str(GPTQ_SCRIPT), str(pub / "merged"), str(out), "--calib", str(Path(data.dir) / "train"),
                    "--samples", "8"], check=True, timeout=1200)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    code = ("import sys,torch; from transformers import AutoModelForCausalLM, AutoTokenizer; p=sys.argv[1];"
            "t=AutoTokenizer.from_pretrained(p); m=AutoModelForCausalLM.from_pretrained(p);"
            "e=t.apply_chat_template([{'role':'user','content':'Say ok.'}],add_generation_prompt=True,return_tensors='pt',return_dict=True);"
            "print(repr(t.decode(m.generate(**e,max_new_tokens=8,do_sample=False)[0][e['input_ids'].shape[1]:])))")
    done = subprocess.run([str(GPTQ_PY), "-c", code, str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip()) > 2


@pytest.mark.slow
def test_serve_model_gguf_stops_within_seconds_while_a_request_streams(smol_export, smollm2_artifacts):
    """SIGTERM while an answer streams: llama.cpp's server waited for it until its client gave up (150 s); the stop
    now cuts it off after tasks.export.GGUF_STOP_GRACE_S."""
    import http.client
    import threading

    from tasks.export import GGUF_STOP_GRACE_S

    rec, pub, heldout, _ = smol_export
    port = _free_port()
    proc = _serve_model("smol-export", smollm2_artifacts, "gguf", port, "--gguf-type", "f16")
    streamed = threading.Event()

    def long_stream() -> None:
        body = {"model": pub.name, "messages": [{"role": "user", "content": "Tell a very long story."}], "max_tokens": 4000,
                "ignore_eos": True, "stream": True}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=150) as r:
                r.readline()
                streamed.set()
                r.read()
        except (OSError, http.client.HTTPException):
            pass

    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}/health")
        client = threading.Thread(target=long_stream, daemon=True)
        client.start()
        assert streamed.wait(60), "no streamed token within 60 s"
        time.sleep(1)
        t0 = time.monotonic()
        rc = _stop_with(proc, signal.SIGTERM)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nstopped in {took:.1f} s with a request in flight (exit {rc})")
    assert took < GGUF_STOP_GRACE_S + 10 and rc in (0, 1) and "stopping" in _output(proc), _output(proc)[-3000:]


@pytest.mark.parametrize("damage", ["gguf", "built.json"])
def test_a_complete_export_folder_with_a_gguf_gone_names_itself_and_the_fix(tmp_path, damage):
    # A review: a GGUF deleted from a complete cache/export/<key>/ (to save space) failed in the install as a raw
    # FileNotFoundError naming neither the folder nor a fix.
    from tasks.common import COMPLETE
    from tasks.export import _built

    out = tmp_path / "export" / "k"
    (out / "gguf").mkdir(parents=True)
    (out / "gguf" / "m-Q4_K_M.gguf").write_bytes(b"GGUF")
    (out / "Modelfile").write_text("FROM ./gguf/m-Q4_K_M.gguf\n")
    built = {"gguf": {"Q4_K_M": "gguf/m-Q4_K_M.gguf"}, "modelfile": "Modelfile", "gptq": None}
    (out / "built.json").write_text(json.dumps(built))
    (out / COMPLETE).touch()
    assert _built(out) == built
    if damage == "gguf":
        (out / "gguf" / "m-Q4_K_M.gguf").unlink()
        match = "gguf/m-Q4_K_M.gguf is gone"
    else:
        (out / "built.json").write_text("{")
        match = "built.json cannot be read"
    with pytest.raises(StageError, match=f"{out} is marked complete but .*{match}.*; delete that folder and rerun"):
        _built(out)


def _byte_level_bpe(folder: Path, *, as_5_17_saves_it: bool) -> Path:
    """A byte-level BPE tokenizer (GPT-2's kind, SmolLM2's) saved to `folder`; `as_5_17_saves_it`: tokenizer.json as
    transformers 5.17 writes one built from a GGUF's "gpt2" vocabulary (byte fallback on; a ByteFallback, Fuse,
    Replace-▁, ByteLevel decoder), read 2026-12-07 from SmolLM2's GGUF on 5.17.0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world\n", "the quick brown fox\n"] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))
    (folder / "config.json").write_text('{"model_type": "llama"}')
    if as_5_17_saves_it:
        data = json.loads((folder / "tokenizer.json").read_text())
        data["model"]["byte_fallback"] = True
        data["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"},
                                                            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
        (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_the_converter_reads_a_byte_level_bpe_saved_with_byte_fallback_as_the_bpe_it_is(tmp_path):
    """transformers 5.17 saves a GGUF's byte-level BPE tokenizer with byte fallback on, and gguf-py's vocabulary check
    (LlamaHfVocab, which convert_hf_to_gguf.py tries before GPT-2's) took it for Llama's SentencePiece one: llama.cpp
    then refused the GGUF ("SPM vocabulary, but newline token not found"; tests/test_export.py's serve-model GGUF tests
    on 5.17). `converter_view` hands the converter the flag off, the ids unchanged; a tokenizer saved without it goes
    as it is."""
    from gguf.vocab import LlamaHfVocab
    from transformers import AutoTokenizer

    from tasks.export import converter_view

    def taken_for_sentencepiece(folder: Path) -> bool:
        try:
            LlamaHfVocab(folder)
        except FileNotFoundError:  # "Cannot find Llama BPE tokenizer": the converter goes on to GPT-2's vocabulary
            return False
        return True

    saved = _byte_level_bpe(tmp_path / "m", as_5_17_saves_it=True)
    assert taken_for_sentencepiece(saved)  # the converter's view of the folder as 5.17 saved it
    view = converter_view(saved, tmp_path / "work")
    assert view != saved and view.name == saved.name  # the converter names the model from its folder
    assert not taken_for_sentencepiece(view)
    text = "hello world\nthe quick brown fox"
    assert AutoTokenizer.from_pretrained(str(view))(text).input_ids == AutoTokenizer.from_pretrained(str(saved))(text).input_ids
    assert all((view / p.name).resolve() == p.resolve() for p in saved.iterdir() if p.name != "tokenizer.json")

    clean = _byte_level_bpe(tmp_path / "c", as_5_17_saves_it=False)
    assert not taken_for_sentencepiece(clean)
    assert converter_view(clean, tmp_path / "work2") == clean


def test_an_export_converted_through_the_view_has_a_key_of_its_own_and_every_other_keeps_its_key(tmp_path):
    """A GGUF built on transformers 5.17 before `converter_view` holds a vocabulary llama.cpp refuses: its export is keyed
    apart (built again, not reused), while a folder the view leaves alone keeps the key it had (no export redone)."""
    from types import SimpleNamespace

    from tasks.common import file_sha256, fingerprint
    from tasks.config import ExportSection
    from tasks.export import CONVERTER_VERSION, EXPORT_VERSION, build_key

    def key(folder: Path, gguf: list[str]) -> str:
        return build_key(SimpleNamespace(key="m"), SimpleNamespace(merged_dir=str(folder)), ExportSection(gguf=gguf),
                         SimpleNamespace(stop_token_ids=[0]))

    saved = _byte_level_bpe(tmp_path / "m", as_5_17_saves_it=True)
    clean = _byte_level_bpe(tmp_path / "c", as_5_17_saves_it=False)
    assert key(saved, ["f16"]) != key(clean, ["f16"])  # only tokenizer.json differs, which the template hash does not read
    assert key(saved, []) == key(clean, [])  # nothing converted: nothing to tell apart
    template = [file_sha256(clean / "chat_template.jinja") if (clean / "chat_template.jinja").is_file() else None,
                file_sha256(clean / "tokenizer_config.json")]
    before = fingerprint("export", EXPORT_VERSION, "m", template, [0], ExportSection(gguf=["f16"]).model_dump(mode="json"),
                         CONVERTER_VERSION)
    assert key(clean, ["f16"]) == before  # the key as it was before the view


def _exported(folder: Path, gguf: Path) -> Path:
    """`gguf` listed in `folder`'s MANIFEST.json, as the export's install lists the GGUFs it wrote (its `_update_manifest`)."""
    from tasks.export import _update_manifest

    _update_manifest(folder)
    return gguf


def _tiny_gguf(path: Path, tokens: list[str], **ids: int) -> Path:
    """A GGUF holding `tokens` as its vocabulary, `ids` as tokenizer.ggml.<name>_token_id, and two small tensors."""
    import numpy as np
    from gguf import GGUFValueType, GGUFWriter

    w = GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    for name, i in ids.items():
        w.add_key_value(f"tokenizer.ggml.{name}_token_id", i, GGUFValueType.UINT32)
    w.add_tensor("a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b", np.arange(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_mark_end_of_turn_writes_the_stops_llama_cpp_would_not_end_at_into_the_free_keys_and_keeps_the_rest(tmp_path):
    """serve-15: llama.cpp ends generation at the GGUF's EOS / EOT / EOM ids and at tokens it knows by their text
    (<|im_end|>, </s>, ...). A template's own end-of-turn token is none of them: it goes into the EOT key, a second into
    the EOM key, a third is named in one line (no key left); the tensors and every other key are kept. A GGUF whose
    stops llama.cpp already ends at is not rewritten."""
    from gguf import GGUFReader

    from tasks.export import mark_end_of_turn

    tokens = ["<s>", "</s>", "<|turn_end|>", "<|reply_end|>", "<|third|>", "<|im_end|>"]
    path = _tiny_gguf(tmp_path / "m.gguf", tokens, bos=0, eos=1)
    before = path.read_bytes()
    assert mark_end_of_turn(path, [1, 5]) == [] and path.read_bytes() == before  # EOS and a known text: nothing to write
    said = mark_end_of_turn(path, [1, 2, 3, 4, 5])
    assert len(said) == 1 and "'<|third|>' (id 4)" in said[0] and "--format merged" in said[0] and "\n" not in said[0], said
    reader = GGUFReader(str(path))
    f = reader.fields
    assert (f["tokenizer.ggml.eot_token_id"].contents(), f["tokenizer.ggml.eom_token_id"].contents()) == (2, 3)
    assert f["tokenizer.ggml.eos_token_id"].contents() == 1 and f["tokenizer.ggml.tokens"].contents() == tokens
    assert f["general.architecture"].contents() == "llama"
    got = {t.name: t.data.tolist() for t in reader.tensors}
    assert got == {"a": [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]], "b": [0, 1, 2, 3, 4]}, got
    assert not list(tmp_path.glob("*.marking"))
    marked = path.read_bytes()
    assert mark_end_of_turn(path, [1, 2, 3, 5]) == [] and path.read_bytes() == marked  # a second run: nothing left to write


def test_serve_model_gguf_warns_in_one_line_where_a_gguf_exported_before_the_marks_does_not_stop_at_the_end_of_turn(tmp_path):
    """A GGUF exported before `mark_end_of_turn` keeps running on past a template's own end-of-turn token:
    gguf_stops (serve-model --format gguf prints its line) names the token and the fix; none once it is marked, and
    none where the published summary.json does not tell (merged serving and `chat` name a bad summary)."""
    from tasks.common import write_json
    from tasks.export import gguf_stops, mark_end_of_turn

    gguf = _exported(tmp_path, _tiny_gguf(tmp_path / "m.gguf", ["<s>", "</s>", "<|turn_end|>"], bos=0, eos=1))
    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
    line = gguf_stops(gguf, tmp_path).line
    assert line.startswith("warning: m.gguf does not end answers at '<|turn_end|>' (id 2)") and "\n" not in line, line
    assert "qlora-pipeline run" in line and "--format merged" in line
    for summary in ({"data": {}}, {"data": {"stop_token_ids": "2"}}, []):
        write_json(tmp_path / "summary.json", summary)
        assert gguf_stops(gguf, tmp_path) == (None, []), summary
    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
    mark_end_of_turn(gguf, [1, 2])
    assert gguf_stops(gguf, tmp_path) == (None, [])


# ---------------------------------------------------------------------------------------------------------
# review-serve15: defects found in serve-15 (fixed in fix-serve15)


def test_serve_warning_for_a_gguf_the_export_wrote_without_a_free_key_does_not_send_the_user_to_rerun_the_export(tmp_path):
    """mark_end_of_turn leaves a third own end-of-turn token unmarked (EOT and EOM taken) and the export logs so; the
    serve-time warning then says the file was exported before the marks and that rerunning `qlora-pipeline run` exports
    it again: the rerun hits the same key (or rebuilds the same GGUF), and the warning comes back on every start."""
    from tasks.common import write_json
    from tasks.export import gguf_stops, mark_end_of_turn

    gguf = _tiny_gguf(tmp_path / "m.gguf", ["<s>", "</s>", "<|a|>", "<|b|>", "<|c|>"], bos=0, eos=1)
    said = mark_end_of_turn(gguf, [1, 2, 3, 4])
    assert len(said) == 1 and "'<|c|>' (id 4)" in said[0], said  # what the export itself logs
    _exported(tmp_path, gguf)
    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2, 3, 4]}})
    line = gguf_stops(gguf, tmp_path).line
    assert line is not None and "'<|c|>' (id 4)" in line, line
    assert "exported before" not in line and "export it again" not in line, line


@pytest.mark.parametrize("tokens", [["</s>", "<|tool_response>"], ["<|end|>", "<|return|>", "<|call|>"]])
def test_serve_warns_where_llama_cpp_drops_a_known_end_of_turn_text_from_its_end_of_generation_ids(tmp_path, tokens):
    """llama.cpp's vocabulary loader (llama-vocab.cpp, after the text list) removes '</s>' from its end-of-generation ids
    where '<|tool_response>' is one too (gemma4/plamo), and '<|end|>' where '<|return|>' and '<|call|>' are (gpt-oss).
    A published stop id spelt so (the template's end of turn, not the EOS) is then one llama.cpp never ends an answer at:
    SmolLM2 q8_0 with <|im_end|> respelt so, xllamacpp 2026.10.11549: finish_reason length 64/64, with or without
    tokenizer.ggml.eot_token_id=2. unmarked_stops counted it as known, so neither the export nor serve-model says so."""
    from tasks.common import write_json
    from tasks.export import gguf_stops

    gguf = _tiny_gguf(tmp_path / "m.gguf", ["<s>", "<|endoftext|>", *tokens], bos=0, eos=1)
    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
    line = gguf_stops(gguf, tmp_path).line
    assert line is not None and f"{tokens[0]!r} (id 2)" in line, line


def test_end_of_turn_lines_name_the_fix_that_works_for_each_reason(tmp_path):
    """fix-serve15: the export and serve-model say in one line why a stop id does not end GGUF answers, with the fix that
    works for that reason: no free key (both taken: --format merged; no rerun), llama.cpp taking a known text out of
    its end-of-generation ids again (not marked, the file left as it is: --format merged or the request's stop), and
    only a GGUF with a free key is sent back to the export. '</s>' without '<|tool_response>' still stops: no line."""
    from gguf import GGUFReader

    from tasks.common import write_json
    from tasks.export import gguf_stops, mark_end_of_turn

    gguf = _exported(tmp_path, _tiny_gguf(tmp_path / "m.gguf", ["<s>", "<|endoftext|>", "<|end|>", "<|return|>", "<|call|>", "<|own|>"], bos=0, eos=1))
    before = gguf.read_bytes()
    said = mark_end_of_turn(gguf, [1, 2])
    assert len(said) == 1 and "'<|end|>' (id 2)" in said[0] and "'<|return|>' and '<|call|>'" in said[0], said
    assert "-r '<|end|>'" in said[0] and "\n" not in said[0] and gguf.read_bytes() == before  # a mark would be taken out
    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2, 5]}})
    line = gguf_stops(gguf, tmp_path).line
    assert line.startswith("warning: m.gguf does not end answers at '<|own|>' (id 5), '<|end|>' (id 2),") and "\n" not in line, line
    assert "rerun the run's `qlora-pipeline run`" in line and "\"stop\"" in line, line  # <|own|> has a free key: a rerun marks it
    assert mark_end_of_turn(gguf, [1, 2, 5]) == said and GGUFReader(str(gguf)).fields["tokenizer.ggml.eot_token_id"].contents() == 5
    _exported(tmp_path, gguf)
    stops = gguf_stops(gguf, tmp_path)  # '<|end|>' alone: a stop string ends its answers, a note and no warning
    assert stops.line.startswith("note: ") and "'<|own|>'" not in stops.line and "'<|end|>' (id 2)" in stops.line, stops
    assert stops.strings == ["<|end|>"]

    full = _tiny_gguf(tmp_path / "full.gguf", ["<s>", "</s>", "<|a|>", "<|b|>", "<|c|>"], bos=0, eos=1, eot=2, eom=3)
    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 4]}})
    line = gguf_stops(full, tmp_path).line
    assert "'<|c|>' (id 4)" in line and "both taken" in line and "--format merged" in line and "qlora-pipeline run" not in line, line

    plain = _tiny_gguf(tmp_path / "plain.gguf", ["<s>", "<|endoftext|>", "</s>"], bos=0, eos=1)
    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
    assert gguf_stops(plain, tmp_path) == (None, []) and mark_end_of_turn(plain, [1, 2]) == []


# ---------------------------------------------------------------------------------------------------------
# serve16: the fixes the GGUF stop lines name, run


def test_a_gguf_the_export_did_not_write_gets_the_gguf_new_metadata_command_that_marks_it_and_the_command_works(tmp_path):
    """A GGUF put in gguf/ by hand (one's own llama-quantize or download: not in the folder's MANIFEST.json at its size)
    that lacks the mark was told to rerun the export, which rewrites only the export's own files. Its line now names the
    gguf package's own gguf-new-metadata command (gguf-set-metadata changes only keys a file has); run as printed, it
    marks the file in place, tensors and keys kept, and serve-model has nothing left to say. One the export installed
    keeps the rerun."""
    import shlex
    import subprocess

    import numpy as np
    from gguf import GGUFReader

    from tasks.common import write_json
    from tasks.export import gguf_stops

    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2, 3]}})
    (tmp_path / "gguf").mkdir()
    ours = _exported(tmp_path, _tiny_gguf(tmp_path / "gguf" / "m-q8_0.gguf", ["<s>", "</s>", "<|a|>", "<|b|>"], bos=0, eos=1))
    assert "rerun the run's `qlora-pipeline run`" in gguf_stops(ours, tmp_path).line
    own = _tiny_gguf(tmp_path / "gguf" / "m-q4_k_m.gguf", ["<s>", "</s>", "<|a|>", "<|b|>"], bos=0, eos=1)  # after the export
    line = gguf_stops(own, tmp_path).line
    assert line.startswith("warning: m-q4_k_m.gguf does not end answers at '<|a|>' (id 2), '<|b|>' (id 3)") and "\n" not in line, line
    assert "qlora-pipeline run" not in line and "export it again" not in line, line
    command = line.split("mark it with `", 1)[1].split("`", 1)[0]
    assert "gguf-new-metadata" in command or "gguf.scripts.gguf_new_metadata" in command, command
    assert shlex.split(command)[-1] == str(own), command
    done = subprocess.run(command, shell=True, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0, done.stderr
    fields = GGUFReader(str(own)).fields
    assert (fields["tokenizer.ggml.eot_token_id"].contents(), fields["tokenizer.ggml.eom_token_id"].contents()) == (2, 3)
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 0 and fields["tokenizer.ggml.tokens"].contents()[3] == "<|b|>"
    assert np.array_equal(GGUFReader(str(own)).tensors[0].data, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert gguf_stops(own, tmp_path) == (None, []) and not list((tmp_path / "gguf").glob("*.marked"))


def test_dropped_end_of_turn_texts_get_the_fix_measured_for_each(tmp_path):
    """llama.cpp drops '</s>' (beside '<|tool_response>') and '<|end|>' (beside '<|return|>' and '<|call|>') from its
    end-of-generation ids. Measured on xllamacpp's server (SmolLM2 respelt so, test_use_the_model's slow tests):
    '<|end|>' stays one token and reaches the answer, so a stop string ends it: serve-model sets it as the server's
    default stop and says so in a note, not a warning. '</s>' is read as plain text in the prompt too: the answers are
    nonsense with or without "stop", so the line names --format merged alone and no stop string."""
    from tasks.common import write_json
    from tasks.export import gguf_stops

    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
    end = gguf_stops(_tiny_gguf(tmp_path / "end.gguf", ["<s>", "<|endoftext|>", "<|end|>", "<|return|>", "<|call|>"], bos=0, eos=1), tmp_path)
    assert end.strings == ["<|end|>"] and end.line.startswith("note: ") and "\n" not in end.line, end
    assert "add '<|end|>' to it" in end.line and "-r '<|end|>'" in end.line, end
    s = gguf_stops(_tiny_gguf(tmp_path / "s.gguf", ["<s>", "<|endoftext|>", "</s>", "<|tool_response>"], bos=0, eos=1), tmp_path)
    assert s.strings == [] and s.line.startswith("warning: s.gguf does not end answers at '</s>' (id 2)"), s
    assert "--format merged" in s.line and "does not help" in s.line and "send '</s>'" not in s.line, s


def test_the_card_s_llama_server_command_passes_the_stop_strings_serve_model_sets_and_only_those(tmp_path):
    """A review (2026-12-08): serve-model ends a GGUF's answers at '<|end|>' where llama.cpp drops it from its
    end-of-generation ids (its default stop string, llama-server's -r), but the card printed `llama-server -m ...
    --jinja` without it, so the card's command ran on (run on llama.cpp's server: test_use_the_model's slow
    test_the_card_s_llama_server_command_...). The deploy section now passes `gguf_stops`' strings as -r, read from the
    folder being assembled (`_update_card`'s), and the installed card is the one `card_says_it` expects; a GGUF whose
    stops llama.cpp ends at gets the command as before, without -r."""
    from tasks.common import write_json
    from tasks.export import ExportRecord, _update_card, deploy_section, gguf_stops

    built = {"gguf": {"f16": "gguf/m-f16.gguf"}, "modelfile": None, "gptq": None}
    shown = tmp_path / "runs" / "r1" / "m"
    for tokens, want in ((["<s>", "<|endoftext|>", "<|end|>", "<|return|>", "<|call|>"], ["<|end|>"]),
                         (["<s>", "<|endoftext|>", "<|im_end|>", "<|return|>", "<|call|>"], [])):
        folder = tmp_path / "assembling" / tokens[2].strip("<|>")
        (folder / "gguf").mkdir(parents=True)
        gguf = _tiny_gguf(folder / built["gguf"]["f16"], tokens, bos=0, eos=1)
        write_json(folder / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
        (folder / "README.md").write_text("# m\n")
        assert gguf_stops(gguf, folder).strings == want  # what serve-model sets as the server's default
        _update_card(folder, built, shown=shown)
        card = (folder / "README.md").read_text()
        command = next(line for line in card.splitlines() if line.startswith("llama-server "))
        reverse = "".join(f" -r '{s}'" for s in want)
        assert command.startswith(f"llama-server -m {shown / built['gguf']['f16']} --jinja{reverse} --port 8080 "), command
        assert ("add `<|end|>` to that list" in card) == bool(want), card
        assert ("-r '<|end|>'" in deploy_section(folder, built)) == bool(want)  # read from `pub` itself where no `files`
        _update_card(folder, built, shown=folder)  # installed in place: the card is the one the record expects
        rec = ExportRecord(key="k", dir=str(tmp_path), published_dir=str(folder), gguf={"f16": str(gguf)}, gguf_bytes={"f16": 1},
                           modelfile=None, gptq_dir=None, stop_tokens=[], system_prompt=None, seconds={})
        assert rec.card_says_it() and (f"--jinja{reverse} --port" in (folder / "README.md").read_text())


HARMONY_TEMPLATE = (  # the released gpt-oss template's turn endings, without its system and tool parts
    "{{- '<|start|>system<|message|>Reasoning: medium<|end|>' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' and loop.last and not add_generation_prompt -%}"
    "{{- '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|return|>' -}}"  # what training ends answers with
    "{%- elif m.role == 'assistant' -%}{{- '<|start|>assistant<|channel|>final<|message|>' + m.content + '<|end|>' -}}"
    "{%- else -%}{{- '<|start|>' + m.role + '<|message|>' + m.content + '<|end|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}")
HARMONY_TOKENS = ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
                  "<|message|>", "<|call|>"]


def _harmony_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer saved as gpt-oss's is (tokenizer_config.json: bos <|startoftext|>, eos <|return|>, pad
    <|endoftext|>, the harmony tokens added as special, no extra special tokens) with a harmony chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    byte_level.pre_tokenizer, byte_level.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_level, bos_token="<|startoftext|>", eos_token="<|return|>", pad_token="<|endoftext|>")
    tok.add_tokens(HARMONY_TOKENS, special_tokens=True)
    tok.chat_template = HARMONY_TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


def test_gpt_oss_s_end_of_message_token_is_no_published_stop_and_warns_only_where_answers_end_at_it(tmp_path):
    """gpt-oss (harmony) ends an answer with <|return|> (its EOS, an end-of-generation id); <|end|> ends a message,
    after which the model goes on (analysis, then final), which is why llama.cpp takes it out of its end-of-generation
    ids. The data stage publishes <|return|> alone, so serve-model says nothing on start. Where a summary lists <|end|>
    too, the stop id the template's answers end with (answer_end_id: <|return|>) is the one judged: still nothing; it
    is judged on every stop id (a note, and <|end|> as the default stop) only where merged/ cannot tell."""
    from transformers import AutoTokenizer

    from tasks.common import write_json
    from tasks.data import answer_end_id, stop_token_ids
    from tasks.export import gguf_stops

    tok = AutoTokenizer.from_pretrained(str(_harmony_tokenizer(tmp_path / "pub" / "merged")))
    ret, end = tok.convert_tokens_to_ids(["<|return|>", "<|end|>"])
    assert stop_token_ids(tok) == [ret] and answer_end_id(tok, [ret, end]) == ret
    vocab = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    gguf = _tiny_gguf(tmp_path / "pub" / "m.gguf", vocab, bos=vocab.index("<|startoftext|>"), eos=ret)
    write_json(tmp_path / "pub" / "summary.json", {"data": {"stop_token_ids": stop_token_ids(tok)}})
    assert gguf_stops(gguf, tmp_path / "pub") == (None, [])
    write_json(tmp_path / "pub" / "summary.json", {"data": {"stop_token_ids": [ret, end]}})
    assert gguf_stops(gguf, tmp_path / "pub") == (None, [])
    (tmp_path / "bare").mkdir()
    write_json(tmp_path / "bare" / "summary.json", {"data": {"stop_token_ids": [ret, end]}})
    told = gguf_stops(gguf, tmp_path / "bare")
    assert told.strings == ["<|end|>"] and told.line.startswith("note: "), told


# ---------------------------------------------------------------------------------------------------------
# rev-late: defects found reviewing 3bad65b (GGUF stop advice)


def test_review_the_printed_mark_command_never_replaces_the_gguf_with_a_stale_marked_file(tmp_path):
    """mark_command prints `gguf-new-metadata SRC SRC.marked ... && mv SRC.marked SRC`. Where SRC.marked is left from an
    earlier try (Ctrl-C mid-write, a full disk), gguf-new-metadata asks before overwriting it and, on any answer but YES,
    exits 0 ("Okay then, see ya!") without writing: the `&&` then moved the stale partial file over the user's GGUF.
    The command now removes a leftover .marked first: run with "no" on stdin, the GGUF comes out marked, never stale."""
    import subprocess

    from tasks.common import write_json
    from tasks.export import gguf_stops

    write_json(tmp_path / "summary.json", {"data": {"stop_token_ids": [1, 2]}})
    (tmp_path / "gguf").mkdir()
    own = _tiny_gguf(tmp_path / "gguf" / "own.gguf", ["<s>", "</s>", "<|a|>"], bos=0, eos=1)
    from gguf import GGUFReader

    command = gguf_stops(own, tmp_path).line.split("mark it with `", 1)[1].split("`", 1)[0]
    Path(str(own) + ".marked").write_bytes(b"partial write")  # an earlier try cut short
    done = subprocess.run(command, shell=True, capture_output=True, text=True, input="no\n", timeout=120)
    assert done.returncode == 0 and b"partial write" not in own.read_bytes(), done.stderr
    fields = GGUFReader(str(own)).fields
    assert fields["tokenizer.ggml.eot_token_id"].contents() == 2 and fields["tokenizer.ggml.tokens"].contents()[2] == "<|a|>"
    assert not Path(str(own) + ".marked").exists()


# ---------------------------------------------------------------------------------------------------------
# serve17: merged/'s tokenizer as the export and serve-model load it (local files only, trust_remote_code as configured)


_OWN_TOKENIZER_MODULE = "from transformers import PreTrainedTokenizerFast\n\n\nclass OwnTokenizer(PreTrainedTokenizerFast):\n    pass\n"


def _own_code_tokenizer(folder: Path) -> Path:
    """merged/ as stage 6 saves a model whose tokenizer is of its own code: a six-token word-level tokenizer whose
    tokenizer_config.json names `tokenization_own.OwnTokenizer` (shipped in the folder) in its auto_map, a chat
    template ending each turn with <|end|>. Loads only with trust_remote_code."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<unk>", "<eos>", "<|end|>", "a", "b", "hi"])}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<eos>", additional_special_tokens=["<|end|>"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} <|end|> {% endfor %}"
    tok.save_pretrained(folder)
    (folder / "tokenization_own.py").write_text(_OWN_TOKENIZER_MODULE)
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**conf, "tokenizer_class": "OwnTokenizer",
                                                              "auto_map": {"AutoTokenizer": [None, "tokenization_own.OwnTokenizer"]}}))
    return folder


def _asked(monkeypatch) -> list[str]:
    """The prompts transformers' "run the custom code? [y/N]" put to the user (answered "n"): on a terminal it waits
    15 s for that answer, and a "y" runs the folder's code."""
    import builtins

    prompts: list[str] = []
    monkeypatch.setattr(builtins, "input", lambda prompt="": prompts.append(prompt) or "n")
    return prompts


def test_export_loads_a_tokenizer_of_the_model_s_own_code_by_model_trust_remote_code(tmp_path, monkeypatch):
    """serve17: `_build` loaded merged/'s tokenizer without trust_remote_code while every other stage passes the
    model's setting: a model whose tokenizer is of its own code (its auto_map kept in merged/) published, then stage 8
    stopped with transformers' ValueError ("contains custom code ... pass trust_remote_code=True"), after a 15 s
    "[y/N]" prompt where the run had a terminal. export_artifacts now takes model.trust_remote_code (the flow passes
    it): on, it loads and exports; off, the stage stops at once, with nothing asked."""
    from types import SimpleNamespace

    from tasks.config import ExportSection
    from tasks.export import export_artifacts

    pub = tmp_path / "runs" / "r" / "m"
    merged = _own_code_tokenizer(pub / "merged")
    asked = _asked(monkeypatch)
    args = (SimpleNamespace(key="m"), SimpleNamespace(dir=str(pub), merged_dir=str(merged)), SimpleNamespace(stop_token_ids=[2, 1], dir=""),
            ExportSection(gguf=[], modelfile=False), None, str(tmp_path / "art"))
    with pytest.raises(ValueError, match="trust_remote_code"):
        export_artifacts(*args, trust_remote_code=False)
    rec = export_artifacts(*args, trust_remote_code=True)
    assert rec.stop_tokens == ["<|end|>", "<eos>"], rec
    assert asked == [], asked


def test_answer_end_reads_merged_from_local_files_only_and_never_runs_or_asks_to_run_its_code(tmp_path, monkeypatch):
    """serve17: `answer_end` (serve-model --format gguf's start) handed folder/"merged" to AutoTokenizer as it was. A
    folder without merged/ (a GGUF kept alone) given by a relative path read as a Hub repo id ("pub/merged"): with
    HF_HUB_OFFLINE unset and no network, 46 s of retries (measured) before the None it stands for; a merged/ whose
    tokenizer is of its own code got transformers' "[y/N]" prompt (15 s on a terminal; a "y" ran the code). Now:
    no merged/, None at once; merged/ from local files, its code never run; a plain merged/ is still told."""
    import huggingface_hub.constants
    import socket

    from tasks.export import answer_end

    class HubAsked(BaseException):  # not an Exception: neither huggingface_hub's retries nor answer_end swallow it
        pass

    def no_network(*args, **kwargs):
        raise HubAsked(args)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest sets it; users need not
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    asked = _asked(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pub" / "gguf").mkdir(parents=True)
    assert answer_end(Path("pub"), [2, 1]) is None
    assert answer_end(tmp_path / "pub", [2, 1]) is None
    _own_code_tokenizer(tmp_path / "own" / "merged")
    assert answer_end(Path("own"), [2, 1]) is None and asked == [], asked
    (tmp_path / "plain" / "merged").mkdir(parents=True)
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tmp_path / "own" / "merged" / name).is_file():
            shutil.copy(tmp_path / "own" / "merged" / name, tmp_path / "plain" / "merged" / name)
    conf = json.loads((tmp_path / "own" / "merged" / "tokenizer_config.json").read_text())
    conf = {k: v for k, v in conf.items() if k != "auto_map"} | {"tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "plain" / "merged" / "tokenizer_config.json").write_text(json.dumps(conf))
    assert answer_end(Path("plain"), [2, 1]) == 2


def test_gptq_export_loads_the_model_and_tokenizer_by_model_trust_remote_code(tmp_path, monkeypatch):
    """serve17: the GPTQ script (llmcompressor's environment) loaded merged/'s model and tokenizer without
    trust_remote_code, as `_build` did: a model of its own code stopped export.gptq with transformers' ValueError after
    a silent 15 s "[y/N]" prompt on a terminal (the script's output is captured). `run_gptq` now passes
    --trust-remote-code where model.trust_remote_code is on, and the script takes it (read by its own parser here:
    llmcompressor's environment is not needed for that)."""
    import subprocess as sp

    import tasks.export
    from tasks.config import ExportSection
    from tasks.export import run_gptq

    ran = []

    def fake_run(cmd, **kwargs):
        ran.append(cmd)
        (Path(cmd[3]) / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(cmd[3]) / "config.json").write_text("{}")
        return sp.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(tasks.export.subprocess, "run", fake_run)
    export = ExportSection(gptq=True, gptq_python=sys.executable)
    for trusted in (True, False):
        run_gptq(tmp_path / "merged", tmp_path / f"out-{trusted}", tmp_path / "train", export, lambda m: None, trusted)
    assert [("--trust-remote-code" in cmd) for cmd in ran] == [True, False], ran
    # the script's own parser reads the command: past it, the script stops at its first llmcompressor import, not at
    # "unrecognized arguments" (exit 2)
    monkeypatch.undo()
    done = sp.run([sys.executable, *ran[0][1:]], capture_output=True, text=True, timeout=300,
                  env={**os.environ, "PYTHONPATH": ""}, cwd=tmp_path)
    assert "unrecognized arguments" not in done.stderr and done.returncode != 2, done.stderr[-2000:]
