"""training.offload_activations (issue 19 item 3): TRL's activation offloading entered around every forward of the model the
probe and stage 4 build, the probe's memory search turning it on only where the fully checkpointed micro-batch does not
fit, and a clear no-op on the CPU. The GPU's numbers come from bench/gpu_bench.py (`--runs fused,fused-offload`)."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch

from tasks.common import StageError
from tasks.data import load_dataset_records
from tasks.engine.build import build_model
from tasks.engine.collate import collator_for
from tasks.models import resolve_model


@pytest.fixture(scope="module")
def tiny_data(tiny_cfg, shared_artifacts):
    return load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)


class FakeManager:
    """Stands in for TRL's manager (which needs an accelerator): records when it is entered and left, and whether a
    decoder layer ran inside it."""

    def __init__(self):
        self.events: list[str] = []
        self.active = False

    def __enter__(self):
        self.events.append("enter")
        self.active = True

    def __exit__(self, *exc):
        self.events.append("exit")
        self.active = False


@pytest.fixture
def fake_manager(monkeypatch):
    managers: list[FakeManager] = []

    def make(model, **kwargs):
        managers.append(FakeManager())
        return managers[-1]

    monkeypatch.setattr("trl.models.get_act_offloading_ctx_manager", make)  # offload_checkpoints imports it when called
    return managers


def _batch(tiny_tok, engine, model, n=4):
    g = torch.Generator().manual_seed(5)
    rows = []
    for length in (24, 17, 30, 11)[:n]:
        ids = torch.randint(3, min(len(tiny_tok), 1000), (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return collator_for(engine, tiny_tok.pad_token_id, model)(rows)


def test_the_manager_is_entered_around_every_forward_and_left_before_the_backward(tiny_cfg, tiny_tok, shared_artifacts, fake_manager):
    from tasks.engine import recompute

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    model = build_model(ref, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, True, "cpu", "padded", offload=True)
    (manager,) = fake_manager
    assert model.activation_offload is manager
    inside = []
    for layer in recompute.checkpointed_layers(model):
        layer.register_forward_pre_hook(lambda *a: inside.append(manager.active))
    model.train()
    inputs = _batch(tiny_tok, "padded", model)
    for _ in range(2):
        inside.clear()
        loss = model(**inputs).loss
        assert inside == [True, True]  # both decoder layers ran inside it
        assert not manager.active  # left when the forward returned: the backward unpacks on its own (and recomputes)
        loss.backward()
    assert manager.events == ["enter", "exit"] * 2
    with pytest.raises(ValueError, match="exclude|choose one"):
        recompute.set_recompute_free_layers(model, 1)  # offload and layers without recompute exclude each other

    plain = build_model(ref, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, True, "cpu", "padded")
    plain(**inputs)
    assert len(fake_manager) == 1 and getattr(plain, "activation_offload", None) is None  # off: no manager at all


@pytest.mark.parametrize("engine", ["padded", "fast", "fused"])
def test_trls_own_manager_moves_saved_tensors_and_leaves_the_gradients_unchanged(tiny_cfg, tiny_tok, shared_artifacts, engine, monkeypatch):
    """One real call of TRL's manager through `offload_checkpoints`, on each engine. A CPU-only torch has no accelerator
    and TRL's manager reads its type (it raises there), so the accelerator is said to be the CPU, without pinned memory
    or a side stream (torch's CPU stream cannot synchronize): its pack/unpack hooks then copy every saved tensor they
    are handed and bring it back in the backward, under non-reentrant checkpointing as on the GPU. (Entering, it empties
    the accelerator's cache once bitsandbytes is imported, which torch.cpu lacks.)"""
    from tasks.engine.recompute import offload_checkpoints

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    lora = tiny_cfg.lora.model_copy(update={"dropout": 0.0})
    torch.manual_seed(0)
    model = build_model(ref, tiny_cfg.model, tiny_cfg.quant, lora, True, "cpu", engine)
    with torch.no_grad():  # LoRA-B starts at zero: random B so that every LoRA weight gets a gradient
        for i, (name, p) in enumerate(model.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(i))
    model.train()
    inputs = _batch(tiny_tok, engine, model)

    def grads():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = grads()
    monkeypatch.setattr(torch.cpu, "empty_cache", lambda: None, raising=False)
    with mock.patch.object(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu")):
        manager = offload_checkpoints(model, use_pin_memory=False, use_streams=False)
    moved = []
    pack = manager.pack_hook

    def counting_pack(t):
        moved.append(t.numel())
        return pack(t)

    manager.pack_hook = counting_pack  # saved_tensors_hooks registers pack_hook when entered
    after = grads()
    assert moved, "TRL's hooks saw no saved tensor: the manager was not entered around the forward"
    assert not manager.tracker  # everything it took was given back in the backward
    assert before.keys() == after.keys() and all(torch.allclose(before[n], after[n], rtol=1e-5, atol=1e-7) for n in before)


def _fake_time(timed, peak_of):
    """The probe's `_time_setting` seam: the step costs 3 s (+2% offloaded), the peak is `peak_of(mb, offload, n_free)`,
    or an out-of-memory where that is None."""

    def fake(ref, model_cfg, quant, lora, training, budget, device, engine, train_ds, tok, mb, ga, gc, n_free, max_length, offload=False):
        timed.append((mb, ga, gc, n_free, offload))
        peak = peak_of(mb, offload, n_free)
        if peak is None:
            raise torch.OutOfMemoryError("simulated")
        s = 3.0 * (1.02 if offload else 1.0) - 0.05 * n_free
        return {"load_seconds": 1.0, "save_seconds": 0.5, "s_per_step": s, "tokens_per_step": 16384.0, "tokens_per_s": 16384 / s,
                "peak_mem_gb": peak, "layers": 32}

    return fake


def _probe(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path, peak_of, mode="auto", device="cuda", vram_gb=16):
    import tasks.probe as probe_mod

    timed, logs = [], []
    monkeypatch.setattr(probe_mod, "_time_setting", _fake_time(timed, peak_of))
    monkeypatch.setattr(probe_mod, "hardware_id", lambda device: f"{device}:simulated")
    budget = tiny_cfg.budget.model_copy(update={"vram_gb": vram_gb, "minutes": 60})
    training = tiny_cfg.training.model_copy(update={"micro_batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True,
                                                    "max_steps": None, "offload_activations": mode})
    rec = probe_mod._probe(tiny_data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, budget, device, "k", tmp_path / "probe",
                           shared_artifacts, logs.append)
    return rec, timed, logs


def test_probe_does_not_offload_when_the_checkpointed_micro_batch_fits(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path):
    """4 x 4 fits checkpointed: no offload trial; the memory left goes to layers without recompute, as before."""
    rec, timed, _ = _probe(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path, lambda mb, off, k: 8.0 + 1.6 * k)
    assert timed == [(4, 4, True, 0, False), (4, 4, True, 4, False), (4, 4, True, 8, False)]
    assert not rec.offload_activations and rec.recompute_free_layers == 4 and rec.micro_batch_size == 4
    assert [t["offload_activations"] for t in rec.trials] == [False, False, False]


def test_probe_keeps_offload_where_only_the_offloaded_micro_batch_fits(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path):
    """4 x 4 checkpointed is over 16 GiB (17.9), offloaded it fits (15.9): offload at 4 x 4, before a smaller micro-batch;
    no layer search (they exclude each other); the record, the trials and the log say so."""
    rec, timed, logs = _probe(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path,
                              lambda mb, off, k: 17.9 - (2.0 if off else 0.0) + 1.6 * k)
    assert timed == [(4, 4, True, 0, False), (4, 4, True, 0, True)]
    assert rec.offload_activations and (rec.micro_batch_size, rec.grad_accum, rec.recompute_free_layers) == (4, 4, 0)
    assert [(t["offload_activations"], t["fits"]) for t in rec.trials] == [(False, False), (True, True)]
    assert rec.peak_mem_gb == pytest.approx(15.9) and rec.max_steps == math.floor((3600 - rec.fixed_seconds) / rec.s_per_step)
    assert any("(checkpointed activations offloaded to host memory): 3.06 s/step" in m for m in logs)
    assert any("every layer stays checkpointed" in m for m in logs)


def test_probe_tries_offload_at_each_micro_batch_before_a_smaller_one_and_says_when_none_fits(tiny_cfg, tiny_data, shared_artifacts,
                                                                                                 monkeypatch, tmp_path):
    rec, timed, logs = _probe(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path,
                              lambda mb, off, k: None if mb == 4 else 16.5 - (1.0 if off else 0.0) + 1.6 * k)
    assert timed == [(4, 4, True, 0, False), (4, 4, True, 0, True), (2, 8, True, 0, False), (2, 8, True, 0, True)]
    assert rec.offload_activations and rec.micro_batch_size == 2
    assert any("(checkpointing True) ran out of memory; trying it with the checkpointed activations offloaded" in m for m in logs)
    assert any("offloaded to host memory) ran out of memory; trying a smaller micro-batch" in m for m in logs)

    with pytest.raises(StageError, match="out of memory even at micro-batch 1"):
        _probe(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path, lambda mb, off, k: None)


@pytest.mark.parametrize("mode, offloads", [("off", [False]), ("on", [True])])
def test_probe_offloads_always_when_on_and_never_when_off(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path, mode, offloads):
    rec, timed, _ = _probe(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path, lambda mb, off, k: 8.0 + 0.9 * k, mode=mode)
    assert [t[4] for t in timed if t[3] == 0] == offloads
    assert rec.offload_activations is offloads[0]
    assert rec.recompute_free_layers == (0 if offloads[0] else 8)  # offloaded: no layer search (4 and 8 freed fit 16 GiB)


def test_on_does_nothing_on_the_cpu_and_says_so(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path):
    """On the CPU the activations are already in host memory: `on` is a no-op said in one log line, not an error, so one
    pipeline.yaml serves the GPU machine and the CPU one (as training.liger does)."""
    rec, timed, logs = _probe(tiny_cfg, tiny_data, shared_artifacts, monkeypatch, tmp_path, lambda mb, off, k: 1.0, mode="on",
                              device="cpu", vram_gb=None)
    assert timed == [(4, 4, True, 0, False)] and not rec.offload_activations
    assert "probe: training.offload_activations=on does nothing on the cpu: activations already live in host memory" in logs


def test_training_offloads_as_the_probe_chose_through_the_same_builder(tiny_cfg, tiny_data, shared_artifacts, fake_manager):
    """Stage 4 and the probe's trial build the model through one builder: the probe's `offload_activations` reaches it, the
    manager is entered around each of training's forwards, and the record and the log say so."""
    import tasks.probe as probe_mod
    from tasks.models import load_tokenizer
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    probe = probe_throughput(tiny_data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, tiny_cfg.training, tiny_cfg.budget, "cpu", shared_artifacts)
    assert not probe.offload_activations  # the CPU never offloads
    training = tiny_cfg.training.model_copy(update={"max_steps": 2, "gradient_checkpointing": True, "grad_accum": 2})
    forced = probe.model_copy(update={"max_steps": 2, "gradient_checkpointing": True, "grad_accum": 2, "offload_activations": True,
                                      "key": "offloaded"})
    logs = []
    rec = train_adapter(tiny_data, forced, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, shared_artifacts, logs.append)
    (manager,) = fake_manager
    assert rec.steps == 2 and rec.offload_activations
    assert manager.events == ["enter", "exit"] * 4  # 2 steps x 2 micro-batches
    assert any("checkpointed activations offloaded to host memory" in m for m in logs if m.startswith("train:"))

    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    from tasks.data import load_split

    args = (ref, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu", "padded", load_split(tiny_data, "train"),
            load_tokenizer(ref, tiny_cfg.model))
    probe_mod._time_setting(*args, 4, 1, True, 0, tiny_data.max_length, True)
    assert len(fake_manager) == 2 and fake_manager[1].events[:2] == ["enter", "exit"]
