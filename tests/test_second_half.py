"""Stages 5-7 on the tiny model: evaluation statistics, merge equivalence and idempotence, publish atomicity
and the model card; the published adapter loads with the seed's AutoPeftModelForCausalLM snippet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.data import load_dataset_records
from tasks.evaluate import evaluate_heldout, paired_bootstrap, wilson
from tasks.merge import merge_adapter
from tasks.probe import probe_throughput
from tasks.profile import profile_lengths
from tasks.publish import MANIFEST, is_published, publish_artifacts
from tasks.train import train_adapter


@pytest.fixture(scope="module")
def trained(tiny_cfg, shared_artifacts):
    cfg, art = tiny_cfg, shared_artifacts
    data = load_dataset_records(cfg.data, cfg.model, art)
    prof = profile_lengths(data, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    return {"data": data, "profile": prof, "probe": probe, "train": train}


def test_wilson_interval_known_values():
    lo, hi = wilson(50, 100)
    assert abs(lo - 0.4038) < 1e-3 and abs(hi - 0.5962) < 1e-3
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson(10, 10)[1] == pytest.approx(1.0)


def test_paired_bootstrap_brackets_the_difference():
    base = [False] * 80 + [True] * 20
    tuned = [True] * 70 + [False] * 30
    lo, hi = paired_bootstrap(base, tuned)
    assert lo < 0.5 < hi and lo > 0.3


def test_evaluate_reports_base_and_tuned_side_by_side(trained, tiny_cfg, shared_artifacts):
    rec = evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, tiny_cfg.eval, "cpu", shared_artifacts)
    assert rec.n_prompts == tiny_cfg.eval.max_prompts
    for s in (rec.base, rec.tuned):
        assert {"loss", "perplexity", "accuracy", "ci", "eos_share", "limit_share"} <= set(s)
        assert abs(s["eos_share"] + s["limit_share"] - 1) < 1e-9
    assert rec.tuned["loss"] < rec.base["loss"]  # trained on the same task distribution
    assert len(rec.per_family) >= 10
    report = json.loads(Path(rec.eval_json).read_text())
    # Every scored prompt's sample is stored (eval.samples only picks how many the report shows: not in the cache key).
    assert len(report["samples"]) == rec.n_prompts and {"base", "tuned", "expected"} <= set(report["samples"][0])
    assert Path(rec.chart_png).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_shows_one_bar_that_reaches_its_planned_generation_work(trained, tiny_cfg, tmp_path, capfd, monkeypatch):
    """Stage 5 ran minutes with no bar (issue 20 item 5): one tqdm bar on stderr, its total every part's answers x
    token cap (held-out and each benchmark, base and tuned), named part by part (loss passes too), ending at that
    total. A rerun that reuses the base's benchmark answers leaves them out of the total. Another rank than 0 shows
    none, and the stage's outputs are the same with the bar or without it."""
    ev = tiny_cfg.eval
    run = lambda e, art: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(art))  # noqa: E731
    first = run(ev, tmp_path / "a")
    err = capfd.readouterr().err
    caps = {b: ev.benchmark_prompts[b] * ev.benchmark_max_new_tokens[b] for b in ev.benchmarks}
    total = 2 * (first.n_prompts * ev.max_new_tokens + sum(caps.values()))
    assert f"{total}/{total} tokens of the caps" in err and err.count(f"/{total} tokens") >= 3  # updated along the way
    for part in ["held-out base", "held-out tuned"] + [f"{b} {who}" for b in ev.benchmarks for who in ("base", "tuned")]:
        assert f"evaluate: {part}:" in err
    assert "evaluate: held-out base loss:" in err and "evaluate: alpaca_eval tuned reference loss:" in err  # named, not counted
    # fewer held-out prompts re-run the stage, not the base's benchmark answers: their parts generate nothing and are not counted
    fewer = ev.max_prompts - 4
    second = run(ev.model_copy(update={"max_prompts": fewer}), tmp_path / "a")
    err = capfd.readouterr().err
    rest = 2 * fewer * ev.max_new_tokens + sum(caps.values())
    assert f"{rest}/{rest} tokens of the caps" in err and "ifeval base" not in err and "alpaca_eval base" not in err
    assert all(second.benchmarks[b]["base_reused"] for b in ev.benchmarks)

    monkeypatch.setenv("RANK", "1")
    quiet = run(ev, tmp_path / "b")
    assert "tokens of the caps" not in capfd.readouterr().err
    where = ("dir", "eval_json", "chart_png", "seconds", "benchmarks")  # paths and clocks; the benchmarks less their clocks below
    drop = lambda d: {k: v for k, v in d.items() if k not in where}  # noqa: E731
    timeless = lambda r: {k: {m: v for m, v in s.items() if m != "seconds"} for k, s in r.benchmarks.items()}  # noqa: E731
    assert drop(first.model_dump(mode="json")) == drop(quiet.model_dump(mode="json")) and timeless(first) == timeless(quiet)
    assert drop(json.loads(Path(first.eval_json).read_text())) == drop(json.loads(Path(quiet.eval_json).read_text()))  # answers, rows, samples
    assert sorted(p.name for p in Path(first.dir).iterdir()) == sorted(p.name for p in Path(quiet.dir).iterdir())


def test_evaluate_closes_its_bar_when_a_pass_fails(trained, tiny_cfg, tmp_path, capfd, monkeypatch):
    """A pass that raises (out of memory, a broken benchmark row) left stage 5's bar open: the error printed after a
    half-drawn bar, and the next bar drew a line lower. It is closed on the way out."""
    from tqdm import tqdm

    from tasks import evaluate

    def generate_fails(*a, **k):
        raise RuntimeError("CUDA out of memory (stand-in)")

    monkeypatch.setattr(evaluate, "generate", generate_fails)
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="stand-in") as raised:
        evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, tiny_cfg.eval, "cpu", str(tmp_path))
    assert raised.value is not None and not [b for b in list(tqdm._instances) if str(b.desc).startswith("evaluate")]
    err = capfd.readouterr().err
    assert "evaluate: held-out base loss" in err and err[err.rindex("evaluate:"):].endswith("\n"), err[-300:]


def _taken_away(monkeypatch):
    """Stage 5's `generate`, put in its place for a test: each call is noted in its `calls` ("generate"), and the
    `stop_at`-th (counted from 1; None, as made: none) raises as if the machine were taken away mid-stage (a crash, a
    killed job), so a test can stop a run partway and rerun it. A function, not a callable object: stage 5 reads the
    source of what it calls (its passes' key)."""
    from tasks import evaluate

    real = evaluate.generate

    def generate(*a, **k):
        generate.calls.append("generate")
        if generate.calls.count("generate") == generate.stop_at:
            raise RuntimeError("machine taken away (stand-in)")
        return real(*a, **k)

    generate.calls, generate.stop_at = [], None
    monkeypatch.setattr(evaluate, "generate", generate)
    return generate


