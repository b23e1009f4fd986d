"""Stage 5's statistics and verdict on constructed data (issue 21, items 5, 6, 8, 9, 10, 11): each case is one
the old code called wrong. `run_benchmark` runs for real on a stand-in model whose generations and reference
losses are given, so the scoring, intervals and verdict are the stage's own."""

from __future__ import annotations

import contextlib
import json
import random

import pytest
import torch

from tasks import evaluate as ev
from tasks.config import EvalSection

REAL_REFERENCE_NLL = ev.reference_nll  # `run` stubs it; the item-10 test calls the real one


class FakeModel:
    """Stands in for base + adapter: `disable_adapter()` switches to the base, as PeftModel's does."""

    def __init__(self):
        self.who = "tuned"

    @contextlib.contextmanager
    def disable_adapter(self):
        self.who = "base"
        try:
            yield
        finally:
            self.who = "tuned"


def run(monkeypatch, name: str, rows: list[dict], answers: dict, nll: dict | None = None, cap: int = 96, tok=None, log_fn=None,
        checks: dict | None = None, **kwargs) -> tuple[dict, list]:
    """run_benchmark on `rows` with answers[who] = [(text, stopped)] and nll[who] = [(summed NLL, tokens)]; returns
    (its result, the conversations each model was prompted with)."""
    seen = []

    def fake_generate(model, tok, conversations, stop_ids, max_new_tokens, batch_size, device, check=None, progress=None):
        seen.append((model.who, conversations))
        if check is not None and checks:
            check.update(checks[model.who])
        if progress is not None:
            progress(len(conversations) * max_new_tokens)
        return [{"text": t, "stopped": s} for t, s in answers[model.who]]

    def fake_reference_nll(model, tok, prompts, references, *a, **k):
        return nll[model.who]

    monkeypatch.setattr(ev, "generate", fake_generate)
    monkeypatch.setattr(ev, "reference_nll", fake_reference_nll)
    suite = {"name": name, "rows": rows, "provenance": {"source": "constructed"},
             "subset": {"n": len(rows), "n_full": len(rows), "seed": 0, "max_new_tokens": cap}}
    model = FakeModel()
    return ev.run_benchmark(lambda: model, tok, suite, [0], EvalSection(), "cpu", log_fn or (lambda m: None), **kwargs), seen


def alpaca_rows(n: int, ref_words: int = 150, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(400)]
    return [{"id": str(i), "prompt": f"question {i}", "reference": " ".join(rng.choice(vocab) for _ in range(ref_words))} for i in range(n)]


def ifeval_rows(n: int, per_prompt: int) -> list[dict]:
    """n prompts of `per_prompt` no-comma instructions: one answer passes all of them or fails all of them."""
    return [{"id": str(i), "prompt": f"p{i}", "instruction_id_list": ["punctuation:no_comma"] * per_prompt, "kwargs": [{}] * per_prompt}
            for i in range(n)]


PASS, FAIL = ("plain words here", True), ("words, with a comma", True)


# ---------------------------------------------------------------------------------------------------------
# The exact tests themselves


def test_exact_binomial_and_clopper_pearson_known_values():
    assert ev.exact_binomial_p(4, 4) == pytest.approx(0.125)  # 4 of 4 discordant pairs one way
    assert ev.exact_binomial_p(7, 8) == pytest.approx(18 / 256)
    assert ev.exact_binomial_p(0, 0) == 1.0 and ev.exact_binomial_p(5, 10) == 1.0
    assert ev.clopper_pearson(5, 10) == pytest.approx((0.187086, 0.812914), abs=1e-6)  # R: binom.test(5, 10)$conf.int
    assert ev.clopper_pearson(0, 10)[1] == pytest.approx(1 - 0.025 ** (1 / 10))
    assert ev.clopper_pearson(10, 10)[0] == pytest.approx(0.025 ** (1 / 10))
    assert ev.binom_tail(1000, 2000, 0.5) == pytest.approx(0.5089, abs=1e-4)  # large n stays finite


def test_mcnemar_interval_excludes_zero_exactly_when_the_test_rejects():
    for t_only in range(0, 13):
        for b_only in range(0, 13):
            n = 40
            base = [False] * t_only + [True] * b_only + [True] * (n - t_only - b_only)
            tuned = [True] * t_only + [False] * b_only + [True] * (n - t_only - b_only)
            r = ev.mcnemar_exact(base, tuned)
            lo, hi = r["gain_ci"]
            assert lo <= r["gain"] <= hi
            assert (lo > 0 or hi < 0) == (r["verdict"] != "unclear"), (t_only, b_only, r)
            assert r["verdict"] == ("unclear" if r["p"] >= 0.05 else "better" if t_only > b_only else "worse")


def test_four_of_24_discordant_all_one_way_is_not_a_gain(monkeypatch):
    """Issue 21 item 11: the percentile bootstrap called this better; the exact McNemar test gives p = 0.125."""
    # On IFEval, through the stage's own scoring: prompt level (one instruction each) by McNemar, instruction
    # level by the sign test over prompts.
    res, _ = run(monkeypatch, "ifeval", ifeval_rows(24, 1), {"base": [FAIL] * 4 + [PASS] * 20, "tuned": [PASS] * 24})
    m = res["summary"]["metrics"]
    for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        assert m[key]["verdict"] == "unclear" and m[key]["gain"] == pytest.approx(4 / 24, abs=1e-4) and m[key]["p"] == 0.125, (key, m[key])
    v = ev.make_verdict({}, None, {"ifeval": res}, 0.95)
    assert v["better"] == [] and len(v["unclear"]) == 5  # the four IFEval scores + answers that are not a copy of the prompt
    assert "exact McNemar p = 0.125, 4 prompts passed by tuned only vs 0 by base only" in v["unclear"][0]
    # and it says how many measures it judged
    assert v["measures"] == 5
    assert "NOTE 5 measures judged, each at the 95% level: with no real change about 0.3 of them would still read better or regressed by chance" in v["lines"]

    # The embedded accuracy: the same test.
    base, tuned = [False] * 4 + [True] * 20, [True] * 24
    assert ev.paired_bootstrap(base, tuned)[0] > 0  # what the old verdict rested on
    r = ev.mcnemar_exact(base, tuned)
    assert r["p"] == 0.125 and r["verdict"] == "unclear" and r["gain"] == pytest.approx(4 / 24, abs=1e-4)
    assert r["gain_ci"][0] < 0 < r["gain_ci"][1]
    v = ev.make_verdict({"base": {"accuracy": 20 / 24}, "tuned": {"accuracy": 1.0}}, r, {}, 0.95)
    assert v["better"] == [] and v["unclear"][0].startswith("embedded verifiable accuracy: 83.3% -> 100.0%")
    assert "exact McNemar p = 0.125, 4 prompts passed by tuned only vs 0 by base only" in v["unclear"][0]


# ---------------------------------------------------------------------------------------------------------
# Item 8: instructions of one answer fail together; intervals resample prompts


def test_cluster_wilson_is_wilson_for_single_trials_and_for_clusters_that_agree():
    k = [1] * 20 + [0] * 28
    assert ev.cluster_wilson(k, [1] * 48) == pytest.approx(ev.wilson(20, 48))
    # 48 prompts of 3 instructions that always agree carry the information of 48 trials, not 144
    assert ev.cluster_wilson([3 * x for x in k], [3] * 48) == pytest.approx(ev.wilson(20, 48))
    assert ev.cluster_wilson([0] * 48, [3] * 48) == pytest.approx(ev.wilson(0, 48))


def test_instruction_level_intervals_resample_prompts_not_instructions(monkeypatch):
    """48 prompts of 3 instructions each, all three passing or failing together: 8 prompts passed by tuned only,
    3 by base only. Resampling instructions (the old code) treats 144 instructions as independent and calls a
    gain; resampling prompts gives the interval of 48 prompts, which does not."""
    base = [FAIL] * 8 + [PASS] * 3 + [PASS] * 21 + [FAIL] * 16
    tuned = [PASS] * 8 + [FAIL] * 3 + [PASS] * 21 + [FAIL] * 16
    res, _ = run(monkeypatch, "ifeval", ifeval_rows(48, 3), {"base": base, "tuned": tuned})
    m = res["summary"]["metrics"]
    inst, prompt = m["instruction_strict"], m["prompt_strict"]
    assert inst["base"]["n"] == 144 and inst["gain"] == pytest.approx(5 / 48, abs=1e-4)
    flat_b = [x[1] and "," not in x[0] for x in base for _ in range(3)]
    flat_t = [x[1] and "," not in x[0] for x in tuned for _ in range(3)]
    flat_lo, flat_hi = ev.paired_bootstrap([float(x) for x in flat_b], [float(x) for x in flat_t])
    assert flat_lo > 0  # the old instruction-level interval: "better"
    lo, hi = inst["gain_ci"]
    assert lo < 0 < hi and inst["verdict"] == "unclear"
    assert hi - lo > 1.5 * (flat_hi - flat_lo)  # about sqrt(3) wider
    # each model's own interval: Wilson on the 48 prompts, not on 144 instructions
    for who in ("base", "tuned"):
        assert inst[who]["ci"] == pytest.approx(prompt[who]["ci"], abs=1e-4), who
    assert prompt["verdict"] == "unclear" and prompt["p"] == pytest.approx(464 / 2048, abs=1e-4)  # McNemar 8 vs 3


