"""Stage 5 — held-out evaluation, base vs tuned, side by side.

One model load: the tuned model is base + adapter, and the base is the same object with the adapter
disabled, so both see identical weights, prompts and decoding. Reports, for each:
- held-out loss and perplexity on assistant tokens;
- verifiable accuracy (greedy generations scored by the embedded tasks' checkers) per family and overall,
  with Wilson intervals, plus a paired bootstrap interval for the tuned-minus-base difference;
- the share of generations that stopped by EOS vs hit the token limit (the "never stops" bug, measured);
- N sample prompts with both outputs;
- standard benchmarks whatever the training data (`eval.benchmarks`, tasks/benchmarks.py), same prompts and
  decoding for both: IFEval (official rule checkers; prompt/instruction level, strict/loose) and AlpacaEval's
  open-ended prompts (loss on the GPT-4-Turbo reference answers; answer length, empty/one-line, EOS and
  repetition shares; ROUGE-L and chrF against the reference), each with Wilson/bootstrap intervals;
- a verdict: where tuned beats base beyond the intervals, where it regressed, and warnings when the tuned
  model got terser or its reference loss rose.
User datasets without checkers get loss/perplexity, the samples and the benchmarks.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from pydantic import BaseModel

from . import benchmarks as bench
from . import instructions
from .common import building, fingerprint, folder_fingerprint, is_complete, locked, maybe_fault, read_json, stage_dir, write_json
from .config import EvalSection, ModelSection, QuantSection
from .data import DataRecord, load_heldout_meta, load_split
from .models import load_base_model, load_tokenizer, quiet_transformers, resolve_device, resolve_model

# Bump when generation, batching or scoring changes what the stage reports (the key cannot see code).
EVAL_VERSION = 4  # 2: standard benchmarks + verdict; 3: per-source loss over the scored + open-ended rows in one pass;
# 4: generation batched by prompt length, loss forwards capped at 8192 padded tokens, every held-out sample stored


class EvalRecord(BaseModel):
    key: str
    dir: str
    eval_json: str
    chart_png: str
    n_prompts: int
    base: dict
    tuned: dict
    per_family: list[dict]
    accuracy_gain: float | None
    gain_ci: list[float] | None
    beats_base: bool | None  # tuned's Wilson lower bound above base's upper bound
    seconds: float
    benchmarks: dict = {}  # name -> summary (metrics base/tuned with intervals, provenance, subset, timing)
    verdict: dict = {}  # better / worse / unclear metric lines and warnings (see `make_verdict`)

    def outputs_exist(self) -> bool:
        return is_complete(Path(self.dir))


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n."""
    if n == 0:
        return (0.0, 0.0)
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a: list[bool], b: list[bool], confidence: float = 0.95, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """CI of mean(b) - mean(a) over the same prompts, resampling prompts."""
    rng = random.Random(seed)
    n = len(a)
    diffs = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(b[i] - a[i] for i in idx) / n)
    diffs.sort()
    lo = diffs[int((1 - confidence) / 2 * rounds)]
    hi = diffs[int((1 + confidence) / 2 * rounds) - 1]
    return (lo, hi)


# Settings that change how the stage runs, not what it measures: out of the key (greedy decoding gives the same
# answers in any batch size; every held-out sample is stored and `samples` only picks how many the report shows).
NOT_MEASURED = {"samples", "batch_size"}
# The libraries that score each benchmark: a new checker or metric version can change a score, so it re-evaluates.
SCORERS = {"ifeval": ("if-verifiable", "nltk", "langdetect", "absl-py", "immutabledict"), "alpaca_eval": ("rouge-score", "nltk", "sacrebleu")}


def cache_key(data: DataRecord, train, model: ModelSection, quant: QuantSection, eval: EvalSection, device: str) -> str:
    # Keyed on the adapter's content, not the train key: training stops by the clock, so one train key can hold
    # adapters of different step counts (and verdicts). Benchmark files are keyed by content (sha256), so a new copy
    # of a benchmark re-runs the stage; the subset sizes, seed and caps are part of eval's dump.
    sources = {n: bench.source_fingerprint(n, eval.benchmark_sources.get(n, "auto")) for n in eval.benchmarks}
    return fingerprint("eval", EVAL_VERSION, data.key, data.model_fingerprint, folder_fingerprint(train.adapter_dir),
                       quant.model_dump(mode="json"), eval.model_dump(mode="json", exclude=NOT_MEASURED), sources,
                       scorer_versions(eval.benchmarks), resolve_device(device))


