"""training.compile (issue 19 item 2): torch.compile on each decoder layer, compiled before training on synthetic
micro-batches of the run's shape and its variants (tasks/engine/compile.py), through the builder the probe's trials and
stage 4 share; after that nothing compiles (a variant no graph fits runs eagerly, counted).

On the CPU: the compiler is swapped at the module's seam (`compile.BACKEND`) for torch's `aot_eager` (dynamo's trace
and AOTAutograd's forward/backward split, run by eager kernels: ~18 s a warm-up) where the backward graphs are the
subject, and for dynamo's trace alone (`eager`: ~6 s, AOTAutograd is two thirds of a warm-up here) where only dynamo's
part is (its graphs, guards, caches, recompiles and graph breaks); one test runs the real inductor backend (C++ codegen
on this CPU: ~70 s for its four compiles, so `slow`). A backend that counts its graphs' runs shows the compiled code is
what trains; one that raises stands in for a compiler that fails. The GPU's numbers
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
# Graphs the warm-up compiles per layer kind, with checkpointing, on the tiny model (sdpa): packed rows exact, symbolic,
# a one-sample pack (no mask) and a full pack as (micro_batch, max_length) rows; padded batches exact, symbolic, fewer
# rows and no padding (no mask).
GRAPHS = {"padded": 4, "fused": 4, "fast": 4}
# At micro-batch 1 (a quarter of the compute per step): packed rows exact, symbolic and a one-sample pack (no rows:
# a full pack is one sample); padded batches exact, symbolic and no padding (no fewer rows).
GRAPHS_MB1 = 3
ROWS_MB1 = ((30,), (17,), (40,))  # micro-batches of one row: padded to 32 and 24 (a mask), and 40 unpadded (no mask)


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


def counting_backend(counts: dict, aot: bool = True, fail_after: list | None = None):
    """aot_eager whose compiled forward and backward graphs count how often they are compiled and run; `aot=False`:
    dynamo's graphs run as traced (no AOTAutograd, no backward graphs), counted as forward graphs. `fail_after`: once
    it holds "warm", each graph asked for is noted there and its compile fails: on a backward one, the compiler failure
    that, met in a training step, raised in `loss.backward()` (AOTAutograd compiles a graph with symbolic sizes'
    backward there, lazily), where no fallback can reach; on a forward one, a compile error a forward meets while
    training (torch without stances)."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    if not aot:
        def dynamo_only(gm, example_inputs):
            counts["forward_graphs"] = counts.get("forward_graphs", 0) + 1

            def run(*args):
                counts["forward_runs"] = counts.get("forward_runs", 0) + 1
                return gm(*args)

            return run

        return dynamo_only

    def compiler(kind):
        def compile_graph(gm, example_inputs):
            if fail_after is not None and "warm" in fail_after:
                fail_after.append(kind)
                raise RuntimeError(f"injected {kind} compiler failure after the warm-up")
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


