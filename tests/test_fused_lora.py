"""Contracts of the fused LoRA path (tasks/engine/lora.py), fp32 on CPU.

* the autograd functions: forward and gradients equal to the plain-torch formula, the dropout mask
  regenerated from the seed in backward is the forward's (no mask stored);
* on a tiny Mistral with PEFT LoRA on all 7 projections: the fused forward and every gradient equal PEFT's
  (dropout 0), with one LoRA-A matmul per q/k/v group and per gate/up group;
* dropout > 0 under gradient checkpointing: the recomputed forward draws the same masks (gradients equal to a
  run without recompute) and dropout really applies;
* the engine: per-step loss of `engine: fused` (padding-free packs) equals the seed engine `padded` (padded
  batches) on the same samples over 4 AdamW steps within 1e-3 relative; the saved adapter is a normal PEFT
  adapter that reloads to the same outputs.
Tolerances: fp32, only summation order differs -> 1e-5 absolute on outputs and gradients.
"""

import pytest
import torch

from tasks.engine import lora as lora_mod
from tasks.engine.lora import STORED, LoraA, LoraBInPlace, dropout_backend, dropout_mask, fuse_lora, keep_threshold, seeded_dropout, unfuse_lora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ATOL = 1e-5
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora_a_reference(x, a, keep, p, g):
    """What LoraA must compute, in fp32 autograd: y = (x * keep / (1 - p)) @ A^T, and the gradients of x and A
    for the upstream gradient g."""
    xr, ar = x.detach().float().requires_grad_(), a.detach().float().requires_grad_()
    ref = (xr * keep / (1 - p)) @ ar.t()
    ref.backward(g.float())
    return ref, xr.grad, ar.grad


def test_lora_a_regenerates_the_forward_mask_and_matches_the_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 50, 32, requires_grad=True)
    a = torch.randn(12, 32, requires_grad=True)
    p, seed = 0.3, 1234
    out = LoraA.apply(x, a, p, seed, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)

    keep = dropout_mask(torch.Size([100, 32]), p, seed, x.device).view(2, 50, 32)
    assert torch.equal(keep, dropout_mask(torch.Size([100, 32]), p, seed, x.device).view(2, 50, 32))  # same seed, same mask
    assert not torch.equal(keep, dropout_mask(torch.Size([100, 32]), p, seed + 1, x.device).view(2, 50, 32))
    assert 0.25 < 1 - keep.float().mean().item() < 0.35  # P(drop) = p
    ref, ref_gx, ref_ga = _lora_a_reference(x, a, keep, p, g)
    assert torch.allclose(out, ref, atol=ATOL)
    assert torch.allclose(x.grad, ref_gx, atol=ATOL) and torch.allclose(a.grad, ref_ga, atol=ATOL)


def test_lora_a_stored_variant_keeps_torchs_mask_and_matches_the_formula():
    """dropout="stored" (the bench's comparison variant): torch's dropout, mask kept; forward and backward use it."""
    x = torch.randn(2, 50, 32, requires_grad=True)
    a = torch.randn(12, 32, requires_grad=True)
    p = 0.3
    torch.manual_seed(5)
    out = LoraA.apply(x, a, p, STORED, torch.float32)
    g = torch.randn_like(out)
    out.backward(g)
    torch.manual_seed(5)  # the same draw, read back
    _, keep = torch.native_dropout(x.detach().reshape(-1, 32), p, True)
    keep = keep.view(2, 50, 32)
    assert 0.25 < 1 - keep.float().mean().item() < 0.35
    ref, ref_gx, ref_ga = _lora_a_reference(x, a, keep, p, g)
    assert torch.allclose(out, ref, atol=ATOL)
    assert torch.allclose(x.grad, ref_gx, atol=ATOL) and torch.allclose(a.grad, ref_ga, atol=ATOL)


def test_seeded_dropout_in_place_writes_the_same_values_into_its_input():
    t = torch.randn(64, 48)
    ref = seeded_dropout(t, 0.25, 11)
    u = t.clone()
    out = seeded_dropout(u, 0.25, 11, inplace=True)
    assert out.data_ptr() == u.data_ptr() and torch.allclose(out, ref) and not torch.equal(out, t)
    assert seeded_dropout(t, 0.0, 11) is t  # p = 0: no kernel, no copy
    assert keep_threshold(0.05) == 3277 and keep_threshold(0.0) == 0