def test_evaluate_stopped_partway_redoes_only_the_passes_it_had_not_finished(trained, tiny_cfg, tmp_path, capfd, monkeypatch):
    """Stage 5 is the longest stage on a GPU (7-10 min for the showcase): a run stopped in its fifth pass (a crash, a
    killed job, a machine taken away) generated everything again on the rerun. Each finished pass is kept under the
    key of what makes it (`passes_key`) and read back: the rerun generates only the passes left, its bar counts only
    those, its record equals an uninterrupted run's, and the passes stay, marked complete, once the record is written
    (a run at another eval.confidence reads them: test_a_new_confidence_...)."""
    from tasks import evaluate

    ev = tiny_cfg.eval
    run = lambda art: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, ev, "cpu", str(art))  # noqa: E731
    ref = run(tmp_path / "ref")
    real_row_nll = evaluate.row_nll
    generate = _taken_away(monkeypatch)
    calls = generate.calls

    def row_nll(*a, **k):
        calls.append("row_nll")
        return real_row_nll(*a, **k)

    monkeypatch.setattr(evaluate, "row_nll", row_nll)
    # passes in order: held-out base, held-out tuned (a loss pass and a generation each), ifeval base, ifeval tuned,
    # alpaca_eval base: stopped there
    generate.stop_at = 5
    with pytest.raises(RuntimeError, match="stand-in"):
        run(tmp_path / "cut")
    assert len(calls) == 7 and calls.count("generate") == 5
    calls.clear()
    generate.stop_at = None
    capfd.readouterr()
    logs = []
    got = evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, ev, "cpu", str(tmp_path / "cut"), logs.append)
    # alpaca_eval's base and tuned sides only (each a generation and its reference loss); no held-out pass
    assert calls == ["generate", "row_nll"] * 2
    rest = 2 * ev.benchmark_prompts["alpaca_eval"] * ev.benchmark_max_new_tokens["alpaca_eval"]
    assert f"{rest}/{rest} tokens of the caps" in capfd.readouterr().err
    said = [m for m in logs if "reused from this stage's saved pass" in m]
    assert len(said) == 4 and any("held-out tuned" in m for m in said) and any("ifeval: the tuned model" in m for m in said)
    # the base side too is read from the passes, first: its base cache (written beside it) is not needed
    assert any("ifeval: the base model's" in m for m in said) and not any("reused from an earlier run" in m for m in logs)
    where = ("dir", "eval_json", "chart_png", "seconds", "benchmarks")
    drop = lambda d: {k: v for k, v in d.items() if k not in where}  # noqa: E731
    timeless = lambda r: {k: {m: v for m, v in s.items() if m not in ("seconds", "base_reused")} for k, s in r.benchmarks.items()}  # noqa: E731
    assert drop(got.model_dump(mode="json")) == drop(ref.model_dump(mode="json")) and timeless(got) == timeless(ref)
    assert drop(json.loads(Path(got.eval_json).read_text())) == drop(json.loads(Path(ref.eval_json).read_text()))
    assert not any("is not used" in m for m in logs), logs
    for art in ("cut", "ref"):
        [kept] = (tmp_path / art).glob("cache/eval-parts/*")
        assert sorted(p.name for p in kept.iterdir()) == sorted(["COMPLETE", "PARTS", "held-out-base.json", "held-out-tuned.json"]
                                                                 + [f"{b}-{who}.json" for b in ev.benchmarks for who in ("base", "tuned")])


def test_an_unusable_saved_held_out_pass_is_named_with_why_before_it_is_generated_again(trained, tiny_cfg, tmp_path, monkeypatch):
    """A held-out pass saved by a run stopped partway that cannot be used (here one answer short, as a folder copied in
    from another run or a file edited by hand can be) was generated again without a word. One line says which saved
    pass is not used, why, and that it is generated again; the usable one beside it is read back."""
    generate = _taken_away(monkeypatch)
    run = lambda **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, tiny_cfg.eval, "cpu", str(tmp_path), **kw)  # noqa: E731
    generate.stop_at = 3  # held-out base and tuned saved, stopped in ifeval's base side
    with pytest.raises(RuntimeError, match="stand-in"):
        run()
    [part] = tmp_path.glob("cache/eval-parts/*/held-out-tuned.json")
    saved = json.loads(part.read_text())
    part.write_text(json.dumps({**saved, "gens": saved["gens"][:-1]}))  # one answer short
    generate.stop_at = None
    logs = []
    run(log_fn=logs.append)
    said = [m for m in logs if "held-out" in m and ("not used" in m or "reused" in m)]
    n = tiny_cfg.eval.max_prompts
    assert said == [f"evaluate: held-out base: answers and losses reused from this stage's saved pass ({part.parent})",
                    f"evaluate: held-out tuned: the saved pass {part} is not used ({n - 1} answers where this pass has {n} prompts); "
                    "generating it again"], logs
    assert len(json.loads(part.read_text())["gens"]) == n


def test_a_new_confidence_recomputes_the_statistics_from_the_saved_answers(trained, tiny_cfg, tmp_path, monkeypatch):
    """eval.confidence only sets the level of the intervals and of the tests' thresholds, yet a new value generated the
    held-out passes and the tuned model's benchmark answers again (only the base's benchmark answers were cached). It
    now recomputes the record from the answers the first run saved, loading no model and generating nothing, and that
    record is the one a fresh run at the new level gives."""
    from tasks import evaluate

    run = lambda e, art, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(art), **kw)  # noqa: E731
    at95, at90 = tiny_cfg.eval, tiny_cfg.eval.model_copy(update={"confidence": 0.9})
    first = run(at95, tmp_path / "a")
    fresh = run(at90, tmp_path / "b")

    def refuse(*a, **k):
        raise AssertionError("a new eval.confidence loaded the model or generated")

    # The passes are keyed on the generating code's source (`answer_code`): the stand-ins below only refuse to be
    # called, the code is the one that made the passes, so its fingerprint stays as it was.
    code = evaluate.answer_code()
    monkeypatch.setattr(evaluate, "answer_code", lambda: code)
    for name in ("load_base_model", "generate", "row_nll", "reference_nll"):
        monkeypatch.setattr(evaluate, name, refuse)
    logs = []
    again = run(at90, tmp_path / "a", log_fn=logs.append)
    assert again.key != first.key and again.key == fresh.key  # a record of its own, the one a run at 0.9 has
    assert any("statistics computed at confidence 0.9 without loading the model" in m for m in logs), logs
    where = ("dir", "eval_json", "chart_png", "seconds", "benchmarks")
    drop = lambda d: {k: v for k, v in d.items() if k not in where}  # noqa: E731
    timeless = lambda r: {k: {m: v for m, v in s.items() if m not in ("seconds", "base_reused")} for k, s in r.benchmarks.items()}  # noqa: E731
    assert drop(again.model_dump(mode="json")) == drop(fresh.model_dump(mode="json")) and timeless(again) == timeless(fresh)
    assert drop(json.loads(Path(again.eval_json).read_text())) == drop(json.loads(Path(fresh.eval_json).read_text()))
    width = lambda r: r.base["ci"][1] - r.base["ci"][0]  # noqa: E731
    assert width(again) < width(first) and again.verdict["lines"] != first.verdict["lines"]


