"""Stage 8 after stage 7 published a run's folder again, through the stage functions on the tiny model (stages 1-6 cached
in the session's artifacts, as tests/test_second_half.py runs them): a republish builds the folder anew, without the
export's files (gguf/, Modelfile, the card's deploy section), and the export stage puts them back from its cache.

The tiny model's byte-level tokenizer is not one llama.cpp's converter knows (tests/test_export.py
`test_unconvertible_tokenizer_is_one_line_error`), so the conversion is a stand-in that writes a GGUF header and counts its
calls; the Modelfile is the real one, made from the published template. The real converter is tested on SmolLM2 there.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tasks.data import load_dataset_records
from tasks.evaluate import evaluate_heldout
from tasks.merge import merge_adapter
from tasks.probe import probe_throughput
from tasks.profile import profile_lengths
from tasks.train import train_adapter


@pytest.fixture(scope="module")
def records(tiny_cfg, shared_artifacts):
    """Stages 1-6 of the tiny profile on the CPU (content-keyed: found in the session's artifacts when built already)."""
    cfg, art = tiny_cfg, shared_artifacts
    data = load_dataset_records(cfg.data, cfg.model, art)
    prof = profile_lengths(data, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    ev = evaluate_heldout(data, train, cfg.model, cfg.quant, cfg.eval, "cpu", art)
    mg = merge_adapter(data, train, cfg.model, cfg.quant, cfg.merge, "cpu", art)
    return {"data": data, "profile": prof, "probe": probe, "train": train, "evaluate": ev, "merge": mg}


@pytest.fixture
def converted(monkeypatch) -> list[str]:
    """The GGUF conversions made (their out types): a stand-in converter that writes a GGUF v3 header."""
    import tasks.export as export

    made: list[str] = []

    def convert(model_dir: Path, out_file: Path, outtype: str, converter: Path, stop_ids=()) -> list[str]:
        made.append(outtype)
        out_file.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + f" stand-in {outtype} of {model_dir.name}".encode())
        return []  # convert_to_gguf's lines on the stop ids it could not mark: none here

    monkeypatch.setattr(export, "convert_to_gguf", convert)
    monkeypatch.setattr(export, "ensure_converter", lambda log_fn=None: Path("stand-in-converter"))
    return made


def _make_stale(folder: Path) -> None:
    """The folder as the publish code of a44bee2..2361106 left it for a remote-code model: the model's code in adapter/,
    listed in the MANIFEST (the export's files and card kept, as an export before the upgrade left them)."""
    from tasks.common import file_sha256
    from tasks.publish import MANIFEST

    code = folder / "adapter" / "modeling_custom.py"
    code.write_text("class CustomModel: ...\n")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"].append({"path": "adapter/modeling_custom.py", "bytes": code.stat().st_size, "sha256": file_sha256(code)})
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _export_files(folder: Path) -> dict[str, bytes]:
    from tasks.export import EXPORT_OWNED

    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and str(p.relative_to(folder)).startswith(EXPORT_OWNED)}