# ---------------------------------------------------------------------------------------------------------
# Item 6: the reference loss shown is the reference loss judged


def test_reference_loss_value_gain_interval_verdict_and_warning_are_one_per_token_number(monkeypatch):
    """12 short references (10 tokens) improve 2.0 -> 1.5 per token, 12 long ones (200 tokens) worsen 2.0 -> 2.1:
    per token the tuned model is worse (2.000 -> 2.071); the old gain averaged per-prompt means (2.0 -> 1.8) and
    printed "better beyond the interval" next to "REFERENCE LOSS ROSE (within the interval)"."""
    n = 24
    rows = alpaca_rows(n, ref_words=20)
    nll = {"base": [(20.0, 10), (400.0, 200)] * (n // 2), "tuned": [(15.0, 10), (420.0, 200)] * (n // 2)}
    answers = {who: [(r["reference"], True) for r in rows] for who in ("base", "tuned")}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, nll)
    rl = res["summary"]["metrics"]["reference_loss"]
    assert rl["base"]["value"] == 2.0 and rl["tuned"]["value"] == pytest.approx(2.0714, abs=1e-4)
    assert rl["gain"] == pytest.approx(rl["tuned"]["value"] - rl["base"]["value"], abs=1e-4)
    assert rl["gain_ci"][0] <= rl["gain"] <= rl["gain_ci"][1] and rl["gain_ci"][0] > 0
    assert rl["verdict"] == "worse"
    v = ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)
    assert not any("reference loss" in x for x in v["better"])
    assert any(x.startswith("AlpacaEval reference loss (per token): 2.000 -> 2.071 (gain +0.071") for x in v["worse"]), v["worse"]
    rose = [w for w in v["warnings"] if w.startswith("REFERENCE LOSS ROSE")]
    assert len(rose) == 1 and "2.000 -> 2.071" in rose[0] and "beyond the interval" in rose[0]
    assert [d["ref_tokens"] for d in res["rows"][:2]] == [10, 200]  # eval.json keeps what the pooled number needs


def test_reference_loss_of_a_few_prompts_is_not_called_better_by_a_degenerate_bootstrap(monkeypatch):
    """4 AlpacaEval prompts whose reference loss each fell by the same 0.5 per token: every bootstrap resample has the
    same gain, so the percentile interval is [-0.5, -0.5] and the verdict read "better beyond the 95% interval"; 1 prompt
    did too. Exchanging base and tuned on a prompt is as likely as not under no change: 2 of the 16 exchanges give a
    gain this large (p = 0.125), so nothing is judged. The same holds for ROUGE-L and chrF (`_paired`)."""
    for n in (1, 4):
        rows = alpaca_rows(n, ref_words=20)
        nll = {"base": [(20.0, 10)] * n, "tuned": [(15.0, 10)] * n}
        answers = {who: [(r["reference"], True) for r in rows] for who in ("base", "tuned")}
        res, _ = run(monkeypatch, "alpaca_eval", rows, answers, nll)
        rl = res["summary"]["metrics"]["reference_loss"]
        assert rl["gain"] == -0.5 and rl["verdict"] == "unclear", (n, rl)
        v = ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)
        assert v["better"] == [] and any(x.startswith("AlpacaEval reference loss") for x in v["unclear"])
    assert "sign-flip test over prompts p = 0.125" in next(x for x in v["unclear"] if x.startswith("AlpacaEval reference loss"))
    assert ev._paired([0.2] * 4, [0.3] * 4, 0.95)["verdict"] == "unclear"  # ROUGE-L / chrF up on 4 of 4 prompts
    assert ev._paired([0.2] * 8, [0.3] * 8, 0.95)["verdict"] == "better"  # 8 of 8: p = 2 / 256


def test_a_saved_pass_of_other_prompts_is_not_read_back(monkeypatch, tmp_path):
    """Stage 5's saved passes (`parts`) are keyed by the stage's key, and a hub benchmark source is keyed by its id
    alone: a hub copy updated between a cut run and its rerun gives other prompts under the same key. The saved answers
    were read back by their count only, so the tuned (and base) answers to the old prompts were scored against the new
    ones. A saved pass is used only for the prompts it answered."""
    n = 4
    old = [{**r, "prompt": f"old question {i}"} for i, r in enumerate(alpaca_rows(n))]
    new = [{**r, "prompt": f"new question {i}"} for i, r in enumerate(alpaca_rows(n, seed=1))]
    nll = {who: [(1.0, 1)] * n for who in ("base", "tuned")}
    run(monkeypatch, "alpaca_eval", old, {who: [(f"{who} to old", True)] * n for who in ("base", "tuned")}, nll, parts=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PARTS", "alpaca_eval-base.json", "alpaca_eval-tuned.json"]
    logs = []
    res, seen = run(monkeypatch, "alpaca_eval", new, {who: [(f"{who} to new", True)] * n for who in ("base", "tuned")}, nll,
                    parts=tmp_path, log_fn=logs.append)
    assert [who for who, _ in seen] == ["base", "tuned"] and not any("reused" in m for m in logs), logs
    assert sum("answers to other prompts" in m for m in logs) == 2  # each side said why it is generated again
    assert {d["base"] for d in res["rows"]} == {"base to new"} and {d["tuned"] for d in res["rows"]} == {"tuned to new"}
    res, seen = run(monkeypatch, "alpaca_eval", new, {who: [("unused", True)] * n for who in ("base", "tuned")}, nll, parts=tmp_path)
    assert seen == [] and {d["tuned"] for d in res["rows"]} == {"tuned to new"}  # the same prompts: read back


def _saved(n: int, **fields) -> str:
    return json.dumps({"gens": [{"text": "saved", "stopped": True}] * n, "check": {}, "nll": [[1.0, 1]] * n, "asked": "?", **fields})


@pytest.mark.parametrize("content, why", [
    ("{not json", "unreadable: Expecting property name"),
    (_saved(3), "3 answers where this pass has 4 prompts"),
    (_saved(4, nll=[[1.0, 1]] * 2), "2 losses where this pass has 4 rows"),
    (_saved(4, gens=[{"text": "no stop flag"}] * 4), "not in the saved form"),
    (json.dumps({"answers": []}), "not in the saved form: KeyError 'gens'"),
    (_saved(4), "answers to other prompts: the benchmark's prompts or references changed since it was saved"),
    (_saved(4, asked=ev._asked(alpaca_rows(4)), check={"tokens": 40, "agree": 0}),
     "its decode check failed, 0 of 40 greedy tokens agreeing (GENERATION BROKEN): not the model's answers"),
])
def test_a_saved_pass_that_cannot_be_used_is_named_with_why_before_it_is_generated_again(monkeypatch, tmp_path, content, why):
    """A saved pass that cannot be used (cut mid-write, of another prompt count, of other prompts) was generated again
    without a word: the log said nothing of the minutes it cost, nor why. One line now says what was found, why it is
    not used and that it is generated again; a pass never saved says nothing."""
    rows = alpaca_rows(4)
    (tmp_path / "alpaca_eval-tuned.json").write_text(content)
    logs = []
    res, seen = run(monkeypatch, "alpaca_eval", rows, {who: [(f"{who} now", True)] * 4 for who in ("base", "tuned")},
                    {who: [(1.0, 1)] * 4 for who in ("base", "tuned")}, parts=tmp_path, log_fn=logs.append)
    assert [who for who, _ in seen] == ["base", "tuned"] and {d["tuned"] for d in res["rows"]} == {"tuned now"}
    said = [m for m in logs if "alpaca_eval-tuned.json" in m]
    assert len(said) == 1, logs
    assert said[0].startswith(f"evaluate: alpaca_eval tuned: the saved pass {tmp_path / 'alpaca_eval-tuned.json'} is not used (")
    assert why in said[0] and said[0].endswith("; generating it again")
    assert not any("alpaca_eval-base.json" in m for m in logs)  # never saved: nothing to say


def test_the_batch_size_is_not_in_the_key_of_the_bases_cached_answers(tmp_path):
    """eval.batch_size was out of stage 5's key (greedy answers do not depend on the batch: evaluate.NOT_MEASURED) but
    in the key of the base's cached benchmark answers: a new batch size generated the base's answers again, minutes on
    a GPU, for a setting that only trades memory for speed."""
    from tasks.config import load_config
    from tasks.data import DataRecord

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}"])
    data = DataRecord.model_construct(model_fingerprint="m", chat_template_hash="t", stop_token_ids=[1], key="data-a")
    suite = {"name": "alpaca_eval", "rows": alpaca_rows(4), "provenance": {"sha256": "s"}, "subset": {"n": 4, "seed": 0, "max_new_tokens": 8}}
    keys = {ev.base_answers_key(data, cfg.model, cfg.quant, cfg.eval.model_copy(update={"batch_size": b}), suite, "cpu", None, CharTok())
            for b in (1, 16, 1024)}
    assert len(keys) == 1


