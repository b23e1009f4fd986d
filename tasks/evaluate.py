"""Stage 5 — held-out evaluation, base vs tuned, side by side.

One model load: the tuned model is base + adapter, and the base is the same object with the adapter
disabled, so both see identical weights, prompts and decoding. Reports, for each:
- held-out loss and perplexity on assistant tokens;
- verifiable accuracy (greedy generations scored by the embedded tasks' checkers) per family and overall,
  with Wilson intervals, plus a paired bootstrap interval for the tuned-minus-base difference;
- the share of generations that stopped by EOS vs hit the token limit (the "never stops" bug, measured);
- N sample prompts with both outputs.
User datasets without checkers get loss/perplexity and the samples.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from pydantic import BaseModel

from . import instructions
from .common import building, fingerprint, is_complete, locked, maybe_fault, read_json, stage_dir, write_json
from .config import EvalSection, ModelSection, QuantSection
from .data import DataRecord, load_heldout_meta, load_split
from .models import load_base_model, load_tokenizer, quiet_transformers, resolve_device, resolve_model

EVAL_VERSION = 1


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


def cache_key(data: DataRecord, train, model: ModelSection, quant: QuantSection, eval: EvalSection) -> str:
    return fingerprint("eval", EVAL_VERSION, data.key, train.key, quant.model_dump(mode="json"), eval.model_dump(mode="json"))


def evaluate_heldout(data: DataRecord, train, model: ModelSection, quant: QuantSection, eval: EvalSection, device: str, artifacts_dir: str, log_fn=None) -> EvalRecord:
    """Stage 5: base vs tuned on the held-out split."""
    key = cache_key(data, train, model, quant, eval)
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
    ref = resolve_model(model_cfg, artifacts_dir)
    tok = load_tokenizer(ref, model_cfg)
    with quiet_transformers():
        base = load_base_model(ref, model_cfg, quant, device)
        model = PeftModel.from_pretrained(base, train.adapter_dir)
    model.eval()

    held = load_split(data, "heldout")
    meta = load_heldout_meta(data)
    n = min(eval.max_prompts, len(meta))
    idx = list(range(n))

    results = {}
    for name in ("base", "tuned"):
        ctx = model.disable_adapter() if name == "base" else _nullcontext()
        with ctx, torch.inference_mode():
            loss = heldout_loss(model, held.select(idx), tok.pad_token_id, eval.batch_size, device)
            gens = generate(model, tok, [m["messages"] for m in meta[:n]], data.stop_token_ids, eval.max_new_tokens, eval.batch_size, device)
        results[name] = {"loss": loss, "gens": gens}
        log_fn(f"evaluate: {name} held-out loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f}), "
               f"{sum(g['stopped'] for g in gens)}/{n} generations stopped by EOS")

    has_checkers = data.has_checkers and all("check" in m for m in meta[:n])
    summary = {}
    ok = {}
    for name, r in results.items():
        gens = r["gens"]
        s = {"loss": round(r["loss"], 4), "perplexity": round(math.exp(min(r["loss"], 50)), 3),
             "eos_share": round(sum(g["stopped"] for g in gens) / n, 4), "limit_share": round(sum(not g["stopped"] for g in gens) / n, 4)}
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

    samples = []
    for i in range(min(eval.samples, n)):
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
        )
        write_json(tmp / "eval.json", {**rec.model_dump(mode="json"), "samples": samples,
                                       "generations": {k: [g["text"] for g in v["gens"]] for k, v in results.items()}})
        write_json(tmp / "record.json", rec.model_dump(mode="json"))
    return rec


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def heldout_loss(model, ds, pad_id: int, batch_size: int, device: str) -> float:
    """Mean NLL per assistant token over the held-out split."""
    import torch

    from .train import PaddedCollator

    collate = PaddedCollator(pad_id)
    total, count = 0.0, 0
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def generate(model, tok, conversations: list[list[dict]], stop_ids: list[int], max_new_tokens: int, batch_size: int, device: str) -> list[dict]:
    """Greedy answers to each conversation's last user turn; `stopped` = ended by an end-of-turn token."""
    import torch

    prompts = []
    for msgs in conversations:
        ctx = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
        prompts.append(tok.apply_chat_template(ctx, tokenize=False, add_generation_prompt=True))
    old_side = tok.padding_side
    tok.padding_side = "left"  # decoder-only generation needs the prompt flush against the new tokens
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tok(prompts[start:start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():
                stop_at = next((i for i, t in enumerate(row) if t in stop_ids), None)
                kept = row[:stop_at] if stop_at is not None else row
                out.append({"text": tok.decode(kept, skip_special_tokens=True).strip(), "stopped": stop_at is not None})
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
