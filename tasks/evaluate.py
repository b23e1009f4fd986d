"""Stage 5 — held-out evaluation, base vs tuned, side by side.

One model load: the tuned model is base + adapter, and the base is the same object with the adapter
disabled, so both see identical weights, prompts and decoding. Reports, for each:
- held-out loss and perplexity on assistant tokens;
- verifiable accuracy (greedy generations scored by the embedded tasks' checkers) per family and overall,
  with Wilson intervals, plus the exact McNemar test and interval for the tuned-minus-base difference;
- the share of generations that stopped by EOS vs hit the token limit (the "never stops" bug, measured);
- N sample prompts with both outputs;
- standard benchmarks whatever the training data (`eval.benchmarks`, tasks/benchmarks.py), prompted as the
  published model is (data.system_prompt), same prompts and decoding for both: IFEval (official rule checkers;
  prompt level with the exact McNemar test, instruction level with intervals that resample prompts, strict and
  loose) and AlpacaEval's open-ended prompts (per-token loss on the GPT-4-Turbo reference answers; answer
  length, empty/one-line, EOS and repetition shares; ROUGE-L and chrF against the reference on each pair cut to
  its shorter answer, the whole answers' scores shown as length-sensitive);
- a verdict: where tuned beats base beyond the intervals, where it regressed, how many measures were judged,
  which benchmarks the training data was deduped against, and warnings when the tuned model got terser (or the
  cap hides whether it did) or its reference loss rose.
User datasets without checkers get loss/perplexity, the samples and the benchmarks.
"""

from __future__ import annotations

import functools
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel

from . import benchmarks as bench
from . import instructions
from .common import (COMPLETE, PARTS, StageError, building, changed_file, complete_record, disk_full, fingerprint, folder_fingerprint, is_complete, is_listed,
                     list_parts, listed_change, locked, mark_parts_complete, maybe_fault, progress_bar, read_json, stage_dir, write_json)
from .config import EvalSection, ModelSection, QuantSection, installed_version
from .data import DataRecord, load_heldout_meta, load_split, rendering_key, rows_key
from .models import hardware_id, keyed_model, keyed_quant, load_base_model, load_tokenizer, quiet_transformers, remote_code_key, resolve_device, resolve_model

# Bump when generation, batching or scoring changes what the stage reports (the key cannot see code).
EVAL_VERSION = 12  # 2: standard benchmarks + verdict; 3: per-source loss over the scored + open-ended rows in one pass;
# 4: generation batched by prompt length, loss forwards capped at 8192 padded tokens, every held-out sample stored;
# 5: benchmarks prompted with data.system_prompt, exact tests for binary measures, prompt-cluster intervals at instruction
# level, per-token reference loss throughout, length-controlled ROUGE-L/chrF
# 6: IFEval answers that give the prompt back, judged (exact McNemar) and warned (COPIES THE PROMPT)
# 7: every generation pass checks its first rows' greedy tokens against a plain forward (decode_check; GENERATION BROKEN);
# the base's benchmark answers cached by base_answers_key and reused across adapters
# 8: loop_share in the answer stats and summaries, and the LOOPS warning (a record cached before has neither, so a rerun
# on the same adapter would give back its verdict without the warning)
# 9: AlpacaEval's reference loss, ROUGE-L and chrF judged better/worse only where the paired sign-flip test agrees
# 10: answer lengths with each loop cut where it begins (median_words_loops_cut, AlpacaEval's length_vs_reference)
# 11: loops that count their items in ordinals, number words, roman numerals or letters, and loops of characters
# without spaces ('7777...'), read as loops (loop_share, median_words_loops_cut, length_vs_reference change)
# 12: the TERSER check measures a tuned answer against the base's only where the base's is an answer (no loop, not the
# prompt given back), else against the prompt's reference answer, and leaves tuned answers that loop to LOOPS
# (bench.length_check): a base model's loops to the cap made every tuned model that learned to stop read TERSER
# The base's cached benchmark answers (`base_answers_key`, which, as `passes_key`, also fingerprints the code that
# generates and scores them: `answer_code`) have their own number: bump it when their content changes, not when only
# what stage 5 reports from them does.
BASE_ANSWERS_VERSION = 7
# The saved passes (`passes_key`: each model's answers, losses and decode check) have theirs too, for the same reason: a
# change to how answers are scored or summarised (EVAL_VERSION 11's loop reading) re-scores the passes already made
# instead of generating every tuned answer again. 10 = the EVAL_VERSION they were keyed under until it had its own
# number, so passes saved before are still found. Bump it when what a pass holds changes.
PASSES_VERSION = 10


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
    gain_ci: list[float] | None  # exact interval of the gain (mcnemar_exact), consistent with accuracy_test's p
    beats_base: bool | None  # tuned's Wilson lower bound above base's upper bound
    accuracy_test: dict = {}  # mcnemar_exact on the paired pass/fail: p, discordant counts, verdict
    seconds: float
    benchmarks: dict = {}  # name -> summary (metrics base/tuned with intervals, provenance, subset, timing)
    verdict: dict = {}  # better / worse / unclear metric lines and warnings (see `make_verdict`)

    def outputs_exist(self) -> bool:
        # publish copies both: without them it failed on a bare FileNotFoundError naming neither the folder nor a fix
        # (and both as they were written: an eval.json edited since was published as this run's result, `changed_file`)
        return (is_complete(Path(self.dir)) and Path(self.eval_json).is_file() and Path(self.chart_png).is_file()
                and changed_file(Path(self.dir)) is None)


def _wilson_at(p: float, n: float, confidence: float) -> tuple[float, float]:
    """Wilson score interval for an observed share p of n trials (n may be an effective, non-integer size)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes out of n independent trials."""
    return _wilson_at(k / n, n, confidence) if n else (0.0, 0.0)


def cluster_wilson(k: list[int], n: list[int], confidence: float = 0.95) -> tuple[float, float]:
    """Wilson interval of sum(k) / sum(n) when the trials come in clusters that pass or fail together (the
    instructions of one answer): Wilson at the effective size sum(n) / deff, where deff (Kish's design effect) is
    the share's variance across clusters over its variance for independent trials, never below 1. One trial per
    cluster gives Wilson's interval; clusters of c trials that always agree give Wilson's on the clusters. When
    every trial passed, or every one failed, that variance says nothing and the worst case is used (Wilson on
    the clusters)."""
    total_k, total_n, m = sum(k), sum(n), len(n)
    if total_n == 0:
        return (0.0, 0.0)
    p = total_k / total_n
    if m < 2 or p in (0.0, 1.0):
        return _wilson_at(p, m, confidence)
    var_clusters = sum((ki - p * ni) ** 2 for ki, ni in zip(k, n)) / total_n ** 2  # the ratio estimator's variance
    deff = max(1.0, var_clusters / (p * (1 - p) / total_n))
    return _wilson_at(p, total_n / deff, confidence)


def paired_bootstrap(a: list[float], b: list[float], confidence: float = 0.95, rounds: int = 2000, seed: int = 0,
                     sizes: list[int] | None = None) -> tuple[float, float]:
    """Percentile CI of sum(b - a) / sum(sizes) over the same units (prompts), resampling units. `sizes` None =
    one item per unit: the CI of mean(b) - mean(a). Otherwise a[i], b[i] are unit i's sums over sizes[i] items
    (the instructions of one answer, the tokens of one reference): a cluster bootstrap of the pooled share or
    per-token mean, in which the items of one prompt move together, as they pass or fail together."""
    rng = random.Random(seed)
    n = len(a)
    w = sizes or [1] * n
    d = [bi - ai for ai, bi in zip(a, b)]
    diffs = []
    for _ in range(rounds):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(d[i] for i in idx) / max(sum(w[i] for i in idx), 1))
    diffs.sort()
    lo = diffs[int((1 - confidence) / 2 * rounds)]
    hi = diffs[int((1 + confidence) / 2 * rounds) - 1]
    return (lo, hi)


def binom_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact: terms summed from log-space (n of thousands stays finite)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = (math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * lp + (n - j) * lq for j in range(k, n + 1))
    return min(1.0, sum(math.exp(t) for t in terms))


