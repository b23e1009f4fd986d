"""A trained adapter's tuned side of stage 5's benchmarks, generated on this CPU, against a base side cached on the GPU.

    python bench/adapter_bench_cpu.py --adapter DIR --base-cache eval-base.tar.xz --out OUT.json \
        [--profile demo-gpu] [--set k=v ...] [--benchmarks ifeval,alpaca_eval] [--no-generate alpaca_eval]

For a run whose flow did not reach the end of stage 5 on the device (issue 18 item 5's setting b, 2026-12-01: the
device time ran out in AlpacaEval's generation) but whose adapter came back. Same prompts, template, system prompt,
greedy decoding and scoring as stage 5 (`tasks.evaluate.run_benchmark`), same config (`--profile`/`--set`: pass the
run's own); the base side is read from the device's eval-base cache (the `poll` tarball), the tuned side is the
original (un-quantized) base weights in fp32 on this CPU plus the adapter. That matches neither the device's stage 5
(adapter on the NF4 base, bf16) nor the published model (the adapter merged into the NF4-dequantized weights): the
two sides differ in machine, precision and base weights — an approximation, said so in the output.
`--no-generate alpaca_eval`: the reference loss only (no answers, no length).
"""
from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

from tasks.benchmarks import subset_indices
from tasks.config import load_config
from tasks.data import load_dataset_records
from tasks.evaluate import load_suites, reference_nll, run_benchmark
from tasks.models import load_base_model, load_tokenizer, resolve_model


def base_sides(tar: Path, into: Path) -> dict[str, Path]:
    """benchmark name -> the cached base side's folder (each base.json says which benchmark it holds)."""
    tarfile.open(tar).extractall(into)
    out = {}
    for base_json in into.glob("cache/eval-base/*/base.json"):
        out[json.loads(base_json.read_text())["made"]["benchmark"]] = base_json.parent
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", required=True, type=Path)
    ap.add_argument("--base-cache", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--profile", default="demo-gpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--benchmarks", default="ifeval,alpaca_eval")
    ap.add_argument("--no-generate", default="", help="benchmarks scored by reference loss only (alpaca_eval)")
    ap.add_argument("--prompts", type=int, default=None,
                    help="a seeded subset of each benchmark (eval.benchmark_seed), the base side cut to the same rows: "
                         "this CPU generates ~5 prompts a minute at 512 tokens (Gemma-3-270M, fp32, 2 cores)")
    args = ap.parse_args()

    import torch
    from peft import PeftModel

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(profile=args.profile, overrides=args.overrides)
    data = load_dataset_records(cfg.data, cfg.model, cfg.artifacts_dir)  # the run's data stage (cached here): stop ids
    ref = resolve_model(cfg.model, cfg.artifacts_dir)
    tok = load_tokenizer(ref, cfg.model)
    model = PeftModel.from_pretrained(load_base_model(ref, cfg.model, cfg.quant, "cpu"), str(args.adapter)).eval()
    suites = load_suites(cfg.eval, cfg.artifacts_dir)
    tmp = Path(tempfile.mkdtemp(prefix="adapter-bench-"))
    cached = base_sides(args.base_cache, tmp)
    out: dict = {"adapter": str(args.adapter), "profile": args.profile, "overrides": args.overrides,
                 "note": "tuned side: the original base weights in fp32 + the adapter on this CPU; base side: the device's cached "
                         "answers (NF4 base, bf16, CUDA) where base_reused says so",
                 "benchmarks": {}}
    for name in args.benchmarks.split(","):
        t0 = time.monotonic()
        suite, base_dir = suites[name], cached[name]
        if args.prompts is not None and args.prompts < len(suite["rows"]):
            idx = subset_indices(len(suite["rows"]), args.prompts, cfg.eval.benchmark_seed)
            suite = {**suite, "rows": [suite["rows"][i] for i in idx], "subset": {**suite["subset"], "n": len(idx), "of_full": idx}}
            saved = json.loads((base_dir / "base.json").read_text())
            base_dir = tmp / "subset" / name
            base_dir.mkdir(parents=True)
            cut = {k: ([v[i] for i in idx] if isinstance(v, list) and len(v) == len(suites[name]["rows"]) else v) for k, v in saved.items()}
            (base_dir / "base.json").write_text(json.dumps(cut))
            (base_dir / "COMPLETE").write_text("")
        if name in args.no_generate.split(","):
            saved = json.loads((base_dir / "base.json").read_text())
            prompts, refs = [r["prompt"] for r in suite["rows"]], [r["reference"] for r in suite["rows"]]
            with torch.inference_mode():
                tuned = reference_nll(model, tok, prompts, refs, cfg.eval.reference_max_tokens, cfg.eval.batch_size, "cpu", cfg.data.system_prompt)
            base = [tuple(x) for x in saved["nll"]]
            tokens = [c for _, c in base]
            assert tokens == [c for _, c in tuned], "reference token counts differ: not the same prompts/tokenizer"
            out["benchmarks"][name] = {"reference_loss": {"base": sum(s for s, _ in base) / sum(tokens),
                                                          "tuned": sum(s for s, _ in tuned) / sum(tokens)},
                                       "per_prompt": {"base": [s for s, _ in base], "tuned": [s for s, _ in tuned], "tokens": tokens}}
        else:
            res = run_benchmark(lambda: model, tok, suite, data.stop_token_ids, cfg.eval, "cpu", print, cfg.data.system_prompt,
                                base_cache=base_dir)
            if res["summary"]["base_reused"] is None:  # the cached side was refused (log above): both sides came from this CPU
                res["summary"]["note"] = "base side regenerated on this CPU: the device's cache did not fit these rows"
            out["benchmarks"][name] = res
        out["benchmarks"][name]["seconds"] = round(time.monotonic() - t0, 1)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"{name}: done in {time.monotonic() - t0:.0f} s -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
