"""Stage 2 — token-length profile.

pandas over the tokenized lengths: count, mean and p50/p90/p95/p99/max of prompt, completion (assistant,
labeled) and total tokens; how many examples the configured max length dropped or truncated; a suggested
max length covering p99; a histogram PNG. Warns when the max length cuts more than 5% of examples.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel

from .common import building, changed_file, complete_record, fingerprint, is_complete, locked, maybe_fault, stage_dir, write_json
from .data import DataRecord, load_split, rows_key

PROFILE_VERSION = 1
TRUNCATION_WARN_SHARE = 0.05


class ProfileRecord(BaseModel):
    key: str
    dir: str
    histogram_png: str
    stats: dict[str, dict[str, float]]  # {"prompt"|"completion"|"total": {"count","mean","p50",...}}
    max_length: int
    over_max_length: int  # examples dropped/truncated by data.max_length
    over_max_share: float
    suggested_max_length: int
    warning: str | None

    def outputs_exist(self) -> bool:
        # stage 2 shows the chart, publish copies it: one cut short (`changed_file`) was published as it was
        return is_complete(Path(self.dir)) and Path(self.histogram_png).is_file() and changed_file(Path(self.dir)) is None


def cache_key(data: DataRecord) -> str:
    return fingerprint("profile", PROFILE_VERSION, rows_key(data, "dropped"), data.data_hash)  # dropped: its over-max_length share


def profile_lengths(data: DataRecord, artifacts_dir: str, log_fn=None) -> ProfileRecord:
    """Stage 2: length statistics, truncation report and histogram of the formatted data. `log_fn`: as
    `load_dataset_records`'s."""
    key = cache_key(data)
    out = stage_dir(artifacts_dir, "profile", key)
    with locked(out, log_fn=log_fn):
        if is_complete(out):
            return complete_record(out, ProfileRecord)
        return _build(data, key, out)


def _build(data: DataRecord, key: str, out: Path) -> ProfileRecord:
    import pandas as pd

    maybe_fault("profile")
    ds = load_split(data, "train")
    rows = []
    for labels in ds["labels"]:
        completion = sum(1 for l in labels if l != -100)
        rows.append({"total": len(labels), "completion": completion, "prompt": len(labels) - completion})
    df = pd.DataFrame(rows)
    quantiles = {"p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99}
    stats = {}
    for col in ("prompt", "completion", "total"):
        s = df[col]
        stats[col] = {"count": float(s.count()), "mean": round(float(s.mean()), 1), "max": float(s.max())}
        stats[col].update({name: float(s.quantile(q)) for name, q in quantiles.items()})

    over = data.dropped.get("over max_length", 0)
    over_total = over + data.truncated
    share = over_total / max(data.n_train + data.n_heldout + over, 1)
    # Suggest covering p99 of what we saw, rounded up to a multiple of 64 (kernel-friendly shapes).
    suggested = int(64 * math.ceil(max(stats["total"]["p99"], 1) / 64))
    warning = None
    if share > TRUNCATION_WARN_SHARE:
        warning = (f"data.max_length={data.max_length} drops or truncates {share:.1%} of examples (> 5%); "
                   f"raise it (e.g. to {max(suggested, data.max_length * 2)}) if memory allows")

    with building(out, record_files=True) as tmp:
        png = tmp / "length_histogram.png"
        _plot(df, data.max_length, png)
        record = ProfileRecord(
            key=key,
            dir=str(out),
            histogram_png=str(out / "length_histogram.png"),
            stats=stats,
            max_length=data.max_length,
            over_max_length=over_total,
            over_max_share=round(share, 4),
            suggested_max_length=suggested,
            warning=warning,
        )
        df.to_csv(tmp / "lengths.csv", index=False)
        write_json(tmp / "record.json", record.model_dump(mode="json"))
    return record


def _plot(df, max_length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    bins = min(60, max(10, int(df["total"].nunique())))
    ax.hist(df["total"], bins=bins, alpha=0.7, label="total")
    ax.hist(df["completion"], bins=bins, alpha=0.6, label="completion (trained)")
    ax.axvline(max_length, color="red", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths (training split)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_table(record: ProfileRecord) -> str:
    head = "| tokens | count | mean | p50 | p90 | p95 | p99 | max |\n|---|---|---|---|---|---|---|---|\n"
    rows = "".join(
        f"| {k} | {v['count']:.0f} | {v['mean']} | {v['p50']:.0f} | {v['p90']:.0f} | {v['p95']:.0f} | {v['p99']:.0f} | {v['max']:.0f} |\n"
        for k, v in record.stats.items()
    )
    return head + rows