@pytest.mark.parametrize("gguf", [["f16"], []], ids=["gguf", "no-gguf"])
def test_a_republished_folder_gets_its_export_files_again_from_the_export_cache(records, tiny_cfg, tmp_path, converted, gguf):
    """Publish, export; the folder turns out stale (`_make_stale`) and the next publish builds it anew: gguf/, Modelfile
    and the card's deploy section are gone with the old folder. The first export's record no longer holds
    (`outputs_exist`, what the flow asks of a Cached export before it trusts it), so stage 8 runs again: its files are
    back, byte for byte, from cache/export/ (nothing converted again), listed in the MANIFEST with their sha256, the
    card's deploy section once; and the folder is one stage 7 reuses. With export.gguf=[] (no GGUF, no Modelfile) the
    export's whole output in the folder is the deploy section (how to serve merged/ with vLLM)."""
    from tasks.common import file_sha256
    from tasks.config import ExportSection
    from tasks.export import CARD_BEGIN, export_artifacts, parse_modelfile
    from tasks.publish import MANIFEST, is_published, is_reusable, publish_artifacts

    cfg = tiny_cfg.model_copy(update={"artifacts_dir": str(tmp_path / "artifacts"),
                                      "export": ExportSection(gguf=gguf, modelfile=True, modelfile_gguf="f16")})
    run, logs = "republished-export", []

    def stage8(pub):
        return export_artifacts(records["merge"], pub, records["data"], cfg.export, cfg.data.system_prompt, cfg.artifacts_dir, logs.append, run_name=run)

    def deploy_section(folder: Path) -> str:
        card = (folder / "README.md").read_text()
        return card[card.index(CARD_BEGIN):] if CARD_BEGIN in card else ""

    pub = publish_artifacts(cfg, run, records, logs.append)
    folder = Path(pub.dir)
    first = stage8(pub)
    assert converted == gguf and Path(first.published_dir) == folder and first.outputs_exist()
    built = json.loads((Path(first.dir) / "built.json").read_text())
    assert first.installed() == {k: built[k] for k in ("gguf", "modelfile", "gptq")}  # built.json's form: relative paths
    exported, deploy = _export_files(folder), deploy_section(folder)
    assert sorted(exported) == (["Modelfile", f"gguf/{folder.name}-f16.gguf"] if gguf else [])
    assert f"vllm serve {folder / 'merged'}" in deploy
    if gguf:
        assert parse_modelfile(exported["Modelfile"].decode())["FROM"] == f"./gguf/{folder.name}-f16.gguf"

    _make_stale(folder)
    assert is_published(folder) and not is_reusable(folder)
    again = publish_artifacts(cfg, run, records, logs.append)
    assert again.dir == pub.dir and is_reusable(folder)
    assert _export_files(folder) == {} and deploy_section(folder) == ""
    assert not first.outputs_exist()  # a Cached export of this folder is run again, not trusted

    second = stage8(again)
    assert converted == gguf  # the export cache's files, not converted again
    assert _export_files(folder) == exported and deploy_section(folder) == deploy
    assert second.model_dump(exclude={"seconds"}) == first.model_dump(exclude={"seconds"})
    assert second.outputs_exist() and is_reusable(folder)
    listed = {f["path"]: f for f in json.loads((folder / MANIFEST).read_text())["files"]}
    for rel in [*exported, "README.md"]:
        assert listed[rel]["sha256"] == file_sha256(folder / rel), rel
    assert "adapter/modeling_custom.py" not in listed and not (folder / "adapter" / "modeling_custom.py").exists()
    assert (folder / "README.md").read_text().count("## Deploy") == 1


def test_an_export_records_installed_files_are_relative_to_the_folder(tmp_path):
    """`ExportRecord.installed()` is built.json's form, paths relative to the published folder, as its docstring says:
    the record holds them absolute, and the Modelfile's came back absolute (the GGUFs' and GPTQ's relative)."""
    from tasks.export import ExportRecord

    pub = tmp_path / "runs" / "run-1" / "out"
    rec = ExportRecord(key="k", dir=str(tmp_path / "cache"), published_dir=str(pub), gguf={"f16": str(pub / "gguf" / "out-f16.gguf")},
                       gguf_bytes={"f16": 1}, modelfile=str(pub / "Modelfile"), gptq_dir=str(pub / "gptq-w4a16"), stop_tokens=[],
                       system_prompt=None, seconds={})
    assert rec.installed() == {"gguf": {"f16": "gguf/out-f16.gguf"}, "modelfile": "Modelfile", "gptq": "gptq-w4a16"}
    assert rec.model_copy(update={"gguf": {}, "modelfile": None, "gptq_dir": None}).installed() == {"gguf": {}, "modelfile": None, "gptq": None}


# What the tiny run's published folder holds after stage 8 (export.gguf=[f16] + Modelfile; base/: random weights are no Hub
# model), tensorboard/ aside: each file is checked below.
TINY_PUBLISHED = ["MANIFEST.json", "Modelfile", "README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                  "adapter/chat_template.jinja", "adapter/tokenizer.json", "adapter/tokenizer_config.json", "base/chat_template.jinja",
                  "base/config.json", "base/generation_config.json", "base/model.safetensors", "base/tokenizer.json",
                  "base/tokenizer_config.json", "eval.json",
                  "gguf/tiny-mistral-lora-f16.gguf", "merged/chat_template.jinja", "merged/config.json", "merged/generation_config.json",
                  "merged/model.safetensors", "merged/tokenizer.json", "merged/tokenizer_config.json", "pipeline.yaml",
                  "plots/eval_chart.png", "plots/length_histogram.png", "plots/loss_curve.png", "provenance.json", "summary.json"]