def scorer_versions(benchmarks: list[str]) -> dict[str, str]:
    """Versions of the checker/metric libraries the benchmarks use, and the NLTK data the IFEval checkers read."""
    from importlib import metadata

    out = {}
    for dist in sorted({d for b in benchmarks for d in SCORERS.get(b, ())}):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    if "ifeval" in benchmarks:
        nltk_dir = bench.nltk_data_dir()
        out["nltk-data"] = folder_fingerprint(nltk_dir) if nltk_dir else _nltk_resources()
    return out


def _nltk_resources() -> str:
    # Without the packaged copy the checkers read NLTK's own search path (~/nltk_data, ...): key on what is found there.
    try:
        import nltk
    except ImportError:
        return "absent"
    found = []
    for res in ("tokenizers/punkt_tab", "tokenizers/punkt", "corpora/stopwords"):
        try:
            found.append((res, folder_fingerprint(getattr(nltk.data.find(res), "path", res))))
        except LookupError:
            found.append((res, "missing"))
    return fingerprint(found)


def evaluate_heldout(data: DataRecord, train, model: ModelSection, quant: QuantSection, eval: EvalSection, device: str, artifacts_dir: str, log_fn=None) -> EvalRecord:
    """Stage 5: base vs tuned on the held-out split."""
    key = cache_key(data, train, model, quant, eval, device)
    out = stage_dir(artifacts_dir, "eval", key)
    with locked(out):
        if is_complete(out):
            return EvalRecord.model_validate(read_json(out / "record.json"))
        return _evaluate(data, train, model, quant, eval, resolve_device(device), key, out, artifacts_dir, log_fn or (lambda m: None))


