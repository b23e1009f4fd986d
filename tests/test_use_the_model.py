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