def test_lora_b_adds_in_place_with_the_scale():
    torch.manual_seed(1)
    base_w = torch.randn(24, 16, requires_grad=True)
    x = torch.randn(3, 7, 16, requires_grad=True)
    xa = torch.randn(3, 7, 4, requires_grad=True)
    b = torch.randn(24, 4, requires_grad=True)
    result = torch.nn.functional.linear(x, base_w)
    ptr = result.data_ptr()
    out = LoraBInPlace.apply(result, xa, b, 2.0)
    assert out.data_ptr() == ptr  # no new (tokens x out) tensor
    g = torch.randn_like(out)
    out.backward(g)
    xr, xar, br, wr = (t.detach().clone().requires_grad_() for t in (x, xa, b, base_w))
    ref = torch.nn.functional.linear(xr, wr) + 2.0 * (xar @ br.t())
    ref.backward(g)
    assert torch.allclose(out, ref, atol=ATOL)
    for t, r in ((x, xr), (xa, xar), (b, br), (base_w, wr)):
        assert torch.allclose(t.grad, r.grad, atol=ATOL)


def tiny_lora_model(dropout: float, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, attn_implementation="sdpa")
    model = MistralForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():  # PEFT starts B at zero; random B makes every gradient path non-trivial
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.1)
    return model.train()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 24), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def lora_grads(model, inputs, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(**inputs)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_model_equals_peft_and_shares_one_a_matmul_per_group(monkeypatch):
    model = tiny_lora_model(dropout=0.0)
    inputs = batch()
    logits_ref, grads_ref = lora_grads(model, inputs)
    assert fuse_lora(model) == 2 * 7
    calls = []
    real = LoraA.apply
    monkeypatch.setattr(LoraA, "apply", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    logits, grads = lora_grads(model, inputs)
    # Per layer: q/k/v in one A-matmul (3 x r rows), gate/up in one (2 x r), o and down alone.
    assert sorted(calls) == sorted([12, 8, 4, 4] * 2)
    assert torch.allclose(logits, logits_ref, atol=ATOL)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * 7 * 2
    for n in grads:
        assert torch.allclose(grads[n], grads_ref[n], atol=ATOL), n
    unfuse_lora(model)
    calls.clear()
    assert torch.allclose(lora_grads(model, inputs)[0], logits_ref, atol=ATOL) and not calls


def test_zero_dropout_draws_no_seed_and_no_mask(monkeypatch):
    """lora.dropout = 0: the fused path skips dropout entirely (no seed drawn, no mask, no kernel)."""
    model = tiny_lora_model(dropout=0.0)
    fuse_lora(model)
    calls = []
    monkeypatch.setattr(lora_mod, "draw_seed", lambda: calls.append("seed") or 1)
    monkeypatch.setattr(lora_mod, "dropout_mask", lambda *a, **k: calls.append("mask"))
    monkeypatch.setattr(torch, "native_dropout", lambda *a, **k: calls.append("native"))
    lora_grads(model, batch())
    assert calls == []


@pytest.mark.parametrize("mode", ["seeded", "stored"])
def test_dropout_masks_survive_recompute_in_both_modes(mode):
    """Under gradient checkpointing the recomputed forward applies the forward's masks, in the engine's seeded
    mode and in the stored comparison mode (torch's generator, whose state checkpointing restores)."""
    inputs = batch(1)
    plain = tiny_lora_model(dropout=0.2)
    fuse_lora(plain, dropout=mode)
    _, grads_plain = lora_grads(plain, inputs, seed=5)
    ckpt = tiny_lora_model(dropout=0.2, checkpointing=True)
    fuse_lora(ckpt, dropout=mode)
    _, grads_ckpt = lora_grads(ckpt, inputs, seed=5)
    for n in grads_plain:
        assert torch.allclose(grads_plain[n], grads_ckpt[n], atol=ATOL), n
    with pytest.raises(ValueError, match="dropout='mask'"):
        fuse_lora(tiny_lora_model(dropout=0.2), dropout="mask")


def test_dropout_masks_survive_recompute_and_apply():
    inputs = batch(1)
    plain = tiny_lora_model(dropout=0.2)
    fuse_lora(plain)
    _, grads_plain = lora_grads(plain, inputs, seed=5)
    ckpt = tiny_lora_model(dropout=0.2, checkpointing=True)
    fuse_lora(ckpt)
    _, grads_ckpt = lora_grads(ckpt, inputs, seed=5)
    for n in grads_plain:  # recompute regenerated the forward's seeds and masks
        assert torch.allclose(grads_plain[n], grads_ckpt[n], atol=ATOL), n
    nodrop = tiny_lora_model(dropout=0.0)
    fuse_lora(nodrop)
    _, grads_nodrop = lora_grads(nodrop, inputs, seed=5)
    assert any(not torch.allclose(grads_plain[n], grads_nodrop[n], atol=1e-3) for n in grads_plain)
    plain.eval()  # eval: no dropout, PEFT's exact function
    with torch.no_grad():
        torch.manual_seed(9)
        a = plain(**inputs).logits
        unfuse_lora(plain)
        b = plain(**inputs).logits
    assert torch.allclose(a, b, atol=ATOL)


def test_fused_engine_loss_parity_with_the_seed_engine_and_a_normal_adapter(tiny_cfg, tiny_tok, shared_artifacts, tmp_path):
    from peft import PeftModel

    from helpers import randomize_lora_b
    from tasks.engine.build import build_model
    from tasks.engine.collate import collator_for
    from tasks.models import load_base_model, resolve_model

    lora = tiny_cfg.lora.model_copy(update={"dropout": 0.0})
    ref = resolve_model(tiny_cfg.model, shared_artifacts)
    g = torch.Generator().manual_seed(3)
    vocab = min(len(tiny_tok), 1000)
    rows = []
    for n in [40, 17, 33, 8, 25, 40, 12, 29, 36, 5, 21, 30, 14, 38, 9, 27]:
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3:]})
    micro_batches = [rows[i:i + 4] for i in range(0, len(rows), 4)]

    losses = {}
    models = {}
    for engine in ("padded", "fused"):
        torch.manual_seed(0)
        model = randomize_lora_b(build_model(ref, tiny_cfg.model, tiny_cfg.quant, lora, True, "cpu", engine))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        collate = collator_for(engine, tiny_tok.pad_token_id)
        losses[engine] = []
        for mb in micro_batches:
            inputs = collate(mb)
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[engine].append(loss.item())
        models[engine] = model
    assert "input_ids" in collator_for("fused", 0)(micro_batches[0]) and collator_for("fused", 0)(micro_batches[0])["input_ids"].shape[0] == 1
    for a, b in zip(losses["padded"], losses["fused"]):
        assert abs(a - b) / abs(a) < 1e-3, (losses["padded"], losses["fused"])
    assert losses["fused"][-1] != losses["fused"][0]  # it trained

    fused = models["fused"].eval()
    fused.save_pretrained(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    base = load_base_model(ref, tiny_cfg.model, tiny_cfg.quant, "cpu")
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(fused(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton dropout runs on CUDA only")
def test_cuda_seeded_dropout_regenerates_its_mask_and_lora_a_matches_the_formula():
    """On the GPU (bench call): the Triton kernel's mask depends on the seed only, and LoraA's backward
    regenerates it (the mask is read back by dropping a tensor of ones)."""
    p, seed = 0.1, 77
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(48, 512, device="cuda", requires_grad=True)
    ones = torch.ones(4096, 512, device="cuda", dtype=torch.bfloat16)
    keep = seeded_dropout(ones, p, seed) != 0
    assert dropout_backend("cuda") in ("triton", "torch")
    assert torch.equal(keep, seeded_dropout(ones, p, seed) != 0) and not torch.equal(keep, seeded_dropout(ones, p, seed + 1) != 0)
    assert abs((1 - keep.float().mean().item()) - p) < 0.01
    out = LoraA.apply(x, a, p, seed, torch.bfloat16)
    g = torch.randn_like(out)
    out.backward(g)
    ref, ref_gx, ref_ga = _lora_a_reference(x, a, keep, p, g)
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-1)
    assert torch.allclose(x.grad.float(), ref_gx, rtol=2e-2, atol=2e-1)
    assert torch.allclose(a.grad, ref_ga, rtol=2e-2, atol=2.0)
    y = torch.randn(3 * 4096 + 5, device="cuda", dtype=torch.bfloat16)  # a partial last block; in place = out of place
    ref = seeded_dropout(y, p, seed)
    assert torch.equal(seeded_dropout(y.clone(), p, seed, inplace=True), ref)
    big = seeded_dropout(torch.ones(2**22, device="cuda", dtype=torch.bfloat16), 0.05, 3) == 0
    assert abs(big.float().mean().item() - keep_threshold(0.05) / 65536) < 1e-3


def test_fused_model_under_bf16_autocast_matches_peft():
    """bf16 autocast (how Trainer runs with bf16=True): the LoRA matmuls run in autocast's dtype, as PEFT's do."""
    model = tiny_lora_model(dropout=0.0)
    inputs = batch(2)

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**inputs)
        out.loss.backward()
        return out.loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_ref, grads_ref = run()
    fuse_lora(model)
    loss, grads = run()
    assert abs(loss.item() - loss_ref.item()) / loss_ref.item() < 1e-2
    for n in grads:
        cos = torch.nn.functional.cosine_similarity(grads[n].flatten(), grads_ref[n].flatten(), dim=0)
        assert cos > 0.99, (n, cos.item())