def _stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of `folder` (tensorboard/'s event files aside: listed by name only), as (bytes, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_rerun_that_reuses_the_published_folder_leaves_every_file_as_it_was(records, tiny_cfg, tmp_path, converted):
    """Stages 7 and 8 run again on a folder that is current (the same run's name: a retried flow run, or one whose
    Prefect records were lost): publish reuses it and the export installs the same files, so every file of the folder
    keeps its bytes and mtime. The export's install wrote README.md and MANIFEST.json again with the same content (new
    mtimes). And merged/generation_config.json is the merge's own file, bytes and mtime, where the stop ids add nothing
    to its EOS (the tiny template ends turns at it): publish rewrote it reformatted, without its final newline."""
    import time

    from tasks.config import ExportSection
    from tasks.export import export_artifacts
    from tasks.publish import generation_config_ending_at, is_reusable, publish_artifacts

    cfg = tiny_cfg.model_copy(update={"artifacts_dir": str(tmp_path / "artifacts"),
                                      "export": ExportSection(gguf=["f16"], modelfile=True, modelfile_gguf="f16")})
    run, logs = "reused", []

    def stages_7_and_8():
        pub = publish_artifacts(cfg, run, records, logs.append)
        export_artifacts(records["merge"], pub, records["data"], cfg.export, cfg.data.system_prompt, cfg.artifacts_dir, logs.append, run_name=run)
        return Path(pub.dir)

    folder = stages_7_and_8()
    merge_file = Path(records["merge"].merged_dir) / "generation_config.json"
    assert generation_config_ending_at(merge_file.parent, records["data"].stop_token_ids) == json.loads(merge_file.read_text())  # adds nothing
    published = folder / "merged" / "generation_config.json"
    assert published.read_bytes() == merge_file.read_bytes() and published.stat().st_mtime_ns == merge_file.stat().st_mtime_ns
    before = _stamps(folder)
    assert sorted(k for k in before if not k.startswith("tensorboard/")) == TINY_PUBLISHED
    time.sleep(0.01)  # a rewrite now has another mtime
    assert stages_7_and_8() == folder and is_reusable(folder) and converted == ["f16"]
    after = _stamps(folder)
    assert after.keys() == before.keys()
    assert [rel for rel in before if after[rel] != before[rel]] == []


def test_the_trusted_code_record_is_rewritten_only_when_what_it_says_changes(tmp_path):
    """Stage 7 writes what `chat` trusts a model.trust_remote_code folder's code by (artifacts/trusted-code/) on every
    reuse of the folder too (a run stopped before writing it must get it): the same content, a new mtime, each rerun.
    Now it is written only where it would say something else: the folder's code changed, or there was none."""
    import time

    from tasks.publish import _trust_record, record_trusted_code, untrusted_code

    art, folder = str(tmp_path / "artifacts"), tmp_path / "artifacts" / "runs" / "r1" / "out"
    (folder / "merged").mkdir(parents=True)
    (folder / "merged" / "config.json").write_text(json.dumps({"auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}))
    (folder / "merged" / "modeling_x.py").write_text("class X: ...\n")
    (folder / "provenance.json").write_text("{}")
    record_trusted_code(folder, art, True)
    record = _trust_record(folder, art)
    first = (record.read_bytes(), record.stat().st_mtime_ns)
    time.sleep(0.01)
    record_trusted_code(folder, art, True)  # a reuse: nothing changed
    assert (record.read_bytes(), record.stat().st_mtime_ns) == first and untrusted_code(folder, art) is None
    (folder / "merged" / "modeling_x.py").write_text("class X: pass\n")
    assert untrusted_code(folder, art) is not None
    record_trusted_code(folder, art, True)  # published again by a trusting run: the new code is recorded
    assert record.read_bytes() != first[0] and untrusted_code(folder, art) is None
    record_trusted_code(folder, art, False)
    assert not record.exists()
