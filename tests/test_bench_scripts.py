"""The GPU bench scripts' CPU-side contracts: bench/workload.py (the workload gpu_bench and unsloth_bench share),
bench/unsloth_bench.py's help, dry plan, import order and LoRA reset, and bench/unsloth_table.py's table. The GPU
numbers themselves come from the device (bench/unsloth_bench.py's docstring has the command)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import unsloth_bench, unsloth_table  # noqa: E402
from bench.workload import ACCUM, LORA, MAX_LEN, MICRO, mixed_lengths, synthetic_sets  # noqa: E402

HEAVY = ("torch", "transformers", "trl", "peft", "unsloth", "datasets")


def script(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, str(ROOT / "bench" / "unsloth_bench.py")]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------------------------------------- workload


def test_synthetic_sets_are_the_rows_a_sequential_sampler_reads():
    full, mixed = synthetic_sets(steps=3, seed=42, vocab=500)
    assert len(full["rows"]) == MICRO * ACCUM * 3
    assert all(len(r["input_ids"]) == MAX_LEN for r in full["rows"])
    assert mixed["lengths"] == mixed_lengths(2000, 42)  # at least 2,000 rows, lengths from the seed alone
    assert [len(r["input_ids"]) for r in mixed["rows"]] == mixed["lengths"]
    ids = [t for r in mixed["rows"][:50] for t in r["input_ids"]]
    assert 3 <= min(ids) and max(ids) < 500  # never unk/bos/eos, inside the vocabulary
    assert all(r["labels"] == r["input_ids"] for r in full["rows"] + mixed["rows"])
    again, _ = synthetic_sets(steps=3, seed=42, vocab=500)
    assert again["rows"] == full["rows"]  # the same seed gives both scripts the same rows
    other, _ = synthetic_sets(steps=3, seed=43, vocab=500)
    assert other["rows"] != full["rows"]


def test_gc_pauses_counts_each_generation_between_start_and_stop_and_take_starts_again():
    import gc

    from bench.workload import GcPauses

    pauses = GcPauses()
    junk = [[i] for i in range(200_000)]  # a full collection with something to walk
    pauses.start()
    gc.collect(2)
    first = pauses.take()
    assert first[2] > 0 and first[0] == first[1] == 0, first
    assert pauses.take() == [0.0, 0.0, 0.0]  # since the last take
    gc.collect(0)
    assert pauses.take()[0] > 0
    pauses.stop()
    gc.collect(2)
    assert pauses.take() == [0.0, 0.0, 0.0] and pauses._hook not in gc.callbacks  # stopped: nothing counted
    del junk


def test_collect_every_runs_a_young_collection_at_every_nth_step_only(monkeypatch):
    import gc
    from types import SimpleNamespace

    from bench.workload import collect_every

    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation))
    callback = collect_every(3)
    for step in range(1, 10):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert calls == [1, 1, 1]  # steps 3, 6 and 9, generation 1 each


# ---------------------------------------------------------------------------------------------- unsloth_bench


def test_help_works_without_unsloth():
    res = script("--help")
    assert res.returncode == 0, res.stderr
    assert "--dry" in res.stdout and "--time-budget" in res.stdout and "PYTHONPATH=/tmp/site_u" in res.stdout


def test_dry_plan_reads_the_rows_of_gpu_bench_and_imports_nothing_heavy(tmp_path):
    code = ("import sys, json; from bench import unsloth_bench as u; rc = u.main(sys.argv[1:]); "
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules])); sys.exit(rc)")
    res = script("--dry", "--steps", "3", "--warmup", "1", "--runs", "full,mixed,packed", "--workdir", str(tmp_path),
                 code=code)
    assert res.returncode == 0, res.stderr
    *plan, loaded = res.stdout.strip().splitlines()
    assert json.loads(loaded) == []  # numpy only: `import unsloth` could still come first
    text = "\n".join(plan)
    rows = MICRO * ACCUM * 3
    mixed_tokens = sum(mixed_lengths(2000, 42)[:rows])  # seed-mixed's padded micro-batches read these rows
    assert f"unsloth-full: full data, padding-free ({{'padding_free': True}}): {rows} rows, {rows * MAX_LEN:,} tokens" in text
    assert f"unsloth-mixed: mixed data, padding-free ({{'padding_free': True}}): {rows} rows, {mixed_tokens:,} tokens" in text
    assert "unsloth-packed-mixed: mixed data, packing" in text
    assert f"{tmp_path / 'mistral-7b-random-32l'} (absent" in text


@pytest.mark.parametrize("argv, names", [
    (["--runs", "full,pack"], "--runs 'full,pack': unknown run pack; choose from full, mixed, packed"),
    (["--steps", "2", "--warmup", "2"], "--warmup 2 with --steps 2: needs 0 <= warmup < steps"),
    (["--layers", "0"], "--layers 0: needs at least 1"),
])
def test_bad_flags_are_one_line_naming_them(argv, names, capsys):
    with pytest.raises(SystemExit) as e:
        unsloth_bench.parse_args(["--dry", *argv])
    assert e.value.code == 2
    assert names in capsys.readouterr().err


def test_import_unsloth_refuses_a_process_with_transformers_loaded(monkeypatch):
    # only transformers loaded, whatever else this test process imported before (under xdist, peft often is)
    for name in unsloth_bench.LOADED_FIRST:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "transformers", types.ModuleType("transformers"))
    with pytest.raises(SystemExit, match="transformers imported before unsloth; run this file as its own process"):
        unsloth_bench.import_unsloth()


def test_import_unsloth_without_it_names_the_package_set(monkeypatch):
    for name in unsloth_bench.LOADED_FIRST:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "unsloth", None)  # as if not installed, whatever this machine has
    with pytest.raises(SystemExit, match="cannot import unsloth .*unsloth_wheels.sh, PYTHONPATH=/tmp/site_u"):
        unsloth_bench.import_unsloth()


def test_reset_lora_restores_the_same_init_in_place():
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj, self.other = (torch.nn.Linear(8, 8) for _ in range(3))

    model = peft.get_peft_model(Block(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora = [(m.lora_A["default"].weight, m.lora_B["default"].weight) for m in model.modules() if hasattr(m, "lora_A")]
    assert unsloth_bench.reset_lora(model, 7) == 2
    first = [(a.clone(), b.clone()) for a, b in lora]
    with torch.no_grad():
        for a, b in lora:  # as a run's optimizer steps leave them
            a.add_(1.0)
            b.add_(1.0)
    assert unsloth_bench.reset_lora(model, 7) == 2
    for (a, b), (a0, b0) in zip(lora, first):
        assert torch.equal(a, a0) and torch.count_nonzero(a) > 0
        assert torch.count_nonzero(b) == 0  # B = 0: the adapter starts as the identity, as PEFT's init
    unsloth_bench.reset_lora(model, 8)
    assert not torch.equal(lora[0][0], first[0][0])
    with pytest.raises(RuntimeError, match="no LoRA layers"):
        unsloth_bench.reset_lora(Block(), 7)


def test_gpu_bench_trains_the_lora_of_the_workload():
    pytest.importorskip("peft")
    from bench import gpu_bench, workload

    cfg = gpu_bench.lora()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (LORA["r"], LORA["lora_alpha"], LORA["lora_dropout"],
                                                                  "none")
    assert set(cfg.target_modules) == set(LORA["target_modules"])
    assert gpu_bench.synthetic_sets is workload.synthetic_sets  # the rows and checkpoint unsloth_bench uses too
    assert gpu_bench.write_random_checkpoint is workload.write_random_checkpoint


def test_gpu_bench_compiled_layers_run_their_warm_up_graphs_in_sfttrainers_steps(monkeypatch, tmp_path):
    """gpu_bench's fused-compile on the H200 (2026-12-02): its warm-up compiled 8 graphs, then every decoder-layer call
    of the steps ran eagerly (1,792 of 1,792; slower than eager fused). SFTTrainer calls the model with
    `fused_lm_head=True`, whose fused head runs the backbone itself, past the causal LM's forward; on CUDA that forward
    is Liger's, which passes `output_attentions`, `output_hidden_states` and `cache_position` on to every layer. The
    warm-up called `model(**batch)`, through Liger's forward: the layers' kwargs differed in number and torch's guard
    (`len(kwargs) == 12`) failed on every call. Liger's call stands in on the CPU (helpers.liger_like_forward), with the
    bench's trainer, collator, fused LoRA and `compile_trainer_layers`: every layer call of the steps runs a warm-up graph,
    none eagerly, nothing compiles, and SFTTrainer's first logged token count is its steps' own (not the warm-up's)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("trl")
    import types

    from helpers import liger_like_forward
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import SFTConfig

    from bench import gpu_bench, workload
    from tasks.engine import compile as compile_mod
    from tasks.engine.fastpath import PaddingFreeCollator, pack_by_tokens, packed_hf_dataset
    from tasks.engine.lora import fuse_lora

    vocab, micro, max_len = 256, 2, 64
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    monkeypatch.setattr(gpu_bench, "VOCAB", vocab)  # the warm-up batches' shape: the workload's, scaled down
    monkeypatch.setattr(gpu_bench, "MICRO", micro)
    monkeypatch.setattr(gpu_bench, "MAX_LEN", max_len)
    torch.manual_seed(0)
    config = AutoConfig.for_model("mistral", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.forward = types.MethodType(liger_like_forward, model)  # what prepare_fast_model patches in on CUDA
    lengths = [64, 30, 20, 50, 64, 12, 40, 33, 64, 64, 17, 25]
    packs = pack_by_tokens(lengths, micro * max_len, 0)
    collator = PaddingFreeCollator(max_tokens=micro * max_len)
    bench_trainer, _ = workload.trainer_classes()
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=1, gradient_accumulation_steps=2,
                     logging_steps=1, save_strategy="no", report_to="none", bf16=True, use_cpu=True, gradient_checkpointing=True,
                     max_length=max_len, dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer = bench_trainer(model=model, args=args, train_dataset=packed_hf_dataset(workload.make_rows(lengths, 0, vocab), packs),
                            processing_class=workload.build_tokenizer(vocab), data_collator=collator,
                            peft_config=LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.05,
                                                   target_modules=LORA["target_modules"]))
    assert fuse_lora(trainer.model) == 14
    state = gpu_bench.compile_trainer_layers(trainer, collator, "cpu")
    assert state.active and state.graphs > 0 and state.eager_calls == 0
    # the warm-up ran with the layers checkpointed, as the steps run them (Trainer turns it on only in train(); a
    # warm-up without it kept every layer's activations: out of memory at the bench's cap on the H200)
    assert all(layer.gradient_checkpointing for layer in trainer.model.get_base_model().model.layers)
    graphs = compile_mod.compiled_graphs()
    trainer.train()
    # before: 16 eager calls, every one (2 steps x 2 packs x 2 layers x forward and recompute)
    assert state.eager_calls == 0 and compile_mod.compiled_graphs() == graphs and state.active
    first = trainer.state.log_history[0]
    assert first["num_tokens"] == sum(lengths[i] for p in packs[:2] for i in p)


# ---------------------------------------------------------------------------------------------- unsloth_table


def results(info: dict, runs: list[dict]) -> dict:
    base = {"shapes": "mistral-7b", "layers": 32, "optim": "paged_adamw_8bit", "steps": 6, "warmup": 2,
            "versions": {"gpu": "NVIDIA H200"}}
    return {"info": {**base, **info}, "results": runs}


def ok(name, engine, data, tok_s, peak=7.0, **kw):
    return {"name": name, "engine": engine, "data": data, "ok": True, "tokens_per_s": tok_s, "peak_gib": peak,
            "gradient_checkpointing": True, "n_recompute_free": 0, **kw}


def write(tmp_path, bench: dict, unsloth: dict) -> list[str]:
    (tmp_path / "results.json").write_text(json.dumps(bench))
    (tmp_path / "unsloth.json").write_text(json.dumps(unsloth))
    return [str(tmp_path / "results.json"), str(tmp_path / "unsloth.json")]


def test_table_gives_ratios_to_the_fastest_unsloth_run_on_the_same_data(tmp_path, capsys):
    bench = results({}, [ok("seed-full", "seed", "full", 1000.0), ok("fused-full", "fused", "full", 2000.0),
                         ok("fused-mixed", "fused", "mixed", 3000.0),
                         {"name": "nockpt-full", "engine": "fast", "data": "full", "ok": False, "error": "OutOfMemoryError: x",
                          "peak_gib": 14.9, "gradient_checkpointing": False}])
    unsloth = results({}, [ok("unsloth-full", "unsloth", "full", 4000.0, 6.5, batching="padding-free"),
                           ok("unsloth-mixed", "unsloth", "mixed", 5000.0, batching="padding-free"),
                           ok("unsloth-packed-mixed", "unsloth", "mixed", 6000.0, batching="packing")])
    out = tmp_path / "table.md"
    assert unsloth_table.main([*write(tmp_path, bench, unsloth), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fused-full | fused | full | 2,000 | 7.00 | 0.50 |" in text
    assert "| seed-full | seed | full | 1,000 | 7.00 | 0.25 |" in text
    assert "| fused-mixed | fused | mixed | 3,000 | 7.00 | 0.50 |" in text  # against packed, the faster Unsloth mixed
    assert "| unsloth-mixed | Unsloth, padding-free | mixed | 5,000 | 7.00 | 0.83 |" in text
    assert "| nockpt-full | fast (no recompute) | full | failed: OutOfMemoryError: x | 14.90 | - |" in text
    assert "full: unsloth-full (4,000 tok/s, 6.50 GiB), mixed: unsloth-packed-mixed (6,000 tok/s, 7.00 GiB)" in text
    assert out.read_text() == text


def test_table_reads_an_old_results_file_as_the_mistral_workload(tmp_path, capsys):
    bench = results({}, [ok("fast-full", "fast", "full", 2000.0)])
    del bench["info"]["shapes"], bench["info"]["optim"]  # results.json from before --shapes / --optim
    unsloth = results({"steps": 8}, [ok("unsloth-full", "unsloth", "full", 4000.0, batching="padding-free")])
    assert unsloth_table.main(write(tmp_path, bench, unsloth)) == 0
    text = capsys.readouterr().out
    assert "| fast-full | fast | full | 2,000 | 7.00 | 0.50 |" in text
    assert "Note: gpu_bench timed steps 2..6, Unsloth 2..8." in text


@pytest.mark.parametrize("change, named", [
    ({"shapes": "llama-3.1-8b"}, "shapes mistral-7b vs llama-3.1-8b"),
    ({"layers": 4}, "layers 32 vs 4"),
    ({"optim": "adamw_torch_fused"}, "optim paged_adamw_8bit vs adamw_torch_fused"),
    ({"versions": {"gpu": "NVIDIA H100"}}, "gpu NVIDIA H200 vs NVIDIA H100"),
])
def test_table_refuses_two_workloads(tmp_path, capsys, change, named):
    bench = results({}, [ok("fast-full", "fast", "full", 2000.0)])
    unsloth = results(change, [ok("unsloth-full", "unsloth", "full", 4000.0, batching="padding-free")])
    assert unsloth_table.main(write(tmp_path, bench, unsloth)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"unsloth_table: not the same workload: {named}" in captured.err


def test_table_names_an_unreadable_file(tmp_path, capsys):
    (tmp_path / "unsloth.json").write_text(json.dumps({"results": []}))
    assert unsloth_table.main([str(tmp_path / "missing.json"), str(tmp_path / "unsloth.json")]) == 2
    assert "cannot read results file" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps(results({}, [])))
    assert unsloth_table.main([str(tmp_path / "results.json"), str(tmp_path / "unsloth.json")]) == 2
    err = capsys.readouterr().err
    assert "cannot read unsloth file" in err and "no 'info' object and 'results' list in it" in err


def test_graph_step_packed_inputs_train_the_same_tokens_as_its_rows():
    """bench/graph_step.py `--inputs packed` (issue 19's Trainer split): the own loop fed the Trainer runs' packed row
    (PaddingFreeCollator, varlen attention) computes the loss of its (MICRO, MAX_LEN) rows: the same 4 x (len - 1)
    trained tokens, each sample attending to itself only. On CPU the varlen attention runs one sdpa per sample."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bench import graph_step
    from tasks.engine.fastpath import register_varlen_attention

    cfg = AutoConfig.for_model("mistral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    rows = torch.randint(3, 64, (4, 24))
    with torch.no_grad():
        plain = graph_step.forward_loss(model, rows)
        (batch,) = graph_step.packed([rows], device="cpu")
        assert batch["input_ids"].shape == (1, 96) and batch["cu_seq_lens_q"].tolist() == [0, 24, 48, 72, 96]
        model.set_attn_implementation(register_varlen_attention())
        packed = graph_step.forward_loss(model, batch)
    assert torch.allclose(plain, packed, rtol=1e-5), (plain, packed)


def test_gpu_bench_plain_trainer_is_stage_4s_loop():
    """`gpu_bench.py --trainer plain`: transformers' Trainer (tasks/train.py's base), not TRL's SFTTrainer with its fused
    LM head and per-micro-batch metrics; the sequential sampler and token counting stay."""
    import pytest
    from transformers import Trainer
    from trl import SFTTrainer

    from bench import workload

    plain, _ = workload.trainer_classes("plain")
    sft, _ = workload.trainer_classes()
    assert issubclass(plain, Trainer) and not issubclass(plain, SFTTrainer) and issubclass(sft, SFTTrainer)
    assert "training_step" in vars(plain) and "_get_train_sampler" in vars(plain)
    with pytest.raises(ValueError, match="plain"):
        workload.trainer_classes("unsloth")


def test_answer_lengths_reads_each_assistant_turn_from_the_labels():
    """bench/answer_lengths.py: one span per run of trained-on tokens (an assistant turn), none for the masked prompt."""
    from bench.answer_lengths import assistant_spans

    ids = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    labels = [-100, -100, 3, 4, -100, -100, 7, 8, 9]
    assert assistant_spans(ids, labels) == [[3, 4], [7, 8, 9]]
    assert assistant_spans(ids, [-100] * 9) == []


def test_answer_repeats_counts_words_inside_a_span_written_before():
    """bench/answer_repeats.py: a 10-word span written again counts its words; a text with no repeat counts none."""
    from bench.answer_repeats import repeated_share

    once = [f"w{i}" for i in range(20)]
    assert repeated_share(once) == 0.0
    assert repeated_share(once + once[:10]) == 10 / 30  # the second copy of the first ten words
    assert repeated_share(once + once[:9]) == 0.0  # nine words again: no 10-word span repeats


def test_gpu_bench_full_rows_runs_on_the_plain_trainer_only(monkeypatch, capsys):
    """--full-rows batches are plain rows (no attention_mask, no position_ids), which TRL's SFTTrainer refuses in its
    first step's token count; the bench says so before loading anything (the default trainer is sft)."""
    from bench import gpu_bench

    monkeypatch.setattr("sys.argv", ["gpu_bench.py", "--full-rows"])
    with pytest.raises(SystemExit) as exit_:
        gpu_bench.main()
    assert exit_.value.code == 2 and "--full-rows needs --trainer plain" in capsys.readouterr().err


def test_gpu_bench_offload_kwargs_are_json_objects_one_run_each(monkeypatch, capsys):
    """--offload-kwargs: each a JSON object for offload_checkpoints, one fused-offload run each (the first keeps the old
    name, so older results compare); anything else is refused before the model loads."""
    from bench import gpu_bench

    assert gpu_bench.offload_variants(None) == [("fused-offload-full", {})]
    assert gpu_bench.offload_variants([{}, {"prefetch": True}, {"max_fwd_stash_size": 10}]) == [
        ("fused-offload-full", {}), ("fused-offload-full-v1", {"prefetch": True}), ("fused-offload-full-v2", {"max_fwd_stash_size": 10})]
    for bad, says in (("{prefetch: true}", "not JSON"), ("[1]", "needs a JSON object")):
        monkeypatch.setattr("sys.argv", ["gpu_bench.py", "--offload-kwargs", bad])
        with pytest.raises(SystemExit) as exit_:
            gpu_bench.main()
        assert exit_.value.code == 2 and f"--offload-kwargs: {says}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- pipeline_gpu


def test_pipeline_gpu_times_the_stages_steps_and_its_host_ledger_then_unwraps_everything(tiny_cfg, shared_artifacts):
    """bench/pipeline_gpu.py's instruments on the tiny CPU stage: the guard's step ends (one per step), the ledger's
    pieces per step (one optimizer step and one fetch of micro-batches a step, the guard's heartbeat handed over once a
    step, written by its thread), and every wrapped
    function back as it was after (torch.Tensor.item inherited again, not shadowed)."""
    import torch

    import tasks.train as train_mod
    from bench import pipeline_gpu
    from tasks.data import load_dataset_records
    from tasks.probe import probe_throughput

    data = load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)
    probe = probe_throughput(data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, tiny_cfg.training, tiny_cfg.budget, "cpu", shared_artifacts)
    probe = probe.model_copy(update={"key": "bench-ledger", "max_steps": 4, "budget_seconds": 600.0})
    training = tiny_cfg.training.model_copy(update={"max_steps": 4})
    before = (train_mod.BudgetGuard.on_step_end, train_mod.write_json, torch.cuda.synchronize)
    with pipeline_gpu.StepClock() as steps, pipeline_gpu.HostLedger() as ledger:
        rec = train_mod.train_adapter(data, probe, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, shared_artifacts)
    assert rec.steps == 4 and len(steps.ends) == 4 and len(steps.deltas) == 3
    assert steps.summary(skip=1)["n"] == 2 and steps.summary(skip=5) == {"n": 0}
    per = ledger.per_step(rec.steps)
    calls = per["calls_per_step"]
    assert calls["optimizer.step"] == 1 and calls["guard.on_step_end"] == 1 and calls["fetch + collate + copy"] == 1
    assert calls["heartbeat.beat (training thread)"] == 1 and calls["write_json (heartbeat thread, markers)"] > 0 and per["optimizer.step"] > 0
    assert calls["Tensor.item (cpu)"] > 0 and not [k for k in calls if k.startswith("Tensor.item") and k != "Tensor.item (cpu)"], calls
    assert (train_mod.BudgetGuard.on_step_end, train_mod.write_json, torch.cuda.synchronize) == before
    assert "item" not in torch.Tensor.__dict__ and "on_pre_optimizer_step" not in train_mod.BudgetGuard.__dict__


def test_pipeline_gpu_refuses_an_unknown_loss_read_mode(monkeypatch, capsys):
    from bench import pipeline_gpu

    monkeypatch.setattr(sys, "argv", ["pipeline_gpu.py", "--loss-read", "each-step,later"])
    with pytest.raises(SystemExit):
        pipeline_gpu.main()
    assert "--loss-read 'each-step,later': modes are deferred, each-step" in capsys.readouterr().err


def test_pipeline_gpu_does_not_report_a_deferred_read_it_cannot_run_on_several_gpus(monkeypatch, tmp_path, capsys):
    from bench import pipeline_gpu

    runs = []

    def run_once(overrides, args, log):
        runs.append((next(o for o in overrides if o.startswith("training.gpus=")), list(args.loss_reads)))
        return {"gpus": 2, "card": "x", "probe_s_per_step": 1.0, "steps": 1, "expected_steps": 1, "wall_s": 1.0, "budget_s": 1.0,
                "budget_error": 0.0, "train_tokens_per_s_excl_load": 1.0, "first_loss": 1.0, "final_loss": 1.0}

    monkeypatch.setattr(pipeline_gpu, "run_once", run_once)
    monkeypatch.setattr(pipeline_gpu, "mixed_chats", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["pipeline_gpu.py", "--gpus", "2", "--loss-read", "each-step,deferred", "--artifacts", str(tmp_path),
                                      "--out", str(tmp_path / "o.json")])
    try:
        pipeline_gpu.main()
    except SystemExit:
        err = capsys.readouterr().err
        assert "--loss-read 'each-step,deferred' with --gpus 2: the deferred read runs on one process only; time it with --gpus 1" in err
        return  # refused, in one line
    assert not [r for r in runs if r[0] != "training.gpus=1" and "deferred" in r[1]], runs


def test_pipeline_gpu_ledger_that_cannot_wrap_a_name_leaves_nothing_wrapped(monkeypatch):
    import torch
    import transformers

    import tasks.train as train_mod
    from bench import pipeline_gpu

    before = (train_mod.BudgetGuard.on_step_end, train_mod.write_json, torch.cuda.synchronize)
    monkeypatch.delattr(transformers.Trainer, "get_batch_samples")
    ledger = pipeline_gpu.HostLedger()
    try:
        with pytest.raises(AttributeError):
            with ledger:
                pass
        left = ("item" in torch.Tensor.__dict__, (train_mod.BudgetGuard.on_step_end, train_mod.write_json, torch.cuda.synchronize) != before)
    finally:
        ledger.__exit__(None, None, None)  # this test's own clean-up: later tests get the real functions
    assert left == (False, False)


def test_item_sites_counts_each_item_call_by_its_site_and_restores_item(tmp_path):
    """bench/item_sites.py (issue 19's 942 item calls a step): on CPU the fused engine's only per-layer item call is the
    LoRA dropout seed, one per LoRA group (q/k/v, o, gate/up, down) in each layer's forward and again in its recompute;
    with dropout 0 none. Tensor.item is torch's own again after it."""
    import torch

    from bench import item_sites

    before = torch.Tensor.item
    for dropout, want in ((0.05, 2 * 2 * 4), (0.0, 0)):
        out = tmp_path / f"items-{dropout}.json"
        assert item_sites.main(["--device", "cpu", "--layers", "2", "--hidden", "64", "--tokens", "96",
                                "--dropout", str(dropout), "--out", str(out), "--artifacts", str(tmp_path / "art")]) == 0
        got = json.loads(out.read_text())
        assert got["item_calls"] == want, got
        if want:
            assert [s["site"].split(" <- ")[0] for s in got["sites"]] == ["engine/lora.py:65:draw_seed"], got
    assert torch.Tensor.item is before


# ---------------------------------------------------------------------------------------------- merge_check


def test_review_cache16_merge_check_calls_save_merged_with_the_arguments_it_takes():
    """Each call of save_merged in bench/merge_check.py binds to save_merged's signature (the script needs a trained
    model to reach the call, so the call is read from its source and bound with stand-ins for its arguments)."""
    import ast
    import inspect

    from tasks.merge import save_merged

    tree = ast.parse((ROOT / "bench" / "merge_check.py").read_text(encoding="utf-8"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "save_merged"]
    assert calls, "bench/merge_check.py no longer calls save_merged"
    sig = inspect.signature(save_merged)
    for call in calls:
        sig.bind(*[object()] * len(call.args), **{k.arg: object() for k in call.keywords})  # TypeError: a required one missing
