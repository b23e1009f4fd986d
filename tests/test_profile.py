"""Stage 2: statistics match the data, the histogram is written, and over-long data triggers the warning."""

from __future__ import annotations

from pathlib import Path

from tasks.data import load_dataset_records, load_split
from tasks.profile import profile_lengths


def test_profile_stats_and_histogram(tiny_cfg, shared_artifacts):
    data = load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)
    rec = profile_lengths(data, shared_artifacts)
    lengths = sorted(len(x) for x in load_split(data, "train")["input_ids"])
    assert rec.stats["total"]["count"] == len(lengths) == data.n_train
    assert rec.stats["total"]["max"] == lengths[-1]
    assert rec.stats["prompt"]["mean"] + rec.stats["completion"]["mean"] == rec.stats["total"]["mean"] or abs(
        rec.stats["prompt"]["mean"] + rec.stats["completion"]["mean"] - rec.stats["total"]["mean"]) < 0.2
    assert rec.suggested_max_length % 64 == 0 and rec.suggested_max_length >= rec.stats["total"]["p99"]
    assert Path(rec.histogram_png).read_bytes()[:4] == b"\x89PNG"
    assert rec.warning is None


def test_warns_when_max_length_cuts_more_than_5_percent(tiny_cfg, shared_artifacts):
    data_cfg = tiny_cfg.data.model_copy(update={"max_length": 50})
    data = load_dataset_records(data_cfg, tiny_cfg.model, shared_artifacts)
    rec = profile_lengths(data, shared_artifacts)
    assert rec.over_max_length == data.dropped["over max_length"] > 0
    assert rec.warning and "max_length=50" in rec.warning and "%" in rec.warning