def _train_steps(model, engine, steps=3, batches=((24, 17, 30, 11), (40, 13, 22, 9), (19, 33, 27, 15), (46, 10, 20, 30))):
    """Per-step losses of a few AdamW steps on fixed micro-batches of varying lengths (as packs vary), the model called
    as Trainer calls it."""
    collate = collator_for(engine, 0, model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for k, lengths in enumerate(batches[:steps]):
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


# Training batches in every form the warm-up compiles: packs of several samples and of one (its layers get no attention
# mask on sdpa); padded batches with padding, with fewer rows than the micro-batch (an epoch's last) and without padding
# (no mask either). Each of the second kind compiled a graph inside a training step before the warm-up covered it.
STEP_BATCHES = {"fused": ((24, 17, 30, 11), (40,), (19, 33, 27, 15), (45,)),
                "padded": ((24, 17, 30, 11), (40, 13, 22), (32, 32, 32, 32), (19, 33, 27, 15))}


def _check_compiled_layers_train_as_eager_does(tiny_cfg, shared_artifacts, monkeypatch, engine, asked=None):
    """Checkpointed layers, compiled: both layers share one graph per variant (GRAPHS: the warm-up's exact sizes, then
    symbolic ones, then each other form a batch takes), the training steps, packs of one sample and short or unpadded
    batches among them, compile nothing more and run the compiled forward and backward for every layer (the backward's
    forward included: the recompute reruns the compiled layer), none of them eagerly; a forward keeps for the backward
    what eager checkpointing keeps (the checkpoint stays outside the compiled region: transformers 5.2x's checkpointing
    wrapper, compiled, kept 5x the tensors), and per-step losses equal eager's. `asked`: the backend also fails on any
    graph asked for once `asked` holds "warm" (counting_backend). Returns (the eager reference, the compiled model,
    its log lines, the backend's counts), trained; then the reference's trained LoRA weights are copied into the
    compiled model, so what the caller compares next starts from the same weights."""
    steps = len(STEP_BATCHES[engine])
    reference = _model(tiny_cfg, shared_artifacts, engine, compiled=False)
    kept = _saved(reference, engine)
    eager = _train_steps(reference, engine, steps, STEP_BATCHES[engine])
    counts: dict = {}
    monkeypatch.setattr(compile_mod, "BACKEND", counting_backend(counts, fail_after=asked))
    logs = []
    model = _model(tiny_cfg, shared_artifacts, engine, compiled=True, log=logs.append)
    state = model.layer_compile
    layers = checkpointed_layers(model)
    assert state.active and state.layers == layers and len(layers) == 2 and not logs
    assert all("forward" in vars(layer) for layer in layers)  # each layer's forward is the compiled one
    graphs = GRAPHS[engine]
    assert state.graphs == graphs and counts["forward_graphs"] == graphs and counts["backward_graphs"] == graphs
    assert _saved(model, engine) == kept
    warm = dict(counts)
    compiled = _train_steps(model, engine, steps, STEP_BATCHES[engine])
    assert counts["forward_graphs"] == graphs and counts["backward_graphs"] == graphs  # nothing compiled in the steps
    assert counts["forward_runs"] - warm["forward_runs"] == steps * 2 * 2  # steps x 2 layers x (forward + recompute)
    assert counts["backward_runs"] - warm["backward_runs"] == steps * 2
    assert state.eager_calls == 0 and not logs
    assert _close(eager, compiled), (eager, compiled)
    trained = dict(reference.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(trained[name])
    return reference, model, logs, counts


def test_compiled_layers_train_as_eager_does_and_a_full_pack_trains_as_rows_with_the_packed_rows_loss(tiny_cfg, shared_artifacts,
                                                                                                     monkeypatch):
    """One aot_eager build, two claims. _check_compiled_layers_train_as_eager_does on the `fused` engine, which runs
    PEFT's LoRA forward inside the graph (the fused path hands over while compiling); the `padded` engine's case opens
    test_a_variant_the_warm_up_did_not_compile_runs_eagerly_..., one build for both there too.

    Then a pack of micro_batch samples that each fill max_length goes as (micro_batch, max_length) rows (the collator
    build_model and stage 4 make): its layer calls run the warm-up's graph (none eagerly), and its loss and LoRA
    gradients are those of the same samples as one packed row through the eager model."""
    reference, model, _, counts = _check_compiled_layers_train_as_eager_does(tiny_cfg, shared_artifacts, monkeypatch, "fused")
    rows = _rows((48,) * 4, 5)
    results = []
    for net, shape in ((model, (4, 48)), (reference, None)):  # the compiled model as rows, the eager one packed
        batch = collator_for("fused", 0, net.train(), shape)(rows)
        assert ("cu_seq_lens_q" in batch) == (shape is None) and tuple(batch["input_ids"].shape) == ((4, 48) if shape else (1, 192))
        runs = counts["forward_runs"]
        loss = net(**batch, num_items_in_batch=(batch.get("shift_labels", batch["labels"][..., 1:]) != -100).sum()).loss
        loss.backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads))
        if shape:
            assert model.layer_compile.eager_calls == 0 and counts["forward_runs"] - runs == 2 * 2  # 2 layers, forward + recompute
    (rows_loss, rows_grads), (packed_loss, packed_grads) = results
    assert rows_loss == pytest.approx(packed_loss, rel=REL)
    for k, g in packed_grads.items():
        torch.testing.assert_close(rows_grads[k], g, atol=1e-5, rtol=1e-3, msg=k)