def _evaluate(data, train, model_cfg, quant, eval, device, key, out, artifacts_dir, log_fn) -> EvalRecord:
    import torch
    from peft import PeftModel

    maybe_fault("evaluate")
    t0 = time.monotonic()
    # Read every benchmark before loading the model: an unreadable source fails here, in seconds.
    suites = load_suites(eval, artifacts_dir)
    ref = resolve_model(model_cfg, artifacts_dir)
    tok = load_tokenizer(ref, model_cfg)
    with quiet_transformers():
        base = load_base_model(ref, model_cfg, quant, device)
        model = PeftModel.from_pretrained(base, train.adapter_dir)
    model.eval()

    held = load_split(data, "heldout")
    meta_all = load_heldout_meta(data)
    # Generations are scored on the rows that carry a checker (embedded tasks) when there are any: rows mixed in
    # from data.mix (open-ended) get a held-out loss per source; their answers are judged by the benchmarks.
    checked = [i for i, m in enumerate(meta_all) if "check" in m]
    idx = (checked if data.has_checkers and checked else list(range(len(meta_all))))[: eval.max_prompts]
    meta, n = [meta_all[i] for i in idx], len(idx)
    # Loss rows: the scored prompts, plus every held-out row of a source with no scored prompt (the open-ended rows
    # data.mix adds); one length-sorted pass gives the overall loss (scored prompts) and each source's.
    source_of = [m.get("source", data.source) for m in meta_all]
    scored_sources = {source_of[i] for i in idx}
    loss_rows = idx + [i for i in range(len(meta_all)) if source_of[i] not in scored_sources]
    groups: dict[str, list[int]] = {}
    for j, i in enumerate(loss_rows):
        groups.setdefault(source_of[i], []).append(j)

    results = {}
    for name in ("base", "tuned"):
        ctx = model.disable_adapter() if name == "base" else _nullcontext()
        with ctx, torch.inference_mode():
            nll = row_nll(model, held.select(loss_rows), tok.pad_token_id, eval.batch_size, device)
            gens = generate(model, tok, [m["messages"] for m in meta[:n]], data.stop_token_ids, eval.max_new_tokens, eval.batch_size, device)
        loss = mean_nll(nll[:n])
        by_source = {src: round(mean_nll([nll[j] for j in rows]), 4) for src, rows in groups.items()} if len(groups) > 1 else {}
        results[name] = {"loss": loss, "gens": gens, "loss_by_source": by_source}
        log_fn(f"evaluate: {name} held-out loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f}), "
               f"{sum(g['stopped'] for g in gens)}/{n} generations stopped by EOS")

    has_checkers = data.has_checkers and all("check" in m for m in meta[:n])
    summary = {}
    ok = {}
    for name, r in results.items():
        gens = r["gens"]
        s = {"loss": round(r["loss"], 4), "perplexity": round(math.exp(min(r["loss"], 50)), 3),
             "eos_share": round(sum(g["stopped"] for g in gens) / n, 4), "limit_share": round(sum(not g["stopped"] for g in gens) / n, 4)}
        if r["loss_by_source"]:
            s["loss_by_source"] = r["loss_by_source"]  # held-out loss of each data source (data.source + data.mix)
        if has_checkers:
            ok[name] = [instructions.check_answer(m["family"], m["check"], g["text"]) for m, g in zip(meta[:n], gens)]
            k = sum(ok[name])
            lo, hi = wilson(k, n, eval.confidence)
            s.update(accuracy=round(k / n, 4), correct=k, n=n, ci=[round(lo, 4), round(hi, 4)])
        summary[name] = s

    per_family = []
    gain = gain_ci = beats = None
    if has_checkers:
        for fam in sorted({m["family"] for m in meta[:n]}):
            ids = [i for i in range(n) if meta[i]["family"] == fam]
            row = {"family": fam, "n": len(ids)}
            for name in ("base", "tuned"):
                k = sum(ok[name][i] for i in ids)
                lo, hi = wilson(k, len(ids), eval.confidence)
                row[f"{name}_accuracy"] = round(k / len(ids), 3)
                row[f"{name}_ci"] = [round(lo, 3), round(hi, 3)]
            per_family.append(row)
        gain = round(summary["tuned"]["accuracy"] - summary["base"]["accuracy"], 4)
        gain_ci = [round(x, 4) for x in paired_bootstrap(ok["base"], ok["tuned"], eval.confidence)]
        beats = summary["tuned"]["ci"][0] > summary["base"]["ci"][1]

    bench_results = {name: run_benchmark(model, tok, suite, data.stop_token_ids, eval, device, log_fn) for name, suite in suites.items()}
    verdict = make_verdict(summary, gain_ci, bench_results, eval.confidence)  # logged once by the task wrapper

    samples = []
    for i in range(n):  # all of them: `eval.samples` only picks how many the report shows (not in the key)
        m = meta[i]
        samples.append({
            "family": m.get("family", ""),
            "prompt": m["messages"][-2]["content"] if len(m["messages"]) >= 2 else "",
            "expected": m["messages"][-1]["content"],
            "base": results["base"]["gens"][i]["text"],
            "tuned": results["tuned"]["gens"][i]["text"],
            **({"base_ok": ok["base"][i], "tuned_ok": ok["tuned"][i]} if has_checkers else {}),
        })

    with building(out) as tmp:
        chart = tmp / "eval_chart.png"
        _plot(summary, per_family, chart)
        rec = EvalRecord(
            key=key,
            dir=str(out),
            eval_json=str(out / "eval.json"),
            chart_png=str(out / "eval_chart.png"),
            n_prompts=n,
            base=summary["base"],
            tuned=summary["tuned"],
            per_family=per_family,
            accuracy_gain=gain,
            gain_ci=gain_ci,
            beats_base=beats,
            seconds=round(time.monotonic() - t0, 2),
            benchmarks={k: v["summary"] for k, v in bench_results.items()},
            verdict=verdict,
        )
        write_json(tmp / "eval.json", {**rec.model_dump(mode="json"), "samples": samples,
                                       "generations": {k: [g["text"] for g in v["gens"]] for k, v in results.items()},
                                       "benchmark_rows": {k: v["rows"] for k, v in bench_results.items()}})
        write_json(tmp / "record.json", rec.model_dump(mode="json"))
    return rec


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def row_nll(model, ds, pad_id: int, batch_size: int, device: str, max_tokens: int = 8192) -> list[tuple[float, int]]:
    """(summed NLL, assistant-token count) of every row, in the dataset's order; batches sorted by length, so
    little of each forward is padding, and at most `max_tokens` padded tokens per forward (the fp32 logits of
    a batch are tokens x vocabulary: 8192 x 256k (Gemma) is 8 GiB; a large generation batch_size must not
    turn into an out-of-memory here)."""
    import torch

    from .train import PaddedCollator

    collate = PaddedCollator(pad_id)
    rows = [ds[i] for i in range(len(ds))]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    batches, cur = [], []
    for i in order:  # ascending length: the row just added is the batch's longest
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * len(rows[i]["input_ids"]) > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    batches += [cur] if cur else []
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for ids in batches:
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in ids]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        for r, i in enumerate(ids):
            out[i] = (float(nll[r].sum()), int((labels[r] != -100).sum()))
    return out


