"""The real flow end to end on the tiny profile under a Prefect test server: seven stages, summary,
published folder, a second run that hits every cache, and a deleted result that is recomputed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

STAGES = ["data", "profile", "probe", "train", "evaluate", "merge", "publish", "export"]
PUBLISHED_FILES = {"README.md", "MANIFEST.json", "pipeline.yaml", "provenance.json", "eval.json", "summary.json",
                   "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json",
                   "merged/config.json", "merged/model.safetensors", "plots/length_histogram.png", "plots/loss_curve.png",
                   "plots/eval_chart.png"}


def _stamps(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a published folder as (bytes, mtime in ns)."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_flow(prefect_server, tmp_path_factory):
    """The flow on one artifacts folder for the module, run from scratch and again here (`run_flow.first`,
    `run_flow.second`, and latest.json as the first left it): each test then starts from that completed run (its first
    call hits the caches: seconds) and changes only what it tests. Each test's folder used to start empty: four whole
    runs of the tiny flow where one does."""
    from flows.finetune import finetune

    art = str(tmp_path_factory.mktemp("flow") / "artifacts")

    def run(*extra: str):
        return finetune(profile="tiny", overrides=[f"artifacts_dir={art}", *extra])

    run.artifacts = Path(art)
    run.first = run()
    run.latest_after_first = json.loads((run.artifacts / "latest.json").read_text())
    run.published_after_first = _stamps(Path(run.first["published"]))
    run.second = run()
    return run


def test_flow_runs_seven_stages_then_hits_every_cache(run_flow):
    first = run_flow.first
    assert first["status"] == "completed"
    assert list(first["stages"]) == STAGES
    assert not any(s["cached"] for s in first["stages"].values())

    summary = json.loads(Path(first["summary_path"]).read_text())
    assert summary["stages"]["train"]["outputs"]["steps"] > 0
    assert run_flow.latest_after_first["run"] == first["run"]
    published = Path(first["published"])
    files = {str(p.relative_to(published)) for p in published.rglob("*") if p.is_file()}
    assert PUBLISHED_FILES <= files
    card = (published / "README.md").read_text()
    # random:mistral is no Hub id: no `base_model:` line (tests/test_use_the_model.py covers a Hub-named base)
    assert "AutoPeftModelForCausalLM" in card and "base_model:" not in card and "| perplexity |" in card

    second = run_flow.second
    assert all(s["cached"] for s in second["stages"].values()), second["stages"]
    assert second["published"] == first["published"]
    # and leaves every file of the published folder as it was: its bytes and its mtime
    assert _stamps(published) == run_flow.published_after_first


def test_changed_config_invalidates_only_downstream_stages(run_flow):
    run_flow()
    changed = run_flow("lora.r=4")
    cached = {k: v["cached"] for k, v in changed["stages"].items()}
    assert cached["data"] and cached["profile"]
    assert not cached["probe"] and not cached["train"] and not cached["merge"]
    # Publish reruns (eval changed) but merge does not: the new run's folder gets its own export, and the summary
    # points at it (before, export stayed Cached on the previous run's folder).
    again = run_flow("lora.r=4", "eval.max_new_tokens=9")
    assert [s for s, v in again["stages"].items() if not v["cached"]] == ["evaluate", "publish", "export"]
    export = again["stages"]["export"]["outputs"]
    assert again["published"] == export["published_dir"] == again["stages"]["publish"]["outputs"]["dir"] != changed["published"]
    assert Path(again["published"]).parent.name == again["run"]


def test_deleted_stage_outputs_are_recomputed_not_trusted(run_flow):
    first = run_flow()
    shutil.rmtree(Path(first["stages"]["merge"]["outputs"]["dir"]))
    second = run_flow()
    assert second["stages"]["train"]["cached"]
    assert not second["stages"]["merge"]["cached"]
    assert Path(second["stages"]["merge"]["outputs"]["merged_dir"]).is_dir()


def test_deleted_prefect_results_are_recomputed(run_flow):
    run_flow()
    shutil.rmtree(run_flow.artifacts / ".prefect-results")
    again = run_flow()
    assert again["status"] == "completed"
    assert not again["stages"]["data"]["cached"]  # Prefect record gone: the stage reruns (and reuses its folder)


def test_the_artifacts_folder_spelled_otherwise_hits_every_cache(run_flow):
    # `artifacts_dir=<it>/` or a relative spelling is the same folder: its Prefect records were missed (a review: every
    # stage reported completed, not cached, though each only read its folder back)
    run_flow()
    again = run_flow(f"artifacts_dir={run_flow.artifacts}/")
    assert all(s["cached"] for s in again["stages"].values()), again["stages"]


def test_a_copied_artifacts_folder_reuses_its_stages_and_writes_only_into_itself(run_flow, tmp_path):
    # A review: records keep absolute paths, so a run on a copy of artifacts/ (a moved checkout, a bigger disk) read the
    # original's data, adapter and merged model and published its run folder into the original's runs/; with the
    # original gone, stage 2 failed on FileNotFoundError.
    first = run_flow()
    copy = tmp_path / "copy"
    shutil.copytree(run_flow.artifacts, copy, symlinks=True)
    runs_before = {p.name for p in (run_flow.artifacts / "runs").iterdir()}
    again = run_flow(f"artifacts_dir={copy}")
    assert again["status"] == "completed"
    assert {p.name for p in (run_flow.artifacts / "runs").iterdir()} == runs_before
    outputs = json.dumps({stage: s["outputs"] for stage, s in again["stages"].items()})
    assert str(run_flow.artifacts) not in outputs and Path(again["published"]).is_relative_to(copy)
    # the copy's stage folders were read back, not redone: the same training record
    assert again["stages"]["train"]["outputs"]["wall_seconds"] == first["stages"]["train"]["outputs"]["wall_seconds"]


def test_an_artifacts_folder_whose_cache_is_a_link_to_another_disk_hits_every_cache(run_flow, tmp_path):
    # A review: with artifacts/cache a link to another disk (a bigger one), every record's folder resolved outside the
    # artifacts folder, so the flow took each cached record for another folder's and recomputed every stage, every run.
    copy = tmp_path / "copy"
    shutil.copytree(run_flow.artifacts, copy, symlinks=True)
    (copy / "cache").rename(tmp_path / "other-disk")
    (copy / "cache").symlink_to(tmp_path / "other-disk")
    run_flow(f"artifacts_dir={copy}")  # a new folder: its stages read back, once
    again = run_flow(f"artifacts_dir={copy}")
    assert all(s["cached"] for s in again["stages"].values()), again["stages"]


def _damage(path: Path, how: str) -> None:
    """`path` cut to half its size (`cut`: a copy or a disk that ran out), one byte flipped in place near its end (`flip`),
    or a JSON file's first digit changed (`edit`: still valid JSON, the same size, as a hand edit of a number)."""
    if how == "cut":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "flip":
        with open(path, "r+b") as f:
            f.seek(-64, os.SEEK_END)
            byte = f.read(1)
            f.seek(-64, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))
    else:
        text = path.read_text()
        i = next(i for i, c in enumerate(text) if c.isdigit() and text[i - 1] in " :[-")  # a number's first digit
        path.write_text(text[:i] + ("7" if text[i] != "7" else "8") + text[i + 1:])