def test_4bit_layers_compile_without_graph_breaks_and_train_as_eager_does(tiny_cfg, shared_artifacts, monkeypatch):
    """bitsandbytes' NF4 layers (its CPU kernels: `quant.cpu_fallback: qlora`) inside the compiled layer: no graph break
    (its 4-bit matmul is a registered op, its quant state read through properties), one graph per variant for both
    layers (the 4-bit weights are graph inputs, not per-layer constants), per-step losses equal eager's."""
    from torch._dynamo.utils import counters

    qlora = tiny_cfg.quant.model_copy(update={"cpu_fallback": "qlora"})  # at micro-batch 1: 3 graphs, not 4
    eager = _train_steps(_model(tiny_cfg, shared_artifacts, "padded", compiled=False, quant=qlora), "padded", 3, ROWS_MB1)
    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, quant=qlora, shape=(1, 48))
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    assert model.layer_compile.graphs == GRAPHS_MB1 and not counters["graph_break"]
    assert _close(eager, _train_steps(model, "padded", 3, ROWS_MB1)) and not counters["graph_break"]
    assert model.layer_compile.eager_calls == 0  # the steps ran the compiled graphs


def test_the_fused_path_hands_over_to_peft_inside_a_compiled_layer(tiny_cfg, shared_artifacts, monkeypatch):
    """With dropout the fused LoRA path draws its seed on the host (`.item()`) and keeps the group's product on a Python
    object: inside a compiled layer each would break the graph (48 graphs instead of 2, measured). It hands over to PEFT's
    forward there: no graph break, the warm-up's GRAPHS, and, since dynamo's graphs draw eager's random numbers in eager's
    order, exactly the per-step losses of the `fast` engine (PEFT's LoRA and dropout), eager."""
    from torch._dynamo.utils import counters

    fast = _train_steps(_model(tiny_cfg, shared_artifacts, "fast", compiled=False, dropout=0.1), "fast")
    monkeypatch.setattr(compile_mod, "BACKEND", "eager")  # dynamo's part is the subject
    model = _model(tiny_cfg, shared_artifacts, "fused", compiled=True, dropout=0.1)
    assert model.layer_compile.graphs == GRAPHS["fused"] and not counters["graph_break"]
    fused = _train_steps(model, "fused")
    assert not counters["graph_break"] and _close(fast, fused), (fast, fused)