def exact_binomial_p(k: int, n: int) -> float:
    """Two-sided exact test of k of n against a fair coin (the exact McNemar test, the sign test): twice the
    smaller tail, at most 1."""
    return min(1.0, 2 * binom_tail(max(k, n - k), n, 0.5)) if n else 1.0


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval of a binomial share k of n: the p at which each exact tail is (1 - confidence) / 2."""
    if n == 0:
        return (0.0, 1.0)
    alpha = (1 - confidence) / 2

    def bisect(too_low) -> float:
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if too_low(mid) else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if k == 0 else bisect(lambda p: binom_tail(k, n, p) < alpha)  # P(X >= k; lower) = alpha
    upper = 1.0 if k == n else bisect(lambda p: 1 - binom_tail(k + 1, n, p) > alpha)  # P(X <= k; upper) = alpha
    return (lower, upper)


def mcnemar_exact(base: list[bool], tuned: list[bool], confidence: float = 0.95) -> dict:
    """Paired binary outcomes (the same prompts, base vs tuned) -> the gain in share, the exact McNemar test and an
    exact interval. Only discordant prompts carry information: with t prompts passed by tuned alone and b by base
    alone, t ~ Binomial(t + b, q) and the gain is (t + b) / n x (2q - 1); the interval is Clopper-Pearson's for q
    mapped onto the gain (conditional on t + b), so it excludes 0 exactly when p < 1 - confidence. A percentile
    bootstrap calls 4 of 4 discordant prompts a gain; this test gives p = 0.125."""
    n = len(base)
    if n == 0:
        return {"gain": None, "gain_ci": None, "verdict": "unscored"}
    t_only = sum(1 for b, t in zip(base, tuned) if t and not b)
    b_only = sum(1 for b, t in zip(base, tuned) if b and not t)
    d = t_only + b_only
    p = exact_binomial_p(t_only, d)
    q_lo, q_hi = clopper_pearson(t_only, d, confidence) if d else (0.5, 0.5)
    lo, hi = d / n * (2 * q_lo - 1), d / n * (2 * q_hi - 1)
    alpha = 1 - confidence
    verdict = "unclear" if p >= alpha else "better" if t_only > b_only else "worse"
    return {"gain": round((t_only - b_only) / n, 4), "gain_ci": [round(lo, 4), round(hi, 4)], "p": round(p, 4),
            "test": "exact McNemar", "discordant": {"tuned_only": t_only, "base_only": b_only}, "verdict": verdict}


# Settings that change how the stage runs, not what it measures: in no key (not the stage's, not its saved passes', not
# the base's cached answers'). Every held-out sample is stored and `samples` only picks how many the report shows.
# `batch_size`: greedy decoding gives a prompt the same answer in any batch, up to floating-point noise. `generate` pads
# on the left with an attention mask, and transformers' generate derives the position ids from that mask (cumsum - 1),
# so a padded row sees the positions and attends to the tokens it would alone; a row that stopped decodes pad tokens
# that are cut off; `row_nll` pads on the right, behind every scored token. What the batch does change is the kernels'
# shapes (rows, padded length), so the order of floating-point sums: in bf16 a near-tie between two tokens can flip and
# the greedy answer goes on differently from there. That is noise of the kind another GPU's kernels give, not a
# measured difference (`decode_check` bounds it; with a batch under DECODE_CHECK_ROWS it re-reads that many rows of
# the same answers), and keying on it would generate minutes of the base's answers again for a setting that only
# trades memory for speed.
NOT_MEASURED = {"samples", "batch_size"}
# Settings that only change the statistics computed from the answers (the level of the intervals and of the tests'
# thresholds): in the stage's key (its record changes), not in its saved passes' (`passes_key`), so a new value
# recomputes the statistics from the answers already generated, with no model loaded. Every other eval setting picks
# the prompts, their caps or the references, so the answers or losses themselves.
STATISTICS_ONLY = {"confidence"}
# The libraries that render the prompts and generate and score the answers and losses: with the machine, in the key of
# every cache of answers (`answers_made_on`), not in the stage's.
ANSWER_LIBRARIES = ("torch", "transformers", "tokenizers", "jinja2", "peft", "bitsandbytes", "accelerate")
# The libraries that score each benchmark: a new checker or metric version can change a score, so it re-scores (in the
# stage's key, not in its saved passes': the answers are scored again, not generated again).
SCORERS = {"ifeval": ("if-verifiable", "nltk", "langdetect", "absl-py", "immutabledict"), "alpaca_eval": ("rouge-score", "nltk", "sacrebleu")}


def cache_key(data: DataRecord, train, model: ModelSection, quant: QuantSection, eval: EvalSection, device: str) -> str:
    # Keyed on the adapter's content, not the train key: training stops by the clock, so one train key can hold
    # adapters of different step counts (and verdicts). Benchmark files are keyed by content (sha256), so a new copy
    # of a benchmark re-runs the stage; the subset sizes and seed are part of eval's dump, and each benchmark's cap is
    # keyed as resolved (a cap eval.benchmark_max_new_tokens leaves unset is the benchmark's own, which can change).
    # The verdict names what the data was deduped against (`make_verdict`): in this key, not in the passes' (answers alike).
    # Every prompt is rendered by the tokenizer: how it renders is keyed (`rendering_key`), beside the rows.
    return fingerprint("eval", EVAL_VERSION, *_answer_inputs(data, train, quant, eval, NOT_MEASURED, device, told=("dedupe",)), scorer_versions(eval.benchmarks),
                       resolve_device(device), *rendering_key(data), *remote_code_key(model))


def passes_key(data: DataRecord, train, quant: QuantSection, eval: EvalSection, device: str, model_code: list | tuple = ()) -> str:
    """The key of stage 5's saved passes (`cache/eval-parts/<key>/`: each model's answers, losses and decode check on the
    held-out rows and on each benchmark): the stage's key less what only scores or summarises the answers
    (STATISTICS_ONLY, the scorer libraries), so a change of those recomputes the record from the passes already made;
    plus the machine, the generating libraries (`answers_made_on`) and the generating code (`answer_code`), as the base's
    cached answers have them. The passes outlive the run that made them, like that cache: a pass made on another GPU,
    under another transformers or by other generating code is generated again there, so the answers one record pairs
    (base and tuned, held-out and benchmarks) all come from one machine, one set of libraries and one version of the code,
    and a library upgrade or a code fix (the usual fixes of a GENERATION BROKEN) is not served the answers made before it.
    The stage's own key stays without them: its record is reused on any machine, as before. `model_code`: the model's
    own code the passes load (`remote_code_key`), as in the stage's key."""
    return fingerprint("eval-passes", PASSES_VERSION, *_answer_inputs(data, train, quant, eval, NOT_MEASURED | STATISTICS_ONLY, device),
                       resolve_device(device), *answers_made_on(device), answer_code(), *rendering_key(data), *model_code)


def answers_made_on(device: str) -> list:
    """The machine (GPU name and memory, one card: stage 5 generates on one whatever else is visible; or CPU model, cores
    and torch) and the library versions that generate and score stage 5's answers and losses: greedy answers follow both
    (another GPU's kernels, a new transformers), so every cache of answers is keyed on them (`base_answers_key`, `passes_key`)."""
    return [hardware_id(resolve_device(device), gpus=1), {dist: _version(dist) for dist in ANSWER_LIBRARIES}]


def answer_code() -> str:
    """A fingerprint of the source of the code that generates and scores stage 5's answers and losses, in the key of
    every cache of answers (`base_answers_key`, `passes_key`): the key cannot otherwise see a fix of that code, and a
    side kept from before it must not be paired with one made after. Looked up at call time (a patched `generate` counts)."""
    import inspect

    return fingerprint([inspect.getsource(f) for f in (generate, decode_check, reference_nll, row_nll, benchmark_conversation)])


def _answer_inputs(data: DataRecord, train, quant: QuantSection, eval: EvalSection, exclude: set[str], device: str,
                   told: tuple[str, ...] = ()) -> list:
    """What stage 5's answers and losses depend on besides the device, in the order the stage's key has always hashed them;
    `told`: the data record's fields the stage writes out besides its rows (`rows_key`)."""
    sources = {n: bench.source_fingerprint(n, eval.benchmark_sources.get(n, "auto")) for n in eval.benchmarks}
    return [rows_key(data, *told), data.model_fingerprint, folder_fingerprint(train.adapter_dir), keyed_quant(quant, resolve_device(device)),
            _keyed_eval(eval, exclude), sources, benchmark_caps(eval)]


def _keyed_eval(eval: EvalSection, exclude: set[str]) -> dict:
    """The eval section (less `exclude`) as the keys hold it: the benchmarks in tasks/benchmarks.py's order (each is
    loaded, subset and scored on its own: the order means nothing), and of the per-benchmark settings only those that
    differ from the default, for a benchmark that is run (`auto` source, the benchmark's own cap, a benchmark not in
    eval.benchmarks: the same run)."""
    out = eval.model_dump(mode="json", exclude=exclude)
    order = list(bench.BENCHMARKS)
    run = sorted(set(eval.benchmarks), key=lambda n: (order.index(n) if n in order else len(order), n))
    out["benchmarks"] = run
    out["benchmark_sources"] = {n: _keyed_benchmark_source(s) for n, s in eval.benchmark_sources.items() if n in run and s != "auto"}
    out["benchmark_prompts"] = {n: k for n, k in eval.benchmark_prompts.items() if n in run}
    out["benchmark_max_new_tokens"] = {n: k for n, k in eval.benchmark_max_new_tokens.items()
                                       if n in run and not (n in bench.BENCHMARKS and k == bench.BENCHMARKS[n].max_new_tokens)}
    return out


def _keyed_benchmark_source(source: str) -> str:
    """A benchmark source as the keys hold it: a local file by its suffix only, its content being in the key already
    (`bench.source_fingerprint`: the same file spelled otherwise, or a moved checkout, re-evaluated); others as written."""
    if source in ("packaged", "hub") or source.startswith("hub:"):
        return source
    return f"local {Path(source).suffix.lower()}"


def benchmark_caps(eval: EvalSection) -> dict[str, int]:
    """Each benchmark's generation cap: eval.benchmark_max_new_tokens, else the benchmark's own (tasks/benchmarks.py)."""
    return {n: eval.benchmark_max_new_tokens.get(n, bench.BENCHMARKS[n].max_new_tokens) for n in eval.benchmarks}


def scorer_versions(benchmarks: list[str]) -> dict[str, str]:
    """Versions of the checker/metric libraries the benchmarks use, and the NLTK data the IFEval checkers read."""
    out = {dist: installed_version(dist) or "absent" for dist in sorted({d for b in benchmarks for d in SCORERS.get(b, ())})}
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


def evaluate_heldout(data: DataRecord, train, model: ModelSection, quant: QuantSection, eval: EvalSection, device: str, artifacts_dir: str, log_fn=None,
                     system_prompt: str | None = None) -> EvalRecord:
    """Stage 5: base vs tuned on the held-out split and the benchmarks. `system_prompt` = data.system_prompt: the
    held-out rows carry it already (the data stage prepended it); the benchmarks are prompted with it, as the
    published model is. It is in the data's rows key (`rows_fingerprint`), so in this stage's key."""
    key = cache_key(data, train, model, quant, eval, device)
    out = stage_dir(artifacts_dir, "eval", key)
    with locked(out, log_fn=log_fn):
        if is_complete(out):
            return complete_record(out, EvalRecord)
        return _evaluate(data, train, model, quant, eval, resolve_device(device), key, out, artifacts_dir, log_fn or (lambda m: None), system_prompt)


