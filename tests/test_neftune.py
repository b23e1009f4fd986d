"""training.neftune_noise_alpha (issue 18, the answers' length): NEFTune noise sized by each token's own sample, in
packed rows and padded batches, scaled with a model's embedding scale, only in training, and through stage 4."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tasks.engine.noise import add_embedding_noise, sample_lengths


def test_sample_lengths_split_a_packed_row_at_its_position_restarts():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert sample_lengths((1, 9), position_ids=pos).tolist() == [[3, 3, 3, 2, 2, 4, 4, 4, 4]]
    # two packed rows: each row's segments are its own
    pos2 = torch.tensor([[0, 1, 0, 1, 2], [3, 4, 0, 0, 1]])
    assert sample_lengths((2, 5), position_ids=pos2).tolist() == [[2, 2, 3, 3, 3], [2, 2, 1, 2, 2]]


def test_sample_lengths_count_a_padded_rows_real_tokens_only():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert sample_lengths((2, 5), attention_mask=mask).tolist() == [[3] * 5, [5] * 5]
    # positions that do not restart (right padding continues them) and the mask together: still the real tokens
    pos = torch.arange(5).expand(2, 5)
    assert sample_lengths((2, 5), position_ids=pos, attention_mask=mask).tolist() == [[3] * 5, [5] * 5]
    assert sample_lengths((1, 4)).tolist() == [[4] * 4]
    # multimodal rotary positions, (3, B, T): the first axis' restarts
    assert sample_lengths((1, 4), position_ids=torch.tensor([[[0, 1, 0, 1]]] * 3)).tolist() == [[2, 2, 2, 2]]


def _tiny(kind: str = "llama"):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    torch.manual_seed(0)
    if kind == "gemma":
        cfg = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=16)
    else:
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    return AutoModelForCausalLM.from_config(cfg)


def _embedding_noise(model, inputs: dict) -> torch.Tensor:
    """The noise the hook added to the embeddings of one forward: the embeddings seen with the hooks minus without."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    seen = []
    handle = inner.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        model(**inputs)
    finally:
        handle.remove()
    embeddings = inner.get_input_embeddings()
    was = embeddings.training
    embeddings.eval()  # the hook adds nothing outside training
    clean = embeddings(inputs["input_ids"]).detach()
    embeddings.train(was)
    return seen[0] - clean


def test_packed_row_noise_is_each_samples_own_not_the_packs():
    """Each token's noise stays within alpha / sqrt(L d) for its own sample's L and reaches near it (uniform noise,
    32 draws a token); transformers' hook would have used the pack's 40 tokens: sqrt(40 / 8) = 2.2x weaker for the first sample."""
    model = _tiny()
    model.train()
    handles = add_embedding_noise(model, 5.0)
    lengths = [8, 32]
    pos = torch.tensor([list(range(8)) + list(range(32))])
    ids = torch.randint(0, 64, (1, 40))
    noise = _embedding_noise(model, {"input_ids": ids, "position_ids": pos})
    d = 32
    for start, n in ((0, 8), (8, 32)):
        bound = 5.0 / math.sqrt(n * d)
        part = noise[0, start:start + n].abs()
        assert part.max() <= bound * (1 + 1e-4)
        assert part.amax(-1).min() > 0.7 * bound  # the largest of 32 uniform draws: near the bound
    assert lengths == [8, 32]
    for h in handles:
        h.remove()
    assert _embedding_noise(model, {"input_ids": ids, "position_ids": pos}).abs().max() == 0


def test_no_noise_in_eval_mode_and_none_at_alpha_0():
    model = _tiny()
    add_embedding_noise(model, 5.0)
    model.eval()
    ids = torch.randint(0, 64, (2, 6))
    assert _embedding_noise(model, {"input_ids": ids}).abs().max() == 0
    assert add_embedding_noise(_tiny(), 0.0) == []