def test_the_bases_answers_cached_with_the_batch_size_in_their_key_are_still_used(tmp_path):
    """The base's answers cached while eval.batch_size was in their key (the demo profiles' at 24, demo-gpu's at 1024)
    are copied under the key without it, once, rather than generated again; the old folder stays for older code."""
    from tasks.common import building, is_complete
    from tasks.config import load_config
    from tasks.data import DataRecord

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}", "eval.batch_size=24"])
    data = DataRecord.model_construct(model_fingerprint="m", chat_template_hash="t", stop_token_ids=[1], key="data-a")
    suite = {"name": "alpaca_eval", "rows": alpaca_rows(4), "provenance": {"sha256": "s"}, "subset": {"n": 4, "seed": 0, "max_new_tokens": 8}}
    args = (data, cfg.model, cfg.quant, cfg.eval, suite, "cpu", None, CharTok())
    old = tmp_path / "cache" / "eval-base" / ev.base_answers_key(*args, batch_size=24)
    with building(old) as tmp:
        (tmp / "base.json").write_text(_saved(4))
    other = cfg.eval.model_copy(update={"batch_size": 16})  # a cache made at 24 is not looked for at 16 (not its old key)
    assert not is_complete(ev.base_answers_dir(str(tmp_path), data, cfg.model, cfg.quant, other, suite, "cpu", None, CharTok()))
    folder = ev.base_answers_dir(str(tmp_path), *args)
    assert folder.name == ev.base_answers_key(*args) != old.name and is_complete(folder) and is_complete(old)
    assert (folder / "base.json").read_text() == (old / "base.json").read_text()
    assert ev.base_answers_dir(str(tmp_path), data, cfg.model, cfg.quant, other, suite, "cpu", None, CharTok()) == folder


def _base_args(tmp_path, batch_size: int = 24) -> tuple:
    from tasks.config import load_config
    from tasks.data import DataRecord

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}", f"eval.batch_size={batch_size}"])
    data = DataRecord.model_construct(model_fingerprint="m", chat_template_hash="t", stop_token_ids=[1], key="data-a")
    suite = {"name": "alpaca_eval", "rows": alpaca_rows(4), "provenance": {"sha256": "s"}, "subset": {"n": 4, "seed": 0, "max_new_tokens": 8}}
    return data, cfg.model, cfg.quant, cfg.eval, suite, "cpu", None, CharTok()


@pytest.mark.parametrize("content, why", [(None, "unreadable: [Errno 2]"), ("{not json", "unreadable: Expecting"),
                                          (_saved(3), "3 answers where this pass has 4 prompts")])
def test_an_old_key_base_cache_that_cannot_be_used_is_not_copied_in_one_line(tmp_path, content, why):
    """base_answers_dir copies the base's answers cached under the old key (with eval.batch_size). One there that cannot
    be used (base.json missing or unreadable beside its COMPLETE: a partial rsync or tar extract, a hand edit) made
    shutil.copy2 raise, and stage 5 failed before generating anything, on every run; or, unreadable, was copied and
    refused only on reading. It is now one line naming the folder and why, the new key's folder stays empty (the side
    is made as if none were cached) and the old folder is left as it was."""
    from tasks.common import building, is_complete

    args = _base_args(tmp_path)
    old = tmp_path / "cache" / "eval-base" / ev.base_answers_key(*args, batch_size=24)
    with building(old) as tmp:
        if content is not None:
            (tmp / "base.json").write_text(content)
    logs = []
    folder = ev.base_answers_dir(str(tmp_path), *args, log_fn=logs.append)
    assert not is_complete(folder) and is_complete(old)
    assert len(logs) == 1 and logs[0].startswith(f"evaluate: alpaca_eval: the base's answers cached while eval.batch_size was in their key ({old}) "
                                                 f"are not copied ({why}"), logs


def test_an_old_key_base_cache_not_copied_says_what_happens_instead(tmp_path):
    """Every other line about a saved pass or cache that cannot be used ends in what is done instead ("generating it
    again", "reading the base's cached answers (...)"); the old-key copy's line stopped at "are not copied (why)", so the
    log did not say whether the base's answers are now generated (minutes on a GPU) or come from elsewhere."""
    from tasks.common import building

    args = _base_args(tmp_path)
    old = tmp_path / "cache" / "eval-base" / ev.base_answers_key(*args, batch_size=24)
    with building(old) as tmp:
        (tmp / "base.json").write_text("{not json")
    logs = []
    ev.base_answers_dir(str(tmp_path), *args, log_fn=logs.append)
    [line] = logs
    assert "are not copied (unreadable" in line
    assert "generat" in line, line  # what happens next: here the base side is generated


def test_a_full_disk_while_copying_the_old_key_base_cache_is_not_called_an_unreadable_cache(monkeypatch, tmp_path):
    """base_answers_dir's copy caught every OSError as "read above, gone or unreadable since": a full disk (ENOSPC,
    which train and publish tell apart with `disk_full`) during the copy was logged as the old cache being unreadable,
    and the stage went on to generate the base's answers (minutes on a GPU) on a disk that cannot take them. It now
    stops as train and publish do: a StageError naming the folder and the fix, from the disk-full error."""
    import errno

    from tasks.common import StageError, building, disk_full, is_complete

    args = _base_args(tmp_path)
    old = tmp_path / "cache" / "eval-base" / ev.base_answers_key(*args, batch_size=24)
    with building(old) as tmp:
        (tmp / "base.json").write_text(_saved(4))

    def copy2(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ev.shutil, "copy2", copy2)
    logs = []
    folder = tmp_path / "cache" / "eval-base" / ev.base_answers_key(*args)
    with pytest.raises(StageError, match="disk full") as e:
        ev.base_answers_dir(str(tmp_path), *args, log_fn=logs.append)
    assert disk_full(e.value.__cause__) and str(folder) in str(e.value) and "free some space" in str(e.value)
    assert not any("unreadable" in m for m in logs), logs  # the old cache is whole; the disk is full
    assert is_complete(old) and not folder.exists() and not list(folder.parent.glob(f".{folder.name}.tmp-*"))


def test_an_unusable_base_cache_is_written_again_from_the_saved_pass_that_is_used(monkeypatch, tmp_path):
    """With the passes kept, a base side is often both in the base's cache and in the saved passes. When the cache could
    not be used the log said "generating them again", then the saved pass was read back and nothing was generated, and
    the unusable cache stayed, so every later run said the same wrong line. The saved pass is now read first; the
    cache, where unusable and the pass was made under its key, is written again from it, in one line."""
    rows, cache, parts = alpaca_rows(4), tmp_path / "eval-base" / "k", tmp_path / "parts"
    answers = {who: [(f"{who} answer", True)] * 4 for who in ("base", "tuned")}
    nll = {who: [(1.0, 1)] * 4 for who in ("base", "tuned")}
    run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, parts=parts)
    (cache / "base.json").write_text("{not json")
    for attempt in ("repaired", "as repaired"):
        logs = []
        res, seen = run(monkeypatch, "alpaca_eval", rows, {who: [("never generated", True)] * 4 for who in ("base", "tuned")}, nll,
                        base_cache=cache, parts=parts, log_fn=logs.append)
        assert seen == [] and {d["base"] for d in res["rows"]} == {"base answer"}  # nothing generated: the saved pass was used
        assert not any("generating" in m or "holds no usable" in m for m in logs), logs
        recached = [m for m in logs if "cached again" in m]
        if attempt == "repaired":
            assert recached == [f"evaluate: alpaca_eval: the base model's answers cached again in {cache} from this stage's saved pass "
                                "(unreadable: Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"], logs
        else:
            assert recached == []  # the cache is whole again: nothing more to say
        assert [g["text"] for g in json.loads((cache / "base.json").read_text())["gens"]] == ["base answer"] * 4
    res, seen = run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache)  # another adapter: the cache serves it
    assert [who for who, _ in seen] == ["tuned"] and res["summary"]["base_reused"] == "k"


def test_an_unusable_saved_base_pass_is_said_to_give_way_to_the_base_cache_and_is_saved_from_it(monkeypatch, tmp_path):
    """A saved base pass that cannot be used, with the base's cache usable beside it: the line says the cache is read
    (not "generating it again"), nothing is generated, and the pass is saved again from the cache."""
    rows, cache, parts = alpaca_rows(4), tmp_path / "eval-base" / "k", tmp_path / "parts"
    answers = {who: [(f"{who} answer", True)] * 4 for who in ("base", "tuned")}
    nll = {who: [(1.0, 1)] * 4 for who in ("base", "tuned")}
    run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, parts=parts)
    part = parts / "alpaca_eval-base.json"
    part.write_text("{not json")
    logs = []
    res, seen = run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, parts=parts, log_fn=logs.append)
    assert seen == [] and res["summary"]["base_reused"] == "k"
    said = [m for m in logs if str(part) in m]
    assert len(said) == 1 and said[0].endswith(f"; reading the base's cached answers ({cache})"), logs
    assert any("the base model's answers reused from an earlier run" in m for m in logs)
    saved = json.loads(part.read_text())
    assert [g["text"] for g in saved["gens"]] == ["base answer"] * 4 and saved["reused"] == saved["base_key"] == "k"