def _evaluate(data, train, model_cfg, quant, eval, device, key, out, artifacts_dir, log_fn, system_prompt=None) -> EvalRecord:
    import torch

    maybe_fault("evaluate")
    t0 = time.monotonic()
    # Read every benchmark before loading the model: an unreadable source fails here, in seconds.
    suites = load_suites(eval, artifacts_dir)
    ref = resolve_model(model_cfg, artifacts_dir)
    tok = load_tokenizer(ref, model_cfg)
    load_model = _model_loader(ref, model_cfg, quant, device, train.adapter_dir)

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

    base_caches = {name: base_answers_dir(artifacts_dir, data, model_cfg, quant, eval, suite, device, system_prompt, tok, log_fn)
                   for name, suite in suites.items()}
    # Each pass's answers as it ends, under the key of what makes them (`passes_key`: the machine, libraries and code
    # included): a run stopped partway (a crash, a killed job, a lost machine) redoes only the passes it had not
    # finished, and a run at another eval.confidence (or scorer version) generates none. Kept once the stage's record is
    # written, marked complete when every pass is in (a pass whose decode check failed is not saved).
    parts = stage_dir(artifacts_dir, "eval-parts", passes_key(data, train, quant, eval, device, remote_code_key(model_cfg)))
    plan = plan_generation(n, eval.max_new_tokens, suites, base_caches, parts, heldout_losses=len(loss_rows))
    if plan:
        load_model()  # before the bar draws: the weights' own loading bar stays off it
    # The passes that move the bar; it closes on the way out, an exception's too, so an error starts a line of its own.
    with EvalBar(plan) as bar:
        results = {}
        for name in ("base", "tuned"):
            saved = _read_part(parts / f"held-out-{name}.json", f"held-out {name}", n, len(loss_rows), log_fn)
            if saved is not None:
                nll, gens, check = [tuple(x) for x in saved["nll"]], saved["gens"], saved["check"]
                log_fn(f"evaluate: held-out {name}: answers and losses reused from this stage's saved pass ({parts})")
                bar.skip(f"held-out {name}")
            else:
                model = load_model()
                ctx = model.disable_adapter() if name == "base" else _nullcontext()
                with ctx, torch.inference_mode():
                    bar.describe(f"held-out {name} loss")
                    nll = row_nll(model, held.select(loss_rows), tok.pad_token_id, eval.batch_size, device)
                    check = {}
                    gens = generate(model, tok, [m["messages"] for m in meta[:n]], data.stop_token_ids, eval.max_new_tokens, eval.batch_size, device,
                                    check, bar.part(f"held-out {name}", n * eval.max_new_tokens))
                if _decode_broken(check):  # not the model's answers: not kept for a later run
                    log_fn(f"evaluate: held-out {name}: not saved for a later run (its decode check failed: GENERATION BROKEN)")
                else:
                    save_part(parts / f"held-out-{name}.json", {"gens": gens, "check": check, "nll": nll})
            loss = mean_nll(nll[:n])
            by_source = {src: round(mean_nll([nll[j] for j in rows]), 4) for src, rows in groups.items()} if len(groups) > 1 else {}
            results[name] = {"loss": loss, "gens": gens, "loss_by_source": by_source, "decode_check": check}
            log_fn(f"evaluate: {name} held-out loss {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f}), "
                   f"{sum(g['stopped'] for g in gens)}/{n} generations stopped by EOS")
        bench_results = {}
        for name, suite in suites.items():
            bench_results[name] = run_benchmark(load_model, tok, suite, data.stop_token_ids, eval, device, log_fn, system_prompt,
                                                base_cache=base_caches[name], bar=bar, parts=parts)
    if not load_model.cache_info().currsize:
        log_fn(f"evaluate: every pass read back ({parts}): statistics computed at confidence {eval.confidence} without loading the model")

    has_checkers = data.has_checkers and all("check" in m for m in meta[:n])
    summary = {}
    ok = {}
    for name, r in results.items():
        gens = r["gens"]
        s = {"loss": round(r["loss"], 4), "perplexity": round(math.exp(min(r["loss"], 50)), 3),
             "eos_share": round(sum(g["stopped"] for g in gens) / n, 4), "limit_share": round(sum(not g["stopped"] for g in gens) / n, 4),
             "loop_share": bench.loop_share([g["text"] for g in gens], [g["stopped"] for g in gens])}
        if r["loss_by_source"]:
            s["loss_by_source"] = r["loss_by_source"]  # held-out loss of each data source (data.source + data.mix)
        s["decode_check"] = r["decode_check"]
        if has_checkers:
            ok[name] = [instructions.check_answer(m["family"], m["check"], g["text"]) for m, g in zip(meta[:n], gens)]
            k = sum(ok[name])
            lo, hi = wilson(k, n, eval.confidence)
            s.update(accuracy=round(k / n, 4), correct=k, n=n, ci=[round(lo, 4), round(hi, 4)])
        summary[name] = s

    per_family = []
    gain = gain_ci = beats = None
    accuracy_test: dict = {}
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
        accuracy_test = mcnemar_exact(ok["base"], ok["tuned"], eval.confidence)  # binary and paired: the exact test
        gain, gain_ci = accuracy_test["gain"], accuracy_test["gain_ci"]
        beats = summary["tuned"]["ci"][0] > summary["base"]["ci"][1]

    verdict = make_verdict(summary, accuracy_test, bench_results, eval.confidence, data.dedupe)  # logged once by the task wrapper

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

    with building(out, record_files=True) as tmp:  # eval.json or the chart changed since is refused (`changed_file`)
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
            accuracy_test=accuracy_test,
            seconds=round(time.monotonic() - t0, 2),
            benchmarks={k: v["summary"] for k, v in bench_results.items()},
            verdict=verdict,
        )
        write_json(tmp / "eval.json", {**rec.model_dump(mode="json"), "samples": samples,
                                       "generations": {k: [g["text"] for g in v["gens"]] for k, v in results.items()},
                                       "benchmark_rows": {k: v["rows"] for k, v in bench_results.items()}})
        write_json(tmp / "record.json", rec.model_dump(mode="json"))
    names = ["held-out-base", "held-out-tuned"] + [f"{b}-{who}" for b in suites for who in ("base", "tuned")]
    # Every pass of this evaluation saved (none broken), and not marked yet (`save_part` removes the mark of a folder it
    # saves a pass in): each pass's size and sha256 as it was saved (PARTS), as stages 1-6 list their files. A pass whose
    # bytes changed since is not marked: the run that next reads it generates it again (`_read_side`).
    if not (parts / COMPLETE).is_file() and all((parts / f"{part}.json").is_file() for part in names):
        why = mark_parts_complete(parts, [f"{part}.json" for part in names])
        if why:
            # Not "generates it again": a run saving that pass now (written, not listed yet) lists it as its save ends.
            log_fn(f"evaluate: the saved passes in {parts} are not marked complete ({why}); the next run reads that pass back if "
                   "it is then as PARTS lists it (a run saving it now lists it as it ends), else generates it again")
    return rec


def _model_loader(ref, model_cfg: ModelSection, quant: QuantSection, device: str, adapter_dir: str) -> Callable[[], object]:
    """Base + adapter (a PeftModel in eval mode), loaded on the first call, for the first pass that is generated: a run
    that finds every pass saved (another eval.confidence) loads no model."""
    @functools.cache
    def load():
        from peft import PeftModel

        with quiet_transformers():
            return PeftModel.from_pretrained(load_base_model(ref, model_cfg, quant, device), adapter_dir).eval()

    return load


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


LOGITS_BYTES = 1 << 30  # fp32 logits one scoring forward may hold: 1 GiB
DECODE_CHECK_ROWS = 4  # rows of each generation pass whose answers decode_check re-reads with one plain forward
DECODE_WARN = 0.9  # below this share of greedy tokens that the plain forward also picks: GENERATION BROKEN
DECODE_MIN_TOKENS = 20  # fewer re-read tokens judge nothing (one bf16 near-tie in four one-token answers reads 75%)


def row_nll(model, ds, pad_id: int, batch_size: int, device: str, max_tokens: int = 8192) -> list[tuple[float, int]]:
    """(summed NLL, assistant-token count) of every row, in the dataset's order; batches sorted by length, so
    little of each forward is padding, and at most `max_tokens` padded tokens per forward — fewer for a large
    vocabulary, so that a forward's fp32 logits stay within LOGITS_BYTES (8,192 x Gemma's 262k is 8 GiB, and the
    cross-entropy's copies tripled it: Gemma-3-270M's AlpacaEval scoring was killed for memory on a 24 GiB CPU box);
    a single row longer than that gets a forward of its own. The cross-entropy runs on the answer positions only."""
    import torch

    from .train import PaddedCollator

    vocab = model.config.get_text_config().vocab_size
    max_tokens = min(max_tokens, LOGITS_BYTES // (4 * vocab))  # a row longer than that still gets a forward of its own
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
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        scored = labels != -100
        nll = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        nll[scored] = torch.nn.functional.cross_entropy(logits[:, :-1][scored].float(), labels[scored], reduction="none")
        del logits
        for r, i in enumerate(ids):
            out[i] = (float(nll[r].sum()), int(scored[r].sum()))
    return out


def mean_nll(rows: list[tuple[float, int]]) -> float:
    """Mean NLL per token over rows of (summed NLL, token count)."""
    return sum(s for s, _ in rows) / max(sum(c for _, c in rows), 1)


def _asked(rows: list[dict]) -> str:
    """The prompts (and references) a saved pass answered: the stage's key holds a hub source by its id alone, so an
    updated hub copy gives other prompts under the same key; a pass saved for the old ones is not read back."""
    return fingerprint([[r["id"], r["prompt"], r.get("reference")] for r in rows])


def plan_generation(n_heldout: int, heldout_cap: int, suites: dict[str, dict], base_caches: dict[str, Path],
                    done: Path | None = None, heldout_losses: int | None = None) -> dict[str, int]:
    """Stage 5's generation work, known before any of it runs: part ("held-out base", "ifeval tuned", ...) -> its
    answers x their token cap. A pass an earlier run of the stage saved in `done` (its parts folder, `passes_key`) and
    a benchmark's base side already cached (`base_answers_key`) generate nothing: left out, when the stage will read
    them back (`_read_side`, the test the reading uses: `heldout_losses` = the held-out pass's loss rows), so a model
    loaded for a pass the plan left out never loads under the bar."""
    def usable(path: Path, n: int, n_nll: int | None, asked: str | None = None, listed: bool = False) -> bool:
        return isinstance(_read_side(path, n, n_nll, asked, listed), dict)

    def saved(part: str, n: int, n_nll: int | None, asked: str | None = None) -> bool:
        return done is not None and usable(done / f"{part.replace(' ', '-')}.json", n, n_nll, asked, listed=True)

    parts = {f"held-out {who}": n_heldout * heldout_cap for who in ("base", "tuned") if not saved(f"held-out {who}", n_heldout, heldout_losses)}
    for name, suite in suites.items():
        rows = suite["rows"]
        n_nll = len(rows) if name == "alpaca_eval" else None
        for who in ("base", "tuned"):
            cached = who == "base" and is_complete(base_caches[name]) and usable(base_caches[name] / "base.json", len(rows), n_nll)
            if not cached and not saved(f"{name} {who}", len(rows), n_nll, _asked(rows)):
                parts[f"{name} {who}"] = len(rows) * suite["subset"]["max_new_tokens"]
    return parts


class EvalBar:
    """Stage 5's one progress bar (stderr, main process only, as stage 4's `BudgetBar`), over `plan_generation`'s parts.
    Its unit is an answer's token cap, not the answer: a batch decodes until its longest answer stops, most often at the
    cap, so its time follows the cap (pipeline.yaml's demo: "cost is batches x cap"), and an IFEval answer at 1280 tokens
    weighs 20 held-out answers at 64: counted in answers, the quick held-out part would make the ETA far too short.
    The loss passes (held-out rows, AlpacaEval's references) are named on the bar but not counted: their speed against
    decoding differs by device (a few times faster per token on a CPU, far more on a GPU), so no one weight fits."""

    def __init__(self, parts: dict[str, int]):
        from .engine.dist import is_main

        self.planned = dict(parts)
        self.bar = progress_bar(total=sum(parts.values()), desc="evaluate", disable=not is_main(),
                                bar_format="{l_bar}{bar}| {n:,}/{total:,} tokens of the caps [{elapsed}<{remaining}{postfix}]")

    def part(self, name: str, size: int) -> Callable[[int], object]:
        """Part `name` starts: the bar names it; one the plan left out (a cached base side that could not be read back)
        adds its size to the total. Returns the per-batch update for `generate`."""
        if self.planned.pop(name, None) is None:
            self.bar.total += size
        self.bar.set_description_str(f"evaluate: {name}")
        return self.bar.update

    def describe(self, what: str) -> None:
        """Name work that the bar does not count (a loss pass), so a bar standing still says what runs."""
        self.bar.set_description_str(f"evaluate: {what}")

    def skip(self, name: str) -> None:
        """Part `name` generates nothing (the base's answers reused): out of the total if the plan counted it."""
        self.bar.total -= self.planned.pop(name, 0)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "EvalBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # an exception too: the bar's line ends before the error is printed


def generate(model, tok, conversations: list[list[dict]], stop_ids: list[int], max_new_tokens: int, batch_size: int, device: str,
             check: dict | None = None, progress: Callable[[int], object] | None = None) -> list[dict]:
    """Greedy answers to each conversation's last user turn, in the input order; `stopped` = ended by an
    end-of-turn token. Batched by prompt length (less left padding: benchmark prompts range from 10 to 500+
    tokens). `check`, when given, receives `decode_check`'s counts for the first batch; `progress`, when given, is
    called after each batch with its answers' token caps (answers x max_new_tokens: `EvalBar`'s unit)."""
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
            # Greedy, whatever the model's generation_config.json asks (Qwen2.5-Instruct ships a repetition penalty):
            # transformers fills every argument left None from it, so the processors that change a greedy pick are
            # set neutral here, for base and tuned alike.
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                 pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None,
                                 repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0)
            new = gen[:, enc["input_ids"].shape[1]:]
            answers = []
            for i, row in zip(ids, new.tolist()):
                stop_at = next((j for j, t in enumerate(row) if t in stop_ids), None)
                kept = row[:stop_at] if stop_at is not None else row
                answers.append(row[:stop_at + 1] if stop_at is not None else row)
                out[i] = {"text": tok.decode(kept, skip_special_tokens=True).strip(), "stopped": stop_at is not None}
            if check is not None and start == 0:
                prompt_ids = [r[m.bool()].tolist() for r, m in zip(enc["input_ids"], enc["attention_mask"])]
                check.update(decode_check(model, prompt_ids, answers, device))
            if progress is not None:
                progress(len(ids) * max_new_tokens)
    finally:
        tok.padding_side = old_side
    return out