@pytest.mark.parametrize("stage, damage", [("train", "adapter"), ("probe", "record.json"), ("merge", "merged/model.safetensors"),
                                          ("evaluate", "eval_chart.png"), ("profile", "length_histogram.png"),
                                          ("train", "loss_curve.png"), ("data", "train"),
                                          ("data", "train/data-00000-of-00001.arrow"), ("data", "heldout/state.json"),
                                          ("train", "adapter/adapter_model.safetensors:cut"), ("merge", "merged/model.safetensors:cut"),
                                          ("data", "train/data-00000-of-00001.arrow:cut"), ("data", "heldout/data-00000-of-00001.arrow:flip"),
                                          ("profile", "length_histogram.png:cut"),
                                          # stages 3-6 list their files too: changed in place, cut short or gone since
                                          ("train", "adapter/adapter_model.safetensors:flip"), ("train", "log_history.json"),
                                          ("probe", "record.json:edit"), ("merge", "merged/model.safetensors:flip"),
                                          ("merge", "merged/config.json:cut"), ("evaluate", "eval.json:edit"), ("evaluate", "eval.json:cut"),
                                          ("evaluate", "eval.json")])
def test_a_complete_stage_folder_with_files_gone_or_unreadable_names_itself_and_the_fix(run_flow, tmp_path, stage, damage):
    # A review: an adapter/ gone from a complete train folder was handed to stage 5 (PEFT: "Can't find
    # 'adapter_config.json'"); a truncated record.json failed as a bare JSONDecodeError. Neither named the folder or a fix.
    # An adapter or merged shard changed in place (same size), or an eval.json edited or cut short, was reused as whole:
    # only the data and profile folders' markers listed their files.
    from tasks.common import StageError

    done = run_flow()
    copy = tmp_path / "copy"
    shutil.copytree(run_flow.artifacts, copy, symlinks=True)
    shutil.rmtree(copy / ".prefect-results")  # the stage reads its folder back
    folder = copy / Path(done["stages"][stage]["outputs"]["dir"]).relative_to(run_flow.artifacts)
    # A data split's arrow file gone (its dataset_info.json left) was trusted too: stage 3 failed on a raw FileNotFoundError
    if damage in ("adapter", "train"):  # a data split gone failed as a raw FileNotFoundError in stage 2
        shutil.rmtree(folder / damage)
    elif ":" in damage:  # a weights file cut short was trusted: stage 5 failed on safetensors' bare "header too small"
        _damage(folder / damage.split(":")[0], damage.split(":")[1])  # (an arrow file or the chart cut short was trained on, published)
    elif damage != "record.json":
        (folder / damage).unlink()
    else:
        (folder / "record.json").write_text((folder / "record.json").read_text()[:40])
    with pytest.raises(StageError, match=f"{folder} is marked complete but .*; delete that folder and rerun") as e:
        run_flow(f"artifacts_dir={copy}")
    if ":" in damage:  # every stage's marker lists each file: it is named
        assert f"its file {damage.split(':')[0]} " in str(e.value), str(e.value)