@pytest.mark.parametrize("gone", ["eval-base cleared", "base key moved"])
def test_a_new_confidence_reads_a_base_side_that_came_from_the_base_cache_from_the_saved_passes(trained, tiny_cfg, tmp_path, monkeypatch, gone):
    """A benchmark's base side read from the base's cache (every adapter after the first on one base, or a run after one
    with other eval.max_prompts) was not saved into the passes, yet they were marked complete: a run at another
    eval.confidence then needed that cache under today's `base_answers_key`, and where it was gone (cleared, or its key
    moved: BASE_ANSWERS_VERSION, the source of `generate`) it loaded the model and generated the base side again, to be
    paired with the tuned answers of the first run. The base side is now saved into the passes whatever its origin and
    read from them first: the rerun loads no model and scores the very answers the first record scored. A cache that
    was cleared is written again from the pass (the pass was made under its key); a moved key is not (another key)."""
    import shutil

    from tasks import evaluate

    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    ev16 = tiny_cfg.eval
    ev12 = ev16.model_copy(update={"max_prompts": ev16.max_prompts - 4})
    run(ev16)  # makes the base caches
    second = run(ev12)  # another record and passes; its benchmark base sides come from the base cache
    assert all(second.benchmarks[b]["base_reused"] for b in ev16.benchmarks)
    caches = sorted(p.name for p in tmp_path.glob("cache/eval-base/*"))
    if gone == "eval-base cleared":
        shutil.rmtree(tmp_path / "cache" / "eval-base")
    else:
        monkeypatch.setattr(evaluate, "BASE_ANSWERS_VERSION", evaluate.BASE_ANSWERS_VERSION + 1)

    def refuse(*a, **k):  # the model's loading only: replacing generate would move the base key by itself (its source)
        raise AssertionError("a statistics-only rerun loaded the model")

    monkeypatch.setattr(evaluate, "load_base_model", refuse)
    logs = []
    again = run(ev12.model_copy(update={"confidence": 0.9}), log_fn=logs.append)
    assert any("without loading the model" in m for m in logs), logs
    assert again.tuned == {**second.tuned, "ci": again.tuned["ci"]}
    read = lambda r: {k: json.loads(Path(r.eval_json).read_text())[k] for k in ("generations", "benchmark_rows")}  # noqa: E731
    answers = lambda rows: {b: [{k: v for k, v in d.items() if k in ("id", "base", "tuned")} for d in r] for b, r in rows.items()}  # noqa: E731
    assert read(again)["generations"] == read(second)["generations"]
    assert answers(read(again)["benchmark_rows"]) == answers(read(second)["benchmark_rows"])
    assert {b: again.benchmarks[b]["base_reused"] for b in ev16.benchmarks} == {b: second.benchmarks[b]["base_reused"] for b in ev16.benchmarks}
    recached = [m for m in logs if "cached again in" in m]
    if gone == "eval-base cleared":
        assert len(recached) == 2 and sorted(p.name for p in tmp_path.glob("cache/eval-base/*")) == caches, logs
    else:
        assert recached == [] and sorted(p.name for p in tmp_path.glob("cache/eval-base/*")) == caches


@pytest.mark.parametrize("when", ["partial folder", "complete folder"])
def test_a_saved_pass_whose_bytes_changed_since_it_was_saved_is_generated_again_with_a_line_naming_it(trained, tiny_cfg, tmp_path, monkeypatch, when):
    """The saved passes (cache/eval-parts/) were listed nowhere: their COMPLETE marker was a timestamp, and a part file
    edited by hand with its shape kept (other answers, the same count) was read back as the model's answers (one cut
    short is unreadable: generated again, as before). Each part
    is listed with its size and sha256 as it is saved (PARTS; the COMPLETE marker too, once every pass is in, as stages
    1-6 mark theirs): one that differs is generated again, with one line naming the file, and listed anew."""
    generate = _taken_away(monkeypatch)
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    stop_at = generate.stop_at = 3 if when.startswith("partial") else None  # partial: held-out base and tuned saved, stopped in ifeval's base side
    if stop_at:
        with pytest.raises(RuntimeError, match="stand-in"):
            run(tiny_cfg.eval)
    else:
        run(tiny_cfg.eval)
    [part] = tmp_path.glob("cache/eval-parts/*/held-out-tuned.json")
    assert (part.parent / "COMPLETE").is_file() == (stop_at is None)
    made = part.read_bytes()
    saved = json.loads(made)
    gen = next(g for g in saved["gens"] if g["text"][:1].isascii() and g["text"][:1].isalnum())
    gen["text"] = ("Z" if gen["text"][0] != "Z" else "Y") + gen["text"][1:]  # another answer, the same shape and size:
    part.write_text(json.dumps(saved, indent=2, sort_keys=True))               # it was read back as the model's
    assert part.stat().st_size == len(made)
    why = f"file held-out-tuned.json has other bytes than when {'PARTS' if stop_at else 'COMPLETE'} listed it (changed in place)"
    generate.stop_at = None
    logs = []
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}), log_fn=logs.append)  # the stage's record not cached: its passes read
    said = [m for m in logs if "held-out tuned" in m and ("not used" in m or "reused" in m)]
    assert said == [f"evaluate: held-out tuned: the saved pass {part} is not used ({why}); generating it again"], logs
    assert part.read_bytes() == made  # generated again: the model's answers (greedy), listed anew
    logs.clear()
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.8}), log_fn=logs.append)
    assert not any("not used" in m for m in logs) and any("every pass read back" in m for m in logs), logs
    assert json.loads((part.parent / "COMPLETE").read_text())["files"].keys() == {p.name for p in part.parent.glob("*.json")}


def test_a_later_saved_pass_whose_bytes_changed_is_generated_again_after_an_earlier_pass_was_generated(trained, tiny_cfg, tmp_path):
    """The claim of 41a0294: a part whose bytes changed since it was saved is generated again, with a line naming it. It
    holds only for a part read before the run saves any: `save_part` rewrites PARTS from the folder as it is, every file
    hashed again, so once the run generated one pass (here the held-out base's, its file gone; in a resumed run the pass
    it was stopped in) each later pass is compared with a list made from its own changed bytes and reused as the model's."""
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    run(tiny_cfg.eval)
    [parts] = tmp_path.glob("cache/eval-parts/*")
    bench = tiny_cfg.eval.benchmarks[0]
    part = parts / f"{bench}-tuned.json"
    saved = json.loads(part.read_text())
    saved["gens"][0]["text"] = "EDITED " + saved["gens"][0]["text"]  # not the model's answer any more
    part.write_text(json.dumps(saved, indent=2, sort_keys=True))
    (parts / "held-out-base.json").unlink()  # generated again first, in this run
    logs = []
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}), log_fn=logs.append)  # the stage's record not cached: its passes read
    assert any(f"{bench} tuned: the saved pass {part} is not used" in m for m in logs), logs
    assert "EDITED" not in part.read_text()


