"""Security defaults: no remote code or pickle unless opted in, JSON (not pickle) Prefect results, secrets
never written anywhere, and names that become paths cannot escape artifacts/."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tasks.common import StageError, safe_name

FAKE_TOKEN = "hf_FAKEtokenDoNotLeak1234567890"
FAKE_KEY = "sk-FAKEapiKeyDoNotLeak0987654321"


def test_remote_code_and_pickle_are_off_in_every_profile():
    from tasks.config import load_config, profile_names

    for name in profile_names():
        cfg = load_config(profile=name)
        assert cfg.model.trust_remote_code is False and cfg.model.allow_pickle is False, name


def test_model_loads_pass_safe_flags(tiny_cfg, shared_artifacts, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tasks.models import load_base_model, resolve_model

    seen = {}
    real = AutoModelForCausalLM.from_pretrained

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    load_base_model(resolve_model(tiny_cfg.model, shared_artifacts), tiny_cfg.model, tiny_cfg.quant, "cpu")
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_pickle_weights_load_only_when_opted_in(tiny_cfg, shared_artifacts, tmp_path):
    import torch
    from safetensors.torch import load_file

    from tasks.models import load_base_model, resolve_model

    src = Path(resolve_model(tiny_cfg.model, shared_artifacts).path)
    folder = tmp_path / "pickle_only"
    shutil.copytree(src, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    model = tiny_cfg.model.model_copy(update={"name": str(folder)})
    ref = resolve_model(model, shared_artifacts)
    with pytest.raises(StageError, match=r"only pickle \.bin weights.*model\.allow_pickle=true only if you trust"):
        load_base_model(ref, model, tiny_cfg.quant, "cpu")
    assert load_base_model(ref, model.model_copy(update={"allow_pickle": True}), tiny_cfg.quant, "cpu") is not None


@pytest.mark.slow  # a whole flow run in this process: ~10 s idle, a minute on a busy machine
def test_secrets_never_reach_artifacts_logs_or_prefect_results(prefect_server, tmp_path, monkeypatch, capfd):
    """The tiny flow through the CLI with a fake hub token and API key in the environment (and a hub push whose
    client reads the token and fails with an error quoting it): neither appears in any file or in the captured logs."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import main

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("MY_API_KEY", FAKE_KEY)
    monkeypatch.setattr("tasks.publish.PUSH_ATTEMPTS", 1)
    # (No patching of time.sleep: `tasks.publish.time` is the time module itself, and a no-op sleep turned
    # Prefect's flow-run heartbeat thread into a busy loop: 20,943 heartbeat events in 6 s.)
    tokens_seen = []

    class OfflineHub:  # the real client would wait on network timeouts here
        def __init__(self, token=None):
            tokens_seen.append(token)

        def create_repo(self, *a, **kw):
            raise ConnectionError(f"cannot connect (token {tokens_seen[-1]})")  # an error that carries the token

    monkeypatch.setattr("huggingface_hub.HfApi", OfflineHub)
    for h in logging.getLogger().handlers:
        if isinstance(h, PrefectConsoleHandler):
            h.stream = h.console.file = sys.stderr
    art = tmp_path / "artifacts"
    code = main(["run", "--profile", "tiny", "--set", f"artifacts_dir={art}", "--set", "publish.hub_repo_id=someone/tiny-test"])
    out, err = capfd.readouterr()
    assert code == 1 and "cannot push to the hub repo 'someone/tiny-test'" in err  # offline; everything saved locally
    assert tokens_seen == [FAKE_TOKEN]  # the token was read (from the environment only) and used
    files = [p for p in art.rglob("*") if p.is_file()]
    assert len(files) > 30
    for secret in (FAKE_TOKEN, FAKE_KEY):
        assert secret not in out + err
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, leaked

    # Prefect's result records are JSON documents, never pickle.
    results = list((art / ".prefect-results").iterdir())
    assert len(results) >= 6
    for r in results:
        raw = r.read_bytes()
        assert not raw.startswith(b"\x80"), f"{r} is a pickle"
        record = json.loads(raw)
        assert record["metadata"]["serializer"]["type"] == "json"


@pytest.mark.parametrize("name, cleaned", [("../../etc/passwd", "etc-passwd"), ("/abs/run", "abs-run"), ("run name 1", "run-name-1"),
                                           ("..\\..\\x", "x"), ("a/../../b", "a-..-..-b")])
def test_safe_name_stays_one_path_component(name, cleaned):
    out = safe_name(name)
    assert out == cleaned and "/" not in out and out not in {".", ".."}


@pytest.mark.parametrize("name", ["..", ".", "/", "../..", ""])
def test_safe_name_refuses_names_with_nothing_left(name):
    with pytest.raises(StageError, match="has no usable characters"):
        safe_name(name, "run name")


def test_run_names_and_output_names_cannot_escape_artifacts(tmp_path, tiny_cfg):
    from tasks.config import ConfigError, load_config
    from tasks.publish import find_run

    for bad in ("../evil", "/etc/evil", "a/b", ".hidden"):
        with pytest.raises(ConfigError, match="output_name"):
            load_config(profile="tiny", overrides=[f"output_name={bad}"])
    with pytest.raises(ConfigError, match="profile '../demo' does not exist"):
        load_config(profile="../demo")
    art = tmp_path / "artifacts"
    (tmp_path / "outside").mkdir()
    (art / "runs" / "outside").mkdir(parents=True)
    with pytest.raises(StageError, match=r"'../../outside' is not a run name"):
        find_run("../../outside", str(art))  # refused, not rewritten into runs/outside (tests/test_use_the_model.py)