def decode_check(model, prompts: list[list[int]], answers: list[list[int]], device: str, rows: int = DECODE_CHECK_ROWS) -> dict:
    """Do greedy answers follow from the model? For a few rows, one forward over prompt + answer (no cache, no padding):
    its argmax at each answer position should be the token generation chose. A cached, batched decode that the model's
    own forward disagrees with (Liger's RoPE leaking into stage 5 scored garbage answers on the GPU) shows here as a low
    share; bf16 near-ties flip a token now and then. Returns {"tokens", "agree"}."""
    import torch

    from .engine.fastpath import accepts_logits_to_keep

    keep = accepts_logits_to_keep(model)
    tokens = agree = 0
    for prompt, answer in list(zip(prompts, answers))[:rows]:
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(input_ids=ids, **({"logits_to_keep": len(answer) + 1} if keep else {})).logits
        pred = logits[0, -(len(answer) + 1):-1].argmax(-1).tolist()
        tokens += len(answer)
        agree += sum(p == a for p, a in zip(pred, answer))
    return {"tokens": tokens, "agree": agree}


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
        t = rec.accuracy_test
        test = (f"exact McNemar p = {t['p']:.3f}: {t['discordant']['tuned_only']} prompts passed by tuned only, "
                f"{t['discordant']['base_only']} by base only; " if t.get("discordant") else "")
        lines += ["", f"Gain {rec.accuracy_gain:+.1%} (exact CI [{rec.gain_ci[0]:+.1%}, {rec.gain_ci[1]:+.1%}]; {test}"
                  f"tuned beats base beyond both intervals: **{rec.beats_base}**."]
    if samples:
        lines += ["", "### Samples", "", "| prompt | expected | base | tuned |", "|---|---|---|---|"]
        for s in samples:
            cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")[:200]  # noqa: E731
            lines.append(f"| {cell(s['prompt'])} | {cell(s['expected'])} | {cell(s['base'])} | {cell(s['tuned'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Standard benchmarks (eval.benchmarks): same prompts and greedy decoding for base and tuned


def load_suites(eval: EvalSection, artifacts_dir: str) -> dict[str, dict]:
    """name -> {rows (the seeded subset), provenance, subset settings}; raises BenchmarkError (one line)."""
    suites = {}
    for name in eval.benchmarks:
        rows, prov = bench.load_benchmark(name, eval.benchmark_sources.get(name, "auto"), artifacts_dir)
        idx = bench.subset_indices(len(rows), eval.benchmark_prompts.get(name), eval.benchmark_seed)
        suites[name] = {"name": name, "rows": [rows[i] for i in idx], "provenance": prov,
                        "subset": {"n": len(idx), "n_full": len(rows), "seed": eval.benchmark_seed,
                                   "max_new_tokens": benchmark_caps(eval)[name]}}
    return suites


def benchmark_conversation(prompt: str, system_prompt: str | None) -> list[dict]:
    """A benchmark prompt as the published model will be prompted, base and tuned alike: the training system turn
    (data.system_prompt, which the published chat template adds to any chat without one) before the user turn.
    Without it the tokenizer's own default system prompt (SmolLM2's, Qwen's) would apply, which the tuned model
    never saw in training and will never see when served."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": prompt}]


def reference_nll(model, tok, prompts: list[str], references: list[str], max_tokens: int, batch_size: int, device: str,
                  system_prompt: str | None = None) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each reference answer given its prompt (chat template, generation prompt),
    the reference cut to `max_tokens`. A model that collapsed to terse replies scores worse here."""
    feats = []
    for p, r in zip(prompts, references):
        ctx = tok(tok.apply_chat_template(benchmark_conversation(p, system_prompt), tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        ans = tok(r, add_special_tokens=False)["input_ids"][:max_tokens]
        feats.append({"input_ids": ctx + ans, "labels": [-100] * len(ctx) + ans})
    return row_nll(model, feats, tok.pad_token_id, batch_size, device)


def _cluster_sums(values: list, clusters: list[int]) -> tuple[list[float], list[int]]:
    """Per cluster (prompt), in first-seen order: the sum of its values and how many it has."""
    sums: dict[int, float] = {}
    sizes: dict[int, int] = {}
    for v, c in zip(values, clusters):
        sums[c] = sums.get(c, 0) + v
        sizes[c] = sizes.get(c, 0) + 1
    return list(sums.values()), list(sizes.values())


def _binary(k_list: list[bool], confidence: float, clusters: list[int] | None = None) -> dict:
    """Share passed with its Wilson interval; with `clusters` (the prompt of each instruction) the interval is
    cluster_wilson's, since the instructions of one answer pass or fail together."""
    k, n = sum(k_list), len(k_list)
    lo, hi = wilson(k, n, confidence) if clusters is None else cluster_wilson(*_cluster_sums(k_list, clusters), confidence)
    return {"value": round(k / n, 4) if n else None, "k": k, "n": n, "ci": [round(lo, 4), round(hi, 4)]}


def _paired(base: list[float], tuned: list[float], confidence: float, higher_is_better: bool = True, sizes: list[int] | None = None,
            sign_test: bool = True) -> dict:
    """Tuned-minus-base gain of sum / sum(sizes) (the mean when `sizes` is None) with a paired bootstrap interval
    over prompts; `better`/`worse` only beyond the interval and, with `sign_test`, where `sign_flip_p` is below
    1 - confidence too. The gain is the difference of the two values shown."""
    if not base or (sizes is not None and not sum(sizes)):  # no prompts, or references of no tokens at all
        return {"gain": None, "gain_ci": None, "verdict": "unscored"}
    gain = (sum(tuned) - sum(base)) / (sum(sizes) if sizes else len(base))
    lo, hi = paired_bootstrap(base, tuned, confidence, sizes=sizes)
    good, bad = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
    r = {"gain": round(gain, 4), "gain_ci": [round(lo, 4), round(hi, 4)], "verdict": "better" if good else "worse" if bad else "unclear"}
    # A percentile bootstrap of a few prompts that all moved the same way has an interval off 0 at any n (1 prompt:
    # [gain, gain]): better/worse also needs the paired sign-flip test below 1 - confidence (4 of 4 prompts: p = 0.125).
    if sign_test and r["verdict"] != "unclear":
        p = sign_flip_p([t - b for b, t in zip(base, tuned)])
        r.update(p=round(p, 4), test="paired bootstrap + sign-flip test over prompts")
        if p >= 1 - confidence:
            r["verdict"] = "unclear"
    return r


def sign_flip_p(d: list[float], rounds: int = 4096, seed: int = 0) -> float:
    """Two-sided p of the paired randomization test: under no change, base and tuned are exchangeable on each prompt,
    so each difference's sign is a coin flip; p = share of sign assignments whose |sum| reaches the observed one.
    Exact (every assignment) up to 12 prompts, else `rounds` seeded draws, counted with the observed one."""
    obs = abs(sum(d)) * (1 - 1e-9)
    if len(d) <= 12:
        sums = [0.0]
        for x in d:
            sums = [s + x for s in sums] + [s - x for s in sums]
        return sum(abs(s) >= obs for s in sums) / len(sums)
    rng = random.Random(seed)
    hits = sum(abs(sum(x if rng.random() < 0.5 else -x for x in d)) >= obs for _ in range(rounds))
    return (hits + 1) / (rounds + 1)


def _paired_clustered(base: list[bool], tuned: list[bool], clusters: list[int], confidence: float) -> dict:
    """Instruction level: the pooled share's gain with a bootstrap that resamples prompts (their instructions
    fail together: resampling instructions gave 8% false calls at a nominal 5% in a 48-prompt null simulation).
    `better`/`worse` also needs the exact sign test over the prompts whose passed count changed below
    1 - confidence, as the percentile bootstrap is too eager when few prompts changed (see mcnemar_exact)."""
    if not base:
        return {"gain": None, "gain_ci": None, "verdict": "unscored"}
    b_sums, sizes = _cluster_sums([float(x) for x in base], clusters)
    t_sums, _ = _cluster_sums([float(x) for x in tuned], clusters)
    r = _paired(b_sums, t_sums, confidence, sizes=sizes, sign_test=False)  # its own exact sign test, below
    up = sum(t > b for b, t in zip(b_sums, t_sums))
    down = sum(t < b for b, t in zip(b_sums, t_sums))
    p = exact_binomial_p(up, up + down)
    if r["verdict"] != "unclear" and (p >= 1 - confidence or (up > down) != (r["verdict"] == "better")):
        r["verdict"] = "unclear"
    return {**r, "p": round(p, 4), "test": "prompt-cluster bootstrap + exact sign test over prompts",
            "discordant": {"tuned_more": up, "base_more": down}, "prompts": len(sizes)}


LENGTH_SENSITIVE = ("rouge_l_uncut", "chrf_uncut")  # reported, never judged: they mostly measure answer length


def base_answers_key(data: DataRecord, model_cfg: ModelSection, quant: QuantSection, eval: EvalSection, suite: dict, device: str,
                     system_prompt: str | None, tok, *, batch_size: int | None = None) -> str:
    """What the base model's side of one benchmark depends on: the base weights and how they are loaded, the token ids
    generation and scoring are fed (each prompt rendered and tokenized as `generate` does, AlpacaEval's references as
    `reference_nll` does, pad and stop ids: whatever tokenizer or template code made them), greedy decoding's cap, the
    code that generates and scores (`answer_code`), the machine and the libraries. Not the adapter, not the data: a
    retrained adapter on the same base (a scheduled run, a sweep) reuses the base's answers instead of generating them
    again. Not the batch size (NOT_MEASURED says why); `batch_size` given = the key as it was made while eval.batch_size was in it
    (`base_answers_dir` reads a cache made then)."""
    prompts = [tok.apply_chat_template(benchmark_conversation(r["prompt"], system_prompt), tokenize=False, add_generation_prompt=True)
               for r in suite["rows"]]
    fed = {"prompts": tok(prompts, add_special_tokens=False)["input_ids"], "pad": tok.pad_token_id, "stop": data.stop_token_ids}
    if suite["name"] == "alpaca_eval":
        fed["references"] = [tok(r["reference"], add_special_tokens=False)["input_ids"][:eval.reference_max_tokens] for r in suite["rows"]]
    before = [] if batch_size is None else [batch_size]
    return fingerprint("eval-base", BASE_ANSWERS_VERSION, suite["name"], data.model_fingerprint, keyed_model(model_cfg),
                       keyed_quant(quant, resolve_device(device)), suite["provenance"], suite["subset"], fingerprint(fed), answer_code(),
                       *before, *answers_made_on(device))


def base_answers_dir(artifacts_dir: str, data: DataRecord, model_cfg: ModelSection, quant: QuantSection, eval: EvalSection, suite: dict,
                     device: str, system_prompt: str | None, tok, log_fn: Callable[[str], object] = lambda m: None) -> Path:
    """The folder of the base's cached side of one benchmark (`base_answers_key`). A side cached while eval.batch_size was
    in that key, under this run's batch size, is copied in once (the old folder stays, for an older checkout): leaving
    the batch size out of the key costs nobody the base's answers already made. One that cannot be used (base.json
    missing or unreadable beside its COMPLETE, not of these prompts) is not copied, in one line; the side is then made
    as if none were cached. Drop the copy at the next BASE_ANSWERS_VERSION: no cache of that version holds a batch size."""
    folder = stage_dir(artifacts_dir, "eval-base", base_answers_key(data, model_cfg, quant, eval, suite, device, system_prompt, tok))
    if is_complete(folder):
        return folder
    before = stage_dir(artifacts_dir, "eval-base", base_answers_key(data, model_cfg, quant, eval, suite, device, system_prompt, tok,
                                                                    batch_size=eval.batch_size))
    if is_complete(before):
        n = len(suite["rows"])
        why = _read_side(before / "base.json", n, n if suite["name"] == "alpaca_eval" else None)
        with locked(folder):
            if isinstance(why, dict) and not is_complete(folder):
                try:
                    with building(folder, record_files=True) as tmp:
                        shutil.copy2(before / "base.json", tmp / "base.json")
                except OSError as e:  # read above: gone or unreadable since, or no room for the copy
                    if disk_full(e):  # the old cache is whole; generating the answers would not fit either
                        raise StageError(f"disk full while copying the base's cached answers from {before} to {folder} (the partial "
                                         "copy was removed); free some space and rerun the same command: every finished stage is "
                                         "cached") from e
                    why = f"unreadable: {e}"
        if isinstance(why, str):
            log_fn(f"evaluate: {suite['name']}: the base's answers cached while eval.batch_size was in their key ({before}) are not "
                   f"copied ({why}); the base's side is generated as if none were cached (or read from this stage's saved pass, "
                   "where one holds it)")
    return folder


def _read_side(path: Path, n: int, n_nll: int | None, asked: str | None = None, listed: bool = False) -> dict | str:
    """One model's saved side of a pass ({"gens", "check", "nll"}), or why it cannot be used, in words: unreadable, or
    not of these n answers (and n_nll losses, where the pass has them), or, with `asked`, not the answers to those
    prompts, or answers whose decode check failed (not the model's: this code saves none, a pass saved by older code
    may hold some), or other bytes than its folder's list says it was saved with (COMPLETE, or PARTS while a parts
    folder is partial: `listed_change`), or, with `listed` (a saved pass, `save_part`), named by neither list."""
    try:
        saved = read_json(path)
        gens, nll = saved["gens"], saved["nll"] if n_nll is not None else None
        if len(gens) != n:
            return f"{len(gens)} answers where this pass has {n} prompts"
        if n_nll is not None and len(nll or []) != n_nll:
            return f"{len(nll or [])} losses where this pass has {n_nll} rows"
        if not (isinstance(saved["check"], dict) and all("text" in g and "stopped" in g for g in gens)
                and (n_nll is None or all(len(x) == 2 for x in nll))):
            return "answers, losses or decode check not in the saved form"
        if asked is not None and saved.get("asked") != asked:
            return "answers to other prompts: the benchmark's prompts or references changed since it was saved"
        if _decode_broken(saved["check"]):
            return (f"its decode check failed, {saved['check']['agree']} of {saved['check']['tokens']} greedy tokens agreeing "
                    "(GENERATION BROKEN): not the model's answers")
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"
    except (KeyError, TypeError) as e:
        return f"not in the saved form: {type(e).__name__} {e}"
    # Read whole and in shape, but not as saved (other answers, the same count: an edit by hand) was reused as the model's.
    changed = listed_change(path.parent, path.name) or listed_change(path.parent, path.name, PARTS)
    if changed:
        return changed.removeprefix("its ")
    # A pass no list names was read unchecked: nothing vouches for its bytes (an edit by hand reads as the model's answers).
    # It is absent: generated again and listed as it is saved. Adopting it (listing its bytes as they are now) would bless
    # whatever is there, which is what the lists are for telling apart; generating costs one pass, once.
    if listed and not is_listed(path.parent, path.name, (PARTS, COMPLETE)):
        return (f"listed in neither {PARTS} nor {COMPLETE}: saved by a version before passes were listed, or its entry lost, "
                "so its bytes cannot be checked")
    return saved


def save_part(part: Path, side: dict) -> None:
    """Save one pass in the stage's parts folder (`passes_key`) and list it with its size and sha256 (`list_parts`, which
    removes the folder's COMPLETE: it is not complete again until every pass of the evaluation is in). Until it is listed,
    a COMPLETE or PARTS left lists the pass's old bytes: a run stopped in between generates it again."""
    write_json(part, side)
    list_parts(part.parent, part.name)


def _read_part(path: Path, what: str, n: int, n_nll: int | None, log_fn, asked: str | None = None,
               then: str = "generating it again") -> dict | None:
    """A pass saved by an earlier run of this stage (`passes_key`), or None: none saved, or one that cannot be used,
    which is said in one line ending in what is done instead (`then`)."""
    if not path.is_file():
        return None
    saved = _read_side(path, n, n_nll, asked, listed=True)
    if isinstance(saved, dict):
        return saved
    log_fn(f"evaluate: {what}: the saved pass {path} is not used ({saved}); {then}")
    return None


def _read_base_side(base_cache: Path, n: int, with_nll: bool, log_fn) -> dict | None:
    """The cached base side, or None (regenerate) when it is missing, unreadable or not of these n prompts."""
    saved = _read_side(base_cache / "base.json", n, n if with_nll else None)
    if not isinstance(saved, dict):
        log_fn(f"evaluate: {base_cache} holds no usable base answers ({saved}); generating them again")
        return None
    return saved


def _keep_base_side(base_cache: Path, side: dict, name: str, **made) -> None:
    """Cache the base's side of benchmark `name` ({"gens", "check", "nll"}) under `base_answers_key`, replacing what is
    there (unusable, or written meanwhile by a run with the same key: the same answers). Never a broken decode. The
    folder is replaced by `building`'s two renames, never deleted first: a run reading a usable cache meanwhile (reads
    take no lock) finds the old folder or the new one, not none."""
    with locked(base_cache):
        with building(base_cache, record_files=True) as tmp:  # base.json's size and sha256, checked as it is read (`_read_side`)
            write_json(tmp / "base.json", {"gens": side["gens"], "check": side["check"], "nll": side.get("nll"),
                                           "made": {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "benchmark": name, **made}})


def _recache_base_side(base_cache: Path | None, side: dict, part: Path, name: str, n_nll: int | None, log_fn) -> None:
    """The base's side read from a saved pass, cached again under `base_answers_key` where that cache is missing or
    unusable and the pass was made under the same key (`base_key`: the same base, token ids, code, machine and libraries),
    so the next adapter on this base reads it there and no run repeats the cache's fault."""
    if base_cache is None or side.get("base_key") != base_cache.name:
        return
    why = _read_side(base_cache / "base.json", len(side["gens"]), n_nll) if is_complete(base_cache) else "none cached"
    if isinstance(why, dict):
        return
    _keep_base_side(base_cache, side, name, copied_from=str(part))
    log_fn(f"evaluate: {name}: the base model's answers cached again in {base_cache} from this stage's saved pass ({why})")


def run_benchmark(load_model: Callable[[], object], tok, suite: dict, stop_ids: list[int], eval: EvalSection, device: str, log_fn,
                  system_prompt: str | None = None, base_cache: Path | None = None, bar: EvalBar | None = None, parts: Path | None = None) -> dict:
    """Base then tuned on one benchmark, prompted as the published model is (`benchmark_conversation`); returns
    {"summary": small JSON for the record, "rows": per-prompt detail}. `load_model()` gives base + adapter (a PeftModel:
    the base is it with the adapter disabled); it is called only for a side that is generated. `parts` (the stage's
    folder of finished passes, `passes_key`): each side is saved there as it ends, the base's too when it came from its
    cache, and read back first by a later run of the stage (an interrupted one, one at another eval.confidence), so a
    finished side is not generated again and a statistics-only rerun needs nothing else. `base_cache` (keyed by
    `base_answers_key`) holds the base's answers, reference losses and decode check once computed; a later run reads
    them back when its passes hold no base side. A side whose decode check failed is kept in neither. `bar`: stage 5's
    progress bar, advanced batch by batch."""
    import torch

    name, rows = suite["name"], suite["rows"]
    prompts = [r["prompt"] for r in rows]
    cap = suite["subset"]["max_new_tokens"]
    n_nll = len(rows) if name == "alpaca_eval" else None  # AlpacaEval's sides carry the reference losses
    t0 = time.monotonic()
    gens, nll, checks = {}, {}, {"base": {}, "tuned": {}}
    reused = None
    asked = _asked(rows)
    for who in ("base", "tuned"):
        part = parts / f"{name}-{who}.json" if parts is not None else None
        cached = who == "base" and base_cache is not None and is_complete(base_cache)
        # What an unusable saved pass gives way to: the base's cache only where it can be read (as plan_generation found).
        usable_cache = cached and isinstance(_read_side(base_cache / "base.json", len(rows), n_nll), dict)
        then = f"reading the base's cached answers ({base_cache})" if usable_cache else "generating it again"
        # The stage's saved pass first: it was made with the record's other passes, on one machine and set of libraries.
        side = _read_part(part, f"{name} {who}", len(rows), n_nll, log_fn, asked, then) if part is not None else None
        origin = "pass" if side is not None else None
        if side is not None:
            log_fn(f"evaluate: {name}: the {who} model's answers reused from this stage's saved pass ({parts})")
            if who == "base":
                reused = side.get("reused")  # where the pass's base side came from
                _recache_base_side(base_cache, side, part, name, n_nll, log_fn)
        elif cached and (side := _read_base_side(base_cache, len(rows), name == "alpaca_eval", log_fn)) is not None:
            origin, reused = "cache", base_cache.name
            log_fn(f"evaluate: {name}: the base model's answers reused from an earlier run ({base_cache}: same base, "
                   "prompt and reference token ids, decoding, code, machine and libraries)")
        if side is not None:
            gens[who], checks[who] = side["gens"], side["check"]
            if name == "alpaca_eval":
                nll[who] = [tuple(x) for x in side["nll"]]
            if bar is not None:
                bar.skip(f"{name} {who}")
        else:
            model = load_model()
            ctx = model.disable_adapter() if who == "base" else _nullcontext()
            with ctx, torch.inference_mode():
                progress = bar.part(f"{name} {who}", len(rows) * cap) if bar is not None else None
                gens[who] = generate(model, tok, [benchmark_conversation(p, system_prompt) for p in prompts], stop_ids, cap, eval.batch_size,
                                     device, checks[who], progress)
                if name == "alpaca_eval":
                    if bar is not None:
                        bar.describe(f"{name} {who} reference loss")
                    nll[who] = reference_nll(model, tok, prompts, [r["reference"] for r in rows], eval.reference_max_tokens, eval.batch_size,
                                             device, system_prompt)
        if origin == "pass":
            continue
        made = {"gens": gens[who], "check": checks[who], "nll": nll.get(who)}
        if _decode_broken(checks[who]):  # not the model's answers: kept in neither the passes nor the base's cache
            log_fn(f"evaluate: {name} {who}: not saved for a later run (its decode check failed: GENERATION BROKEN)")
            continue
        if origin is None and who == "base" and base_cache is not None:
            _keep_base_side(base_cache, made, name)
        if part is not None:
            # The base's side is saved whatever its origin: a later run of these passes reads it here, not from a cache
            # keyed otherwise (`base_key`: the cache it belongs in; `reused`: the one it came from, if any).
            extra = {"base_key": base_cache.name if base_cache is not None else None, "reused": reused} if who == "base" else {}
            save_part(part, {**made, "asked": asked, **extra})
    seconds = round(time.monotonic() - t0, 1)
    summary: dict = {"provenance": suite["provenance"], "subset": suite["subset"], "seconds": seconds, "metrics": {},
                     "system_prompt": system_prompt, "decode_check": checks, "base_reused": reused}
    detail = [{"id": r["id"], "prompt": r["prompt"], "base": gens["base"][i]["text"], "tuned": gens["tuned"][i]["text"]} for i, r in enumerate(rows)]
    m = summary["metrics"]
    conf = eval.confidence
    stopped = {who: [g["stopped"] for g in gens[who]] for who in gens}
    # Once per model: the summary's loop share (AlpacaEval's answer stats and length ask each answer's `loop_start` again,
    # which keeps it).
    loops = {who: bench.loop_share([g["text"] for g in gens[who]], stopped[who]) for who in gens}

    if name == "ifeval":
        registry = bench.ifeval_registry()
        verdicts = {who: [bench.check_ifeval(r, gens[who][i]["text"], registry) for i, r in enumerate(rows)] for who in gens}
        p = bench.ifeval_paired(verdicts["base"], verdicts["tuned"])
        for mode in ("strict", "loose"):
            b, t = p["prompt"][mode]  # one pass/fail per prompt: exact McNemar
            m[f"prompt_{mode}"] = {"base": _binary(b, conf), "tuned": _binary(t, conf), **mcnemar_exact(b, t, conf)}
            b, t = p["instruction"][mode]  # several per prompt, failing together: intervals by prompt
            cl = p["instruction_prompt"]
            m[f"instruction_{mode}"] = {"base": _binary(b, conf, cl), "tuned": _binary(t, conf, cl), **_paired_clustered(b, t, cl, conf)}
        # Counted, and left out of both models' denominators: never folded into pass or fail.
        summary["unscoreable"] = p["unscoreable"]
        summary["unscoreable_instructions"] = p["unscoreable_instructions"]
        summary["excluded_prompts"] = p["excluded_prompts"]
        summary["by_type"] = {k: {"n": v["n"], "base_loose": round(v["base_loose"] / v["n"], 3), "tuned_loose": round(v["tuned_loose"] / v["n"], 3)}
                              for k, v in sorted(p["by_type"].items())}
        # A copy of the prompt passes many of IFEval's rules: how often each model answered instead, judged on its own.
        answered = {who: [not bench.copies_prompt(bench.without_requested_repeat(gens[who][i]["text"], r), r["prompt"])
                          for i, r in enumerate(rows)] for who in gens}
        m["answered"] = _share_measure(answered, conf)
        # Prompt-level loose with a copy of the prompt counted as a failure, on the prompts both models are scored on:
        # shown beside the COPIES THE PROMPT warning, not judged (the standard score above is the one judged).
        scored = p["prompt_index"]  # the prompts of the prompt-level pairs
        if scored:
            passed = dict(zip(("base", "tuned"), p["prompt"]["loose"]))
            summary["prompt_loose_copies_failed"] = {
                who: round(sum(ok and answered[who][i] for ok, i in zip(passed[who], scored)) / len(scored), 4)
                for who in gens} | {"n": len(scored)}
        for i, d in enumerate(detail):
            d["base_checks"], d["tuned_checks"] = verdicts["base"][i], verdicts["tuned"][i]
            d["base_copies_prompt"], d["tuned_copies_prompt"] = not answered["base"][i], not answered["tuned"][i]
        summary["checkers"] = f"if-verifiable=={_version('if-verifiable')} (Google's IFEval rule checkers)"

    if name == "alpaca_eval":
        refs = [r["reference"] for r in rows]
        texts = {who: [g["text"] for g in gens[who]] for who in gens}
        stats = {who: bench.answer_stats(texts[who], stopped[who], loops[who]) for who in gens}
        # the references' own lengths (GPT-4's answers), for reading the models' lengths against
        summary["answers"] = {**stats, "reference": bench.answer_stats(refs, [True] * len(refs))}
        summary["length_check"] = bench.length_check(gens["base"], gens["tuned"], TERSE_RATIO, refs, [r["prompt"] for r in rows])
        summary["length_vs_reference"] = {who: bench.length_vs_reference(texts[who], stopped[who], refs) for who in gens}
        # An empty answer is judged on its own (exact McNemar over prompts): cutting pairs to the shorter answer makes
        # an empty answer tie its pair at 0, so the overlap scores cannot see a collapse to empty answers.
        m["answered"] = _share_measure({who: [bool(t.strip()) for t in texts[who]] for who in gens}, conf)
        words = {who: [float(bench.word_count(t)) for t in texts[who]] for who in gens}
        m["answer_words"] = {"base": {"median": stats["base"]["median_words"]}, "tuned": {"median": stats["tuned"]["median_words"]},
                             **_paired(words["base"], words["tuned"], conf)}
        # length is not a quality score: say which way it moved, the TERSER warning judges it
        m["answer_words"]["verdict"] = {"better": "longer", "worse": "shorter"}.get(m["answer_words"]["verdict"], "unclear")
        # Reference loss, one definition everywhere: NLL per reference token pooled over the prompts (a prompt weighs
        # by its reference's length). The gain, its interval (prompts resampled), the verdict and the warning are all
        # of that number; a mean of per-prompt means would let short references outvote long ones.
        sums = {who: [s_ for s_, _ in nll[who]] for who in nll}
        tokens = [c for _, c in nll["base"]]
        tot = {who: sum(sums[who]) / max(sum(tokens), 1) for who in nll}
        m["reference_loss"] = {"base": {"value": round(tot["base"], 4), "perplexity": round(math.exp(min(tot["base"], 50)), 3)},
                               "tuned": {"value": round(tot["tuned"], 4), "perplexity": round(math.exp(min(tot["tuned"], 50)), 3)},
                               **_paired(sums["base"], sums["tuned"], conf, higher_is_better=False, sizes=tokens)}
        # Overlap with the reference, judged on each pair cut to its shorter answer (length-controlled); the whole
        # answers' scores are kept for reference, marked length-sensitive and left out of better/worse.
        cut = [bench.cut_to_shorter(b, t) for b, t in zip(texts["base"], texts["tuned"])]
        overlap = {"base": bench.reference_overlap([c[0] for c in cut], refs), "tuned": bench.reference_overlap([c[1] for c in cut], refs)}
        uncut = {who: bench.reference_overlap(texts[who], refs) for who in gens}
        for metric in ("rouge_l", "chrf"):
            for key, scores in ((metric, overlap), (f"{metric}_uncut", uncut)):
                b, t = scores["base"][metric], scores["tuned"][metric]
                m[key] = {"base": {"value": round(sum(b) / len(b), 4)}, "tuned": {"value": round(sum(t) / len(t), 4)}, **_paired(b, t, conf)}
            m[f"{metric}_uncut"]["verdict"] = "length-sensitive"
        for i, d in enumerate(detail):
            # AlpacaEval's prompts and references are CC-BY-NC-4.0: eval.json (published, maybe pushed to the hub)
            # keeps the row id and the numbers, not their text.
            d.pop("prompt")
            d.update(ref_tokens=tokens[i], base_nll=round(sums["base"][i], 4), tuned_nll=round(sums["tuned"][i], 4),
                     base_loss=round(sums["base"][i] / max(tokens[i], 1), 4), tuned_loss=round(sums["tuned"][i] / max(tokens[i], 1), 4),
                     base_stopped=gens["base"][i]["stopped"], tuned_stopped=gens["tuned"][i]["stopped"],
                     base_rouge_l=round(overlap["base"]["rouge_l"][i], 4), tuned_rouge_l=round(overlap["tuned"]["rouge_l"][i], 4),
                     base_chrf=round(overlap["base"]["chrf"][i], 4), tuned_chrf=round(overlap["tuned"]["chrf"][i], 4))
        summary["metrics_note"] = ("ROUGE-L: rouge-score (stemmed F1); chrF: sacrebleu sentence chrF / 100; both judged on each pair "
                                   "cut to its shorter answer (words), the *_uncut scores (whole answers) are length-sensitive and not judged; "
                                   "reference loss: NLL per reference token, pooled; lengths in words")

    for who in gens:
        summary.setdefault("eos_share", {})[who] = round(sum(stopped[who]) / max(len(rows), 1), 4)
        summary.setdefault("loop_share", {})[who] = loops[who]
    log_fn(f"evaluate: {name}: {len(rows)}/{suite['subset']['n_full']} prompts, cap {cap} tokens, base+tuned in {seconds:.0f} s")
    return {"summary": summary, "rows": detail}


def _share_measure(passed: dict[str, list[bool]], conf: float) -> dict:
    """A per-prompt yes/no measure of both models: each one's share, judged by the exact McNemar test."""
    return {"base": {"value": round(sum(passed["base"]) / len(passed["base"]), 4)},
            "tuned": {"value": round(sum(passed["tuned"]) / len(passed["tuned"]), 4)},
            **mcnemar_exact(passed["base"], passed["tuned"], conf)}


def _version(dist: str) -> str:
    return installed_version(dist) or "missing"


RATE_METRICS = ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose", "answered")


def _ordered(name: str, metrics: dict) -> list[tuple[str, dict]]:
    """Metrics in the _LABELS order (JSON round trips sort keys), unknown ones last."""
    order = [k for (n, k) in _LABELS if n == name]
    return sorted(metrics.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))


COPY_WARN = 0.2  # a model that gives the prompt back on this share of IFEval prompts gets a COPIES THE PROMPT warning
LOOP_WARN = 0.1  # a tuned model whose answers end in a loop (cut at the cap, repeating itself) this often gets a LOOPS warning
TERSE_RATIO = 0.5  # tuned answer under this share of the base's length on most prompts = "got terser" warning

_LABELS = {
    ("ifeval", "prompt_loose"): "IFEval prompt-level loose", ("ifeval", "prompt_strict"): "IFEval prompt-level strict",
    ("ifeval", "instruction_loose"): "IFEval instruction-level loose", ("ifeval", "instruction_strict"): "IFEval instruction-level strict",
    ("ifeval", "answered"): "IFEval answers that are not a copy of the prompt",
    ("alpaca_eval", "reference_loss"): "AlpacaEval reference loss (per token)",
    ("alpaca_eval", "answered"): "AlpacaEval non-empty answers",
    ("alpaca_eval", "rouge_l"): "AlpacaEval ROUGE-L (pairs cut to the shorter answer)",
    ("alpaca_eval", "chrf"): "AlpacaEval chrF (pairs cut to the shorter answer)",
    ("alpaca_eval", "rouge_l_uncut"): "AlpacaEval ROUGE-L, whole answers (length-sensitive, not judged)",
    ("alpaca_eval", "chrf_uncut"): "AlpacaEval chrF, whole answers (length-sensitive, not judged)",
    ("alpaca_eval", "answer_words"): "AlpacaEval answer length (words)",
}


def _test_detail(m: dict) -> str:
    """The exact test behind a binary verdict, in words."""
    d = m.get("discordant")
    if not d or "p" not in m:
        return ""
    if m.get("test") == "exact McNemar":
        return f"; exact McNemar p = {m['p']:.3f}, {d['tuned_only']} prompts passed by tuned only vs {d['base_only']} by base only"
    return f"; sign test over prompts p = {m['p']:.3f}, {d['tuned_more']} prompts up vs {d['base_more']} down"


def make_verdict(summary: dict, accuracy: dict | None, bench_results: dict, confidence: float, dedupe: dict | None = None) -> dict:
    """Where tuned beats base beyond the intervals, where it regressed, where it is unclear; plus warnings and
    notes (how many measures were judged; which benchmarks the training data was deduped against).
    `accuracy` = mcnemar_exact on the embedded checkers' pass/fail (None without checkers); `dedupe` = the data
    stage's DataRecord.dedupe (None = unknown: nothing said)."""
    better, worse, unclear, warnings, notes = [], [], [], [], []
    judged = 0

    def put(label: str, verdict: str, detail: str) -> None:
        nonlocal judged
        judged += 1
        {"better": better, "worse": worse}.get(verdict, unclear).append(f"{label}: {detail}")

    if "accuracy" in summary.get("base", {}) and accuracy and accuracy.get("gain") is not None:
        b, t, ci = summary["base"]["accuracy"], summary["tuned"]["accuracy"], accuracy["gain_ci"]
        put("embedded verifiable accuracy", accuracy["verdict"],
            f"{b:.1%} -> {t:.1%} (gain CI [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}] points{_test_detail(accuracy)})")
    for name, res in bench_results.items():
        for key, m in _ordered(name, res["summary"]["metrics"]):
            label = _LABELS.get((name, key), f"{name} {key}")
            if key == "answer_words" or key in LENGTH_SENSITIVE:
                continue  # length, and scores that mostly measure it, are shown, not judged
            b, t = m["base"].get("value"), m["tuned"].get("value")
            if m.get("gain") is None:
                unclear.append(f"{label}: not scored (nothing scoreable)")
                continue
            ci = m["gain_ci"]
            if key in RATE_METRICS:  # shares: percent, gain in points
                put(label, m["verdict"], f"{b:.1%} -> {t:.1%} (gain CI [{ci[0] * 100:+.1f}, {ci[1] * 100:+.1f}] points{_test_detail(m)})")
            else:
                test = f"; sign-flip test over prompts p = {m['p']:.3f}" if "p" in m else ""
                put(label, m["verdict"], f"{b:.3f} -> {t:.3f} (gain {m['gain']:+.3f}, CI [{ci[0]:+.3f}, {ci[1]:+.3f}]{test})")
        s = res["summary"]
        if name == "alpaca_eval":
            warnings += _length_warnings(s, name)
            rl = s["metrics"]["reference_loss"]
            if rl.get("gain") is not None and rl["gain"] > 0:
                beyond = "beyond the interval" if rl["verdict"] == "worse" else "within the interval"
                warnings.append(f"REFERENCE LOSS ROSE: AlpacaEval reference-answer loss per token {rl['base']['value']:.3f} -> "
                                f"{rl['tuned']['value']:.3f} (gain {rl['gain']:+.3f}, {beyond})")
        if name == "ifeval" and "answered" in s["metrics"]:
            strict_copies = s.get("prompt_loose_copies_failed")
            for who in ("base", "tuned"):
                share = 1 - s["metrics"]["answered"][who]["value"]
                if share >= COPY_WARN:
                    recount = (f"; counting a copy as a failure, prompt-level loose reads {strict_copies['base']:.1%} (base) -> "
                               f"{strict_copies['tuned']:.1%} (tuned) on {strict_copies['n']} prompts, not judged") if strict_copies else ""
                    warnings.append(f"COPIES THE PROMPT: IFEval: the {who} model gave the prompt back on {share:.0%} of prompts; a copy passes "
                                    "rules such as no commas or word and sentence limits, so its IFEval score counts copies, not answers "
                                    f"(read the answers side by side){recount}")
        if s.get("unscoreable_instructions"):
            types = ", ".join(f"{k} ({v['count']})" for k, v in s["unscoreable"].items())
            warnings.append(f"UNSCOREABLE: {name}: {s['unscoreable_instructions']} instructions of types {types} could not be checked "
                            f"(missing data); {s['excluded_prompts']} prompts excluded from prompt-level scores")
    warnings += _loop_warnings(summary, bench_results)
    broken, checked = _decode_check_lines(summary, bench_results)
    warnings += broken
    notes += checked
    if judged:
        notes.append(f"{judged} measures judged, each at the {confidence:.0%} level: with no real change about "
                     f"{judged * (1 - confidence):.1f} of them would still read better or regressed by chance")
    if dedupe is not None:
        checked = dedupe.get("benchmarks") or {}
        if checked:
            rules = "; ".join(dedupe.get("rules") or []) or "rules not recorded"
            notes.append(f"training data deduped against {', '.join(f'{k} ({v} prompts)' for k, v in checked.items())} "
                         f"({rules}): {dedupe.get('removed', 0)} conversations removed")
        else:
            notes.append("training data not deduped against any benchmark (data.dedupe: [])")
        for name in bench_results:
            if name not in checked:
                warnings.append(f"NOT DEDUPED: {name}: the training data was not checked against its prompts (data.dedupe); "
                                "a gain there may come from training on the test prompts")
    lines = ([f"better beyond the {confidence:.0%} interval: {x}" for x in better] + [f"REGRESSED beyond the {confidence:.0%} interval: {x}" for x in worse]
             + [f"no clear difference: {x}" for x in unclear] + [f"WARNING {w}" for w in warnings] + [f"NOTE {x}" for x in notes])
    return {"better": better, "worse": worse, "unclear": unclear, "warnings": warnings, "notes": notes, "measures": judged, "lines": lines}


def _decode_broken(c: dict | None) -> bool:
    return bool(c) and c["tokens"] >= DECODE_MIN_TOKENS and c["agree"] < DECODE_WARN * c["tokens"]


def _decode_check_lines(summary: dict, bench_results: dict) -> tuple[list[str], list[str]]:
    """GENERATION BROKEN warnings where a pass's greedy answers disagree with the model's own plain forward
    (`decode_check`), and one note with the totals."""
    passes = [("held-out", who, summary.get(who, {}).get("decode_check")) for who in ("base", "tuned")]
    passes += [(name, who, c) for name, res in bench_results.items() for who, c in (res["summary"].get("decode_check") or {}).items()]
    passes = [(where, who, c) for where, who, c in passes if c and c["tokens"]]
    broken = [f"GENERATION BROKEN: {where}, {who}: only {c['agree']} of {c['tokens']} greedy answer tokens are what one plain "
              "forward over the same text picks (expected nearly all); the answers scored here are not the model's, so nothing "
              "judged from them holds (the cached, batched decode differs from the model: a patched kernel, attention or cache bug)"
              for where, who, c in passes if _decode_broken(c)]
    if not passes:
        return broken, []
    agree, tokens = sum(c["agree"] for *_, c in passes), sum(c["tokens"] for *_, c in passes)
    return broken, [f"decode check: {agree} of {tokens} greedy answer tokens ({agree / tokens:.1%}) from {len(passes)} generation passes "
                    "are what one plain forward over the same text picks"]


def _loop_warnings(summary: dict, bench_results: dict) -> list[str]:
    """LOOPS where the tuned model's greedy answers end in a loop (`benchmarks.ends_in_loop`) on LOOP_WARN or more of a
    set's prompts: what a user sees as an answer that repeats itself and never ends, whatever the scores say. The base's
    share is given beside it (a base model often loops more; that does not make the tuned one usable)."""
    sets = [("held-out", summary.get("base", {}).get("loop_share"), summary.get("tuned", {}).get("loop_share"))]
    sets += [(name, (res["summary"].get("loop_share") or {}).get("base"), (res["summary"].get("loop_share") or {}).get("tuned"))
             for name, res in bench_results.items()]
    return [f"LOOPS: {where}: {tuned:.0%} of the tuned model's answers repeat themselves until the generation cap (the last "
            f"{bench.LOOP_WORDS} words already written or the last {bench.LOOP_CHARS} characters one short piece repeated, "
            f"no end-of-turn){f'; base {base:.0%}' if base is not None else ''}; a user sees "
            "answers that never end (read them side by side; more short, well-ended training answers or more steps on them)"
            for where, base, tuned in sets if tuned is not None and tuned >= LOOP_WARN]


TERSE_MIN_JUDGED = 8  # fewer tuned answers that end (the rest loop: LOOPS says so) are too few to call a format


def _length_warnings(s: dict, name: str) -> list[str]:
    """TERSER when, on at least half the prompts judged (`bench.length_check`: a tuned answer that loops is left to
    LOOPS, and at least TERSE_MIN_JUDGED are needed), the tuned answer is under TERSE_RATIO x a helpful answer's length
    (the base's where it is an answer, else the prompt's reference); LENGTH NOT JUDGED when the cap's cuts leave that
    untold. A record scored before EVAL_VERSION 12 has no `judged`: read as it was judged then (raw medians)."""
    lc = s["length_check"]
    cap = s["subset"]["max_new_tokens"] if "subset" in s else "?"
    if "judged" not in lc:
        bw, tw, n = s["answers"]["base"]["median_words"], s["answers"]["tuned"]["median_words"], lc["n"]
        if n and 2 * lc["terse"] >= n:
            return [f"TERSER: tuned median answer on open-ended prompts is {tw:.0f} words vs base {bw:.0f}; on {lc['terse']} of {n} prompts "
                    f"the tuned answer is under {lc['ratio']:.0%} of the base's length; the model may have learned a short-answer format "
                    "and lost helpfulness"]
        if n and 2 * (lc["terse"] + lc["unknown"]) >= n:
            return [f"LENGTH NOT JUDGED: {lc['base_capped']} of {n} base answers were cut at the {cap}-token cap (base median {bw:.0f} words "
                    f"is a floor), and on {lc['unknown']} prompts the tuned answer ended by itself where the base's was cut: whether the "
                    f"tuned model answers in under {lc['ratio']:.0%} of the base's length cannot be told at this cap; raise "
                    f"eval.benchmark_max_new_tokens.{name} to judge it"]
        return []
    n = lc["judged"]
    if n < TERSE_MIN_JUDGED:
        return []
    if 2 * lc["terse"] >= n:
        return [f"TERSER: on {lc['terse']} of {n} prompts whose tuned answer does not loop, it is under {lc['ratio']:.0%} of a helpful "
                f"answer's length (the base's answer; the reference answer's where the base's loops or has under "
                f"{bench.MIN_ANSWER_WORDS} words besides the prompt said back: {lc['fallback']} prompts); medians over those prompts: tuned "
                f"{lc['median_tuned']:.0f} words, helpful length {lc['median_measure']:.0f}; the model may have learned a short-answer "
                "format and lost helpfulness"]
    if 2 * (lc["terse"] + lc["unknown"]) >= n:
        tuned_cut = f"; {lc['tuned_cut']} tuned answers cut by the cap under that length" if lc.get("tuned_cut") else ""
        return [f"LENGTH NOT JUDGED: {lc['base_cut']} of {lc['n']} base answers were cut at the {cap}-token cap without a loop (their "
                f"median {lc['base_cut_median']:.0f} words, a floor){tuned_cut}: on {lc['unknown']} of {n} prompts whether the tuned "
                f"answer is under {lc['ratio']:.0%} of a helpful length cannot be told at this cap; raise "
                f"eval.benchmark_max_new_tokens.{name} to judge it"]
    return []


def _reuse_note(s: dict) -> str:
    if not s.get("base_reused"):
        return "."
    return f" (the base's answers reused from an earlier run on the same base, prompts and machine: `{s['base_reused']}`)."


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
    for title, key in (("Better beyond the intervals", "better"), ("Regressed beyond the intervals", "worse"), ("No clear difference", "unclear"),
                       ("Notes", "notes")):
        if v.get(key):
            lines += [f"**{title}**", ""] + [f"- {x}" for x in v[key]] + [""]
    for name, s in sorted(rec.benchmarks.items(), key=lambda kv: list(bench.BENCHMARKS).index(kv[0]) if kv[0] in bench.BENCHMARKS else 99):
        sub, prov = s["subset"], s["provenance"]
        lines += [f"### {name}: {sub['n']} of {sub['n_full']} prompts (seed {sub['seed']}), greedy, cap {sub['max_new_tokens']} tokens", "",
                  f"Source: {prov.get('source')} `{prov.get('hub_id') or prov.get('file')}` sha256 `{str(prov.get('sha256'))[:16]}…`, "
                  f"license {prov.get('license')}. {s['seconds']:.0f} s" + _reuse_note(s), "",
                  "| metric | base | tuned | gain [CI] | verdict |", "|---|---|---|---|---|"]
        for key, m in _ordered(name, s["metrics"]):
            def cell(x: dict) -> str:
                if "ci" in x:
                    return f"{x['value']:.1%} [{x['ci'][0]:.1%}, {x['ci'][1]:.1%}] (n={x['n']})" if x["value"] is not None else "n/a"
                if "median" in x:
                    return f"median {x['median']:.0f}"
                if key in RATE_METRICS:
                    return f"{x['value']:.1%}"
                return f"{x['value']:.3f}" + (f" (ppl {x['perplexity']:.1f})" if "perplexity" in x else "")
            if m.get("gain") is None:
                gain = "n/a"
            elif key in RATE_METRICS:  # shares: the gain in points, as the verdict lines give it
                gain = f"{m['gain'] * 100:+.1f} [{m['gain_ci'][0] * 100:+.1f}, {m['gain_ci'][1] * 100:+.1f}] points"
            else:
                gain = f"{m['gain']:+.3f} [{m['gain_ci'][0]:+.3f}, {m['gain_ci'][1]:+.3f}]"
            verdict = m["verdict"] + (f" (p = {m['p']:.3f})" if "p" in m else "")
            lines.append(f"| {_LABELS.get((name, key), key)} | {cell(m['base'])} | {cell(m['tuned'])} | {gain} | {verdict} |")
        if "answers" in s:
            a = s["answers"]
            cols = [c for c in ("base", "tuned", "reference") if c in a]
            lines += ["", "| answers | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            for k in ("median_words", "median_words_loops_cut", "p10_words", "p90_words", "empty_share", "one_line_share", "eos_share",
                      "repetition_rate", "loop_share"):
                if not any(k in a[c] for c in cols):  # a record made before the row existed: no row of dashes
                    continue
                # the references are whole answers, never cut at a cap: no end-of-turn or loop share to read
                lines.append(f"| {k} | " + " | ".join("—" if c == "reference" and k in ("eos_share", "loop_share") else str(a[c].get(k, "—"))
                                                      for c in cols) + " |")
        if "length_vs_reference" in s:
            lines += ["", "Length against each prompt's reference, loops cut where they begin: " + "; ".join(
                f"{who} median {x['median_ratio']:.2f}x, under half {x['under_half']:.1%}, over twice {x['over_twice']:.1%}"
                for who, x in s["length_vs_reference"].items()) + "."]
        lc = s.get("length_check") or {}
        if "judged" in lc:
            lines += ["", f"Length check (TERSER at half): {lc['terse']} of {lc['judged']} prompts whose tuned answer does not loop are "
                      f"under {lc['ratio']:.0%} of a helpful answer's length ({lc['fallback']} measured against the reference answer, the "
                      f"base's being no answer); {lc['tuned_looped']} tuned answers loop (LOOPS), {lc['unknown']} not judged (cut by the cap)."]
        if "unscoreable" in s:
            u = s["unscoreable"]
            lines += ["", f"Unscoreable instructions: {s['unscoreable_instructions']}" + (" (" + ", ".join(f"{k}: {x['count']}" for k, x in u.items()) + ")" if u else "")
                      + f"; prompts excluded from prompt-level: {s['excluded_prompts']}. Checkers: {s.get('checkers', '')}."]
        lines.append("")
    return "\n".join(lines)