def test_an_unusable_saved_base_pass_beside_an_unusable_cache_is_not_said_to_give_way_to_that_cache(monkeypatch, tmp_path):
    """The saved base pass and the base's cache both unusable: the pass's line said "...; reading the base's cached
    answers (cache)", a second line then said that cache is unusable too and the side is generated. What the first line
    said happens next did not happen (the reader's test, which plan_generation already ran on that cache, says so before
    the line is written). The pass's line now names the cache only where it can be read."""
    rows, cache, parts = alpaca_rows(4), tmp_path / "eval-base" / "k", tmp_path / "parts"
    answers = {who: [(f"{who} answer", True)] * 4 for who in ("base", "tuned")}
    nll = {who: [(1.0, 1)] * 4 for who in ("base", "tuned")}
    run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, parts=parts)
    (parts / "alpaca_eval-base.json").write_text("{not json")
    (cache / "base.json").write_text("{not json")
    logs = []
    _, seen = run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, parts=parts, log_fn=logs.append)
    assert [who for who, _ in seen] == ["base"]  # generated: neither could be used
    said = [m for m in logs if str(parts / "alpaca_eval-base.json") in m]
    assert len(said) == 1 and not said[0].endswith(f"; reading the base's cached answers ({cache})"), logs


def test_a_same_key_rewrite_of_the_base_cache_never_hides_a_usable_cache_from_a_concurrent_reader(monkeypatch, tmp_path):
    """`_keep_base_side` (a run that generated the base side while another wrote it, and `_recache_base_side` too)
    rmtree'd a complete cache before `building` swapped the new one in. `building` swaps with two renames precisely so a
    reader never finds the folder gone; the rmtree before it reopened that window for the whole write (an fsync'd
    base.json): a concurrent run reading the usable cache then (no lock on reading) found it missing (or COMPLETE
    without base.json: rmtree's order), said it "holds no usable base answers" and generated them again. `building`
    alone now replaces it."""
    rows, cache = alpaca_rows(4), tmp_path / "eval-base" / "k"
    answers = {who: [(f"{who} answer", True)] * 4 for who in ("base", "tuned")}
    nll = {who: [(1.0, 1)] * 4 for who in ("base", "tuned")}
    run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache)  # a usable cache
    side = json.loads((cache / "base.json").read_text())
    seen = []
    real_building = ev.building

    def building(final, *a, **k):  # another run looks at the cache while this one writes the same answers
        logs = []
        seen.append((ev.is_complete(cache), ev._read_base_side(cache, 4, True, logs.append) is not None, logs))
        return real_building(final, *a, **k)

    monkeypatch.setattr(ev, "building", building)
    ev._keep_base_side(cache, side, "alpaca_eval")
    assert seen == [(True, True, [])], seen
    assert [g["text"] for g in json.loads((cache / "base.json").read_text())["gens"]] == ["base answer"] * 4  # replaced, whole


# ---------------------------------------------------------------------------------------------------------
# Item 5: chrF / ROUGE-L judged length-controlled; the cap cannot hide a terser model


def test_overlap_scores_are_judged_on_pairs_cut_to_the_shorter_answer(monkeypatch):
    """The tuned answers say the same as the base's, only shorter (a prefix): uncut, chrF's recall weighting
    calls that a regression; cut to the shorter answer there is no difference. A tuned model that says something
    else at that length is still caught."""
    rows = alpaca_rows(24)
    words = [r["reference"].split() for r in rows]
    base = [(" ".join(w[:60]), False) for w in words]
    same_shorter = [(" ".join(w[:30]), True) for w in words]
    res, _ = run(monkeypatch, "alpaca_eval", rows, {"base": base, "tuned": same_shorter}, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24})
    m = res["summary"]["metrics"]
    for key in ("chrf", "rouge_l"):
        assert m[key]["verdict"] == "unclear" and m[key]["gain"] == 0, (key, m[key])
    assert m["chrf_uncut"]["gain_ci"][1] < 0 and m["rouge_l_uncut"]["gain_ci"][1] < 0  # the length effect, as constructed
    assert m["chrf_uncut"]["verdict"] == m["rouge_l_uncut"]["verdict"] == "length-sensitive"
    v = ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)
    assert v["worse"] == [] and not any("whole answers" in x for x in v["unclear"])  # length-sensitive: shown, not judged
    card = ev.benchmark_markdown(
        ev.EvalRecord(key="k", dir="d", eval_json="e", chart_png="c", n_prompts=0, base={}, tuned={}, per_family=[], accuracy_gain=None,
                      gain_ci=None, beats_base=None, seconds=0, benchmarks={"alpaca_eval": res["summary"]}, verdict=v))
    assert "AlpacaEval chrF, whole answers (length-sensitive, not judged)" in card
    # the references' own length beside the models' (issue 18: a median answer between half and twice the references')
    assert res["summary"]["answers"]["reference"]["median_words"] == 150.0
    assert "| answers | base | tuned | reference |" in card and "| median_words | 60.0 | 30.0 | 150.0 |" in card

    other = [(" ".join(f"x{j}" for j in range(30)), True) for _ in words]
    res, _ = run(monkeypatch, "alpaca_eval", rows, {"base": base, "tuned": other}, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24})
    assert res["summary"]["metrics"]["chrf"]["verdict"] == "worse" and res["summary"]["metrics"]["rouge_l"]["verdict"] == "worse"


@pytest.mark.parametrize("base_stopped, tuned_words, expected", [
    (False, 40, "LENGTH NOT JUDGED"),  # base cut at the cap (70 words a floor), tuned ended at 40: cannot be told
    (False, 20, "TERSER"),             # under half even of the cut base answer
    (True, 40, None),                  # the base ended by itself at 70: 40 is not under half
])
def test_terser_warning_is_not_held_by_the_cap(monkeypatch, base_stopped, tuned_words, expected):
    """The demo's base hit the 96-token cap on 87.5% of prompts, holding its median near the cap; a tuned model
    that stops at 40 words then passed the old median rule (40 >= 70 / 2) unseen."""
    rows = alpaca_rows(24)
    # the base's 70 words all different: an answer the cap cut, not a loop (a loop's length is what it says before it)
    answers = {"base": [(" ".join(f"w{i}" for i in range(70)), base_stopped)] * 24, "tuned": [(" ".join(["w"] * tuned_words), True)] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=96)
    warnings = [w for w in ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)["warnings"] if w.startswith(("TERSER", "LENGTH"))]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warnings[0].startswith(expected + ":"), warnings
    if expected == "LENGTH NOT JUDGED":
        assert "24 of 24 base answers were cut at the 96-token cap" in warnings[0] and "eval.benchmark_max_new_tokens.alpaca_eval" in warnings[0]


LOOPING = " ".join(["Measure the circumference of the button and the circumference of the shirt."] * 8)
LONG_UNIQUE = " ".join(f"word{i}" for i in range(120))


@pytest.mark.parametrize("tuned, expected", [
    ((" ".join(f"word{i}" for i in range(100)), True), None),  # answers and stops at 2/3 of the reference: not terser
    ((" ".join(f"word{i}" for i in range(40)), True), "TERSER"),  # stops at 40 words, under half the 150-word references
    ((LOOPING, False), None),                                  # loops as the base does: left to LOOPS
    (("Measure it. " + " ".join(["Measure it."] * 40), False), None),  # says two words, then loops: LOOPS, not a short format
])
def test_terser_measures_against_the_reference_where_the_base_loops(monkeypatch, tuned, expected):
    """Gemma-3-270M base loops to the cap on 802 of AlpacaEval's 805 prompts (19 words before the loop at the median):
    counted whole, its answers held the cap's length, and the demo-gpu profile, whose answers end by themselves at
    ~150 words, read TERSER on 424 of 805 prompts (2026-12-07, q2). A looping base answer is no measure of a helpful
    length: the prompt's reference answer is (alpaca_rows: 150 words); a tuned answer that loops is left to LOOPS."""
    rows = alpaca_rows(24)
    answers = {"base": [(LOOPING, False)] * 24, "tuned": [tuned] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    lc = res["summary"]["length_check"]
    assert lc["base_looped"] == lc["base_capped"] == 24 and lc["unknown"] == lc["base_cut"] == 0
    assert lc["judged"] == 24 - lc["tuned_looped"] and lc["fallback"] == lc["judged"]
    warnings = [w for w in ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)["warnings"] if w.startswith(("TERSER", "LENGTH"))]
    if expected is None:
        assert warnings == [], warnings
    else:
        assert len(warnings) == 1 and warnings[0].startswith("TERSER: on 24 of 24 prompts whose tuned answer does not loop"), warnings
        assert "prompt said back: 24 prompts" in warnings[0] and "tuned 40 words, helpful length 150" in warnings[0], warnings


# Review of fd0bd84 (the TERSER check with loops cut), 2026-12-07: what it still gets wrong.
ECHO_LOOP = ("How do I wrap a present neatly?\n\n### Assistant:\n" * 60)[:-3]  # the base's AlpacaEval shape: prompt, turn, again
ONE_LINER = "Wrap the box in paper, fold the ends under, and tape them down."  # 13 words, ends by itself


