"""training.compile (issue 19 item 2): torch.compile on each decoder layer, compiled before training on two synthetic
micro-batches (tasks/engine/compile.py), through the builder the probe's trials and stage 4 share.

On the CPU: the compiler is swapped at the module's seam (`compile.BACKEND`) for torch's `aot_eager` (dynamo's trace
and AOTAutograd's forward/backward split, run by eager kernels: seconds) in every test but one, which runs the real
inductor backend (C++ codegen on this CPU: 45-80 s for its two compiles, so `slow`). A backend that counts its graphs'
runs shows the compiled code is what trains; one that raises stands in for a compiler that fails. The GPU's numbers
(tokens/s, kernels per step, compile seconds) come from bench/gpu_bench.py (`--runs fused,fused-compile`).
"""

from __future__ import annotations

import pytest
import torch

from tasks.data import load_dataset_records
from tasks.engine import compile as compile_mod
from tasks.engine.build import build_model
from tasks.engine.collate import collator_for
from tasks.engine.recompute import checkpointed_layers
from tasks.models import resolve_model

REL = 1e-4  # per-step loss, compiled vs eager (fp32; only the order of sums may differ)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts and ends with torch.compile's caches and counters empty (a code object's cache outlives a model;
    the counters outlive torch._dynamo.reset())."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture(scope="module")
def tiny_data(tiny_cfg, shared_artifacts):
    return load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)


