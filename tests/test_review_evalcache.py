"""Review of fix-evalcache (0d9e6e4): stage 5's saved passes, lazy model loading and the base-answers copy.
Each test is a defect found on that commit; each fails there."""

from __future__ import annotations

import json

import pytest

from tasks import evaluate as ev
from tasks.data import load_dataset_records
from tasks.evaluate import evaluate_heldout
from tasks.probe import probe_throughput
from tasks.profile import profile_lengths
from tasks.train import train_adapter


@pytest.fixture(scope="module")
def trained(tiny_cfg, shared_artifacts):
    cfg, art = tiny_cfg, shared_artifacts
    data = load_dataset_records(cfg.data, cfg.model, art)
    prof = profile_lengths(data, art)
    probe = probe_throughput(data, cfg.model, cfg.quant, cfg.lora, cfg.training, cfg.budget, "cpu", art)
    train = train_adapter(data, probe, cfg.model, cfg.quant, cfg.lora, cfg.training, art)
    return {"data": data, "profile": prof, "probe": probe, "train": train}


def _refuse(monkeypatch):
    # Only the model's loading is refused: generating needs the model. (Replacing generate/row_nll/reference_nll would
    # also change base_answers_key, which hashes their source, and so miss the base cache for that reason alone.)
    def refuse(*a, **k):
        raise AssertionError("a statistics-only rerun loaded the model")

    monkeypatch.setattr(ev, "load_base_model", refuse)


def test_a_new_confidence_reads_every_answer_of_the_first_record_even_when_its_base_came_from_the_base_cache(
        trained, tiny_cfg, tmp_path, monkeypatch):
    """The kept passes are marked COMPLETE but hold no benchmark base side when that side came from the base-answers
    cache (the usual case: every adapter after the first on one base, or any run after one with other eval.max_prompts).
    A later run at another eval.confidence then depends on cache/eval-base still holding that side under *today's*
    base_answers_key (hardware_id: GPU name, memory and *count*; torch/transformers/... versions), which are in no key
    of the passes. On another machine of the same device type sharing the artifacts folder (or another visible GPU
    count, a library upgrade, cache/eval-base cleared) the base side is generated again, there, and paired with the
    held-out passes and tuned answers made on the first machine; the claim "a new eval.confidence recomputes the statistics
    from the saved answers without loading the model" fails, and the pairing is of two machines."""
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    ev16 = tiny_cfg.eval
    ev12 = ev16.model_copy(update={"max_prompts": ev16.max_prompts - 4})
    run(ev16)  # makes the base caches
    second = run(ev12)  # another record; its benchmark base sides come from the base cache
    assert all(second.benchmarks[b]["base_reused"] for b in ev16.benchmarks)
    monkeypatch.setattr(ev, "hardware_id", lambda device: "cpu:another box of the same kind")  # same "cpu": same stage and passes keys
    _refuse(monkeypatch)
    logs = []
    again = run(ev12.model_copy(update={"confidence": 0.9}), log_fn=logs.append)
    assert any("without loading the model" in m for m in logs), logs
    assert again.tuned == {**second.tuned, "ci": again.tuned["ci"]}


@pytest.mark.parametrize("rerun", ["another confidence", "record folder deleted"])
def test_a_pass_whose_decode_is_broken_is_not_kept_for_later_runs(trained, tiny_cfg, tmp_path, monkeypatch, rerun):
    """The base-answers cache never keeps a broken decode (run_benchmark: "a broken decode is never kept"): the answers
    are not the model's. The saved passes now outlive the stage and serve every later run of the same passes_key (a
    new confidence, a scorer upgrade, a deleted record folder), and their key holds no library version or machine. A
    run that found GENERATION BROKEN, rerun after the cause is fixed in the environment (here: decode_check agreeing
    again), still scores the broken answers and says GENERATION BROKEN, without loading the model. The same with the
    config unchanged and cache/eval/<key> deleted (the only way to re-run a cached stage 5; libraries are in no key):
    before 0d9e6e4 that regenerated everything, now every broken pass is read back from cache/eval-parts/."""
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    real = ev.decode_check
    monkeypatch.setattr(ev, "decode_check", lambda *a, **k: {"tokens": 40, "agree": 0})  # a broken kernel (stand-in)
    first = run(tiny_cfg.eval)
    assert any("GENERATION BROKEN" in x for x in first.verdict["warnings"])
    monkeypatch.setattr(ev, "decode_check", real)  # the environment fixed
    if rerun == "record folder deleted":
        import shutil

        shutil.rmtree(first.dir)
        again = run(tiny_cfg.eval)
    else:
        again = run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}))
    assert not any("GENERATION BROKEN" in x for x in again.verdict["warnings"]), again.verdict["warnings"]