def test_probe_and_training_compile_through_the_same_builder_and_count_it_as_load_time(tiny_cfg, tiny_data, shared_artifacts,
                                                                                      monkeypatch, tmp_path):
    """The probe's trial and stage 4 build compiled layers through build_model; the warm-up's compiles are inside the
    trial's load time (so the fixed cost), Trainer's real steps compile nothing more (the warm-up calls the model as
    Trainer does: its autocast, `num_items_in_batch`), and the records and logs say so."""
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    monkeypatch.setattr(compile_mod, "BACKEND", "eager")  # dynamo's part is the subject
    training = tiny_cfg.training.model_copy(update={"compile": "layers", "gradient_checkpointing": True, "max_steps": 2, "grad_accum": 2,
                                                    "micro_batch_size": 2})  # 2, not the profile's 8: still the padded warm-up's 4 graphs
    logs = []
    probe = probe_throughput(tiny_data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu", str(tmp_path), logs.append)
    (trial,) = probe.trials
    assert probe.compile_layers and trial["compile_layers"] and trial["compile_graphs"] == GRAPHS["padded"]
    assert trial["compile_graphs_in_steps"] == 0 and trial["compile_eager_calls_in_steps"] == 0
    assert 0 < probe.compile_seconds <= probe.load_seconds <= probe.fixed_seconds
    assert any(m.startswith(f"probe: micro-batch 2 x accum 2, checkpointing True (decoder layers compiled: {GRAPHS['padded']} graphs in")
               for m in logs)
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
    rec = ProbeRecord(key="k", dir=".", device="cuda", hardware="cuda:H200", budget_seconds=3600, load_seconds=80, save_seconds=0.5, final_save_seconds=0.5,
                      fixed_seconds=82, s_per_step=3.2, tokens_per_step=32768, tokens_per_s=10240, peak_mem_gb=7.9, max_steps=1099,
                      micro_batch_size=4, grad_accum=4, gradient_checkpointing=True, engine="fused", trials=trials, compile_layers=True,
                      compile_seconds=71.3)
    logs, artifacts = run_probe_stage(monkeypatch, rec, tiny_cfg, tiny_data)
    assert logs[-1].endswith("-> max_steps 1099 (where training ends nearest the budget) at micro-batch 4 x accum 4, decoder layers compiled (71 s, in the fixed cost)")
    md = artifacts[0]["markdown"]
    assert "| offloaded | compiled | s/step |" in md and "| 4 | 4 | True | 0 | False | True | 3.2 | 7.9 | True  |" in md
    logs, _ = run_probe_stage(monkeypatch, rec.model_copy(update={"compile_layers": False}), tiny_cfg, tiny_data)
    assert "compiled" not in logs[-1] and "recompute" not in logs[-1]
    logs, _ = run_probe_stage(monkeypatch, rec.model_copy(update={"compile_layers": False, "recompute_free_layers": 6}), tiny_cfg, tiny_data)
    assert logs[-1].endswith("at micro-batch 4 x accum 4, 6 layers without recompute")  # what stage 4 runs, as its record says


def _backward_fails_on_symbolic_graphs():
    """aot_eager whose backward compiler fails from its second graph on: the warm-up's symbolic one, whose backward
    AOTAutograd compiles lazily, so the failure is raised inside `loss.backward()`."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    seen = []

    def backward(gm, example_inputs):
        seen.append(1)
        if len(seen) > 1:
            raise RuntimeError("injected backward compiler failure")
        return make_boxed_func(gm)

    return aot_autograd(fw_compiler=lambda gm, example_inputs: make_boxed_func(gm), bw_compiler=backward)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_compiler_that_fails_in_the_warm_up_is_one_log_line_and_eager_layers(tiny_cfg, shared_artifacts, monkeypatch, where):
    """A compiler that raises (the fault injected at the backend seam): while dynamo compiles a forward (it wraps the
    error as BackendCompilerFailed), or while AOTAutograd compiles a symbolic graph's backward inside the warm-up's
    `loss.backward()`. Either way build returns a model with transformers' own forwards back, one log line says so, and
    training runs as eager would."""

    def broken(gm, example_inputs):
        raise RuntimeError("injected compiler failure")

    eager = _train_steps(_model(tiny_cfg, shared_artifacts, "padded", compiled=False), "padded")
    monkeypatch.setattr(compile_mod, "BACKEND", broken if where == "forward" else _backward_fails_on_symbolic_graphs())
    logs = []
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, log=logs.append)
    error = "BackendCompilerFailed from RuntimeError: injected" if where == "forward" else "RuntimeError: injected backward"
    assert not model.layer_compile.active and model.layer_compile.error.startswith(error)
    assert len(logs) == 1 and logs[0].startswith(f"compile: training.compile=layers failed in its warm-up step ({error}")
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


def _grads(model, batch, second_layer_eval=False) -> dict:
    model.train()
    if second_layer_eval:
        checkpointed_layers(model)[1].eval()  # dropout is 0: eval changes no number, only the variant torch sees
    model.zero_grad(set_to_none=True)
    model(**batch, num_items_in_batch=(batch["labels"][..., 1:] != -100).sum()).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    model.train()
    return grads


def _same_grads(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-7) for n in a)


def test_a_variant_the_warm_up_did_not_compile_runs_eagerly_and_without_stances_its_compile_error_sends_later_forwards_to_eager(
        tiny_cfg, shared_artifacts, monkeypatch):
    """One compiled build (an aot_eager warm-up is most of a test's time), three claims in turn.

    First, _check_compiled_layers_train_as_eager_does on the `padded` engine (test_compiled_layers_train_as_eager_does_...
    checks it on `fused`), which leaves the compiled model with the eager reference's trained LoRA weights, so the
    gradients below compare like with like.

    With stances: after the warm-up every call runs under torch's eager_on_recompile stance: a variant met in training
    that no graph fits (here: one layer in eval mode; a padded batch of one row at micro-batch 4, whose size 1 torch
    specializes) runs that layer eagerly, counted, one log line, and nothing is compiled, so a backward compile cannot
    fail inside `loss.backward()` (the injected compiler fails on any graph after the warm-up: without the stance this
    raised there). Within one forward a layer runs compiled and the next eagerly, and each checkpoint recompute runs its
    layer as its forward did (an eager recompute of a compiled forward saves other tensors: torch's CheckpointError).

    Without stances (torch < 2.6): a variant met in training compiles then. One that fails to compile (the same
    eval-mode second layer, now compiled, and failing) runs that layer eagerly, one log line; the first layer ran
    compiled in the same forward, and its checkpoint recompute must run compiled again; later forwards are eager.
    Gradients equal eager's throughout."""
    import contextlib

    asked: list = []
    reference, model, logs, _ = _check_compiled_layers_train_as_eager_does(tiny_cfg, shared_artifacts, monkeypatch, "padded", asked)
    state = model.layer_compile
    assert state.active and state.graphs == GRAPHS["padded"] and state.eager_calls == 0 and not logs
    asked.append("warm")
    batch = collator_for("padded", 0, model)(_rows((24, 17, 30, 11), 0))
    # with stances
    assert _same_grads(_grads(reference, batch, second_layer_eval=True), _grads(model, batch, second_layer_eval=True))
    assert asked == ["warm"] and state.eager_calls == 1  # the eval-mode layer (not checkpointed in eval: no recompute)
    assert len(logs) == 1 and logs[0].startswith("compile: a decoder layer was called in a variant its warm-up did not compile")
    assert "training" in state.eager_reason and logs[0].endswith(f"failed guards: {state.eager_reason}"), state.eager_reason
    one_row = collator_for("padded", 0, model)(_rows((21,), 1))
    assert _same_grads(_grads(reference, one_row), _grads(model, one_row))
    assert asked == ["warm"] and state.eager_calls == 1 + 2 * 2  # 2 layers x (forward + recompute), all eager
    assert _same_grads(_grads(reference, batch), _grads(model, batch))
    assert asked == ["warm"] and state.eager_calls == 5 and state.active and len(logs) == 1  # the compiled graphs again
    # without stances: the same eval-mode variant now compiles, and its compile fails
    monkeypatch.setattr(compile_mod, "_no_compiles", contextlib.nullcontext)  # as on a torch without set_stance
    assert _same_grads(_grads(reference, batch, second_layer_eval=True), _grads(model, batch, second_layer_eval=True))
    assert asked == ["warm", "forward"], f"without stances the eval-mode layer should have tried one forward compile: {asked}"
    assert len(logs) == 2 and logs[1].startswith("compile: training.compile=layers failed while training (BackendCompilerFailed"), logs
    assert not state.active, "a compile error while training must turn the compiled forward off"
    assert [layer._compiled_last for layer in checkpointed_layers(model)] == [True, False]
    _grads(model, batch)  # the next forward: eager throughout, no new compile attempt
    assert [layer._compiled_last for layer in checkpointed_layers(model)] == [False, False] and asked == ["warm", "forward"]


def test_warm_up_batches_differ_where_training_batches_do_and_take_each_form_they_take():
    """The second warm-up batch changes every size a training batch changes (so its compile makes them symbolic): packed
    rows their token count, sample count and longest sample; padded batches their padded length, both with padding.
    Then each other form a training batch reaches the layers in: a pack of one sample; padded, one row fewer (with
    padding) and rows without padding (no mask). At micro-batch 1 the packs that set the sizes hold several samples
    (a multi-sample pack's mask must be seen twice) and the padded rows carry padding."""
    from tasks.engine.collate import PaddedCollator
    from tasks.engine.fastpath import PaddingFreeCollator

    def form(batch):
        if "cu_seq_lens_q" in batch:
            return tuple(batch["input_ids"].shape), len(batch["cu_seq_lens_q"]) - 1, batch["max_length_q"]
        return tuple(batch["input_ids"].shape), bool(batch["attention_mask"].all())  # (rows, length), unpadded

    packed = [form(b) for b in compile_mod.warmup_batches(PaddingFreeCollator(), 4, 64, 100, padded=False)]
    assert packed == [((1, 256), 4, 64), ((1, 3 * 63 + 32 + 31), 5, 63), ((1, 61), 1, 61)]
    packed_1 = [form(b) for b in compile_mod.warmup_batches(PaddingFreeCollator(), 1, 64, 100, padded=False)]
    assert packed_1 == [((1, 64), 2, 32), ((1, 31 + 16 + 15), 3, 31), ((1, 61), 1, 61)]
    # full packs as rows (full_rows): a packed row leads (the full budget less a token), the rows come last
    rows = [form(b) if "cu_seq_lens_q" in b else (tuple(b["input_ids"].shape), "rows")
            for b in compile_mod.warmup_batches(PaddingFreeCollator(full_rows=(4, 64)), 4, 64, 100, padded=False)]
    assert rows == [((1, 255), 4, 64), ((1, 3 * 63 + 32 + 31), 5, 63), ((1, 61), 1, 61), ((4, 64), "rows")]
    # micro-batch 1 (a probe trial, an out-of-memory retry's last halving): no pack goes as rows, so the warm-up is the
    # packed one, its multi-sample packs first; below 24 tokens the rows are max_length long (n is 24 there)
    assert PaddingFreeCollator(full_rows=(1, 64)).full_rows is None
    assert [form(b) for b in compile_mod.warmup_batches(PaddingFreeCollator(full_rows=(1, 64)), 1, 64, 100, padded=False)] == packed_1
    short = compile_mod.warmup_batches(PaddingFreeCollator(full_rows=(2, 16)), 2, 16, 100, padded=False)
    assert "cu_seq_lens_q" in short[0] and tuple(short[-1]["input_ids"].shape) == (2, 16) and "cu_seq_lens_q" not in short[-1]
    padded = [form(b) for b in compile_mod.warmup_batches(PaddedCollator(0), 4, 64, 100, padded=True)]
    assert padded == [((4, 64), False), ((4, 56), False), ((3, 48), False), ((4, 48), True)]
    padded = [form(b) for b in compile_mod.warmup_batches(PaddedCollator(0), 1, 64, 100, padded=True)]
    assert padded == [((1, 64), False), ((1, 56), False), ((1, 48), True)]


def test_each_build_in_one_process_compiles_its_own_graphs_and_at_micro_batch_1_keeps_the_packed_warm_up(tiny_cfg, shared_artifacts,
                                                                                                         monkeypatch):
    """The probe builds a model per trial in one process. Each build starts from empty compile caches, so it compiles
    and records its own graphs however many builds came before, and its steps run them (none eagerly: torch's recompile
    limit, 8 per code object, is never reached, past which a layer ran eagerly while the record said compiled). Before,
    a build found the earlier builds' graphs (0 compiled, recorded so) and the trials' variants piled up on one cache.

    The last build is at micro-batch 1, where no pack goes as rows (a full pack is one sample), so collator_for sets no
    full_rows and the warm-up is the packed one, its multi-sample packs first: packs of several samples and of one, of
    any length, then train on its graphs, none eagerly (with a rows warm-up the one-sample pack led, the multi-sample
    pack's mask was fixed by a later exact compile, and every other multi-sample pack ran eagerly)."""
    counts: dict = {}
    monkeypatch.setattr(compile_mod, "BACKEND", counting_backend(counts, aot=False))
    for gc, shape in ((False, (1, 40)), (True, (1, 48))):  # 6 graphs, then 3: 9 on one cache were past torch's limit
        model = _model(tiny_cfg, shared_artifacts, "fused", compiled=True, gc=gc, shape=shape)
        state = model.layer_compile
        assert state.active and state.graphs == GRAPHS_MB1 * (1 if gc else 2)  # without checkpointing: layer 0's input needs no grad
        runs = counts["forward_runs"]
        _train_steps(model, "fused", 2, STEP_BATCHES["fused"])
        assert counts["forward_runs"] - runs == 2 * 2 * (2 if gc else 1) and state.eager_calls == 0
    collate = collator_for("fused", 0, model, (1, 48))  # as build_model made it for the last build
    model.train()
    for k, lengths in enumerate(((24, 17), (40,), (19, 13, 15), (48,))):
        batch = collate(_rows(lengths, k))
        model(**batch, num_items_in_batch=(batch.get("shift_labels", batch["labels"][..., 1:]) != -100).sum()).loss.backward()
    assert model.layer_compile.eager_calls == 0, model.layer_compile.eager_reason
    assert collate.full_rows is None


def test_the_warm_up_runs_under_trainers_autocast(tiny_cfg, shared_artifacts, monkeypatch, tmp_path):
    """Trainer's mixed precision runs each step's forward under autocast, global state the compiled graphs are guarded
    on: a warm-up without it would leave every training step a variant no graph fits (eager). compile_for_training with
    the run's autocast dtype (build_model passes bf16 on a GPU; here CPU autocast to bf16), then Trainer itself with
    bf16=True and its own rule for `num_items_in_batch`: every layer call of its steps runs a warm-up graph."""
    from transformers import Trainer, TrainingArguments

    counts: dict = {}
    monkeypatch.setattr(compile_mod, "BACKEND", counting_backend(counts, aot=False))
    model = _model(tiny_cfg, shared_artifacts, "fused", compiled=False)
    collate = collator_for("fused", 0, model, (4, 48))  # as build_model makes it
    vocab = model.get_base_model().config.vocab_size
    state = compile_mod.compile_for_training(model, compile_mod.warmup_batches(collate, 4, 48, vocab, padded=False), "cpu", torch.bfloat16)
    assert state.active and state.graphs == GRAPHS["fused"]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, bf16=True, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_rows((24, 17, 30, 11, 40, 13, 22, 9), 3), data_collator=collate)
    runs = counts["forward_runs"]
    trainer.train()
    assert counts["forward_runs"] - runs == 2 * 2 * 2 and state.eager_calls == 0 and counts["forward_graphs"] == GRAPHS["fused"]


def test_the_pipelines_trainer_runs_the_warm_up_graphs_through_a_liger_forward(tiny_cfg, shared_artifacts, monkeypatch, tmp_path):
    """On CUDA the fast engines' causal-LM forward is Liger's, which passes output flags and `cache_position` on to every
    decoder layer (gpu_bench's SFTTrainer steps bypassed it and ran every layer eagerly). The pipeline is not affected:
    build_model's warm-up and its Trainer both call the model itself, through that same forward, so the layers' kwargs
    match. Liger's call stands in here (helpers.liger_like_forward, on the class as Liger patches it)."""
    from helpers import liger_like_forward
    from transformers import Trainer, TrainingArguments
    from transformers.models.mistral import modeling_mistral

    monkeypatch.setattr(modeling_mistral.MistralForCausalLM, "forward", liger_like_forward)
    monkeypatch.setattr(compile_mod, "BACKEND", "eager")  # dynamo's part is the subject
    model = _model(tiny_cfg, shared_artifacts, "fused", compiled=True)
    state = model.layer_compile
    assert state.active and state.graphs == GRAPHS["fused"]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True, report_to=[],
                             save_strategy="no", disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=_rows((24, 17, 30, 11, 40, 13, 22, 9), 3),
                      data_collator=collator_for("fused", 0, model))
    graphs = compile_mod.compiled_graphs()
    trainer.train()
    assert state.eager_calls == 0 and compile_mod.compiled_graphs() == graphs


@pytest.mark.slow
def test_inductor_on_this_cpu_trains_as_eager_does(tiny_cfg, shared_artifacts):
    """The real backend (inductor's C++ code for this CPU): per-step losses within 1e-4 of eager, under checkpointing,
    every layer call on a warm-up graph. At micro-batch 1, whose padded warm-up compiles 3 graphs (exact, symbolic, no
    mask) rather than 4 (no fewer-rows batch): inductor's C++ compiles, with a cold cache as on a fresh CI box, are the
    test's time (~112 s at micro-batch 4, ~97 s at 1, on 2 busy cores, 2026-12-05), and the rows' lengths vary as packs
    do, with and without padding."""
    rows = ROWS_MB1
    eager = _train_steps(_model(tiny_cfg, shared_artifacts, "padded", compiled=False), "padded", 3, rows)
    logs = []
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, log=logs.append, shape=(1, 48))
    assert model.layer_compile.active and model.layer_compile.graphs == 3 and not logs
    assert _close(eager, _train_steps(model, "padded", 3, rows)) and model.layer_compile.eager_calls == 0