def test_a_base_that_only_gives_the_prompt_back_before_its_loop_is_no_measure_of_length(monkeypatch):
    """Gemma-3-270M base's looped AlpacaEval answers (q4, 2026-12-07) say, before the loop, the prompt and '### Assistant:'
    (9-43 words, 19 at the median): nothing of an answer. Counted as the base's length, the TERSER check can only call a
    tuned answer under ~10 words terse, and looped answers are out of `unknown`, so a tuned model that answers every
    prompt in one 13-word line (references: 150 words) gets no length line at all; before fd0bd84 it read TERSER.
    Seen on a stored run: h200-gemma-showcase-2026-12-01-c (tuned stops at 7 words at the median on 288 prompts,
    'The names were given.') read LENGTH NOT JUDGED under EVAL_VERSION 11 and reads nothing re-scored under 12."""
    rows = alpaca_rows(24)
    answers = {"base": [(ECHO_LOOP, False)] * 24, "tuned": [(ONE_LINER, True)] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    lc = res["summary"]["length_check"]
    # the base's answers are no measure: each prompt's reference answer (150 words) is
    assert lc["base_looped"] == lc["fallback"] == lc["terse"] == 24 and lc["unknown"] == 0
    warnings = [w for w in ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)["warnings"] if w.startswith(("TERSER", "LENGTH"))]
    assert len(warnings) == 1 and warnings[0].startswith("TERSER:") and "prompt said back: 24 prompts" in warnings[0], warnings
    # and a tuned model that answers at the references' length is not terser
    answers["tuned"] = [(" ".join(f"w{i}" for i in range(120)), True)] * 24
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    assert not [w for w in ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)["warnings"] if w.startswith(("TERSER", "LENGTH"))]


def test_a_base_that_gives_the_prompt_back_and_stops_is_no_measure_of_length(monkeypatch):
    """A base answer that is the prompt given back (`copies_prompt`), ended by itself, is as short as the prompt: a
    tuned one-liner would pass against it. The reference answer is the measure there too."""
    rows = [dict(r, prompt=f"Please write a detailed guide about wrapping present number {i} neatly with paper and tape")
            for i, r in enumerate(alpaca_rows(24))]
    answers = {"base": [(r["prompt"], True) for r in rows], "tuned": [(ONE_LINER, True)] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    lc = res["summary"]["length_check"]
    assert lc["base_looped"] == 0 and lc["fallback"] == lc["terse"] == 24


def test_a_base_table_of_numbers_cut_by_the_cap_is_not_counted_as_its_first_rows():
    """loop_start folds numbers, so '| 5 | 41 |' and '| 10 | 50 |' are the same words: a conversion table the cap cut
    (380 words, every row different) is a loop from word 57. Such a base answer is no measure (`loop_start` cannot tell
    it from a counting loop): with the reference answer it is judged against the reference, without one it is unknown,
    never 'not terser' against the table's heading. (The loop reading itself is left as it is: the LOOPS warning
    counts such a table as a loop, one prompt at a time.)"""
    from tasks import benchmarks as bench

    table = "Here is a table of Celsius to Fahrenheit conversions:\n\n| Celsius | Fahrenheit |\n|---|---|\n" + "".join(
        f"| {c} | {c * 9 / 5 + 32:g} |\n" for c in range(-40, 400, 5))
    base = " ".join(table.split(" ")[:380]) + "x"  # cut by the cap mid-row
    tuned = " ".join(f"word{i}" for i in range(40))
    lc = bench.length_check([{"text": base, "stopped": False}], [{"text": tuned, "stopped": True}], ev.TERSE_RATIO)
    assert lc["terse"] + lc["unknown"] == 1, lc
    lc = bench.length_check([{"text": base, "stopped": False}], [{"text": tuned, "stopped": True}], ev.TERSE_RATIO, [" ".join(["w"] * 200)])
    assert lc["fallback"] == lc["terse"] == 1, lc


def test_terser_does_not_call_answers_that_never_end_a_short_answer_format(monkeypatch):
    """A healthy base (120 words, ends by itself) against a tuned model that writes 50 words and then repeats a sentence
    to the cap on every prompt: counted up to the loop, every tuned answer is under half the base's, and the TERSER line
    diagnoses a learned short-answer format, the opposite of what happened (the answers never end; LOOPS says so).
    The terse answers that are loops want naming as such (or leaving to LOOPS), not a short-format diagnosis."""
    rows = alpaca_rows(24)
    looping = " ".join(f"step{i}" for i in range(40)) + " " + " ".join(["Let me know if you have any other questions about it."] * 30)
    answers = {"base": [(" ".join(f"w{i}" for i in range(120)), True)] * 24, "tuned": [(looping[:-2], False)] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    warnings = ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)["warnings"]
    assert any(w.startswith("LOOPS") for w in warnings), warnings
    assert not [w for w in warnings if w.startswith("TERSER") and "short-answer format" in w], warnings


@pytest.mark.parametrize("looping, expected", [(3, True), (2, False)])
def test_loops_warning_names_answers_that_repeat_until_the_cap(monkeypatch, looping, expected):
    """Recipe d (2026-12-02): 327 of 805 tuned AlpacaEval answers repeated themselves until the cap while every score
    read better and no warning said so. At 3 of 24 (12.5%) the tuned model gets a LOOPS line naming both shares; at
    2 of 24 (8%) it does not; long answers cut at the cap that do not repeat, and ended answers, are not loops."""
    rows = alpaca_rows(24)
    tuned = [(LOOPING, False)] * looping + [(LONG_UNIQUE, False)] * 5 + [("a short answer that ended", True)] * (19 - looping)
    base = [(LOOPING, False)] * 24
    res, _ = run(monkeypatch, "alpaca_eval", rows, {"base": base, "tuned": tuned}, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24})
    s = res["summary"]
    assert s["loop_share"] == {"base": 1.0, "tuned": round(looping / 24, 4)}
    assert s["answers"]["tuned"]["loop_share"] == round(looping / 24, 4) and s["answers"]["reference"]["loop_share"] == 0.0
    verdict = ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)
    loops = [w for w in verdict["warnings"] if w.startswith("LOOPS")]
    card = ev.benchmark_markdown(
        ev.EvalRecord(key="k", dir="d", eval_json="e", chart_png="c", n_prompts=0, base={}, tuned={}, per_family=[], accuracy_gain=None,
                      gain_ci=None, beats_base=None, seconds=0, benchmarks={"alpaca_eval": s}, verdict=verdict))
    assert f"| loop_share | 1.0 | {round(looping / 24, 4)} | — |" in card  # the references are never cut: no share to give
    # a record made before median_words_loops_cut existed (EVAL_VERSION < 10) shows no row of dashes for it
    old = {**s, "answers": {c: {k: v for k, v in x.items() if k != "median_words_loops_cut"} for c, x in s["answers"].items()}}
    old_card = ev.benchmark_markdown(
        ev.EvalRecord(key="k", dir="d", eval_json="e", chart_png="c", n_prompts=0, base={}, tuned={}, per_family=[], accuracy_gain=None,
                      gain_ci=None, beats_base=None, seconds=0, benchmarks={"alpaca_eval": old}, verdict=verdict))
    assert "| median_words_loops_cut |" in card and "median_words_loops_cut" not in old_card and "| median_words |" in old_card
    if expected:
        assert len(loops) == 1 and loops[0].startswith(f"LOOPS: alpaca_eval: {looping / 24:.0%} of the tuned model's answers") \
            and "base 100%" in loops[0], loops
    else:
        assert loops == []


def test_loops_warning_reads_the_held_out_answers_too():
    summary = {"base": {"loop_share": 0.0}, "tuned": {"loop_share": 0.25}}
    loops = [w for w in ev.make_verdict(summary, None, {}, 0.95)["warnings"] if w.startswith("LOOPS")]
    assert len(loops) == 1 and loops[0].startswith("LOOPS: held-out: 25%") and "base 0%" in loops[0]
    assert not [w for w in ev.make_verdict({"tuned": {"loop_share": 0.05}}, None, {}, 0.95)["warnings"] if w.startswith("LOOPS")]


# ---------------------------------------------------------------------------------------------------------
# Item 10: benchmarks are prompted as the published model is served