def mean_nll(rows: list[tuple[float, int]]) -> float:
    """Mean NLL per token over rows of (summed NLL, token count)."""
    return sum(s for s, _ in rows) / max(sum(c for _, c in rows), 1)


def generate(model, tok, conversations: list[list[dict]], stop_ids: list[int], max_new_tokens: int, batch_size: int, device: str) -> list[dict]:
    """Greedy answers to each conversation's last user turn, in the input order; `stopped` = ended by an
    end-of-turn token. Batched by prompt length (less left padding: benchmark prompts range from 10 to 500+
    tokens)."""
    prompts = []
    for msgs in conversations:
        ctx = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
        prompts.append(tok.apply_chat_template(ctx, tokenize=False, add_generation_prompt=True))
    lengths = [len(ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    old_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only generation needs the prompt flush against the new tokens
    out: list[dict] = [{}] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            ids = order[start:start + batch_size]
            enc = tok([prompts[i] for i in ids], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            new = gen[:, enc["input_ids"].shape[1]:]
            for i, row in zip(ids, new.tolist()):
                stop_at = next((j for j, t in enumerate(row) if t in stop_ids), None)
                kept = row[:stop_at] if stop_at is not None else row
                out[i] = {"text": tok.decode(kept, skip_special_tokens=True).strip(), "stopped": stop_at is not None}
    finally:
        tok.padding_side = old_side
    return out


def _plot(summary: dict, per_family: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    if per_family:
        labels = [r["family"] for r in per_family] + ["OVERALL"]
        base = [r["base_accuracy"] for r in per_family] + [summary["base"]["accuracy"]]
        tuned = [r["tuned_accuracy"] for r in per_family] + [summary["tuned"]["accuracy"]]
        x = range(len(labels))
        ax.bar([i - 0.2 for i in x], base, width=0.4, label="base")
        ax.bar([i + 0.2 for i in x], tuned, width=0.4, label="tuned")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=45, ha="right")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1)
    else:
        ax.bar(["base", "tuned"], [summary["base"]["loss"], summary["tuned"]["loss"]])
        ax.set_ylabel("held-out loss (assistant tokens)")
    ax.set_title("Base vs tuned on held-out prompts")
    ax.legend() if per_family else None
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_report(rec: EvalRecord, samples: list[dict]) -> str:
    b, t = rec.base, rec.tuned
    lines = ["## Held-out evaluation: base vs tuned", "",
             "| model | loss | ppl | accuracy | 95% CI | stopped by EOS |", "|---|---|---|---|---|---|"]
    for name, s in (("base", b), ("tuned", t)):
        acc = f"{s['accuracy']:.1%}" if "accuracy" in s else "n/a"
        ci = f"[{s['ci'][0]:.1%}, {s['ci'][1]:.1%}]" if "ci" in s else "n/a"
        lines.append(f"| {name} | {s['loss']:.3f} | {s['perplexity']:.2f} | {acc} | {ci} | {s['eos_share']:.0%} |")
    if rec.accuracy_gain is not None:
        lines += ["", f"Gain {rec.accuracy_gain:+.1%} (paired bootstrap CI [{rec.gain_ci[0]:+.1%}, {rec.gain_ci[1]:+.1%}]); "
                  f"tuned beats base beyond both intervals: **{rec.beats_base}**."]
    if samples:
        lines += ["", "### Samples", "", "| prompt | expected | base | tuned |", "|---|---|---|---|"]
        for s in samples:
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")[:200]  # noqa: E731
            lines.append(f"| {cell(s['prompt'])} | {cell(s['expected'])} | {cell(s['base'])} | {cell(s['tuned'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Standard benchmarks (eval.benchmarks): same prompts and greedy decoding for base and tuned

DEFAULT_BENCHMARK_TOKENS = 512  # full-set cap (GPU profiles); CPU profiles set eval.benchmark_max_new_tokens


def load_suites(eval: EvalSection, artifacts_dir: str) -> dict[str, dict]:
    """name -> {rows (the seeded subset), provenance, subset settings}; raises BenchmarkError (one line)."""
    suites = {}
    for name in eval.benchmarks:
        rows, prov = bench.load_benchmark(name, eval.benchmark_sources.get(name, "auto"), artifacts_dir)
        idx = bench.subset_indices(len(rows), eval.benchmark_prompts.get(name), eval.benchmark_seed)
        suites[name] = {"name": name, "rows": [rows[i] for i in idx], "provenance": prov,
                        "subset": {"n": len(idx), "n_full": len(rows), "seed": eval.benchmark_seed,
                                   "max_new_tokens": eval.benchmark_max_new_tokens.get(name, DEFAULT_BENCHMARK_TOKENS)}}
    return suites


def reference_nll(model, tok, prompts: list[str], references: list[str], max_tokens: int, batch_size: int, device: str) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each reference answer given its prompt (chat template, generation prompt),
    the reference cut to `max_tokens`. A model that collapsed to terse replies scores worse here."""
    feats = []
    for p, r in zip(prompts, references):
        ctx = tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        ans = tok(r, add_special_tokens=False)["input_ids"][:max_tokens]
        feats.append({"input_ids": ctx + ans, "labels": [-100] * len(ctx) + ans})
    return row_nll(model, feats, tok.pad_token_id, batch_size, device)


def _binary(k_list: list[bool], confidence: float) -> dict:
    k, n = sum(k_list), len(k_list)
    lo, hi = wilson(k, n, confidence)
    return {"value": round(k / n, 4) if n else None, "k": k, "n": n, "ci": [round(lo, 4), round(hi, 4)]}


def _paired(base: list[float], tuned: list[float], confidence: float, higher_is_better: bool = True) -> dict:
    """Tuned-minus-base gain with a paired bootstrap interval; `better`/`worse` only beyond the interval."""
    if not base:
        return {"gain": None, "gain_ci": None, "verdict": "unscored"}
    gain = sum(t - b for b, t in zip(base, tuned)) / len(base)
    lo, hi = paired_bootstrap(base, tuned, confidence)
    good, bad = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
    return {"gain": round(gain, 4), "gain_ci": [round(lo, 4), round(hi, 4)], "verdict": "better" if good else "worse" if bad else "unclear"}


def run_benchmark(model, tok, suite: dict, stop_ids: list[int], eval: EvalSection, device: str, log_fn) -> dict:
    """Base then tuned on one benchmark; returns {"summary": small JSON for the record, "rows": per-prompt detail}."""
    import torch

    name, rows = suite["name"], suite["rows"]
    prompts = [r["prompt"] for r in rows]
    cap = suite["subset"]["max_new_tokens"]
    t0 = time.monotonic()
    gens, nll = {}, {}
    for who in ("base", "tuned"):
        ctx = model.disable_adapter() if who == "base" else _nullcontext()
        with ctx, torch.inference_mode():
            gens[who] = generate(model, tok, [[{"role": "user", "content": p}] for p in prompts], stop_ids, cap, eval.batch_size, device)
            if name == "alpaca_eval":
                nll[who] = reference_nll(model, tok, prompts, [r["reference"] for r in rows], eval.reference_max_tokens, eval.batch_size, device)
    seconds = round(time.monotonic() - t0, 1)
    summary: dict = {"provenance": suite["provenance"], "subset": suite["subset"], "seconds": seconds, "metrics": {}}
    detail = [{"id": r["id"], "prompt": r["prompt"], "base": gens["base"][i]["text"], "tuned": gens["tuned"][i]["text"]} for i, r in enumerate(rows)]
    m = summary["metrics"]
    conf = eval.confidence

    if name == "ifeval":
        registry = bench.ifeval_registry()
        verdicts = {who: [bench.check_ifeval(r, gens[who][i]["text"], registry) for i, r in enumerate(rows)] for who in gens}
        p = bench.ifeval_paired(verdicts["base"], verdicts["tuned"])
        for level in ("prompt", "instruction"):
            for mode in ("strict", "loose"):
                b, t = p[level][mode]
                m[f"{level}_{mode}"] = {"base": _binary(b, conf), "tuned": _binary(t, conf), **_paired([float(x) for x in b], [float(x) for x in t], conf)}
        # Counted, and left out of both models' denominators: never folded into pass or fail.
        summary["unscoreable"] = p["unscoreable"]
        summary["unscoreable_instructions"] = p["unscoreable_instructions"]
        summary["excluded_prompts"] = p["excluded_prompts"]
        summary["by_type"] = {k: {"n": v["n"], "base_loose": round(v["base_loose"] / v["n"], 3), "tuned_loose": round(v["tuned_loose"] / v["n"], 3)}
                              for k, v in sorted(p["by_type"].items())}
        for i, d in enumerate(detail):
            d["base_checks"], d["tuned_checks"] = verdicts["base"][i], verdicts["tuned"][i]
        summary["checkers"] = f"if-verifiable=={_version('if-verifiable')} (Google's IFEval rule checkers)"

    if name == "alpaca_eval":
        refs = [r["reference"] for r in rows]
        stats = {who: bench.answer_stats([g["text"] for g in gens[who]], [g["stopped"] for g in gens[who]]) for who in gens}
        summary["answers"] = stats
        words = {who: [float(bench.word_count(g["text"])) for g in gens[who]] for who in gens}
        m["answer_words"] = {"base": {"median": stats["base"]["median_words"]}, "tuned": {"median": stats["tuned"]["median_words"]},
                             **_paired(words["base"], words["tuned"], conf)}
        # length is not a quality score: say which way it moved, the TERSER warning judges it
        m["answer_words"]["verdict"] = {"better": "longer", "worse": "shorter"}.get(m["answer_words"]["verdict"], "unclear")
        per_prompt_loss = {who: [s_ / max(c, 1) for s_, c in nll[who]] for who in nll}
        tot = {who: sum(s_ for s_, _ in nll[who]) / max(sum(c for _, c in nll[who]), 1) for who in nll}
        m["reference_loss"] = {"base": {"value": round(tot["base"], 4), "perplexity": round(math.exp(min(tot["base"], 50)), 3)},
                               "tuned": {"value": round(tot["tuned"], 4), "perplexity": round(math.exp(min(tot["tuned"], 50)), 3)},
                               **_paired(per_prompt_loss["base"], per_prompt_loss["tuned"], conf, higher_is_better=False)}
        overlap = {who: bench.reference_overlap([g["text"] for g in gens[who]], refs) for who in gens}
        for metric in ("rouge_l", "chrf"):
            b, t = overlap["base"][metric], overlap["tuned"][metric]
            m[metric] = {"base": {"value": round(sum(b) / len(b), 4)}, "tuned": {"value": round(sum(t) / len(t), 4)}, **_paired(b, t, conf)}
        for i, d in enumerate(detail):
            # AlpacaEval's prompts and references are CC-BY-NC-4.0: eval.json (published, maybe pushed to the hub)
            # keeps the row id and the numbers, not their text.
            d.pop("prompt")
            d.update(base_loss=round(per_prompt_loss["base"][i], 4), tuned_loss=round(per_prompt_loss["tuned"][i], 4),
                     base_rouge_l=round(overlap["base"]["rouge_l"][i], 4), tuned_rouge_l=round(overlap["tuned"]["rouge_l"][i], 4))
        summary["metrics_note"] = "ROUGE-L: rouge-score (stemmed F1); chrF: sacrebleu sentence chrF / 100; lengths in words"

    for who in gens:
        summary.setdefault("eos_share", {})[who] = round(sum(g["stopped"] for g in gens[who]) / max(len(rows), 1), 4)
    log_fn(f"evaluate: {name}: {len(rows)}/{suite['subset']['n_full']} prompts, cap {cap} tokens, base+tuned in {seconds:.0f} s")
    return {"summary": summary, "rows": detail}


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "missing"


RATE_METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")


def _ordered(name: str, metrics: dict) -> list[tuple[str, dict]]:
    """Metrics in the _LABELS order (JSON round trips sort keys), unknown ones last."""
    order = [k for (n, k) in _LABELS if n == name]
    return sorted(metrics.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


TERSE_RATIO = 0.5  # tuned median answer length below this share of the base's = "got terser" warning

_LABELS = {
    ("ifeval", "prompt_loose"): "IFEval prompt-level loose", ("ifeval", "prompt_strict"): "IFEval prompt-level strict",
    ("ifeval", "instruction_loose"): "IFEval instruction-level loose", ("ifeval", "instruction_strict"): "IFEval instruction-level strict",
    ("alpaca_eval", "reference_loss"): "AlpacaEval reference loss", ("alpaca_eval", "rouge_l"): "AlpacaEval ROUGE-L",
    ("alpaca_eval", "chrf"): "AlpacaEval chrF", ("alpaca_eval", "answer_words"): "AlpacaEval answer length (words)",
}


def make_verdict(summary: dict, gain_ci: list[float] | None, bench_results: dict, confidence: float) -> dict:
    """Where tuned beats base beyond the intervals, where it regressed, where it is unclear; plus warnings."""
    better, worse, unclear, warnings = [], [], [], []

    def put(label: str, verdict: str, detail: str) -> None:
        {"better": better, "worse": worse}.get(verdict, unclear).append(f"{label}: {detail}")

    if "accuracy" in summary.get("base", {}) and gain_ci is not None:
        b, t = summary["base"]["accuracy"], summary["tuned"]["accuracy"]
        v = "better" if gain_ci[0] > 0 else "worse" if gain_ci[1] < 0 else "unclear"
        put("embedded verifiable accuracy", v, f"{b:.1%} -> {t:.1%} (gain CI [{gain_ci[0] * 100:+.1f}, {gain_ci[1] * 100:+.1f}] points)")
    for name, res in bench_results.items():
        for key, m in _ordered(name, res["summary"]["metrics"]):
            label = _LABELS.get((name, key), f"{name} {key}")
            if key == "answer_words":
                continue  # length is a warning, not a quality score
            b, t = m["base"].get("value"), m["tuned"].get("value")
            if m.get("gain") is None:
                unclear.append(f"{label}: not scored (nothing scoreable)")
                continue
            ci = m["gain_ci"]
            if key in RATE_METRICS:  # shares: percent, gain in points
                put(label, m["verdict"], f"{b:.1%} -> {t:.1%} (gain CI [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}] points)")
            else:
                put(label, m["verdict"], f"{b:.3f} -> {t:.3f} (gain CI [{ci[0]:+.3f}, {ci[1]:+.3f}])")
        s = res["summary"]
        if name == "alpaca_eval":
            bw, tw = s["answers"]["base"]["median_words"], s["answers"]["tuned"]["median_words"]
            if bw > 0 and tw < TERSE_RATIO * bw:
                warnings.append(f"TERSER: tuned median answer on open-ended prompts is {tw:.0f} words vs base {bw:.0f} "
                                f"(< {TERSE_RATIO:.0%}); the model may have learned a short-answer format and lost helpfulness")
            rl = s["metrics"]["reference_loss"]
            if rl["tuned"]["value"] > rl["base"]["value"]:
                beyond = "beyond the interval" if rl["verdict"] == "worse" else "within the interval"
                warnings.append(f"REFERENCE LOSS ROSE: AlpacaEval reference-answer loss {rl['base']['value']:.3f} -> {rl['tuned']['value']:.3f} ({beyond})")
        if s.get("unscoreable_instructions"):
            types = ", ".join(f"{k} ({v['count']})" for k, v in s["unscoreable"].items())
            warnings.append(f"UNSCOREABLE: {name}: {s['unscoreable_instructions']} instructions of types {types} could not be checked "
                            f"(missing data); {s['excluded_prompts']} prompts excluded from prompt-level scores")
    lines = ([f"better beyond the {confidence:.0%} interval: {x}" for x in better] + [f"REGRESSED beyond the {confidence:.0%} interval: {x}" for x in worse]
             + [f"no clear difference: {x}" for x in unclear] + [f"WARNING {w}" for w in warnings])
    return {"better": better, "worse": worse, "unclear": unclear, "warnings": warnings, "lines": lines}


def benchmark_markdown(rec: EvalRecord) -> str:
    """The benchmarks and verdict as markdown, for the Prefect UI and the model card."""
    if not rec.benchmarks and not rec.verdict:
        return ""
    lines = ["## Verdict: base vs tuned", ""]
    v = rec.verdict
    for w in v.get("warnings", []):
        lines.append(f"> **Warning:** {w}")
    if v.get("warnings"):
        lines.append("")
    for title, key in (("Better beyond the intervals", "better"), ("Regressed beyond the intervals", "worse"), ("No clear difference", "unclear")):
        if v.get(key):
            lines += [f"**{title}**", ""] + [f"- {x}" for x in v[key]] + [""]
    for name, s in sorted(rec.benchmarks.items(), key=lambda kv: list(bench.BENCHMARKS).index(kv[0]) if kv[0] in bench.BENCHMARKS else 99):
        sub, prov = s["subset"], s["provenance"]
        lines += [f"### {name}: {sub['n']} of {sub['n_full']} prompts (seed {sub['seed']}), greedy, cap {sub['max_new_tokens']} tokens", "",
                  f"Source: {prov.get('source')} `{prov.get('hub_id') or prov.get('file')}` sha256 `{str(prov.get('sha256'))[:16]}…`, "
                  f"license {prov.get('license')}. {s['seconds']:.0f} s.", "",
                  "| metric | base | tuned | gain [CI] | verdict |", "|---|---|---|---|---|"]
        for key, m in _ordered(name, s["metrics"]):
            def cell(x: dict) -> str:
                if "ci" in x:
                    return f"{x['value']:.1%} [{x['ci'][0]:.1%}, {x['ci'][1]:.1%}] (n={x['n']})" if x["value"] is not None else "n/a"
                if "median" in x:
                    return f"median {x['median']:.0f}"
                return f"{x['value']:.3f}" + (f" (ppl {x['perplexity']:.1f})" if "perplexity" in x else "")
            gain = f"{m['gain']:+.3f} [{m['gain_ci'][0]:+.3f}, {m['gain_ci'][1]:+.3f}]" if m.get("gain") is not None else "n/a"
            lines.append(f"| {_LABELS.get((name, key), key)} | {cell(m['base'])} | {cell(m['tuned'])} | {gain} | {m['verdict']} |")
        if "answers" in s:
            a = s["answers"]
            lines += ["", "| answers | base | tuned |", "|---|---|---|"]
            for k in ("median_words", "p10_words", "p90_words", "empty_share", "one_line_share", "eos_share", "repetition_rate"):
                lines.append(f"| {k} | {a['base'][k]} | {a['tuned'][k]} |")
        if "unscoreable" in s:
            u = s["unscoreable"]
            lines += ["", f"Unscoreable instructions: {s['unscoreable_instructions']}" + (" (" + ", ".join(f"{k}: {x['count']}" for k, x in u.items()) + ")" if u else "")
                      + f"; prompts excluded from prompt-level: {s['excluded_prompts']}. Checkers: {s.get('checkers', '')}."]
        lines.append("")
    return "\n".join(lines)
