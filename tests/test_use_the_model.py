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
