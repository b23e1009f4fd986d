"""Q4_K_M GGUF (issue 20.4): llama.cpp's llama-quantize built once from the pinned sources, a published model
quantized, checked like f16/q8_0 (top-1 agreement with the merged model on held-out chats, a llama.cpp server answers).

Fast: the one-line errors. Slow: the build (cached in the venv, or under $QLORA_PIPELINE_TOOLS: minutes on 2 cores the
first time), SmolLM2-135M exported to f16 + q4_k_m."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.common import PROJECT_ROOT, StageError

SYSTEM = "Follow the instruction exactly."


def test_config_accepts_q4_k_m_and_names_the_types_on_a_typo():
    from tasks.config import ConfigError, load_config

    cfg = load_config(profile="tiny", overrides=["export.gguf=[f16, q8_0, q4_k_m]", "export.modelfile_gguf=q4_k_m"])
    assert cfg.export.gguf == ["f16", "q8_0", "q4_k_m"]
    with pytest.raises(ConfigError) as e:
        load_config(profile="tiny", overrides=["export.gguf=[q4_km]"])
    assert "export.gguf[0]" in str(e.value) and "'q4_k_m'" in str(e.value)


def test_missing_build_tools_are_one_line_naming_the_fix(monkeypatch, tmp_path):
    from tasks import quantize
    from tasks.export import LLAMA_CPP_SOURCES

    monkeypatch.setenv("QLORA_PIPELINE_TOOLS", str(tmp_path))
    monkeypatch.setattr(quantize.shutil, "which", lambda name: None if name == "cmake" else "/usr/bin/" + name)
    with pytest.raises(StageError) as e:
        quantize.ensure_quantizer(LLAMA_CPP_SOURCES)
    msg = str(e.value)
    assert "\n" not in msg and "needs cmake" in msg and "apt-get install cmake" in msg and "drop q4_k_m from export.gguf" in msg


def test_a_failing_quantize_is_one_line_with_its_reason(tmp_path):
    from tasks.quantize import quantize_gguf

    fake = tmp_path / "llama-quantize"
    fake.write_text("#!/bin/sh\necho 'llama_model_quantize: failed to quantize: unknown model architecture' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(StageError) as e:
        quantize_gguf(fake, tmp_path / "m-f16.gguf", tmp_path / "m-q4_k_m.gguf", "Q4_K_M")
    assert "\n" not in str(e.value) and "unknown model architecture" in str(e.value) and "drop q4_k_m" in str(e.value)


@pytest.fixture(scope="module")
def q4_export(publish_smollm2):
    """SmolLM2-135M published and exported to f16 + q4_k_m, with what the export said."""
    said: list[str] = []
    rec, pub, heldout, _ = publish_smollm2("smol-q4", SYSTEM, ("export.gguf=[f16, q4_k_m]", "export.modelfile_gguf=q4_k_m"), said.append)
    return rec, pub, heldout, said


@pytest.mark.slow
def test_q4_k_m_is_a_third_of_f16_and_agrees_with_the_merged_model(q4_export):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models import gguf_parsed_once

    rec, pub, heldout, said = q4_export
    assert set(rec.gguf) == {"f16", "q4_k_m"}
    f16, q4 = Path(rec.gguf["f16"]), Path(rec.gguf["q4_k_m"])
    ratio = q4.stat().st_size / f16.stat().st_size
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(q4)).tensors}
    assert {"Q4_K", "Q6_K"} & types and ratio < 0.5, (types, ratio)  # Q4_K_M: Q4_K weights, some Q6_K
    tok = AutoTokenizer.from_pretrained(str(pub / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(pub / "merged"), dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(m[1:], tokenize=False) for m in heldout[:6]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = enc["attention_mask"].bool()
    with torch.inference_mode():
        want = merged(**enc).logits.argmax(-1)[mask]
        with gguf_parsed_once():  # as the pipeline loads a GGUF: parsed once, not twice (~40 s)
            g = AutoModelForCausalLM.from_pretrained(str(q4.parent), gguf_file=q4.name, dtype=torch.float32).eval()
        got = g(**enc).logits.argmax(-1)[mask]
    agreement = float((got == want).float().mean())
    print(f"\nQ4_K_M: {q4.stat().st_size / 2**20:.1f} MiB ({ratio:.2f} of f16), top-1 agreement with the merged model on "
          f"{int(mask.sum())} held-out tokens: {agreement:.3f}; types {sorted(types)}")
    assert agreement >= 0.80, agreement
    modelfile = (pub / "Modelfile").read_text()
    assert f"FROM ./gguf/{q4.name}" in modelfile


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_q4_k_m_loads_in_the_llama_cpp_server_and_answers(q4_export, smollm2_artifacts, tmp_path):
    rec, pub, heldout, _ = q4_export
    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", "smol-q4", "--format", "gguf", "--gguf-type", "q4_k_m",
                             "--port", str(port), "--artifacts-dir", smollm2_artifacts, "--ctx", "1024"],
                            cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        body = {"messages": heldout[0][1:-1], "max_tokens": 32, "temperature": 0, "top_k": 1}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            got = json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    answer = got["choices"][0]["message"]["content"]
    print(f"\nllama.cpp on {Path(rec.gguf['q4_k_m']).name}: {heldout[0][-2]['content']!r} -> {answer!r}")
    assert answer.strip() and "<|im_end|>" not in answer