GEMMA3 = {"text_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "num_key_value_heads": 2, "initializer_range": 0.2, "head_dim": 16}, "mm_tokens_per_image": 4,
          "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "image_size": 28, "patch_size": 14}}


def test_a_multimodal_gemma3_without_checkpointing_builds_no_kv_cache_and_trains_its_compiled_layers(tiny_cfg, shared_artifacts,
                                                                                                   monkeypatch):
    """Gemma-3 4B/12B's model type (`gemma3`, multimodal) reads `use_cache` from its text config, which build_model's
    top-level `use_cache=False` did not reach: without checkpointing (which turns it off) every padded training forward
    built a DynamicCache, each decoder layer took the cache path (transformers' eager forward), and with
    training.compile=layers the warm-up compiled 0 graphs while the record said compiled, with 0 eager calls."""
    cfg = tiny_cfg.model_copy(update={"model": tiny_cfg.model.model_copy(update={"name": "random:gemma3", "random_config": GEMMA3})})
    counts: dict = {}
    monkeypatch.setattr(compile_mod, "BACKEND", counting_backend(counts, aot=False))
    model = _model(cfg, shared_artifacts, "padded", compiled=True, gc=False, shape=(1, 48))  # micro-batch 1: 12 graphs, not 16
    assert model.get_base_model().config.get_text_config().use_cache is False
    state = model.layer_compile
    assert state.active and state.graphs > 0 and state.eager_calls == 0
    runs = counts["forward_runs"]
    _train_steps(model, "padded", 2, ROWS_MB1)
    assert counts["forward_runs"] - runs == 2 * 2 and state.eager_calls == 0  # 2 steps x 2 text layers, compiled


def test_a_warm_up_that_compiled_nothing_is_not_a_compiled_run(tiny_cfg, shared_artifacts, monkeypatch):
    """Layers whose every call bypasses the compiled forward (here: each one said to read a KV cache) compile no graph.
    The state must not say compiled (the probe's record, stage 4 and their logs read `active`): one log line, the
    layers' own forwards back, and each bypassing call counted as eager."""
    monkeypatch.setattr(compile_mod, "BACKEND", "eager")  # dynamo's part is the subject
    monkeypatch.setattr(compile_mod, "_uses_cache", lambda kwargs: True)
    logs = []
    model = _model(tiny_cfg, shared_artifacts, "padded", compiled=True, log=logs.append)
    state = model.layer_compile
    assert state.graphs == 0 and state.eager_calls > 0
    assert not state.active and state.error.startswith("RuntimeError: its warm-up compiled no graph (2 decoder layers")
    assert len(logs) == 1 and logs[0].startswith("compile: training.compile=layers failed in its warm-up step (RuntimeError: its")
    assert not any("forward" in vars(layer) for layer in checkpointed_layers(model))
