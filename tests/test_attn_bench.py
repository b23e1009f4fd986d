"""bench/attn_bench.py's CPU smoke run (`--device cpu --small`): every variant is recorded with a time or an error
(the CUDA-only kernels error here, they do not crash the run), and the variants that ran agree with the reference on
outputs and q/k/v gradients (fp32, so a layout or masking bug shows as a large difference, not rounding). The GPU
numbers come from the device call in docs/PERF_NOTES.md ("Attention alone")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.attn_bench import VARIANTS  # noqa: E402

RUN_ON_CPU = ["rows/sdpa-default", "rows/sdpa-math", "equal/varlen-wrapper", "equal/sdpa-per-sample",
              "mixed/varlen-wrapper", "mixed/sdpa-per-sample"]
CUDA_ONLY = [v for v in VARIANTS if "/varlen-kernel-" in v or "/cudnn-op-" in v or v.endswith("/varlen-attn-cudnn")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("attn")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "attn_bench.py"), "--device", "cpu", "--small",
                          "--iters", "1", "--warmup", "0", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((out / "attn_bench.json").read_text()), (out / "attn_bench.md").read_text()


def test_every_variant_has_a_time_or_an_error(smoke):
    result, table = smoke
    records = {r["variant"]: r for r in result["records"]}
    assert list(records) == VARIANTS
    for name, r in records.items():
        if "error" in r:
            assert r["error"].strip(), name
        else:
            assert r["ms_fwd"] > 0 and r["ms_fwd_bwd"] > 0, name
        assert f"| {name} |" in table
    assert all("error" not in records[v] for v in RUN_ON_CPU), {v: records[v].get("error") for v in RUN_ON_CPU}
    assert all("error" in records[v] for v in CUDA_ONLY)  # recorded, not raised


def test_variants_that_ran_agree_with_the_reference(smoke):
    result, _ = smoke
    assert result["dtype"] == "float32" and result["tolerance_rel"] == 1e-4
    ran = [r for r in result["records"] if "error" not in r]
    for r in ran:
        assert set(r["diff"]) >= {"out", "dq", "dk", "dv"}, r["variant"]
        assert r["agrees"], (r["variant"], r["diff"])
        assert max(r["diff"][k] for k in ("out", "dq", "dk", "dv")) < 1e-4, (r["variant"], r["diff"])


def test_the_packs_hold_the_rows_tokens_and_the_default_backend_is_named(smoke):
    result, _ = smoke
    s = result["shape"]
    equal, mixed = result["cu_seq_lens"]["equal"], result["cu_seq_lens"]["mixed"]
    assert equal == [i * s["length"] for i in range(s["batch"] + 1)]
    assert mixed[0] == 0 and mixed[-1] == s["batch"] * s["length"] and len(mixed) == s["segments"] + 1
    assert all(b > a for a, b in zip(mixed, mixed[1:]))
    call = result["sdpa_default_call"]
    # transformers' sdpa_attention_forward on unmasked rows: causal, no mask, GQA handed to torch or k/v repeated
    assert call["is_causal"] is True and call["attn_mask"] is False
    assert call["k_shape"][1] == (s["kv_heads"] if call["enable_gqa"] else s["heads"])
    assert call["fused_sdp_choice"] in {"FLASH_ATTENTION", "MATH"}