def test_a_pass_edited_during_the_run_is_not_blessed_by_the_folders_complete_marker(trained, tiny_cfg, tmp_path, monkeypatch):
    """The parts folder's COMPLETE marker was written at the end of stage 5 from the folder's bytes as they were then: a
    pass edited (or replaced) after it was saved and before the stage ended was listed in COMPLETE as if it had been
    saved so. COMPLETE is now written from PARTS, each pass as `save_part` listed it; a pass whose bytes no longer match
    its entry leaves the folder unmarked, in one line naming it, and the next run that reads it generates it again."""
    from tasks import evaluate

    real_generate, calls = evaluate.generate, []
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731

    def generate(*a, **k):  # kept for the rerun too: the passes are keyed on the generating code's source (`answer_code`)
        calls.append(1)
        if len(calls) == 3:  # the held-out passes saved; an edit lands in held-out-tuned.json while ifeval's base side runs
            [part] = tmp_path.glob("cache/eval-parts/*/held-out-tuned.json")
            saved = json.loads(part.read_text())
            gen = next(g for g in saved["gens"] if g["text"][:1].isascii() and g["text"][:1].isalnum())
            gen["text"] = ("Z" if gen["text"][0] != "Z" else "Y") + gen["text"][1:]  # another answer, same size
            part.write_text(json.dumps(saved, indent=2, sort_keys=True))
        return real_generate(*a, **k)

    monkeypatch.setattr(evaluate, "generate", generate)
    logs = []
    run(tiny_cfg.eval, log_fn=logs.append)
    [parts] = tmp_path.glob("cache/eval-parts/*")
    listed = json.loads((parts / "PARTS").read_text())["files"]
    complete = json.loads((parts / "COMPLETE").read_text())["files"] if (parts / "COMPLETE").is_file() else None
    assert complete is None or complete["held-out-tuned.json"] == listed["held-out-tuned.json"], "COMPLETE lists the edited bytes"
    why = "its file held-out-tuned.json has other bytes than when PARTS listed it (changed in place)"
    assert (f"evaluate: the saved passes in {parts} are not marked complete ({why}); the next run reads that pass back if it is "
            "then as PARTS lists it (a run saving it now lists it as it ends), else generates it again") in logs, logs
    logs.clear()
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}), log_fn=logs.append)
    assert any(f"held-out tuned: the saved pass {parts / 'held-out-tuned.json'} is not used ({why.removeprefix('its ')})" in m for m in logs), logs
    complete = json.loads((parts / "COMPLETE").read_text())["files"]
    assert complete == {k: v for k, v in json.loads((parts / "PARTS").read_text())["files"].items()}


def test_saved_passes_no_list_names_are_generated_again_not_read_unchecked(trained, tiny_cfg, tmp_path):
    """A pass that neither PARTS nor a COMPLETE file list names (a folder saved by a version before passes were listed:
    a plain timestamp COMPLETE, no PARTS; or an entry a flock-less filesystem dropped) was read back unchecked, so an
    edited one was paired as the model's answers. Nothing vouches for its bytes: it is treated as absent, generated
    again with one line saying why, and listed as it is saved."""
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    run(tiny_cfg.eval)
    [parts] = tmp_path.glob("cache/eval-parts/*")
    (parts / "PARTS").unlink()
    (parts / "COMPLETE").write_text("2026-11-30T12:00:00+0000\n")  # as older versions marked it
    part = parts / f"{tiny_cfg.eval.benchmarks[0]}-tuned.json"
    made = part.read_bytes()
    saved = json.loads(made)
    saved["gens"][0]["text"] = "EDITED " + saved["gens"][0]["text"]
    part.write_text(json.dumps(saved, indent=2, sort_keys=True))
    logs = []
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}), log_fn=logs.append)
    unlisted = [m for m in logs if "is not used (listed in neither PARTS nor COMPLETE" in m]
    assert len(unlisted) == 2 + 2 * len(tiny_cfg.eval.benchmarks) and not any("reused from this stage's saved pass" in m for m in logs), logs
    assert part.read_bytes() == made  # generated again: the model's answers
    listed = json.loads((parts / "COMPLETE").read_text())["files"]
    assert listed == json.loads((parts / "PARTS").read_text())["files"] and listed.keys() == {p.name for p in parts.glob("*.json")}


def test_a_previous_versions_complete_folder_with_a_partial_parts_list_regenerates_only_the_pass_that_changed(trained, tiny_cfg, tmp_path):
    """A parts folder the previous version (41a0294..3058485) completed lists every pass in COMPLETE (from the folder's
    bytes) and in PARTS only those it saved itself: one a version before 41a0294 had begun (its passes never listed in
    PARTS) reads so. A rerun at another eval.confidence that finds one pass changed (held-out-base.json, read first)
    generates that pass and saves it; `list_parts` then writes PARTS from PARTS alone and removes COMPLETE, so every pass
    only COMPLETE listed (unchanged, vouched for) reads as listed nowhere and is generated again, in the same run: on a 7B
    the tuned model's benchmark passes, hours. Expected: the one changed pass generated, the rest reused."""
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    run(tiny_cfg.eval)
    [parts] = tmp_path.glob("cache/eval-parts/*")
    listed = json.loads((parts / "PARTS").read_text())
    only_complete = sorted(n for n in listed["files"] if not n.startswith("held-out"))  # the benchmark passes: saved by old code
    listed["files"] = {n: v for n, v in listed["files"].items() if n not in only_complete}
    (parts / "PARTS").write_text(json.dumps(listed, indent=1, sort_keys=True) + "\n")
    assert set(json.loads((parts / "COMPLETE").read_text())["files"]) >= set(only_complete)  # COMPLETE vouches for them
    part = parts / "held-out-base.json"
    saved = json.loads(part.read_text())
    saved["gens"][0]["text"] = "EDITED " + saved["gens"][0]["text"]
    part.write_text(json.dumps(saved, indent=2, sort_keys=True))
    logs = []
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}), log_fn=logs.append)
    not_used = [m for m in logs if "is not used" in m]
    assert len(not_used) == 1 and "held-out-base.json" in not_used[0], not_used


def test_saved_passes_of_another_machine_are_generated_again_not_paired_with_this_ones(trained, tiny_cfg, tmp_path, monkeypatch):
    """The passes outlive their run, like the base's cached answers, and are keyed as those are on the machine and the
    libraries that make the answers (`passes_key`): a run on another machine (another GPU, GPU count or CPU) generates
    every pass there, so one record never pairs the base's answers of one machine with the tuned answers of another."""
    from tasks import evaluate

    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    run(tiny_cfg.eval)
    monkeypatch.setattr(evaluate, "hardware_id", lambda device, gpus=1: "cpu:another box")  # the same "cpu": the same stage key
    logs = []
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}), log_fn=logs.append)
    assert not any("reused" in m or "without loading the model" in m for m in logs), logs
    kept = list(tmp_path.glob("cache/eval-parts/*"))
    assert len(kept) == 2 and all((k / "COMPLETE").is_file() for k in kept)