SMOL_LIKE_TEMPLATE = (  # like SmolLM2's and Qwen's: a default system turn when the chat has none
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_benchmarks_are_prompted_with_the_published_template(monkeypatch, tiny_tok, tmp_path):
    """data.system_prompt, which training used and the published template adds, must reach the benchmark prompts
    and the reference-loss contexts of base and tuned, token for token as the published tokenizer renders them
    (not the tokenizer's own default system turn)."""
    from transformers import AutoTokenizer

    from tasks.publish import install_system_prompt

    system = "Follow the instruction exactly."
    tiny_tok.save_pretrained(tmp_path / "trained")
    tok = AutoTokenizer.from_pretrained(tmp_path / "trained")
    tok.chat_template = SMOL_LIKE_TEMPLATE  # the template training and stage 5 use
    tok.save_pretrained(tmp_path / "published")
    install_system_prompt(tmp_path / "published", system)  # what publish does to the released tokenizer
    served = AutoTokenizer.from_pretrained(tmp_path / "published")

    def served_ids(prompt: str) -> list[int]:
        return served(served.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]

    rows = alpaca_rows(3, ref_words=5)
    answers = {who: [("an answer", True)] * 3 for who in ("base", "tuned")}
    _, seen = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 3, "tuned": [(1.0, 1)] * 3}, tok=tok, system_prompt=system)
    assert sorted(who for who, _ in seen) == ["base", "tuned"]
    for who, conversations in seen:
        for row, conv in zip(rows, conversations):
            ids = tok(tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            assert ids == served_ids(row["prompt"]), who
            assert "SmolLM" not in tok.decode(ids)

    fed = []  # the reference-loss rows: context (the served prompt) + reference tokens
    monkeypatch.setattr(ev, "row_nll", lambda model, feats, *a, **k: fed.extend(feats) or [(0.0, 1)] * len(feats))
    REAL_REFERENCE_NLL(None, tok, ["question 0"], ["the reference"], 8, 1, "cpu", system)
    ref_ids = tok("the reference", add_special_tokens=False)["input_ids"]
    assert fed[0]["input_ids"] == served_ids("question 0") + ref_ids


# ---------------------------------------------------------------------------------------------------------
# Item 9 (stage-5 half): the verdict says which benchmarks the training data was deduped against


def test_verdict_names_the_benchmarks_the_training_data_was_deduped_against(monkeypatch):
    res, _ = run(monkeypatch, "ifeval", ifeval_rows(4, 1), {"base": [PASS] * 4, "tuned": [PASS] * 4})
    alpaca, _ = run(monkeypatch, "alpaca_eval", alpaca_rows(4), {w: [("a b c", True)] * 4 for w in ("base", "tuned")},
                    {"base": [(1.0, 1)] * 4, "tuned": [(1.0, 1)] * 4})
    dedupe = {"benchmarks": {"ifeval": 541}, "rules": ["exact", "normalized (casefold + whitespace)"], "removed": 3,
              "removed_by": {"ifeval/exact": 3}}
    v = ev.make_verdict({}, None, {"ifeval": res, "alpaca_eval": alpaca}, 0.95, dedupe=dedupe)
    assert ("training data deduped against ifeval (541 prompts) (exact; normalized (casefold + whitespace)): "
            "3 conversations removed") in v["notes"]
    assert [w for w in v["warnings"] if w.startswith("NOT DEDUPED")] == [
        "NOT DEDUPED: alpaca_eval: the training data was not checked against its prompts (data.dedupe); "
        "a gain there may come from training on the test prompts"]
    none = ev.make_verdict({}, None, {"ifeval": res}, 0.95, dedupe={"benchmarks": {}, "rules": [], "removed": 0, "removed_by": {}})
    assert "training data not deduped against any benchmark (data.dedupe: [])" in none["notes"]
    assert any(w.startswith("NOT DEDUPED: ifeval") for w in none["warnings"])


def test_empty_answers_that_run_to_the_cap_are_terse(monkeypatch):
    """A tuned model spending the cap on whitespace reads as empty: terse, even though it never stopped."""
    # (8 prompts: TERSER is not called from fewer judged answers, evaluate.TERSE_MIN_JUDGED)
    answers = {"base": [("one two three four five six", True)] * 8, "tuned": [("", False)] * 8}
    res, _ = run(monkeypatch, "alpaca_eval", alpaca_rows(8), answers, {"base": [(1.0, 1)] * 8, "tuned": [(1.0, 1)] * 8})
    assert any(w.startswith("TERSER:") for w in ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)["warnings"])


def test_a_collapse_to_empty_answers_on_40_percent_of_prompts_is_a_regression(monkeypatch):
    """Cut pairs tie an empty answer with its base at 0 and TERSER needs half the prompts: 40% empty answers went
    unflagged (review of issue 21). The share of non-empty answers is judged by itself (exact McNemar)."""
    rows = alpaca_rows(60, ref_words=60)
    base = [(" ".join(r["reference"].split()[:40]), True) for r in rows]
    tuned = [b if i % 5 >= 2 else ("", True) for i, b in enumerate(base)]
    res, _ = run(monkeypatch, "alpaca_eval", rows, {"base": base, "tuned": tuned}, {"base": [(20.0, 10)] * 60, "tuned": [(20.0, 10)] * 60})
    answered = res["summary"]["metrics"]["answered"]
    assert answered["base"]["value"] == 1.0 and answered["tuned"]["value"] == 0.6 and answered["verdict"] == "worse"
    verdict = ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)
    assert any(w.startswith("AlpacaEval non-empty answers: 100.0% -> 60.0%") for w in verdict["worse"])


def test_references_of_no_tokens_are_unscored_not_a_crash(monkeypatch):
    rows = alpaca_rows(6)
    answers = {"base": [("some answer", True)] * 6, "tuned": [("another answer", True)] * 6}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(0.0, 0)] * 6, "tuned": [(0.0, 0)] * 6})
    assert res["summary"]["metrics"]["reference_loss"]["verdict"] == "unscored"
    ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)  # and the verdict says so instead of dividing by zero


def test_a_base_that_gives_the_prompt_back_is_named_not_credited(monkeypatch):
    """Gemma-3-270M base on CPU (2026-12-01) gave 42 of 48 IFEval prompts back and scored 35% prompt-loose: a copy of a
    prompt without commas passes 'no commas'. The tuned model answered (4 copies) and 'regressed' to 17%. Stage 5 now
    judges 'answers that are not a copy of the prompt' and warns when a model copies on >= 20% of prompts. The warning gives
    the prompt-level score with a copy counted as a failure (setting k on the GPU, 2026-12-04: 129 of the base's 150 passes
    were copies), shown, not judged."""
    from tasks.benchmarks import copies_prompt

    prompt = "Write a short poem about the sea and do not use any commas in your response"
    assert copies_prompt(prompt + "\n\n### Assistant:\n" + prompt, prompt)
    assert copies_prompt("Write a short poem about the sea and do not use", prompt)
    assert not copies_prompt("Yes, that's a good poem about the sea.", prompt)  # a short answer echoing a phrase (review)
    assert not copies_prompt("Waves fold over waves\nthe grey sea breathes in and out\nsalt on every stone", prompt)
    assert not copies_prompt("", prompt) and not copies_prompt("Sea poem", prompt)  # too short to be a copy (non-empty judges it)
    # Asked to repeat the request first (IFEval's combination:repeat_prompt): judged on what follows the repeat.
    from tasks.benchmarks import without_requested_repeat

    request = "Write a short poem about the sea in three lines"
    row = {"instruction_id_list": ["combination:repeat_prompt"], "kwargs": [{"prompt_to_repeat": request}]}
    obeys = request + "\nGrey waves."
    assert copies_prompt(obeys, request + ". First repeat the request word for word without change, then give your answer")
    assert not copies_prompt(without_requested_repeat(obeys, row), request + ". First repeat the request word for word")

    rows = [{"id": str(i), "prompt": f"{prompt} number {i}", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]} for i in range(24)]
    answers = {"base": [(r["prompt"], False) for r in rows[:20]] + [PASS] * 4,  # copies pass 'no commas'
               "tuned": [("Waves fold over waves, the sea breathes", True)] * 12 + [PASS] * 12}
    res, _ = run(monkeypatch, "ifeval", rows, answers)
    m = res["summary"]["metrics"]
    assert m["prompt_loose"]["base"]["value"] == 1.0 and m["prompt_loose"]["verdict"] == "worse"
    assert m["answered"]["base"]["value"] == pytest.approx(4 / 24, abs=1e-4) and m["answered"]["tuned"]["value"] == 1.0
    assert m["answered"]["verdict"] == "better"
    assert res["rows"][0]["base_copies_prompt"] and not res["rows"][0]["tuned_copies_prompt"]
    v = ev.make_verdict({}, None, {"ifeval": res}, 0.95)
    assert any(b.startswith("IFEval answers that are not a copy of the prompt: 16.7% -> 100.0%") for b in v["better"]), v["better"]
    assert [w for w in v["warnings"] if w.startswith("COPIES THE PROMPT")] == [
        "COPIES THE PROMPT: IFEval: the base model gave the prompt back on 83% of prompts; a copy passes rules such as no commas or "
        "word and sentence limits, so its IFEval score counts copies, not answers (read the answers side by side); counting a copy "
        "as a failure, prompt-level loose reads 16.7% (base) -> 50.0% (tuned) on 24 prompts, not judged"]
    assert res["summary"]["prompt_loose_copies_failed"] == {"base": pytest.approx(4 / 24, abs=1e-4), "tuned": 0.5, "n": 24}


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                           pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return Gemma3ForCausalLM(cfg).eval()