@pytest.mark.parametrize("stage, damage", [("train", "adapter/adapter_model.safetensors:flip"), ("probe", "record.json:edit"),
                                          ("merge", "merged/model.safetensors:flip"), ("evaluate", "eval.json:edit"),
                                          ("evaluate", "eval.json:cut")])
def test_a_stage_folder_changed_since_it_completed_is_refused_on_a_prefect_cache_hit(run_flow, stage, damage):
    # The everyday rerun: Prefect hands back the stage's cached record and the flow checks its files (`outputs_exist`).
    # An adapter or merged shard changed in place passed there (whole by its safetensors header), as did an eval.json
    # edited or cut short, and was evaluated, merged or published as this run's.
    from tasks.common import StageError

    done = run_flow()
    rel, how = damage.split(":")
    folder = Path(done["stages"][stage]["outputs"]["dir"])
    kept = (folder / rel).read_bytes()
    _damage(folder / rel, how)
    try:
        with pytest.raises(StageError, match=f"{folder} is marked complete but its file {rel} .*; delete that folder and rerun"):
            run_flow()
    finally:
        (folder / rel).write_bytes(kept)  # the module's later tests start from the whole folder
    again = run_flow()  # the same bytes again (a new ctime: hashed again, equal): every stage reused
    assert all(s["cached"] for s in again["stages"].values()), again["stages"]