def test_gemma_noise_scales_with_its_embedding_scale_and_reaches_through_peft():
    """Gemma multiplies its embeddings by sqrt(hidden) inside the embedding module: the noise is scaled with them
    (as if added to the looked-up vectors), here through a PEFT LoRA model as stage 4 builds it, padded batch."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny("gemma"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    add_embedding_noise(model, 5.0)
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.tensor([[1] * 10, [1] * 4 + [0] * 6])
    noise = _embedding_noise(model, {"input_ids": ids, "attention_mask": mask})
    scale = math.sqrt(32)
    for row, n in ((0, 10), (1, 4)):
        bound = 5.0 / math.sqrt(n * 32) * scale
        assert noise[row].abs().max() <= bound * (1 + 1e-4)
        assert noise[row].abs().amax(-1).min() > 0.7 * bound


def test_the_train_key_holds_the_alpha_only_when_set(tiny_cfg):
    from tasks.train import cache_key

    data, probe = SimpleNamespace(key="d", model_fingerprint="m"), SimpleNamespace(key="p")
    t = tiny_cfg.training
    key = lambda training: cache_key(data, probe, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training)  # noqa: E731
    assert key(t) == key(t.model_copy(update={"neftune_noise_alpha": None})) == key(t.model_copy(update={"neftune_noise_alpha": 0.0}))
    assert key(t.model_copy(update={"neftune_noise_alpha": 5.0})) != key(t)
    assert "neftune_noise_alpha" not in str(t.model_dump(mode="json", exclude={"neftune_noise_alpha"}))


def test_a_negative_alpha_is_one_line_naming_the_key(tmp_path):
    from tasks.config import ConfigError, load_config

    with pytest.raises((ConfigError, ValueError), match="neftune_noise_alpha"):
        load_config(profile="tiny", overrides=["training.neftune_noise_alpha=-1"])
    with pytest.raises((ConfigError, ValueError), match="neftune_noise_alpha"):  # infinite noise: a NaN loss, not a run
        load_config(profile="tiny", overrides=["training.neftune_noise_alpha=inf"])


@pytest.fixture(scope="module")
def tiny_data(tiny_cfg, shared_artifacts):
    from tasks.data import load_dataset_records

    return load_dataset_records(tiny_cfg.data, tiny_cfg.model, shared_artifacts)


@pytest.mark.parametrize("engine", ["fused", "padded"])
def test_stage_4_trains_with_neftune_on_both_engines(tiny_cfg, tiny_data, shared_artifacts, engine, monkeypatch):
    """Through train_adapter on the tiny model: the noise hook is registered on the trained model, fires in training
    forwards (packed rows on the fused engine, padded batches on the padded one), the log says so, the loss is finite."""
    import tasks.engine.noise as noise_mod
    from tasks.probe import probe_throughput
    from tasks.train import train_adapter

    calls = []
    real = noise_mod.sample_lengths
    # what each training forward's noise was sized from: (batch, length), positions given, mask given
    monkeypatch.setattr(noise_mod, "sample_lengths", lambda *a, **k: calls.append((a[0], a[1] is not None, a[2] is not None)) or real(*a, **k))
    training = tiny_cfg.training.model_copy(update={"engine": engine, "max_steps": 2, "neftune_noise_alpha": 5.0})
    probe = probe_throughput(tiny_data, tiny_cfg.model, tiny_cfg.quant, tiny_cfg.lora, training, tiny_cfg.budget, "cpu", shared_artifacts)
    lines = []
    calls.clear()  # the probe does not add noise; only stage 4
    rec = train_adapter(tiny_data, probe.model_copy(update={"max_steps": 2, "key": f"neftune-{engine}"}), tiny_cfg.model, tiny_cfg.quant,
                        tiny_cfg.lora, training, shared_artifacts, log_fn=lines.append)
    assert rec.steps == 2 and math.isfinite(rec.final_loss)
    assert calls, "the noise hook never ran in a training forward"
    if engine == "fused":  # one packed row a forward, split by its positions
        assert all(shape[0] == 1 and positions for shape, positions, _ in calls)
    else:  # padded rows, sized by their masks
        assert all(mask for _, _, mask in calls) and any(shape[0] > 1 for shape, _, _ in calls)
    assert any("NEFTune noise alpha 5" in line for line in lines)
    assert Path(rec.adapter_dir).is_dir()
