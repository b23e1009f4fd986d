"""Issue 12: what the evaluate stage's benchmarks cost on this machine, to size the CPU demo's subsets.

Loads the demo profile's model (or --profile's) once, then times, for ONE model pass (the stage runs two:
base and tuned), greedy generation on a seeded subset of each benchmark at a given cap, and the AlpacaEval
reference loss. Prints seconds per prompt and the answer-length median; writes JSON with --out.

The same run also times the embedded held-out tasks (cap --embedded-tokens), whose full evaluate cost on an
idle machine is known (docs/BENCHMARKS.md): on a shared, busy CPU the *ratio* benchmark/embedded is what
carries over, so the script prints it too.

    PYTHONPATH=$PWD python bench/eval_cost.py --n 24 --ifeval-tokens 128 --alpaca-tokens 128
    # GPU box without hub access: the Mistral-7B architecture with random weights (never stops at EOS, so
    # every answer runs to the cap: the worst case), NF4 as in training
    PYTHONPATH=$PWD python bench/eval_cost.py --profile mistral-7b --set model.name=random:mistral \
        --set 'model.random_config={vocab_size: 32000, dtype: bfloat16}' \
        --n 64 --ifeval-tokens 512 --alpaca-tokens 512 --reference-tokens 512 --batch-size 16 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--n", type=int, default=24, help="prompts per benchmark")
    ap.add_argument("--ifeval-tokens", type=int, default=128)
    ap.add_argument("--alpaca-tokens", type=int, default=128)
    ap.add_argument("--embedded-tokens", type=int, default=48)
    ap.add_argument("--reference-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=0, help="0 = the profile's eval.batch_size")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="pipeline.yaml override, dotted=value")
    ap.add_argument("--out", default="")
    a = ap.parse_args()

    import torch

    from tasks import benchmarks as bench
    from tasks.config import load_config
    from tasks.data import stop_token_ids
    from tasks.evaluate import generate, reference_nll
    from tasks.models import load_base_model, load_tokenizer, resolve_device, resolve_model

    cfg = load_config(profile=a.profile, overrides=a.overrides)
    device = resolve_device(cfg.device)
    ref = resolve_model(cfg.model, cfg.artifacts_dir)
    tok = load_tokenizer(ref, cfg.model)
    model = load_base_model(ref, cfg.model, cfg.quant, device).eval()
    bs = a.batch_size or cfg.eval.batch_size
    stop = stop_token_ids(tok)
    out = {"profile": a.profile, "device": device, "threads": torch.get_num_threads(), "batch_size": bs, "n": a.n}
    from tasks import instructions

    embedded = [{"prompt": e.prompt} for e in instructions.generate(a.n, "heldout", 0)]
    for name, cap in (("embedded", a.embedded_tokens), ("ifeval", a.ifeval_tokens), ("alpaca_eval", a.alpaca_tokens)):
        if name == "embedded":
            rows = embedded
        else:
            rows, _ = bench.load_benchmark(name)
            rows = [rows[i] for i in bench.subset_indices(len(rows), a.n, 0)]
        t0, c0 = time.monotonic(), time.process_time()
        with torch.inference_mode():
            gens = generate(model, tok, [[{"role": "user", "content": r["prompt"]}] for r in rows], stop, cap, bs, device)
        gen_s, cpu_s = time.monotonic() - t0, time.process_time() - c0
        words = [bench.word_count(g["text"]) for g in gens]
        res = {"cap": cap, "gen_s": round(gen_s, 1), "gen_cpu_s": round(cpu_s, 1), "gen_s_per_prompt": round(gen_s / len(rows), 3),
               "median_words": statistics.median(words), "eos_share": sum(g["stopped"] for g in gens) / len(gens)}
        if name != "embedded":
            res["ratio_to_embedded"] = round(gen_s / out["embedded"]["gen_s"], 2)
        if name == "alpaca_eval":
            t0 = time.monotonic()
            with torch.inference_mode():
                reference_nll(model, tok, [r["prompt"] for r in rows], [r["reference"] for r in rows], a.reference_tokens, bs, device)
            res["ref_loss_s"] = round(time.monotonic() - t0, 1)
            res["ref_ratio_to_embedded"] = round(res["ref_loss_s"] / out["embedded"]["gen_s"], 2)
            res["ref_loss_s_per_prompt"] = round(res["ref_loss_s"] / len(rows), 3)
        out[name] = res
        print(name, json.dumps(res), flush=True)
    if a.out:
        from pathlib import Path

        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "eval_cost.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