def _greedy(model, rows: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Left-padded batched greedy answers, as stage 5 generates them."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    out = model.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    return rows, out[:, width:].tolist()


def test_decode_check_agrees_with_a_sound_decode_and_catches_a_broken_one(monkeypatch):
    """A batched, cached greedy decode re-read by one plain forward: every token agrees when generation is sound; a RoPE
    that is wrong only on one-token steps (what Liger's leaked RoPE did to Gemma-3 in stage 5 on the GPU) shows up."""
    from transformers.models.gemma3 import modeling_gemma3 as g3

    model, rows = _tiny_gemma3(), [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]
    with torch.inference_mode():
        sound = ev.decode_check(model, *_greedy(model, rows), "cpu")
        assert sound == {"tokens": 16, "agree": 16}
        rope = g3.apply_rotary_pos_emb
        monkeypatch.setattr(g3, "apply_rotary_pos_emb", lambda q, k, *a, **kw: tuple(
            t.flip(0) if t.shape[2] == 1 else t for t in rope(q, k, *a, **kw)))
        prompts, answers = _greedy(model, rows)
        monkeypatch.setattr(g3, "apply_rotary_pos_emb", rope)
        broken = ev.decode_check(model, prompts, answers, "cpu")
    assert broken["tokens"] == 16 and broken["agree"] < ev.DECODE_WARN * 16


def test_verdict_says_generation_broken_and_notes_the_decode_check():
    summary = {"base": {"decode_check": {"tokens": 100, "agree": 100}}, "tuned": {"decode_check": {"tokens": 100, "agree": 99}}}
    bench = {"ifeval": {"summary": {"metrics": {}, "decode_check": {"base": {"tokens": 50, "agree": 20}, "tuned": {"tokens": 50, "agree": 50}}}}}
    v = ev.make_verdict(summary, None, bench, 0.95)
    assert v["warnings"] == [w for w in v["warnings"] if w.startswith("GENERATION BROKEN: ifeval, base: only 20 of 50 ")] and len(v["warnings"]) == 1
    assert "decode check: 269 of 300 greedy answer tokens (89.7%) from 4 generation passes" in v["notes"][0]
    assert not ev.make_verdict({"base": {"decode_check": {"tokens": 100, "agree": 95}}}, None, {}, 0.95)["warnings"]


def test_base_answers_are_generated_once_then_reused_by_a_retrained_adapter(monkeypatch, tmp_path):
    """The base side of a benchmark does not depend on the adapter: the second run (a new adapter on the same base)
    reads the base's answers, reference losses and decode check back instead of generating them again."""
    rows, cache = alpaca_rows(8), tmp_path / "eval-base" / "k"
    first = {"base": [("base answer", False)] * 8, "tuned": [("tuned answer", True)] * 8}
    nll = {"base": [(2.0, 1)] * 8, "tuned": [(1.0, 1)] * 8}
    said = []
    res1, seen1 = run(monkeypatch, "alpaca_eval", rows, first, nll, base_cache=cache)
    assert [who for who, _ in seen1] == ["base", "tuned"] and (cache / "COMPLETE").is_file()
    second = {"base": [("never generated", True)] * 8, "tuned": [("another adapter", True)] * 8}
    res2, seen2 = run(monkeypatch, "alpaca_eval", rows, second, {"base": [(9.0, 1)] * 8, "tuned": [(1.5, 1)] * 8}, base_cache=cache,
                      log_fn=said.append)
    assert [who for who, _ in seen2] == ["tuned"]  # the base was not asked again
    assert [r["base"] for r in res2["rows"]] == ["base answer"] * 8 and res2["summary"]["metrics"]["reference_loss"]["base"]["value"] == 2.0
    assert [r["tuned"] for r in res2["rows"]] == ["another adapter"] * 8
    assert any("base model's answers reused" in m for m in said)
    assert res1["summary"]["base_reused"] is None and res2["summary"]["base_reused"] == "k"


def test_the_bar_counts_a_base_side_generated_again_and_not_one_reused(monkeypatch, tmp_path):
    """Stage 5's bar plans its total before any generation (issue 20 item 5): a base side cached then is left out; one
    whose cache cannot be read back is generated after all and adds itself; one the plan counted but that is reused
    (another run wrote it meanwhile) takes itself out. Each way the bar ends at its total."""
    rows, cache = alpaca_rows(8), tmp_path / "eval-base" / "k"
    answers = {"base": [("base answer", False)] * 8, "tuned": [("tuned answer", True)] * 8}
    nll = {"base": [(2.0, 1)] * 8, "tuned": [(1.0, 1)] * 8}
    suites = {"alpaca_eval": {"rows": rows, "subset": {"max_new_tokens": 96}}}
    side = 8 * 96

    def bar_after(plan_cache, *, unreadable: bool = False):
        bar = ev.EvalBar(ev.plan_generation(0, 1, suites, {"alpaca_eval": plan_cache}))
        if unreadable:
            (cache / "base.json").write_text("{not json")
        run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, bar=bar)
        bar.close()
        return bar.bar.n, bar.bar.total

    assert bar_after(cache) == (2 * side, 2 * side)  # nothing cached yet: both sides generated
    assert bar_after(cache) == (side, side)  # the base side read back: not counted
    assert bar_after(cache, unreadable=True) == (2 * side, 2 * side)  # planned as cached, generated again
    assert bar_after(tmp_path / "not-yet") == (side, side)  # planned as generated, reused


class CharTok:
    """A tokenizer stand-in: one id per character, the chat template a prefix (`head`)."""

    pad_token_id = 0

    def __init__(self, head: str = "U: "):
        self.head = head

    def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=True):
        return "".join(f"{m['role']}|{m['content']}" for m in conv).replace("user|", self.head) + "\nA: "

    def __call__(self, text, add_special_tokens=False):
        ids = lambda t: [ord(c) for c in t]  # noqa: E731
        return {"input_ids": [ids(t) for t in text] if isinstance(text, list) else ids(text)}


def test_base_answers_key_follows_what_the_base_side_depends_on(monkeypatch, tmp_path):
    from tasks.config import load_config
    from tasks.data import DataRecord

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}"])
    data = DataRecord.model_construct(model_fingerprint="m", chat_template_hash="t", stop_token_ids=[1], key="data-a")
    suite = {"name": "alpaca_eval", "rows": alpaca_rows(4), "provenance": {"sha256": "s"}, "subset": {"n": 4, "seed": 0, "max_new_tokens": 8}}
    key = lambda d=data, c=cfg, s=suite, sp=None, tok=CharTok(): ev.base_answers_key(d, c.model, c.quant, c.eval, s, "cpu", sp, tok)  # noqa: E731
    same = key()
    assert key(d=data.model_copy(update={"key": "data-b", "chat_template_hash": "other"})) == same  # other data, other adapter
    assert key(tok=CharTok(head="User: ")) != same  # the ids generation is fed, whatever code rendered them
    assert key(d=data.model_copy(update={"stop_token_ids": [1, 2]})) != same
    assert key(d=data.model_copy(update={"model_fingerprint": "m2"})) != same
    assert key(s={**suite, "subset": {**suite["subset"], "max_new_tokens": 16}}) != same
    assert key(s={**suite, "provenance": {"sha256": "s2"}}) != same
    assert key(s={**suite, "rows": [{**r, "reference": "Sure. " + r["reference"]} for r in suite["rows"]]}) != same
    assert key(sp="Be brief.") != same
    assert key(c=load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}", "quant.load_in_4bit=false"])) != same
    # what stage 5 reports from the answers (EVAL_VERSION 8: loop_share, LOOPS) re-runs the stage, not the base's side
    monkeypatch.setattr(ev, "EVAL_VERSION", ev.EVAL_VERSION + 1)
    assert key() == same
    monkeypatch.setattr(ev, "BASE_ANSWERS_VERSION", ev.BASE_ANSWERS_VERSION + 1)
    assert key() != same


def test_a_broken_or_unreadable_base_side_is_generated_again(monkeypatch, tmp_path):
    """A base side whose decode check failed is never kept (a fixed run would reuse the broken answers); a cache file
    that cannot be read, or is not of these prompts, is generated again, not a failing stage."""
    rows, cache = alpaca_rows(8), tmp_path / "eval-base" / "k"
    nll = {"base": [(2.0, 1)] * 8, "tuned": [(1.0, 1)] * 8}
    answers = {"base": [("base answer", False)] * 8, "tuned": [("tuned answer", True)] * 8}
    broken = {"base": {"tokens": 40, "agree": 10}, "tuned": {"tokens": 40, "agree": 40}}
    run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, checks=broken)
    assert not (cache / "COMPLETE").is_file()
    run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache)
    assert (cache / "COMPLETE").is_file()
    for bad in ("{not json", json.dumps({"gens": [{"text": "x", "stopped": True}], "check": {}, "nll": [[1.0, 1]]})):
        (cache / "base.json").write_text(bad)
        said = []
        res, seen = run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, log_fn=said.append)
        assert [who for who, _ in seen] == ["base", "tuned"] and any("holds no usable base answers" in x for x in said)
        assert res["summary"]["base_reused"] is None and len(json.loads((cache / "base.json").read_text())["gens"]) == 8


def test_stage5_decoding_is_greedy_whatever_the_models_generation_config(tiny_cfg, tiny_tok, shared_artifacts):
    """A Hub model's generation_config.json may carry a repetition penalty or an n-gram ban (Qwen2.5-Instruct ships
    repetition_penalty 1.05): transformers applies it to any argument left unset, so 'greedy' was not greedy, and the
    decode check disagreed with the plain forward."""
    from tasks.models import load_base_model, resolve_model

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    model = load_base_model(ref, tiny_cfg.model, tiny_cfg.quant, "cpu").eval()
    convs = [[{"role": "user", "content": text}] for text in ("Say hello.", "Count to five, please.", "Name a colour.")]
    stops = [tiny_tok.eos_token_id]
    with torch.inference_mode():
        plain = ev.generate(model, tiny_tok, convs, stops, 24, 4, "cpu")
        model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 1.8, 2
        check: dict = {}
        again = ev.generate(model, tiny_tok, convs, stops, 24, 4, "cpu", check)
    assert again == plain and check["tokens"] > 0 and check["agree"] == check["tokens"]