def _adapter_off(model) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


def test_a_kept_base_side_made_by_older_generating_code_is_not_paired_with_a_tuned_side_made_by_newer(trained, tiny_cfg, tmp_path, monkeypatch):
    """The base's cached answers are keyed on the source of the code that generates and scores them (`base_answers_key`:
    generate, decode_check, reference_nll, row_nll, benchmark_conversation); the kept passes (`passes_key`) were not,
    although they outlive their run "and are keyed as it is". A pass saved before a change of that code (a fix of
    what made a GENERATION BROKEN, a git pull) was read back by a later run and paired with the other side generated by
    the new code. Here the tuned IFEval side's decode check fails (not saved), the base side is kept; the generating
    code changes (the base key moves); a run at another confidence paired the old code's base answers with the new
    code's tuned answers. Both keys now hold the same code fingerprint (`answer_code`)."""
    from tasks import evaluate

    real = evaluate.generate
    n = []

    def generate_v1(model, tok, conversations, stop_ids, max_new_tokens, batch_size, device, check=None, progress=None):
        out = real(model, tok, conversations, stop_ids, max_new_tokens, batch_size, device, check, progress)
        n.append(1)
        if len(n) == 4:  # held-out base, held-out tuned, ifeval base, ifeval tuned: this one's decode is broken
            check.update(tokens=40, agree=0)
        return out

    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    monkeypatch.setattr(evaluate, "generate", generate_v1)
    run(tiny_cfg.eval)
    [parts] = tmp_path.glob("cache/eval-parts/*")
    assert (parts / "ifeval-base.json").is_file() and not (parts / "ifeval-tuned.json").is_file()

    made = []

    def generate_v2(model, tok, conversations, stop_ids, max_new_tokens, batch_size, device, check=None, progress=None):
        made.append("base" if _adapter_off(model) else "tuned")  # the fixed code
        return real(model, tok, conversations, stop_ids, max_new_tokens, batch_size, device, check, progress)

    monkeypatch.setattr(evaluate, "generate", generate_v2)
    logs = []
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}), log_fn=logs.append)
    assert "tuned" in made  # ifeval's tuned side: generated by the new code
    old_base = [m for m in logs if m.startswith("evaluate: ifeval: the base model's answers reused from this stage's saved pass")]
    assert "base" in made and not old_base, (made, logs)  # its base side: not the old code's answers


@pytest.mark.parametrize("rerun", ["another confidence", "record folder deleted"])
def test_a_pass_whose_decode_is_broken_is_not_kept_for_later_runs(trained, tiny_cfg, tmp_path, monkeypatch, rerun):
    """The base's cached answers never keep a broken decode (the answers are not the model's), but the saved passes
    did: once they outlived the stage, a run that said GENERATION BROKEN, rerun after the cause was fixed (a new
    eval.confidence, or its record deleted to run stage 5 again), read the broken answers back without loading the
    model and said GENERATION BROKEN again. A pass whose decode check failed is now not saved (one line says so), not
    read back (`_read_side`), and its folder is not marked complete."""
    from tasks import evaluate

    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    real = evaluate.decode_check
    monkeypatch.setattr(evaluate, "decode_check", lambda *a, **k: {"tokens": 40, "agree": 0})  # a broken kernel (stand-in)
    logs = []
    first = run(tiny_cfg.eval, log_fn=logs.append)
    assert any("GENERATION BROKEN" in x for x in first.verdict["warnings"])
    assert not list(tmp_path.glob("cache/eval-parts/*/*")) and not list(tmp_path.glob("cache/eval-base/*/COMPLETE"))
    assert sum("not saved for a later run (its decode check failed" in m for m in logs) == 2 + 2 * len(tiny_cfg.eval.benchmarks), logs
    monkeypatch.setattr(evaluate, "decode_check", real)  # the environment fixed
    if rerun == "record folder deleted":
        import shutil

        shutil.rmtree(first.dir)
        again = run(tiny_cfg.eval)
    else:
        again = run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}))
    assert not any("GENERATION BROKEN" in x for x in again.verdict["warnings"]), again.verdict["warnings"]
    assert len(list(tmp_path.glob("cache/eval-parts/*/COMPLETE"))) == 1


def test_the_model_is_loaded_before_the_bar_draws_when_a_saved_pass_turns_out_unusable(trained, tiny_cfg, tmp_path, monkeypatch):
    """The model loads before the bar draws ("the weights' own loading bar stays off it") when the plan has work, but
    plan_generation counted a saved pass as done when its file existed, usable or not. With every pass saved and one of
    them for other prompts (a hub benchmark updated under the same key, then a run at another confidence) the plan was
    empty, the bar drew, and the model (its "Loading checkpoint shards" bar) loaded inside it. The plan now tests each
    saved pass as its reading does."""
    from tasks import evaluate

    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    run(tiny_cfg.eval)
    [part] = tmp_path.glob("cache/eval-parts/*/ifeval-tuned.json")
    part.write_text(json.dumps({**json.loads(part.read_text()), "asked": "the prompts of the hub copy before its update"}))
    events = []
    real_bar, real_load = evaluate.EvalBar.__init__, evaluate.load_base_model
    monkeypatch.setattr(evaluate.EvalBar, "__init__", lambda self, parts: events.append(("bar", dict(parts))) or real_bar(self, parts))
    monkeypatch.setattr(evaluate, "load_base_model", lambda *a, **k: events.append("load") or real_load(*a, **k))
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}))
    cap = tiny_cfg.eval.benchmark_max_new_tokens["ifeval"]
    assert events == ["load", ("bar", {"ifeval tuned": tiny_cfg.eval.benchmark_prompts["ifeval"] * cap})], events


def test_merge_matches_base_plus_adapter_and_twice_is_a_noop(trained, tiny_cfg, shared_artifacts):
    rec = merge_adapter(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, tiny_cfg.merge, "cpu", shared_artifacts)
    assert rec.check.passed and rec.dtype == "float32" and rec.top1_agreement == 1.0 and rec.kl_mean < 1e-6
    assert (Path(rec.merged_dir) / "model.safetensors").is_file()
    assert "lora" not in json.dumps(json.loads((Path(rec.merged_dir) / "config.json").read_text())).lower()
    mtime = (Path(rec.merged_dir) / "model.safetensors").stat().st_mtime
    again = merge_adapter(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, tiny_cfg.merge, "cpu", shared_artifacts)
    assert again == rec and (Path(rec.merged_dir) / "model.safetensors").stat().st_mtime == mtime


def _records(trained, tiny_cfg, art):
    ev = evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, tiny_cfg.eval, "cpu", art)
    mg = merge_adapter(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, tiny_cfg.merge, "cpu", art)
    return {**trained, "evaluate": ev, "merge": mg}