def counting_backend(counts: dict):
    """aot_eager whose compiled forward and backward graphs count how often they are compiled and run."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            counts[f"{kind}_graphs"] = counts.get(f"{kind}_graphs", 0) + 1

            def run(*args):
                counts[f"{kind}_runs"] = counts.get(f"{kind}_runs", 0) + 1
                return gm(*args)

            return make_boxed_func(run)

        return compile_graph

    return aot_autograd(fw_compiler=compiler("forward"), bw_compiler=compiler("backward"))


def _model(tiny_cfg, shared_artifacts, engine, compiled, gc=True, log=None, shape=(4, 48), dropout=0.0, quant=None):
    """The tiny Mistral through build_model (compiled: its warm-up on two micro-batches of `shape`), then LoRA-B made
    random so every LoRA weight gets a gradient (weights are the compiled graph's inputs, not its constants). Dropout 0
    unless asked: inductor's graphs draw dropout masks otherwise than eager."""
    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    lora = tiny_cfg.lora.model_copy(update={"dropout": dropout})
    torch.manual_seed(0)
    model = build_model(ref, tiny_cfg.model, quant or tiny_cfg.quant, lora, gc, "cpu", engine, compile_layers=compiled, batch_shape=shape,
                        log_fn=log)
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    return model


def _rows(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(3, 200, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    return rows


def _train_steps(model, engine, steps=3):
    """Per-step losses of a few AdamW steps on fixed micro-batches of varying lengths (as packs vary), the model called
    as Trainer calls it."""
    collate = collator_for(engine, 0, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for k, lengths in enumerate([(24, 17, 30, 11), (40, 13, 22, 9), (19, 33, 27, 15), (46, 10, 20, 30)][:steps]):
        batch = collate(_rows(lengths, k))
        loss = model(**batch, num_items_in_batch=(batch["labels"][..., 1:] != -100).sum()).loss  # as Trainer calls it
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _saved(model, engine) -> tuple[int, int]:
    """(tensors, bytes) one forward keeps for the backward, as seen from outside the model: under non-reentrant
    checkpointing, each checkpointed layer's inputs (its internals are checkpoint's to recompute), plus the head's."""
    batch = collator_for(engine, 0, model)(_rows((24, 17, 30, 11), 9))
    model.train()
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
        loss = model(**batch, num_items_in_batch=torch.tensor(60)).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return len(kept), sum(kept)


def _close(a, b):
    return len(a) == len(b) and all(abs(x - y) <= REL * abs(x) for x, y in zip(a, b))


def test_compile_is_off_or_layers_and_a_bad_value_is_one_line():
    from tasks.config import ConfigError, load_config

    assert load_config(profile="tiny").training.compile == "off"  # until the GPU measures it (docs/PERF_NOTES.md)
    for given, read in (("layers", "layers"), ("off", "off"), ("false", "off"), ("true", "layers")):  # YAML reads off as false
        assert load_config(profile="tiny", overrides=[f"training.compile={given}"]).training.compile == read
    with pytest.raises(ConfigError) as e:
        load_config(profile="tiny", overrides=["training.compile=maybe"])
    assert str(e.value) == "training.compile: Input should be 'off' or 'layers' (got 'maybe')"


@pytest.mark.parametrize("engine", ["padded", "fused"])
def test_compiled_layers_train_as_eager_does_and_run_the_compiled_graphs(tiny_cfg, shared_artifacts, monkeypatch, engine):
    """Checkpointed layers, compiled: both layers share one graph per shape variant (2: the warm-up's exact sizes, then
    symbolic ones), the training steps compile nothing more and run the compiled forward and backward for every layer
    (the backward's forward included: the recompute reruns the compiled layer), a forward keeps for the backward what
    eager checkpointing keeps (the checkpoint stays outside the compiled region: transformers 5.2x's checkpointing
    wrapper, compiled, kept 5x the tensors), and per-step losses equal eager's. `fused` runs PEFT's LoRA forward inside
    the graph (the fused path hands over while compiling)."""
    reference = _model(tiny_cfg, shared_artifacts, engine, compiled=False)
    kept = _saved(reference, engine)
    eager = _train_steps(reference, engine)
    counts: dict = {}
    monkeypatch.setattr(compile_mod, "BACKEND", counting_backend(counts))
    logs = []
    model = _model(tiny_cfg, shared_artifacts, engine, compiled=True, log=logs.append)
    state = model.layer_compile
    layers = checkpointed_layers(model)
    assert state.active and state.layers == layers and len(layers) == 2 and not logs
    assert all("forward" in vars(layer) for layer in layers)  # each layer's forward is the compiled one
    assert state.graphs == 2 and counts["forward_graphs"] == 2 and counts["backward_graphs"] == 2
    assert _saved(model, engine) == kept
    warm = dict(counts)
    compiled = _train_steps(model, engine)
    assert counts["forward_graphs"] == 2 and counts["backward_graphs"] == 2  # nothing compiled in the steps
    assert counts["forward_runs"] - warm["forward_runs"] == 3 * 2 * 2  # 3 steps x 2 layers x (forward + recompute)
    assert counts["backward_runs"] - warm["backward_runs"] == 3 * 2
    assert _close(eager, compiled), (eager, compiled)


def test_4bit_layers_compile_without_graph_breaks_and_train_as_eager_does(tiny_cfg, shared_artifacts, monkeypatch):
    """bitsandbytes' NF4 layers (its CPU kernels: `quant.cpu_fallback: qlora`) inside the compiled layer: no graph break
    (its 4-bit matmul is a registered op, its quant state read through properties), one graph per variant for both
    layers (the 4-bit weights are graph inputs, not per-layer constants), per-step losses equal eager's."""
    from torch._dynamo.utils import counters

    qlora = tiny_cfg.quant.model_copy(update={"cpu_fallback": "qlora"})
    eager = _train_steps(_model(tiny_cfg, shared_artifacts, "padded", compiled=False, quant=qlora), "padded")
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, quant=qlora)
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    assert model.layer_compile.graphs == 2 and not counters["graph_break"]
    assert _close(eager, _train_steps(model, "padded")) and not counters["graph_break"]


def test_the_fused_path_hands_over_to_peft_inside_a_compiled_layer(tiny_cfg, shared_artifacts, monkeypatch):
    """With dropout the fused LoRA path draws its seed on the host (`.item()`) and keeps the group's product on a Python
    object: inside a compiled layer each would break the graph (48 graphs instead of 2, measured). It hands over to PEFT's
    forward there: no graph break, 2 graphs, and, since aot_eager draws eager's random numbers in eager's order, exactly
    the per-step losses of the `fast` engine (PEFT's LoRA and dropout), eager."""
    from torch._dynamo.utils import counters

    fast = _train_steps(_model(tiny_cfg, shared_artifacts, "fast", compiled=False, dropout=0.1), "fast")
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    model = _model(tiny_cfg, shared_artifacts, "fused", compiled=True, dropout=0.1)
    assert model.layer_compile.graphs == 2 and not counters["graph_break"]
    fused = _train_steps(model, "fused")
    assert not counters["graph_break"] and _close(fast, fused), (fast, fused)


def test_probe_and_training_compile_through_the_same_builder_and_count_it_as_load_time(tiny_cfg, tiny_data, shared_artifacts,
                                                                                      monkeypatch, tmp_path):
    """The probe's trial and stage 4 build compiled layers through build_model; the warm-up's compiles are inside the
    trial's load time (so the fixed cost), Trainer's real steps compile nothing more (the warm-up calls the model as
    Trainer does: its autocast, `num_items_in_batch`), and the records and logs say so."""
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    training = tiny_cfg.training.model_copy(update={"compile": "layers", "gradient_checkpointing": True, "max_steps": 2, "grad_accum": 2})
    logs = []
    probe = probe_throughput(tiny_data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu", str(tmp_path), logs.append)
    (trial,) = probe.trials
    assert probe.compile_layers and trial["compile_layers"] and trial["compile_graphs"] == 2 and trial["compile_graphs_in_steps"] == 0
    assert 0 < probe.compile_seconds <= probe.load_seconds <= probe.fixed_seconds
    assert any(m.startswith("probe: micro-batch 8 x accum 2, checkpointing True (decoder layers compiled: 2 graphs in") for m in logs)
    logs.clear()
    rec = train_adapter(tiny_data, probe, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, str(tmp_path), logs.append)
    assert rec.steps == 2 and rec.compile_layers
    assert any(m.startswith("train: ") and "decoder layers compiled in" in m for m in logs)
    plain = probe.model_copy(update={"compile_layers": False, "key": "eager"})  # stage 4 compiles only what the probe timed compiled
    rec = train_adapter(tiny_data, plain, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, str(tmp_path), logs.append)
    assert not rec.compile_layers and rec.compile_seconds == 0.0


def test_the_probe_stages_log_line_and_artifact_say_compiled(tiny_cfg, tiny_data, monkeypatch):
    """Stage 3's Prefect wrapper: its log line says the layers were compiled and that the compile is in the fixed cost;
    the trials table has a compiled column; nothing is said where they were not."""
    from helpers import run_probe_stage
    from tasks.probe import ProbeRecord

    trials = [{"micro_batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True, "recompute_free_layers": 0, "offload_activations": False,
               "compile_layers": True, "compile_seconds": 71.3, "compile_graphs": 2, "compile_graphs_in_steps": 0, "s_per_step": 3.2,
               "peak_mem_gb": 7.9, "fits": True}]
    rec = ProbeRecord(key="k", dir=".", device="cuda", hardware="cuda:H200", budget_seconds=3600, load_seconds=80, save_seconds=0.5,
                      fixed_seconds=82, s_per_step=3.2, tokens_per_step=32768, tokens_per_s=10240, peak_mem_gb=7.9, max_steps=1099,
                      micro_batch_size=4, grad_accum=4, gradient_checkpointing=True, engine="fused", trials=trials, compile_layers=True,
                      compile_seconds=71.3)
    logs, artifacts = run_probe_stage(monkeypatch, rec, tiny_cfg, tiny_data)
    assert logs[-1].endswith("-> max_steps 1099 at micro-batch 4 x accum 4, decoder layers compiled (71 s, in the fixed cost)")
    md = artifacts[0]["markdown"]
    assert "| offloaded | compiled | s/step |" in md and "| 4 | 4 | True | 0 | False | True | 3.2 | 7.9 | True  |" in md
    logs, _ = run_probe_stage(monkeypatch, rec.model_copy(update={"compile_layers": False}), tiny_cfg, tiny_data)
    assert "compiled" not in logs[-1]


def test_a_compiler_that_fails_in_the_warm_up_is_one_log_line_and_eager_layers(tiny_cfg, shared_artifacts, monkeypatch):
    """A compiler that raises (the fault injected at the backend seam; dynamo wraps it as BackendCompilerFailed): build
    returns a model with transformers' own forwards back, one log line says so, and training runs as eager would."""

    def broken(gm, example_inputs):
        raise RuntimeError("injected compiler failure")

    eager = _train_steps(_model(tiny_cfg, shared_artifacts, "padded", compiled=False), "padded")
    monkeypatch.setattr(compile_mod, "BACKEND", broken)
    logs = []
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, log=logs.append)
    assert not model.layer_compile.active and "BackendCompilerFailed" in model.layer_compile.error
    assert len(logs) == 1 and logs[0].startswith("compile: training.compile=layers failed in its warm-up step (BackendCompilerFailed")
    assert "the decoder layers run eagerly" in logs[0]
    assert not any("forward" in vars(layer) for layer in checkpointed_layers(model))
    assert all(p.grad is None for p in model.parameters())  # the warm-up left no gradient behind
    assert _close(eager, _train_steps(model, "padded"))
    assert len(logs) == 1


def test_an_out_of_memory_in_the_warm_up_stays_an_out_of_memory(tiny_cfg, shared_artifacts, monkeypatch):
    """The probe reads an out-of-memory as "does not fit": one inside the compiler (inductor benchmarks kernels) must not be
    taken for a compiler failure and trained through at a micro-batch that does not fit."""

    def oom(gm, example_inputs):
        raise torch.OutOfMemoryError("simulated while compiling")

    monkeypatch.setattr(compile_mod, "BACKEND", oom)
    with pytest.raises(torch.OutOfMemoryError, match="simulated while compiling"):
        _model(tiny_cfg, shared_artifacts, "padded", compiled=True)


def test_a_compile_error_while_training_sends_later_forwards_to_eager_and_each_recompute_follows_its_forward(
        tiny_cfg, shared_artifacts, monkeypatch):
    """After a good warm-up, a variant met in training fails to compile (here: the second layer alone in eval mode, a
    guard the warm-up did not cover, with a compiler that fails from its third graph on). That layer runs eagerly, one
    log line; the first layer ran compiled in the same forward, and its checkpoint recompute must run compiled again (an
    eager recompute saves other tensors: torch's CheckpointError). Gradients equal eager's; later forwards are eager."""
    from torch._dynamo.backends.debugging import aot_eager

    compiles = []

    def fails_after_two(gm, example_inputs):
        compiles.append(1)
        if len(compiles) > 2:
            raise RuntimeError("injected compiler failure on a new variant")
        return aot_eager(gm, example_inputs)

    reference = _model(tiny_cfg, shared_artifacts, "padded", compiled=False)
    monkeypatch.setattr(compile_mod, "BACKEND", fails_after_two)
    logs = []
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, log=logs.append)
    assert model.layer_compile.active and len(compiles) == 2
    batch = collator_for("padded", 0, model)(_rows((24, 17, 30, 11), 0))
    grads = {}
    for m in (reference, model):
        m.train()
        checkpointed_layers(m)[1].eval()  # dropout is 0: eval changes no number, only the compiled variant
        m(**batch, num_items_in_batch=torch.tensor(60)).loss.backward()
        grads[m] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    assert len(logs) == 1 and logs[0].startswith("compile: training.compile=layers failed while training (BackendCompilerFailed")
    assert not model.layer_compile.active
    assert [layer._compiled_last for layer in checkpointed_layers(model)] == [True, False]
    assert all(torch.allclose(grads[reference][n], grads[model][n], rtol=1e-5, atol=1e-7) for n in grads[reference])
    model.zero_grad(set_to_none=True)
    model(**batch, num_items_in_batch=torch.tensor(60)).loss.backward()  # the next forward: eager throughout, no new compile attempt
    assert [layer._compiled_last for layer in checkpointed_layers(model)] == [False, False] and len(compiles) == 3


def test_warm_up_batches_differ_where_training_batches_do():
    """The second warm-up batch changes every size a training batch changes (so its compile makes them symbolic): packed
    rows their token count, sample count and longest sample; padded batches their padded length, both with padding."""
    from tasks.engine.collate import PaddedCollator
    from tasks.engine.fastpath import PaddingFreeCollator

    a, b = compile_mod.warmup_batches(PaddingFreeCollator(), 4, 64, 100, padded=False)
    assert a["input_ids"].shape == (1, 256) and b["input_ids"].shape == (1, 3 * 63 + 32 + 31)
    assert (len(a["cu_seq_lens_q"]), a["max_length_q"]) == (5, 64) and (len(b["cu_seq_lens_q"]), b["max_length_q"]) == (6, 63)
    a, b = compile_mod.warmup_batches(PaddedCollator(0), 4, 64, 100, padded=True)
    assert a["input_ids"].shape == (4, 64) and b["input_ids"].shape == (4, 56)
    assert not a["attention_mask"].all() and not b["attention_mask"].all()


@pytest.mark.slow
def test_inductor_on_this_cpu_trains_as_eager_does(tiny_cfg, shared_artifacts):
    """The real backend (inductor's C++ code for this CPU): per-step losses within 1e-4 of eager, under checkpointing.
    45-80 s on 2 busy cores for its two compiles (each forward and backward), hence slow."""
    eager = _train_steps(_model(tiny_cfg, shared_artifacts, "padded", compiled=False), "padded")
    logs = []
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, log=logs.append)
    assert model.layer_compile.active and model.layer_compile.graphs == 2 and not logs
    assert _close(eager, _train_steps(model, "padded"))