def test_the_evaluate_bar_draws_twice_a_minute_off_a_terminal_and_closes_on_an_error(monkeypatch):
    """Stage 5's bar off a terminal (Prefect's log, CI, `make run > log`): a draw every 30 s, when a part starts and when
    it closes, not tqdm's ~10 a second. As a context manager it closes when the work inside raises, so the error is
    printed on a line of its own (and no half-drawn bar stays registered to push the next one down a line)."""
    import io
    import sys

    from helpers import TtyStream, tqdm_clock

    clock = tqdm_clock(monkeypatch)

    def two_minutes_of_batches(stream: io.StringIO) -> str:
        monkeypatch.setattr(sys, "stderr", stream)
        bar = ev.EvalBar({"held-out base": 240 * 64})
        update = bar.part("held-out base", 240 * 64)
        for _ in range(240):  # a batch every 0.5 s
            clock[0] += 0.5
            update(64)
        bar.close()
        return stream.getvalue()

    log = two_minutes_of_batches(io.StringIO())
    assert 4 <= log.count("\r") <= 8, log  # start, the part's name, every 30 s, the close
    assert log.endswith("15,360/15,360 tokens of the caps [02:00<00:00]\n"), log[-200:]
    assert two_minutes_of_batches(TtyStream()).count("\r") > 200  # a terminal keeps tqdm's rate

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with pytest.raises(RuntimeError, match="out of memory"):
        with ev.EvalBar({"ifeval tuned": 100}) as bar:
            bar.part("ifeval tuned", 100)(10)
            raise RuntimeError("CUDA out of memory")
    assert bar.bar.disable and stream.getvalue().endswith("\n")  # closed: tqdm disables a bar it closed


# Review of 90ea15f (the length check after review), 2026-12-07, second round: what it still gets wrong.
def _length_lines(res: dict) -> list[str]:
    return [w for w in ev.make_verdict({}, None, {"alpaca_eval": res}, 0.95)["warnings"] if w.startswith(("TERSER", "LENGTH"))]


def test_terser_does_not_set_a_longer_tuned_median_against_a_base_median_that_was_not_the_measure(monkeypatch):
    """Gemma-3-270M base loops on 802 of 805 AlpacaEval prompts, 19 words before the loop at the median; q3 re-scored
    reads 'TERSER: tuned median answer ... is 155 words vs base 19 (each cut where its loop begins); on 353 of 695
    prompts ... the tuned answer is under 50% of the base's length (the reference answer's where ...)'. A reader sees a
    tuned model eight times longer than the base called terser than it: the headline's 'base' is the median of answers
    that were no measure; the measure (the references, 347 words at the median) only in a parenthesis."""
    import re
    rows = alpaca_rows(24)
    answers = {"base": [(LOOPING, False)] * 24, "tuned": [(" ".join(f"word{i}" for i in range(40)), True)] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    (line,) = _length_lines(res)
    assert line.startswith("TERSER:"), line
    m = re.search(r"is (\d+) words vs base (\d+)", line)
    assert m is None or int(m[1]) < int(m[2]), line


def test_terser_tuned_median_is_over_the_answers_it_judged(monkeypatch):
    """Half the tuned answers say two words and loop (left to LOOPS, not judged), half end at 40 words against a
    120-word base: TERSER on 12 of 12 prompts whose tuned answer does not loop, but 'tuned median answer ... is 21
    words' (the median of 2s and 40s) describes no answer that was judged; the judged ones are 40 words."""
    rows = alpaca_rows(24)
    loop2 = ("Measure it. " + " ".join(["Measure it."] * 40), False)
    answers = {"base": [(" ".join(f"w{i}" for i in range(120)), True)] * 24,
               "tuned": [loop2] * 12 + [(" ".join(f"word{i}" for i in range(40)), True)] * 12}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    lc = res["summary"]["length_check"]
    assert lc["tuned_looped"] == 12 and lc["judged"] == lc["terse"] == 12, lc
    (line,) = _length_lines(res)
    assert line.startswith("TERSER:") and "on 12 of 12 prompts whose tuned answer does not loop" in line, line
    assert "21 words" not in line, line  # the judged answers' median is 40


def test_a_base_that_repeats_the_prompt_then_answers_is_measured_by_its_answer(monkeypatch):
    """copies_prompt needs 70% of the base's trigrams in the prompt; a base that repeats a 40-word prompt and then answers
    it in 30 words (56%) is an answer, measured whole: 70 words. A tuned model that gives the same 30-word answer
    without the repeat is 'under 50% of the base's length' on every prompt and reads TERSER, a learned short-answer
    format, though it says exactly what the base said."""
    rows = [dict(r, prompt=" ".join(f"p{i}x{j}" for j in range(40))) for i, r in enumerate(alpaca_rows(24))]
    answer = [" ".join(f"a{i}y{j}" for j in range(30)) for i in range(24)]
    answers = {"base": [(r["prompt"] + "\n\n" + a, True) for r, a in zip(rows, answer)], "tuned": [(a, True) for a in answer]}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    assert not [w for w in _length_lines(res) if w.startswith("TERSER")], _length_lines(res)


def test_terser_is_not_diagnosed_from_one_judged_prompt(monkeypatch):
    """23 of 24 tuned answers loop (LOOPS says so); the one that ends is short. TERSER reads 'on 1 of 1 prompts whose
    tuned answer does not loop ... the model may have learned a short-answer format': a diagnosis of the model from one
    answer, beside a LOOPS line that says the opposite (answers that never end)."""
    rows = alpaca_rows(24)
    answers = {"base": [(" ".join(f"w{i}" for i in range(120)), True)] * 24,
               "tuned": [(LOOPING, False)] * 23 + [(" ".join(f"word{i}" for i in range(10)), True)]}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    assert res["summary"]["length_check"]["judged"] == 1
    assert not [w for w in _length_lines(res) if "short-answer format" in w], _length_lines(res)


def test_the_model_card_shows_the_length_checks_counts(monkeypatch):
    """q4 re-scored: 342 of 694 judged tuned answers are under half a helpful length, one short of the TERSER line; the
    card (benchmark_markdown) shows the medians but not this count, nor how many prompts were judged against the
    reference instead of the base, so a reader cannot see the near miss or what was measured."""
    rows = alpaca_rows(24)
    answers = {"base": [(LOOPING, False)] * 24,
               "tuned": [(" ".join(f"word{i}" for i in range(40)), True)] * 11 + [(" ".join(f"word{i}" for i in range(100)), True)] * 13}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=512)
    lc = res["summary"]["length_check"]
    assert lc["terse"] == 11 and lc["judged"] == lc["fallback"] == 24 and not _length_lines(res)
    card = ev.benchmark_markdown(ev.EvalRecord(key="k", dir="d", eval_json="e", chart_png="c", n_prompts=0, base={}, tuned={}, per_family=[], accuracy_gain=None,
                                               gain_ci=None, beats_base=None, seconds=0, benchmarks={"alpaca_eval": res["summary"]}, verdict={}))
    assert "11 of 24" in card, card


def test_a_tuned_answer_cut_by_the_cap_is_not_terse_against_the_reference(monkeypatch):
    """Where the base loops, the tuned answer is measured against the prompt's reference (150 words here; AlpacaEval's
    median 347). At the CPU demo's cap (96 tokens, ~70 words) a tuned model that writes on until the cap cuts it is 'under
    50% of the base's length' on every prompt and reads TERSER, 'a learned short-answer format', the opposite of what it
    did; its length is a floor, as a cut base answer's is (`unknown`, LENGTH NOT JUDGED: raise the cap). Stored run
    cpu-gemma-base-2026-12-01 re-scored: 4 of its 20 terse prompts are tuned answers the cap cut (showcase-c: 17 of 258)."""
    rows = alpaca_rows(24)
    answers = {"base": [(LOOPING, False)] * 24, "tuned": [(" ".join(f"word{i}" for i in range(70)), False)] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=96)
    lc = res["summary"]["length_check"]
    assert lc["tuned_looped"] == 0 and lc["tuned_capped"] == lc["fallback"] == 24, lc
    assert not [w for w in _length_lines(res) if w.startswith("TERSER")], _length_lines(res)


def test_length_not_judged_says_a_floor_only_of_answers_the_cap_cut(monkeypatch):
    """Half the base answers loop (12 words before the loop), half the cap cut without a loop at 70 words; the tuned model
    ends every answer at 100 words. The 12 cut ones are unknown (half of 24: LENGTH NOT JUDGED), and the line says 'base
    median 41 words is a floor': 41 is the median of 12s and 70s, no answer's length and no floor of one; the floor the
    line means is the cut answers' (70)."""
    rows = alpaca_rows(24)
    answers = {"base": [(LOOPING, False)] * 12 + [(" ".join(f"w{i}" for i in range(70)), False)] * 12,
               "tuned": [(" ".join(f"word{i}" for i in range(100)), True)] * 24}
    res, _ = run(monkeypatch, "alpaca_eval", rows, answers, {"base": [(1.0, 1)] * 24, "tuned": [(1.0, 1)] * 24}, cap=96)
    lc = res["summary"]["length_check"]
    assert lc["base_cut"] == lc["unknown"] == 12 and lc["terse"] == 0, lc
    (line,) = _length_lines(res)
    assert line.startswith("LENGTH NOT JUDGED: 12 of 24 base answers were cut at the 96-token cap without a loop"), line
    assert "base median 41 words" not in line, line