def test_publish_is_atomic_when_interrupted(trained, tiny_cfg, shared_artifacts, monkeypatch):
    import tasks.publish as pub

    records = _records(trained, tiny_cfg, shared_artifacts)

    def boom(*a, **k):
        raise KeyboardInterrupt("interrupted mid-publish")

    monkeypatch.setattr(pub, "model_card", boom)  # dies after the big copies, before the manifest
    with pytest.raises(KeyboardInterrupt):
        publish_artifacts(tiny_cfg, "interrupted-run", records)
    run_dir = Path(shared_artifacts) / "runs" / "interrupted-run"
    assert not (run_dir / tiny_cfg.output_name).exists()
    assert not any(is_published(p) for p in run_dir.iterdir()) if run_dir.exists() else True
    assert not list(run_dir.glob(".*tmp*")) if run_dir.exists() else True  # temp folder cleaned up


def test_published_folder_card_manifest_and_seed_snippet(trained, tiny_cfg, shared_artifacts):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    rec = publish_artifacts(tiny_cfg, "card-run", _records(trained, tiny_cfg, shared_artifacts))
    folder = Path(rec.dir)
    assert is_published(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert {f["path"] for f in manifest["files"]} >= {"adapter/adapter_model.safetensors", "merged/model.safetensors", "README.md", "pipeline.yaml"}
    card = (folder / "README.md").read_text()
    # random:mistral is no Hub id: no base_model line, the card says what the base is (tests/test_use_the_model.py).
    assert "base_model:" not in card
    for needle in ("`random:mistral`: random weights for tests", "library_name: peft", "AutoPeftModelForCausalLM", "Time budget", "| perplexity |",
                   f"{trained['train'].trainable_params:,}", trained["data"].data_hash,
                   f"optimizer batch ~{trained['train'].batch['conversations']:,.1f} conversations",
                   # issue 18: a template-less model's card says which template it got and why
                   "uses this chat template, the project's default (### User: / ### Assistant: headers, answers closed by EOS), "
                   "because `random:mistral` has no chat template of its own"):
        assert needle in card, needle
    # The seed's snippet, verbatim in spirit: AutoPeftModelForCausalLM on the published adapter.
    model = AutoPeftModelForCausalLM.from_pretrained(str(folder / "adapter"))
    tok = AutoTokenizer.from_pretrained(str(folder / "adapter"))
    enc = tok.apply_chat_template([{"role": "user", "content": "Say hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    # Truncating a file makes the folder incomplete.
    victim = folder / "pipeline.yaml"
    victim.write_text(victim.read_text()[:10])
    assert not is_published(folder)


def test_a_tokenizer_that_renders_otherwise_is_published_in_the_adapter_too_when_training_is_reused(tmp_path, monkeypatch):
    """A tokenizer that renders the data record's fixed conversation otherwise but builds the same rows (here the
    `random:` model's folder built again by a builder whose tokenizer normalizes with NFKC, as a tokenizers upgrade can:
    the probe's "…" reads as "...", no row holds one) rebuilds stage 1 with the same rows: training is reused (its key
    holds the rows, not the rendering), evaluate and merge rerun (theirs hold `rendering_key`), publish with them. The
    published adapter/ was a copy of the training folder's, whose tokenizer training saved: the old one, beside a merged/
    saved with the run's. Both now carry the run's tokenizer, file for file."""
    import shutil

    from tokenizers import normalizers

    from tasks import models as models_mod
    from tasks.config import load_config
    from tasks.models import resolve_model

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}"])
    art = str(tmp_path)

    def run_stages() -> dict:
        data = load_dataset_records(cfg.data, cfg.model, art)
        probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
        train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
        return {"data": data, "profile": profile_lengths(data, art), "probe": probe, "train": train,
                "evaluate": evaluate_heldout(data, train, cfg.model, cfg.quant, cfg.eval, "cpu", art),
                "merge": merge_adapter(data, train, cfg.model, cfg.quant, cfg.merge, "cpu", art)}

    first = run_stages()
    real_builder = models_mod.build_byte_tokenizer

    def nfkc_builder(*args, **kwargs):
        tok = real_builder(*args, **kwargs)
        tok.backend_tokenizer.normalizer = normalizers.NFKC()
        return tok

    shutil.rmtree(resolve_model(cfg.model, art).path)  # the model folder built again, by the new builder
    monkeypatch.setattr(models_mod, "build_byte_tokenizer", nfkc_builder)
    second = run_stages()
    assert second["data"].rows_key == first["data"].rows_key and second["data"].rendering != first["data"].rendering
    assert second["train"].key == first["train"].key and second["merge"].key != first["merge"].key
    published = Path(publish_artifacts(cfg, "after-the-upgrade", second).dir)
    tokenizer_files = sorted(p.name for p in (published / "merged").iterdir()
                             if p.name.startswith(("tokenizer", "special_tokens", "chat_template", "added_tokens")))
    assert "tokenizer.json" in tokenizer_files
    normalizer = lambda folder: json.loads((folder / "tokenizer.json").read_text())["normalizer"]  # noqa: E731
    assert normalizer(published / "merged") == {"type": "NFKC"}
    assert normalizer(published / "adapter") == {"type": "NFKC"}, "the adapter carries the tokenizer training saved"
    assert {f: (published / "adapter" / f).read_bytes() for f in tokenizer_files} == {f: (published / "merged" / f).read_bytes() for f in tokenizer_files}
    assert sorted(p.name for p in (published / "adapter").iterdir()) == sorted(["adapter_config.json", "adapter_model.safetensors", *tokenizer_files])


def test_a_folder_published_with_another_tokenizer_in_its_adapter_is_published_again(trained, tiny_cfg, shared_artifacts):
    """A folder published before adapter/ took merged/'s tokenizer (a44bee2) may carry in adapter/ the tokenizer of a
    reused training, which renders otherwise. It was complete, so a cache hit reused it and the fix reached no folder
    already published. Now its MANIFEST's tokenizer files (name and sha256) of adapter/ and merged/ are compared, no file
    read: one that differs is published again, with one line; the folder published so is reused. `chat` and
    `serve-model` still find the old folder (`is_published`: complete)."""
    from tasks.common import file_sha256

    records = _records(trained, tiny_cfg, shared_artifacts)
    folder = Path(publish_artifacts(tiny_cfg, "old-adapter-tokenizer", records).dir)
    tok = folder / "adapter" / "tokenizer.json"
    conf = json.loads(tok.read_text())
    conf["normalizer"] = {"type": "NFKC"} if conf.get("normalizer") != {"type": "NFKC"} else {"type": "NFC"}
    tok.write_text(json.dumps(conf))  # training's tokenizer, as an older version published it, listed in the MANIFEST
    manifest = json.loads((folder / MANIFEST).read_text())
    for f in manifest["files"]:
        if f["path"] == "adapter/tokenizer.json":
            f.update(bytes=tok.stat().st_size, sha256=file_sha256(tok))
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert is_published(folder) and tok.read_bytes() != (folder / "merged" / "tokenizer.json").read_bytes()
    logs = []
    again = publish_artifacts(tiny_cfg, "old-adapter-tokenizer", records, log_fn=logs.append)
    assert tok.read_bytes() == (folder / "merged" / "tokenizer.json").read_bytes()
    assert [m for m in logs if "publishing it again" in m] == [f"publish: {folder}/adapter holds another tokenizer than its merged/ "
                                                               "(published before adapter/ took merged/'s tokenizer); publishing it again"]
    assert again.outputs_exist()
    stamp = (folder / MANIFEST).stat().st_ino
    logs.clear()
    publish_artifacts(tiny_cfg, "old-adapter-tokenizer", records, log_fn=logs.append)
    assert (folder / MANIFEST).stat().st_ino == stamp and not logs  # reused


@pytest.mark.parametrize("merged", [False, True])
def test_chat_answers_from_the_published_run(trained, tiny_cfg, shared_artifacts, monkeypatch, merged):
    from transformers import TextStreamer

    from tasks.publish import chat

    streamed = []
    original = TextStreamer.put
    monkeypatch.setattr(TextStreamer, "put", lambda self, value: (streamed.append(value.numel()), original(self, value))[1])
    publish_artifacts(tiny_cfg, "chat-run", _records(trained, tiny_cfg, shared_artifacts))
    assert chat("chat-run", "Write the word cat in uppercase.", merged=merged, max_new_tokens=6, artifacts_dir=shared_artifacts) == 0
    # The streamer saw the prompt, then each generated token (the random tiny model's text may be blank).
    assert len(streamed) >= 2 and streamed[0] > 1


def test_chat_compare_answers_with_the_base_then_the_tuned_model_each_under_its_name_and_its_own_chat(trained, tiny_cfg, shared_artifacts,
                                                                                                        monkeypatch, capfd):
    """`chat --compare`: each prompt answered by the base model (every LoRA layer switched off while it generates) and then
    by base + adapter (on), each under its name on stdout; each side's second prompt carries its own first answer, not the
    other side's. `--base` answers with the base alone; with --merged (no adapter to switch off) it is one line."""
    from peft import PeftModelForCausalLM
    from peft.tuners.lora import LoraLayer

    from tasks.common import StageError
    from tasks.publish import chat

    generated = []  # (adapter off?, prompt ids) of each generate call
    original = PeftModelForCausalLM.generate

    def generate(self, *args, **kwargs):
        layers = [m for m in self.modules() if isinstance(m, LoraLayer)]
        assert layers
        generated.append((all(m.disable_adapters for m in layers), kwargs["input_ids"][0].tolist()))
        return original(self, *args, **kwargs)

    records = _records(trained, tiny_cfg, shared_artifacts)  # before the patch: stage 5's own generate calls are not counted
    monkeypatch.setattr(PeftModelForCausalLM, "generate", generate)
    lines = iter(["first question", "second question", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    publish_artifacts(tiny_cfg, "chat-compare", records)
    capfd.readouterr()
    assert chat("chat-compare", None, max_new_tokens=4, artifacts_dir=shared_artifacts, sides=("base", "tuned")) == 0
    out, err = capfd.readouterr()
    assert [off for off, _ in generated] == [True, False, True, False]  # base first, adapter off only while it answers
    assert out.count("[base]") == 2 and out.count("[tuned]") == 2 and out.index("[base]") < out.index("[tuned]")
    assert "the base model, then base + adapter" in err
    # the first turn's prompt is the same for both; each side's second prompt holds its own first answer
    (_, base1), (_, tuned1), (_, base2), (_, tuned2) = generated
    assert base1 == tuned1 and base2[:len(base1)] == base1 and tuned2[:len(tuned1)] == tuned1

    generated.clear()
    assert chat("chat-compare", "one question", max_new_tokens=4, artifacts_dir=shared_artifacts, sides=("base",)) == 0
    assert [off for off, _ in generated] == [True] and "[base]" not in capfd.readouterr().out
    with pytest.raises(StageError, match="the merged model has none: drop --merged"):
        chat("chat-compare", "one question", merged=True, artifacts_dir=shared_artifacts, sides=("base", "tuned"))
    with pytest.raises(StageError, match=r"chat sides \['nope'\]"):
        chat("chat-compare", "one question", artifacts_dir=shared_artifacts, sides=("nope",))


def test_chat_after_an_answer_stopped_by_ctrl_c_streams_only_the_next_answer(trained, tiny_cfg, shared_artifacts, monkeypatch, capfd):
    """Ctrl-C inside an answer stops it; the next answer's stream holds neither the stopped one's tail nor its own prompt
    (one streamer for the session printed both: a review, 2026-12-06)."""
    from transformers import TextStreamer

    from tasks.publish import chat

    lines, calls = iter(["first question", "second question", ""]), []
    original = TextStreamer.put

    def put(self, value):
        calls.append(value.numel())
        if len(calls) == 4:  # the prompt, then tokens: stopped on the third generated token of the first answer
            raise KeyboardInterrupt
        return original(self, value)

    monkeypatch.setattr(TextStreamer, "put", put)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    publish_artifacts(tiny_cfg, "chat-stop", _records(trained, tiny_cfg, shared_artifacts))
    assert chat("chat-stop", None, max_new_tokens=8, artifacts_dir=shared_artifacts) == 0
    out, err = capfd.readouterr()
    assert "(answer stopped" in err and len(calls) > 5  # the second answer streamed too
    assert "question" not in out, out  # no prompt text printed as if generated


def test_the_card_says_the_steps_the_run_planned_after_stage_4_replanned_the_cached_probe(trained, tiny_cfg, shared_artifacts):
    """Stage 4 replans a cached probe for the run's own training.checkpoint_minutes (`ProbeRecord.planned_for`) and trains
    on that plan: its TrainRecord.expected_steps is the replanned probe's max_steps. The card's "the probe measured
    ... and set N steps" read the flow's probe record, the plan for the interval it was cached with: a probe cached
    for hourly checkpoints (3-s steps, 2-s saves, an hour: 1199 steps) and a run saving every minute (1161 steps
    planned, the warm-up and cap built on them) publishes a card that says 1199."""
    import re

    hourly = trained["probe"].model_copy(update={"budget_seconds": 3600.0, "launch_seconds": 0.0, "load_seconds": 2.0, "save_seconds": 2.0,
                                                 "final_save_seconds": 0.5, "s_per_step": 3.0, "checkpoint_minutes": 60.0,
                                                 "max_steps": 1199, "fixed_seconds": 2.5,
                                                 "first_step_excess_seconds": 0.0})  # not the tiny probe's measured one: 1160 under load
    training = tiny_cfg.training.model_copy(update={"max_steps": None, "checkpoint_minutes": 1.0})
    planned = hourly.planned_for(training)
    assert planned.max_steps == 1161
    # what `_train` records on the replanned probe it trained on: expected_steps=probe.max_steps
    train = trained["train"].model_copy(update={"expected_steps": planned.max_steps})
    cfg = tiny_cfg.model_copy(update={"training": training})
    records = {**_records(trained, tiny_cfg, shared_artifacts), "probe": hourly, "train": train}
    card = (Path(publish_artifacts(cfg, "replanned-card-run", records).dir) / "README.md").read_text()
    budget = re.search(r"- Time budget:.*?\(budget error", card, re.S).group(0)
    assert "1161 steps" in budget and "1199" not in budget, budget


def test_card_names_the_chat_templates_source(tiny_cfg):
    from tasks.config import load_config
    from tasks.models import DEFAULT_CHAT_TEMPLATE
    from tasks.publish import template_source

    assert template_source(tiny_cfg, "{{ bos_token }}" + DEFAULT_CHAT_TEMPLATE).startswith("the project's default")
    assert template_source(tiny_cfg, "{{ messages }}") == "the one `random:mistral`'s tokenizer ships"
    own = load_config(profile="tiny", overrides=[f"artifacts_dir={tiny_cfg.artifacts_dir}", "model.chat_template={{ messages }}"])
    assert template_source(own, "{{ messages }}") == "the one `model.chat_template` sets"


# ---------------------------------------------------------------------------------------------------------
# rev-late: defects found reviewing ae86af5 (chat --compare / --base)


def test_review_chat_compare_after_ctrl_c_in_the_tuned_answer_both_sides_answer_the_same_conversation(trained, tiny_cfg, shared_artifacts,
                                                                                                      monkeypatch, capfd):
    """`chat --compare` answers each prompt with the base, then the tuned model. Ctrl-C during the tuned answer prints
    "(answer stopped; it is not part of the chat)", yet the base side's answer to that prompt has already gone into the
    base's chat: the next prompt reaches the base with that exchange before it and the tuned model without it, so the
    side-by-side reading compares answers to different conversations (and the sides stay apart for the whole session)."""
    from peft import PeftModelForCausalLM
    from peft.tuners.lora import LoraLayer

    from tasks.publish import chat

    records = _records(trained, tiny_cfg, shared_artifacts)  # before the patch: stage 5's own generate calls are not counted
    publish_artifacts(tiny_cfg, "chat-compare-stop", records)
    generated = []  # (adapter off?, prompt ids) of each generate call
    original = PeftModelForCausalLM.generate

    def generate(self, *args, **kwargs):
        off = all(m.disable_adapters for m in self.modules() if isinstance(m, LoraLayer))
        generated.append((off, kwargs["input_ids"][0].tolist()))
        if len(generated) == 2:  # the first prompt's tuned answer: the user presses Ctrl-C
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftModelForCausalLM, "generate", generate)
    lines = iter(["first question", "second question", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    capfd.readouterr()
    assert chat("chat-compare-stop", None, max_new_tokens=4, artifacts_dir=shared_artifacts, sides=("base", "tuned")) == 0
    assert "(answer stopped; it is not part of the chat)" in capfd.readouterr().err
    assert [off for off, _ in generated] == [True, False, True, False]
    (_, _), (_, _), (_, base2), (_, tuned2) = generated
    assert base2 == tuned2  # the second prompt: the same conversation on both sides


def test_review_chat_compare_ctrl_c_during_the_base_answer_stops_that_answer_alone(trained, tiny_cfg, shared_artifacts, monkeypatch, capfd):
    """The chat's banner says "Ctrl-C during an answer stops it". Under --compare the base answers first; a user who
    stops a base answer that loops (as the commit's haiku example does on the other side) expects the tuned model's
    answer to the same prompt next: the KeyboardInterrupt leaves `answer` altogether, the tuned side never answers that
    prompt, and the chat goes back to the prompt."""
    from peft import PeftModelForCausalLM
    from peft.tuners.lora import LoraLayer

    from tasks.publish import chat

    records = _records(trained, tiny_cfg, shared_artifacts)  # before the patch: stage 5's own generate calls are not counted
    publish_artifacts(tiny_cfg, "chat-compare-stop-base", records)
    generated = []  # adapter off? of each generate call
    original = PeftModelForCausalLM.generate

    def generate(self, *args, **kwargs):
        generated.append(all(m.disable_adapters for m in self.modules() if isinstance(m, LoraLayer)))
        if len(generated) == 1:  # the first prompt's base answer: the user presses Ctrl-C
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftModelForCausalLM, "generate", generate)
    lines = iter(["first question", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    capfd.readouterr()
    assert chat("chat-compare-stop-base", None, max_new_tokens=4, artifacts_dir=shared_artifacts, sides=("base", "tuned")) == 0
    out = capfd.readouterr().out
    assert generated == [True, False] and "[tuned]" in out, (generated, out)


def test_review_chat_base_side_that_cannot_load_is_not_sent_to_merged(trained, tiny_cfg, shared_artifacts):
    """load_published's refusals for base + adapter (a base named by a cache path, bitsandbytes missing, a base that does
    not load) end with "or chat with --merged". Under --base or --compare that fix is refused one call later: "the base
    side is the adapter switched off, and the merged model has none: drop --merged". The line must not name a fix that
    the same command refuses."""
    from tasks.common import StageError, read_json, write_json
    from tasks.export import _update_manifest
    from tasks.publish import chat

    folder = Path(publish_artifacts(tiny_cfg, "chat-base-unloadable", _records(trained, tiny_cfg, shared_artifacts)).dir)
    prov = read_json(folder / "provenance.json")
    write_json(folder / "provenance.json", {**prov, "base": {**prov["base"], "files": None, "hub_id": "nobody/no-such-base", "revision": "0" * 40}})
    _update_manifest(folder)  # the folder stays published: only its base's name changed
    for sides in (("base",), ("base", "tuned")):
        with pytest.raises(StageError) as e:
            chat("chat-base-unloadable", "one question", max_new_tokens=4, artifacts_dir=shared_artifacts, sides=sides)
        assert "--merged" not in str(e.value), (sides, str(e.value))


def test_review_chat_compare_notes_name_the_side_they_are_about(trained, tiny_cfg, shared_artifacts, monkeypatch, capfd):
    """ae86af5 prints each answer under "[base]" / "[tuned]" on stdout so that "a piped side-by-side stays readable";
    the notes about an answer ("(answer cut at N tokens by --max-new-tokens N ...)", "(dropped the N oldest turns of this
    chat ...)", "(not answered: ...)") go to stderr as they did with one side, naming neither: `chat --compare > out.txt`
    shows the user two identical notes on the terminal and no way to tell which side's answer was cut or which chat lost
    its oldest turns (each side fits its own history, so one may drop turns while the other does not)."""
    from tasks.publish import chat

    publish_artifacts(tiny_cfg, "chat-compare-notes", _records(trained, tiny_cfg, shared_artifacts))
    capfd.readouterr()
    assert chat("chat-compare-notes", "one question", max_new_tokens=2, artifacts_dir=shared_artifacts, sides=("base", "tuned")) == 0
    notes = [line for line in capfd.readouterr().err.splitlines() if "answer cut at 2 tokens" in line]
    assert len(notes) == 2, notes  # the tiny model runs to the cap on both sides
    assert notes[0].startswith("(base: answer cut") and notes[1].startswith("(tuned: answer cut"), notes