def _base_args(tmp_path, batch_size=24):
    from tasks.config import load_config
    from tasks.data import DataRecord
    from test_eval_statistics import CharTok, alpaca_rows

    cfg = load_config(profile="tiny", overrides=[f"artifacts_dir={tmp_path}", f"eval.batch_size={batch_size}"])
    data = DataRecord.model_construct(model_fingerprint="m", chat_template_hash="t", stop_token_ids=[1], key="data-a")
    suite = {"name": "alpaca_eval", "rows": alpaca_rows(4), "provenance": {"sha256": "s"}, "subset": {"n": 4, "seed": 0, "max_new_tokens": 8}}
    return (data, cfg.model, cfg.quant, cfg.eval, suite, "cpu", None, CharTok())


def test_an_old_key_base_cache_that_cannot_be_copied_is_not_a_crash(tmp_path):
    """base_answers_dir copies a base cache made under the old key (with eval.batch_size). A cache there that cannot be
    read (base.json missing or unreadable beside COMPLETE: a partial rsync/tar extract, permissions, a hand edit) was,
    under the old code, "holds no usable base answers; generating them again" (one log line). Now shutil.copy2 raises
    and stage 5 fails before generating anything, on every run, until the user finds and deletes the old folder."""
    from tasks.common import building, is_complete

    args = _base_args(tmp_path)
    old = tmp_path / "cache" / "eval-base" / ev.base_answers_key(*args, batch_size=24)
    with building(old):
        pass  # COMPLETE, no base.json
    folder = ev.base_answers_dir(str(tmp_path), *args)  # FileNotFoundError on 0d9e6e4
    assert not is_complete(folder) or (folder / "base.json").is_file()


def test_an_unusable_base_cache_is_not_said_to_be_generated_again_when_a_saved_pass_is_used(monkeypatch, tmp_path):
    """With the passes kept, a base side is now often both in the base cache and in the saved passes. When the base
    cache cannot be used, the log says "generating them again", then the saved pass is read back and nothing is
    generated; the unusable cache is left as it is, so every later run says the same wrong line."""
    from test_eval_statistics import alpaca_rows, run

    rows, cache, parts = alpaca_rows(4), tmp_path / "eval-base" / "k", tmp_path / "parts"
    answers = {who: [(f"{who} answer", True)] * 4 for who in ("base", "tuned")}
    nll = {who: [(1.0, 1)] * 4 for who in ("base", "tuned")}
    run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, parts=parts)
    (cache / "base.json").write_text("{not json")
    logs = []
    _, seen = run(monkeypatch, "alpaca_eval", rows, answers, nll, base_cache=cache, parts=parts, log_fn=logs.append)
    assert seen == []  # nothing generated: the saved pass was used
    assert not any("generating them again" in m for m in logs), logs


def test_the_model_is_loaded_before_the_bar_draws_when_a_saved_pass_turns_out_unusable(trained, tiny_cfg, tmp_path, monkeypatch):
    """`if plan: load_model()` loads the weights before the bar draws ("the weights' own loading bar stays off it"), but
    plan_generation counts a saved pass as done when its file exists, usable or not. With every pass saved and one of
    them for other prompts (a hub benchmark updated under the same key, then a run at another confidence) the plan is
    empty, the bar draws, and the model (its "Loading checkpoint shards" bar) loads inside it at that benchmark side."""
    run = lambda e, **kw: evaluate_heldout(trained["data"], trained["train"], tiny_cfg.model, tiny_cfg.quant, e, "cpu", str(tmp_path), **kw)  # noqa: E731
    run(tiny_cfg.eval)
    [part] = tmp_path.glob("cache/eval-parts/*/ifeval-tuned.json")
    part.write_text(json.dumps({**json.loads(part.read_text()), "asked": "the prompts of the hub copy before its update"}))
    events = []
    real_bar, real_load = ev.EvalBar.__init__, ev.load_base_model
    monkeypatch.setattr(ev.EvalBar, "__init__", lambda self, parts: events.append("bar") or real_bar(self, parts))
    monkeypatch.setattr(ev, "load_base_model", lambda *a, **k: events.append("load") or real_load(*a, **k))
    run(tiny_cfg.eval.model_copy(update={"confidence": 0.9}))
    assert events == ["load", "bar"], events
